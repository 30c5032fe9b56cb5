/* Federated runs end to end, with real processes on 127.0.0.1: `tern server run` and
 * `tern client run` ($TERN_BIN, set by CTest) on a small Fashion-MNIST subset with a tiny model.
 *
 *   - a few clients, a couple of rounds: metrics reported, versions committed;
 *   - a client killed with SIGKILL in the middle of its fit: the tolerant policy completes the
 *     round, the strict one fails it cleanly and the next round runs;
 *   - the server killed with SIGKILL mid-round and restarted: it resumes, the store holds no
 *     duplicate or partial round, and (FedAvg, fixed seeds) the final model equals an
 *     uninterrupted run's, byte for byte (SHA-256);
 *   - unregistered clients and wrong keys are refused (exit status 2 and a message);
 *   - CURVE: what crosses the wire (seen by a relay in this test) holds neither the protocol
 *     magic nor the client's name, which it does with --insecure;
 *   - malformed, oversized, wrong-version and multi-part frames from a raw DEALER get ERROR
 *     replies and the server goes on serving.
 *
 * Servers bind port 0; the tests read the port from the server's log. */
#define _GNU_SOURCE
#include <czmq.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "tern.h"
#include "tern/protocol.h"
#include "testutil.h"

extern char **environ;

/* Tiny and quick: a quarter-width Small, a few steps per round, short heartbeats. */
#define INIT_ARGS "--width-mult", "0.25", "--seed", "7"
#define RUN_ARGS                                                                               \
    "--endpoint", "tcp://127.0.0.1:0", "--batch", "16", "--max-steps", "4", "--lr", "0.05",   \
        "--heartbeat-ms", "200", "--seed", "3", "--round-timeout", "60", "--wait-timeout",     \
        "60"
#define DATA_ARGS                                                                              \
    "--partition", "iid", "--limit", "160", "--eval-fraction", "0.25", "--threads", "1"

typedef struct env {
    char dir[64];
} env;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void sleep_ms(int ms)
{
    nanosleep(&(struct timespec){ms / 1000, (long)(ms % 1000) * 1000000L}, NULL);
}

static bool have_fashion(void)
{
    const char *dir = getenv("TERN_FASHION_MNIST");
    char path[512];
    snprintf(path, sizeof path, "%s/t10k-labels-idx1-ubyte.gz",
             dir && *dir ? dir : "/usr/share/datasets/fashion-mnist");
    struct stat sb;
    return stat(path, &sb) == 0;
}

static int setup(void **state)
{
    env *e = calloc(1, sizeof *e);
    if (!e)
        return -1;
    snprintf(e->dir, sizeof e->dir, "/tmp/tern-fl-XXXXXX");
    if (!mkdtemp(e->dir))
        return -1;
    *state = e;
    return 0;
}

static int teardown(void **state)
{
    env *e = *state;
    test_rm_tree(e->dir);
    free(e);
    return 0;
}

/* ---- processes ------------------------------------------------------------------------------ */

/* Starts TERN_BIN with args (NULL-terminated), output to log, TERN_API_KEY=key when key. */
static pid_t start(const char *log, const char *key, const char *const *args)
{
    const char *argv[64];
    int n = 0;
    argv[n++] = test_tern_bin();
    for (; args[n - 1] && n < 63; n++)
        argv[n] = args[n - 1];
    argv[n] = NULL;
    char keyvar[128];
    size_t ne = 0;
    while (environ[ne])
        ne++;
    char **envp = calloc(ne + 2, sizeof *envp);
    assert_non_null(envp);
    size_t k = 0;
    for (size_t i = 0; i < ne; i++)
        if (strncmp(environ[i], "TERN_API_KEY=", 13) != 0)
            envp[k++] = environ[i];
    if (key) {
        snprintf(keyvar, sizeof keyvar, "TERN_API_KEY=%s", key);
        envp[k++] = keyvar;
    }
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execve(argv[0], (char *const *)argv, envp);
        _exit(127);
    }
    free(envp);
    assert_true(pid > 0);
    return pid;
}

/* Exit status, 128 + signal when killed by one, -1 when still running after timeout seconds
 * (then it is killed). */
