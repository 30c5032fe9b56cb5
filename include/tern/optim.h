/* Optimizers, learning-rate schedules and gradient clipping over a model's flat parameter and
 * gradient blocks.
 *
 * Each optimizer follows torch 1.13's single-tensor (foreach=False) implementation step for
 * step, with one parameter group holding every parameter (weight decay applies to all of
 * them, as in PyTorch's default group). With p the parameter, g its gradient, t the number of
 * steps taken including this one:
 *
 *   SGD      g += wd * p
 *            buf = g on the first step, else mu * buf + (1 - dampening) * g     (mu > 0)
 *            g = g + mu * buf (Nesterov) or buf                                 (mu > 0)
 *            p -= lr * g
 *   Adam     g += wd * p
 *            m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g * g
 *            vmax = max(vmax, v) and use vmax for v                             (amsgrad)
 *            p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 *   AdamW    p *= 1 - lr * wd (decoupled), then Adam without the g += wd * p
 *   RMSprop  g += wd * p
 *            sq = alpha * sq + (1 - alpha) * g * g
 *            ga = alpha * ga + (1 - alpha) * g;  avg = sqrt(sq - ga * ga) + eps  (centered)
 *            avg = sqrt(sq) + eps                                                (otherwise)
 *            buf = mu * buf + g / avg;  p -= lr * buf                           (mu > 0)
 *            p -= lr * g / avg                                                   (otherwise)
 *
 * Hyper-parameters are float32; scalar coefficients (1 - b1^t, lr / (1 - b1^t), ...) are
 * computed in double and rounded once, as PyTorch does with its Python-float hyper-parameters.
 *
 * Optimizer state lives in one flat block of tern_model_param_count floats per named state
 * ("momentum_buffer", "exp_avg", ...), zero before the first step, plus a step counter:
 * checkpointing is a loop over tern_optimizer_state_at (see tern/checkpoint.h). */
#ifndef TERN_OPTIM_H
#define TERN_OPTIM_H

#include <stdbool.h>
#include <stdint.h>

#include "tern/model.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- general optimizer ---------------------------------------------------------------------- */

typedef enum tern_optimizer_kind {
    TERN_OPTIMIZER_SGD,
    TERN_OPTIMIZER_ADAM,
    TERN_OPTIMIZER_ADAMW,
    TERN_OPTIMIZER_RMSPROP,
} tern_optimizer_kind;

/* "sgd", "adam", "adamw", "rmsprop"; static storage ("?" outside the enum). */
const char *tern_optimizer_kind_name(tern_optimizer_kind kind);
/* Inverse of tern_optimizer_kind_name; TERN_ERR_INVALID for anything else. */
tern_status tern_optimizer_kind_parse(const char *name, tern_optimizer_kind *out);

/* Hyper-parameters. Fields a kind does not use are ignored (and reported as 0 / false by
 * tern_optimizer_options_of). Ranges, checked by tern_optimizer_create:
 *   lr > 0; weight_decay >= 0 (every kind)
 *   SGD:     momentum >= 0, dampening >= 0, nesterov needs momentum > 0 and dampening == 0
 *   Adam(W): 0 <= beta1, beta2 < 1, eps >= 0, amsgrad
 *   RMSprop: 0 <= alpha <= 1, eps >= 0, momentum >= 0, centered */
typedef struct tern_optimizer_options {
    tern_optimizer_kind kind;
    float lr;
    float momentum;     /* SGD, RMSprop */
    float dampening;    /* SGD */
    float weight_decay; /* L2 added to the gradient; decoupled for AdamW */
    bool nesterov;      /* SGD */
    float beta1, beta2; /* Adam, AdamW */
    float eps;          /* Adam, AdamW, RMSprop */
    bool amsgrad;       /* Adam, AdamW */
    float alpha;        /* RMSprop smoothing constant */
    bool centered;      /* RMSprop */
} tern_optimizer_options;

