/* Integer GEMM of the INT8 model: y = requant(bias + (a - a_zp) w^T), int8 activations (M, K)
 * times int8 weights (N, K), int32 accumulation.
 *
 * Zero points. The vector instructions multiply unsigned by signed bytes (vpdpbusd). At the
 * AVX-512 level the weights are packed as the unsigned operand, w + 128 in [1, 255], and the
 * activations stay signed, so that a row's 4 bytes go straight from a broadcast load into
 * vpdpbusd: sum (a - a_zp) w = sum a (w + 128) - 128 sum_k a - a_zp sum_k w, the last term
 * (per output column) folded into the bias when the weights are packed, the middle one (per
 * row) computed once per row block with vpsadbw. The scalar level reads the activations as
 * a + 128 instead: sum (a + 128) w - (a_zp + 128) sum_k w. All of it is exact int32
 * arithmetic, so the result is bit-identical to the reference's direct sum.
 *
 * Levels:
 *   AVX-512 VNNI: weights packed in 16-column by 4-deep blocks (one zmm per block, the layout
 *     vpdpbusd reads); the microkernel holds a 6-row by 64-column tile in 24 accumulators, reads
 *     4 bytes of a row of A at a time (one broadcast load) and issues 4 vpdpbusd on it. The
 *     epilogue requantizes 16 columns per vector in single precision (convert, multiply,
 *     clamp, convert, zero point) or in fixed point (nn/qsimd512.h's mbqm16: two vpmuldq,
 *     rounding shift), then the lookup table with two vpermi2b.
 *   AVX2: no byte dot product that cannot saturate (vpmaddubsw saturates its int16 pairs at
 *     255 * 127 * 2), so it widens: A rows are converted once per row block into int16 pairs of
 *     a + 128 (scratch), weights packed as int16 pairs, and vpmaddwd sums pairs into int32 without
 *     saturation. 4-row by 24-column tiles; scalar requantization in float mode, 8 columns per
 *     vector in fixed mode (nn/qsimd256.h).
 *   scalar: the packed-bias formulation in plain C (the reference uses the direct one). */
#include <immintrin.h>
#include <string.h>

#include "qkernels.h"
#include "qsimd256.h"
#include "qsimd512.h"

#define T_AVX2 __attribute__((target("avx2")))
#define INLINE static inline __attribute__((always_inline))

#define VNNI_MR 6
#define VNNI_NV 4 /* zmm column vectors per tile: 64 columns */
#define AVX2_MR 4
#define AVX2_NV 3 /* ymm column vectors per tile: 24 columns */

static size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }
static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

static tern_qisa resolve(tern_qisa isa) { return tern_qisa_resolve(isa); }

/* Columns of the bias block (and of the packed weights) at each level. */
static size_t padded_n(size_t N, tern_qisa isa)
{
    return round_up(N, isa == TERN_QISA_AVX2 ? 8 : 16);
}

size_t tern_qgemm_packed_size(size_t N, size_t K, tern_qisa isa)
{
    isa = resolve(isa);
    size_t np = padded_n(N, isa), bias = np * sizeof(int32_t);
    switch (isa) {
    case TERN_QISA_AVX512_VNNI: return bias + np * round_up(K, 4);
    case TERN_QISA_AVX2: return bias + np * round_up(K, 2) * sizeof(int16_t);
    default: return bias + N * K;
    }
}

size_t tern_qgemm_workspace_size(size_t N, size_t K, tern_qisa isa)
{
    switch (resolve(isa)) {
    /* AVX2: int16 copies of a row block of A, rounded to whole vectors of 16. */
    case TERN_QISA_AVX2: return AVX2_MR * round_up(K, 16) * sizeof(int16_t);
    default: return 0;
    }
}

/* Wrapping int32 arithmetic (two's complement, as the vector adds): no undefined overflow. */
static inline int32_t wrap32(int64_t v) { return (int32_t)(uint32_t)(uint64_t)v; }

void tern_qgemm_pack(void *packed, const int8_t *w, const int32_t *bias, int32_t a_zp, size_t N,
                     size_t K, tern_qisa isa)
{
    isa = resolve(isa);
    size_t np = padded_n(N, isa);
    int32_t *b = packed;
    /* VNNI: sum (w + 128) a - 128 sum_k a (per row, at run time) - a_zp sum_k w; the other
     * levels: sum (a + 128) w - (a_zp + 128) sum_k w */
    const int64_t zfold = isa == TERN_QISA_AVX512_VNNI ? a_zp : (int64_t)a_zp + 128;
    for (size_t n = 0; n < np; n++) {
        int64_t colsum = 0;
        for (size_t k = 0; n < N && k < K; k++)
            colsum += w[n * K + k];
        b[n] = n < N ? wrap32((bias ? (int64_t)bias[n] : 0) - zfold * colsum) : 0;
    }
    char *wp = (char *)packed + np * sizeof(int32_t);
    if (isa == TERN_QISA_AVX512_VNNI) {
        size_t kp = round_up(K, 4);
        uint8_t *out = (uint8_t *)wp; /* [n / 16][k / 4][n % 16][k % 4], w + 128, padding 0 */
        for (size_t n = 0; n < np; n++)
            for (size_t k = 0; k < kp; k++)
                out[(n / 16) * kp * 16 + (k / 4) * 64 + (n % 16) * 4 + k % 4] =
                    n < N && k < K ? (uint8_t)(w[n * K + k] + 128) : 0;
    } else if (isa == TERN_QISA_AVX2) {
        size_t kp = round_up(K, 2);
        int16_t *out = (int16_t *)wp; /* [n / 8][k / 2][n % 8][k % 2] */
        for (size_t n = 0; n < np; n++)
            for (size_t k = 0; k < kp; k++)
                out[(n / 8) * kp * 8 + (k / 2) * 16 + (n % 8) * 2 + k % 2] =
                    n < N && k < K ? w[n * K + k] : 0;
    } else {
        memcpy(wp, w, N * K);
    }
}

