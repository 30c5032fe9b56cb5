/* tern train, tern eval, tern predict: training on real pictures and using the result.
 *
 * Data comes from Fashion-MNIST (--data fashion-mnist: Debian's dataset-fashion-mnist, or the
 * directory in $TERN_FASHION_MNIST) or from an image folder (DIR/<class>/<image>; DIR/train and
 * DIR/val when both exist, else a seeded --val-split of DIR). The pipelines follow
 * torchvision's references: for Fashion-MNIST, 28x28 zero-padded to 32x32 (or resized to
 * --size), random crop with padding and horizontal flip for training; for folders,
 * RandomResizedCrop and flip for training, resize to size*256/224 and center crop for
 * evaluation, ImageNet normalization. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "tern_quant.h"
#include "train_common.h"
#include "train_data.h"
#include "tern.h"
#include "tern/checkpoint.h"

#define DEFAULT_FASHION_DIR "/usr/share/datasets/fashion-mnist"

/* ---- data ------------------------------------------------------------------------------------- */

void data_close(data *d)
{
    if (d->val != d->train)
        tern_dataset_close(&d->val);
    tern_dataset_close(&d->train);
    free(d->train_idx);
    free(d->val_idx);
    memset(d, 0, sizeof *d);
}

/* The geometry and normalization for a data source at `size`. */
void make_transforms(data *d, int size, int channels, bool augment)
{
    tern_transform e = {.size = size, .channels = channels};
    if (d->fashion) {
        /* 28x28: zero-pad to 32 at the reference size, resize for other sizes. */
        e.resize = size == 32 ? 28 : size;
        tern_transform_normalize_fashion_mnist(&e);
    } else {
        e.resize = size * 256 / 224;
        tern_transform_normalize_imagenet(&e);
    }
    tern_transform t = e;
    if (augment) {
        t.hflip = true;
        if (d->fashion) {
            t.pad = size / 16;
        } else {
            t.random_resized_crop = true;
            t.resize = 0;
        }
    }
    d->train_t = t;
    d->eval_t = e;
}

/* Opens --data (and --val) for training or evaluation. */
int open_data(const cli *c, bool training, data *d)
{
    memset(d, 0, sizeof *d);
    if (!c->data)
        return die("--data is required (fashion-mnist or an image folder)");
    tern_error err = {{0}};
    if (strcmp(c->data, "fashion-mnist") == 0) {
        const char *dir = getenv("TERN_FASHION_MNIST");
        dir = dir && *dir ? dir : DEFAULT_FASHION_DIR;
        d->fashion = true;
        if (training && tern_dataset_open_fashion_mnist(dir, true, NULL, &d->train, &err) != TERN_OK)
            return die("%s (install the dataset-fashion-mnist package)", err.message);
        if (tern_dataset_open_fashion_mnist(dir, false, NULL, &d->val, &err) != TERN_OK) {
            data_close(d);
            return die("%s (install the dataset-fashion-mnist package)", err.message);
        }
    } else if (!is_dir(c->data)) {
        return die("--data: '%s' is neither fashion-mnist nor a directory", c->data);
    } else if (!training) {
        char val_dir[4096], train_dir[4096];
        snprintf(train_dir, sizeof train_dir, "%s/train", c->data);
        snprintf(val_dir, sizeof val_dir, "%s/val", c->data);
        bool split_dirs = is_dir(train_dir) && is_dir(val_dir);
        if (open_folder(split_dirs ? val_dir : c->data, c->strict, &d->val))
            return 1;
    } else {
        char train_dir[4096], val_dir[4096];
        snprintf(train_dir, sizeof train_dir, "%s/train", c->data);
        snprintf(val_dir, sizeof val_dir, "%s/val", c->data);
        bool split_dirs = !c->val && is_dir(train_dir) && is_dir(val_dir);
        if (open_folder(split_dirs ? train_dir : c->data, c->strict, &d->train))
            return 1;
        const char *val = split_dirs ? val_dir : c->val;
        if (val && open_folder(val, c->strict, &d->val)) {
            data_close(d);
            return 1;
        }
        int k = tern_dataset_num_classes(d->train);
        bool same = !d->val || tern_dataset_num_classes(d->val) == k;
        for (int i = 0; same && d->val && i < k; i++)
            same = strcmp(tern_dataset_class_name(d->val, i), tern_dataset_class_name(d->train, i)) == 0;
        if (!same) {
            data_close(d);
            return die("the validation folder's classes differ from the training folder's");
        }
    }
    /* Index lists: --limit, --val-limit, and a split of the training set when no separate
     * validation set exists. */
    uint64_t seed = (uint64_t)c->seed;
    if (d->train) {
        size_t n = tern_dataset_size(d->train);
        size_t *perm = shuffled_indices(n, seed ^ 0x5eed);
        if (!perm) {
            data_close(d);
            return die("out of memory");
        }
        size_t nval = 0;
        if (!d->val) {
            float frac = c->val_split > 0 ? c->val_split : 0.1f;
            nval = (size_t)(frac * (double)n);
            if (nval < 1 || nval >= n) {
                free(perm);
                data_close(d);
                return die("%s: %zu images cannot be split into training and validation", c->data, n);
            }
            d->val = d->train;
            d->val_idx = malloc(nval * sizeof *d->val_idx);
            if (!d->val_idx) {
                free(perm);
                data_close(d);
                return die("out of memory");
            }
            memcpy(d->val_idx, perm + (n - nval), nval * sizeof *perm);
            d->nval = nval;
        }
        d->train_idx = perm;
        d->ntrain = n - nval;
        if (c->limit > 0 && (size_t)c->limit < d->ntrain)
            d->ntrain = (size_t)c->limit;
    }
    if (d->val && !d->val_idx) {
        size_t n = tern_dataset_size(d->val);
        long long limit = training ? c->val_limit : c->limit;
        d->val_idx = shuffled_indices(n, seed ^ 0x7a1);
        if (!d->val_idx) {
            data_close(d);
            return die("out of memory");
        }
        d->nval = limit > 0 && (size_t)limit < n ? (size_t)limit : n;
        /* Without a limit, keep the natural order (easier to read confusions by source). */
        for (size_t i = 0; limit <= 0 && i < n; i++)
            d->val_idx[i] = i;
    }
    if (training && c->val_limit > 0 && (size_t)c->val_limit < d->nval)
        d->nval = (size_t)c->val_limit;
    return 0;
}

