/* End-to-end tests of `tern dp epsilon` and `tern dp noise`, run from $TERN_BIN (set by CTest):
 * Opacus's reference case printed to the digits the library computes, the noise search, help
 * and the errors a person can make; and a short `tern train --dp` run with its refusals. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

typedef struct env {
    char dir[64], log[96];
} env;

static int setup(void **state)
{
    env *e = calloc(1, sizeof *e);
    if (!e)
        return -1;
    snprintf(e->dir, sizeof e->dir, "/tmp/tern-dp-XXXXXX");
    if (!mkdtemp(e->dir)) {
        free(e);
        return -1;
    }
    snprintf(e->log, sizeof e->log, "%s/log.txt", e->dir);
    *state = e;
    return 0;
}

static int teardown(void **state)
{
    env *e = *state;
    unlink(e->log);
    int rc = rmdir(e->dir);
    free(e);
    return rc;
}

static void epsilon_reference(void **state)
{
    env *e = *state;
    /* opacus/tests/accountants_test.py: 7.32911117143 (printed to 12 digits). */
    assert_int_equal(
        test_run_tern(e->log, "dp epsilon --sample-rate 0.04 --noise-multiplier 1.5 --steps 2250 "
                              "--delta 1e-5"),
        0);
    assert_true(test_file_contains(e->log, "epsilon 7.32911117144\n"));
    assert_true(test_file_contains(e->log, "order 3.9\n"));
    assert_int_equal(
        test_run_tern(e->log, "dp epsilon --sample-rate 0.04 --noise-multiplier 1.5 --steps 2250 "
                              "--delta 1e-5 --accountant rdp"),
        0);
    assert_true(test_file_contains(e->log, "epsilon 7.32911117144\n"));
    /* opacus/tests/prv_accountant.py: sigma 1.5, q 0.05, 100 steps, delta 1e-6. */
    assert_int_equal(
        test_run_tern(e->log, "dp epsilon --sample-rate 0.05 --noise-multiplier 1.5 --steps 100 "
                              "--delta 1e-6 --accountant prv"),
        0);
    assert_true(test_file_contains(e->log, "epsilon 1.953853"));
    assert_true(test_file_contains(e->log, "lower "));
}

static void noise_reference(void **state)
{
    env *e = *state;
    /* opacus/tests/accountants_test.py: 1.3562 to 4 places. */
    assert_int_equal(test_run_tern(e->log, "dp noise --sample-rate 0.04 --steps 2000 --delta 1e-5 "
                                           "--target-epsilon 8"),
                     0);
    assert_true(test_file_contains(e->log, "noise_multiplier 1.3562"));
    assert_true(test_file_contains(e->log, "epsilon 7.99"));
}

static void help_and_errors(void **state)
{
    env *e = *state;
    assert_int_equal(test_run_tern(e->log, "--help"), 0);
    assert_true(test_file_contains(e->log, "  dp "));
    assert_int_equal(test_run_tern(e->log, "dp --help"), 0);
    assert_true(test_file_contains(e->log, "epsilon"));
    assert_int_equal(test_run_tern(e->log, "dp epsilon --help"), 0);
    assert_true(test_file_contains(
        e->log, "tern dp epsilon --sample-rate 0.04 --noise-multiplier 1.5 --steps 2250"));
    assert_int_equal(test_run_tern(e->log, "dp noise --help"), 0);
    assert_true(test_file_contains(e->log, "--target-epsilon"));

    assert_int_equal(test_run_tern(e->log, "dp"), 1);
    assert_int_equal(test_run_tern(e->log, "dp budget"), 1);
    assert_true(test_file_contains(e->log, "unknown subcommand 'budget'"));
    assert_int_equal(test_run_tern(e->log, "dp epsilon --sample-rate 0.04 --steps 10 --delta 1e-5"),
                     1);
    assert_true(test_file_contains(e->log, "--noise-multiplier is required"));
    assert_int_equal(test_run_tern(e->log,
                                   "dp epsilon --sample-rate 1.5 --noise-multiplier 1 --steps 10 "
                                   "--delta 1e-5"),
                     1);
    assert_true(test_file_contains(e->log, "bad value '1.5' for --sample-rate"));
    assert_int_equal(test_run_tern(e->log,
                                   "dp epsilon --sample-rate 0.1 --noise-multiplier 1 --steps 10 "
                                   "--delta 1"),
                     1);
    assert_true(test_file_contains(e->log, "--delta"));
    assert_int_equal(test_run_tern(e->log,
                                   "dp epsilon --sample-rate 0.1 --noise-multiplier 1 --steps 10 "
                                   "--delta 1e-5 --accountant gdp"),
                     1);
    assert_true(test_file_contains(e->log, "unknown --accountant 'gdp'"));
    assert_int_equal(test_run_tern(e->log, "dp noise --sample-rate 0.1 --steps 10 --delta 1e-5 "
                                           "--target-epsilon 1 --noise-multiplier 2"),
                     1);
    assert_true(test_file_contains(e->log, "does not apply"));
    assert_int_equal(test_run_tern(e->log,
                                   "dp epsilon --sample-rate 0.1 --noise-multiplier 1 --steps 10 "
                                   "--delta 1e-5 --lr 0.1"),
                     1);
    assert_true(test_file_contains(e->log, "--lr does not apply"));
}

