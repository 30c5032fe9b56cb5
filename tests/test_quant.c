/* Tests for INT8 quantization (tern/quant.h, nn/quant.c, nn/qgemm.c, nn/qops.c, nn/qmodel.c,
 * nn/qmodel_io.c):
 *   - the fixed-point helpers, both requantization modes (single precision; TFLite's Q31
 *     multiplier and shift) and the residual add and gate in both modes on hand-checked cases
 *     (ties, negatives, double rounding, saturation, left shifts, ReLU bound) and the choice of
 *     activation parameters;
 *   - every integer kernel (GEMM, im2col, direct stem convolution from int8 and from float,
 *     depthwise, add, gate, pool, quantize) at every instruction-set level the CPU has,
 *     bit-identical to its scalar reference on random shapes in both modes (the failing shape
 *     is printed);
 *   - a quantized model bit-identical across levels in both modes, and after a save/load round
 *     trip (every observer, sensitivity, float layers, both modes; a file without the
 *     "requant" key loads as float); malformed files refused; the file at least 3.5x smaller
 *     than the float one; allocation failures at every point of building and loading;
 *   - the shipped Fashion-MNIST MobileNetV3-Small quantized with 256 training images (min/max
 *     observer) in each mode: top-1 agreement with the fp32 model on 1,000 test images of at
 *     least 94% (seen: float 96.4%, fixed 95.9%), int8 accuracy within 2.5 points of fp32
 *     (seen: 93.0% fp32, 91.7% float, 91.6% fixed), and the two modes' predictions the same on
 *     at least 97% (seen: 99.1%). Needs Debian's dataset-fashion-mnist and
 *     weights/fashion-mnist-small.safetensors (found from $TERN_FIXTURES/../../weights). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "nn/qkernels.h"
#include "tern.h"
#include "testutil.h"

#define CASES 80

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size);
    assert_non_null(p);
    return p;
}

static void *xaligned(size_t bytes)
{
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
    assert_non_null(p);
    return p;
}

static void random_bytes(test_rng *r, int8_t *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (int8_t)test_rng_int(r, -128, 127);
}

/* The levels to test: scalar up to the best this CPU has. */
static int levels(tern_qisa *out)
{
    int n = 0;
    for (int i = TERN_QISA_SCALAR; i <= (int)tern_qisa_resolve(TERN_QISA_AUTO); i++)
        out[n++] = (tern_qisa)i;
    return n;
}

/* ---- fixed point ----------------------------------------------------------------------------- */

static void srdhm_cases(void **state)
{
    (void)state;
    const int32_t half = 1 << 30; /* 0.5 in Q31 */
    assert_int_equal(tern_quant_srdhm(INT32_MIN, INT32_MIN), INT32_MAX); /* the one overflow */
    assert_int_equal(tern_quant_srdhm(half, half), 1 << 29);            /* 0.5 * 0.5 */
    assert_int_equal(tern_quant_srdhm(1, half), 1);   /* 0.5 rounds up */
    assert_int_equal(tern_quant_srdhm(3, half), 2);   /* 1.5 -> 2 */
    /* gemmlowp's nudge rounds negative ties upward (toward +inf), like NEON's vqrdmulh: */
    assert_int_equal(tern_quant_srdhm(-1, half), 0);  /* -0.5 -> 0 */
    assert_int_equal(tern_quant_srdhm(-3, half), -1); /* -1.5 -> -1 */
    assert_int_equal(tern_quant_srdhm(-5, half), -2); /* -2.5 -> -2 */
    assert_int_equal(tern_quant_srdhm(-7, 1 << 29), -2); /* -1.75 -> -2 */
    assert_int_equal(tern_quant_srdhm(INT32_MAX, INT32_MAX), INT32_MAX - 1);
    assert_int_equal(tern_quant_srdhm(INT32_MIN, INT32_MAX), -INT32_MAX);
    assert_int_equal(tern_quant_srdhm(INT32_MIN, half), -(1 << 30));
    assert_int_equal(tern_quant_srdhm(0, INT32_MIN), 0);
}

static void rdivpot_cases(void **state)
{
    (void)state;
    /* round half away from zero */
    assert_int_equal(tern_quant_rdivpot(5, 1), 3);
    assert_int_equal(tern_quant_rdivpot(-5, 1), -3);
    assert_int_equal(tern_quant_rdivpot(3, 1), 2);
    assert_int_equal(tern_quant_rdivpot(-3, 1), -2);
    assert_int_equal(tern_quant_rdivpot(6, 2), 2);   /* 1.5 */
    assert_int_equal(tern_quant_rdivpot(-6, 2), -2); /* -1.5 */
    assert_int_equal(tern_quant_rdivpot(2, 2), 1);   /* 0.5 */
    assert_int_equal(tern_quant_rdivpot(-2, 2), -1); /* -0.5 */
    assert_int_equal(tern_quant_rdivpot(7, 2), 2);   /* 1.75 */
    assert_int_equal(tern_quant_rdivpot(-7, 2), -2);
    assert_int_equal(tern_quant_rdivpot(1, 2), 0);   /* 0.25 */
    assert_int_equal(tern_quant_rdivpot(-1, 2), 0);
    assert_int_equal(tern_quant_rdivpot(-9, 0), -9);
    assert_int_equal(tern_quant_rdivpot(INT32_MAX, 31), 1);
    assert_int_equal(tern_quant_rdivpot(INT32_MIN, 31), -1);
    assert_int_equal(tern_quant_rdivpot(-(1 << 30), 31), -1); /* -0.5 */
    assert_int_equal(tern_quant_rdivpot((1 << 30) - 1, 31), 0);
}

static void mbqm_cases(void **state)
{
    (void)state;
    const int32_t half = 1 << 30;
    assert_int_equal(tern_quant_mbqm(100, half, 0), 50);
    assert_int_equal(tern_quant_mbqm(101, half, 0), 51);   /* 50.5, tie up */
    assert_int_equal(tern_quant_mbqm(-101, half, 0), -50); /* -50.5, tie up */
    /* Two roundings, as TFLite (without TFLITE_SINGLE_ROUNDING): 101/4 = 25.25, but the high
     * multiply gives 51 and 51/2 = 25.5 rounds away from zero to 26. */
    assert_int_equal(tern_quant_mbqm(101, half, -1), 26);
    assert_int_equal(tern_quant_mbqm(-101, half, -1), -25);
    assert_int_equal(tern_quant_mbqm(3, half, 2), 6);      /* left shift */
    assert_int_equal(tern_quant_mbqm(-3, half, 2), -6);
    /* the left shift saturates instead of overflowing */
    assert_int_equal(tern_quant_mbqm(INT32_MAX, half, 1), 1 << 30);
    assert_int_equal(tern_quant_mbqm(INT32_MIN, half, 1), -(1 << 30));
    assert_int_equal(tern_quant_mbqm(1 << 20, INT32_MAX, 30), INT32_MAX - 1);
    assert_int_equal(tern_quant_mbqm(-(1 << 20), INT32_MAX, 30), -INT32_MAX);
    assert_int_equal(tern_quant_mbqm(INT32_MAX, INT32_MAX, -31), 1);
    assert_int_equal(tern_quant_mbqm(12345, 0, 0), 0);
}

static void multiplier_cases(void **state)
{
    (void)state;
    int32_t m;
    int s;
    assert_int_equal(tern_quant_multiplier(0.5, &m, &s), TERN_OK);
    assert_int_equal(m, 1 << 30);
    assert_int_equal(s, 0);
    assert_int_equal(tern_quant_multiplier(1.0, &m, &s), TERN_OK);
    assert_int_equal(m, 1 << 30);
    assert_int_equal(s, 1);
    assert_int_equal(tern_quant_multiplier(0.75, &m, &s), TERN_OK);
    assert_int_equal(m, 1610612736);
    assert_int_equal(s, 0);
    assert_int_equal(tern_quant_multiplier(0.1, &m, &s), TERN_OK);
    assert_int_equal(m, 1717986918); /* round(0.8 * 2^31) */
    assert_int_equal(s, -3);
    /* q rounds up to 2^31: halved, shift incremented */
    assert_int_equal(tern_quant_multiplier(1.0 - ldexp(1, -40), &m, &s), TERN_OK);
    assert_int_equal(m, 1 << 30);
    assert_int_equal(s, 1);
    assert_int_equal(tern_quant_multiplier(0.0, &m, &s), TERN_OK);
    assert_int_equal(m, 0);
    assert_int_equal(s, 0);
    assert_int_equal(tern_quant_multiplier(ldexp(1, -40), &m, &s), TERN_OK); /* flushed */
    assert_int_equal(m, 0);
    assert_int_equal(s, 0);
    assert_int_equal(tern_quant_multiplier(ldexp(1, -33), &m, &s), TERN_OK); /* shift -32 */
    assert_int_equal(m, 0);
    assert_int_equal(tern_quant_multiplier(ldexp(1, -32), &m, &s), TERN_OK); /* shift -31 */
    assert_int_equal(m, 1 << 30);
    assert_int_equal(s, -31);
    assert_int_equal(tern_quant_multiplier(ldexp(0.9, 30), &m, &s), TERN_OK);
    assert_int_equal(s, 30);
    assert_int_equal(tern_quant_multiplier(ldexp(1, 30), &m, &s), TERN_ERR_INVALID);
    assert_int_equal(tern_quant_multiplier(-0.5, &m, &s), TERN_ERR_INVALID);
    assert_int_equal(tern_quant_multiplier(NAN, &m, &s), TERN_ERR_INVALID);
    assert_int_equal(tern_quant_multiplier(INFINITY, &m, &s), TERN_ERR_INVALID);
    /* round trip: the fixed-point value is within 2^-31 relative of the real one */
    test_rng r = {7};
    for (int i = 0; i < 1000; i++) {
        double real = ldexp(test_rng_uniform(&r, 0.5f, 1.0f), test_rng_int(&r, -30, 30));
        assert_int_equal(tern_quant_multiplier(real, &m, &s), TERN_OK);
        assert_true(m >= (1 << 30));
        assert_true(fabs(ldexp(m, s - 31) / real - 1) <= ldexp(1, -30));
    }
}

