/* MobileNetV3 as a small static graph.
 *
 * The network is a list of values (activation tensors, NHWC) and a list of ops that read
 * values and write one new value each; nothing is computed in place. Forward runs the ops in
 * order; backward runs them in reverse, each op accumulating into the gradients of its inputs,
 * so a value read by two ops (a residual input, the input of squeeze-and-excitation) simply
 * receives both contributions.
 *
 * The graph is built twice by the same code: once to count values, ops, tensors and floats,
 * then, with everything allocated at the counted sizes, to fill them in. Parameters are
 * initialised as they are created, so the random stream follows state_dict order.
 *
 * Channel counts follow torchvision 0.14 (_mobilenet_v3_conf, InvertedResidual,
 * SqueezeExcitation, Conv2dNormActivation); names follow its state_dict. */
#include "tern/model.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "gemm.h"
#include "kernels.h"
#include "model_graph.h"
#include "pool.h"
#include "tern/rng.h"
#include "util.h"

#define NAME_MAX_LEN 96 /* longest torchvision name is about 40 */
#define NO_PARAM ((size_t)-1)

typedef struct value {
    int c;          /* channels */
    int h, w;       /* spatial size, set by the plan */
    float *x, *dx;  /* (max_batch, h, w, c), set by the plan; dx only in a training plan */
    bool bn_input;  /* a convolution output feeding BatchNorm: unused by folded inference */
    bool dx_live;   /* backward: dx has been written in this pass (else it holds garbage) */
} value;

typedef enum op_kind {
    OP_CONV,    /* convolution without bias: in -> out */
    OP_BN,      /* BatchNorm2d, then its activation (act) */
    OP_GN,      /* GroupNorm */
    OP_ACT,     /* elementwise activation */
    OP_POOL,    /* global average pool: (N, H, W, C) -> (N, 1, 1, C) */
    OP_LINEAR,  /* fully connected (also the 1x1 convolutions of squeeze-and-excitation) */
    OP_SCALE,   /* out = in * in2 broadcast over H, W (squeeze-and-excitation gate) */
    OP_ADD,     /* out = in + in2 (residual) */
    OP_DROPOUT, /* inverted dropout, identity outside training */
} op_kind;

typedef struct op {
    op_kind kind;
    int in, in2, out;       /* value indices (in2 for SCALE and ADD) */
    tern_conv_params conv;  /* OP_CONV: channels, kernel, stride, pad, groups */
    int fin, fout;          /* OP_LINEAR */
    size_t w, b;            /* parameter offsets: weight, bias (NO_PARAM if none) */
    size_t fold;            /* OP_CONV before OP_BN: offset of its BN-folded weights and bias */
    size_t run_mean, run_var; /* OP_BN: buffer offsets */
    int counter;            /* OP_BN: index of num_batches_tracked */
    int groups;             /* OP_GN */
    float eps, momentum;    /* OP_BN, OP_GN */
    tern_act act;           /* OP_ACT, OP_BN */
    float p;                /* OP_DROPOUT */
    float *save_mean, *save_invstd, *mask; /* planned per-op state */
    float *packed;          /* OP_CONV, pointwise, inference plan: folded weights packed for the
                             * GEMM kernels (refold fills it) */
    bool bn_stats;          /* training plan: OP_CONV writes its BatchNorm's statistics into
                             * the model's stats as it stores its output; OP_BN reads them */
    const char *name;       /* state_dict prefix of the layer ("" for parameter-free ops) */
    double seconds[2];      /* profiling: time in forward, backward */
    unsigned long calls[2];
} op;

struct tern_model {
    tern_model_options opt;
    char error[256];
    tern_pool *pool;
    tern_rng rng;

    float *params, *grads, *buffers;
    int64_t *counters;
    size_t nparams, nbuffers, ncounters;
    /* Inference with BatchNorm folded into the convolutions: per conv, weights then bias.
     * Refolded when `version` (bumped by anything that may change parameters or running
     * statistics) has moved on from `folded_version`. */
    float *folded;
    size_t nfolded;
    uint64_t version, folded_version;
    tern_model_tensor *tensors;
    char (*names)[NAME_MAX_LEN];
    size_t ntensors;

    value *values;
    op *ops;
    int nvalues, nops;

    /* plan */
    void *arena;
    size_t arena_bytes;
    float *workspace;
    double *stats; /* (threads, 2, widest channel count): see tern_conv2d_forward_stats */
    int max_batch, height, width;
    size_t bn_min_hw; /* smallest H*W any BatchNorm sees (SIZE_MAX without BatchNorm) */
    bool plan_training;
    /* last forward */
    int batch;
    bool trained; /* last forward was a training forward */
    bool dropped; /* and it drew dropout masks */
    bool profiling;
    /* Floats of an expansion's output computed ahead of the depthwise rows that read it (see
     * forward_expand_dw); 0 runs the two convolutions one after the other. */
    size_t fuse_floats;
};

static tern_status model_fail(tern_model *m, tern_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static tern_status model_fail(tern_model *m, tern_status s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->error, sizeof m->error, fmt, ap);
    va_end(ap);
    return s;
}

/* ---- construction ------------------------------------------------------------------------- */

typedef enum init_kind { INIT_KAIMING_FAN_OUT, INIT_NORMAL_0_01, INIT_ZERO, INIT_ONE } init_kind;

/* Counts in the first pass; fills the model's arrays in the second (m->values != NULL). */
typedef struct builder {
    tern_model *m;
    bool fill;
    int nvalues, nops;
    size_t ntensors, nparams, nbuffers, ncounters, nfolded;
    op scratch; /* target of op writes while counting */
    const char *last_weight; /* name of the latest "weight" tensor (fill pass) */
    char prefix[64];
} builder;

static int new_value(builder *b, int channels)
{
    if (b->fill)
        b->m->values[b->nvalues] = (value){.c = channels};
    return b->nvalues++;
}

static op *new_op(builder *b, op_kind kind, int in, int out)
{
    op *o = b->fill ? &b->m->ops[b->nops] : &b->scratch;
    b->nops++;
    bool has_params = kind == OP_CONV || kind == OP_BN || kind == OP_GN || kind == OP_LINEAR;
    *o = (op){.kind = kind, .in = in, .in2 = -1, .out = out, .w = NO_PARAM, .b = NO_PARAM,
              .counter = -1, .name = has_params && b->last_weight ? b->last_weight : ""};
    return o;
}

static void init_floats(tern_rng *rng, float *x, size_t n, init_kind init, double std)
{
    for (size_t i = 0; i < n; i++) {
        switch (init) {
        case INIT_KAIMING_FAN_OUT:
        case INIT_NORMAL_0_01: x[i] = (float)(std * tern_rng_normal(rng)); break;
        case INIT_ZERO: x[i] = 0.0f; break;
        case INIT_ONE: x[i] = 1.0f; break;
        }
    }
}

/* Adds a state_dict entry named prefix + "." + suffix. Returns its offset in the parameter
 * block, the buffer block or the counter array, according to kind. */
