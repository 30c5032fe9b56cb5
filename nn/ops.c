/* The non-convolution kernels of nn/kernels.h: batch and group normalization (plain and fused
 * with an activation), activations, residual add, global average pooling, the
 * squeeze-and-excitation channel scale, dropout and the cross-entropy loss. Activations are
 * NHWC, so per-channel work walks rows of C contiguous floats and vectorizes across channels.
 *
 * Instruction sets: the memory-bound kernels have a portable scalar body and AVX2 / AVX-512
 * bodies compiled with per-function target attributes, chosen by tern_pool_isa(pool). The
 * SIMD bodies perform the same float and double operations in the same order as the scalar
 * ones (no FMA contraction, division by 3 and 6 made exact, see div_exact16), so every ISA
 * gives bitwise the same results; only the thread count can change a result.
 *
 * Threading: elementwise work is split by rows. BatchNorm statistics are column reductions;
 * each thread sums its own row range in double into its pool scratch, and the calling thread
 * adds the per-thread partials in thread order, so results are bitwise reproducible for a
 * given thread count. With one thread (or little work) the statistics are plain sequential
 * sums over rows. BatchNorm uses a one-pass shifted variance: sums of d = x - k and d^2 with
 * k = the channel's first value, in double, so var = E[d^2] - E[d]^2 does not cancel unless
 * |mean - k| dwarfs the spread, which a sample of the data itself makes unlikely. GroupNorm,
 * pooling and the SE reductions split work so that each sum has one owner. */
#include <math.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define TERN_X86 1
#include "simd_act.h"
#else
#define TERN_X86 0
#endif

#include "kernels.h"
#include "util.h"

/* Channels reduced together: their double accumulators live on the stack. */
#define CHUNK 64
/* Channels per stack-buffered block in the BatchNorm kernels. */
#define BN_BLOCK 512
/* Below this many floats touched, waking the pool costs more than the work. */
#define INLINE_MAX ((size_t)1 << 15)
/* Widest c whose per-thread partials (2c doubles) and per-channel coefficients (4c floats)
 * fit the pool scratch. */
#define BN_SCRATCH_C (TERN_POOL_SCRATCH_FLOATS / 8)


static void run(tern_pool *pool, size_t work, tern_task_fn fn, void *arg)
{
    tern_pool_run(work < INLINE_MAX ? NULL : pool, fn, arg);
}

static size_t min_size(size_t a, size_t b)
{
    return a < b ? a : b;
}

/* ---- scalar element operations (the definitions every ISA reproduces) ------------------- */

/* PyTorch's expressions: hardswish = x * min(max(x + 3, 0), 6) / 6. Ternaries rather than
 * fmaxf/fminf: same values (a NaN x + 3 clamps to 0 either way) and vectorizable. */
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

/* g * act'(z) with PyTorch's choices at the kinks. */
static inline float act_grad(float g, float z, tern_act act)
{
    switch (act) {
    case TERN_ACT_NONE: return g;
    case TERN_ACT_RELU: return z > 0 ? g : 0;
    case TERN_ACT_HARDSWISH: return z < -3 ? 0 : z <= 3 ? g * (z / 3 + 0.5f) : g;
    case TERN_ACT_HARDSIGMOID: return z > -3 && z < 3 ? g * (1.0f / 6) : 0;
    }
    return g;
}

#if TERN_X86
/* ---- AVX-512 element operations ------------------------------------------------------- */

static inline __m512d lo8(__m512 v) __attribute__((always_inline, target("avx512f")));
static inline __m512d lo8(__m512 v)
{
    return _mm512_cvtps_pd(_mm512_castps512_ps256(v));
}
static inline __m512d hi8(__m512 v) __attribute__((always_inline, target("avx512f,avx512dq")));
static inline __m512d hi8(__m512 v)
{
    return _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
}

#endif

/* ---- batch normalization cores --------------------------------------------------------- */

/* Each core works on `rows` rows of `nc` channels, row stride ld; per-channel arrays are
 * already offset to the first channel. Accumulating cores add to what s/q hold, row by row,
 * so a column's sum is sequential over rows whatever the ISA. */

/* Forward statistics: s += x - k, q += (x - k)^2 in double. */
static void fstats_scalar(double *s, double *q, const float *x, const float *k, size_t rows,
                          size_t ld, size_t nc)
{
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * ld;
        for (size_t j = 0; j < nc; j++) {
            double d = (double)xr[j] - (double)k[j];
            s[j] += d;
            q[j] += d * d;
        }
    }
}

/* Backward statistics of the fused kernel: with z = (y - mean) * alpha + beta and
 * dz = da * act'(z), s += dz and q += dz * (y - mean), in double. */
static void bstats_scalar(double *s, double *q, const float *da, const float *y,
                          const float *mean, const float *alpha, const float *beta, tern_act act,
                          size_t rows, size_t ld, size_t nc)
{
    for (size_t r = 0; r < rows; r++) {
        const float *yr = y + r * ld, *dar = da + r * ld;
        for (size_t j = 0; j < nc; j++) {
            float cen = yr[j] - mean[j];
            float dz = act_grad(dar[j], cen * alpha[j] + beta[j], act);
            s[j] += dz;
            q[j] += (double)dz * cen;
        }
    }
}

/* out = act((x - mean) * alpha + beta). Centring first, rather than PyTorch's folded shift
 * x * alpha + (beta - mean * alpha), avoids cancellation when |mean| dwarfs the spread. */
static void fapply_scalar(float *out, const float *x, const float *mean, const float *alpha,
                          const float *beta, tern_act act, size_t rows, size_t ld, size_t nc)
{
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * ld;
        float *o = out + r * ld;
        for (size_t j = 0; j < nc; j++)
            o[j] = act_value((xr[j] - mean[j]) * alpha[j] + beta[j], act);
    }
}

/* Per-channel coefficients of the backward's second pass. */
typedef struct {
    const float *mean, *alpha, *beta; /* z = (y - mean) * alpha + beta */
    const float *dz_mean, *k, *scale; /* dy += (dz - dz_mean - (y - mean) * k) * scale */
    bool add;                         /* dy += ... (TERN_GRAD_ADD), else dy = ... */
} bn_coef;

static void bapply_scalar(float *dy, const float *da, const float *y, const bn_coef *p,
                          tern_act act, size_t rows, size_t ld, size_t nc)
{
    for (size_t r = 0; r < rows; r++) {
        const float *yr = y + r * ld, *dar = da + r * ld;
        float *o = dy + r * ld;
        for (size_t j = 0; j < nc; j++) {
            float cen = yr[j] - p->mean[j];
            float dz = act_grad(dar[j], cen * p->alpha[j] + p->beta[j], act);
            float t = (dz - p->dz_mean[j] - cen * p->k[j]) * p->scale[j];
            o[j] = p->add ? o[j] + t : t;
        }
    }
}

#if TERN_X86
/* Accumulators in registers for up to nv = 4 vectors of 16 channels; with rows == 1 it is
 * the load-add-store loop used for wide rows. */
T512 ALWAYS_INLINE void fstats16(double *s, double *q, const float *x, const float *k,
                                 size_t rows, size_t ld, size_t nc, int nv)
{
    __m512d sl[4], sh[4], ql[4], qh[4], kl[4], kh[4];
    __mmask16 mk[4];
    for (int v = 0; v < nv; v++) {
        mk[v] = tail16(nc - 16 * (size_t)v);
        __m512 kv = _mm512_maskz_loadu_ps(mk[v], k + 16 * v);
        __mmask8 ml = (__mmask8)mk[v], mh = (__mmask8)(mk[v] >> 8);
        kl[v] = lo8(kv), kh[v] = hi8(kv);
        sl[v] = _mm512_maskz_loadu_pd(ml, s + 16 * v);
        sh[v] = _mm512_maskz_loadu_pd(mh, s + 16 * v + 8);
        ql[v] = _mm512_maskz_loadu_pd(ml, q + 16 * v);
        qh[v] = _mm512_maskz_loadu_pd(mh, q + 16 * v + 8);
    }
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * ld;
        for (int v = 0; v < nv; v++) {
            __m512 xv = _mm512_maskz_loadu_ps(mk[v], xr + 16 * v);
            __m512d dl = _mm512_sub_pd(lo8(xv), kl[v]), dh = _mm512_sub_pd(hi8(xv), kh[v]);
            sl[v] = _mm512_add_pd(sl[v], dl);
            sh[v] = _mm512_add_pd(sh[v], dh);
            ql[v] = _mm512_add_pd(ql[v], _mm512_mul_pd(dl, dl));
            qh[v] = _mm512_add_pd(qh[v], _mm512_mul_pd(dh, dh));
        }
    }
    for (int v = 0; v < nv; v++) {
        __mmask8 ml = (__mmask8)mk[v], mh = (__mmask8)(mk[v] >> 8);
        _mm512_mask_storeu_pd(s + 16 * v, ml, sl[v]);
        _mm512_mask_storeu_pd(s + 16 * v + 8, mh, sh[v]);
        _mm512_mask_storeu_pd(q + 16 * v, ml, ql[v]);
        _mm512_mask_storeu_pd(q + 16 * v + 8, mh, qh[v]);
    }
}

