/* Tests for the non-convolution kernels of nn/ops.c. Each op with a backward is checked by
 * central finite differences of a double-precision reference forward written here (so the
 * forward reference is also an oracle for the float kernel), plus exact values PyTorch
 * defines (running statistics, activation kinks, cross entropy), accumulation into
 * pre-filled gradients, and bitwise reproducibility on a two-thread pool. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "nn/kernels.h"
#include "testutil.h"

/* ---- helpers ------------------------------------------------------------------------- */

static float *falloc(size_t n)
{
    float *p = calloc(n ? n : 1, sizeof *p);
    assert_non_null(p);
    return p;
}

static double *dalloc(size_t n)
{
    double *p = calloc(n ? n : 1, sizeof *p);
    assert_non_null(p);
    return p;
}

static float *frandom(test_rng *r, size_t n, float lo, float hi)
{
    float *p = falloc(n);
    test_fill_uniform(r, p, n, lo, hi);
    return p;
}

/* Loss of a double-precision reference forward at parameters p. */
typedef double (*loss_fn)(const double *p, const void *ctx);

/* Central differences of f at every coordinate of p, compared with analytic (a float
 * gradient laid out like p). */
static bool check_fd(const char *what, const float *analytic, const float *p0, size_t np,
                     loss_fn f, const void *ctx, double h, float tol)
{
    double *p = dalloc(np);
    float *fd = falloc(np);
    for (size_t i = 0; i < np; i++)
        p[i] = p0[i];
    for (size_t i = 0; i < np; i++) {
        double save = p[i];
        p[i] = save + h;
        double lp = f(p, ctx);
        p[i] = save - h;
        double lm = f(p, ctx);
        p[i] = save;
        fd[i] = (float)((lp - lm) / (2 * h));
    }
    bool ok = test_close(what, analytic, fd, np, tol, 1e-3f);
    free(p);
    free(fd);
    return ok;
}

static void to_double(double *d, const float *f, size_t n)
{
    for (size_t i = 0; i < n; i++)
        d[i] = f[i];
}

static void assert_close(const char *what, const float *a, const float *b, size_t n, float tol)
{
    assert_true(test_close(what, a, b, n, tol, 1e-3f));
}

/* ---- batch normalization ----------------------------------------------------------------- */

/* Parameters packed as [x (m, c), gamma (c), beta (c)]; loss = sum(y * r). */
typedef struct {
    size_t m;
    int c;
    double eps;
    const float *r; /* (m, c) */
} bn_ctx;

/* Double reference of the training forward; y, mean, var may be NULL. Returns sum(y * r). */
static double bn_ref(const double *p, const bn_ctx *k, double *y, double *mean_out,
                     double *var_out)
{
    size_t m = k->m, c = (size_t)k->c;
    const double *x = p, *gamma = p + m * c, *beta = gamma + c;
    double loss = 0;
    for (size_t j = 0; j < c; j++) {
        double mean = 0, var = 0;
        for (size_t r = 0; r < m; r++)
            mean += x[r * c + j];
        mean /= (double)m;
        for (size_t r = 0; r < m; r++)
            var += (x[r * c + j] - mean) * (x[r * c + j] - mean);
        var /= (double)m;
        if (mean_out)
            mean_out[j] = mean;
        if (var_out)
            var_out[j] = var;
        for (size_t r = 0; r < m; r++) {
            double v = (x[r * c + j] - mean) / sqrt(var + k->eps) * gamma[j] + beta[j];
            if (y)
                y[r * c + j] = v;
            loss += v * k->r[r * c + j];
        }
    }
    return loss;
}

static double bn_loss(const double *p, const void *ctx)
{
    return bn_ref(p, ctx, NULL, NULL, NULL);
}

static float *fdup(const float *a, size_t n)
{
    float *p = falloc(n);
    memcpy(p, a, n * sizeof *p);
    return p;
}

static float *pack3(const float *a, size_t na, const float *b, size_t nb, const float *c,
                    size_t nc)
{
    float *p = falloc(na + nb + nc);
    memcpy(p, a, na * sizeof *p);
    memcpy(p + na, b, nb * sizeof *p);
    if (c)
        memcpy(p + na + nb, c, nc * sizeof *p);
    return p;
}

static void test_bn_train_forward_and_running_stats(void **state)
{
    (void)state;
    test_rng r = {1};
    /* c = 70 crosses the kernel's 64-channel chunk; offset inputs test the two-pass variance */
    size_t sizes[][2] = {{37, 70}, {1, 5}, {8, 3}};
    for (size_t t = 0; t < sizeof sizes / sizeof *sizes; t++) {
        size_t m = sizes[t][0], c = sizes[t][1], mc = m * c;
        float eps = 1e-3f, mom = 0.01f;
        float *x = frandom(&r, mc, 98, 102), *gamma = frandom(&r, c, 0.5f, 1.5f);
        float *beta = frandom(&r, c, -1, 1), *rm = frandom(&r, c, -1, 1);
        float *rv = frandom(&r, c, 0.5f, 2), *y = falloc(mc);
        float *smean = falloc(c), *sinv = falloc(c), *rm0 = fdup(rm, c), *rv0 = fdup(rv, c);
        tern_batchnorm_forward_train(y, smean, sinv, rm, rv, x, gamma, beta, m, (int)c, eps,
                                     mom, NULL);

        bn_ctx k = {m, (int)c, eps, frandom(&r, mc, -1, 1)};
        float *p = pack3(x, mc, gamma, c, beta, c);
        double *pd = dalloc(mc + 2 * c), *yd = dalloc(mc), *mean = dalloc(c), *var = dalloc(c);
        to_double(pd, p, mc + 2 * c);
        bn_ref(pd, &k, yd, mean, var);
        float *want_y = falloc(mc), *want = falloc(4 * c);
        for (size_t i = 0; i < mc; i++)
            want_y[i] = (float)yd[i];
        for (size_t j = 0; j < c; j++) {
            double unbiased = m > 1 ? var[j] * (double)m / (double)(m - 1) : var[j];
            want[j] = (float)mean[j];
            want[c + j] = (float)(1 / sqrt(var[j] + eps));
            want[2 * c + j] = (float)((1 - (double)mom) * rm0[j] + (double)mom * mean[j]);
            want[3 * c + j] = (float)((1 - (double)mom) * rv0[j] + (double)mom * unbiased);
        }
        /* the 100-offset input checks that y is computed from centred values */
        assert_close("bn y", y, want_y, mc, 1e-5f);
        assert_close("bn save_mean", smean, want, c, 1e-6f);
        assert_close("bn save_invstd", sinv, want + c, c, 1e-5f);
        assert_close("bn run_mean", rm, want + 2 * c, c, 1e-6f);
        assert_close("bn run_var", rv, want + 3 * c, c, 1e-6f);
        if (m == 1) /* biased var is 0: run_var decays, never divides by m - 1 = 0 */
            for (size_t j = 0; j < c; j++)
                assert_float_equal(rv[j], (1 - mom) * rv0[j], 1e-6f);

        free(x), free(gamma), free(beta), free(rm), free(rv), free(y), free(smean);
        free(sinv), free(rm0), free(rv0), free((float *)k.r), free(p), free(pd), free(yd);
        free(mean), free(var), free(want_y), free(want);
    }
}

