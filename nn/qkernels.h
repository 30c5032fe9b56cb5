/* Integer kernels of the INT8 model (TFLite's int8 semantics; see tern/quant.h), NHWC.
 *
 * Each kernel is a stateless function over small parameter structs, in the style of CMSIS-NN:
 * outputs first, then inputs, then dimensions and quantization parameters, then the ISA level.
 * Each has a plain scalar reference (suffix _ref) written as directly from the definition as
 * possible; the dispatching versions must give the same bits at every tern_qisa level (the tests
 * check that on random shapes).
 *
 * Activations are int8 with an asymmetric per-tensor zero point; weights int8 symmetric (zero
 * point 0) per output channel; accumulators int32 (sums must fit int32: K * 255 * 127 < 2^31,
 * i.e. K below 66,000, far above any MobileNetV3 layer).
 *
 * Internal header: not installed. */
#ifndef TERN_QKERNELS_H
#define TERN_QKERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels.h"
#include "tern/quant.h"

/* Requantization of an int32 accumulator of output channel c to int8, in one of two modes.
 *   TERN_REQUANT_FLOAT, in single precision (the "fp32" requantization of XNNPACK, TFLite's
 *   default CPU path for int8 models):
 *     q = clamp(round_even((float)acc * scale[c]), qmin - out_zp, qmax - out_zp) + out_zp
 *   with IEEE single-precision conversion and product, both rounded to nearest even, so that
 *   scalar and vector code give the same bits.
 *   TERN_REQUANT_FIXED, TFLite's reference kernels (MultiplyByQuantizedMultiplier, two
 *   roundings):
 *     q = clamp(tern_quant_mbqm(acc, multiplier[c], shift[c]) + out_zp, qmin, qmax)
 *   with multiplier and shift from tern_quant_multiplier (multiplier in [2^30, 2^31), or 0 with
 *   shift 0). The vector code relies on that range: a multiplier >= 2^30 with a left shift
 *   makes any accumulator whose shift would saturate land beyond the clamp anyway, so the
 *   vectors clamp the accumulator before shifting instead of saturating after.
 * Then, with a lookup table, q = lut[(uint8_t)q] (an activation between two parameter sets).
 * A fused ReLU is qmin = out_zp. A zero-initialized struct is float mode. */
typedef struct tern_requant {
    tern_requant_mode mode;
    const float *scale;         /* FLOAT: (C) input scale * weight scale / output scale, finite,
                                 * > 0 */
    const int32_t *multiplier;  /* FIXED: (C) the same scale as Q31 multipliers ... */
    const int32_t *shift;       /* ... and shifts (int32 so that vectors load them), [-31, 30] */
    int32_t out_zp;
    int32_t qmin, qmax;   /* -128 <= qmin <= qmax <= 127 */
    const int8_t *lut;    /* 256 entries indexed by (uint8_t)q, or NULL */
} tern_requant;

/* Round to nearest, ties to even, for |x| < 2^22: adding and subtracting 1.5 * 2^23 leaves the
 * float's integer part, rounded by the FPU's default mode (what vcvtps2dq does). */
static inline float tern_round_even(float x)
{
    const float big = 12582912.0f; /* IEEE arithmetic: without -ffast-math nothing folds this */
    return (x + big) - big;
}

/* clamp(v + zp, lo, hi) without overflow (v may be any int32). */
static inline int32_t tern_clamp_zp(int32_t v, int32_t zp, int32_t lo, int32_t hi)
{
    int64_t q = (int64_t)v + zp;
    return (int32_t)(q < lo ? lo : q > hi ? hi : q);
}

static inline int8_t tern_requant_one(int32_t acc, const tern_requant *rq, size_t c)
{
    int32_t q;
    if (rq->mode == TERN_REQUANT_FIXED) {
        q = tern_clamp_zp(tern_quant_mbqm(acc, rq->multiplier[c], rq->shift[c]), rq->out_zp,
                          rq->qmin, rq->qmax);
    } else {
        float r = (float)acc * rq->scale[c];
        const float lo = (float)(rq->qmin - rq->out_zp), hi = (float)(rq->qmax - rq->out_zp);
        r = r < lo ? lo : r > hi ? hi : r; /* integer bounds: clamping first rounds the same */
        q = (int32_t)tern_round_even(r) + rq->out_zp;
    }
    return rq->lut ? rq->lut[(uint8_t)q] : (int8_t)q;
}

