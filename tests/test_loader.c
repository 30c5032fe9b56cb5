/* Loader: every sample once per epoch, batch shapes, seeded and resumable order, values equal
 * to tern_transform_apply, subsets and drop_last, destruction mid-epoch, corrupt images skipped
 * (or failing a strict dataset), the LMDB cache (identical batches, served without the image
 * files, map growth, a cache path that is a file), and failure of each allocation at create.
 *
 * The IDX data set is written by the test: image i carries its index in its first two pixels,
 * so a batch can be mapped back to the samples it holds. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "tern/data.h"
#include "testutil.h"

#define NSAMPLES 300
#define SIDE 28

/* ---- fixtures ----------------------------------------------------------------------------- */

typedef struct {
    char dir[64];
    char images[128], labels[128];
    tern_dataset *ds;
} idx_fixture;

static void put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static void write_gz(const char *path, const void *bytes, size_t len)
{
    gzFile f = gzopen(path, "wb1");
    assert_non_null(f);
    const unsigned char *p = bytes;
    while (len > 0) {
        unsigned chunk = len > (1u << 30) ? 1u << 30 : (unsigned)len;
        assert_int_equal(gzwrite(f, p, chunk), (int)chunk);
        p += chunk;
        len -= chunk;
    }
    assert_int_equal(gzclose(f), Z_OK);
}

static uint8_t pixel_of(size_t i, size_t k)
{
    if (k == 0)
        return (uint8_t)(i & 255);
    if (k == 1)
        return (uint8_t)(i >> 8);
    return (uint8_t)((i * 13 + k * 7) & 255);
}

