/* tern add-class: grow a trained classifier by one class without forgetting the old ones.
 *
 * Learning without forgetting (Li & Hoiem 2016) with a replay sample: the new model is the old
 * one with one more output (every tensor copied, the old classifier rows kept, the new row
 * initialised as torchvision initialises a Linear layer: N(0, 0.01) weight, zero bias), then
 * fine-tuned on an image folder holding some images of the old classes and images of the new
 * one, minimising
 *
 *   cross-entropy over the K+1 classes
 *   + W * T^2 * KL(softmax(old(x) / T) || softmax(new(x)[:K] / T)),   T = 2
 *
 * where old(x) are the frozen old model's eval-mode logits on the same (augmented) batch: the
 * distillation term keeps the new model's old-class outputs where the old model had them, so
 * old classes with few (or no) replay images are not forgotten.
 *
 * The data follows tern train's folder conventions (DIR/<class>/<image>; DIR/train and DIR/val
 * when both exist, else --val DIR or a seeded --val-split of DIR) and its transforms, with the
 * old model's input size and normalization. Class folders are matched to the model's classes
 * by name; the new model's classes are the old ones in their order, then the new one. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "train_common.h"
#include "tern.h"

#define DISTILL_TEMPERATURE 2.0f

static const char ADD_CLASS_HELP[] =
    "usage: tern add-class --model OLD.safetensors --data DIR --class NAME [options]\n\n"
    "Adds class NAME to a trained model and fine-tunes it without forgetting the old classes\n"
    "(learning without forgetting): cross-entropy over all classes plus W times the\n"
    "knowledge-distillation loss (temperature 2) between the old model's logits and the new\n"
    "model's old-class logits. DIR is an image folder (DIR/<class>/<image>, or DIR/train and\n"
    "DIR/val) with a folder NAME of new-class images and, ideally, some images of the old\n"
    "classes, in folders named as the model's classes. Reports the old model's accuracy on\n"
    "the old classes and, after fine-tuning, the new model's old-class, new-class and overall\n"
    "accuracy on the validation images (and its old-class accuracy choosing among the old\n"
    "classes only, which distillation protects even without old-class images). The new\n"
    "model lists the old classes in their order, then NAME.\n\n"
    "  --model PATH           the trained model (its metadata must name its classes)\n"
    "  --data DIR             training images of the new class and of old classes\n"
    "  --class NAME           the new class (a folder of DIR)\n"
    "  --distill W            weight of the distillation loss (default 1; 0: plain fine-tuning)\n"
    "  --val DIR              validation folder (default: DIR/val, or a split of DIR)\n"
    "  --val-split F          fraction of DIR held out for validation (default 0.1)\n"
    "  --size S               input size (default: the model's)\n"
    "  --no-augment           no random crops or flips\n"
    "  --limit N, --val-limit N   use N random training / validation images\n"
    "  --cache DIR            keep decoded, resized images in an LMDB cache\n"
    "  --strict               fail on a bad image instead of skipping it with a warning\n"
    "  --epochs N             (default 10)\n"
    "  --batch B              (default 32)\n"
    "  --optimizer sgd|adam|adamw|rmsprop   (default sgd)\n"
    "  --lr F                 peak learning rate (default 0.01 for SGD, 1e-4 otherwise)\n"
    "  --momentum F           SGD/RMSprop momentum (default 0.9 for SGD)\n"
    "  --nesterov             Nesterov momentum (SGD)\n"
    "  --weight-decay F       (default 5e-5)\n"
    "  --schedule cosine|step|constant   (default cosine)\n"
    "  --warmup-epochs F      linear warmup (default 0)\n"
    "  --label-smoothing F    (default 0)\n"
    "  --clip-grad-norm F     clip the gradient norm (default off)\n"
    "  --dropout P            classifier dropout (default 0.2)\n"
    "  --seed S               new row, data order and augmentation (default 0)\n"
    "  --threads N, --isa I   compute threads, kernel instruction set\n"
    "  --out PATH             the grown model (default model.safetensors)\n"
    "  --metrics-json PATH    final validation metrics as JSON\n";

/* ---- data ------------------------------------------------------------------------------------ */

