/* Integer kernels besides the GEMM: depthwise convolution, residual add, squeeze-and-excitation
 * gate, global average pool, input quantization. Each has a scalar reference written from the
 * definition and a dispatching version (vectorized over channels or elements at the AVX-512 VNNI
 * level, and for the depthwise convolution also at AVX2) that must give the same bits, in both
 * requantization modes (tern_requant_mode: single precision or TFLite's fixed point). */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "qkernels.h"
#include "qsimd256.h"
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

static size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

/* VNNI geometry: groups of 4 taps per kernel row, padded input width (4 spare columns so that
 * the last group's 64-byte read stays inside). */
static int dw_groups(int k) { return (k + 3) / 4; }

size_t tern_qdwconv_packed_size(int channels, int k, tern_qisa isa)
{
    size_t C = (size_t)channels, kk = (size_t)k * (size_t)k;
    if (tern_qisa_resolve(isa) == TERN_QISA_AVX512_VNNI) {
        size_t cp = round_up(C, 16);
        return cp * sizeof(int32_t) + cp * (size_t)k * (size_t)dw_groups(k) * 4;
    }
    return round_up(C * sizeof(int32_t), 64) + kk * C * sizeof(int32_t);
}

void tern_qdwconv_pack(void *packed, const int8_t *w, const int32_t *bias, int32_t x_zp,
                       int channels, int k, tern_qisa isa)
{
    const size_t C = (size_t)channels, kk = (size_t)k * (size_t)k;
    int32_t *b = packed;
    if (tern_qisa_resolve(isa) != TERN_QISA_AVX512_VNNI) {
        int32_t *taps = (int32_t *)((char *)packed + round_up(C * sizeof(int32_t), 64));
        for (size_t c = 0; c < C; c++)
            b[c] = bias ? bias[c] : 0;
        for (size_t t = 0; t < kk; t++)
            for (size_t c = 0; c < C; c++)
                taps[t * C + c] = w[c * kk + t];
        return;
    }
    const size_t cp = round_up(C, 16), G = (size_t)dw_groups(k);
    int8_t *out = (int8_t *)(b + cp); /* [c / 16][ky][g][c % 16][4] */
    for (size_t c = 0; c < cp; c++) {
        int64_t sum = 0;
        for (size_t t = 0; c < C && t < kk; t++)
            sum += w[c * kk + t];
        b[c] = c < C ? (int32_t)(uint32_t)(uint64_t)((bias ? (int64_t)bias[c] : 0) -
                                                      ((int64_t)x_zp + 128) * sum)
                     : 0;
        for (size_t ky = 0; ky < (size_t)k; ky++)
            for (size_t g = 0; g < G; g++)
                for (size_t j = 0; j < 4; j++) {
                    size_t kx = 4 * g + j;
                    out[(((c / 16) * (size_t)k + ky) * G + g) * 64 + (c % 16) * 4 + j] =
                        c < C && kx < (size_t)k ? w[c * kk + ky * (size_t)k + kx] : 0;
                }
    }
}

/* The padded copy of one image: [C / 16][H + 2 pad][W + 2 pad + 4][16] bytes of x + 128. */
static size_t dw_padded_size(const tern_conv_params *p)
{
    return round_up((size_t)p->cin, 16) * (size_t)(p->h + 2 * p->pad) *
           (size_t)(p->w + 2 * p->pad + 4);
}

/* Stride 1, 5x5 (dw_use_quads): one block's image of channel-interleaved quadruples, [H + 2 pad][wq][16][4] with
 * wq = OW + 4 (groups - 1) (entry ix holds pixels ix..ix+3 of the padded row, permuted once
 * for all the output pixels and rows that read it), plus one padded row of 16-byte pixels. */
static size_t dw_quad_size(const tern_conv_params *p)
{
    size_t wq = (size_t)p->ow + 4 * (size_t)(dw_groups(p->k) - 1);
    return (size_t)(p->h + 2 * p->pad) * wq * 64 + (size_t)(p->w + 2 * p->pad + 4) * 16 + 64;
}

/* The quadruple image pays off where it saves more than one permute per output: kernels of
 * two or more groups per row (5x5) at stride 1. For 3x3 writing it costs more than the three
 * permutes it saves. */
