/* Tests for nn/gemm.c: tern_gemm against tern_gemm_ref at every ISA level this CPU runs, with
 * 1 and 2 threads, on random shapes (all transpose combinations, padded leading dimensions,
 * accumulate on and off, bias and each activation) and on MobileNetV3-sized shapes; C is not
 * read when overwriting, padding between rows is never written, and results are bitwise
 * reproducible (also across thread counts). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nn/gemm.h"
#include "testutil.h"

#define TOL 1e-5f

typedef struct gemm_shape {
    size_t m, n, k;
    bool ta, tb, accumulate;
    bool bias;
    tern_act act;
    size_t pad_a, pad_b, pad_c; /* extra floats per row beyond the minimum leading dimension */
} gemm_shape;

static const char *act_name(tern_act act)
{
    switch (act) {
    case TERN_ACT_NONE: return "none";
    case TERN_ACT_RELU: return "relu";
    case TERN_ACT_HARDSWISH: return "hardswish";
    case TERN_ACT_HARDSIGMOID: return "hardsigmoid";
    }
    return "?";
}

static void print_shape(const char *what, const gemm_shape *s, tern_isa isa, int nthreads)
{
    fprintf(stderr,
            "%s failed: isa=%s threads=%d M=%zu N=%zu K=%zu ta=%d tb=%d accumulate=%d bias=%d "
            "act=%s pads=%zu,%zu,%zu\n",
            what, tern_isa_name(isa), nthreads, s->m, s->n, s->k, s->ta, s->tb, s->accumulate,
            s->bias, act_name(s->act), s->pad_a, s->pad_b, s->pad_c);
}

/* Operands of one shape: A, B, bias, and the initial C (random where accumulating, NaN where
 * it must not be read; NaN padding between rows in both cases). */
typedef struct gemm_case {
    gemm_shape s;
    size_t lda, ldb, ldc, na, nb, nc;
    float *a, *b, *bias, *c0;
} gemm_case;

static float *alloc_floats(size_t n)
{
    float *p = malloc((n ? n : 1) * sizeof *p);
    assert_non_null(p);
    return p;
}

static gemm_case case_new(const gemm_shape *s, test_rng *rng)
{
    gemm_case c = {.s = *s};
    const size_t rows_a = s->ta ? s->k : s->m, cols_a = s->ta ? s->m : s->k;
    const size_t rows_b = s->tb ? s->n : s->k, cols_b = s->tb ? s->k : s->n;
    c.lda = cols_a + s->pad_a;
    c.ldb = cols_b + s->pad_b;
    c.ldc = s->n + s->pad_c;
    c.na = rows_a * c.lda;
    c.nb = rows_b * c.ldb;
    c.nc = s->m * c.ldc;
    c.a = alloc_floats(c.na);
    c.b = alloc_floats(c.nb);
    c.c0 = alloc_floats(c.nc);
    test_fill_uniform(rng, c.a, c.na, -1, 1);
    test_fill_uniform(rng, c.b, c.nb, -1, 1);
    for (size_t i = 0; i < s->m; i++)
        for (size_t j = 0; j < c.ldc; j++)
            c.c0[i * c.ldc + j] = j < s->n && s->accumulate ? test_rng_uniform(rng, -1, 1) : NAN;
    if (s->bias) {
        c.bias = alloc_floats(s->n);
        test_fill_uniform(rng, c.bias, s->n, -1, 1);
    }
    return c;
}

static void case_free(gemm_case *c)
{
    free(c->a);
    free(c->b);
    free(c->bias);
    free(c->c0);
}

static float *run(const gemm_case *c, tern_pool *pool, bool ref)
{
    float *out = alloc_floats(c->nc);
    memcpy(out, c->c0, c->nc * sizeof *out);
    const gemm_shape *s = &c->s;
    tern_gemm_epilogue ep = {.bias = c->bias, .act = s->act};
    const tern_gemm_epilogue *epp = s->bias || s->act != TERN_ACT_NONE ? &ep : NULL;
    if (ref)
        tern_gemm_ref(out, c->ldc, c->a, c->lda, s->ta, c->b, c->ldb, s->tb, s->m, s->n, s->k,
                      s->accumulate, epp);
    else
        tern_gemm(out, c->ldc, c->a, c->lda, s->ta, c->b, c->ldb, s->tb, s->m, s->n, s->k,
                  s->accumulate, epp, pool);
    return out;
}