typedef struct data {
    tern_dataset *train, *val; /* val may be train itself (a split) */
    size_t *train_idx, *val_idx;
    size_t ntrain, nval;
    int32_t *train_map, *val_map; /* dataset label -> new model label */
} data;

static void data_close(data *d)
{
    if (d->val != d->train)
        tern_dataset_close(&d->val);
    tern_dataset_close(&d->train);
    free(d->train_idx);
    free(d->val_idx);
    free(d->train_map);
    free(d->val_map);
    memset(d, 0, sizeof *d);
}

/* Maps ds's classes to the new model's: the old classes (info) keep their labels, `name`
 * becomes label info->nclasses. Fails, naming the folder, on a class that is neither; reports
 * whether the new class is present in *has_new. */
static int map_classes(const tern_dataset *ds, const char *dir, const tern_model_info *info,
                       const char *name, const char *model_path, int32_t **out, bool *has_new)
{
    int nc = tern_dataset_num_classes(ds);
    int32_t *map = malloc(sizeof *map * (size_t)nc);
    if (!map)
        return die("out of memory");
    *has_new = false;
    for (int j = 0; j < nc; j++) {
        const char *cls = tern_dataset_class_name(ds, j);
        map[j] = -1;
        if (strcmp(cls, name) == 0) {
            map[j] = info->nclasses;
            *has_new = true;
        }
        for (int k = 0; k < info->nclasses && map[j] < 0; k++)
            if (strcmp(cls, info->class_names[k]) == 0)
                map[j] = k;
        if (map[j] < 0) {
            char known[1024] = "";
            size_t len = 0;
            for (int k = 0; k < info->nclasses && len + 1 < sizeof known; k++)
                len += (size_t)snprintf(known + len, sizeof known - len, "%s'%s'", k ? ", " : "",
                                        info->class_names[k]);
            free(map);
            return die("class folder '%s' in %s is neither a class of %s (%s) nor the new class "
                       "'%s'",
                       cls, dir, model_path, known, name);
        }
    }
    *out = map;
    return 0;
}

