/* The federated client (include/tern/client.h): one DEALER connection at a time, the session
 * it carries, and the work the server asks for. docs/federation.md is the specification.
 *
 * Structure. tern_client_run() loops over connections: session_run() makes a socket (a new
 * routing id, a new CURVE key pair), says HELLO and serves the session until it ends. A
 * session that ends because the server went silent, said no_session or timed the client out
 * is reconnected with exponential backoff; a refusal, a GOODBYE shutdown, max_rounds and
 * request_stop end the run.
 *
 * One instruction at a time: FIT_INS or EVALUATE_INS -> download (or a cache hit) -> the
 * callback on a worker thread -> FIT_RES and the update's chunks within the server's credit, or
 * EVALUATE_RES. A new instruction while one is in progress cancels the old one (the server has
 * moved on). The event loop polls the socket and a self-pipe: the worker writes to the pipe
 * when it finishes, and tern_client_request_stop() (async-signal-safe) writes to it too.
 *
 * Robustness. Every frame is decoded with the client's limits and its sequence number checked;
 * anything refused is counted (tern_proto_counters) and ignored. The socket's ZMQ_MAXMSGSIZE
 * makes libzmq drop a peer that sends oversized frames before they are buffered. */
#include "tern/client.h"

#include <czmq.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "nn/util.h"

#define CLIENT_VERSION "tern/0.1"
#define DOWNLOAD_WINDOW 4 /* chunks in flight per download (docs/federation.md) */
/* The server does not answer while it aggregates, evaluates and commits a round (seconds on a
 * loaded machine, more with a large test set or BatchNorm re-estimation); giving up after 5
 * intervals made clients reconnect in the middle of a round and cost it. 15 intervals (15 s at
 * the default 1 s heartbeat) still notices a dead server quickly. */
#define DEFAULT_PATIENCE 15
#define DEFAULT_BACKOFF_INITIAL_MS 100
#define DEFAULT_BACKOFF_MAX_MS 5000
#define DEFAULT_HELLO_TIMEOUT_MS 5000
#define STOP_POLL_MS 100 /* request_stop is also seen through the pipe, at once */
#define SEND_TIMEOUT_MS 5000
#define CACHE_FILE "last_model.tern"
#define CACHE_MAGIC "TERNMDL1"
#define CACHE_HEADER (8 + 8 + 32 + 8) /* magic, model version, sha256, size */

typedef enum phase {
    PHASE_IDLE,
    PHASE_DOWNLOAD, /* receiving the instruction's model */
    PHASE_RUNNING,  /* the callback runs on the worker thread */
    PHASE_UPLOAD,   /* FIT_RES sent, chunks going out within credit */
} phase;

/* The instruction in progress. */
typedef struct work {
    phase phase;
    bool is_fit;
    uint32_t round;
    uint64_t model_version;
    tern_msg_config config;
    tern_transfer *transfer; /* PHASE_DOWNLOAD */

    /* PHASE_RUNNING: shared with the worker thread. */
    pthread_t thread;
    bool thread_started;
    volatile bool cancel;
    atomic_bool finished;
    tern_fit_task task;
    tern_status status;
    tern_error err;
    tern_fit_output fit_out;
    tern_evaluate_output eval_out;

    /* PHASE_UPLOAD */
    void *update;
    size_t update_size;
    tern_send_window window;
    uint64_t res_seq; /* sequence number of FIT_RES: later ERRORs about it end the upload */
} work;

struct tern_client {
    tern_client_options opt; /* strings point at the copies below */
    char *endpoint, *name, *api_key, *cache_dir;
    char server_key[TERN_CURVE_KEY_SIZE];
    uint32_t hello_timeout_ms;

    int pipe_r, pipe_w; /* self-pipe: worker finished, stop requested */
    volatile sig_atomic_t stop;

    pthread_mutex_t stats_mu;
    tern_client_stats stats;
    tern_proto_counters counters; /* frames from the server, by refusal code (OK: accepted) */

    /* Downloads and the model they become: the model that a new one replaces is kept for the
     * next download, so each round's model lands in memory that is already mapped. */
    tern_buffer_pool *pool;
    tern_allocator alloc;

    /* The last model received: the cache (also in cache_dir when set); from alloc. */
    void *model;
    size_t model_size;
    uint8_t model_sha[32];
    uint64_t model_version;

    uint32_t results_sent; /* FIT_RES fully uploaded, for max_rounds */

    /* The buffer of the last update sent (malloc'd), lent to the next fit callback
     * (tern_fit_task.update_buffer); NULL when none or while the callback keeps it. */
    void *spare;
    size_t spare_size;
};

/* One connection. */
typedef struct session {
    zsock_t *sock;
    void *zsock; /* the libzmq socket under sock */
    uint64_t tx_seq;
    tern_seq_tracker rx;
    bool welcomed;
    tern_msg_welcome welcome;
    tern_proto_limits send_limits; /* the server's frame limit, our transfer limit */
    int64_t last_rx_ms, next_heartbeat_ms, hello_deadline_ms;
    uint64_t next_transfer_id;
    work w;
} session;

/* How a session ended. */
typedef enum outcome {
    OUT_DONE,    /* return TERN_OK from run */
    OUT_LOST,    /* reconnect */
    OUT_REFUSED, /* return TERN_ERR_STATE (err holds the server's message) */
    OUT_FAILED,  /* return the status in *fail */
} outcome;

/* ---- small helpers ---------------------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void logf_(tern_client *c, tern_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void logf_(tern_client *c, tern_log_level level, const char *fmt, ...)
{
    if (!c->opt.log)
        return;
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    c->opt.log(c->opt.log_user, level, buf);
}

static void stats_add(tern_client *c, uint64_t *field, uint64_t n)
{
    pthread_mutex_lock(&c->stats_mu);
    *field += n;
    pthread_mutex_unlock(&c->stats_mu);
}

static void wake(tern_client *c)
{
    char b = 1;
    ssize_t r = write(c->pipe_w, &b, 1); /* a full pipe is already a wake-up */
    (void)r;
}

static void drain_pipe(tern_client *c)
{
    char buf[64];
    while (read(c->pipe_r, buf, sizeof buf) > 0) {
    }
}

static tern_status sha256(const void *data, size_t len, uint8_t out[32])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (EVP_Digest(data, len, md, &n, EVP_sha256(), NULL) != 1 || n != 32)
        return TERN_ERR_IO;
    memcpy(out, md, 32);
    return TERN_OK;
}

