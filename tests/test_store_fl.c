/* Store tests for what the federated server records: client statistics and the quality formula,
 * the server state (replaced by a commit that carries one, kept by one that does not), round
 * reports, failing a round with a reason, metrics and an optional report, refused writes that
 * leave nothing behind, client activation, the latest round, records written before these
 * fields existed, backup and restore carrying the new records, damage to them found by the
 * check, and allocation failures while loading them. Every test ends with the integrity check
 * reporting nothing (or exactly the damage it made). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <lmdb.h>
#include <math.h>
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
    snprintf(f->dir, sizeof f->dir, "/tmp/tern_test_store_fl.XXXXXX");
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

static tern_store *open_store_with(fixture *f, const char *name, const tern_allocator *alloc,
                                   bool read_only)
{
    char path[256];
    sub(path, sizeof path, f, name);
    tern_store *s = NULL;
    tern_error err = {{0}};
    tern_store_options o = {.no_sync = true, .clock = test_clock, .clock_user = f,
                            .alloc = alloc, .read_only = read_only};
    if (tern_store_open(path, &o, &s, &err) != TERN_OK)
        fail_msg("tern_store_open(%s): %s", path, err.message);
    return s;
}

static tern_store *open_store(fixture *f, const char *name)
{
    return open_store_with(f, name, NULL, false);
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

static void expect_near(double got, double want)
{
    if (fabs(got - want) > 1e-12)
        fail_msg("expected %.15g, got %.15g", want, got);
}

static tern_client_record register_client(tern_store *s, const char *name)
{
    tern_client_record c = {0}, out;
    snprintf(c.name, sizeof c.name, "%s", name);
    snprintf(c.device_type, sizeof c.device_type, "phone");
    /* A fixed, well-formed hash: hashing for real costs 100k PBKDF2 iterations per client. */
    snprintf(c.api_key_hash, sizeof c.api_key_hash, "pbkdf2-sha256$100000$%032d$%064d", 0, 0);
    OK(tern_store_client_register(s, &c, &out, err_));
    return out;
}

static tern_client_record get_client(tern_store *s, const char *id)
{
    tern_client_record c;
    OK(tern_store_client_get(s, id, &c, err_));
    return c;
}

static tern_client_metrics outcome(const tern_client_record *c, bool participated, bool rejected,
                                   double norm)
{
    tern_client_metrics m = {.participated = participated, .rejected = rejected,
                             .update_norm = norm, .num_samples = participated ? 50 : 0,
                             .loss = 0.5, .accuracy = 0.75};
    strcpy(m.client_id, c->id);
    return m;
}

static void fill_bytes(unsigned char *p, size_t n, uint64_t seed)
{
    test_rng r = {seed};
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(test_rng_next(&r) >> 56);
}

static const unsigned char MODEL[] = "model bytes";

/* A commit of round `round` (0 = create it) with a small model, no state and no report. */
static tern_round_commit commit_of(int64_t round, const tern_client_metrics *m, size_t count)
{
    return (tern_round_commit){.round = round, .clients_selected = (int32_t)count,
                               .clients_participated = 1, .global_accuracy = 0.5,
                               .global_loss = 1.0, .client_metrics = m,
                               .client_metrics_count = count, .model = MODEL,
                               .model_size = sizeof MODEL, .settings = "lr=0.1",
                               .classes = "a,b"};
}

/* Create a round and move it up to status `to` (pending, running or aggregating). */
static int64_t round_at(tern_store *s, tern_round_status to)
{
    tern_round r;
    OK(tern_store_round_create(s, 3, &r, err_));
    for (int st = TERN_ROUND_RUNNING; st <= (int)to; st++)
        OK(tern_store_round_set_status(s, r.number, (tern_round_status)st, err_));
    return r.number;
}

static void expect_state(tern_store *s, const void *want, size_t len)
{
    void *bytes = NULL;
    size_t got = 0;
    OK(tern_store_server_state_load(s, &bytes, &got, err_));
    assert_int_equal(got, len);
    assert_memory_equal(bytes, want, len);
    tern_store_free(s, bytes);
}

static void expect_report(tern_store *s, int64_t round, const char *want)
{
    char *json = NULL;
    OK(tern_store_round_report(s, round, &json, err_));
    assert_string_equal(json, want);
    tern_store_free(s, json);
}

static size_t count_status(tern_store *s, tern_round_status status)
{
    tern_round *list;
    size_t n;
    OK(tern_store_round_list_by_status(s, status, &list, &n, err_));
    tern_store_free(s, list);
    return n;
}

static bool has_status(tern_store *s, tern_round_status status, int64_t number)
{
    tern_round *list;
    size_t n;
    bool found = false;
    OK(tern_store_round_list_by_status(s, status, &list, &n, err_));
    for (size_t i = 0; i < n; i++)
        found |= list[i].number == number && list[i].status == status;
    tern_store_free(s, list);
    return found;
}

/* ---- commit: statistics, state, report ---------------------------------------------------- */

