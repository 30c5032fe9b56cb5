/* Depthwise convolution (groups == cin == cout), direct NHWC kernels: scalar, AVX2, AVX-512.
 *
 * NHWC makes a depthwise tap an elementwise multiply-add of a pixel's channel vector, so every
 * kernel here vectorizes over channels (one vector = 16 channels for AVX-512 and scalar, 8 for
 * AVX2; the last vector of a row is masked) and never uses im2col (per-channel GEMMs would have
 * m = 1). Weights are packed per channel vector as (k*k, V) on the stack, once per thread per
 * channel group, so a tap's weights are one vector load.
 *
 * Forward and the input gradient share one row kernel. A "row" is a list of output pixels
 * j = 0..m-1 at a fixed step, each reading taps at input column col0 + j*in_step + tap.col:
 *   forward, output row oy:     taps (ky, kx) with iy in bounds, col0 = -pad, in_step = stride;
 *   dx, input row iy, class rx: pixels ix with (ix + pad) % stride == rx, reading dy at
 *                               ox = (ix + pad - kx) / stride for kx = rx, rx + stride, ...,
 *                               so in_step = 1: a stride-s transposed conv becomes s gathers.
 * Pixels [jlo, jhi) see every tap in bounds and run 8 at a time with 8 accumulators per
 * channel vector; only the few border pixels filter their taps. Bias and the activation are
 * applied in the forward's store (same operations as tern_act_forward, so bit-identical to
 * the unfused path); dx starts its accumulators from dx itself (+=).
 *
 * dw and db are reductions over N*OH*OW per channel and tap: per output row, each tap is a dot
 * product along the row (4 partial sums) added into a (k*k, V) stack accumulator, written to
 * dw once per channel vector.
 *
 * Threading and determinism: forward and dx split (channel group, row, channel vector) items
 * into contiguous ranges, so batch-1 layers with few rows still use every thread; dw/db split
 * channel vectors. Every output float is computed by one thread in an order that does not
 * depend on the split, so results are bitwise identical for any thread count at a given ISA. */
#include "kernels.h"

#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "gemm.h"
#include "util.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include "simd_act.h"
#define DW_X86 1
#endif

/* Widest vector (floats) and channels per group: a group's weights are packed together. */
#define DW_VMAX 16
#define DW_GROUP_CHANNELS 64
/* Interior output pixels per register tile. */
#define DW_TILE 8
/* Floats between the packed weights of consecutive channel vectors. */
#define DW_WSTRIDE (TERN_DW_TAPS_MAX * DW_VMAX)

typedef struct dw_tap {
    ptrdiff_t off; /* index in the input of the tap's row, column col, channel 0, minus the
                      pixel's base column (so off + base*C is the element) */
    int col;       /* column offset from the pixel's base column */
    int t;         /* ky * k + kx: row of the packed weights */
} dw_tap;

typedef struct dw_row {
    float *out;         /* output pixel 0, channel 0 */
    ptrdiff_t out_step; /* floats between consecutive output pixels */
    const float *in;    /* whole input tensor */
    ptrdiff_t c;        /* channels: floats between neighbouring pixels */
    int col0, in_step;  /* base input column of pixel j is col0 + j * in_step */
    int in_w, m;        /* input row width, output pixels */
    int jlo, jhi;       /* pixels [jlo, jhi) have every tap in bounds */
    bool accumulate;    /* dx: out += sum; forward: out = act(bias + sum) */
    int ntaps;
    dw_tap taps[TERN_DW_TAPS_MAX];
} dw_row;

/* One tap of the weight gradient on one output row: dot of dy[j0 .. j0+count) with x. */
typedef struct dw_gtap {
    const float *x; /* input element of pixel j0 (channel c0) */
    int j0, count, t;
} dw_gtap;

typedef struct dw_task {
    float *y, *dx, *dw, *db;
    const float *x, *w, *b, *dy;
    tern_act act;
    bool dx_accumulate; /* dx += (else dx =: no bias, no activation, so the row stores the sum) */
    double *stats;      /* forward: (nthreads, 2, C) per-thread channel sums of y and y^2 */
    int row0, row1;     /* forward: output rows [row0, row1) of the N*OH (row1 0: all) */
    tern_isa isa;
    int v; /* channels per vector at this ISA */
    const tern_conv_params *p;
} dw_task;

static int min_int(int a, int b) { return a < b ? a : b; }
static int max_int(int a, int b) { return a > b ? a : b; }
static int div_floor(int a, int b) /* b > 0 */
{
    return a / b - (a % b != 0 && a < 0);
}
static int div_ceil(int a, int b) { return -div_floor(-a, b); }

/* Interior pixels: col0 + j*in_step + col within [0, in_w) for every tap. */
static void dw_row_interior(dw_row *r)
{
    if (r->ntaps == 0) {
        r->jlo = 0, r->jhi = r->m;
        return;
    }
    int cmin = r->taps[0].col, cmax = r->taps[0].col;
    for (int i = 1; i < r->ntaps; i++)
        cmin = min_int(cmin, r->taps[i].col), cmax = max_int(cmax, r->taps[i].col);
    r->jlo = min_int(max_int(div_ceil(-cmin - r->col0, r->in_step), 0), r->m);
    r->jhi = min_int(max_int(div_floor(r->in_w - 1 - cmax - r->col0, r->in_step) + 1, r->jlo),
                     r->m);
}

