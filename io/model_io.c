/* safetensors <-> tern_model, validated against the model's own state_dict table. */
#include "tern/model_io.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "nn/util.h"
#include "tern/prune.h"

static void format_shape(char *buf, size_t len, int ndim, const int64_t *shape)
{
    size_t used = (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < ndim && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, i ? ", %lld" : "%lld",
                                 (long long)shape[i]);
    if (used < len)
        snprintf(buf + used, len - used, "]");
}

static tern_status check_tensor(const tern_model_tensor *t, const tern_tensor_view *v,
                                const char *prefix, tern_error *err)
{
    tern_dtype want = t->kind == TERN_TENSOR_COUNTER ? TERN_DTYPE_I64 : TERN_DTYPE_F32;
    if (v->dtype != want)
        return tern_set_error(err, TERN_ERR_SHAPE, "tensor '%s%s': expected dtype %s, file has %s",
                              prefix, t->name, tern_dtype_name(want), tern_dtype_name(v->dtype));
    bool same = v->ndim == t->ndim;
    for (int i = 0; same && i < t->ndim; i++)
        same = v->shape[i] == t->shape[i];
    if (!same) {
        char a[96], b[96];
        format_shape(a, sizeof a, t->ndim, t->shape);
        format_shape(b, sizeof b, v->ndim, v->shape);
        return tern_set_error(err, TERN_ERR_SHAPE, "tensor '%s%s': expected shape %s, file has %s",
                              prefix, t->name, a, b);
    }
    return TERN_OK;
}

static bool kept(const char *name, const char *const *keep, int nkeep)
{
    for (int i = 0; i < nkeep; i++)
        if (strncmp(name, keep[i], strlen(keep[i])) == 0)
            return true;
    return false;
}

/* Validate everything first, then copy, so that a bad file changes nothing. Tensors of a
 * compressed file (tern/prune.h) are decoded during validation into `decoded`. */
static tern_status load_state(tern_model *model, const tern_safetensors *st, const char *prefix,
                              const char *const *keep, int nkeep, tern_error *err)
{
    if (!model || !st || !prefix)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    size_t plen = strlen(prefix), n = tern_model_tensor_count(model);
    const tern_allocator *alloc = tern_model_options_of(model)->alloc;
    bool sparse = tern_sparse_file_is_compressed(st);
    float **decoded = sparse ? tern_calloc(alloc, n ? n : 1, sizeof *decoded) : NULL;
    if (sparse && !decoded)
        return tern_set_error(err, TERN_ERR_NOMEM, "out of memory");
    tern_status s = TERN_OK;
    char name[256];
    for (int pass = 0; pass < 2 && s == TERN_OK; pass++) {
        for (size_t i = 0; i < n && s == TERN_OK; i++) {
            const tern_model_tensor *t = tern_model_tensor_at(model, i);
            if (kept(t->name, keep, nkeep))
                continue;
            tern_tensor_view v;
            snprintf(name, sizeof name, "%s%s", prefix, t->name);
            if (tern_safetensors_find(st, name, &v) != TERN_OK) {
                s = tern_set_error(err, TERN_ERR_NOT_FOUND, "tensor '%s' missing from file", name);
            } else if (pass == 0 && sparse && v.dtype == TERN_DTYPE_U8 &&
                       t->kind != TERN_TENSOR_COUNTER) {
                if (!(decoded[i] = tern_alloc(alloc, t->count * sizeof(float))))
                    s = tern_set_error(err, TERN_ERR_NOMEM, "out of memory");
                else
                    s = tern_sparse_decode(&v, t->ndim, t->shape, decoded[i], err);
            } else if (pass == 0) {
                s = check_tensor(t, &v, prefix, err);
            } else if (t->kind == TERN_TENSOR_COUNTER) {
                memcpy(t->counter, v.data, sizeof(int64_t));
            } else {
                memcpy(t->data, decoded && decoded[i] ? (const void *)decoded[i] : v.data,
                       t->count * sizeof(float));
            }
        }
        for (size_t i = 0; s == TERN_OK && pass == 0 && i < tern_safetensors_count(st); i++) {
            tern_tensor_view v;
            tern_safetensors_get(st, i, &v);
            if (strncmp(v.name, prefix, plen) == 0 && !kept(v.name + plen, keep, nkeep) &&
                !tern_model_find_tensor(model, v.name + plen))
                s = tern_set_error(err, TERN_ERR_FORMAT,
                                   "unexpected tensor '%s' in file (not part of %s)", v.name,
                                   tern_arch_name(tern_model_options_of(model)->arch));
        }
    }
    for (size_t i = 0; decoded && i < n; i++)
        tern_free(alloc, decoded[i]);
    tern_free(alloc, decoded);
    if (s == TERN_OK)
        tern_model_invalidate(model);
    return s;
}

