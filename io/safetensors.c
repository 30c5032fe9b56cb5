/* safetensors reader and writer.
 *
 * Reading loads the whole file into one block and validates it completely before a handle is
 * returned, so a bad checkpoint fails at open with a message naming the tensor instead of
 * producing garbage later. The parsed header lives in one arena: tensor views (sorted by data
 * offset), a name-sorted index for find, sorted metadata pairs and the strings they point to.
 * Validation follows the reference implementation: the tensors must tile the data buffer
 * exactly (no overlap, no hole, nothing after the last tensor).
 *
 * Writing keeps borrowed pointers to the caller's data until write/serialize, builds the header
 * with jansson and pads it with spaces so the data buffer starts 8-aligned in the file, which
 * lets readers that mmap the file view F64/I64 tensors in place. */
#include "tern/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nn/util.h"

/* The reference implementation's limit; a larger header is a sign of a corrupt length. */
#define MAX_HEADER_BYTES ((uint64_t)100 * 1000 * 1000)
/* Bound single write() calls: some systems fail transfers above INT_MAX. */
#define MAX_WRITE_CHUNK ((size_t)1 << 30)

static const struct {
    const char *name;
    size_t size;
} dtype_info[] = {
    [TERN_DTYPE_F32] = {"F32", 4}, [TERN_DTYPE_F64] = {"F64", 8},  [TERN_DTYPE_F16] = {"F16", 2},
    [TERN_DTYPE_BF16] = {"BF16", 2}, [TERN_DTYPE_I8] = {"I8", 1},  [TERN_DTYPE_U8] = {"U8", 1},
    [TERN_DTYPE_I16] = {"I16", 2}, [TERN_DTYPE_I32] = {"I32", 4}, [TERN_DTYPE_I64] = {"I64", 8},
    [TERN_DTYPE_BOOL] = {"BOOL", 1},
};
#define DTYPE_COUNT (sizeof dtype_info / sizeof dtype_info[0])

static bool dtype_valid(tern_dtype dtype)
{
    return (unsigned)dtype < DTYPE_COUNT;
}

size_t tern_dtype_size(tern_dtype dtype)
{
    return dtype_valid(dtype) ? dtype_info[dtype].size : 0;
}

const char *tern_dtype_name(tern_dtype dtype)
{
    return dtype_valid(dtype) ? dtype_info[dtype].name : "?";
}

static bool dtype_parse(const char *s, tern_dtype *out)
{
    for (size_t i = 0; i < DTYPE_COUNT; i++)
        if (strcmp(s, dtype_info[i].name) == 0) {
            *out = (tern_dtype)i;
            return true;
        }
    return false;
}

/* ---------------------------------------------------------------------------------------- */
/* Reading                                                                                    */

typedef struct {
    const char *key, *value;
} meta_pair;

struct tern_safetensors {
    tern_allocator alloc; /* a copy: the caller's struct may be a temporary */
    unsigned char *bytes; /* the whole file */
    size_t len;
    void *arena;
    tern_tensor_view *tensors; /* by data offset */
    const tern_tensor_view **by_name;
    size_t count;
    meta_pair *meta; /* by key */
    size_t meta_count;
};

static int cmp_by_offset(const void *pa, const void *pb)
{
    const tern_tensor_view *a = pa, *b = pb;
    /* Zero-byte tensors may share an offset; break ties so the order is deterministic. */
    const unsigned char *da = a->data, *db = b->data;
    if (da != db)
        return da < db ? -1 : 1;
    if (a->nbytes != b->nbytes)
        return a->nbytes < b->nbytes ? -1 : 1;
    return strcmp(a->name, b->name);
}

static int cmp_view_name(const void *pa, const void *pb)
{
    return strcmp((*(const tern_tensor_view *const *)pa)->name,
                  (*(const tern_tensor_view *const *)pb)->name);
}

static int cmp_meta_key(const void *pa, const void *pb)
{
    return strcmp(((const meta_pair *)pa)->key, ((const meta_pair *)pb)->key);
}

/* Copy s into the string pool at *pool; returns the copy. */
static const char *pool_copy(char **pool, const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = *pool;
    memcpy(d, s, n);
    *pool += n;
    return d;
}

