/* tern quantize: post-training INT8 quantization of a trained model file.
 *
 *   tern quantize --model M --calib-data fashion-mnist|DIR --out Q [options]
 *
 * Calibrates on images of the training split (Fashion-MNIST's training set, or a folder),
 * prints each layer's sensitivity (the network in float with only that layer quantized),
 * optionally keeps the most sensitive layers in float, writes the quantized file, then loads
 * it back and compares it with the float model on held-out images (Fashion-MNIST's test set,
 * or folder images not used for calibration): accuracy, top-1 agreement, file sizes.
 * Also here: the helpers `tern eval` and `tern predict` use to run quantized files. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "tern_quant.h"
#include "train_common.h"

#define DEFAULT_FASHION_DIR "/usr/share/datasets/fashion-mnist"

int tern_quant_open_model(const char *path, int max_batch, tern_qmodel **q,
                          tern_model_info *info)
{
    tern_error err = {{0}};
    tern_safetensors *st = NULL;
    if (tern_safetensors_open(path, NULL, &st, &err) != TERN_OK)
        return die("%s", err.message);
    if (!tern_qmodel_file_is_quantized(st)) {
        tern_safetensors_close(&st);
        return -1;
    }
    tern_qmodel_load_options lo = {.max_batch = max_batch};
    int rc = 0;
    if (tern_qmodel_load(st, &lo, q, &err) != TERN_OK)
        rc = die("%s: %s", path, err.message);
    else if (info && tern_model_info_read(st, info, &err) != TERN_OK) {
        rc = die("%s: %s", path, err.message);
        tern_qmodel_destroy(q);
    }
    tern_safetensors_close(&st);
    return rc;
}

int tern_quant_check_size(const tern_qmodel *q, int size)
{
    int h, w;
    tern_qmodel_shape(q, &h, &w, NULL, NULL);
    if (h != size || w != size)
        return die("the quantized model takes %dx%d images, not %dx%d (quantize again at that "
                   "size)",
                   h, w, size, size);
    return 0;
}

typedef struct qopts {
    const char *model, *calib_data, *out, *method, *requant;
    int calib_count, eval_count, fp32_layers, batch, threads;
    double percentile;
} qopts;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: tern quantize --model M.safetensors --calib-data fashion-mnist|DIR --out Q "
            "[options]\n\n"
            "Post-training INT8 quantization (TFLite's scheme: per-channel int8 weights, int8\n"
            "activations, int32 biases). Prints each layer's sensitivity, writes the quantized\n"
            "file and compares it with the float model on held-out images.\n\n"
            "  --calib-count N     calibration images (default 512)\n"
            "  --method M          minmax (default), percentile or entropy\n"
            "  --percentile P      for --method percentile (default 99.99)\n"
            "  --fp32-layers K     keep the K most sensitive layers in float (default 0)\n"
            "  --requant R         float (default): int32 sums scaled in single precision, as\n"
            "                      XNNPACK; fixed: TFLite's reference fixed point (Q31 multiplier\n"
            "                      and shift per channel). Recorded in the file\n"
            "  --eval-count N      held-out images to compare on (default 1000; 0: none)\n"
            "  --batch B           images per forward pass (default 100)\n"
            "  --threads N         calibration threads (default 1)\n");
}

static int parse(int argc, char **argv, qopts *o)
{
    static const struct option longs[] = {
        {"model", required_argument, 0, 'm'},      {"calib-data", required_argument, 0, 'd'},
        {"calib-count", required_argument, 0, 'n'}, {"method", required_argument, 0, 'M'},
        {"percentile", required_argument, 0, 'p'}, {"fp32-layers", required_argument, 0, 'k'},
        {"eval-count", required_argument, 0, 'e'},  {"out", required_argument, 0, 'o'},
        {"batch", required_argument, 0, 'b'},      {"threads", required_argument, 0, 't'},
        {"requant", required_argument, 0, 'R'},    {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    optind = 1;
    opterr = 0;
    int ch;
    while ((ch = getopt_long(argc, argv, "", longs, NULL)) != -1) {
        char *end = NULL;
        long v = optarg ? strtol(optarg, &end, 10) : 0;
        bool num_ok = optarg && *optarg && end && *end == 0;
        switch (ch) {
        case 'm': o->model = optarg; break;
        case 'd': o->calib_data = optarg; break;
        case 'o': o->out = optarg; break;
        case 'M': o->method = optarg; break;
        case 'R': o->requant = optarg; break;
        case 'p':
            o->percentile = strtod(optarg, &end);
            if (*end || !(o->percentile > 50 && o->percentile <= 100))
                return die("--percentile must be in (50, 100]");
            break;
        case 'n':
        case 'e':
        case 'k':
        case 'b':
        case 't': {
            long lo = ch == 'n' || ch == 'b' || ch == 't' ? 1 : 0;
            long hi = ch == 't' ? 256 : ch == 'b' ? 65536 : 10000000;
            if (!num_ok || v < lo || v > hi)
                return die("--%s needs an integer in [%ld, %ld]",
                           ch == 'n' ? "calib-count" : ch == 'e' ? "eval-count"
                           : ch == 'k' ? "fp32-layers" : ch == 'b' ? "batch" : "threads",
                           lo, hi);
            *(ch == 'n' ? &o->calib_count : ch == 'e' ? &o->eval_count
              : ch == 'k' ? &o->fp32_layers : ch == 'b' ? &o->batch : &o->threads) = (int)v;
            break;
        }
        case 'h': usage(stdout); return 2;
        default: return die("unknown or incomplete option '%s' (see --help)", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return die("unexpected argument '%s'", argv[optind]);
    if (!o->model || !o->calib_data || !o->out)
        return die("--model, --calib-data and --out are required (see --help)");
    return 0;
}

/* n images of ds (indices idx[0..n)) through transform t, NHWC; labels if not NULL. */
static float *load_images(const tern_dataset *ds, const tern_transform *t, const size_t *idx,
                          int n, int32_t *labels)
{
    size_t image = (size_t)t->size * t->size * t->channels;
    float *x = malloc(sizeof(float) * image * (size_t)(n > 0 ? n : 1));
    if (!x) {
        die("out of memory");
        return NULL;
    }
    tern_error err = {{0}};
    for (int i = 0; i < n; i++) {
        tern_image img = {0};
        if (tern_dataset_image(ds, idx[i], NULL, &img, &err) != TERN_OK ||
            tern_transform_apply(t, &img, NULL, x + (size_t)i * image) != TERN_OK) {
            die("image %zu: %s", idx[i], err.message[0] ? err.message : "cannot transform");
            tern_image_free(NULL, &img);
            free(x);
            return NULL;
        }
        tern_image_free(NULL, &img);
        if (labels)
            labels[i] = tern_dataset_label(ds, idx[i]);
    }
    return x;
}

