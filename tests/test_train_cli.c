/* End-to-end: `tern train` on an image folder the test draws, then `tern info`, `tern eval`,
 * `tern predict` and the embedding example (apps/examples/classify.c) on the result; a
 * training run killed with SIGKILL and resumed from its checkpoint ends bitwise where an
 * uninterrupted run ends. Binaries come from $TERN_BIN and $TERN_EXAMPLE (set by CTest). */
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "tern.h"
#include "testutil.h"

typedef struct env {
    char dir[64], data[96], model[128], log[128];
} env;

static const char *bin(const char *var, const char *fallback)
{
    const char *b = getenv(var);
    return b && *b ? b : fallback;
}

/* Class "red": a red square in the top-left quarter; "blue": a blue one bottom-right. */
static void draw(const char *path, int cls, test_rng *r)
{
    tern_image img = {.width = 36, .height = 36, .channels = 3};
    uint8_t px[36 * 36 * 3];
    img.data = px;
    int x0 = cls ? 18 : 2, y0 = cls ? 18 : 2;
    for (int y = 0; y < 36; y++)
        for (int x = 0; x < 36; x++) {
            bool in = x >= x0 && x < x0 + 14 && y >= y0 && y < y0 + 14;
            for (int c = 0; c < 3; c++) {
                int v = test_rng_int(r, 0, 60);
                if (in && c == (cls ? 2 : 0))
                    v += 180;
                px[(y * 36 + x) * 3 + c] = (uint8_t)v;
            }
        }
    tern_error err;
    assert_int_equal(tern_image_save_png(path, &img, &err), TERN_OK);
}

