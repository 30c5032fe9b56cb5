/* Magnitude pruning (tern/prune.h): thresholds on hand-made weights for both scopes, ties,
 * masks that keep weights at exactly +0.0 through optimizer steps, the polynomial schedule,
 * compressed files (bit-exact round trip, smaller when sparse, clear errors for corrupt and
 * truncated files, nothing changed by a failed load), and `tern prune` end to end. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "tern.h"
#include "testutil.h"

static tern_model *small_model(void)
{
    tern_model_options o = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    o.width_mult = 0.25;
    o.in_channels = 1;
    o.num_classes = 4;
    o.seed = 7;
    tern_model *m = NULL;
    tern_error err = {{0}};
    assert_int_equal(tern_model_create(&o, &m, &err), TERN_OK);
    return m;
}

static const tern_model_tensor *layer_tensor(const tern_pruner *p, const tern_model *m, size_t i)
{
    tern_prune_layer l;
    assert_int_equal(tern_pruner_layer_at(p, i, &l), TERN_OK);
    return tern_model_find_tensor(m, l.name);
}

static size_t count_zero_bits(const float *x, size_t n)
{
    size_t z = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        z += u == 0;
    }
    return z;
}

static void default_exclusions(void **state)
{
    (void)state;
    tern_model *m = small_model();
    tern_pruner *p = NULL;
    tern_error err = {{0}};
    assert_int_equal(tern_pruner_create(m, NULL, &p, &err), TERN_OK);
    bool saw_pointwise = false;
    for (size_t i = 0; i < tern_pruner_layer_count(p); i++) {
        tern_prune_layer l;
        tern_pruner_layer_at(p, i, &l);
        assert_string_not_equal(l.name, "features.0.0.weight");
        assert_string_not_equal(l.name, "classifier.3.weight");
        assert_string_not_equal(l.kind, "depthwise");
        assert_null(strstr(l.name, "bias"));
        saw_pointwise |= strcmp(l.kind, "conv1x1") == 0;
    }
    assert_true(saw_pointwise);
    size_t base = tern_pruner_layer_count(p);
    tern_pruner_destroy(&p);
    assert_null(p);
    tern_prune_options o = {.include_stem = true, .include_depthwise = true,
                            .include_classifier = true};
    assert_int_equal(tern_pruner_create(m, &o, &p, &err), TERN_OK);
    assert_true(tern_pruner_layer_count(p) > base + 2);
    tern_prune_layer l;
    tern_pruner_layer_at(p, 0, &l);
    assert_string_equal(l.name, "features.0.0.weight");
    tern_pruner_destroy(&p);
    o = (tern_prune_options){.scope = (tern_prune_scope)9};
    assert_int_equal(tern_pruner_create(m, &o, &p, &err), TERN_ERR_INVALID);
    tern_model_destroy(&m);
}

/* Layer 0 holds tiny weights (|w| = (i + 1) * 1e-6, alternating signs), every other layer
 * weights >= 1. Global pruning of exactly layer 0's share removes layer 0 and nothing else;
 * per-layer pruning removes the same fraction, smallest first, from every layer. */