static long file_size(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 ? (long)sb.st_size : -1;
}

static int argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        best = x[i] > x[best] ? i : best;
    return best;
}

static int cmp_sensitivity(const void *a, const void *b)
{
    double x = ((const tern_qop_info *)a)->sensitivity, y = ((const tern_qop_info *)b)->sensitivity;
    return (x < y) - (x > y);
}

static void print_sensitivity(const tern_qmodel *q)
{
    size_t n = tern_qmodel_op_count(q), m = 0;
    tern_qop_info *rows = calloc(n ? n : 1, sizeof *rows);
    if (!rows)
        return;
    for (size_t i = 0; i < n; i++) {
        tern_qop_info info;
        if (tern_qmodel_op_info(q, i, &info) == TERN_OK && info.sensitivity >= 0)
            rows[m++] = info;
    }
    qsort(rows, m, sizeof *rows, cmp_sensitivity);
    printf("layer sensitivity (float network with only that layer quantized, on the "
           "calibration images):\n");
    printf("%4s  %-10s %-34s %12s %10s  %s\n", "rank", "kind", "layer", "logit MSE", "agreement",
           "runs in");
    for (size_t i = 0; i < m; i++)
        printf("%4zu  %-10s %-34.34s %12.3e %9.1f%%  %s\n", i + 1, rows[i].kind, rows[i].name,
               rows[i].sensitivity, 100 * rows[i].agreement, rows[i].fp32 ? "fp32" : "int8");
    free(rows);
}