void tern_qgemm_ref(int8_t *y, int32_t *y32, size_t ldy, const int8_t *a, size_t lda,
                    int32_t a_zp, const int8_t *w, const int32_t *bias, size_t M, size_t N,
                    size_t K, const tern_requant *rq)
{
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < N; n++) {
            int64_t acc = bias ? bias[n] : 0;
            for (size_t k = 0; k < K; k++)
                acc += ((int32_t)a[m * lda + k] - a_zp) * (int32_t)w[n * K + k];
            if (y32)
                y32[m * ldy + n] = wrap32(acc);
            else
                y[m * ldy + n] = tern_requant_one(wrap32(acc), rq, n);
        }
}

static void qgemm_scalar(int8_t *y, int32_t *y32, size_t ldy, const int8_t *a, size_t lda,
                         const void *packed, size_t M, size_t N, size_t K,
                         const tern_requant *rq)
{
    const int32_t *bias = packed;
    const int8_t *w = (const int8_t *)(bias + padded_n(N, TERN_QISA_SCALAR));
    for (size_t m = 0; m < M; m++)
        for (size_t n = 0; n < N; n++) {
            uint32_t acc = (uint32_t)bias[n];
            for (size_t k = 0; k < K; k++)
                acc += (uint32_t)((int32_t)(uint8_t)(a[m * lda + k] ^ 0x80) * w[n * K + k]);
            if (y32)
                y32[m * ldy + n] = (int32_t)acc;
            else
                y[m * ldy + n] = tern_requant_one((int32_t)acc, rq, n);
        }
}

/* ---- AVX-512 VNNI -------------------------------------------------------------------------- */

/* 4 bytes at p broadcast to every 32-bit lane; only n < 4 of them (zeros after) at the end of
 * K, read with a byte mask (a byte-wise copy into a word would stall the load on the stores). */
T_VNNI INLINE __m512i bcast4(const int8_t *p, size_t n)
{
    if (n == 4) {
        int32_t x;
        memcpy(&x, p, 4);
        return _mm512_set1_epi32(x);
    }
    return _mm512_broadcastd_epi32(_mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1), p));
}

/* Rows [0, mr) of A times 4 deep (bytes at a + 4 g, nk of them) into the accumulators. */
T_VNNI INLINE void vnni_step(const int mr, const int nv, __m512i acc[VNNI_MR][VNNI_NV],
                             const int8_t *a, size_t lda, const int8_t *wg, size_t bstride,
                             size_t nk)
{
    __m512i b[VNNI_NV];
    _Pragma("GCC unroll 8")
    for (int v = 0; v < nv; v++)
        b[v] = _mm512_load_si512(wg + v * bstride);
    _Pragma("GCC unroll 8")
    for (int r = 0; r < mr; r++) {
        /* the activations are the signed operand: a broadcast load, no ALU work */
        __m512i av = bcast4(a + r * lda, nk);
        _Pragma("GCC unroll 8")
        for (int v = 0; v < nv; v++)
            DPBUSD(acc[r][v], b[v], av);
    }
}

/* The fixed-point epilogue of vnni_tile: a full 64-column row into one zmm of bytes. */
T_VNNI INLINE void vnni_store_fixed(const int mr, const int nv, const bool has_lut,
                                    const bool left, int8_t *y, size_t ldy,
                                    __m512i acc[VNNI_MR][VNNI_NV], size_t ncols,
                                    const tern_requant *rq, const rqf16 *rf, const __m512i *lut,
                                    size_t n0)
{
    rqx16 px[VNNI_NV];
    _Pragma("GCC unroll 8")
    for (int v = 0; v < nv; v++)
        px[v] = rqx16_load(rq, n0 + 16 * (size_t)v, q_tail_mask16(ncols - 16 * (size_t)v));
    if (nv == VNNI_NV && ncols == 64) {
        _Pragma("GCC unroll 8")
        for (int r = 0; r < mr; r++) {
            __m512i b = requantx64(acc[r], px, rf, left);
            if (has_lut)
                b = lut512_apply(b, lut);
            _mm512_storeu_si512(y + r * ldy + n0, b);
        }
        return;
    }
    _Pragma("GCC unroll 8")
    for (int v = 0; v < nv; v++) {
        __mmask16 m = q_tail_mask16(ncols - 16 * (size_t)v);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < mr; r++)
            _mm_mask_storeu_epi8(y + r * ldy + n0 + 16 * (size_t)v, m,
                                 requantx16(acc[r][v], &px[v], rf, has_lut ? lut : NULL, left));
    }
}

