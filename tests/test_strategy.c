/* Aggregation strategy tests (include/tern/strategy.h).
 *
 * Every strategy against values worked out by hand on 3-5 clients x 5 parameters; FedAvgM,
 * FedAdagrad, FedAdam and FedYogi over three rounds against a double-precision re-implementation
 * of Flower's update rules written here; median and trimmed mean with odd and even counts; Krum
 * and Multi-Krum with an adversarial client; selection (fraction, minimum counts, seeds, order
 * of the available list); validation (NaN, infinity, wrong length, norm bound, unselected and
 * duplicate clients) leaving the aggregate bitwise unchanged; arrival-order independence,
 * bitwise, for every strategy; the SIMD kernels bitwise against the scalar ones; evaluation and metric means; allocation failure at every
 * allocation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tern.h"
#include "testutil.h"

#define N 5

static const tern_strategy_kind ALL_KINDS[] = {
    TERN_STRATEGY_FEDAVG,     TERN_STRATEGY_FEDPROX,   TERN_STRATEGY_FEDAVGM,
    TERN_STRATEGY_FEDADAGRAD, TERN_STRATEGY_FEDADAM,   TERN_STRATEGY_FEDYOGI,
    TERN_STRATEGY_FEDMEDIAN,  TERN_STRATEGY_FEDTRIMMEDAVG, TERN_STRATEGY_KRUM,
};
#define NKINDS (sizeof ALL_KINDS / sizeof *ALL_KINDS)

/* ---- helpers ------------------------------------------------------------------------------- */

static tern_strategy *make(const tern_strategy_options *o, const float *initial)
{
    tern_strategy *s = NULL;
    tern_error err = {{0}};
    tern_status st = tern_strategy_create(o, initial, &s, &err);
    if (st != TERN_OK)
        fail_msg("tern_strategy_create: %s", err.message);
    return s;
}

static tern_strategy_options opts(tern_strategy_kind kind, size_t n)
{
    tern_strategy_options o = tern_strategy_options_default(kind);
    o.num_params = n;
    o.min_fit_clients = 1;
    o.min_available_clients = 1;
    o.min_evaluate_clients = 1;
    return o;
}

/* Open fit round `round` selecting every one of ids[0..k) (fraction 1). */
static void open_all(tern_strategy *s, uint64_t round, const uint64_t *ids, size_t k)
{
    uint64_t sel[64];
    size_t ns = 0;
    assert_true(k <= 64);
    tern_status st = tern_strategy_configure_fit(s, round, ids, k, sel, &ns);
    if (st != TERN_OK)
        fail_msg("configure_fit: %s", tern_strategy_last_error(s));
    assert_int_equal(ns, k);
}

static void add(tern_strategy *s, uint64_t id, const float *u, size_t n, uint64_t examples)
{
    tern_fit_result r = {.client_id = id, .update = u, .num_params = n, .num_examples = examples};
    tern_status st = tern_strategy_add_fit_result(s, &r);
    if (st != TERN_OK)
        fail_msg("add_fit_result(%llu): %s", (unsigned long long)id, tern_strategy_last_error(s));
}

static void aggregate(tern_strategy *s)
{
    if (tern_strategy_aggregate_fit(s, NULL) != TERN_OK)
        fail_msg("aggregate_fit: %s", tern_strategy_last_error(s));
}

/* One round: every client of ids[0..k) sends rows[i] (n floats) with examples[i]. */
static void round_all(tern_strategy *s, uint64_t round, const uint64_t *ids, size_t k,
                      const float *rows, size_t n, const uint64_t *examples)
{
    open_all(s, round, ids, k);
    for (size_t i = 0; i < k; i++)
        add(s, ids[i], rows + i * n, n, examples[i]);
    aggregate(s);
}

static void expect_global(const tern_strategy *s, const float *want, size_t n, float tol)
{
    if (!test_close("global", tern_strategy_global(s), want, n, tol, 1.0f))
        fail();
}

/* Three clients, five parameters: sum(n_i u_i) / 6 = {1.5, 2, 0.5, 1, 0.25} exactly. */
static const uint64_t IDS3[3] = {7, 3, 11};
static const uint64_t EX3[3] = {1, 2, 3};
static const float U3[3][N] = {{0, 6, -6, 1, 2}, {3, 0, 3, 1, -1}, {1, 2, 1, 1, 0.5f}};
static const float AVG3[N] = {1.5f, 2, 0.5f, 1, 0.25f};

/* ---- names and options --------------------------------------------------------------------- */

static void test_kind_names(void **state)
{
    (void)state;
    for (size_t i = 0; i < NKINDS; i++) {
        tern_strategy_kind k;
        assert_int_equal(tern_strategy_kind_parse(tern_strategy_kind_name(ALL_KINDS[i]), &k),
                         TERN_OK);
        assert_int_equal(k, ALL_KINDS[i]);
    }
    tern_strategy_kind k;
    assert_int_equal(tern_strategy_kind_parse("fedsgd", &k), TERN_ERR_INVALID);
    tern_strategy_options o = tern_strategy_options_default(TERN_STRATEGY_FEDADAM);
    assert_true(o.eta == 1e-1f && o.eta_l == 1e-1f && o.beta_1 == 0.9f && o.beta_2 == 0.99f &&
                o.tau == 1e-9f);
    assert_true(tern_strategy_options_default(TERN_STRATEGY_FEDADAGRAD).beta_1 == 0.0f);
    assert_true(o.fraction_fit == 1.0 && o.min_fit_clients == 2 && o.min_available_clients == 2);
}

static void test_options_invalid(void **state)
{
    (void)state;
    float g[N] = {0};
    tern_strategy_options bad[8];
    bad[0] = opts(TERN_STRATEGY_FEDAVG, 0);
    bad[1] = opts(TERN_STRATEGY_FEDAVG, N), bad[1].fraction_fit = 0.0;
    bad[2] = opts(TERN_STRATEGY_FEDAVG, N), bad[2].max_update_norm = -1.0;
    bad[3] = opts(TERN_STRATEGY_FEDAVGM, N), bad[3].server_momentum = 1.0f;
    bad[4] = opts(TERN_STRATEGY_FEDADAM, N), bad[4].tau = 0.0f;
    bad[5] = opts(TERN_STRATEGY_FEDYOGI, N), bad[5].beta_2 = 1.0f;
    bad[6] = opts(TERN_STRATEGY_FEDTRIMMEDAVG, N), bad[6].trim_beta = 0.5f;
    bad[7] = opts(TERN_STRATEGY_FEDAVG, N), bad[7].min_fit_clients = 0;
    for (size_t i = 0; i < 8; i++) {
        tern_strategy *s = NULL;
        tern_error err = {{0}};
        assert_int_equal(tern_strategy_create(&bad[i], g, &s, &err), TERN_ERR_INVALID);
        assert_null(s);
        assert_true(err.message[0] != '\0');
    }
    tern_strategy_options o = opts(TERN_STRATEGY_FEDAVG, N);
    float nan_g[N] = {0, 0, NAN, 0, 0};
    tern_strategy *s = NULL;
    assert_int_equal(tern_strategy_create(&o, nan_g, &s, NULL), TERN_ERR_INVALID);
    assert_int_equal(tern_strategy_create(&o, NULL, &s, NULL), TERN_ERR_INVALID);
    assert_null(s);
}

