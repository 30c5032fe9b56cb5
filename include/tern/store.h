/* The federated server's persistent store and model registry, on LMDB.
 *
 * One store is one LMDB environment (a directory holding data.mdb and lock.mdb) with named
 * sub-databases for categories, clients, training images, rounds, model versions, model blobs
 * and an audit log, plus the secondary indexes lookups need. Every record is a JSON object
 * (jansson) carrying a "schema" number. Every change is one LMDB write transaction, so a process
 * killed at any instant leaves the store as it was before or after the change, never between;
 * in particular tern_store_commit_round writes the round record, the model blob, the version
 * record, the current-version pointer, the per-client metrics and statistics, the round report
 * and the federated server's state together.
 *
 * Records are plain structs with fixed-size, NUL-terminated string fields (sizes below); input
 * strings longer than a field are refused with TERN_ERR_INVALID, never truncated. Functions
 * returning lists allocate the array with the store's allocator; release it with
 * tern_store_free. Every function that can fail takes a tern_error (may be NULL) that receives
 * a message naming the record involved.
 *
 * Errors, common to every function: TERN_ERR_INVALID (NULL or out-of-range argument, a string
 * too long, an illegal round transition), TERN_ERR_EXISTS (a duplicate category name or class
 * index, client name or image content: the message names the existing record), TERN_ERR_NOT_FOUND
 * (unknown id, name, number or version: the message names it), TERN_ERR_FORMAT (a record that
 * does not decode, a blob whose SHA-256 does not match), TERN_ERR_UNSUPPORTED (a record written
 * by a newer schema), TERN_ERR_IO (LMDB or file system failure), TERN_ERR_NOMEM,
 * TERN_ERR_STATE (writing to a store opened read-only).
 *
 * Concurrency: any number of processes may open the same directory (LMDB serializes writers
 * and readers never block). Within a process, open a directory once (an LMDB rule); the handle
 * may then be shared by threads. When the map is full a write is aborted, the map doubled and
 * the write retried, up to max_map_size. */
#ifndef TERN_STORE_H
#define TERN_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tern/alloc.h"
#include "tern/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Field sizes, including the terminating NUL. */
#define TERN_STORE_ID_SIZE 37       /* RFC 4122 version-4 UUID text */
#define TERN_STORE_NAME_SIZE 128    /* names, device types, actors, tags */
#define TERN_STORE_TEXT_SIZE 512    /* descriptions, notes, reasons, paths */
#define TERN_STORE_SHA256_SIZE 65   /* lower-case hex */
#define TERN_STORE_VERSION_SIZE 32  /* "major.minor.patch" */
#define TERN_STORE_KEY_HASH_SIZE 160 /* "pbkdf2-sha256$iterations$salt$hash" */

/* Milliseconds since the Unix epoch. */
typedef int64_t (*tern_store_clock)(void *user);

typedef struct tern_store_options {
    size_t map_size;      /* initial map size in bytes; 0 = 64 MiB (an existing larger map wins) */
    size_t max_map_size;  /* growth limit; 0 = 1 TiB */
    bool read_only;       /* open without write access; writes fail with TERN_ERR_STATE */
    bool no_sync;         /* skip fsync at commit: survives a killed process, not a power loss */
    tern_store_clock clock; /* NULL = real time */
    void *clock_user;
    const tern_allocator *alloc; /* NULL = C library; copied, need not outlive the call */
} tern_store_options;

typedef struct tern_store tern_store;

/* Open the store in directory dir, creating the directory and the environment when missing
 * (unless read_only). options may be NULL. Stale reader slots left by killed processes are
 * cleared. On failure *out is untouched. */
tern_status tern_store_open(const char *dir, const tern_store_options *options, tern_store **out,
                            tern_error *err);
/* Close; *store becomes NULL. Accepts NULL. */
void tern_store_close(tern_store **store);
/* Release an array returned by a list function. Accepts NULL. */
void tern_store_free(tern_store *store, void *ptr);
/* Current map size in bytes (grows as the store fills). */
size_t tern_store_map_size(const tern_store *store);

/* ---- object categories ----------------------------------------------------------------- */