static bool dw_use_quads(const tern_conv_params *p)
{
    return p->stride == 1 && dw_groups(p->k) > 1;
}

size_t tern_qdwconv_workspace_size(const tern_conv_params *p, tern_qisa isa)
{
    if (tern_qisa_resolve(isa) != TERN_QISA_AVX512_VNNI)
        return 0;
    return round_up(dw_use_quads(p) ? dw_quad_size(p) : dw_padded_size(p), 64);
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
        if (rq->mode == TERN_REQUANT_FIXED) {
            const rqx8 px = rqx8_load(rq, (size_t)c0);
            _mm256_storeu_si256((__m256i *)s, requantx8_i32(acc, &px, rq));
            for (int j = 0; j < 8; j++)
                y[c0 + j] = rq->lut ? rq->lut[(uint8_t)s[j]] : (int8_t)s[j];
            continue;
        }
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

/* One image's padded copy (see dw_padded_size): border bytes x_zp + 128, so that they add
 * nothing once the folded correction is applied. */
T_VNNI static void dw_pad_image(uint8_t *u, const int8_t *img, int32_t x_zp,
                                const tern_conv_params *p)
{
    const size_t C = (size_t)p->cin, nb = round_up(C, 16) / 16;
    const size_t hp = (size_t)(p->h + 2 * p->pad), wpp = (size_t)(p->w + 2 * p->pad + 4);
    const size_t plane = hp * wpp * 16;
    const uint8_t fill = (uint8_t)(x_zp + 128);
    const __m128i flip = _mm_set1_epi8((char)0x80);
    for (size_t b = 0; b < nb; b++) {
        uint8_t *ub = u + b * plane;
        memset(ub, fill, (size_t)p->pad * wpp * 16);
        memset(ub + (size_t)(p->pad + p->h) * wpp * 16, fill, (size_t)p->pad * wpp * 16);
        __mmask16 m = q_tail_mask16(C - 16 * b);
        for (int iy = 0; iy < p->h; iy++) {
            uint8_t *row = ub + (size_t)(iy + p->pad) * wpp * 16;
            const int8_t *src = img + (size_t)iy * p->w * C + 16 * b;
            memset(row, fill, (size_t)p->pad * 16);
            memset(row + (size_t)(p->pad + p->w) * 16, fill, (wpp - (size_t)(p->pad + p->w)) * 16);
            uint8_t *dst = row + (size_t)p->pad * 16;
            for (int ix = 0; ix < p->w; ix++) {
                /* channels past C: any byte (their weights are zero) */
                __m128i v = _mm_maskz_loadu_epi8(m, src + (size_t)ix * C);
                _mm_storeu_si128((__m128i *)(dst + 16 * (size_t)ix), _mm_xor_si128(v, flip));
            }
        }
    }
}

/* A block's 16 accumulators to bytes in dw_block and dw_block_quads' mode. */
#define DW_REQ(acc)                                                                             \
    (rqm != RQ_FLOAT ? requantx16(acc, &px, r, has_lut ? lut : NULL, rqm == RQ_FIXED_LEFT)      \
                     : requantf16(acc, sv, r, has_lut ? lut : NULL))

/* One block of 16 channels over all output pixels of an image, G groups of 4 taps per row.
 * A 64-byte read at (iy, ix) holds pixels ix..ix+3 of the block; one byte permute turns it into
 * the channel-major quadruples vpdpbusd multiplies with the packed weights. */
T_VNNI QINLINE void dw_block(const int K, const int G, const bool has_lut, const int rqm,
                             int8_t *y, const uint8_t *ub, size_t wpp, const int8_t *wb,
                             const int32_t *bias, const tern_requant *rq, size_t c0,
                             const rqf16 *r, __mmask16 m, const tern_conv_params *p)
{
    const int8_t *table = rq->lut;
    const bool fixed = rqm != RQ_FLOAT;
    const __m512 sv = fixed ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, rq->scale + c0);
    const rqx16 px = fixed ? rqx16_load(rq, c0, m) : (rqx16){0};
    __m512i w[7][2], lut[4];
    for (int ky = 0; ky < K; ky++)
        for (int g = 0; g < G; g++)
            w[ky][g] = _mm512_load_si512(wb + (ky * G + g) * 64);
    for (int i = 0; has_lut && i < 4; i++)
        lut[i] = _mm512_loadu_si512(table + 64 * i);
    const __m512i b = _mm512_loadu_si512(bias);
    const __m512i idx = _mm512_set_epi8(
        63, 47, 31, 15, 62, 46, 30, 14, 61, 45, 29, 13, 60, 44, 28, 12, 59, 43, 27, 11, 58, 42, 26,
        10, 57, 41, 25, 9, 56, 40, 24, 8, 55, 39, 23, 7, 54, 38, 22, 6, 53, 37, 21, 5, 52, 36, 20,
        4, 51, 35, 19, 3, 50, 34, 18, 2, 49, 33, 17, 1, 48, 32, 16, 0);
    const size_t C = (size_t)p->cin, s = (size_t)p->stride;
    for (int oy = 0; oy < p->oh; oy++) {
        const uint8_t *top = ub + (size_t)oy * s * wpp * 16;
        int8_t *out = y + (size_t)oy * p->ow * C;
        int ox = 0;
        /* four pixels at a time: four independent chains for the out-of-order core */
        for (; ox + 4 <= p->ow; ox += 4) {
            __m512i acc[4] = {b, b, b, b};
            for (int ky = 0; ky < K; ky++)
                for (int g = 0; g < G; g++)
                    for (int j = 0; j < 4; j++) {
                        const uint8_t *at = top + (size_t)(ox + j) * s * 16;
                        __m512i v = _mm512_loadu_si512(at + (size_t)ky * wpp * 16 + 64 * g);
                        DPBUSD(acc[j], _mm512_permutexvar_epi8(idx, v), w[ky][g]);
                    }
            for (int j = 0; j < 4; j++)
                _mm_mask_storeu_epi8(out + (size_t)(ox + j) * C, m,
                                     DW_REQ(acc[j]));
        }
        for (; ox < p->ow; ox++) {
            const uint8_t *at = top + (size_t)ox * s * 16;
            __m512i acc = b;
            for (int ky = 0; ky < K; ky++)
                for (int g = 0; g < G; g++) {
                    __m512i v = _mm512_loadu_si512(at + (size_t)ky * wpp * 16 + 64 * g);
                    DPBUSD(acc, _mm512_permutexvar_epi8(idx, v), w[ky][g]);
                }
            _mm_mask_storeu_epi8(out + (size_t)ox * C, m,
                                 DW_REQ(acc));
        }
    }
}