T512 static void fstats_avx512(double *s, double *q, const float *x, const float *k,
                               size_t rows, size_t ld, size_t nc)
{
    switch ((nc + 15) / 16) {
    case 1: fstats16(s, q, x, k, rows, ld, nc, 1); return;
    case 2: fstats16(s, q, x, k, rows, ld, nc, 2); return;
    case 3: fstats16(s, q, x, k, rows, ld, nc, 3); return;
    case 4: fstats16(s, q, x, k, rows, ld, nc, 4); return;
    }
    for (size_t r = 0; r < rows; r++) {
        size_t j = 0;
        for (; j + 64 <= nc; j += 64)
            fstats16(s + j, q + j, x + r * ld + j, k + j, 1, ld, 64, 4);
        if (j < nc)
            fstats_avx512(s + j, q + j, x + r * ld + j, k + j, 1, ld, nc - j);
    }
}

T512 ALWAYS_INLINE void bstats16(double *s, double *q, const float *da, const float *y,
                                 const float *mean, const float *alpha, const float *beta,
                                 tern_act act, size_t rows, size_t ld, size_t nc, int nv)
{
    __m512d sl[4], sh[4], ql[4], qh[4];
    __m512 mv[4], av[4], bv[4];
    __mmask16 mk[4];
    for (int v = 0; v < nv; v++) {
        mk[v] = tail16(nc - 16 * (size_t)v);
        __mmask8 ml = (__mmask8)mk[v], mh = (__mmask8)(mk[v] >> 8);
        mv[v] = _mm512_maskz_loadu_ps(mk[v], mean + 16 * v);
        av[v] = _mm512_maskz_loadu_ps(mk[v], alpha + 16 * v);
        bv[v] = _mm512_maskz_loadu_ps(mk[v], beta + 16 * v);
        sl[v] = _mm512_maskz_loadu_pd(ml, s + 16 * v);
        sh[v] = _mm512_maskz_loadu_pd(mh, s + 16 * v + 8);
        ql[v] = _mm512_maskz_loadu_pd(ml, q + 16 * v);
        qh[v] = _mm512_maskz_loadu_pd(mh, q + 16 * v + 8);
    }
    for (size_t r = 0; r < rows; r++) {
        for (int v = 0; v < nv; v++) {
            __m512 yv = _mm512_maskz_loadu_ps(mk[v], y + r * ld + 16 * v);
            __m512 dav = _mm512_maskz_loadu_ps(mk[v], da + r * ld + 16 * v);
            __m512 cen = _mm512_sub_ps(yv, mv[v]);
            __m512 dz = grad16(dav, _mm512_add_ps(_mm512_mul_ps(cen, av[v]), bv[v]), act);
            __m512d dzl = lo8(dz), dzh = hi8(dz);
            sl[v] = _mm512_add_pd(sl[v], dzl);
            sh[v] = _mm512_add_pd(sh[v], dzh);
            ql[v] = _mm512_add_pd(ql[v], _mm512_mul_pd(dzl, lo8(cen)));
            qh[v] = _mm512_add_pd(qh[v], _mm512_mul_pd(dzh, hi8(cen)));
        }
    }
    for (int v = 0; v < nv; v++) {
        __mmask8 ml = (__mmask8)mk[v], mh = (__mmask8)(mk[v] >> 8);
        _mm512_mask_storeu_pd(s + 16 * v, ml, sl[v]);
        _mm512_mask_storeu_pd(s + 16 * v + 8, mh, sh[v]);
        _mm512_mask_storeu_pd(q + 16 * v, ml, ql[v]);
        _mm512_mask_storeu_pd(q + 16 * v + 8, mh, qh[v]);
    }
}

/* Registers for up to 32 channels (the activation's constants need room), else row by row. */
#define BSTATS_CASES(ACT)                                                                    \
    switch ((nc + 15) / 16) {                                                                 \
    case 1: bstats16(s, q, da, y, mean, alpha, beta, ACT, rows, ld, nc, 1); return;           \
    case 2: bstats16(s, q, da, y, mean, alpha, beta, ACT, rows, ld, nc, 2); return;           \
    }                                                                                         \
    for (size_t r = 0; r < rows; r++) {                                                       \
        size_t j = 0, o = r * ld;                                                             \
        for (; j + 32 <= nc; j += 32)                                                         \
            bstats16(s + j, q + j, da + o + j, y + o + j, mean + j, alpha + j, beta + j, ACT, \
                     1, ld, 32, 2);                                                           \
        if (j < nc)                                                                           \
            bstats16(s + j, q + j, da + o + j, y + o + j, mean + j, alpha + j, beta + j, ACT, \
                     1, ld, nc - j, (int)(nc - j + 15) / 16);                                 \
    }

T512 static void bstats_avx512(double *s, double *q, const float *da, const float *y,
                               const float *mean, const float *alpha, const float *beta,
                               tern_act act, size_t rows, size_t ld, size_t nc)
{
    switch (act) {
    case TERN_ACT_NONE: BSTATS_CASES(TERN_ACT_NONE) break;
    case TERN_ACT_RELU: BSTATS_CASES(TERN_ACT_RELU) break;
    case TERN_ACT_HARDSWISH: BSTATS_CASES(TERN_ACT_HARDSWISH) break;
    case TERN_ACT_HARDSIGMOID: BSTATS_CASES(TERN_ACT_HARDSIGMOID) break;
    }
}

T512 ALWAYS_INLINE void fapply16(float *out, const float *x, const float *mean,
                                 const float *alpha, const float *beta, tern_act act,
                                 size_t rows, size_t ld, size_t nc)
{
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * ld;
        float *o = out + r * ld;
        for (size_t j = 0; j < nc; j += 16) {
            __mmask16 mk = tail16(nc - j);
            __m512 xv = _mm512_maskz_loadu_ps(mk, xr + j);
            __m512 z = _mm512_mul_ps(_mm512_sub_ps(xv, _mm512_maskz_loadu_ps(mk, mean + j)),
                                     _mm512_maskz_loadu_ps(mk, alpha + j));
            z = _mm512_add_ps(z, _mm512_maskz_loadu_ps(mk, beta + j));
            _mm512_mask_storeu_ps(o + j, mk, act16(z, act));
        }
    }
}

T512 static void fapply_avx512(float *out, const float *x, const float *mean,
                               const float *alpha, const float *beta, tern_act act, size_t rows,
                               size_t ld, size_t nc)
{
    switch (act) {
    case TERN_ACT_NONE: fapply16(out, x, mean, alpha, beta, TERN_ACT_NONE, rows, ld, nc); break;
    case TERN_ACT_RELU: fapply16(out, x, mean, alpha, beta, TERN_ACT_RELU, rows, ld, nc); break;
    case TERN_ACT_HARDSWISH:
        fapply16(out, x, mean, alpha, beta, TERN_ACT_HARDSWISH, rows, ld, nc);
        break;
    case TERN_ACT_HARDSIGMOID:
        fapply16(out, x, mean, alpha, beta, TERN_ACT_HARDSIGMOID, rows, ld, nc);
        break;
    }
}

T512 ALWAYS_INLINE void bapply16(float *dy, const float *da, const float *y, const bn_coef *p,
                                 tern_act act, size_t rows, size_t ld, size_t nc)
{
    for (size_t r = 0; r < rows; r++) {
        const float *yr = y + r * ld, *dar = da + r * ld;
        float *o = dy + r * ld;
        for (size_t j = 0; j < nc; j += 16) {
            __mmask16 mk = tail16(nc - j);
            __m512 cen = _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, yr + j),
                                       _mm512_maskz_loadu_ps(mk, p->mean + j));
            __m512 z = _mm512_add_ps(_mm512_mul_ps(cen, _mm512_maskz_loadu_ps(mk, p->alpha + j)),
                                     _mm512_maskz_loadu_ps(mk, p->beta + j));
            __m512 dz = grad16(_mm512_maskz_loadu_ps(mk, dar + j), z, act);
            __m512 t = _mm512_sub_ps(dz, _mm512_maskz_loadu_ps(mk, p->dz_mean + j));
            t = _mm512_sub_ps(t, _mm512_mul_ps(cen, _mm512_maskz_loadu_ps(mk, p->k + j)));
            t = _mm512_mul_ps(t, _mm512_maskz_loadu_ps(mk, p->scale + j));
            if (p->add)
                t = _mm512_add_ps(_mm512_maskz_loadu_ps(mk, o + j), t);
            _mm512_mask_storeu_ps(o + j, mk, t);
        }
    }
}

T512 static void bapply_avx512(float *dy, const float *da, const float *y, const bn_coef *p,
                               tern_act act, size_t rows, size_t ld, size_t nc)
{
    switch (act) {
    case TERN_ACT_NONE: bapply16(dy, da, y, p, TERN_ACT_NONE, rows, ld, nc); break;
    case TERN_ACT_RELU: bapply16(dy, da, y, p, TERN_ACT_RELU, rows, ld, nc); break;
    case TERN_ACT_HARDSWISH: bapply16(dy, da, y, p, TERN_ACT_HARDSWISH, rows, ld, nc); break;
    case TERN_ACT_HARDSIGMOID: bapply16(dy, da, y, p, TERN_ACT_HARDSIGMOID, rows, ld, nc); break;
    }
}

