/* AVX-512 pieces shared by the integer kernels (nn/qgemm.c, nn/qops.c): the single-precision
 * requantization of tern_requant (convert, multiply, clamp, convert with rounding to nearest
 * even, zero point), the 256-entry tables, vpdpbusd updating its accumulator in place.
 * Internal; include from x86 code only. */
#ifndef TERN_QSIMD512_H
#define TERN_QSIMD512_H

#include <immintrin.h>

#include "qkernels.h"

#define T_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512vbmi")))
#define QINLINE static inline __attribute__((always_inline))

static inline __mmask16 q_tail_mask16(size_t n)
{
    return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
}

/* acc += dot4(a as unsigned bytes, b as signed bytes) per 32-bit lane (vpdpbusd), updating
 * the lvalue acc in place: with the intrinsic, which returns a new value, GCC 12 copies every
 * accumulator of an unrolled tile to another register and back around each instruction. */
#define DPBUSD(acc, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))

/* tern_requant's bounds and zero point as vectors. */
typedef struct rqf16 {
    __m512 lo, hi;
    __m512i zp;
    __m512i zp16, qmin16; /* for requantf64: the zero point and lower bound as int16 */
} rqf16;

T_VNNI QINLINE rqf16 rqf16_make(const tern_requant *rq)
{
    return (rqf16){_mm512_set1_ps((float)(rq->qmin - rq->out_zp)),
                   _mm512_set1_ps((float)(rq->qmax - rq->out_zp)), _mm512_set1_epi32(rq->out_zp),
                   _mm512_set1_epi16((int16_t)rq->out_zp), _mm512_set1_epi16((int16_t)rq->qmin)};
}

/* tern_requant_one on 16 accumulators with their channels' scales: int32 lanes. The
 * conversions round to nearest even (the default MXCSR mode), as tern_requant_one does. */
T_VNNI QINLINE __m512i requantf16_i32(__m512i acc, __m512 scale, const rqf16 *r)
{
    __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), scale);
    x = _mm512_min_ps(_mm512_max_ps(x, r->lo), r->hi);
    return _mm512_add_epi32(_mm512_cvtps_epi32(x), r->zp);
}

/* tern_requant_one on 64 accumulators (four vectors of 16 channels, their scales in sv) into
 * 64 bytes in channel order. The saturating packs do the clamping: in float only the upper
 * bound (so that the conversion cannot overflow), then int32 -> int16 saturating, the zero
 * point added with int16 saturation, the lower bound (a fused ReLU's) as an int16 max, and
 * int16 -> int8 saturating; the packs interleave 128-bit lanes, one dword permute puts them
 * back. The same bits as clamping first: the bounds are integers and every step is monotonic. */
T_VNNI QINLINE __m512i requantf64(const __m512i acc[4], const __m512 sv[4], const rqf16 *r)
{
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    __m512i q[4];
    for (int v = 0; v < 4; v++)
        q[v] = _mm512_cvtps_epi32(
            _mm512_min_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[v]), sv[v]), r->hi));
    __m512i h0 = _mm512_adds_epi16(_mm512_packs_epi32(q[0], q[1]), r->zp16);
    __m512i h1 = _mm512_adds_epi16(_mm512_packs_epi32(q[2], q[3]), r->zp16);
    h0 = _mm512_max_epi16(h0, r->qmin16);
    h1 = _mm512_max_epi16(h1, r->qmin16);
    return _mm512_permutexvar_epi32(order, _mm512_packs_epi16(h0, h1));
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

/* tern_quantize's constants as vectors. */
typedef struct q16 {
    __m512 inv, half, lo, hi;
    __m512i zp;
} q16;

T_VNNI QINLINE q16 q16_make(tern_qparams p)
{
    return (q16){_mm512_set1_ps(1.0f / p.scale), _mm512_set1_ps(0.5f),
                 _mm512_set1_ps(-128.0f - (float)p.zero_point),
                 _mm512_set1_ps(127.0f - (float)p.zero_point), _mm512_set1_epi32(p.zero_point)};
}

/* tern_quantize on 16 floats: int32 lanes in [-128, 127]. roundf(x * inv) is truncation plus
 * a correction when the (exact) fraction is >= 1/2. */
T_VNNI QINLINE __m512i quantize16(__m512 x, const q16 *c)
{
    __m512 v = _mm512_mul_ps(x, c->inv);
    __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m512 frac = _mm512_abs_ps(_mm512_sub_ps(v, t));
    __mmask16 up = _mm512_cmp_ps_mask(frac, c->half, _CMP_GE_OQ);
    /* t +- 1, toward v's sign (a zero t with frac >= 1/2 has v's sign too) */
    __m512 one = _mm512_or_ps(_mm512_set1_ps(1.0f), _mm512_and_ps(v, _mm512_set1_ps(-0.0f)));
    __m512 r = _mm512_mask_add_ps(t, up, t, one);
    r = _mm512_min_ps(_mm512_max_ps(r, c->lo), c->hi);
    r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_setzero_ps());
    return _mm512_add_epi32(_mm512_cvttps_epi32(r), c->zp);
}

#endif
