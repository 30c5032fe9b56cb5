/* bench_strategy: FedAvg aggregation throughput, printed as one JSON object.
 *
 *   fedavg         tern_strategy: configure_fit, then add_fit_result for each client (validation
 *                  pass + exact, order-independent accumulation), then aggregate_fit; MB/s of
 *                  client updates consumed (clients x params x 4 bytes / seconds)
 *   naive_double   the peer in the same run: a plain loop acc[i] += n_c * u[i] in double, then
 *                  one division (no validation; its result depends on arrival order)
 *   order_mismatch floats of the naive result that change when the same clients arrive in
 *                  reverse order (the exact accumulator's count is 0 by construction; checked)
 *
 *   deferred4      add_fit_result_deferred, four updates folded per pass over the accumulator
 *                  (as tern-server does); bitwise equal to fedavg (checked)
 *   scalar         the same exact FedAvg with the scalar reference kernels (options.isa
 *                  TERN_ISA_SCALAR) in the same run; its global vector must equal fedavg's bit
 *                  for bit (checked), so the ratio is the SIMD kernels' gain alone
 *
 * Usage: bench_strategy [--clients K] [--params N] [--reps R] (defaults 100, 2500000, 3; best
 * of R). Client vectors cycle through 8 distinct buffers so the working set is larger than the
 * caches, as streamed updates would be. */
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tern/strategy.h"

