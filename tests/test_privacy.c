/* Privacy accountant tests (include/tern/privacy.h) against the numbers Opacus, TensorFlow
 * Privacy and Microsoft's prv_accountant publish in their own tests:
 *
 *   opacus/tests/accountants_test.py            RDP epsilon 7.32911117143 (q 0.04, sigma 1.5,
 *                                               2250 steps, delta 1e-5); get_noise_multiplier
 *                                               1.416 (90 epochs) and 1.3562 (2000 steps)
 *   opacus/tests/prv_accountant.py              40 PRV epsilons at delta 1e-6 computed with
 *                                               microsoft/prv_accountant, checked to 5 places
 *   tensorflow_privacy/privacy/analysis/
 *     rdp_accountant_test.py                    compute_rdp values, get_privacy_spent by hand
 *     rdp_privacy_accountant_test.py            the same curve at rtol 1e-4, Gaussian RDP
 *   microsoft/prv_accountant tests/test_accountant.py
 *                                               the PRV bounds bracket the exact epsilon of the
 *                                               Gaussian mechanism (q = 1)
 *
 * plus closed forms (integer orders 2 and 3, q = 1), agreement of the integer and fractional
 * order paths, the noise search's round trip, the accountant's history, and argument checks. */
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

static void assert_close(const char *what, double got, double want, double tol)
{
    if (!(fabs(got - want) <= tol))
        fail_msg("%s: got %.15g, want %.15g (difference %.3g, tolerance %.3g)", what, got, want,
                 got - want, tol);
}

static tern_accountant *make(tern_accountant_kind kind)
{
    tern_accountant *a = NULL;
    tern_error err = {{0}};
    if (tern_accountant_create(&(tern_accountant_options){.kind = kind}, &a, &err) != TERN_OK)
        fail_msg("tern_accountant_create: %s", err.message);
    return a;
}

/* Epsilon of a single-entry history. */
static tern_privacy_spent spent(tern_accountant_kind kind, double sigma, double q, int64_t steps,
                                double delta)
{
    tern_accountant *a = make(kind);
    tern_privacy_spent sp;
    assert_int_equal(tern_accountant_add(a, sigma, q, steps), TERN_OK);
    if (tern_accountant_spent(a, delta, &sp) != TERN_OK)
        fail_msg("spent(%g, %g, %lld): %s", sigma, q, (long long)steps,
                 tern_accountant_last_error(a));
    tern_accountant_destroy(&a);
    return sp;
}

/* ---- RDP ----------------------------------------------------------------------------------- */

/* opacus/tests/accountants_test.py test_rdp_accountant: 2250 single steps. */
static void opacus_rdp_reference(void **state)
{
    (void)state;
    tern_accountant *a = make(TERN_ACCOUNTANT_RDP);
    int steps = (int)(90 / 0.04);
    assert_int_equal(steps, 2250);
    for (int i = 0; i < steps; i++)
        assert_int_equal(tern_accountant_step(a, 1.5, 0.04), TERN_OK);
    assert_int_equal(tern_accountant_history_count(a), 1); /* steps merge as in Opacus */
    double eps;
    assert_int_equal(tern_accountant_epsilon(a, 1e-5, &eps), TERN_OK);
    assert_close("Opacus RDP reference", eps, 7.32911117143, 1e-9 * 7.32911117143);
    tern_accountant_destroy(&a);
}

/* TF Privacy rdp_accountant_test.py test_compute_rdp_sequence (delta=1e-5) and
 * rdp_privacy_accountant_test.py test_compute_rdp_poisson_sampled_gaussian (rtol 1e-4). */
