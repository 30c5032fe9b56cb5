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
 *   4. quantize: weights per output channel, int32 biases, requantization scales, lookup
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
#include "qmodel_internal.h"
#include "util.h"

tern_status tern_qmodel_fail(tern_qmodel *q, tern_status s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->error, sizeof q->error, fmt, ap);
    va_end(ap);
    return s;
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
    slot->name = tern_strdup(tern_qmodel_alloc(q), name ? name : "");
    if (!slot->name)
        return tern_qmodel_fail(q, TERN_ERR_NOMEM, "out of memory");
    q->nops++;
    return TERN_OK;
}

static tern_status translate(tern_qmodel *q, const tern_model *m)
{
    const tern_allocator *a = tern_qmodel_alloc(q);
    int nf = tern_model_graph_op_count(m), nv = tern_model_graph_value_count(m);
    int *alias = tern_calloc(a, (size_t)nv, sizeof *alias);
    if (!alias)
        return tern_qmodel_fail(q, TERN_ERR_NOMEM, "out of memory");
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
                s = tern_qmodel_fail(q, TERN_ERR_UNSUPPORTED,
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
                s = tern_qmodel_fail(q, TERN_ERR_UNSUPPORTED, "%s: grouped convolution", g.name);
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
                s = tern_qmodel_fail(q, TERN_ERR_NOMEM, "out of memory");
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
                s = tern_qmodel_fail(q, TERN_ERR_NOMEM, "out of memory");
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
            s = tern_qmodel_fail(q, TERN_ERR_UNSUPPORTED,
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
void tern_qmodel_propagate_shapes(tern_qmodel *q)
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

/* The ranges a pre-activation's parameters are chosen from: values below -3 (and, for
 * hardsigmoid, above 3) all map to the same output, so the range is clipped there and the steps
 * that matter are finer (at no cost beyond the nudged end point's rounding). */
static void pre_range(const qop *o, float *lo, float *hi)
{
    float a = o->pre_min > -3 ? o->pre_min : -3, b = o->pre_max;
    if (o->act == TERN_ACT_HARDSIGMOID)
        b = b < 3 ? b : 3;
    *lo = a;
    *hi = b > a ? b : a;
}

static bool hist_start(qhist *h, const tern_allocator *a, float lo, float hi)
{
    h->lo = lo < 0 ? lo : 0;
    h->hi = hi > 0 ? hi : 0;
    if (!(h->hi - h->lo > 1e-12f) || !isfinite(h->lo) || !isfinite(h->hi))
        return true; /* a constant (or unseen) tensor: min/max is all there is */
    h->count = tern_calloc(a, QHIST_BINS, sizeof(double));
    return h->count != NULL;
}

static bool start_histograms(tern_qmodel *q)
{
    const tern_allocator *a = tern_qmodel_alloc(q);
    for (int v = 0; v < q->nvalues; v++)
        if (q->values[v].used &&
            !hist_start(&q->values[v].hist, a, q->values[v].min, q->values[v].max))
            return false;
    for (int i = 0; i < q->nops; i++) {
        qop *o = &q->ops[i];
        float lo, hi;
        pre_range(o, &lo, &hi);
        if (tern_qact_is_table(o->act) && !hist_start(&o->pre_hist, a, lo, hi))
            return false;
    }
    return true;
}

/* KL divergence between the histogram clipped to its first i bins (outliers added to the last)
 * and that clipped histogram quantized to `levels` levels (each level's count spread evenly
 * over its non-empty bins), as TensorRT's entropy calibrator. */
static double clip_kl(const double *h, int nb, int i, int levels)
{
    double outliers = 0, psum = 0, qsum = 0, kl = 0;
    for (int j = i; j < nb; j++)
        outliers += h[j];
    for (int j = 0; j < i; j++)
        psum += h[j];
    psum += outliers;
    if (psum <= 0)
        return 0;
    /* Q: per level, the sum and non-empty count of its bins */
    double qv[256];
    for (int l = 0; l < levels; l++) {
        int j0 = (int)((long)l * i / levels), j1 = (int)((long)(l + 1) * i / levels);
        double sum = 0;
        int nz = 0;
        for (int j = j0; j < j1; j++) {
            sum += h[j];
            nz += h[j] > 0;
        }
        qv[l] = nz ? sum / nz : 0;
        qsum += sum;
    }
    if (qsum <= 0)
        return INFINITY;
    for (int j = 0; j < i; j++) {
        double pj = h[j] + (j == i - 1 ? outliers : 0);
        if (pj <= 0)
            continue;
        int l = (int)((long)j * levels / i);
        double qj = h[j] > 0 ? qv[l] : 0;
        /* a bin Q leaves empty that P fills: TensorRT smooths with a small epsilon */
        double pn = pj / psum, qn = qj > 0 ? qj / qsum : 1e-4 / qsum;
        kl += pn * log(pn / qn);
    }
    return kl;
}

/* The range an observer picks from a histogram (min/max when there is none). */
static void hist_range(const qhist *h, const tern_qmodel_options *opt, float *lo, float *hi)
{
    if (!h->count)
        return;
    const double bw = ((double)h->hi - h->lo) / QHIST_BINS;
    double total = 0;
    for (int j = 0; j < QHIST_BINS; j++)
        total += h->count[j];
    if (total <= 0)
        return;
    if (opt->observer == TERN_QUANT_OBSERVER_PERCENTILE) {
        double p = (opt->percentile > 0 ? opt->percentile : 99.99) / 100;
        double below = 0;
        int jl = 0, jh = QHIST_BINS - 1;
        for (int j = 0; j < QHIST_BINS; j++) { /* lowest bin with more than 1 - p below it */
            below += h->count[j];
            if (below > (1 - p) * total) {
                jl = j;
                break;
            }
        }
        below = 0;
        for (int j = QHIST_BINS - 1; j >= 0; j--) {
            below += h->count[j];
            if (below > (1 - p) * total) {
                jh = j;
                break;
            }
        }
        float l = (float)fmin(h->lo + jl * bw, 0), u = (float)fmax(h->lo + (jh + 1) * bw, 0);
        *lo = l > *lo ? l : *lo; /* only ever narrower than min/max */
        *hi = u < *hi ? u : *hi;
        return;
    }
    /* entropy: the larger side, folded at zero into its own histogram */
    const bool pos = h->hi >= -h->lo;
    const double extent = pos ? h->hi : -h->lo;
    const int z = (int)lround(-h->lo / bw); /* bins below zero */
    const int nb = pos ? QHIST_BINS - z : z;
    if (nb < 16)
        return;
    double side[QHIST_BINS];
    for (int j = 0; j < nb; j++)
        side[j] = pos ? h->count[z + j] : h->count[z - 1 - j];
    int levels = (int)lround(255.0 * extent / ((double)h->hi - h->lo));
    levels = levels < 8 ? 8 : levels > 255 ? 255 : levels;
    if (nb <= levels)
        return;
    /* Thresholds that clip more than 1% of the side are not tried: where all the mass sits far
     * from zero (a sigmoid's output) or there are few samples (a squeeze-and-excitation
     * vector), a threshold that folds everything into one bin has a KL divergence of zero. */
    double mass = 0, seen = 0;
    for (int j = 0; j < nb; j++)
        mass += side[j];
    int first = levels;
    for (int j = 0; j < nb; j++) {
        seen += side[j];
        if (seen >= 0.99 * mass) {
            first = j + 1 > levels ? j + 1 : levels;
            break;
        }
    }
    int best = nb;
    double best_kl = INFINITY;
    for (int i = first; i <= nb; i += i < nb - 4 ? 4 : 1) {
        double kl = clip_kl(side, nb, i, levels);
        if (kl < best_kl) {
            best_kl = kl;
            best = i;
        }
    }
    /* the threshold clips the larger side, and the other one if it reaches that far */
    float t = (float)(best * bw);
    *hi = t < *hi ? t : *hi;
    *lo = -t > *lo ? -t : *lo;
}


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

static void hist_add(qhist *h, const float *x, size_t n)
{
    if (!h->count)
        return;
    const double scale = QHIST_BINS / ((double)h->hi - (double)h->lo);
    for (size_t i = 0; i < n; i++) {
        double b = ((double)x[i] - h->lo) * scale;
        int j = b < 0 ? 0 : b >= QHIST_BINS ? QHIST_BINS - 1 : (int)b;
        h->count[j] += 1;
    }
}

static void calib_op(tern_qmodel *q, qop *o, int n, float *workspace, tern_pool *pool, int pass)
{
    qvalue *in = &q->values[o->in], *out = &q->values[o->out];
    const qvalue *in2 = o->in2 >= 0 ? &q->values[o->in2] : NULL;
    size_t hw = (size_t)in->h * (size_t)in->w, count = tern_qvalue_count(out, n);
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
    if (pass == 0)
        observe(&o->pre_min, &o->pre_max, out->f, count);
    else
        hist_add(&o->pre_hist, out->f, count);
    if (o->act != TERN_ACT_NONE)
        tern_act_forward(out->f, out->f, count, o->act, pool);
    if (pass == 0)
        observe(&out->min, &out->max, out->f, count);
    else
        hist_add(&out->hist, out->f, count);
}

static tern_status calibrate(tern_qmodel *q, const float *calib, int ncalib)
{
    const tern_allocator *a = tern_qmodel_alloc(q);
    const int cb = q->opt.calib_batch > 0 ? q->opt.calib_batch : 32;
    const int batch = cb < ncalib ? cb : ncalib;
    const int threads = q->opt.threads > 0 ? q->opt.threads : 1;
    tern_pool *pool = NULL;
    float *workspace = NULL;
    tern_status s = tern_pool_create(threads, TERN_ISA_AUTO, a, &pool);
    if (s != TERN_OK)
        return tern_qmodel_fail(q, s, "cannot start %d calibration threads", threads);
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
        if (val->used && !(val->f = tern_alloc(a, tern_qvalue_count(val, batch) * sizeof(float))))
            goto done;
    }
    qvalue *input = &q->values[0];
    size_t image = tern_qvalue_count(input, 1);
    const int passes = q->opt.observer == TERN_QUANT_OBSERVER_MINMAX ? 1 : 2;
    for (int pass = 0; pass < passes; pass++) {
        if (pass == 1 && !start_histograms(q)) {
            s = TERN_ERR_NOMEM;
            goto done;
        }
        for (int b0 = 0; b0 < ncalib; b0 += batch) {
            int n = ncalib - b0 < batch ? ncalib - b0 : batch;
            memcpy(input->f, calib + (size_t)b0 * image, (size_t)n * image * sizeof(float));
            if (pass == 0)
                observe(&input->min, &input->max, input->f, (size_t)n * image);
            else
                hist_add(&input->hist, input->f, (size_t)n * image);
            for (int i = 0; i < q->nops; i++)
                calib_op(q, &q->ops[i], n, workspace, pool, pass);
        }
    }
    s = TERN_OK;
done:
    for (int v = 0; v < q->nvalues; v++) {
        tern_free(a, q->values[v].f);
        q->values[v].f = NULL;
    }
    tern_free(a, workspace);
    tern_pool_destroy(&pool);
    return s == TERN_OK ? s : tern_qmodel_fail(q, s, "out of memory during calibration");
}

/* ---- 3. parameters and 4. quantization ----------------------------------------------------------- */

static void choose_params(tern_qmodel *q)
{
    for (int v = 0; v < q->nvalues; v++)
        if (q->values[v].used) {
            float lo = q->values[v].min, hi = q->values[v].max;
            hist_range(&q->values[v].hist, &q->opt, &lo, &hi);
            q->values[v].q = tern_quant_choose_params(lo, hi);
        }
    for (int i = 0; i < q->nops; i++) {
        qop *o = &q->ops[i];
        if (o->kind == QOP_POOL) /* TFLite's average pool: the output keeps the input's */
            q->values[o->out].q = q->values[o->in].q;
        if (tern_qact_is_table(o->act)) {
            float lo, hi;
            pre_range(o, &lo, &hi);
            hist_range(&o->pre_hist, &q->opt, &lo, &hi);
            o->pre = tern_quant_choose_params(lo, hi);
        }
    }
}

static void free_histograms(tern_qmodel *q)
{
    for (int v = 0; v < q->nvalues; v++) {
        tern_free(tern_qmodel_alloc(q), q->values[v].hist.count);
        q->values[v].hist.count = NULL;
    }
    for (int i = 0; i < q->nops; i++) {
        tern_free(tern_qmodel_alloc(q), q->ops[i].pre_hist.count);
        q->ops[i].pre_hist.count = NULL;
    }
}

static int32_t saturate_round32(double v)
{
    double r = round(v);
    return r >= 2147483647.0 ? INT32_MAX : r <= -2147483648.0 ? INT32_MIN : (int32_t)r;
}

/* Weights, bias and requantization of a convolution or fully connected op. */
/* Output channels, kernel size and inputs per output of a layer; per = weights per output. */
static void layer_dims(const qop *o, int *cout, int *k, int *cin_g, size_t *per)
{
    const bool linear = o->kind == QOP_LINEAR || o->kind == QOP_LOGITS;
    *cout = linear ? o->fout : o->conv.cout;
    *k = linear ? 1 : o->conv.k;
    *cin_g = linear ? o->fin : o->conv.cin / o->conv.groups;
    *per = (size_t)*cin_g * (size_t)*k * (size_t)*k;
}

/* Int8 weights with their per-channel scales and the int32 bias, from the float ones. */
static tern_status quantize_weights(tern_qmodel *q, qop *o)
{
    const tern_allocator *a = tern_qmodel_alloc(q);
    int cout, k, cin_g;
    size_t per;
    layer_dims(o, &cout, &k, &cin_g, &per);
    const tern_qparams in = q->values[o->in].q;
    o->wq = tern_alloc(a, (size_t)cout * per);
    o->wscale = tern_alloc(a, (size_t)cout * sizeof(float));
    o->bias = tern_alloc(a, (size_t)cout * sizeof(int32_t));
    if (!o->wq || !o->wscale || !o->bias)
        return tern_qmodel_fail(q, TERN_ERR_NOMEM, "out of memory");
    for (int c = 0; c < cout; c++) {
        const float *wc = o->wf + (size_t)c * per;
        float amax = 0;
        for (size_t j = 0; j < per; j++)
            amax = fabsf(wc[j]) > amax ? fabsf(wc[j]) : amax;
        /* Stored as float, as a TFLite file would; everything below derives from the float. */
        float wsf = (float)(amax > 0 ? (double)amax / 127.0 : 1.0);
        for (size_t j = 0; j < per; j++) {
            double r = round(wc[j] / (double)wsf);
            o->wq[(size_t)c * per + j] = (int8_t)(r > 127 ? 127 : r < -127 ? -127 : r);
        }
        o->wscale[c] = wsf;
        o->bias[c] = saturate_round32(o->bf[c] / ((double)in.scale * (double)wsf));
    }
    return TERN_OK;
}

/* Requantization, lookup table and packed weights of a layer, from wq, wscale, bias and the
 * parameters of its tensors (what a quantized file holds). */
static tern_status finish_layer(tern_qmodel *q, qop *o)
{
    const tern_allocator *a = tern_qmodel_alloc(q);
    int cout, k, cin_g;
    size_t per;
    layer_dims(o, &cout, &k, &cin_g, &per);
    const size_t nw = (size_t)cout * per;
    const tern_qparams in = q->values[o->in].q, out = q->values[o->out].q;
    const tern_qparams target = tern_qact_is_table(o->act) ? o->pre : out;
    int8_t *wt = NULL;
    const bool fixed = q->opt.requant == TERN_REQUANT_FIXED && o->kind != QOP_LOGITS;
    o->rqscale = tern_alloc(a, (size_t)cout * sizeof(float));
    if (o->kind == QOP_LOGITS)
        o->deq = tern_alloc(a, (size_t)cout * sizeof(float));
    if (fixed)
        o->rqfixed = tern_alloc(a, 2 * (size_t)cout * sizeof(int32_t));
    if (!o->rqscale || (o->kind == QOP_LOGITS && !o->deq) || (fixed && !o->rqfixed))
        goto nomem;
    for (int c = 0; c < cout; c++) {
        double acc_scale = (double)in.scale * (double)o->wscale[c];
        if (o->kind == QOP_LOGITS) {
            o->deq[c] = (float)acc_scale;
            o->rqscale[c] = 1;
            continue;
        }
        float sc = (float)(acc_scale / target.scale);
        if (!isfinite(sc) || !(sc > 0))
            return tern_qmodel_fail(q, TERN_ERR_INVALID,
                                    "%s: requantization scale %g of channel %d is out of range",
                                    o->name, acc_scale / target.scale, c);
        o->rqscale[c] = sc;
        /* the fixed mode's multiplier from the same ratio, in double as TFLite computes it */
        double real = acc_scale / target.scale;
        if (fixed && tern_requant_fixed_params(o->rqfixed + c, o->rqfixed + cout + c, &real, 1))
            return tern_qmodel_fail(q, TERN_ERR_INVALID,
                                    "%s: requantization scale %g of channel %d has no fixed-point "
                                    "form", o->name, real, c);
    }
    o->rq = (tern_requant){.mode = fixed ? TERN_REQUANT_FIXED : TERN_REQUANT_FLOAT,
                           .scale = o->rqscale,
                           .multiplier = fixed ? o->rqfixed : NULL,
                           .shift = fixed ? o->rqfixed + cout : NULL,
                           .out_zp = target.zero_point,
                           .qmin = o->act == TERN_ACT_RELU ? target.zero_point : -128,
                           .qmax = 127};
    if (tern_qact_is_table(o->act)) {
        tern_quant_lut(o->lut, o->act, o->pre, out);
        o->rq.lut = o->lut;
    }
    if (o->kind == QOP_DEPTHWISE) {
        if (!(o->packed = tern_alloc(a, tern_qdwconv_packed_size(cout, k, q->isa))))
            goto nomem;
        tern_qdwconv_pack(o->packed, o->wq, o->bias, in.zero_point, cout, k, q->isa);
    } else if (o->kind == QOP_CONV && tern_qconv_direct_supported(&o->conv)) {
        if (!(o->packed = tern_alloc(a, tern_qconv_direct_packed_size(&o->conv, q->isa))))
            goto nomem;
        tern_qconv_direct_pack(o->packed, o->wq, o->bias, in.zero_point, &o->conv, q->isa);
    } else {
        const int8_t *wk = o->wq;
        if (o->kind == QOP_CONV) { /* (Cout, Cin, k, k) -> (Cout, k, k, Cin), im2col's order */
            if (!(wt = tern_alloc(a, nw)))
                goto nomem;
            for (int c = 0; c < cout; c++)
                for (int ci = 0; ci < cin_g; ci++)
                    for (int t = 0; t < k * k; t++)
                        wt[(size_t)c * per + (size_t)t * cin_g + ci] =
                            o->wq[(size_t)c * per + (size_t)ci * k * k + t];
            wk = wt;
        }
        if (!(o->packed = tern_alloc(a, tern_qgemm_packed_size((size_t)cout, per, q->isa))))
            goto nomem;
        tern_qgemm_pack(o->packed, wk, o->bias, in.zero_point, (size_t)cout, per, q->isa);
    }
    tern_free(a, wt);
    return TERN_OK;
nomem:
    tern_free(a, wt);
    return tern_qmodel_fail(q, TERN_ERR_NOMEM, "out of memory");
}

tern_status tern_qmodel_finish_op(tern_qmodel *q, int i)
{
    qop *o = &q->ops[i];
    const tern_qparams in = q->values[o->in].q, out = q->values[o->out].q;
    switch (o->kind) {
    case QOP_CONV1X1:
    case QOP_DEPTHWISE:
    case QOP_CONV:
    case QOP_LINEAR:
    case QOP_LOGITS:
        return finish_layer(q, o);
    case QOP_ADD:
        if (tern_quant_add_params(&o->add, in, q->values[o->in2].q, out, q->opt.requant))
            return tern_qmodel_fail(q, TERN_ERR_INVALID, "residual add %d: scales out of range", i);
        return TERN_OK;
    case QOP_GATE:
        if (tern_quant_gate_params(&o->gate, in, q->values[o->in2].q, out, q->opt.requant))
            return tern_qmodel_fail(q, TERN_ERR_INVALID, "gate %d: scales out of range", i);
        return TERN_OK;
    case QOP_POOL:
        return TERN_OK;
    }
    return TERN_OK;
}

static tern_status quantize_ops(tern_qmodel *q)
{
    for (int i = 0; i < q->nops; i++) {
        tern_status s = TERN_OK;
        if (tern_qop_has_weights(&q->ops[i]))
            s = quantize_weights(q, &q->ops[i]);
        if (s != TERN_OK || (s = tern_qmodel_finish_op(q, i)) != TERN_OK)
            return s;
    }
    return TERN_OK;
}

/* Float weights are kept only for the ops that run in float. */
static void drop_float_weights(tern_qmodel *q)
{
    for (int i = 0; i < q->nops; i++)
        if (!q->ops[i].fp32) {
            tern_free(tern_qmodel_alloc(q), q->ops[i].wf);
            tern_free(tern_qmodel_alloc(q), q->ops[i].bf);
            q->ops[i].wf = q->ops[i].bf = NULL;
        }
}

/* Int8 buffers of every value, the stem's im2col rows, GEMM scratch, logits sums. */
tern_status tern_qmodel_plan_inference(tern_qmodel *q)
{
    const int nb = q->opt.max_batch;
    size_t total = 0, col = 0, ws = 0, offsets[3];
    for (int v = 0; v < q->nvalues; v++)
        if (q->values[v].used)
            total += (tern_qvalue_count(&q->values[v], nb) + 63) / 64 * 64;
    for (int i = 0; i < q->nops; i++) {
        const qop *o = &q->ops[i];
        size_t K = 0, N = 0, w = 0;
        if (o->kind == QOP_CONV && tern_qconv_direct_supported(&o->conv)) {
            w = tern_qconv_direct_workspace_size(&o->conv, q->isa);
        } else if (o->kind == QOP_CONV) {
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
    char *arena = tern_alloc(tern_qmodel_alloc(q), total);
    if (!arena)
        return tern_qmodel_fail(q, TERN_ERR_NOMEM, "cannot allocate %zu bytes of int8 activations", total);
    size_t at = 0;
    for (int v = 0; v < q->nvalues; v++)
        if (q->values[v].used) {
            q->values[v].x = (int8_t *)(arena + at);
            at += (tern_qvalue_count(&q->values[v], nb) + 63) / 64 * 64;
        }
    q->arena = arena;
    q->col = (int8_t *)(arena + offsets[0]);
    q->workspace = arena + offsets[1];
    q->acc = (int32_t *)(arena + offsets[2]);
    return TERN_OK;
}

static void forward_mixed(tern_qmodel *q, float *logits, const float *input, int n);

/* ---- sensitivity and mixed precision -------------------------------------------------------------- */

static int argmax_f(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        best = x[i] > x[best] ? i : best;
    return best;
}

/* Float logits of nimg images with the ops' current fp32 flags. */
static void run_mixed(tern_qmodel *q, float *logits, const float *x, int nimg)
{
    const size_t image = tern_qvalue_count(&q->values[0], 1);
    for (int b0 = 0; b0 < nimg; b0 += q->opt.max_batch) {
        int n = nimg - b0 < q->opt.max_batch ? nimg - b0 : q->opt.max_batch;
        forward_mixed(q, logits + (size_t)b0 * q->num_classes, x + (size_t)b0 * image, n);
    }
}

static tern_status measure_sensitivity(tern_qmodel *q, const float *calib, int ncalib)
{
    const int nimg = ncalib < 256 ? ncalib : 256, k = q->num_classes;
    for (int i = 0; i < q->nops; i++)
        q->ops[i].sensitivity = q->ops[i].agreement = -1;
    tern_status s = tern_qmodel_plan_mixed(q);
    if (s != TERN_OK)
        return s;
    float *ref = tern_alloc(tern_qmodel_alloc(q), (size_t)nimg * k * sizeof(float));
    float *got = tern_alloc(tern_qmodel_alloc(q), (size_t)nimg * k * sizeof(float));
    if (!ref || !got) {
        tern_free(tern_qmodel_alloc(q), ref);
        tern_free(tern_qmodel_alloc(q), got);
        return tern_qmodel_fail(q, TERN_ERR_NOMEM, "out of memory");
    }
    for (int i = 0; i < q->nops; i++)
        q->ops[i].fp32 = true;
    run_mixed(q, ref, calib, nimg);
    double ref_ms = 0;
    for (size_t j = 0; j < (size_t)nimg * k; j++)
        ref_ms += (double)ref[j] * ref[j];
    ref_ms = ref_ms > 0 ? ref_ms : 1;
    for (int i = 0; i < q->nops; i++) {
        qop *o = &q->ops[i];
        if (!tern_qop_has_weights(o))
            continue;
        o->fp32 = false;
        run_mixed(q, got, calib, nimg);
        o->fp32 = true;
        double se = 0;
        int agree = 0;
        for (size_t j = 0; j < (size_t)nimg * k; j++)
            se += ((double)got[j] - ref[j]) * ((double)got[j] - ref[j]);
        for (int m = 0; m < nimg; m++)
            agree += argmax_f(got + (size_t)m * k, k) == argmax_f(ref + (size_t)m * k, k);
        o->sensitivity = se / ref_ms;
        o->agreement = (double)agree / nimg;
    }
    for (int i = 0; i < q->nops; i++)
        q->ops[i].fp32 = false;
    tern_free(tern_qmodel_alloc(q), ref);
    tern_free(tern_qmodel_alloc(q), got);
    return TERN_OK;
}

/* The count most sensitive layers run in float; with none left, the float machinery goes. */
static void keep_float(tern_qmodel *q, int count)
{
    for (int c = 0; c < count; c++) {
        int best = -1;
        for (int i = 0; i < q->nops; i++)
            if (tern_qop_has_weights(&q->ops[i]) && !q->ops[i].fp32 &&
                (best < 0 || q->ops[i].sensitivity > q->ops[best].sensitivity))
                best = i;
        if (best < 0)
            break;
        q->ops[best].fp32 = true;
    }
}

static void release_mixed_if_unused(tern_qmodel *q)
{
    for (int i = 0; i < q->nops; i++)
        if (q->ops[i].fp32)
            return;
    for (int v = 0; v < q->nvalues; v++) {
        tern_free(tern_qmodel_alloc(q), q->values[v].fx);
        q->values[v].fx = NULL;
    }
    tern_free(tern_qmodel_alloc(q), q->fws);
    q->fws = NULL;
    tern_pool_destroy(&q->pool);
    q->mixed = false;
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
    if (o->observer < TERN_QUANT_OBSERVER_MINMAX || o->observer > TERN_QUANT_OBSERVER_ENTROPY)
        return tern_set_error(err, TERN_ERR_INVALID, "unknown observer %d", (int)o->observer);
    if (o->percentile != 0 && !(o->percentile > 50 && o->percentile <= 100))
        return tern_set_error(err, TERN_ERR_INVALID, "percentile %g outside (50, 100]",
                              o->percentile);
    if (o->fp32_layers < 0 || o->fp32_layers > 100000)
        return tern_set_error(err, TERN_ERR_INVALID, "fp32_layers %d out of range",
                              o->fp32_layers);
    if (o->isa < TERN_QISA_AUTO || o->isa > TERN_QISA_AVX512_VNNI)
        return tern_set_error(err, TERN_ERR_INVALID, "unknown instruction set %d", (int)o->isa);
    if (o->requant != TERN_REQUANT_FLOAT && o->requant != TERN_REQUANT_FIXED)
        return tern_set_error(err, TERN_ERR_INVALID, "unknown requantization mode %d",
                              (int)o->requant);
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
    q->mo = *mo;
    q->in_channels = mo->in_channels;
    q->num_classes = mo->num_classes;
    q->nvalues = tern_model_graph_value_count(model);
    q->values = tern_calloc(opt->alloc, (size_t)q->nvalues, sizeof *q->values);
    /* at most one integer op per float op */
    q->ops = tern_calloc(opt->alloc, (size_t)tern_model_graph_op_count(model), sizeof *q->ops);
    if (!q->values || !q->ops) {
        s = tern_qmodel_fail(q, TERN_ERR_NOMEM, "out of memory");
        goto fail;
    }
    for (int v = 0; v < q->nvalues; v++)
        q->values[v].c = tern_model_graph_value_channels(model, v);
    if ((s = translate(q, model)) != TERN_OK)
        goto fail;
    tern_qmodel_propagate_shapes(q);
    if ((s = calibrate(q, calib, ncalib)) != TERN_OK)
        goto fail;
    choose_params(q);
    free_histograms(q);
    if ((s = quantize_ops(q)) != TERN_OK || (s = tern_qmodel_plan_inference(q)) != TERN_OK)
        goto fail;
    if ((opt->sensitivity || opt->fp32_layers > 0) &&
        (s = measure_sensitivity(q, calib, ncalib)) != TERN_OK)
        goto fail;
    if (opt->fp32_layers > 0)
        keep_float(q, opt->fp32_layers);
    drop_float_weights(q);
    release_mixed_if_unused(q);
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
    const tern_allocator *a = tern_qmodel_alloc(q);
    for (int i = 0; q->ops && i < q->nops; i++) {
        qop *o = &q->ops[i];
        tern_free(a, o->name);
        tern_free(a, o->wf);
        tern_free(a, o->bf);
        tern_free(a, o->bias);
        tern_free(a, o->rqscale);
        tern_free(a, o->rqfixed);
        tern_free(a, o->packed);
        tern_free(a, o->deq);
        tern_free(a, o->wq);
        tern_free(a, o->wscale);
        tern_free(a, o->pre_hist.count);
    }
    for (int v = 0; q->values && v < q->nvalues; v++) {
        tern_free(a, q->values[v].f);
        tern_free(a, q->values[v].hist.count);
        tern_free(a, q->values[v].fx);
    }
    tern_free(a, q->fws);
    tern_pool_destroy(&q->pool);
    tern_free(a, q->ops);
    tern_free(a, q->values);
    tern_free(a, q->arena);
    tern_free(a, q);
    *qmodel = NULL;
}

/* ---- inference --------------------------------------------------------------------------------- */

/* ---- mixed precision -------------------------------------------------------------------------- */

static void want_int8(tern_qmodel *q, qvalue *v, int n)
{
    if (!v->has_x) {
        tern_quantize_array(v->x, v->fx, tern_qvalue_count(v, n), v->q, q->isa);
        v->has_x = true;
    }
}

static void want_float(qvalue *v, int n)
{
    if (!v->has_f) {
        size_t count = tern_qvalue_count(v, n);
        for (size_t i = 0; i < count; i++)
            v->fx[i] = tern_dequantize(v->x[i], v->q);
        v->has_f = true;
    }
}

/* Float buffers of every value, the float ops' workspace and a one-thread pool. */
tern_status tern_qmodel_plan_mixed(tern_qmodel *q)
{
    const tern_allocator *a = tern_qmodel_alloc(q);
    if (q->mixed)
        return TERN_OK;
    tern_status s = tern_pool_create(1, TERN_ISA_AUTO, a, &q->pool);
    if (s != TERN_OK)
        return tern_qmodel_fail(q, s, "cannot start the float ops' pool");
    size_t ws = 1;
    for (int i = 0; i < q->nops; i++) {
        const qop *o = &q->ops[i];
        if (o->kind == QOP_CONV1X1 || o->kind == QOP_DEPTHWISE || o->kind == QOP_CONV) {
            tern_conv_params p = o->conv;
            p.n = q->opt.max_batch;
            size_t w = tern_conv2d_workspace_size(&p, 1);
            ws = w > ws ? w : ws;
        }
    }
    if (!(q->fws = tern_calloc(a, ws, sizeof(float))))
        return tern_qmodel_fail(q, TERN_ERR_NOMEM, "out of memory");
    for (int v = 0; v < q->nvalues; v++)
        if (q->values[v].used &&
            !(q->values[v].fx = tern_alloc(a, tern_qvalue_count(&q->values[v], q->opt.max_batch) *
                                                  sizeof(float))))
            return tern_qmodel_fail(q, TERN_ERR_NOMEM, "out of memory");
    q->mixed = true;
    return TERN_OK;
}

/* A float op: as the calibration's, from the float forms of its inputs. */
static void forward_float_op(tern_qmodel *q, qop *o, int n, float *logits)
{
    qvalue *in = &q->values[o->in], *out = &q->values[o->out];
    qvalue *in2 = o->in2 >= 0 ? &q->values[o->in2] : NULL;
    want_float(in, n);
    if (in2)
        want_float(in2, n);
    size_t hw = (size_t)in->h * (size_t)in->w, count = tern_qvalue_count(out, n);
    switch (o->kind) {
    case QOP_CONV1X1:
    case QOP_DEPTHWISE:
    case QOP_CONV: {
        tern_conv_params p = o->conv;
        p.n = n;
        tern_conv2d_forward(out->fx, q->fws, in->fx, o->wf, o->bf, TERN_ACT_NONE, &p, q->pool);
        break;
    }
    case QOP_LINEAR:
    case QOP_LOGITS:
        tern_linear_forward(out->fx, in->fx, o->wf, o->bf, n, o->fin, o->fout, q->pool);
        break;
    case QOP_POOL: tern_avgpool_forward(out->fx, in->fx, n, hw, in->c, q->pool); break;
    case QOP_GATE:
        tern_scale_channels_forward(out->fx, in->fx, in2->fx, n, hw, in->c, q->pool);
        break;
    case QOP_ADD: tern_add_forward(out->fx, in->fx, in2->fx, count, q->pool); break;
    }
    if (o->act != TERN_ACT_NONE)
        tern_act_forward(out->fx, out->fx, count, o->act, q->pool);
    if (o->kind == QOP_LOGITS)
        memcpy(logits, out->fx, count * sizeof(float));
    out->has_f = true;
    out->has_x = false;
}

static void forward_op(tern_qmodel *q, const qop *o, int n, float *logits);

static void forward_mixed(tern_qmodel *q, float *logits, const float *input, int n)
{
    for (int v = 0; v < q->nvalues; v++)
        q->values[v].has_x = q->values[v].has_f = false;
    qvalue *x = &q->values[0];
    memcpy(x->fx, input, tern_qvalue_count(x, n) * sizeof(float));
    x->has_f = true;
    for (int i = 0; i < q->nops; i++) {
        qop *o = &q->ops[i];
        if (o->fp32) {
            forward_float_op(q, o, n, logits);
            continue;
        }
        want_int8(q, &q->values[o->in], n);
        if (o->in2 >= 0)
            want_int8(q, &q->values[o->in2], n);
        forward_op(q, o, n, logits);
        q->values[o->out].has_x = true;
        q->values[o->out].has_f = false;
    }
}

/* The first op is a direct convolution reading the input, which nothing else reads. */
static bool fused_stem(const tern_qmodel *q)
{
    const qop *o = &q->ops[0];
    if (o->kind != QOP_CONV || o->in != 0 || o->fp32 || !tern_qconv_direct_supported(&o->conv))
        return false;
    for (int i = 1; i < q->nops; i++)
        if (q->ops[i].in == 0 || q->ops[i].in2 == 0)
            return false;
    return true;
}

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
        if (tern_qconv_direct_supported(&p)) {
            tern_qconv_direct(out->x, in->x, in->q.zero_point, o->packed, q->workspace, &p,
                              &o->rq, q->isa);
            break;
        }
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
        tern_qadd(out->x, in->x, in2->x, tern_qvalue_count(out, n), &o->add, q->isa);
        break;
    }
}

tern_status tern_qmodel_forward(tern_qmodel *qmodel, float *logits, const float *input,
                                int batch)
{
    tern_qmodel *q = qmodel;
    if (!logits || !input)
        return tern_qmodel_fail(q, TERN_ERR_INVALID, "NULL input or logits");
    if (batch < 1 || batch > q->opt.max_batch)
        return tern_qmodel_fail(q, TERN_ERR_INVALID, "batch %d outside [1, %d]", batch, q->opt.max_batch);
    if (q->mixed) {
        forward_mixed(q, logits, input, batch);
        return TERN_OK;
    }
    qvalue *x = &q->values[0];
    int first = 0;
    if (fused_stem(q)) { /* the input quantized straight into the stem's padded copy */
        const qop *o = &q->ops[0];
        tern_conv_params p = o->conv;
        p.n = batch;
        tern_qconv_direct_f32(q->values[o->out].x, x->x, input, x->q, o->packed, q->workspace,
                              &p, &o->rq, q->isa);
        first = 1;
    } else {
        tern_quantize_array(x->x, input, tern_qvalue_count(x, batch), x->q, q->isa);
    }
    for (int i = first; i < q->nops; i++)
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
        return tern_qmodel_fail(q, TERN_ERR_INVALID, "NULL input, logits or op_seconds");
    if (batch < 1 || batch > q->opt.max_batch)
        return tern_qmodel_fail(q, TERN_ERR_INVALID, "batch %d outside [1, %d]", batch, q->opt.max_batch);
    if (q->mixed) { /* not profiled per op */
        double t0 = seconds();
        forward_mixed(q, logits, input, batch);
        op_seconds[0] += seconds() - t0;
        return TERN_OK;
    }
    qvalue *x = &q->values[0];
    double t0 = seconds();
    int first = 0;
    if (fused_stem(q)) { /* the input's quantization is inside op 0, and timed with it */
        const qop *o = &q->ops[0];
        tern_conv_params p = o->conv;
        p.n = batch;
        tern_qconv_direct_f32(q->values[o->out].x, x->x, input, x->q, o->packed, q->workspace,
                              &p, &o->rq, q->isa);
        first = 1;
    } else {
        tern_quantize_array(x->x, input, tern_qvalue_count(x, batch), x->q, q->isa);
    }
    double t1 = seconds();
    op_seconds[first] += t1 - t0;
    for (int i = first; i < q->nops; i++) {
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

tern_requant_mode tern_qmodel_requant(const tern_qmodel *qmodel)
{
    return qmodel->opt.requant;
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
    info->fp32 = o->fp32;
    info->has_weights = tern_qop_has_weights(o);
    info->sensitivity = qmodel->opt.sensitivity || qmodel->opt.fp32_layers > 0 ? o->sensitivity
                                                                                : -1;
    info->agreement = qmodel->opt.sensitivity || qmodel->opt.fp32_layers > 0 ? o->agreement
                                                                              : -1;
    return TERN_OK;
}

const char *tern_quant_observer_name(tern_quant_observer observer)
{
    switch (observer) {
    case TERN_QUANT_OBSERVER_MINMAX: return "minmax";
    case TERN_QUANT_OBSERVER_PERCENTILE: return "percentile";
    case TERN_QUANT_OBSERVER_ENTROPY: return "entropy";
    }
    return "?";
}

tern_status tern_quant_observer_parse(const char *name, tern_quant_observer *out)
{
    for (int o = TERN_QUANT_OBSERVER_MINMAX; name && o <= TERN_QUANT_OBSERVER_ENTROPY; o++)
        if (!strcmp(name, tern_quant_observer_name((tern_quant_observer)o))) {
            *out = (tern_quant_observer)o;
            return TERN_OK;
        }
    return TERN_ERR_INVALID;
}
