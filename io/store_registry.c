/* Training rounds, the model registry and the federated server's records (round reports, client
 * statistics, server state).
 *
 * A round moves pending -> running -> aggregating -> completed (or to failed from any
 * non-terminal status); the rounds-by-status index is rewritten in the same transaction as the
 * record. Completing a round is tern_store_commit_round: round record, per-client metrics and
 * client statistics, model blob (keyed by its SHA-256, so identical models share one blob),
 * version record, current pointer, report and server state go into one LMDB write transaction,
 * which is what makes a killed server leave either the whole round or none of it;
 * tern_store_round_fail does the same for a failed round (without the registry). Version keys
 * are big-endian (major, minor, patch), so the versions database iterates in semantic-version
 * order and the highest is its last key. */
#include "store_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const status_names[] = {
    [TERN_ROUND_PENDING] = "pending",         [TERN_ROUND_RUNNING] = "running",
    [TERN_ROUND_AGGREGATING] = "aggregating", [TERN_ROUND_COMPLETED] = "completed",
    [TERN_ROUND_FAILED] = "failed",
};
#define STATUS_COUNT 5

const char *tern_round_status_name(tern_round_status status)
{
    return (unsigned)status < STATUS_COUNT ? status_names[status] : "?";
}

bool tern_round_transition_legal(tern_round_status from, tern_round_status to)
{
    if ((unsigned)from >= STATUS_COUNT || (unsigned)to >= STATUS_COUNT)
        return false;
    if (from == TERN_ROUND_COMPLETED || from == TERN_ROUND_FAILED)
        return false;
    return to == TERN_ROUND_FAILED || (int)to == (int)from + 1;
}

/* ---- encoding ----------------------------------------------------------------------------- */

static json_t *encode_round(const tern_round *r)
{
    return json_pack("{s:i, s:I, s:s, s:i, s:i, s:I, s:I, s:f, s:f, s:s, s:s}", "schema",
                     STORE_SCHEMA, "number", (json_int_t)r->number, "status",
                     tern_round_status_name(r->status), "clients_selected",
                     (int)r->clients_selected, "clients_participated",
                     (int)r->clients_participated, "started_at", (json_int_t)r->started_at,
                     "ended_at", (json_int_t)r->ended_at, "global_accuracy", r->global_accuracy,
                     "global_loss", r->global_loss, "model_version", r->model_version, "reason",
                     r->reason);
}

tern_status st_decode_round(const MDB_val *v, tern_round *out, tern_error *err)
{
    json_t *root;
    tern_status st = st_parse(v, "round", &root, err);
    if (st)
        return st;
    const char *status, *version, *reason = ""; /* rounds written before reasons: none */
    json_int_t number, started, ended;
    int selected, participated;
    double acc, loss;
    json_error_t jerr;
    tern_round r = {0};
    if (json_unpack_ex(root, &jerr, 0, "{s:I, s:s, s:i, s:i, s:I, s:I, s:F, s:F, s:s, s?s}",
                       "number", &number, "status", &status, "clients_selected", &selected,
                       "clients_participated", &participated, "started_at", &started,
                       "ended_at", &ended, "global_accuracy", &acc, "global_loss", &loss,
                       "model_version", &version, "reason", &reason) != 0) {
        json_decref(root);
        return tern_set_error(err, TERN_ERR_FORMAT, "round record: %s", jerr.text);
    }
    int s = 0;
    while (s < STATUS_COUNT && strcmp(status_names[s], status) != 0)
        s++;
    if (s == STATUS_COUNT || !st_copy(r.model_version, sizeof r.model_version, version) ||
        !st_copy(r.reason, sizeof r.reason, reason)) {
        json_decref(root);
        return tern_set_error(err, TERN_ERR_FORMAT,
                              "round record %lld: bad status, version or reason",
                              (long long)number);
    }
    r.number = number;
    r.status = (tern_round_status)s;
    r.clients_selected = selected;
    r.clients_participated = participated;
    r.started_at = started;
    r.ended_at = ended;
    r.global_accuracy = acc;
    r.global_loss = loss;
    json_decref(root);
    *out = r;
    return TERN_OK;
}

static json_t *encode_metrics(const tern_client_metrics *m)
{
    return json_pack("{s:i, s:s, s:b, s:I, s:f, s:f, s:b, s:f}", "schema", STORE_SCHEMA,
                     "client_id", m->client_id, "participated", (int)m->participated,
                     "num_samples", (json_int_t)m->num_samples, "loss", m->loss, "accuracy",
                     m->accuracy, "rejected", (int)m->rejected, "update_norm", m->update_norm);
}

tern_status st_decode_client_metrics(const MDB_val *v, tern_client_metrics *out,
                                     tern_error *err)
{
    json_t *root;
    tern_status st = st_parse(v, "client metrics", &root, err);
    if (st)
        return st;
    const char *id;
    int participated, rejected = 0; /* the last two fields came later: absent reads as 0 */
    json_int_t n;
    double loss, acc, norm = 0;
    json_error_t jerr;
    tern_client_metrics m = {0};
    if (json_unpack_ex(root, &jerr, 0, "{s:s, s:b, s:I, s:F, s:F, s?b, s?F}", "client_id", &id,
                       "participated", &participated, "num_samples", &n, "loss", &loss,
                       "accuracy", &acc, "rejected", &rejected, "update_norm", &norm) != 0 ||
        !st_copy(m.client_id, sizeof m.client_id, id)) {
        json_decref(root);
        return tern_set_error(err, TERN_ERR_FORMAT, "client metrics record is malformed");
    }
    m.participated = participated;
    m.num_samples = n;
    m.loss = loss;
    m.accuracy = acc;
    m.rejected = rejected;
    m.update_norm = norm;
    json_decref(root);
    *out = m;
    return TERN_OK;
}