static void test_bn_eval(void **state)
{
    (void)state;
    test_rng r = {2};
    size_t m = 10, c = 67;
    float eps = 1e-3f;
    float *x = frandom(&r, m * c, -3, 3), *gamma = frandom(&r, c, -2, 2);
    float *beta = frandom(&r, c, -1, 1), *rm = frandom(&r, c, -1, 1);
    float *rv = frandom(&r, c, 0.1f, 3), *y = falloc(m * c), *want = falloc(m * c);
    tern_batchnorm_forward_eval(y, x, gamma, beta, rm, rv, m, (int)c, eps, NULL);
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < c; j++)
            want[i * c + j] = (float)(((double)x[i * c + j] - rm[j]) /
                                          sqrt((double)rv[j] + eps) * gamma[j] + beta[j]);
    assert_close("bn eval", y, want, m * c, 1e-6f);
    free(x), free(gamma), free(beta), free(rm), free(rv), free(y), free(want);
}

static void test_bn_backward_fd(void **state)
{
    (void)state;
    test_rng r = {3};
    size_t sizes[][2] = {{6, 3}, {2, 4}, {12, 66}};
    for (size_t t = 0; t < sizeof sizes / sizeof *sizes; t++) {
        size_t m = sizes[t][0], c = sizes[t][1], mc = m * c, np = mc + 2 * c;
        float *x = frandom(&r, mc, -2, 2), *gamma = frandom(&r, c, 0.5f, 1.5f);
        float *beta = frandom(&r, c, -1, 1), *rm = falloc(c), *rv = falloc(c);
        float *y = falloc(mc), *smean = falloc(c), *sinv = falloc(c);
        bn_ctx k = {m, (int)c, 1e-3, frandom(&r, mc, -1, 1)};
        tern_batchnorm_forward_train(y, smean, sinv, rm, rv, x, gamma, beta, m, (int)c, 1e-3f,
                                     0.1f, NULL);
        float *g = falloc(np);
        tern_batchnorm_backward(g, g + mc, g + mc + c, k.r, x, smean, sinv, gamma, m, (int)c,
                                NULL);
        float *p = pack3(x, mc, gamma, c, beta, c);
        assert_true(check_fd("bn backward", g, p, np, bn_loss, &k, 1e-5, 1e-4f));

        /* NULL gradients are skipped; the others are unchanged by the omission */
        float *dgamma = falloc(c);
        tern_batchnorm_backward(NULL, dgamma, NULL, k.r, x, smean, sinv, gamma, m, (int)c, NULL);
        assert_memory_equal(dgamma, g + mc, c * sizeof *dgamma);

        free(x), free(gamma), free(beta), free(rm), free(rv), free(y), free(smean), free(sinv);
        free((float *)k.r), free(g), free(p), free(dgamma);
    }
}

/* ---- fused batch normalization + activation, every ISA ----------------------------------- */

/* Pools for every kernel level this CPU runs, at 1 and 2 threads; returns how many. Index 0 is
 * the scalar pool with one thread. */
#define MAX_POOLS 6
static int make_pools(tern_pool **pools, tern_isa *isas, int *threads)
{
    int np = 0;
    tern_isa all[] = {TERN_ISA_SCALAR, TERN_ISA_AVX2, TERN_ISA_AVX512};
    for (int i = 0; i < 3; i++) {
        if (tern_isa_resolve(all[i]) != all[i])
            continue;
        for (int t = 1; t <= 2; t++) {
            assert_int_equal(tern_pool_create(t, all[i], NULL, &pools[np]), 0);
            assert_int_equal(tern_pool_isa(pools[np]), all[i]);
            isas[np] = all[i];
            threads[np++] = t;
        }
    }
    return np;
}

static void destroy_pools(tern_pool **pools, int np)
{
    for (int i = 0; i < np; i++)
        tern_pool_destroy(&pools[i]);
}

/* Channel counts off the 16-lane grid, one- and two-row batches, and sizes above the
 * threshold where the pool wakes up. */
static const size_t bn_sizes[][2] = {{1, 1}, {2, 3}, {1, 17}, {2, 72}, {37, 88}, {9, 120},
                                     {300, 120}, {700, 72}, {4096, 16}, {2000, 17},
                                     {1500, 3}, {64, 576}};

/* Everything the fused forward and backward produce, in one buffer: a (m, c), save_mean,
 * save_invstd, run_mean, run_var (c each), dy (m, c), dgamma, dbeta (c each). */
