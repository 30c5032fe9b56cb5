/* Store tests, one group per record type: categories, clients and API keys, images, rounds and
 * their transitions, the model registry (version numbering, load with hash check, rollback,
 * tags, retention), then map growth, a corrupted blob, backup and restore, and allocation
 * failures while opening. Every test ends with the integrity check reporting nothing.
 * Crash consistency and concurrent processes are in test_store_crash.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <lmdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tern.h"
#include "testutil.h"

/* ---- helpers ------------------------------------------------------------------------------- */

typedef struct {
    char dir[64];
    int64_t now; /* the test clock, ms */
} fixture;

static int64_t test_clock(void *user)
{
    return ((fixture *)user)->now;
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    if (!f)
        return -1;
    snprintf(f->dir, sizeof f->dir, "/tmp/tern_test_store.XXXXXX");
    if (!mkdtemp(f->dir)) {
        free(f);
        return -1;
    }
    f->now = 1700000000000;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    test_rm_tree(f->dir);
    free(f);
    return 0;
}

static void sub(char *out, size_t cap, const fixture *f, const char *name)
{
    snprintf(out, cap, "%s/%s", f->dir, name);
}

static tern_store *open_store(fixture *f, const char *name, size_t map_size)
{
    char path[256];
    sub(path, sizeof path, f, name);
    tern_store *s = NULL;
    tern_error err = {{0}};
    tern_store_options o = {.map_size = map_size, .no_sync = true, .clock = test_clock,
                            .clock_user = f};
    if (tern_store_open(path, &o, &s, &err) != TERN_OK)
        fail_msg("tern_store_open(%s): %s", path, err.message);
    return s;
}

static void print_problem(void *user, const char *message)
{
    (void)user;
    print_message("check: %s\n", message);
}

static size_t check(tern_store *s)
{
    size_t problems = 99;
    tern_error err = {{0}};
    if (tern_store_check(s, print_problem, NULL, &problems, &err) != TERN_OK)
        fail_msg("tern_store_check: %s", err.message);
    return problems;
}

