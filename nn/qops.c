/* Integer kernels besides the GEMM: depthwise convolution, residual add, squeeze-and-excitation
 * gate, global average pool, input quantization. Each has a scalar reference written from the
 * definition and a dispatching version (vectorized over channels or elements at the AVX-512 VNNI
 * level, and for the depthwise convolution also at AVX2) that must give the same bits. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "qkernels.h"
#include "qsimd512.h"

#define T_AVX2 __attribute__((target("avx2")))
#define INLINE static inline __attribute__((always_inline))


static inline int8_t clamp8(int32_t q, int32_t lo, int32_t hi)
{
    return (int8_t)(q < lo ? lo : q > hi ? hi : q);
}

/* clamp(q + zp, lo, hi) without overflow: clamp to the bounds minus zp first, as the vector
 * versions do. */
static inline int8_t clamp_add8(int32_t q, int32_t zp, int32_t lo, int32_t hi)
{
    return (int8_t)(q < lo - zp ? lo : q > hi - zp ? hi : q + zp);
}

/* Sums wrap modulo 2^32 like the vector adds (only a pathological bias gets there). */
static inline int32_t wrap_add(int32_t a, int32_t b)
{
    return (int32_t)((uint32_t)a + (uint32_t)b);
}

/* ---- depthwise ------------------------------------------------------------------------------ */

void tern_qdwconv_pack(int32_t *packed, const int8_t *w, int channels, int k)
{
    for (int t = 0; t < k * k; t++)
        for (int c = 0; c < channels; c++)
            packed[(size_t)t * channels + c] = w[(size_t)c * k * k + t];
}

void tern_qdwconv_ref(int8_t *y, const int8_t *x, int32_t x_zp, const int8_t *w,
                      const int32_t *bias, const tern_conv_params *p, const tern_requant *rq)
{
    const int C = p->cin, k = p->k;
    for (int n = 0; n < p->n; n++)
        for (int oy = 0; oy < p->oh; oy++)
            for (int ox = 0; ox < p->ow; ox++)
                for (int c = 0; c < C; c++) {
                    int32_t acc = bias ? bias[c] : 0;
                    for (int ky = 0; ky < k; ky++)
                        for (int kx = 0; kx < k; kx++) {
                            int iy = oy * p->stride - p->pad + ky;
                            int ix = ox * p->stride - p->pad + kx;
                            if (iy < 0 || iy >= p->h || ix < 0 || ix >= p->w)
                                continue;
                            int32_t xv = x[(((size_t)n * p->h + iy) * p->w + ix) * C + c];
                            acc = wrap_add(acc, (xv - x_zp) * w[((size_t)c * k + ky) * k + kx]);
                        }
                    y[(((size_t)n * p->oh + oy) * p->ow + ox) * C + c] =
                        tern_requant_one(acc, rq, (size_t)c);
                }
}

/* The taps of output pixel (oy, ox) that fall inside the image: tap index and input offset (in
 * pixels, from the image's start). Returns their number. */
static int valid_taps(int *tap, size_t *off, const tern_conv_params *p, int oy, int ox)
{
    int n = 0;
    for (int ky = 0; ky < p->k; ky++) {
        int iy = oy * p->stride - p->pad + ky;
        if (iy < 0 || iy >= p->h)
            continue;
        for (int kx = 0; kx < p->k; kx++) {
            int ix = ox * p->stride - p->pad + kx;
            if (ix < 0 || ix >= p->w)
                continue;
            tap[n] = ky * p->k + kx;
            off[n++] = (size_t)iy * p->w + ix;
        }
    }
    return n;
}

/* nv vectors of 16 channels from c0 of one output pixel (nv a constant after inlining, so the
 * accumulators stay in registers). */
