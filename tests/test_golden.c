/* Golden tests against torchvision 0.14 (fixtures from tests/golden/make_fixtures.py).
 *
 * For each fixture: load the initial state, then check eval-mode logits, train-mode logits
 * and loss, every parameter gradient, and every parameter and BatchNorm buffer after one SGD
 * step. Tolerances are relative to each tensor's largest magnitude. Run with 1 and 2 threads. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tern.h"
#include "testutil.h"

#define LOGIT_TOL 1e-4f
#define GRAD_TOL 1e-4f
/* Gradients below this fraction of the model's largest gradient are zero but for rounding. */
#define ZERO_GRAD 1e-6f

typedef struct fixture {
    tern_safetensors *st;
    tern_model *model;
    int n, c, h, w, k;
    float *input;   /* (N, H, W, C) */
    int32_t *labels;
    float *logits, *dlogits;
} fixture;

static const float *tensor_f32(const tern_safetensors *st, const char *name, size_t count)
{
    tern_tensor_view v;
    assert_int_equal(tern_safetensors_find(st, name, &v), TERN_OK);
    assert_int_equal(v.dtype, TERN_DTYPE_F32);
    assert_int_equal(v.nbytes, count * sizeof(float));
    return v.data; /* written 8-aligned by the fixture script */
}

static int meta_int(const tern_safetensors *st, const char *key)
{
    const char *v = tern_safetensors_metadata(st, key);
    assert_non_null(v);
    return atoi(v);
}

static float meta_float(const tern_safetensors *st, const char *key)
{
    const char *v = tern_safetensors_metadata(st, key);
    assert_non_null(v);
    return strtof(v, NULL);
}

/* Like test_close, except that when every wanted value is below `zero` the check is only that
 * every value we got is below `zero` too. */
static bool close_or_zero(const char *what, const float *got, const float *want, size_t n,
                          float tol, float zero, float floor)
{
    float scale = 0, ours = 0;
    for (size_t i = 0; i < n; i++) {
        scale = fmaxf(scale, fabsf(want[i]));
        ours = fmaxf(ours, fabsf(got[i]));
    }
    if (scale >= zero)
        return test_close(what, got, want, n, tol, floor);
    if (ours < zero)
        return true;
    fprintf(stderr, "%s: should be zero but for rounding (< %g), got %g\n", what, (double)zero,
            (double)ours);
    return false;
}

static void fixture_open(fixture *f, const char *name, int threads, tern_isa isa)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s.safetensors", test_fixture_dir(), name);
    tern_error err = {{0}};
    memset(f, 0, sizeof *f);
    if (tern_safetensors_open(path, NULL, &f->st, &err) != TERN_OK)
        fail_msg("%s", err.message);
    tern_model_options opt = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    assert_int_equal(tern_model_options_from_metadata(f->st, &opt, &err), TERN_OK);
    opt.dropout = 0.0f;
    opt.threads = threads;
    opt.isa = isa;
    if (tern_model_create(&opt, &f->model, &err) != TERN_OK)
        fail_msg("%s", err.message);
    if (tern_model_load_state(f->model, f->st, "init.", &err) != TERN_OK)
        fail_msg("%s", err.message);

    f->n = meta_int(f->st, "batch");
    f->c = opt.in_channels;
    f->h = meta_int(f->st, "height");
    f->w = meta_int(f->st, "width");
    f->k = opt.num_classes;
    const float *nchw = tensor_f32(f->st, "input", (size_t)f->n * f->c * f->h * f->w);
    f->input = malloc(sizeof(float) * (size_t)f->n * f->c * f->h * f->w);
    for (int i = 0; i < f->n; i++)
        for (int ch = 0; ch < f->c; ch++)
            for (int y = 0; y < f->h; y++)
                for (int x = 0; x < f->w; x++)
                    f->input[(((size_t)i * f->h + y) * f->w + x) * f->c + ch] =
                        nchw[(((size_t)i * f->c + ch) * f->h + y) * f->w + x];
    tern_tensor_view lv;
    assert_int_equal(tern_safetensors_find(f->st, "labels", &lv), TERN_OK);
    assert_int_equal(lv.dtype, TERN_DTYPE_I64);
    f->labels = malloc(sizeof(int32_t) * (size_t)f->n);
    for (int i = 0; i < f->n; i++) {
        int64_t label;
        memcpy(&label, (const char *)lv.data + 8 * (size_t)i, 8);
        f->labels[i] = (int32_t)label;
    }
    f->logits = malloc(sizeof(float) * (size_t)f->n * f->k);
    f->dlogits = malloc(sizeof(float) * (size_t)f->n * f->k);
    assert_int_equal(tern_model_plan(f->model, f->n, f->h, f->w, true), TERN_OK);
}

