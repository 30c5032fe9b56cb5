/* tern prune: magnitude pruning of a trained model, optional fine-tuning with the pruned
 * weights held at zero, and a compressed model file (tern/prune.h).
 *
 *   tern prune --model M --sparsity S [--scope global|layer] [--data D --fine-tune-epochs E]
 *              --out P
 *
 * Data, optimizer, schedule and evaluation are tern train's (train_common.h); the training
 * step adds tern_pruner_mask_grads before and tern_pruner_apply after the optimizer step. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "train_common.h"
#include "train_data.h"

static const char PRUNE_HELP[] =
    "usage: tern prune --model M.safetensors --sparsity S --out P.safetensors [options]\n\n"
    "Sets the smallest-magnitude convolution and linear weights to zero, optionally\n"
    "fine-tunes with them held at exactly zero, prints the sparsity of every layer and the\n"
    "accuracy before pruning, after pruning and after fine-tuning, and writes a compressed\n"
    "file that tern eval, tern predict, tern quantize and the C API load like any model.\n\n"
    "Pruning:\n"
    "  --sparsity S           fraction of the prunable weights set to zero, in [0, 1]\n"
    "  --scope global|layer   one threshold over all prunable weights (default), or each\n"
    "                         layer pruned to S on its own\n"
    "  --include LIST         also prune: stem (features.0.0), depthwise, classifier (the\n"
    "                         last linear layer), comma-separated; by default they are kept,\n"
    "                         as are all BatchNorm/GroupNorm parameters and biases\n"
    "  --gradual              reach S gradually during fine-tuning (Zhu & Gupta's cubic\n"
    "                         schedule over the first 3/4 of the steps) instead of at once\n"
    "  --prune-interval N     with --gradual: steps between pruning updates (default 50)\n"
    "  --storage sparse|dense output file: compressed (default) or a plain model file\n"
    "Data and fine-tuning (tern train's options; without --data nothing is evaluated):\n"
    "  --data fashion-mnist|DIR, --val DIR, --val-split F, --limit N, --val-limit N,\n"
    "  --no-augment, --cache DIR, --strict\n"
    "  --fine-tune-epochs E   epochs of fine-tuning (default 0)\n"
    "  --lr F                 peak learning rate (default 0.01 for SGD, 1e-4 otherwise),\n"
    "                         cosine schedule over the fine-tuning\n"
    "  --batch B (default 128), --optimizer, --momentum, --nesterov, --weight-decay (5e-5),\n"
    "  --schedule, --warmup-epochs, --label-smoothing (0.1), --clip-grad-norm, --dropout\n"
    "  (0.2), --seed\n"
    "  --threads N, --isa I\n";

static long file_size(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 ? (long)sb.st_size : -1;
}

static int parse_include(const char *list, tern_prune_options *o)
{
    if (!list)
        return 0;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", list);
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        if (strcmp(tok, "stem") == 0)
            o->include_stem = true;
        else if (strcmp(tok, "depthwise") == 0)
            o->include_depthwise = true;
        else if (strcmp(tok, "classifier") == 0)
            o->include_classifier = true;
        else
            return die("--include: unknown '%s' (stem, depthwise, classifier)", tok);
    }
    return 0;
}

static void print_table(const tern_pruner *p, const char *title)
{
    printf("\n%s\n%-36s %-9s %9s %9s %8s %11s\n", title, "layer", "kind", "weights", "zeros",
           "sparsity", "threshold");
    for (size_t i = 0; i < tern_pruner_layer_count(p); i++) {
        tern_prune_layer l;
        tern_pruner_layer_at(p, i, &l);
        printf("%-36.36s %-9s %9zu %9zu %7.2f%% %11.4g\n", l.name, l.kind, l.count, l.zeros,
               100.0 * (double)l.zeros / (double)l.count, (double)l.threshold);
    }
    size_t prunable, zeros, params, param_zeros;
    tern_pruner_totals(p, &prunable, NULL, &zeros, &params, &param_zeros);
    printf("prunable weights: %zu of %zu zero (%.2f%%); all parameters: %zu of %zu zero "
           "(%.2f%%)\n",
           zeros, prunable, 100.0 * (double)zeros / (double)prunable, param_zeros, params,
           100.0 * (double)param_zeros / (double)params);
}

/* Accuracy of m on the validation loader, printed with a label. */
static int report(tern_model *m, tern_loader *val, tern_metrics *metrics, float *logits,
                  const cli *c, const char *label, int batch, int size)
{
    if (!val)
        return 0;
    if (tern_model_plan(m, batch, size, size, false) != TERN_OK)
        return die("%s", tern_model_last_error(m));
    int rc = evaluate(m, NULL, val, metrics, logits, c, "  evaluating", true);
    if (rc == 0)
        printf("accuracy %-22s %.2f%% on %zu images (loss %.4f)\n", label,
               100 * tern_metrics_accuracy(metrics), tern_metrics_count(metrics),
               tern_metrics_loss(metrics));
    fflush(stdout);
    return rc;
}