static void commit_records_stats_state_and_report(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db");
    tern_error err = {{0}};
    tern_client_record a = register_client(s, "a"), b = register_client(s, "b"),
                       c = register_client(s, "c");
    expect_fail(tern_store_server_state_load(s, &(void *){NULL}, &(size_t){0}, &err),
                TERN_ERR_NOT_FOUND, &err, "no server state");

    int64_t n1 = round_at(s, TERN_ROUND_AGGREGATING);
    f->now += 60000; /* last_seen must not follow the commit's clock */
    tern_client_metrics m[3] = {outcome(&a, true, false, 2.5), outcome(&b, false, true, 0),
                                outcome(&c, false, false, 0)};
    const char state1[] = "strategy state after round 1";
    const char *report1 = "{ \"round\": 1,\n  \"completed\": true, \"reason\": \"\" }";
    tern_round_commit cm = commit_of(n1, m, 3);
    cm.server_state = state1;
    cm.server_state_size = sizeof state1;
    cm.report_json = report1;
    tern_round r;
    OK(tern_store_commit_round(s, &cm, &r, NULL, err_));
    assert_int_equal(r.status, TERN_ROUND_COMPLETED);
    assert_string_equal(r.reason, "");

    /* One outcome each: succeeded, rejected, failed; quality (succ + 1) / (sel + 2) * 0.5^rej. */
    tern_client_record ga = get_client(s, a.id), gb = get_client(s, b.id),
                       gc = get_client(s, c.id);
    assert_int_equal(ga.rounds_selected, 1);
    assert_int_equal(ga.rounds_succeeded, 1);
    assert_int_equal(ga.rounds_failed + ga.rounds_rejected, 0);
    expect_near(ga.last_update_norm, 2.5);
    expect_near(ga.quality_score, 2.0 / 3.0);
    assert_int_equal(ga.last_seen, a.last_seen);
    assert_int_equal(gb.rounds_selected, 1);
    assert_int_equal(gb.rounds_rejected, 1);
    assert_int_equal(gb.rounds_succeeded + gb.rounds_failed, 0);
    expect_near(gb.last_update_norm, 0);
    expect_near(gb.quality_score, 1.0 / 3.0 * 0.5);
    assert_int_equal(gc.rounds_selected, 1);
    assert_int_equal(gc.rounds_failed, 1);
    assert_int_equal(gc.rounds_succeeded + gc.rounds_rejected, 0);
    expect_near(gc.quality_score, 1.0 / 3.0);
    assert_int_equal(gc.last_seen, c.last_seen);

    /* The metrics rows carry the new fields. */
    tern_client_metrics *rows;
    size_t n;
    OK(tern_store_round_client_metrics(s, n1, &rows, &n, err_));
    assert_int_equal(n, 3);
    for (size_t i = 0; i < n; i++) {
        bool is_a = strcmp(rows[i].client_id, a.id) == 0;
        bool is_b = strcmp(rows[i].client_id, b.id) == 0;
        assert_int_equal(rows[i].participated, is_a);
        assert_int_equal(rows[i].rejected, is_b);
        expect_near(rows[i].update_norm, is_a ? 2.5 : 0);
    }
    tern_store_free(s, rows);

    expect_state(s, state1, sizeof state1);
    expect_report(s, n1, report1); /* verbatim, whitespace and all */

    /* A commit without a state leaves it; its round has no report. Created directly (round 0). */
    f->now += 1000;
    tern_client_metrics m2[2] = {outcome(&a, true, false, 1.0), outcome(&b, false, true, 0)};
    cm = commit_of(0, m2, 2);
    OK(tern_store_commit_round(s, &cm, &r, NULL, err_));
    int64_t n2 = r.number;
    expect_state(s, state1, sizeof state1);
    expect_fail(tern_store_round_report(s, n2, &(char *){NULL}, &err), TERN_ERR_NOT_FOUND, &err,
                "has no report");
    expect_fail(tern_store_round_report(s, 99, &(char *){NULL}, &err), TERN_ERR_NOT_FOUND, &err,
                "no round 99");
    ga = get_client(s, a.id);
    gb = get_client(s, b.id);
    assert_int_equal(ga.rounds_selected, 2);
    assert_int_equal(ga.rounds_succeeded, 2);
    expect_near(ga.last_update_norm, 1.0);
    expect_near(ga.quality_score, 3.0 / 4.0);
    assert_int_equal(gb.rounds_selected, 2);
    assert_int_equal(gb.rounds_rejected, 2);
    expect_near(gb.quality_score, 1.0 / 4.0 * 0.25);

    /* A state-carrying commit replaces it, whatever the sizes. */
    size_t big = 300000;
    unsigned char *state3 = malloc(big);
    assert_non_null(state3);
    fill_bytes(state3, big, 7);
    cm = commit_of(0, NULL, 0);
    cm.server_state = state3;
    cm.server_state_size = big;
    cm.report_json = "{}";
    OK(tern_store_commit_round(s, &cm, &r, NULL, err_));
    expect_state(s, state3, big);
    expect_report(s, r.number, "{}");
    /* An empty state (size 0, pointer given) also means: leave it. */
    cm.server_state_size = 0;
    cm.report_json = NULL;
    OK(tern_store_commit_round(s, &cm, NULL, NULL, err_));
    expect_state(s, state3, big);
    free(state3);

    assert_int_equal(check(s), 0);
    tern_store_close(&s);
}

