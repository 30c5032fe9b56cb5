/* Direct NHWC kernels for the MobileNetV3 stem: 3x3 convolution, stride 2, pad 1, groups 1,
 * with few input channels (1..TERN_STEM_CIN_MAX, images) and few output channels
 * (..TERN_STEM_COUT_MAX). Scalar, AVX2 and AVX-512 versions; tern_conv2d_* dispatches here.
 *
 * With Cin = 3 an im2col row is only 27 floats and the GEMM's K is tiny, so gathering columns
 * and packing costs about as much as the arithmetic. Here the output channels are the vector
 * (16 per zmm, 8 per ymm; the last vector of Cout masked) and every tap is a broadcast of one
 * input value times a weight vector, read straight from the NHWC input:
 *
 * Forward: output pixels of a row in register tiles (P pixels x NV channel vectors of
 *   accumulators); weights packed per call and thread to (ky, kx, ci, Cout padded to 16) on
 *   the stack.
 *   Each output float is one FMA chain over the taps in (ky, kx, ci) order starting from zero,
 *   then + bias, then the activation with the expressions of tern_act_forward, as the fused
 *   GEMM epilogue does: a fused call gives the same bits as an unfused one followed by the bias
 *   add and tern_act_forward. Since a pixel's value does not depend on its tile, a row's last
 *   few interior pixels are covered by a tile overlapping the previous one (same bits written
 *   twice). Border pixels (column 0, and the last one for odd widths) take a one-pixel tile
 *   that skips the taps outside the image; rows outside the image are skipped by ky range.
 * dW, db: reductions over N*OH*OW. Each thread takes a range of output rows; per row the tap
 *   accumulators (taps x channel vectors) stay in registers along the row and are then added
 *   into the thread's partial (taps + 1, Cout padded) in the workspace. After the run the
 *   calling thread adds the partials in thread order, so results are bitwise reproducible for
 *   a given thread count and ISA.
 * dx: each output pixel's contribution to its 3x3 input window is T[ky] = sum over co of
 *   dy[co] * W[co, ky, (kx, ci)] (a vector of 3*Cin lanes per ky, since kx and ci are adjacent
 *   in NHWC), added to the input row 2oy-1+ky with one masked load-add-store. Windows of
 *   neighbouring output pixels overlap by one column, so a row is done in two passes (even
 *   ox, then odd ox) and the pixels of a tile never touch the same float. Threads own ranges
 *   of input rows and only add the ky rows they own; every dx float receives its terms in the
 *   same order (oy, pass) whatever the thread count.
 *
 * No allocation: packed weights live on the stack, dW partials in the conv workspace. */
#include "kernels.h"

#include <stdbool.h>
#include <string.h>

#include "util.h"

#if defined(__x86_64__) || defined(__i386__)
#include "simd_act.h"
#define ST_X86 1
#endif

#define ST_TAPS_MAX (9 * TERN_STEM_CIN_MAX)
/* dx weights: per (co, ky) one row of 16 lanes holding (kx, ci), 3 * Cin <= 12 used. */
#define ST_DXL 16

typedef struct stem_task {
    float *y, *dx, *dw, *db;
    float *part; /* per thread (9*Cin + 1, cp) dW/db partials, from the workspace */
    const float *x, *w, *b, *dy;
    tern_act act;
    tern_isa isa;
    const tern_conv_params *p;
    int cp; /* Cout rounded up to 16 */
} stem_task;

/* One output row of the forward. */
typedef struct fwd_row {
    float *y;              /* (OW, Cout) */
    const float *rows[3];  /* input row 2oy-1+ky (pixel 0, channel 0) for ky in [ky0, ky1) */
    int ky0, ky1, w, ow, cout, cp;
    const float *wf;       /* packed weights (9*Cin, cp) */
    const float *bias;
    tern_act act;
} fwd_row;

/* One output row of the weight gradient. */
typedef struct grad_row {
    const float *dy;      /* (OW, Cout) */
    const float *rows[3]; /* as fwd_row */
    int ky0, ky1, w, ow, cout, cp;
} grad_row;

/* One output row's contribution to dx. */
typedef struct dx_row {
    float *rows[3];    /* dx row 2oy-1+ky for ky in [kyA, kyB) (the rows this thread owns) */
    const float *dy;   /* (OW, Cout) */
    const float *wd;   /* (Cout, 3, ST_DXL) */
    int kyA, kyB, w, cout;
} dx_row;

static int min_int(int a, int b) { return a < b ? a : b; }
static int max_int(int a, int b) { return a > b ? a : b; }

bool tern_stemconv_supported(const tern_conv_params *p)
{
    return p->groups == 1 && p->k == 3 && p->stride == 2 && p->pad == 1 && p->cin >= 1 &&
           p->cin <= TERN_STEM_CIN_MAX && p->cout >= 1 && p->cout <= TERN_STEM_COUT_MAX &&
           p->h >= 1 && p->w >= 1;
}

static int stem_cp(int cout) { return (cout + 15) / 16 * 16; }

static size_t part_floats(const tern_conv_params *p)
{
    return (size_t)(9 * p->cin + 1) * (size_t)stem_cp(p->cout);
}

size_t tern_stemconv_workspace_size(const tern_conv_params *p, int nthreads)
{
    return part_floats(p) * (size_t)(nthreads > 1 ? nthreads : 1);
}

/* Output pixels [*lo, *hi) read only columns inside the image: 2ox - 1 >= 0, 2ox + 1 < W. */
static void interior(int w, int ow, int *lo, int *hi)
{
    *lo = min_int(1, ow);
    *hi = max_int(*lo, min_int(ow, w / 2));
}