/* One mr x (16 nv) tile of C. wb: the packed weights of its first column block; bstride: bytes
 * between column blocks; scale: the requantization scales of the tile's columns; lut: the
 * table as four zmm when has_lut. A full 64-column row is requantized into one zmm of bytes and
 * goes through the table once. */
T_VNNI INLINE void vnni_tile(const int mr, const int nv, const bool has_lut, int8_t *y,
                             int32_t *y32, size_t ldy, const int8_t *a, size_t lda,
                             const int32_t *rowsum128,
                             const int8_t *wb, size_t bstride, const int32_t *bias, size_t K,
                             size_t ncols, const tern_requant *rq, bool left, const rqf16 *rf,
                             const __m512i *lut, size_t n0)
{
    __m512i acc[VNNI_MR][VNNI_NV];
    _Pragma("GCC unroll 8")
    for (int v = 0; v < nv; v++) {
        /* sums start at the bias less 128 times the row's sum (the weights' +128) */
        const __m512i bv = _mm512_loadu_si512(bias + 16 * v);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < mr; r++)
            acc[r][v] = _mm512_sub_epi32(bv, _mm512_set1_epi32(rowsum128[r]));
    }
    const size_t full = K / 4;
    for (size_t g = 0; g < full; g++) /* a constant 4 bytes: one broadcast load */
        vnni_step(mr, nv, acc, a + 4 * g, lda, wb + g * 64, bstride, 4);
    if (K % 4)
        vnni_step(mr, nv, acc, a + 4 * full, lda, wb + full * 64, bstride, K % 4);
    if (y32) {
        _Pragma("GCC unroll 8")
        for (int v = 0; v < nv; v++) {
            __mmask16 m = q_tail_mask16(ncols - 16 * (size_t)v);
            _Pragma("GCC unroll 8")
            for (int r = 0; r < mr; r++)
                _mm512_mask_storeu_epi32(y32 + r * ldy + n0 + 16 * v, m, acc[r][v]);
        }
        return;
    }
    if (rq->mode == TERN_REQUANT_FIXED) {
        if (left)
            vnni_store_fixed(mr, nv, has_lut, true, y, ldy, acc, ncols, rq, rf, lut, n0);
        else
            vnni_store_fixed(mr, nv, has_lut, false, y, ldy, acc, ncols, rq, rf, lut, n0);
        return;
    }
    const float *scale = rq->scale + n0;
    if (nv == VNNI_NV && ncols == 64) {
        __m512 sv[VNNI_NV];
        _Pragma("GCC unroll 8")
        for (int v = 0; v < nv; v++)
            sv[v] = _mm512_loadu_ps(scale + 16 * v);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < mr; r++) {
            __m512i b = requantf64(acc[r], sv, rf);
            if (has_lut)
                b = lut512_apply(b, lut);
            _mm512_storeu_si512(y + r * ldy + n0, b);
        }
        return;
    }
    _Pragma("GCC unroll 8")
    for (int v = 0; v < nv; v++) {
        size_t n = n0 + 16 * (size_t)v;
        __mmask16 m = q_tail_mask16(ncols - 16 * (size_t)v);
        const __m512 sv = _mm512_maskz_loadu_ps(m, scale + 16 * v);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < mr; r++)
            _mm_mask_storeu_epi8(y + r * ldy + n, m,
                                 requantf16(acc[r][v], sv, rf, has_lut ? lut : NULL));
    }
}

#define VNNI_TILE(MR, NV)                                                                       \
    vnni_tile(MR, NV, LUT, y, y32, ldy, a, lda, rowsum128, wb, bstride, bias, K, ncols, rq,    \
              left, rf, lut, n0)

T_VNNI static void vnni_tile_any(int mr, int nv, bool has_lut, int8_t *y, int32_t *y32,
                                 size_t ldy, const int8_t *a, size_t lda,
                                 const int32_t *rowsum128, const int8_t *wb,
                                 size_t bstride, const int32_t *bias, size_t K, size_t ncols,
                                 const tern_requant *rq, bool left, const rqf16 *rf,
                                 const __m512i *lut, size_t n0)
{
#define ROW(MR)                                                                                 \
    switch (nv) {                                                                               \
    case 1: VNNI_TILE(MR, 1); break;                                                            \
    case 2: VNNI_TILE(MR, 2); break;                                                            \
    case 3: VNNI_TILE(MR, 3); break;                                                            \
    default: VNNI_TILE(MR, 4); break;                                                           \
    }
#define ROWS                                                                                    \
    switch (mr) {                                                                               \
    case 1: ROW(1) break;                                                                       \
    case 2: ROW(2) break;                                                                       \
    case 3: ROW(3) break;                                                                       \
    case 4: ROW(4) break;                                                                       \
    case 5: ROW(5) break;                                                                       \
    default: ROW(6) break;                                                                      \
    }
    if (has_lut) {
#define LUT true
        ROWS
#undef LUT
    } else {
#define LUT false
        ROWS
#undef LUT
    }
#undef ROWS
#undef ROW
}

