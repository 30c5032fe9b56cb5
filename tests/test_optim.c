/* Optimizer, schedule and gradient-clipping tests.
 *
 * The update rules are checked against torch 1.13 (tests/golden/optim.safetensors, made by
 * make_optim_fixtures.py): a 50-float parameter vector stepped five times by each optimizer
 * configuration through the flat-array core (nn/optim_internal.h), parameters after every
 * step and the state after the last compared at 1e-6 relative. tern_optimizer itself is then
 * run on a real model: the same core on the model's blocks, bit for bit, and an Adam reference
 * in double. Also: option validation, allocation failure, the SGD compatibility layer, the
 * schedules against torch's LR schedulers, and clipping against a hand computation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nn/optim_internal.h"
#include "tern.h"
#include "testutil.h"

#define N 50
#define STEPS 5
#define LR_CHANGE_STEP 3
#define SCHED_STEPS 20
#define TOL 1e-6f

/* ---- helpers ------------------------------------------------------------------------------- */

static tern_safetensors *open_fixture(void)
{
    char path[512];
    snprintf(path, sizeof path, "%s/optim.safetensors", test_fixture_dir());
    tern_safetensors *st = NULL;
    tern_error err = {{0}};
    if (tern_safetensors_open(path, NULL, &st, &err) != TERN_OK)
        fail_msg("cannot open fixture: %s (run tests/golden/make_optim_fixtures.py)", err.message);
    return st;
}

/* Copy fixture tensor `name` (F32, `count` elements) into out. */
static void fixture_f32(const tern_safetensors *st, const char *name, float *out, size_t count)
{
    tern_tensor_view v;
    if (tern_safetensors_find(st, name, &v) != TERN_OK)
        fail_msg("fixture has no tensor '%s'", name);
    assert_int_equal(v.dtype, TERN_DTYPE_F32);
    assert_int_equal(v.nbytes, count * sizeof(float));
    memcpy(out, v.data, v.nbytes);
}

static tern_model_options small_options(uint64_t seed)
{
    tern_model_options o = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    o.width_mult = 0.25;
    o.num_classes = 5;
    o.dropout = 0.0f;
    o.seed = seed;
    return o;
}

static tern_model *create_model(const tern_model_options *opt)
{
    tern_model *m = NULL;
    tern_error err = {{0}};
    if (tern_model_create(opt, &m, &err) != TERN_OK)
        fail_msg("tern_model_create: %s", err.message);
    return m;
}

static tern_optimizer *create_optimizer(tern_model *m, const tern_optimizer_options *o)
{
    tern_optimizer *opt = NULL;
    tern_error err = {{0}};
    if (tern_optimizer_create(m, o, &opt, &err) != TERN_OK)
        fail_msg("tern_optimizer_create: %s", err.message);
    return opt;
}

/* ---- 1. the update rules against torch ----------------------------------------------------- */

/* The configurations of make_optim_fixtures.py (CASES), on top of each kind's defaults. */
typedef struct fixture_case {
    const char *name;
    tern_optimizer_kind kind;
    float lr, momentum, dampening, weight_decay;
    bool nesterov;
    float beta1, beta2, eps; /* 0: the default */
    bool amsgrad;
    float alpha;
    bool centered;
} fixture_case;

static const fixture_case CASES[] = {
    {"sgd_momentum", TERN_OPTIMIZER_SGD, .lr = 0.1f, .momentum = 0.9f, .weight_decay = 0.01f},
    {"sgd_nesterov", TERN_OPTIMIZER_SGD, .lr = 0.1f, .momentum = 0.9f, .weight_decay = 0.01f,
     .nesterov = true},
    {"sgd_dampening", TERN_OPTIMIZER_SGD, .lr = 0.1f, .momentum = 0.9f, .dampening = 0.5f},
    {"sgd_plain", TERN_OPTIMIZER_SGD, .lr = 0.1f, .weight_decay = 0.01f},
    {"adam", TERN_OPTIMIZER_ADAM, .lr = 0.01f, .weight_decay = 0.01f},
    {"adam_amsgrad", TERN_OPTIMIZER_ADAM, .lr = 0.01f, .beta1 = 0.8f, .beta2 = 0.99f, .eps = 1e-6f,
     .amsgrad = true},
    {"adamw", TERN_OPTIMIZER_ADAMW, .lr = 0.01f, .weight_decay = 0.1f},
    {"adamw_amsgrad", TERN_OPTIMIZER_ADAMW, .lr = 0.01f, .weight_decay = -1.0f /* default */,
     .amsgrad = true},
    {"rmsprop", TERN_OPTIMIZER_RMSPROP, .lr = 0.01f},
    {"rmsprop_momentum", TERN_OPTIMIZER_RMSPROP, .lr = 0.01f, .momentum = 0.9f,
     .weight_decay = 0.01f},
    {"rmsprop_centered", TERN_OPTIMIZER_RMSPROP, .lr = 0.01f, .alpha = 0.9f, .momentum = 0.5f,
     .centered = true},
};

