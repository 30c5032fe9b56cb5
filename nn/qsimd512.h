/* AVX-512 requantization shared by the integer kernels (nn/qgemm.c, nn/qops.c).
 *
 * Convolutions and fully connected layers: the single-precision requantization of
 * tern_requant (convert, multiply, clamp, convert with rounding to nearest even, zero point),
 * then an optional 256-entry table.
 *
 * Residual add and gate (TFLite's ADD and MUL): MultiplyByQuantizedMultiplier on 16 int32
 * lanes, bit-identical to tern_quant_mbqm for multipliers >= 0, then zero point and clamp.
 *
 * The two roundings of MultiplyByQuantizedMultiplier (the doubling high multiply's
 * (p + 2^30) >> 31 of the 64-bit product p, then the rounding right shift by rs, ties away from
 * zero) are folded into one 64-bit add and shift, which the integers allow exactly:
 *   floor((floor((p + 2^30) / 2^31) + c) / 2^rs) = floor((p + 2^30 + c 2^31) / 2^(31 + rs))
 * with c = 2^(rs-1) - [h < 0] for rs > 0 (0 for rs = 0), and h < 0 exactly when p < -2^30.
 * Internal; include from x86 code only. */
#ifndef TERN_QSIMD512_H
#define TERN_QSIMD512_H

#include <immintrin.h>
#include <stdbool.h>

#include "qkernels.h"

#define T_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512vbmi")))
#define QINLINE static inline __attribute__((always_inline))

static inline __mmask16 q_tail_mask16(size_t n)
{
    return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
}

/* Requantization constants of 16 channels; even and odd channels in separate 64-bit lanes. */
typedef struct rq16 {
    __m512i mult, mult_odd;   /* multiplier (32-bit lanes); odd channels' in 64-bit lanes */
    __m512i ls;               /* left shift */
    bool any_ls;
    __m512i k_even, k_odd;    /* 2^30 + 2^(rs-1) 2^31 */
    __m512i neg_even, neg_odd; /* 2^31 where rs > 0, else 0 */
    __m512i sh_even, sh_odd;  /* 31 + rs */
    __m512i lo, hi, zp;       /* clamp bounds minus the zero point, and the zero point */
} rq16;

T_VNNI QINLINE rq16 rq16_make(__m512i mult, __m512i shift, int32_t zp, int32_t qmin,
                              int32_t qmax)
{
    const __m512i zero = _mm512_setzero_si512();
    __m512i rs = _mm512_max_epi32(_mm512_sub_epi32(zero, shift), zero);
    __m512i rs_even = _mm512_maskz_mov_epi32((__mmask16)0x5555, rs);
    __m512i rs_odd = _mm512_srli_epi64(rs, 32);
    const __m512i one = _mm512_set1_epi64(1), half = _mm512_set1_epi64((int64_t)1 << 30);
    const __m512i two31 = _mm512_set1_epi64((int64_t)1 << 31), s31 = _mm512_set1_epi64(31);
    rq16 r;
    r.mult = mult;
    r.mult_odd = _mm512_srli_epi64(mult, 32);
    r.ls = _mm512_max_epi32(shift, zero);
    r.any_ls = _mm512_cmpgt_epi32_mask(shift, zero) != 0;
    r.k_even = _mm512_add_epi64(
        half, _mm512_slli_epi64(_mm512_srli_epi64(_mm512_sllv_epi64(one, rs_even), 1), 31));
    r.k_odd = _mm512_add_epi64(
        half, _mm512_slli_epi64(_mm512_srli_epi64(_mm512_sllv_epi64(one, rs_odd), 1), 31));
    r.neg_even = _mm512_maskz_mov_epi64(_mm512_cmpgt_epi64_mask(rs_even, zero), two31);
    r.neg_odd = _mm512_maskz_mov_epi64(_mm512_cmpgt_epi64_mask(rs_odd, zero), two31);
    r.sh_even = _mm512_add_epi64(rs_even, s31);
    r.sh_odd = _mm512_add_epi64(rs_odd, s31);
    r.lo = _mm512_set1_epi32(qmin - zp);
    r.hi = _mm512_set1_epi32(qmax - zp);
    r.zp = _mm512_set1_epi32(zp);
    return r;
}

/* One multiplier and shift for all lanes. */
T_VNNI QINLINE rq16 rq16_uniform(int32_t mult, int shift, int32_t zp, int32_t qmin, int32_t qmax)
{
    return rq16_make(_mm512_set1_epi32(mult), _mm512_set1_epi32(shift), zp, qmin, qmax);
}