/* ---- averaging strategies by hand ----------------------------------------------------------- */

static void test_fedavg_hand(void **state)
{
    (void)state;
    float g[N] = {1, 1, 1, 1, 1};
    tern_strategy_kind kinds[2] = {TERN_STRATEGY_FEDAVG, TERN_STRATEGY_FEDPROX};
    for (int k = 0; k < 2; k++) {
        /* Full weights: the weighted mean itself. */
        tern_strategy_options o = opts(kinds[k], N);
        tern_strategy *s = make(&o, g);
        round_all(s, 1, IDS3, 3, &U3[0][0], N, EX3);
        assert_memory_equal(tern_strategy_global(s), AVG3, sizeof AVG3);
        assert_int_equal(tern_strategy_rounds(s), 1);
        tern_strategy_destroy(&s);
        assert_null(s);

        /* Deltas: global + weighted mean delta. */
        o.update = TERN_UPDATE_DELTA;
        s = make(&o, g);
        round_all(s, 1, IDS3, 3, &U3[0][0], N, EX3);
        float want[N];
        for (int i = 0; i < N; i++)
            want[i] = 1.0f + AVG3[i];
        assert_memory_equal(tern_strategy_global(s), want, sizeof want);
        tern_strategy_destroy(&s);
    }
}

static void test_fedprox_proximal(void **state)
{
    (void)state;
    float grads[N] = {1, -1, 0, 2, 0.5f};
    const float params[N] = {1, 2, 3, 4, 5};
    const float global[N] = {0, 2, 4, 4, 6};
    tern_fedprox_add_proximal(grads, params, global, N, 0.5f);
    const float want[N] = {1.5f, -1, -0.5f, 2, 0};
    assert_memory_equal(grads, want, sizeof want);
}

static void test_fedavgm_hand(void **state)
{
    (void)state;
    /* g = 0, avg = AVG3 each round. lr 1, momentum 0.5:
     * round 1: d = -avg, mom = d, w = avg; round 2: d = w - avg = 0, mom = 0.5 mom = -avg/2,
     * w = avg + avg/2 = 1.5 avg. */
    float g[N] = {0};
    tern_strategy_options o = opts(TERN_STRATEGY_FEDAVGM, N);
    o.server_momentum = 0.5f;
    tern_strategy *s = make(&o, g);
    assert_int_equal(tern_strategy_state_count(s), 1);
    const char *name;
    assert_int_equal(tern_strategy_state_at(s, 0, &name, NULL), TERN_OK);
    assert_string_equal(name, "momentum");
    assert_int_equal(tern_strategy_state_at(s, 1, &name, NULL), TERN_ERR_INVALID);
    round_all(s, 1, IDS3, 3, &U3[0][0], N, EX3);
    assert_memory_equal(tern_strategy_global(s), AVG3, sizeof AVG3);
    round_all(s, 2, IDS3, 3, &U3[0][0], N, EX3);
    float want[N];
    for (int i = 0; i < N; i++)
        want[i] = 1.5f * AVG3[i];
    assert_memory_equal(tern_strategy_global(s), want, sizeof want);
    tern_strategy_destroy(&s);

    /* Without momentum and lr 1 it is FedAvg; with lr 0.5, w = g + 0.5 (avg - g). */
    o.server_momentum = 0.0f;
    o.server_learning_rate = 0.5f;
    s = make(&o, g);
    assert_int_equal(tern_strategy_state_count(s), 0);
    round_all(s, 1, IDS3, 3, &U3[0][0], N, EX3);
    for (int i = 0; i < N; i++)
        want[i] = 0.5f * AVG3[i];
    assert_memory_equal(tern_strategy_global(s), want, sizeof want);
    tern_strategy_destroy(&s);
}

static void test_fedadam_first_round_hand(void **state)
{
    (void)state;
    /* Round 1 from m = v = 0: m = 0.1 d, v = 0.01 d^2, step = eta * 0.1 d / (0.1 |d| + tau)
     * = 0.1 sign(d) (tau negligible); d = 0 gives no step. */
    float g[N] = {1.5f, 1, 1, 1, 1};
    tern_strategy_options o = opts(TERN_STRATEGY_FEDADAM, N);
    tern_strategy *s = make(&o, g);
    round_all(s, 1, IDS3, 3, &U3[0][0], N, EX3);
    const float want[N] = {1.5f, 1.1f, 0.9f, 1.0f, 0.9f};
    expect_global(s, want, N, 1e-6f);
    const char *name;
    float *m;
    assert_int_equal(tern_strategy_state_at(s, 0, &name, &m), TERN_OK);
    assert_string_equal(name, "m_t");
    assert_true(fabsf(m[1] - 0.1f) < 1e-7f); /* 0.1 * (2 - 1) */
    tern_strategy_destroy(&s);

    /* FedAdagrad (beta_1 0): step = eta * d / (|d| + tau) = 0.1 sign(d). FedYogi round 1:
     * v = 0 - 0.01 d^2 * sign(-d^2) = 0.01 d^2, as Adam. */
    tern_strategy_kind kinds[2] = {TERN_STRATEGY_FEDADAGRAD, TERN_STRATEGY_FEDYOGI};
    for (int k = 0; k < 2; k++) {
        o = opts(kinds[k], N);
        s = make(&o, g);
        round_all(s, 1, IDS3, 3, &U3[0][0], N, EX3);
        expect_global(s, want, N, 1e-6f);
        tern_strategy_destroy(&s);
    }
}

/* Flower's FedOpt / FedAvgM rules in double, m and v starting at zero. */
typedef struct ref_opt {
    tern_strategy_kind kind;
    double w[16], m[16], v[16], mom[16];
    int rounds;
} ref_opt;

