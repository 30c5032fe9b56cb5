/* INT8 post-training quantization of MobileNetV3, with TFLite's int8 scheme as the reference
 * semantics.
 *
 * The scheme:
 *   - weights: per output channel, symmetric int8 in [-127, 127] (zero point 0), after
 *     BatchNorm is folded into the convolution; scale = max|w| / 127;
 *   - activations: per tensor, asymmetric int8 in [-128, 127]: real = scale * (q - zero_point),
 *     with the range widened to contain 0 and "nudged" so that 0 is exactly representable;
 *   - biases: int32, round(b / (input_scale * weight_scale[c]));
 *   - requantization of convolutions and fully connected layers (M = input_scale *
 *     weight_scale / output_scale per output channel), in one of two modes
 *     (tern_requant_mode), both clamping to the output range (the smaller one a fused ReLU
 *     leaves) and adding the output zero point:
 *       float (the default): the int32 accumulator converted to float, multiplied by M as a
 *         float, rounded to nearest even: the "fp32" requantization of XNNPACK, what TFLite
 *         itself runs int8 models with on CPUs (its default delegate). IEEE single precision
 *         makes it exact and the same on every instruction set;
 *       fixed: TFLite's reference kernels: M as a Q31 multiplier and a shift
 *         (tern_quant_multiplier), applied with MultiplyByQuantizedMultiplier
 *         (tern_quant_mbqm: a rounding doubling high multiply of 64-bit products, then a
 *         rounding shift), integers only;
 *     the two differ only in rounding at the last bit (docs/int8.md has the measurements);
 *   - hardswish and hardsigmoid: 256-entry lookup tables built from the real-valued functions
 *     and the input and output quantization parameters (both modes);
 *   - residual add and squeeze-and-excitation gate: in float mode the same single-precision
 *     arithmetic (the real-valued sum or product, scaled and rounded to nearest even; see
 *     nn/qkernels.h); in fixed mode TFLite's ADD (inputs shifted left by 20 bits, each scaled
 *     by its own multiplier, the sum by an output multiplier) and MUL (the product of the two
 *     offset inputs through one multiplier); global average pool: TFLite's AVERAGE_POOL_2D in
 *     both modes (output shares the input's parameters, sum divided with rounding: integers
 *     already).
 *
 * A tern_qmodel is built from a float tern_model and calibration images: the float network is
 * run with BatchNorm folded, every activation tensor's range is observed (min/max), parameters
 * are chosen, weights quantized and packed for the CPU; inference then runs in integers from
 * the quantized input to the int32 accumulators of the classifier, which are dequantized to
 * float logits. */
#ifndef TERN_QUANT_H
#define TERN_QUANT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tern/alloc.h"
#include "tern/model.h"
#include "tern/model_io.h"
#include "tern/safetensors.h"
#include "tern/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- the scheme ------------------------------------------------------------------------------ */

/* Affine int8 parameters: real = scale * (q - zero_point). */
typedef struct tern_qparams {
    float scale;        /* > 0 */
    int32_t zero_point; /* in [-128, 127] */
} tern_qparams;

/* gemmlowp's SaturatingRoundingDoublingHighMul: the high 32 bits of 2*a*b, rounded to nearest
 * with ties upward ((a*b + 2^30) >> 31); INT32_MIN * INT32_MIN saturates to INT32_MAX. */
int32_t tern_quant_srdhm(int32_t a, int32_t b);
/* gemmlowp's RoundingDivideByPOT: x / 2^exponent rounded to nearest, ties away from zero;
 * exponent in [0, 31]. */
int32_t tern_quant_rdivpot(int32_t x, int exponent);
/* TFLite's MultiplyByQuantizedMultiplier: x * multiplier * 2^(shift - 31), as
 * RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x << max(shift, 0), multiplier),
 * max(-shift, 0)). shift in [-31, 30]. Where TFLite's x * (1 << shift) would overflow int32 (an
 * undefined case there), the shifted value saturates. */
int32_t tern_quant_mbqm(int32_t x, int32_t multiplier, int shift);
/* TFLite's QuantizeMultiplier: real = multiplier * 2^(shift - 31) with multiplier in
 * [2^30, 2^31) (or 0 for real == 0, or when shift would fall below -31). TERN_ERR_INVALID for a
 * negative or non-finite real, or one too large for a shift <= 30. */