/* ---- failing rounds ---------------------------------------------------------------------- */

static void round_fail_from_each_status(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db");
    tern_error err = {{0}};
    tern_client_record a = register_client(s, "a"), b = register_client(s, "b");
    const char st0[] = "state";
    tern_round_commit cm = commit_of(0, NULL, 0);
    cm.server_state = st0;
    cm.server_state_size = sizeof st0;
    tern_round done;
    OK(tern_store_commit_round(s, &cm, &done, NULL, err_));

    /* From running, with metrics and a report. */
    int64_t n1 = round_at(s, TERN_ROUND_RUNNING);
    f->now += 500;
    tern_client_metrics m[2] = {outcome(&a, false, false, 0), outcome(&b, false, true, 0)};
    const char *report = "{\"completed\": false, \"reason\": \"too few clients\"}";
    OK(tern_store_round_fail(s, n1, "too few clients", m, 2, report, err_));
    tern_round r;
    OK(tern_store_round_get(s, n1, &r, err_));
    assert_int_equal(r.status, TERN_ROUND_FAILED);
    assert_string_equal(r.reason, "too few clients");
    assert_int_equal(r.ended_at, f->now);
    assert_int_equal(r.clients_participated, 0);
    assert_string_equal(r.model_version, "");
    assert_true(has_status(s, TERN_ROUND_FAILED, n1));
    assert_int_equal(count_status(s, TERN_ROUND_RUNNING), 0);
    expect_report(s, n1, report);
    tern_client_record ga = get_client(s, a.id), gb = get_client(s, b.id);
    assert_int_equal(ga.rounds_selected, 1);
    assert_int_equal(ga.rounds_failed, 1);
    expect_near(ga.quality_score, 1.0 / 3.0);
    assert_int_equal(gb.rounds_rejected, 1);
    expect_near(gb.quality_score, 1.0 / 6.0);
    tern_client_metrics *rows;
    size_t n;
    OK(tern_store_round_client_metrics(s, n1, &rows, &n, err_));
    assert_int_equal(n, 2);
    tern_store_free(s, rows);

    /* From aggregating; participated clients are counted. No report: none stored. */
    int64_t n2 = round_at(s, TERN_ROUND_AGGREGATING);
    tern_client_metrics ok = outcome(&a, true, false, 3.0);
    OK(tern_store_round_fail(s, n2, "aggregation produced NaN", &ok, 1, NULL, err_));
    OK(tern_store_round_get(s, n2, &r, err_));
    assert_int_equal(r.status, TERN_ROUND_FAILED);
    assert_int_equal(r.clients_participated, 1);
    assert_int_equal(count_status(s, TERN_ROUND_AGGREGATING), 0);
    assert_true(has_status(s, TERN_ROUND_FAILED, n2));
    expect_fail(tern_store_round_report(s, n2, &(char *){NULL}, &err), TERN_ERR_NOT_FOUND, &err,
                "has no report");
    ga = get_client(s, a.id);
    assert_int_equal(ga.rounds_selected, 2);
    assert_int_equal(ga.rounds_succeeded, 1);
    expect_near(ga.last_update_norm, 3.0);
    expect_near(ga.quality_score, 2.0 / 4.0);

    /* From pending, without metrics (a restarted server's recovery). */
    int64_t n3 = round_at(s, TERN_ROUND_PENDING);
    OK(tern_store_round_fail(s, n3, "server restarted", NULL, 0, NULL, err_));
    OK(tern_store_round_get(s, n3, &r, err_));
    assert_int_equal(r.status, TERN_ROUND_FAILED);
    assert_int_equal(count_status(s, TERN_ROUND_PENDING), 0);

    /* Terminal rounds cannot fail (again). */
    expect_fail(tern_store_round_fail(s, done.number, "late", NULL, 0, NULL, &err),
                TERN_ERR_INVALID, &err, "completed -> failed");
    expect_fail(tern_store_round_fail(s, n1, "again", NULL, 0, NULL, &err), TERN_ERR_INVALID,
                &err, "failed -> failed");
    OK(tern_store_round_get(s, n1, &r, err_));
    assert_string_equal(r.reason, "too few clients");
    expect_fail(tern_store_round_fail(s, 99, "x", NULL, 0, NULL, &err), TERN_ERR_NOT_FOUND, &err,
                "no round 99");

    /* A reason is required and must fit. */
    int64_t n4 = round_at(s, TERN_ROUND_RUNNING);
    expect_fail(tern_store_round_fail(s, n4, "", NULL, 0, NULL, &err), TERN_ERR_INVALID, &err,
                "reason");
    expect_fail(tern_store_round_fail(s, n4, NULL, NULL, 0, NULL, &err), TERN_ERR_INVALID, &err,
                "reason");
    char long_reason[TERN_STORE_TEXT_SIZE + 1];
    memset(long_reason, 'r', sizeof long_reason - 1);
    long_reason[sizeof long_reason - 1] = '\0';
    expect_fail(tern_store_round_fail(s, n4, long_reason, NULL, 0, NULL, &err), TERN_ERR_INVALID,
                &err, "longer");
    expect_fail(tern_store_round_fail(s, n4, "x", NULL, 1, NULL, &err), TERN_ERR_INVALID, &err,
                "NULL");

    /* set_status(failed) keeps the index too, and records no reason. */
    OK(tern_store_round_set_status(s, n4, TERN_ROUND_FAILED, err_));
    OK(tern_store_round_get(s, n4, &r, err_));
    assert_string_equal(r.reason, "");
    assert_true(has_status(s, TERN_ROUND_FAILED, n4));
    assert_int_equal(count_status(s, TERN_ROUND_RUNNING), 0);
    assert_int_equal(count_status(s, TERN_ROUND_FAILED), 4);
    assert_int_equal(count_status(s, TERN_ROUND_COMPLETED), 1);

    /* Failing touches neither the registry nor the server state. */
    tern_model_version *versions;
    OK(tern_store_version_list(s, &versions, &n, err_));
    assert_int_equal(n, 1);
    tern_store_free(s, versions);
    expect_state(s, st0, sizeof st0);

    assert_int_equal(check(s), 0);
    tern_store_close(&s);
}