static void choose_params_cases(void **state)
{
    (void)state;
    tern_qparams p = tern_quant_choose_params(-1, 1);
    assert_true(fabsf(p.scale - 2.0f / 255) < 1e-9f);
    assert_int_equal(p.zero_point, -1); /* -0.5 rounds away from zero */
    p = tern_quant_choose_params(0, 6); /* ReLU6-like: zero at the bottom */
    assert_int_equal(p.zero_point, -128);
    assert_true(fabsf(p.scale - 6.0f / 255) < 1e-7f);
    p = tern_quant_choose_params(-6, 0);
    assert_int_equal(p.zero_point, 127);
    p = tern_quant_choose_params(2, 5); /* widened to contain 0 */
    assert_int_equal(p.zero_point, -128);
    assert_true(fabsf(p.scale - 5.0f / 255) < 1e-7f);
    p = tern_quant_choose_params(0, 0); /* all zero: a tiny range, never a zero scale */
    assert_true(p.scale > 0);
    assert_int_equal(p.zero_point, -128);
    p = tern_quant_choose_params(-0.375f, 3.0f);
    assert_true(p.zero_point > -128 && p.zero_point < 127);
    /* zero is exact, and both ends are within one step */
    test_rng r = {3};
    for (int i = 0; i < 1000; i++) {
        float lo = test_rng_uniform(&r, -10, 1), hi = lo + test_rng_uniform(&r, 0, 20);
        p = tern_quant_choose_params(lo, hi);
        assert_true(p.zero_point >= -128 && p.zero_point <= 127);
        assert_true(tern_dequantize((int8_t)p.zero_point, p) == 0.0f);
        float rlo = lo < 0 ? lo : 0, rhi = hi > 0 ? hi : 0;
        assert_true(tern_dequantize(-128, p) <= rlo + p.scale);
        assert_true(tern_dequantize(127, p) >= rhi - p.scale);
    }
    tern_qparams one = {1.0f, 0};
    assert_int_equal(tern_quantize(0.5f, one), 1);
    assert_int_equal(tern_quantize(-0.5f, one), -1);
    assert_int_equal(tern_quantize(2.5f, one), 3);
    assert_int_equal(tern_quantize(-2.4f, one), -2);
    assert_int_equal(tern_quantize(1000, one), 127);
    assert_int_equal(tern_quantize(-1000, one), -128);
    assert_int_equal(tern_quantize(INFINITY, one), 127);
    assert_int_equal(tern_quantize(-INFINITY, one), -128);
    assert_int_equal(tern_quantize(NAN, one), 0);
    tern_qparams off = {0.5f, -100};
    assert_int_equal(tern_quantize(0, off), -100);
    assert_int_equal(tern_quantize(-100, off), -128);
}

static void lut_cases(void **state)
{
    (void)state;
    int8_t lut[256];
    tern_qparams in = {0.05f, 10}, out = {0.03f, -120};
    tern_quant_lut(lut, TERN_ACT_HARDSWISH, in, out);
    assert_int_equal(lut[(uint8_t)10], -120); /* hardswish(0) = 0 */
    /* x = (127 - 10) * 0.05 = 5.85: hardswish = 5.85, 5.85 / 0.03 = 195, - 120 */
    assert_int_equal(lut[127], 75);
    /* x = (-60 - 10) * 0.05 = -3.5: 0 */
    assert_int_equal(lut[(uint8_t)-60], -120);
    /* x = (-128 - 10) * 0.05 = -6.9: 0 */
    assert_int_equal(lut[(uint8_t)-128], -120);
    /* x = 1: hardswish = 1 * 4 / 6 = 0.6667, / 0.03 = 22.2 -> 22 - 120 */
    assert_int_equal(lut[(uint8_t)30], -98);
    tern_quant_lut(lut, TERN_ACT_HARDSIGMOID, in, (tern_qparams){1.0f / 256, -128});
    assert_int_equal(lut[(uint8_t)10], 0); /* 0.5 * 256 - 128 */
    assert_int_equal(lut[127], 127);
    assert_int_equal(lut[(uint8_t)-128], -128);
}

/* ---- kernels: fast versions bit-identical to the references ----------------------------------- */

/* Random requantization of n channels: realistic scales with occasional extreme ones. */
typedef struct rq_case {
    float *scale;
    int32_t *fixed; /* (2, n): multipliers, shifts */
    int8_t lut[256];
    tern_requant rq;
} rq_case;

/* Case t's mode: the two alternate, so that every kernel test covers both on random shapes. */
static tern_requant_mode case_mode(int t)
{
    return t % 2 ? TERN_REQUANT_FIXED : TERN_REQUANT_FLOAT;
}

static void rq_case_init(rq_case *c, test_rng *r, size_t n, tern_requant_mode mode)
{
    c->scale = xcalloc(n, sizeof(float));
    c->fixed = xcalloc(2 * n, sizeof(int32_t));
    for (size_t i = 0; i < n; i++) {
        /* mostly what layers have; now and then tiny or large (saturating, and in fixed mode
         * left-shifting) scales */
        int e = test_rng_int(r, 0, 20) == 0 ? test_rng_int(r, -40, 10) : test_rng_int(r, -14, 0);
        c->scale[i] = ldexpf(test_rng_uniform(r, 0.5f, 1.0f), e);
        double real = c->scale[i];
        assert_int_equal(tern_requant_fixed_params(c->fixed + i, c->fixed + n + i, &real, 1),
                         TERN_OK);
    }
    int zp = test_rng_int(r, -128, 127);
    c->rq = (tern_requant){.mode = mode, .scale = c->scale, .multiplier = c->fixed,
                           .shift = c->fixed + n, .out_zp = zp, .qmin = -128, .qmax = 127};
    int kind = test_rng_int(r, 0, 2);
    if (kind == 1) { /* fused ReLU */
        c->rq.qmin = zp;
    } else if (kind == 2) {
        tern_qparams in = {test_rng_uniform(r, 0.01f, 0.1f), zp};
        tern_qparams out = {test_rng_uniform(r, 0.01f, 0.1f), test_rng_int(r, -128, 0)};
        tern_quant_lut(c->lut, test_rng_int(r, 0, 1) ? TERN_ACT_HARDSWISH : TERN_ACT_HARDSIGMOID,
                       in, out);
        c->rq.lut = c->lut;
    }
}

static void rq_case_free(rq_case *c)
{
    free(c->scale);
    free(c->fixed);
}

/* A bias: mostly moderate, now and then anywhere in int32 (sums then reach the saturating and
 * wrapping ends of both requantizations). */
static int32_t random_bias(test_rng *r, int range)
{
    if (test_rng_int(r, 0, 9) == 0)
        return (int32_t)(uint32_t)test_rng_next(r);
    return test_rng_int(r, -range, range);
}

/* Single-precision requantization: ties to even, clamps, zero point, fused ReLU. */
static void requant_cases(void **state)
{
    (void)state;
    float scale[1] = {0.5f};
    tern_requant rq = {.scale = scale, .out_zp = 0, .qmin = -128, .qmax = 127};
    assert_int_equal(tern_requant_one(3, &rq, 0), 2);   /* 1.5 -> 2 */
    assert_int_equal(tern_requant_one(5, &rq, 0), 2);   /* 2.5 -> 2 */
    assert_int_equal(tern_requant_one(-3, &rq, 0), -2); /* -1.5 -> -2 */
    assert_int_equal(tern_requant_one(-5, &rq, 0), -2); /* -2.5 -> -2 */
    assert_int_equal(tern_requant_one(7, &rq, 0), 4);   /* 3.5 -> 4 */
    assert_int_equal(tern_requant_one(1000, &rq, 0), 127);
    assert_int_equal(tern_requant_one(INT32_MIN, &rq, 0), -128);
    assert_int_equal(tern_requant_one(INT32_MAX, &rq, 0), 127);
    rq.out_zp = -100;
    assert_int_equal(tern_requant_one(10, &rq, 0), -95);
    assert_int_equal(tern_requant_one(-100, &rq, 0), -128); /* -150 clamps */
    rq.qmin = -100;                                         /* fused ReLU */
    assert_int_equal(tern_requant_one(-10, &rq, 0), -100);
    scale[0] = 1.0f / 3;
    rq = (tern_requant){.scale = scale, .out_zp = 5, .qmin = -128, .qmax = 127};
    assert_int_equal(tern_requant_one(100, &rq, 0), 38); /* 33.33 + 5 */
}

