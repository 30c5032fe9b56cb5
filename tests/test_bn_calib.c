/* BatchNorm statistics re-estimation (tern_bn_calibrate) on real Fashion-MNIST images with a
 * tiny MobileNetV3-Small (width 0.25, one input channel, 32x32): the re-estimated statistics
 * equal the batch statistics of a copy of the model with momentum 1 (whose running buffers
 * then hold exactly the last batch's mean and unbiased variance), averaged over the batches
 * with equal weights as PyTorch's momentum=None does; weights, counters and determinism; a
 * badly averaged model (statistics of the wrong scale) recovers its accuracy; refused inputs
 * leave the statistics unchanged; GroupNorm models are left alone.
 * Needs Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tern/bn_calib.h"
#include "tern/optim.h"
#include "testutil.h"

#define CLASSES 10

static tern_dataset *g_ds;

static int group_setup(void **state)
{
    (void)state;
    g_ds = test_open_fashion_mnist(true, "test_bn_calib");
    return g_ds ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    tern_dataset_close(&g_ds);
    return 0;
}

static tern_transform eval_transform(void)
{
    tern_transform t = {.size = 32, .channels = 1, .resize = 28};
    tern_transform_normalize_fashion_mnist(&t);
    return t;
}

static tern_model *tiny(tern_norm norm, float momentum, uint64_t seed)
{
    tern_model_options o = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    o.width_mult = 0.25;
    o.in_channels = 1;
    o.num_classes = CLASSES;
    o.norm = norm;
    o.bn_momentum = momentum;
    o.seed = seed;
    tern_model *m = NULL;
    tern_error err = {{0}};
    assert_int_equal(tern_model_create(&o, &m, &err), TERN_OK);
    return m;
}

/* Images first..first+n-1 of the training file in batches of `batch`, not shuffled. */
static tern_loader *loader_of(size_t first, size_t n, int batch)
{
    size_t *idx = malloc(n * sizeof *idx);
    assert_non_null(idx);
    for (size_t i = 0; i < n; i++)
        idx[i] = first + i;
    tern_transform t = eval_transform();
    tern_loader_options lo = {.batch = batch, .indices = idx, .nindices = n};
    tern_loader *l = NULL;
    tern_error err = {{0}};
    assert_int_equal(tern_loader_create(g_ds, &t, &lo, NULL, &l, &err), TERN_OK);
    free(idx);
    return l;
}

/* All running buffers of m, flattened (malloc'd); *n gets their count. */
static float *buffers(const tern_model *m, size_t *n)
{
    size_t total = 0;
    for (size_t i = 0; i < tern_model_tensor_count(m); i++)
        if (tern_model_tensor_at(m, i)->kind == TERN_TENSOR_BUFFER)
            total += tern_model_tensor_at(m, i)->count;
    float *out = malloc((total ? total : 1) * sizeof *out);
    assert_non_null(out);
    size_t k = 0;
    for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(m, i);
        if (t->kind == TERN_TENSOR_BUFFER) {
            memcpy(out + k, t->data, t->count * sizeof(float));
            k += t->count;
        }
    }
    *n = total;
    return out;
}

static void set_buffers(tern_model *m, float mean, float var)
{
    for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(m, i);
        if (t->kind != TERN_TENSOR_BUFFER)
            continue;
        bool is_var = strstr(t->name, "running_var") != NULL;
        for (size_t j = 0; j < t->count; j++)
            t->data[j] = is_var ? var : mean;
    }
    tern_model_invalidate(m);
}

static int64_t counter_sum(const tern_model *m)
{
    int64_t s = 0;
    for (size_t i = 0; i < tern_model_tensor_count(m); i++)
        if (tern_model_tensor_at(m, i)->kind == TERN_TENSOR_COUNTER)
            s += *tern_model_tensor_at(m, i)->counter;
    return s;
}

/* The batch statistics of images first..first+n-1 as one batch: a copy of m with momentum 1
 * run forward once in training mode. Returns the flattened buffers (malloc'd). */