#define DISTINCT 8

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t mix(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void naive(double *acc, float *out, float *const *rows, const uint64_t *ex, size_t k,
                  size_t n, bool reverse)
{
    memset(acc, 0, n * sizeof *acc);
    double total = 0;
    for (size_t j = 0; j < k; j++) {
        size_t c = reverse ? k - 1 - j : j;
        const float *u = rows[c % DISTINCT];
        const double w = (double)ex[c];
        for (size_t i = 0; i < n; i++)
            acc[i] += w * (double)u[i];
        total += w;
    }
    for (size_t i = 0; i < n; i++)
        out[i] = (float)(acc[i] / total);
}

static int die(const char *what, const char *detail)
{
    fprintf(stderr, "bench_strategy: %s: %s\n", what, detail);
    return 1;
}

int main(int argc, char **argv)
{
    size_t k = 100, n = 2500000;
    int reps = 3;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--clients") == 0 && i + 1 < argc)
            k = strtoul(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--params") == 0 && i + 1 < argc)
            n = strtoul(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc)
            reps = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_strategy [--clients K] [--params N] [--reps R]\n");
            return 2;
        }
    }
    if (k < 1 || n < 1 || reps < 1)
        return die("arguments", "clients, params and reps must be >= 1");

    float *rows[DISTINCT];
    float *global = malloc(n * sizeof(float)), *out = malloc(n * sizeof(float));
    float *out_rev = malloc(n * sizeof(float)), *exact = malloc(n * sizeof(float));
    double *acc = malloc(n * sizeof(double));
    uint64_t *ids = malloc(k * sizeof *ids), *sel = malloc(k * sizeof *sel);
    uint64_t *ex = malloc(k * sizeof *ex);
    if (!global || !out || !out_rev || !exact || !acc || !ids || !sel || !ex)
        return die("malloc", "out of memory");
    uint64_t seed = 1;
    for (size_t i = 0; i < n; i++)
        global[i] = (float)((double)(mix(&seed) >> 11) * 0x1p-53 - 0.5);
    for (int d = 0; d < DISTINCT; d++) {
        if (!(rows[d] = malloc(n * sizeof(float))))
            return die("malloc", "out of memory");
        for (size_t i = 0; i < n; i++)
            rows[d][i] = global[i] + (float)(((double)(mix(&seed) >> 11) * 0x1p-53 - 0.5) * 1e-2);
    }
    for (size_t c = 0; c < k; c++) {
        ids[c] = c + 1;
        ex[c] = 100 + mix(&seed) % 5000;
    }

    tern_strategy_options o = tern_strategy_options_default(TERN_STRATEGY_FEDAVG);
    o.num_params = n;
    o.min_fit_clients = 1;
    o.min_available_clients = 1;
    tern_strategy *s = NULL, *ref = NULL;
    tern_error err = {{0}};
    if (tern_strategy_create(&o, global, &s, &err) != TERN_OK)
        return die("create", err.message);
    o.isa = TERN_ISA_SCALAR;
    if (tern_strategy_create(&o, global, &ref, &err) != TERN_OK)
        return die("create", err.message);
    double best_ref = 1e300, best_deferred = 1e300;

    double best = 1e300, best_add = 1e300, best_naive = 1e300;
    for (int r = 0; r < reps; r++) {
        if (tern_strategy_set_global(s, global) != TERN_OK)
            return die("set_global", tern_strategy_last_error(s));
        size_t ns;
        double t0 = now();
        if (tern_strategy_configure_fit(s, (uint64_t)r + 1, ids, k, sel, &ns) != TERN_OK)
            return die("configure_fit", tern_strategy_last_error(s));
        for (size_t c = 0; c < k; c++) {
            size_t cc = (r % 2) ? k - 1 - c : c; /* alternate arrival order between reps */
            tern_fit_result res = {.client_id = ids[cc], .update = rows[cc % DISTINCT],
                                   .num_params = n, .num_examples = ex[cc]};
            if (tern_strategy_add_fit_result(s, &res) != TERN_OK)
                return die("add_fit_result", tern_strategy_last_error(s));
        }
        double t1 = now();
        if (tern_strategy_aggregate_fit(s, NULL) != TERN_OK)
            return die("aggregate_fit", tern_strategy_last_error(s));
        double t2 = now();
        if (t2 - t0 < best)
            best = t2 - t0;
        if (t1 - t0 < best_add)
            best_add = t1 - t0;
        if (r == 0)
            memcpy(exact, tern_strategy_global(s), n * sizeof(float));
        else if (memcmp(exact, tern_strategy_global(s), n * sizeof(float)) != 0)
            return die("determinism", "exact FedAvg changed with arrival order");

        if (tern_strategy_set_global(ref, global) != TERN_OK ||
            tern_strategy_configure_fit(ref, (uint64_t)r + 1, ids, k, sel, &ns) != TERN_OK)
            return die("scalar strategy", tern_strategy_last_error(ref));
        t0 = now();
        for (size_t c = 0; c < k; c++) {
            tern_fit_result res = {.client_id = ids[c], .update = rows[c % DISTINCT],
                                   .num_params = n, .num_examples = ex[c]};
            if (tern_strategy_add_fit_result(ref, &res) != TERN_OK)
                return die("add_fit_result", tern_strategy_last_error(ref));
        }
        t1 = now();
        if (t1 - t0 < best_ref)
            best_ref = t1 - t0;
        if (tern_strategy_aggregate_fit(ref, NULL) != TERN_OK)
            return die("aggregate_fit", tern_strategy_last_error(ref));
        if (memcmp(exact, tern_strategy_global(ref), n * sizeof(float)) != 0)
            return die("kernels", "the SIMD kernels' FedAvg differs from the scalar one");

        /* Deferred: four updates per pass over the accumulator (as the server does). */
        if (tern_strategy_set_global(s, global) != TERN_OK ||
            tern_strategy_configure_fit(s, (uint64_t)r + 1, ids, k, sel, &ns) != TERN_OK)
            return die("deferred", tern_strategy_last_error(s));
        t0 = now();
        for (size_t c = 0; c < k; c++) {
            tern_fit_result res = {.client_id = ids[c], .update = rows[c % DISTINCT],
                                   .num_params = n, .num_examples = ex[c]};
            if (tern_strategy_pending(s) == 4)
                tern_strategy_flush(s);
            if (tern_strategy_add_fit_result_deferred(s, &res) != TERN_OK)
                return die("add_fit_result_deferred", tern_strategy_last_error(s));
        }
        tern_strategy_flush(s);
        t1 = now();
        if (t1 - t0 < best_deferred)
            best_deferred = t1 - t0;
        if (tern_strategy_aggregate_fit(s, NULL) != TERN_OK)
            return die("aggregate_fit", tern_strategy_last_error(s));
        if (memcmp(exact, tern_strategy_global(s), n * sizeof(float)) != 0)
            return die("deferred", "deferred accumulation differs");

        t0 = now();
        naive(acc, out, rows, ex, k, n, false);
        t1 = now();
        if (t1 - t0 < best_naive)
            best_naive = t1 - t0;
    }
    naive(acc, out_rev, rows, ex, k, n, true);
    size_t mismatch = 0, exact_vs_naive = 0;
    for (size_t i = 0; i < n; i++) {
        mismatch += out[i] != out_rev[i];
        exact_vs_naive += out[i] != exact[i];
    }

    const double mb = (double)k * (double)n * sizeof(float) / 1e6;
    json_t *j = json_pack("{s:s, s:I, s:I, s:i, s:s, s:{s:f, s:f}, s:{s:f, s:f}, "
                          "s:{s:f, s:f, s:f, s:f}, "
                          "s:{s:f, s:f}, s:f, s:{s:I, s:I, s:I}}",
                          "bench", "strategy", "clients", (json_int_t)k, "params", (json_int_t)n,
                          "reps", reps, "isa", tern_isa_name(tern_isa_resolve(TERN_ISA_AUTO)),
                          "scalar", "add_seconds", best_ref, "ratio_add_simd_vs_scalar",
                          best_ref / best_add, "deferred4", "add_seconds", best_deferred,
                          "ratio_add_vs_immediate", best_add / best_deferred,
                          "fedavg", "seconds", best, "mb_per_s", mb / best,
                          "add_seconds", best_add, "aggregate_seconds", best - best_add,
                          "naive_double", "seconds", best_naive, "mb_per_s", mb / best_naive,
                          "ratio_fedavg_vs_naive", (mb / best) / (mb / best_naive),
                          "order_mismatch", "naive_floats", (json_int_t)mismatch,
                          "exact_floats", (json_int_t)0,
                          "naive_vs_exact_floats", (json_int_t)exact_vs_naive);
    if (!j)
        return die("json", "cannot build the result");
    char *text = json_dumps(j, JSON_COMPACT);
    if (!text)
        return die("json", "cannot print the result");
    printf("%s\n", text);
    free(text);
    json_decref(j);

    tern_strategy_destroy(&s);
    tern_strategy_destroy(&ref);
    for (int d = 0; d < DISTINCT; d++)
        free(rows[d]);
    free(global);
    free(out);
    free(out_rev);
    free(exact);
    free(acc);
    free(ids);
    free(sel);
    free(ex);
    return 0;
}
