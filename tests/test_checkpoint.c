/* Checkpoint tests: resuming is bit-for-bit the uninterrupted run, and bad files, mismatched
 * optimizers and models, and allocation failures are refused cleanly without changing anything.
 *
 * The training loop uses everything a checkpoint must carry: dropout (the model's generator),
 * BatchNorm running statistics and counters, an lr schedule driven by the global step, gradient
 * clipping, optimizer state and step counter, and a data generator choosing each batch. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tern.h"
#include "tern/checkpoint.h"
#include "testutil.h"

#define H 32
#define W 32
#define BATCH 4
#define CLASSES 5

/* ---- helpers ------------------------------------------------------------------------------- */

static tern_model_options train_options(uint64_t seed)
{
    tern_model_options o = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    o.width_mult = 0.25;
    o.num_classes = CLASSES;
    o.dropout = 0.2f;
    o.seed = seed;
    return o;
}

static tern_model *create_model(const tern_model_options *o)
{
    tern_model *m = NULL;
    tern_error err = {{0}};
    if (tern_model_create(o, &m, &err) != TERN_OK)
        fail_msg("tern_model_create: %s", err.message);
    if (tern_model_plan(m, BATCH, H, W, true) != TERN_OK)
        fail_msg("tern_model_plan failed");
    return m;
}

static tern_optimizer *create_optimizer(tern_model *m, const tern_optimizer_options *o)
{
    tern_optimizer *opt = NULL;
    tern_error err = {{0}};
    if (tern_optimizer_create(m, o, &opt, &err) != TERN_OK)
        fail_msg("tern_optimizer_create: %s", err.message);
    return opt;
}

static const tern_schedule SCHEDULE = {.kind = TERN_SCHEDULE_COSINE, .base_lr = 0.01f,
                                       .warmup_steps = 2, .warmup_start_factor = 0.5f,
                                       .total_steps = 6, .min_lr = 0.001f};

/* One training step: lr from the schedule, a batch chosen by the data generator, forward with
 * dropout, loss, backward, clipping, update. */
static void train_step(tern_model *m, tern_optimizer *opt, tern_rng *data_rng, uint64_t step)
{
    tern_optimizer_set_lr(opt, tern_schedule_lr(&SCHEDULE, (long)step));
    test_rng r = {tern_rng_next(data_rng)};
    static float input[BATCH * H * W * 3], logits[BATCH * CLASSES], dlogits[BATCH * CLASSES];
    int32_t labels[BATCH];
    test_fill_uniform(&r, input, sizeof input / sizeof *input, -1.0f, 1.0f);
    for (int i = 0; i < BATCH; i++)
        labels[i] = test_rng_int(&r, 0, CLASSES - 1);
    float loss;
    assert_int_equal(tern_model_forward(m, logits, input, BATCH, true), TERN_OK);
    assert_int_equal(tern_cross_entropy_loss(&loss, dlogits, logits, labels, BATCH, CLASSES, 0.1f),
                     TERN_OK);
    tern_model_zero_grad(m);
    assert_int_equal(tern_model_backward(m, dlogits), TERN_OK);
    tern_clip_grad_norm(m, 1.0f);
    tern_optimizer_step(opt);
}

/* Everything a resume must restore, serialised into one block: state_dict, the model's
 * generator, optimizer blocks, step counter and hyper-parameters. */
typedef struct snapshot {
    size_t bytes;
    unsigned char *data;
} snapshot;

static void append(snapshot *s, const void *p, size_t n)
{
    s->data = realloc(s->data, s->bytes + n);
    assert_non_null(s->data);
    memcpy(s->data + s->bytes, p, n);
    s->bytes += n;
}

static snapshot snapshot_take(tern_model *m, tern_optimizer *opt)
{
    snapshot s = {0};
    for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(m, i);
        if (t->kind == TERN_TENSOR_COUNTER)
            append(&s, t->counter, sizeof(int64_t));
        else
            append(&s, t->data, t->count * sizeof(float));
    }
    append(&s, tern_model_rng(m), sizeof(tern_rng));
    if (opt) {
        for (size_t k = 0; k < tern_optimizer_state_count(opt); k++) {
            float *data;
            size_t count;
            tern_optimizer_state_at(opt, k, NULL, &data, &count);
            append(&s, data, count * sizeof(float));
        }
        uint64_t steps = tern_optimizer_steps(opt);
        append(&s, &steps, sizeof steps);
        /* Field by field: the struct has padding. */
        const tern_optimizer_options *o = tern_optimizer_options_of(opt);
        float f[] = {(float)o->kind, o->lr, o->momentum, o->dampening, o->weight_decay,
                     (float)o->nesterov, o->beta1, o->beta2, o->eps, (float)o->amsgrad, o->alpha,
                     (float)o->centered};
        append(&s, f, sizeof f);
    }
    return s;
}

