/* Datasets: Fashion-MNIST / IDX files held in memory, and image folders decoded on demand.
 *
 * IDX: both files are read completely at open through zlib's gz* functions (which read plain
 * files too) and checked against the header before the handle exists. A header declaring more
 * data than the file could hold (over zlib's maximum compression ratio) is not believed: the
 * data is counted, not allocated, and reported as truncated.
 *
 * Folder: DIR/<class>/<file> in torchvision ImageFolder order (classes and files sorted with
 * strcmp). Relative paths "class/file" live in one string arena, addressed by offset. Decoding
 * touches no shared state except one atomic "already warned" flag per sample, so
 * tern_dataset_image may run on several threads; the warn callback may therefore be called
 * from any thread that decodes (the loader's background thread, typically). */
#include "tern/data.h"

#include <dirent.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <zlib.h>

#include "data/dataset.h"
#include "nn/util.h"

#define IDX_MAGIC_IMAGES 0x00000803u
#define IDX_MAGIC_LABELS 0x00000801u
#define FASHION_MNIST_CLASSES 10
/* deflate cannot compress better than about 1032:1; more declared data than this is a lie. */
#define GZ_MAX_RATIO 1100u
#define GZ_CHUNK ((size_t)1 << 30)
#define MAX_PATH_BYTES 4096

