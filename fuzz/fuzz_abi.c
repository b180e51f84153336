/*
 * libFuzzer target for the bcnswift C ABI (see run.sh). Bytes become flags (memory format included), sizes,
 * scalars, null choices, context lengths, element values, and a path through the calls: the single forward and
 * backward, or the statistics phases (moments, merge of several sets, finish; backward sums, merge, finish),
 * with moment and sum sets that are sometimes not moments at all, and the running update alone. Sizes reach every
 * layout: rows (S < 16), planes (S up to 64) and channels-last; tall inputs (up to 4096 samples of 1 or 2
 * channels, S < 16) reach the rows layout's paths that need many samples (moments by columns from 8, the short
 * planes' backward from 16) and the scratch sized by the batch. Messages go to buffers of any capacity or to NULL
 * and must end inside the capacity; the forward and backward sometimes run in place (y = x, dx = dy), which the
 * header allows where no later call reads the input. Calls that succeed must keep the header's promises: the
 * forwards and backwards only read x (and dy, where dx is not dy), a single backward only reads its context,
 * and backward phase (a) leaves `sums` alone after a forward without batch statistics. A context a forward of
 * one element type filled is refused by the other's backward. Messages never pass their capacity (a negative
 * one writes nothing). Weight Standardization runs both ways in both types; num_batches_tracked starts anywhere
 * (negative, at the edges of int64); the calls sometimes run on another thread count or on a serial team of the
 * caller's (bcn_set_calling_thread_num_threads, bcn_set_calling_thread_team).
 *
 * Buffers always hold what the declared sizes promise (the one contract a C ABI cannot check); everything else
 * is hostile. The library must return a status, never crash, never touch memory out of bounds
 * (AddressSanitizer), and when it refuses a call, leave every buffer it was given exactly as it was: outputs,
 * running buffers, gradients, moments, sums and the context.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef FUZZ_DEBUG
#include <stdio.h>
#endif
#include "bcnswift.h"

typedef struct { const uint8_t *p; size_t n; } Stream;

static uint8_t u8(Stream *s) {
    if (!s->n) return 0;
    s->n--;
    return *s->p++;
}

/* A size: usually small and valid (1..limit), sometimes hostile. */
static int64_t size_value(Stream *s, int64_t limit) {
    static const int64_t special[] = {0, -1, INT64_MIN, INT64_MAX, (int64_t)1 << 40, (int64_t)1 << 62};
    uint8_t b = u8(s);
    if (b < 240) return b % limit + 1;
    return special[b % 6];
}

static double scalar(Stream *s) {
    static const double table[] = {1e-5, 0.1, 0.0, -1.0, 1.0, 0.5, NAN, INFINITY, -0.0, 1e300, 2.0, 1e-300};
    return table[u8(s) % 12];
}

static void abort_if(int cond) {
    if (cond) abort();
}

/* A buffer and a copy of it, to prove a refused call left it alone. */
typedef struct { unsigned char *p, *copy; size_t bytes; } Watched;

static Watched watch(size_t bytes) {
    Watched w = {calloc(bytes + 1, 1), malloc(bytes + 1), bytes};
    return w;
}
static void snap(Watched *w) { memcpy(w->copy, w->p, w->bytes); }
static int same(const Watched *w) { return memcmp(w->copy, w->p, w->bytes) == 0; }
static void drop(Watched *w) { free(w->p); free(w->copy); }

typedef struct {
    uint32_t flags; int64_t b, c, sp, g; double eps, bn_eps, momentum; int dbl; size_t esz, n, nc, ng;
    Watched x, y, dy, dx, w, bb, rm, rv, gw, gb, g1, g2, g3, g4, ctx, moments, sums;
    int64_t nbt, ctx_len; uint8_t nulls;
} Call;

#define P(call, ptr, bit) (((call)->nulls >> (bit)) & 1 ? NULL : (void *)(ptr).p)

static void snap_all(Call *k) {
    Watched *all[] = {&k->y, &k->dx, &k->rm, &k->rv, &k->g1, &k->g2, &k->g3, &k->g4, &k->ctx, &k->moments, &k->sums};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) snap(all[i]);
}

