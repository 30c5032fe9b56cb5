/* Single-precision GEMM in the Goto/BLIS style, one microkernel per ISA level.
 *
 * Blocking (per thread, on its own block of C):
 *   for jc over N in NC columns:                 B block (KC x NC) packed into scratch in
 *     for pc over K in KC steps:                 NR-wide slivers, zero padded, both B layouts
 *       pack B(pc.., jc..)                       (plain or transposed) handled by the packer
 *       for ic over M in MC rows:
 *         for jr over the block in NR columns:   one B sliver stays in L1
 *           for ir over MC in MR rows:           microkernel: MR x NR tile of C, kc FMAs deep
 * A is not packed: whole MR-row slivers are read in place (row-major A: MR row streams; a
 * transposed A: MR contiguous floats per k). Only the last MR-partial sliver of each MC block
 * is copied, zero padded, into a small buffer, so kernels never read past A. The first K block
 * overwrites C (unless accumulating), later ones add to it, and the last applies the epilogue
 * (bias, residual, activation) in registers before the one store of the tile.
 *
 * Fusions for inference (tern_gemm_fused): a residual added in that epilogue (bit-identical to
 * a separate add); a per-K scale applied to B as it is packed (a squeeze-and-excitation gate);
 * and B packed once ahead of time (constant folded weights), in the same layout the per-call
 * packing produces, so the kernels and results are the same with or without it. For training,
 * column statistics (sums of C and C^2 in double, per thread) are taken from each finished tile
 * right after its store, while it is in L1: BatchNorm then skips its statistics pass.
 *
 * Microkernels: AVX-512 12x32 (24 zmm accumulators), AVX2+FMA 6x16 (12 ymm), scalar C 4x16.
 * Column tails are computed on zero-padded B and stored with masks; a tail of at most half a
 * tile runs a half-width variant, and with AVX-512 a row tail of a few rows (the 49th pixel
 * of a 7x7 layer) runs a 2-, 4- or 8-row variant.
 *
 * Small M (at most SMALL_M rows, e.g. the classifier at batch 1) skips packing: with AVX-512,
 * transposed B (weights (N, K)) is read as rows by a dot-product kernel (for one row of A, a
 * GEMV that streams 8 rows of B with prefetching) and plain B by an axpy kernel; all stream B
 * once.
 *
 * Threads split C: over M in MR-row units or over N in NR-column units, whichever is
 * larger. Each C element is computed by one thread in the same K order whatever the thread
 * count, so results depend only on the shape and the ISA. The exception is opt-in
 * (tern_gemm_fusion.k_split, for weight gradients): a small C over a long K is split along K,
 * each thread writing a partial product into its pool partial buffer and the caller adding
 * them in thread order, so results are reproducible for a given thread count only. No
 * allocation: packing buffers live in the pool's per-thread scratch. */
#include "gemm.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "simd_act.h"
#include "util.h"

#define KC 256
#define MC 240          /* multiple of every MR */
#define MR_MAX 12
#define NR_MAX 32
#define AP_FLOATS (MR_MAX * KC)
/* B block: what is left of the scratch, in whole NR_MAX slivers. */
#define NC ((TERN_POOL_SCRATCH_FLOATS - AP_FLOATS) / KC / NR_MAX * NR_MAX)
#define SMALL_M 4

#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#define INLINE static inline __attribute__((always_inline))

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

/* The same expressions, in the same order, as tern_act_forward. */
static inline float act_scalar(float t, tern_act act)
{
    switch (act) {
    case TERN_ACT_NONE: break;
    case TERN_ACT_RELU: return t > 0 ? t : 0;
    case TERN_ACT_HARDSWISH: return t * fminf(fmaxf(t + 3, 0), 6) / 6;
    case TERN_ACT_HARDSIGMOID: return fminf(fmaxf(t + 3, 0), 6) / 6;
    }
    return t;
}

/* Final value of one element: [C +] sum, + bias, + residual, act. */
static inline float finish_scalar(const float *c, float sum, bool load_c, const float *bias,
                                  const float *res, tern_act act)
{
    float t = load_c ? *c + sum : sum;
    if (bias)
        t = t + *bias;
    if (res)
        t = t + *res;
    return act_scalar(t, act);
}

/* ---- problem description and microkernel interface ------------------------------------------ */

typedef struct gemm_problem {
    float *c;
    size_t ldc;
    const float *a;
    size_t lda;
    bool ta;
    const float *b;
    size_t ldb;
    bool tb;
    size_t m, n, k;
    bool accumulate;
    const float *bias;
    const float *res;     /* residual, layout of C (row stride ldc), or NULL */
    const float *k_scale; /* (K) scale of op(B)'s rows, or NULL */
    /* Prepacked B (see packed_offset), or NULL; col0 is the column of the whole problem's
     * B where this (sub)problem starts, npad that problem's N rounded up to NR. */
    const float *packed;
    size_t col0, npad;
    /* Column statistics of the final C, or NULL: stats[j] += C(i, j), stats[stats_ld + j] +=
     * C(i, j)^2 in double, rows in increasing order (this thread's part; see col_stats). */
    double *stats;
    size_t stats_ld;
    tern_act act;
} gemm_problem;

typedef struct ukr_args {
    size_t kc;
    const float *a;    /* element (i, k) at a[i * rs_a + k * cs_a] */
    size_t rs_a, cs_a;
    bool a_rows;       /* cs_a == 1 (MR row streams), else rs_a == 1 (MR floats per k) */
    const float *b;    /* packed sliver: element (k, j) at b[k * NR + j], zero padded */
    float *c;
    size_t ldc;
    size_t mr, nr;     /* rows and columns of the tile inside C */
    bool load_c;       /* add to C (later K blocks, or accumulate) */
    const float *bias; /* bias of the tile's first column, or NULL; only on the last K block */
    const float *res;  /* residual of the tile's first element (row stride ldc), or NULL; only
                        * on the last K block */
    tern_act act;      /* TERN_ACT_NONE except on the last K block */
} ukr_args;