/* wf (9*Cin, cp): row (ky*3 + kx)*Cin + ci holds the Cout weights of that tap, zero padded. */
static void pack_forward(float *wf, const float *w, int cin, int cout, int cp)
{
    memset(wf, 0, (size_t)9 * (size_t)cin * (size_t)cp * sizeof *wf);
    for (int co = 0; co < cout; co++)
        for (int ci = 0; ci < cin; ci++)
            for (int tap = 0; tap < 9; tap++)
                wf[(size_t)(tap * cin + ci) * (size_t)cp + (size_t)co] =
                    w[(size_t)(co * cin + ci) * 9 + (size_t)tap];
}

/* wd (Cout, 3, ST_DXL): lane kx*Cin + ci of row (co, ky) is w[co, ci, ky, kx], zero beyond. */
static void pack_dx(float *wd, const float *w, int cin, int cout)
{
    memset(wd, 0, (size_t)cout * 3 * ST_DXL * sizeof *wd);
    for (int co = 0; co < cout; co++)
        for (int ci = 0; ci < cin; ci++)
            for (int ky = 0; ky < 3; ky++)
                for (int kx = 0; kx < 3; kx++)
                    wd[((size_t)co * 3 + (size_t)ky) * ST_DXL + (size_t)(kx * cin + ci)] =
                        w[(size_t)(co * cin + ci) * 9 + (size_t)(ky * 3 + kx)];
}

/* Interior pixels [lo, hi) in tiles of PM, then 4; a remainder below 4 reruns the last four
 * pixels (overlapping tiles write identical values). TILE(j, P) runs P pixels from j. */
#define ST_FWD_TILES(TILE, PM, lo, hi)                                                           \
    do {                                                                                         \
        int j_ = (lo);                                                                           \
        for (; (hi) - j_ >= (PM); j_ += (PM))                                                    \
            TILE(j_, PM);                                                                        \
        for (; (hi) - j_ >= 4; j_ += 4)                                                          \
            TILE(j_, 4);                                                                         \
        if (j_ < (hi) && (hi) - (lo) >= 4)                                                       \
            TILE((hi) - 4, 4);                                                                   \
        else                                                                                     \
            for (; j_ < (hi); j_++)                                                              \
                TILE(j_, 1);                                                                     \
    } while (0)

/* np pixels of one dx pass in tiles of PM, 4, 2, 1 (dx accumulates: no overlap allowed).
 * TILE(i, P) runs pass pixels i .. i+P-1. */
#define ST_DX_TILES(TILE, PM, np)                                                                \
    do {                                                                                         \
        int i_ = 0;                                                                              \
        for (; (np) - i_ >= (PM); i_ += (PM))                                                    \
            TILE(i_, PM);                                                                        \
        if ((PM) > 4)                                                                            \
            for (; (np) - i_ >= 4; i_ += 4)                                                      \
                TILE(i_, 4);                                                                     \
        if ((PM) > 2)                                                                            \
            for (; (np) - i_ >= 2; i_ += 2)                                                      \
                TILE(i_, 2);                                                                     \
        for (; i_ < (np); i_++)                                                                  \
            TILE(i_, 1);                                                                         \
    } while (0)

/* Adds T (3*Cin lanes in t[]) of the window at column col0 to a dx row, skipping columns
 * outside [0, w): the border pixels of the dx passes. */
static inline void dx_add_edge(float *d, const float *t, int col0, int w, int cin)
{
    for (int kx = 0; kx < 3; kx++) {
        const int col = col0 + kx;
        if (col < 0 || col >= w)
            continue;
        for (int ci = 0; ci < cin; ci++)
            d[(ptrdiff_t)col * cin + ci] += t[kx * cin + ci];
    }
}

/* ---- scalar --------------------------------------------------------------------------------- */

/* The expressions of tern_act_forward. */
static inline float act_value(float z, tern_act act)
{
    float t = z + 3;
    t = t > 0 ? t : 0;
    t = t < 6 ? t : 6;
    switch (act) {
    case TERN_ACT_NONE: return z;
    case TERN_ACT_RELU: return z > 0 ? z : 0;
    case TERN_ACT_HARDSWISH: return z * t / 6;
    case TERN_ACT_HARDSIGMOID: return t / 6;
    }
    return z;
}

static void fwds_row(const fwd_row *r, int cin)
{
    float acc[TERN_STEM_COUT_MAX];
    for (int j = 0; j < r->ow; j++) {
        for (int co = 0; co < r->cout; co++)
            acc[co] = 0;
        for (int ky = r->ky0; ky < r->ky1; ky++)
            for (int kx = 0; kx < 3; kx++) {
                const int col = 2 * j - 1 + kx;
                if (col < 0 || col >= r->w)
                    continue;
                for (int ci = 0; ci < cin; ci++) {
                    const float xv = r->rows[ky][(ptrdiff_t)col * cin + ci];
                    const float *wt = r->wf + (size_t)((ky * 3 + kx) * cin + ci) * (size_t)r->cp;
                    for (int co = 0; co < r->cout; co++)
                        acc[co] += xv * wt[co];
                }
            }
        float *y = r->y + (ptrdiff_t)j * r->cout;
        for (int co = 0; co < r->cout; co++)
            y[co] = act_value(r->bias ? acc[co] + r->bias[co] : acc[co], r->act);
    }
}

static void dws_row(float *part, const grad_row *r, int cin)
{
    for (int j = 0; j < r->ow; j++) {
        const float *d = r->dy + (ptrdiff_t)j * r->cout;
        for (int ky = r->ky0; ky < r->ky1; ky++)
            for (int kx = 0; kx < 3; kx++) {
                const int col = 2 * j - 1 + kx;
                if (col < 0 || col >= r->w)
                    continue;
                for (int ci = 0; ci < cin; ci++) {
                    const float xv = r->rows[ky][(ptrdiff_t)col * cin + ci];
                    float *acc = part + (size_t)((ky * 3 + kx) * cin + ci) * (size_t)r->cp;
                    for (int co = 0; co < r->cout; co++)
                        acc[co] += d[co] * xv;
                }
            }
    }
}