static void tf_compute_rdp_sequence(void **state)
{
    (void)state;
    const double orders[6] = {1.5, 2.5, 5, 50, 100, INFINITY};
    const double tf1[5] = {0.00065, 0.001085, 0.00218075, 0.023846, 167.416307};
    const double tf2[5] = {6.5007e-04, 1.0854e-03, 2.1808e-03, 2.3846e-02, 1.6742e+02};
    double rdp[6];
    assert_int_equal(tern_rdp_compute(rdp, 0.01, 2.5, 50, orders, 6), TERN_OK);
    for (int i = 0; i < 5; i++) {
        char what[64];
        snprintf(what, sizeof what, "rdp at order %g", orders[i]);
        assert_close(what, rdp[i], tf1[i], 1e-5);
        assert_close(what, rdp[i], tf2[i], 1e-4 * tf2[i]);
    }
    assert_true(isinf(rdp[5]) && rdp[5] > 0);

    /* test_compute_rdp_scalar: compute_rdp(0.1, 2, 10, 5) = 0.07737 to 5 places. */
    double five = 5, r;
    assert_int_equal(tern_rdp_compute(&r, 0.1, 2, 10, &five, 1), TERN_OK);
    assert_close("compute_rdp(0.1, 2, 10, 5)", r, 0.07737, 5e-6);
}

/* q = 1 is the plain Gaussian mechanism: rdp = steps * order / (2 sigma^2). TF Privacy:
 * compute_rdp(1, 10, 1, 20) == 0.1; rdp_privacy_accountant_test's alpha 3.14159, sigma 2.71828. */
static void no_subsampling(void **state)
{
    (void)state;
    double twenty = 20, r;
    assert_int_equal(tern_rdp_compute(&r, 1, 10, 1, &twenty, 1), TERN_OK);
    assert_true(r == 0.1);
    double orders[4] = {1.5, 3.14159, 7, 63}, rdp[4];
    assert_int_equal(tern_rdp_compute(rdp, 1, 2.71828, 37, orders, 4), TERN_OK);
    for (int i = 0; i < 4; i++)
        assert_close("q = 1", rdp[i], 37 * orders[i] / (2 * 2.71828 * 2.71828), 1e-15 * rdp[i]);
}

/* A_2 and A_3 in closed form: A_a = sum_i binom(a, i) (1 - q)^(a - i) q^i exp((i^2 - i) / 2s^2). */
static void integer_orders_closed_form(void **state)
{
    (void)state;
    const double qs[3] = {1e-3, 0.04, 0.5}, sigmas[3] = {0.7, 1.5, 8};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++) {
            /* A - 1 without cancellation: the binomial weights sum to 1. */
            double q = qs[a], s = sigmas[b], p = 1 - q;
            double a2m1 = q * q * expm1(1 / (s * s));
            double a3m1 = 3 * p * q * q * expm1(1 / (s * s)) + q * q * q * expm1(3 / (s * s));
            double orders[2] = {2, 3}, rdp[2];
            assert_int_equal(tern_rdp_compute(rdp, q, s, 1, orders, 2), TERN_OK);
            /* Opacus sums in log space: the log of A ~ 1 carries an absolute error of an ulp. */
            assert_close("order 2", rdp[0], log1p(a2m1), 1e-12 * log1p(a2m1) + 4e-16);
            assert_close("order 3", rdp[1], log1p(a3m1) / 2, 1e-12 * log1p(a3m1) + 4e-16);
        }
}

/* The fractional series (erfc) and the integer expansion (binomial) meet at integer orders. */
static void integer_and_fractional_paths_agree(void **state)
{
    (void)state;
    const double qs[3] = {1e-4, 0.04, 0.3}, sigmas[3] = {0.8, 1.5, 5};
    const double ks[4] = {2, 5, 12, 40};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++)
            for (int c = 0; c < 4; c++) {
                double orders[3] = {ks[c] - 1e-9, ks[c], ks[c] + 1e-9}, rdp[3];
                assert_int_equal(tern_rdp_compute(rdp, qs[a], sigmas[b], 1, orders, 3), TERN_OK);
                char what[96];
                snprintf(what, sizeof what, "q %g sigma %g order %g", qs[a], sigmas[b], ks[c]);
                assert_close(what, rdp[0], rdp[1], 1e-6 * rdp[1] + 1e-15);
                assert_close(what, rdp[2], rdp[1], 1e-6 * rdp[1] + 1e-15);
            }
}

