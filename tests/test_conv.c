/* Tests for nn/conv.c and nn/stemconv.c: hand-computed values for the reference conv, finite
 * differences for the reference conv and linear backward, the dispatching conv (GEMM,
 * depthwise, direct stem, im2col and reference paths, with a fused activation) against the
 * reference on random shapes at every ISA level the CPU runs, accumulation into non-zero
 * gradients, bitwise reproducibility with a thread pool, and the stem's fused bias +
 * activation giving the same bits as the unfused operations. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nn/kernels.h"
#include "testutil.h"

#define CASES 50
#define TOL 1e-5f

static float *alloc_floats(size_t n)
{
    float *p = calloc(n ? n : 1, sizeof *p);
    assert_non_null(p);
    return p;
}

static float *dup_floats(const float *src, size_t n)
{
    float *p = alloc_floats(n);
    memcpy(p, src, n * sizeof *p);
    return p;
}

static tern_conv_params make_params(int n, int h, int w, int cin, int cout, int k, int stride,
                                    int pad, int groups)
{
    tern_conv_params p = {.n = n, .h = h, .w = w, .cin = cin, .cout = cout, .k = k,
                          .stride = stride, .pad = pad, .groups = groups};
    tern_conv_params_finish(&p);
    return p;
}

static void print_params(const char *what, const tern_conv_params *p)
{
    fprintf(stderr,
            "%s failed for n=%d h=%d w=%d cin=%d cout=%d k=%d stride=%d pad=%d groups=%d "
            "(oh=%d ow=%d)\n",
            what, p->n, p->h, p->w, p->cin, p->cout, p->k, p->stride, p->pad, p->groups, p->oh,
            p->ow);
}

/* Random inputs for one conv shape. */
typedef struct {
    tern_conv_params p;
    size_t nx, ny, nw, nb;
    float *x;  /* (N, H, W, Cin) */
    float *w;  /* (Cout, Cin/groups, k, k) */
    float *b;  /* (Cout) or NULL */
    float *dy; /* (N, OH, OW, Cout) */
    tern_act act; /* fused into the forward */
} conv_case;

static conv_case case_new(const tern_conv_params *p, test_rng *rng, int with_bias)
{
    conv_case c = {.p = *p};
    c.nx = (size_t)p->n * p->h * p->w * p->cin;
    c.ny = (size_t)p->n * p->oh * p->ow * p->cout;
    c.nw = (size_t)p->cout * (p->cin / p->groups) * p->k * p->k;
    c.nb = (size_t)p->cout;
    c.x = alloc_floats(c.nx);
    c.w = alloc_floats(c.nw);
    c.dy = alloc_floats(c.ny);
    test_fill_uniform(rng, c.x, c.nx, -1, 1);
    test_fill_uniform(rng, c.w, c.nw, -1, 1);
    test_fill_uniform(rng, c.dy, c.ny, -1, 1);
    if (with_bias) {
        c.b = alloc_floats(c.nb);
        test_fill_uniform(rng, c.b, c.nb, -1, 1);
    }
    c.act = (tern_act)test_rng_int(rng, 0, 3);
    return c;
}

static void case_free(conv_case *c)
{
    free(c->x);
    free(c->w);
    free(c->b);
    free(c->dy);
}

/* Outputs of one forward + backward run. Gradients start from `init` copies if given. */
typedef struct {
    float *y, *dx, *dw, *db;
} conv_result;

static void result_free(conv_result *r)
{
    free(r->y);
    free(r->dx);
    free(r->dw);
    free(r->db);
}

static conv_result run_ref(const conv_case *c)
{
    conv_result r = {alloc_floats(c->ny), alloc_floats(c->nx), alloc_floats(c->nw),
                     alloc_floats(c->nb)};
    tern_conv2d_forward_ref(r.y, c->x, c->w, c->b, &c->p);
    tern_act_forward(r.y, r.y, c->ny, c->act, NULL);
    tern_conv2d_backward_ref(r.dx, r.dw, r.db, c->dy, c->x, c->w, &c->p);
    return r;
}

/* Exactly sized workspace (malloc'd, so AddressSanitizer sees any overrun). */
static float *workspace_for(const tern_conv_params *p, tern_pool *pool)
{
    size_t n = tern_conv2d_workspace_size(p, tern_pool_size(pool));
    assert_true(n < SIZE_MAX / sizeof(float));
    float *ws = malloc(n ? n * sizeof(float) : 1);
    assert_non_null(ws);
    return ws;
}

static conv_result run_fast(const conv_case *c, tern_pool *pool)
{
    conv_result r = {alloc_floats(c->ny), alloc_floats(c->nx), alloc_floats(c->nw),
                     alloc_floats(c->nb)};
    float *ws = workspace_for(&c->p, pool);
    tern_conv2d_forward(r.y, ws, c->x, c->w, c->b, c->act, &c->p, pool);
    /* dx stored over garbage (TERN_GRAD_SET); accumulation is test_backward_accumulates's. */
    for (size_t i = 0; i < c->nx; i++)
        r.dx[i] = NAN;
    tern_conv2d_backward_mode(r.dx, r.dw, r.db, ws, c->dy, c->x, c->w, &c->p, TERN_GRAD_SET,
                              pool);
    free(ws);
    return r;
}