/* The taps of border pixel j that fall inside the input row. */
static int dw_edge_taps(dw_tap *out, const dw_row *r, int j)
{
    const int base = r->col0 + j * r->in_step;
    int n = 0;
    for (int i = 0; i < r->ntaps; i++) {
        const int col = base + r->taps[i].col;
        if (col >= 0 && col < r->in_w)
            out[n++] = r->taps[i];
    }
    return n;
}

/* Forward output row (n, oy). */
static void dw_row_forward(dw_row *r, const dw_task *a, int n, int oy)
{
    const tern_conv_params *p = a->p;
    const ptrdiff_t C = p->cin;
    *r = (dw_row){.out = a->y + ((ptrdiff_t)n * p->oh + oy) * p->ow * C, .out_step = C,
                  .in = a->x, .c = C, .col0 = -p->pad, .in_step = p->stride, .in_w = p->w,
                  .m = p->ow};
    for (int ky = 0; ky < p->k; ky++) {
        const int iy = oy * p->stride - p->pad + ky;
        if (iy < 0 || iy >= p->h)
            continue;
        for (int kx = 0; kx < p->k; kx++)
            r->taps[r->ntaps++] = (dw_tap){
                .off = (((ptrdiff_t)n * p->h + iy) * p->w + kx) * C, .col = kx,
                .t = ky * p->k + kx};
    }
    dw_row_interior(r);
}

/* dx row (n, iy), pixels ix with (ix + pad) % stride == rx; they gather dy. */
static void dw_row_dx(dw_row *r, const dw_task *a, int n, int iy, int rx)
{
    const tern_conv_params *p = a->p;
    const int s = p->stride;
    const ptrdiff_t C = p->cin;
    const int ix0 = ((rx - p->pad) % s + s) % s;
    *r = (dw_row){.out = a->dx + (((ptrdiff_t)n * p->h + iy) * p->w + ix0) * C,
                  .out_step = s * C, .in = a->dy, .c = C, .col0 = (ix0 + p->pad - rx) / s,
                  .in_step = 1, .in_w = p->ow, .m = ix0 < p->w ? (p->w - ix0 + s - 1) / s : 0,
                  .accumulate = a->dx_accumulate};
    for (int ky = (iy + p->pad) % s; ky < p->k; ky += s) {
        const int dyy = iy + p->pad - ky;
        if (dyy < 0 || dyy / s >= p->oh)
            continue;
        for (int kx = rx; kx < p->k; kx += s) {
            const int col = -((kx - rx) / s);
            r->taps[r->ntaps++] = (dw_tap){
                .off = (((ptrdiff_t)n * p->oh + dyy / s) * p->ow + col) * C, .col = col,
                .t = ky * p->k + kx};
        }
    }
    dw_row_interior(r);
}

/* wp (taps, v) = w[c0 .. c0+cw) (C, 1, k, k) transposed, zero beyond cw. */
static void dw_pack(float *wp, const float *w, size_t c0, int cw, int v, int taps)
{
    memset(wp, 0, (size_t)taps * (size_t)v * sizeof *wp);
    for (int c = 0; c < cw; c++)
        for (int t = 0; t < taps; t++)
            wp[t * v + c] = w[(c0 + (size_t)c) * (size_t)taps + (size_t)t];
}

/* ---- scalar ------------------------------------------------------------------------------ */

/* Same expressions as tern_act_forward. */
static float act_scalar(float v, tern_act act)
{
    switch (act) {
    case TERN_ACT_NONE: return v;
    case TERN_ACT_RELU: return v > 0 ? v : 0;
    case TERN_ACT_HARDSWISH: return v * fminf(fmaxf(v + 3, 0), 6) / 6;
    case TERN_ACT_HARDSIGMOID: return fminf(fmaxf(v + 3, 0), 6) / 6;
    }
    return v;
}

static inline __attribute__((always_inline)) void
dws_pixel_n(const dw_row *r, const dw_tap *taps, int ntaps, const float *wp, int j, size_t c0,
            int cw, const float *bias, tern_act act)
{
    float acc[DW_VMAX];
    float *o = r->out + (ptrdiff_t)j * r->out_step + c0;
    const ptrdiff_t base = (ptrdiff_t)(r->col0 + j * r->in_step) * r->c + (ptrdiff_t)c0;
    for (int c = 0; c < cw; c++)
        acc[c] = r->accumulate ? o[c] : bias ? bias[c] : 0;
    for (int i = 0; i < ntaps; i++) {
        const float *ip = r->in + (taps[i].off + base), *w = wp + taps[i].t * DW_VMAX;
        for (int c = 0; c < cw; c++)
            acc[c] += ip[c] * w[c];
    }
    for (int c = 0; c < cw; c++)
        o[c] = r->accumulate ? acc[c] : act_scalar(acc[c], act);
}

/* A constant trip count for full vectors lets the compiler vectorize the channel loops. */
static void dws_pixel(const dw_row *r, const dw_tap *taps, int ntaps, const float *wp, int j,
                      size_t c0, int cw, const float *bias, tern_act act)
{
    if (cw == DW_VMAX)
        dws_pixel_n(r, taps, ntaps, wp, j, c0, DW_VMAX, bias, act);
    else
        dws_pixel_n(r, taps, ntaps, wp, j, c0, cw, bias, act);
}

