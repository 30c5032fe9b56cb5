/* DP-SGD tests (include/tern/dpsgd.h) on a tiny GroupNorm MobileNetV3-Small (width 0.25, one
 * input channel, 32x32, ten classes).
 *
 * The oracle for every per-sample quantity is the ordinary forward and backward run on each
 * sample alone: its gradient, per parameter tensor (stem, depthwise and pointwise convolutions,
 * GroupNorm weights and biases, squeeze-and-excitation and classifier linears), must have the
 * squared norms DP-SGD computes from the batch, and the individually clipped gradients must
 * sum to what DP-SGD leaves in the model. Then the noise (an empty Poisson batch is noise
 * only: its statistics), the Poisson sampler, the accountant's record, and refusals. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tern.h"
#include "testutil.h"

#define SIZE 32
#define CLASSES 10

typedef struct setup {
    tern_model *model;
    float *input;    /* (n, SIZE, SIZE, 1) */
    int32_t *labels; /* (n) */
    int n;
    size_t nparams, ntensors;
} setup;

static tern_model *tiny_model(int threads, tern_isa isa, tern_norm norm)
{
    tern_model_options o = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    o.width_mult = 0.25;
    o.in_channels = 1;
    o.num_classes = CLASSES;
    o.dropout = 0.0f;
    o.norm = norm;
    o.threads = threads;
    o.isa = isa;
    o.seed = 7;
    tern_model *m = NULL;
    tern_error err = {{0}};
    if (tern_model_create(&o, &m, &err) != TERN_OK)
        fail_msg("tern_model_create: %s", err.message);
    return m;
}

static void setup_open(setup *s, int threads, tern_isa isa, int n, int max_batch)
{
    memset(s, 0, sizeof *s);
    s->model = tiny_model(threads, isa, TERN_NORM_GROUP);
    s->n = n;
    s->input = malloc(sizeof(float) * (size_t)n * SIZE * SIZE);
    s->labels = malloc(sizeof(int32_t) * (size_t)n);
    assert_non_null(s->input);
    assert_non_null(s->labels);
    test_rng r = {42};
    test_fill_uniform(&r, s->input, (size_t)n * SIZE * SIZE, -1.5f, 2.0f);
    for (int i = 0; i < n; i++)
        s->labels[i] = test_rng_int(&r, 0, CLASSES - 1);
    /* Larger classifier weights than the N(0, 0.01) init, so every layer's gradient is well
     * above rounding. */
    const tern_model_tensor *t = tern_model_find_tensor(s->model, "classifier.3.weight");
    assert_non_null(t);
    test_fill_uniform(&r, t->data, t->count, -0.3f, 0.3f);
    tern_model_invalidate(s->model);
    s->nparams = tern_model_param_count(s->model);
    for (size_t i = 0; i < tern_model_tensor_count(s->model); i++)
        s->ntensors += tern_model_tensor_at(s->model, i)->kind == TERN_TENSOR_PARAM;
    assert_int_equal(tern_model_plan(s->model, max_batch, SIZE, SIZE, true), TERN_OK);
}

static void setup_close(setup *s)
{
    tern_model_destroy(&s->model);
    free(s->input);
    free(s->labels);
}

static tern_dp *make_dp(tern_model *m, double c, double sigma, double q, double expected)
{
    tern_dp *dp = NULL;
    tern_error err = {{0}};
    tern_dp_options o = {.max_grad_norm = c, .noise_multiplier = sigma, .sample_rate = q,
                         .expected_batch = expected, .seed = 1234};
    if (tern_dp_create(m, &o, &dp, &err) != TERN_OK)
        fail_msg("tern_dp_create: %s", err.message);
    return dp;
}