/* The fixed mode (TFLite's MultiplyByQuantizedMultiplier): ties of the high multiply round
 * upward, those of the shift away from zero, two roundings; saturation; left shifts. */
static void requant_fixed_cases(void **state)
{
    (void)state;
    int32_t mult[1], shift[1];
    double real = 0.5;
    assert_int_equal(tern_requant_fixed_params(mult, shift, &real, 1), TERN_OK);
    assert_int_equal(mult[0], 1 << 30);
    assert_int_equal(shift[0], 0);
    tern_requant rq = {.mode = TERN_REQUANT_FIXED, .multiplier = mult, .shift = shift,
                       .out_zp = 0, .qmin = -128, .qmax = 127};
    assert_int_equal(tern_requant_one(3, &rq, 0), 2);    /* 1.5 -> 2 */
    assert_int_equal(tern_requant_one(5, &rq, 0), 3);    /* 2.5 -> 3 (float mode: 2) */
    assert_int_equal(tern_requant_one(-3, &rq, 0), -1);  /* -1.5 -> -1, upward (float: -2) */
    assert_int_equal(tern_requant_one(-5, &rq, 0), -2);  /* -2.5 -> -2 */
    assert_int_equal(tern_requant_one(-4, &rq, 0), -2);
    assert_int_equal(tern_requant_one(1000, &rq, 0), 127);
    assert_int_equal(tern_requant_one(INT32_MAX, &rq, 0), 127);
    assert_int_equal(tern_requant_one(INT32_MIN, &rq, 0), -128);
    rq.out_zp = -100;
    assert_int_equal(tern_requant_one(10, &rq, 0), -95);
    assert_int_equal(tern_requant_one(-100, &rq, 0), -128); /* -150 clamps */
    rq.qmin = -100;                                         /* fused ReLU */
    assert_int_equal(tern_requant_one(-10, &rq, 0), -100);
    assert_int_equal(tern_requant_one(INT32_MAX, &rq, 0), 127); /* no overflow adding zp */
    /* 0.25: the shift's ties go away from zero */
    real = 0.25;
    assert_int_equal(tern_requant_fixed_params(mult, shift, &real, 1), TERN_OK);
    assert_int_equal(shift[0], -1);
    rq = (tern_requant){.mode = TERN_REQUANT_FIXED, .multiplier = mult, .shift = shift,
                        .qmin = -128, .qmax = 127};
    assert_int_equal(tern_requant_one(2, &rq, 0), 1);    /* 0.5 -> 1 */
    assert_int_equal(tern_requant_one(-2, &rq, 0), -1);  /* -0.5 -> -1 */
    assert_int_equal(tern_requant_one(6, &rq, 0), 2);    /* 1.5 -> 2 */
    assert_int_equal(tern_requant_one(-6, &rq, 0), -2);  /* -1.5 -> -2 */
    assert_int_equal(tern_requant_one(10, &rq, 0), 3);   /* 2.5 -> 3 (float: 2) */
    assert_int_equal(tern_requant_one(-10, &rq, 0), -3); /* -2.5 -> -3 */
    assert_int_equal(tern_requant_one(101, &rq, 0), 26); /* 25.25: 50.5 -> 51, 25.5 -> 26 */
    /* 1/3: the Q31 multiplier 1431655765 (shift -1); 100/3 = 33.3 but the high multiply
     * rounds 66.67 up to 67 and the shift 33.5 up to 34 */
    real = 1.0 / 3;
    assert_int_equal(tern_requant_fixed_params(mult, shift, &real, 1), TERN_OK);
    assert_int_equal(mult[0], 1431655765);
    assert_int_equal(shift[0], -1);
    rq.out_zp = 5;
    assert_int_equal(tern_requant_one(100, &rq, 0), 39); /* float mode: 38 */
    assert_int_equal(tern_requant_one(-100, &rq, 0), -29); /* -67 -> -33.5 -> -34 */
    /* 4: a left shift of 3, saturating on the way for large accumulators */
    real = 4;
    assert_int_equal(tern_requant_fixed_params(mult, shift, &real, 1), TERN_OK);
    assert_int_equal(shift[0], 3);
    rq.out_zp = 0;
    assert_int_equal(tern_requant_one(10, &rq, 0), 40);
    assert_int_equal(tern_requant_one(-31, &rq, 0), -124);
    assert_int_equal(tern_requant_one(100, &rq, 0), 127);
    assert_int_equal(tern_requant_one(1 << 29, &rq, 0), 127);
    assert_int_equal(tern_requant_one(-(1 << 29), &rq, 0), -128);
    /* a ratio below 2^-32 flushes to zero: the output is the zero point */
    real = ldexp(1, -40);
    assert_int_equal(tern_requant_fixed_params(mult, shift, &real, 1), TERN_OK);
    rq.out_zp = 7;
    assert_int_equal(tern_requant_one(INT32_MAX, &rq, 0), 7);
    real = -1;
    assert_int_equal(tern_requant_fixed_params(mult, shift, &real, 1), TERN_ERR_INVALID);
    real = ldexp(1, 31);
    assert_int_equal(tern_requant_fixed_params(mult, shift, &real, 1), TERN_ERR_INVALID);
    /* the table after the fixed-point step */
    int8_t lut[256];
    for (int i = 0; i < 256; i++)
        lut[i] = (int8_t)(255 - i);
    real = 0.5;
    assert_int_equal(tern_requant_fixed_params(mult, shift, &real, 1), TERN_OK);
    rq = (tern_requant){.mode = TERN_REQUANT_FIXED, .multiplier = mult, .shift = shift,
                        .qmin = -128, .qmax = 127, .lut = lut};
    assert_int_equal(tern_requant_one(5, &rq, 0), (int8_t)(255 - 3));
    /* mode names */
    tern_requant_mode mode = TERN_REQUANT_FLOAT;
    assert_int_equal(tern_requant_mode_parse("fixed", &mode), TERN_OK);
    assert_int_equal(mode, TERN_REQUANT_FIXED);
    assert_string_equal(tern_requant_mode_name(mode), "fixed");
    assert_int_equal(tern_requant_mode_parse("float", &mode), TERN_OK);
    assert_int_equal(mode, TERN_REQUANT_FLOAT);
    assert_int_equal(tern_requant_mode_parse("fp32", &mode), TERN_ERR_INVALID);
    assert_int_equal(tern_requant_mode_parse(NULL, &mode), TERN_ERR_INVALID);
}

static bool bytes_equal(const char *what, const int8_t *a, const int8_t *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i]) {
            print_error("%s: element %zu is %d, reference %d\n", what, i, a[i], b[i]);
            return false;
        }
    return true;
}

static void qgemm_matches_reference(void **state)
{
    (void)state;
    tern_qisa isas[4];
    int nisa = levels(isas);
    test_rng r = {11};
    for (int t = 0; t < CASES; t++) {
        size_t M = (size_t)(test_rng_int(&r, 0, 3) ? test_rng_int(&r, 1, 40) : test_rng_int(&r, 41, 200));
        size_t N = (size_t)(test_rng_int(&r, 0, 3) ? test_rng_int(&r, 1, 80) : test_rng_int(&r, 81, 300));
        size_t K = (size_t)(test_rng_int(&r, 0, 3) ? test_rng_int(&r, 1, 64) : test_rng_int(&r, 65, 700));
        size_t lda = K + (size_t)test_rng_int(&r, 0, 5), ldy = N + (size_t)test_rng_int(&r, 0, 3);
        int32_t zp = test_rng_int(&r, -128, 127);
        bool raw = test_rng_int(&r, 0, 5) == 0, has_bias = test_rng_int(&r, 0, 4) != 0;
        int8_t *a = xcalloc(M * lda, 1), *w = xcalloc(N * K, 1);
        int32_t *bias = xcalloc(N, sizeof(int32_t));
        random_bytes(&r, a, M * lda);
        random_bytes(&r, w, N * K);
        for (size_t i = 0; i < N * K; i++)
            w[i] = w[i] == -128 ? -127 : w[i];
        for (size_t i = 0; i < N; i++)
            bias[i] = random_bias(&r, 100000);
        rq_case rq;
        rq_case_init(&rq, &r, N, case_mode(t));
        int8_t *ref = xcalloc(M * ldy, 1), *got = xcalloc(M * ldy, 1);
        int32_t *ref32 = xcalloc(M * ldy, 4), *got32 = xcalloc(M * ldy, 4);
        tern_qgemm_ref(raw ? NULL : ref, raw ? ref32 : NULL, ldy, a, lda, zp, w,
                       has_bias ? bias : NULL, M, N, K, &rq.rq);
        for (int l = 0; l < nisa; l++) {
            void *packed = xaligned(tern_qgemm_packed_size(N, K, isas[l]));
            void *ws = xaligned(tern_qgemm_workspace_size(N, K, isas[l]));
            tern_qgemm_pack(packed, w, has_bias ? bias : NULL, zp, N, K, isas[l]);
            memset(got, 0x55, M * ldy);
            memset(got32, 0x55, M * ldy * 4);
            tern_qgemm(raw ? NULL : got, raw ? got32 : NULL, ldy, a, lda, packed, ws, M, N, K,
                       &rq.rq, isas[l]);
            bool ok = true;
            for (size_t m = 0; m < M && ok; m++)
                ok = raw ? memcmp(got32 + m * ldy, ref32 + m * ldy, N * 4) == 0
                         : bytes_equal("qgemm", got + m * ldy, ref + m * ldy, N);
            if (!ok)
                print_error("qgemm %s %s: M %zu N %zu K %zu lda %zu zp %d raw %d lut %d\n",
                            tern_qisa_name(isas[l]), tern_requant_mode_name(rq.rq.mode), M, N,
                            K, lda, zp, raw, rq.rq.lut != NULL);
            assert_true(ok);
            free(packed);
            free(ws);
        }
        rq_case_free(&rq);
        free(a);
        free(w);
        free(bias);
        free(ref);
        free(got);
        free(ref32);
        free(got32);
    }
}