static int finish(pid_t pid, double timeout)
{
    double end = now() + timeout;
    for (;;) {
        int st;
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        if (now() > end) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            return -1;
        }
        sleep_ms(20);
    }
}

#define VA_ARGS(...) ((const char *const[]){__VA_ARGS__, NULL})

static int run(const char *log, const char *const *args)
{
    return finish(start(log, NULL, args), 180);
}

static bool log_has(const char *path, const char *needle)
{
    char *t = test_slurp(path);
    bool has = t && strstr(t, needle);
    free(t);
    return has;
}

static bool wait_text(const char *path, const char *needle, double timeout)
{
    double end = now() + timeout;
    while (now() < end) {
        if (log_has(path, needle))
            return true;
        sleep_ms(50);
    }
    fprintf(stderr, "no '%s' in %s after %.0f s\n", needle, path, timeout);
    char *t = test_slurp(path);
    fprintf(stderr, "%s\n", t ? t : "(no log)");
    free(t);
    return false;
}

/* The endpoint a server logged ("serving on tcp://127.0.0.1:PORT"). */
static void server_endpoint(const char *log, char *out, size_t cap)
{
    assert_true(wait_text(log, "serving on tcp://", 60));
    char *t = test_slurp(log);
    char *p = strstr(t, "serving on ");
    p += strlen("serving on ");
    size_t n = strcspn(p, " \n");
    assert_true(n < cap);
    memcpy(out, p, n);
    out[n] = 0;
    free(t);
}

static void path_in(const env *e, char *out, size_t cap, const char *name)
{
    snprintf(out, cap, "%s/%s", e->dir, name);
}

/* tern server init + register names[0..n): keys receive the API keys. */
static void make_server(const env *e, const char *store, bool insecure, const char *const *names,
                        int n, char keys[][65])
{
    char log[256];
    path_in(e, log, sizeof log, "init.log");
    if (insecure)
        assert_int_equal(run(log, VA_ARGS("server", "init", "--store", store, INIT_ARGS,
                                          "--insecure")),
                         0);
    else
        assert_int_equal(run(log, VA_ARGS("server", "init", "--store", store, INIT_ARGS)), 0);
    for (int i = 0; i < n; i++) {
        char out[256];
        path_in(e, out, sizeof out, "register.json");
        unlink(out);
        assert_int_equal(run(out, VA_ARGS("server", "register", names[i], "--store", store,
                                          "--json")),
                         0);
        json_error_t je;
        json_t *j = json_load_file(out, 0, &je);
        assert_non_null(j);
        const char *key = json_string_value(json_object_get(j, "api_key"));
        assert_non_null(key);
        assert_int_equal(strlen(key), 64);
        strcpy(keys[i], key);
        json_decref(j);
    }
}

static pid_t start_client(const env *e, const char *store, const char *endpoint,
                          const char *name, const char *key, int index, int parts,
                          const char *extra1, const char *extra2)
{
    char log[256], sidx[16], sparts[16], pub[256];
    snprintf(log, sizeof log, "%s/%s.log", e->dir, name);
    snprintf(sidx, sizeof sidx, "%d", index);
    snprintf(sparts, sizeof sparts, "%d", parts);
    snprintf(pub, sizeof pub, "%s/keys/server.pub", store);
    struct stat sb;
    bool insecure = stat(pub, &sb) != 0;
    const char *args[40] = {"client", "run", "--endpoint", endpoint, "--name", name, DATA_ARGS,
                            "--num-partitions", sparts, "--partition-index", sidx};
    int n = 0;
    while (args[n])
        n++;
    if (insecure) {
        args[n++] = "--insecure";
    } else {
        args[n++] = "--server-key";
        args[n++] = pub;
    }
    if (extra1)
        args[n++] = extra1;
    if (extra2)
        args[n++] = extra2;
    args[n] = NULL;
    return start(log, key, args);
}

/* ---- reading the store ------------------------------------------------------------------ */

typedef struct rounds_seen {
    size_t completed, failed, other;
    int64_t last_completed;
    int32_t participated_last;
    double accuracy_last;
} rounds_seen;