/* After a refused call: nothing the caller owns changed. */
static void check_untouched(Call *k, int64_t nbt_before) {
    Watched *all[] = {&k->y, &k->dx, &k->rm, &k->rv, &k->g1, &k->g2, &k->g3, &k->g4, &k->ctx, &k->moments, &k->sums};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) {
#ifdef FUZZ_DEBUG
        if (!same(all[i])) fprintf(stderr, "buffer %zu changed\n", i);
#endif
        abort_if(!same(all[i]));
    }
    abort_if(k->nbt != nbt_before);
}

static int32_t forward(Call *k, int finish, const double *moments, char *msg, int64_t cap) {
    if (k->dbl)
        return finish ? bcn_norm_finish_f64(k->flags, k->b, k->c, k->sp, k->g, k->eps, k->bn_eps, k->momentum,
                                            P(k, k->x, 0), P(k, k->y, 1), P(k, k->w, 2), (double *)k->bb.p,
                                            P(k, k->rm, 3), (double *)k->rv.p, &k->nbt, P(k, k->gw, 4),
                                            (double *)k->gb.p, moments, P(k, k->ctx, 5), k->ctx_len, msg, cap)
                      : bcn_norm_forward_f64(k->flags, k->b, k->c, k->sp, k->g, k->eps, k->bn_eps, k->momentum,
                                             P(k, k->x, 0), P(k, k->y, 1), P(k, k->w, 2), (double *)k->bb.p,
                                             P(k, k->rm, 3), (double *)k->rv.p, &k->nbt, P(k, k->gw, 4),
                                             (double *)k->gb.p, P(k, k->ctx, 5), k->ctx_len, msg, cap);
    return finish ? bcn_norm_finish_f32(k->flags, k->b, k->c, k->sp, k->g, k->eps, k->bn_eps, k->momentum,
                                        P(k, k->x, 0), P(k, k->y, 1), P(k, k->w, 2), (float *)k->bb.p, P(k, k->rm, 3),
                                        (float *)k->rv.p, &k->nbt, P(k, k->gw, 4), (float *)k->gb.p, moments,
                                        P(k, k->ctx, 5), k->ctx_len, msg, cap)
                  : bcn_norm_forward_f32(k->flags, k->b, k->c, k->sp, k->g, k->eps, k->bn_eps, k->momentum,
                                         P(k, k->x, 0), P(k, k->y, 1), P(k, k->w, 2), (float *)k->bb.p,
                                         P(k, k->rm, 3), (float *)k->rv.p, &k->nbt, P(k, k->gw, 4),
                                         (float *)k->gb.p, P(k, k->ctx, 5), k->ctx_len, msg, cap);
}

static int32_t moments_phase(Call *k, char *msg, int64_t cap) {
    return k->dbl ? bcn_norm_moments_f64(k->flags, k->b, k->c, k->sp, k->g, P(k, k->x, 0), P(k, k->moments, 6),
                                         P(k, k->ctx, 5), k->ctx_len, msg, cap)
                  : bcn_norm_moments_f32(k->flags, k->b, k->c, k->sp, k->g, P(k, k->x, 0), P(k, k->moments, 6),
                                         P(k, k->ctx, 5), k->ctx_len, msg, cap);
}