static const char *class_name(const data *d, int k)
{
    const tern_dataset *ds = d->train ? d->train : d->val;
    return tern_dataset_class_name(ds, k);
}

/* ---- progress ------------------------------------------------------------------------------- */

typedef struct progress {
    bool bar;        /* redraw one line on a terminal; else log lines */
    bool quiet;      /* no log lines (validation: its summary line says enough) */
    double start, last_draw;
    size_t total, last_logged;
} progress;

static void progress_start(progress *p, const cli *c, size_t total)
{
    p->bar = c->progress || (!c->no_progress && isatty(STDERR_FILENO));
    p->quiet = false;
    p->start = p->last_draw = cli_now();
    p->total = total;
    p->last_logged = 0;
}

static void progress_update(progress *p, const char *what, size_t done, double loss,
                            size_t images)
{
    double now = cli_now(), elapsed = now - p->start;
    double rate = elapsed > 0 ? images / elapsed : 0;
    double eta = done > 0 ? elapsed * (double)(p->total - done) / (double)done : 0;
    if (p->bar) {
        if (now - p->last_draw < 0.1 && done < p->total)
            return;
        p->last_draw = now;
        int width = 24, filled = (int)(width * (double)done / (double)(p->total ? p->total : 1));
        char bar[32];
        for (int i = 0; i < width; i++)
            bar[i] = i < filled ? '#' : '.';
        bar[width] = 0;
        fprintf(stderr, "\r%s [%s] %zu/%zu loss %.4f %.0f img/s ETA %d:%02d  ", what, bar, done,
                p->total, loss, rate, (int)eta / 60, (int)eta % 60);
        if (done == p->total)
            fputc('\n', stderr);
    } else if (!p->quiet && (done == p->total || done - p->last_logged >= (p->total + 9) / 10)) {
        p->last_logged = done;
        fprintf(stderr, "%s batch %zu/%zu loss %.4f %.0f img/s ETA %d:%02d\n", what, done,
                p->total, loss, rate, (int)eta / 60, (int)eta % 60);
    }
}

/* ---- evaluation ------------------------------------------------------------------------------ */

/* Runs the model in eval mode over a loader's epoch into metrics. */
int evaluate(tern_model *m, tern_qmodel *q, tern_loader *loader, tern_metrics *metrics,
                    float *logits, const cli *c, const char *what, bool quiet_log)
{
    int num_classes = 0; /* from the quantized model q when m is NULL */
    if (q)
        tern_qmodel_shape(q, NULL, NULL, NULL, &num_classes);
    else
        num_classes = tern_model_options_of(m)->num_classes;
    tern_metrics_reset(metrics);
    tern_error err = {{0}};
    progress p;
    progress_start(&p, c, tern_loader_batches(loader));
    p.quiet = quiet_log;
    size_t batches = 0, images = 0;
    for (;;) {
        const float *x;
        const int32_t *y;
        int n;
        tern_status s = tern_loader_next(loader, &x, &y, &n, &err);
        if (s == TERN_ERR_NOT_FOUND)
            break;
        if (s != TERN_OK)
            return die("%s", err.message);
        if (q ? tern_qmodel_forward(q, logits, x, n) != TERN_OK
              : tern_model_forward(m, logits, x, n, false) != TERN_OK)
            return die("%s", q ? tern_qmodel_last_error(q) : tern_model_last_error(m));
        float loss;
        if (tern_cross_entropy_loss(&loss, NULL, logits, y, n, num_classes, 0.0f) != TERN_OK)
            return die("a label outside [0, %d) reached the loss", num_classes);
        tern_metrics_add(metrics, logits, y, n, loss);
        images += (size_t)n;
        progress_update(&p, what, ++batches, tern_metrics_loss(metrics), images);
    }
    return 0;
}

static void print_metrics(const tern_metrics *m, int classes, const data *d, int top)
{
    printf("accuracy %.2f%% on %zu images", 100 * tern_metrics_accuracy(m), tern_metrics_count(m));
    if (top > 1 && top <= classes)
        printf(", top-%d %.2f%%", top, 100 * tern_metrics_topk(m, top));
    printf(", loss %.4f\n\n", tern_metrics_loss(m));
    printf("%-24s %9s %9s %9s %8s\n", "class", "precision", "recall", "f1", "support");
    for (int k = 0; k < classes; k++)
        printf("%-24.24s %9.3f %9.3f %9.3f %8zu\n", class_name(d, k), tern_metrics_precision(m, k),
               tern_metrics_recall(m, k), tern_metrics_f1(m, k), tern_metrics_support(m, k));
    if (classes <= 20) {
        printf("\nconfusion matrix (rows: true class, columns: predicted)\n%-14s", "");
        for (int k = 0; k < classes; k++)
            printf(" %6d", k);
        printf("\n");
        for (int t = 0; t < classes; t++) {
            printf("%2d %-11.11s", t, class_name(d, t));
            for (int k = 0; k < classes; k++)
                printf(" %6zu", tern_metrics_confusion(m, t, k));
            printf("\n");
        }
    }
}