/* Floor 1 on the scale: values are O(1), so tiny outputs are compared absolutely. */
static int results_close(const conv_result *a, const conv_result *b, const conv_case *c)
{
    int ok = test_close("y", a->y, b->y, c->ny, TOL, 1);
    ok &= test_close("dx", a->dx, b->dx, c->nx, TOL, 1);
    ok &= test_close("dw", a->dw, b->dw, c->nw, TOL, 1);
    ok &= test_close("db", a->db, b->db, c->nb, TOL, 1);
    return ok;
}

/* Fast dispatch against the reference for one shape; prints the shape on failure. */
static int check_fast_vs_ref(const tern_conv_params *p, test_rng *rng, tern_pool *pool)
{
    conv_case c = case_new(p, rng, test_rng_int(rng, 0, 3) != 0);
    conv_result want = run_ref(&c), got = run_fast(&c, pool);
    int ok = results_close(&got, &want, &c);
    if (!ok)
        print_params("fast vs reference", p);
    result_free(&want);
    result_free(&got);
    case_free(&c);
    return ok;
}

/* ---- random shape generators, one per dispatch path ------------------------------------------ */

static tern_conv_params random_pointwise(test_rng *r)
{
    return make_params(test_rng_int(r, 1, 3), test_rng_int(r, 1, 9), test_rng_int(r, 1, 9),
                       test_rng_int(r, 1, 40), test_rng_int(r, 1, 40), 1, 1, 0, 1);
}

static tern_conv_params random_depthwise(test_rng *r)
{
    int k = test_rng_int(r, 0, 1) ? 5 : 3, stride = test_rng_int(r, 1, 2);
    int pad = test_rng_int(r, 0, k / 2);
    int lo = k - 2 * pad > 1 ? k - 2 * pad : 1; /* at least one output pixel */
    /* Channel counts cross the 16-channel thread unit and the 64-channel block. */
    int c = test_rng_int(r, 0, 3) == 0 ? test_rng_int(r, 60, 140) : test_rng_int(r, 1, 40);
    return make_params(test_rng_int(r, 1, 3), test_rng_int(r, lo, 11), test_rng_int(r, lo, 11),
                       c, c, k, stride, pad, c);
}

/* The MobileNetV3 stem shapes the direct kernels take: 3x3, stride 2, pad 1, 1..4 input
 * channels, up to 40 output channels (crossing the 8- and 16-channel vectors), odd and even
 * sizes from 1 up. */
static tern_conv_params random_stem(test_rng *r)
{
    return make_params(test_rng_int(r, 1, 3), test_rng_int(r, 1, 40), test_rng_int(r, 1, 40),
                       test_rng_int(r, 1, TERN_STEM_CIN_MAX), test_rng_int(r, 1, 40), 3, 2, 1,
                       1);
}

/* groups == 1 shapes that take the im2col path: half are stems with more input channels than
 * the direct kernels take, half other kernel sizes, strides and paddings. */
static tern_conv_params random_im2col(test_rng *r)
{
    int n = test_rng_int(r, 1, 3), cout = test_rng_int(r, 2, 24);
    if (test_rng_int(r, 0, 1))
        return make_params(n, test_rng_int(r, 1, 13), test_rng_int(r, 1, 13),
                           test_rng_int(r, TERN_STEM_CIN_MAX + 1, 8), cout, 3, 2, 1, 1);
    int k = test_rng_int(r, 1, 4), stride = test_rng_int(r, 1, 3), pad = test_rng_int(r, 0, k - 1);
    if (k == 1 && stride == 1 && pad == 0)
        stride = 2;
    if (k == 3 && stride == 2 && pad == 1)
        pad = 0;
    int lo = k - 2 * pad > 1 ? k - 2 * pad : 1;
    return make_params(n, test_rng_int(r, lo, 9), test_rng_int(r, lo, 9), test_rng_int(r, 1, 8),
                       cout, k, stride, pad, 1);
}

static tern_conv_params random_grouped(test_rng *r)
{
    int k = test_rng_int(r, 0, 1) ? 3 : 1, stride = test_rng_int(r, 1, 2);
    int pad = test_rng_int(r, 0, k / 2);
    int lo = k - 2 * pad > 1 ? k - 2 * pad : 1;
    return make_params(test_rng_int(r, 1, 2), test_rng_int(r, lo, 8), test_rng_int(r, lo, 8),
                       2 * test_rng_int(r, 1, 6), 2 * test_rng_int(r, 1, 6), k, stride, pad, 2);
}

typedef tern_conv_params (*shape_gen)(test_rng *r);

static const tern_isa isas[] = {TERN_ISA_SCALAR, TERN_ISA_AVX2, TERN_ISA_AVX512};
#define NISAS (sizeof isas / sizeof isas[0])

