/* Store operations: hot backup (a compacted LMDB copy made inside a read transaction, so
 * writers carry on), restore (check the backup, then swap its data file in with a rename) and
 * the integrity check, which walks every sub-database in one snapshot and reports each
 * problem through a callback instead of stopping at the first. */
#include "store_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- backup / restore --------------------------------------------------------------------- */

static tern_status make_dir(const char *dir, tern_error *err)
{
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return tern_set_error(err, TERN_ERR_IO, "cannot create directory %s: %s", dir,
                              strerror(errno));
    return TERN_OK;
}

static tern_status join(char *out, size_t cap, const char *dir, const char *name, tern_error *err)
{
    if ((size_t)snprintf(out, cap, "%s/%s", dir, name) >= cap)
        return tern_set_error(err, TERN_ERR_INVALID, "path %s/%s is too long", dir, name);
    return TERN_OK;
}

static tern_status fsync_path(const char *path, int flags, tern_error *err)
{
    int fd = open(path, flags);
    if (fd < 0)
        return tern_set_error(err, TERN_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    int rc = fsync(fd);
    int e = errno;
    close(fd);
    if (rc != 0)
        return tern_set_error(err, TERN_ERR_IO, "cannot fsync %s: %s", path, strerror(e));
    return TERN_OK;
}

/* Compacted copy of s into dir/data.mdb (dir must exist, data.mdb must not). */
static tern_status copy_env(tern_store *s, const char *dir, tern_error *err)
{
    for (int attempt = 0;; attempt++) {
        /* Shared lock: the copy's read transaction must not overlap growing the map. */
        pthread_rwlock_rdlock(&s->lock);
        int rc = mdb_env_copy2(s->env, dir, MDB_CP_COMPACT);
        pthread_rwlock_unlock(&s->lock);
        if (rc == 0)
            return TERN_OK;
        if (rc == MDB_MAP_RESIZED && attempt < 3) {
            pthread_rwlock_wrlock(&s->lock);
            rc = mdb_env_set_mapsize(s->env, 0);
            pthread_rwlock_unlock(&s->lock);
            if (rc == 0)
                continue;
        }
        return tern_set_error(err, TERN_ERR_IO, "cannot copy the store into %s: %s", dir,
                              mdb_strerror(rc));
    }
}

tern_status tern_store_backup(tern_store *store, const char *dest_dir, tern_error *err)
{
    if (!store || !dest_dir || !*dest_dir)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_backup: NULL or empty argument");
    char path[4096];
    struct stat sb;
    tern_status st;
    if ((st = make_dir(dest_dir, err)) || (st = join(path, sizeof path, dest_dir, "data.mdb", err)))
        return st;
    if (stat(path, &sb) == 0)
        return tern_set_error(err, TERN_ERR_INVALID,
                              "backup destination %s already holds a store (data.mdb)", dest_dir);
    if ((st = copy_env(store, dest_dir, err)) || (st = fsync_path(path, O_RDONLY, err)))
        return st;
    return fsync_path(dest_dir, O_RDONLY | O_DIRECTORY, err);
}

/* Every process with an LMDB environment open holds a shared fcntl lock on the first byte of
 * its lock.mdb (LMDB's liveness lock), so a write lock that would conflict means another process
 * has the store open. Probed with F_GETLK, which takes nothing. (Closing the probe descriptor
 * drops this process's own fcntl locks on the file: callers must not have dir open, as the
 * restore contract already says.) */
static tern_status refuse_if_open(const char *dir, tern_error *err)
{
    char path[4096];
    tern_status st = join(path, sizeof path, dir, "lock.mdb", err);
    if (st)
        return st;
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return TERN_OK; /* no lock file: nobody has the store open */
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
    int rc = fcntl(fd, F_GETLK, &fl);
    int e = errno;
    close(fd);
    if (rc != 0)
        return tern_set_error(err, TERN_ERR_IO, "cannot probe the lock of %s: %s", path,
                              strerror(e));
    if (fl.l_type != F_UNLCK)
        return tern_set_error(err, TERN_ERR_STATE,
                              "cannot restore into %s: the store is open in process %ld", dir,
                              (long)fl.l_pid);
    return TERN_OK;
}

typedef struct {
    char first[256];
} first_problem;

static void keep_first(void *user, const char *message)
{
    first_problem *f = user;
    if (!f->first[0])
        snprintf(f->first, sizeof f->first, "%s", message);
}

tern_status tern_store_restore(const char *src_dir, const char *dest_dir, tern_error *err)
{
    if (!src_dir || !dest_dir || !*src_dir || !*dest_dir)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_restore: NULL or empty argument");
    tern_store *src = NULL;
    char tmp[4096], tmp_data[4096], dest_data[4096];
    tern_status st;
    if ((st = join(tmp, sizeof tmp, dest_dir, ".restore-tmp", err)) ||
        (st = join(tmp_data, sizeof tmp_data, tmp, "data.mdb", err)) ||
        (st = join(dest_data, sizeof dest_data, dest_dir, "data.mdb", err)))
        return st;
    struct stat sb;
    char probe[4096];
    if ((st = join(probe, sizeof probe, src_dir, "data.mdb", err)))
        return st;
    if (stat(probe, &sb) != 0)
        return tern_set_error(err, TERN_ERR_NOT_FOUND, "no backup at %s (data.mdb is missing)",
                              src_dir);
    if ((st = refuse_if_open(dest_dir, err)))
        return st;
    st = tern_store_open(src_dir, &(tern_store_options){.read_only = true}, &src, err);
    if (st)
        return st;
    size_t problems = 0;
    first_problem fp = {{0}};
    if ((st = tern_store_check(src, keep_first, &fp, &problems, err)))
        goto done;
    if (problems) {
        st = tern_set_error(err, TERN_ERR_FORMAT,
                            "refusing to restore %s: the check found %zu problems (first: %s)",
                            src_dir, problems, fp.first);
        goto done;
    }
    if ((st = make_dir(dest_dir, err)) || (st = make_dir(tmp, err)))
        goto done;
    if (unlink(tmp_data) != 0 && errno != ENOENT) { /* left by an interrupted restore */
        st = tern_set_error(err, TERN_ERR_IO, "cannot remove %s: %s", tmp_data, strerror(errno));
        goto done;
    }
    if ((st = copy_env(src, tmp, err)) || (st = fsync_path(tmp_data, O_RDONLY, err)))
        goto done;
    if (rename(tmp_data, dest_data) != 0) {
        st = tern_set_error(err, TERN_ERR_IO, "cannot move the restored store into %s: %s",
                            dest_dir, strerror(errno));
        goto done;
    }
    rmdir(tmp);
    st = fsync_path(dest_dir, O_RDONLY | O_DIRECTORY, err);
done:
    tern_store_close(&src);
    return st;
}

/* ---- integrity check ---------------------------------------------------------------------- */

typedef struct {
    st_txn *t;
    tern_store_report report;
    void *user;
    size_t problems;
    st_vec refs; /* char[65] blob keys referenced by versions and images */
    tern_error scratch;
} checker;

static void problem(checker *ck, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(checker *ck, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    ck->problems++;
    if (ck->report)
        ck->report(ck->user, msg);
}

static bool has_key(checker *ck, int db, const void *key, size_t klen, MDB_val *val)
{
    MDB_val v;
    return st_get(ck->t, db, key, klen, val ? val : &v) == TERN_OK;
}

/* index[key] must exist and hold id. */
static void expect_index(checker *ck, int db, const void *key, size_t klen, const char *id,
                         const char *what)
{
    MDB_val v;
    if (!has_key(ck, db, key, klen, &v))
        problem(ck, "%s: index entry missing", what);
    else if (v.mv_size != strlen(id) || memcmp(v.mv_data, id, v.mv_size) != 0)
        problem(ck, "%s: index entry points to %.*s", what, (int)v.mv_size,
                (const char *)v.mv_data);
}

static size_t db_count(checker *ck, int db)
{
    MDB_stat stat;
    return mdb_stat(ck->t->txn, ck->t->s->db[db], &stat) == 0 ? stat.ms_entries : 0;
}

static tern_status add_ref(checker *ck, const char *key)
{
    char *slot = st_vec_push(ck->t->s, &ck->refs);
    if (!slot)
        return tern_set_error(ck->t->err, TERN_ERR_NOMEM, "out of memory checking the store");
    snprintf(slot, TERN_STORE_SHA256_SIZE, "%s", key);
    return TERN_OK;
}

static int cmp_ref(const void *a, const void *b)
{
    return strcmp(a, b);
}

#define FOR_EACH(ck, db, k, v, ...)                                                            \
    do {                                                                                       \
        MDB_cursor *cur_;                                                                      \
        tern_status cst_ = st_cursor((ck)->t, (db), &cur_);                                    \
        if (cst_)                                                                              \
            return cst_;                                                                       \
        for (int rc_ = mdb_cursor_get(cur_, &(k), &(v), MDB_FIRST); rc_ == 0;                  \
             rc_ = mdb_cursor_get(cur_, &(k), &(v), MDB_NEXT)) {                               \
            __VA_ARGS__                                                                        \
        }                                                                                      \
        mdb_cursor_close(cur_);                                                                \
    } while (0)

static bool key_is(const MDB_val *k, const char *s)
{
    return k->mv_size == strlen(s) && memcmp(k->mv_data, s, k->mv_size) == 0;
}

static tern_status check_categories(checker *ck)
{
    MDB_val k, v;
    size_t n = 0;
    FOR_EACH(ck, DB_CATEGORIES, k, v, {
        tern_category c;
        n++;
        if (st_decode_category(&v, &c, &ck->scratch)) {
            problem(ck, "category %.*s: %s", (int)k.mv_size, (char *)k.mv_data, ck->scratch.message);
            continue;
        }
        char what[TERN_STORE_NAME_SIZE + 64];
        if (!key_is(&k, c.id))
            problem(ck, "category %s stored under another key", c.id);
        snprintf(what, sizeof what, "category '%s' by name", c.name);
        expect_index(ck, DB_CAT_BY_NAME, c.name, strlen(c.name), c.id, what);
        unsigned char ik[4];
        st_be32(ik, (uint32_t)c.class_index);
        snprintf(what, sizeof what, "category '%s' by class index %d", c.name, (int)c.class_index);
        expect_index(ck, DB_CAT_BY_INDEX, ik, 4, c.id, what);
    });
    if (db_count(ck, DB_CAT_BY_NAME) != n || db_count(ck, DB_CAT_BY_INDEX) != n)
        problem(ck, "category indexes hold %zu names and %zu class indexes for %zu categories",
                db_count(ck, DB_CAT_BY_NAME), db_count(ck, DB_CAT_BY_INDEX), n);
    return TERN_OK;
}

static tern_status check_clients(checker *ck)
{
    MDB_val k, v;
    size_t n = 0;
    FOR_EACH(ck, DB_CLIENTS, k, v, {
        tern_client_record c;
        n++;
        if (st_decode_client(&v, &c, &ck->scratch)) {
            problem(ck, "client %.*s: %s", (int)k.mv_size, (char *)k.mv_data, ck->scratch.message);
            continue;
        }
        char what[TERN_STORE_NAME_SIZE + 32];
        if (!key_is(&k, c.id))
            problem(ck, "client %s stored under another key", c.id);
        snprintf(what, sizeof what, "client '%s' by name", c.name);
        expect_index(ck, DB_CLIENT_BY_NAME, c.name, strlen(c.name), c.id, what);
    });
    if (db_count(ck, DB_CLIENT_BY_NAME) != n)
        problem(ck, "client name index holds %zu entries for %zu clients",
                db_count(ck, DB_CLIENT_BY_NAME), n);
    return TERN_OK;
}

static tern_status check_images(checker *ck)
{
    MDB_val k, v;
    size_t n = 0;
    tern_status st = TERN_OK;
    FOR_EACH(ck, DB_IMAGES, k, v, {
        tern_image_record r;
        n++;
        if (st_decode_image(&v, &r, &ck->scratch)) {
            problem(ck, "image %.*s: %s", (int)k.mv_size, (char *)k.mv_data, ck->scratch.message);
            continue;
        }
        char what[96];
        if (!key_is(&k, r.id))
            problem(ck, "image %s stored under another key", r.id);
        snprintf(what, sizeof what, "image %s by hash", r.id);
        expect_index(ck, DB_IMAGE_BY_HASH, r.sha256, strlen(r.sha256), r.id, what);
        if (!st_key_ok(r.client_id) || !has_key(ck, DB_CLIENTS, r.client_id, strlen(r.client_id), NULL))
            problem(ck, "image %s: client %s does not exist", r.id, r.client_id);
        if (!st_key_ok(r.category_id) ||
            !has_key(ck, DB_CATEGORIES, r.category_id, strlen(r.category_id), NULL))
            problem(ck, "image %s: category %s does not exist", r.id, r.category_id);
        if (strncmp(r.location, "blob:", 5) == 0) {
            const char *key = r.location + 5;
            if (!st_key_ok(key) || !has_key(ck, DB_BLOBS, key, strlen(key), NULL))
                problem(ck, "image %s: blob %s is missing", r.id, key);
            else if ((st = add_ref(ck, key)))
                break;
        }
    });
    if (st)
        return st;
    if (db_count(ck, DB_IMAGE_BY_HASH) != n)
        problem(ck, "image hash index holds %zu entries for %zu images",
                db_count(ck, DB_IMAGE_BY_HASH), n);
    return TERN_OK;
}

static tern_status check_rounds(checker *ck)
{
    MDB_val k, v;
    size_t n = 0;
    FOR_EACH(ck, DB_ROUNDS, k, v, {
        tern_round r;
        n++;
        if (st_decode_round(&v, &r, &ck->scratch)) {
            problem(ck, "round record: %s", ck->scratch.message);
            continue;
        }
        if (k.mv_size != 8 || (int64_t)st_rd_be64(k.mv_data) != r.number)
            problem(ck, "round %lld stored under another key", (long long)r.number);
        unsigned char sk[9];
        sk[0] = (unsigned char)r.status;
        st_be64(sk + 1, (uint64_t)r.number);
        if (!has_key(ck, DB_ROUND_BY_STATUS, sk, 9, NULL))
            problem(ck, "round %lld: missing from the %s status index", (long long)r.number,
                    tern_round_status_name(r.status));
        if (r.status == TERN_ROUND_COMPLETED) {
            int32_t a, b, c;
            unsigned char vk[12];
            MDB_val vv;
            tern_model_version m;
            if (!st_parse_version(r.model_version, &a, &b, &c)) {
                problem(ck, "round %lld: completed without a model version", (long long)r.number);
                continue;
            }
            st_version_key(vk, a, b, c);
            if (!has_key(ck, DB_VERSIONS, vk, 12, &vv))
                problem(ck, "round %lld: model version %s does not exist", (long long)r.number,
                        r.model_version);
            else if (st_decode_version(&vv, &m, &ck->scratch) == TERN_OK && m.round != r.number)
                problem(ck, "round %lld: model version %s belongs to round %lld",
                        (long long)r.number, r.model_version, (long long)m.round);
        }
    });
    if (db_count(ck, DB_ROUND_BY_STATUS) != n)
        problem(ck, "round status index holds %zu entries for %zu rounds",
                db_count(ck, DB_ROUND_BY_STATUS), n);
    FOR_EACH(ck, DB_ROUND_CLIENTS, k, v, {
        tern_client_metrics m;
        if (k.mv_size <= 8 || !has_key(ck, DB_ROUNDS, k.mv_data, 8, NULL))
            problem(ck, "client metrics for a round that does not exist");
        else if (st_decode_client_metrics(&v, &m, &ck->scratch))
            problem(ck, "client metrics: %s", ck->scratch.message);
    });
    return TERN_OK;
}

static tern_status check_versions(checker *ck)
{
    MDB_val k, v;
    size_t n = 0;
    tern_status st = TERN_OK;
    FOR_EACH(ck, DB_VERSIONS, k, v, {
        tern_model_version m;
        n++;
        if (st_decode_version(&v, &m, &ck->scratch)) {
            problem(ck, "model version record: %s", ck->scratch.message);
            continue;
        }
        unsigned char vk[12];
        int32_t a, b, c;
        st_version_key(vk, m.major, m.minor, m.patch);
        if (k.mv_size != 12 || memcmp(k.mv_data, vk, 12) != 0 ||
            !st_parse_version(m.version, &a, &b, &c) || a != m.major || b != m.minor ||
            c != m.patch)
            problem(ck, "model version %s stored under another key", m.version);
        if (!m.pruned) {
            MDB_val blob;
            if (strcmp(m.blob_key, m.sha256) != 0)
                problem(ck, "model version %s: blob key %s differs from its sha256 %s", m.version,
                        m.blob_key, m.sha256);
            if (!st_key_ok(m.blob_key) ||
                !has_key(ck, DB_BLOBS, m.blob_key, strlen(m.blob_key), &blob))
                problem(ck, "model version %s: blob %s is missing", m.version, m.blob_key);
            else if (blob.mv_size != m.size)
                problem(ck, "model version %s: blob has %zu bytes, record says %llu", m.version,
                        blob.mv_size, (unsigned long long)m.size);
            if ((st = add_ref(ck, m.blob_key)))
                break;
        }
        tern_round r;
        unsigned char rk[8];
        MDB_val rv;
        st_be64(rk, (uint64_t)m.round);
        if (!has_key(ck, DB_ROUNDS, rk, 8, &rv))
            problem(ck, "model version %s: round %lld does not exist", m.version,
                    (long long)m.round);
        else if (st_decode_round(&rv, &r, &ck->scratch) == TERN_OK &&
                 strcmp(r.model_version, m.version) != 0)
            problem(ck, "model version %s: round %lld records version '%s'", m.version,
                    (long long)m.round, r.model_version);
    });
    if (st)
        return st;
    MDB_val cur;
    bool has_current = has_key(ck, DB_META, "current", 7, &cur);
    if (has_current) {
        MDB_val vv;
        tern_model_version m;
        if (cur.mv_size != 12 || !has_key(ck, DB_VERSIONS, cur.mv_data, 12, &vv))
            problem(ck, "the current version pointer names a version that does not exist");
        else if (st_decode_version(&vv, &m, &ck->scratch) == TERN_OK && m.pruned)
            problem(ck, "the current version %s was pruned", m.version);
    } else if (n) {
        problem(ck, "%zu model versions but no current version", n);
    }
    return TERN_OK;
}

static tern_status check_blobs(checker *ck)
{
    char *refs = ck->refs.data;
    if (ck->refs.count)
        qsort(refs, ck->refs.count, TERN_STORE_SHA256_SIZE, cmp_ref);
    MDB_val k, v;
    FOR_EACH(ck, DB_BLOBS, k, v, {
        char key[TERN_STORE_SHA256_SIZE], sha[TERN_STORE_SHA256_SIZE];
        if (k.mv_size != 64) {
            problem(ck, "blob with a malformed key of %zu bytes", k.mv_size);
            continue;
        }
        memcpy(key, k.mv_data, 64);
        key[64] = '\0';
        if (st_sha256_hex(v.mv_data, v.mv_size, sha, &ck->scratch) != TERN_OK)
            problem(ck, "blob %s: %s", key, ck->scratch.message);
        else if (strcmp(sha, key) != 0)
            problem(ck, "blob %s is corrupt: its content hashes to %s", key, sha);
        if (!ck->refs.count ||
            !bsearch(key, refs, ck->refs.count, TERN_STORE_SHA256_SIZE, cmp_ref))
            problem(ck, "blob %s is not referenced by any version or image", key);
    });
    return TERN_OK;
}

/* Round reports and the server state, kept in meta. */
static tern_status check_federated(checker *ck)
{
    MDB_val k, v;
    tern_status st = TERN_OK;
    size_t plen = strlen(META_REPORT);
    FOR_EACH(ck, DB_META, k, v, {
        if (k.mv_size != META_REPORT_KEY_SIZE || memcmp(k.mv_data, META_REPORT, plen) != 0)
            continue;
        const unsigned char *nk = (const unsigned char *)k.mv_data + plen;
        long long number = (long long)st_rd_be64(nk);
        if (!has_key(ck, DB_ROUNDS, nk, 8, NULL))
            problem(ck, "a report for round %lld, which does not exist", number);
        json_error_t jerr;
        json_t *root = json_loadb(v.mv_data, v.mv_size, 0, &jerr);
        if (!root && json_error_code(&jerr) == json_error_out_of_memory) {
            st = tern_set_error(ck->t->err, TERN_ERR_NOMEM, "out of memory checking the store");
            break;
        }
        if (!root)
            problem(ck, "round %lld: the report is not JSON: %s", number, jerr.text);
        else if (!json_is_object(root))
            problem(ck, "round %lld: the report is not a JSON object", number);
        json_decref(root);
    });
    if (st)
        return st;

    MDB_val iv, sv;
    bool has_info =
        has_key(ck, DB_META, META_SERVER_STATE_INFO, strlen(META_SERVER_STATE_INFO), &iv);
    bool has_state = has_key(ck, DB_META, META_SERVER_STATE, strlen(META_SERVER_STATE), &sv);
    if (has_info != has_state) {
        problem(ck, "the server state %s", has_info ? "is missing (only its record is there)"
                                                    : "has no record of its size and sha256");
        return TERN_OK;
    }
    if (!has_info)
        return TERN_OK;
    st_state_info info;
    char sha[TERN_STORE_SHA256_SIZE];
    unsigned char rk[8];
    if (st_decode_state_info(&iv, &info, &ck->scratch)) {
        problem(ck, "server state: %s", ck->scratch.message);
        return TERN_OK;
    }
    if (st_sha256_hex(sv.mv_data, sv.mv_size, sha, &ck->scratch) != TERN_OK)
        problem(ck, "server state: %s", ck->scratch.message);
    else if (sv.mv_size != info.size || strcmp(sha, info.sha256) != 0)
        problem(ck, "the server state is corrupt: %zu bytes with sha256 %s, recorded %llu bytes "
                "with sha256 %s", sv.mv_size, sha, (unsigned long long)info.size, info.sha256);
    st_be64(rk, (uint64_t)info.round);
    if (!has_key(ck, DB_ROUNDS, rk, 8, NULL))
        problem(ck, "the server state was saved by round %lld, which does not exist",
                (long long)info.round);
    return TERN_OK;
}

static tern_status check_audit(checker *ck)
{
    MDB_val k, v;
    FOR_EACH(ck, DB_AUDIT, k, v, {
        tern_audit_entry e;
        if (st_decode_audit(&v, &e, &ck->scratch))
            problem(ck, "audit entry: %s", ck->scratch.message);
        else if (k.mv_size != 8 || (int64_t)st_rd_be64(k.mv_data) != e.seq)
            problem(ck, "audit entry %lld stored under another key", (long long)e.seq);
    });
    return TERN_OK;
}

tern_status tern_store_check(tern_store *store, tern_store_report report, void *user,
                             size_t *problems, tern_error *err)
{
    if (!store || !problems)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_check: NULL argument");
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    checker ck = {.t = &t, .report = report, .user = user,
                  .refs = {.elem = TERN_STORE_SHA256_SIZE}};
    if ((st = check_categories(&ck)) || (st = check_clients(&ck)) || (st = check_images(&ck)) ||
        (st = check_rounds(&ck)) || (st = check_versions(&ck)) || (st = check_blobs(&ck)) ||
        (st = check_federated(&ck)) || (st = check_audit(&ck)))
        goto done;
    *problems = ck.problems;
done:
    st_read_end(&t);
    tern_free(st_alloc(store), ck.refs.data);
    return st;
}
