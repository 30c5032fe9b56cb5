/* Model life cycle, optimizer and checkpoint tests (no fixtures needed).
 *
 * What the golden tests do not cover: option and call-order validation, allocation failure at
 * every allocation, determinism (same seed, same thread count => same bits), torchvision's
 * initialisation statistics, parameter counts, that training actually lowers the loss, dropout
 * and GroupNorm behaviour, SGD over several steps against a double-precision reference, strict
 * safetensors loading (and that a failed load changes nothing), and two models side by side.
 *
 * Models are small (Small, width 0.25, 32x32 inputs) so the whole program stays fast under
 * AddressSanitizer; only the initialisation and parameter-count tests build full-size networks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nn/model_graph.h"
#include "tern.h"
#include "testutil.h"

#define H 32
#define W 32

/* ---- helpers ------------------------------------------------------------------------------- */

static tern_model_options small_options(uint64_t seed)
{
    tern_model_options o = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    o.width_mult = 0.25;
    o.num_classes = 5;
    o.dropout = 0.0f;
    o.seed = seed;
    return o;
}

static tern_model *create(const tern_model_options *opt)
{
    tern_model *m = NULL;
    tern_error err = {{0}};
    if (tern_model_create(opt, &m, &err) != TERN_OK)
        fail_msg("tern_model_create: %s", err.message);
    assert_non_null(m);
    return m;
}

static tern_sgd *sgd_create(tern_model *m, tern_sgd_options so)
{
    tern_sgd *sgd = NULL;
    tern_error err = {{0}};
    if (tern_sgd_create(m, &so, &sgd, &err) != TERN_OK)
        fail_msg("tern_sgd_create: %s", err.message);
    return sgd;
}

/* A batch of n images (n, H, W, c) uniform in [-1, 1) and labels in [0, k). */
typedef struct batch {
    int n, c, k;
    float *input;
    int32_t *labels;
    float *logits, *dlogits;
} batch;

static batch batch_make(uint64_t seed, int n, int c, int k)
{
    test_rng r = {seed};
    batch b = {.n = n, .c = c, .k = k};
    size_t count = (size_t)n * H * W * (size_t)c;
    b.input = malloc(count * sizeof(float));
    b.labels = malloc((size_t)n * sizeof(int32_t));
    b.logits = calloc((size_t)n * (size_t)k, sizeof(float));
    b.dlogits = calloc((size_t)n * (size_t)k, sizeof(float));
    assert_non_null(b.input);
    assert_non_null(b.labels);
    assert_non_null(b.logits);
    assert_non_null(b.dlogits);
    test_fill_uniform(&r, b.input, count, -1.0f, 1.0f);
    for (int i = 0; i < n; i++)
        b.labels[i] = test_rng_int(&r, 0, k - 1);
    return b;
}

static void batch_free(batch *b)
{
    free(b->input);
    free(b->labels);
    free(b->logits);
    free(b->dlogits);
}

/* Forward (training), loss, zero_grad, backward, SGD step; returns the loss before the step. */
static float train_step(tern_model *m, tern_sgd *sgd, batch *b)
{
    float loss = 0;
    assert_int_equal(tern_model_forward(m, b->logits, b->input, b->n, true), TERN_OK);
    assert_int_equal(tern_cross_entropy_loss(&loss, b->dlogits, b->logits, b->labels, b->n, b->k,
                                             0.0f),
                     TERN_OK);
    tern_model_zero_grad(m);
    assert_int_equal(tern_model_backward(m, b->dlogits), TERN_OK);
    tern_sgd_step(sgd);
    return loss;
}

static const tern_sgd_options MOMENTUM_SGD = {.lr = 0.05f, .momentum = 0.9f,
                                               .weight_decay = 1e-4f};

/* Every state_dict entry (parameters, buffers, counters) serialised into one block, so that two
 * models, or one model before and after something, compare with a single memcmp. */
typedef struct snapshot {
    size_t bytes;
    unsigned char *data;
} snapshot;

static snapshot snapshot_take(const tern_model *m)
{
    snapshot s = {0};
    for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(m, i);
        s.bytes += t->kind == TERN_TENSOR_COUNTER ? sizeof(int64_t) : t->count * sizeof(float);
    }
    s.data = malloc(s.bytes);
    assert_non_null(s.data);
    size_t at = 0;
    for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(m, i);
        if (t->kind == TERN_TENSOR_COUNTER) {
            memcpy(s.data + at, t->counter, sizeof(int64_t));
            at += sizeof(int64_t);
        } else {
            memcpy(s.data + at, t->data, t->count * sizeof(float));
            at += t->count * sizeof(float);
        }
    }
    return s;
}

/* Whether the model's state equals the snapshot; if not and `what` is given, names the first
 * state_dict entry that differs. */
static bool snapshot_matches(const snapshot *s, const tern_model *m, const char *what)
{
    snapshot now = snapshot_take(m);
    bool same = now.bytes == s->bytes && memcmp(now.data, s->data, s->bytes) == 0;
    if (!same && what && now.bytes == s->bytes) {
        size_t at = 0;
        for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
            const tern_model_tensor *t = tern_model_tensor_at(m, i);
            size_t n = t->kind == TERN_TENSOR_COUNTER ? sizeof(int64_t) : t->count * sizeof(float);
            if (memcmp(now.data + at, s->data + at, n) != 0) {
                fprintf(stderr, "%s: tensor %s differs\n", what, t->name);
                break;
            }
            at += n;
        }
    }
    free(now.data);
    return same;
}

static void snapshot_free(snapshot *s)
{
    free(s->data);
    s->data = NULL;
}

static bool all_finite(const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]))
            return false;
    return true;
}

/* ---- 1. option validation ------------------------------------------------------------------ */

static void create_rejects_bad_options(void **state)
{
    (void)state;
    struct {
        const char *what;
        tern_model_options opt;
    } cases[12];
    int n = 0;
    tern_model_options o;
#define BAD(label, field, value)                                                                 \
    do {                                                                                         \
        o = small_options(0);                                                                    \
        o.field = value;                                                                         \
        cases[n].what = label;                                                                   \
        cases[n++].opt = o;                                                                      \
    } while (0)
    BAD("width 0", width_mult, 0.0);
    BAD("width -1", width_mult, -1.0);
    BAD("width NaN", width_mult, NAN);
    BAD("in_channels 0", in_channels, 0);
    BAD("num_classes 0", num_classes, 0);
    BAD("num_classes -3", num_classes, -3);
    BAD("dropout 1", dropout, 1.0f);
    BAD("dropout -0.1", dropout, -0.1f);
    BAD("threads 0", threads, 0);
    BAD("unknown arch", arch, (tern_arch)7);
    BAD("unknown norm", norm, (tern_norm)9);
#undef BAD
    assert_true(n <= (int)(sizeof cases / sizeof *cases));

    tern_model *const sentinel = (tern_model *)(uintptr_t)0x1234;
    for (int i = 0; i < n; i++) {
        tern_model *m = NULL;
        tern_error err = {{0}};
        tern_status s = tern_model_create(&cases[i].opt, &m, &err);
        if (s != TERN_ERR_INVALID)
            fail_msg("%s: got %d (%s), want TERN_ERR_INVALID", cases[i].what, s,
                     tern_strerror(s));
        assert_null(m);
        if (err.message[0] == '\0')
            fail_msg("%s: no error message", cases[i].what);
        /* Untouched means untouched, not set to NULL; and err may be NULL. */
        m = sentinel;
        assert_int_equal(tern_model_create(&cases[i].opt, &m, NULL), TERN_ERR_INVALID);
        assert_ptr_equal(m, sentinel);
    }

    tern_model *m = NULL;
    assert_int_equal(tern_model_create(NULL, &m, NULL), TERN_ERR_INVALID);
    o = small_options(0);
    assert_int_equal(tern_model_create(&o, NULL, NULL), TERN_ERR_INVALID);
    assert_null(m);

    /* The boundaries themselves are accepted. */
    o = small_options(0);
    o.dropout = 0.99f;
    o.num_classes = 1;
    o.in_channels = 1;
    m = create(&o);
    assert_string_equal(tern_model_last_error(m), "");
    tern_model_destroy(&m);
    assert_null(m);
    tern_model_destroy(&m); /* accepts NULL */
    tern_model_destroy(NULL);
}

/* ---- 2. allocation failure ----------------------------------------------------------------- */

enum { CHILD_FAILED_CLEANLY = 10, CHILD_CREATED = 11, CHILD_WRONG_STATUS = 12, CHILD_LEAK = 13,
       CHILD_TOUCHED_OUT = 14, CHILD_NO_MESSAGE = 15 };

/* One creation attempt with allocation fail_at failing. Runs in a child process so that a crash
 * in the library's cleanup path is reported instead of killing the test program. */