static bool snapshot_equal(const snapshot *a, const snapshot *b)
{
    return a->bytes == b->bytes && memcmp(a->data, b->data, a->bytes) == 0;
}

static void snapshot_free(snapshot *s)
{
    free(s->data);
    s->data = NULL;
}

/* A mkdtemp directory per test; teardown removes it and whatever is left in it. */
static int tmpdir_setup(void **state)
{
    char *dir = malloc(64);
    if (!dir)
        return -1;
    snprintf(dir, 64, "/tmp/tern_test_checkpoint.XXXXXX");
    if (!mkdtemp(dir)) {
        free(dir);
        return -1;
    }
    *state = dir;
    return 0;
}

static int tmpdir_teardown(void **state)
{
    char *dir = *state;
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        char path[512];
        while ((e = readdir(d)))
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
                snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
                unlink(path);
            }
        closedir(d);
    }
    rmdir(dir);
    free(dir);
    return 0;
}

static size_t dir_entries(const char *dir)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        n += strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
    closedir(d);
    return n;
}

static void save_or_fail(tern_model *m, tern_optimizer *opt, const tern_checkpoint_info *info,
                         const char *path)
{
    tern_error err = {{0}};
    if (tern_checkpoint_save(m, opt, info, path, &err) != TERN_OK)
        fail_msg("tern_checkpoint_save: %s", err.message);
}

static unsigned char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(*len);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, *len, f), *len);
    fclose(f);
    return b;
}

static void write_all(const char *path, const void *b, size_t len)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, len, f), len);
    fclose(f);
}

/* A load that must fail with `want` and leave model, optimizer and info untouched. */
static void expect_refused(tern_model *m, tern_optimizer *opt, const char *path, tern_status want,
                           const char *what)
{
    snapshot before = snapshot_take(m, opt);
    tern_checkpoint_info info, sentinel;
    memset(&info, 0xa5, sizeof info);
    sentinel = info;
    tern_error err = {{0}};
    tern_status s = tern_checkpoint_load(m, opt, &info, path, &err);
    if (s != want)
        fail_msg("%s: got %d (%s: %s), want %d", what, s, tern_strerror(s), err.message, want);
    if (err.message[0] == '\0')
        fail_msg("%s: no message", what);
    snapshot after = snapshot_take(m, opt);
    if (!snapshot_equal(&before, &after))
        fail_msg("%s: a refused load changed the model or optimizer", what);
    assert_memory_equal(&info, &sentinel, sizeof info);
    snapshot_free(&before);
    snapshot_free(&after);
}

/* ---- 1. resume is exact -------------------------------------------------------------------- */

static void resume_case(const char *dir, tern_optimizer_options oo, const char *what)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s.ckpt", dir, what);
    tern_model_options mo = train_options(11);

    /* Uninterrupted: 6 steps, checkpoint after 3. */
    tern_model *a = create_model(&mo);
    tern_optimizer *oa = create_optimizer(a, &oo);
    tern_rng data = {{0}};
    tern_rng_seed(&data, 1234);
    for (uint64_t step = 0; step < 3; step++)
        train_step(a, oa, &data, step);
    tern_checkpoint_info info = {.epoch = 1, .global_step = 3, .data_rng = data,
                                 .user = {42, -7, INT64_MAX, INT64_MIN}};
    save_or_fail(a, oa, &info, path);
    for (uint64_t step = 3; step < 6; step++)
        train_step(a, oa, &data, step);
    snapshot want = snapshot_take(a, oa);

    /* Resumed: a model from another seed and an optimizer with other hyper-parameters. */
    tern_model_options mo_b = train_options(99);
    tern_model *b = create_model(&mo_b);
    tern_optimizer_options other = oo;
    other.lr *= 3.0f;
    other.weight_decay += 0.5f;
    tern_optimizer *ob = create_optimizer(b, &other);
    tern_checkpoint_info got = {0};
    tern_error err = {{0}};
    if (tern_checkpoint_load(b, ob, &got, path, &err) != TERN_OK)
        fail_msg("%s: tern_checkpoint_load: %s", what, err.message);
    assert_memory_equal(&got, &info, sizeof info);
    assert_int_equal(tern_optimizer_steps(ob), 3);
    assert_true(tern_optimizer_options_of(ob)->weight_decay == oo.weight_decay);
    for (uint64_t step = got.global_step; step < 6; step++)
        train_step(b, ob, &got.data_rng, step);
    snapshot resumed = snapshot_take(b, ob);
    if (!snapshot_equal(&want, &resumed))
        fail_msg("%s: the resumed run differs from the uninterrupted one", what);
    assert_memory_equal(&got.data_rng, &data, sizeof data);

    snapshot_free(&want);
    snapshot_free(&resumed);
    tern_optimizer_destroy(&oa);
    tern_optimizer_destroy(&ob);
    tern_model_destroy(&a);
    tern_model_destroy(&b);
}