/* The stem as im2col + GEMM against a direct convolution written here. */
static void conv_im2col_matches_direct(void **state)
{
    (void)state;
    tern_qisa isas[4];
    int nisa = levels(isas);
    test_rng r = {13};
    for (int t = 0; t < 40; t++) {
        const int k = t < 20 ? 3 : 2 * test_rng_int(&r, 0, 2) + 1, kk = k * k;
        tern_conv_params p = {.n = test_rng_int(&r, 1, 2), .h = test_rng_int(&r, k, 17),
                              .w = test_rng_int(&r, k, 17), .cin = test_rng_int(&r, 1, 7),
                              .cout = test_rng_int(&r, 1, 40), .k = k,
                              .stride = test_rng_int(&r, 1, 2),
                              .pad = t < 20 ? 1 : test_rng_int(&r, 0, k / 2), .groups = 1};
        tern_conv_params_finish(&p);
        size_t K = (size_t)p.cin * kk, rows = (size_t)p.n * p.oh * p.ow;
        int32_t zp = test_rng_int(&r, -128, 127);
        int8_t *x = xcalloc((size_t)p.n * p.h * p.w * p.cin, 1);
        int8_t *w = xcalloc((size_t)p.cout * K, 1), *wt = xcalloc((size_t)p.cout * K, 1);
        int32_t *bias = xcalloc((size_t)p.cout, 4);
        random_bytes(&r, x, (size_t)p.n * p.h * p.w * p.cin);
        random_bytes(&r, w, (size_t)p.cout * K);
        for (int i = 0; i < p.cout; i++)
            bias[i] = test_rng_int(&r, -5000, 5000);
        rq_case rq;
        rq_case_init(&rq, &r, (size_t)p.cout, case_mode(t));
        int8_t *ref = xcalloc(rows * p.cout, 1), *got = xcalloc(rows * p.cout, 1);
        for (int n = 0; n < p.n; n++)
            for (int oy = 0; oy < p.oh; oy++)
                for (int ox = 0; ox < p.ow; ox++)
                    for (int co = 0; co < p.cout; co++) {
                        int32_t acc = bias[co];
                        for (int ci = 0; ci < p.cin; ci++)
                            for (int ky = 0; ky < k; ky++)
                                for (int kx = 0; kx < k; kx++) {
                                    int iy = oy * p.stride - p.pad + ky;
                                    int ix = ox * p.stride - p.pad + kx;
                                    if (iy < 0 || iy >= p.h || ix < 0 || ix >= p.w)
                                        continue;
                                    acc += (x[(((size_t)n * p.h + iy) * p.w + ix) * p.cin + ci] - zp) *
                                           w[(((size_t)co * p.cin + ci) * k + ky) * k + kx];
                                }
                        ref[(((size_t)n * p.oh + oy) * p.ow + ox) * p.cout + co] =
                            tern_requant_one(acc, &rq.rq, (size_t)co);
                    }
        for (int co = 0; co < p.cout; co++)
            for (int ci = 0; ci < p.cin; ci++)
                for (int tap = 0; tap < kk; tap++)
                    wt[(size_t)co * K + (size_t)tap * p.cin + ci] = w[(size_t)co * K + (size_t)ci * kk + tap];
        int8_t *col = xcalloc(rows * K, 1);
        tern_qim2col(col, K, x, zp, &p);
        for (int l = 0; l < nisa; l++) {
            void *packed = xaligned(tern_qgemm_packed_size((size_t)p.cout, K, isas[l]));
            void *ws = xaligned(tern_qgemm_workspace_size((size_t)p.cout, K, isas[l]));
            tern_qgemm_pack(packed, wt, bias, zp, (size_t)p.cout, K, isas[l]);
            tern_qgemm(got, NULL, (size_t)p.cout, col, K, packed, ws, rows, (size_t)p.cout, K,
                       &rq.rq, isas[l]);
            if (!bytes_equal("conv", got, ref, rows * p.cout))
                print_error("conv %s %s: n %d %dx%dx%d -> %d stride %d\n",
                            tern_qisa_name(isas[l]), tern_requant_mode_name(rq.rq.mode), p.n, p.h,
                            p.w, p.cin, p.cout, p.stride);
            assert_memory_equal(got, ref, rows * p.cout);
            free(packed);
            free(ws);
            /* the direct kernel of short kernel rows (the stem) */
            assert_true(tern_qconv_direct_supported(&p));
            packed = xaligned(tern_qconv_direct_packed_size(&p, isas[l]));
            ws = xaligned(tern_qconv_direct_workspace_size(&p, isas[l]));
            tern_qconv_direct_pack(packed, w, bias, zp, &p, isas[l]);
            memset(got, 0x55, rows * p.cout);
            tern_qconv_direct(got, x, zp, packed, ws, &p, &rq.rq, isas[l]);
            if (!bytes_equal("direct conv", got, ref, rows * p.cout))
                print_error("direct conv %s %s: n %d %dx%dx%d -> %d k %d stride %d pad %d\n",
                            tern_qisa_name(isas[l]), tern_requant_mode_name(rq.rq.mode), p.n, p.h,
                            p.w, p.cin, p.cout, k, p.stride, p.pad);
            assert_memory_equal(got, ref, rows * p.cout);
            /* the same from float input quantized on the way in */
            size_t nx = (size_t)p.n * p.h * p.w * p.cin;
            float *xf = xcalloc(nx, sizeof(float));
            int8_t *x8 = xcalloc(nx, 1), *scratch = xcalloc(nx, 1), *ref8 = xcalloc(rows * p.cout, 1);
            tern_qparams xp = {test_rng_uniform(&r, 0.01f, 0.1f), zp};
            test_fill_uniform(&r, xf, nx, -12, 12);
            tern_quantize_ref(x8, xf, nx, xp);
            tern_qconv_direct(ref8, x8, zp, packed, ws, &p, &rq.rq, isas[l]);
            memset(got, 0x55, rows * p.cout);
            tern_qconv_direct_f32(got, scratch, xf, xp, packed, ws, &p, &rq.rq, isas[l]);
            assert_memory_equal(got, ref8, rows * p.cout);
            free(xf);
            free(x8);
            free(scratch);
            free(ref8);
            free(packed);
            free(ws);
        }
        rq_case_free(&rq);
        free(x);
        free(w);
        free(wt);
        free(bias);
        free(ref);
        free(got);
        free(col);
    }
}

static void qdwconv_matches_reference(void **state)
{
    (void)state;
    tern_qisa isas[4];
    int nisa = levels(isas);
    test_rng r = {17};
    for (int t = 0; t < CASES; t++) {
        int k = test_rng_int(&r, 0, 1) ? 5 : 3, stride = test_rng_int(&r, 1, 2);
        int pad = test_rng_int(&r, 0, 3) ? (k - 1) / 2 : test_rng_int(&r, 0, (k - 1) / 2);
        int lo = k - 2 * pad > 1 ? k - 2 * pad : 1;
        int ch = test_rng_int(&r, 0, 2) ? test_rng_int(&r, 1, 40) : test_rng_int(&r, 41, 300);
        tern_conv_params p = {.n = test_rng_int(&r, 1, 2), .h = test_rng_int(&r, lo, 14),
                              .w = test_rng_int(&r, lo, 14), .cin = ch, .cout = ch, .k = k,
                              .stride = stride, .pad = pad, .groups = ch};
        tern_conv_params_finish(&p);
        size_t nx = (size_t)p.n * p.h * p.w * ch, ny = (size_t)p.n * p.oh * p.ow * ch;
        int32_t zp = test_rng_int(&r, -128, 127);
        bool has_bias = test_rng_int(&r, 0, 3) != 0;
        int8_t *x = xcalloc(nx, 1), *w = xcalloc((size_t)ch * k * k, 1);
        int32_t *bias = xcalloc((size_t)ch, 4);
        random_bytes(&r, x, nx);
        random_bytes(&r, w, (size_t)ch * k * k);
        for (int i = 0; i < ch; i++)
            bias[i] = random_bias(&r, 20000);
        rq_case rq;
        rq_case_init(&rq, &r, (size_t)ch, case_mode(t));
        int8_t *ref = xcalloc(ny, 1), *got = xcalloc(ny, 1);
        tern_qdwconv_ref(ref, x, zp, w, has_bias ? bias : NULL, &p, &rq.rq);
        for (int l = 0; l < nisa; l++) {
            void *wp = xaligned(tern_qdwconv_packed_size(ch, k, isas[l]));
            void *ws = xaligned(tern_qdwconv_workspace_size(&p, isas[l]));
            tern_qdwconv_pack(wp, w, has_bias ? bias : NULL, zp, ch, k, isas[l]);
            memset(got, 0x55, ny);
            tern_qdwconv(got, x, zp, wp, ws, &p, &rq.rq, isas[l]);
            free(wp);
            free(ws);
            if (!bytes_equal("dwconv", got, ref, ny))
                print_error("dwconv %s %s: n %d %dx%dx%d k %d stride %d pad %d\n",
                            tern_qisa_name(isas[l]), tern_requant_mode_name(rq.rq.mode), p.n, p.h,
                            p.w, ch, k, stride, pad);
            assert_memory_equal(got, ref, ny);
        }
        rq_case_free(&rq);
        free(x);
        free(w);
        free(bias);
        free(ref);
        free(got);
    }
}

