/* The quantized MobileNetV3: its own small graph of integer ops, built from a float tern_model.
 *
 * Building (tern_qmodel_create) goes through four steps, each a function below:
 *   1. translate: walk the float model's graph (nn/model_graph.h) and emit one integer op per
 *      fused group: convolution + BatchNorm (folded, in double precision as the float model's
 *      inference does) + activation; fully connected + the activation after it; pool; gate;
 *      add. Dropout disappears (its output aliases its input). The last fully connected layer
 *      becomes LOGITS, whose int32 sums are dequantized to float.
 *   2. calibrate: run the folded float network op by op on the calibration images with Tern's
 *      fp32 kernels and observe each tensor's range (min/max), including the pre-activation
 *      range of ops whose activation is a lookup table (hardswish, hardsigmoid).
 *   3. choose parameters: tern_quant_choose_params per tensor; the pool's output keeps its
 *      input's (TFLite's AVERAGE_POOL_2D); a ReLU is the clamp at the output zero point.
 *   4. quantize: weights per output channel, int32 biases, fixed-point multipliers, lookup
 *      tables, and the packed forms the kernels read.
 * Inference (tern_qmodel_forward) quantizes the input and runs the integer ops in order; every
 * activation has its own int8 buffer (the whole set is a few MB at 224x224, batch 1).
 *
 * Ops read values by index; value 0 is the input. Nothing is computed in place. */
#include "tern/quant.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "kernels.h"
#include "model_graph.h"
#include "pool.h"
#include "qkernels.h"
#include "util.h"

typedef enum qop_kind {
    QOP_CONV1X1,   /* pointwise convolution: GEMM over N*H*W rows */
    QOP_DEPTHWISE, /* direct depthwise convolution */
    QOP_CONV,      /* dense convolution (the stem): im2col, then GEMM */
    QOP_LINEAR,    /* fully connected, int8 out (squeeze-and-excitation, classifier.0) */
    QOP_LOGITS,    /* the last fully connected layer: int32 sums dequantized to float */
    QOP_POOL,      /* global average pool */
    QOP_GATE,      /* squeeze-and-excitation: x * gate broadcast over H, W */
    QOP_ADD,       /* residual */
} qop_kind;

typedef struct qvalue {
    int c, h, w;
    bool used;          /* read or written by some op (or the input) */
    float min, max;     /* range observed in calibration */
    tern_qparams q;
    float *f;           /* calibration: (calib_batch, h, w, c) */
    int8_t *x;          /* inference: (max_batch, h, w, c), in the arena */
} qvalue;

typedef struct qop {
    qop_kind kind;
    char *name;             /* the float layer's weight name, or "" */
    int in, in2, out;       /* values (in2: the gate of GATE, the other addend of ADD) */
    tern_conv_params conv;  /* convolutions; n is set per call */
    int fin, fout;          /* LINEAR, LOGITS */
    tern_act act;           /* applied to the output: RELU as a clamp, others by table */
    float *wf, *bf;         /* float weights (BatchNorm folded) and bias, until quantized */
    float pre_min, pre_max; /* range before the activation */
    tern_qparams pre;       /* parameters before a table activation */
    /* integer form */
    int32_t *bias, *mult, *shift; /* (cout) */
    void *packed;           /* GEMM, DEPTHWISE: packed weights and corrected bias */
    float *deq;             /* LOGITS: input scale * weight scale, per class */
    int8_t lut[256];
    tern_requant rq;
    tern_qadd_params add;
    tern_qgate_params gate;
} qop;

struct tern_qmodel {
    tern_qmodel_options opt;
    tern_qisa isa;
    char error[256];
    int in_channels, num_classes;
    qvalue *values;
    qop *ops;
    int nvalues, nops;
    /* inference memory */
    void *arena;
    int8_t *col;       /* im2col rows of the stem */
    void *workspace;   /* GEMM scratch */
    int32_t *acc;      /* LOGITS sums (max_batch, classes) */
};

static tern_status qfail(tern_qmodel *q, tern_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static tern_status qfail(tern_qmodel *q, tern_status s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->error, sizeof q->error, fmt, ap);
    va_end(ap);
    return s;
}

static const tern_allocator *qalloc(const tern_qmodel *q) { return q->opt.alloc; }

static size_t value_count(const qvalue *v, int batch)
{
    return (size_t)batch * (size_t)v->h * (size_t)v->w * (size_t)v->c;
}

static bool is_table_act(tern_act act)
{
    return act == TERN_ACT_HARDSWISH || act == TERN_ACT_HARDSIGMOID;
}

/* ---- 1. translate ----------------------------------------------------------------------------- */

