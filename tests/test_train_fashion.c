/* A CI-sized training run on the real data: MobileNetV3-Small (width 0.5) trained with
 * `tern train` on 4,000 Fashion-MNIST images for 8 epochs (fixed seed, 2 threads) must reach at
 * least 70% accuracy on 1,000 test images (chance: 10%). Seen: 76.5%. Needs Debian's
 * dataset-fashion-mnist (scripts/setup.sh installs it). */
#include <jansson.h>
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

static void fashion_mnist_learns(void **state)
{
    (void)state;
    const char *tern = getenv("TERN_BIN");
    char dir[] = "/tmp/tern-fashion-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "'%s' train --data fashion-mnist --limit 4000 --val-limit 1000 --epochs 8 "
             "--batch 64 --threads 2 --width-mult 0.5 --seed 1 --no-progress "
             "--out %s/m.safetensors --metrics-json %s/m.json >%s/log.txt 2>&1",
             tern && *tern ? tern : "./tern", dir, dir, dir);
    int status = system(cmd);
    char path[128];
    snprintf(path, sizeof path, "%s/m.json", dir);
    json_error_t jerr;
    json_t *metrics = json_load_file(path, 0, &jerr);
    double accuracy = metrics ? json_number_value(json_object_get(metrics, "accuracy")) : -1;
    size_t count = metrics ? (size_t)json_integer_value(json_object_get(metrics, "count")) : 0;
    json_decref(metrics);
    snprintf(cmd, sizeof cmd, "cat %s/log.txt >&2; rm -rf '%s'", dir, dir);
    if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0) || accuracy < 0.70)
        (void)!system(cmd);
    else {
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        (void)!system(cmd);
    }
    print_message("Fashion-MNIST accuracy %.2f%% on %zu test images\n", 100 * accuracy, count);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    assert_int_equal(count, 1000);
    assert_true(accuracy >= 0.70);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(fashion_mnist_learns)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
