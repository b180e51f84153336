/*
 * bcnswift.h: the C ABI of bcnswift (Batch-Channel Normalization and Weight Standardization).
 *
 * Link libBCNSwiftC.a (from `swift build -c release --product BCNSwiftC`) together with the Swift runtime
 * (see setup.py for the static link line). Every function is thread-safe: it keeps no state between calls except
 * the thread-count setting. Functions that compute release no memory they did not allocate and retain no
 * pointer after they return.
 *
 * Ownership: the caller owns every buffer. A pointer argument must address at least the number of elements
 * stated for it, with the element type stated; elements are contiguous in C order. The library validates every
 * size, flag and null pointer it is given, and reads or writes nothing when it returns a non-zero status; it cannot
 * validate the length of a buffer behind a pointer, except the context buffer whose length is passed.
 *
 * Errors: each computing function returns BCN_OK (0) or a status code below, and writes a NUL-terminated,
 * human-readable message into `message` (truncated to `message_capacity` bytes; on success message[0] = 0).
 * `message` may be NULL or `message_capacity` 0 to skip the message. Nothing in the library aborts the process.
 */
#ifndef BCNSWIFT_H
#define BCNSWIFT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status codes ---------------------------------------------------------------------------------------- */
#define BCN_OK                      0
#define BCN_ERR_INVALID_ARGUMENT    1 /* a size, flag, eps, momentum or pointer is out of range or NULL        */
#define BCN_ERR_SHAPE               2 /* a shape disagrees with the layer (channel count, zero-size dims)      */
#define BCN_ERR_DEGENERATE          3 /* training statistics undefined: one value per channel or per group     */
#define BCN_ERR_NONFINITE           4 /* BCN_NAN_RAISE and the input holds NaN or infinity                    */
#define BCN_ERR_NO_FORWARD          5 /* backward's context was not filled by a forward of this plan and shape */