static const int8_t dw_interleave[64] = {0,  16, 32, 48, 1,  17, 33, 49, 2,  18, 34, 50, 3,  19, 35, 51,
                                         4,  20, 36, 52, 5,  21, 37, 53, 6,  22, 38, 54, 7,  23, 39, 55,
                                         8,  24, 40, 56, 9,  25, 41, 57, 10, 26, 42, 58, 11, 27, 43, 59,
                                         12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};

/* Stride 1, block b of 16 channels: the quadruple image (dw_quad_size) of one image. */
T_VNNI static void dw_build_quads(uint8_t *quad, uint8_t *row, const int8_t *img, size_t b,
                                  int32_t x_zp, const tern_conv_params *p)
{
    const size_t C = (size_t)p->cin, hp = (size_t)(p->h + 2 * p->pad);
    const size_t wpp = (size_t)(p->w + 2 * p->pad + 4);
    const size_t wq = (size_t)p->ow + 4 * (size_t)(dw_groups(p->k) - 1);
    const uint8_t fill = (uint8_t)(x_zp + 128);
    const __m128i flip = _mm_set1_epi8((char)0x80);
    const __m512i idx = _mm512_loadu_si512(dw_interleave);
    const __mmask16 m = q_tail_mask16(C - 16 * b);
    for (size_t iy = 0; iy < hp; iy++) {
        uint8_t *q = quad + iy * wq * 64;
        int sy = (int)iy - p->pad;
        if (sy < 0 || sy >= p->h) { /* a padding row: every byte the fill */
            memset(q, fill, wq * 64);
            continue;
        }
        const int8_t *src = img + (size_t)sy * p->w * C + 16 * b;
        memset(row, fill, (size_t)p->pad * 16);
        memset(row + (size_t)(p->pad + p->w) * 16, fill, (wpp - (size_t)(p->pad + p->w)) * 16);
        uint8_t *dst = row + (size_t)p->pad * 16;
        for (int ix = 0; ix < p->w; ix++) /* channels past C: any byte (zero weights) */
            _mm_storeu_si128((__m128i *)(dst + 16 * (size_t)ix),
                             _mm_xor_si128(_mm_maskz_loadu_epi8(m, src + (size_t)ix * C), flip));
        for (size_t ix = 0; ix < wq; ix++)
            _mm512_storeu_si512(q + 64 * ix, _mm512_permutexvar_epi8(
                                                 idx, _mm512_loadu_si512(row + 16 * ix)));
    }
}