/* TF Privacy rdp_accountant_test.py test_get_privacy_spent_check_target_delta. */
static void tf_get_privacy_spent(void **state)
{
    (void)state;
    double orders[31], rdp[31], eps, order;
    for (int i = 0; i < 31; i++) {
        orders[i] = i + 2;
        rdp[i] = 1.1; /* pure DP */
    }
    assert_int_equal(tern_rdp_epsilon(&eps, &order, orders, rdp, 31, 1e-5), TERN_OK);
    assert_true(order == 32);
    assert_close("constant RDP", eps, 1.32783806176, 1e-10);

    /* The Gaussian scaled to exactly (1, 1e-6)-DP; orders 1.001 to 99.999 (TF's list starts at
     * 1.000, whose value is undefined and skipped). */
    size_t n = 99999 - 1001 + 1;
    double *o = malloc(n * sizeof *o), *r = malloc(n * sizeof *r);
    assert_non_null(o);
    assert_non_null(r);
    for (size_t i = 0; i < n; i++)
        o[i] = 0.001 * (double)(1001 + i);
    assert_int_equal(tern_rdp_compute(r, 1, 4.530877117, 1, o, n), TERN_OK);
    assert_int_equal(tern_rdp_epsilon(&eps, NULL, o, r, n, 1e-6), TERN_OK);
    assert_close("Gaussian (1, 1e-6)", eps, 1, 5e-8);
    free(o);
    free(r);

    /* Opacus's nanargmin: values that are not numbers are skipped; all of them gives inf. */
    double nan_rdp[3] = {NAN, 0.5, NAN}, three[3] = {2, 3, 4};
    assert_int_equal(tern_rdp_epsilon(&eps, &order, three, nan_rdp, 3, 1e-5), TERN_OK);
    assert_true(order == 3);
    nan_rdp[1] = NAN;
    assert_int_equal(tern_rdp_epsilon(&eps, &order, three, nan_rdp, 3, 1e-5), TERN_OK);
    assert_true(isinf(eps) && isnan(order));
}

/* A history of two kinds of step is the sum of their RDP curves. */
static void heterogeneous_history(void **state)
{
    (void)state;
    tern_accountant *a = make(TERN_ACCOUNTANT_RDP);
    assert_int_equal(tern_accountant_add(a, 1.0, 0.01, 500), TERN_OK);
    assert_int_equal(tern_accountant_add(a, 2.0, 0.02, 300), TERN_OK);
    assert_int_equal(tern_accountant_add(a, 0.5, 0.5, 0), TERN_OK); /* spends nothing */
    assert_int_equal(tern_accountant_history_count(a), 3);
    tern_dp_entry e;
    assert_int_equal(tern_accountant_history_at(a, 1, &e), TERN_OK);
    assert_true(e.noise_multiplier == 2.0 && e.sample_rate == 0.02 && e.steps == 300);
    assert_int_equal(tern_accountant_history_at(a, 3, &e), TERN_ERR_INVALID);
    tern_privacy_spent sp;
    assert_int_equal(tern_accountant_spent(a, 1e-5, &sp), TERN_OK);

    const double *orders;
    size_t n = tern_rdp_default_orders(&orders);
    assert_int_equal(n, 151);
    assert_true(orders[0] == 1.1 && orders[98] == 10.9 && orders[99] == 12 && orders[150] == 63);
    double r1[151], r2[151], eps, order;
    assert_int_equal(tern_rdp_compute(r1, 0.01, 1.0, 500, orders, n), TERN_OK);
    assert_int_equal(tern_rdp_compute(r2, 0.02, 2.0, 300, orders, n), TERN_OK);
    for (size_t i = 0; i < n; i++)
        r1[i] += r2[i];
    assert_int_equal(tern_rdp_epsilon(&eps, &order, orders, r1, n, 1e-5), TERN_OK);
    assert_true(sp.epsilon == eps && sp.best_order == order);

    /* Steps with different parameters start new entries. */
    tern_accountant_reset(a);
    assert_int_equal(tern_accountant_history_count(a), 0);
    assert_int_equal(tern_accountant_epsilon(a, 1e-5, &eps), TERN_OK);
    assert_true(eps == 0); /* nothing spent */
    assert_int_equal(tern_accountant_step(a, 1.0, 0.01), TERN_OK);
    assert_int_equal(tern_accountant_step(a, 1.0, 0.01), TERN_OK);
    assert_int_equal(tern_accountant_step(a, 1.1, 0.01), TERN_OK);
    assert_int_equal(tern_accountant_step(a, 1.0, 0.01), TERN_OK);
    assert_int_equal(tern_accountant_history_count(a), 3);
    assert_int_equal(tern_accountant_history_at(a, 0, &e), TERN_OK);
    assert_int_equal(e.steps, 2);
    tern_accountant_destroy(&a);
    assert_null(a);
}

