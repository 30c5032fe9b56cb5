/* Quantized model files: safetensors holding exactly what the integer kernels are built from.
 *
 * Metadata: "format" = "tern-int8"; the float model's architecture keys (arch, width_mult,
 * in_channels, num_classes, norm) and evaluation pipeline (input_size, resize, mean, std,
 * class_names), so that tern_model_options_from_metadata and tern_model_info_read read them as
 * from a float file; "observer"; "requant", the requantization mode ("float" or "fixed"; a file
 * without it is float, what every file was before the fixed mode existed); and "graph", a JSON
 * description of the op graph:
 *   {"version": 1, "height": H, "width": W,
 *    "values": [channels of each value...],
 *    "ops": [{"kind", "name", "in", "in2", "out", "act", "fp32",
 *             convolutions: "cin", "cout", "k", "stride", "pad", "groups";
 *             fully connected: "fin", "fout"}, ...]}
 * Tensors:
 *   values.scale F32, values.zero_point I32 (one per value)
 *   ops.pre_scale F32, ops.pre_zero_point I32 (one per op: the parameters before a table
 *     activation; 1 and 0 elsewhere)
 *   op.<i>.weight I8 (torchvision's shape: (Cout, Cin/groups, k, k) or (fout, fin)),
 *   op.<i>.weight_scale F32 (Cout), op.<i>.bias I32 (Cout) for an integer layer;
 *   op.<i>.weight F32, op.<i>.bias F32 (BatchNorm folded) for a layer kept in float.
 * Requantization multipliers, lookup tables and packed weights are derived at load, in the
 * same code the quantizer uses (tern_qmodel_finish_op), so a loaded model gives the same bits.
 *
 * Loading validates everything before use: the graph's indices, shapes and kinds, every
 * tensor's dtype and shape, scales and zero points in range. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qmodel_internal.h"
#include "tern/model_io.h"
#include "tern/safetensors.h"
#include "util.h"

#define QFILE_FORMAT "tern-int8"

static const char *const kind_names[] = {
    [QOP_CONV1X1] = "conv1x1", [QOP_DEPTHWISE] = "depthwise", [QOP_CONV] = "conv",
    [QOP_LINEAR] = "linear",   [QOP_LOGITS] = "logits",       [QOP_POOL] = "avgpool",
    [QOP_GATE] = "se_gate",    [QOP_ADD] = "add"};
static const char *const act_names[] = {[TERN_ACT_NONE] = "none", [TERN_ACT_RELU] = "relu",
                                        [TERN_ACT_HARDSWISH] = "hardswish",
                                        [TERN_ACT_HARDSIGMOID] = "hardsigmoid"};

static bool is_conv(qop_kind k)
{
    return k == QOP_CONV1X1 || k == QOP_DEPTHWISE || k == QOP_CONV;
}

/* ---- save ----------------------------------------------------------------------------------- */

static char *graph_json(const tern_qmodel *q)
{
    json_t *values = json_array(), *ops = json_array();
    json_t *g = json_pack("{s:i,s:i,s:i,s:o,s:o}", "version", 1, "height", q->opt.height,
                          "width", q->opt.width, "values", values, "ops", ops);
    bool ok = g != NULL;
    for (int v = 0; ok && v < q->nvalues; v++)
        ok = json_array_append_new(values, json_integer(q->values[v].c)) == 0;
    for (int i = 0; ok && i < q->nops; i++) {
        const qop *o = &q->ops[i];
        json_t *j = json_pack("{s:s,s:s,s:i,s:i,s:i,s:s,s:b}", "kind", kind_names[o->kind],
                              "name", o->name, "in", o->in, "in2", o->in2, "out", o->out, "act",
                              act_names[o->act], "fp32", o->fp32);
        if (j && is_conv(o->kind)) {
            const tern_conv_params *c = &o->conv;
            json_t *cj = json_pack("{s:i,s:i,s:i,s:i,s:i,s:i}", "cin", c->cin, "cout", c->cout,
                                   "k", c->k, "stride", c->stride, "pad", c->pad, "groups",
                                   c->groups);
            ok = cj && json_object_update(j, cj) == 0;
            json_decref(cj);
        } else if (j && (o->kind == QOP_LINEAR || o->kind == QOP_LOGITS)) {
            ok = json_object_set_new(j, "fin", json_integer(o->fin)) == 0 &&
                 json_object_set_new(j, "fout", json_integer(o->fout)) == 0;
        }
        ok = ok && j && json_array_append_new(ops, j) == 0;
    }
    char *text = ok ? json_dumps(g, JSON_COMPACT) : NULL;
    json_decref(g);
    return text;
}