/* Fine-tunes for c->epochs over the train loader, masks enforced at every step; with
 * --gradual, the sparsity follows the cubic schedule to c->sparsity. */
static int fine_tune(const cli *c, tern_model *m, tern_pruner *p, tern_loader *train,
                     tern_loader *val, tern_metrics *metrics, float *logits, float *dlogits,
                     int size)
{
    tern_optimizer *opt = NULL;
    tern_error err = {{0}};
    int classes = tern_model_options_of(m)->num_classes;
    if (make_optimizer(c, m, 0.01f, 1e-4f, &opt))
        return 1;
    long steps_per_epoch = (long)tern_loader_batches(train), step = 0;
    long total = steps_per_epoch * c->epochs, ramp = total * 3 / 4;
    int interval = c->prune_interval > 0 ? c->prune_interval : 50;
    tern_schedule sched;
    int rc = make_schedule(c, tern_optimizer_lr(opt), steps_per_epoch, &sched);
    for (int epoch = 0; rc == 0 && epoch < c->epochs; epoch++) {
        if (tern_model_plan(m, c->batch, size, size, true) != TERN_OK) {
            rc = die("%s", tern_model_last_error(m));
            break;
        }
        double loss_sum = 0, start = cli_now();
        size_t batches = 0;
        for (;;) {
            const float *x;
            const int32_t *y;
            int n;
            tern_status s = tern_loader_next(train, &x, &y, &n, &err);
            if (s == TERN_ERR_NOT_FOUND)
                break;
            if (s != TERN_OK) {
                rc = die("%s", err.message);
                break;
            }
            if (c->gradual && step % interval == 0 &&
                tern_pruner_prune(p, tern_prune_polynomial(0, c->sparsity, step, 0, ramp)) !=
                    TERN_OK) {
                rc = die("out of memory");
                break;
            }
            tern_optimizer_set_lr(opt, tern_schedule_lr(&sched, step));
            float loss;
            if (tern_model_forward(m, logits, x, n, true) != TERN_OK) {
                rc = die("%s", tern_model_last_error(m));
                break;
            }
            if (tern_cross_entropy_loss(&loss, dlogits, logits, y, n, classes, c->smoothing) !=
                    TERN_OK ||
                !isfinite(loss)) {
                rc = die("loss is not finite at epoch %d step %zu: lower --lr", epoch + 1,
                         batches + 1);
                break;
            }
            tern_model_zero_grad(m);
            tern_model_backward(m, dlogits);
            tern_pruner_mask_grads(p);
            if (c->clip > 0)
                tern_clip_grad_norm(m, c->clip);
            tern_optimizer_step(opt);
            tern_pruner_apply(p);
            loss_sum += loss;
            batches++;
            step++;
        }
        if (rc)
            break;
        if (c->gradual && step >= ramp && tern_pruner_prune(p, c->sparsity) != TERN_OK)
            rc = die("out of memory");
        fprintf(stderr, "fine-tune epoch %d/%d: train loss %.4f, %.1f s\n", epoch + 1, c->epochs,
                loss_sum / (double)(batches ? batches : 1), cli_now() - start);
        char label[64];
        snprintf(label, sizeof label, "after epoch %d/%d:", epoch + 1, c->epochs);
        if (rc == 0)
            rc = report(m, val, metrics, logits, c, label, c->batch, size);
    }
    tern_optimizer_destroy(&opt);
    return rc;
}

