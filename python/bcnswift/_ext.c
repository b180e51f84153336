/*
 * bcnswift._ext: the CPython extension over numpy that wraps the C ABI (bcnswift.h).
 *
 * It checks what it alone can know: that each argument is an ndarray of the right dtype, aligned, writeable
 * where written, as large as the shape says, and dense in the memory order the flags declare (C order, or
 * channels-last with BCN_CHANNELS_LAST), so the ABI never touches memory out of bounds. Inputs are the logical
 * [B, C, *] arrays; the Python layer (layers.py) chooses the memory format and owns the arrays. Semantics
 * (shapes against the layer, modes, statistics) are its business and the ABI's. The GIL is released around
 * every compute call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include "bcnswift.h"
#include "_c_api.h"

#define MESSAGE_CAPACITY 512

static PyObject *raise_status(int32_t status, const char *message) {
    PyObject *type = PyExc_ValueError;
    if (status == BCN_ERR_NONFINITE) type = PyExc_FloatingPointError;
    else if (status == BCN_ERR_NO_FORWARD) type = PyExc_RuntimeError;
    else if (status == BCN_ERR_OUT_OF_MEMORY) type = PyExc_MemoryError;
    PyErr_SetString(type, message[0] ? message : "bcnswift: unknown error");
    return NULL;
}

static const char *dtype_name(int typenum) {
    return typenum == NPY_FLOAT32 ? "float32" : typenum == NPY_FLOAT64 ? "float64" : "int64";
}

/* True when `a` is one dense block in C order, or with `channels_last` in the order [0, 2, ..., nd-1, 1]
 * (axes of size 1 may have any stride, as numpy's own contiguity flags allow). */
static int dense(PyArrayObject *a, int channels_last) {
    int nd = PyArray_NDIM(a);
    if (!channels_last || nd < 3) return PyArray_IS_C_CONTIGUOUS(a);
    npy_intp *d = PyArray_DIMS(a), *st = PyArray_STRIDES(a), expected = PyArray_ITEMSIZE(a);
    int order[NPY_MAXDIMS];
    order[0] = 0;
    for (int i = 2; i < nd; i++) order[i - 1] = i;
    order[nd - 1] = 1;
    for (int i = nd - 1; i >= 0; i--) {
        int axis = order[i];
        if (d[axis] != 1 && st[axis] != expected) return 0;
        expected *= d[axis];
    }
    return 1;
}

/* The array behind `obj`, checked: dtype `typenum`, aligned, dense (C order, or channels-last when asked),
 * writeable if asked, `size` elements (or any size when size < 0). None gives NULL data when allowed. */
static int take(PyObject *obj, const char *name, int typenum, int writeable, npy_intp size, int allow_none,
                int channels_last, void **data) {
    *data = NULL;
    if (obj == Py_None) {
        if (allow_none) return 0;
        PyErr_Format(PyExc_TypeError, "%s must be an array, not None", name);
        return -1;
    }
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy array, got %s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != typenum) {
        PyErr_Format(PyExc_TypeError, "%s has dtype %S, expected %s", name, (PyObject *)PyArray_DESCR(a),
                     dtype_name(typenum));
        return -1;
    }
    if (!PyArray_ISALIGNED(a) || !dense(a, channels_last)) {
        PyErr_Format(PyExc_ValueError, "%s must be aligned and %s", name,
                     channels_last ? "dense in channels-last order" : "C-contiguous");
        return -1;
    }
    if (writeable && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be writeable", name);
        return -1;
    }
    if (size >= 0 && PyArray_SIZE(a) != size) {
        PyErr_Format(PyExc_ValueError, "%s has %zd elements, expected %zd", name, (Py_ssize_t)PyArray_SIZE(a),
                     (Py_ssize_t)size);
        return -1;
    }
    *data = PyArray_DATA(a);
    return 0;
}

/* B, C, S of a logical [B, C, *] float array, its dtype, and its data, dense in the flags' memory order. */
static int take_input(PyObject *obj, const char *name, uint32_t flags, int writeable, int64_t *b, int64_t *c,
                      int64_t *s, int *typenum, void **data) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy array", name);
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    int nd = PyArray_NDIM(a);
    if (nd < 2) {
        PyErr_Format(PyExc_ValueError, "%s must have rank >= 2 ([B, C, *]), got rank %d", name, nd);
        return -1;
    }
    *typenum = PyArray_TYPE(a);
    if (*typenum != NPY_FLOAT32 && *typenum != NPY_FLOAT64) {
        PyErr_Format(PyExc_TypeError, "%s must be float32 or float64", name);
        return -1;
    }
    npy_intp *d = PyArray_DIMS(a);
    *b = d[0];
    *c = d[1];
    *s = 1;
    for (int i = 2; i < nd; i++) *s *= d[i]; /* numpy already bounds the total size */
    return take(obj, name, *typenum, writeable, -1, 0, (flags & BCN_CHANNELS_LAST) != 0, data);
}

/* A second [B, C, *] array (y, dy, dx) that must match the input's dtype, size and memory order. */
static int take_like(PyObject *obj, const char *name, uint32_t flags, int typenum, npy_intp n, int writeable,
                     void **data) {
    return take(obj, name, typenum, writeable, n, 0, (flags & BCN_CHANNELS_LAST) != 0, data);
}