typedef void (*ukr_fn)(const ukr_args *u);

/* Packs B(pc.., jc..) (kc x nc) into NR-wide slivers: sliver s holds element (k, j) at
 * bp[s * kc * NR + k * NR + j], columns past nc zero. b points at B(pc, jc); ks (kc scales of
 * the block's rows, from k_scale + pc) multiplies row k, or is NULL. */
typedef void (*pack_b_fn)(float *bp, const float *b, size_t ldb, bool tb, size_t kc, size_t nc,
                          size_t NR, const float *ks);

typedef struct isa_desc {
    tern_isa isa;
    size_t mr, nr;
    ukr_fn kernel;
    pack_b_fn pack_b;
    /* Direct path for m <= SMALL_M (not both operands transposed), or NULL. */
    void (*small_m)(const gemm_problem *p);
} isa_desc;

/* ---- scalar microkernel ------------------------------------------------------------------------ */

#define SC_MR 4
#define SC_NR 16

static void ukr_scalar(const ukr_args *u)
{
    float acc[SC_MR][SC_NR] = {{0}};
    for (size_t k = 0; k < u->kc; k++) {
        const float *b = u->b + k * SC_NR;
        for (size_t i = 0; i < SC_MR; i++) {
            const float ai = u->a[i * u->rs_a + k * u->cs_a];
            for (size_t j = 0; j < SC_NR; j++)
                acc[i][j] += ai * b[j];
        }
    }
    for (size_t i = 0; i < u->mr; i++) {
        float *c = u->c + i * u->ldc;
        const float *r = u->res ? u->res + i * u->ldc : NULL;
        for (size_t j = 0; j < u->nr; j++)
            c[j] = finish_scalar(c + j, acc[i][j], u->load_c, u->bias ? u->bias + j : NULL,
                                 r ? r + j : NULL, u->act);
    }
}

/* ---- AVX-512 ------------------------------------------------------------------------------------ */

#define X5_MR 12
#define X5_NR 32

/* simd_act.h's: division by 6 without vdivps, the same bits. */
INLINE TARGET_AVX512 __m512 act_avx512(__m512 t, tern_act act)
{
    return act16(t, act);
}

INLINE TARGET_AVX512 __mmask16 mask16(size_t n)
{
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
}

/* Store [C +] t [+ bias] [+ res], act, to the lanes of c in mask. */
INLINE TARGET_AVX512 void store_avx512(float *c, __m512 t, __mmask16 mask, bool load_c,
                                       const float *bias, const float *res, tern_act act)
{
    if (load_c)
        t = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, c), t);
    if (bias)
        t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(mask, bias));
    if (res)
        t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(mask, res));
    _mm512_mask_storeu_ps(c, mask, act_avx512(t, act));
}

#define X5_FMA(i, ai)                                                                            \
    do {                                                                                         \
        if ((i) >= rows)                                                                         \
            break;                                                                               \
        const __m512 bc_ = _mm512_set1_ps(ai);                                                   \
        acc[i][0] = _mm512_fmadd_ps(bc_, b0, acc[i][0]);                                         \
        if (nv > 1)                                                                              \
            acc[i][1] = _mm512_fmadd_ps(bc_, b1, acc[i][1]);                                     \
    } while (0)

/* rows (a constant after inlining: 12, or fewer for the zero-padded tail sliver) is how many
 * accumulator rows are computed; each element's FMA sequence is the same in every variant. */
INLINE TARGET_AVX512 void ukr_avx512_body(const ukr_args *u, const int nv, const bool a_rows,
                                          const int rows)
{
    __m512 acc[X5_MR][2];
    for (int i = 0; i < X5_MR; i++)
        acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const float *b = u->b;
    if (a_rows) {
        /* Four row bases, the other rows at +rs and +2rs: base + index*scale addressing. */
        const size_t rs = u->rs_a;
        const float *a0 = u->a, *a3 = a0 + 3 * rs, *a6 = a0 + 6 * rs, *a9 = a0 + 9 * rs;
        for (size_t k = 0; k < u->kc; k++) {
            const __m512 b0 = _mm512_load_ps(b);
            const __m512 b1 = nv > 1 ? _mm512_load_ps(b + 16) : b0;
            X5_FMA(0, a0[0]);
            X5_FMA(1, a0[rs]);
            X5_FMA(2, a0[2 * rs]);
            X5_FMA(3, a3[0]);
            X5_FMA(4, a3[rs]);
            X5_FMA(5, a3[2 * rs]);
            X5_FMA(6, a6[0]);
            X5_FMA(7, a6[rs]);
            X5_FMA(8, a6[2 * rs]);
            X5_FMA(9, a9[0]);
            X5_FMA(10, a9[rs]);
            X5_FMA(11, a9[2 * rs]);
            a0++, a3++, a6++, a9++;
            b += X5_NR;
        }
    } else {
        const size_t cs = u->cs_a;
        const float *a = u->a;
        for (size_t k = 0; k < u->kc; k++) {
            const __m512 b0 = _mm512_load_ps(b);
            const __m512 b1 = nv > 1 ? _mm512_load_ps(b + 16) : b0;
            X5_FMA(0, a[0]);
            X5_FMA(1, a[1]);
            X5_FMA(2, a[2]);
            X5_FMA(3, a[3]);
            X5_FMA(4, a[4]);
            X5_FMA(5, a[5]);
            X5_FMA(6, a[6]);
            X5_FMA(7, a[7]);
            X5_FMA(8, a[8]);
            X5_FMA(9, a[9]);
            X5_FMA(10, a[10]);
            X5_FMA(11, a[11]);
            a += cs;
            b += X5_NR;
        }
    }
    const __mmask16 m0 = mask16(u->nr), m1 = u->nr > 16 ? mask16(u->nr - 16) : 0;
    const float *bias1 = u->bias ? u->bias + 16 : NULL;
    for (int i = 0; i < X5_MR; i++) {
        if ((size_t)i >= u->mr)
            break;
        float *c = u->c + (size_t)i * u->ldc;
        const float *r = u->res ? u->res + (size_t)i * u->ldc : NULL;
        store_avx512(c, acc[i][0], m0, u->load_c, u->bias, r, u->act);
        if (nv > 1)
            store_avx512(c + 16, acc[i][1], m1, u->load_c, bias1, r ? r + 16 : NULL, u->act);
    }
}

