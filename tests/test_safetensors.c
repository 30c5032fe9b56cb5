/* safetensors reader and writer: round trips through a file and a buffer, a hand-built file in
 * the layout PyTorch writes, every kind of malformed input, atomic replacement on disk, and
 * failure of each allocation in turn. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nn/util.h"
#include "tern/safetensors.h"
#include "testutil.h"

/* ---- helpers ---------------------------------------------------------------------------- */

static char *make_tmpdir(void)
{
    char *dir = strdup("/tmp/tern-st-XXXXXX");
    assert_non_null(dir);
    assert_non_null(mkdtemp(dir));
    return dir;
}

static void remove_tmpdir(char *dir)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *e;
    char path[4096];
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    assert_int_equal(rmdir(dir), 0);
    free(dir);
}

/* Number of directory entries other than . and .., and how many look like temp files. */
static int count_entries(const char *dir, int *tmp_files)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *e;
    int n = 0;
    *tmp_files = 0;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        n++;
        if (strstr(e->d_name, ".tmp."))
            (*tmp_files)++;
    }
    closedir(d);
    return n;
}

static void write_bytes(const char *path, const void *bytes, size_t len)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(bytes, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

static unsigned char *read_bytes(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    assert_true(n >= 0);
    rewind(f);
    unsigned char *b = malloc((size_t)n + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    b[n] = 0;
    *len = (size_t)n;
    return b;
}

/* A file image: 8-byte length, hbytes of header (0: strlen), then data_len bytes. If
 * header_len is not (uint64_t)-1 it overrides the length field. */
static unsigned char *make_image(const char *header, size_t hbytes, size_t data_len,
                                 uint64_t header_len, size_t *len)
{
    size_t h = hbytes ? hbytes : strlen(header);
    *len = 8 + h + data_len;
    unsigned char *b = malloc(*len);
    assert_non_null(b);
    uint64_t n = header_len == (uint64_t)-1 ? h : header_len;
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(n >> (8 * i));
    memcpy(b + 8, header, h);
    for (size_t i = 0; i < data_len; i++)
        b[8 + h + i] = (unsigned char)i;
    return b;
}

/* The test tensors: F32 (2, 3), an I64 scalar, I32 (4), I8 (3, 1, 2). */
static const float f32_data[6] = {1.5f, -2.25f, 3.0f, 0.0f, 1e-3f, -7.0f};
static const int64_t i64_data = -1234567890123LL;
static const int32_t i32_data[4] = {1, -2, 2147483647, -2147483647 - 1};
static const int8_t i8_data[6] = {-128, -1, 0, 1, 2, 127};
static const int64_t f32_shape[] = {2, 3}, i32_shape[] = {4}, i8_shape[] = {3, 1, 2};

static tern_status fill_writer(tern_safetensors_writer *w)
{
    tern_status s;
    if ((s = tern_safetensors_writer_add(w, "layer.weight", TERN_DTYPE_F32, 2, f32_shape,
                                         f32_data)) != TERN_OK ||
        (s = tern_safetensors_writer_add(w, "step", TERN_DTYPE_I64, 0, NULL, &i64_data)) !=
            TERN_OK ||
        (s = tern_safetensors_writer_add(w, "labels", TERN_DTYPE_I32, 1, i32_shape, i32_data)) !=
            TERN_OK ||
        (s = tern_safetensors_writer_add(w, "q.weight", TERN_DTYPE_I8, 3, i8_shape, i8_data)) !=
            TERN_OK ||
        (s = tern_safetensors_writer_set_metadata(w, "format", "pt")) != TERN_OK ||
        (s = tern_safetensors_writer_set_metadata(w, "epoch", "2")) != TERN_OK ||
        (s = tern_safetensors_writer_set_metadata(w, "epoch", "3")) != TERN_OK) /* replaces */
        return s;
    return TERN_OK;
}

static void check_view(const tern_tensor_view *v, const char *name, tern_dtype dtype, int ndim,
                       const int64_t *shape, const void *data, size_t nbytes)
{
    assert_string_equal(v->name, name);
    assert_int_equal(v->dtype, dtype);
    assert_int_equal(v->ndim, ndim);
    for (int i = 0; i < ndim; i++)
        assert_int_equal(v->shape[i], shape[i]);
    assert_int_equal(v->nbytes, nbytes);
    assert_memory_equal(v->data, data, nbytes);
}

static void check_contents(const tern_safetensors *st)
{
    assert_int_equal(tern_safetensors_count(st), 4);
    tern_tensor_view v;
    /* Order by data offset = insertion order of the writer. */
    assert_int_equal(tern_safetensors_get(st, 0, &v), TERN_OK);
    check_view(&v, "layer.weight", TERN_DTYPE_F32, 2, f32_shape, f32_data, sizeof f32_data);
    float f[6];
    memcpy(f, v.data, sizeof f);
    assert_true(f[1] == -2.25f && f[4] == 1e-3f);
    assert_int_equal(tern_safetensors_get(st, 1, &v), TERN_OK);
    check_view(&v, "step", TERN_DTYPE_I64, 0, NULL, &i64_data, 8);
    assert_int_equal(tern_safetensors_get(st, 2, &v), TERN_OK);
    check_view(&v, "labels", TERN_DTYPE_I32, 1, i32_shape, i32_data, sizeof i32_data);
    assert_int_equal(tern_safetensors_get(st, 3, &v), TERN_OK);
    check_view(&v, "q.weight", TERN_DTYPE_I8, 3, i8_shape, i8_data, sizeof i8_data);
    assert_int_equal(tern_safetensors_get(st, 4, &v), TERN_ERR_INVALID);

    assert_int_equal(tern_safetensors_find(st, "labels", &v), TERN_OK);
    check_view(&v, "labels", TERN_DTYPE_I32, 1, i32_shape, i32_data, sizeof i32_data);
    assert_int_equal(tern_safetensors_find(st, "step", &v), TERN_OK);
    int64_t step;
    memcpy(&step, v.data, sizeof step);
    assert_true(step == i64_data);
    assert_int_equal(tern_safetensors_find(st, "q.weight", &v), TERN_OK);
    assert_int_equal(tern_safetensors_find(st, "layer.weight", &v), TERN_OK);
    assert_int_equal(tern_safetensors_find(st, "missing", &v), TERN_ERR_NOT_FOUND);
    assert_int_equal(tern_safetensors_find(st, "__metadata__", &v), TERN_ERR_NOT_FOUND);

    assert_int_equal(tern_safetensors_metadata_count(st), 2);
    const char *k, *val;
    assert_int_equal(tern_safetensors_metadata_at(st, 0, &k, &val), TERN_OK);
    assert_string_equal(k, "epoch");
    assert_string_equal(val, "3");
    assert_int_equal(tern_safetensors_metadata_at(st, 1, &k, &val), TERN_OK);
    assert_string_equal(k, "format");
    assert_string_equal(val, "pt");
    assert_int_equal(tern_safetensors_metadata_at(st, 2, &k, &val), TERN_ERR_INVALID);
    assert_string_equal(tern_safetensors_metadata(st, "format"), "pt");
    assert_null(tern_safetensors_metadata(st, "nope"));
}

/* ---- tests ------------------------------------------------------------------------------ */

static void test_dtypes(void **state)
{
    (void)state;
    assert_int_equal(tern_dtype_size(TERN_DTYPE_F32), 4);
    assert_int_equal(tern_dtype_size(TERN_DTYPE_F64), 8);
    assert_int_equal(tern_dtype_size(TERN_DTYPE_BF16), 2);
    assert_int_equal(tern_dtype_size(TERN_DTYPE_BOOL), 1);
    assert_int_equal(tern_dtype_size(TERN_DTYPE_I64), 8);
    assert_string_equal(tern_dtype_name(TERN_DTYPE_BF16), "BF16");
    assert_string_equal(tern_dtype_name(TERN_DTYPE_U8), "U8");
}

static void test_roundtrip(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);

    tern_safetensors_writer *w = NULL;
    assert_int_equal(tern_safetensors_writer_create(NULL, &w), TERN_OK);
    assert_int_equal(fill_writer(w), TERN_OK);
    tern_error err = {{0}};
    assert_int_equal(tern_safetensors_writer_write(w, path, &err), TERN_OK);

    /* Via a file. */
    tern_safetensors *st = NULL;
    tern_status s = tern_safetensors_open(path, NULL, &st, &err);
    if (s != TERN_OK)
        fail_msg("open: %s", err.message);
    check_contents(st);
    tern_safetensors_close(&st);
    assert_null(st);
    tern_safetensors_close(&st); /* NULL is fine */

    /* The file and the serialized buffer are the same bytes; data starts 8-aligned and the
     * header is compact JSON with __metadata__ first and spaces as padding. */
    size_t flen, blen;
    unsigned char *file = read_bytes(path, &flen);
    void *buf = NULL;
    assert_int_equal(tern_safetensors_writer_serialize(w, &buf, &blen), TERN_OK);
    assert_int_equal(flen, blen);
    assert_memory_equal(file, buf, flen);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | file[i];
    assert_int_equal(n % 8, 0);
    assert_int_equal(flen, 8 + n + sizeof f32_data + 8 + sizeof i32_data + sizeof i8_data);
    const char *prefix = "{\"__metadata__\":{\"format\":\"pt\",\"epoch\":\"3\"},";
    assert_memory_equal(file + 8, prefix, strlen(prefix));
    assert_non_null(strstr((char *)file + 8,
                           "\"layer.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],"
                           "\"data_offsets\":[0,24]}"));
    assert_int_equal(file[8 + n - 1] == ' ' || file[8 + n - 1] == '}', 1);

    /* Via a buffer. */
    assert_int_equal(tern_safetensors_parse(buf, blen, NULL, &st, &err), TERN_OK);
    memset(buf, 0xAB, blen); /* parse copied it */
    check_contents(st);
    tern_safetensors_close(&st);
    free(buf); /* default allocator: tern_free is free */
    free(file);

    tern_safetensors_writer_destroy(&w);
    assert_null(w);
    tern_safetensors_writer_destroy(&w);
    remove_tmpdir(dir);
}

static void test_writer_rejects(void **state)
{
    (void)state;
    tern_safetensors_writer *w = NULL;
    assert_int_equal(tern_safetensors_writer_create(NULL, &w), TERN_OK);
    float x[4] = {0};
    int64_t shape[TERN_MAX_DIMS + 1] = {2, 2, 1, 1, 1, 1, 1, 1, 1};
    assert_int_equal(tern_safetensors_writer_add(w, "a", TERN_DTYPE_F32, 2, shape, x), TERN_OK);
    assert_int_equal(tern_safetensors_writer_add(w, "a", TERN_DTYPE_F32, 2, shape, x),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_safetensors_writer_add(w, "", TERN_DTYPE_F32, 2, shape, x),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_safetensors_writer_add(w, "__metadata__", TERN_DTYPE_F32, 2, shape, x),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_safetensors_writer_add(w, "b", TERN_DTYPE_F32, 9, shape, x),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_safetensors_writer_add(w, "b", TERN_DTYPE_F32, -1, shape, x),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_safetensors_writer_add(w, "b", (tern_dtype)99, 2, shape, x),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_safetensors_writer_add(w, "b\xff", TERN_DTYPE_F32, 2, shape, x),
                     TERN_ERR_INVALID);
    int64_t neg[2] = {2, -1};
    assert_int_equal(tern_safetensors_writer_add(w, "b", TERN_DTYPE_F32, 2, neg, x),
                     TERN_ERR_INVALID);
    int64_t huge[3] = {INT64_MAX / 2, INT64_MAX / 2, 4};
    assert_int_equal(tern_safetensors_writer_add(w, "b", TERN_DTYPE_F32, 3, huge, x),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_safetensors_writer_set_metadata(w, "k", NULL), TERN_ERR_INVALID);
    /* An empty tensor needs no data. */
    int64_t zero[2] = {0, 5};
    assert_int_equal(tern_safetensors_writer_add(w, "empty", TERN_DTYPE_F64, 2, zero, NULL),
                     TERN_OK);

    void *buf;
    size_t len;
    assert_int_equal(tern_safetensors_writer_serialize(w, &buf, &len), TERN_OK);
    tern_safetensors *st = NULL;
    tern_error err;
    assert_int_equal(tern_safetensors_parse(buf, len, NULL, &st, &err), TERN_OK);
    assert_int_equal(tern_safetensors_count(st), 2);
    tern_tensor_view v;
    assert_int_equal(tern_safetensors_find(st, "empty", &v), TERN_OK);
    assert_int_equal(v.nbytes, 0);
    assert_int_equal(v.ndim, 2);
    assert_int_equal(tern_safetensors_metadata_count(st), 0);
    tern_safetensors_close(&st);
    free(buf);
    tern_safetensors_writer_destroy(&w);
}

/* What torch/safetensors' save_file produces: __metadata__ first, keys in any order, offsets
 * not in key order, header padded with spaces. */
static void test_pytorch_layout(void **state)
{
    (void)state;
    const char *header =
        "{\"__metadata__\":{\"format\":\"pt\"},"
        "\"fc.bias\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,24]},"
        "\"bn.num_batches_tracked\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[0,8]},"
        "\"fc.weight\":{\"dtype\":\"F16\",\"shape\":[2,2],\"data_offsets\":[8,16]},"
        "\"mask\":{\"dtype\":\"BOOL\",\"shape\":[0],\"data_offsets\":[24,24]},"
        "\"emb\":{\"dtype\":\"BF16\",\"shape\":[1,2],\"data_offsets\":[24,28]}}";
    char padded[1024];
    size_t h = strlen(header), hp = (h + 7) & ~(size_t)7;
    memcpy(padded, header, h);
    memset(padded + h, ' ', hp - h);
    padded[hp] = '\0';
    size_t len;
    unsigned char *b = make_image(padded, 0, 28, (uint64_t)-1, &len);
    int64_t steps = 42;
    memcpy(b + 8 + hp, &steps, 8);
    float bias[2] = {0.5f, -0.5f};
    memcpy(b + 8 + hp + 16, bias, 8);

    tern_safetensors *st = NULL;
    tern_error err;
    tern_status s = tern_safetensors_parse(b, len, NULL, &st, &err);
    if (s != TERN_OK)
        fail_msg("parse: %s", err.message);
    assert_int_equal(tern_safetensors_count(st), 5);
    const char *order[] = {"bn.num_batches_tracked", "fc.weight", "fc.bias", "mask", "emb"};
    tern_tensor_view v;
    for (size_t i = 0; i < 5; i++) {
        assert_int_equal(tern_safetensors_get(st, i, &v), TERN_OK);
        assert_string_equal(v.name, order[i]);
    }
    assert_int_equal(tern_safetensors_find(st, "bn.num_batches_tracked", &v), TERN_OK);
    assert_int_equal(v.ndim, 0);
    assert_int_equal(v.dtype, TERN_DTYPE_I64);
    int64_t got;
    memcpy(&got, v.data, 8);
    assert_int_equal(got, 42);
    assert_int_equal(tern_safetensors_find(st, "fc.bias", &v), TERN_OK);
    assert_memory_equal(v.data, bias, 8);
    assert_int_equal(tern_safetensors_find(st, "fc.weight", &v), TERN_OK);
    assert_int_equal(v.dtype, TERN_DTYPE_F16);
    assert_int_equal(tern_safetensors_find(st, "mask", &v), TERN_OK);
    assert_int_equal(v.nbytes, 0);
    assert_int_equal(tern_safetensors_find(st, "emb", &v), TERN_OK);
    assert_int_equal(v.dtype, TERN_DTYPE_BF16);
    assert_string_equal(tern_safetensors_metadata(st, "format"), "pt");
    tern_safetensors_close(&st);
    free(b);

    /* No tensors at all is a valid (empty) file. */
    b = make_image("{}      ", 0, 0, (uint64_t)-1, &len);
    assert_int_equal(tern_safetensors_parse(b, len, NULL, &st, &err), TERN_OK);
    assert_int_equal(tern_safetensors_count(st), 0);
    tern_safetensors_close(&st);
    free(b);
}

typedef struct {
    const char *what;
    const char *header;
    size_t data_len;
    uint64_t header_len; /* (uint64_t)-1: the header's own length */
    const char *expect;  /* substring of the error message */
} bad_case;

#define T(name, dtype, shape, b, e)                                                            \
    "\"" name "\":{\"dtype\":\"" dtype "\",\"shape\":" shape ",\"data_offsets\":[" #b "," #e "]}"
#define NOLEN ((uint64_t)-1)

static const bad_case bad_cases[] = {
    {"header length beyond file", "{}", 0, 99999, "header length 99999 beyond file size 10"},
    {"header length huge", "{}", 0, (uint64_t)1 << 62, "beyond file size"},
    {"malformed JSON", "{\"a\":", 0, NOLEN, "malformed JSON header"},
    {"trailing garbage", "{} x", 0, NOLEN, "malformed JSON header"},
    {"invalid UTF-8", "{\"\xc3\x28\":1}", 0, NOLEN, "malformed JSON header"},
    {"header not an object", "[1,2]", 0, NOLEN, "header is not a JSON object"},
    {"entry not an object", "{\"a\":3}", 0, NOLEN, "tensor 'a': entry is not a JSON object"},
    {"unknown dtype", "{" T("a", "F8_E4M3", "[2]", 0, 2) "}", 2, NOLEN,
     "tensor 'a': unknown dtype 'F8_E4M3'"},
    {"missing dtype", "{\"a\":{\"shape\":[1],\"data_offsets\":[0,1]}}", 1, NOLEN,
     "tensor 'a': missing or non-string dtype"},
    {"negative shape", "{" T("w", "F32", "[2,-1]", 0, 8) "}", 8, NOLEN,
     "tensor 'w': shape entry 1 is not a non-negative integer"},
    {"float shape", "{" T("w", "F32", "[2.0]", 0, 8) "}", 8, NOLEN,
     "tensor 'w': shape entry 0 is not a non-negative integer"},
    {"too many dims", "{" T("w", "U8", "[1,1,1,1,1,1,1,1,1]", 0, 1) "}", 1, NOLEN,
     "tensor 'w': shape has 9 dimensions"},
    {"shape overflow", "{" T("w", "F64", "[4611686018427387904,4]", 0, 8) "}", 8, NOLEN,
     "tensor 'w': shape overflows"},
    {"offsets out of range", "{" T("features.0.0.weight", "F32", "[100]", 0, 400) "}", 256, NOLEN,
     "tensor 'features.0.0.weight': data_offsets [0, 400] end beyond data buffer of 256 bytes"},
    {"offsets begin after end", "{" T("a", "U8", "[0]", 4, 2) "}", 4, NOLEN,
     "tensor 'a': data_offsets [4, 2] begin after end"},
    {"negative offset", "{" T("a", "U8", "[1]", -1, 0) "}", 4, NOLEN,
     "tensor 'a': data_offsets are not non-negative"},
    {"offsets not a pair", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0]}}", 1,
     NOLEN, "tensor 'a': data_offsets is not a [begin, end] array"},
    {"overlapping offsets", "{" T("a", "F32", "[2]", 0, 8) "," T("b", "F32", "[2]", 4, 12) "}", 12,
     NOLEN, "tensor 'b': data_offsets [4, 12] overlap tensor 'a'"},
    {"hole between tensors", "{" T("a", "F32", "[1]", 0, 4) "," T("b", "F32", "[1]", 8, 12) "}",
     12, NOLEN, "hole of 4 bytes"},
    {"hole at start", "{" T("a", "F32", "[1]", 4, 8) "}", 8, NOLEN,
     "hole of 4 bytes at the start"},
    {"trailing bytes", "{" T("a", "F32", "[1]", 0, 4) "}", 6, NOLEN, "2 trailing bytes"},
    {"byte count mismatch", "{" T("a", "F32", "[2,3]", 0, 12) "}", 12, NOLEN,
     "tensor 'a': data_offsets [0, 12] hold 12 bytes but shape and dtype F32 need 24"},
    {"duplicate names", "{" T("a", "U8", "[1]", 0, 1) "," T("a", "U8", "[1]", 1, 2) "}", 2, NOLEN,
     "duplicate"},
    {"metadata not an object", "{\"__metadata__\":[\"x\"]}", 0, NOLEN,
     "__metadata__ is not a JSON object"},
    {"metadata value not a string", "{\"__metadata__\":{\"epoch\":3}}", 0, NOLEN,
     "__metadata__ value for key 'epoch' is not a string"},
};