static char *json_floats3(const float *x)
{
    json_t *a = json_pack("[fff]", (double)x[0], (double)x[1], (double)x[2]);
    char *text = a ? json_dumps(a, JSON_COMPACT | JSON_REAL_PRECISION(9)) : NULL;
    json_decref(a);
    return text;
}

/* The metadata a float model file carries, so the same readers understand this one. */
static tern_status set_model_metadata(tern_safetensors_writer *w, const tern_qmodel *q,
                                      const tern_model_info *info)
{
    char width[32], channels[16], classes[16], size[16];
    snprintf(width, sizeof width, "%.17g", q->mo.width_mult);
    snprintf(channels, sizeof channels, "%d", q->in_channels);
    snprintf(classes, sizeof classes, "%d", q->num_classes);
    tern_status s;
    if ((s = tern_safetensors_writer_set_metadata(w, "format", QFILE_FORMAT)) != TERN_OK ||
        (s = tern_safetensors_writer_set_metadata(w, "arch", tern_arch_name(q->mo.arch))) ||
        (s = tern_safetensors_writer_set_metadata(w, "width_mult", width)) ||
        (s = tern_safetensors_writer_set_metadata(w, "in_channels", channels)) ||
        (s = tern_safetensors_writer_set_metadata(w, "num_classes", classes)) ||
        (s = tern_safetensors_writer_set_metadata(w, "norm", "batch")) ||
        (s = tern_safetensors_writer_set_metadata(w, "observer",
                                                  tern_quant_observer_name(q->opt.observer))) ||
        (s = tern_safetensors_writer_set_metadata(w, "requant",
                                                  tern_requant_mode_name(q->opt.requant))))
        return s;
    if (!info)
        return TERN_OK;
    if (info->input_size > 0) {
        snprintf(size, sizeof size, "%d", info->input_size);
        if ((s = tern_safetensors_writer_set_metadata(w, "input_size", size)))
            return s;
    }
    if (info->resize > 0) {
        snprintf(size, sizeof size, "%d", info->resize);
        if ((s = tern_safetensors_writer_set_metadata(w, "resize", size)))
            return s;
    }
    if (info->std[0] != 0) {
        char *mean = json_floats3(info->mean), *std = json_floats3(info->std);
        s = !mean || !std ? TERN_ERR_INVALID
                          : tern_safetensors_writer_set_metadata(w, "mean", mean);
        if (s == TERN_OK)
            s = tern_safetensors_writer_set_metadata(w, "std", std);
        free(mean);
        free(std);
        if (s)
            return s;
    }
    if (info->nclasses > 0) {
        json_t *a = json_array();
        bool ok = a != NULL;
        for (int i = 0; ok && i < info->nclasses; i++) {
            json_t *str = json_string(info->class_names[i]);
            ok = str && json_array_append_new(a, str) == 0;
        }
        char *names = ok ? json_dumps(a, JSON_COMPACT) : NULL;
        json_decref(a);
        s = names ? tern_safetensors_writer_set_metadata(w, "class_names", names)
                  : TERN_ERR_INVALID;
        free(names);
    }
    return s;
}

/* Shape of a layer's weight in torchvision's layout; returns ndim. */
static int weight_shape(const qop *o, int64_t *shape)
{
    if (is_conv(o->kind)) {
        shape[0] = o->conv.cout;
        shape[1] = o->conv.cin / o->conv.groups;
        shape[2] = shape[3] = o->conv.k;
        return 4;
    }
    shape[0] = o->fout;
    shape[1] = o->fin;
    return 2;
}

static int layer_cout(const qop *o) { return is_conv(o->kind) ? o->conv.cout : o->fout; }

