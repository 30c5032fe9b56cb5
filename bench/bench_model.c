/* bench_model: whole-model timings of Tern's MobileNetV3, printed as JSON.
 *
 * For each architecture: fp32 inference latency at batch 1 (eval mode, median and minimum over
 * --iters runs after warm-up) and training throughput at --train-batch (forward in train mode,
 * cross-entropy, backward, SGD step; images per second over --train-iters steps after one
 * warm-up step). Inputs are random; weights are the seeded torchvision-style initialisation.
 *
 * usage: bench_model [--arch small|large|all] [--size 224] [--threads N] [--iters 30]
 *                    [--train-batch 32] [--train-iters 3] [--no-train]
 * Peers (PyTorch, onnxruntime) are timed by ../shared/peers/run.sh; ratios belong in the README. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tern.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct config {
    int size, threads, iters, train_batch, train_iters;
    bool train;
} config;

static void fill_random(float *x, size_t n, uint64_t seed)
{
    tern_rng rng;
    tern_rng_seed(&rng, seed);
    for (size_t i = 0; i < n; i++)
        x[i] = (float)tern_rng_normal(&rng);
}

/* Adds the measurements for one architecture to `out`; returns 0 on success. */
static int bench_arch(tern_arch arch, const config *cfg, json_t *out)
{
    tern_model_options opt = tern_model_options_default(arch);
    opt.threads = cfg->threads;
    opt.seed = 1;
    tern_error err = {{0}};
    tern_model *m = NULL;
    if (tern_model_create(&opt, &m, &err) != TERN_OK) {
        fprintf(stderr, "bench_model: %s\n", err.message);
        return 1;
    }
    int rc = 1, n = cfg->train ? cfg->train_batch : 1;
    size_t pixels = (size_t)cfg->size * (size_t)cfg->size * 3;
    float *x = malloc(sizeof(float) * pixels * (size_t)n);
    float *logits = malloc(sizeof(float) * 1000 * (size_t)n);
    float *dlogits = malloc(sizeof(float) * 1000 * (size_t)n);
    int32_t *labels = malloc(sizeof(int32_t) * (size_t)n);
    double *times = malloc(sizeof(double) * (size_t)cfg->iters);
    tern_sgd *sgd = NULL;
    if (!x || !logits || !dlogits || !labels || !times)
        goto done;
    fill_random(x, pixels * (size_t)n, 7);
    for (int i = 0; i < n; i++)
        labels[i] = (i * 37) % 1000;

    json_t *rec = json_object();
    json_object_set_new(rec, "arch", json_string(tern_arch_name(arch)));
    json_object_set_new(rec, "threads", json_integer(cfg->threads));
    json_object_set_new(rec, "size", json_integer(cfg->size));
    json_object_set_new(rec, "params", json_integer((json_int_t)tern_model_param_count(m)));
    json_array_append_new(out, rec);

    /* Inference, batch 1. */
    if (tern_model_plan(m, 1, cfg->size, cfg->size, false) != TERN_OK)
        goto plan_failed;
    for (int i = 0; i < 3; i++)
        tern_model_forward(m, logits, x, 1, false);
    for (int i = 0; i < cfg->iters; i++) {
        double t0 = now();
        tern_model_forward(m, logits, x, 1, false);
        times[i] = now() - t0;
    }
    qsort(times, (size_t)cfg->iters, sizeof *times, cmp_double);
    json_object_set_new(rec, "infer_b1_ms_median", json_real(1e3 * times[cfg->iters / 2]));
    json_object_set_new(rec, "infer_b1_ms_min", json_real(1e3 * times[0]));
    fprintf(stderr, "%s: inference batch 1: %.2f ms median\n", tern_arch_name(arch),
            1e3 * times[cfg->iters / 2]);

    if (cfg->train) {
        int b = cfg->train_batch;
        if (tern_model_plan(m, b, cfg->size, cfg->size, true) != TERN_OK)
            goto plan_failed;
        tern_sgd_options so = {.lr = 0.01f, .momentum = 0.9f, .weight_decay = 1e-5f};
        if (tern_sgd_create(m, &so, &sgd, &err) != TERN_OK)
            goto done;
        json_object_set_new(rec, "train_batch", json_integer(b));
        json_object_set_new(rec, "train_plan_mib",
                            json_real((double)tern_model_plan_bytes(m) / (1 << 20)));
        double total = 0;
        for (int step = 0; step <= cfg->train_iters; step++) {
            float loss;
            double t0 = now();
            tern_model_forward(m, logits, x, b, true);
            tern_cross_entropy_loss(&loss, dlogits, logits, labels, b, 1000, 0.0f);
            tern_model_zero_grad(m);
            tern_model_backward(m, dlogits);
            tern_sgd_step(sgd);
            if (step > 0) /* step 0 warms up */
                total += now() - t0;
        }
        double ips = cfg->train_iters * b / total;
        json_object_set_new(rec, "train_images_per_s", json_real(ips));
        fprintf(stderr, "%s: training batch %d: %.1f images/s\n", tern_arch_name(arch), b, ips);
    }
    rc = 0;
    goto done;
plan_failed:
    fprintf(stderr, "bench_model: %s\n", tern_model_last_error(m));
done:
    tern_sgd_destroy(&sgd);
    tern_model_destroy(&m);
    free(x);
    free(logits);
    free(dlogits);
    free(labels);
    free(times);
    return rc;
}

static int usage(FILE *f, int rc)
{
    fprintf(f, "usage: bench_model [--arch small|large|all] [--size S] [--threads N] [--iters N]\n"
               "                   [--train-batch B] [--train-iters N] [--no-train]\n"
               "Prints a JSON array with one record per architecture.\n");
    return rc;
}

int main(int argc, char **argv)
{
    config cfg = {.size = 224, .threads = 1, .iters = 30, .train_batch = 32, .train_iters = 3,
                  .train = true};
    const char *arch = "all";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int *target = NULL;
        if (strcmp(a, "--help") == 0)
            return usage(stdout, 0);
        else if (strcmp(a, "--no-train") == 0)
            cfg.train = false;
        else if (strcmp(a, "--arch") == 0 && v)
            arch = argv[++i];
        else if (strcmp(a, "--size") == 0)
            target = &cfg.size;
        else if (strcmp(a, "--threads") == 0)
            target = &cfg.threads;
        else if (strcmp(a, "--iters") == 0)
            target = &cfg.iters;
        else if (strcmp(a, "--train-batch") == 0)
            target = &cfg.train_batch;
        else if (strcmp(a, "--train-iters") == 0)
            target = &cfg.train_iters;
        else
            return usage(stderr, 1);
        if (target) {
            if (!v || atoi(v) < 1)
                return usage(stderr, 1);
            *target = atoi(argv[++i]);
        }
    }
    if (cfg.size < 32 || (strcmp(arch, "all") && strcmp(arch, "small") && strcmp(arch, "large")))
        return usage(stderr, 1);
    json_t *out = json_array();
    int rc = 0;
    if (strcmp(arch, "large") != 0)
        rc |= bench_arch(TERN_ARCH_MOBILENET_V3_SMALL, &cfg, out);
    if (strcmp(arch, "small") != 0)
        rc |= bench_arch(TERN_ARCH_MOBILENET_V3_LARGE, &cfg, out);
    char *text = json_dumps(out, JSON_INDENT(2) | JSON_REAL_PRECISION(6));
    if (text)
        puts(text);
    free(text);
    json_decref(out);
    return rc;
}