static tern_qparams random_params(test_rng *r)
{
    return (tern_qparams){test_rng_uniform(r, 0.002f, 0.2f), test_rng_int(r, -128, 127)};
}

static void elementwise_match_reference(void **state)
{
    (void)state;
    tern_qisa isas[4];
    int nisa = levels(isas);
    test_rng r = {19};
    for (int t = 0; t < CASES; t++) {
        int n = test_rng_int(&r, 1, 3), c = test_rng_int(&r, 1, 200);
        size_t hw = (size_t)test_rng_int(&r, 1, 60), count = (size_t)n * hw * c;
        int8_t *a = xcalloc(count, 1), *b = xcalloc(count, 1), *g = xcalloc((size_t)n * c, 1);
        int8_t *ref = xcalloc(count, 1), *got = xcalloc(count, 1);
        random_bytes(&r, a, count);
        random_bytes(&r, b, count);
        random_bytes(&r, g, (size_t)n * c);

        tern_qparams pa = random_params(&r), pb = random_params(&r), pao = random_params(&r);
        tern_qparams px = random_params(&r), pg = random_params(&r), po = random_params(&r);
        if (t % 4 == 3) /* a gate whose multiplier shifts left (real ratio above 1) */
            po.scale = px.scale * pg.scale / test_rng_uniform(&r, 1.5f, 300.0f);
        for (int mode = TERN_REQUANT_FLOAT; mode <= TERN_REQUANT_FIXED; mode++) {
            const char *mname = tern_requant_mode_name((tern_requant_mode)mode);
            tern_qadd_params add;
            assert_int_equal(tern_quant_add_params(&add, pa, pb, pao, (tern_requant_mode)mode),
                             TERN_OK);
            tern_qadd_ref(ref, a, b, count, &add);
            for (int l = 0; l < nisa; l++) {
                tern_qadd(got, a, b, count, &add, isas[l]);
                if (!bytes_equal("add", got, ref, count))
                    print_error("add %s %s: count %zu\n", tern_qisa_name(isas[l]), mname, count);
                assert_memory_equal(got, ref, count);
            }
            tern_qgate_params gate;
            assert_int_equal(tern_quant_gate_params(&gate, px, pg, po, (tern_requant_mode)mode),
                             TERN_OK);
            tern_qgate_ref(ref, a, g, n, hw, c, &gate);
            for (int l = 0; l < nisa; l++) {
                tern_qgate(got, a, g, n, hw, c, &gate, isas[l]);
                if (!bytes_equal("gate", got, ref, count))
                    print_error("gate %s %s: n %d hw %zu c %d\n", tern_qisa_name(isas[l]), mname,
                                n, hw, c);
                assert_memory_equal(got, ref, count);
            }
        }

        tern_qavgpool_ref(ref, a, n, hw, c);
        for (int l = 0; l < nisa; l++) {
            tern_qavgpool(got, a, n, hw, c, isas[l]);
            if (!bytes_equal("avgpool", got, ref, (size_t)n * c))
                print_error("avgpool %s: n %d hw %zu c %d\n", tern_qisa_name(isas[l]), n, hw, c);
            assert_memory_equal(got, ref, (size_t)n * c);
        }

        float *f = xcalloc(count, sizeof(float));
        tern_qparams pq = random_params(&r);
        for (size_t i = 0; i < count; i++) {
            /* exact ties, values beyond the range, and the odd non-finite one */
            int kind = test_rng_int(&r, 0, 9);
            f[i] = kind == 0   ? ((float)test_rng_int(&r, -300, 300) + 0.5f) * pq.scale
                   : kind == 1 ? test_rng_uniform(&r, -1000, 1000)
                   : kind == 2 && i % 50 == 0 ? (i % 100 ? INFINITY : NAN)
                               : test_rng_uniform(&r, -130, 130) * pq.scale;
        }
        tern_quantize_ref(ref, f, count, pq);
        for (int l = 0; l < nisa; l++) {
            tern_quantize_array(got, f, count, pq, isas[l]);
            if (!bytes_equal("quantize", got, ref, count))
                print_error("quantize %s: count %zu\n", tern_qisa_name(isas[l]), count);
            assert_memory_equal(got, ref, count);
        }
        free(f);
        free(a);
        free(b);
        free(g);
        free(ref);
        free(got);
    }
}

/* One element of the add at every level: all must agree; returns the result. */
static int8_t add_one(int8_t a, int8_t b, const tern_qadd_params *p)
{
    int8_t y, v;
    tern_qadd_ref(&y, &a, &b, 1, p);
    tern_qisa isas[4];
    for (int l = 0, n = levels(isas); l < n; l++) {
        tern_qadd(&v, &a, &b, 1, p, isas[l]);
        assert_int_equal(v, y);
    }
    return y;
}

/* A hand-checked add: the inputs 1.0 (scale 0.5) and 0.25 (scale 0.25) sum to 1.25 (scale
 * 0.125), in both modes; then ties, where the modes differ. */
static void add_hand_case(void **state)
{
    (void)state;
    for (int mode = TERN_REQUANT_FLOAT; mode <= TERN_REQUANT_FIXED; mode++) {
        tern_qadd_params add;
        assert_int_equal(tern_quant_add_params(&add, (tern_qparams){0.5f, 3},
                                               (tern_qparams){0.25f, -2},
                                               (tern_qparams){0.125f, 1}, (tern_requant_mode)mode),
                         TERN_OK);
        assert_int_equal(add_one(2 + 3, 1 - 2, &add), 10 + 1);
        assert_int_equal(add_one(127, 1 - 2, &add), 127); /* (124 * 0.5 + ...) / 0.125 */
        assert_int_equal(add_one(-128, -128, &add), -128);
    }
    tern_qadd_params add;
    /* fixed: 1/2 = 2^30 * 2^-31 and 1/4 for the inputs, 2^-17 (shift -16) for the output */
    assert_int_equal(tern_quant_add_params(&add, (tern_qparams){0.5f, 3}, (tern_qparams){0.25f, -2},
                                           (tern_qparams){0.125f, 1}, TERN_REQUANT_FIXED),
                     TERN_OK);
    assert_true(add.a_mult == 1 << 30 && add.a_shift == 0);
    assert_true(add.b_mult == 1 << 30 && add.b_shift == -1);
    assert_true(add.out_mult == 1 << 30 && add.out_shift == -16);
    /* 0.5 + 0 and -0.5 + 0 at output scale 1: float rounds both ties to even (0), TFLite's
     * arithmetic away from zero */
    const tern_qparams pa = {0.25f, 2}, pb = {0.25f, -2}, po = {1.0f, 0};
    assert_int_equal(tern_quant_add_params(&add, pa, pb, po, TERN_REQUANT_FLOAT), TERN_OK);
    assert_int_equal(add_one(4, -2, &add), 0);
    assert_int_equal(add_one(0, -2, &add), 0);
    assert_int_equal(add_one(8, -2, &add), 2); /* 1.5 */
    assert_int_equal(add_one(12, -2, &add), 2); /* 2.5 */
    assert_int_equal(tern_quant_add_params(&add, pa, pb, po, TERN_REQUANT_FIXED), TERN_OK);
    assert_int_equal(add_one(4, -2, &add), 1);
    assert_int_equal(add_one(0, -2, &add), -1);
    assert_int_equal(add_one(8, -2, &add), 2);
    assert_int_equal(add_one(12, -2, &add), 3);
    assert_int_equal(add_one(-128, -128, &add), -64); /* -32.5 - 31.5 */
    /* an output scale 2^20 times below the inputs' needs a multiplier of 1 or more: refused,
     * as TFLite refuses it */
    assert_int_equal(tern_quant_add_params(&add, pa, pb, (tern_qparams){ldexpf(0.5f, -21), 0},
                                           TERN_REQUANT_FIXED),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_quant_add_params(&add, pa, pb, po, (tern_requant_mode)7),
                     TERN_ERR_INVALID);
}

/* One element of the gate at every level (n = hw = c = 1). */
static int8_t gate_one(int8_t x, int8_t g, const tern_qgate_params *p)
{
    int8_t y, v;
    tern_qgate_ref(&y, &x, &g, 1, 1, 1, p);
    tern_qisa isas[4];
    for (int l = 0, n = levels(isas); l < n; l++) {
        tern_qgate(&v, &x, &g, 1, 1, 1, p, isas[l]);
        assert_int_equal(v, y);
    }
    return y;
}

