/* The loops over parameter vectors behind the strategies: update checks, exact streaming
 * accumulation, coordinate-wise median / trimmed mean, and Krum's pairwise distances.
 * Everything here is deterministic for a given set of inputs in a given row order; the callers
 * (fl/strategy.c) keep rows in client-id order. */
#include "strategy_internal.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
/* Only the instructions below are used: double add, sub, mul and float-to-double conversion,
 * each exactly the IEEE operation the scalar code does per coordinate (no FMA). */
#define TARGET_AVX512 __attribute__((target("avx512f")))
#define HAVE_AVX512_KERNELS 1
#endif

/* ---- checks ------------------------------------------------------------------------------- */

/* Eight lanes of partial sums in a fixed pattern keep the pass vectorizable (a single running
 * sum is one long dependency chain, and reassociating it is not allowed) and deterministic.
 * Non-finite values need no test of their own: a float squared and summed in double overflows
 * only if the float was infinite or NaN. */
#define LANES 8

static void stats_weights(const float *restrict u, const float *restrict g, size_t n,
                          double *restrict sq_change, double *restrict sq_u)
{
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            double x = u[i + l], d = x - (double)g[i + l];
            sq_change[l] += d * d;
            sq_u[l] += x * x;
        }
    for (; i < n; i++) {
        double x = u[i], d = x - (double)g[i];
        sq_change[0] += d * d;
        sq_u[0] += x * x;
    }
}

static void stats_delta(const float *restrict u, size_t n, double *restrict sq_u)
{
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            double x = u[i + l];
            sq_u[l] += x * x;
        }
    for (; i < n; i++) {
        double x = u[i];
        sq_u[0] += x * x;
    }
}

#ifdef HAVE_AVX512_KERNELS
/* The scalar loops' eight lanes are one 512-bit register: lane l sums coordinates i = l mod 8
 * of the full blocks in the same order, and the tail goes to lane 0 as there. */
static TARGET_AVX512 void stats_weights_avx512(const float *restrict u, const float *restrict g,
                                               size_t n, double *restrict sq_change,
                                               double *restrict sq_u)
{
    __m512d c = _mm512_loadu_pd(sq_change), q = _mm512_loadu_pd(sq_u);
    size_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        __m512d x = _mm512_cvtps_pd(_mm256_loadu_ps(u + i));
        __m512d d = _mm512_sub_pd(x, _mm512_cvtps_pd(_mm256_loadu_ps(g + i)));
        c = _mm512_add_pd(c, _mm512_mul_pd(d, d));
        q = _mm512_add_pd(q, _mm512_mul_pd(x, x));
    }
    _mm512_storeu_pd(sq_change, c);
    _mm512_storeu_pd(sq_u, q);
    stats_weights(u + i, g + i, n - i, sq_change, sq_u);
}

static TARGET_AVX512 void stats_delta_avx512(const float *restrict u, size_t n,
                                             double *restrict sq_u)
{
    __m512d q = _mm512_loadu_pd(sq_u);
    size_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        __m512d x = _mm512_cvtps_pd(_mm256_loadu_ps(u + i));
        q = _mm512_add_pd(q, _mm512_mul_pd(x, x));
    }
    _mm512_storeu_pd(sq_u, q);
    stats_delta(u + i, n - i, sq_u);
}
#endif

void strategy_update_stats(const float *u, const float *g, size_t n, bool is_delta,
                           update_stats *out, tern_isa isa)
{
    double sq_change[LANES] = {0}, sq_u[LANES] = {0};
#ifdef HAVE_AVX512_KERNELS
    if (isa == TERN_ISA_AVX512) {
        if (is_delta)
            stats_delta_avx512(u, n, sq_u);
        else
            stats_weights_avx512(u, g, n, sq_change, sq_u);
    } else
#endif
    if (is_delta)
        stats_delta(u, n, sq_u);
    else
        stats_weights(u, g, n, sq_change, sq_u);
    double change = 0.0, norm_u = 0.0;
    for (int l = 0; l < LANES; l++) {
        change += sq_change[l];
        norm_u += sq_u[l];
    }
    norm_u = sqrt(norm_u);
    out->finite = isfinite(norm_u);
    out->first_bad = 0;
    if (!out->finite)
        while (isfinite(u[out->first_bad]))
            out->first_bad++;
    out->norm = !out->finite ? NAN : is_delta ? norm_u : sqrt(change);
    out->norm_u = norm_u;
}

/* ---- exact accumulation ------------------------------------------------------------------- */

#define M0 0x1.8p52  /* 1.5 * 2^52: rounds to multiples of 2^0 */
#define M1 0x1.8p15  /* 1.5 * 2^(52 - 37): multiples of 2^-37 */
#define M2 0x1.8p-22 /* 1.5 * 2^(52 - 74): multiples of 2^-74 */