static void bn_act_all(float *out, const float *y, const float *da, const float *gamma,
                       const float *beta, const float *rm0, const float *rv0, const float *pre,
                       size_t m, size_t c, tern_act act, bool fused, tern_pool *pool)
{
    size_t mc = m * c;
    float *a = out, *mean = a + mc, *inv = mean + c, *rm = inv + c, *rv = rm + c;
    float *dy = rv + c, *dg = dy + mc, *db = dg + c;
    memcpy(rm, rm0, c * sizeof *rm);
    memcpy(rv, rv0, c * sizeof *rv);
    memcpy(dy, pre, (mc + 2 * c) * sizeof *dy); /* gradients accumulate into pre */
    if (fused) {
        tern_batchnorm_act_forward_train(a, mean, inv, rm, rv, y, gamma, beta, m, (int)c, 1e-3f,
                                         0.1f, act, pool);
        tern_batchnorm_act_backward(dy, dg, db, da, y, mean, inv, gamma, beta, m, (int)c, act,
                                    pool);
    } else {
        float *z = falloc(mc), *dz = falloc(mc);
        tern_batchnorm_forward_train(z, mean, inv, rm, rv, y, gamma, beta, m, (int)c, 1e-3f,
                                     0.1f, pool);
        tern_act_forward(a, z, mc, act, pool);
        tern_act_backward(dz, da, z, mc, act, pool);
        tern_batchnorm_backward(dy, dg, db, dz, y, mean, inv, gamma, m, (int)c, pool);
        free(z), free(dz);
    }
}

static void test_bn_act_fused(void **state)
{
    (void)state;
    test_rng r = {13};
    tern_pool *pools[MAX_POOLS];
    tern_isa isas[MAX_POOLS];
    int threads[MAX_POOLS], np = make_pools(pools, isas, threads);
    for (size_t t = 0; t < sizeof bn_sizes / sizeof *bn_sizes; t++) {
        size_t m = bn_sizes[t][0], c = bn_sizes[t][1], mc = m * c, nout = 2 * mc + 6 * c;
        float *y = frandom(&r, mc, -3, 5), *da = frandom(&r, mc, -1, 1);
        float *gamma = frandom(&r, c, 0.5f, 3), *beta = frandom(&r, c, -1, 1);
        float *rm0 = frandom(&r, c, -1, 1), *rv0 = frandom(&r, c, 0.5f, 2);
        float *pre = frandom(&r, mc + 2 * c, -1, 1);
        float *want = falloc(nout), *got = falloc(nout), *again = falloc(nout);
        for (int act = 0; act < 4; act++)
            for (int p = 0; p < np; p++) {
                bn_act_all(want, y, da, gamma, beta, rm0, rv0, pre, m, c, (tern_act)act, false,
                           pools[p]);
                bn_act_all(got, y, da, gamma, beta, rm0, rv0, pre, m, c, (tern_act)act, true,
                           pools[p]);
                char what[96];
                snprintf(what, sizeof what, "bn+act m=%zu c=%zu act=%d isa=%d threads=%d", m, c,
                         act, (int)isas[p], threads[p]);
                assert_true(test_close(what, got, want, nout, 1e-6f, 1e-3f));
                /* running statistics exactly as the unfused kernel leaves them */
                assert_memory_equal(got + mc + 2 * c, want + mc + 2 * c, 2 * c * sizeof *got);
                /* bitwise reproducible for this pool */
                bn_act_all(again, y, da, gamma, beta, rm0, rv0, pre, m, c, (tern_act)act, true,
                           pools[p]);
                assert_memory_equal(got, again, nout * sizeof *got);
                /* bitwise equal to the scalar path at the same thread count */
                bn_act_all(again, y, da, gamma, beta, rm0, rv0, pre, m, c, (tern_act)act, true,
                           pools[p % 2]);
                assert_memory_equal(got, again, nout * sizeof *got);
                /* and close to the single-threaded scalar path */
                bn_act_all(again, y, da, gamma, beta, rm0, rv0, pre, m, c, (tern_act)act, true,
                           pools[0]);
                assert_true(test_close(what, got, again, nout, 1e-6f, 1e-3f));
            }
        free(y), free(da), free(gamma), free(beta), free(rm0), free(rv0), free(pre);
        free(want), free(got), free(again);
    }
    destroy_pools(pools, np);
}

/* ---- group normalization ------------------------------------------------------------------ */

typedef struct {
    int n, c, groups;
    size_t hw;
    double eps;
    const float *r; /* (N, HW, C) */
} gn_ctx;

/* Parameters [x (N, HW, C), gamma (C), beta (C)]; y may be NULL; returns sum(y * r). */
static double gn_ref(const double *p, const gn_ctx *k, double *y)
{
    size_t c = (size_t)k->c, hw = k->hw, cpg = c / (size_t)k->groups, per = hw * c;
    const double *x = p, *gamma = p + (size_t)k->n * per, *beta = gamma + c;
    double loss = 0;
    for (size_t s = 0; s < (size_t)k->n; s++)
        for (size_t g = 0; g < (size_t)k->groups; g++) {
            double mean = 0, var = 0, cnt = (double)(hw * cpg);
            for (size_t i = 0; i < hw; i++)
                for (size_t j = g * cpg; j < (g + 1) * cpg; j++)
                    mean += x[s * per + i * c + j];
            mean /= cnt;
            for (size_t i = 0; i < hw; i++)
                for (size_t j = g * cpg; j < (g + 1) * cpg; j++)
                    var += pow(x[s * per + i * c + j] - mean, 2);
            var /= cnt;
            for (size_t i = 0; i < hw; i++)
                for (size_t j = g * cpg; j < (g + 1) * cpg; j++) {
                    size_t at = s * per + i * c + j;
                    double v = (x[at] - mean) / sqrt(var + k->eps) * gamma[j] + beta[j];
                    if (y)
                        y[at] = v;
                    loss += v * k->r[at];
                }
        }
    return loss;
}

static double gn_loss(const double *p, const void *ctx)
{
    return gn_ref(p, ctx, NULL);
}