typedef struct tern_category {
    char id[TERN_STORE_ID_SIZE];
    char name[TERN_STORE_NAME_SIZE];        /* unique */
    char description[TERN_STORE_TEXT_SIZE];
    int32_t class_index;                    /* unique, >= 0: the model's output index */
    bool active;
    int64_t sample_count;                   /* images stored for it (kept by image_add) */
    int64_t created_at, updated_at;
    char created_by[TERN_STORE_NAME_SIZE];
} tern_category;

/* Add a category from in->name, description, class_index, active and created_by (other fields
 * ignored). *out (may be NULL) receives the stored record with its new id. Audited.
 * TERN_ERR_EXISTS for a duplicate name or class index. */
tern_status tern_store_category_add(tern_store *store, const tern_category *in,
                                    tern_category *out, tern_error *err);
tern_status tern_store_category_get(tern_store *store, const char *id, tern_category *out,
                                    tern_error *err);
tern_status tern_store_category_get_by_name(tern_store *store, const char *name,
                                            tern_category *out, tern_error *err);
tern_status tern_store_category_get_by_index(tern_store *store, int32_t class_index,
                                             tern_category *out, tern_error *err);
/* All categories in class-index order; *out is released with tern_store_free. */
tern_status tern_store_category_list(tern_store *store, tern_category **out, size_t *count,
                                     tern_error *err);
/* Rename (new name must be unique, else TERN_ERR_EXISTS), set active, remove; actor is recorded
 * in the audit log. */
tern_status tern_store_category_rename(tern_store *store, const char *id, const char *new_name,
                                       const char *actor, tern_error *err);
tern_status tern_store_category_set_active(tern_store *store, const char *id, bool active,
                                           const char *actor, tern_error *err);
/* Refused (TERN_ERR_INVALID) while images refer to the category. */
tern_status tern_store_category_remove(tern_store *store, const char *id, const char *actor,
                                       tern_error *err);

/* ---- clients ------------------------------------------------------------------------------ */

typedef struct tern_client_record {
    char id[TERN_STORE_ID_SIZE];
    char name[TERN_STORE_NAME_SIZE];        /* unique */
    char device_type[TERN_STORE_NAME_SIZE];
    char os_info[TERN_STORE_NAME_SIZE];
    int64_t registered_at, last_seen;
    bool active;
    int64_t total_samples;
    char api_key_hash[TERN_STORE_KEY_HASH_SIZE]; /* from tern_store_hash_api_key; never the key */
    double quality_score;
    bool blacklisted;
    char blacklist_reason[TERN_STORE_TEXT_SIZE];
    /* Federated statistics, kept by tern_store_commit_round and tern_store_round_fail from
     * their client metrics (records written before these fields existed read as 0). Every
     * round the client was selected for ends as exactly one of succeeded, failed, rejected. */
    int64_t rounds_selected, rounds_succeeded, rounds_failed, rounds_rejected;
    double last_update_norm;        /* L2 norm of the last accepted update; 0 before any */
} tern_client_record;

/* Register a client from in->name, device_type, os_info, api_key_hash (must look like the
 * output of tern_store_hash_api_key). Starts active, not blacklisted, quality 1.0, with zero
 * round statistics. */
tern_status tern_store_client_register(tern_store *store, const tern_client_record *in,
                                       tern_client_record *out, tern_error *err);
tern_status tern_store_client_get(tern_store *store, const char *id, tern_client_record *out,
                                  tern_error *err);
tern_status tern_store_client_get_by_name(tern_store *store, const char *name,
                                          tern_client_record *out, tern_error *err);
tern_status tern_store_client_list(tern_store *store, tern_client_record **out, size_t *count,
                                   tern_error *err);
/* Blacklist (reason required) or clear it; audited. A blacklisted client is also inactive. */
tern_status tern_store_client_set_blacklisted(tern_store *store, const char *id, bool blacklisted,
                                              const char *reason, const char *actor,
                                              tern_error *err);
/* Activate or deactivate a client; audited with actor when it changes anything. Activating a
 * blacklisted client is TERN_ERR_INVALID (clear the blacklist instead, which reactivates). */
tern_status tern_store_client_set_active(tern_store *store, const char *id, bool active,
                                         const char *actor, tern_error *err);
/* Mark the client seen now. */
tern_status tern_store_client_touch(tern_store *store, const char *id, tern_error *err);
/* Set the quality score (finite). The next committed or failed round that selected the client
 * replaces it with the formula of tern_store_commit_round. */