/* ---- refused writes leave nothing ----------------------------------------------------------- */

/* Everything a commit or a failure of round `number` could have written is absent. */
static void expect_untouched(tern_store *s, int64_t number, tern_round_status status,
                             const tern_client_record *known)
{
    tern_error err = {{0}};
    tern_round r;
    OK(tern_store_round_get(s, number, &r, err_));
    assert_int_equal(r.status, status);
    assert_string_equal(r.reason, "");
    tern_client_metrics *rows;
    size_t n;
    OK(tern_store_round_client_metrics(s, number, &rows, &n, err_));
    assert_int_equal(n, 0);
    tern_store_free(s, rows);
    expect_fail(tern_store_round_report(s, number, &(char *){NULL}, &err), TERN_ERR_NOT_FOUND,
                &err, "has no report");
    expect_fail(tern_store_server_state_load(s, &(void *){NULL}, &(size_t){0}, &err),
                TERN_ERR_NOT_FOUND, &err, NULL);
    expect_fail(tern_store_version_current(s, &(tern_model_version){0}, &err), TERN_ERR_NOT_FOUND,
                &err, NULL);
    tern_client_record c = get_client(s, known->id);
    assert_int_equal(c.rounds_selected, 0);
    expect_near(c.quality_score, 1.0);
    assert_true(has_status(s, status, number));
}