static void expect_parse_error(const unsigned char *b, size_t len, tern_status want,
                               const char *what, const char *expect)
{
    tern_safetensors *st = (tern_safetensors *)&st; /* must stay untouched */
    tern_safetensors *const sentinel = st;
    tern_error err = {{0}};
    tern_status s = tern_safetensors_parse(b, len, NULL, &st, &err);
    if (s != want || !strstr(err.message, expect))
        fail_msg("%s: got status %d message \"%s\", want %d containing \"%s\"", what, (int)s,
                 err.message, (int)want, expect);
    assert_ptr_equal(st, sentinel);
    assert_non_null(strstr(err.message, "safetensors buffer"));
}

static void test_bad_inputs(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/bad.safetensors", dir);
    for (size_t i = 0; i < sizeof bad_cases / sizeof bad_cases[0]; i++) {
        const bad_case *c = &bad_cases[i];
        size_t len;
        unsigned char *b = make_image(c->header, 0, c->data_len, c->header_len, &len);
        expect_parse_error(b, len, TERN_ERR_FORMAT, c->what, c->expect);

        /* Through a file, the message names the file. */
        write_bytes(path, b, len);
        tern_safetensors *st = NULL;
        tern_error err;
        assert_int_equal(tern_safetensors_open(path, NULL, &st, &err), TERN_ERR_FORMAT);
        assert_null(st);
        assert_non_null(strstr(err.message, path));
        assert_non_null(strstr(err.message, c->expect));
        free(b);
    }

    /* A NUL byte inside the header (jansson must see the exact length, not a C string). */
    size_t nlen;
    unsigned char *nul = make_image("{}\0 ", 4, 0, (uint64_t)-1, &nlen);
    expect_parse_error(nul, nlen, TERN_ERR_FORMAT, "NUL byte", "malformed JSON header");
    free(nul);

    /* Empty and too short. */
    unsigned char few[5] = {1, 0, 0, 0, 0};
    expect_parse_error(few, 0, TERN_ERR_FORMAT, "empty", "file is empty");
    expect_parse_error(few, 5, TERN_ERR_FORMAT, "short", "file of 5 bytes is shorter");
    tern_safetensors *st = NULL;
    tern_error err;
    write_bytes(path, few, 0);
    assert_int_equal(tern_safetensors_open(path, NULL, &st, &err), TERN_ERR_FORMAT);
    assert_non_null(strstr(err.message, "file is empty"));

    /* Truncated: a valid file cut short by one byte. */
    tern_safetensors_writer *w = NULL;
    assert_int_equal(tern_safetensors_writer_create(NULL, &w), TERN_OK);
    assert_int_equal(fill_writer(w), TERN_OK);
    void *buf;
    size_t blen;
    assert_int_equal(tern_safetensors_writer_serialize(w, &buf, &blen), TERN_OK);
    expect_parse_error(buf, blen - 1, TERN_ERR_FORMAT, "truncated",
                       "tensor 'q.weight': data_offsets [48, 54] end beyond data buffer of 53 "
                       "bytes");
    write_bytes(path, buf, blen - 1);
    assert_int_equal(tern_safetensors_open(path, NULL, &st, &err), TERN_ERR_FORMAT);
    assert_non_null(strstr(err.message, "truncated"));
    /* Cut inside the header. */
    expect_parse_error(buf, 40, TERN_ERR_FORMAT, "truncated header", "beyond file size 40");
    free(buf);
    tern_safetensors_writer_destroy(&w);

    /* Missing file and bad arguments. */
    snprintf(path, sizeof path, "%s/missing.safetensors", dir);
    assert_int_equal(tern_safetensors_open(path, NULL, &st, &err), TERN_ERR_IO);
    assert_non_null(strstr(err.message, "No such file"));
    assert_int_equal(tern_safetensors_open(dir, NULL, &st, &err), TERN_ERR_IO);
    assert_int_equal(tern_safetensors_open(NULL, NULL, &st, &err), TERN_ERR_INVALID);
    assert_int_equal(tern_safetensors_parse(NULL, 3, NULL, &st, NULL), TERN_ERR_INVALID);
    assert_null(st);
    remove_tmpdir(dir);
}