/* flags: a combination of the flags in `known` (BCN_FLAGS_ALL or BCN_WS_FLAGS_ALL). Other bits are refused here,
 * as the C ABI refuses them, but before any array is read in the memory order the flags declare; and a value
 * beyond 32 bits, which a cast would silently cut to its low bits. */
static int parse_flags(PyObject *obj, uint32_t known, uint32_t *flags) {
    long long v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 0 || v > (long long)UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "flags must be a combination of bcnswift's flags, got %lld", v);
        return -1;
    }
    if ((uint32_t)v & ~known) {
        PyErr_Format(PyExc_ValueError, "unknown flag bits 0x%x", (unsigned)((uint32_t)v & ~known));
        return -1;
    }
    *flags = (uint32_t)v;
    return 0;
}

static int parse_groups(PyObject *obj, uint32_t flags, int64_t *groups, npy_intp *g) {
    *groups = PyLong_AsLongLong(obj);
    if (*groups == -1 && PyErr_Occurred()) return -1;
    if ((flags & BCN_CHANNEL_NORM) && *groups <= 0) {
        PyErr_Format(PyExc_ValueError, "num_groups must be positive, got %lld", (long long)*groups);
        return -1;
    }
    *g = (flags & BCN_CHANNEL_NORM) ? (npy_intp)*groups : 0;
    return 0;
}

static int check_nargs(Py_ssize_t nargs, Py_ssize_t expected, const char *name) {
    if (nargs == expected) return 0;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", name, expected, nargs);
    return -1;
}

/* Parameters and buffers of a forward: args[0..6] = bn_weight, bn_bias, running_mean, running_var,
 * num_batches_tracked, cn_weight, cn_bias. */
typedef struct { void *bw, *bb, *rm, *rv, *nbt, *cw, *cb; } State;

static int take_state(PyObject *const *args, uint32_t flags, int typenum, npy_intp c, npy_intp g, State *st) {
    int no_bn = !(flags & BCN_BATCH_NORM), no_cn = !(flags & BCN_CHANNEL_NORM);
    if (take(args[0], "bn_weight", typenum, 0, c, no_bn, 0, &st->bw) < 0 ||
        take(args[1], "bn_bias", typenum, 0, c, no_bn, 0, &st->bb) < 0 ||
        take(args[2], "running_mean", typenum, 1, c, no_bn, 0, &st->rm) < 0 ||
        take(args[3], "running_var", typenum, 1, c, no_bn, 0, &st->rv) < 0 ||
        take(args[4], "num_batches_tracked", NPY_INT64, 1, 1, no_bn, 0, &st->nbt) < 0 ||
        take(args[5], "cn_weight", typenum, 0, g, no_cn, 0, &st->cw) < 0 ||
        take(args[6], "cn_bias", typenum, 0, g, no_cn, 0, &st->cb) < 0)
        return -1;
    return 0;
}

/* A float64 buffer of exactly `n` values (moments, sums), or None when allowed. */
static int take_doubles(PyObject *obj, const char *name, npy_intp n, int writeable, int allow_none, void **data) {
    return take(obj, name, NPY_FLOAT64, writeable, n, allow_none, 0, data);
}

/* The context array: any length (the ABI checks it against the shape). */
static int take_context(PyObject *obj, int writeable, void **data, int64_t *length) {
    if (take(obj, "context", NPY_FLOAT64, writeable, -1, 0, 0, data) < 0) return -1;
    *length = (int64_t)PyArray_SIZE((PyArrayObject *)obj);
    return 0;
}

/* The output `out` (`what`) apart from each of `count` arrays the call reads or writes beside it (`names`), all
 * accepted by `take` (or None): an output written over a parameter, a running buffer, a gradient or the context
 * corrupts both. Checked before any value is read or written. The layers check their `out=` before they call,
 * but their common case (one C call, fresh_output) cannot see an array assigned to the layer as a view of that
 * out. Arrays `take` accepted are dense, so each is one block of PyArray_NBYTES bytes from its data pointer (axes
 * of size 1 move nothing). */
static int check_apart(PyObject *out, const char *what, PyObject *const *others, const char *const *names,
                       int count) {
    PyArrayObject *o = (PyArrayObject *)out;
    uintptr_t p = (uintptr_t)PyArray_BYTES(o), m = (uintptr_t)PyArray_NBYTES(o);
    for (int i = 0; i < count && m > 0; i++) {
        if (others[i] == Py_None) continue;
        PyArrayObject *a = (PyArrayObject *)others[i];
        uintptr_t q = (uintptr_t)PyArray_BYTES(a), n = (uintptr_t)PyArray_NBYTES(a);
        if (n > 0 && p < q + n && q < p + m) {
            PyErr_Format(PyExc_ValueError, "%s must not overlap %s, which the call reads or writes beside it: "
                         "the layer's parameters, running buffers and gradients need memory of their own", what,
                         names[i]);
            return -1;
        }
    }
    return 0;
}

static const char *const forward_beside[] = {"bn_weight", "bn_bias", "running_mean", "running_var",
                                             "num_batches_tracked", "cn_weight", "cn_bias", "context", "moments"};
static const char *const backward_beside[] = {"grad_bn_weight", "grad_bn_bias", "grad_cn_weight", "grad_cn_bias",
                                              "context", "sums"};

