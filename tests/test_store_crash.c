/* Store crash consistency and multi-process use.
 *
 * killed_writer: a child process runs a federated server's store traffic (recover unfinished
 * rounds as failed with a reason, then create -> running -> aggregating -> commit with a model
 * blob, client metrics, a report and the server state, in a loop) and is killed with SIGKILL
 * after a random delay, 40 times. After each kill the parent opens the store, the integrity
 * check must pass, and every round is either completed with everything (record, version, blob
 * with the exact bytes that round wrote, current pointer on the newest, report, the client's
 * statistics counting it, the server state it wrote if it is the newest) or not completed with
 * nothing of it in the registry.
 *
 * concurrent_processes: a writer child commits rounds while a reader child lists versions in a
 * loop (every listing ordered, never shrinking, each version backed by its completed round and
 * a loadable blob) and the parent takes a hot backup in the middle, which must check clean. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tern.h"
#include "testutil.h"

#define KILLS 40

static int setup(void **state)
{
    char *dir = malloc(64);
    if (!dir)
        return -1;
    snprintf(dir, 64, "/tmp/tern_test_store_crash.XXXXXX");
    if (!mkdtemp(dir)) {
        free(dir);
        return -1;
    }
    *state = dir;
    return 0;
}

static int teardown(void **state)
{
    test_rm_tree(*state);
    free(*state);
    return 0;
}

static void sleep_ms(double ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)((ms - 1000 * (time_t)(ms / 1000)) * 1e6)};
    nanosleep(&ts, NULL);
}

/* The model a round writes: its size and bytes are functions of the round number, so a reader
 * can tell a complete blob from anything else. */
static size_t model_size(int64_t round, size_t base)
{
    return base + (size_t)(round * 7919 % 65536);
}

static void model_bytes(unsigned char *p, size_t n, int64_t round)
{
    test_rng r = {(uint64_t)round * 0x9e3779b97f4a7c15ull};
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(test_rng_next(&r) >> 56);
}

/* The server state and the report a round commits. */
static void state_text(char out[64], int64_t round)
{
    snprintf(out, 64, "server state after round %lld", (long long)round);
}

static void report_text(char out[64], int64_t round)
{
    snprintf(out, 64, "{\"round\": %lld}", (long long)round);
}

#define RESTART_REASON "server restarted"

/* ---- the writer (child process) -------------------------------------------------------- */

/* Never returns. Exit codes: 0 done, 2 open failed, 3 a store call failed. */
static void writer(const char *dir, size_t base, int64_t max_rounds, bool sync)
{
    tern_store *s = NULL;
    tern_error err = {{0}};
    if (tern_store_open(dir, &(tern_store_options){.no_sync = !sync}, &s, &err) != TERN_OK) {
        fprintf(stderr, "writer: open: %s\n", err.message);
        _exit(2);
    }
    /* The one client every round selects. */
    tern_client_record client;
    tern_status st = tern_store_client_get_by_name(s, "c1", &client, &err);
    if (st == TERN_ERR_NOT_FOUND) {
        tern_client_record in = {.name = "c1"};
        snprintf(in.api_key_hash, sizeof in.api_key_hash, "pbkdf2-sha256$100000$%032d$%064d", 0, 0);
        st = tern_store_client_register(s, &in, &client, &err);
    }
    if (st)
        goto fail;
    /* What a restarted server does first: rounds left unfinished by the crash are failed. */
    for (int status = TERN_ROUND_PENDING; status <= TERN_ROUND_AGGREGATING; status++) {
        tern_round *list;
        size_t n;
        if (tern_store_round_list_by_status(s, (tern_round_status)status, &list, &n, &err))
            goto fail;
        for (size_t i = 0; i < n; i++)
            if (tern_store_round_fail(s, list[i].number, RESTART_REASON, NULL, 0, NULL, &err)) {
                tern_store_free(s, list);
                goto fail;
            }
        tern_store_free(s, list);
    }
    unsigned char *model = malloc(base + 65536);
    if (!model)
        _exit(3);
    for (int64_t i = 0; i < max_rounds; i++) {
        tern_round r;
        if (tern_store_round_create(s, 4, &r, &err) ||
            tern_store_round_set_status(s, r.number, TERN_ROUND_RUNNING, &err) ||
            tern_store_round_set_status(s, r.number, TERN_ROUND_AGGREGATING, &err))
            goto fail;
        size_t size = model_size(r.number, base);
        model_bytes(model, size, r.number);
        tern_client_metrics m = {.participated = true, .num_samples = 10, .update_norm = 1.5};
        strcpy(m.client_id, client.id);
        char state[64], report[64];
        state_text(state, r.number);
        report_text(report, r.number);
        tern_round_commit c = {.round = r.number, .clients_participated = 1,
                               .global_accuracy = 0.5, .global_loss = 1.0,
                               .client_metrics = &m, .client_metrics_count = 1, .model = model,
                               .model_size = size, .settings = "lr=0.1", .classes = "a,b",
                               .server_state = state, .server_state_size = strlen(state),
                               .report_json = report};
        if (tern_store_commit_round(s, &c, NULL, NULL, &err))
            goto fail;
    }
    free(model);
    tern_store_close(&s);
    _exit(0);
fail:
    fprintf(stderr, "writer: %s\n", err.message);
    _exit(3);
}