static void test_atomic_write(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char path[4096];
    tern_error err;
    int tmps;

    tern_safetensors_writer *w = NULL;
    assert_int_equal(tern_safetensors_writer_create(NULL, &w), TERN_OK);
    assert_int_equal(fill_writer(w), TERN_OK);

    /* A directory that does not exist: IO error, nothing created anywhere. */
    snprintf(path, sizeof path, "%s/no/such/dir/model.safetensors", dir);
    assert_int_equal(tern_safetensors_writer_write(w, path, &err), TERN_ERR_IO);
    assert_non_null(strstr(err.message, "No such file or directory"));
    assert_int_equal(count_entries(dir, &tmps), 0);

    /* Replace a longer existing file wholly. */
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    char junk[4096];
    memset(junk, 'j', sizeof junk);
    write_bytes(path, junk, sizeof junk);
    assert_int_equal(tern_safetensors_writer_write(w, path, &err), TERN_OK);
    void *buf;
    size_t blen, flen;
    assert_int_equal(tern_safetensors_writer_serialize(w, &buf, &blen), TERN_OK);
    unsigned char *file = read_bytes(path, &flen);
    assert_int_equal(flen, blen);
    assert_memory_equal(file, buf, blen);
    free(file);
    free(buf);
    assert_int_equal(count_entries(dir, &tmps), 1);
    assert_int_equal(tmps, 0);

    /* Write again over our own file with different contents. */
    tern_safetensors_writer *w2 = NULL;
    assert_int_equal(tern_safetensors_writer_create(NULL, &w2), TERN_OK);
    uint8_t one = 7;
    assert_int_equal(tern_safetensors_writer_add(w2, "only", TERN_DTYPE_U8, 0, NULL, &one),
                     TERN_OK);
    assert_int_equal(tern_safetensors_writer_write(w2, path, &err), TERN_OK);
    tern_safetensors *st = NULL;
    assert_int_equal(tern_safetensors_open(path, NULL, &st, &err), TERN_OK);
    assert_int_equal(tern_safetensors_count(st), 1);
    assert_int_equal(tern_safetensors_metadata_count(st), 0);
    tern_safetensors_close(&st);
    assert_int_equal(count_entries(dir, &tmps), 1);
    assert_int_equal(tmps, 0);

    /* A failed write (the target is a non-empty directory: rename fails) leaves it alone and
     * removes the temporary file. */
    snprintf(path, sizeof path, "%s/sub", dir);
    assert_int_equal(mkdir(path, 0700), 0);
    char inner[4096];
    snprintf(inner, sizeof inner, "%s/sub/x", dir);
    write_bytes(inner, "x", 1);
    assert_int_equal(tern_safetensors_writer_write(w2, path, &err), TERN_ERR_IO);
    assert_non_null(strstr(err.message, "rename"));
    assert_int_equal(count_entries(dir, &tmps), 2);
    assert_int_equal(tmps, 0);
    unlink(inner);
    rmdir(path);

    tern_safetensors_writer_destroy(&w2);
    tern_safetensors_writer_destroy(&w);
    remove_tmpdir(dir);
}