/* w' = w * s, b' = beta - mean * s per output channel, s = gamma / sqrt(var + eps): the same
 * folding, in the same precision, as the float model's inference. */
static void fold_bn(float *wf, float *bf, const tern_graph_op *conv, const tern_graph_op *bn)
{
    const tern_conv_params *c = &conv->conv;
    size_t per = (size_t)(c->cin / c->groups) * (size_t)c->k * (size_t)c->k;
    for (size_t co = 0; co < (size_t)c->cout; co++) {
        double scale = bn->w[co] / sqrt((double)bn->var[co] + bn->eps);
        for (size_t j = 0; j < per; j++)
            wf[co * per + j] = (float)(conv->w[co * per + j] * scale);
        bf[co] = (float)(bn->b[co] - bn->mean[co] * scale);
    }
}

static tern_status add_op(tern_qmodel *q, const qop *o, const char *name)
{
    qop *slot = &q->ops[q->nops];
    *slot = *o;
    slot->name = tern_strdup(qalloc(q), name ? name : "");
    if (!slot->name)
        return qfail(q, TERN_ERR_NOMEM, "out of memory");
    q->nops++;
    return TERN_OK;
}

static tern_status translate(tern_qmodel *q, const tern_model *m)
{
    const tern_allocator *a = qalloc(q);
    int nf = tern_model_graph_op_count(m), nv = tern_model_graph_value_count(m);
    int *alias = tern_calloc(a, (size_t)nv, sizeof *alias);
    if (!alias)
        return qfail(q, TERN_ERR_NOMEM, "out of memory");
    for (int v = 0; v < nv; v++)
        alias[v] = v;
    tern_status s = TERN_OK;
    for (int i = 0; i < nf && s == TERN_OK;) {
        tern_graph_op g, next = {0};
        tern_model_graph_op_at(m, i, &g);
        bool has_next = i + 1 < nf;
        if (has_next)
            tern_model_graph_op_at(m, i + 1, &next);
        qop o = {.in = alias[g.in], .in2 = g.in2 >= 0 ? alias[g.in2] : -1, .out = g.out};
        switch (g.kind) {
        case TERN_GRAPH_CONV: {
            if (!has_next || next.kind != TERN_GRAPH_BN || next.in != g.out) {
                s = qfail(q, TERN_ERR_UNSUPPORTED,
                          "%s: only convolutions followed by BatchNorm are quantized", g.name);
                break;
            }
            const tern_conv_params *c = &g.conv;
            if (c->k == 1 && c->stride == 1 && c->pad == 0 && c->groups == 1)
                o.kind = QOP_CONV1X1;
            else if (c->groups == c->cin && c->groups == c->cout && c->k * c->k <= TERN_DW_TAPS_MAX)
                o.kind = QOP_DEPTHWISE;
            else if (c->groups == 1)
                o.kind = QOP_CONV;
            else {
                s = qfail(q, TERN_ERR_UNSUPPORTED, "%s: grouped convolution", g.name);
                break;
            }
            o.conv = g.conv;
            o.out = next.out;
            o.act = next.act;
            size_t nw = (size_t)c->cout * (size_t)(c->cin / c->groups) * (size_t)(c->k * c->k);
            o.wf = tern_calloc(a, nw, sizeof(float));
            o.bf = tern_calloc(a, (size_t)c->cout, sizeof(float));
            if (!o.wf || !o.bf) {
                tern_free(a, o.wf);
                tern_free(a, o.bf);
                s = qfail(q, TERN_ERR_NOMEM, "out of memory");
                break;
            }
            fold_bn(o.wf, o.bf, &g, &next);
            if ((s = add_op(q, &o, g.name)) != TERN_OK) {
                tern_free(a, o.wf);
                tern_free(a, o.bf);
            }
            i += 2;
            break;
        }
        case TERN_GRAPH_LINEAR: {
            o.kind = g.out == nv - 1 ? QOP_LOGITS : QOP_LINEAR;
            o.fin = g.fin;
            o.fout = g.fout;
            o.act = TERN_ACT_NONE;
            i++;
            if (o.kind == QOP_LINEAR && has_next && next.kind == TERN_GRAPH_ACT &&
                next.in == g.out) {
                o.act = next.act;
                o.out = next.out;
                i++;
            }
            size_t nw = (size_t)g.fin * (size_t)g.fout;
            o.wf = tern_alloc(a, nw * sizeof(float));
            o.bf = tern_calloc(a, (size_t)g.fout, sizeof(float));
            if (!o.wf || !o.bf) {
                tern_free(a, o.wf);
                tern_free(a, o.bf);
                s = qfail(q, TERN_ERR_NOMEM, "out of memory");
                break;
            }
            memcpy(o.wf, g.w, nw * sizeof(float));
            if (g.b)
                memcpy(o.bf, g.b, (size_t)g.fout * sizeof(float));
            if ((s = add_op(q, &o, g.name)) != TERN_OK) {
                tern_free(a, o.wf);
                tern_free(a, o.bf);
            }
            break;
        }
        case TERN_GRAPH_POOL:
        case TERN_GRAPH_SCALE:
        case TERN_GRAPH_ADD:
            o.kind = g.kind == TERN_GRAPH_POOL ? QOP_POOL : g.kind == TERN_GRAPH_SCALE ? QOP_GATE
                                                                                     : QOP_ADD;
            s = add_op(q, &o, "");
            i++;
            break;
        case TERN_GRAPH_DROPOUT:
            alias[g.out] = alias[g.in];
            i++;
            break;
        case TERN_GRAPH_BN:
        case TERN_GRAPH_GN:
        case TERN_GRAPH_ACT:
            s = qfail(q, TERN_ERR_UNSUPPORTED,
                      "%s: %s outside a convolution or linear layer is not quantized",
                      g.name[0] ? g.name : "op",
                      g.kind == TERN_GRAPH_GN ? "GroupNorm" : g.kind == TERN_GRAPH_BN
                                                                  ? "BatchNorm"
                                                                  : "an activation");
            break;
        }
    }
    tern_free(a, alias);
    return s;
}