static void resume_is_bitwise(void **state)
{
    const char *dir = *state;
    tern_optimizer_options adam = tern_optimizer_options_default(TERN_OPTIMIZER_ADAM);
    adam.weight_decay = 1e-4f;
    resume_case(dir, adam, "adam");
    tern_optimizer_options adamw = tern_optimizer_options_default(TERN_OPTIMIZER_ADAMW);
    adamw.amsgrad = true;
    resume_case(dir, adamw, "adamw_amsgrad");
    tern_optimizer_options rms = tern_optimizer_options_default(TERN_OPTIMIZER_RMSPROP);
    rms.momentum = 0.9f;
    rms.centered = true;
    resume_case(dir, rms, "rmsprop");
    tern_optimizer_options sgd = {.kind = TERN_OPTIMIZER_SGD, .lr = 0.05f, .momentum = 0.9f,
                                  .nesterov = true, .weight_decay = 1e-4f};
    resume_case(dir, sgd, "sgd");
    /* Only the model's own files: temporary files were renamed away. */
    assert_int_equal(dir_entries(dir), 4);
}

/* Model-only checkpoints, peek, NULL info, and a checkpoint overwritten in place. */
static void model_only_and_peek(void **state)
{
    const char *dir = *state;
    char path[512];
    snprintf(path, sizeof path, "%s/model.ckpt", dir);
    tern_model_options mo = train_options(3);
    mo.num_classes = 7;
    tern_model *a = create_model(&mo);
    save_or_fail(a, NULL, NULL, path);

    tern_model_options peeked = tern_model_options_default(TERN_ARCH_MOBILENET_V3_LARGE);
    peeked.threads = 3;
    bool has_opt = true;
    tern_checkpoint_info info;
    memset(&info, 0xff, sizeof info);
    tern_error err = {{0}};
    assert_int_equal(tern_checkpoint_peek(path, NULL, &peeked, NULL, &has_opt, &info, &err),
                     TERN_OK);
    assert_int_equal(peeked.arch, TERN_ARCH_MOBILENET_V3_SMALL);
    assert_true(peeked.width_mult == 0.25);
    assert_int_equal(peeked.num_classes, 7);
    assert_int_equal(peeked.threads, 3); /* left alone */
    assert_false(has_opt);
    tern_checkpoint_info zero = {0};
    assert_memory_equal(&info, &zero, sizeof info);

    /* An optimizer cannot be restored from it; the model can. */
    mo.seed = 4;
    tern_model *b = create_model(&mo);
    tern_optimizer *ob = create_optimizer(b, &(tern_optimizer_options){.kind = TERN_OPTIMIZER_SGD,
                                                                        .lr = 0.1f});
    expect_refused(b, ob, path, TERN_ERR_NOT_FOUND, "no optimizer in file");
    assert_int_equal(tern_checkpoint_load(b, NULL, NULL, path, &err), TERN_OK);
    snapshot sa = snapshot_take(a, NULL), sb = snapshot_take(b, NULL);
    assert_true(snapshot_equal(&sa, &sb));
    snapshot_free(&sa);
    snapshot_free(&sb);

    /* Overwrite with an optimizer checkpoint: peek sees it. */
    tern_optimizer_set_steps(ob, 17);
    tern_optimizer_set_lr(ob, 0.0f); /* the end of a schedule is a valid state */
    tern_checkpoint_info mine = {.epoch = 5, .global_step = 1ull << 40};
    save_or_fail(b, ob, &mine, path);
    tern_optimizer_options oo = {0};
    assert_int_equal(tern_checkpoint_peek(path, NULL, NULL, &oo, &has_opt, &info, &err), TERN_OK);
    assert_true(has_opt);
    assert_int_equal(oo.kind, TERN_OPTIMIZER_SGD);
    assert_true(oo.lr == 0.0f);
    assert_int_equal(info.global_step, 1ull << 40);
    tern_optimizer_set_steps(ob, 0);
    tern_optimizer_set_lr(ob, 0.5f);
    assert_int_equal(tern_checkpoint_load(b, ob, NULL, path, &err), TERN_OK);
    assert_int_equal(tern_optimizer_steps(ob), 17);
    assert_true(tern_optimizer_lr(ob) == 0.0f);

    /* Argument checks. */
    assert_int_equal(tern_checkpoint_save(NULL, NULL, NULL, path, NULL), TERN_ERR_INVALID);
    assert_int_equal(tern_checkpoint_save(a, NULL, NULL, NULL, NULL), TERN_ERR_INVALID);
    assert_int_equal(tern_checkpoint_save(a, ob, NULL, path, &err), TERN_ERR_INVALID);
    assert_int_equal(tern_checkpoint_load(a, ob, NULL, path, &err), TERN_ERR_INVALID);
    assert_int_equal(tern_checkpoint_load(NULL, NULL, NULL, path, NULL), TERN_ERR_INVALID);
    assert_int_equal(tern_checkpoint_peek(NULL, NULL, NULL, NULL, NULL, NULL, NULL),
                     TERN_ERR_INVALID);
    tern_optimizer_destroy(&ob);
    tern_model_destroy(&a);
    tern_model_destroy(&b);
}