/* A JSON integer in [0, limit], or false. */
static bool json_uint(const json_t *v, uint64_t limit, uint64_t *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return false;
    *out = (uint64_t)json_integer_value(v);
    return *out <= limit;
}

/* Validate one tensor entry and fill *view (name already set); data_len is the data buffer
 * size, data its start. */
static tern_status parse_tensor(const char *label, const char *name, const json_t *entry,
                                const unsigned char *data, size_t data_len,
                                tern_tensor_view *view, tern_error *err)
{
    if (!json_is_object(entry))
        return tern_set_error(err, TERN_ERR_FORMAT, "%s: tensor '%s': entry is not a JSON object",
                              label, name);

    const json_t *jd = json_object_get(entry, "dtype");
    if (!json_is_string(jd))
        return tern_set_error(err, TERN_ERR_FORMAT, "%s: tensor '%s': missing or non-string dtype",
                              label, name);
    if (!dtype_parse(json_string_value(jd), &view->dtype))
        return tern_set_error(err, TERN_ERR_FORMAT,
                              "%s: tensor '%s': unknown dtype '%s' (Tern reads F32 F64 F16 BF16 "
                              "I8 U8 I16 I32 I64 BOOL)",
                              label, name, json_string_value(jd));

    const json_t *js = json_object_get(entry, "shape");
    if (!json_is_array(js))
        return tern_set_error(err, TERN_ERR_FORMAT, "%s: tensor '%s': missing or non-array shape",
                              label, name);
    size_t ndim = json_array_size(js);
    if (ndim > TERN_MAX_DIMS)
        return tern_set_error(err, TERN_ERR_FORMAT,
                              "%s: tensor '%s': shape has %zu dimensions, more than %d", label,
                              name, ndim, TERN_MAX_DIMS);
    size_t nbytes = tern_dtype_size(view->dtype);
    view->ndim = (int)ndim;
    memset(view->shape, 0, sizeof view->shape);
    for (size_t i = 0; i < ndim; i++) {
        uint64_t d;
        if (!json_uint(json_array_get(js, i), INT64_MAX, &d))
            return tern_set_error(err, TERN_ERR_FORMAT,
                                  "%s: tensor '%s': shape entry %zu is not a non-negative integer",
                                  label, name, i);
        if (d > SIZE_MAX || !tern_mul_size(nbytes, (size_t)d, &nbytes))
            return tern_set_error(err, TERN_ERR_FORMAT,
                                  "%s: tensor '%s': shape overflows the byte count", label, name);
        view->shape[i] = (int64_t)d;
    }

    const json_t *jo = json_object_get(entry, "data_offsets");
    if (!json_is_array(jo) || json_array_size(jo) != 2)
        return tern_set_error(err, TERN_ERR_FORMAT,
                              "%s: tensor '%s': data_offsets is not a [begin, end] array", label,
                              name);
    uint64_t begin, end;
    if (!json_uint(json_array_get(jo, 0), UINT64_MAX, &begin) ||
        !json_uint(json_array_get(jo, 1), UINT64_MAX, &end))
        return tern_set_error(err, TERN_ERR_FORMAT,
                              "%s: tensor '%s': data_offsets are not non-negative integers", label,
                              name);
    if (begin > end)
        return tern_set_error(err, TERN_ERR_FORMAT,
                              "%s: tensor '%s': data_offsets [%llu, %llu] begin after end", label,
                              name, (unsigned long long)begin, (unsigned long long)end);
    if (end > data_len)
        return tern_set_error(err, TERN_ERR_FORMAT,
                              "%s: tensor '%s': data_offsets [%llu, %llu] end beyond data buffer "
                              "of %zu bytes (file truncated?)",
                              label, name, (unsigned long long)begin, (unsigned long long)end,
                              data_len);
    if (end - begin != nbytes)
        return tern_set_error(err, TERN_ERR_FORMAT,
                              "%s: tensor '%s': data_offsets [%llu, %llu] hold %llu bytes but "
                              "shape and dtype %s need %zu",
                              label, name, (unsigned long long)begin, (unsigned long long)end,
                              (unsigned long long)(end - begin), tern_dtype_name(view->dtype),
                              nbytes);
    view->data = data + begin;
    view->nbytes = nbytes;
    return TERN_OK;
}

