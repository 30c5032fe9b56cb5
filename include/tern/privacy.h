/* Differential-privacy accounting for DP-SGD: how much privacy (epsilon at a given delta) a run
 * of the Poisson-subsampled Gaussian mechanism spends, and how much noise a budget needs.
 *
 * Two accountants, both computing what Opacus (pytorch/opacus, opacus/accountants) computes:
 *
 *   RDP  Renyi-DP of the subsampled Gaussian (Mironov, Talwar & Zhang 2019, arXiv:1908.10530)
 *        at a list of orders, summed over the history and converted to (epsilon, delta) with
 *        Balle et al. 2020 (arXiv:1905.09982, Theorem 21):
 *          eps = min over orders a of  rdp(a) - (log(delta) + log(a)) / (a - 1) + log((a - 1) / a)
 *        Opacus's default orders are 1.1, 1.2, ..., 10.9 and 12, 13, ..., 63.
 *   PRV  numerical composition of privacy loss random variables (Gopi, Lee & Wutschitz 2021,
 *        arXiv:2106.02848): each step's PRV is discretized on a mesh chosen from eps_error and
 *        delta_error, self-composed with an FFT, and epsilon is read off the composed
 *        distribution. The result carries a guaranteed error: the true epsilon lies in
 *        [epsilon_lower, epsilon] and epsilon is the upper end, as Opacus's get_epsilon returns.
 *
 * A history is a list of (noise_multiplier, sample_rate, steps) entries, as Opacus keeps it:
 * training with a changing noise multiplier or batch size appends entries.
 *
 * Arguments are checked everywhere: sample rates in (0, 1], noise multipliers > 0 and finite,
 * steps >= 0, delta in (0, 1); anything else is TERN_ERR_INVALID. Nothing here prints, exits or
 * keeps global state, with one exception hidden from callers: FFTW's planner is not
 * thread-safe, so plan creation is serialized by a mutex internal to the PRV code. */
#ifndef TERN_PRIVACY_H
#define TERN_PRIVACY_H

#include <stddef.h>
#include <stdint.h>

#include "tern/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- RDP of the subsampled Gaussian mechanism ----------------------------------------------- */

/* Opacus's default RDP orders (151 of them); *orders points to static storage. Returns the
 * count. */
size_t tern_rdp_default_orders(const double **orders);

/* rdp[i] = RDP at orders[i] of `steps` compositions of the Gaussian mechanism with noise
 * multiplier `noise_multiplier` on a Poisson sample of rate `sample_rate`. Integer orders use
 * the exact binomial expansion, fractional ones the erfc series; q = 1 gives
 * steps * order / (2 sigma^2). Orders must be > 1 (INFINITY allowed: its RDP is infinite).
 * Values may be +INFINITY where the bound overflows. TERN_ERR_INVALID for bad arguments. */
tern_status tern_rdp_compute(double *rdp, double sample_rate, double noise_multiplier,
                             int64_t steps, const double *orders, size_t norders);

/* Epsilon of an RDP curve at delta (Balle et al. 2020), the minimum over orders; orders whose
 * value is not a number are skipped, and when all are, *epsilon = INFINITY and *best_order = NAN
 * (as Opacus). best_order may be NULL. TERN_ERR_INVALID for n == 0, an order <= 1 or delta
 * outside (0, 1). */
tern_status tern_rdp_epsilon(double *epsilon, double *best_order, const double *orders,
                             const double *rdp, size_t n, double delta);

/* ---- accountants ---------------------------------------------------------------------------- */

typedef enum tern_accountant_kind {
    TERN_ACCOUNTANT_RDP,
    TERN_ACCOUNTANT_PRV,
} tern_accountant_kind;

/* "rdp", "prv"; static storage ("?" outside the enum). */
const char *tern_accountant_kind_name(tern_accountant_kind kind);
/* Inverse of tern_accountant_kind_name; TERN_ERR_INVALID for anything else. */
tern_status tern_accountant_kind_parse(const char *name, tern_accountant_kind *out);

