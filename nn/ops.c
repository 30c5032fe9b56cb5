/* The non-convolution kernels of nn/kernels.h: batch and group normalization, activations,
 * residual add, global average pooling, the squeeze-and-excitation channel scale, dropout and
 * the cross-entropy loss. Activations are NHWC, so per-channel work walks rows of C contiguous
 * floats and the inner loops run over channels.
 *
 * Threading: every reduction belongs to exactly one thread (normalization statistics are split
 * by channel or by (sample, group), never by row), and each reduction runs in a fixed order.
 * Results are therefore bitwise identical for any thread count, which is stronger than the
 * header promises. Reductions accumulate in double, as PyTorch's CPU kernels do for float. */
#include <math.h>
#include <string.h>

#include "kernels.h"
#include "util.h"

/* Channels reduced together: their double accumulators live on the stack. */
#define CHUNK 64
/* Below this many floats touched, waking the pool costs more than the work. */
#define INLINE_MAX ((size_t)1 << 15)

static void run(tern_pool *pool, size_t work, tern_task_fn fn, void *arg)
{
    tern_pool_run(work < INLINE_MAX ? NULL : pool, fn, arg);
}

static size_t min_size(size_t a, size_t b)
{
    return a < b ? a : b;
}

/* ---- batch normalization -------------------------------------------------------------- */

typedef struct {
    float *y, *save_mean, *save_invstd, *run_mean, *run_var; /* (m, c), (c) x4 */
    const float *x, *gamma, *beta, *mean, *var;              /* (m, c), (c) x4 */
    size_t m;
    int c;
    float eps, momentum;
} bn_args;

/* y = (x - mean) * alpha + beta per channel, alpha = gamma * invstd. PyTorch folds mean into
 * the shift (x * alpha + (beta - mean * alpha)), which cancels catastrophically when |mean| is
 * large next to the spread; centring first costs one subtraction and keeps full precision. */
static void bn_apply(float *y, const float *x, const float *mean, const float *alpha,
                     const float *beta, size_t m, size_t c, size_t c0, size_t nc)
{
    for (size_t r = 0; r < m; r++) {
        const float *xr = x + r * c + c0;
        float *yr = y + r * c + c0;
        for (size_t j = 0; j < nc; j++)
            yr[j] = (xr[j] - mean[j]) * alpha[j] + beta[j];
    }
}

static void bn_train_task(void *arg, int ith, int nth)
{
    const bn_args *a = arg;
    size_t m = a->m, c = (size_t)a->c, cb, ce;
    tern_split(c, ith, nth, &cb, &ce);
    for (size_t c0 = cb; c0 < ce; c0 += CHUNK) {
        size_t nc = min_size(CHUNK, ce - c0);
        double mean[CHUNK] = {0}, sq[CHUNK] = {0};
        float alpha[CHUNK];
        /* Two passes (mean, then squared deviations): no cancellation for large means. */
        for (size_t r = 0; r < m; r++) {
            const float *xr = a->x + r * c + c0;
            for (size_t j = 0; j < nc; j++)
                mean[j] += xr[j];
        }
        for (size_t j = 0; j < nc; j++)
            mean[j] /= (double)m;
        for (size_t r = 0; r < m; r++) {
            const float *xr = a->x + r * c + c0;
            for (size_t j = 0; j < nc; j++) {
                double d = xr[j] - mean[j];
                sq[j] += d * d;
            }
        }
        double mom = a->momentum;
        for (size_t j = 0; j < nc; j++) {
            size_t ch = c0 + j;
            double var = sq[j] / (double)m;
            double unbiased = m > 1 ? sq[j] / (double)(m - 1) : var;
            float invstd = (float)(1.0 / sqrt(var + (double)a->eps));
            a->save_mean[ch] = (float)mean[j];
            a->save_invstd[ch] = invstd;
            a->run_mean[ch] = (float)(mom * mean[j] + (1 - mom) * a->run_mean[ch]);
            a->run_var[ch] = (float)(mom * unbiased + (1 - mom) * a->run_var[ch]);
            alpha[j] = a->gamma[ch] * invstd;
        }
        bn_apply(a->y, a->x, a->save_mean + c0, alpha, a->beta + c0, m, c, c0, nc);
    }
}

