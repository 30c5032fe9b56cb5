/* The store's core: opening the LMDB environment, the transaction wrappers (with map growth),
 * record encoding helpers, UUIDs and hashes, and the category, client, image and audit
 * records. Rounds and the model registry are in store_registry.c, backup/restore/check in
 * store_ops.c; the layout of every sub-database is described in store_internal.h.
 *
 * Records are JSON objects built with jansson's json_pack and read with json_unpack, each with
 * a "schema" field; unknown extra fields are ignored so a later schema can add fields that an
 * older reader skips, and a higher schema number than this code knows is refused. */
#include "store_internal.h"

#include <errno.h>
#include <math.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define DEFAULT_MAP_SIZE ((size_t)64 << 20)
#define MIN_MAP_SIZE ((size_t)1 << 20)
#define DEFAULT_MAX_MAP_SIZE ((size_t)1 << 40)

static const char *const db_names[DB_COUNT] = {
    [DB_META] = "meta",
    [DB_CATEGORIES] = "categories",
    [DB_CAT_BY_NAME] = "cat_by_name",
    [DB_CAT_BY_INDEX] = "cat_by_index",
    [DB_CLIENTS] = "clients",
    [DB_CLIENT_BY_NAME] = "client_by_name",
    [DB_IMAGES] = "images",
    [DB_IMAGE_BY_HASH] = "image_by_hash",
    [DB_ROUNDS] = "rounds",
    [DB_ROUND_BY_STATUS] = "round_by_status",
    [DB_ROUND_CLIENTS] = "round_clients",
    [DB_VERSIONS] = "versions",
    [DB_BLOBS] = "blobs",
    [DB_AUDIT] = "audit",
};

/* ---- small helpers ------------------------------------------------------------------------ */

void st_be32(unsigned char *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)v;
}

void st_be64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)v;
}

uint32_t st_rd_be32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v = v << 8 | p[i];
    return v;
}

uint64_t st_rd_be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

bool st_copy(char *dst, size_t cap, const char *src)
{
    size_t n = strlen(src);
    if (n >= cap)
        return false;
    memcpy(dst, src, n + 1);
    return true;
}

tern_status st_check_text(tern_error *err, const char *what, const char *s, size_t cap,
                          bool required)
{
    if (!s)
        return required ? tern_set_error(err, TERN_ERR_INVALID, "%s is required", what)
                        : TERN_OK;
    size_t n = strnlen(s, cap); /* fixed-size fields may lack their NUL */
    if (required && n == 0)
        return tern_set_error(err, TERN_ERR_INVALID, "%s must not be empty", what);
    if (n >= cap)
        return tern_set_error(err, TERN_ERR_INVALID, "%s is longer than the %zu bytes allowed",
                              what, cap - 1);
    return TERN_OK;
}

bool st_key_ok(const char *s)
{
    size_t n = s ? strlen(s) : 0;
    return n > 0 && n <= 511;
}

static int64_t real_clock(void *user)
{
    (void)user;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t st_now(const tern_store *s)
{
    return s->clock(s->clock_user);
}

tern_status st_uuid(char out[TERN_STORE_ID_SIZE], tern_error *err)
{
    unsigned char b[16];
    if (RAND_bytes(b, sizeof b) != 1)
        return tern_set_error(err, TERN_ERR_IO, "OpenSSL RAND_bytes failed to make a UUID");
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40); /* version 4 */
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80); /* RFC 4122 variant */
    static const char hex[] = "0123456789abcdef";
    char *p = out;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            *p++ = '-';
        *p++ = hex[b[i] >> 4];
        *p++ = hex[b[i] & 15];
    }
    *p = '\0';
    return TERN_OK;
}

static void to_hex(const unsigned char *b, size_t n, char *out)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = hex[b[i] >> 4];
        out[2 * i + 1] = hex[b[i] & 15];
    }
    out[2 * n] = '\0';
}

static bool from_hex(const char *s, unsigned char *out, size_t n)
{
    if (strlen(s) != 2 * n)
        return false;
    for (size_t i = 0; i < 2 * n; i++) {
        char c = s[i];
        int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (v < 0)
            return false;
        out[i / 2] = (unsigned char)(i % 2 ? (out[i / 2] | v) : v << 4);
    }
    return true;
}

void st_sha256_to_hex(const uint8_t sha[32], char out[TERN_STORE_SHA256_SIZE])
{
    to_hex(sha, 32, out);
}

tern_status st_sha256_hex(const void *data, size_t len, char out[TERN_STORE_SHA256_SIZE],
                          tern_error *err)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL) != 1 || mdlen != 32)
        return tern_set_error(err, TERN_ERR_IO, "OpenSSL SHA-256 failed");
    to_hex(md, 32, out);
    return TERN_OK;
}

tern_status st_list_end(tern_store *s, st_txn *t, MDB_cursor *cur, st_vec *v, tern_status st)
{
    if (cur)
        mdb_cursor_close(cur);
    st_read_end(t);
    if (st) {
        tern_free(st_alloc(s), v->data);
        v->data = NULL;
        v->count = 0;
    }
    return st;
}

void *st_vec_push(tern_store *s, st_vec *v)
{
    if (v->count == v->cap) {
        size_t cap = v->cap ? 2 * v->cap : 16, bytes;
        if (!tern_mul_size(cap, v->elem, &bytes))
            return NULL;
        void *d = tern_alloc(st_alloc(s), bytes);
        if (!d)
            return NULL;
        if (v->count)
            memcpy(d, v->data, v->count * v->elem);
        tern_free(st_alloc(s), v->data);
        v->data = d;
        v->cap = cap;
    }
    void *slot = (char *)v->data + v->count++ * v->elem;
    memset(slot, 0, v->elem);
    return slot;
}

void tern_store_free(tern_store *store, void *ptr)
{
    if (store)
        tern_free(st_alloc(store), ptr);
}

/* ---- transactions --------------------------------------------------------------------------- */

static tern_status mdb_fail(tern_error *err, int rc, const char *what)
{
    return tern_set_error(err, rc == ENOMEM ? TERN_ERR_NOMEM : TERN_ERR_IO, "store: %s: %s", what,
                          mdb_strerror(rc));
}

/* Another process grew the map: adopt its size (no transaction may be open here). */
static tern_status adopt_map(tern_store *s, tern_error *err)
{
    pthread_rwlock_wrlock(&s->lock);
    int rc = mdb_env_set_mapsize(s->env, 0);
    pthread_rwlock_unlock(&s->lock);
    return rc ? mdb_fail(err, rc, "adopting the grown map size") : TERN_OK;
}

static tern_status grow_map(tern_store *s, size_t seen, tern_error *err)
{
    tern_status st = TERN_OK;
    pthread_rwlock_wrlock(&s->lock);
    MDB_envinfo info;
    mdb_env_info(s->env, &info);
    if (info.me_mapsize == seen) { /* not already grown by another thread */
        if (seen >= s->max_map_size) {
            st = tern_set_error(err, TERN_ERR_IO, "store full: map size %zu reached the limit %zu",
                                seen, s->max_map_size);
        } else {
            size_t next = seen > s->max_map_size / 2 ? s->max_map_size : seen * 2;
            int rc = mdb_env_set_mapsize(s->env, next);
            if (rc)
                st = mdb_fail(err, rc, "growing the map");
        }
    }
    pthread_rwlock_unlock(&s->lock);
    return st;
}

size_t tern_store_map_size(const tern_store *store)
{
    MDB_envinfo info;
    mdb_env_info(store->env, &info);
    return info.me_mapsize;
}