/* Zero fields mean Opacus's defaults. */
typedef struct tern_accountant_options {
    tern_accountant_kind kind;
    /* RDP: orders to evaluate (each > 1), copied at creation; NULL for the defaults. */
    const double *orders;
    size_t norders;
    /* PRV: allowed error in epsilon (default 0.01) and in delta (default delta / 1000). */
    double eps_error, delta_error;
    /* PRV: refuse (TERN_ERR_UNSUPPORTED) a discretization finer than this many points, which
     * bounds memory at about 40 bytes a point; default 1 << 25. */
    size_t prv_max_points;
} tern_accountant_options;

typedef struct tern_dp_entry {
    double noise_multiplier, sample_rate;
    int64_t steps;
} tern_dp_entry;

/* What an accountant reports for one delta. */
typedef struct tern_privacy_spent {
    double epsilon;          /* the guarantee: the RDP bound, or PRV's upper estimate */
    double best_order;       /* RDP: the order attaining it; PRV: NAN */
    double epsilon_estimate; /* PRV: the point estimate; RDP: = epsilon */
    double epsilon_lower;    /* PRV: lower end of the error interval; RDP: = epsilon */
} tern_privacy_spent;

typedef struct tern_accountant tern_accountant;

/* A new accountant with an empty history. TERN_ERR_INVALID for bad options (err explains),
 * TERN_ERR_NOMEM. *out is untouched on failure. err may be NULL. */
tern_status tern_accountant_create(const tern_accountant_options *options, tern_accountant **out,
                                   tern_error *err);
/* Frees the accountant and sets *self_p to NULL; NULL or *self_p == NULL is a no-op. */
void tern_accountant_destroy(tern_accountant **self_p);

/* Records one step: adds to the last entry when it has the same noise multiplier and sample
 * rate, else appends a new one (Opacus's step()). TERN_ERR_INVALID, TERN_ERR_NOMEM. */
tern_status tern_accountant_step(tern_accountant *a, double noise_multiplier, double sample_rate);
/* Appends an entry of `steps` steps as it is, without merging (like assigning to Opacus's
 * history). TERN_ERR_INVALID, TERN_ERR_NOMEM. */
tern_status tern_accountant_add(tern_accountant *a, double noise_multiplier, double sample_rate,
                                int64_t steps);
/* Empties the history. */
void tern_accountant_reset(tern_accountant *a);
size_t tern_accountant_history_count(const tern_accountant *a);
/* Entry i of the history; TERN_ERR_INVALID when i is out of range. */
tern_status tern_accountant_history_at(const tern_accountant *a, size_t i, tern_dp_entry *out);

/* Privacy spent by the history at delta. An empty history (or one with zero steps in all)
 * spends nothing: epsilon 0. Errors: TERN_ERR_INVALID (delta), TERN_ERR_NOMEM, and for PRV
 * TERN_ERR_UNSUPPORTED when the computation cannot be done to the requested accuracy (too many
 * points, delta too small for double precision, a mechanism with infinite epsilon); the detail
 * is in tern_accountant_last_error. */
tern_status tern_accountant_spent(tern_accountant *a, double delta, tern_privacy_spent *out);
/* Shorthand for tern_accountant_spent(...).epsilon. */
tern_status tern_accountant_epsilon(tern_accountant *a, double delta, double *epsilon);
/* Explanation of the last failure of a call on a; "" if none. Valid until the next call. */
const char *tern_accountant_last_error(const tern_accountant *a);

/* ---- noise search --------------------------------------------------------------------------- */

typedef struct tern_noise_query {
    double sample_rate;
    int64_t steps;
    double delta;
    double target_epsilon;    /* > 0 */
    double epsilon_tolerance; /* > 0; 0 means Opacus's 0.01 */
} tern_noise_query;

/* The noise multiplier that Opacus's get_noise_multiplier finds: starting from 20, the
 * multiplier is doubled until epsilon <= target (TERN_ERR_UNSUPPORTED, "budget too low", once
 * it passes 1e6), then bisected on [0, it] until target - epsilon <= tolerance. The result
 * spends epsilon in [target - tolerance, target] under the accountant `options` describes
 * (NULL: RDP with default orders). Errors: TERN_ERR_INVALID, TERN_ERR_NOMEM,
 * TERN_ERR_UNSUPPORTED, with the detail in err (may be NULL). */
tern_status tern_accountant_noise_multiplier(double *noise_multiplier,
                                             const tern_accountant_options *options,
                                             const tern_noise_query *query, tern_error *err);

#ifdef __cplusplus
}
#endif

#endif