/* Opens the folders, splits or limits them, and maps their classes to the new model's. */
static int open_data(const cli *c, const tern_model_info *info, data *d)
{
    memset(d, 0, sizeof *d);
    if (!is_dir(c->data))
        return die("--data: '%s' is not a directory", c->data);
    char train_dir[4096], val_dir[4096];
    snprintf(train_dir, sizeof train_dir, "%s/train", c->data);
    snprintf(val_dir, sizeof val_dir, "%s/val", c->data);
    bool split_dirs = !c->val && is_dir(train_dir) && is_dir(val_dir);
    const char *tdir = split_dirs ? train_dir : c->data, *vdir = split_dirs ? val_dir : c->val;
    if (open_folder(tdir, c->strict, &d->train))
        return 1;
    if (vdir && open_folder(vdir, c->strict, &d->val)) {
        data_close(d);
        return 1;
    }
    /* The new class first: a misspelt --class is the likeliest mistake. */
    bool has_new = false;
    for (int j = 0; j < tern_dataset_num_classes(d->train) && !has_new; j++)
        has_new = strcmp(tern_dataset_class_name(d->train, j), c->new_class) == 0;
    if (!has_new) {
        data_close(d);
        return die("no class folder '%s' in %s: put the new class's images in %s/%s/",
                   c->new_class, tdir, tdir, c->new_class);
    }
    if (map_classes(d->train, tdir, info, c->new_class, c->model, &d->train_map, &has_new)) {
        data_close(d);
        return 1;
    }
    uint64_t seed = (uint64_t)c->seed;
    size_t n = tern_dataset_size(d->train);
    if (!(d->train_idx = shuffled_indices(n, seed ^ 0x5eed))) {
        data_close(d);
        return die("out of memory");
    }
    d->ntrain = n;
    if (!d->val) {
        float frac = c->val_split > 0 ? c->val_split : 0.1f;
        size_t nval = (size_t)(frac * (double)n);
        if (nval < 1 || nval >= n) {
            data_close(d);
            return die("%s: %zu images cannot be split into training and validation", tdir, n);
        }
        d->val = d->train;
        d->val_idx = malloc(nval * sizeof *d->val_idx);
        if (!d->val_idx) {
            data_close(d);
            return die("out of memory");
        }
        memcpy(d->val_idx, d->train_idx + (n - nval), nval * sizeof *d->val_idx);
        d->nval = nval;
        d->ntrain = n - nval;
        d->val_map = malloc(sizeof *d->val_map * (size_t)tern_dataset_num_classes(d->train));
        if (!d->val_map) {
            data_close(d);
            return die("out of memory");
        }
        memcpy(d->val_map, d->train_map,
               sizeof *d->val_map * (size_t)tern_dataset_num_classes(d->train));
    } else {
        if (map_classes(d->val, vdir, info, c->new_class, c->model, &d->val_map, &has_new)) {
            data_close(d);
            return 1;
        }
        if (!has_new)
            fprintf(stderr, "%s: warning: %s has no folder '%s': new-class accuracy cannot be "
                            "measured\n",
                    cli_prog, vdir, c->new_class);
        size_t nv = tern_dataset_size(d->val);
        if (!(d->val_idx = shuffled_indices(nv, seed ^ 0x7a1))) {
            data_close(d);
            return die("out of memory");
        }
        /* Without a limit, keep the natural order (easier to read confusions by source). */
        for (size_t i = 0; c->val_limit <= 0 && i < nv; i++)
            d->val_idx[i] = i;
        d->nval = nv;
    }
    if (c->limit > 0 && (size_t)c->limit < d->ntrain)
        d->ntrain = (size_t)c->limit;
    if (c->val_limit > 0 && (size_t)c->val_limit < d->nval)
        d->nval = (size_t)c->val_limit;
    /* Old classes without training images are kept by distillation alone: say so. */
    for (int k = 0; k < info->nclasses; k++) {
        bool found = false;
        for (int j = 0; j < tern_dataset_num_classes(d->train) && !found; j++)
            found = d->train_map[j] == k;
        if (!found)
            fprintf(stderr, "%s: warning: no training images of old class '%s' in %s: "
                            "distillation keeps it apart from the other old classes, but the "
                            "new class may absorb it\n",
                    cli_prog, info->class_names[k], tdir);
    }
    return 0;
}

/* ---- evaluation ------------------------------------------------------------------------------ */

/* Correct predictions among validation images of the old classes and of the new class;
 * old_within counts old-class images whose class wins among the old outputs alone (what
 * distillation protects directly: without replay images the new class can still absorb old
 * ones). */
typedef struct split_accuracy {
    size_t old_n, old_correct, old_within, new_n, new_correct;
} split_accuracy;

static int argmax(const float *z, int k)
{
    int best = 0;
    for (int j = 1; j < k; j++)
        if (z[j] > z[best])
            best = j;
    return best;
}

/* Runs m in eval mode over a loader's epoch, predicting among its `classes` outputs (the old
 * model: the K old classes, whose images alone it is scored on; the new model: K + 1). Labels
 * are mapped through map into labels; metrics (may be NULL) receive the new model's batches. */