tern_status tern_qmodel_save_file(const tern_qmodel *qmodel, const tern_model_info *info,
                                  const char *path, tern_error *err)
{
    if (!qmodel || !path)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    const tern_qmodel *q = qmodel;
    const tern_allocator *a = tern_qmodel_alloc(q);
    if (info && info->nclasses > 0 && info->nclasses != q->num_classes)
        return tern_set_error(err, TERN_ERR_INVALID, "%s: %d class names for a %d-class model",
                              path, info->nclasses, q->num_classes);
    tern_safetensors_writer *w = NULL;
    char *graph = NULL, names[64 * 3];
    float *vscale = tern_alloc(a, (size_t)q->nvalues * sizeof(float));
    int32_t *vzp = tern_alloc(a, (size_t)q->nvalues * sizeof(int32_t));
    float *pscale = tern_alloc(a, (size_t)q->nops * sizeof(float));
    int32_t *pzp = tern_alloc(a, (size_t)q->nops * sizeof(int32_t));
    tern_status s = TERN_ERR_NOMEM;
    if (!vscale || !vzp || !pscale || !pzp || !(graph = graph_json(q)) ||
        (s = tern_safetensors_writer_create(a, &w)) != TERN_OK)
        goto done;
    for (int v = 0; v < q->nvalues; v++) {
        bool used = q->values[v].used;
        vscale[v] = used ? q->values[v].q.scale : 1.0f;
        vzp[v] = used ? q->values[v].q.zero_point : 0;
    }
    for (int i = 0; i < q->nops; i++) {
        bool table = tern_qact_is_table(q->ops[i].act);
        pscale[i] = table ? q->ops[i].pre.scale : 1.0f;
        pzp[i] = table ? q->ops[i].pre.zero_point : 0;
    }
    int64_t nv = q->nvalues, no = q->nops;
    if ((s = set_model_metadata(w, q, info)) != TERN_OK ||
        (s = tern_safetensors_writer_set_metadata(w, "graph", graph)) != TERN_OK ||
        (s = tern_safetensors_writer_add(w, "values.scale", TERN_DTYPE_F32, 1, &nv, vscale)) ||
        (s = tern_safetensors_writer_add(w, "values.zero_point", TERN_DTYPE_I32, 1, &nv, vzp)) ||
        (s = tern_safetensors_writer_add(w, "ops.pre_scale", TERN_DTYPE_F32, 1, &no, pscale)) ||
        (s = tern_safetensors_writer_add(w, "ops.pre_zero_point", TERN_DTYPE_I32, 1, &no, pzp)))
        goto done;
    for (int i = 0; i < q->nops && s == TERN_OK; i++) {
        const qop *o = &q->ops[i];
        if (!tern_qop_has_weights(o))
            continue;
        int64_t shape[4], cout = layer_cout(o);
        int nd = weight_shape(o, shape);
        char *wn = names, *sn = names + 64, *bn = names + 128;
        snprintf(wn, 64, "op.%d.weight", i);
        snprintf(sn, 64, "op.%d.weight_scale", i);
        snprintf(bn, 64, "op.%d.bias", i);
        if (o->fp32) {
            if ((s = tern_safetensors_writer_add(w, wn, TERN_DTYPE_F32, nd, shape, o->wf)) ==
                TERN_OK)
                s = tern_safetensors_writer_add(w, bn, TERN_DTYPE_F32, 1, &cout, o->bf);
        } else if ((s = tern_safetensors_writer_add(w, wn, TERN_DTYPE_I8, nd, shape, o->wq)) ==
                       TERN_OK &&
                   (s = tern_safetensors_writer_add(w, sn, TERN_DTYPE_F32, 1, &cout,
                                                    o->wscale)) == TERN_OK) {
            s = tern_safetensors_writer_add(w, bn, TERN_DTYPE_I32, 1, &cout, o->bias);
        }
    }
    if (s == TERN_OK) {
        s = tern_safetensors_writer_write(w, path, err);
        tern_safetensors_writer_destroy(&w);
        goto out;
    }
done:
    tern_set_error(err, s, "%s: %s", path, tern_strerror(s));
out:
    tern_safetensors_writer_destroy(&w);
    free(graph); /* jansson's allocation */
    tern_free(a, vscale);
    tern_free(a, vzp);
    tern_free(a, pscale);
    tern_free(a, pzp);
    return s;
}

/* ---- load ----------------------------------------------------------------------------------- */

bool tern_qmodel_file_is_quantized(const tern_safetensors *st)
{
    const char *f = st ? tern_safetensors_metadata(st, "format") : NULL;
    return f && !strcmp(f, QFILE_FORMAT);
}

static int name_index(const char *const *names, int n, const char *s)
{
    for (int i = 0; s && i < n; i++)
        if (names[i] && !strcmp(names[i], s))
            return i;
    return -1;
}

