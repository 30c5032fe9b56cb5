/* DP-SGD over a tern_model (include/tern/dpsgd.h): per-sample gradient norms per layer from
 * the saved inputs and output gradients of one ordinary forward and backward, clip factors,
 * then the clipped sum: a weighted sum of the per-sample gradients kept for the small layers
 * (depthwise, stem, GroupNorm), and for the GEMM layers (pointwise, linear) one weight-gradient
 * pass with each sample's output gradients scaled by its factor; Gaussian noise; division by
 * the expected batch; accounting.
 *
 * Why the weight-gradient pass is enough: every op of a GroupNorm MobileNetV3 acts on each
 * sample alone, so sample n's output gradient at any layer is linear in its dlogits. Scaling
 * dlogits_n by f_n would scale dy_n by f_n everywhere; scaling dy_n directly at each
 * parameterized op and recomputing only that op's weight gradient gives the same sum without
 * propagating input gradients a second time.
 *
 * The model is reached through its graph view (model_graph.h): values (x, dx), ops (kind,
 * shapes, weights), and the op's gradient slots. */
#include "tern/dpsgd.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "gemm.h"
#include "kernels.h"
#include "model_graph.h"
#include "pool.h"
#include "util.h"

/* Opacus: clip factor = C / (norm + 1e-6), at most 1. */
#define CLIP_EPS 1e-6
/* Plain C dot loops against the blocked GEMM: how many times cheaper a multiply-add is in the
 * GEMM, for choosing between the ghost norm and the materialized gradient. */
#define GEMM_SPEEDUP 4.0

typedef enum dp_kind {
    DP_LINEAR,   /* rank-1 per sample: exact norm from |x| and |dy| */
    DP_PW_GHOST, /* pointwise conv, Gram products over positions */
    DP_PW_GEMM,  /* pointwise conv, per-sample weight gradient by GEMM */
    DP_CONV,     /* any other conv (stem, depthwise): per-sample gradient by its kernel */
    DP_GN,       /* GroupNorm: per-sample d gamma, d beta */
} dp_kind;

typedef struct dp_op {
    int index;     /* op index in the model's graph */
    int tw, tb;    /* parameter tensor indices of w and b, or -1 */
    dp_kind kind;  /* set per plan (ghost or GEMM depends on H*W) */
    tern_graph_op g;
    tern_graph_value in, out;
    tern_graph_train_op t;
    size_t hw;        /* positions per sample at the op's input */
    size_t wcount;    /* CONV: weight floats */
    /* CONV, GN: each sample's gradient (CONV: weights; GN: d gamma then d beta) is kept at
     * store + store_base + n * store_per, so the clipped sum is a weighted sum of them. */
    size_t store_base, store_per;
} dp_op;

/* Ziggurat tables for normal deviates (Marsaglia and Tsang 2000 with Doornik's 2005 choice of
 * independent bits for the layer and the abscissa): 128 layers. */
#define ZIG_LAYERS 128
#define ZIG_R 3.442619855899
#define ZIG_V 9.91256303526217e-3

struct tern_dp {
    tern_model *model;
    tern_dp_options opt;
    const tern_allocator *alloc;
    tern_accountant *acc;
    tern_rng rng;
    char error[256];
    int64_t steps;
    bool unbounded; /* a step without noise was taken */
    size_t nparams;
    int ntensors; /* parameter tensors */
    int classes;
    dp_op *ops;
    int nops;
    /* sized for the plan (max_batch, height, width) */
    int max_batch, height, width;
    float *logits, *dlogits; /* (max_batch, classes) */
    double *sq;              /* (max_batch, ntensors) per-sample squared norms */
    float *factors;          /* (max_batch) */
    int nfactors;
    float *sum;              /* (nparams) clipped sum over chunks */
    float *scratch;          /* per thread: scratch_floats */
    size_t scratch_floats;
    float *workspace;        /* conv weight-gradient workspace for the whole batch */
    float *store;            /* per-sample gradients of the CONV and GN ops */
    double zig_x[ZIG_LAYERS + 1], zig_r[ZIG_LAYERS];
};

