/* bench_quant: INT8 inference against Tern's fp32 inference, in the same run, as JSON lines.
 *
 * Measurements:
 *   latency   batch 1 at 224x224, 1 thread, MobileNetV3-Small and -Large (1000 classes, seeded
 *             initialisation, BatchNorm statistics perturbed so that folding is not trivial,
 *             calibrated on 4 random images): median of --iters runs of each after warm-up,
 *             the fp32 and int8 runs interleaved so that both see the same machine load;
 *             int8_over_fp32 = int8 median / fp32 median (wall clock), and the same from the
 *             thread's CPU time (steadier on a shared machine)
 *   fashion   the shipped Fashion-MNIST model (--weights), calibrated on 256 training images,
 *             evaluated on the whole test set (10,000 images, or --limit): fp32 and int8
 *             accuracy, top-1 agreement, and images/s of each at batch 100, 1 thread
 *   layers    with --layers: the int8 forward's time per op and per kind of op (mean of --iters
 *             profiled runs after the latency runs)
 * Options: --arch small|large (latency of one only), --method minmax|percentile|entropy and --fp32-layers K (the fashion run's observer
 *          and mixed precision), --requant float|fixed|both (requantization mode, default
 *          float; both: the latency runs time a float-mode and a fixed-mode qmodel of the same
 *          calibration interleaved with the fp32 runs, reporting fixed_over_float, and the
 *          fashion run prints one line per mode),
 *          --iters N (default 100), --qisa scalar|avx2|avx512vnni, --only latency|fashion,
 *          --weights PATH (default weights/fashion-mnist-small.safetensors),
 *          --data DIR (default /usr/share/datasets/fashion-mnist), --limit N. */
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tern.h"

typedef struct config {
    int iters, limit, fp32_layers;
    bool layers;
    int requant; /* a tern_requant_mode, or -1 for both */
    tern_qisa qisa;
    tern_quant_observer method;
    const char *only, *weights, *data, *arch;
} config;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* CPU time of the calling thread: on a loaded machine it leaves out the time the thread waited
 * for a core, which wall-clock time cannot. */