tern_status tern_model_load_state(tern_model *model, const tern_safetensors *st,
                                  const char *prefix, tern_error *err)
{
    return load_state(model, st, prefix, NULL, 0, err);
}

tern_status tern_model_load_state_except(tern_model *model, const tern_safetensors *st,
                                         const char *const *keep_prefixes, int nkeep,
                                         tern_error *err)
{
    return load_state(model, st, "", keep_prefixes, nkeep, err);
}

tern_status tern_model_load_file(tern_model *model, const char *path, tern_error *err)
{
    tern_safetensors *st = NULL;
    tern_status s = tern_safetensors_open(path, tern_model_options_of(model)->alloc, &st, err);
    if (s != TERN_OK)
        return s;
    s = tern_model_load_state(model, st, "", err);
    if (s != TERN_OK && err) {
        char detail[sizeof err->message];
        memcpy(detail, err->message, sizeof detail);
        tern_set_error(err, s, "%s: %s", path, detail);
    }
    tern_safetensors_close(&st);
    return s;
}

tern_status tern_model_add_state(const tern_model *model, tern_safetensors_writer *w,
                                 const char *prefix)
{
    char name[256];
    for (size_t i = 0; i < tern_model_tensor_count(model); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(model, i);
        snprintf(name, sizeof name, "%s%s", prefix, t->name);
        tern_status s = t->kind == TERN_TENSOR_COUNTER
            ? tern_safetensors_writer_add(w, name, TERN_DTYPE_I64, 0, t->shape, t->counter)
            : tern_safetensors_writer_add(w, name, TERN_DTYPE_F32, t->ndim, t->shape, t->data);
        if (s != TERN_OK)
            return s;
    }
    return TERN_OK;
}

/* Metadata values holding lists are JSON arrays, produced and parsed with jansson. */
/* NULL if out of memory or a value cannot be represented (NaN; a name that is not UTF-8). */
static char *json_floats(const float *v, int n)
{
    json_t *a = json_array();
    bool ok = a != NULL;
    for (int i = 0; ok && i < n; i++)
        ok = isfinite(v[i]) && json_array_append_new(a, json_real(v[i])) == 0;
    char *text = ok ? json_dumps(a, JSON_COMPACT | JSON_REAL_PRECISION(9)) : NULL;
    json_decref(a);
    return text;
}

static char *json_strings(char *const *v, int n)
{
    json_t *a = json_array();
    bool ok = a != NULL;
    for (int i = 0; ok && i < n; i++) {
        json_t *str = json_string(v[i]); /* NULL for invalid UTF-8 */
        ok = str && json_array_append_new(a, str) == 0;
    }
    char *text = ok ? json_dumps(a, JSON_COMPACT) : NULL;
    json_decref(a);
    return text;
}

tern_status tern_model_add_info(tern_safetensors_writer *w, const tern_model_info *info)
{
    tern_status s = TERN_OK;
    char size[16], *mean = NULL, *std = NULL, *names = NULL;
    if (info->input_size > 0) {
        snprintf(size, sizeof size, "%d", info->input_size);
        s = tern_safetensors_writer_set_metadata(w, "input_size", size);
    }
    if (s == TERN_OK && info->resize > 0) {
        snprintf(size, sizeof size, "%d", info->resize);
        s = tern_safetensors_writer_set_metadata(w, "resize", size);
    }
    if (s == TERN_OK && info->std[0] != 0) {
        mean = json_floats(info->mean, 3);
        std = json_floats(info->std, 3);
        s = !mean || !std ? TERN_ERR_INVALID /* NaN or infinite (or out of memory) */
                          : tern_safetensors_writer_set_metadata(w, "mean", mean);
        if (s == TERN_OK)
            s = tern_safetensors_writer_set_metadata(w, "std", std);
    }
    if (s == TERN_OK && info->nclasses > 0) {
        names = json_strings(info->class_names, info->nclasses);
        s = !names ? TERN_ERR_INVALID /* not UTF-8 (or out of memory) */
                   : tern_safetensors_writer_set_metadata(w, "class_names", names);
    }
    free(mean);
    free(std);
    free(names);
    return s;
}