/* Each of the `count` arrays of a call (`arrays`, `names`; None skipped) that it writes besides its output
 * (`written`: their indices) apart from every other: a running buffer or gradient that overlaps the input wrote
 * into the caller's x or dy (inputs are never written), and two running buffers sharing memory updated each
 * other. Arrays the layers make never overlap; these are arrays assigned to a layer by hand. */
static int check_written_apart(PyObject *const *arrays, const char *const *names, int count, const int *written,
                               int writes) {
    for (int k = 0; k < writes; k++) {
        int i = written[k];
        if (arrays[i] == Py_None) continue;
        for (int j = 0; j < count; j++)
            if (j != i && arrays[j] != Py_None && check_apart(arrays[i], names[i], arrays + j, names + j, 1) < 0)
                return -1;
    }
    return 0;
}

/* norm_forward's arrays besides y, and which of them it writes (the running buffers and the context). */
static int check_forward_apart(PyObject *const *args, int finish) {
    static const char *const names[] = {"x", "bn_weight", "bn_bias", "running_mean", "running_var",
                                        "num_batches_tracked", "cn_weight", "cn_bias", "context", "moments"};
    static const int written[] = {3, 4, 5, 8};
    PyObject *arrays[] = {args[5], args[7], args[8], args[9], args[10], args[11], args[12], args[13], args[14],
                          finish ? args[15] : Py_None};
    return check_written_apart(arrays, names, 10, written, 4);
}

/* norm_backward's arrays besides dx, and which of them it writes (the parameter gradients). */
static int check_backward_apart(PyObject *const *args, int finish) {
    static const char *const names[] = {"x", "dy", "grad_bn_weight", "grad_bn_bias", "grad_cn_weight",
                                        "grad_cn_bias", "context", "sums"};
    static const int written[] = {2, 3, 4, 5};
    PyObject *arrays[] = {args[2], args[3], args[5], args[6], args[7], args[8], args[9], finish ? args[10] : Py_None};
    return check_written_apart(arrays, names, 8, written, 4);
}

/* norm_forward's arguments, taken and checked. */
typedef struct {
    uint32_t flags;
    int64_t groups, b, c, s, ctx_len;
    double eps, bn_eps, momentum;
    int typenum, finish;
    void *x, *y, *ctx, *moments;
    State st;
} ForwardCall;

/* Everything norm_forward checks before its kernels run, for it and for check_finish. */
static int take_forward(PyObject *const *args, Py_ssize_t nargs, const char *name, ForwardCall *f) {
    if (nargs != 15 && check_nargs(nargs, 16, name) < 0) return -1;
    npy_intp g;
    if (parse_flags(args[0], BCN_FLAGS_ALL, &f->flags) < 0 || parse_groups(args[1], f->flags, &f->groups, &g) < 0)
        return -1;
    f->eps = PyFloat_AsDouble(args[2]), f->bn_eps = PyFloat_AsDouble(args[3]), f->momentum = PyFloat_AsDouble(args[4]);
    if (PyErr_Occurred()) return -1;
    if (take_input(args[5], "x", f->flags, 0, &f->b, &f->c, &f->s, &f->typenum, &f->x) < 0 ||
        take_like(args[6], "y", f->flags, f->typenum, (npy_intp)(f->b * f->c * f->s), 1, &f->y) < 0 ||
        take_state(args + 7, f->flags, f->typenum, (npy_intp)f->c, g, &f->st) < 0 ||
        take_context(args[14], 1, &f->ctx, &f->ctx_len) < 0)
        return -1;
    f->finish = nargs == 16;
    f->moments = NULL;
    if (f->finish && take_doubles(args[15], "moments", (npy_intp)(3 * f->c), 0, 1, &f->moments) < 0) return -1;
    if (check_apart(args[6], "y (the output)", args + 7, forward_beside, f->finish ? 9 : 8) < 0) return -1;
    return check_forward_apart(args, f->finish);
}

/* norm_forward(flags, groups, eps, bn_eps, momentum, x, y, bn_weight, bn_bias, running_mean, running_var,
 *              num_batches_tracked, cn_weight, cn_bias, context[, moments])
 * With the 16th argument (the batch's moments, or None) it runs phase (c) only (bcn_norm_finish_*). */
static PyObject *norm_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    ForwardCall f;
    if (take_forward(args, nargs, "norm_forward", &f) < 0) return NULL;
    char message[MESSAGE_CAPACITY];
    int32_t status;
    /* The four calls share their arguments (the buffers are void *, which either type's pointer takes), and the
     * finish adds the moments before the context. */
#define HEAD f.flags, f.b, f.c, f.s, f.groups, f.eps, f.bn_eps, f.momentum, f.x, f.y, f.st.bw, f.st.bb, f.st.rm, \
             f.st.rv, f.st.nbt, f.st.cw, f.st.cb
#define TAIL f.ctx, f.ctx_len, message, MESSAGE_CAPACITY
    Py_BEGIN_ALLOW_THREADS
    if (f.typenum == NPY_FLOAT32)
        status = f.finish ? bcn_norm_finish_f32(HEAD, f.moments, TAIL) : bcn_norm_forward_f32(HEAD, TAIL);
    else
        status = f.finish ? bcn_norm_finish_f64(HEAD, f.moments, TAIL) : bcn_norm_forward_f64(HEAD, TAIL);
    Py_END_ALLOW_THREADS
#undef HEAD
#undef TAIL
    if (status != BCN_OK) return raise_status(status, message);
    Py_RETURN_NONE;
}