tern_status tern_store_client_set_quality(tern_store *store, const char *id, double score,
                                          tern_error *err);

/* API keys: "pbkdf2-sha256$<iterations>$<salt hex>$<hash hex>", PBKDF2-HMAC-SHA256 with a random
 * 16-byte salt and TERN_STORE_KEY_ITERATIONS iterations. verify compares in constant time and
 * sets *ok; a malformed hash string is TERN_ERR_FORMAT. */
#define TERN_STORE_KEY_ITERATIONS 100000
tern_status tern_store_hash_api_key(const char *key, char out[TERN_STORE_KEY_HASH_SIZE],
                                    tern_error *err);
tern_status tern_store_verify_api_key(const char *key, const char *hash, bool *ok,
                                      tern_error *err);

/* ---- training images -------------------------------------------------------------------- */

typedef struct tern_image_record {
    char id[TERN_STORE_ID_SIZE];
    char client_id[TERN_STORE_ID_SIZE];
    char category_id[TERN_STORE_ID_SIZE];
    char sha256[TERN_STORE_SHA256_SIZE];    /* of the content; unique */
    char location[TERN_STORE_TEXT_SIZE];    /* a file path, or "blob:<sha256>" when stored inside */
    int64_t uploaded_at;
    bool used_in_training;
} tern_image_record;

/* Record an uploaded image: in->client_id and in->category_id must exist; content (len bytes)
 * is hashed. When in->location is empty the bytes are stored in the store's blob database and
 * location becomes "blob:<sha256>"; otherwise location is kept as given (the caller stores the
 * file). Adds one to the category's sample_count and the client's total_samples.
 * Duplicate content: TERN_ERR_EXISTS, the message says "duplicate", and *out (when not NULL)
 * receives the EXISTING record, so out->id names the earlier upload. */
tern_status tern_store_image_add(tern_store *store, const tern_image_record *in,
                                 const void *content, size_t len, tern_image_record *out,
                                 tern_error *err);
tern_status tern_store_image_get(tern_store *store, const char *id, tern_image_record *out,
                                 tern_error *err);
tern_status tern_store_image_get_by_hash(tern_store *store, const char *sha256,
                                         tern_image_record *out, tern_error *err);
tern_status tern_store_image_set_used(tern_store *store, const char *id, bool used,
                                      tern_error *err);

/* ---- training rounds -------------------------------------------------------------------- */

typedef enum tern_round_status {
    TERN_ROUND_PENDING,
    TERN_ROUND_RUNNING,
    TERN_ROUND_AGGREGATING,
    TERN_ROUND_COMPLETED,
    TERN_ROUND_FAILED,
} tern_round_status;

/* "pending", "running", ...; "?" outside the enum. Static storage. */
const char *tern_round_status_name(tern_round_status status);
/* Legal: pending->running->aggregating->completed, and any non-terminal status -> failed. */
bool tern_round_transition_legal(tern_round_status from, tern_round_status to);

typedef struct tern_round {
    int64_t number;                 /* 1, 2, ... */
    tern_round_status status;
    int32_t clients_selected, clients_participated;
    int64_t started_at, ended_at;   /* 0 until running / until completed or failed */
    double global_accuracy, global_loss;
    char model_version[TERN_STORE_VERSION_SIZE]; /* empty until completed */
    char reason[TERN_STORE_TEXT_SIZE]; /* why it failed (tern_store_round_fail); "" otherwise */
} tern_round;

/* One selected client's outcome in a round. Exactly one of: participated (its update was
 * accepted), rejected (it sent an update that validation refused), neither (it failed or
 * dropped out). participated and rejected together are TERN_ERR_INVALID. */
typedef struct tern_client_metrics {
    char client_id[TERN_STORE_ID_SIZE];
    bool participated;              /* its update was accepted */
    int64_t num_samples;
    double loss, accuracy;
    bool rejected;                  /* its update was refused by validation */
    double update_norm;             /* L2 norm of the accepted change (finite, >= 0); 0 if none */
} tern_client_metrics;

/* Create round (last number + 1) in status pending. */
tern_status tern_store_round_create(tern_store *store, int32_t clients_selected, tern_round *out,
                                    tern_error *err);
/* Move a round to a new status; an illegal transition is TERN_ERR_INVALID naming both ends.
 * Completing goes through tern_store_commit_round instead (TERN_ERR_INVALID here). Failing
 * this way records no reason; tern_store_round_fail does. */