static inline void acc_term(double *restrict b0, double *restrict b1, double *restrict b2,
                            size_t i, double t)
{
    double a0 = (t + M0) - M0;
    double r = t - a0;
    double a1 = (r + M1) - M1;
    r -= a1;
    double a2 = (r + M2) - M2;
    b0[i] += a0;
    b1[i] += a1;
    b2[i] += a2;
}

#ifdef HAVE_AVX512_KERNELS
/* acc_term on eight coordinates: the same operations in the same order, lane by lane. */
static TARGET_AVX512 void acc_add_avx512(double *restrict b0, double *restrict b1,
                                         double *restrict b2, const float *restrict u,
                                         const float *restrict g, size_t n, double weight,
                                         double scale, acc_mode mode)
{
    const __m512d m0 = _mm512_set1_pd(M0), m1 = _mm512_set1_pd(M1), m2 = _mm512_set1_pd(M2);
    const double w = mode == ACC_DELTA && scale != 1.0 ? weight * scale : weight;
    const __m512d vw = _mm512_set1_pd(w), vs = _mm512_set1_pd(scale);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m512d x = _mm512_cvtps_pd(_mm256_loadu_ps(u + i)), t;
        if (mode == ACC_WEIGHTS_CLIP) {
            __m512d gi = _mm512_cvtps_pd(_mm256_loadu_ps(g + i));
            t = _mm512_mul_pd(_mm512_add_pd(gi, _mm512_mul_pd(vs, _mm512_sub_pd(x, gi))), vw);
        } else {
            t = _mm512_mul_pd(x, vw);
        }
        __m512d a0 = _mm512_sub_pd(_mm512_add_pd(t, m0), m0);
        __m512d r = _mm512_sub_pd(t, a0);
        __m512d a1 = _mm512_sub_pd(_mm512_add_pd(r, m1), m1);
        r = _mm512_sub_pd(r, a1);
        __m512d a2 = _mm512_sub_pd(_mm512_add_pd(r, m2), m2);
        _mm512_storeu_pd(b0 + i, _mm512_add_pd(_mm512_loadu_pd(b0 + i), a0));
        _mm512_storeu_pd(b1 + i, _mm512_add_pd(_mm512_loadu_pd(b1 + i), a1));
        _mm512_storeu_pd(b2 + i, _mm512_add_pd(_mm512_loadu_pd(b2 + i), a2));
    }
    for (; i < n; i++) {
        double t;
        if (mode == ACC_WEIGHTS_CLIP) {
            double gi = g[i];
            t = (gi + scale * ((double)u[i] - gi)) * weight;
        } else {
            t = (double)u[i] * w;
        }
        acc_term(b0, b1, b2, i, t);
    }
}
#endif

void strategy_acc_add(double *const bins[3], const float *u, const float *g, size_t n,
                      double weight, double scale, acc_mode mode, tern_isa isa)
{
    double *restrict b0 = bins[0], *restrict b1 = bins[1], *restrict b2 = bins[2];
#ifdef HAVE_AVX512_KERNELS
    if (isa == TERN_ISA_AVX512) {
        acc_add_avx512(b0, b1, b2, u, g, n, weight, scale, mode);
        return;
    }
#else
    (void)isa;
#endif
    switch (mode) {
    case ACC_WEIGHTS:
        for (size_t i = 0; i < n; i++)
            acc_term(b0, b1, b2, i, (double)u[i] * weight);
        break;
    case ACC_DELTA: {
        const double ws = weight * scale; /* one rounding, the same for every coordinate */
        if (scale == 1.0)
            for (size_t i = 0; i < n; i++)
                acc_term(b0, b1, b2, i, (double)u[i] * weight);
        else
            for (size_t i = 0; i < n; i++)
                acc_term(b0, b1, b2, i, (double)u[i] * ws);
        break;
    }
    case ACC_WEIGHTS_CLIP:
        for (size_t i = 0; i < n; i++) {
            double gi = g[i];
            acc_term(b0, b1, b2, i, (gi + scale * ((double)u[i] - gi)) * weight);
        }
        break;
    }
}

#define ACC_BLOCK 2048 /* coordinates: 3 x 16 KiB of bins */

void strategy_acc_add_many(double *const bins[3], const acc_item *items, size_t k,
                           const float *g, size_t n, tern_isa isa)
{
    for (size_t start = 0; start < n; start += ACC_BLOCK) {
        size_t len = n - start < ACC_BLOCK ? n - start : ACC_BLOCK;
        double *const b[3] = {bins[0] + start, bins[1] + start, bins[2] + start};
        for (size_t j = 0; j < k; j++)
            strategy_acc_add(b, items[j].u + start, g + start, len, items[j].weight,
                             items[j].scale, items[j].mode, isa);
    }
}