static TARGET_AVX512 void ukr_avx512(const ukr_args *u)
{
    /* Full tiles read A in place (a_rows, or a transposed A: mr == X5_MR); a tail of a few rows
     * (e.g. the 49th pixel of a 7x7 layer) runs a shorter kernel instead of a whole tile. */
    if (u->nr > 16) {
        if (u->a_rows)
            ukr_avx512_body(u, 2, true, X5_MR);
        else if (u->mr <= 2)
            ukr_avx512_body(u, 2, false, 2);
        else if (u->mr <= 4)
            ukr_avx512_body(u, 2, false, 4);
        else if (u->mr <= 8)
            ukr_avx512_body(u, 2, false, 8);
        else
            ukr_avx512_body(u, 2, false, X5_MR);
    } else {
        if (u->a_rows)
            ukr_avx512_body(u, 1, true, X5_MR);
        else if (u->mr <= 4)
            ukr_avx512_body(u, 1, false, 4);
        else
            ukr_avx512_body(u, 1, false, X5_MR);
    }
}

/* Small M, transposed B (N x K rows, the weights): C[i][j] = dot(A row i, B row j), 4 rows of
 * B at a time against all (at most 4) rows of A, vectors along K. Rows past the end are
 * clamped to the last one (computed twice, stored once). Needs rows of A contiguous. */
static TARGET_AVX512 void small_m_dot_avx512(const gemm_problem *p)
{
    const size_t m = p->m, n = p->n, K = p->k;
    const float *arow[SMALL_M];
    for (size_t i = 0; i < SMALL_M; i++)
        arow[i] = p->a + min_size(i, m - 1) * p->lda;
    for (size_t j0 = 0; j0 < n; j0 += 4) {
        const size_t nb = min_size(4, n - j0);
        const float *brow[4];
        for (size_t j = 0; j < 4; j++)
            brow[j] = p->b + (j0 + min_size(j, nb - 1)) * p->ldb;
        __m512 acc[SMALL_M][4];
        for (int i = 0; i < SMALL_M; i++)
            for (int j = 0; j < 4; j++)
                acc[i][j] = _mm512_setzero_ps();
        for (size_t k = 0; k < K; k += 16) {
            const __mmask16 mk = mask16(K - k);
            __m512 bv[4];
            for (int j = 0; j < 4; j++)
                bv[j] = _mm512_maskz_loadu_ps(mk, brow[j] + k);
            for (int i = 0; i < SMALL_M; i++) {
                const __m512 av = _mm512_maskz_loadu_ps(mk, arow[i] + k);
                for (int j = 0; j < 4; j++)
                    acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
            }
        }
        for (size_t i = 0; i < m; i++)
            for (size_t j = 0; j < nb; j++) {
                float *c = p->c + i * p->ldc + j0 + j;
                *c = finish_scalar(c, _mm512_reduce_add_ps(acc[i][j]), p->accumulate,
                                   p->bias ? p->bias + j0 + j : NULL,
                                   p->res ? p->res + i * p->ldc + j0 + j : NULL, p->act);
            }
    }
}

/* Small M, plain B (K x N rows): C row i += A(i, k) * B row k, 64 columns at a time. */
static TARGET_AVX512 void small_m_axpy_avx512(const gemm_problem *p)
{
    const size_t m = p->m, n = p->n, K = p->k;
    size_t ri[SMALL_M]; /* A(i, k) at a[ri[i] + k * ck] */
    const size_t ck = p->ta ? p->lda : 1;
    for (size_t i = 0; i < SMALL_M; i++) {
        const size_t ii = min_size(i, m - 1);
        ri[i] = p->ta ? ii : ii * p->lda;
    }
    for (size_t j0 = 0; j0 < n; j0 += 64) {
        __mmask16 mk[4];
        for (size_t v = 0; v < 4; v++)
            mk[v] = j0 + 16 * v < n ? mask16(n - j0 - 16 * v) : 0;
        __m512 acc[SMALL_M][4];
        for (int i = 0; i < SMALL_M; i++)
            for (int v = 0; v < 4; v++)
                acc[i][v] = _mm512_setzero_ps();
        const float *a = p->a, *b = p->b + j0;
        for (size_t k = 0; k < K; k++) {
            __m512 bv[4];
            for (int v = 0; v < 4; v++)
                bv[v] = _mm512_maskz_loadu_ps(mk[v], b + 16 * v);
            for (int i = 0; i < SMALL_M; i++) {
                const __m512 av = _mm512_set1_ps(a[ri[i]]);
                for (int v = 0; v < 4; v++)
                    acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
            }
            a += ck;
            b += p->ldb;
        }
        for (size_t i = 0; i < m; i++)
            for (size_t v = 0; v < 4 && mk[v]; v++)
                store_avx512(p->c + i * p->ldc + j0 + 16 * v, acc[i][v], mk[v], p->accumulate,
                             p->bias ? p->bias + j0 + 16 * v : NULL,
                             p->res ? p->res + i * p->ldc + j0 + 16 * v : NULL, p->act);
    }
}

/* One row of A against transposed B: the classifier and the squeeze-and-excitation layers at
 * batch 1. Each weight is used once, so this streams B: 8 rows at a time (8 independent FMA
 * chains, one contiguous 8*K block since rows are adjacent), and the next block is prefetched
 * while this one is summed, since the hardware prefetchers ramp up too slowly on rows of a few
 * KB. Per element the sum order is that of small_m_dot_avx512 (16 lanes along K, then a lane
 * reduction), whatever block the element falls in. */
