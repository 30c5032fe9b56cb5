/* Growing a model by one class: the distillation loss against hand-computed values and finite
 * differences, and `tern add-class` end to end (the binary named by $TERN_BIN) on a small
 * synthetic image folder the test writes itself: train a model on two colours, add a third,
 * and check that the new class is learned while the old ones are kept; plus the errors a
 * person gets for bad folders and models. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "tern.h"
#include "testutil.h"

/* ---- tern_distillation_loss ------------------------------------------------------------------ */

static void distillation_hand_computed(void **state)
{
    (void)state;
    /* Teacher logits equal: p = (1/2, 1/2). Student s / T = (ln 3, 0): q = (3/4, 1/4).
     * KL(p || q) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); times T^2 = 4: 2 ln(4/3).
     * Gradient weight * T / n * (q - p) = 2 * (1/4, -1/4). A third student column (the new
     * class) takes no part: its gradient stays as it was, and the others accumulate. */
    const float student[3] = {2.0f * logf(3.0f), 0.0f, 5.0f}, teacher[2] = {0.7f, 0.7f};
    float d[3] = {1.0f, 1.0f, 1.0f}, loss = -1;
    assert_int_equal(tern_distillation_loss(&loss, d, student, 3, teacher, 1, 2, 2.0f, 1.0f),
                     TERN_OK);
    assert_float_equal(loss, 2.0 * log(4.0 / 3.0), 1e-6);
    assert_float_equal(d[0], 1.5f, 1e-6);
    assert_float_equal(d[1], 0.5f, 1e-6);
    assert_float_equal(d[2], 1.0f, 0);

    /* Weight scales loss and gradient; a batch of two identical rows has the same mean loss
     * and half the per-row gradient. Equal distributions give zero loss and gradient. */
    const float s2[6] = {student[0], 0, 5, student[0], 0, 5};
    const float t2[4] = {0.7f, 0.7f, 0.7f, 0.7f};
    float d2[6] = {0};
    assert_int_equal(tern_distillation_loss(&loss, d2, s2, 3, t2, 2, 2, 2.0f, 0.5f), TERN_OK);
    assert_float_equal(loss, log(4.0 / 3.0), 1e-6);
    assert_float_equal(d2[0], 0.125f, 1e-6);
    assert_float_equal(d2[4], -0.125f, 1e-6);
    assert_float_equal(d2[2], 0.0f, 0);
    const float same[2] = {3.0f, -1.0f};
    float d3[2] = {0};
    assert_int_equal(tern_distillation_loss(&loss, d3, same, 2, same, 1, 2, 2.0f, 1.0f), TERN_OK);
    assert_float_equal(loss, 0.0f, 1e-7);
    assert_float_equal(d3[0], 0.0f, 1e-7);

    /* Huge logits do not overflow; NULL dlogits only computes the loss. */
    const float big_s[2] = {1000.0f, -1000.0f}, big_t[2] = {-1000.0f, 1000.0f};
    assert_int_equal(tern_distillation_loss(&loss, NULL, big_s, 2, big_t, 1, 2, 2.0f, 1.0f),
                     TERN_OK);
    assert_true(isfinite(loss) && loss > 3000.0f); /* T^2 * 2000 / T, less a vanishing term */

    /* Invalid arguments. */
    assert_int_equal(tern_distillation_loss(&loss, d, student, 1, teacher, 1, 2, 2.0f, 1.0f),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_distillation_loss(&loss, d, student, 3, teacher, 0, 2, 2.0f, 1.0f),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_distillation_loss(&loss, d, student, 3, teacher, 1, 2, 0.0f, 1.0f),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_distillation_loss(&loss, d, student, 3, teacher, 1, 2, 2.0f, -1.0f),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_distillation_loss(&loss, d, student, 3, teacher, 1, 2, NAN, 1.0f),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_distillation_loss(NULL, d, student, 3, teacher, 1, 2, 2.0f, 1.0f),
                     TERN_ERR_INVALID);
}