T_VNNI static void qgemm_vnni(int8_t *y, int32_t *y32, size_t ldy, const int8_t *a, size_t lda,
                              const void *packed, void *workspace, size_t M, size_t N, size_t K,
                              const tern_requant *rq)
{
    (void)workspace;
    const rqf16 rf = y32 ? (rqf16){0} : rqf16_make(rq);
    const bool left = !y32 && tern_requant_left(rq, N);
    const size_t np = padded_n(N, TERN_QISA_AVX512_VNNI), kp = round_up(K, 4);
    const int32_t *bias = packed;
    const int8_t *w = (const int8_t *)(bias + np);
    const size_t bstride = kp * 16;
    __m512i tables[4];
    const __m512i *lut = NULL;
    if (!y32 && rq->lut) {
        for (int i = 0; i < 4; i++)
            tables[i] = _mm512_loadu_si512(rq->lut + 64 * i);
        lut = tables;
    }
    const __m512i zero = _mm512_setzero_si512(), flip = _mm512_set1_epi8((char)0x80);
    for (size_t m0 = 0; m0 < M; m0 += VNNI_MR) {
        int mr = (int)min_size(VNNI_MR, M - m0);
        int32_t rowsum128[VNNI_MR]; /* 128 sum_k a of each row: sums of (a + 128) less 128 K */
        for (int r = 0; r < mr; r++) {
            const int8_t *row = a + (m0 + (size_t)r) * lda;
            __m512i acc = zero;
            for (size_t k = 0; k < K; k += 64) {
                __mmask64 m = K - k >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (K - k)) - 1;
                __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, row + k), flip);
                acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_maskz_mov_epi8(m, u), zero));
            }
            int64_t sum = _mm512_reduce_add_epi64(acc) - 128 * (int64_t)K;
            rowsum128[r] = (int32_t)(uint32_t)((uint64_t)sum * 128);
        }
        for (size_t n0 = 0; n0 < N; n0 += 16 * VNNI_NV) {
            size_t ncols = min_size(16 * VNNI_NV, N - n0);
            int nv = (int)((ncols + 15) / 16);
            vnni_tile_any(mr, nv, lut != NULL, y ? y + m0 * ldy : NULL, y32 ? y32 + m0 * ldy : NULL, ldy,
                          a + m0 * lda, lda, rowsum128, w + (n0 / 16) * bstride, bstride,
                          bias + n0, K,
                          ncols, rq, left, &rf, lut, n0);
        }
    }
}

/* ---- AVX2 ------------------------------------------------------------------------------------ */

/* Rows [0, mr) of A as int16 a + 128, K rounded up to 16 with zeros (the weights' padding is
 * zero, so the padded products vanish). */
T_AVX2 static void avx2_panel(int16_t *panel, size_t kp16, const int8_t *a, size_t lda, int mr,
                              size_t K)
{
    const __m128i flip = _mm_set1_epi8((char)0x80);
    for (int r = 0; r < mr; r++) {
        const int8_t *row = a + (size_t)r * lda;
        int16_t *out = panel + (size_t)r * kp16;
        size_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m128i v = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(row + k)), flip);
            _mm256_storeu_si256((__m256i *)(out + k), _mm256_cvtepu8_epi16(v));
        }
        for (; k < kp16; k++)
            out[k] = k < K ? (int16_t)(uint8_t)(row[k] ^ 0x80) : 0;
    }
}

