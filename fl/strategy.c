/* Aggregation strategies: options, client selection, the round life cycle, validation of
 * results, and the server-side update rules (FedAvg family, FedOpt, robust aggregators).
 *
 * A fit round owns one planned block, sized at configure time for the selected clients: a slot
 * per client (id, examples, metrics, state) in increasing id order and, for the robust
 * strategies, one n-float row per slot plus their scratch (median/trimmed transposes, Krum's
 * distances). Averaging strategies fold each result into the exact accumulator (see
 * strategy_internal.h) as it arrives. Results are located by binary search on the slot ids, so
 * every reduction runs in id order, whatever order the results arrived in. */
#include "strategy_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tern/rng.h"

#define STATE_ALIGN_FLOATS (TERN_ALIGN / sizeof(float))

typedef enum slot_state { SLOT_WAITING = 0, SLOT_ACCEPTED, SLOT_FAILED } slot_state;

typedef struct fit_slot {
    uint64_t id;
    uint64_t examples;
    slot_state state;
    size_t num_metrics;
    char metric_names[TERN_STRATEGY_MAX_METRICS][TERN_STRATEGY_METRIC_NAME_MAX + 1];
    double metric_values[TERN_STRATEGY_MAX_METRICS];
} fit_slot;

typedef struct eval_slot {
    uint64_t id;
    uint64_t examples;
    slot_state state;
    bool has_accuracy;
    double loss, accuracy;
} eval_slot;

/* Views into the fit round's block. */
typedef struct fit_plan {
    void *block;
    size_t capacity;   /* slots the block was sized for */
    fit_slot *slots;
    float *rows;       /* robust: capacity rows of row_stride floats */
    float *scratch;    /* median / trimmed: capacity * STRATEGY_BLOCK floats */
    double *dist;      /* Krum: capacity^2 */
    double *scores;    /* Krum: capacity */
    double *tmp;       /* Krum: capacity */
    size_t *order;     /* robust: capacity (accepted slots, id order) */
    size_t *rank;      /* Krum: capacity (rows by score) */
    const float **row_ptrs; /* robust: capacity */
} fit_plan;

struct tern_strategy {
    tern_strategy_options opt;
    size_t n;
    size_t stride;      /* n rounded up to TERN_ALIGN */
    float *global;      /* n */
    float *state;       /* nstate blocks of stride floats, or NULL */
    size_t nstate;
    const char *state_names[2];
    double *acc;        /* averaging kinds: 3 bins of stride doubles */
    uint64_t rounds;
    tern_isa isa;       /* resolved opt.isa */
    double last_norm;   /* of the last accepted result */
    acc_item pending[TERN_STRATEGY_MAX_PENDING]; /* accepted, not accumulated yet (borrowed) */
    size_t num_pending;

    /* fit round */
    bool fit_open;
    uint64_t fit_round;
    fit_plan plan;
    size_t num_selected;
    size_t num_results, num_failures, num_clipped;
    uint64_t examples;
    double range_used;  /* sum of examples * max|v| over accepted results */

    /* evaluation round */
    bool eval_open;
    uint64_t eval_round;
    eval_slot *eval_slots;
    size_t eval_capacity, eval_selected, eval_results, eval_failures;

    tern_error err;
};

/* ---- options ------------------------------------------------------------------------------ */

static const tern_strategy_kind all_kinds[] = {
    TERN_STRATEGY_FEDAVG,     TERN_STRATEGY_FEDPROX,   TERN_STRATEGY_FEDAVGM,
    TERN_STRATEGY_FEDADAGRAD, TERN_STRATEGY_FEDADAM,   TERN_STRATEGY_FEDYOGI,
    TERN_STRATEGY_FEDMEDIAN,  TERN_STRATEGY_FEDTRIMMEDAVG, TERN_STRATEGY_KRUM,
};

const char *tern_strategy_kind_name(tern_strategy_kind kind)
{
    switch (kind) {
    case TERN_STRATEGY_FEDAVG: return "fedavg";
    case TERN_STRATEGY_FEDPROX: return "fedprox";
    case TERN_STRATEGY_FEDAVGM: return "fedavgm";
    case TERN_STRATEGY_FEDADAGRAD: return "fedadagrad";
    case TERN_STRATEGY_FEDADAM: return "fedadam";
    case TERN_STRATEGY_FEDYOGI: return "fedyogi";
    case TERN_STRATEGY_FEDMEDIAN: return "fedmedian";
    case TERN_STRATEGY_FEDTRIMMEDAVG: return "fedtrimmedavg";
    case TERN_STRATEGY_KRUM: return "krum";
    }
    return "?";
}

tern_status tern_strategy_kind_parse(const char *name, tern_strategy_kind *out)
{
    if (!name || !out)
        return TERN_ERR_INVALID;
    for (size_t i = 0; i < sizeof all_kinds / sizeof *all_kinds; i++)
        if (strcmp(name, tern_strategy_kind_name(all_kinds[i])) == 0) {
            *out = all_kinds[i];
            return TERN_OK;
        }
    return TERN_ERR_INVALID;
}

tern_strategy_options tern_strategy_options_default(tern_strategy_kind kind)
{
    return (tern_strategy_options){
        .kind = kind,
        .update = TERN_UPDATE_WEIGHTS,
        .fraction_fit = 1.0,
        .fraction_evaluate = 1.0,
        .min_fit_clients = 2,
        .min_evaluate_clients = 2,
        .min_available_clients = 2,
        .accept_failures = true,
        .norm_policy = TERN_NORM_REJECT,
        .proximal_mu = 0.01f,
        .server_learning_rate = 1.0f,
        .server_momentum = 0.0f,
        .eta = 1e-1f,
        .eta_l = 1e-1f,
        .beta_1 = kind == TERN_STRATEGY_FEDADAGRAD ? 0.0f : 0.9f,
        .beta_2 = 0.99f,
        .tau = 1e-9f,
        .trim_beta = 0.2f,
    };
}

