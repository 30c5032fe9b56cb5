/* Partitioners: IID sizes and coverage, Dirichlet skew against alpha (near uniform at 100,
 * strongly skewed at 0.1) with every client non-empty even in extreme cases, k classes per
 * client, determinism per seed, and rejection of impossible requests. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tern/data.h"
#include "testutil.h"

#define N 6000
#define CLASSES 10

static int32_t *balanced_labels(size_t n, int classes)
{
    int32_t *l = malloc(n * sizeof *l);
    assert_non_null(l);
    for (size_t i = 0; i < n; i++)
        l[i] = (int32_t)(i % (size_t)classes);
    return l;
}

static int *new_out(size_t n)
{
    int *o = malloc(n * sizeof *o);
    assert_non_null(o);
    for (size_t i = 0; i < n; i++)
        o[i] = -1;
    return o;
}

/* Every out[i] names a client; fills sizes[clients]. */
static void check_range(const int *out, size_t n, int clients, size_t *sizes)
{
    memset(sizes, 0, (size_t)clients * sizeof *sizes);
    for (size_t i = 0; i < n; i++) {
        assert_true(out[i] >= 0 && out[i] < clients);
        sizes[out[i]]++;
    }
}

static void test_iid(void **state)
{
    (void)state;
    const size_t ns[] = {7, 100, 1001, N};
    const int cs[] = {1, 3, 7, 10};
    for (size_t a = 0; a < 4; a++)
        for (size_t b = 0; b < 4; b++) {
            size_t n = ns[a];
            int clients = cs[b];
            if (n < (size_t)clients)
                continue;
            int *out = new_out(n);
            assert_int_equal(tern_partition_iid(out, n, clients, 42), TERN_OK);
            size_t sizes[10];
            check_range(out, n, clients, sizes);
            size_t lo = n, hi = 0, total = 0;
            for (int c = 0; c < clients; c++) {
                lo = sizes[c] < lo ? sizes[c] : lo;
                hi = sizes[c] > hi ? sizes[c] : hi;
                total += sizes[c];
            }
            assert_int_equal(total, n);
            assert_true(hi - lo <= 1);
            free(out);
        }

    /* Random, not round-robin: the first 20 samples do not cycle through clients in order. */
    int *out = new_out(N);
    assert_int_equal(tern_partition_iid(out, N, 10, 1), TERN_OK);
    int in_order = 0;
    for (int i = 0; i < 20; i++)
        in_order += out[i] == i % 10;
    assert_true(in_order < 10);
    free(out);
}

/* Mean over clients of the largest class's share of the client's samples. */
static double mean_max_share(const int *out, const int32_t *labels, size_t n, int clients)
{
    size_t *hist = calloc((size_t)clients * CLASSES, sizeof *hist);
    size_t *sizes = calloc((size_t)clients, sizeof *sizes);
    assert_non_null(hist);
    assert_non_null(sizes);
    for (size_t i = 0; i < n; i++) {
        hist[(size_t)out[i] * CLASSES + (size_t)labels[i]]++;
        sizes[out[i]]++;
    }
    double sum = 0;
    for (int c = 0; c < clients; c++) {
        size_t mx = 0;
        for (int k = 0; k < CLASSES; k++)
            if (hist[(size_t)c * CLASSES + (size_t)k] > mx)
                mx = hist[(size_t)c * CLASSES + (size_t)k];
        assert_true(sizes[c] > 0);
        sum += (double)mx / (double)sizes[c];
    }
    free(hist);
    free(sizes);
    return sum / clients;
}

static void test_dirichlet_skew(void **state)
{
    (void)state;
    int32_t *labels = balanced_labels(N, CLASSES);
    int *out = new_out(N);
    size_t sizes[10];

    assert_int_equal(tern_partition_dirichlet(out, labels, N, CLASSES, 10, 100.0, 7), TERN_OK);
    check_range(out, N, 10, sizes);
    double uniform = mean_max_share(out, labels, N, 10);
    /* Perfectly uniform would be 0.1; Dirichlet(100) stays close. */
    assert_true(uniform < 0.16);

    assert_int_equal(tern_partition_dirichlet(out, labels, N, CLASSES, 10, 0.1, 7), TERN_OK);
    check_range(out, N, 10, sizes);
    double skewed = mean_max_share(out, labels, N, 10);
    assert_true(skewed > 0.5);

    /* alpha 0.5, the usual benchmark setting, lies in between */
    assert_int_equal(tern_partition_dirichlet(out, labels, N, CLASSES, 10, 0.5, 7), TERN_OK);
    check_range(out, N, 10, sizes);
    double mid = mean_max_share(out, labels, N, 10);
    assert_true(mid > uniform && mid < skewed + 0.2);

    free(out);
    free(labels);
}

static void test_dirichlet_nonempty(void **state)
{
    (void)state;
    /* Tiny alpha and as many clients as samples: almost every client would be empty without
     * the fix-up; each must end with exactly one sample. */
    const size_t n = 50;
    int32_t *labels = balanced_labels(n, 5);
    int *out = new_out(n);
    size_t sizes[50];
    for (uint64_t seed = 0; seed < 20; seed++) {
        assert_int_equal(tern_partition_dirichlet(out, labels, n, 5, 50, 0.01, seed), TERN_OK);
        check_range(out, n, 50, sizes);
        for (int c = 0; c < 50; c++)
            assert_int_equal(sizes[c], 1);
        assert_int_equal(tern_partition_dirichlet(out, labels, n, 5, 20, 0.001, seed), TERN_OK);
        check_range(out, n, 20, sizes);
        for (int c = 0; c < 20; c++)
            assert_true(sizes[c] >= 1);
    }
    free(out);
    free(labels);
}