/* ---- noise search -------------------------------------------------------------------------- */

static double noise(tern_accountant_kind kind, double q, int64_t steps, double delta, double target)
{
    double sigma;
    tern_error err = {{0}};
    tern_noise_query nq = {.sample_rate = q, .steps = steps, .delta = delta,
                           .target_epsilon = target};
    if (tern_accountant_noise_multiplier(&sigma, &(tern_accountant_options){.kind = kind}, &nq,
                                         &err) != TERN_OK)
        fail_msg("noise search: %s", err.message);
    return sigma;
}

/* opacus/tests/accountants_test.py test_get_noise_multiplier_rdp_epochs / _steps (4 places). */
static void opacus_noise_reference(void **state)
{
    (void)state;
    assert_close("90 epochs", noise(TERN_ACCOUNTANT_RDP, 0.04, (int64_t)(90 / 0.04), 1e-5, 8),
                 1.416, 5e-5);
    assert_close("2000 steps", noise(TERN_ACCOUNTANT_RDP, 0.04, 2000, 1e-5, 8), 1.3562, 5e-5);
}

/* The found multiplier spends at most the target, within the tolerance (Opacus's
 * test_get_noise_multiplier_overshoot, on a fixed sample of its ranges). */
static void noise_round_trip(void **state)
{
    (void)state;
    const struct {
        double target;
        int epochs;
        double q, delta;
    } cases[] = {{1.0, 10, 1e-3, 1e-5}, {3.3, 40, 0.02, 1e-6}, {10.0, 100, 0.1, 1e-4},
                 {5.5, 17, 5e-4, 1e-5}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        int64_t steps = (int64_t)(cases[i].epochs / cases[i].q);
        double sigma = noise(TERN_ACCOUNTANT_RDP, cases[i].q, steps, cases[i].delta,
                             cases[i].target);
        double eps = spent(TERN_ACCOUNTANT_RDP, sigma, cases[i].q, steps, cases[i].delta).epsilon;
        assert_true(eps <= cases[i].target);
        assert_true(cases[i].target - eps <= 0.01);
    }
    /* The same for PRV, whose answer needs less noise than RDP's. */
    double sp = noise(TERN_ACCOUNTANT_PRV, 0.04, 2000, 1e-5, 8);
    double eps = spent(TERN_ACCOUNTANT_PRV, sp, 0.04, 2000, 1e-5).epsilon;
    assert_true(eps <= 8 && 8 - eps <= 0.01);
    assert_true(sp < 1.3562);
}

/* ---- PRV ----------------------------------------------------------------------------------- */