static void test_groupnorm_forward_and_fd(void **state)
{
    (void)state;
    test_rng r = {4};
    int groups[] = {1, 2, 3, 6};
    for (size_t t = 0; t < sizeof groups / sizeof *groups; t++) {
        int n = 2, c = 6;
        size_t hw = 3, nx = (size_t)n * hw * (size_t)c, np = nx + 2 * (size_t)c;
        gn_ctx k = {n, c, groups[t], hw, 1e-5, frandom(&r, nx, -1, 1)};
        float *x = frandom(&r, nx, -2, 2), *gamma = frandom(&r, (size_t)c, 0.5f, 1.5f);
        float *beta = frandom(&r, (size_t)c, -1, 1), *y = falloc(nx);
        float *smean = falloc((size_t)n * groups[t]), *sinv = falloc((size_t)n * groups[t]);
        tern_groupnorm_forward(y, smean, sinv, x, gamma, beta, n, hw, c, groups[t], 1e-5f,
                               NULL);
        float *p = pack3(x, nx, gamma, (size_t)c, beta, (size_t)c);
        double *pd = dalloc(np), *yd = dalloc(nx);
        float *want = falloc(nx);
        to_double(pd, p, np);
        gn_ref(pd, &k, yd);
        for (size_t i = 0; i < nx; i++)
            want[i] = (float)yd[i];
        assert_close("gn forward", y, want, nx, 1e-5f);

        float *g = falloc(np);
        tern_groupnorm_backward(g, g + nx, g + nx + c, k.r, x, smean, sinv, gamma, n, hw, c,
                                groups[t], NULL);
        assert_true(check_fd("gn backward", g, p, np, gn_loss, &k, 1e-5, 1e-4f));

        free((float *)k.r), free(x), free(gamma), free(beta), free(y), free(smean), free(sinv);
        free(p), free(pd), free(yd), free(want), free(g);
    }
}

/* ---- activations ---------------------------------------------------------------------- */

static double act_ref(double x, tern_act act)
{
    switch (act) {
    case TERN_ACT_NONE: return x;
    case TERN_ACT_RELU: return x > 0 ? x : 0;
    case TERN_ACT_HARDSWISH: return x * fmin(fmax(x + 3, 0), 6) / 6;
    case TERN_ACT_HARDSIGMOID: return fmin(fmax(x + 3, 0), 6) / 6;
    }
    return NAN;
}

typedef struct {
    tern_act act;
    size_t n;
    const float *r;
} act_ctx;

static double act_loss(const double *p, const void *ctx)
{
    const act_ctx *k = ctx;
    double loss = 0;
    for (size_t i = 0; i < k->n; i++)
        loss += act_ref(p[i], k->act) * k->r[i];
    return loss;
}

static void test_act_forward_and_fd(void **state)
{
    (void)state;
    test_rng r = {5};
    const double h = 1e-4;
    const float kinks[] = {-3, 0, 3};
    tern_act acts[] = {TERN_ACT_NONE, TERN_ACT_RELU, TERN_ACT_HARDSWISH, TERN_ACT_HARDSIGMOID};
    size_t n = 200;
    for (size_t a = 0; a < 4; a++) {
        float *x = falloc(n), *y = falloc(n), *want = falloc(n), *dx = falloc(n);
        /* span all pieces, staying 2h away from every kink so differences are one-sided-free */
        for (size_t i = 0; i < n; i++) {
            float v;
            bool near;
            do {
                v = test_rng_uniform(&r, -5, 5);
                near = false;
                for (size_t j = 0; j < 3; j++)
                    near |= fabsf(v - kinks[j]) < 2 * h;
            } while (near);
            x[i] = v;
            want[i] = (float)act_ref(v, acts[a]);
        }
        tern_act_forward(y, x, n, acts[a], NULL);
        assert_close("act forward", y, want, n, 1e-6f);

        act_ctx k = {acts[a], n, frandom(&r, n, -1, 1)};
        tern_act_backward(dx, k.r, x, n, acts[a], NULL);
        assert_true(check_fd("act backward", dx, x, n, act_loss, &k, h, 1e-5f));

        /* in place */
        tern_act_forward(x, x, n, acts[a], NULL);
        assert_memory_equal(x, y, n * sizeof *x);
        free(x), free(y), free(want), free(dx), free((float *)k.r);
    }
}

static void test_act_kinks(void **state)
{
    (void)state;
    /* PyTorch: relu' = [x > 0]; hardswish' = 0 below -3, x/3 + 1/2 on [-3, 3], 1 above;
     * hardsigmoid' = 1/6 on the open interval (-3, 3) only. */
    const float x[] = {-3.5f, -3, 0, 3, 3.5f};
    const float relu_d[] = {0, 0, 0, 1, 1};
    const float hswish_d[] = {0, -0.5f, 0.5f, 1.5f, 1};
    const float hsig_d[] = {0, 0, 1.0f / 6, 0, 0};
    const float hswish_y[] = {0, 0, 0, 3, 3.5f};
    const float hsig_y[] = {0, 0, 0.5f, 1, 1};
    const float ones[] = {1, 1, 1, 1, 1};
    float d[5], y[5];

    memset(d, 0, sizeof d);
    tern_act_backward(d, ones, x, 5, TERN_ACT_RELU, NULL);
    assert_memory_equal(d, relu_d, sizeof d);
    memset(d, 0, sizeof d);
    tern_act_backward(d, ones, x, 5, TERN_ACT_HARDSWISH, NULL);
    assert_memory_equal(d, hswish_d, sizeof d);
    memset(d, 0, sizeof d);
    tern_act_backward(d, ones, x, 5, TERN_ACT_HARDSIGMOID, NULL);
    for (int i = 0; i < 5; i++)
        assert_float_equal(d[i], hsig_d[i], 1e-7f);

    /* compared by value: hardswish gives -0 below -3, as PyTorch does */
    tern_act_forward(y, x, 5, TERN_ACT_HARDSWISH, NULL);
    for (int i = 0; i < 5; i++)
        assert_true(y[i] == hswish_y[i]);
    tern_act_forward(y, x, 5, TERN_ACT_HARDSIGMOID, NULL);
    for (int i = 0; i < 5; i++)
        assert_true(y[i] == hsig_y[i]);
    tern_act_forward(y, x, 5, TERN_ACT_RELU, NULL);
    for (int i = 0; i < 5; i++)
        assert_true(y[i] == (x[i] > 0 ? x[i] : 0));
}

static void test_add_accumulate(void **state)
{
    (void)state;
    test_rng r = {6};
    size_t n = 1000;
    float *a = frandom(&r, n, -1, 1), *b = frandom(&r, n, -1, 1), *y = falloc(n);
    tern_add_forward(y, a, b, n, NULL);
    for (size_t i = 0; i < n; i++)
        assert_true(y[i] == a[i] + b[i]);
    tern_accumulate(a, b, n, NULL);
    assert_memory_equal(a, y, n * sizeof *a);
    free(a), free(b), free(y);
}

/* ---- pooling, channel scale, dropout ----------------------------------------------------- */

typedef struct {
    int n, c;
    size_t hw;
    const float *r; /* weights of the output */
} shape_ctx;