static int32_t backward(Call *k, uint32_t flags, int phase, const double *sums, char *msg, int64_t cap) {
    if (phase == 1)
        return k->dbl ? bcn_norm_backward_sums_f64(flags, k->b, k->c, k->sp, k->g, (double *)k->x.p, P(k, k->dy, 7),
                                                   P(k, k->sums, 6), P(k, k->ctx, 5), k->ctx_len, msg, cap)
                      : bcn_norm_backward_sums_f32(flags, k->b, k->c, k->sp, k->g, (float *)k->x.p, P(k, k->dy, 7),
                                                   P(k, k->sums, 6), P(k, k->ctx, 5), k->ctx_len, msg, cap);
    if (phase == 2)
        return k->dbl ? bcn_norm_backward_finish_f64(flags, k->b, k->c, k->sp, k->g, (double *)k->x.p, P(k, k->dy, 7),
                                                     P(k, k->dx, 1), (double *)k->g1.p, (double *)k->g2.p,
                                                     (double *)k->g3.p, (double *)k->g4.p, sums, P(k, k->ctx, 5),
                                                     k->ctx_len, msg, cap)
                      : bcn_norm_backward_finish_f32(flags, k->b, k->c, k->sp, k->g, (float *)k->x.p, P(k, k->dy, 7),
                                                     P(k, k->dx, 1), (float *)k->g1.p, (float *)k->g2.p,
                                                     (float *)k->g3.p, (float *)k->g4.p, sums, P(k, k->ctx, 5),
                                                     k->ctx_len, msg, cap);
    return k->dbl ? bcn_norm_backward_f64(flags, k->b, k->c, k->sp, k->g, (double *)k->x.p, P(k, k->dy, 7),
                                          P(k, k->dx, 1), (double *)k->g1.p, (double *)k->g2.p, (double *)k->g3.p,
                                          (double *)k->g4.p, P(k, k->ctx, 5), k->ctx_len, msg, cap)
                  : bcn_norm_backward_f32(flags, k->b, k->c, k->sp, k->g, (float *)k->x.p, P(k, k->dy, 7),
                                          P(k, k->dx, 1), (float *)k->g1.p, (float *)k->g2.p, (float *)k->g3.p,
                                          (float *)k->g4.p, P(k, k->ctx, 5), k->ctx_len, msg, cap);
}

/* `sets` copies of `set` (width·c doubles each), some perturbed into non-moments, merged; checks that a refused
 * merge wrote nothing. Returns the merged set (caller frees) or NULL. */
static double *merged_sets(Stream *s, const double *set, int64_t c, int width) {
    int64_t sets = u8(s) % 4;  /* 0 sets is refused */
    size_t len = (size_t)(width * c);
    double *all = malloc((size_t)(sets ? sets : 1) * len * sizeof(double) + 1);
    for (int64_t i = 0; i < sets; i++) memcpy(all + i * len, set, len * sizeof(double));
    if (sets && (u8(s) & 3) == 0) all[u8(s) % (sets * len)] = scalar(s); /* a count of -1, NaN, 0.5, ... */
    double *out = malloc(len * sizeof(double) + 1);
    for (size_t i = 0; i < len; i++) out[i] = 1234.5;
    char msg[64];
    int32_t st = width == 3 ? bcn_moments_merge(sets, c, all, out, msg, sizeof msg)
                            : bcn_sums_merge(sets, c, all, out, msg, sizeof msg);
    free(all);
    if (st != BCN_OK) {
        for (size_t i = 0; i < len; i++) abort_if(out[i] != 1234.5);
        free(out);
        return NULL;
    }
    return out;
}

/* A message buffer of `cap` bytes (or NULL: the status alone) must hold a terminated message after any call. */
static void check_message(const char *msg, int64_t cap) {
    if (msg && cap > 0) abort_if(memchr(msg, 0, (size_t)cap) == NULL);
}

/* The forward in place (y = x), which the header allows where no later call reads x: a refusal leaves x too. */
static void forward_in_place(Call *k, char *msg, int64_t cap) {
    Watched own_y = k->y;
    int64_t nbt = k->nbt;
    k->y = k->x;
    snap(&k->x);
    int32_t st = forward(k, 0, NULL, msg, cap);
    k->y = own_y;
    if (st != BCN_OK) { abort_if(!same(&k->x)); check_untouched(k, nbt); }
    check_message(msg, cap);
}

/* The statistics phases: moments, their merge over sets, sometimes the running update alone, then the finish. */
static int32_t forward_in_phases(Call *k, Stream *s, int sane, uint8_t path, char *msg, int64_t cap,
                                 int64_t *nbt_before) {
    int32_t st = moments_phase(k, msg, cap);
    check_message(msg, cap);
    if (st != BCN_OK) return st;
    abort_if(!sane);
    double *m = NULL;
    if (!((k->nulls >> 6) & 1)) m = merged_sets(s, (const double *)k->moments.p, k->c, 3);
    if ((path >> 2) & 1) { /* the running update alone first, as a process without a share would */
        snap_all(k);
        int64_t nbt = k->nbt;
        int32_t u = k->dbl ? bcn_running_update_f64(k->flags, k->c, k->momentum, m, P(k, k->rm, 3),
                                                    (double *)k->rv.p, &k->nbt, msg, cap)
                           : bcn_running_update_f32(k->flags, k->c, k->momentum, m, P(k, k->rm, 3),
                                                    (float *)k->rv.p, &k->nbt, msg, cap);
#ifdef FUZZ_DEBUG
        fprintf(stderr, "update: flags %x c %lld status %d: %s\n", k->flags, (long long)k->c, u, msg);
#endif
        if (u != BCN_OK) check_untouched(k, nbt);
        check_message(msg, cap);
    }
    snap_all(k);
    *nbt_before = k->nbt;
    st = forward(k, 1, (u8(s) & 7) ? m : NULL, msg, cap);
    check_message(msg, cap);
    free(m);
    return st;
}