/* Spatial sizes of every value for the planned input; marks the values the ops use. */
static void propagate_shapes(tern_qmodel *q)
{
    q->values[0].h = q->opt.height;
    q->values[0].w = q->opt.width;
    q->values[0].used = true;
    for (int i = 0; i < q->nops; i++) {
        qop *o = &q->ops[i];
        const qvalue *in = &q->values[o->in];
        qvalue *out = &q->values[o->out];
        out->used = true;
        switch (o->kind) {
        case QOP_CONV1X1:
        case QOP_DEPTHWISE:
        case QOP_CONV:
            o->conv.h = in->h;
            o->conv.w = in->w;
            tern_conv_params_finish(&o->conv);
            out->h = o->conv.oh;
            out->w = o->conv.ow;
            break;
        case QOP_LINEAR:
        case QOP_LOGITS:
        case QOP_POOL:
            out->h = out->w = 1;
            break;
        case QOP_GATE:
        case QOP_ADD:
            out->h = in->h;
            out->w = in->w;
            break;
        }
    }
}

/* ---- 2. calibrate ------------------------------------------------------------------------- */

static void observe(float *lo, float *hi, const float *x, size_t n)
{
    float a = *lo, b = *hi;
    for (size_t i = 0; i < n; i++) {
        a = x[i] < a ? x[i] : a;
        b = x[i] > b ? x[i] : b;
    }
    *lo = a;
    *hi = b;
}

static void calib_op(tern_qmodel *q, qop *o, int n, float *workspace, tern_pool *pool)
{
    qvalue *in = &q->values[o->in], *out = &q->values[o->out];
    const qvalue *in2 = o->in2 >= 0 ? &q->values[o->in2] : NULL;
    size_t hw = (size_t)in->h * (size_t)in->w, count = value_count(out, n);
    switch (o->kind) {
    case QOP_CONV1X1:
    case QOP_DEPTHWISE:
    case QOP_CONV: {
        tern_conv_params p = o->conv;
        p.n = n;
        tern_conv2d_forward(out->f, workspace, in->f, o->wf, o->bf, TERN_ACT_NONE, &p, pool);
        break;
    }
    case QOP_LINEAR:
    case QOP_LOGITS:
        tern_linear_forward(out->f, in->f, o->wf, o->bf, n, o->fin, o->fout, pool);
        break;
    case QOP_POOL: tern_avgpool_forward(out->f, in->f, n, hw, in->c, pool); break;
    case QOP_GATE: tern_scale_channels_forward(out->f, in->f, in2->f, n, hw, in->c, pool); break;
    case QOP_ADD: tern_add_forward(out->f, in->f, in2->f, count, pool); break;
    }
    observe(&o->pre_min, &o->pre_max, out->f, count);
    if (o->act != TERN_ACT_NONE)
        tern_act_forward(out->f, out->f, count, o->act, pool);
    observe(&out->min, &out->max, out->f, count);
}

