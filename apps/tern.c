/* tern: the command-line tool.
 *
 *   tern forward  eval-mode logits of a model for an input tensor file
 *   tern step     one SGD step in train mode, writing the updated model
 *   tern demo     a few training steps on a fixed synthetic batch, showing the loss fall
 *   tern info     metadata and tensors of a safetensors file
 *   tern train, eval, predict   (tern_train.c)
 *   tern add-class              (tern_add_class.c)
 *   tern quantize               (tern_quant.c)
 *   tern prune                  (tern_prune.c)
 *   tern store, category, model (tern_store.c)
 *   tern server, client, sim    (tern_server.c, tern_client.c, tern_sim.c)
 *   tern dp                     (tern_dp.c)
 *
 * Tensor files use PyTorch's NCHW layout; the conversion to Tern's NHWC happens here. All
 * printing lives in the apps, never in the library. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "tern.h"
#include "tern_quant.h"

/* Opens --weights and builds the model it describes. */
static int load_weights(const cli *c, tern_model **model)
{
    if (!c->weights)
        return die("--weights is required");
    return cli_load_model(c, c->weights, model, NULL);
}

/* Reads tensor "input" (N, C, H, W) F32 from path into a new NHWC buffer. */
static int read_input(const char *path, int channels, float **out, int *n, int *h, int *w)
{
    if (!path)
        return die("--input is required");
    tern_error err = {{0}};
    tern_safetensors *st = NULL;
    if (tern_safetensors_open(path, NULL, &st, &err) != TERN_OK)
        return die("%s", err.message);
    tern_tensor_view v;
    int rc = 0;
    if (tern_safetensors_find(st, "input", &v) != TERN_OK)
        rc = die("%s: no tensor named 'input'", path);
    else if (v.dtype != TERN_DTYPE_F32 || v.ndim != 4)
        rc = die("%s: 'input' must be F32 of shape [N, C, H, W], file has %s with %d dims", path,
                 tern_dtype_name(v.dtype), v.ndim);
    else if (v.shape[1] != channels)
        rc = die("%s: 'input' has %lld channels, the model takes %d", path,
                 (long long)v.shape[1], channels);
    else if (v.shape[0] < 1 || v.shape[0] > 65536 || v.shape[2] < 32 || v.shape[3] < 32 ||
             v.shape[2] > 4096 || v.shape[3] > 4096)
        rc = die("%s: 'input' shape needs 1 <= N <= 65536 and 32 <= H, W <= 4096", path);
    if (rc == 0) {
        *n = (int)v.shape[0];
        *h = (int)v.shape[2];
        *w = (int)v.shape[3];
        size_t plane = (size_t)*h * (size_t)*w, count = (size_t)*n * channels * plane;
        float *nchw = malloc(count * sizeof(float)), *nhwc = malloc(count * sizeof(float));
        if (!nchw || !nhwc) {
            free(nchw);
            free(nhwc);
            rc = die("out of memory reading %s", path);
        } else {
            memcpy(nchw, v.data, count * sizeof(float));
            for (int i = 0; i < *n; i++)
                for (int ch = 0; ch < channels; ch++)
                    for (size_t p = 0; p < plane; p++)
                        nhwc[((size_t)i * plane + p) * channels + ch] =
                            nchw[((size_t)i * channels + ch) * plane + p];
            free(nchw);
            *out = nhwc;
        }
    }
    tern_safetensors_close(&st);
    return rc;
}