/* check_finish(<norm_forward's 16 arguments, moments None>): every check norm_forward makes of its arguments
 * (take_forward), without running it. A synchronized layer makes them before its exchange, so that a rank whose
 * arrays the finish would refuse fails with the others (in the exchange's header), not alone after the others
 * changed their buffers. x may hold no values (an empty rank's batch). */
static PyObject *check_finish(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    ForwardCall f;
    if (check_nargs(nargs, 16, "check_finish") < 0 || take_forward(args, nargs, "check_finish", &f) < 0) return NULL;
    Py_RETURN_NONE;
}

/* norm_moments(flags, groups, x, moments or None, context): forward phase (a). */
static PyObject *norm_moments(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 5, "norm_moments") < 0) return NULL;
    uint32_t flags;
    int64_t groups, b, c, s, ctx_len;
    npy_intp g;
    int typenum;
    void *x, *moments, *ctx;
    if (parse_flags(args[0], BCN_FLAGS_ALL, &flags) < 0 || parse_groups(args[1], flags, &groups, &g) < 0 ||
        take_input(args[2], "x", flags, 0, &b, &c, &s, &typenum, &x) < 0 ||
        take_doubles(args[3], "moments", (npy_intp)(3 * c), 1, 1, &moments) < 0 ||
        take_context(args[4], 1, &ctx, &ctx_len) < 0)
        return NULL;
    char message[MESSAGE_CAPACITY];
    int32_t status;
    Py_BEGIN_ALLOW_THREADS
    status = typenum == NPY_FLOAT32
                 ? bcn_norm_moments_f32(flags, b, c, s, groups, x, moments, ctx, ctx_len, message, MESSAGE_CAPACITY)
                 : bcn_norm_moments_f64(flags, b, c, s, groups, x, moments, ctx, ctx_len, message, MESSAGE_CAPACITY);
    Py_END_ALLOW_THREADS
    if (status != BCN_OK) return raise_status(status, message);
    Py_RETURN_NONE;
}

/* running_update(flags, momentum, moments, running_mean, running_var, num_batches_tracked): the running
 * buffers' update alone from the batch's moments (3*C doubles); C is the running mean's length. */
static PyObject *running_update(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 6, "running_update") < 0) return NULL;
    uint32_t flags;
    if (parse_flags(args[0], BCN_FLAGS_ALL, &flags) < 0) return NULL;
    double momentum = PyFloat_AsDouble(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (!PyArray_Check(args[3])) {
        PyErr_Format(PyExc_TypeError, "running_mean must be a numpy array, got %s", Py_TYPE(args[3])->tp_name);
        return NULL;
    }
    int typenum = PyArray_TYPE((PyArrayObject *)args[3]);
    if (typenum != NPY_FLOAT32 && typenum != NPY_FLOAT64) {
        PyErr_SetString(PyExc_TypeError, "running_mean must be float32 or float64");
        return NULL;
    }
    npy_intp c = PyArray_SIZE((PyArrayObject *)args[3]);
    void *moments, *rm, *rv, *nbt;
    if (take_doubles(args[2], "moments", 3 * c, 0, 0, &moments) < 0 ||
        take(args[3], "running_mean", typenum, 1, c, 0, 0, &rm) < 0 ||
        take(args[4], "running_var", typenum, 1, c, 0, 0, &rv) < 0 ||
        take(args[5], "num_batches_tracked", NPY_INT64, 1, 1, 0, 0, &nbt) < 0)
        return NULL;
    char message[MESSAGE_CAPACITY];
    int32_t status = typenum == NPY_FLOAT32
        ? bcn_running_update_f32(flags, (int64_t)c, momentum, moments, rm, rv, nbt, message, MESSAGE_CAPACITY)
        : bcn_running_update_f64(flags, (int64_t)c, momentum, moments, rm, rv, nbt, message, MESSAGE_CAPACITY);
    if (status != BCN_OK) return raise_status(status, message);
    Py_RETURN_NONE;
}

/* merge(kind, sets) with sets a C-contiguous float64 array [n, width*C] (width 3: moments, 2: gradient sums);
 * returns a new [width*C] array. */
static PyObject *merge(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 2, "merge") < 0) return NULL;
    long width = PyLong_AsLong(args[0]);
    if (width == -1 && PyErr_Occurred()) return NULL;
    if (width != 2 && width != 3) {
        PyErr_SetString(PyExc_ValueError, "merge width must be 3 (moments) or 2 (gradient sums)");
        return NULL;
    }
    void *sets;
    if (take(args[1], "sets", NPY_FLOAT64, 0, -1, 0, 0, &sets) < 0) return NULL;
    PyArrayObject *a = (PyArrayObject *)args[1];
    if (PyArray_NDIM(a) != 2 || PyArray_DIM(a, 1) % width != 0) {
        PyErr_Format(PyExc_ValueError, "sets must be [n, %ld * channels], got rank %d", width, PyArray_NDIM(a));
        return NULL;
    }
    int64_t n = PyArray_DIM(a, 0), c = PyArray_DIM(a, 1) / width;
    npy_intp dims[1] = {(npy_intp)(width * c)};
    PyObject *out = PyArray_SimpleNew(1, dims, NPY_FLOAT64);
    if (!out) return NULL;
    char message[MESSAGE_CAPACITY];
    int32_t status;
    double *merged = PyArray_DATA((PyArrayObject *)out);
    Py_BEGIN_ALLOW_THREADS
    status = width == 3 ? bcn_moments_merge(n, c, sets, merged, message, MESSAGE_CAPACITY)
                        : bcn_sums_merge(n, c, sets, merged, message, MESSAGE_CAPACITY);
    Py_END_ALLOW_THREADS
    if (status != BCN_OK) {
        Py_DECREF(out);
        return raise_status(status, message);
    }
    return out;
}