static void ref_step(ref_opt *r, const tern_strategy_options *o, const float *rows,
                     const uint64_t *ex, size_t k, size_t n, bool delta)
{
    double total = 0;
    for (size_t c = 0; c < k; c++)
        total += (double)ex[c];
    for (size_t i = 0; i < n; i++) {
        double avg = 0;
        for (size_t c = 0; c < k; c++)
            avg += (double)ex[c] * rows[c * n + i];
        avg /= total;
        if (delta)
            avg += r->w[i];
        if (r->kind == TERN_STRATEGY_FEDAVGM) {
            double pg = r->w[i] - avg;
            r->mom[i] = r->rounds == 0 ? pg : o->server_momentum * r->mom[i] + pg;
            r->w[i] -= o->server_learning_rate * r->mom[i];
            continue;
        }
        double d = avg - r->w[i], b1 = o->beta_1, b2 = o->beta_2;
        r->m[i] = b1 * r->m[i] + (1 - b1) * d;
        if (r->kind == TERN_STRATEGY_FEDADAGRAD)
            r->v[i] += d * d;
        else if (r->kind == TERN_STRATEGY_FEDADAM)
            r->v[i] = b2 * r->v[i] + (1 - b2) * d * d;
        else {
            double x = r->v[i] - d * d;
            r->v[i] -= (1 - b2) * d * d * (double)((x > 0) - (x < 0));
        }
        r->w[i] += o->eta * r->m[i] / (sqrt(r->v[i]) + o->tau);
    }
    r->rounds++;
}

static void test_server_optimizers_three_rounds(void **state)
{
    (void)state;
    const tern_strategy_kind kinds[4] = {TERN_STRATEGY_FEDAVGM, TERN_STRATEGY_FEDADAGRAD,
                                         TERN_STRATEGY_FEDADAM, TERN_STRATEGY_FEDYOGI};
    enum { n = 9, k = 3 };
    for (int mode = 0; mode < 2; mode++)
        for (int ki = 0; ki < 4; ki++) {
            test_rng rng = {1000 + (uint64_t)ki};
            float g[n];
            test_fill_uniform(&rng, g, n, -1, 1);
            tern_strategy_options o = opts(kinds[ki], n);
            o.update = mode ? TERN_UPDATE_DELTA : TERN_UPDATE_WEIGHTS;
            if (kinds[ki] == TERN_STRATEGY_FEDAVGM) {
                o.server_momentum = 0.9f;
                o.server_learning_rate = 0.7f;
            }
            tern_strategy *s = make(&o, g);
            ref_opt ref = {.kind = kinds[ki]};
            for (int i = 0; i < n; i++)
                ref.w[i] = g[i];
            const uint64_t ids[k] = {5, 1, 9};
            for (uint64_t round = 1; round <= 3; round++) {
                float rows[k * n];
                uint64_t ex[k];
                for (int c = 0; c < k; c++) {
                    ex[c] = (uint64_t)test_rng_int(&rng, 1, 100);
                    for (int i = 0; i < n; i++) {
                        float d = test_rng_uniform(&rng, -0.5f, 0.5f);
                        rows[c * n + i] = mode ? d : tern_strategy_global(s)[i] + d;
                    }
                }
                round_all(s, round, ids, k, rows, n, ex);
                ref_step(&ref, &o, rows, ex, k, n, mode == 1);
                float want[n];
                for (int i = 0; i < n; i++)
                    want[i] = (float)ref.w[i];
                char what[64];
                snprintf(what, sizeof what, "%s round %d mode %d",
                         tern_strategy_kind_name(kinds[ki]), (int)round, mode);
                if (!test_close(what, tern_strategy_global(s), want, n, 2e-6f, 1.0f))
                    fail();
            }
            tern_strategy_destroy(&s);
        }
}

/* ---- robust strategies by hand -------------------------------------------------------------- */

static void test_median_hand(void **state)
{
    (void)state;
    float g[N] = {0};
    tern_strategy_options o = opts(TERN_STRATEGY_FEDMEDIAN, N);
    tern_strategy *s = make(&o, g);
    /* Odd: per coordinate the middle of {0,3,1}, {6,0,2}, {-6,3,1}, {1,1,1}, {2,-1,0.5}. */
    round_all(s, 1, IDS3, 3, &U3[0][0], N, EX3);
    const float odd[N] = {1, 2, 1, 1, 0.5f};
    assert_memory_equal(tern_strategy_global(s), odd, sizeof odd);
    /* Even: a fourth client; mean of the two middle values, unweighted. */
    const uint64_t ids4[4] = {7, 3, 11, 2};
    const float u4[4][N] = {{0, 6, -6, 1, 2}, {3, 0, 3, 1, -1}, {1, 2, 1, 1, 0.5f},
                            {10, -3, 0, 2, 0}};
    const uint64_t ex4[4] = {1, 2, 3, 1000};
    round_all(s, 2, ids4, 4, &u4[0][0], N, ex4);
    const float even[N] = {2, 1, 0.5f, 1, 0.25f};
    assert_memory_equal(tern_strategy_global(s), even, sizeof even);
    tern_strategy_destroy(&s);

    /* Deltas: global + median delta. */
    float g1[N] = {1, 1, 1, 1, 1};
    o.update = TERN_UPDATE_DELTA;
    s = make(&o, g1);
    round_all(s, 1, IDS3, 3, &U3[0][0], N, EX3);
    float want[N];
    for (int i = 0; i < N; i++)
        want[i] = 1 + odd[i];
    assert_memory_equal(tern_strategy_global(s), want, sizeof want);
    tern_strategy_destroy(&s);
}

