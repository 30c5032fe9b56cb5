/* Compute kernels for the layers of MobileNetV3, fp32, activations in NHWC.
 *
 * Conventions (every kernel below follows them):
 * - Argument order: outputs, saved state for backward, inputs, then dimensions/parameters,
 *   then the thread pool (NULL runs on the calling thread).
 * - Forward kernels overwrite their outputs. Backward kernels ACCUMULATE (+=) into every
 *   gradient they produce (dx, dw, db, ...); a NULL gradient pointer means "not needed".
 * - Weights keep torchvision's layout: convolution weights (Cout, Cin/groups, k, k), linear
 *   weights (out, in), all row-major.
 * - For a fixed thread count, results are bitwise reproducible: work is split with
 *   tern_split(total, ith, nth) and no reduction order depends on timing.
 * - Each fast kernel has a plain reference version (suffix _ref) kept as a test oracle.
 *
 * Internal header: not installed. */
#ifndef TERN_KERNELS_H
#define TERN_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pool.h"

/* How a backward kernel writes the input gradient dx: added to what dx holds (the default of
 * every kernel below), or stored over it, for the first writer of a gradient buffer in a
 * backward pass (saves zeroing the buffer and reading it back). Parameter gradients always
 * accumulate. */
typedef enum tern_grad_mode {
    TERN_GRAD_ADD, /* dx += ... */
    TERN_GRAD_SET, /* dx = ...; dx's old contents are never read (may be garbage) */
} tern_grad_mode;

typedef enum tern_act {
    TERN_ACT_NONE,
    TERN_ACT_RELU,
    TERN_ACT_HARDSWISH,   /* x * relu6(x + 3) / 6 */
    TERN_ACT_HARDSIGMOID, /* relu6(x + 3) / 6 */
} tern_act;

/* ---- convolution ------------------------------------------------------------------------ */

typedef struct tern_conv_params {
    int n, h, w, cin;   /* input  (N, H, W, Cin) */
    int oh, ow, cout;   /* output (N, OH, OW, Cout); OH = (H + 2*pad - k) / stride + 1 */
    int k, stride, pad; /* square kernel, symmetric zero padding */
    int groups;         /* Cin and Cout divisible by groups */
} tern_conv_params;

/* Fills oh/ow from the other fields. */
void tern_conv_params_finish(tern_conv_params *p);

/* Floats of scratch the fast conv kernels need for p (0 when none): im2col tiles and permuted
 * weights for k > 1 with groups == 1, per-thread dW/db partial sums for the direct stem,
 * nothing for pointwise or depthwise. Same value for forward and backward. */
size_t tern_conv2d_workspace_size(const tern_conv_params *p, int nthreads);

/* Largest k*k the direct depthwise kernels take (k <= 7). */
#define TERN_DW_TAPS_MAX 49

/* y = act(conv(x, w) + b). Dispatches: 1x1/stride 1/pad 0/groups 1 -> GEMM; groups == cin ==
 * cout -> direct depthwise; groups == 1 -> im2col + GEMM (using workspace); else reference.
 *   y (N, OH, OW, Cout), x (N, H, W, Cin), w (Cout, Cin/groups, k, k), b (Cout) or NULL */
void tern_conv2d_forward(float *y, float *workspace, const float *x, const float *w,
                         const float *b, tern_act act, const tern_conv_params *p,
                         tern_pool *pool);
/* Whether tern_conv2d_forward_stats takes p: the pointwise (GEMM) and depthwise paths. */
bool tern_conv2d_has_stats(const tern_conv_params *p);
/* tern_conv2d_forward (b == NULL, no activation) that also writes the per-channel statistics a
 * BatchNorm of y needs, taken while y is stored instead of in another pass over it: stats is
 * (tern_pool_size(pool), 2, Cout) doubles (1 part for a NULL pool), part t holding the sums of
 * y and of y^2 over the rows thread t wrote (zero where it wrote none), each summed in row
 * order. Only for shapes tern_conv2d_has_stats accepts. */
