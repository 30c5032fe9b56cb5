/* AVX-512 pieces shared by the integer kernels (nn/qgemm.c, nn/qops.c): the two
 * requantizations of tern_requant (single precision: convert, multiply, clamp, convert with
 * rounding to nearest even, zero point; fixed point: TFLite's MultiplyByQuantizedMultiplier on
 * 64-bit products), the 256-entry tables, vpdpbusd updating its accumulator in place.
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
    __m512i lo32, hi32;   /* fixed point: the bounds less the zero point as int32 */
    __m512i qmax16;       /* requantx64: the upper bound as int16 */
} rqf16;

T_VNNI QINLINE rqf16 rqf16_make(const tern_requant *rq)
{
    return (rqf16){_mm512_set1_ps((float)(rq->qmin - rq->out_zp)),
                   _mm512_set1_ps((float)(rq->qmax - rq->out_zp)), _mm512_set1_epi32(rq->out_zp),
                   _mm512_set1_epi16((int16_t)rq->out_zp), _mm512_set1_epi16((int16_t)rq->qmin),
                   _mm512_set1_epi32(rq->qmin - rq->out_zp),
                   _mm512_set1_epi32(rq->qmax - rq->out_zp),
                   _mm512_set1_epi16((int16_t)rq->qmax)};
}

/* A fixed-point multiplier and shift per lane (tern_quant_mbqm's), in the forms the vector
 * code uses, made once per block of channels. */
typedef struct rqx16 {
    __m512i mult, mult_odd;  /* the multipliers; the odd lanes' moved to the even ones */
    __m512i left, right;     /* max(shift, 0), max(-shift, 0) */
    __m512i lo, hi;          /* INT32_MIN >> left, INT32_MAX >> left: no overflow in between */
    __m512i rmask, rhalf;    /* 2^right - 1 and its half, for the rounding shift */
} rqx16;

T_VNNI QINLINE rqx16 rqx16_make(__m512i mult, __m512i shift)
{
    const __m512i zero = _mm512_setzero_si512();
    __m512i left = _mm512_max_epi32(shift, zero), right = _mm512_sub_epi32(left, shift);
    __m512i rmask = _mm512_sub_epi32(_mm512_sllv_epi32(_mm512_set1_epi32(1), right),
                                     _mm512_set1_epi32(1));
    return (rqx16){mult, _mm512_srli_epi64(mult, 32), left, right,
                   _mm512_srav_epi32(_mm512_set1_epi32(INT32_MIN), left),
                   _mm512_srav_epi32(_mm512_set1_epi32(INT32_MAX), left), rmask,
                   _mm512_srli_epi32(rmask, 1)};
}

/* The multipliers and shifts of channels [c, c + 16) of rq (lanes past m: 0 and 0). */
T_VNNI QINLINE rqx16 rqx16_load(const tern_requant *rq, size_t c, __mmask16 m)
{
    return rqx16_make(_mm512_maskz_loadu_epi32(m, rq->multiplier + c),
                      _mm512_maskz_loadu_epi32(m, rq->shift + c));
}

/* tern_quant_mbqm per lane, for multipliers in [2^30, 2^31) or 0 with shift 0, when the result
 * is then clamped to the int8 range. left: some lane may shift left (a multiplier of 1 or
 * more; never seen in a trained network, so the vector paths without are the ones that run);
 * where the left shift of x would saturate, x is clamped first instead (|x << left| stays
 * >= 2^30 - 2^left, the product beyond any int8 bound either way).
 * SaturatingRoundingDoublingHighMul of nonnegative multipliers is (x m + 2^30) >> 31 (floor;
 * nothing saturates): vpmuldq gives the 64-bit products of the even lanes, and of the odd ones
 * moved down; bits 31..62 of each sum are the result (the even lanes' shifted down to their
 * low half, the odd lanes' doubled into their high half). RoundingDivideByPOT: x >> right plus
 * one where the remainder exceeds half (half + 1 for negative x). */
T_VNNI QINLINE __m512i mbqm16(__m512i x, const rqx16 *p, const bool left)
{
    const __m512i nudge = _mm512_set1_epi64((int64_t)1 << 30);
    if (left)
        x = _mm512_sllv_epi32(_mm512_min_epi32(_mm512_max_epi32(x, p->lo), p->hi), p->left);
    __m512i even = _mm512_add_epi64(_mm512_mul_epi32(x, p->mult), nudge);
    /* the odd lanes moved down by a shuffle (port 5) rather than a shift (port 0, which the
     * multiplies and vpdpbusd also need) */
    __m512i odd = _mm512_add_epi64(
        _mm512_mul_epi32(_mm512_shuffle_epi32(x, _MM_PERM_DDBB), p->mult_odd), nudge);
    __m512i s = _mm512_mask_blend_epi32((__mmask16)0xAAAA, _mm512_srli_epi64(even, 31),
                                        _mm512_add_epi64(odd, odd));
    __m512i q = _mm512_srav_epi32(s, p->right);
    __m512i threshold = _mm512_add_epi32(p->rhalf, _mm512_srli_epi32(s, 31));
    __mmask16 up = _mm512_cmpgt_epi32_mask(_mm512_and_si512(s, p->rmask), threshold);
    return _mm512_mask_sub_epi32(q, up, q, _mm512_set1_epi32(-1));
}

/* tern_requant_one's fixed mode on 16 accumulators: int32 lanes, clamped, zero point added. */
T_VNNI QINLINE __m512i requantx16_i32(__m512i acc, const rqx16 *p, const rqf16 *r, const bool left)
{
    __m512i v = _mm512_min_epi32(_mm512_max_epi32(mbqm16(acc, p, left), r->lo32), r->hi32);
    return _mm512_add_epi32(v, r->zp);
}

/* The fixed mode on 64 accumulators (four vectors of 16 channels) into 64 bytes in channel
 * order, clamped by saturating packs as requantf64 (int16 bounds on both sides). */
T_VNNI QINLINE __m512i requantx64(const __m512i acc[4], const rqx16 p[4], const rqf16 *r,
                                  const bool left)
{
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    __m512i q[4];
    for (int v = 0; v < 4; v++)
        q[v] = mbqm16(acc[v], &p[v], left);
    __m512i h0 = _mm512_adds_epi16(_mm512_packs_epi32(q[0], q[1]), r->zp16);
    __m512i h1 = _mm512_adds_epi16(_mm512_packs_epi32(q[2], q[3]), r->zp16);
    h0 = _mm512_min_epi16(_mm512_max_epi16(h0, r->qmin16), r->qmax16);
    h1 = _mm512_min_epi16(_mm512_max_epi16(h1, r->qmin16), r->qmax16);
    return _mm512_permutexvar_epi32(order, _mm512_packs_epi16(h0, h1));
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

/* The requantization path of a kernel, a template parameter of its inner blocks. */
enum { RQ_FLOAT, RQ_FIXED, RQ_FIXED_LEFT };

static inline int rq_kind(const tern_requant *rq, size_t C)
{
    if (rq->mode != TERN_REQUANT_FIXED)
        return RQ_FLOAT;
    return tern_requant_left(rq, C) ? RQ_FIXED_LEFT : RQ_FIXED;
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

/* 16 accumulators to 16 int8 in the fixed mode (through the table when lut is not NULL). */
T_VNNI QINLINE __m128i requantx16(__m512i acc, const rqx16 *p, const rqf16 *r, const __m512i *lut,
                                  const bool left)
{
    __m128i b = _mm512_cvtepi32_epi8(requantx16_i32(acc, p, r, left));
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
