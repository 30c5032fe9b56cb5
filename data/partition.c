/* Partitioning a labelled dataset across federated clients.
 *
 * All three partitioners are pure functions of their inputs and the seed (tern_rng, no hidden
 * state). The partitioners take no allocator (their signature has none): the two that need
 * scratch memory use the C library's through tern_alloc(NULL, ...) and report TERN_ERR_NOMEM.
 *
 * Dirichlet follows the usual label-skew recipe (Hsu et al. 2019; NIID-Bench): for each class,
 * shuffle its samples, draw client shares p ~ Dirichlet(alpha, ..., alpha) and cut the shuffled
 * list at floor(n_c * cumsum(p)). Shares come from Gamma(alpha) draws (Marsaglia-Tsang, with
 * Gamma(a) = Gamma(a + 1) * U^(1/a) for a < 1), normalized in log space because with small
 * alpha every draw can underflow a double. Instead of NIID-Bench's redraw-until-big-enough loop,
 * which need not terminate quickly for tiny alpha and many clients, clients left empty are fixed
 * up deterministically afterwards: each empty client, in index order, takes the highest-indexed
 * sample of the client that then holds the most samples (lowest index on ties). */
#include "tern/data.h"

#include <math.h>
#include <string.h>

#include "nn/util.h"

/* Uniform integer in [0, n) (n >= 1) by rejection, so there is no modulo bias. */
static uint64_t uniform_below(tern_rng *rng, uint64_t n)
{
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do
        x = tern_rng_next(rng);
    while (x >= limit);
    return x % n;
}

static void shuffle_int(int *a, size_t n, tern_rng *rng)
{
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)uniform_below(rng, i);
        int t = a[i - 1];
        a[i - 1] = a[j];
        a[j] = t;
    }
}

static void shuffle_size(size_t *a, size_t n, tern_rng *rng)
{
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)uniform_below(rng, i);
        size_t t = a[i - 1];
        a[i - 1] = a[j];
        a[j] = t;
    }
}

tern_status tern_partition_iid(int *out, size_t n, int clients, uint64_t seed)
{
    if (!out || clients < 1 || n < (size_t)clients)
        return TERN_ERR_INVALID;
    /* Lay the clients out in near-equal runs, then shuffle the assignment itself: the same as
     * cutting a random permutation of the samples into parts, without the permutation. */
    for (int c = 0; c < clients; c++) {
        size_t b, e;
        tern_split(n, c, clients, &b, &e);
        for (size_t i = b; i < e; i++)
            out[i] = c;
    }
    tern_rng rng;
    tern_rng_seed(&rng, seed);
    shuffle_int(out, n, &rng);
    return TERN_OK;
}

static bool labels_valid(const int32_t *labels, size_t n, int classes)
{
    for (size_t i = 0; i < n; i++)
        if (labels[i] < 0 || labels[i] >= classes)
            return false;
    return true;
}

/* Sample indices grouped by class (counting sort): by_class[start[c] .. start[c + 1]) holds
 * class c's samples in increasing order. start has classes + 1 entries. */
static void group_by_class(const int32_t *labels, size_t n, int classes, size_t *start,
                           size_t *by_class)
{
    memset(start, 0, ((size_t)classes + 1) * sizeof *start);
    for (size_t i = 0; i < n; i++)
        start[labels[i] + 1]++;
    for (int c = 0; c < classes; c++)
        start[c + 1] += start[c];
    for (size_t i = 0; i < n; i++) {
        /* start[c] is used as the fill cursor, then restored below. */
        by_class[start[labels[i]]++] = i;
    }
    for (int c = classes; c > 0; c--)
        start[c] = start[c - 1];
    start[0] = 0;
}

/* log of a Gamma(a, 1) draw (a > 0). */
static double log_gamma_draw(tern_rng *rng, double a)
{
    double boost = 0;
    if (a < 1) {
        /* Gamma(a) = Gamma(a + 1) * U^(1/a); kept as a logarithm, U^(1/a) underflows easily. */
        double u = 1.0 - tern_rng_uniform_double(rng); /* (0, 1] */
        boost = log(u) / a;
        a += 1;
    }
    const double d = a - 1.0 / 3.0, c = 1.0 / sqrt(9.0 * d);
    for (;;) {
        double x = tern_rng_normal(rng), v = 1.0 + c * x;
        if (v <= 0)
            continue;
        v = v * v * v;
        double u = 1.0 - tern_rng_uniform_double(rng);
        if (u < 1.0 - 0.0331 * (x * x) * (x * x) ||
            log(u) < 0.5 * x * x + d * (1.0 - v + log(v)))
            return log(d * v) + boost;
    }
}

/* p ~ Dirichlet(alpha, ..., alpha) over k entries. */
static void dirichlet_draw(tern_rng *rng, double alpha, double *p, int k)
{
    double mx = -INFINITY;
    for (int j = 0; j < k; j++) {
        p[j] = log_gamma_draw(rng, alpha);
        if (p[j] > mx)
            mx = p[j];
    }
    double sum = 0;
    for (int j = 0; j < k; j++) {
        p[j] = exp(p[j] - mx);
        sum += p[j];
    }
    for (int j = 0; j < k; j++)
        p[j] /= sum;
}