static json_t *encode_version(const tern_model_version *m)
{
    return json_pack("{s:i, s:s, s:i, s:i, s:i, s:I, s:s, s:I, s:s, s:f, s:I, s:s, s:s, s:s, "
                     "s:s, s:b}",
                     "schema", STORE_SCHEMA, "version", m->version, "major", (int)m->major,
                     "minor", (int)m->minor, "patch", (int)m->patch, "round",
                     (json_int_t)m->round, "blob_key", m->blob_key, "size", (json_int_t)m->size,
                     "sha256", m->sha256, "accuracy", m->accuracy, "created_at",
                     (json_int_t)m->created_at, "notes", m->notes, "tag", m->tag,
                     "settings_sha256", m->settings_sha256, "classes_sha256",
                     m->classes_sha256, "pruned", (int)m->pruned);
}

tern_status st_decode_version(const MDB_val *v, tern_model_version *out, tern_error *err)
{
    json_t *root;
    tern_status st = st_parse(v, "model version", &root, err);
    if (st)
        return st;
    const char *version, *blob, *sha, *notes, *tag, *ssha, *csha;
    int major, minor, patch, pruned;
    json_int_t round, size, created;
    double acc;
    json_error_t jerr;
    tern_model_version m = {0};
    if (json_unpack_ex(root, &jerr, 0,
                       "{s:s, s:i, s:i, s:i, s:I, s:s, s:I, s:s, s:F, s:I, s:s, s:s, s:s, s:s, "
                       "s:b}",
                       "version", &version, "major", &major, "minor", &minor, "patch", &patch,
                       "round", &round, "blob_key", &blob, "size", &size, "sha256", &sha,
                       "accuracy", &acc, "created_at", &created, "notes", &notes, "tag", &tag,
                       "settings_sha256", &ssha, "classes_sha256", &csha, "pruned",
                       &pruned) != 0) {
        json_decref(root);
        return tern_set_error(err, TERN_ERR_FORMAT, "model version record: %s", jerr.text);
    }
    if (!st_copy(m.version, sizeof m.version, version) ||
        !st_copy(m.blob_key, sizeof m.blob_key, blob) || !st_copy(m.sha256, sizeof m.sha256, sha) ||
        !st_copy(m.notes, sizeof m.notes, notes) || !st_copy(m.tag, sizeof m.tag, tag) ||
        !st_copy(m.settings_sha256, sizeof m.settings_sha256, ssha) ||
        !st_copy(m.classes_sha256, sizeof m.classes_sha256, csha) || size < 0) {
        json_decref(root);
        return tern_set_error(err, TERN_ERR_FORMAT, "model version record '%s' is malformed",
                              version);
    }
    m.major = major;
    m.minor = minor;
    m.patch = patch;
    m.round = round;
    m.size = (uint64_t)size;
    m.accuracy = acc;
    m.created_at = created;
    m.pruned = pruned;
    json_decref(root);
    *out = m;
    return TERN_OK;
}

bool st_parse_version(const char *s, int32_t *major, int32_t *minor, int32_t *patch)
{
    long v[3];
    const char *p = s;
    for (int i = 0; i < 3; i++) {
        if (*p < '0' || *p > '9')
            return false;
        char *end;
        v[i] = strtol(p, &end, 10);
        if (v[i] < 0 || v[i] > INT32_MAX || *end != (i < 2 ? '.' : '\0'))
            return false;
        p = end + (i < 2);
    }
    *major = (int32_t)v[0];
    *minor = (int32_t)v[1];
    *patch = (int32_t)v[2];
    return true;
}

void st_version_key(unsigned char key[12], int32_t major, int32_t minor, int32_t patch)
{
    st_be32(key, (uint32_t)major);
    st_be32(key + 4, (uint32_t)minor);
    st_be32(key + 8, (uint32_t)patch);
}

/* ---- rounds ------------------------------------------------------------------------------- */

static void status_key(unsigned char key[9], tern_round_status s, int64_t number)
{
    key[0] = (unsigned char)s;
    st_be64(key + 1, (uint64_t)number);
}

static tern_status load_round(st_txn *t, int64_t number, tern_round *out)
{
    unsigned char key[8];
    st_be64(key, (uint64_t)number);
    MDB_val v;
    tern_status st = number > 0 ? st_get(t, DB_ROUNDS, key, 8, &v) : TERN_ERR_NOT_FOUND;
    if (st == TERN_ERR_NOT_FOUND)
        return tern_set_error(t->err, st, "no round %lld", (long long)number);
    return st ? st : st_decode_round(&v, out, t->err);
}

/* Write r, moving its status index entry from old_status (negative: none). */
static tern_status save_round(st_txn *t, const tern_round *r, int old_status)
{
    unsigned char key[8], skey[9];
    st_be64(key, (uint64_t)r->number);
    tern_status st;
    if (old_status >= 0 && old_status != (int)r->status) {
        status_key(skey, (tern_round_status)old_status, r->number);
        if ((st = st_del(t, DB_ROUND_BY_STATUS, skey, 9)) && st != TERN_ERR_NOT_FOUND)
            return st;
    }
    status_key(skey, r->status, r->number);
    if ((st = st_put(t, DB_ROUND_BY_STATUS, skey, 9, "", 0, 0)))
        return st;
    return st_put_json(t, DB_ROUNDS, key, 8, encode_round(r));
}

static tern_status next_round_number(st_txn *t, int64_t *number)
{
    MDB_val k;
    tern_status st = st_last_key(t, DB_ROUNDS, &k);
    if (st == TERN_ERR_NOT_FOUND) {
        *number = 1;
        return TERN_OK;
    }
    if (st)
        return st;
    *number = (int64_t)st_rd_be64(k.mv_data) + 1;
    return TERN_OK;
}

/* ---- what a finished round records for the federated server ------------------------------- */