static TARGET_AVX512 void gemv_dot_avx512(const gemm_problem *p)
{
    const size_t n = p->n, K = p->k, ldb = p->ldb;
    const float *a = p->a;
    for (size_t j0 = 0; j0 < n; j0 += 8) {
        const size_t nb = min_size(8, n - j0);
        const float *brow[8], *pf[8];
        for (size_t j = 0; j < 8; j++) {
            brow[j] = p->b + (j0 + min_size(j, nb - 1)) * ldb;
            pf[j] = p->b + min_size(j0 + 8 + j, n - 1) * ldb;
        }
        __m512 acc[8];
        for (int j = 0; j < 8; j++)
            acc[j] = _mm512_setzero_ps();
        size_t k = 0;
        for (; k + 16 <= K; k += 16) {
            const __m512 av = _mm512_loadu_ps(a + k);
            for (int j = 0; j < 8; j++) {
                _mm_prefetch((const char *)(pf[j] + k), _MM_HINT_T0);
                acc[j] = _mm512_fmadd_ps(av, _mm512_loadu_ps(brow[j] + k), acc[j]);
            }
        }
        if (k < K) {
            const __mmask16 mk = mask16(K - k);
            const __m512 av = _mm512_maskz_loadu_ps(mk, a + k);
            for (int j = 0; j < 8; j++)
                acc[j] = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(mk, brow[j] + k), acc[j]);
        }
        for (size_t j = 0; j < nb; j++) {
            float *c = p->c + j0 + j;
            *c = finish_scalar(c, _mm512_reduce_add_ps(acc[j]), p->accumulate,
                               p->bias ? p->bias + j0 + j : NULL, p->res ? p->res + j0 + j : NULL,
                               p->act);
        }
    }
}

static void small_m_avx512(const gemm_problem *p)
{
    if (p->tb && p->m == 1)
        gemv_dot_avx512(p);
    else if (p->tb)
        small_m_dot_avx512(p);
    else
        small_m_axpy_avx512(p);
}

/* ---- AVX2 + FMA ---------------------------------------------------------------------------------- */

#define X2_MR 6
#define X2_NR 16

/* simd_act.h's: division by 6 without vdivps, the same bits. */
INLINE TARGET_AVX2 __m256 act_avx2(__m256 t, tern_act act)
{
    return act8(t, act);
}