/* AVX2: 8 channels a vector, accumulators in memory (L1), the last nc % 8 channels of each
 * row through the scalar cores. */
T256 static void fstats_avx2(double *s, double *q, const float *x, const float *k, size_t rows,
                             size_t ld, size_t nc)
{
    size_t nv = nc / 8 * 8;
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * ld;
        for (size_t j = 0; j < nv; j += 8) {
            __m256 xv = _mm256_loadu_ps(xr + j), kv = _mm256_loadu_ps(k + j);
            __m256d dl = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(xv)),
                                       _mm256_cvtps_pd(_mm256_castps256_ps128(kv)));
            __m256d dh = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1)),
                                       _mm256_cvtps_pd(_mm256_extractf128_ps(kv, 1)));
            _mm256_storeu_pd(s + j, _mm256_add_pd(_mm256_loadu_pd(s + j), dl));
            _mm256_storeu_pd(s + j + 4, _mm256_add_pd(_mm256_loadu_pd(s + j + 4), dh));
            _mm256_storeu_pd(q + j, _mm256_add_pd(_mm256_loadu_pd(q + j), _mm256_mul_pd(dl, dl)));
            _mm256_storeu_pd(q + j + 4,
                             _mm256_add_pd(_mm256_loadu_pd(q + j + 4), _mm256_mul_pd(dh, dh)));
        }
        if (nv < nc)
            fstats_scalar(s + nv, q + nv, xr + nv, k + nv, 1, ld, nc - nv);
    }
}

T256 ALWAYS_INLINE void bstats8(double *s, double *q, const float *da, const float *y,
                                const float *mean, const float *alpha, const float *beta,
                                tern_act act, size_t rows, size_t ld, size_t nc)
{
    size_t nv = nc / 8 * 8;
    for (size_t r = 0; r < rows; r++) {
        const float *yr = y + r * ld, *dar = da + r * ld;
        for (size_t j = 0; j < nv; j += 8) {
            __m256 cen = _mm256_sub_ps(_mm256_loadu_ps(yr + j), _mm256_loadu_ps(mean + j));
            __m256 z = _mm256_add_ps(_mm256_mul_ps(cen, _mm256_loadu_ps(alpha + j)),
                                     _mm256_loadu_ps(beta + j));
            __m256 dz = grad8(_mm256_loadu_ps(dar + j), z, act);
            __m256d dzl = _mm256_cvtps_pd(_mm256_castps256_ps128(dz));
            __m256d dzh = _mm256_cvtps_pd(_mm256_extractf128_ps(dz, 1));
            __m256d cl = _mm256_cvtps_pd(_mm256_castps256_ps128(cen));
            __m256d ch = _mm256_cvtps_pd(_mm256_extractf128_ps(cen, 1));
            _mm256_storeu_pd(s + j, _mm256_add_pd(_mm256_loadu_pd(s + j), dzl));
            _mm256_storeu_pd(s + j + 4, _mm256_add_pd(_mm256_loadu_pd(s + j + 4), dzh));
            _mm256_storeu_pd(q + j, _mm256_add_pd(_mm256_loadu_pd(q + j), _mm256_mul_pd(dzl, cl)));
            _mm256_storeu_pd(q + j + 4,
                             _mm256_add_pd(_mm256_loadu_pd(q + j + 4), _mm256_mul_pd(dzh, ch)));
        }
        if (nv < nc)
            bstats_scalar(s + nv, q + nv, dar + nv, yr + nv, mean + nv, alpha + nv, beta + nv,
                          act, 1, ld, nc - nv);
    }
}

T256 static void bstats_avx2(double *s, double *q, const float *da, const float *y,
                             const float *mean, const float *alpha, const float *beta,
                             tern_act act, size_t rows, size_t ld, size_t nc)
{
    switch (act) {
    case TERN_ACT_NONE:
        bstats8(s, q, da, y, mean, alpha, beta, TERN_ACT_NONE, rows, ld, nc);
        break;
    case TERN_ACT_RELU:
        bstats8(s, q, da, y, mean, alpha, beta, TERN_ACT_RELU, rows, ld, nc);
        break;
    case TERN_ACT_HARDSWISH:
        bstats8(s, q, da, y, mean, alpha, beta, TERN_ACT_HARDSWISH, rows, ld, nc);
        break;
    case TERN_ACT_HARDSIGMOID:
        bstats8(s, q, da, y, mean, alpha, beta, TERN_ACT_HARDSIGMOID, rows, ld, nc);
        break;
    }
}

T256 ALWAYS_INLINE void fapply8(float *out, const float *x, const float *mean,
                                const float *alpha, const float *beta, tern_act act,
                                size_t rows, size_t ld, size_t nc)
{
    size_t nv = nc / 8 * 8;
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * ld;
        float *o = out + r * ld;
        for (size_t j = 0; j < nv; j += 8) {
            __m256 z = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + j),
                                                   _mm256_loadu_ps(mean + j)),
                                     _mm256_loadu_ps(alpha + j));
            z = _mm256_add_ps(z, _mm256_loadu_ps(beta + j));
            _mm256_storeu_ps(o + j, act8(z, act));
        }
        for (size_t j = nv; j < nc; j++)
            o[j] = act_value((xr[j] - mean[j]) * alpha[j] + beta[j], act);
    }
}

T256 static void fapply_avx2(float *out, const float *x, const float *mean, const float *alpha,
                             const float *beta, tern_act act, size_t rows, size_t ld, size_t nc)
{
    switch (act) {
    case TERN_ACT_NONE: fapply8(out, x, mean, alpha, beta, TERN_ACT_NONE, rows, ld, nc); break;
    case TERN_ACT_RELU: fapply8(out, x, mean, alpha, beta, TERN_ACT_RELU, rows, ld, nc); break;
    case TERN_ACT_HARDSWISH:
        fapply8(out, x, mean, alpha, beta, TERN_ACT_HARDSWISH, rows, ld, nc);
        break;
    case TERN_ACT_HARDSIGMOID:
        fapply8(out, x, mean, alpha, beta, TERN_ACT_HARDSIGMOID, rows, ld, nc);
        break;
    }
}

T256 ALWAYS_INLINE void bapply8(float *dy, const float *da, const float *y, const bn_coef *p,
                                tern_act act, size_t rows, size_t ld, size_t nc)
{
    size_t nv = nc / 8 * 8;
    for (size_t r = 0; r < rows; r++) {
        const float *yr = y + r * ld, *dar = da + r * ld;
        float *o = dy + r * ld;
        for (size_t j = 0; j < nv; j += 8) {
            __m256 cen = _mm256_sub_ps(_mm256_loadu_ps(yr + j), _mm256_loadu_ps(p->mean + j));
            __m256 z = _mm256_add_ps(_mm256_mul_ps(cen, _mm256_loadu_ps(p->alpha + j)),
                                     _mm256_loadu_ps(p->beta + j));
            __m256 dz = grad8(_mm256_loadu_ps(dar + j), z, act);
            __m256 t = _mm256_sub_ps(dz, _mm256_loadu_ps(p->dz_mean + j));
            t = _mm256_sub_ps(t, _mm256_mul_ps(cen, _mm256_loadu_ps(p->k + j)));
            t = _mm256_mul_ps(t, _mm256_loadu_ps(p->scale + j));
            if (p->add)
                t = _mm256_add_ps(_mm256_loadu_ps(o + j), t);
            _mm256_storeu_ps(o + j, t);
        }
        if (nv < nc) {
            bn_coef t = {p->mean + nv, p->alpha + nv, p->beta + nv, p->dz_mean + nv, p->k + nv,
                         p->scale + nv, p->add};
            bapply_scalar(o + nv, dar + nv, yr + nv, &t, act, 1, ld, nc - nv);
        }
    }
}

T256 static void bapply_avx2(float *dy, const float *da, const float *y, const bn_coef *p,
                             tern_act act, size_t rows, size_t ld, size_t nc)
{
    switch (act) {
    case TERN_ACT_NONE: bapply8(dy, da, y, p, TERN_ACT_NONE, rows, ld, nc); break;
    case TERN_ACT_RELU: bapply8(dy, da, y, p, TERN_ACT_RELU, rows, ld, nc); break;
    case TERN_ACT_HARDSWISH: bapply8(dy, da, y, p, TERN_ACT_HARDSWISH, rows, ld, nc); break;
    case TERN_ACT_HARDSIGMOID: bapply8(dy, da, y, p, TERN_ACT_HARDSIGMOID, rows, ld, nc); break;
    }
}
#endif /* TERN_X86 */

/* ISA dispatch of the four cores. */
static void fstats(tern_isa isa, double *s, double *q, const float *x, const float *k,
                   size_t rows, size_t ld, size_t nc)
{
#if TERN_X86
    if (isa == TERN_ISA_AVX512)
        return fstats_avx512(s, q, x, k, rows, ld, nc);
    if (isa == TERN_ISA_AVX2)
        return fstats_avx2(s, q, x, k, rows, ld, nc);
#endif
    fstats_scalar(s, q, x, k, rows, ld, nc);
}

