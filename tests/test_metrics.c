/* Metrics: a hand-computed confusion matrix with accuracy, top-k, per-class precision, recall
 * and F1 (including a class never predicted and one never present), ties between logits, the
 * running loss, invalid input, and the JSON report parsed back. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tern/metrics.h"
#include "testutil.h"

#define EPS 1e-12

/* cmocka 1.1 has no assert_near. */
#define assert_near(a, b, tol) check_near((a), (b), (tol), __FILE__, __LINE__)
static void check_near(double a, double b, double tol, const char *file, int line)
{
    if (!(fabs(a - b) <= tol)) {
        print_error("%.17g != %.17g (tolerance %g)\n", a, b, tol);
        _fail(file, line);
    }
}

/* Four classes, seven samples; class 3 is present once and never predicted. */
static const float logits_a[] = {
    5, 1, 0, 0, /* truth 0: pred 0, rank 0 */
    1, 5, 2, 0, /* truth 0: pred 1, rank 2 */
    0, 5, 1, 0, /* truth 1: pred 1, rank 0 */
    3, 2, 4, 0, /* truth 1: pred 2, rank 2 */
    0, 1, 5, 0, /* truth 2: pred 2, rank 0 */
    4, 0, 3, 1, /* truth 2: pred 0, rank 1 */
    0, 2, 1, 0, /* truth 3: pred 1, rank 3 (the tie with class 0 ranks class 0 higher) */
};
static const int32_t labels_a[] = {0, 0, 1, 1, 2, 2, 3};

static void test_hand_computed(void **state)
{
    (void)state;
    tern_metrics *m = NULL;
    assert_int_equal(tern_metrics_create(4, 3, NULL, &m), TERN_OK);
    assert_int_equal(tern_metrics_add(m, logits_a, labels_a, 7, 0.5f), TERN_OK);
    assert_int_equal(tern_metrics_count(m), 7);

    /* confusion[truth][pred] */
    static const size_t want[4][4] = {
        {1, 1, 0, 0},
        {0, 1, 1, 0},
        {1, 0, 1, 0},
        {0, 1, 0, 0},
    };
    for (int t = 0; t < 4; t++)
        for (int p = 0; p < 4; p++)
            assert_int_equal(tern_metrics_confusion(m, t, p), want[t][p]);

    assert_near(tern_metrics_accuracy(m), 3.0 / 7, EPS);
    assert_near(tern_metrics_topk(m, 1), 3.0 / 7, EPS);
    assert_near(tern_metrics_topk(m, 2), 4.0 / 7, EPS);
    assert_near(tern_metrics_topk(m, 3), 6.0 / 7, EPS);
    assert_true(isnan(tern_metrics_topk(m, 0)));
    assert_true(isnan(tern_metrics_topk(m, 4)));

    /* class 0: predicted twice (rows 0, 2), correct once; support 2 */
    assert_near(tern_metrics_precision(m, 0), 0.5, EPS);
    assert_near(tern_metrics_recall(m, 0), 0.5, EPS);
    assert_near(tern_metrics_f1(m, 0), 0.5, EPS);
    /* class 1: predicted 3 times, correct once; support 2 */
    assert_near(tern_metrics_precision(m, 1), 1.0 / 3, EPS);
    assert_near(tern_metrics_recall(m, 1), 0.5, EPS);
    assert_near(tern_metrics_f1(m, 1), 2 * (1.0 / 3) * 0.5 / (1.0 / 3 + 0.5), EPS);
    /* class 2: predicted twice, correct once */
    assert_near(tern_metrics_precision(m, 2), 0.5, EPS);
    assert_near(tern_metrics_recall(m, 2), 0.5, EPS);
    /* class 3: never predicted -> precision 0 (zero_division = 0), recall 0, F1 0 */
    assert_near(tern_metrics_precision(m, 3), 0.0, EPS);
    assert_near(tern_metrics_recall(m, 3), 0.0, EPS);
    assert_near(tern_metrics_f1(m, 3), 0.0, EPS);
    assert_int_equal(tern_metrics_support(m, 3), 1);
    assert_int_equal(tern_metrics_support(m, 0), 2);
    assert_int_equal(tern_metrics_support(m, 4), 0);
    assert_true(isnan(tern_metrics_precision(m, -1)));

    assert_near(tern_metrics_loss(m), 0.5, 1e-7);

    tern_metrics_destroy(&m);
    assert_null(m);
    tern_metrics_destroy(&m);
}

