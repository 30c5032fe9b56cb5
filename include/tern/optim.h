/* Optimizers over a model's flat parameter and gradient blocks.
 *
 * SGD follows torch.optim.SGD exactly: with weight decay wd, momentum mu, dampening tau,
 *   g = grad + wd * p
 *   buf = g on the first step, else mu * buf + (1 - tau) * g
 *   g = g + mu * buf (Nesterov) or buf (otherwise; g itself when mu == 0)
 *   p -= lr * g
 * Weight decay applies to every parameter, as in PyTorch's default parameter group. */
#ifndef TERN_OPTIM_H
#define TERN_OPTIM_H

#include <stdbool.h>

#include "tern/model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tern_sgd_options {
    float lr;           /* > 0 */
    float momentum;     /* >= 0 */
    float dampening;    /* >= 0 */
    float weight_decay; /* >= 0 */
    bool nesterov;      /* needs momentum > 0 and dampening == 0 */
} tern_sgd_options;

typedef struct tern_sgd tern_sgd;

/* Optimizer for model's parameters; the model is borrowed and must outlive it. Allocates the
 * momentum buffer (one flat block) when momentum > 0. Errors: TERN_ERR_INVALID, NOMEM. */
tern_status tern_sgd_create(tern_model *model, const tern_sgd_options *opt, tern_sgd **out,
                            tern_error *err);
void tern_sgd_destroy(tern_sgd **sgd);
/* One update from the model's current gradients (which it does not clear). */
void tern_sgd_step(tern_sgd *sgd);
void tern_sgd_set_lr(tern_sgd *sgd, float lr);
/* Momentum buffer (tern_model_param_count floats) or NULL without momentum; borrowed. */
float *tern_sgd_momentum(tern_sgd *sgd);

#ifdef __cplusplus
}
#endif

#endif