/* Stride 1: one block over an image from its quadruple image, four output pixels per step. */
T_VNNI QINLINE void dw_block_quads(const int K, const int G, const bool has_lut,
                                   const int rqm, int8_t *y, const uint8_t *quad,
                                   const int8_t *wb, const int32_t *bias,
                                   const tern_requant *rq, size_t c0, const rqf16 *r,
                                   __mmask16 m, const tern_conv_params *p)
{
    const int8_t *table = rq->lut;
    const bool fixed = rqm != RQ_FLOAT;
    const __m512 sv = fixed ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, rq->scale + c0);
    const rqx16 px = fixed ? rqx16_load(rq, c0, m) : (rqx16){0};
    __m512i w[7][2], lut[4];
    for (int ky = 0; ky < K; ky++)
        for (int g = 0; g < G; g++)
            w[ky][g] = _mm512_load_si512(wb + (ky * G + g) * 64);
    for (int i = 0; has_lut && i < 4; i++)
        lut[i] = _mm512_loadu_si512(table + 64 * i);
    const __m512i b = _mm512_loadu_si512(bias);
    const size_t C = (size_t)p->cin, wq = (size_t)p->ow + 4 * (size_t)(G - 1);
    for (int oy = 0; oy < p->oh; oy++) {
        const uint8_t *top = quad + (size_t)oy * wq * 64;
        int8_t *out = y + (size_t)oy * p->ow * C;
        int ox = 0;
        for (; ox + 4 <= p->ow; ox += 4) {
            __m512i acc[4] = {b, b, b, b};
            for (int ky = 0; ky < K; ky++)
                for (int g = 0; g < G; g++)
                    for (int j = 0; j < 4; j++) {
                        const uint8_t *at = top + ((size_t)ky * wq + (size_t)(ox + j + 4 * g)) * 64;
                        DPBUSD(acc[j], _mm512_loadu_si512(at), w[ky][g]);
                    }
            for (int j = 0; j < 4; j++)
                _mm_mask_storeu_epi8(out + (size_t)(ox + j) * C, m,
                                     DW_REQ(acc[j]));
        }
        for (; ox < p->ow; ox++) {
            __m512i acc = b;
            for (int ky = 0; ky < K; ky++)
                for (int g = 0; g < G; g++)
                    DPBUSD(acc, _mm512_loadu_si512(top + ((size_t)ky * wq + (size_t)(ox + 4 * g)) * 64),
                           w[ky][g]);
            _mm_mask_storeu_epi8(out + (size_t)ox * C, m,
                                 DW_REQ(acc));
        }
    }
}