static tern_status dp_fail(tern_dp *dp, tern_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static tern_status dp_fail(tern_dp *dp, tern_status s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(dp->error, sizeof dp->error, fmt, ap);
    va_end(ap);
    return s;
}

static bool is_pointwise(const tern_conv_params *p)
{
    return p->k == 1 && p->stride == 1 && p->pad == 0 && p->groups == 1;
}

static size_t round16(size_t n)
{
    return (n + 15) & ~(size_t)15;
}

/* ---- normal deviates ------------------------------------------------------------------------ */

/* Layer boundaries x[0] = V / f(R) (the base layer's equal-area width), x[1] = R, ...,
 * x[128] = 0, with f(x) = exp(-x^2 / 2); r[i] = x[i + 1] / x[i]. */
static void zig_init(double *x, double *r)
{
    double f = exp(-0.5 * ZIG_R * ZIG_R);
    x[0] = ZIG_V / f;
    x[1] = ZIG_R;
    x[ZIG_LAYERS] = 0;
    for (int i = 2; i < ZIG_LAYERS; i++) {
        x[i] = sqrt(-2 * log(ZIG_V / x[i - 1] + f));
        f = exp(-0.5 * x[i] * x[i]);
    }
    for (int i = 0; i < ZIG_LAYERS; i++)
        r[i] = x[i + 1] / x[i];
}

/* Uniform in (0, 1]. */
static double uniform_open0(tern_rng *rng)
{
    return 1.0 - tern_rng_uniform_double(rng);
}

/* A standard normal deviate, exactly (no approximation beyond double rounding). One 64-bit draw
 * gives a 53-bit abscissa (high bits) and the layer (low 7 bits); 98.8% of calls end at the
 * first comparison. */
static double zig_normal(const tern_dp *dp, tern_rng *rng)
{
    const double *x = dp->zig_x, *r = dp->zig_r;
    for (;;) {
        uint64_t bits = tern_rng_next(rng);
        double u = 2.0 * ((double)(bits >> 11) * 0x1.0p-53) - 1.0;
        unsigned i = (unsigned)(bits & (ZIG_LAYERS - 1));
        if (fabs(u) < r[i])
            return u * x[i];
        if (i == 0) { /* the tail beyond R (Marsaglia 1964) */
            double t, y;
            do {
                t = log(uniform_open0(rng)) / ZIG_R;
                y = log(uniform_open0(rng));
            } while (-2 * y < t * t);
            return u < 0 ? t - ZIG_R : ZIG_R - t;
        }
        /* A wedge: accept x with probability (f(x) - f(x_i)) / (f(x_i+1) - f(x_i)). */
        double v = u * x[i];
        double f0 = exp(-0.5 * (x[i] * x[i] - v * v));
        double f1 = exp(-0.5 * (x[i + 1] * x[i + 1] - v * v));
        if (f1 + tern_rng_uniform_double(rng) * (f0 - f1) < 1.0)
            return v;
    }
}

/* ---- creation ---------------------------------------------------------------------------- */

/* Index among the parameter tensors of the one whose data is p, or -1. */
static int tensor_of(const tern_model *m, const float *p)
{
    if (!p)
        return -1;
    int k = 0;
    for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(m, i);
        if (t->kind != TERN_TENSOR_PARAM)
            continue;
        if (t->data == p)
            return k;
        k++;
    }
    return -1;
}

