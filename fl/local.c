/* Local training and evaluation for a federated client (include/tern/local.h).
 *
 * A tern_local keeps what lasts across rounds: the index lists of its two shares, one loader
 * per share (recreated only when the batch size changes, reseeded every round), a model built
 * from the first payload's metadata and reloaded from every later payload, and with fedbn the
 * client's own BatchNorm tensors. Everything a fit produces is a function of the incoming
 * model, the config (seed included) and, with fedbn, the kept BatchNorm tensors: the loader
 * and the model's dropout stream are reseeded from "seed", and the optimizer starts fresh every
 * round, so two fits with the same inputs return the same bytes. */
#include "tern/local.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nn/util.h"
#include "tern/dpsgd.h"
#include "tern/model_io.h"
#include "tern/optim.h"
#include "tern/safetensors.h"
#include "tern/strategy.h"

#define DEFAULT_BN_MOMENTUM 0.1f
#define MAX_BATCH 65536

/* A BatchNorm tensor of the model kept with fedbn: index into the state table and, for float
 * tensors, the offset of its copy in bn_floats (counters go to bn_counters). */
typedef struct bn_entry {
    size_t tensor;
    size_t offset;
} bn_entry;

struct tern_local {
    const tern_dataset *ds;
    size_t *train_idx, *eval_idx;
    size_t ntrain, neval;
    tern_transform train_t, eval_t;
    int threads;
    float bn_momentum; /* 0: from the payload's metadata, else DEFAULT_BN_MOMENTUM */
    uint64_t dp_secret;

    tern_model *model; /* NULL until the first payload */
    int plan_batch;    /* largest batch planned; 0 = no plan */
    int plan_size;     /* image height = width of the plan */
    bool plan_training;
    float *global;     /* (param_count) the incoming parameters, for FedProx */
    float *logits, *dlogits; /* (plan_batch, num_classes) */

    tern_loader *train_loader, *eval_loader;
    int train_batch, eval_batch; /* batch size each loader was created with */

    bn_entry *bn;      /* (nbn) BatchNorm tensors found in the model */
    size_t nbn, bn_nfloats, bn_ncounters;
    float *bn_floats;  /* (bn_nfloats) with fedbn: this client's copy */
    int64_t *bn_counters;
    bool bn_held;      /* the copies hold values (a fedbn round happened) */
};

/* ---- configuration ---------------------------------------------------------------------- */

typedef struct round_config {
    int64_t epochs, max_steps, batch_size;
    double lr, momentum, weight_decay, proximal_mu, label_smoothing;
    uint64_t seed;
    bool fedbn;
    /* DP-SGD (config "dp" = "client"): noise multiplier, or a target epsilon over dp_rounds
     * rounds; per-sample clipping norm; delta; accountant. */
    bool dp;
    double dp_sigma, dp_target, dp_clip, dp_delta;
    int64_t dp_rounds;
    tern_accountant_kind dp_accountant;
} round_config;

static tern_status config_int(const tern_msg_config *c, const char *key, int64_t lo, int64_t hi,
                              int64_t *out, tern_error *err)
{
    const tern_config_entry *e = tern_config_find(c, key);
    if (!e)
        return TERN_OK;
    if (e->type != TERN_CONFIG_INT)
        return tern_set_error(err, TERN_ERR_INVALID, "config %s: must be an int", key);
    if (e->i < lo || e->i > hi)
        return tern_set_error(err, TERN_ERR_INVALID, "config %s: %lld is outside [%lld, %lld]",
                              key, (long long)e->i, (long long)lo, (long long)hi);
    *out = e->i;
    return TERN_OK;
}

/* A float key also accepts an int (lr = 1 is a number); lo is inclusive unless lo_open. */
static tern_status config_float(const tern_msg_config *c, const char *key, double lo,
                                bool lo_open, double *out, tern_error *err)
{
    double v;
    tern_status s = tern_config_get_number(c, key, &v);
    if (s == TERN_ERR_NOT_FOUND)
        return TERN_OK;
    if (s != TERN_OK)
        return tern_set_error(err, TERN_ERR_INVALID, "config %s: must be a number", key);
    if (!isfinite(v) || v > 1e30 || (lo_open ? v <= lo : v < lo))
        return tern_set_error(err, TERN_ERR_INVALID, "config %s: %g must be %s %g", key, v,
                              lo_open ? ">" : ">=", lo);
    *out = v;
    return TERN_OK;
}