static int create_attempt(long fail_at, int threads)
{
    test_alloc_state st = {.fail_at = fail_at};
    tern_allocator a = test_failing_allocator(&st);
    tern_model_options o = small_options(3);
    o.num_classes = 10;
    o.threads = threads;
    o.alloc = &a;
    tern_model *m = NULL;
    tern_error err = {{0}};
    tern_status s = tern_model_create(&o, &m, &err);
    if (s == TERN_OK) {
        tern_model_destroy(&m);
        return st.live == 0 ? CHILD_CREATED : CHILD_LEAK;
    }
    if (s != TERN_ERR_NOMEM) {
        fprintf(stderr, "fail_at %ld: status %d (%s): %s\n", fail_at, s, tern_strerror(s),
                err.message);
        return CHILD_WRONG_STATUS;
    }
    if (m != NULL)
        return CHILD_TOUCHED_OUT;
    if (st.live != 0) {
        fprintf(stderr, "fail_at %ld: %ld allocations leaked\n", fail_at, st.live);
        return CHILD_LEAK;
    }
    if (err.message[0] == '\0')
        return CHILD_NO_MESSAGE;
    return CHILD_FAILED_CLEANLY;
}

static void create_failures(int threads)
{
    int failures = 0;
    long fail_at;
    for (fail_at = 1; fail_at < 1000; fail_at++) {
        fflush(NULL);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            /* cmocka catches these to report a crashed test and carry on, which in a child
             * would run the rest of the suite; let the child simply die instead. */
            const int sigs[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
            for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++)
                signal(sigs[i], SIG_DFL);
            _exit(create_attempt(fail_at, threads));
        }
        int status = 0;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        if (code == CHILD_CREATED)
            break;
        if (code == CHILD_FAILED_CLEANLY) {
            failures++;
            continue;
        }
        if (code >= CHILD_WRONG_STATUS && code <= CHILD_NO_MESSAGE)
            fail_msg("%d thread(s), allocation %ld failing: check %d failed (12 status, 13 "
                     "leak, 14 *out touched, 15 no message)", threads, fail_at, code);
        /* Killed by a signal, or a sanitizer report (exit code 1). */
        fail_msg("tern_model_create crashed when allocation %ld failed (status 0x%x)", fail_at,
                 status);
    }
    assert_true(fail_at < 1000);
    /* The model itself, parameters, gradients, tables, the thread pool...: many allocations. */
    assert_true(failures >= 5);
}

static void alloc_failure_create(void **state)
{
    (void)state;
    create_failures(1);
    create_failures(2);
    /* Without failures the allocator sees no leak either (checked in the parent too). */
    assert_int_equal(create_attempt(0, 2), CHILD_CREATED);
}

static void alloc_failure_plan_and_sgd(void **state)
{
    (void)state;
    test_alloc_state st = {0};
    tern_allocator a = test_failing_allocator(&st);
    tern_model_options o = small_options(4);
    o.num_classes = 10;
    o.alloc = &a;
    tern_model *m = create(&o);
    long live_model = st.live;
    assert_true(live_model > 0);
    batch b = batch_make(40, 2, 3, 10);

    /* A failing plan: NOMEM, nothing leaked, no plan kept, the model still usable. */
    for (int round = 0; round < 2; round++) {
        st.fail_at = st.count + 1;
        assert_int_equal(tern_model_plan(m, 2, H, W, true), TERN_ERR_NOMEM);
        assert_true(tern_model_last_error(m)[0] != '\0');
        assert_int_equal(st.live, live_model);
        assert_int_equal(tern_model_plan_bytes(m), 0);
        assert_int_equal(tern_model_forward(m, b.logits, b.input, 2, false), TERN_ERR_STATE);
        /* The second round replaces a working plan with a failing one. */
        assert_int_equal(tern_model_plan(m, 2, H, W, true), TERN_OK);
        assert_true(tern_model_plan_bytes(m) > 0);
        assert_int_equal(tern_model_forward(m, b.logits, b.input, 2, true), TERN_OK);
        assert_int_equal(tern_model_backward(m, b.logits), TERN_OK);
        assert_true(all_finite(b.logits, 20));
    }
    long live_planned = st.live;

    /* SGD with momentum: fail each of its allocations in turn. */
    tern_sgd_options so = MOMENTUM_SGD;
    tern_sgd *const sentinel = (tern_sgd *)(uintptr_t)0x5678;
    int failures = 0;
    for (long k = 1;; k++) {
        assert_true(k < 100);
        st.fail_at = st.count + k;
        tern_sgd *sgd = sentinel;
        tern_error err = {{0}};
        tern_status s = tern_sgd_create(m, &so, &sgd, &err);
        if (s == TERN_OK) {
            assert_non_null(tern_sgd_momentum(sgd));
            tern_sgd_step(sgd);
            tern_sgd_destroy(&sgd);
            assert_null(sgd);
            break;
        }
        assert_int_equal(s, TERN_ERR_NOMEM);
        assert_ptr_equal(sgd, sentinel);
        assert_true(err.message[0] != '\0');
        assert_int_equal(st.live, live_planned);
        failures++;
    }
    assert_true(failures >= 2); /* the optimizer and its momentum buffer */
    assert_int_equal(st.live, live_planned);

    st.fail_at = 0;
    tern_model_destroy(&m);
    assert_int_equal(st.live, 0);
    batch_free(&b);
}


/* ---- 3. call order ------------------------------------------------------------------------- */

static void expect_status(tern_model *m, tern_status got, tern_status want, const char *what)
{
    if (got != want)
        fail_msg("%s: got %d (%s), want %d (%s)", what, got, tern_strerror(got), want,
                 tern_strerror(want));
    if (want != TERN_OK && tern_model_last_error(m)[0] == '\0')
        fail_msg("%s: no detail from tern_model_last_error", what);
}

static void call_order_errors(void **state)
{
    (void)state;
    tern_model_options o = small_options(5);
    tern_model *m = create(&o);
    batch b = batch_make(50, 3, 3, 5);
    assert_string_equal(tern_model_last_error(m), "");
    assert_int_equal(tern_model_plan_bytes(m), 0);

    expect_status(m, tern_model_forward(m, b.logits, b.input, 1, false), TERN_ERR_STATE,
                  "forward before plan");
    expect_status(m, tern_model_backward(m, b.dlogits), TERN_ERR_STATE, "backward before plan");

    /* An inference plan allows neither a training forward nor a backward. */
    assert_int_equal(tern_model_plan(m, 2, H, W, false), TERN_OK);
    size_t inference_bytes = tern_model_plan_bytes(m);
    assert_true(inference_bytes > 0);
    expect_status(m, tern_model_forward(m, b.logits, b.input, 2, true), TERN_ERR_STATE,
                  "training forward on an inference plan");
    expect_status(m, tern_model_forward(m, b.logits, b.input, 2, false), TERN_OK, "eval forward");
    expect_status(m, tern_model_backward(m, b.dlogits), TERN_ERR_STATE,
                  "backward after an eval forward");
    expect_status(m, tern_model_forward(m, b.logits, b.input, 0, false), TERN_ERR_INVALID,
                  "batch 0");
    expect_status(m, tern_model_forward(m, b.logits, b.input, -1, false), TERN_ERR_INVALID,
                  "batch -1");
    expect_status(m, tern_model_forward(m, b.logits, b.input, 3, false), TERN_ERR_INVALID,
                  "batch above the planned maximum");

    /* A training batch of one 32x32 image leaves BatchNorm one value per channel in the last
     * layers (1x1 spatial): refused, as PyTorch does. Eval is fine. */
    assert_int_equal(tern_model_plan(m, 2, H, W, true), TERN_OK);
    expect_status(m, tern_model_forward(m, b.logits, b.input, 1, true), TERN_ERR_INVALID,
                  "training batch 1 at 32x32");
    assert_non_null(strstr(tern_model_last_error(m), "more than one value per channel"));
    expect_status(m, tern_model_forward(m, b.logits, b.input, 1, false), TERN_OK,
                  "eval batch 1 at 32x32");
    expect_status(m, tern_model_forward(m, b.logits, b.input, 2, true), TERN_OK,
                  "training batch 2 at 32x32");

    /* Bad plans. */
    expect_status(m, tern_model_plan(m, 2, 31, W, false), TERN_ERR_INVALID, "height 31");
    expect_status(m, tern_model_plan(m, 2, H, 31, false), TERN_ERR_INVALID, "width 31");
    expect_status(m, tern_model_plan(m, 0, H, W, false), TERN_ERR_INVALID, "plan for batch 0");

    /* A training plan: backward needs a training forward first, and only the last forward
     * counts. */
    assert_int_equal(tern_model_plan(m, 3, H, W, true), TERN_OK);
    assert_true(tern_model_plan_bytes(m) > inference_bytes); /* gradients and saved state */
    expect_status(m, tern_model_backward(m, b.dlogits), TERN_ERR_STATE,
                  "backward without a forward");
    expect_status(m, tern_model_forward(m, b.logits, b.input, 3, true), TERN_OK,
                  "training forward");
    expect_status(m, tern_model_backward(m, b.dlogits), TERN_OK, "backward");
    expect_status(m, tern_model_forward(m, b.logits, b.input, 3, false), TERN_OK,
                  "eval forward on a training plan");
    expect_status(m, tern_model_backward(m, b.dlogits), TERN_ERR_STATE,
                  "backward after an eval forward on a training plan");
    expect_status(m, tern_model_forward(m, b.logits, b.input, 2, true), TERN_OK,
                  "smaller training batch");
    expect_status(m, tern_model_backward(m, b.dlogits), TERN_OK, "backward, smaller batch");
    /* A new plan forgets the last forward. */
    assert_int_equal(tern_model_plan(m, 3, H, W, true), TERN_OK);
    expect_status(m, tern_model_backward(m, b.dlogits), TERN_ERR_STATE, "backward after replan");

    /* Loss arguments. */
    float loss;
    int32_t bad_labels[3] = {0, 5, 1};
    assert_int_equal(tern_cross_entropy_loss(&loss, NULL, b.logits, bad_labels, 3, 5, 0.0f),
                     TERN_ERR_INVALID);
    bad_labels[1] = -1;
    assert_int_equal(tern_cross_entropy_loss(&loss, NULL, b.logits, bad_labels, 3, 5, 0.0f),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_cross_entropy_loss(&loss, NULL, b.logits, b.labels, 3, 5, 1.5f),
                     TERN_ERR_INVALID);

    tern_model_destroy(&m);
    batch_free(&b);
}