tern_status tern_dp_create(tern_model *model, const tern_dp_options *options, tern_dp **out,
                           tern_error *err)
{
    if (!model || !options || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    const tern_dp_options *o = options;
    if (!(o->max_grad_norm > 0 && isfinite(o->max_grad_norm)))
        return tern_set_error(err, TERN_ERR_INVALID, "max_grad_norm %g: need a finite C > 0",
                              o->max_grad_norm);
    if (!(o->noise_multiplier >= 0 && isfinite(o->noise_multiplier)))
        return tern_set_error(err, TERN_ERR_INVALID, "noise_multiplier %g: need finite sigma >= 0",
                              o->noise_multiplier);
    if (!(o->sample_rate > 0 && o->sample_rate <= 1))
        return tern_set_error(err, TERN_ERR_INVALID, "sample_rate %g outside (0, 1]",
                              o->sample_rate);
    if (!(o->expected_batch > 0 && isfinite(o->expected_batch)))
        return tern_set_error(err, TERN_ERR_INVALID, "expected_batch %g: need a finite value > 0",
                              o->expected_batch);
    if (!(o->label_smoothing >= 0 && o->label_smoothing <= 1))
        return tern_set_error(err, TERN_ERR_INVALID, "label_smoothing %g outside [0, 1]",
                              (double)o->label_smoothing);
    const tern_model_options *mo = tern_model_options_of(model);
    if (mo->norm != TERN_NORM_GROUP)
        return tern_set_error(err, TERN_ERR_INVALID,
                              "DP-SGD needs per-sample gradients, and BatchNorm mixes the samples "
                              "of a batch through its statistics: build the model with GroupNorm "
                              "(norm TERN_NORM_GROUP, --norm group)");
    const tern_allocator *a = mo->alloc;
    tern_dp *dp = tern_calloc(a, 1, sizeof *dp);
    if (!dp)
        return tern_set_error(err, TERN_ERR_NOMEM, "out of memory");
    dp->model = model;
    dp->opt = *o;
    dp->opt.accountant.orders = NULL; /* the accountant keeps its own copy */
    dp->alloc = a;
    dp->nparams = tern_model_param_count(model);
    dp->classes = mo->num_classes;
    tern_rng_seed(&dp->rng, o->seed);
    zig_init(dp->zig_x, dp->zig_r);
    for (size_t i = 0; i < tern_model_tensor_count(model); i++)
        dp->ntensors += tern_model_tensor_at(model, i)->kind == TERN_TENSOR_PARAM;
    tern_status s = tern_accountant_create(&o->accountant, &dp->acc, err);
    if (s != TERN_OK) {
        tern_free(a, dp);
        return s;
    }
    int nops = tern_model_graph_op_count(model);
    for (int i = 0; i < nops; i++) {
        tern_graph_op g;
        tern_model_graph_op_at(model, i, &g);
        dp->nops += g.kind == TERN_GRAPH_CONV || g.kind == TERN_GRAPH_GN ||
                    g.kind == TERN_GRAPH_LINEAR;
    }
    dp->ops = tern_calloc(a, (size_t)dp->nops, sizeof *dp->ops);
    if (!dp->ops) {
        tern_dp_destroy(&dp);
        return tern_set_error(err, TERN_ERR_NOMEM, "out of memory");
    }
    int k = 0;
    for (int i = 0; i < nops; i++) {
        tern_graph_op g;
        tern_model_graph_op_at(model, i, &g);
        if (g.kind != TERN_GRAPH_CONV && g.kind != TERN_GRAPH_GN && g.kind != TERN_GRAPH_LINEAR)
            continue;
        dp_op *d = &dp->ops[k++];
        d->index = i;
        d->tw = tensor_of(model, g.w);
        d->tb = tensor_of(model, g.b);
        d->kind = g.kind == TERN_GRAPH_LINEAR ? DP_LINEAR : g.kind == TERN_GRAPH_GN ? DP_GN
                                                                                  : DP_CONV;
    }
    *out = dp;
    return TERN_OK;
}

static void free_plan_buffers(tern_dp *dp)
{
    const tern_allocator *a = dp->alloc;
    tern_free(a, dp->logits);
    tern_free(a, dp->dlogits);
    tern_free(a, dp->sq);
    tern_free(a, dp->factors);
    tern_free(a, dp->sum);
    tern_free(a, dp->scratch);
    tern_free(a, dp->workspace);
    tern_free(a, dp->store);
    dp->logits = dp->dlogits = dp->factors = dp->sum = dp->scratch = dp->workspace = NULL;
    dp->store = NULL;
    dp->sq = NULL;
    dp->max_batch = dp->height = dp->width = 0;
    dp->nfactors = 0;
}

void tern_dp_destroy(tern_dp **dp)
{
    if (!dp || !*dp)
        return;
    tern_dp *d = *dp;
    free_plan_buffers(d);
    tern_accountant_destroy(&d->acc);
    tern_free(d->alloc, d->ops);
    tern_free(d->alloc, d);
    *dp = NULL;
}

/* ---- plan ------------------------------------------------------------------------------------ */

/* Refreshes every op's view of the model (pointers move when the model is replanned) and, when
 * the plan's sizes changed, reallocates the buffers sized by it. */
static tern_status prepare(tern_dp *dp)
{
    tern_model *m = dp->model;
    int height, width;
    bool training;
    int max_batch = tern_model_graph_plan(m, &height, &width, &training);
    if (max_batch < 1 || !training)
        return dp_fail(dp, TERN_ERR_STATE, "DP-SGD needs a training plan (tern_model_plan with "
                                           "training = true)");
    tern_pool *pool = tern_model_graph_pool(m);
    int nth = tern_pool_size(pool);
    size_t scratch = 0, workspace = 0, store = 0;
    for (int i = 0; i < dp->nops; i++) {
        dp_op *d = &dp->ops[i];
        tern_model_graph_op_at(m, d->index, &d->g);
        tern_model_graph_train_op_at(m, d->index, &d->t);
        tern_model_graph_value_at(m, d->g.in, &d->in);
        tern_model_graph_value_at(m, d->g.out, &d->out);
        d->hw = (size_t)d->in.h * (size_t)d->in.w;
        d->store_per = 0;
        size_t need = 0;
        if (d->g.kind == TERN_GRAPH_CONV) {
            tern_conv_params p = d->g.conv;
            d->wcount = (size_t)p.cout * (size_t)(p.cin / p.groups) * (size_t)p.k * (size_t)p.k;
            if (is_pointwise(&p)) {
                /* Ghost: hw^2 (cin + cout) dot-product terms, half of them by symmetry; GEMM:
                 * hw cin cout multiply-adds at GEMM speed, plus squaring cin cout. */
                double hw = (double)d->hw, cin = p.cin, cout = p.cout;
                double ghost = 0.5 * hw * (hw + 1) * (cin + cout);
                double gemm = hw * cin * cout / GEMM_SPEEDUP + cin * cout;
                d->kind = ghost <= gemm ? DP_PW_GHOST : DP_PW_GEMM;
                if (d->kind == DP_PW_GEMM)
                    need = round16(d->wcount);
            } else {
                d->kind = DP_CONV;
                tern_conv_params p1 = p;
                p1.n = 1;
                need = round16(tern_conv2d_workspace_size(&p1, 1));
                d->store_per = d->wcount;
            }
            p.n = max_batch;
            size_t ws = tern_conv2d_workspace_size(&p, nth);
            workspace = ws > workspace ? ws : workspace;
        } else if (d->g.kind == TERN_GRAPH_GN) {
            need = 2 * round16((size_t)d->in.c);
            d->store_per = 2 * (size_t)d->in.c;
        }
        d->store_base = store;
        store += d->store_per * (size_t)max_batch;
        scratch = need > scratch ? need : scratch;
    }
    if (max_batch == dp->max_batch && height == dp->height && width == dp->width)
        return TERN_OK;
    free_plan_buffers(dp);
    const tern_allocator *a = dp->alloc;
    size_t nb = (size_t)max_batch, scratch_total;
    if (!tern_mul_size(scratch, (size_t)nth, &scratch_total))
        return dp_fail(dp, TERN_ERR_NOMEM, "per-sample scratch too large");
    dp->logits = tern_calloc(a, nb * (size_t)dp->classes, sizeof(float));
    dp->dlogits = tern_calloc(a, nb * (size_t)dp->classes, sizeof(float));
    dp->sq = tern_calloc(a, nb * (size_t)dp->ntensors, sizeof(double));
    dp->factors = tern_calloc(a, nb, sizeof(float));
    dp->sum = tern_calloc(a, dp->nparams, sizeof(float));
    dp->scratch = tern_calloc(a, scratch_total ? scratch_total : 1, sizeof(float));
    dp->workspace = tern_calloc(a, workspace ? workspace : 1, sizeof(float));
    dp->store = tern_calloc(a, store ? store : 1, sizeof(float));
    if (!dp->logits || !dp->dlogits || !dp->sq || !dp->factors || !dp->sum || !dp->scratch ||
        !dp->workspace || !dp->store) {
        free_plan_buffers(dp);
        return dp_fail(dp, TERN_ERR_NOMEM, "cannot allocate DP-SGD buffers for batch %d",
                       max_batch);
    }
    dp->scratch_floats = scratch;
    dp->max_batch = max_batch;
    dp->height = height;
    dp->width = width;
    return TERN_OK;
}

/* ---- per-sample norms -------------------------------------------------------------------- */

/* Sum of a[i] * b[i] in float with eight independent lanes (vectorizable without reassociation
 * flags), the lanes added in double. */
static double dot(const float *a, const float *b, size_t n)
{
    float acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++)
            acc[j] += a[i + (size_t)j] * b[i + (size_t)j];
    double s = 0;
    for (; i < n; i++)
        s += (double)a[i] * b[i];
    for (int j = 0; j < 8; j++)
        s += acc[j];
    return s;
}

