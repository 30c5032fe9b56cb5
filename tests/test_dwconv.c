/* Tests for nn/dwconv.c at every kernel level the CPU has (scalar, AVX2, AVX-512) and with 1
 * and 2 threads: forward with bias and fused activation and backward against the reference
 * conv (tern_conv2d_*_ref with groups == channels, then tern_act_forward) on random shapes;
 * the fused activation bit-identical to the unfused one; accumulation (+=) into pre-filled
 * gradients and NULL gradients; bitwise identical results across runs and thread counts. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nn/kernels.h"
#include "testutil.h"

#define CASES 60
#define TOL 1e-5f

static const tern_act acts[] = {TERN_ACT_NONE, TERN_ACT_RELU, TERN_ACT_HARDSWISH,
                                TERN_ACT_HARDSIGMOID};

static float *alloc_floats(size_t n)
{
    float *p = calloc(n ? n : 1, sizeof *p);
    assert_non_null(p);
    return p;
}

static float *random_floats(test_rng *r, size_t n)
{
    float *p = alloc_floats(n);
    test_fill_uniform(r, p, n, -1, 1);
    return p;
}

/* One random depthwise problem. Mostly MobileNetV3's padding (k-1)/2, sometimes less. */
typedef struct dw_case {
    tern_conv_params p;
    tern_act act;
    size_t nx, ny, nw;
    float *x, *w, *b, *dy; /* b may be NULL */
} dw_case;

static dw_case case_new(test_rng *r)
{
    dw_case c = {0};
    int k = test_rng_int(r, 0, 1) ? 5 : 3, stride = test_rng_int(r, 1, 2);
    int pad = test_rng_int(r, 0, 3) ? (k - 1) / 2 : test_rng_int(r, 0, (k - 1) / 2);
    int lo = k - 2 * pad > 1 ? k - 2 * pad : 1; /* at least one output pixel */
    int ch = test_rng_int(r, 0, 2) ? test_rng_int(r, 1, 40) : test_rng_int(r, 41, 200);
    c.p = (tern_conv_params){.n = test_rng_int(r, 1, 3), .h = test_rng_int(r, lo, 20),
                             .w = test_rng_int(r, lo, 20), .cin = ch, .cout = ch, .k = k,
                             .stride = stride, .pad = pad, .groups = ch};
    tern_conv_params_finish(&c.p);
    c.act = acts[test_rng_int(r, 0, 3)];
    c.nx = (size_t)c.p.n * c.p.h * c.p.w * ch;
    c.ny = (size_t)c.p.n * c.p.oh * c.p.ow * ch;
    c.nw = (size_t)ch * k * k;
    c.x = random_floats(r, c.nx);
    c.w = random_floats(r, c.nw);
    c.b = test_rng_int(r, 0, 2) ? random_floats(r, (size_t)ch) : NULL;
    c.dy = random_floats(r, c.ny);
    return c;
}

static void case_free(dw_case *c)
{
    free(c->x), free(c->w), free(c->b), free(c->dy);
}

static void print_case(const char *what, const dw_case *c, tern_pool *pool)
{
    fprintf(stderr,
            "%s failed (isa %s, threads %d): n=%d h=%d w=%d c=%d k=%d stride=%d pad=%d "
            "oh=%d ow=%d bias=%d act=%d\n",
            what, tern_isa_name(tern_pool_isa(pool)), tern_pool_size(pool), c->p.n, c->p.h,
            c->p.w, c->p.cin, c->p.k, c->p.stride, c->p.pad, c->p.oh, c->p.ow, c->b != NULL,
            (int)c->act);
}

typedef struct grads {
    float *y, *dx, *dw, *db;
} grads;

static void grads_free(grads *g)
{
    free(g->y), free(g->dx), free(g->dw), free(g->db);
}

/* Gradients start from `init` (copied) so accumulation is tested too. */
static grads grads_from(const grads *init, const dw_case *c)
{
    grads g = {alloc_floats(c->ny), alloc_floats(c->nx), alloc_floats(c->nw),
               alloc_floats((size_t)c->p.cin)};
    memcpy(g.dx, init->dx, c->nx * sizeof(float));
    memcpy(g.dw, init->dw, c->nw * sizeof(float));
    memcpy(g.db, init->db, (size_t)c->p.cin * sizeof(float));
    return g;
}

static grads run_ref(const dw_case *c, const grads *init)
{
    grads g = grads_from(init, c);
    tern_conv2d_forward_ref(g.y, c->x, c->w, c->b, &c->p);
    tern_act_forward(g.y, g.y, c->ny, c->act, NULL);
    tern_conv2d_backward_ref(g.dx, g.dw, g.db, c->dy, c->x, c->w, &c->p);
    return g;
}

static grads run_fast(const dw_case *c, const grads *init, tern_pool *pool)
{
    grads g = grads_from(init, c);
    tern_dwconv_forward(g.y, c->x, c->w, c->b, c->act, &c->p, pool);
    tern_dwconv_backward(g.dx, g.dw, g.db, c->dy, c->x, c->w, &c->p, pool);
    return g;
}