static char *dup_opt(const char *s)
{
    if (!s)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

static void put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* ---- the model cache ---------------------------------------------------------------------- */

/* Keep bytes (ownership taken; from c->alloc) as the last model held, and write it to
 * cache_dir. */
static void cache_store(tern_client *c, void *bytes, size_t len, const uint8_t sha[32],
                        uint64_t version)
{
    tern_free(&c->alloc, c->model);
    c->model = bytes;
    c->model_size = len;
    memcpy(c->model_sha, sha, 32);
    c->model_version = version;
    if (!c->cache_dir)
        return;
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s/" CACHE_FILE, c->cache_dir);
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    uint8_t header[CACHE_HEADER];
    memcpy(header, CACHE_MAGIC, 8);
    put_u64(header + 8, version);
    memcpy(header + 16, sha, 32);
    put_u64(header + 48, (uint64_t)len);
    FILE *f = fopen(tmp, "wb");
    bool ok = f && fwrite(header, 1, sizeof header, f) == sizeof header &&
              fwrite(bytes, 1, len, f) == len && fflush(f) == 0 && fsync(fileno(f)) == 0;
    if (f && fclose(f) != 0)
        ok = false;
    if (ok && rename(tmp, path) != 0)
        ok = false;
    if (!ok) {
        unlink(tmp);
        logf_(c, TERN_LOG_WARN, "client: cannot write the model cache %s: %s", path,
              strerror(errno));
    }
}

/* Load cache_dir's model at start when its hash checks; anything odd is ignored (and logged). */
static void cache_load(tern_client *c)
{
    if (!c->cache_dir)
        return;
    char path[4096];
    snprintf(path, sizeof path, "%s/" CACHE_FILE, c->cache_dir);
    FILE *f = fopen(path, "rb");
    if (!f)
        return;
    uint8_t header[CACHE_HEADER], sha[32];
    void *bytes = NULL;
    const char *why = NULL;
    struct stat st;
    if (fread(header, 1, sizeof header, f) != sizeof header || memcmp(header, CACHE_MAGIC, 8) != 0) {
        why = "not a model cache file";
    } else if (fstat(fileno(f), &st) != 0 || st.st_size < CACHE_HEADER ||
               (uint64_t)st.st_size - CACHE_HEADER != get_u64(header + 48) ||
               get_u64(header + 48) == 0 || get_u64(header + 48) > SIZE_MAX) {
        why = "truncated";
    } else {
        size_t len = (size_t)get_u64(header + 48);
        if (!(bytes = tern_alloc(&c->alloc, len)))
            why = "out of memory";
        else if (fread(bytes, 1, len, f) != len)
            why = "unreadable";
        else if (sha256(bytes, len, sha) != TERN_OK || memcmp(sha, header + 16, 32) != 0)
            why = "the hash does not match";
        if (!why) {
            fclose(f);
            tern_free(&c->alloc, c->model);
            c->model = bytes;
            c->model_size = len;
            memcpy(c->model_sha, sha, 32);
            c->model_version = get_u64(header + 8);
            logf_(c, TERN_LOG_INFO, "client: cached model version %llu (%zu bytes) from %s",
                  (unsigned long long)c->model_version, len, path);
            return;
        }
    }
    fclose(f);
    tern_free(&c->alloc, bytes);
    logf_(c, TERN_LOG_WARN, "client: ignoring the model cache %s: %s", path, why);
}

/* ---- options, create, destroy -------------------------------------------------------------- */

tern_client_options tern_client_options_default(void)
{
    return (tern_client_options){.heartbeat_patience = DEFAULT_PATIENCE,
                                 .backoff_initial_ms = DEFAULT_BACKOFF_INITIAL_MS,
                                 .backoff_max_ms = DEFAULT_BACKOFF_MAX_MS,
                                 .hello_timeout_ms = DEFAULT_HELLO_TIMEOUT_MS};
}

/* The server's public key: Z85 text, or a key file written by zcert_save_public. */
static tern_status resolve_server_key(const char *key, char out[TERN_CURVE_KEY_SIZE],
                                      tern_error *err)
{
    uint8_t raw[32];
    struct stat st;
    if (strlen(key) == TERN_CURVE_KEY_Z85 && stat(key, &st) != 0) {
        if (!zmq_z85_decode(raw, key))
            return tern_set_error(err, TERN_ERR_FORMAT, "client: server_public_key is not a "
                                  "Z85 key");
        memcpy(out, key, TERN_CURVE_KEY_SIZE);
        return TERN_OK;
    }
    zcert_t *cert = zcert_load(key);
    if (!cert)
        return tern_set_error(err, TERN_ERR_FORMAT, "client: server_public_key '%s' is neither "
                              "a Z85 key nor a readable key file", key);
    const char *txt = zcert_public_txt(cert);
    tern_status s = TERN_OK;
    if (strlen(txt) != TERN_CURVE_KEY_Z85 || !zmq_z85_decode(raw, txt) ||
        memcmp(raw, zcert_public_key(cert), 32) != 0 ||
        memcmp(raw, (uint8_t[32]){0}, 32) == 0)
        s = tern_set_error(err, TERN_ERR_FORMAT, "client: %s holds no public key", key);
    else
        memcpy(out, txt, TERN_CURVE_KEY_SIZE);
    zcert_destroy(&cert);
    return s;
}

tern_status tern_client_create(const tern_client_options *opt, tern_client **out,
                               tern_error *err)
{
    if (!opt || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "client: NULL options or output");
    if (!opt->endpoint || !*opt->endpoint)
        return tern_set_error(err, TERN_ERR_INVALID, "client: endpoint is required");
    if (!opt->name || !*opt->name || strlen(opt->name) > TERN_PROTO_MAX_NAME)
        return tern_set_error(err, TERN_ERR_INVALID, "client: name must have 1 to %d bytes",
                              TERN_PROTO_MAX_NAME);
    if (opt->api_key && strlen(opt->api_key) > TERN_PROTO_MAX_API_KEY)
        return tern_set_error(err, TERN_ERR_INVALID, "client: api_key is longer than %d bytes",
                              TERN_PROTO_MAX_API_KEY);
    if (!opt->fit)
        return tern_set_error(err, TERN_ERR_INVALID, "client: the fit callback is required");
    if (!opt->insecure && (!opt->server_public_key || !*opt->server_public_key))
        return tern_set_error(err, TERN_ERR_INVALID, "client: server_public_key is required "
                              "unless insecure");
    /* HELLO must encode: check it once here (UTF-8 of name and key). */
    tern_msg hello = {.type = TERN_MSG_HELLO, .seq = 1};
    snprintf(hello.hello.client_name, sizeof hello.hello.client_name, "%s", opt->name);
    snprintf(hello.hello.api_key, sizeof hello.hello.api_key, "%s",
             opt->api_key ? opt->api_key : "");
    snprintf(hello.hello.client_version, sizeof hello.hello.client_version, CLIENT_VERSION);
    size_t len;
    tern_error e = {{0}};
    if (tern_msg_encoded_size(&hello, &opt->limits, &len, &e) != TERN_OK)
        return tern_set_error(err, TERN_ERR_INVALID, "client: name or api_key: %s", e.message);

    tern_client *c = calloc(1, sizeof *c);
    if (!c)
        return tern_set_error(err, TERN_ERR_NOMEM, "client: out of memory");
    c->pipe_r = c->pipe_w = -1;
    tern_status s;
    c->opt = *opt;
    if (!c->opt.heartbeat_patience)
        c->opt.heartbeat_patience = DEFAULT_PATIENCE;
    if (!c->opt.backoff_initial_ms)
        c->opt.backoff_initial_ms = DEFAULT_BACKOFF_INITIAL_MS;
    if (!c->opt.backoff_max_ms)
        c->opt.backoff_max_ms = DEFAULT_BACKOFF_MAX_MS;
    if (c->opt.backoff_max_ms < c->opt.backoff_initial_ms)
        c->opt.backoff_max_ms = c->opt.backoff_initial_ms;
    if (!c->opt.hello_timeout_ms)
        c->opt.hello_timeout_ms = DEFAULT_HELLO_TIMEOUT_MS;
    c->endpoint = dup_opt(opt->endpoint);
    c->name = dup_opt(opt->name);
    c->api_key = dup_opt(opt->api_key ? opt->api_key : "");
    c->cache_dir = dup_opt(opt->cache_dir);
    if (!c->endpoint || !c->name || !c->api_key || (opt->cache_dir && !c->cache_dir)) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "client: out of memory");
        goto fail;
    }
    c->opt.endpoint = c->endpoint;
    c->opt.name = c->name;
    c->opt.api_key = c->api_key;
    c->opt.cache_dir = c->cache_dir;
    c->opt.server_public_key = NULL;
    if (!opt->insecure && (s = resolve_server_key(opt->server_public_key, c->server_key, err)) !=
                              TERN_OK)
        goto fail;
    int fds[2];
    if (pipe(fds) != 0) {
        s = tern_set_error(err, TERN_ERR_IO, "client: cannot create a pipe: %s", strerror(errno));
        goto fail;
    }
    c->pipe_r = fds[0];
    c->pipe_w = fds[1];
    for (int i = 0; i < 2; i++)
        if (fcntl(fds[i], F_SETFL, fcntl(fds[i], F_GETFL) | O_NONBLOCK) != 0 ||
            fcntl(fds[i], F_SETFD, FD_CLOEXEC) != 0) {
            s = tern_set_error(err, TERN_ERR_IO, "client: cannot configure a pipe: %s",
                               strerror(errno));
            goto fail;
        }
    if (c->cache_dir && mkdir(c->cache_dir, 0700) != 0 && errno != EEXIST) {
        s = tern_set_error(err, TERN_ERR_IO, "client: cannot create cache_dir %s: %s",
                           c->cache_dir, strerror(errno));
        goto fail;
    }
    if ((s = tern_buffer_pool_create(1, &c->pool, err)) != TERN_OK)
        goto fail;
    c->alloc = tern_buffer_pool_allocator(c->pool);
    if (pthread_mutex_init(&c->stats_mu, NULL) != 0) {
        s = tern_set_error(err, TERN_ERR_THREAD, "client: cannot create a mutex");
        goto fail;
    }
    cache_load(c);
    *out = c;
    return TERN_OK;