/* sum over p, q of (x_p . x_q)(dy_p . dy_q) = |dy^T x|_F^2, for x (hw, cin), dy (hw, cout). */
static double ghost_norm(const float *x, size_t cin, const float *dy, size_t cout, size_t hw)
{
    double s = 0;
    for (size_t p = 0; p < hw; p++) {
        const float *xp = x + p * cin, *dp = dy + p * cout;
        double off = 0;
        for (size_t q = 0; q < p; q++)
            off += dot(xp, x + q * cin, cin) * dot(dp, dy + q * cout, cout);
        s += 2 * off + dot(xp, xp, cin) * dot(dp, dp, cout);
    }
    return s;
}

/* Squared norms of sample s's gradient, per parameter tensor, added into sq. */
static void sample_norms(const tern_dp *dp, int s, double *sq, float *scratch, float *gemm_scratch,
                         tern_isa isa)
{
    for (int i = 0; i < dp->nops; i++) {
        const dp_op *d = &dp->ops[i];
        const size_t cin = (size_t)d->in.c, cout = (size_t)d->out.c;
        const size_t hw_out = (size_t)d->out.h * (size_t)d->out.w;
        const float *x = d->in.x + (size_t)s * d->hw * cin;
        const float *dy = d->out.dx + (size_t)s * hw_out * cout;
        switch (d->kind) {
        case DP_LINEAR: {
            double dd = dot(dy, dy, cout);
            sq[d->tw] += dd * dot(x, x, cin);
            if (d->tb >= 0)
                sq[d->tb] += dd;
            break;
        }
        case DP_PW_GHOST:
            sq[d->tw] += ghost_norm(x, cin, dy, cout, d->hw);
            break;
        case DP_PW_GEMM: /* G (cout, cin) = dy^T (cout, hw) x (hw, cin) */
            tern_gemm_thread(scratch, cin, dy, cout, true, x, cin, false, cout, cin, d->hw, false,
                             NULL, isa, gemm_scratch);
            sq[d->tw] += dot(scratch, scratch, d->wcount);
            break;
        case DP_CONV: {
            tern_conv_params p = d->g.conv;
            p.n = 1;
            float *g = dp->store + d->store_base + (size_t)s * d->store_per;
            memset(g, 0, d->wcount * sizeof(float));
            tern_conv2d_backward(NULL, g, NULL, scratch, dy, x, d->g.w, &p, NULL);
            sq[d->tw] += dot(g, g, d->wcount);
            break;
        }
        case DP_GN: {
            /* d gamma_c = sum_p dy_pc (x_pc - mean_g) invstd_g, d beta_c = sum_p dy_pc */
            const size_t c = cin, cg = c / (size_t)d->t.groups, pad = round16(c);
            float *dg = dp->store + d->store_base + (size_t)s * d->store_per, *db = dg + c;
            float *mean = scratch, *inv = scratch + pad;
            const float *sm = d->t.save_mean + (size_t)s * (size_t)d->t.groups;
            const float *si = d->t.save_invstd + (size_t)s * (size_t)d->t.groups;
            for (size_t j = 0; j < c; j++) {
                mean[j] = sm[j / cg];
                inv[j] = si[j / cg];
                dg[j] = db[j] = 0;
            }
            for (size_t p = 0; p < d->hw; p++) {
                const float *xr = x + p * c, *dr = dy + p * c;
                for (size_t j = 0; j < c; j++) {
                    dg[j] += dr[j] * ((xr[j] - mean[j]) * inv[j]);
                    db[j] += dr[j];
                }
            }
            sq[d->tw] += dot(dg, dg, c);
            sq[d->tb] += dot(db, db, c);
            break;
        }
        }
    }
}

