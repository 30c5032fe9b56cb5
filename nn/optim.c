/* SGD over the model's flat parameter block, step for step as torch.optim.SGD. */
#include "tern/optim.h"

#include <string.h>

#include "util.h"

struct tern_sgd {
    tern_model *model;
    tern_sgd_options opt;
    float *momentum; /* one float per parameter, or NULL without momentum */
    bool started;    /* the momentum buffer holds a value */
};

tern_status tern_sgd_create(tern_model *model, const tern_sgd_options *opt, tern_sgd **out,
                            tern_error *err)
{
    if (!model || !opt || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    if (!(opt->lr > 0.0f) || !(opt->momentum >= 0.0f) || !(opt->dampening >= 0.0f) ||
        !(opt->weight_decay >= 0.0f))
        return tern_set_error(err, TERN_ERR_INVALID,
                              "SGD needs lr > 0 and momentum, dampening, weight decay >= 0");
    if (opt->nesterov && (opt->momentum <= 0.0f || opt->dampening != 0.0f))
        return tern_set_error(err, TERN_ERR_INVALID,
                              "Nesterov momentum needs momentum > 0 and zero dampening");
    const tern_allocator *a = tern_model_options_of(model)->alloc;
    tern_sgd *s = tern_calloc(a, 1, sizeof *s);
    if (!s)
        return tern_set_error(err, TERN_ERR_NOMEM, "out of memory");
    s->model = model;
    s->opt = *opt;
    if (opt->momentum > 0.0f) {
        s->momentum = tern_calloc(a, tern_model_param_count(model), sizeof(float));
        if (!s->momentum) {
            tern_free(a, s);
            return tern_set_error(err, TERN_ERR_NOMEM, "out of memory");
        }
    }
    *out = s;
    return TERN_OK;
}

void tern_sgd_destroy(tern_sgd **sgd)
{
    if (!sgd || !*sgd)
        return;
    const tern_allocator *a = tern_model_options_of((*sgd)->model)->alloc;
    tern_free(a, (*sgd)->momentum);
    tern_free(a, *sgd);
    *sgd = NULL;
}

void tern_sgd_set_lr(tern_sgd *sgd, float lr)
{
    sgd->opt.lr = lr;
}

float *tern_sgd_momentum(tern_sgd *sgd)
{
    return sgd->momentum;
}

void tern_sgd_step(tern_sgd *sgd)
{
    const tern_sgd_options *o = &sgd->opt;
    float *p = tern_model_params(sgd->model);
    const float *grad = tern_model_grads(sgd->model);
    float *buf = sgd->momentum;
    size_t n = tern_model_param_count(sgd->model);
    for (size_t i = 0; i < n; i++) {
        float g = grad[i];
        if (o->weight_decay != 0.0f)
            g += o->weight_decay * p[i];
        if (buf) {
            buf[i] = sgd->started ? o->momentum * buf[i] + (1.0f - o->dampening) * g : g;
            g = o->nesterov ? g + o->momentum * buf[i] : buf[i];
        }
        p[i] -= o->lr * g;
    }
    sgd->started = true;
}