/* ---- 4. determinism ------------------------------------------------------------------------ */

/* Create a model and train it for `steps` steps on one batch (dropout on, so the masks are
 * part of what must repeat). */
static tern_model *trained_model(uint64_t seed, int threads, int steps, const batch *proto)
{
    tern_model_options o = small_options(seed);
    o.threads = threads;
    o.dropout = 0.2f;
    tern_model *m = create(&o);
    assert_int_equal(tern_model_plan(m, proto->n, H, W, true), TERN_OK);
    tern_sgd *sgd = sgd_create(m, MOMENTUM_SGD);
    batch b = *proto;
    for (int i = 0; i < steps; i++)
        train_step(m, sgd, &b);
    tern_sgd_destroy(&sgd);
    return m;
}

static void determinism(void **state)
{
    (void)state;
    batch b = batch_make(60, 4, 3, 5);

    /* Same options and seed: the same initial bits, whatever the thread count. */
    tern_model_options o = small_options(17);
    tern_model *a = create(&o);
    o.threads = 2;
    tern_model *c = create(&o);
    size_t np = tern_model_param_count(a);
    assert_int_equal(tern_model_param_count(c), np);
    assert_memory_equal(tern_model_params(a), tern_model_params(c), np * sizeof(float));
    /* A different seed: different weights (almost every element). */
    o.seed = 18;
    tern_model *d = create(&o);
    const float *pa = tern_model_params(a), *pd = tern_model_params(d);
    size_t differ = 0, nonzero = 0;
    for (size_t i = 0; i < np; i++) {
        differ += pa[i] != pd[i];
        nonzero += pa[i] != 0.0f && pa[i] != 1.0f;
    }
    assert_true(nonzero > np / 2);
    assert_true(differ >= nonzero * 99 / 100);
    tern_model_destroy(&a);
    tern_model_destroy(&c);
    tern_model_destroy(&d);

    /* Three training steps: parameters, running statistics and counters repeat exactly. */
    for (int threads = 1; threads <= 2; threads++) {
        tern_model *m1 = trained_model(17, threads, 3, &b);
        snapshot s1 = snapshot_take(m1);
        float logits1[4 * 5];
        memcpy(logits1, b.logits, sizeof logits1);
        tern_model *m2 = trained_model(17, threads, 3, &b);
        char what[64];
        snprintf(what, sizeof what, "determinism, %d thread(s)", threads);
        assert_true(snapshot_matches(&s1, m2, what));
        assert_memory_equal(b.logits, logits1, sizeof logits1);
        /* The steps did something: counters advanced and a running mean moved. */
        const tern_model_tensor *t = tern_model_find_tensor(m2, "features.0.1.num_batches_tracked");
        assert_non_null(t);
        assert_int_equal(*t->counter, 3);
        t = tern_model_find_tensor(m2, "features.0.1.running_mean");
        assert_non_null(t);
        assert_true(t->data[0] != 0.0f);
        /* And a different seed trains to a different state. */
        tern_model *m3 = trained_model(99, threads, 3, &b);
        snapshot s3 = snapshot_take(m3);
        assert_true(s3.bytes == s1.bytes && memcmp(s3.data, s1.data, s1.bytes) != 0);
        snapshot_free(&s1);
        snapshot_free(&s3);
        tern_model_destroy(&m1);
        tern_model_destroy(&m2);
        tern_model_destroy(&m3);
    }
    batch_free(&b);
}

/* ---- 5. initialisation statistics ---------------------------------------------------------- */

static void mean_std(const float *x, size_t n, double *mean, double *std)
{
    double s = 0, ss = 0;
    for (size_t i = 0; i < n; i++)
        s += x[i];
    *mean = s / (double)n;
    for (size_t i = 0; i < n; i++)
        ss += (x[i] - *mean) * (x[i] - *mean);
    *std = sqrt(ss / (double)n);
}

static void expect_normal(const tern_model *m, const char *name, double want_std, double tol)
{
    const tern_model_tensor *t = tern_model_find_tensor(m, name);
    if (!t)
        fail_msg("no tensor %s", name);
    double mean, std;
    mean_std(t->data, t->count, &mean, &std);
    if (fabs(std - want_std) > tol * want_std || fabs(mean) > 4 * want_std / sqrt((double)t->count))
        fail_msg("%s (%zu values): mean %.4g std %.4g, want mean 0 std %.4g", name, t->count, mean,
                 std, want_std);
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

static void init_statistics(void **state)
{
    (void)state;
    tern_model_options o = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    o.seed = 1234;
    tern_model *m = create(&o);

    /* Kaiming normal, fan_out = out_channels * k * k. */
    const tern_model_tensor *t = tern_model_find_tensor(m, "features.0.0.weight");
    assert_non_null(t);
    assert_int_equal(t->shape[0], 16);
    assert_int_equal(t->shape[1], 3);
    expect_normal(m, "features.0.0.weight", sqrt(2.0 / (16 * 3 * 3)), 0.10);
    /* Depthwise: fan_out is not divided by the groups. */
    t = tern_model_find_tensor(m, "features.2.block.1.0.weight");
    assert_non_null(t);
    assert_int_equal(t->ndim, 4);
    assert_int_equal(t->shape[0], 72);
    assert_int_equal(t->shape[1], 1);
    assert_int_equal(t->shape[2], 3);
    expect_normal(m, "features.2.block.1.0.weight", sqrt(2.0 / (72 * 9)), 0.10);
    expect_normal(m, "features.12.0.weight", sqrt(2.0 / 576), 0.10);        /* 1x1, 576x96 */
    expect_normal(m, "features.9.block.2.fc1.weight", sqrt(2.0 / 72), 0.10); /* SE conv */
    /* Linear layers: N(0, 0.01). */
    expect_normal(m, "classifier.0.weight", 0.01, 0.10);
    expect_normal(m, "classifier.3.weight", 0.01, 0.10);

    size_t convs = 0, biases = 0, norms = 0, counters = 0;
    for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
        t = tern_model_tensor_at(m, i);
        if (t->kind == TERN_TENSOR_COUNTER) {
            assert_true(ends_with(t->name, ".num_batches_tracked"));
            if (*t->counter != 0)
                fail_msg("%s = %lld, want 0", t->name, (long long)*t->counter);
            counters++;
            continue;
        }
        float want;
        if (ends_with(t->name, ".bias") || ends_with(t->name, ".running_mean"))
            want = 0.0f;
        else if (ends_with(t->name, ".running_var") || (t->ndim == 1 && ends_with(t->name, ".weight")))
            want = 1.0f;
        else {
            /* Every big convolution weight follows its own Kaiming std. */
            if (t->ndim == 4 && t->count >= 2000) {
                double fan_out = (double)(t->shape[0] * t->shape[2] * t->shape[3]);
                expect_normal(m, t->name, sqrt(2.0 / fan_out), 0.10);
                convs++;
            }
            continue;
        }
        for (size_t j = 0; j < t->count; j++)
            if (t->data[j] != want)
                fail_msg("%s[%zu] = %g, want %g", t->name, j, (double)t->data[j], (double)want);
        if (ends_with(t->name, ".bias"))
            biases++;
        else if (t->ndim == 1 && ends_with(t->name, ".weight"))
            norms++;
    }
    assert_true(convs > 20);
    assert_true(biases > 40);
    assert_true(norms > 30);
    assert_int_equal(counters, norms); /* one BatchNorm counter per norm layer */
    tern_model_destroy(&m);
}