T_AVX2 INLINE void avx2_tile(const int mr, const int nv, int8_t *y, int32_t *y32, size_t ldy,
                             const int16_t *panel, size_t kp16, const int16_t *wb,
                             size_t bstride, const int32_t *bias, size_t K, size_t ncols,
                             const tern_requant *rq, size_t n0)
{
    __m256i acc[AVX2_MR][AVX2_NV];
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < nv; v++)
            acc[r][v] = _mm256_setzero_si256();
    const size_t pairs = (K + 1) / 2;
    for (size_t g = 0; g < pairs; g++) {
        __m256i b[AVX2_NV];
        for (int v = 0; v < nv; v++)
            b[v] = _mm256_load_si256((const __m256i *)(wb + v * bstride + g * 16));
        for (int r = 0; r < mr; r++) {
            int32_t pair;
            memcpy(&pair, panel + (size_t)r * kp16 + 2 * g, sizeof pair);
            __m256i av = _mm256_set1_epi32(pair);
            for (int v = 0; v < nv; v++)
                acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(av, b[v]));
        }
    }
    int32_t tile[AVX2_MR][AVX2_NV * 8] = {{0}};
    if (!y32 && rq->mode == TERN_REQUANT_FIXED) {
        /* the bias added and requantized in vectors (the weights' padding columns of the last
         * block read 8 multipliers past ncols: the packed bias has them, rq has not, so a
         * partial block goes through a copy) */
        for (int v = 0; v < nv; v++) {
            size_t n = n0 + 8 * (size_t)v, cols = ncols - 8 * (size_t)v;
            rqx8 px;
            if (cols >= 8) {
                px = rqx8_load(rq, n);
            } else {
                int32_t m8[8] = {0}, s8[8] = {0};
                memcpy(m8, rq->multiplier + n, cols * sizeof(int32_t));
                memcpy(s8, rq->shift + n, cols * sizeof(int32_t));
                px = rqx8_make(_mm256_loadu_si256((const __m256i *)m8),
                               _mm256_loadu_si256((const __m256i *)s8));
            }
            const __m256i bv = _mm256_loadu_si256((const __m256i *)(bias + 8 * v));
            for (int r = 0; r < mr; r++)
                _mm256_storeu_si256((__m256i *)&tile[r][8 * v],
                                    requantx8_i32(_mm256_add_epi32(acc[r][v], bv), &px, rq));
        }
        for (int r = 0; r < mr; r++)
            for (size_t j = 0; j < ncols; j++) {
                int8_t q = (int8_t)tile[r][j];
                y[(size_t)r * ldy + n0 + j] = rq->lut ? rq->lut[(uint8_t)q] : q;
            }
        return;
    }
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < nv; v++)
            _mm256_storeu_si256((__m256i *)&tile[r][8 * v], acc[r][v]);
    for (int r = 0; r < mr; r++)
        for (size_t j = 0; j < ncols; j++) {
            int32_t s = (int32_t)((uint32_t)tile[r][j] + (uint32_t)bias[j]);
            if (y32)
                y32[(size_t)r * ldy + n0 + j] = s;
            else
                y[(size_t)r * ldy + n0 + j] = tern_requant_one(s, rq, n0 + j);
        }
}

T_AVX2 static void avx2_tile_any(int mr, int nv, int8_t *y, int32_t *y32, size_t ldy,
                                 const int16_t *panel, size_t kp16, const int16_t *wb,
                                 size_t bstride, const int32_t *bias, size_t K, size_t ncols,
                                 const tern_requant *rq, size_t n0)
{
#define T(MR, NV) avx2_tile(MR, NV, y, y32, ldy, panel, kp16, wb, bstride, bias, K, ncols, rq, n0)
#define ROW(MR)                                                                                 \
    switch (nv) {                                                                               \
    case 1: T(MR, 1); break;                                                                    \
    case 2: T(MR, 2); break;                                                                    \
    default: T(MR, 3); break;                                                                   \
    }
    switch (mr) {
    case 1: ROW(1) break;
    case 2: ROW(2) break;
    case 3: ROW(3) break;
    default: ROW(4) break;
    }
#undef ROW
#undef T
}

T_AVX2 static void qgemm_avx2(int8_t *y, int32_t *y32, size_t ldy, const int8_t *a, size_t lda,
                              const void *packed, void *workspace, size_t M, size_t N, size_t K,
                              const tern_requant *rq)
{
    const size_t np = padded_n(N, TERN_QISA_AVX2), kp = round_up(K, 2), kp16 = round_up(K, 16);
    const int32_t *bias = packed;
    const int16_t *w = (const int16_t *)(bias + np);
    const size_t bstride = kp * 8; /* int16 per 8-column block */
    int16_t *panel = workspace;
    for (size_t m0 = 0; m0 < M; m0 += AVX2_MR) {
        int mr = (int)min_size(AVX2_MR, M - m0);
        avx2_panel(panel, kp16, a + m0 * lda, lda, mr, K);
        for (size_t n0 = 0; n0 < N; n0 += 8 * AVX2_NV) {
            size_t ncols = min_size(8 * AVX2_NV, N - n0);
            int nv = (int)((ncols + 7) / 8);
            avx2_tile_any(mr, nv, y ? y + m0 * ldy : NULL, y32 ? y32 + m0 * ldy : NULL, ldy,
                          panel, kp16, w + (n0 / 8) * bstride, bstride, bias + n0, K, ncols, rq,
                          n0);
        }
    }
}

void tern_qgemm(int8_t *y, int32_t *y32, size_t ldy, const int8_t *a, size_t lda,
                const void *packed, void *workspace, size_t M, size_t N, size_t K,
                const tern_requant *rq, tern_qisa isa)
{
    switch (resolve(isa)) {
    case TERN_QISA_AVX512_VNNI:
        qgemm_vnni(y, y32, ldy, a, lda, packed, workspace, M, N, K, rq);
        return;
    case TERN_QISA_AVX2: qgemm_avx2(y, y32, ldy, a, lda, packed, workspace, M, N, K, rq); return;
    default: qgemm_scalar(y, y32, ldy, a, lda, packed, M, N, K, rq); return;
    }
}