/* Whether the Fashion-MNIST files are installed (the training tests skip otherwise). */
static bool have_fashion_mnist(void)
{
    const char *dir = getenv("TERN_FASHION_MNIST");
    char probe[1024];
    snprintf(probe, sizeof probe, "%s/train-images-idx3-ubyte.gz",
             dir && *dir ? dir : "/usr/share/datasets/fashion-mnist");
    return access(probe, R_OK) == 0;
}

/* DP-SGD training on a sliver of Fashion-MNIST (skipped without the dataset). */
static void train_dp(void **state)
{
    env *e = *state;
    if (!have_fashion_mnist())
        skip();
    const char *common = "train --data fashion-mnist --limit 96 --val-limit 32 --epochs 1 "
                         "--width-mult 0.25 --batch 32 --no-progress";
    assert_int_equal(test_run_tern(e->log, "%s --dp --norm batch --noise-multiplier 1", common), 1);
    assert_true(test_file_contains(e->log, "--dp needs --norm group"));
    assert_int_equal(test_run_tern(e->log, "%s --dp", common), 1);
    assert_true(
        test_file_contains(e->log, "--dp needs one of --target-epsilon and --noise-multiplier"));
    assert_int_equal(test_run_tern(e->log, "%s --max-grad-norm 1", common), 1);
    assert_true(test_file_contains(e->log, "need --dp"));
    assert_int_equal(
        test_run_tern(e->log, "%s --dp --noise-multiplier 1 --clip-grad-norm 1", common), 1);
    assert_true(test_file_contains(e->log, "--clip-grad-norm does not apply with --dp"));

    char out[128];
    snprintf(out, sizeof out, "%s/m.safetensors", e->dir);
    assert_int_equal(
        test_run_tern(e->log,
                      "%s --dp --target-epsilon 8 --delta 1e-3 --max-grad-norm 1.5 --out '%s'",
                      common, out),
        0);
    assert_true(test_file_contains(e->log, "DP-SGD: sample rate 0.333333 (expected batch 32.0)"));
    assert_true(test_file_contains(e->log, "max grad norm 1.5, 3 steps"));
    assert_true(test_file_contains(e->log, "epoch 1/1: privacy spent epsilon "));
    assert_true(test_file_contains(e->log, "differential privacy: epsilon "));
    assert_true(test_file_contains(e->log, "at delta 0.001 (rdp accountant"));
    assert_int_equal(unlink(out), 0);
}

/* The first line of the log starting with prefix, into line (empty if none). */
static void log_line(env *e, const char *prefix, char *line, size_t size)
{
    line[0] = 0;
    FILE *f = fopen(e->log, "r");
    assert_non_null(f);
    char buf[1024];
    while (fgets(buf, sizeof buf, f))
        if (strncmp(buf, prefix, strlen(prefix)) == 0) {
            snprintf(line, size, "%s", buf);
            break;
        }
    fclose(f);
}

/* --ema: each epoch reports the average and the last weights, the run reports the updates,
 * and the saved model is the average (tern eval of it prints the run's final metrics). */
static void train_dp_ema(void **state)
{
    env *e = *state;
    if (!have_fashion_mnist())
        skip();
    const char *common = "train --data fashion-mnist --limit 96 --val-limit 32 --epochs 2 "
                         "--width-mult 0.25 --batch 32 --no-progress --dp --noise-multiplier 0.5 "
                         "--lr 0.5";
    assert_int_equal(test_run_tern(e->log, "%s --ema 1", common), 1);
    assert_true(test_file_contains(e->log, "--ema"));
    assert_int_equal(test_run_tern(e->log, "%s --ema 0.9 --resume x.ckpt", common), 1);
    assert_true(test_file_contains(e->log, "--ema cannot be resumed"));

    char out[128], trained[1024], evaluated[1024];
    snprintf(out, sizeof out, "%s/m.safetensors", e->dir);
    assert_int_equal(test_run_tern(e->log, "%s --ema 0.9 --out '%s'", common, out), 0);
    assert_true(test_file_contains(e->log, "epoch 1/2: train loss "));
    assert_true(test_file_contains(e->log, "(weight average; last weights "));
    assert_true(
        test_file_contains(e->log, "weights: exponential moving average, decay 0.9, 6 updates"));
    log_line(e, "accuracy ", trained, sizeof trained);
    assert_true(trained[0] != 0);
    assert_int_equal(
        test_run_tern(e->log, "eval --model '%s' --data fashion-mnist --limit 32", out), 0);
    log_line(e, "accuracy ", evaluated, sizeof evaluated);
    assert_string_equal(trained, evaluated);
    assert_int_equal(unlink(out), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(epsilon_reference),
        cmocka_unit_test(noise_reference),
        cmocka_unit_test(help_and_errors),
        cmocka_unit_test(train_dp),
        cmocka_unit_test(train_dp_ema),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