static int evaluate(tern_model *m, int classes, int k_old, tern_loader *loader,
                    const int32_t *map, int32_t *labels, float *logits, tern_metrics *metrics,
                    split_accuracy *acc)
{
    memset(acc, 0, sizeof *acc);
    if (metrics)
        tern_metrics_reset(metrics);
    tern_error err = {{0}};
    for (;;) {
        const float *x;
        const int32_t *y;
        int n;
        tern_status s = tern_loader_next(loader, &x, &y, &n, &err);
        if (s == TERN_ERR_NOT_FOUND)
            break;
        if (s != TERN_OK)
            return die("%s", err.message);
        if (tern_model_forward(m, logits, x, n, false) != TERN_OK)
            return die("%s", tern_model_last_error(m));
        for (int i = 0; i < n; i++) {
            labels[i] = map[y[i]];
            bool is_old = labels[i] < k_old;
            if (!is_old && classes == k_old)
                continue;
            const float *z = logits + (size_t)i * (size_t)classes;
            bool correct = argmax(z, classes) == labels[i];
            if (is_old) {
                acc->old_n++;
                acc->old_correct += correct;
                acc->old_within += argmax(z, k_old) == labels[i];
            } else {
                acc->new_n++;
                acc->new_correct += correct;
            }
        }
        if (metrics) {
            float loss;
            tern_cross_entropy_loss(&loss, NULL, logits, labels, n, classes, 0.0f);
            tern_metrics_add(metrics, logits, labels, n, loss);
        }
    }
    return 0;
}

static double ratio(size_t a, size_t b) { return b ? (double)a / (double)b : NAN; }

/* "97.50%", or "n/a" without images. */
static const char *percent(char *buf, size_t len, size_t correct, size_t total)
{
    if (total == 0)
        snprintf(buf, len, "n/a");
    else
        snprintf(buf, len, "%.2f%%", 100.0 * ratio(correct, total));
    return buf;
}

static json_t *json_ratio(size_t correct, size_t total)
{
    return total ? json_real(ratio(correct, total)) : json_null();
}

/* {"old_class_accuracy_before": ..., "old_class_accuracy_after": ...,
 *  "old_class_accuracy_after_among_old": ..., "new_class_accuracy": ..., "accuracy": ...,
 *  "metrics": <tern_metrics_to_json of the new model>}, built with jansson. */
static int write_metrics_json(const char *path, const split_accuracy *before,
                              const split_accuracy *after, const tern_metrics *m,
                              const char *const *names)
{
    char *text = tern_metrics_to_json(m, names);
    json_t *metrics = text ? json_loads(text, 0, NULL) : NULL;
    free(text);
    json_t *doc = metrics ? json_object() : NULL;
    if (!doc) {
        json_decref(metrics);
        return die("out of memory");
    }
    json_object_set_new(doc, "old_class_accuracy_before",
                        json_ratio(before->old_correct, before->old_n));
    json_object_set_new(doc, "old_class_accuracy_after",
                        json_ratio(after->old_correct, after->old_n));
    json_object_set_new(doc, "old_class_accuracy_after_among_old",
                        json_ratio(after->old_within, after->old_n));
    json_object_set_new(doc, "new_class_accuracy", json_ratio(after->new_correct, after->new_n));
    json_object_set_new(doc, "accuracy", json_ratio(after->old_correct + after->new_correct,
                                                    after->old_n + after->new_n));
    json_object_set_new(doc, "metrics", metrics);
    int rc = json_dump_file(doc, path, JSON_INDENT(2)) == 0 ? 0 : die("cannot write %s", path);
    json_decref(doc);
    return rc;
}

/* ---- the grown model ------------------------------------------------------------------------- */

/* A model like old with one more class: every tensor from the old model's file except the
 * classifier's last layer, whose first K rows are the old ones and whose new row keeps
 * tern_model_create's torchvision initialisation (N(0, 0.01) weight, zero bias; drawn from
 * opt->seed). */