/* n images of side x side in a fresh directory; opened as a dataset. */
static void idx_create(idx_fixture *f, size_t n, int side)
{
    strcpy(f->dir, "/tmp/tern-loader-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->images, sizeof f->images, "%s/images.gz", f->dir);
    snprintf(f->labels, sizeof f->labels, "%s/labels.gz", f->dir);
    size_t px = (size_t)side * (size_t)side;
    unsigned char *img = malloc(16 + n * px), *lab = malloc(8 + n);
    assert_non_null(img);
    assert_non_null(lab);
    put_be32(img, 0x803);
    put_be32(img + 4, (uint32_t)n);
    put_be32(img + 8, (uint32_t)side);
    put_be32(img + 12, (uint32_t)side);
    put_be32(lab, 0x801);
    put_be32(lab + 4, (uint32_t)n);
    for (size_t i = 0; i < n; i++) {
        for (size_t k = 0; k < px; k++)
            img[16 + i * px + k] = pixel_of(i, k);
        lab[8 + i] = (unsigned char)(i % 10);
    }
    write_gz(f->images, img, 16 + n * px);
    write_gz(f->labels, lab, 8 + n);
    free(img);
    free(lab);
    tern_error err;
    tern_status s = tern_dataset_open_idx(f->images, f->labels, NULL, &f->ds, &err);
    if (s != TERN_OK)
        fail_msg("open_idx: %s", err.message);
}

static void idx_destroy(idx_fixture *f)
{
    tern_dataset_close(&f->ds);
    test_rm_tree(f->dir);
}

/* A plain transform that keeps 28x28 grey pixels as value / 255. */
static tern_transform identity_transform(void)
{
    return (tern_transform){.size = SIDE, .channels = 1};
}

static tern_loader *make_loader(const tern_dataset *ds, const tern_transform *t,
                                const tern_loader_options *opt)
{
    tern_loader *l = NULL;
    tern_error err;
    tern_status s = tern_loader_create(ds, t, opt, NULL, &l, &err);
    if (s != TERN_OK)
        fail_msg("loader_create: %s (%s)", tern_strerror(s), err.message);
    return l;
}

/* Sample index encoded in image b of an identity-transformed batch. */
static size_t sample_id(const float *images, int b)
{
    const float *p = images + (size_t)b * SIDE * SIDE;
    return (size_t)lroundf(p[0] * 255) + 256 * (size_t)lroundf(p[1] * 255);
}

/* One epoch's sample ids in order; returns how many; checks shapes and labels on the way. */
static size_t read_epoch(tern_loader *l, size_t *ids, size_t cap, int batch)
{
    size_t got = 0, batches = 0;
    bool short_seen = false;
    for (;;) {
        const float *images;
        const int32_t *labels;
        int n = -1;
        tern_error err;
        tern_status s = tern_loader_next(l, &images, &labels, &n, &err);
        if (s == TERN_ERR_NOT_FOUND) {
            assert_int_equal(n, 0);
            break;
        }
        if (s != TERN_OK)
            fail_msg("loader_next: %s (%s)", tern_strerror(s), err.message);
        assert_true(n >= 1 && n <= batch);
        batches++;
        for (int b = 0; b < n; b++) {
            size_t id = sample_id(images, b);
            assert_true(id < NSAMPLES);
            assert_int_equal(labels[b], (int32_t)(id % 10));
            assert_true(got < cap);
            ids[got++] = id;
        }
        /* All batches but the last are full. */
        assert_false(short_seen);
        short_seen = n < batch;
    }
    assert_int_equal(batches, tern_loader_batches(l));
    return got;
}

/* ---- tests ---------------------------------------------------------------------------------- */

static void test_epochs(void **state)
{
    (void)state;
    idx_fixture f;
    idx_create(&f, NSAMPLES, SIDE);
    tern_transform t = identity_transform();
    tern_loader *l = make_loader(f.ds, &t, &(tern_loader_options){.batch = 32, .shuffle = true,
                                                                  .seed = 1});
    assert_int_equal(tern_loader_batches(l), 10);
    size_t ids[3][NSAMPLES];
    for (int e = 0; e < 3; e++) {
        assert_int_equal(tern_loader_epoch(l), e);
        assert_int_equal(read_epoch(l, ids[e], NSAMPLES, 32), NSAMPLES);
        int seen[NSAMPLES] = {0};
        for (size_t i = 0; i < NSAMPLES; i++)
            seen[ids[e][i]]++;
        for (size_t i = 0; i < NSAMPLES; i++)
            assert_int_equal(seen[i], 1);
    }
    assert_int_equal(tern_loader_epoch(l), 3);
    assert_int_equal(tern_loader_skipped(l), 0);
    /* shuffled, and differently each epoch */
    size_t in_place = 0;
    for (size_t i = 0; i < NSAMPLES; i++)
        in_place += ids[0][i] == i;
    assert_true(in_place < 20);
    assert_memory_not_equal(ids[0], ids[1], sizeof ids[0]);
    assert_memory_not_equal(ids[1], ids[2], sizeof ids[0]);

    /* Same seed: same orders. Another seed: another order. */
    tern_loader *l2 = make_loader(f.ds, &t, &(tern_loader_options){.batch = 32,
                                                                   .shuffle = true, .seed = 1});
    size_t again[NSAMPLES];
    for (int e = 0; e < 2; e++) {
        read_epoch(l2, again, NSAMPLES, 32);
        assert_memory_equal(again, ids[e], sizeof again);
    }
    tern_loader_destroy(&l2);
    assert_null(l2);
    l2 = make_loader(f.ds, &t, &(tern_loader_options){.batch = 32, .shuffle = true, .seed = 2});
    read_epoch(l2, again, NSAMPLES, 32);
    assert_memory_not_equal(again, ids[0], sizeof again);
    tern_loader_destroy(&l2);

    /* Resume: set_epoch(2) on a fresh loader gives epoch 2's order; so does jumping back in
     * the middle of an epoch, with the borrowed batch still readable. */
    l2 = make_loader(f.ds, &t, &(tern_loader_options){.batch = 32, .shuffle = true, .seed = 1});
    tern_loader_set_epoch(l2, 2);
    assert_int_equal(tern_loader_epoch(l2), 2);
    read_epoch(l2, again, NSAMPLES, 32);
    assert_memory_equal(again, ids[2], sizeof again);
    assert_int_equal(tern_loader_epoch(l2), 3);
    const float *images;
    const int32_t *labels;
    int n;
    for (int b = 0; b < 3; b++)
        assert_int_equal(tern_loader_next(l2, &images, &labels, &n, NULL), TERN_OK);
    size_t held = sample_id(images, 0);
    tern_loader_set_epoch(l2, 1);
    assert_int_equal(sample_id(images, 0), held);
    assert_int_equal(tern_loader_epoch(l2), 1);
    read_epoch(l2, again, NSAMPLES, 32);
    assert_memory_equal(again, ids[1], sizeof again);
    tern_loader_destroy(&l2);

    /* Reseed: a loader reseeded to 2 (mid-epoch) then back to 1 gives the orders of loaders
     * created with those seeds, from epoch 0. */
    size_t seed2[NSAMPLES];
    l2 = make_loader(f.ds, &t, &(tern_loader_options){.batch = 32, .shuffle = true, .seed = 2});
    read_epoch(l2, seed2, NSAMPLES, 32);
    tern_loader_destroy(&l2);
    l2 = make_loader(f.ds, &t, &(tern_loader_options){.batch = 32, .shuffle = true, .seed = 1});
    assert_int_equal(tern_loader_next(l2, &images, &labels, &n, NULL), TERN_OK);
    tern_loader_set_seed(l2, 2);
    assert_int_equal(tern_loader_epoch(l2), 0);
    read_epoch(l2, again, NSAMPLES, 32);
    assert_memory_equal(again, seed2, sizeof again);
    tern_loader_set_seed(l2, 1);
    for (int e = 0; e < 2; e++) {
        read_epoch(l2, again, NSAMPLES, 32);
        assert_memory_equal(again, ids[e], sizeof again);
    }

    /* Without shuffling: dataset order every epoch. */
    l2 = make_loader(f.ds, &t, &(tern_loader_options){.batch = 50});
    for (int e = 0; e < 2; e++) {
        read_epoch(l2, again, NSAMPLES, 50);
        for (size_t i = 0; i < NSAMPLES; i++)
            assert_int_equal(again[i], i);
    }
    tern_loader_destroy(&l2);

    tern_loader_destroy(&l);
    tern_loader_destroy(&l); /* NULL is fine */
    idx_destroy(&f);
}

static void test_batches_and_subsets(void **state)
{
    (void)state;
    idx_fixture f;
    idx_create(&f, NSAMPLES, SIDE);
    tern_transform t = identity_transform();

    /* drop_last: 300 = 9 * 32 + 12, the 12 are dropped */
    tern_loader *l = make_loader(f.ds, &t, &(tern_loader_options){.batch = 32, .shuffle = true,
                                                                  .drop_last = true, .seed = 3});
    assert_int_equal(tern_loader_batches(l), 9);
    size_t ids[NSAMPLES];
    for (int e = 0; e < 2; e++)
        assert_int_equal(read_epoch(l, ids, NSAMPLES, 32), 9 * 32);
    tern_loader_destroy(&l);

    /* batch 1 and a batch larger than the data set */
    l = make_loader(f.ds, &t, &(tern_loader_options){.batch = 1, .shuffle = true});
    assert_int_equal(read_epoch(l, ids, NSAMPLES, 1), NSAMPLES);
    tern_loader_destroy(&l);
    l = make_loader(f.ds, &t, &(tern_loader_options){.batch = 1000});
    assert_int_equal(tern_loader_batches(l), 1);
    assert_int_equal(read_epoch(l, ids, NSAMPLES, 1000), NSAMPLES);
    tern_loader_destroy(&l);

    /* a subset, copied at create */
    size_t subset[] = {299, 5, 17, 100, 42, 250, 7};
    size_t nsub = sizeof subset / sizeof subset[0];
    size_t *copy = malloc(sizeof subset);
    assert_non_null(copy);
    memcpy(copy, subset, sizeof subset);
    l = make_loader(f.ds, &t, &(tern_loader_options){.batch = 3, .shuffle = true, .seed = 9,
                                                     .indices = copy, .nindices = nsub});
    memset(copy, 0xff, sizeof subset);
    free(copy);
    assert_int_equal(tern_loader_batches(l), 3);
    for (int e = 0; e < 2; e++) {
        assert_int_equal(read_epoch(l, ids, NSAMPLES, 3), nsub);
        for (size_t i = 0; i < nsub; i++) {
            int found = 0;
            for (size_t j = 0; j < nsub; j++)
                found += ids[j] == subset[i];
            assert_int_equal(found, 1);
        }
    }
    tern_loader_destroy(&l);
    idx_destroy(&f);
}

static void test_values_match_transform(void **state)
{
    (void)state;
    idx_fixture f;
    idx_create(&f, 64, SIDE);
    /* Deterministic: resize to 32, center crop 24, grey -> RGB, normalized. */
    tern_transform t = {.size = 24, .channels = 3, .resize = 32};
    tern_transform_normalize_imagenet(&t);
    tern_loader *l = make_loader(f.ds, &t, &(tern_loader_options){.batch = 10, .shuffle = true,
                                                                  .seed = 4});
    /* The identity of each sample comes from an identity loader with the same seed. */
    tern_transform ti = identity_transform();
    tern_loader *li = make_loader(f.ds, &ti, &(tern_loader_options){.batch = 10, .shuffle = true,
                                                                    .seed = 4});
    const size_t per = 24 * 24 * 3;
    float *want = malloc(per * sizeof *want);
    assert_non_null(want);
    size_t total = 0;
    for (;;) {
        const float *images, *ii;
        const int32_t *labels, *li_labels;
        int n, ni;
        tern_status s = tern_loader_next(l, &images, &labels, &n, NULL);
        assert_int_equal(tern_loader_next(li, &ii, &li_labels, &ni, NULL), s);
        if (s == TERN_ERR_NOT_FOUND)
            break;
        assert_int_equal(s, TERN_OK);
        assert_int_equal(n, ni);
        for (int b = 0; b < n; b++) {
            size_t id = sample_id(ii, b);
            tern_image img;
            assert_int_equal(tern_dataset_image(f.ds, id, NULL, &img, NULL), TERN_OK);
            tern_rng rng;
            tern_rng_seed(&rng, 0);
            assert_int_equal(tern_transform_apply(&t, &img, &rng, want), TERN_OK);
            tern_image_free(NULL, &img);
            assert_memory_equal(images + (size_t)b * per, want, per * sizeof *want);
            assert_int_equal(labels[b], li_labels[b]);
        }
        total += (size_t)n;
    }
    assert_int_equal(total, 64);
    free(want);
    tern_loader_destroy(&l);
    tern_loader_destroy(&li);

    /* Random transforms: identical for the same seed whatever the timing, different for
     * another seed. */
    tern_transform tr = {.size = 24, .channels = 1, .random_resized_crop = true, .hflip = true,
                         .rotate_deg = 10, .brightness = 0.2f};
    tern_loader *a = make_loader(f.ds, &tr, &(tern_loader_options){.batch = 8, .shuffle = true,
                                                                   .seed = 5});
    tern_loader *b = make_loader(f.ds, &tr, &(tern_loader_options){.batch = 8, .shuffle = true,
                                                                   .seed = 5});
    tern_loader *c = make_loader(f.ds, &tr, &(tern_loader_options){.batch = 8, .shuffle = true,
                                                                   .seed = 6});
    int differ = 0;
    for (int i = 0; i < 20; i++) {
        const float *ia, *ib, *ic;
        const int32_t *la, *lb, *lc;
        int na, nb, nc;
        tern_status s = tern_loader_next(a, &ia, &la, &na, NULL);
        assert_int_equal(tern_loader_next(b, &ib, &lb, &nb, NULL), s);
        assert_int_equal(tern_loader_next(c, &ic, &lc, &nc, NULL), s);
        if (i % 3 == 0)
            nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL); /* workers run ahead */
        if (s == TERN_ERR_NOT_FOUND)
            continue;
        assert_int_equal(s, TERN_OK);
        assert_int_equal(na, nb);
        assert_memory_equal(ia, ib, (size_t)na * 24 * 24 * sizeof(float));
        assert_memory_equal(la, lb, (size_t)na * sizeof *la);
        differ += memcmp(ia, ic, (size_t)na * 24 * 24 * sizeof(float)) != 0;
    }
    assert_true(differ > 0);
    tern_loader_destroy(&a);
    tern_loader_destroy(&b);
    tern_loader_destroy(&c);
    idx_destroy(&f);
}