fail:
    if (c->pipe_r >= 0)
        close(c->pipe_r);
    if (c->pipe_w >= 0)
        close(c->pipe_w);
    tern_buffer_pool_destroy(&c->pool);
    free(c->endpoint);
    free(c->name);
    free(c->api_key);
    free(c->cache_dir);
    free(c);
    return s;
}

void tern_client_destroy(tern_client **client)
{
    if (!client || !*client)
        return;
    tern_client *c = *client;
    close(c->pipe_r);
    close(c->pipe_w);
    pthread_mutex_destroy(&c->stats_mu);
    tern_free(&c->alloc, c->model);
    tern_buffer_pool_destroy(&c->pool);
    free(c->spare);
    free(c->endpoint);
    free(c->name);
    free(c->api_key);
    free(c->cache_dir);
    free(c);
    *client = NULL;
}

void tern_client_request_stop(tern_client *c)
{
    if (!c)
        return;
    c->stop = 1;
    wake(c);
}

void tern_client_stats_get(const tern_client *c, tern_client_stats *out)
{
    if (!c || !out)
        return;
    pthread_mutex_lock((pthread_mutex_t *)&c->stats_mu);
    *out = c->stats;
    pthread_mutex_unlock((pthread_mutex_t *)&c->stats_mu);
}

/* ---- sending -------------------------------------------------------------------------------- */

/* Encode and send one message with the next sequence number. false: the connection is
 * unusable (send failed or timed out). An encoding failure is a bug in the caller's message:
 * logged, nothing sent, true. */
static bool send_msg(tern_client *c, session *ss, tern_msg *m)
{
    m->seq = tern_seq_next(&ss->tx_seq);
    size_t len = 0;
    tern_error e = {{0}};
    /* Encoded straight into the ZeroMQ message (one copy of a chunk's bytes; libzmq owns it). */
    zmq_msg_t frame;
    tern_status s = tern_msg_encoded_size(m, &ss->send_limits, &len, &e);
    if (s == TERN_OK && zmq_msg_init_size(&frame, len) != 0)
        s = tern_set_error(&e, TERN_ERR_NOMEM, "no memory for %zu bytes", len);
    else if (s == TERN_OK &&
             (s = tern_msg_encode_into(m, &ss->send_limits, zmq_msg_data(&frame), len, &len,
                                       &e)) != TERN_OK)
        zmq_msg_close(&frame);
    if (s != TERN_OK) {
        logf_(c, TERN_LOG_ERROR, "client: cannot encode %s: %s", tern_msg_type_name(m->type),
              e.message);
        return s != TERN_ERR_NOMEM;
    }
    int rc = zmq_msg_send(&frame, ss->zsock, 0);
    if (rc < 0)
        zmq_msg_close(&frame);
    if (rc < 0) {
        logf_(c, TERN_LOG_WARN, "client: sending %s failed: %s", tern_msg_type_name(m->type),
              zmq_strerror(zmq_errno()));
        return false;
    }
    stats_add(c, &c->stats.bytes_out, len);
    return true;
}

