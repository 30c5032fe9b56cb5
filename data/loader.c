/* Batch loader: seeded shuffling, decoding, transforms and an optional LMDB cache, with one
 * background thread preparing the next batch while the caller trains on the current one.
 *
 * Determinism. Everything a batch contains is a function of (seed, epoch, position in the
 * epoch): epoch e's order is a Fisher-Yates permutation drawn from a tern_rng seeded with
 * (seed, e), and the sample at position p is transformed with a tern_rng seeded with
 * (seed, e, p). Nothing depends on timing, so tern_loader_set_epoch(e) reproduces epoch e
 * exactly, and skipping a sample that fails to decode does not shift the random choices of the
 * samples after it.
 *
 * Threading. Two batch slots cycle between the worker and the caller: FREE -> FILLING (worker,
 * without the lock) -> READY -> HELD (the caller's borrowed batch, until its next call) -> FREE.
 * Slots are handed over in the order they were filled (a sequence number). A generation counter
 * lets set_epoch discard batches prepared for the old position: the worker checks it between
 * samples and throws away a batch whose generation changed. The end of an epoch travels through
 * the same queue as a batch marked `end`, so it is delivered in order.
 *
 * Cache. With cache_dir, each decoded image is resized (shorter side cache_size, bilinear with
 * Pillow-style antialiasing when shrinking; 0 keeps it as decoded) and stored in LMDB under
 * (dataset fingerprint, sample index); later epochs, and later runs, read it back instead of
 * decoding. Only the worker thread uses the environment after create. The map doubles when
 * full. Writes skip fsync (MDB_NOSYNC): the cache can be rebuilt, and entries are validated
 * (magic, size) when read, anything odd counting as a miss. One loader per cache directory per
 * process (an LMDB rule). The fingerprint covers the dataset's size, classes, every sample's
 * source and label, and cache_size; it does not cover file contents, so a cache must be
 * deleted when images are replaced in place. */
#include "tern/data.h"

#include <errno.h>
#include <lmdb.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

#include "data/dataset.h"
#include "nn/util.h"

#define CACHE_MAGIC 0x314e5254u /* "TRN1" little-endian */
#define CACHE_HEADER 16         /* magic, width, height, channels: uint32 each */
#define CACHE_INITIAL_MAP ((size_t)64 << 20)

enum slot_state { SLOT_FREE, SLOT_FILLING, SLOT_READY, SLOT_HELD };

typedef struct slot {
    float *images;   /* (batch, size, size, channels) */
    int32_t *labels; /* (batch) */
    int n;
    bool end;           /* end-of-epoch marker, no samples */
    tern_status status; /* a failed batch carries its error instead of samples */
    tern_error err;
    size_t skipped;     /* samples skipped while filling this slot */
    uint64_t epoch, seq;
    enum slot_state state;
} slot;

struct tern_loader {
    tern_allocator alloc;
    const tern_dataset *ds;
    tern_transform t;
    int batch;
    bool shuffle, drop_last, strict;
    size_t count;         /* samples per epoch */
    size_t *indices;      /* (count) dataset indices */
    size_t sample_floats; /* size * size * channels */

    /* Worker-owned after create. */
    size_t *order; /* (count) positions into indices for order_seed, order_epoch */
    uint64_t order_seed, order_epoch;
    bool order_valid;
    unsigned char *scratch; /* resize output and temporaries, grown on demand */
    size_t scratch_cap;
    MDB_env *env;
    MDB_dbi dbi;
    MDB_txn *rtxn; /* reset between samples, renewed for each lookup */
    size_t map_size;
    int cache_size;
    uint64_t fingerprint;

    /* Shared, under mu (gen and stop are also read without it to abort a batch early). */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thread;
    bool thread_started;
    atomic_bool stop;
    atomic_uint_fast64_t gen;
    slot slots[2];
    uint64_t w_seed;  /* the seed the worker fills with (tern_loader_set_seed changes it) */
    uint64_t w_epoch; /* where the worker continues */
    size_t w_pos;
    uint64_t next_seq, take_seq;