static rounds_seen read_rounds(const char *store)
{
    tern_store *s = NULL;
    assert_int_equal(tern_store_open(store, &(tern_store_options){.read_only = true}, &s, NULL),
                     TERN_OK);
    rounds_seen r = {0};
    for (int st = TERN_ROUND_PENDING; st <= TERN_ROUND_FAILED; st++) {
        tern_round *list = NULL;
        size_t n = 0;
        assert_int_equal(tern_store_round_list_by_status(s, (tern_round_status)st, &list, &n, NULL),
                         TERN_OK);
        if (st == TERN_ROUND_COMPLETED) {
            r.completed = n;
            for (size_t i = 0; i < n; i++)
                if (list[i].number > r.last_completed) {
                    r.last_completed = list[i].number;
                    r.accuracy_last = list[i].global_accuracy;
                }
        } else if (st == TERN_ROUND_FAILED) {
            r.failed = n;
        } else {
            r.other += n;
        }
        tern_store_free(s, list);
    }
    /* Who took part, from the per-client metrics committed with the round. */
    tern_client_metrics *cm = NULL;
    size_t ncm = 0;
    if (r.last_completed &&
        tern_store_round_client_metrics(s, r.last_completed, &cm, &ncm, NULL) == TERN_OK) {
        for (size_t i = 0; i < ncm; i++)
            r.participated_last += cm[i].participated;
        tern_store_free(s, cm);
    }
    tern_store_close(&s);
    return r;
}

/* Number of versions and the current one's SHA-256. */
static size_t read_versions(const char *store, char sha[TERN_STORE_SHA256_SIZE])
{
    tern_store *s = NULL;
    assert_int_equal(tern_store_open(store, &(tern_store_options){.read_only = true}, &s, NULL),
                     TERN_OK);
    tern_model_version *v = NULL, cur;
    size_t n = 0;
    assert_int_equal(tern_store_version_list(s, &v, &n, NULL), TERN_OK);
    assert_int_equal(tern_store_version_current(s, &cur, NULL), TERN_OK);
    strcpy(sha, cur.sha256);
    tern_store_free(s, v);
    tern_store_close(&s);
    return n;
}

/* ---- tests ------------------------------------------------------------------------------ */

