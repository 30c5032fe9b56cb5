/* MobileNetV3 (Small and Large) as torchvision 0.14 builds it: training and inference.
 *
 * A tern_model owns:
 *   - one flat block of parameters and one of gradients, in the order of torchvision's
 *     model.parameters(), with a table of named views (tern_model_tensor) that follows
 *     model.state_dict(): same names, shapes (OIHW for convolutions) and order, including
 *     BatchNorm buffers (running_mean, running_var, num_batches_tracked);
 *   - a thread pool of the requested size and a seeded random generator (initialisation,
 *     dropout), so two models in one process never share state;
 *   - after tern_model_plan(), all activation memory for a batch shape: forward and backward
 *     never allocate.
 * Activations are NHWC float32. Not thread-safe: one caller at a time per model. */
#ifndef TERN_MODEL_H
#define TERN_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tern/alloc.h"
#include "tern/rng.h"
#include "tern/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum tern_arch {
    TERN_ARCH_MOBILENET_V3_SMALL,
    TERN_ARCH_MOBILENET_V3_LARGE,
} tern_arch;

typedef enum tern_norm {
    TERN_NORM_BATCH, /* BatchNorm2d(eps 0.001, momentum 0.01), torchvision's choice */
    TERN_NORM_GROUP, /* GroupNorm(gcd(32, C) groups, eps 1e-5), for DP-SGD */
} tern_norm;

/* Instruction-set level for Tern's kernels. AUTO picks the best the CPU has; a lower level may
 * be forced (to test the scalar path, say); a higher one than the CPU has falls back to AUTO. */
typedef enum tern_isa {
    TERN_ISA_AUTO = 0,
    TERN_ISA_SCALAR,
    TERN_ISA_AVX2,   /* AVX2 + FMA */
    TERN_ISA_AVX512, /* AVX-512 F, BW, DQ, VL */
} tern_isa;

/* "auto", "scalar", "avx2", "avx512"; static storage. */
const char *tern_isa_name(tern_isa isa);
/* The level kernels will run at for a request on this CPU (never AUTO). */
tern_isa tern_isa_resolve(tern_isa requested);

typedef struct tern_model_options {
    tern_arch arch;
    double width_mult; /* channel multiplier, > 0; 1.0 is the published network */
    int in_channels;  /* >= 1 */
    int num_classes;  /* >= 1 */
    float dropout;    /* classifier dropout probability in training, [0, 1) */
    float bn_momentum; /* BatchNorm running-statistics momentum, (0, 1]; torchvision's 0.01.
                        * Short local training (federated rounds) needs more, e.g. 0.1. */
    tern_norm norm;
    uint64_t seed;    /* initialisation and dropout masks */
    int threads;      /* compute threads, >= 1 */
    tern_isa isa;     /* kernel instruction set; TERN_ISA_AUTO (0) by default */
    const tern_allocator *alloc; /* NULL: the C library; borrowed, must outlive the model */
} tern_model_options;

/* torchvision's defaults for arch: width 1.0, 3 channels, 1000 classes, dropout 0.2,
 * BatchNorm with momentum 0.01, seed 0, 1 thread. */
tern_model_options tern_model_options_default(tern_arch arch);

/* "mobilenet_v3_small" / "mobilenet_v3_large"; static storage. */
const char *tern_arch_name(tern_arch arch);
/* Inverse of tern_arch_name; TERN_ERR_INVALID for anything else. */
tern_status tern_arch_parse(const char *name, tern_arch *out);

typedef struct tern_model tern_model;

/* Build the network and initialise it as torchvision does (Kaiming-normal fan-out convolutions,
 * N(0, 0.01) linear weights, zero biases, unit norm weights), from opt->seed.
 * Errors: TERN_ERR_INVALID (options out of range, detail in err), TERN_ERR_NOMEM,
 * TERN_ERR_THREAD. *out is untouched on failure. */
tern_status tern_model_create(const tern_model_options *opt, tern_model **out, tern_error *err);
/* Free the model and everything it owns; *model becomes NULL. Accepts NULL. */
void tern_model_destroy(tern_model **model);

/* The options the model was created with (borrowed, valid for the model's life). */
const tern_model_options *tern_model_options_of(const tern_model *model);
/* Detail of the model's last failed call ("" if none). Borrowed until the next call. */
const char *tern_model_last_error(const tern_model *model);

/* ---- parameters and state ---------------------------------------------------------------- */

typedef enum tern_tensor_kind {
    TERN_TENSOR_PARAM,   /* trainable float: data in the parameter block, grad in the gradients */
    TERN_TENSOR_BUFFER,  /* float state (BatchNorm running statistics) */
    TERN_TENSOR_COUNTER, /* int64 scalar (BatchNorm num_batches_tracked) */
} tern_tensor_kind;

/* One state_dict entry. Pointers are borrowed and valid for the model's life; after writing
 * through `data` or `counter`, call tern_model_invalidate(). */
typedef struct tern_model_tensor {
    const char *name; /* e.g. "features.3.block.1.0.weight" */
    tern_tensor_kind kind;
    int ndim;         /* 0 for counters */
    int64_t shape[4];
    size_t count;     /* number of elements (1 for counters) */
    float *data;      /* PARAM and BUFFER */
    float *grad;      /* PARAM only, else NULL */
    int64_t *counter; /* COUNTER only, else NULL */
} tern_model_tensor;

