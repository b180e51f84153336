/*
 * bcnswift.h: the C ABI of bcnswift (Batch-Channel Normalization and Weight Standardization).
 *
 * This header is the one definition of the ABI's flags and status codes: the Swift exports and the Python
 * extension read them from here. Link libBCNSwiftC.a (from `swift build -c release --product BCNSwiftC`)
 * together with the Swift runtime (see setup.py for the static link line).
 *
 * Threads: every function is thread-safe and keeps no state between calls except the thread-count setting and
 * each thread's own team (bcn_set_calling_thread_team). Calls on distinct buffers may run concurrently; calls
 * that share a context buffer must not.
 *
 * Ownership: the caller owns every buffer. A pointer argument must address at least the number of elements
 * stated for it, with the element type stated; elements are contiguous. The library validates every size, flag
 * and null pointer, and the length of every buffer whose length is passed (context_length); it cannot validate
 * the length of any other buffer. It retains no pointer after a call returns and frees nothing it did not
 * allocate.
 *
 * Errors: each computing function returns BCN_OK (0) or a status code below, and writes a NUL-terminated,
 * human-readable message into `message` (truncated to `message_capacity` bytes; on success message[0] = 0).
 * `message` may be NULL or `message_capacity` 0 to skip the message. A call that fails has written nothing to
 * any buffer (outputs, running buffers, context) but the message. Nothing in the library aborts the process.
 *
 * Shapes: an input has `batch` samples, `channels` channels and `spatial` positions (the product of its
 * trailing dimensions; 1 for [B, C]). In memory it is [batch, channels, spatial] (each (sample, channel) plane
 * contiguous), or with BCN_CHANNELS_LAST [batch, spatial, channels]. Outputs and gradients have the input's
 * memory layout. Each size is at least 1, channels at most 2^32, and batch*channels*spatial (as out_channels *
 * fan_in for Weight Standardization) at most INT64_MAX / 16: BCN_ERR_INVALID_ARGUMENT otherwise.
 *
 * Phases: a forward is (a) local moments, (b) a merge of moment sets, (c) finish; bcn_norm_forward_* runs
 * (a) and (c) on one process's batch. To normalize with statistics over several processes, run (a) on each,
 * exchange the moments (3 doubles per channel), merge them in the same order everywhere with bcn_moments_merge,
 * and run (c) with the merged moments: every process then holds the same statistics and running buffers, bit
 * for bit, those of the concatenated batch (to rounding: the merge adds in another order than one call over the
 * whole batch would). The backward splits the same way around 2 doubles per channel.
 */
#ifndef BCNSWIFT_H
#define BCNSWIFT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ABI version of this header. Bumped on any incompatible change to a signature, flag, status code or layout.
 * 2: memory formats, statistics phases, a longer context. */
#define BCN_ABI_VERSION 2

/* ---- status codes ---------------------------------------------------------------------------------------- */
#define BCN_OK                      0
#define BCN_ERR_INVALID_ARGUMENT    1 /* a size (zero-size dims too), flag, eps, momentum, count or pointer is
                                         out of range or NULL                                                  */
#define BCN_ERR_SHAPE               2 /* a shape disagrees with the layer (Swift layers; no C function returns it) */
#define BCN_ERR_DEGENERATE          3 /* training statistics undefined: one value per channel or per group     */
#define BCN_ERR_NONFINITE           4 /* BCN_NAN_RAISE and x (forward) or dy (backward) holds NaN or infinity */
#define BCN_ERR_NO_FORWARD          5 /* the context was not filled by the phase this call continues, for this
                                         shape, groups, memory format and element type (f32 or f64); for a
                                         backward, also for this flags' stages                                  */
#define BCN_ERR_OUT_OF_MEMORY       6 /* the call's scratch memory (O(B*C) numbers and a block per thread)
                                         could not be allocated                                                */

