/* Vector forms of the activations and their gradients, shared by every kernel that fuses an
 * activation (BatchNorm, the direct stem): one definition, so that all of them give the bits
 * tern_act_forward gives. Internal; include only from x86 code paths. */
#ifndef TERN_SIMD_ACT_H
#define TERN_SIMD_ACT_H

#include <immintrin.h>

#include "kernels.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define T512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define T256 __attribute__((target("avx2,fma")))

/* ---- AVX-512 ---------------------------------------------------------------------------- */

static inline __mmask16 tail16(size_t n)
{
    return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
}

/* x / d correctly rounded without vdivps (16+ cycles a vector): q0 = x * (1/d), then one
 * Newton step on the exact FMA residual. Checked against division for all 2^32 inputs, d = 3
 * and d = 6; zeros keep their sign by a blend, and the rare lanes where the residual is
 * inexact (|x| < 2^-100, |x| > 2^100, inf, NaN) fall back to division. */
T512 ALWAYS_INLINE __m512 div_exact16(__m512 x, float d)
{
    __m512 vd = _mm512_set1_ps(d), rd = _mm512_set1_ps(1.0f / d);
    __m512 q0 = _mm512_mul_ps(x, rd);
    __m512 q = _mm512_fmadd_ps(_mm512_fnmadd_ps(q0, vd, x), rd, q0);
    __m512 ax = _mm512_abs_ps(x);
    __mmask16 zero = _mm512_cmp_ps_mask(ax, _mm512_setzero_ps(), _CMP_EQ_OQ);
    __mmask16 odd = (_mm512_cmp_ps_mask(ax, _mm512_set1_ps(0x1p-100f), _CMP_LT_OQ) & ~zero) |
                    _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0x1p100f), _CMP_NLE_UQ);
    q = _mm512_mask_mov_ps(q, zero, x);
    if (odd)
        q = _mm512_mask_div_ps(q, odd, x, vd);
    return q;
}

T512 ALWAYS_INLINE __m512 act16(__m512 z, tern_act act)
{
    __m512 zero = _mm512_setzero_ps();
    __m512 t = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(z, _mm512_set1_ps(3)), zero),
                             _mm512_set1_ps(6));
    switch (act) {
    case TERN_ACT_NONE: return z;
    case TERN_ACT_RELU: return _mm512_max_ps(z, zero); /* max(NaN, 0) = 0, as z > 0 ? z : 0 */
    case TERN_ACT_HARDSWISH: return div_exact16(_mm512_mul_ps(z, t), 6);
    case TERN_ACT_HARDSIGMOID: return div_exact16(t, 6);
    }
    return z;
}

T512 ALWAYS_INLINE __m512 grad16(__m512 g, __m512 z, tern_act act)
{
    switch (act) {
    case TERN_ACT_NONE: return g;
    case TERN_ACT_RELU:
        return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GT_OQ), g);
    case TERN_ACT_HARDSWISH: {
        __m512 mid = _mm512_mul_ps(g, _mm512_add_ps(div_exact16(z, 3), _mm512_set1_ps(0.5f)));
        __m512 v = _mm512_mask_mov_ps(g, _mm512_cmp_ps_mask(z, _mm512_set1_ps(3), _CMP_LE_OQ),
                                      mid);
        return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, _mm512_set1_ps(-3), _CMP_NLT_UQ), v);
    }
    case TERN_ACT_HARDSIGMOID: {
        __mmask16 in = _mm512_cmp_ps_mask(z, _mm512_set1_ps(-3), _CMP_GT_OQ) &
                       _mm512_cmp_ps_mask(z, _mm512_set1_ps(3), _CMP_LT_OQ);
        return _mm512_maskz_mul_ps(in, g, _mm512_set1_ps(1.0f / 6));
    }
    }
    return g;
}

/* ---- AVX2 ------------------------------------------------------------------------------- */

/* As div_exact16, for 8 lanes. */
T256 ALWAYS_INLINE __m256 div_exact8(__m256 x, float d)
{
    __m256 vd = _mm256_set1_ps(d), rd = _mm256_set1_ps(1.0f / d);
    __m256 q0 = _mm256_mul_ps(x, rd);
    __m256 q = _mm256_fmadd_ps(_mm256_fnmadd_ps(q0, vd, x), rd, q0);
    __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
    __m256 zero = _mm256_cmp_ps(ax, _mm256_setzero_ps(), _CMP_EQ_OQ);
    __m256 odd = _mm256_or_ps(
        _mm256_andnot_ps(zero, _mm256_cmp_ps(ax, _mm256_set1_ps(0x1p-100f), _CMP_LT_OQ)),
        _mm256_cmp_ps(ax, _mm256_set1_ps(0x1p100f), _CMP_NLE_UQ));
    q = _mm256_blendv_ps(q, x, zero);
    if (_mm256_movemask_ps(odd))
        q = _mm256_blendv_ps(q, _mm256_div_ps(x, vd), odd);
    return q;
}

T256 ALWAYS_INLINE __m256 act8(__m256 z, tern_act act)
{
    __m256 zero = _mm256_setzero_ps();
    __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(z, _mm256_set1_ps(3)), zero),
                             _mm256_set1_ps(6));
    switch (act) {
    case TERN_ACT_NONE: return z;
    case TERN_ACT_RELU: return _mm256_max_ps(z, zero);
    case TERN_ACT_HARDSWISH: return div_exact8(_mm256_mul_ps(z, t), 6);
    case TERN_ACT_HARDSIGMOID: return div_exact8(t, 6);
    }
    return z;
}

T256 ALWAYS_INLINE __m256 grad8(__m256 g, __m256 z, tern_act act)
{
    switch (act) {
    case TERN_ACT_NONE: return g;
    case TERN_ACT_RELU:
        return _mm256_and_ps(_mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ), g);
    case TERN_ACT_HARDSWISH: {
        __m256 mid = _mm256_mul_ps(g, _mm256_add_ps(div_exact8(z, 3), _mm256_set1_ps(0.5f)));
        __m256 v = _mm256_blendv_ps(g, mid, _mm256_cmp_ps(z, _mm256_set1_ps(3), _CMP_LE_OQ));
        return _mm256_and_ps(_mm256_cmp_ps(z, _mm256_set1_ps(-3), _CMP_NLT_UQ), v);
    }
    case TERN_ACT_HARDSIGMOID: {
        __m256 in = _mm256_and_ps(_mm256_cmp_ps(z, _mm256_set1_ps(-3), _CMP_GT_OQ),
                                  _mm256_cmp_ps(z, _mm256_set1_ps(3), _CMP_LT_OQ));
        return _mm256_and_ps(in, _mm256_mul_ps(g, _mm256_set1_ps(1.0f / 6)));
    }
    }
    return g;
}
#endif