static tern_optimizer_options case_options(const fixture_case *c)
{
    tern_optimizer_options o = tern_optimizer_options_default(c->kind);
    o.lr = c->lr;
    o.momentum = c->momentum;
    o.dampening = c->dampening;
    if (c->weight_decay >= 0.0f)
        o.weight_decay = c->weight_decay;
    o.nesterov = c->nesterov;
    if (c->beta1 != 0.0f)
        o.beta1 = c->beta1;
    if (c->beta2 != 0.0f)
        o.beta2 = c->beta2;
    if (c->eps != 0.0f)
        o.eps = c->eps;
    o.amsgrad = c->amsgrad;
    if (c->alpha != 0.0f)
        o.alpha = c->alpha;
    o.centered = c->centered;
    tern_optimizer_options canon;
    tern_error err = {{0}};
    if (tern_optim_validate(&o, &canon, &err) != TERN_OK)
        fail_msg("%s: %s", c->name, err.message);
    return canon;
}

static void updates_match_torch(void **state)
{
    (void)state;
    tern_safetensors *st = open_fixture();
    float p0[N], grads[STEPS * N], want[STEPS * N];
    fixture_f32(st, "param0", p0, N);
    fixture_f32(st, "grads", grads, STEPS * N);
    for (size_t c = 0; c < sizeof CASES / sizeof *CASES; c++) {
        tern_optimizer_options o = case_options(&CASES[c]);
        const char *names[TERN_OPTIM_MAX_STATES];
        size_t nstate = tern_optim_state_names(&o, names);
        float p[N], blocks[TERN_OPTIM_MAX_STATES][N] = {{0}};
        float *blockp[TERN_OPTIM_MAX_STATES] = {blocks[0], blocks[1], blocks[2]};
        char name[128], what[160];
        memcpy(p, p0, sizeof p);
        snprintf(name, sizeof name, "%s.params", CASES[c].name);
        fixture_f32(st, name, want, STEPS * N);
        for (int s = 0; s < STEPS; s++) {
            if (s == LR_CHANGE_STEP)
                o.lr *= 0.5f; /* exact, as in the script */
            tern_optim_update(&o, (uint64_t)s + 1, p, grads + s * N, blockp, N);
            snprintf(what, sizeof what, "%s step %d", CASES[c].name, s + 1);
            assert_true(test_close(what, p, want + s * N, N, TOL, 1e-6f));
        }
        /* Same state blocks, same values. */
        size_t in_fixture = 0;
        snprintf(name, sizeof name, "%s.state.", CASES[c].name);
        for (size_t i = 0; i < tern_safetensors_count(st); i++) {
            tern_tensor_view v;
            tern_safetensors_get(st, i, &v);
            in_fixture += strncmp(v.name, name, strlen(name)) == 0;
        }
        if (in_fixture != nstate)
            fail_msg("%s: %zu state blocks, torch has %zu", CASES[c].name, nstate, in_fixture);
        for (size_t k = 0; k < nstate; k++) {
            float ref[N];
            snprintf(name, sizeof name, "%s.state.%s", CASES[c].name, names[k]);
            fixture_f32(st, name, ref, N);
            assert_true(test_close(name, blocks[k], ref, N, TOL, 1e-6f));
        }
    }
    tern_safetensors_close(&st);
}

/* ---- 2. tern_optimizer on a model ---------------------------------------------------------- */

/* tern_optimizer_step is the core update on the model's blocks: same bits as calling it on
 * copies; it counts steps, takes set_lr, leaves gradients alone and marks parameters changed. */
static void optimizer_steps_model(void **state)
{
    (void)state;
    tern_model_options mo = small_options(5);
    tern_model *m = create_model(&mo);
    size_t np = tern_model_param_count(m);
    const tern_optimizer_kind kinds[] = {TERN_OPTIMIZER_SGD, TERN_OPTIMIZER_ADAM,
                                         TERN_OPTIMIZER_ADAMW, TERN_OPTIMIZER_RMSPROP};
    float *p = malloc(np * sizeof(float)), *gcopy = malloc(np * sizeof(float));
    float *blocks = calloc(TERN_OPTIM_MAX_STATES * np, sizeof(float));
    assert_non_null(p);
    assert_non_null(gcopy);
    assert_non_null(blocks);
    for (size_t k = 0; k < sizeof kinds / sizeof *kinds; k++) {
        tern_optimizer_options o = tern_optimizer_options_default(kinds[k]);
        o.momentum = 0.9f;
        o.amsgrad = true;
        o.centered = true;
        o.weight_decay = 0.01f;
        tern_optimizer *opt = create_optimizer(m, &o);
        const tern_optimizer_options *in_force = tern_optimizer_options_of(opt);
        assert_int_equal(in_force->kind, kinds[k]);
        assert_ptr_equal(tern_optimizer_model(opt), m);
        size_t nstate = tern_optimizer_state_count(opt);
        assert_int_equal(nstate, kinds[k] == TERN_OPTIMIZER_SGD ? 1 : 3);
        float *ref_state[TERN_OPTIM_MAX_STATES];
        for (size_t i = 0; i < nstate; i++) {
            const char *name = NULL;
            float *data = NULL;
            size_t count = 0;
            assert_int_equal(tern_optimizer_state_at(opt, i, &name, &data, &count), TERN_OK);
            assert_int_equal(count, np);
            assert_ptr_equal(tern_optimizer_state_find(opt, name), data);
            assert_int_equal((uintptr_t)data % 64, 0);
            for (size_t j = 0; j < np; j++)
                assert_true(data[j] == 0.0f);
            ref_state[i] = blocks + i * np;
        }
        assert_int_equal(tern_optimizer_state_at(opt, nstate, NULL, NULL, NULL), TERN_ERR_INVALID);
        assert_null(tern_optimizer_state_find(opt, "nope"));
        memset(blocks, 0, TERN_OPTIM_MAX_STATES * np * sizeof(float));
        memcpy(p, tern_model_params(m), np * sizeof(float));
        tern_optimizer_options ref_o = *in_force;

        test_rng r = {77 + k};
        for (int s = 0; s < 3; s++) {
            if (s == 2) {
                tern_optimizer_set_lr(opt, 0.003f);
                ref_o.lr = 0.003f;
            }
            tern_optimizer_set_lr(opt, NAN); /* ignored */
            tern_optimizer_set_lr(opt, -1.0f);
            assert_true(tern_optimizer_lr(opt) == ref_o.lr);
            float *g = tern_model_grads(m);
            test_fill_uniform(&r, g, np, -1.0f, 1.0f);
            memcpy(gcopy, g, np * sizeof(float));
            tern_optim_update(&ref_o, (uint64_t)s + 1, p, gcopy, ref_state, np);
            tern_optimizer_step(opt);
            assert_int_equal(tern_optimizer_steps(opt), s + 1);
            assert_memory_equal(tern_model_grads(m), gcopy, np * sizeof(float));
            assert_memory_equal(tern_model_params(m), p, np * sizeof(float));
            for (size_t i = 0; i < nstate; i++) {
                float *data;
                tern_optimizer_state_at(opt, i, NULL, &data, NULL);
                assert_memory_equal(data, ref_state[i], np * sizeof(float));
            }
        }
        tern_optimizer_reset(opt);
        assert_int_equal(tern_optimizer_steps(opt), 0);
        for (size_t i = 0; i < nstate; i++) {
            float *data;
            tern_optimizer_state_at(opt, i, NULL, &data, NULL);
            for (size_t j = 0; j < np; j++)
                assert_true(data[j] == 0.0f);
        }
        tern_optimizer_destroy(&opt);
        assert_null(opt);
    }
    tern_optimizer_destroy(NULL);
    free(p);
    free(gcopy);
    free(blocks);
    tern_model_destroy(&m);
}