static float *batch_stats(tern_model *m, size_t first, int n)
{
    tern_model *ref = tiny(TERN_NORM_BATCH, 1.0f, 99);
    memcpy(tern_model_params(ref), tern_model_params(m),
           tern_model_param_count(m) * sizeof(float));
    tern_model_invalidate(ref);
    tern_loader *l = loader_of(first, (size_t)n, n);
    const float *x;
    const int32_t *y;
    int got;
    tern_error err = {{0}};
    assert_int_equal(tern_loader_next(l, &x, &y, &got, &err), TERN_OK);
    assert_int_equal(got, n);
    float *logits = malloc((size_t)n * CLASSES * sizeof *logits);
    assert_non_null(logits);
    assert_int_equal(tern_model_plan(ref, n, 32, 32, true), TERN_OK);
    assert_int_equal(tern_model_forward(ref, logits, x, n, true), TERN_OK);
    size_t count;
    float *b = buffers(ref, &count);
    free(logits);
    tern_loader_destroy(&l);
    tern_model_destroy(&ref);
    return b;
}

static const tern_bn_calibration_options OPT8 = {.batch = 8, .height = 32, .width = 32};

static void test_one_batch_equals_batch_statistics(void **state)
{
    (void)state;
    tern_model *m = tiny(TERN_NORM_BATCH, 0.1f, 1);
    set_buffers(m, 3.0f, 0.5f); /* whatever was there before must not matter */
    size_t np = tern_model_param_count(m), nb;
    float *params = malloc(np * sizeof *params);
    assert_non_null(params);
    memcpy(params, tern_model_params(m), np * sizeof *params);
    int64_t counters = counter_sum(m);
    tern_loader *l = loader_of(100, 8, 8);
    size_t used = 0;
    tern_error err = {{0}};
    assert_int_equal(tern_bn_calibrate(m, l, &OPT8, &used, &err), TERN_OK);
    assert_int_equal(used, 1);
    float *got = buffers(m, &nb);
    float *want = batch_stats(m, 100, 8);
    assert_true(test_close("one batch", got, want, nb, 1e-5f, 1e-3f));
    /* The statistics are not trivial: variances are positive and not all equal to 1. */
    bool varied = false;
    for (size_t i = 0; i < nb; i++) {
        assert_true(isfinite(got[i]));
        varied |= fabsf(got[i] - 1.0f) > 1e-2f && fabsf(got[i]) > 1e-2f;
    }
    assert_true(varied);
    assert_memory_equal(params, tern_model_params(m), np * sizeof *params);
    assert_int_equal(counter_sum(m), counters);
    free(got);
    free(want);
    free(params);
    tern_loader_destroy(&l);
    tern_model_destroy(&m);
}

static void test_batches_average_with_equal_weights(void **state)
{
    (void)state;
    tern_model *m = tiny(TERN_NORM_BATCH, 0.1f, 2);
    /* 8 + 8 + 3 images: the batch of 3 counts as much as each batch of 8 (momentum=None
     * averages per batch). */
    tern_loader *l = loader_of(200, 19, 8);
    size_t used = 0, nb;
    tern_error err = {{0}};
    assert_int_equal(tern_bn_calibrate(m, l, &OPT8, &used, &err), TERN_OK);
    assert_int_equal(used, 3);
    float *got = buffers(m, &nb);
    float *b1 = batch_stats(m, 200, 8), *b2 = batch_stats(m, 208, 8), *b3 = batch_stats(m, 216, 3);
    float *want = malloc(nb * sizeof *want);
    assert_non_null(want);
    for (size_t i = 0; i < nb; i++)
        want[i] = (float)(((double)b1[i] + b2[i] + b3[i]) / 3.0);
    assert_true(test_close("three batches", got, want, nb, 1e-5f, 1e-3f));
    /* Deterministic: again (the loader is rewound), and from other starting statistics. */
    set_buffers(m, -1.0f, 7.0f);
    assert_int_equal(tern_bn_calibrate(m, l, &OPT8, &used, &err), TERN_OK);
    float *again = buffers(m, &nb);
    assert_memory_equal(got, again, nb * sizeof *got);
    /* 8 + 8 + 1 images: the single image is skipped, as if it were not there. */
    tern_loader *l17 = loader_of(200, 17, 8), *l16 = loader_of(200, 16, 8);
    assert_int_equal(tern_bn_calibrate(m, l17, &OPT8, &used, &err), TERN_OK);
    assert_int_equal(used, 2);
    float *with_one = buffers(m, &nb);
    assert_int_equal(tern_bn_calibrate(m, l16, &OPT8, &used, &err), TERN_OK);
    assert_int_equal(used, 2);
    float *without = buffers(m, &nb);
    assert_memory_equal(with_one, without, nb * sizeof *got);
    for (size_t i = 0; i < nb; i++)
        want[i] = (float)(((double)b1[i] + b2[i]) / 2.0);
    assert_true(test_close("two batches", without, want, nb, 1e-5f, 1e-3f));
    free(with_one);
    tern_loader_destroy(&l17);
    tern_loader_destroy(&l16);
    free(got);
    free(again);
    free(without);
    free(b1);
    free(b2);
    free(b3);
    free(want);
    tern_loader_destroy(&l);
    tern_model_destroy(&m);
}

