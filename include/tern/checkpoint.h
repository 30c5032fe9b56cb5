/* Training checkpoints: everything needed to resume training bit for bit, in one safetensors
 * file.
 *
 * Contents:
 *   model.<name>      the model's state_dict (tern_model_add_state with prefix "model.")
 *   optim.<state>     each optimizer state block, F32 [tern_model_param_count]
 *   rng.model         the model's random generator (dropout), 4 x u64 bit-copied into I64 [4]
 *   rng.data          the caller's extra generator (data order, augmentation), I64 [4]
 *   user              TERN_CHECKPOINT_USER_INTS caller integers, I64
 * and metadata: format "tern-checkpoint", the model file keys (arch, width_mult, in_channels,
 * num_classes, norm: tern_model_options_from_metadata reads them), epoch, global_step, and
 * with an optimizer optim.kind, optim.steps and every hyper-parameter (optim.lr, ...; floats
 * printed with 9 significant digits, which round-trips float32 exactly).
 *
 * Resuming reproduces the uninterrupted run exactly when the caller restores the same model
 * options (threads and ISA included), optimizer kind and schedule, and feeds the same data. */
#ifndef TERN_CHECKPOINT_H
#define TERN_CHECKPOINT_H

#include <stdbool.h>
#include <stdint.h>

#include "tern/model.h"
#include "tern/optim.h"
#include "tern/rng.h"

#ifdef __cplusplus
extern "C" {
#endif

#define TERN_CHECKPOINT_USER_INTS 8

/* The caller's training position, saved alongside the model and optimizer. */
typedef struct tern_checkpoint_info {
    uint64_t epoch;       /* e.g. completed epochs */
    uint64_t global_step; /* e.g. optimizer steps taken over the whole run */
    tern_rng data_rng;    /* e.g. the loader's shuffling generator */
    int64_t user[TERN_CHECKPOINT_USER_INTS]; /* anything else (loader seed, batch in epoch...) */
} tern_checkpoint_info;

/* Write model (with its random generator), optimizer (NULL: none) and info (NULL: zeros) to
 * path atomically (a temporary file renamed over path: a failure leaves any previous file as
 * it was). opt must belong to model. Errors: TERN_ERR_INVALID (NULL model or path, opt of
 * another model), TERN_ERR_NOMEM, TERN_ERR_IO; detail in err. */
tern_status tern_checkpoint_save(tern_model *model, tern_optimizer *opt,
                                 const tern_checkpoint_info *info, const char *path,
                                 tern_error *err);

/* Restore model (state_dict and random generator), optimizer (NULL: not restored) and info
 * (NULL: not returned) from path. Everything is validated first; on failure nothing changes.
 * The optimizer takes the checkpoint's hyper-parameters (lr included), state blocks and step
 * counter, as torch's Optimizer.load_state_dict does; its kind must match and its state blocks
 * must be the same (SGD with and without momentum differ, Adam with and without amsgrad...).
 * Errors (detail in err, naming the file and the item):
 *   TERN_ERR_IO, TERN_ERR_FORMAT (not a readable Tern checkpoint, malformed metadata),
 *   TERN_ERR_NOT_FOUND (a tensor missing; an optimizer requested from a checkpoint without
 *   one), TERN_ERR_SHAPE (a tensor of another shape or dtype: another architecture),
 *   TERN_ERR_INVALID (NULL model or path, opt of another model, optimizer kind or state layout
 *   differs from the checkpoint's), TERN_ERR_NOMEM. */
tern_status tern_checkpoint_load(tern_model *model, tern_optimizer *opt,
                                 tern_checkpoint_info *info, const char *path, tern_error *err);

/* Read what is needed to rebuild the objects before loading: the model options (arch,
 * width_mult, in_channels, num_classes, norm are set; other fields of *model_opt are left as
 * they are), the optimizer options (*has_optimizer false if the checkpoint has none) and the
 * info. Any out pointer may be NULL. alloc: for reading the file (NULL: the C library).
 * Errors as tern_checkpoint_load. */
tern_status tern_checkpoint_peek(const char *path, const tern_allocator *alloc,
                                 tern_model_options *model_opt, tern_optimizer_options *optim_opt,
                                 bool *has_optimizer, tern_checkpoint_info *info,
                                 tern_error *err);

#ifdef __cplusplus
}
#endif

#endif