static tern_status begin(tern_store *s, st_txn *t, unsigned flags, tern_error *err)
{
    for (int attempt = 0;; attempt++) {
        pthread_rwlock_rdlock(&s->lock);
        *t = (st_txn){.s = s, .err = err};
        int rc = mdb_txn_begin(s->env, NULL, flags, &t->txn);
        if (rc == 0)
            return TERN_OK; /* lock held until the transaction ends */
        pthread_rwlock_unlock(&s->lock);
        if (rc != MDB_MAP_RESIZED || attempt >= 3)
            return mdb_fail(err, rc, "starting a transaction");
        tern_status st = adopt_map(s, err);
        if (st)
            return st;
    }
}

tern_status st_read_begin(tern_store *s, st_txn *t, tern_error *err)
{
    return begin(s, t, MDB_RDONLY, err);
}

void st_read_end(st_txn *t)
{
    if (t->txn) {
        mdb_txn_abort(t->txn);
        t->txn = NULL;
        pthread_rwlock_unlock(&t->s->lock);
    }
}

tern_status st_write(tern_store *s, st_write_fn fn, void *ctx, tern_error *err)
{
    if (s->read_only)
        return tern_set_error(err, TERN_ERR_STATE, "store opened read-only");
    for (;;) {
        st_txn t;
        tern_status st = begin(s, &t, 0, err);
        if (st)
            return st;
        MDB_envinfo info;
        mdb_env_info(s->env, &info);
        st = fn(&t, ctx);
        if (st == TERN_OK) {
            int rc = mdb_txn_commit(t.txn);
            if (rc) {
                t.mdb_rc = rc;
                st = mdb_fail(err, rc, "committing");
            }
        } else {
            mdb_txn_abort(t.txn);
        }
        pthread_rwlock_unlock(&s->lock);
        if (st == TERN_OK || t.mdb_rc != MDB_MAP_FULL)
            return st;
        st = grow_map(s, info.me_mapsize, err);
        if (st)
            return st;
    }
}

tern_status st_get(st_txn *t, int db, const void *key, size_t klen, MDB_val *val)
{
    MDB_val k = {klen, (void *)key};
    int rc = mdb_get(t->txn, t->s->db[db], &k, val);
    if (rc == MDB_NOTFOUND)
        return TERN_ERR_NOT_FOUND;
    if (rc) {
        t->mdb_rc = rc;
        return mdb_fail(t->err, rc, db_names[db]);
    }
    return TERN_OK;
}

tern_status st_put(st_txn *t, int db, const void *key, size_t klen, const void *val, size_t vlen,
                   unsigned flags)
{
    MDB_val k = {klen, (void *)key}, v = {vlen, (void *)val};
    int rc = mdb_put(t->txn, t->s->db[db], &k, &v, flags);
    if (rc) {
        t->mdb_rc = rc;
        return mdb_fail(t->err, rc, db_names[db]);
    }
    return TERN_OK;
}

tern_status st_del(st_txn *t, int db, const void *key, size_t klen)
{
    MDB_val k = {klen, (void *)key};
    int rc = mdb_del(t->txn, t->s->db[db], &k, NULL);
    if (rc == MDB_NOTFOUND)
        return TERN_ERR_NOT_FOUND;
    if (rc) {
        t->mdb_rc = rc;
        return mdb_fail(t->err, rc, db_names[db]);
    }
    return TERN_OK;
}

tern_status st_put_json(st_txn *t, int db, const void *key, size_t klen, json_t *obj)
{
    if (!obj)
        return tern_set_error(t->err, TERN_ERR_NOMEM, "store: encoding a %s record", db_names[db]);
    char *text = json_dumps(obj, JSON_COMPACT);
    json_decref(obj);
    if (!text)
        return tern_set_error(t->err, TERN_ERR_NOMEM, "store: encoding a %s record", db_names[db]);
    tern_status st = st_put(t, db, key, klen, text, strlen(text), 0);
    free(text);
    return st;
}

tern_status st_parse(const MDB_val *v, const char *what, json_t **out, tern_error *err)
{
    json_error_t jerr;
    json_t *root = json_loadb(v->mv_data, v->mv_size, 0, &jerr);
    if (!root)
        return tern_set_error(err, TERN_ERR_FORMAT, "%s record does not decode: %s", what,
                              jerr.text);
    json_int_t schema;
    if (!json_is_object(root) || json_unpack(root, "{s:I}", "schema", &schema) != 0) {
        json_decref(root);
        return tern_set_error(err, TERN_ERR_FORMAT, "%s record has no schema number", what);
    }
    if (schema < 1 || schema > STORE_SCHEMA) {
        json_decref(root);
        return tern_set_error(err, TERN_ERR_UNSUPPORTED,
                              "%s record has schema %lld; this Tern reads up to %d", what,
                              (long long)schema, STORE_SCHEMA);
    }
    *out = root;
    return TERN_OK;
}

tern_status st_cursor(st_txn *t, int db, MDB_cursor **cur)
{
    int rc = mdb_cursor_open(t->txn, t->s->db[db], cur);
    if (rc) {
        t->mdb_rc = rc;
        return mdb_fail(t->err, rc, db_names[db]);
    }
    return TERN_OK;
}

tern_status st_last_key(st_txn *t, int db, MDB_val *key)
{
    MDB_cursor *cur;
    tern_status st = st_cursor(t, db, &cur);
    if (st)
        return st;
    MDB_val v;
    int rc = mdb_cursor_get(cur, key, &v, MDB_LAST);
    mdb_cursor_close(cur);
    if (rc == MDB_NOTFOUND)
        return TERN_ERR_NOT_FOUND;
    if (rc) {
        t->mdb_rc = rc;
        return mdb_fail(t->err, rc, db_names[db]);
    }
    return TERN_OK;
}

tern_status st_audit(st_txn *t, const char *actor, const char *action, const char *target,
                     const char *detail)
{
    MDB_val last;
    uint64_t seq = 1;
    tern_status st = st_last_key(t, DB_AUDIT, &last);
    if (st == TERN_OK && last.mv_size == 8)
        seq = st_rd_be64(last.mv_data) + 1;
    else if (st != TERN_OK && st != TERN_ERR_NOT_FOUND)
        return st;
    /* Audit text is informational: clip rather than refuse an admin action over its length. */
    tern_audit_entry e = {0};
    snprintf(e.actor, sizeof e.actor, "%s", actor && *actor ? actor : "unknown");
    snprintf(e.action, sizeof e.action, "%s", action);
    snprintf(e.target, sizeof e.target, "%s", target ? target : "");
    snprintf(e.detail, sizeof e.detail, "%s", detail ? detail : "");
    unsigned char key[8];
    st_be64(key, seq);
    return st_put_json(t, DB_AUDIT, key, 8,
                       json_pack("{s:i, s:I, s:I, s:s, s:s, s:s, s:s}", "schema", STORE_SCHEMA,
                                 "seq", (json_int_t)seq, "at", (json_int_t)st_now(t->s), "actor",
                                 e.actor, "action", e.action, "target", e.target, "detail",
                                 e.detail));
}

/* ---- open / close ------------------------------------------------------------------------- */