static void test_destroy_mid_epoch(void **state)
{
    (void)state;
    idx_fixture f;
    idx_create(&f, NSAMPLES, SIDE);
    tern_transform t = {.size = 64, .channels = 3, .rotate_deg = 30, .hflip = true};
    for (int reads = 0; reads < 4; reads++) {
        tern_loader *l = make_loader(f.ds, &t, &(tern_loader_options){.batch = 16,
                                                                      .shuffle = true});
        for (int i = 0; i < reads; i++) {
            const float *images;
            const int32_t *labels;
            int n;
            assert_int_equal(tern_loader_next(l, &images, &labels, &n, NULL), TERN_OK);
        }
        if (reads == 2)
            tern_loader_set_epoch(l, 7);
        tern_loader_destroy(&l);
        assert_null(l);
    }
    idx_destroy(&f);
}

static void test_invalid(void **state)
{
    (void)state;
    idx_fixture f;
    idx_create(&f, 20, SIDE);
    tern_transform t = identity_transform();
    tern_loader *l = NULL;
    tern_error err;
    assert_int_equal(tern_loader_create(f.ds, &t, &(tern_loader_options){.batch = 0}, NULL, &l,
                                        &err),
                     TERN_ERR_INVALID);
    size_t bad[] = {3, 20};
    assert_int_equal(tern_loader_create(f.ds, &t,
                                        &(tern_loader_options){.batch = 2, .indices = bad,
                                                               .nindices = 2},
                                        NULL, &l, &err),
                     TERN_ERR_INVALID);
    assert_non_null(strstr(err.message, "20"));
    assert_int_equal(tern_loader_create(f.ds, &t,
                                        &(tern_loader_options){.batch = 2, .indices = bad,
                                                               .nindices = 0},
                                        NULL, &l, &err),
                     TERN_ERR_INVALID);
    tern_transform tb = {.size = 0, .channels = 1};
    assert_int_equal(tern_loader_create(f.ds, &tb, &(tern_loader_options){.batch = 2}, NULL, &l,
                                        &err),
                     TERN_ERR_INVALID);
    tb = (tern_transform){.size = 8, .channels = 2};
    assert_int_equal(tern_loader_create(f.ds, &tb, &(tern_loader_options){.batch = 2}, NULL, &l,
                                        &err),
                     TERN_ERR_INVALID);
    assert_null(l);
    /* A transform the transform code rejects fails the batch with its status. */
    tb = (tern_transform){.size = 8, .channels = 1, .mean = {0.5f}, .std = {-1}};
    l = make_loader(f.ds, &tb, &(tern_loader_options){.batch = 4});
    const float *images;
    const int32_t *labels;
    int n = -1;
    assert_int_equal(tern_loader_next(l, &images, &labels, &n, &err), TERN_ERR_INVALID);
    assert_int_equal(n, 0);
    assert_null(images);
    tern_loader_destroy(&l);
    idx_destroy(&f);
}