T_VNNI static void dwconv_vnni(int8_t *y, const int8_t *x, int32_t x_zp, const void *packed,
                               void *workspace, const tern_conv_params *p,
                               const tern_requant *rq)
{
    const size_t C = (size_t)p->cin, nb = round_up(C, 16) / 16;
    const size_t wpp = (size_t)(p->w + 2 * p->pad + 4);
    const size_t plane = (size_t)(p->h + 2 * p->pad) * wpp * 16;
    const int k = p->k, G = dw_groups(k);
    uint8_t *u = workspace;
    const rqf16 r = rqf16_make(rq);
    const int32_t *bias = packed;
    const int8_t *w = (const int8_t *)(bias + 16 * nb);
    const size_t wblock = (size_t)k * (size_t)G * 64;
    const bool t = rq->lut != NULL;
    const int rqm = rq_kind(rq, C);
    if (dw_use_quads(p)) {
        const size_t wq = (size_t)p->ow + 4 * (size_t)(G - 1);
        uint8_t *row = u + (size_t)(p->h + 2 * p->pad) * wq * 64;
        for (int n = 0; n < p->n; n++) {
            const int8_t *img = x + (size_t)n * p->h * p->w * C;
            int8_t *yn = y + (size_t)n * p->oh * p->ow * C;
            for (size_t b = 0; b < nb; b++) {
                __mmask16 m = q_tail_mask16(C - 16 * b);
                dw_build_quads(u, row, img, b, x_zp, p);
#define DWQ(K, G, L, X)                                                                         \
    dw_block_quads(K, G, L, X, yn + 16 * b, u, w + b * wblock, bias + 16 * b, rq, 16 * b, &r, \
                   m, p)
#define DWQX(K, G, L)                                                                           \
    (rqm == RQ_FLOAT ? DWQ(K, G, L, RQ_FLOAT)                                                   \
                     : rqm == RQ_FIXED ? DWQ(K, G, L, RQ_FIXED) : DWQ(K, G, L, RQ_FIXED_LEFT))
                if (k == 5)
                    t ? DWQX(5, 2, true) : DWQX(5, 2, false);
                else
                    t ? DWQX(k, G, true) : DWQX(k, G, false);
#undef DWQX
#undef DWQ
            }
        }
        return;
    }
    for (int n = 0; n < p->n; n++) {
        const int8_t *img = x + (size_t)n * p->h * p->w * C;
        int8_t *yn = y + (size_t)n * p->oh * p->ow * C;
        dw_pad_image(u, img, x_zp, p);
        for (size_t b = 0; b < nb; b++) {
            __mmask16 m = q_tail_mask16(C - 16 * b);
            const uint8_t *ub = u + b * plane;
            int8_t *yb = yn + 16 * b;
            const int8_t *wb = w + b * wblock;
            const int32_t *bb = bias + 16 * b;
#define DW(K, G, L, X) dw_block(K, G, L, X, yb, ub, wpp, wb, bb, rq, 16 * b, &r, m, p)
#define DWX(K, G, L)                                                                            \
    (rqm == RQ_FLOAT ? DW(K, G, L, RQ_FLOAT)                                                    \
                     : rqm == RQ_FIXED ? DW(K, G, L, RQ_FIXED) : DW(K, G, L, RQ_FIXED_LEFT))
            if (k == 3)
                t ? DWX(3, 1, true) : DWX(3, 1, false);
            else if (k == 5)
                t ? DWX(5, 2, true) : DWX(5, 2, false);
            else
                t ? DWX(k, G, true) : DWX(k, G, false);
#undef DWX
#undef DW
        }
    }
}

void tern_qdwconv(int8_t *y, const int8_t *x, int32_t x_zp, const void *packed, void *workspace,
                  const tern_conv_params *p, const tern_requant *rq, tern_qisa isa)
{
    isa = tern_qisa_resolve(isa);
    if (isa == TERN_QISA_AVX512_VNNI) {
        dwconv_vnni(y, x, x_zp, packed, workspace, p, rq);
        return;
    }
    const int32_t *bias = packed;
    const int32_t *w = (const int32_t *)((const char *)packed +
                                         round_up((size_t)p->cin * sizeof(int32_t), 64));
    int tap[TERN_DW_TAPS_MAX];
    size_t off[TERN_DW_TAPS_MAX];
    for (int n = 0; n < p->n; n++) {
        const int8_t *img = x + (size_t)n * p->h * p->w * p->cin;
        for (int oy = 0; oy < p->oh; oy++)
            for (int ox = 0; ox < p->ow; ox++) {
                int nt = valid_taps(tap, off, p, oy, ox);
                int8_t *out = y + (((size_t)n * p->oh + oy) * p->ow + ox) * p->cin;
                if (isa == TERN_QISA_AVX2)
                    dw_pixel_avx2(out, img, p->cin, tap, off, nt, w, bias, x_zp, rq);
                else
                    dw_pixel_scalar(out, img, p->cin, tap, off, nt, w, bias, x_zp, rq);
            }
    }
}

