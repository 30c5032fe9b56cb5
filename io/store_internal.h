/* Internals shared by io/store.c (environment, transactions, encoding, categories, clients,
 * images, audit), io/store_registry.c (rounds, model versions) and io/store_ops.c (backup,
 * restore, check). Not installed.
 *
 * Sub-databases and their keys:
 *   meta             "schema" -> "1", "current" -> version key (12 bytes),
 *                    "server_state" -> the federated server's state (raw bytes),
 *                    "server_state_info" -> JSON {size, sha256, round, saved_at} of it,
 *                    "report" + be64 number -> a round's report (JSON text as given),
 *                    "privacy:" + subject -> the privacy ledger's record of a client id or of
 *                    "central" (io/store_privacy.c)
 *   categories       id -> JSON            cat_by_name  name -> id     cat_by_index  be32 -> id
 *   clients          id -> JSON            client_by_name  name -> id
 *   images           id -> JSON            image_by_hash   sha256 hex -> id
 *   rounds           be64 number -> JSON   round_by_status  status byte + be64 number -> ""
 *   round_clients    be64 number + client id -> JSON
 *   versions         be32 major + be32 minor + be32 patch -> JSON (so keys sort by semver)
 *   blobs            sha256 hex -> raw bytes (model files, stored images)
 *   audit            be64 seq -> JSON
 *
 * The server state and the reports live in meta rather than in sub-databases of their own so
 * that stores and backups written before they existed still open read-only (a read-only
 * environment cannot create a missing sub-database). */
#ifndef TERN_STORE_INTERNAL_H
#define TERN_STORE_INTERNAL_H

#include <jansson.h>
#include <lmdb.h>
#include <pthread.h>

#include "nn/util.h"
#include "tern/store.h"

#define STORE_SCHEMA 1

enum {
    DB_META,
    DB_CATEGORIES,
    DB_CAT_BY_NAME,
    DB_CAT_BY_INDEX,
    DB_CLIENTS,
    DB_CLIENT_BY_NAME,
    DB_IMAGES,
    DB_IMAGE_BY_HASH,
    DB_ROUNDS,
    DB_ROUND_BY_STATUS,
    DB_ROUND_CLIENTS,
    DB_VERSIONS,
    DB_BLOBS,
    DB_AUDIT,
    DB_COUNT
};

struct tern_store {
    tern_allocator alloc;
    bool has_alloc;
    MDB_env *env;
    MDB_dbi db[DB_COUNT];
    /* Read and write transactions hold it shared; growing the map (which LMDB allows only
     * with no transaction open in the process) holds it exclusive. */
    pthread_rwlock_t lock;
    size_t max_map_size;
    bool read_only;
    tern_store_clock clock;
    void *clock_user;
};

/* One transaction plus where its errors go. mdb_rc keeps the last LMDB failure so the write
 * loop can tell a full map (retry after growing) from everything else. */
typedef struct st_txn {
    tern_store *s;
    MDB_txn *txn;
    int mdb_rc;
    tern_error *err;
} st_txn;

static inline const tern_allocator *st_alloc(const tern_store *s)
{
    return s->has_alloc ? &s->alloc : NULL;
}

/* Run fn in a write transaction, committing when it returns TERN_OK; on a full map the
 * transaction is abandoned, the map doubled and fn run again from the start. */
typedef tern_status (*st_write_fn)(st_txn *t, void *ctx);
tern_status st_write(tern_store *s, st_write_fn fn, void *ctx, tern_error *err);
tern_status st_read_begin(tern_store *s, st_txn *t, tern_error *err);
void st_read_end(st_txn *t);

/* Key/value access. get/del return TERN_ERR_NOT_FOUND without touching err when the key is
 * absent; every other failure sets err. */
tern_status st_get(st_txn *t, int db, const void *key, size_t klen, MDB_val *val);
tern_status st_put(st_txn *t, int db, const void *key, size_t klen, const void *val, size_t vlen,
                   unsigned flags);