/* ---- normalization flags (bitwise or) ------------------------------------------------------------------- */
#define BCN_BATCH_NORM              (1u << 0) /* a batch-norm stage (per channel affine bn_weight, bn_bias)     */
#define BCN_ESTIMATED               (1u << 1) /* its training statistics are estimated: update running buffers
                                                 from the batch first, then normalize with them (labml,
                                                 the authors' EstBN); without: batch statistics (BatchNorm2d)  */
#define BCN_UNBIASED_RUNNING_VAR    (1u << 2) /* fold var * n/(n-1) into running_var (PyTorch); else biased     */
#define BCN_VARIANCE_AROUND_RUNNING_MEAN (1u << 3) /* with BCN_ESTIMATED: measure the folded variance around the
                                                 running mean before its update (the authors' EstBN)           */
#define BCN_CUMULATIVE_AVERAGE      (1u << 4) /* ignore momentum; update factor 1/num_batches_tracked           */
#define BCN_CHANNEL_NORM            (1u << 5) /* a channel-norm stage: per sample, per group of channels/groups
                                                 channels; per group affine cn_weight, cn_bias                  */
#define BCN_NAN_RAISE               (1u << 6) /* fail with BCN_ERR_NONFINITE on NaN/inf input, writing nothing  */
#define BCN_TRAINING                (1u << 7) /* training mode; else eval (running statistics, no update)       */

/* ---- Weight Standardization flags ------------------------------------------------------------------------ */
#define BCN_WS_UNBIASED             (1u << 0) /* variance over fan_in - 1 (torch default); else over fan_in     */
#define BCN_WS_EPS_IN_SQRT          (1u << 1) /* (w - mean) / sqrt(var + eps) (labml); else / (std + eps)      */

/* ABI version of this header: 1. */
int32_t bcn_abi_version(void);

/* Worker threads for later calls; n <= 0 restores the default (env BCNSWIFT_NUM_THREADS, else all cores).
 * Returns the count in force. Results are bitwise identical for every thread count. */
int32_t bcn_set_num_threads(int32_t n);
int32_t bcn_get_num_threads(void);

/*
 * Length, in doubles, of the context buffer a forward fills for its backward: O(batch * channels).
 * groups is 0 without BCN_CHANNEL_NORM. Returns -1 for non-positive or overflowing sizes.
 */
int64_t bcn_context_length(int64_t batch, int64_t channels, int64_t groups);

/*
 * Forward of batch norm, channel norm, or both fused (Batch-Channel Normalization), on x of shape
 * [batch, channels, spatial] (spatial = product of the trailing dims; 1 for [B, C]).
 *
 *   flags          BCN_* normalization flags; at least one of BCN_BATCH_NORM, BCN_CHANNEL_NORM.
 *   groups         channel groups (> 0, divides channels) with BCN_CHANNEL_NORM; ignored without.
 *   eps            > 0, the channel-norm stage's eps.
 *   bn_eps         > 0, the batch-norm stage's eps.
 *   momentum       in [0, 1]: running <- (1 - momentum) running + momentum batch; ignored with
 *                  BCN_CUMULATIVE_AVERAGE.
 *   x              in,  batch*channels*spatial elements.
 *   y              out, same size; may equal x only if no backward follows (backward needs x).
 *   bn_weight, bn_bias                     in, channels elements each        } required with
 *   running_mean, running_var              in/out, channels elements each    } BCN_BATCH_NORM,
 *   num_batches_tracked                    in/out, one int64                 } else ignored
 *   cn_weight, cn_bias                     in, groups elements each: required with BCN_CHANNEL_NORM
 *   context        out, context_length doubles, at least bcn_context_length(batch, channels, groups).
 *
 * A training forward updates running_mean, running_var and num_batches_tracked only if it returns BCN_OK.
 * BCN_ERR_DEGENERATE: batch statistics with batch*spatial == 1 when training, an unbiased running variance from one
 * value, or a channel group of one value per sample.
 */
int32_t bcn_norm_forward_f32(uint32_t flags, int64_t batch, int64_t channels, int64_t spatial, int64_t groups,
                             double eps, double bn_eps, double momentum,
                             const float *x, float *y,
                             const float *bn_weight, const float *bn_bias,
                             float *running_mean, float *running_var, int64_t *num_batches_tracked,
                             const float *cn_weight, const float *cn_bias,
                             double *context, int64_t context_length,
                             char *message, int64_t message_capacity);
int32_t bcn_norm_forward_f64(uint32_t flags, int64_t batch, int64_t channels, int64_t spatial, int64_t groups,
                             double eps, double bn_eps, double momentum,
                             const double *x, double *y,
                             const double *bn_weight, const double *bn_bias,
                             double *running_mean, double *running_var, int64_t *num_batches_tracked,
                             const double *cn_weight, const double *cn_bias,
                             double *context, int64_t context_length,
                             char *message, int64_t message_capacity);

/*
 * Backward of the forward that filled `context` (same flags' stage bits, shape and groups; otherwise
 * BCN_ERR_NO_FORWARD). x must be that forward's input, unchanged.
 *
 *   dy             in,  batch*channels*spatial elements: gradient of the loss with respect to y.
 *   dx             out, same size; may equal dy.
 *   grad_bn_weight, grad_bn_bias   in/out, channels elements: the parameter gradients are ADDED to them.
 *   grad_cn_weight, grad_cn_bias   in/out, groups elements: likewise. Any of the four may be NULL (not computed).
 */
int32_t bcn_norm_backward_f32(uint32_t flags, int64_t batch, int64_t channels, int64_t spatial, int64_t groups,
                              const float *x, const float *dy, float *dx,
                              float *grad_bn_weight, float *grad_bn_bias,
                              float *grad_cn_weight, float *grad_cn_bias,
                              const double *context, int64_t context_length,
                              char *message, int64_t message_capacity);
int32_t bcn_norm_backward_f64(uint32_t flags, int64_t batch, int64_t channels, int64_t spatial, int64_t groups,
                              const double *x, const double *dy, double *dx,
                              double *grad_bn_weight, double *grad_bn_bias,
                              double *grad_cn_weight, double *grad_cn_bias,
                              const double *context, int64_t context_length,
                              char *message, int64_t message_capacity);

/*
 * Weight Standardization of w viewed as [out_channels, fan_in] (fan_in = product of the other dims):
 * w_hat = (w - mean) / den per row, den = sqrt(var + eps) with BCN_WS_EPS_IN_SQRT, else std + eps.
 *   eps > 0; with BCN_WS_UNBIASED fan_in must be >= 2 (BCN_ERR_DEGENERATE otherwise).
 *   w in, w_hat out (may equal w): out_channels*fan_in elements each.
 */
int32_t bcn_ws_forward_f32(uint32_t flags, int64_t out_channels, int64_t fan_in, double eps,
                           const float *w, float *w_hat, char *message, int64_t message_capacity);
int32_t bcn_ws_forward_f64(uint32_t flags, int64_t out_channels, int64_t fan_in, double eps,
                           const double *w, double *w_hat, char *message, int64_t message_capacity);

/* Gradient of Weight Standardization: grad_w from grad_w_hat at weight w (grad_w may equal grad_w_hat).
 * A constant row has grad_w = (grad_w_hat - mean(grad_w_hat)) / den: finite, never NaN. */
int32_t bcn_ws_backward_f32(uint32_t flags, int64_t out_channels, int64_t fan_in, double eps,
                            const float *w, const float *grad_w_hat, float *grad_w,
                            char *message, int64_t message_capacity);
int32_t bcn_ws_backward_f64(uint32_t flags, int64_t out_channels, int64_t fan_in, double eps,
                            const double *w, const double *grad_w_hat, double *grad_w,
                            char *message, int64_t message_capacity);

#ifdef __cplusplus
}
#endif
#endif /* BCNSWIFT_H */