static void dws_row(const dw_row *r, const float *wp, int nvec, size_t c0, int cw_last,
                    const float *bias, tern_act act)
{
    dw_tap edge[TERN_DW_TAPS_MAX];
    for (int j = 0; j < r->m; j++) {
        const bool inner = j >= r->jlo && j < r->jhi;
        const int ne = inner ? r->ntaps : dw_edge_taps(edge, r, j);
        for (int q = 0; q < nvec; q++)
            dws_pixel(r, inner ? r->taps : edge, ne, wp + q * DW_WSTRIDE, j,
                      c0 + (size_t)q * DW_VMAX, q == nvec - 1 ? cw_last : DW_VMAX,
                      bias ? bias + q * DW_VMAX : NULL, act);
    }
}

/* accw (taps, DW_VMAX) += dot products along the row; accb += sum of the dy row. */
static void dws_grad_row(float *accw, float *accb, const float *dyrow, ptrdiff_t C,
                         ptrdiff_t xstep, const dw_gtap *g, int ng, int ow, int cw)
{
    if (accb)
        for (int j = 0; j < ow; j++)
            for (int c = 0; c < cw; c++)
                accb[c] += dyrow[j * C + c];
    for (int i = 0; i < ng; i++) {
        float *acc = accw + g[i].t * DW_VMAX;
        const float *d = dyrow + g[i].j0 * C;
        for (int j = 0; j < g[i].count; j++)
            for (int c = 0; c < cw; c++)
                acc[c] += d[j * C + c] * g[i].x[j * xstep + c];
    }
}

#ifdef DW_X86
/* ---- AVX-512 ----------------------------------------------------------------------------- */
#define DW_T512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define DW_INLINE static inline __attribute__((always_inline))

/* simd_act.h's: division by 6 without vdivps, the same bits. */
DW_INLINE DW_T512 __m512 act512(__m512 v, tern_act act)
{
    return act16(v, act);
}

/* px output pixels from j, one channel vector: accumulators stay in registers over the taps. */
DW_INLINE DW_T512 void dw512_tile(const dw_row *r, const dw_tap *taps, int ntaps,
                                  const float *wp, int j, int px, size_t c0, __mmask16 m,
                                  const float *bias, tern_act act)
{
    __m512 acc[DW_TILE];
    float *o = r->out + (ptrdiff_t)j * r->out_step + c0;
    const ptrdiff_t base = (ptrdiff_t)(r->col0 + j * r->in_step) * r->c + (ptrdiff_t)c0;
    const ptrdiff_t istep = r->in_step * r->c, ostep = r->out_step;
    const __m512 init = bias ? _mm512_maskz_loadu_ps(m, bias) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int q = 0; q < px; q++)
        acc[q] = r->accumulate ? _mm512_maskz_loadu_ps(m, o + q * ostep) : init;
    for (int i = 0; i < ntaps; i++) {
        const float *ip = r->in + (taps[i].off + base);
        const __m512 w = _mm512_load_ps(wp + taps[i].t * DW_VMAX);
#pragma GCC unroll 8
        for (int q = 0; q < px; q++)
            acc[q] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, ip + q * istep), w, acc[q]);
    }
#pragma GCC unroll 8
    for (int q = 0; q < px; q++)
        _mm512_mask_storeu_ps(o + q * ostep, m, r->accumulate ? acc[q] : act512(acc[q], act));
}

/* One output pixel, nvec (1..4) channel vectors: the taps alternate between two sets of
 * accumulators, so even one pixel has 2 * nvec independent FMA chains (border pixels and short
 * rows such as 7x7 would otherwise wait on FMA latency). */
DW_INLINE DW_T512 void dw512_pixel(const dw_row *r, const dw_tap *taps, int ntaps,
                                   const float *wp, int j, int nvec, size_t c0,
                                   const __mmask16 *m, const float *bias, tern_act act)
{
    __m512 a0[4], a1[4];
    float *o = r->out + (ptrdiff_t)j * r->out_step + c0;
    const ptrdiff_t base = (ptrdiff_t)(r->col0 + j * r->in_step) * r->c + (ptrdiff_t)c0;
#pragma GCC unroll 4
    for (int q = 0; q < nvec; q++) {
        a0[q] = r->accumulate ? _mm512_maskz_loadu_ps(m[q], o + q * DW_VMAX)
                : bias        ? _mm512_maskz_loadu_ps(m[q], bias + q * DW_VMAX)
                              : _mm512_setzero_ps();
        a1[q] = _mm512_setzero_ps();
    }
    int i = 0;
    for (; i + 2 <= ntaps; i += 2) {
        const float *i0 = r->in + (taps[i].off + base), *i1 = r->in + (taps[i + 1].off + base);
        const float *w0 = wp + taps[i].t * DW_VMAX, *w1 = wp + taps[i + 1].t * DW_VMAX;
#pragma GCC unroll 4
        for (int q = 0; q < nvec; q++) {
            a0[q] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m[q], i0 + q * DW_VMAX),
                                    _mm512_load_ps(w0 + q * DW_WSTRIDE), a0[q]);
            a1[q] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m[q], i1 + q * DW_VMAX),
                                    _mm512_load_ps(w1 + q * DW_WSTRIDE), a1[q]);
        }
    }
    if (i < ntaps) {
        const float *i0 = r->in + (taps[i].off + base), *w0 = wp + taps[i].t * DW_VMAX;
#pragma GCC unroll 4
        for (int q = 0; q < nvec; q++)
            a0[q] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m[q], i0 + q * DW_VMAX),
                                    _mm512_load_ps(w0 + q * DW_WSTRIDE), a0[q]);
    }