static void test_trimmed_mean_hand(void **state)
{
    (void)state;
    float g[N] = {0};
    const uint64_t ids5[5] = {1, 2, 3, 4, 5};
    const uint64_t ex5[5] = {1, 1, 1, 1, 1};
    /* Coordinate 0: {100, 1, 2, 3, -50}; beta 0.2 of 5 cuts 1 from each end: mean(1,2,3) = 2. */
    const float u5[5][N] = {{100, 0, 1, 5, 0}, {1, 0, 2, 5, 0}, {2, 0, 3, 5, 9},
                            {3, 0, 4, 5, 0}, {-50, 0, 5, 5, 0}};
    tern_strategy_options o = opts(TERN_STRATEGY_FEDTRIMMEDAVG, N);
    tern_strategy *s = make(&o, g);
    round_all(s, 1, ids5, 5, &u5[0][0], N, ex5);
    const float want5[N] = {2, 0, 3, 5, 0};
    assert_memory_equal(tern_strategy_global(s), want5, sizeof want5);
    /* Even count, 4 clients: floor(0.2 * 4) = 0 cut: the plain (unweighted) mean. */
    round_all(s, 2, ids5, 4, &u5[0][0], N, ex5);
    const float want4[N] = {26.5f, 0, 2.5f, 5, 2.25f};
    assert_memory_equal(tern_strategy_global(s), want4, sizeof want4);
    tern_strategy_destroy(&s);
    /* beta 0.25 of 4 cuts 1 each end: coordinate 0 {100,1,2,3} -> mean(2,3) = 2.5. */
    o.trim_beta = 0.25f;
    s = make(&o, g);
    round_all(s, 1, ids5, 4, &u5[0][0], N, ex5);
    const float want4b[N] = {2.5f, 0, 2.5f, 5, 0};
    assert_memory_equal(tern_strategy_global(s), want4b, sizeof want4b);
    tern_strategy_destroy(&s);
}

static void test_krum_adversary(void **state)
{
    (void)state;
    float g[N] = {0};
    /* Four honest clients around c = 1 and one attacker far away. With f = 1 each score sums
     * the 5 - 1 - 2 = 2 smallest squared distances: c scores 0.02, a, b, d 0.03, the attacker
     * about 2 * 5 * 99^2. Krum returns c exactly. */
    const uint64_t ids[5] = {40, 10, 20, 30, 50};
    const float u[5][N] = {
        {100, 100, 100, 100, 100},  /* 40: attacker */
        {1.1f, 1, 1, 1, 1},         /* 10: a */
        {1, 0.9f, 1, 1, 1},         /* 20: b */
        {1, 1, 1, 1, 1},            /* 30: c */
        {1, 1, 1.1f, 1, 1},         /* 50: d */
    };
    const uint64_t ex[5] = {1000, 1, 2, 3, 4};
    tern_strategy_options o = opts(TERN_STRATEGY_KRUM, N);
    o.num_malicious_clients = 1;
    tern_strategy *s = make(&o, g);
    round_all(s, 1, ids, 5, &u[0][0], N, ex);
    assert_memory_equal(tern_strategy_global(s), u[3], sizeof u[3]);
    tern_strategy_destroy(&s);

    /* Multi-Krum, m = 2: c (0.02) and the lowest id among the 0.03 ties, a (id 10):
     * (3 c + 1 a) / 4. The attacker never enters. */
    o.num_clients_to_keep = 2;
    s = make(&o, g);
    round_all(s, 1, ids, 5, &u[0][0], N, ex);
    const float want[N] = {(3 * 1.0f + 1.1f) / 4, 1, 1, 1, 1};
    expect_global(s, want, N, 1e-7f);
    tern_strategy_destroy(&s);

    /* Multi-Krum keeping 4 of 5 drops exactly the attacker: weighted mean of a, b, c, d. */
    o.num_clients_to_keep = 4;
    s = make(&o, g);
    round_all(s, 1, ids, 5, &u[0][0], N, ex);
    const float want4[N] = {(1.1f + 2 + 3 + 4) / 10, (1 + 2 * 0.9f + 3 + 4) / 10, (1 + 2 + 3 + 4 * 1.1f) / 10, 1, 1};
    expect_global(s, want4, N, 1e-6f);
    tern_strategy_destroy(&s);

    /* Deltas: global + the chosen delta. */
    float g1[N] = {2, 2, 2, 2, 2};
    o.num_clients_to_keep = 0;
    o.update = TERN_UPDATE_DELTA;
    s = make(&o, g1);
    round_all(s, 1, ids, 5, &u[0][0], N, ex);
    const float want_d[N] = {3, 3, 3, 3, 3};
    assert_memory_equal(tern_strategy_global(s), want_d, sizeof want_d);
    tern_strategy_destroy(&s);
}

/* ---- selection ------------------------------------------------------------------------------ */

static void test_selection(void **state)
{
    (void)state;
    float g[N] = {0};
    tern_strategy_options o = tern_strategy_options_default(TERN_STRATEGY_FEDAVG);
    o.num_params = N;
    o.fraction_fit = 0.5;
    o.min_fit_clients = 3;
    o.min_available_clients = 4;
    o.seed = 42;
    tern_strategy *s = make(&o, g);
    uint64_t avail[10], rev[10], sel[10], sel2[10];
    for (int i = 0; i < 10; i++) {
        avail[i] = 100 + (uint64_t)i * 7;
        rev[9 - i] = avail[i];
    }
    size_t ns = 0, ns2 = 0, size, min_av;
    tern_strategy_num_fit_clients(s, 10, &size, &min_av);
    assert_int_equal(size, 5);
    assert_int_equal(min_av, 4);
    tern_strategy_num_fit_clients(s, 4, &size, NULL);
    assert_int_equal(size, 3); /* floor(2) < min_fit_clients */

    assert_int_equal(tern_strategy_configure_fit(s, 1, avail, 10, sel, &ns), TERN_OK);
    assert_int_equal(ns, 5);
    for (size_t i = 0; i < ns; i++) {
        if (i)
            assert_true(sel[i] > sel[i - 1]); /* sorted, distinct */
        bool found = false;
        for (int j = 0; j < 10; j++)
            found |= sel[i] == avail[j];
        assert_true(found);
    }
    /* Same seed and round, available list in another order: the same clients. */
    tern_strategy *t = make(&o, g);
    assert_int_equal(tern_strategy_configure_fit(t, 1, rev, 10, sel2, &ns2), TERN_OK);
    assert_int_equal(ns2, ns);
    assert_memory_equal(sel, sel2, ns * sizeof *sel);
    /* Repeating round 1 later gives the same sample (a stream per round). */
    assert_int_equal(tern_strategy_configure_fit(s, 2, avail, 10, sel2, &ns2), TERN_OK);
    assert_int_equal(tern_strategy_configure_fit(s, 1, avail, 10, sel2, &ns2), TERN_OK);
    assert_memory_equal(sel, sel2, ns * sizeof *sel);
    tern_strategy_destroy(&t);

    /* Different seeds or rounds: different samples somewhere; every client picked sometimes. */
    int picked[10] = {0};
    bool differs = false;
    for (uint64_t r = 1; r <= 200; r++) {
        assert_int_equal(tern_strategy_configure_fit(s, r, avail, 10, sel2, &ns2), TERN_OK);
        differs |= memcmp(sel, sel2, ns * sizeof *sel) != 0;
        for (size_t i = 0; i < ns2; i++)
            picked[(sel2[i] - 100) / 7]++;
    }
    assert_true(differs);
    for (int i = 0; i < 10; i++)
        assert_true(picked[i] > 60 && picked[i] < 140); /* 100 expected */
    o.seed = 43;
    t = make(&o, g);
    differs = false;
    for (uint64_t r = 1; r <= 5; r++) {
        tern_strategy_configure_fit(s, r, avail, 10, sel, &ns);
        tern_strategy_configure_fit(t, r, avail, 10, sel2, &ns2);
        differs |= memcmp(sel, sel2, ns * sizeof *sel) != 0;
    }
    assert_true(differs);
    tern_strategy_destroy(&t);

    /* Too few available: STATE, and no round is open. */
    assert_int_equal(tern_strategy_configure_fit(s, 3, avail, 3, sel, &ns), TERN_ERR_STATE);
    assert_true(strstr(tern_strategy_last_error(s), "available") != NULL);
    float u[N] = {0};
    tern_fit_result r = {.client_id = avail[0], .update = u, .num_params = N, .num_examples = 1};
    assert_int_equal(tern_strategy_add_fit_result(s, &r), TERN_ERR_STATE);
    /* Duplicate ids, round 0. */
    uint64_t dup[5] = {1, 2, 3, 2, 5};
    assert_int_equal(tern_strategy_configure_fit(s, 3, dup, 5, sel, &ns), TERN_ERR_INVALID);
    assert_int_equal(tern_strategy_configure_fit(s, 0, avail, 10, sel, &ns), TERN_ERR_INVALID);
    /* fraction 1 selects everybody. */
    tern_strategy_destroy(&s);
    o.fraction_fit = 1.0;
    o.fraction_evaluate = 0.0;
    s = make(&o, g);
    assert_int_equal(tern_strategy_configure_fit(s, 1, avail, 10, sel, &ns), TERN_OK);
    assert_int_equal(ns, 10);
    /* fraction_evaluate 0: no evaluation. */
    assert_int_equal(tern_strategy_configure_evaluate(s, 1, avail, 10, sel, &ns), TERN_OK);
    assert_int_equal(ns, 0);
    tern_strategy_destroy(&s);
}