/* Adam over a whole model against a double-precision reference of the formula. */
static void adam_matches_double_reference(void **state)
{
    (void)state;
    tern_model_options mo = small_options(6);
    tern_model *m = create_model(&mo);
    size_t np = tern_model_param_count(m);
    double *ref = malloc(np * sizeof(double)), *mom = calloc(np, sizeof(double));
    double *sq = calloc(np, sizeof(double)), *sqmax = calloc(np, sizeof(double));
    assert_non_null(ref);
    assert_non_null(mom);
    assert_non_null(sq);
    assert_non_null(sqmax);
    const float *p = tern_model_params(m);
    for (size_t i = 0; i < np; i++)
        ref[i] = p[i];
    tern_optimizer_options o = tern_optimizer_options_default(TERN_OPTIMIZER_ADAM);
    o.lr = 0.01f;
    o.weight_decay = 0.05f;
    o.amsgrad = true;
    tern_optimizer *opt = create_optimizer(m, &o);
    test_rng r = {99};
    for (int s = 1; s <= 4; s++) {
        float *g = tern_model_grads(m);
        test_fill_uniform(&r, g, np, -1.0f, 1.0f);
        double b1 = o.beta1, b2 = o.beta2;
        for (size_t i = 0; i < np; i++) {
            double gi = g[i] + (double)o.weight_decay * ref[i];
            mom[i] = b1 * mom[i] + (1 - b1) * gi;
            sq[i] = b2 * sq[i] + (1 - b2) * gi * gi;
            sqmax[i] = fmax(sqmax[i], sq[i]);
            double denom = sqrt(sqmax[i]) / sqrt(1 - pow(b2, s)) + o.eps;
            ref[i] -= o.lr / (1 - pow(b1, s)) * mom[i] / denom;
        }
        tern_optimizer_step(opt);
        p = tern_model_params(m);
        for (size_t i = 0; i < np; i++)
            if (!(fabs(p[i] - ref[i]) <= 2e-6 + 2e-6 * fabs(ref[i])))
                fail_msg("step %d, parameter %zu: got %.9g want %.9g", s, i, (double)p[i], ref[i]);
    }
    tern_optimizer_destroy(&opt);
    tern_model_destroy(&m);
    free(ref);
    free(mom);
    free(sq);
    free(sqmax);
}

/* After a step, inference uses the new parameters (the optimizer invalidated the model's folded
 * BatchNorm): its logits equal those of a model given the same state directly. */