static int grow_model(const tern_model_options *old_opt, const tern_model *old,
                      const tern_safetensors *st, const char *path, tern_model **out)
{
    tern_model_options o = *old_opt;
    o.num_classes = old_opt->num_classes + 1;
    tern_error err = {{0}};
    tern_model *m = NULL;
    if (tern_model_create(&o, &m, &err) != TERN_OK)
        return die("%s", err.message);
    const char *keep[] = {"classifier.3."};
    if (tern_model_load_state_except(m, st, keep, 1, &err) != TERN_OK) {
        tern_model_destroy(&m);
        return die("%s: %s", path, err.message);
    }
    const tern_model_tensor *ow = tern_model_find_tensor(old, "classifier.3.weight");
    const tern_model_tensor *ob = tern_model_find_tensor(old, "classifier.3.bias");
    const tern_model_tensor *nw = tern_model_find_tensor(m, "classifier.3.weight");
    const tern_model_tensor *nb = tern_model_find_tensor(m, "classifier.3.bias");
    if (!ow || !ob || !nw || !nb || ow->ndim != 2 || nw->ndim != 2 ||
        ow->shape[1] != nw->shape[1] || nw->shape[0] != ow->shape[0] + 1) {
        tern_model_destroy(&m);
        return die("%s: unexpected classifier.3 shapes", path);
    }
    /* weight (K+1, F): rows are classes, so the old (K, F) block is a prefix. */
    memcpy(nw->data, ow->data, ow->count * sizeof(float));
    memcpy(nb->data, ob->data, ob->count * sizeof(float));
    tern_model_invalidate(m);
    *out = m;
    return 0;
}

/* ---- the command ----------------------------------------------------------------------------- */

