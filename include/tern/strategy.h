/* Federated aggregation strategies: client selection, validation of client updates, and the
 * server-side aggregation of one round, with Flower's vocabulary and defaults.
 *
 * A tern_strategy holds the global parameter vector (n floats, the model's flat parameter
 * block; BatchNorm buffers travel separately) and the server-side state a strategy keeps across
 * rounds (FedAvgM momentum, FedOpt m_t and v_t). A round runs:
 *
 *   tern_strategy_configure_fit        pick clients from the available ids; plan the round
 *   tern_strategy_add_fit_result       for each result as it arrives: validate, then fold in
 *   tern_strategy_aggregate_fit        new global vector (tern_strategy_global)
 *   tern_strategy_configure_evaluate / _add_evaluate_result / _aggregate_evaluate   (optional)
 *
 * Strategies (server side; w = global vector, u_i = client vectors, n_i = example counts):
 *   FEDAVG      sum(n_i u_i) / sum(n_i)                                (McMahan et al.)
 *   FEDPROX     as FEDAVG; the proximal term is client side: tern_fedprox_add_proximal
 *   FEDAVGM     avg = FedAvg; d = w - avg; mom = d (first round) or beta * mom + d;
 *               w -= server_lr * mom                                  (Hsu et al.)
 *   FEDADAGRAD, FEDADAM, FEDYOGI
 *               delta = FedAvg - w; m = b1 m + (1 - b1) delta;
 *               v = v + delta^2 (Adagrad) | b2 v + (1 - b2) delta^2 (Adam)
 *                 | v - (1 - b2) delta^2 sign(v - delta^2) (Yogi);
 *               w += eta m / (sqrt(v) + tau)      (Reddi et al. 2021, as Flower: m, v start at 0)
 *   FEDMEDIAN   coordinate-wise median of the u_i (unweighted; even count: mean of the middle two)
 *   FEDTRIMMEDAVG
 *               per coordinate, drop floor(trim_beta * K) values from each end, mean of the rest
 *   KRUM        score_i = sum of the K - f - 2 (at least 1) smallest squared distances from u_i
 *               to the others; Krum: the u_i with the lowest score; Multi-Krum
 *               (num_clients_to_keep = m > 0): example-weighted mean of the m lowest scores
 *               (Blanchard et al.; Flower's weighting)
 *
 * Determinism: the new global vector depends only on the set of accepted results, never on the
 * order they arrive in. Weighted means are accumulated exactly: each term n_i * u_i (computed in
 * double) is rounded once to a grid of 2^-74 and split over three double "bins" whose sums are
 * exact (integer-like), so addition order cannot change a bit; the combination and the division
 * by sum(n_i) happen once, at aggregation. This is more accurate than a plain double sum; the
 * price is that terms below 2^-75 in magnitude are lost, and a round's sum(n_i * ||u_i||_2) (a
 * bound on sum(n_i * max|u_i|)) must stay below 2^50, about 1.1e15 (a result that would break it
 * is rejected). Median, trimmed mean and Krum keep
 * every vector in one buffer planned at configure time, in client-id order.
 *
 * Memory: averaging strategies allocate 3n doubles at create (the exact accumulator); the
 * server optimizers n floats per state vector; FEDMEDIAN, FEDTRIMMEDAVG and KRUM K * n floats
 * (K = clients selected) at configure_fit, reused by later rounds that fit; KRUM also K*K
 * doubles. Nothing is allocated per result or at aggregation.
 *
 * Not thread-safe: one caller at a time per strategy. */
#ifndef TERN_STRATEGY_H
#define TERN_STRATEGY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tern/alloc.h"
#include "tern/model.h" /* tern_isa */
#include "tern/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum tern_strategy_kind {
    TERN_STRATEGY_FEDAVG,
    TERN_STRATEGY_FEDPROX,
    TERN_STRATEGY_FEDAVGM,
    TERN_STRATEGY_FEDADAGRAD,
    TERN_STRATEGY_FEDADAM,
    TERN_STRATEGY_FEDYOGI,
    TERN_STRATEGY_FEDMEDIAN,
    TERN_STRATEGY_FEDTRIMMEDAVG,
    TERN_STRATEGY_KRUM, /* Multi-Krum with num_clients_to_keep > 0 */
} tern_strategy_kind;

/* "fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedmedian",
 * "fedtrimmedavg", "krum"; static storage ("?" outside the enum). */
const char *tern_strategy_kind_name(tern_strategy_kind kind);
/* Inverse of tern_strategy_kind_name; TERN_ERR_INVALID for anything else. */
tern_status tern_strategy_kind_parse(const char *name, tern_strategy_kind *out);

/* What a client sends back. */
typedef enum tern_update_kind {
    TERN_UPDATE_WEIGHTS, /* its full parameter vector after training */
    TERN_UPDATE_DELTA,   /* its parameters minus the global vector it was sent */
} tern_update_kind;

