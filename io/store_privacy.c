/* The privacy ledger of the store (include/tern/store.h, "privacy ledger").
 *
 * One record per subject in meta, key "privacy:" + subject, as JSON:
 *   {"schema": 1, "subject": "...", "rounds": N, "last_round": R,
 *    "last": [noise_multiplier, sample_rate, steps],
 *    "history": [[noise_multiplier, sample_rate, steps], ...]}
 * It lives in meta, like the round reports, so that stores written before the ledger existed
 * still open read-only. Charges are added by tern_store_commit_round inside its transaction
 * (st_privacy_add); the history is what an accountant (tern/privacy.h) composes. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/store_internal.h"

#define PRIVACY_KEY_MAX (sizeof META_PRIVACY - 1 + TERN_STORE_ID_SIZE)

static size_t privacy_key(char key[PRIVACY_KEY_MAX], const char *subject)
{
    size_t plen = strlen(META_PRIVACY), slen = strlen(subject);
    memcpy(key, META_PRIVACY, plen);
    memcpy(key + plen, subject, slen);
    return plen + slen;
}

tern_status st_privacy_check(const tern_privacy_charge *c, size_t n, tern_error *err)
{
    for (size_t i = 0; i < n; i++) {
        size_t len = strnlen(c[i].subject, TERN_STORE_ID_SIZE);
        if (len == 0 || len == TERN_STORE_ID_SIZE)
            return tern_set_error(err, TERN_ERR_INVALID, "privacy charge %zu: the subject is "
                                  "empty or not terminated", i);
        if (!(c[i].noise_multiplier > 0) || !isfinite(c[i].noise_multiplier))
            return tern_set_error(err, TERN_ERR_INVALID, "privacy charge %zu (%s): noise "
                                  "multiplier %g must be > 0 and finite", i, c[i].subject,
                                  c[i].noise_multiplier);
        if (!(c[i].sample_rate > 0 && c[i].sample_rate <= 1))
            return tern_set_error(err, TERN_ERR_INVALID, "privacy charge %zu (%s): sample rate "
                                  "%g is outside (0, 1]", i, c[i].subject, c[i].sample_rate);
        if (c[i].steps < 0)
            return tern_set_error(err, TERN_ERR_INVALID, "privacy charge %zu (%s): %lld steps",
                                  i, c[i].subject, (long long)c[i].steps);
        for (size_t j = 0; j < i; j++)
            if (strcmp(c[i].subject, c[j].subject) == 0)
                return tern_set_error(err, TERN_ERR_INVALID, "privacy charges %zu and %zu both "
                                      "name %s", j, i, c[i].subject);
    }
    return TERN_OK;
}

/* A parsed record: history rows as a JSON array (owned by root). */
static tern_status decode(const MDB_val *v, const char *subject, json_t **root, json_t **history,
                          tern_privacy_account *acc, tern_error *err)
{
    tern_status st = st_parse(v, "privacy ledger record", root, err);
    if (st)
        return st;
    json_error_t jerr;
    json_int_t rounds, last_round, last_steps;
    memset(acc, 0, sizeof *acc);
    if (json_unpack_ex(*root, &jerr, 0, "{s:I, s:I, s:[F, F, I], s:o}", "rounds", &rounds,
                       "last_round", &last_round, "last", &acc->last.noise_multiplier,
                       &acc->last.sample_rate, &last_steps, "history", history) ||
        !json_is_array(*history) || rounds < 0)
        goto bad;
    acc->rounds = (int64_t)rounds;
    acc->last_round = (int64_t)last_round;
    acc->last.steps = (int64_t)last_steps;
    snprintf(acc->last.subject, sizeof acc->last.subject, "%s", subject);
    for (size_t i = 0; i < json_array_size(*history); i++) {
        double sigma, q;
        json_int_t steps;
        if (json_unpack_ex(json_array_get(*history, i), &jerr, JSON_STRICT, "[F, F, I]", &sigma,
                           &q, &steps) ||
            !(sigma > 0) || !isfinite(sigma) || !(q > 0 && q <= 1) || steps < 0)
            goto bad;
    }
    return TERN_OK;
bad:
    json_decref(*root);
    *root = NULL;
    return tern_set_error(err, TERN_ERR_FORMAT, "privacy ledger record of %s is malformed",
                          subject);
}