#pragma GCC unroll 4
    for (int q = 0; q < nvec; q++) {
        const __m512 s = _mm512_add_ps(a0[q], a1[q]);
        _mm512_mask_storeu_ps(o + q * DW_VMAX, m[q], r->accumulate ? s : act512(s, act));
    }
}

DW_INLINE DW_T512 void dw512_pixels(const dw_row *r, const dw_tap *taps, int ntaps,
                                    const float *wp, int j, int nvec, size_t c0,
                                    const __mmask16 *m, const float *bias, tern_act act)
{
    for (int q = 0; q < nvec; q += 4) {
        const float *b = bias ? bias + q * DW_VMAX : NULL;
        const float *w = wp + q * DW_WSTRIDE;
        const size_t c = c0 + (size_t)q * DW_VMAX;
        switch (min_int(nvec - q, 4)) {
        case 4: dw512_pixel(r, taps, ntaps, w, j, 4, c, m + q, b, act); break;
        case 3: dw512_pixel(r, taps, ntaps, w, j, 3, c, m + q, b, act); break;
        case 2: dw512_pixel(r, taps, ntaps, w, j, 2, c, m + q, b, act); break;
        default: dw512_pixel(r, taps, ntaps, w, j, 1, c, m + q, b, act); break;
        }
    }
}

/* nvec channel vectors from c0 (weights wp + q * DW_WSTRIDE); the last has cw_last channels. */
static DW_T512 void dw512_row(const dw_row *r, const float *wp, int nvec, size_t c0,
                              int cw_last, const float *bias, tern_act act)
{
    __mmask16 m[DW_GROUP_CHANNELS / 16];
    for (int q = 0; q < nvec; q++)
        m[q] = (__mmask16)(q < nvec - 1 || cw_last >= 16 ? 0xffff : (1u << cw_last) - 1);
    dw_tap edge[TERN_DW_TAPS_MAX];
    int j = 0;
    for (; j < r->jlo; j++)
        dw512_pixels(r, edge, dw_edge_taps(edge, r, j), wp, j, nvec, c0, m, bias, act);
    for (; j + DW_TILE <= r->jhi; j += DW_TILE)
        for (int q = 0; q < nvec; q++)
            dw512_tile(r, r->taps, r->ntaps, wp + q * DW_WSTRIDE, j, DW_TILE,
                       c0 + (size_t)q * DW_VMAX, m[q], bias ? bias + q * DW_VMAX : NULL, act);
    for (; j < r->jhi; j++)
        dw512_pixels(r, r->taps, r->ntaps, wp, j, nvec, c0, m, bias, act);
    for (; j < r->m; j++)
        dw512_pixels(r, edge, dw_edge_taps(edge, r, j), wp, j, nvec, c0, m, bias, act);
}

/* Dot of count strided vectors with 4 partial sums (fixed order: deterministic). */
DW_INLINE DW_T512 __m512 dot512(const float *a, ptrdiff_t astep, const float *b,
                                ptrdiff_t bstep, int count, __mmask16 m)
{
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int j = 0;
    for (; j + 4 <= count; j += 4) {
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + j * astep),
                             _mm512_maskz_loadu_ps(m, b + j * bstep), s0);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + (j + 1) * astep),
                             _mm512_maskz_loadu_ps(m, b + (j + 1) * bstep), s1);
        s2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + (j + 2) * astep),
                             _mm512_maskz_loadu_ps(m, b + (j + 2) * bstep), s2);
        s3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + (j + 3) * astep),
                             _mm512_maskz_loadu_ps(m, b + (j + 3) * bstep), s3);
    }
    for (; j < count; j++)
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + j * astep),
                             _mm512_maskz_loadu_ps(m, b + j * bstep), s0);
    return _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3));
}

static DW_T512 void dw512_grad_row(float *accw, float *accb, const float *dyrow, ptrdiff_t C,
                                   ptrdiff_t xstep, const dw_gtap *g, int ng, int ow, int cw)
{
    const __mmask16 m = (__mmask16)(cw >= 16 ? 0xffff : (1u << cw) - 1);
    if (accb) {
        __m512 s0 = _mm512_setzero_ps(), s1 = s0;
        int j = 0;
        for (; j + 2 <= ow; j += 2) {
            s0 = _mm512_add_ps(s0, _mm512_maskz_loadu_ps(m, dyrow + j * C));
            s1 = _mm512_add_ps(s1, _mm512_maskz_loadu_ps(m, dyrow + (j + 1) * C));
        }
        if (j < ow)
            s0 = _mm512_add_ps(s0, _mm512_maskz_loadu_ps(m, dyrow + j * C));
        _mm512_store_ps(accb, _mm512_add_ps(_mm512_load_ps(accb), _mm512_add_ps(s0, s1)));
    }
    for (int i = 0; i < ng; i++) {
        float *acc = accw + g[i].t * DW_VMAX;
        const __m512 s = dot512(dyrow + g[i].j0 * C, C, g[i].x, xstep, g[i].count, m);
        _mm512_store_ps(acc, _mm512_add_ps(_mm512_load_ps(acc), s));
    }
}

