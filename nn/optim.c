/* Optimizers (SGD, Adam, AdamW, RMSprop) as torch 1.13's single-tensor code computes them,
 * learning-rate schedules, and gradient-norm clipping.
 *
 * tern_optim_update is the only update loop: tern_optimizer_step runs it over the model's flat
 * blocks, the tests over small arrays against PyTorch's numbers. Element-wise arithmetic
 * follows PyTorch's kernels operation for operation (x.mul_(a).add_(g, alpha=b) is x * a + b *
 * g, addcdiv_ is x + (v * a) / b) so that results agree to a rounding or two; scalar
 * coefficients are computed in double and rounded to float once, as PyTorch does when it
 * passes a Python float to a float32 kernel. */
#include "tern/optim.h"

#include <math.h>
#include <string.h>

#include "optim_internal.h"
#include "util.h"

/* Each state block starts on a TERN_ALIGN boundary. */
#define STATE_ALIGN_FLOATS (TERN_ALIGN / sizeof(float))
#define PI 3.14159265358979323846

struct tern_optimizer {
    tern_model *model;
    tern_optimizer_options opt; /* validated, unused fields zero; lr changes with set_lr */
    size_t n;                   /* parameters */
    size_t stride;              /* floats between state blocks (n rounded up) */
    size_t nstate;
    const char *names[TERN_OPTIM_MAX_STATES];
    float *state; /* nstate blocks of stride floats, or NULL without state */
    uint64_t steps;
};

/* ---- options ------------------------------------------------------------------------------ */

const char *tern_optimizer_kind_name(tern_optimizer_kind kind)
{
    switch (kind) {
    case TERN_OPTIMIZER_SGD: return "sgd";
    case TERN_OPTIMIZER_ADAM: return "adam";
    case TERN_OPTIMIZER_ADAMW: return "adamw";
    case TERN_OPTIMIZER_RMSPROP: return "rmsprop";
    }
    return "?";
}

tern_status tern_optimizer_kind_parse(const char *name, tern_optimizer_kind *out)
{
    static const tern_optimizer_kind kinds[] = {TERN_OPTIMIZER_SGD, TERN_OPTIMIZER_ADAM,
                                                TERN_OPTIMIZER_ADAMW, TERN_OPTIMIZER_RMSPROP};
    if (!name || !out)
        return TERN_ERR_INVALID;
    for (size_t i = 0; i < sizeof kinds / sizeof *kinds; i++)
        if (strcmp(name, tern_optimizer_kind_name(kinds[i])) == 0) {
            *out = kinds[i];
            return TERN_OK;
        }
    return TERN_ERR_INVALID;
}

tern_optimizer_options tern_optimizer_options_default(tern_optimizer_kind kind)
{
    tern_optimizer_options o = {.kind = kind};
    switch (kind) {
    case TERN_OPTIMIZER_SGD:
        o.lr = 0.01f;
        break;
    case TERN_OPTIMIZER_ADAM:
    case TERN_OPTIMIZER_ADAMW:
        o.lr = 1e-3f;
        o.beta1 = 0.9f;
        o.beta2 = 0.999f;
        o.eps = 1e-8f;
        o.weight_decay = kind == TERN_OPTIMIZER_ADAMW ? 1e-2f : 0.0f;
        break;
    case TERN_OPTIMIZER_RMSPROP:
        o.lr = 1e-2f;
        o.alpha = 0.99f;
        o.eps = 1e-8f;
        break;
    }
    return o;
}