static void thresholds_global_and_layer(void **state)
{
    (void)state;
    for (int scope = 0; scope < 2; scope++) {
        tern_model *m = small_model();
        tern_pruner *p = NULL;
        tern_error err = {{0}};
        tern_prune_options o = {.scope = scope ? TERN_PRUNE_LAYER : TERN_PRUNE_GLOBAL};
        assert_int_equal(tern_pruner_create(m, &o, &p, &err), TERN_OK);
        size_t nl = tern_pruner_layer_count(p), total = 0;
        for (size_t l = 0; l < nl; l++) {
            const tern_model_tensor *t = layer_tensor(p, m, l);
            for (size_t i = 0; i < t->count; i++) {
                float mag = l == 0 ? (float)(i + 1) * 1e-6f : 1.0f + (float)((i * 7919) % 1000);
                t->data[i] = i % 2 ? -mag : mag;
            }
            total += t->count;
        }
        tern_model_invalidate(m);
        size_t n0 = layer_tensor(p, m, 0)->count;
        double s = (double)n0 / (double)total;
        assert_int_equal(tern_pruner_prune(p, s), TERN_OK);
        size_t masked_total = 0;
        for (size_t l = 0; l < nl; l++) {
            const tern_model_tensor *t = layer_tensor(p, m, l);
            tern_prune_layer info;
            tern_pruner_layer_at(p, l, &info);
            size_t want = scope ? (size_t)llround(s * (double)t->count) : l == 0 ? t->count : 0;
            if (info.masked != want || info.zeros != want)
                fail_msg("scope %d layer %s: %zu masked, %zu zeros, expected %zu", scope,
                         info.name, info.masked, info.zeros, want);
            masked_total += info.masked;
            if (scope && want > 0) {
                /* the pruned ones are the smallest: every survivor >= the threshold */
                for (size_t i = 0; i < t->count; i++)
                    if (t->data[i] != 0.0f)
                        assert_true(fabsf(t->data[i]) >= info.threshold);
            }
        }
        if (!scope) {
            assert_int_equal(masked_total, n0);
            tern_prune_layer info;
            tern_pruner_layer_at(p, 0, &info);
            assert_true(info.threshold == (float)n0 * 1e-6f);
        }
        size_t prunable, masked, zeros;
        tern_pruner_totals(p, &prunable, &masked, &zeros, NULL, NULL);
        assert_int_equal(prunable, total);
        assert_int_equal(masked, masked_total);
        assert_int_equal(zeros, masked_total);
        assert_int_equal(tern_pruner_prune(p, 1.5), TERN_ERR_INVALID);
        assert_int_equal(tern_pruner_prune(p, NAN), TERN_ERR_INVALID);
        tern_pruner_destroy(&p);
        tern_model_destroy(&m);
    }
}

/* All-equal weights: exactly round(s * n) go, the first ones by position; raising the
 * sparsity keeps the earlier mask (gradual pruning never revives a weight). */
static void ties_and_monotone(void **state)
{
    (void)state;
    tern_model *m = small_model();
    tern_pruner *p = NULL;
    tern_error err = {{0}};
    tern_prune_options o = {.scope = TERN_PRUNE_LAYER};
    assert_int_equal(tern_pruner_create(m, &o, &p, &err), TERN_OK);
    const tern_model_tensor *t = layer_tensor(p, m, 1);
    for (size_t i = 0; i < t->count; i++)
        t->data[i] = (i % 3) ? 0.5f : -0.5f;
    assert_int_equal(tern_pruner_prune(p, 0.25), TERN_OK);
    size_t k = (size_t)llround(0.25 * (double)t->count);
    for (size_t i = 0; i < t->count; i++)
        assert_true((t->data[i] == 0.0f) == (i < k));
    /* survivors grow a little (training); the old mask must stay */
    for (size_t i = k; i < t->count; i++)
        t->data[i] *= 1.0f + (float)i * 1e-3f;
    assert_int_equal(tern_pruner_prune(p, 0.5), TERN_OK);
    size_t k2 = (size_t)llround(0.5 * (double)t->count);
    for (size_t i = 0; i < t->count; i++)
        assert_true((t->data[i] == 0.0f) == (i < k2));
    tern_pruner_destroy(&p);
    tern_model_destroy(&m);
}

/* Training steps with momentum, weight decay and Adam: masked weights stay +0.0 exactly while
 * the others move. */