/* Values are O(1) (dw, db sum up to N*OH*OW products), so compare relative to max(|want|, 1). */
static bool grads_close(const grads *got, const grads *want, const dw_case *c)
{
    bool ok = test_close("y", got->y, want->y, c->ny, TOL, 1);
    ok &= test_close("dx", got->dx, want->dx, c->nx, TOL, 1);
    ok &= test_close("dw", got->dw, want->dw, c->nw, TOL, 1);
    ok &= test_close("db", got->db, want->db, (size_t)c->p.cin, TOL, 1);
    return ok;
}

static bool grads_equal(const grads *a, const grads *b, const dw_case *c)
{
    return !memcmp(a->y, b->y, c->ny * sizeof(float)) &&
           !memcmp(a->dx, b->dx, c->nx * sizeof(float)) &&
           !memcmp(a->dw, b->dw, c->nw * sizeof(float)) &&
           !memcmp(a->db, b->db, (size_t)c->p.cin * sizeof(float));
}

/* Every level this CPU runs, each with 1 and 2 threads: pools[level][threads - 1]. */
typedef struct pools {
    int count;
    tern_pool *pool[3][2];
} pools;

static pools pools_create(void)
{
    pools ps = {0};
    for (int isa = TERN_ISA_SCALAR; isa <= TERN_ISA_AVX512; isa++) {
        if (tern_isa_resolve((tern_isa)isa) != (tern_isa)isa)
            continue;
        for (int t = 0; t < 2; t++) {
            assert_int_equal(tern_pool_create(t + 1, (tern_isa)isa, NULL, &ps.pool[ps.count][t]),
                             TERN_OK);
            assert_int_equal(tern_pool_isa(ps.pool[ps.count][t]), isa);
        }
        ps.count++;
    }
    return ps;
}

static void pools_destroy(pools *ps)
{
    for (int i = 0; i < ps->count; i++)
        for (int t = 0; t < 2; t++)
            tern_pool_destroy(&ps->pool[i][t]);
}

/* Random shapes at every level and thread count against the reference, starting from
 * pre-filled gradients; the two thread counts must agree bitwise. */
static void test_random_vs_reference(void **state)
{
    (void)state;
    test_rng rng = {11};
    pools ps = pools_create();
    for (int i = 0; i < CASES; i++) {
        dw_case c = case_new(&rng);
        grads init = {NULL, random_floats(&rng, c.nx), random_floats(&rng, c.nw),
                      random_floats(&rng, (size_t)c.p.cin)};
        grads want = run_ref(&c, &init);
        for (int l = 0; l < ps.count; l++) {
            grads one = run_fast(&c, &init, ps.pool[l][0]);
            grads two = run_fast(&c, &init, ps.pool[l][1]);
            if (!grads_close(&one, &want, &c)) {
                print_case("fast vs reference", &c, ps.pool[l][0]);
                fail();
            }
            if (!grads_equal(&one, &two, &c)) {
                print_case("1 vs 2 threads bitwise", &c, ps.pool[l][1]);
                fail();
            }
            grads_free(&one);
            grads_free(&two);
        }
        grads_free(&want);
        grads_free(&init);
        case_free(&c);
    }
    pools_destroy(&ps);
}

/* MobileNetV3 shapes: channel counts that are not multiples of 16, 1x1..7x7 maps. */
static void test_mobilenet_shapes(void **state)
{
    (void)state;
    static const int shapes[][4] = {/* hw, c, k, stride */
                                    {7, 72, 3, 2},  {4, 88, 3, 1},   {2, 96, 5, 2},
                                    {1, 240, 5, 1}, {3, 120, 5, 1},  {7, 184, 3, 1},
                                    {2, 200, 3, 1}, {1, 480, 3, 1},  {7, 576, 5, 1},
                                    {4, 672, 5, 2}, {1, 960, 5, 1},  {9, 16, 3, 2}};
    test_rng rng = {5};
    pools ps = pools_create();
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        dw_case c = case_new(&rng); /* random buffers replaced below */
        case_free(&c);
        const int hw = shapes[i][0], ch = shapes[i][1], k = shapes[i][2];
        c.p = (tern_conv_params){.n = 1 + (int)(i % 2), .h = hw, .w = hw, .cin = ch, .cout = ch,
                                 .k = k, .stride = shapes[i][3], .pad = (k - 1) / 2,
                                 .groups = ch};
        tern_conv_params_finish(&c.p);
        c.act = acts[i % 4];
        c.nx = (size_t)c.p.n * hw * hw * ch;
        c.ny = (size_t)c.p.n * c.p.oh * c.p.ow * ch;
        c.nw = (size_t)ch * k * k;
        c.x = random_floats(&rng, c.nx);
        c.w = random_floats(&rng, c.nw);
        c.b = random_floats(&rng, (size_t)ch);
        c.dy = random_floats(&rng, c.ny);
        grads init = {NULL, alloc_floats(c.nx), alloc_floats(c.nw), alloc_floats((size_t)ch)};
        grads want = run_ref(&c, &init);
        for (int l = 0; l < ps.count; l++)
            for (int t = 0; t < 2; t++) {
                grads got = run_fast(&c, &init, ps.pool[l][t]);
                if (!grads_close(&got, &want, &c)) {
                    print_case("MobileNetV3 shape vs reference", &c, ps.pool[l][t]);
                    fail();
                }
                grads_free(&got);
            }
        grads_free(&want);
        grads_free(&init);
        case_free(&c);
    }
    pools_destroy(&ps);
}