/* norm_backward's arguments, taken and checked. */
typedef struct {
    uint32_t flags;
    int64_t groups, b, c, s, ctx_len;
    int typenum, finish;
    void *x, *dy, *dx, *gbw, *gbb, *gcw, *gcb, *ctx, *sums;
} BackwardCall;

/* Everything norm_backward checks before its kernels run, for it and for check_backward_finish. */
static int take_backward(PyObject *const *args, Py_ssize_t nargs, const char *name, BackwardCall *k) {
    if (nargs != 10 && check_nargs(nargs, 11, name) < 0) return -1;
    npy_intp g;
    k->finish = nargs == 11;
    k->sums = NULL;
    if (parse_flags(args[0], BCN_FLAGS_ALL, &k->flags) < 0 || parse_groups(args[1], k->flags, &k->groups, &g) < 0 ||
        take_input(args[2], "x", k->flags, 0, &k->b, &k->c, &k->s, &k->typenum, &k->x) < 0)
        return -1;
    npy_intp n = (npy_intp)(k->b * k->c * k->s), c = (npy_intp)k->c;
    int t = k->typenum;
    if (take_like(args[3], "dy", k->flags, t, n, 0, &k->dy) < 0 ||
        take_like(args[4], "dx", k->flags, t, n, 1, &k->dx) < 0 ||
        take(args[5], "grad_bn_weight", t, 1, c, 1, 0, &k->gbw) < 0 ||
        take(args[6], "grad_bn_bias", t, 1, c, 1, 0, &k->gbb) < 0 ||
        take(args[7], "grad_cn_weight", t, 1, g, 1, 0, &k->gcw) < 0 ||
        take(args[8], "grad_cn_bias", t, 1, g, 1, 0, &k->gcb) < 0 ||
        take_context(args[9], k->finish, &k->ctx, &k->ctx_len) < 0)
        return -1;
    if (k->finish && take_doubles(args[10], "sums", 2 * c, 0, 1, &k->sums) < 0) return -1;
    if (check_apart(args[4], "dx (the input gradient)", args + 5, backward_beside, k->finish ? 6 : 5) < 0) return -1;
    return check_backward_apart(args, k->finish);
}

/* norm_backward(flags, groups, x, dy, dx, grad_bn_weight, grad_bn_bias, grad_cn_weight, grad_cn_bias, context
 *               [, sums]): with the 11th argument (the batch's gradient sums, or None) backward phase (c) only. */
static PyObject *norm_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    BackwardCall k;
    if (take_backward(args, nargs, "norm_backward", &k) < 0) return NULL;
    char message[MESSAGE_CAPACITY];
    int32_t status;
    /* as norm_forward's: one argument list, the finish adding the sums before the context */
#define HEAD k.flags, k.b, k.c, k.s, k.groups, k.x, k.dy, k.dx, k.gbw, k.gbb, k.gcw, k.gcb
#define TAIL k.ctx, k.ctx_len, message, MESSAGE_CAPACITY
    Py_BEGIN_ALLOW_THREADS
    if (k.typenum == NPY_FLOAT32)
        status = k.finish ? bcn_norm_backward_finish_f32(HEAD, k.sums, TAIL) : bcn_norm_backward_f32(HEAD, TAIL);
    else
        status = k.finish ? bcn_norm_backward_finish_f64(HEAD, k.sums, TAIL) : bcn_norm_backward_f64(HEAD, TAIL);
    Py_END_ALLOW_THREADS
#undef HEAD
#undef TAIL
    if (status != BCN_OK) return raise_status(status, message);
    Py_RETURN_NONE;
}

/* check_backward_finish(<norm_backward's 11 arguments, sums None>): every check norm_backward makes of its
 * arguments (take_backward), without running it: as check_finish, for the backward's exchange. */
static PyObject *check_backward_finish(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    BackwardCall k;
    if (check_nargs(nargs, 11, "check_backward_finish") < 0 ||
        take_backward(args, nargs, "check_backward_finish", &k) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* norm_backward_sums(flags, groups, x, dy, sums or None, context): backward phase (a); returns whether the
 * backward needs the batch's gradient sums (and so filled `sums`). */
static PyObject *norm_backward_sums(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 6, "norm_backward_sums") < 0) return NULL;
    uint32_t flags;
    int64_t groups, b, c, s, ctx_len;
    npy_intp g;
    int typenum;
    void *x, *dy, *sums, *ctx;
    if (parse_flags(args[0], BCN_FLAGS_ALL, &flags) < 0 || parse_groups(args[1], flags, &groups, &g) < 0 ||
        take_input(args[2], "x", flags, 0, &b, &c, &s, &typenum, &x) < 0 ||
        take_like(args[3], "dy", flags, typenum, (npy_intp)(b * c * s), 0, &dy) < 0 ||
        take_doubles(args[4], "sums", (npy_intp)(2 * c), 1, 1, &sums) < 0 ||
        take_context(args[5], 1, &ctx, &ctx_len) < 0)
        return NULL;
    char message[MESSAGE_CAPACITY];
    int32_t status, needs;
    Py_BEGIN_ALLOW_THREADS
    status = typenum == NPY_FLOAT32
                 ? bcn_norm_backward_sums_f32(flags, b, c, s, groups, x, dy, sums, ctx, ctx_len, message,
                                              MESSAGE_CAPACITY)
                 : bcn_norm_backward_sums_f64(flags, b, c, s, groups, x, dy, sums, ctx, ctx_len, message,
                                              MESSAGE_CAPACITY);
    needs = status == BCN_OK ? bcn_norm_needs_gradient_sums(flags, b, c, s, groups, ctx, ctx_len) : 0;
    Py_END_ALLOW_THREADS
    if (status != BCN_OK) return raise_status(status, message);
    return PyBool_FromLong(needs == 1);
}