/* The gate (TFLite's MUL in fixed mode): a product through one multiplier. */
static void gate_hand_case(void **state)
{
    (void)state;
    tern_qgate_params gate;
    /* scales 0.5 * 0.25 / 0.125: a multiplier of 1, i.e. 2^30 with a left shift of 1 */
    const tern_qparams px = {0.5f, 0}, pg = {0.25f, 0};
    assert_int_equal(tern_quant_gate_params(&gate, px, pg, (tern_qparams){0.125f, 0},
                                            TERN_REQUANT_FIXED),
                     TERN_OK);
    assert_true(gate.mult == 1 << 30 && gate.shift == 1);
    assert_int_equal(gate_one(3, 1, &gate), 3);
    assert_int_equal(gate_one(-7, 9, &gate), -63);
    assert_int_equal(gate_one(127, 127, &gate), 127);
    assert_int_equal(gate_one(-128, 127, &gate), -128);
    /* ratio 0.25: 1.5 -> 2, -2.5 -> -3 away from zero; float: 2 and -2 */
    const tern_qparams po = {0.5f, -10};
    assert_int_equal(tern_quant_gate_params(&gate, px, pg, po, TERN_REQUANT_FIXED), TERN_OK);
    assert_int_equal(gate_one(3, 2, &gate), 2 - 10);
    assert_int_equal(gate_one(-5, 2, &gate), -3 - 10);
    assert_int_equal(tern_quant_gate_params(&gate, px, pg, po, TERN_REQUANT_FLOAT), TERN_OK);
    assert_int_equal(gate_one(3, 2, &gate), 2 - 10);
    assert_int_equal(gate_one(-5, 2, &gate), -2 - 10);
}

/* ---- quantized models ---------------------------------------------------------------------- */

/* A random Small model at 32x32: the qmodel's logits are identical at every level. */
static void qmodel_levels_agree(void **state)
{
    (void)state;
    tern_model_options mo = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    mo.num_classes = 10;
    mo.in_channels = 3;
    mo.seed = 5;
    tern_model *m = NULL;
    tern_error err = {{0}};
    assert_int_equal(tern_model_create(&mo, &m, &err), TERN_OK);
    /* non-trivial BatchNorm statistics */
    test_rng r = {23};
    for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(m, i);
        if (strstr(t->name, "running_mean"))
            test_fill_uniform(&r, t->data, t->count, -0.2f, 0.2f);
        else if (strstr(t->name, "running_var"))
            test_fill_uniform(&r, t->data, t->count, 0.5f, 2.0f);
    }
    tern_model_invalidate(m);
    const int n = 8, size = 32;
    size_t image = (size_t)size * size * 3;
    float *x = xcalloc((size_t)n * image, sizeof(float));
    test_fill_uniform(&r, x, (size_t)n * image, -2, 2);
    float ref[4 * 10], got[4 * 10], ref_fixed[4 * 10];
    tern_qisa isas[4];
    int nisa = levels(isas);
    for (int mode = TERN_REQUANT_FIXED; mode >= TERN_REQUANT_FLOAT; mode--)
    for (int l = 0; l < nisa; l++) {
        tern_qmodel_options qo = {.height = size, .width = size, .max_batch = 4, .isa = isas[l],
                                  .requant = (tern_requant_mode)mode};
        tern_qmodel *q = NULL;
        tern_status s = tern_qmodel_create(m, x, n, &qo, &q, &err);
        if (s != TERN_OK)
            print_error("%s\n", err.message);
        assert_int_equal(s, TERN_OK);
        assert_int_equal(tern_qmodel_isa(q), isas[l]);
        assert_int_equal(tern_qmodel_requant(q), mode);
        assert_int_equal(tern_qmodel_forward(q, l == 0 ? ref : got, x, 4), TERN_OK);
        if (l > 0)
            assert_memory_equal(got, ref, sizeof ref);
        if (l == 0 && mode == TERN_REQUANT_FIXED)
            memcpy(ref_fixed, ref, sizeof ref);
        if (l == 0 && mode == TERN_REQUANT_FLOAT) {
            /* the modes differ only in last-bit roundings: close logits, not the same bits */
            double diff = 0, norm = 0;
            for (size_t i = 0; i < 40; i++) {
                diff += fabs(ref[i] - ref_fixed[i]);
                norm += fabs(ref[i]);
            }
            assert_true(diff > 0);
            assert_true(diff < 0.1 * norm);
        }
        if (l == 0) { /* the graph: stem, ..., logits last */
            const char *kind, *name;
            assert_int_equal(tern_qmodel_op_at(q, 0, &kind, &name, NULL), TERN_OK);
            assert_string_equal(kind, "conv");
            assert_string_equal(name, "features.0.0.weight");
            size_t last = tern_qmodel_op_count(q) - 1;
            assert_int_equal(tern_qmodel_op_at(q, last, &kind, &name, NULL), TERN_OK);
            assert_string_equal(kind, "logits");
            assert_string_equal(name, "classifier.3.weight");
            assert_int_equal(tern_qmodel_op_at(q, last + 1, &kind, &name, NULL), TERN_ERR_INVALID);
        }
        assert_int_equal(tern_qmodel_forward(q, got, x, 5), TERN_ERR_INVALID);
        tern_qmodel_destroy(&q);
        assert_null(q);
    }
    /* a batch of 1 gives the same logits as the same image in a batch of 4 */
    tern_qmodel_options qo = {.height = size, .width = size, .max_batch = 4};
    tern_qmodel *q = NULL;
    assert_int_equal(tern_qmodel_create(m, x, n, &qo, &q, &err), TERN_OK);
    assert_int_equal(tern_qmodel_forward(q, got, x + 2 * image, 1), TERN_OK);
    assert_memory_equal(got, ref + 2 * 10, 10 * sizeof(float));
    tern_qmodel_destroy(&q);
    free(x);
    tern_model_destroy(&m);
}

static void qmodel_rejects_bad_input(void **state)
{
    (void)state;
    tern_model_options mo = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    mo.num_classes = 4;
    mo.width_mult = 0.25;
    tern_model *m = NULL;
    tern_error err = {{0}};
    assert_int_equal(tern_model_create(&mo, &m, &err), TERN_OK);
    float x[32 * 32 * 3] = {0};
    tern_qmodel *q = NULL;
    tern_qmodel_options qo = {.height = 32, .width = 32, .max_batch = 1};
    assert_int_equal(tern_qmodel_create(m, x, 0, &qo, &q, &err), TERN_ERR_INVALID);
    qo.height = 16;
    assert_int_equal(tern_qmodel_create(m, x, 1, &qo, &q, &err), TERN_ERR_INVALID);
    qo.height = 32;
    qo.max_batch = 0;
    assert_int_equal(tern_qmodel_create(m, x, 1, &qo, &q, &err), TERN_ERR_INVALID);
    qo.max_batch = 1;
    qo.requant = (tern_requant_mode)2;
    assert_int_equal(tern_qmodel_create(m, x, 1, &qo, &q, &err), TERN_ERR_INVALID);
    qo.requant = TERN_REQUANT_FLOAT;
    assert_null(q);
    /* an all-zero calibration set still gives a usable model */
    qo.max_batch = 1;
    assert_int_equal(tern_qmodel_create(m, x, 1, &qo, &q, &err), TERN_OK);
    float logits[4];
    assert_int_equal(tern_qmodel_forward(q, logits, x, 1), TERN_OK);
    assert_int_equal(tern_qmodel_forward(q, NULL, x, 1), TERN_ERR_INVALID);
    tern_qmodel_destroy(&q);
    tern_model_destroy(&m);

    mo.norm = TERN_NORM_GROUP;
    assert_int_equal(tern_model_create(&mo, &m, &err), TERN_OK);
    assert_int_equal(tern_qmodel_create(m, x, 1, &qo, &q, &err), TERN_ERR_UNSUPPORTED);
    tern_model_destroy(&m);
}

/* Every allocation of tern_qmodel_create can fail cleanly. */
static void qmodel_allocation_failures(void **state)
{
    (void)state;
    tern_model_options mo = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    mo.num_classes = 3;
    mo.width_mult = 0.25;
    tern_model *m = NULL;
    tern_error err = {{0}};
    assert_int_equal(tern_model_create(&mo, &m, &err), TERN_OK);
    float x[2 * 32 * 32 * 3];
    test_rng r = {29};
    test_fill_uniform(&r, x, sizeof x / sizeof *x, -1, 1);
    /* plain; histograms, sensitivity, float layers and fixed requantization; then loading the
     * file that writes */
    char dir[] = "/tmp/tern_test_qalloc.XXXXXX", path[96];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/q.safetensors", dir);
    for (int mode = 0; mode < 3; mode++) {
        long total = 0;
        for (long fail = 1;; fail++) {
            test_alloc_state st = {.fail_at = fail};
            tern_allocator a = test_failing_allocator(&st);
            tern_qmodel_options qo = {.height = 32, .width = 32, .max_batch = 2, .alloc = &a};
            if (mode > 0) { /* and the fixed mode's multipliers, built and then loaded */
                qo.observer = TERN_QUANT_OBSERVER_ENTROPY;
                qo.fp32_layers = 2;
                qo.requant = TERN_REQUANT_FIXED;
            }
            tern_qmodel *q = NULL;
            tern_status s;
            if (mode == 2) {
                tern_qmodel_load_options lo = {.max_batch = 2, .alloc = &a};
                s = tern_qmodel_load_file(path, &lo, &q, &err);
            } else {
                s = tern_qmodel_create(m, x, 2, &qo, &q, &err);
            }
            if (s == TERN_OK) {
                st.fail_at = 0; /* what follows is not under test */
                if (mode == 1)
                    assert_int_equal(tern_qmodel_save_file(q, NULL, path, &err), TERN_OK);
                float logits[2 * 3];
                assert_int_equal(tern_qmodel_forward(q, logits, x, 2), TERN_OK);
                tern_qmodel_destroy(&q);
                assert_int_equal(st.live, 0);
                total = fail;
                break;
            }
            assert_true(s == TERN_ERR_NOMEM || s == TERN_ERR_THREAD);
            assert_null(q);
            assert_int_equal(st.live, 0);
        }
        assert_true(total > 10);
    }
    remove(path);
    rmdir(dir);
    tern_model_destroy(&m);
}