/* The activation fused into the store equals conv (act NONE) followed by tern_act_forward,
 * bit for bit, at every level. */
static void test_fused_activation_bitwise(void **state)
{
    (void)state;
    test_rng rng = {23};
    pools ps = pools_create();
    for (int i = 0; i < 20; i++) {
        dw_case c = case_new(&rng);
        for (int l = 0; l < ps.count; l++)
            for (size_t a = 0; a < 4; a++) {
                float *fused = alloc_floats(c.ny), *plain = alloc_floats(c.ny);
                tern_dwconv_forward(fused, c.x, c.w, c.b, acts[a], &c.p, ps.pool[l][1]);
                tern_dwconv_forward(plain, c.x, c.w, c.b, TERN_ACT_NONE, &c.p, ps.pool[l][1]);
                tern_act_forward(plain, plain, c.ny, acts[a], NULL);
                if (memcmp(fused, plain, c.ny * sizeof(float))) {
                    c.act = acts[a];
                    print_case("fused activation bitwise", &c, ps.pool[l][1]);
                    fail();
                }
                free(fused), free(plain);
            }
        case_free(&c);
    }
    pools_destroy(&ps);
}

/* NULL gradients are skipped; each requested one is the same as when all are requested, and
 * repeated runs are bitwise identical. */
static void test_null_gradients_and_repeatability(void **state)
{
    (void)state;
    test_rng rng = {31};
    pools ps = pools_create();
    for (int i = 0; i < 12; i++) {
        dw_case c = case_new(&rng);
        grads zero = {NULL, alloc_floats(c.nx), alloc_floats(c.nw),
                      alloc_floats((size_t)c.p.cin)};
        for (int l = 0; l < ps.count; l++) {
            tern_pool *pool = ps.pool[l][i % 2];
            grads all = run_fast(&c, &zero, pool), again = run_fast(&c, &zero, pool);
            if (!grads_equal(&all, &again, &c)) {
                print_case("repeatability", &c, pool);
                fail();
            }
            for (int mask = 0; mask < 8; mask++) {
                grads g = grads_from(&zero, &c);
                tern_dwconv_backward(mask & 1 ? g.dx : NULL, mask & 2 ? g.dw : NULL,
                                     mask & 4 ? g.db : NULL, c.dy, c.x, c.w, &c.p, pool);
                bool ok = !memcmp(g.dx, mask & 1 ? all.dx : zero.dx, c.nx * sizeof(float)) &&
                          !memcmp(g.dw, mask & 2 ? all.dw : zero.dw, c.nw * sizeof(float)) &&
                          !memcmp(g.db, mask & 4 ? all.db : zero.db,
                                  (size_t)c.p.cin * sizeof(float));
                if (!ok) {
                    fprintf(stderr, "gradient mask %d\n", mask);
                    print_case("NULL gradients", &c, pool);
                    fail();
                }
                grads_free(&g);
            }
            grads_free(&all);
            grads_free(&again);
        }
        grads_free(&zero);
        case_free(&c);
    }
    pools_destroy(&ps);
}

/* A NULL pool runs the best level on the calling thread, like a one-thread pool at that level. */
static void test_null_pool(void **state)
{
    (void)state;
    test_rng rng = {41};
    tern_pool *pool = NULL;
    assert_int_equal(tern_pool_create(1, TERN_ISA_AUTO, NULL, &pool), TERN_OK);
    for (int i = 0; i < 8; i++) {
        dw_case c = case_new(&rng);
        grads zero = {NULL, alloc_floats(c.nx), alloc_floats(c.nw),
                      alloc_floats((size_t)c.p.cin)};
        grads a = run_fast(&c, &zero, NULL), b = run_fast(&c, &zero, pool);
        if (!grads_equal(&a, &b, &c)) {
            print_case("NULL pool", &c, pool);
            fail();
        }
        grads_free(&a), grads_free(&b), grads_free(&zero);
        case_free(&c);
    }
    tern_pool_destroy(&pool);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_vs_reference),
        cmocka_unit_test(test_mobilenet_shapes),
        cmocka_unit_test(test_fused_activation_bitwise),
        cmocka_unit_test(test_null_gradients_and_repeatability),
        cmocka_unit_test(test_null_pool),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
