/* Datasets: IDX files (gzipped and plain) written by the test read back exactly, malformed ones
 * fail with messages naming the file and the problem; the real Fashion-MNIST when installed;
 * image folders in ImageFolder order with hidden and foreign files ignored, corrupt images
 * skipped with one warning (or failing in strict mode), decoding from several threads. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <jpeglib.h>

#include "data/dataset.h"
#include "tern/data.h"
#include "testutil.h"

#define FASHION_DIR "/usr/share/datasets/fashion-mnist"

/* ---- helpers ---------------------------------------------------------------------------- */

static char *make_tmpdir(void)
{
    char *dir = strdup("/tmp/tern-ds-XXXXXX");
    assert_non_null(dir);
    assert_non_null(mkdtemp(dir));
    return dir;
}

/* rm -r for the small trees the tests build. */
static void remove_tree(const char *path)
{
    struct stat sb;
    if (lstat(path, &sb) != 0)
        return;
    if (S_ISDIR(sb.st_mode)) {
        DIR *d = opendir(path);
        assert_non_null(d);
        struct dirent *e;
        char child[4096];
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            snprintf(child, sizeof child, "%s/%s", path, e->d_name);
            remove_tree(child);
        }
        closedir(d);
        assert_int_equal(rmdir(path), 0);
    } else {
        assert_int_equal(unlink(path), 0);
    }
}

static void write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (len)
        assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

/* Writes bytes to path, gzipped or plain. */
static void write_maybe_gz(const char *path, const unsigned char *b, size_t len, bool gz)
{
    if (!gz) {
        write_file(path, b, len);
        return;
    }
    gzFile f = gzopen(path, "wb");
    assert_non_null(f);
    if (len)
        assert_int_equal(gzwrite(f, b, (unsigned)len), (int)len);
    assert_int_equal(gzclose(f), Z_OK);
}

static size_t put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
    return 4;
}

/* IDX image file: magic, n, rows, cols, then `data_len` bytes of data (pixel i = i * 7 + 1). */
static void write_idx_images(const char *path, uint32_t magic, uint32_t n, uint32_t rows,
                             uint32_t cols, size_t data_len, bool gz)
{
    unsigned char *b = malloc(16 + data_len);
    assert_non_null(b);
    size_t k = put_be32(b, magic);
    k += put_be32(b + k, n);
    k += put_be32(b + k, rows);
    k += put_be32(b + k, cols);
    for (size_t i = 0; i < data_len; i++)
        b[k + i] = (unsigned char)(i * 7 + 1);
    write_maybe_gz(path, b, k + data_len, gz);
    free(b);
}

static void write_idx_labels(const char *path, uint32_t n, const unsigned char *labels,
                             size_t count, bool gz)
{
    unsigned char *b = malloc(8 + count);
    assert_non_null(b);
    size_t k = put_be32(b, 0x00000801);
    k += put_be32(b + k, n);
    memcpy(b + k, labels, count);
    write_maybe_gz(path, b, k + count, gz);
    free(b);
}

static tern_status open_idx(const char *dir, tern_dataset **ds, tern_error *err)
{
    char ip[4200], lp[4200];
    snprintf(ip, sizeof ip, "%s/imgs", dir);
    snprintf(lp, sizeof lp, "%s/labels", dir);
    return tern_dataset_open_idx(ip, lp, NULL, ds, err);
}

static void expect_idx_error(const char *dir, tern_status want, const char *needle)
{
    tern_dataset *ds = NULL;
    tern_error err = {{0}};
    tern_status s = open_idx(dir, &ds, &err);
    if (s != want || !strstr(err.message, needle))
        fail_msg("got status %d, message \"%s\"; wanted %d with \"%s\"", s, err.message, want,
                 needle);
    assert_null(ds);
}

/* ---- IDX -------------------------------------------------------------------------------- */

