/* DP-SGD: differentially private gradients for a tern_model, as Opacus computes them.
 *
 * One step (tern_dp_step_grads) on a Poisson-sampled batch:
 *   1. each sample's gradient g_n of its own loss (cross-entropy, label smoothing as given);
 *   2. clipped to L2 norm C over all parameters together: g_n * min(1, C / (|g_n| + 1e-6));
 *   3. summed, plus Gaussian noise N(0, (sigma C)^2) on every coordinate;
 *   4. divided by the EXPECTED batch size q N (not the sampled one);
 * the result is left in tern_model_grads(), so any tern_optimizer can step on it, and the step
 * is recorded in an accountant (tern/privacy.h) at (sigma, q).
 *
 * Per-sample gradients are never formed by running samples one at a time. One training forward
 * and one backward give every op's input x and output gradient dy for all samples at once;
 * each sample's squared gradient norm is then computed per layer from (x_n, dy_n):
 *   linear (classifier, squeeze-and-excitation): |dy_n|^2 (|x_n|^2 + 1), exactly;
 *   pointwise convolutions: the "ghost norm" sum_pq (x_p . x_q)(dy_p . dy_q) over positions
 *     when H*W is small, else the per-sample weight gradient dy_n^T x_n, materialized by a GEMM
 *     and squared, whichever costs less for the layer's shape;
 *   depthwise and stem convolutions: the per-sample weight gradient, materialized (C k k
 *     floats) by the convolution's own backward kernel, and kept;
 *   GroupNorm: per-sample d gamma and d beta, materialized (2 C floats) and kept.
 * The clipped sum sum_n f_n g_n (f_n = min(1, C / (|g_n| + 1e-6))) is then, for the kept
 * per-sample gradients, their weighted sum; for linear and pointwise layers, one
 * weight-gradient GEMM over the batch with dy_n scaled by f_n. That is exact because every op
 * of the network acts on each sample alone (GroupNorm, not BatchNorm): scaling sample n's
 * dlogits by f_n would scale its dy at every layer by f_n, so no second backward through the
 * network is needed. Cost: one forward, one backward, the norms and one weight-gradient pass
 * of the GEMM layers. Work is split over the model's threads; results are bitwise reproducible
 * for a given thread count and seed.
 *
 * BatchNorm mixes samples through its batch statistics, so DP-SGD refuses models built with
 * TERN_NORM_BATCH: build them with TERN_NORM_GROUP (GroupNorm with gcd(32, C) groups, as
 * Opacus's replacement).
 *
 * Randomness (the Poisson sampling of batches and the noise) comes from the handle's own
 * xoshiro256** generator seeded through splitmix64 from options.seed; normal deviates by the
 * ziggurat method (Marsaglia and Tsang 2000, 128 layers, Doornik's 2005 independent layer
 * bits, 53-bit abscissas, exact tail) in double precision, added to the float gradients. It is not a cryptographically secure generator: seed it
 * from a secret source (the tern tool reads /dev/urandom), and see docs/privacy.md.
 *
 * Not thread-safe: one caller at a time per handle, and the model must not be used by anyone
 * else during a call. */
#ifndef TERN_DPSGD_H
#define TERN_DPSGD_H

#include <stddef.h>
#include <stdint.h>

#include "tern/model.h"
#include "tern/privacy.h"
#include "tern/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tern_dp_options {
    double max_grad_norm;    /* C > 0: per-sample clipping norm */
    double noise_multiplier; /* sigma >= 0: noise std / C. 0 adds no noise and spends an
                              * unbounded budget (epsilon INFINITY): for tests and baselines */
    double sample_rate;      /* q in (0, 1]: Poisson sampling probability of each example */
    double expected_batch;   /* > 0: the divisor, q * dataset size */
    float label_smoothing;   /* [0, 1], as tern_cross_entropy_loss */
    uint64_t seed;           /* Poisson sampling and noise */
    tern_accountant_options accountant; /* zero: RDP with Opacus's orders */
} tern_dp_options;

typedef struct tern_dp tern_dp;

/* A DP-SGD driver for model (borrowed; must outlive the handle). Errors: TERN_ERR_INVALID
 * (options out of range, or a model with BatchNorm: the message says to use GroupNorm),
 * TERN_ERR_NOMEM. *out is untouched on failure; err (may be NULL) gets the detail. */
tern_status tern_dp_create(tern_model *model, const tern_dp_options *options, tern_dp **out,
                           tern_error *err);
/* Frees the handle; *dp becomes NULL. Accepts NULL. */
void tern_dp_destroy(tern_dp **dp);

/* Poisson sampling of one batch from a dataset of n examples: each index in [0, n) is kept
 * independently with probability q, in increasing order. indices holds n entries; *count gets
 * the number kept (0 is possible: the step is then noise only). TERN_ERR_INVALID for NULL. */
tern_status tern_dp_sample(tern_dp *dp, size_t n, size_t *indices, size_t *count);

/* One DP-SGD gradient on `batch` samples (batch >= 0; may exceed the model's planned batch:
 * it is processed in chunks of the planned size).
 *   input  (batch, H, W, in_channels) NHWC, at the planned H and W; labels (batch)
 * Leaves (sum of clipped per-sample gradients + noise) / expected_batch in tern_model_grads()
 * (overwriting them), records the step in the accountant, and sets *loss (may be NULL) to the
 * mean loss over the batch (0 for an empty batch). The model needs a training plan
 * (tern_model_plan(..., true)); the first call after a new plan allocates. Errors:
 * TERN_ERR_INVALID (arguments, labels out of range), TERN_ERR_STATE (no training plan),
 * TERN_ERR_NOMEM; the model's gradients are unspecified after a failure and no step is
 * recorded. */
tern_status tern_dp_step_grads(tern_dp *dp, const float *input, const int32_t *labels, int batch,
                               float *loss);

/* Per-sample gradient norms without clipping, noise or accounting (for choosing C, and tests):
 * norms (batch) receives each sample's L2 gradient norm over all parameters; tensor_sq (may be
 * NULL) (batch, P) each sample's squared norm per parameter tensor, P being the number of
 * TERN_TENSOR_PARAM tensors, in state_dict order. 1 <= batch <= the planned batch. The
 * model's gradients are overwritten (with the unclipped batch sum). Errors as
 * tern_dp_step_grads. */
tern_status tern_dp_sample_norms(tern_dp *dp, const float *input, const int32_t *labels,
                                 int batch, float *norms, double *tensor_sq);

/* Clip factors min(1, C / (norm + 1e-6)) of the last chunk of the last step or norms call
 * (the whole batch when it fitted the plan), and their count. Borrowed until the next call. */
const float *tern_dp_last_factors(const tern_dp *dp, int *count);

/* Epsilon spent so far at delta (INFINITY once a step without noise was taken). Errors of
 * tern_accountant_spent; the detail is in tern_dp_last_error. */
tern_status tern_dp_epsilon(tern_dp *dp, double delta, double *epsilon);
/* The accountant recording the steps (borrowed; valid for the handle's life). */
tern_accountant *tern_dp_accountant(tern_dp *dp);
/* Steps taken (including empty batches). */
int64_t tern_dp_steps(const tern_dp *dp);
const tern_dp_options *tern_dp_options_of(const tern_dp *dp);
/* Detail of the last failure ("" if none); borrowed until the next call. */
const char *tern_dp_last_error(const tern_dp *dp);

#ifdef __cplusplus
}
#endif

#endif