/* No pool (reference GEMMs), then every ISA level this CPU runs with 1 and 2 threads. */
static void check_random_shapes(shape_gen gen, uint64_t seed)
{
    test_rng rng = {seed};
    int failures = 0;
    for (size_t i = 0; i <= NISAS; i++) {
        if (i > 0 && tern_isa_resolve(isas[i - 1]) != isas[i - 1])
            continue;
        for (int nthreads = 1; nthreads <= (i == 0 ? 1 : 2); nthreads++) {
            tern_pool *pool = NULL;
            if (i > 0)
                assert_int_equal(tern_pool_create(nthreads, isas[i - 1], NULL, &pool), TERN_OK);
            for (int c = 0; c < CASES; c++) {
                tern_conv_params p = gen(&rng);
                if (!check_fast_vs_ref(&p, &rng, pool)) {
                    fprintf(stderr, "  (isa %s, %d threads)\n",
                            i ? tern_isa_name(isas[i - 1]) : "none (NULL pool)", nthreads);
                    failures++;
                }
            }
            tern_pool_destroy(&pool);
        }
    }
    assert_int_equal(failures, 0);
}

/* tern_conv2d_forward_stats: the same y as tern_conv2d_forward, and parts that add up to the
 * channel sums of y and y^2 (every part written, including a thread's with no rows). */
static bool check_stats(const tern_conv_params *p, test_rng *rng, tern_pool *pool)
{
    conv_case c = case_new(p, rng, 0);
    const int parts = tern_pool_size(pool);
    const size_t cout = (size_t)p->cout, rows = c.ny / cout;
    float *y0 = alloc_floats(c.ny), *y1 = alloc_floats(c.ny);
    double *stats = malloc((size_t)parts * 2 * cout * sizeof *stats);
    assert_non_null(stats);
    for (size_t i = 0; i < (size_t)parts * 2 * cout; i++)
        stats[i] = NAN;
    tern_conv2d_forward(y0, NULL, c.x, c.w, NULL, TERN_ACT_NONE, p, pool);
    tern_conv2d_forward_stats(y1, stats, c.x, c.w, p, pool);
    bool ok = memcmp(y0, y1, c.ny * sizeof *y0) == 0;
    for (size_t j = 0; j < cout && ok; j++) {
        double s = 0, q = 0, ws = 0, wq = 0, mag = 0;
        for (int t = 0; t < parts; t++)
            s += stats[(size_t)t * 2 * cout + j], q += stats[(size_t)t * 2 * cout + cout + j];
        for (size_t r = 0; r < rows; r++) {
            const double v = y0[r * cout + j];
            ws += v, wq += v * v, mag += fabs(v);
        }
        ok = fabs(s - ws) <= 1e-9 * (mag + 1) && fabs(q - wq) <= 1e-9 * (wq + 1);
    }
    if (!ok)
        print_params("forward_stats", p);
    free(y0), free(y1), free(stats);
    case_free(&c);
    return ok;
}

static void test_forward_stats(void **state)
{
    (void)state;
    test_rng rng = {21};
    shape_gen gens[] = {random_pointwise, random_depthwise};
    int failures = 0;
    for (size_t i = 0; i <= NISAS; i++) {
        if (i > 0 && tern_isa_resolve(isas[i - 1]) != isas[i - 1])
            continue;
        for (int nthreads = 1; nthreads <= (i == 0 ? 1 : 2); nthreads++) {
            tern_pool *pool = NULL;
            if (i > 0)
                assert_int_equal(tern_pool_create(nthreads, isas[i - 1], NULL, &pool), TERN_OK);
            for (size_t g = 0; g < 2; g++)
                for (int k = 0; k < 10; k++) {
                    tern_conv_params p = gens[g](&rng);
                    assert_true(tern_conv2d_has_stats(&p));
                    failures += !check_stats(&p, &rng, pool);
                }
            tern_pool_destroy(&pool);
        }
    }
    assert_int_equal(failures, 0);
}

static void test_pointwise_vs_ref(void **state)
{
    (void)state;
    check_random_shapes(random_pointwise, 1);
}

static void test_depthwise_vs_ref(void **state)
{
    (void)state;
    check_random_shapes(random_depthwise, 2);
}

static void test_im2col_vs_ref(void **state)
{
    (void)state;
    check_random_shapes(random_im2col, 3);
}

static void test_grouped_vs_ref(void **state)
{
    (void)state;
    check_random_shapes(random_grouped, 4);
}

static void test_stem_vs_ref(void **state)
{
    (void)state;
    check_random_shapes(random_stem, 10);
}

/* ---- hand-computed values ------------------------------------------------------------------- */

static void check_forward_both(const float *want, size_t ny, const float *x, const float *w,
                               const float *b, const tern_conv_params *p)
{
    float y[16];
    assert_true(ny <= 16);
    tern_conv2d_forward_ref(y, x, w, b, p);
    for (size_t i = 0; i < ny; i++)
        assert_float_equal(y[i], want[i], 1e-6);
    float *ws = workspace_for(p, NULL);
    memset(y, 0, sizeof y);
    tern_conv2d_forward(y, ws, x, w, b, TERN_ACT_NONE, p, NULL);
    free(ws);
    for (size_t i = 0; i < ny; i++)
        assert_float_equal(y[i], want[i], 1e-5);
}