/* ---- 2. refusals --------------------------------------------------------------------------- */

static void bad_files_change_nothing(void **state)
{
    const char *dir = *state;
    char path[512], bad[512];
    snprintf(path, sizeof path, "%s/good.ckpt", dir);
    snprintf(bad, sizeof bad, "%s/bad.ckpt", dir);
    tern_model_options mo = train_options(21);
    tern_optimizer_options adam = tern_optimizer_options_default(TERN_OPTIMIZER_ADAM);
    tern_model *a = create_model(&mo);
    tern_optimizer *oa = create_optimizer(a, &adam);
    tern_rng data;
    tern_rng_seed(&data, 5);
    train_step(a, oa, &data, 0);
    save_or_fail(a, oa, NULL, path);

    /* The target has trained differently, so a partial load would show. */
    mo.seed = 22;
    tern_model *b = create_model(&mo);
    tern_optimizer *ob = create_optimizer(b, &adam);
    train_step(b, ob, &data, 0);
    train_step(b, ob, &data, 1);

    size_t len;
    unsigned char *bytes = read_all(path, &len);
    write_all(bad, bytes, len / 2);
    expect_refused(b, ob, bad, TERN_ERR_FORMAT, "truncated to half");
    write_all(bad, bytes, len - 1);
    expect_refused(b, ob, bad, TERN_ERR_FORMAT, "one byte short");
    write_all(bad, bytes, 5);
    expect_refused(b, ob, bad, TERN_ERR_FORMAT, "five bytes");
    unsigned char *copy = malloc(len);
    assert_non_null(copy);
    memcpy(copy, bytes, len);
    copy[12] = '}'; /* inside the JSON header */
    write_all(bad, copy, len);
    expect_refused(b, ob, bad, TERN_ERR_FORMAT, "corrupt header");

    /* Metadata edits that keep the header's length: the JSON is patched in place. */
    const struct {
        const char *from, *to;
        tern_status want;
        const char *what;
    } edits[] = {
        {"\"tern-checkpoint\"", "\"tern-checkpoinX\"", TERN_ERR_FORMAT, "wrong format"},
        {"\"optim.kind\":\"adam\"", "\"optim.kind\":\"adaX\"", TERN_ERR_FORMAT, "unknown kind"},
        {"\"optim.beta2\":\"0.999000013\"", "\"optim.beta2\":\"1.999000013\"", TERN_ERR_FORMAT,
         "beta2 out of range"},
        {"\"optim.amsgrad\":\"false\"", "\"optim.amsgrad\":\"fals3\"", TERN_ERR_FORMAT,
         "bad boolean"},
        {"\"optim.steps\":\"1\"", "\"optim.steps\":\"x\"", TERN_ERR_FORMAT, "bad step count"},
        {"\"epoch\":\"0\"", "\"epoch\":\"-\"", TERN_ERR_FORMAT, "bad epoch"},
        {"\"rng.model\"", "\"rng.modeX\"", TERN_ERR_NOT_FOUND, "no model generator"},
        {"\"optim.exp_avg\"", "\"optim.exp_avX\"", TERN_ERR_NOT_FOUND, "missing state block"},
        {"\"model.classifier.3.bias\"", "\"model.classifier.3.biaX\"", TERN_ERR_NOT_FOUND,
         "missing model tensor"},
    };
    for (size_t i = 0; i < sizeof edits / sizeof *edits; i++) {
        memcpy(copy, bytes, len);
        size_t hlen = 0;
        memcpy(&hlen, copy, 8);
        char *hdr = (char *)copy + 8;
        char *at = NULL;
        size_t fl = strlen(edits[i].from);
        for (size_t j = 0; j + fl <= hlen && !at; j++)
            if (memcmp(hdr + j, edits[i].from, fl) == 0)
                at = hdr + j;
        if (!at)
            fail_msg("%s: '%s' not in the header", edits[i].what, edits[i].from);
        assert_int_equal(strlen(edits[i].to), fl);
        memcpy(at, edits[i].to, fl);
        write_all(bad, copy, len);
        expect_refused(b, ob, bad, edits[i].want, edits[i].what);
    }
    free(copy);

    /* A plain model file is not a checkpoint; a missing file is an I/O error. */
    tern_error err = {{0}};
    assert_int_equal(tern_model_save_file(a, NULL, bad, &err), TERN_OK);
    expect_refused(b, ob, bad, TERN_ERR_FORMAT, "model file");
    snprintf(bad, sizeof bad, "%s/missing.ckpt", dir);
    expect_refused(b, ob, bad, TERN_ERR_IO, "missing file");

    /* And the good file still loads. */
    assert_int_equal(tern_checkpoint_load(b, ob, NULL, path, &err), TERN_OK);
    snapshot sa = snapshot_take(a, oa), sb = snapshot_take(b, ob);
    assert_true(snapshot_equal(&sa, &sb));
    snapshot_free(&sa);
    snapshot_free(&sb);
    free(bytes);
    tern_optimizer_destroy(&oa);
    tern_optimizer_destroy(&ob);
    tern_model_destroy(&a);
    tern_model_destroy(&b);
}