typedef struct norms_task {
    const tern_dp *dp;
    tern_pool *pool;
    int n;
} norms_task;

/* Samples split over threads; each sample's norms are computed by one thread in a fixed order,
 * so they do not even depend on the thread count. */
static void norms_fn(void *arg, int ith, int nth)
{
    const norms_task *t = arg;
    const tern_dp *dp = t->dp;
    size_t s0, s1;
    tern_split((size_t)t->n, ith, nth, &s0, &s1);
    float *scratch = dp->scratch + (size_t)ith * dp->scratch_floats;
    float *gemm_scratch = tern_pool_scratch(t->pool, ith);
    tern_isa isa = tern_pool_isa(t->pool);
    for (size_t s = s0; s < s1; s++) {
        double *sq = dp->sq + s * (size_t)dp->ntensors;
        memset(sq, 0, (size_t)dp->ntensors * sizeof(double));
        sample_norms(dp, (int)s, sq, scratch, gemm_scratch, isa);
    }
}

typedef struct scale_task {
    const tern_dp *dp;
    int n;
} scale_task;

/* dy_n *= f_n at the output of every op whose clipped sum is a GEMM (linear, pointwise). */
static void scale_fn(void *arg, int ith, int nth)
{
    const scale_task *t = arg;
    const tern_dp *dp = t->dp;
    size_t s0, s1;
    tern_split((size_t)t->n, ith, nth, &s0, &s1);
    for (int i = 0; i < dp->nops; i++) {
        const dp_op *d = &dp->ops[i];
        if (d->store_per) /* summed from the stored per-sample gradients instead */
            continue;
        const size_t per = (size_t)d->out.h * (size_t)d->out.w * (size_t)d->out.c;
        for (size_t s = s0; s < s1; s++) {
            float *dy = d->out.dx + s * per, f = dp->factors[s];
            if (f != 1.0f)
                for (size_t j = 0; j < per; j++)
                    dy[j] *= f;
        }
    }
}