static int write_metrics_json(const char *path, const tern_metrics *m, const data *d, int classes)
{
    const char **names = malloc(sizeof *names * (size_t)classes);
    if (!names)
        return die("out of memory");
    for (int k = 0; k < classes; k++)
        names[k] = class_name(d, k);
    char *text = tern_metrics_to_json(m, names);
    free(names);
    if (!text)
        return die("out of memory");
    FILE *f = fopen(path, "w");
    int rc = 0;
    if (!f || fputs(text, f) < 0 || fputc('\n', f) < 0)
        rc = die("cannot write %s", path);
    if (f && fclose(f) != 0 && rc == 0)
        rc = die("cannot write %s", path);
    free(text);
    return rc;
}

/* ---- train ------------------------------------------------------------------------------------ */

static const char TRAIN_HELP[] =
    "usage: tern train --data fashion-mnist|DIR [options] [--out model.safetensors]\n\n"
    "Trains MobileNetV3 on Fashion-MNIST or an image folder (DIR/<class>/<image>, or\n"
    "DIR/train and DIR/val), evaluating on the validation set after every epoch.\n\n"
    "Data:\n"
    "  --data fashion-mnist|DIR   training data ($TERN_FASHION_MNIST overrides the dataset dir)\n"
    "  --val DIR              validation folder (default: DIR/val, or a split of DIR)\n"
    "  --val-split F          fraction of DIR held out for validation (default 0.1)\n"
    "  --size S               input size (default 32 for Fashion-MNIST, 224 for folders)\n"
    "  --no-augment           no random crops or flips\n"
    "  --limit N, --val-limit N   use N random training / validation images\n"
    "  --cache DIR            keep decoded, resized images in an LMDB cache\n"
    "  --strict               fail on a bad image instead of skipping it with a warning\n"
    "Optimization (defaults: the torchvision recipe for Fashion-MNIST):\n"
    "  --epochs N             (default 30)\n"
    "  --batch B              (default 128)\n"
    "  --optimizer sgd|adam|adamw|rmsprop   (default sgd)\n"
    "  --lr F                 peak learning rate (default 0.1 for SGD, 1e-3 otherwise)\n"
    "  --momentum F           SGD/RMSprop momentum (default 0.9 for SGD)\n"
    "  --nesterov             Nesterov momentum (SGD)\n"
    "  --weight-decay F       (default 5e-5)\n"
    "  --schedule cosine|step|constant   (default cosine)\n"
    "  --warmup-epochs F      linear warmup (default 0)\n"
    "  --label-smoothing F    (default 0.1)\n"
    "  --clip-grad-norm F     clip the gradient norm (default off)\n"
    "  --dropout P            classifier dropout (default 0.2)\n"
    "  --bn-momentum F        BatchNorm running-statistics momentum (default 0.01, torchvision's)\n"
    "  --seed S               initialisation, data order and augmentation (default 0)\n"
    "Differential privacy (DP-SGD as Opacus: Poisson-sampled batches, per-sample clipping,\n"
    "Gaussian noise; needs --norm group, the default with --dp):\n"
    "  --dp                   train with DP-SGD; epsilon is reported after every epoch\n"
    "  --target-epsilon E     the budget: the noise multiplier is found for it (at --delta,\n"
    "                         over all --epochs)\n"
    "  --noise-multiplier S   or this noise (std S * C), epsilon following from it\n"
    "  --max-grad-norm C      per-sample clipping norm (default 1.0)\n"
    "  --delta D              (default 1e-5)\n"
    "  --sample-rate Q        Poisson rate (default: 1 / ceil(N / batch); the expected batch is\n"
    "                         Q * N, and an epoch is 1 / Q steps)\n"
    "  --accountant rdp|prv   (default rdp)\n"
    "  --ema D                evaluate and save an exponential moving average of the weights,\n"
    "                         decay D (e.g. 0.999; warm-up min(D, (1+t)/(10+t)) at update t)\n"
    "                         instead of the last weights: De et al. 2022's averaging for DP\n"
    "                         (also without --dp); each epoch also reports the raw weights\n"    "Model:\n"
    "  --arch A, --width-mult F, --norm batch|group, --threads N, --isa I  (see tern forward)\n"
    "  --init W.safetensors   start from these weights (e.g. torchvision's, saved as safetensors)\n"
    "  --reset-head           with --init: a new classifier for this data's classes\n"
    "Output:\n"
    "  --out PATH             trained model (default model.safetensors)\n"
    "  --checkpoint PATH      save a resumable checkpoint after every epoch\n"
    "  --resume PATH          continue from a checkpoint (same data and options)\n"
    "  --metrics-json PATH    final validation metrics as JSON\n"
    "  --progress / --no-progress   progress bar (default: when stderr is a terminal)\n";