/* ---- AVX2 -------------------------------------------------------------------------------- */
#define DW_T256 __attribute__((target("avx2,fma")))

/* simd_act.h's: division by 6 without vdivps, the same bits. */
DW_INLINE DW_T256 __m256 act256(__m256 v, tern_act act)
{
    return act8(v, act);
}

/* Full vectors use plain loads; the channel tail (full == false) masked ones. */
DW_INLINE DW_T256 __m256 ld256(const float *p, bool full, __m256i m)
{
    return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m);
}
DW_INLINE DW_T256 void st256(float *p, __m256 v, bool full, __m256i m)
{
    if (full)
        _mm256_storeu_ps(p, v);
    else
        _mm256_maskstore_ps(p, m, v);
}
DW_INLINE DW_T256 __m256i mask256(int cw)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(cw), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

DW_INLINE DW_T256 void dw256_tile(const dw_row *r, const dw_tap *taps, int ntaps,
                                  const float *wp, int j, int px, size_t c0, bool full,
                                  __m256i m, const float *bias, tern_act act)
{
    __m256 acc[DW_TILE];
    float *o = r->out + (ptrdiff_t)j * r->out_step + c0;
    const ptrdiff_t base = (ptrdiff_t)(r->col0 + j * r->in_step) * r->c + (ptrdiff_t)c0;
    const ptrdiff_t istep = r->in_step * r->c, ostep = r->out_step;
    const __m256 init = bias ? ld256(bias, full, m) : _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int q = 0; q < px; q++)
        acc[q] = r->accumulate ? ld256(o + q * ostep, full, m) : init;
    for (int i = 0; i < ntaps; i++) {
        const float *ip = r->in + (taps[i].off + base);
        const __m256 w = _mm256_load_ps(wp + taps[i].t * DW_VMAX);
#pragma GCC unroll 8
        for (int q = 0; q < px; q++)
            acc[q] = _mm256_fmadd_ps(ld256(ip + q * istep, full, m), w, acc[q]);
    }
#pragma GCC unroll 8
    for (int q = 0; q < px; q++)
        st256(o + q * ostep, r->accumulate ? acc[q] : act256(acc[q], act), full, m);
}

/* One output pixel, nvec (1..4) channel vectors, two accumulator sets (see dw512_pixel). */
DW_INLINE DW_T256 void dw256_pixel(const dw_row *r, const dw_tap *taps, int ntaps,
                                   const float *wp, int j, int nvec, size_t c0, bool full,
                                   __m256i m, const float *bias, tern_act act)
{
    __m256 a0[4], a1[4];
    float *o = r->out + (ptrdiff_t)j * r->out_step + c0;
    const ptrdiff_t base = (ptrdiff_t)(r->col0 + j * r->in_step) * r->c + (ptrdiff_t)c0;
#pragma GCC unroll 4
    for (int q = 0; q < nvec; q++) {
        a0[q] = r->accumulate ? ld256(o + q * 8, full, m)
                : bias        ? ld256(bias + q * 8, full, m)
                              : _mm256_setzero_ps();
        a1[q] = _mm256_setzero_ps();
    }
    int i = 0;
    for (; i + 2 <= ntaps; i += 2) {
        const float *i0 = r->in + (taps[i].off + base), *i1 = r->in + (taps[i + 1].off + base);
        const float *w0 = wp + taps[i].t * DW_VMAX, *w1 = wp + taps[i + 1].t * DW_VMAX;
#pragma GCC unroll 4
        for (int q = 0; q < nvec; q++) {
            a0[q] = _mm256_fmadd_ps(ld256(i0 + q * 8, full, m),
                                    _mm256_load_ps(w0 + q * DW_WSTRIDE), a0[q]);
            a1[q] = _mm256_fmadd_ps(ld256(i1 + q * 8, full, m),
                                    _mm256_load_ps(w1 + q * DW_WSTRIDE), a1[q]);
        }
    }
    if (i < ntaps) {
        const float *i0 = r->in + (taps[i].off + base), *w0 = wp + taps[i].t * DW_VMAX;
#pragma GCC unroll 4
        for (int q = 0; q < nvec; q++)
            a0[q] = _mm256_fmadd_ps(ld256(i0 + q * 8, full, m),
                                    _mm256_load_ps(w0 + q * DW_WSTRIDE), a0[q]);
    }
#pragma GCC unroll 4
    for (int q = 0; q < nvec; q++) {
        const __m256 s = _mm256_add_ps(a0[q], a1[q]);
        st256(o + q * 8, r->accumulate ? s : act256(s, act), full, m);
    }
}