/* out[j] = sum over samples n of f_n g[n * stride + j], j in [0, count), in a fixed order. */
static void weighted_sum(float *out, const float *g, size_t stride, size_t count,
                         const float *f, int n)
{
    memset(out, 0, count * sizeof(float));
    for (int s = 0; s < n; s++) {
        const float *gs = g + (size_t)s * stride, fs = f[s];
        for (size_t j = 0; j < count; j++)
            out[j] += fs * gs[j];
    }
}

/* The gradients of CONV and GN ops from their stored per-sample gradients; each op's
 * coordinates are split over threads (each summed over samples in order by one thread). */
static void stored_sum_fn(void *arg, int ith, int nth)
{
    const scale_task *t = arg;
    const tern_dp *dp = t->dp;
    for (int i = 0; i < dp->nops; i++) {
        const dp_op *d = &dp->ops[i];
        if (!d->store_per)
            continue;
        const float *g = dp->store + d->store_base;
        size_t j0, j1;
        tern_split(d->store_per, ith, nth, &j0, &j1);
        if (d->kind == DP_GN) { /* d gamma in [0, c), d beta in [c, 2c) */
            const size_t c = d->store_per / 2;
            size_t a0 = j0 < c ? j0 : c, a1 = j1 < c ? j1 : c;
            size_t b0 = j0 > c ? j0 : c, b1 = j1 > c ? j1 : c;
            weighted_sum(d->t.dw + a0, g + a0, d->store_per, a1 - a0, dp->factors, t->n);
            weighted_sum(d->t.db + (b0 - c), g + b0, d->store_per, b1 - b0, dp->factors, t->n);
        } else {
            weighted_sum(d->t.dw + j0, g + j0, d->store_per, j1 - j0, dp->factors, t->n);
        }
    }
}

/* Forward and backward of one chunk with per-sample loss gradients, then the per-sample
 * squared norms into dp->sq and the clip factors into dp->factors. */