static void test_alloc_failure(void **state)
{
    (void)state;
    idx_fixture f;
    idx_create(&f, 40, SIDE);
    tern_transform t = identity_transform();
    for (long fail = 1;; fail++) {
        test_alloc_state st = {.fail_at = fail};
        tern_allocator a = test_failing_allocator(&st);
        tern_loader *l = NULL;
        tern_error err;
        tern_status s = tern_loader_create(f.ds, &t, &(tern_loader_options){.batch = 8}, &a, &l,
                                           &err);
        if (s == TERN_OK) {
            tern_loader_destroy(&l);
            assert_int_equal(st.live, 0);
            assert_true(fail > 3);
            break;
        }
        assert_int_equal(s, TERN_ERR_NOMEM);
        assert_null(l);
        assert_int_equal(st.live, 0);
    }
    idx_destroy(&f);
}

/* ---- folder data sets: corrupt images, the cache ---------------------------------------------- */

typedef struct {
    char dir[64];
    int good;
} folder_fixture;

/* Two classes of small PNGs of assorted sizes; optionally one corrupt file. Image j has
 * (j, 0, ...) in its first pixel so it can be recognized. */
static void folder_create(folder_fixture *f, int per_class, bool corrupt)
{
    strcpy(f->dir, "/tmp/tern-loader-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    char path[256];
    int j = 0;
    for (int c = 0; c < 2; c++) {
        snprintf(path, sizeof path, "%s/class%d", f->dir, c);
        assert_int_equal(mkdir(path, 0755), 0);
        for (int i = 0; i < per_class; i++, j++) {
            int w = 20 + (j * 7) % 23, h = 18 + (j * 5) % 19;
            tern_image img = {.width = w, .height = h, .channels = 3};
            img.data = malloc((size_t)w * (size_t)h * 3);
            assert_non_null(img.data);
            for (int k = 0; k < w * h * 3; k++)
                img.data[k] = (uint8_t)((k * 31 + j * 17) & 255);
            img.data[0] = (uint8_t)j;
            snprintf(path, sizeof path, "%s/class%d/img%02d.png", f->dir, c, i);
            assert_int_equal(tern_image_save_png(path, &img, NULL), TERN_OK);
            free(img.data);
        }
    }
    f->good = j;
    if (corrupt) {
        snprintf(path, sizeof path, "%s/class1/broken.png", f->dir);
        FILE *fp = fopen(path, "wb");
        assert_non_null(fp);
        const unsigned char junk[] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 1, 2, 3};
        assert_int_equal(fwrite(junk, 1, sizeof junk, fp), sizeof junk);
        assert_int_equal(fclose(fp), 0);
    }
}