static void step_invalidates_model(void **state)
{
    (void)state;
    tern_model_options mo = small_options(8);
    tern_model *a = create_model(&mo), *b = create_model(&mo);
    const int n = 2;
    size_t count = (size_t)n * 32 * 32 * 3;
    float *x = malloc(count * sizeof(float)), la[10], lb[10], before[10];
    assert_non_null(x);
    test_rng r = {5};
    test_fill_uniform(&r, x, count, -1.0f, 1.0f);
    assert_int_equal(tern_model_plan(a, n, 32, 32, false), TERN_OK);
    assert_int_equal(tern_model_plan(b, n, 32, 32, false), TERN_OK);
    assert_int_equal(tern_model_forward(a, before, x, n, false), TERN_OK);

    tern_optimizer *opt = create_optimizer(a, &(tern_optimizer_options){
                                                  .kind = TERN_OPTIMIZER_SGD, .lr = 0.5f});
    test_fill_uniform(&r, tern_model_grads(a), tern_model_param_count(a), -1.0f, 1.0f);
    tern_optimizer_step(opt);
    assert_int_equal(tern_model_forward(a, la, x, n, false), TERN_OK);
    memcpy(tern_model_params(b), tern_model_params(a), tern_model_param_count(a) * sizeof(float));
    tern_model_invalidate(b);
    assert_int_equal(tern_model_forward(b, lb, x, n, false), TERN_OK);
    assert_memory_equal(la, lb, sizeof(float) * (size_t)n * 5);
    assert_true(memcmp(la, before, sizeof(float) * (size_t)n * 5) != 0);
    tern_optimizer_destroy(&opt);
    free(x);
    tern_model_destroy(&a);
    tern_model_destroy(&b);
}

/* ---- 3. options ---------------------------------------------------------------------------- */

static void defaults_and_names(void **state)
{
    (void)state;
    tern_optimizer_options o = tern_optimizer_options_default(TERN_OPTIMIZER_ADAM);
    assert_true(o.lr == 1e-3f && o.beta1 == 0.9f && o.beta2 == 0.999f && o.eps == 1e-8f);
    assert_true(o.weight_decay == 0.0f && !o.amsgrad);
    o = tern_optimizer_options_default(TERN_OPTIMIZER_ADAMW);
    assert_true(o.lr == 1e-3f && o.beta1 == 0.9f && o.beta2 == 0.999f && o.eps == 1e-8f);
    assert_true(o.weight_decay == 1e-2f);
    o = tern_optimizer_options_default(TERN_OPTIMIZER_RMSPROP);
    assert_true(o.lr == 1e-2f && o.alpha == 0.99f && o.eps == 1e-8f && o.momentum == 0.0f &&
                !o.centered);
    o = tern_optimizer_options_default(TERN_OPTIMIZER_SGD);
    assert_true(o.lr > 0.0f && o.momentum == 0.0f && o.weight_decay == 0.0f);

    const tern_optimizer_kind kinds[] = {TERN_OPTIMIZER_SGD, TERN_OPTIMIZER_ADAM,
                                         TERN_OPTIMIZER_ADAMW, TERN_OPTIMIZER_RMSPROP};
    const char *names[] = {"sgd", "adam", "adamw", "rmsprop"};
    for (size_t i = 0; i < 4; i++) {
        tern_optimizer_kind k = (tern_optimizer_kind)99;
        assert_string_equal(tern_optimizer_kind_name(kinds[i]), names[i]);
        assert_int_equal(tern_optimizer_kind_parse(names[i], &k), TERN_OK);
        assert_int_equal(k, kinds[i]);
    }
    tern_optimizer_kind k;
    assert_int_equal(tern_optimizer_kind_parse("Adam", &k), TERN_ERR_INVALID);
    assert_int_equal(tern_optimizer_kind_parse(NULL, &k), TERN_ERR_INVALID);
    assert_string_equal(tern_optimizer_kind_name((tern_optimizer_kind)42), "?");

    /* Fields a kind does not use are dropped. */
    tern_model_options mo = small_options(1);
    tern_model *m = create_model(&mo);
    o = tern_optimizer_options_default(TERN_OPTIMIZER_ADAM);
    o.momentum = 0.9f;
    o.nesterov = true;
    o.alpha = 0.5f;
    tern_optimizer *opt = create_optimizer(m, &o);
    const tern_optimizer_options *in_force = tern_optimizer_options_of(opt);
    assert_true(in_force->momentum == 0.0f && !in_force->nesterov && in_force->alpha == 0.0f);
    assert_true(in_force->beta2 == 0.999f);
    tern_optimizer_destroy(&opt);
    tern_model_destroy(&m);
}