void tern_batchnorm_forward_train(float *y, float *save_mean, float *save_invstd,
                                  float *run_mean, float *run_var, const float *x,
                                  const float *gamma, const float *beta, size_t m, int c,
                                  float eps, float momentum, tern_pool *pool)
{
    bn_args a = {.y = y, .save_mean = save_mean, .save_invstd = save_invstd,
                 .run_mean = run_mean, .run_var = run_var, .x = x, .gamma = gamma,
                 .beta = beta, .m = m, .c = c, .eps = eps, .momentum = momentum};
    run(pool, m * (size_t)c, bn_train_task, &a);
}

static void bn_eval_task(void *arg, int ith, int nth)
{
    const bn_args *a = arg;
    size_t c = (size_t)a->c, cb, ce;
    tern_split(c, ith, nth, &cb, &ce);
    for (size_t c0 = cb; c0 < ce; c0 += CHUNK) {
        size_t nc = min_size(CHUNK, ce - c0);
        float alpha[CHUNK];
        for (size_t j = 0; j < nc; j++)
            alpha[j] = a->gamma[c0 + j] / sqrtf(a->var[c0 + j] + a->eps);
        bn_apply(a->y, a->x, a->mean + c0, alpha, a->beta + c0, a->m, c, c0, nc);
    }
}

void tern_batchnorm_forward_eval(float *y, const float *x, const float *gamma,
                                 const float *beta, const float *run_mean, const float *run_var,
                                 size_t m, int c, float eps, tern_pool *pool)
{
    bn_args a = {.y = y, .x = x, .gamma = gamma, .beta = beta, .mean = run_mean,
                 .var = run_var, .m = m, .c = c, .eps = eps};
    run(pool, m * (size_t)c, bn_eval_task, &a);
}

typedef struct {
    float *dx, *dgamma, *dbeta;                        /* (m, c), (c), (c) */
    const float *dy, *x, *mean, *invstd, *gamma;       /* (m, c) x2, (c) x3 */
    size_t m;
    int c;
} bn_back_args;

static void bn_backward_task(void *arg, int ith, int nth)
{
    const bn_back_args *a = arg;
    size_t m = a->m, c = (size_t)a->c, cb, ce;
    tern_split(c, ith, nth, &cb, &ce);
    for (size_t c0 = cb; c0 < ce; c0 += CHUNK) {
        size_t nc = min_size(CHUNK, ce - c0);
        const float *mean = a->mean + c0, *invstd = a->invstd + c0;
        double sum[CHUNK] = {0}, dotp[CHUNK] = {0}; /* sum dy, sum dy * (x - mean) */
        for (size_t r = 0; r < m; r++) {
            const float *xr = a->x + r * c + c0, *dyr = a->dy + r * c + c0;
            for (size_t j = 0; j < nc; j++) {
                sum[j] += dyr[j];
                dotp[j] += (double)dyr[j] * (xr[j] - mean[j]);
            }
        }
        for (size_t j = 0; j < nc; j++) {
            if (a->dgamma)
                a->dgamma[c0 + j] += (float)(dotp[j] * invstd[j]);
            if (a->dbeta)
                a->dbeta[c0 + j] += (float)sum[j];
        }
        if (!a->dx)
            continue;
        /* dx = (dy - mean(dy) - xhat * mean(dy * xhat)) * invstd * gamma, written with the
         * centred input as PyTorch does: k scales (x - mean) back to xhat's projection. */
        float k[CHUNK], dy_mean[CHUNK], scale[CHUNK];
        for (size_t j = 0; j < nc; j++) {
            double is = invstd[j];
            k[j] = (float)(dotp[j] * is * is / (double)m);
            dy_mean[j] = (float)(sum[j] / (double)m);
            scale[j] = invstd[j] * a->gamma[c0 + j];
        }
        for (size_t r = 0; r < m; r++) {
            const float *xr = a->x + r * c + c0, *dyr = a->dy + r * c + c0;
            float *dxr = a->dx + r * c + c0;
            for (size_t j = 0; j < nc; j++)
                dxr[j] += (dyr[j] - dy_mean[j] - (xr[j] - mean[j]) * k[j]) * scale[j];
        }
    }
}

void tern_batchnorm_backward(float *dx, float *dgamma, float *dbeta, const float *dy,
                             const float *x, const float *save_mean, const float *save_invstd,
                             const float *gamma, size_t m, int c, tern_pool *pool)
{
    if (!dx && !dgamma && !dbeta)
        return;
    bn_back_args a = {.dx = dx, .dgamma = dgamma, .dbeta = dbeta, .dy = dy, .x = x,
                      .mean = save_mean, .invstd = save_invstd, .gamma = gamma, .m = m, .c = c};
    run(pool, m * (size_t)c, bn_backward_task, &a);
}