/* Parameters [x (N, HW, C)]; loss = sum over (N, C) of mean_hw(x) * r. */
static double avgpool_loss(const double *p, const void *ctx)
{
    const shape_ctx *k = ctx;
    double loss = 0;
    for (size_t s = 0; s < (size_t)k->n; s++)
        for (size_t j = 0; j < (size_t)k->c; j++) {
            double sum = 0;
            for (size_t i = 0; i < k->hw; i++)
                sum += p[(s * k->hw + i) * k->c + j];
            loss += sum / (double)k->hw * k->r[s * k->c + j];
        }
    return loss;
}

static void test_avgpool(void **state)
{
    (void)state;
    test_rng r = {7};
    int n = 3, c = 70;
    size_t hw = 5, nx = (size_t)n * hw * c, ny = (size_t)n * c;
    float *x = frandom(&r, nx, -2, 2), *y = falloc(ny), *want = falloc(ny);
    tern_avgpool_forward(y, x, n, hw, c, NULL);
    for (size_t s = 0; s < (size_t)n; s++)
        for (size_t j = 0; j < (size_t)c; j++) {
            double sum = 0;
            for (size_t i = 0; i < hw; i++)
                sum += x[(s * hw + i) * c + j];
            want[s * c + j] = (float)(sum / (double)hw);
        }
    assert_close("avgpool forward", y, want, ny, 1e-6f);

    shape_ctx k = {n, c, hw, frandom(&r, ny, -1, 1)};
    float *dx = falloc(nx);
    tern_avgpool_backward(dx, k.r, n, hw, c, NULL);
    assert_true(check_fd("avgpool backward", dx, x, nx, avgpool_loss, &k, 1e-4, 1e-5f));
    free(x), free(y), free(want), free((float *)k.r), free(dx);
}

/* Parameters [x (N, HW, C), s (N, C)]; loss = sum(x * s * r). */
static double scale_loss(const double *p, const void *ctx)
{
    const shape_ctx *k = ctx;
    size_t c = (size_t)k->c, nx = (size_t)k->n * k->hw * c;
    double loss = 0;
    for (size_t i = 0; i < nx; i++)
        loss += p[i] * p[nx + (i / (k->hw * c)) * c + i % c] * k->r[i];
    return loss;
}

static void test_scale_channels(void **state)
{
    (void)state;
    test_rng r = {8};
    int n = 2, c = 67;
    size_t hw = 4, nx = (size_t)n * hw * c, ns = (size_t)n * c;
    float *x = frandom(&r, nx, -2, 2), *s = frandom(&r, ns, 0, 1), *y = falloc(nx);
    tern_scale_channels_forward(y, x, s, n, hw, c, NULL);
    for (size_t i = 0; i < nx; i++)
        assert_true(y[i] == x[i] * s[(i / (hw * c)) * c + i % c]);

    shape_ctx k = {n, c, hw, frandom(&r, nx, -1, 1)};
    float *p = pack3(x, nx, s, ns, NULL, 0), *g = falloc(nx + ns);
    tern_scale_channels_backward(g, g + nx, k.r, x, s, n, hw, c, NULL);
    assert_true(check_fd("scale backward", g, p, nx + ns, scale_loss, &k, 1e-4, 1e-5f));

    float *ds = falloc(ns);
    tern_scale_channels_backward(NULL, ds, k.r, x, s, n, hw, c, NULL);
    assert_memory_equal(ds, g + nx, ns * sizeof *ds);
    free(x), free(s), free(y), free((float *)k.r), free(p), free(g), free(ds);
}

typedef struct {
    size_t n;
    const float *mask, *r;
} dropout_ctx;

static double dropout_loss(const double *p, const void *ctx)
{
    const dropout_ctx *k = ctx;
    double loss = 0;
    for (size_t i = 0; i < k->n; i++)
        loss += p[i] * k->mask[i] * k->r[i];
    return loss;
}

static void test_dropout(void **state)
{
    (void)state;
    test_rng r = {9};
    size_t n = 100;
    float keep = 1 / (1 - 0.2f), *mask = falloc(n), *y = falloc(n), *dx = falloc(n);
    for (size_t i = 0; i < n; i++)
        mask[i] = test_rng_uniform(&r, 0, 1) < 0.2f ? 0 : keep;
    float *x = frandom(&r, n, -2, 2);
    tern_dropout_forward(y, x, mask, n);
    for (size_t i = 0; i < n; i++)
        assert_true(y[i] == x[i] * mask[i]);
    dropout_ctx k = {n, mask, frandom(&r, n, -1, 1)};
    tern_dropout_backward(dx, k.r, mask, n);
    assert_true(check_fd("dropout backward", dx, x, n, dropout_loss, &k, 1e-4, 1e-5f));
    free(mask), free(y), free(dx), free(x), free((float *)k.r);
}

/* ---- cross entropy ------------------------------------------------------------------------ */

typedef struct {
    int n, k;
    const int32_t *labels;
    double eps;
} ce_ctx;

static double ce_loss(const double *z, const void *ctx)
{
    const ce_ctx *c = ctx;
    double total = 0;
    for (int i = 0; i < c->n; i++) {
        const double *row = z + (size_t)i * c->k;
        double sumexp = 0;
        for (int j = 0; j < c->k; j++)
            sumexp += exp(row[j]);
        for (int j = 0; j < c->k; j++) {
            double target = c->eps / c->k + (j == c->labels[i] ? 1 - c->eps : 0);
            total -= target * (row[j] - log(sumexp));
        }
    }
    return total / c->n;
}