static tern_status calibrate(tern_qmodel *q, const float *calib, int ncalib)
{
    const tern_allocator *a = qalloc(q);
    const int cb = q->opt.calib_batch > 0 ? q->opt.calib_batch : 32;
    const int batch = cb < ncalib ? cb : ncalib;
    const int threads = q->opt.threads > 0 ? q->opt.threads : 1;
    tern_pool *pool = NULL;
    float *workspace = NULL;
    tern_status s = tern_pool_create(threads, TERN_ISA_AUTO, a, &pool);
    if (s != TERN_OK)
        return qfail(q, s, "cannot start %d calibration threads", threads);
    size_t ws = 0;
    for (int i = 0; i < q->nops; i++) {
        tern_conv_params p = q->ops[i].conv;
        p.n = batch;
        if (q->ops[i].kind == QOP_CONV1X1 || q->ops[i].kind == QOP_DEPTHWISE ||
            q->ops[i].kind == QOP_CONV) {
            size_t w = tern_conv2d_workspace_size(&p, threads);
            ws = w > ws ? w : ws;
        }
        q->ops[i].pre_min = INFINITY;
        q->ops[i].pre_max = -INFINITY;
    }
    s = TERN_ERR_NOMEM;
    if (!(workspace = tern_calloc(a, ws ? ws : 1, sizeof(float))))
        goto done;
    for (int v = 0; v < q->nvalues; v++) {
        qvalue *val = &q->values[v];
        val->min = INFINITY;
        val->max = -INFINITY;
        if (val->used && !(val->f = tern_alloc(a, value_count(val, batch) * sizeof(float))))
            goto done;
    }
    qvalue *input = &q->values[0];
    size_t image = value_count(input, 1);
    for (int b0 = 0; b0 < ncalib; b0 += batch) {
        int n = ncalib - b0 < batch ? ncalib - b0 : batch;
        memcpy(input->f, calib + (size_t)b0 * image, (size_t)n * image * sizeof(float));
        observe(&input->min, &input->max, input->f, (size_t)n * image);
        for (int i = 0; i < q->nops; i++)
            calib_op(q, &q->ops[i], n, workspace, pool);
    }
    s = TERN_OK;
done:
    for (int v = 0; v < q->nvalues; v++) {
        tern_free(a, q->values[v].f);
        q->values[v].f = NULL;
    }
    tern_free(a, workspace);
    tern_pool_destroy(&pool);
    return s == TERN_OK ? s : qfail(q, s, "out of memory during calibration");
}

/* ---- 3. parameters and 4. quantization ----------------------------------------------------------- */

static void choose_params(tern_qmodel *q)
{
    for (int v = 0; v < q->nvalues; v++)
        if (q->values[v].used)
            q->values[v].q = tern_quant_choose_params(q->values[v].min, q->values[v].max);
    for (int i = 0; i < q->nops; i++) {
        qop *o = &q->ops[i];
        if (o->kind == QOP_POOL) /* TFLite's average pool: the output keeps the input's */
            q->values[o->out].q = q->values[o->in].q;
        if (is_table_act(o->act)) {
            /* Before a hardswish or hardsigmoid, values below -3 (and, for hardsigmoid, above
             * 3) all map to the same output: the range is clipped there, so the steps that
             * matter are finer (at no cost beyond the nudged end point's rounding). */
            float lo = o->pre_min > -3 ? o->pre_min : -3, hi = o->pre_max;
            if (o->act == TERN_ACT_HARDSIGMOID)
                hi = hi < 3 ? hi : 3;
            o->pre = tern_quant_choose_params(lo, hi > lo ? hi : lo);
        }
    }
}

static int32_t saturate_round32(double v)
{
    double r = round(v);
    return r >= 2147483647.0 ? INT32_MAX : r <= -2147483648.0 ? INT32_MIN : (int32_t)r;
}