/* ---- im2col ------------------------------------------------------------------------------- */

/* memcpy for the short runs of im2col (k * cin bytes, 9 for the stem): constant-size copies
 * the compiler inlines, overlapping at the end. */
static inline void copy_short(int8_t *dst, const int8_t *src, size_t n)
{
    if (n >= 16) {
        memcpy(dst, src, n);
    } else if (n >= 8) {
        memcpy(dst, src, 8);
        memcpy(dst + n - 8, src + n - 8, 8);
    } else if (n >= 4) {
        memcpy(dst, src, 4);
        memcpy(dst + n - 4, src + n - 4, 4);
    } else {
        for (size_t i = 0; i < n; i++)
            dst[i] = src[i];
    }
}

void tern_qim2col(int8_t *col, size_t ldc, const int8_t *x, int32_t x_zp,
                  const tern_conv_params *p)
{
    const int k = p->k;
    const size_t cin = (size_t)p->cin, run = (size_t)k * cin;
    for (int n = 0; n < p->n; n++)
        for (int oy = 0; oy < p->oh; oy++)
            for (int ox = 0; ox < p->ow; ox++) {
                int8_t *row = col + (((size_t)n * p->oh + oy) * p->ow + ox) * ldc;
                int ix0 = ox * p->stride - p->pad;
                bool inside = ix0 >= 0 && ix0 + k <= p->w;
                for (int ky = 0; ky < k; ky++) {
                    int iy = oy * p->stride - p->pad + ky;
                    int8_t *dst = row + (size_t)ky * run;
                    if (iy < 0 || iy >= p->h) {
                        memset(dst, (int8_t)x_zp, run);
                        continue;
                    }
                    const int8_t *src = x + (((size_t)n * p->h + iy) * p->w) * cin;
                    if (inside) { /* the k taps of a row are contiguous in NHWC */
                        copy_short(dst, src + (size_t)ix0 * cin, run);
                        continue;
                    }
                    for (int kx = 0; kx < k; kx++) {
                        int ix = ix0 + kx;
                        if (ix < 0 || ix >= p->w)
                            memset(dst + (size_t)kx * cin, (int8_t)x_zp, cin);
                        else
                            copy_short(dst + (size_t)kx * cin, src + (size_t)ix * cin, cin);
                    }
                }
            }
}

/* ---- direct dense convolution ------------------------------------------------------------ */

static size_t direct_groups(const tern_conv_params *p)
{
    return ((size_t)p->k * (size_t)p->cin + 3) / 4;
}

bool tern_qconv_direct_supported(const tern_conv_params *p)
{
    return p->groups == 1 && p->k * p->cin <= 64;
}

size_t tern_qconv_direct_packed_size(const tern_conv_params *p, tern_qisa isa)
{
    size_t np = round_up((size_t)p->cout, 16), kk = (size_t)p->k * p->k * p->cin;
    if (resolve(isa) == TERN_QISA_AVX512_VNNI)
        return np * sizeof(int32_t) + np * (size_t)p->k * direct_groups(p) * 4;
    return np * sizeof(int32_t) + round_up((size_t)p->cout * kk, 64);
}

void tern_qconv_direct_pack(void *packed, const int8_t *w, const int32_t *bias, int32_t x_zp,
                            const tern_conv_params *p, tern_qisa isa)
{
    const size_t cout = (size_t)p->cout, cin = (size_t)p->cin, k = (size_t)p->k;
    const size_t kk = k * k * cin, np = round_up(cout, 16);
    int32_t *b = packed;
    if (resolve(isa) != TERN_QISA_AVX512_VNNI) { /* bias, then the weights as given */
        for (size_t n = 0; n < np; n++)
            b[n] = n < cout && bias ? bias[n] : 0;
        memcpy(b + np, w, cout * kk);
        return;
    }
    const size_t G = direct_groups(p);
    int8_t *out = (int8_t *)(b + np); /* [n / 16][ky][g][n % 16][4] */
    for (size_t n = 0; n < np; n++) {
        int64_t sum = 0;
        for (size_t j = 0; n < cout && j < kk; j++)
            sum += w[n * kk + j];
        b[n] = n < cout ? wrap32((bias ? (int64_t)bias[n] : 0) - ((int64_t)x_zp + 128) * sum) : 0;
        for (size_t ky = 0; ky < k; ky++)
            for (size_t j = 0; j < 4 * G; j++) { /* byte j of the row: tap kx = j / cin, ci */
                size_t kx = j / cin, ci = j % cin;
                out[(((n / 16) * k + ky) * G + j / 4) * 64 + (n % 16) * 4 + j % 4] =
                    n < cout && j < k * cin ? w[((n * cin + ci) * k + ky) * k + kx] : 0;
            }
    }
}

/* The padded image: (H + 2 pad) rows of (W + 2 pad) pixels, plus 64 spare bytes. */
static size_t direct_padded_size(const tern_conv_params *p)
{
    return (size_t)(p->h + 2 * p->pad) * (size_t)(p->w + 2 * p->pad) * (size_t)p->cin + 64;
}