tern_status tern_optim_validate(const tern_optimizer_options *in, tern_optimizer_options *canon,
                                tern_error *err)
{
    const char *kind = tern_optimizer_kind_name(in->kind);
    if (strcmp(kind, "?") == 0)
        return tern_set_error(err, TERN_ERR_INVALID, "unknown optimizer kind %d", (int)in->kind);
    if (!(in->lr > 0.0f) || !isfinite(in->lr))
        return tern_set_error(err, TERN_ERR_INVALID, "%s: lr must be finite and > 0, got %g",
                              kind, (double)in->lr);
    if (!(in->weight_decay >= 0.0f) || !isfinite(in->weight_decay))
        return tern_set_error(err, TERN_ERR_INVALID, "%s: weight decay must be finite and >= 0",
                              kind);
    tern_optimizer_options o = {.kind = in->kind, .lr = in->lr, .weight_decay = in->weight_decay};
    switch (in->kind) {
    case TERN_OPTIMIZER_SGD:
        if (!(in->momentum >= 0.0f) || !(in->dampening >= 0.0f) || !isfinite(in->momentum) ||
            !isfinite(in->dampening))
            return tern_set_error(err, TERN_ERR_INVALID,
                                  "SGD needs lr > 0 and momentum, dampening, weight decay >= 0");
        if (in->nesterov && (in->momentum <= 0.0f || in->dampening != 0.0f))
            return tern_set_error(err, TERN_ERR_INVALID,
                                  "Nesterov momentum needs momentum > 0 and zero dampening");
        o.momentum = in->momentum;
        o.dampening = in->dampening;
        o.nesterov = in->nesterov;
        break;
    case TERN_OPTIMIZER_ADAM:
    case TERN_OPTIMIZER_ADAMW:
        if (!(in->beta1 >= 0.0f && in->beta1 < 1.0f) || !(in->beta2 >= 0.0f && in->beta2 < 1.0f))
            return tern_set_error(err, TERN_ERR_INVALID,
                                  "%s: betas must be in [0, 1), got (%g, %g)", kind,
                                  (double)in->beta1, (double)in->beta2);
        if (!(in->eps >= 0.0f) || !isfinite(in->eps))
            return tern_set_error(err, TERN_ERR_INVALID, "%s: eps must be finite and >= 0", kind);
        o.beta1 = in->beta1;
        o.beta2 = in->beta2;
        o.eps = in->eps;
        o.amsgrad = in->amsgrad;
        break;
    case TERN_OPTIMIZER_RMSPROP:
        if (!(in->alpha >= 0.0f && in->alpha <= 1.0f))
            return tern_set_error(err, TERN_ERR_INVALID, "rmsprop: alpha must be in [0, 1], got %g",
                                  (double)in->alpha);
        if (!(in->eps >= 0.0f) || !isfinite(in->eps) || !(in->momentum >= 0.0f) ||
            !isfinite(in->momentum))
            return tern_set_error(err, TERN_ERR_INVALID,
                                  "rmsprop: eps and momentum must be finite and >= 0");
        o.alpha = in->alpha;
        o.eps = in->eps;
        o.momentum = in->momentum;
        o.centered = in->centered;
        break;
    }
    if (canon)
        *canon = o;
    return TERN_OK;
}

size_t tern_optim_state_names(const tern_optimizer_options *o,
                              const char *names[TERN_OPTIM_MAX_STATES])
{
    size_t k = 0;
    switch (o->kind) {
    case TERN_OPTIMIZER_SGD:
        if (o->momentum > 0.0f)
            names[k++] = "momentum_buffer";
        break;
    case TERN_OPTIMIZER_ADAM:
    case TERN_OPTIMIZER_ADAMW:
        names[k++] = "exp_avg";
        names[k++] = "exp_avg_sq";
        if (o->amsgrad)
            names[k++] = "max_exp_avg_sq";
        break;
    case TERN_OPTIMIZER_RMSPROP:
        names[k++] = "square_avg";
        if (o->momentum > 0.0f)
            names[k++] = "momentum_buffer";
        if (o->centered)
            names[k++] = "grad_avg";
        break;
    }
    return k;
}

/* ---- the update ---------------------------------------------------------------------------- */