/* Weights, bias and requantization of a convolution or fully connected op. */
static tern_status quantize_layer(tern_qmodel *q, qop *o)
{
    const tern_allocator *a = qalloc(q);
    const bool linear = o->kind == QOP_LINEAR || o->kind == QOP_LOGITS;
    const int cout = linear ? o->fout : o->conv.cout;
    const int k = linear ? 1 : o->conv.k;
    const int cin_g = linear ? o->fin : o->conv.cin / o->conv.groups;
    const size_t per = (size_t)cin_g * (size_t)k * (size_t)k, nw = (size_t)cout * per;
    const tern_qparams in = q->values[o->in].q, out = q->values[o->out].q;
    const tern_qparams target = is_table_act(o->act) ? o->pre : out;
    int8_t *w = tern_alloc(a, nw), *wt = NULL;
    o->bias = tern_alloc(a, (size_t)cout * sizeof(int32_t));
    o->mult = tern_alloc(a, (size_t)cout * sizeof(int32_t));
    o->shift = tern_alloc(a, (size_t)cout * sizeof(int32_t));
    if (o->kind == QOP_LOGITS)
        o->deq = tern_alloc(a, (size_t)cout * sizeof(float));
    if (!w || !o->bias || !o->mult || !o->shift || (o->kind == QOP_LOGITS && !o->deq))
        goto nomem;
    for (int c = 0; c < cout; c++) {
        const float *wc = o->wf + (size_t)c * per;
        float amax = 0;
        for (size_t j = 0; j < per; j++)
            amax = fabsf(wc[j]) > amax ? fabsf(wc[j]) : amax;
        double ws = amax > 0 ? (double)amax / 127.0 : 1.0;
        /* Stored as float, as a TFLite file would; everything below derives from the float. */
        float wsf = (float)ws;
        for (size_t j = 0; j < per; j++) {
            double r = round(wc[j] / (double)wsf);
            w[(size_t)c * per + j] = (int8_t)(r > 127 ? 127 : r < -127 ? -127 : r);
        }
        double acc_scale = (double)in.scale * (double)wsf;
        o->bias[c] = saturate_round32(o->bf[c] / acc_scale);
        if (o->kind == QOP_LOGITS) {
            o->deq[c] = (float)acc_scale;
            o->mult[c] = o->shift[c] = 0;
            continue;
        }
        int sh;
        if (tern_quant_multiplier(acc_scale / target.scale, &o->mult[c], &sh) != TERN_OK) {
            tern_free(a, w);
            return qfail(q, TERN_ERR_INVALID,
                         "%s: requantization multiplier %g of channel %d is out of range",
                         o->name, acc_scale / target.scale, c);
        }
        o->shift[c] = sh;
    }
    o->rq = (tern_requant){.mult = o->mult, .shift = o->shift, .out_zp = target.zero_point,
                           .qmin = o->act == TERN_ACT_RELU ? target.zero_point : -128,
                           .qmax = 127};
    if (is_table_act(o->act)) {
        tern_quant_lut(o->lut, o->act, o->pre, out);
        o->rq.lut = o->lut;
    }
    if (o->kind == QOP_DEPTHWISE) {
        if (!(o->packed = tern_alloc(a, tern_qdwconv_packed_size(cout, k, q->isa))))
            goto nomem;
        tern_qdwconv_pack(o->packed, w, o->bias, in.zero_point, cout, k, q->isa);
    } else {
        const int8_t *wk = w;
        if (o->kind == QOP_CONV) { /* (Cout, Cin, k, k) -> (Cout, k, k, Cin), im2col's order */
            if (!(wt = tern_alloc(a, nw)))
                goto nomem;
            for (int c = 0; c < cout; c++)
                for (int ci = 0; ci < cin_g; ci++)
                    for (int t = 0; t < k * k; t++)
                        wt[(size_t)c * per + (size_t)t * cin_g + ci] =
                            w[(size_t)c * per + (size_t)ci * k * k + t];
            wk = wt;
        }
        if (!(o->packed = tern_alloc(a, tern_qgemm_packed_size((size_t)cout, per, q->isa))))
            goto nomem;
        tern_qgemm_pack(o->packed, wk, o->bias, in.zero_point, (size_t)cout, per, q->isa);
    }
    tern_free(a, w);
    tern_free(a, wt);
    return TERN_OK;
nomem:
    tern_free(a, w);
    tern_free(a, wt);
    return qfail(q, TERN_ERR_NOMEM, "out of memory");
}

static tern_status quantize_ops(tern_qmodel *q)
{
    const tern_allocator *a = qalloc(q);
    for (int i = 0; i < q->nops; i++) {
        qop *o = &q->ops[i];
        tern_status s = TERN_OK;
        const tern_qparams in = q->values[o->in].q, out = q->values[o->out].q;
        switch (o->kind) {
        case QOP_CONV1X1:
        case QOP_DEPTHWISE:
        case QOP_CONV:
        case QOP_LINEAR:
        case QOP_LOGITS:
            s = quantize_layer(q, o);
            break;
        case QOP_ADD:
            if (tern_quant_add_params(&o->add, in, q->values[o->in2].q, out) != TERN_OK)
                s = qfail(q, TERN_ERR_INVALID, "residual add %d: scales out of range", i);
            break;
        case QOP_GATE: {
            const tern_qparams g = q->values[o->in2].q;
            int sh;
            o->gate = (tern_qgate_params){.x_zp = in.zero_point, .g_zp = g.zero_point,
                                   .out_zp = out.zero_point};
            if (tern_quant_multiplier((double)in.scale * g.scale / out.scale, &o->gate.mult,
                                      &sh) != TERN_OK)
                s = qfail(q, TERN_ERR_INVALID, "gate %d: scales out of range", i);
            o->gate.shift = sh;
            break;
        }
        case QOP_POOL:
            break;
        }
        if (s != TERN_OK)
            return s;
        tern_free(a, o->wf);
        tern_free(a, o->bf);
        o->wf = o->bf = NULL;
    }
    return TERN_OK;
}