/* Creates the model: fresh, from --init, or shaped like the checkpoint being resumed. */
static int make_model(const cli *c, int classes, int channels, tern_model **m)
{
    tern_error err = {{0}};
    tern_model_options o;
    if (c->resume) {
        o = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
        if (tern_checkpoint_peek(c->resume, NULL, &o, NULL, NULL, NULL, &err) != TERN_OK)
            return die("%s", err.message);
        tern_model_options mine;
        cli mc = *c;
        mc.arch = tern_arch_name(o.arch);
        if (cli_model_options(&mc, NULL, NULL, &mine))
            return 1;
        mine.arch = o.arch;
        mine.width_mult = o.width_mult;
        mine.norm = o.norm;
        mine.in_channels = o.in_channels;
        mine.num_classes = o.num_classes;
        o = mine;
        if (o.num_classes != classes || o.in_channels != channels)
            return die("%s was trained on %d classes of %d-channel images; this data has %d of %d",
                       c->resume, o.num_classes, o.in_channels, classes, channels);
        if (tern_model_create(&o, m, &err) != TERN_OK)
            return die("%s", err.message);
        return 0;
    }
    tern_safetensors *st = NULL;
    if (c->init && tern_safetensors_open(c->init, NULL, &st, &err) != TERN_OK)
        return die("%s", err.message);
    cli mc = *c;
    if (!mc.arch && !st)
        mc.arch = "mobilenet_v3_small";
    int rc = cli_model_options(&mc, c->init, st, &o);
    if (rc == 0) {
        o.num_classes = classes;
        o.in_channels = channels;
        if (tern_model_create(&o, m, &err) != TERN_OK)
            rc = die("%s", err.message);
    }
    if (rc == 0 && st) {
        const char *keep[] = {"classifier.3."};
        tern_status s = tern_model_load_state_except(*m, st, keep, c->reset_head ? 1 : 0, &err);
        if (s != TERN_OK) {
            rc = die("%s: %s%s", c->init, err.message,
                     c->reset_head ? "" : " (--reset-head starts a new classifier)");
            tern_model_destroy(m);
        }
    }
    tern_safetensors_close(&st);
    return rc;
}

/* ---- DP-SGD -------------------------------------------------------------------------------- */

typedef struct dp_run {
    tern_dp *dp;
    double delta;
    long steps_per_epoch;
    size_t *picked;   /* (ntrain) positions in d->train_idx of a Poisson sample */
    float *x;         /* (cap, size, size, channels) */
    int32_t *y;       /* (cap) */
    size_t cap, per;  /* capacity in images, floats per image */
    tern_rng augment; /* random transforms (not secret: they do not touch privacy) */
} dp_run;

static void dp_run_free(dp_run *r)
{
    tern_dp_destroy(&r->dp);
    free(r->picked);
    free(r->x);
    free(r->y);
    memset(r, 0, sizeof *r);
}

/* The noise and the batch sampling must be unpredictable: seeded from the kernel, never from
 * --seed. */
static int secret_seed(uint64_t *seed)
{
    FILE *f = fopen("/dev/urandom", "rb");
    size_t got = f ? fread(seed, sizeof *seed, 1, f) : 0;
    if (f)
        fclose(f);
    return got == 1 ? 0 : die("cannot read /dev/urandom for the DP noise seed");
}

static int dp_setup(const cli *c, const data *d, tern_model *m, int size, int channels,
                    dp_run *r)
{
    memset(r, 0, sizeof *r);
    if (c->clip > 0)
        return die("--clip-grad-norm does not apply with --dp (per-sample clipping is "
                   "--max-grad-norm)");
    if (c->resume)
        return die("--resume is not supported with --dp yet: checkpoints do not carry the "
                   "privacy ledger");
    if ((c->noise_multiplier > 0) == (c->target_epsilon > 0))
        return die("--dp needs one of --target-epsilon and --noise-multiplier");
    const double n = (double)d->ntrain;
    double q;
    if (c->sample_rate > 0) {
        q = c->sample_rate;
        r->steps_per_epoch = (long)ceil(1.0 / q);
    } else {
        r->steps_per_epoch = (long)((d->ntrain + (size_t)c->batch - 1) / (size_t)c->batch);
        q = 1.0 / (double)r->steps_per_epoch;
    }
    r->delta = c->delta > 0 ? c->delta : 1e-5;
    if (r->delta >= 1.0 / n)
        fprintf(stderr, "warning: --delta %g is not below 1 / %zu training images\n", r->delta,
                d->ntrain);
    tern_accountant_options ao = {0};
    if (c->accountant && tern_accountant_kind_parse(c->accountant, &ao.kind) != TERN_OK)
        return die("unknown --accountant '%s' (rdp or prv)", c->accountant);
    const int64_t steps = (int64_t)r->steps_per_epoch * c->epochs;
    double sigma = c->noise_multiplier;
    tern_error err = {{0}};
    if (c->target_epsilon > 0) {
        tern_noise_query nq = {.sample_rate = q, .steps = steps, .delta = r->delta,
                               .target_epsilon = c->target_epsilon};
        if (tern_accountant_noise_multiplier(&sigma, &ao, &nq, &err) != TERN_OK)
            return die("%s", err.message);
    }
    tern_dp_options o = {.max_grad_norm = c->max_grad_norm > 0 ? c->max_grad_norm : 1.0,
                         .noise_multiplier = sigma, .sample_rate = q, .expected_batch = q * n,
                         .label_smoothing = c->smoothing, .accountant = ao};
    if (secret_seed(&o.seed))
        return 1;
    if (tern_dp_create(m, &o, &r->dp, &err) != TERN_OK)
        return die("%s", err.message);
    r->per = (size_t)size * (size_t)size * (size_t)channels;
    r->cap = (size_t)c->batch;
    r->picked = malloc(sizeof *r->picked * (d->ntrain ? d->ntrain : 1));
    r->x = malloc(sizeof *r->x * r->cap * r->per);
    r->y = malloc(sizeof *r->y * r->cap);
    if (!r->picked || !r->x || !r->y) {
        dp_run_free(r);
        return die("out of memory");
    }
    tern_rng_seed(&r->augment, (uint64_t)c->seed ^ 0xa46e);
    fprintf(stderr, "DP-SGD: sample rate %.6g (expected batch %.1f), noise multiplier %.6g, "
                    "max grad norm %g, %lld steps, delta %g%s%.4g\n",
            q, q * n, sigma, o.max_grad_norm, (long long)steps, r->delta,
            c->target_epsilon > 0 ? ", target epsilon " : "",
            c->target_epsilon > 0 ? c->target_epsilon : 0.0);
    return 0;
}