/* Compares rows element by element (padding must stay NaN in both); NaN-safe. */
static int outputs_close(const float *got, const float *want, const gemm_case *c)
{
    float *g = alloc_floats(c->nc), *w = alloc_floats(c->nc);
    int ok = 1;
    for (size_t i = 0; i < c->nc; i++) {
        const bool pad = i % c->ldc >= c->s.n;
        if (pad) {
            ok &= isnan(got[i]) != 0; /* padding never written */
            g[i] = w[i] = 0;
        } else {
            ok &= !isnan(got[i]); /* C never read when overwriting */
            g[i] = got[i];
            w[i] = want[i];
        }
    }
    ok &= test_close("C", g, w, c->nc, TOL, 1);
    free(g);
    free(w);
    return ok;
}

/* One shape at one pool: close to the reference, two runs bitwise equal; returns the output
 * (caller frees) through *out if out is not NULL. */
static int check_shape(const gemm_shape *s, test_rng *rng, tern_pool *pool, float **out)
{
    gemm_case c = case_new(s, rng);
    float *want = run(&c, NULL, true), *got = run(&c, pool, false), *again = run(&c, pool, false);
    int ok = outputs_close(got, want, &c);
    if (!ok)
        print_shape("fast vs reference", s, tern_pool_isa(pool), tern_pool_size(pool));
    if (memcmp(got, again, c.nc * sizeof *got) != 0) {
        print_shape("bitwise reproducibility", s, tern_pool_isa(pool), tern_pool_size(pool));
        ok = 0;
    }
    free(want);
    free(again);
    if (out)
        *out = got;
    else
        free(got);
    case_free(&c);
    return ok;
}

static gemm_shape random_shape(test_rng *r, int max_dim)
{
    gemm_shape s = {
        .m = (size_t)test_rng_int(r, 1, max_dim),
        .n = (size_t)test_rng_int(r, 1, max_dim),
        .k = (size_t)test_rng_int(r, 0, 9) == 0 ? (size_t)test_rng_int(r, 0, 3)
                                                : (size_t)test_rng_int(r, 1, max_dim),
        .ta = test_rng_int(r, 0, 1),
        .tb = test_rng_int(r, 0, 1),
        .accumulate = test_rng_int(r, 0, 1),
        .bias = test_rng_int(r, 0, 1),
        .act = (tern_act)test_rng_int(r, 0, 3),
        .pad_a = test_rng_int(r, 0, 1) ? (size_t)test_rng_int(r, 1, 5) : 0,
        .pad_b = test_rng_int(r, 0, 1) ? (size_t)test_rng_int(r, 1, 5) : 0,
        .pad_c = test_rng_int(r, 0, 1) ? (size_t)test_rng_int(r, 1, 5) : 0,
    };
    /* A third of the cases are GEMV-like (the small-M path). */
    if (test_rng_int(r, 0, 2) == 0)
        s.m = (size_t)test_rng_int(r, 1, 6);
    return s;
}

static const tern_isa isas[] = {TERN_ISA_SCALAR, TERN_ISA_AVX2, TERN_ISA_AVX512};

/* Calls fn for every ISA this CPU supports and 1 and 2 threads. */
static void for_each_pool(void (*fn)(tern_pool *pool, uint64_t seed), uint64_t seed)
{
    for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
        if (tern_isa_resolve(isas[i]) != isas[i]) {
            fprintf(stderr, "  (%s not supported by this CPU: skipped)\n",
                    tern_isa_name(isas[i]));
            continue;
        }
        for (int nthreads = 1; nthreads <= 2; nthreads++) {
            tern_pool *pool = NULL;
            assert_int_equal(tern_pool_create(nthreads, isas[i], NULL, &pool), TERN_OK);
            assert_int_equal(tern_pool_isa(pool), isas[i]);
            fn(pool, seed);
            tern_pool_destroy(&pool);
        }
    }
}

static void random_small(tern_pool *pool, uint64_t seed)
{
    test_rng rng = {seed};
    int failures = 0;
    for (int i = 0; i < 400; i++) {
        gemm_shape s = random_shape(&rng, 70);
        failures += !check_shape(&s, &rng, pool, NULL);
    }
    assert_int_equal(failures, 0);
}