/* opacus/tests/prv_accountant.py: (sigma, q, steps) -> epsilon at delta 1e-6, computed with
 * microsoft/prv_accountant, compared to 5 places. The cases taking seconds each (q 0.05 with
 * 20000 or 50000 steps at small sigma) are left out to keep the test quick. */
static const double MSR_VALUES[][4] = {
    {0.8, 0.001, 100, 0.270403364058018680360362395731},
    {1.5, 0.001, 100, 0.0393694193095203287535710501288},
    {2.0, 0.001, 100, 0.0291045369484074882560076247273},
    {3.0, 0.001, 100, 0.0215200934390882663016508757892},
    {0.8, 0.05, 100, 6.74105193941409996938318727189},
    {1.5, 0.05, 100, 1.95385313568420015961635272106},
    {2.0, 0.05, 100, 1.28363737962406521120328761754},
    {3.0, 0.05, 100, 0.767933789666825572517439013609},
    {0.8, 0.2, 100, 24.3336641779225644199868838768},
    {1.5, 0.2, 100, 8.49897785912163072907787864096},
    {2.0, 0.2, 100, 5.67205560882372950004537415225},
    {3.0, 0.2, 100, 3.38122051022184422208738396876},
    {0.8, 0.001, 1000, 0.477771266184522591657923840103},
    {1.5, 0.001, 1000, 0.0998206602308474855167474970585},
    {2.0, 0.001, 1000, 0.0712187825381152272985474382949},
    {3.0, 0.001, 1000, 0.0476159308713589302097801692071},
    {0.8, 0.05, 1000, 19.5258428053837356230815203162},
    {1.5, 0.05, 1000, 6.20996924657726712126759593957},
    {2.0, 0.05, 1000, 4.17279986668931890392286732094},
    {3.0, 0.05, 1000, 2.52757432605973830774814814504},
    {0.8, 0.001, 20000, 1.29600925757016161021795142005},
    {1.5, 0.001, 20000, 0.437005108654860807693154356457},
    {2.0, 0.001, 20000, 0.305837939762453436820521801565},
    {3.0, 0.001, 20000, 0.194031030686054706269061398416},
    {3.0, 0.05, 20000, 13.9611146992367061159256991232},
    {0.8, 0.001, 50000, 2.03451480771586634688219419331},
    {3.0, 0.001, 50000, 0.309694161156544023327796821832},
    {0.8, 0.001, 100000, 2.92462211935041027643933375657},
    {3.0, 0.001, 100000, 0.443671720880875475323534828931},
};

static void opacus_prv_reference(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof MSR_VALUES / sizeof *MSR_VALUES; i++) {
        const double *c = MSR_VALUES[i];
        tern_privacy_spent sp = spent(TERN_ACCOUNTANT_PRV, c[0], c[1], (int64_t)c[2], 1e-6);
        char what[96];
        snprintf(what, sizeof what, "PRV sigma %g q %g steps %g", c[0], c[1], c[2]);
        assert_close(what, sp.epsilon, c[3], 5e-6);
        /* The bounds are eps_error (0.01) either side of the estimate, plus the effect of
         * delta_error (delta / 1000), which is larger where the privacy curve is flat. */
        assert_true(sp.epsilon_lower < sp.epsilon_estimate && sp.epsilon_estimate < sp.epsilon);
        if (!(sp.epsilon - sp.epsilon_lower < 0.02 + 1e-3 * sp.epsilon))
            fail_msg("%s: bounds [%.9g, %.9g]", what, sp.epsilon_lower, sp.epsilon);
        assert_true(isnan(sp.best_order));
    }
}

/* delta(eps) of the Gaussian mechanism with mu = sqrt(sum steps / sigma^2) (Balle & Wang
 * 2018), and the eps that gives delta, by bisection. */
static double gaussian_delta(double eps, double mu)
{
    return 0.5 * erfc((eps / mu - mu / 2) / sqrt(2)) -
           exp(eps) * 0.5 * erfc((eps / mu + mu / 2) / sqrt(2));
}