static void sgd_update(const tern_optimizer_options *o, bool first, float *p, const float *g,
                       float *buf, size_t n)
{
    const float wd = o->weight_decay, mu = o->momentum, neg_lr = -o->lr;
    const float keep = (float)(1.0 - (double)o->dampening);
    for (size_t i = 0; i < n; i++) {
        float d = g[i];
        if (wd != 0.0f)
            d = d + wd * p[i];
        if (buf) {
            buf[i] = first ? d : buf[i] * mu + keep * d;
            d = o->nesterov ? d + mu * buf[i] : buf[i];
        }
        p[i] = p[i] + neg_lr * d;
    }
}

static void adam_update(const tern_optimizer_options *o, uint64_t step, float *p, const float *g,
                        float *m, float *v, float *vmax, size_t n)
{
    const bool decoupled = o->kind == TERN_OPTIMIZER_ADAMW;
    const double lr = o->lr, b1 = o->beta1, b2 = o->beta2, t = (double)step;
    const double bias1 = 1.0 - pow(b1, t), bias2 = 1.0 - pow(b2, t);
    const float beta1 = o->beta1, beta2 = o->beta2, eps = o->eps, wd = o->weight_decay;
    const float one_minus_b1 = (float)(1.0 - b1), one_minus_b2 = (float)(1.0 - b2);
    const float neg_step = (float)-(lr / bias1), bias2_sqrt = (float)sqrt(bias2);
    const float decay = (float)(1.0 - lr * (double)o->weight_decay);
    for (size_t i = 0; i < n; i++) {
        float gi = g[i];
        if (decoupled)
            p[i] = p[i] * decay;
        else if (wd != 0.0f)
            gi = gi + wd * p[i];
        m[i] = m[i] * beta1 + one_minus_b1 * gi;
        v[i] = v[i] * beta2 + one_minus_b2 * gi * gi;
        float second = v[i];
        if (vmax) {
            /* torch.maximum: NaN wins */
            if (!(vmax[i] >= v[i]))
                vmax[i] = v[i];
            second = vmax[i];
        }
        float denom = sqrtf(second) / bias2_sqrt + eps;
        p[i] = p[i] + neg_step * m[i] / denom;
    }
}

static void rmsprop_update(const tern_optimizer_options *o, float *p, const float *g, float *sq,
                           float *buf, float *gavg, size_t n)
{
    const float alpha = o->alpha, one_minus_alpha = (float)(1.0 - (double)o->alpha);
    const float eps = o->eps, wd = o->weight_decay, mu = o->momentum, neg_lr = -o->lr;
    for (size_t i = 0; i < n; i++) {
        float gi = g[i];
        if (wd != 0.0f)
            gi = gi + wd * p[i];
        sq[i] = sq[i] * alpha + one_minus_alpha * gi * gi;
        float avg;
        if (gavg) {
            gavg[i] = gavg[i] * alpha + one_minus_alpha * gi;
            avg = sqrtf(sq[i] - gavg[i] * gavg[i]);
        } else {
            avg = sqrtf(sq[i]);
        }
        avg = avg + eps;
        if (buf) {
            buf[i] = buf[i] * mu + gi / avg;
            p[i] = p[i] + neg_lr * buf[i];
        } else {
            p[i] = p[i] + neg_lr * gi / avg;
        }
    }
}

void tern_optim_update(const tern_optimizer_options *o, uint64_t step, float *p, const float *g,
                       float *const *state, size_t n)
{
    switch (o->kind) {
    case TERN_OPTIMIZER_SGD:
        sgd_update(o, step <= 1, p, g, o->momentum > 0.0f ? state[0] : NULL, n);
        break;
    case TERN_OPTIMIZER_ADAM:
    case TERN_OPTIMIZER_ADAMW:
        adam_update(o, step, p, g, state[0], state[1], o->amsgrad ? state[2] : NULL, n);
        break;
    case TERN_OPTIMIZER_RMSPROP: {
        size_t k = 1;
        float *buf = o->momentum > 0.0f ? state[k++] : NULL;
        float *gavg = o->centered ? state[k] : NULL;
        rmsprop_update(o, p, g, state[0], buf, gavg, n);
        break;
    }
    }
}

/* ---- tern_optimizer ------------------------------------------------------------------------ */