static tern_status parse_config(const tern_msg_config *c, round_config *rc, tern_error *err)
{
    *rc = (round_config){.epochs = 1, .max_steps = 0, .batch_size = 32, .lr = 0.05,
                         .momentum = 0.9, .weight_decay = 0, .proximal_mu = 0,
                         .label_smoothing = 0, .seed = 0, .fedbn = false};
    if (!c)
        return TERN_OK;
    int64_t seed = 0;
    tern_status s;
    if ((s = config_int(c, "epochs", 1, 1000000, &rc->epochs, err)) != TERN_OK ||
        (s = config_int(c, "max_steps", 0, INT64_MAX, &rc->max_steps, err)) != TERN_OK ||
        (s = config_int(c, "batch_size", 1, MAX_BATCH, &rc->batch_size, err)) != TERN_OK ||
        (s = config_int(c, "seed", INT64_MIN, INT64_MAX, &seed, err)) != TERN_OK ||
        (s = config_float(c, "lr", 0, true, &rc->lr, err)) != TERN_OK ||
        (s = config_float(c, "momentum", 0, false, &rc->momentum, err)) != TERN_OK ||
        (s = config_float(c, "weight_decay", 0, false, &rc->weight_decay, err)) != TERN_OK ||
        (s = config_float(c, "proximal_mu", 0, false, &rc->proximal_mu, err)) != TERN_OK ||
        (s = config_float(c, "label_smoothing", 0, false, &rc->label_smoothing, err)) != TERN_OK)
        return s;
    if (rc->label_smoothing >= 1)
        return tern_set_error(err, TERN_ERR_INVALID, "config label_smoothing: %g must be < 1",
                              rc->label_smoothing);
    rc->seed = (uint64_t)seed;
    const tern_config_entry *e = tern_config_find(c, "fedbn");
    if (e && e->type != TERN_CONFIG_BOOL)
        return tern_set_error(err, TERN_ERR_INVALID, "config fedbn: must be a bool");
    if (e)
        rc->fedbn = e->b;
    e = tern_config_find(c, "dp");
    if (!e)
        return TERN_OK;
    if (e->type != TERN_CONFIG_STRING || strcmp(e->s, "client") != 0)
        return tern_set_error(err, TERN_ERR_INVALID, "config dp: must be the string \"client\"");
    rc->dp = true;
    rc->dp_clip = 1.0;
    rc->dp_delta = 1e-5;
    rc->dp_rounds = 1;
    if ((s = config_float(c, "dp_noise_multiplier", 0, true, &rc->dp_sigma, err)) != TERN_OK ||
        (s = config_float(c, "dp_target_epsilon", 0, true, &rc->dp_target, err)) != TERN_OK ||
        (s = config_float(c, "dp_max_grad_norm", 0, true, &rc->dp_clip, err)) != TERN_OK ||
        (s = config_float(c, "dp_delta", 0, true, &rc->dp_delta, err)) != TERN_OK ||
        (s = config_int(c, "dp_rounds", 1, 100000000, &rc->dp_rounds, err)) != TERN_OK)
        return s;
    if ((rc->dp_sigma > 0) == (rc->dp_target > 0))
        return tern_set_error(err, TERN_ERR_INVALID, "config dp: needs exactly one of "
                              "dp_noise_multiplier and dp_target_epsilon");
    if (rc->dp_delta >= 1)
        return tern_set_error(err, TERN_ERR_INVALID, "config dp_delta: %g is not below 1",
                              rc->dp_delta);
    e = tern_config_find(c, "dp_accountant");
    if (e && (e->type != TERN_CONFIG_STRING ||
              tern_accountant_kind_parse(e->s, &rc->dp_accountant) != TERN_OK))
        return tern_set_error(err, TERN_ERR_INVALID, "config dp_accountant: rdp or prv");
    return TERN_OK;
}

/* ---- create / destroy ------------------------------------------------------------------- */

static size_t *copy_indices(const size_t *src, size_t n)
{
    size_t *dst = malloc((n ? n : 1) * sizeof *dst);
    if (dst && n)
        memcpy(dst, src, n * sizeof *dst);
    return dst;
}