static tern_status chunk_norms(tern_dp *dp, const float *input, const int32_t *labels, int n,
                               double *loss_sum)
{
    tern_model *m = dp->model;
    tern_status s = tern_model_forward(m, dp->logits, input, n, true);
    if (s != TERN_OK)
        return dp_fail(dp, s, "%s", tern_model_last_error(m));
    float loss;
    s = tern_cross_entropy_loss(&loss, dp->dlogits, dp->logits, labels, n, dp->classes,
                                dp->opt.label_smoothing);
    if (s != TERN_OK)
        return dp_fail(dp, s, "a label is outside [0, %d)", dp->classes);
    *loss_sum += (double)loss * n;
    /* The loss is a mean: n times its gradient is each sample's own loss gradient. */
    const size_t count = (size_t)n * (size_t)dp->classes;
    for (size_t i = 0; i < count; i++)
        dp->dlogits[i] *= (float)n;
    s = tern_model_backward(m, dp->dlogits);
    if (s != TERN_OK)
        return dp_fail(dp, s, "%s", tern_model_last_error(m));
    tern_pool *pool = tern_model_graph_pool(m);
    norms_task t = {.dp = dp, .pool = pool, .n = n};
    tern_pool_run(pool, norms_fn, &t);
    const double c = dp->opt.max_grad_norm;
    for (int i = 0; i < n; i++) {
        const double *sq = dp->sq + (size_t)i * (size_t)dp->ntensors;
        double total = 0;
        for (int k = 0; k < dp->ntensors; k++)
            total += sq[k];
        double f = c / (sqrt(total) + CLIP_EPS);
        dp->factors[i] = f < 1 ? (float)f : 1.0f;
    }
    dp->nfactors = n;
    return TERN_OK;
}

/* The model's gradients become the sum over the chunk of f_n g_n. */
static void clipped_sum(tern_dp *dp, int n)
{
    tern_model *m = dp->model;
    tern_pool *pool = tern_model_graph_pool(m);
    scale_task st = {.dp = dp, .n = n};
    tern_pool_run(pool, scale_fn, &st);
    tern_model_zero_grad(m);
    tern_pool_run(pool, stored_sum_fn, &st);
    for (int i = 0; i < dp->nops; i++) {
        const dp_op *d = &dp->ops[i];
        switch (d->kind) {
        case DP_LINEAR:
            tern_linear_backward(NULL, d->t.dw, d->t.db, d->out.dx, d->in.x, d->g.w, n, d->g.fin,
                                 d->g.fout, pool);
            break;
        case DP_CONV:
        case DP_GN:
            break; /* done by stored_sum_fn */
        case DP_PW_GHOST:
        case DP_PW_GEMM: {
            tern_conv_params p = d->g.conv;
            p.n = n;
            tern_conv2d_backward(NULL, d->t.dw, NULL, dp->workspace, d->out.dx, d->in.x, d->g.w,
                                 &p, pool);
            break;
        }
        }
    }
}

static tern_status check_batch(tern_dp *dp, const float *input, const int32_t *labels, int batch)
{
    if (batch < 0)
        return dp_fail(dp, TERN_ERR_INVALID, "batch %d < 0", batch);
    if (batch > 0 && (!input || !labels))
        return dp_fail(dp, TERN_ERR_INVALID, "NULL input or labels");
    for (int i = 0; i < batch; i++)
        if (labels[i] < 0 || labels[i] >= dp->classes)
            return dp_fail(dp, TERN_ERR_INVALID, "label %d of sample %d outside [0, %d)",
                           (int)labels[i], i, dp->classes);
    return prepare(dp);
}

tern_status tern_dp_sample_norms(tern_dp *dp, const float *input, const int32_t *labels,
                                 int batch, float *norms, double *tensor_sq)
{
    if (!dp)
        return TERN_ERR_INVALID;
    dp->error[0] = 0;
    if (!norms)
        return dp_fail(dp, TERN_ERR_INVALID, "NULL norms");
    tern_status s = check_batch(dp, input, labels, batch);
    if (s != TERN_OK)
        return s;
    if (batch < 1 || batch > dp->max_batch)
        return dp_fail(dp, TERN_ERR_INVALID, "batch %d outside the planned [1, %d]", batch,
                       dp->max_batch);
    double loss = 0;
    if ((s = chunk_norms(dp, input, labels, batch, &loss)) != TERN_OK)
        return s;
    const size_t k = (size_t)dp->ntensors;
    for (int i = 0; i < batch; i++) {
        const double *sq = dp->sq + (size_t)i * k;
        double total = 0;
        for (size_t j = 0; j < k; j++)
            total += sq[j];
        norms[i] = (float)sqrt(total);
    }
    if (tensor_sq)
        memcpy(tensor_sq, dp->sq, (size_t)batch * k * sizeof(double));
    return TERN_OK;
}