static bool send_error(tern_client *c, session *ss, tern_proto_code code, uint64_t in_reply_to,
                       uint32_t round, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
static bool send_error(tern_client *c, session *ss, tern_proto_code code, uint64_t in_reply_to,
                       uint32_t round, const char *fmt, ...)
{
    char text[1024]; /* make_error cuts it to TERN_PROTO_MAX_TEXT at a UTF-8 boundary */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    tern_msg m;
    tern_msg_make_error(&m, code, in_reply_to, "%s", text);
    m.round = round;
    return send_msg(c, ss, &m);
}

static tern_peer_state peer_state(const session *ss)
{
    switch (ss->w.phase) {
    case PHASE_RUNNING:
        return ss->w.is_fit ? TERN_PEER_FITTING : TERN_PEER_EVALUATING;
    case PHASE_DOWNLOAD:
    case PHASE_UPLOAD:
        return TERN_PEER_TRANSFERRING;
    default:
        return TERN_PEER_IDLE;
    }
}

static bool send_heartbeat(tern_client *c, session *ss)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    tern_msg m = {.type = TERN_MSG_HEARTBEAT};
    m.heartbeat.timestamp_ms = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
    m.heartbeat.state = peer_state(ss);
    return send_msg(c, ss, &m);
}

/* ---- work ------------------------------------------------------------------------------------ */

static void *worker_main(void *arg)
{
    tern_client *c = ((void **)arg)[0];
    work *w = ((void **)arg)[1];
    free(arg);
    if (w->is_fit)
        w->status = c->opt.fit(c->opt.user, &w->task, &w->cancel, &w->fit_out, &w->err);
    else
        w->status = c->opt.evaluate(c->opt.user, &w->task, &w->cancel, &w->eval_out, &w->err);
    atomic_store(&w->finished, true);
    wake(c);
    return NULL;
}

/* Drop the instruction in progress: cancel and join the worker, free transfers and updates. */
static void work_reset(work *w)
{
    if (w->thread_started) {
        w->cancel = true;
        pthread_join(w->thread, NULL);
        w->thread_started = false;
        /* The update, unless it is already w->update or the lent buffer (still the spare). */
        if (w->is_fit && w->fit_out.update != w->update &&
            w->fit_out.update != w->task.update_buffer)
            free(w->fit_out.update);
    }
    tern_transfer_destroy(&w->transfer);
    free(w->update);
    memset(w, 0, sizeof *w);
}

/* Start the callback on the held model. */
static bool start_worker(tern_client *c, session *ss)
{
    work *w = &ss->w;
    w->task = (tern_fit_task){.round = w->round, .model_version = w->model_version,
                              .model = c->model, .model_size = c->model_size,
                              .model_sha256 = c->model_sha, .config = &w->config};
    if (w->is_fit) {
        w->task.update_buffer = c->spare;
        w->task.update_capacity = c->spare ? c->spare_size : 0;
    }
    w->cancel = false;
    atomic_store(&w->finished, false);
    memset(&w->fit_out, 0, sizeof w->fit_out);
    memset(&w->eval_out, 0, sizeof w->eval_out);
    memset(&w->err, 0, sizeof w->err);
    void **arg = malloc(2 * sizeof *arg);
    if (!arg || (arg[0] = c, arg[1] = w, pthread_create(&w->thread, NULL, worker_main, arg)) != 0) {
        free(arg);
        logf_(c, TERN_LOG_ERROR, "client: cannot start the worker thread");
        bool ok = send_error(c, ss, TERN_PROTO_E_INTERNAL, 0, w->round,
                             "client: cannot start a worker thread");
        work_reset(w);
        return ok;
    }
    w->thread_started = true;
    w->phase = PHASE_RUNNING;
    logf_(c, TERN_LOG_INFO, "client: %s round %u on model version %llu",
          w->is_fit ? "fitting" : "evaluating", w->round, (unsigned long long)w->model_version);
    return true;
}

/* Send every chunk the window allows. */
static bool pump_upload(tern_client *c, session *ss)
{
    work *w = &ss->w;
    uint32_t index;
    while (w->phase == PHASE_UPLOAD && tern_send_window_ready(&w->window, &index)) {
        tern_msg m = {0};
        if (tern_payload_chunk(&w->window.info, w->update, index, &m) != TERN_OK) {
            logf_(c, TERN_LOG_ERROR, "client: cannot make chunk %u of the update", index);
            return false;
        }
        m.round = w->round;
        if (!send_msg(c, ss, &m))
            return false;
        tern_send_window_sent(&w->window);
    }
    return true;
}

