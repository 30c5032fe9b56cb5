/* bench_dpsgd: the cost of DP-SGD over ordinary training, as JSON lines.
 *
 * For MobileNetV3-Small with GroupNorm in two configurations, Fashion-MNIST's (1x32x32, ten
 * classes, batch 128) and ImageNet's (3x224x224, 1000 classes, batch 32), it times in the same
 * run, interleaved step by step so that both see the same machine state:
 *   plain  train-mode forward, cross-entropy, backward (tern_model_*), the non-DP step;
 *   dp     tern_dp_step_grads: forward, backward, per-sample norms, clipped weight-gradient
 *          pass, noise (sigma 1), on the same batch;
 *   norms  tern_dp_sample_norms: forward, backward and per-sample norms only;
 * and prints the medians and dp / plain (Opacus reports 10x at best at 32x32 and 3.4x at 224
 * for its per-sample gradients). The optimizer step is left out of both: it is the same.
 *
 *   bench_dpsgd [--threads N] [--iters N] [--only fashion|224]
 * Inputs are random; weights are the seeded initialisation. */
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

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

typedef struct workload {
    const char *name;
    int in_channels, size, classes, batch;
} workload;

static int run(const workload *w, int threads, int iters)
{
    tern_model_options o = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    o.in_channels = w->in_channels;
    o.num_classes = w->classes;
    o.norm = TERN_NORM_GROUP;
    o.dropout = 0.0f;
    o.threads = threads;
    tern_model *m = NULL;
    tern_dp *dp = NULL;
    tern_error err = {{0}};
    int rc = 1;
    size_t in_floats = (size_t)w->batch * (size_t)w->size * (size_t)w->size * (size_t)w->in_channels;
    float *x = malloc(sizeof(float) * in_floats);
    float *logits = malloc(sizeof(float) * (size_t)w->batch * (size_t)w->classes);
    float *dlogits = malloc(sizeof(float) * (size_t)w->batch * (size_t)w->classes);
    float *norms = malloc(sizeof(float) * (size_t)w->batch);
    int32_t *y = malloc(sizeof(int32_t) * (size_t)w->batch);
    double *t_plain = malloc(sizeof(double) * (size_t)iters);
    double *t_dp = malloc(sizeof(double) * (size_t)iters);
    double *t_norms = malloc(sizeof(double) * (size_t)iters);
    if (!x || !logits || !dlogits || !norms || !y || !t_plain || !t_dp || !t_norms) {
        fprintf(stderr, "bench_dpsgd: out of memory\n");
        goto done;
    }
    tern_rng r;
    tern_rng_seed(&r, 1);
    for (size_t i = 0; i < in_floats; i++)
        x[i] = 2.0f * tern_rng_uniform(&r) - 1.0f;
    for (int i = 0; i < w->batch; i++)
        y[i] = (int32_t)(tern_rng_next(&r) % (uint64_t)w->classes);
    tern_dp_options dpo = {.max_grad_norm = 1.0, .noise_multiplier = 1.0,
                           .sample_rate = (double)w->batch / 60000.0,
                           .expected_batch = w->batch, .seed = 2};
    if (tern_model_create(&o, &m, &err) != TERN_OK || tern_dp_create(m, &dpo, &dp, &err) != TERN_OK) {
        fprintf(stderr, "bench_dpsgd: %s\n", err.message);
        goto done;
    }
    if (tern_model_plan(m, w->batch, w->size, w->size, true) != TERN_OK) {
        fprintf(stderr, "bench_dpsgd: %s\n", tern_model_last_error(m));
        goto done;
    }
    for (int it = -1; it < iters; it++) { /* iteration -1 warms up */
        double t0 = now();
        float loss;
        tern_model_zero_grad(m);
        if (tern_model_forward(m, logits, x, w->batch, true) != TERN_OK ||
            tern_cross_entropy_loss(&loss, dlogits, logits, y, w->batch, w->classes, 0.0f) !=
                TERN_OK ||
            tern_model_backward(m, dlogits) != TERN_OK) {
            fprintf(stderr, "bench_dpsgd: %s\n", tern_model_last_error(m));
            goto done;
        }
        double t1 = now();
        if (tern_dp_step_grads(dp, x, y, w->batch, &loss) != TERN_OK) {
            fprintf(stderr, "bench_dpsgd: %s\n", tern_dp_last_error(dp));
            goto done;
        }
        double t2 = now();
        if (tern_dp_sample_norms(dp, x, y, w->batch, norms, NULL) != TERN_OK) {
            fprintf(stderr, "bench_dpsgd: %s\n", tern_dp_last_error(dp));
            goto done;
        }
        double t3 = now();
        if (it >= 0) {
            t_plain[it] = t1 - t0;
            t_dp[it] = t2 - t1;
            t_norms[it] = t3 - t2;
        }
    }
    double plain = median(t_plain, iters), dps = median(t_dp, iters), nrm = median(t_norms, iters);
    json_t *obj = json_pack("{s:s,s:s,s:i,s:i,s:i,s:i,s:i,s:f,s:f,s:f,s:f,s:f}", "bench", "dpsgd",
                            "workload", w->name, "size", w->size, "batch", w->batch, "threads",
                            threads, "iters", iters, "classes", w->classes, "plain_ms",
                            1e3 * plain, "dp_ms", 1e3 * dps, "norms_ms", 1e3 * nrm,
                            "dp_over_plain", dps / plain, "norms_over_plain", nrm / plain);
    char *text = obj ? json_dumps(obj, JSON_COMPACT | JSON_REAL_PRECISION(6)) : NULL;
    if (text)
        printf("%s\n", text);
    free(text);
    json_decref(obj);
    fflush(stdout);
    rc = 0;
done:
    tern_dp_destroy(&dp);
    tern_model_destroy(&m);
    free(x);
    free(logits);
    free(dlogits);
    free(norms);
    free(y);
    free(t_plain);
    free(t_dp);
    free(t_norms);
    return rc;
}

int main(int argc, char **argv)
{
    int threads = 1, iters = 9;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--iters") == 0 && i + 1 < argc)
            iters = atoi(argv[++i]);
        else if (strcmp(argv[i], "--only") == 0 && i + 1 < argc)
            only = argv[++i];
        else {
            fprintf(stderr, "usage: bench_dpsgd [--threads N] [--iters N] [--only fashion|224]\n");
            return 2;
        }
    }
    if (threads < 1 || iters < 1) {
        fprintf(stderr, "bench_dpsgd: --threads and --iters must be >= 1\n");
        return 2;
    }
    static const workload W[] = {
        {"fashion", 1, 32, 10, 128},
        {"224", 3, 224, 1000, 32},
    };
    int rc = 0;
    for (size_t i = 0; i < sizeof W / sizeof *W; i++)
        if (!only || strcmp(only, W[i].name) == 0)
            rc |= run(&W[i], threads, iters);
    return rc;
}