/* Fail allocation i = 1, 2, ... until the operation succeeds; every failure must be NOMEM with
 * nothing leaked. */
static void test_alloc_failure_read(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    tern_safetensors_writer *w = NULL;
    assert_int_equal(tern_safetensors_writer_create(NULL, &w), TERN_OK);
    assert_int_equal(fill_writer(w), TERN_OK);
    tern_error err;
    assert_int_equal(tern_safetensors_writer_write(w, path, &err), TERN_OK);
    void *buf;
    size_t blen;
    assert_int_equal(tern_safetensors_writer_serialize(w, &buf, &blen), TERN_OK);
    tern_safetensors_writer_destroy(&w);

    for (int mode = 0; mode < 2; mode++) {
        long i;
        for (i = 1;; i++) {
            test_alloc_state as = {0, i, 0};
            tern_allocator a = test_failing_allocator(&as);
            tern_safetensors *st = NULL;
            tern_status s = mode == 0 ? tern_safetensors_open(path, &a, &st, &err)
                                      : tern_safetensors_parse(buf, blen, &a, &st, &err);
            if (s == TERN_OK) {
                check_contents(st);
                tern_safetensors_close(&st);
                assert_int_equal(as.live, 0);
                break;
            }
            assert_int_equal(s, TERN_ERR_NOMEM);
            assert_null(st);
            assert_int_equal(as.live, 0);
            assert_true(i < 100);
        }
        assert_true(i > 1);
    }
    free(buf);
    remove_tmpdir(dir);
}