static void zeros_survive_fine_tuning(void **state)
{
    (void)state;
    for (int kind = 0; kind < 2; kind++) {
        tern_model *m = small_model();
        tern_pruner *p = NULL;
        tern_optimizer *opt = NULL;
        tern_error err = {{0}};
        tern_optimizer_options oo = tern_optimizer_options_default(kind ? TERN_OPTIMIZER_ADAMW
                                                                        : TERN_OPTIMIZER_SGD);
        oo.lr = kind ? 1e-2f : 0.1f;
        oo.momentum = kind ? 0 : 0.9f;
        oo.weight_decay = 1e-2f;
        assert_int_equal(tern_optimizer_create(m, &oo, &opt, &err), TERN_OK);
        assert_int_equal(tern_pruner_create(m, NULL, &p, &err), TERN_OK);
        assert_int_equal(tern_pruner_prune(p, 0.7), TERN_OK);
        size_t prunable, masked;
        tern_pruner_totals(p, &prunable, &masked, NULL, NULL, NULL);
        assert_int_equal(masked, (size_t)llround(0.7 * (double)prunable));
        size_t np = tern_model_param_count(m);
        float *before = malloc(np * sizeof(float));
        assert_non_null(before);
        memcpy(before, tern_model_params(m), np * sizeof(float));
        const int batch = 4, k = 4;
        float x[4 * 32 * 32], logits[16], dlogits[16], loss;
        int32_t y[4] = {0, 1, 2, 3};
        test_rng r = {42};
        test_fill_uniform(&r, x, sizeof x / sizeof *x, -1, 1);
        assert_int_equal(tern_model_plan(m, batch, 32, 32, true), TERN_OK);
        for (int step = 0; step < 3; step++) {
            assert_int_equal(tern_model_forward(m, logits, x, batch, true), TERN_OK);
            tern_cross_entropy_loss(&loss, dlogits, logits, y, batch, k, 0);
            tern_model_zero_grad(m);
            assert_int_equal(tern_model_backward(m, dlogits), TERN_OK);
            tern_pruner_mask_grads(p);
            tern_optimizer_step(opt);
            tern_pruner_apply(p);
        }
        size_t zero_bits = 0, moved = 0;
        for (size_t l = 0; l < tern_pruner_layer_count(p); l++) {
            const tern_model_tensor *t = layer_tensor(p, m, l);
            zero_bits += count_zero_bits(t->data, t->count);
        }
        const float *now = tern_model_params(m);
        for (size_t i = 0; i < np; i++)
            moved += now[i] != before[i];
        /* every masked weight is +0.0 (bit pattern 0), and training changed others */
        assert_int_equal(zero_bits, masked);
        tern_pruner_totals(p, NULL, &masked, NULL, NULL, NULL);
        assert_int_equal(zero_bits, masked);
        assert_true(moved > np / 10);
        free(before);
        tern_optimizer_destroy(&opt);
        tern_pruner_destroy(&p);
        tern_model_destroy(&m);
    }
}

static void polynomial_schedule(void **state)
{
    (void)state;
    assert_true(tern_prune_polynomial(0, 0.8, 0, 0, 100) == 0.0);
    assert_true(tern_prune_polynomial(0, 0.8, 100, 0, 100) == 0.8);
    assert_true(tern_prune_polynomial(0, 0.8, 500, 0, 100) == 0.8);
    assert_true(fabs(tern_prune_polynomial(0.2, 0.8, -5, 0, 100) - 0.2) < 1e-12);
    assert_true(fabs(tern_prune_polynomial(0, 0.8, 50, 0, 100) - (0.8 - 0.8 / 8)) < 1e-12);
    double prev = 0;
    for (long s = 0; s <= 100; s++) {
        double v = tern_prune_polynomial(0, 0.9, s, 0, 100);
        assert_true(v >= prev);
        prev = v;
    }
    tern_prune_scope sc;
    assert_int_equal(tern_prune_scope_parse("layer", &sc), TERN_OK);
    assert_int_equal(sc, TERN_PRUNE_LAYER);
    assert_int_equal(tern_prune_scope_parse("all", &sc), TERN_ERR_INVALID);
    assert_string_equal(tern_prune_scope_name(TERN_PRUNE_GLOBAL), "global");
}

/* The tensor codec: special values survive bit for bit in both encodings; bad blobs fail. */
static void codec(void **state)
{
    (void)state;
    enum { N = 1001 };
    float x[N], y[N];
    test_rng r = {3};
    int64_t shape[2] = {7, 143};
    for (int enc = 0; enc < 2; enc++) {
        for (int i = 0; i < N; i++) {
            uint32_t u = (uint32_t)test_rng_next(&r); /* random bits: deflate cannot help */
            if (enc == 1)
                u = 0x3f800000u + (uint32_t)(i % 5); /* repetitive: deflate wins */
            memcpy(&x[i], &u, 4);
            if (enc == 0 ? test_rng_next(&r) % 2 == 0 : i % 3 == 0) /* random bitmap for raw */
                x[i] = 0.0f;
        }
        x[1] = -0.0f;
        x[2] = NAN;
        x[4] = 1e-42f; /* denormal */
        uint8_t *blob = NULL;
        size_t len = 0;
        assert_int_equal(tern_sparse_encode(x, 2, shape, &blob, &len), TERN_OK);
        assert_int_equal(blob[5], enc); /* 0 raw, 1 deflate */
        tern_tensor_view v = {.name = "t", .dtype = TERN_DTYPE_U8, .ndim = 1, .data = blob,
                              .nbytes = len};
        tern_error err = {{0}};
        memset(y, 0xff, sizeof y);
        assert_int_equal(tern_sparse_decode(&v, 2, shape, y, &err), TERN_OK);
        assert_memory_equal(x, y, sizeof x);
        int64_t other[2] = {11, 91};
        assert_int_equal(tern_sparse_decode(&v, 2, other, y, &err), TERN_ERR_SHAPE);
        assert_non_null(strstr(err.message, "dimension 0"));
        v.nbytes = len - 3; /* truncated */
        assert_int_equal(tern_sparse_decode(&v, 2, shape, y, &err), TERN_ERR_FORMAT);
        v.nbytes = len;
        blob[len - 2] ^= 0x10; /* corrupt payload */
        assert_int_equal(tern_sparse_decode(&v, 2, shape, y, &err), TERN_ERR_FORMAT);
        assert_true(strstr(err.message, "checksum") || strstr(err.message, "deflate"));
        blob[len - 2] ^= 0x10;
        blob[0] = 'X';
        assert_int_equal(tern_sparse_decode(&v, 2, shape, y, &err), TERN_ERR_FORMAT);
        assert_non_null(strstr(err.message, "magic"));
        free(blob);
    }
}