/* ---- normalization flags (bitwise or) ------------------------------------------------------------------- */
#define BCN_BATCH_NORM              (1u << 0) /* a batch-norm stage (per channel affine bn_weight, bn_bias)     */
#define BCN_ESTIMATED               (1u << 1) /* its training statistics are estimated: update running buffers
                                                 from the batch first, then normalize with them (labml,
                                                 the authors' EstBN); without: batch statistics (BatchNorm2d)  */
#define BCN_UNBIASED_RUNNING_VAR    (1u << 2) /* fold var * n/(n-1) into running_var (PyTorch); else biased     */
#define BCN_VARIANCE_AROUND_RUNNING_MEAN (1u << 3) /* with BCN_ESTIMATED: measure the folded variance around the
                                                 running mean before its update (the authors' EstBN); refused
                                                 (BCN_ERR_INVALID_ARGUMENT) with BCN_BATCH_NORM but without
                                                 BCN_ESTIMATED; without a batch-norm stage ignored, as the
                                                 other flags of that stage are                                */
#define BCN_CUMULATIVE_AVERAGE      (1u << 4) /* ignore momentum; update factor 1/num_batches_tracked           */
#define BCN_CHANNEL_NORM            (1u << 5) /* a channel-norm stage: per sample, per group of channels/groups
                                                 channels; per group affine cn_weight, cn_bias                  */
#define BCN_NAN_RAISE               (1u << 6) /* BCN_ERR_NONFINITE on NaN/inf in x (or dy), writing nothing     */
#define BCN_TRAINING                (1u << 7) /* training mode; else eval (running statistics, no update)       */
#define BCN_CHANNELS_LAST           (1u << 8) /* x, y, dy, dx are [batch, spatial, channels] in memory           */
#define BCN_FLAGS_ALL               0x1ffu    /* every flag above (calls refuse other bits)                    */

/* ---- Weight Standardization flags ------------------------------------------------------------------------ */
#define BCN_WS_UNBIASED             (1u << 0) /* variance over fan_in - 1 (torch default); else over fan_in     */
#define BCN_WS_EPS_IN_SQRT          (1u << 1) /* (w - mean) / sqrt(var + eps) (labml); else / (std + eps)      */
#define BCN_WS_FLAGS_ALL            0x3u      /* every flag above (calls refuse other bits)                    */

/* BCN_ABI_VERSION of the library linked. */
int32_t bcn_abi_version(void);

/* Worker threads for later calls; n <= 0 restores the default (env BCNSWIFT_NUM_THREADS, else all cores).
 * A call uses at most 256 threads: every setting above that (these, the environment's) is taken as 256.
 * Returns the process's count now in force (a thread with its own setting, below, keeps using that). Results
 * are bitwise identical for every thread count. */
int32_t bcn_set_num_threads(int32_t n);
/* The threads the calling thread's next call uses (its own setting if it has one, else the above). */
int32_t bcn_get_num_threads(void);
/* Worker threads for later calls made from the calling thread only, overriding bcn_set_num_threads there;
 * n <= 0 removes the override. Returns the calling thread's previous override (0: none), so that it can be
 * restored. For callers inside another thread pool (PyTorch's intra-op threads poll for work after each
 * operation; bcnswift's workers would compete with them for the cores): run on the calling thread with n = 1.
 * (A process that has used up its thread-specific keys, PTHREAD_KEYS_MAX, has no per-thread setting: then this
 * does nothing and returns 0.) */
int32_t bcn_set_calling_thread_num_threads(int32_t n);
/* Another runtime's thread team: a function with the contract of GOMP_parallel, which libgomp, LLVM's libomp
 * and Intel's libiomp5 all export. It runs fn(data) on up to num_threads threads, the calling thread among
 * them, and returns once every one has returned. */
typedef void (*bcn_thread_team)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);
/* The team on which later calls made from the calling thread run their parallel work, with the thread count
 * above (bcn_get_num_threads), instead of bcnswift's workers; NULL (the default) goes back to the workers.
 * Returns the calling thread's previous team, so that it can be restored. For callers inside an OpenMP
 * program (PyTorch's CPU operations): its team's threads, still polling after the operation before, take the
 * kernel's work at once, where bcnswift's workers would compete with them for the cores. Results are bitwise
 * identical whatever runs them. (Without a thread-specific key left, this does nothing and returns NULL.) */
bcn_thread_team bcn_set_calling_thread_team(bcn_thread_team team);

/*
 * Length, in doubles, of the context buffer a forward fills for its backward: O(batch * channels).
 * groups is 0 without BCN_CHANNEL_NORM. Returns -1 for negative or overflowing sizes.
 */
int64_t bcn_context_length(int64_t batch, int64_t channels, int64_t groups);

/*
 * Forward of batch norm, channel norm, or both fused (Batch-Channel Normalization): phases (a) and (c).
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
 * Backward of the forward that filled `context` (same flags' stage bits and BCN_CHANNELS_LAST, shape, groups
 * and element type; otherwise BCN_ERR_NO_FORWARD; a context shorter than bcn_context_length gives
 * BCN_ERR_INVALID_ARGUMENT, as in the forward). x must be that forward's input, unchanged. The context is only read.
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

/* ---- statistics phases ----------------------------------------------------------------------------------- */

/*
 * Forward phase (a): one pass over x; its plane moments go into `context` (which phase (c) continues), and
 * with `moments` non-NULL the batch's moments per channel: 3*channels doubles, (count, mean, M2) for each
 * channel in turn, count = batch*spatial, M2 = sum of squared deviations from the mean. Arguments as in
 * bcn_norm_forward_* (eps, momentum and the parameters are not needed yet).
 */
int32_t bcn_norm_moments_f32(uint32_t flags, int64_t batch, int64_t channels, int64_t spatial, int64_t groups,
                             const float *x, double *moments, double *context, int64_t context_length,
                             char *message, int64_t message_capacity);
int32_t bcn_norm_moments_f64(uint32_t flags, int64_t batch, int64_t channels, int64_t spatial, int64_t groups,
                             const double *x, double *moments, double *context, int64_t context_length,
                             char *message, int64_t message_capacity);

/*
 * Phase (b): merges `sets` moment sets of `channels` channels each (set i at moments + 3*channels*i) per channel,
 * in set order, with Chan's formula, into `merged` (3*channels doubles; may equal `moments`). A set with count 0
 * contributes nothing (its mean and M2 are not read: sets all empty merge to zeros); one set with values merges
 * to itself, bit for bit. `sets` must be at least 1, counts non-negative whole numbers adding up to at most 2^53
 * per channel (what a double counts exactly) and M2 not negative (BCN_ERR_INVALID_ARGUMENT otherwise); NaN means
 * or M2 are not refused here and merge into NaN (phase (c) refuses them under BCN_NAN_RAISE).
 */
int32_t bcn_moments_merge(int64_t sets, int64_t channels, const double *moments, double *merged,
                          char *message, int64_t message_capacity);

/*
 * Forward phase (c): running buffers, coefficients and the output y, continuing phase (a) on the same x and
 * context (of the same shape, groups, memory format and element type: otherwise BCN_ERR_NO_FORWARD; the plane
 * moments do not depend on the batch-norm flags, so phase (a)'s need not name the same ones, but it records
 * groups only with BCN_CHANNEL_NORM: both phases name that stage, with the same groups, or neither does).
 * `moments` is the batch's moments per channel (3*channels doubles, from phase (a) or merged by phase (b));
 * required when training with BCN_BATCH_NORM, ignored (may be NULL) otherwise. Other arguments as in
 * bcn_norm_forward_*. BCN_ERR_DEGENERATE when the moments' count is 1 and the statistics need more. With
 * BCN_NAN_RAISE, x is read for NaN and infinity here too, whatever phase (a) was given.
 */
int32_t bcn_norm_finish_f32(uint32_t flags, int64_t batch, int64_t channels, int64_t spatial, int64_t groups,
                            double eps, double bn_eps, double momentum,
                            const float *x, float *y,
                            const float *bn_weight, const float *bn_bias,
                            float *running_mean, float *running_var, int64_t *num_batches_tracked,
                            const float *cn_weight, const float *cn_bias, const double *moments,
                            double *context, int64_t context_length,
                            char *message, int64_t message_capacity);
int32_t bcn_norm_finish_f64(uint32_t flags, int64_t batch, int64_t channels, int64_t spatial, int64_t groups,
                            double eps, double bn_eps, double momentum,
                            const double *x, double *y,
                            const double *bn_weight, const double *bn_bias,
                            double *running_mean, double *running_var, int64_t *num_batches_tracked,
                            const double *cn_weight, const double *cn_bias, const double *moments,
                            double *context, int64_t context_length,
                            char *message, int64_t message_capacity);

/*
 * The running-buffer update alone, from the batch's moments per channel (3*channels doubles, from phase (a) or
 * merged by phase (b)), exactly as phase (c) would make it in training: for a process that holds no share of a
 * batch but keeps its buffers in step, or a framework that separates the buffers' update from the normalization
 * (then normalize with BCN_ESTIMATED in eval mode on the updated buffers). Only the batch-norm flags count:
 * BCN_BATCH_NORM is required, BCN_CHANNEL_NORM, BCN_TRAINING and BCN_CHANNELS_LAST are ignored. With
 * BCN_NAN_RAISE, non-finite moments fail with BCN_ERR_NONFINITE. BCN_ERR_DEGENERATE when the moments' count is 1
 * and the statistics need more (batch statistics, or an unbiased running variance), as in training.
 */
int32_t bcn_running_update_f32(uint32_t flags, int64_t channels, double momentum, const double *moments,
                               float *running_mean, float *running_var, int64_t *num_batches_tracked,
                               char *message, int64_t message_capacity);
int32_t bcn_running_update_f64(uint32_t flags, int64_t channels, double momentum, const double *moments,
                               double *running_mean, double *running_var, int64_t *num_batches_tracked,
                               char *message, int64_t message_capacity);

/*
 * 1 if the backward of the forward that filled `context` needs the whole batch's gradient sums (a batch-norm
 * stage trained with batch statistics), 0 if not, or a negative status (-BCN_ERR_NO_FORWARD, ...) if the context
 * holds no such forward (of either element type: this reads no input).
 */
int32_t bcn_norm_needs_gradient_sums(uint32_t flags, int64_t batch, int64_t channels, int64_t spatial,
                                     int64_t groups, const double *context, int64_t context_length);

/*
 * Backward phase (a): one pass over (x, dy); its plane sums go into `context` (which backward phase (c)
 * continues), and with `sums` non-NULL the batch's per-channel sums: 2*channels doubles, S1 = sum of dy1 for every
 * channel, then S2 = sum of dy1 * (x - mean) (dy1: the gradient after the channel-norm stage). `sums` is left
 * untouched when the forward did not use batch statistics (see bcn_norm_needs_gradient_sums).
 */
int32_t bcn_norm_backward_sums_f32(uint32_t flags, int64_t batch, int64_t channels, int64_t spatial,
                                   int64_t groups, const float *x, const float *dy, double *sums,
                                   double *context, int64_t context_length, char *message, int64_t message_capacity);
int32_t bcn_norm_backward_sums_f64(uint32_t flags, int64_t batch, int64_t channels, int64_t spatial,
                                   int64_t groups, const double *x, const double *dy, double *sums,
                                   double *context, int64_t context_length, char *message, int64_t message_capacity);

/* Backward phase (b): adds `sets` sum vectors of 2*channels doubles (set i at sums + 2*channels*i) in set order
 * into `merged` (2*channels doubles; may equal `sums`). */
int32_t bcn_sums_merge(int64_t sets, int64_t channels, const double *sums, double *merged,
                       char *message, int64_t message_capacity);

/*
 * Backward phase (c): dx and the parameter gradients (added, as in bcn_norm_backward_*: this process's own
 * share, which data-parallel training sums over processes), continuing backward phase (a) on the same x, dy and
 * context. `sums` is the batch's S1, S2 (2*channels doubles, from phase (a) or merged by phase (b)); required
 * when bcn_norm_needs_gradient_sums says 1, ignored (may be NULL) otherwise. With BCN_NAN_RAISE, dy is read for
 * NaN and infinity here too, whatever backward phase (a) was given.
 */
int32_t bcn_norm_backward_finish_f32(uint32_t flags, int64_t batch, int64_t channels, int64_t spatial,
                                     int64_t groups, const float *x, const float *dy, float *dx,
                                     float *grad_bn_weight, float *grad_bn_bias,
                                     float *grad_cn_weight, float *grad_cn_bias, const double *sums,
                                     double *context, int64_t context_length,
                                     char *message, int64_t message_capacity);
int32_t bcn_norm_backward_finish_f64(uint32_t flags, int64_t batch, int64_t channels, int64_t spatial,
                                     int64_t groups, const double *x, const double *dy, double *dx,
                                     double *grad_bn_weight, double *grad_bn_bias,
                                     double *grad_cn_weight, double *grad_cn_bias, const double *sums,
                                     double *context, int64_t context_length,
                                     char *message, int64_t message_capacity);

/* ---- Weight Standardization ------------------------------------------------------------------------------ */

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
 * A constant row has grad_w = (grad_w_hat - mean(grad_w_hat)) / den: never NaN, and finite unless that quotient
 * overflows (den = eps below about 1e-308). Both directions keep their precision at any finite weight and eps
 * (relative to the largest value of the result's row): a row whose moments or constants would overflow or
 * underflow in the kernels' precision (Float32 for float input), or whose spread is a few ulps of its mean, runs
 * in scalar double on the row rescaled by a power of two. (A result beyond the output type's range overflows or
 * underflows as the exact value would.) A gradient that is itself a cancellation, as with a fan-in of 2, where it
 * is of order eps / variance against inputs of order 1 / std, keeps that precision only against those inputs. */
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