static void test_random_shapes(void **state)
{
    (void)state;
    for_each_pool(random_small, 11);
}

/* Every transpose combination and epilogue on the shapes MobileNetV3 runs, plus blocking
 * boundaries: K across several KC blocks, M across MC blocks, N across NC blocks. */
static void large_shapes(tern_pool *pool, uint64_t seed)
{
    test_rng rng = {seed};
    const size_t dims[][3] = {
        {3136, 72, 24},  /* 56x56 expansion */
        {49, 576, 96},   /* 7x7 projection-sized */
        {49, 96, 576},
        {1, 1024, 576},  /* classifier at batch 1 */
        {3, 1000, 1024},
        {30, 40, 5000},  /* weight-gradient-like long K */
        {13, 2100, 20},  /* N beyond one NC block */
        {250, 33, 300},  /* M beyond one MC block, K beyond one KC block */
    };
    int failures = 0;
    for (size_t d = 0; d < sizeof dims / sizeof dims[0]; d++)
        for (int t = 0; t < 4; t++) {
            gemm_shape s = {.m = dims[d][0], .n = dims[d][1], .k = dims[d][2],
                            .ta = t & 1, .tb = t >> 1, .accumulate = test_rng_int(&rng, 0, 1),
                            .bias = test_rng_int(&rng, 0, 1),
                            .act = (tern_act)test_rng_int(&rng, 0, 3),
                            .pad_c = (size_t)test_rng_int(&rng, 0, 3)};
            failures += !check_shape(&s, &rng, pool, NULL);
        }
    assert_int_equal(failures, 0);
}

static void test_large_shapes(void **state)
{
    (void)state;
    for_each_pool(large_shapes, 12);
}

/* Each activation with and without bias, overwrite and accumulate, on a tile-straddling
 * shape, inputs scaled so that values cross every kink (-3, 0, 3). */
static void epilogues(tern_pool *pool, uint64_t seed)
{
    test_rng rng = {seed};
    int failures = 0;
    for (int act = 0; act < 4; act++)
        for (int flags = 0; flags < 4; flags++)
            for (int t = 0; t < 4; t++) {
                gemm_shape s = {.m = 29, .n = 45, .k = 37, .ta = t & 1, .tb = t >> 1,
                                .accumulate = flags & 1, .bias = flags >> 1,
                                .act = (tern_act)act};
                failures += !check_shape(&s, &rng, pool, NULL);
                s.m = 2; /* small-M path */
                failures += !check_shape(&s, &rng, pool, NULL);
            }
    assert_int_equal(failures, 0);
}

static void test_epilogues(void **state)
{
    (void)state;
    for_each_pool(epilogues, 13);
}

/* Activation values must equal tern_act_forward's bit for bit (same expression order). */
static void act_exact(tern_pool *pool, uint64_t seed)
{
    (void)seed;
    enum { M = 7, N = 40 };
    float a[M], b[N], c[M * N], want[M * N];
    for (int i = 0; i < M; i++)
        a[i] = 1;
    for (int act = 0; act < 4; act++) {
        for (int j = 0; j < N; j++)
            b[j] = -5 + 0.2573f * (float)j; /* includes values near -3, 0 and 3 */
        /* C (M x N) = a (M x 1) b (1 x N): exactly b in every row. */
        tern_gemm_epilogue ep = {NULL, (tern_act)act};
        tern_gemm(c, N, a, 1, false, b, N, false, M, N, 1, false, &ep, pool);
        for (int i = 0; i < M; i++)
            memcpy(want + i * N, b, sizeof b);
        tern_act_forward(want, want, M * N, (tern_act)act, NULL);
        assert_memory_equal(c, want, sizeof c);
    }
}

static void test_act_matches_ops(void **state)
{
    (void)state;
    for_each_pool(act_exact, 14);
}

/* For a fixed ISA, 1 and 2 threads give the same bits (the K order never depends on the split). */
/* The opt-in K split (small C, long K: weight gradients): close to the reference at every ISA
 * and thread count, bitwise repeatable, accumulating or not. */