tern_status st_del(st_txn *t, int db, const void *key, size_t klen);
/* Encode obj compactly and put it (obj is consumed: its reference is dropped). */
tern_status st_put_json(st_txn *t, int db, const void *key, size_t klen, json_t *obj);
/* Parse a record and check its schema; what names it in messages. */
tern_status st_parse(const MDB_val *v, const char *what, json_t **out, tern_error *err);
tern_status st_last_key(st_txn *t, int db, MDB_val *key); /* NOT_FOUND when empty */
tern_status st_cursor(st_txn *t, int db, MDB_cursor **cur);

/* Copy src into dst[cap]; false (dst untouched) when it does not fit. */
bool st_copy(char *dst, size_t cap, const char *src);
/* Validate an input string for a field of size cap. */
tern_status st_check_text(tern_error *err, const char *what, const char *s, size_t cap,
                          bool required);
/* Keys LMDB accepts (non-empty, at most 511 bytes). */
bool st_key_ok(const char *s);

int64_t st_now(const tern_store *s);
tern_status st_uuid(char out[TERN_STORE_ID_SIZE], tern_error *err);
tern_status st_sha256_hex(const void *data, size_t len, char out[TERN_STORE_SHA256_SIZE],
                          tern_error *err);
/* The hex text of a SHA-256 computed elsewhere. */
void st_sha256_to_hex(const uint8_t sha[32], char out[TERN_STORE_SHA256_SIZE]);
tern_status st_audit(st_txn *t, const char *actor, const char *action, const char *target,
                     const char *detail);

void st_be32(unsigned char *p, uint32_t v);
void st_be64(unsigned char *p, uint64_t v);
uint32_t st_rd_be32(const unsigned char *p);
uint64_t st_rd_be64(const unsigned char *p);

/* Record decoders (used by lookups and by the integrity check). */
tern_status st_decode_category(const MDB_val *v, tern_category *out, tern_error *err);
tern_status st_decode_client(const MDB_val *v, tern_client_record *out, tern_error *err);
tern_status st_decode_image(const MDB_val *v, tern_image_record *out, tern_error *err);
tern_status st_decode_round(const MDB_val *v, tern_round *out, tern_error *err);
tern_status st_decode_version(const MDB_val *v, tern_model_version *out, tern_error *err);
tern_status st_decode_audit(const MDB_val *v, tern_audit_entry *out, tern_error *err);
tern_status st_decode_client_metrics(const MDB_val *v, tern_client_metrics *out,
                                     tern_error *err);

/* The federated records in meta (see the top of this file). */
#define META_SERVER_STATE "server_state"
#define META_SERVER_STATE_INFO "server_state_info"
#define META_REPORT "report"
#define META_REPORT_KEY_SIZE 14 /* "report" + be64 round number */
void st_report_key(unsigned char key[META_REPORT_KEY_SIZE], int64_t number);

typedef struct st_state_info {
    uint64_t size;
    char sha256[TERN_STORE_SHA256_SIZE];
    int64_t round, saved_at;
} st_state_info;
tern_status st_decode_state_info(const MDB_val *v, st_state_info *out, tern_error *err);

/* Record one selected client's outcome of round `round` in its statistics (see
 * tern_store_commit_round); NOT_FOUND naming the round and the client when it does not exist. */
tern_status st_client_record_round(st_txn *t, int64_t round, const tern_client_metrics *m);

/* The privacy ledger (io/store_privacy.c): check charges before a commit, and add them inside
 * the commit's transaction. */
#define META_PRIVACY "privacy:"
tern_status st_privacy_check(const tern_privacy_charge *c, size_t n, tern_error *err);
tern_status st_privacy_add(st_txn *t, int64_t round, const tern_privacy_charge *c, size_t n);

/* "1.2.3" -> numbers; false when malformed. */
bool st_parse_version(const char *s, int32_t *major, int32_t *minor, int32_t *patch);
void st_version_key(unsigned char key[12], int32_t major, int32_t minor, int32_t patch);

/* Growable array through the store's allocator, for list functions. */
typedef struct st_vec {
    void *data;
    size_t count, cap, elem;
} st_vec;
void *st_vec_push(tern_store *s, st_vec *v); /* zeroed slot or NULL */
/* The shared end of a list function: closes the cursor (may be NULL) and the read
 * transaction, and frees the array when st is an error. Returns st. */
tern_status st_list_end(tern_store *s, st_txn *t, MDB_cursor *cur, st_vec *v, tern_status st);

#endif