/* The sorted tensors must cover [0, data_len) exactly, as the reference reader demands. */
static tern_status check_tiling(const char *label, const tern_safetensors *st,
                                const unsigned char *data, size_t data_len, tern_error *err)
{
    size_t at = 0;
    const char *prev = NULL;
    for (size_t i = 0; i < st->count; i++) {
        const tern_tensor_view *v = &st->tensors[i];
        size_t begin = (size_t)((const unsigned char *)v->data - data);
        if (begin < at)
            return tern_set_error(err, TERN_ERR_FORMAT,
                                  "%s: tensor '%s': data_offsets [%zu, %zu] overlap tensor '%s' "
                                  "which ends at %zu",
                                  label, v->name, begin, begin + v->nbytes, prev, at);
        if (begin > at) {
            if (prev)
                return tern_set_error(err, TERN_ERR_FORMAT,
                                      "%s: tensor '%s': hole of %zu bytes in the data buffer "
                                      "between tensor '%s' (ends at %zu) and this one (begins at "
                                      "%zu)",
                                      label, v->name, begin - at, prev, at, begin);
            return tern_set_error(err, TERN_ERR_FORMAT,
                                  "%s: tensor '%s': hole of %zu bytes at the start of the data "
                                  "buffer (first tensor begins at %zu)",
                                  label, v->name, begin, begin);
        }
        at = begin + v->nbytes;
        prev = v->name;
    }
    if (at != data_len)
        return tern_set_error(err, TERN_ERR_FORMAT,
                              "%s: data buffer of %zu bytes but the tensors end at %zu: %zu "
                              "trailing bytes are not covered by any tensor",
                              label, data_len, at, data_len - at);
    return TERN_OK;
}

/* Validate st->bytes (already owned by st) and build the views. */
static tern_status parse_owned(tern_safetensors *st, const char *label, tern_error *err)
{
    tern_status s;
    json_t *root = NULL;
    const size_t len = st->len;

    if (len == 0)
        return tern_set_error(err, TERN_ERR_FORMAT, "%s: file is empty", label);
    if (len < 8)
        return tern_set_error(err, TERN_ERR_FORMAT,
                              "%s: file of %zu bytes is shorter than the 8-byte header length",
                              label, len);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | st->bytes[i];
    if (n > len - 8)
        return tern_set_error(err, TERN_ERR_FORMAT, "%s: header length %llu beyond file size %zu",
                              label, (unsigned long long)n, len);
    if (n > MAX_HEADER_BYTES)
        return tern_set_error(err, TERN_ERR_FORMAT,
                              "%s: header length %llu exceeds the limit of %llu bytes", label,
                              (unsigned long long)n, (unsigned long long)MAX_HEADER_BYTES);
    const unsigned char *data = st->bytes + 8 + n;
    const size_t data_len = len - 8 - (size_t)n;

    json_error_t jerr;
    root = json_loadb((const char *)st->bytes + 8, (size_t)n, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        s = tern_set_error(err, TERN_ERR_FORMAT,
                           "%s: malformed JSON header: %s at line %d, column %d", label, jerr.text,
                           jerr.line, jerr.column);
        goto fail;
    }
    if (!json_is_object(root)) {
        s = tern_set_error(err, TERN_ERR_FORMAT, "%s: header is not a JSON object", label);
        goto fail;
    }

    /* Pass 1: count entries and string bytes so one arena holds the parsed header. */
    const char *key;
    json_t *value;
    json_t *meta = NULL;
    size_t count = 0, meta_count = 0, strbytes = 0;
    json_object_foreach(root, key, value) {
        if (strcmp(key, "__metadata__") == 0) {
            meta = value;
            continue;
        }
        count++;
        strbytes += strlen(key) + 1; /* bounded by the header size: no overflow */
    }
    if (meta) {
        const char *mkey;
        json_t *mval;
        if (!json_is_object(meta)) {
            s = tern_set_error(err, TERN_ERR_FORMAT, "%s: __metadata__ is not a JSON object",
                               label);
            goto fail;
        }
        json_object_foreach(meta, mkey, mval) {
            if (!json_is_string(mval)) {
                s = tern_set_error(err, TERN_ERR_FORMAT,
                                   "%s: __metadata__ value for key '%s' is not a string", label,
                                   mkey);
                goto fail;
            }
            meta_count++;
            strbytes += strlen(mkey) + 1 + strlen(json_string_value(mval)) + 1;
        }
    }

    /* Layout: views, metadata pairs, name index, strings (decreasing alignment). */
    size_t views_bytes, meta_bytes, index_bytes, total;
    if (!tern_mul_size(count, sizeof(tern_tensor_view), &views_bytes) ||
        !tern_mul_size(meta_count, sizeof(meta_pair), &meta_bytes) ||
        !tern_mul_size(count, sizeof(tern_tensor_view *), &index_bytes) ||
        !tern_add_size(views_bytes, meta_bytes, &total) ||
        !tern_add_size(total, index_bytes, &total) || !tern_add_size(total, strbytes, &total)) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "%s: header too large", label);
        goto fail;
    }
    st->arena = tern_alloc(&st->alloc, total);
    if (!st->arena) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory for %zu tensors", label, count);
        goto fail;
    }
    unsigned char *p = st->arena;
    st->tensors = (tern_tensor_view *)p;
    st->meta = (meta_pair *)(p + views_bytes);
    st->by_name = (const tern_tensor_view **)(p + views_bytes + meta_bytes);
    char *pool = (char *)(p + views_bytes + meta_bytes + index_bytes);

    /* Pass 2: validate and fill. */
    json_object_foreach(root, key, value) {
        if (value == meta)
            continue;
        tern_tensor_view *v = &st->tensors[st->count];
        v->name = pool_copy(&pool, key);
        s = parse_tensor(label, v->name, value, data, data_len, v, err);
        if (s != TERN_OK)
            goto fail;
        st->by_name[st->count] = v; /* fixed up after sorting the views */
        st->count++;
    }
    if (meta) {
        const char *mkey;
        json_t *mval;
        json_object_foreach(meta, mkey, mval) {
            meta_pair *m = &st->meta[st->meta_count++];
            m->key = pool_copy(&pool, mkey);
            m->value = pool_copy(&pool, json_string_value(mval));
        }
    }

    qsort(st->tensors, st->count, sizeof *st->tensors, cmp_by_offset);
    for (size_t i = 0; i < st->count; i++)
        st->by_name[i] = &st->tensors[i];
    qsort(st->by_name, st->count, sizeof *st->by_name, cmp_view_name);
    qsort(st->meta, st->meta_count, sizeof *st->meta, cmp_meta_key);

    s = check_tiling(label, st, data, data_len, err);
    if (s != TERN_OK)
        goto fail;
    json_decref(root);
    return TERN_OK;