static void mismatches_are_refused(void **state)
{
    const char *dir = *state;
    char path[512];
    snprintf(path, sizeof path, "%s/adam.ckpt", dir);
    tern_model_options mo = train_options(31);
    tern_model *a = create_model(&mo);
    tern_optimizer_options adam = tern_optimizer_options_default(TERN_OPTIMIZER_ADAM);
    tern_optimizer *oa = create_optimizer(a, &adam);
    tern_rng data;
    tern_rng_seed(&data, 6);
    train_step(a, oa, &data, 0);
    save_or_fail(a, oa, NULL, path);

    /* Another optimizer kind, or the same kind with other state blocks. */
    mo.seed = 32;
    tern_model *b = create_model(&mo);
    const struct {
        const char *what;
        tern_optimizer_options o;
    } opts[] = {
        {"sgd", {.kind = TERN_OPTIMIZER_SGD, .lr = 0.1f, .momentum = 0.9f}},
        {"adamw", tern_optimizer_options_default(TERN_OPTIMIZER_ADAMW)},
        {"rmsprop", tern_optimizer_options_default(TERN_OPTIMIZER_RMSPROP)},
        {"adam amsgrad", {.kind = TERN_OPTIMIZER_ADAM, .lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.9f,
                          .amsgrad = true}},
    };
    for (size_t i = 0; i < sizeof opts / sizeof *opts; i++) {
        tern_optimizer *ob = create_optimizer(b, &opts[i].o);
        expect_refused(b, ob, path, TERN_ERR_INVALID, opts[i].what);
        tern_optimizer_destroy(&ob);
    }

    /* Another head, another width, another architecture: with or without the optimizer. */
    tern_model_options others[3] = {train_options(33), train_options(34),
                                     tern_model_options_default(TERN_ARCH_MOBILENET_V3_LARGE)};
    others[0].num_classes = CLASSES + 1;
    others[1].width_mult = 0.5;
    others[2].width_mult = 0.25;
    others[2].num_classes = CLASSES;
    for (int i = 0; i < 3; i++) {
        tern_model *c = create_model(&others[i]);
        tern_optimizer *oc = create_optimizer(c, &adam);
        tern_error err = {{0}};
        tern_status s = tern_checkpoint_load(c, NULL, NULL, path, &err);
        if (s != TERN_ERR_SHAPE && s != TERN_ERR_NOT_FOUND)
            fail_msg("model %d: got %d (%s)", i, s, err.message);
        expect_refused(c, NULL, path, s, "other model");
        /* The optimizer's blocks are checked first: they have the other parameter count. */
        expect_refused(c, oc, path, TERN_ERR_SHAPE, "other model with optimizer");
        assert_non_null(strstr(err.message, "'model."));
        tern_optimizer_destroy(&oc);
        tern_model_destroy(&c);
    }
    tern_optimizer_destroy(&oa);
    tern_model_destroy(&a);
    tern_model_destroy(&b);
}