static bool is_fedopt(tern_strategy_kind k)
{
    return k == TERN_STRATEGY_FEDADAGRAD || k == TERN_STRATEGY_FEDADAM || k == TERN_STRATEGY_FEDYOGI;
}

/* Strategies that need every vector (the others stream into the accumulator). */
static bool is_robust(tern_strategy_kind k)
{
    return k == TERN_STRATEGY_FEDMEDIAN || k == TERN_STRATEGY_FEDTRIMMEDAVG ||
           k == TERN_STRATEGY_KRUM;
}

static bool in_unit(double x, bool zero_ok)
{
    return isfinite(x) && (zero_ok ? x >= 0.0 : x > 0.0) && x <= 1.0;
}

static tern_status validate_options(const tern_strategy_options *o, tern_error *err)
{
    const char *kind = tern_strategy_kind_name(o->kind);
    if (strcmp(kind, "?") == 0)
        return tern_set_error(err, TERN_ERR_INVALID, "unknown strategy kind %d", (int)o->kind);
    if (o->num_params == 0)
        return tern_set_error(err, TERN_ERR_INVALID, "%s: num_params must be >= 1", kind);
    if (o->update != TERN_UPDATE_WEIGHTS && o->update != TERN_UPDATE_DELTA)
        return tern_set_error(err, TERN_ERR_INVALID, "%s: unknown update kind %d", kind,
                              (int)o->update);
    if (!in_unit(o->fraction_fit, false) || !in_unit(o->fraction_evaluate, true))
        return tern_set_error(err, TERN_ERR_INVALID,
                              "%s: fraction_fit must be in (0, 1] and fraction_evaluate in "
                              "[0, 1], got %g and %g", kind, o->fraction_fit, o->fraction_evaluate);
    if (o->min_fit_clients < 1 || o->min_available_clients < 1 ||
        (o->fraction_evaluate > 0.0 && o->min_evaluate_clients < 1))
        return tern_set_error(err, TERN_ERR_INVALID,
                              "%s: min_fit_clients, min_evaluate_clients and "
                              "min_available_clients must be >= 1", kind);
    if (!isfinite(o->max_update_norm) || o->max_update_norm < 0.0)
        return tern_set_error(err, TERN_ERR_INVALID,
                              "%s: max_update_norm must be finite and >= 0, got %g", kind,
                              o->max_update_norm);
    if (o->norm_policy != TERN_NORM_REJECT && o->norm_policy != TERN_NORM_CLIP)
        return tern_set_error(err, TERN_ERR_INVALID, "%s: unknown norm policy %d", kind,
                              (int)o->norm_policy);
    switch (o->kind) {
    case TERN_STRATEGY_FEDPROX:
        if (!isfinite(o->proximal_mu) || o->proximal_mu < 0.0f)
            return tern_set_error(err, TERN_ERR_INVALID, "fedprox: proximal_mu must be >= 0");
        break;
    case TERN_STRATEGY_FEDAVGM:
        if (!isfinite(o->server_learning_rate) || !(o->server_learning_rate > 0.0f) ||
            !(o->server_momentum >= 0.0f && o->server_momentum < 1.0f))
            return tern_set_error(err, TERN_ERR_INVALID,
                                  "fedavgm: server_learning_rate must be > 0 and "
                                  "server_momentum in [0, 1), got %g and %g",
                                  (double)o->server_learning_rate, (double)o->server_momentum);
        break;
    case TERN_STRATEGY_FEDADAGRAD:
    case TERN_STRATEGY_FEDADAM:
    case TERN_STRATEGY_FEDYOGI:
        if (!isfinite(o->eta) || !(o->eta > 0.0f) || !isfinite(o->eta_l) || !(o->eta_l >= 0.0f) ||
            !isfinite(o->tau) || !(o->tau > 0.0f))
            return tern_set_error(err, TERN_ERR_INVALID,
                                  "%s: eta and tau must be > 0 and eta_l >= 0", kind);
        if (!(o->beta_1 >= 0.0f && o->beta_1 < 1.0f) || !(o->beta_2 >= 0.0f && o->beta_2 < 1.0f))
            return tern_set_error(err, TERN_ERR_INVALID,
                                  "%s: beta_1 and beta_2 must be in [0, 1), got %g and %g", kind,
                                  (double)o->beta_1, (double)o->beta_2);
        break;
    case TERN_STRATEGY_FEDTRIMMEDAVG:
        if (!(o->trim_beta >= 0.0f && o->trim_beta < 0.5f))
            return tern_set_error(err, TERN_ERR_INVALID,
                                  "fedtrimmedavg: trim_beta must be in [0, 0.5), got %g",
                                  (double)o->trim_beta);
        break;
    default:
        break;
    }
    return TERN_OK;
}

/* ---- life cycle --------------------------------------------------------------------------- */

static bool all_finite(const float *x, size_t n, size_t *bad)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) {
            *bad = i;
            return false;
        }
    return true;
}