/* Int8 buffers of every value, the stem's im2col rows, GEMM scratch, logits sums. */
static tern_status plan_inference(tern_qmodel *q)
{
    const int nb = q->opt.max_batch;
    size_t total = 0, col = 0, ws = 0, offsets[3];
    for (int v = 0; v < q->nvalues; v++)
        if (q->values[v].used)
            total += (value_count(&q->values[v], nb) + 63) / 64 * 64;
    for (int i = 0; i < q->nops; i++) {
        const qop *o = &q->ops[i];
        size_t K = 0, N = 0, w = 0;
        if (o->kind == QOP_CONV) {
            K = (size_t)o->conv.cin * o->conv.k * o->conv.k;
            size_t c = (size_t)nb * o->conv.oh * o->conv.ow * K;
            col = c > col ? c : col;
            N = (size_t)o->conv.cout;
        } else if (o->kind == QOP_CONV1X1) {
            K = (size_t)o->conv.cin;
            N = (size_t)o->conv.cout;
        } else if (o->kind == QOP_LINEAR || o->kind == QOP_LOGITS) {
            K = (size_t)o->fin;
            N = (size_t)o->fout;
        }
        if (o->kind == QOP_DEPTHWISE)
            w = tern_qdwconv_workspace_size(&o->conv, q->isa);
        else if (K)
            w = tern_qgemm_workspace_size(N, K, q->isa);
        ws = w > ws ? w : ws;
    }
    offsets[0] = total;
    total += (col + 63) / 64 * 64;
    offsets[1] = total;
    total += (ws + 63) / 64 * 64;
    offsets[2] = total;
    total += (size_t)nb * (size_t)q->num_classes * sizeof(int32_t);
    char *arena = tern_alloc(qalloc(q), total);
    if (!arena)
        return qfail(q, TERN_ERR_NOMEM, "cannot allocate %zu bytes of int8 activations", total);
    size_t at = 0;
    for (int v = 0; v < q->nvalues; v++)
        if (q->values[v].used) {
            q->values[v].x = (int8_t *)(arena + at);
            at += (value_count(&q->values[v], nb) + 63) / 64 * 64;
        }
    q->arena = arena;
    q->col = (int8_t *)(arena + offsets[0]);
    q->workspace = arena + offsets[1];
    q->acc = (int32_t *)(arena + offsets[2]);
    return TERN_OK;
}

/* ---- life cycle --------------------------------------------------------------------------------- */

static tern_status check_options(const tern_model *model, const tern_qmodel_options *o,
                                 tern_error *err)
{
    if (o->height < 32 || o->width < 32 || o->height > 16384 || o->width > 16384)
        return tern_set_error(err, TERN_ERR_INVALID, "input size %dx%d outside [32, 16384]",
                              o->height, o->width);
    if (o->max_batch < 1 || o->max_batch > 65536)
        return tern_set_error(err, TERN_ERR_INVALID, "max_batch %d outside [1, 65536]",
                              o->max_batch);
    if (o->calib_batch < 0 || o->calib_batch > 65536)
        return tern_set_error(err, TERN_ERR_INVALID, "calib_batch %d outside [0, 65536]",
                              o->calib_batch);
    if (o->threads < 0 || o->threads > 256)
        return tern_set_error(err, TERN_ERR_INVALID, "threads %d outside [0, 256]", o->threads);
    if (o->observer != TERN_QUANT_OBSERVER_MINMAX)
        return tern_set_error(err, TERN_ERR_INVALID, "unknown observer %d", (int)o->observer);
    if (o->isa < TERN_QISA_AUTO || o->isa > TERN_QISA_AVX512_VNNI)
        return tern_set_error(err, TERN_ERR_INVALID, "unknown instruction set %d", (int)o->isa);
    if (tern_model_options_of(model)->norm != TERN_NORM_BATCH)
        return tern_set_error(err, TERN_ERR_UNSUPPORTED,
                              "only BatchNorm models are quantized (GroupNorm does not fold)");
    return TERN_OK;
}