fail:
    json_decref(root);
    return s;
}

static tern_safetensors *handle_new(const tern_allocator *alloc)
{
    tern_allocator a = alloc ? *alloc : (tern_allocator){0};
    tern_safetensors *st = tern_alloc(&a, sizeof *st);
    if (st) {
        memset(st, 0, sizeof *st);
        st->alloc = a;
    }
    return st;
}

static tern_status read_file(tern_safetensors *st, const char *path, tern_error *err)
{
    tern_status s;
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return tern_set_error(err, TERN_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        s = tern_set_error(err, TERN_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(sb.st_mode)) {
        s = tern_set_error(err, TERN_ERR_IO, "%s: not a regular file", path);
        goto fail;
    }
    if ((uintmax_t)sb.st_size > SIZE_MAX) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "%s: file too large for memory", path);
        goto fail;
    }
    st->len = (size_t)sb.st_size;
    st->bytes = tern_alloc(&st->alloc, st->len);
    if (!st->bytes) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory reading %zu bytes", path,
                           st->len);
        goto fail;
    }
    size_t got = 0;
    while (got < st->len) {
        size_t want = st->len - got < MAX_WRITE_CHUNK ? st->len - got : MAX_WRITE_CHUNK;
        ssize_t r = read(fd, st->bytes + got, want);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            s = tern_set_error(err, TERN_ERR_IO, "%s: read failed: %s", path, strerror(errno));
            goto fail;
        }
        if (r == 0) {
            s = tern_set_error(err, TERN_ERR_IO, "%s: file shrank while reading (%zu of %zu bytes)",
                               path, got, st->len);
            goto fail;
        }
        got += (size_t)r;
    }
    close(fd);
    return TERN_OK;

fail:
    close(fd);
    return s;
}