static const char *const fashion_mnist_names[FASHION_MNIST_CLASSES] = {
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot",
};
static const char *const digit_names[10] = {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"};

const char *tern_fashion_mnist_class(int label)
{
    return label >= 0 && label < FASHION_MNIST_CLASSES ? fashion_mnist_names[label] : NULL;
}

enum dataset_kind { DATASET_IDX, DATASET_FOLDER };

struct tern_dataset {
    tern_allocator alloc; /* a copy: the caller's struct may be a temporary */
    enum dataset_kind kind;
    size_t count;
    int num_classes;
    int32_t *labels; /* (count) */

    /* IDX */
    const char *const *static_names; /* class names in static storage */
    uint8_t *pixels;                 /* (count, rows, cols) */
    int rows, cols;
    char *source_name; /* base name of the image file */

    /* folder */
    char *dir;
    char *arena;          /* NUL-terminated strings: class names, then "class/file" paths */
    size_t *class_off;    /* (num_classes) offsets of class names in arena */
    size_t *file_off;     /* (count) offsets of relative paths in arena */
    atomic_uchar *warned; /* (count) set once a failure has been reported */
    tern_folder_options opt;
};

static tern_dataset *dataset_new(const tern_allocator *alloc, enum dataset_kind kind)
{
    tern_allocator a = alloc ? *alloc : (tern_allocator){0};
    tern_dataset *ds = tern_alloc(&a, sizeof *ds);
    if (ds) {
        memset(ds, 0, sizeof *ds);
        ds->alloc = a;
        ds->kind = kind;
    }
    return ds;
}

void tern_dataset_close(tern_dataset **dsp)
{
    if (!dsp || !*dsp)
        return;
    tern_dataset *ds = *dsp;
    tern_allocator a = ds->alloc;
    tern_free(&a, ds->labels);
    tern_free(&a, ds->pixels);
    tern_free(&a, ds->source_name);
    tern_free(&a, ds->dir);
    tern_free(&a, ds->arena);
    tern_free(&a, ds->class_off);
    tern_free(&a, ds->file_off);
    tern_free(&a, (void *)ds->warned);
    tern_free(&a, ds);
    *dsp = NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* IDX                                                                                        */

static const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* Reads up to n bytes; *got is how many arrived before end of file. */
static tern_status gz_read_all(gzFile f, const char *path, void *dst, size_t n, size_t *got,
                               tern_error *err)
{
    unsigned char *d = dst;
    *got = 0;
    while (*got < n) {
        size_t want = n - *got < GZ_CHUNK ? n - *got : GZ_CHUNK;
        int r = gzread(f, d + *got, (unsigned)want);
        if (r < 0) {
            int code;
            const char *msg = gzerror(f, &code);
            return tern_set_error(err, code == Z_ERRNO ? TERN_ERR_IO : TERN_ERR_FORMAT,
                                  "%s: read failed: %s", path,
                                  code == Z_ERRNO ? strerror(errno) : msg);
        }
        if (r == 0)
            break;
        *got += (size_t)r;
    }
    return TERN_OK;
}

/* Bytes left in the stream (read and discarded), for messages about short or long files. */
static tern_status gz_count_rest(gzFile f, const char *path, size_t *count, tern_error *err)
{
    unsigned char buf[16384];
    *count = 0;
    for (;;) {
        size_t got;
        tern_status s = gz_read_all(f, path, buf, sizeof buf, &got, err);
        if (s != TERN_OK)
            return s;
        *count += got;
        if (got < sizeof buf)
            return TERN_OK;
    }
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

/* Opens an IDX file, checks its magic and reads dims[ndims]; *file_bytes is the size on disk. */
static tern_status idx_open(const char *path, uint32_t magic, int ndims, uint32_t *dims,
                            gzFile *out, size_t *file_bytes, tern_error *err)
{
    tern_status s;
    struct stat sb;
    if (stat(path, &sb) != 0)
        return tern_set_error(err, TERN_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (!S_ISREG(sb.st_mode))
        return tern_set_error(err, TERN_ERR_IO, "%s: not a regular file", path);
    *file_bytes = (uintmax_t)sb.st_size > SIZE_MAX ? SIZE_MAX : (size_t)sb.st_size;
    gzFile f = gzopen(path, "rb");
    if (!f)
        return tern_set_error(err, errno == ENOMEM ? TERN_ERR_NOMEM : TERN_ERR_IO,
                              "%s: cannot open: %s", path, strerror(errno));
    unsigned char header[4 + 4 * 3];
    size_t hlen = 4 + 4 * (size_t)ndims, got;
    s = gz_read_all(f, path, header, hlen, &got, err);
    if (s != TERN_OK)
        goto fail;
    if (got < hlen) {
        s = tern_set_error(err, TERN_ERR_FORMAT, "%s: truncated: %zu bytes, shorter than the %zu-byte IDX header",
                           path, got, hlen);
        goto fail;
    }
    uint32_t m = be32(header);
    if (m != magic) {
        s = tern_set_error(err, TERN_ERR_FORMAT,
                           "%s: bad magic number 0x%08x (expected 0x%08x: IDX %s, unsigned bytes,"
                           " %d dimension%s)",
                           path, (unsigned)m, (unsigned)magic,
                           magic == IDX_MAGIC_IMAGES ? "images" : "labels", ndims,
                           ndims == 1 ? "" : "s");
        goto fail;
    }
    for (int i = 0; i < ndims; i++)
        dims[i] = be32(header + 4 + 4 * i);
    *out = f;
    return TERN_OK;

fail:
    gzclose(f);
    return s;
}

/* Reads exactly `bytes` bytes of data into a new block; what says what the header declared. */
static tern_status idx_read_data(gzFile f, const char *path, size_t bytes, size_t file_bytes,
                                 const char *what, const tern_allocator *a, uint8_t **out,
                                 tern_error *err)
{
    tern_status s;
    uint8_t *data = NULL;
    size_t got = 0, rest, limit;
    if (!tern_mul_size(file_bytes, GZ_MAX_RATIO, &limit))
        limit = SIZE_MAX;
    if (bytes > limit) {
        /* Cannot be there: count what is instead of allocating what the header claims. */
        s = gz_count_rest(f, path, &got, err);
        if (s != TERN_OK)
            goto fail;
        s = tern_set_error(err, TERN_ERR_FORMAT, "%s: truncated: header says %s, found %zu bytes of data",
                           path, what, got);
        goto fail;
    }
    data = tern_alloc(a, bytes);
    if (!data) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory for %zu bytes", path, bytes);
        goto fail;
    }
    s = gz_read_all(f, path, data, bytes, &got, err);
    if (s != TERN_OK)
        goto fail;
    if (got < bytes) {
        s = tern_set_error(err, TERN_ERR_FORMAT, "%s: truncated: header says %s, found %zu bytes of data",
                           path, what, got);
        goto fail;
    }
    s = gz_count_rest(f, path, &rest, err);
    if (s != TERN_OK)
        goto fail;
    if (rest) {
        s = tern_set_error(err, TERN_ERR_FORMAT, "%s: header says %s, but %zu more bytes follow",
                           path, what, rest);
        goto fail;
    }
    *out = data;
    return TERN_OK;

fail:
    tern_free(a, data);
    return s;
}

tern_status tern_dataset_open_idx(const char *images_path, const char *labels_path,
                                  const tern_allocator *alloc, tern_dataset **out,
                                  tern_error *err)
{
    if (!images_path || !labels_path || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_dataset_open_idx: NULL argument");
    tern_status s;
    gzFile fi = NULL, fl = NULL;
    uint8_t *raw_labels = NULL;
    char what[128];
    tern_dataset *ds = dataset_new(alloc, DATASET_IDX);
    if (!ds)
        return tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", images_path);

    uint32_t idims[3] = {0}, ldims[1] = {0};
    size_t ifile = 0, lfile = 0;
    s = idx_open(images_path, IDX_MAGIC_IMAGES, 3, idims, &fi, &ifile, err);
    if (s != TERN_OK)
        goto fail;
    s = idx_open(labels_path, IDX_MAGIC_LABELS, 1, ldims, &fl, &lfile, err);
    if (s != TERN_OK)
        goto fail;
    if (idims[1] == 0 || idims[2] == 0 || idims[1] > 65535 || idims[2] > 65535) {
        s = tern_set_error(err, TERN_ERR_FORMAT, "%s: bad image size %ux%u", images_path,
                           (unsigned)idims[1], (unsigned)idims[2]);
        goto fail;
    }
    if (idims[0] == 0) {
        s = tern_set_error(err, TERN_ERR_FORMAT, "%s: header says 0 images", images_path);
        goto fail;
    }
    if (idims[0] != ldims[0]) {
        s = tern_set_error(err, TERN_ERR_FORMAT, "%s has %u images but %s has %u labels",
                           images_path, (unsigned)idims[0], labels_path, (unsigned)ldims[0]);
        goto fail;
    }
    size_t n = idims[0], per_image = (size_t)idims[1] * idims[2], bytes;
    if (!tern_mul_size(n, per_image, &bytes)) {
        s = tern_set_error(err, TERN_ERR_FORMAT, "%s: header declares too much data",
                           images_path);
        goto fail;
    }
    snprintf(what, sizeof what, "%zu images of %ux%u", n, (unsigned)idims[1],
             (unsigned)idims[2]);
    s = idx_read_data(fi, images_path, bytes, ifile, what, &ds->alloc, &ds->pixels, err);
    if (s != TERN_OK)
        goto fail;
    snprintf(what, sizeof what, "%zu labels", n);
    s = idx_read_data(fl, labels_path, n, lfile, what, &ds->alloc, &raw_labels, err);
    if (s != TERN_OK)
        goto fail;

    ds->labels = tern_alloc(&ds->alloc, n * sizeof *ds->labels);
    ds->source_name = tern_strdup(&ds->alloc, base_name(images_path));
    if (!ds->labels || !ds->source_name) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", images_path);
        goto fail;
    }
    for (size_t i = 0; i < n; i++) {
        if (raw_labels[i] >= FASHION_MNIST_CLASSES) {
            s = tern_set_error(err, TERN_ERR_FORMAT,
                               "%s: label %u of sample %zu is out of range (%d classes)",
                               labels_path, (unsigned)raw_labels[i], i, FASHION_MNIST_CLASSES);
            goto fail;
        }
        ds->labels[i] = raw_labels[i];
    }
    ds->count = n;
    ds->num_classes = FASHION_MNIST_CLASSES;
    ds->static_names = digit_names;
    ds->rows = (int)idims[1];
    ds->cols = (int)idims[2];
    gzclose(fi);
    gzclose(fl);
    tern_free(&ds->alloc, raw_labels);
    *out = ds;
    return TERN_OK;

fail:
    if (fi)
        gzclose(fi);
    if (fl)
        gzclose(fl);
    tern_free(&ds->alloc, raw_labels);
    tern_dataset_close(&ds);
    return s;
}

/* dir/name.gz if it exists, else dir/name (an unpacked copy). */
static void fashion_path(char *buf, size_t len, const char *dir, const char *name)
{
    struct stat sb;
    snprintf(buf, len, "%s/%s.gz", dir, name);
    if (stat(buf, &sb) != 0) {
        snprintf(buf, len, "%s/%s", dir, name);
        if (stat(buf, &sb) != 0) /* neither: name the .gz in the error */
            snprintf(buf, len, "%s/%s.gz", dir, name);
    }
}

tern_status tern_dataset_open_fashion_mnist(const char *dir, bool train,
                                            const tern_allocator *alloc, tern_dataset **out,
                                            tern_error *err)
{
    if (!dir || !out)
        return tern_set_error(err, TERN_ERR_INVALID,
                              "tern_dataset_open_fashion_mnist: NULL argument");
    char images[MAX_PATH_BYTES], labels[MAX_PATH_BYTES];
    if (strlen(dir) > MAX_PATH_BYTES - 64)
        return tern_set_error(err, TERN_ERR_INVALID, "%s: path too long", dir);
    const char *prefix = train ? "train" : "t10k";
    char name[64];
    snprintf(name, sizeof name, "%s-images-idx3-ubyte", prefix);
    fashion_path(images, sizeof images, dir, name);
    snprintf(name, sizeof name, "%s-labels-idx1-ubyte", prefix);
    fashion_path(labels, sizeof labels, dir, name);
    tern_status s = tern_dataset_open_idx(images, labels, alloc, out, err);
    if (s == TERN_OK)
        (*out)->static_names = fashion_mnist_names;
    return s;
}

/* ---------------------------------------------------------------------------------------- */
/* Folder                                                                                     */

/* A growable byte buffer and a growable array of offsets, through the tern allocator (which
 * has no realloc). */
typedef struct {
    char *p;
    size_t len, cap;
} strbuf;

typedef struct {
    size_t *p;
    size_t len, cap;
} offvec;

static bool grow(const tern_allocator *a, void **p, size_t *cap, size_t need, size_t elem,
                 size_t used)
{
    if (need <= *cap)
        return true;
    size_t cap2 = *cap ? *cap : 64, bytes;
    while (cap2 < need)
        if (!tern_mul_size(cap2, 2, &cap2))
            return false;
    if (!tern_mul_size(cap2, elem, &bytes))
        return false;
    void *q = tern_alloc(a, bytes);
    if (!q)
        return false;
    if (used)
        memcpy(q, *p, used * elem);
    tern_free(a, *p);
    *p = q;
    *cap = cap2;
    return true;
}

/* Appends the concatenation of a and b (b may be NULL) plus a NUL; *off receives its offset. */
static bool strbuf_add(const tern_allocator *al, strbuf *sb, const char *a, const char *b,
                       size_t *off)
{
    size_t la = strlen(a), lb = b ? strlen(b) : 0, need;
    if (!tern_add_size(sb->len, la, &need) || !tern_add_size(need, lb + 1, &need) ||
        !grow(al, (void **)&sb->p, &sb->cap, need, 1, sb->len))
        return false;
    *off = sb->len;
    memcpy(sb->p + sb->len, a, la);
    if (lb)
        memcpy(sb->p + sb->len + la, b, lb);
    sb->p[need - 1] = '\0';
    sb->len = need;
    return true;
}

static bool offvec_push(const tern_allocator *a, offvec *v, size_t off)
{
    if (!grow(a, (void **)&v->p, &v->cap, v->len + 1, sizeof *v->p, v->len))
        return false;
    v->p[v->len++] = off;
    return true;
}

static bool has_image_ext(const char *name)
{
    const char *dot = strrchr(name, '.');
    return dot && dot != name &&
           (strcasecmp(dot, ".jpg") == 0 || strcasecmp(dot, ".jpeg") == 0 ||
            strcasecmp(dot, ".png") == 0);
}

static int cmp_str_ptr(const void *pa, const void *pb)
{
    return strcmp(*(const char *const *)pa, *(const char *const *)pb);
}

/* Sorts v->p[from..] by the strings they address in arena (via a temporary pointer array,
 * since qsort has no context argument). */
static bool sort_offsets(const tern_allocator *a, const char *arena, offvec *v, size_t from)
{
    size_t n = v->len - from;
    if (n < 2)
        return true;
    const char **ptrs = tern_alloc(a, n * sizeof *ptrs);
    if (!ptrs)
        return false;
    for (size_t i = 0; i < n; i++)
        ptrs[i] = arena + v->p[from + i];
    qsort(ptrs, n, sizeof *ptrs, cmp_str_ptr);
    for (size_t i = 0; i < n; i++)
        v->p[from + i] = (size_t)(ptrs[i] - arena);
    tern_free(a, (void *)ptrs);
    return true;
}

/* Is dir/name (following symlinks) a directory (want_dir) or regular file? */
static bool is_kind(const char *dir, const char *name, bool want_dir)
{
    char path[MAX_PATH_BYTES];
    struct stat sb;
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, name) >= sizeof path ||
        stat(path, &sb) != 0)
        return false;
    return want_dir ? S_ISDIR(sb.st_mode) : S_ISREG(sb.st_mode);
}

/* Appends the visible entries of dir that are directories (want_dir) or image files to v, as
 * strings prefix + name in sb. */
static tern_status scan_dir(const tern_allocator *a, const char *dir, const char *prefix,
                            bool want_dir, strbuf *sb, offvec *v, tern_error *err)
{
    DIR *d = opendir(dir);
    if (!d)
        return tern_set_error(err, TERN_ERR_IO, "%s: cannot open directory: %s", dir,
                              strerror(errno));
    tern_status s = TERN_OK;
    struct dirent *e;
    for (;;) {
        errno = 0;
        e = readdir(d);
        if (!e) {
            if (errno)
                s = tern_set_error(err, TERN_ERR_IO, "%s: cannot read directory: %s", dir,
                                   strerror(errno));
            break;
        }
        if (e->d_name[0] == '.')
            continue;
        if (!want_dir && !has_image_ext(e->d_name))
            continue;
        if (!is_kind(dir, e->d_name, want_dir))
            continue;
        size_t off;
        if (!strbuf_add(a, sb, prefix, e->d_name, &off) || !offvec_push(a, v, off)) {
            s = tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", dir);
            break;
        }
    }
    closedir(d);
    return s;
}

tern_status tern_dataset_open_folder(const char *dir, const tern_folder_options *opt,
                                     const tern_allocator *alloc, tern_dataset **out,
                                     tern_error *err)
{
    if (!dir || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_dataset_open_folder: NULL argument");
    tern_status s;
    strbuf sb = {0};
    offvec classes = {0}, files = {0};
    int32_t *labels = NULL;
    char *class_dir = NULL, *prefix = NULL;
    tern_dataset *ds = dataset_new(alloc, DATASET_FOLDER);
    if (!ds)
        return tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", dir);
    const tern_allocator *a = &ds->alloc;
    if (opt)
        ds->opt = *opt;
    ds->dir = tern_strdup(a, dir);
    if (!ds->dir) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", dir);
        goto fail;
    }

    s = scan_dir(a, dir, "", true, &sb, &classes, err);
    if (s != TERN_OK)
        goto fail;
    if (classes.len == 0) {
        s = tern_set_error(err, TERN_ERR_FORMAT,
                           "%s: no class directories (expected DIR/<class>/<image>)", dir);
        goto fail;
    }
    if (classes.len > INT32_MAX) {
        s = tern_set_error(err, TERN_ERR_FORMAT, "%s: too many classes", dir);
        goto fail;
    }
    if (!sort_offsets(a, sb.p, &classes, 0)) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", dir);
        goto fail;
    }

    size_t dlen = strlen(dir), label_cap = 0;
    for (size_t c = 0; c < classes.len; c++) {
        /* The arena may move while scanning: copy the class name out first. */
        const char *cname = sb.p + classes.p[c];
        size_t clen = strlen(cname), plen, before = files.len;
        if (!tern_add_size(dlen, clen + 2, &plen) || !(class_dir = tern_alloc(a, plen)) ||
            !(prefix = tern_alloc(a, clen + 2))) {
            s = tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", dir);
            goto fail;
        }
        snprintf(class_dir, plen, "%s/%s", dir, cname);
        snprintf(prefix, clen + 2, "%s/", cname);
        s = scan_dir(a, class_dir, prefix, false, &sb, &files, err);
        if (s != TERN_OK)
            goto fail;
        if (!sort_offsets(a, sb.p, &files, before) ||
            !grow(a, (void **)&labels, &label_cap, files.len, sizeof *labels, before)) {
            s = tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", dir);
            goto fail;
        }
        for (size_t i = before; i < files.len; i++)
            labels[i] = (int32_t)c;
        tern_free(a, class_dir);
        tern_free(a, prefix);
        class_dir = prefix = NULL;
    }
    if (files.len == 0) {
        s = tern_set_error(err, TERN_ERR_FORMAT,
                           "%s: no images (.jpg, .jpeg or .png) in its %zu class directories",
                           dir, classes.len);
        goto fail;
    }
    ds->warned = tern_alloc(a, files.len * sizeof *ds->warned);
    if (!ds->warned) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", dir);
        goto fail;
    }
    for (size_t i = 0; i < files.len; i++)
        atomic_init(&ds->warned[i], 0);

    ds->count = files.len;
    ds->num_classes = (int)classes.len;
    ds->arena = sb.p;
    ds->class_off = classes.p;
    ds->file_off = files.p;
    ds->labels = labels;
    *out = ds;
    return TERN_OK;