static void test_idx_roundtrip(void **state)
{
    (void)state;
    for (int gz = 0; gz < 2; gz++) {
        char *dir = make_tmpdir();
        char ip[4200], lp[4200];
        snprintf(ip, sizeof ip, "%s/imgs", dir);
        snprintf(lp, sizeof lp, "%s/labels", dir);
        const unsigned char labels[3] = {9, 0, 4};
        write_idx_images(ip, 0x803, 3, 2, 3, 18, gz);
        write_idx_labels(lp, 3, labels, 3, gz);
        tern_dataset *ds = NULL;
        tern_error err = {{0}};
        if (tern_dataset_open_idx(ip, lp, NULL, &ds, &err) != TERN_OK)
            fail_msg("%s", err.message);
        assert_int_equal(tern_dataset_size(ds), 3);
        assert_int_equal(tern_dataset_num_classes(ds), 10);
        assert_false(tern_dataset_strict(ds));
        for (size_t i = 0; i < 3; i++) {
            assert_int_equal(tern_dataset_label(ds, i), labels[i]);
            tern_image img;
            assert_int_equal(tern_dataset_image(ds, i, NULL, &img, &err), TERN_OK);
            assert_int_equal(img.width, 3);
            assert_int_equal(img.height, 2);
            assert_int_equal(img.channels, 1);
            for (size_t p = 0; p < 6; p++)
                assert_int_equal(img.data[p], (unsigned char)((i * 6 + p) * 7 + 1));
            tern_image_free(NULL, &img);
        }
        assert_int_equal(tern_dataset_label(ds, 3), -1);
        tern_image img = {0};
        assert_int_equal(tern_dataset_image(ds, 3, NULL, &img, &err), TERN_ERR_INVALID);
        char buf[64];
        assert_string_equal(tern_dataset_source(ds, 2, buf, sizeof buf), "imgs#2");
        assert_null(tern_dataset_source(ds, 3, buf, sizeof buf));
        assert_string_equal(tern_dataset_class_name(ds, 9), "9");
        assert_null(tern_dataset_class_name(ds, 10));
        assert_null(tern_dataset_class_name(ds, -1));
        tern_dataset_close(&ds);
        assert_null(ds);
        tern_dataset_close(&ds); /* harmless */
        remove_tree(dir);
        free(dir);
    }
}

static void test_idx_errors(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char ip[4200], lp[4200];
    snprintf(ip, sizeof ip, "%s/imgs", dir);
    snprintf(lp, sizeof lp, "%s/labels", dir);
    const unsigned char labels[4] = {1, 2, 3, 10};

    /* Wrong magic (a label file given as images). */
    write_idx_images(ip, 0x801, 3, 2, 3, 18, true);
    write_idx_labels(lp, 3, labels, 3, true);
    expect_idx_error(dir, TERN_ERR_FORMAT, "bad magic number 0x00000801");
    expect_idx_error(dir, TERN_ERR_FORMAT, ip);

    /* Truncated data, gzipped and plain. */
    for (int gz = 0; gz < 2; gz++) {
        write_idx_images(ip, 0x803, 3, 2, 3, 10, gz);
        expect_idx_error(dir, TERN_ERR_FORMAT,
                         "truncated: header says 3 images of 2x3, found 10 bytes of data");
    }
    /* Truncated header. */
    write_file(ip, "\0\0\x08\x03\0\0", 6);
    expect_idx_error(dir, TERN_ERR_FORMAT, "IDX header");
    /* Empty and missing files. */
    write_file(ip, "", 0);
    expect_idx_error(dir, TERN_ERR_FORMAT, "truncated");
    unlink(ip);
    expect_idx_error(dir, TERN_ERR_IO, "cannot open");
    /* A tiny file claiming 60000 images of 28x28 (not allocated: counted). */
    write_idx_labels(lp, 60000, labels, 3, true);
    write_idx_images(ip, 0x803, 60000, 28, 28, 1234, true);
    expect_idx_error(dir, TERN_ERR_FORMAT,
                     "truncated: header says 60000 images of 28x28, found 1234 bytes of data");
    write_idx_images(ip, 0x803, 60000, 28, 28, 1234, false);
    expect_idx_error(dir, TERN_ERR_FORMAT, "found 1234 bytes of data");
    /* A header that overflows. */
    write_idx_images(ip, 0x803, 0xFFFFFFFF, 0xFFFF, 0xFFFF, 0, false);
    write_idx_labels(lp, 0xFFFFFFFF, labels, 3, true);
    expect_idx_error(dir, TERN_ERR_FORMAT, ip);
    write_idx_labels(lp, 3, labels, 3, true);
    /* Extra bytes after the data. */
    write_idx_images(ip, 0x803, 3, 2, 3, 19, true);
    expect_idx_error(dir, TERN_ERR_FORMAT, "1 more bytes follow");
    /* Zero-sized images. */
    write_idx_images(ip, 0x803, 3, 0, 3, 0, true);
    expect_idx_error(dir, TERN_ERR_FORMAT, "bad image size 0x3");

    /* Label and image counts disagree. */
    write_idx_images(ip, 0x803, 3, 2, 3, 18, true);
    write_idx_labels(lp, 4, labels, 4, true);
    expect_idx_error(dir, TERN_ERR_FORMAT, "has 3 images but");
    /* Labels truncated. */
    write_idx_labels(lp, 3, labels, 2, true);
    expect_idx_error(dir, TERN_ERR_FORMAT, "header says 3 labels, found 2 bytes of data");
    /* Label out of range. */
    write_idx_images(ip, 0x803, 4, 2, 3, 24, false);
    write_idx_labels(lp, 4, labels, 4, false);
    expect_idx_error(dir, TERN_ERR_FORMAT, "label 10 of sample 3 is out of range");
    /* A corrupt gzip stream. */
    write_idx_images(ip, 0x803, 3, 2, 3, 18, true);
    FILE *f = fopen(ip, "r+b");
    assert_non_null(f);
    fseek(f, 20, SEEK_SET);
    fputc(0xAB, f);
    fputc(0xCD, f);
    fclose(f);
    write_idx_labels(lp, 3, labels, 3, true);
    {
        tern_dataset *ds = NULL;
        tern_error err = {{0}};
        assert_int_not_equal(open_idx(dir, &ds, &err), TERN_OK);
        assert_non_null(strstr(err.message, ip));
        assert_null(ds);
    }
    remove_tree(dir);
    free(dir);
}