static tern_status open_dbs(tern_store *s, tern_error *err)
{
    MDB_txn *txn;
    unsigned tflags = s->read_only ? MDB_RDONLY : 0;
    int rc = mdb_txn_begin(s->env, NULL, tflags, &txn);
    if (rc)
        return mdb_fail(err, rc, "starting the opening transaction");
    for (int i = 0; i < DB_COUNT; i++) {
        rc = mdb_dbi_open(txn, db_names[i], s->read_only ? 0 : MDB_CREATE, &s->db[i]);
        if (rc) {
            mdb_txn_abort(txn);
            if (rc == MDB_NOTFOUND)
                return tern_set_error(err, TERN_ERR_FORMAT,
                                      "not a Tern store: sub-database '%s' is missing",
                                      db_names[i]);
            return mdb_fail(err, rc, db_names[i]);
        }
    }
    MDB_val k = {6, "schema"}, v;
    rc = mdb_get(txn, s->db[DB_META], &k, &v);
    if (rc == 0) {
        char buf[16] = {0};
        memcpy(buf, v.mv_data, v.mv_size < 15 ? v.mv_size : 15);
        long schema = strtol(buf, NULL, 10);
        if (schema < 1 || schema > STORE_SCHEMA) {
            mdb_txn_abort(txn);
            return tern_set_error(err, TERN_ERR_UNSUPPORTED,
                                  "store has schema '%s'; this Tern reads up to %d", buf,
                                  STORE_SCHEMA);
        }
    } else if (rc == MDB_NOTFOUND && !s->read_only) {
        char buf[16];
        int n = snprintf(buf, sizeof buf, "%d", STORE_SCHEMA);
        v = (MDB_val){(size_t)n, buf};
        rc = mdb_put(txn, s->db[DB_META], &k, &v, 0);
    } else if (rc == MDB_NOTFOUND) {
        rc = 0; /* read-only view of a store never written: nothing to check */
    }
    if (rc) {
        mdb_txn_abort(txn);
        return mdb_fail(err, rc, "writing the schema number");
    }
    rc = mdb_txn_commit(txn); /* also for read-only: aborting would close the new handles */
    return rc ? mdb_fail(err, rc, "committing the opening transaction") : TERN_OK;
}