static void refused_writes_leave_nothing(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db");
    tern_error err = {{0}};
    tern_client_record a = register_client(s, "a");
    tern_client_record ghost = {.id = "00000000-0000-4000-8000-000000000000"};
    int64_t agg = round_at(s, TERN_ROUND_AGGREGATING);
    const char st0[] = "state";

    /* An unknown client after a known one: the known one's statistics roll back too. */
    tern_client_metrics m[2] = {outcome(&a, true, false, 1.0), outcome(&ghost, false, false, 0)};
    tern_round_commit cm = commit_of(agg, m, 2);
    cm.server_state = st0;
    cm.server_state_size = sizeof st0;
    cm.report_json = "{\"round\": 1}";
    expect_fail(tern_store_commit_round(s, &cm, NULL, NULL, &err), TERN_ERR_NOT_FOUND, &err,
                ghost.id);
    expect_untouched(s, agg, TERN_ROUND_AGGREGATING, &a);
    expect_fail(tern_store_round_fail(s, agg, "x", m, 2, "{}", &err), TERN_ERR_NOT_FOUND, &err,
                "not registered");
    expect_untouched(s, agg, TERN_ROUND_AGGREGATING, &a);
    cm.round = 0; /* a directly completed round is not created either */
    expect_fail(tern_store_commit_round(s, &cm, NULL, NULL, &err), TERN_ERR_NOT_FOUND, &err,
                ghost.id);
    tern_round latest;
    OK(tern_store_round_latest(s, &latest, err_));
    assert_int_equal(latest.number, agg);
    cm.round = agg;

    /* The same client twice. */
    tern_client_metrics twice[2] = {outcome(&a, true, false, 1.0), outcome(&a, false, false, 0)};
    cm.client_metrics = twice;
    expect_fail(tern_store_commit_round(s, &cm, NULL, NULL, &err), TERN_ERR_INVALID, &err,
                "twice");
    expect_untouched(s, agg, TERN_ROUND_AGGREGATING, &a);

    /* Reports that are not JSON objects. */
    cm.client_metrics = m;
    cm.client_metrics_count = 1;
    const char *bad_reports[] = {"", "{\"round\": ", "[1, 2]", "\"text\"", "{} {}"};
    for (size_t i = 0; i < sizeof bad_reports / sizeof *bad_reports; i++) {
        cm.report_json = bad_reports[i];
        expect_fail(tern_store_commit_round(s, &cm, NULL, NULL, &err), TERN_ERR_INVALID, &err,
                    "round report");
        expect_fail(tern_store_round_fail(s, agg, "x", NULL, 0, bad_reports[i], &err),
                    TERN_ERR_INVALID, &err, "round report");
    }
    expect_untouched(s, agg, TERN_ROUND_AGGREGATING, &a);
    cm.report_json = NULL;

    /* Malformed metrics. */
    tern_client_metrics bad = outcome(&a, true, true, 1.0);
    cm.client_metrics = &bad;
    expect_fail(tern_store_commit_round(s, &cm, NULL, NULL, &err), TERN_ERR_INVALID, &err,
                "both participate and be rejected");
    bad = outcome(&a, true, false, -1.0);
    expect_fail(tern_store_commit_round(s, &cm, NULL, NULL, &err), TERN_ERR_INVALID, &err,
                "update_norm");
    bad = outcome(&a, true, false, NAN);
    expect_fail(tern_store_round_fail(s, agg, "x", &bad, 1, NULL, &err), TERN_ERR_INVALID, &err,
                "update_norm");
    bad = outcome(&a, true, false, INFINITY);
    expect_fail(tern_store_commit_round(s, &cm, NULL, NULL, &err), TERN_ERR_INVALID, &err,
                "update_norm");

    /* A state size without bytes. */
    cm.client_metrics = m;
    cm.server_state = NULL;
    cm.server_state_size = 3;
    expect_fail(tern_store_commit_round(s, &cm, NULL, NULL, &err), TERN_ERR_INVALID, &err, NULL);
    expect_untouched(s, agg, TERN_ROUND_AGGREGATING, &a);

    /* And the store is healthy and usable afterwards. */
    cm.server_state = st0;
    cm.server_state_size = sizeof st0;
    cm.report_json = "{\"ok\": true}";
    OK(tern_store_commit_round(s, &cm, NULL, NULL, err_));
    expect_state(s, st0, sizeof st0);
    assert_int_equal(get_client(s, a.id).rounds_succeeded, 1);
    assert_int_equal(check(s), 0);
    tern_store_close(&s);
}

/* ---- clients and rounds ------------------------------------------------------------------- */

static void set_active_and_latest(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db");
    tern_error err = {{0}};
    tern_round r;
    expect_fail(tern_store_round_latest(s, &r, &err), TERN_ERR_NOT_FOUND, &err, "no rounds");
    round_at(s, TERN_ROUND_PENDING);
    round_at(s, TERN_ROUND_RUNNING);
    int64_t last = round_at(s, TERN_ROUND_RUNNING);
    OK(tern_store_round_fail(s, last, "timeout", NULL, 0, NULL, err_));
    OK(tern_store_round_latest(s, &r, err_));
    assert_int_equal(r.number, 3);
    assert_int_equal(r.status, TERN_ROUND_FAILED);
    assert_string_equal(r.reason, "timeout");

    tern_client_record a = register_client(s, "a");
    OK(tern_store_client_set_active(s, a.id, false, "admin", err_));
    assert_false(get_client(s, a.id).active);
    OK(tern_store_client_set_active(s, a.id, false, "admin", err_)); /* no change, no entry */
    OK(tern_store_client_set_active(s, a.id, true, "ops", err_));
    assert_true(get_client(s, a.id).active);
    tern_audit_entry *audit;
    size_t n;
    OK(tern_store_audit_list(s, 0, 0, &audit, &n, err_));
    assert_int_equal(n, 2);
    assert_string_equal(audit[0].action, "client.set_active");
    assert_string_equal(audit[0].actor, "admin");
    assert_string_equal(audit[0].target, a.id);
    assert_non_null(strstr(audit[0].detail, "deactivated"));
    assert_string_equal(audit[1].actor, "ops");
    assert_non_null(strstr(audit[1].detail, "'a' activated"));
    tern_store_free(s, audit);

    /* A blacklisted client stays inactive until the blacklist is cleared. */
    OK(tern_store_client_set_blacklisted(s, a.id, true, "poisoned updates", "admin", err_));
    expect_fail(tern_store_client_set_active(s, a.id, true, "admin", &err), TERN_ERR_INVALID, &err,
                "blacklisted");
    OK(tern_store_client_set_active(s, a.id, false, "admin", err_));
    assert_false(get_client(s, a.id).active);
    expect_fail(tern_store_client_set_active(s, "ghost", true, "admin", &err), TERN_ERR_NOT_FOUND,
                &err, "ghost");
    expect_fail(tern_store_client_set_active(s, NULL, true, "admin", &err), TERN_ERR_INVALID, &err,
                NULL);
    assert_int_equal(check(s), 0);
    tern_store_close(&s);
}