static void test_loss_and_batches(void **state)
{
    (void)state;
    tern_metrics *m = NULL;
    assert_int_equal(tern_metrics_create(4, 1, NULL, &m), TERN_OK);
    assert_true(isnan(tern_metrics_loss(m)));
    assert_near(tern_metrics_accuracy(m), 0.0, EPS); /* nothing seen */
    /* Same data in two batches, losses weighted by batch size: (2*1 + 5*3) / 7; a NaN loss
     * is not counted. */
    assert_int_equal(tern_metrics_add(m, logits_a, labels_a, 2, 1.0f), TERN_OK);
    assert_int_equal(tern_metrics_add(m, logits_a + 8, labels_a + 2, 5, 3.0f), TERN_OK);
    assert_int_equal(tern_metrics_add(m, logits_a, labels_a, 0, NAN), TERN_OK);
    assert_near(tern_metrics_loss(m), 17.0 / 7, 1e-7);
    assert_near(tern_metrics_accuracy(m), 3.0 / 7, EPS);
    assert_int_equal(tern_metrics_add(m, logits_a, labels_a, 1, NAN), TERN_OK);
    assert_near(tern_metrics_loss(m), 17.0 / 7, 1e-7);
    assert_int_equal(tern_metrics_count(m), 8);

    tern_metrics_reset(m);
    assert_int_equal(tern_metrics_count(m), 0);
    assert_int_equal(tern_metrics_confusion(m, 0, 0), 0);
    assert_true(isnan(tern_metrics_loss(m)));
    tern_metrics_destroy(&m);
}

static void test_ties(void **state)
{
    (void)state;
    tern_metrics *m = NULL;
    assert_int_equal(tern_metrics_create(3, 3, NULL, &m), TERN_OK);
    /* All equal: prediction is class 0; truth 2 ranks last (two lower indices tie above it). */
    const float flat[] = {1, 1, 1};
    const int32_t t2 = 2, t0 = 0;
    assert_int_equal(tern_metrics_add(m, flat, &t2, 1, NAN), TERN_OK);
    assert_int_equal(tern_metrics_confusion(m, 2, 0), 1);
    assert_near(tern_metrics_topk(m, 1), 0.0, EPS);
    assert_near(tern_metrics_topk(m, 2), 0.0, EPS);
    assert_near(tern_metrics_topk(m, 3), 1.0, EPS);
    /* Tie between 1 and 2 at the top: predicted 1. */
    const float top[] = {0, 7, 7};
    const int32_t t1 = 1;
    assert_int_equal(tern_metrics_add(m, top, &t1, 1, NAN), TERN_OK);
    assert_int_equal(tern_metrics_confusion(m, 1, 1), 1);
    /* NaN ranks below everything: a NaN true logit is never a hit, a NaN elsewhere never wins */
    const float withnan[] = {NAN, 1, 2};
    assert_int_equal(tern_metrics_add(m, withnan, &t0, 1, NAN), TERN_OK);
    assert_int_equal(tern_metrics_confusion(m, 0, 2), 1);
    assert_near(tern_metrics_topk(m, 2), 1.0 / 3, EPS);
    assert_near(tern_metrics_topk(m, 3), 1.0, EPS);
    tern_metrics_destroy(&m);
}

static void test_invalid(void **state)
{
    (void)state;
    tern_metrics *m = NULL;
    assert_int_equal(tern_metrics_create(0, 1, NULL, &m), TERN_ERR_INVALID);
    assert_int_equal(tern_metrics_create(3, 0, NULL, &m), TERN_ERR_INVALID);
    assert_int_equal(tern_metrics_create(3, 4, NULL, &m), TERN_ERR_INVALID);
    assert_null(m);
    assert_int_equal(tern_metrics_create(3, 2, NULL, &m), TERN_OK);
    const float l[] = {1, 2, 3, 3, 2, 1};
    const int32_t bad[] = {0, 3}, neg[] = {-1, 0};
    assert_int_equal(tern_metrics_add(m, l, bad, 2, 1.0f), TERN_ERR_INVALID);
    assert_int_equal(tern_metrics_add(m, l, neg, 2, 1.0f), TERN_ERR_INVALID);
    assert_int_equal(tern_metrics_add(m, l, bad, -1, 1.0f), TERN_ERR_INVALID);
    assert_int_equal(tern_metrics_add(m, NULL, bad, 2, 1.0f), TERN_ERR_INVALID);
    /* a rejected batch leaves nothing behind, not even its first valid sample */
    assert_int_equal(tern_metrics_count(m), 0);
    assert_int_equal(tern_metrics_confusion(m, 0, 2), 0);
    assert_true(isnan(tern_metrics_loss(m)));
    tern_metrics_destroy(&m);
}