/* ---- residual add ----------------------------------------------------------------------------- */

static inline int8_t round_clamp_zp(float r, int32_t zp, int32_t qmin, int32_t qmax)
{
    const float lo = (float)(qmin - zp), hi = (float)(qmax - zp);
    r = r < lo ? lo : r > hi ? hi : r;
    return (int8_t)((int32_t)tern_round_even(r) + zp);
}

/* TFLite's AddFunc (see tern_qadd_params). */
static inline int8_t add_fixed(int8_t a, int8_t b, const tern_qadd_params *p)
{
    int32_t sa = tern_quant_mbqm(((int32_t)a - p->a_zp) * (1 << TERN_QADD_LEFT_SHIFT), p->a_mult,
                                 p->a_shift);
    int32_t sb = tern_quant_mbqm(((int32_t)b - p->b_zp) * (1 << TERN_QADD_LEFT_SHIFT), p->b_mult,
                                 p->b_shift);
    return (int8_t)tern_clamp_zp(tern_quant_mbqm(sa + sb, p->out_mult, p->out_shift), p->out_zp,
                                 p->qmin, p->qmax);
}

void tern_qadd_ref(int8_t *y, const int8_t *a, const int8_t *b, size_t count, const tern_qadd_params *p)
{
    if (p->mode == TERN_REQUANT_FIXED) {
        for (size_t i = 0; i < count; i++)
            y[i] = add_fixed(a[i], b[i], p);
        return;
    }
    for (size_t i = 0; i < count; i++) {
        float r = fmaf((float)a[i], p->a_scale, fmaf((float)b[i], p->b_scale, p->bias));
        y[i] = round_clamp_zp(r, p->out_zp, p->qmin, p->qmax);
    }
}

T_VNNI static void qadd_vnni(int8_t *y, const int8_t *a, const int8_t *b, size_t count,
                             const tern_qadd_params *p)
{
    const __m512 sa = _mm512_set1_ps(p->a_scale), sb = _mm512_set1_ps(p->b_scale);
    const __m512 bias = _mm512_set1_ps(p->bias);
    const __m512 lo = _mm512_set1_ps((float)(p->qmin - p->out_zp));
    const __m512 hi = _mm512_set1_ps((float)(p->qmax - p->out_zp));
    const __m512i zp = _mm512_set1_epi32(p->out_zp);
    for (size_t i = 0; i < count; i += 16) {
        __mmask16 m = q_tail_mask16(count - i);
        __m512 va = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, a + i)));
        __m512 vb = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, b + i)));
        __m512 r = _mm512_fmadd_ps(va, sa, _mm512_fmadd_ps(vb, sb, bias));
        r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
        __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(r), zp);
        _mm_mask_storeu_epi8(y + i, m, _mm512_cvtepi32_epi8(q));
    }
}

/* One input of the fixed-mode add: mbqm((v - zp) << 20, mult, shift). The input with the larger
 * scale has the ratio 1/2 exactly (multiplier 2^30, shift 0), for which that is (v - zp) << 19
 * exactly (the high multiply of a multiple of 2^20 by 2^30 leaves no remainder): trivial. */
T_VNNI QINLINE __m512i add_input16(__m128i bytes, __m512i zp, const rqx16 *p, const bool trivial)
{
    __m512i v = _mm512_sub_epi32(_mm512_cvtepi8_epi32(bytes), zp);
    if (trivial)
        return _mm512_slli_epi32(v, TERN_QADD_LEFT_SHIFT - 1);
    return mbqm16(_mm512_slli_epi32(v, TERN_QADD_LEFT_SHIFT), p, false);
}

/* The fixed mode: each input's int32 lanes shifted and scaled, summed, scaled again. The
 * multipliers come from tern_quant_multiplier with shifts <= 0, so mbqm16 is exact. */