tern_status tern_safetensors_open(const char *path, const tern_allocator *alloc,
                                  tern_safetensors **out, tern_error *err)
{
    if (!path || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_safetensors_open: NULL argument");
    tern_status s;
    tern_safetensors *st = handle_new(alloc);
    if (!st)
        return tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", path);
    s = read_file(st, path, err);
    if (s != TERN_OK)
        goto fail;
    s = parse_owned(st, path, err);
    if (s != TERN_OK)
        goto fail;
    *out = st;
    return TERN_OK;

fail:
    tern_safetensors_close(&st);
    return s;
}

tern_status tern_safetensors_parse(const void *bytes, size_t len, const tern_allocator *alloc,
                                   tern_safetensors **out, tern_error *err)
{
    static const char label[] = "safetensors buffer";
    if ((!bytes && len > 0) || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_safetensors_parse: NULL argument");
    tern_status s;
    tern_safetensors *st = handle_new(alloc);
    if (!st)
        return tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", label);
    st->len = len;
    st->bytes = tern_alloc(&st->alloc, len);
    if (!st->bytes) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory copying %zu bytes", label, len);
        goto fail;
    }
    if (len > 0)
        memcpy(st->bytes, bytes, len);
    s = parse_owned(st, label, err);
    if (s != TERN_OK)
        goto fail;
    *out = st;
    return TERN_OK;

fail:
    tern_safetensors_close(&st);
    return s;
}

void tern_safetensors_close(tern_safetensors **pst)
{
    if (!pst || !*pst)
        return;
    tern_safetensors *st = *pst;
    tern_allocator a = st->alloc;
    tern_free(&a, st->arena);
    tern_free(&a, st->bytes);
    tern_free(&a, st);
    *pst = NULL;
}

size_t tern_safetensors_count(const tern_safetensors *st)
{
    return st ? st->count : 0;
}

tern_status tern_safetensors_get(const tern_safetensors *st, size_t index, tern_tensor_view *out)
{
    if (!st || !out || index >= st->count)
        return TERN_ERR_INVALID;
    *out = st->tensors[index];
    return TERN_OK;
}

tern_status tern_safetensors_find(const tern_safetensors *st, const char *name,
                                  tern_tensor_view *out)
{
    if (!st || !name || !out)
        return TERN_ERR_INVALID;
    size_t lo = 0, hi = st->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(name, st->by_name[mid]->name);
        if (c == 0) {
            *out = *st->by_name[mid];
            return TERN_OK;
        }
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return TERN_ERR_NOT_FOUND;
}

const char *tern_safetensors_metadata(const tern_safetensors *st, const char *key)
{
    if (!st || !key)
        return NULL;
    size_t lo = 0, hi = st->meta_count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(key, st->meta[mid].key);
        if (c == 0)
            return st->meta[mid].value;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

size_t tern_safetensors_metadata_count(const tern_safetensors *st)
{
    return st ? st->meta_count : 0;
}

tern_status tern_safetensors_metadata_at(const tern_safetensors *st, size_t index,
                                         const char **key, const char **value)
{
    if (!st || index >= st->meta_count)
        return TERN_ERR_INVALID;
    if (key)
        *key = st->meta[index].key;
    if (value)
        *value = st->meta[index].value;
    return TERN_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Writing                                                                                    */

typedef struct {
    char *name;
    tern_dtype dtype;
    int ndim;
    int64_t shape[TERN_MAX_DIMS];
    const void *data; /* borrowed */
    size_t nbytes;
} writer_entry;

typedef struct {
    char *key, *value;
} writer_meta;

struct tern_safetensors_writer {
    tern_allocator alloc;
    writer_entry *entries; /* insertion order = data order */
    size_t count, cap;
    writer_meta *meta;
    size_t meta_count, meta_cap;
    size_t data_bytes; /* sum of nbytes, kept <= INT64_MAX for the JSON offsets */
};

tern_status tern_safetensors_writer_create(const tern_allocator *alloc,
                                           tern_safetensors_writer **out)
{
    if (!out)
        return TERN_ERR_INVALID;
    tern_allocator a = alloc ? *alloc : (tern_allocator){0};
    tern_safetensors_writer *w = tern_alloc(&a, sizeof *w);
    if (!w)
        return TERN_ERR_NOMEM;
    memset(w, 0, sizeof *w);
    w->alloc = a;
    *out = w;
    return TERN_OK;
}

void tern_safetensors_writer_destroy(tern_safetensors_writer **pw)
{
    if (!pw || !*pw)
        return;
    tern_safetensors_writer *w = *pw;
    tern_allocator a = w->alloc;
    for (size_t i = 0; i < w->count; i++)
        tern_free(&a, w->entries[i].name);
    for (size_t i = 0; i < w->meta_count; i++) {
        tern_free(&a, w->meta[i].key);
        tern_free(&a, w->meta[i].value);
    }
    tern_free(&a, w->entries);
    tern_free(&a, w->meta);
    tern_free(&a, w);
    *pw = NULL;
}

/* Make room for one more element in a growable array (the allocator has no realloc). */
static bool grow(const tern_allocator *a, void **items, size_t count, size_t *cap, size_t elem)
{
    if (count < *cap)
        return true;
    size_t ncap = *cap ? *cap * 2 : 16, bytes;
    if (ncap < *cap || !tern_mul_size(ncap, elem, &bytes))
        return false;
    void *n = tern_alloc(a, bytes);
    if (!n)
        return false;
    if (count)
        memcpy(n, *items, count * elem);
    tern_free(a, *items);
    *items = n;
    *cap = ncap;
    return true;
}

/* Strict UTF-8 (no overlongs, surrogates or code points above U+10FFFF), as jansson demands of
 * every string it serializes; checked up front so serialize cannot fail on a bad name. */
static bool utf8_valid(const char *str)
{
    const unsigned char *s = (const unsigned char *)str;
    while (*s) {
        unsigned c = *s++;
        int extra;
        uint32_t cp, min;
        if (c < 0x80)
            continue;
        else if ((c & 0xE0) == 0xC0)
            extra = 1, cp = c & 0x1F, min = 0x80;
        else if ((c & 0xF0) == 0xE0)
            extra = 2, cp = c & 0x0F, min = 0x800;
        else if ((c & 0xF8) == 0xF0)
            extra = 3, cp = c & 0x07, min = 0x10000;
        else
            return false;
        for (int i = 0; i < extra; i++, s++) {
            if ((*s & 0xC0) != 0x80)
                return false;
            cp = cp << 6 | (*s & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
    }
    return true;
}

tern_status tern_safetensors_writer_add(tern_safetensors_writer *w, const char *name,
                                        tern_dtype dtype, int ndim, const int64_t *shape,
                                        const void *data)
{
    if (!w || !name || !*name || !dtype_valid(dtype) || ndim < 0 || ndim > TERN_MAX_DIMS ||
        (ndim > 0 && !shape) || strcmp(name, "__metadata__") == 0 || !utf8_valid(name))
        return TERN_ERR_INVALID;
    size_t nbytes = tern_dtype_size(dtype), total;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (uint64_t)shape[i] > SIZE_MAX ||
            !tern_mul_size(nbytes, (size_t)shape[i], &nbytes))
            return TERN_ERR_INVALID;
    }
    if (!tern_add_size(w->data_bytes, nbytes, &total) || (uint64_t)total > INT64_MAX ||
        (nbytes > 0 && !data))
        return TERN_ERR_INVALID;
    for (size_t i = 0; i < w->count; i++)
        if (strcmp(w->entries[i].name, name) == 0)
            return TERN_ERR_INVALID;

    if (!grow(&w->alloc, (void **)&w->entries, w->count, &w->cap, sizeof *w->entries))
        return TERN_ERR_NOMEM;
    char *copy = tern_strdup(&w->alloc, name);
    if (!copy)
        return TERN_ERR_NOMEM;
    writer_entry *e = &w->entries[w->count++];
    memset(e, 0, sizeof *e);
    e->name = copy;
    e->dtype = dtype;
    e->ndim = ndim;
    if (ndim > 0)
        memcpy(e->shape, shape, (size_t)ndim * sizeof *shape);
    e->data = data;
    e->nbytes = nbytes;
    w->data_bytes = total;
    return TERN_OK;
}

tern_status tern_safetensors_writer_set_metadata(tern_safetensors_writer *w, const char *key,
                                                 const char *value)
{
    if (!w || !key || !value || !utf8_valid(key) || !utf8_valid(value))
        return TERN_ERR_INVALID;
    tern_status s = TERN_ERR_NOMEM;
    char *v = tern_strdup(&w->alloc, value), *k = NULL;
    if (!v)
        goto fail;
    for (size_t i = 0; i < w->meta_count; i++)
        if (strcmp(w->meta[i].key, key) == 0) {
            tern_free(&w->alloc, w->meta[i].value);
            w->meta[i].value = v;
            return TERN_OK;
        }
    k = tern_strdup(&w->alloc, key);
    if (!k || !grow(&w->alloc, (void **)&w->meta, w->meta_count, &w->meta_cap, sizeof *w->meta))
        goto fail;
    w->meta[w->meta_count++] = (writer_meta){k, v};
    return TERN_OK;

fail:
    tern_free(&w->alloc, k);
    tern_free(&w->alloc, v);
    return s;
}

/* Set key to a new value, taking ownership: jansson frees v on failure and rejects NULL, so a
 * failed constructor needs no check of its own. */
static bool set_new(json_t *obj, const char *key, json_t *v)
{
    return json_object_set_new(obj, key, v) == 0;
}

/* Each container is attached before it is filled, so one decref of the root frees all. */
static json_t *entry_json(const writer_entry *e, size_t begin)
{
    json_t *o = json_object(), *shape, *offs;
    if (!o || json_object_set_new(o, "dtype", json_string(tern_dtype_name(e->dtype))) != 0 ||
        json_object_set_new(o, "shape", shape = json_array()) != 0 ||
        json_object_set_new(o, "data_offsets", offs = json_array()) != 0)
        goto fail;
    for (int i = 0; i < e->ndim; i++)
        if (json_array_append_new(shape, json_integer(e->shape[i])) != 0)
            goto fail;
    if (json_array_append_new(offs, json_integer((json_int_t)begin)) != 0 ||
        json_array_append_new(offs, json_integer((json_int_t)(begin + e->nbytes))) != 0)
        goto fail;
    return o;

fail:
    json_decref(o);
    return NULL;
}

/* Build the 8-byte length prefix plus the space-padded header into one allocated block. */
static tern_status build_header(const tern_safetensors_writer *w, unsigned char **out,
                                size_t *out_len)
{
    tern_status s = TERN_ERR_NOMEM;
    unsigned char *buf = NULL;
    json_t *root = json_object();
    if (!root)
        goto fail;
    if (w->meta_count > 0) {
        json_t *m = json_object();
        if (!set_new(root, "__metadata__", m))
            goto fail;
        for (size_t i = 0; i < w->meta_count; i++)
            if (!set_new(m, w->meta[i].key, json_string(w->meta[i].value)))
                goto fail;
    }
    size_t at = 0;
    for (size_t i = 0; i < w->count; i++) {
        if (!set_new(root, w->entries[i].name, entry_json(&w->entries[i], at)))
            goto fail;
        at += w->entries[i].nbytes;
    }
    const size_t flags = JSON_COMPACT | JSON_PRESERVE_ORDER;
    size_t hlen = json_dumpb(root, NULL, 0, flags), padded, total;
    if (hlen == 0 || !tern_add_size(hlen, 7, &padded))
        goto fail;
    padded &= ~(size_t)7;
    if (!tern_add_size(padded, 8, &total))
        goto fail;
    buf = tern_alloc(&w->alloc, total);
    if (!buf || json_dumpb(root, (char *)buf + 8, hlen, flags) != hlen)
        goto fail;
    memset(buf + 8 + hlen, ' ', padded - hlen);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    json_decref(root);
    *out = buf;
    *out_len = total;
    return TERN_OK;

fail:
    tern_free(&w->alloc, buf);
    json_decref(root);
    return s;
}

tern_status tern_safetensors_writer_serialize(const tern_safetensors_writer *w, void **bytes,
                                              size_t *len)
{
    if (!w || !bytes || !len)
        return TERN_ERR_INVALID;
    unsigned char *header = NULL, *buf = NULL;
    size_t hlen, total;
    tern_status s = build_header(w, &header, &hlen);
    if (s != TERN_OK)
        goto fail;
    s = TERN_ERR_NOMEM;
    if (!tern_add_size(hlen, w->data_bytes, &total))
        goto fail;
    buf = tern_alloc(&w->alloc, total);
    if (!buf)
        goto fail;
    memcpy(buf, header, hlen);
    size_t at = hlen;
    for (size_t i = 0; i < w->count; i++) {
        if (w->entries[i].nbytes > 0)
            memcpy(buf + at, w->entries[i].data, w->entries[i].nbytes);
        at += w->entries[i].nbytes;
    }
    tern_free(&w->alloc, header);
    *bytes = buf;
    *len = total;
    return TERN_OK;

fail:
    tern_free(&w->alloc, header);
    return s;
}

static bool write_all(int fd, const void *p, size_t n)
{
    const unsigned char *b = p;
    while (n > 0) {
        ssize_t r = write(fd, b, n < MAX_WRITE_CHUNK ? n : MAX_WRITE_CHUNK);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = EIO;
            return false;
        }
        b += r;
        n -= (size_t)r;
    }
    return true;
}

/* Make the rename itself durable; best effort, since the file is already in place. */
static void sync_parent_dir(const tern_allocator *a, const char *path)
{
    const char *slash = strrchr(path, '/');
    char *dir = slash ? tern_alloc(a, (size_t)(slash - path) + 2) : NULL;
    if (slash && !dir)
        return;
    if (dir) {
        size_t n = slash == path ? 1 : (size_t)(slash - path);
        memcpy(dir, path, n);
        dir[n] = '\0';
    }
    int fd = open(dir ? dir : ".", O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    tern_free(a, dir);
}

tern_status tern_safetensors_writer_write(const tern_safetensors_writer *w, const char *path,
                                          tern_error *err)
{
    if (!w || !path || !*path)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_safetensors_writer_write: bad argument");
    static const char suffix[] = ".tmp.XXXXXX";
    tern_status s;
    unsigned char *header = NULL;
    size_t hlen, plen = strlen(path), tlen;
    char *tmp = NULL;
    int fd = -1;

    s = build_header(w, &header, &hlen);
    if (s != TERN_OK) {
        tern_set_error(err, s, "%s: out of memory building the header", path);
        goto fail;
    }
    if (!tern_add_size(plen, sizeof suffix, &tlen) || !(tmp = tern_alloc(&w->alloc, tlen))) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", path);
        goto fail;
    }
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, suffix, sizeof suffix);
    fd = mkstemp(tmp);
    if (fd < 0) {
        s = tern_set_error(err, TERN_ERR_IO, "%s: cannot create temporary file: %s", path,
                           strerror(errno));
        tmp[0] = '\0'; /* nothing to remove */
        goto fail;
    }
    /* mkstemp creates 0600; keep the mode of the file being replaced, else the usual 0644. */
    struct stat sb;
    mode_t mode = stat(path, &sb) == 0 ? (sb.st_mode & 07777) : 0644;
    if (fchmod(fd, mode) != 0 || !write_all(fd, header, hlen)) {
        s = tern_set_error(err, TERN_ERR_IO, "%s: write failed: %s", tmp, strerror(errno));
        goto fail;
    }
    for (size_t i = 0; i < w->count; i++)
        if (!write_all(fd, w->entries[i].data, w->entries[i].nbytes)) {
            s = tern_set_error(err, TERN_ERR_IO, "%s: write failed: %s", tmp, strerror(errno));
            goto fail;
        }
    if (fsync(fd) != 0) {
        s = tern_set_error(err, TERN_ERR_IO, "%s: fsync failed: %s", tmp, strerror(errno));
        goto fail;
    }
    int rc = close(fd);
    fd = -1;
    if (rc != 0) {
        s = tern_set_error(err, TERN_ERR_IO, "%s: close failed: %s", tmp, strerror(errno));
        goto fail;
    }
    if (rename(tmp, path) != 0) {
        s = tern_set_error(err, TERN_ERR_IO, "cannot rename %s to %s: %s", tmp, path,
                           strerror(errno));
        goto fail;
    }
    sync_parent_dir(&w->alloc, path);
    tern_free(&w->alloc, tmp);
    tern_free(&w->alloc, header);
    return TERN_OK;

fail:
    if (fd >= 0)
        close(fd);
    if (tmp && tmp[0])
        unlink(tmp);
    tern_free(&w->alloc, tmp);
    tern_free(&w->alloc, header);
    return s;
}