/* ---- validation ------------------------------------------------------------------------------ */

static void test_validation_rejects(void **state)
{
    (void)state;
    float g[N] = {1, 1, 1, 1, 1};
    for (size_t ki = 0; ki < NKINDS; ki++) {
        tern_strategy_options o = opts(ALL_KINDS[ki], N);
        o.max_update_norm = 20.0;
        o.num_clients_to_keep = ALL_KINDS[ki] == TERN_STRATEGY_KRUM ? 2 : 0;
        tern_strategy *s = make(&o, g);
        tern_strategy *ref = make(&o, g);
        const uint64_t ids[5] = {7, 3, 11, 20, 21};
        open_all(s, 1, ids, 5);
        open_all(ref, 1, ids, 5);

        float nan_u[N] = {1, 1, NAN, 1, 1}, inf_u[N] = {1, INFINITY, 1, 1, 1};
        float big[N] = {1, 1, 1, 1, 40}; /* change norm 39 > 20 */
        tern_fit_result r = {.client_id = 20, .update = nan_u, .num_params = N, .num_examples = 5};
        assert_int_equal(tern_strategy_add_fit_result(s, &r), TERN_ERR_INVALID);
        assert_true(strstr(tern_strategy_last_error(s), "not finite") != NULL);
        assert_int_equal(tern_strategy_add_fit_result(s, &r), TERN_ERR_EXISTS); /* done */
        r = (tern_fit_result){.client_id = 21, .update = inf_u, .num_params = N, .num_examples = 5};
        assert_int_equal(tern_strategy_add_fit_result(s, &r), TERN_ERR_INVALID);
        /* Wrong length, too large a norm, zero examples: from clients that then resend well. */
        open_all(s, 1, ids, 5);
        r = (tern_fit_result){.client_id = 7, .update = U3[0], .num_params = N - 1,
                              .num_examples = 1};
        assert_int_equal(tern_strategy_add_fit_result(s, &r), TERN_ERR_SHAPE);
        assert_true(strstr(tern_strategy_last_error(s), "values") != NULL);
        r = (tern_fit_result){.client_id = 3, .update = big, .num_params = N, .num_examples = 1};
        assert_int_equal(tern_strategy_add_fit_result(s, &r), TERN_ERR_INVALID);
        assert_true(strstr(tern_strategy_last_error(s), "norm") != NULL);
        r = (tern_fit_result){.client_id = 11, .update = U3[2], .num_params = N, .num_examples = 0};
        assert_int_equal(tern_strategy_add_fit_result(s, &r), TERN_ERR_INVALID);
        r = (tern_fit_result){.client_id = 99, .update = U3[2], .num_params = N, .num_examples = 1};
        assert_int_equal(tern_strategy_add_fit_result(s, &r), TERN_ERR_NOT_FOUND);
        /* The good results, into both strategies; a duplicate is refused. */
        open_all(s, 1, ids, 5);
        for (int c = 0; c < 3; c++) {
            add(s, IDS3[c], U3[c], N, EX3[c]);
            add(ref, IDS3[c], U3[c], N, EX3[c]);
        }
        r = (tern_fit_result){.client_id = 7, .update = U3[0], .num_params = N, .num_examples = 1};
        assert_int_equal(tern_strategy_add_fit_result(s, &r), TERN_ERR_EXISTS);
        r = (tern_fit_result){.client_id = 20, .update = big, .num_params = N, .num_examples = 9};
        assert_int_equal(tern_strategy_add_fit_result(s, &r), TERN_ERR_INVALID);
        tern_fit_summary sum;
        assert_int_equal(tern_strategy_aggregate_fit(s, &sum), TERN_OK);
        aggregate(ref);
        assert_int_equal(sum.num_results, 3);
        assert_int_equal(sum.num_failures, 1);
        assert_int_equal(sum.num_examples, 6);
        assert_memory_equal(tern_strategy_global(s), tern_strategy_global(ref), sizeof g);
        tern_strategy_destroy(&s);
        tern_strategy_destroy(&ref);
    }
}