static size_t add_tensor(builder *b, const char *suffix, tern_tensor_kind kind, int ndim,
                         const int64_t *shape, init_kind init)
{
    size_t count = 1;
    for (int i = 0; i < ndim; i++)
        count *= (size_t)shape[i];
    size_t *next = kind == TERN_TENSOR_PARAM ? &b->nparams
                   : kind == TERN_TENSOR_BUFFER ? &b->nbuffers : &b->ncounters;
    size_t offset = *next;
    *next += count;
    if (b->fill) {
        tern_model *m = b->m;
        size_t i = b->ntensors;
        snprintf(m->names[i], NAME_MAX_LEN, "%s.%s", b->prefix, suffix);
        if (strcmp(suffix, "weight") == 0)
            b->last_weight = m->names[i];
        tern_model_tensor *t = &m->tensors[i];
        *t = (tern_model_tensor){.name = m->names[i], .kind = kind, .ndim = ndim, .count = count};
        if (ndim > 0)
            memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
        if (kind == TERN_TENSOR_PARAM) {
            t->data = m->params + offset;
            t->grad = m->grads + offset;
            /* Kaiming normal, mode fan_out, gain sqrt(2): fan_out = Cout * k * k, not divided
             * by groups (torch's _calculate_fan_in_and_fan_out). */
            double fan_out = (double)shape[0] * (ndim == 4 ? (double)(shape[2] * shape[3]) : 1.0);
            double std = init == INIT_KAIMING_FAN_OUT ? sqrt(2.0 / fan_out) : 0.01;
            init_floats(&m->rng, t->data, count, init, std);
        } else if (kind == TERN_TENSOR_BUFFER) {
            t->data = m->buffers + offset;
            init_floats(&m->rng, t->data, count, init, 0.0);
        } else {
            t->counter = m->counters + offset;
            *t->counter = 0;
        }
    }
    b->ntensors++;
    return offset;
}

static size_t add_param(builder *b, const char *suffix, int64_t d0, int64_t d1, int64_t d2,
                        int64_t d3, int ndim, init_kind init)
{
    int64_t shape[4] = {d0, d1, d2, d3};
    return add_tensor(b, suffix, TERN_TENSOR_PARAM, ndim, shape, init);
}

static void set_prefix(builder *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_prefix(builder *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->prefix, sizeof b->prefix, fmt, ap);
    va_end(ap);
}