static void test_classes(void **state)
{
    (void)state;
    int32_t *labels = balanced_labels(N, CLASSES);
    int *out = new_out(N);
    const int clients_k[][2] = {{10, 2}, {5, 2}, {7, 3}, {3, 10}, {20, 1}, {10, 1}, {4, 5}};
    for (size_t t = 0; t < sizeof clients_k / sizeof clients_k[0]; t++) {
        int clients = clients_k[t][0], k = clients_k[t][1];
        assert_int_equal(tern_partition_classes(out, labels, N, CLASSES, clients, k, 3), TERN_OK);
        size_t sizes[20];
        check_range(out, N, clients, sizes);
        int hist[20][CLASSES];
        memset(hist, 0, sizeof hist);
        for (size_t i = 0; i < N; i++)
            hist[out[i]][labels[i]]++;
        for (int c = 0; c < clients; c++) {
            int distinct = 0;
            for (int j = 0; j < CLASSES; j++)
                distinct += hist[c][j] > 0;
            assert_int_equal(distinct, k);
        }
        /* each class's samples split evenly among its holders */
        for (int j = 0; j < CLASSES; j++) {
            int lo = N, hi = 0;
            for (int c = 0; c < clients; c++)
                if (hist[c][j] > 0) {
                    lo = hist[c][j] < lo ? hist[c][j] : lo;
                    hi = hist[c][j] > hi ? hist[c][j] : hi;
                }
            assert_true(hi >= lo && hi - lo <= 1);
        }
    }
    free(out);
    free(labels);
}

static void test_deterministic(void **state)
{
    (void)state;
    int32_t *labels = balanced_labels(N, CLASSES);
    int *a = new_out(N), *b = new_out(N);
    size_t bytes = N * sizeof *a;

    assert_int_equal(tern_partition_iid(a, N, 10, 5), TERN_OK);
    assert_int_equal(tern_partition_iid(b, N, 10, 5), TERN_OK);
    assert_memory_equal(a, b, bytes);
    assert_int_equal(tern_partition_iid(b, N, 10, 6), TERN_OK);
    assert_memory_not_equal(a, b, bytes);

    assert_int_equal(tern_partition_dirichlet(a, labels, N, CLASSES, 10, 0.5, 5), TERN_OK);
    assert_int_equal(tern_partition_dirichlet(b, labels, N, CLASSES, 10, 0.5, 5), TERN_OK);
    assert_memory_equal(a, b, bytes);
    assert_int_equal(tern_partition_dirichlet(b, labels, N, CLASSES, 10, 0.5, 6), TERN_OK);
    assert_memory_not_equal(a, b, bytes);

    assert_int_equal(tern_partition_classes(a, labels, N, CLASSES, 10, 2, 5), TERN_OK);
    assert_int_equal(tern_partition_classes(b, labels, N, CLASSES, 10, 2, 5), TERN_OK);
    assert_memory_equal(a, b, bytes);
    assert_int_equal(tern_partition_classes(b, labels, N, CLASSES, 10, 2, 6), TERN_OK);
    assert_memory_not_equal(a, b, bytes);

    free(a);
    free(b);
    free(labels);
}

static void test_invalid(void **state)
{
    (void)state;
    int32_t *labels = balanced_labels(100, CLASSES);
    int *out = new_out(100);

    assert_int_equal(tern_partition_iid(out, 5, 6, 0), TERN_ERR_INVALID);
    assert_int_equal(tern_partition_iid(out, 100, 0, 0), TERN_ERR_INVALID);
    assert_int_equal(tern_partition_iid(NULL, 100, 2, 0), TERN_ERR_INVALID);
    assert_int_equal(tern_partition_iid(out, 0, 1, 0), TERN_ERR_INVALID);

    assert_int_equal(tern_partition_dirichlet(out, labels, 100, CLASSES, 101, 0.5, 0),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_partition_dirichlet(out, labels, 100, CLASSES, 0, 0.5, 0),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_partition_dirichlet(out, labels, 100, CLASSES, 4, 0.0, 0),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_partition_dirichlet(out, labels, 100, CLASSES, 4, -1.0, 0),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_partition_dirichlet(out, labels, 100, CLASSES, 4, NAN, 0),
                     TERN_ERR_INVALID);
    /* a label out of range */
    assert_int_equal(tern_partition_dirichlet(out, labels, 100, 5, 4, 0.5, 0), TERN_ERR_INVALID);
    assert_int_equal(tern_partition_classes(out, labels, 100, 5, 4, 2, 0), TERN_ERR_INVALID);

    assert_int_equal(tern_partition_classes(out, labels, 100, CLASSES, 4, 11, 0),
                     TERN_ERR_INVALID); /* k > classes */
    assert_int_equal(tern_partition_classes(out, labels, 100, CLASSES, 4, 0, 0),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_partition_classes(out, labels, 100, CLASSES, 4, 2, 0),
                     TERN_ERR_INVALID); /* 8 slots cannot hold 10 classes */
    assert_int_equal(tern_partition_classes(out, labels, 100, CLASSES, 101, 1, 0),
                     TERN_ERR_INVALID);
    /* 10 samples per class but 100 holders per class: most would get nothing of it */
    assert_int_equal(tern_partition_classes(out, labels, 100, CLASSES, 100, 10, 0),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_partition_classes(out, labels, 100, CLASSES, 100, 1, 0), TERN_OK);
    free(out);
    free(labels);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_iid),           cmocka_unit_test(test_dirichlet_skew),
        cmocka_unit_test(test_dirichlet_nonempty), cmocka_unit_test(test_classes),
        cmocka_unit_test(test_deterministic), cmocka_unit_test(test_invalid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