/* The oracle: grads (n, nparams) of each sample's own loss, run alone. */
static float *oracle_grads(setup *s)
{
    float *g = malloc(sizeof(float) * (size_t)s->n * s->nparams);
    assert_non_null(g);
    float logits[CLASSES], dlogits[CLASSES], loss;
    for (int i = 0; i < s->n; i++) {
        tern_model_zero_grad(s->model);
        assert_int_equal(tern_model_forward(s->model, logits, s->input + (size_t)i * SIZE * SIZE,
                                            1, true),
                         TERN_OK);
        assert_int_equal(tern_cross_entropy_loss(&loss, dlogits, logits, s->labels + i, 1,
                                                 CLASSES, 0.0f),
                         TERN_OK);
        assert_int_equal(tern_model_backward(s->model, dlogits), TERN_OK);
        memcpy(g + (size_t)i * s->nparams, tern_model_grads(s->model),
               sizeof(float) * s->nparams);
    }
    return g;
}

/* Squared norm of each parameter tensor of one sample's flat gradient. */
static void tensor_sq_norms(const setup *s, const float *g, double *sq)
{
    size_t k = 0;
    const float *base = tern_model_grads(s->model);
    for (size_t i = 0; i < tern_model_tensor_count(s->model); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(s->model, i);
        if (t->kind != TERN_TENSOR_PARAM)
            continue;
        const float *v = g + (t->grad - base);
        double a = 0;
        for (size_t j = 0; j < t->count; j++)
            a += (double)v[j] * v[j];
        sq[k++] = a;
    }
}

/* Kinds of layer a parameter tensor belongs to, from its name and shape. */
static const char *layer_kind(const tern_model_tensor *t)
{
    if (strncmp(t->name, "classifier", 10) == 0)
        return "linear";
    if (strstr(t->name, ".fc1.") || strstr(t->name, ".fc2."))
        return "se_linear";
    if (t->ndim == 1)
        return "groupnorm";
    if (strncmp(t->name, "features.0.", 11) == 0)
        return "stem";
    if (t->shape[1] == 1 && t->shape[2] > 1)
        return "depthwise";
    return "pointwise";
}

/* Per-sample norms per tensor and in total against the oracle. */
static void check_norms(int threads, tern_isa isa)
{
    setup s;
    setup_open(&s, threads, isa, 6, 6);
    tern_dp *dp = make_dp(s.model, 1.0, 1.0, 0.01, 6);
    float norms[6];
    double *sq = malloc(sizeof(double) * 6 * s.ntensors);
    assert_non_null(sq);
    assert_int_equal(tern_dp_sample_norms(dp, s.input, s.labels, s.n, norms, sq), TERN_OK);
    /* Deterministic: the same call gives the same bits. */
    float again[6];
    assert_int_equal(tern_dp_sample_norms(dp, s.input, s.labels, s.n, again, NULL), TERN_OK);
    assert_memory_equal(norms, again, sizeof norms);

    float *g = oracle_grads(&s);
    double *want = malloc(sizeof(double) * s.ntensors);
    assert_non_null(want);
    const char *kinds[] = {"linear", "se_linear", "groupnorm", "stem", "depthwise", "pointwise"};
    int seen[6] = {0};
    for (int i = 0; i < s.n; i++) {
        tensor_sq_norms(&s, g + (size_t)i * s.nparams, want);
        double total = 0;
        for (size_t k = 0; k < s.ntensors; k++)
            total += want[k];
        size_t k = 0;
        for (size_t j = 0; j < tern_model_tensor_count(s.model); j++) {
            const tern_model_tensor *t = tern_model_tensor_at(s.model, j);
            if (t->kind != TERN_TENSOR_PARAM)
                continue;
            double got = sq[(size_t)i * s.ntensors + k], w = want[k];
            if (!(fabs(got - w) <= 2e-3 * w + 1e-7 * total))
                fail_msg("threads %d isa %s sample %d %s (%s): squared norm %.9g, oracle %.9g",
                         threads, tern_isa_name(isa), i, t->name, layer_kind(t), got, w);
            for (int q = 0; q < 6; q++)
                seen[q] += w > 1e-6 * total && strcmp(layer_kind(t), kinds[q]) == 0;
            k++;
        }
        if (!(fabs(norms[i] - sqrt(total)) <= 1e-3 * sqrt(total)))
            fail_msg("sample %d: norm %.9g, oracle %.9g", i, (double)norms[i], sqrt(total));
    }
    for (int q = 0; q < 6; q++)
        if (!seen[q])
            fail_msg("no %s tensor with a gradient was checked", kinds[q]);
    free(want);
    free(g);
    free(sq);
    tern_dp_destroy(&dp);
    setup_close(&s);
}

