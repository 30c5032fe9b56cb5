/* Differential privacy in the server's rounds (tern_server_dp_options, docs/privacy.md).
 *
 * Client DP: FIT_INS carries the DP-SGD parameters (dp_* config keys), each FIT_RES must
 * report the steps and sample rate its DP-SGD used (dp_* metrics; an update without them is
 * rejected: the client did not train privately), and every accepted update charges its client
 * (noise multiplier, sample rate, steps) in the store's privacy ledger, in the round's commit
 * transaction. Before selection, each available client's ledger history plus its last charge
 * (the prediction of the next round's) is composed by an accountant; a client whose epsilon
 * would exceed the budget is left out.
 *
 * Central DP (DP-FedAvg): each available client is kept with probability q = expected / n
 * (Poisson sampling, from a stream of the seed and the training round), every accepted update's
 * change from the global model is clipped to S, the clipped changes are summed, Gaussian noise
 * N(0, (sigma S)^2) is added to every coordinate and the sum is divided by the expected number
 * of clients; the global model moves by that. The server's account is the ledger subject
 * "central", one step (sigma, q) per committed round. A round in which nobody was sampled still
 * releases its noise: skipping it would make "nobody sampled" distinguishable from "only the
 * differing client sampled".
 *
 * The noise comes from the round's own xoshiro256** stream (tern_rng_normal) seeded from
 * (dp.seed, training round), so a repeated round draws the same sample and the same noise. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fl/server_internal.h"
#include "nn/util.h"

struct srv_dp {
    tern_server_dp_options o;   /* resolved */
    size_t min_available;       /* the strategy's minimum of available clients, enforced here
                                   before clients are left out */
    double fraction_fit;        /* central: to size expected_clients when it is 0 */
    size_t min_fit;
    /* The open round. */
    double q;                   /* central: client sampling rate */
    size_t population;          /* central: available clients the sample was drawn from */
    double *sum;                /* central: (num_params) sum of clipped changes */
    float *next;                /* central: (num_params) the new global vector */
    size_t clipped;             /* central: updates scaled down this round */
    tern_privacy_charge *charges; /* client: (num_parts) the charge of each participant */
    bool *charged;              /* client: (num_parts) a valid charge was reported */
    uint64_t logged_round;      /* client: exclusions were logged for this training round */
};

static const char *const mode_names[] = {"none", "client", "central"};

const char *tern_fl_dp_mode_name(tern_fl_dp_mode mode)
{
    return (unsigned)mode < 3 ? mode_names[mode] : "?";
}

tern_status tern_fl_dp_mode_parse(const char *name, tern_fl_dp_mode *out)
{
    for (int i = 0; name && i < 3; i++)
        if (strcmp(name, mode_names[i]) == 0) {
            *out = (tern_fl_dp_mode)i;
            return TERN_OK;
        }
    return TERN_ERR_INVALID;
}

bool srv_dp_on(const tern_server *s)
{
    return s->dp && s->dp->o.mode != TERN_FL_DP_NONE;
}

bool srv_dp_central(const tern_server *s)
{
    return s->dp && s->dp->o.mode == TERN_FL_DP_CENTRAL;
}