#define OK(call)                                                                               \
    do {                                                                                       \
        tern_error e_ = {{0}};                                                                 \
        tern_error *err_ = &e_;                                                                \
        (void)err_;                                                                            \
        tern_status st_ = (call);                                                              \
        if (st_ != TERN_OK)                                                                    \
            fail_msg("%s: %s (%s)", #call, tern_strerror(st_), e_.message);                    \
    } while (0)

/* Expect status and a message containing needle. */
static void expect_fail(tern_status got, tern_status want, const tern_error *err, const char *needle)
{
    if (got != want)
        fail_msg("expected %s, got %s (%s)", tern_strerror(want), tern_strerror(got), err->message);
    if (needle && !strstr(err->message, needle))
        fail_msg("message '%s' lacks '%s'", err->message, needle);
}

static tern_category category(const char *name, int32_t index)
{
    tern_category c = {0};
    snprintf(c.name, sizeof c.name, "%s", name);
    snprintf(c.description, sizeof c.description, "pictures of %s", name);
    snprintf(c.created_by, sizeof c.created_by, "admin");
    c.class_index = index;
    c.active = true;
    return c;
}

static tern_client_record client_in(const char *name)
{
    tern_client_record c = {0};
    snprintf(c.name, sizeof c.name, "%s", name);
    snprintf(c.device_type, sizeof c.device_type, "phone");
    snprintf(c.os_info, sizeof c.os_info, "Linux 6.1");
    /* A fixed, well-formed hash: hashing for real costs 100k PBKDF2 iterations per client. */
    snprintf(c.api_key_hash, sizeof c.api_key_hash, "pbkdf2-sha256$100000$%032d$%064d", 0, 0);
    return c;
}

static void fill_bytes(unsigned char *p, size_t n, uint64_t seed)
{
    test_rng r = {seed};
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(test_rng_next(&r) >> 56);
}

/* ---- categories ---------------------------------------------------------------------------- */

static void categories(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db", 0);
    tern_error err = {{0}};
    tern_category cat, got, in = category("cat", 0);
    OK(tern_store_category_add(s, &in, &cat, err_));
    assert_int_equal(strlen(cat.id), 36);
    assert_int_equal(cat.id[14], '4'); /* UUID version 4 */
    assert_int_equal(cat.created_at, f->now);
    in = category("dog", 1);
    OK(tern_store_category_add(s, &in, NULL, err_));

    OK(tern_store_category_get(s, cat.id, &got, err_));
    assert_string_equal(got.name, "cat");
    assert_string_equal(got.description, "pictures of cat");
    assert_string_equal(got.created_by, "admin");
    OK(tern_store_category_get_by_name(s, "dog", &got, err_));
    assert_int_equal(got.class_index, 1);
    OK(tern_store_category_get_by_index(s, 0, &got, err_));
    assert_string_equal(got.id, cat.id);

    /* Duplicates are refused with messages naming the clash. */
    in = category("cat", 7);
    expect_fail(tern_store_category_add(s, &in, NULL, &err), TERN_ERR_EXISTS, &err,
                "category name 'cat' already exists");
    in = category("bird", 1);
    expect_fail(tern_store_category_add(s, &in, NULL, &err), TERN_ERR_EXISTS, &err,
                "class index 1 already belongs to category 'dog'");
    in = category("", 3);
    expect_fail(tern_store_category_add(s, &in, NULL, &err), TERN_ERR_INVALID, &err, "empty");
    in = category("neg", -1);
    expect_fail(tern_store_category_add(s, &in, NULL, &err), TERN_ERR_INVALID, &err, "negative");
    in = category("long", 5);
    memset(in.name, 'x', sizeof in.name); /* no terminating NUL */
    expect_fail(tern_store_category_add(s, &in, NULL, &err), TERN_ERR_INVALID, &err, "longer");

    /* Unknown ids, names and indexes are answered clearly. */
    expect_fail(tern_store_category_get(s, "no-such-id", &got, &err), TERN_ERR_NOT_FOUND, &err,
                "no category with id 'no-such-id'");
    expect_fail(tern_store_category_get_by_name(s, "horse", &got, &err), TERN_ERR_NOT_FOUND, &err,
                "no category with name 'horse'");
    expect_fail(tern_store_category_get_by_index(s, 9, &got, &err), TERN_ERR_NOT_FOUND, &err,
                "class index 9");

    /* Rename moves the name index; the old name is gone, a taken name is refused. */
    OK(tern_store_category_rename(s, cat.id, "kitten", "alice", err_));
    OK(tern_store_category_get_by_name(s, "kitten", &got, err_));
    assert_string_equal(got.id, cat.id);
    expect_fail(tern_store_category_get_by_name(s, "cat", &got, &err), TERN_ERR_NOT_FOUND, &err,
                NULL);
    expect_fail(tern_store_category_rename(s, cat.id, "dog", "alice", &err), TERN_ERR_EXISTS,
                &err, "already exists");
    OK(tern_store_category_set_active(s, cat.id, false, "alice", err_));
    OK(tern_store_category_get(s, cat.id, &got, err_));
    assert_false(got.active);

    tern_category *list = NULL;
    size_t n = 0;
    OK(tern_store_category_list(s, &list, &n, err_));
    assert_int_equal(n, 2);
    assert_string_equal(list[0].name, "kitten");
    assert_string_equal(list[1].name, "dog");
    tern_store_free(s, list);

    OK(tern_store_category_get_by_name(s, "dog", &got, err_));
    OK(tern_store_category_remove(s, got.id, "bob", err_));
    expect_fail(tern_store_category_get_by_index(s, 1, &got, &err), TERN_ERR_NOT_FOUND, &err, NULL);
    in = category("dog", 1); /* name and index are free again */
    OK(tern_store_category_add(s, &in, NULL, err_));

    tern_audit_entry *audit = NULL;
    OK(tern_store_audit_list(s, 0, 0, &audit, &n, err_));
    assert_int_equal(n, 6); /* add, add, rename, set_active, remove, add */
    assert_string_equal(audit[2].action, "category.rename");
    assert_string_equal(audit[2].actor, "alice");
    assert_string_equal(audit[2].target, cat.id);
    assert_non_null(strstr(audit[2].detail, "'cat' -> 'kitten'"));
    assert_string_equal(audit[4].action, "category.remove");
    assert_int_equal(audit[4].seq, 5);
    tern_store_free(s, audit);
    OK(tern_store_audit_list(s, 4, 1, &audit, &n, err_));
    assert_int_equal(n, 1);
    assert_int_equal(audit[0].seq, 5);
    tern_store_free(s, audit);

    assert_int_equal(check(s), 0);
    tern_store_close(&s);
    assert_null(s);
}

/* ---- clients and API keys ------------------------------------------------------------------ */

static void clients(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db", 0);
    tern_error err = {{0}};
    tern_client_record in = client_in("pixel-7"), c, got;
    OK(tern_store_client_register(s, &in, &c, err_));
    assert_true(c.active);
    assert_false(c.blacklisted);
    assert_int_equal(c.registered_at, f->now);
    expect_fail(tern_store_client_register(s, &in, NULL, &err), TERN_ERR_EXISTS, &err,
                "client name 'pixel-7' already exists");
    tern_client_record raw = client_in("raw");
    snprintf(raw.api_key_hash, sizeof raw.api_key_hash, "secret-key");
    expect_fail(tern_store_client_register(s, &raw, NULL, &err), TERN_ERR_INVALID, &err,
                "never store the key");

    f->now += 5000;
    OK(tern_store_client_touch(s, c.id, err_));
    OK(tern_store_client_set_quality(s, c.id, 0.25, err_));
    OK(tern_store_client_get_by_name(s, "pixel-7", &got, err_));
    assert_string_equal(got.id, c.id);
    assert_int_equal(got.last_seen, f->now);
    assert_true(got.quality_score == 0.25);
    assert_string_equal(got.os_info, "Linux 6.1");

    expect_fail(tern_store_client_set_blacklisted(s, c.id, true, "", "admin", &err),
                TERN_ERR_INVALID, &err, "reason");
    OK(tern_store_client_set_blacklisted(s, c.id, true, "poisoned updates", "admin", err_));
    OK(tern_store_client_get(s, c.id, &got, err_));
    assert_true(got.blacklisted);
    assert_false(got.active);
    assert_string_equal(got.blacklist_reason, "poisoned updates");
    OK(tern_store_client_set_blacklisted(s, c.id, false, NULL, "admin", err_));
    OK(tern_store_client_get(s, c.id, &got, err_));
    assert_false(got.blacklisted);
    assert_true(got.active);

    expect_fail(tern_store_client_get(s, "ghost", &got, &err), TERN_ERR_NOT_FOUND, &err,
                "no client with id 'ghost'");
    expect_fail(tern_store_client_touch(s, "ghost", &err), TERN_ERR_NOT_FOUND, &err, "ghost");
    expect_fail(tern_store_client_get_by_name(s, "ghost", &got, &err), TERN_ERR_NOT_FOUND, &err,
                "no client named 'ghost'");

    in = client_in("iphone");
    OK(tern_store_client_register(s, &in, NULL, err_));
    tern_client_record *list;
    size_t n;
    OK(tern_store_client_list(s, &list, &n, err_));
    assert_int_equal(n, 2);
    assert_string_equal(list[0].name, "iphone");
    tern_store_free(s, list);

    tern_audit_entry *audit;
    OK(tern_store_audit_list(s, 0, 0, &audit, &n, err_));
    assert_int_equal(n, 2);
    assert_string_equal(audit[0].action, "client.blacklist");
    assert_non_null(strstr(audit[0].detail, "poisoned updates"));
    tern_store_free(s, audit);
    assert_int_equal(check(s), 0);
    tern_store_close(&s);
}

static void api_keys(void **state)
{
    (void)state;
    char h1[TERN_STORE_KEY_HASH_SIZE], h2[TERN_STORE_KEY_HASH_SIZE];
    tern_error err = {{0}};
    OK(tern_store_hash_api_key("correct horse", h1, err_));
    OK(tern_store_hash_api_key("correct horse", h2, err_));
    assert_non_null(strstr(h1, "pbkdf2-sha256$100000$"));
    assert_null(strstr(h1, "correct horse"));
    assert_string_not_equal(h1, h2); /* random salt */
    bool ok = false;
    OK(tern_store_verify_api_key("correct horse", h1, &ok, err_));
    assert_true(ok);
    OK(tern_store_verify_api_key("correct horsE", h1, &ok, err_));
    assert_false(ok);
    OK(tern_store_verify_api_key("", h1, &ok, err_));
    assert_false(ok);
    h1[strlen(h1) - 1] ^= 1; /* tampered digest (still hex? '0'^1='1', 'a'^1='`') */
    tern_status st = tern_store_verify_api_key("correct horse", h1, &ok, &err);
    assert_true(st == TERN_ERR_FORMAT || (st == TERN_OK && !ok));
    expect_fail(tern_store_verify_api_key("k", "sha1$abc", &ok, &err), TERN_ERR_FORMAT, &err,
                "malformed");
    expect_fail(tern_store_hash_api_key("", h1, &err), TERN_ERR_INVALID, &err, NULL);
}

/* ---- images -------------------------------------------------------------------------------- */

static void images(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db", 0);
    tern_error err = {{0}};
    tern_category cat, in = category("shoe", 0);
    OK(tern_store_category_add(s, &in, &cat, err_));
    tern_client_record c, cin = client_in("phone-1");
    OK(tern_store_client_register(s, &cin, &c, err_));

    unsigned char a[1000], b[1000];
    fill_bytes(a, sizeof a, 1);
    fill_bytes(b, sizeof b, 2);
    tern_image_record im = {0}, first, dup, got;
    strcpy(im.client_id, c.id);
    strcpy(im.category_id, cat.id);
    OK(tern_store_image_add(s, &im, a, sizeof a, &first, err_));
    assert_int_equal(strlen(first.sha256), 64);
    assert_int_equal(strncmp(first.location, "blob:", 5), 0);
    assert_false(first.used_in_training);

    /* Same content again: refused, naming and returning the earlier upload. */
    expect_fail(tern_store_image_add(s, &im, a, sizeof a, &dup, &err), TERN_ERR_EXISTS, &err,
                "duplicate");
    assert_non_null(strstr(err.message, first.id));
    assert_string_equal(dup.id, first.id);

    strcpy(im.location, "/srv/images/b.jpg"); /* stored outside by the caller */
    OK(tern_store_image_add(s, &im, b, sizeof b, &got, err_));
    assert_string_equal(got.location, "/srv/images/b.jpg");
    OK(tern_store_image_get_by_hash(s, first.sha256, &got, err_));
    assert_string_equal(got.id, first.id);
    OK(tern_store_image_set_used(s, first.id, true, err_));
    OK(tern_store_image_get(s, first.id, &got, err_));
    assert_true(got.used_in_training);

    OK(tern_store_category_get(s, cat.id, &cat, err_));
    assert_int_equal(cat.sample_count, 2);
    OK(tern_store_client_get(s, c.id, &c, err_));
    assert_int_equal(c.total_samples, 2);

    expect_fail(tern_store_category_remove(s, cat.id, "admin", &err), TERN_ERR_INVALID, &err,
                "2 images refer to it");
    unsigned char x[10] = {1};
    strcpy(im.category_id, "missing-category");
    expect_fail(tern_store_image_add(s, &im, x, sizeof x, NULL, &err), TERN_ERR_NOT_FOUND, &err,
                "missing-category");
    strcpy(im.category_id, cat.id);
    OK(tern_store_client_set_blacklisted(s, c.id, true, "spam", "admin", err_));
    expect_fail(tern_store_image_add(s, &im, x, sizeof x, NULL, &err), TERN_ERR_INVALID, &err,
                "blacklisted");
    expect_fail(tern_store_image_get(s, "nope", &got, &err), TERN_ERR_NOT_FOUND, &err,
                "no image with id 'nope'");
    assert_int_equal(check(s), 0);
    tern_store_close(&s);
}

/* ---- rounds -------------------------------------------------------------------------------- */

static tern_round_commit commit_of(int64_t round, const void *model, size_t size, const char *settings,
                                   const char *classes)
{
    return (tern_round_commit){.round = round, .clients_selected = 3, .clients_participated = 2,
                               .global_accuracy = 0.5, .global_loss = 1.25, .model = model,
                               .model_size = size, .settings = settings, .classes = classes,
                               .notes = "test"};
}

static void rounds(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db", 0);
    tern_error err = {{0}};
    tern_round r1, r2, got;
    OK(tern_store_round_create(s, 3, &r1, err_));
    OK(tern_store_round_create(s, 4, &r2, err_));
    assert_int_equal(r1.number, 1);
    assert_int_equal(r2.number, 2);
    assert_int_equal(r1.status, TERN_ROUND_PENDING);

    expect_fail(tern_store_round_set_status(s, 1, TERN_ROUND_AGGREGATING, &err), TERN_ERR_INVALID,
                &err, "illegal status transition pending -> aggregating");
    expect_fail(tern_store_round_set_status(s, 1, TERN_ROUND_COMPLETED, &err), TERN_ERR_INVALID,
                &err, "pending -> completed");
    f->now += 10;
    OK(tern_store_round_set_status(s, 1, TERN_ROUND_RUNNING, err_));
    OK(tern_store_round_get(s, 1, &got, err_));
    assert_int_equal(got.started_at, f->now);
    unsigned char model[300];
    fill_bytes(model, sizeof model, 3);
    tern_round_commit cm = commit_of(1, model, sizeof model, "lr=0.1", "a,b");
    expect_fail(tern_store_commit_round(s, &cm, NULL, NULL, &err), TERN_ERR_INVALID, &err,
                "running -> completed");
    OK(tern_store_round_set_status(s, 1, TERN_ROUND_AGGREGATING, err_));
    expect_fail(tern_store_round_set_status(s, 1, TERN_ROUND_COMPLETED, &err), TERN_ERR_INVALID,
                &err, "tern_store_commit_round");
    /* Metrics must name registered clients. */
    tern_client_record c1, c2, in1 = client_in("c1"), in2 = client_in("c2");
    OK(tern_store_client_register(s, &in1, &c1, err_));
    OK(tern_store_client_register(s, &in2, &c2, err_));
    tern_client_metrics metrics[2] = {
        {.participated = true, .num_samples = 60, .loss = 0.9, .accuracy = 0.7},
        {.participated = false},
    };
    strcpy(metrics[0].client_id, c1.id);
    strcpy(metrics[1].client_id, c2.id);
    cm.client_metrics = metrics;
    cm.client_metrics_count = 2;
    f->now += 10;
    tern_model_version v;
    OK(tern_store_commit_round(s, &cm, &got, &v, err_));
    assert_int_equal(got.status, TERN_ROUND_COMPLETED);
    assert_int_equal(got.ended_at, f->now);
    assert_string_equal(got.model_version, "1.0.0");
    assert_int_equal(got.clients_participated, 1); /* counted from the metrics, not the field */
    assert_int_equal(v.round, 1);

    /* Terminal statuses stay terminal. */
    expect_fail(tern_store_round_set_status(s, 1, TERN_ROUND_RUNNING, &err), TERN_ERR_INVALID,
                &err, "completed -> running");
    expect_fail(tern_store_round_set_status(s, 1, TERN_ROUND_FAILED, &err), TERN_ERR_INVALID, &err,
                "completed -> failed");
    OK(tern_store_round_set_status(s, 2, TERN_ROUND_FAILED, err_));
    expect_fail(tern_store_round_set_status(s, 2, TERN_ROUND_RUNNING, &err), TERN_ERR_INVALID,
                &err, "failed -> running");
    expect_fail(tern_store_round_get(s, 42, &got, &err), TERN_ERR_NOT_FOUND, &err, "no round 42");
    expect_fail(tern_store_round_set_status(s, 42, TERN_ROUND_RUNNING, &err), TERN_ERR_NOT_FOUND,
                &err, "no round 42");

    /* Round 3 is created directly as completed by a commit. */
    OK(tern_store_round_create(s, 1, &r1, err_)); /* round 3, pending */
    tern_round_commit direct = commit_of(0, model, sizeof model, "lr=0.1", "a,b");
    OK(tern_store_commit_round(s, &direct, &got, NULL, err_));
    assert_int_equal(got.number, 4);

    tern_round *list;
    size_t n;
    OK(tern_store_round_list_by_status(s, TERN_ROUND_COMPLETED, &list, &n, err_));
    assert_int_equal(n, 2);
    assert_int_equal(list[0].number, 1);
    assert_int_equal(list[1].number, 4);
    tern_store_free(s, list);
    OK(tern_store_round_list_by_status(s, TERN_ROUND_FAILED, &list, &n, err_));
    assert_int_equal(n, 1);
    assert_int_equal(list[0].number, 2);
    tern_store_free(s, list);
    OK(tern_store_round_list_by_status(s, TERN_ROUND_PENDING, &list, &n, err_));
    assert_int_equal(n, 1);
    assert_int_equal(list[0].number, 3);
    tern_store_free(s, list);
    OK(tern_store_round_list_by_status(s, TERN_ROUND_RUNNING, &list, &n, err_));
    assert_int_equal(n, 0);
    tern_store_free(s, list);

    tern_client_metrics *cms;
    OK(tern_store_round_client_metrics(s, 1, &cms, &n, err_));
    assert_int_equal(n, 2);
    /* Ordered by client id, and the ids are random. */
    tern_client_metrics *m1 = strcmp(cms[0].client_id, c1.id) == 0 ? &cms[0] : &cms[1];
    tern_client_metrics *m2 = m1 == &cms[0] ? &cms[1] : &cms[0];
    assert_true(strcmp(cms[0].client_id, cms[1].client_id) < 0);
    assert_string_equal(m1->client_id, c1.id);
    assert_true(m1->participated);
    assert_int_equal(m1->num_samples, 60);
    assert_string_equal(m2->client_id, c2.id);
    assert_false(m2->participated);
    tern_store_free(s, cms);

    assert_true(tern_round_transition_legal(TERN_ROUND_RUNNING, TERN_ROUND_FAILED));
    assert_false(tern_round_transition_legal(TERN_ROUND_PENDING, TERN_ROUND_PENDING));
    assert_string_equal(tern_round_status_name(TERN_ROUND_AGGREGATING), "aggregating");
    assert_int_equal(check(s), 0);
    tern_store_close(&s);
}

/* ---- model registry ------------------------------------------------------------------------ */

static void registry(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db", 0);
    tern_error err = {{0}};
    tern_model_version v, cur;
    expect_fail(tern_store_version_current(s, &cur, &err), TERN_ERR_NOT_FOUND, &err,
                "no current model version");

    enum { N = 6, SIZE = 5000 };
    static unsigned char models[N][SIZE];
    const char *settings[N] = {"lr=0.1", "lr=0.1", "lr=0.1", "lr=0.05", "lr=0.05", "lr=0.05"};
    const char *classes[N] = {"a,b", "a,b", "a,b", "a,b", "a,b", "a,b,c"};
    const char *expect[N] = {"1.0.0", "1.0.1", "1.0.2", "1.1.0", "1.1.1", "2.0.0"};
    for (int i = 0; i < N; i++) {
        fill_bytes(models[i], SIZE, 100 + (uint64_t)i);
        tern_round_commit c = commit_of(0, models[i], SIZE, settings[i], classes[i]);
        c.global_accuracy = 0.1 * i;
        OK(tern_store_commit_round(s, &c, NULL, &v, err_));
        assert_string_equal(v.version, expect[i]);
    }
    tern_model_version *list;
    size_t n;
    OK(tern_store_version_list(s, &list, &n, err_));
    assert_int_equal(n, N);
    for (int i = 0; i < N; i++) {
        assert_string_equal(list[i].version, expect[i]);
        assert_int_equal(list[i].round, i + 1);
        assert_int_equal(list[i].size, SIZE);
    }
    tern_store_free(s, list);
    OK(tern_store_version_current(s, &cur, err_));
    assert_string_equal(cur.version, "2.0.0");

    void *bytes;
    size_t len;
    OK(tern_store_version_load(s, "1.0.1", &bytes, &len, &v, err_));
    assert_int_equal(len, SIZE);
    assert_memory_equal(bytes, models[1], SIZE);
    assert_string_equal(v.notes, "test");
    tern_store_free(s, bytes);
    OK(tern_store_version_load(s, NULL, &bytes, &len, NULL, err_)); /* current */
    assert_memory_equal(bytes, models[5], SIZE);
    tern_store_free(s, bytes);
    expect_fail(tern_store_version_get(s, "9.9.9", &v, &err), TERN_ERR_NOT_FOUND, &err,
                "no model version 9.9.9");
    expect_fail(tern_store_version_get(s, "1.x", &v, &err), TERN_ERR_INVALID, &err,
                "not a model version");

    OK(tern_store_version_rollback(s, "1.0.2", "ops", err_));
    OK(tern_store_version_current(s, &cur, err_));
    assert_string_equal(cur.version, "1.0.2");
    expect_fail(tern_store_version_rollback(s, "3.0.0", "ops", &err), TERN_ERR_NOT_FOUND, &err,
                "3.0.0");
    /* New rounds number from the highest version, not the rolled-back current one. */
    unsigned char next[SIZE];
    fill_bytes(next, SIZE, 999);
    tern_round_commit c = commit_of(0, next, SIZE, "lr=0.05", "a,b,c");
    OK(tern_store_commit_round(s, &c, NULL, &v, err_));
    assert_string_equal(v.version, "2.0.1");
    OK(tern_store_version_rollback(s, "1.0.2", "ops", err_));

    OK(tern_store_version_tag(s, "1.0.0", "baseline", "ops", err_));
    size_t pruned = 0;
    OK(tern_store_version_prune(s, 2, "ops", &pruned, err_));
    /* Kept: 1.0.0 (tagged), 1.0.2 (current), 2.0.0 and 2.0.1 (latest two). */
    assert_int_equal(pruned, 3);
    OK(tern_store_version_get(s, "1.0.1", &v, err_));
    assert_true(v.pruned);
    expect_fail(tern_store_version_load(s, "1.0.1", &bytes, &len, NULL, &err), TERN_ERR_NOT_FOUND,
                &err, "pruned");
    expect_fail(tern_store_version_rollback(s, "1.1.0", "ops", &err), TERN_ERR_INVALID, &err,
                "pruned");
    OK(tern_store_version_load(s, "1.0.0", &bytes, &len, NULL, err_));
    assert_memory_equal(bytes, models[0], SIZE);
    tern_store_free(s, bytes);
    OK(tern_store_version_prune(s, 2, "ops", &pruned, err_));
    assert_int_equal(pruned, 0);

    tern_audit_entry *audit;
    OK(tern_store_audit_list(s, 0, 0, &audit, &n, err_));
    assert_int_equal(n, 4); /* rollback, rollback, tag, prune */
    assert_string_equal(audit[0].action, "version.rollback");
    assert_string_equal(audit[0].target, "1.0.2");
    assert_non_null(strstr(audit[0].detail, "2.0.0 -> 1.0.2"));
    assert_string_equal(audit[3].action, "version.prune");
    assert_non_null(strstr(audit[3].detail, "1.0.1"));
    tern_store_free(s, audit);

    assert_int_equal(check(s), 0);
    tern_store_close(&s);

    /* Everything survives reopening. */
    s = open_store(f, "db", 0);
    OK(tern_store_version_current(s, &cur, err_));
    assert_string_equal(cur.version, "1.0.2");
    assert_int_equal(check(s), 0);
    tern_store_close(&s);
}

/* The map starts at 1 MiB and must double its way to hold several 3 MB models. */
static void map_grows(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db", 1 << 20);
    size_t start = tern_store_map_size(s);
    size_t size = 3 << 20;
    unsigned char *model = malloc(size);
    assert_non_null(model);
    for (int i = 0; i < 5; i++) {
        fill_bytes(model, size, 50 + (uint64_t)i);
        tern_round_commit c = commit_of(0, model, size, "", "");
        OK(tern_store_commit_round(s, &c, NULL, NULL, err_));
    }
    assert_true(tern_store_map_size(s) >= 16 * start);
    void *bytes;
    size_t len;
    OK(tern_store_version_load(s, "1.0.4", &bytes, &len, NULL, err_));
    assert_memory_equal(bytes, model, size);
    tern_store_free(s, bytes);
    assert_int_equal(check(s), 0);
    tern_store_close(&s);
    free(model);
}

/* Flip one byte of a stored model inside data.mdb: load refuses it and the check reports it. */
/* A commit that passes the model's SHA-256 (as the server does) records it without hashing the
 * model again; a wrong one is recorded as given and the blob then fails its check on load. */
static void commit_with_known_sha256(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db", 0);
    tern_error err = {{0}};
    enum { SIZE = 5000 };
    static unsigned char model[SIZE];
    fill_bytes(model, SIZE, 9);
    tern_round_commit c = commit_of(0, model, SIZE, "", "");
    tern_model_version v1, v2, v3;
    OK(tern_store_commit_round(s, &c, NULL, &v1, err_));
    uint8_t sha[32];
    for (int i = 0; i < 32; i++) {
        unsigned x = 0;
        assert_int_equal(sscanf(v1.sha256 + 2 * i, "%2x", &x), 1);
        sha[i] = (uint8_t)x;
    }
    c.model_sha256 = sha;
    OK(tern_store_commit_round(s, &c, NULL, &v2, err_));
    assert_string_equal(v2.sha256, v1.sha256);
    void *bytes = NULL;
    size_t len = 0;
    OK(tern_store_version_load(s, v2.version, &bytes, &len, NULL, err_));
    assert_int_equal(len, SIZE);
    assert_memory_equal(bytes, model, SIZE);
    tern_store_free(s, bytes);
    bytes = NULL;

    sha[0] ^= 1;
    OK(tern_store_commit_round(s, &c, NULL, &v3, err_));
    assert_string_not_equal(v3.sha256, v1.sha256);
    expect_fail(tern_store_version_load(s, v3.version, &bytes, &len, NULL, &err), TERN_ERR_FORMAT,
                &err, "corrupt");
    assert_null(bytes);
    tern_store_close(&s);
}

static void corrupt_blob_detected(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db", 0);
    tern_error err = {{0}};
    enum { SIZE = 20000 };
    static unsigned char model[SIZE];
    fill_bytes(model, SIZE, 77);
    tern_round_commit c = commit_of(0, model, SIZE, "", "");
    OK(tern_store_commit_round(s, &c, NULL, NULL, err_));
    tern_store_close(&s);

    char path[256];
    sub(path, sizeof path, f, "db/data.mdb");
    FILE *fp = fopen(path, "r+b");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    long fsize = ftell(fp);
    unsigned char *file = malloc((size_t)fsize);
    assert_non_null(file);
    fseek(fp, 0, SEEK_SET);
    assert_int_equal(fread(file, 1, (size_t)fsize, fp), (size_t)fsize);
    unsigned char *hit = NULL;
    for (long i = 0; i + 64 <= fsize && !hit; i++)
        if (memcmp(file + i, model + 1000, 64) == 0)
            hit = file + i;
    assert_non_null(hit);
    fseek(fp, (long)(hit - file) + 10, SEEK_SET);
    fputc(hit[10] ^ 0x5a, fp);
    fclose(fp);
    free(file);

    s = open_store(f, "db", 0);
    void *bytes = NULL;
    size_t len;
    expect_fail(tern_store_version_load(s, "1.0.0", &bytes, &len, NULL, &err), TERN_ERR_FORMAT,
                &err, "corrupt");
    assert_null(bytes);
    assert_int_equal(check(s), 1);
    tern_store_close(&s);
}

static void backup_and_restore(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db", 0);
    tern_error err = {{0}};
    tern_category in = category("cat", 0);
    OK(tern_store_category_add(s, &in, NULL, err_));
    unsigned char model[4000];
    for (int i = 0; i < 3; i++) {
        fill_bytes(model, sizeof model, 10 + (uint64_t)i);
        tern_round_commit c = commit_of(0, model, sizeof model, "", "");
        OK(tern_store_commit_round(s, &c, NULL, NULL, err_));
    }
    char backup[256], restored[256];
    sub(backup, sizeof backup, f, "backup");
    sub(restored, sizeof restored, f, "restored");
    OK(tern_store_backup(s, backup, err_));
    expect_fail(tern_store_backup(s, backup, &err), TERN_ERR_INVALID, &err, "already holds");
    /* Changes after the backup are not in it. */
    tern_round_commit c = commit_of(0, "x", 1, "", "");
    OK(tern_store_commit_round(s, &c, NULL, NULL, err_));
    tern_store_close(&s);

    OK(tern_store_restore(backup, restored, err_));
    s = open_store(f, "restored", 0);
    tern_model_version cur;
    OK(tern_store_version_current(s, &cur, err_));
    assert_string_equal(cur.version, "1.0.2");
    tern_category got;
    OK(tern_store_category_get_by_name(s, "cat", &got, err_));
    assert_int_equal(check(s), 0);
    tern_store_close(&s);

    /* Restoring over an existing store replaces it. */
    char db[256];
    sub(db, sizeof db, f, "db");
    OK(tern_store_restore(backup, db, err_));
    s = open_store(f, "db", 0);
    OK(tern_store_version_current(s, &cur, err_));
    assert_string_equal(cur.version, "1.0.2");
    tern_store_close(&s);

    char missing[256];
    sub(missing, sizeof missing, f, "nothing-here");
    expect_fail(tern_store_restore(missing, restored, &err), TERN_ERR_NOT_FOUND, &err,
                "no backup");
}

/* Records written behind the store's back: an index entry removed, a record from a newer
 * schema. Lookups answer clearly and the check reports both. */
static void tampered_records(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db", 0);
    tern_error err = {{0}};
    tern_category in = category("cat", 0), cat;
    OK(tern_store_category_add(s, &in, &cat, err_));
    in = category("dog", 1);
    OK(tern_store_category_add(s, &in, NULL, err_));
    tern_store_close(&s);

    char path[256];
    sub(path, sizeof path, f, "db");
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi names, cats;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 32), 0);
    assert_int_equal(mdb_env_open(env, path, 0, 0644), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "cat_by_name", 0, &names), 0);
    assert_int_equal(mdb_dbi_open(txn, "categories", 0, &cats), 0);
    MDB_val k = {3, "dog"};
    assert_int_equal(mdb_del(txn, names, &k, NULL), 0);
    const char *future = "{\"schema\": 99, \"id\": \"future\"}";
    MDB_val fk = {6, "future"}, fv = {strlen(future), (void *)future};
    assert_int_equal(mdb_put(txn, cats, &fk, &fv, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);

    s = open_store(f, "db", 0);
    tern_category got;
    expect_fail(tern_store_category_get(s, "future", &got, &err), TERN_ERR_UNSUPPORTED, &err,
                "schema 99");
    expect_fail(tern_store_category_get_by_name(s, "dog", &got, &err), TERN_ERR_NOT_FOUND, &err,
                "dog");
    OK(tern_store_category_get(s, cat.id, &got, err_));
    /* dog's missing name entry, the undecodable record, the name index count. */
    assert_int_equal(check(s), 3);
    tern_store_close(&s);
}