static void rounds_commit_versions(void **state)
{
    if (!have_fashion())
        skip();
    env *e = *state;
    char store[128], slog[256], jlog[256], endpoint[128], keys[3][65];
    const char *names[] = {"alpha", "bravo", "charlie"};
    path_in(e, store, sizeof store, "basic");
    path_in(e, slog, sizeof slog, "basic-server.log");
    path_in(e, jlog, sizeof jlog, "basic.jsonl");
    make_server(e, store, false, names, 3, keys);
    pid_t server = start(slog, NULL,
                         VA_ARGS("server", "run", "--store", store, RUN_ARGS, "--rounds", "2",
                                 "--min-available-clients", "3", "--test-data", "fashion-mnist",
                                 "--test-limit", "200", "--json-log", jlog));
    server_endpoint(slog, endpoint, sizeof endpoint);
    pid_t clients[3];
    for (int i = 0; i < 3; i++)
        clients[i] = start_client(e, store, endpoint, names[i], keys[i], i, 3, NULL, NULL);
    assert_int_equal(finish(server, 120), 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(finish(clients[i], 30), 0); /* GOODBYE shutdown ends them */
    assert_true(log_has(slog, "eval acc"));
    assert_true(log_has(slog, "2 rounds completed"));

    rounds_seen r = read_rounds(store);
    assert_int_equal(r.completed, 3); /* the initial model's commit and two rounds */
    assert_int_equal(r.failed + r.other, 0);
    assert_int_equal(r.participated_last, 3);
    assert_true(r.accuracy_last >= 0 && r.accuracy_last <= 1);
    char sha[TERN_STORE_SHA256_SIZE];
    assert_int_equal(read_versions(store, sha), 3); /* the initial model and two rounds */

    /* One JSON line per round, with the server-side evaluation and the clients' loss. */
    FILE *f = fopen(jlog, "r");
    assert_non_null(f);
    char line[8192];
    int lines = 0;
    while (fgets(line, sizeof line, f)) {
        json_t *j = json_loads(line, 0, NULL);
        assert_non_null(j);
        assert_true(json_is_true(json_object_get(j, "completed")));
        assert_true(json_is_number(json_object_get(j, "eval_accuracy")));
        assert_true(json_is_number(json_object_get(j, "train_loss")));
        assert_int_equal(json_integer_value(json_object_get(j, "succeeded")), 3);
        json_decref(j);
        lines++;
    }
    fclose(f);
    assert_int_equal(lines, 2);

    /* The statistics reach tern server clients. */
    char out[256];
    path_in(e, out, sizeof out, "clients.json");
    assert_int_equal(run(out, VA_ARGS("server", "clients", "--store", store, "--json")), 0);
    json_t *j = json_load_file(out, 0, NULL);
    assert_non_null(j);
    assert_int_equal(json_array_size(j), 3);
    assert_int_equal(json_integer_value(json_object_get(json_array_get(j, 0), "rounds_succeeded")), 2);
    json_decref(j);
}

/* A client killed with SIGKILL while it trains (its --fit-delay holds it there). */
static void killed_client(void **state, bool strict)
{
    if (!have_fashion())
        skip();
    env *e = *state;
    const char *names[] = {"c1", "c2", "victim"};
    char store[128], slog[256], vlog[256], endpoint[128], keys[3][65];
    path_in(e, store, sizeof store, strict ? "strict" : "tolerant");
    path_in(e, slog, sizeof slog, strict ? "strict-server.log" : "tolerant-server.log");
    path_in(e, vlog, sizeof vlog, "victim.log");
    unlink(vlog);
    make_server(e, store, true, names, 3, keys);
    pid_t server = start(slog, NULL,
                         VA_ARGS("server", "run", "--store", store, RUN_ARGS, "--insecure",
                                 "--rounds", "1", "--min-available-clients", "3",
                                 "--min-fit-clients", "2", "--policy",
                                 strict ? "strict" : "tolerant", "--min-completion", "0.5",
                                 "--fraction-evaluate", "0"));
    server_endpoint(slog, endpoint, sizeof endpoint);
    pid_t c[3];
    for (int i = 0; i < 2; i++)
        c[i] = start_client(e, store, endpoint, names[i], keys[i], i, 3, NULL, NULL);
    c[2] = start_client(e, store, endpoint, names[2], keys[2], 2, 3, "--fit-delay", "60");
    assert_true(wait_text(vlog, "round 1: fit", 60));
    kill(c[2], SIGKILL);
    assert_int_equal(finish(c[2], 10), 128 + SIGKILL);
    /* Tolerant: 2 of 3 succeeded, at least min_completion: the round completes. Strict: the
     * round fails; the victim comes back (a rebooted device) and the next attempt completes. */
    if (strict) {
        assert_true(wait_text(slog, "failed", 60));
        c[2] = start_client(e, store, endpoint, names[2], keys[2], 2, 3, NULL, NULL);
    }
    assert_int_equal(finish(server, 120), 0);
    for (int i = 0; i < (strict ? 3 : 2); i++)
        assert_int_equal(finish(c[i], 30), 0);
    rounds_seen r = read_rounds(store);
    assert_int_equal(r.completed, 2); /* the initial model's commit and the round */
    assert_int_equal(r.other, 0);
    assert_int_equal(r.failed, strict ? 1 : 0);
    assert_int_equal(r.participated_last, strict ? 3 : 2);
}

static void killed_client_tolerant(void **state) { killed_client(state, false); }
static void killed_client_strict(void **state) { killed_client(state, true); }

/* One FedAvg run of 3 rounds with two clients; with kill_at_round, the server is killed with
 * SIGKILL while that round's fits run, then restarted. Returns the final version's SHA-256. */
static void resumable_run(const env *e, const char *tag, int kill_at_round,
                          char sha[TERN_STORE_SHA256_SIZE], rounds_seen *rounds)
{
    const char *names[] = {"r1", "r2"};
    char store[128], slog[256], endpoint[128], keys[2][65], log0[256];
    path_in(e, store, sizeof store, tag);
    snprintf(slog, sizeof slog, "%s/%s-server.log", e->dir, tag);
    make_server(e, store, true, names, 2, keys);
    const char *const *args = VA_ARGS("server", "run", "--store", store, RUN_ARGS, "--insecure",
                                      "--rounds", "3", "--strategy", "fedavg",
                                      "--fraction-evaluate", "0");
    pid_t server = start(slog, NULL, args);
    server_endpoint(slog, endpoint, sizeof endpoint);
    snprintf(log0, sizeof log0, "%s/r1.log", e->dir);
    unlink(log0);
    pid_t c[2];
    for (int i = 0; i < 2; i++)
        c[i] = start_client(e, store, endpoint, names[i], keys[i], i, 2, "--fit-delay", "0.5");
    if (kill_at_round) {
        char needle[32];
        snprintf(needle, sizeof needle, "round %d: fit", kill_at_round);
        assert_true(wait_text(log0, needle, 90));
        kill(server, SIGKILL);
        assert_int_equal(finish(server, 10), 128 + SIGKILL);
        /* The same endpoint again: the clients reconnect to it. */
        const char *restart[64];
        int n = 0;
        for (; args[n]; n++)
            restart[n] = strcmp(args[n], "tcp://127.0.0.1:0") == 0 ? endpoint : args[n];
        restart[n] = NULL;
        server = start(slog, NULL, restart);
    }
    assert_int_equal(finish(server, 150), 0);
    for (int i = 0; i < 2; i++)
        assert_int_equal(finish(c[i], 30), 0);
    *rounds = read_rounds(store);
    size_t versions = read_versions(store, sha);
    assert_int_equal(versions, 4);
}

static void server_killed_resumes(void **state)
{
    if (!have_fashion())
        skip();
    env *e = *state;
    char a[TERN_STORE_SHA256_SIZE], b[TERN_STORE_SHA256_SIZE];
    rounds_seen ra, rb;
    resumable_run(e, "interrupted", 2, a, &ra);
    assert_int_equal(ra.completed, 4); /* the initial model's commit and three rounds */
    assert_int_equal(ra.failed, 1); /* the interrupted round, marked failed at restart */
    assert_int_equal(ra.other, 0);  /* nothing left running, aggregating or pending */
    resumable_run(e, "straight", 0, b, &rb);
    assert_int_equal(rb.completed, 4);
    assert_int_equal(rb.failed + rb.other, 0);
    assert_string_equal(a, b);
}

static void refused_clients(void **state)
{
    if (!have_fashion())
        skip();
    env *e = *state;
    const char *names[] = {"member"};
    char store[128], slog[256], endpoint[128], keys[1][65], clog[256];
    path_in(e, store, sizeof store, "auth");
    path_in(e, slog, sizeof slog, "auth-server.log");
    make_server(e, store, false, names, 1, keys);
    pid_t server = start(slog, NULL,
                         VA_ARGS("server", "run", "--store", store, RUN_ARGS, "--rounds", "1",
                                 "--min-available-clients", "1", "--min-fit-clients", "1"));
    server_endpoint(slog, endpoint, sizeof endpoint);
    /* Not registered. */
    pid_t c = start_client(e, store, endpoint, "stranger", keys[0], 0, 1, NULL, NULL);
    assert_int_equal(finish(c, 60), 2);
    snprintf(clog, sizeof clog, "%s/stranger.log", e->dir);
    assert_true(log_has(clog, "refused by the server"));
    /* Registered, wrong key. */
    char wrong[65];
    strcpy(wrong, keys[0]);
    wrong[0] = wrong[0] == 'a' ? 'b' : 'a';
    snprintf(clog, sizeof clog, "%s/member.log", e->dir);
    c = start_client(e, store, endpoint, "member", wrong, 0, 1, NULL, NULL);
    assert_int_equal(finish(c, 60), 2);
    assert_true(log_has(clog, "refused by the server"));
    /* No key at all: refused before connecting. */
    c = start_client(e, store, endpoint, "member", NULL, 0, 1, NULL, NULL);
    assert_int_equal(finish(c, 60), 1);
    assert_true(log_has(clog, "TERN_API_KEY"));
    /* The server is unharmed: the right key trains the round. */
    unlink(clog);
    c = start_client(e, store, endpoint, "member", keys[0], 0, 1, NULL, NULL);
    assert_int_equal(finish(server, 120), 0);
    assert_int_equal(finish(c, 30), 0);
    assert_int_equal(read_rounds(store).completed, 2);
}

/* ---- a recording TCP relay ------------------------------------------------------------------ */

typedef struct relay {
    int listen_fd;
    int port;
    int target_port;
    volatile bool stop;
    unsigned char *seen;
    size_t seen_len, seen_cap;
    pthread_t thread;
} relay;

static void record(relay *r, const unsigned char *b, size_t n)
{
    if (r->seen_len + n > r->seen_cap) {
        size_t cap = (r->seen_len + n) * 2;
        unsigned char *p = realloc(r->seen, cap);
        if (!p)
            return;
        r->seen = p;
        r->seen_cap = cap;
    }
    memcpy(r->seen + r->seen_len, b, n);
    r->seen_len += n;
}

/* Serves connections one after another (a client reconnecting gets a new one). */
static void *relay_main(void *arg)
{
    relay *r = arg;
    unsigned char buf[65536];
    while (!r->stop) {
        struct pollfd lp = {r->listen_fd, POLLIN, 0};
        if (poll(&lp, 1, 100) <= 0)
            continue;
        int a = accept(r->listen_fd, NULL, NULL);
        if (a < 0)
            continue;
        int b = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)r->target_port),
                                 .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        if (connect(b, (struct sockaddr *)&to, sizeof to) != 0) {
            close(a);
            close(b);
            continue;
        }
        bool open_ = true;
        while (open_ && !r->stop) {
            struct pollfd p[2] = {{a, POLLIN, 0}, {b, POLLIN, 0}};
            if (poll(p, 2, 100) <= 0)
                continue;
            for (int i = 0; i < 2 && open_; i++) {
                if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR)))
                    continue;
                ssize_t n = read(p[i].fd, buf, sizeof buf);
                if (n <= 0) {
                    open_ = false;
                    break;
                }
                record(r, buf, (size_t)n);
                ssize_t off = 0;
                while (off < n) {
                    ssize_t w = write(i == 0 ? b : a, buf + off, (size_t)(n - off));
                    if (w <= 0) {
                        open_ = false;
                        break;
                    }
                    off += w;
                }
            }
        }
        close(a);
        close(b);
    }
    return NULL;
}