/* ---- records from before these fields ------------------------------------------------------ */

static void put_raw(const char *path, const char *db, const void *key, size_t klen,
                    const char *json)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 32), 0);
    assert_int_equal(mdb_env_open(env, path, 0, 0644), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, db, 0, &dbi), 0);
    MDB_val k = {klen, (void *)key}, v = {strlen(json), (void *)json};
    assert_int_equal(mdb_put(txn, dbi, &k, &v, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
}

static void be64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)v;
}

static void old_records_still_decode(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db");
    tern_client_record a = register_client(s, "a");
    int64_t n1 = round_at(s, TERN_ROUND_RUNNING);
    OK(tern_store_round_set_status(s, n1, TERN_ROUND_FAILED, err_));
    tern_store_close(&s);

    /* The records exactly as the previous store code wrote them. */
    char path[256], json[1024];
    sub(path, sizeof path, f, "db");
    snprintf(json, sizeof json,
             "{\"schema\":1,\"id\":\"%s\",\"name\":\"a\",\"device_type\":\"phone\","
             "\"os_info\":\"\",\"registered_at\":1700000000000,\"last_seen\":1700000000000,"
             "\"active\":true,\"total_samples\":7,\"api_key_hash\":\"%s\","
             "\"quality_score\":0.75,\"blacklisted\":false,\"blacklist_reason\":\"\"}",
             a.id, a.api_key_hash);
    put_raw(path, "clients", a.id, strlen(a.id), json);
    unsigned char rk[8 + TERN_STORE_ID_SIZE];
    be64(rk, (uint64_t)n1);
    put_raw(path, "rounds", rk, 8,
            "{\"schema\":1,\"number\":1,\"status\":\"failed\",\"clients_selected\":3,"
            "\"clients_participated\":0,\"started_at\":1700000000000,\"ended_at\":1700000000000,"
            "\"global_accuracy\":0.0,\"global_loss\":0.0,\"model_version\":\"\"}");
    memcpy(rk + 8, a.id, strlen(a.id));
    snprintf(json, sizeof json,
             "{\"schema\":1,\"client_id\":\"%s\",\"participated\":true,\"num_samples\":5,"
             "\"loss\":0.5,\"accuracy\":0.25}",
             a.id);
    put_raw(path, "round_clients", rk, 8 + strlen(a.id), json);

    /* Read-only first: the CLI opens stores that way, and so does restore. */
    s = open_store_with(f, "db", NULL, true);
    tern_client_record got = get_client(s, a.id);
    assert_int_equal(got.total_samples, 7);
    expect_near(got.quality_score, 0.75);
    assert_int_equal(got.rounds_selected + got.rounds_succeeded + got.rounds_failed +
                         got.rounds_rejected,
                     0);
    expect_near(got.last_update_norm, 0);
    tern_round r;
    OK(tern_store_round_get(s, n1, &r, err_));
    assert_int_equal(r.status, TERN_ROUND_FAILED);
    assert_string_equal(r.reason, "");
    tern_client_metrics *rows;
    size_t n;
    OK(tern_store_round_client_metrics(s, n1, &rows, &n, err_));
    assert_int_equal(n, 1);
    assert_true(rows[0].participated);
    assert_false(rows[0].rejected);
    expect_near(rows[0].update_norm, 0);
    tern_store_free(s, rows);
    tern_error err = {{0}};
    expect_fail(tern_store_server_state_load(s, &(void *){NULL}, &(size_t){0}, &err),
                TERN_ERR_NOT_FOUND, &err, NULL);
    assert_int_equal(check(s), 0);
    tern_store_close(&s);

    /* Writable: the statistics start from 0. */
    s = open_store(f, "db");
    tern_client_metrics m = outcome(&a, true, false, 4.0);
    tern_round_commit cm = commit_of(0, &m, 1);
    OK(tern_store_commit_round(s, &cm, NULL, NULL, err_));
    got = get_client(s, a.id);
    assert_int_equal(got.rounds_selected, 1);
    assert_int_equal(got.rounds_succeeded, 1);
    assert_int_equal(got.total_samples, 7);
    expect_near(got.quality_score, 2.0 / 3.0);
    assert_int_equal(check(s), 0);
    tern_store_close(&s);
}

/* ---- backup, damage, allocation failures ------------------------------------------------ */