static void dxs_pixel(const dx_row *r, int ox, int cin)
{
    float t[3][ST_DXL] = {{0}};
    const float *d = r->dy + (ptrdiff_t)ox * r->cout;
    for (int co = 0; co < r->cout; co++)
        for (int ky = 0; ky < 3; ky++)
            for (int l = 0; l < 3 * cin; l++)
                t[ky][l] += d[co] * r->wd[((size_t)co * 3 + (size_t)ky) * ST_DXL + (size_t)l];
    for (int ky = r->kyA; ky < r->kyB; ky++)
        dx_add_edge(r->rows[ky], t[ky], 2 * ox - 1, r->w, cin);
}

static void dxs_pass(const dx_row *r, int par, int np, int cin)
{
    for (int i = 0; i < np; i++)
        dxs_pixel(r, par + 2 * i, cin);
}

#ifdef ST_X86

/* ---- AVX-512 -------------------------------------------------------------------------------- */

static __mmask16 mask16(int n)
{
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
}

#define X5_FWD_PM(NV) ((NV) == 1 ? 12 : 6)

/* P output pixels from j, channel vectors c0 .. c0 + 16*NV (masks m). edge: one pixel whose
 * window leaves the image on the left or right; its outside taps are skipped. */
ALWAYS_INLINE T512 void fwd512_tile(const fwd_row *r, int j, const int P, const int CIN,
                                   const int NV, const bool edge, int c0, const __mmask16 *m)
{
    __m512 acc[12][2];
#pragma GCC unroll 12
    for (int q = 0; q < P; q++)
#pragma GCC unroll 2
        for (int v = 0; v < NV; v++)
            acc[q][v] = _mm512_setzero_ps();
    /* Pixel j's window starts at column 2j - 1: index xc[t - CIN] with xc at column 2j, so
     * every offset below is a constant and no pointer leaves the row. */
    const ptrdiff_t c2j = (ptrdiff_t)(2 * j) * CIN;
    /* ky unrolled too: as a loop, GCC hoists every tap's address offset out of it and spills
     * them; unrolled, each tap is a constant displacement from one pointer per row. */
#pragma GCC unroll 3
    for (int ky = 0; ky < 3; ky++) {
        if (ky < r->ky0 || ky >= r->ky1)
            continue;
        const float *xc = r->rows[ky] + c2j;
        const float *wk = r->wf + (size_t)(ky * 3 * CIN) * (size_t)r->cp + (size_t)c0;
#pragma GCC unroll 3
        for (int kx = 0; kx < 3; kx++) {
            if (edge && (2 * j - 1 + kx < 0 || 2 * j - 1 + kx >= r->w))
                continue;
#pragma GCC unroll 4
            for (int ci = 0; ci < CIN; ci++) {
                const int t = kx * CIN + ci;
                __m512 wv[2];
#pragma GCC unroll 2
                for (int v = 0; v < NV; v++)
                    wv[v] = _mm512_load_ps(wk + (size_t)t * (size_t)r->cp + 16 * v);
#pragma GCC unroll 12
                for (int q = 0; q < P; q++) {
                    const __m512 xb = _mm512_set1_ps(xc[q * 2 * CIN + t - CIN]);
#pragma GCC unroll 2
                    for (int v = 0; v < NV; v++)
                        acc[q][v] = _mm512_fmadd_ps(xb, wv[v], acc[q][v]);
                }
            }
        }
    }
#pragma GCC unroll 12
    for (int q = 0; q < P; q++) {
        float *yo = r->y + (ptrdiff_t)(j + q) * r->cout + c0;
#pragma GCC unroll 2
        for (int v = 0; v < NV; v++) {
            __m512 t = acc[q][v];
            if (r->bias)
                t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(m[v], r->bias + c0 + 16 * v));
            _mm512_mask_storeu_ps(yo + 16 * v, m[v], act16(t, r->act));
        }
    }
}

ALWAYS_INLINE T512 void fwd512_row_t(const fwd_row *r, const int CIN, const int NV, int c0,
                                    const __mmask16 *m)
{
    int lo, hi;
    interior(r->w, r->ow, &lo, &hi);
    for (int j = 0; j < lo; j++)
        fwd512_tile(r, j, 1, CIN, NV, true, c0, m);
#define X5_FWD_TILE(j, P) fwd512_tile(r, j, P, CIN, NV, false, c0, m)
    ST_FWD_TILES(X5_FWD_TILE, X5_FWD_PM(NV), lo, hi);
#undef X5_FWD_TILE
    for (int j = hi; j < r->ow; j++)
        fwd512_tile(r, j, 1, CIN, NV, true, c0, m);
}

static T512 void fwd512_row(const fwd_row *r, int cin)
{
    for (int c0 = 0; c0 < r->cout; c0 += 32) {
        const int nv = min_int(2, (r->cout - c0 + 15) / 16);
        const __mmask16 m[2] = {mask16(r->cout - c0), mask16(r->cout - c0 - 16)};
        switch (cin * 2 + nv - 1) {
        case 2: fwd512_row_t(r, 1, 1, c0, m); break;
        case 3: fwd512_row_t(r, 1, 2, c0, m); break;
        case 4: fwd512_row_t(r, 2, 1, c0, m); break;
        case 5: fwd512_row_t(r, 2, 2, c0, m); break;
        case 6: fwd512_row_t(r, 3, 1, c0, m); break;
        case 7: fwd512_row_t(r, 3, 2, c0, m); break;
        case 8: fwd512_row_t(r, 4, 1, c0, m); break;
        default: fwd512_row_t(r, 4, 2, c0, m); break;
        }
    }
}