/* ---- group normalization -------------------------------------------------------------- */

typedef struct {
    float *y, *save_mean, *save_invstd;          /* (N, HW, C), (N, groups) x2 */
    float *dx, *dgamma, *dbeta;                  /* (N, HW, C), (C), (C) */
    const float *x, *dy, *gamma, *beta;          /* (N, HW, C) x2, (C) x2 */
    const float *mean, *invstd;                  /* (N, groups) x2 */
    int n, c, groups;
    size_t hw;
    float eps;
} gn_args;

/* One task per (sample, group): its statistics and its slice of y. */
static void gn_forward_task(void *arg, int ith, int nth)
{
    const gn_args *a = arg;
    size_t c = (size_t)a->c, hw = a->hw, cpg = c / (size_t)a->groups, tb, te;
    tern_split((size_t)a->n * (size_t)a->groups, ith, nth, &tb, &te);
    for (size_t t = tb; t < te; t++) {
        size_t s = t / (size_t)a->groups, c0 = (t % (size_t)a->groups) * cpg;
        const float *x = a->x + s * hw * c + c0;
        float *y = a->y + s * hw * c + c0;
        double count = (double)(hw * cpg), sum = 0, sq = 0;
        for (size_t r = 0; r < hw; r++)
            for (size_t j = 0; j < cpg; j++)
                sum += x[r * c + j];
        double mean = sum / count;
        for (size_t r = 0; r < hw; r++)
            for (size_t j = 0; j < cpg; j++) {
                double d = x[r * c + j] - mean;
                sq += d * d;
            }
        float invstd = (float)(1.0 / sqrt(sq / count + (double)a->eps));
        a->save_mean[t] = (float)mean;
        a->save_invstd[t] = invstd;
        for (size_t j0 = 0; j0 < cpg; j0 += CHUNK) {
            size_t nc = min_size(CHUNK, cpg - j0);
            float alpha[CHUNK], meanf[CHUNK];
            for (size_t j = 0; j < nc; j++) {
                alpha[j] = a->gamma[c0 + j0 + j] * invstd;
                meanf[j] = (float)mean;
            }
            bn_apply(y, x, meanf, alpha, a->beta + c0 + j0, hw, c, j0, nc);
        }
    }
}

void tern_groupnorm_forward(float *y, float *save_mean, float *save_invstd, const float *x,
                            const float *gamma, const float *beta, int n, size_t hw, int c,
                            int groups, float eps, tern_pool *pool)
{
    gn_args a = {.y = y, .save_mean = save_mean, .save_invstd = save_invstd, .x = x,
                 .gamma = gamma, .beta = beta, .n = n, .c = c, .groups = groups, .hw = hw,
                 .eps = eps};
    run(pool, (size_t)n * hw * (size_t)c, gn_forward_task, &a);
}

/* dx per (sample, group): with g = dy * gamma,
 * dx = invstd * (g - mean(g) - xhat * mean(g * xhat)) over the group's values. */
static void gn_backward_dx_task(void *arg, int ith, int nth)
{
    const gn_args *a = arg;
    size_t c = (size_t)a->c, hw = a->hw, cpg = c / (size_t)a->groups, tb, te;
    tern_split((size_t)a->n * (size_t)a->groups, ith, nth, &tb, &te);
    for (size_t t = tb; t < te; t++) {
        size_t s = t / (size_t)a->groups, c0 = (t % (size_t)a->groups) * cpg;
        const float *x = a->x + s * hw * c + c0, *dy = a->dy + s * hw * c + c0;
        const float *gamma = a->gamma + c0;
        float *dx = a->dx + s * hw * c + c0;
        float mean = a->mean[t], invstd = a->invstd[t];
        double count = (double)(hw * cpg), sum = 0, dotp = 0; /* sum g, sum g * (x - mean) */
        for (size_t r = 0; r < hw; r++)
            for (size_t j = 0; j < cpg; j++) {
                double g = (double)dy[r * c + j] * gamma[j];
                sum += g;
                dotp += g * (x[r * c + j] - mean);
            }
        float k = (float)(dotp * invstd * invstd / count), g_mean = (float)(sum / count);
        for (size_t r = 0; r < hw; r++)
            for (size_t j = 0; j < cpg; j++) {
                float g = dy[r * c + j] * gamma[j];
                dx[r * c + j] += (g - g_mean - (x[r * c + j] - mean) * k) * invstd;
            }
    }
}