/* The backward of a forward that succeeded: single, or phase (a), the sums' merge and phase (c). Beyond a
 * refusal changing nothing, the header's promises on success: both backwards only read x and dy (where dx is
 * not dy), the single one only reads its context, and phase (a) leaves `sums` untouched when the forward used no
 * batch statistics (bcn_norm_needs_gradient_sums, which must answer 0 or 1 for a context a forward filled). */
static void backward_after(Call *k, Stream *s, uint8_t path, uint8_t mode, char *msg, int64_t cap,
                           size_t ctx_doubles) {
    int damaged = u8(s) & 1; /* a context flipped by one bit: the library must notice or stay in bounds */
    if (damaged) k->ctx.p[u8(s) % (ctx_doubles * 8)] ^= (unsigned char)(1u << (u8(s) % 8));
    uint32_t bflags = k->flags & ~(uint32_t)(u8(s) & (BCN_BATCH_NORM | BCN_CHANNELS_LAST));
    snap_all(k);
    snap(&k->x);
    int32_t st;
    if ((path >> 1) % 2 == 0) {
        Watched own_dx = k->dx;
        int in_place = (mode & 0x40) != 0;
        if (in_place) k->dx = k->dy; /* dx = dy, in place */
        snap(&k->dy);
        st = backward(k, bflags, 0, NULL, msg, cap);
        check_message(msg, cap);
        k->dx = own_dx;
        if (st != BCN_OK) { abort_if(!same(&k->dy)); check_untouched(k, k->nbt); }
        else { abort_if(!same(&k->ctx)); abort_if(!in_place && !same(&k->dy)); }
        abort_if(!same(&k->x));
        return;
    }
    snap(&k->dy);
    st = backward(k, bflags, 1, NULL, msg, cap);
    check_message(msg, cap);
    abort_if(!same(&k->x) || !same(&k->dy));
    if (st != BCN_OK) { check_untouched(k, k->nbt); return; }
    int32_t needs = bcn_norm_needs_gradient_sums(bflags, k->b, k->c, k->sp, k->g, (const double *)k->ctx.p,
                                                 k->ctx_len);
    abort_if(!damaged && needs != 0 && needs != 1);
    if (needs == 0) abort_if(!same(&k->sums)); /* no batch statistics: phase (a) wrote no sums */
    double *sm = (k->nulls >> 6) & 1 ? NULL : merged_sets(s, (const double *)k->sums.p, k->c, 2);
    snap_all(k);
    st = backward(k, bflags, 2, (u8(s) & 7) ? sm : NULL, msg, cap);
    check_message(msg, cap);
    if (st != BCN_OK) check_untouched(k, k->nbt);
    abort_if(!same(&k->x) || !same(&k->dy));
    free(sm);
}

/* Weight Standardization on the same buffers, viewed as [b, c*sp], forward or backward: a refused call writes
 * nothing. */
static void weight_standardization(Call *k, Stream *s, char *msg, int64_t cap) {
    uint8_t how = u8(s);
    uint32_t wflags = how % 5;
    int64_t fan_in = (u8(s) & 15) == 0 ? -k->c * k->sp : k->c * k->sp;
    snap_all(k);
    int32_t st;
    if (how & 0x80)
        st = k->dbl ? bcn_ws_backward_f64(wflags, k->b, fan_in, k->eps, (double *)k->x.p, (double *)k->dy.p,
                                          (double *)k->dx.p, msg, cap)
                    : bcn_ws_backward_f32(wflags, k->b, fan_in, k->eps, (float *)k->x.p, (float *)k->dy.p,
                                          (float *)k->dx.p, msg, cap);
    else
        st = k->dbl ? bcn_ws_forward_f64(wflags, k->b, fan_in, k->eps, (double *)k->x.p, (double *)k->y.p, msg, cap)
                    : bcn_ws_forward_f32(wflags, k->b, fan_in, k->eps, (float *)k->x.p, (float *)k->y.p, msg, cap);
    if (st != BCN_OK) check_untouched(k, k->nbt);
    check_message(msg, cap);
}