/* ---- verification ------------------------------------------------------------------------- */

static void print_problem(void *user, const char *message)
{
    (void)user;
    print_message("check: %s\n", message);
}

/* After a kill: the store checks clean (which hashes every blob), completed rounds are whole,
 * others left no trace. Byte-for-byte comparison covers the completed rounds from index
 * `from` on (those new since the last verification). Returns the number of completed rounds. */
static size_t verify_after_kill(const char *dir, size_t base, size_t from)
{
    tern_store *s = NULL;
    tern_error err = {{0}};
    if (tern_store_open(dir, NULL, &s, &err) != TERN_OK)
        fail_msg("open after kill: %s", err.message);
    size_t problems = 0;
    if (tern_store_check(s, print_problem, NULL, &problems, &err) != TERN_OK)
        fail_msg("check: %s", err.message);
    assert_int_equal(problems, 0);

    tern_round *done;
    size_t ndone;
    tern_model_version *versions;
    size_t nversions;
    if (tern_store_round_list_by_status(s, TERN_ROUND_COMPLETED, &done, &ndone, &err) ||
        tern_store_version_list(s, &versions, &nversions, &err))
        fail_msg("listing: %s", err.message);
    assert_int_equal(nversions, ndone); /* no version without its completed round */
    unsigned char *expect = malloc(base + 65536);
    assert_non_null(expect);
    for (size_t i = from < ndone ? from : ndone; i < ndone; i++) {
        void *bytes;
        size_t len;
        tern_model_version v;
        if (tern_store_version_load(s, done[i].model_version, &bytes, &len, &v, &err))
            fail_msg("round %lld: %s", (long long)done[i].number, err.message);
        assert_int_equal(v.round, done[i].number);
        assert_int_equal(len, model_size(done[i].number, base));
        model_bytes(expect, len, done[i].number);
        assert_memory_equal(bytes, expect, len);
        tern_store_free(s, bytes);
        char *report, want[64];
        if (tern_store_round_report(s, done[i].number, &report, &err))
            fail_msg("round %lld: %s", (long long)done[i].number, err.message);
        report_text(want, done[i].number);
        assert_string_equal(report, want);
        tern_store_free(s, report);
    }
    free(expect);
    /* The client's statistics count exactly the completed rounds. */
    tern_client_record client;
    tern_status st = tern_store_client_get_by_name(s, "c1", &client, &err);
    if (st == TERN_OK) {
        assert_int_equal(client.rounds_selected, (int64_t)ndone);
        assert_int_equal(client.rounds_succeeded, (int64_t)ndone);
        assert_int_equal(client.rounds_failed + client.rounds_rejected, 0);
    } else {
        assert_int_equal(st, TERN_ERR_NOT_FOUND);
        assert_int_equal(ndone, 0);
    }
    void *state;
    size_t state_len;
    st = tern_store_server_state_load(s, &state, &state_len, &err);
    if (ndone) {
        tern_model_version cur;
        if (tern_store_version_current(s, &cur, &err))
            fail_msg("current: %s", err.message);
        assert_string_equal(cur.version, done[ndone - 1].model_version);
        char want[64];
        if (st)
            fail_msg("server state: %s", err.message);
        state_text(want, done[ndone - 1].number);
        assert_int_equal(state_len, strlen(want));
        assert_memory_equal(state, want, state_len);
        tern_store_free(s, state);
    } else {
        tern_model_version cur;
        assert_int_equal(tern_store_version_current(s, &cur, &err), TERN_ERR_NOT_FOUND);
        assert_int_equal(st, TERN_ERR_NOT_FOUND);
    }
    /* Rounds that a crash interrupted were failed with the restart's reason. */
    tern_round *failed;
    size_t nfailed;
    if (tern_store_round_list_by_status(s, TERN_ROUND_FAILED, &failed, &nfailed, &err))
        fail_msg("listing: %s", err.message);
    for (size_t i = 0; i < nfailed; i++)
        assert_string_equal(failed[i].reason, RESTART_REASON);
    tern_store_free(s, failed);
    tern_store_free(s, done);
    tern_store_free(s, versions);
    tern_store_close(&s);
    return ndone;
}

