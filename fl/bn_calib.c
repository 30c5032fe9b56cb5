/* BatchNorm statistics re-estimation (include/tern/bn_calib.h).
 *
 * The model's BatchNorm layers update running = (1 - m) * running + m * batch_stat in
 * training mode, with m the model's momentum, and their training-mode output does not depend
 * on the running values. So each batch runs with every running buffer zeroed first, which
 * leaves m * batch_stat in it: divided by m and summed in double over the batches, that is
 * PyTorch's momentum=None cumulative average without changing the momentum of the model. */
#include "tern/bn_calib.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "nn/util.h"

/* The model's BatchNorm state: the running buffers (one flat copy) and the counters. */
typedef struct bn_state {
    size_t nfloats, ncounters;
    float *saved;      /* (nfloats) the buffers before calibration */
    double *sum;       /* (nfloats) sum over batches of the batch statistics */
    int64_t *counters; /* (ncounters) the counters before calibration */
} bn_state;

static void restore(tern_model *m, const bn_state *b)
{
    size_t f = 0, c = 0;
    for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(m, i);
        if (t->kind == TERN_TENSOR_BUFFER) {
            memcpy(t->data, b->saved + f, t->count * sizeof(float));
            f += t->count;
        } else if (t->kind == TERN_TENSOR_COUNTER) {
            *t->counter = b->counters[c++];
        }
    }
    tern_model_invalidate(m);
}

tern_status tern_bn_calibrate(tern_model *model, tern_loader *loader,
                              const tern_bn_calibration_options *opt, size_t *num_batches,
                              tern_error *err)
{
    if (!model || !loader || !opt)
        return tern_set_error(err, TERN_ERR_INVALID, "bn calibration: NULL model, loader or "
                              "options");
    if (opt->batch < 2 || opt->batch > 65536)
        return tern_set_error(err, TERN_ERR_INVALID, "bn calibration: batch %d outside "
                              "[2, 65536]", opt->batch);
    if (num_batches)
        *num_batches = 0;
    bn_state b = {0};
    for (size_t i = 0; i < tern_model_tensor_count(model); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(model, i);
        if (t->kind == TERN_TENSOR_BUFFER)
            b.nfloats += t->count;
        else if (t->kind == TERN_TENSOR_COUNTER)
            b.ncounters++;
    }
    if (b.nfloats == 0)
        return TERN_OK; /* no BatchNorm (GroupNorm models): nothing to estimate */
    const tern_model_options *mo = tern_model_options_of(model);
    const double momentum = (double)mo->bn_momentum;
    size_t nlogits;
    if (!tern_mul_size((size_t)opt->batch, (size_t)mo->num_classes, &nlogits))
        return tern_set_error(err, TERN_ERR_INVALID, "bn calibration: batch too large");
    float *logits = malloc(nlogits * sizeof *logits);
    b.saved = malloc(b.nfloats * sizeof *b.saved);
    b.sum = calloc(b.nfloats, sizeof *b.sum);
    b.counters = malloc((b.ncounters ? b.ncounters : 1) * sizeof *b.counters);
    tern_status s = TERN_OK;
    bool touched = false;
    size_t used = 0;
    if (!logits || !b.saved || !b.sum || !b.counters) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "bn calibration: out of memory for %zu "
                           "statistics", b.nfloats);
        goto done;
    }
    size_t f = 0, c = 0;
    for (size_t i = 0; i < tern_model_tensor_count(model); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(model, i);
        if (t->kind == TERN_TENSOR_BUFFER) {
            memcpy(b.saved + f, t->data, t->count * sizeof(float));
            f += t->count;
        } else if (t->kind == TERN_TENSOR_COUNTER) {
            b.counters[c++] = *t->counter;
        }
    }
    if ((s = tern_model_plan(model, opt->batch, opt->height, opt->width, true)) != TERN_OK) {
        s = tern_set_error(err, s, "bn calibration: cannot plan batches of %d at %dx%d: %s",
                           opt->batch, opt->height, opt->width, tern_model_last_error(model));
        goto done;
    }
    tern_loader_set_epoch(loader, 0);
    for (;;) {
        const float *x;
        const int32_t *y;
        int n;
        s = tern_loader_next(loader, &x, &y, &n, err);
        if (s == TERN_ERR_NOT_FOUND) {
            s = TERN_OK;
            break;
        }
        if (s != TERN_OK)
            goto done;
        if (n < 2)
            continue;
        if (n > opt->batch) {
            s = tern_set_error(err, TERN_ERR_INVALID, "bn calibration: the loader returned %d "
                               "images, more than the batch of %d", n, opt->batch);
            goto done;
        }
        touched = true;
        for (size_t i = 0; i < tern_model_tensor_count(model); i++) {
            const tern_model_tensor *t = tern_model_tensor_at(model, i);
            if (t->kind == TERN_TENSOR_BUFFER)
                memset(t->data, 0, t->count * sizeof(float));
        }
        if ((s = tern_model_forward(model, logits, x, n, true)) != TERN_OK) {
            s = tern_set_error(err, s, "bn calibration: forward: %s",
                               tern_model_last_error(model));
            goto done;
        }
        f = 0;
        for (size_t i = 0; i < tern_model_tensor_count(model); i++) {
            const tern_model_tensor *t = tern_model_tensor_at(model, i);
            if (t->kind != TERN_TENSOR_BUFFER)
                continue;
            for (size_t j = 0; j < t->count; j++)
                b.sum[f + j] += (double)t->data[j] / momentum;
            f += t->count;
        }
        used++;
    }
    if (used == 0) {
        s = tern_set_error(err, TERN_ERR_STATE, "bn calibration: the loader gave no batch of "
                           "two or more images");
        goto done;
    }
    restore(model, &b); /* the counters, as they were */
    f = 0;
    for (size_t i = 0; i < tern_model_tensor_count(model); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(model, i);
        if (t->kind != TERN_TENSOR_BUFFER)
            continue;
        for (size_t j = 0; j < t->count; j++)
            t->data[j] = (float)(b.sum[f + j] / (double)used);
        f += t->count;
    }
    tern_model_invalidate(model);
    touched = false;
    if (num_batches)
        *num_batches = used;
done:
    if (touched)
        restore(model, &b);
    free(logits);
    free(b.saved);
    free(b.sum);
    free(b.counters);
    return s;
}