tern_status tern_partition_dirichlet(int *out, const int32_t *labels, size_t n, int classes,
                                     int clients, double alpha, uint64_t seed)
{
    if (!out || !labels || classes < 1 || clients < 1 || n < (size_t)clients ||
        !(alpha > 0) || !isfinite(alpha) || !labels_valid(labels, n, classes))
        return TERN_ERR_INVALID;

    tern_status s = TERN_ERR_NOMEM;
    size_t *start = tern_calloc(NULL, (size_t)classes + 1, sizeof *start);
    size_t *by_class = tern_calloc(NULL, n, sizeof *by_class);
    size_t *sizes = tern_calloc(NULL, (size_t)clients, sizeof *sizes);
    double *p = tern_calloc(NULL, (size_t)clients, sizeof *p);
    if (!start || !by_class || !sizes || !p)
        goto done;
    group_by_class(labels, n, classes, start, by_class);

    tern_rng rng;
    tern_rng_seed(&rng, seed);
    for (int c = 0; c < classes; c++) {
        size_t *idx = by_class + start[c], nc = start[c + 1] - start[c];
        /* Draw even for an empty class so each class's draws do not depend on the others'
         * sizes. */
        shuffle_size(idx, nc, &rng);
        dirichlet_draw(&rng, alpha, p, clients);
        double cum = 0;
        size_t at = 0;
        for (int j = 0; j < clients; j++) {
            cum += p[j];
            size_t end = j == clients - 1 ? nc : (size_t)floor(cum * (double)nc);
            if (end > nc)
                end = nc;
            for (; at < end; at++)
                out[idx[at]] = j;
        }
    }

    for (size_t i = 0; i < n; i++)
        sizes[out[i]]++;
    for (int j = 0; j < clients; j++) {
        if (sizes[j] > 0)
            continue;
        /* n >= clients, so while a client is empty another holds at least two samples. */
        int donor = 0;
        for (int d = 1; d < clients; d++)
            if (sizes[d] > sizes[donor])
                donor = d;
        size_t i = n;
        while (out[--i] != donor)
            ;
        out[i] = j;
        sizes[donor]--;
        sizes[j]++;
    }
    s = TERN_OK;

done:
    tern_free(NULL, p);
    tern_free(NULL, sizes);
    tern_free(NULL, by_class);
    tern_free(NULL, start);
    return s;
}

tern_status tern_partition_classes(int *out, const int32_t *labels, size_t n, int classes,
                                   int clients, int k, uint64_t seed)
{
    if (!out || !labels || classes < 1 || clients < 1 || n < (size_t)clients || k < 1 ||
        k > classes || !labels_valid(labels, n, classes))
        return TERN_ERR_INVALID;
    /* Every class must be held (out[i] has to name some client), and every class must have a
     * sample for each of its holders, or a client would really hold fewer than k classes. Each
     * class gets floor or ceil(clients * k / classes) holders, depending on the shuffle; the
     * check uses the ceiling so whether a request is valid does not depend on the seed. */
    size_t slots = (size_t)clients * (size_t)k;
    if (slots < (size_t)classes)
        return TERN_ERR_INVALID;
    size_t max_holders = (slots + (size_t)classes - 1) / (size_t)classes;

    tern_status s = TERN_ERR_NOMEM;
    size_t *start = tern_calloc(NULL, (size_t)classes + 1, sizeof *start);
    size_t *by_class = tern_calloc(NULL, n, sizeof *by_class);
    int *order = tern_calloc(NULL, (size_t)classes, sizeof *order);
    int *holders = tern_calloc(NULL, (size_t)clients, sizeof *holders);
    if (!start || !by_class || !order || !holders)
        goto done;
    group_by_class(labels, n, classes, start, by_class);
    s = TERN_ERR_INVALID;
    for (int c = 0; c < classes; c++)
        if (start[c + 1] - start[c] < max_holders)
            goto done;

    tern_rng rng;
    tern_rng_seed(&rng, seed);
    for (int c = 0; c < classes; c++)
        order[c] = c;
    shuffle_int(order, (size_t)classes, &rng);
    /* Client j holds order[(j * k + i) % classes] for i < k: k consecutive positions of the
     * shuffled list, hence k distinct classes since k <= classes. */
    for (int pos = 0; pos < classes; pos++) {
        int c = order[pos], nh = 0;
        for (int j = 0; j < clients; j++) {
            size_t first = (size_t)j * (size_t)k % (size_t)classes;
            size_t off = ((size_t)pos + (size_t)classes - first) % (size_t)classes;
            if (off < (size_t)k)
                holders[nh++] = j;
        }
        size_t *idx = by_class + start[c], nc = start[c + 1] - start[c];
        shuffle_size(idx, nc, &rng);
        for (int h = 0; h < nh; h++) {
            size_t b, e;
            tern_split(nc, h, nh, &b, &e);
            for (size_t i = b; i < e; i++)
                out[idx[i]] = holders[h];
        }
    }
    s = TERN_OK;

done:
    tern_free(NULL, holders);
    tern_free(NULL, order);
    tern_free(NULL, by_class);
    tern_free(NULL, start);
    return s;
}