/* What happens to an update whose change (client weights minus global, or the delta) has an L2
 * norm above max_update_norm. */
typedef enum tern_norm_policy {
    TERN_NORM_REJECT, /* the result is rejected (TERN_ERR_INVALID) */
    TERN_NORM_CLIP,   /* the change is scaled by max_update_norm / norm: the clipping step of
                         central DP (Flower's server-side fixed clipping); noise on the aggregate
                         is a later addition at aggregation */
} tern_norm_policy;

/* Options. Fields a kind does not use are ignored. Ranges, checked by tern_strategy_create:
 *   num_params >= 1; 0 < fraction_fit <= 1; 0 <= fraction_evaluate <= 1;
 *   min_* >= 1 (min_evaluate_clients only when fraction_evaluate > 0);
 *   max_update_norm finite and >= 0 (0: no bound);
 *   FEDAVGM: server_learning_rate > 0, 0 <= server_momentum < 1;
 *   FedOpt: eta > 0, eta_l >= 0, 0 <= beta_1 < 1, 0 <= beta_2 < 1, tau > 0;
 *   FEDTRIMMEDAVG: 0 <= trim_beta < 0.5; proximal_mu >= 0. */
typedef struct tern_strategy_options {
    tern_strategy_kind kind;
    size_t num_params;       /* n: length of the global vector and of every update */
    tern_update_kind update; /* what clients send; the output is always the new global vector */

    /* Client selection (Flower's FedAvg): a fit round samples
     * max(floor(fraction_fit * available), min_fit_clients) clients and needs at least
     * min_available_clients available; evaluate likewise (fraction_evaluate 0: no evaluation). */
    double fraction_fit;           /* default 1.0 */
    double fraction_evaluate;      /* default 1.0 */
    size_t min_fit_clients;        /* default 2 */
    size_t min_evaluate_clients;   /* default 2 */
    size_t min_available_clients;  /* default 2 */
    uint64_t seed;                 /* selection stream; round r uses a stream derived from (seed, r) */
    bool accept_failures;          /* default true: aggregate a round that had failures */

    /* Validation of each update. */
    double max_update_norm;        /* L2 bound on each client's change; 0 (default): none */
    tern_norm_policy norm_policy;  /* default TERN_NORM_REJECT */

    float proximal_mu;             /* FEDPROX: client-side mu, for the runtime to send; default 0.01 */
    float server_learning_rate;    /* FEDAVGM: default 1.0 */
    float server_momentum;         /* FEDAVGM: default 0.0 */
    float eta;                     /* FedOpt server learning rate: default 1e-1 */
    float eta_l;                   /* FedOpt client learning rate, for the runtime to send: 1e-1 */
    float beta_1;                  /* FedOpt: 0.9 (FEDADAGRAD: 0.0, as Flower) */
    float beta_2;                  /* FedAdam/FedYogi: 0.99 */
    float tau;                     /* FedOpt: 1e-9 */
    float trim_beta;               /* FEDTRIMMEDAVG: fraction cut from each end, default 0.2 */
    size_t num_malicious_clients;  /* KRUM: f, default 0 */
    size_t num_clients_to_keep;    /* KRUM: 0 = Krum, m > 0 = Multi-Krum (default 0) */

    const tern_allocator *alloc;   /* NULL: the C library; borrowed, must outlive the strategy */
    /* Kernels for the per-parameter loops (validation, exact accumulation): TERN_ISA_AUTO (0,
     * default) picks the best this CPU runs; every level gives bitwise the same results. */
    tern_isa isa;
} tern_strategy_options;

/* Flower's defaults for kind (listed above), num_params 0 (the caller must set it), updates as
 * full weights. */
tern_strategy_options tern_strategy_options_default(tern_strategy_kind kind);

/* Most clients one round may select (bounds the exact accumulator's headroom). */
#define TERN_STRATEGY_MAX_ROUND_CLIENTS 65536
/* Metrics a fit result may carry, and the longest metric name (bytes, NUL excluded). */
#define TERN_STRATEGY_MAX_METRICS 8
#define TERN_STRATEGY_METRIC_NAME_MAX 31

typedef struct tern_strategy tern_strategy;

/* A strategy whose global vector starts as a copy of initial (num_params floats, all finite).
 * Errors: TERN_ERR_INVALID (NULL argument, option out of range, non-finite initial value;
 * detail in err), TERN_ERR_NOMEM. *out is untouched on failure. */
tern_status tern_strategy_create(const tern_strategy_options *opt, const float *initial,
                                 tern_strategy **out, tern_error *err);
/* Free the strategy and everything it owns; *strategy becomes NULL. Accepts NULL. */
void tern_strategy_destroy(tern_strategy **strategy);