static int read_labels(const char *path, int n, int k, int32_t **out)
{
    if (!path)
        return die("--labels is required");
    tern_error err = {{0}};
    tern_safetensors *st = NULL;
    if (tern_safetensors_open(path, NULL, &st, &err) != TERN_OK)
        return die("%s", err.message);
    tern_tensor_view v;
    int rc = 0;
    int32_t *labels = malloc(sizeof(int32_t) * (size_t)n);
    if (!labels)
        rc = die("out of memory");
    else if (tern_safetensors_find(st, "labels", &v) != TERN_OK)
        rc = die("%s: no tensor named 'labels'", path);
    else if ((v.dtype != TERN_DTYPE_I64 && v.dtype != TERN_DTYPE_I32) || v.ndim != 1 ||
             v.shape[0] != n)
        rc = die("%s: 'labels' must be I64 or I32 of shape [%d]", path, n);
    for (int i = 0; rc == 0 && i < n; i++) {
        int64_t label;
        if (v.dtype == TERN_DTYPE_I64) {
            memcpy(&label, (const char *)v.data + 8 * (size_t)i, 8);
        } else {
            int32_t l32;
            memcpy(&l32, (const char *)v.data + 4 * (size_t)i, 4);
            label = l32;
        }
        if (label < 0 || label >= k)
            rc = die("%s: label %lld at position %d is outside [0, %d)", path, (long long)label,
                     i, k);
        else
            labels[i] = (int32_t)label;
    }
    tern_safetensors_close(&st);
    if (rc)
        free(labels);
    else
        *out = labels;
    return rc;
}

/* ---- commands ------------------------------------------------------------------------------- */

static int cmd_forward(int argc, char **argv)
{
    cli c = {0};
    int rc = cli_parse(argc, argv, CMD_FORWARD, false, &c);
    if (rc == 2) {
        printf("usage: tern forward --weights W.safetensors --input X.safetensors "
               "--output Y.safetensors [model options]\n\n"
               "Runs the model in eval mode. X holds 'input' [N, C, H, W] float32 (H, W >= 32);\n"
               "Y receives 'logits' [N, K].\n\n%s",
               CLI_MODEL_HELP);
        return 0;
    }
    if (rc)
        return rc;
    if (!c.output)
        return die("--output is required");
    tern_model *model = NULL;
    if ((rc = load_weights(&c, &model)))
        return rc;
    const tern_model_options *o = tern_model_options_of(model);
    float *input = NULL, *logits = NULL;
    int n, h, w;
    tern_error err = {{0}};
    if ((rc = read_input(c.input, o->in_channels, &input, &n, &h, &w)))
        goto done;
    logits = malloc(sizeof(float) * (size_t)n * (size_t)o->num_classes);
    if (!logits) {
        rc = die("out of memory");
        goto done;
    }
    if (tern_model_plan(model, n, h, w, false) != TERN_OK ||
        tern_model_forward(model, logits, input, n, false) != TERN_OK) {
        rc = die("%s", tern_model_last_error(model));
        goto done;
    }
    tern_safetensors_writer *wr = NULL;
    int64_t shape[2] = {n, o->num_classes};
    tern_status s = tern_safetensors_writer_create(NULL, &wr);
    if (s == TERN_OK)
        s = tern_safetensors_writer_add(wr, "logits", TERN_DTYPE_F32, 2, shape, logits);
    if (s == TERN_OK)
        s = tern_safetensors_writer_write(wr, c.output, &err);
    else
        snprintf(err.message, sizeof err.message, "%s", tern_strerror(s));
    tern_safetensors_writer_destroy(&wr);
    if (s != TERN_OK)
        rc = die("%s", err.message);
done:
    free(input);
    free(logits);
    tern_model_destroy(&model);
    return rc;
}