    /* Caller-owned. */
    uint64_t epoch;
    size_t skipped;
    int held; /* slot the caller borrows, or -1 */
};

/* ---- seeds --------------------------------------------------------------------------------- */

static uint64_t mix64(uint64_t z) /* MurmurHash3's finalizer */
{
    z ^= z >> 33;
    z *= 0xff51afd7ed558ccdull;
    z ^= z >> 33;
    z *= 0xc4ceb9fe1a85ec53ull;
    return z ^ (z >> 33);
}

static uint64_t seed_chain(uint64_t h, uint64_t v)
{
    return mix64(h ^ mix64(v + 0x9E3779B97F4A7C15ull));
}

enum { TAG_SHUFFLE = 1, TAG_TRANSFORM = 2 };

static uint64_t shuffle_seed(uint64_t seed, uint64_t epoch)
{
    return seed_chain(seed_chain(mix64(seed), TAG_SHUFFLE), epoch);
}

static uint64_t sample_seed(uint64_t seed, uint64_t epoch, size_t pos)
{
    return seed_chain(seed_chain(seed_chain(mix64(seed), TAG_TRANSFORM), epoch), pos);
}

static uint64_t fnv1a(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* Identifies the dataset (and the cached geometry) in cache keys. */
static uint64_t dataset_fingerprint(const tern_dataset *ds, int cache_size)
{
    uint64_t h = 0xcbf29ce484222325ull;
    uint64_t head[3] = {tern_dataset_size(ds), (uint64_t)tern_dataset_num_classes(ds),
                        (uint64_t)cache_size};
    h = fnv1a(h, head, sizeof head);
    for (int c = 0; c < tern_dataset_num_classes(ds); c++) {
        const char *name = tern_dataset_class_name(ds, c);
        if (name)
            h = fnv1a(h, name, strlen(name) + 1);
    }
    char buf[4096];
    for (size_t i = 0; i < tern_dataset_size(ds); i++) {
        const char *src = tern_dataset_source(ds, i, buf, sizeof buf);
        int32_t label = tern_dataset_label(ds, i);
        if (src)
            h = fnv1a(h, src, strlen(src) + 1);
        h = fnv1a(h, &label, sizeof label);
    }
    return mix64(h);
}

/* ---- resizing for the cache ------------------------------------------------------------------ */

/* Output size with the shorter side `size`, as torchvision's Resize(int) computes it. */
static void resized_dims(int w, int h, int size, int *ow, int *oh)
{
    if (w <= h) {
        *ow = size;
        *oh = (int)((int64_t)size * h / w);
    } else {
        *oh = size;
        *ow = (int)((int64_t)size * w / h);
    }
    if (*ow < 1)
        *ow = 1;
    if (*oh < 1)
        *oh = 1;
}

/* Pillow's bilinear filter: a triangle whose support widens with the reduction factor, so
 * shrinking averages every source pixel instead of sampling a few. */
typedef struct {
    double scale, support;
    int taps;
} filter1d;

static filter1d filter_for(int in, int out)
{
    filter1d f;
    f.scale = (double)in / out;
    double ss = f.scale > 1 ? f.scale : 1;
    f.support = ss;
    f.taps = (int)ceil(f.support) * 2 + 1;
    return f;
}

/* Window [*lo, *lo + *n) and normalized weights w[0..n) of output coordinate i. */
static void filter_window(const filter1d *f, int in, int i, int *lo, int *n, float *w)
{
    double center = (i + 0.5) * f->scale;
    double ss = f->scale > 1 ? f->scale : 1;
    int a = (int)floor(center - f->support + 0.5), b = (int)floor(center + f->support + 0.5);
    if (a < 0)
        a = 0;
    if (b > in)
        b = in;
    if (b - a > f->taps)
        b = a + f->taps;
    double sum = 0;
    for (int j = a; j < b; j++) {
        double x = fabs((j - center + 0.5) / ss);
        double v = x < 1 ? 1 - x : 0;
        w[j - a] = (float)v;
        sum += v;
    }
    if (sum > 0)
        for (int j = a; j < b; j++)
            w[j - a] = (float)(w[j - a] / sum);
    *lo = a;
    *n = b - a;
}

static bool scratch_reserve(tern_loader *L, size_t bytes)
{
    if (bytes <= L->scratch_cap)
        return true;
    unsigned char *p = tern_alloc(&L->alloc, bytes);
    if (!p)
        return false;
    tern_free(&L->alloc, L->scratch);
    L->scratch = p;
    L->scratch_cap = bytes;
    return true;
}

static size_t align_up(size_t x)
{
    return (x + TERN_ALIGN - 1) & ~(size_t)(TERN_ALIGN - 1);
}

/* Resize src into a new image whose pixels live in L->scratch (valid until the next call). */
static tern_status resize_image(tern_loader *L, const tern_image *src, int ow, int oh,
                                tern_image *dst, tern_error *err)
{
    const int w = src->width, h = src->height, c = src->channels;
    filter1d fx = filter_for(w, ow), fy = filter_for(h, oh);
    int taps = fx.taps > fy.taps ? fx.taps : fy.taps;
    /* Layout: output bytes (oh, ow, c), horizontal pass floats (h, ow, c), one weight row. */
    size_t out_bytes, tmp_elems, tmp_bytes, total;
    if (!tern_mul_size((size_t)oh * (size_t)ow, (size_t)c, &out_bytes) ||
        !tern_mul_size((size_t)h * (size_t)ow, (size_t)c, &tmp_elems) ||
        !tern_mul_size(tmp_elems, sizeof(float), &tmp_bytes) ||
        !tern_add_size(align_up(out_bytes), tmp_bytes, &total) ||
        !tern_add_size(total, (size_t)taps * sizeof(float), &total) ||
        !scratch_reserve(L, total))
        return tern_set_error(err, TERN_ERR_NOMEM, "loader: out of memory resizing a %dx%d image",
                              w, h);
    uint8_t *out = L->scratch;
    float *tmp = (float *)(L->scratch + align_up(out_bytes));
    float *wt = tmp + tmp_elems;

    for (int x = 0; x < ow; x++) {
        int lo, n;
        filter_window(&fx, w, x, &lo, &n, wt);
        for (int y = 0; y < h; y++) {
            const uint8_t *s = src->data + ((size_t)y * (size_t)w + (size_t)lo) * (size_t)c;
            float *d = tmp + ((size_t)y * (size_t)ow + (size_t)x) * (size_t)c;
            for (int ch = 0; ch < c; ch++) {
                float acc = 0;
                for (int j = 0; j < n; j++)
                    acc += wt[j] * s[(size_t)j * (size_t)c + (size_t)ch];
                d[ch] = acc;
            }
        }
    }
    const size_t row = (size_t)ow * (size_t)c;
    for (int y = 0; y < oh; y++) {
        int lo, n;
        filter_window(&fy, h, y, &lo, &n, wt);
        uint8_t *d = out + (size_t)y * row;
        for (size_t i = 0; i < row; i++) {
            float acc = 0;
            for (int j = 0; j < n; j++)
                acc += wt[j] * tmp[(size_t)(lo + j) * row + i];
            acc = roundf(acc);
            d[i] = (uint8_t)(acc < 0 ? 0 : acc > 255 ? 255 : acc);
        }
    }
    *dst = (tern_image){.width = ow, .height = oh, .channels = c, .data = out};
    return TERN_OK;
}

/* ---- samples: decode or read the cache ------------------------------------------------------ */

typedef struct {
    tern_image img;     /* what the transform reads */
    tern_image decoded; /* owned pixels to free, if any */
    bool txn_live;      /* img points into the read transaction's snapshot */
} sample_image;

static void sample_release(tern_loader *L, sample_image *si)
{
    if (si->txn_live) {
        mdb_txn_reset(L->rtxn);
        si->txn_live = false;
    }
    tern_image_free(&L->alloc, &si->decoded);
}

static void cache_key(const tern_loader *L, size_t index, unsigned char key[16])
{
    uint64_t v[2] = {L->fingerprint, (uint64_t)index};
    for (int i = 0; i < 2; i++)
        for (int b = 0; b < 8; b++)
            key[i * 8 + b] = (unsigned char)(v[i] >> (56 - 8 * b));
}

static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Looks index up; on a valid hit fills si and leaves the read transaction live. */
static tern_status cache_lookup(tern_loader *L, const unsigned char key[16], sample_image *si,
                                bool *hit, tern_error *err)
{
    *hit = false;
    int rc = mdb_txn_renew(L->rtxn);
    if (rc != 0)
        return tern_set_error(err, TERN_ERR_IO, "loader cache: cannot begin a read: %s",
                              mdb_strerror(rc));
    MDB_val k = {16, (void *)key}, v;
    rc = mdb_get(L->rtxn, L->dbi, &k, &v);
    if (rc == 0 && v.mv_size >= CACHE_HEADER) {
        const unsigned char *p = v.mv_data;
        uint32_t w = get_u32(p + 4), h = get_u32(p + 8), c = get_u32(p + 12);
        size_t bytes;
        if (get_u32(p) == CACHE_MAGIC && w > 0 && h > 0 && w <= INT32_MAX && h <= INT32_MAX &&
            (c == 1 || c == 3) && tern_mul_size((size_t)w * h, c, &bytes) &&
            v.mv_size == CACHE_HEADER + bytes) {
            si->img = (tern_image){.width = (int)w, .height = (int)h, .channels = (int)c,
                                   .data = (uint8_t *)p + CACHE_HEADER};
            si->txn_live = true;
            *hit = true;
            return TERN_OK;
        }
    }
    mdb_txn_reset(L->rtxn);
    if (rc != 0 && rc != MDB_NOTFOUND)
        return tern_set_error(err, TERN_ERR_IO, "loader cache: read failed: %s", mdb_strerror(rc));
    return TERN_OK;
}

static tern_status cache_store(tern_loader *L, const unsigned char key[16], const tern_image *img,
                               tern_error *err)
{
    size_t bytes = (size_t)img->width * (size_t)img->height * (size_t)img->channels;
    MDB_val k = {16, (void *)key};
    for (;;) {
        MDB_txn *txn;
        int rc = mdb_txn_begin(L->env, NULL, 0, &txn);
        if (rc != 0)
            return tern_set_error(err, TERN_ERR_IO, "loader cache: cannot begin a write: %s",
                                  mdb_strerror(rc));
        MDB_val v = {CACHE_HEADER + bytes, NULL};
        rc = mdb_put(txn, L->dbi, &k, &v, MDB_RESERVE);
        if (rc == 0) {
            uint32_t head[4] = {CACHE_MAGIC, (uint32_t)img->width, (uint32_t)img->height,
                                (uint32_t)img->channels};
            memcpy(v.mv_data, head, sizeof head);
            memcpy((unsigned char *)v.mv_data + CACHE_HEADER, img->data, bytes);
            rc = mdb_txn_commit(txn);
        } else {
            mdb_txn_abort(txn);
        }
        if (rc == 0)
            return TERN_OK;
        if (rc != MDB_MAP_FULL || L->map_size > SIZE_MAX / 2)
            return tern_set_error(err, TERN_ERR_IO, "loader cache: write failed: %s",
                                  mdb_strerror(rc));
        /* No transaction is active in this process (the read one is reset): grow and retry. */
        rc = mdb_env_set_mapsize(L->env, L->map_size * 2);
        if (rc != 0)
            return tern_set_error(err, TERN_ERR_IO, "loader cache: cannot grow the map to %zu "
                                  "bytes: %s", L->map_size * 2, mdb_strerror(rc));
        L->map_size *= 2;
    }
}

/* The image of dataset sample `index`, from the cache or decoded (and then cached).
 * *bad_image tells a failure of the image itself (corrupt, unreadable, over a limit: the
 * dataset's own notion of a skippable sample) from one of the loader (memory, cache). */
static tern_status load_sample(tern_loader *L, size_t index, sample_image *si, bool *bad_image,
                               tern_error *err)
{
    tern_status s;
    unsigned char key[16];
    *si = (sample_image){0};
    *bad_image = false;
    if (L->env) {
        bool hit;
        cache_key(L, index, key);
        s = cache_lookup(L, key, si, &hit, err);
        if (s != TERN_OK || hit)
            return s;
    }
    s = tern_dataset_image(L->ds, index, &L->alloc, &si->decoded, err);
    if (s != TERN_OK) {
        *bad_image = s != TERN_ERR_NOMEM && s != TERN_ERR_INVALID;
        return s;
    }
    si->img = si->decoded;
    if (!L->env)
        return TERN_OK;
    if (L->cache_size > 0) {
        int ow, oh;
        resized_dims(si->img.width, si->img.height, L->cache_size, &ow, &oh);
        if (ow != si->img.width || oh != si->img.height) {
            s = resize_image(L, &si->decoded, ow, oh, &si->img, err);
            if (s != TERN_OK)
                goto fail;
        }
    }
    s = cache_store(L, key, &si->img, err);
    if (s != TERN_OK)
        goto fail;
    return TERN_OK;

fail:
    sample_release(L, si);
    return s;
}

/* ---- the worker ------------------------------------------------------------------------------ */

static void make_order(tern_loader *L, uint64_t seed, uint64_t epoch)
{
    if (L->order_valid && L->order_seed == seed && L->order_epoch == epoch)
        return;
    for (size_t i = 0; i < L->count; i++)
        L->order[i] = i;
    if (L->shuffle) {
        tern_rng rng;
        tern_rng_seed(&rng, shuffle_seed(seed, epoch));
        for (size_t i = L->count; i > 1; i--) {
            /* Rejection sampling for an unbiased index in [0, i). */
            uint64_t limit = UINT64_MAX - UINT64_MAX % i, x;
            do
                x = tern_rng_next(&rng);
            while (x >= limit);
            size_t j = (size_t)(x % i), t = L->order[i - 1];
            L->order[i - 1] = L->order[j];
            L->order[j] = t;
        }
    }
    L->order_seed = seed;
    L->order_epoch = epoch;
    L->order_valid = true;
}

/* Fill s with the batch starting at position pos of epoch; *next is where the next one starts.
 * Runs without the lock. Returns early (contents irrelevant) if stopped or superseded. */
static void fill(tern_loader *L, slot *s, uint64_t seed, uint64_t epoch, size_t pos, uint64_t gen,
                 size_t *next)
{
    s->n = 0;
    s->end = false;
    s->status = TERN_OK;
    s->skipped = 0;
    make_order(L, seed, epoch);
    while (s->n < L->batch && pos < L->count) {
        if (atomic_load(&L->stop) || atomic_load(&L->gen) != gen)
            break;
        size_t index = L->indices[L->order[pos]];
        tern_rng rng;
        tern_rng_seed(&rng, sample_seed(seed, epoch, pos));
        pos++;
        sample_image si;
        bool bad_image;
        tern_status st = load_sample(L, index, &si, &bad_image, &s->err);
        if (st != TERN_OK) {
            if (bad_image && !L->strict) {
                s->skipped++;
                continue;
            }
            s->status = st;
            break;
        }
        st = tern_transform_apply(&L->t, &si.img, &rng,
                                  s->images + (size_t)s->n * L->sample_floats);
        sample_release(L, &si);
        if (st != TERN_OK) {
            char src[512];
            tern_set_error(&s->err, st, "loader: transform failed on %s: %s",
                           tern_dataset_source(L->ds, index, src, sizeof src),
                           tern_strerror(st));
            s->status = st;
            break;
        }
        s->labels[s->n++] = tern_dataset_label(L->ds, index);
    }
    *next = pos;
    if (s->status == TERN_OK && (s->n == 0 || (L->drop_last && s->n < L->batch))) {
        s->end = true;
        s->n = 0;
    }
}

static void *worker_main(void *arg)
{
    tern_loader *L = arg;
    pthread_mutex_lock(&L->mu);
    while (!atomic_load(&L->stop)) {
        slot *s = NULL;
        for (int i = 0; i < 2 && !s; i++)
            if (L->slots[i].state == SLOT_FREE)
                s = &L->slots[i];
        if (!s) {
            pthread_cond_wait(&L->cv, &L->mu);
            continue;
        }
        uint64_t gen = atomic_load(&L->gen), seed = L->w_seed, epoch = L->w_epoch;
        size_t pos = L->w_pos, next;
        s->state = SLOT_FILLING;
        pthread_mutex_unlock(&L->mu);
        fill(L, s, seed, epoch, pos, gen, &next);
        pthread_mutex_lock(&L->mu);
        if (atomic_load(&L->gen) != gen || atomic_load(&L->stop)) {
            s->state = SLOT_FREE; /* superseded by set_epoch (which moved w_epoch/w_pos) */
            continue;
        }
        if (s->end) {
            L->w_epoch = epoch + 1;
            L->w_pos = 0;
        } else {
            L->w_pos = next;
        }
        s->epoch = epoch;
        s->seq = L->next_seq++;
        s->state = SLOT_READY;
        pthread_cond_broadcast(&L->cv);
    }
    pthread_mutex_unlock(&L->mu);
    return NULL;
}

/* ---- public ---------------------------------------------------------------------------------- */

static tern_status open_cache(tern_loader *L, const char *dir, tern_error *err)
{
    struct stat sb;
    if (stat(dir, &sb) != 0) {
        if (errno != ENOENT || mkdir(dir, 0755) != 0)
            return tern_set_error(err, TERN_ERR_IO, "loader cache %s: cannot create: %s", dir,
                                  strerror(errno));
    } else if (!S_ISDIR(sb.st_mode)) {
        return tern_set_error(err, TERN_ERR_IO, "loader cache %s: not a directory", dir);
    }
    MDB_txn *txn = NULL;
    int rc = mdb_env_create(&L->env);
    if (rc != 0)
        goto fail;
    L->map_size = CACHE_INITIAL_MAP;
    if ((rc = mdb_env_set_mapsize(L->env, L->map_size)) != 0 ||
        (rc = mdb_env_open(L->env, dir, MDB_NOTLS | MDB_NOSYNC, 0644)) != 0)
        goto fail;
    /* An existing environment may be larger than asked for; start growing from its size. */
    MDB_envinfo info;
    if (mdb_env_info(L->env, &info) == 0 && info.me_mapsize > L->map_size)
        L->map_size = info.me_mapsize;
    if ((rc = mdb_txn_begin(L->env, NULL, 0, &txn)) != 0)
        goto fail;
    if ((rc = mdb_dbi_open(txn, NULL, 0, &L->dbi)) != 0) {
        mdb_txn_abort(txn);
        goto fail;
    }
    if ((rc = mdb_txn_commit(txn)) != 0)
        goto fail;
    if ((rc = mdb_txn_begin(L->env, NULL, MDB_RDONLY, &L->rtxn)) != 0)
        goto fail;
    mdb_txn_reset(L->rtxn);
    return TERN_OK;

fail:
    if (L->env)
        mdb_env_close(L->env);
    L->env = NULL;
    return tern_set_error(err, rc == ENOMEM ? TERN_ERR_NOMEM : TERN_ERR_IO,
                          "loader cache %s: cannot open: %s", dir, mdb_strerror(rc));
}

/* Frees everything create may have built; the thread must not be running. */
static void loader_free(tern_loader *L)
{
    tern_allocator a = L->alloc;
    if (L->rtxn)
        mdb_txn_abort(L->rtxn);
    if (L->env) {
        mdb_env_sync(L->env, 1);
        mdb_env_close(L->env);
    }
    for (int i = 0; i < 2; i++) {
        tern_free(&a, L->slots[i].images);
        tern_free(&a, L->slots[i].labels);
    }
    tern_free(&a, L->scratch);
    tern_free(&a, L->order);
    tern_free(&a, L->indices);
    tern_free(&a, L);
}

tern_status tern_loader_create(const tern_dataset *ds, const tern_transform *t,
                               const tern_loader_options *opt, const tern_allocator *alloc,
                               tern_loader **out, tern_error *err)
{
    if (!ds || !t || !opt || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "loader: NULL dataset, transform, options "
                              "or output");
    if (opt->batch < 1)
        return tern_set_error(err, TERN_ERR_INVALID, "loader: batch %d must be at least 1",
                              opt->batch);
    if (t->size < 1 || (t->channels != 1 && t->channels != 3))
        return tern_set_error(err, TERN_ERR_INVALID, "loader: transform size %d / channels %d "
                              "(need size >= 1, channels 1 or 3)", t->size, t->channels);
    if (opt->cache_size < 0)
        return tern_set_error(err, TERN_ERR_INVALID, "loader: cache_size %d is negative",
                              opt->cache_size);
    const size_t ds_size = tern_dataset_size(ds);
    const size_t count = opt->indices ? opt->nindices : ds_size;
    if (count == 0)
        return tern_set_error(err, TERN_ERR_INVALID, "loader: no samples to load");
    if (opt->indices)
        for (size_t i = 0; i < count; i++)
            if (opt->indices[i] >= ds_size)
                return tern_set_error(err, TERN_ERR_INVALID, "loader: indices[%zu] = %zu is "
                                      "beyond the dataset's %zu samples", i, opt->indices[i],
                                      ds_size);
    size_t sample_floats, batch_floats;
    if (!tern_mul_size((size_t)t->size * (size_t)t->size, (size_t)t->channels, &sample_floats) ||
        !tern_mul_size(sample_floats, (size_t)opt->batch, &batch_floats) ||
        !tern_mul_size(batch_floats, sizeof(float), &batch_floats))
        return tern_set_error(err, TERN_ERR_NOMEM, "loader: batch too large");

    tern_allocator a = alloc ? *alloc : (tern_allocator){0};
    tern_status s;
    tern_loader *L = tern_alloc(&a, sizeof *L);
    if (!L)
        return tern_set_error(err, TERN_ERR_NOMEM, "loader: out of memory");
    memset(L, 0, sizeof *L);
    L->alloc = a;
    L->ds = ds;
    L->t = *t;
    L->batch = opt->batch;
    L->shuffle = opt->shuffle;
    L->drop_last = opt->drop_last;
    L->strict = tern_dataset_strict(ds);
    L->w_seed = opt->seed;
    L->count = count;
    L->sample_floats = sample_floats;
    L->cache_size = opt->cache_size;
    L->held = -1;
    atomic_init(&L->stop, false);
    atomic_init(&L->gen, 0);

    L->indices = tern_calloc(&a, count, sizeof *L->indices);
    L->order = tern_calloc(&a, count, sizeof *L->order);
    if (!L->indices || !L->order)
        goto nomem;
    for (size_t i = 0; i < count; i++)
        L->indices[i] = opt->indices ? opt->indices[i] : i;
    for (int i = 0; i < 2; i++) {
        L->slots[i].images = tern_alloc(&a, batch_floats);
        L->slots[i].labels = tern_calloc(&a, (size_t)opt->batch, sizeof(int32_t));
        if (!L->slots[i].images || !L->slots[i].labels)
            goto nomem;
    }
    if (opt->cache_dir) {
        L->fingerprint = dataset_fingerprint(ds, opt->cache_size);
        s = open_cache(L, opt->cache_dir, err);
        if (s != TERN_OK)
            goto fail;
    }

    if (pthread_mutex_init(&L->mu, NULL) != 0) {
        s = tern_set_error(err, TERN_ERR_THREAD, "loader: cannot create a mutex");
        goto fail;
    }
    if (pthread_cond_init(&L->cv, NULL) != 0) {
        pthread_mutex_destroy(&L->mu);
        s = tern_set_error(err, TERN_ERR_THREAD, "loader: cannot create a condition variable");
        goto fail;
    }
    int rc = pthread_create(&L->thread, NULL, worker_main, L);
    if (rc != 0) {
        pthread_cond_destroy(&L->cv);
        pthread_mutex_destroy(&L->mu);
        s = tern_set_error(err, TERN_ERR_THREAD, "loader: cannot start the worker thread: %s",
                           strerror(rc));
        goto fail;
    }
    L->thread_started = true;
    *out = L;
    return TERN_OK;

nomem:
    s = tern_set_error(err, TERN_ERR_NOMEM, "loader: out of memory for %zu samples in batches "
                       "of %d", count, opt->batch);
fail:
    loader_free(L);
    return s;
}

void tern_loader_destroy(tern_loader **lp)
{
    if (!lp || !*lp)
        return;
    tern_loader *L = *lp;
    pthread_mutex_lock(&L->mu);
    atomic_store(&L->stop, true);
    pthread_cond_broadcast(&L->cv);
    pthread_mutex_unlock(&L->mu);
    pthread_join(L->thread, NULL);
    pthread_cond_destroy(&L->cv);
    pthread_mutex_destroy(&L->mu);
    loader_free(L);
    *lp = NULL;
}

size_t tern_loader_batches(const tern_loader *L)
{
    size_t b = (size_t)L->batch;
    return L->drop_last ? L->count / b : (L->count + b - 1) / b;
}

tern_status tern_loader_next(tern_loader *L, const float **images, const int32_t **labels,
                             int *n, tern_error *err)
{
    if (!L || !images || !labels || !n)
        return tern_set_error(err, TERN_ERR_INVALID, "loader: NULL argument");
    *images = NULL;
    *labels = NULL;
    *n = 0;
    pthread_mutex_lock(&L->mu);
    if (L->held >= 0) {
        L->slots[L->held].state = SLOT_FREE;
        L->held = -1;
        pthread_cond_broadcast(&L->cv);
    }
    slot *s = NULL;
    for (;;) {
        for (int i = 0; i < 2 && !s; i++)
            if (L->slots[i].state == SLOT_READY && L->slots[i].seq == L->take_seq)
                s = &L->slots[i];
        if (s)
            break;
        pthread_cond_wait(&L->cv, &L->mu);
    }
    L->take_seq++;
    L->skipped += s->skipped;
    tern_status status = s->status;
    if (s->end) {
        L->epoch = s->epoch + 1;
        status = tern_set_error(err, TERN_ERR_NOT_FOUND, "loader: end of epoch %llu",
                                (unsigned long long)s->epoch);
    } else if (status != TERN_OK) {
        if (err)
            *err = s->err;
    }
    if (status != TERN_OK) {
        s->state = SLOT_FREE;
        pthread_cond_broadcast(&L->cv);
    } else {
        s->state = SLOT_HELD;
        L->held = (int)(s - L->slots);
        *images = s->images;
        *labels = s->labels;
        *n = s->n;
    }
    pthread_mutex_unlock(&L->mu);
    return status;
}

size_t tern_loader_skipped(const tern_loader *L)
{
    return L->skipped;
}

uint64_t tern_loader_epoch(const tern_loader *L)
{
    return L->epoch;
}

static void restart(tern_loader *L, uint64_t seed, uint64_t epoch)
{
    pthread_mutex_lock(&L->mu);
    atomic_fetch_add(&L->gen, 1);
    L->w_seed = seed;
    L->epoch = epoch;
    L->w_epoch = epoch;
    L->w_pos = 0;
    for (int i = 0; i < 2; i++)
        if (L->slots[i].state == SLOT_READY)
            L->slots[i].state = SLOT_FREE;
    L->next_seq = L->take_seq;
    pthread_cond_broadcast(&L->cv);
    pthread_mutex_unlock(&L->mu);
}

void tern_loader_set_epoch(tern_loader *L, uint64_t epoch)
{
    pthread_mutex_lock(&L->mu);
    uint64_t seed = L->w_seed;
    pthread_mutex_unlock(&L->mu);
    restart(L, seed, epoch);
}

void tern_loader_set_seed(tern_loader *L, uint64_t seed)
{
    restart(L, seed, 0);
}