tern_status tern_model_add_metadata(const tern_model *model, tern_safetensors_writer *w)
{
    if (!model || !w)
        return TERN_ERR_INVALID;
    const tern_model_options *o = tern_model_options_of(model);
    char width[32], channels[16], classes[16];
    snprintf(width, sizeof width, "%.17g", o->width_mult);
    snprintf(channels, sizeof channels, "%d", o->in_channels);
    snprintf(classes, sizeof classes, "%d", o->num_classes);
    tern_status s;
    if ((s = tern_safetensors_writer_set_metadata(w, "format", "tern")) != TERN_OK ||
        (s = tern_safetensors_writer_set_metadata(w, "arch", tern_arch_name(o->arch))) != TERN_OK ||
        (s = tern_safetensors_writer_set_metadata(w, "width_mult", width)) != TERN_OK ||
        (s = tern_safetensors_writer_set_metadata(w, "in_channels", channels)) != TERN_OK ||
        (s = tern_safetensors_writer_set_metadata(w, "num_classes", classes)) != TERN_OK ||
        (s = tern_safetensors_writer_set_metadata(
             w, "norm", o->norm == TERN_NORM_GROUP ? "group" : "batch")) != TERN_OK)
        return s;
    return TERN_OK;
}

tern_status tern_model_save_file(const tern_model *model, const tern_model_info *info,
                                 const char *path, tern_error *err)
{
    const tern_model_options *o = tern_model_options_of(model);
    tern_safetensors_writer *w = NULL;
    tern_status s = tern_safetensors_writer_create(o->alloc, &w);
    if (s != TERN_OK)
        return tern_set_error(err, s, "%s", tern_strerror(s));
    if (info && info->nclasses > 0 && info->nclasses != o->num_classes) {
        s = tern_set_error(err, TERN_ERR_INVALID, "%s: %d class names for a %d-class model", path,
                           info->nclasses, o->num_classes);
        goto done;
    }
    if (info && (s = tern_model_add_info(w, info)) != TERN_OK) {
        tern_set_error(err, s, "%s: %s", path,
                       s == TERN_ERR_INVALID
                           ? "class names must be UTF-8 and mean/std finite numbers"
                           : tern_strerror(s));
        goto done;
    }
    if ((s = tern_model_add_metadata(model, w)) != TERN_OK ||
        (s = tern_model_add_state(model, w, "")) != TERN_OK) {
        tern_set_error(err, s, "%s: %s", path, tern_strerror(s));
        goto done;
    }
    s = tern_safetensors_writer_write(w, path, err);
done:
    tern_safetensors_writer_destroy(&w);
    return s;
}

static tern_status parse_int(const char *text, const char *key, int lo, int hi, int *out,
                             tern_error *err)
{
    char *end;
    errno = 0;
    long v = text ? strtol(text, &end, 10) : 0;
    if (!text || errno || *end || end == text || v < lo || v > hi)
        return tern_set_error(err, TERN_ERR_FORMAT, "metadata %s: '%s' is not an integer in [%d, %d]",
                              key, text ? text : "(missing)", lo, hi);
    *out = (int)v;
    return TERN_OK;
}