static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *x, int n)
{
    qsort(x, (size_t)n, sizeof *x, cmp_double);
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
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

/* Per-op time of the int8 forward: the median over iters profiled runs (a preempted run does
 * not move it), one JSON line per op, then the sums per kind of op. */
static int profile(tern_qmodel *q, float *logits, const float *x, int iters, const char *arch)
{
    size_t nops = tern_qmodel_op_count(q), n = nops + 1;
    double *t = calloc(n * (size_t)iters, sizeof *t), *med = calloc(n, sizeof *med);
    double *col = calloc((size_t)iters, sizeof *col), total = 0;
    if (!t || !med || !col) {
        free(t);
        free(med);
        free(col);
        return 1;
    }
    for (int r = 0; r < iters; r++)
        tern_qmodel_forward_profile(q, logits, x, 1, t + (size_t)r * n);
    for (size_t i = 0; i < n; i++) {
        for (int r = 0; r < iters; r++)
            col[r] = t[(size_t)r * n + i];
        med[i] = median(col, iters);
        total += med[i];
    }
    const char *kinds[] = {"quantize", "conv", "conv1x1", "depthwise", "linear", "logits",
                           "avgpool", "se_gate", "add"};
    double by_kind[sizeof kinds / sizeof *kinds] = {0};
    for (size_t i = 0; i < n; i++) {
        tern_qop_info info = {.kind = "quantize", .name = ""};
        if (i > 0)
            tern_qmodel_op_info(q, i - 1, &info);
        for (size_t k = 0; k < sizeof kinds / sizeof *kinds; k++)
            by_kind[k] += strcmp(info.kind, kinds[k]) ? 0 : med[i];
        emit(json_pack("{s:s,s:s,s:i,s:s,s:s,s:[iii],s:[iii],s:i,s:i,s:f,s:f}", "bench",
                       "quant_layer", "arch", arch, "op", (int)i - 1, "kind", info.kind, "name",
                       info.name, "in", info.in_h, info.in_w, info.in_c, "out", info.out_h,
                       info.out_w, info.out_c, "k", info.k, "stride", info.stride, "ms",
                       1e3 * med[i], "share", med[i] / total));
    }
    json_t *sum = json_object();
    for (size_t k = 0; k < sizeof kinds / sizeof *kinds; k++)
        json_object_set_new(sum, kinds[k], json_real(1e3 * by_kind[k]));
    emit(json_pack("{s:s,s:s,s:f,s:o}", "bench", "quant_layer_kinds", "arch", arch,
                   "sum_of_medians_ms", 1e3 * total, "ms", sum));
    free(t);
    free(med);
    free(col);
    return 0;
}

static int latency(tern_arch arch, const config *cfg)
{
    const int size = 224, ncalib = 4;
    tern_model_options opt = tern_model_options_default(arch);
    opt.seed = 1;
    tern_error err = {{0}};
    tern_model *m = NULL;
    tern_qmodel *q = NULL, *qx = NULL; /* qx: the fixed-mode qmodel with --requant both */
    int rc = 1;
    size_t image = (size_t)size * size * 3;
    float *x = malloc(sizeof(float) * image * ncalib);
    float *logits = malloc(sizeof(float) * (size_t)opt.num_classes);
    double *tf = malloc(sizeof(double) * (size_t)cfg->iters);
    double *tq = malloc(sizeof(double) * (size_t)cfg->iters);
    double *tx = malloc(sizeof(double) * (size_t)cfg->iters);
    double *cf = malloc(sizeof(double) * (size_t)cfg->iters);
    double *cq = malloc(sizeof(double) * (size_t)cfg->iters);
    double *cx = malloc(sizeof(double) * (size_t)cfg->iters);
    if (!x || !logits || !tf || !tq || !tx || !cf || !cq || !cx ||
        tern_model_create(&opt, &m, &err) != TERN_OK) {
        fprintf(stderr, "bench_quant: %s\n", err.message[0] ? err.message : "out of memory");
        goto done;
    }
    tern_rng rng;
    tern_rng_seed(&rng, 7);
    for (size_t i = 0; i < image * ncalib; i++)
        x[i] = (float)tern_rng_normal(&rng);
    for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(m, i);
        for (size_t j = 0; strstr(t->name, "running_") && j < t->count; j++)
            t->data[j] = strstr(t->name, "mean") ? 0.1f * (float)tern_rng_normal(&rng)
                                                  : 0.5f + (float)tern_rng_uniform(&rng);
    }
    tern_model_invalidate(m);
    const bool both = cfg->requant < 0;
    tern_qmodel_options qo = {.height = size, .width = size, .max_batch = 1, .calib_batch = 2,
                              .isa = cfg->qisa,
                              .requant = both ? TERN_REQUANT_FLOAT
                                              : (tern_requant_mode)cfg->requant};
    double t0 = now();
    if (tern_qmodel_create(m, x, ncalib, &qo, &q, &err) != TERN_OK) {
        fprintf(stderr, "bench_quant: %s\n", err.message);
        goto done;
    }
    double build_s = now() - t0;
    qo.requant = TERN_REQUANT_FIXED;
    if (both && tern_qmodel_create(m, x, ncalib, &qo, &qx, &err) != TERN_OK) {
        fprintf(stderr, "bench_quant: %s\n", err.message);
        goto done;
    }
    if (tern_model_plan(m, 1, size, size, false) != TERN_OK) {
        fprintf(stderr, "bench_quant: %s\n", tern_model_last_error(m));
        goto done;
    }
    for (int r = -3; r < cfg->iters; r++) {
        /* fp32, then the int8 modes in alternating order (neither always follows fp32) */
        t0 = now();
        double c0 = cpu_now();
        tern_model_forward(m, logits, x, 1, false);
        double t1 = now(), c1 = cpu_now();
        tern_qmodel *first = both && r % 2 ? qx : q, *second = first == q ? qx : q;
        tern_qmodel_forward(first, logits, x, 1);
        double t2 = now(), c2 = cpu_now(), t3 = t2, c3 = c2;
        if (both) {
            tern_qmodel_forward(second, logits, x, 1);
            t3 = now();
            c3 = cpu_now();
        }
        if (r >= 0) {
            tf[r] = t1 - t0;
            cf[r] = c1 - c0;
            bool q_first = first == q;
            tq[r] = q_first ? t2 - t1 : t3 - t2;
            cq[r] = q_first ? c2 - c1 : c3 - c2;
            tx[r] = q_first ? t3 - t2 : t2 - t1;
            cx[r] = q_first ? c3 - c2 : c2 - c1;
        }
    }
    double mf = median(tf, cfg->iters), mq = median(tq, cfg->iters);
    double mcf = median(cf, cfg->iters), mcq = median(cq, cfg->iters);
    json_t *row = json_pack(
        "{s:s,s:s,s:i,s:i,s:i,s:i,s:s,s:s,s:s,s:f,s:f,s:f,s:f,s:f,s:f,s:f}", "bench",
        "quant_latency", "arch", tern_arch_name(arch), "size", size, "batch", 1, "threads", 1,
        "iters", cfg->iters, "fp32_isa", tern_isa_name(tern_isa_resolve(TERN_ISA_AUTO)),
        "int8_isa", tern_qisa_name(tern_qmodel_isa(q)), "requant",
        tern_requant_mode_name(tern_qmodel_requant(q)), "fp32_ms", 1e3 * mf, "int8_ms", 1e3 * mq,
        "int8_over_fp32", mq / mf, "fp32_cpu_ms", 1e3 * mcf, "int8_cpu_ms", 1e3 * mcq,
        "int8_over_fp32_cpu", mcq / mcf, "quantize_s", build_s);
    if (row && both) {
        double mx = median(tx, cfg->iters), mcx = median(cx, cfg->iters);
        json_object_set_new(row, "int8_fixed_ms", json_real(1e3 * mx));
        json_object_set_new(row, "int8_fixed_cpu_ms", json_real(1e3 * mcx));
        json_object_set_new(row, "fixed_over_float", json_real(mx / mq));
        json_object_set_new(row, "fixed_over_float_cpu", json_real(mcx / mcq));
    }
    emit(row);
    if (cfg->layers && profile(q, logits, x, cfg->iters, tern_arch_name(arch)) != 0)
        goto done;
    if (cfg->layers && both && profile(qx, logits, x, cfg->iters, tern_arch_name(arch)) != 0)
        goto done;
    rc = 0;
done:
    tern_qmodel_destroy(&q);
    tern_qmodel_destroy(&qx);
    tern_model_destroy(&m);
    free(x);
    free(logits);
    free(tf);
    free(tq);
    free(tx);
    free(cf);
    free(cq);
    free(cx);
    return rc;
}