tern_status tern_qmodel_create(const tern_model *model, const float *calib, int ncalib,
                               const tern_qmodel_options *opt, tern_qmodel **out,
                               tern_error *err)
{
    if (!model || !calib || !opt || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    if (ncalib < 1)
        return tern_set_error(err, TERN_ERR_INVALID, "need at least one calibration image");
    tern_status s = check_options(model, opt, err);
    if (s != TERN_OK)
        return s;
    tern_qmodel *q = tern_calloc(opt->alloc, 1, sizeof *q);
    if (!q)
        return tern_set_error(err, TERN_ERR_NOMEM, "out of memory");
    q->opt = *opt;
    q->isa = tern_qisa_resolve(opt->isa);
    const tern_model_options *mo = tern_model_options_of(model);
    q->in_channels = mo->in_channels;
    q->num_classes = mo->num_classes;
    q->nvalues = tern_model_graph_value_count(model);
    q->values = tern_calloc(opt->alloc, (size_t)q->nvalues, sizeof *q->values);
    /* at most one integer op per float op */
    q->ops = tern_calloc(opt->alloc, (size_t)tern_model_graph_op_count(model), sizeof *q->ops);
    if (!q->values || !q->ops) {
        s = qfail(q, TERN_ERR_NOMEM, "out of memory");
        goto fail;
    }
    for (int v = 0; v < q->nvalues; v++)
        q->values[v].c = tern_model_graph_value_channels(model, v);
    if ((s = translate(q, model)) != TERN_OK)
        goto fail;
    propagate_shapes(q);
    if ((s = calibrate(q, calib, ncalib)) != TERN_OK)
        goto fail;
    choose_params(q);
    if ((s = quantize_ops(q)) != TERN_OK || (s = plan_inference(q)) != TERN_OK)
        goto fail;
    *out = q;
    return TERN_OK;
fail:
    tern_set_error(err, s, "quantizing the model: %s", q->error);
    tern_qmodel_destroy(&q);
    return s;
}

void tern_qmodel_destroy(tern_qmodel **qmodel)
{
    if (!qmodel || !*qmodel)
        return;
    tern_qmodel *q = *qmodel;
    const tern_allocator *a = qalloc(q);
    for (int i = 0; q->ops && i < q->nops; i++) {
        qop *o = &q->ops[i];
        tern_free(a, o->name);
        tern_free(a, o->wf);
        tern_free(a, o->bf);
        tern_free(a, o->bias);
        tern_free(a, o->mult);
        tern_free(a, o->shift);
        tern_free(a, o->packed);
        tern_free(a, o->deq);
    }
    for (int v = 0; q->values && v < q->nvalues; v++)
        tern_free(a, q->values[v].f);
    tern_free(a, q->ops);
    tern_free(a, q->values);
    tern_free(a, q->arena);
    tern_free(a, q);
    *qmodel = NULL;
}

/* ---- inference --------------------------------------------------------------------------------- */

static void forward_op(tern_qmodel *q, const qop *o, int n, float *logits)
{
    const qvalue *in = &q->values[o->in], *out = &q->values[o->out];
    const qvalue *in2 = o->in2 >= 0 ? &q->values[o->in2] : NULL;
    const size_t hw = (size_t)in->h * (size_t)in->w;
    tern_conv_params p = o->conv;
    p.n = n;
    switch (o->kind) {
    case QOP_CONV1X1:
        tern_qgemm(out->x, NULL, (size_t)p.cout, in->x, (size_t)p.cin, o->packed, q->workspace,
                   (size_t)n * hw, (size_t)p.cout, (size_t)p.cin, &o->rq, q->isa);
        break;
    case QOP_CONV: {
        size_t K = (size_t)p.cin * p.k * p.k;
        tern_qim2col(q->col, K, in->x, in->q.zero_point, &p);
        tern_qgemm(out->x, NULL, (size_t)p.cout, q->col, K, o->packed, q->workspace,
                   (size_t)n * p.oh * p.ow, (size_t)p.cout, K, &o->rq, q->isa);
        break;
    }
    case QOP_DEPTHWISE:
        tern_qdwconv(out->x, in->x, in->q.zero_point, o->packed, q->workspace, &p, &o->rq,
                     q->isa);
        break;
    case QOP_LINEAR:
        tern_qgemm(out->x, NULL, (size_t)o->fout, in->x, (size_t)o->fin, o->packed, q->workspace,
                   (size_t)n, (size_t)o->fout, (size_t)o->fin, &o->rq, q->isa);
        break;
    case QOP_LOGITS:
        tern_qgemm(NULL, q->acc, (size_t)o->fout, in->x, (size_t)o->fin, o->packed,
                   q->workspace, (size_t)n, (size_t)o->fout, (size_t)o->fin, NULL, q->isa);
        for (int i = 0; i < n; i++)
            for (int c = 0; c < o->fout; c++)
                logits[(size_t)i * o->fout + c] =
                    (float)q->acc[(size_t)i * o->fout + c] * o->deq[c];
        break;
    case QOP_POOL:
        tern_qavgpool(out->x, in->x, n, hw, in->c, q->isa);
        break;
    case QOP_GATE:
        tern_qgate(out->x, in->x, in2->x, n, hw, in->c, &o->gate, q->isa);
        break;
    case QOP_ADD:
        tern_qadd(out->x, in->x, in2->x, value_count(out, n), &o->add, q->isa);
        break;
    }
}

tern_status tern_qmodel_forward(tern_qmodel *qmodel, float *logits, const float *input,
                                int batch)
{
    tern_qmodel *q = qmodel;
    if (!logits || !input)
        return qfail(q, TERN_ERR_INVALID, "NULL input or logits");
    if (batch < 1 || batch > q->opt.max_batch)
        return qfail(q, TERN_ERR_INVALID, "batch %d outside [1, %d]", batch, q->opt.max_batch);
    qvalue *x = &q->values[0];
    tern_quantize_array(x->x, input, value_count(x, batch), x->q, q->isa);
    for (int i = 0; i < q->nops; i++)
        forward_op(q, &q->ops[i], batch, logits);
    return TERN_OK;
}

static double seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

tern_status tern_qmodel_forward_profile(tern_qmodel *qmodel, float *logits, const float *input,
                                        int batch, double *op_seconds)
{
    tern_qmodel *q = qmodel;
    if (!logits || !input || !op_seconds)
        return qfail(q, TERN_ERR_INVALID, "NULL input, logits or op_seconds");
    if (batch < 1 || batch > q->opt.max_batch)
        return qfail(q, TERN_ERR_INVALID, "batch %d outside [1, %d]", batch, q->opt.max_batch);
    qvalue *x = &q->values[0];
    double t0 = seconds();
    tern_quantize_array(x->x, input, value_count(x, batch), x->q, q->isa);
    double t1 = seconds();
    op_seconds[0] += t1 - t0;
    for (int i = 0; i < q->nops; i++) {
        forward_op(q, &q->ops[i], batch, logits);
        t0 = t1;
        t1 = seconds();
        op_seconds[i + 1] += t1 - t0;
    }
    return TERN_OK;
}

/* ---- introspection ----------------------------------------------------------------------------- */

const char *tern_qmodel_last_error(const tern_qmodel *qmodel)
{
    return qmodel->error;
}

tern_qisa tern_qmodel_isa(const tern_qmodel *qmodel)
{
    return qmodel->isa;
}

tern_qparams tern_qmodel_input_params(const tern_qmodel *qmodel)
{
    return qmodel->values[0].q;
}

size_t tern_qmodel_op_count(const tern_qmodel *qmodel)
{
    return (size_t)qmodel->nops;
}

tern_status tern_qmodel_op_at(const tern_qmodel *qmodel, size_t i, const char **kind,
                              const char **name, tern_qparams *out)
{
    static const char *const kinds[] = {
        [QOP_CONV1X1] = "conv1x1", [QOP_DEPTHWISE] = "depthwise", [QOP_CONV] = "conv",
        [QOP_LINEAR] = "linear", [QOP_LOGITS] = "logits", [QOP_POOL] = "avgpool",
        [QOP_GATE] = "se_gate", [QOP_ADD] = "add"};
    if (i >= (size_t)qmodel->nops)
        return TERN_ERR_INVALID;
    const qop *o = &qmodel->ops[i];
    if (kind)
        *kind = kinds[o->kind];
    if (name)
        *name = o->name;
    if (out)
        *out = qmodel->values[o->out].q;
    return TERN_OK;
}

tern_status tern_qmodel_op_info(const tern_qmodel *qmodel, size_t i, tern_qop_info *info)
{
    if (!info || tern_qmodel_op_at(qmodel, i, &info->kind, &info->name, &info->out) != TERN_OK)
        return TERN_ERR_INVALID;
    const qop *o = &qmodel->ops[i];
    const qvalue *in = &qmodel->values[o->in], *out = &qmodel->values[o->out];
    bool conv = o->kind == QOP_CONV1X1 || o->kind == QOP_DEPTHWISE || o->kind == QOP_CONV;
    info->in_h = in->h;
    info->in_w = in->w;
    info->in_c = in->c;
    info->out_h = out->h;
    info->out_w = out->w;
    info->out_c = out->c;
    info->k = conv ? o->conv.k : 0;
    info->stride = conv ? o->conv.stride : 0;
    return TERN_OK;
}