static int warnings;
static void count_warning(void *user, const char *message)
{
    (void)user;
    (void)message;
    warnings++;
}

static void test_corrupt_skipped(void **state)
{
    (void)state;
    folder_fixture f;
    folder_create(&f, 6, true);
    tern_dataset *ds = NULL;
    tern_error err;
    tern_folder_options fo = {.warn = count_warning};
    assert_int_equal(tern_dataset_open_folder(f.dir, &fo, NULL, &ds, &err), TERN_OK);
    assert_int_equal(tern_dataset_size(ds), 13);
    tern_transform t = {.size = 16, .channels = 3};
    tern_loader *l = make_loader(ds, &t, &(tern_loader_options){.batch = 4, .shuffle = true,
                                                                .seed = 11});
    for (int e = 0; e < 2; e++) {
        int total = 0, batches = 0, counts[4] = {0};
        for (;;) {
            const float *images;
            const int32_t *labels;
            int n;
            tern_status s = tern_loader_next(l, &images, &labels, &n, &err);
            if (s == TERN_ERR_NOT_FOUND)
                break;
            if (s != TERN_OK)
                fail_msg("next: %s", err.message);
            counts[batches++] = n;
            total += n;
        }
        /* 12 good images in batches of 4 (the batch that met the corrupt one was topped up
         * from the following samples), the skip counted once per epoch */
        assert_int_equal(total, 12);
        assert_int_equal(batches, 3);
        assert_int_equal(counts[0] + counts[1] + counts[2], 12);
        assert_int_equal(tern_loader_skipped(l), (size_t)e + 1);
    }
    assert_int_equal(warnings, 1); /* the dataset reports a bad file once */
    tern_loader_destroy(&l);
    tern_dataset_close(&ds);

    /* strict: the loader returns the decoder's error */
    fo.strict = true;
    assert_int_equal(tern_dataset_open_folder(f.dir, &fo, NULL, &ds, &err), TERN_OK);
    l = make_loader(ds, &t, &(tern_loader_options){.batch = 4, .shuffle = true, .seed = 11});
    tern_status first_error = TERN_OK;
    for (int i = 0; i < 6; i++) {
        const float *images;
        const int32_t *labels;
        int n;
        tern_status s = tern_loader_next(l, &images, &labels, &n, &err);
        if (s != TERN_OK && s != TERN_ERR_NOT_FOUND) {
            first_error = s;
            assert_non_null(strstr(err.message, "broken.png"));
            break;
        }
    }
    assert_int_equal(first_error, TERN_ERR_FORMAT);
    assert_int_equal(tern_loader_skipped(l), 0);
    tern_loader_destroy(&l);
    tern_dataset_close(&ds);
    test_rm_tree(f.dir);
}