/* ws_forward(flags, eps, w, w_hat) and ws_backward(flags, eps, w, grad_w_hat, grad_w); w is [O, ...]. */
static int ws_common(PyObject *const *args, uint32_t *flags, double *eps, int *typenum, int64_t *o, int64_t *fan) {
    if (parse_flags(args[0], BCN_WS_FLAGS_ALL, flags) < 0) return -1;
    *eps = PyFloat_AsDouble(args[1]);
    if (PyErr_Occurred()) return -1;
    if (!PyArray_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "w must be a numpy array");
        return -1;
    }
    PyArrayObject *w = (PyArrayObject *)args[2];
    *typenum = PyArray_TYPE(w);
    if (*typenum != NPY_FLOAT32 && *typenum != NPY_FLOAT64) {
        PyErr_SetString(PyExc_TypeError, "w must be float32 or float64");
        return -1;
    }
    if (PyArray_NDIM(w) < 2) {
        PyErr_Format(PyExc_ValueError, "weight must have rank >= 2 ([out_channels, ...]), got rank %d",
                     PyArray_NDIM(w));
        return -1;
    }
    *o = PyArray_DIM(w, 0);
    *fan = 1; /* product of the trailing dims; numpy bounds the total size */
    for (int i = 1; i < PyArray_NDIM(w); i++) *fan *= PyArray_DIM(w, i);
    return 0;
}

static PyObject *ws_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 4, "ws_forward") < 0) return NULL;
    uint32_t flags; double eps; int typenum; int64_t o, fan;
    if (ws_common(args, &flags, &eps, &typenum, &o, &fan) < 0) return NULL;
    npy_intp n = PyArray_SIZE((PyArrayObject *)args[2]);
    void *w, *wh;
    if (take(args[2], "w", typenum, 0, n, 0, 0, &w) < 0 || take(args[3], "w_hat", typenum, 1, n, 0, 0, &wh) < 0)
        return NULL;
    char message[MESSAGE_CAPACITY];
    int32_t status;
    Py_BEGIN_ALLOW_THREADS
    status = typenum == NPY_FLOAT32
                 ? bcn_ws_forward_f32(flags, o, fan, eps, w, wh, message, MESSAGE_CAPACITY)
                 : bcn_ws_forward_f64(flags, o, fan, eps, w, wh, message, MESSAGE_CAPACITY);
    Py_END_ALLOW_THREADS
    if (status != BCN_OK) return raise_status(status, message);
    Py_RETURN_NONE;
}

static PyObject *ws_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 5, "ws_backward") < 0) return NULL;
    uint32_t flags; double eps; int typenum; int64_t o, fan;
    if (ws_common(args, &flags, &eps, &typenum, &o, &fan) < 0) return NULL;
    npy_intp n = PyArray_SIZE((PyArrayObject *)args[2]);
    void *w, *gwh, *gw;
    if (take(args[2], "w", typenum, 0, n, 0, 0, &w) < 0 || take(args[3], "grad_w_hat", typenum, 0, n, 0, 0, &gwh) < 0 ||
        take(args[4], "grad_w", typenum, 1, n, 0, 0, &gw) < 0)
        return NULL;
    char message[MESSAGE_CAPACITY];
    int32_t status;
    Py_BEGIN_ALLOW_THREADS
    status = typenum == NPY_FLOAT32
                 ? bcn_ws_backward_f32(flags, o, fan, eps, w, gwh, gw, message, MESSAGE_CAPACITY)
                 : bcn_ws_backward_f64(flags, o, fan, eps, w, gwh, gw, message, MESSAGE_CAPACITY);
    Py_END_ALLOW_THREADS
    if (status != BCN_OK) return raise_status(status, message);
    Py_RETURN_NONE;
}

static PyObject *context_length(PyObject *self, PyObject *args) {
    long long b, c, g;
    if (!PyArg_ParseTuple(args, "LLL", &b, &c, &g)) return NULL;
    return PyLong_FromLongLong(bcn_context_length(b, c, g));
}

/* memory_facts(a): an ndarray's memory flags as the bits MEMORY_C_ORDER, MEMORY_ALIGNED, MEMORY_WRITEABLE and
 * MEMORY_OWNDATA, in one call. The layers check them on every call, and numpy's `a.flags` builds a new object
 * on each read (about 900 instructions, as much as a tiny kernel's setup). */
enum { MEMORY_C_ORDER = 1, MEMORY_ALIGNED = 2, MEMORY_WRITEABLE = 4, MEMORY_OWNDATA = 8 };