static void relay_start(relay *r, int target_port)
{
    memset(r, 0, sizeof *r);
    r->target_port = target_port;
    r->listen_fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(r->listen_fd, (struct sockaddr *)&addr, sizeof addr), 0);
    assert_int_equal(listen(r->listen_fd, 4), 0);
    socklen_t len = sizeof addr;
    getsockname(r->listen_fd, (struct sockaddr *)&addr, &len);
    r->port = ntohs(addr.sin_port);
    assert_int_equal(pthread_create(&r->thread, NULL, relay_main, r), 0);
}

static void relay_stop(relay *r)
{
    r->stop = true;
    pthread_join(r->thread, NULL);
    close(r->listen_fd);
}

static bool contains(const unsigned char *hay, size_t n, const char *needle)
{
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (memcmp(hay + i, needle, k) == 0)
            return true;
    return false;
}

/* One echo round through the relay; returns the recorded bytes (caller frees). */
static unsigned char *wire_round(const env *e, bool insecure, size_t *len)
{
    const char *tag = insecure ? "wire-plain" : "wire-curve";
    const char *names[] = {"wire-client-name-xyzzy"};
    char store[128], slog[256], endpoint[128], keys[1][65], via[64];
    path_in(e, store, sizeof store, tag);
    snprintf(slog, sizeof slog, "%s/%s-server.log", e->dir, tag);
    make_server(e, store, insecure, names, 1, keys);
    pid_t server = start(slog, NULL,
                         insecure ? VA_ARGS("server", "run", "--store", store, RUN_ARGS,
                                            "--rounds", "1", "--min-available-clients", "1",
                                            "--min-fit-clients", "1", "--fraction-evaluate", "0",
                                            "--insecure")
                                  : VA_ARGS("server", "run", "--store", store, RUN_ARGS,
                                            "--rounds", "1", "--min-available-clients", "1",
                                            "--min-fit-clients", "1", "--fraction-evaluate", "0"));
    server_endpoint(slog, endpoint, sizeof endpoint);
    relay r;
    relay_start(&r, atoi(strrchr(endpoint, ':') + 1));
    snprintf(via, sizeof via, "tcp://127.0.0.1:%d", r.port);
    char clog[256], pub[256];
    snprintf(clog, sizeof clog, "%s/%s-client.log", e->dir, tag);
    snprintf(pub, sizeof pub, "%s/keys/server.pub", store);
    pid_t c = insecure ? start(clog, keys[0],
                               VA_ARGS("client", "run", "--endpoint", via, "--name", names[0],
                                       "--echo", "--insecure"))
                       : start(clog, keys[0],
                               VA_ARGS("client", "run", "--endpoint", via, "--name", names[0],
                                       "--echo", "--server-key", pub));
    assert_int_equal(finish(server, 90), 0);
    assert_int_equal(finish(c, 30), 0);
    relay_stop(&r);
    assert_int_equal(read_rounds(store).completed, 2);
    *len = r.seen_len;
    return r.seen;
}