/* One epoch's batches (images then labels), concatenated into buf; returns floats used. */
static size_t collect_epoch(tern_loader *l, float *buf, size_t cap, int32_t *labs, size_t *nlab)
{
    size_t used = 0;
    *nlab = 0;
    for (;;) {
        const float *images;
        const int32_t *labels;
        int n;
        tern_error err;
        tern_status s = tern_loader_next(l, &images, &labels, &n, &err);
        if (s == TERN_ERR_NOT_FOUND)
            return used;
        if (s != TERN_OK)
            fail_msg("next: %s", err.message);
        size_t per = 16 * 16 * 3;
        assert_true(used + (size_t)n * per <= cap);
        memcpy(buf + used, images, (size_t)n * per * sizeof *buf);
        used += (size_t)n * per;
        memcpy(labs + *nlab, labels, (size_t)n * sizeof *labs);
        *nlab += (size_t)n;
    }
}

static off_t file_size(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 ? sb.st_size : -1;
}

static void test_cache(void **state)
{
    (void)state;
    folder_fixture f;
    folder_create(&f, 8, false);
    tern_dataset *ds = NULL;
    tern_error err;
    assert_int_equal(tern_dataset_open_folder(f.dir, NULL, NULL, &ds, &err), TERN_OK);
    char cache[128], datafile[160];
    snprintf(cache, sizeof cache, "%s.cache", f.dir);
    snprintf(datafile, sizeof datafile, "%s/data.mdb", cache);
    tern_transform t = {.size = 16, .channels = 3, .resize = 18};
    const size_t cap = 16 * 16 * 3 * 16;
    float *e0 = malloc(cap * sizeof(float)), *e1 = malloc(cap * sizeof(float));
    float *plain = malloc(cap * sizeof(float));
    assert_non_null(e0);
    assert_non_null(e1);
    assert_non_null(plain);
    int32_t l0[16], l1[16];
    size_t n0, n1;

    for (int cache_size = 0; cache_size <= 24; cache_size += 24) {
        tern_loader_options opt = {.batch = 5, .cache_dir = cache, .cache_size = cache_size};
        tern_loader *l = make_loader(ds, &t, &opt);
        size_t u0 = collect_epoch(l, e0, cap, l0, &n0);
        assert_int_equal(n0, 16);
        size_t u1 = collect_epoch(l, e1, cap, l1, &n1);
        assert_int_equal(u0, u1);
        assert_memory_equal(e0, e1, u0 * sizeof(float));
        assert_memory_equal(l0, l1, sizeof l0);
        tern_loader_destroy(&l);
        assert_true(file_size(datafile) > 16 * 18 * 18 * 3);

        if (cache_size == 0) {
            /* Images cached as decoded: the same as not caching at all. */
            opt.cache_dir = NULL;
            l = make_loader(ds, &t, &opt);
            size_t up = collect_epoch(l, plain, cap, l1, &n1);
            assert_int_equal(up, u0);
            assert_memory_equal(plain, e0, u0 * sizeof(float));
            tern_loader_destroy(&l);
        }
    }

    /* The cache serves every image without the files: delete them, reopen the cache (a new
     * loader, as in a later run) and get the same batches and nothing skipped. */
    char path[256];
    for (int c = 0; c < 2; c++)
        for (int i = 0; i < 8; i++) {
            snprintf(path, sizeof path, "%s/class%d/img%02d.png", f.dir, c, i);
            assert_int_equal(unlink(path), 0);
        }
    tern_loader *l = make_loader(ds, &t, &(tern_loader_options){.batch = 5, .cache_dir = cache,
                                                                .cache_size = 24});
    collect_epoch(l, e1, cap, l1, &n1);
    assert_int_equal(n1, 16);
    assert_memory_equal(e0, e1, 16 * 16 * 16 * 3 * sizeof(float));
    assert_int_equal(tern_loader_skipped(l), 0);
    tern_loader_destroy(&l);
    /* Without the cache the same loader finds nothing to decode. */
    l = make_loader(ds, &t, &(tern_loader_options){.batch = 5});
    collect_epoch(l, e1, cap, l1, &n1);
    assert_int_equal(n1, 0);
    assert_int_equal(tern_loader_skipped(l), 16);
    tern_loader_destroy(&l);

    free(e0);
    free(e1);
    free(plain);
    tern_dataset_close(&ds);
    test_rm_tree(cache);
    test_rm_tree(f.dir);
}