tern_status srv_dp_create(tern_server *s, tern_error *err)
{
    tern_server_dp_options o = s->opt.dp;
    if (o.mode == TERN_FL_DP_NONE)
        return TERN_OK;
    if ((unsigned)o.mode > TERN_FL_DP_CENTRAL)
        return tern_set_error(err, TERN_ERR_INVALID, "dp: unknown mode %d", (int)o.mode);
    if (o.delta == 0)
        o.delta = 1e-5;
    if (o.max_grad_norm == 0)
        o.max_grad_norm = 1.0;
    if (o.clip_norm == 0)
        o.clip_norm = 1.0;
    if (!(o.delta > 0 && o.delta < 1))
        return tern_set_error(err, TERN_ERR_INVALID, "dp: delta %g is outside (0, 1)", o.delta);
    if (!(o.max_grad_norm > 0) || !isfinite(o.max_grad_norm) || !(o.clip_norm > 0) ||
        !isfinite(o.clip_norm))
        return tern_set_error(err, TERN_ERR_INVALID, "dp: clipping norms must be > 0");
    if (!(o.noise_multiplier >= 0) || !isfinite(o.noise_multiplier) ||
        !(o.target_epsilon >= 0) || !isfinite(o.target_epsilon) ||
        !(o.epsilon_budget >= 0) || !isfinite(o.epsilon_budget) ||
        !(o.expected_clients >= 0) || !isfinite(o.expected_clients))
        return tern_set_error(err, TERN_ERR_INVALID, "dp: noise multiplier, target epsilon, "
                              "budget and expected clients must be finite and >= 0");
    if (o.accountant != TERN_ACCOUNTANT_RDP && o.accountant != TERN_ACCOUNTANT_PRV)
        return tern_set_error(err, TERN_ERR_INVALID, "dp: unknown accountant %d",
                              (int)o.accountant);
    if (o.mode == TERN_FL_DP_CLIENT && (o.noise_multiplier > 0) == (o.target_epsilon > 0))
        return tern_set_error(err, TERN_ERR_INVALID, "dp client: give one of noise_multiplier "
                              "and target_epsilon");
    if (o.mode == TERN_FL_DP_CENTRAL) {
        if (!(o.noise_multiplier > 0))
            return tern_set_error(err, TERN_ERR_INVALID, "dp central: noise_multiplier must be "
                                  "> 0 (target_epsilon applies to client DP)");
        if (o.target_epsilon > 0 || o.epsilon_budget > 0)
            return tern_set_error(err, TERN_ERR_INVALID, "dp central: target_epsilon and "
                                  "epsilon_budget apply to client DP");
        if (s->opt.strategy.kind != TERN_STRATEGY_FEDAVG)
            return tern_set_error(err, TERN_ERR_INVALID, "dp central: needs strategy fedavg "
                                  "(the noised mean replaces the strategy's rule)");
        if (o.expected_clients > 0 && o.expected_clients < 1)
            return tern_set_error(err, TERN_ERR_INVALID, "dp central: expected_clients %g is "
                                  "below 1", o.expected_clients);
    }
    if (s->num_bn > 0 && !(o.mode == TERN_FL_DP_CENTRAL && s->opt.fedbn))
        return tern_set_error(err, TERN_ERR_INVALID, "dp %s: the model has BatchNorm, whose "
                              "statistics mix samples%s; build it with GroupNorm (--norm group)",
                              tern_fl_dp_mode_name(o.mode),
                              o.mode == TERN_FL_DP_CENTRAL ? " and are averaged without noise"
                                                           : "");
    srv_dp *d = calloc(1, sizeof *d);
    if (!d)
        return tern_set_error(err, TERN_ERR_NOMEM, "dp: out of memory");
    d->o = o;
    s->dp = d;
    /* The strategy's minimum of available clients counts the clients present, before the
     * budget or the Poisson sample leaves some out: it is enforced here, and the strategy
     * sees the candidates only. */
    d->min_available = s->opt.strategy.min_available_clients;
    d->fraction_fit = s->opt.strategy.fraction_fit;
    d->min_fit = s->opt.strategy.min_fit_clients;
    s->opt.strategy.min_available_clients = s->opt.strategy.min_fit_clients;
    if (o.mode == TERN_FL_DP_CENTRAL) {
        /* The strategy takes whoever the Poisson sample holds. */
        s->opt.strategy.fraction_fit = 1.0;
        s->opt.strategy.min_fit_clients = 1;
        s->opt.strategy.min_available_clients = 1;
        d->sum = malloc(s->num_params * sizeof *d->sum);
        d->next = malloc(s->num_params * sizeof *d->next);
        if (!d->sum || !d->next)
            return tern_set_error(err, TERN_ERR_NOMEM, "dp central: out of memory for %zu "
                                  "parameters", s->num_params);
    }
    return TERN_OK;
}

void srv_dp_destroy(tern_server *s)
{
    if (!s->dp)
        return;
    free(s->dp->sum);
    free(s->dp->next);
    free(s->dp->charges);
    free(s->dp->charged);
    free(s->dp);
    s->dp = NULL;
}

/* ---- accounting ------------------------------------------------------------------------------ */

/* Epsilon of subject's ledger history plus `extra` (may be NULL), plus with add_last the
 * subject's last charge again (the prediction of its next round). */