static void distillation_finite_differences(void **state)
{
    (void)state;
    enum { N = 3, K = 4, STRIDE = 6 };
    test_rng r = {42};
    const float temps[] = {1.0f, 2.0f, 4.5f};
    for (size_t ti = 0; ti < sizeof temps / sizeof *temps; ti++) {
        float s[N * STRIDE], t[N * K], d[N * STRIDE];
        test_fill_uniform(&r, s, N * STRIDE, -3, 3);
        test_fill_uniform(&r, t, N * K, -3, 3);
        for (int i = 0; i < N * STRIDE; i++)
            d[i] = 0.25f; /* accumulation: the result is 0.25 + gradient */
        float loss, weight = 0.7f, T = temps[ti];
        assert_int_equal(tern_distillation_loss(&loss, d, s, STRIDE, t, N, K, T, weight), TERN_OK);
        assert_true(loss > 0);
        for (int i = 0; i < N; i++)
            for (int j = 0; j < STRIDE; j++) {
                float *x = &s[i * STRIDE + j], saved = *x, h = 1e-2f, lp, lm;
                *x = saved + h;
                tern_distillation_loss(&lp, NULL, s, STRIDE, t, N, K, T, weight);
                *x = saved - h;
                tern_distillation_loss(&lm, NULL, s, STRIDE, t, N, K, T, weight);
                *x = saved;
                double numeric = ((double)lp - lm) / (2.0 * h);
                double analytic = d[i * STRIDE + j] - 0.25;
                if (fabs(numeric - analytic) > 2e-4 + 1e-2 * fabs(numeric))
                    fail_msg("T %g, row %d column %d: analytic %.6g, numeric %.6g", (double)T, i, j,
                             analytic, numeric);
                if (j >= K)
                    assert_float_equal(d[i * STRIDE + j], 0.25f, 0);
            }
    }
}

/* ---- tern add-class end to end -------------------------------------------------------------- */

typedef struct env {
    char dir[64];
    char log[128];
    char old_data[128], data[128]; /* two-class folder, three-class folder */
    char old_model[128], new_model[128], plain_model[128];
} env;

/* The classes, in name order: "green" and "red" are the old ones, "violet" the new one (so the
 * grown model's class order is also the folders' sorted order and `tern eval` accepts it). */
static const char *const CLASS_NAMES[3] = {"green", "red", "violet"};
static const uint8_t CLASS_RGB[3][3] = {{30, 200, 40}, {210, 40, 30}, {120, 30, 220}};

/* A 32x32 image of class cls: a coloured square of random size and place on a noisy grey
 * background. */
static void save_image(const char *path, int cls, test_rng *r)
{
    enum { S = 32 };
    uint8_t px[S * S * 3];
    int grey = test_rng_int(r, 60, 160);
    for (int i = 0; i < S * S * 3; i++)
        px[i] = (uint8_t)(grey + test_rng_int(r, -40, 40));
    int side = test_rng_int(r, 10, 16), y0 = test_rng_int(r, 0, S - side),
        x0 = test_rng_int(r, 0, S - side);
    for (int y = y0; y < y0 + side; y++)
        for (int x = x0; x < x0 + side; x++)
            for (int ch = 0; ch < 3; ch++) {
                int v = CLASS_RGB[cls][ch] + test_rng_int(r, -25, 25);
                px[(y * S + x) * 3 + ch] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
            }
    tern_image img = {.width = S, .height = S, .channels = 3, .data = px};
    tern_error err;
    if (tern_image_save_png(path, &img, &err) != TERN_OK)
        fail_msg("%s", err.message);
}

static void make_dir(const char *path)
{
    if (mkdir(path, 0755) != 0)
        fail_msg("mkdir %s failed", path);
}

/* root/{train,val}/<class>/NNN.png for classes [0, nclasses), ntrain and nval images each. */
static void make_folder(const char *root, int nclasses, int ntrain, int nval, uint64_t seed)
{
    test_rng r = {seed};
    char path[512];
    make_dir(root);
    const char *splits[2] = {"train", "val"};
    for (int sp = 0; sp < 2; sp++) {
        snprintf(path, sizeof path, "%s/%s", root, splits[sp]);
        make_dir(path);
        for (int k = 0; k < nclasses; k++) {
            snprintf(path, sizeof path, "%s/%s/%s", root, splits[sp], CLASS_NAMES[k]);
            make_dir(path);
            for (int i = 0; i < (sp ? nval : ntrain); i++) {
                snprintf(path, sizeof path, "%s/%s/%s/%03d.png", root, splits[sp],
                         CLASS_NAMES[k], i);
                save_image(path, k, &r);
            }
        }
    }
}