void tern_conv2d_forward_stats(float *y, double *stats, const float *x, const float *w,
                               const tern_conv_params *p, tern_pool *pool);
/* dx += dL/dx, dw += dL/dw, db += dL/db (each may be NULL). */
void tern_conv2d_backward(float *dx, float *dw, float *db, float *workspace, const float *dy,
                          const float *x, const float *w, const tern_conv_params *p,
                          tern_pool *pool);
/* tern_conv2d_backward with dx written as dx_mode says. */
void tern_conv2d_backward_mode(float *dx, float *dw, float *db, float *workspace,
                               const float *dy, const float *x, const float *w,
                               const tern_conv_params *p, tern_grad_mode dx_mode,
                               tern_pool *pool);
/* Direct loops over every output, any groups: the oracle for the dispatching kernels. */
void tern_conv2d_forward_ref(float *y, const float *x, const float *w, const float *b,
                             const tern_conv_params *p);
void tern_conv2d_backward_ref(float *dx, float *dw, float *db, const float *dy, const float *x,
                              const float *w, const tern_conv_params *p);

/* Depthwise (groups == cin == cout, k*k <= TERN_DW_TAPS_MAX), direct NHWC:
 * y = act(conv(x, w) + b); backward accumulates dx, dw, db (each may be NULL). */
void tern_dwconv_forward(float *y, const float *x, const float *w, const float *b, tern_act act,
                         const tern_conv_params *p, tern_pool *pool);
/* The same for output rows [row0, row1) of the N*OH only (0 <= row0 <= row1 <= N*OH): they
 * read only the input rows they need, so the input may be filled in row by row, just ahead of
 * the rows that use it; bit-identical to the same rows of tern_dwconv_forward. */
void tern_dwconv_forward_rows(float *y, const float *x, const float *w, const float *b,
                              tern_act act, const tern_conv_params *p, int row0, int row1,
                              tern_pool *pool);
/* The same, also writing y's channel statistics as tern_conv2d_forward_stats does (stats may be
 * NULL). */
void tern_dwconv_forward_stats(float *y, double *stats, const float *x, const float *w,
                               const float *b, tern_act act, const tern_conv_params *p,
                               tern_pool *pool);
void tern_dwconv_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                          const float *w, const tern_conv_params *p, tern_pool *pool);
void tern_dwconv_backward_mode(float *dx, float *dw, float *db, const float *dy, const float *x,
                               const float *w, const tern_conv_params *p,
                               tern_grad_mode dx_mode, tern_pool *pool);

/* Direct stem convolution (nn/stemconv.c): 3x3, stride 2, pad 1, groups 1, Cin <= 4,
 * Cout <= 64, vectorized over output channels, no im2col. tern_conv2d_* dispatch to it for
 * those shapes; callable directly for tests and benchmarks. */
#define TERN_STEM_CIN_MAX 4
#define TERN_STEM_COUT_MAX 64
/* Whether p is a shape the stem kernels take. */
bool tern_stemconv_supported(const tern_conv_params *p);
/* Floats of workspace the backward needs (dW/db partials, one set per thread). */
size_t tern_stemconv_workspace_size(const tern_conv_params *p, int nthreads);
/* y = act(conv(x, w) + b), bit-identical to the unfused conv followed by + b and
 * tern_act_forward. */
void tern_stemconv_forward(float *y, const float *x, const float *w, const float *b,
                           tern_act act, const tern_conv_params *p, tern_pool *pool);
/* dx += ..., dw += ..., db += ... (each may be NULL); workspace of
 * tern_stemconv_workspace_size(p, tern_pool_size(pool)) floats (may be NULL if dw and db are). */
void tern_stemconv_backward(float *dx, float *dw, float *db, float *workspace, const float *dy,
                            const float *x, const float *w, const tern_conv_params *p,
                            tern_pool *pool);

/* ---- fully connected ---------------------------------------------------------------------- */

