/* End-to-end: `tern quantize` on the shipped Fashion-MNIST model (fixed-point requantization,
 * recorded in the file), then `tern info`, `tern eval`
 * and `tern predict` on the quantized file, the embedding example (apps/examples/classify.c,
 * through tern_predictor) on it, and the errors a person can make. Needs Debian's
 * dataset-fashion-mnist and weights/fashion-mnist-small.safetensors (found from
 * $TERN_FIXTURES/../../weights); binaries come from $TERN_BIN and $TERN_EXAMPLE (set by
 * CTest). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "tern.h"
#include "testutil.h"

typedef struct env {
    char dir[64], weights[1024], qmodel[128], log[128], image[128];
} env;

static int setup(void **state)
{
    env *e = calloc(1, sizeof *e);
    if (!e)
        return -1;
    snprintf(e->dir, sizeof e->dir, "/tmp/tern-quant-XXXXXX");
    if (!mkdtemp(e->dir))
        return -1;
    snprintf(e->weights, sizeof e->weights, "%s/../../weights/fashion-mnist-small.safetensors",
             test_fixture_dir());
    snprintf(e->qmodel, sizeof e->qmodel, "%s/q.safetensors", e->dir);
    snprintf(e->log, sizeof e->log, "%s/log.txt", e->dir);
    snprintf(e->image, sizeof e->image, "%s/test0.png", e->dir);
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

/* The first Fashion-MNIST test image as a PNG. */
static void write_test_image(const char *path)
{
    tern_error err = {{0}};
    tern_dataset *test = NULL;
    assert_int_equal(tern_dataset_open_fashion_mnist("/usr/share/datasets/fashion-mnist", false,
                                                     NULL, &test, &err),
                     TERN_OK);
    tern_image img = {0};
    assert_int_equal(tern_dataset_image(test, 0, NULL, &img, &err), TERN_OK);
    assert_int_equal(tern_image_save_png(path, &img, &err), TERN_OK);
    tern_image_free(NULL, &img);
    tern_dataset_close(&test);
}

static void quantize_then_use(void **state)
{
    env *e = *state;
    assert_int_equal(
        test_run_tern(e->log,
                      "quantize --model %s --calib-data fashion-mnist --calib-count 256 "
                      "--method entropy --fp32-layers 2 --eval-count 500 --requant fixed "
                      "--out %s",
                      e->weights, e->qmodel),
        0);
    assert_true(test_file_contains(e->log, "fixed requantization"));
    assert_true(test_file_contains(e->log, "layer sensitivity"));
    assert_true(test_file_contains(e->log, "features.0.0.weight"));
    assert_true(test_file_contains(e->log, "fp32"));
    assert_true(test_file_contains(e->log, "held-out 500 images (test set)"));
    assert_true(test_file_contains(e->log, "smaller"));

    assert_int_equal(test_run_tern(e->log, "info %s", e->qmodel), 0);
    assert_true(test_file_contains(e->log, "format: tern-int8"));
    assert_true(test_file_contains(e->log, "requant: fixed"));
    assert_true(test_file_contains(e->log, "values.zero_point"));
    assert_true(test_file_contains(e->log, "I8"));

    assert_int_equal(test_run_tern(e->log,
                                   "eval --model %s --data fashion-mnist --limit 500 --no-progress",
                                   e->qmodel),
                     0);
    assert_true(test_file_contains(e->log, "accuracy"));
    assert_true(test_file_contains(e->log, "on 500 images"));
    assert_true(test_file_contains(e->log, "confusion matrix"));

    write_test_image(e->image);
    assert_int_equal(test_run_tern(e->log, "predict --model %s --top 2 %s", e->qmodel, e->image),
                     0);
    assert_true(test_file_contains(e->log, "test0.png: "));
    assert_true(test_file_contains(e->log, "%"));

    /* the C API's predictor runs the quantized file as it runs a float one */
    const char *example = getenv("TERN_EXAMPLE");
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "'%s' '%s' '%s' > '%s' 2>&1",
             example && *example ? example : "./example_classify", e->qmodel, e->image, e->log);
    assert_int_equal(system(cmd), 0);
    char *pred = test_slurp(e->log);
    assert_non_null(pred);
    assert_true(strlen(pred) > 2);
    free(pred);

    /* errors a person can make */
    assert_int_equal(test_run_tern(e->log,
                                   "eval --model %s --data fashion-mnist --size 64 --limit 10",
                                   e->qmodel),
                     1);
    assert_true(test_file_contains(e->log, "takes 32x32 images"));
    assert_int_equal(
        test_run_tern(e->log, "quantize --model %s --calib-data fashion-mnist --method kl --out %s",
                      e->weights, e->qmodel),
        1);
    assert_true(test_file_contains(e->log, "unknown --method 'kl'"));
    assert_int_equal(test_run_tern(e->log,
                                   "quantize --model %s --calib-data fashion-mnist --requant q31 "
                                   "--out %s",
                                   e->weights, e->qmodel),
                     1);
    assert_true(test_file_contains(e->log, "unknown --requant 'q31'"));
    assert_int_equal(
        test_run_tern(e->log, "quantize --model %s --calib-data fashion-mnist", e->weights), 1);
    assert_true(test_file_contains(e->log, "--out are required"));
    assert_int_equal(test_run_tern(e->log, "quantize --model %s --calib-data %s/none --out %s",
                                   e->weights, e->dir, e->qmodel),
                     1);
    assert_int_equal(test_run_tern(e->log, "quantize --help"), 0);
    assert_true(test_file_contains(e->log, "--fp32-layers"));
    /* a truncated quantized file is refused, not run */
    char cut[256];
    snprintf(cut, sizeof cut, "head -c 100000 '%s' > '%s/cut.safetensors'", e->qmodel, e->dir);
    assert_int_equal(system(cut), 0);
    assert_int_equal(
        test_run_tern(e->log, "eval --model %s/cut.safetensors --data fashion-mnist --limit 10",
                      e->dir),
        1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(quantize_then_use, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
