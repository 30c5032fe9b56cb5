/* Pieces shared by the training commands (tern train, tern add-class): folders, index
 * shuffles, optimizer and schedule from the command line, the evaluation transform a model
 * file describes. Each prints its own errors and returns 0 or 1, like the commands. */
#ifndef TERN_APPS_TRAIN_COMMON_H
#define TERN_APPS_TRAIN_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cli.h"

bool is_dir(const char *path);
/* Opens an image folder; skipped images are reported on stderr as warnings. */
int open_folder(const char *dir, bool strict, tern_dataset **out);
/* The indices [0, n) in a seeded random order (malloc'd), or NULL when out of memory. */
size_t *shuffled_indices(size_t n, uint64_t seed);
/* The optimizer of --optimizer/--lr/--momentum/--nesterov/--weight-decay; the learning rate
 * defaults to sgd_lr for SGD and other_lr otherwise, momentum to 0.9 for SGD. */
int make_optimizer(const cli *c, tern_model *m, float sgd_lr, float other_lr,
                   tern_optimizer **opt);
/* The schedule of --schedule/--warmup-epochs over --epochs of steps_per_epoch steps. */
int make_schedule(const cli *c, float base_lr, long steps_per_epoch, tern_schedule *s);
/* The evaluation pipeline a model file describes (input size, resize, normalization), at
 * size_override when not 0 (the model's resize scaled to it); a file without that information
 * gets the folder pipeline at 224 (or size_override) with ImageNet normalization. */
tern_transform model_eval_transform(const tern_model_info *info, int size_override,
                                    int channels);

/* The LMDB cache directories of a training run's two loaders under --cache DIR (LMDB allows
 * one environment per directory per process): DIR/train and DIR/val. */
void cache_dirs(const char *dir, char *train, char *val, size_t len);

#endif