/* The worker finished: send the result (or ERROR internal). */
static bool finish_worker(tern_client *c, session *ss)
{
    work *w = &ss->w;
    pthread_join(w->thread, NULL);
    w->thread_started = false;
    if (w->is_fit && w->task.update_buffer && w->fit_out.update == w->task.update_buffer) {
        c->spare = NULL; /* the callback made its update there: it is the update now */
        c->spare_size = 0;
        w->task.update_buffer = NULL;
    }
    if (w->status != TERN_OK) {
        if (w->is_fit)
            free(w->fit_out.update);
        logf_(c, TERN_LOG_WARN, "client: %s round %u failed: %s", w->is_fit ? "fit" : "evaluate",
              w->round, w->err.message[0] ? w->err.message : tern_strerror(w->status));
        bool ok = send_error(c, ss, TERN_PROTO_E_INTERNAL, 0, w->round, "%s",
                             w->err.message[0] ? w->err.message : tern_strerror(w->status));
        work_reset(w);
        return ok;
    }
    tern_msg m = {.round = w->round};
    tern_error e = {{0}};
    if (!w->is_fit) {
        m.type = TERN_MSG_EVALUATE_RES;
        m.evaluate_res = (tern_msg_evaluate_res){.model_version = w->model_version,
                                                 .num_examples = w->eval_out.num_examples,
                                                 .loss = w->eval_out.loss,
                                                 .metrics = w->eval_out.metrics};
        bool ok;
        if (tern_msg_encoded_size(&m, &ss->send_limits, &(size_t){0}, &e) != TERN_OK) {
            ok = send_error(c, ss, TERN_PROTO_E_INTERNAL, 0, w->round,
                            "client: the evaluate callback's result does not encode");
            logf_(c, TERN_LOG_ERROR, "client: evaluate result: %s", e.message);
        } else {
            ok = send_msg(c, ss, &m);
            if (ok)
                stats_add(c, &c->stats.evaluates, 1);
        }
        work_reset(w);
        return ok;
    }
    w->update = w->fit_out.update;
    w->update_size = w->fit_out.update_size;
    tern_status s = TERN_ERR_INVALID;
    if (w->update && w->update_size > 0 && w->fit_out.has_sha256)
        s = tern_payload_describe_hashed(w->fit_out.sha256, w->update_size,
                                         ++ss->next_transfer_id, ss->welcome.chunk_size,
                                         TERN_PAYLOAD_SAFETENSORS, &ss->send_limits,
                                         &m.fit_res.payload, &e);
    else if (w->update && w->update_size > 0)
        s = tern_payload_describe(w->update, w->update_size, ++ss->next_transfer_id,
                                  ss->welcome.chunk_size, TERN_PAYLOAD_SAFETENSORS,
                                  &ss->send_limits, &m.fit_res.payload, &e);
    else
        snprintf(e.message, sizeof e.message, "the fit callback returned no update");
    if (s == TERN_OK) {
        m.type = TERN_MSG_FIT_RES;
        m.fit_res.model_version = w->model_version;
        m.fit_res.num_examples = w->fit_out.num_examples;
        m.fit_res.metrics = w->fit_out.metrics;
        s = tern_msg_encoded_size(&m, &ss->send_limits, &(size_t){0}, &e);
    }
    if (s != TERN_OK) {
        logf_(c, TERN_LOG_ERROR, "client: fit result: %s", e.message);
        bool ok = send_error(c, ss, TERN_PROTO_E_INTERNAL, 0, w->round,
                             "client: bad fit result: %s", e.message);
        work_reset(w);
        return ok;
    }
    if (!send_msg(c, ss, &m))
        return false;
    w->res_seq = m.seq;
    tern_send_window_start(&w->window, &m.fit_res.payload);
    w->phase = PHASE_UPLOAD;
    logf_(c, TERN_LOG_INFO, "client: FIT_RES round %u: %zu bytes in %u chunks", w->round,
          w->update_size, m.fit_res.payload.chunk_count);
    return true;
}

/* ---- handling the server's messages ----------------------------------------------------------- */

static void refuse(tern_client *c, tern_proto_code code, const char *what)
{
    tern_proto_count(&c->counters, code);
    stats_add(c, &c->stats.refused, 1);
    logf_(c, TERN_LOG_DEBUG, "client: ignored a message from the server: %s", what);
}

/* A new FIT_INS or EVALUATE_INS. */
static bool on_instruction(tern_client *c, session *ss, const tern_msg *m)
{
    bool fit = m->type == TERN_MSG_FIT_INS;
    const tern_payload_info *p = fit ? &m->fit_ins.payload : &m->evaluate_ins.payload;
    if (ss->w.phase != PHASE_IDLE) {
        logf_(c, TERN_LOG_INFO, "client: a new %s replaces the work in progress (round %u)",
              tern_msg_type_name(m->type), ss->w.round);
        work_reset(&ss->w);
    }
    if (!fit && !c->opt.evaluate)
        return send_error(c, ss, TERN_PROTO_E_UNSUPPORTED, m->seq, m->round,
                          "client: this client does not evaluate");
    if (fit && m->fit_ins.update_encoding != TERN_PAYLOAD_SAFETENSORS)
        return send_error(c, ss, TERN_PROTO_E_UNSUPPORTED, m->seq, m->round,
                          "client: updates are sent as full safetensors weights only");
    if (p->encoding != TERN_PAYLOAD_NONE && p->encoding != TERN_PAYLOAD_SAFETENSORS)
        return send_error(c, ss, TERN_PROTO_E_UNSUPPORTED, m->seq, m->round,
                          "client: models must be safetensors payloads");
    work *w = &ss->w;
    w->is_fit = fit;
    w->round = m->round;
    w->model_version = fit ? m->fit_ins.model_version : m->evaluate_ins.model_version;
    w->config = fit ? m->fit_ins.config : m->evaluate_ins.config;
    if (p->encoding == TERN_PAYLOAD_NONE) {
        if (!c->model) {
            work_reset(w);
            return send_error(c, ss, TERN_PROTO_E_UNEXPECTED, m->seq, m->round,
                              "client: no model held to train from");
        }
        return start_worker(c, ss);
    }
    tern_msg ack;
    if (c->model && c->model_size == p->total_size && memcmp(c->model_sha, p->sha256, 32) == 0) {
        tern_chunk_ack_done(&ack, p);
        ack.round = m->round;
        stats_add(c, &c->stats.cache_hits, 1);
        c->model_version = w->model_version;
        logf_(c, TERN_LOG_DEBUG, "client: model of round %u already held", m->round);
        if (!send_msg(c, ss, &ack))
            return false;
        return start_worker(c, ss);
    }
    tern_error e = {{0}};
    tern_status s = tern_transfer_create(p, &c->opt.limits, &c->alloc, &w->transfer, &e);
    if (s != TERN_OK) {
        work_reset(w);
        logf_(c, TERN_LOG_WARN, "client: cannot receive the model: %s", e.message);
        return send_error(c, ss, s == TERN_ERR_NOMEM ? TERN_PROTO_E_INTERNAL
                                                     : TERN_PROTO_E_TRANSFER,
                          m->seq, m->round, "%s", e.message);
    }
    w->phase = PHASE_DOWNLOAD;
    tern_chunk_ack_make(&ack, w->transfer, DOWNLOAD_WINDOW);
    ack.round = m->round;
    return send_msg(c, ss, &ack);
}