static long file_size(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 ? (long)sb.st_size : -1;
}

static void assert_same_state(const tern_model *a, const tern_model *b)
{
    for (size_t i = 0; i < tern_model_tensor_count(a); i++) {
        const tern_model_tensor *x = tern_model_tensor_at(a, i), *y = tern_model_tensor_at(b, i);
        if (x->kind == TERN_TENSOR_COUNTER)
            assert_true(*x->counter == *y->counter);
        else if (memcmp(x->data, y->data, x->count * sizeof(float)) != 0)
            fail_msg("tensor %s differs", x->name);
    }
}

/* Prune, save compressed, load back into a fresh model (bit for bit, metadata too), through
 * the predictor; file much smaller at 90% than dense; corrupt and truncated files refused
 * without touching the model. */
static void compressed_files(void **state)
{
    (void)state;
    char dir[] = "/tmp/tern-prune-XXXXXX", dense[64], sparse[64], bad[64];
    assert_non_null(mkdtemp(dir));
    snprintf(dense, sizeof dense, "%s/dense.safetensors", dir);
    snprintf(sparse, sizeof sparse, "%s/sparse.safetensors", dir);
    snprintf(bad, sizeof bad, "%s/bad.safetensors", dir);
    tern_model *m = small_model(), *back = small_model();
    tern_pruner *p = NULL;
    tern_error err = {{0}};
    tern_prune_options o = {.include_stem = true, .include_depthwise = true,
                            .include_classifier = true};
    assert_int_equal(tern_pruner_create(m, &o, &p, &err), TERN_OK);
    assert_int_equal(tern_pruner_prune(p, 0.9), TERN_OK);
    /* a -0.0 and a counter value must come back as they were */
    tern_model_find_tensor(m, "features.0.1.bias")->data[0] = -0.0f;
    *tern_model_find_tensor(m, "features.0.1.num_batches_tracked")->counter = 12345;
    tern_model_invalidate(m);
    char *names[4] = {"a", "b", "c", "d"};
    tern_model_info info = {.input_size = 32, .resize = 28, .mean = {0.5f}, .std = {0.25f},
                            .nclasses = 4, .class_names = names};
    assert_int_equal(tern_model_save_file(m, &info, dense, &err), TERN_OK);
    assert_int_equal(tern_prune_save_file(m, &info, sparse, &err), TERN_OK);
    long ds = file_size(dense), ss = file_size(sparse);
    printf("dense %ld bytes, compressed at 90%% %ld bytes (%.2fx)\n", ds, ss, (double)ds / ss);
    assert_true(ss > 0 && ss * 3 < ds);

    /* round trip */
    assert_int_equal(tern_model_load_file(back, sparse, &err), TERN_OK);
    assert_same_state(m, back);
    tern_safetensors *st = NULL;
    assert_int_equal(tern_safetensors_open(sparse, NULL, &st, &err), TERN_OK);
    assert_true(tern_sparse_file_is_compressed(st));
    tern_model_info got = {0};
    assert_int_equal(tern_model_info_read(st, &got, &err), TERN_OK);
    assert_int_equal(got.nclasses, 4);
    assert_string_equal(got.class_names[3], "d");
    tern_model_info_free(&got);
    tern_model_options mo = tern_model_options_default(TERN_ARCH_MOBILENET_V3_LARGE);
    assert_int_equal(tern_model_options_from_metadata(st, &mo, &err), TERN_OK);
    assert_int_equal(mo.arch, TERN_ARCH_MOBILENET_V3_SMALL);
    tern_safetensors_close(&st);

    /* the predictor (C API) runs it like the dense file */
    tern_predictor *pd = NULL, *pc = NULL;
    assert_int_equal(tern_predictor_open(dense, NULL, &pd, &err), TERN_OK);
    assert_int_equal(tern_predictor_open(sparse, NULL, &pc, &err), TERN_OK);
    float x[32 * 32], ld[4], lc[4];
    test_rng r = {5};
    test_fill_uniform(&r, x, 32 * 32, -1, 1);
    assert_int_equal(tern_predictor_forward(pd, ld, x, 1), TERN_OK);
    assert_int_equal(tern_predictor_forward(pc, lc, x, 1), TERN_OK);
    assert_memory_equal(ld, lc, sizeof ld);
    tern_predictor_close(&pd);
    tern_predictor_close(&pc);

    /* corrupt: one byte flipped in the payload of the largest compressed tensor (found by
     * its "TSPR" magic in the data buffer) */
    FILE *f = fopen(sparse, "rb");
    assert_non_null(f);
    unsigned char *bytes = malloc((size_t)ss);
    assert_non_null(bytes);
    assert_int_equal(fread(bytes, 1, (size_t)ss, f), (size_t)ss);
    fclose(f);
    uint64_t hl = 0;
    for (int i = 0; i < 8; i++)
        hl |= (uint64_t)bytes[i] << (8 * i);
    size_t best = 0, best_len = 0, prev = 0;
    for (size_t i = 8 + (size_t)hl; i + 4 <= (size_t)ss; i++) {
        if (memcmp(bytes + i, "TSPR", 4) != 0 && i + 4 < (size_t)ss)
            continue;
        if (prev && i - prev > best_len)
            best = prev, best_len = i - prev;
        prev = i;
    }
    assert_true(best_len > 200);
    bytes[best + best_len / 2] ^= 0x5a;
    f = fopen(bad, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(bytes, 1, (size_t)ss, f), (size_t)ss);
    fclose(f);
    tern_model *fresh = small_model(), *ref = small_model();
    assert_int_equal(tern_model_load_file(fresh, bad, &err), TERN_ERR_FORMAT);
    assert_non_null(strstr(err.message, "tensor '"));
    assert_true(strstr(err.message, "checksum") || strstr(err.message, "deflate") ||
                strstr(err.message, "corrupt"));
    assert_same_state(fresh, ref); /* a failed load changes nothing */
    /* truncated */
    f = fopen(bad, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(bytes, 1, (size_t)ss - 1000, f), (size_t)ss - 1000);
    fclose(f);
    assert_int_not_equal(tern_model_load_file(fresh, bad, &err), TERN_OK);
    assert_true(strlen(err.message) > 0);
    assert_same_state(fresh, ref);
    free(bytes);
    tern_model_destroy(&fresh);
    tern_model_destroy(&ref);
    tern_pruner_destroy(&p);
    tern_model_destroy(&m);
    tern_model_destroy(&back);
    test_rm_tree(dir);
}