tern_status tern_store_round_set_status(tern_store *store, int64_t number,
                                        tern_round_status status, tern_error *err);
/* Fail a round (any non-terminal status -> failed, end time now) in ONE write transaction with:
 * reason (required, stored in the round record), the per-client metrics (count entries, may be
 * 0 with metrics NULL; client statistics updated as in tern_store_commit_round, and
 * clients_participated set to the number that participated when count > 0) and report_json
 * (NULL = none; else a JSON object text, stored as given). The model registry and the server
 * state are untouched. TERN_ERR_INVALID for a terminal round, a reason that is empty or too
 * long, malformed metrics or report; TERN_ERR_NOT_FOUND for an unknown round or client (then
 * nothing is written). */
tern_status tern_store_round_fail(tern_store *store, int64_t number, const char *reason,
                                  const tern_client_metrics *metrics, size_t count,
                                  const char *report_json, tern_error *err);
tern_status tern_store_round_get(tern_store *store, int64_t number, tern_round *out,
                                 tern_error *err);
/* The round with the highest number; TERN_ERR_NOT_FOUND when there is none. */
tern_status tern_store_round_latest(tern_store *store, tern_round *out, tern_error *err);
/* The report stored with round number (by commit_round or round_fail): a NUL-terminated copy of
 * the JSON text as it was given, in a buffer from the store's allocator (release with
 * tern_store_free); *json is untouched on failure. TERN_ERR_NOT_FOUND when the round or its
 * report is missing (the message says which). */
tern_status tern_store_round_report(tern_store *store, int64_t number, char **json,
                                    tern_error *err);
/* Rounds with the given status, ascending by number (from the status index). */
tern_status tern_store_round_list_by_status(tern_store *store, tern_round_status status,
                                            tern_round **out, size_t *count, tern_error *err);
/* Per-client metrics recorded for a round (by commit_round or round_fail), ordered by client
 * id. */
tern_status tern_store_round_client_metrics(tern_store *store, int64_t number,
                                            tern_client_metrics **out, size_t *count,
                                            tern_error *err);

/* ---- model registry --------------------------------------------------------------------- */

typedef struct tern_model_version {
    char version[TERN_STORE_VERSION_SIZE]; /* "major.minor.patch" */
    int32_t major, minor, patch;
    int64_t round;                  /* the round that produced it */
    char blob_key[TERN_STORE_SHA256_SIZE]; /* key in the blob database; empty once pruned */
    uint64_t size;                  /* bytes */
    char sha256[TERN_STORE_SHA256_SIZE];
    double accuracy;
    int64_t created_at;
    char notes[TERN_STORE_TEXT_SIZE];
    char tag[TERN_STORE_NAME_SIZE]; /* empty = untagged; tagged versions are never pruned */
    char settings_sha256[TERN_STORE_SHA256_SIZE]; /* of the training settings text */
    char classes_sha256[TERN_STORE_SHA256_SIZE];  /* of the class set text */
    bool pruned;                    /* blob removed by retention; metadata kept */
} tern_model_version;

/* What completing a round records. Borrowed for the duration of the call. */
typedef struct tern_round_commit {
    int64_t round;                  /* a round in status aggregating, or 0 to create the next
                                       round directly as completed */
    int32_t clients_selected;       /* used when round == 0 */
    int32_t clients_participated;   /* overridden by the count of participating entries when
                                       client_metrics are given */
    double global_accuracy, global_loss;
    const tern_client_metrics *client_metrics;
    size_t client_metrics_count;
    const void *model;              /* the model file (e.g. safetensors bytes) */
    size_t model_size;              /* > 0 */
    const char *settings;           /* training settings, any stable text; NULL = "" */
    const char *classes;            /* class set, any stable text; NULL = "" */
    const char *notes;              /* NULL = "" */
    const void *server_state;       /* the federated server's state, opaque bytes; NULL or */
    size_t server_state_size;       /* size 0 = leave the stored state as it is */
    const char *report_json;        /* the round report, a JSON object text; NULL = none */
    /* Privacy spent in this round, added to the privacy ledger (see below) in the same
     * transaction; NULL with privacy_count 0 = none. */
    const struct tern_privacy_charge *privacy;
    size_t privacy_count;
    /* The SHA-256 of model when the caller already has it (a federated server hashed the bytes
     * it sends), so the store does not hash them again; NULL = the store computes it. It is
     * recorded as given: a wrong one makes the version's blob fail its check when loaded. */
    const uint8_t *model_sha256;
} tern_round_commit;

