/* End-to-end tests of the `tern` command line (the binary named by $TERN_BIN): forward and
 * step on files cut from a golden fixture, compared with torchvision's numbers, and the
 * errors a person gets for bad invocations and bad files. */
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
    char dir[64];
    char weights[128], input[128], labels[128], out[128], log[128];
    tern_safetensors *fixture;
} env;

/* Copies the fixture tensors whose names start with `prefix` into path, without the prefix
 * and without metadata (as a torchvision export would be). */
static void write_subset(const tern_safetensors *st, const char *prefix, const char *path,
                         const char *only)
{
    tern_safetensors_writer *w = NULL;
    assert_int_equal(tern_safetensors_writer_create(NULL, &w), TERN_OK);
    size_t plen = strlen(prefix);
    for (size_t i = 0; i < tern_safetensors_count(st); i++) {
        tern_tensor_view v;
        assert_int_equal(tern_safetensors_get(st, i, &v), TERN_OK);
        if (strncmp(v.name, prefix, plen) != 0 || (only && strcmp(v.name, only) != 0))
            continue;
        assert_int_equal(tern_safetensors_writer_add(w, v.name + plen, v.dtype, v.ndim, v.shape,
                                                     v.data),
                         TERN_OK);
    }
    tern_error err;
    assert_int_equal(tern_safetensors_writer_write(w, path, &err), TERN_OK);
    tern_safetensors_writer_destroy(&w);
}

static int setup(void **state)
{
    env *e = calloc(1, sizeof *e);
    snprintf(e->dir, sizeof e->dir, "/tmp/tern-cli-XXXXXX");
    if (!e || !mkdtemp(e->dir))
        return -1;
    snprintf(e->weights, sizeof e->weights, "%s/w.safetensors", e->dir);
    snprintf(e->input, sizeof e->input, "%s/x.safetensors", e->dir);
    snprintf(e->labels, sizeof e->labels, "%s/l.safetensors", e->dir);
    snprintf(e->out, sizeof e->out, "%s/y.safetensors", e->dir);
    snprintf(e->log, sizeof e->log, "%s/log.txt", e->dir);
    char path[1024];
    snprintf(path, sizeof path, "%s/small_bn.safetensors", test_fixture_dir());
    if (tern_safetensors_open(path, NULL, &e->fixture, NULL) != TERN_OK)
        return -1;
    write_subset(e->fixture, "init.", e->weights, NULL);
    write_subset(e->fixture, "", e->input, "input");
    write_subset(e->fixture, "", e->labels, "labels");
    *state = e;
    return 0;
}

static int teardown(void **state)
{
    env *e = *state;
    tern_safetensors_close(&e->fixture);
    test_rm_tree(e->dir);
    free(e);
    return 0;
}

#define MODEL_ARGS "--arch mobilenet_v3_small --width-mult 0.3 --in-channels 1 --num-classes 10"

static void forward_matches_torchvision(void **state)
{
    env *e = *state;
    assert_int_equal(test_run_tern(e->log,
                                   "forward " MODEL_ARGS
                                   " --weights %s --input %s --output %s --threads 2",
                                   e->weights, e->input, e->out),
                     0);
    tern_safetensors *y = NULL;
    assert_int_equal(tern_safetensors_open(e->out, NULL, &y, NULL), TERN_OK);
    tern_tensor_view got, want;
    assert_int_equal(tern_safetensors_find(y, "logits", &got), TERN_OK);
    assert_int_equal(tern_safetensors_find(e->fixture, "logits_eval", &want), TERN_OK);
    assert_int_equal(got.ndim, 2);
    assert_int_equal(got.shape[0], 4);
    assert_int_equal(got.shape[1], 10);
    assert_true(test_close("cli logits", got.data, want.data, 40, 1e-4f, 0));
    tern_safetensors_close(&y);
}