static tern_status writer_ops(const tern_allocator *a, const char *path)
{
    tern_safetensors_writer *w = NULL;
    tern_error err;
    void *buf = NULL;
    size_t len;
    tern_status s = tern_safetensors_writer_create(a, &w);
    if (s != TERN_OK)
        return s;
    /* Enough entries to make the arrays grow more than once. */
    char name[32];
    float v = 1.0f;
    for (int i = 0; i < 40 && s == TERN_OK; i++) {
        snprintf(name, sizeof name, "t%02d", i);
        s = tern_safetensors_writer_add(w, name, TERN_DTYPE_F32, 0, NULL, &v);
    }
    if (s == TERN_OK)
        s = fill_writer(w);
    for (int i = 0; i < 20 && s == TERN_OK; i++) {
        snprintf(name, sizeof name, "k%02d", i);
        s = tern_safetensors_writer_set_metadata(w, name, "v");
    }
    if (s == TERN_OK)
        s = tern_safetensors_writer_serialize(w, &buf, &len);
    if (s == TERN_OK)
        s = tern_safetensors_writer_write(w, path, &err);
    if (buf)
        tern_free(a, buf);
    tern_safetensors_writer_destroy(&w);
    return s;
}

static void test_alloc_failure_write(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    long i;
    for (i = 1;; i++) {
        test_alloc_state as = {0, i, 0};
        tern_allocator a = test_failing_allocator(&as);
        tern_status s = writer_ops(&a, path);
        assert_int_equal(as.live, 0);
        int tmps;
        if (s == TERN_OK) {
            assert_int_equal(count_entries(dir, &tmps), 1);
            break;
        }
        assert_int_equal(s, TERN_ERR_NOMEM);
        assert_int_equal(count_entries(dir, &tmps), 0);
        assert_true(i < 1000);
    }
    assert_true(i > 5);
    tern_safetensors *st = NULL;
    tern_error err;
    assert_int_equal(tern_safetensors_open(path, NULL, &st, &err), TERN_OK);
    assert_int_equal(tern_safetensors_count(st), 44);
    assert_int_equal(tern_safetensors_metadata_count(st), 22);
    tern_safetensors_close(&st);
    remove_tmpdir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dtypes),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_writer_rejects),
        cmocka_unit_test(test_pytorch_layout),
        cmocka_unit_test(test_bad_inputs),
        cmocka_unit_test(test_atomic_write),
        cmocka_unit_test(test_alloc_failure_read),
        cmocka_unit_test(test_alloc_failure_write),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