void st_report_key(unsigned char key[META_REPORT_KEY_SIZE], int64_t number)
{
    memcpy(key, META_REPORT, META_REPORT_KEY_SIZE - 8);
    st_be64(key + META_REPORT_KEY_SIZE - 8, (uint64_t)number);
}

tern_status st_decode_state_info(const MDB_val *v, st_state_info *out, tern_error *err)
{
    json_t *root;
    tern_status st = st_parse(v, "server state info", &root, err);
    if (st)
        return st;
    const char *sha;
    json_int_t size, round, saved;
    json_error_t jerr;
    st_state_info info = {0};
    if (json_unpack_ex(root, &jerr, 0, "{s:I, s:s, s:I, s:I}", "size", &size, "sha256", &sha,
                       "round", &round, "saved_at", &saved) != 0 ||
        size < 0 || !st_copy(info.sha256, sizeof info.sha256, sha)) {
        json_decref(root);
        return tern_set_error(err, TERN_ERR_FORMAT, "server state info record is malformed");
    }
    info.size = (uint64_t)size;
    info.round = round;
    info.saved_at = saved;
    json_decref(root);
    *out = info;
    return TERN_OK;
}

/* Client metrics are checked before any transaction starts. */
static tern_status check_metrics(const tern_client_metrics *m, size_t count, tern_error *err)
{
    for (size_t i = 0; i < count; i++) {
        tern_status st = st_check_text(err, "client metrics client_id", m[i].client_id,
                                       TERN_STORE_ID_SIZE, true);
        if (st)
            return st;
        if (!isfinite(m[i].loss) || !isfinite(m[i].accuracy) || m[i].num_samples < 0)
            return tern_set_error(err, TERN_ERR_INVALID,
                                  "client metrics for %s: loss and accuracy must be finite, "
                                  "samples non-negative",
                                  m[i].client_id);
        if (!isfinite(m[i].update_norm) || m[i].update_norm < 0)
            return tern_set_error(err, TERN_ERR_INVALID,
                                  "client metrics for %s: update_norm must be finite and "
                                  "non-negative",
                                  m[i].client_id);
        if (m[i].participated && m[i].rejected)
            return tern_set_error(err, TERN_ERR_INVALID,
                                  "client metrics for %s: a client cannot both participate and "
                                  "be rejected",
                                  m[i].client_id);
    }
    return TERN_OK;
}

/* A report must be a JSON object (NULL: no report). */
static tern_status check_report(const char *json, tern_error *err)
{
    if (!json)
        return TERN_OK;
    json_error_t jerr;
    json_t *root = json_loads(json, 0, &jerr);
    if (!root && json_error_code(&jerr) == json_error_out_of_memory)
        return tern_set_error(err, TERN_ERR_NOMEM, "out of memory checking the round report");
    if (!root)
        return tern_set_error(err, TERN_ERR_INVALID,
                              "round report is not valid JSON: %s (line %d, column %d)",
                              jerr.text, jerr.line, jerr.column);
    bool object = json_is_object(root);
    json_decref(root);
    if (!object)
        return tern_set_error(err, TERN_ERR_INVALID, "round report must be a JSON object");
    return TERN_OK;
}

/* Per-client metrics rows of round `number` and the statistics of each client. */
static tern_status record_clients(st_txn *t, int64_t number, const tern_client_metrics *m,
                                  size_t count)
{
    for (size_t i = 0; i < count; i++) {
        unsigned char key[8 + TERN_STORE_ID_SIZE];
        size_t idlen = strlen(m[i].client_id);
        st_be64(key, (uint64_t)number);
        memcpy(key + 8, m[i].client_id, idlen);
        MDB_val v;
        tern_status st = st_get(t, DB_ROUND_CLIENTS, key, 8 + idlen, &v);
        if (st == TERN_OK)
            return tern_set_error(t->err, TERN_ERR_INVALID,
                                  "round %lld: client %s appears twice in the client metrics",
                                  (long long)number, m[i].client_id);
        if (st != TERN_ERR_NOT_FOUND)
            return st;
        if ((st = st_client_record_round(t, number, &m[i])) ||
            (st = st_put_json(t, DB_ROUND_CLIENTS, key, 8 + idlen, encode_metrics(&m[i]))))
            return st;
    }
    return TERN_OK;
}

static tern_status put_report(st_txn *t, int64_t number, const char *json)
{
    if (!json)
        return TERN_OK;
    unsigned char key[META_REPORT_KEY_SIZE];
    st_report_key(key, number);
    return st_put(t, DB_META, key, sizeof key, json, strlen(json), 0);
}

/* Replace the server state: the bytes, and beside them what they must hash to. */
static tern_status put_server_state(st_txn *t, int64_t round, const void *bytes, size_t len,
                                    const char *sha)
{
    tern_status st =
        st_put(t, DB_META, META_SERVER_STATE, strlen(META_SERVER_STATE), bytes, len, 0);
    if (st)
        return st;
    return st_put_json(t, DB_META, META_SERVER_STATE_INFO, strlen(META_SERVER_STATE_INFO),
                       json_pack("{s:i, s:I, s:s, s:I, s:I}", "schema", STORE_SCHEMA, "size",
                                 (json_int_t)len, "sha256", sha, "round", (json_int_t)round,
                                 "saved_at", (json_int_t)st_now(t->s)));
}

typedef struct {
    int32_t selected;
    tern_round rec;
} round_create_ctx;

static tern_status round_create_fn(st_txn *t, void *p)
{
    round_create_ctx *c = p;
    tern_round *r = &c->rec;
    memset(r, 0, sizeof *r);
    tern_status st = next_round_number(t, &r->number);
    if (st)
        return st;
    r->status = TERN_ROUND_PENDING;
    r->clients_selected = c->selected;
    return save_round(t, r, -1);
}