tern_status tern_optimizer_create(tern_model *model, const tern_optimizer_options *opt,
                                  tern_optimizer **out, tern_error *err)
{
    if (!model || !opt || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    tern_optimizer_options o;
    tern_status s = tern_optim_validate(opt, &o, err);
    if (s != TERN_OK)
        return s;
    const tern_allocator *a = tern_model_options_of(model)->alloc;
    size_t n = tern_model_param_count(model);
    size_t stride = (n + STATE_ALIGN_FLOATS - 1) / STATE_ALIGN_FLOATS * STATE_ALIGN_FLOATS;
    const char *names[TERN_OPTIM_MAX_STATES];
    size_t nstate = tern_optim_state_names(&o, names), floats, bytes;
    if (stride < n || !tern_mul_size(stride, nstate, &floats) ||
        !tern_mul_size(floats, sizeof(float), &bytes))
        return tern_set_error(err, TERN_ERR_NOMEM, "optimizer state size overflows");
    tern_optimizer *r = tern_calloc(a, 1, sizeof *r);
    if (!r)
        return tern_set_error(err, TERN_ERR_NOMEM, "out of memory (optimizer)");
    if (nstate > 0) {
        r->state = tern_calloc(a, floats, sizeof(float));
        if (!r->state) {
            tern_free(a, r);
            return tern_set_error(err, TERN_ERR_NOMEM, "out of memory (%zu floats of %s state)",
                                  floats, tern_optimizer_kind_name(o.kind));
        }
    }
    r->model = model;
    r->opt = o;
    r->n = n;
    r->stride = stride;
    r->nstate = nstate;
    memcpy(r->names, names, sizeof names);
    *out = r;
    return TERN_OK;
}

void tern_optimizer_destroy(tern_optimizer **opt)
{
    if (!opt || !*opt)
        return;
    const tern_allocator *a = tern_model_options_of((*opt)->model)->alloc;
    tern_free(a, (*opt)->state);
    tern_free(a, *opt);
    *opt = NULL;
}

void tern_optimizer_step(tern_optimizer *opt)
{
    float *state[TERN_OPTIM_MAX_STATES] = {NULL};
    for (size_t k = 0; k < opt->nstate; k++)
        state[k] = opt->state + k * opt->stride;
    opt->steps++;
    /* tern_model_params marks the parameters changed (BatchNorm folding is redone). */
    tern_optim_update(&opt->opt, opt->steps, tern_model_params(opt->model),
                      tern_model_grads(opt->model), state, opt->n);
}

void tern_optimizer_set_lr(tern_optimizer *opt, float lr)
{
    if (lr >= 0.0f && isfinite(lr))
        opt->opt.lr = lr;
}

void tern_optim_set_options(tern_optimizer *opt, const tern_optimizer_options *o)
{
    opt->opt = *o;
}

float tern_optimizer_lr(const tern_optimizer *opt)
{
    return opt->opt.lr;
}

const tern_optimizer_options *tern_optimizer_options_of(const tern_optimizer *opt)
{
    return &opt->opt;
}

tern_model *tern_optimizer_model(const tern_optimizer *opt)
{
    return opt->model;
}

size_t tern_optimizer_state_count(const tern_optimizer *opt)
{
    return opt->nstate;
}

tern_status tern_optimizer_state_at(tern_optimizer *opt, size_t i, const char **name,
                                    float **data, size_t *count)
{
    if (!opt || i >= opt->nstate)
        return TERN_ERR_INVALID;
    if (name)
        *name = opt->names[i];
    if (data)
        *data = opt->state + i * opt->stride;
    if (count)
        *count = opt->n;
    return TERN_OK;
}

float *tern_optimizer_state_find(tern_optimizer *opt, const char *name)
{
    for (size_t k = 0; name && k < opt->nstate; k++)
        if (strcmp(opt->names[k], name) == 0)
            return opt->state + k * opt->stride;
    return NULL;
}

uint64_t tern_optimizer_steps(const tern_optimizer *opt)
{
    return opt->steps;
}

void tern_optimizer_set_steps(tern_optimizer *opt, uint64_t steps)
{
    opt->steps = steps;
}

void tern_optimizer_reset(tern_optimizer *opt)
{
    if (opt->state)
        memset(opt->state, 0, opt->nstate * opt->stride * sizeof(float));
    opt->steps = 0;
}

/* ---- SGD compatibility layer --------------------------------------------------------------- */

tern_status tern_sgd_create(tern_model *model, const tern_sgd_options *opt, tern_sgd **out,
                            tern_error *err)
{
    if (!opt)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    tern_optimizer_options o = {.kind = TERN_OPTIMIZER_SGD, .lr = opt->lr,
                                .momentum = opt->momentum, .dampening = opt->dampening,
                                .weight_decay = opt->weight_decay, .nesterov = opt->nesterov};
    return tern_optimizer_create(model, &o, out, err);
}

void tern_sgd_destroy(tern_sgd **sgd)
{
    tern_optimizer_destroy(sgd);
}

void tern_sgd_step(tern_sgd *sgd)
{
    tern_optimizer_step(sgd);
}

void tern_sgd_set_lr(tern_sgd *sgd, float lr)
{
    tern_optimizer_set_lr(sgd, lr);
}

float *tern_sgd_momentum(tern_sgd *sgd)
{
    return tern_optimizer_state_find(sgd, "momentum_buffer");
}

/* ---- schedules ----------------------------------------------------------------------------- */

tern_status tern_schedule_validate(const tern_schedule *s, tern_error *err)
{
    if (!s)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL schedule");
    if (!(s->base_lr > 0.0f) || !isfinite(s->base_lr))
        return tern_set_error(err, TERN_ERR_INVALID, "schedule: base lr must be finite and > 0");
    if (s->warmup_steps < 0)
        return tern_set_error(err, TERN_ERR_INVALID, "schedule: warmup steps must be >= 0");
    if (s->warmup_steps > 0 && !(s->warmup_start_factor > 0.0f && s->warmup_start_factor <= 1.0f))
        return tern_set_error(err, TERN_ERR_INVALID,
                              "schedule: warmup start factor must be in (0, 1], got %g",
                              (double)s->warmup_start_factor);
    switch (s->kind) {
    case TERN_SCHEDULE_CONSTANT:
        return TERN_OK;
    case TERN_SCHEDULE_STEP:
        if (s->step_size < 1 || !(s->gamma > 0.0f) || !isfinite(s->gamma))
            return tern_set_error(err, TERN_ERR_INVALID,
                                  "step schedule: needs step size >= 1 and gamma > 0");
        return TERN_OK;
    case TERN_SCHEDULE_COSINE:
        if (s->total_steps <= s->warmup_steps)
            return tern_set_error(err, TERN_ERR_INVALID,
                                  "cosine schedule: total steps (%ld) must exceed warmup "
                                  "steps (%ld)", s->total_steps, s->warmup_steps);
        if (!(s->min_lr >= 0.0f && s->min_lr <= s->base_lr))
            return tern_set_error(err, TERN_ERR_INVALID,
                                  "cosine schedule: min lr must be in [0, base lr]");
        return TERN_OK;
    }
    return tern_set_error(err, TERN_ERR_INVALID, "unknown schedule kind %d", (int)s->kind);
}

float tern_schedule_lr(const tern_schedule *s, long step)
{
    const double base = s->base_lr;
    if (step < 0)
        step = 0;
    if (step < s->warmup_steps) {
        /* LinearLR's closed form: factor from start to 1 over warmup_steps. */
        double f0 = s->warmup_start_factor;
        return (float)(base * (f0 + (1.0 - f0) * (double)step / (double)s->warmup_steps));
    }
    long t = step - s->warmup_steps;
    switch (s->kind) {
    case TERN_SCHEDULE_CONSTANT:
        break;
    case TERN_SCHEDULE_STEP:
        return (float)(base * pow((double)s->gamma, (double)(t / s->step_size)));
    case TERN_SCHEDULE_COSINE: {
        long span = s->total_steps - s->warmup_steps;
        double lo = s->min_lr;
        if (t >= span)
            return s->min_lr;
        return (float)(lo + (base - lo) * (1.0 + cos(PI * (double)t / (double)span)) / 2.0);
    }
    }
    return s->base_lr;
}

/* ---- clipping ------------------------------------------------------------------------------ */

float tern_clip_grad_norm(tern_model *model, float max_norm)
{
    float *g = tern_model_grads(model);
    size_t n = tern_model_param_count(model);
    double sum = 0.0;
    for (size_t i = 0; i < n; i++)
        sum += (double)g[i] * (double)g[i];
    double norm = sqrt(sum);
    if (!isfinite(norm))
        return (float)norm;
    double coef = (double)max_norm / (norm + 1e-6);
    if (coef < 1.0) {
        float c = (float)coef;
        for (size_t i = 0; i < n; i++)
            g[i] *= c;
    }
    return (float)norm;
}

/* ---- weight averaging ----------------------------------------------------------------------- */

struct tern_ema {
    tern_model *model;
    double decay;
    int64_t updates;
    size_t n;
    double *avg;  /* (n) the average */
    float *saved; /* (n) the model's own parameters while the average is swapped in */
    bool swapped;
};

tern_status tern_ema_create(tern_model *model, double decay, tern_ema **out, tern_error *err)
{
    if (!model || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    if (!(decay >= 0 && decay < 1))
        return tern_set_error(err, TERN_ERR_INVALID, "EMA decay %g is not in [0, 1)", decay);
    const tern_allocator *a = tern_model_options_of(model)->alloc;
    size_t n = tern_model_param_count(model);
    tern_ema *e = tern_calloc(a, 1, sizeof *e);
    if (!e)
        return tern_set_error(err, TERN_ERR_NOMEM, "out of memory (EMA)");
    e->avg = tern_calloc(a, n ? n : 1, sizeof *e->avg);
    e->saved = tern_calloc(a, n ? n : 1, sizeof *e->saved);
    if (!e->avg || !e->saved) {
        tern_free(a, e->avg);
        tern_free(a, e->saved);
        tern_free(a, e);
        return tern_set_error(err, TERN_ERR_NOMEM, "out of memory (EMA of %zu parameters)", n);
    }
    e->model = model;
    e->decay = decay;
    e->n = n;
    const float *p = tern_model_params(model);
    for (size_t i = 0; i < n; i++)
        e->avg[i] = p[i];
    *out = e;
    return TERN_OK;
}

void tern_ema_destroy(tern_ema **ema)
{
    if (!ema || !*ema)
        return;
    const tern_allocator *a = tern_model_options_of((*ema)->model)->alloc;
    tern_free(a, (*ema)->avg);
    tern_free(a, (*ema)->saved);
    tern_free(a, *ema);
    *ema = NULL;
}

void tern_ema_update(tern_ema *ema)
{
    if (!ema || ema->swapped)
        return;
    double warm = (1.0 + (double)ema->updates) / (10.0 + (double)ema->updates);
    double d = ema->decay < warm ? ema->decay : warm;
    const float *p = tern_model_params(ema->model);
    for (size_t i = 0; i < ema->n; i++)
        ema->avg[i] = d * ema->avg[i] + (1.0 - d) * (double)p[i];
    ema->updates++;
}

void tern_ema_swap(tern_ema *ema)
{
    if (!ema)
        return;
    float *p = tern_model_params(ema->model);
    if (!ema->swapped) {
        memcpy(ema->saved, p, sizeof *p * ema->n);
        for (size_t i = 0; i < ema->n; i++)
            p[i] = (float)ema->avg[i];
    } else {
        memcpy(p, ema->saved, sizeof *p * ema->n);
    }
    ema->swapped = !ema->swapped;
    tern_model_invalidate(ema->model);
}

int64_t tern_ema_updates(const tern_ema *ema)
{
    return ema ? ema->updates : 0;
}