static bool get_int(json_t *obj, const char *key, int lo, int hi, int *out)
{
    json_t *v = json_object_get(obj, key);
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return false;
    *out = (int)json_integer_value(v);
    return true;
}

/* A tensor of exactly this dtype and shape. */
static const void *tensor(tern_qmodel *q, const tern_safetensors *st, const char *name,
                          tern_dtype dtype, int ndim, const int64_t *shape)
{
    tern_tensor_view t;
    if (tern_safetensors_find(st, name, &t) != TERN_OK) {
        tern_qmodel_fail(q, TERN_ERR_FORMAT, "tensor %s is missing", name);
        return NULL;
    }
    bool ok = t.dtype == dtype && t.ndim == ndim;
    for (int d = 0; ok && d < ndim; d++)
        ok = t.shape[d] == shape[d];
    if (!ok) {
        tern_qmodel_fail(q, TERN_ERR_FORMAT, "tensor %s has the wrong dtype or shape", name);
        return NULL;
    }
    return t.data;
}

/* One op from its JSON, checked against the values' channels. */
static tern_status parse_op(tern_qmodel *q, json_t *j, int i, bool *written)
{
    qop *o = &q->ops[i];
    const int nv = q->nvalues;
    int kind = name_index(kind_names, 8, json_string_value(json_object_get(j, "kind")));
    int act = name_index(act_names, 4, json_string_value(json_object_get(j, "act")));
    const char *name = json_string_value(json_object_get(j, "name"));
    json_t *fp32 = json_object_get(j, "fp32");
    if (kind < 0 || act < 0 || !name || !json_is_boolean(fp32) ||
        !get_int(j, "in", 0, nv - 1, &o->in) || !get_int(j, "in2", -1, nv - 1, &o->in2) ||
        !get_int(j, "out", 1, nv - 1, &o->out))
        return tern_qmodel_fail(q, TERN_ERR_FORMAT, "op %d: bad kind, act, name or values", i);
    o->kind = (qop_kind)kind;
    o->act = (tern_act)act;
    o->fp32 = json_is_true(fp32);
    if (!(o->name = tern_strdup(tern_qmodel_alloc(q), name)))
        return tern_qmodel_fail(q, TERN_ERR_NOMEM, "out of memory");
    /* values are written once, by an earlier op (or the input) */
    bool two = o->kind == QOP_GATE || o->kind == QOP_ADD;
    if (!written[o->in] || (two != (o->in2 >= 0)) || (two && !written[o->in2]) ||
        written[o->out])
        return tern_qmodel_fail(q, TERN_ERR_FORMAT, "op %d: values out of order", i);
    written[o->out] = true;
    const int cin = q->values[o->in].c, cout = q->values[o->out].c;
    if (is_conv(o->kind)) {
        tern_conv_params *c = &o->conv;
        if (!get_int(j, "cin", 1, 1 << 20, &c->cin) || !get_int(j, "cout", 1, 1 << 20, &c->cout) ||
            !get_int(j, "k", 1, 7, &c->k) || !get_int(j, "stride", 1, 8, &c->stride) ||
            !get_int(j, "pad", 0, 6, &c->pad) || !get_int(j, "groups", 1, 1 << 20, &c->groups))
            return tern_qmodel_fail(q, TERN_ERR_FORMAT, "op %d: bad convolution", i);
        bool ok = c->cin == cin && c->cout == cout;
        if (o->kind == QOP_CONV1X1)
            ok = ok && c->k == 1 && c->stride == 1 && c->pad == 0 && c->groups == 1;
        else if (o->kind == QOP_DEPTHWISE)
            ok = ok && c->groups == cin && cin == cout && c->k * c->k <= TERN_DW_TAPS_MAX;
        else
            ok = ok && c->groups == 1;
        if (!ok)
            return tern_qmodel_fail(q, TERN_ERR_FORMAT, "op %d: convolution shape", i);
    } else if (o->kind == QOP_LINEAR || o->kind == QOP_LOGITS) {
        if (!get_int(j, "fin", 1, 1 << 20, &o->fin) || !get_int(j, "fout", 1, 1 << 20, &o->fout) ||
            o->fin != cin || o->fout != cout)
            return tern_qmodel_fail(q, TERN_ERR_FORMAT, "op %d: fully connected shape", i);
        if ((o->kind == QOP_LOGITS) != (o->out == nv - 1) ||
            (o->kind == QOP_LOGITS && (i != q->nops - 1 || cout != q->num_classes)))
            return tern_qmodel_fail(q, TERN_ERR_FORMAT, "op %d: the logits must come last", i);
    } else if (cin != cout || (two && q->values[o->in2].c != cin)) {
        return tern_qmodel_fail(q, TERN_ERR_FORMAT, "op %d: channels differ", i);
    }
    if ((o->kind == QOP_LOGITS || !tern_qop_has_weights(o)) && o->act != TERN_ACT_NONE &&
        o->kind != QOP_LINEAR)
        return tern_qmodel_fail(q, TERN_ERR_FORMAT, "op %d: an activation here", i);
    if (o->fp32 && !tern_qop_has_weights(o))
        return tern_qmodel_fail(q, TERN_ERR_FORMAT, "op %d: only layers run in float", i);
    return TERN_OK;
}