static void test_known_values(void **state)
{
    (void)state;
    /* 4x4 image 1..16, 3x3 box filter, zero padding 1: sums of each pixel's neighbourhood. */
    float x[16], ones[9];
    for (int i = 0; i < 16; i++)
        x[i] = (float)(i + 1);
    for (int i = 0; i < 9; i++)
        ones[i] = 1;
    tern_conv_params p = make_params(1, 4, 4, 1, 1, 3, 1, 1, 1);
    assert_int_equal(p.oh, 4);
    assert_int_equal(p.ow, 4);
    const float box[16] = {14, 24, 30, 22, 33, 54, 63, 45, 57, 90, 99, 69, 46, 72, 78, 54};
    check_forward_both(box, 16, x, ones, NULL, &p);
    /* Stride 2 keeps every other row and column of that. */
    p = make_params(1, 4, 4, 1, 1, 3, 2, 1, 1);
    assert_int_equal(p.oh, 2);
    const float box_s2[4] = {14, 30, 57, 99};
    check_forward_both(box_s2, 4, x, ones, NULL, &p);

    /* Kernel orientation: w[ky][kx] multiplies x[y+ky][x+kx] (no flip, no transpose). */
    const float x2[4] = {1, 2, 3, 4}, w2[4] = {1, 10, 100, 1000}, b2[1] = {0.5f};
    p = make_params(1, 2, 2, 1, 1, 2, 1, 0, 1);
    const float y2[1] = {4321.5f};
    check_forward_both(y2, 1, x2, w2, b2, &p);

    /* NHWC channels and torchvision's (Cout, Cin/groups, k, k) weights, 1x1 on two pixels:
     * groups 1: y = 2 x0 + 3 x1 and y = -x0 + x1; groups 2: y0 = 2 x0, y1 = 3 x1. */
    const float x3[4] = {1, 10, 2, 20}, w3[4] = {2, 3, -1, 1}, w3g[2] = {2, 3};
    p = make_params(1, 1, 2, 2, 2, 1, 1, 0, 1);
    const float y3[4] = {32, 9, 64, 18};
    check_forward_both(y3, 4, x3, w3, NULL, &p);
    p = make_params(1, 1, 2, 2, 2, 1, 1, 0, 2);
    const float y3g[4] = {2, 30, 4, 60};
    check_forward_both(y3g, 4, x3, w3g, NULL, &p);
}

/* ---- accumulation and NULL gradients ------------------------------------------------------- */

/* Backward on non-zero gradients adds to them; a NULL gradient leaves the others unchanged. */
static void check_accumulates(const tern_conv_params *p, test_rng *rng, tern_pool *pool)
{
    conv_case c = case_new(p, rng, 1);
    conv_result fresh = run_fast(&c, pool);
    float *dx0 = alloc_floats(c.nx), *dw0 = alloc_floats(c.nw), *db0 = alloc_floats(c.nb);
    test_fill_uniform(rng, dx0, c.nx, -1, 1);
    test_fill_uniform(rng, dw0, c.nw, -1, 1);
    test_fill_uniform(rng, db0, c.nb, -1, 1);
    float *dx = dup_floats(dx0, c.nx), *dw = dup_floats(dw0, c.nw), *db = dup_floats(db0, c.nb);
    float *ws = workspace_for(p, pool);

    tern_conv2d_backward(dx, dw, db, ws, c.dy, c.x, c.w, p, pool);
    for (size_t i = 0; i < c.nx; i++)
        fresh.dx[i] += dx0[i];
    for (size_t i = 0; i < c.nw; i++)
        fresh.dw[i] += dw0[i];
    for (size_t i = 0; i < c.nb; i++)
        fresh.db[i] += db0[i];
    int ok = test_close("accumulated dx", dx, fresh.dx, c.nx, TOL, 1);
    ok &= test_close("accumulated dw", dw, fresh.dw, c.nw, TOL, 1);
    ok &= test_close("accumulated db", db, fresh.db, c.nb, TOL, 1);

    /* One gradient at a time, the others NULL: each must match the accumulated result. */
    memcpy(dx, dx0, c.nx * sizeof *dx);
    tern_conv2d_backward(dx, NULL, NULL, ws, c.dy, c.x, c.w, p, pool);
    ok &= test_close("dx alone", dx, fresh.dx, c.nx, TOL, 1);
    memcpy(dw, dw0, c.nw * sizeof *dw);
    tern_conv2d_backward(NULL, dw, NULL, ws, c.dy, c.x, c.w, p, pool);
    ok &= test_close("dw alone", dw, fresh.dw, c.nw, TOL, 1);
    memcpy(db, db0, c.nb * sizeof *db);
    tern_conv2d_backward(NULL, NULL, db, ws, c.dy, c.x, c.w, p, pool);
    ok &= test_close("db alone", db, fresh.db, c.nb, TOL, 1);

    /* The reference accumulates too. */
    memcpy(dx, dx0, c.nx * sizeof *dx);
    memcpy(dw, dw0, c.nw * sizeof *dw);
    memcpy(db, db0, c.nb * sizeof *db);
    tern_conv2d_backward_ref(dx, dw, db, c.dy, c.x, c.w, p);
    ok &= test_close("ref accumulated dx", dx, fresh.dx, c.nx, TOL, 1);
    ok &= test_close("ref accumulated dw", dw, fresh.dw, c.nw, TOL, 1);
    ok &= test_close("ref accumulated db", db, fresh.db, c.nb, TOL, 1);
    if (!ok)
        print_params("accumulation", p);

    free(ws);
    free(dx0);
    free(dw0);
    free(db0);
    free(dx);
    free(dw);
    free(db);
    result_free(&fresh);
    case_free(&c);
    assert_true(ok);
}