/* Full vectors in fours, then the (possibly partial) last one masked. */
DW_INLINE DW_T256 void dw256_pixels(const dw_row *r, const dw_tap *taps, int ntaps,
                                    const float *wp, int j, int nvec, size_t c0, int cw_last,
                                    const float *bias, tern_act act)
{
    const int nfull = cw_last == 8 ? nvec : nvec - 1;
    const __m256i all = mask256(8);
    int q = 0;
    for (; q < nfull; q += 4) {
        const float *b = bias ? bias + q * 8 : NULL, *w = wp + q * DW_WSTRIDE;
        const size_t c = c0 + (size_t)q * 8;
        switch (min_int(nfull - q, 4)) {
        case 4: dw256_pixel(r, taps, ntaps, w, j, 4, c, true, all, b, act); break;
        case 3: dw256_pixel(r, taps, ntaps, w, j, 3, c, true, all, b, act); break;
        case 2: dw256_pixel(r, taps, ntaps, w, j, 2, c, true, all, b, act); break;
        default: dw256_pixel(r, taps, ntaps, w, j, 1, c, true, all, b, act); break;
        }
    }
    if (nfull < nvec)
        dw256_pixel(r, taps, ntaps, wp + nfull * DW_WSTRIDE, j, 1, c0 + (size_t)nfull * 8,
                    false, mask256(cw_last), bias ? bias + nfull * 8 : NULL, act);
}

static DW_T256 void dw256_row(const dw_row *r, const float *wp, int nvec, size_t c0,
                              int cw_last, const float *bias, tern_act act)
{
    dw_tap edge[TERN_DW_TAPS_MAX];
    int j = 0;
    for (; j < r->jlo; j++)
        dw256_pixels(r, edge, dw_edge_taps(edge, r, j), wp, j, nvec, c0, cw_last, bias, act);
    for (; j + DW_TILE <= r->jhi; j += DW_TILE)
        for (int q = 0; q < nvec; q++) {
            const float *w = wp + q * DW_WSTRIDE, *b = bias ? bias + q * 8 : NULL;
            const size_t c = c0 + (size_t)q * 8;
            if (q < nvec - 1 || cw_last == 8)
                dw256_tile(r, r->taps, r->ntaps, w, j, DW_TILE, c, true, mask256(8), b, act);
            else
                dw256_tile(r, r->taps, r->ntaps, w, j, DW_TILE, c, false, mask256(cw_last), b,
                           act);
        }
    for (; j < r->jhi; j++)
        dw256_pixels(r, r->taps, r->ntaps, wp, j, nvec, c0, cw_last, bias, act);
    for (; j < r->m; j++)
        dw256_pixels(r, edge, dw_edge_taps(edge, r, j), wp, j, nvec, c0, cw_last, bias, act);
}

static DW_T256 void dw256_grad_row(float *accw, float *accb, const float *dyrow, ptrdiff_t C,
                                   ptrdiff_t xstep, const dw_gtap *g, int ng, int ow, int cw)
{
    /* Masked loads throughout: the dot products are bound by two loads per FMA anyway. */
    const __m256i m = mask256(cw);
    if (accb) {
        __m256 s0 = _mm256_setzero_ps(), s1 = s0;
        int j = 0;
        for (; j + 2 <= ow; j += 2) {
            s0 = _mm256_add_ps(s0, _mm256_maskload_ps(dyrow + j * C, m));
            s1 = _mm256_add_ps(s1, _mm256_maskload_ps(dyrow + (j + 1) * C, m));
        }
        if (j < ow)
            s0 = _mm256_add_ps(s0, _mm256_maskload_ps(dyrow + j * C, m));
        _mm256_store_ps(accb, _mm256_add_ps(_mm256_load_ps(accb), _mm256_add_ps(s0, s1)));
    }
    for (int i = 0; i < ng; i++) {
        float *acc = accw + g[i].t * DW_VMAX;
        const float *a = dyrow + g[i].j0 * C, *b = g[i].x;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        int j = 0;
        for (; j + 4 <= g[i].count; j += 4) {
            s0 = _mm256_fmadd_ps(_mm256_maskload_ps(a + j * C, m),
                                 _mm256_maskload_ps(b + j * xstep, m), s0);
            s1 = _mm256_fmadd_ps(_mm256_maskload_ps(a + (j + 1) * C, m),
                                 _mm256_maskload_ps(b + (j + 1) * xstep, m), s1);
            s2 = _mm256_fmadd_ps(_mm256_maskload_ps(a + (j + 2) * C, m),
                                 _mm256_maskload_ps(b + (j + 2) * xstep, m), s2);
            s3 = _mm256_fmadd_ps(_mm256_maskload_ps(a + (j + 3) * C, m),
                                 _mm256_maskload_ps(b + (j + 3) * xstep, m), s3);
        }
        for (; j < g[i].count; j++)
            s0 = _mm256_fmadd_ps(_mm256_maskload_ps(a + j * C, m),
                                 _mm256_maskload_ps(b + j * xstep, m), s0);
        const __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
        _mm256_store_ps(acc, _mm256_add_ps(_mm256_load_ps(acc), s));
    }
}
#endif /* DW_X86 */

/* ---- dispatch and threading ---------------------------------------------------------------- */

static void dw_run_row(const dw_task *a, const dw_row *r, const float *wp, int nvec,
                       size_t c0, int cw_last, const float *bias)
{
    switch (a->isa) {
#ifdef DW_X86
    case TERN_ISA_AVX512: dw512_row(r, wp, nvec, c0, cw_last, bias, a->act); return;
    case TERN_ISA_AVX2: dw256_row(r, wp, nvec, c0, cw_last, bias, a->act); return;
#endif
    default: dws_row(r, wp, nvec, c0, cw_last, bias, a->act); return;
    }
}

/* Rows per block: a block's input and output rows (about 256 KiB) stay in L2 while each
 * channel group sweeps them, so the tensors are streamed once, in address order, instead of
 * once per group with a stride of C floats (which costs a TLB miss every few pixels). */
