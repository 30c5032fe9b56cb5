/* Magnitude pruning of a MobileNetV3's convolution and linear weights, masks that keep pruned
 * weights at exactly zero through fine-tuning, and compressed storage of pruned models.
 *
 * Pruning sets the smallest-magnitude weights of the prunable layers to +0.0:
 *   - TERN_PRUNE_GLOBAL: one threshold over all prunable weights (layers end up with different
 *     sparsities, the total is the target);
 *   - TERN_PRUNE_LAYER: each prunable layer pruned to the target sparsity on its own.
 * Exactly round(sparsity * n) weights are pruned (per layer, or over the n prunable weights);
 * ties at the threshold are broken by position (state_dict order, then index), and weights a
 * previous call already pruned always come first, so raising the sparsity step by step (gradual
 * pruning) never revives a weight.
 *
 * Prunable by default: every convolution and linear weight except
 *   - the stem convolution (features.0.0.weight: few weights, every pixel goes through it),
 *   - depthwise convolutions (k*k weights per channel; each one is a whole filter's input),
 *   - the last linear layer (the logits of the classes);
 * tern_prune_options turns each back on. BatchNorm/GroupNorm parameters and all biases are
 * never pruned.
 *
 * Fine-tuning: call tern_pruner_mask_grads after backward and tern_pruner_apply after each
 * optimizer step; the masked weights are then exactly +0.0 whatever the optimizer (momentum,
 * Adam's state and weight decay never see a gradient there, and apply rewrites them). */
#ifndef TERN_PRUNE_H
#define TERN_PRUNE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tern/model.h"
#include "tern/model_io.h"
#include "tern/safetensors.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum tern_prune_scope {
    TERN_PRUNE_GLOBAL,
    TERN_PRUNE_LAYER,
} tern_prune_scope;

/* "global" / "layer"; static storage ("?" outside the enum). */
const char *tern_prune_scope_name(tern_prune_scope scope);
/* Inverse of tern_prune_scope_name; TERN_ERR_INVALID for anything else. */
tern_status tern_prune_scope_parse(const char *name, tern_prune_scope *out);

typedef struct tern_prune_options {
    tern_prune_scope scope;
    bool include_stem;       /* also prune features.0.0.weight */
    bool include_depthwise;  /* also prune depthwise convolutions */
    bool include_classifier; /* also prune the last linear layer */
} tern_prune_options;

typedef struct tern_pruner tern_pruner;

/* A pruner for model's prunable weights (chosen by opt; NULL: the defaults above), with every
 * mask open (nothing pruned yet). The model is borrowed and must outlive the pruner.
 * Errors: TERN_ERR_INVALID (NULL model, scope outside the enum), TERN_ERR_NOMEM,
 * TERN_ERR_NOT_FOUND (a model with no prunable weight). *out is untouched on failure. */
tern_status tern_pruner_create(tern_model *model, const tern_prune_options *opt,
                               tern_pruner **out, tern_error *err);
/* Free the pruner (the model keeps its weights); *p becomes NULL. Accepts NULL. */
void tern_pruner_destroy(tern_pruner **p);

/* Mask the smallest-magnitude weights to reach `sparsity` in [0, 1] (fraction of the prunable
 * weights set to zero, per the scope), keeping every weight masked before, and zero them in
 * the model (tern_pruner_apply). TERN_ERR_INVALID for a sparsity outside [0, 1] or NaN,
 * TERN_ERR_NOMEM (nothing changed then). */
tern_status tern_pruner_prune(tern_pruner *p, double sparsity);
/* Mask every prunable weight that is exactly zero now (a pruned model loaded from a file), so
 * fine-tuning keeps it at zero. Returns the number of weights masked in total. */
size_t tern_pruner_mask_zeros(tern_pruner *p);
/* Set the gradients of masked weights to zero (after backward, before the optimizer step). */
void tern_pruner_mask_grads(tern_pruner *p);
/* Write +0.0 to every masked weight and tell the model (after each optimizer step). */
void tern_pruner_apply(tern_pruner *p);