static void test_backward_accumulates(void **state)
{
    (void)state;
    test_rng rng = {5};
    shape_gen gens[] = {random_pointwise, random_depthwise, random_im2col, random_grouped,
                        random_stem};
    tern_pool *pool = NULL;
    assert_int_equal(tern_pool_create(1, TERN_ISA_AUTO, NULL, &pool), TERN_OK);
    for (int with_pool = 0; with_pool < 2; with_pool++)
        for (size_t g = 0; g < sizeof gens / sizeof gens[0]; g++)
            for (int i = 0; i < 5; i++) {
                tern_conv_params p = gens[g](&rng);
                check_accumulates(&p, &rng, with_pool ? pool : NULL);
            }
    tern_pool_destroy(&pool);
}

static void test_linear_accumulates(void **state)
{
    (void)state;
    test_rng rng = {6};
    tern_pool *pool = NULL;
    assert_int_equal(tern_pool_create(1, TERN_ISA_AUTO, NULL, &pool), TERN_OK);
    const int n = 5, in = 7, out = 4;
    float x[35], w[28], dy[20], dx[35], dw[28], db[4], dx0[35], dw0[28], db0[4];
    test_fill_uniform(&rng, x, 35, -1, 1);
    test_fill_uniform(&rng, w, 28, -1, 1);
    test_fill_uniform(&rng, dy, 20, -1, 1);
    memset(dx, 0, sizeof dx);
    memset(dw, 0, sizeof dw);
    memset(db, 0, sizeof db);
    tern_linear_backward(dx, dw, db, dy, x, w, n, in, out, pool);
    test_fill_uniform(&rng, dx0, 35, -1, 1);
    test_fill_uniform(&rng, dw0, 28, -1, 1);
    test_fill_uniform(&rng, db0, 4, -1, 1);
    float want_dx[35], want_dw[28], want_db[4];
    for (int i = 0; i < 35; i++)
        want_dx[i] = dx[i] + dx0[i];
    for (int i = 0; i < 28; i++)
        want_dw[i] = dw[i] + dw0[i];
    for (int i = 0; i < 4; i++)
        want_db[i] = db[i] + db0[i];
    tern_linear_backward(dx0, dw0, db0, dy, x, w, n, in, out, pool);
    assert_true(test_close("linear dx", dx0, want_dx, 35, TOL, 1));
    assert_true(test_close("linear dw", dw0, want_dw, 28, TOL, 1));
    assert_true(test_close("linear db", db0, want_db, 4, TOL, 1));
    tern_pool_destroy(&pool);
}

/* ---- finite differences ------------------------------------------------------------------- */

/* loss = sum(y * r), in double from the float outputs. */
static double weighted_sum(const float *y, const float *r, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (double)y[i] * r[i];
    return s;
}

typedef double (*loss_fn)(void *ctx);

/* Central differences of loss with respect to each of v[0..n), against grad. The step used is
 * the one actually stored in float, (v+h) - (v-h), not 2h. */
static int check_fd(const char *what, float *v, size_t n, const float *grad, loss_fn loss,
                    void *ctx)
{
    const float h = 1e-2f;
    float *fd = alloc_floats(n);
    for (size_t i = 0; i < n; i++) {
        float v0 = v[i], vp = v0 + h, vm = v0 - h;
        v[i] = vp;
        double lp = loss(ctx);
        v[i] = vm;
        double lm = loss(ctx);
        v[i] = v0;
        fd[i] = (float)((lp - lm) / ((double)vp - vm));
    }
    int ok = test_close(what, grad, fd, n, 1e-3f, 1);
    free(fd);
    return ok;
}

typedef struct {
    conv_case *c;
    float *y, *r;
} conv_loss_ctx;

static double conv_loss(void *ctx)
{
    conv_loss_ctx *l = ctx;
    tern_conv2d_forward_ref(l->y, l->c->x, l->c->w, l->c->b, &l->c->p);
    return weighted_sum(l->y, l->r, l->c->ny);
}

static void test_conv_ref_gradcheck(void **state)
{
    (void)state;
    const tern_conv_params configs[] = {
        make_params(2, 5, 4, 3, 4, 3, 1, 1, 1), /* plain 3x3 */
        make_params(1, 7, 5, 3, 4, 3, 2, 1, 1), /* the stem: stride 2, odd sizes */
        make_params(1, 6, 5, 4, 6, 3, 2, 1, 2), /* grouped */
        make_params(2, 7, 5, 3, 3, 5, 2, 2, 3), /* depthwise 5x5 */
        make_params(1, 3, 4, 5, 2, 1, 1, 0, 1), /* pointwise */
        make_params(1, 5, 5, 2, 3, 2, 2, 0, 1), /* even kernel, no padding */
    };
    test_rng rng = {7};
    for (size_t i = 0; i < sizeof configs / sizeof configs[0]; i++) {
        conv_case c = case_new(&configs[i], &rng, 1);
        float *r = c.dy; /* dL/dy = r for L = sum(y * r) */
        conv_loss_ctx ctx = {&c, alloc_floats(c.ny), r};
        float *dx = alloc_floats(c.nx), *dw = alloc_floats(c.nw), *db = alloc_floats(c.nb);
        tern_conv2d_backward_ref(dx, dw, db, r, c.x, c.w, &c.p);
        int ok = check_fd("conv dx", c.x, c.nx, dx, conv_loss, &ctx);
        ok &= check_fd("conv dw", c.w, c.nw, dw, conv_loss, &ctx);
        ok &= check_fd("conv db", c.b, c.nb, db, conv_loss, &ctx);
        if (!ok)
            print_params("finite differences", &c.p);
        free(dx);
        free(dw);
        free(db);
        free(ctx.y);
        case_free(&c);
        assert_true(ok);
    }
}