T_VNNI QINLINE void dw_chunk(const int nv, int8_t *y, const int8_t *img, int C, int c0,
                             const int *tap, const size_t *off, int ntaps, const int32_t *w,
                             const int32_t *bias, __m512i zp, const tern_requant *rq,
                             const __m512i *lut)
{
    __m512i acc[4];
    __mmask16 m[4];
    for (int v = 0; v < nv; v++) {
        m[v] = q_tail_mask16((size_t)(C - c0 - 16 * v));
        acc[v] = bias ? _mm512_maskz_loadu_epi32(m[v], bias + c0 + 16 * v) : _mm512_setzero_si512();
    }
    for (int t = 0; t < ntaps; t++) {
        const int8_t *xp = img + off[t] * (size_t)C + c0;
        const int32_t *wp = w + (size_t)tap[t] * C + c0;
        for (int v = 0; v < nv; v++) {
            __m512i xv = _mm512_sub_epi32(
                _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m[v], xp + 16 * v)), zp);
            __m512i wv = _mm512_maskz_loadu_epi32(m[v], wp + 16 * v);
            acc[v] = _mm512_add_epi32(acc[v], _mm512_mullo_epi32(xv, wv));
        }
    }
    for (int v = 0; v < nv; v++) {
        rq16 r = rq16_load(rq, (size_t)c0 + 16 * v, m[v]);
        _mm_mask_storeu_epi8(y + c0 + 16 * v, m[v], requant16(acc[v], &r, lut));
    }
}

/* One output pixel, all channels, 64 at a time (four independent accumulator chains). */
T_VNNI static void dw_pixel_vnni(int8_t *y, const int8_t *img, int C, const int *tap,
                                 const size_t *off, int ntaps, const int32_t *w,
                                 const int32_t *bias, __m512i zp, const tern_requant *rq,
                                 const __m512i *lut)
{
    int c0 = 0;
    for (; c0 + 64 <= C; c0 += 64)
        dw_chunk(4, y, img, C, c0, tap, off, ntaps, w, bias, zp, rq, lut);
    switch ((C - c0 + 15) / 16) {
    case 1: dw_chunk(1, y, img, C, c0, tap, off, ntaps, w, bias, zp, rq, lut); break;
    case 2: dw_chunk(2, y, img, C, c0, tap, off, ntaps, w, bias, zp, rq, lut); break;
    case 3: dw_chunk(3, y, img, C, c0, tap, off, ntaps, w, bias, zp, rq, lut); break;
    case 4: dw_chunk(4, y, img, C, c0, tap, off, ntaps, w, bias, zp, rq, lut); break;
    default: break; /* nothing left */
    }
}

T_AVX2 static void dw_pixel_avx2(int8_t *y, const int8_t *img, int C, const int *tap,
                                 const size_t *off, int ntaps, const int32_t *w,
                                 const int32_t *bias, int32_t x_zp, const tern_requant *rq)
{
    const __m256i zp = _mm256_set1_epi32(x_zp);
    int c0 = 0;
    for (; c0 + 8 <= C; c0 += 8) {
        __m256i acc = bias ? _mm256_loadu_si256((const __m256i *)(bias + c0))
                           : _mm256_setzero_si256();
        for (int t = 0; t < ntaps; t++) {
            int64_t bytes;
            memcpy(&bytes, img + off[t] * (size_t)C + c0, sizeof bytes);
            __m256i xv = _mm256_sub_epi32(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(bytes)), zp);
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + (size_t)tap[t] * C + c0));
            acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(xv, wv));
        }
        int32_t s[8];
        _mm256_storeu_si256((__m256i *)s, acc);
        for (int j = 0; j < 8; j++)
            y[c0 + j] = tern_requant_one(s[j], rq, (size_t)c0 + j);
    }
    for (; c0 < C; c0++) {
        int32_t acc = bias ? bias[c0] : 0;
        for (int t = 0; t < ntaps; t++)
            acc = wrap_add(acc, ((int32_t)img[off[t] * (size_t)C + c0] - x_zp) * w[(size_t)tap[t] * C + c0]);
        y[c0] = tern_requant_one(acc, rq, (size_t)c0);
    }
}