/* The single backward of the other element type on a context a forward filled: refused, writing nothing (every
 * buffer holds 8 bytes an element, so either type's view of it is in bounds). */
static void backward_of_the_other_type(Call *k, char *msg, int64_t cap) {
    snap_all(k);
    snap(&k->dy);
    k->dbl = !k->dbl;
    int32_t st = backward(k, k->flags, 0, NULL, msg, cap);
    k->dbl = !k->dbl;
    abort_if(st != (P(k, k->dy, 7) && P(k, k->dx, 1) ? BCN_ERR_NO_FORWARD : BCN_ERR_INVALID_ARGUMENT));
    check_untouched(k, k->nbt);
    abort_if(!same(&k->dy));
    check_message(msg, cap);
}

/* A serial team: fn once, on the calling thread (GOMP_parallel's contract allows up to num_threads). */
static void serial_team(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags) {
    (void)num_threads; (void)flags;
    fn(data);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Stream s = {data, size};
    Call k;
    memset(&k, 0, sizeof k);
    k.flags = u8(&s) | ((uint32_t)(u8(&s) & 1) << 8); /* the normalization bits and BCN_CHANNELS_LAST */
    if (u8(&s) > 250) k.flags |= 1u << (9 + u8(&s) % 23); /* sometimes an unknown bit */
    int tall = (u8(&s) & 7) == 0;
    if (tall) {
        k.b = ((int64_t)u8(&s) << 8 | u8(&s)) % 4096 + 1; k.c = u8(&s) % 2 + 1; k.sp = u8(&s) % 15 + 1;
        k.g = size_value(&s, 2);
    } else {
        k.b = size_value(&s, 6); k.c = size_value(&s, 8); k.sp = size_value(&s, 64); k.g = size_value(&s, 8);
    }
    k.eps = scalar(&s); k.bn_eps = scalar(&s); k.momentum = scalar(&s);
    k.nulls = u8(&s) & u8(&s); /* each pointer null with probability 1/4 */
    uint8_t ctx_mode = u8(&s), path = u8(&s);
    k.dbl = u8(&s) & 1;

    /* Buffers follow the declared sizes when those are small; otherwise the library must refuse the sizes
     * before touching anything, so small placeholder buffers must suffice. */
    int sane = k.b > 0 && k.c > 0 && k.sp > 0 && (tall || (k.b <= 6 && k.c <= 8 && k.sp <= 64));
    if (!sane && k.b > 0 && k.c > 0 && k.sp > 0) {
        /* sizes that are positive but beyond the buffers: only products that must be refused are allowed */
        if (!(k.b >= ((int64_t)1 << 40) && k.c >= ((int64_t)1 << 40) && k.sp >= ((int64_t)1 << 40))) return 0;
    }
    k.esz = k.dbl ? sizeof(double) : sizeof(float);
    static const int64_t counts[] = {0, 0, 0, 3, -1, INT64_MAX - 1, INT64_MAX, INT64_MIN};
    k.nbt = counts[u8(&s) % 8];
    k.n = sane ? (size_t)(k.b * k.c * k.sp) : 4;
    k.nc = sane ? (size_t)k.c : 4;
    k.ng = (k.g > 0 && k.g <= 8) ? (size_t)k.g : 4;
    if (k.c > 0 && k.c <= 8 && (size_t)k.c > k.nc) k.nc = (size_t)k.c;
    const size_t e = sizeof(double); /* 8 bytes an element whatever the type: the other type's view fits too */
    k.x = watch(k.n * e); k.y = watch(k.n * e); k.dy = watch(k.n * e); k.dx = watch(k.n * e);
    k.w = watch(k.nc * e); k.bb = watch(k.nc * e); k.rm = watch(k.nc * e); k.rv = watch(k.nc * e);
    k.gw = watch(k.ng * e); k.gb = watch(k.ng * e); k.g1 = watch(k.nc * e); k.g2 = watch(k.nc * e);
    k.g3 = watch(k.ng * e); k.g4 = watch(k.ng * e);
    k.moments = watch(3 * k.nc * sizeof(double)); k.sums = watch(2 * k.nc * sizeof(double));
    for (size_t i = 0; i < k.n; i++) {
        double v = (double)(int8_t)u8(&s) * 0.37 + (u8(&s) == 255 ? NAN : 0.0);
        if (k.dbl) { ((double *)k.x.p)[i] = v; ((double *)k.dy.p)[i] = 1 - v; }
        else { ((float *)k.x.p)[i] = (float)v; ((float *)k.dy.p)[i] = (float)(1 - v); }
    }
    for (size_t i = 0; i < k.nc; i++) {
        if (k.dbl) { ((double *)k.w.p)[i] = 1; ((double *)k.rv.p)[i] = 1; }
        else { ((float *)k.w.p)[i] = 1; ((float *)k.rv.p)[i] = 1; }
    }
    int64_t need = bcn_context_length(k.b, k.c, (k.flags & BCN_CHANNEL_NORM) ? k.g : 0);
    size_t ctx_doubles = need > 0 && need < 100000 ? (size_t)need : 64;
    k.ctx_len = (int64_t)ctx_doubles;
    if (ctx_mode % 4 == 1) k.ctx_len -= 1; /* one short */
    if (ctx_mode % 4 == 2) k.ctx_len = -k.ctx_len;
    k.ctx = watch(ctx_doubles * sizeof(double));
    char text[64];
    memset(text, 0x7f, sizeof text);
    uint8_t mode = u8(&s);
    char *msg = (mode & 7) == 0 ? NULL : text; /* a NULL message: the status alone */
    uint8_t c8 = u8(&s);
    int64_t cap = c8 < 240 ? c8 % 65 : (c8 & 1 ? -(int64_t)(c8 % 7) : INT64_MIN); /* <= 0: nothing written */
    uint8_t threads = u8(&s);
    int32_t own_count = 0;
    bcn_thread_team own_team = NULL;
    if (threads % 4 == 1) {
        static const int32_t hostile[] = {1, 2, 3, 300, 0, -5, INT32_MAX, INT32_MIN};
        own_count = bcn_set_calling_thread_num_threads(hostile[(threads >> 2) % 8]);
    }
    if (threads % 4 == 2) own_team = bcn_set_calling_thread_team(serial_team);

    snap_all(&k);
    if (sane && (mode & 0x38) == 0) {
        forward_in_place(&k, msg, cap); /* then no backward may follow */
    } else {
        int64_t nbt_before = k.nbt; /* the count before the call that may fail (the update alone moves it) */
        snap(&k.x);
        int32_t st = path % 2 == 0 ? forward(&k, 0, NULL, msg, cap) /* the single forward */
                                   : forward_in_phases(&k, &s, sane, path, msg, cap, &nbt_before);
        if (path % 2 == 0) check_message(msg, cap);
        abort_if(!same(&k.x)); /* a forward only reads x */
        if (st != BCN_OK) check_untouched(&k, nbt_before);
        else {
            abort_if(!sane);
            if ((u8(&s) & 15) == 0) backward_of_the_other_type(&k, msg, cap);
            else backward_after(&k, &s, path, mode, msg, cap, ctx_doubles);
        }
    }
    if (sane) weight_standardization(&k, &s, msg, cap);
    for (int64_t i = cap > 0 ? cap : 0; i < (int64_t)sizeof text; i++) abort_if(text[i] != 0x7f); /* capacity kept */
    if (threads % 4 == 1) bcn_set_calling_thread_num_threads(own_count);
    if (threads % 4 == 2) bcn_set_calling_thread_team(own_team);
    Watched *all[] = {&k.x, &k.y, &k.dy, &k.dx, &k.w, &k.bb, &k.rm, &k.rv, &k.gw, &k.gb, &k.g1, &k.g2, &k.g3, &k.g4,
                      &k.ctx, &k.moments, &k.sums};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) drop(all[i]);
    return 0;
}