static void curve_hides_traffic(void **state)
{
    env *e = *state;
    size_t n_curve, n_plain;
    unsigned char *curve = wire_round(e, false, &n_curve);
    unsigned char *plain = wire_round(e, true, &n_plain);
    /* Both carried a whole model each way. */
    assert_true(n_curve > 100000 && n_plain > 100000);
    assert_true(contains(plain, n_plain, "TERN"));
    assert_true(contains(plain, n_plain, "wire-client-name-xyzzy"));
    assert_true(contains(plain, n_plain, "features.0.0.weight"));
    assert_false(contains(curve, n_curve, "wire-client-name-xyzzy"));
    assert_false(contains(curve, n_curve, "features.0.0.weight"));
    assert_false(contains(curve, n_curve, "TERN\x01"));
    free(curve);
    free(plain);
}

/* ---- raw frames -------------------------------------------------------------------------------- */

/* The next message from the server, decoded; false after timeout_ms without one. */
static bool receive(zsock_t *s, tern_msg *m, int timeout_ms)
{
    zpoller_t *p = zpoller_new(s, NULL);
    bool got = false;
    double end = now() + timeout_ms / 1000.0;
    while (!got && now() < end) {
        if (!zpoller_wait(p, 50))
            continue;
        zmsg_t *msg = zmsg_recv(s);
        zframe_t *f = msg ? zmsg_first(msg) : NULL;
        got = f && tern_msg_decode(zframe_data(f), zframe_size(f), NULL, m, NULL, NULL) == TERN_OK;
        zmsg_destroy(&msg);
        /* Heartbeats are not answers; GOODBYE follows the ERROR of a version mismatch. */
        if (got && (m->type == TERN_MSG_HEARTBEAT || m->type == TERN_MSG_GOODBYE))
            got = false;
    }
    zpoller_destroy(&p);
    return got;
}