tern_status tern_quant_multiplier(double real, int32_t *multiplier, int *shift);
/* TFLite's ChooseQuantizationParams for int8: [min, max] is widened to contain 0, scale =
 * (max - min) / 255, and the zero point is rounded so that 0 is exact. A range narrower than
 * 1e-8 is widened to that (an all-zero tensor gets a tiny scale, not a zero one). min and max
 * must be finite with min <= max; otherwise the result is {1, 0}. */
tern_qparams tern_quant_choose_params(float min, float max);
/* round(x * (1 / scale)) + zero_point (ties away from zero, the reciprocal rounded to float
 * first, as XNNPACK's and TFLite's optimized kernels compute it), saturated to [-128, 127]. */
int8_t tern_quantize(float x, tern_qparams p);
float tern_dequantize(int8_t q, tern_qparams p);

/* Instruction-set level of the integer kernels, separate from tern_isa because int8 needs
 * different extensions: VNNI (vpdpbusd) and VBMI (byte permutes for lookup tables). AUTO picks
 * the best the CPU has; a higher level than the CPU has falls back to AUTO. */
typedef enum tern_qisa {
    TERN_QISA_AUTO = 0,
    TERN_QISA_SCALAR,
    TERN_QISA_AVX2,        /* AVX2: int16 multiply-adds (vpmaddwd), never saturating */
    TERN_QISA_AVX512_VNNI, /* AVX-512 F, BW, DQ, VL, VNNI, VBMI */
} tern_qisa;

/* How the integer kernels scale int32 sums to int8 outputs (see the top of this file). */
typedef enum tern_requant_mode {
    TERN_REQUANT_FLOAT = 0, /* single precision (XNNPACK's fp32 requantization) */
    TERN_REQUANT_FIXED,     /* TFLite's reference: Q31 multiplier and shift */
} tern_requant_mode;

/* "float", "fixed"; static storage, "?" for others. */
const char *tern_requant_mode_name(tern_requant_mode mode);
/* The inverse; TERN_ERR_INVALID for an unknown name. */
tern_status tern_requant_mode_parse(const char *name, tern_requant_mode *out);

/* "auto", "scalar", "avx2", "avx512vnni"; static storage. */
const char *tern_qisa_name(tern_qisa isa);
/* The level the integer kernels will run at for a request on this CPU (never AUTO). */
tern_qisa tern_qisa_resolve(tern_qisa requested);

/* ---- quantized model ------------------------------------------------------------------------ */

/* How a tensor's range is chosen from the calibration data. The histogram observers make a
 * second calibration pass: 2048 bins over the min/max range of each tensor. */
typedef enum tern_quant_observer {
    TERN_QUANT_OBSERVER_MINMAX,     /* the smallest and largest value seen over all batches */
    TERN_QUANT_OBSERVER_PERCENTILE, /* the values at percentile p and 100 - p (0 kept inside) */
    TERN_QUANT_OBSERVER_ENTROPY,    /* TensorRT's calibrator: the clipping threshold of the
                                     * larger side that minimizes the KL divergence between the
                                     * histogram and its quantized form (levels of that side);
                                     * thresholds clipping more than 1% of a side are not tried */
} tern_quant_observer;

/* "minmax", "percentile", "entropy"; static storage, "?" for others. */
const char *tern_quant_observer_name(tern_quant_observer observer);
/* The inverse; TERN_ERR_INVALID for an unknown name. */
tern_status tern_quant_observer_parse(const char *name, tern_quant_observer *out);

typedef struct tern_qmodel_options {
    int height, width;  /* input size of calibration and inference, >= 32 */
    int max_batch;      /* largest batch tern_qmodel_forward takes, >= 1 */
    int calib_batch;    /* images per calibration forward; 0: 32 */
    tern_quant_observer observer;
    double percentile;  /* PERCENTILE: p in (50, 100]; 0: 99.99 */
    int threads;        /* threads of the calibration (float) passes; 0: 1. The int8 forward
                         * runs on the calling thread. */
    tern_qisa isa;      /* TERN_QISA_AUTO (0) by default */
    /* Mixed precision: the fp32_layers layers (convolutions, fully connected) whose
     * quantization alone moves the logits most (sensitivity below) stay in float, with their
     * inputs dequantized and their outputs quantized at the boundaries. 0: none. */
    int fp32_layers;
    /* Measure each layer's sensitivity (implied by fp32_layers > 0): the network in float with
     * only that layer quantized, on up to 256 of the calibration images; the mean squared
     * difference of its logits from the float network's, relative to the float logits' mean
     * square, and the top-1 agreement. Read with tern_qmodel_op_info. */
    bool sensitivity;
    const tern_allocator *alloc; /* NULL: the C library; borrowed, must outlive the qmodel */
    tern_requant_mode requant;   /* TERN_REQUANT_FLOAT (0) by default; saved in the file */
} tern_qmodel_options;