/* ---- 6. parameter counts ------------------------------------------------------------------- */

static size_t param_count_of(tern_arch arch, int in_channels)
{
    tern_model_options o = tern_model_options_default(arch);
    o.in_channels = in_channels;
    tern_model *m = create(&o);
    size_t n = tern_model_param_count(m);
    /* The PARAM views tile the flat block, in order, without gaps. */
    size_t at = 0;
    float *p = tern_model_params(m), *g = tern_model_grads(m);
    for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(m, i);
        if (t->kind != TERN_TENSOR_PARAM)
            continue;
        assert_ptr_equal(t->data, p + at);
        assert_ptr_equal(t->grad, g + at);
        at += t->count;
    }
    assert_int_equal(at, n);
    assert_null(tern_model_tensor_at(m, tern_model_tensor_count(m)));
    tern_model_destroy(&m);
    return n;
}

static void parameter_counts(void **state)
{
    (void)state;
    assert_int_equal(param_count_of(TERN_ARCH_MOBILENET_V3_SMALL, 3), 2542856);
    assert_int_equal(param_count_of(TERN_ARCH_MOBILENET_V3_LARGE, 3), 5483032);
    assert_int_equal(param_count_of(TERN_ARCH_MOBILENET_V3_SMALL, 1), 2542856 - 16 * 2 * 9);
}

/* ---- 7. training lowers the loss ----------------------------------------------------------- */

/* The brief asked for 10 steps; torchvision itself (same options, lr 0.05, momentum 0.9, batch 8
 * of 32x32 uniform noise) is only at 0.5 to 0.65 of the first loss after 10 steps, depending on
 * the seed, but at 0.04 to 0.16 after 15. So: 15 updates, then the loss of the 16th forward. */
#define LOSS_STEPS 16

static void loss_falls(void **state)
{
    (void)state;
    tern_model_options o = small_options(7);
    o.width_mult = 0.5;
    o.num_classes = 10;
    tern_model *m = create(&o);
    assert_int_equal(tern_model_plan(m, 8, H, W, true), TERN_OK);
    tern_sgd *sgd = sgd_create(m, (tern_sgd_options){.lr = 0.05f, .momentum = 0.9f});
    batch b = batch_make(70, 8, 3, 10);
    float first = 0, last = 0;
    for (int step = 0; step < LOSS_STEPS; step++) {
        last = train_step(m, sgd, &b);
        assert_true(isfinite(last));
        if (step == 0)
            first = last;
    }
    print_message("loss_falls: first %.4f last %.4f\n", (double)first, (double)last);
    assert_true(first > 1.5f); /* about log(10) at initialisation */
    if (!(last < 0.5f * first))
        fail_msg("loss went from %g to %g, want below half", (double)first, (double)last);
    tern_sgd_destroy(&sgd);
    tern_model_destroy(&m);
    batch_free(&b);
}

/* ---- 8. dropout ---------------------------------------------------------------------------- */

static void dropout_behaviour(void **state)
{
    (void)state;
    const int n = 2, k = 5;
    batch b = batch_make(80, n, 3, k);
    float logits2[2 * 5], logits_ref[2 * 5];
    tern_model_options o = small_options(8);
    o.dropout = 0.5f;
    tern_model *m = create(&o);
    o.dropout = 0.0f;
    tern_model *ref = create(&o); /* same seed, same weights, no dropout */
    assert_memory_equal(tern_model_params(m), tern_model_params(ref),
                        tern_model_param_count(m) * sizeof(float));
    assert_int_equal(tern_model_plan(m, n, H, W, true), TERN_OK);
    assert_int_equal(tern_model_plan(ref, n, H, W, true), TERN_OK);

    /* Training: each forward draws new masks. Without dropout the same two forwards agree. */
    assert_int_equal(tern_model_forward(m, b.logits, b.input, n, true), TERN_OK);
    assert_int_equal(tern_model_forward(m, logits2, b.input, n, true), TERN_OK);
    assert_true(memcmp(b.logits, logits2, sizeof logits2) != 0);
    assert_int_equal(tern_model_forward(ref, b.logits, b.input, n, true), TERN_OK);
    assert_int_equal(tern_model_forward(ref, logits2, b.input, n, true), TERN_OK);
    assert_memory_equal(b.logits, logits2, sizeof logits2);

    /* Eval: no dropout, so deterministic and equal to the model without dropout. */
    assert_int_equal(tern_model_forward(m, b.logits, b.input, n, false), TERN_OK);
    assert_int_equal(tern_model_forward(m, logits2, b.input, n, false), TERN_OK);
    assert_memory_equal(b.logits, logits2, sizeof logits2);
    assert_int_equal(tern_model_forward(ref, logits_ref, b.input, n, false), TERN_OK);
    assert_memory_equal(b.logits, logits_ref, sizeof logits_ref);

    /* Backward through the mask of the last forward. With a gradient on sample 0 only,
     * d classifier.3.weight[c][j] = dlogits[0][c] * mask[0][j] * hidden[0][j], and the model
     * without dropout has the same hidden values: each column is either 0 (dropped) or exactly
     * twice the reference (kept, scaled by 1 / (1 - p)). */
    float dlogits[2 * 5] = {0.3f, -0.2f, 0.25f, -0.5f, 0.15f, 0, 0, 0, 0, 0};
    assert_int_equal(tern_model_forward(m, b.logits, b.input, n, true), TERN_OK);
    assert_int_equal(tern_model_forward(ref, logits_ref, b.input, n, true), TERN_OK);
    tern_model_zero_grad(m);
    tern_model_zero_grad(ref);
    assert_int_equal(tern_model_backward(m, dlogits), TERN_OK);
    assert_int_equal(tern_model_backward(ref, dlogits), TERN_OK);
    assert_true(all_finite(tern_model_grads(m), tern_model_param_count(m)));
    const tern_model_tensor *gm = tern_model_find_tensor(m, "classifier.3.weight");
    const tern_model_tensor *gr = tern_model_find_tensor(ref, "classifier.3.weight");
    assert_non_null(gm);
    assert_non_null(gr);
    /* Further up, the dropout backward must apply the same mask: classifier.0.bias gets
     * mask[0][j] * hardswish'(z[0][j]) * (W3^T dlogits[0])[j]. */
    const tern_model_tensor *bm = tern_model_find_tensor(m, "classifier.0.bias");
    const tern_model_tensor *br = tern_model_find_tensor(ref, "classifier.0.bias");
    assert_non_null(bm);
    assert_non_null(br);
    int hidden = (int)gm->shape[1], dropped = 0, kept = 0;
    assert_int_equal(bm->count, (size_t)hidden);
    for (int j = 0; j < hidden; j++) {
        bool zero = true, twice = true;
        for (int c = 0; c < k; c++) {
            float got = gm->grad[(size_t)c * hidden + j], want = gr->grad[(size_t)c * hidden + j];
            zero = zero && got == 0.0f;
            twice = twice && fabsf(got - 2.0f * want) <= 1e-6f * fabsf(want) + 1e-12f;
        }
        if (zero)
            dropped++;
        else if (twice)
            kept++;
        else
            fail_msg("classifier.3.weight column %d: gradient neither 0 nor twice the "
                     "no-dropout gradient", j);
        float got = bm->grad[j], want = zero ? 0.0f : 2.0f * br->grad[j];
        if (!(fabsf(got - want) <= 1e-5f * fabsf(want) + 1e-12f))
            fail_msg("classifier.0.bias[%d] (unit %s): gradient %g, want %g", j,
                     zero ? "dropped" : "kept", (double)got, (double)want);
    }
    print_message("dropout: %d of %d hidden units dropped\n", dropped, hidden);
    assert_int_equal(dropped + kept, hidden);
    assert_true(dropped > hidden * 3 / 10 && dropped < hidden * 7 / 10);
    /* The no-dropout reference has no zero column, so the zeros above are the mask. */
    for (int j = 0; j < hidden; j++) {
        bool zero = true;
        for (int c = 0; c < k; c++)
            zero = zero && gr->grad[(size_t)c * hidden + j] == 0.0f;
        assert_false(zero);
    }
    tern_model_destroy(&m);
    tern_model_destroy(&ref);
    batch_free(&b);
}

/* ---- 9. GroupNorm -------------------------------------------------------------------------- */