static void test_clip_policy(void **state)
{
    (void)state;
    /* Deltas of norm 10 clipped to 5 are halved; FedAvg of the two clipped deltas. */
    float g[N] = {0};
    tern_strategy_options o = opts(TERN_STRATEGY_FEDAVG, N);
    o.update = TERN_UPDATE_DELTA;
    o.max_update_norm = 5.0;
    o.norm_policy = TERN_NORM_CLIP;
    const uint64_t ids[2] = {1, 2};
    const float u[2][N] = {{6, 8, 0, 0, 0}, {0, 0, 3, 4, 0}}; /* norms 10 and 5 */
    const uint64_t ex[2] = {1, 1};
    tern_strategy *s = make(&o, g);
    open_all(s, 1, ids, 2);
    add(s, 1, u[0], N, 1);
    add(s, 2, u[1], N, 1);
    tern_fit_summary sum;
    assert_int_equal(tern_strategy_aggregate_fit(s, &sum), TERN_OK);
    assert_int_equal(sum.num_clipped, 1);
    const float want[N] = {1.5f, 2, 1.5f, 2, 0};
    assert_memory_equal(tern_strategy_global(s), want, sizeof want);
    tern_strategy_destroy(&s);
    /* Weights mode clips the change w - g; the median sees the clipped vectors too. */
    float g1[N] = {1, 1, 1, 1, 1};
    o = opts(TERN_STRATEGY_FEDMEDIAN, N);
    o.max_update_norm = 5.0;
    o.norm_policy = TERN_NORM_CLIP;
    s = make(&o, g1);
    float w[2][N];
    for (int c = 0; c < 2; c++)
        for (int i = 0; i < N; i++)
            w[c][i] = 1 + u[c][i];
    round_all(s, 1, ids, 2, &w[0][0], N, ex);
    const float want_m[N] = {1 + 1.5f, 1 + 2, 1 + 1.5f, 1 + 2, 1}; /* mean of the middle two */
    assert_memory_equal(tern_strategy_global(s), want_m, sizeof want_m);
    tern_strategy_destroy(&s);
}

static void test_round_failures(void **state)
{
    (void)state;
    float g[N] = {1, 2, 3, 4, 5};
    tern_strategy_options o = opts(TERN_STRATEGY_FEDAVG, N);
    o.accept_failures = false;
    tern_strategy *s = make(&o, g);
    assert_int_equal(tern_strategy_aggregate_fit(s, NULL), TERN_ERR_STATE); /* no round */
    open_all(s, 1, IDS3, 3);
    assert_int_equal(tern_strategy_aggregate_fit(s, NULL), TERN_ERR_STATE); /* no result */
    assert_memory_equal(tern_strategy_global(s), g, sizeof g);
    open_all(s, 1, IDS3, 3);
    add(s, 7, U3[0], N, 1);
    assert_int_equal(tern_strategy_add_fit_failure(s, 3), TERN_OK);
    assert_int_equal(tern_strategy_add_fit_failure(s, 3), TERN_ERR_EXISTS);
    assert_int_equal(tern_strategy_add_fit_failure(s, 4), TERN_ERR_NOT_FOUND);
    assert_int_equal(tern_strategy_aggregate_fit(s, NULL), TERN_ERR_STATE);
    assert_true(strstr(tern_strategy_last_error(s), "accept_failures") != NULL);
    assert_memory_equal(tern_strategy_global(s), g, sizeof g);
    assert_int_equal(tern_strategy_rounds(s), 0);
    tern_strategy_destroy(&s);
}

/* ---- determinism ------------------------------------------------------------------------------ */

static void shuffle(size_t *p, size_t k, test_rng *rng)
{
    for (size_t i = k; i > 1; i--) {
        size_t j = (size_t)(test_rng_next(rng) % i);
        size_t t = p[i - 1];
        p[i - 1] = p[j];
        p[j] = t;
    }
}

static void test_arrival_order_bitwise(void **state)
{
    (void)state;
    enum { n = 1000, k = 9, rounds = 3, orders = 6 };
    float *rows = malloc(sizeof(float) * n * k);
    float *first = malloc(sizeof(float) * n);
    float g[n];
    assert_non_null(rows);
    assert_non_null(first);
    for (int mode = 0; mode < 2; mode++)
        for (size_t ki = 0; ki < NKINDS; ki++) {
            tern_strategy_options o = opts(ALL_KINDS[ki], n);
            o.update = mode ? TERN_UPDATE_DELTA : TERN_UPDATE_WEIGHTS;
            o.server_momentum = 0.9f;
            o.num_malicious_clients = 2;
            o.num_clients_to_keep = 3;
            test_rng data = {77};
            test_fill_uniform(&data, g, n, -1, 1);
            tern_strategy *ss[orders];
            for (int p = 0; p < orders; p++)
                ss[p] = make(&o, g);
            uint64_t ids[k];
            for (int c = 0; c < k; c++)
                ids[c] = 1000 - (uint64_t)c * 13;
            test_rng order_rng = {5};
            for (uint64_t round = 1; round <= rounds; round++) {
                uint64_t ex[k];
                for (int c = 0; c < k; c++) {
                    /* Wide magnitudes and example counts: where plain double sums would round
                     * differently by order. */
                    ex[c] = (uint64_t)test_rng_int(&data, 1, 100000);
                    float scale = powf(10.0f, (float)test_rng_int(&data, -4, 3));
                    for (int i = 0; i < n; i++)
                        rows[c * n + i] = scale * test_rng_uniform(&data, -1, 1);
                }
                for (int p = 0; p < orders; p++) {
                    size_t perm[k];
                    for (size_t c = 0; c < k; c++)
                        perm[c] = c;
                    if (p)
                        shuffle(perm, k, &order_rng);
                    open_all(ss[p], round, ids, k);
                    for (size_t c = 0; c < k; c++)
                        add(ss[p], ids[perm[c]], rows + perm[c] * n, n, ex[perm[c]]);
                    aggregate(ss[p]);
                }
                memcpy(first, tern_strategy_global(ss[0]), sizeof(float) * n);
                for (int p = 1; p < orders; p++)
                    if (memcmp(first, tern_strategy_global(ss[p]), sizeof(float) * n) != 0)
                        fail_msg("%s mode %d round %d: order %d differs",
                                 tern_strategy_kind_name(ALL_KINDS[ki]), mode, (int)round, p);
            }
            for (int p = 0; p < orders; p++)
                tern_strategy_destroy(&ss[p]);
        }
    free(rows);
    free(first);
}