static int cmd_step(int argc, char **argv)
{
    cli c = {.momentum = 0};
    int rc = cli_parse(argc, argv, CMD_STEP, false, &c);
    if (rc == 2) {
        printf("usage: tern step --weights W.safetensors --input X.safetensors "
               "--labels L.safetensors --lr F --output W2.safetensors [options]\n\n"
               "One SGD step in train mode (BatchNorm uses batch statistics and updates its\n"
               "running statistics). Writes every parameter and buffer after the step and\n"
               "prints the loss.\n\n"
               "  --lr F                learning rate (required)\n"
               "  --momentum F          momentum (default 0)\n"
               "  --nesterov            Nesterov momentum\n"
               "  --weight-decay F      L2 weight decay (default 0)\n"
               "  --label-smoothing F   (default 0)\n"
               "  --dropout P           classifier dropout (default 0)\n"
               "  --seed S              dropout seed (default 0)\n\n%s",
               CLI_MODEL_HELP);
        return 0;
    }
    if (rc)
        return rc;
    if (!c.output)
        return die("--output is required");
    if (!(c.lr > 0))
        return die("--lr is required");
    tern_model *model = NULL;
    if ((rc = load_weights(&c, &model)))
        return rc;
    const tern_model_options *o = tern_model_options_of(model);
    float *input = NULL, *logits = NULL, *dlogits = NULL;
    int32_t *labels = NULL;
    tern_sgd *sgd = NULL;
    int n, h, w;
    tern_error err = {{0}};
    if ((rc = read_input(c.input, o->in_channels, &input, &n, &h, &w)) ||
        (rc = read_labels(c.labels, n, o->num_classes, &labels)))
        goto done;
    logits = malloc(sizeof(float) * (size_t)n * (size_t)o->num_classes);
    dlogits = malloc(sizeof(float) * (size_t)n * (size_t)o->num_classes);
    if (!logits || !dlogits) {
        rc = die("out of memory");
        goto done;
    }
    tern_sgd_options so = {.lr = c.lr, .momentum = c.momentum, .weight_decay = c.weight_decay,
                           .nesterov = c.nesterov};
    if (tern_sgd_create(model, &so, &sgd, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    float loss;
    if (tern_model_plan(model, n, h, w, true) != TERN_OK ||
        tern_model_forward(model, logits, input, n, true) != TERN_OK) {
        rc = die("%s", tern_model_last_error(model));
        goto done;
    }
    tern_cross_entropy_loss(&loss, dlogits, logits, labels, n, o->num_classes, c.smoothing);
    tern_model_zero_grad(model);
    if (tern_model_backward(model, dlogits) != TERN_OK) {
        rc = die("%s", tern_model_last_error(model));
        goto done;
    }
    tern_sgd_step(sgd);
    if (tern_model_save_file(model, NULL, c.output, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    printf("loss %.9g\n", (double)loss);
done:
    tern_sgd_destroy(&sgd);
    free(input);
    free(labels);
    free(logits);
    free(dlogits);
    tern_model_destroy(&model);
    return rc;
}

/* A fixed batch of synthetic pictures: class k is a bright square at one of a grid of places
 * over noise, so that there is something to learn. */
static void synthetic_batch(float *x, int32_t *labels, int n, int size, int channels, int classes,
                            uint64_t seed)
{
    tern_rng rng;
    tern_rng_seed(&rng, seed);
    int grid = 1;
    while (grid * grid < classes)
        grid++;
    int cell = size / grid, side = cell / 2;
    for (int i = 0; i < n; i++) {
        int k = i % classes;
        labels[i] = k;
        int y0 = (k / grid) * cell + cell / 4, x0 = (k % grid) * cell + cell / 4;
        for (int y = 0; y < size; y++)
            for (int xx = 0; xx < size; xx++)
                for (int ch = 0; ch < channels; ch++) {
                    bool inside = y >= y0 && y < y0 + side && xx >= x0 && xx < x0 + side;
                    x[(((size_t)i * size + y) * size + xx) * channels + ch] =
                        (inside ? 1.5f : 0.0f) + 0.5f * (float)tern_rng_normal(&rng);
                }
    }
}

static int cmd_demo(int argc, char **argv)
{
    cli c = {.steps = 15, .batch = 16, .size = 64, .lr = 0.1f, .momentum = 0.9f,
             .num_classes = 4};
    int rc = cli_parse(argc, argv, CMD_DEMO, false, &c);
    if (rc == 2) {
        printf("usage: tern demo [--arch A] [--steps N] [--batch B] [--size S] [--threads T]\n\n"
               "Trains a freshly initialised MobileNetV3 on one fixed batch of synthetic\n"
               "pictures (a bright square whose position gives the class) and prints the loss\n"
               "and batch accuracy after each SGD step: the loss should fall.\n\n"
               "  --arch A           mobilenet_v3_small (default) or mobilenet_v3_large\n"
               "  --steps N          SGD steps (default 15)\n"
               "  --batch B          images in the batch (default 16)\n"
               "  --size S           image height and width, >= 32 (default 64)\n"
               "  --num-classes K    classes (default 4)\n"
               "  --lr F             learning rate (default 0.1, momentum 0.9)\n"
               "  --threads T        compute threads (default 1)\n"
               "  --seed S           initialisation and data seed (default 0)\n");
        return 0;
    }
    if (rc)
        return rc;
    tern_model_options o;
    cli mc = c;
    if (!mc.arch)
        mc.arch = "mobilenet_v3_small";
    if ((rc = cli_model_options(&mc, NULL, NULL, &o)))
        return rc;
    o.dropout = 0.0f;
    tern_error err = {{0}};
    tern_model *model = NULL;
    tern_sgd *sgd = NULL;
    size_t npix = (size_t)c.batch * (size_t)c.size * (size_t)c.size * (size_t)o.in_channels;
    float *x = malloc(npix * sizeof(float));
    float *logits = malloc(sizeof(float) * (size_t)c.batch * (size_t)o.num_classes);
    float *dlogits = malloc(sizeof(float) * (size_t)c.batch * (size_t)o.num_classes);
    int32_t *labels = malloc(sizeof(int32_t) * (size_t)c.batch);
    if (!x || !logits || !dlogits || !labels) {
        rc = die("out of memory");
        goto done;
    }
    synthetic_batch(x, labels, c.batch, c.size, o.in_channels, o.num_classes,
                    (uint64_t)c.seed + 1);
    tern_sgd_options so = {.lr = c.lr, .momentum = c.momentum, .weight_decay = 0};
    if (tern_model_create(&o, &model, &err) != TERN_OK ||
        tern_sgd_create(model, &so, &sgd, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    if (tern_model_plan(model, c.batch, c.size, c.size, true) != TERN_OK) {
        rc = die("%s", tern_model_last_error(model));
        goto done;
    }
    printf("%s, width %.2f, %zu parameters; batch %d of %dx%dx%d, %d classes, %d thread%s\n",
           tern_arch_name(o.arch), o.width_mult, tern_model_param_count(model), c.batch, c.size,
           c.size, o.in_channels, o.num_classes, o.threads, o.threads == 1 ? "" : "s");
    double start = cli_now();
    for (int step = 1; step <= c.steps; step++) {
        float loss;
        double t0 = cli_now();
        tern_model_forward(model, logits, x, c.batch, true);
        tern_cross_entropy_loss(&loss, dlogits, logits, labels, c.batch, o.num_classes, 0.0f);
        tern_model_zero_grad(model);
        tern_model_backward(model, dlogits);
        tern_sgd_step(sgd);
        double dt = cli_now() - t0;
        int correct = 0;
        for (int i = 0; i < c.batch; i++) {
            int best = 0;
            for (int k = 1; k < o.num_classes; k++)
                if (logits[i * o.num_classes + k] > logits[i * o.num_classes + best])
                    best = k;
            correct += best == labels[i];
        }
        printf("step %3d  loss %.4f  batch accuracy %5.1f%%  %.0f images/s\n", step,
               (double)loss, 100.0 * correct / c.batch, c.batch / dt);
        fflush(stdout);
        if (!isfinite(loss)) {
            rc = die("loss is not finite");
            goto done;
        }
    }
    printf("%d steps in %.2f s\n", c.steps, cli_now() - start);
done:
    tern_sgd_destroy(&sgd);
    tern_model_destroy(&model);
    free(x);
    free(logits);
    free(dlogits);
    free(labels);
    return rc;
}

static int cmd_info(int argc, char **argv)
{
    if (argc != 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        printf("usage: tern info FILE.safetensors\n\nPrints the metadata and tensors of a file.\n");
        return argc == 2 ? 0 : 1;
    }
    tern_error err = {{0}};
    tern_safetensors *st = NULL;
    if (tern_safetensors_open(argv[1], NULL, &st, &err) != TERN_OK)
        return die("%s", err.message);
    for (size_t i = 0; i < tern_safetensors_metadata_count(st); i++) {
        const char *k, *v;
        tern_safetensors_metadata_at(st, i, &k, &v);
        printf("%s: %s\n", k, v);
    }
    size_t total = 0;
    for (size_t i = 0; i < tern_safetensors_count(st); i++) {
        tern_tensor_view v;
        tern_safetensors_get(st, i, &v);
        printf("%-48s %-4s [", v.name, tern_dtype_name(v.dtype));
        for (int d = 0; d < v.ndim; d++)
            printf(d ? ", %lld" : "%lld", (long long)v.shape[d]);
        printf("]\n");
        total += v.nbytes;
    }
    printf("%zu tensors, %zu bytes of data\n", tern_safetensors_count(st), total);
    tern_safetensors_close(&st);
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: tern <command> [options]\n\n"
            "Commands:\n"
            "  forward   eval-mode logits of a model for an input tensor file\n"
            "  step      one SGD training step, writing the updated model\n"
            "  demo      train on a fixed synthetic batch and show the loss fall\n"
            "  info      print a safetensors file's metadata and tensors\n"
            "  train     train on Fashion-MNIST or an image folder\n"
            "  eval      accuracy, per-class metrics and confusion matrix of a model\n"
            "  predict   classify images with a trained model\n"
            "  add-class add a class to a trained model without forgetting the old ones\n"
            "  quantize  INT8 post-training quantization of a model (eval/predict run it)\n"
            "  prune     magnitude pruning with fine-tuning; compressed model files\n"
            "  store     create, inspect, check, back up and restore the server's store\n"
            "  category  add, list, rename and remove object categories in the store\n"
            "  model     list, show, roll back, tag, prune and export stored model versions\n"
            "  server    federated server: init, register clients, run rounds\n"
            "  client    federated client: train on local pictures when the server asks\n"
            "  sim       a whole federated run on this machine (server + client processes)\n"
            "  dp        differential privacy: epsilon of a DP-SGD run, noise for a budget\n\n"
            "Run 'tern <command> --help' for a command's options.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 1;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        usage(stdout);
        return 0;
    }
    static const struct {
        const char *name;
        int (*run)(int, char **);
    } COMMANDS[] = {
        {"forward", cmd_forward}, {"step", cmd_step},       {"demo", cmd_demo},
        {"info", cmd_info},       {"train", tern_cmd_train}, {"eval", tern_cmd_eval},
        {"predict", tern_cmd_predict}, {"add-class", tern_cmd_add_class},
        {"store", tern_cmd_store},     {"category", tern_cmd_category},
        {"model", tern_cmd_model},     {"server", tern_cmd_server},
        {"client", tern_cmd_client},   {"sim", tern_cmd_sim},
        {"dp", tern_cmd_dp},           {"quantize", tern_cmd_quantize},
        {"prune", tern_cmd_prune}};
    for (size_t i = 0; i < sizeof COMMANDS / sizeof *COMMANDS; i++) {
        if (strcmp(cmd, COMMANDS[i].name) == 0) {
            static char name[64];
            snprintf(name, sizeof name, "tern %s", cmd);
            cli_prog = name;
            return COMMANDS[i].run(argc - 1, argv + 1);
        }
    }
    fprintf(stderr, "tern: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return 1;
}
