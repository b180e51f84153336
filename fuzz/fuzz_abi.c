/*
 * libFuzzer target for the bcnswift C ABI (see run.sh). Bytes become flags, sizes, scalars, null choices,
 * context lengths and element values. Buffers always hold what the declared sizes promise (the one contract a
 * C ABI cannot check); everything else is hostile. The library must return a status, never crash, never touch
 * memory out of bounds (AddressSanitizer), and leave outputs and buffers alone when it fails.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "bcnswift.h"

typedef struct { const uint8_t *p; size_t n; } Stream;

static uint8_t u8(Stream *s) {
    if (!s->n) return 0;
    s->n--;
    return *s->p++;
}

static int64_t size_value(Stream *s) {
    static const int64_t special[] = {0, -1, INT64_MIN, INT64_MAX, (int64_t)1 << 40, (int64_t)1 << 62};
    uint8_t b = u8(s);
    if (b < 240) return b % 9 + 1;                       /* small, valid */
    return special[b % 6];
}

static double scalar(Stream *s) {
    static const double table[] = {1e-5, 0.1, 0.0, -1.0, 1.0, 0.5, NAN, INFINITY, -0.0, 1e300, 2.0, 1e-300};
    return table[u8(s) % 12];
}

static void abort_if(int cond) {
    if (cond) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Stream s = {data, size};
    uint32_t flags = u8(&s);
    if (u8(&s) > 250) flags |= 1u << (8 + u8(&s) % 24); /* sometimes an unknown bit */
    int64_t b = size_value(&s), c = size_value(&s), sp = size_value(&s), g = size_value(&s);
    double eps = scalar(&s), bn_eps = scalar(&s), momentum = scalar(&s);
    uint8_t nulls = u8(&s), ctx_mode = u8(&s), dbl = u8(&s) & 1;

    /* Buffers follow the declared sizes when those are small; otherwise the library must refuse the sizes
     * before touching anything, so small placeholder buffers must suffice. */
    int sane = b > 0 && c > 0 && sp > 0 && b <= 9 && c <= 9 && sp <= 9;
    size_t n = sane ? (size_t)(b * c * sp) : 4, nc = sane ? (size_t)c : 4;
    size_t ng = (g > 0 && g <= 9) ? (size_t)g : 4;
    if (!sane && !(b <= 0 || c <= 0 || sp <= 0 || (b > 9 && c > 9 && sp > 9))) return 0; /* would be a caller bug */
    if (!sane && (b > 0 && c > 0 && sp > 0)) {
        /* all three huge: their product overflows or exceeds the limit, which must be refused */
        if (!((b >= ((int64_t)1 << 40)) && (c >= ((int64_t)1 << 40)) && (sp >= ((int64_t)1 << 40)))) return 0;
    }
    size_t esz = dbl ? sizeof(double) : sizeof(float);
    unsigned char *x = calloc(n, esz), *y = calloc(n, esz), *dy = calloc(n, esz), *dx = calloc(n, esz);
    unsigned char *w = calloc(nc, esz), *bb = calloc(nc, esz), *rm = calloc(nc, esz), *rv = calloc(nc, esz);
    unsigned char *gw = calloc(ng, esz), *gb = calloc(ng, esz), *g1 = calloc(nc, esz), *g2 = calloc(nc, esz);
    unsigned char *g3 = calloc(ng, esz), *g4 = calloc(ng, esz);
    for (size_t i = 0; i < n; i++) {
        double v = (double)(int8_t)u8(&s) * 0.37 + (u8(&s) == 255 ? NAN : 0.0);
        if (dbl) { ((double *)x)[i] = v; ((double *)dy)[i] = -v; } else { ((float *)x)[i] = (float)v; ((float *)dy)[i] = (float)-v; }
    }
    for (size_t i = 0; i < nc; i++) {
        if (dbl) { ((double *)w)[i] = 1; ((double *)rv)[i] = 1; } else { ((float *)w)[i] = 1; ((float *)rv)[i] = 1; }
    }
    int64_t nbt = 0;
    int64_t need = bcn_context_length(b, c, (flags & BCN_CHANNEL_NORM) ? g : 0);
    int64_t ctx_len = need > 0 && need < 100000 ? need : 64;
    if (ctx_mode % 4 == 1) ctx_len = ctx_len > 0 ? ctx_len - 1 : 0; /* one short */
    if (ctx_mode % 4 == 2) ctx_len = -ctx_len;
    double *ctx = calloc((size_t)(need > 0 && need < 100000 ? need : 64) + 1, sizeof(double));
    unsigned char *rm_before = malloc(nc * esz), *rv_before = malloc(nc * esz), *y_before = malloc(n * esz);
    memcpy(rm_before, rm, nc * esz); memcpy(rv_before, rv, nc * esz); memcpy(y_before, y, n * esz);
    char msg[64];
#define P(ptr, bit) ((nulls >> (bit)) & 1 ? NULL : (ptr))
    int32_t st = dbl ? bcn_norm_forward_f64(flags, b, c, sp, g, eps, bn_eps, momentum, (double *)P(x, 0), (double *)P(y, 1),
                                            (double *)P(w, 2), (double *)bb, (double *)P(rm, 3), (double *)rv, &nbt,
                                            (double *)P(gw, 4), (double *)gb, P(ctx, 5), ctx_len, msg, (int64_t)(u8(&s) % 65))
                     : bcn_norm_forward_f32(flags, b, c, sp, g, eps, bn_eps, momentum, (float *)P(x, 0), (float *)P(y, 1),
                                            (float *)P(w, 2), (float *)bb, (float *)P(rm, 3), (float *)rv, &nbt,
                                            (float *)P(gw, 4), (float *)gb, P(ctx, 5), ctx_len, msg, (int64_t)(u8(&s) % 65));
    if (st != BCN_OK) { /* a failed call writes nothing */
        abort_if(memcmp(rm, rm_before, nc * esz) != 0 || memcmp(rv, rv_before, nc * esz) != 0);
        abort_if(memcmp(y, y_before, n * esz) != 0 || nbt != 0);
    } else {
        abort_if(!sane);
        if (u8(&s) & 1) ((unsigned char *)ctx)[u8(&s) % (size_t)(ctx_len * 8)] ^= (unsigned char)(1u << (u8(&s) % 8));
        if (dbl)
            bcn_norm_backward_f64(flags & ~(uint32_t)(u8(&s) & BCN_BATCH_NORM), b, c, sp, g, (double *)x, (double *)P(dy, 6), (double *)dx,
                                  (double *)g1, (double *)g2, (double *)g3, (double *)g4, ctx, ctx_len, msg, sizeof msg);
        else
            bcn_norm_backward_f32(flags & ~(uint32_t)(u8(&s) & BCN_BATCH_NORM), b, c, sp, g, (float *)x, (float *)P(dy, 6), (float *)dx,
                                  (float *)g1, (float *)g2, (float *)g3, (float *)g4, ctx, ctx_len, msg, sizeof msg);
    }
    /* Weight Standardization on the same buffers, viewed as [b, c*sp]. */
    if (sane) {
        uint32_t wflags = u8(&s) % 5;
        if (dbl) bcn_ws_forward_f64(wflags, b, c * sp, eps, (double *)x, (double *)y, msg, sizeof msg);
        else bcn_ws_backward_f32(wflags, b, c * sp, eps, (float *)x, (float *)dy, (float *)dx, msg, sizeof msg);
    }
    free(x); free(y); free(dy); free(dx); free(w); free(bb); free(rm); free(rv); free(gw); free(gb);
    free(g1); free(g2); free(g3); free(g4); free(ctx); free(rm_before); free(rv_before); free(y_before);
    return 0;
}