static tern_status parse_graph(tern_qmodel *q, const char *text)
{
    json_error_t jerr;
    json_t *g = text ? json_loads(text, 0, &jerr) : NULL;
    json_t *values = json_object_get(g, "values"), *ops = json_object_get(g, "ops");
    int version = 0;
    tern_status s = TERN_OK;
    bool *written = NULL;
    if (!g || !get_int(g, "version", 1, 1, &version) ||
        !get_int(g, "height", 32, 16384, &q->opt.height) ||
        !get_int(g, "width", 32, 16384, &q->opt.width) || !json_is_array(values) ||
        !json_is_array(ops) || json_array_size(values) < 2 || json_array_size(values) > 100000 ||
        json_array_size(ops) < 1 || json_array_size(ops) > 100000) {
        s = tern_qmodel_fail(q, TERN_ERR_FORMAT, "the graph description is malformed");
        goto done;
    }
    q->nvalues = (int)json_array_size(values);
    q->values = tern_calloc(tern_qmodel_alloc(q), (size_t)q->nvalues, sizeof *q->values);
    q->ops = tern_calloc(tern_qmodel_alloc(q), json_array_size(ops), sizeof *q->ops);
    written = calloc((size_t)q->nvalues, sizeof *written);
    if (!q->values || !q->ops || !written) {
        s = tern_qmodel_fail(q, TERN_ERR_NOMEM, "out of memory");
        goto done;
    }
    for (int v = 0; v < q->nvalues; v++) {
        json_t *c = json_array_get(values, (size_t)v);
        if (!json_is_integer(c) || json_integer_value(c) < 1 || json_integer_value(c) > 1 << 20) {
            s = tern_qmodel_fail(q, TERN_ERR_FORMAT, "value %d: bad channel count", v);
            goto done;
        }
        q->values[v].c = (int)json_integer_value(c);
    }
    if (q->values[0].c != q->in_channels || q->values[q->nvalues - 1].c != q->num_classes) {
        s = tern_qmodel_fail(q, TERN_ERR_FORMAT, "the graph's input or output channels differ "
                                                 "from in_channels or num_classes");
        goto done;
    }
    written[0] = true;
    int n = (int)json_array_size(ops);
    for (int i = 0; i < n && s == TERN_OK; i++) {
        q->nops = i + 1; /* counted before parsing so that destroy frees the name */
        json_t *j = json_array_get(ops, (size_t)i);
        s = json_is_object(j) ? parse_op(q, j, i, written)
                              : tern_qmodel_fail(q, TERN_ERR_FORMAT, "op %d is not an object", i);
    }
    if (s == TERN_OK && q->ops[q->nops - 1].kind != QOP_LOGITS)
        s = tern_qmodel_fail(q, TERN_ERR_FORMAT, "the graph does not end in logits");
done:
    free(written);
    json_decref(g);
    return s;
}

/* Spatial checks that need the propagated shapes: outputs at least 1x1, fully connected and
 * gate inputs 1x1, residual shapes equal. */
static tern_status check_shapes(tern_qmodel *q)
{
    for (int i = 0; i < q->nops; i++) {
        const qop *o = &q->ops[i];
        const qvalue *in = &q->values[o->in], *out = &q->values[o->out];
        bool ok = out->h >= 1 && out->w >= 1;
        if (o->kind == QOP_LINEAR || o->kind == QOP_LOGITS)
            ok = ok && in->h == 1 && in->w == 1;
        if (o->kind == QOP_GATE)
            ok = ok && q->values[o->in2].h == 1 && q->values[o->in2].w == 1;
        if (o->kind == QOP_ADD)
            ok = ok && q->values[o->in2].h == in->h && q->values[o->in2].w == in->w;
        if (!ok)
            return tern_qmodel_fail(q, TERN_ERR_FORMAT, "op %d: shapes do not fit", i);
    }
    return TERN_OK;
}