static void open_errors_and_allocation_failures(void **state)
{
    fixture *f = *state;
    tern_error err = {{0}};
    tern_store *s = NULL;
    char path[256];
    sub(path, sizeof path, f, "absent");
    expect_fail(tern_store_open(path, &(tern_store_options){.read_only = true}, &s, &err),
                TERN_ERR_NOT_FOUND, &err, "absent");
    assert_null(s);
    expect_fail(tern_store_open(NULL, NULL, &s, &err), TERN_ERR_INVALID, &err, NULL);

    sub(path, sizeof path, f, "db");
    int failures = 0;
    for (long i = 1; i < 20; i++) {
        test_alloc_state as = {.fail_at = i};
        tern_allocator a = test_failing_allocator(&as);
        tern_status st = tern_store_open(path, &(tern_store_options){.alloc = &a}, &s, &err);
        if (st == TERN_OK) {
            tern_category in = category("x", 0), *list;
            size_t n;
            tern_store_category_add(s, &in, NULL, &err); /* may exist from an earlier pass */
            st = tern_store_category_list(s, &list, &n, &err);
            if (st == TERN_OK)
                tern_store_free(s, list);
            else
                assert_int_equal(st, TERN_ERR_NOMEM);
            tern_store_close(&s);
        } else {
            assert_int_equal(st, TERN_ERR_NOMEM);
            assert_null(s);
            failures++;
        }
        assert_int_equal(as.live, 0);
    }
    assert_true(failures >= 1);

    /* A read-only handle refuses writes. */
    OK(tern_store_open(path, &(tern_store_options){.read_only = true}, &s, err_));
    tern_category in = category("y", 1);
    expect_fail(tern_store_category_add(s, &in, NULL, &err), TERN_ERR_STATE, &err, "read-only");
    assert_int_equal(check(s), 0);
    tern_store_close(&s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(categories, setup, teardown),
        cmocka_unit_test_setup_teardown(clients, setup, teardown),
        cmocka_unit_test(api_keys),
        cmocka_unit_test_setup_teardown(images, setup, teardown),
        cmocka_unit_test_setup_teardown(rounds, setup, teardown),
        cmocka_unit_test_setup_teardown(registry, setup, teardown),
        cmocka_unit_test_setup_teardown(map_grows, setup, teardown),
        cmocka_unit_test_setup_teardown(corrupt_blob_detected, setup, teardown),
        cmocka_unit_test_setup_teardown(commit_with_known_sha256, setup, teardown),
        cmocka_unit_test_setup_teardown(backup_and_restore, setup, teardown),
        cmocka_unit_test_setup_teardown(tampered_records, setup, teardown),
        cmocka_unit_test_setup_teardown(open_errors_and_allocation_failures, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
