/*
 * The kernels' C ABI as a table of function pointers, which bcnswift._ext exports as the capsule
 * `bcnswift._ext._C_API` (named "bcnswift._C_API") for other native code in the same process: bcnswift.torch's
 * native operators (torch/native_ops.cpp), which cannot link the kernels themselves (the extension hides every
 * symbol but its PyInit_*, and loads the build for the CPU at run time). Each entry is the bcnswift.h function of
 * the same name, without its `bcn_` prefix; the compiler checks that they match where _ext.c fills the table.
 *
 * Self-contained (no bcnswift.h), so that it ships with the Python package and compiles as C and as C++.
 * `size` and `abi_version` come first and never move: a reader checks both before it takes any entry.
 */
#ifndef BCNSWIFT_C_API_H
#define BCNSWIFT_C_API_H

#include <stdint.h>

#define BCN_C_API_CAPSULE "bcnswift._C_API"
/* The bcnswift.h ABI version whose signatures and flags this table carries (its `abi_version` field). */
#define BCN_C_API_ABI_VERSION 2

#ifdef __cplusplus
extern "C" {
#endif

typedef void (*bcn_c_api_team)(void (*)(void *), void *, uint32_t, uint32_t);

typedef struct bcn_c_api {
    uint32_t size;       /* sizeof(bcn_c_api) as the exporter was built */
    int32_t abi_version; /* bcn_abi_version() */
    /* bcnswift.h's flags and status codes that a caller interprets, as the exporter was built */
    uint32_t batch_norm, estimated, cumulative_average, channel_norm, training, channels_last;
    int32_t status_ok, status_no_forward;
    int32_t (*get_num_threads)(void);
    int32_t (*set_calling_thread_num_threads)(int32_t n);
    bcn_c_api_team (*set_calling_thread_team)(bcn_c_api_team team);
    int64_t (*context_length)(int64_t batch, int64_t channels, int64_t groups);
    int32_t (*norm_forward_f32)(uint32_t, int64_t, int64_t, int64_t, int64_t, double, double, double, const float *,
                                float *, const float *, const float *, float *, float *, int64_t *, const float *,
                                const float *, double *, int64_t, char *, int64_t);
    int32_t (*norm_forward_f64)(uint32_t, int64_t, int64_t, int64_t, int64_t, double, double, double, const double *,
                                double *, const double *, const double *, double *, double *, int64_t *,
                                const double *, const double *, double *, int64_t, char *, int64_t);
    int32_t (*norm_moments_f32)(uint32_t, int64_t, int64_t, int64_t, int64_t, const float *, double *, double *,
                                int64_t, char *, int64_t);
    int32_t (*norm_moments_f64)(uint32_t, int64_t, int64_t, int64_t, int64_t, const double *, double *, double *,
                                int64_t, char *, int64_t);
    int32_t (*norm_finish_f32)(uint32_t, int64_t, int64_t, int64_t, int64_t, double, double, double, const float *,
                               float *, const float *, const float *, float *, float *, int64_t *, const float *,
                               const float *, const double *, double *, int64_t, char *, int64_t);
    int32_t (*norm_finish_f64)(uint32_t, int64_t, int64_t, int64_t, int64_t, double, double, double, const double *,
                               double *, const double *, const double *, double *, double *, int64_t *,
                               const double *, const double *, const double *, double *, int64_t, char *, int64_t);
    int32_t (*running_update_f32)(uint32_t, int64_t, double, const double *, float *, float *, int64_t *, char *,
                                  int64_t);
    int32_t (*running_update_f64)(uint32_t, int64_t, double, const double *, double *, double *, int64_t *, char *,
                                  int64_t);
    int32_t (*norm_backward_f32)(uint32_t, int64_t, int64_t, int64_t, int64_t, const float *, const float *, float *,
                                 float *, float *, float *, float *, const double *, int64_t, char *, int64_t);
    int32_t (*norm_backward_f64)(uint32_t, int64_t, int64_t, int64_t, int64_t, const double *, const double *,
                                 double *, double *, double *, double *, double *, const double *, int64_t, char *,
                                 int64_t);
    int32_t (*ws_forward_f32)(uint32_t, int64_t, int64_t, double, const float *, float *, char *, int64_t);
    int32_t (*ws_forward_f64)(uint32_t, int64_t, int64_t, double, const double *, double *, char *, int64_t);
    int32_t (*ws_backward_f32)(uint32_t, int64_t, int64_t, double, const float *, const float *, float *, char *,
                               int64_t);
    int32_t (*ws_backward_f64)(uint32_t, int64_t, int64_t, double, const double *, const double *, double *, char *,
                               int64_t);
    /* every normalization flag and every Weight Standardization flag (BCN_FLAGS_ALL, BCN_WS_FLAGS_ALL): a caller
     * refuses other bits before it reads any array by the flags' memory order */
    uint32_t flags_all, ws_flags_all;
    /* BCN_ERR_OUT_OF_MEMORY: a call's scratch memory could not be allocated */
    int32_t status_out_of_memory;
} bcn_c_api;

#ifdef __cplusplus
}
#endif

#endif