static float *load_images(const tern_dataset *ds, const tern_transform *t, size_t first,
                          size_t stride, int n, int32_t *labels)
{
    size_t image = (size_t)t->size * t->size * t->channels;
    float *x = malloc(sizeof(float) * image * (size_t)n);
    tern_error err = {{0}};
    for (int i = 0; x && i < n; i++) {
        size_t idx = first + (size_t)i * stride;
        tern_image img = {0};
        if (tern_dataset_image(ds, idx, NULL, &img, &err) != TERN_OK ||
            tern_transform_apply(t, &img, NULL, x + (size_t)i * image) != TERN_OK) {
            fprintf(stderr, "bench_quant: image %zu: %s\n", idx, err.message);
            tern_image_free(NULL, &img);
            free(x);
            return NULL;
        }
        tern_image_free(NULL, &img);
        if (labels)
            labels[i] = tern_dataset_label(ds, idx);
    }
    return x;
}

static int argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        best = x[i] > x[best] ? i : best;
    return best;
}

static int fashion(const config *cfg, tern_requant_mode requant)
{
    const int calib_n = 256, batch = 100;
    tern_error err = {{0}};
    tern_safetensors *st = NULL;
    tern_model *m = NULL;
    tern_qmodel *q = NULL;
    tern_dataset *train = NULL, *test = NULL;
    tern_model_info info = {0};
    float *calib = NULL, *x = NULL, *lf = NULL, *lq = NULL;
    int32_t *labels = NULL;
    int rc = 1;
    tern_model_options mo = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    if (tern_safetensors_open(cfg->weights, NULL, &st, &err) != TERN_OK ||
        tern_model_options_from_metadata(st, &mo, &err) != TERN_OK ||
        tern_model_create(&mo, &m, &err) != TERN_OK ||
        tern_model_load_state(m, st, "", &err) != TERN_OK ||
        tern_model_info_read(st, &info, &err) != TERN_OK ||
        tern_dataset_open_fashion_mnist(cfg->data, true, NULL, &train, &err) != TERN_OK ||
        tern_dataset_open_fashion_mnist(cfg->data, false, NULL, &test, &err) != TERN_OK) {
        fprintf(stderr, "bench_quant: %s\n", err.message);
        goto done;
    }
    tern_transform t = {.size = info.input_size, .channels = mo.in_channels,
                        .resize = info.resize};
    for (int c = 0; c < 3; c++) {
        t.mean[c] = info.mean[c];
        t.std[c] = info.std[c] != 0 ? info.std[c] : 1;
    }
    int n = (int)tern_dataset_size(test);
    if (cfg->limit > 0 && cfg->limit < n)
        n = cfg->limit;
    n = n / batch * batch;
    const int k = mo.num_classes;
    labels = malloc(sizeof(int32_t) * (size_t)n);
    lf = malloc(sizeof(float) * (size_t)batch * k);
    lq = malloc(sizeof(float) * (size_t)batch * k);
    if (!labels || !lf || !lq ||
        !(calib = load_images(train, &t, 7, tern_dataset_size(train) / calib_n, calib_n, NULL)) ||
        !(x = load_images(test, &t, 0, 1, n, labels)))
        goto done;
    tern_qmodel_options qo = {.height = t.size, .width = t.size, .max_batch = batch,
                              .calib_batch = 64, .isa = cfg->qisa, .observer = cfg->method,
                              .fp32_layers = cfg->fp32_layers, .requant = requant};
    if (tern_qmodel_create(m, calib, calib_n, &qo, &q, &err) != TERN_OK ||
        tern_model_plan(m, batch, t.size, t.size, false) != TERN_OK) {
        fprintf(stderr, "bench_quant: %s\n", err.message);
        goto done;
    }
    size_t image = (size_t)t.size * t.size * t.channels;
    int agree = 0, right_f = 0, right_q = 0;
    double sf = 0, sq = 0;
    for (int b = 0; b < n; b += batch) {
        double t0 = now();
        tern_model_forward(m, lf, x + (size_t)b * image, batch, false);
        double t1 = now();
        tern_qmodel_forward(q, lq, x + (size_t)b * image, batch);
        sf += t1 - t0;
        sq += now() - t1;
        for (int i = 0; i < batch; i++) {
            int pf = argmax(lf + (size_t)i * k, k), pq = argmax(lq + (size_t)i * k, k);
            agree += pf == pq;
            right_f += pf == labels[b + i];
            right_q += pq == labels[b + i];
        }
    }
    emit(json_pack("{s:s,s:s,s:s,s:i,s:i,s:i,s:i,s:s,s:f,s:f,s:f,s:f,s:f}", "bench",
                   "quant_fashion", "requant", tern_requant_mode_name(requant),
                   "method", tern_quant_observer_name(cfg->method), "fp32_layers", cfg->fp32_layers,
                   "images", n, "calib_images", calib_n, "batch", batch, "int8_isa",
                   tern_qisa_name(tern_qmodel_isa(q)), "fp32_accuracy", (double)right_f / n,
                   "int8_accuracy", (double)right_q / n, "agreement", (double)agree / n,
                   "fp32_images_per_s", n / sf, "int8_images_per_s", n / sq));
    rc = 0;
done:
    tern_qmodel_destroy(&q);
    tern_model_destroy(&m);
    tern_safetensors_close(&st);
    tern_model_info_free(&info);
    tern_dataset_close(&train);
    tern_dataset_close(&test);
    free(calib);
    free(x);
    free(lf);
    free(lq);
    free(labels);
    return rc;
}