static void k_split(tern_pool *pool, uint64_t seed)
{
    test_rng r = {seed};
    const size_t shapes[][4] = {{16, 16, 5000, 1}, {30, 20, 3001, 0}, {5, 40, 2500, 1},
                                {72, 24, 4100, 1}};
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++) {
        const size_t M = shapes[i][0], N = shapes[i][1], K = shapes[i][2];
        const bool ta = shapes[i][3] != 0;
        float *a = alloc_floats(M * K), *b = alloc_floats(K * N), *c0 = alloc_floats(M * N);
        float *want = alloc_floats(M * N), *got = alloc_floats(M * N), *again = alloc_floats(M * N);
        test_fill_uniform(&r, a, M * K, -1, 1);
        test_fill_uniform(&r, b, K * N, -1, 1);
        test_fill_uniform(&r, c0, M * N, -1, 1);
        const tern_gemm_fusion fu = {.k_split = true};
        for (int acc = 0; acc < 2; acc++) {
            memcpy(want, c0, M * N * sizeof *want);
            memcpy(got, c0, M * N * sizeof *got);
            memcpy(again, c0, M * N * sizeof *again);
            tern_gemm_ref(want, N, a, ta ? M : K, ta, b, N, false, M, N, K, acc, NULL);
            tern_gemm_fused(got, N, a, ta ? M : K, ta, b, N, false, M, N, K, acc, NULL, &fu, pool);
            tern_gemm_fused(again, N, a, ta ? M : K, ta, b, N, false, M, N, K, acc, NULL, &fu,
                            pool);
            assert_true(test_close("k split", got, want, M * N, 1e-4f, 1));
            assert_memory_equal(got, again, M * N * sizeof *got);
        }
        free(a), free(b), free(c0), free(want), free(got), free(again);
    }
}

static void test_k_split(void **state)
{
    (void)state;
    for_each_pool(k_split, 23);
}

static void test_thread_count_invariance(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
        if (tern_isa_resolve(isas[i]) != isas[i])
            continue;
        tern_pool *one = NULL, *two = NULL;
        assert_int_equal(tern_pool_create(1, isas[i], NULL, &one), TERN_OK);
        assert_int_equal(tern_pool_create(2, isas[i], NULL, &two), TERN_OK);
        test_rng rng = {15};
        for (int c = 0; c < 60; c++) {
            gemm_shape s = random_shape(&rng, c < 50 ? 70 : 400);
            test_rng r1 = rng, r2 = rng;
            float *x = NULL, *y = NULL;
            assert_true(check_shape(&s, &r1, one, &x));
            assert_true(check_shape(&s, &r2, two, &y));
            rng = r1;
            const size_t nc = s.m * (s.n + s.pad_c);
            if (memcmp(x, y, nc * sizeof *x) != 0) {
                print_shape("thread-count invariance", &s, isas[i], 2);
                fail();
            }
            free(x);
            free(y);
        }
        tern_pool_destroy(&one);
        tern_pool_destroy(&two);
    }
}

/* A NULL pool runs the reference; M or N == 0 touch nothing. */
static void test_degenerate(void **state)
{
    (void)state;
    float a[6] = {1, 2, 3, 4, 5, 6}, b[6] = {1, 0, 0, 1, 1, 1}, c[4], want[4];
    tern_gemm(c, 2, a, 3, false, b, 2, false, 2, 2, 3, false, NULL, NULL);
    tern_gemm_ref(want, 2, a, 3, false, b, 2, false, 2, 2, 3, false, NULL);
    assert_memory_equal(c, want, sizeof c);
    assert_float_equal(c[0], 4, 0);
    assert_float_equal(c[3], 11, 0);
    tern_pool *pool = NULL;
    assert_int_equal(tern_pool_create(2, TERN_ISA_AUTO, NULL, &pool), TERN_OK);
    float sentinel[4] = {7, 7, 7, 7};
    memcpy(c, sentinel, sizeof c);
    tern_gemm(c, 2, a, 3, false, b, 2, false, 0, 2, 3, false, NULL, pool);
    tern_gemm(c, 2, a, 3, false, b, 2, false, 2, 0, 3, false, NULL, pool);
    assert_memory_equal(c, sentinel, sizeof c);
    /* K == 0: C = [C +] 0, then the epilogue. */
    float bias[2] = {-1, 2};
    tern_gemm_epilogue ep = {bias, TERN_ACT_RELU};
    tern_gemm(c, 2, a, 3, false, b, 2, false, 2, 2, 0, true, &ep, pool);
    const float k0[4] = {6, 9, 6, 9};
    assert_memory_equal(c, k0, sizeof c);
    tern_pool_destroy(&pool);
}