typedef struct {
    float *x, *w, *b, *y, *r;
    int n, in, out;
} linear_loss_ctx;

static double linear_loss(void *ctx)
{
    linear_loss_ctx *l = ctx;
    tern_linear_forward(l->y, l->x, l->w, l->b, l->n, l->in, l->out, NULL);
    return weighted_sum(l->y, l->r, (size_t)l->n * l->out);
}

static void test_linear_gradcheck(void **state)
{
    (void)state;
    enum { N = 3, IN = 6, OUT = 5 };
    test_rng rng = {8};
    float x[N * IN], w[OUT * IN], b[OUT], y[N * OUT], r[N * OUT];
    float dx[N * IN] = {0}, dw[OUT * IN] = {0}, db[OUT] = {0};
    test_fill_uniform(&rng, x, N * IN, -1, 1);
    test_fill_uniform(&rng, w, OUT * IN, -1, 1);
    test_fill_uniform(&rng, b, OUT, -1, 1);
    test_fill_uniform(&rng, r, N * OUT, -1, 1);

    /* Forward against the definition. */
    tern_linear_forward(y, x, w, b, N, IN, OUT, NULL);
    for (int i = 0; i < N; i++)
        for (int o = 0; o < OUT; o++) {
            double s = b[o];
            for (int j = 0; j < IN; j++)
                s += (double)x[i * IN + j] * w[o * IN + j];
            assert_float_equal(y[i * OUT + o], s, 1e-5);
        }
    /* No bias. */
    tern_linear_forward(y, x, w, NULL, N, IN, OUT, NULL);
    double s0 = 0;
    for (int j = 0; j < IN; j++)
        s0 += (double)x[j] * w[j];
    assert_float_equal(y[0], s0, 1e-5);

    linear_loss_ctx ctx = {x, w, b, y, r, N, IN, OUT};
    tern_linear_backward(dx, dw, db, r, x, w, N, IN, OUT, NULL);
    assert_true(check_fd("linear dx", x, N * IN, dx, linear_loss, &ctx));
    assert_true(check_fd("linear dw", w, OUT * IN, dw, linear_loss, &ctx));
    assert_true(check_fd("linear db", b, OUT, db, linear_loss, &ctx));
}

/* ---- threads -------------------------------------------------------------------------------- */

static int results_identical(const conv_result *a, const conv_result *b, const conv_case *c)
{
    return !memcmp(a->y, b->y, c->ny * sizeof(float)) &&
           !memcmp(a->dx, b->dx, c->nx * sizeof(float)) &&
           !memcmp(a->dw, b->dw, c->nw * sizeof(float)) &&
           !memcmp(a->db, b->db, c->nb * sizeof(float));
}

static void check_threads(const tern_conv_params *p, test_rng *rng, tern_pool *pool)
{
    conv_case c = case_new(p, rng, 1);
    conv_result one = run_fast(&c, NULL), a = run_fast(&c, pool), b = run_fast(&c, pool);
    int same = results_identical(&a, &b, &c);
    int close = results_close(&a, &one, &c);
    if (!same)
        print_params("bitwise reproducibility", p);
    if (!close)
        print_params("threads vs one thread", p);
    result_free(&one);
    result_free(&a);
    result_free(&b);
    case_free(&c);
    assert_true(same);
    assert_true(close);
}

/* tern_dwconv_forward_rows: random bands of output rows, in random order, each reading a
 * copy of the input where only the rows it needs are real (the rest NaN), give the bits of
 * the whole forward, at every ISA and thread count. */
static void test_depthwise_rows(void **state)
{
    (void)state;
    test_rng rng = {23};
    for (size_t i = 0; i < NISAS; i++) {
        if (tern_isa_resolve(isas[i]) != isas[i])
            continue;
        for (int nthreads = 1; nthreads <= 2; nthreads++) {
            tern_pool *pool = NULL;
            assert_int_equal(tern_pool_create(nthreads, isas[i], NULL, &pool), TERN_OK);
            for (int t = 0; t < 30; t++) {
                const tern_conv_params p = random_depthwise(&rng);
                conv_case c = case_new(&p, &rng, 1);
                float *want = alloc_floats(c.ny), *got = alloc_floats(c.ny);
                float *xs = alloc_floats(c.nx);
                tern_dwconv_forward(want, c.x, c.w, c.b, c.act, &p, pool);
                const int rows = p.n * p.oh;
                const size_t row_in = (size_t)p.w * (size_t)p.cin;
                for (int r0 = 0; r0 < rows;) {
                    const int step = test_rng_int(&rng, 1, 3);
                    const int r1 = r0 + step < rows ? r0 + step : rows;
                    for (size_t j = 0; j < c.nx; j++)
                        xs[j] = NAN;
                    for (int r = r0; r < r1; r++) { /* the input rows of output row r */
                        const int n = r / p.oh, oy = r % p.oh;
                        for (int ky = 0; ky < p.k; ky++) {
                            const int iy = oy * p.stride - p.pad + ky;
                            if (iy < 0 || iy >= p.h)
                                continue;
                            const size_t at = ((size_t)n * (size_t)p.h + (size_t)iy) * row_in;
                            memcpy(xs + at, c.x + at, row_in * sizeof(float));
                        }
                    }
                    tern_dwconv_forward_rows(got, xs, c.w, c.b, c.act, &p, r0, r1, pool);
                    r0 = r1;
                }
                if (memcmp(want, got, c.ny * sizeof(float)) != 0) {
                    print_params("depthwise rows", &p);
                    fail_msg("isa %s, %d threads", tern_isa_name(isas[i]), nthreads);
                }
                free(want);
                free(got);
                free(xs);
                case_free(&c);
            }
            tern_pool_destroy(&pool);
        }
    }
}