typedef struct tern_qmodel tern_qmodel;

/* Quantize a float model (read only, not modified; BatchNorm models only).
 *   calib (ncalib, height, width, in_channels) NHWC float32: calibration images, normalized as
 *         for inference; borrowed for the call only. ncalib >= 1.
 * The qmodel keeps no reference to the model or to calib.
 * Errors (detail in err): TERN_ERR_INVALID (options out of range, NULL arguments),
 * TERN_ERR_UNSUPPORTED (GroupNorm model, or a graph the builder does not know),
 * TERN_ERR_NOMEM, TERN_ERR_THREAD. *out is untouched on failure. */
tern_status tern_qmodel_create(const tern_model *model, const float *calib, int ncalib,
                               const tern_qmodel_options *opt, tern_qmodel **out,
                               tern_error *err);
/* Free the qmodel; *qmodel becomes NULL. Accepts NULL. */
void tern_qmodel_destroy(tern_qmodel **qmodel);

/* Integer inference on batch images (1 <= batch <= max_batch).
 *   input  (batch, height, width, in_channels) NHWC float32, quantized with the input's
 *          parameters; borrowed for the call only
 *   logits (batch, num_classes) float32, written
 * Errors: TERN_ERR_INVALID (NULL pointers, batch out of range). Not thread-safe: one caller at
 * a time per qmodel (activations live in the qmodel). */
tern_status tern_qmodel_forward(tern_qmodel *qmodel, float *logits, const float *input,
                                int batch);
/* tern_qmodel_forward, timing each step: op_seconds (1 + op count) gets the wall-clock
 * seconds of the input's quantization added to [0] and of op i to [1 + i] (accumulated, so
 * repeated calls sum); when the stem quantizes the input itself, [0] stays 0 and [1] has both.
 * A model with float layers is timed as a whole, in [0]. Same errors as tern_qmodel_forward. */
tern_status tern_qmodel_forward_profile(tern_qmodel *qmodel, float *logits, const float *input,
                                        int batch, double *op_seconds);
/* Detail of the qmodel's last failed call ("" if none). Borrowed until the next call. */
const char *tern_qmodel_last_error(const tern_qmodel *qmodel);
/* The level its integer kernels run at (resolved, never AUTO). */
tern_qisa tern_qmodel_isa(const tern_qmodel *qmodel);
/* Its requantization mode (as created, or as its file says). */
tern_requant_mode tern_qmodel_requant(const tern_qmodel *qmodel);
/* Parameters chosen for the input tensor. */
tern_qparams tern_qmodel_input_params(const tern_qmodel *qmodel);
/* Number of integer ops (convolutions, fully connected, pool, gate, add) in execution order. */
size_t tern_qmodel_op_count(const tern_qmodel *qmodel);
/* Op i: its kind ("conv1x1", "depthwise", "conv", "linear", "logits", "avgpool", "se_gate",
 * "add"), layer name (the float weight's name, or "") and output parameters. Strings are
 * static or owned by the qmodel. TERN_ERR_INVALID if i is out of range. */
tern_status tern_qmodel_op_at(const tern_qmodel *qmodel, size_t i, const char **kind,
                              const char **name, tern_qparams *out);

/* Shape of op i, for profiles and reports. */
typedef struct tern_qop_info {
    const char *kind, *name;  /* as tern_qmodel_op_at */
    int in_h, in_w, in_c;     /* first input */
    int out_h, out_w, out_c;  /* output */
    int k, stride;            /* convolutions; 0 otherwise */
    tern_qparams out;
    bool fp32;                /* runs in float (mixed precision) */
    bool has_weights;         /* a convolution or fully connected layer */
    double sensitivity;       /* relative logit MSE with only this layer quantized; -1 if not
                               * measured */
    double agreement;         /* top-1 agreement with float then; -1 if not measured */
} tern_qop_info;
/* TERN_ERR_INVALID if i is out of range. */
tern_status tern_qmodel_op_info(const tern_qmodel *qmodel, size_t i, tern_qop_info *info);