tern_status tern_model_options_from_metadata(const tern_safetensors *st, tern_model_options *opt,
                                             tern_error *err)
{
    const char *arch = tern_safetensors_metadata(st, "arch");
    if (!arch)
        return tern_set_error(err, TERN_ERR_NOT_FOUND, "file has no 'arch' metadata");
    tern_model_options o = *opt;
    if (tern_arch_parse(arch, &o.arch) != TERN_OK)
        return tern_set_error(err, TERN_ERR_FORMAT, "metadata arch: unknown architecture '%s'", arch);
    const char *width = tern_safetensors_metadata(st, "width_mult");
    if (width) {
        char *end;
        o.width_mult = strtod(width, &end);
        if (*end || end == width || !(o.width_mult > 0))
            return tern_set_error(err, TERN_ERR_FORMAT, "metadata width_mult: '%s' is not a positive number", width);
    }
    tern_status s = parse_int(tern_safetensors_metadata(st, "in_channels"), "in_channels", 1, 4096,
                              &o.in_channels, err);
    if (s == TERN_OK)
        s = parse_int(tern_safetensors_metadata(st, "num_classes"), "num_classes", 1, 1000000,
                      &o.num_classes, err);
    if (s != TERN_OK)
        return s;
    const char *norm = tern_safetensors_metadata(st, "norm");
    if (norm && strcmp(norm, "group") == 0)
        o.norm = TERN_NORM_GROUP;
    else if (!norm || strcmp(norm, "batch") == 0)
        o.norm = TERN_NORM_BATCH;
    else
        return tern_set_error(err, TERN_ERR_FORMAT, "metadata norm: '%s' is not batch or group", norm);
    *opt = o;
    return TERN_OK;
}

void tern_model_info_free(tern_model_info *info)
{
    for (int i = 0; info->class_names && i < info->nclasses; i++)
        free(info->class_names[i]);
    free(info->class_names);
    memset(info, 0, sizeof *info);
}

static tern_status read_floats(const char *text, const char *key, float *out, tern_error *err)
{
    json_t *a = json_loads(text, 0, NULL);
    size_t n = json_is_array(a) ? json_array_size(a) : 0;
    bool ok = n >= 1 && n <= 3;
    for (size_t i = 0; ok && i < n; i++) {
        json_t *v = json_array_get(a, i);
        ok = json_is_number(v);
        out[i] = ok ? (float)json_number_value(v) : 0;
    }
    json_decref(a);
    return ok ? TERN_OK
              : tern_set_error(err, TERN_ERR_FORMAT, "metadata %s: '%s' is not a list of 1 to 3 numbers",
                               key, text);
}

tern_status tern_model_info_read(const tern_safetensors *st, tern_model_info *info,
                                 tern_error *err)
{
    tern_model_info r = {0};
    const char *size = tern_safetensors_metadata(st, "input_size");
    tern_status s = TERN_OK;
    if (size)
        s = parse_int(size, "input_size", 1, 16384, &r.input_size, err);
    const char *resize = tern_safetensors_metadata(st, "resize");
    if (s == TERN_OK && resize)
        s = parse_int(resize, "resize", 1, 65536, &r.resize, err);
    const char *mean = tern_safetensors_metadata(st, "mean");
    const char *std = tern_safetensors_metadata(st, "std");
    if (s == TERN_OK && mean)
        s = read_floats(mean, "mean", r.mean, err);
    if (s == TERN_OK && std)
        s = read_floats(std, "std", r.std, err);
    const char *names = tern_safetensors_metadata(st, "class_names");
    if (s == TERN_OK && names) {
        json_t *a = json_loads(names, 0, NULL);
        size_t n = json_is_array(a) ? json_array_size(a) : 0;
        if (n == 0 || n > 1000000) {
            s = tern_set_error(err, TERN_ERR_FORMAT, "metadata class_names is not a list of names");
        } else if (!(r.class_names = calloc(n, sizeof *r.class_names))) {
            s = tern_set_error(err, TERN_ERR_NOMEM, "out of memory");
        } else {
            r.nclasses = (int)n;
            for (size_t i = 0; s == TERN_OK && i < n; i++) {
                const char *name = json_string_value(json_array_get(a, i));
                if (!name)
                    s = tern_set_error(err, TERN_ERR_FORMAT, "metadata class_names[%zu] is not a string", i);
                else if (!(r.class_names[i] = strdup(name)))
                    s = tern_set_error(err, TERN_ERR_NOMEM, "out of memory");
            }
        }
        json_decref(a);
    }
    if (s != TERN_OK) {
        tern_model_info_free(&r);
        return s;
    }
    *info = r;
    return TERN_OK;
}