static void dw_pixel_scalar(int8_t *y, const int8_t *img, int C, const int *tap,
                            const size_t *off, int ntaps, const int32_t *w, const int32_t *bias,
                            int32_t x_zp, const tern_requant *rq)
{
    for (int c = 0; c < C; c++) {
        int32_t acc = bias ? bias[c] : 0;
        for (int t = 0; t < ntaps; t++)
            acc = wrap_add(acc, ((int32_t)img[off[t] * (size_t)C + c] - x_zp) * w[(size_t)tap[t] * C + c]);
        y[c] = tern_requant_one(acc, rq, (size_t)c);
    }
}

T_VNNI static void dwconv_vnni(int8_t *y, const int8_t *x, int32_t x_zp, const int32_t *w,
                               const int32_t *bias, const tern_conv_params *p,
                               const tern_requant *rq)
{
    __m512i lut[4];
    if (rq->lut)
        for (int i = 0; i < 4; i++)
            lut[i] = _mm512_loadu_si512(rq->lut + 64 * i);
    const __m512i zp = _mm512_set1_epi32(x_zp);
    int tap[TERN_DW_TAPS_MAX];
    size_t off[TERN_DW_TAPS_MAX];
    for (int n = 0; n < p->n; n++) {
        const int8_t *img = x + (size_t)n * p->h * p->w * p->cin;
        for (int oy = 0; oy < p->oh; oy++)
            for (int ox = 0; ox < p->ow; ox++) {
                int nt = valid_taps(tap, off, p, oy, ox);
                int8_t *out = y + (((size_t)n * p->oh + oy) * p->ow + ox) * p->cin;
                dw_pixel_vnni(out, img, p->cin, tap, off, nt, w, bias, zp, rq,
                              rq->lut ? lut : NULL);
            }
    }
}

void tern_qdwconv(int8_t *y, const int8_t *x, int32_t x_zp, const int32_t *wpacked,
                  const int32_t *bias, const tern_conv_params *p, const tern_requant *rq,
                  tern_qisa isa)
{
    isa = tern_qisa_resolve(isa);
    if (isa == TERN_QISA_AVX512_VNNI) {
        dwconv_vnni(y, x, x_zp, wpacked, bias, p, rq);
        return;
    }
    int tap[TERN_DW_TAPS_MAX];
    size_t off[TERN_DW_TAPS_MAX];
    for (int n = 0; n < p->n; n++) {
        const int8_t *img = x + (size_t)n * p->h * p->w * p->cin;
        for (int oy = 0; oy < p->oh; oy++)
            for (int ox = 0; ox < p->ow; ox++) {
                int nt = valid_taps(tap, off, p, oy, ox);
                int8_t *out = y + (((size_t)n * p->oh + oy) * p->ow + ox) * p->cin;
                if (isa == TERN_QISA_AVX2)
                    dw_pixel_avx2(out, img, p->cin, tap, off, nt, wpacked, bias, x_zp, rq);
                else
                    dw_pixel_scalar(out, img, p->cin, tap, off, nt, wpacked, bias, x_zp, rq);
            }
    }
}

/* ---- residual add ----------------------------------------------------------------------------- */

static inline int8_t add_one(int8_t a, int8_t b, const tern_qadd_params *p)
{
    int32_t sa = ((int32_t)a - p->a_zp) * (1 << p->left_shift);
    int32_t sb = ((int32_t)b - p->b_zp) * (1 << p->left_shift);
    int32_t s = tern_quant_mbqm(sa, p->a_mult, p->a_shift) + tern_quant_mbqm(sb, p->b_mult, p->b_shift);
    return clamp_add8(tern_quant_mbqm(s, p->out_mult, p->out_shift), p->out_zp, p->qmin, p->qmax);
}

void tern_qadd_ref(int8_t *y, const int8_t *a, const int8_t *b, size_t count, const tern_qadd_params *p)
{
    for (size_t i = 0; i < count; i++)
        y[i] = add_one(a[i], b[i], p);
}