/* acc += dot4(a as unsigned bytes, b as signed bytes) per 32-bit lane (vpdpbusd), updating
 * the lvalue acc in place: with the intrinsic, which returns a new value, GCC 12 copies every
 * accumulator of an unrolled tile to another register and back around each instruction. */
#define DPBUSD(acc, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))

/* tern_requant's bounds and zero point as vectors. */
typedef struct rqf16 {
    __m512 lo, hi;
    __m512i zp;
} rqf16;

T_VNNI QINLINE rqf16 rqf16_make(const tern_requant *rq)
{
    return (rqf16){_mm512_set1_ps((float)(rq->qmin - rq->out_zp)),
                   _mm512_set1_ps((float)(rq->qmax - rq->out_zp)), _mm512_set1_epi32(rq->out_zp)};
}

/* tern_requant_one on 16 accumulators with their channels' scales: int32 lanes. The
 * conversions round to nearest even (the default MXCSR mode), as tern_requant_one does. */
T_VNNI QINLINE __m512i requantf16_i32(__m512i acc, __m512 scale, const rqf16 *r)
{
    __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), scale);
    x = _mm512_min_ps(_mm512_max_ps(x, r->lo), r->hi);
    return _mm512_add_epi32(_mm512_cvtps_epi32(x), r->zp);
}

/* MultiplyByQuantizedMultiplier. */
T_VNNI QINLINE __m512i mbqm16(__m512i x, const rq16 *r)
{
    if (r->any_ls) { /* left shift saturating to int32 */
        __m512i hi = _mm512_srav_epi32(_mm512_set1_epi32(INT32_MAX), r->ls);
        __m512i lo = _mm512_srav_epi32(_mm512_set1_epi32(INT32_MIN), r->ls);
        __mmask16 over = _mm512_cmpgt_epi32_mask(x, hi), under = _mm512_cmplt_epi32_mask(x, lo);
        x = _mm512_sllv_epi32(x, r->ls);
        x = _mm512_mask_mov_epi32(x, over, _mm512_set1_epi32(INT32_MAX));
        x = _mm512_mask_mov_epi32(x, under, _mm512_set1_epi32(INT32_MIN));
    }
    const __m512i lim = _mm512_set1_epi64(-((int64_t)1 << 30));
    __m512i pe = _mm512_mul_epi32(x, r->mult);
    __m512i po = _mm512_mul_epi32(_mm512_srli_epi64(x, 32), r->mult_odd);
    __mmask8 ne = _mm512_cmplt_epi64_mask(pe, lim), no = _mm512_cmplt_epi64_mask(po, lim);
    pe = _mm512_mask_sub_epi64(_mm512_add_epi64(pe, r->k_even), ne,
                               _mm512_add_epi64(pe, r->k_even), r->neg_even);
    po = _mm512_mask_sub_epi64(_mm512_add_epi64(po, r->k_odd), no,
                               _mm512_add_epi64(po, r->k_odd), r->neg_odd);
    pe = _mm512_srav_epi64(pe, r->sh_even);
    po = _mm512_srav_epi64(po, r->sh_odd);
    return _mm512_mask_blend_epi32((__mmask16)0xaaaa, pe, _mm512_slli_epi64(po, 32));
}

/* mbqm16, then clamp and zero point: int32 lanes in [qmin, qmax]. */
T_VNNI QINLINE __m512i requant16_i32(__m512i acc, const rq16 *r)
{
    __m512i q = _mm512_min_epi32(_mm512_max_epi32(mbqm16(acc, r), r->lo), r->hi);
    return _mm512_add_epi32(q, r->zp);
}

/* lut[(uint8_t)b] for each byte: vpermi2b picks among 128 bytes by bits 0-6, bit 7 the half.
 * lut: the 256-byte table as four zmm. */
T_VNNI QINLINE __m512i lut512_apply(__m512i idx, const __m512i *lut)
{
    __m512i lo = _mm512_permutex2var_epi8(lut[0], idx, lut[1]);
    __m512i hi = _mm512_permutex2var_epi8(lut[2], idx, lut[3]);
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hi);
}

/* 16 accumulators to 16 int8 (through the table when lut is not NULL). */
T_VNNI QINLINE __m128i requantf16(__m512i acc, __m512 scale, const rqf16 *r, const __m512i *lut)
{
    __m128i b = _mm512_cvtepi32_epi8(requantf16_i32(acc, scale, r));
    if (lut)
        b = _mm512_castsi512_si128(lut512_apply(_mm512_castsi128_si512(b), lut));
    return b;
}

#endif