/* Eval-mode accuracy of m on images first..first+n-1. */
static double accuracy(tern_model *m, size_t first, size_t n)
{
    tern_loader *l = loader_of(first, n, 100);
    float *logits = malloc(100 * CLASSES * sizeof *logits);
    assert_non_null(logits);
    assert_int_equal(tern_model_plan(m, 100, 32, 32, false), TERN_OK);
    size_t correct = 0, seen = 0;
    tern_error err = {{0}};
    for (;;) {
        const float *x;
        const int32_t *y;
        int got;
        tern_status s = tern_loader_next(l, &x, &y, &got, &err);
        if (s == TERN_ERR_NOT_FOUND)
            break;
        assert_int_equal(s, TERN_OK);
        assert_int_equal(tern_model_forward(m, logits, x, got, false), TERN_OK);
        for (int i = 0; i < got; i++) {
            int best = 0;
            for (int k = 1; k < CLASSES; k++)
                if (logits[i * CLASSES + k] > logits[i * CLASSES + best])
                    best = k;
            correct += best == y[i];
        }
        seen += (size_t)got;
    }
    free(logits);
    tern_loader_destroy(&l);
    return (double)correct / (double)seen;
}

/* A model trained for a few steps, then given running statistics that do not match its
 * weights (as averaging can): eval accuracy drops to near chance, and calibration on other
 * images brings it back, above what the running statistics of training gave. */
static void test_recovers_mismatched_statistics(void **state)
{
    (void)state;
    tern_model *m = tiny(TERN_NORM_BATCH, 0.1f, 3);
    tern_optimizer *opt = NULL;
    tern_optimizer_options oo = tern_optimizer_options_default(TERN_OPTIMIZER_SGD);
    oo.lr = 0.05f;
    oo.momentum = 0.9f;
    tern_error err = {{0}};
    assert_int_equal(tern_optimizer_create(m, &oo, &opt, &err), TERN_OK);
    tern_loader_options lo = {.batch = 32, .shuffle = true, .seed = 5};
    tern_transform t = eval_transform();
    size_t *idx = malloc(2000 * sizeof *idx);
    assert_non_null(idx);
    for (size_t i = 0; i < 2000; i++)
        idx[i] = i;
    lo.indices = idx;
    lo.nindices = 2000;
    tern_loader *train = NULL;
    assert_int_equal(tern_loader_create(g_ds, &t, &lo, NULL, &train, &err), TERN_OK);
    free(idx);
    float logits[32 * CLASSES], dlogits[32 * CLASSES];
    assert_int_equal(tern_model_plan(m, 32, 32, 32, true), TERN_OK);
    for (int step = 0; step < 60; step++) {
        const float *x;
        const int32_t *y;
        int n;
        assert_int_equal(tern_loader_next(train, &x, &y, &n, &err), TERN_OK);
        float loss;
        assert_int_equal(tern_model_forward(m, logits, x, n, true), TERN_OK);
        assert_int_equal(tern_cross_entropy_loss(&loss, dlogits, logits, y, n, CLASSES, 0.0f),
                         TERN_OK);
        tern_model_zero_grad(m);
        assert_int_equal(tern_model_backward(m, dlogits), TERN_OK);
        tern_optimizer_step(opt);
    }
    tern_optimizer_destroy(&opt);
    tern_loader_destroy(&train);
    double trained = accuracy(m, 50000, 500); /* with the statistics training left */
    set_buffers(m, 0.0f, 1.0f); /* the initial statistics: far from the trained model's */
    double before = accuracy(m, 50000, 500);
    tern_loader *cal = loader_of(10000, 400, 100);
    tern_bn_calibration_options o = {.batch = 100, .height = 32, .width = 32};
    assert_int_equal(tern_bn_calibrate(m, cal, &o, NULL, &err), TERN_OK);
    double after = accuracy(m, 50000, 500);
    print_message("eval accuracy after training %.3f, with mismatched statistics %.3f, after "
                  "calibration %.3f\n", trained, before, after);
    /* After 60 steps the running statistics (momentum 0.1) still lag the weights: the
     * calibrated model beats them too, and is well above chance. */
    assert_true(after > 0.25);
    assert_true(after > trained + 0.05);
    assert_true(after > before + 0.15);
    tern_loader_destroy(&cal);
    tern_model_destroy(&m);
}