/* The validated options (borrowed, valid for the strategy's life). */
const tern_strategy_options *tern_strategy_options_of(const tern_strategy *s);
/* Detail of the last failed call, rejections included ("" if none). Borrowed until the next
 * call on s. */
const char *tern_strategy_last_error(const tern_strategy *s);

/* The global vector (num_params floats). Borrowed: valid for the strategy's life, its contents
 * change at tern_strategy_aggregate_fit and tern_strategy_set_global. */
const float *tern_strategy_global(const tern_strategy *s);
/* Replace the global vector (restoring from the registry, say); server-side state (momentum,
 * m_t, v_t) is kept. Ends any open fit round. TERN_ERR_INVALID: NULL or non-finite values. */
tern_status tern_strategy_set_global(tern_strategy *s, const float *params);
/* Rounds aggregated since creation (or as restored with tern_strategy_set_rounds). */
uint64_t tern_strategy_rounds(const tern_strategy *s);
void tern_strategy_set_rounds(tern_strategy *s, uint64_t rounds);

/* Server-side state vectors, for checkpointing: FEDAVGM with momentum "momentum";
 * FedOpt "m_t", "v_t"; others none. */
size_t tern_strategy_state_count(const tern_strategy *s);
/* i-th state vector: name (static storage) and data (num_params floats, borrowed for the
 * strategy's life, writable: restoring writes here). Out pointers may be NULL.
 * TERN_ERR_INVALID if i is out of range. */
tern_status tern_strategy_state_at(tern_strategy *s, size_t i, const char **name, float **data);

/* ---- selection ---------------------------------------------------------------------------- */

/* Flower's num_fit_clients / num_evaluate_clients: clients to sample and the minimum that must
 * be available, for num_available available clients. Either out pointer may be NULL. */
void tern_strategy_num_fit_clients(const tern_strategy *s, size_t num_available,
                                   size_t *sample_size, size_t *min_available);
void tern_strategy_num_evaluate_clients(const tern_strategy *s, size_t num_available,
                                        size_t *sample_size, size_t *min_available);

/* Start fit round server_round (>= 1): sample clients from available (num_available distinct
 * ids, in any order: the sample depends only on the set, the seed and the round) and plan the
 * round for them. selected receives the chosen ids in increasing order and must have room for
 * num_available ids; *num_selected their count. An unfinished fit round is dropped.
 * Errors: TERN_ERR_INVALID (NULL, duplicate ids, round 0), TERN_ERR_STATE (fewer clients
 * available than min_available_clients or the sample size: wait and retry), TERN_ERR_NOMEM
 * (planning the round; the strategy stays usable, with no round open). Detail in last_error. */
tern_status tern_strategy_configure_fit(tern_strategy *s, uint64_t server_round,
                                        const uint64_t *available, size_t num_available,
                                        uint64_t *selected, size_t *num_selected);

/* ---- fit results -------------------------------------------------------------------------- */

typedef struct tern_metric {
    const char *name; /* 1..TERN_STRATEGY_METRIC_NAME_MAX bytes; borrowed for the call */
    double value;     /* finite */
} tern_metric;

/* One client's fit result; every pointer is borrowed for the duration of the call only. */
typedef struct tern_fit_result {
    uint64_t client_id;      /* one of the ids selected for this round, once */
    const float *update;     /* num_params floats: weights or delta (options.update) */
    size_t num_params;       /* must equal the strategy's */
    uint64_t num_examples;   /* training examples, >= 1 */
    const tern_metric *metrics; /* optional (NULL with num_metrics 0), distinct names */
    size_t num_metrics;      /* <= TERN_STRATEGY_MAX_METRICS */
} tern_fit_result;

/* Validate a result and fold it into the open round. Checked before anything is used: an open
 * round, a selected client not seen yet this round, the length, num_examples >= 1, every value
 * finite, the change's L2 norm against max_update_norm (norm_policy), the metrics, and the exact
 * accumulator's range. A rejected result leaves the round's aggregate unchanged and counts as a
 * failure; the round stays open.
 * Errors: TERN_ERR_STATE (no open fit round), TERN_ERR_NOT_FOUND (client not selected),
 * TERN_ERR_EXISTS (a result from that client was already accepted), TERN_ERR_SHAPE (wrong
 * length), TERN_ERR_INVALID (NULL, non-finite value, norm above the bound, bad metric, zero
 * examples, out of accumulator range). Detail in last_error. */