static bool params_ok(float scale, int32_t zp)
{
    return isfinite(scale) && scale > 0 && zp >= -128 && zp <= 127;
}

static tern_status load_tensors(tern_qmodel *q, const tern_safetensors *st)
{
    const tern_allocator *a = tern_qmodel_alloc(q);
    int64_t nv = q->nvalues, no = q->nops;
    const void *vs = tensor(q, st, "values.scale", TERN_DTYPE_F32, 1, &nv);
    const void *vz = tensor(q, st, "values.zero_point", TERN_DTYPE_I32, 1, &nv);
    const void *ps = tensor(q, st, "ops.pre_scale", TERN_DTYPE_F32, 1, &no);
    const void *pz = tensor(q, st, "ops.pre_zero_point", TERN_DTYPE_I32, 1, &no);
    if (!vs || !vz || !ps || !pz)
        return TERN_ERR_FORMAT;
    for (int v = 0; v < q->nvalues; v++) {
        float scale;
        int32_t zp;
        memcpy(&scale, (const char *)vs + 4 * (size_t)v, 4);
        memcpy(&zp, (const char *)vz + 4 * (size_t)v, 4);
        if (!params_ok(scale, zp))
            return tern_qmodel_fail(q, TERN_ERR_FORMAT, "value %d: bad scale or zero point", v);
        q->values[v].q = (tern_qparams){scale, zp};
    }
    for (int i = 0; i < q->nops; i++) {
        qop *o = &q->ops[i];
        memcpy(&o->pre.scale, (const char *)ps + 4 * (size_t)i, 4);
        memcpy(&o->pre.zero_point, (const char *)pz + 4 * (size_t)i, 4);
        if (!params_ok(o->pre.scale, o->pre.zero_point))
            return tern_qmodel_fail(q, TERN_ERR_FORMAT, "op %d: bad scale or zero point", i);
        if (o->kind == QOP_POOL && (q->values[o->out].q.scale != q->values[o->in].q.scale ||
                                    q->values[o->out].q.zero_point != q->values[o->in].q.zero_point))
            return tern_qmodel_fail(q, TERN_ERR_FORMAT, "op %d: a pool changes parameters", i);
        if (!tern_qop_has_weights(o))
            continue;
        int64_t shape[4], cout = layer_cout(o);
        int nd = weight_shape(o, shape);
        size_t nw = 1;
        for (int d = 0; d < nd; d++)
            nw *= (size_t)shape[d];
        char wn[64], sn[64], bn[64];
        snprintf(wn, sizeof wn, "op.%d.weight", i);
        snprintf(sn, sizeof sn, "op.%d.weight_scale", i);
        snprintf(bn, sizeof bn, "op.%d.bias", i);
        if (o->fp32) {
            const void *w = tensor(q, st, wn, TERN_DTYPE_F32, nd, shape);
            const void *b = tensor(q, st, bn, TERN_DTYPE_F32, 1, &cout);
            if (!w || !b)
                return TERN_ERR_FORMAT;
            o->wf = tern_alloc(a, nw * sizeof(float));
            o->bf = tern_alloc(a, (size_t)cout * sizeof(float));
            if (!o->wf || !o->bf)
                return tern_qmodel_fail(q, TERN_ERR_NOMEM, "out of memory");
            memcpy(o->wf, w, nw * sizeof(float));
            memcpy(o->bf, b, (size_t)cout * sizeof(float));
            continue;
        }
        const void *w = tensor(q, st, wn, TERN_DTYPE_I8, nd, shape);
        const void *ws = tensor(q, st, sn, TERN_DTYPE_F32, 1, &cout);
        const void *b = tensor(q, st, bn, TERN_DTYPE_I32, 1, &cout);
        if (!w || !ws || !b)
            return TERN_ERR_FORMAT;
        o->wq = tern_alloc(a, nw);
        o->wscale = tern_alloc(a, (size_t)cout * sizeof(float));
        o->bias = tern_alloc(a, (size_t)cout * sizeof(int32_t));
        if (!o->wq || !o->wscale || !o->bias)
            return tern_qmodel_fail(q, TERN_ERR_NOMEM, "out of memory");
        memcpy(o->wq, w, nw);
        memcpy(o->wscale, ws, (size_t)cout * sizeof(float));
        memcpy(o->bias, b, (size_t)cout * sizeof(int32_t));
        for (int64_t c = 0; c < cout; c++)
            if (!isfinite(o->wscale[c]) || !(o->wscale[c] > 0))
                return tern_qmodel_fail(q, TERN_ERR_FORMAT, "op %d: bad weight scale", i);
    }
    return TERN_OK;
}