tern_status tern_local_create(const tern_local_data_options *opt, tern_local **out,
                              tern_error *err)
{
    if (!opt || !out || !opt->dataset)
        return tern_set_error(err, TERN_ERR_INVALID, "local: NULL options, dataset or output");
    if (opt->num_train < 1 || !opt->train_indices)
        return tern_set_error(err, TERN_ERR_INVALID, "local: the training share is empty");
    if (opt->num_eval > 0 && !opt->eval_indices)
        return tern_set_error(err, TERN_ERR_INVALID, "local: eval_indices is NULL with "
                              "num_eval %zu", opt->num_eval);
    if (opt->threads < 0 || opt->threads > 256)
        return tern_set_error(err, TERN_ERR_INVALID, "local: threads %d outside [0, 256]",
                              opt->threads);
    if (!(opt->bn_momentum >= 0.0f && opt->bn_momentum <= 1.0f))
        return tern_set_error(err, TERN_ERR_INVALID, "local: bn_momentum %g outside [0, 1]",
                              (double)opt->bn_momentum);
    size_t n = tern_dataset_size(opt->dataset);
    for (size_t i = 0; i < opt->num_train; i++)
        if (opt->train_indices[i] >= n)
            return tern_set_error(err, TERN_ERR_INVALID, "local: train_indices[%zu] = %zu is "
                                  "beyond the dataset's %zu samples", i, opt->train_indices[i], n);
    for (size_t i = 0; i < opt->num_eval; i++)
        if (opt->eval_indices[i] >= n)
            return tern_set_error(err, TERN_ERR_INVALID, "local: eval_indices[%zu] = %zu is "
                                  "beyond the dataset's %zu samples", i, opt->eval_indices[i], n);
    tern_local *L = calloc(1, sizeof *L);
    if (!L)
        return tern_set_error(err, TERN_ERR_NOMEM, "local: out of memory");
    L->ds = opt->dataset;
    L->ntrain = opt->num_train;
    L->neval = opt->num_eval;
    L->train_t = opt->train_transform;
    L->eval_t = opt->eval_transform;
    L->threads = opt->threads > 0 ? opt->threads : 1;
    L->bn_momentum = opt->bn_momentum;
    L->dp_secret = opt->dp_secret;
    L->train_idx = copy_indices(opt->train_indices, opt->num_train);
    L->eval_idx = copy_indices(opt->eval_indices, opt->num_eval);
    if (!L->train_idx || !L->eval_idx) {
        tern_local_destroy(&L);
        return tern_set_error(err, TERN_ERR_NOMEM, "local: out of memory for %zu + %zu indices",
                              opt->num_train, opt->num_eval);
    }
    *out = L;
    return TERN_OK;
}

void tern_local_destroy(tern_local **local)
{
    if (!local || !*local)
        return;
    tern_local *L = *local;
    tern_loader_destroy(&L->train_loader);
    tern_loader_destroy(&L->eval_loader);
    tern_model_destroy(&L->model);
    free(L->global);
    free(L->logits);
    free(L->dlogits);
    free(L->bn);
    free(L->bn_floats);
    free(L->bn_counters);
    free(L->train_idx);
    free(L->eval_idx);
    free(L);
    *local = NULL;
}

/* ---- the model ---------------------------------------------------------------------------- */

/* The BatchNorm tensors: every module that has a running_mean contributes its weight, bias,
 * running_mean, running_var and num_batches_tracked (GroupNorm models have none). */
static tern_status find_bn(tern_local *L, tern_error *err)
{
    size_t count = tern_model_tensor_count(L->model);
    L->bn = calloc(count ? count : 1, sizeof *L->bn);
    if (!L->bn)
        return tern_set_error(err, TERN_ERR_NOMEM, "local: out of memory");
    for (size_t i = 0; i < count; i++) {
        const tern_model_tensor *t = tern_model_tensor_at(L->model, i);
        const char *dot = strrchr(t->name, '.');
        size_t prefix = dot ? (size_t)(dot - t->name) + 1 : 0;
        char stats[512];
        if (prefix + sizeof "running_mean" > sizeof stats)
            continue;
        memcpy(stats, t->name, prefix);
        strcpy(stats + prefix, "running_mean");
        if (!tern_model_find_tensor(L->model, stats))
            continue;
        L->bn[L->nbn].tensor = i;
        if (t->kind == TERN_TENSOR_COUNTER) {
            L->bn[L->nbn].offset = L->bn_ncounters++;
        } else {
            L->bn[L->nbn].offset = L->bn_nfloats;
            L->bn_nfloats += t->count;
        }
        L->nbn++;
    }
    L->bn_floats = malloc((L->bn_nfloats ? L->bn_nfloats : 1) * sizeof *L->bn_floats);
    L->bn_counters = malloc((L->bn_ncounters ? L->bn_ncounters : 1) * sizeof *L->bn_counters);
    if (!L->bn_floats || !L->bn_counters)
        return tern_set_error(err, TERN_ERR_NOMEM, "local: out of memory for %zu BatchNorm "
                              "values", L->bn_nfloats);
    return TERN_OK;
}