static double gaussian_epsilon(double delta, double mu)
{
    double lo = 0, hi = 100;
    for (int i = 0; i < 200; i++) {
        double mid = 0.5 * (lo + hi);
        if (gaussian_delta(mid, mu) > delta)
            lo = mid;
        else
            hi = mid;
    }
    return 0.5 * (lo + hi);
}

/* microsoft/prv_accountant test_gaussian_mechanism_analytic_{homogeneous,heterogeneous}: with
 * q = 1 the exact epsilon is known, and the PRV's [lower, upper] holds it; RDP, an upper bound
 * too, is above it. */
static void prv_brackets_exact_gaussian(void **state)
{
    (void)state;
    const struct {
        double sigma;
        int64_t steps;
    } homo[] = {{100, 10000}, {100, 10001}, {3, 20}, {1.2, 1}};
    for (size_t i = 0; i < sizeof homo / sizeof *homo; i++) {
        double mu = sqrt((double)homo[i].steps) / homo[i].sigma;
        for (double delta = 1e-7; delta < 1e-3; delta *= 100) {
            double exact = gaussian_epsilon(delta, mu);
            tern_privacy_spent p = spent(TERN_ACCOUNTANT_PRV, homo[i].sigma, 1, homo[i].steps,
                                         delta);
            tern_privacy_spent r = spent(TERN_ACCOUNTANT_RDP, homo[i].sigma, 1, homo[i].steps,
                                         delta);
            if (!(p.epsilon_lower <= exact && exact <= p.epsilon && exact <= r.epsilon))
                fail_msg("sigma %g steps %lld delta %g: exact %.9g, PRV [%.9g, %.9g], RDP %.9g",
                         homo[i].sigma, (long long)homo[i].steps, delta, exact, p.epsilon_lower,
                         p.epsilon, r.epsilon);
            assert_close("PRV estimate vs exact", p.epsilon_estimate, exact, 0.01);
        }
    }
    tern_accountant *a = make(TERN_ACCOUNTANT_PRV);
    assert_int_equal(tern_accountant_add(a, 10, 1, 50), TERN_OK);
    assert_int_equal(tern_accountant_add(a, 5, 1, 50), TERN_OK);
    tern_privacy_spent p;
    assert_int_equal(tern_accountant_spent(a, 1e-6, &p), TERN_OK);
    double exact = gaussian_epsilon(1e-6, sqrt(50 / 100.0 + 50 / 25.0));
    assert_true(p.epsilon_lower <= exact && exact <= p.epsilon);
    tern_accountant_destroy(&a);
}

/* PRV is the tighter accountant: its lower bound is under RDP's epsilon, and for DP-SGD's
 * usual regime its upper one too. Heterogeneous histories go through the convolution tree. */
static void prv_below_rdp(void **state)
{
    (void)state;
    tern_privacy_spent p = spent(TERN_ACCOUNTANT_PRV, 1.5, 0.04, 2250, 1e-5);
    assert_true(p.epsilon < 7.32911117143 && p.epsilon > 6);

    for (int n = 1; n <= 3; n++) {
        tern_accountant *ap = make(TERN_ACCOUNTANT_PRV), *ar = make(TERN_ACCOUNTANT_RDP);
        for (int k = 0; k < n; k++) {
            assert_int_equal(tern_accountant_add(ap, 1.0 + 0.3 * k, 0.01 * (k + 1), 400), TERN_OK);
            assert_int_equal(tern_accountant_add(ar, 1.0 + 0.3 * k, 0.01 * (k + 1), 400), TERN_OK);
        }
        tern_privacy_spent sp, sr;
        assert_int_equal(tern_accountant_spent(ap, 1e-5, &sp), TERN_OK);
        assert_int_equal(tern_accountant_spent(ar, 1e-5, &sr), TERN_OK);
        assert_true(sp.epsilon_lower <= sr.epsilon);
        assert_true(sp.epsilon <= sr.epsilon);
        tern_accountant_destroy(&ap);
        tern_accountant_destroy(&ar);
    }

    /* Splitting one entry in two composes to the same distribution, up to the mesh. */
    tern_accountant *a = make(TERN_ACCOUNTANT_PRV);
    assert_int_equal(tern_accountant_add(a, 1.5, 0.04, 1000), TERN_OK);
    assert_int_equal(tern_accountant_add(a, 1.5, 0.04, 1250), TERN_OK);
    tern_privacy_spent split;
    assert_int_equal(tern_accountant_spent(a, 1e-5, &split), TERN_OK);
    assert_close("split history", split.epsilon_estimate, p.epsilon_estimate, 0.01);
    tern_accountant_destroy(&a);
}