static void group_norm_model(void **state)
{
    (void)state;
    const int n = 2;
    batch b = batch_make(90, n, 3, 5);
    float train[2 * 5], eval[2 * 5];
    for (int norm = 0; norm < 2; norm++) {
        tern_model_options o = small_options(9);
        o.norm = norm ? TERN_NORM_GROUP : TERN_NORM_BATCH;
        tern_model *m = create(&o);
        assert_non_null(tern_model_find_tensor(m, "features.0.1.weight"));
        assert_non_null(tern_model_find_tensor(m, "features.0.1.bias"));
        size_t buffers = 0;
        for (size_t i = 0; i < tern_model_tensor_count(m); i++)
            buffers += tern_model_tensor_at(m, i)->kind != TERN_TENSOR_PARAM;
        assert_int_equal(tern_model_plan(m, n, H, W, true), TERN_OK);
        assert_int_equal(tern_model_forward(m, train, b.input, n, true), TERN_OK);
        assert_int_equal(tern_model_forward(m, eval, b.input, n, false), TERN_OK);
        if (o.norm == TERN_NORM_GROUP) {
            assert_null(tern_model_find_tensor(m, "features.0.1.running_mean"));
            assert_null(tern_model_find_tensor(m, "features.0.1.running_var"));
            assert_null(tern_model_find_tensor(m, "features.0.1.num_batches_tracked"));
            assert_int_equal(buffers, 0);
            /* No running statistics: training and evaluation compute the same function. */
            assert_memory_equal(train, eval, sizeof eval);
            assert_true(all_finite(train, 10));
            assert_int_equal(tern_model_backward(m, b.dlogits), TERN_ERR_STATE); /* after eval */
        } else {
            assert_non_null(tern_model_find_tensor(m, "features.0.1.running_mean"));
            assert_true(buffers > 0);
            /* Control: with BatchNorm, batch statistics and running statistics differ. */
            assert_true(memcmp(train, eval, sizeof eval) != 0);
        }
        tern_model_destroy(&m);
    }
    batch_free(&b);
}

/* ---- 10. SGD ------------------------------------------------------------------------------- */

static void sgd_matches_torch_rule(tern_sgd_options so, const char *what)
{
    tern_model_options o = small_options(10);
    o.num_classes = 3;
    tern_model *m = create(&o);
    size_t np = tern_model_param_count(m);
    float *p = tern_model_params(m), *g = tern_model_grads(m);
    double *ref = malloc(np * sizeof(double)), *buf = calloc(np, sizeof(double));
    float *grad_copy = malloc(np * sizeof(float));
    assert_non_null(ref);
    assert_non_null(buf);
    assert_non_null(grad_copy);
    for (size_t i = 0; i < np; i++)
        ref[i] = p[i];
    tern_sgd *sgd = sgd_create(m, so);
    if (so.momentum > 0)
        assert_non_null(tern_sgd_momentum(sgd));
    else
        assert_null(tern_sgd_momentum(sgd));

    test_rng r = {1000};
    double lr = so.lr;
    for (int step = 0; step < 3; step++) {
        if (step == 2) {
            lr = 0.03;
            tern_sgd_set_lr(sgd, 0.03f);
        }
        test_fill_uniform(&r, g, np, -1.0f, 1.0f);
        memcpy(grad_copy, g, np * sizeof(float));
        for (size_t i = 0; i < np; i++) {
            double d = (double)g[i] + (double)so.weight_decay * ref[i];
            if (so.momentum > 0) {
                buf[i] = step == 0 ? d : so.momentum * buf[i] + (1.0 - so.dampening) * d;
                d = so.nesterov ? d + so.momentum * buf[i] : buf[i];
            }
            ref[i] -= lr * d;
        }
        tern_sgd_step(sgd);
        /* The step leaves the gradients alone. */
        assert_memory_equal(g, grad_copy, np * sizeof(float));
        const float *mom = tern_sgd_momentum(sgd);
        for (size_t i = 0; i < np; i++) {
            double err = fabs(p[i] - ref[i]);
            if (!(err <= 2e-6 + 2e-6 * fabs(ref[i])))
                fail_msg("%s, step %d, parameter %zu: got %.9g want %.9g", what, step + 1, i,
                         (double)p[i], ref[i]);
            if (mom && !(fabs(mom[i] - buf[i]) <= 2e-6 + 2e-6 * fabs(buf[i])))
                fail_msg("%s, step %d, momentum %zu: got %.9g want %.9g", what, step + 1, i,
                         (double)mom[i], buf[i]);
        }
    }
    tern_sgd_destroy(&sgd);
    assert_null(sgd);
    tern_model_destroy(&m);
    free(ref);
    free(buf);
    free(grad_copy);
}

static void sgd_semantics(void **state)
{
    (void)state;
    sgd_matches_torch_rule((tern_sgd_options){.lr = 0.1f, .momentum = 0.9f, .weight_decay = 0.01f},
                           "momentum");
    sgd_matches_torch_rule((tern_sgd_options){.lr = 0.1f, .momentum = 0.9f, .weight_decay = 0.01f,
                                              .nesterov = true},
                           "nesterov");
    sgd_matches_torch_rule((tern_sgd_options){.lr = 0.1f, .momentum = 0.9f, .dampening = 0.5f,
                                              .weight_decay = 0.01f},
                           "dampening");
    sgd_matches_torch_rule((tern_sgd_options){.lr = 0.1f, .weight_decay = 0.01f}, "plain");
}

static void sgd_rejects_bad_options(void **state)
{
    (void)state;
    tern_model_options o = small_options(11);
    tern_model *m = create(&o);
    const struct {
        const char *what;
        tern_sgd_options so;
    } cases[] = {
        {"lr 0", {.lr = 0.0f, .momentum = 0.9f}},
        {"lr -0.1", {.lr = -0.1f}},
        {"lr NaN", {.lr = NAN}},
        {"momentum -0.5", {.lr = 0.1f, .momentum = -0.5f}},
        {"weight decay -1", {.lr = 0.1f, .weight_decay = -1.0f}},
        {"dampening -1", {.lr = 0.1f, .momentum = 0.9f, .dampening = -1.0f}},
        {"nesterov without momentum", {.lr = 0.1f, .nesterov = true}},
        {"nesterov with dampening", {.lr = 0.1f, .momentum = 0.9f, .dampening = 0.1f,
                                     .nesterov = true}},
    };
    tern_sgd *const sentinel = (tern_sgd *)(uintptr_t)0x9abc;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        tern_sgd *sgd = sentinel;
        tern_error err = {{0}};
        tern_status s = tern_sgd_create(m, &cases[i].so, &sgd, &err);
        if (s != TERN_ERR_INVALID)
            fail_msg("%s: got %d, want TERN_ERR_INVALID", cases[i].what, s);
        assert_ptr_equal(sgd, sentinel);
        assert_true(err.message[0] != '\0');
    }
    tern_model_destroy(&m);
}

/* ---- 11. save and load --------------------------------------------------------------------- */

/* A mkdtemp directory per test; teardown removes it and whatever is left in it. */
static int tmpdir_setup(void **state)
{
    char *dir = malloc(64);
    if (!dir)
        return -1;
    snprintf(dir, 64, "/tmp/tern_test_model.XXXXXX");
    if (!mkdtemp(dir)) {
        free(dir);
        return -1;
    }
    *state = dir;
    return 0;
}

static int count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    closedir(d);
    return n;
}

static int tmpdir_teardown(void **state)
{
    char *dir = *state;
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        char path[512];
        while ((e = readdir(d))) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            unlink(path);
        }
        closedir(d);
    }
    int rc = rmdir(dir);
    free(dir);
    return rc;
}

/* Write m's state to path, leaving out `skip`, adding `extra`, and storing `retype` with dtype
 * `dtype` (values converted) instead of F32. */
static void write_variant(const tern_model *m, const char *path, const char *skip,
                          const char *extra, const char *retype, tern_dtype dtype)
{
    tern_safetensors_writer *w = NULL;
    assert_int_equal(tern_safetensors_writer_create(NULL, &w), TERN_OK);
    void *converted = NULL;
    if (!skip && !retype) {
        assert_int_equal(tern_model_add_state(m, w, ""), TERN_OK);
    } else {
        for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
            const tern_model_tensor *t = tern_model_tensor_at(m, i);
            if (skip && strcmp(t->name, skip) == 0)
                continue;
            tern_status s;
            if (retype && strcmp(t->name, retype) == 0) {
                assert_int_equal(t->kind, TERN_TENSOR_BUFFER);
                converted = malloc(t->count * 8);
                assert_non_null(converted);
                for (size_t j = 0; j < t->count; j++) {
                    if (dtype == TERN_DTYPE_F64)
                        ((double *)converted)[j] = t->data[j];
                    else
                        ((int32_t *)converted)[j] = (int32_t)t->data[j];
                }
                s = tern_safetensors_writer_add(w, t->name, dtype, t->ndim, t->shape, converted);
            } else if (t->kind == TERN_TENSOR_COUNTER) {
                s = tern_safetensors_writer_add(w, t->name, TERN_DTYPE_I64, 0, t->shape,
                                                t->counter);
            } else {
                s = tern_safetensors_writer_add(w, t->name, TERN_DTYPE_F32, t->ndim, t->shape,
                                                t->data);
            }
            assert_int_equal(s, TERN_OK);
        }
    }
    static const float extra_data[3] = {1, 2, 3};
    if (extra)
        assert_int_equal(tern_safetensors_writer_add(w, extra, TERN_DTYPE_F32, 1,
                                                     (const int64_t[]){3}, extra_data),
                         TERN_OK);
    tern_error err = {{0}};
    if (tern_safetensors_writer_write(w, path, &err) != TERN_OK)
        fail_msg("writing %s: %s", path, err.message);
    tern_safetensors_writer_destroy(&w);
    free(converted);
}