static void test_cross_entropy_values(void **state)
{
    (void)state;
    /* equal logits: every log p is -log K, whatever the smoothing */
    float z[12] = {5, 5, 5, 5, 5, 5, -2, -2, -2, -2, -2, -2}, d[12];
    int32_t labels[2] = {1, 5};
    assert_float_equal(tern_cross_entropy(NULL, z, labels, 2, 6, 0), logf(6), 1e-6f);
    assert_float_equal(tern_cross_entropy(d, z, labels, 2, 6, 0.3f), logf(6), 1e-6f);

    /* logits (0, ln 3): p = (1/4, 3/4); label 1, eps 0.2 -> target (0.1, 0.9) */
    float z2[2] = {0, logf(3)}, d2[2] = {99, 99};
    int32_t l2 = 1;
    double want = 0.8 * log(4.0 / 3) + 0.1 * (log(4.0) + log(4.0 / 3));
    assert_float_equal(tern_cross_entropy(d2, z2, &l2, 1, 2, 0.2f), (float)want, 1e-6f);
    assert_float_equal(d2[0], 0.15f, 1e-6f); /* overwritten, not accumulated */
    assert_float_equal(d2[1], -0.15f, 1e-6f);

    /* large logits must not overflow */
    float z3[3] = {1000, 0, -1000};
    int32_t l3 = 0;
    assert_float_equal(tern_cross_entropy(NULL, z3, &l3, 1, 3, 0), 0, 1e-6f);
}

static void test_cross_entropy_fd(void **state)
{
    (void)state;
    test_rng r = {10};
    int n = 3, k = 5;
    int32_t labels[3] = {0, 4, 2};
    float smoothing[] = {0, 0.1f};
    for (size_t t = 0; t < 2; t++) {
        float *z = frandom(&r, (size_t)n * k, -3, 3), *d = frandom(&r, (size_t)n * k, 5, 6);
        ce_ctx c = {n, k, labels, smoothing[t]};
        float loss = tern_cross_entropy(d, z, labels, n, k, smoothing[t]);
        double *zd = dalloc((size_t)n * k);
        to_double(zd, z, (size_t)n * k);
        assert_float_equal(loss, (float)ce_loss(zd, &c), 1e-6f);
        assert_true(check_fd("cross entropy", d, z, (size_t)n * k, ce_loss, &c, 1e-5, 1e-5f));
        assert_float_equal(tern_cross_entropy(NULL, z, labels, n, k, smoothing[t]), loss, 0);
        free(z), free(d), free(zd);
    }
}

/* ---- accumulation ------------------------------------------------------------------------- */

/* Every backward adds to what its gradients held: run once into zeros, once into prefilled
 * buffers, and compare. */
static void test_backward_accumulates(void **state)
{
    (void)state;
    test_rng r = {11};
    int n = 2, c = 8, groups = 2;
    size_t hw = 3, nx = (size_t)n * hw * c, m = (size_t)n * hw;
    float *x = frandom(&r, nx, -4, 4), *dy = frandom(&r, nx, -1, 1);
    float *gamma = frandom(&r, c, 0.5f, 1.5f), *beta = frandom(&r, c, -1, 1);
    float *s = frandom(&r, (size_t)n * c, 0, 1), *y = falloc(nx), *rm = falloc(c);
    /* mean/inv hold per-channel (BN) or per-(sample, group) (GN) statistics */
    float *rv = falloc(c), *mean = falloc(c + m), *inv = falloc(c + m);
    size_t ng = nx + 2 * (size_t)c; /* room for (dx, two per-channel or (N, C) grads) */
    float *g0 = falloc(ng), *g1 = falloc(ng), *pre = frandom(&r, ng, -1, 1), *sum = falloc(ng);

    for (int op = 0; op < 8; op++) {
        memset(g0, 0, ng * sizeof *g0);
        memcpy(g1, pre, ng * sizeof *g1);
        for (int pass = 0; pass < 2; pass++) {
            float *g = pass ? g1 : g0;
            switch (op) {
            case 0:
                tern_batchnorm_forward_train(y, mean, inv, rm, rv, x, gamma, beta, m, c, 1e-3f,
                                             0.1f, NULL);
                tern_batchnorm_backward(g, g + nx, g + nx + c, dy, x, mean, inv, gamma, m, c,
                                        NULL);
                break;
            case 1:
                tern_groupnorm_forward(y, mean, inv, x, gamma, beta, n, hw, c, groups, 1e-5f,
                                       NULL);
                tern_groupnorm_backward(g, g + nx, g + nx + c, dy, x, mean, inv, gamma, n, hw,
                                        c, groups, NULL);
                break;
            case 2: case 3: case 4: case 5:
                tern_act_backward(g, dy, x, nx, (tern_act)(op - 2), NULL);
                break;
            case 6:
                tern_avgpool_backward(g, dy, n, hw, c, NULL);
                tern_scale_channels_backward(g, g + nx, dy, x, s, n, hw, c, NULL);
                break;
            case 7:
                tern_dropout_backward(g, dy, s, (size_t)n * c);
                tern_accumulate(g + nx, dy, 2 * (size_t)c, NULL);
                break;
            }
        }
        for (size_t i = 0; i < ng; i++)
            sum[i] = pre[i] + g0[i];
        assert_true(test_close("accumulate", g1, sum, ng, 1e-6f, 1e-3f));
    }
    free(x), free(dy), free(gamma), free(beta), free(s), free(y), free(rm), free(rv);
    free(mean), free(inv), free(g0), free(g1), free(pre), free(sum);
}

/* TERN_GRAD_SET stores what TERN_GRAD_ADD adds into zeros, never reading the old dx (filled
 * with NaN here); parameter gradients still accumulate. */