static int gcd(int a, int b)
{
    while (b) {
        int t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* torchvision's _make_divisible(v, 8): round to the nearest multiple of 8, never below 8 nor
 * more than 10% below v. */
static int make_divisible(double v, int divisor)
{
    int rounded = (int)(v + divisor / 2.0) / divisor * divisor;
    if (rounded < divisor)
        rounded = divisor;
    if (rounded < 0.9 * v)
        rounded += divisor;
    return rounded;
}

/* Conv2dNormActivation at `base`: conv (no bias) as base.0, norm as base.1, then act. */
static int conv_norm_act(builder *b, const char *base, int in, int cin, int cout, int k,
                         int stride, int groups, tern_act act)
{
    const tern_model_options *opt = &b->m->opt;
    set_prefix(b, "%s.0", base);
    size_t w = add_param(b, "weight", cout, cin / groups, k, k, 4, INIT_KAIMING_FAN_OUT);
    int y = new_value(b, cout);
    op *o = new_op(b, OP_CONV, in, y);
    o->w = w;
    o->conv = (tern_conv_params){.cin = cin, .cout = cout, .k = k, .stride = stride,
                                 .pad = (k - 1) / 2, .groups = groups};

    set_prefix(b, "%s.1", base);
    size_t gamma = add_param(b, "weight", cout, 0, 0, 0, 1, INIT_ONE);
    size_t beta = add_param(b, "bias", cout, 0, 0, 0, 1, INIT_ZERO);
    int z = new_value(b, cout);
    if (opt->norm == TERN_NORM_BATCH) {
        /* The activation is fused into the BatchNorm op; for inference the pair is folded
         * into the convolution as well. */
        o->fold = b->nfolded;
        b->nfolded += (size_t)cout * (size_t)(cin / groups) * (size_t)(k * k) + (size_t)cout;
        if (b->fill)
            b->m->values[y].bn_input = true;
        int64_t shape[1] = {cout};
        size_t mean = add_tensor(b, "running_mean", TERN_TENSOR_BUFFER, 1, shape, INIT_ZERO);
        size_t var = add_tensor(b, "running_var", TERN_TENSOR_BUFFER, 1, shape, INIT_ONE);
        size_t counter = add_tensor(b, "num_batches_tracked", TERN_TENSOR_COUNTER, 0, NULL, INIT_ZERO);
        o = new_op(b, OP_BN, y, z);
        o->run_mean = mean;
        o->run_var = var;
        o->counter = (int)counter;
        o->eps = 1e-3f;
        o->momentum = opt->bn_momentum;
        o->act = act;
        o->w = gamma;
        o->b = beta;
        return z;
    }
    o = new_op(b, OP_GN, y, z);
    o->groups = gcd(32, cout);
    o->eps = 1e-5f;
    o->w = gamma;
    o->b = beta;
    if (act == TERN_ACT_NONE)
        return z;
    int a = new_value(b, cout);
    new_op(b, OP_ACT, z, a)->act = act;
    return a;
}

/* A fully connected layer named prefix.suffix_{weight,bias}; conv1x1 gives the 4-d shape that
 * the squeeze-and-excitation convolutions have in the state_dict. */
static int linear(builder *b, const char *wname, const char *bname, int in, int fin, int fout,
                  bool conv1x1)
{
    size_t w = conv1x1 ? add_param(b, wname, fout, fin, 1, 1, 4, INIT_KAIMING_FAN_OUT)
                       : add_param(b, wname, fout, fin, 0, 0, 2, INIT_NORMAL_0_01);
    size_t bias = add_param(b, bname, fout, 0, 0, 0, 1, INIT_ZERO);
    int y = new_value(b, fout);
    op *o = new_op(b, OP_LINEAR, in, y);
    o->w = w;
    o->b = bias;
    o->fin = fin;
    o->fout = fout;
    return y;
}

static int activation(builder *b, int in, int channels, tern_act act)
{
    int y = new_value(b, channels);
    new_op(b, OP_ACT, in, y)->act = act;
    return y;
}

static int squeeze_excitation(builder *b, const char *base, int in, int channels, int squeeze)
{
    int pooled = new_value(b, channels);
    new_op(b, OP_POOL, in, pooled);
    set_prefix(b, "%s.fc1", base);
    int h = linear(b, "weight", "bias", pooled, channels, squeeze, true);
    h = activation(b, h, squeeze, TERN_ACT_RELU);
    set_prefix(b, "%s.fc2", base);
    int g = linear(b, "weight", "bias", h, squeeze, channels, true);
    g = activation(b, g, channels, TERN_ACT_HARDSIGMOID);
    int y = new_value(b, channels);
    new_op(b, OP_SCALE, in, y)->in2 = g;
    return y;
}

typedef struct bneck {
    int in, k, exp, out;
    bool se, hardswish;
    int stride;
} bneck;

/* torchvision 0.14 _mobilenet_v3_conf, before the width multiplier. */
static const bneck SMALL_BLOCKS[] = {
    {16, 3, 16, 16, true, false, 2},   {16, 3, 72, 24, false, false, 2},
    {24, 3, 88, 24, false, false, 1},  {24, 5, 96, 40, true, true, 2},
    {40, 5, 240, 40, true, true, 1},   {40, 5, 240, 40, true, true, 1},
    {40, 5, 120, 48, true, true, 1},   {48, 5, 144, 48, true, true, 1},
    {48, 5, 288, 96, true, true, 2},   {96, 5, 576, 96, true, true, 1},
    {96, 5, 576, 96, true, true, 1},
};
static const bneck LARGE_BLOCKS[] = {
    {16, 3, 16, 16, false, false, 1},  {16, 3, 64, 24, false, false, 2},
    {24, 3, 72, 24, false, false, 1},  {24, 5, 72, 40, true, false, 2},
    {40, 5, 120, 40, true, false, 1},  {40, 5, 120, 40, true, false, 1},
    {40, 3, 240, 80, false, true, 2},  {80, 3, 200, 80, false, true, 1},
    {80, 3, 184, 80, false, true, 1},  {80, 3, 184, 80, false, true, 1},
    {80, 3, 480, 112, true, true, 1},  {112, 3, 672, 112, true, true, 1},
    {112, 5, 672, 160, true, true, 2}, {160, 5, 960, 160, true, true, 1},
    {160, 5, 960, 160, true, true, 1},
};

static int inverted_residual(builder *b, int index, int in, const bneck *cfg)
{
    double wm = b->m->opt.width_mult;
    int cin = make_divisible(cfg->in * wm, 8);
    int exp = make_divisible(cfg->exp * wm, 8);
    int cout = make_divisible(cfg->out * wm, 8);
    tern_act act = cfg->hardswish ? TERN_ACT_HARDSWISH : TERN_ACT_RELU;
    char base[NAME_MAX_LEN];
    int j = 0, x = in;
    if (exp != cin) {
        snprintf(base, sizeof base, "features.%d.block.%d", index, j++);
        x = conv_norm_act(b, base, x, cin, exp, 1, 1, 1, act);
    }
    snprintf(base, sizeof base, "features.%d.block.%d", index, j++);
    x = conv_norm_act(b, base, x, exp, exp, cfg->k, cfg->stride, exp, act);
    if (cfg->se) {
        snprintf(base, sizeof base, "features.%d.block.%d", index, j++);
        x = squeeze_excitation(b, base, x, exp, make_divisible(exp / 4, 8));
    }
    snprintf(base, sizeof base, "features.%d.block.%d", index, j);
    x = conv_norm_act(b, base, x, exp, cout, 1, 1, 1, TERN_ACT_NONE);
    if (cfg->stride == 1 && cin == cout) {
        int y = new_value(b, cout);
        new_op(b, OP_ADD, x, y)->in2 = in;
        x = y;
    }
    return x;
}

static void build(builder *b)
{
    const tern_model_options *opt = &b->m->opt;
    bool small = opt->arch == TERN_ARCH_MOBILENET_V3_SMALL;
    const bneck *blocks = small ? SMALL_BLOCKS : LARGE_BLOCKS;
    int nblocks = small ? (int)(sizeof SMALL_BLOCKS / sizeof *SMALL_BLOCKS)
                        : (int)(sizeof LARGE_BLOCKS / sizeof *LARGE_BLOCKS);
    double wm = opt->width_mult;
    char base[NAME_MAX_LEN];

    int x = new_value(b, opt->in_channels);
    x = conv_norm_act(b, "features.0", x, opt->in_channels, make_divisible(16 * wm, 8), 3, 2, 1,
                      TERN_ACT_HARDSWISH);
    for (int i = 0; i < nblocks; i++)
        x = inverted_residual(b, i + 1, x, &blocks[i]);
    int last_in = make_divisible(blocks[nblocks - 1].out * wm, 8);
    int last_out = 6 * last_in;
    snprintf(base, sizeof base, "features.%d", nblocks + 1);
    x = conv_norm_act(b, base, x, last_in, last_out, 1, 1, 1, TERN_ACT_HARDSWISH);

    int pooled = new_value(b, last_out);
    new_op(b, OP_POOL, x, pooled);
    int hidden = make_divisible((small ? 1024 : 1280) * wm, 8);
    set_prefix(b, "classifier.0");
    x = linear(b, "weight", "bias", pooled, last_out, hidden, false);
    x = activation(b, x, hidden, TERN_ACT_HARDSWISH);
    int dropped = new_value(b, hidden);
    new_op(b, OP_DROPOUT, x, dropped)->p = opt->dropout;
    set_prefix(b, "classifier.3");
    linear(b, "weight", "bias", dropped, hidden, opt->num_classes, false);
}

tern_model_options tern_model_options_default(tern_arch arch)
{
    return (tern_model_options){.arch = arch, .width_mult = 1.0, .in_channels = 3,
                                .num_classes = 1000, .dropout = 0.2f, .bn_momentum = 0.01f,
                                .norm = TERN_NORM_BATCH, .seed = 0, .threads = 1};
}

const char *tern_arch_name(tern_arch arch)
{
    return arch == TERN_ARCH_MOBILENET_V3_LARGE ? "mobilenet_v3_large" : "mobilenet_v3_small";
}

tern_status tern_arch_parse(const char *name, tern_arch *out)
{
    if (name && strcmp(name, "mobilenet_v3_small") == 0)
        *out = TERN_ARCH_MOBILENET_V3_SMALL;
    else if (name && strcmp(name, "mobilenet_v3_large") == 0)
        *out = TERN_ARCH_MOBILENET_V3_LARGE;
    else
        return TERN_ERR_INVALID;
    return TERN_OK;
}

static tern_status check_options(const tern_model_options *o, tern_error *err)
{
    if (o->arch != TERN_ARCH_MOBILENET_V3_SMALL && o->arch != TERN_ARCH_MOBILENET_V3_LARGE)
        return tern_set_error(err, TERN_ERR_INVALID, "unknown architecture %d", (int)o->arch);
    if (!(o->width_mult > 0.0 && o->width_mult <= 16.0))
        return tern_set_error(err, TERN_ERR_INVALID, "width multiplier %g outside (0, 16]",
                              o->width_mult);
    if (o->in_channels < 1 || o->in_channels > 4096)
        return tern_set_error(err, TERN_ERR_INVALID, "input channels %d outside [1, 4096]",
                              o->in_channels);
    if (o->num_classes < 1 || o->num_classes > 1000000)
        return tern_set_error(err, TERN_ERR_INVALID, "number of classes %d outside [1, 1000000]",
                              o->num_classes);
    if (!(o->dropout >= 0.0f && o->dropout < 1.0f))
        return tern_set_error(err, TERN_ERR_INVALID, "dropout %g outside [0, 1)",
                              (double)o->dropout);
    if (o->norm == TERN_NORM_BATCH && !(o->bn_momentum > 0.0f && o->bn_momentum <= 1.0f))
        return tern_set_error(err, TERN_ERR_INVALID, "BatchNorm momentum %g outside (0, 1]",
                              (double)o->bn_momentum);
    if (o->norm != TERN_NORM_BATCH && o->norm != TERN_NORM_GROUP)
        return tern_set_error(err, TERN_ERR_INVALID, "unknown normalization %d", (int)o->norm);
    if (o->isa < TERN_ISA_AUTO || o->isa > TERN_ISA_AVX512)
        return tern_set_error(err, TERN_ERR_INVALID, "unknown instruction set %d", (int)o->isa);
    if (o->threads < 1 || o->threads > 256)
        return tern_set_error(err, TERN_ERR_INVALID, "thread count %d outside [1, 256]",
                              o->threads);
    return TERN_OK;
}

tern_status tern_model_create(const tern_model_options *opt, tern_model **out, tern_error *err)
{
    if (!opt || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    tern_status s = check_options(opt, err);
    if (s != TERN_OK)
        return s;
    const tern_allocator *a = opt->alloc;
    tern_model *m = tern_calloc(a, 1, sizeof *m);
    if (!m)
        return tern_set_error(err, TERN_ERR_NOMEM, "out of memory");
    m->opt = *opt;
    m->fuse_floats = (size_t)1 << 16; /* 256 KB bands: well inside a core's L2 */
    tern_rng_seed(&m->rng, opt->seed);

    builder count = {.m = m};
    build(&count);
    m->nparams = count.nparams;
    m->nbuffers = count.nbuffers;
    m->ncounters = count.ncounters;
    m->ntensors = count.ntensors;
    m->nvalues = count.nvalues;
    m->nops = count.nops;
    m->nfolded = count.nfolded;
    m->folded_version = UINT64_MAX;

    s = TERN_ERR_NOMEM;
    m->params = tern_calloc(a, m->nparams, sizeof(float));
    m->grads = tern_calloc(a, m->nparams, sizeof(float));
    m->buffers = tern_calloc(a, m->nbuffers, sizeof(float));
    m->counters = tern_calloc(a, m->ncounters, sizeof(int64_t));
    m->tensors = tern_calloc(a, m->ntensors, sizeof *m->tensors);
    m->names = tern_calloc(a, m->ntensors, sizeof *m->names);
    m->values = tern_calloc(a, (size_t)m->nvalues, sizeof *m->values);
    m->ops = tern_calloc(a, (size_t)m->nops, sizeof *m->ops);
    m->folded = tern_calloc(a, m->nfolded, sizeof(float));
    if (!m->params || !m->grads || !m->buffers || !m->counters || !m->tensors || !m->names ||
        !m->values || !m->ops || !m->folded)
        goto fail;
    builder fill = {.m = m, .fill = true};
    build(&fill);

    s = tern_pool_create(opt->threads, opt->isa, a, &m->pool);
    if (s != TERN_OK)
        goto fail;
    *out = m;
    return TERN_OK;
fail:
    tern_model_destroy(&m);
    return tern_set_error(err, s, "%s while creating the model", tern_strerror(s));
}

static void free_plan(tern_model *m)
{
    tern_free(m->opt.alloc, m->arena);
    m->arena = NULL;
    m->arena_bytes = 0;
    m->workspace = NULL;
    m->stats = NULL;
    m->max_batch = 0;
    m->trained = false;
    for (int i = 0; m->values && i < m->nvalues; i++) {
        m->values[i].x = m->values[i].dx = NULL;
        m->values[i].h = m->values[i].w = 0;
    }
    for (int i = 0; m->ops && i < m->nops; i++) {
        m->ops[i].save_mean = m->ops[i].save_invstd = m->ops[i].mask = m->ops[i].packed = NULL;
        m->ops[i].bn_stats = false;
    }
}

void tern_model_destroy(tern_model **model)
{
    if (!model || !*model)
        return;
    tern_model *m = *model;
    const tern_allocator *a = m->opt.alloc;
    free_plan(m);
    tern_pool_destroy(&m->pool);
    tern_free(a, m->params);
    tern_free(a, m->grads);
    tern_free(a, m->buffers);
    tern_free(a, m->counters);
    tern_free(a, m->tensors);
    tern_free(a, m->names);
    tern_free(a, m->values);
    tern_free(a, m->ops);
    tern_free(a, m->folded);
    tern_free(a, m);
    *model = NULL;
}

const tern_model_options *tern_model_options_of(const tern_model *model)
{
    return &model->opt;
}

const char *tern_model_last_error(const tern_model *model)
{
    return model->error;
}

size_t tern_model_tensor_count(const tern_model *model)
{
    return model->ntensors;
}

const tern_model_tensor *tern_model_tensor_at(const tern_model *model, size_t i)
{
    return i < model->ntensors ? &model->tensors[i] : NULL;
}

const tern_model_tensor *tern_model_find_tensor(const tern_model *model, const char *name)
{
    for (size_t i = 0; i < model->ntensors; i++)
        if (strcmp(model->tensors[i].name, name) == 0)
            return &model->tensors[i];
    return NULL;
}

size_t tern_model_param_count(const tern_model *model)
{
    return model->nparams;
}

float *tern_model_params(tern_model *model)
{
    model->version++; /* the caller may write through the pointer */
    return model->params;
}

tern_rng *tern_model_rng(tern_model *model)
{
    return &model->rng;
}

void tern_model_invalidate(tern_model *model)
{
    model->version++;
}

float *tern_model_grads(tern_model *model)
{
    return model->grads;
}

void tern_model_zero_grad(tern_model *model)
{
    memset(model->grads, 0, model->nparams * sizeof(float));
}

/* ---- planning --------------------------------------------------------------------------------- */

/* Hands out 64-byte aligned pieces of the arena; with base == NULL it only measures. */
typedef struct carver {
    char *base;
    size_t used;
    bool overflow;
} carver;

static float *carve(carver *c, size_t floats)
{
    size_t bytes, end;
    if (!tern_mul_size(floats, sizeof(float), &bytes) ||
        !tern_add_size(bytes, TERN_ALIGN - 1, &bytes) ||
        !tern_add_size(c->used, bytes & ~(size_t)(TERN_ALIGN - 1), &end)) {
        c->overflow = true;
        return NULL;
    }
    float *p = c->base ? (float *)(c->base + c->used) : NULL;
    c->used = end;
    return p;
}

static size_t value_floats(const value *v, int batch)
{
    return (size_t)batch * (size_t)v->h * (size_t)v->w * (size_t)v->c;
}

/* Spatial sizes of every value for an input of height x width. */
static void propagate_shapes(tern_model *m, int height, int width)
{
    m->values[0].h = height;
    m->values[0].w = width;
    m->bn_min_hw = SIZE_MAX;
    for (int i = 0; i < m->nops; i++) {
        op *o = &m->ops[i];
        const value *in = &m->values[o->in];
        value *out = &m->values[o->out];
        if (o->kind == OP_BN && (size_t)in->h * (size_t)in->w < m->bn_min_hw)
            m->bn_min_hw = (size_t)in->h * (size_t)in->w;
        switch (o->kind) {
        case OP_CONV:
            o->conv.h = in->h;
            o->conv.w = in->w;
            tern_conv_params_finish(&o->conv);
            out->h = o->conv.oh;
            out->w = o->conv.ow;
            break;
        case OP_POOL:
        case OP_LINEAR:
            out->h = out->w = 1;
            break;
        default:
            out->h = in->h;
            out->w = in->w;
            break;
        }
    }
}

static bool is_pointwise(const tern_conv_params *p)
{
    return p->k == 1 && p->stride == 1 && p->pad == 0 && p->groups == 1;
}

/* Lays out (or, with c->base == NULL, measures) all planned memory. */
static void layout_plan(tern_model *m, carver *c, int batch, bool training)
{
    size_t workspace = 0, stats_channels = 0;
    for (int i = 0; i < m->nvalues; i++) {
        value *v = &m->values[i];
        bool folded_away = !training && v->bn_input;
        v->x = folded_away ? NULL : carve(c, value_floats(v, batch));
        v->dx = training && i > 0 ? carve(c, value_floats(v, batch)) : NULL;
    }
    for (int i = 0; i < m->nops; i++) {
        op *o = &m->ops[i];
        int channels = m->values[o->out].c;
        if (o->kind == OP_BN && training) {
            o->save_mean = carve(c, (size_t)channels);
            o->save_invstd = carve(c, (size_t)channels);
        } else if (o->kind == OP_GN) {
            o->save_mean = carve(c, (size_t)batch * (size_t)o->groups);
            o->save_invstd = carve(c, (size_t)batch * (size_t)o->groups);
        } else if (o->kind == OP_DROPOUT && training) {
            o->mask = carve(c, (size_t)batch * (size_t)channels);
        } else if (o->kind == OP_CONV) {
            tern_conv_params p = o->conv;
            p.n = batch;
            if (!training && m->opt.norm == TERN_NORM_BATCH && is_pointwise(&p))
                o->packed = carve(c, tern_gemm_packed_b_size((size_t)p.cout, (size_t)p.cin,
                                                             tern_pool_isa(m->pool)));
            size_t ws = tern_conv2d_workspace_size(&p, tern_pool_size(m->pool));
            if (ws > workspace)
                workspace = ws;
            /* Statistics from the conv's stores save BatchNorm's first pass over its input. */
            const op *bn = i + 1 < m->nops ? &m->ops[i + 1] : NULL;
            o->bn_stats = training && bn && bn->kind == OP_BN && bn->in == o->out &&
                          tern_conv2d_has_stats(&p);
            if (o->bn_stats) {
                m->ops[i + 1].bn_stats = true;
                if ((size_t)p.cout > stats_channels)
                    stats_channels = (size_t)p.cout;
            }
        }
    }
    m->workspace = carve(c, workspace);
    /* doubles, as pairs of floats */
    m->stats = (double *)(void *)carve(c, 4 * stats_channels * (size_t)tern_pool_size(m->pool));
}

tern_status tern_model_plan(tern_model *model, int max_batch, int height, int width,
                            bool training)
{
    tern_model *m = model;
    free_plan(m);
    if (max_batch < 1 || height < 32 || width < 32 || height > 16384 || width > 16384)
        return model_fail(m, TERN_ERR_INVALID,
                          "plan for batch %d of %dx%d: need batch >= 1 and 32 <= size <= 16384",
                          max_batch, height, width);
    propagate_shapes(m, height, width);
    carver measure = {0};
    layout_plan(m, &measure, max_batch, training);
    if (measure.overflow)
        return model_fail(m, TERN_ERR_INVALID, "plan for batch %d of %dx%d is too large",
                          max_batch, height, width);
    char *arena = tern_alloc(m->opt.alloc, measure.used);
    if (!arena) {
        free_plan(m);
        return model_fail(m, TERN_ERR_NOMEM, "cannot allocate %zu bytes of activations",
                          measure.used);
    }
    carver place = {.base = arena};
    layout_plan(m, &place, max_batch, training);
    m->arena = arena;
    m->arena_bytes = measure.used;
    m->max_batch = max_batch;
    m->height = height;
    m->width = width;
    m->plan_training = training;
    m->folded_version = UINT64_MAX; /* refold fills the new plan's packed weights */
    return TERN_OK;
}

size_t tern_model_plan_bytes(const tern_model *model)
{
    return model->arena_bytes;
}

/* ---- forward and backward --------------------------------------------------------------------- */

static const float *param_or_null(const tern_model *m, size_t offset)
{
    return offset == NO_PARAM ? NULL : m->params + offset;
}

static float *grad_or_null(tern_model *m, size_t offset)
{
    return offset == NO_PARAM ? NULL : m->grads + offset;
}

/* Dropout draws its mask from a counter-based stream: one key per op and step from the model's
 * generator, then element i's uniform from splitmix64's finalizer of key + (i + 1) * gamma. Any
 * range of elements can be drawn on its own, so threads split the work and the mask does not
 * depend on the thread count; the mask and the product are made in one pass. */
typedef struct dropout_task {
    float *y, *mask;
    const float *x;
    size_t count;
    uint64_t key;
    float p;
} dropout_task;

static void dropout_task_fn(void *arg, int ith, int nth)
{
    const dropout_task *t = arg;
    const float keep = 1.0f / (1.0f - t->p);
    size_t b, e;
    tern_split(t->count, ith, nth, &b, &e);
    for (size_t i = b; i < e; i++) {
        uint64_t z = t->key + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float u = (float)(z >> 40) * 0x1.0p-24f; /* as tern_rng_uniform */
        t->mask[i] = u < t->p ? 0.0f : keep;
        t->y[i] = t->x[i] * t->mask[i];
    }
}

static size_t conv_weight_count(const op *o)
{
    return (size_t)o->conv.cout * (size_t)(o->conv.cin / o->conv.groups) *
           (size_t)o->conv.k * (size_t)o->conv.k;
}

/* Folds each BatchNorm's running statistics and affine parameters into the convolution before
 * it: w' = w * s, b' = beta - mean * s per output channel, s = gamma / sqrt(var + eps). */
static void refold(tern_model *m)
{
    for (int i = 0; i + 1 < m->nops; i++) {
        const op *conv = &m->ops[i], *bn = &m->ops[i + 1];
        if (conv->kind != OP_CONV || bn->kind != OP_BN)
            continue;
        size_t per = conv_weight_count(conv) / (size_t)conv->conv.cout;
        const float *w = m->params + conv->w, *gamma = m->params + bn->w;
        const float *beta = m->params + bn->b, *mean = m->buffers + bn->run_mean;
        const float *var = m->buffers + bn->run_var;
        float *wf = m->folded + conv->fold, *bf = wf + conv_weight_count(conv);
        for (size_t co = 0; co < (size_t)conv->conv.cout; co++) {
            double scale = gamma[co] / sqrt((double)var[co] + bn->eps);
            for (size_t j = 0; j < per; j++)
                wf[co * per + j] = (float)(w[co * per + j] * scale);
            bf[co] = (float)(beta[co] - mean[co] * scale);
        }
        if (conv->packed)
            tern_gemm_pack_b(conv->packed, wf, (size_t)conv->conv.cin, true,
                             (size_t)conv->conv.cout, (size_t)conv->conv.cin,
                             tern_pool_isa(m->pool));
    }
    m->folded_version = m->version;
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void forward_op(tern_model *m, op *o, int n, bool training)
{
    const value *in = &m->values[o->in];
    const value *out = &m->values[o->out];
    size_t hw = (size_t)in->h * (size_t)in->w;
    size_t count = value_floats(out, n);
    tern_pool *pool = m->pool;
    switch (o->kind) {
    case OP_CONV: {
        tern_conv_params p = o->conv;
        p.n = n;
        if (o->bn_stats && training)
            tern_conv2d_forward_stats(out->x, m->stats, in->x, m->params + o->w, &p, pool);
        else
            tern_conv2d_forward(out->x, m->workspace, in->x, m->params + o->w, NULL,
                                TERN_ACT_NONE, &p, pool);
        break;
    }
    case OP_BN: /* training only: inference folds BatchNorm into the convolution */
        if (o->bn_stats)
            tern_batchnorm_act_forward_train_stats(
                out->x, o->save_mean, o->save_invstd, m->buffers + o->run_mean,
                m->buffers + o->run_var, in->x, m->stats, tern_pool_size(pool), m->params + o->w,
                m->params + o->b, (size_t)n * hw, in->c, o->eps, o->momentum, o->act, pool);
        else
            tern_batchnorm_act_forward_train(out->x, o->save_mean, o->save_invstd,
                                             m->buffers + o->run_mean, m->buffers + o->run_var,
                                             in->x, m->params + o->w, m->params + o->b,
                                             (size_t)n * hw, in->c, o->eps, o->momentum,
                                             o->act, pool);
        m->counters[o->counter]++;
        break;
    case OP_GN:
        tern_groupnorm_forward(out->x, o->save_mean, o->save_invstd, in->x, m->params + o->w,
                               m->params + o->b, n, hw, in->c, o->groups, o->eps, pool);
        break;
    case OP_ACT:
        tern_act_forward(out->x, in->x, count, o->act, pool);
        break;
    case OP_POOL:
        tern_avgpool_forward(out->x, in->x, n, hw, in->c, pool);
        break;
    case OP_LINEAR:
        tern_linear_forward(out->x, in->x, m->params + o->w, param_or_null(m, o->b), n, o->fin,
                            o->fout, pool);
        break;
    case OP_SCALE:
        tern_scale_channels_forward(out->x, in->x, m->values[o->in2].x, n, hw, in->c, pool);
        break;
    case OP_ADD:
        tern_add_forward(out->x, in->x, m->values[o->in2].x, count, pool);
        break;
    case OP_DROPOUT:
        if (training && o->p > 0.0f) {
            dropout_task t = {.y = out->x, .mask = o->mask, .x = in->x, .count = count,
                              .key = tern_rng_next(&m->rng), .p = o->p};
            tern_pool_run(count < ((size_t)1 << 14) ? NULL : pool, dropout_task_fn, &t);
        } else {
            memcpy(out->x, in->x, count * sizeof(float));
        }
        break;
    }
}

/* Gradient buffers are not zeroed before backward: the first op to write a value's dx in the
 * pass stores over it (TERN_GRAD_SET), later ones add. take_dx says which, and marks dx
 * written. NULL dx (the input image) stays untouched. */
static tern_grad_mode take_dx(value *v)
{
    bool first = v->dx && !v->dx_live;
    if (v->dx)
        v->dx_live = true;
    return first ? TERN_GRAD_SET : TERN_GRAD_ADD;
}

/* For kernels that only accumulate: zeroes dx on its first write. */
static void zero_dx_once(value *v, int n)
{
    if (v->dx && !v->dx_live)
        memset(v->dx, 0, value_floats(v, n) * sizeof(float));
    if (v->dx)
        v->dx_live = true;
}

static void backward_op(tern_model *m, op *o, int n)
{
    value *in = &m->values[o->in];
    value *out = &m->values[o->out];
    size_t hw = (size_t)in->h * (size_t)in->w;
    size_t count = value_floats(out, n);
    tern_pool *pool = m->pool;
    /* Every reader of out has run (ops are in topological order); one with no reader, or
     * none that propagates into it, has a zero gradient. */
    zero_dx_once(out, n);
    switch (o->kind) {
    case OP_CONV: {
        tern_conv_params p = o->conv;
        p.n = n;
        tern_conv2d_backward_mode(in->dx, m->grads + o->w, NULL, m->workspace, out->dx, in->x,
                                  m->params + o->w, &p, take_dx(in), pool);
        break;
    }
    case OP_BN:
        tern_batchnorm_act_backward_mode(in->dx, m->grads + o->w, m->grads + o->b, out->dx,
                                         in->x, o->save_mean, o->save_invstd, m->params + o->w,
                                         m->params + o->b, (size_t)n * hw, in->c, o->act,
                                         take_dx(in), pool);
        break;
    case OP_GN:
        zero_dx_once(in, n);
        tern_groupnorm_backward(in->dx, m->grads + o->w, m->grads + o->b, out->dx, in->x,
                                o->save_mean, o->save_invstd, m->params + o->w, n, hw, in->c,
                                o->groups, pool);
        break;
    case OP_ACT:
        zero_dx_once(in, n);
        tern_act_backward(in->dx, out->dx, in->x, count, o->act, pool);
        break;
    case OP_POOL:
        tern_avgpool_backward_mode(in->dx, out->dx, n, hw, in->c, take_dx(in), pool);
        break;
    case OP_LINEAR:
        tern_linear_backward_mode(in->dx, m->grads + o->w, grad_or_null(m, o->b), out->dx,
                                  in->x, m->params + o->w, n, o->fin, o->fout, take_dx(in),
                                  pool);
        break;
    case OP_SCALE: {
        value *gate = &m->values[o->in2];
        zero_dx_once(gate, n);
        tern_scale_channels_backward_mode(in->dx, gate->dx, out->dx, in->x, gate->x, n, hw,
                                          in->c, take_dx(in), pool);
        break;
    }
    case OP_ADD:
        tern_accumulate_mode(in->dx, out->dx, count, take_dx(in), pool);
        tern_accumulate_mode(m->values[o->in2].dx, out->dx, count, take_dx(&m->values[o->in2]),
                             pool);
        break;
    case OP_DROPOUT:
        zero_dx_once(in, n);
        if (m->dropped)
            tern_dropout_backward(in->dx, out->dx, o->mask, count); /* small: one thread */
        else
            tern_accumulate(in->dx, out->dx, count, pool);
        break;
    }
}

/* ---- folded inference and the ops fused into it --------------------------------------------- */

/* Whether value v is read by exactly one op. */
static bool used_once(const tern_model *m, int v)
{
    int uses = 0;
    for (int i = 0; i < m->nops; i++)
        uses += (m->ops[i].in == v) + ((m->ops[i].kind == OP_SCALE || m->ops[i].kind == OP_ADD) &&
                                       m->ops[i].in2 == v);
    return uses == 1;
}

/* The residual ADD fused into the pointwise conv + BN at ops[i] (a projection: no activation),
 * or NULL. The sum is (conv + bias) + residual, as unfused, so the bits do not change. */
static const op *fusable_add(const tern_model *m, int i)
{
    const op *conv = &m->ops[i], *bn = &m->ops[i + 1];
    if (i + 2 >= m->nops || !is_pointwise(&conv->conv) || bn->act != TERN_ACT_NONE)
        return NULL;
    const op *add = &m->ops[i + 2];
    if (add->kind != OP_ADD || (add->in == bn->out) == (add->in2 == bn->out) ||
        !used_once(m, bn->out))
        return NULL;
    return add;
}

/* Whether the squeeze-and-excitation gate OP_SCALE at ops[i] can be folded into the packing of
 * the pointwise conv's weights after it: batch 1 (one gate vector), the conv reads only the
 * scaled value, and it is folded with its BatchNorm. Rounding differs from the unfused
 * x * s then conv (w * s is rounded instead), within a few ulps of the sum. */
static bool fusable_scale(const tern_model *m, int i, int batch)
{
    const op *scale = &m->ops[i];
    if (batch != 1 || i + 2 >= m->nops)
        return false;
    const op *conv = &m->ops[i + 1], *bn = &m->ops[i + 2];
    return conv->kind == OP_CONV && bn->kind == OP_BN && conv->in == scale->out &&
           is_pointwise(&conv->conv) && used_once(m, scale->out);
}

/* Runs the folded conv + BN + act at ops[i], with the residual add after it and the gate op
 * `scale` before it (or NULL) fused in. Returns the number of ops from i it covered. */
static int forward_folded_conv(tern_model *m, int i, int batch, const op *scale)
{
    const op *o = &m->ops[i], *bn = &m->ops[i + 1];
    tern_conv_params p = o->conv;
    p.n = batch;
    const float *w = m->folded + o->fold, *b = w + conv_weight_count(o);
    const op *add = fusable_add(m, i);
    if (!add && !scale && !o->packed) {
        tern_conv2d_forward(m->values[bn->out].x, m->workspace, m->values[o->in].x, w, b,
                            bn->act, &p, m->pool);
        return 2;
    }
    /* The pointwise path of tern_conv2d_forward, with the fusions and prepacked weights. */
    const size_t rows = (size_t)batch * (size_t)p.h * (size_t)p.w;
    const size_t cin = (size_t)p.cin, cout = (size_t)p.cout;
    const tern_gemm_epilogue ep = {.bias = b, .act = bn->act};
    const tern_gemm_fusion fu = {
        .residual = add ? m->values[add->in == bn->out ? add->in2 : add->in].x : NULL,
        .k_scale = scale ? m->values[scale->in2].x : NULL, .packed_b = o->packed};
    const float *x = scale ? m->values[scale->in].x : m->values[o->in].x;
    float *y = add ? m->values[add->out].x : m->values[bn->out].x;
    tern_gemm_fused(y, cout, x, cin, false, w, cin, true, rows, cout, cin, false, &ep, &fu,
                    m->pool);
    return add ? 3 : 2;
}

/* Whether the pointwise expansion conv + BN + act at ops[i] feeds, alone, the depthwise
 * conv + BN + act at ops[i + 2]: the pair forward_expand_dw runs interleaved. Rows of at least
 * 8 pixels, so that every GEMM of a band has more rows than the GEMM's small-M kernels take
 * (they sum in another order); the small late layers gain nothing from bands anyway. One
 * thread only: with a pool, two pool runs per band (28 bands in the 112x112 layer) put a
 * barrier in each, and on a loaded machine a worker that has lost its core stalls every one
 * of them (measured 1.5x slower at 2 threads under load). */
static bool fusable_expand_dw(const tern_model *m, int i)
{
    if (!m->fuse_floats || tern_pool_size(m->pool) > 1 || i + 3 >= m->nops ||
        m->values[m->ops[i].out].w < 8)
        return false;
    const op *e = &m->ops[i], *ebn = &m->ops[i + 1], *d = &m->ops[i + 2], *dbn = &m->ops[i + 3];
    return e->kind == OP_CONV && ebn->kind == OP_BN && is_pointwise(&e->conv) && e->packed &&
           d->kind == OP_CONV && dbn->kind == OP_BN && d->in == ebn->out &&
           d->conv.groups > 1 && d->conv.groups == d->conv.cin &&
           d->conv.groups == d->conv.cout &&
           (size_t)d->conv.k * (size_t)d->conv.k <= TERN_DW_TAPS_MAX && used_once(m, ebn->out);
}

/* The expansion (ops[i], ops[i + 1]) and the depthwise conv after it (ops[i + 2], ops[i + 3])
 * by bands of output rows, per image: the expansion's rows that the band's depthwise rows read
 * first are computed (a GEMM over those pixels), then the band. The expanded tensor of the early
 * layers (112x112x64 floats: 3.2 MB) no longer round-trips through memory between the two:
 * each band of about fuse_floats floats is read back while still in cache. Same GEMM per
 * element (the row count does not change a C element's sum) and same depthwise kernel, so the
 * bits are those of the unfused pair. Returns the number of ops covered (4). */
static int forward_expand_dw(tern_model *m, int i, int batch)
{
    const op *e = &m->ops[i], *ebn = &m->ops[i + 1], *d = &m->ops[i + 2], *dbn = &m->ops[i + 3];
    const value *xv = &m->values[e->in], *ev = &m->values[ebn->out], *yv = &m->values[dbn->out];
    tern_conv_params dp = d->conv;
    dp.n = 1;
    const size_t cin = (size_t)e->conv.cin, C = (size_t)ev->c, W = (size_t)ev->w;
    const size_t row = W * C, img_in = (size_t)xv->h * W * cin, img_e = (size_t)ev->h * row;
    const size_t img_y = (size_t)yv->h * (size_t)yv->w * C;
    const float *we = m->folded + e->fold, *be = we + conv_weight_count(e);
    const float *wd = m->folded + d->fold, *bd = wd + conv_weight_count(d);
    const tern_gemm_epilogue ep = {.bias = be, .act = ebn->act};
    const tern_gemm_fusion fu = {.packed_b = e->packed};
    size_t band = m->fuse_floats / (row * (size_t)dp.stride);
    band = band < 1 ? 1 : band;
    for (int n = 0; n < batch; n++) {
        const float *x = xv->x + (size_t)n * img_in;
        float *ex = ev->x + (size_t)n * img_e, *y = yv->x + (size_t)n * img_y;
        int done = 0; /* expanded rows [0, done) are computed */
        for (int oy0 = 0; oy0 < dp.oh; oy0 += (int)band) {
            const int oy1 = oy0 + (int)band < dp.oh ? oy0 + (int)band : dp.oh;
            int need = (oy1 - 1) * dp.stride - dp.pad + dp.k;
            need = need < dp.h ? need : dp.h;
            if (need > done) {
                const size_t pix = (size_t)(need - done) * W;
                tern_gemm_fused(ex + (size_t)done * row, C, x + (size_t)done * W * cin, cin,
                                false, we, cin, true, pix, C, cin, false, &ep, &fu, m->pool);
                done = need;
            }
            tern_dwconv_forward_rows(y, ex, wd, bd, dbn->act, &dp, oy0, oy1, m->pool);
        }
    }
    return 4;
}

tern_status tern_model_forward(tern_model *model, float *logits, const float *input, int batch,
                               bool training)
{
    tern_model *m = model;
    if (!logits || !input)
        return model_fail(m, TERN_ERR_INVALID, "NULL input or logits");
    if (!m->arena)
        return model_fail(m, TERN_ERR_STATE, "forward before tern_model_plan");
    if (training && !m->plan_training)
        return model_fail(m, TERN_ERR_STATE, "training forward needs a training plan");
    if (batch < 1 || batch > m->max_batch)
        return model_fail(m, TERN_ERR_INVALID, "batch %d outside the planned [1, %d]", batch,
                          m->max_batch);
    /* As in PyTorch: batch statistics of a single value per channel are meaningless. */
    if (training && m->bn_min_hw < SIZE_MAX && (size_t)batch * m->bn_min_hw < 2)
        return model_fail(m, TERN_ERR_INVALID,
                          "training with BatchNorm needs more than one value per channel: batch "
                          "%d of %dx%d leaves one in the last layers",
                          batch, m->height, m->width);
    m->trained = false;
    unsigned fp_mode = tern_flush_denormals_begin();
    memcpy(m->values[0].x, input, value_floats(&m->values[0], batch) * sizeof(float));
    bool fold = !training && m->opt.norm == TERN_NORM_BATCH;
    if (fold && m->folded_version != m->version)
        refold(m);
    for (int i = 0; i < m->nops;) {
        op *o = &m->ops[i];
        double t0 = m->profiling ? now_seconds() : 0;
        if (fold && fusable_expand_dw(m, i)) {
            /* Profiled as the expansion. */
            i += forward_expand_dw(m, i, batch);
        } else if (fold && o->kind == OP_CONV) {
            /* Convolution, BatchNorm and activation in one kernel call (and a residual add). */
            i += forward_folded_conv(m, i, batch, NULL);
        } else if (fold && o->kind == OP_SCALE && fusable_scale(m, i, batch)) {
            /* The gate goes into the projection's weights; profiled as the projection. */
            const int conv = i + 1;
            i = conv + forward_folded_conv(m, conv, batch, o);
            o = &m->ops[conv];
        } else {
            forward_op(m, o, batch, training);
            i++;
        }
        if (m->profiling) {
            o->seconds[0] += now_seconds() - t0;
            o->calls[0]++;
        }
    }
    tern_flush_denormals_end(fp_mode);
    if (training)
        m->version++; /* running statistics moved */
    const value *last = &m->values[m->nvalues - 1];
    memcpy(logits, last->x, value_floats(last, batch) * sizeof(float));
    m->batch = batch;
    m->trained = training;
    m->dropped = training && m->opt.dropout > 0.0f;
    return TERN_OK;
}

tern_status tern_model_backward(tern_model *model, const float *dlogits)
{
    tern_model *m = model;
    if (!dlogits)
        return model_fail(m, TERN_ERR_INVALID, "NULL dlogits");
    if (!m->trained)
        return model_fail(m, TERN_ERR_STATE, "backward needs a training forward first");
    int n = m->batch;
    unsigned fp_mode = tern_flush_denormals_begin();
    for (int i = 0; i < m->nvalues; i++)
        m->values[i].dx_live = false;
    value *last = &m->values[m->nvalues - 1];
    memcpy(last->dx, dlogits, value_floats(last, n) * sizeof(float));
    last->dx_live = true;
    for (int i = m->nops - 1; i >= 0; i--) {
        double t0 = m->profiling ? now_seconds() : 0;
        backward_op(m, &m->ops[i], n);
        if (m->profiling) {
            m->ops[i].seconds[1] += now_seconds() - t0;
            m->ops[i].calls[1]++;
        }
    }
    tern_flush_denormals_end(fp_mode);
    return TERN_OK;
}

tern_status tern_cross_entropy_loss(float *loss, float *dlogits, const float *logits,
                                    const int32_t *labels, int n, int k, float smoothing)
{
    if (!loss || !logits || !labels || n < 1 || k < 1 || !(smoothing >= 0.0f && smoothing <= 1.0f))
        return TERN_ERR_INVALID;
    for (int i = 0; i < n; i++)
        if (labels[i] < 0 || labels[i] >= k)
            return TERN_ERR_INVALID;
    *loss = tern_cross_entropy(dlogits, logits, labels, n, k, smoothing);
    return TERN_OK;
}

/* ---- profiling ------------------------------------------------------------------------------ */

void tern_model_profile_enable(tern_model *model, bool enable)
{
    model->profiling = enable;
    for (int i = 0; i < model->nops; i++) {
        model->ops[i].seconds[0] = model->ops[i].seconds[1] = 0;
        model->ops[i].calls[0] = model->ops[i].calls[1] = 0;
    }
}

size_t tern_model_profile_count(const tern_model *model)
{
    return (size_t)model->nops;
}

static const char *op_kind_name(const op *o)
{
    switch (o->kind) {
    case OP_CONV:
        return o->conv.k == 1                                  ? "conv1x1"
               : o->conv.groups > 1 && o->conv.groups == o->conv.cin ? "depthwise"
                                                                      : "conv";
    case OP_BN: return "batchnorm";
    case OP_GN: return "groupnorm";
    case OP_ACT: return "activation";
    case OP_POOL: return "avgpool";
    case OP_LINEAR: return "linear";
    case OP_SCALE: return "se_scale";
    case OP_ADD: return "add";
    case OP_DROPOUT: return "dropout";
    }
    return "?";
}

tern_status tern_model_profile_at(const tern_model *model, size_t i, tern_op_profile *out)
{
    if (i >= (size_t)model->nops || !out)
        return TERN_ERR_INVALID;
    const op *o = &model->ops[i];
    const value *v = &model->values[o->out];
    double flops = 0;
    if (o->kind == OP_CONV)
        flops = 2.0 * (double)v->h * v->w * v->c * (o->conv.cin / o->conv.groups) * o->conv.k *
                o->conv.k;
    else if (o->kind == OP_LINEAR)
        flops = 2.0 * o->fin * o->fout;
    *out = (tern_op_profile){.kind = op_kind_name(o), .name = o->name,
                             .out_shape = {v->h, v->w, v->c},
                             .flops_per_image = flops,
                             .forward_s = o->seconds[0], .backward_s = o->seconds[1],
                             .forward_calls = o->calls[0], .backward_calls = o->calls[1]};
    return TERN_OK;
}

/* ---- graph view (nn/model_graph.h) ---------------------------------------------------------- */

int tern_model_graph_value_count(const tern_model *model)
{
    return model->nvalues;
}

int tern_model_graph_value_channels(const tern_model *model, int v)
{
    return model->values[v].c;
}

int tern_model_graph_op_count(const tern_model *model)
{
    return model->nops;
}

void tern_model_graph_op_at(const tern_model *model, int i, tern_graph_op *out)
{
    const op *o = &model->ops[i];
    static const tern_graph_kind kinds[] = {
        [OP_CONV] = TERN_GRAPH_CONV, [OP_BN] = TERN_GRAPH_BN, [OP_GN] = TERN_GRAPH_GN,
        [OP_ACT] = TERN_GRAPH_ACT, [OP_POOL] = TERN_GRAPH_POOL, [OP_LINEAR] = TERN_GRAPH_LINEAR,
        [OP_SCALE] = TERN_GRAPH_SCALE, [OP_ADD] = TERN_GRAPH_ADD,
        [OP_DROPOUT] = TERN_GRAPH_DROPOUT};
    *out = (tern_graph_op){.kind = kinds[o->kind], .in = o->in, .in2 = o->in2, .out = o->out,
                           .conv = o->conv, .fin = o->fin, .fout = o->fout, .act = o->act,
                           .eps = o->eps, .w = param_or_null(model, o->w),
                           .b = param_or_null(model, o->b), .name = o->name};
    if (o->kind == OP_BN) {
        out->mean = model->buffers + o->run_mean;
        out->var = model->buffers + o->run_var;
    }
}

/* ---- training state for per-sample gradients (nn/model_graph.h) ---------------------------- */

void tern_model_graph_value_at(tern_model *model, int v, tern_graph_value *out)
{
    const value *x = &model->values[v];
    *out = (tern_graph_value){.h = x->h, .w = x->w, .c = x->c, .x = x->x, .dx = x->dx};
}

void tern_model_graph_train_op_at(tern_model *model, int i, tern_graph_train_op *out)
{
    const op *o = &model->ops[i];
    *out = (tern_graph_train_op){.dw = grad_or_null(model, o->w), .db = grad_or_null(model, o->b)};
    if (o->kind == OP_GN) {
        out->save_mean = o->save_mean;
        out->save_invstd = o->save_invstd;
        out->groups = o->groups;
    }
}

tern_pool *tern_model_graph_pool(tern_model *model)
{
    return model->pool;
}

int tern_model_graph_plan(const tern_model *model, int *height, int *width, bool *training)
{
    *height = model->height;
    *width = model->width;
    *training = model->plan_training;
    return model->arena ? model->max_batch : 0;
}

void tern_model_graph_set_fuse_floats(tern_model *model, size_t floats)
{
    model->fuse_floats = floats;
}