static void norms_1_thread(void **state)
{
    (void)state;
    check_norms(1, TERN_ISA_AUTO);
}
static void norms_2_threads(void **state)
{
    (void)state;
    check_norms(2, TERN_ISA_AUTO);
}
static void norms_scalar(void **state)
{
    (void)state;
    check_norms(2, TERN_ISA_SCALAR);
}
static void norms_avx2(void **state)
{
    (void)state;
    if (tern_isa_resolve(TERN_ISA_AVX2) != TERN_ISA_AVX2)
        skip();
    check_norms(1, TERN_ISA_AVX2);
}

/* The clipped sum against the oracle's individually clipped gradients; batch > the plan (two
 * chunks) when max_batch < n. */
static void check_clipped_sum(int threads, int n, int max_batch)
{
    setup s;
    setup_open(&s, threads, TERN_ISA_AUTO, n, max_batch);
    float *g = oracle_grads(&s);
    double *norm = malloc(sizeof(double) * (size_t)n), *sorted = malloc(sizeof(double) * (size_t)n);
    assert_non_null(norm);
    assert_non_null(sorted);
    for (int i = 0; i < n; i++) {
        double a = 0;
        for (size_t j = 0; j < s.nparams; j++)
            a += (double)g[(size_t)i * s.nparams + j] * g[(size_t)i * s.nparams + j];
        norm[i] = sorted[i] = sqrt(a);
    }
    /* C between the smallest norm and sample 0's (or the largest): some samples are clipped,
     * some not, sample 0 among the clipped unless it has the smallest norm. */
    double lo = sorted[0], hi = sorted[0];
    for (int i = 1; i < n; i++) {
        lo = fmin(lo, sorted[i]);
        hi = fmax(hi, sorted[i]);
    }
    double c = 0.5 * (lo + (norm[0] > lo ? norm[0] : hi));
    float *want = calloc(s.nparams, sizeof(float));
    assert_non_null(want);
    int clipped = 0;
    for (int i = 0; i < n; i++) {
        double f = fmin(1.0, c / (norm[i] + 1e-6));
        clipped += f < 1;
        for (size_t j = 0; j < s.nparams; j++)
            want[j] += (float)(f * g[(size_t)i * s.nparams + j]);
    }
    assert_true(clipped > 0 && clipped < n);

    /* sigma 0 and expected batch 1: the gradient is the clipped sum itself. */
    tern_dp *dp = make_dp(s.model, c, 0.0, 0.5, 1.0);
    float loss;
    assert_int_equal(tern_dp_step_grads(dp, s.input, s.labels, n, &loss), TERN_OK);
    assert_true(isfinite(loss) && loss > 0);
    char what[64];
    snprintf(what, sizeof what, "clipped sum (threads %d, batch %d of %d)", threads, n, max_batch);
    assert_true(test_close(what, tern_model_grads(s.model), want, s.nparams, 2e-3f, 1e-6f));
    /* The last chunk's factors bring every norm to at most C. */
    int count;
    const float *f = tern_dp_last_factors(dp, &count);
    int first = n - count;
    for (int i = 0; i < count; i++) {
        double clipped_norm = f[i] * norm[first + i];
        if (!(clipped_norm <= c * (1 + 1e-3)))
            fail_msg("sample %d: clipped norm %.9g > C %.9g", first + i, clipped_norm, c);
        if (!(fabs(f[i] - fmin(1.0, c / (norm[first + i] + 1e-6))) <= 1e-3))
            fail_msg("sample %d: factor %g", first + i, (double)f[i]);
    }
    /* Without noise the budget is unbounded. */
    double eps;
    assert_int_equal(tern_dp_epsilon(dp, 1e-5, &eps), TERN_OK);
    assert_true(isinf(eps));
    free(want);
    free(norm);
    free(sorted);
    free(g);
    tern_dp_destroy(&dp);
    setup_close(&s);
}