static void test_idx_allocation_failures(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char ip[4200], lp[4200];
    snprintf(ip, sizeof ip, "%s/imgs", dir);
    snprintf(lp, sizeof lp, "%s/labels", dir);
    const unsigned char labels[3] = {1, 2, 3};
    write_idx_images(ip, 0x803, 3, 2, 3, 18, true);
    write_idx_labels(lp, 3, labels, 3, true);
    bool ok = false;
    for (long k = 1; k < 30 && !ok; k++) {
        test_alloc_state st = {.fail_at = k};
        tern_allocator a = test_failing_allocator(&st);
        tern_dataset *ds = NULL;
        tern_error err;
        tern_status s = tern_dataset_open_idx(ip, lp, &a, &ds, &err);
        if (s == TERN_OK) {
            ok = true;
            tern_dataset_close(&ds);
        } else {
            assert_int_equal(s, TERN_ERR_NOMEM);
            assert_null(ds);
        }
        assert_int_equal(st.live, 0);
    }
    assert_true(ok);
    remove_tree(dir);
    free(dir);
}

static void test_fashion_mnist(void **state)
{
    (void)state;
    struct stat sb;
    if (stat(FASHION_DIR, &sb) != 0) {
        skip();
        return;
    }
    tern_dataset *train = NULL, *test = NULL;
    tern_error err = {{0}};
    if (tern_dataset_open_fashion_mnist(FASHION_DIR, true, NULL, &train, &err) != TERN_OK)
        fail_msg("%s", err.message);
    if (tern_dataset_open_fashion_mnist(FASHION_DIR, false, NULL, &test, &err) != TERN_OK)
        fail_msg("%s", err.message);
    assert_int_equal(tern_dataset_size(train), 60000);
    assert_int_equal(tern_dataset_size(test), 10000);
    assert_int_equal(tern_dataset_num_classes(train), 10);
    size_t hist[10] = {0}, test_hist[10] = {0};
    for (size_t i = 0; i < 60000; i++)
        hist[tern_dataset_label(train, i)]++;
    for (size_t i = 0; i < 10000; i++)
        test_hist[tern_dataset_label(test, i)]++;
    for (int c = 0; c < 10; c++) {
        assert_int_equal(hist[c], 6000);
        assert_int_equal(test_hist[c], 1000);
    }
    /* Known first labels: train starts 9 (Ankle boot), 0, 0, 3; test starts 9, 2, 1, 1. */
    const int train_first[4] = {9, 0, 0, 3}, test_first[4] = {9, 2, 1, 1};
    for (size_t i = 0; i < 4; i++) {
        assert_int_equal(tern_dataset_label(train, i), train_first[i]);
        assert_int_equal(tern_dataset_label(test, i), test_first[i]);
    }
    assert_string_equal(tern_dataset_class_name(train, 9), "Ankle boot");
    assert_string_equal(tern_dataset_class_name(train, 0), "T-shirt/top");
    tern_image img;
    assert_int_equal(tern_dataset_image(train, 0, NULL, &img, &err), TERN_OK);
    assert_int_equal(img.width, 28);
    assert_int_equal(img.height, 28);
    assert_int_equal(img.channels, 1);
    /* The border of the first training image (a boot) is background. */
    assert_int_equal(img.data[0], 0);
    long sum = 0;
    for (int p = 0; p < 784; p++)
        sum += img.data[p];
    assert_true(sum > 784 * 40);
    tern_image_free(NULL, &img);
    char buf[128];
    assert_string_equal(tern_dataset_source(train, 17, buf, sizeof buf),
                        "train-images-idx3-ubyte.gz#17");
    tern_dataset_close(&train);
    tern_dataset_close(&test);

    /* A directory without the files. */
    char *dir = make_tmpdir();
    assert_int_equal(tern_dataset_open_fashion_mnist(dir, true, NULL, &train, &err), TERN_ERR_IO);
    assert_non_null(strstr(err.message, "train-images-idx3-ubyte.gz"));
    remove_tree(dir);
    free(dir);
}