fail:
    tern_free(a, class_dir);
    tern_free(a, prefix);
    tern_free(a, sb.p);
    tern_free(a, classes.p);
    tern_free(a, files.p);
    tern_free(a, labels);
    tern_dataset_close(&ds);
    return s;
}

/* ---------------------------------------------------------------------------------------- */
/* Access                                                                                     */

size_t tern_dataset_size(const tern_dataset *ds)
{
    return ds ? ds->count : 0;
}

int tern_dataset_num_classes(const tern_dataset *ds)
{
    return ds ? ds->num_classes : 0;
}

bool tern_dataset_strict(const tern_dataset *ds)
{
    return ds && ds->kind == DATASET_FOLDER && ds->opt.strict;
}

const char *tern_dataset_class_name(const tern_dataset *ds, int label)
{
    if (!ds || label < 0 || label >= ds->num_classes)
        return NULL;
    if (ds->kind == DATASET_IDX)
        return ds->static_names[label];
    return ds->arena + ds->class_off[label];
}

int tern_dataset_label(const tern_dataset *ds, size_t index)
{
    return ds && index < ds->count ? ds->labels[index] : -1;
}

const char *tern_dataset_source(const tern_dataset *ds, size_t index, char *buf, size_t len)
{
    if (!ds || index >= ds->count || !buf || len == 0)
        return NULL;
    if (ds->kind == DATASET_IDX)
        snprintf(buf, len, "%s#%zu", ds->source_name, index);
    else
        snprintf(buf, len, "%s/%s", ds->dir, ds->arena + ds->file_off[index]);
    return buf;
}