static void test_alloc_failure(void **state)
{
    (void)state;
    for (long fail = 1;; fail++) {
        test_alloc_state st = {.fail_at = fail};
        tern_allocator a = test_failing_allocator(&st);
        tern_metrics *m = NULL;
        tern_status s = tern_metrics_create(5, 2, &a, &m);
        if (s == TERN_OK) {
            tern_metrics_destroy(&m);
            assert_int_equal(st.live, 0);
            assert_true(fail > 1);
            break;
        }
        assert_int_equal(s, TERN_ERR_NOMEM);
        assert_null(m);
        assert_int_equal(st.live, 0);
    }
}

static double num(const json_t *o, const char *key)
{
    const json_t *v = json_object_get(o, key);
    assert_true(json_is_number(v));
    return json_number_value(v);
}

static void test_json(void **state)
{
    (void)state;
    tern_metrics *m = NULL;
    assert_int_equal(tern_metrics_create(4, 2, NULL, &m), TERN_OK);
    assert_int_equal(tern_metrics_add(m, logits_a, labels_a, 7, 0.25f), TERN_OK);
    const char *names[] = {"T-shirt/top", "Trouser", "caf\xc3\xa9 \"quoted\"", "Dress"};
    char *s = tern_metrics_to_json(m, names);
    assert_non_null(s);
    json_error_t jerr;
    json_t *root = json_loads(s, 0, &jerr);
    if (!root)
        fail_msg("JSON does not parse: %s\n%s", jerr.text, s);
    free(s);

    assert_near(num(root, "count"), 7, EPS);
    assert_near(num(root, "accuracy"), 3.0 / 7, 1e-10);
    assert_near(num(root, "loss"), 0.25, 1e-10);
    const json_t *topk = json_object_get(root, "top_k");
    assert_near(num(topk, "1"), 3.0 / 7, 1e-10);
    assert_near(num(topk, "2"), 4.0 / 7, 1e-10);
    assert_null(json_object_get(topk, "3"));

    const json_t *macro = json_object_get(root, "macro");
    double mp = (0.5 + 1.0 / 3 + 0.5 + 0) / 4, mr = (0.5 + 0.5 + 0.5 + 0) / 4;
    assert_near(num(macro, "precision"), mp, 1e-10);
    assert_near(num(macro, "recall"), mr, 1e-10);

    const json_t *classes = json_object_get(root, "classes");
    assert_int_equal(json_array_size(classes), 4);
    const json_t *c2 = json_array_get(classes, 2);
    assert_string_equal(json_string_value(json_object_get(c2, "name")), names[2]);
    assert_near(num(c2, "precision"), 0.5, 1e-10);
    assert_near(num(c2, "support"), 2, EPS);
    const json_t *c3 = json_array_get(classes, 3);
    assert_near(num(c3, "f1"), 0, EPS);
    assert_near(num(c3, "support"), 1, EPS);

    const json_t *conf = json_object_get(root, "confusion");
    assert_int_equal(json_array_size(conf), 4);
    assert_int_equal(json_integer_value(json_array_get(json_array_get(conf, 1), 2)), 1);
    assert_int_equal(json_integer_value(json_array_get(json_array_get(conf, 3), 1)), 1);
    assert_int_equal(json_integer_value(json_array_get(json_array_get(conf, 3), 3)), 0);
    json_decref(root);

    /* No names, no loss: classes named by index, loss null. */
    tern_metrics_reset(m);
    assert_int_equal(tern_metrics_add(m, logits_a, labels_a, 7, NAN), TERN_OK);
    s = tern_metrics_to_json(m, NULL);
    assert_non_null(s);
    root = json_loads(s, 0, &jerr);
    assert_non_null(root);
    free(s);
    assert_true(json_is_null(json_object_get(root, "loss")));
    const char *n0 = json_string_value(
        json_object_get(json_array_get(json_object_get(root, "classes"), 0), "name"));
    assert_non_null(n0);
    assert_non_null(strstr(n0, "0"));
    json_decref(root);
    tern_metrics_destroy(&m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hand_computed), cmocka_unit_test(test_loss_and_batches),
        cmocka_unit_test(test_ties),          cmocka_unit_test(test_invalid),
        cmocka_unit_test(test_alloc_failure), cmocka_unit_test(test_json),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