static void killed_writer(void **state)
{
    char dir[128];
    snprintf(dir, sizeof dir, "%s/db", (const char *)*state);
    const size_t base = 64 << 10;
    test_rng rng = {12345};
    size_t completed = 0, failed_total = 0;
    for (int k = 0; k < KILLS; k++) {
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0)
            writer(dir, base, INT64_MAX, true);
        sleep_ms(test_rng_uniform(&rng, 10.0f, 150.0f));
        kill(pid, SIGKILL);
        int status;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        if (!WIFSIGNALED(status))
            fail_msg("writer exited with %d before the kill", WEXITSTATUS(status));
        size_t now = verify_after_kill(dir, base, completed ? completed - 1 : 0);
        assert_true(now >= completed); /* committed rounds are never lost */
        completed = now;
    }
    tern_store *s = NULL;
    tern_error err = {{0}};
    tern_round *failed;
    if (tern_store_open(dir, NULL, &s, &err) ||
        tern_store_round_list_by_status(s, TERN_ROUND_FAILED, &failed, &failed_total, &err))
        fail_msg("%s", err.message);
    tern_store_free(s, failed);
    tern_store_close(&s);
    print_message("killed %d times: %zu rounds completed, %zu recovered as failed\n", KILLS,
                  completed, failed_total);
    /* The writer made progress between kills (slow under sanitizers, so the bar is low). */
    assert_true(completed >= 5);
}

/* ---- concurrent processes ----------------------------------------------------------------- */