/* y (N, O) = x (N, I) w(O, I)^T + b (O) (b may be NULL). */
void tern_linear_forward(float *y, const float *x, const float *w, const float *b, int n,
                         int in, int out, tern_pool *pool);
void tern_linear_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                          const float *w, int n, int in, int out, tern_pool *pool);
void tern_linear_backward_mode(float *dx, float *dw, float *db, const float *dy, const float *x,
                               const float *w, int n, int in, int out, tern_grad_mode dx_mode,
                               tern_pool *pool);

/* ---- normalization ------------------------------------------------------------------------ */

/* BatchNorm2d, training mode, over m = N*H*W rows of c channels (x is (m, c)).
 * Normalizes with the biased batch variance; writes save_mean/save_invstd (c) for backward,
 * where invstd = 1/sqrt(var + eps); updates running stats in place:
 *   run_mean = (1-momentum) run_mean + momentum mean
 *   run_var  = (1-momentum) run_var  + momentum var * m/(m-1)   (unbiased; m == 1: var)  */
void tern_batchnorm_forward_train(float *y, float *save_mean, float *save_invstd,
                                  float *run_mean, float *run_var, const float *x,
                                  const float *gamma, const float *beta, size_t m, int c,
                                  float eps, float momentum, tern_pool *pool);
/* BatchNorm2d, eval mode: y = (x - run_mean) / sqrt(run_var + eps) * gamma + beta. */
void tern_batchnorm_forward_eval(float *y, const float *x, const float *gamma,
                                 const float *beta, const float *run_mean, const float *run_var,
                                 size_t m, int c, float eps, tern_pool *pool);
/* Backward of the training-mode forward (batch statistics). */
void tern_batchnorm_backward(float *dx, float *dgamma, float *dbeta, const float *dy,
                             const float *x, const float *save_mean, const float *save_invstd,
                             const float *gamma, size_t m, int c, tern_pool *pool);

/* BatchNorm2d followed by an activation, training mode, fused: a = act(bn(y)) over m rows of c
 * channels. Statistics, saved mean/invstd and running-stat updates exactly as
 * tern_batchnorm_forward_train; the normalized pre-activation is not stored. */
void tern_batchnorm_act_forward_train(float *a, float *save_mean, float *save_invstd,
                                      float *run_mean, float *run_var, const float *y,
                                      const float *gamma, const float *beta, size_t m, int c,
                                      float eps, float momentum, tern_act act, tern_pool *pool);
/* The fused forward with y's statistics already summed by the kernel that produced y
 * (tern_conv2d_forward_stats): nparts parts of (2, c) doubles, sums of y then of y^2, added
 * in order; no statistics pass over y. Same outputs as tern_batchnorm_act_forward_train up to
 * the rounding of the sums. */
void tern_batchnorm_act_forward_train_stats(float *a, float *save_mean, float *save_invstd,
                                            float *run_mean, float *run_var, const float *y,
                                            const double *stats, int nparts,
                                            const float *gamma, const float *beta, size_t m,
                                            int c, float eps, float momentum, tern_act act,
                                            tern_pool *pool);
/* Backward of the fused forward: recomputes z = (y - mean) * invstd * gamma + beta, takes
 * dz = da * act'(z) (PyTorch's choices at the kinks), then the BatchNorm backward:
 * dy += ..., dgamma += ..., dbeta += ... (dy, dgamma, dbeta may be NULL). */
void tern_batchnorm_act_backward(float *dy, float *dgamma, float *dbeta, const float *da,
                                 const float *y, const float *save_mean, const float *save_invstd,
                                 const float *gamma, const float *beta, size_t m, int c,
                                 tern_act act, tern_pool *pool);
/* The same with dy written as dy_mode says. */
void tern_batchnorm_act_backward_mode(float *dy, float *dgamma, float *dbeta, const float *da,
                                      const float *y, const float *save_mean,
                                      const float *save_invstd, const float *gamma,
                                      const float *beta, size_t m, int c, tern_act act,
                                      tern_grad_mode dy_mode, tern_pool *pool);