static void rejects_bad_options(void **state)
{
    (void)state;
    tern_model_options mo = small_options(2);
    tern_model *m = create_model(&mo);
    struct {
        const char *what;
        tern_optimizer_options o;
    } cases[24];
    int n = 0;
#define BAD(label, k, field, value)                                                              \
    do {                                                                                         \
        cases[n].what = label;                                                                   \
        cases[n].o = tern_optimizer_options_default(k);                                          \
        cases[n++].o.field = value;                                                              \
    } while (0)
    BAD("sgd lr 0", TERN_OPTIMIZER_SGD, lr, 0.0f);
    BAD("sgd lr inf", TERN_OPTIMIZER_SGD, lr, INFINITY);
    BAD("sgd momentum -1", TERN_OPTIMIZER_SGD, momentum, -1.0f);
    BAD("sgd dampening NaN", TERN_OPTIMIZER_SGD, dampening, NAN);
    BAD("sgd nesterov without momentum", TERN_OPTIMIZER_SGD, nesterov, true);
    BAD("adam lr -1", TERN_OPTIMIZER_ADAM, lr, -1.0f);
    BAD("adam beta1 1", TERN_OPTIMIZER_ADAM, beta1, 1.0f);
    BAD("adam beta1 -0.1", TERN_OPTIMIZER_ADAM, beta1, -0.1f);
    BAD("adam beta2 1", TERN_OPTIMIZER_ADAM, beta2, 1.0f);
    BAD("adam beta2 NaN", TERN_OPTIMIZER_ADAM, beta2, NAN);
    BAD("adam eps -1", TERN_OPTIMIZER_ADAM, eps, -1.0f);
    BAD("adam weight decay -1", TERN_OPTIMIZER_ADAM, weight_decay, -1.0f);
    BAD("adamw weight decay NaN", TERN_OPTIMIZER_ADAMW, weight_decay, NAN);
    BAD("adamw beta2 2", TERN_OPTIMIZER_ADAMW, beta2, 2.0f);
    BAD("rmsprop alpha -1", TERN_OPTIMIZER_RMSPROP, alpha, -1.0f);
    BAD("rmsprop alpha 1.5", TERN_OPTIMIZER_RMSPROP, alpha, 1.5f);
    BAD("rmsprop eps NaN", TERN_OPTIMIZER_RMSPROP, eps, NAN);
    BAD("rmsprop momentum -0.5", TERN_OPTIMIZER_RMSPROP, momentum, -0.5f);
    BAD("unknown kind", TERN_OPTIMIZER_SGD, kind, (tern_optimizer_kind)9);
#undef BAD
    tern_optimizer *const sentinel = (tern_optimizer *)(uintptr_t)0x4321;
    for (int i = 0; i < n; i++) {
        tern_optimizer *opt = sentinel;
        tern_error err = {{0}};
        tern_status s = tern_optimizer_create(m, &cases[i].o, &opt, &err);
        if (s != TERN_ERR_INVALID)
            fail_msg("%s: got %d, want TERN_ERR_INVALID", cases[i].what, s);
        assert_ptr_equal(opt, sentinel);
        if (err.message[0] == '\0')
            fail_msg("%s: no message", cases[i].what);
        assert_int_equal(tern_optimizer_create(m, &cases[i].o, &opt, NULL), TERN_ERR_INVALID);
    }
    tern_optimizer_options o = tern_optimizer_options_default(TERN_OPTIMIZER_ADAM);
    tern_optimizer *opt = NULL;
    assert_int_equal(tern_optimizer_create(NULL, &o, &opt, NULL), TERN_ERR_INVALID);
    assert_int_equal(tern_optimizer_create(m, NULL, &opt, NULL), TERN_ERR_INVALID);
    assert_int_equal(tern_optimizer_create(m, &o, NULL, NULL), TERN_ERR_INVALID);
    assert_null(opt);
    /* Boundaries: beta 0, eps 0, alpha 0 and 1 are accepted as torch accepts them. */
    o.beta1 = 0.0f;
    o.beta2 = 0.0f;
    o.eps = 0.0f;
    opt = create_optimizer(m, &o);
    tern_optimizer_destroy(&opt);
    o = tern_optimizer_options_default(TERN_OPTIMIZER_RMSPROP);
    o.alpha = 1.0f;
    opt = create_optimizer(m, &o);
    tern_optimizer_destroy(&opt);
    tern_model_destroy(&m);
}

static void allocation_failure(void **state)
{
    (void)state;
    test_alloc_state st = {0};
    tern_allocator a = test_failing_allocator(&st);
    tern_model_options mo = small_options(3);
    mo.alloc = &a;
    tern_model *m = create_model(&mo);
    long live = st.live;
    tern_optimizer_options o = tern_optimizer_options_default(TERN_OPTIMIZER_ADAM);
    o.amsgrad = true;
    tern_optimizer *const sentinel = (tern_optimizer *)(uintptr_t)0x8765;
    int failures = 0;
    for (long k = 1;; k++) {
        assert_true(k < 100);
        st.fail_at = st.count + k;
        tern_optimizer *opt = sentinel;
        tern_error err = {{0}};
        tern_status s = tern_optimizer_create(m, &o, &opt, &err);
        if (s == TERN_OK) {
            tern_optimizer_step(opt);
            tern_optimizer_destroy(&opt);
            break;
        }
        assert_int_equal(s, TERN_ERR_NOMEM);
        assert_ptr_equal(opt, sentinel);
        assert_true(err.message[0] != '\0');
        assert_int_equal(st.live, live);
        failures++;
    }
    assert_int_equal(failures, 2); /* the optimizer, then its one state block */
    assert_int_equal(st.live, live);
    st.fail_at = 0;
    tern_model_destroy(&m);
    assert_int_equal(st.live, 0);
}

/* tern_sgd is an SGD tern_optimizer. */
static void sgd_layer(void **state)
{
    (void)state;
    tern_model_options mo = small_options(4);
    tern_model *m = create_model(&mo);
    tern_sgd *sgd = NULL;
    tern_sgd_options so = {.lr = 0.1f, .momentum = 0.9f, .nesterov = true};
    assert_int_equal(tern_sgd_create(m, &so, &sgd, NULL), TERN_OK);
    assert_int_equal(tern_optimizer_options_of(sgd)->kind, TERN_OPTIMIZER_SGD);
    assert_true(tern_optimizer_options_of(sgd)->nesterov);
    assert_ptr_equal(tern_sgd_momentum(sgd), tern_optimizer_state_find(sgd, "momentum_buffer"));
    tern_sgd_set_lr(sgd, 0.2f);
    assert_true(tern_optimizer_lr(sgd) == 0.2f);
    tern_sgd_step(sgd);
    assert_int_equal(tern_optimizer_steps(sgd), 1);
    tern_sgd_destroy(&sgd);
    assert_null(sgd);
    so = (tern_sgd_options){.lr = 0.1f};
    assert_int_equal(tern_sgd_create(m, &so, &sgd, NULL), TERN_OK);
    assert_null(tern_sgd_momentum(sgd));
    assert_int_equal(tern_optimizer_state_count(sgd), 0);
    tern_sgd_destroy(&sgd);
    assert_int_equal(tern_sgd_create(m, NULL, &sgd, NULL), TERN_ERR_INVALID);
    tern_model_destroy(&m);
}