static void clipped_sum_1_thread(void **state)
{
    (void)state;
    check_clipped_sum(1, 6, 6);
}
static void clipped_sum_2_threads_chunked(void **state)
{
    (void)state;
    check_clipped_sum(2, 7, 4);
}

/* With a large C nothing is clipped: the result is the batch's summed gradient / E. */
static void large_c_is_plain_gradient(void **state)
{
    (void)state;
    setup s;
    setup_open(&s, 1, TERN_ISA_AUTO, 4, 4);
    float logits[4 * CLASSES], dlogits[4 * CLASSES], loss;
    tern_model_zero_grad(s.model);
    assert_int_equal(tern_model_forward(s.model, logits, s.input, 4, true), TERN_OK);
    assert_int_equal(tern_cross_entropy_loss(&loss, dlogits, logits, s.labels, 4, CLASSES, 0.0f),
                     TERN_OK);
    assert_int_equal(tern_model_backward(s.model, dlogits), TERN_OK);
    float *want = malloc(sizeof(float) * s.nparams);
    assert_non_null(want);
    memcpy(want, tern_model_grads(s.model), sizeof(float) * s.nparams); /* mean over 4 */
    tern_dp *dp = make_dp(s.model, 1e9, 0.0, 0.5, 4.0);
    float dp_loss;
    assert_int_equal(tern_dp_step_grads(dp, s.input, s.labels, 4, &dp_loss), TERN_OK);
    assert_true(fabsf(dp_loss - loss) <= 1e-5f * loss);
    assert_true(test_close("unclipped DP gradient", tern_model_grads(s.model), want, s.nparams,
                           1e-4f, 1e-6f));
    free(want);
    tern_dp_destroy(&dp);
    setup_close(&s);
}