/* Every allocation of pruner creation, pruning and loading a compressed file failed in turn:
 * NOMEM, no leak, and the model untouched. */
static void allocation_failures(void **state)
{
    (void)state;
    char dir[] = "/tmp/tern-prunealloc-XXXXXX", path[64];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/p.safetensors", dir);
    tern_error err = {{0}};
    tern_model *src = small_model();
    tern_pruner *p = NULL;
    assert_int_equal(tern_pruner_create(src, NULL, &p, &err), TERN_OK);
    assert_int_equal(tern_pruner_prune(p, 0.8), TERN_OK);
    assert_int_equal(tern_prune_save_file(src, NULL, path, &err), TERN_OK);
    tern_pruner_destroy(&p);

    test_alloc_state st = {0};
    tern_allocator a = test_failing_allocator(&st);
    tern_model_options o = *tern_model_options_of(src);
    o.alloc = &a;
    tern_model *m = NULL, *ref = small_model();
    assert_int_equal(tern_model_create(&o, &m, &err), TERN_OK);
    long base = st.live;
    int done = 0;
    for (long fail = 1; done < 2 && fail < 1000; fail++) {
        st.fail_at = st.count + fail;
        tern_status s;
        if (done == 0) {
            s = tern_pruner_create(m, NULL, &p, &err);
            if (s == TERN_OK && (s = tern_pruner_prune(p, 0.5)) != TERN_OK)
                tern_pruner_destroy(&p);
        } else {
            s = tern_model_load_file(m, path, &err);
        }
        if (s == TERN_OK) {
            st.fail_at = 0;
            tern_pruner_destroy(&p);
            assert_int_equal(st.live, base);
            if (done == 1)
                assert_same_state(m, src);
            done++;
            fail = 0;
            continue;
        }
        assert_int_equal(s, TERN_ERR_NOMEM);
        assert_int_equal(st.live, base);
        if (done == 0)
            assert_same_state(m, ref); /* a failed prune changes nothing */
    }
    assert_int_equal(done, 2);
    tern_model_destroy(&m);
    tern_model_destroy(&ref);
    tern_model_destroy(&src);
    test_rm_tree(dir);
}