/* One Poisson-sampled batch, decoded and transformed into r->x, r->y; *n gets its size. */
static int dp_batch(const cli *c, const data *d, dp_run *r, int *n)
{
    size_t k;
    if (tern_dp_sample(r->dp, d->ntrain, r->picked, &k) != TERN_OK)
        return die("Poisson sampling failed");
    if (k > r->cap) {
        float *x = realloc(r->x, sizeof *x * k * r->per);
        if (x)
            r->x = x;
        int32_t *y = realloc(r->y, sizeof *y * k);
        if (y)
            r->y = y;
        if (!x || !y)
            return die("out of memory");
        r->cap = k;
    }
    tern_error err = {{0}};
    size_t used = 0;
    for (size_t i = 0; i < k; i++) {
        size_t idx = d->train_idx[r->picked[i]];
        tern_image img = {0};
        if (tern_dataset_image(d->train, idx, NULL, &img, &err) != TERN_OK) {
            if (c->strict)
                return die("%s", err.message);
            fprintf(stderr, "warning: %s (skipped)\n", err.message);
            continue;
        }
        tern_status s = tern_transform_apply(&d->train_t, &img, &r->augment, r->x + used * r->per);
        tern_image_free(NULL, &img);
        if (s != TERN_OK)
            return die("cannot transform training image %zu", idx);
        r->y[used++] = tern_dataset_label(d->train, idx);
    }
    *n = (int)used;
    return 0;
}