static tern_status spent(tern_server *s, const char *subject, const tern_privacy_charge *extra,
                         bool add_last, double *epsilon, tern_error *err)
{
    tern_privacy_charge *h = NULL;
    size_t n = 0;
    tern_accountant *a = NULL;
    tern_privacy_account acc;
    tern_status st = tern_store_privacy_history(s->store, subject, &h, &n, &acc, err);
    if (st != TERN_OK)
        return st;
    if (add_last && acc.rounds > 0)
        extra = &acc.last;
    tern_accountant_options ao = {.kind = s->dp->o.accountant};
    st = tern_accountant_create(&ao, &a, err);
    for (size_t i = 0; st == TERN_OK && i < n; i++)
        st = tern_accountant_add(a, h[i].noise_multiplier, h[i].sample_rate, h[i].steps);
    if (st == TERN_OK && extra)
        st = tern_accountant_add(a, extra->noise_multiplier, extra->sample_rate, extra->steps);
    if (st == TERN_OK && (st = tern_accountant_epsilon(a, s->dp->o.delta, epsilon)) != TERN_OK)
        tern_set_error(err, st, "privacy ledger of %s: %s", subject,
                       tern_accountant_last_error(a));
    else if (st != TERN_OK)
        tern_set_error(err, st, "privacy ledger of %s: cannot compose its history", subject);
    tern_accountant_destroy(&a);
    tern_store_free(s->store, h);
    return st;
}

/* ---- selection ------------------------------------------------------------------------------- */

static size_t select_client(tern_server *s, size_t n, uint64_t t)
{
    srv_dp *d = s->dp;
    size_t k = 0;
    if (n < d->min_available)
        return 0;
    bool log = d->logged_round != t; /* WAIT retries every loop turn: log once a round */
    d->logged_round = t;
    for (size_t i = 0; i < n; i++) {
        srv_session *ss = s->avail[i];
        bool keep = true;
        if (d->o.epsilon_budget > 0) {
            double eps = 0;
            tern_error e = {{0}};
            tern_status st = spent(s, ss->client_id, NULL, true, &eps, &e);
            if (st != TERN_OK) {
                if (log)
                    srv_log(s, TERN_LOG_WARN, "client %s not selected: %s", ss->name, e.message);
                keep = false;
            } else if (eps > d->o.epsilon_budget) {
                if (log)
                    srv_log(s, TERN_LOG_INFO, "client %s not selected: its next round would "
                            "spend epsilon %.4g, over the budget %.4g", ss->name, eps,
                            d->o.epsilon_budget);
                keep = false;
            }
        }
        if (keep) {
            s->avail[k] = ss;
            s->avail_ids[k++] = s->avail_ids[i];
        }
    }
    if (k < n && k < d->min_fit) {
        /* Too few of the clients present can train again: a run would wait forever. */
        s->finished = true;
        srv_log(s, TERN_LOG_INFO, "privacy budget spent: %zu of the %zu available clients can "
                "take another round within epsilon %.4g, %zu needed", k, n,
                d->o.epsilon_budget, d->min_fit);
    }
    return k;
}

/* Uniform in [0, 1) from a 64-bit hash. */
static double unit(uint64_t x)
{
    return (double)(x >> 11) * (1.0 / 9007199254740992.0);
}

static size_t select_central(tern_server *s, size_t n, uint64_t t, bool *wait)
{
    srv_dp *d = s->dp;
    if (n < d->min_available) {
        *wait = true;
        return n;
    }
    if (d->o.expected_clients == 0) {
        /* Fixed at the first DP round, so that q changes only with the population. */
        double m = floor(d->fraction_fit * (double)n);
        if (m < (double)d->min_fit)
            m = (double)d->min_fit;
        d->o.expected_clients = m < 1 ? 1 : m;
    }
    double m = d->o.expected_clients;
    if (m > (double)n) {
        *wait = true; /* q would exceed 1: wait for more clients */
        return n;
    }
    d->population = n;
    d->q = m / (double)n;
    uint64_t base = srv_mix64(d->o.seed ^ srv_mix64(t ^ 0x706f6973736f6eull));
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        /* Keyed by the client's stable id, so the sample does not depend on the order. */
        if (unit(srv_mix64(base ^ s->avail_ids[i])) < d->q) {
            s->avail[k] = s->avail[i];
            s->avail_ids[k++] = s->avail_ids[i];
        }
    }
    return k;
}

size_t srv_dp_select(tern_server *s, size_t n, uint64_t t, bool *wait)
{
    *wait = false;
    if (!srv_dp_on(s))
        return n;
    if (srv_dp_central(s))
        return select_central(s, n, t, wait);
    size_t k = select_client(s, n, t);
    *wait = k == 0;
    return k;
}