/* tern_gemm_fused: residual, K scaling and prepacked B against the reference on random shapes
 * (both paths, small M included), and the residual with or without prepacking bit-exact against
 * tern_gemm followed by the add. */
static void fusions(tern_pool *pool, uint64_t seed)
{
    test_rng rng = {seed};
    int failures = 0;
    for (int i = 0; i < 150; i++) {
        gemm_shape s = random_shape(&rng, 80);
        if (i % 3 == 0)
            s.m = (size_t)test_rng_int(&rng, 1, 4);
        gemm_case c = case_new(&s, &rng);
        float *res = alloc_floats(c.nc), *ks = alloc_floats(s.k);
        test_fill_uniform(&rng, res, c.nc, -1, 1);
        test_fill_uniform(&rng, ks, s.k, 0, 1);
        const bool use_res = i % 2 == 0, use_ks = i % 4 < 2, use_packed = i % 3 != 2;
        float *packed = NULL;
        if (use_packed) {
            const tern_isa isa = tern_pool_isa(pool);
            const size_t bytes = (tern_gemm_packed_b_size(s.n, s.k, isa) * sizeof(float) + 64)
                                 / 64 * 64;
            packed = aligned_alloc(64, bytes);
            assert_non_null(packed);
            tern_gemm_pack_b(packed, c.b, c.ldb, s.tb, s.n, s.k, isa);
        }
        tern_gemm_fusion fu = {.residual = use_res ? res : NULL, .k_scale = use_ks ? ks : NULL,
                               .packed_b = packed};
        tern_gemm_epilogue ep = {.bias = c.bias, .act = s.act};
        float *got = alloc_floats(c.nc), *want = alloc_floats(c.nc);
        memcpy(got, c.c0, c.nc * sizeof *got);
        memcpy(want, c.c0, c.nc * sizeof *want);
        tern_gemm_fused(got, c.ldc, c.a, c.lda, s.ta, c.b, c.ldb, s.tb, s.m, s.n, s.k,
                        s.accumulate, &ep, &fu, pool);
        tern_gemm_ref_fused(want, c.ldc, c.a, c.lda, s.ta, c.b, c.ldb, s.tb, s.m, s.n, s.k,
                            s.accumulate, &ep, &fu);
        int ok = outputs_close(got, want, &c);
        if (use_res && !use_ks && s.act == TERN_ACT_NONE) {
            /* Unfused (and packing B per call): the product with bias, then + residual. */
            float *plain = alloc_floats(c.nc);
            memcpy(plain, c.c0, c.nc * sizeof *plain);
            tern_gemm(plain, c.ldc, c.a, c.lda, s.ta, c.b, c.ldb, s.tb, s.m, s.n, s.k,
                      s.accumulate, &ep, pool);
            for (size_t r = 0; r < s.m; r++)
                for (size_t j = 0; j < s.n; j++) {
                    const size_t e = r * c.ldc + j;
                    ok &= memcmp(&got[e], &(float){plain[e] + res[e]}, sizeof(float)) == 0;
                }
            free(plain);
        }
        if (!ok) {
            fprintf(stderr, "  fusion: residual %d k_scale %d packed %d\n", use_res, use_ks,
                    use_packed);
            print_shape("fused vs reference", &s, tern_pool_isa(pool), tern_pool_size(pool));
        }
        failures += !ok;
        free(got);
        free(want);
        free(res);
        free(ks);
        free(packed);
        case_free(&c);
    }
    assert_int_equal(failures, 0);
}

static void test_fusions(void **state)
{
    (void)state;
    for_each_pool(fusions, 29);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_degenerate),
        cmocka_unit_test(test_act_matches_ops),
        cmocka_unit_test(test_random_shapes),
        cmocka_unit_test(test_epilogues),
        cmocka_unit_test(test_fusions),
        cmocka_unit_test(test_large_shapes),
        cmocka_unit_test(test_thread_count_invariance),
        cmocka_unit_test(test_k_split),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
