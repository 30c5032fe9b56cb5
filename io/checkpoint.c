/* Training checkpoints: model state, optimizer state and training position in one safetensors
 * file (layout in tern/checkpoint.h).
 *
 * Loading parses and checks the whole file into a local struct first, then the optimizer
 * blocks, then hands the model part to tern_model_load_state (which itself validates before
 * copying) as the last step that can fail; only then are the optimizer, the generators and the
 * caller's info overwritten. So a bad file changes nothing. */
#include "tern/checkpoint.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nn/optim_internal.h"
#include "nn/util.h"
#include "tern/model_io.h"

#define CHECKPOINT_FORMAT "tern-checkpoint"
#define RNG_WORDS 4

/* Everything a checkpoint holds besides the model's state_dict and the optimizer blocks. */
typedef struct parsed {
    tern_model_options model; /* arch .. norm from the metadata */
    tern_checkpoint_info info;
    tern_rng model_rng;
    bool has_optim;
    tern_optimizer_options optim;
    uint64_t steps;
} parsed;

/* ---- save ---------------------------------------------------------------------------------- */

static tern_status meta(tern_safetensors_writer *w, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static tern_status meta(tern_safetensors_writer *w, const char *key, const char *fmt, ...)
{
    char value[64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(value, sizeof value, fmt, ap);
    va_end(ap);
    return tern_safetensors_writer_set_metadata(w, key, value);
}

static tern_status add_model_metadata(tern_safetensors_writer *w, const tern_model_options *o)
{
    tern_status s;
    if ((s = tern_safetensors_writer_set_metadata(w, "format", CHECKPOINT_FORMAT)) != TERN_OK ||
        (s = tern_safetensors_writer_set_metadata(w, "arch", tern_arch_name(o->arch))) != TERN_OK ||
        (s = meta(w, "width_mult", "%.17g", o->width_mult)) != TERN_OK ||
        (s = meta(w, "in_channels", "%d", o->in_channels)) != TERN_OK ||
        (s = meta(w, "num_classes", "%d", o->num_classes)) != TERN_OK ||
        (s = tern_safetensors_writer_set_metadata(
             w, "norm", o->norm == TERN_NORM_GROUP ? "group" : "batch")) != TERN_OK)
        return s;
    return TERN_OK;
}

static tern_status add_optimizer(tern_safetensors_writer *w, tern_optimizer *opt)
{
    const tern_optimizer_options *o = tern_optimizer_options_of(opt);
    tern_status s;
    if ((s = tern_safetensors_writer_set_metadata(w, "optim.kind",
                                                  tern_optimizer_kind_name(o->kind))) != TERN_OK ||
        (s = meta(w, "optim.steps", "%" PRIu64, tern_optimizer_steps(opt))) != TERN_OK ||
        (s = meta(w, "optim.lr", "%.9g", (double)o->lr)) != TERN_OK ||
        (s = meta(w, "optim.momentum", "%.9g", (double)o->momentum)) != TERN_OK ||
        (s = meta(w, "optim.dampening", "%.9g", (double)o->dampening)) != TERN_OK ||
        (s = meta(w, "optim.weight_decay", "%.9g", (double)o->weight_decay)) != TERN_OK ||
        (s = meta(w, "optim.nesterov", "%s", o->nesterov ? "true" : "false")) != TERN_OK ||
        (s = meta(w, "optim.beta1", "%.9g", (double)o->beta1)) != TERN_OK ||
        (s = meta(w, "optim.beta2", "%.9g", (double)o->beta2)) != TERN_OK ||
        (s = meta(w, "optim.eps", "%.9g", (double)o->eps)) != TERN_OK ||
        (s = meta(w, "optim.amsgrad", "%s", o->amsgrad ? "true" : "false")) != TERN_OK ||
        (s = meta(w, "optim.alpha", "%.9g", (double)o->alpha)) != TERN_OK ||
        (s = meta(w, "optim.centered", "%s", o->centered ? "true" : "false")) != TERN_OK)
        return s;
    char name[64];
    for (size_t k = 0; k < tern_optimizer_state_count(opt); k++) {
        const char *state;
        float *data;
        size_t count;
        tern_optimizer_state_at(opt, k, &state, &data, &count);
        snprintf(name, sizeof name, "optim.%s", state);
        if ((s = tern_safetensors_writer_add(w, name, TERN_DTYPE_F32, 1, &(int64_t){(int64_t)count},
                                             data)) != TERN_OK)
            return s;
    }
    return TERN_OK;
}

tern_status tern_checkpoint_save(tern_model *model, tern_optimizer *opt,
                                 const tern_checkpoint_info *info, const char *path,
                                 tern_error *err)
{
    if (!model || !path)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    if (opt && tern_optimizer_model(opt) != model)
        return tern_set_error(err, TERN_ERR_INVALID,
                              "the optimizer belongs to another model");
    const tern_checkpoint_info zero = {0};
    if (!info)
        info = &zero;
    /* The writer borrows tensor data until the write: these locals outlive it. */
    const tern_rng model_rng = *tern_model_rng(model);
    const int64_t rng_shape[1] = {RNG_WORDS}, user_shape[1] = {TERN_CHECKPOINT_USER_INTS};

    tern_safetensors_writer *w = NULL;
    tern_status s = tern_safetensors_writer_create(tern_model_options_of(model)->alloc, &w);
    if (s != TERN_OK)
        return tern_set_error(err, s, "%s: %s", path, tern_strerror(s));
    if ((s = add_model_metadata(w, tern_model_options_of(model))) != TERN_OK ||
        (s = meta(w, "epoch", "%" PRIu64, info->epoch)) != TERN_OK ||
        (s = meta(w, "global_step", "%" PRIu64, info->global_step)) != TERN_OK ||
        (s = tern_model_add_state(model, w, "model.")) != TERN_OK ||
        (s = tern_safetensors_writer_add(w, "rng.model", TERN_DTYPE_I64, 1, rng_shape,
                                         model_rng.s)) != TERN_OK ||
        (s = tern_safetensors_writer_add(w, "rng.data", TERN_DTYPE_I64, 1, rng_shape,
                                         info->data_rng.s)) != TERN_OK ||
        (s = tern_safetensors_writer_add(w, "user", TERN_DTYPE_I64, 1, user_shape,
                                         info->user)) != TERN_OK ||
        (opt && (s = add_optimizer(w, opt)) != TERN_OK)) {
        tern_set_error(err, s, "%s: %s", path, tern_strerror(s));
        goto done;
    }
    s = tern_safetensors_writer_write(w, path, err);
done:
    tern_safetensors_writer_destroy(&w);
    return s;
}

/* ---- parse --------------------------------------------------------------------------------- */

static tern_status parse_u64(const tern_safetensors *st, const char *key, uint64_t *out,
                             tern_error *err)
{
    const char *text = tern_safetensors_metadata(st, key);
    if (!text)
        return tern_set_error(err, TERN_ERR_FORMAT, "metadata '%s' missing", key);
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno || end == text || *end || text[0] == '-' || text[0] == '+' || text[0] == ' ')
        return tern_set_error(err, TERN_ERR_FORMAT, "metadata %s: '%s' is not an unsigned integer",
                              key, text);
    *out = (uint64_t)v;
    return TERN_OK;
}

static tern_status parse_float(const tern_safetensors *st, const char *key, float *out,
                               tern_error *err)
{
    const char *text = tern_safetensors_metadata(st, key);
    if (!text)
        return tern_set_error(err, TERN_ERR_FORMAT, "metadata '%s' missing", key);
    char *end;
    errno = 0;
    float v = strtof(text, &end);
    if (errno || end == text || *end || !isfinite(v))
        return tern_set_error(err, TERN_ERR_FORMAT, "metadata %s: '%s' is not a finite number",
                              key, text);
    *out = v;
    return TERN_OK;
}

static tern_status parse_bool(const tern_safetensors *st, const char *key, bool *out,
                              tern_error *err)
{
    const char *text = tern_safetensors_metadata(st, key);
    if (text && strcmp(text, "true") == 0)
        *out = true;
    else if (text && strcmp(text, "false") == 0)
        *out = false;
    else
        return tern_set_error(err, TERN_ERR_FORMAT, "metadata %s: '%s' is not true or false", key,
                              text ? text : "(missing)");
    return TERN_OK;
}

/* Copy a 1-D I64 tensor of `count` elements into dst (bit for bit). */
static tern_status read_i64(const tern_safetensors *st, const char *name, size_t count,
                            void *dst, tern_error *err)
{
    tern_tensor_view v;
    if (tern_safetensors_find(st, name, &v) != TERN_OK)
        return tern_set_error(err, TERN_ERR_NOT_FOUND, "tensor '%s' missing", name);
    if (v.dtype != TERN_DTYPE_I64 || v.ndim != 1 || v.shape[0] != (int64_t)count)
        return tern_set_error(err, TERN_ERR_SHAPE, "tensor '%s': expected I64 [%zu], file has %s "
                              "with %d dimensions", name, count, tern_dtype_name(v.dtype), v.ndim);
    memcpy(dst, v.data, count * sizeof(int64_t));
    return TERN_OK;
}

static tern_status parse_optimizer(const tern_safetensors *st, parsed *p, tern_error *err)
{
    const char *kind = tern_safetensors_metadata(st, "optim.kind");
    p->has_optim = kind != NULL;
    if (!kind)
        return TERN_OK;
    tern_optimizer_options o = {0};
    if (tern_optimizer_kind_parse(kind, &o.kind) != TERN_OK)
        return tern_set_error(err, TERN_ERR_FORMAT, "metadata optim.kind: unknown optimizer '%s'",
                              kind);
    tern_status s;
    if ((s = parse_u64(st, "optim.steps", &p->steps, err)) != TERN_OK ||
        (s = parse_float(st, "optim.lr", &o.lr, err)) != TERN_OK ||
        (s = parse_float(st, "optim.momentum", &o.momentum, err)) != TERN_OK ||
        (s = parse_float(st, "optim.dampening", &o.dampening, err)) != TERN_OK ||
        (s = parse_float(st, "optim.weight_decay", &o.weight_decay, err)) != TERN_OK ||
        (s = parse_bool(st, "optim.nesterov", &o.nesterov, err)) != TERN_OK ||
        (s = parse_float(st, "optim.beta1", &o.beta1, err)) != TERN_OK ||
        (s = parse_float(st, "optim.beta2", &o.beta2, err)) != TERN_OK ||
        (s = parse_float(st, "optim.eps", &o.eps, err)) != TERN_OK ||
        (s = parse_bool(st, "optim.amsgrad", &o.amsgrad, err)) != TERN_OK ||
        (s = parse_float(st, "optim.alpha", &o.alpha, err)) != TERN_OK ||
        (s = parse_bool(st, "optim.centered", &o.centered, err)) != TERN_OK)
        return s;
    /* A saved lr of 0 (the end of a schedule) is valid state though create refuses it. */
    bool zero_lr = o.lr == 0.0f;
    if (zero_lr)
        o.lr = 1.0f;
    if (tern_optim_validate(&o, &p->optim, err) != TERN_OK) {
        char detail[sizeof err->message];
        if (err) {
            memcpy(detail, err->message, sizeof detail);
            tern_set_error(err, TERN_ERR_FORMAT, "optimizer hyper-parameters: %s", detail);
        }
        return TERN_ERR_FORMAT;
    }
    if (zero_lr)
        p->optim.lr = 0.0f;
    return TERN_OK;
}

static tern_status parse(const tern_safetensors *st, parsed *p, tern_error *err)
{
    const char *format = tern_safetensors_metadata(st, "format");
    if (!format || strcmp(format, CHECKPOINT_FORMAT) != 0)
        return tern_set_error(err, TERN_ERR_FORMAT, "not a Tern checkpoint (format '%s')",
                              format ? format : "(missing)");
    memset(p, 0, sizeof *p);
    p->model = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    tern_status s = tern_model_options_from_metadata(st, &p->model, err);
    if (s == TERN_ERR_NOT_FOUND)
        s = TERN_ERR_FORMAT;
    if (s != TERN_OK ||
        (s = parse_u64(st, "epoch", &p->info.epoch, err)) != TERN_OK ||
        (s = parse_u64(st, "global_step", &p->info.global_step, err)) != TERN_OK ||
        (s = read_i64(st, "rng.model", RNG_WORDS, p->model_rng.s, err)) != TERN_OK ||
        (s = read_i64(st, "rng.data", RNG_WORDS, p->info.data_rng.s, err)) != TERN_OK ||
        (s = read_i64(st, "user", TERN_CHECKPOINT_USER_INTS, p->info.user, err)) != TERN_OK ||
        (s = parse_optimizer(st, p, err)) != TERN_OK)
        return s;
    return TERN_OK;
}

/* Check the optimizer blocks of st against opt. */
static tern_status check_optimizer(const tern_safetensors *st, const parsed *p,
                                   tern_optimizer *opt, tern_error *err)
{
    const tern_optimizer_options *mine = tern_optimizer_options_of(opt);
    if (!p->has_optim)
        return tern_set_error(err, TERN_ERR_NOT_FOUND, "the checkpoint holds no optimizer state");
    if (p->optim.kind != mine->kind)
        return tern_set_error(err, TERN_ERR_INVALID,
                              "the checkpoint holds %s optimizer state, the optimizer is %s",
                              tern_optimizer_kind_name(p->optim.kind),
                              tern_optimizer_kind_name(mine->kind));
    const char *names[TERN_OPTIM_MAX_STATES];
    size_t n = tern_optim_state_names(&p->optim, names);
    bool same = n == tern_optimizer_state_count(opt);
    for (size_t k = 0; same && k < n; k++) {
        const char *name;
        tern_optimizer_state_at(opt, k, &name, NULL, NULL);
        same = strcmp(name, names[k]) == 0;
    }
    if (!same) {
        char want[128] = "", have[128] = "";
        for (size_t k = 0; k < n; k++)
            snprintf(want + strlen(want), sizeof want - strlen(want), "%s%s", k ? ", " : "",
                     names[k]);
        for (size_t k = 0; k < tern_optimizer_state_count(opt); k++) {
            const char *name;
            tern_optimizer_state_at(opt, k, &name, NULL, NULL);
            snprintf(have + strlen(have), sizeof have - strlen(have), "%s%s", k ? ", " : "", name);
        }
        return tern_set_error(err, TERN_ERR_INVALID,
                              "%s state differs: the checkpoint has [%s], the optimizer [%s] "
                              "(momentum, amsgrad or centered set differently)",
                              tern_optimizer_kind_name(mine->kind), want, have);
    }
    size_t count = tern_model_param_count(tern_optimizer_model(opt)), found = 0;
    char key[64];
    for (size_t k = 0; k < n; k++) {
        tern_tensor_view v;
        snprintf(key, sizeof key, "optim.%s", names[k]);
        if (tern_safetensors_find(st, key, &v) != TERN_OK)
            return tern_set_error(err, TERN_ERR_NOT_FOUND, "tensor '%s' missing", key);
        if (v.dtype != TERN_DTYPE_F32 || v.ndim != 1 || v.shape[0] != (int64_t)count)
            return tern_set_error(err, TERN_ERR_SHAPE,
                                  "tensor '%s': expected F32 [%zu] (the model's parameters)", key,
                                  count);
    }
    for (size_t i = 0; i < tern_safetensors_count(st); i++) {
        tern_tensor_view v;
        tern_safetensors_get(st, i, &v);
        found += strncmp(v.name, "optim.", 6) == 0;
    }
    if (found != n)
        return tern_set_error(err, TERN_ERR_FORMAT, "%zu optimizer tensors, expected %zu", found,
                              n);
    return TERN_OK;
}

/* Prefix err's message with the path. */
static tern_status with_path(tern_status s, const char *path, tern_error *err)
{
    if (s != TERN_OK && err) {
        char detail[sizeof err->message];
        memcpy(detail, err->message, sizeof detail);
        tern_set_error(err, s, "%s: %s", path, detail);
    }
    return s;
}

tern_status tern_checkpoint_load(tern_model *model, tern_optimizer *opt,
                                 tern_checkpoint_info *info, const char *path, tern_error *err)
{
    if (!model || !path)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    if (opt && tern_optimizer_model(opt) != model)
        return tern_set_error(err, TERN_ERR_INVALID, "the optimizer belongs to another model");
    tern_safetensors *st = NULL;
    tern_status s = tern_safetensors_open(path, tern_model_options_of(model)->alloc, &st, err);
    if (s != TERN_OK)
        return s; /* the message names the file already */
    parsed p;
    if ((s = parse(st, &p, err)) != TERN_OK ||
        (opt && (s = check_optimizer(st, &p, opt, err)) != TERN_OK) ||
        (s = tern_model_load_state(model, st, "model.", err)) != TERN_OK)
        goto done;
    /* Nothing can fail from here on. */
    *tern_model_rng(model) = p.model_rng;
    if (opt) {
        char key[64];
        for (size_t k = 0; k < tern_optimizer_state_count(opt); k++) {
            const char *name;
            float *data;
            size_t count;
            tern_tensor_view v;
            tern_optimizer_state_at(opt, k, &name, &data, &count);
            snprintf(key, sizeof key, "optim.%s", name);
            tern_safetensors_find(st, key, &v);
            memcpy(data, v.data, count * sizeof(float));
        }
        tern_optim_set_options(opt, &p.optim);
        tern_optimizer_set_steps(opt, p.steps);
    }
    if (info)
        *info = p.info;
done:
    tern_safetensors_close(&st);
    return with_path(s, path, err);
}

tern_status tern_checkpoint_peek(const char *path, const tern_allocator *alloc,
                                 tern_model_options *model_opt, tern_optimizer_options *optim_opt,
                                 bool *has_optimizer, tern_checkpoint_info *info,
                                 tern_error *err)
{
    if (!path)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    tern_safetensors *st = NULL;
    tern_status s = tern_safetensors_open(path, alloc, &st, err);
    if (s != TERN_OK)
        return s;
    parsed p;
    if ((s = parse(st, &p, err)) == TERN_OK) {
        if (model_opt) {
            model_opt->arch = p.model.arch;
            model_opt->width_mult = p.model.width_mult;
            model_opt->in_channels = p.model.in_channels;
            model_opt->num_classes = p.model.num_classes;
            model_opt->norm = p.model.norm;
        }
        if (optim_opt && p.has_optim)
            *optim_opt = p.optim;
        if (has_optimizer)
            *has_optimizer = p.has_optim;
        if (info)
            *info = p.info;
    }
    tern_safetensors_close(&st);
    return with_path(s, path, err);
}