/* Copy the model's BatchNorm tensors into the local copy (save) or back (restore). */
static void bn_copy(tern_local *L, bool save)
{
    for (size_t i = 0; i < L->nbn; i++) {
        const tern_model_tensor *t = tern_model_tensor_at(L->model, L->bn[i].tensor);
        if (t->kind == TERN_TENSOR_COUNTER) {
            if (save)
                L->bn_counters[L->bn[i].offset] = *t->counter;
            else
                *t->counter = L->bn_counters[L->bn[i].offset];
        } else if (save) {
            memcpy(L->bn_floats + L->bn[i].offset, t->data, t->count * sizeof(float));
        } else {
            memcpy(t->data, L->bn_floats + L->bn[i].offset, t->count * sizeof(float));
        }
    }
    if (save)
        L->bn_held = true;
    else
        tern_model_invalidate(L->model);
}

static bool same_architecture(const tern_model_options *a, const tern_model_options *b)
{
    return a->arch == b->arch && a->width_mult == b->width_mult &&
           a->in_channels == b->in_channels && a->num_classes == b->num_classes &&
           a->norm == b->norm;
}

/* Parse a payload and load it into the model, creating the model from the first one. */
static tern_status load_payload(tern_local *L, const void *bytes, size_t size,
                                tern_safetensors **st_out, tern_error *err)
{
    if (!bytes || size == 0)
        return tern_set_error(err, TERN_ERR_FORMAT, "local: empty model payload");
    tern_safetensors *st = NULL;
    tern_error e = {{0}};
    tern_status s = tern_safetensors_parse(bytes, size, NULL, &st, &e);
    if (s != TERN_OK)
        return tern_set_error(err, s == TERN_ERR_NOMEM ? s : TERN_ERR_FORMAT,
                              "local: the model payload: %s", e.message);
    tern_model_options o = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    s = tern_model_options_from_metadata(st, &o, &e);
    if (s != TERN_OK) {
        s = tern_set_error(err, TERN_ERR_FORMAT, "local: the model payload: %s", e.message);
        goto fail;
    }
    if (L->model) {
        const tern_model_options *have = tern_model_options_of(L->model);
        if (!same_architecture(have, &o)) {
            s = tern_set_error(err, TERN_ERR_FORMAT, "local: the model changed architecture "
                               "(%s width %g, %d channels, %d classes -> %s width %g, %d "
                               "channels, %d classes)", tern_arch_name(have->arch),
                               have->width_mult, have->in_channels, have->num_classes,
                               tern_arch_name(o.arch), o.width_mult, o.in_channels,
                               o.num_classes);
            goto fail;
        }
    } else {
        o.threads = L->threads;
        o.bn_momentum = DEFAULT_BN_MOMENTUM;
        const char *m = tern_safetensors_metadata(st, "bn_momentum");
        if (L->bn_momentum > 0) {
            o.bn_momentum = L->bn_momentum;
        } else if (m) {
            char *end;
            double v = strtod(m, &end);
            if (end == m || *end || !(v > 0 && v <= 1)) {
                s = tern_set_error(err, TERN_ERR_FORMAT, "local: metadata bn_momentum: '%s' "
                                   "is not in (0, 1]", m);
                goto fail;
            }
            o.bn_momentum = (float)v;
        }
        s = tern_model_create(&o, &L->model, &e);
        if (s != TERN_OK) {
            s = tern_set_error(err, s == TERN_ERR_INVALID ? TERN_ERR_FORMAT : s,
                               "local: cannot build the model: %s", e.message);
            goto fail;
        }
        s = find_bn(L, err);
        if (s == TERN_OK && !(L->global = malloc(tern_model_param_count(L->model) *
                                                 sizeof *L->global)))
            s = tern_set_error(err, TERN_ERR_NOMEM, "local: out of memory");
        if (s != TERN_OK) {
            tern_model_destroy(&L->model);
            free(L->bn);
            free(L->bn_floats);
            free(L->bn_counters);
            L->bn = NULL;
            L->bn_floats = NULL;
            L->bn_counters = NULL;
            L->nbn = L->bn_nfloats = L->bn_ncounters = 0;
            goto fail;
        }
    }
    s = tern_model_load_state(L->model, st, "", &e);
    if (s != TERN_OK) {
        s = tern_set_error(err, s == TERN_ERR_NOMEM ? s : TERN_ERR_FORMAT,
                           "local: the model payload: %s", e.message);
        goto fail;
    }
    *st_out = st;
    return TERN_OK;
fail:
    tern_safetensors_close(&st);
    return s;
}