/* ---- 4. schedules -------------------------------------------------------------------------- */

static void schedules_match_torch(void **state)
{
    (void)state;
    /* SCHEDULES of make_optim_fixtures.py */
    const struct {
        const char *name;
        tern_schedule s;
    } cases[] = {
        {"warmup_cosine", {.kind = TERN_SCHEDULE_COSINE, .base_lr = 0.1f, .warmup_steps = 5,
                           .warmup_start_factor = 0.1f, .total_steps = 20, .min_lr = 0.001f}},
        {"cosine", {.kind = TERN_SCHEDULE_COSINE, .base_lr = 0.05f, .total_steps = 20}},
        {"warmup_step", {.kind = TERN_SCHEDULE_STEP, .base_lr = 0.2f, .warmup_steps = 3,
                         .warmup_start_factor = 0.25f, .step_size = 4, .gamma = 0.5f}},
        {"step", {.kind = TERN_SCHEDULE_STEP, .base_lr = 0.1f, .step_size = 6, .gamma = 0.1f}},
        {"warmup_constant", {.kind = TERN_SCHEDULE_CONSTANT, .base_lr = 0.1f, .warmup_steps = 4,
                             .warmup_start_factor = 0.5f}},
    };
    tern_safetensors *st = open_fixture();
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        const tern_schedule *s = &cases[c].s;
        tern_error err = {{0}};
        if (tern_schedule_validate(s, &err) != TERN_OK)
            fail_msg("%s: %s", cases[c].name, err.message);
        char name[64];
        snprintf(name, sizeof name, "sched.%s", cases[c].name);
        tern_tensor_view v;
        assert_int_equal(tern_safetensors_find(st, name, &v), TERN_OK);
        assert_int_equal(v.dtype, TERN_DTYPE_F64);
        assert_int_equal(v.nbytes, SCHED_STEPS * sizeof(double));
        double want[SCHED_STEPS];
        memcpy(want, v.data, sizeof want);
        for (long k = 0; k < SCHED_STEPS; k++) {
            double got = tern_schedule_lr(s, k);
            if (!(fabs(got - want[k]) <= 1e-6 * fabs(want[k])))
                fail_msg("%s step %ld: got %.9g, torch %.9g", cases[c].name, k, got, want[k]);
        }
        assert_true(tern_schedule_lr(s, -5) == tern_schedule_lr(s, 0));
    }
    tern_safetensors_close(&st);
    /* After total_steps the cosine stays at min_lr (torch's would climb back). */
    assert_true(tern_schedule_lr(&cases[0].s, 20) == 0.001f);
    assert_true(tern_schedule_lr(&cases[0].s, 1000) == 0.001f);
    assert_true(tern_schedule_lr(&cases[1].s, 25) == 0.0f);
}