/* acc[kyi][t][v] += x tap (kyA + kyi, t) * dy of pixel j, for KYN rows of taps. */
ALWAYS_INLINE T512 void dw512_pixel(__m512 (*acc)[12][2], const grad_row *r, int j, int kyA,
                                   const int KYN, const int CIN, const int NV,
                                   const bool edge, int c0, const __mmask16 *m)
{
    __m512 d[2];
#pragma GCC unroll 2
    for (int v = 0; v < NV; v++)
        d[v] = _mm512_maskz_loadu_ps(m[v], r->dy + (ptrdiff_t)j * r->cout + c0 + 16 * v);
    /* Pixel j's window starts at column 2j - 1: index xc[t - CIN] with xc at column 2j, so
     * every offset below is a constant and no pointer leaves the row. */
    const ptrdiff_t c2j = (ptrdiff_t)(2 * j) * CIN;
#pragma GCC unroll 3
    for (int kyi = 0; kyi < KYN; kyi++) {
        const float *xc = r->rows[kyA + kyi] + c2j;
#pragma GCC unroll 3
        for (int kx = 0; kx < 3; kx++) {
            if (edge && (2 * j - 1 + kx < 0 || 2 * j - 1 + kx >= r->w))
                continue;
#pragma GCC unroll 4
            for (int ci = 0; ci < CIN; ci++) {
                const int t = kx * CIN + ci;
                const __m512 xb = _mm512_set1_ps(xc[t - CIN]);
#pragma GCC unroll 2
                for (int v = 0; v < NV; v++)
                    acc[kyi][t][v] = _mm512_fmadd_ps(xb, d[v], acc[kyi][t][v]);
            }
        }
    }
}

/* One sweep of a row for tap rows [kyA, kyA + KYN) and channel vectors c0 .. c0 + 16*NV. */
ALWAYS_INLINE T512 void dw512_sweep(float *part, const grad_row *r, int kyA, const int KYN,
                                   const int CIN, const int NV, int c0, const __mmask16 *m)
{
    __m512 acc[3][12][2];
#pragma GCC unroll 3
    for (int kyi = 0; kyi < KYN; kyi++)
#pragma GCC unroll 12
        for (int t = 0; t < 3 * CIN; t++)
#pragma GCC unroll 2
            for (int v = 0; v < NV; v++)
                acc[kyi][t][v] = _mm512_setzero_ps();
    int lo, hi;
    interior(r->w, r->ow, &lo, &hi);
    for (int j = 0; j < lo; j++)
        dw512_pixel(acc, r, j, kyA, KYN, CIN, NV, true, c0, m);
    for (int j = lo; j < hi; j++)
        dw512_pixel(acc, r, j, kyA, KYN, CIN, NV, false, c0, m);
    for (int j = hi; j < r->ow; j++)
        dw512_pixel(acc, r, j, kyA, KYN, CIN, NV, true, c0, m);
#pragma GCC unroll 3
    for (int kyi = 0; kyi < KYN; kyi++)
#pragma GCC unroll 12
        for (int t = 0; t < 3 * CIN; t++)
#pragma GCC unroll 2
            for (int v = 0; v < NV; v++) {
                float *pp = part + (size_t)((kyA + kyi) * 3 * CIN + t) * (size_t)r->cp +
                            (size_t)(c0 + 16 * v);
                _mm512_storeu_ps(pp, _mm512_add_ps(_mm512_loadu_ps(pp), acc[kyi][t][v]));
            }
}

/* Accumulator budget (zmm) of one sweep: KYN * 3 * Cin * NV of them. */
#define X5_DW_BUDGET 28

static T512 void dw512_row(float *part, const grad_row *r, int cin)
{
    const int nvt = (r->cout + 15) / 16;
    const bool all3 = r->ky0 == 0 && r->ky1 == 3 && 9 * cin <= X5_DW_BUDGET;
    const int kyn = all3 ? 3 : 1;
    const int nvmax = min_int(2, X5_DW_BUDGET / (kyn * 3 * cin));
    for (int v0 = 0; v0 < nvt; v0 += nvmax) {
        const int nv = min_int(nvmax, nvt - v0), c0 = 16 * v0;
        const __mmask16 m[2] = {mask16(r->cout - c0), mask16(r->cout - c0 - 16)};
        for (int kyA = all3 ? 0 : r->ky0; kyA < r->ky1; kyA += kyn) {
#define X5_DW(KYN, CIN, NV) dw512_sweep(part, r, kyA, KYN, CIN, NV, c0, m)
            switch ((kyn == 3) * 8 + (cin - 1) * 2 + nv - 1) {
            case 0: X5_DW(1, 1, 1); break;
            case 1: X5_DW(1, 1, 2); break;
            case 2: X5_DW(1, 2, 1); break;
            case 3: X5_DW(1, 2, 2); break;
            case 4: X5_DW(1, 3, 1); break;
            case 5: X5_DW(1, 3, 2); break;
            case 6: X5_DW(1, 4, 1); break;
            case 7: X5_DW(1, 4, 2); break;
            case 8: X5_DW(3, 1, 1); break;
            case 9: X5_DW(3, 1, 2); break;
            case 10: X5_DW(3, 2, 1); break;
            default: X5_DW(3, 3, 1); break; /* 9 * Cin <= 28 leaves only these */
            }
#undef X5_DW
        }
    }
}