static bool on_chunk(tern_client *c, session *ss, const tern_msg *m)
{
    work *w = &ss->w;
    if (w->phase != PHASE_DOWNLOAD ||
        m->chunk.info.transfer_id != tern_transfer_info(w->transfer)->transfer_id) {
        refuse(c, TERN_PROTO_E_UNEXPECTED, "a chunk of no transfer in progress");
        return true;
    }
    tern_error e = {{0}};
    tern_status s = tern_transfer_add(w->transfer, &m->chunk, &e);
    if (s == TERN_ERR_EXISTS) {
        refuse(c, TERN_PROTO_E_TRANSFER, "a duplicate chunk");
        return true;
    }
    if (s != TERN_OK && !tern_transfer_failed(w->transfer)) {
        refuse(c, TERN_PROTO_E_TRANSFER, e.message);
        return send_error(c, ss, TERN_PROTO_E_TRANSFER, m->seq, w->round, "%s", e.message);
    }
    if (s != TERN_OK) { /* hash mismatch: the download failed */
        logf_(c, TERN_LOG_WARN, "client: model download failed: %s", e.message);
        uint32_t round = w->round;
        work_reset(w);
        return send_error(c, ss, TERN_PROTO_E_TRANSFER, m->seq, round, "%s", e.message);
    }
    tern_msg ack;
    tern_chunk_ack_make(&ack, w->transfer, DOWNLOAD_WINDOW);
    ack.round = w->round;
    if (!tern_transfer_complete(w->transfer)) {
        if (!send_msg(c, ss, &ack))
            return false;
        /* Hashed after the ack, while the next chunk travels. */
        if (tern_transfer_hash_ready(w->transfer, &e) == TERN_OK)
            return true;
        logf_(c, TERN_LOG_WARN, "client: model download failed: %s", e.message);
        uint32_t round = w->round;
        work_reset(w);
        return send_error(c, ss, TERN_PROTO_E_TRANSFER, m->seq, round, "%s", e.message);
    }
    /* Complete and verified: keep it as the cache, ack done, start the work. */
    void *data = NULL;
    size_t len = 0;
    uint8_t sha[32];
    memcpy(sha, tern_transfer_info(w->transfer)->sha256, 32);
    s = tern_transfer_take(w->transfer, &data, &len);
    tern_transfer_destroy(&w->transfer);
    if (s != TERN_OK) {
        uint32_t round = w->round;
        work_reset(w);
        return send_error(c, ss, TERN_PROTO_E_INTERNAL, m->seq, round,
                          "client: the model cannot be taken from its transfer");
    }
    /* The transfer's bytes come from c->alloc, as the cache's do. */
    cache_store(c, data, len, sha, w->model_version);
    stats_add(c, &c->stats.downloads, 1);
    if (!send_msg(c, ss, &ack))
        return false;
    return start_worker(c, ss);
}

static bool on_chunk_ack(tern_client *c, session *ss, const tern_msg *m, outcome *out)
{
    work *w = &ss->w;
    if (w->phase != PHASE_UPLOAD || m->chunk_ack.transfer_id != w->window.info.transfer_id) {
        refuse(c, TERN_PROTO_E_UNEXPECTED, "a CHUNK_ACK for no upload in progress");
        return true;
    }
    if (tern_send_window_ack(&w->window, &m->chunk_ack) != TERN_OK) {
        refuse(c, TERN_PROTO_E_TRANSFER, "a CHUNK_ACK that breaks the flow-control rules");
        return send_error(c, ss, TERN_PROTO_E_TRANSFER, m->seq, w->round,
                          "client: CHUNK_ACK breaks the flow-control rules");
    }
    if (!pump_upload(c, ss))
        return false;
    if (w->window.done) {
        logf_(c, TERN_LOG_INFO, "client: update of round %u delivered", w->round);
        stats_add(c, &c->stats.fits, 1);
        free(c->spare); /* the update's buffer is lent to the next fit */
        c->spare = w->update;
        c->spare_size = w->update_size;
        w->update = NULL;
        work_reset(w);
        c->results_sent++;
        if (c->opt.max_rounds && c->results_sent >= c->opt.max_rounds) {
            tern_msg bye = {.type = TERN_MSG_GOODBYE};
            bye.goodbye.reason = TERN_GOODBYE_NORMAL;
            snprintf(bye.goodbye.message, sizeof bye.goodbye.message, "%u rounds done",
                     c->results_sent);
            send_msg(c, ss, &bye);
            *out = OUT_DONE;
        }
    }
    return true;
}