/* Never returns. Lists versions until it has seen target of them (or 60 s pass). */
static void reader(const char *dir, size_t base, size_t target)
{
    tern_store *s = NULL;
    tern_error err = {{0}};
    for (int i = 0; i < 2000 && tern_store_open(dir, &(tern_store_options){.read_only = true},
                                                &s, &err) != TERN_OK;
         i++)
        sleep_ms(5); /* the writer creates the store */
    if (!s) {
        fprintf(stderr, "reader: open: %s\n", err.message);
        _exit(2);
    }
    unsigned char *expect = malloc(base + 65536);
    if (!expect)
        _exit(2);
    size_t last = 0, listings = 0, changes = 0;
    time_t deadline = time(NULL) + 60;
    while (last < target && time(NULL) < deadline) {
        tern_model_version *v;
        size_t n;
        if (tern_store_version_list(s, &v, &n, &err)) {
            fprintf(stderr, "reader: list: %s\n", err.message);
            _exit(3);
        }
        listings++;
        if (n < last) {
            fprintf(stderr, "reader: listing shrank from %zu to %zu\n", last, n);
            _exit(4);
        }
        changes += n != last;
        for (size_t i = 0; i < n; i++) {
            tern_round r;
            if (i && v[i].round <= v[i - 1].round) {
                fprintf(stderr, "reader: versions out of order\n");
                _exit(4);
            }
            if (tern_store_round_get(s, v[i].round, &r, &err) ||
                r.status != TERN_ROUND_COMPLETED || strcmp(r.model_version, v[i].version) != 0) {
                fprintf(stderr, "reader: version %s without its completed round\n", v[i].version);
                _exit(4);
            }
        }
        if (n) {
            void *bytes;
            size_t len;
            if (tern_store_version_load(s, v[n - 1].version, &bytes, &len, NULL, &err)) {
                fprintf(stderr, "reader: load: %s\n", err.message);
                _exit(4);
            }
            model_bytes(expect, len, v[n - 1].round);
            bool same = len == model_size(v[n - 1].round, base) && !memcmp(bytes, expect, len);
            tern_store_free(s, bytes);
            if (!same) {
                fprintf(stderr, "reader: version %s has the wrong bytes\n", v[n - 1].version);
                _exit(4);
            }
        }
        last = n;
        tern_store_free(s, v);
    }
    free(expect);
    tern_store_close(&s);
    if (last < target) {
        fprintf(stderr, "reader: saw %zu of %zu versions\n", last, target);
        _exit(5);
    }
    /* At least one listing caught the writer mid-way. */
    _exit(listings > 2 && changes >= 2 ? 0 : 6);
}

static void concurrent_processes(void **state)
{
    char dir[128], backup[128];
    snprintf(dir, sizeof dir, "%s/db", (const char *)*state);
    snprintf(backup, sizeof backup, "%s/backup", (const char *)*state);
    const size_t base = 256 << 10;
    const int64_t rounds = 60;
    /* Create the store first so both children open an existing environment. */
    tern_store *s = NULL;
    tern_error err = {{0}};
    if (tern_store_open(dir, NULL, &s, &err))
        fail_msg("%s", err.message);
    tern_store_close(&s);

    pid_t rpid = fork();
    assert_true(rpid >= 0);
    if (rpid == 0)
        reader(dir, base, (size_t)rounds);
    pid_t wpid = fork();
    assert_true(wpid >= 0);
    if (wpid == 0)
        writer(dir, base, rounds, true);

    /* A hot backup while both run, once the writer is a third of the way through. */
    if (tern_store_open(dir, NULL, &s, &err))
        fail_msg("open: %s", err.message);
    for (int i = 0; i < 6000; i++) {
        tern_model_version *v;
        size_t n;
        if (tern_store_version_list(s, &v, &n, &err))
            fail_msg("list: %s", err.message);
        tern_store_free(s, v);
        if (n >= (size_t)rounds / 3)
            break;
        sleep_ms(5);
    }
    if (tern_store_backup(s, backup, &err))
        fail_msg("backup: %s", err.message);
    tern_store_close(&s);

    int status;
    assert_int_equal(waitpid(wpid, &status, 0), wpid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_int_equal(waitpid(rpid, &status, 0), rpid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);

    size_t backed_up = verify_after_kill(backup, base, 0);
    assert_true(backed_up <= (size_t)rounds);
    assert_int_equal(verify_after_kill(dir, base, 0), (size_t)rounds);
    print_message("hot backup taken with %zu of %lld rounds\n", backed_up, (long long)rounds);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(killed_writer, setup, teardown),
        cmocka_unit_test_setup_teardown(concurrent_processes, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