static void backup_carries_state_and_reports(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db");
    tern_client_record a = register_client(s, "a");
    tern_client_metrics m = outcome(&a, true, false, 2.0);
    const char st1[] = "state one";
    tern_round_commit cm = commit_of(0, &m, 1);
    cm.server_state = st1;
    cm.server_state_size = sizeof st1;
    cm.report_json = "{\"round\": 1}";
    OK(tern_store_commit_round(s, &cm, NULL, NULL, err_));
    int64_t n2 = round_at(s, TERN_ROUND_RUNNING);
    m = outcome(&a, false, true, 0);
    OK(tern_store_round_fail(s, n2, "rejected updates", &m, 1, "{\"round\": 2}", err_));
    char backup[256], restored[256];
    sub(backup, sizeof backup, f, "backup");
    sub(restored, sizeof restored, f, "restored");
    OK(tern_store_backup(s, backup, err_));
    tern_store_close(&s);

    OK(tern_store_restore(backup, restored, err_));
    s = open_store(f, "restored");
    expect_state(s, st1, sizeof st1);
    expect_report(s, 1, "{\"round\": 1}");
    expect_report(s, n2, "{\"round\": 2}");
    tern_round r;
    OK(tern_store_round_get(s, n2, &r, err_));
    assert_string_equal(r.reason, "rejected updates");
    tern_client_record got = get_client(s, a.id);
    assert_int_equal(got.rounds_selected, 2);
    assert_int_equal(got.rounds_rejected, 1);
    expect_near(got.last_update_norm, 2.0);
    assert_int_equal(check(s), 0);
    tern_store_close(&s);
}

/* Damage behind the store's back: the check names it, and loading the state refuses it. */
static void damaged_records_are_found(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db");
    tern_error err = {{0}};
    const char st1[] = "state one";
    tern_round_commit cm = commit_of(0, NULL, 0);
    cm.server_state = st1;
    cm.server_state_size = sizeof st1;
    cm.report_json = "{\"round\": 1}";
    OK(tern_store_commit_round(s, &cm, NULL, NULL, err_));
    tern_store_close(&s);

    char path[256];
    sub(path, sizeof path, f, "db");
    put_raw(path, "meta", "server_state", 12, "state two");
    unsigned char key[14] = "report";
    be64(key + 6, 1);
    put_raw(path, "meta", key, sizeof key, "[\"not an object\"]");
    be64(key + 6, 77);
    put_raw(path, "meta", key, sizeof key, "{}");

    s = open_store(f, "db");
    void *bytes = NULL;
    size_t len = 0;
    expect_fail(tern_store_server_state_load(s, &bytes, &len, &err), TERN_ERR_FORMAT, &err,
                "corrupt");
    assert_null(bytes);
    /* The state's hash, round 1's report, the report of a round that does not exist. */
    assert_int_equal(check(s), 3);
    tern_store_close(&s);
}

static void allocation_failures(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db");
    const char st1[] = "state one";
    tern_round_commit cm = commit_of(0, NULL, 0);
    cm.server_state = st1;
    cm.server_state_size = sizeof st1;
    cm.report_json = "{\"round\": 1}";
    OK(tern_store_commit_round(s, &cm, NULL, NULL, err_));
    tern_store_close(&s);

    for (int which = 0; which < 2; which++) {
        test_alloc_state as = {0};
        tern_allocator a = test_failing_allocator(&as);
        s = open_store_with(f, "db", &a, true);
        as.fail_at = as.count + 1; /* the next allocation: the copy */
        tern_error err = {{0}};
        void *bytes = NULL;
        size_t len = 0;
        char *json = NULL;
        tern_status st = which ? tern_store_round_report(s, 1, &json, &err)
                               : tern_store_server_state_load(s, &bytes, &len, &err);
        expect_fail(st, TERN_ERR_NOMEM, &err, "out of memory");
        assert_null(bytes);
        assert_null(json);
        tern_store_close(&s);
        assert_int_equal(as.live, 0);
    }
}

/* The privacy ledger: charges added by commits (merged when sigma and q repeat) and by
 * tern_store_privacy_charge, nothing added by a refused commit, bad charges refused, and the
 * ledger read back after the store is closed and opened again (a restarted server). */