/* One decoded frame. Returns false when the session ends (*out says how). */
static bool handle(tern_client *c, session *ss, const tern_msg *m, outcome *out, tern_error *err)
{
    if (!ss->welcomed) {
        switch (m->type) {
        case TERN_MSG_WELCOME:
            ss->welcomed = true;
            ss->welcome = m->welcome;
            ss->send_limits.max_message_size = m->welcome.max_message_size;
            if (ss->welcome.chunk_size > m->welcome.max_message_size - TERN_PROTO_CHUNK_OVERHEAD)
                ss->welcome.chunk_size = m->welcome.max_message_size - TERN_PROTO_CHUNK_OVERHEAD;
            ss->next_heartbeat_ms = now_ms();
            stats_add(c, &c->stats.sessions, 1);
            logf_(c, TERN_LOG_INFO, "client: session %llu with %s (heartbeat %u ms)",
                  (unsigned long long)m->welcome.session_id, m->welcome.server_version,
                  m->welcome.heartbeat_ms);
            return true;
        case TERN_MSG_ERROR:
            if (m->error.code == TERN_PROTO_E_AUTH || m->error.code == TERN_PROTO_E_VERSION) {
                tern_set_error(err, TERN_ERR_STATE, "server refused the client (%s): %s",
                               tern_proto_code_name(m->error.code), m->error.message);
                *out = OUT_REFUSED;
                return false;
            }
            logf_(c, TERN_LOG_WARN, "client: server error before WELCOME (%s): %s",
                  tern_proto_code_name(m->error.code), m->error.message);
            if (m->error.code == TERN_PROTO_E_BUSY || m->error.code == TERN_PROTO_E_NO_SESSION) {
                *out = OUT_LOST;
                return false;
            }
            return true;
        case TERN_MSG_GOODBYE:
            break;
        default:
            refuse(c, TERN_PROTO_E_UNEXPECTED, "a message before WELCOME");
            return true;
        }
    }
    switch (m->type) {
    case TERN_MSG_HEARTBEAT:
        return true;
    case TERN_MSG_FIT_INS:
    case TERN_MSG_EVALUATE_INS:
        if (!on_instruction(c, ss, m)) {
            *out = OUT_LOST;
            return false;
        }
        return true;
    case TERN_MSG_MODEL_CHUNK:
        if (!on_chunk(c, ss, m)) {
            *out = OUT_LOST;
            return false;
        }
        return true;
    case TERN_MSG_CHUNK_ACK: {
        outcome o = OUT_LOST;
        bool ok = on_chunk_ack(c, ss, m, &o);
        if (!ok || o == OUT_DONE) {
            *out = ok ? OUT_DONE : OUT_LOST;
            return false;
        }
        return true;
    }
    case TERN_MSG_ERROR:
        logf_(c, TERN_LOG_WARN, "client: server error (%s) about message %llu: %s",
              tern_proto_code_name(m->error.code), (unsigned long long)m->error.in_reply_to,
              m->error.message);
        if (m->error.code == TERN_PROTO_E_NO_SESSION) {
            *out = OUT_LOST;
            return false;
        }
        if (m->error.code == TERN_PROTO_E_AUTH) {
            tern_set_error(err, TERN_ERR_STATE, "server refused the client (auth): %s",
                           m->error.message);
            *out = OUT_REFUSED;
            return false;
        }
        /* A refused result or upload ends that upload: the round is over for this client. */
        if (ss->w.phase == PHASE_UPLOAD && m->error.in_reply_to >= ss->w.res_seq &&
            (m->error.code == TERN_PROTO_E_STALE || m->error.code == TERN_PROTO_E_TRANSFER ||
             m->error.code == TERN_PROTO_E_UNEXPECTED || m->error.code == TERN_PROTO_E_TOO_LARGE))
            work_reset(&ss->w);
        return true;
    case TERN_MSG_GOODBYE:
        switch (m->goodbye.reason) {
        case TERN_GOODBYE_SHUTDOWN:
        case TERN_GOODBYE_NORMAL:
            logf_(c, TERN_LOG_INFO, "client: server said goodbye: %s", m->goodbye.message);
            *out = OUT_DONE;
            return false;
        case TERN_GOODBYE_REJECTED:
            tern_set_error(err, TERN_ERR_STATE, "server rejected the client: %s",
                           m->goodbye.message[0] ? m->goodbye.message : "(no reason given)");
            *out = OUT_REFUSED;
            return false;
        default:
            logf_(c, TERN_LOG_WARN, "client: server ended the session (%s)", m->goodbye.message);
            *out = OUT_LOST;
            return false;
        }
    default:
        refuse(c, TERN_PROTO_E_UNEXPECTED, tern_msg_type_name(m->type));
        return true;
    }
}

/* Read every frame waiting on the socket. */
static bool read_frames(tern_client *c, session *ss, outcome *out, tern_error *err)
{
    for (;;) {
        zmq_msg_t frame;
        zmq_msg_init(&frame);
        int rc = zmq_msg_recv(&frame, ss->zsock, ZMQ_DONTWAIT);
        if (rc < 0) {
            zmq_msg_close(&frame);
            return true; /* EAGAIN: nothing more */
        }
        bool more = zmq_msg_more(&frame);
        size_t len = zmq_msg_size(&frame);
        stats_add(c, &c->stats.bytes_in, len);
        ss->last_rx_ms = now_ms(); /* any frame is a sign of life */
        if (more) {
            /* A Tern message is one frame: drop every part of a multi-part message. */
            zmq_msg_close(&frame);
            refuse(c, TERN_PROTO_E_MALFORMED, "a multi-part message");
            do {
                zmq_msg_init(&frame);
                rc = zmq_msg_recv(&frame, ss->zsock, ZMQ_DONTWAIT);
                more = rc >= 0 && zmq_msg_more(&frame);
                zmq_msg_close(&frame);
            } while (more);
            continue;
        }
        tern_msg m;
        tern_proto_code reason = TERN_PROTO_OK;
        tern_error e = {{0}};
        tern_status s = tern_msg_decode(zmq_msg_data(&frame), len, &c->opt.limits, &m, &reason,
                                        &e);
        bool keep = true;
        if (s != TERN_OK) {
            refuse(c, reason, e.message);
        } else if (!(tern_msg_type_senders(m.type) & TERN_MSG_FROM_SERVER)) {
            refuse(c, TERN_PROTO_E_UNEXPECTED, "a client-only message type from the server");
        } else if (tern_seq_check(&ss->rx, m.seq) != TERN_OK) {
            refuse(c, TERN_PROTO_E_OUT_OF_ORDER, "a sequence number that does not increase");
        } else {
            tern_proto_count(&c->counters, TERN_PROTO_OK);
            keep = handle(c, ss, &m, out, err); /* chunk data is used before the close below */
        }
        zmq_msg_close(&frame);
        if (!keep)
            return false;
    }
}

/* ---- a session ------------------------------------------------------------------------------ */

static void session_close(tern_client *c, session *ss)
{
    work_reset(&ss->w);
    zsock_destroy(&ss->sock);
    (void)c;
}

static tern_status session_open(tern_client *c, session *ss, tern_error *err)
{
    memset(ss, 0, sizeof *ss);
    ss->send_limits = c->opt.limits;
    ss->sock = zsock_new(ZMQ_DEALER);
    if (!ss->sock)
        return tern_set_error(err, TERN_ERR_IO, "client: cannot create a socket");
    zsock_set_linger(ss->sock, 0);
    zsock_set_sndtimeo(ss->sock, SEND_TIMEOUT_MS);
    uint32_t max = c->opt.limits.max_message_size ? c->opt.limits.max_message_size
                                                  : TERN_PROTO_DEFAULT_MAX_MESSAGE;
    if (max > TERN_PROTO_HARD_MAX_MESSAGE)
        max = TERN_PROTO_HARD_MAX_MESSAGE;
    zsock_set_maxmsgsize(ss->sock, (int)max);
    if (!c->opt.insecure) {
        zcert_t *cert = zcert_new(); /* a throw-away key pair per connection */
        if (!cert) {
            zsock_destroy(&ss->sock);
            return tern_set_error(err, TERN_ERR_IO, "client: cannot create a CURVE key pair");
        }
        zcert_apply(cert, ss->sock);
        zcert_destroy(&cert);
        zsock_set_curve_serverkey(ss->sock, c->server_key);
    }
    if (zsock_connect(ss->sock, "%s", c->endpoint) != 0) {
        zsock_destroy(&ss->sock);
        return tern_set_error(err, TERN_ERR_INVALID, "client: cannot connect to '%s': %s",
                              c->endpoint, zmq_strerror(zmq_errno()));
    }
    ss->zsock = zsock_resolve(ss->sock);
    int64_t t = now_ms();
    ss->last_rx_ms = t;
    ss->hello_deadline_ms = t + c->opt.hello_timeout_ms;
    return TERN_OK;
}