/* g = (g + std z) * scale with z standard normal per coordinate (std 0: no draws). */
static void add_noise(tern_dp *dp, float *g, size_t n, double std, double scale)
{
    for (size_t i = 0; i < n; i++) {
        double z = std > 0 ? std * zig_normal(dp, &dp->rng) : 0.0;
        g[i] = (float)(((double)g[i] + z) * scale);
    }
}

tern_status tern_dp_step_grads(tern_dp *dp, const float *input, const int32_t *labels, int batch,
                               float *loss)
{
    if (!dp)
        return TERN_ERR_INVALID;
    dp->error[0] = 0;
    tern_status s = check_batch(dp, input, labels, batch);
    if (s != TERN_OK)
        return s;
    tern_model *m = dp->model;
    float *grads = tern_model_grads(m);
    const size_t in_floats = (size_t)dp->height * (size_t)dp->width *
                             (size_t)tern_model_options_of(m)->in_channels;
    double loss_sum = 0;
    int chunks = 0;
    for (int off = 0; off < batch; off += dp->max_batch, chunks++) {
        int n = batch - off < dp->max_batch ? batch - off : dp->max_batch;
        if ((s = chunk_norms(dp, input + (size_t)off * in_floats, labels + off, n, &loss_sum)) !=
            TERN_OK)
            return s;
        clipped_sum(dp, n);
        if (batch > dp->max_batch) { /* several chunks: keep the running sum aside */
            if (chunks == 0)
                memcpy(dp->sum, grads, dp->nparams * sizeof(float));
            else
                for (size_t i = 0; i < dp->nparams; i++)
                    dp->sum[i] += grads[i];
        }
    }
    if (chunks == 0)
        tern_model_zero_grad(m);
    else if (chunks > 1)
        memcpy(grads, dp->sum, dp->nparams * sizeof(float));
    const double sigma = dp->opt.noise_multiplier;
    add_noise(dp, grads, dp->nparams, sigma * dp->opt.max_grad_norm, 1.0 / dp->opt.expected_batch);
    if (sigma > 0) {
        if ((s = tern_accountant_step(dp->acc, sigma, dp->opt.sample_rate)) != TERN_OK)
            return dp_fail(dp, s, "%s", tern_accountant_last_error(dp->acc));
    } else {
        dp->unbounded = true;
    }
    dp->steps++;
    if (loss)
        *loss = batch > 0 ? (float)(loss_sum / batch) : 0.0f;
    return TERN_OK;
}

tern_status tern_dp_sample(tern_dp *dp, size_t n, size_t *indices, size_t *count)
{
    if (!dp || !count || (n > 0 && !indices))
        return TERN_ERR_INVALID;
    const double q = dp->opt.sample_rate;
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (tern_rng_uniform_double(&dp->rng) < q)
            indices[k++] = i;
    *count = k;
    return TERN_OK;
}

const float *tern_dp_last_factors(const tern_dp *dp, int *count)
{
    *count = dp->nfactors;
    return dp->factors;
}

tern_status tern_dp_epsilon(tern_dp *dp, double delta, double *epsilon)
{
    if (!dp || !epsilon)
        return TERN_ERR_INVALID;
    dp->error[0] = 0;
    if (dp->unbounded) {
        if (!(delta > 0 && delta < 1))
            return dp_fail(dp, TERN_ERR_INVALID, "delta %g outside (0, 1)", delta);
        *epsilon = INFINITY;
        return TERN_OK;
    }
    tern_status s = tern_accountant_epsilon(dp->acc, delta, epsilon);
    if (s != TERN_OK)
        return dp_fail(dp, s, "%s", tern_accountant_last_error(dp->acc));
    return TERN_OK;
}

tern_accountant *tern_dp_accountant(tern_dp *dp)
{
    return dp->acc;
}

int64_t tern_dp_steps(const tern_dp *dp)
{
    return dp->steps;
}

const tern_dp_options *tern_dp_options_of(const tern_dp *dp)
{
    return &dp->opt;
}

const char *tern_dp_last_error(const tern_dp *dp)
{
    return dp->error;
}