static PyObject *memory_facts(PyObject *self, PyObject *arg) {
    if (!PyArray_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "memory_facts takes a numpy array, got %s", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)arg;
    long bits = (PyArray_IS_C_CONTIGUOUS(a) ? MEMORY_C_ORDER : 0) | (PyArray_ISALIGNED(a) ? MEMORY_ALIGNED : 0) |
                (PyArray_ISWRITEABLE(a) ? MEMORY_WRITEABLE : 0) |
                (PyArray_CHKFLAGS(a, NPY_ARRAY_OWNDATA) ? MEMORY_OWNDATA : 0);
    return PyLong_FromLong(bits);
}

/* fresh_output(out, like, allow): True when `out` can take a result shaped, typed and laid out like `like` with
 * nothing left to check: an ndarray of like's dtype, shape and strides, aligned and writeable, owning its memory
 * as `like` does (two arrays that each allocated their own memory cannot overlap), not `like` itself; `allow`
 * (a backward's dy, or None) is None, `out` itself, or an array that owns other memory. False sends the caller
 * to its full checks, which word the error if there is one. One C call, where those checks cost a tiny call
 * half a microsecond (numpy's may_share_memory alone 0.2). */
static int owns(PyObject *obj) {
    return PyArray_Check(obj) && PyArray_CHKFLAGS((PyArrayObject *)obj, NPY_ARRAY_OWNDATA);
}

static PyObject *fresh_output(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "fresh_output takes 3 arguments (out, like, allow), got %zd", nargs);
        return NULL;
    }
    PyObject *o = args[0], *l = args[1], *allow = args[2];
    if (o == l || !owns(o) || !owns(l) || !(allow == Py_None || allow == o || owns(allow))) Py_RETURN_FALSE;
    PyArrayObject *out = (PyArrayObject *)o, *like = (PyArrayObject *)l;
    if (!PyArray_CHKFLAGS(out, NPY_ARRAY_ALIGNED | NPY_ARRAY_WRITEABLE)) Py_RETURN_FALSE;
    if (PyArray_DESCR(out) != PyArray_DESCR(like) && !PyArray_EquivTypes(PyArray_DESCR(out), PyArray_DESCR(like)))
        Py_RETURN_FALSE;
    int nd = PyArray_NDIM(out);
    if (nd != PyArray_NDIM(like)) Py_RETURN_FALSE;
    for (int i = 0; i < nd; i++)
        if (PyArray_DIM(out, i) != PyArray_DIM(like, i) || PyArray_STRIDE(out, i) != PyArray_STRIDE(like, i))
            Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

/* A thread count in [0, 4096] (0 means `zero`), or -1 with an exception set. */
static long thread_count(PyObject *arg, const char *zero) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return -1;
    if (n < 0 || n > 4096) {
        PyErr_Format(PyExc_ValueError, "number of threads must be in [0, 4096] (0: %s), got %ld", zero, n);
        return -1;
    }
    return n;
}

static PyObject *set_num_threads(PyObject *self, PyObject *arg) {
    long n = thread_count(arg, "default");
    return n < 0 ? NULL : PyLong_FromLong(bcn_set_num_threads((int32_t)n));
}

static PyObject *get_num_threads(PyObject *self, PyObject *unused) {
    return PyLong_FromLong(bcn_get_num_threads());
}

/* The calling thread's own count (0: none); returns the setting it replaced. */
static PyObject *set_calling_thread_num_threads(PyObject *self, PyObject *arg) {
    long n = thread_count(arg, "none");
    return n < 0 ? NULL : PyLong_FromLong(bcn_set_calling_thread_num_threads((int32_t)n));
}

/* The calling thread's team (bcn_set_calling_thread_team) from an address (0: none), e.g. an OpenMP runtime's
 * GOMP_parallel found with ctypes; returns the address it replaced. The address must be such a function: this
 * is for bcnswift.torch, which takes it from the runtime PyTorch has loaded. */
static PyObject *set_calling_thread_team(PyObject *self, PyObject *arg) {
    if (!PyLong_CheckExact(arg)) {  /* not bool, not float: an address */
        PyErr_Format(PyExc_TypeError, "a team is a function's address (int; 0: none), got %.80s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    unsigned long long value = PyLong_AsUnsignedLongLong(arg);
    if ((value == (unsigned long long)-1 && PyErr_Occurred()) || value > UINTPTR_MAX) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "a team's address must be an int in [0, UINTPTR_MAX]");
        return NULL;
    }
    bcn_thread_team previous = bcn_set_calling_thread_team((bcn_thread_team)(uintptr_t)value);
    return PyLong_FromVoidPtr((void *)previous);
}

/* The C ABI as a table (_c_api.h) for native code in this process, exported as the capsule `_C_API`. */
_Static_assert(BCN_C_API_ABI_VERSION == BCN_ABI_VERSION, "_c_api.h describes another ABI than bcnswift.h");
static const bcn_c_api c_api = {
    sizeof(bcn_c_api), BCN_ABI_VERSION, BCN_BATCH_NORM, BCN_ESTIMATED, BCN_CUMULATIVE_AVERAGE, BCN_CHANNEL_NORM,
    BCN_TRAINING, BCN_CHANNELS_LAST, BCN_OK, BCN_ERR_NO_FORWARD, bcn_get_num_threads,
    bcn_set_calling_thread_num_threads, bcn_set_calling_thread_team,
    bcn_context_length, bcn_norm_forward_f32, bcn_norm_forward_f64, bcn_norm_moments_f32, bcn_norm_moments_f64,
    bcn_norm_finish_f32, bcn_norm_finish_f64, bcn_running_update_f32, bcn_running_update_f64,
    bcn_norm_backward_f32, bcn_norm_backward_f64, bcn_ws_forward_f32, bcn_ws_forward_f64, bcn_ws_backward_f32,
    bcn_ws_backward_f64, BCN_FLAGS_ALL, BCN_WS_FLAGS_ALL, BCN_ERR_OUT_OF_MEMORY};