static void schedules_reject_bad_values(void **state)
{
    (void)state;
    const struct {
        const char *what;
        tern_schedule s;
    } cases[] = {
        {"base lr 0", {.kind = TERN_SCHEDULE_CONSTANT}},
        {"base lr NaN", {.kind = TERN_SCHEDULE_CONSTANT, .base_lr = NAN}},
        {"negative warmup", {.kind = TERN_SCHEDULE_CONSTANT, .base_lr = 1, .warmup_steps = -1}},
        {"start factor 0", {.kind = TERN_SCHEDULE_CONSTANT, .base_lr = 1, .warmup_steps = 2}},
        {"start factor 2", {.kind = TERN_SCHEDULE_CONSTANT, .base_lr = 1, .warmup_steps = 2,
                            .warmup_start_factor = 2}},
        {"step size 0", {.kind = TERN_SCHEDULE_STEP, .base_lr = 1, .gamma = 0.5f}},
        {"gamma 0", {.kind = TERN_SCHEDULE_STEP, .base_lr = 1, .step_size = 3}},
        {"cosine total <= warmup", {.kind = TERN_SCHEDULE_COSINE, .base_lr = 1, .warmup_steps = 5,
                                    .warmup_start_factor = 0.1f, .total_steps = 5}},
        {"cosine min > base", {.kind = TERN_SCHEDULE_COSINE, .base_lr = 1, .total_steps = 5,
                               .min_lr = 2}},
        {"unknown kind", {.kind = (tern_schedule_kind)7, .base_lr = 1}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        tern_error err = {{0}};
        if (tern_schedule_validate(&cases[i].s, &err) != TERN_ERR_INVALID)
            fail_msg("%s: accepted", cases[i].what);
        assert_true(err.message[0] != '\0');
    }
    assert_int_equal(tern_schedule_validate(NULL, NULL), TERN_ERR_INVALID);
}

/* ---- 5. clipping --------------------------------------------------------------------------- */

static void clip_grad_norm(void **state)
{
    (void)state;
    tern_model_options mo = small_options(9);
    tern_model *m = create_model(&mo);
    size_t np = tern_model_param_count(m);
    float *g = tern_model_grads(m), *orig = malloc(np * sizeof(float));
    assert_non_null(orig);
    /* Gradient i is (i % 7 - 3) / 64: exact in float, so the squared norm is a sum of integers
     * over 4096 and the hand value below is exact. */
    long long sum = 0;
    for (size_t i = 0; i < np; i++) {
        long v = (long)(i % 7) - 3;
        g[i] = (float)v / 64.0f;
        sum += v * v;
    }
    memcpy(orig, g, np * sizeof(float));
    double norm = sqrt((double)sum) / 64.0;

    /* Above the norm: nothing changes. */
    float got = tern_clip_grad_norm(m, (float)(norm * 2));
    assert_true(got == (float)norm);
    assert_memory_equal(g, orig, np * sizeof(float));

    /* Below: scaled by max / (norm + 1e-6), giving a norm of max. */
    float max_norm = (float)(norm / 4);
    got = tern_clip_grad_norm(m, max_norm);
    assert_true(got == (float)norm);
    float coef = (float)((double)max_norm / (norm + 1e-6));
    double after = 0;
    for (size_t i = 0; i < np; i++) {
        if (g[i] != orig[i] * coef)
            fail_msg("gradient %zu: got %.9g want %.9g", i, (double)g[i], (double)(orig[i] * coef));
        after += (double)g[i] * g[i];
    }
    assert_true(fabs(sqrt(after) - max_norm) <= 1e-5 * max_norm);

    /* A non-finite gradient: reported, nothing scaled. */
    g[10] = INFINITY;
    memcpy(orig, g, np * sizeof(float));
    got = tern_clip_grad_norm(m, 1.0f);
    assert_true(isinf(got));
    assert_memory_equal(g, orig, np * sizeof(float));
    g[10] = NAN;
    assert_true(isnan(tern_clip_grad_norm(m, 1.0f)));

    /* Zero gradients: norm 0, stay zero. */
    tern_model_zero_grad(m);
    assert_true(tern_clip_grad_norm(m, 1.0f) == 0.0f);
    for (size_t i = 0; i < np; i++)
        assert_true(g[i] == 0.0f);
    free(orig);
    tern_model_destroy(&m);
}

/* ---- weight averaging ---------------------------------------------------------------------- */

/* The average follows avg = d avg + (1 - d) p with d = min(decay, (1 + t) / (10 + t)), from a
 * copy of the initial parameters, against a double reference computed here; 12 updates at
 * decay 0.5 cross from the warm-up (t < 8) to the fixed decay. Swapping puts the rounded
 * average in the model, is ignored by updates, and a second swap restores the parameters bit
 * for bit. */
static void ema_tracks_average(void **state)
{
    (void)state;
    tern_model_options mo = small_options(11);
    tern_model *m = create_model(&mo);
    size_t np = tern_model_param_count(m);
    float *p = tern_model_params(m);
    double *ref = malloc(np * sizeof *ref);
    float *last = malloc(np * sizeof *last);
    assert_non_null(ref);
    assert_non_null(last);
    for (size_t i = 0; i < np; i++)
        ref[i] = p[i];
    tern_ema *e = NULL;
    tern_error err = {{0}};
    assert_int_equal(tern_ema_create(m, 0.5, &e, &err), TERN_OK);
    test_rng r = {17};
    for (int t = 0; t < 12; t++) {
        test_fill_uniform(&r, p, np, -1.0f, 1.0f);
        tern_ema_update(e);
        double d = (1.0 + t) / (10.0 + t);
        d = d < 0.5 ? d : 0.5;
        for (size_t i = 0; i < np; i++)
            ref[i] = d * ref[i] + (1.0 - d) * p[i];
    }
    assert_int_equal(tern_ema_updates(e), 12);
    memcpy(last, p, np * sizeof *last);
    tern_ema_swap(e);
    size_t differ = 0;
    for (size_t i = 0; i < np; i++) {
        assert_true(p[i] == (float)ref[i]);
        differ += p[i] != last[i];
    }
    assert_true(differ > np / 2);
    tern_ema_update(e); /* swapped in: ignored */
    assert_int_equal(tern_ema_updates(e), 12);
    tern_ema_swap(e);
    assert_memory_equal(p, last, np * sizeof *last);
    tern_ema_swap(e);
    for (size_t i = 0; i < np; i++)
        assert_true(p[i] == (float)ref[i]);
    tern_ema_destroy(&e);
    assert_null(e);
    tern_ema_destroy(&e);
    tern_ema_destroy(NULL);
    free(ref);
    free(last);
    tern_model_destroy(&m);
}

/* Constant parameters average to themselves; decay 0 makes the average the last parameters. */
static void ema_constant_and_zero_decay(void **state)
{
    (void)state;
    tern_model_options mo = small_options(12);
    tern_model *m = create_model(&mo);
    size_t np = tern_model_param_count(m);
    float *p = tern_model_params(m);
    float *orig = malloc(np * sizeof *orig);
    assert_non_null(orig);
    memcpy(orig, p, np * sizeof *orig);
    tern_ema *e = NULL;
    assert_int_equal(tern_ema_create(m, 0.999, &e, NULL), TERN_OK);
    for (int t = 0; t < 30; t++)
        tern_ema_update(e);
    tern_ema_swap(e);
    assert_memory_equal(p, orig, np * sizeof *orig);
    tern_ema_swap(e);
    tern_ema_destroy(&e);

    assert_int_equal(tern_ema_create(m, 0.0, &e, NULL), TERN_OK);
    test_rng r = {3};
    test_fill_uniform(&r, p, np, -1.0f, 1.0f);
    tern_ema_update(e);
    float *now = malloc(np * sizeof *now);
    assert_non_null(now);
    memcpy(now, p, np * sizeof *now);
    tern_ema_swap(e);
    assert_memory_equal(p, now, np * sizeof *now);
    tern_ema_swap(e);
    tern_ema_destroy(&e);
    free(now);
    free(orig);
    tern_model_destroy(&m);
}

/* The swapped-in average is what inference uses (the model is invalidated): a BatchNorm model's
 * output after the swap equals that of a copy holding the average's values. */
static void ema_swap_invalidates_model(void **state)
{
    (void)state;
    tern_model_options mo = small_options(13);
    tern_model *a = create_model(&mo), *b = create_model(&mo);
    const int n = 2;
    size_t count = (size_t)n * 32 * 32 * 3, np = tern_model_param_count(a);
    float *x = malloc(count * sizeof(float)), la[10], lb[10];
    assert_non_null(x);
    test_rng r = {9};
    test_fill_uniform(&r, x, count, -1.0f, 1.0f);
    assert_int_equal(tern_model_plan(a, n, 32, 32, false), TERN_OK);
    assert_int_equal(tern_model_plan(b, n, 32, 32, false), TERN_OK);
    tern_ema *e = NULL;
    assert_int_equal(tern_ema_create(a, 0.9, &e, NULL), TERN_OK);
    assert_int_equal(tern_model_forward(a, la, x, n, false), TERN_OK); /* folds BatchNorm */
    for (int t = 0; t < 3; t++) {
        test_fill_uniform(&r, tern_model_params(a), np, -0.5f, 0.5f);
        tern_model_invalidate(a);
        tern_ema_update(e);
    }
    assert_int_equal(tern_model_forward(a, la, x, n, false), TERN_OK);
    tern_ema_swap(e);
    memcpy(tern_model_params(b), tern_model_params(a), np * sizeof(float));
    tern_model_invalidate(b);
    assert_int_equal(tern_model_forward(a, la, x, n, false), TERN_OK);
    assert_int_equal(tern_model_forward(b, lb, x, n, false), TERN_OK);
    assert_memory_equal(la, lb, sizeof(float) * (size_t)n * 5);
    tern_ema_destroy(&e);
    free(x);
    tern_model_destroy(&a);
    tern_model_destroy(&b);
}

static void ema_rejects_bad_arguments(void **state)
{
    (void)state;
    tern_model_options mo = small_options(14);
    tern_model *m = create_model(&mo);
    tern_ema *const sentinel = (tern_ema *)(uintptr_t)0x4321;
    const double bad[] = {1.0, -0.1, 2.0, NAN};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        tern_ema *e = sentinel;
        tern_error err = {{0}};
        assert_int_equal(tern_ema_create(m, bad[i], &e, &err), TERN_ERR_INVALID);
        assert_ptr_equal(e, sentinel);
        assert_non_null(strstr(err.message, "decay"));
    }
    tern_ema *e = sentinel;
    assert_int_equal(tern_ema_create(NULL, 0.5, &e, NULL), TERN_ERR_INVALID);
    assert_int_equal(tern_ema_create(m, 0.5, NULL, NULL), TERN_ERR_INVALID);
    assert_ptr_equal(e, sentinel);
    assert_int_equal(tern_ema_updates(NULL), 0);
    tern_ema_update(NULL);
    tern_ema_swap(NULL);
    tern_model_destroy(&m);

    /* allocation failure: the handle, then each of its two blocks */
    test_alloc_state st = {0};
    tern_allocator a = test_failing_allocator(&st);
    mo.alloc = &a;
    m = create_model(&mo);
    long live = st.live;
    int failures = 0;
    for (long k = 1;; k++) {
        assert_true(k < 100);
        st.fail_at = st.count + k;
        e = sentinel;
        tern_error err = {{0}};
        tern_status s = tern_ema_create(m, 0.5, &e, &err);
        if (s == TERN_OK) {
            tern_ema_destroy(&e);
            break;
        }
        assert_int_equal(s, TERN_ERR_NOMEM);
        assert_ptr_equal(e, sentinel);
        assert_int_equal(st.live, live);
        failures++;
    }
    assert_int_equal(failures, 3);
    st.fail_at = 0;
    tern_model_destroy(&m);
    assert_int_equal(st.live, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(updates_match_torch),
        cmocka_unit_test(optimizer_steps_model),
        cmocka_unit_test(adam_matches_double_reference),
        cmocka_unit_test(step_invalidates_model),
        cmocka_unit_test(defaults_and_names),
        cmocka_unit_test(rejects_bad_options),
        cmocka_unit_test(allocation_failure),
        cmocka_unit_test(sgd_layer),
        cmocka_unit_test(schedules_match_torch),
        cmocka_unit_test(schedules_reject_bad_values),
        cmocka_unit_test(clip_grad_norm),
        cmocka_unit_test(ema_tracks_average),
        cmocka_unit_test(ema_constant_and_zero_decay),
        cmocka_unit_test(ema_swap_invalidates_model),
        cmocka_unit_test(ema_rejects_bad_arguments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