static void test_fashion_mnist_class(void **state)
{
    (void)state;
    assert_string_equal(tern_fashion_mnist_class(0), "T-shirt/top");
    assert_string_equal(tern_fashion_mnist_class(1), "Trouser");
    assert_string_equal(tern_fashion_mnist_class(9), "Ankle boot");
    assert_null(tern_fashion_mnist_class(10));
    assert_null(tern_fashion_mnist_class(-1));
}

/* ---- folder ----------------------------------------------------------------------------- */

static void save_png(const char *dir, const char *rel, int w, int h, int c, int seed)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, rel);
    unsigned char *px = malloc((size_t)w * (size_t)h * (size_t)c);
    assert_non_null(px);
    for (size_t i = 0; i < (size_t)w * (size_t)h * (size_t)c; i++)
        px[i] = (unsigned char)(i * 3 + (size_t)seed);
    tern_image img = {.width = w, .height = h, .channels = c, .data = px};
    tern_error err;
    assert_int_equal(tern_image_save_png(path, &img, &err), TERN_OK);
    free(px);
}

static void save_jpeg(const char *dir, const char *rel, int w, int h)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, rel);
    struct jpeg_compress_struct ci;
    struct jpeg_error_mgr jerr;
    ci.err = jpeg_std_error(&jerr);
    jpeg_create_compress(&ci);
    unsigned char *buf = NULL;
    unsigned long size = 0;
    jpeg_mem_dest(&ci, &buf, &size);
    ci.image_width = (JDIMENSION)w;
    ci.image_height = (JDIMENSION)h;
    ci.input_components = 3;
    ci.in_color_space = JCS_RGB;
    jpeg_set_defaults(&ci);
    jpeg_start_compress(&ci, TRUE);
    unsigned char *row = malloc((size_t)w * 3);
    assert_non_null(row);
    for (int x = 0; x < w * 3; x++)
        row[x] = (unsigned char)(x * 5);
    while (ci.next_scanline < ci.image_height)
        jpeg_write_scanlines(&ci, &row, 1);
    jpeg_finish_compress(&ci);
    jpeg_destroy_compress(&ci);
    write_file(path, buf, size);
    free(buf);
    free(row);
}

static void make_dir(const char *dir, const char *rel)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, rel);
    assert_int_equal(mkdir(path, 0755), 0);
}

/* dir/{dog,cat,bird} with good images, a corrupt JPEG, hidden and foreign files. */
static char *make_tree(void)
{
    char *dir = make_tmpdir();
    make_dir(dir, "dog");
    make_dir(dir, "cat");
    make_dir(dir, "bird");
    make_dir(dir, ".hidden_class");
    save_png(dir, ".hidden_class/a.png", 4, 4, 1, 0);
    save_png(dir, "dog/b.png", 5, 4, 3, 1);
    save_jpeg(dir, "dog/a.JPG", 16, 8);
    save_png(dir, "dog/c.Png", 3, 3, 1, 2);
    save_png(dir, "dog/.d.png", 3, 3, 1, 3); /* hidden: ignored */
    save_png(dir, "cat/z.png", 6, 2, 3, 4);
    save_jpeg(dir, "cat/m.jpeg", 8, 8);
    make_dir(dir, "cat/sub.png"); /* a directory with an image name: ignored */
    save_png(dir, "bird/only.png", 2, 2, 1, 5);
    {
        char path[4200];
        snprintf(path, sizeof path, "%s/dog/notes.txt", dir);
        write_file(path, "hello\n", 6);
        snprintf(path, sizeof path, "%s/bird/broken.jpg", dir);
        const unsigned char junk[] = {0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, 'J', 'F', 'I', 'F', 0,
                                      1,    1,    0,    0,    1,    0,    1, 0, 0, 0xFF, 0xDB};
        write_file(path, junk, sizeof junk);
    }
    return dir;
}