static int cmd_train(int argc, char **argv)
{
    cli c = {.epochs = 30, .batch = 128, .dropout = 0.2f, .smoothing = 0.1f, .momentum = -1,
             .weight_decay = 5e-5f};
    int rc = cli_parse(argc, argv, CMD_TRAIN, false, &c);
    if (rc == 2) {
        fputs(TRAIN_HELP, stdout);
        return 0;
    }
    if (rc)
        return rc;
    if (c.reset_head && !c.init)
        return die("--reset-head needs --init");
    if (c.resume && c.init)
        return die("--resume and --init exclude each other");
    if (c.resume && c.ema > 0)
        return die("--ema cannot be resumed: checkpoints do not carry the weight average");
    if (!c.dp && (c.max_grad_norm > 0 || c.noise_multiplier > 0 || c.target_epsilon > 0 ||
                  c.delta > 0 || c.sample_rate > 0 || c.accountant))
        return die("the differential-privacy options need --dp");
    if (c.dp && c.norm && strcmp(c.norm, "group") != 0)
        return die("--dp needs --norm group: BatchNorm mixes the samples of a batch through its "
                   "statistics, so per-sample gradients (and their clipping) are not defined");
    if (c.dp && !c.norm)
        c.norm = "group";
    data d;
    if (open_data(&c, true, &d))
        return 1;
    int classes = tern_dataset_num_classes(d.train);
    int size = c.size ? c.size : d.fashion ? 32 : 224;
    int channels = d.fashion ? 1 : 3;
    make_transforms(&d, size, channels, !c.no_augment);

    tern_model *m = NULL;
    tern_optimizer *opt = NULL;
    tern_loader *train = NULL, *val = NULL;
    tern_metrics *metrics = NULL;
    float *logits = NULL, *dlogits = NULL;
    dp_run dpr = {0};
    tern_ema *ema = NULL;
    tern_error err = {{0}};
    if ((rc = make_model(&c, classes, channels, &m)) || (rc = make_optimizer(&c, m, 0.1f, 1e-3f, &opt)))
        goto done;
    if (c.ema > 0 && tern_ema_create(m, c.ema, &ema, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    if (c.dp && (rc = dp_setup(&c, &d, m, size, channels, &dpr)))
        goto done;
    /* One LMDB environment per loader (LMDB allows one per process), holding decoded images
     * as they are, so that results do not depend on the cache. */
    char train_cache[4096], val_cache[4096];
    cache_dirs(c.cache, train_cache, val_cache, sizeof train_cache);
    tern_loader_options lo = {.batch = c.batch, .shuffle = true, .drop_last = true,
                              .seed = (uint64_t)c.seed, .indices = d.train_idx,
                              .nindices = d.ntrain, .cache_dir = c.cache ? train_cache : NULL};
    tern_loader_options vo = {.batch = c.batch, .seed = (uint64_t)c.seed, .indices = d.val_idx,
                              .nindices = d.nval, .cache_dir = c.cache ? val_cache : NULL};
    if (!c.dp && d.ntrain < (size_t)c.batch) {
        rc = die("%zu training images are fewer than one batch of %d", d.ntrain, c.batch);
        goto done;
    }
    if ((!c.dp && tern_loader_create(d.train, &d.train_t, &lo, NULL, &train, &err) != TERN_OK) ||
        tern_loader_create(d.val, &d.eval_t, &vo, NULL, &val, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    long steps_per_epoch = c.dp ? dpr.steps_per_epoch : (long)tern_loader_batches(train);
    tern_schedule sched;
    if ((rc = make_schedule(&c, tern_optimizer_lr(opt), steps_per_epoch, &sched)))
        goto done;
    if (tern_metrics_create(classes, classes < 5 ? classes : 5, NULL, &metrics) != TERN_OK ||
        !(logits = malloc(sizeof(float) * (size_t)c.batch * (size_t)classes)) ||
        !(dlogits = malloc(sizeof(float) * (size_t)c.batch * (size_t)classes))) {
        rc = die("out of memory");
        goto done;
    }
    if (tern_model_plan(m, c.batch, size, size, true) != TERN_OK) {
        rc = die("%s", tern_model_last_error(m));
        goto done;
    }
    tern_checkpoint_info info = {0};
    if (c.resume) {
        if (tern_checkpoint_load(m, opt, &info, c.resume, &err) != TERN_OK) {
            rc = die("%s", err.message);
            goto done;
        }
        if (train)
            tern_loader_set_epoch(train, info.epoch);
        fprintf(stderr, "resuming %s after epoch %llu\n", c.resume, (unsigned long long)info.epoch);
    }
    const tern_model_options *mo = tern_model_options_of(m);
    fprintf(stderr, "%s (width %.2f, %zu parameters) on %zu training and %zu validation images "
                    "of %dx%dx%d, %d classes; %s, %d epochs of %ld steps, %d thread%s\n",
            tern_arch_name(mo->arch), mo->width_mult, tern_model_param_count(m), d.ntrain, d.nval,
            size, size, channels, classes, tern_optimizer_kind_name(tern_optimizer_options_of(opt)->kind),
            c.epochs, steps_per_epoch, mo->threads, mo->threads == 1 ? "" : "s");
    double run_start = cli_now();
    for (int epoch = (int)info.epoch; epoch < c.epochs; epoch++) {
        char what[64];
        snprintf(what, sizeof what, "epoch %d/%d", epoch + 1, c.epochs);
        progress p;
        progress_start(&p, &c, (size_t)steps_per_epoch);
        double loss_sum = 0, start = cli_now();
        size_t batches = 0, images = 0;
        for (long step = 0; c.dp && step < steps_per_epoch; step++) {
            int n = 0;
            if ((rc = dp_batch(&c, &d, &dpr, &n)))
                goto done;
            tern_optimizer_set_lr(opt, tern_schedule_lr(&sched, (long)info.global_step));
            float loss;
            if (tern_dp_step_grads(dpr.dp, dpr.x, dpr.y, n, &loss) != TERN_OK) {
                rc = die("%s", tern_dp_last_error(dpr.dp));
                goto done;
            }
            if (!isfinite(loss)) {
                rc = die("loss is %f at epoch %d step %ld: lower --lr", (double)loss, epoch + 1,
                         step + 1);
                goto done;
            }
            tern_optimizer_step(opt);
            tern_ema_update(ema);
            info.global_step++;
            loss_sum += (double)loss * n;
            images += (size_t)n;
            batches++;
            progress_update(&p, what, batches, images ? loss_sum / (double)images : 0, images);
        }
        for (; !c.dp;) {
            const float *x;
            const int32_t *y;
            int n;
            tern_status s = tern_loader_next(train, &x, &y, &n, &err);
            if (s == TERN_ERR_NOT_FOUND)
                break;
            if (s != TERN_OK) {
                rc = die("%s", err.message);
                goto done;
            }
            tern_optimizer_set_lr(opt, tern_schedule_lr(&sched, (long)info.global_step));
            float loss;
            if (tern_model_forward(m, logits, x, n, true) != TERN_OK) {
                rc = die("%s", tern_model_last_error(m));
                goto done;
            }
            if (tern_cross_entropy_loss(&loss, dlogits, logits, y, n, classes, c.smoothing) != TERN_OK) {
                rc = die("a label outside [0, %d) reached the loss", classes);
                goto done;
            }
            if (!isfinite(loss)) {
                rc = die("loss is %f at epoch %d step %zu: lower --lr", (double)loss, epoch + 1,
                         batches + 1);
                goto done;
            }
            tern_model_zero_grad(m);
            tern_model_backward(m, dlogits);
            if (c.clip > 0)
                tern_clip_grad_norm(m, c.clip);
            tern_optimizer_step(opt);
            tern_ema_update(ema);
            info.global_step++;
            loss_sum += loss;
            images += (size_t)n;
            batches++;
            progress_update(&p, what, batches, loss_sum / (double)batches, images);
        }
        double train_s = cli_now() - start;
        double raw_acc = 0; /* with --ema: the last weights' accuracy; metrics get the average's */
        if (ema) {
            if ((rc = evaluate(m, NULL, val, metrics, logits, &c, "  validating", true)))
                goto done;
            raw_acc = tern_metrics_accuracy(metrics);
            tern_ema_swap(ema);
        }
        rc = evaluate(m, NULL, val, metrics, logits, &c, "  validating", true);
        tern_ema_swap(ema);
        if (rc)
            goto done;
        double train_loss = c.dp ? loss_sum / (double)(images ? images : 1)
                                 : loss_sum / (double)(batches ? batches : 1);
        fprintf(stderr, "epoch %d/%d: train loss %.4f, %.0f img/s, %.1f s | val loss %.4f, accuracy %.2f%%",
                epoch + 1, c.epochs, train_loss, (double)images / train_s, train_s,
                tern_metrics_loss(metrics), 100 * tern_metrics_accuracy(metrics));
        if (ema)
            fprintf(stderr, " (weight average; last weights %.2f%%)", 100 * raw_acc);
        fputc('\n', stderr);
        if (c.dp) {
            double eps;
            if (tern_dp_epsilon(dpr.dp, dpr.delta, &eps) != TERN_OK) {
                rc = die("%s", tern_dp_last_error(dpr.dp));
                goto done;
            }
            fprintf(stderr, "epoch %d/%d: privacy spent epsilon %.4f at delta %g (%lld steps)\n",
                    epoch + 1, c.epochs, eps, dpr.delta, (long long)tern_dp_steps(dpr.dp));
        }
        info.epoch = (uint64_t)epoch + 1;
        if (c.checkpoint && tern_checkpoint_save(m, opt, &info, c.checkpoint, &err) != TERN_OK) {
            rc = die("%s", err.message);
            goto done;
        }
    }
    /* From here on the model holds the weight average, if any: it is evaluated and saved. */
    tern_ema_swap(ema);
    if (tern_metrics_count(metrics) == 0 && (rc = evaluate(m, NULL, val, metrics, logits, &c, "  validating", true)))
        goto done;
    if (ema)
        printf("weights: exponential moving average, decay %g, %lld updates\n", c.ema,
               (long long)tern_ema_updates(ema));
    printf("trained in %.1f s\n", cli_now() - run_start);
    if (c.dp) {
        double eps;
        if (tern_dp_epsilon(dpr.dp, dpr.delta, &eps) != TERN_OK) {
            rc = die("%s", tern_dp_last_error(dpr.dp));
            goto done;
        }
        printf("differential privacy: epsilon %.4f at delta %g (%s accountant, noise multiplier "
               "%.6g, sample rate %.6g, max grad norm %g, %lld steps)\n",
               eps, dpr.delta, c.accountant ? c.accountant : "rdp",
               tern_dp_options_of(dpr.dp)->noise_multiplier,
               tern_dp_options_of(dpr.dp)->sample_rate, tern_dp_options_of(dpr.dp)->max_grad_norm,
               (long long)tern_dp_steps(dpr.dp));
    }
    print_metrics(metrics, classes, &d, 5);
    size_t skipped = (train ? tern_loader_skipped(train) : 0) + tern_loader_skipped(val);
    if (skipped > 0)
        fprintf(stderr, "%zu images could not be decoded and were skipped\n", skipped);
    const char *out = c.output ? c.output : "model.safetensors";
    char **names = malloc(sizeof *names * (size_t)classes);
    if (!names) {
        rc = die("out of memory");
        goto done;
    }
    for (int k = 0; k < classes; k++)
        names[k] = (char *)class_name(&d, k);
    tern_model_info mi = {.input_size = size, .resize = d.eval_t.resize, .nclasses = classes,
                          .class_names = names};
    for (int ch = 0; ch < 3; ch++) {
        mi.mean[ch] = d.eval_t.mean[ch];
        mi.std[ch] = d.eval_t.std[ch];
    }
    tern_status s = tern_model_save_file(m, &mi, out, &err);
    free(names);
    if (s != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    printf("saved %s\n", out);
    if (c.metrics_json)
        rc = write_metrics_json(c.metrics_json, metrics, &d, classes);
done:
    dp_run_free(&dpr);
    tern_ema_destroy(&ema);
    tern_loader_destroy(&train);
    tern_loader_destroy(&val);
    tern_metrics_destroy(&metrics);
    tern_optimizer_destroy(&opt);
    tern_model_destroy(&m);
    free(logits);
    free(dlogits);
    data_close(&d);
    return rc;
}

/* ---- eval and predict ------------------------------------------------------------------------- */

static int cmd_eval(int argc, char **argv)
{
    cli c = {.batch = 256, .top = 5};
    int rc = cli_parse(argc, argv, CMD_EVAL, false, &c);
    if (rc == 2) {
        printf("usage: tern eval --model M.safetensors --data fashion-mnist|DIR [options]\n\n"
               "Evaluates a model on Fashion-MNIST's test set or an image folder: accuracy,\n"
               "top-k, per-class precision, recall and F1, and the confusion matrix.\n\n"
               "  --batch B             images per forward pass (default 256)\n"
               "  --top K               also report top-K accuracy (default 5)\n"
               "  --limit N             evaluate N random images\n"
               "  --size S              input size (default: the model's)\n"
               "  --metrics-json PATH   write the metrics as JSON\n"
               "  --strict              fail on a bad image instead of skipping it\n"
               "  --threads N, --isa I\n");
        return 0;
    }
    if (rc)
        return rc;
    if (!c.model)
        return die("--model is required");
    tern_model *m = NULL;
    tern_qmodel *q = NULL; /* a quantized file runs as such (tern_quant.c) */
    tern_model_info info = {0};
    int qrc = tern_quant_open_model(c.model, c.batch, &q, &info);
    if (qrc > 0 || (qrc < 0 && (rc = cli_load_model(&c, c.model, &m, &info))))
        return qrc > 0 ? qrc : rc;
    data d;
    tern_loader *loader = NULL;
    tern_metrics *metrics = NULL;
    float *logits = NULL;
    tern_error err = {{0}};
    if ((rc = open_data(&c, false, &d)))
        goto done;
    int model_classes, channels;
    if (q) {
        tern_qmodel_shape(q, NULL, NULL, &channels, &model_classes);
    } else {
        model_classes = tern_model_options_of(m)->num_classes;
        channels = tern_model_options_of(m)->in_channels;
    }
    int classes = tern_dataset_num_classes(d.val);
    if (classes != model_classes) {
        rc = die("the model has %d classes, the data %d", model_classes, classes);
        goto done;
    }
    for (int k = 0; k < info.nclasses; k++)
        if (strcmp(info.class_names[k], class_name(&d, k)) != 0) {
            rc = die("class %d is '%s' in the model but '%s' in the data", k, info.class_names[k],
                     class_name(&d, k));
            goto done;
        }
    tern_transform t = model_eval_transform(&info, c.size, channels);
    if (q && (rc = tern_quant_check_size(q, t.size)))
        goto done;
    tern_loader_options lo = {.batch = c.batch, .indices = d.val_idx, .nindices = d.nval,
                              .cache_dir = c.cache};
    if (tern_loader_create(d.val, &t, &lo, NULL, &loader, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    int top = c.top < classes ? c.top : classes;
    if (tern_metrics_create(classes, top, NULL, &metrics) != TERN_OK ||
        !(logits = malloc(sizeof(float) * (size_t)c.batch * (size_t)classes))) {
        rc = die("out of memory");
        goto done;
    }
    if (!q && tern_model_plan(m, c.batch, t.size, t.size, false) != TERN_OK) {
        rc = die("%s", tern_model_last_error(m));
        goto done;
    }
    double start = cli_now();
    if ((rc = evaluate(m, q, loader, metrics, logits, &c, "evaluating", false)))
        goto done;
    double secs = cli_now() - start;
    print_metrics(metrics, classes, &d, top);
    printf("\n%.1f s, %.0f images/s\n", secs, (double)tern_metrics_count(metrics) / secs);
    if (tern_loader_skipped(loader))
        fprintf(stderr, "%zu images could not be decoded and were skipped\n",
                tern_loader_skipped(loader));
    if (c.metrics_json)
        rc = write_metrics_json(c.metrics_json, metrics, &d, classes);
done:
    tern_loader_destroy(&loader);
    tern_metrics_destroy(&metrics);
    free(logits);
    data_close(&d);
    tern_model_info_free(&info);
    tern_model_destroy(&m);
    tern_qmodel_destroy(&q);
    return rc;
}

static int cmd_predict(int argc, char **argv)
{
    cli c = {.top = 3};
    int rc = cli_parse(argc, argv, CMD_PREDICT, true, &c);
    if (rc == 2) {
        printf("usage: tern predict --model M.safetensors [--top K] IMAGE...\n\n"
               "Classifies JPEG or PNG images, printing the K most likely classes (default 3)\n"
               "with their probabilities.\n");
        return 0;
    }
    if (rc)
        return rc;
    if (!c.model)
        return die("--model is required");
    if (c.nargs == 0)
        return die("no images given (see --help)");
    tern_model *m = NULL;
    tern_qmodel *q = NULL; /* a quantized file runs as such (tern_quant.c) */
    tern_model_info info = {0};
    int qrc = tern_quant_open_model(c.model, 1, &q, &info);
    if (qrc > 0 || (qrc < 0 && (rc = cli_load_model(&c, c.model, &m, &info))))
        return qrc > 0 ? qrc : rc;
    int k, channels;
    if (q) {
        tern_qmodel_shape(q, NULL, NULL, &channels, &k);
    } else {
        k = tern_model_options_of(m)->num_classes;
        channels = tern_model_options_of(m)->in_channels;
    }
    tern_transform t = model_eval_transform(&info, c.size, channels);
    int top = c.top < k ? c.top : k;
    float *x = malloc(sizeof(float) * (size_t)t.size * (size_t)t.size * (size_t)t.channels);
    float *logits = malloc(sizeof(float) * (size_t)k);
    int *order = malloc(sizeof(int) * (size_t)k);
    if (!x || !logits || !order) {
        rc = die("out of memory");
        goto done;
    }
    if (q ? (rc = tern_quant_check_size(q, t.size)) != 0
          : tern_model_plan(m, 1, t.size, t.size, false) != TERN_OK) {
        rc = q ? rc : die("%s", tern_model_last_error(m));
        goto done;
    }
    for (int i = 0; i < c.nargs; i++) {
        tern_image img = {0};
        tern_error err = {{0}};
        if (tern_image_load(c.args[i], NULL, NULL, &img, &err) != TERN_OK) {
            rc = die("%s", err.message);
            if (c.strict)
                goto done;
            continue;
        }
        tern_status s = tern_transform_apply(&t, &img, NULL, x);
        tern_image_free(NULL, &img);
        if (s != TERN_OK || (q ? tern_qmodel_forward(q, logits, x, 1)
                               : tern_model_forward(m, logits, x, 1, false)) != TERN_OK) {
            rc = die("%s: cannot classify", c.args[i]);
            continue;
        }
        double mx = logits[0], sum = 0;
        for (int j = 1; j < k; j++)
            mx = logits[j] > mx ? logits[j] : mx;
        for (int j = 0; j < k; j++) {
            sum += exp(logits[j] - mx);
            order[j] = j;
        }
        for (int a = 0; a < top; a++) /* partial selection sort: top is small */
            for (int b = a + 1; b < k; b++)
                if (logits[order[b]] > logits[order[a]]) {
                    int tmp = order[a];
                    order[a] = order[b];
                    order[b] = tmp;
                }
        printf("%s:", c.args[i]);
        for (int a = 0; a < top; a++) {
            int j = order[a];
            char fallback[16];
            snprintf(fallback, sizeof fallback, "class %d", j);
            printf("%s %s %.1f%%", a ? "," : "", j < info.nclasses ? info.class_names[j] : fallback,
                   100 * exp(logits[j] - mx) / sum);
        }
        printf("\n");
    }
done:
    free(x);
    free(logits);
    free(order);
    tern_model_info_free(&info);
    tern_model_destroy(&m);
    tern_qmodel_destroy(&q);
    return rc;
}

int tern_cmd_train(int argc, char **argv) { return cmd_train(argc, argv); }
int tern_cmd_eval(int argc, char **argv) { return cmd_eval(argc, argv); }
int tern_cmd_predict(int argc, char **argv) { return cmd_predict(argc, argv); }