static void send_bytes(zsock_t *s, const void *b, size_t n)
{
    zframe_t *f = zframe_new(b, n);
    assert_int_equal(zframe_send(&f, s, 0), 0);
}

static void expect_error(zsock_t *s, const char *what)
{
    tern_msg m;
    if (!receive(s, &m, 5000))
        fail_msg("no reply to %s", what);
    if (m.type != TERN_MSG_ERROR)
        fail_msg("reply to %s is type %d, not ERROR", what, (int)m.type);
}

static void bad_frames(void **state)
{
    if (!have_fashion())
        skip();
    env *e = *state;
    const char *names[] = {"after-the-storm"};
    char store[128], slog[256], endpoint[128], keys[1][65];
    path_in(e, store, sizeof store, "frames");
    path_in(e, slog, sizeof slog, "frames-server.log");
    make_server(e, store, true, names, 1, keys);
    pid_t server = start(slog, NULL,
                         VA_ARGS("server", "run", "--store", store, RUN_ARGS, "--insecure",
                                 "--rounds", "1", "--min-available-clients", "1",
                                 "--min-fit-clients", "1", "--fraction-evaluate", "0"));
    server_endpoint(slog, endpoint, sizeof endpoint);

    zsock_t *d = zsock_new_dealer(endpoint);
    assert_non_null(d);
    /* Garbage. */
    send_bytes(d, "hello there", 11);
    expect_error(d, "garbage");
    /* A HEARTBEAT with another major version. */
    tern_msg hb = {.type = TERN_MSG_HEARTBEAT, .seq = 1};
    void *bytes = NULL;
    size_t len = 0;
    assert_int_equal(tern_msg_encode(&hb, NULL, NULL, &bytes, &len, NULL), TERN_OK);
    ((unsigned char *)bytes)[4] = 9;
    send_bytes(d, bytes, len);
    expect_error(d, "a wrong major version");
    /* A valid header whose body length lies. */
    ((unsigned char *)bytes)[4] = 1;
    ((unsigned char *)bytes)[12] ^= 0x40;
    send_bytes(d, bytes, len);
    expect_error(d, "a wrong body length");
    tern_proto_free(NULL, bytes);
    /* Two frames in one message. */
    zmsg_t *two = zmsg_new();
    zmsg_addmem(two, "TERN", 4);
    zmsg_addmem(two, "TERN", 4);
    assert_int_equal(zmsg_send(&two, d), 0);
    expect_error(d, "a two-part message");
    /* More than the frame limit (2 MiB by default): refused with an error or by dropping the
     * connection; either way the server goes on. */
    size_t big = (3u << 20);
    unsigned char *huge = calloc(1, big);
    assert_non_null(huge);
    memcpy(huge, "TERN\x01\x00\x03", 7);
    send_bytes(d, huge, big);
    free(huge);
    tern_msg m;
    if (receive(d, &m, 3000))
        assert_int_equal(m.type, TERN_MSG_ERROR);
    zsock_destroy(&d);

    /* The server still serves a real client, and finishes its round. */
    pid_t c = start_client(e, store, endpoint, names[0], keys[0], 0, 1, NULL, NULL);
    assert_int_equal(finish(server, 120), 0);
    assert_int_equal(finish(c, 30), 0);
    assert_int_equal(read_rounds(store).completed, 2);
}