static void test_threads_deterministic(void **state)
{
    (void)state;
    test_rng rng = {9};
    for (int cfg = 0; cfg < 2 * (int)NISAS; cfg++) {
        const tern_isa isa = isas[cfg / 2];
        const int nthreads = 2 + cfg % 2;
        if (tern_isa_resolve(isa) != isa)
            continue;
        tern_pool *pool = NULL;
        assert_int_equal(tern_pool_create(nthreads, isa, NULL, &pool), TERN_OK);
        /* Shapes big enough that every thread gets work on every split. */
        const tern_conv_params fixed[] = {
            make_params(3, 9, 7, 24, 40, 1, 1, 0, 1),    /* pointwise */
            make_params(2, 9, 7, 72, 72, 3, 1, 1, 72),   /* depthwise 3x3 */
            make_params(3, 11, 9, 40, 40, 5, 2, 2, 40),  /* depthwise 5x5 stride 2 */
            make_params(4, 17, 15, 3, 16, 3, 2, 1, 1),   /* stem (direct) */
            make_params(4, 17, 15, 5, 16, 3, 2, 1, 1),   /* > 1 im2col tile per thread */
            make_params(2, 40, 37, 3, 24, 3, 2, 1, 1),   /* stem, masked channel vector */
            make_params(2, 6, 6, 4, 6, 3, 1, 1, 2),      /* grouped (reference) */
        };
        for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
            check_threads(&fixed[i], &rng, pool);
        shape_gen gens[] = {random_pointwise, random_depthwise, random_im2col, random_grouped,
                            random_stem};
        for (size_t g = 0; g < sizeof gens / sizeof gens[0]; g++)
            for (int i = 0; i < 10; i++) {
                tern_conv_params p = gens[g](&rng);
                check_threads(&p, &rng, pool);
            }

        /* Linear: two pooled runs bitwise equal, close to one thread. */
        enum { N = 7, IN = 33, OUT = 19 };
        float x[N * IN], w[OUT * IN], b[OUT], dy[N * OUT];
        test_fill_uniform(&rng, x, N * IN, -1, 1);
        test_fill_uniform(&rng, w, OUT * IN, -1, 1);
        test_fill_uniform(&rng, b, OUT, -1, 1);
        test_fill_uniform(&rng, dy, N * OUT, -1, 1);
        float y[3][N * OUT], dx[3][N * IN], dw[3][OUT * IN], db[3][OUT];
        memset(dx, 0, sizeof dx);
        memset(dw, 0, sizeof dw);
        memset(db, 0, sizeof db);
        for (int run = 0; run < 3; run++) {
            tern_pool *use = run == 0 ? NULL : pool;
            tern_linear_forward(y[run], x, w, b, N, IN, OUT, use);
            tern_linear_backward(dx[run], dw[run], db[run], dy, x, w, N, IN, OUT, use);
        }
        assert_memory_equal(y[1], y[2], sizeof y[1]);
        assert_memory_equal(dx[1], dx[2], sizeof dx[1]);
        assert_memory_equal(dw[1], dw[2], sizeof dw[1]);
        assert_memory_equal(db[1], db[2], sizeof db[1]);
        assert_true(test_close("linear y threads", y[1], y[0], N * OUT, TOL, 1));
        assert_true(test_close("linear dx threads", dx[1], dx[0], N * IN, TOL, 1));
        assert_true(test_close("linear dw threads", dw[1], dw[0], OUT * IN, TOL, 1));
        assert_true(test_close("linear db threads", db[1], db[0], OUT, TOL, 1));
        tern_pool_destroy(&pool);
    }
}

static void test_workspace_size(void **state)
{
    (void)state;
    tern_conv_params pw = make_params(2, 8, 8, 16, 32, 1, 1, 0, 1);
    tern_conv_params dw = make_params(2, 8, 8, 16, 16, 5, 2, 2, 16);
    tern_conv_params im = make_params(2, 8, 8, 5, 16, 3, 2, 1, 1);
    tern_conv_params stem = make_params(2, 8, 8, 3, 16, 3, 2, 1, 1);
    assert_int_equal(tern_conv2d_workspace_size(&pw, 4), 0);
    assert_int_equal(tern_conv2d_workspace_size(&dw, 4), 0);
    /* im2col: shared permuted weights plus one tile per thread. */
    size_t one = tern_conv2d_workspace_size(&im, 1), two = tern_conv2d_workspace_size(&im, 2);
    assert_true(one >= 45 + 2 * 45 * 16);
    assert_true(two > one);
    assert_int_equal(tern_conv2d_workspace_size(&im, 4), one + 3 * (two - one));
    /* Stem: one set of dW + db partials per thread, and the dispatch takes the direct path. */
    assert_true(tern_stemconv_supported(&stem));
    assert_false(tern_stemconv_supported(&im));
    one = tern_conv2d_workspace_size(&stem, 1);
    assert_true(one >= (27 + 1) * 16);
    assert_int_equal(tern_conv2d_workspace_size(&stem, 3), 3 * one);
    assert_int_equal(tern_conv2d_workspace_size(&stem, 3), tern_stemconv_workspace_size(&stem, 3));
}