tern_status tern_dataset_image(const tern_dataset *ds, size_t index, const tern_allocator *alloc,
                               tern_image *img, tern_error *err)
{
    if (!ds || !img)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_dataset_image: NULL argument");
    if (index >= ds->count)
        return tern_set_error(err, TERN_ERR_INVALID,
                              "tern_dataset_image: index %zu out of range (%zu samples)", index,
                              ds->count);
    if (ds->kind == DATASET_IDX) {
        size_t bytes = (size_t)ds->rows * (size_t)ds->cols;
        uint8_t *p = tern_alloc(alloc, bytes);
        if (!p)
            return tern_set_error(err, TERN_ERR_NOMEM, "%s#%zu: out of memory", ds->source_name,
                                  index);
        memcpy(p, ds->pixels + index * bytes, bytes);
        *img = (tern_image){.width = ds->cols, .height = ds->rows, .channels = 1, .data = p};
        return TERN_OK;
    }

    char path[MAX_PATH_BYTES];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", ds->dir, ds->arena + ds->file_off[index]) >=
        sizeof path)
        return tern_set_error(err, TERN_ERR_IO, "%s/%s: path too long", ds->dir,
                              ds->arena + ds->file_off[index]);
    tern_error local;
    tern_error *e = err ? err : &local;
    tern_status s = tern_image_load(path, &ds->opt.limits, alloc, img, e);
    if (s == TERN_ERR_NOMEM || s == TERN_ERR_INVALID || s == TERN_OK || ds->opt.strict)
        return s;
    /* Will be skipped: report it once. */
    if (ds->opt.warn && atomic_exchange(&ds->warned[index], 1) == 0) {
        char msg[sizeof e->message + 32];
        snprintf(msg, sizeof msg, "skipping %s", e->message);
        ds->opt.warn(ds->opt.warn_user, msg);
    }
    return s;
}