static int cmd_add_class(int argc, char **argv)
{
    cli c = {.epochs = 10, .batch = 32, .dropout = 0.2f, .momentum = -1, .weight_decay = 5e-5f,
             .distill = 1.0f};
    int rc = cli_parse(argc, argv, CMD_ADD_CLASS, false, &c);
    if (rc == 2) {
        fputs(ADD_CLASS_HELP, stdout);
        return 0;
    }
    if (rc)
        return rc;
    if (!c.model)
        return die("--model is required");
    if (!c.data)
        return die("--data is required (an image folder)");
    if (!c.new_class || !*c.new_class)
        return die("--class is required (the name of the new class's folder)");
    if (strchr(c.new_class, '/'))
        return die("--class '%s': a class name cannot contain '/'", c.new_class);
    if (c.num_classes > 0)
        return die("--num-classes does not apply: the new model has the old model's classes + 1");

    tern_error err = {{0}};
    tern_safetensors *st = NULL;
    tern_model *old = NULL, *m = NULL;
    tern_model_info info = {0};
    data d = {0};
    tern_optimizer *opt = NULL;
    tern_loader *train = NULL, *val = NULL;
    tern_metrics *metrics = NULL;
    float *logits = NULL, *dlogits = NULL, *teacher = NULL;
    int32_t *labels = NULL;
    const char **names = NULL;

    /* The old model, its classes, and the grown model. */
    if (tern_safetensors_open(c.model, NULL, &st, &err) != TERN_OK)
        return die("%s", err.message);
    tern_model_options oo;
    if ((rc = cli_model_options(&c, c.model, st, &oo)))
        goto done;
    if (tern_model_create(&oo, &old, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    if (tern_model_load_state(old, st, "", &err) != TERN_OK ||
        tern_model_info_read(st, &info, &err) != TERN_OK) {
        rc = die("%s: %s", c.model, err.message);
        goto done;
    }
    if (info.nclasses == 0) {
        rc = die("%s has no class names in its metadata (models saved by tern train have them)",
                 c.model);
        goto done;
    }
    const int k_old = info.nclasses, classes = k_old + 1;
    for (int k = 0; k < k_old; k++)
        if (strcmp(info.class_names[k], c.new_class) == 0) {
            rc = die("'%s' is already class %d of %s", c.new_class, k, c.model);
            goto done;
        }
    if ((rc = grow_model(&oo, old, st, c.model, &m)))
        goto done;
    tern_safetensors_close(&st);

    /* Data and pipelines. */
    if ((rc = open_data(&c, &info, &d)))
        goto done;
    tern_transform et = model_eval_transform(&info, c.size, oo.in_channels), tt = et;
    if (!c.no_augment) {
        tt.random_resized_crop = true;
        tt.resize = 0;
        tt.hflip = true;
    }
    const int size = et.size;
    if (d.ntrain < (size_t)c.batch) {
        rc = die("%zu training images are fewer than one batch of %d (lower --batch)", d.ntrain,
                 c.batch);
        goto done;
    }
    char train_cache[4096], val_cache[4096];
    cache_dirs(c.cache, train_cache, val_cache, sizeof train_cache);
    tern_loader_options lo = {.batch = c.batch, .shuffle = true, .drop_last = true,
                              .seed = (uint64_t)c.seed, .indices = d.train_idx,
                              .nindices = d.ntrain, .cache_dir = c.cache ? train_cache : NULL};
    tern_loader_options vo = {.batch = c.batch, .seed = (uint64_t)c.seed, .indices = d.val_idx,
                              .nindices = d.nval, .cache_dir = c.cache ? val_cache : NULL};
    if (tern_loader_create(d.train, &tt, &lo, NULL, &train, &err) != TERN_OK ||
        tern_loader_create(d.val, &et, &vo, NULL, &val, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    if ((rc = make_optimizer(&c, m, 0.01f, 1e-4f, &opt)))
        goto done;
    long steps_per_epoch = (long)tern_loader_batches(train);
    tern_schedule sched;
    if ((rc = make_schedule(&c, tern_optimizer_lr(opt), steps_per_epoch, &sched)))
        goto done;
    size_t b = (size_t)c.batch;
    if (tern_metrics_create(classes, classes < 5 ? classes : 5, NULL, &metrics) != TERN_OK ||
        !(logits = malloc(sizeof(float) * b * (size_t)classes)) ||
        !(dlogits = malloc(sizeof(float) * b * (size_t)classes)) ||
        !(teacher = malloc(sizeof(float) * b * (size_t)k_old)) ||
        !(labels = malloc(sizeof(int32_t) * b)) ||
        !(names = malloc(sizeof *names * (size_t)classes))) {
        rc = die("out of memory");
        goto done;
    }
    for (int k = 0; k < k_old; k++)
        names[k] = info.class_names[k];
    names[k_old] = c.new_class;
    if (tern_model_plan(old, c.batch, size, size, false) != TERN_OK) {
        rc = die("%s", tern_model_last_error(old));
        goto done;
    }
    if (tern_model_plan(m, c.batch, size, size, true) != TERN_OK) {
        rc = die("%s", tern_model_last_error(m));
        goto done;
    }

    /* Before: the old model on the old classes' validation images. */
    split_accuracy before, after;
    if ((rc = evaluate(old, k_old, k_old, val, d.val_map, labels, teacher, NULL, &before)))
        goto done;
    const tern_model_options *mo = tern_model_options_of(m);
    fprintf(stderr, "%s (width %.2f) with %d classes + '%s'; %zu training and %zu validation "
                    "images of %dx%dx%d; %s, %d epochs of %ld steps, distillation weight %g\n",
            tern_arch_name(mo->arch), mo->width_mult, k_old, c.new_class, d.ntrain, d.nval, size,
            size, mo->in_channels, tern_optimizer_kind_name(tern_optimizer_options_of(opt)->kind),
            c.epochs, steps_per_epoch, (double)c.distill);

    double run_start = cli_now();
    long step = 0;
    for (int epoch = 0; epoch < c.epochs; epoch++) {
        double ce_sum = 0, kd_sum = 0, start = cli_now();
        size_t batches = 0, images = 0;
        for (;;) {
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
            for (int i = 0; i < n; i++)
                labels[i] = d.train_map[y[i]];
            tern_optimizer_set_lr(opt, tern_schedule_lr(&sched, step));
            if (tern_model_forward(old, teacher, x, n, false) != TERN_OK) {
                rc = die("%s", tern_model_last_error(old));
                goto done;
            }
            if (tern_model_forward(m, logits, x, n, true) != TERN_OK) {
                rc = die("%s", tern_model_last_error(m));
                goto done;
            }
            float ce, kd = 0;
            tern_cross_entropy_loss(&ce, dlogits, logits, labels, n, classes, c.smoothing);
            if (c.distill > 0)
                tern_distillation_loss(&kd, dlogits, logits, classes, teacher, n, k_old,
                                       DISTILL_TEMPERATURE, c.distill);
            if (!isfinite(ce) || !isfinite(kd)) {
                rc = die("loss is not finite at epoch %d step %zu: lower --lr", epoch + 1,
                         batches + 1);
                goto done;
            }
            tern_model_zero_grad(m);
            tern_model_backward(m, dlogits);
            if (c.clip > 0)
                tern_clip_grad_norm(m, c.clip);
            tern_optimizer_step(opt);
            step++;
            ce_sum += ce;
            kd_sum += kd;
            images += (size_t)n;
            batches++;
        }
        double train_s = cli_now() - start;
        if ((rc = evaluate(m, classes, k_old, val, d.val_map, labels, logits, metrics, &after)))
            goto done;
        char a[32], bnew[32];
        double nb = (double)(batches ? batches : 1);
        fprintf(stderr, "epoch %d/%d: loss %.4f (cross-entropy %.4f, distillation %.4f), %.0f "
                        "img/s | val old-class %s, new-class %s\n",
                epoch + 1, c.epochs, (ce_sum + kd_sum) / nb, ce_sum / nb, kd_sum / nb,
                (double)images / train_s, percent(a, sizeof a, after.old_correct, after.old_n),
                percent(bnew, sizeof bnew, after.new_correct, after.new_n));
    }

    /* Report. */
    char p1[32], p2[32], p3[32], p4[32], p5[32];
    printf("trained in %.1f s\n", cli_now() - run_start);
    printf("old-class accuracy before: %s (old model, %zu images of %d classes)\n",
           percent(p1, sizeof p1, before.old_correct, before.old_n), before.old_n, k_old);
    printf("old-class accuracy after:  %s (%zu images; %s choosing among the old classes only)\n",
           percent(p2, sizeof p2, after.old_correct, after.old_n), after.old_n,
           percent(p5, sizeof p5, after.old_within, after.old_n));
    printf("new-class accuracy after:  %s (%zu images of '%s')\n",
           percent(p3, sizeof p3, after.new_correct, after.new_n), after.new_n, c.new_class);
    printf("overall accuracy after:    %s (%zu images)\n\n",
           percent(p4, sizeof p4, after.old_correct + after.new_correct, after.old_n + after.new_n),
           after.old_n + after.new_n);
    printf("%-24s %9s %9s %9s %8s\n", "class", "precision", "recall", "f1", "support");
    for (int k = 0; k < classes; k++)
        printf("%-24.24s %9.3f %9.3f %9.3f %8zu%s\n", names[k], tern_metrics_precision(metrics, k),
               tern_metrics_recall(metrics, k), tern_metrics_f1(metrics, k),
               tern_metrics_support(metrics, k), k == k_old ? "  (new)" : "");
    if (tern_loader_skipped(train) + tern_loader_skipped(val) > 0)
        fprintf(stderr, "%zu images could not be decoded and were skipped\n",
                tern_loader_skipped(train) + tern_loader_skipped(val));

    /* The grown model, with the old model's pipeline and the new class list. */
    tern_model_info mi = info;
    mi.class_names = (char **)names;
    mi.nclasses = classes;
    mi.input_size = size;
    mi.resize = et.resize;
    for (int ch = 0; ch < 3; ch++) {
        mi.mean[ch] = et.mean[ch];
        mi.std[ch] = et.std[ch];
    }
    const char *out = c.output ? c.output : "model.safetensors";
    if (tern_model_save_file(m, &mi, out, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    printf("\nsaved %s (%d classes)\n", out, classes);
    if (c.metrics_json)
        rc = write_metrics_json(c.metrics_json, &before, &after, metrics, names);
done:
    tern_loader_destroy(&train);
    tern_loader_destroy(&val);
    tern_metrics_destroy(&metrics);
    tern_optimizer_destroy(&opt);
    tern_model_destroy(&m);
    tern_model_destroy(&old);
    tern_safetensors_close(&st);
    tern_model_info_free(&info);
    data_close(&d);
    free(logits);
    free(dlogits);
    free(teacher);
    free(labels);
    free(names);
    return rc;
}

int tern_cmd_add_class(int argc, char **argv) { return cmd_add_class(argc, argv); }