static void bstats(tern_isa isa, double *s, double *q, const float *da, const float *y,
                   const float *mean, const float *alpha, const float *beta, tern_act act,
                   size_t rows, size_t ld, size_t nc)
{
#if TERN_X86
    if (isa == TERN_ISA_AVX512)
        return bstats_avx512(s, q, da, y, mean, alpha, beta, act, rows, ld, nc);
    if (isa == TERN_ISA_AVX2)
        return bstats_avx2(s, q, da, y, mean, alpha, beta, act, rows, ld, nc);
#endif
    bstats_scalar(s, q, da, y, mean, alpha, beta, act, rows, ld, nc);
}

static void fapply(tern_isa isa, float *out, const float *x, const float *mean,
                   const float *alpha, const float *beta, tern_act act, size_t rows, size_t ld,
                   size_t nc)
{
#if TERN_X86
    if (isa == TERN_ISA_AVX512)
        return fapply_avx512(out, x, mean, alpha, beta, act, rows, ld, nc);
    if (isa == TERN_ISA_AVX2)
        return fapply_avx2(out, x, mean, alpha, beta, act, rows, ld, nc);
#endif
    fapply_scalar(out, x, mean, alpha, beta, act, rows, ld, nc);
}

static void bapply(tern_isa isa, float *dy, const float *da, const float *y, const bn_coef *p,
                   tern_act act, size_t rows, size_t ld, size_t nc)
{
#if TERN_X86
    if (isa == TERN_ISA_AVX512)
        return bapply_avx512(dy, da, y, p, act, rows, ld, nc);
    if (isa == TERN_ISA_AVX2)
        return bapply_avx2(dy, da, y, p, act, rows, ld, nc);
#endif
    bapply_scalar(dy, da, y, p, act, rows, ld, nc);
}

/* ---- batch normalization (+ activation) ------------------------------------------------ */

typedef struct {
    float *out, *save_mean, *save_invstd, *run_mean, *run_var; /* (m, c), (c) x4 */
    float *dx, *dgamma, *dbeta;                                 /* (m, c), (c) x2 */
    const float *x, *dout, *gamma, *beta, *mean, *invstd, *var; /* (m, c) x2, (c) x5 */
    size_t m;
    int c;
    float eps, momentum;
    tern_act act;
    bool dx_add;     /* backward: dx += (else dx =) */
    tern_isa isa;
    tern_pool *pool; /* for the per-thread scratch of the statistics */
} bn_args;

/* Statistics of channel ch from its sums shifted by k (the channel's first value, or 0 for
 * sums taken by the producer of x); writes the saved and running statistics and returns the
 * scale alpha = gamma * invstd. */
static float bn_finish_stats_k(const bn_args *a, size_t ch, double s, double q, double k)
{
    double m = (double)a->m, mom = a->momentum;
    double qc = q - s * (s / m); /* sum of squared deviations */
    qc = qc > 0 ? qc : 0;
    double mean = k + s / m, var = qc / m;
    double unbiased = a->m > 1 ? qc / (m - 1) : var;
    float invstd = (float)(1.0 / sqrt(var + (double)a->eps));
    a->save_mean[ch] = (float)mean;
    a->save_invstd[ch] = invstd;
    a->run_mean[ch] = (float)(mom * mean + (1 - mom) * a->run_mean[ch]);
    a->run_var[ch] = (float)(mom * unbiased + (1 - mom) * a->run_var[ch]);
    return a->gamma[ch] * invstd;
}

static float bn_finish_stats(const bn_args *a, size_t ch, double s, double q)
{
    return bn_finish_stats_k(a, ch, s, q, (double)a->x[ch]);
}

/* One thread, everything: per block of channels, statistics over all rows, then the
 * normalize+activate pass. */
static void bn_train_serial(const bn_args *a)
{
    size_t m = a->m, c = (size_t)a->c;
    for (size_t c0 = 0; c0 < c; c0 += BN_BLOCK) {
        size_t nc = min_size(BN_BLOCK, c - c0);
        double s[BN_BLOCK] = {0}, q[BN_BLOCK] = {0};
        float alpha[BN_BLOCK];
        fstats(a->isa, s, q, a->x + c0, a->x + c0, m, c, nc);
        for (size_t j = 0; j < nc; j++)
            alpha[j] = bn_finish_stats(a, c0 + j, s[j], q[j]);
        fapply(a->isa, a->out + c0, a->x + c0, a->save_mean + c0, alpha, a->beta + c0, a->act,
               m, c, nc);
    }
}

/* Pass 1 on many threads: thread ith sums its rows into its scratch, (s (c), q (c)). */
static void bn_fstats_task(void *arg, int ith, int nth)
{
    const bn_args *a = arg;
    size_t c = (size_t)a->c, rb, re;
    double *s = (double *)(void *)tern_pool_scratch(a->pool, ith), *q = s + c;
    memset(s, 0, 2 * c * sizeof *s);
    tern_split(a->m, ith, nth, &rb, &re);
    fstats(a->isa, s, q, a->x + rb * c, a->x, re - rb, c, c);
}

/* Normalize (+ activate) rows split across threads; mean from a->mean, alpha = gamma * invstd
 * (training) or gamma / sqrt(var + eps) (eval). */
static void bn_apply_task(void *arg, int ith, int nth)
{
    const bn_args *a = arg;
    size_t c = (size_t)a->c, rb, re;
    tern_split(a->m, ith, nth, &rb, &re);
    for (size_t c0 = 0; c0 < c; c0 += BN_BLOCK) {
        size_t nc = min_size(BN_BLOCK, c - c0);
        float alpha[BN_BLOCK];
        for (size_t j = 0; j < nc; j++)
            alpha[j] = a->var ? a->gamma[c0 + j] / sqrtf(a->var[c0 + j] + a->eps)
                              : a->gamma[c0 + j] * a->invstd[c0 + j];
        fapply(a->isa, a->out + rb * c + c0, a->x + rb * c + c0, a->mean + c0, alpha,
               a->beta + c0, a->act, re - rb, c, nc);
    }
}

/* The pool to run on: NULL (one thread) when the work is small or c too wide for scratch. */
static tern_pool *bn_pool(tern_pool *pool, size_t m, size_t c)
{
    return m * c < INLINE_MAX || c > BN_SCRATCH_C || tern_pool_size(pool) < 2 ? NULL : pool;
}

static void bn_train(bn_args *a, tern_pool *pool)
{
    size_t c = (size_t)a->c;
    if (a->m == 0 || c == 0)
        return;
    a->isa = tern_pool_isa(pool);
    a->pool = bn_pool(pool, a->m, c);
    if (!a->pool) {
        bn_train_serial(a);
        return;
    }
    tern_pool_run(a->pool, bn_fstats_task, a);
    int nth = tern_pool_size(a->pool);
    for (size_t j = 0; j < c; j++) {
        double s = 0, q = 0;
        for (int t = 0; t < nth; t++) {
            const double *p = (const double *)(void *)tern_pool_scratch(a->pool, t);
            s += p[j];
            q += p[c + j];
        }
        bn_finish_stats(a, j, s, q);
    }
    a->mean = a->save_mean;
    a->invstd = a->save_invstd;
    tern_pool_run(a->pool, bn_apply_task, a);
}

void tern_batchnorm_forward_train(float *y, float *save_mean, float *save_invstd,
                                  float *run_mean, float *run_var, const float *x,
                                  const float *gamma, const float *beta, size_t m, int c,
                                  float eps, float momentum, tern_pool *pool)
{
    tern_batchnorm_act_forward_train(y, save_mean, save_invstd, run_mean, run_var, x, gamma,
                                     beta, m, c, eps, momentum, TERN_ACT_NONE, pool);
}

void tern_batchnorm_act_forward_train(float *a, float *save_mean, float *save_invstd,
                                      float *run_mean, float *run_var, const float *y,
                                      const float *gamma, const float *beta, size_t m, int c,
                                      float eps, float momentum, tern_act act, tern_pool *pool)
{
    bn_args args = {.out = a, .save_mean = save_mean, .save_invstd = save_invstd,
                    .run_mean = run_mean, .run_var = run_var, .x = y, .gamma = gamma,
                    .beta = beta, .m = m, .c = c, .eps = eps, .momentum = momentum, .act = act};
    bn_train(&args, pool);
}

void tern_batchnorm_act_forward_train_stats(float *a, float *save_mean, float *save_invstd,
                                            float *run_mean, float *run_var, const float *y,
                                            const double *stats, int nparts,
                                            const float *gamma, const float *beta, size_t m,
                                            int c, float eps, float momentum, tern_act act,
                                            tern_pool *pool)
{
    bn_args args = {.out = a, .save_mean = save_mean, .save_invstd = save_invstd,
                    .run_mean = run_mean, .run_var = run_var, .x = y, .gamma = gamma,
                    .beta = beta, .m = m, .c = c, .eps = eps, .momentum = momentum, .act = act,
                    .isa = tern_pool_isa(pool)};
    if (m == 0 || c <= 0)
        return;
    const size_t cc = (size_t)c;
    for (size_t j = 0; j < cc; j++) {
        double s = 0, q = 0;
        for (int t = 0; t < nparts; t++) {
            s += stats[(size_t)t * 2 * cc + j];
            q += stats[(size_t)t * 2 * cc + cc + j];
        }
        bn_finish_stats_k(&args, j, s, q, 0.0);
    }
    args.mean = save_mean;
    args.invstd = save_invstd;
    run(pool, m * cc, bn_apply_task, &args);
}