tern_status tern_qmodel_load(const tern_safetensors *st, const tern_qmodel_load_options *opt,
                             tern_qmodel **out, tern_error *err)
{
    if (!st || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    tern_qmodel_load_options lo = opt ? *opt : (tern_qmodel_load_options){0};
    if (lo.max_batch == 0)
        lo.max_batch = 1;
    if (lo.max_batch < 1 || lo.max_batch > 65536 || lo.isa < TERN_QISA_AUTO ||
        lo.isa > TERN_QISA_AVX512_VNNI)
        return tern_set_error(err, TERN_ERR_INVALID, "max_batch or isa out of range");
    if (!tern_qmodel_file_is_quantized(st))
        return tern_set_error(err, TERN_ERR_FORMAT, "not a quantized model (format is not %s)",
                              QFILE_FORMAT);
    tern_model_options mo = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    tern_status s = tern_model_options_from_metadata(st, &mo, err);
    if (s != TERN_OK)
        return s == TERN_ERR_NOT_FOUND ? tern_set_error(err, TERN_ERR_FORMAT, "no arch") : s;
    tern_qmodel *q = tern_calloc(lo.alloc, 1, sizeof *q);
    if (!q)
        return tern_set_error(err, TERN_ERR_NOMEM, "out of memory");
    q->opt = (tern_qmodel_options){.max_batch = lo.max_batch, .isa = lo.isa, .alloc = lo.alloc};
    tern_quant_observer_parse(tern_safetensors_metadata(st, "observer"), &q->opt.observer);
    const char *requant = tern_safetensors_metadata(st, "requant"); /* absent: older files */
    if (requant && tern_requant_mode_parse(requant, &q->opt.requant) != TERN_OK) {
        s = tern_qmodel_fail(q, TERN_ERR_FORMAT, "unknown requantization mode \"%.32s\"", requant);
        goto fail;
    }
    q->isa = tern_qisa_resolve(lo.isa);
    q->mo = mo;
    q->in_channels = mo.in_channels;
    q->num_classes = mo.num_classes;
    if ((s = parse_graph(q, tern_safetensors_metadata(st, "graph"))) != TERN_OK)
        goto fail;
    tern_qmodel_propagate_shapes(q);
    if ((s = check_shapes(q)) != TERN_OK || (s = load_tensors(q, st)) != TERN_OK)
        goto fail;
    bool mixed = false;
    for (int i = 0; i < q->nops; i++) {
        mixed |= q->ops[i].fp32;
        if (!q->ops[i].fp32 && (s = tern_qmodel_finish_op(q, i)) != TERN_OK)
            goto fail;
    }
    if ((s = tern_qmodel_plan_inference(q)) != TERN_OK ||
        (mixed && (s = tern_qmodel_plan_mixed(q)) != TERN_OK))
        goto fail;
    *out = q;
    return TERN_OK;
fail:
    tern_set_error(err, s, "loading the quantized model: %s", q->error);
    tern_qmodel_destroy(&q);
    return s;
}

tern_status tern_qmodel_load_file(const char *path, const tern_qmodel_load_options *opt,
                                  tern_qmodel **out, tern_error *err)
{
    if (!path || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    tern_safetensors *st = NULL;
    tern_status s = tern_safetensors_open(path, opt ? opt->alloc : NULL, &st, err);
    if (s == TERN_OK)
        s = tern_qmodel_load(st, opt, out, err);
    tern_safetensors_close(&st);
    return s;
}

void tern_qmodel_shape(const tern_qmodel *qmodel, int *height, int *width, int *in_channels,
                       int *num_classes)
{
    if (height)
        *height = qmodel->opt.height;
    if (width)
        *width = qmodel->opt.width;
    if (in_channels)
        *in_channels = qmodel->in_channels;
    if (num_classes)
        *num_classes = qmodel->num_classes;
}