/* T for P pixels of one pass (ox = j, j+2, ...), all three ky, then added to the owned rows. */
ALWAYS_INLINE T512 void dx512_tile(const dx_row *r, int j, const int P, const int CIN)
{
    __m512 acc[8][3];
#pragma GCC unroll 8
    for (int q = 0; q < P; q++)
#pragma GCC unroll 3
        for (int ky = 0; ky < 3; ky++)
            acc[q][ky] = _mm512_setzero_ps();
    for (int co = 0; co < r->cout; co++) {
        const float *wc = r->wd + (size_t)co * 3 * ST_DXL;
        const __m512 w0 = _mm512_load_ps(wc), w1 = _mm512_load_ps(wc + ST_DXL),
                     w2 = _mm512_load_ps(wc + 2 * ST_DXL);
#pragma GCC unroll 8
        for (int q = 0; q < P; q++) {
            const __m512 d = _mm512_set1_ps(r->dy[(ptrdiff_t)(j + 2 * q) * r->cout + co]);
            acc[q][0] = _mm512_fmadd_ps(d, w0, acc[q][0]);
            acc[q][1] = _mm512_fmadd_ps(d, w1, acc[q][1]);
            acc[q][2] = _mm512_fmadd_ps(d, w2, acc[q][2]);
        }
    }
    const __mmask16 m = mask16(3 * CIN);
#pragma GCC unroll 8
    for (int q = 0; q < P; q++) {
        const int col0 = 2 * (j + 2 * q) - 1;
        const bool inside = col0 >= 0 && col0 + 2 < r->w;
        for (int ky = r->kyA; ky < r->kyB; ky++) {
            float *d = r->rows[ky];
            if (inside) {
                float *pp = d + (ptrdiff_t)col0 * CIN;
                _mm512_mask_storeu_ps(pp, m,
                                      _mm512_add_ps(_mm512_maskz_loadu_ps(m, pp), acc[q][ky]));
            } else {
                _Alignas(64) float t[16];
                _mm512_store_ps(t, acc[q][ky]);
                dx_add_edge(d, t, col0, r->w, CIN);
            }
        }
    }
}

ALWAYS_INLINE T512 void dx512_pass_t(const dx_row *r, int par, int np, const int CIN)
{
#define X5_DX_TILE(i, P) dx512_tile(r, par + 2 * (i), P, CIN)
    ST_DX_TILES(X5_DX_TILE, 8, np);
#undef X5_DX_TILE
}

static T512 void dx512_pass(const dx_row *r, int par, int np, int cin)
{
    switch (cin) {
    case 1: dx512_pass_t(r, par, np, 1); break;
    case 2: dx512_pass_t(r, par, np, 2); break;
    case 3: dx512_pass_t(r, par, np, 3); break;
    default: dx512_pass_t(r, par, np, 4); break;
    }
}