/* ---- argument checks ----------------------------------------------------------------------- */

static void invalid_arguments(void **state)
{
    (void)state;
    double order = 5, r, eps;
    assert_int_equal(tern_rdp_compute(&r, 0, 1, 1, &order, 1), TERN_ERR_INVALID);
    assert_int_equal(tern_rdp_compute(&r, 1.01, 1, 1, &order, 1), TERN_ERR_INVALID);
    assert_int_equal(tern_rdp_compute(&r, NAN, 1, 1, &order, 1), TERN_ERR_INVALID);
    assert_int_equal(tern_rdp_compute(&r, 0.1, 0, 1, &order, 1), TERN_ERR_INVALID);
    assert_int_equal(tern_rdp_compute(&r, 0.1, -1, 1, &order, 1), TERN_ERR_INVALID);
    assert_int_equal(tern_rdp_compute(&r, 0.1, INFINITY, 1, &order, 1), TERN_ERR_INVALID);
    assert_int_equal(tern_rdp_compute(&r, 0.1, 1, -1, &order, 1), TERN_ERR_INVALID);
    double one = 1;
    assert_int_equal(tern_rdp_compute(&r, 0.1, 1, 1, &one, 1), TERN_ERR_INVALID);
    assert_int_equal(tern_rdp_compute(&r, 0.1, 1, 0, &order, 1), TERN_OK);
    assert_true(r == 0);
    r = 1;
    assert_int_equal(tern_rdp_epsilon(&eps, NULL, &order, &r, 1, 0), TERN_ERR_INVALID);
    assert_int_equal(tern_rdp_epsilon(&eps, NULL, &order, &r, 1, 1), TERN_ERR_INVALID);
    assert_int_equal(tern_rdp_epsilon(&eps, NULL, &order, &r, 0, 1e-5), TERN_ERR_INVALID);
    assert_int_equal(tern_rdp_epsilon(&eps, NULL, &one, &r, 1, 1e-5), TERN_ERR_INVALID);

    tern_accountant *a = NULL;
    tern_error err = {{0}};
    assert_int_equal(tern_accountant_create(&(tern_accountant_options){.kind = 7}, &a, &err),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_accountant_create(&(tern_accountant_options){.orders = &one,
                                                                       .norders = 1},
                                            &a, &err),
                     TERN_ERR_INVALID);
    assert_null(a);
    tern_accountant_kind kind;
    assert_int_equal(tern_accountant_kind_parse("prv", &kind), TERN_OK);
    assert_int_equal(kind, TERN_ACCOUNTANT_PRV);
    assert_string_equal(tern_accountant_kind_name(TERN_ACCOUNTANT_RDP), "rdp");
    assert_int_equal(tern_accountant_kind_parse("gdp", &kind), TERN_ERR_INVALID);

    for (int k = 0; k < 2; k++) {
        a = make(k ? TERN_ACCOUNTANT_PRV : TERN_ACCOUNTANT_RDP);
        assert_int_equal(tern_accountant_step(a, 0, 0.1), TERN_ERR_INVALID);
        assert_true(tern_accountant_last_error(a)[0] != 0);
        assert_int_equal(tern_accountant_step(a, 1, 0), TERN_ERR_INVALID);
        assert_int_equal(tern_accountant_add(a, 1, 0.1, -3), TERN_ERR_INVALID);
        assert_int_equal(tern_accountant_add(a, 1, 2, 3), TERN_ERR_INVALID);
        assert_int_equal(tern_accountant_history_count(a), 0);
        assert_int_equal(tern_accountant_add(a, 1, 0.1, 3), TERN_OK);
        assert_int_equal(tern_accountant_epsilon(a, 0, &eps), TERN_ERR_INVALID);
        assert_int_equal(tern_accountant_epsilon(a, 1, &eps), TERN_ERR_INVALID);
        assert_int_equal(tern_accountant_epsilon(a, -1e-5, &eps), TERN_ERR_INVALID);
        assert_int_equal(tern_accountant_epsilon(a, 1e-5, &eps), TERN_OK);
        assert_true(eps > 0 && isfinite(eps));
        tern_accountant_destroy(&a);
    }
    tern_accountant_destroy(&a); /* no-op on NULL */

    /* PRV refuses what it cannot do accurately: too fine a mesh, too small a delta. */
    tern_accountant_options small = {.kind = TERN_ACCOUNTANT_PRV, .prv_max_points = 1000};
    assert_int_equal(tern_accountant_create(&small, &a, &err), TERN_OK);
    assert_int_equal(tern_accountant_add(a, 1, 0.1, 1000), TERN_OK);
    assert_int_equal(tern_accountant_epsilon(a, 1e-5, &eps), TERN_ERR_UNSUPPORTED);
    assert_non_null(strstr(tern_accountant_last_error(a), "points"));
    tern_accountant_destroy(&a);
    a = make(TERN_ACCOUNTANT_PRV);
    assert_int_equal(tern_accountant_add(a, 1, 0.1, 10), TERN_OK);
    assert_int_equal(tern_accountant_epsilon(a, 1e-16, &eps), TERN_ERR_UNSUPPORTED);
    tern_accountant_destroy(&a);

    double sigma = -1;
    tern_noise_query q = {.sample_rate = 0.04, .steps = 100, .delta = 1e-5, .target_epsilon = 0};
    assert_int_equal(tern_accountant_noise_multiplier(&sigma, NULL, &q, &err), TERN_ERR_INVALID);
    q.target_epsilon = 1;
    q.delta = 2;
    assert_int_equal(tern_accountant_noise_multiplier(&sigma, NULL, &q, &err), TERN_ERR_INVALID);
    q.delta = 1e-5;
    q.sample_rate = 0;
    assert_int_equal(tern_accountant_noise_multiplier(&sigma, NULL, &q, &err), TERN_ERR_INVALID);
    /* A budget no noise can meet: RDP's conversion alone costs more than 1e-3 at delta 1e-10. */
    q = (tern_noise_query){.sample_rate = 1, .steps = 1, .delta = 1e-10, .target_epsilon = 1e-3};
    assert_int_equal(tern_accountant_noise_multiplier(&sigma, NULL, &q, &err),
                     TERN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, "too low"));
    assert_true(sigma == -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(opacus_rdp_reference),
        cmocka_unit_test(tf_compute_rdp_sequence),
        cmocka_unit_test(no_subsampling),
        cmocka_unit_test(integer_orders_closed_form),
        cmocka_unit_test(integer_and_fractional_paths_agree),
        cmocka_unit_test(tf_get_privacy_spent),
        cmocka_unit_test(heterogeneous_history),
        cmocka_unit_test(opacus_noise_reference),
        cmocka_unit_test(noise_round_trip),
        cmocka_unit_test(opacus_prv_reference),
        cmocka_unit_test(prv_brackets_exact_gaussian),
        cmocka_unit_test(prv_below_rdp),
        cmocka_unit_test(invalid_arguments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