/* A failed load returns `want`, names `name` (and `also`, if given) and changes nothing. */
static void expect_load_fails(tern_model *m, const char *path, tern_status want, const char *name,
                              const char *also, const char *also2)
{
    snapshot before = snapshot_take(m);
    tern_error err = {{0}};
    tern_status s = tern_model_load_file(m, path, &err);
    if (s != want)
        fail_msg("loading %s: got %d (%s: %s), want %d", path, s, tern_strerror(s), err.message,
                 want);
    const char *needles[3] = {name, also, also2};
    for (int i = 0; i < 3; i++)
        if (needles[i] && !strstr(err.message, needles[i]))
            fail_msg("loading %s: message '%s' does not mention '%s'", path, err.message,
                     needles[i]);
    assert_true(snapshot_matches(&before, m, "state after a failed load"));
    snapshot_free(&before);
}

static void shape_string(char *buf, size_t len, const tern_model_tensor *t)
{
    snprintf(buf, len, "[%lld, %lld]", (long long)t->shape[0], (long long)t->shape[1]);
}

static void save_and_load(void **state)
{
    const char *dir = *state;
    char path[256], bad[256];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);

    /* A source model with non-default options, trained a step so that running statistics
     * and counters are not at their initial values. */
    tern_model_options o = small_options(21);
    o.width_mult = 0.35; /* not exactly representable: the metadata must round-trip it */
    o.in_channels = 2;
    o.num_classes = 7;
    tern_model *src = create(&o);
    batch b = batch_make(110, 2, 2, 7);
    assert_int_equal(tern_model_plan(src, 2, H, W, true), TERN_OK);
    tern_sgd *sgd = sgd_create(src, MOMENTUM_SGD);
    train_step(src, sgd, &b);
    train_step(src, sgd, &b);
    tern_sgd_destroy(&sgd);
    tern_error err = {{0}};
    if (tern_model_save_file(src, NULL, path, &err) != TERN_OK)
        fail_msg("save: %s", err.message);
    snapshot saved = snapshot_take(src);

    /* Metadata gives back the options (and leaves the other fields alone). */
    tern_safetensors *st = NULL;
    if (tern_safetensors_open(path, NULL, &st, &err) != TERN_OK)
        fail_msg("open: %s", err.message);
    assert_int_equal(tern_safetensors_count(st), tern_model_tensor_count(src));
    tern_model_options back = tern_model_options_default(TERN_ARCH_MOBILENET_V3_LARGE);
    back.norm = TERN_NORM_GROUP;
    back.seed = 77;
    back.threads = 2;
    assert_int_equal(tern_model_options_from_metadata(st, &back, &err), TERN_OK);
    assert_int_equal(back.arch, TERN_ARCH_MOBILENET_V3_SMALL);
    assert_true(back.width_mult == 0.35);
    assert_int_equal(back.in_channels, 2);
    assert_int_equal(back.num_classes, 7);
    assert_int_equal(back.norm, TERN_NORM_BATCH);
    assert_int_equal(back.seed, 77);
    assert_int_equal(back.threads, 2);
    tern_safetensors_close(&st);

    /* Load into a fresh model with other weights: every tensor comes back bit for bit. */
    o.seed = 22;
    tern_model *dst = create(&o);
    assert_false(snapshot_matches(&saved, dst, NULL));
    if (tern_model_load_file(dst, path, &err) != TERN_OK)
        fail_msg("load: %s", err.message);
    assert_true(snapshot_matches(&saved, dst, "round trip"));
    const tern_model_tensor *t = tern_model_find_tensor(dst, "features.0.1.num_batches_tracked");
    assert_non_null(t);
    assert_int_equal(*t->counter, 2);
    /* The loaded model computes what the saved one does. */
    float logits_src[2 * 7], logits_dst[2 * 7];
    assert_int_equal(tern_model_plan(dst, 2, H, W, false), TERN_OK);
    assert_int_equal(tern_model_forward(src, logits_src, b.input, 2, false), TERN_OK);
    assert_int_equal(tern_model_forward(dst, logits_dst, b.input, 2, false), TERN_OK);
    assert_memory_equal(logits_src, logits_dst, sizeof logits_dst);

    /* Another number of classes: the classifier's shape does not match. */
    o.num_classes = 8;
    tern_model *other = create(&o);
    char want_shape[64], file_shape[64];
    shape_string(want_shape, sizeof want_shape, tern_model_find_tensor(other, "classifier.3.weight"));
    shape_string(file_shape, sizeof file_shape, tern_model_find_tensor(src, "classifier.3.weight"));
    expect_load_fails(other, path, TERN_ERR_SHAPE, "'classifier.3.weight'", want_shape, file_shape);
    tern_model_destroy(&other);

    /* A missing tensor, an extra tensor, wrong dtypes: loaded into a model whose weights differ
     * from the file's, so that a partial load would show. */
    tern_model_destroy(&dst);
    o.num_classes = 7;
    o.seed = 24;
    dst = create(&o);
    const char *missing = "features.4.block.1.1.running_var";
    assert_non_null(tern_model_find_tensor(dst, missing));
    snprintf(bad, sizeof bad, "%s/missing.safetensors", dir);
    write_variant(src, bad, missing, NULL, NULL, TERN_DTYPE_F32);
    expect_load_fails(dst, bad, TERN_ERR_NOT_FOUND, missing, NULL, NULL);

    snprintf(bad, sizeof bad, "%s/extra.safetensors", dir);
    write_variant(src, bad, NULL, "features.99.weight", NULL, TERN_DTYPE_F32);
    expect_load_fails(dst, bad, TERN_ERR_FORMAT, "features.99.weight", NULL, NULL);

    const char *retyped = "features.3.block.0.1.running_mean";
    assert_non_null(tern_model_find_tensor(dst, retyped));
    snprintf(bad, sizeof bad, "%s/i32.safetensors", dir);
    write_variant(src, bad, NULL, NULL, retyped, TERN_DTYPE_I32); /* same byte count as F32 */
    expect_load_fails(dst, bad, TERN_ERR_SHAPE, retyped, NULL, NULL);
    snprintf(bad, sizeof bad, "%s/f64.safetensors", dir);
    write_variant(src, bad, NULL, NULL, retyped, TERN_DTYPE_F64);
    expect_load_fails(dst, bad, TERN_ERR_SHAPE, retyped, NULL, NULL);

    /* A GroupNorm model's file names its norm; loading it into a BatchNorm model fails on the
     * first missing running statistic. */
    tern_model_options go = small_options(23);
    go.norm = TERN_NORM_GROUP;
    tern_model *gn = create(&go);
    snprintf(bad, sizeof bad, "%s/group.safetensors", dir);
    if (tern_model_save_file(gn, NULL, bad, &err) != TERN_OK)
        fail_msg("save: %s", err.message);
    assert_int_equal(tern_safetensors_open(bad, NULL, &st, &err), TERN_OK);
    back = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    assert_int_equal(tern_model_options_from_metadata(st, &back, &err), TERN_OK);
    assert_int_equal(back.norm, TERN_NORM_GROUP);
    assert_true(back.width_mult == 0.25);
    tern_safetensors_close(&st);
    tern_model *bn = create(&(tern_model_options){.arch = TERN_ARCH_MOBILENET_V3_SMALL,
                                                  .width_mult = 0.25, .in_channels = 3,
                                                  .num_classes = 5, .threads = 1,
                                                  .bn_momentum = 0.01f});
    expect_load_fails(bn, bad, TERN_ERR_NOT_FOUND, "features.0.1.running_mean", NULL, NULL);
    tern_model_destroy(&bn);
    tern_model_destroy(&gn);

    /* A file that does not exist. */
    snprintf(bad, sizeof bad, "%s/absent.safetensors", dir);
    expect_load_fails(dst, bad, TERN_ERR_IO, NULL, NULL, NULL);

    /* The atomic writes left no temporary files behind. */
    assert_int_equal(count_entries(dir), 6);

    snapshot_free(&saved);
    tern_model_destroy(&src);
    tern_model_destroy(&dst);
    batch_free(&b);
}