static void fixture_close(fixture *f)
{
    tern_model_destroy(&f->model);
    tern_safetensors_close(&f->st);
    free(f->input);
    free(f->labels);
    free(f->logits);
    free(f->dlogits);
}

static void check_against_torchvision(const char *name, int threads, tern_isa isa)
{
    fixture f;
    fixture_open(&f, name, threads, isa);
    size_t nk = (size_t)f.n * f.k;
    char what[600];

    /* Eval mode: running statistics. */
    assert_int_equal(tern_model_forward(f.model, f.logits, f.input, f.n, false), TERN_OK);
    snprintf(what, sizeof what, "%s logits_eval", name);
    assert_true(test_close(what, f.logits, tensor_f32(f.st, "logits_eval", nk), nk, LOGIT_TOL, 0));

    /* Train mode: batch statistics, loss, gradients. */
    assert_int_equal(tern_model_forward(f.model, f.logits, f.input, f.n, true), TERN_OK);
    snprintf(what, sizeof what, "%s logits_train", name);
    assert_true(test_close(what, f.logits, tensor_f32(f.st, "logits_train", nk), nk, LOGIT_TOL, 0));
    float loss;
    assert_int_equal(tern_cross_entropy_loss(&loss, f.dlogits, f.logits, f.labels, f.n, f.k,
                                             meta_float(f.st, "label_smoothing")),
                     TERN_OK);
    snprintf(what, sizeof what, "%s loss", name);
    assert_true(test_close(what, &loss, tensor_f32(f.st, "loss", 1), 1, 1e-5f, 0));
    tern_model_zero_grad(f.model);
    assert_int_equal(tern_model_backward(f.model, f.dlogits), TERN_OK);

    /* Some gradients are zero but for rounding: the bias of a norm layer whose output feeds
     * only a 1x1 convolution and a training-mode BatchNorm, which removes any per-channel
     * shift. Both sides must then be tiny next to the model's largest gradient. */
    size_t ntensors = tern_model_tensor_count(f.model), nparams = 0;
    float grad_floor = 0;
    for (size_t i = 0; i < ntensors; i++) {
        char key[256];
        const tern_model_tensor *t = tern_model_tensor_at(f.model, i);
        if (t->kind != TERN_TENSOR_PARAM)
            continue;
        snprintf(key, sizeof key, "grad.%s", t->name);
        const float *want = tensor_f32(f.st, key, t->count);
        for (size_t j = 0; j < t->count; j++)
            grad_floor = fmaxf(grad_floor, ZERO_GRAD * fabsf(want[j]));
    }
    for (size_t i = 0; i < ntensors; i++) {
        const tern_model_tensor *t = tern_model_tensor_at(f.model, i);
        if (t->kind != TERN_TENSOR_PARAM)
            continue;
        char key[256];
        snprintf(key, sizeof key, "grad.%s", t->name);
        snprintf(what, sizeof what, "%s %s", name, key);
        assert_true(close_or_zero(what, t->grad, tensor_f32(f.st, key, t->count), t->count,
                                  GRAD_TOL, grad_floor, 0));
        nparams++;
    }
    assert_true(nparams > 50);

    /* One SGD step with the fixture's hyper-parameters. */
    tern_sgd_options so = {.lr = meta_float(f.st, "lr"), .momentum = meta_float(f.st, "momentum"),
                           .weight_decay = meta_float(f.st, "weight_decay"),
                           .nesterov = meta_int(f.st, "nesterov") != 0};
    tern_sgd *sgd = NULL;
    assert_int_equal(tern_sgd_create(f.model, &so, &sgd, NULL), TERN_OK);
    tern_sgd_step(sgd);
    tern_sgd_destroy(&sgd);
    for (size_t i = 0; i < ntensors; i++) {
        const tern_model_tensor *t = tern_model_tensor_at(f.model, i);
        char key[256];
        snprintf(key, sizeof key, "after.%s", t->name);
        snprintf(what, sizeof what, "%s %s", name, key);
        if (t->kind == TERN_TENSOR_COUNTER) {
            tern_tensor_view v;
            assert_int_equal(tern_safetensors_find(f.st, key, &v), TERN_OK);
            int64_t want;
            memcpy(&want, v.data, 8);
            assert_int_equal(*t->counter, want);
            continue;
        }
        /* The step changes parameters by lr * grad: compare the change, which is where an
         * error would show, relative to its own scale. */
        const float *after = tensor_f32(f.st, key, t->count);
        if (t->kind == TERN_TENSOR_PARAM) {
            char init_key[256];
            snprintf(init_key, sizeof init_key, "init.%s", t->name);
            const float *before = tensor_f32(f.st, init_key, t->count);
            /* A change of a few ulps of the parameter is all float can resolve. */
            float *got = malloc(sizeof(float) * t->count), *want = malloc(sizeof(float) * t->count);
            float ulp_floor = 0;
            for (size_t j = 0; j < t->count; j++) {
                ulp_floor = fmaxf(ulp_floor, 1e-3f * fabsf(before[j]));
                got[j] = t->data[j] - before[j];
                want[j] = after[j] - before[j];
            }
            float zero = so.lr * (1 + so.momentum) * grad_floor;
            bool ok = close_or_zero(what, got, want, t->count, GRAD_TOL, zero, ulp_floor) &&
                      test_close(what, t->data, after, t->count, GRAD_TOL, ulp_floor);
            free(got);
            free(want);
            assert_true(ok);
        } else {
            assert_true(test_close(what, t->data, after, t->count, GRAD_TOL, 0));
        }
    }
    fixture_close(&f);
}

