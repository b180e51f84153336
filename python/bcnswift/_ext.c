/*
 * bcnswift._ext: the CPython extension over numpy that wraps the C ABI (bcnswift.h).
 *
 * It checks what it alone can know: that each argument is an ndarray of the right dtype, C-contiguous, aligned,
 * writeable where written, and as large as the shape says, so the ABI never touches memory out of bounds. The
 * Python layer (layers.py) owns the arrays and makes them contiguous; semantics (shapes vs. the layer, modes) are
 * its business and the ABI's. The GIL is released around every compute call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include "bcnswift.h"

#define MESSAGE_CAPACITY 512

static PyObject *raise_status(int32_t status, const char *message) {
    PyObject *type = PyExc_ValueError;
    if (status == BCN_ERR_NONFINITE) type = PyExc_FloatingPointError;
    else if (status == BCN_ERR_NO_FORWARD) type = PyExc_RuntimeError;
    PyErr_SetString(type, message[0] ? message : "bcnswift: unknown error");
    return NULL;
}

/* The array behind `obj`, checked: dtype `typenum`, C-contiguous, aligned, writeable if asked, `size` elements
 * (or any size when size < 0). None gives NULL data when allowed. Returns 0 on success. */
static int take(PyObject *obj, const char *name, int typenum, int writeable, npy_intp size, int allow_none,
                void **data) {
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
                     typenum == NPY_FLOAT32 ? "float32" : typenum == NPY_FLOAT64 ? "float64" : "int64");
        return -1;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous and aligned", name);
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

/* B, C, S of an input array of rank >= 2; sizes are positive only when the array is non-empty. */
static int shape_of(PyObject *obj, const char *name, int64_t *b, int64_t *c, int64_t *s) {
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
    npy_intp *d = PyArray_DIMS(a);
    *b = d[0];
    *c = d[1];
    *s = 1;
    for (int i = 2; i < nd; i++) *s *= d[i]; /* numpy already bounds the total size */
    return 0;
}

static int parse_flags(PyObject *obj, uint32_t *flags) {
    unsigned long v = PyLong_AsUnsignedLong(obj);
    if (v == (unsigned long)-1 && PyErr_Occurred()) return -1;
    *flags = (uint32_t)v;
    return 0;
}

/* norm_forward(flags, groups, eps, bn_eps, momentum, x, y, bn_weight, bn_bias, running_mean, running_var,
 *              num_batches_tracked, cn_weight, cn_bias, context) */