/* dgamma, dbeta per channel, summed over samples and positions: split by channel so each
 * sum has one owner. */
static void gn_backward_param_task(void *arg, int ith, int nth)
{
    const gn_args *a = arg;
    size_t c = (size_t)a->c, hw = a->hw, cpg = c / (size_t)a->groups, cb, ce;
    tern_split(c, ith, nth, &cb, &ce);
    for (size_t c0 = cb; c0 < ce; c0 += CHUNK) {
        size_t nc = min_size(CHUNK, ce - c0);
        double dg[CHUNK] = {0}, db[CHUNK] = {0};
        for (size_t s = 0; s < (size_t)a->n; s++) {
            float mean[CHUNK], invstd[CHUNK];
            for (size_t j = 0; j < nc; j++) {
                size_t t = s * (size_t)a->groups + (c0 + j) / cpg;
                mean[j] = a->mean[t];
                invstd[j] = a->invstd[t];
            }
            for (size_t r = 0; r < hw; r++) {
                const float *xr = a->x + (s * hw + r) * c + c0;
                const float *dyr = a->dy + (s * hw + r) * c + c0;
                for (size_t j = 0; j < nc; j++) {
                    dg[j] += (double)dyr[j] * ((xr[j] - mean[j]) * invstd[j]);
                    db[j] += dyr[j];
                }
            }
        }
        for (size_t j = 0; j < nc; j++) {
            if (a->dgamma)
                a->dgamma[c0 + j] += (float)dg[j];
            if (a->dbeta)
                a->dbeta[c0 + j] += (float)db[j];
        }
    }
}

void tern_groupnorm_backward(float *dx, float *dgamma, float *dbeta, const float *dy,
                             const float *x, const float *save_mean, const float *save_invstd,
                             const float *gamma, int n, size_t hw, int c, int groups,
                             tern_pool *pool)
{
    gn_args a = {.dx = dx, .dgamma = dgamma, .dbeta = dbeta, .x = x, .dy = dy, .gamma = gamma,
                 .mean = save_mean, .invstd = save_invstd, .n = n, .c = c, .groups = groups,
                 .hw = hw};
    size_t work = (size_t)n * hw * (size_t)c;
    if (dx)
        run(pool, work, gn_backward_dx_task, &a);
    if (dgamma || dbeta)
        run(pool, work, gn_backward_param_task, &a);
}

/* ---- elementwise ---------------------------------------------------------------------- */

typedef struct {
    float *out;                  /* (count) */
    const float *in, *in2, *in3; /* (count) each, meaning set by the caller */
    size_t count;
    tern_act act;
} ew_args;

static void act_forward_task(void *arg, int ith, int nth)
{
    const ew_args *a = arg;
    size_t b, e;
    tern_split(a->count, ith, nth, &b, &e);
    float *y = a->out;
    const float *x = a->in;
    switch (a->act) {
    case TERN_ACT_NONE:
        if (y != x)
            memcpy(y + b, x + b, (e - b) * sizeof *y);
        break;
    case TERN_ACT_RELU:
        for (size_t i = b; i < e; i++)
            y[i] = x[i] > 0 ? x[i] : 0;
        break;
    case TERN_ACT_HARDSWISH: /* same operation order as PyTorch's CPU kernel */
        for (size_t i = b; i < e; i++)
            y[i] = x[i] * fminf(fmaxf(x[i] + 3, 0), 6) / 6;
        break;
    case TERN_ACT_HARDSIGMOID:
        for (size_t i = b; i < e; i++)
            y[i] = fminf(fmaxf(x[i] + 3, 0), 6) / 6;
        break;
    }
}

void tern_act_forward(float *y, const float *x, size_t count, tern_act act, tern_pool *pool)
{
    ew_args a = {.out = y, .in = x, .count = count, .act = act};
    run(pool, count, act_forward_task, &a);
}