/* Loads path back into a model like m and checks that every parameter and buffer is the same
 * bit for bit. */
static int verify_file(const tern_model *m, const char *path)
{
    tern_model_options o = *tern_model_options_of(m);
    tern_model *back = NULL;
    tern_error err = {{0}};
    int rc = 0;
    if (tern_model_create(&o, &back, &err) != TERN_OK ||
        tern_model_load_file(back, path, &err) != TERN_OK)
        rc = die("%s", err.message);
    for (size_t i = 0; rc == 0 && i < tern_model_tensor_count(m); i++) {
        const tern_model_tensor *a = tern_model_tensor_at(m, i), *b = tern_model_tensor_at(back, i);
        bool same = a->kind == TERN_TENSOR_COUNTER
                        ? *a->counter == *b->counter
                        : memcmp(a->data, b->data, a->count * sizeof(float)) == 0;
        if (!same)
            rc = die("%s: tensor '%s' differs after reloading", path, a->name);
    }
    tern_model_destroy(&back);
    return rc;
}

int tern_cmd_prune(int argc, char **argv)
{
    cli c = {.batch = 128, .dropout = 0.2f, .smoothing = 0.1f, .momentum = -1,
             .weight_decay = 5e-5f, .sparsity = -1};
    int rc = cli_parse(argc, argv, CMD_PRUNE, false, &c);
    if (rc == 2) {
        fputs(PRUNE_HELP, stdout);
        return 0;
    }
    if (rc)
        return rc;
    if (!c.model || !c.output || c.sparsity < 0)
        return die("--model, --sparsity and --out are required (see --help)");
    tern_prune_options po = {0};
    if (c.scope && tern_prune_scope_parse(c.scope, &po.scope) != TERN_OK)
        return die("unknown --scope '%s' (global or layer)", c.scope);
    if ((rc = parse_include(c.prune_include, &po)))
        return rc;
    bool dense = c.storage && strcmp(c.storage, "dense") == 0;
    if (c.storage && !dense && strcmp(c.storage, "sparse") != 0)
        return die("unknown --storage '%s' (sparse or dense)", c.storage);
    if (c.epochs > 0 && !c.data)
        return die("--fine-tune-epochs needs --data");
    if (c.gradual && c.epochs < 1)
        return die("--gradual needs --fine-tune-epochs >= 1");

    tern_model *m = NULL;
    tern_pruner *p = NULL;
    tern_model_info info = {0};
    tern_loader *train = NULL, *val = NULL;
    tern_metrics *metrics = NULL;
    float *logits = NULL, *dlogits = NULL;
    data d = {0};
    tern_error err = {{0}};
    if ((rc = cli_load_model(&c, c.model, &m, &info)))
        return rc;
    const tern_model_options *mo = tern_model_options_of(m);
    int classes = mo->num_classes, channels = mo->in_channels;
    tern_transform et = model_eval_transform(&info, c.size, channels);
    int size = et.size;
    if (c.data) {
        if ((rc = open_data(&c, c.epochs > 0, &d)))
            goto done;
        int k = tern_dataset_num_classes(d.val);
        if (k != classes) {
            rc = die("the model has %d classes, the data %d", classes, k);
            goto done;
        }
        make_transforms(&d, size, channels, !c.no_augment);
        char train_cache[4096], val_cache[4096];
        cache_dirs(c.cache, train_cache, val_cache, sizeof train_cache);
        tern_loader_options lo = {.batch = c.batch, .shuffle = true, .drop_last = true,
                                  .seed = (uint64_t)c.seed, .indices = d.train_idx,
                                  .nindices = d.ntrain, .cache_dir = c.cache ? train_cache : NULL};
        tern_loader_options vo = {.batch = c.batch, .seed = (uint64_t)c.seed,
                                  .indices = d.val_idx, .nindices = d.nval,
                                  .cache_dir = c.cache ? val_cache : NULL};
        if (c.epochs > 0 && d.ntrain < (size_t)c.batch) {
            rc = die("%zu training images are fewer than one batch of %d", d.ntrain, c.batch);
            goto done;
        }
        if ((c.epochs > 0 &&
             tern_loader_create(d.train, &d.train_t, &lo, NULL, &train, &err) != TERN_OK) ||
            tern_loader_create(d.val, &et, &vo, NULL, &val, &err) != TERN_OK) {
            rc = die("%s", err.message);
            goto done;
        }
    }
    if (tern_metrics_create(classes, classes < 5 ? classes : 5, NULL, &metrics) != TERN_OK ||
        !(logits = malloc(sizeof(float) * (size_t)c.batch * (size_t)classes)) ||
        !(dlogits = malloc(sizeof(float) * (size_t)c.batch * (size_t)classes))) {
        rc = die("out of memory");
        goto done;
    }
    if (tern_pruner_create(m, &po, &p, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    size_t prunable;
    tern_pruner_totals(p, &prunable, NULL, NULL, NULL, NULL);
    printf("pruning %s (%s, %zu parameters, %zu prunable in %zu layers) to %.2f%% sparsity, "
           "%s scope%s\n",
           c.model, tern_arch_name(mo->arch), tern_model_param_count(m), prunable,
           tern_pruner_layer_count(p), 100.0 * c.sparsity, tern_prune_scope_name(po.scope),
           c.gradual ? ", gradually during fine-tuning" : "");
    if ((rc = report(m, val, metrics, logits, &c, "before pruning:", c.batch, size)))
        goto done;
    /* weights that are zero already (a pruned file pruned further) stay zero */
    tern_pruner_mask_zeros(p);
    if (!c.gradual) {
        if (tern_pruner_prune(p, c.sparsity) != TERN_OK) {
            rc = die("out of memory");
            goto done;
        }
        if ((rc = report(m, val, metrics, logits, &c, "after pruning:", c.batch, size)))
            goto done;
    }
    if (c.epochs > 0 &&
        (rc = fine_tune(&c, m, p, train, val, metrics, logits, dlogits, size)))
        goto done;
    print_table(p, c.epochs > 0 ? "sparsity after fine-tuning:" : "sparsity:");
    if (!dense)
        rc = tern_prune_save_file(m, &info, c.output, &err) != TERN_OK ? die("%s", err.message) : 0;
    else
        rc = tern_model_save_file(m, &info, c.output, &err) != TERN_OK ? die("%s", err.message) : 0;
    if (rc == 0 && (rc = verify_file(m, c.output)) == 0) {
        long in = file_size(c.model), out = file_size(c.output);
        printf("wrote %s (%s): %ld bytes; %s: %ld bytes (%.2fx); reloaded bit for bit\n",
               c.output, dense ? "dense" : "compressed", out, c.model, in,
               out > 0 ? (double)in / (double)out : 0.0);
    }
done:
    tern_loader_destroy(&train);
    tern_loader_destroy(&val);
    tern_metrics_destroy(&metrics);
    tern_pruner_destroy(&p);
    tern_model_destroy(&m);
    tern_model_info_free(&info);
    free(logits);
    free(dlogits);
    data_close(&d);
    return rc;
}
