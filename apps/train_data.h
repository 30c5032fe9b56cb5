/* The data and evaluation pieces of tern train / tern eval (apps/tern_train.c) that tern prune
 * (apps/tern_prune.c) reuses for its fine-tuning. Each prints its own errors and returns 0 or 1. */
#ifndef TERN_APPS_TRAIN_DATA_H
#define TERN_APPS_TRAIN_DATA_H

#include "cli.h"

/* --data (and --val) opened, with index lists after --limit, --val-limit and --val-split. */
typedef struct data {
    tern_dataset *train, *val; /* val may be the same dataset as train (split) or NULL */
    size_t *train_idx, *val_idx;
    size_t ntrain, nval;
    tern_transform train_t, eval_t;
    bool fashion;
} data;

/* Opens --data for training (train and val) or for evaluation (val only). */
int open_data(const cli *c, bool training, data *d);
void data_close(data *d);
/* d's training and evaluation transforms at size (the training one augmented if augment). */
void make_transforms(data *d, int size, int channels, bool augment);
/* Runs m in eval mode (or the quantized q when m is NULL) over a loader's epoch into metrics;
 * logits holds a batch of outputs. */
int evaluate(tern_model *m, tern_qmodel *q, tern_loader *loader, tern_metrics *metrics,
             float *logits, const cli *c, const char *what, bool quiet_log);

#endif