static void test_refused_inputs_leave_statistics(void **state)
{
    (void)state;
    tern_model *m = tiny(TERN_NORM_BATCH, 0.1f, 4);
    set_buffers(m, 0.25f, 2.0f);
    size_t nb;
    float *orig = buffers(m, &nb);
    tern_error err = {{0}};
    tern_loader *l = loader_of(0, 16, 16);
    tern_bn_calibration_options bad = {.batch = 1, .height = 32, .width = 32};
    assert_int_equal(tern_bn_calibrate(m, l, &bad, NULL, &err), TERN_ERR_INVALID);
    assert_int_equal(tern_bn_calibrate(NULL, l, &OPT8, NULL, &err), TERN_ERR_INVALID);
    assert_int_equal(tern_bn_calibrate(m, NULL, &OPT8, NULL, &err), TERN_ERR_INVALID);
    /* The loader's batches (16) are larger than the plan (8). */
    assert_int_equal(tern_bn_calibrate(m, l, &OPT8, NULL, &err), TERN_ERR_INVALID);
    assert_non_null(strstr(err.message, "more than the batch"));
    float *now = buffers(m, &nb);
    assert_memory_equal(orig, now, nb * sizeof *orig);
    free(now);
    /* Only single images: nothing to estimate from. */
    tern_loader *ones = loader_of(0, 3, 1);
    size_t used = 7;
    assert_int_equal(tern_bn_calibrate(m, ones, &OPT8, &used, &err), TERN_ERR_STATE);
    assert_int_equal(used, 0);
    now = buffers(m, &nb);
    assert_memory_equal(orig, now, nb * sizeof *orig);
    free(now);
    free(orig);
    tern_loader_destroy(&ones);
    tern_loader_destroy(&l);
    tern_model_destroy(&m);
}

static void test_group_norm_is_left_alone(void **state)
{
    (void)state;
    tern_model *m = tiny(TERN_NORM_GROUP, 0.1f, 5);
    size_t np = tern_model_param_count(m);
    float *params = malloc(np * sizeof *params);
    assert_non_null(params);
    memcpy(params, tern_model_params(m), np * sizeof *params);
    tern_loader *l = loader_of(0, 8, 8);
    size_t used = 7;
    tern_error err = {{0}};
    assert_int_equal(tern_bn_calibrate(m, l, &OPT8, &used, &err), TERN_OK);
    assert_int_equal(used, 0);
    assert_memory_equal(params, tern_model_params(m), np * sizeof *params);
    free(params);
    tern_loader_destroy(&l);
    tern_model_destroy(&m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_one_batch_equals_batch_statistics),
        cmocka_unit_test(test_batches_average_with_equal_weights),
        cmocka_unit_test(test_recovers_mismatched_statistics),
        cmocka_unit_test(test_refused_inputs_leave_statistics),
        cmocka_unit_test(test_group_norm_is_left_alone),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