/* A freshly initialised tiny model saved with `nclasses` class names (or none). */
static void save_untrained_model(const char *path, int nclasses, bool with_names)
{
    tern_model_options o = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    o.width_mult = 0.25;
    o.num_classes = nclasses;
    tern_model *m = NULL;
    tern_error err;
    assert_int_equal(tern_model_create(&o, &m, &err), TERN_OK);
    tern_model_info info = {.input_size = 32, .nclasses = nclasses,
                            .class_names = (char **)CLASS_NAMES};
    tern_transform t = {0};
    tern_transform_normalize_imagenet(&t);
    memcpy(info.mean, t.mean, sizeof info.mean);
    memcpy(info.std, t.std, sizeof info.std);
    if (!with_names) {
        info.nclasses = 0;
        info.class_names = NULL;
    }
    assert_int_equal(tern_model_save_file(m, &info, path, &err), TERN_OK);
    tern_model_destroy(&m);
}

static int setup(void **state)
{
    env *e = calloc(1, sizeof *e);
    if (!e)
        return -1;
    snprintf(e->dir, sizeof e->dir, "/tmp/tern-add-class-XXXXXX");
    if (!mkdtemp(e->dir))
        return -1;
    snprintf(e->log, sizeof e->log, "%s/log.txt", e->dir);
    snprintf(e->old_data, sizeof e->old_data, "%s/two", e->dir);
    snprintf(e->data, sizeof e->data, "%s/three", e->dir);
    snprintf(e->old_model, sizeof e->old_model, "%s/old.safetensors", e->dir);
    snprintf(e->new_model, sizeof e->new_model, "%s/new.safetensors", e->dir);
    snprintf(e->plain_model, sizeof e->plain_model, "%s/plain.safetensors", e->dir);
    *state = e;
    return 0;
}

static int teardown(void **state)
{
    env *e = *state;
    test_rm_tree(e->dir);
    free(e);
    return 0;
}

/* The percentage after `label` in the log ("old-class accuracy before: 97.50%"), or -1. */
static double log_percent(const env *e, const char *label)
{
    char *text = test_slurp(e->log);
    const char *at = text ? strstr(text, label) : NULL;
    double v;
    if (!at || sscanf(at + strlen(label), " %lf%%", &v) != 1) {
        fprintf(stderr, "no '%s' in output:\n%s\n", label, text ? text : "(no log)");
        v = -1;
    }
    free(text);
    return v;
}


static void add_class_end_to_end(void **state)
{
    env *e = *state;
    make_folder(e->old_data, 2, 32, 16, 1);
    make_folder(e->data, 3, 32, 16, 2);
    /* Batches of 16 and enough steps for BatchNorm's running statistics (momentum 0.01) to
     * settle: with batches of 8 this tiny network's eval-mode accuracy is erratic. */
    assert_int_equal(
        test_run_tern(e->log,
                      "train --data %s --width-mult 0.25 --size 32 --batch 16 --epochs 60 "
                      "--no-augment --seed 3 --out %s",
                      e->old_data, e->old_model),
        0);
    char json[160];
    snprintf(json, sizeof json, "%s/metrics.json", e->dir);
    int rc = test_run_tern(e->log,
                           "add-class --model %s --data %s --class violet --batch 16 --epochs 40 "
                           "--lr 0.05 --no-augment --seed 3 --out %s --metrics-json %s",
                           e->old_model, e->data, e->new_model, json);
    char *output = test_slurp(e->log);
    fprintf(stderr, "%s", output ? output : "(no log)");
    free(output);
    assert_int_equal(rc, 0);
    double before = log_percent(e, "old-class accuracy before:");
    double old_after = log_percent(e, "old-class accuracy after:");
    double new_after = log_percent(e, "new-class accuracy after:");
    double overall = log_percent(e, "overall accuracy after:");
    assert_true(test_file_contains(e->log, "old model, 32 images of 2 classes"));
    assert_true(test_file_contains(e->log, "choosing among the old classes only"));
    assert_true(test_file_contains(e->log, "(16 images of 'violet')"));
    /* Chance is 1/3 among three classes. Over old-model seeds 3-6, add-class seeds 1-3 and
     * the scalar and AVX2 kernels, the lowest values seen were 93.75% before, 87.5% old-class
     * after and 68.75% new-class: the bounds leave room for other kernels' rounding. (Without
     * distillation, old-class accuracy fell to 47% in two of those runs.) */
    assert_true(before >= 80);
    assert_true(old_after >= 75);
    assert_true(new_after >= 60);
    assert_true(overall >= 70);

    /* The grown model: three classes, old names first, the old pipeline. */
    tern_safetensors *st = NULL;
    tern_error err;
    assert_int_equal(tern_safetensors_open(e->new_model, NULL, &st, &err), TERN_OK);
    tern_model_options o = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    assert_int_equal(tern_model_options_from_metadata(st, &o, &err), TERN_OK);
    assert_int_equal(o.num_classes, 3);
    assert_true(fabs(o.width_mult - 0.25) < 1e-9);
    tern_model_info info = {0};
    assert_int_equal(tern_model_info_read(st, &info, &err), TERN_OK);
    assert_int_equal(info.nclasses, 3);
    for (int k = 0; k < 3; k++)
        assert_string_equal(info.class_names[k], CLASS_NAMES[k]);
    assert_int_equal(info.input_size, 32);
    assert_true(info.std[0] > 0);
    tern_model_info_free(&info);
    tern_tensor_view w;
    assert_int_equal(tern_safetensors_find(st, "classifier.3.weight", &w), TERN_OK);
    assert_int_equal(w.shape[0], 3);
    tern_safetensors_close(&st);

    FILE *f = fopen(json, "r");
    assert_non_null(f);
    char text[4096] = {0};
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    assert_true(n > 0);
    assert_non_null(strstr(text, "\"old_class_accuracy_before\""));
    assert_non_null(strstr(text, "\"new_class_accuracy\""));
    assert_non_null(strstr(text, "\"old_class_accuracy_after_among_old\""));
    assert_non_null(strstr(text, "\"violet\""));

    /* tern eval takes the grown model on the three-class folder. */
    char val[160];
    snprintf(val, sizeof val, "%s/val", e->data);
    assert_int_equal(test_run_tern(e->log, "eval --model %s --data %s", e->new_model, val), 0);
    assert_true(test_file_contains(e->log, "accuracy"));
}