T_VNNI QINLINE void qadd_fixed_run(const bool a_trivial, const bool b_trivial, int8_t *y,
                                   const int8_t *a, const int8_t *b, size_t count,
                                   const tern_qadd_params *p)
{
    const rqx16 pa = rqx16_make(_mm512_set1_epi32(p->a_mult), _mm512_set1_epi32(p->a_shift));
    const rqx16 pb = rqx16_make(_mm512_set1_epi32(p->b_mult), _mm512_set1_epi32(p->b_shift));
    const rqx16 po = rqx16_make(_mm512_set1_epi32(p->out_mult), _mm512_set1_epi32(p->out_shift));
    const __m512i azp = _mm512_set1_epi32(p->a_zp), bzp = _mm512_set1_epi32(p->b_zp);
    const __m512i lo = _mm512_set1_epi32(p->qmin - p->out_zp);
    const __m512i hi = _mm512_set1_epi32(p->qmax - p->out_zp);
    const __m512i zp = _mm512_set1_epi32(p->out_zp);
    for (size_t i = 0; i < count; i += 16) {
        __mmask16 m = q_tail_mask16(count - i);
        __m512i va = add_input16(_mm_maskz_loadu_epi8(m, a + i), azp, &pa, a_trivial);
        __m512i vb = add_input16(_mm_maskz_loadu_epi8(m, b + i), bzp, &pb, b_trivial);
        __m512i q = mbqm16(_mm512_add_epi32(va, vb), &po, false);
        q = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q, lo), hi), zp);
        _mm_mask_storeu_epi8(y + i, m, _mm512_cvtepi32_epi8(q));
    }
}

T_VNNI static void qadd_fixed_vnni(int8_t *y, const int8_t *a, const int8_t *b, size_t count,
                                   const tern_qadd_params *p)
{
    const bool ta = p->a_mult == 1 << 30 && p->a_shift == 0;
    const bool tb = p->b_mult == 1 << 30 && p->b_shift == 0;
    if (ta && tb)
        qadd_fixed_run(true, true, y, a, b, count, p);
    else if (ta)
        qadd_fixed_run(true, false, y, a, b, count, p);
    else if (tb)
        qadd_fixed_run(false, true, y, a, b, count, p);
    else
        qadd_fixed_run(false, false, y, a, b, count, p);
}

void tern_qadd(int8_t *y, const int8_t *a, const int8_t *b, size_t count, const tern_qadd_params *p,
               tern_qisa isa)
{
    if (tern_qisa_resolve(isa) == TERN_QISA_AVX512_VNNI && p->mode == TERN_REQUANT_FIXED)
        qadd_fixed_vnni(y, a, b, count, p);
    else if (tern_qisa_resolve(isa) == TERN_QISA_AVX512_VNNI)
        qadd_vnni(y, a, b, count, p);
    else
        tern_qadd_ref(y, a, b, count, p);
}

/* ---- squeeze-and-excitation gate -------------------------------------------------------------- */

void tern_qgate_ref(int8_t *y, const int8_t *x, const int8_t *g, int n, size_t hw, int c,
                    const tern_qgate_params *p)
{
    if (p->mode == TERN_REQUANT_FIXED) { /* TFLite's MUL */
        for (int i = 0; i < n; i++)
            for (int k = 0; k < c; k++) {
                int32_t gv = (int32_t)g[(size_t)i * c + k] - p->g_zp;
                for (size_t j = 0; j < hw; j++) {
                    size_t at = ((size_t)i * hw + j) * c + k;
                    int32_t prod = ((int32_t)x[at] - p->x_zp) * gv;
                    y[at] = (int8_t)tern_clamp_zp(tern_quant_mbqm(prod, p->mult, p->shift),
                                                  p->out_zp, -128, 127);
                }
            }
        return;
    }
    for (int i = 0; i < n; i++)
        for (int k = 0; k < c; k++) {
            float gf = (float)((int32_t)g[(size_t)i * c + k] - p->g_zp) * p->scale;
            for (size_t j = 0; j < hw; j++) {
                size_t at = ((size_t)i * hw + j) * c + k;
                y[at] = round_clamp_zp((float)((int32_t)x[at] - p->x_zp) * gf, p->out_zp, -128, 127);
            }
        }
}