/* The SIMD kernels (validation sums, exact accumulation) against the scalar reference, bitwise:
 * weights, deltas and clipped weights, lengths that leave tails, several rounds, and the norm
 * reported for each result; and deferred accumulation (several updates per pass) likewise. On a CPU without SIMD kernels both sides run the scalar code. */
static void test_simd_kernels_bitwise(void **state)
{
    (void)state;
    static const size_t lengths[] = {1, 7, 8, 9, 1000, 4099};
    enum { k = 5, rounds = 3 };
    for (size_t li = 0; li < sizeof lengths / sizeof *lengths; li++)
        for (int mode = 0; mode < 3; mode++) {
            const size_t n = lengths[li];
            float *g = malloc(sizeof(float) * n), *rows = malloc(sizeof(float) * n * k);
            assert_non_null(g);
            assert_non_null(rows);
            tern_strategy_options o = opts(TERN_STRATEGY_FEDAVG, n);
            o.update = mode == 1 ? TERN_UPDATE_DELTA : TERN_UPDATE_WEIGHTS;
            if (mode == 2) { /* clip every change to norm 0.5 (ACC_WEIGHTS_CLIP) */
                o.max_update_norm = 0.5;
                o.norm_policy = TERN_NORM_CLIP;
            }
            test_rng data = {(uint64_t)(31 + li * 3 + (size_t)mode)};
            test_fill_uniform(&data, g, n, -1, 1);
            o.isa = TERN_ISA_SCALAR;
            tern_strategy *ref = make(&o, g);
            o.isa = TERN_ISA_AUTO;
            tern_strategy *fast = make(&o, g);
            tern_strategy *later = make(&o, g); /* add_fit_result_deferred, flushed now and then */
            uint64_t ids[k];
            for (int c = 0; c < k; c++)
                ids[c] = 10 + (uint64_t)c;
            for (uint64_t round = 1; round <= rounds; round++) {
                uint64_t ex[k];
                for (int c = 0; c < k; c++) {
                    ex[c] = (uint64_t)test_rng_int(&data, 1, 100000);
                    float scale = powf(10.0f, (float)test_rng_int(&data, -4, 2));
                    for (size_t i = 0; i < n; i++)
                        rows[c * n + i] = scale * test_rng_uniform(&data, -1, 1);
                }
                open_all(ref, round, ids, k);
                open_all(fast, round, ids, k);
                open_all(later, round, ids, k);
                for (int c = 0; c < k; c++) {
                    add(ref, ids[c], rows + c * n, n, ex[c]);
                    add(fast, ids[c], rows + c * n, n, ex[c]);
                    tern_fit_result fr = {.client_id = ids[c], .update = rows + c * n,
                                          .num_params = n, .num_examples = ex[c]};
                    if (tern_strategy_add_fit_result_deferred(later, &fr) != TERN_OK)
                        fail_msg("deferred: %s", tern_strategy_last_error(later));
                    assert_int_equal(tern_strategy_pending(later), (size_t)(c % 3) + 1);
                    if (c % 3 == 2)
                        tern_strategy_flush(later);
                    double a = tern_strategy_last_update_norm(ref);
                    double b = tern_strategy_last_update_norm(fast);
                    if (memcmp(&a, &b, sizeof a) != 0)
                        fail_msg("n %zu mode %d round %d client %d: norm %.17g vs %.17g", n, mode,
                                 (int)round, c, a, b);
                }
                aggregate(ref);
                aggregate(fast);
                aggregate(later);
                assert_int_equal(tern_strategy_pending(later), 0);
                if (memcmp(tern_strategy_global(ref), tern_strategy_global(fast),
                           sizeof(float) * n) != 0)
                    fail_msg("n %zu mode %d round %d: %s kernels differ from scalar", n, mode,
                             (int)round, tern_isa_name(tern_isa_resolve(TERN_ISA_AUTO)));
                if (memcmp(tern_strategy_global(ref), tern_strategy_global(later),
                           sizeof(float) * n) != 0)
                    fail_msg("n %zu mode %d round %d: deferred accumulation differs", n, mode,
                             (int)round);
            }
            tern_strategy_destroy(&ref);
            tern_strategy_destroy(&fast);
            tern_strategy_destroy(&later);
            free(g);
            free(rows);
        }
}

static void test_fedavg_accuracy(void **state)
{
    (void)state;
    /* The exact accumulator gives the correctly rounded weighted mean (against long double). */
    enum { n = 2000, k = 17 };
    float *rows = malloc(sizeof(float) * n * k), g[n] = {0}, want[n];
    assert_non_null(rows);
    uint64_t ids[k], ex[k];
    test_rng rng = {9};
    for (int c = 0; c < k; c++) {
        ids[c] = (uint64_t)c;
        ex[c] = (uint64_t)test_rng_int(&rng, 1, 60000);
        test_fill_uniform(&rng, rows + c * n, n, -3, 3);
    }
    for (int i = 0; i < n; i++) {
        long double sum = 0, total = 0;
        for (int c = 0; c < k; c++) {
            sum += (long double)ex[c] * rows[c * n + i];
            total += ex[c];
        }
        want[i] = (float)(sum / total);
    }
    tern_strategy_options o = opts(TERN_STRATEGY_FEDAVG, n);
    tern_strategy *s = make(&o, g);
    round_all(s, 1, ids, k, rows, n, ex);
    size_t off = 0;
    for (int i = 0; i < n; i++)
        off += tern_strategy_global(s)[i] != want[i];
    assert_true(off <= 2); /* a double rounding near a float tie, at most */
    expect_global(s, want, n, 1e-7f);
    tern_strategy_destroy(&s);
    free(rows);
}

/* ---- metrics and evaluation ---------------------------------------------------------------- */