/* true if rq is in fixed mode and one of channels [0, C) shifts left (a multiplier of 1 or
 * more): the vector kernels take a shorter path when none does. */
static inline bool tern_requant_left(const tern_requant *rq, size_t C)
{
    for (size_t c = 0; rq && rq->mode == TERN_REQUANT_FIXED && c < C; c++)
        if (rq->shift[c] > 0)
            return true;
    return false;
}

/* multiplier[c], shift[c] for C real scales (tern_quant_multiplier of each). TERN_ERR_INVALID
 * if one is negative, not finite, or 2^30 or more. */
tern_status tern_requant_fixed_params(int32_t *multiplier, int32_t *shift, const double *real,
                                      size_t C);

/* lut[(uint8_t)q] = quantize(act(dequantize(q, in)), out), computed in double precision with
 * rounding half away from zero. */
void tern_quant_lut(int8_t lut[256], tern_act act, tern_qparams in, tern_qparams out);

/* ---- GEMM: pointwise convolutions, fully connected layers, the im2col'd stem ----------------- */

/* y (M, N, row stride ldy) = requant(bias[n] + sum_k (a[m, k] - a_zp) * w[n, k]);
 * or, when y32 is not NULL, y32 (M, N, ldy) = the int32 sums themselves (y and rq unused).
 *   a (M, K, row stride lda) int8, w (N, K) int8, bias (N) int32 or NULL */
void tern_qgemm_ref(int8_t *y, int32_t *y32, size_t ldy, const int8_t *a, size_t lda,
                    int32_t a_zp, const int8_t *w, const int32_t *bias, size_t M, size_t N,
                    size_t K, const tern_requant *rq);

/* Bytes of the packed form of (w, bias, a_zp) for isa. The packing folds the zero-point
 * correction into the bias: the kernels sum (a + 128) * w as unsigned x signed bytes (VNNI's
 * vpdpbusd), and bias' = bias - (a_zp + 128) * sum_k w[n, k] restores sum (a - a_zp) * w. */
size_t tern_qgemm_packed_size(size_t N, size_t K, tern_qisa isa);
/* packed: 64-byte aligned, tern_qgemm_packed_size(N, K, isa) bytes. bias may be NULL. */
void tern_qgemm_pack(void *packed, const int8_t *w, const int32_t *bias, int32_t a_zp, size_t N,
                     size_t K, tern_qisa isa);
/* Bytes of scratch tern_qgemm needs for N, K at isa (64-byte aligned). */
size_t tern_qgemm_workspace_size(size_t N, size_t K, tern_qisa isa);
/* tern_qgemm_ref's result from weights packed for isa (same N, K). */
void tern_qgemm(int8_t *y, int32_t *y32, size_t ldy, const int8_t *a, size_t lda,
                const void *packed, void *workspace, size_t M, size_t N, size_t K,
                const tern_requant *rq, tern_qisa isa);

/* im2col for a dense convolution (groups 1): col (N*OH*OW, k*k*cin, row stride ldc >= k*k*cin)
 * with taps in (ky, kx, ci) order; padding taps hold the input zero point (real 0). Weights
 * (Cout, Cin, k, k) must be permuted to (Cout, k, k, Cin) to match. */
void tern_qim2col(int8_t *col, size_t ldc, const int8_t *x, int32_t x_zp,
                  const tern_conv_params *p);

/* ---- direct dense convolution (the stem) ----------------------------------------------------- */

/* For a dense convolution whose kernel rows are short (k * cin <= 64 bytes: the stem's 3x3x3),
 * without im2col: the input is copied once into a padded unsigned image (x + 128, border x_zp +
 * 128) and each kernel row's k * cin bytes are read in place as groups of 4, the bytes past
 * the row's end meeting zero weights.
 *   supported: groups 1, k * cin <= 64. */