tern_status tern_store_round_create(tern_store *store, int32_t clients_selected, tern_round *out,
                                    tern_error *err)
{
    if (!store)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_round_create: NULL argument");
    if (clients_selected < 0)
        return tern_set_error(err, TERN_ERR_INVALID, "clients_selected is negative");
    round_create_ctx c = {.selected = clients_selected};
    tern_status st = st_write(store, round_create_fn, &c, err);
    if (st == TERN_OK && out)
        *out = c.rec;
    return st;
}

typedef struct {
    int64_t number;
    tern_round_status to;
} round_status_ctx;

static tern_status round_status_fn(st_txn *t, void *p)
{
    round_status_ctx *c = p;
    tern_round r;
    tern_status st = load_round(t, c->number, &r);
    if (st)
        return st;
    if (!tern_round_transition_legal(r.status, c->to))
        return tern_set_error(t->err, TERN_ERR_INVALID,
                              "round %lld: illegal status transition %s -> %s (legal: pending -> "
                              "running -> aggregating -> completed, or non-terminal -> failed)",
                              (long long)r.number, tern_round_status_name(r.status),
                              tern_round_status_name(c->to));
    if (c->to == TERN_ROUND_COMPLETED)
        return tern_set_error(t->err, TERN_ERR_INVALID,
                              "round %lld: a round is completed by tern_store_commit_round, "
                              "which also records its model version",
                              (long long)r.number);
    int old = (int)r.status;
    r.status = c->to;
    if (c->to == TERN_ROUND_RUNNING)
        r.started_at = st_now(t->s);
    if (c->to == TERN_ROUND_FAILED)
        r.ended_at = st_now(t->s);
    return save_round(t, &r, old);
}

tern_status tern_store_round_set_status(tern_store *store, int64_t number,
                                        tern_round_status status, tern_error *err)
{
    if (!store)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_round_set_status: NULL argument");
    if ((unsigned)status >= STATUS_COUNT)
        return tern_set_error(err, TERN_ERR_INVALID, "round status %d is not a status", (int)status);
    return st_write(store, round_status_fn, &(round_status_ctx){.number = number, .to = status},
                    err);
}

typedef struct {
    int64_t number;
    const char *reason, *report;
    const tern_client_metrics *metrics;
    size_t count;
} round_fail_ctx;

static tern_status round_fail_fn(st_txn *t, void *p)
{
    round_fail_ctx *c = p;
    tern_round r;
    tern_status st = load_round(t, c->number, &r);
    if (st)
        return st;
    if (!tern_round_transition_legal(r.status, TERN_ROUND_FAILED))
        return tern_set_error(t->err, TERN_ERR_INVALID,
                              "round %lld: illegal status transition %s -> failed (only a "
                              "pending, running or aggregating round can fail)",
                              (long long)r.number, tern_round_status_name(r.status));
    int old = (int)r.status;
    r.status = TERN_ROUND_FAILED;
    r.ended_at = st_now(t->s);
    strcpy(r.reason, c->reason);
    if (c->count) {
        int32_t participated = 0;
        for (size_t i = 0; i < c->count; i++)
            participated += c->metrics[i].participated;
        r.clients_participated = participated;
    }
    if ((st = save_round(t, &r, old)) || (st = record_clients(t, r.number, c->metrics, c->count)))
        return st;
    return put_report(t, r.number, c->report);
}

tern_status tern_store_round_fail(tern_store *store, int64_t number, const char *reason,
                                  const tern_client_metrics *metrics, size_t count,
                                  const char *report_json, tern_error *err)
{
    if (!store || (!metrics && count))
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_round_fail: NULL argument");
    if (count > INT32_MAX)
        return tern_set_error(err, TERN_ERR_INVALID, "round %lld: %zu client metrics is too many",
                              (long long)number, count);
    tern_status st;
    if ((st = st_check_text(err, "round failure reason", reason, TERN_STORE_TEXT_SIZE, true)) ||
        (st = check_metrics(metrics, count, err)) || (st = check_report(report_json, err)))
        return st;
    return st_write(store, round_fail_fn,
                    &(round_fail_ctx){.number = number, .reason = reason, .report = report_json,
                                      .metrics = metrics, .count = count},
                    err);
}