/* An empty batch is noise only: N(0, (sigma C / E)^2) on every coordinate. */
static void noise_statistics(void **state)
{
    (void)state;
    tern_model *m = tiny_model(1, TERN_ISA_AUTO, TERN_NORM_GROUP);
    assert_int_equal(tern_model_plan(m, 2, SIZE, SIZE, true), TERN_OK);
    const double c = 2.5, sigma = 1.3, e = 16.0, q = 0.01;
    tern_dp *dp = make_dp(m, c, sigma, q, e);
    const size_t np = tern_model_param_count(m);
    const double std = sigma * c / e;
    double sum = 0, sum2 = 0, sum4 = 0;
    size_t within1 = 0, beyond3 = 0, tail = 0, count = 0;
    int steps = 0;
    while (count < 400000) {
        float loss = -1;
        assert_int_equal(tern_dp_step_grads(dp, NULL, NULL, 0, &loss), TERN_OK);
        assert_true(loss == 0.0f);
        steps++;
        const float *g = tern_model_grads(m);
        for (size_t i = 0; i < np; i++) {
            double z = g[i] / std;
            sum += z;
            sum2 += z * z;
            sum4 += z * z * z * z;
            within1 += fabs(z) < 1;
            beyond3 += fabs(z) > 3;
            tail += fabs(z) > 3.442619855899; /* the ziggurat's tail region */
        }
        count += np;
    }
    double n = (double)count, mean = sum / n, var = sum2 / n - mean * mean;
    /* Mean: standard error 1/sqrt(n). Variance: n var ~ chi-square(n - 1), standard error
     * sqrt(2 / n). Kurtosis 3 (standard error sqrt(24 / n)), P(|z| < 1) = 0.682689 (binomial).
     * Five standard errors each, and the same for the tails beyond 3 and beyond the ziggurat's
     * R = 3.4426. */
    if (!(fabs(mean) < 5 / sqrt(n)))
        fail_msg("noise mean %g (in units of sigma C / E), bound %g", mean, 5 / sqrt(n));
    if (!(fabs(var - 1) < 5 * sqrt(2 / n)))
        fail_msg("noise variance ratio %g, bound 1 +- %g", var, 5 * sqrt(2 / n));
    if (!(fabs(sum4 / n - 3) < 5 * sqrt(96 / n)))
        fail_msg("noise kurtosis %g", sum4 / n);
    double p1 = 0.682689492137, frac = (double)within1 / n;
    if (!(fabs(frac - p1) < 5 * sqrt(p1 * (1 - p1) / n)))
        fail_msg("P(|z| < 1) = %g", frac);
    double p3 = 0.002699796063, pt = 2 * 0.5 * erfc(3.442619855899 / sqrt(2.0));
    if (!(fabs((double)beyond3 / n - p3) < 5 * sqrt(p3 / n)))
        fail_msg("P(|z| > 3) = %g, expected %g", (double)beyond3 / n, p3);
    if (!(fabs((double)tail / n - pt) < 5 * sqrt(pt / n)))
        fail_msg("P(|z| > R) = %g, expected %g", (double)tail / n, pt);
    /* Every step was recorded, and the epsilon is the accountant's for that history. */
    assert_int_equal(tern_dp_steps(dp), steps);
    tern_dp_entry entry;
    assert_int_equal(tern_accountant_history_count(tern_dp_accountant(dp)), 1);
    assert_int_equal(tern_accountant_history_at(tern_dp_accountant(dp), 0, &entry), TERN_OK);
    assert_int_equal(entry.steps, steps);
    assert_true(entry.noise_multiplier == sigma && entry.sample_rate == q);
    double eps, want;
    assert_int_equal(tern_dp_epsilon(dp, 1e-5, &eps), TERN_OK);
    tern_accountant *a = NULL;
    assert_int_equal(tern_accountant_create(&(tern_accountant_options){0}, &a, NULL), TERN_OK);
    assert_int_equal(tern_accountant_add(a, sigma, q, steps), TERN_OK);
    assert_int_equal(tern_accountant_epsilon(a, 1e-5, &want), TERN_OK);
    assert_true(eps > 0 && eps == want);
    tern_accountant_destroy(&a);
    tern_dp_destroy(&dp);
    tern_model_destroy(&m);
}

/* Same seed, same noise; another seed, other noise. */
static void noise_is_seeded(void **state)
{
    (void)state;
    tern_model *m = tiny_model(1, TERN_ISA_AUTO, TERN_NORM_GROUP);
    assert_int_equal(tern_model_plan(m, 2, SIZE, SIZE, true), TERN_OK);
    const size_t np = tern_model_param_count(m);
    float *first = malloc(sizeof(float) * np);
    assert_non_null(first);
    for (int round = 0; round < 3; round++) {
        tern_dp *dp = NULL;
        tern_dp_options o = {.max_grad_norm = 1, .noise_multiplier = 1, .sample_rate = 0.1,
                             .expected_batch = 1, .seed = round == 2 ? 99 : 98};
        assert_int_equal(tern_dp_create(m, &o, &dp, NULL), TERN_OK);
        assert_int_equal(tern_dp_step_grads(dp, NULL, NULL, 0, NULL), TERN_OK);
        if (round == 0)
            memcpy(first, tern_model_grads(m), sizeof(float) * np);
        else if (round == 1)
            assert_memory_equal(first, tern_model_grads(m), sizeof(float) * np);
        else
            assert_memory_not_equal(first, tern_model_grads(m), sizeof(float) * np);
        tern_dp_destroy(&dp);
    }
    free(first);
    tern_model_destroy(&m);
}