void tern_batchnorm_forward_eval(float *y, const float *x, const float *gamma,
                                 const float *beta, const float *run_mean, const float *run_var,
                                 size_t m, int c, float eps, tern_pool *pool)
{
    bn_args a = {.out = y, .x = x, .gamma = gamma, .beta = beta, .mean = run_mean,
                 .var = run_var, .m = m, .c = c, .eps = eps, .act = TERN_ACT_NONE,
                 .isa = tern_pool_isa(pool)};
    run(pool, m * (size_t)c, bn_apply_task, &a);
}

/* Second-pass coefficients of channel ch from s = sum dz and q = sum dz * (y - mean); adds
 * the parameter gradients. dy = (dz - mean(dz) - xhat * mean(dz * xhat)) * invstd * gamma,
 * written with the centred input as PyTorch does: k scales (y - mean) to xhat's projection. */
static void bn_finish_backward(const bn_args *a, size_t ch, double s, double q, float *dz_mean,
                               float *k)
{
    double is = a->invstd[ch];
    if (a->dgamma)
        a->dgamma[ch] += (float)(q * is);
    if (a->dbeta)
        a->dbeta[ch] += (float)s;
    *k = (float)(q * is * is / (double)a->m);
    *dz_mean = (float)(s / (double)a->m);
}

static void bn_backward_serial(const bn_args *a)
{
    size_t m = a->m, c = (size_t)a->c;
    for (size_t c0 = 0; c0 < c; c0 += BN_BLOCK) {
        size_t nc = min_size(BN_BLOCK, c - c0);
        double s[BN_BLOCK] = {0}, q[BN_BLOCK] = {0};
        float alpha[BN_BLOCK], dz_mean[BN_BLOCK], k[BN_BLOCK];
        for (size_t j = 0; j < nc; j++)
            alpha[j] = a->gamma[c0 + j] * a->invstd[c0 + j];
        const float *beta = a->beta ? a->beta + c0 : alpha; /* unused without activation */
        bstats(a->isa, s, q, a->dout + c0, a->x + c0, a->mean + c0, alpha, beta, a->act, m, c,
               nc);
        for (size_t j = 0; j < nc; j++)
            bn_finish_backward(a, c0 + j, s[j], q[j], &dz_mean[j], &k[j]);
        if (!a->dx)
            continue;
        /* scale = invstd * gamma = alpha */
        bn_coef p = {a->mean + c0, alpha, beta, dz_mean, k, alpha, a->dx_add};
        bapply(a->isa, a->dx + c0, a->dout + c0, a->x + c0, &p, a->act, m, c, nc);
    }
}

/* Thread 0's scratch after the partials: alpha, dz_mean, k (c each) for the second pass. */
static float *bn_coef_area(const bn_args *a)
{
    return tern_pool_scratch(a->pool, 0) + 4 * (size_t)a->c;
}

static void bn_bstats_task(void *arg, int ith, int nth)
{
    const bn_args *a = arg;
    size_t c = (size_t)a->c, rb, re;
    double *s = (double *)(void *)tern_pool_scratch(a->pool, ith), *q = s + c;
    const float *alpha = bn_coef_area(a);
    memset(s, 0, 2 * c * sizeof *s);
    tern_split(a->m, ith, nth, &rb, &re);
    bstats(a->isa, s, q, a->dout + rb * c, a->x + rb * c, a->mean, alpha,
           a->beta ? a->beta : alpha, a->act, re - rb, c, c);
}

static void bn_bapply_task(void *arg, int ith, int nth)
{
    const bn_args *a = arg;
    size_t c = (size_t)a->c, rb, re;
    const float *alpha = bn_coef_area(a);
    bn_coef p = {a->mean, alpha, a->beta ? a->beta : alpha, alpha + c, alpha + 2 * c, alpha,
                 a->dx_add};
    tern_split(a->m, ith, nth, &rb, &re);
    bapply(a->isa, a->dx + rb * c, a->dout + rb * c, a->x + rb * c, &p, a->act, re - rb, c, c);
}

static void bn_backward(bn_args *a, tern_pool *pool)
{
    size_t c = (size_t)a->c;
    if ((!a->dx && !a->dgamma && !a->dbeta) || a->m == 0 || c == 0)
        return;
    a->isa = tern_pool_isa(pool);
    a->pool = bn_pool(pool, a->m, c);
    if (!a->pool) {
        bn_backward_serial(a);
        return;
    }
    float *alpha = bn_coef_area(a);
    for (size_t j = 0; j < c; j++)
        alpha[j] = a->gamma[j] * a->invstd[j];
    tern_pool_run(a->pool, bn_bstats_task, a);
    int nth = tern_pool_size(a->pool);
    for (size_t j = 0; j < c; j++) {
        double s = 0, q = 0;
        for (int t = 0; t < nth; t++) {
            const double *p = (const double *)(void *)tern_pool_scratch(a->pool, t);
            s += p[j];
            q += p[c + j];
        }
        bn_finish_backward(a, j, s, q, &alpha[c + j], &alpha[2 * c + j]);
    }
    if (a->dx)
        tern_pool_run(a->pool, bn_bapply_task, a);
}

void tern_batchnorm_backward(float *dx, float *dgamma, float *dbeta, const float *dy,
                             const float *x, const float *save_mean, const float *save_invstd,
                             const float *gamma, size_t m, int c, tern_pool *pool)
{
    bn_args a = {.dx = dx, .dgamma = dgamma, .dbeta = dbeta, .dout = dy, .x = x,
                 .mean = save_mean, .invstd = save_invstd, .gamma = gamma, .m = m, .c = c,
                 .act = TERN_ACT_NONE, .dx_add = true};
    bn_backward(&a, pool);
}

void tern_batchnorm_act_backward(float *dy, float *dgamma, float *dbeta, const float *da,
                                 const float *y, const float *save_mean, const float *save_invstd,
                                 const float *gamma, const float *beta, size_t m, int c,
                                 tern_act act, tern_pool *pool)
{
    tern_batchnorm_act_backward_mode(dy, dgamma, dbeta, da, y, save_mean, save_invstd, gamma,
                                     beta, m, c, act, TERN_GRAD_ADD, pool);
}

void tern_batchnorm_act_backward_mode(float *dy, float *dgamma, float *dbeta, const float *da,
                                      const float *y, const float *save_mean,
                                      const float *save_invstd, const float *gamma,
                                      const float *beta, size_t m, int c, tern_act act,
                                      tern_grad_mode dy_mode, tern_pool *pool)
{
    bn_args a = {.dx = dy, .dgamma = dgamma, .dbeta = dbeta, .dout = da, .x = y,
                 .mean = save_mean, .invstd = save_invstd, .gamma = gamma, .beta = beta,
                 .m = m, .c = c, .act = act, .dx_add = dy_mode == TERN_GRAD_ADD};
    bn_backward(&a, pool);
}

/* ---- group normalization -------------------------------------------------------------- */

typedef struct {
    float *y, *save_mean, *save_invstd;          /* (N, HW, C), (N, groups) x2 */
    float *dx, *dgamma, *dbeta;                  /* (N, HW, C), (C), (C) */
    const float *x, *dy, *gamma, *beta;          /* (N, HW, C) x2, (C) x2 */
    const float *mean, *invstd;                  /* (N, groups) x2 */
    int n, c, groups;
    size_t hw;
    float eps;
    tern_isa isa;
} gn_args;

/* One task per (sample, group): its statistics and its slice of y. */
static void gn_forward_task(void *arg, int ith, int nth)
{
    const gn_args *a = arg;
    size_t c = (size_t)a->c, hw = a->hw, cpg = c / (size_t)a->groups, tb, te;
    tern_split((size_t)a->n * (size_t)a->groups, ith, nth, &tb, &te);
    for (size_t t = tb; t < te; t++) {
        size_t s = t / (size_t)a->groups, c0 = (t % (size_t)a->groups) * cpg;
        const float *x = a->x + s * hw * c + c0;
        float *y = a->y + s * hw * c + c0;
        double count = (double)(hw * cpg), sum = 0, sq = 0;
        for (size_t r = 0; r < hw; r++)
            for (size_t j = 0; j < cpg; j++)
                sum += x[r * c + j];
        double mean = sum / count;
        for (size_t r = 0; r < hw; r++)
            for (size_t j = 0; j < cpg; j++) {
                double d = x[r * c + j] - mean;
                sq += d * d;
            }
        float invstd = (float)(1.0 / sqrt(sq / count + (double)a->eps));
        a->save_mean[t] = (float)mean;
        a->save_invstd[t] = invstd;
        for (size_t j0 = 0; j0 < cpg; j0 += CHUNK) {
            size_t nc = min_size(CHUNK, cpg - j0);
            float alpha[CHUNK], meanf[CHUNK];
            for (size_t j = 0; j < nc; j++) {
                alpha[j] = a->gamma[c0 + j0 + j] * invstd;
                meanf[j] = (float)mean;
            }
            fapply(a->isa, y + j0, x + j0, meanf, alpha, a->beta + c0 + j0, TERN_ACT_NONE, hw,
                   c, nc);
        }
    }
}