/* Complete a round in ONE write transaction: round record (status completed, end time,
 * metrics, model version), per-client metrics, status index, model blob, version record,
 * current pointer, the statistics of every client in client_metrics, the report and the server
 * state (replacing the previous one). The version number follows the highest existing version:
 * 1.0.0 for the first; major + 1 when the class set digest differs from it; else minor + 1 when
 * the settings digest differs; else patch + 1. *round_out and *version_out may be NULL.
 *
 * Client statistics, for each entry of client_metrics: rounds_selected + 1, and + 1 to
 * rounds_succeeded if participated, rounds_rejected if rejected, else rounds_failed;
 * last_update_norm = update_norm if participated; quality_score = (succeeded + 1) /
 * (selected + 2) * 0.5^rejected; last_seen unchanged.
 *
 * Errors besides the common ones: TERN_ERR_NOT_FOUND for a client id in client_metrics that is
 * not registered; TERN_ERR_INVALID for a client listed twice, participated together with
 * rejected, a loss, accuracy or update norm that is not finite (or a negative norm or sample
 * count), or report_json that is not a JSON object, or a privacy charge out of range (an
 * empty subject, a client id that is not registered is TERN_ERR_NOT_FOUND). Nothing is
 * written on any error. */
tern_status tern_store_commit_round(tern_store *store, const tern_round_commit *commit,
                                    tern_round *round_out, tern_model_version *version_out,
                                    tern_error *err);
/* ---- privacy ledger ------------------------------------------------------------------------ */

/* The privacy ledger keeps, for each subject (a client id under client-side DP, or
 * TERN_PRIVACY_CENTRAL for the server's central-DP account), the composition history of the
 * subsampled Gaussian mechanisms it took part in: entries (noise multiplier, sample rate,
 * steps), an entry's steps growing when a later charge has the same noise multiplier and
 * sample rate (composition does not depend on the order). tern_store_commit_round adds a
 * round's charges in its own transaction, so the ledger and the committed rounds never
 * disagree, and a restarted server reads back what was spent. */
#define TERN_PRIVACY_CENTRAL "central"

typedef struct tern_privacy_charge {
    char subject[TERN_STORE_ID_SIZE]; /* a client id (registered) or TERN_PRIVACY_CENTRAL */
    double noise_multiplier;          /* > 0, finite */
    double sample_rate;               /* (0, 1] */
    int64_t steps;                    /* >= 0 */
} tern_privacy_charge;

/* What the ledger knows of a subject besides its history. */
typedef struct tern_privacy_account {
    int64_t rounds;                /* rounds that charged it */
    int64_t last_round;            /* the store round of the last charge; 0 = never charged */
    tern_privacy_charge last;      /* the last charge (zero when never charged) */
} tern_privacy_account;

/* The history of subject: *out (store allocator, release with tern_store_free; NULL when
 * *count is 0) receives its entries in the order they were first charged, *account (may be
 * NULL) the rest of the record. A subject never charged has an empty history (TERN_OK, count
 * 0, account zero). TERN_ERR_FORMAT for a malformed record. */
tern_status tern_store_privacy_history(tern_store *store, const char *subject,
                                       tern_privacy_charge **out, size_t *count,
                                       tern_privacy_account *account, tern_error *err);
/* Add charges to the ledger in a transaction of their own: for a round that failed after
 * clients had released updates (tern_store_commit_round does it for completed rounds). Errors
 * as for the charges of tern_store_commit_round. */
tern_status tern_store_privacy_charge(tern_store *store, int64_t round,
                                      const tern_privacy_charge *charges, size_t count,
                                      tern_error *err);

/* The server state last committed with tern_store_commit_round, copied into a buffer from the
 * store's allocator (release with tern_store_free) after checking its size and SHA-256 against
 * what was recorded (a mismatch is TERN_ERR_FORMAT, "corrupt"). TERN_ERR_NOT_FOUND when no
 * state was ever committed. */
tern_status tern_store_server_state_load(tern_store *store, void **bytes, size_t *len,
                                         tern_error *err);