static void privacy_ledger(void **state)
{
    fixture *f = *state;
    tern_store *s = open_store(f, "db");
    tern_client_record a = register_client(s, "a"), b = register_client(s, "b");
    tern_client_metrics m[2] = {outcome(&a, true, false, 1.0), outcome(&b, true, false, 1.0)};
    tern_privacy_charge ch[3] = {{.noise_multiplier = 1.1, .sample_rate = 0.25, .steps = 4},
                                 {.noise_multiplier = 1.1, .sample_rate = 0.125, .steps = 8},
                                 {.noise_multiplier = 0.7, .sample_rate = 0.5, .steps = 1}};
    strcpy(ch[0].subject, a.id);
    strcpy(ch[1].subject, b.id);
    strcpy(ch[2].subject, TERN_PRIVACY_CENTRAL);
    tern_privacy_charge *h = NULL;
    size_t n = 99;
    tern_privacy_account acc;
    OK(tern_store_privacy_history(s, a.id, &h, &n, &acc, err_));
    assert_int_equal(n, 0);
    assert_null(h);
    assert_int_equal(acc.rounds, 0);

    tern_round_commit cm = commit_of(0, m, 2);
    cm.privacy = ch;
    cm.privacy_count = 3;
    tern_round r1, r2;
    OK(tern_store_commit_round(s, &cm, &r1, NULL, err_));
    /* The same charges again: a's history stays one entry with twice the steps. */
    ch[0].steps = 6;
    OK(tern_store_commit_round(s, &cm, &r2, NULL, err_));
    OK(tern_store_privacy_history(s, a.id, &h, &n, &acc, err_));
    assert_int_equal(n, 1);
    assert_string_equal(h[0].subject, a.id);
    assert_true(h[0].noise_multiplier == 1.1 && h[0].sample_rate == 0.25);
    assert_int_equal(h[0].steps, 10);
    assert_int_equal(acc.rounds, 2);
    assert_int_equal(acc.last_round, r2.number);
    assert_int_equal(acc.last.steps, 6);
    assert_true(acc.last.noise_multiplier == 1.1 && acc.last.sample_rate == 0.25);
    tern_store_free(s, h);

    /* Another (sigma, q) appends an entry; a failed round's charge goes in on its own. */
    tern_privacy_charge other = {.noise_multiplier = 2.0, .sample_rate = 0.25, .steps = 3};
    strcpy(other.subject, a.id);
    OK(tern_store_privacy_charge(s, r2.number + 1, &other, 1, err_));

    /* A refused commit (an unknown client in its metrics) charges nobody; so does one whose
     * charge names an unknown client, or is out of range. */
    tern_error err = {{0}};
    tern_client_metrics ghost = outcome(&a, true, false, 1.0);
    strcpy(ghost.client_id, "00000000-0000-4000-8000-000000000000");
    cm = commit_of(0, &ghost, 1);
    cm.privacy = ch;
    cm.privacy_count = 1;
    expect_fail(tern_store_commit_round(s, &cm, NULL, NULL, &err), TERN_ERR_NOT_FOUND, &err,
                NULL);
    cm = commit_of(0, m, 1);
    tern_privacy_charge bad = ch[0];
    strcpy(bad.subject, "00000000-0000-4000-8000-000000000000");
    cm.privacy = &bad;
    cm.privacy_count = 1;
    expect_fail(tern_store_commit_round(s, &cm, NULL, NULL, &err), TERN_ERR_NOT_FOUND, &err,
                "not registered");
    bad = ch[0];
    bad.sample_rate = 1.5;
    expect_fail(tern_store_commit_round(s, &cm, NULL, NULL, &err), TERN_ERR_INVALID, &err,
                "sample rate");
    bad = ch[0];
    bad.noise_multiplier = 0;
    expect_fail(tern_store_commit_round(s, &cm, NULL, NULL, &err), TERN_ERR_INVALID, &err,
                "noise multiplier");
    tern_privacy_charge twice[2] = {ch[0], ch[0]};
    cm.privacy = twice;
    cm.privacy_count = 2;
    expect_fail(tern_store_commit_round(s, &cm, NULL, NULL, &err), TERN_ERR_INVALID, &err,
                "both name");
    expect_fail(tern_store_privacy_history(s, "", &h, &n, NULL, &err), TERN_ERR_INVALID, &err,
                NULL);
    assert_int_equal(check(s), 0);
    tern_store_close(&s);

    /* Reopened: everything as committed. */
    s = open_store(f, "db");
    OK(tern_store_privacy_history(s, a.id, &h, &n, &acc, err_));
    assert_int_equal(n, 2);
    assert_int_equal(h[0].steps, 10);
    assert_true(h[1].noise_multiplier == 2.0 && h[1].sample_rate == 0.25);
    assert_int_equal(h[1].steps, 3);
    assert_int_equal(acc.rounds, 3);
    assert_int_equal(acc.last.steps, 3);
    tern_store_free(s, h);
    OK(tern_store_privacy_history(s, b.id, &h, &n, &acc, err_));
    assert_int_equal(n, 1);
    assert_true(h[0].sample_rate == 0.125);
    assert_int_equal(h[0].steps, 16);
    assert_int_equal(acc.rounds, 2);
    tern_store_free(s, h);
    OK(tern_store_privacy_history(s, TERN_PRIVACY_CENTRAL, &h, &n, &acc, err_));
    assert_int_equal(n, 1);
    assert_true(h[0].noise_multiplier == 0.7 && h[0].sample_rate == 0.5);
    assert_int_equal(h[0].steps, 2);
    tern_store_free(s, h);
    assert_int_equal(check(s), 0);
    tern_store_close(&s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(commit_records_stats_state_and_report, setup, teardown),
        cmocka_unit_test_setup_teardown(round_fail_from_each_status, setup, teardown),
        cmocka_unit_test_setup_teardown(refused_writes_leave_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(set_active_and_latest, setup, teardown),
        cmocka_unit_test_setup_teardown(old_records_still_decode, setup, teardown),
        cmocka_unit_test_setup_teardown(backup_carries_state_and_reports, setup, teardown),
        cmocka_unit_test_setup_teardown(damaged_records_are_found, setup, teardown),
        cmocka_unit_test_setup_teardown(allocation_failures, setup, teardown),
        cmocka_unit_test_setup_teardown(privacy_ledger, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