static void test_grad_set_mode(void **state)
{
    (void)state;
    test_rng r = {17};
    tern_pool *pools[MAX_POOLS];
    tern_isa isas[MAX_POOLS];
    int threads[MAX_POOLS], np = make_pools(pools, isas, threads);
    const size_t sizes[][3] = {{2, 3, 17}, {4, 196, 72}, {1, 1, 5}, {3, 400, 40}};
    for (int pi = 0; pi < np; pi++)
        for (size_t t = 0; t < sizeof sizes / sizeof *sizes; t++) {
            const int n = (int)sizes[t][0], c = (int)sizes[t][2];
            const size_t hw = sizes[t][1], m = (size_t)n * hw, nx = m * (size_t)c;
            float *x = frandom(&r, nx, -4, 4), *da = frandom(&r, nx, -1, 1);
            float *gamma = frandom(&r, (size_t)c, 0.5f, 1.5f), *beta = frandom(&r, (size_t)c, -1, 1);
            float *s = frandom(&r, (size_t)n * (size_t)c, 0, 1), *y = falloc(nx);
            float *mean = falloc((size_t)c), *inv = falloc((size_t)c), *rm = falloc((size_t)c);
            float *rv = falloc((size_t)c), *set = falloc(nx), *add = falloc(nx);
            const size_t npg = ((size_t)n + 2) * (size_t)c; /* dgamma, dbeta or ds (N, C) */
            float *pg0 = falloc(npg), *pg1 = falloc(npg);
            tern_batchnorm_act_forward_train(y, mean, inv, rm, rv, x, gamma, beta, m, c, 1e-3f,
                                             0.1f, TERN_ACT_HARDSWISH, pools[pi]);
            for (int op = 0; op < 4; op++) {
                for (size_t i = 0; i < nx; i++)
                    set[i] = NAN, add[i] = 0;
                memset(pg0, 0, npg * sizeof *pg0);
                memset(pg1, 0, npg * sizeof *pg1);
                for (int pass = 0; pass < 2; pass++) {
                    float *g = pass ? add : set, *pg = pass ? pg1 : pg0;
                    tern_grad_mode mode = pass ? TERN_GRAD_ADD : TERN_GRAD_SET;
                    switch (op) {
                    case 0:
                        tern_batchnorm_act_backward_mode(g, pg, pg + c, da, x, mean, inv, gamma,
                                                         beta, m, c, TERN_ACT_HARDSWISH, mode,
                                                         pools[pi]);
                        break;
                    case 1: tern_avgpool_backward_mode(g, s, n, hw, c, mode, pools[pi]); break;
                    case 2:
                        tern_scale_channels_backward_mode(g, pg, da, x, s, n, hw, c, mode,
                                                          pools[pi]);
                        break;
                    case 3: tern_accumulate_mode(g, da, nx, mode, pools[pi]); break;
                    }
                }
                for (size_t i = 0; i < nx; i++)
                    if (!(set[i] == add[i])) {
                        print_message("op %d, pool %d, size %zu: element %zu: %g vs %g\n", op,
                                      pi, t, i, (double)set[i], (double)add[i]);
                        fail();
                    }
                assert_memory_equal(pg0, pg1, npg * sizeof *pg0);
            }
            free(x), free(da), free(gamma), free(beta), free(s), free(y), free(mean), free(inv);
            free(rm), free(rv), free(set), free(add), free(pg0), free(pg1);
        }
    destroy_pools(pools, np);
}

/* ---- threads ------------------------------------------------------------------------------ */

/* Every kernel once, forward and backward, with all outputs in one buffer. */
static void run_all(float *out, size_t nout, const float *x, const float *dy, const float *s,
                    const float *gamma, const float *beta, int n, size_t hw, int c,
                    tern_pool *pool)
{
    size_t nx = (size_t)n * hw * c, m = (size_t)n * hw, nc = (size_t)n * c;
    memset(out, 0, nout * sizeof *out);
    float *o = out;
    float *y = o, *mean = (o += nx), *inv = (o += c), *rm = (o += c), *rv = (o += c);
    float *dx = (o += c), *dg = (o += nx), *db = (o += c);
    tern_batchnorm_forward_train(y, mean, inv, rm, rv, x, gamma, beta, m, c, 1e-3f, 0.01f,
                                 pool);
    tern_batchnorm_backward(dx, dg, db, dy, x, mean, inv, gamma, m, c, pool);

    int groups = c % 4 == 0 ? 4 : 1;
    float *gy = (o += c), *gmean = (o += nx), *ginv = (o += (size_t)n * groups);
    float *gdx = (o += (size_t)n * groups), *gdg = (o += nx), *gdb = (o += c);
    tern_groupnorm_forward(gy, gmean, ginv, x, gamma, beta, n, hw, c, groups, 1e-5f, pool);
    tern_groupnorm_backward(gdx, gdg, gdb, dy, x, gmean, ginv, gamma, n, hw, c, groups, pool);

    float *ay = (o += c), *adx = (o += nx), *py = (o += nx), *pdx = (o += nc);
    float *sy = (o += nx), *sdx = (o += nx), *sds = (o += nx), *add = (o += nc);
    tern_act_forward(ay, x, nx, TERN_ACT_HARDSWISH, pool);
    tern_act_backward(adx, dy, x, nx, TERN_ACT_HARDSWISH, pool);
    tern_avgpool_forward(py, x, n, hw, c, pool);
    tern_avgpool_backward(pdx, s, n, hw, c, pool);
    tern_scale_channels_forward(sy, x, s, n, hw, c, pool);
    tern_scale_channels_backward(sdx, sds, dy, x, s, n, hw, c, pool);
    tern_add_forward(add, x, dy, nx, pool);
    tern_accumulate(add, x, nx, pool);
    assert_true((size_t)(add + nx - out) <= nout);
}

static void test_threads_deterministic(void **state)
{
    (void)state;
    test_rng r = {12};
    int n = 2, c = 72; /* above the inline threshold, and more than one channel chunk */
    size_t hw = 24 * 24, nx = (size_t)n * hw * c;
    float *x = frandom(&r, nx, -4, 4), *dy = frandom(&r, nx, -1, 1);
    float *s = frandom(&r, (size_t)n * c, 0, 1), *gamma = frandom(&r, c, 0.5f, 1.5f);
    float *beta = frandom(&r, c, -1, 1);
    size_t nout = 12 * nx + 20 * (size_t)c + 16 * (size_t)n * c;
    float *a = falloc(nout), *b = falloc(nout), *ref = falloc(nout);
    tern_pool *pool = NULL;
    assert_int_equal(tern_pool_create(2, TERN_ISA_AUTO, NULL, &pool), 0);
    run_all(a, nout, x, dy, s, gamma, beta, n, hw, c, pool);
    run_all(b, nout, x, dy, s, gamma, beta, n, hw, c, pool);
    run_all(ref, nout, x, dy, s, gamma, beta, n, hw, c, NULL);
    assert_memory_equal(a, b, nout * sizeof *a);
    assert_true(test_close("threads vs inline", a, ref, nout, 1e-6f, 1e-3f));
    tern_pool_destroy(&pool);
    assert_null(pool);
    free(x), free(dy), free(s), free(gamma), free(beta), free(a), free(b), free(ref);
}

/* Every kernel at every ISA and thread count: bitwise equal to the scalar kernels with the same
 * number of threads, reproducible run to run, close to one scalar thread. */