/* Poisson sampling: batch sizes binomial(N, q), indices increasing and in range. */
static void poisson_sampling(void **state)
{
    (void)state;
    tern_model *m = tiny_model(1, TERN_ISA_AUTO, TERN_NORM_GROUP);
    const size_t n = 20000;
    const double q = 0.005;
    tern_dp *dp = make_dp(m, 1, 1, q, q * (double)n);
    size_t *idx = malloc(sizeof(size_t) * n);
    assert_non_null(idx);
    const int draws = 400;
    double sum = 0, sum2 = 0;
    size_t hits_low = 0, hits_high = 0;
    for (int d = 0; d < draws; d++) {
        size_t k;
        assert_int_equal(tern_dp_sample(dp, n, idx, &k), TERN_OK);
        for (size_t i = 0; i < k; i++) {
            assert_true(idx[i] < n);
            assert_true(i == 0 || idx[i] > idx[i - 1]);
            hits_low += idx[i] < n / 2;
            hits_high += idx[i] >= n / 2;
        }
        sum += (double)k;
        sum2 += (double)k * (double)k;
    }
    double mean = sum / draws, var = sum2 / draws - mean * mean;
    double want = q * (double)n, want_var = want * (1 - q);
    if (!(fabs(mean - want) < 5 * sqrt(want_var / draws)))
        fail_msg("mean batch %g, expected %g", mean, want);
    /* Variance of the sample variance of a near-normal: 2 sigma^4 / draws. */
    if (!(fabs(var - want_var) < 5 * want_var * sqrt(2.0 / draws)))
        fail_msg("batch-size variance %g, expected %g", var, want_var);
    double total = (double)(hits_low + hits_high);
    assert_true(fabs((double)hits_low - total / 2) < 5 * sqrt(total / 4));
    /* A small data set at a small rate gives empty batches. */
    int empty = 0;
    for (int d = 0; d < 200; d++) {
        size_t k;
        assert_int_equal(tern_dp_sample(dp, 10, idx, &k), TERN_OK);
        empty += k == 0;
    }
    assert_true(empty > 150); /* P(empty) = 0.995^10 = 0.951 */
    free(idx);
    tern_dp_destroy(&dp);
    tern_model_destroy(&m);
}

static void batchnorm_refused(void **state)
{
    (void)state;
    tern_model *m = tiny_model(1, TERN_ISA_AUTO, TERN_NORM_BATCH);
    tern_dp *dp = NULL;
    tern_error err = {{0}};
    tern_dp_options o = {.max_grad_norm = 1, .noise_multiplier = 1, .sample_rate = 0.01,
                         .expected_batch = 10};
    assert_int_equal(tern_dp_create(m, &o, &dp, &err), TERN_ERR_INVALID);
    assert_null(dp);
    assert_non_null(strstr(err.message, "BatchNorm"));
    assert_non_null(strstr(err.message, "GroupNorm"));
    tern_model_destroy(&m);
}