void tern_groupnorm_forward(float *y, float *save_mean, float *save_invstd, const float *x,
                            const float *gamma, const float *beta, int n, size_t hw, int c,
                            int groups, float eps, tern_pool *pool)
{
    gn_args a = {.y = y, .save_mean = save_mean, .save_invstd = save_invstd, .x = x,
                 .gamma = gamma, .beta = beta, .n = n, .c = c, .groups = groups, .hw = hw,
                 .eps = eps, .isa = tern_pool_isa(pool)};
    run(pool, (size_t)n * hw * (size_t)c, gn_forward_task, &a);
}

/* dx per (sample, group): with g = dy * gamma,
 * dx = invstd * (g - mean(g) - xhat * mean(g * xhat)) over the group's values. */
static void gn_backward_dx_task(void *arg, int ith, int nth)
{
    const gn_args *a = arg;
    size_t c = (size_t)a->c, hw = a->hw, cpg = c / (size_t)a->groups, tb, te;
    tern_split((size_t)a->n * (size_t)a->groups, ith, nth, &tb, &te);
    for (size_t t = tb; t < te; t++) {
        size_t s = t / (size_t)a->groups, c0 = (t % (size_t)a->groups) * cpg;
        const float *x = a->x + s * hw * c + c0, *dy = a->dy + s * hw * c + c0;
        const float *gamma = a->gamma + c0;
        float *dx = a->dx + s * hw * c + c0;
        float mean = a->mean[t], invstd = a->invstd[t];
        double count = (double)(hw * cpg), sum = 0, dotp = 0; /* sum g, sum g * (x - mean) */
        for (size_t r = 0; r < hw; r++)
            for (size_t j = 0; j < cpg; j++) {
                double g = (double)dy[r * c + j] * gamma[j];
                sum += g;
                dotp += g * (x[r * c + j] - mean);
            }
        float k = (float)(dotp * invstd * invstd / count), g_mean = (float)(sum / count);
        for (size_t r = 0; r < hw; r++)
            for (size_t j = 0; j < cpg; j++) {
                float g = dy[r * c + j] * gamma[j];
                dx[r * c + j] += (g - g_mean - (x[r * c + j] - mean) * k) * invstd;
            }
    }
}

/* dgamma, dbeta per channel, summed over samples and positions: split by channel so each
 * sum has one owner. */
static void gn_backward_param_task(void *arg, int ith, int nth)
{
    const gn_args *a = arg;
    size_t c = (size_t)a->c, hw = a->hw, cpg = c / (size_t)a->groups, cb, ce;
    tern_split(c, ith, nth, &cb, &ce);
    for (size_t c0 = cb; c0 < ce; c0 += CHUNK) {
        size_t nc = min_size(CHUNK, ce - c0);
        double dg[CHUNK] = {0}, db[CHUNK] = {0};
        for (size_t s = 0; s < (size_t)a->n; s++) {
            float mean[CHUNK], invstd[CHUNK];
            for (size_t j = 0; j < nc; j++) {
                size_t t = s * (size_t)a->groups + (c0 + j) / cpg;
                mean[j] = a->mean[t];
                invstd[j] = a->invstd[t];
            }
            for (size_t r = 0; r < hw; r++) {
                const float *xr = a->x + (s * hw + r) * c + c0;
                const float *dyr = a->dy + (s * hw + r) * c + c0;
                for (size_t j = 0; j < nc; j++) {
                    dg[j] += (double)dyr[j] * ((xr[j] - mean[j]) * invstd[j]);
                    db[j] += dyr[j];
                }
            }
        }
        for (size_t j = 0; j < nc; j++) {
            if (a->dgamma)
                a->dgamma[c0 + j] += (float)dg[j];
            if (a->dbeta)
                a->dbeta[c0 + j] += (float)db[j];
        }
    }
}

void tern_groupnorm_backward(float *dx, float *dgamma, float *dbeta, const float *dy,
                             const float *x, const float *save_mean, const float *save_invstd,
                             const float *gamma, int n, size_t hw, int c, int groups,
                             tern_pool *pool)
{
    gn_args a = {.dx = dx, .dgamma = dgamma, .dbeta = dbeta, .x = x, .dy = dy, .gamma = gamma,
                 .mean = save_mean, .invstd = save_invstd, .n = n, .c = c, .groups = groups,
                 .hw = hw};
    size_t work = (size_t)n * hw * (size_t)c;
    if (dx)
        run(pool, work, gn_backward_dx_task, &a);
    if (dgamma || dbeta)
        run(pool, work, gn_backward_param_task, &a);
}

/* ---- elementwise ---------------------------------------------------------------------- */

/* Binary elementwise operations on n floats, the same per ISA. */
typedef enum { EW_ADD, EW_MUL, EW_ADD_MUL } ew_op; /* o = a + b; o = a * b; o += a * b */

static void ew_scalar(ew_op op, float *o, const float *a, const float *b, size_t n)
{
    switch (op) {
    case EW_ADD:
        for (size_t i = 0; i < n; i++)
            o[i] = a[i] + b[i];
        break;
    case EW_MUL:
        for (size_t i = 0; i < n; i++)
            o[i] = a[i] * b[i];
        break;
    case EW_ADD_MUL:
        for (size_t i = 0; i < n; i++)
            o[i] += a[i] * b[i];
        break;
    }
}

/* One operation spelled per ISA; separate multiply and add, as in the scalar loops. */
static void act_fwd_scalar(float *y, const float *x, size_t n, tern_act act)
{
    switch (act) {
    case TERN_ACT_NONE:
        if (y != x)
            memmove(y, x, n * sizeof *y);
        break;
    case TERN_ACT_RELU:
        for (size_t i = 0; i < n; i++)
            y[i] = act_value(x[i], TERN_ACT_RELU);
        break;
    case TERN_ACT_HARDSWISH: /* same operation order as PyTorch's CPU kernel */
        for (size_t i = 0; i < n; i++)
            y[i] = act_value(x[i], TERN_ACT_HARDSWISH);
        break;
    case TERN_ACT_HARDSIGMOID:
        for (size_t i = 0; i < n; i++)
            y[i] = act_value(x[i], TERN_ACT_HARDSIGMOID);
        break;
    }
}

static void act_bwd_scalar(float *dx, const float *dy, const float *x, size_t n, tern_act act)
{
    switch (act) {
    case TERN_ACT_NONE:
        for (size_t i = 0; i < n; i++)
            dx[i] += dy[i];
        break;
    case TERN_ACT_RELU:
        for (size_t i = 0; i < n; i++)
            dx[i] += act_grad(dy[i], x[i], TERN_ACT_RELU);
        break;
    case TERN_ACT_HARDSWISH:
        for (size_t i = 0; i < n; i++)
            dx[i] += act_grad(dy[i], x[i], TERN_ACT_HARDSWISH);
        break;
    case TERN_ACT_HARDSIGMOID:
        for (size_t i = 0; i < n; i++)
            dx[i] += act_grad(dy[i], x[i], TERN_ACT_HARDSIGMOID);
        break;
    }
}

#if TERN_X86
T512 ALWAYS_INLINE __m512 ew16(ew_op op, __m512 o, __m512 a, __m512 b)
{
    switch (op) {
    case EW_ADD: return _mm512_add_ps(a, b);
    case EW_MUL: return _mm512_mul_ps(a, b);
    case EW_ADD_MUL: return _mm512_add_ps(o, _mm512_mul_ps(a, b));
    }
    return o;
}

T512 ALWAYS_INLINE void ew16_loop(ew_op op, float *o, const float *a, const float *b, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 ov = op == EW_ADD_MUL ? _mm512_loadu_ps(o + i) : _mm512_setzero_ps();
        _mm512_storeu_ps(o + i, ew16(op, ov, _mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)));
    }
    if (i < n) {
        __mmask16 mk = tail16(n - i);
        __m512 ov = op == EW_ADD_MUL ? _mm512_maskz_loadu_ps(mk, o + i) : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(o + i, mk, ew16(op, ov, _mm512_maskz_loadu_ps(mk, a + i),
                                              _mm512_maskz_loadu_ps(mk, b + i)));
    }
}

T512 static void ew_avx512(ew_op op, float *o, const float *a, const float *b, size_t n)
{
    switch (op) {
    case EW_ADD: ew16_loop(EW_ADD, o, a, b, n); break;
    case EW_MUL: ew16_loop(EW_MUL, o, a, b, n); break;
    case EW_ADD_MUL: ew16_loop(EW_ADD_MUL, o, a, b, n); break;
    }
}

T256 ALWAYS_INLINE void ew8_loop(ew_op op, float *o, const float *a, const float *b, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 av = _mm256_loadu_ps(a + i), bv = _mm256_loadu_ps(b + i);
        __m256 r = op == EW_ADD   ? _mm256_add_ps(av, bv)
                   : op == EW_MUL ? _mm256_mul_ps(av, bv)
                                  : _mm256_add_ps(_mm256_loadu_ps(o + i), _mm256_mul_ps(av, bv));
        _mm256_storeu_ps(o + i, r);
    }
    ew_scalar(op, o + i, a + i, b + i, n - i);
}

T256 static void ew_avx2(ew_op op, float *o, const float *a, const float *b, size_t n)
{
    switch (op) {
    case EW_ADD: ew8_loop(EW_ADD, o, a, b, n); break;
    case EW_MUL: ew8_loop(EW_MUL, o, a, b, n); break;
    case EW_ADD_MUL: ew8_loop(EW_ADD_MUL, o, a, b, n); break;
    }
}