/* Plan for batches of `batch` (training or not), keeping a larger or training plan. */
static tern_status plan(tern_local *L, int batch, int size, bool training, tern_error *err)
{
    if (L->plan_size != size)
        L->plan_batch = 0;
    if (L->plan_batch >= batch && (L->plan_training || !training))
        return TERN_OK;
    int b = batch > L->plan_batch ? batch : L->plan_batch;
    bool t = training || (L->plan_batch > 0 && L->plan_training);
    L->plan_batch = 0;
    if (tern_model_plan(L->model, b, size, size, t) != TERN_OK)
        return tern_set_error(err, TERN_ERR_NOMEM, "local: cannot plan batches of %d at %dx%d: "
                              "%s", b, size, size, tern_model_last_error(L->model));
    size_t k = (size_t)tern_model_options_of(L->model)->num_classes;
    free(L->logits);
    free(L->dlogits);
    L->logits = malloc((size_t)b * k * sizeof(float));
    L->dlogits = malloc((size_t)b * k * sizeof(float));
    if (!L->logits || !L->dlogits)
        return tern_set_error(err, TERN_ERR_NOMEM, "local: out of memory for logits");
    L->plan_batch = b;
    L->plan_size = size;
    L->plan_training = t;
    return TERN_OK;
}

/* The loader of a share for this batch size (recreated only when it changes). */
static tern_status get_loader(tern_local *L, bool train, int batch, tern_loader **out,
                              tern_error *err)
{
    tern_loader **lp = train ? &L->train_loader : &L->eval_loader;
    int *have = train ? &L->train_batch : &L->eval_batch;
    if (*lp && *have == batch) {
        *out = *lp;
        return TERN_OK;
    }
    tern_loader_destroy(lp);
    tern_loader_options lo = {.batch = batch, .shuffle = train, .drop_last = train,
                              .indices = train ? L->train_idx : L->eval_idx,
                              .nindices = train ? L->ntrain : L->neval};
    tern_status s = tern_loader_create(L->ds, train ? &L->train_t : &L->eval_t, &lo, NULL, lp,
                                       err);
    if (s != TERN_OK)
        return s;
    *have = batch;
    *out = *lp;
    return TERN_OK;
}

static int argmax(const float *x, int k)
{
    int best = 0;
    for (int j = 1; j < k; j++)
        if (x[j] > x[best])
            best = j;
    return best;
}

static tern_status serialize(tern_local *L, const tern_safetensors *incoming, void **bytes,
                             size_t *len, tern_error *err)
{
    tern_safetensors_writer *w = NULL;
    tern_status s = tern_safetensors_writer_create(NULL, &w);
    for (size_t i = 0; s == TERN_OK && i < tern_safetensors_metadata_count(incoming); i++) {
        const char *key, *value;
        s = tern_safetensors_metadata_at(incoming, i, &key, &value);
        if (s == TERN_OK)
            s = tern_safetensors_writer_set_metadata(w, key, value);
    }
    if (s == TERN_OK)
        s = tern_model_add_state(L->model, w, "");
    if (s == TERN_OK)
        s = tern_safetensors_writer_serialize(w, bytes, len);
    tern_safetensors_writer_destroy(&w);
    if (s != TERN_OK)
        return tern_set_error(err, s, "local: cannot serialize the update: %s",
                              tern_strerror(s));
    return TERN_OK;
}

/* ---- fit ---------------------------------------------------------------------------------- */

static uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* DP-SGD over the training share: Poisson-sampled batches at q = batch / share size, ceil(1/q)
 * steps an epoch (or max_steps), per-sample clipping and noise (tern/dpsgd.h). The noise and the
 * sampling are seeded from the client's secret and the round's seed: the server, which chose
 * the round's seed, cannot reproduce them without the secret. */