/* All versions in ascending semantic-version order. */
tern_status tern_store_version_list(tern_store *store, tern_model_version **out, size_t *count,
                                    tern_error *err);
tern_status tern_store_version_get(tern_store *store, const char *version, tern_model_version *out,
                                   tern_error *err);
/* The current version; TERN_ERR_NOT_FOUND when the registry is empty. */
tern_status tern_store_version_current(tern_store *store, tern_model_version *out,
                                       tern_error *err);
/* Copy a version's blob (version NULL = current) into a new buffer from the store's allocator
 * (release with tern_store_free) after checking its SHA-256 and size: a mismatch is
 * TERN_ERR_FORMAT ("corrupt"), a pruned version TERN_ERR_NOT_FOUND. info (may be NULL)
 * receives the version record. */
tern_status tern_store_version_load(tern_store *store, const char *version, void **bytes,
                                    size_t *len, tern_model_version *info, tern_error *err);
/* Make another existing, not pruned version current (usually an earlier one; rolling forward
 * again is allowed); audited with the previous current version. New rounds still number from
 * the highest version. */
tern_status tern_store_version_rollback(tern_store *store, const char *version, const char *actor,
                                        tern_error *err);
/* Set (or, with "" / NULL, clear) a version's tag; audited. */
tern_status tern_store_version_tag(tern_store *store, const char *version, const char *tag,
                                   const char *actor, tern_error *err);
/* Retention: remove the blobs of every version except the keep_latest highest, the current
 * and tagged ones; their records stay, marked pruned. A blob still referenced by a kept
 * version or an image is kept. *pruned (may be NULL) receives the number of versions pruned.
 * Audited when anything is pruned. */
tern_status tern_store_version_prune(tern_store *store, size_t keep_latest, const char *actor,
                                     size_t *pruned, tern_error *err);

/* ---- audit log ---------------------------------------------------------------------------- */

typedef struct tern_audit_entry {
    int64_t seq;                    /* 1, 2, ... in commit order */
    int64_t at;
    char actor[TERN_STORE_NAME_SIZE];
    char action[TERN_STORE_NAME_SIZE];  /* "category.add", "version.rollback", ... */
    char target[TERN_STORE_NAME_SIZE];  /* id or version acted on */
    char detail[TERN_STORE_TEXT_SIZE];
} tern_audit_entry;

/* Entries with seq > after_seq, oldest first, at most max (0 = all). */
tern_status tern_store_audit_list(tern_store *store, int64_t after_seq, size_t max,
                                  tern_audit_entry **out, size_t *count, tern_error *err);

/* ---- operations --------------------------------------------------------------------------- */

/* Hot backup: a compacted copy of the whole store into dest_dir (created if missing; must not
 * hold a data.mdb). Runs in a read transaction, so writers continue meanwhile and the copy is
 * one consistent snapshot. */
tern_status tern_store_backup(tern_store *store, const char *dest_dir, tern_error *err);
/* Restore a backup: src_dir is opened read-only and checked (any problem refuses the restore
 * with TERN_ERR_FORMAT), then its contents replace dest_dir's data.mdb atomically (rename).
 * No process may have dest_dir open: another process holding it open is refused with
 * TERN_ERR_STATE (seen through LMDB's lock file); this process must not have it open either.
 * A missing backup (no data.mdb in src_dir) is TERN_ERR_NOT_FOUND. */
tern_status tern_store_restore(const char *src_dir, const char *dest_dir, tern_error *err);

/* Called once per problem found by tern_store_check; message is valid during the call. */
typedef void (*tern_store_report)(void *user, const char *message);
/* Integrity check in one read snapshot: every record decodes, indexes agree with records both
 * ways, references resolve (images to clients/categories/blobs, completed rounds to versions,
 * versions to blobs and rounds, the current pointer, round reports and the server state to
 * their rounds), every blob's SHA-256 matches its key and every blob is referenced, the server
 * state matches its recorded size and SHA-256 and every round report is a JSON object.
 * *problems receives the count (0 = healthy). Returns an error only when the check itself could
 * not run. report may be NULL. */
tern_status tern_store_check(tern_store *store, tern_store_report report, void *user,
                             size_t *problems, tern_error *err);

#ifdef __cplusplus
}
#endif

#endif