INLINE TARGET_AVX2 __m256i mask8(size_t n)
{
    const int cnt = n >= 8 ? 8 : (int)n;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

INLINE TARGET_AVX2 void store_avx2(float *c, __m256 t, size_t cols, bool load_c,
                                   const float *bias, const float *res, tern_act act)
{
    if (cols >= 8) {
        if (load_c)
            t = _mm256_add_ps(_mm256_loadu_ps(c), t);
        if (bias)
            t = _mm256_add_ps(t, _mm256_loadu_ps(bias));
        if (res)
            t = _mm256_add_ps(t, _mm256_loadu_ps(res));
        _mm256_storeu_ps(c, act_avx2(t, act));
    } else {
        const __m256i mask = mask8(cols);
        if (load_c)
            t = _mm256_add_ps(_mm256_maskload_ps(c, mask), t);
        if (bias)
            t = _mm256_add_ps(t, _mm256_maskload_ps(bias, mask));
        if (res)
            t = _mm256_add_ps(t, _mm256_maskload_ps(res, mask));
        _mm256_maskstore_ps(c, mask, act_avx2(t, act));
    }
}

#define X2_FMA(i, ai)                                                                            \
    do {                                                                                         \
        const __m256 bc_ = _mm256_broadcast_ss(&(ai));                                           \
        acc[i][0] = _mm256_fmadd_ps(bc_, b0, acc[i][0]);                                         \
        if (nv > 1)                                                                              \
            acc[i][1] = _mm256_fmadd_ps(bc_, b1, acc[i][1]);                                     \
    } while (0)

INLINE TARGET_AVX2 void ukr_avx2_body(const ukr_args *u, const int nv, const bool a_rows)
{
    __m256 acc[X2_MR][2];
    for (int i = 0; i < X2_MR; i++)
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    const float *b = u->b;
    if (a_rows) {
        const size_t rs = u->rs_a;
        const float *a0 = u->a, *a3 = a0 + 3 * rs;
        for (size_t k = 0; k < u->kc; k++) {
            const __m256 b0 = _mm256_load_ps(b);
            const __m256 b1 = nv > 1 ? _mm256_load_ps(b + 8) : b0;
            X2_FMA(0, a0[0]);
            X2_FMA(1, a0[rs]);
            X2_FMA(2, a0[2 * rs]);
            X2_FMA(3, a3[0]);
            X2_FMA(4, a3[rs]);
            X2_FMA(5, a3[2 * rs]);
            a0++, a3++;
            b += X2_NR;
        }
    } else {
        const size_t cs = u->cs_a;
        const float *a = u->a;
        for (size_t k = 0; k < u->kc; k++) {
            const __m256 b0 = _mm256_load_ps(b);
            const __m256 b1 = nv > 1 ? _mm256_load_ps(b + 8) : b0;
            X2_FMA(0, a[0]);
            X2_FMA(1, a[1]);
            X2_FMA(2, a[2]);
            X2_FMA(3, a[3]);
            X2_FMA(4, a[4]);
            X2_FMA(5, a[5]);
            a += cs;
            b += X2_NR;
        }
    }
    const float *bias1 = u->bias ? u->bias + 8 : NULL;
    for (int i = 0; i < X2_MR; i++) {
        if ((size_t)i >= u->mr)
            break;
        float *c = u->c + (size_t)i * u->ldc;
        const float *r = u->res ? u->res + (size_t)i * u->ldc : NULL;
        store_avx2(c, acc[i][0], u->nr, u->load_c, u->bias, r, u->act);
        if (nv > 1)
            store_avx2(c + 8, acc[i][1], u->nr - 8, u->load_c, bias1, r ? r + 8 : NULL, u->act);
    }
}

static TARGET_AVX2 void ukr_avx2(const ukr_args *u)
{
    if (u->nr > 8) {
        if (u->a_rows)
            ukr_avx2_body(u, 2, true);
        else
            ukr_avx2_body(u, 2, false);
    } else {
        if (u->a_rows)
            ukr_avx2_body(u, 1, true);
        else
            ukr_avx2_body(u, 1, false);
    }
}

/* ---- packing ------------------------------------------------------------------------------------ */

static void pack_b_c(float *bp, const float *b, size_t ldb, bool tb, size_t kc, size_t nc,
                   size_t NR, const float *ks)
{
    for (size_t js = 0; js < nc; js += NR) {
        const size_t nr = min_size(NR, nc - js);
        float *dst = bp + js * kc;
        if (!tb) {
            for (size_t k = 0; k < kc; k++) {
                if (ks)
                    for (size_t j = 0; j < nr; j++)
                        dst[k * NR + j] = b[k * ldb + js + j] * ks[k];
                else
                    memcpy(dst + k * NR, b + k * ldb + js, nr * sizeof *dst);
                for (size_t j = nr; j < NR; j++)
                    dst[k * NR + j] = 0;
            }
        } else {
            /* Transposed B: rows of the stored matrix are columns here; read them in order. */
            if (nr < NR)
                for (size_t k = 0; k < kc; k++)
                    for (size_t j = nr; j < NR; j++)
                        dst[k * NR + j] = 0;
            for (size_t j = 0; j < nr; j++) {
                const float *src = b + (js + j) * ldb;
                for (size_t k = 0; k < kc; k++)
                    dst[k * NR + j] = ks ? src[k] * ks[k] : src[k];
            }
        }
    }
}

/* mr (< MR) rows of op(A) starting at row i0, K block pc.., as ap[k * MR + i], rows past mr
 * zero. */
static void pack_a_tail(float *ap, const gemm_problem *p, size_t i0, size_t mr, size_t pc,
                        size_t kc, size_t MR)
{
    for (size_t k = 0; k < kc; k++)
        for (size_t i = 0; i < MR; i++)
            ap[k * MR + i] = i >= mr ? 0
                             : p->ta ? p->a[(pc + k) * p->lda + i0 + i]
                                     : p->a[(i0 + i) * p->lda + pc + k];
}

/* In-register transpose of 16 rows of 16 floats: r[i] becomes column i. */
INLINE TARGET_AVX512 void transpose16_avx512(__m512 r[16])
{
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; i++) {
            t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}

/* pack_b_c with masked vector copies (plain B) and 16x16 register transposes (transposed B). */
static TARGET_AVX512 void pack_b_avx512(float *bp, const float *b, size_t ldb, bool tb,
                                        size_t kc, size_t nc, size_t NR, const float *ks)
{
    (void)NR; /* X5_NR */
    for (size_t js = 0; js < nc; js += X5_NR) {
        const size_t nr = min_size(X5_NR, nc - js);
        float *dst = bp + js * kc;
        if (!tb) {
            const __mmask16 m0 = mask16(nr), m1 = nr > 16 ? mask16(nr - 16) : 0;
            const float *src = b + js;
            for (size_t k = 0; k < kc; k++, src += ldb, dst += X5_NR) {
                __m512 v0 = _mm512_maskz_loadu_ps(m0, src);
                __m512 v1 = _mm512_maskz_loadu_ps(m1, src + 16);
                if (ks) {
                    const __m512 sk = _mm512_set1_ps(ks[k]);
                    v0 = _mm512_mul_ps(v0, sk);
                    v1 = _mm512_mul_ps(v1, sk);
                }
                _mm512_store_ps(dst, v0);
                _mm512_store_ps(dst + 16, v1);
            }
            continue;
        }
        for (size_t h = 0; h < X5_NR; h += 16) { /* two halves of 16 columns */
            const size_t rows = nr > h ? min_size(16, nr - h) : 0;
            for (size_t k0 = 0; k0 < kc; k0 += 16) {
                const size_t kk = min_size(16, kc - k0);
                const __mmask16 mk = mask16(kk);
                const __m512 sk = ks ? _mm512_maskz_loadu_ps(mk, ks + k0) : _mm512_set1_ps(1);
                __m512 r[16];
                for (size_t i = 0; i < 16; i++)
                    r[i] = i < rows ? _mm512_maskz_loadu_ps(mk, b + (js + h + i) * ldb + k0)
                                    : _mm512_setzero_ps();
                if (ks)
                    for (size_t i = 0; i < rows; i++)
                        r[i] = _mm512_mul_ps(r[i], sk);
                transpose16_avx512(r);
                for (size_t t = 0; t < kk; t++)
                    _mm512_store_ps(dst + (k0 + t) * X5_NR + h, r[t]);
            }
        }
    }
}

/* Column sums and sums of squares of a finished mr x nr tile of C (just stored, so in L1), in
 * double, row by row: s[j] += c, q[j] += c * c (a product then a sum, no FMA, so every ISA
 * gives the same bits for the same C). */
static void tile_stats_c(double *s, double *q, const float *c, size_t ldc, size_t mr,
                         size_t nr)
{
    for (size_t i = 0; i < mr; i++)
        for (size_t j = 0; j < nr; j++) {
            const double v = c[i * ldc + j];
            s[j] += v;
            q[j] += v * v;
        }
}

static TARGET_AVX512 void tile_stats_avx512(double *s, double *q, const float *c, size_t ldc,
                                            size_t mr, size_t nr)
{
    for (size_t j0 = 0; j0 < nr; j0 += 32) {
        const size_t w = min_size(32, nr - j0);
        __mmask8 m8[4];
        __m512d sv[4], qv[4];
        for (size_t v = 0; v < 4; v++) {
            const size_t lanes = w > 8 * v ? min_size(8, w - 8 * v) : 0;
            m8[v] = (__mmask8)((1u << lanes) - 1);
            sv[v] = _mm512_maskz_loadu_pd(m8[v], s + j0 + 8 * v);
            qv[v] = _mm512_maskz_loadu_pd(m8[v], q + j0 + 8 * v);
        }
        const __mmask16 m0 = mask16(w), m1 = w > 16 ? mask16(w - 16) : 0;
        for (size_t i = 0; i < mr; i++) {
            const float *row = c + i * ldc + j0;
            const __m512 x0 = _mm512_maskz_loadu_ps(m0, row);
            const __m512 x1 = _mm512_maskz_loadu_ps(m1, row + 16);
            const __m512d d[4] = {_mm512_cvtps_pd(_mm512_castps512_ps256(x0)),
                                  _mm512_cvtps_pd(_mm512_extractf32x8_ps(x0, 1)),
                                  _mm512_cvtps_pd(_mm512_castps512_ps256(x1)),
                                  _mm512_cvtps_pd(_mm512_extractf32x8_ps(x1, 1))};
            for (size_t v = 0; v < 4; v++) {
                sv[v] = _mm512_add_pd(sv[v], d[v]);
                qv[v] = _mm512_add_pd(qv[v], _mm512_mul_pd(d[v], d[v]));
            }
        }
        for (size_t v = 0; v < 4; v++) {
            _mm512_mask_storeu_pd(s + j0 + 8 * v, m8[v], sv[v]);
            _mm512_mask_storeu_pd(q + j0 + 8 * v, m8[v], qv[v]);
        }
    }
}

void tern_col_stats(double *s, double *q, const float *c, size_t ldc, size_t rows,
                    size_t cols, tern_isa isa)
{
    if (isa == TERN_ISA_AVX512)
        tile_stats_avx512(s, q, c, ldc, rows, cols);
    else
        tile_stats_c(s, q, c, ldc, rows, cols);
}

static void tile_stats(tern_isa isa, const gemm_problem *p, size_t i, size_t j, size_t mr,
                       size_t nr)
{
    tern_col_stats(p->stats + j, p->stats + p->stats_ld + j, p->c + i * p->ldc + j, p->ldc, mr,
                   nr, isa);
}

static const isa_desc *isa_for(tern_isa isa)
{
    static const isa_desc scalar = {TERN_ISA_SCALAR, SC_MR, SC_NR, ukr_scalar, pack_b_c, NULL};
    static const isa_desc avx2 = {TERN_ISA_AVX2, X2_MR, X2_NR, ukr_avx2, pack_b_c, NULL};
    static const isa_desc avx512 = {TERN_ISA_AVX512, X5_MR, X5_NR, ukr_avx512, pack_b_avx512,
                                    small_m_avx512};
    switch (isa) {
    case TERN_ISA_AVX512: return &avx512;
    case TERN_ISA_AVX2: return &avx2;
    default: return &scalar;
    }
}

/* ---- blocked driver ----------------------------------------------------------------------------- */

/* Prepacked B: K block pc (all of N, NR-wide slivers of kc rows each) starts at pc * npad;
 * inside it, the sliver of columns [j, j + NR) starts at j * kc. The blocked driver's packing
 * of any (pc, jc) block is a contiguous run of this. */
static size_t packed_offset(size_t pc, size_t kc, size_t j, size_t npad)
{
    return pc * npad + j * kc;
}

size_t tern_gemm_packed_b_size(size_t N, size_t K, tern_isa isa)
{
    const size_t nr = isa_for(isa)->nr;
    return (N + nr - 1) / nr * nr * K;
}

void tern_gemm_pack_b(float *packed, const float *B, size_t ldb, bool trans_b, size_t N,
                      size_t K, tern_isa isa)
{
    const isa_desc *d = isa_for(isa);
    const size_t npad = (N + d->nr - 1) / d->nr * d->nr;
    for (size_t pc = 0; pc < K; pc += KC) {
        const size_t kc = min_size(KC, K - pc);
        d->pack_b(packed + packed_offset(pc, kc, 0, npad),
                  trans_b ? B + pc : B + pc * ldb, ldb, trans_b, kc, N, d->nr, NULL);
    }
}

/* A prepacked block with row k scaled by ks[k]: the values pack_b gives with ks (a product
 * rounded once), without re-reading and transposing the stored weights. */
static void scale_packed(float *restrict dst, const float *restrict src,
                         const float *restrict ks, size_t kc, size_t slivers, size_t NR)
{
    for (size_t s = 0; s < slivers; s++)
        for (size_t k = 0; k < kc; k++, src += NR, dst += NR)
            for (size_t j = 0; j < NR; j++)
                dst[j] = src[j] * ks[k];
}

static void gemm_blocked(const gemm_problem *p, const isa_desc *d, float *scratch)
{
    const size_t MR = d->mr, NR = d->nr, M = p->m, N = p->n, K = p->k;
    float *ap = scratch, *bp = scratch + AP_FLOATS;
    for (size_t jc = 0; jc < N; jc += NC) {
        const size_t nc = min_size(NC, N - jc);
        size_t pc = 0;
        do { /* at least once, so K == 0 still writes C */
            const size_t kc = min_size(KC, K - pc);
            const bool first = pc == 0, last = pc + kc >= K;
            const float *bblock;
            if (p->packed && !p->k_scale) {
                bblock = p->packed + packed_offset(pc, kc, p->col0 + jc, p->npad);
            } else if (p->packed) {
                scale_packed(bp, p->packed + packed_offset(pc, kc, p->col0 + jc, p->npad),
                             p->k_scale + pc, kc, (nc + NR - 1) / NR, NR);
                bblock = bp;
            } else {
                d->pack_b(bp, p->tb ? p->b + jc * p->ldb + pc : p->b + pc * p->ldb + jc, p->ldb,
                          p->tb, kc, nc, NR, p->k_scale ? p->k_scale + pc : NULL);
                bblock = bp;
            }
            ukr_args u = {.kc = kc, .ldc = p->ldc, .load_c = !first || p->accumulate,
                          .act = last ? p->act : TERN_ACT_NONE};
            for (size_t ic = 0; ic < M; ic += MC) {
                const size_t mc = min_size(MC, M - ic), mfull = mc / MR * MR;
                if (mfull < mc)
                    pack_a_tail(ap, p, ic + mfull, mc - mfull, pc, kc, MR);
                for (size_t jr = 0; jr < nc; jr += NR) {
                    u.b = bblock + jr * kc;
                    u.nr = min_size(NR, nc - jr);
                    u.bias = last && p->bias ? p->bias + jc + jr : NULL;
                    const float *res = last && p->res ? p->res + jc + jr : NULL;
                    for (size_t ir = 0; ir < mc; ir += MR) {
                        const size_t i = ic + ir;
                        if (ir < mfull) {
                            u.a = p->ta ? p->a + pc * p->lda + i : p->a + i * p->lda + pc;
                            u.rs_a = p->ta ? 1 : p->lda;
                            u.cs_a = p->ta ? p->lda : 1;
                            u.a_rows = !p->ta;
                            u.mr = MR;
                        } else {
                            u.a = ap;
                            u.rs_a = 1;
                            u.cs_a = MR;
                            u.a_rows = false;
                            u.mr = mc - ir;
                        }
                        u.c = p->c + i * p->ldc + jc + jr;
                        u.res = res ? res + i * p->ldc : NULL;
                        d->kernel(&u);
                        if (last && p->stats)
                            tile_stats(d->isa, p, i, jc + jr, u.mr, u.nr);
                    }
                }
            }
            pc += kc;
        } while (pc < K);
    }
}

static bool takes_small_m(const isa_desc *d, const gemm_problem *p)
{
    return p->m <= SMALL_M && d->small_m && !(p->ta && p->tb) && !p->k_scale;
}

static void gemm_serial(const gemm_problem *p, tern_isa isa, float *scratch, bool allow_small)
{
    if (p->m == 0 || p->n == 0)
        return;
    const isa_desc *d = isa_for(isa);
    if (allow_small && takes_small_m(d, p)) {
        d->small_m(p);
        if (p->stats)
            tile_stats(isa, p, 0, 0, p->m, p->n);
    } else {
        gemm_blocked(p, d, scratch);
    }
}

/* ---- public entry points -------------------------------------------------------------------------- */

static gemm_problem make_problem(float *C, size_t ldc, const float *A, size_t lda, bool trans_a,
                                 const float *B, size_t ldb, bool trans_b, size_t M, size_t N,
                                 size_t K, bool accumulate, const tern_gemm_epilogue *ep,
                                 const tern_gemm_fusion *fu)
{
    return (gemm_problem){.c = C, .ldc = ldc, .a = A, .lda = lda, .ta = trans_a, .b = B,
                          .ldb = ldb, .tb = trans_b, .m = M, .n = N, .k = K,
                          .accumulate = accumulate, .bias = ep ? ep->bias : NULL,
                          .res = fu ? fu->residual : NULL, .k_scale = fu ? fu->k_scale : NULL,
                          .packed = fu ? fu->packed_b : NULL,
                          .stats = fu ? fu->col_stats : NULL, .stats_ld = N,
                          .act = ep ? ep->act : TERN_ACT_NONE};
}

void tern_gemm_ref(float *C, size_t ldc, const float *A, size_t lda, bool trans_a,
                   const float *B, size_t ldb, bool trans_b, size_t M, size_t N, size_t K,
                   bool accumulate, const tern_gemm_epilogue *ep)
{
    tern_gemm_ref_fused(C, ldc, A, lda, trans_a, B, ldb, trans_b, M, N, K, accumulate, ep, NULL);
}

void tern_gemm_ref_fused(float *C, size_t ldc, const float *A, size_t lda, bool trans_a,
                         const float *B, size_t ldb, bool trans_b, size_t M, size_t N, size_t K,
                         bool accumulate, const tern_gemm_epilogue *ep,
                         const tern_gemm_fusion *fusion)
{
    const float *bias = ep ? ep->bias : NULL, *res = fusion ? fusion->residual : NULL;
    const float *ks = fusion ? fusion->k_scale : NULL;
    const tern_act act = ep ? ep->act : TERN_ACT_NONE;
    for (size_t i = 0; i < M; i++)
        for (size_t j = 0; j < N; j++) {
            double s = 0;
            for (size_t k = 0; k < K; k++) {
                float b = trans_b ? B[j * ldb + k] : B[k * ldb + j];
                if (ks)
                    b = b * ks[k];
                s += (double)(trans_a ? A[k * lda + i] : A[i * lda + k]) * b;
            }
            float *c = C + i * ldc + j;
            *c = finish_scalar(c, (float)s, accumulate, bias ? bias + j : NULL,
                               res ? res + i * ldc + j : NULL, act);
        }
}

void tern_gemm_thread(float *C, size_t ldc, const float *A, size_t lda, bool trans_a,
                      const float *B, size_t ldb, bool trans_b, size_t M, size_t N, size_t K,
                      bool accumulate, const tern_gemm_epilogue *ep, tern_isa isa,
                      float *scratch)
{
    if (!scratch) {
        tern_gemm_ref(C, ldc, A, lda, trans_a, B, ldb, trans_b, M, N, K, accumulate, ep);
        return;
    }
    gemm_problem p = make_problem(C, ldc, A, lda, trans_a, B, ldb, trans_b, M, N, K,
                                  accumulate, ep, NULL);
    gemm_serial(&p, isa, scratch, true);
}

typedef struct gemm_task {
    gemm_problem p;
    tern_pool *pool;
    tern_isa isa;
    bool split_m, allow_small;
    size_t unit; /* rows or columns per split unit */
} gemm_task;

/* Each thread takes a contiguous range of whole tiles and runs the sub-problem on it. */
static void gemm_task_fn(void *arg, int ith, int nth)
{
    const gemm_task *t = arg;
    const gemm_problem *p = &t->p;
    const size_t total = t->split_m ? p->m : p->n;
    size_t u0, u1;
    tern_split((total + t->unit - 1) / t->unit, ith, nth, &u0, &u1);
    const size_t lo = u0 * t->unit, hi = min_size(u1 * t->unit, total);
    gemm_problem s = *p;
    if (p->stats) /* this thread's part (the caller zeroed them all) */
        s.stats = p->stats + (size_t)ith * 2 * p->stats_ld;
    if (lo >= hi)
        return;
    if (t->split_m) {
        s.m = hi - lo;
        s.c += lo * p->ldc;
        if (s.res)
            s.res += lo * p->ldc;
        s.a += p->ta ? lo : lo * p->lda;
    } else {
        s.n = hi - lo;
        s.c += lo;
        s.col0 += lo;
        if (s.res)
            s.res += lo;
        s.b += p->tb ? lo * p->ldb : lo;
        if (s.bias)
            s.bias += lo;
        if (s.stats)
            s.stats += lo;
    }
    gemm_serial(&s, t->isa, tern_pool_scratch(t->pool, ith), t->allow_small);
}

/* K split: thread ith computes the product over its range of K (in 16s) into its partial
 * buffer; the caller then adds the partials. */
static void gemm_ksplit_fn(void *arg, int ith, int nth)
{
    const gemm_task *t = arg;
    const gemm_problem *p = &t->p;
    size_t u0, u1;
    tern_split((p->k + 15) / 16, ith, nth, &u0, &u1);
    const size_t k0 = min_size(u0 * 16, p->k), k1 = min_size(u1 * 16, p->k);
    gemm_problem s = *p;
    s.c = tern_pool_partial(t->pool, ith);
    s.ldc = p->n;
    s.accumulate = false;
    s.k = k1 - k0; /* may be 0: the blocked driver still writes zeros */
    s.a += p->ta ? k0 * p->lda : k0;
    s.b += p->tb ? k0 : k0 * p->ldb;
    gemm_serial(&s, t->isa, tern_pool_scratch(t->pool, ith), false);
}

/* Whether to split K (fusion->k_split asked for it): a plain product (no epilogue) whose C
 * fits the partial buffers, has too few tiles to keep every thread busy and balanced, and a
 * K long enough that adding the partials is cheap next to the product. Splitting M or N would
 * also make every thread pack the whole of the other operand, which for a weight gradient
 * (K = pixels) is as much memory traffic as the product itself. */
static bool takes_k_split(const gemm_problem *p, const isa_desc *d, int nth)
{
    const size_t mt = (p->m + d->mr - 1) / d->mr, nt = (p->n + d->nr - 1) / d->nr;
    return nth > 1 && !p->bias && !p->res && !p->k_scale && !p->packed && !p->stats &&
           p->act == TERN_ACT_NONE && p->m * p->n <= TERN_POOL_PARTIAL_FLOATS &&
           mt * nt < 8 * (size_t)nth && p->k >= 1024 * (size_t)nth;
}

static void gemm_k_split(gemm_task *t, int nth)
{
    const gemm_problem *p = &t->p;
    tern_pool_run(t->pool, gemm_ksplit_fn, t);
    const size_t M = p->m, N = p->n;
    for (size_t i = 0; i < M; i++) {
        float *c = p->c + i * p->ldc;
        const float *p0 = tern_pool_partial(t->pool, 0) + i * N;
        for (size_t j = 0; j < N; j++) {
            float sum = p0[j];
            for (int th = 1; th < nth; th++)
                sum += tern_pool_partial(t->pool, th)[i * N + j];
            c[j] = p->accumulate ? c[j] + sum : sum;
        }
    }
}

void tern_gemm(float *C, size_t ldc, const float *A, size_t lda, bool trans_a, const float *B,
               size_t ldb, bool trans_b, size_t M, size_t N, size_t K, bool accumulate,
               const tern_gemm_epilogue *ep, tern_pool *pool)
{
    tern_gemm_fused(C, ldc, A, lda, trans_a, B, ldb, trans_b, M, N, K, accumulate, ep, NULL,
                    pool);
}

void tern_gemm_fused(float *C, size_t ldc, const float *A, size_t lda, bool trans_a,
                     const float *B, size_t ldb, bool trans_b, size_t M, size_t N, size_t K,
                     bool accumulate, const tern_gemm_epilogue *ep,
                     const tern_gemm_fusion *fusion, tern_pool *pool)
{
    double *stats = fusion ? fusion->col_stats : NULL;
    if (!pool) {
        tern_gemm_ref_fused(C, ldc, A, lda, trans_a, B, ldb, trans_b, M, N, K, accumulate, ep,
                            fusion);
        if (stats) {
            memset(stats, 0, 2 * N * sizeof *stats);
            tile_stats_c(stats, stats + N, C, ldc, M, N);
        }
        return;
    }
    if (stats)
        memset(stats, 0, 2 * N * (size_t)tern_pool_size(pool) * sizeof *stats);
    if (M == 0 || N == 0)
        return;
    gemm_task t = {.p = make_problem(C, ldc, A, lda, trans_a, B, ldb, trans_b, M, N, K,
                                     accumulate, ep, fusion),
                   .pool = pool, .isa = tern_pool_isa(pool)};
    const isa_desc *d = isa_for(t.isa);
    const int nth = tern_pool_size(pool);
    t.p.npad = (N + d->nr - 1) / d->nr * d->nr;
    /* The small-M path is chosen from the whole problem so that splitting never changes which
     * kernel (and so which summation order) computes an element. */
    t.allow_small = takes_small_m(d, &t.p);
    const size_t mt = (M + d->mr - 1) / d->mr, nt = (N + d->nr - 1) / d->nr;
    if (t.allow_small) {
        t.split_m = false;
        t.unit = 16;
    } else {
        /* Split the larger dimension (both are cut into whole tiles); fall back to the other
         * when the larger has fewer tiles than threads. */
        t.split_m = M >= N ? mt >= (size_t)nth || mt >= nt : nt < (size_t)nth && mt > nt;
        t.unit = t.split_m ? d->mr : d->nr;
    }
    if (nth == 1)
        gemm_serial(&t.p, t.isa, tern_pool_scratch(pool, 0), t.allow_small);
    else if (fusion && fusion->k_split && !t.allow_small && takes_k_split(&t.p, d, nth))
        gemm_k_split(&t, nth);
    else
        tern_pool_run(pool, gemm_task_fn, &t);
}