/* ---- 3. allocation failure ----------------------------------------------------------------- */

static void allocation_failures(void **state)
{
    const char *dir = *state;
    char path[512];
    snprintf(path, sizeof path, "%s/alloc.ckpt", dir);
    test_alloc_state st = {0};
    tern_allocator al = test_failing_allocator(&st);
    tern_model_options mo = train_options(41);
    mo.alloc = &al;
    tern_model *a = create_model(&mo);
    tern_optimizer_options adam = tern_optimizer_options_default(TERN_OPTIMIZER_ADAM);
    adam.amsgrad = true;
    tern_optimizer *oa = create_optimizer(a, &adam);
    tern_rng data;
    tern_rng_seed(&data, 7);
    train_step(a, oa, &data, 0);
    long live = st.live;

    int failures = 0;
    for (long k = 1;; k++) {
        assert_true(k < 10000);
        st.fail_at = st.count + k;
        tern_error err = {{0}};
        tern_status s = tern_checkpoint_save(a, oa, NULL, path, &err);
        assert_int_equal(st.live, live);
        if (s == TERN_OK)
            break;
        if (s != TERN_ERR_NOMEM)
            fail_msg("save, allocation %ld failing: got %d (%s)", k, s, err.message);
        assert_true(err.message[0] != '\0');
        assert_int_equal(access(path, F_OK), -1); /* nothing written */
        assert_int_equal(dir_entries(dir), 0);
        failures++;
    }
    assert_true(failures >= 1);
    st.fail_at = 0;

    mo.seed = 42;
    tern_model *b = create_model(&mo);
    tern_optimizer *ob = create_optimizer(b, &adam);
    train_step(b, ob, &data, 0);
    live = st.live;
    failures = 0;
    for (long k = 1;; k++) {
        assert_true(k < 10000);
        st.fail_at = st.count + k;
        snapshot before = snapshot_take(b, ob);
        tern_error err = {{0}};
        tern_status s = tern_checkpoint_load(b, ob, NULL, path, &err);
        st.fail_at = 0;
        assert_int_equal(st.live, live);
        snapshot after = snapshot_take(b, ob);
        if (s == TERN_OK) {
            snapshot sa = snapshot_take(a, oa);
            assert_true(snapshot_equal(&sa, &after));
            snapshot_free(&sa);
            snapshot_free(&before);
            snapshot_free(&after);
            break;
        }
        if (s != TERN_ERR_NOMEM)
            fail_msg("load, allocation %ld failing: got %d (%s)", k, s, err.message);
        assert_true(err.message[0] != '\0');
        assert_true(snapshot_equal(&before, &after));
        snapshot_free(&before);
        snapshot_free(&after);
        failures++;
    }
    assert_true(failures >= 1);
    tern_optimizer_destroy(&oa);
    tern_optimizer_destroy(&ob);
    tern_model_destroy(&a);
    tern_model_destroy(&b);
    assert_int_equal(st.live, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(resume_is_bitwise, tmpdir_setup, tmpdir_teardown),
        cmocka_unit_test_setup_teardown(model_only_and_peek, tmpdir_setup, tmpdir_teardown),
        cmocka_unit_test_setup_teardown(bad_files_change_nothing, tmpdir_setup, tmpdir_teardown),
        cmocka_unit_test_setup_teardown(mismatches_are_refused, tmpdir_setup, tmpdir_teardown),
        cmocka_unit_test_setup_teardown(allocation_failures, tmpdir_setup, tmpdir_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