static void invalid_use(void **state)
{
    (void)state;
    tern_model *m = tiny_model(1, TERN_ISA_AUTO, TERN_NORM_GROUP);
    tern_dp *dp = NULL;
    tern_dp_options good = {.max_grad_norm = 1, .noise_multiplier = 1, .sample_rate = 0.01,
                            .expected_batch = 10};
    tern_dp_options bad[] = {good, good, good, good, good, good};
    bad[0].max_grad_norm = 0;
    bad[1].noise_multiplier = -1;
    bad[2].sample_rate = 0;
    bad[3].sample_rate = 1.5;
    bad[4].expected_batch = 0;
    bad[5].label_smoothing = 2;
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_int_equal(tern_dp_create(m, &bad[i], &dp, NULL), TERN_ERR_INVALID);
    assert_int_equal(tern_dp_create(NULL, &good, &dp, NULL), TERN_ERR_INVALID);
    assert_int_equal(tern_dp_create(m, &good, &dp, NULL), TERN_OK);
    float x[2 * SIZE * SIZE] = {0}, norms[2];
    int32_t y[2] = {3, 4};
    /* No plan, then an inference plan: a training plan is needed. */
    assert_int_equal(tern_dp_step_grads(dp, x, y, 1, NULL), TERN_ERR_STATE);
    assert_non_null(strstr(tern_dp_last_error(dp), "training plan"));
    assert_int_equal(tern_model_plan(m, 1, SIZE, SIZE, false), TERN_OK);
    assert_int_equal(tern_dp_step_grads(dp, x, y, 1, NULL), TERN_ERR_STATE);
    assert_int_equal(tern_model_plan(m, 1, SIZE, SIZE, true), TERN_OK);
    y[0] = CLASSES;
    assert_int_equal(tern_dp_step_grads(dp, x, y, 1, NULL), TERN_ERR_INVALID);
    y[0] = 3;
    assert_int_equal(tern_dp_step_grads(dp, x, y, -1, NULL), TERN_ERR_INVALID);
    assert_int_equal(tern_dp_sample_norms(dp, x, y, 2, norms, NULL), TERN_ERR_INVALID);
    assert_int_equal(tern_dp_step_grads(dp, x, y, 2, NULL), TERN_OK); /* two chunks of 1 */
    double eps;
    assert_int_equal(tern_dp_epsilon(dp, 0, &eps), TERN_ERR_INVALID);
    tern_dp_destroy(&dp);
    tern_dp_destroy(&dp); /* NULL is fine */
    tern_model_destroy(&m);
}

/* Every allocation failure in create and in the first step is reported as TERN_ERR_NOMEM. */
static void allocation_failures(void **state)
{
    (void)state;
    for (long fail = 1;; fail++) {
        test_alloc_state st = {0};
        tern_allocator alloc = test_failing_allocator(&st);
        tern_model_options o = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
        o.width_mult = 0.25;
        o.in_channels = 1;
        o.num_classes = CLASSES;
        o.norm = TERN_NORM_GROUP;
        o.alloc = &alloc;
        tern_model *m = NULL;
        assert_int_equal(tern_model_create(&o, &m, NULL), TERN_OK);
        assert_int_equal(tern_model_plan(m, 2, SIZE, SIZE, true), TERN_OK);
        long base = st.count;
        st.fail_at = base + fail;
        tern_dp *dp = NULL;
        tern_dp_options dpo = {.max_grad_norm = 1, .noise_multiplier = 1, .sample_rate = 0.01,
                               .expected_batch = 2};
        tern_status s = tern_dp_create(m, &dpo, &dp, NULL);
        float x[2 * SIZE * SIZE] = {0};
        int32_t y[2] = {1, 2};
        if (s == TERN_OK)
            s = tern_dp_step_grads(dp, x, y, 2, NULL);
        bool done = st.count < st.fail_at;
        if (!done)
            assert_int_equal(s, TERN_ERR_NOMEM);
        else
            assert_int_equal(s, TERN_OK);
        tern_dp_destroy(&dp);
        tern_model_destroy(&m);
        assert_int_equal(st.live, 0);
        if (done)
            break;
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(norms_1_thread),
        cmocka_unit_test(norms_2_threads),
        cmocka_unit_test(norms_scalar),
        cmocka_unit_test(norms_avx2),
        cmocka_unit_test(clipped_sum_1_thread),
        cmocka_unit_test(clipped_sum_2_threads_chunked),
        cmocka_unit_test(large_c_is_plain_gradient),
        cmocka_unit_test(noise_statistics),
        cmocka_unit_test(noise_is_seeded),
        cmocka_unit_test(poisson_sampling),
        cmocka_unit_test(batchnorm_refused),
        cmocka_unit_test(invalid_use),
        cmocka_unit_test(allocation_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