static void step_matches_torchvision(void **state)
{
    env *e = *state;
    assert_int_equal(
        test_run_tern(e->log,
                      "step " MODEL_ARGS " --weights %s --input %s --labels %s --lr 0.1 "
                      "--momentum 0.9 --nesterov --weight-decay 1e-4 --label-smoothing 0.1 "
                      "--dropout 0 --output %s",
                      e->weights, e->input, e->labels, e->out),
        0);
    assert_true(test_file_contains(e->log, "loss 2.30"));
    tern_safetensors *w2 = NULL;
    assert_int_equal(tern_safetensors_open(e->out, NULL, &w2, NULL), TERN_OK);
    assert_string_equal(tern_safetensors_metadata(w2, "arch"), "mobilenet_v3_small");
    assert_string_equal(tern_safetensors_metadata(w2, "in_channels"), "1");
    size_t checked = 0;
    for (size_t i = 0; i < tern_safetensors_count(w2); i++) {
        tern_tensor_view got, want;
        char key[256];
        tern_safetensors_get(w2, i, &got);
        snprintf(key, sizeof key, "after.%s", got.name);
        assert_int_equal(tern_safetensors_find(e->fixture, key, &want), TERN_OK);
        assert_int_equal(got.nbytes, want.nbytes);
        if (got.dtype == TERN_DTYPE_I64) {
            assert_memory_equal(got.data, want.data, 8);
        } else {
            /* The golden test checks the step's change tightly; here the whole file. */
            assert_true(test_close(key, got.data, want.data, got.nbytes / 4, 1e-4f, 1e-3f));
        }
        checked++;
    }
    assert_int_equal(checked, 244);
    tern_safetensors_close(&w2);

    /* The written file carries its own metadata: forward needs no model options. */
    assert_int_equal(test_run_tern(e->log,
                                   "forward --weights %s --input %s --output %s/y2.safetensors",
                                   e->out, e->input, e->dir),
                     0);
}

static void bad_invocations(void **state)
{
    env *e = *state;
    assert_int_equal(test_run_tern(e->log, "--help"), 0);
    assert_true(test_file_contains(e->log, "forward"));
    assert_int_equal(test_run_tern(e->log, "forward --help"), 0);
    assert_true(test_file_contains(e->log, "--weights"));
    assert_int_equal(test_run_tern(e->log, "step --help"), 0);
    assert_int_equal(test_run_tern(e->log, "frobnicate"), 1);
    assert_true(test_file_contains(e->log, "unknown command"));
    assert_int_equal(
        test_run_tern(e->log, "forward " MODEL_ARGS " --input %s --output %s", e->input, e->out),
        1);
    assert_true(test_file_contains(e->log, "--weights is required"));
    /* No metadata and no --arch. */
    assert_int_equal(test_run_tern(e->log, "forward --weights %s --input %s --output %s",
                                   e->weights, e->input, e->out),
                     1);
    assert_true(test_file_contains(e->log, "--arch is required"));
    assert_int_equal(
        test_run_tern(e->log, "forward " MODEL_ARGS " --threads zero --weights %s", e->weights), 1);
    assert_true(test_file_contains(e->log, "bad value 'zero' for --threads"));
    /* Wrong class count: the error names the tensor and both shapes. */
    assert_int_equal(
        test_run_tern(e->log,
                      "forward --arch mobilenet_v3_small --width-mult 0.3 --in-channels 1 "
                      "--num-classes 11 --weights %s --input %s --output %s",
                      e->weights, e->input, e->out),
        1);
    assert_true(test_file_contains(e->log, "classifier.3.weight"));
    assert_true(test_file_contains(e->log, "[11, 304]"));
    assert_true(test_file_contains(e->log, "[10, 304]"));
    /* Input with the wrong channel count. */
    assert_int_equal(
        test_run_tern(e->log,
                      "forward --arch mobilenet_v3_small --width-mult 0.3 --in-channels 3 "
                      "--num-classes 10 --weights %s --input %s --output %s",
                      e->weights, e->input, e->out),
        1);
    /* A label outside [0, K). */
    assert_int_equal(
        test_run_tern(e->log,
                      "step --arch mobilenet_v3_small --width-mult 0.3 --in-channels 1 "
                      "--num-classes 10 --weights %s --input %s --labels %s --lr 0.1 "
                      "--output %s",
                      e->weights, e->input, e->input, e->out),
        1);
    assert_true(test_file_contains(e->log, "no tensor named 'labels'"));
}

static void truncated_weights(void **state)
{
    env *e = *state;
    char cut[160];
    snprintf(cut, sizeof cut, "%s/cut.safetensors", e->dir);
    FILE *in = fopen(e->weights, "rb"), *out = fopen(cut, "wb");
    assert_non_null(in);
    assert_non_null(out);
    char buf[4096];
    size_t n, total = 0;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0 && total < 300000) {
        fwrite(buf, 1, n, out);
        total += n;
    }
    fclose(in);
    fclose(out);
    assert_int_equal(test_run_tern(e->log,
                                   "forward " MODEL_ARGS " --weights %s --input %s --output %s",
                                   cut, e->input, e->out),
                     1);
    assert_true(test_file_contains(e->log, "cut.safetensors"));
    assert_int_equal(test_run_tern(e->log, "info %s", cut), 1);
    assert_int_equal(test_run_tern(e->log, "info %s", e->weights), 0);
    assert_true(test_file_contains(e->log, "features.0.0.weight"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(forward_matches_torchvision),
        cmocka_unit_test(step_matches_torchvision),
        cmocka_unit_test(bad_invocations),
        cmocka_unit_test(truncated_weights),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