/* ---- sorting ------------------------------------------------------------------------------ */

/* Quicksort (median of three, smaller side first) finished by insertion sort. Values are
 * finite, so < is a total order. */
#define DEFINE_SORT(name, T)                                                                    \
    static void name##_insertion(T *x, size_t k)                                                \
    {                                                                                           \
        for (size_t i = 1; i < k; i++) {                                                        \
            T v = x[i];                                                                         \
            size_t j = i;                                                                       \
            while (j > 0 && v < x[j - 1]) {                                                     \
                x[j] = x[j - 1];                                                                \
                j--;                                                                            \
            }                                                                                   \
            x[j] = v;                                                                           \
        }                                                                                       \
    }                                                                                           \
    void name(T *x, size_t k)                                                                   \
    {                                                                                           \
        while (k > 24) {                                                                        \
            size_t mid = k / 2;                                                                 \
            T a = x[0], b = x[mid], c = x[k - 1];                                               \
            T pivot = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));    \
            size_t i = 0, j = k - 1;                                                            \
            for (;;) {                                                                          \
                while (x[i] < pivot)                                                            \
                    i++;                                                                        \
                while (pivot < x[j])                                                            \
                    j--;                                                                        \
                if (i >= j)                                                                     \
                    break;                                                                      \
                T t = x[i];                                                                     \
                x[i] = x[j];                                                                    \
                x[j] = t;                                                                       \
                i++;                                                                            \
                j--;                                                                            \
            }                                                                                   \
            /* Hoare partition: [0, j] <= pivot <= [j + 1, k). */                               \
            size_t left = j + 1, right = k - left;                                              \
            if (left < right) {                                                                 \
                name(x, left);                                                                  \
                x += left;                                                                      \
                k = right;                                                                      \
            } else {                                                                            \
                name(x + left, right);                                                          \
                k = left;                                                                       \
            }                                                                                   \
        }                                                                                       \
        name##_insertion(x, k);                                                                 \
    }

DEFINE_SORT(strategy_sort_floats, float)
DEFINE_SORT(strategy_sort_doubles, double)

/* ---- median and trimmed mean -------------------------------------------------------------- */

void strategy_median_trimmed(float *out, const float *base, const float *const *rows, size_t r,
                             size_t n, bool median, size_t cut, float *scratch)
{
    for (size_t start = 0; start < n; start += STRATEGY_BLOCK) {
        size_t len = n - start < STRATEGY_BLOCK ? n - start : STRATEGY_BLOCK;
        /* Transpose the block so each coordinate's r values are contiguous. */
        for (size_t k = 0; k < r; k++) {
            const float *row = rows[k] + start;
            for (size_t c = 0; c < len; c++)
                scratch[c * r + k] = row[c];
        }
        for (size_t c = 0; c < len; c++) {
            float *v = scratch + c * r;
            strategy_sort_floats(v, r);
            double agg;
            if (median) {
                agg = r % 2 ? (double)v[r / 2]
                            : 0.5 * ((double)v[r / 2 - 1] + (double)v[r / 2]);
            } else {
                double sum = 0.0;
                for (size_t k = cut; k < r - cut; k++)
                    sum += v[k];
                agg = sum / (double)(r - 2 * cut);
            }
            size_t i = start + c;
            out[i] = base ? (float)((double)base[i] + agg) : (float)agg;
        }
    }
}

/* ---- Krum --------------------------------------------------------------------------------- */

#define DIST_BLOCK 1024

void strategy_pairwise_sq_dist(double *dist, const float *const *rows, size_t r, size_t n)
{
    memset(dist, 0, r * r * sizeof *dist);
    /* Blocks of coordinates keep r rows' slices in cache while every pair visits them. */
    for (size_t start = 0; start < n; start += DIST_BLOCK) {
        size_t len = n - start < DIST_BLOCK ? n - start : DIST_BLOCK;
        for (size_t a = 0; a < r; a++) {
            const float *x = rows[a] + start;
            for (size_t b = a + 1; b < r; b++) {
                const float *y = rows[b] + start;
                double sum = 0.0;
                for (size_t c = 0; c < len; c++) {
                    double d = (double)x[c] - (double)y[c];
                    sum += d * d;
                }
                dist[a * r + b] += sum;
            }
        }
    }
    for (size_t a = 0; a < r; a++)
        for (size_t b = a + 1; b < r; b++)
            dist[b * r + a] = dist[a * r + b];
}