bool tern_qconv_direct_supported(const tern_conv_params *p);
/* Bytes of the packed form of (w (Cout, Cin, k, k), bias, x_zp) at isa (64-byte aligned). */
size_t tern_qconv_direct_packed_size(const tern_conv_params *p, tern_qisa isa);
void tern_qconv_direct_pack(void *packed, const int8_t *w, const int32_t *bias, int32_t x_zp,
                            const tern_conv_params *p, tern_qisa isa);
size_t tern_qconv_direct_workspace_size(const tern_conv_params *p, tern_qisa isa);
/* y (N, OH, OW, Cout) = requant(bias + sum (x - x_zp) * w), padding contributing 0. */
void tern_qconv_direct(int8_t *y, const int8_t *x, int32_t x_zp, const void *packed,
                       void *workspace, const tern_conv_params *p, const tern_requant *rq,
                       tern_qisa isa);

/* The same from the float input x (N, H, W, Cin), quantized with xp on the way into the padded
 * copy (no int8 image in between); bit-identical to tern_quantize_array into xq_scratch
 * (N*H*W*Cin bytes, used only at the levels without a fused path) then tern_qconv_direct. */
void tern_qconv_direct_f32(int8_t *y, int8_t *xq_scratch, const float *x, tern_qparams xp,
                           const void *packed, void *workspace, const tern_conv_params *p,
                           const tern_requant *rq, tern_qisa isa);

/* ---- depthwise convolution ------------------------------------------------------------------ */

/* Bytes of the packed form of (w, bias, x_zp) for isa: 64-byte aligned.
 *   scalar, AVX2: bias (C) int32, then taps (k*k, C) taps-major widened to int32 (a vector of
 *     channels of one tap is one load).
 *   AVX-512 VNNI: bias' (C rounded to 16) = bias - (x_zp + 128) * sum_taps w, then per block of
 *     16 channels, per kernel row, per group of 4 taps of the row: 16 x 4 bytes, channel-major
 *     (the layout vpdpbusd reads), taps past k zero. The kernel reads the input as unsigned
 *     x + 128 from a padded copy whose border holds x_zp, so every tap counts and the zero
 *     point's correction is the constant folded into bias'. */
size_t tern_qdwconv_packed_size(int channels, int k, tern_qisa isa);
void tern_qdwconv_pack(void *packed, const int8_t *w, const int32_t *bias, int32_t x_zp,
                       int channels, int k, tern_qisa isa);
/* Bytes of scratch tern_qdwconv needs for p at isa (64-byte aligned; 0 for some levels). */
size_t tern_qdwconv_workspace_size(const tern_conv_params *p, tern_qisa isa);
/* y (N, OH, OW, C) = requant(bias[c] + sum_taps (x - x_zp) * w), padding taps contributing 0.
 *   x (N, H, W, C), w (C, 1, k, k) int8, bias (C) or NULL. p: groups == cin == cout. */
void tern_qdwconv_ref(int8_t *y, const int8_t *x, int32_t x_zp, const int8_t *w,
                      const int32_t *bias, const tern_conv_params *p, const tern_requant *rq);
/* The same from tern_qdwconv_pack's weights (packed for the same isa and x_zp). */
void tern_qdwconv(int8_t *y, const int8_t *x, int32_t x_zp, const void *packed, void *workspace,
                  const tern_conv_params *p, const tern_requant *rq, tern_qisa isa);

/* ---- elementwise and reductions --------------------------------------------------------------- */

/* Residual add, parameters from tern_quant_add_params.
 * FLOAT, in single precision (as the convolutions' requantization; XNNPACK's fp32 ADD):
 *   r = fma(a, a_scale, fma(b, b_scale, bias))   (a, b the raw int8 values as floats)
 *   y = clamp(round_even(r), qmin - out_zp, qmax - out_zp) + out_zp
 * with a_scale = sa / so, b_scale = sb / so, bias = -(a_zp sa + b_zp sb) / so: the zero points
 * folded into one constant, two fused multiply-adds per element, exactly rounded on every
 * level (fmaf in the reference).
 * FIXED, TFLite's int8 ADD: with m = 2 max(sa, sb) and left_shift = 20,
 *   a' = mbqm((a - a_zp) << 20, a_mult, a_shift)   (a_mult, a_shift: sa / m, shift <= 0)
 *   b' = mbqm((b - b_zp) << 20, b_mult, b_shift)   (sb / m)
 *   y = clamp(mbqm(a' + b', out_mult, out_shift) + out_zp, qmin, qmax)   (m / (2^20 so))
 * where mbqm with a shift <= 0 is TFLite's MultiplyByQuantizedMultiplierSmallerThanOneExp. */