tern_status tern_store_round_latest(tern_store *store, tern_round *out, tern_error *err)
{
    if (!store || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_round_latest: NULL argument");
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    MDB_val k;
    st = st_last_key(&t, DB_ROUNDS, &k);
    if (st == TERN_ERR_NOT_FOUND)
        tern_set_error(err, st, "the store has no rounds yet");
    else if (st == TERN_OK && k.mv_size != 8)
        st = tern_set_error(err, TERN_ERR_FORMAT, "the last round has a malformed key");
    else if (st == TERN_OK)
        st = load_round(&t, (int64_t)st_rd_be64(k.mv_data), out);
    st_read_end(&t);
    return st;
}

tern_status tern_store_round_report(tern_store *store, int64_t number, char **json,
                                    tern_error *err)
{
    if (!store || !json)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_round_report: NULL argument");
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    tern_round r;
    unsigned char key[META_REPORT_KEY_SIZE];
    MDB_val v;
    st_report_key(key, number);
    if ((st = load_round(&t, number, &r)))
        goto done;
    st = st_get(&t, DB_META, key, sizeof key, &v);
    if (st == TERN_ERR_NOT_FOUND)
        tern_set_error(err, st, "round %lld has no report", (long long)number);
    if (st)
        goto done;
    char *copy = tern_alloc(st_alloc(store), v.mv_size + 1);
    if (!copy) {
        st = tern_set_error(err, TERN_ERR_NOMEM, "out of memory loading the report of round %lld "
                            "(%zu bytes)", (long long)number, v.mv_size);
        goto done;
    }
    memcpy(copy, v.mv_data, v.mv_size);
    copy[v.mv_size] = '\0';
    *json = copy;
done:
    st_read_end(&t);
    return st;
}

tern_status tern_store_round_get(tern_store *store, int64_t number, tern_round *out,
                                 tern_error *err)
{
    if (!store || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_round_get: NULL argument");
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    st = load_round(&t, number, out);
    st_read_end(&t);
    return st;
}

tern_status tern_store_round_list_by_status(tern_store *store, tern_round_status status,
                                            tern_round **out, size_t *count, tern_error *err)
{
    if (!store || !out || !count)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_round_list_by_status: NULL argument");
    if ((unsigned)status >= STATUS_COUNT)
        return tern_set_error(err, TERN_ERR_INVALID, "round status %d is not a status", (int)status);
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    st_vec vec = {.elem = sizeof(tern_round)};
    MDB_cursor *cur = NULL;
    if ((st = st_cursor(&t, DB_ROUND_BY_STATUS, &cur)))
        goto done;
    unsigned char kb[9];
    status_key(kb, status, 0);
    MDB_val k = {9, kb}, v;
    for (int rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
         rc == 0 && k.mv_size == 9 && ((unsigned char *)k.mv_data)[0] == (unsigned char)status;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        tern_round *slot = st_vec_push(store, &vec);
        if (!slot) {
            st = tern_set_error(err, TERN_ERR_NOMEM, "out of memory listing rounds");
            goto done;
        }
        if ((st = load_round(&t, (int64_t)st_rd_be64((unsigned char *)k.mv_data + 1), slot)))
            goto done;
    }
done:
    if ((st = st_list_end(store, &t, cur, &vec, st)) == TERN_OK) {
        *out = vec.data;
        *count = vec.count;
    }
    return st;
}

tern_status tern_store_round_client_metrics(tern_store *store, int64_t number,
                                            tern_client_metrics **out, size_t *count,
                                            tern_error *err)
{
    if (!store || !out || !count)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_round_client_metrics: NULL argument");
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    st_vec vec = {.elem = sizeof(tern_client_metrics)};
    MDB_cursor *cur = NULL;
    tern_round r;
    if ((st = load_round(&t, number, &r)) || (st = st_cursor(&t, DB_ROUND_CLIENTS, &cur)))
        goto done;
    unsigned char kb[8];
    st_be64(kb, (uint64_t)number);
    MDB_val k = {8, kb}, v;
    for (int rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
         rc == 0 && k.mv_size > 8 && memcmp(k.mv_data, kb, 8) == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        tern_client_metrics *slot = st_vec_push(store, &vec);
        if (!slot) {
            st = tern_set_error(err, TERN_ERR_NOMEM, "out of memory listing client metrics");
            goto done;
        }
        if ((st = st_decode_client_metrics(&v, slot, err)))
            goto done;
    }
done:
    if ((st = st_list_end(store, &t, cur, &vec, st)) == TERN_OK) {
        *out = vec.data;
        *count = vec.count;
    }
    return st;
}

/* ---- versions ----------------------------------------------------------------------------- */

/* Version by its text; INVALID for malformed text, NOT_FOUND naming it. */
static tern_status load_version(st_txn *t, const char *version, tern_model_version *out)
{
    int32_t a, b, c;
    if (!st_parse_version(version, &a, &b, &c))
        return tern_set_error(t->err, TERN_ERR_INVALID,
                              "'%s' is not a model version (expected major.minor.patch)", version);
    unsigned char key[12];
    st_version_key(key, a, b, c);
    MDB_val v;
    tern_status st = st_get(t, DB_VERSIONS, key, 12, &v);
    if (st == TERN_ERR_NOT_FOUND)
        return tern_set_error(t->err, st, "no model version %s", version);
    return st ? st : st_decode_version(&v, out, t->err);
}

static tern_status save_version(st_txn *t, const tern_model_version *m, unsigned flags)
{
    unsigned char key[12];
    st_version_key(key, m->major, m->minor, m->patch);
    json_t *obj = encode_version(m);
    if (!obj)
        return tern_set_error(t->err, TERN_ERR_NOMEM, "encoding model version %s", m->version);
    char *text = json_dumps(obj, JSON_COMPACT);
    json_decref(obj);
    if (!text)
        return tern_set_error(t->err, TERN_ERR_NOMEM, "encoding model version %s", m->version);
    tern_status st = st_put(t, DB_VERSIONS, key, 12, text, strlen(text), flags);
    free(text);
    return st;
}

static tern_status load_current(st_txn *t, tern_model_version *out)
{
    MDB_val v;
    tern_status st = st_get(t, DB_META, "current", 7, &v);
    if (st == TERN_ERR_NOT_FOUND)
        return tern_set_error(t->err, st, "the registry has no current model version yet");
    if (st)
        return st;
    if (v.mv_size != 12)
        return tern_set_error(t->err, TERN_ERR_FORMAT, "current version pointer is malformed");
    char text[TERN_STORE_VERSION_SIZE];
    const unsigned char *k = v.mv_data;
    snprintf(text, sizeof text, "%u.%u.%u", st_rd_be32(k), st_rd_be32(k + 4), st_rd_be32(k + 8));
    return load_version(t, text, out);
}

static tern_status set_current(st_txn *t, const tern_model_version *m)
{
    unsigned char key[12];
    st_version_key(key, m->major, m->minor, m->patch);
    return st_put(t, DB_META, "current", 7, key, 12, 0);
}

typedef struct {
    const tern_round_commit *c;
    char sha[TERN_STORE_SHA256_SIZE], settings_sha[TERN_STORE_SHA256_SIZE],
        classes_sha[TERN_STORE_SHA256_SIZE], state_sha[TERN_STORE_SHA256_SIZE];
    tern_round round;
    tern_model_version version;
} commit_ctx;

static tern_status commit_fn(st_txn *t, void *p)
{
    commit_ctx *x = p;
    const tern_round_commit *c = x->c;
    tern_round *r = &x->round;
    tern_model_version *m = &x->version;
    int64_t now = st_now(t->s);
    int old_status = -1;
    tern_status st;

    memset(r, 0, sizeof *r);
    if (c->round == 0) {
        if ((st = next_round_number(t, &r->number)))
            return st;
        r->clients_selected = c->clients_selected;
        r->clients_participated = c->clients_participated;
        r->started_at = now;
    } else {
        if ((st = load_round(t, c->round, r)))
            return st;
        if (r->status != TERN_ROUND_AGGREGATING)
            return tern_set_error(t->err, TERN_ERR_INVALID,
                                  "round %lld: illegal status transition %s -> completed (only an "
                                  "aggregating round can be completed)",
                                  (long long)r->number, tern_round_status_name(r->status));
        old_status = (int)r->status;
        r->clients_participated = c->clients_participated;
    }
    if (c->client_metrics_count) {
        /* The per-client records are the authority, as in tern_store_round_fail. */
        int32_t participated = 0;
        for (size_t i = 0; i < c->client_metrics_count; i++)
            participated += c->client_metrics[i].participated;
        r->clients_participated = participated;
    }

    /* The next version number follows the highest existing version. */
    memset(m, 0, sizeof *m);
    MDB_val k, v;
    st = st_last_key(t, DB_VERSIONS, &k);
    if (st == TERN_ERR_NOT_FOUND) {
        m->major = 1;
    } else if (st) {
        return st;
    } else {
        tern_model_version prev;
        if ((st = st_get(t, DB_VERSIONS, k.mv_data, k.mv_size, &v)) ||
            (st = st_decode_version(&v, &prev, t->err)))
            return st;
        if (strcmp(prev.classes_sha256, x->classes_sha) != 0) {
            m->major = prev.major + 1;
        } else if (strcmp(prev.settings_sha256, x->settings_sha) != 0) {
            m->major = prev.major;
            m->minor = prev.minor + 1;
        } else {
            m->major = prev.major;
            m->minor = prev.minor;
            m->patch = prev.patch + 1;
        }
    }
    snprintf(m->version, sizeof m->version, "%d.%d.%d", (int)m->major, (int)m->minor,
             (int)m->patch);
    m->round = r->number;
    strcpy(m->blob_key, x->sha);
    strcpy(m->sha256, x->sha);
    m->size = c->model_size;
    m->accuracy = c->global_accuracy;
    m->created_at = now;
    strcpy(m->notes, c->notes ? c->notes : "");
    strcpy(m->settings_sha256, x->settings_sha);
    strcpy(m->classes_sha256, x->classes_sha);

    st = st_put(t, DB_BLOBS, x->sha, 64, c->model, c->model_size, MDB_NOOVERWRITE);
    if (st && t->mdb_rc != MDB_KEYEXIST)
        return st;
    if ((st = save_version(t, m, MDB_NOOVERWRITE)) || (st = set_current(t, m)))
        return st;

    r->status = TERN_ROUND_COMPLETED;
    r->ended_at = now;
    r->global_accuracy = c->global_accuracy;
    r->global_loss = c->global_loss;
    strcpy(r->model_version, m->version);
    if ((st = save_round(t, r, old_status)) ||
        (st = record_clients(t, r->number, c->client_metrics, c->client_metrics_count)) ||
        (st = put_report(t, r->number, c->report_json)) ||
        (st = st_privacy_add(t, r->number, c->privacy, c->privacy_count)))
        return st;
    if (c->server_state_size)
        return put_server_state(t, r->number, c->server_state, c->server_state_size, x->state_sha);
    return TERN_OK;
}

tern_status tern_store_commit_round(tern_store *store, const tern_round_commit *commit,
                                    tern_round *round_out, tern_model_version *version_out,
                                    tern_error *err)
{
    if (!store || !commit || (!commit->model && commit->model_size) ||
        (!commit->client_metrics && commit->client_metrics_count) ||
        (!commit->server_state && commit->server_state_size) ||
        (!commit->privacy && commit->privacy_count))
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_commit_round: NULL argument");
    if (commit->model_size == 0)
        return tern_set_error(err, TERN_ERR_INVALID, "commit_round: the model is empty");
    if (commit->round < 0 || commit->clients_selected < 0 || commit->clients_participated < 0)
        return tern_set_error(err, TERN_ERR_INVALID, "commit_round: negative round or client count");
    if (!isfinite(commit->global_accuracy) || !isfinite(commit->global_loss))
        return tern_set_error(err, TERN_ERR_INVALID,
                              "commit_round: global accuracy and loss must be finite");
    tern_status st;
    if ((st = st_check_text(err, "version notes", commit->notes, TERN_STORE_TEXT_SIZE, false)) ||
        (st = check_metrics(commit->client_metrics, commit->client_metrics_count, err)) ||
        (st = check_report(commit->report_json, err)) ||
        (st = st_privacy_check(commit->privacy, commit->privacy_count, err)))
        return st;
    commit_ctx x = {.c = commit};
    const char *settings = commit->settings ? commit->settings : "";
    const char *classes = commit->classes ? commit->classes : "";
    if (commit->model_sha256)
        st_sha256_to_hex(commit->model_sha256, x.sha);
    if ((!commit->model_sha256 && (st = st_sha256_hex(commit->model, commit->model_size, x.sha,
                                                      err))) ||
        (st = st_sha256_hex(settings, strlen(settings), x.settings_sha, err)) ||
        (st = st_sha256_hex(classes, strlen(classes), x.classes_sha, err)) ||
        (commit->server_state_size &&
         (st = st_sha256_hex(commit->server_state, commit->server_state_size, x.state_sha, err))))
        return st;
    if ((st = st_write(store, commit_fn, &x, err)))
        return st;
    if (round_out)
        *round_out = x.round;
    if (version_out)
        *version_out = x.version;
    return TERN_OK;
}

tern_status tern_store_server_state_load(tern_store *store, void **bytes, size_t *len,
                                         tern_error *err)
{
    if (!store || !bytes || !len)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_server_state_load: NULL argument");
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    MDB_val iv, v;
    st_state_info info;
    char sha[TERN_STORE_SHA256_SIZE];
    st = st_get(&t, DB_META, META_SERVER_STATE_INFO, strlen(META_SERVER_STATE_INFO), &iv);
    if (st == TERN_ERR_NOT_FOUND)
        tern_set_error(err, st, "no server state has been committed yet");
    if (st || (st = st_decode_state_info(&iv, &info, err)))
        goto done;
    st = st_get(&t, DB_META, META_SERVER_STATE, strlen(META_SERVER_STATE), &v);
    if (st == TERN_ERR_NOT_FOUND)
        st = tern_set_error(err, TERN_ERR_FORMAT,
                            "the server state of round %lld is missing (only its record is there)",
                            (long long)info.round);
    if (st || (st = st_sha256_hex(v.mv_data, v.mv_size, sha, err)))
        goto done;
    if (v.mv_size != info.size || strcmp(sha, info.sha256) != 0) {
        st = tern_set_error(err, TERN_ERR_FORMAT,
                            "the server state of round %lld is corrupt: %zu bytes with sha256 %s, "
                            "expected %llu bytes with sha256 %s",
                            (long long)info.round, v.mv_size, sha, (unsigned long long)info.size,
                            info.sha256);
        goto done;
    }
    void *copy = tern_alloc(st_alloc(store), v.mv_size ? v.mv_size : 1);
    if (!copy) {
        st = tern_set_error(err, TERN_ERR_NOMEM,
                            "out of memory loading the server state (%zu bytes)", v.mv_size);
        goto done;
    }
    memcpy(copy, v.mv_data, v.mv_size);
    *bytes = copy;
    *len = v.mv_size;
done:
    st_read_end(&t);
    return st;
}

tern_status tern_store_version_list(tern_store *store, tern_model_version **out, size_t *count,
                                    tern_error *err)
{
    if (!store || !out || !count)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_version_list: NULL argument");
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    st_vec vec = {.elem = sizeof(tern_model_version)};
    MDB_cursor *cur = NULL;
    if ((st = st_cursor(&t, DB_VERSIONS, &cur)))
        goto done;
    MDB_val k, v;
    for (int rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        tern_model_version *slot = st_vec_push(store, &vec);
        if (!slot) {
            st = tern_set_error(err, TERN_ERR_NOMEM, "out of memory listing versions");
            goto done;
        }
        if ((st = st_decode_version(&v, slot, err)))
            goto done;
    }
done:
    if ((st = st_list_end(store, &t, cur, &vec, st)) == TERN_OK) {
        *out = vec.data;
        *count = vec.count;
    }
    return st;
}

tern_status tern_store_version_get(tern_store *store, const char *version, tern_model_version *out,
                                   tern_error *err)
{
    if (!store || !version || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_version_get: NULL argument");
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    st = load_version(&t, version, out);
    st_read_end(&t);
    return st;
}

tern_status tern_store_version_current(tern_store *store, tern_model_version *out,
                                       tern_error *err)
{
    if (!store || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_version_current: NULL argument");
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    st = load_current(&t, out);
    st_read_end(&t);
    return st;
}

tern_status tern_store_version_load(tern_store *store, const char *version, void **bytes,
                                    size_t *len, tern_model_version *info, tern_error *err)
{
    if (!store || !bytes || !len)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_version_load: NULL argument");
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    tern_model_version m;
    MDB_val v;
    void *copy = NULL;
    char sha[TERN_STORE_SHA256_SIZE];
    if ((st = version ? load_version(&t, version, &m) : load_current(&t, &m)))
        goto done;
    if (m.pruned) {
        st = tern_set_error(err, TERN_ERR_NOT_FOUND,
                            "model version %s was pruned by retention; its blob is gone",
                            m.version);
        goto done;
    }
    st = st_get(&t, DB_BLOBS, m.blob_key, strlen(m.blob_key), &v);
    if (st == TERN_ERR_NOT_FOUND)
        tern_set_error(err, TERN_ERR_FORMAT, "model version %s: blob %s is missing", m.version,
                       m.blob_key);
    if (st) {
        st = st == TERN_ERR_NOT_FOUND ? TERN_ERR_FORMAT : st;
        goto done;
    }
    if ((st = st_sha256_hex(v.mv_data, v.mv_size, sha, err)))
        goto done;
    if (v.mv_size != m.size || strcmp(sha, m.sha256) != 0) {
        st = tern_set_error(err, TERN_ERR_FORMAT,
                            "model version %s is corrupt: blob has %zu bytes with sha256 %s, "
                            "expected %llu bytes with sha256 %s",
                            m.version, v.mv_size, sha, (unsigned long long)m.size, m.sha256);
        goto done;
    }
    copy = tern_alloc(st_alloc(store), v.mv_size);
    if (!copy) {
        st = tern_set_error(err, TERN_ERR_NOMEM, "out of memory loading model version %s (%zu bytes)",
                            m.version, v.mv_size);
        goto done;
    }
    memcpy(copy, v.mv_data, v.mv_size);
    *bytes = copy;
    *len = v.mv_size;
    if (info)
        *info = m;
done:
    st_read_end(&t);
    return st;
}

typedef struct {
    const char *version, *tag, *actor;
} version_edit_ctx;

static tern_status rollback_fn(st_txn *t, void *p)
{
    version_edit_ctx *c = p;
    tern_model_version target, cur;
    tern_status st = load_version(t, c->version, &target);
    if (st)
        return st;
    if (target.pruned)
        return tern_set_error(t->err, TERN_ERR_INVALID,
                              "cannot roll back to model version %s: it was pruned", target.version);
    MDB_val v;
    if ((st = st_get(t, DB_BLOBS, target.blob_key, strlen(target.blob_key), &v)) == TERN_ERR_NOT_FOUND)
        return tern_set_error(t->err, TERN_ERR_FORMAT,
                              "cannot roll back to model version %s: its blob is missing",
                              target.version);
    if (st)
        return st;
    char detail[TERN_STORE_TEXT_SIZE];
    st = load_current(t, &cur);
    if (st == TERN_OK && strcmp(cur.version, target.version) == 0)
        return TERN_OK;
    if (st == TERN_OK)
        snprintf(detail, sizeof detail, "current %s -> %s", cur.version, target.version);
    else if (st == TERN_ERR_NOT_FOUND)
        snprintf(detail, sizeof detail, "current (none) -> %s", target.version);
    else
        return st;
    if ((st = set_current(t, &target)))
        return st;
    return st_audit(t, c->actor, "version.rollback", target.version, detail);
}

tern_status tern_store_version_rollback(tern_store *store, const char *version, const char *actor,
                                        tern_error *err)
{
    if (!store || !version)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_version_rollback: NULL argument");
    return st_write(store, rollback_fn, &(version_edit_ctx){.version = version, .actor = actor},
                    err);
}

static tern_status tag_fn(st_txn *t, void *p)
{
    version_edit_ctx *c = p;
    tern_model_version m;
    tern_status st = load_version(t, c->version, &m);
    if (st)
        return st;
    char detail[TERN_STORE_TEXT_SIZE];
    snprintf(detail, sizeof detail, "tag '%s' -> '%s'", m.tag, c->tag);
    strcpy(m.tag, c->tag);
    if ((st = save_version(t, &m, 0)))
        return st;
    return st_audit(t, c->actor, "version.tag", m.version, detail);
}

tern_status tern_store_version_tag(tern_store *store, const char *version, const char *tag,
                                   const char *actor, tern_error *err)
{
    if (!store || !version)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_version_tag: NULL argument");
    tern_status st = st_check_text(err, "version tag", tag, TERN_STORE_NAME_SIZE, false);
    if (st)
        return st;
    return st_write(store, tag_fn,
                    &(version_edit_ctx){.version = version, .tag = tag ? tag : "", .actor = actor},
                    err);
}

typedef struct {
    size_t keep_latest;
    const char *actor;
    size_t pruned;
    st_vec versions;
} prune_ctx;

static tern_status prune_fn(st_txn *t, void *p)
{
    prune_ctx *c = p;
    c->pruned = 0;
    c->versions.count = 0; /* a retry starts over */
    tern_model_version cur;
    tern_status st = load_current(t, &cur);
    bool has_current = st == TERN_OK;
    if (st && st != TERN_ERR_NOT_FOUND)
        return st;
    MDB_cursor *curs;
    if ((st = st_cursor(t, DB_VERSIONS, &curs)))
        return st;
    MDB_val k, v;
    for (int rc = mdb_cursor_get(curs, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(curs, &k, &v, MDB_NEXT)) {
        tern_model_version *slot = st_vec_push(t->s, &c->versions);
        if (!slot) {
            mdb_cursor_close(curs);
            return tern_set_error(t->err, TERN_ERR_NOMEM, "out of memory pruning versions");
        }
        if ((st = st_decode_version(&v, slot, t->err))) {
            mdb_cursor_close(curs);
            return st;
        }
    }
    mdb_cursor_close(curs);

    tern_model_version *all = c->versions.data;
    size_t n = c->versions.count;
    bool *drop = tern_calloc(st_alloc(t->s), n ? n : 1, sizeof *drop);
    if (!drop)
        return tern_set_error(t->err, TERN_ERR_NOMEM, "out of memory pruning versions");
    char detail[TERN_STORE_TEXT_SIZE] = "pruned";
    for (size_t i = 0; i < n; i++) {
        bool keep = all[i].pruned || i + c->keep_latest >= n || all[i].tag[0] ||
                    (has_current && strcmp(all[i].version, cur.version) == 0);
        drop[i] = !keep;
    }
    for (size_t i = 0; i < n && st == TERN_OK; i++) {
        if (!drop[i])
            continue;
        /* Keep a blob shared with a surviving version or a stored image. */
        bool shared = false;
        for (size_t j = 0; j < n; j++)
            if (!drop[j] && !all[j].pruned && strcmp(all[j].blob_key, all[i].blob_key) == 0)
                shared = true;
        MDB_val iv;
        tern_status ist = st_get(t, DB_IMAGE_BY_HASH, all[i].blob_key, strlen(all[i].blob_key), &iv);
        if (ist == TERN_OK)
            shared = true;
        else if (ist != TERN_ERR_NOT_FOUND)
            st = ist;
        if (st == TERN_OK && !shared) {
            st = st_del(t, DB_BLOBS, all[i].blob_key, strlen(all[i].blob_key));
            if (st == TERN_ERR_NOT_FOUND) /* an earlier drop shared it */
                st = TERN_OK;
        }
        if (st == TERN_OK) {
            all[i].pruned = true;
            all[i].blob_key[0] = '\0';
            st = save_version(t, &all[i], 0);
            c->pruned++;
            size_t used = strlen(detail);
            if (used + strlen(all[i].version) + 3 < sizeof detail)
                snprintf(detail + used, sizeof detail - used, " %s", all[i].version);
        }
    }
    tern_free(st_alloc(t->s), drop);
    if (st == TERN_OK && c->pruned)
        st = st_audit(t, c->actor, "version.prune", "", detail);
    return st;
}

tern_status tern_store_version_prune(tern_store *store, size_t keep_latest, const char *actor,
                                     size_t *pruned, tern_error *err)
{
    if (!store)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_version_prune: NULL argument");
    prune_ctx c = {.keep_latest = keep_latest, .actor = actor,
                   .versions = {.elem = sizeof(tern_model_version)}};
    tern_status st = st_write(store, prune_fn, &c, err);
    tern_free(st_alloc(store), c.versions.data);
    if (st == TERN_OK && pruned)
        *pruned = c.pruned;
    return st;
}