int main(int argc, char **argv)
{
    config cfg = {.iters = 100, .weights = "weights/fashion-mnist-small.safetensors",
                  .data = "/usr/share/datasets/fashion-mnist"};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--iters") && v)
            cfg.iters = atoi(argv[++i]);
        else if (!strcmp(a, "--limit") && v)
            cfg.limit = atoi(argv[++i]);
        else if (!strcmp(a, "--method") && v) {
            if (tern_quant_observer_parse(argv[++i], &cfg.method) != TERN_OK) {
                fprintf(stderr, "bench_quant: unknown method %s\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--fp32-layers") && v)
            cfg.fp32_layers = atoi(argv[++i]);
        else if (!strcmp(a, "--requant") && v) {
            tern_requant_mode mode;
            i++;
            if (!strcmp(v, "both")) {
                cfg.requant = -1;
            } else if (tern_requant_mode_parse(v, &mode) == TERN_OK) {
                cfg.requant = (int)mode;
            } else {
                fprintf(stderr, "bench_quant: unknown requant %s\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--layers"))
            cfg.layers = true;
        else if (!strcmp(a, "--arch") && v)
            cfg.arch = argv[++i];
        else if (!strcmp(a, "--only") && v)
            cfg.only = argv[++i];
        else if (!strcmp(a, "--weights") && v)
            cfg.weights = argv[++i];
        else if (!strcmp(a, "--data") && v)
            cfg.data = argv[++i];
        else if (!strcmp(a, "--qisa") && v) {
            i++;
            cfg.qisa = !strcmp(v, "scalar") ? TERN_QISA_SCALAR
                       : !strcmp(v, "avx2") ? TERN_QISA_AVX2
                                            : TERN_QISA_AVX512_VNNI;
        } else {
            fprintf(stderr, "usage: bench_quant [--iters N] [--layers] [--arch small|large] "
                            "[--method minmax|percentile|entropy] [--fp32-layers K] "
                            "[--requant float|fixed|both] "
                            "[--qisa scalar|avx2|avx512vnni] [--only latency|fashion] [--weights PATH] [--data DIR] [--limit N]\n");
            return 2;
        }
    }
    if (cfg.iters < 1)
        cfg.iters = 1;
    int rc = 0;
    if (!cfg.only || !strcmp(cfg.only, "latency")) {
        if (!cfg.arch || !strcmp(cfg.arch, "small"))
            rc |= latency(TERN_ARCH_MOBILENET_V3_SMALL, &cfg);
        if (!cfg.arch || !strcmp(cfg.arch, "large"))
            rc |= latency(TERN_ARCH_MOBILENET_V3_LARGE, &cfg);
    }
    if (!cfg.only || !strcmp(cfg.only, "fashion")) {
        if (cfg.requant < 0)
            rc |= fashion(&cfg, TERN_REQUANT_FLOAT) | fashion(&cfg, TERN_REQUANT_FIXED);
        else
            rc |= fashion(&cfg, (tern_requant_mode)cfg.requant);
    }
    return rc;
}