static void add_class_errors(void **state)
{
    env *e = *state;
    char path[256];
    /* Folders, and a model that knows green and red (untrained: only the checks run). */
    snprintf(path, sizeof path, "%s/errors", e->dir);
    make_folder(path, 3, 2, 1, 7);
    save_untrained_model(e->plain_model, 2, true);

    assert_int_equal(test_run_tern(e->log, "add-class --help"), 0);
    assert_true(test_file_contains(e->log, "--distill"));
    assert_int_equal(test_run_tern(e->log, "--help"), 0);
    assert_true(test_file_contains(e->log, "add-class"));
    assert_int_equal(test_run_tern(e->log, "add-class --model %s --data %s", e->plain_model, path),
                     1);
    assert_true(test_file_contains(e->log, "--class is required"));
    assert_int_equal(test_run_tern(e->log, "add-class --model %s --class violet", e->plain_model),
                     1);
    assert_true(test_file_contains(e->log, "--data is required"));
    assert_int_equal(test_run_tern(e->log,
                                   "add-class --model %s --data %s --class violet --distill -1",
                                   e->plain_model, path),
                     1);
    assert_true(test_file_contains(e->log, "bad value '-1' for --distill"));

    /* No folder for the new class. */
    assert_int_equal(
        test_run_tern(e->log, "add-class --model %s --data %s --class blue", e->plain_model, path),
        1);
    assert_true(test_file_contains(e->log, "no class folder 'blue'"));
    /* The new class is already one of the model's. */
    assert_int_equal(
        test_run_tern(e->log, "add-class --model %s --data %s --class red", e->plain_model, path),
        1);
    assert_true(test_file_contains(e->log, "'red' is already class 1"));
    /* A folder that is neither an old class nor the new one. */
    char odd[320];
    snprintf(odd, sizeof odd, "%s/train/orange", path);
    make_dir(odd);
    snprintf(odd, sizeof odd, "%s/train/orange/a.png", path);
    test_rng r = {9};
    save_image(odd, 0, &r);
    assert_int_equal(test_run_tern(e->log, "add-class --model %s --data %s --class violet",
                                   e->plain_model, path),
                     1);
    assert_true(test_file_contains(e->log, "class folder 'orange'"));
    assert_true(test_file_contains(e->log, "'green', 'red'"));
    /* A model whose metadata names no classes. */
    save_untrained_model(e->plain_model, 2, false);
    assert_int_equal(test_run_tern(e->log, "add-class --model %s --data %s --class violet",
                                   e->plain_model, path),
                     1);
    assert_true(test_file_contains(e->log, "has no class names"));
    /* A missing model file. */
    assert_int_equal(test_run_tern(e->log,
                                   "add-class --model %s/none.safetensors --data %s --class violet",
                                   e->dir, path),
                     1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(distillation_hand_computed),
        cmocka_unit_test(distillation_finite_differences),
        cmocka_unit_test(add_class_errors),
        cmocka_unit_test(add_class_end_to_end),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