size_t tern_qconv_direct_workspace_size(const tern_conv_params *p, tern_qisa isa)
{
    return resolve(isa) == TERN_QISA_AVX512_VNNI ? round_up(direct_padded_size(p), 64) : 0;
}

static void direct_scalar(int8_t *y, const int8_t *x, int32_t x_zp, const void *packed,
                          const tern_conv_params *p, const tern_requant *rq)
{
    const int32_t *bias = packed;
    const int8_t *w = (const int8_t *)(bias + round_up((size_t)p->cout, 16));
    const size_t cin = (size_t)p->cin;
    for (int n = 0; n < p->n; n++)
        for (int oy = 0; oy < p->oh; oy++)
            for (int ox = 0; ox < p->ow; ox++)
                for (int co = 0; co < p->cout; co++) {
                    uint32_t acc = (uint32_t)bias[co];
                    for (int ky = 0; ky < p->k; ky++)
                        for (int kx = 0; kx < p->k; kx++) {
                            int iy = oy * p->stride - p->pad + ky, ix = ox * p->stride - p->pad + kx;
                            if (iy < 0 || iy >= p->h || ix < 0 || ix >= p->w)
                                continue;
                            for (size_t ci = 0; ci < cin; ci++)
                                acc += (uint32_t)(((int32_t)x[(((size_t)n * p->h + iy) * p->w + ix) * cin + ci] - x_zp) *
                                                  w[(((size_t)co * cin + ci) * p->k + ky) * p->k + kx]);
                        }
                    y[(((size_t)n * p->oh + oy) * p->ow + ox) * p->cout + co] =
                        tern_requant_one((int32_t)acc, rq, (size_t)co);
                }
}

/* One block of 16 output channels (from c0) over an image: K kernel rows of G groups. */
T_VNNI INLINE void direct_block(const int K, const int G, const bool has_lut, const int rqm,
                                int8_t *y, const uint8_t *u, size_t row, const int8_t *wb,
                                const int32_t *bias, const tern_requant *rq, size_t c0,
                                const rqf16 *rf, __mmask16 m, const tern_conv_params *p)
{
    const int8_t *table = rq->lut;
    __m512i tables[4];
    for (int i = 0; has_lut && i < 4; i++)
        tables[i] = _mm512_loadu_si512(table + 64 * i);
    const __m512i *lut = has_lut ? tables : NULL;
    __m512i w[7][16];
    for (int ky = 0; ky < K; ky++)
        for (int g = 0; g < G; g++)
            w[ky][g] = _mm512_load_si512(wb + (ky * G + g) * 64);
    const __m512i b = _mm512_maskz_loadu_epi32(m, bias);
    const bool fixed = rqm != RQ_FLOAT;
    const __m512 sv = fixed ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, rq->scale + c0);
    const rqx16 px = fixed ? rqx16_load(rq, c0, m) : (rqx16){0};
#define REQ(acc)                                                                                \
    (fixed ? requantx16(acc, &px, rf, lut, rqm == RQ_FIXED_LEFT) : requantf16(acc, sv, rf, lut))
    const size_t cin = (size_t)p->cin, s = (size_t)p->stride, C = (size_t)p->cout;
    for (int oy = 0; oy < p->oh; oy++) {
        const uint8_t *top = u + (size_t)oy * s * row;
        int8_t *out = y + (size_t)oy * p->ow * C;
        int ox = 0;
        /* four pixels at a time, two partial sums each: eight independent chains */
        for (; ox + 4 <= p->ow; ox += 4) {
            __m512i acc[4][2];
            for (int j = 0; j < 4; j++) {
                acc[j][0] = b;
                acc[j][1] = _mm512_setzero_si512();
            }
            for (int ky = 0; ky < K; ky++)
                for (int g = 0; g < G; g++)
                    for (int j = 0; j < 4; j++) {
                        int32_t four;
                        memcpy(&four, top + (size_t)(ox + j) * s * cin + (size_t)ky * row + 4 * (size_t)g, 4);
                        DPBUSD(acc[j][(ky * G + g) & 1], _mm512_set1_epi32(four), w[ky][g]);
                    }
            for (int j = 0; j < 4; j++)
                _mm_mask_storeu_epi8(out + (size_t)(ox + j) * C, m,
                                     REQ(_mm512_add_epi32(acc[j][0], acc[j][1])));
        }
        for (; ox < p->ow; ox++) {
            const uint8_t *at = top + (size_t)ox * s * cin;
            __m512i acc = b;
            for (int ky = 0; ky < K; ky++)
                for (int g = 0; g < G; g++) {
                    int32_t four;
                    memcpy(&four, at + (size_t)ky * row + 4 * (size_t)g, 4);
                    DPBUSD(acc, _mm512_set1_epi32(four), w[ky][g]);
                }
            _mm_mask_storeu_epi8(out + (size_t)ox * C, m, REQ(acc));
        }
    }
#undef REQ
}