T_VNNI static void qadd_vnni(int8_t *y, const int8_t *a, const int8_t *b, size_t count,
                             const tern_qadd_params *p)
{
    const __m512i azp = _mm512_set1_epi32(p->a_zp), bzp = _mm512_set1_epi32(p->b_zp);
    /* the inputs' multipliers only scale: no clamp (the bounds are the int32 range) */
    const rq16 ra = rq16_uniform(p->a_mult, p->a_shift, 0, INT32_MIN, INT32_MAX);
    const rq16 rb = rq16_uniform(p->b_mult, p->b_shift, 0, INT32_MIN, INT32_MAX);
    const rq16 ro = rq16_uniform(p->out_mult, p->out_shift, p->out_zp, p->qmin, p->qmax);
    for (size_t i = 0; i < count; i += 16) {
        __mmask16 m = q_tail_mask16(count - i);
        __m512i va = _mm512_sub_epi32(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, a + i)), azp);
        __m512i vb = _mm512_sub_epi32(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, b + i)), bzp);
        va = mbqm16(_mm512_slli_epi32(va, (unsigned)p->left_shift), &ra);
        vb = mbqm16(_mm512_slli_epi32(vb, (unsigned)p->left_shift), &rb);
        __m512i q = requant16_i32(_mm512_add_epi32(va, vb), &ro);
        _mm_mask_storeu_epi8(y + i, m, _mm512_cvtepi32_epi8(q));
    }
}

void tern_qadd(int8_t *y, const int8_t *a, const int8_t *b, size_t count, const tern_qadd_params *p,
               tern_qisa isa)
{
    if (tern_qisa_resolve(isa) == TERN_QISA_AVX512_VNNI)
        qadd_vnni(y, a, b, count, p);
    else
        tern_qadd_ref(y, a, b, count, p);
}

/* ---- squeeze-and-excitation gate -------------------------------------------------------------- */

void tern_qgate_ref(int8_t *y, const int8_t *x, const int8_t *g, int n, size_t hw, int c,
                    const tern_qgate_params *p)
{
    for (int i = 0; i < n; i++)
        for (size_t j = 0; j < hw; j++)
            for (int k = 0; k < c; k++) {
                size_t at = ((size_t)i * hw + j) * c + k;
                int32_t prod = ((int32_t)x[at] - p->x_zp) * ((int32_t)g[(size_t)i * c + k] - p->g_zp);
                y[at] = clamp_add8(tern_quant_mbqm(prod, p->mult, p->shift), p->out_zp, -128, 127);
            }
}

T_VNNI static void qgate_vnni(int8_t *y, const int8_t *x, const int8_t *g, int n, size_t hw,
                              int c, const tern_qgate_params *p)
{
    const __m512i xzp = _mm512_set1_epi32(p->x_zp), gzp = _mm512_set1_epi32(p->g_zp);
    const rq16 r = rq16_uniform(p->mult, p->shift, p->out_zp, -128, 127);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < c; k += 16) {
            __mmask16 m = q_tail_mask16((size_t)(c - k));
            __m512i gv = _mm512_sub_epi32(
                _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, g + (size_t)i * c + k)), gzp);
            for (size_t j = 0; j < hw; j++) {
                size_t at = ((size_t)i * hw + j) * c + k;
                __m512i xv = _mm512_sub_epi32(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, x + at)), xzp);
                __m512i q = requant16_i32(_mm512_mullo_epi32(xv, gv), &r);
                _mm_mask_storeu_epi8(y + at, m, _mm512_cvtepi32_epi8(q));
            }
        }
}

void tern_qgate(int8_t *y, const int8_t *x, const int8_t *g, int n, size_t hw, int c,
                const tern_qgate_params *p, tern_qisa isa)
{
    if (tern_qisa_resolve(isa) == TERN_QISA_AVX512_VNNI)
        qgate_vnni(y, x, g, n, hw, c, p);
    else
        tern_qgate_ref(y, x, g, n, hw, c, p);
}