/* Every kernel level must pass: the best the CPU has, and the portable paths forced. */
#define GOLDEN(name, fixture, threads, isa)                                                   \
    static void name(void **state)                                                            \
    {                                                                                         \
        (void)state;                                                                          \
        check_against_torchvision(fixture, threads, isa);                                     \
    }
GOLDEN(small_bn_1, "small_bn", 1, TERN_ISA_AUTO)
GOLDEN(small_bn_2, "small_bn", 2, TERN_ISA_AUTO)
GOLDEN(large_bn_1, "large_bn", 1, TERN_ISA_AUTO)
GOLDEN(large_bn_2, "large_bn", 2, TERN_ISA_AUTO)
GOLDEN(small_gn_1, "small_gn", 1, TERN_ISA_AUTO)
GOLDEN(small_gn_2, "small_gn", 2, TERN_ISA_AUTO)
GOLDEN(small_bn_scalar, "small_bn", 2, TERN_ISA_SCALAR)
GOLDEN(large_bn_scalar, "large_bn", 1, TERN_ISA_SCALAR)
GOLDEN(small_gn_scalar, "small_gn", 1, TERN_ISA_SCALAR)
GOLDEN(small_bn_avx2, "small_bn", 1, TERN_ISA_AVX2)
GOLDEN(large_bn_avx2, "large_bn", 2, TERN_ISA_AVX2)
GOLDEN(small_gn_avx2, "small_gn", 2, TERN_ISA_AVX2)

/* The full-size networks: every state_dict name, dtype and shape in torchvision's order, and
 * the parameter count. */
static void check_state_dict_listing(tern_arch arch, const char *file)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", test_fixture_dir(), file);
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    tern_model_options opt = tern_model_options_default(arch);
    tern_model *m = NULL;
    assert_int_equal(tern_model_create(&opt, &m, NULL), TERN_OK);
    char line[512];
    size_t i = 0;
    long long params = -1;
    while (fgets(line, sizeof line, fp)) {
        if (sscanf(line, "# params %lld", &params) == 1)
            continue;
        char name[256], dtype[16], shape[128];
        assert_int_equal(sscanf(line, "%255s %15s %127s", name, dtype, shape), 3);
        const tern_model_tensor *t = tern_model_tensor_at(m, i++);
        assert_non_null(t);
        assert_string_equal(t->name, name);
        assert_string_equal(dtype, t->kind == TERN_TENSOR_COUNTER ? "I64" : "F32");
        char ours[128] = "scalar";
        size_t used = 0;
        for (int d = 0; d < t->ndim; d++)
            used += (size_t)snprintf(ours + used, sizeof ours - used, d ? ",%lld" : "%lld",
                                     (long long)t->shape[d]);
        assert_string_equal(ours, shape);
    }
    fclose(fp);
    assert_int_equal(i, tern_model_tensor_count(m));
    assert_int_equal((long long)tern_model_param_count(m), params);
    tern_model_destroy(&m);
}

static void state_dict_small(void **state)
{
    (void)state;
    check_state_dict_listing(TERN_ARCH_MOBILENET_V3_SMALL, "state_dict_small.txt");
}

static void state_dict_large(void **state)
{
    (void)state;
    check_state_dict_listing(TERN_ARCH_MOBILENET_V3_LARGE, "state_dict_large.txt");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(state_dict_small), cmocka_unit_test(state_dict_large),
        cmocka_unit_test(small_bn_1),       cmocka_unit_test(small_bn_2),
        cmocka_unit_test(large_bn_1),       cmocka_unit_test(large_bn_2),
        cmocka_unit_test(small_gn_1),       cmocka_unit_test(small_gn_2),
        cmocka_unit_test(small_bn_scalar),  cmocka_unit_test(large_bn_scalar),
        cmocka_unit_test(small_gn_scalar),  cmocka_unit_test(small_bn_avx2),
        cmocka_unit_test(large_bn_avx2),    cmocka_unit_test(small_gn_avx2),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
