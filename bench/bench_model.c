/* bench_model: whole-model and per-layer timings of Tern's MobileNetV3, printed as JSON lines.
 *
 * Measurements (each at every thread count of --threads, default 1 and 2):
 *   infer   fp32 eval-mode latency at batch 1 (median of --iters runs after warm-up) and
 *           throughput at batch 32, 224x224, Small and Large
 *   train   training images/s (train-mode forward, cross-entropy, backward, SGD step; median
 *           step time over --train-iters steps after one warm-up step) for Small at 224x224
 *           batch 32 and for the Fashion-MNIST configuration (Small, 1x32x32, 10 classes,
 *           batch 128)
 *   layers  with --layers: per-op forward (and backward, for training) time, GFLOP/s and share
 *           of the machine's nominal peak, for one of the configurations above
 * Inputs are random and weights are the seeded torchvision-style initialisation. Each line is one
 * JSON object. bench/peers.sh runs this next to PyTorch and onnxruntime and prints the ratios. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tern.h"

typedef struct workload {
    const char *name; /* "infer_b1", "infer_b32", "train_224", "train_fashion" */
    tern_arch arch;
    int in_channels, size, classes, batch;
    bool train;
} workload;

typedef struct config {
    int threads[4], nthreads;
    int iters, train_iters;
    const char *only; /* run only workloads whose name starts with this */
    const char *arch; /* and only this architecture ("small", "large"), when set */
    const char *layers; /* per-layer report for this workload name */
    tern_isa isa;
} config;

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

/* Nominal single-core fp32 peak in GFLOP/s: FMA units x lanes x 2 x clock. Assumes two FMA
 * units per core (server parts of this generation); the clock is the kernel's reported MHz. */
static double peak_gflops(tern_isa isa)
{
    double mhz = 0;
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "cpu MHz : %lf", &mhz) == 1)
            break;
    if (f)
        fclose(f);
    int lanes = isa == TERN_ISA_AVX512 ? 16 : isa == TERN_ISA_AVX2 ? 8 : 1;
    return 2.0 * lanes * 2.0 * mhz / 1000.0;
}

static void emit(json_t *obj)
{
    char *text = json_dumps(obj, JSON_COMPACT | JSON_REAL_PRECISION(6));
    if (text)
        puts(text);
    fflush(stdout);
    free(text);
    json_decref(obj);
}

static void report_layers(tern_model *m, const workload *w, int threads, int runs, double peak)
{
    size_t n = tern_model_profile_count(m);
    for (size_t i = 0; i < n; i++) {
        tern_op_profile p;
        tern_model_profile_at(m, i, &p);
        double fwd = p.forward_calls ? p.forward_s / p.forward_calls : 0;
        double bwd = p.backward_calls ? p.backward_s / p.backward_calls : 0;
        if (fwd + bwd == 0)
            continue;
        json_t *o = json_pack("{s:s,s:s,s:i,s:i,s:s,s:s,s:[i,i,i],s:f,s:f}", "bench", "layer",
                              "workload", w->name, "threads", threads, "index", (int)i, "kind",
                              p.kind, "name", p.name, "out_hwc", p.out_shape[0], p.out_shape[1],
                              p.out_shape[2], "forward_ms", 1e3 * fwd, "backward_ms", 1e3 * bwd);
        if (p.flops_per_image > 0 && fwd > 0) {
            double gf = p.flops_per_image * w->batch / fwd / 1e9;
            json_object_set_new(o, "forward_gflops", json_real(gf));
            json_object_set_new(o, "forward_peak_share", json_real(gf / peak));
        }
        emit(o);
    }
    (void)runs;
}