static int setup(void **state)
{
    env *e = calloc(1, sizeof *e);
    snprintf(e->dir, sizeof e->dir, "/tmp/tern-train-XXXXXX");
    if (!e || !mkdtemp(e->dir))
        return -1;
    snprintf(e->data, sizeof e->data, "%s/data", e->dir);
    snprintf(e->model, sizeof e->model, "%s/model.safetensors", e->dir);
    snprintf(e->log, sizeof e->log, "%s/log.txt", e->dir);
    mkdir(e->data, 0755);
    test_rng r = {42};
    const char *names[2] = {"blue", "red"};
    for (int cls = 0; cls < 2; cls++) {
        char path[256];
        snprintf(path, sizeof path, "%s/%s", e->data, names[cls]);
        mkdir(path, 0755);
        for (int i = 0; i < 24; i++) {
            snprintf(path, sizeof path, "%s/%s/%02d.png", e->data, names[cls], i);
            draw(path, cls == 1 ? 0 : 1, &r);
        }
    }
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

#define TRAIN_ARGS "--width-mult 0.25 --size 32 --batch 8 --val-split 0.25 --lr 0.05 --no-progress"

static void train_then_use(void **state)
{
    env *e = *state;
    const char *tern = bin("TERN_BIN", "./tern");
    char json[160];
    snprintf(json, sizeof json, "%s/metrics.json", e->dir);
    assert_int_equal(test_run_exe(e->log, tern,
                                  "train --data %s --epochs 2 " TRAIN_ARGS
                                  " --out %s --metrics-json %s",
                                  e->data, e->model, json),
                     0);
    assert_true(test_file_contains(e->log, "epoch 2/2"));
    assert_true(test_file_contains(e->log, "saved"));
    char *metrics = test_slurp(json);
    assert_non_null(metrics);
    assert_non_null(strstr(metrics, "\"accuracy\""));
    free(metrics);

    /* What inference needs is in the file. */
    assert_int_equal(test_run_exe(e->log, tern, "info %s", e->model), 0);
    assert_true(test_file_contains(e->log, "class_names: [\"blue\",\"red\"]"));
    assert_true(test_file_contains(e->log, "input_size: 32"));

    assert_int_equal(test_run_exe(e->log, tern, "eval --model %s --data %s", e->model, e->data), 0);
    assert_true(test_file_contains(e->log, "accuracy"));
    assert_true(test_file_contains(e->log, "confusion matrix"));

    /* predict and the embedding example agree on the best class. */
    char img[160];
    snprintf(img, sizeof img, "%s/red/03.png", e->data);
    assert_int_equal(test_run_exe(e->log, tern, "predict --model %s --top 2 %s", e->model, img), 0);
    char *pred = test_slurp(e->log);
    assert_non_null(pred);
    char *colon = strstr(pred, ": ");
    assert_non_null(colon);
    char best[32] = {0};
    sscanf(colon + 2, "%31s", best);
    assert_true(strcmp(best, "red") == 0 || strcmp(best, "blue") == 0);
    free(pred);
    assert_int_equal(
        test_run_exe(e->log, bin("TERN_EXAMPLE", "./example_classify"), "%s %s", e->model, img), 0);
    assert_true(test_file_contains(e->log, best));

    /* Errors a person can make. */
    assert_int_equal(
        test_run_exe(e->log, tern, "predict --model %s %s/nothing.png", e->model, e->dir), 1);
    assert_true(test_file_contains(e->log, "nothing.png"));
    assert_int_equal(test_run_exe(e->log, tern, "train --data %s/missing " TRAIN_ARGS, e->dir), 1);
    assert_true(test_file_contains(e->log, "neither fashion-mnist nor a directory"));
    assert_int_equal(test_run_exe(e->log, tern, "train --data %s --reset-head", e->data), 1);
    assert_true(test_file_contains(e->log, "--reset-head needs --init"));
    assert_int_equal(
        test_run_exe(e->log, tern, "train --data %s --optimizer lamb " TRAIN_ARGS, e->data), 1);
    assert_true(test_file_contains(e->log, "unknown --optimizer 'lamb'"));
    assert_int_equal(test_run_exe(e->log, tern, "train --help"), 0);
    assert_true(test_file_contains(e->log, "--checkpoint"));

    /* Fine-tuning from the trained weights with a new head. */
    char tuned[160];
    snprintf(tuned, sizeof tuned, "%s/tuned.safetensors", e->dir);
    assert_int_equal(test_run_exe(e->log, tern,
                                  "train --data %s --epochs 1 " TRAIN_ARGS
                                  " --init %s --reset-head --out %s",
                                  e->data, e->model, tuned),
                     0);
}

static bool same_state(const char *a, const char *b)
{
    tern_safetensors *x = NULL, *y = NULL;
    assert_int_equal(tern_safetensors_open(a, NULL, &x, NULL), TERN_OK);
    assert_int_equal(tern_safetensors_open(b, NULL, &y, NULL), TERN_OK);
    bool same = tern_safetensors_count(x) == tern_safetensors_count(y);
    for (size_t i = 0; same && i < tern_safetensors_count(x); i++) {
        tern_tensor_view u, v;
        tern_safetensors_get(x, i, &u);
        same = tern_safetensors_find(y, u.name, &v) == TERN_OK && u.nbytes == v.nbytes &&
               memcmp(u.data, v.data, u.nbytes) == 0;
        if (!same)
            fprintf(stderr, "tensor %s differs\n", u.name);
    }
    tern_safetensors_close(&x);
    tern_safetensors_close(&y);
    return same;
}

static void killed_and_resumed(void **state)
{
    env *e = *state;
    const char *tern = bin("TERN_BIN", "./tern");
    char whole[160], part[160], ckpt[160];
    snprintf(whole, sizeof whole, "%s/whole.safetensors", e->dir);
    snprintf(part, sizeof part, "%s/part.safetensors", e->dir);
    snprintf(ckpt, sizeof ckpt, "%s/run.ckpt", e->dir);
    assert_int_equal(test_run_exe(e->log, tern,
                                  "train --data %s --epochs 30 --dropout 0.2 " TRAIN_ARGS
                                  " --out %s",
                                  e->data, whole),
                     0);

    /* The same run, killed once its first checkpoint exists. */
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "exec '%s' train --data %s --epochs 30 --dropout 0.2 " TRAIN_ARGS
                              " --checkpoint %s --out %s >/dev/null 2>&1",
             tern, e->data, ckpt, part);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    struct stat st;
    struct timespec tick = {0, 5000000};
    for (int i = 0; i < 6000 && stat(ckpt, &st) != 0; i++)
        nanosleep(&tick, NULL);
    kill(pid, SIGKILL);
    int status;
    waitpid(pid, &status, 0);
    assert_int_equal(stat(ckpt, &st), 0);
    tern_checkpoint_info info;
    assert_int_equal(tern_checkpoint_peek(ckpt, NULL, NULL, NULL, NULL, &info, NULL), TERN_OK);
    assert_true(info.epoch >= 1 && info.epoch < 30); /* really interrupted */

    assert_int_equal(test_run_exe(e->log, tern,
                                  "train --data %s --epochs 30 --dropout 0.2 " TRAIN_ARGS
                                  " --resume %s --out %s",
                                  e->data, ckpt, part),
                     0);
    assert_true(test_file_contains(e->log, "resuming"));
    assert_true(same_state(whole, part));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(train_then_use),
        cmocka_unit_test(killed_and_resumed),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