T_VNNI static void qgate_vnni(int8_t *y, const int8_t *x, const int8_t *g, int n, size_t hw,
                              int c, const tern_qgate_params *p)
{
    const __m512i xzp = _mm512_set1_epi32(p->x_zp), gzp = _mm512_set1_epi32(p->g_zp);
    const __m512i zp = _mm512_set1_epi32(p->out_zp);
    const __m512 scale = _mm512_set1_ps(p->scale);
    const __m512 lo = _mm512_set1_ps((float)(-128 - p->out_zp));
    const __m512 hi = _mm512_set1_ps((float)(127 - p->out_zp));
    for (int i = 0; i < n; i++)
        for (int k = 0; k < c; k += 16) {
            __mmask16 m = q_tail_mask16((size_t)(c - k));
            __m512i gi = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, g + (size_t)i * c + k));
            __m512 gf = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(gi, gzp)), scale);
            for (size_t j = 0; j < hw; j++) {
                size_t at = ((size_t)i * hw + j) * c + k;
                __m512i xi = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, x + at));
                __m512 r = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(xi, xzp)), gf);
                r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
                __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(r), zp);
                _mm_mask_storeu_epi8(y + at, m, _mm512_cvtepi32_epi8(q));
            }
        }
}

T_VNNI static void qgate_fixed_vnni(int8_t *y, const int8_t *x, const int8_t *g, int n,
                                    size_t hw, int c, const tern_qgate_params *p)
{
    const __m512i xzp = _mm512_set1_epi32(p->x_zp), gzp = _mm512_set1_epi32(p->g_zp);
    const __m512i zp = _mm512_set1_epi32(p->out_zp);
    const __m512i lo = _mm512_set1_epi32(-128 - p->out_zp), hi = _mm512_set1_epi32(127 - p->out_zp);
    const rqx16 pm = rqx16_make(_mm512_set1_epi32(p->mult), _mm512_set1_epi32(p->shift));
    const bool left = p->shift > 0;
    for (int i = 0; i < n; i++)
        for (int k = 0; k < c; k += 16) {
            __mmask16 m = q_tail_mask16((size_t)(c - k));
            __m512i gv = _mm512_sub_epi32(
                _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, g + (size_t)i * c + k)), gzp);
            for (size_t j = 0; j < hw; j++) {
                size_t at = ((size_t)i * hw + j) * c + k;
                __m512i xi = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, x + at));
                __m512i prod = _mm512_mullo_epi32(_mm512_sub_epi32(xi, xzp), gv);
                __m512i q = left ? mbqm16(prod, &pm, true) : mbqm16(prod, &pm, false);
                q = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q, lo), hi), zp);
                _mm_mask_storeu_epi8(y + at, m, _mm512_cvtepi32_epi8(q));
            }
        }
}

void tern_qgate(int8_t *y, const int8_t *x, const int8_t *g, int n, size_t hw, int c,
                const tern_qgate_params *p, tern_qisa isa)
{
    if (tern_qisa_resolve(isa) == TERN_QISA_AVX512_VNNI && p->mode == TERN_REQUANT_FIXED)
        qgate_fixed_vnni(y, x, g, n, hw, c, p);
    else if (tern_qisa_resolve(isa) == TERN_QISA_AVX512_VNNI)
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

T_VNNI static void quantize_vnni(int8_t *y, const float *x, size_t count, tern_qparams p)
{
    const q16 c = q16_make(p);
    for (size_t i = 0; i < count; i += 16) {
        __mmask16 m = q_tail_mask16(count - i);
        _mm_mask_storeu_epi8(y + i, m, _mm512_cvtepi32_epi8(quantize16(_mm512_maskz_loadu_ps(m, x + i), &c)));
    }
}

void tern_quantize_array(int8_t *y, const float *x, size_t count, tern_qparams p, tern_qisa isa)
{
    if (tern_qisa_resolve(isa) == TERN_QISA_AVX512_VNNI)
        quantize_vnni(y, x, count, p);
    else
        tern_quantize_ref(y, x, count, p);
}