/* torch.optim's defaults for kind. SGD: lr 0.01 (torch requires lr; Tern picks 0.01), no
 * momentum, no weight decay. Adam: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.
 * AdamW: as Adam with weight decay 1e-2. RMSprop: lr 1e-2, alpha 0.99, eps 1e-8. */
tern_optimizer_options tern_optimizer_options_default(tern_optimizer_kind kind);

typedef struct tern_optimizer tern_optimizer;

/* Optimizer for model's parameters; the model is borrowed and must outlive it. Allocates the
 * optimizer and one zeroed block for all its state. Errors: TERN_ERR_INVALID (NULL argument,
 * option out of range; detail in err), TERN_ERR_NOMEM. *out is untouched on failure. */
tern_status tern_optimizer_create(tern_model *model, const tern_optimizer_options *opt,
                                  tern_optimizer **out, tern_error *err);
/* Free the optimizer and its state; *opt becomes NULL. Accepts NULL. */
void tern_optimizer_destroy(tern_optimizer **opt);

/* One update from the model's current gradients (which it does not clear); tells the model its
 * parameters changed. Increments the step counter. */
void tern_optimizer_step(tern_optimizer *opt);
/* Learning rate for the following steps (a schedule's value, say): finite and >= 0, else the
 * call is ignored. */
void tern_optimizer_set_lr(tern_optimizer *opt, float lr);
float tern_optimizer_lr(const tern_optimizer *opt);
/* The hyper-parameters in force (the current lr included). Borrowed, valid for the
 * optimizer's life. */
const tern_optimizer_options *tern_optimizer_options_of(const tern_optimizer *opt);
/* The model the optimizer updates (borrowed). */
tern_model *tern_optimizer_model(const tern_optimizer *opt);

/* Named state blocks: SGD with momentum "momentum_buffer"; Adam/AdamW "exp_avg",
 * "exp_avg_sq" and with amsgrad "max_exp_avg_sq"; RMSprop "square_avg", with momentum
 * "momentum_buffer", centered "grad_avg" (in that order). SGD without momentum has none. */
size_t tern_optimizer_state_count(const tern_optimizer *opt);
/* i-th block: its name (static storage) and data (*count == tern_model_param_count floats,
 * borrowed for the optimizer's life, writable: restoring a checkpoint writes here). Any out
 * pointer may be NULL. TERN_ERR_INVALID if i is out of range. */
tern_status tern_optimizer_state_at(tern_optimizer *opt, size_t i, const char **name,
                                    float **data, size_t *count);
/* Block by name, or NULL. */
float *tern_optimizer_state_find(tern_optimizer *opt, const char *name);
/* Steps taken (since creation, the last reset, or as restored). It is Adam's bias-correction t
 * and tells SGD whether its momentum buffer holds a value (steps > 0: "started"). */
uint64_t tern_optimizer_steps(const tern_optimizer *opt);
void tern_optimizer_set_steps(tern_optimizer *opt, uint64_t steps);
/* Zero every state block and the step counter, as a freshly created optimizer. */
void tern_optimizer_reset(tern_optimizer *opt);

/* ---- SGD (compatibility layer over tern_optimizer) ------------------------------------------ */

typedef struct tern_sgd_options {
    float lr;           /* > 0 */
    float momentum;     /* >= 0 */
    float dampening;    /* >= 0 */
    float weight_decay; /* >= 0 */
    bool nesterov;      /* needs momentum > 0 and dampening == 0 */
} tern_sgd_options;

/* An SGD tern_optimizer: every tern_optimizer_* function accepts it. */
typedef tern_optimizer tern_sgd;

/* tern_optimizer_create with kind SGD and these options. Errors: TERN_ERR_INVALID, NOMEM. */
tern_status tern_sgd_create(tern_model *model, const tern_sgd_options *opt, tern_sgd **out,
                            tern_error *err);