static void test_metrics_and_evaluate(void **state)
{
    (void)state;
    float g[N] = {0};
    tern_strategy_options o = opts(TERN_STRATEGY_FEDAVG, N);
    tern_strategy *s = make(&o, g);
    open_all(s, 1, IDS3, 3);
    tern_metric m0[2] = {{"train_loss", 1.0}, {"accuracy", 0.5}};
    tern_metric m1[1] = {{"train_loss", 4.0}};
    tern_metric bad[2] = {{"x", 1.0}, {"x", 2.0}};
    tern_fit_result r = {.client_id = 7, .update = U3[0], .num_params = N, .num_examples = 1,
                         .metrics = bad, .num_metrics = 2};
    assert_int_equal(tern_strategy_add_fit_result(s, &r), TERN_ERR_INVALID);
    open_all(s, 1, IDS3, 3);
    r.metrics = m0;
    assert_int_equal(tern_strategy_add_fit_result(s, &r), TERN_OK);
    r = (tern_fit_result){.client_id = 3, .update = U3[1], .num_params = N, .num_examples = 3,
                          .metrics = m1, .num_metrics = 1};
    assert_int_equal(tern_strategy_add_fit_result(s, &r), TERN_OK);
    tern_fit_summary sum;
    assert_int_equal(tern_strategy_aggregate_fit(s, &sum), TERN_OK);
    assert_int_equal(sum.num_metrics, 2);
    assert_string_equal(sum.metric_names[0], "accuracy");
    assert_true(sum.metric_values[0] == 0.5);
    assert_string_equal(sum.metric_names[1], "train_loss");
    assert_true(sum.metric_values[1] == (1.0 + 12.0) / 4.0);
    assert_int_equal(sum.server_round, 1);
    assert_int_equal(sum.num_selected, 3);

    uint64_t sel[3];
    size_t ns;
    assert_int_equal(tern_strategy_configure_evaluate(s, 1, IDS3, 3, sel, &ns), TERN_OK);
    assert_int_equal(ns, 3);
    tern_evaluate_result e0 = {.client_id = 7, .num_examples = 10, .loss = 1.0, .accuracy = 0.9,
                               .has_accuracy = true};
    tern_evaluate_result e1 = {.client_id = 3, .num_examples = 30, .loss = 2.0, .accuracy = 0.5,
                               .has_accuracy = true};
    tern_evaluate_result e2 = {.client_id = 11, .num_examples = 60, .loss = 0.5};
    tern_evaluate_result eb = {.client_id = 11, .num_examples = 60, .loss = NAN};
    assert_int_equal(tern_strategy_add_evaluate_result(s, &e2), TERN_OK);
    assert_int_equal(tern_strategy_add_evaluate_result(s, &eb), TERN_ERR_EXISTS);
    assert_int_equal(tern_strategy_add_evaluate_result(s, &e0), TERN_OK);
    assert_int_equal(tern_strategy_add_evaluate_result(s, &e1), TERN_OK);
    tern_evaluate_summary es;
    assert_int_equal(tern_strategy_aggregate_evaluate(s, &es), TERN_OK);
    assert_int_equal(es.num_results, 3);
    assert_int_equal(es.num_examples, 100);
    assert_true(fabs(es.loss - (10 + 60 + 30) / 100.0) < 1e-12);
    assert_true(fabs(es.accuracy - (9 + 15) / 40.0) < 1e-12);
    assert_int_equal(tern_strategy_aggregate_evaluate(s, &es), TERN_ERR_STATE);
    tern_strategy_destroy(&s);
}

static void test_accumulator_range(void **state)
{
    (void)state;
    /* examples * max|u| beyond 2^50 is refused before it touches the aggregate. */
    float g[N] = {0};
    tern_strategy_options o = opts(TERN_STRATEGY_FEDAVG, N);
    tern_strategy *s = make(&o, g);
    open_all(s, 1, IDS3, 3);
    float huge[N] = {1e30f, 0, 0, 0, 0};
    tern_fit_result r = {.client_id = 7, .update = huge, .num_params = N, .num_examples = 1};
    assert_int_equal(tern_strategy_add_fit_result(s, &r), TERN_ERR_INVALID);
    assert_true(strstr(tern_strategy_last_error(s), "range") != NULL);
    add(s, 3, U3[1], N, 2);
    aggregate(s);
    assert_memory_equal(tern_strategy_global(s), U3[1], sizeof U3[1]);
    tern_strategy_destroy(&s);
}

/* ---- allocation failure ----------------------------------------------------------------------- */

static void test_allocation_failure(void **state)
{
    (void)state;
    float g[N] = {1, 1, 1, 1, 1};
    for (size_t ki = 0; ki < NKINDS; ki++) {
        bool finished = false;
        for (long fail_at = 1; fail_at < 50 && !finished; fail_at++) {
            test_alloc_state as = {.fail_at = fail_at};
            tern_allocator a = test_failing_allocator(&as);
            tern_strategy_options o = opts(ALL_KINDS[ki], N);
            o.alloc = &a;
            o.server_momentum = 0.5f;
            tern_strategy *s = NULL;
            tern_status st = tern_strategy_create(&o, g, &s, NULL);
            if (st != TERN_OK) {
                assert_int_equal(st, TERN_ERR_NOMEM);
                assert_null(s);
                assert_int_equal(as.live, 0);
                continue;
            }
            uint64_t sel[3];
            size_t ns;
            st = tern_strategy_configure_fit(s, 1, IDS3, 3, sel, &ns);
            if (st == TERN_OK)
                st = tern_strategy_configure_evaluate(s, 1, IDS3, 3, sel, &ns);
            if (st != TERN_OK) {
                assert_int_equal(st, TERN_ERR_NOMEM);
                /* Still usable: the next try (allocations work again) succeeds. */
                assert_int_equal(tern_strategy_configure_fit(s, 1, IDS3, 3, sel, &ns), TERN_OK);
            } else {
                finished = true;
            }
            for (int c = 0; c < 3; c++)
                add(s, IDS3[c], U3[c], N, EX3[c]);
            aggregate(s);
            tern_strategy_destroy(&s);
            assert_int_equal(as.live, 0);
        }
        assert_true(finished);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kind_names),
        cmocka_unit_test(test_options_invalid),
        cmocka_unit_test(test_fedavg_hand),
        cmocka_unit_test(test_fedprox_proximal),
        cmocka_unit_test(test_fedavgm_hand),
        cmocka_unit_test(test_fedadam_first_round_hand),
        cmocka_unit_test(test_server_optimizers_three_rounds),
        cmocka_unit_test(test_median_hand),
        cmocka_unit_test(test_trimmed_mean_hand),
        cmocka_unit_test(test_krum_adversary),
        cmocka_unit_test(test_selection),
        cmocka_unit_test(test_validation_rejects),
        cmocka_unit_test(test_clip_policy),
        cmocka_unit_test(test_round_failures),
        cmocka_unit_test(test_arrival_order_bitwise),
        cmocka_unit_test(test_simd_kernels_bitwise),
        cmocka_unit_test(test_fedavg_accuracy),
        cmocka_unit_test(test_metrics_and_evaluate),
        cmocka_unit_test(test_accumulator_range),
        cmocka_unit_test(test_allocation_failure),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