/* GroupNorm: x (N, HW, C), channels split into `groups` consecutive groups; statistics per
 * (sample, group) over HW * C/groups values, biased variance; save_mean/save_invstd (N, groups). */
void tern_groupnorm_forward(float *y, float *save_mean, float *save_invstd, const float *x,
                            const float *gamma, const float *beta, int n, size_t hw, int c,
                            int groups, float eps, tern_pool *pool);
void tern_groupnorm_backward(float *dx, float *dgamma, float *dbeta, const float *dy,
                             const float *x, const float *save_mean, const float *save_invstd,
                             const float *gamma, int n, size_t hw, int c, int groups,
                             tern_pool *pool);

/* ---- elementwise ----------------------------------------------------------------------------- */


/* y = act(x) over count values (y may equal x). */
void tern_act_forward(float *y, const float *x, size_t count, tern_act act, tern_pool *pool);
/* dx += dy * act'(x), with PyTorch's choices at the kinks:
 *   relu: x > 0; hardswish: 0 for x < -3, x/3 + 1/2 for -3 <= x <= 3, 1 above;
 *   hardsigmoid: 1/6 for -3 < x < 3, else 0. */
void tern_act_backward(float *dx, const float *dy, const float *x, size_t count, tern_act act,
                       tern_pool *pool);

/* y = a + b over count values. */
void tern_add_forward(float *y, const float *a, const float *b, size_t count, tern_pool *pool);
/* dst += src over count values. */
void tern_accumulate(float *dst, const float *src, size_t count, tern_pool *pool);
/* dst = src (mode TERN_GRAD_SET) or dst += src (TERN_GRAD_ADD) over count values. */
void tern_accumulate_mode(float *dst, const float *src, size_t count, tern_grad_mode mode,
                          tern_pool *pool);

/* Global average pool: y (N, C) = mean over HW of x (N, HW, C). */
void tern_avgpool_forward(float *y, const float *x, int n, size_t hw, int c, tern_pool *pool);
void tern_avgpool_backward(float *dx, const float *dy, int n, size_t hw, int c, tern_pool *pool);
void tern_avgpool_backward_mode(float *dx, const float *dy, int n, size_t hw, int c,
                                tern_grad_mode dx_mode, tern_pool *pool);

/* Channel scaling (the squeeze-and-excitation gate): y (N, HW, C) = x * s (N, C) broadcast. */
void tern_scale_channels_forward(float *y, const float *x, const float *s, int n, size_t hw,
                                 int c, tern_pool *pool);
/* dx += dy * s; ds += sum over HW of dy * x. */
void tern_scale_channels_backward(float *dx, float *ds, const float *dy, const float *x,
                                  const float *s, int n, size_t hw, int c, tern_pool *pool);
/* The same with dx written as dx_mode says (ds still accumulates). */
void tern_scale_channels_backward_mode(float *dx, float *ds, const float *dy, const float *x,
                                       const float *s, int n, size_t hw, int c,
                                       tern_grad_mode dx_mode, tern_pool *pool);

/* Inverted dropout with a precomputed mask: mask[i] is 0 or 1/(1-p); y = x * mask. The
 * caller draws the mask (see tern_rng) so kernels stay free of random state. */
void tern_dropout_forward(float *y, const float *x, const float *mask, size_t count);
void tern_dropout_backward(float *dx, const float *dy, const float *mask, size_t count);

/* ---- loss ----------------------------------------------------------------------------------- */

/* Softmax cross-entropy, mean over the batch, with label smoothing eps as PyTorch defines it:
 * target = (1 - eps) onehot(label) + eps / K. Returns the loss; if dlogits is not NULL it
 * is OVERWRITTEN with dLoss/dlogits (N, K). Labels must be in [0, K) (checked by the caller). */
float tern_cross_entropy(float *dlogits, const float *logits, const int32_t *labels, int n,
                         int k, float smoothing);

#endif