static tern_status fit_dp(tern_local *L, const round_config *rc, tern_optimizer *opt, int batch,
                          const volatile bool *cancel, tern_local_result *res, tern_error *err)
{
    tern_model *m = L->model;
    const size_t n = L->ntrain;
    const double q = (double)batch / (double)n;
    int64_t steps = rc->epochs * (int64_t)ceil(1.0 / q);
    if (rc->max_steps > 0 && steps > rc->max_steps)
        steps = rc->max_steps;
    double sigma = rc->dp_sigma;
    tern_accountant_options ao = {.kind = rc->dp_accountant};
    tern_error e = {{0}};
    tern_status s;
    if (rc->dp_target > 0) {
        tern_noise_query nq = {.sample_rate = q, .steps = steps * rc->dp_rounds,
                               .delta = rc->dp_delta, .target_epsilon = rc->dp_target};
        if ((s = tern_accountant_noise_multiplier(&sigma, &ao, &nq, &e)) != TERN_OK)
            return tern_set_error(err, s, "local: DP noise for epsilon %g over %lld rounds: %s",
                                  rc->dp_target, (long long)rc->dp_rounds, e.message);
    }
    tern_dp_options o = {.max_grad_norm = rc->dp_clip, .noise_multiplier = sigma,
                         .sample_rate = q, .expected_batch = q * (double)n,
                         .seed = mix64(L->dp_secret ^ mix64(rc->seed)),
                         .accountant = ao};
    tern_dp *dp = NULL;
    if ((s = tern_dp_create(m, &o, &dp, &e)) != TERN_OK)
        return tern_set_error(err, s, "local: DP-SGD: %s", e.message);
    const tern_model_options *mo = tern_model_options_of(m);
    const size_t per = (size_t)L->train_t.size * (size_t)L->train_t.size *
                       (size_t)mo->in_channels;
    size_t cap = (size_t)batch * 2;
    size_t *picked = malloc(n * sizeof *picked);
    float *x = malloc(cap * per * sizeof *x);
    int32_t *y = malloc(cap * sizeof *y);
    tern_rng aug;
    tern_rng_seed(&aug, rc->seed ^ 0x64705f6175676dull);
    double loss_sum = 0;
    uint64_t seen = 0;
    int64_t step = 0;
    if (!picked || !x || !y) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "local: DP-SGD: out of memory for batches");
        goto done;
    }
    for (; step < steps; step++) {
        if (cancel && *cancel) {
            s = tern_set_error(err, TERN_ERR_STATE, "local: fit cancelled after %lld steps",
                               (long long)step);
            goto done;
        }
        size_t k = 0;
        tern_dp_sample(dp, n, picked, &k);
        if (k > cap) {
            float *nx = realloc(x, k * per * sizeof *x);
            if (nx)
                x = nx;
            int32_t *ny = realloc(y, k * sizeof *y);
            if (ny)
                y = ny;
            if (!nx || !ny) {
                s = tern_set_error(err, TERN_ERR_NOMEM, "local: DP-SGD: a batch of %zu", k);
                goto done;
            }
            cap = k;
        }
        for (size_t i = 0; i < k; i++) {
            size_t idx = L->train_idx[picked[i]];
            tern_image img = {0};
            if ((s = tern_dataset_image(L->ds, idx, NULL, &img, &e)) != TERN_OK) {
                s = tern_set_error(err, s, "local: %s", e.message);
                goto done;
            }
            s = tern_transform_apply(&L->train_t, &img, &aug, x + i * per);
            tern_image_free(NULL, &img);
            if (s != TERN_OK) {
                s = tern_set_error(err, s, "local: cannot transform training image %zu", idx);
                goto done;
            }
            y[i] = tern_dataset_label(L->ds, idx);
        }
        float loss = 0;
        if ((s = tern_dp_step_grads(dp, x, y, (int)k, &loss)) != TERN_OK) {
            s = tern_set_error(err, s, "local: DP-SGD step: %s", tern_dp_last_error(dp));
            goto done;
        }
        if (!isfinite(loss)) {
            s = tern_set_error(err, TERN_ERR_INVALID, "local: the loss is not finite at step "
                               "%lld (lower lr)", (long long)step + 1);
            goto done;
        }
        tern_optimizer_step(opt);
        loss_sum += (double)loss * (double)k;
        seen += k;
    }
    double eps = NAN;
    if ((s = tern_dp_epsilon(dp, rc->dp_delta, &eps)) != TERN_OK) {
        s = tern_set_error(err, s, "local: DP accounting: %s", tern_dp_last_error(dp));
        goto done;
    }
    *res = (tern_local_result){.num_examples = n, .loss = seen ? loss_sum / (double)seen : 0,
                               .accuracy = NAN, .steps = (uint64_t)steps, .dp = true,
                               .dp_noise_multiplier = sigma, .dp_sample_rate = q,
                               .dp_epsilon = eps};
done:
    tern_dp_destroy(&dp);
    free(picked);
    free(x);
    free(y);
    return s;
}

