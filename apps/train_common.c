/* Shared pieces of the training commands. */
#include "train_common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

bool is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* Called from the loader's thread: one fprintf per message keeps lines whole. */
static void warn_skip(void *user, const char *message)
{
    (void)user;
    fprintf(stderr, "%s: warning: %s\n", cli_prog, message);
}

int open_folder(const char *dir, bool strict, tern_dataset **out)
{
    tern_folder_options fo = {.strict = strict, .warn = warn_skip};
    tern_error err = {{0}};
    if (tern_dataset_open_folder(dir, &fo, NULL, out, &err) != TERN_OK)
        return die("%s", err.message);
    return 0;
}

size_t *shuffled_indices(size_t n, uint64_t seed)
{
    size_t *idx = malloc((n ? n : 1) * sizeof *idx);
    if (!idx)
        return NULL;
    tern_rng rng;
    tern_rng_seed(&rng, seed);
    for (size_t i = 0; i < n; i++)
        idx[i] = i;
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)(tern_rng_next(&rng) % i);
        size_t t = idx[i - 1];
        idx[i - 1] = idx[j];
        idx[j] = t;
    }
    return idx;
}

int make_optimizer(const cli *c, tern_model *m, float sgd_lr, float other_lr,
                   tern_optimizer **opt)
{
    tern_optimizer_kind kind = TERN_OPTIMIZER_SGD;
    if (c->optimizer && tern_optimizer_kind_parse(c->optimizer, &kind) != TERN_OK)
        return die("unknown --optimizer '%s' (sgd, adam, adamw or rmsprop)", c->optimizer);
    tern_optimizer_options o = tern_optimizer_options_default(kind);
    o.lr = c->lr > 0 ? c->lr : kind == TERN_OPTIMIZER_SGD ? sgd_lr : other_lr;
    if (kind == TERN_OPTIMIZER_SGD || kind == TERN_OPTIMIZER_RMSPROP)
        o.momentum = c->momentum >= 0 ? c->momentum : kind == TERN_OPTIMIZER_SGD ? 0.9f : 0.0f;
    o.nesterov = c->nesterov;
    if (c->weight_decay >= 0)
        o.weight_decay = c->weight_decay;
    tern_error err = {{0}};
    if (tern_optimizer_create(m, &o, opt, &err) != TERN_OK)
        return die("%s", err.message);
    return 0;
}

int make_schedule(const cli *c, float base_lr, long steps_per_epoch, tern_schedule *s)
{
    *s = (tern_schedule){.kind = TERN_SCHEDULE_COSINE, .base_lr = base_lr,
                         .warmup_steps = (long)(c->warmup_epochs * (float)steps_per_epoch),
                         .warmup_start_factor = 0.01f, .step_size = steps_per_epoch * 10,
                         .gamma = 0.1f, .total_steps = steps_per_epoch * c->epochs};
    if (c->schedule && strcmp(c->schedule, "step") == 0)
        s->kind = TERN_SCHEDULE_STEP;
    else if (c->schedule && strcmp(c->schedule, "constant") == 0)
        s->kind = TERN_SCHEDULE_CONSTANT;
    else if (c->schedule && strcmp(c->schedule, "cosine") != 0)
        return die("unknown --schedule '%s' (cosine, step or constant)", c->schedule);
    if (s->total_steps <= s->warmup_steps)
        s->total_steps = s->warmup_steps + 1;
    tern_error err = {{0}};
    if (tern_schedule_validate(s, &err) != TERN_OK)
        return die("%s", err.message);
    return 0;
}

tern_transform model_eval_transform(const tern_model_info *info, int size_override, int channels)
{
    int size = size_override ? size_override : info->input_size ? info->input_size : 224;
    tern_transform t = {.size = size, .channels = channels, .resize = size * 256 / 224};
    if (info->resize > 0 && info->input_size > 0) /* the model's geometry, scaled to size */
        t.resize = (int)((long)info->resize * size / info->input_size);
    tern_transform_normalize_imagenet(&t);
    if (info->std[0] != 0)
        for (int ch = 0; ch < 3; ch++) {
            t.mean[ch] = info->mean[ch];
            t.std[ch] = info->std[ch] != 0 ? info->std[ch] : 1;
        }
    return t;
}

void cache_dirs(const char *dir, char *train, char *val, size_t len)
{
    snprintf(train, len, "%s/train", dir ? dir : "");
    snprintf(val, len, "%s/val", dir ? dir : "");
    if (dir)
        mkdir(dir, 0755); /* the loaders create one level; the caller's errors come from them */
}