/* ---- the shipped Fashion-MNIST model --------------------------------------------------------- */

#define FASHION_DIR "/usr/share/datasets/fashion-mnist"
#define CALIB 256
#define TEST 1000

/* n images of ds (every `stride`-th from `first`) through the model's evaluation transform. */
static float *load_images(const tern_dataset *ds, const tern_transform *t, size_t first,
                          size_t stride, int n, int32_t *labels)
{
    size_t image = (size_t)t->size * t->size * t->channels;
    float *x = xcalloc((size_t)n * image, sizeof(float));
    tern_error err = {{0}};
    for (int i = 0; i < n; i++) {
        size_t idx = first + (size_t)i * stride;
        tern_image img = {0};
        assert_int_equal(tern_dataset_image(ds, idx, NULL, &img, &err), TERN_OK);
        assert_int_equal(tern_transform_apply(t, &img, NULL, x + (size_t)i * image), TERN_OK);
        tern_image_free(NULL, &img);
        if (labels)
            labels[i] = tern_dataset_label(ds, idx);
    }
    return x;
}

static int argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        best = x[i] > x[best] ? i : best;
    return best;
}

/* ---- files ---------------------------------------------------------------------------------- */

static tern_model *random_small_model(void)
{
    tern_model_options mo = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    mo.num_classes = 10;
    mo.in_channels = 3;
    mo.seed = 5;
    tern_model *m = NULL;
    tern_error err = {{0}};
    assert_int_equal(tern_model_create(&mo, &m, &err), TERN_OK);
    test_rng r = {23};
    for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(m, i);
        if (strstr(t->name, "running_mean"))
            test_fill_uniform(&r, t->data, t->count, -0.2f, 0.2f);
        else if (strstr(t->name, "running_var"))
            test_fill_uniform(&r, t->data, t->count, 0.5f, 2.0f);
    }
    tern_model_invalidate(m);
    return m;
}

/* A copy of the file at src written to dst with metadata key `key` replaced by `value` (key
 * NULL: unchanged; value NULL: the key left out) and tensor `drop` left out (NULL: none). */
static void rewrite_file(const char *src, const char *dst, const char *key, const char *value,
                         const char *drop)
{
    tern_error err = {{0}};
    tern_safetensors *st = NULL;
    tern_safetensors_writer *w = NULL;
    assert_int_equal(tern_safetensors_open(src, NULL, &st, &err), TERN_OK);
    assert_int_equal(tern_safetensors_writer_create(NULL, &w), TERN_OK);
    for (size_t i = 0; i < tern_safetensors_metadata_count(st); i++) {
        const char *k, *v;
        assert_int_equal(tern_safetensors_metadata_at(st, i, &k, &v), TERN_OK);
        if (key && !value && !strcmp(k, key))
            continue;
        assert_int_equal(tern_safetensors_writer_set_metadata(
                             w, k, key && !strcmp(k, key) ? value : v),
                         TERN_OK);
    }
    for (size_t i = 0; i < tern_safetensors_count(st); i++) {
        tern_tensor_view t;
        assert_int_equal(tern_safetensors_get(st, i, &t), TERN_OK);
        if (drop && !strcmp(t.name, drop))
            continue;
        assert_int_equal(tern_safetensors_writer_add(w, t.name, t.dtype, t.ndim, t.shape, t.data),
                         TERN_OK);
    }
    assert_int_equal(tern_safetensors_writer_write(w, dst, &err), TERN_OK);
    tern_safetensors_writer_destroy(&w);
    tern_safetensors_close(&st);
}

/* A string with the first occurrence of `from` in s replaced by `to` (malloc'd). */
static char *replace_once(const char *s, const char *from, const char *to)
{
    const char *at = strstr(s, from);
    assert_non_null(at);
    size_t n = strlen(s) - strlen(from) + strlen(to) + 1;
    char *out = xcalloc(n, 1);
    memcpy(out, s, (size_t)(at - s));
    strcat(out, to);
    strcat(out, at + strlen(from));
    return out;
}

static void qmodel_file_roundtrip(void **state)
{
    (void)state;
    tern_model *m = random_small_model();
    tern_error err = {{0}};
    const int n = 8, size = 32;
    size_t image = (size_t)size * size * 3;
    test_rng r = {29};
    float *x = xcalloc((size_t)n * image, sizeof(float));
    test_fill_uniform(&r, x, (size_t)n * image, -2, 2);
    char dir[] = "/tmp/tern_test_qfile.XXXXXX", path[128], bad[128], fpath[128];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/q.safetensors", dir);
    snprintf(bad, sizeof bad, "%s/bad.safetensors", dir);
    snprintf(fpath, sizeof fpath, "%s/f.safetensors", dir);
    const struct {
        tern_quant_observer observer;
        int fp32_layers;
        bool sensitivity;
        tern_requant_mode requant;
    } cases[] = {{TERN_QUANT_OBSERVER_MINMAX, 0, false, TERN_REQUANT_FLOAT},
                 {TERN_QUANT_OBSERVER_ENTROPY, 3, false, TERN_REQUANT_FIXED},
                 {TERN_QUANT_OBSERVER_PERCENTILE, 0, true, TERN_REQUANT_FLOAT},
                 {TERN_QUANT_OBSERVER_MINMAX, 0, false, TERN_REQUANT_FIXED}};
    float ref_minmax[4 * 10]; /* case 0's logits */
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        tern_qmodel_options qo = {.height = size, .width = size, .max_batch = 4,
                                  .observer = cases[c].observer,
                                  .fp32_layers = cases[c].fp32_layers,
                                  .sensitivity = cases[c].sensitivity,
                                  .requant = cases[c].requant};
        tern_qmodel *q = NULL, *l = NULL;
        assert_int_equal(tern_qmodel_create(m, x, n, &qo, &q, &err), TERN_OK);
        int nfp32 = 0, measured = 0;
        for (size_t i = 0; i < tern_qmodel_op_count(q); i++) {
            tern_qop_info info;
            assert_int_equal(tern_qmodel_op_info(q, i, &info), TERN_OK);
            nfp32 += info.fp32;
            measured += info.sensitivity >= 0;
            if (info.sensitivity >= 0) {
                assert_true(info.has_weights);
                assert_true(info.agreement >= 0 && info.agreement <= 1);
            }
        }
        assert_int_equal(nfp32, cases[c].fp32_layers);
        if (cases[c].fp32_layers || cases[c].sensitivity)
            assert_true(measured > 40);
        else
            assert_int_equal(measured, 0);
        float ref[4 * 10], got[4 * 10];
        assert_int_equal(tern_qmodel_forward(q, ref, x, 4), TERN_OK);
        tern_model_info info = {.input_size = size, .mean = {0.5f, 0.5f, 0.5f},
                                .std = {0.25f, 0.25f, 0.25f}};
        assert_int_equal(tern_qmodel_save_file(q, &info, path, &err), TERN_OK);
        tern_qmodel_load_options lo = {.max_batch = 4};
        tern_status s = tern_qmodel_load_file(path, &lo, &l, &err);
        if (s != TERN_OK)
            print_error("%s\n", err.message);
        assert_int_equal(s, TERN_OK);
        assert_int_equal(tern_qmodel_forward(l, got, x, 4), TERN_OK);
        assert_memory_equal(got, ref, sizeof ref); /* the same bits */
        assert_int_equal(tern_qmodel_requant(l), cases[c].requant);
        if (c == 0)
            memcpy(ref_minmax, ref, sizeof ref);
        int h, w, ch, k;
        tern_qmodel_shape(l, &h, &w, &ch, &k);
        assert_true(h == size && w == size && ch == 3 && k == 10);
        /* the float readers understand its metadata */
        tern_safetensors *st = NULL;
        assert_int_equal(tern_safetensors_open(path, NULL, &st, &err), TERN_OK);
        assert_true(tern_qmodel_file_is_quantized(st));
        tern_model_info back = {0};
        assert_int_equal(tern_model_info_read(st, &back, &err), TERN_OK);
        assert_int_equal(back.input_size, size);
        tern_model_info_free(&back);
        const char *requant = tern_safetensors_metadata(st, "requant");
        assert_non_null(requant);
        assert_string_equal(requant, tern_requant_mode_name(cases[c].requant));
        if (c == 3) {
            /* a fixed file, its "requant" key removed, loads as float (as files written before
             * the key): the same bits as the float model from the same calibration */
            tern_qmodel *b = NULL;
            rewrite_file(path, bad, "requant", NULL, NULL);
            assert_int_equal(tern_qmodel_load_file(bad, &lo, &b, &err), TERN_OK);
            assert_int_equal(tern_qmodel_requant(b), TERN_REQUANT_FLOAT);
            assert_int_equal(tern_qmodel_forward(b, got, x, 4), TERN_OK);
            assert_memory_equal(got, ref_minmax, sizeof ref_minmax);
            assert_memory_not_equal(got, ref, sizeof ref);
            tern_qmodel_destroy(&b);
            rewrite_file(path, bad, "requant", "fp16", NULL);
            assert_int_equal(tern_qmodel_load_file(bad, &lo, &b, &err), TERN_ERR_FORMAT);
            assert_null(b);
        }
        /* malformed graphs and tensors are refused with TERN_ERR_FORMAT */
        const char *graph = tern_safetensors_metadata(st, "graph");
        assert_non_null(graph);
        const char *mutations[][2] = {{"\"in\":0", "\"in\":9999"}, {"\"in\":0", "\"in\":-1"},
                                      {"\"kind\":\"conv\"", "\"kind\":\"deconv\""},
                                      {"\"k\":3", "\"k\":5"}, {"\"version\":1", "\"version\":2"},
                                      {"\"ops\":[", "\"ops\":[1,"}, {"\"height\":32", "\"height\":3"},
                                      {"\"cout\":16", "\"cout\":17"}};
        for (size_t i = 0; c == 0 && i < sizeof mutations / sizeof *mutations; i++) {
            char *g = replace_once(graph, mutations[i][0], mutations[i][1]);
            rewrite_file(path, bad, "graph", g, NULL);
            tern_qmodel *b = NULL;
            s = tern_qmodel_load_file(bad, &lo, &b, &err);
            if (s != TERN_ERR_FORMAT)
                print_error("mutation %s -> %s: %d\n", mutations[i][0], mutations[i][1], s);
            assert_int_equal(s, TERN_ERR_FORMAT);
            assert_null(b);
            free(g);
        }
        if (c == 0) {
            tern_qmodel *b = NULL;
            rewrite_file(path, bad, NULL, NULL, "op.3.weight_scale");
            assert_int_equal(tern_qmodel_load_file(bad, &lo, &b, &err), TERN_ERR_FORMAT);
            rewrite_file(path, bad, NULL, NULL, "values.scale");
            assert_int_equal(tern_qmodel_load_file(bad, &lo, &b, &err), TERN_ERR_FORMAT);
            rewrite_file(path, bad, "format", "tern", NULL);
            assert_int_equal(tern_qmodel_load_file(bad, &lo, &b, &err), TERN_ERR_FORMAT);
            assert_null(b);
            /* at least 3.5x smaller than the float file */
            assert_int_equal(tern_model_save_file(m, NULL, fpath, &err), TERN_OK);
            FILE *fq = fopen(path, "rb"), *ff = fopen(fpath, "rb");
            assert_non_null(fq);
            assert_non_null(ff);
            fseek(fq, 0, SEEK_END);
            fseek(ff, 0, SEEK_END);
            long bq = ftell(fq), bf = ftell(ff);
            fclose(fq);
            fclose(ff);
            assert_true((double)bf / (double)bq >= 3.5);
        }
        tern_safetensors_close(&st);
        tern_qmodel_destroy(&q);
        tern_qmodel_destroy(&l);
    }
    remove(path);
    remove(bad);
    remove(fpath);
    rmdir(dir);
    free(x);
    tern_model_destroy(&m);
}