/* ---- tern prune ----------------------------------------------------------------------------- */

static void cli_prune(void **state)
{
    (void)state;
    char dir[] = "/tmp/tern-prunecli-XXXXXX", log[64], model[64], out[64], q[64];
    assert_non_null(mkdtemp(dir));
    snprintf(log, sizeof log, "%s/log", dir);
    snprintf(model, sizeof model, "%s/m.safetensors", dir);
    snprintf(out, sizeof out, "%s/p.safetensors", dir);
    snprintf(q, sizeof q, "%s/q.safetensors", dir);
    tern_model *m = small_model();
    tern_error err = {{0}};
    assert_int_equal(tern_model_save_file(m, NULL, model, &err), TERN_OK);
    tern_model_destroy(&m);

    assert_int_equal(test_run_tern(log, "prune --help"), 0);
    assert_true(test_file_contains(log, "--sparsity"));
    assert_true(test_file_contains(log, "--fine-tune-epochs"));
    assert_int_equal(test_run_tern(log, "prune --model %s --out %s", model, out), 1);
    assert_true(test_file_contains(log, "--sparsity"));
    assert_int_equal(
        test_run_tern(log, "prune --model %s --sparsity 0.5 --scope all --out %s", model, out), 1);
    assert_true(test_file_contains(log, "unknown --scope 'all'"));
    assert_int_equal(test_run_tern(log, "prune --model %s --sparsity 1.5 --out %s", model, out), 1);
    assert_int_equal(
        test_run_tern(log, "prune --model %s --sparsity 0.5 --include head --out %s", model, out),
        1);
    assert_true(test_file_contains(log, "unknown 'head'"));
    assert_int_equal(test_run_tern(log,
                                   "prune --model %s --sparsity 0.5 --fine-tune-epochs 1 --out %s",
                                   model, out),
                     1);
    assert_true(test_file_contains(log, "needs --data"));

    assert_int_equal(
        test_run_tern(log, "prune --model %s --sparsity 0.8 --scope layer --out %s", model, out),
        0);
    assert_true(test_file_contains(log, "features.1.block.2.0.weight"));
    assert_true(test_file_contains(log, "conv1x1"));
    assert_true(test_file_contains(log, "prunable weights:"));
    assert_true(test_file_contains(log, "(80.00%)"));
    assert_true(test_file_contains(log, "reloaded bit for bit"));
    assert_true(file_size(out) < file_size(model));
    assert_int_equal(test_run_tern(log, "info %s", out), 0);
    assert_true(test_file_contains(log, "compression: tern-sparse-v1"));
    /* tern predict runs the compressed file */
    char png[64];
    snprintf(png, sizeof png, "%s/x.png", dir);
    uint8_t pix[40 * 40];
    for (int i = 0; i < 40 * 40; i++)
        pix[i] = (uint8_t)(i * 37);
    tern_image img = {.width = 40, .height = 40, .channels = 1, .data = pix};
    assert_int_equal(tern_image_save_png(png, &img, &err), TERN_OK);
    assert_int_equal(test_run_tern(log, "predict --model %s --size 32 %s", out, png), 0);
    assert_true(test_file_contains(log, "x.png: "));
    /* a pruned file loads wherever a model file does: pruning it again keeps its zeros */
    assert_int_equal(test_run_tern(log, "prune --model %s --sparsity 0.9 --out %s", out, q), 0);
    assert_true(test_file_contains(log, "(90.00%)"));
    test_rm_tree(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(default_exclusions),
        cmocka_unit_test(thresholds_global_and_layer),
        cmocka_unit_test(ties_and_monotone),
        cmocka_unit_test(zeros_survive_fine_tuning),
        cmocka_unit_test(polynomial_schedule),
        cmocka_unit_test(codec),
        cmocka_unit_test(compressed_files),
        cmocka_unit_test(allocation_failures),
        cmocka_unit_test(cli_prune),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