static int dw_block_rows(const tern_conv_params *p, int rows)
{
    const size_t per_row = (size_t)p->cin * ((size_t)p->stride * (size_t)p->w + (size_t)p->ow);
    const size_t rb = ((size_t)1 << 16) / (per_row ? per_row : 1);
    return rb < 1 ? 1 : rb > (size_t)rows ? rows : (int)rb;
}

/* Forward output rows (N*OH) or dx rows (N*H) times channel vectors are items in row-major
 * order; thread ith takes a contiguous range of them, so batch-1 layers with fewer rows than
 * threads still split. Within the range, per block of rows and group of channel vectors: pack
 * the group's weights once, then run each row's vectors. */
static void dw_rows_task(const dw_task *a, bool backward, int ith, int nth)
{
    const tern_conv_params *p = a->p;
    const int C = p->cin, v = a->v, taps = p->k * p->k;
    const int rows_per_image = backward ? p->h : p->oh, nclass = backward ? p->stride : 1;
    const int ncv = (C + v - 1) / v, gv = DW_GROUP_CHANNELS / v;
    const bool some = !backward && a->row1 > 0;
    const size_t rfirst = some ? (size_t)a->row0 : 0;
    const size_t rows = some ? (size_t)(a->row1 - a->row0)
                             : (size_t)p->n * (size_t)rows_per_image;
    _Alignas(64) float wp[DW_GROUP_CHANNELS / 8][DW_WSTRIDE];
    dw_row row;
    double *stats = !backward && a->stats ? a->stats + (size_t)ith * 2 * (size_t)C : NULL;
    size_t i0, i1;
    tern_split(rows * (size_t)ncv, ith, nth, &i0, &i1);
    if (i0 == i1)
        return;
    /* Items (and i0, i1) count from row rfirst; r below is the absolute row. */
    i0 += rfirst * (size_t)ncv, i1 += rfirst * (size_t)ncv;
    const size_t r_begin = i0 / (size_t)ncv, r_end = (i1 - 1) / (size_t)ncv + 1;
    const size_t rb = (size_t)dw_block_rows(p, (int)rows);
    for (size_t b0 = r_begin; b0 < r_end; b0 += rb) {
        const size_t b1 = b0 + rb < r_end ? b0 + rb : r_end;
        for (int g = 0; g * gv < ncv; g++) {
            const int nv = min_int(gv, ncv - g * gv);
            /* Items of this group in the block: [first, last]; skip if outside the range. */
            const size_t first = b0 * (size_t)ncv + (size_t)(g * gv);
            const size_t last = (b1 - 1) * (size_t)ncv + (size_t)(g * gv + nv - 1);
            if (last < i0 || first >= i1)
                continue;
            for (int q = 0; q < nv; q++) {
                const int c0 = (g * gv + q) * v;
                dw_pack(wp[q], a->w, (size_t)c0, min_int(v, C - c0), DW_VMAX, taps);
            }
            for (size_t r = b0; r < b1; r++) {
                const size_t item0 = r * (size_t)ncv + (size_t)(g * gv);
                const int q0 = item0 >= i0 ? 0 : (int)min_int(nv, (int)(i0 - item0));
                const int q1 = item0 + (size_t)nv <= i1 ? nv : (int)(i1 > item0 ? i1 - item0 : 0);
                if (q0 >= q1)
                    continue;
                const int n = (int)(r / (size_t)rows_per_image);
                const int rr = (int)(r % (size_t)rows_per_image);
                for (int rx = 0; rx < nclass; rx++) {
                    if (backward)
                        dw_row_dx(&row, a, n, rr, rx);
                    else
                        dw_row_forward(&row, a, n, rr);
                    const int c0 = (g * gv + q0) * v, c1 = min_int((g * gv + q1) * v, C);
                    dw_run_row(a, &row, wp[q0], q1 - q0, (size_t)c0, c1 - (q1 - 1 - q0) * v - c0,
                               a->b ? a->b + c0 : NULL);
                    if (stats) /* the row just stored, read back from cache */
                        tern_col_stats(stats + c0, stats + C + c0, row.out + c0, (size_t)C,
                                       (size_t)row.m, (size_t)(c1 - c0), a->isa);
                }
            }
        }
    }
}

/* dw and db of thread ith's channel vectors (the split is by channel, so no two threads add
 * into the same float). Rows are taken in blocks as in the forward; each (block, vector)
 * accumulates in registers and on the stack, then adds into dw and db, so the summation order
 * depends on the shape alone. */