tern_status srv_dp_round_begin(tern_server *s, tern_error *err)
{
    srv_dp *d = s->dp;
    if (!srv_dp_on(s))
        return TERN_OK;
    free(d->charges);
    free(d->charged);
    size_t k = s->num_parts ? s->num_parts : 1;
    d->charges = calloc(k, sizeof *d->charges);
    d->charged = calloc(k, sizeof *d->charged);
    if (!d->charges || !d->charged)
        return tern_set_error(err, TERN_ERR_NOMEM, "dp: out of memory for %zu charges", k);
    if (d->sum)
        memset(d->sum, 0, s->num_params * sizeof *d->sum);
    d->clipped = 0;
    return TERN_OK;
}

/* ---- FIT_INS and FIT_RES --------------------------------------------------------------------- */

bool srv_dp_fit_config(tern_server *s, tern_msg_config *c)
{
    if (!s->dp || s->dp->o.mode != TERN_FL_DP_CLIENT)
        return true;
    const tern_server_dp_options *o = &s->dp->o;
    bool ok = tern_config_set_string(c, "dp", "client") == TERN_OK &&
              tern_config_set_float(c, "dp_max_grad_norm", o->max_grad_norm) == TERN_OK &&
              tern_config_set_float(c, "dp_delta", o->delta) == TERN_OK &&
              tern_config_set_string(c, "dp_accountant",
                                     tern_accountant_kind_name(o->accountant)) == TERN_OK;
    if (ok && o->noise_multiplier > 0)
        ok = tern_config_set_float(c, "dp_noise_multiplier", o->noise_multiplier) == TERN_OK;
    if (ok && o->target_epsilon > 0)
        ok = tern_config_set_float(c, "dp_target_epsilon", o->target_epsilon) == TERN_OK &&
             tern_config_set_int(c, "dp_rounds", (int64_t)s->opt.rounds) == TERN_OK;
    return ok;
}

bool srv_dp_check_result(tern_server *s, size_t part, const tern_msg_metrics *m, char *why,
                         size_t len)
{
    srv_dp *d = s->dp;
    if (!d || d->o.mode != TERN_FL_DP_CLIENT)
        return true;
    double steps, q, sigma;
    if (tern_metrics_get(m, "dp_steps", &steps) != TERN_OK ||
        tern_metrics_get(m, "dp_sample_rate", &q) != TERN_OK ||
        tern_metrics_get(m, "dp_noise_multiplier", &sigma) != TERN_OK) {
        snprintf(why, len, "client DP: the result lacks dp_steps, dp_sample_rate or "
                 "dp_noise_multiplier (the client did not train with DP-SGD)");
        return false;
    }
    if (!(steps >= 0 && steps <= 1e12 && steps == floor(steps)) || !(q > 0 && q <= 1) ||
        !(sigma > 0) || !isfinite(sigma)) {
        snprintf(why, len, "client DP: dp_steps %g, dp_sample_rate %g, dp_noise_multiplier %g "
                 "out of range", steps, q, sigma);
        return false;
    }
    if (d->o.noise_multiplier > 0 && sigma != d->o.noise_multiplier) {
        snprintf(why, len, "client DP: trained with noise multiplier %g, %g was asked", sigma,
                 d->o.noise_multiplier);
        return false;
    }
    tern_privacy_charge *c = &d->charges[part];
    snprintf(c->subject, sizeof c->subject, "%s", s->parts[part].client_id);
    c->noise_multiplier = sigma;
    c->sample_rate = q;
    c->steps = (int64_t)steps;
    d->charged[part] = true;
    return true;
}

double srv_dp_clip_add(double *sum, const float *update, const float *global, size_t n,
                       double clip)
{
    double sq = 0;
    for (size_t i = 0; i < n; i++) {
        double x = (double)update[i] - (double)global[i];
        sq += x * x;
    }
    double norm = sqrt(sq);
    double f = norm > clip ? clip / norm : 1.0;
    for (size_t i = 0; i < n; i++)
        sum[i] += f * ((double)update[i] - (double)global[i]);
    return f;
}

void srv_dp_accepted(tern_server *s, const float *update)
{
    srv_dp *d = s->dp;
    if (!srv_dp_central(s))
        return;
    /* The model still holds the round's global parameters (written at aggregation). */
    double f = srv_dp_clip_add(d->sum, update, tern_model_params(s->model), s->num_params,
                               d->o.clip_norm);
    d->clipped += f < 1.0;
}