static void test_cache_bad_dir(void **state)
{
    (void)state;
    idx_fixture f;
    idx_create(&f, 20, SIDE);
    char path[160];
    snprintf(path, sizeof path, "%s/not-a-dir", f.dir);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs("x", fp);
    fclose(fp);
    tern_transform t = identity_transform();
    tern_loader *l = NULL;
    tern_error err;
    assert_int_equal(tern_loader_create(f.ds, &t,
                                        &(tern_loader_options){.batch = 4, .cache_dir = path},
                                        NULL, &l, &err),
                     TERN_ERR_IO);
    assert_null(l);
    assert_non_null(strstr(err.message, "not-a-dir"));
    snprintf(path, sizeof path, "%s/missing/deeper", f.dir);
    assert_int_equal(tern_loader_create(f.ds, &t,
                                        &(tern_loader_options){.batch = 4, .cache_dir = path},
                                        NULL, &l, &err),
                     TERN_ERR_IO);
    assert_null(l);
    idx_destroy(&f);
}

/* Over 64 MiB of images: the map (64 MiB at first) has to grow during the first epoch. */
static void test_cache_grows(void **state)
{
    (void)state;
    idx_fixture f;
    const int side = 1024;
    const size_t n = 72;
    idx_create(&f, n, side);
    char cache[160];
    snprintf(cache, sizeof cache, "%s/cache", f.dir);
    tern_transform t = {.size = 8, .channels = 1, .resize = 8};
    tern_loader *l = make_loader(f.ds, &t, &(tern_loader_options){.batch = 8, .cache_dir = cache});
    float *e0 = malloc(n * 64 * sizeof(float)), *e1 = malloc(n * 64 * sizeof(float));
    assert_non_null(e0);
    assert_non_null(e1);
    for (int e = 0; e < 2; e++) {
        float *dst = e ? e1 : e0;
        size_t got = 0;
        for (;;) {
            const float *images;
            const int32_t *labels;
            int k;
            tern_error err;
            tern_status s = tern_loader_next(l, &images, &labels, &k, &err);
            if (s == TERN_ERR_NOT_FOUND)
                break;
            if (s != TERN_OK)
                fail_msg("next: %s", err.message);
            memcpy(dst + got * 64, images, (size_t)k * 64 * sizeof(float));
            got += (size_t)k;
        }
        assert_int_equal(got, n);
    }
    assert_memory_equal(e0, e1, n * 64 * sizeof(float));
    tern_loader_destroy(&l);
    char datafile[200];
    snprintf(datafile, sizeof datafile, "%s/data.mdb", cache);
    assert_true(file_size(datafile) > (off_t)64 << 20);
    free(e0);
    free(e1);
    idx_destroy(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_epochs),
        cmocka_unit_test(test_batches_and_subsets),
        cmocka_unit_test(test_values_match_transform),
        cmocka_unit_test(test_destroy_mid_epoch),
        cmocka_unit_test(test_invalid),
        cmocka_unit_test(test_alloc_failure),
        cmocka_unit_test(test_corrupt_skipped),
        cmocka_unit_test(test_cache),
        cmocka_unit_test(test_cache_bad_dir),
        cmocka_unit_test(test_cache_grows),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