static void help_and_errors(void **state)
{
    env *e = *state;
    char log[256];
    path_in(e, log, sizeof log, "help.log");
    assert_int_equal(run(log, VA_ARGS("--help")), 0);
    assert_true(log_has(log, "sim"));
    const char *const *helps[] = {VA_ARGS("server", "--help"), VA_ARGS("server", "run", "--help"),
                                  VA_ARGS("server", "init", "--help"),
                                  VA_ARGS("server", "register", "--help"),
                                  VA_ARGS("client", "run", "--help"), VA_ARGS("sim", "--help")};
    for (size_t i = 0; i < sizeof helps / sizeof *helps; i++) {
        unlink(log);
        assert_int_equal(run(log, helps[i]), 0);
        assert_true(log_has(log, "example"));
    }
    unlink(log);
    assert_int_equal(run(log, VA_ARGS("server", "run", "--store", e->dir, "--strategy", "fedfoo")), 1);
    assert_true(log_has(log, "unknown --strategy 'fedfoo'"));
    unlink(log);
    assert_int_equal(finish(start(log, "k", VA_ARGS("client", "run", "--name", "x", "--insecure",
                                                    "--partition", "dirichlet:-1")),
                            60),
                     1);
    assert_true(log_has(log, "--partition"));
    unlink(log);
    assert_int_equal(run(log, VA_ARGS("server", "register", "x", "--store", "/nonexistent/store")), 1);
    assert_true(log_has(log, "no store at"));
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(help_and_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(rounds_commit_versions, setup, teardown),
        cmocka_unit_test_setup_teardown(killed_client_tolerant, setup, teardown),
        cmocka_unit_test_setup_teardown(killed_client_strict, setup, teardown),
        cmocka_unit_test_setup_teardown(server_killed_resumes, setup, teardown),
        cmocka_unit_test_setup_teardown(refused_clients, setup, teardown),
        cmocka_unit_test_setup_teardown(curve_hides_traffic, setup, teardown),
        cmocka_unit_test_setup_teardown(bad_frames, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