/* The padded unsigned copy of image n: borders x_zp + 128, then each row from x (int8) or xf
 * (float, quantized with xp). */
T_VNNI static void direct_pad(uint8_t *u, const int8_t *x, const float *xf, tern_qparams xp,
                              int32_t x_zp, int n, const tern_conv_params *p)
{
    const size_t cin = (size_t)p->cin, wp = (size_t)(p->w + 2 * p->pad), row = wp * cin;
    const size_t hp = (size_t)(p->h + 2 * p->pad), len = (size_t)p->w * cin;
    const size_t left = (size_t)p->pad * cin;
    const uint8_t fill = (uint8_t)(x_zp + 128);
    memset(u, fill, (size_t)p->pad * row);
    memset(u + (size_t)(p->pad + p->h) * row, fill, (hp - (size_t)(p->pad + p->h)) * row + 64);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i flip32 = _mm512_set1_epi32(128);
    const q16 c = q16_make(xp);
    for (int iy = 0; iy < p->h; iy++) {
        uint8_t *dst = u + (size_t)(iy + p->pad) * row;
        memset(dst, fill, left);
        memset(dst + left + len, fill, row - left - len);
        dst += left;
        size_t at = ((size_t)n * p->h + iy) * len;
        if (xf) {
            for (size_t i = 0; i < len; i += 16) {
                __mmask16 m = q_tail_mask16(len - i);
                __m512i q = quantize16(_mm512_maskz_loadu_ps(m, xf + at + i), &c);
                _mm_mask_storeu_epi8(dst + i, m, _mm512_cvtepi32_epi8(_mm512_add_epi32(q, flip32)));
            }
            continue;
        }
        for (size_t i = 0; i < len; i += 64) {
            __mmask64 m = len - i >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (len - i)) - 1;
            _mm512_mask_storeu_epi8(dst + i, m,
                                    _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, x + at + i), flip));
        }
    }
}

T_VNNI static void direct_vnni(int8_t *y, const int8_t *x, const float *xf, tern_qparams xp,
                               int32_t x_zp, const void *packed, void *workspace,
                               const tern_conv_params *p, const tern_requant *rq)
{
    const size_t cin = (size_t)p->cin, C = (size_t)p->cout, np = round_up(C, 16);
    const size_t wp = (size_t)(p->w + 2 * p->pad), row = wp * cin;
    const int k = p->k, G = (int)direct_groups(p);
    const int32_t *bias = packed;
    const int8_t *w = (const int8_t *)(bias + np);
    uint8_t *u = workspace;
    const rqf16 rf = rqf16_make(rq);
    const int rqm = rq_kind(rq, C);
    for (int n = 0; n < p->n; n++) {
        direct_pad(u, x, xf, xp, x_zp, n, p);
        int8_t *yn = y + (size_t)n * p->oh * p->ow * C;
        for (size_t b = 0; b < np / 16; b++) {
            __mmask16 m = q_tail_mask16(C - 16 * b);
            const int8_t *wb = w + b * (size_t)k * G * 64;
            const bool t = rq->lut != NULL;
#define DB(K, G, L, X)                                                                          \
    direct_block(K, G, L, X, yn + 16 * b, u, row, wb, bias + 16 * b, rq, 16 * b, &rf, m, p)
#define DBX(K, G, L)                                                                            \
    (rqm == RQ_FLOAT ? DB(K, G, L, RQ_FLOAT)                                                    \
                     : rqm == RQ_FIXED ? DB(K, G, L, RQ_FIXED) : DB(K, G, L, RQ_FIXED_LEFT))
            if (k == 3 && G == 3)
                t ? DBX(3, 3, true) : DBX(3, 3, false);
            else if (k == 3 && G == 1)
                t ? DBX(3, 1, true) : DBX(3, 1, false);
            else
                t ? DBX(k, G, true) : DBX(k, G, false);
#undef DBX
#undef DB
        }
    }
}

void tern_qconv_direct(int8_t *y, const int8_t *x, int32_t x_zp, const void *packed,
                       void *workspace, const tern_conv_params *p, const tern_requant *rq,
                       tern_qisa isa)
{
    if (resolve(isa) == TERN_QISA_AVX512_VNNI)
        direct_vnni(y, x, NULL, (tern_qparams){1, 0}, x_zp, packed, workspace, p, rq);
    else
        direct_scalar(y, x, x_zp, packed, p, rq);
}

void tern_qconv_direct_f32(int8_t *y, int8_t *xq_scratch, const float *x, tern_qparams xp,
                           const void *packed, void *workspace, const tern_conv_params *p,
                           const tern_requant *rq, tern_qisa isa)
{
    if (resolve(isa) == TERN_QISA_AVX512_VNNI) {
        direct_vnni(y, NULL, x, xp, xp.zero_point, packed, workspace, p, rq);
        return;
    }
    tern_quantize_array(xq_scratch, x, (size_t)p->n * p->h * p->w * p->cin, xp, isa);
    direct_scalar(y, xq_scratch, xp.zero_point, packed, p, rq);
}