tern_status tern_store_open(const char *dir, const tern_store_options *options, tern_store **out,
                            tern_error *err)
{
    if (!dir || !*dir || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_open: NULL or empty argument");
    tern_store_options o = options ? *options : (tern_store_options){0};
    if (!o.map_size)
        o.map_size = DEFAULT_MAP_SIZE;
    if (o.map_size < MIN_MAP_SIZE)
        o.map_size = MIN_MAP_SIZE;
    if (!o.max_map_size)
        o.max_map_size = DEFAULT_MAX_MAP_SIZE;
    if (o.max_map_size < o.map_size)
        return tern_set_error(err, TERN_ERR_INVALID, "max_map_size %zu is below map_size %zu",
                              o.max_map_size, o.map_size);

    if (!o.read_only && mkdir(dir, 0755) != 0 && errno != EEXIST)
        return tern_set_error(err, TERN_ERR_IO, "cannot create store directory %s: %s", dir,
                              strerror(errno));

    tern_store *s = tern_calloc(o.alloc, 1, sizeof *s);
    if (!s)
        return tern_set_error(err, TERN_ERR_NOMEM, "out of memory opening store %s", dir);
    if (o.alloc) {
        s->alloc = *o.alloc;
        s->has_alloc = true;
    }
    s->max_map_size = o.max_map_size;
    s->read_only = o.read_only;
    s->clock = o.clock ? o.clock : real_clock;
    s->clock_user = o.clock_user;
    tern_status st = TERN_OK;
    bool lock_made = false;
    if (pthread_rwlock_init(&s->lock, NULL) != 0) {
        st = tern_set_error(err, TERN_ERR_NOMEM, "cannot create the store lock");
        goto fail;
    }
    lock_made = true;

    int rc = mdb_env_create(&s->env);
    if (rc) {
        st = mdb_fail(err, rc, "creating the environment");
        goto fail;
    }
    if ((rc = mdb_env_set_maxdbs(s->env, DB_COUNT)) != 0 ||
        (rc = mdb_env_set_mapsize(s->env, o.map_size)) != 0) {
        st = mdb_fail(err, rc, "configuring the environment");
        goto fail;
    }
    unsigned flags = MDB_NOTLS | (o.read_only ? MDB_RDONLY : 0) | (o.no_sync ? MDB_NOSYNC : 0);
    rc = mdb_env_open(s->env, dir, flags, 0644);
    if (rc) {
        st = tern_set_error(err, rc == ENOENT ? TERN_ERR_NOT_FOUND : TERN_ERR_IO,
                            "cannot open store %s: %s", dir, mdb_strerror(rc));
        goto fail;
    }
    int dead = 0;
    mdb_reader_check(s->env, &dead); /* free slots of killed readers so pages can be reused */
    if ((st = open_dbs(s, err)) != TERN_OK) {
        if (err && st != TERN_ERR_UNSUPPORTED && st != TERN_ERR_FORMAT) {
            char detail[sizeof err->message];
            snprintf(detail, sizeof detail, "%s", err->message);
            tern_set_error(err, st, "cannot open store %s: %s", dir, detail);
        }
        goto fail;
    }
    *out = s;
    return TERN_OK;

fail:
    if (s->env)
        mdb_env_close(s->env);
    if (lock_made)
        pthread_rwlock_destroy(&s->lock);
    tern_free(o.alloc, s);
    return st;
}

void tern_store_close(tern_store **store)
{
    if (!store || !*store)
        return;
    tern_store *s = *store;
    mdb_env_close(s->env);
    pthread_rwlock_destroy(&s->lock);
    tern_allocator a = s->alloc;
    tern_free(s->has_alloc ? &a : NULL, s);
    *store = NULL;
}

/* ---- categories --------------------------------------------------------------------------- */

static json_t *encode_category(const tern_category *c)
{
    return json_pack("{s:i, s:s, s:s, s:s, s:i, s:b, s:I, s:I, s:I, s:s}", "schema", STORE_SCHEMA,
                     "id", c->id, "name", c->name, "description", c->description, "class_index",
                     (int)c->class_index, "active", (int)c->active, "sample_count",
                     (json_int_t)c->sample_count, "created_at", (json_int_t)c->created_at,
                     "updated_at", (json_int_t)c->updated_at, "created_by", c->created_by);
}

/* Copy a decoded string field, failing the decode when it does not fit. */
#define COPY_FIELD(dst, src)                                                                   \
    do {                                                                                       \
        if (!st_copy((dst), sizeof(dst), (src)))                                               \
            goto too_long;                                                                     \
    } while (0)

tern_status st_decode_category(const MDB_val *v, tern_category *out, tern_error *err)
{
    json_t *root;
    tern_status st = st_parse(v, "category", &root, err);
    if (st)
        return st;
    const char *id, *name, *desc, *by;
    int ci, active;
    json_int_t sc, ca, ua;
    json_error_t jerr;
    tern_category c = {0};
    if (json_unpack_ex(root, &jerr, 0, "{s:s, s:s, s:s, s:i, s:b, s:I, s:I, s:I, s:s}", "id", &id,
                       "name", &name, "description", &desc, "class_index", &ci, "active", &active,
                       "sample_count", &sc, "created_at", &ca, "updated_at", &ua, "created_by",
                       &by) != 0) {
        json_decref(root);
        return tern_set_error(err, TERN_ERR_FORMAT, "category record: %s", jerr.text);
    }
    COPY_FIELD(c.id, id);
    COPY_FIELD(c.name, name);
    COPY_FIELD(c.description, desc);
    COPY_FIELD(c.created_by, by);
    c.class_index = ci;
    c.active = active;
    c.sample_count = sc;
    c.created_at = ca;
    c.updated_at = ua;
    json_decref(root);
    *out = c;
    return TERN_OK;
too_long:
    json_decref(root);
    return tern_set_error(err, TERN_ERR_FORMAT, "category record: a string field is too long");
}

/* Read category id into *out; NOT_FOUND with a message naming the id. */
static tern_status load_category(st_txn *t, const char *id, tern_category *out)
{
    MDB_val v;
    tern_status st = st_key_ok(id) ? st_get(t, DB_CATEGORIES, id, strlen(id), &v)
                                   : TERN_ERR_NOT_FOUND;
    if (st == TERN_ERR_NOT_FOUND)
        return tern_set_error(t->err, st, "no category with id '%s'", id ? id : "(null)");
    return st ? st : st_decode_category(&v, out, t->err);
}

static tern_status save_category(st_txn *t, const tern_category *c)
{
    return st_put_json(t, DB_CATEGORIES, c->id, strlen(c->id), encode_category(c));
}

typedef struct {
    const tern_category *in;
    tern_category rec;
} cat_add_ctx;

static tern_status cat_add_fn(st_txn *t, void *p)
{
    cat_add_ctx *c = p;
    const tern_category *in = c->in;
    MDB_val v;
    tern_status st = st_get(t, DB_CAT_BY_NAME, in->name, strlen(in->name), &v);
    if (st == TERN_OK)
        return tern_set_error(t->err, TERN_ERR_EXISTS,
                              "category name '%s' already exists (id %.*s)", in->name,
                              (int)v.mv_size, (const char *)v.mv_data);
    if (st != TERN_ERR_NOT_FOUND)
        return st;
    unsigned char ikey[4];
    st_be32(ikey, (uint32_t)in->class_index);
    st = st_get(t, DB_CAT_BY_INDEX, ikey, 4, &v);
    if (st == TERN_OK) {
        char other[TERN_STORE_ID_SIZE];
        snprintf(other, sizeof other, "%.*s", (int)v.mv_size, (const char *)v.mv_data);
        tern_category o;
        const char *oname = load_category(t, other, &o) == TERN_OK ? o.name : other;
        return tern_set_error(t->err, TERN_ERR_EXISTS,
                              "class index %d already belongs to category '%s'",
                              (int)in->class_index, oname);
    }
    if (st != TERN_ERR_NOT_FOUND)
        return st;

    tern_category *r = &c->rec;
    memset(r, 0, sizeof *r);
    if ((st = st_uuid(r->id, t->err)) != TERN_OK)
        return st;
    strcpy(r->name, in->name);
    strcpy(r->description, in->description);
    strcpy(r->created_by, in->created_by);
    r->class_index = in->class_index;
    r->active = in->active;
    r->created_at = r->updated_at = st_now(t->s);
    if ((st = save_category(t, r)) || (st = st_put(t, DB_CAT_BY_NAME, r->name, strlen(r->name),
                                                   r->id, strlen(r->id), 0)) ||
        (st = st_put(t, DB_CAT_BY_INDEX, ikey, 4, r->id, strlen(r->id), 0)))
        return st;
    char detail[TERN_STORE_TEXT_SIZE];
    snprintf(detail, sizeof detail, "name '%s', class index %d", r->name, (int)r->class_index);
    return st_audit(t, r->created_by, "category.add", r->id, detail);
}

static tern_status check_name(tern_error *err, const char *what, const char *name)
{
    tern_status st = st_check_text(err, what, name, TERN_STORE_NAME_SIZE, true);
    if (st == TERN_OK && strlen(name) > 511)
        st = tern_set_error(err, TERN_ERR_INVALID, "%s is too long", what);
    return st;
}

tern_status tern_store_category_add(tern_store *store, const tern_category *in,
                                    tern_category *out, tern_error *err)
{
    if (!store || !in)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_category_add: NULL argument");
    tern_status st;
    if ((st = check_name(err, "category name", in->name)) ||
        (st = st_check_text(err, "category description", in->description,
                            TERN_STORE_TEXT_SIZE, false)) ||
        (st = st_check_text(err, "category created_by", in->created_by, TERN_STORE_NAME_SIZE,
                            false)))
        return st;
    if (in->class_index < 0)
        return tern_set_error(err, TERN_ERR_INVALID, "class index %d is negative",
                              (int)in->class_index);
    cat_add_ctx c = {.in = in};
    st = st_write(store, cat_add_fn, &c, err);
    if (st == TERN_OK && out)
        *out = c.rec;
    return st;
}

/* Lookup through an index db whose values are record ids. */
static tern_status get_via_index(tern_store *s, int index_db, const void *key, size_t klen,
                                 const char *what, tern_category *out, tern_error *err)
{
    st_txn t;
    tern_status st = st_read_begin(s, &t, err);
    if (st)
        return st;
    MDB_val v;
    st = st_get(&t, index_db, key, klen, &v);
    if (st == TERN_ERR_NOT_FOUND) {
        tern_set_error(err, st, "no category with %s", what);
    } else if (st == TERN_OK) {
        char id[TERN_STORE_ID_SIZE];
        snprintf(id, sizeof id, "%.*s", (int)v.mv_size, (const char *)v.mv_data);
        st = load_category(&t, id, out);
    }
    st_read_end(&t);
    return st;
}

tern_status tern_store_category_get(tern_store *store, const char *id, tern_category *out,
                                    tern_error *err)
{
    if (!store || !id || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_category_get: NULL argument");
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    st = load_category(&t, id, out);
    st_read_end(&t);
    return st;
}

tern_status tern_store_category_get_by_name(tern_store *store, const char *name,
                                            tern_category *out, tern_error *err)
{
    if (!store || !name || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_category_get_by_name: NULL argument");
    if (!st_key_ok(name))
        return tern_set_error(err, TERN_ERR_NOT_FOUND, "no category named '%s'", name);
    char what[600];
    snprintf(what, sizeof what, "name '%s'", name);
    return get_via_index(store, DB_CAT_BY_NAME, name, strlen(name), what, out, err);
}

tern_status tern_store_category_get_by_index(tern_store *store, int32_t class_index,
                                             tern_category *out, tern_error *err)
{
    if (!store || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_category_get_by_index: NULL argument");
    if (class_index < 0)
        return tern_set_error(err, TERN_ERR_NOT_FOUND, "no category with class index %d",
                              (int)class_index);
    unsigned char key[4];
    st_be32(key, (uint32_t)class_index);
    char what[48];
    snprintf(what, sizeof what, "class index %d", (int)class_index);
    return get_via_index(store, DB_CAT_BY_INDEX, key, 4, what, out, err);
}

tern_status tern_store_category_list(tern_store *store, tern_category **out, size_t *count,
                                     tern_error *err)
{
    if (!store || !out || !count)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_category_list: NULL argument");
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    st_vec vec = {.elem = sizeof(tern_category)};
    MDB_cursor *cur = NULL;
    if ((st = st_cursor(&t, DB_CAT_BY_INDEX, &cur)))
        goto done;
    MDB_val k, v;
    for (int rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        char id[TERN_STORE_ID_SIZE];
        snprintf(id, sizeof id, "%.*s", (int)v.mv_size, (const char *)v.mv_data);
        tern_category *slot = st_vec_push(store, &vec);
        if (!slot) {
            st = tern_set_error(err, TERN_ERR_NOMEM, "out of memory listing categories");
            goto done;
        }
        if ((st = load_category(&t, id, slot)))
            goto done;
    }
done:
    if ((st = st_list_end(store, &t, cur, &vec, st)) == TERN_OK) {
        *out = vec.data;
        *count = vec.count;
    }
    return st;
}

typedef enum { CAT_RENAME, CAT_ACTIVE, CAT_REMOVE } cat_op;

typedef struct {
    cat_op op;
    const char *id, *name, *actor;
    bool active;
} cat_edit_ctx;

static tern_status cat_edit_fn(st_txn *t, void *p)
{
    cat_edit_ctx *c = p;
    tern_category r;
    tern_status st = load_category(t, c->id, &r);
    if (st)
        return st;
    char detail[TERN_STORE_TEXT_SIZE];
    const char *action;
    if (c->op == CAT_RENAME) {
        if (strcmp(r.name, c->name) == 0)
            return TERN_OK;
        MDB_val v;
        st = st_get(t, DB_CAT_BY_NAME, c->name, strlen(c->name), &v);
        if (st == TERN_OK)
            return tern_set_error(t->err, TERN_ERR_EXISTS,
                                  "cannot rename category '%s': name '%s' already exists", r.name,
                                  c->name);
        if (st != TERN_ERR_NOT_FOUND)
            return st;
        if ((st = st_del(t, DB_CAT_BY_NAME, r.name, strlen(r.name))) != TERN_OK &&
            st != TERN_ERR_NOT_FOUND)
            return st;
        snprintf(detail, sizeof detail, "'%s' -> '%s'", r.name, c->name);
        strcpy(r.name, c->name);
        if ((st = st_put(t, DB_CAT_BY_NAME, r.name, strlen(r.name), r.id, strlen(r.id), 0)))
            return st;
        action = "category.rename";
    } else if (c->op == CAT_ACTIVE) {
        if (r.active == c->active)
            return TERN_OK;
        r.active = c->active;
        snprintf(detail, sizeof detail, "'%s' %s", r.name, c->active ? "activated" : "deactivated");
        action = "category.set_active";
    } else {
        if (r.sample_count > 0)
            return tern_set_error(t->err, TERN_ERR_INVALID,
                                  "cannot remove category '%s': %lld images refer to it "
                                  "(deactivate it instead)",
                                  r.name, (long long)r.sample_count);
        unsigned char ikey[4];
        st_be32(ikey, (uint32_t)r.class_index);
        if ((st = st_del(t, DB_CATEGORIES, r.id, strlen(r.id))) ||
            ((st = st_del(t, DB_CAT_BY_NAME, r.name, strlen(r.name))) &&
             st != TERN_ERR_NOT_FOUND) ||
            ((st = st_del(t, DB_CAT_BY_INDEX, ikey, 4)) && st != TERN_ERR_NOT_FOUND))
            return st;
        snprintf(detail, sizeof detail, "'%s' (class index %d)", r.name, (int)r.class_index);
        return st_audit(t, c->actor, "category.remove", r.id, detail);
    }
    r.updated_at = st_now(t->s);
    if ((st = save_category(t, &r)))
        return st;
    return st_audit(t, c->actor, action, r.id, detail);
}

tern_status tern_store_category_rename(tern_store *store, const char *id, const char *new_name,
                                       const char *actor, tern_error *err)
{
    if (!store || !id)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_category_rename: NULL argument");
    tern_status st = check_name(err, "new category name", new_name);
    if (st)
        return st;
    return st_write(store, cat_edit_fn,
                    &(cat_edit_ctx){.op = CAT_RENAME, .id = id, .name = new_name, .actor = actor},
                    err);
}

tern_status tern_store_category_set_active(tern_store *store, const char *id, bool active,
                                           const char *actor, tern_error *err)
{
    if (!store || !id)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_category_set_active: NULL argument");
    return st_write(store, cat_edit_fn,
                    &(cat_edit_ctx){.op = CAT_ACTIVE, .id = id, .active = active, .actor = actor},
                    err);
}

tern_status tern_store_category_remove(tern_store *store, const char *id, const char *actor,
                                       tern_error *err)
{
    if (!store || !id)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_category_remove: NULL argument");
    return st_write(store, cat_edit_fn, &(cat_edit_ctx){.op = CAT_REMOVE, .id = id, .actor = actor},
                    err);
}

/* ---- clients ------------------------------------------------------------------------------ */

static json_t *encode_client(const tern_client_record *c)
{
    return json_pack("{s:i, s:s, s:s, s:s, s:s, s:I, s:I, s:b, s:I, s:s, s:f, s:b, s:s, s:I, s:I, "
                     "s:I, s:I, s:f}",
                     "schema", STORE_SCHEMA, "id", c->id, "name", c->name, "device_type",
                     c->device_type, "os_info", c->os_info, "registered_at",
                     (json_int_t)c->registered_at, "last_seen", (json_int_t)c->last_seen,
                     "active", (int)c->active, "total_samples", (json_int_t)c->total_samples,
                     "api_key_hash", c->api_key_hash, "quality_score", c->quality_score,
                     "blacklisted", (int)c->blacklisted, "blacklist_reason", c->blacklist_reason,
                     "rounds_selected", (json_int_t)c->rounds_selected, "rounds_succeeded",
                     (json_int_t)c->rounds_succeeded, "rounds_failed",
                     (json_int_t)c->rounds_failed, "rounds_rejected",
                     (json_int_t)c->rounds_rejected, "last_update_norm", c->last_update_norm);
}

tern_status st_decode_client(const MDB_val *v, tern_client_record *out, tern_error *err)
{
    json_t *root;
    tern_status st = st_parse(v, "client", &root, err);
    if (st)
        return st;
    const char *id, *name, *dev, *os, *key, *reason;
    json_int_t reg, seen, total;
    int active, black;
    double q;
    /* The round statistics came later: records without them read as 0. */
    json_int_t selected = 0, succeeded = 0, failed = 0, rejected = 0;
    double norm = 0;
    json_error_t jerr;
    tern_client_record c = {0};
    if (json_unpack_ex(root, &jerr, 0,
                       "{s:s, s:s, s:s, s:s, s:I, s:I, s:b, s:I, s:s, s:F, s:b, s:s, s?I, s?I, "
                       "s?I, s?I, s?F}",
                       "id", &id, "name", &name, "device_type", &dev, "os_info", &os,
                       "registered_at", &reg, "last_seen", &seen, "active", &active,
                       "total_samples", &total, "api_key_hash", &key, "quality_score", &q,
                       "blacklisted", &black, "blacklist_reason", &reason, "rounds_selected",
                       &selected, "rounds_succeeded", &succeeded, "rounds_failed", &failed,
                       "rounds_rejected", &rejected, "last_update_norm", &norm) != 0) {
        json_decref(root);
        return tern_set_error(err, TERN_ERR_FORMAT, "client record: %s", jerr.text);
    }
    COPY_FIELD(c.id, id);
    COPY_FIELD(c.name, name);
    COPY_FIELD(c.device_type, dev);
    COPY_FIELD(c.os_info, os);
    COPY_FIELD(c.api_key_hash, key);
    COPY_FIELD(c.blacklist_reason, reason);
    c.registered_at = reg;
    c.last_seen = seen;
    c.active = active;
    c.total_samples = total;
    c.quality_score = q;
    c.blacklisted = black;
    c.rounds_selected = selected;
    c.rounds_succeeded = succeeded;
    c.rounds_failed = failed;
    c.rounds_rejected = rejected;
    c.last_update_norm = norm;
    json_decref(root);
    *out = c;
    return TERN_OK;
too_long:
    json_decref(root);
    return tern_set_error(err, TERN_ERR_FORMAT, "client record: a string field is too long");
}

static tern_status load_client(st_txn *t, const char *id, tern_client_record *out)
{
    MDB_val v;
    tern_status st = st_key_ok(id) ? st_get(t, DB_CLIENTS, id, strlen(id), &v)
                                   : TERN_ERR_NOT_FOUND;
    if (st == TERN_ERR_NOT_FOUND)
        return tern_set_error(t->err, st, "no client with id '%s'", id ? id : "(null)");
    return st ? st : st_decode_client(&v, out, t->err);
}

static tern_status save_client(st_txn *t, const tern_client_record *c)
{
    return st_put_json(t, DB_CLIENTS, c->id, strlen(c->id), encode_client(c));
}

tern_status st_client_record_round(st_txn *t, int64_t round, const tern_client_metrics *m)
{
    tern_client_record r;
    MDB_val v;
    const char *id = m->client_id;
    tern_status st = st_key_ok(id) ? st_get(t, DB_CLIENTS, id, strlen(id), &v) : TERN_ERR_NOT_FOUND;
    if (st == TERN_ERR_NOT_FOUND)
        return tern_set_error(t->err, st, "round %lld: client metrics name client '%s', which is "
                              "not registered", (long long)round, id);
    if (st || (st = st_decode_client(&v, &r, t->err)))
        return st;
    r.rounds_selected++;
    if (m->participated) {
        r.rounds_succeeded++;
        r.last_update_norm = m->update_norm;
    } else if (m->rejected) {
        r.rounds_rejected++;
    } else {
        r.rounds_failed++;
    }
    /* Laplace-smoothed success rate, halved for every rejected update. */
    r.quality_score = (double)(r.rounds_succeeded + 1) / (double)(r.rounds_selected + 2) *
                      pow(0.5, (double)r.rounds_rejected);
    return save_client(t, &r);
}

#define KEY_HASH_PREFIX "pbkdf2-sha256$"

typedef struct {
    const tern_client_record *in;
    tern_client_record rec;
} client_reg_ctx;

static tern_status client_reg_fn(st_txn *t, void *p)
{
    client_reg_ctx *c = p;
    MDB_val v;
    tern_status st = st_get(t, DB_CLIENT_BY_NAME, c->in->name, strlen(c->in->name), &v);
    if (st == TERN_OK)
        return tern_set_error(t->err, TERN_ERR_EXISTS, "client name '%s' already exists (id %.*s)",
                              c->in->name, (int)v.mv_size, (const char *)v.mv_data);
    if (st != TERN_ERR_NOT_FOUND)
        return st;
    tern_client_record *r = &c->rec;
    memset(r, 0, sizeof *r);
    if ((st = st_uuid(r->id, t->err)))
        return st;
    strcpy(r->name, c->in->name);
    strcpy(r->device_type, c->in->device_type);
    strcpy(r->os_info, c->in->os_info);
    strcpy(r->api_key_hash, c->in->api_key_hash);
    r->registered_at = r->last_seen = st_now(t->s);
    r->active = true;
    r->quality_score = 1.0;
    if ((st = save_client(t, r)))
        return st;
    return st_put(t, DB_CLIENT_BY_NAME, r->name, strlen(r->name), r->id, strlen(r->id), 0);
}

tern_status tern_store_client_register(tern_store *store, const tern_client_record *in,
                                       tern_client_record *out, tern_error *err)
{
    if (!store || !in)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_client_register: NULL argument");
    tern_status st;
    if ((st = check_name(err, "client name", in->name)) ||
        (st = st_check_text(err, "client device_type", in->device_type, TERN_STORE_NAME_SIZE,
                            false)) ||
        (st = st_check_text(err, "client os_info", in->os_info, TERN_STORE_NAME_SIZE, false)) ||
        (st = st_check_text(err, "client api_key_hash", in->api_key_hash,
                            TERN_STORE_KEY_HASH_SIZE, true)))
        return st;
    if (strncmp(in->api_key_hash, KEY_HASH_PREFIX, strlen(KEY_HASH_PREFIX)) != 0)
        return tern_set_error(err, TERN_ERR_INVALID,
                              "client api_key_hash is not a tern_store_hash_api_key result "
                              "(never store the key itself)");
    client_reg_ctx c = {.in = in};
    st = st_write(store, client_reg_fn, &c, err);
    if (st == TERN_OK && out)
        *out = c.rec;
    return st;
}

tern_status tern_store_client_get(tern_store *store, const char *id, tern_client_record *out,
                                  tern_error *err)
{
    if (!store || !id || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_client_get: NULL argument");
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    st = load_client(&t, id, out);
    st_read_end(&t);
    return st;
}

tern_status tern_store_client_get_by_name(tern_store *store, const char *name,
                                          tern_client_record *out, tern_error *err)
{
    if (!store || !name || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_client_get_by_name: NULL argument");
    if (!st_key_ok(name))
        return tern_set_error(err, TERN_ERR_NOT_FOUND, "no client named '%s'", name);
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    MDB_val v;
    st = st_get(&t, DB_CLIENT_BY_NAME, name, strlen(name), &v);
    if (st == TERN_ERR_NOT_FOUND) {
        tern_set_error(err, st, "no client named '%s'", name);
    } else if (st == TERN_OK) {
        char id[TERN_STORE_ID_SIZE];
        snprintf(id, sizeof id, "%.*s", (int)v.mv_size, (const char *)v.mv_data);
        st = load_client(&t, id, out);
    }
    st_read_end(&t);
    return st;
}

tern_status tern_store_client_list(tern_store *store, tern_client_record **out, size_t *count,
                                   tern_error *err)
{
    if (!store || !out || !count)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_client_list: NULL argument");
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    st_vec vec = {.elem = sizeof(tern_client_record)};
    MDB_cursor *cur = NULL;
    if ((st = st_cursor(&t, DB_CLIENT_BY_NAME, &cur)))
        goto done;
    MDB_val k, v;
    for (int rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        char id[TERN_STORE_ID_SIZE];
        snprintf(id, sizeof id, "%.*s", (int)v.mv_size, (const char *)v.mv_data);
        tern_client_record *slot = st_vec_push(store, &vec);
        if (!slot) {
            st = tern_set_error(err, TERN_ERR_NOMEM, "out of memory listing clients");
            goto done;
        }
        if ((st = load_client(&t, id, slot)))
            goto done;
    }
done:
    if ((st = st_list_end(store, &t, cur, &vec, st)) == TERN_OK) {
        *out = vec.data;
        *count = vec.count;
    }
    return st;
}

typedef enum { CLIENT_BLACKLIST, CLIENT_ACTIVE, CLIENT_TOUCH, CLIENT_QUALITY } client_op;

typedef struct {
    client_op op;
    const char *id, *reason, *actor;
    bool blacklisted, active;
    double quality;
} client_edit_ctx;

static tern_status client_edit_fn(st_txn *t, void *p)
{
    client_edit_ctx *c = p;
    tern_client_record r;
    tern_status st = load_client(t, c->id, &r);
    if (st)
        return st;
    if (c->op == CLIENT_TOUCH) {
        r.last_seen = st_now(t->s);
        return save_client(t, &r);
    }
    if (c->op == CLIENT_QUALITY) {
        r.quality_score = c->quality;
        return save_client(t, &r);
    }
    char detail[TERN_STORE_TEXT_SIZE + TERN_STORE_NAME_SIZE + 16];
    if (c->op == CLIENT_ACTIVE) {
        if (r.active == c->active)
            return TERN_OK;
        if (c->active && r.blacklisted)
            return tern_set_error(t->err, TERN_ERR_INVALID,
                                  "cannot activate client '%s': it is blacklisted (%s); clear the "
                                  "blacklist instead",
                                  r.name, r.blacklist_reason);
        r.active = c->active;
        if ((st = save_client(t, &r)))
            return st;
        snprintf(detail, sizeof detail, "'%s' %s", r.name, c->active ? "activated" : "deactivated");
        return st_audit(t, c->actor, "client.set_active", r.id, detail);
    }
    r.blacklisted = c->blacklisted;
    r.active = !c->blacklisted;
    strcpy(r.blacklist_reason, c->blacklisted ? c->reason : "");
    if ((st = save_client(t, &r)))
        return st;
    snprintf(detail, sizeof detail, "'%s': %s", r.name, c->blacklisted ? c->reason : "cleared");
    return st_audit(t, c->actor, c->blacklisted ? "client.blacklist" : "client.unblacklist", r.id,
                    detail);
}

tern_status tern_store_client_set_blacklisted(tern_store *store, const char *id, bool blacklisted,
                                              const char *reason, const char *actor,
                                              tern_error *err)
{
    if (!store || !id)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_client_set_blacklisted: NULL argument");
    if (blacklisted) {
        tern_status st = st_check_text(err, "blacklist reason", reason, TERN_STORE_TEXT_SIZE, true);
        if (st)
            return st;
    }
    return st_write(store, client_edit_fn,
                    &(client_edit_ctx){.op = CLIENT_BLACKLIST, .id = id, .reason = reason,
                                       .actor = actor, .blacklisted = blacklisted},
                    err);
}

tern_status tern_store_client_set_active(tern_store *store, const char *id, bool active,
                                         const char *actor, tern_error *err)
{
    if (!store || !id)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_client_set_active: NULL argument");
    return st_write(store, client_edit_fn,
                    &(client_edit_ctx){.op = CLIENT_ACTIVE, .id = id, .active = active,
                                       .actor = actor},
                    err);
}

tern_status tern_store_client_touch(tern_store *store, const char *id, tern_error *err)
{
    if (!store || !id)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_client_touch: NULL argument");
    return st_write(store, client_edit_fn, &(client_edit_ctx){.op = CLIENT_TOUCH, .id = id}, err);
}

tern_status tern_store_client_set_quality(tern_store *store, const char *id, double score,
                                          tern_error *err)
{
    if (!store || !id)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_client_set_quality: NULL argument");
    if (!isfinite(score))
        return tern_set_error(err, TERN_ERR_INVALID, "quality score must be finite");
    return st_write(store, client_edit_fn,
                    &(client_edit_ctx){.op = CLIENT_QUALITY, .id = id, .quality = score}, err);
}

/* ---- API keys ----------------------------------------------------------------------------- */

static tern_status pbkdf2(const char *key, const unsigned char *salt, size_t salt_len,
                          long iterations, unsigned char out[32], tern_error *err)
{
    if (PKCS5_PBKDF2_HMAC(key, (int)strlen(key), salt, (int)salt_len, (int)iterations,
                          EVP_sha256(), 32, out) != 1)
        return tern_set_error(err, TERN_ERR_IO, "OpenSSL PBKDF2 failed");
    return TERN_OK;
}

tern_status tern_store_hash_api_key(const char *key, char out[TERN_STORE_KEY_HASH_SIZE],
                                    tern_error *err)
{
    if (!key || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_hash_api_key: NULL argument");
    if (!*key || strlen(key) > 4096)
        return tern_set_error(err, TERN_ERR_INVALID, "API key must be 1 to 4096 bytes");
    unsigned char salt[16], hash[32];
    if (RAND_bytes(salt, sizeof salt) != 1)
        return tern_set_error(err, TERN_ERR_IO, "OpenSSL RAND_bytes failed");
    tern_status st = pbkdf2(key, salt, sizeof salt, TERN_STORE_KEY_ITERATIONS, hash, err);
    if (st)
        return st;
    char salt_hex[33], hash_hex[65];
    to_hex(salt, sizeof salt, salt_hex);
    to_hex(hash, sizeof hash, hash_hex);
    snprintf(out, TERN_STORE_KEY_HASH_SIZE, KEY_HASH_PREFIX "%d$%s$%s", TERN_STORE_KEY_ITERATIONS,
             salt_hex, hash_hex);
    OPENSSL_cleanse(hash, sizeof hash);
    return TERN_OK;
}

tern_status tern_store_verify_api_key(const char *key, const char *hash, bool *ok,
                                      tern_error *err)
{
    if (!key || !hash || !ok)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_verify_api_key: NULL argument");
    *ok = false;
    size_t plen = strlen(KEY_HASH_PREFIX);
    char salt_hex[40] = {0}, hash_hex[72] = {0};
    const char *p = hash + plen, *d1, *d2;
    char *end;
    long iterations = 0;
    unsigned char salt[16], want[32], got[32];
    if (strncmp(hash, KEY_HASH_PREFIX, plen) != 0)
        goto malformed;
    iterations = strtol(p, &end, 10);
    if (end == p || *end != '$' || iterations < 1000 || iterations > 10000000)
        goto malformed;
    d1 = end + 1;
    d2 = strchr(d1, '$');
    if (!d2 || d2 - d1 != 32 || strlen(d2 + 1) != 64)
        goto malformed;
    memcpy(salt_hex, d1, 32);
    memcpy(hash_hex, d2 + 1, 64);
    if (!from_hex(salt_hex, salt, 16) || !from_hex(hash_hex, want, 32))
        goto malformed;
    if (!*key || strlen(key) > 4096)
        return TERN_OK; /* such a key was never hashed */
    tern_status st = pbkdf2(key, salt, sizeof salt, iterations, got, err);
    if (st)
        return st;
    *ok = CRYPTO_memcmp(got, want, sizeof got) == 0;
    OPENSSL_cleanse(got, sizeof got);
    return TERN_OK;
malformed:
    return tern_set_error(err, TERN_ERR_FORMAT, "API key hash is malformed");
}

/* ---- images ------------------------------------------------------------------------------- */

static json_t *encode_image(const tern_image_record *r)
{
    return json_pack("{s:i, s:s, s:s, s:s, s:s, s:s, s:I, s:b}", "schema", STORE_SCHEMA, "id",
                     r->id, "client_id", r->client_id, "category_id", r->category_id, "sha256",
                     r->sha256, "location", r->location, "uploaded_at",
                     (json_int_t)r->uploaded_at, "used_in_training", (int)r->used_in_training);
}

tern_status st_decode_image(const MDB_val *v, tern_image_record *out, tern_error *err)
{
    json_t *root;
    tern_status st = st_parse(v, "image", &root, err);
    if (st)
        return st;
    const char *id, *client, *cat, *sha, *loc;
    json_int_t at;
    int used;
    json_error_t jerr;
    tern_image_record r = {0};
    if (json_unpack_ex(root, &jerr, 0, "{s:s, s:s, s:s, s:s, s:s, s:I, s:b}", "id", &id,
                       "client_id", &client, "category_id", &cat, "sha256", &sha, "location", &loc,
                       "uploaded_at", &at, "used_in_training", &used) != 0) {
        json_decref(root);
        return tern_set_error(err, TERN_ERR_FORMAT, "image record: %s", jerr.text);
    }
    COPY_FIELD(r.id, id);
    COPY_FIELD(r.client_id, client);
    COPY_FIELD(r.category_id, cat);
    COPY_FIELD(r.sha256, sha);
    COPY_FIELD(r.location, loc);
    r.uploaded_at = at;
    r.used_in_training = used;
    json_decref(root);
    *out = r;
    return TERN_OK;
too_long:
    json_decref(root);
    return tern_set_error(err, TERN_ERR_FORMAT, "image record: a string field is too long");
}

static tern_status load_image(st_txn *t, const char *id, tern_image_record *out)
{
    MDB_val v;
    tern_status st = st_key_ok(id) ? st_get(t, DB_IMAGES, id, strlen(id), &v)
                                   : TERN_ERR_NOT_FOUND;
    if (st == TERN_ERR_NOT_FOUND)
        return tern_set_error(t->err, st, "no image with id '%s'", id ? id : "(null)");
    return st ? st : st_decode_image(&v, out, t->err);
}

typedef struct {
    const tern_image_record *in;
    const void *content;
    size_t len;
    char sha[TERN_STORE_SHA256_SIZE];
    tern_image_record rec;
} image_add_ctx;

static tern_status image_add_fn(st_txn *t, void *p)
{
    image_add_ctx *c = p;
    tern_image_record *r = &c->rec;
    MDB_val v;
    tern_status st = st_get(t, DB_IMAGE_BY_HASH, c->sha, 64, &v);
    if (st == TERN_OK) {
        char id[TERN_STORE_ID_SIZE];
        snprintf(id, sizeof id, "%.*s", (int)v.mv_size, (const char *)v.mv_data);
        if ((st = load_image(t, id, r)))
            return st;
        return tern_set_error(t->err, TERN_ERR_EXISTS,
                              "duplicate image: content sha256 %s is already stored as image %s",
                              c->sha, id);
    }
    if (st != TERN_ERR_NOT_FOUND)
        return st;
    tern_category cat;
    tern_client_record client;
    if ((st = load_category(t, c->in->category_id, &cat)) ||
        (st = load_client(t, c->in->client_id, &client)))
        return st;
    if (client.blacklisted)
        return tern_set_error(t->err, TERN_ERR_INVALID,
                              "client '%s' is blacklisted and cannot upload images", client.name);
    memset(r, 0, sizeof *r);
    if ((st = st_uuid(r->id, t->err)))
        return st;
    strcpy(r->client_id, client.id);
    strcpy(r->category_id, cat.id);
    strcpy(r->sha256, c->sha);
    r->uploaded_at = st_now(t->s);
    if (c->in->location[0]) {
        strcpy(r->location, c->in->location);
    } else {
        snprintf(r->location, sizeof r->location, "blob:%s", c->sha);
        st = st_put(t, DB_BLOBS, c->sha, 64, c->content, c->len, MDB_NOOVERWRITE);
        if (st && t->mdb_rc != MDB_KEYEXIST)
            return st;
    }
    cat.sample_count++;
    client.total_samples++;
    if ((st = save_category(t, &cat)) || (st = save_client(t, &client)) ||
        (st = st_put_json(t, DB_IMAGES, r->id, strlen(r->id), encode_image(r))))
        return st;
    return st_put(t, DB_IMAGE_BY_HASH, c->sha, 64, r->id, strlen(r->id), 0);
}

tern_status tern_store_image_add(tern_store *store, const tern_image_record *in,
                                 const void *content, size_t len, tern_image_record *out,
                                 tern_error *err)
{
    if (!store || !in || (!content && len))
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_image_add: NULL argument");
    if (len == 0)
        return tern_set_error(err, TERN_ERR_INVALID, "image content is empty");
    tern_status st = st_check_text(err, "image location", in->location, TERN_STORE_TEXT_SIZE,
                                   false);
    if (st)
        return st;
    image_add_ctx c = {.in = in, .content = content, .len = len};
    if ((st = st_sha256_hex(content, len, c.sha, err)))
        return st;
    st = st_write(store, image_add_fn, &c, err);
    if (out && (st == TERN_OK || (st == TERN_ERR_EXISTS && c.rec.id[0])))
        *out = c.rec;
    return st;
}

tern_status tern_store_image_get(tern_store *store, const char *id, tern_image_record *out,
                                 tern_error *err)
{
    if (!store || !id || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_image_get: NULL argument");
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    st = load_image(&t, id, out);
    st_read_end(&t);
    return st;
}

tern_status tern_store_image_get_by_hash(tern_store *store, const char *sha256,
                                         tern_image_record *out, tern_error *err)
{
    if (!store || !sha256 || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_image_get_by_hash: NULL argument");
    if (!st_key_ok(sha256))
        return tern_set_error(err, TERN_ERR_NOT_FOUND, "no image with sha256 '%s'", sha256);
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    MDB_val v;
    st = st_get(&t, DB_IMAGE_BY_HASH, sha256, strlen(sha256), &v);
    if (st == TERN_ERR_NOT_FOUND) {
        tern_set_error(err, st, "no image with sha256 '%s'", sha256);
    } else if (st == TERN_OK) {
        char id[TERN_STORE_ID_SIZE];
        snprintf(id, sizeof id, "%.*s", (int)v.mv_size, (const char *)v.mv_data);
        st = load_image(&t, id, out);
    }
    st_read_end(&t);
    return st;
}

typedef struct {
    const char *id;
    bool used;
} image_used_ctx;

static tern_status image_used_fn(st_txn *t, void *p)
{
    image_used_ctx *c = p;
    tern_image_record r;
    tern_status st = load_image(t, c->id, &r);
    if (st)
        return st;
    r.used_in_training = c->used;
    return st_put_json(t, DB_IMAGES, r.id, strlen(r.id), encode_image(&r));
}

tern_status tern_store_image_set_used(tern_store *store, const char *id, bool used,
                                      tern_error *err)
{
    if (!store || !id)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_image_set_used: NULL argument");
    return st_write(store, image_used_fn, &(image_used_ctx){.id = id, .used = used}, err);
}

/* ---- audit log ---------------------------------------------------------------------------- */

tern_status st_decode_audit(const MDB_val *v, tern_audit_entry *out, tern_error *err)
{
    json_t *root;
    tern_status st = st_parse(v, "audit", &root, err);
    if (st)
        return st;
    const char *actor, *action, *target, *detail;
    json_int_t seq, at;
    json_error_t jerr;
    tern_audit_entry e = {0};
    if (json_unpack_ex(root, &jerr, 0, "{s:I, s:I, s:s, s:s, s:s, s:s}", "seq", &seq, "at", &at,
                       "actor", &actor, "action", &action, "target", &target, "detail",
                       &detail) != 0) {
        json_decref(root);
        return tern_set_error(err, TERN_ERR_FORMAT, "audit record: %s", jerr.text);
    }
    COPY_FIELD(e.actor, actor);
    COPY_FIELD(e.action, action);
    COPY_FIELD(e.target, target);
    COPY_FIELD(e.detail, detail);
    e.seq = seq;
    e.at = at;
    json_decref(root);
    *out = e;
    return TERN_OK;
too_long:
    json_decref(root);
    return tern_set_error(err, TERN_ERR_FORMAT, "audit record: a string field is too long");
}

tern_status tern_store_audit_list(tern_store *store, int64_t after_seq, size_t max,
                                  tern_audit_entry **out, size_t *count, tern_error *err)
{
    if (!store || !out || !count)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_audit_list: NULL argument");
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    st_vec vec = {.elem = sizeof(tern_audit_entry)};
    MDB_cursor *cur = NULL;
    if ((st = st_cursor(&t, DB_AUDIT, &cur)))
        goto done;
    unsigned char kb[8];
    st_be64(kb, (uint64_t)(after_seq < 0 ? 0 : after_seq) + 1);
    MDB_val k = {8, kb}, v;
    for (int rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0 && (!max || vec.count < max);
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        tern_audit_entry *slot = st_vec_push(store, &vec);
        if (!slot) {
            st = tern_set_error(err, TERN_ERR_NOMEM, "out of memory listing the audit log");
            goto done;
        }
        if ((st = st_decode_audit(&v, slot, err)))
            goto done;
    }
done:
    if ((st = st_list_end(store, &t, cur, &vec, st)) == TERN_OK) {
        *out = vec.data;
        *count = vec.count;
    }
    return st;
}