T512 ALWAYS_INLINE void act_fwd16(float *y, const float *x, size_t n, tern_act act)
{
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 a0 = act16(_mm512_loadu_ps(x + i), act);
        __m512 a1 = act16(_mm512_loadu_ps(x + i + 16), act);
        _mm512_storeu_ps(y + i, a0);
        _mm512_storeu_ps(y + i + 16, a1);
    }
    for (; i < n; i += 16) {
        __mmask16 mk = tail16(n - i);
        _mm512_mask_storeu_ps(y + i, mk, act16(_mm512_maskz_loadu_ps(mk, x + i), act));
    }
}

T512 ALWAYS_INLINE void act_bwd16(float *dx, const float *dy, const float *x, size_t n,
                                  tern_act act)
{
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 mk = tail16(n - i);
        __m512 g = grad16(_mm512_maskz_loadu_ps(mk, dy + i), _mm512_maskz_loadu_ps(mk, x + i),
                          act);
        _mm512_mask_storeu_ps(dx + i, mk, _mm512_add_ps(_mm512_maskz_loadu_ps(mk, dx + i), g));
    }
}

T512 static void act_fwd_avx512(float *y, const float *x, size_t n, tern_act act)
{
    switch (act) {
    case TERN_ACT_NONE: act_fwd_scalar(y, x, n, act); break;
    case TERN_ACT_RELU: act_fwd16(y, x, n, TERN_ACT_RELU); break;
    case TERN_ACT_HARDSWISH: act_fwd16(y, x, n, TERN_ACT_HARDSWISH); break;
    case TERN_ACT_HARDSIGMOID: act_fwd16(y, x, n, TERN_ACT_HARDSIGMOID); break;
    }
}

T512 static void act_bwd_avx512(float *dx, const float *dy, const float *x, size_t n,
                                tern_act act)
{
    switch (act) {
    case TERN_ACT_NONE: ew16_loop(EW_ADD, dx, dx, dy, n); break;
    case TERN_ACT_RELU: act_bwd16(dx, dy, x, n, TERN_ACT_RELU); break;
    case TERN_ACT_HARDSWISH: act_bwd16(dx, dy, x, n, TERN_ACT_HARDSWISH); break;
    case TERN_ACT_HARDSIGMOID: act_bwd16(dx, dy, x, n, TERN_ACT_HARDSIGMOID); break;
    }
}

T256 ALWAYS_INLINE void act_fwd8(float *y, const float *x, size_t n, tern_act act)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, act8(_mm256_loadu_ps(x + i), act));
    act_fwd_scalar(y + i, x + i, n - i, act);
}

T256 ALWAYS_INLINE void act_bwd8(float *dx, const float *dy, const float *x, size_t n,
                                 tern_act act)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 g = grad8(_mm256_loadu_ps(dy + i), _mm256_loadu_ps(x + i), act);
        _mm256_storeu_ps(dx + i, _mm256_add_ps(_mm256_loadu_ps(dx + i), g));
    }
    act_bwd_scalar(dx + i, dy + i, x + i, n - i, act);
}

T256 static void act_fwd_avx2(float *y, const float *x, size_t n, tern_act act)
{
    switch (act) {
    case TERN_ACT_NONE: act_fwd_scalar(y, x, n, act); break;
    case TERN_ACT_RELU: act_fwd8(y, x, n, TERN_ACT_RELU); break;
    case TERN_ACT_HARDSWISH: act_fwd8(y, x, n, TERN_ACT_HARDSWISH); break;
    case TERN_ACT_HARDSIGMOID: act_fwd8(y, x, n, TERN_ACT_HARDSIGMOID); break;
    }
}

T256 static void act_bwd_avx2(float *dx, const float *dy, const float *x, size_t n,
                              tern_act act)
{
    switch (act) {
    case TERN_ACT_NONE: ew8_loop(EW_ADD, dx, dx, dy, n); break;
    case TERN_ACT_RELU: act_bwd8(dx, dy, x, n, TERN_ACT_RELU); break;
    case TERN_ACT_HARDSWISH: act_bwd8(dx, dy, x, n, TERN_ACT_HARDSWISH); break;
    case TERN_ACT_HARDSIGMOID: act_bwd8(dx, dy, x, n, TERN_ACT_HARDSIGMOID); break;
    }
}

/* acc (double) += x, or += x * w when w is set (the float product is exact in double), over
 * rows; up to 4 vectors of accumulators in registers. */
T512 ALWAYS_INLINE void csum16(double *acc, const float *x, const float *w, size_t rows,
                               size_t ld, size_t nc, int nv)
{
    __m512d al[4], ah[4];
    __mmask16 mk[4];
    for (int v = 0; v < nv; v++) {
        mk[v] = tail16(nc - 16 * (size_t)v);
        al[v] = _mm512_maskz_loadu_pd((__mmask8)mk[v], acc + 16 * v);
        ah[v] = _mm512_maskz_loadu_pd((__mmask8)(mk[v] >> 8), acc + 16 * v + 8);
    }
    for (size_t r = 0; r < rows; r++)
        for (int v = 0; v < nv; v++) {
            __m512 xv = _mm512_maskz_loadu_ps(mk[v], x + r * ld + 16 * v);
            __m512d xl = lo8(xv), xh = hi8(xv);
            if (w) {
                __m512 wv = _mm512_maskz_loadu_ps(mk[v], w + r * ld + 16 * v);
                xl = _mm512_mul_pd(xl, lo8(wv));
                xh = _mm512_mul_pd(xh, hi8(wv));
            }
            al[v] = _mm512_add_pd(al[v], xl);
            ah[v] = _mm512_add_pd(ah[v], xh);
        }
    for (int v = 0; v < nv; v++) {
        _mm512_mask_storeu_pd(acc + 16 * v, (__mmask8)mk[v], al[v]);
        _mm512_mask_storeu_pd(acc + 16 * v + 8, (__mmask8)(mk[v] >> 8), ah[v]);
    }
}

T512 static void csum_avx512(double *acc, const float *x, const float *w, size_t rows,
                             size_t ld, size_t nc)
{
    for (size_t j = 0; j < nc; j += 64) {
        size_t n = min_size(64, nc - j);
        const float *wj = w ? w + j : NULL;
        switch ((n + 15) / 16) {
        case 1: csum16(acc + j, x + j, wj, rows, ld, n, 1); break;
        case 2: csum16(acc + j, x + j, wj, rows, ld, n, 2); break;
        case 3: csum16(acc + j, x + j, wj, rows, ld, n, 3); break;
        case 4: csum16(acc + j, x + j, wj, rows, ld, n, 4); break;
        }
    }
}
#endif /* TERN_X86 */

static void ew(tern_isa isa, ew_op op, float *o, const float *a, const float *b, size_t n)
{
#if TERN_X86
    if (isa == TERN_ISA_AVX512)
        return ew_avx512(op, o, a, b, n);
    if (isa == TERN_ISA_AVX2)
        return ew_avx2(op, o, a, b, n);
#endif
    ew_scalar(op, o, a, b, n);
}

static void csum(tern_isa isa, double *acc, const float *x, const float *w, size_t rows,
                 size_t ld, size_t nc)
{
#if TERN_X86
    if (isa == TERN_ISA_AVX512)
        return csum_avx512(acc, x, w, rows, ld, nc);
#endif
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * ld;
        if (w) {
            const float *wr = w + r * ld;
            for (size_t j = 0; j < nc; j++)
                acc[j] += (double)xr[j] * wr[j];
        } else {
            for (size_t j = 0; j < nc; j++)
                acc[j] += xr[j];
        }
    }
}

typedef struct {
    float *out;                  /* (count) */
    const float *in, *in2;       /* (count) each, meaning set by the caller */
    size_t count;
    tern_act act;
    ew_op op;
    tern_isa isa;
} ew_args;

static void act_forward_task(void *arg, int ith, int nth)
{
    const ew_args *a = arg;
    size_t b, e;
    tern_split(a->count, ith, nth, &b, &e);
#if TERN_X86
    if (a->isa == TERN_ISA_AVX512)
        return act_fwd_avx512(a->out + b, a->in + b, e - b, a->act);
    if (a->isa == TERN_ISA_AVX2)
        return act_fwd_avx2(a->out + b, a->in + b, e - b, a->act);
#endif
    act_fwd_scalar(a->out + b, a->in + b, e - b, a->act);
}

void tern_act_forward(float *y, const float *x, size_t count, tern_act act, tern_pool *pool)
{
    ew_args a = {.out = y, .in = x, .count = count, .act = act, .isa = tern_pool_isa(pool)};
    run(pool, count, act_forward_task, &a);
}

static void act_backward_task(void *arg, int ith, int nth)
{
    const ew_args *a = arg;
    size_t b, e;
    tern_split(a->count, ith, nth, &b, &e);
#if TERN_X86
    if (a->isa == TERN_ISA_AVX512)
        return act_bwd_avx512(a->out + b, a->in + b, a->in2 + b, e - b, a->act);
    if (a->isa == TERN_ISA_AVX2)
        return act_bwd_avx2(a->out + b, a->in + b, a->in2 + b, e - b, a->act);
#endif
    act_bwd_scalar(a->out + b, a->in + b, a->in2 + b, e - b, a->act);
}