int tern_cmd_quantize(int argc, char **argv)
{
    qopts o = {.calib_count = 512, .eval_count = 1000, .batch = 100, .threads = 1,
               .method = "minmax", .requant = "float"};
    int rc = parse(argc, argv, &o);
    if (rc)
        return rc == 2 ? 0 : rc;
    tern_quant_observer observer;
    if (tern_quant_observer_parse(o.method, &observer) != TERN_OK)
        return die("unknown --method '%s' (minmax, percentile or entropy)", o.method);
    tern_requant_mode requant;
    if (tern_requant_mode_parse(o.requant, &requant) != TERN_OK)
        return die("unknown --requant '%s' (float or fixed)", o.requant);
    cli c = {0};
    tern_model *m = NULL;
    tern_qmodel *q = NULL, *loaded = NULL;
    tern_model_info info = {0};
    tern_dataset *train = NULL, *test = NULL;
    size_t *calib_idx = NULL, *eval_idx = NULL;
    float *calib = NULL, *x = NULL, *lf = NULL, *lq = NULL;
    int32_t *labels = NULL;
    tern_error err = {{0}};
    if ((rc = cli_load_model(&c, o.model, &m, &info)))
        return rc;
    const tern_model_options *mo = tern_model_options_of(m);
    tern_transform t = model_eval_transform(&info, 0, mo->in_channels);
    /* data: calibration from the training images, held-out from the others */
    if (strcmp(o.calib_data, "fashion-mnist") == 0) {
        const char *dir = getenv("TERN_FASHION_MNIST");
        dir = dir && *dir ? dir : DEFAULT_FASHION_DIR;
        if (tern_dataset_open_fashion_mnist(dir, true, NULL, &train, &err) != TERN_OK ||
            tern_dataset_open_fashion_mnist(dir, false, NULL, &test, &err) != TERN_OK) {
            rc = die("%s (install the dataset-fashion-mnist package)", err.message);
            goto done;
        }
    } else if ((rc = open_folder(o.calib_data, false, &train))) {
        goto done;
    }
    if (tern_dataset_num_classes(train) != mo->num_classes) {
        rc = die("the model has %d classes, the data %d", mo->num_classes,
                 tern_dataset_num_classes(train));
        goto done;
    }
    size_t ntrain = tern_dataset_size(train);
    size_t *order = shuffled_indices(ntrain, 1);
    if (!order) {
        rc = die("out of memory");
        goto done;
    }
    int ncalib = (size_t)o.calib_count < ntrain ? o.calib_count : (int)ntrain;
    calib_idx = order; /* the first ncalib of a seeded shuffle */
    const tern_dataset *held = test ? test : train;
    size_t nheld = test ? tern_dataset_size(test) : ntrain - (size_t)ncalib;
    int neval = (size_t)o.eval_count < nheld ? o.eval_count : (int)nheld;
    if (test) {
        if (!(eval_idx = shuffled_indices(nheld, 2))) {
            rc = die("out of memory");
            goto done;
        }
    }
    const size_t *held_idx = test ? eval_idx : order + ncalib;
    printf("quantizing %s (%s, %d classes, %dx%d) with %s on %d calibration images, %s "
           "requantization\n",
           o.model, tern_arch_name(mo->arch), mo->num_classes, t.size, t.size, o.method, ncalib,
           o.requant);
    if (!(calib = load_images(train, &t, calib_idx, ncalib, NULL))) {
        rc = 1;
        goto done;
    }
    tern_qmodel_options qo = {.height = t.size, .width = t.size, .max_batch = o.batch,
                              .calib_batch = 64, .observer = observer,
                              .percentile = o.percentile, .threads = o.threads,
                              .fp32_layers = o.fp32_layers, .sensitivity = true,
                              .requant = requant};
    double t0 = cli_now();
    if (tern_qmodel_create(m, calib, ncalib, &qo, &q, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    double secs = cli_now() - t0;
    print_sensitivity(q);
    if (tern_qmodel_save_file(q, &info, o.out, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    /* the file, loaded back on its own, is what gets compared */
    tern_qmodel_load_options lo = {.max_batch = o.batch};
    if (tern_qmodel_load_file(o.out, &lo, &loaded, &err) != TERN_OK) {
        rc = die("%s: %s", o.out, err.message);
        goto done;
    }
    long fsize = file_size(o.model), qsize = file_size(o.out);
    printf("\nquantized in %.1f s; wrote %s: %ld bytes (float %ld bytes, %.2fx smaller)\n", secs,
           o.out, qsize, fsize, qsize > 0 ? (double)fsize / (double)qsize : 0.0);
    if (neval > 0) {
        const int k = mo->num_classes;
        labels = malloc(sizeof(int32_t) * (size_t)neval);
        lf = malloc(sizeof(float) * (size_t)o.batch * k);
        lq = malloc(sizeof(float) * (size_t)o.batch * k);
        if (!labels || !lf || !lq || !(x = load_images(held, &t, held_idx, neval, labels))) {
            rc = labels && lf && lq ? 1 : die("out of memory");
            goto done;
        }
        if (tern_model_plan(m, o.batch, t.size, t.size, false) != TERN_OK) {
            rc = die("%s", tern_model_last_error(m));
            goto done;
        }
        size_t image = (size_t)t.size * t.size * t.channels;
        int agree = 0, right_f = 0, right_q = 0;
        for (int b = 0; b < neval; b += o.batch) {
            int n = neval - b < o.batch ? neval - b : o.batch;
            if (tern_model_forward(m, lf, x + (size_t)b * image, n, false) != TERN_OK ||
                tern_qmodel_forward(loaded, lq, x + (size_t)b * image, n) != TERN_OK) {
                rc = die("forward failed");
                goto done;
            }
            for (int i = 0; i < n; i++) {
                int pf = argmax(lf + (size_t)i * k, k), pq = argmax(lq + (size_t)i * k, k);
                agree += pf == pq;
                right_f += pf == labels[b + i];
                right_q += pq == labels[b + i];
            }
        }
        printf("held-out %d images (%s): accuracy fp32 %.2f%%, int8 %.2f%% (%+.2f points), "
               "top-1 agreement %.2f%%\n",
               neval, test ? "test set" : "not used for calibration", 100.0 * right_f / neval,
               100.0 * right_q / neval, 100.0 * (right_q - right_f) / neval,
               100.0 * agree / neval);
    }
done:
    free(calib_idx);
    free(eval_idx);
    free(calib);
    free(x);
    free(lf);
    free(lq);
    free(labels);
    tern_qmodel_destroy(&q);
    tern_qmodel_destroy(&loaded);
    tern_model_destroy(&m);
    tern_model_info_free(&info);
    tern_dataset_close(&train);
    tern_dataset_close(&test);
    return rc;
}