static void test_isa_bitwise(void **state)
{
    (void)state;
    test_rng r = {14};
    tern_pool *pools[MAX_POOLS];
    tern_isa isas[MAX_POOLS];
    int threads[MAX_POOLS], np = make_pools(pools, isas, threads);
    const int cs[] = {1, 3, 17, 72, 88, 120, 16};
    const size_t hws[] = {1, 5, 600};
    for (size_t ci = 0; ci < sizeof cs / sizeof *cs; ci++)
        for (size_t hi = 0; hi < sizeof hws / sizeof *hws; hi++) {
            int n = 2, c = cs[ci];
            size_t hw = hws[hi], nx = (size_t)n * hw * c;
            float *x = frandom(&r, nx, -4, 4), *dy = frandom(&r, nx, -1, 1);
            float *s = frandom(&r, (size_t)n * c, 0, 1), *gamma = frandom(&r, c, 0.5f, 1.5f);
            float *beta = frandom(&r, c, -1, 1);
            size_t nout = 12 * nx + 20 * (size_t)c + 16 * (size_t)n * c;
            float *ref = falloc(nout), *same = falloc(nout), *a = falloc(nout), *b = falloc(nout);
            run_all(ref, nout, x, dy, s, gamma, beta, n, hw, c, pools[0]);
            for (int p = 0; p < np; p++) {
                run_all(same, nout, x, dy, s, gamma, beta, n, hw, c, pools[p % 2]);
                run_all(a, nout, x, dy, s, gamma, beta, n, hw, c, pools[p]);
                run_all(b, nout, x, dy, s, gamma, beta, n, hw, c, pools[p]);
                if (memcmp(a, same, nout * sizeof *a))
                    print_error("c=%d hw=%zu isa=%d threads=%d differs from scalar\n", c, hw,
                                (int)isas[p], threads[p]);
                assert_memory_equal(a, same, nout * sizeof *a);
                assert_memory_equal(a, b, nout * sizeof *a);
                assert_true(test_close("isa vs scalar", a, ref, nout, 1e-6f, 1e-3f));
            }
            free(x), free(dy), free(s), free(gamma), free(beta), free(ref), free(same);
            free(a), free(b);
        }
    destroy_pools(pools, np);
}

/* Activations on the values where a vector version could go wrong: kinks, signed zeros,
 * subnormals, infinities, NaN, values whose x * t / 6 rounds differently from x * t * (1/6). */
static void test_act_special_values(void **state)
{
    (void)state;
    test_rng r = {15};
    tern_pool *pools[MAX_POOLS];
    tern_isa isas[MAX_POOLS];
    int threads[MAX_POOLS], np = make_pools(pools, isas, threads);
    const float special[] = {-3, 3, 0, -0.0f, -3.0000002f, -2.9999998f, 2.9999998f, 3.0000002f,
                             1e-40f, -1e-40f, 1e-30f, -1e-30f, 1e30f, -1e30f, INFINITY,
                             -INFINITY, NAN, -NAN, 1.17549435e-38f, 0.1f, -0.1f, 5.9999995f};
    size_t ns = sizeof special / sizeof *special, n = 40000 + 13;
    float *x = falloc(n), *dy = frandom(&r, n, -2, 2);
    for (size_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)test_rng_next(&r);
        float v;
        memcpy(&v, &bits, sizeof v);
        x[i] = i % 3 == 0 ? special[i % ns] : i % 3 == 1 ? test_rng_uniform(&r, -7, 7) : v;
    }
    float *want = falloc(n), *got = falloc(n), *dwant = falloc(n), *dgot = falloc(n);
    for (int act = 0; act < 4; act++)
        for (int p = 0; p < np; p++) {
            tern_act_forward(want, x, n, (tern_act)act, pools[0]);
            tern_act_forward(got, x, n, (tern_act)act, pools[p]);
            memset(dwant, 0, n * sizeof *dwant);
            memset(dgot, 0, n * sizeof *dgot);
            tern_act_backward(dwant, dy, x, n, (tern_act)act, pools[0]);
            tern_act_backward(dgot, dy, x, n, (tern_act)act, pools[p]);
            for (size_t i = 0; i < n; i++)
                if (memcmp(&want[i], &got[i], sizeof *got) ||
                    memcmp(&dwant[i], &dgot[i], sizeof *got)) {
                    print_error("act %d isa %d x=%a: y %a vs %a, dx %a vs %a\n", act,
                                (int)isas[p], x[i], got[i], want[i], dgot[i], dwant[i]);
                    fail();
                }
            /* the scalar definitions PyTorch uses, for finite x, in the pools' floating-point
             * mode (denormals flushed) */
            unsigned fp_mode = tern_flush_denormals_begin();
            for (size_t i = 0; i < n; i++) {
                float v = x[i], t = fminf(fmaxf(v + 3, 0), 6), e;
                if (act == TERN_ACT_HARDSWISH)
                    e = v * t / 6;
                else if (act == TERN_ACT_HARDSIGMOID)
                    e = t / 6;
                else
                    continue;
                if (!isnan(e))
                    assert_memory_equal(&e, &got[i], sizeof e);
            }
            tern_flush_denormals_end(fp_mode);
        }
    free(x), free(dy), free(want), free(got), free(dwant), free(dgot);
    destroy_pools(pools, np);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bn_train_forward_and_running_stats),
        cmocka_unit_test(test_bn_eval),
        cmocka_unit_test(test_bn_backward_fd),
        cmocka_unit_test(test_bn_act_fused),
        cmocka_unit_test(test_groupnorm_forward_and_fd),
        cmocka_unit_test(test_act_forward_and_fd),
        cmocka_unit_test(test_act_kinks),
        cmocka_unit_test(test_add_accumulate),
        cmocka_unit_test(test_avgpool),
        cmocka_unit_test(test_scale_channels),
        cmocka_unit_test(test_dropout),
        cmocka_unit_test(test_cross_entropy_values),
        cmocka_unit_test(test_cross_entropy_fd),
        cmocka_unit_test(test_backward_accumulates),
        cmocka_unit_test(test_grad_set_mode),
        cmocka_unit_test(test_threads_deterministic),
        cmocka_unit_test(test_isa_bitwise),
        cmocka_unit_test(test_act_special_values),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