static void dw_grad_task(const dw_task *a, int ith, int nth)
{
    const tern_conv_params *p = a->p;
    const int C = p->cin, v = a->v, k = p->k, s = p->stride, taps = k * k;
    const ptrdiff_t Cs = C;
    const int ncv = (C + v - 1) / v, rows = p->n * p->oh;
    const int rb = dw_block_rows(p, rows);
    _Alignas(64) float accw[TERN_DW_TAPS_MAX * DW_VMAX];
    _Alignas(64) float accb[DW_VMAX];
    dw_gtap g[TERN_DW_TAPS_MAX];
    int jlo[7], jhi[7]; /* output columns whose input column for kx is in bounds */
    for (int kx = 0; kx < k; kx++) {
        jlo[kx] = min_int(max_int(div_ceil(p->pad - kx, s), 0), p->ow);
        jhi[kx] = min_int(max_int(div_floor(p->w - 1 + p->pad - kx, s) + 1, jlo[kx]), p->ow);
    }
    size_t cv0, cv1;
    tern_split((size_t)ncv, ith, nth, &cv0, &cv1);
    for (int b0 = 0; b0 < rows && cv0 < cv1; b0 += rb) {
        const int b1 = min_int(b0 + rb, rows);
        for (int cv = (int)cv0; cv < (int)cv1; cv++) {
            const int c0 = cv * v, cw = min_int(v, C - c0);
            memset(accw, 0, sizeof accw);
            memset(accb, 0, sizeof accb);
            for (int r = b0; r < b1; r++) {
                const int n = r / p->oh, oy = r % p->oh;
                const float *dyrow = a->dy + (ptrdiff_t)r * p->ow * Cs + c0;
                int ng = 0;
                if (a->dw)
                    for (int ky = 0; ky < k; ky++) {
                        const int iy = oy * s - p->pad + ky;
                        if (iy < 0 || iy >= p->h)
                            continue;
                        for (int kx = 0; kx < k; kx++)
                            if (jlo[kx] < jhi[kx])
                                g[ng++] = (dw_gtap){
                                    .x = a->x + (((ptrdiff_t)n * p->h + iy) * p->w +
                                                 jlo[kx] * s - p->pad + kx) * Cs + c0,
                                    .j0 = jlo[kx], .count = jhi[kx] - jlo[kx],
                                    .t = ky * k + kx};
                    }
                float *b = a->db ? accb : NULL;
                switch (a->isa) {
#ifdef DW_X86
                case TERN_ISA_AVX512:
                    dw512_grad_row(accw, b, dyrow, Cs, s * Cs, g, ng, p->ow, cw);
                    break;
                case TERN_ISA_AVX2:
                    dw256_grad_row(accw, b, dyrow, Cs, s * Cs, g, ng, p->ow, cw);
                    break;
#endif
                default: dws_grad_row(accw, b, dyrow, Cs, s * Cs, g, ng, p->ow, cw); break;
                }
            }
            if (a->dw)
                for (int c = 0; c < cw; c++)
                    for (int t = 0; t < taps; t++)
                        a->dw[(size_t)(c0 + c) * (size_t)taps + (size_t)t] +=
                            accw[t * DW_VMAX + c];
            if (a->db)
                for (int c = 0; c < cw; c++)
                    a->db[c0 + c] += accb[c];
        }
    }
}

static void dw_forward_task(void *arg, int ith, int nth)
{
    dw_rows_task(arg, false, ith, nth);
}

/* dx and (dw, db) write disjoint memory, so one run does both without a barrier. */
static void dw_backward_task(void *arg, int ith, int nth)
{
    const dw_task *a = arg;
    if (a->dx)
        dw_rows_task(a, true, ith, nth);
    if (a->dw || a->db)
        dw_grad_task(a, ith, nth);
}

static void dw_task_isa(dw_task *t, tern_pool *pool)
{
    t->isa = tern_pool_isa(pool);
#ifdef DW_X86
    t->v = t->isa == TERN_ISA_AVX2 ? 8 : 16;
#else
    t->isa = TERN_ISA_SCALAR;
    t->v = 16;
#endif
}

void tern_dwconv_forward(float *y, const float *x, const float *w, const float *b, tern_act act,
                         const tern_conv_params *p, tern_pool *pool)
{
    tern_dwconv_forward_stats(y, NULL, x, w, b, act, p, pool);
}

void tern_dwconv_forward_rows(float *y, const float *x, const float *w, const float *b,
                              tern_act act, const tern_conv_params *p, int row0, int row1,
                              tern_pool *pool)
{
    if (row0 >= row1)
        return;
    dw_task t = {.y = y, .x = x, .w = w, .b = b, .act = act, .p = p, .row0 = row0,
                 .row1 = row1};
    dw_task_isa(&t, pool);
    tern_pool_run(pool, dw_forward_task, &t);
}

void tern_dwconv_forward_stats(float *y, double *stats, const float *x, const float *w,
                               const float *b, tern_act act, const tern_conv_params *p,
                               tern_pool *pool)
{
    dw_task t = {.y = y, .x = x, .w = w, .b = b, .act = act, .p = p, .stats = stats};
    dw_task_isa(&t, pool);
    if (stats)
        memset(stats, 0, (size_t)tern_pool_size(pool) * 2 * (size_t)p->cout * sizeof *stats);
    tern_pool_run(pool, dw_forward_task, &t);
}

void tern_dwconv_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                          const float *w, const tern_conv_params *p, tern_pool *pool)
{
    tern_dwconv_backward_mode(dx, dw, db, dy, x, w, p, TERN_GRAD_ADD, pool);
}

void tern_dwconv_backward_mode(float *dx, float *dw, float *db, const float *dy, const float *x,
                               const float *w, const tern_conv_params *p,
                               tern_grad_mode dx_mode, tern_pool *pool)
{
    if (!dx && !dw && !db)
        return;
    dw_task t = {.dx = dx, .dw = dw, .db = db, .dy = dy, .x = x, .w = w, .p = p,
                 .dx_accumulate = dx_mode == TERN_GRAD_ADD};
    dw_task_isa(&t, pool);
    tern_pool_run(pool, dw_backward_task, &t);
}