static int run_workload(const workload *w, const config *cfg, int threads)
{
    tern_model_options opt = tern_model_options_default(w->arch);
    opt.threads = threads;
    opt.in_channels = w->in_channels;
    opt.num_classes = w->classes;
    opt.seed = 1;
    opt.isa = cfg->isa;
    if (w->train)
        opt.dropout = 0.2f;
    tern_error err = {{0}};
    tern_model *m = NULL;
    tern_sgd *sgd = NULL;
    if (tern_model_create(&opt, &m, &err) != TERN_OK) {
        fprintf(stderr, "bench_model: %s\n", err.message);
        return 1;
    }
    int rc = 1, runs = w->train ? cfg->train_iters : cfg->iters;
    size_t pixels = (size_t)w->size * (size_t)w->size * (size_t)w->in_channels;
    float *x = malloc(sizeof(float) * pixels * (size_t)w->batch);
    float *logits = malloc(sizeof(float) * (size_t)w->classes * (size_t)w->batch);
    float *dlogits = malloc(sizeof(float) * (size_t)w->classes * (size_t)w->batch);
    int32_t *labels = malloc(sizeof(int32_t) * (size_t)w->batch);
    double *times = malloc(sizeof(double) * (size_t)runs);
    if (!x || !logits || !dlogits || !labels || !times)
        goto done;
    tern_rng rng;
    tern_rng_seed(&rng, 7);
    for (size_t i = 0; i < pixels * (size_t)w->batch; i++)
        x[i] = (float)tern_rng_normal(&rng);
    for (int i = 0; i < w->batch; i++)
        labels[i] = (int32_t)(tern_rng_next(&rng) % (uint64_t)w->classes);
    if (tern_model_plan(m, w->batch, w->size, w->size, w->train) != TERN_OK) {
        fprintf(stderr, "bench_model: %s\n", tern_model_last_error(m));
        goto done;
    }
    tern_sgd_options so = {.lr = 0.01f, .momentum = 0.9f, .weight_decay = 1e-5f};
    if (w->train && tern_sgd_create(m, &so, &sgd, &err) != TERN_OK)
        goto done;
    bool layers = cfg->layers && strcmp(cfg->layers, w->name) == 0;
    for (int r = -(w->train ? 1 : 3); r < runs; r++) {
        if (r == 0 && layers)
            tern_model_profile_enable(m, true);
        double t0 = now();
        tern_model_forward(m, logits, x, w->batch, w->train);
        if (w->train) {
            float loss;
            tern_cross_entropy_loss(&loss, dlogits, logits, labels, w->batch, w->classes, 0.0f);
            tern_model_zero_grad(m);
            tern_model_backward(m, dlogits);
            tern_sgd_step(sgd);
        }
        if (r >= 0)
            times[r] = now() - t0;
    }
    qsort(times, (size_t)runs, sizeof *times, cmp_double);
    double median = times[runs / 2];
    tern_isa isa = tern_isa_resolve(cfg->isa);
    emit(json_pack("{s:s,s:s,s:s,s:i,s:i,s:i,s:i,s:s,s:f,s:f,s:f,s:f}", "bench", "tern",
                   "workload", w->name, "arch", tern_arch_name(w->arch), "size", w->size,
                   "in_channels", w->in_channels, "batch", w->batch, "threads", threads, "isa",
                   tern_isa_name(isa), "median_ms", 1e3 * median, "min_ms", 1e3 * times[0],
                   "images_per_s", w->batch / median,
                   "plan_mib", (double)tern_model_plan_bytes(m) / (1 << 20)));
    fprintf(stderr, "%-14s %-19s %d thread%s: %9.3f ms  %8.1f images/s\n", w->name,
            tern_arch_name(w->arch), threads, threads > 1 ? "s" : " ", 1e3 * median,
            w->batch / median);
    if (layers)
        report_layers(m, w, threads, runs, peak_gflops(isa));
    rc = 0;
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

static const workload WORKLOADS[] = {
    {"infer_b1", TERN_ARCH_MOBILENET_V3_SMALL, 3, 224, 1000, 1, false},
    {"infer_b1", TERN_ARCH_MOBILENET_V3_LARGE, 3, 224, 1000, 1, false},
    {"infer_b32", TERN_ARCH_MOBILENET_V3_SMALL, 3, 224, 1000, 32, false},
    {"infer_b32", TERN_ARCH_MOBILENET_V3_LARGE, 3, 224, 1000, 32, false},
    {"train_224", TERN_ARCH_MOBILENET_V3_SMALL, 3, 224, 1000, 32, true},
    {"train_fashion", TERN_ARCH_MOBILENET_V3_SMALL, 1, 32, 10, 128, true},
};

static int usage(FILE *f, int rc)
{
    fprintf(f,
            "usage: bench_model [--only PREFIX] [--arch small|large] [--threads 1,2] [--iters N]\n"
            "                   [--train-iters N]\n"
            "                   [--layers WORKLOAD] [--isa auto|scalar|avx2|avx512]\n"
            "Workloads: infer_b1, infer_b32 (Small and Large, 224x224), train_224 (Small,\n"
            "batch 32), train_fashion (Small, 1x32x32, batch 128). Prints JSON lines; a summary\n"
            "goes to stderr. --layers adds per-op timings for that workload (whose first\n"
            "architecture is profiled).\n");
    return rc;
}

int main(int argc, char **argv)
{
    config cfg = {.threads = {1, 2}, .nthreads = 2, .iters = 50, .train_iters = 5};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0)
            return usage(stdout, 0);
        if (!v)
            return usage(stderr, 1);
        i++;
        if (strcmp(a, "--only") == 0) {
            cfg.only = v;
        } else if (strcmp(a, "--arch") == 0) {
            cfg.arch = v;
        } else if (strcmp(a, "--layers") == 0) {
            cfg.layers = v;
        } else if (strcmp(a, "--iters") == 0 && atoi(v) > 0) {
            cfg.iters = atoi(v);
        } else if (strcmp(a, "--train-iters") == 0 && atoi(v) > 0) {
            cfg.train_iters = atoi(v);
        } else if (strcmp(a, "--isa") == 0) {
            const char *names[] = {"auto", "scalar", "avx2", "avx512"};
            int k = 0;
            while (k < 4 && strcmp(v, names[k]) != 0)
                k++;
            if (k == 4)
                return usage(stderr, 1);
            cfg.isa = (tern_isa)k;
        } else if (strcmp(a, "--threads") == 0) {
            cfg.nthreads = 0;
            for (const char *p = v; *p && cfg.nthreads < 4;) {
                int t = atoi(p);
                if (t < 1 || t > 64)
                    return usage(stderr, 1);
                cfg.threads[cfg.nthreads++] = t;
                p = strchr(p, ',');
                p = p ? p + 1 : "";
            }
        } else {
            return usage(stderr, 1);
        }
    }
    int rc = 0;
    bool profiled = false;
    for (int t = 0; t < cfg.nthreads; t++)
        for (size_t i = 0; i < sizeof WORKLOADS / sizeof *WORKLOADS; i++) {
            workload w = WORKLOADS[i];
            if (cfg.only && strncmp(w.name, cfg.only, strlen(cfg.only)) != 0)
                continue;
            if (cfg.arch && !strstr(tern_arch_name(w.arch), cfg.arch))
                continue;
            config c = cfg;
            /* Profile the first architecture of the requested workload, at each thread count. */
            if (c.layers && strcmp(c.layers, w.name) == 0 && profiled && i > 0 &&
                strcmp(WORKLOADS[i - 1].name, w.name) == 0)
                c.layers = NULL;
            profiled = profiled || (c.layers && strcmp(c.layers, w.name) == 0);
            rc |= run_workload(&w, &c, cfg.threads[t]);
        }
    return rc;
}