/* ---- files ------------------------------------------------------------------------------------ */

/* Save as safetensors (format "tern-int8": int8 weights, int32 biases, scales and zero points,
 * the graph and the requantization mode ("requant": "float" or "fixed") in the metadata;
 * layers kept in float as F32; see nn/qmodel_io.c), atomically.
 * info (may be NULL): the evaluation pipeline and class names to record, as
 * tern_model_save_file. Errors: TERN_ERR_INVALID, TERN_ERR_NOMEM, TERN_ERR_IO (detail in err). */
tern_status tern_qmodel_save_file(const tern_qmodel *qmodel, const tern_model_info *info,
                                  const char *path, tern_error *err);
/* true if st's metadata says it is a quantized model ("format": "tern-int8"). */
bool tern_qmodel_file_is_quantized(const tern_safetensors *st);

typedef struct tern_qmodel_load_options {
    int max_batch;      /* largest batch for tern_qmodel_forward; 0: 1 */
    tern_qisa isa;      /* TERN_QISA_AUTO (0) by default */
    const tern_allocator *alloc; /* NULL: the C library; borrowed, must outlive the qmodel */
} tern_qmodel_load_options;

/* Rebuild a quantized model from an open file (no float model needed), in the file's
 * requantization mode (float when the metadata has no "requant", as files written before the
 * key existed). opt may be NULL. The qmodel keeps no reference to st. Errors: TERN_ERR_FORMAT (not a quantized model, or anything
 * malformed: detail in err), TERN_ERR_INVALID, TERN_ERR_NOMEM. *out untouched on failure. */
tern_status tern_qmodel_load(const tern_safetensors *st, const tern_qmodel_load_options *opt,
                             tern_qmodel **out, tern_error *err);
/* The same from a path (adds TERN_ERR_IO). */
tern_status tern_qmodel_load_file(const char *path, const tern_qmodel_load_options *opt,
                                  tern_qmodel **out, tern_error *err);
/* Input size, input channels and classes (each pointer may be NULL). */
void tern_qmodel_shape(const tern_qmodel *qmodel, int *height, int *width, int *in_channels,
                       int *num_classes);

/* ---- inference on either kind of model file --------------------------------------------------- */

/* A classifier opened from a model file, float ("tern") or quantized ("tern-int8"), run the
 * same way: what C API users who do not care which kind they were given call. */
typedef struct tern_predictor tern_predictor;

typedef struct tern_predictor_options {
    int max_batch;      /* largest batch for tern_predictor_forward; 0: 1 */
    int size;           /* float models: input size; 0: the file's input_size, else 224.
                         * Quantized models run at the size they were quantized for. */
    const tern_allocator *alloc; /* NULL: the C library; borrowed, must outlive the predictor */
} tern_predictor_options;

/* Open path. opt may be NULL. Errors: TERN_ERR_IO, TERN_ERR_FORMAT, TERN_ERR_INVALID (a size
 * a quantized model was not made for, options out of range), TERN_ERR_NOMEM; detail in err.
 * *out untouched on failure. */
tern_status tern_predictor_open(const char *path, const tern_predictor_options *opt,
                                tern_predictor **out, tern_error *err);
/* Close; *p becomes NULL. Accepts NULL. */
void tern_predictor_close(tern_predictor **p);
/* logits (batch, num_classes) of input (batch, size, size, in_channels) NHWC float32,
 * normalized as the file's metadata says. TERN_ERR_INVALID for NULL pointers or a batch
 * outside [1, max_batch]. Not thread-safe. */
tern_status tern_predictor_forward(tern_predictor *p, float *logits, const float *input,
                                   int batch);
/* The file's evaluation pipeline and class names (input_size is the size the predictor runs
 * at); borrowed, valid until close. */
const tern_model_info *tern_predictor_info(const tern_predictor *p);
int tern_predictor_num_classes(const tern_predictor *p);
int tern_predictor_in_channels(const tern_predictor *p);
/* true for a quantized file. */
bool tern_predictor_is_quantized(const tern_predictor *p);

#ifdef __cplusplus
}
#endif

#endif