size_t tern_model_tensor_count(const tern_model *model);
/* i-th entry in state_dict order, or NULL if i is out of range. */
const tern_model_tensor *tern_model_tensor_at(const tern_model *model, size_t i);
/* Entry by name, or NULL. */
const tern_model_tensor *tern_model_find_tensor(const tern_model *model, const char *name);

/* The flat parameter and gradient blocks (tern_model_param_count floats each), in the order
 * of torchvision's model.parameters(). Borrowed, valid for the model's life. */
size_t tern_model_param_count(const tern_model *model);
float *tern_model_params(tern_model *model);
float *tern_model_grads(tern_model *model);
/* Tell the model that parameters or buffers were written through a pointer obtained earlier
 * (tern_model_params() itself, and Tern's own loaders and optimizers, do this already).
 * Inference folds BatchNorm into the convolutions and refolds after this. */
void tern_model_invalidate(tern_model *model);
/* The model's random generator (dropout masks; initialisation already drew from it). Borrowed;
 * saving and restoring the struct resumes the stream exactly (checkpoints). */
tern_rng *tern_model_rng(tern_model *model);
/* Set every gradient to zero. */
void tern_model_zero_grad(tern_model *model);

/* ---- compute -------------------------------------------------------------------------------- */

/* Plan memory for batches of up to max_batch images of height x width (each >= 32); with
 * training, also the memory backward needs. Replaces any earlier plan. Errors:
 * TERN_ERR_INVALID, TERN_ERR_NOMEM (the model keeps no plan then). */
tern_status tern_model_plan(tern_model *model, int max_batch, int height, int width,
                            bool training);
/* Bytes of activation memory the current plan holds (0 without a plan). */
size_t tern_model_plan_bytes(const tern_model *model);

/* Forward pass on batch images (1 <= batch <= planned max).
 *   input  (batch, H, W, in_channels) NHWC float32, borrowed for the call only
 *   logits (batch, num_classes), written
 * training: BatchNorm uses batch statistics and updates its running statistics and counter,
 * dropout is applied; it needs a training plan, and enables tern_model_backward.
 * Errors: TERN_ERR_STATE (no plan / no training plan), TERN_ERR_INVALID (batch out of range,
 * or a training batch that leaves BatchNorm a single value per channel, as PyTorch refuses). */
tern_status tern_model_forward(tern_model *model, float *logits, const float *input, int batch,
                               bool training);
/* Backward pass of the last training forward: ACCUMULATES into the gradients.
 *   dlogits (batch, num_classes): gradient of the loss with respect to the logits.
 * Errors: TERN_ERR_STATE if the last forward was not a training forward. */
tern_status tern_model_backward(tern_model *model, const float *dlogits);

/* ---- profiling ------------------------------------------------------------------------------ */

/* Time spent per op of the network. In folded inference a convolution's time includes its
 * BatchNorm and activation (which then show 0). */
typedef struct tern_op_profile {
    const char *kind;      /* "conv1x1", "depthwise", "conv", "batchnorm", "activation", ... */
    const char *name;      /* the layer's weight tensor, e.g. "features.1.block.0.0.weight", or "" */
    int out_shape[3];      /* output H, W, C for the planned input size */
    double flops_per_image; /* multiply-adds x 2 of the forward pass, convolutions and linear only */
    double forward_s, backward_s;
    unsigned long forward_calls, backward_calls;
} tern_op_profile;

/* Start (or stop) timing every op; resets the totals. Timing costs two clock reads per op. */
void tern_model_profile_enable(tern_model *model, bool enable);
size_t tern_model_profile_count(const tern_model *model);
/* Totals of op i (in execution order) since profiling was enabled; borrowed strings valid for
 * the model's life. TERN_ERR_INVALID if i is out of range. */
tern_status tern_model_profile_at(const tern_model *model, size_t i, tern_op_profile *out);

/* ---- loss ----------------------------------------------------------------------------------- */

/* Softmax cross-entropy averaged over the batch, with label smoothing in [0, 1] as PyTorch
 * defines it. dlogits (may be NULL) is overwritten with dLoss/dlogits. TERN_ERR_INVALID if a
 * label is outside [0, k). */
tern_status tern_cross_entropy_loss(float *loss, float *dlogits, const float *logits,
                                    const int32_t *labels, int n, int k, float smoothing);

/* Knowledge-distillation loss (Hinton et al. 2015) of a student against a teacher:
 *   loss = weight * T^2 * mean_i KL(softmax(teacher_i / T) || softmax(student_i[:k] / T))
 * i.e. PyTorch's weight * T^2 * kl_div(log_softmax(s / T), softmax(t / T), "batchmean").
 *   student_logits (n, student_stride): only the first k columns take part (a grown model's
 *                  old classes); student_stride >= k
 *   teacher_logits (n, k)
 *   dlogits        (n, student_stride) or NULL: dLoss/dstudent is ADDED to the first k columns
 *                  (weight * T / n * (q - p)), so it can follow tern_cross_entropy_loss on the
 *                  same buffer; the other columns are not touched
 * *loss receives the value above (weight included). TERN_ERR_INVALID for NULL inputs, n or
 * k < 1, student_stride < k, a temperature that is not finite and > 0, a weight that is not
 * finite and >= 0. */
tern_status tern_distillation_loss(float *loss, float *dlogits, const float *student_logits,
                                   int student_stride, const float *teacher_logits, int n, int k,
                                   float temperature, float weight);

#ifdef __cplusplus
}
#endif

#endif