/* ---- AVX2 + FMA ------------------------------------------------------------------------------- */
ALWAYS_INLINE T256 __m256i mask8(int n)
{
    const int cnt = n >= 8 ? 8 : n < 0 ? 0 : n;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

#define X2_FWD_PM(NV) ((NV) == 1 ? 12 : 6)

ALWAYS_INLINE T256 void fwd256_tile(const fwd_row *r, int j, const int P, const int CIN,
                                   const int NV, const bool edge, int c0, const __m256i *m)
{
    __m256 acc[12][2];
#pragma GCC unroll 12
    for (int q = 0; q < P; q++)
#pragma GCC unroll 2
        for (int v = 0; v < NV; v++)
            acc[q][v] = _mm256_setzero_ps();
    /* Pixel j's window starts at column 2j - 1: index xc[t - CIN] with xc at column 2j, so
     * every offset below is a constant and no pointer leaves the row. */
    const ptrdiff_t c2j = (ptrdiff_t)(2 * j) * CIN;
    /* ky unrolled too: as a loop, GCC hoists every tap's address offset out of it and spills
     * them; unrolled, each tap is a constant displacement from one pointer per row. */
#pragma GCC unroll 3
    for (int ky = 0; ky < 3; ky++) {
        if (ky < r->ky0 || ky >= r->ky1)
            continue;
        const float *xc = r->rows[ky] + c2j;
        const float *wk = r->wf + (size_t)(ky * 3 * CIN) * (size_t)r->cp + (size_t)c0;
#pragma GCC unroll 3
        for (int kx = 0; kx < 3; kx++) {
            if (edge && (2 * j - 1 + kx < 0 || 2 * j - 1 + kx >= r->w))
                continue;
#pragma GCC unroll 4
            for (int ci = 0; ci < CIN; ci++) {
                const int t = kx * CIN + ci;
                __m256 wv[2];
#pragma GCC unroll 2
                for (int v = 0; v < NV; v++)
                    wv[v] = _mm256_load_ps(wk + (size_t)t * (size_t)r->cp + 8 * v);
#pragma GCC unroll 12
                for (int q = 0; q < P; q++) {
                    const __m256 xb = _mm256_broadcast_ss(xc + (q * 2 * CIN + t - CIN));
#pragma GCC unroll 2
                    for (int v = 0; v < NV; v++)
                        acc[q][v] = _mm256_fmadd_ps(xb, wv[v], acc[q][v]);
                }
            }
        }
    }
    const bool full = c0 + 8 * NV <= r->cout;
#pragma GCC unroll 12
    for (int q = 0; q < P; q++) {
        float *yo = r->y + (ptrdiff_t)(j + q) * r->cout + c0;
#pragma GCC unroll 2
        for (int v = 0; v < NV; v++) {
            __m256 t = acc[q][v];
            if (full) {
                if (r->bias)
                    t = _mm256_add_ps(t, _mm256_loadu_ps(r->bias + c0 + 8 * v));
                _mm256_storeu_ps(yo + 8 * v, act8(t, r->act));
            } else {
                if (r->bias)
                    t = _mm256_add_ps(t, _mm256_maskload_ps(r->bias + c0 + 8 * v, m[v]));
                _mm256_maskstore_ps(yo + 8 * v, m[v], act8(t, r->act));
            }
        }
    }
}

ALWAYS_INLINE T256 void fwd256_row_t(const fwd_row *r, const int CIN, const int NV, int c0,
                                    const __m256i *m)
{
    int lo, hi;
    interior(r->w, r->ow, &lo, &hi);
    for (int j = 0; j < lo; j++)
        fwd256_tile(r, j, 1, CIN, NV, true, c0, m);
#define X2_FWD_TILE(j, P) fwd256_tile(r, j, P, CIN, NV, false, c0, m)
    ST_FWD_TILES(X2_FWD_TILE, X2_FWD_PM(NV), lo, hi);
#undef X2_FWD_TILE
    for (int j = hi; j < r->ow; j++)
        fwd256_tile(r, j, 1, CIN, NV, true, c0, m);
}

static T256 void fwd256_row(const fwd_row *r, int cin)
{
    for (int c0 = 0; c0 < r->cout; c0 += 16) {
        const int nv = min_int(2, (r->cout - c0 + 7) / 8);
        const __m256i m[2] = {mask8(r->cout - c0), mask8(r->cout - c0 - 8)};
        switch (cin * 2 + nv - 1) {
        case 2: fwd256_row_t(r, 1, 1, c0, m); break;
        case 3: fwd256_row_t(r, 1, 2, c0, m); break;
        case 4: fwd256_row_t(r, 2, 1, c0, m); break;
        case 5: fwd256_row_t(r, 2, 2, c0, m); break;
        case 6: fwd256_row_t(r, 3, 1, c0, m); break;
        case 7: fwd256_row_t(r, 3, 2, c0, m); break;
        case 8: fwd256_row_t(r, 4, 1, c0, m); break;
        default: fwd256_row_t(r, 4, 2, c0, m); break;
        }
    }
}

ALWAYS_INLINE T256 void dw256_pixel(__m256 (*acc)[12][2], const grad_row *r, int j, int kyA,
                                   const int KYN, const int CIN, const int NV,
                                   const bool edge, int c0, const __m256i *m)
{
    __m256 d[2];
#pragma GCC unroll 2
    for (int v = 0; v < NV; v++)
        d[v] = _mm256_maskload_ps(r->dy + (ptrdiff_t)j * r->cout + c0 + 8 * v, m[v]);
    /* Pixel j's window starts at column 2j - 1: index xc[t - CIN] with xc at column 2j, so
     * every offset below is a constant and no pointer leaves the row. */
    const ptrdiff_t c2j = (ptrdiff_t)(2 * j) * CIN;
#pragma GCC unroll 3
    for (int kyi = 0; kyi < KYN; kyi++) {
        const float *xc = r->rows[kyA + kyi] + c2j;
#pragma GCC unroll 3
        for (int kx = 0; kx < 3; kx++) {
            if (edge && (2 * j - 1 + kx < 0 || 2 * j - 1 + kx >= r->w))
                continue;
#pragma GCC unroll 4
            for (int ci = 0; ci < CIN; ci++) {
                const int t = kx * CIN + ci;
                const __m256 xb = _mm256_broadcast_ss(xc + (t - CIN));
#pragma GCC unroll 2
                for (int v = 0; v < NV; v++)
                    acc[kyi][t][v] = _mm256_fmadd_ps(xb, d[v], acc[kyi][t][v]);
            }
        }
    }
}

ALWAYS_INLINE T256 void dw256_sweep(float *part, const grad_row *r, int kyA, const int KYN,
                                   const int CIN, const int NV, int c0, const __m256i *m)
{
    __m256 acc[3][12][2];
#pragma GCC unroll 3
    for (int kyi = 0; kyi < KYN; kyi++)
#pragma GCC unroll 12
        for (int t = 0; t < 3 * CIN; t++)
#pragma GCC unroll 2
            for (int v = 0; v < NV; v++)
                acc[kyi][t][v] = _mm256_setzero_ps();
    int lo, hi;
    interior(r->w, r->ow, &lo, &hi);
    for (int j = 0; j < lo; j++)
        dw256_pixel(acc, r, j, kyA, KYN, CIN, NV, true, c0, m);
    for (int j = lo; j < hi; j++)
        dw256_pixel(acc, r, j, kyA, KYN, CIN, NV, false, c0, m);
    for (int j = hi; j < r->ow; j++)
        dw256_pixel(acc, r, j, kyA, KYN, CIN, NV, true, c0, m);
#pragma GCC unroll 3
    for (int kyi = 0; kyi < KYN; kyi++)
#pragma GCC unroll 12
        for (int t = 0; t < 3 * CIN; t++)
#pragma GCC unroll 2
            for (int v = 0; v < NV; v++) {
                float *pp = part + (size_t)((kyA + kyi) * 3 * CIN + t) * (size_t)r->cp +
                            (size_t)(c0 + 8 * v);
                _mm256_storeu_ps(pp, _mm256_add_ps(_mm256_loadu_ps(pp), acc[kyi][t][v]));
            }
}

#define X2_DW_BUDGET 12

static T256 void dw256_row(float *part, const grad_row *r, int cin)
{
    const int nvt = (r->cout + 7) / 8;
    const bool all3 = r->ky0 == 0 && r->ky1 == 3 && 9 * cin <= X2_DW_BUDGET;
    const int kyn = all3 ? 3 : 1;
    const int nvmax = min_int(2, X2_DW_BUDGET / (kyn * 3 * cin));
    for (int v0 = 0; v0 < nvt; v0 += nvmax) {
        const int nv = min_int(nvmax, nvt - v0), c0 = 8 * v0;
        const __m256i m[2] = {mask8(r->cout - c0), mask8(r->cout - c0 - 8)};
        for (int kyA = all3 ? 0 : r->ky0; kyA < r->ky1; kyA += kyn) {
#define X2_DW(KYN, CIN, NV) dw256_sweep(part, r, kyA, KYN, CIN, NV, c0, m)
            switch ((kyn == 3) * 8 + (cin - 1) * 2 + nv - 1) {
            case 0: X2_DW(1, 1, 1); break;
            case 1: X2_DW(1, 1, 2); break;
            case 2: X2_DW(1, 2, 1); break;
            case 3: X2_DW(1, 2, 2); break;
            case 4: X2_DW(1, 3, 1); break;
            case 6: X2_DW(1, 4, 1); break;
            default: X2_DW(3, 1, 1); break; /* 9 * Cin <= 12: Cin 1 only */
            }
#undef X2_DW
        }
    }
}

/* As dx512_tile; the 3*Cin lanes of a ky row take NT = 1 or 2 ymm. */
ALWAYS_INLINE T256 void dx256_tile(const dx_row *r, int j, const int P, const int CIN)
{
    const int NT = CIN <= 2 ? 1 : 2;
    __m256 acc[4][3][2];
#pragma GCC unroll 4
    for (int q = 0; q < P; q++)
#pragma GCC unroll 3
        for (int ky = 0; ky < 3; ky++)
#pragma GCC unroll 2
            for (int h = 0; h < NT; h++)
                acc[q][ky][h] = _mm256_setzero_ps();
    for (int co = 0; co < r->cout; co++) {
        const float *wc = r->wd + (size_t)co * 3 * ST_DXL;
#pragma GCC unroll 4
        for (int q = 0; q < P; q++) {
            const __m256 d = _mm256_broadcast_ss(r->dy + (ptrdiff_t)(j + 2 * q) * r->cout + co);
#pragma GCC unroll 3
            for (int ky = 0; ky < 3; ky++)
#pragma GCC unroll 2
                for (int h = 0; h < NT; h++)
                    acc[q][ky][h] = _mm256_fmadd_ps(d, _mm256_load_ps(wc + ky * ST_DXL + 8 * h),
                                                    acc[q][ky][h]);
        }
    }
    const __m256i m[2] = {mask8(3 * CIN), mask8(3 * CIN - 8)};
#pragma GCC unroll 4
    for (int q = 0; q < P; q++) {
        const int col0 = 2 * (j + 2 * q) - 1;
        const bool inside = col0 >= 0 && col0 + 2 < r->w;
        for (int ky = r->kyA; ky < r->kyB; ky++) {
            float *d = r->rows[ky];
            if (inside) {
#pragma GCC unroll 2
                for (int h = 0; h < NT; h++) {
                    float *pp = d + (ptrdiff_t)col0 * CIN + 8 * h;
                    _mm256_maskstore_ps(
                        pp, m[h], _mm256_add_ps(_mm256_maskload_ps(pp, m[h]), acc[q][ky][h]));
                }
            } else {
                _Alignas(32) float t[16];
#pragma GCC unroll 2
                for (int h = 0; h < NT; h++)
                    _mm256_store_ps(t + 8 * h, acc[q][ky][h]);
                dx_add_edge(d, t, col0, r->w, CIN);
            }
        }
    }
}

ALWAYS_INLINE T256 void dx256_pass_t(const dx_row *r, int par, int np, const int CIN)
{
#define X2_DX_TILE(i, P) dx256_tile(r, par + 2 * (i), P, CIN)
    ST_DX_TILES(X2_DX_TILE, CIN <= 2 ? 4 : 2, np);
#undef X2_DX_TILE
}

static T256 void dx256_pass(const dx_row *r, int par, int np, int cin)
{
    switch (cin) {
    case 1: dx256_pass_t(r, par, np, 1); break;
    case 2: dx256_pass_t(r, par, np, 2); break;
    case 3: dx256_pass_t(r, par, np, 3); break;
    default: dx256_pass_t(r, par, np, 4); break;
    }
}
#endif /* ST_X86 */

/* ---- rows, threads and entry points ------------------------------------------------------------ */

/* Input rows of output row (n, oy): rows[ky] for ky in [*ky0, *ky1) (row 2oy-1+ky). */
static void window_rows(const float **rows, int *ky0, int *ky1, const float *x,
                        const tern_conv_params *p, int n, int oy)
{
    const int iy0 = 2 * oy - 1;
    *ky0 = iy0 < 0 ? -iy0 : 0;
    *ky1 = min_int(3, p->h - iy0);
    for (int ky = 0; ky < 3; ky++)
        rows[ky] = ky >= *ky0 && ky < *ky1
                       ? x + ((ptrdiff_t)n * p->h + iy0 + ky) * p->w * p->cin
                       : NULL;
}

/* Output rows (N*OH) split into contiguous ranges; each pixel is computed by one thread in an
 * order independent of the split. */
static void forward_task(void *arg, int ith, int nth)
{
    const stem_task *a = arg;
    const tern_conv_params *p = a->p;
    _Alignas(64) float wf[ST_TAPS_MAX * TERN_STEM_COUT_MAX];
    size_t r0, r1;
    tern_split((size_t)p->n * (size_t)p->oh, ith, nth, &r0, &r1);
    if (r0 == r1)
        return;
    pack_forward(wf, a->w, p->cin, p->cout, a->cp);
    fwd_row row = {.w = p->w, .ow = p->ow, .cout = p->cout, .cp = a->cp, .wf = wf,
                   .bias = a->b, .act = a->act};
    for (size_t r = r0; r < r1; r++) {
        window_rows(row.rows, &row.ky0, &row.ky1, a->x, p, (int)(r / (size_t)p->oh),
                    (int)(r % (size_t)p->oh));
        row.y = a->y + (ptrdiff_t)r * p->ow * p->cout;
        switch (a->isa) {
#ifdef ST_X86
        case TERN_ISA_AVX512: fwd512_row(&row, p->cin); break;
        case TERN_ISA_AVX2: fwd256_row(&row, p->cin); break;
#endif
        default: fwds_row(&row, p->cin); break;
        }
    }
}

/* dx rows (N*H) split into ranges; each output row adds only to the input rows its thread
 * owns, so no float is written by two threads. */
static void dx_task(const stem_task *a, int ith, int nth)
{
    const tern_conv_params *p = a->p;
    _Alignas(64) float wd[TERN_STEM_COUT_MAX * 3 * ST_DXL];
    size_t r0, r1;
    tern_split((size_t)p->n * (size_t)p->h, ith, nth, &r0, &r1);
    if (r0 == r1)
        return;
    pack_dx(wd, a->w, p->cin, p->cout);
    dx_row row = {.wd = wd, .w = p->w, .cout = p->cout};
    const size_t H = (size_t)p->h;
    for (size_t n = r0 / H; n <= (r1 - 1) / H; n++) {
        const int iy_lo = n == r0 / H ? (int)(r0 % H) : 0;
        const int iy_hi = n == (r1 - 1) / H ? (int)((r1 - 1) % H) + 1 : p->h;
        const int oy_end = min_int(p->oh, iy_hi / 2 + 1);
        for (int oy = iy_lo / 2; oy < oy_end; oy++) {
            const int iy0 = 2 * oy - 1;
            row.kyA = max_int(0, iy_lo - iy0);
            row.kyB = min_int(3, iy_hi - iy0);
            if (row.kyA >= row.kyB)
                continue;
            for (int ky = row.kyA; ky < row.kyB; ky++)
                row.rows[ky] = a->dx + ((ptrdiff_t)n * p->h + iy0 + ky) * p->w * p->cin;
            row.dy = a->dy + ((ptrdiff_t)n * p->oh + oy) * p->ow * p->cout;
            for (int par = 0; par < 2; par++) {
                const int np = (p->ow - par + 1) / 2;
                switch (a->isa) {
#ifdef ST_X86
                case TERN_ISA_AVX512: dx512_pass(&row, par, np, p->cin); break;
                case TERN_ISA_AVX2: dx256_pass(&row, par, np, p->cin); break;
#endif
                default: dxs_pass(&row, par, np, p->cin); break;
                }
            }
        }
    }
}

/* dW and db partials of thread ith's output rows. */
static void grad_task(const stem_task *a, int ith, int nth)
{
    const tern_conv_params *p = a->p;
    float *part = a->part + (size_t)ith * part_floats(p);
    float *pdb = part + (size_t)(9 * p->cin) * (size_t)a->cp;
    memset(part, 0, part_floats(p) * sizeof *part);
    size_t r0, r1;
    tern_split((size_t)p->n * (size_t)p->oh, ith, nth, &r0, &r1);
    grad_row row = {.w = p->w, .ow = p->ow, .cout = p->cout, .cp = a->cp};
    for (size_t r = r0; r < r1; r++) {
        row.dy = a->dy + (ptrdiff_t)r * p->ow * p->cout;
        if (a->db)
            for (int j = 0; j < p->ow; j++)
                for (int co = 0; co < p->cout; co++)
                    pdb[co] += row.dy[(ptrdiff_t)j * p->cout + co];
        if (!a->dw)
            continue;
        window_rows(row.rows, &row.ky0, &row.ky1, a->x, p, (int)(r / (size_t)p->oh),
                    (int)(r % (size_t)p->oh));
        switch (a->isa) {
#ifdef ST_X86
        case TERN_ISA_AVX512: dw512_row(part, &row, p->cin); break;
        case TERN_ISA_AVX2: dw256_row(part, &row, p->cin); break;
#endif
        default: dws_row(part, &row, p->cin); break;
        }
    }
}

/* dx and (dW, db) write disjoint memory, so one run does both. */
static void backward_task(void *arg, int ith, int nth)
{
    const stem_task *a = arg;
    if (a->dx)
        dx_task(a, ith, nth);
    if (a->dw || a->db)
        grad_task(a, ith, nth);
}

static tern_isa stem_isa(tern_pool *pool)
{
#ifdef ST_X86
    return tern_pool_isa(pool);
#else
    (void)pool;
    return TERN_ISA_SCALAR;
#endif
}

void tern_stemconv_forward(float *y, const float *x, const float *w, const float *b,
                           tern_act act, const tern_conv_params *p, tern_pool *pool)
{
    stem_task t = {.y = y, .x = x, .w = w, .b = b, .act = act, .isa = stem_isa(pool), .p = p,
                   .cp = stem_cp(p->cout)};
    tern_pool_run(pool, forward_task, &t);
}

void tern_stemconv_backward(float *dx, float *dw, float *db, float *workspace, const float *dy,
                            const float *x, const float *w, const tern_conv_params *p,
                            tern_pool *pool)
{
    if (!dx && !dw && !db)
        return;
    stem_task t = {.dx = dx, .dw = dw, .db = db, .part = workspace, .dy = dy, .x = x, .w = w,
                   .isa = stem_isa(pool), .p = p, .cp = stem_cp(p->cout)};
    tern_pool_run(pool, backward_task, &t);
    if (!dw && !db)
        return;
    /* Partials in thread order: the sum depends on the thread count, never on timing. */
    const int nth = tern_pool_size(pool), cin = p->cin;
    const size_t pf = part_floats(p), cp = (size_t)t.cp;
    for (int tr = 0; tr <= 9 * cin; tr++) {
        float *out = tr < 9 * cin ? dw : db;
        if (!out)
            continue;
        for (int co = 0; co < p->cout; co++) {
            const float *src = workspace + (size_t)tr * cp + (size_t)co;
            float s = src[0];
            for (int i = 1; i < nth; i++)
                s += src[(size_t)i * pf];
            if (tr < 9 * cin) /* tr = tap * Cin + ci; dw is (Cout, Cin, 3, 3) */
                out[(size_t)(co * cin + tr % cin) * 9 + (size_t)(tr / cin)] += s;
            else
                out[co] += s;
        }
    }
}