/* ---- aggregation and commit ------------------------------------------------------------------ */

tern_status srv_dp_noised_mean(float *next, const float *global, const double *sum, size_t n,
                               double noise_std, double divisor, tern_rng *rng)
{
    if (!next || !global || !sum || !rng || !(divisor > 0) || !(noise_std >= 0))
        return TERN_ERR_INVALID;
    for (size_t i = 0; i < n; i++)
        next[i] = (float)((double)global[i] + (sum[i] + noise_std * tern_rng_normal(rng)) /
                                                  divisor);
    return TERN_OK;
}

tern_status srv_dp_aggregate(tern_server *s, tern_error *err)
{
    srv_dp *d = s->dp;
    tern_rng rng;
    tern_rng_seed(&rng, srv_mix64(d->o.seed ^ srv_mix64(s->report.training_round ^
                                                        0x6e6f697365ull)));
    srv_dp_noised_mean(d->next, tern_model_params(s->model), d->sum, s->num_params,
                       d->o.noise_multiplier * d->o.clip_norm, d->o.expected_clients, &rng);
    if (tern_strategy_set_global(s->strategy, d->next) != TERN_OK)
        return tern_set_error(err, TERN_ERR_INVALID, "dp central: the noised model: %s",
                              tern_strategy_last_error(s->strategy));
    srv_log(s, TERN_LOG_INFO, "round %llu: central DP: %zu of %zu clients sampled (q %.4g), %zu "
            "updates clipped to %g, noise std %g / %g", (unsigned long long)
            s->report.training_round, s->num_parts, d->population, d->q, d->clipped,
            d->o.clip_norm, d->o.noise_multiplier * d->o.clip_norm, d->o.expected_clients);
    return TERN_OK;
}

tern_status srv_dp_commit_charges(tern_server *s, const tern_privacy_charge **charges,
                                  size_t *count, tern_error *err)
{
    srv_dp *d = s->dp;
    *charges = NULL;
    *count = 0;
    s->report.epsilon = NAN;
    if (!srv_dp_on(s))
        return TERN_OK;
    double worst = 0;
    if (d->o.mode == TERN_FL_DP_CENTRAL) {
        tern_privacy_charge *c = &d->charges[0]; /* room for one always */
        memset(c, 0, sizeof *c);
        snprintf(c->subject, sizeof c->subject, "%s", TERN_PRIVACY_CENTRAL);
        c->noise_multiplier = d->o.noise_multiplier;
        c->sample_rate = d->q;
        c->steps = 1;
        tern_status st = spent(s, TERN_PRIVACY_CENTRAL, c, false, &worst, err);
        if (st != TERN_OK)
            return st;
        *charges = c;
        *count = 1;
    } else {
        /* Pack the charges of the accepted updates to the front. */
        size_t k = 0;
        for (size_t i = 0; i < s->num_parts; i++) {
            if (!d->charged[i] || s->parts[i].state != PART_OK)
                continue;
            d->charges[k] = d->charges[i];
            d->charged[k] = true;
            double eps;
            tern_status st = spent(s, d->charges[k].subject, &d->charges[k], false, &eps, err);
            if (st != TERN_OK)
                return st;
            if (eps > worst)
                worst = eps;
            k++;
        }
        for (size_t i = k; i < s->num_parts; i++)
            d->charged[i] = false;
        *charges = d->charges;
        *count = k;
    }
    s->report.epsilon = worst;
    return TERN_OK;
}

void srv_dp_round_failed(tern_server *s)
{
    srv_dp *d = s->dp;
    if (!d || d->o.mode != TERN_FL_DP_CLIENT || !d->charges)
        return;
    /* The server has seen these updates: their clients spent privacy even though the round
     * failed. */
    size_t k = 0;
    for (size_t i = 0; i < s->num_parts; i++)
        if (d->charged[i] && s->parts[i].state == PART_OK)
            d->charges[k++] = d->charges[i];
    tern_error e = {{0}};
    if (k && tern_store_privacy_charge(s->store, s->store_round, d->charges, k, &e) != TERN_OK)
        srv_log(s, TERN_LOG_ERROR, "round %llu failed and its privacy charges could not be "
                "recorded: %s", (unsigned long long)s->report.training_round, e.message);
    memset(d->charged, 0, s->num_parts * sizeof *d->charged);
}