static void act_backward_task(void *arg, int ith, int nth)
{
    const ew_args *a = arg;
    size_t b, e;
    tern_split(a->count, ith, nth, &b, &e);
    float *dx = a->out;
    const float *dy = a->in, *x = a->in2;
    switch (a->act) {
    case TERN_ACT_NONE:
        for (size_t i = b; i < e; i++)
            dx[i] += dy[i];
        break;
    case TERN_ACT_RELU:
        for (size_t i = b; i < e; i++)
            dx[i] += x[i] > 0 ? dy[i] : 0;
        break;
    case TERN_ACT_HARDSWISH:
        for (size_t i = b; i < e; i++)
            dx[i] += x[i] < -3 ? 0 : x[i] <= 3 ? dy[i] * (x[i] / 3 + 0.5f) : dy[i];
        break;
    case TERN_ACT_HARDSIGMOID:
        for (size_t i = b; i < e; i++)
            dx[i] += x[i] > -3 && x[i] < 3 ? dy[i] * (1.0f / 6) : 0;
        break;
    }
}

void tern_act_backward(float *dx, const float *dy, const float *x, size_t count, tern_act act,
                       tern_pool *pool)
{
    ew_args a = {.out = dx, .in = dy, .in2 = x, .count = count, .act = act};
    run(pool, count, act_backward_task, &a);
}

static void add_task(void *arg, int ith, int nth)
{
    const ew_args *a = arg;
    size_t b, e;
    tern_split(a->count, ith, nth, &b, &e);
    for (size_t i = b; i < e; i++)
        a->out[i] = a->in[i] + a->in2[i];
}

void tern_add_forward(float *y, const float *a, const float *b, size_t count, tern_pool *pool)
{
    ew_args args = {.out = y, .in = a, .in2 = b, .count = count};
    run(pool, count, add_task, &args);
}

static void accumulate_task(void *arg, int ith, int nth)
{
    const ew_args *a = arg;
    size_t b, e;
    tern_split(a->count, ith, nth, &b, &e);
    for (size_t i = b; i < e; i++)
        a->out[i] += a->in[i];
}

void tern_accumulate(float *dst, const float *src, size_t count, tern_pool *pool)
{
    ew_args a = {.out = dst, .in = src, .count = count};
    run(pool, count, accumulate_task, &a);
}

/* ---- global average pool and channel scale -------------------------------------------- */

typedef struct {
    float *out, *out2;                /* meaning set by the caller */
    const float *x, *dy, *s;          /* (N, HW, C), (N, HW, C) or (N, C), (N, C) */
    int n, c;
    size_t hw;
} pool_args;

/* Sums over HW of x (times dy when dy is set) into out (N, C), += when accumulate.
 * Tasks are (sample, channel chunk) pairs so each output has one owner. */
static void reduce_hw(const pool_args *a, float *out, const float *dy, double scale,
                      bool accumulate, int ith, int nth)
{
    size_t c = (size_t)a->c, hw = a->hw, chunks = (c + CHUNK - 1) / CHUNK, tb, te;
    tern_split((size_t)a->n * chunks, ith, nth, &tb, &te);
    for (size_t t = tb; t < te; t++) {
        size_t s = t / chunks, c0 = (t % chunks) * CHUNK, nc = min_size(CHUNK, c - c0);
        double acc[CHUNK] = {0};
        for (size_t r = 0; r < hw; r++) {
            const float *xr = a->x + (s * hw + r) * c + c0;
            if (dy) {
                const float *dyr = dy + (s * hw + r) * c + c0;
                for (size_t j = 0; j < nc; j++)
                    acc[j] += (double)xr[j] * dyr[j];
            } else {
                for (size_t j = 0; j < nc; j++)
                    acc[j] += xr[j];
            }
        }
        float *o = out + s * c + c0;
        for (size_t j = 0; j < nc; j++)
            o[j] = (float)(acc[j] * scale) + (accumulate ? o[j] : 0);
    }
}

static void avgpool_forward_task(void *arg, int ith, int nth)
{
    const pool_args *a = arg;
    reduce_hw(a, a->out, NULL, 1.0 / (double)a->hw, false, ith, nth);
}

void tern_avgpool_forward(float *y, const float *x, int n, size_t hw, int c, tern_pool *pool)
{
    pool_args a = {.out = y, .x = x, .n = n, .c = c, .hw = hw};
    run(pool, (size_t)n * hw * (size_t)c, avgpool_forward_task, &a);
}