static tern_status charge_one(st_txn *t, int64_t round, const tern_privacy_charge *c)
{
    if (strcmp(c->subject, TERN_PRIVACY_CENTRAL) != 0) {
        MDB_val cv;
        tern_status st = st_key_ok(c->subject) ? st_get(t, DB_CLIENTS, c->subject,
                                                        strlen(c->subject), &cv)
                                               : TERN_ERR_NOT_FOUND;
        if (st == TERN_ERR_NOT_FOUND)
            return tern_set_error(t->err, st, "round %lld: a privacy charge names client '%s', "
                                  "which is not registered", (long long)round, c->subject);
        if (st)
            return st;
    }
    char key[PRIVACY_KEY_MAX];
    size_t klen = privacy_key(key, c->subject);
    MDB_val v;
    json_t *root = NULL, *history = NULL;
    tern_privacy_account acc = {0};
    tern_status st = st_get(t, DB_META, key, klen, &v);
    if (st == TERN_ERR_NOT_FOUND) {
        root = json_pack("{s:i, s:s, s:I, s:I, s:[f, f, I], s:[]}", "schema", STORE_SCHEMA,
                         "subject", c->subject, "rounds", (json_int_t)0, "last_round",
                         (json_int_t)0, "last", 1.0, 1.0, (json_int_t)0, "history");
        if (!root)
            return tern_set_error(t->err, TERN_ERR_NOMEM, "out of memory for the ledger");
        history = json_object_get(root, "history");
    } else if (st) {
        return st;
    } else if ((st = decode(&v, c->subject, &root, &history, &acc, t->err))) {
        return st;
    }
    bool merged = false;
    for (size_t i = 0; i < json_array_size(history) && !merged; i++) {
        json_t *row = json_array_get(history, i);
        if (json_number_value(json_array_get(row, 0)) == c->noise_multiplier &&
            json_number_value(json_array_get(row, 1)) == c->sample_rate) {
            json_int_t steps = json_integer_value(json_array_get(row, 2));
            if (json_array_set_new(row, 2, json_integer(steps + c->steps)))
                goto nomem;
            merged = true;
        }
    }
    if (!merged && json_array_append_new(history, json_pack("[f, f, I]", c->noise_multiplier,
                                                            c->sample_rate,
                                                            (json_int_t)c->steps)))
        goto nomem;
    if (json_object_set_new(root, "rounds", json_integer((json_int_t)acc.rounds + 1)) ||
        json_object_set_new(root, "last_round", json_integer((json_int_t)round)) ||
        json_object_set_new(root, "last", json_pack("[f, f, I]", c->noise_multiplier,
                                                    c->sample_rate, (json_int_t)c->steps)))
        goto nomem;
    return st_put_json(t, DB_META, key, klen, root);
nomem:
    json_decref(root);
    return tern_set_error(t->err, TERN_ERR_NOMEM, "out of memory for the ledger");
}

tern_status st_privacy_add(st_txn *t, int64_t round, const tern_privacy_charge *c, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        tern_status st = charge_one(t, round, &c[i]);
        if (st)
            return st;
    }
    return TERN_OK;
}

tern_status tern_store_privacy_history(tern_store *store, const char *subject,
                                       tern_privacy_charge **out, size_t *count,
                                       tern_privacy_account *account, tern_error *err)
{
    if (!store || !subject || !out || !count)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_privacy_history: NULL argument");
    size_t slen = strnlen(subject, TERN_STORE_ID_SIZE);
    if (slen == 0 || slen == TERN_STORE_ID_SIZE)
        return tern_set_error(err, TERN_ERR_INVALID, "privacy ledger: subject '%.40s' is empty "
                              "or too long", subject);
    st_txn t;
    tern_status st = st_read_begin(store, &t, err);
    if (st)
        return st;
    char key[PRIVACY_KEY_MAX];
    size_t klen = privacy_key(key, subject);
    MDB_val v;
    json_t *root = NULL, *history = NULL;
    tern_privacy_account acc = {0};
    tern_privacy_charge *h = NULL;
    size_t n = 0;
    st = st_get(&t, DB_META, key, klen, &v);
    if (st == TERN_ERR_NOT_FOUND) {
        st = TERN_OK;
        goto done;
    }
    if (st || (st = decode(&v, subject, &root, &history, &acc, err)))
        goto done;
    n = json_array_size(history);
    if (n) {
        h = tern_calloc(st_alloc(store), n, sizeof *h);
        if (!h) {
            st = tern_set_error(err, TERN_ERR_NOMEM, "out of memory for %zu ledger entries", n);
            n = 0;
            goto done;
        }
    }
    for (size_t i = 0; i < n; i++) {
        json_t *row = json_array_get(history, i);
        memcpy(h[i].subject, subject, slen + 1);
        h[i].noise_multiplier = json_number_value(json_array_get(row, 0));
        h[i].sample_rate = json_number_value(json_array_get(row, 1));
        h[i].steps = (int64_t)json_integer_value(json_array_get(row, 2));
    }
done:
    json_decref(root);
    st_read_end(&t);
    if (st == TERN_OK) {
        *out = h;
        *count = n;
        if (account)
            *account = acc;
    }
    return st;
}

typedef struct {
    int64_t round;
    const tern_privacy_charge *c;
    size_t n;
} charge_ctx;

static tern_status charge_fn(st_txn *t, void *p)
{
    charge_ctx *x = p;
    return st_privacy_add(t, x->round, x->c, x->n);
}

tern_status tern_store_privacy_charge(tern_store *store, int64_t round,
                                      const tern_privacy_charge *charges, size_t count,
                                      tern_error *err)
{
    if (!store || (!charges && count))
        return tern_set_error(err, TERN_ERR_INVALID, "tern_store_privacy_charge: NULL argument");
    tern_status st = st_privacy_check(charges, count, err);
    if (st || count == 0)
        return st;
    charge_ctx x = {.round = round, .c = charges, .n = count};
    return st_write(store, charge_fn, &x, err);
}