static PyObject *norm_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 15) {
        PyErr_SetString(PyExc_TypeError, "norm_forward takes 15 arguments");
        return NULL;
    }
    uint32_t flags;
    if (parse_flags(args[0], &flags) < 0) return NULL;
    int64_t groups = PyLong_AsLongLong(args[1]);
    double eps = PyFloat_AsDouble(args[2]), bn_eps = PyFloat_AsDouble(args[3]), momentum = PyFloat_AsDouble(args[4]);
    if (PyErr_Occurred()) return NULL;
    int64_t b, c, s;
    if (shape_of(args[5], "x", &b, &c, &s) < 0) return NULL;
    int typenum = PyArray_TYPE((PyArrayObject *)args[5]);
    if (typenum != NPY_FLOAT32 && typenum != NPY_FLOAT64) {
        PyErr_SetString(PyExc_TypeError, "x must be float32 or float64");
        return NULL;
    }
    int has_bn = (flags & BCN_BATCH_NORM) != 0, has_cn = (flags & BCN_CHANNEL_NORM) != 0;
    npy_intp n = (npy_intp)(b * c * s), g = has_cn ? (npy_intp)groups : 0;
    if (has_cn && groups <= 0) {
        PyErr_Format(PyExc_ValueError, "num_groups must be positive, got %lld", (long long)groups);
        return NULL;
    }
    void *x, *y, *bw, *bb, *rm, *rv, *nbt, *cw, *cb, *ctx;
    if (take(args[5], "x", typenum, 0, n, 0, &x) < 0 || take(args[6], "y", typenum, 1, n, 0, &y) < 0 ||
        take(args[7], "bn_weight", typenum, 0, c, !has_bn, &bw) < 0 ||
        take(args[8], "bn_bias", typenum, 0, c, !has_bn, &bb) < 0 ||
        take(args[9], "running_mean", typenum, 1, c, !has_bn, &rm) < 0 ||
        take(args[10], "running_var", typenum, 1, c, !has_bn, &rv) < 0 ||
        take(args[11], "num_batches_tracked", NPY_INT64, 1, 1, !has_bn, &nbt) < 0 ||
        take(args[12], "cn_weight", typenum, 0, g, !has_cn, &cw) < 0 ||
        take(args[13], "cn_bias", typenum, 0, g, !has_cn, &cb) < 0 ||
        take(args[14], "context", NPY_FLOAT64, 1, -1, 0, &ctx) < 0)
        return NULL;
    int64_t ctx_len = (int64_t)PyArray_SIZE((PyArrayObject *)args[14]);
    char message[MESSAGE_CAPACITY];
    int32_t status;
    Py_BEGIN_ALLOW_THREADS
    if (typenum == NPY_FLOAT32)
        status = bcn_norm_forward_f32(flags, b, c, s, groups, eps, bn_eps, momentum, x, y, bw, bb, rm, rv, nbt, cw,
                                      cb, ctx, ctx_len, message, MESSAGE_CAPACITY);
    else
        status = bcn_norm_forward_f64(flags, b, c, s, groups, eps, bn_eps, momentum, x, y, bw, bb, rm, rv, nbt, cw,
                                      cb, ctx, ctx_len, message, MESSAGE_CAPACITY);
    Py_END_ALLOW_THREADS
    if (status != BCN_OK) return raise_status(status, message);
    Py_RETURN_NONE;
}

/* norm_backward(flags, groups, x, dy, dx, grad_bn_weight, grad_bn_bias, grad_cn_weight, grad_cn_bias, context) */
static PyObject *norm_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "norm_backward takes 10 arguments");
        return NULL;
    }
    uint32_t flags;
    if (parse_flags(args[0], &flags) < 0) return NULL;
    int64_t groups = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    int64_t b, c, s;
    if (shape_of(args[2], "x", &b, &c, &s) < 0) return NULL;
    int typenum = PyArray_TYPE((PyArrayObject *)args[2]);
    if (typenum != NPY_FLOAT32 && typenum != NPY_FLOAT64) {
        PyErr_SetString(PyExc_TypeError, "x must be float32 or float64");
        return NULL;
    }
    int has_cn = (flags & BCN_CHANNEL_NORM) != 0;
    if (has_cn && groups <= 0) {
        PyErr_Format(PyExc_ValueError, "num_groups must be positive, got %lld", (long long)groups);
        return NULL;
    }
    npy_intp n = (npy_intp)(b * c * s), g = has_cn ? (npy_intp)groups : 0;
    void *x, *dy, *dx, *gbw, *gbb, *gcw, *gcb, *ctx;
    if (take(args[2], "x", typenum, 0, n, 0, &x) < 0 || take(args[3], "dy", typenum, 0, n, 0, &dy) < 0 ||
        take(args[4], "dx", typenum, 1, n, 0, &dx) < 0 ||
        take(args[5], "grad_bn_weight", typenum, 1, c, 1, &gbw) < 0 ||
        take(args[6], "grad_bn_bias", typenum, 1, c, 1, &gbb) < 0 ||
        take(args[7], "grad_cn_weight", typenum, 1, g, 1, &gcw) < 0 ||
        take(args[8], "grad_cn_bias", typenum, 1, g, 1, &gcb) < 0 ||
        take(args[9], "context", NPY_FLOAT64, 0, -1, 0, &ctx) < 0)
        return NULL;
    int64_t ctx_len = (int64_t)PyArray_SIZE((PyArrayObject *)args[9]);
    char message[MESSAGE_CAPACITY];
    int32_t status;
    Py_BEGIN_ALLOW_THREADS
    if (typenum == NPY_FLOAT32)
        status = bcn_norm_backward_f32(flags, b, c, s, groups, x, dy, dx, gbw, gbb, gcw, gcb, ctx, ctx_len, message,
                                       MESSAGE_CAPACITY);
    else
        status = bcn_norm_backward_f64(flags, b, c, s, groups, x, dy, dx, gbw, gbb, gcw, gcb, ctx, ctx_len, message,
                                       MESSAGE_CAPACITY);
    Py_END_ALLOW_THREADS
    if (status != BCN_OK) return raise_status(status, message);
    Py_RETURN_NONE;
}