tern_status tern_local_result_metrics(const tern_local_result *r, tern_msg_metrics *m)
{
    if (!r || !m)
        return TERN_ERR_INVALID;
    tern_status s = TERN_OK;
    if (isfinite(r->loss))
        s = tern_metrics_set(m, "loss", r->loss);
    if (s == TERN_OK && isfinite(r->accuracy))
        s = tern_metrics_set(m, "accuracy", r->accuracy);
    if (s == TERN_OK && r->dp) {
        if ((s = tern_metrics_set(m, "dp_steps", (double)r->steps)) == TERN_OK &&
            (s = tern_metrics_set(m, "dp_sample_rate", r->dp_sample_rate)) == TERN_OK)
            s = tern_metrics_set(m, "dp_noise_multiplier", r->dp_noise_multiplier);
        if (s == TERN_OK && isfinite(r->dp_epsilon))
            s = tern_metrics_set(m, "dp_epsilon", r->dp_epsilon);
    }
    return s;
}

tern_status tern_local_fit(tern_local *L, const void *model, size_t model_size,
                           const tern_msg_config *config, const volatile bool *cancel,
                           void **update, size_t *update_size, tern_local_result *result,
                           tern_error *err)
{
    if (!L || !update || !update_size || !result)
        return tern_set_error(err, TERN_ERR_INVALID, "local: NULL argument");
    round_config rc;
    tern_status s = parse_config(config, &rc, err);
    if (s != TERN_OK)
        return s;
    tern_safetensors *st = NULL;
    tern_optimizer *opt = NULL;
    if ((s = load_payload(L, model, model_size, &st, err)) != TERN_OK)
        return s;
    tern_model *m = L->model;
    const size_t nparams = tern_model_param_count(m);
    const int k = tern_model_options_of(m)->num_classes;
    if (rc.fedbn) {
        if (L->bn_held)
            bn_copy(L, false);
        else
            bn_copy(L, true);
    }
    if (rc.proximal_mu > 0)
        memcpy(L->global, tern_model_params(m), nparams * sizeof *L->global);

    /* A share smaller than a batch trains on the whole share at once. */
    int batch = (int)rc.batch_size;
    if ((size_t)batch > L->ntrain)
        batch = (int)L->ntrain;
    tern_loader *loader = NULL;
    if ((s = get_loader(L, true, batch, &loader, err)) != TERN_OK ||
        (s = plan(L, batch, L->train_t.size, true, err)) != TERN_OK)
        goto done;
    tern_loader_set_seed(loader, rc.seed);
    tern_rng_seed(tern_model_rng(m), rc.seed ^ 0x6c6f63616c5f6669ull);

    tern_optimizer_options oo = tern_optimizer_options_default(TERN_OPTIMIZER_SGD);
    oo.lr = (float)rc.lr;
    oo.momentum = (float)rc.momentum;
    oo.weight_decay = (float)rc.weight_decay;
    tern_error e = {{0}};
    if ((s = tern_optimizer_create(m, &oo, &opt, &e)) != TERN_OK) {
        s = tern_set_error(err, s, "local: optimizer: %s", e.message);
        goto done;
    }
    if (rc.dp) {
        if (rc.proximal_mu > 0) {
            s = tern_set_error(err, TERN_ERR_INVALID, "local: FedProx's proximal term is not "
                               "supported with DP-SGD");
            goto done;
        }
        if ((s = fit_dp(L, &rc, opt, batch, cancel, result, err)) == TERN_OK)
            s = serialize(L, st, update, update_size, err);
        goto done;
    }

    double loss_sum = 0;
    uint64_t steps = 0, seen = 0, correct = 0;
    bool stop = false;
    for (int64_t epoch = 0; epoch < rc.epochs && !stop; epoch++) {
        for (;;) {
            if (cancel && *cancel) {
                s = tern_set_error(err, TERN_ERR_STATE, "local: fit cancelled after %llu steps",
                                   (unsigned long long)steps);
                goto done;
            }
            const float *x;
            const int32_t *y;
            int n;
            s = tern_loader_next(loader, &x, &y, &n, err);
            if (s == TERN_ERR_NOT_FOUND) {
                s = TERN_OK;
                break;
            }
            if (s != TERN_OK)
                goto done;
            float loss;
            if (tern_model_forward(m, L->logits, x, n, true) != TERN_OK) {
                s = tern_set_error(err, TERN_ERR_INVALID, "local: forward: %s",
                                   tern_model_last_error(m));
                goto done;
            }
            if (tern_cross_entropy_loss(&loss, L->dlogits, L->logits, y, n, k,
                                        (float)rc.label_smoothing) != TERN_OK) {
                s = tern_set_error(err, TERN_ERR_INVALID, "local: a label outside [0, %d) in the "
                                   "training share", k);
                goto done;
            }
            if (!isfinite(loss)) {
                s = tern_set_error(err, TERN_ERR_INVALID, "local: the loss is not finite at step "
                                   "%llu (lower lr)", (unsigned long long)steps + 1);
                goto done;
            }
            tern_model_zero_grad(m);
            tern_model_backward(m, L->dlogits);
            if (rc.proximal_mu > 0)
                tern_fedprox_add_proximal(tern_model_grads(m), tern_model_params(m), L->global,
                                          nparams, (float)rc.proximal_mu);
            tern_optimizer_step(opt);
            for (int i = 0; i < n; i++)
                correct += argmax(L->logits + (size_t)i * (size_t)k, k) == y[i];
            seen += (uint64_t)n;
            loss_sum += loss;
            steps++;
            if (rc.max_steps > 0 && steps >= (uint64_t)rc.max_steps) {
                stop = true;
                break;
            }
        }
    }
    if (steps == 0) {
        s = tern_set_error(err, TERN_ERR_STATE, "local: no training step ran (%zu images in "
                           "the training share)", L->ntrain);
        goto done;
    }
    if (rc.fedbn)
        bn_copy(L, true);
    if ((s = serialize(L, st, update, update_size, err)) != TERN_OK)
        goto done;
    *result = (tern_local_result){.num_examples = L->ntrain, .loss = loss_sum / (double)steps,
                                  .accuracy = (double)correct / (double)seen, .steps = steps};
done:
    tern_optimizer_destroy(&opt);
    tern_safetensors_close(&st);
    return s;
}