/* ---- the direct stem ------------------------------------------------------------------------ */

/* y = act(conv + b) fused must equal, bit for bit, the conv alone, then + b, then
 * tern_act_forward (the operation order of the fused GEMM epilogue), at every ISA. */
static void test_stem_fused_bitwise(void **state)
{
    (void)state;
    test_rng rng = {11};
    for (size_t i = 0; i <= NISAS; i++) {
        if (i > 0 && tern_isa_resolve(isas[i - 1]) != isas[i - 1])
            continue;
        tern_pool *pool = NULL;
        if (i > 0)
            assert_int_equal(tern_pool_create(1 + (int)(i % 2), isas[i - 1], NULL, &pool),
                             TERN_OK);
        for (int c = 0; c < 20; c++) {
            tern_conv_params p = random_stem(&rng);
            conv_case cc = case_new(&p, &rng, 1);
            /* Spread the pre-activations over the kinks of every activation. */
            for (size_t j = 0; j < cc.nb; j++)
                cc.b[j] *= 4;
            for (int act = TERN_ACT_NONE; act <= TERN_ACT_HARDSIGMOID; act++) {
                float *fused = alloc_floats(cc.ny), *plain = alloc_floats(cc.ny);
                tern_conv2d_forward(fused, NULL, cc.x, cc.w, cc.b, (tern_act)act, &p, pool);
                tern_conv2d_forward(plain, NULL, cc.x, cc.w, NULL, TERN_ACT_NONE, &p, pool);
                for (size_t j = 0; j < cc.ny; j++)
                    plain[j] = plain[j] + cc.b[j % cc.nb];
                tern_act_forward(plain, plain, cc.ny, (tern_act)act, pool);
                if (memcmp(fused, plain, cc.ny * sizeof *fused)) {
                    print_params("fused epilogue bits", &p);
                    fprintf(stderr, "  (isa %s, act %d)\n",
                            i ? tern_isa_name(isas[i - 1]) : "none", act);
                    fail();
                }
                free(fused);
                free(plain);
            }
            case_free(&cc);
        }
        tern_pool_destroy(&pool);
    }
}

/* Same thread count and ISA: identical bits. The forward and dx do not depend on the thread
 * count at all; dW and db only through the order the per-thread partials are added. */
static void test_stem_deterministic(void **state)
{
    (void)state;
    test_rng rng = {12};
    for (size_t i = 0; i < NISAS; i++) {
        if (tern_isa_resolve(isas[i]) != isas[i])
            continue;
        tern_pool *pools[3] = {NULL, NULL, NULL};
        for (int t = 0; t < 3; t++)
            assert_int_equal(tern_pool_create(t + 1, isas[i], NULL, &pools[t]), TERN_OK);
        for (int c = 0; c < 15; c++) {
            tern_conv_params p = random_stem(&rng);
            conv_case cc = case_new(&p, &rng, 1);
            conv_result base = run_fast(&cc, pools[0]);
            for (int t = 0; t < 3; t++) {
                conv_result a = run_fast(&cc, pools[t]), b = run_fast(&cc, pools[t]);
                if (!results_identical(&a, &b, &cc) ||
                    memcmp(a.y, base.y, cc.ny * sizeof(float)) ||
                    memcmp(a.dx, base.dx, cc.nx * sizeof(float)) ||
                    !results_close(&a, &base, &cc)) {
                    print_params("stem determinism", &p);
                    fprintf(stderr, "  (isa %s, %d threads)\n", tern_isa_name(isas[i]), t + 1);
                    fail();
                }
                result_free(&a);
                result_free(&b);
            }
            result_free(&base);
            case_free(&cc);
        }
        for (int t = 0; t < 3; t++)
            tern_pool_destroy(&pools[t]);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_known_values),
        cmocka_unit_test(test_workspace_size),
        cmocka_unit_test(test_pointwise_vs_ref),
        cmocka_unit_test(test_depthwise_vs_ref),
        cmocka_unit_test(test_im2col_vs_ref),
        cmocka_unit_test(test_grouped_vs_ref),
        cmocka_unit_test(test_stem_vs_ref),
        cmocka_unit_test(test_forward_stats),
        cmocka_unit_test(test_stem_fused_bitwise),
        cmocka_unit_test(test_stem_deterministic),
        cmocka_unit_test(test_backward_accumulates),
        cmocka_unit_test(test_linear_accumulates),
        cmocka_unit_test(test_conv_ref_gradcheck),
        cmocka_unit_test(test_linear_gradcheck),
        cmocka_unit_test(test_depthwise_rows),
        cmocka_unit_test(test_threads_deterministic),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