/* ws_forward(flags, eps, w, w_hat) and ws_backward(flags, eps, w, grad_w_hat, grad_w); w is [O, ...]. */
static int ws_common(PyObject *const *args, uint32_t *flags, double *eps, int *typenum, int64_t *o, int64_t *fan) {
    if (parse_flags(args[0], flags) < 0) return -1;
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
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "ws_forward takes 4 arguments");
        return NULL;
    }
    uint32_t flags; double eps; int typenum; int64_t o, fan;
    if (ws_common(args, &flags, &eps, &typenum, &o, &fan) < 0) return NULL;
    npy_intp n = PyArray_SIZE((PyArrayObject *)args[2]);
    void *w, *wh;
    if (take(args[2], "w", typenum, 0, n, 0, &w) < 0 || take(args[3], "w_hat", typenum, 1, n, 0, &wh) < 0)
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
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "ws_backward takes 5 arguments");
        return NULL;
    }
    uint32_t flags; double eps; int typenum; int64_t o, fan;
    if (ws_common(args, &flags, &eps, &typenum, &o, &fan) < 0) return NULL;
    npy_intp n = PyArray_SIZE((PyArrayObject *)args[2]);
    void *w, *gwh, *gw;
    if (take(args[2], "w", typenum, 0, n, 0, &w) < 0 || take(args[3], "grad_w_hat", typenum, 0, n, 0, &gwh) < 0 ||
        take(args[4], "grad_w", typenum, 1, n, 0, &gw) < 0)
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

static PyObject *set_num_threads(PyObject *self, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0 || n > 4096) {
        PyErr_Format(PyExc_ValueError, "number of threads must be in [0, 4096] (0: default), got %ld", n);
        return NULL;
    }
    return PyLong_FromLong(bcn_set_num_threads((int32_t)n));
}

static PyObject *get_num_threads(PyObject *self, PyObject *unused) {
    return PyLong_FromLong(bcn_get_num_threads());
}

static PyMethodDef methods[] = {
    {"norm_forward", (PyCFunction)(void (*)(void))norm_forward, METH_FASTCALL, "fused normalization forward"},
    {"norm_backward", (PyCFunction)(void (*)(void))norm_backward, METH_FASTCALL, "fused normalization backward"},
    {"ws_forward", (PyCFunction)(void (*)(void))ws_forward, METH_FASTCALL, "weight standardization forward"},
    {"ws_backward", (PyCFunction)(void (*)(void))ws_backward, METH_FASTCALL, "weight standardization backward"},
    {"context_length", context_length, METH_VARARGS, "doubles a forward context needs"},
    {"set_num_threads", set_num_threads, METH_O, "set worker threads (0: default)"},
    {"get_num_threads", get_num_threads, METH_NOARGS, "worker threads in force"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "bcnswift._ext",
                                    "C extension over the bcnswift C ABI", -1, methods};

PyMODINIT_FUNC PyInit__ext(void) {
    import_array();
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyModule_AddIntConstant(m, "ABI_VERSION", bcn_abi_version());
#define FLAG(name) PyModule_AddIntConstant(m, #name, name)
    FLAG(BCN_BATCH_NORM); FLAG(BCN_ESTIMATED); FLAG(BCN_UNBIASED_RUNNING_VAR);
    FLAG(BCN_VARIANCE_AROUND_RUNNING_MEAN); FLAG(BCN_CUMULATIVE_AVERAGE); FLAG(BCN_CHANNEL_NORM);
    FLAG(BCN_NAN_RAISE); FLAG(BCN_TRAINING); FLAG(BCN_WS_UNBIASED); FLAG(BCN_WS_EPS_IN_SQRT);
#undef FLAG
    return m;
}
