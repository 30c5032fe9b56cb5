/* Internals of the aggregation strategies: the object's layout (fl/strategy.c) and the
 * loops over parameter vectors (fl/strategy_kernels.c). Not installed. */
#ifndef TERN_FL_STRATEGY_INTERNAL_H
#define TERN_FL_STRATEGY_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "nn/util.h"
#include "tern/strategy.h"

/* ---- exact accumulation ---------------------------------------------------------------------
 * Each term t = n_i * v (double) is split into three parts on fixed grids of 2^0, 2^-37 and 2^-74
 * (the part below 2^-74 is dropped, which is the one rounding a term sees). Each bin only ever
 * adds multiples of its grid and stays far enough below 2^53 grid steps that every addition is
 * exact: the bins' values do not depend on the order terms arrive in. Headroom, for at most
 * TERN_STRATEGY_MAX_ROUND_CLIENTS (2^16) terms: bin 0 holds sums up to STRATEGY_ACC_RANGE (2^50)
 * plus 2^15 of rounding; bin 1 terms are at most 2^-1 (sum < 2^15 < 2^(53-37)); bin 2 terms at
 * most 2^-38 (sum < 2^-22 < 2^(53-74)). A part is taken with the classic (x + M) - M, M = 1.5 *
 * 2^(52 + grid exponent), exact for |x| <= 2^(51 + grid exponent). */
#define STRATEGY_ACC_RANGE 0x1p50

typedef enum acc_mode {
    ACC_DELTA,        /* v = scale * u */
    ACC_WEIGHTS,      /* v = u */
    ACC_WEIGHTS_CLIP, /* v = g + scale * (u - g) */
} acc_mode;

/* bins[0..2]: n doubles each. Adds weight * v(u, g) for every coordinate. Every isa gives
 * bitwise the same bins (the same IEEE operations per coordinate, no contraction). */
void strategy_acc_add(double *const bins[3], const float *u, const float *g, size_t n,
                      double weight, double scale, acc_mode mode, tern_isa isa);
/* One update of strategy_acc_add_many: strategy_acc_add's arguments. */
typedef struct acc_item {
    const float *u;
    double weight, scale;
    acc_mode mode;
} acc_item;
/* strategy_acc_add for each of items[0..k), block by block over the coordinates so that the bins
 * of a block stay in cache while every item is added: the same bins (every addition is exact),
 * one pass over them for all k. */
void strategy_acc_add_many(double *const bins[3], const acc_item *items, size_t k,
                           const float *g, size_t n, tern_isa isa);
/* The weighted sum at coordinate i, divided by total. */
static inline double strategy_acc_value(double *const bins[3], size_t i, double total)
{
    return ((bins[0][i] + bins[1][i]) + bins[2][i]) / total;
}

/* ---- checks ---------------------------------------------------------------------------------- */

typedef struct update_stats {
    bool finite;      /* every value finite */
    size_t first_bad; /* index of the first non-finite value */
    double norm;      /* L2 norm of the change (u - g for weights, u for deltas) */
    double norm_u;    /* L2 norm of u itself: a bound on max |u| */
} update_stats;

void strategy_update_stats(const float *u, const float *g, size_t n, bool is_delta,
                           update_stats *out, tern_isa isa);

/* ---- robust aggregation ---------------------------------------------------------------------- */

/* Sort x[0..k) ascending (finite values). */
void strategy_sort_floats(float *x, size_t k);
void strategy_sort_doubles(double *x, size_t k);

/* Coordinate-wise median (median true) or trimmed mean (cut values dropped from each end) of the
 * r vectors rows[0..r) (n floats each): out[i] = (float)(base[i] + agg_i) when base is not NULL
 * (rows hold deltas), else (float)agg_i. agg_i is computed in double from the sorted values, so
 * it does not depend on the order of rows. scratch holds r * STRATEGY_BLOCK floats; out may
 * alias base. */
#define STRATEGY_BLOCK 256
void strategy_median_trimmed(float *out, const float *base, const float *const *rows, size_t r,
                             size_t n, bool median, size_t cut, float *scratch);

/* Squared L2 distances between the r vectors rows[0..r) into dist (r * r doubles, symmetric,
 * zero diagonal), accumulated block by block in a fixed order. */
void strategy_pairwise_sq_dist(double *dist, const float *const *rows, size_t r, size_t n);

#endif