tern_status tern_strategy_create(const tern_strategy_options *opt, const float *initial,
                                 tern_strategy **out, tern_error *err)
{
    if (!opt || !initial || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_strategy_create: NULL argument");
    tern_status st = validate_options(opt, err);
    if (st != TERN_OK)
        return st;
    const size_t n = opt->num_params;
    size_t bad;
    if (!all_finite(initial, n, &bad))
        return tern_set_error(err, TERN_ERR_INVALID,
                              "%s: initial parameter %zu is not finite",
                              tern_strategy_kind_name(opt->kind), bad);

    const tern_allocator *a = opt->alloc;
    /* Every per-parameter block (3 bins of doubles is the largest) must be addressable. */
    if (n > SIZE_MAX / (4 * sizeof(double)))
        return tern_set_error(err, TERN_ERR_NOMEM, "parameter count %zu too large", n);
    const size_t stride = (n + STATE_ALIGN_FLOATS - 1) & ~(STATE_ALIGN_FLOATS - 1);

    tern_strategy *s = tern_calloc(a, 1, sizeof *s);
    if (!s)
        return tern_set_error(err, TERN_ERR_NOMEM, "cannot allocate the strategy");
    s->opt = *opt;
    s->n = n;
    s->stride = stride;
    s->isa = tern_isa_resolve(opt->isa);
    s->last_norm = NAN;
    if (opt->kind == TERN_STRATEGY_FEDAVGM && opt->server_momentum > 0.0f)
        s->state_names[s->nstate++] = "momentum";
    if (is_fedopt(opt->kind)) {
        s->state_names[s->nstate++] = "m_t";
        s->state_names[s->nstate++] = "v_t";
    }

    s->global = tern_alloc(a, n * sizeof(float));
    if (!s->global)
        goto nomem;
    memcpy(s->global, initial, n * sizeof(float));
    if (s->nstate) {
        s->state = tern_calloc(a, s->nstate * stride, sizeof(float));
        if (!s->state)
            goto nomem;
    }
    if (!is_robust(opt->kind)) {
        s->acc = tern_calloc(a, 3 * stride, sizeof(double));
        if (!s->acc)
            goto nomem;
    }
    *out = s;
    return TERN_OK;
nomem:
    tern_strategy_destroy(&s);
    return tern_set_error(err, TERN_ERR_NOMEM, "cannot allocate strategy state for %zu parameters",
                          n);
}

void tern_strategy_destroy(tern_strategy **strategy)
{
    if (!strategy || !*strategy)
        return;
    tern_strategy *s = *strategy;
    const tern_allocator *a = s->opt.alloc;
    tern_free(a, s->global);
    tern_free(a, s->state);
    tern_free(a, s->acc);
    tern_free(a, s->plan.block);
    tern_free(a, s->eval_slots);
    tern_free(a, s);
    *strategy = NULL;
}

const tern_strategy_options *tern_strategy_options_of(const tern_strategy *s)
{
    return &s->opt;
}

const char *tern_strategy_last_error(const tern_strategy *s)
{
    return s->err.message;
}

const float *tern_strategy_global(const tern_strategy *s)
{
    return s->global;
}

tern_status tern_strategy_set_global(tern_strategy *s, const float *params)
{
    if (!params)
        return tern_set_error(&s->err, TERN_ERR_INVALID, "set_global: NULL parameters");
    size_t bad;
    if (!all_finite(params, s->n, &bad))
        return tern_set_error(&s->err, TERN_ERR_INVALID,
                              "set_global: parameter %zu is not finite", bad);
    memcpy(s->global, params, s->n * sizeof(float));
    s->fit_open = false;
    s->num_pending = 0;
    return TERN_OK;
}

uint64_t tern_strategy_rounds(const tern_strategy *s)
{
    return s->rounds;
}

void tern_strategy_set_rounds(tern_strategy *s, uint64_t rounds)
{
    s->rounds = rounds;
}

size_t tern_strategy_state_count(const tern_strategy *s)
{
    return s->nstate;
}

tern_status tern_strategy_state_at(tern_strategy *s, size_t i, const char **name, float **data)
{
    if (i >= s->nstate)
        return tern_set_error(&s->err, TERN_ERR_INVALID, "state index %zu out of range (%zu)",
                              i, s->nstate);
    if (name)
        *name = s->state_names[i];
    if (data)
        *data = s->state + i * s->stride;
    return TERN_OK;
}

/* ---- selection ---------------------------------------------------------------------------- */

static void sample_size(size_t available, double fraction, size_t min_clients,
                        size_t min_available, size_t *size, size_t *min_out)
{
    /* Flower: max(int(available * fraction), min_clients). */
    size_t k = (size_t)floor((double)available * fraction);
    if (k < min_clients)
        k = min_clients;
    if (size)
        *size = k;
    if (min_out)
        *min_out = min_available;
}

void tern_strategy_num_fit_clients(const tern_strategy *s, size_t num_available,
                                   size_t *size, size_t *min_available)
{
    sample_size(num_available, s->opt.fraction_fit, s->opt.min_fit_clients,
                s->opt.min_available_clients, size, min_available);
}

void tern_strategy_num_evaluate_clients(const tern_strategy *s, size_t num_available,
                                        size_t *size, size_t *min_available)
{
    sample_size(num_available, s->opt.fraction_evaluate, s->opt.min_evaluate_clients,
                s->opt.min_available_clients, size, min_available);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Uniform integer in [0, m), m >= 1, without modulo bias. */
static uint64_t rng_below(tern_rng *rng, uint64_t m)
{
    uint64_t threshold = (0 - m) % m;
    for (;;) {
        uint64_t r = tern_rng_next(rng);
        if (r >= threshold)
            return r % m;
    }
}

/* Purpose tags keep fit and evaluate samples of one round independent. */
enum { STREAM_FIT = 1, STREAM_EVALUATE = 2 };

/* Sample k of the available ids into selected[0..k), sorted. selected has room for all of them
 * and serves as the working array, so selection never allocates. */
static tern_status sample_clients(tern_strategy *s, const char *what, uint64_t round, int stream,
                                  const uint64_t *available, size_t num_available, size_t k,
                                  size_t min_available, uint64_t *selected)
{
    if (num_available < min_available || num_available < k)
        return tern_set_error(&s->err, TERN_ERR_STATE,
                              "%s round %llu: %zu clients available, need %zu "
                              "(min_available_clients %zu, sample size %zu)",
                              what, (unsigned long long)round, num_available,
                              k > min_available ? k : min_available, min_available, k);
    if (k > TERN_STRATEGY_MAX_ROUND_CLIENTS)
        return tern_set_error(&s->err, TERN_ERR_UNSUPPORTED,
                              "%s round %llu: %zu clients selected, at most %d per round", what,
                              (unsigned long long)round, k, TERN_STRATEGY_MAX_ROUND_CLIENTS);
    memcpy(selected, available, num_available * sizeof *selected);
    qsort(selected, num_available, sizeof *selected, cmp_u64);
    for (size_t i = 1; i < num_available; i++)
        if (selected[i] == selected[i - 1])
            return tern_set_error(&s->err, TERN_ERR_INVALID,
                                  "%s round %llu: client id %llu listed twice", what,
                                  (unsigned long long)round, (unsigned long long)selected[i]);
    /* A stream per (seed, round, purpose): a restarted server picks the same clients. */
    tern_rng rng;
    tern_rng_seed(&rng, s->opt.seed);
    uint64_t mix = tern_rng_next(&rng) ^ (round * 0x9E3779B97F4A7C15ull) ^ (uint64_t)stream;
    tern_rng_seed(&rng, mix);
    for (size_t i = 0; i < k; i++) { /* partial Fisher-Yates */
        size_t j = i + (size_t)rng_below(&rng, num_available - i);
        uint64_t t = selected[i];
        selected[i] = selected[j];
        selected[j] = t;
    }
    qsort(selected, k, sizeof *selected, cmp_u64);
    return TERN_OK;
}

static size_t align_up(size_t x)
{
    return (x + TERN_ALIGN - 1) & ~(size_t)(TERN_ALIGN - 1);
}

/* Byte offsets of the plan's views for k slots; false on overflow. */
typedef struct plan_layout {
    size_t slots, rows, scratch, dist, scores, tmp, order, rank, row_ptrs, total;
} plan_layout;

static bool layout_plan(const tern_strategy *s, size_t k, plan_layout *L)
{
    const tern_strategy_kind kind = s->opt.kind;
    size_t off = 0, bytes;
    memset(L, 0, sizeof *L);
#define ADD(field, count, size)                                                                 \
    do {                                                                                        \
        if (!tern_mul_size((count), (size), &bytes) || !tern_add_size(bytes, TERN_ALIGN, &bytes))\
            return false;                                                                       \
        L->field = off;                                                                         \
        if (!tern_add_size(off, align_up(bytes - TERN_ALIGN), &off))                             \
            return false;                                                                       \
    } while (0)
    ADD(slots, k, sizeof(fit_slot));
    if (is_robust(kind)) {
        size_t row_floats;
        if (!tern_mul_size(k, s->stride, &row_floats))
            return false;
        ADD(rows, row_floats, sizeof(float));
        ADD(order, k, sizeof(size_t));
        ADD(row_ptrs, k, sizeof(float *));
        if (kind == TERN_STRATEGY_KRUM) {
            size_t kk;
            if (!tern_mul_size(k, k, &kk))
                return false;
            ADD(dist, kk, sizeof(double));
            ADD(scores, k, sizeof(double));
            ADD(tmp, k, sizeof(double));
            ADD(rank, k, sizeof(size_t));
        } else {
            ADD(scratch, k, STRATEGY_BLOCK * sizeof(float));
        }
    }
#undef ADD
    L->total = off;
    return true;
}

/* Make the plan hold k slots: reuse the block if it is large enough, else replace it. On
 * failure the old block is kept (and no round is open). */
static tern_status plan_round(tern_strategy *s, size_t k)
{
    plan_layout L;
    if (!layout_plan(s, k, &L))
        return tern_set_error(&s->err, TERN_ERR_NOMEM,
                              "round of %zu clients x %zu parameters is too large", k, s->n);
    fit_plan *p = &s->plan;
    if (!p->block || p->capacity < k) {
        void *block = tern_alloc(s->opt.alloc, L.total);
        if (!block)
            return tern_set_error(&s->err, TERN_ERR_NOMEM,
                                  "cannot allocate %zu bytes for a round of %zu clients",
                                  L.total, k);
        tern_free(s->opt.alloc, p->block);
        p->block = block;
        p->capacity = k;
    } else if (!layout_plan(s, p->capacity, &L)) {
        return TERN_ERR_NOMEM; /* cannot happen: it was laid out before */
    }
    char *b = p->block;
    p->slots = (fit_slot *)(b + L.slots);
    p->rows = is_robust(s->opt.kind) ? (float *)(b + L.rows) : NULL;
    p->order = is_robust(s->opt.kind) ? (size_t *)(b + L.order) : NULL;
    p->row_ptrs = is_robust(s->opt.kind) ? (const float **)(b + L.row_ptrs) : NULL;
    p->scratch = L.scratch ? (float *)(b + L.scratch) : NULL;
    p->dist = L.dist ? (double *)(b + L.dist) : NULL;
    p->scores = L.scores ? (double *)(b + L.scores) : NULL;
    p->tmp = L.tmp ? (double *)(b + L.tmp) : NULL;
    p->rank = L.rank ? (size_t *)(b + L.rank) : NULL;
    return TERN_OK;
}

tern_status tern_strategy_configure_fit(tern_strategy *s, uint64_t server_round,
                                        const uint64_t *available, size_t num_available,
                                        uint64_t *selected, size_t *num_selected)
{
    if ((!available && num_available) || !selected || !num_selected)
        return tern_set_error(&s->err, TERN_ERR_INVALID, "configure_fit: NULL argument");
    if (server_round == 0)
        return tern_set_error(&s->err, TERN_ERR_INVALID, "configure_fit: rounds count from 1");
    s->fit_open = false;
    s->num_pending = 0; /* the round they belonged to is over */
    size_t k, min_available;
    tern_strategy_num_fit_clients(s, num_available, &k, &min_available);
    tern_status st = sample_clients(s, "fit", server_round, STREAM_FIT, available, num_available,
                                    k, min_available, selected);
    if (st != TERN_OK)
        return st;
    st = plan_round(s, k);
    if (st != TERN_OK)
        return st;
    for (size_t i = 0; i < k; i++) {
        fit_slot *slot = &s->plan.slots[i];
        memset(slot, 0, sizeof *slot);
        slot->id = selected[i];
    }
    if (s->acc)
        memset(s->acc, 0, 3 * s->stride * sizeof(double));
    s->num_pending = 0;
    s->fit_round = server_round;
    s->num_selected = k;
    s->num_results = s->num_failures = s->num_clipped = 0;
    s->examples = 0;
    s->range_used = 0.0;
    s->fit_open = true;
    *num_selected = k;
    return TERN_OK;
}

tern_status tern_strategy_configure_evaluate(tern_strategy *s, uint64_t server_round,
                                             const uint64_t *available, size_t num_available,
                                             uint64_t *selected, size_t *num_selected)
{
    if ((!available && num_available) || !selected || !num_selected)
        return tern_set_error(&s->err, TERN_ERR_INVALID, "configure_evaluate: NULL argument");
    if (server_round == 0)
        return tern_set_error(&s->err, TERN_ERR_INVALID,
                              "configure_evaluate: rounds count from 1");
    s->eval_open = false;
    *num_selected = 0;
    if (s->opt.fraction_evaluate == 0.0)
        return TERN_OK;
    size_t k, min_available;
    tern_strategy_num_evaluate_clients(s, num_available, &k, &min_available);
    tern_status st = sample_clients(s, "evaluate", server_round, STREAM_EVALUATE, available,
                                    num_available, k, min_available, selected);
    if (st != TERN_OK)
        return st;
    if (s->eval_capacity < k) {
        eval_slot *slots = tern_calloc(s->opt.alloc, k, sizeof *slots);
        if (!slots)
            return tern_set_error(&s->err, TERN_ERR_NOMEM,
                                  "cannot allocate an evaluation round of %zu clients", k);
        tern_free(s->opt.alloc, s->eval_slots);
        s->eval_slots = slots;
        s->eval_capacity = k;
    }
    for (size_t i = 0; i < k; i++)
        s->eval_slots[i] = (eval_slot){.id = selected[i]};
    s->eval_round = server_round;
    s->eval_selected = k;
    s->eval_results = s->eval_failures = 0;
    s->eval_open = true;
    *num_selected = k;
    return TERN_OK;
}

/* ---- fit results -------------------------------------------------------------------------- */

/* Index of id among ids[0..k) (stride bytes apart, increasing), or k. */
static size_t find_slot(const void *base, size_t stride, size_t k, uint64_t id)
{
    size_t lo = 0, hi = k;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        uint64_t v = *(const uint64_t *)((const char *)base + mid * stride);
        if (v < id)
            lo = mid + 1;
        else if (v > id)
            hi = mid;
        else
            return mid;
    }
    return k;
}

static tern_status check_metrics(tern_strategy *s, const tern_fit_result *r)
{
    if (r->num_metrics > TERN_STRATEGY_MAX_METRICS)
        return tern_set_error(&s->err, TERN_ERR_INVALID,
                              "client %llu: %zu metrics, at most %d",
                              (unsigned long long)r->client_id, r->num_metrics,
                              TERN_STRATEGY_MAX_METRICS);
    if (r->num_metrics && !r->metrics)
        return tern_set_error(&s->err, TERN_ERR_INVALID, "client %llu: NULL metrics",
                              (unsigned long long)r->client_id);
    for (size_t i = 0; i < r->num_metrics; i++) {
        const tern_metric *m = &r->metrics[i];
        size_t len = m->name ? strnlen(m->name, TERN_STRATEGY_METRIC_NAME_MAX + 1) : 0;
        if (len == 0 || len > TERN_STRATEGY_METRIC_NAME_MAX)
            return tern_set_error(&s->err, TERN_ERR_INVALID,
                                  "client %llu: metric %zu needs a name of 1 to %d bytes",
                                  (unsigned long long)r->client_id, i,
                                  TERN_STRATEGY_METRIC_NAME_MAX);
        if (!isfinite(m->value))
            return tern_set_error(&s->err, TERN_ERR_INVALID,
                                  "client %llu: metric '%s' is not finite",
                                  (unsigned long long)r->client_id, m->name);
        for (size_t j = 0; j < i; j++)
            if (strcmp(r->metrics[j].name, m->name) == 0)
                return tern_set_error(&s->err, TERN_ERR_INVALID,
                                      "client %llu: metric '%s' given twice",
                                      (unsigned long long)r->client_id, m->name);
    }
    return TERN_OK;
}

/* A rejection of a selected client's result: the client is done for this round. */
static tern_status reject(tern_strategy *s, fit_slot *slot, tern_status st)
{
    slot->state = SLOT_FAILED;
    s->num_failures++;
    return st;
}

static tern_status add_result(tern_strategy *s, const tern_fit_result *r, bool defer);

tern_status tern_strategy_add_fit_result(tern_strategy *s, const tern_fit_result *r)
{
    return add_result(s, r, false);
}

tern_status tern_strategy_add_fit_result_deferred(tern_strategy *s, const tern_fit_result *r)
{
    if (s->num_pending == TERN_STRATEGY_MAX_PENDING)
        return tern_set_error(&s->err, TERN_ERR_STATE, "%d results pending: flush first",
                              TERN_STRATEGY_MAX_PENDING);
    return add_result(s, r, true);
}

size_t tern_strategy_pending(const tern_strategy *s)
{
    return s ? s->num_pending : 0;
}

void tern_strategy_flush(tern_strategy *s)
{
    if (!s || s->num_pending == 0)
        return;
    double *bins[3] = {s->acc, s->acc + s->stride, s->acc + 2 * s->stride};
    strategy_acc_add_many(bins, s->pending, s->num_pending, s->global, s->n, s->isa);
    s->num_pending = 0;
}

static tern_status add_result(tern_strategy *s, const tern_fit_result *r, bool defer)
{
    if (!r)
        return tern_set_error(&s->err, TERN_ERR_INVALID, "add_fit_result: NULL result");
    if (!s->fit_open)
        return tern_set_error(&s->err, TERN_ERR_STATE,
                              "client %llu: no fit round is open", (unsigned long long)r->client_id);
    const unsigned long long id = r->client_id;
    const unsigned long long round = s->fit_round;
    size_t at = find_slot(s->plan.slots, sizeof(fit_slot), s->num_selected, r->client_id);
    if (at == s->num_selected)
        return tern_set_error(&s->err, TERN_ERR_NOT_FOUND,
                              "client %llu was not selected for fit round %llu", id, round);
    fit_slot *slot = &s->plan.slots[at];
    if (slot->state != SLOT_WAITING)
        return tern_set_error(&s->err, TERN_ERR_EXISTS,
                              "client %llu already reported in fit round %llu (%s)", id, round,
                              slot->state == SLOT_ACCEPTED ? "accepted" : "failed");

    tern_status st;
    if (!r->update)
        st = tern_set_error(&s->err, TERN_ERR_INVALID, "client %llu: NULL update", id);
    else if (r->num_params != s->n)
        st = tern_set_error(&s->err, TERN_ERR_SHAPE,
                            "client %llu: update has %zu values, the model has %zu", id,
                            r->num_params, s->n);
    else if (r->num_examples == 0)
        st = tern_set_error(&s->err, TERN_ERR_INVALID, "client %llu: zero training examples", id);
    else
        st = check_metrics(s, r);
    if (st != TERN_OK)
        return reject(s, slot, st);

    const bool is_delta = s->opt.update == TERN_UPDATE_DELTA;
    update_stats stats;
    strategy_update_stats(r->update, s->global, s->n, is_delta, &stats, s->isa);
    if (!stats.finite)
        return reject(s, slot, tern_set_error(&s->err, TERN_ERR_INVALID,
                                              "client %llu: update value %zu is not finite", id,
                                              stats.first_bad));
    /* Central-DP hook: per-update clipping happens here; noise joins at aggregation. */
    double scale = 1.0;
    const double bound = s->opt.max_update_norm;
    if (bound > 0.0 && stats.norm > bound) {
        if (s->opt.norm_policy == TERN_NORM_REJECT)
            return reject(s, slot, tern_set_error(&s->err, TERN_ERR_INVALID,
                                                  "client %llu: update norm %.6g exceeds the "
                                                  "bound %.6g", id, stats.norm, bound));
        scale = bound / stats.norm;
    }
    if (UINT64_MAX - s->examples < r->num_examples)
        return reject(s, slot, tern_set_error(&s->err, TERN_ERR_INVALID,
                                              "client %llu: example count overflows", id));

    if (s->acc) {
        /* A bound on max |v| over coordinates: ||u||, or after clipping weights (v = g +
         * scale (u - g)) ||g|| + the clipped change's norm. */
        double max_abs = stats.norm_u;
        if (scale < 1.0 && !is_delta) {
            double gg = 0.0;
            for (size_t i = 0; i < s->n; i++)
                gg += (double)s->global[i] * (double)s->global[i];
            max_abs = sqrt(gg) + bound;
        }
        double range = (double)r->num_examples * max_abs;
        if (!(s->range_used + range <= STRATEGY_ACC_RANGE))
            return reject(s, slot, tern_set_error(&s->err, TERN_ERR_INVALID,
                                                  "client %llu: examples x update norm = %.6g "
                                                  "leaves the exact accumulator's range (2^50 "
                                                  "per round)", id, range));
        acc_mode mode = is_delta ? ACC_DELTA : scale < 1.0 ? ACC_WEIGHTS_CLIP : ACC_WEIGHTS;
        acc_item item = {r->update, (double)r->num_examples, scale, mode};
        if (defer) {
            s->pending[s->num_pending++] = item;
        } else {
            double *bins[3] = {s->acc, s->acc + s->stride, s->acc + 2 * s->stride};
            strategy_acc_add_many(bins, &item, 1, s->global, s->n, s->isa);
        }
        s->range_used += range;
    } else {
        float *row = s->plan.rows + at * s->stride;
        if (scale == 1.0)
            memcpy(row, r->update, s->n * sizeof(float));
        else if (is_delta)
            for (size_t i = 0; i < s->n; i++)
                row[i] = (float)((double)r->update[i] * scale);
        else
            for (size_t i = 0; i < s->n; i++) {
                double g = s->global[i];
                row[i] = (float)(g + scale * ((double)r->update[i] - g));
            }
    }

    slot->state = SLOT_ACCEPTED;
    s->last_norm = stats.norm;
    slot->examples = r->num_examples;
    slot->num_metrics = r->num_metrics;
    for (size_t i = 0; i < r->num_metrics; i++) {
        strcpy(slot->metric_names[i], r->metrics[i].name); /* length checked */
        slot->metric_values[i] = r->metrics[i].value;
    }
    s->examples += r->num_examples;
    s->num_results++;
    if (scale < 1.0)
        s->num_clipped++;
    return TERN_OK;
}

double tern_strategy_last_update_norm(const tern_strategy *s)
{
    return s ? s->last_norm : NAN;
}

tern_status tern_strategy_add_fit_failure(tern_strategy *s, uint64_t client_id)
{
    if (!s->fit_open)
        return tern_set_error(&s->err, TERN_ERR_STATE, "no fit round is open");
    size_t at = find_slot(s->plan.slots, sizeof(fit_slot), s->num_selected, client_id);
    if (at == s->num_selected)
        return tern_set_error(&s->err, TERN_ERR_NOT_FOUND,
                              "client %llu was not selected for fit round %llu",
                              (unsigned long long)client_id, (unsigned long long)s->fit_round);
    fit_slot *slot = &s->plan.slots[at];
    if (slot->state != SLOT_WAITING)
        return tern_set_error(&s->err, TERN_ERR_EXISTS,
                              "client %llu already reported in fit round %llu",
                              (unsigned long long)client_id, (unsigned long long)s->fit_round);
    slot->state = SLOT_FAILED;
    s->num_failures++;
    return TERN_OK;
}

/* ---- aggregation -------------------------------------------------------------------------- */

/* Example-weighted metric means in strcmp order of names: repeatedly take the smallest name
 * above the last one emitted, so nothing is allocated and arrival order cannot matter. */
static void summarize_metrics(const tern_strategy *s, tern_fit_summary *sum)
{
    const char *last = NULL;
    sum->num_metrics = 0;
    while (sum->num_metrics < TERN_STRATEGY_MAX_METRICS) {
        const char *next = NULL;
        for (size_t i = 0; i < s->num_selected; i++) {
            const fit_slot *slot = &s->plan.slots[i];
            if (slot->state != SLOT_ACCEPTED)
                continue;
            for (size_t m = 0; m < slot->num_metrics; m++) {
                const char *name = slot->metric_names[m];
                if ((!last || strcmp(name, last) > 0) && (!next || strcmp(name, next) < 0))
                    next = name;
            }
        }
        if (!next)
            break;
        double num = 0.0, den = 0.0;
        for (size_t i = 0; i < s->num_selected; i++) {
            const fit_slot *slot = &s->plan.slots[i];
            if (slot->state != SLOT_ACCEPTED)
                continue;
            for (size_t m = 0; m < slot->num_metrics; m++)
                if (strcmp(slot->metric_names[m], next) == 0) {
                    num += (double)slot->examples * slot->metric_values[m];
                    den += (double)slot->examples;
                }
        }
        size_t k = sum->num_metrics++;
        strcpy(sum->metric_names[k], next);
        sum->metric_values[k] = num / den;
        last = next;
    }
}

/* The averaged vector (weights or the global plus the mean delta) at coordinate i. */
static inline double averaged(const tern_strategy *s, double *const bins[3], size_t i, double total)
{
    double v = strategy_acc_value(bins, i, total);
    return s->opt.update == TERN_UPDATE_DELTA ? (double)s->global[i] + v : v;
}

static void apply_average(tern_strategy *s)
{
    double *bins[3] = {s->acc, s->acc + s->stride, s->acc + 2 * s->stride};
    const double total = (double)s->examples;
    float *w = s->global;
    const size_t n = s->n;
    const tern_strategy_options *o = &s->opt;

    switch (o->kind) {
    case TERN_STRATEGY_FEDAVGM:
        if (o->server_momentum > 0.0f || o->server_learning_rate != 1.0f) {
            /* Flower's FedAvgM: pseudo-gradient w - avg, momentum started in the first round. */
            const double lr = o->server_learning_rate, mu = o->server_momentum;
            float *mom = s->nstate ? s->state : NULL;
            const bool started = s->rounds > 0;
            for (size_t i = 0; i < n; i++) {
                double g = w[i];
                double d = g - averaged(s, bins, i, total);
                if (mom) {
                    d = started ? mu * (double)mom[i] + d : d;
                    mom[i] = (float)d;
                }
                w[i] = (float)(g - lr * d);
            }
            return;
        }
        break;
    case TERN_STRATEGY_FEDADAGRAD:
    case TERN_STRATEGY_FEDADAM:
    case TERN_STRATEGY_FEDYOGI: {
        float *m = s->state, *v = s->state + s->stride;
        const double b1 = o->beta_1, b2 = o->beta_2, eta = o->eta, tau = o->tau;
        for (size_t i = 0; i < n; i++) {
            double g = w[i];
            double d = averaged(s, bins, i, total) - g;
            double mi = b1 * (double)m[i] + (1.0 - b1) * d;
            double vi = v[i], d2 = d * d;
            if (o->kind == TERN_STRATEGY_FEDADAGRAD)
                vi = vi + d2;
            else if (o->kind == TERN_STRATEGY_FEDADAM)
                vi = b2 * vi + (1.0 - b2) * d2;
            else {
                double diff = vi - d2;
                double sign = (diff > 0.0) - (diff < 0.0);
                vi = vi - (1.0 - b2) * d2 * sign;
            }
            m[i] = (float)mi;
            v[i] = (float)vi;
            w[i] = (float)(g + eta * mi / (sqrt(vi) + tau));
        }
        return;
    }
    default:
        break;
    }
    /* FedAvg, FedProx, FedAvgM without momentum at lr 1. */
    for (size_t i = 0; i < n; i++)
        w[i] = (float)averaged(s, bins, i, total);
}

/* Krum / Multi-Krum over the r accepted rows (row a is slot order[a]; both in id order). */
static void apply_krum(tern_strategy *s, size_t r)
{
    fit_plan *p = &s->plan;
    const float *const *rows = p->row_ptrs;
    strategy_pairwise_sq_dist(p->dist, rows, r, s->n);
    const size_t f = s->opt.num_malicious_clients;
    size_t closest = r > f + 2 ? r - f - 2 : 1;
    if (closest > r - 1)
        closest = r - 1;
    for (size_t a = 0; a < r; a++) {
        size_t k = 0;
        for (size_t b = 0; b < r; b++)
            if (b != a)
                p->tmp[k++] = p->dist[a * r + b];
        strategy_sort_doubles(p->tmp, k);
        double score = 0.0;
        for (size_t j = 0; j < closest; j++) /* ascending: a fixed summation order */
            score += p->tmp[j];
        p->scores[a] = score;
    }
    /* Rank rows by (score, id): a stable insertion sort of row indices. */
    size_t *rank = p->rank;
    for (size_t a = 0; a < r; a++)
        rank[a] = a;
    for (size_t a = 1; a < r; a++) {
        size_t v = rank[a], j = a;
        while (j > 0 && p->scores[v] < p->scores[rank[j - 1]]) {
            rank[j] = rank[j - 1];
            j--;
        }
        rank[j] = v;
    }
    const bool is_delta = s->opt.update == TERN_UPDATE_DELTA;
    float *w = s->global;
    size_t keep = s->opt.num_clients_to_keep;
    if (keep == 0) {
        const float *best = rows[rank[0]];
        for (size_t i = 0; i < s->n; i++)
            w[i] = is_delta ? (float)((double)w[i] + (double)best[i]) : best[i];
        return;
    }
    if (keep > r)
        keep = r;
    /* Multi-Krum: example-weighted mean of the kept rows, summed in id order. */
    for (size_t a = 1; a < keep; a++) {
        size_t v = rank[a], j = a;
        while (j > 0 && v < rank[j - 1]) {
            rank[j] = rank[j - 1];
            j--;
        }
        rank[j] = v;
    }
    double total = 0.0;
    for (size_t a = 0; a < keep; a++) {
        p->tmp[a] = (double)p->slots[p->order[rank[a]]].examples;
        total += p->tmp[a];
    }
    for (size_t i = 0; i < s->n; i++) {
        double sum = 0.0;
        for (size_t a = 0; a < keep; a++)
            sum += p->tmp[a] * (double)rows[rank[a]][i];
        double avg = sum / total;
        w[i] = (float)(is_delta ? (double)w[i] + avg : avg);
    }
}

tern_status tern_strategy_aggregate_fit(tern_strategy *s, tern_fit_summary *summary)
{
    if (!s->fit_open)
        return tern_set_error(&s->err, TERN_ERR_STATE, "aggregate_fit: no fit round is open");
    s->fit_open = false;
    const unsigned long long round = s->fit_round;
    if (s->num_results == 0 || (s->num_failures > 0 && !s->opt.accept_failures))
        s->num_pending = 0; /* the round closes without them */
    if (s->num_results == 0)
        return tern_set_error(&s->err, TERN_ERR_STATE,
                              "fit round %llu: no result to aggregate (%zu failures)", round,
                              s->num_failures);
    if (s->num_failures > 0 && !s->opt.accept_failures)
        return tern_set_error(&s->err, TERN_ERR_STATE,
                              "fit round %llu: %zu failures and accept_failures is off", round,
                              s->num_failures);
    if (summary) {
        memset(summary, 0, sizeof *summary);
        summary->server_round = s->fit_round;
        summary->num_selected = s->num_selected;
        summary->num_results = s->num_results;
        summary->num_failures = s->num_failures;
        summary->num_clipped = s->num_clipped;
        summary->num_examples = s->examples;
        summarize_metrics(s, summary);
    }

    if (!is_robust(s->opt.kind)) {
        tern_strategy_flush(s);
        apply_average(s);
    } else {
        fit_plan *p = &s->plan;
        size_t r = 0;
        for (size_t i = 0; i < s->num_selected; i++)
            if (p->slots[i].state == SLOT_ACCEPTED) {
                p->order[r] = i;
                p->row_ptrs[r] = p->rows + i * s->stride;
                r++;
            }
        const float *base = s->opt.update == TERN_UPDATE_DELTA ? s->global : NULL;
        switch (s->opt.kind) {
        case TERN_STRATEGY_FEDMEDIAN:
            strategy_median_trimmed(s->global, base, p->row_ptrs, r, s->n, true, 0, p->scratch);
            break;
        case TERN_STRATEGY_FEDTRIMMEDAVG: {
            size_t cut = (size_t)floor((double)s->opt.trim_beta * (double)r);
            strategy_median_trimmed(s->global, base, p->row_ptrs, r, s->n, false, cut,
                                    p->scratch);
            break;
        }
        default:
            apply_krum(s, r);
            break;
        }
    }
    /* Central DP: Gaussian noise on the aggregate goes here (a later issue). */
    s->rounds++;
    return TERN_OK;
}

/* ---- evaluation --------------------------------------------------------------------------- */

tern_status tern_strategy_add_evaluate_result(tern_strategy *s, const tern_evaluate_result *r)
{
    if (!r)
        return tern_set_error(&s->err, TERN_ERR_INVALID, "add_evaluate_result: NULL result");
    const unsigned long long id = r->client_id;
    if (!s->eval_open)
        return tern_set_error(&s->err, TERN_ERR_STATE,
                              "client %llu: no evaluation round is open", id);
    size_t at = find_slot(s->eval_slots, sizeof(eval_slot), s->eval_selected, r->client_id);
    if (at == s->eval_selected)
        return tern_set_error(&s->err, TERN_ERR_NOT_FOUND,
                              "client %llu was not selected for evaluation round %llu", id,
                              (unsigned long long)s->eval_round);
    eval_slot *slot = &s->eval_slots[at];
    if (slot->state != SLOT_WAITING)
        return tern_set_error(&s->err, TERN_ERR_EXISTS,
                              "client %llu already reported in evaluation round %llu", id,
                              (unsigned long long)s->eval_round);
    if (r->num_examples == 0 || !isfinite(r->loss) || (r->has_accuracy && !isfinite(r->accuracy))) {
        slot->state = SLOT_FAILED;
        s->eval_failures++;
        return tern_set_error(&s->err, TERN_ERR_INVALID,
                              "client %llu: evaluation needs examples >= 1 and a finite loss "
                              "and accuracy", id);
    }
    slot->state = SLOT_ACCEPTED;
    slot->examples = r->num_examples;
    slot->loss = r->loss;
    slot->has_accuracy = r->has_accuracy;
    slot->accuracy = r->accuracy;
    s->eval_results++;
    return TERN_OK;
}

tern_status tern_strategy_aggregate_evaluate(tern_strategy *s, tern_evaluate_summary *summary)
{
    if (!s->eval_open)
        return tern_set_error(&s->err, TERN_ERR_STATE,
                              "aggregate_evaluate: no evaluation round is open");
    s->eval_open = false;
    if (s->eval_results == 0)
        return tern_set_error(&s->err, TERN_ERR_STATE,
                              "evaluation round %llu: no result to aggregate",
                              (unsigned long long)s->eval_round);
    double loss = 0.0, acc = 0.0, acc_examples = 0.0;
    uint64_t examples = 0;
    for (size_t i = 0; i < s->eval_selected; i++) { /* id order */
        const eval_slot *slot = &s->eval_slots[i];
        if (slot->state != SLOT_ACCEPTED)
            continue;
        double w = (double)slot->examples;
        examples += slot->examples;
        loss += w * slot->loss;
        if (slot->has_accuracy) {
            acc += w * slot->accuracy;
            acc_examples += w;
        }
    }
    if (summary) {
        summary->server_round = s->eval_round;
        summary->num_results = s->eval_results;
        summary->num_failures = s->eval_failures;
        summary->num_examples = examples;
        summary->loss = loss / (double)examples;
        summary->accuracy = acc_examples > 0.0 ? acc / acc_examples : NAN;
    }
    return TERN_OK;
}

/* ---- client side -------------------------------------------------------------------------- */

void tern_fedprox_add_proximal(float *grads, const float *params, const float *global, size_t n,
                               float mu)
{
    for (size_t i = 0; i < n; i++)
        grads[i] += mu * (params[i] - global[i]);
}