/* ---- 12. two models side by side ----------------------------------------------------------- */

static void two_models_interleaved(void **state)
{
    (void)state;
    batch ba = batch_make(120, 4, 3, 5), bb = batch_make(121, 2, 3, 5);
    tern_model_options oa = small_options(31), ob = small_options(32);
    oa.threads = 1;
    oa.dropout = 0.2f;
    ob.threads = 2;
    ob.dropout = 0.3f;

    /* Each alone. */
    tern_model *a = create(&oa);
    assert_int_equal(tern_model_plan(a, 4, H, W, true), TERN_OK);
    tern_sgd *sa = sgd_create(a, MOMENTUM_SGD);
    float loss_a[3], loss_b[3];
    for (int i = 0; i < 3; i++)
        loss_a[i] = train_step(a, sa, &ba);
    snapshot alone_a = snapshot_take(a);
    tern_sgd_destroy(&sa);
    tern_model_destroy(&a);

    tern_model *b = create(&ob);
    assert_int_equal(tern_model_plan(b, 2, 40, 40, true), TERN_OK);
    tern_sgd *sb = sgd_create(b, MOMENTUM_SGD);
    float *input40 = malloc(sizeof(float) * 2 * 40 * 40 * 3);
    assert_non_null(input40);
    test_rng r = {122};
    test_fill_uniform(&r, input40, 2 * 40 * 40 * 3, -1.0f, 1.0f);
    float *input32 = bb.input;
    bb.input = input40;
    /* train_step plans nothing itself, so b runs at 40x40 on bb's labels. */
    for (int i = 0; i < 3; i++)
        loss_b[i] = train_step(b, sb, &bb);
    snapshot alone_b = snapshot_take(b);
    tern_sgd_destroy(&sb);
    tern_model_destroy(&b);

    /* Both alive, every call interleaved with the other model's. */
    a = create(&oa);
    b = create(&ob);
    assert_int_equal(tern_model_plan(a, 4, H, W, true), TERN_OK);
    assert_int_equal(tern_model_plan(b, 2, 40, 40, true), TERN_OK);
    sa = sgd_create(a, MOMENTUM_SGD);
    sb = sgd_create(b, MOMENTUM_SGD);
    for (int i = 0; i < 3; i++) {
        float la, lb;
        assert_int_equal(tern_model_forward(a, ba.logits, ba.input, ba.n, true), TERN_OK);
        assert_int_equal(tern_model_forward(b, bb.logits, bb.input, bb.n, true), TERN_OK);
        assert_int_equal(tern_cross_entropy_loss(&la, ba.dlogits, ba.logits, ba.labels, ba.n,
                                                 ba.k, 0.0f),
                         TERN_OK);
        assert_int_equal(tern_cross_entropy_loss(&lb, bb.dlogits, bb.logits, bb.labels, bb.n,
                                                 bb.k, 0.0f),
                         TERN_OK);
        tern_model_zero_grad(b);
        tern_model_zero_grad(a);
        assert_int_equal(tern_model_backward(b, bb.dlogits), TERN_OK);
        assert_int_equal(tern_model_backward(a, ba.dlogits), TERN_OK);
        tern_sgd_step(sa);
        tern_sgd_step(sb);
        assert_memory_equal(&la, &loss_a[i], sizeof la);
        assert_memory_equal(&lb, &loss_b[i], sizeof lb);
    }
    assert_true(snapshot_matches(&alone_a, a, "model a interleaved"));
    assert_true(snapshot_matches(&alone_b, b, "model b interleaved"));

    tern_sgd_destroy(&sa);
    tern_sgd_destroy(&sb);
    tern_model_destroy(&a);
    tern_model_destroy(&b);
    snapshot_free(&alone_a);
    snapshot_free(&alone_b);
    bb.input = input32;
    free(input40);
    batch_free(&ba);
    batch_free(&bb);
}

/* ---- 13. what inference needs, in the file's metadata --------------------------------------- */

static void model_info_round_trip(void **state)
{
    const char *dir = *state;
    char path[256];
    snprintf(path, sizeof path, "%s/info.safetensors", dir);
    tern_model_options o = small_options(3);
    o.num_classes = 3;
    tern_model *m = create(&o);
    char *names[3] = {"T-shirt/top", "caf\xc3\xa9 \"au lait\"", "x,y"};
    tern_model_info info = {.input_size = 64, .resize = 73, .mean = {0.5f, 0.25f, 0.125f},
                            .std = {0.2f, 0.3f, 0.4f}, .nclasses = 3, .class_names = names};
    tern_error err = {{0}};
    assert_int_equal(tern_model_save_file(m, &info, path, &err), TERN_OK);

    tern_safetensors *st = NULL;
    assert_int_equal(tern_safetensors_open(path, NULL, &st, &err), TERN_OK);
    tern_model_info back;
    assert_int_equal(tern_model_info_read(st, &back, &err), TERN_OK);
    assert_int_equal(back.input_size, 64);
    assert_int_equal(back.resize, 73);
    for (int i = 0; i < 3; i++) {
        assert_true(back.mean[i] == info.mean[i]);
        assert_true(back.std[i] == info.std[i]);
        assert_string_equal(back.class_names[i], names[i]);
    }
    assert_int_equal(back.nclasses, 3);
    tern_model_info_free(&back);
    assert_null(back.class_names);
    tern_safetensors_close(&st);

    /* Class names must match the classifier, be UTF-8 (a folder name need not be), and the
     * normalization finite: refused, not silently dropped. */
    info.nclasses = 2;
    assert_int_equal(tern_model_save_file(m, &info, path, &err), TERN_ERR_INVALID);
    assert_non_null(strstr(err.message, "2 class names for a 3-class model"));
    info.nclasses = 3;
    char latin1[] = "caf\xe9";
    names[1] = latin1;
    assert_int_equal(tern_model_save_file(m, &info, path, &err), TERN_ERR_INVALID);
    assert_non_null(strstr(err.message, "UTF-8"));
    names[1] = "ok";
    info.std[2] = NAN;
    assert_int_equal(tern_model_save_file(m, &info, path, &err), TERN_ERR_INVALID);

    /* A file without info reads as zeros; malformed lists are errors. */
    tern_safetensors_writer *w = NULL;
    assert_int_equal(tern_safetensors_writer_create(NULL, &w), TERN_OK);
    float one = 1;
    int64_t shape[1] = {1};
    assert_int_equal(tern_safetensors_writer_add(w, "x", TERN_DTYPE_F32, 1, shape, &one), TERN_OK);
    assert_int_equal(tern_safetensors_writer_write(w, path, &err), TERN_OK);
    assert_int_equal(tern_safetensors_open(path, NULL, &st, &err), TERN_OK);
    assert_int_equal(tern_model_info_read(st, &back, &err), TERN_OK);
    assert_int_equal(back.input_size, 0);
    assert_int_equal(back.nclasses, 0);
    tern_safetensors_close(&st);
    assert_int_equal(tern_safetensors_writer_set_metadata(w, "class_names", "[1, 2]"), TERN_OK);
    assert_int_equal(tern_safetensors_writer_write(w, path, &err), TERN_OK);
    assert_int_equal(tern_safetensors_open(path, NULL, &st, &err), TERN_OK);
    assert_int_equal(tern_model_info_read(st, &back, &err), TERN_ERR_FORMAT);
    assert_non_null(strstr(err.message, "class_names"));
    tern_safetensors_close(&st);
    assert_int_equal(tern_safetensors_writer_set_metadata(w, "class_names", "[\"a\"]"), TERN_OK);
    assert_int_equal(tern_safetensors_writer_set_metadata(w, "mean", "{}"), TERN_OK);
    assert_int_equal(tern_safetensors_writer_write(w, path, &err), TERN_OK);
    assert_int_equal(tern_safetensors_open(path, NULL, &st, &err), TERN_OK);
    assert_int_equal(tern_model_info_read(st, &back, &err), TERN_ERR_FORMAT);
    assert_non_null(strstr(err.message, "mean"));
    tern_safetensors_close(&st);
    tern_safetensors_writer_destroy(&w);
    tern_model_destroy(&m);
}

/* ---- 14. starting from other weights with a new classifier ------------------------------------ */