typedef struct {
    int calls;
    char last[1024];
} warn_log;

static void on_warn(void *user, const char *message)
{
    warn_log *w = user;
    w->calls++;
    snprintf(w->last, sizeof w->last, "%s", message);
}

static void test_folder(void **state)
{
    (void)state;
    char *dir = make_tree();
    warn_log log = {0};
    tern_folder_options opt = {.warn = on_warn, .warn_user = &log};
    tern_dataset *ds = NULL;
    tern_error err = {{0}};
    if (tern_dataset_open_folder(dir, &opt, NULL, &ds, &err) != TERN_OK)
        fail_msg("%s", err.message);
    assert_int_equal(tern_dataset_num_classes(ds), 3);
    assert_string_equal(tern_dataset_class_name(ds, 0), "bird");
    assert_string_equal(tern_dataset_class_name(ds, 1), "cat");
    assert_string_equal(tern_dataset_class_name(ds, 2), "dog");
    assert_null(tern_dataset_class_name(ds, 3));
    assert_false(tern_dataset_strict(ds));
    /* bird: broken.jpg only.png; cat: m.jpeg z.png; dog: a.JPG b.png c.Png (strcmp order) */
    const char *want[] = {"bird/broken.jpg", "bird/only.png", "cat/m.jpeg", "cat/z.png",
                          "dog/a.JPG",       "dog/b.png",     "dog/c.Png"};
    const int want_label[] = {0, 0, 1, 1, 2, 2, 2};
    const int want_w[] = {0, 2, 8, 6, 16, 5, 3}, want_c[] = {0, 1, 3, 3, 3, 3, 1};
    assert_int_equal(tern_dataset_size(ds), 7);
    for (size_t i = 0; i < 7; i++) {
        char buf[4200], expect[4200];
        snprintf(expect, sizeof expect, "%s/%s", dir, want[i]);
        assert_string_equal(tern_dataset_source(ds, i, buf, sizeof buf), expect);
        assert_int_equal(tern_dataset_label(ds, i), want_label[i]);
        tern_image img = {0};
        tern_status s = tern_dataset_image(ds, i, NULL, &img, &err);
        if (i == 0) {
            assert_int_equal(s, TERN_ERR_FORMAT);
            assert_null(img.data);
            assert_int_equal(log.calls, 1);
            assert_non_null(strstr(log.last, expect));
            assert_non_null(strstr(log.last, "skipping"));
        } else {
            if (s != TERN_OK)
                fail_msg("%s", err.message);
            assert_int_equal(img.width, want_w[i]);
            assert_int_equal(img.channels, want_c[i]);
            tern_image_free(NULL, &img);
        }
    }
    /* The same file fails again, but is reported only once. */
    tern_image img = {0};
    assert_int_equal(tern_dataset_image(ds, 0, NULL, &img, &err), TERN_ERR_FORMAT);
    assert_int_equal(tern_dataset_image(ds, 0, NULL, &img, NULL), TERN_ERR_FORMAT);
    assert_int_equal(log.calls, 1);
    char small[8];
    assert_string_equal(tern_dataset_source(ds, 1, small, sizeof small), "/tmp/te");
    tern_dataset_close(&ds);

    /* Strict: the corrupt file fails the caller, without a warning. */
    opt.strict = true;
    log.calls = 0;
    assert_int_equal(tern_dataset_open_folder(dir, &opt, NULL, &ds, &err), TERN_OK);
    assert_true(tern_dataset_strict(ds));
    assert_int_equal(tern_dataset_image(ds, 0, NULL, &img, &err), TERN_ERR_FORMAT);
    assert_non_null(strstr(err.message, "broken.jpg"));
    assert_int_equal(log.calls, 0);
    tern_dataset_close(&ds);

    /* No options at all. */
    assert_int_equal(tern_dataset_open_folder(dir, NULL, NULL, &ds, &err), TERN_OK);
    assert_int_equal(tern_dataset_image(ds, 0, NULL, &img, &err), TERN_ERR_FORMAT);
    tern_dataset_close(&ds);
    remove_tree(dir);
    free(dir);
}