void tern_sgd_destroy(tern_sgd **sgd);
void tern_sgd_step(tern_sgd *sgd);
void tern_sgd_set_lr(tern_sgd *sgd, float lr);
/* Momentum buffer (tern_model_param_count floats) or NULL without momentum; borrowed. */
float *tern_sgd_momentum(tern_sgd *sgd);

/* ---- learning-rate schedules ---------------------------------------------------------------- */

typedef enum tern_schedule_kind {
    TERN_SCHEDULE_CONSTANT, /* base_lr after warmup */
    TERN_SCHEDULE_STEP,     /* StepLR: base_lr * gamma^floor(t / step_size) */
    TERN_SCHEDULE_COSINE,   /* CosineAnnealingLR from base_lr to min_lr over the steps left */
} tern_schedule_kind;

/* A schedule as torch's SequentialLR([LinearLR(start_factor, 1.0, warmup_steps), main],
 * milestones=[warmup_steps]) computes it, main being the kind's scheduler, with t = step -
 * warmup_steps counted from the end of warmup. Stateless: the lr is a function of the step. */
typedef struct tern_schedule {
    tern_schedule_kind kind;
    float base_lr;             /* > 0 */
    long warmup_steps;         /* >= 0; 0: no warmup */
    float warmup_start_factor; /* (0, 1]: the lr of step 0 is base_lr * this */
    long step_size;            /* STEP: >= 1 */
    float gamma;               /* STEP: > 0 */
    long total_steps;          /* COSINE: > warmup_steps; after it the lr stays at min_lr */
    float min_lr;              /* COSINE: [0, base_lr] (torch's eta_min) */
} tern_schedule;

/* TERN_ERR_INVALID (detail in err) if a field the kind uses is out of range. */
tern_status tern_schedule_validate(const tern_schedule *s, tern_error *err);
/* Learning rate for the step with this 0-based index (the (step+1)-th optimizer step); steps
 * below 0 count as 0. Computed in double in closed form. The schedule must validate. */
float tern_schedule_lr(const tern_schedule *s, long step);

/* ---- gradient clipping ---------------------------------------------------------------------- */

/* As torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm): the L2 norm of all
 * gradients together (accumulated in double); when max_norm / (norm + 1e-6) < 1 every
 * gradient is multiplied by that factor. Returns the norm before clipping. A non-finite norm
 * (a NaN or infinite gradient) is returned with the gradients left untouched. */
float tern_clip_grad_norm(tern_model *model, float max_norm);

/* ---- weight averaging ----------------------------------------------------------------------- */

/* An exponential moving average of a model's parameters (the flat block), as used for DP-SGD
 * by De et al. 2022: after each optimizer step, avg = d * avg + (1 - d) * p with
 * d = min(decay, (1 + t) / (10 + t)), t being the number of updates before this one (the
 * warm-up of TensorFlow's ExponentialMovingAverage with num_updates, so that short runs are
 * not dominated by the initial weights). The average starts as a copy of the parameters and
 * is accumulated in double. Buffers (BatchNorm statistics) are not averaged. */
typedef struct tern_ema tern_ema;

/* decay in [0, 1). The model is borrowed and must outlive the handle. TERN_ERR_INVALID for a
 * NULL argument or decay out of range, TERN_ERR_NOMEM. */
tern_status tern_ema_create(tern_model *model, double decay, tern_ema **out, tern_error *err);
void tern_ema_destroy(tern_ema **ema);
/* Fold the model's current parameters into the average (ignored while swapped in). */
void tern_ema_update(tern_ema *ema);
/* Exchange the model's parameters with the average (rounded to float); a second call restores
 * them exactly. The model is invalidated (its inference folding redone). */
void tern_ema_swap(tern_ema *ema);
/* Updates taken so far. */
int64_t tern_ema_updates(const tern_ema *ema);

#ifdef __cplusplus
}
#endif

#endif