#define FASTCALL(f) (PyCFunction)(void (*)(void))(f), METH_FASTCALL
static PyMethodDef methods[] = {
    {"norm_forward", FASTCALL(norm_forward), "fused normalization forward (or its phase (c))"},
    {"norm_moments", FASTCALL(norm_moments), "forward phase (a): plane moments and the batch's moments"},
    {"check_finish", FASTCALL(check_finish), "the checks of norm_forward's phase (c), without running it"},
    {"check_backward_finish", FASTCALL(check_backward_finish),
     "the checks of norm_backward's phase (c), without running it"},
    {"running_update", FASTCALL(running_update), "the running buffers' update alone, from the batch's moments"},
    {"merge", FASTCALL(merge), "phase (b): merge moment sets (width 3) or gradient sums (width 2)"},
    {"norm_backward", FASTCALL(norm_backward), "fused normalization backward (or its phase (c))"},
    {"norm_backward_sums", FASTCALL(norm_backward_sums), "backward phase (a): plane and per-channel sums"},
    {"ws_forward", FASTCALL(ws_forward), "weight standardization forward"},
    {"ws_backward", FASTCALL(ws_backward), "weight standardization backward"},
    {"context_length", context_length, METH_VARARGS, "doubles a forward context needs"},
    {"fresh_output", FASTCALL(fresh_output), "whether out takes a result like `like` with nothing left to check"},
    {"memory_facts", memory_facts, METH_O, "an array's memory flags as bits (MEMORY_C_ORDER, MEMORY_ALIGNED, ...)"},
    {"set_num_threads", set_num_threads, METH_O, "set worker threads (0: default)"},
    {"get_num_threads", get_num_threads, METH_NOARGS, "worker threads in force for the calling thread"},
    {"set_calling_thread_num_threads", set_calling_thread_num_threads, METH_O,
     "set the calling thread's own worker threads (0: none); returns the previous setting"},
    {"set_calling_thread_team", set_calling_thread_team, METH_O,
     "set the calling thread's team (a GOMP_parallel address, 0: none); returns the previous one"},
    {NULL, NULL, 0, NULL}};

/* One kernel build per ISA path: setup.py compiles this file once per path, as bcnswift._ext_<path>, with the
 * path's name and the Swift compiler's version; bcnswift/_ext.py loads the one the CPU runs. */
#ifndef BCN_MODULE
#define BCN_MODULE _ext
#endif
#ifndef BCN_ISA
#define BCN_ISA "unknown"
#endif
#ifndef BCN_SWIFT_VERSION
#define BCN_SWIFT_VERSION "unknown"
#endif
#define BCN_STR(x) #x
#define BCN_XSTR(x) BCN_STR(x)
#define BCN_CAT(a, b) a##b
#define BCN_INIT(name) BCN_CAT(PyInit_, name)

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "bcnswift." BCN_XSTR(BCN_MODULE),
                                    "C extension over the bcnswift C ABI", -1, methods};

PyMODINIT_FUNC BCN_INIT(BCN_MODULE)(void) {
    import_array();
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddStringConstant(m, "ISA", BCN_ISA) < 0 ||
        PyModule_AddStringConstant(m, "SWIFT_VERSION", BCN_SWIFT_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "ABI_VERSION", bcn_abi_version());
    if (bcn_abi_version() != BCN_ABI_VERSION) {
        PyErr_Format(PyExc_ImportError, "bcnswift: the extension was built for ABI %d but links ABI %d",
                     BCN_ABI_VERSION, bcn_abi_version());
        Py_DECREF(m);
        return NULL;
    }
#define FLAG(name) PyModule_AddIntConstant(m, #name, name)
    FLAG(BCN_BATCH_NORM); FLAG(BCN_ESTIMATED); FLAG(BCN_UNBIASED_RUNNING_VAR);
    FLAG(BCN_VARIANCE_AROUND_RUNNING_MEAN); FLAG(BCN_CUMULATIVE_AVERAGE); FLAG(BCN_CHANNEL_NORM);
    FLAG(BCN_NAN_RAISE); FLAG(BCN_TRAINING); FLAG(BCN_CHANNELS_LAST); FLAG(BCN_WS_UNBIASED);
    FLAG(BCN_WS_EPS_IN_SQRT); FLAG(BCN_FLAGS_ALL); FLAG(BCN_WS_FLAGS_ALL);
    FLAG(MEMORY_C_ORDER); FLAG(MEMORY_ALIGNED); FLAG(MEMORY_WRITEABLE); FLAG(MEMORY_OWNDATA);
#undef FLAG
    /* const by contract: readers only call through the table */
    PyObject *capsule = PyCapsule_New((void *)&c_api, BCN_C_API_CAPSULE, NULL);
    if (!capsule || PyModule_AddObject(m, "_C_API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