static void fashion_mnist_agreement(void **state)
{
    (void)state;
    char path[1024];
    snprintf(path, sizeof path, "%s/../../weights/fashion-mnist-small.safetensors",
             test_fixture_dir());
    tern_error err = {{0}};
    tern_safetensors *st = NULL;
    if (tern_safetensors_open(path, NULL, &st, &err) != TERN_OK) {
        print_error("%s\n", err.message);
        fail();
    }
    tern_model_options mo = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    assert_int_equal(tern_model_options_from_metadata(st, &mo, &err), TERN_OK);
    tern_model *m = NULL;
    assert_int_equal(tern_model_create(&mo, &m, &err), TERN_OK);
    assert_int_equal(tern_model_load_state(m, st, "", &err), TERN_OK);
    tern_model_info info = {0};
    assert_int_equal(tern_model_info_read(st, &info, &err), TERN_OK);
    tern_safetensors_close(&st);
    /* the evaluation transform `tern eval` uses for this model */
    tern_transform t = {.size = info.input_size, .channels = mo.in_channels,
                        .resize = info.resize};
    for (int c = 0; c < 3; c++) {
        t.mean[c] = info.mean[c];
        t.std[c] = info.std[c] != 0 ? info.std[c] : 1;
    }
    assert_int_equal(t.size, 32);

    tern_dataset *train = NULL, *test = NULL;
    assert_int_equal(tern_dataset_open_fashion_mnist(FASHION_DIR, true, NULL, &train, &err), TERN_OK);
    assert_int_equal(tern_dataset_open_fashion_mnist(FASHION_DIR, false, NULL, &test, &err), TERN_OK);
    float *calib = load_images(train, &t, 7, tern_dataset_size(train) / CALIB, CALIB, NULL);
    int32_t labels[TEST];
    float *x = load_images(test, &t, 0, tern_dataset_size(test) / TEST, TEST, labels);

    assert_int_equal(tern_model_plan(m, 100, 32, 32, false), TERN_OK);
    const int k = mo.num_classes;
    float *lf = xcalloc((size_t)100 * k, sizeof(float)), *lq = xcalloc((size_t)100 * k, sizeof(float));
    int pred_f[TEST], pred_q[2][TEST], right_f = 0;
    size_t image = (size_t)32 * 32 * mo.in_channels;
    for (int b = 0; b < TEST; b += 100) {
        assert_int_equal(tern_model_forward(m, lf, x + (size_t)b * image, 100, false), TERN_OK);
        for (int i = 0; i < 100; i++) {
            pred_f[b + i] = argmax(lf + (size_t)i * k, k);
            right_f += pred_f[b + i] == labels[b + i];
        }
    }
    /* both requantization modes track fp32 to the same bounds */
    for (int mode = TERN_REQUANT_FLOAT; mode <= TERN_REQUANT_FIXED; mode++) {
        tern_qmodel_options qo = {.height = 32, .width = 32, .max_batch = 100, .calib_batch = 64,
                                  .requant = (tern_requant_mode)mode};
        tern_qmodel *q = NULL;
        tern_status s = tern_qmodel_create(m, calib, CALIB, &qo, &q, &err);
        if (s != TERN_OK)
            print_error("%s\n", err.message);
        assert_int_equal(s, TERN_OK);
        int agree = 0, right_q = 0;
        for (int b = 0; b < TEST; b += 100) {
            assert_int_equal(tern_qmodel_forward(q, lq, x + (size_t)b * image, 100), TERN_OK);
            for (int i = 0; i < 100; i++) {
                int pq = pred_q[mode][b + i] = argmax(lq + (size_t)i * k, k);
                agree += pred_f[b + i] == pq;
                right_q += pq == labels[b + i];
            }
        }
        print_message("int8 (%s requantization) vs fp32 top-1 agreement %.1f%% on %d test "
                      "images; accuracy fp32 %.1f%%, int8 %.1f%% (%s)\n",
                      tern_requant_mode_name((tern_requant_mode)mode), 100.0 * agree / TEST, TEST,
                      100.0 * right_f / TEST, 100.0 * right_q / TEST,
                      tern_qisa_name(tern_qmodel_isa(q)));
        assert_true(agree >= TEST * 94 / 100);
        assert_true(right_q >= right_f - TEST * 25 / 1000);
        tern_qmodel_destroy(&q);
    }
    /* and each other: the modes differ only in last-bit roundings */
    int same = 0;
    for (int i = 0; i < TEST; i++)
        same += pred_q[0][i] == pred_q[1][i];
    print_message("float and fixed requantization agree on %.1f%%\n", 100.0 * same / TEST);
    assert_true(same >= TEST * 97 / 100);
    free(lf);
    free(lq);
    free(x);
    free(calib);
    tern_dataset_close(&train);
    tern_dataset_close(&test);
    tern_model_info_free(&info);
    tern_model_destroy(&m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(srdhm_cases),
        cmocka_unit_test(rdivpot_cases),
        cmocka_unit_test(mbqm_cases),
        cmocka_unit_test(requant_cases),
        cmocka_unit_test(requant_fixed_cases),
        cmocka_unit_test(multiplier_cases),
        cmocka_unit_test(choose_params_cases),
        cmocka_unit_test(lut_cases),
        cmocka_unit_test(qgemm_matches_reference),
        cmocka_unit_test(conv_im2col_matches_direct),
        cmocka_unit_test(qdwconv_matches_reference),
        cmocka_unit_test(elementwise_match_reference),
        cmocka_unit_test(add_hand_case),
        cmocka_unit_test(gate_hand_case),
        cmocka_unit_test(qmodel_levels_agree),
        cmocka_unit_test(qmodel_rejects_bad_input),
        cmocka_unit_test(qmodel_allocation_failures),
        cmocka_unit_test(qmodel_file_roundtrip),
        cmocka_unit_test(fashion_mnist_agreement),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