/* ---- global average pool --------------------------------------------------------------------- */

/* TFLite's AveragePool rounding: half away from zero. */
static inline int8_t pool_div(int32_t sum, int32_t count)
{
    int32_t q = sum > 0 ? (sum + count / 2) / count : (sum - count / 2) / count;
    return clamp8(q, -128, 127);
}

void tern_qavgpool_ref(int8_t *y, const int8_t *x, int n, size_t hw, int c)
{
    for (int i = 0; i < n; i++)
        for (int k = 0; k < c; k++) {
            int32_t sum = 0;
            for (size_t j = 0; j < hw; j++)
                sum += x[((size_t)i * hw + j) * c + k];
            y[(size_t)i * c + k] = pool_div(sum, (int32_t)hw);
        }
}

T_VNNI static void qavgpool_vnni(int8_t *y, const int8_t *x, int n, size_t hw, int c)
{
    for (int i = 0; i < n; i++)
        for (int k = 0; k < c; k += 16) {
            __mmask16 m = q_tail_mask16((size_t)(c - k));
            __m512i acc = _mm512_setzero_si512();
            for (size_t j = 0; j < hw; j++)
                acc = _mm512_add_epi32(acc, _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(
                                                m, x + ((size_t)i * hw + j) * c + k)));
            int32_t s[16];
            _mm512_storeu_si512(s, acc);
            for (int v = 0; v < 16 && k + v < c; v++)
                y[(size_t)i * c + k + v] = pool_div(s[v], (int32_t)hw);
        }
}

void tern_qavgpool(int8_t *y, const int8_t *x, int n, size_t hw, int c, tern_qisa isa)
{
    if (tern_qisa_resolve(isa) == TERN_QISA_AVX512_VNNI)
        qavgpool_vnni(y, x, n, hw, c);
    else
        tern_qavgpool_ref(y, x, n, hw, c);
}

/* ---- input quantization --------------------------------------------------------------------- */

void tern_quantize_ref(int8_t *y, const float *x, size_t count, tern_qparams p)
{
    for (size_t i = 0; i < count; i++)
        y[i] = tern_quantize(x[i], p);
}

/* roundf(x / scale) as truncation plus a correction when the (exact) fraction is >= 1/2. */
T_VNNI static void quantize_vnni(int8_t *y, const float *x, size_t count, tern_qparams p)
{
    const __m512 scale = _mm512_set1_ps(p.scale), half = _mm512_set1_ps(0.5f);
    const __m512 lo = _mm512_set1_ps(-128.0f - (float)p.zero_point);
    const __m512 hi = _mm512_set1_ps(127.0f - (float)p.zero_point);
    const __m512i zp = _mm512_set1_epi32(p.zero_point);
    for (size_t i = 0; i < count; i += 16) {
        __mmask16 m = q_tail_mask16(count - i);
        __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + i), scale);
        __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        __m512 frac = _mm512_abs_ps(_mm512_sub_ps(v, t));
        __mmask16 up = _mm512_cmp_ps_mask(frac, half, _CMP_GE_OQ);
        /* t +- 1, toward v's sign (a zero t with frac >= 1/2 has v's sign too) */
        __m512 one = _mm512_or_ps(_mm512_set1_ps(1.0f),
                                  _mm512_and_ps(v, _mm512_set1_ps(-0.0f)));
        __m512 r = _mm512_mask_add_ps(t, up, t, one);
        r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
        r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_setzero_ps());
        __m512i q = _mm512_add_epi32(_mm512_cvttps_epi32(r), zp);
        _mm_mask_storeu_epi8(y + i, m, _mm512_cvtepi32_epi8(q));
    }
}

void tern_quantize_array(int8_t *y, const float *x, size_t count, tern_qparams p, tern_qisa isa)
{
    if (tern_qisa_resolve(isa) == TERN_QISA_AVX512_VNNI)
        quantize_vnni(y, x, count, p);
    else
        tern_quantize_ref(y, x, count, p);
}