/* Serve one connection until it ends. */
static outcome session_run(tern_client *c, tern_status *fail, tern_error *err)
{
    session ss;
    tern_status s = session_open(c, &ss, err);
    if (s != TERN_OK) {
        *fail = s;
        return OUT_FAILED;
    }
    outcome out = OUT_LOST;
    tern_msg hello = {.type = TERN_MSG_HELLO};
    snprintf(hello.hello.client_name, sizeof hello.hello.client_name, "%s", c->name);
    snprintf(hello.hello.api_key, sizeof hello.hello.api_key, "%s", c->api_key);
    snprintf(hello.hello.client_version, sizeof hello.hello.client_version, CLIENT_VERSION);
    hello.hello.capabilities = 0;
    hello.hello.num_examples = c->opt.num_examples;
    if (!send_msg(c, &ss, &hello))
        goto done;
    for (;;) {
        if (c->stop) {
            work_reset(&ss.w);
            tern_msg bye = {.type = TERN_MSG_GOODBYE};
            bye.goodbye.reason = TERN_GOODBYE_NORMAL;
            snprintf(bye.goodbye.message, sizeof bye.goodbye.message, "client stopping");
            if (ss.welcomed)
                send_msg(c, &ss, &bye);
            out = OUT_DONE;
            goto done;
        }
        int64_t t = now_ms(), deadline = t + STOP_POLL_MS;
        uint32_t hb = ss.welcome.heartbeat_ms;
        if (!ss.welcomed) {
            if (t >= ss.hello_deadline_ms) {
                logf_(c, TERN_LOG_WARN, "client: no WELCOME from %s within %u ms", c->endpoint,
                      c->opt.hello_timeout_ms);
                goto done;
            }
            if (ss.hello_deadline_ms < deadline)
                deadline = ss.hello_deadline_ms;
        } else if (hb > 0) {
            int64_t silent_until = ss.last_rx_ms + (int64_t)hb * c->opt.heartbeat_patience;
            if (t >= silent_until) {
                logf_(c, TERN_LOG_WARN, "client: server silent for %lld ms: reconnecting",
                      (long long)(t - ss.last_rx_ms));
                goto done;
            }
            if (t >= ss.next_heartbeat_ms) {
                if (!send_heartbeat(c, &ss))
                    goto done;
                ss.next_heartbeat_ms = t + hb;
            }
            if (ss.next_heartbeat_ms < deadline)
                deadline = ss.next_heartbeat_ms;
            if (silent_until < deadline)
                deadline = silent_until;
        }
        zmq_pollitem_t items[2] = {{.socket = ss.zsock, .events = ZMQ_POLLIN},
                                   {.fd = c->pipe_r, .events = ZMQ_POLLIN}};
        long timeout = (long)(deadline - t);
        if (zmq_poll(items, 2, timeout < 0 ? 0 : timeout) < 0 && zmq_errno() != EINTR) {
            *fail = tern_set_error(err, TERN_ERR_IO, "client: poll failed: %s",
                                   zmq_strerror(zmq_errno()));
            out = OUT_FAILED;
            goto done;
        }
        if (items[1].revents & ZMQ_POLLIN)
            drain_pipe(c);
        if ((items[0].revents & ZMQ_POLLIN) && !read_frames(c, &ss, &out, err))
            goto done;
        if (ss.w.phase == PHASE_RUNNING && atomic_load(&ss.w.finished) &&
            !finish_worker(c, &ss))
            goto done;
    }
done:
    if (out == OUT_REFUSED)
        *fail = TERN_ERR_STATE;
    session_close(c, &ss);
    return out;
}

/* Sleep ms in slices, returning early when stop is requested. */
static void backoff_sleep(tern_client *c, uint32_t ms)
{
    int64_t until = now_ms() + ms;
    while (!c->stop) {
        int64_t left = until - now_ms();
        if (left <= 0)
            return;
        zmq_pollitem_t item = {.fd = c->pipe_r, .events = ZMQ_POLLIN};
        zmq_poll(&item, 1, left < STOP_POLL_MS ? (long)left : STOP_POLL_MS);
        if (item.revents & ZMQ_POLLIN)
            drain_pipe(c);
    }
}

tern_status tern_client_run(tern_client *c, tern_error *err)
{
    if (!c)
        return tern_set_error(err, TERN_ERR_INVALID, "client: NULL client");
    uint32_t backoff = c->opt.backoff_initial_ms, failures = 0;
    c->results_sent = 0;
    for (;;) {
        if (c->stop)
            return TERN_OK;
        uint64_t sessions_before;
        pthread_mutex_lock(&c->stats_mu);
        sessions_before = c->stats.sessions;
        pthread_mutex_unlock(&c->stats_mu);
        tern_status fail = TERN_OK;
        outcome o = session_run(c, &fail, err);
        if (o == OUT_DONE)
            return TERN_OK;
        if (o == OUT_REFUSED || o == OUT_FAILED)
            return fail;
        if (c->stop)
            return TERN_OK;
        pthread_mutex_lock(&c->stats_mu);
        bool welcomed = c->stats.sessions > sessions_before;
        pthread_mutex_unlock(&c->stats_mu);
        if (welcomed) { /* a session that worked restarts the backoff */
            backoff = c->opt.backoff_initial_ms;
            failures = 0;
        }
        failures++;
        if (c->opt.max_reconnects && failures > c->opt.max_reconnects)
            return tern_set_error(err, TERN_ERR_IO, "client: no session with %s after %u "
                                  "reconnects", c->endpoint, c->opt.max_reconnects);
        logf_(c, TERN_LOG_INFO, "client: reconnecting in %u ms", backoff);
        backoff_sleep(c, backoff);
        backoff = backoff > c->opt.backoff_max_ms / 2 ? c->opt.backoff_max_ms : backoff * 2;
    }
}