static void test_folder_errors(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    tern_dataset *ds = NULL;
    tern_error err = {{0}};
    char path[4200];
    snprintf(path, sizeof path, "%s/missing", dir);
    assert_int_equal(tern_dataset_open_folder(path, NULL, NULL, &ds, &err), TERN_ERR_IO);
    assert_non_null(strstr(err.message, path));
    /* No class directories. */
    assert_int_equal(tern_dataset_open_folder(dir, NULL, NULL, &ds, &err), TERN_ERR_FORMAT);
    assert_non_null(strstr(err.message, "no class directories"));
    /* Classes, but no images. */
    make_dir(dir, "a");
    snprintf(path, sizeof path, "%s/a/readme.txt", dir);
    write_file(path, "x", 1);
    assert_int_equal(tern_dataset_open_folder(dir, NULL, NULL, &ds, &err), TERN_ERR_FORMAT);
    assert_non_null(strstr(err.message, "no images"));
    assert_null(ds);
    /* An empty class keeps its label. */
    make_dir(dir, "b");
    save_png(dir, "b/x.png", 2, 2, 1, 0);
    assert_int_equal(tern_dataset_open_folder(dir, NULL, NULL, &ds, &err), TERN_OK);
    assert_int_equal(tern_dataset_num_classes(ds), 2);
    assert_int_equal(tern_dataset_size(ds), 1);
    assert_int_equal(tern_dataset_label(ds, 0), 1);
    tern_dataset_close(&ds);
    remove_tree(dir);
    free(dir);
}

static void test_folder_allocation_failures(void **state)
{
    (void)state;
    char *dir = make_tree();
    bool ok = false;
    for (long k = 1; k < 200 && !ok; k++) {
        test_alloc_state st = {.fail_at = k};
        tern_allocator a = test_failing_allocator(&st);
        tern_dataset *ds = NULL;
        tern_error err;
        tern_status s = tern_dataset_open_folder(dir, NULL, &a, &ds, &err);
        if (s == TERN_OK) {
            ok = true;
            tern_dataset_close(&ds);
        } else {
            assert_int_equal(s, TERN_ERR_NOMEM);
            assert_null(ds);
        }
        assert_int_equal(st.live, 0);
    }
    assert_true(ok);
    remove_tree(dir);
    free(dir);
}

/* Several threads decode every sample; results must match a single-threaded pass. */
typedef struct {
    const tern_dataset *ds;
    unsigned long sums[16];
    int failures;
} decode_job;

static void *decode_all(void *arg)
{
    decode_job *job = arg;
    for (int round = 0; round < 20; round++)
        for (size_t i = 0; i < tern_dataset_size(job->ds); i++) {
            tern_image img;
            tern_error err;
            if (tern_dataset_image(job->ds, i, NULL, &img, &err) != TERN_OK) {
                job->failures++;
                continue;
            }
            unsigned long sum = 0;
            for (size_t p = 0; p < (size_t)img.width * img.height * img.channels; p++)
                sum += img.data[p];
            job->sums[i] = sum;
            tern_image_free(NULL, &img);
        }
    return NULL;
}

static void test_folder_threads(void **state)
{
    (void)state;
    char *dir = make_tree();
    warn_log log = {0};
    tern_folder_options opt = {.warn = on_warn, .warn_user = &log};
    tern_dataset *ds = NULL;
    tern_error err;
    assert_int_equal(tern_dataset_open_folder(dir, &opt, NULL, &ds, &err), TERN_OK);
    decode_job ref = {.ds = ds}, jobs[4];
    decode_all(&ref);
    log.calls = 0; /* already reported: the threads must not report it again */
    pthread_t th[4];
    for (int t = 0; t < 4; t++) {
        jobs[t] = (decode_job){.ds = ds};
        assert_int_equal(pthread_create(&th[t], NULL, decode_all, &jobs[t]), 0);
    }
    for (int t = 0; t < 4; t++) {
        pthread_join(th[t], NULL);
        assert_int_equal(jobs[t].failures, ref.failures);
        assert_memory_equal(jobs[t].sums, ref.sums, sizeof ref.sums);
    }
    assert_int_equal(log.calls, 0);
    tern_dataset_close(&ds);
    remove_tree(dir);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_idx_roundtrip),
        cmocka_unit_test(test_idx_errors),
        cmocka_unit_test(test_idx_allocation_failures),
        cmocka_unit_test(test_fashion_mnist),
        cmocka_unit_test(test_fashion_mnist_class),
        cmocka_unit_test(test_folder),
        cmocka_unit_test(test_folder_errors),
        cmocka_unit_test(test_folder_allocation_failures),
        cmocka_unit_test(test_folder_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