static void avgpool_backward_task(void *arg, int ith, int nth)
{
    const pool_args *a = arg;
    size_t c = (size_t)a->c, hw = a->hw, rb, re;
    float div = (float)hw;
    tern_split((size_t)a->n * hw, ith, nth, &rb, &re);
    for (size_t r = rb; r < re; r++) {
        const float *dy = a->dy + (r / hw) * c;
        float *dx = a->out + r * c;
        for (size_t j = 0; j < c; j++)
            dx[j] += dy[j] / div;
    }
}

void tern_avgpool_backward(float *dx, const float *dy, int n, size_t hw, int c, tern_pool *pool)
{
    pool_args a = {.out = dx, .dy = dy, .n = n, .c = c, .hw = hw};
    run(pool, (size_t)n * hw * (size_t)c, avgpool_backward_task, &a);
}

/* out (N, HW, C) = in * s, or += when accumulate; split by rows. */
static void scale_rows(const pool_args *a, float *out, const float *in, bool accumulate,
                       int ith, int nth)
{
    size_t c = (size_t)a->c, hw = a->hw, rb, re;
    tern_split((size_t)a->n * hw, ith, nth, &rb, &re);
    for (size_t r = rb; r < re; r++) {
        const float *s = a->s + (r / hw) * c, *ir = in + r * c;
        float *o = out + r * c;
        if (accumulate)
            for (size_t j = 0; j < c; j++)
                o[j] += ir[j] * s[j];
        else
            for (size_t j = 0; j < c; j++)
                o[j] = ir[j] * s[j];
    }
}

static void scale_forward_task(void *arg, int ith, int nth)
{
    const pool_args *a = arg;
    scale_rows(a, a->out, a->x, false, ith, nth);
}

void tern_scale_channels_forward(float *y, const float *x, const float *s, int n, size_t hw,
                                 int c, tern_pool *pool)
{
    pool_args a = {.out = y, .x = x, .s = s, .n = n, .c = c, .hw = hw};
    run(pool, (size_t)n * hw * (size_t)c, scale_forward_task, &a);
}

static void scale_backward_task(void *arg, int ith, int nth)
{
    const pool_args *a = arg;
    if (a->out)
        scale_rows(a, a->out, a->dy, true, ith, nth);
    if (a->out2)
        reduce_hw(a, a->out2, a->dy, 1.0, true, ith, nth);
}

void tern_scale_channels_backward(float *dx, float *ds, const float *dy, const float *x,
                                  const float *s, int n, size_t hw, int c, tern_pool *pool)
{
    if (!dx && !ds)
        return;
    pool_args a = {.out = dx, .out2 = ds, .x = x, .dy = dy, .s = s, .n = n, .c = c, .hw = hw};
    run(pool, (size_t)n * hw * (size_t)c, scale_backward_task, &a);
}

/* ---- dropout and loss ------------------------------------------------------------------ */

void tern_dropout_forward(float *y, const float *x, const float *mask, size_t count)
{
    for (size_t i = 0; i < count; i++)
        y[i] = x[i] * mask[i];
}

void tern_dropout_backward(float *dx, const float *dy, const float *mask, size_t count)
{
    for (size_t i = 0; i < count; i++)
        dx[i] += dy[i] * mask[i];
}

float tern_cross_entropy(float *dlogits, const float *logits, const int32_t *labels, int n,
                         int k, float smoothing)
{
    double total = 0, eps = smoothing, off = eps / k;
    for (int i = 0; i < n; i++) {
        const float *z = logits + (size_t)i * (size_t)k;
        /* log-sum-exp around the maximum so exp never overflows */
        float zmax = z[0];
        for (int j = 1; j < k; j++)
            zmax = z[j] > zmax ? z[j] : zmax;
        double sumexp = 0, sumz = 0;
        for (int j = 0; j < k; j++) {
            sumexp += exp((double)z[j] - zmax);
            sumz += z[j];
        }
        double lse = zmax + log(sumexp);
        /* -sum_c log p_c = k * lse - sum_c z_c */
        total += (1 - eps) * (lse - z[labels[i]]) + off * (k * lse - sumz);
        if (dlogits) {
            float *d = dlogits + (size_t)i * (size_t)k;
            for (int j = 0; j < k; j++) {
                double target = off + (j == labels[i] ? 1 - eps : 0);
                d[j] = (float)((exp((double)z[j] - lse) - target) / n);
            }
        }
    }
    return (float)(total / n);
}