/* One prunable layer. */
typedef struct tern_prune_layer {
    const char *name;  /* weight tensor, borrowed for the model's life */
    const char *kind;  /* "conv", "conv1x1", "depthwise" or "linear"; static storage */
    size_t count;      /* weights */
    size_t masked;     /* weights the pruner holds at zero */
    size_t zeros;      /* weights that are exactly zero now (>= masked after apply) */
    float threshold;   /* largest |w| pruned by the last tern_pruner_prune (0 if none) */
} tern_prune_layer;

size_t tern_pruner_layer_count(const tern_pruner *p);
/* Layer i in state_dict order, its zeros counted now. TERN_ERR_INVALID if i is out of range. */
tern_status tern_pruner_layer_at(const tern_pruner *p, size_t i, tern_prune_layer *out);
/* Totals: prunable weights and how many of them are masked and zero; every parameter of the
 * model and how many of those are exactly zero. Any pointer may be NULL. */
void tern_pruner_totals(const tern_pruner *p, size_t *prunable, size_t *masked, size_t *zeros,
                        size_t *params, size_t *param_zeros);

/* Zhu & Gupta (2017)'s gradual schedule: the sparsity at `step` for a ramp from `initial` at
 * `begin` to `final` at `end` (begin < end), s = final + (initial - final)(1 - t)^3 with
 * t = (step - begin) / (end - begin) clamped to [0, 1]. */
double tern_prune_polynomial(double initial, double final, long step, long begin, long end);

/* ---- compressed storage ------------------------------------------------------------------
 * A pruned model file is a Tern model file (same metadata, "compression" = "tern-sparse-v1")
 * in which each float tensor that encodes smaller is stored as a U8 tensor of the same name
 * holding:
 *   header (little-endian): "TSPR", version 1, encoding (0 raw, 1 deflate), ndim, 0,
 *            shape (ndim x int64), nnz (uint64), payload bytes (uint64), CRC-32 of the payload
 *   payload: a bitmap of ceil(count / 8) bytes (bit i & 7 of byte i / 8 set when element i is
 *            not +0.0), then the nnz non-zero values as float32 split into 4 byte planes
 *            (all low bytes first), which deflate compresses better (sign and exponent bytes
 *            repeat); encoding 1 stores the payload deflated (zlib).
 * The other tensors are stored as in any model file. tern_model_load_state (and so
 * tern_model_load_file, tern_predictor_open, tern eval/predict/quantize) decodes such files
 * transparently and bit for bit. */

#define TERN_SPARSE_COMPRESSION "tern-sparse-v1"

/* Save the model like tern_model_save_file, compressed as above (each tensor stored the
 * smaller of dense, raw bitmap and deflated bitmap). Atomic like tern_safetensors_writer_write.
 * Errors: TERN_ERR_INVALID, TERN_ERR_NOMEM, TERN_ERR_IO (detail in err). */
tern_status tern_prune_save_file(const tern_model *model, const tern_model_info *info,
                                 const char *path, tern_error *err);
/* True if st is a compressed model file (metadata "compression" = TERN_SPARSE_COMPRESSION). */
bool tern_sparse_file_is_compressed(const tern_safetensors *st);
/* Decode one compressed tensor v into out, which must hold count floats for the expected
 * shape (ndim, shape). Errors (detail naming the tensor): TERN_ERR_SHAPE (shape differs),
 * TERN_ERR_FORMAT (bad header, truncated or corrupt payload, checksum mismatch),
 * TERN_ERR_NOMEM. out may be partly written on failure. */
tern_status tern_sparse_decode(const tern_tensor_view *v, int ndim, const int64_t *shape,
                               float *out, tern_error *err);
/* Encode count floats (shape ndim, shape) into a new buffer (malloc'd, the caller frees) with
 * the smaller of the two encodings; *len receives its size. TERN_ERR_INVALID, TERN_ERR_NOMEM. */
tern_status tern_sparse_encode(const float *x, int ndim, const int64_t *shape, uint8_t **out,
                               size_t *len);

#ifdef __cplusplus
}
#endif

#endif