static void load_with_new_head(void **state)
{
    const char *dir = *state;
    char path[256];
    snprintf(path, sizeof path, "%s/base.safetensors", dir);
    tern_model_options o = small_options(5);
    o.num_classes = 7;
    tern_model *base = create(&o);
    tern_error err = {{0}};
    assert_int_equal(tern_model_save_file(base, NULL, path, &err), TERN_OK);

    o.num_classes = 9;
    o.seed = 6;
    tern_model *m = create(&o);
    tern_safetensors *st = NULL;
    assert_int_equal(tern_safetensors_open(path, NULL, &st, &err), TERN_OK);
    /* Strict loading refuses the 7-class head... */
    assert_int_equal(tern_model_load_state(m, st, "", &err), TERN_ERR_SHAPE);
    const tern_model_tensor *head = tern_model_find_tensor(m, "classifier.3.weight");
    float *head_before = malloc(head->count * sizeof(float));
    memcpy(head_before, head->data, head->count * sizeof(float));
    /* ...loading everything but the head keeps the new head and takes the rest. */
    const char *keep[] = {"classifier.3."};
    assert_int_equal(tern_model_load_state_except(m, st, keep, 1, &err), TERN_OK);
    assert_memory_equal(head->data, head_before, head->count * sizeof(float));
    for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(m, i);
        if (strncmp(t->name, "classifier.3.", 13) == 0)
            continue;
        const tern_model_tensor *b = tern_model_find_tensor(base, t->name);
        if (t->kind == TERN_TENSOR_COUNTER)
            assert_int_equal(*t->counter, *b->counter);
        else
            assert_memory_equal(t->data, b->data, t->count * sizeof(float));
    }
    /* A mismatch elsewhere is still an error. */
    const char *keep_other[] = {"features.0.0."};
    assert_int_equal(tern_model_load_state_except(m, st, keep_other, 1, &err), TERN_ERR_SHAPE);
    assert_non_null(strstr(err.message, "classifier.3"));
    free(head_before);
    tern_safetensors_close(&st);
    tern_model_destroy(&m);
    tern_model_destroy(&base);
}

/* ---- folded and fused inference ------------------------------------------------------------- */

/* Random BatchNorm statistics and affine parameters (and biases), so that folding does work. */
static void randomize_norms(tern_model *m, uint64_t seed)
{
    test_rng r = {seed};
    for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(m, i);
        if (t->ndim != 1)
            continue;
        if (ends_with(t->name, ".running_var") || ends_with(t->name, ".weight"))
            test_fill_uniform(&r, t->data, t->count, 0.5f, 1.5f);
        else
            test_fill_uniform(&r, t->data, t->count, -0.3f, 0.3f);
    }
    tern_model_invalidate(m);
}

/* A half-width model at isa and thread count with random norms, planned for inference of n
 * images of s x s. */
static tern_model *fused_test_model(tern_arch arch, tern_isa isa, int threads, int classes,
                                    uint64_t seed, int n, int s)
{
    tern_model_options o = tern_model_options_default(arch);
    o.width_mult = 0.5;
    o.num_classes = classes;
    o.seed = seed;
    o.threads = threads;
    o.isa = isa;
    tern_model *m = create(&o);
    randomize_norms(m, seed + 1);
    assert_int_equal(tern_model_plan(m, n, s, s, false), TERN_OK);
    return m;
}

/* Inference folds BatchNorm into the convolutions and fuses the residual adds into the
 * projections (bit-exact: the same additions in the same order) at any batch, and runs each
 * expansion with its depthwise conv by bands of rows (bit-exact, checked against no bands); at
 * batch 1 it also folds each squeeze-and-excitation gate into the projection's weights (not
 * bit-exact).
 * So each image run alone must match its row of a batch-3 run, where the gates are applied
 * unfused, at every ISA and thread count, and repeat bit for bit. */
static void fused_inference_matches_unfused(void **state)
{
    (void)state;
    enum { N = 3, S = 64, K = 7 };
    static const tern_isa isas[] = {TERN_ISA_SCALAR, TERN_ISA_AVX2, TERN_ISA_AVX512};
    static const tern_arch archs[] = {TERN_ARCH_MOBILENET_V3_SMALL, TERN_ARCH_MOBILENET_V3_LARGE};
    test_rng r = {77};
    const size_t image = (size_t)S * S * 3;
    float *input = malloc(N * image * sizeof(float));
    assert_non_null(input);
    test_fill_uniform(&r, input, N * image, -1.0f, 1.0f);
    for (size_t a = 0; a < sizeof archs / sizeof *archs; a++)
        for (size_t i = 0; i < sizeof isas / sizeof *isas; i++) {
            if (tern_isa_resolve(isas[i]) != isas[i])
                continue;
            for (int threads = 1; threads <= 2; threads++) {
                tern_model *m = fused_test_model(archs[a], isas[i], threads, K, 5, N, S);
                float batched[N * K], banded[N * K], single[K], again[K];
                /* Expansions and the depthwise convs after them by bands of rows (single-
                 * threaded models): the bits of running them one after the other, for bands
                 * of one row up to the whole image. */
                tern_model_graph_set_fuse_floats(m, 0);
                assert_int_equal(tern_model_forward(m, batched, input, N, false), TERN_OK);
                static const size_t bands[] = {1, 700, 5000, (size_t)1 << 16};
                for (size_t b = 0; b < sizeof bands / sizeof *bands; b++) {
                    tern_model_graph_set_fuse_floats(m, bands[b]);
                    assert_int_equal(tern_model_forward(m, banded, input, N, false), TERN_OK);
                    if (memcmp(batched, banded, sizeof batched) != 0)
                        fail_msg("%s %s %d thread(s): bands of %zu floats change the bits",
                                 tern_arch_name(archs[a]), tern_isa_name(isas[i]), threads,
                                 bands[b]);
                }
                for (int n = 0; n < N; n++) {
                    assert_int_equal(tern_model_forward(m, single, input + n * image, 1, false),
                                     TERN_OK);
                    assert_int_equal(tern_model_forward(m, again, input + n * image, 1, false),
                                     TERN_OK);
                    assert_memory_equal(single, again, sizeof single);
                    char what[96];
                    snprintf(what, sizeof what, "%s %s %d thread(s) image %d",
                             tern_arch_name(archs[a]), tern_isa_name(isas[i]), threads, n);
                    assert_true(test_close(what, single, batched + n * K, K, 1e-5f, 1e-3f));
                }
                tern_model_destroy(&m);
            }
        }
    free(input);
}

/* ---- 15. BatchNorm momentum ----------------------------------------------------------------- */

/* Running statistics start at mean 0: after one training forward they are momentum times the
 * batch mean, so two momenta give running means in their ratio. Out-of-range momenta refused. */
static void bn_momentum_option(void **state)
{
    (void)state;
    tern_model_options o = small_options(9);
    float means[2][8];
    const float momenta[2] = {0.01f, 0.1f};
    batch b = batch_make(31, 4, 3, o.num_classes);
    for (int k = 0; k < 2; k++) {
        o.bn_momentum = momenta[k];
        tern_model *m = create(&o);
        assert_int_equal(tern_model_plan(m, 4, H, W, true), TERN_OK);
        assert_int_equal(tern_model_forward(m, b.logits, b.input, 4, true), TERN_OK);
        const tern_model_tensor *t = tern_model_find_tensor(m, "features.0.1.running_mean");
        assert_non_null(t);
        memcpy(means[k], t->data, sizeof means[k]);
        tern_model_destroy(&m);
    }
    for (int c = 0; c < 8; c++)
        assert_float_equal(means[1][c], 10.0f * means[0][c], 1e-5f * fabsf(means[1][c]) + 1e-9f);
    assert_true(fabsf(means[1][0]) > 0);
    tern_error err = {{0}};
    tern_model *m = NULL;
    for (int k = 0; k < 3; k++) {
        o.bn_momentum = (float[]){0.0f, -0.1f, 1.5f}[k];
        assert_int_equal(tern_model_create(&o, &m, &err), TERN_ERR_INVALID);
        assert_non_null(strstr(err.message, "momentum"));
    }
    batch_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        /* First, while the process has no model threads to confuse fork(). */
        cmocka_unit_test(alloc_failure_create),
        cmocka_unit_test(create_rejects_bad_options),
        cmocka_unit_test(alloc_failure_plan_and_sgd),
        cmocka_unit_test(call_order_errors),
        cmocka_unit_test(determinism),
        cmocka_unit_test(init_statistics),
        cmocka_unit_test(parameter_counts),
        cmocka_unit_test(loss_falls),
        cmocka_unit_test(dropout_behaviour),
        cmocka_unit_test(group_norm_model),
        cmocka_unit_test(fused_inference_matches_unfused),
        cmocka_unit_test(sgd_semantics),
        cmocka_unit_test(sgd_rejects_bad_options),
        cmocka_unit_test_setup_teardown(save_and_load, tmpdir_setup, tmpdir_teardown),
        cmocka_unit_test(two_models_interleaved),
        cmocka_unit_test_setup_teardown(model_info_round_trip, tmpdir_setup, tmpdir_teardown),
        cmocka_unit_test_setup_teardown(load_with_new_head, tmpdir_setup, tmpdir_teardown),
        cmocka_unit_test(bn_momentum_option),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