tern_status tern_strategy_add_fit_result(tern_strategy *s, const tern_fit_result *result);
/* Most accepted results whose accumulation tern_strategy_add_fit_result_deferred keeps pending. */
#define TERN_STRATEGY_MAX_PENDING 8
/* As tern_strategy_add_fit_result (the same checks, errors and rejections, decided now), except
 * that an averaging strategy may keep an accepted result's update BORROWED and fold it into the
 * accumulator later, together with the others pending: one pass over the accumulator (three
 * doubles per parameter) for several updates instead of one each. The aggregate is bitwise the
 * same. The caller keeps every pending update valid and unchanged until tern_strategy_pending
 * says 0: after tern_strategy_flush, tern_strategy_aggregate_fit (which flushes), or the next
 * configure_fit / set_global (which drop them with the round). TERN_ERR_STATE when
 * TERN_STRATEGY_MAX_PENDING are pending already (flush first). Robust strategies copy the update
 * at once, as add_fit_result does. */
tern_status tern_strategy_add_fit_result_deferred(tern_strategy *s, const tern_fit_result *result);
/* Updates accepted by add_fit_result_deferred and not folded in yet (their buffers are still
 * borrowed). */
size_t tern_strategy_pending(const tern_strategy *s);
/* Fold the pending updates into the accumulator; afterwards none is borrowed. Never fails. */
void tern_strategy_flush(tern_strategy *s);
/* The L2 norm of the change of the result that add_fit_result accepted last (u - global for
 * weights, u for deltas; before any clipping), so that callers need no pass of their own; NaN
 * before the first accepted result. */
double tern_strategy_last_update_norm(const tern_strategy *s);
/* Record that a selected client failed (vanished, timed out) this round. TERN_ERR_STATE if no
 * fit round is open. */
tern_status tern_strategy_add_fit_failure(tern_strategy *s, uint64_t client_id);

typedef struct tern_fit_summary {
    uint64_t server_round;
    size_t num_selected;
    size_t num_results;      /* accepted */
    size_t num_failures;     /* reported failures plus rejected results */
    size_t num_clipped;      /* accepted results scaled by TERN_NORM_CLIP */
    uint64_t num_examples;   /* over accepted results */
    /* Example-weighted mean of each metric over the results that reported it, names in
     * strcmp order; the first TERN_STRATEGY_MAX_METRICS names if more were reported. */
    size_t num_metrics;
    char metric_names[TERN_STRATEGY_MAX_METRICS][TERN_STRATEGY_METRIC_NAME_MAX + 1];
    double metric_values[TERN_STRATEGY_MAX_METRICS];
} tern_fit_summary;

/* Close the open fit round: aggregate the accepted results with the strategy's rule and make
 * the outcome the new global vector; summary (may be NULL) describes the round. Never
 * allocates. On failure the global vector and server state are unchanged and the round is
 * closed. Errors: TERN_ERR_STATE (no open round, no accepted result, or failures with
 * accept_failures false). */
tern_status tern_strategy_aggregate_fit(tern_strategy *s, tern_fit_summary *summary);

/* ---- evaluation --------------------------------------------------------------------------- */

/* As tern_strategy_configure_fit, for an evaluation round (fraction_evaluate,
 * min_evaluate_clients; its own random stream). With fraction_evaluate 0, selects nobody and
 * returns TERN_OK with *num_selected 0 (no round is opened). */
tern_status tern_strategy_configure_evaluate(tern_strategy *s, uint64_t server_round,
                                             const uint64_t *available, size_t num_available,
                                             uint64_t *selected, size_t *num_selected);

typedef struct tern_evaluate_result {
    uint64_t client_id;
    uint64_t num_examples; /* >= 1 */
    double loss;           /* finite */
    double accuracy;       /* finite, used when has_accuracy */
    bool has_accuracy;
} tern_evaluate_result;

/* Validate and record one evaluation result. Errors as tern_strategy_add_fit_result
 * (TERN_ERR_STATE, TERN_ERR_NOT_FOUND, TERN_ERR_EXISTS, TERN_ERR_INVALID). */
tern_status tern_strategy_add_evaluate_result(tern_strategy *s, const tern_evaluate_result *r);

typedef struct tern_evaluate_summary {
    uint64_t server_round;
    size_t num_results;
    size_t num_failures;     /* rejected results */
    uint64_t num_examples;
    double loss;             /* example-weighted mean */
    double accuracy;         /* example-weighted mean over results with accuracy, else NaN */
} tern_evaluate_summary;

/* Close the open evaluation round. Errors: TERN_ERR_STATE (no open round or no result). */
tern_status tern_strategy_aggregate_evaluate(tern_strategy *s, tern_evaluate_summary *summary);

/* ---- client side -------------------------------------------------------------------------- */

/* FedProx's proximal term: grads[i] += mu * (params[i] - global[i]) for i < n (the gradient of
 * mu/2 * ||w - w_global||^2). Call after the loss gradient, before the optimizer step. */
void tern_fedprox_add_proximal(float *grads, const float *params, const float *global, size_t n,
                               float mu);

#ifdef __cplusplus
}
#endif

#endif
