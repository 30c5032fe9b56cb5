/* AVX2 pieces shared by the integer kernels' AVX2 levels (nn/qgemm.c, nn/qops.c): the
 * fixed-point requantization of tern_requant on 8 lanes, the same arithmetic as mbqm16 in
 * nn/qsimd512.h (see there for why each step gives tern_quant_mbqm's bits). The float mode
 * stays scalar at this level. Internal; include from x86 code only. */
#ifndef TERN_QSIMD256_H
#define TERN_QSIMD256_H

#include <immintrin.h>

#include "qkernels.h"

#define T_AVX2 __attribute__((target("avx2")))
#define QINLINE2 static inline __attribute__((always_inline))

/* Multipliers and shifts of 8 channels in the forms mbqm8 uses. */
typedef struct rqx8 {
    __m256i mult, mult_odd, left, right, lo, hi, rmask, rhalf;
} rqx8;

T_AVX2 QINLINE2 rqx8 rqx8_make(__m256i mult, __m256i shift)
{
    const __m256i zero = _mm256_setzero_si256(), one = _mm256_set1_epi32(1);
    __m256i left = _mm256_max_epi32(shift, zero), right = _mm256_sub_epi32(left, shift);
    __m256i rmask = _mm256_sub_epi32(_mm256_sllv_epi32(one, right), one);
    return (rqx8){mult, _mm256_srli_epi64(mult, 32), left, right,
                  _mm256_srav_epi32(_mm256_set1_epi32(INT32_MIN), left),
                  _mm256_srav_epi32(_mm256_set1_epi32(INT32_MAX), left), rmask,
                  _mm256_srli_epi32(rmask, 1)};
}

/* Channels [c, c + 8) of rq's fixed-point parameters (all 8 must exist). */
T_AVX2 QINLINE2 rqx8 rqx8_load(const tern_requant *rq, size_t c)
{
    return rqx8_make(_mm256_loadu_si256((const __m256i *)(rq->multiplier + c)),
                     _mm256_loadu_si256((const __m256i *)(rq->shift + c)));
}

/* tern_quant_mbqm per lane, under mbqm16's conditions (result clamped to int8 afterwards). */
T_AVX2 QINLINE2 __m256i mbqm8(__m256i x, const rqx8 *p)
{
    const __m256i nudge = _mm256_set1_epi64x((int64_t)1 << 30);
    x = _mm256_sllv_epi32(_mm256_min_epi32(_mm256_max_epi32(x, p->lo), p->hi), p->left);
    __m256i even = _mm256_add_epi64(_mm256_mul_epi32(x, p->mult), nudge);
    __m256i odd = _mm256_add_epi64(_mm256_mul_epi32(_mm256_srli_epi64(x, 32), p->mult_odd), nudge);
    __m256i s = _mm256_blend_epi32(_mm256_srli_epi64(even, 31), _mm256_add_epi64(odd, odd), 0xAA);
    __m256i q = _mm256_srav_epi32(s, p->right);
    __m256i threshold = _mm256_add_epi32(p->rhalf, _mm256_srli_epi32(s, 31));
    /* the comparison is -1 where the quotient rounds up */
    return _mm256_sub_epi32(q, _mm256_cmpgt_epi32(_mm256_and_si256(s, p->rmask), threshold));
}

/* tern_requant_one's fixed mode before the table: clamp(mbqm + out_zp, qmin, qmax) per lane. */
T_AVX2 QINLINE2 __m256i requantx8_i32(__m256i acc, const rqx8 *p, const tern_requant *rq)
{
    __m256i v = _mm256_max_epi32(mbqm8(acc, p), _mm256_set1_epi32(rq->qmin - rq->out_zp));
    v = _mm256_min_epi32(v, _mm256_set1_epi32(rq->qmax - rq->out_zp));
    return _mm256_add_epi32(v, _mm256_set1_epi32(rq->out_zp));
}

#endif