void tern_act_backward(float *dx, const float *dy, const float *x, size_t count, tern_act act,
                       tern_pool *pool)
{
    ew_args a = {.out = dx, .in = dy, .in2 = x, .count = count, .act = act,
                 .isa = tern_pool_isa(pool)};
    run(pool, count, act_backward_task, &a);
}

static void ew_task(void *arg, int ith, int nth)
{
    const ew_args *a = arg;
    size_t b, e;
    tern_split(a->count, ith, nth, &b, &e);
    ew(a->isa, a->op, a->out + b, a->in + b, a->in2 + b, e - b);
}

void tern_add_forward(float *y, const float *a, const float *b, size_t count, tern_pool *pool)
{
    ew_args args = {.out = y, .in = a, .in2 = b, .count = count, .op = EW_ADD,
                    .isa = tern_pool_isa(pool)};
    run(pool, count, ew_task, &args);
}

void tern_accumulate_mode(float *dst, const float *src, size_t count, tern_grad_mode mode,
                          tern_pool *pool)
{
    if (mode == TERN_GRAD_SET)
        memcpy(dst, src, count * sizeof *dst);
    else
        tern_accumulate(dst, src, count, pool);
}

void tern_accumulate(float *dst, const float *src, size_t count, tern_pool *pool)
{
    ew_args a = {.out = dst, .in = dst, .in2 = src, .count = count, .op = EW_ADD,
                 .isa = tern_pool_isa(pool)};
    run(pool, count, ew_task, &a);
}

/* ---- global average pool and channel scale -------------------------------------------- */

typedef struct {
    float *out, *out2;                /* meaning set by the caller */
    const float *x, *dy, *s;          /* (N, HW, C), (N, HW, C) or (N, C), (N, C) */
    int n, c;
    size_t hw;
    bool add;                         /* backward: out += (else out =) */
    tern_isa isa;
} pool_args;

/* Sums over HW of x (times dy when dy is set) into out (N, C), += when accumulate.
 * Tasks are (sample, channel chunk) pairs so each output has one owner. */
static void reduce_hw(const pool_args *a, float *out, const float *dy, double scale,
                      bool accumulate, int ith, int nth)
{
    size_t c = (size_t)a->c, hw = a->hw, chunks = (c + CHUNK - 1) / CHUNK, tb, te;
    tern_split((size_t)a->n * chunks, ith, nth, &tb, &te);
    for (size_t t = tb; t < te; t++) {
        size_t s = t / chunks, c0 = (t % chunks) * CHUNK, nc = min_size(CHUNK, c - c0);
        double acc[CHUNK] = {0};
        csum(a->isa, acc, a->x + s * hw * c + c0, dy ? dy + s * hw * c + c0 : NULL, hw, c, nc);
        float *o = out + s * c + c0;
        for (size_t j = 0; j < nc; j++)
            o[j] = (float)(acc[j] * scale) + (accumulate ? o[j] : 0);
    }
}

static void avgpool_forward_task(void *arg, int ith, int nth)
{
    const pool_args *a = arg;
    reduce_hw(a, a->out, NULL, 1.0 / (double)a->hw, false, ith, nth);
}

void tern_avgpool_forward(float *y, const float *x, int n, size_t hw, int c, tern_pool *pool)
{
    pool_args a = {.out = y, .x = x, .n = n, .c = c, .hw = hw, .isa = tern_pool_isa(pool)};
    run(pool, (size_t)n * hw * (size_t)c, avgpool_forward_task, &a);
}

/* dx += dy / hw: the quotients once per (sample, channel block), then vector adds per row. */
static void avgpool_backward_task(void *arg, int ith, int nth)
{
    const pool_args *a = arg;
    size_t c = (size_t)a->c, hw = a->hw, rb, re;
    float div = (float)hw;
    tern_split((size_t)a->n * hw, ith, nth, &rb, &re);
    for (size_t r0 = rb; r0 < re;) {
        size_t s = r0 / hw, r1 = min_size(re, (s + 1) * hw);
        for (size_t c0 = 0; c0 < c; c0 += BN_BLOCK) {
            size_t nc = min_size(BN_BLOCK, c - c0);
            float q[BN_BLOCK];
            for (size_t j = 0; j < nc; j++)
                q[j] = a->dy[s * c + c0 + j] / div;
            for (size_t r = r0; r < r1; r++) {
                float *dx = a->out + r * c + c0;
                if (a->add)
                    ew(a->isa, EW_ADD, dx, dx, q, nc);
                else
                    memcpy(dx, q, nc * sizeof *dx);
            }
        }
        r0 = r1;
    }
}

void tern_avgpool_backward(float *dx, const float *dy, int n, size_t hw, int c, tern_pool *pool)
{
    tern_avgpool_backward_mode(dx, dy, n, hw, c, TERN_GRAD_ADD, pool);
}

void tern_avgpool_backward_mode(float *dx, const float *dy, int n, size_t hw, int c,
                                tern_grad_mode dx_mode, tern_pool *pool)
{
    pool_args a = {.out = dx, .dy = dy, .n = n, .c = c, .hw = hw,
                   .add = dx_mode == TERN_GRAD_ADD, .isa = tern_pool_isa(pool)};
    run(pool, (size_t)n * hw * (size_t)c, avgpool_backward_task, &a);
}

/* out (N, HW, C) = in * s, or += when accumulate; split by rows. */
static void scale_rows(const pool_args *a, float *out, const float *in, bool accumulate,
                       int ith, int nth)
{
    size_t c = (size_t)a->c, hw = a->hw, rb, re;
    tern_split((size_t)a->n * hw, ith, nth, &rb, &re);
    for (size_t r = rb; r < re; r++)
        ew(a->isa, accumulate ? EW_ADD_MUL : EW_MUL, out + r * c, in + r * c,
           a->s + (r / hw) * c, c);
}

static void scale_forward_task(void *arg, int ith, int nth)
{
    const pool_args *a = arg;
    scale_rows(a, a->out, a->x, false, ith, nth);
}

void tern_scale_channels_forward(float *y, const float *x, const float *s, int n, size_t hw,
                                 int c, tern_pool *pool)
{
    pool_args a = {.out = y, .x = x, .s = s, .n = n, .c = c, .hw = hw,
                   .isa = tern_pool_isa(pool)};
    run(pool, (size_t)n * hw * (size_t)c, scale_forward_task, &a);
}

static void scale_backward_task(void *arg, int ith, int nth)
{
    const pool_args *a = arg;
    if (a->out)
        scale_rows(a, a->out, a->dy, a->add, ith, nth);
    if (a->out2)
        reduce_hw(a, a->out2, a->dy, 1.0, true, ith, nth);
}

void tern_scale_channels_backward(float *dx, float *ds, const float *dy, const float *x,
                                  const float *s, int n, size_t hw, int c, tern_pool *pool)
{
    tern_scale_channels_backward_mode(dx, ds, dy, x, s, n, hw, c, TERN_GRAD_ADD, pool);
}

void tern_scale_channels_backward_mode(float *dx, float *ds, const float *dy, const float *x,
                                       const float *s, int n, size_t hw, int c,
                                       tern_grad_mode dx_mode, tern_pool *pool)
{
    if (!dx && !ds)
        return;
    pool_args a = {.out = dx, .out2 = ds, .x = x, .dy = dy, .s = s, .n = n, .c = c, .hw = hw,
                   .add = dx_mode == TERN_GRAD_ADD, .isa = tern_pool_isa(pool)};
    run(pool, (size_t)n * hw * (size_t)c, scale_backward_task, &a);
}

/* ---- dropout and loss ------------------------------------------------------------------ */

void tern_dropout_forward(float *y, const float *x, const float *mask, size_t count)
{
    for (size_t i = 0; i < count; i++)
        y[i] = x[i] * mask[i];
}

void tern_dropout_backward(float *dx, const float *dy, const float *mask, size_t count)
{
    for (size_t i = 0; i < count; i++)
        dx[i] += dy[i] * mask[i];
}

float tern_cross_entropy(float *dlogits, const float *logits, const int32_t *labels, int n,
                         int k, float smoothing)
{
    double total = 0, eps = smoothing, off = eps / k;
    for (int i = 0; i < n; i++) {
        const float *z = logits + (size_t)i * (size_t)k;
        /* log-sum-exp around the maximum so exp never overflows */
        float zmax = z[0];
        for (int j = 1; j < k; j++)
            zmax = z[j] > zmax ? z[j] : zmax;
        double sumexp = 0, sumz = 0;
        for (int j = 0; j < k; j++) {
            sumexp += exp((double)z[j] - zmax);
            sumz += z[j];
        }
        double lse = zmax + log(sumexp);
        /* -sum_c log p_c = k * lse - sum_c z_c */
        total += (1 - eps) * (lse - z[labels[i]]) + off * (k * lse - sumz);
        if (dlogits) {
            float *d = dlogits + (size_t)i * (size_t)k;
            for (int j = 0; j < k; j++) {
                double target = off + (j == labels[i] ? 1 - eps : 0);
                d[j] = (float)((exp((double)z[j] - lse) - target) / n);
            }
        }
    }
    return (float)(total / n);
}