/* ---- evaluate ----------------------------------------------------------------------------- */

tern_status tern_local_evaluate(tern_local *L, const void *model, size_t model_size,
                                const tern_msg_config *config, const volatile bool *cancel,
                                tern_local_result *result, tern_error *err)
{
    if (!L || !result)
        return tern_set_error(err, TERN_ERR_INVALID, "local: NULL argument");
    if (L->neval == 0)
        return tern_set_error(err, TERN_ERR_STATE, "local: the held-out share is empty");
    round_config rc;
    tern_status s = parse_config(config, &rc, err);
    if (s != TERN_OK)
        return s;
    tern_safetensors *st = NULL;
    if ((s = load_payload(L, model, model_size, &st, err)) != TERN_OK)
        return s;
    tern_safetensors_close(&st);
    tern_model *m = L->model;
    const int k = tern_model_options_of(m)->num_classes;
    /* With fedbn this client's model is the global one with its own BatchNorm tensors. */
    if (rc.fedbn && L->bn_held)
        bn_copy(L, false);
    int batch = (int)rc.batch_size;
    if ((size_t)batch > L->neval)
        batch = (int)L->neval;
    tern_loader *loader = NULL;
    if ((s = get_loader(L, false, batch, &loader, err)) != TERN_OK ||
        (s = plan(L, batch, L->eval_t.size, false, err)) != TERN_OK)
        return s;
    tern_loader_set_epoch(loader, 0);
    double loss_sum = 0;
    uint64_t seen = 0, correct = 0, steps = 0;
    for (;;) {
        if (cancel && *cancel)
            return tern_set_error(err, TERN_ERR_STATE, "local: evaluation cancelled");
        const float *x;
        const int32_t *y;
        int n;
        s = tern_loader_next(loader, &x, &y, &n, err);
        if (s == TERN_ERR_NOT_FOUND)
            break;
        if (s != TERN_OK)
            return s;
        float loss;
        if (tern_model_forward(m, L->logits, x, n, false) != TERN_OK)
            return tern_set_error(err, TERN_ERR_INVALID, "local: forward: %s",
                                  tern_model_last_error(m));
        if (tern_cross_entropy_loss(&loss, NULL, L->logits, y, n, k, 0.0f) != TERN_OK)
            return tern_set_error(err, TERN_ERR_INVALID, "local: a label outside [0, %d) in the "
                                  "held-out share", k);
        for (int i = 0; i < n; i++)
            correct += argmax(L->logits + (size_t)i * (size_t)k, k) == y[i];
        loss_sum += (double)loss * n;
        seen += (uint64_t)n;
        steps++;
    }
    if (seen == 0)
        return tern_set_error(err, TERN_ERR_STATE, "local: no held-out image could be loaded");
    *result = (tern_local_result){.num_examples = seen, .loss = loss_sum / (double)seen,
                                  .accuracy = (double)correct / (double)seen, .steps = steps};
    return TERN_OK;
}