typedef struct tern_qadd_params {
    tern_requant_mode mode;
    float a_scale, b_scale, bias;                     /* FLOAT */
    int32_t a_zp, b_zp;                               /* FIXED */
    int32_t a_mult, a_shift, b_mult, b_shift, out_mult, out_shift;
    int32_t out_zp;
    int32_t qmin, qmax;
} tern_qadd_params;
#define TERN_QADD_LEFT_SHIFT 20
/* TERN_ERR_INVALID if a scale ratio is out of range (in fixed mode, also a multiplier of 1 or
 * more, which TFLite refuses as well). */
tern_status tern_quant_add_params(tern_qadd_params *add, tern_qparams a, tern_qparams b,
                                  tern_qparams out, tern_requant_mode mode);
void tern_qadd_ref(int8_t *y, const int8_t *a, const int8_t *b, size_t count,
                   const tern_qadd_params *p);
void tern_qadd(int8_t *y, const int8_t *a, const int8_t *b, size_t count, const tern_qadd_params *p,
               tern_qisa isa);

/* Squeeze-and-excitation gate, broadcast over H, W; parameters from tern_quant_gate_params.
 * FLOAT, in single precision:
 *   gf[n, c] = (float)(g[n, c] - g_zp) * scale           (scale = sx sg / so)
 *   y[n, i, c] = clamp(round_even((float)(x - x_zp) * gf[n, c]), -128 - out_zp, 127 - out_zp)
 *                + out_zp
 * FIXED, TFLite's int8 MUL: (mult, shift) = tern_quant_multiplier(sx sg / so),
 *   y[n, i, c] = clamp(mbqm((x - x_zp) * (g[n, c] - g_zp), mult, shift) + out_zp, -128, 127)
 *   x (N, HW, C), g (N, C) */
typedef struct tern_qgate_params {
    tern_requant_mode mode;
    int32_t x_zp, g_zp, out_zp;
    float scale;           /* FLOAT */
    int32_t mult, shift;   /* FIXED */
} tern_qgate_params;
/* TERN_ERR_INVALID if the scale ratio is out of range. */
tern_status tern_quant_gate_params(tern_qgate_params *gate, tern_qparams x, tern_qparams g,
                                   tern_qparams out, tern_requant_mode mode);
void tern_qgate_ref(int8_t *y, const int8_t *x, const int8_t *g, int n, size_t hw, int c,
                    const tern_qgate_params *p);
void tern_qgate(int8_t *y, const int8_t *x, const int8_t *g, int n, size_t hw, int c,
                const tern_qgate_params *p, tern_qisa isa);

/* Global average pool as TFLite's int8 AVERAGE_POOL_2D over the whole image (output keeps the
 * input's parameters): y[n, c] = sum / hw rounded half away from zero, of the raw int8 values.
 * Integer arithmetic with no rescaling, so the same in both requantization modes (TFLite's
 * reference kernel divides exactly this way).
 *   x (N, HW, C), y (N, C) */
void tern_qavgpool_ref(int8_t *y, const int8_t *x, int n, size_t hw, int c);
void tern_qavgpool(int8_t *y, const int8_t *x, int n, size_t hw, int c, tern_qisa isa);

/* y = tern_quantize(x, p) over count values (TFLite's QUANTIZE). */
void tern_quantize_ref(int8_t *y, const float *x, size_t count, tern_qparams p);
void tern_quantize_array(int8_t *y, const float *x, size_t count, tern_qparams p,
                         tern_qisa isa);

#endif
