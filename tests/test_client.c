/* The federated client against a fake server written here with a raw CZMQ ROUTER socket and
 * the protocol functions: HELLO's fields; WELCOME, FIT_INS and a model in several chunks under
 * the client's credit; the exact bytes reaching the fit callback; heartbeats while fitting; the
 * update sent only within the credit the server grants; a cache hit (in memory and from
 * cache_dir); garbage from the server counted and ignored; EVALUATE_INS on the held model; a
 * failing callback reported as ERROR internal; reconnecting after silence and after
 * no_session (new routing id, new HELLO); refusal at HELLO; GOODBYE shutdown; request_stop
 * cancelling a fit; CURVE with a key pair made here (Z85 and key file), and a wrong server key
 * giving up after max_reconnects. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <czmq.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tern/client.h"
#include "tern/protocol.h"
#include "testutil.h"

/* ---- the fake server ---------------------------------------------------------------------- */

typedef struct fake {
    zsock_t *router;
    char endpoint[128];
    zframe_t *peer;      /* routing id of the last HELLO */
    zframe_t *last_body; /* keeps decoded chunk data valid */
    uint64_t seq;
    int heartbeats, fitting_heartbeats;
    bool silent; /* do not answer heartbeats */
} fake;

static void fake_send(fake *f, tern_msg *m);

static void fake_open(fake *f, zcert_t *cert)
{
    memset(f, 0, sizeof *f);
    f->router = zsock_new(ZMQ_ROUTER);
    assert_non_null(f->router);
    zsock_set_linger(f->router, 0);
    if (cert) {
        zcert_apply(cert, f->router);
        zsock_set_curve_server(f->router, 1);
    }
    int port = zsock_bind(f->router, "tcp://127.0.0.1:*");
    assert_true(port > 0);
    snprintf(f->endpoint, sizeof f->endpoint, "tcp://127.0.0.1:%d", port);
}

static void fake_close(fake *f)
{
    zframe_destroy(&f->peer);
    zframe_destroy(&f->last_body);
    zsock_destroy(&f->router);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Next message of any type within timeout_ms; *from (may be NULL) gets the routing id. */
static bool fake_recv_any(fake *f, tern_msg *m, int timeout_ms, zframe_t **from)
{
    zsock_set_rcvtimeo(f->router, timeout_ms < 0 ? 0 : timeout_ms);
    zmsg_t *msg = zmsg_recv(f->router);
    if (!msg)
        return false;
    assert_int_equal(zmsg_size(msg), 2);
    zframe_t *id = zmsg_pop(msg), *body = zmsg_pop(msg);
    zmsg_destroy(&msg);
    tern_error err = {{0}};
    tern_status s = tern_msg_decode(zframe_data(body), zframe_size(body), NULL, m, NULL, &err);
    if (s != TERN_OK)
        fail_msg("the client sent a message that does not decode: %s", err.message);
    zframe_destroy(&f->last_body);
    f->last_body = body;
    if (m->type == TERN_MSG_HELLO) {
        zframe_destroy(&f->peer);
        f->peer = zframe_dup(id);
        f->seq = 0;
    }
    if (from)
        *from = id;
    else
        zframe_destroy(&id);
    return true;
}

/* Next message other than HEARTBEAT (those are counted). */
static bool fake_recv(fake *f, tern_msg *m, int timeout_ms)
{
    int64_t until = now_ms() + timeout_ms;
    for (;;) {
        if (!fake_recv_any(f, m, (int)(until - now_ms()), NULL))
            return false;
        if (m->type != TERN_MSG_HEARTBEAT)
            return true;
        f->heartbeats++;
        if (m->heartbeat.state == TERN_PEER_FITTING)
            f->fitting_heartbeats++;
        if (!f->silent && f->peer) {
            tern_msg hb = {.type = TERN_MSG_HEARTBEAT};
            fake_send(f, &hb);
        }
    }
}

static void fake_expect(fake *f, tern_msg *m, tern_msg_type type, int timeout_ms)
{
    if (!fake_recv(f, m, timeout_ms))
        fail_msg("no %s from the client within %d ms", tern_msg_type_name(type), timeout_ms);
    if (m->type != type)
        fail_msg("expected %s, got %s", tern_msg_type_name(type), tern_msg_type_name(m->type));
}

/* Nothing but heartbeats for ms. */
static void fake_expect_quiet(fake *f, int ms)
{
    tern_msg m;
    if (fake_recv(f, &m, ms))
        fail_msg("unexpected %s from the client", tern_msg_type_name(m.type));
}

static void fake_send_raw(fake *f, const void *bytes, size_t len)
{
    zmsg_t *msg = zmsg_new();
    zmsg_append(msg, &(zframe_t *){zframe_dup(f->peer)});
    zmsg_addmem(msg, bytes, len);
    assert_int_equal(zmsg_send(&msg, f->router), 0);
}

static void fake_send(fake *f, tern_msg *m)
{
    m->seq = ++f->seq;
    void *bytes = NULL;
    size_t len = 0;
    tern_error err = {{0}};
    if (tern_msg_encode(m, NULL, NULL, &bytes, &len, &err) != TERN_OK)
        fail_msg("encode %s: %s", tern_msg_type_name(m->type), err.message);
    fake_send_raw(f, bytes, len);
    tern_proto_free(NULL, bytes);
}

static void send_welcome(fake *f, uint32_t heartbeat_ms, uint32_t chunk_size)
{
    tern_msg m = {.type = TERN_MSG_WELCOME};
    m.welcome.session_id = 99;
    strcpy(m.welcome.server_version, "fake/1");
    m.welcome.heartbeat_ms = heartbeat_ms;
    m.welcome.max_message_size = 1 << 20;
    m.welcome.chunk_size = chunk_size;
    fake_send(f, &m);
}

static void send_goodbye(fake *f, tern_goodbye_reason reason, const char *text)
{
    tern_msg m = {.type = TERN_MSG_GOODBYE};
    m.goodbye.reason = reason;
    snprintf(m.goodbye.message, sizeof m.goodbye.message, "%s", text);
    fake_send(f, &m);
}

static void send_error_msg(fake *f, tern_proto_code code, const char *text)
{
    tern_msg m;
    tern_msg_make_error(&m, code, 0, "%s", text);
    fake_send(f, &m);
}

/* HELLO (skipping what an earlier client's connection left queued), then WELCOME. */
static void handshake(fake *f, uint32_t heartbeat_ms, uint32_t chunk_size)
{
    tern_msg m;
    do
        assert_true(fake_recv(f, &m, 5000));
    while (m.type != TERN_MSG_HELLO);
    send_welcome(f, heartbeat_ms, chunk_size);
}

/* ---- the client side ------------------------------------------------------------------------- */

typedef struct cb_state {
    pthread_mutex_t mu;
    unsigned char *got;   /* copy of the last model given to a callback */
    size_t got_size;
    uint32_t got_round;
    uint64_t got_version;
    int fits, evaluates;
    const void *update;   /* what fit returns */
    size_t update_size;
    volatile bool hold;   /* fit waits while true (or until cancelled) */
    volatile bool entered;
    bool fail;
    volatile bool saw_cancel;
    bool use_spare;       /* fit writes its update into task->update_buffer when it fits */
    void *lent;           /* task->update_buffer and update_capacity of the last fit */
    size_t lent_capacity;
} cb_state;

static void record(cb_state *st, const tern_fit_task *task)
{
    pthread_mutex_lock(&st->mu);
    free(st->got);
    st->got = malloc(task->model_size);
    assert_non_null(st->got);
    memcpy(st->got, task->model, task->model_size);
    st->got_size = task->model_size;
    st->got_round = task->round;
    st->got_version = task->model_version;
    pthread_mutex_unlock(&st->mu);
}

static tern_status fit_cb(void *user, const tern_fit_task *task, const volatile bool *cancel,
                          tern_fit_output *out, tern_error *err)
{
    cb_state *st = user;
    record(st, task);
    st->entered = true;
    while (st->hold && !*cancel) {
        struct timespec ts = {0, 5 * 1000000L};
        nanosleep(&ts, NULL);
    }
    if (*cancel) {
        st->saw_cancel = true;
        snprintf(err->message, sizeof err->message, "cancelled");
        return TERN_ERR_STATE;
    }
    if (st->fail) {
        snprintf(err->message, sizeof err->message, "disk on fire");
        return TERN_ERR_IO;
    }
    pthread_mutex_lock(&st->mu);
    st->lent = task->update_buffer;
    st->lent_capacity = task->update_capacity;
    pthread_mutex_unlock(&st->mu);
    bool reuse = st->use_spare && task->update_buffer && task->update_capacity >= st->update_size;
    out->update = reuse ? task->update_buffer : malloc(st->update_size);
    if (!out->update)
        return TERN_ERR_NOMEM;
    memcpy(out->update, st->update, st->update_size);
    out->update_size = st->update_size;
    out->num_examples = 42;
    tern_metrics_set(&out->metrics, "loss", 0.5);
    pthread_mutex_lock(&st->mu);
    st->fits++;
    pthread_mutex_unlock(&st->mu);
    return TERN_OK;
}

static tern_status eval_cb(void *user, const tern_fit_task *task, const volatile bool *cancel,
                           tern_evaluate_output *out, tern_error *err)
{
    cb_state *st = user;
    record(st, task);
    out->num_examples = 17;
    out->loss = 1.25;
    tern_metrics_set(&out->metrics, "accuracy", 0.75);
    pthread_mutex_lock(&st->mu);
    st->evaluates++;
    pthread_mutex_unlock(&st->mu);
    return TERN_OK;
}

typedef struct runner {
    tern_client *client;
    pthread_t thread;
    tern_status status;
    tern_error err;
    volatile bool done;
} runner;

static void *run_main(void *arg)
{
    runner *r = arg;
    r->status = tern_client_run(r->client, &r->err);
    r->done = true;
    return NULL;
}

static tern_client_options base_options(const fake *f, cb_state *st)
{
    tern_client_options o = tern_client_options_default();
    o.endpoint = f->endpoint;
    o.name = "alice";
    o.api_key = "k3y";
    o.insecure = true;
    o.num_examples = 123;
    o.fit = fit_cb;
    o.evaluate = eval_cb;
    o.user = st;
    o.hello_timeout_ms = 2000;
    o.backoff_initial_ms = 20;
    o.backoff_max_ms = 100;
    return o;
}

static void start(runner *r, const tern_client_options *o)
{
    memset(r, 0, sizeof *r);
    tern_error err = {{0}};
    if (tern_client_create(o, &r->client, &err) != TERN_OK)
        fail_msg("tern_client_create: %s", err.message);
    assert_int_equal(pthread_create(&r->thread, NULL, run_main, r), 0);
}

/* Join the client (it must end within timeout_ms) and return its status. */
static tern_status finish(runner *r, int timeout_ms)
{
    int64_t until = now_ms() + timeout_ms;
    while (!r->done && now_ms() < until) {
        struct timespec ts = {0, 5 * 1000000L};
        nanosleep(&ts, NULL);
    }
    if (!r->done) {
        tern_client_request_stop(r->client);
        pthread_join(r->thread, NULL);
        fail_msg("the client did not return within %d ms", timeout_ms);
    }
    pthread_join(r->thread, NULL);
    return r->status;
}

static void cb_init(cb_state *st, const void *update, size_t len)
{
    memset(st, 0, sizeof *st);
    pthread_mutex_init(&st->mu, NULL);
    st->update = update;
    st->update_size = len;
}

static void cb_free(cb_state *st)
{
    free(st->got);
    pthread_mutex_destroy(&st->mu);
}

static unsigned char *random_bytes(size_t n, uint64_t seed)
{
    unsigned char *b = malloc(n);
    assert_non_null(b);
    test_rng r = {seed};
    for (size_t i = 0; i < n; i++)
        b[i] = (unsigned char)test_rng_next(&r);
    return b;
}

/* Send FIT_INS (or EVALUATE_INS) for model with this chunk size; the payload description is
 * returned in *info. */
static void send_ins(fake *f, bool fit, uint32_t round, uint64_t version, const void *model,
                     size_t len, uint32_t chunk, uint64_t transfer_id, tern_payload_info *info)
{
    tern_msg m = {.type = fit ? TERN_MSG_FIT_INS : TERN_MSG_EVALUATE_INS, .round = round};
    tern_payload_info p = {0};
    tern_error err = {{0}};
    if (model)
        assert_int_equal(tern_payload_describe(model, len, transfer_id, chunk,
                                               TERN_PAYLOAD_SAFETENSORS, NULL, &p, &err),
                         TERN_OK);
    if (fit) {
        m.fit_ins.model_version = version;
        m.fit_ins.update_encoding = TERN_PAYLOAD_SAFETENSORS;
        assert_int_equal(tern_config_set_int(&m.fit_ins.config, "epochs", 1), TERN_OK);
        m.fit_ins.payload = p;
    } else {
        m.evaluate_ins.model_version = version;
        m.evaluate_ins.payload = p;
    }
    fake_send(f, &m);
    if (info)
        *info = p;
}

/* Stream a model to the client strictly within the credit it grants, checking its acks. */
static void download(fake *f, const void *model, const tern_payload_info *p)
{
    tern_msg m;
    fake_expect(f, &m, TERN_MSG_CHUNK_ACK, 3000);
    assert_int_equal(m.chunk_ack.transfer_id, p->transfer_id);
    assert_int_equal(m.chunk_ack.received, 0);
    assert_int_equal(m.chunk_ack.credit, p->chunk_count < 4 ? p->chunk_count : 4);
    uint32_t credit = m.chunk_ack.credit, next = 0, acks = 1;
    while (next < p->chunk_count) {
        assert_true(next < credit); /* we only send within credit */
        tern_msg c = {0};
        assert_int_equal(tern_payload_chunk(p, model, next, &c), TERN_OK);
        fake_send(f, &c);
        next++;
        fake_expect(f, &m, TERN_MSG_CHUNK_ACK, 3000);
        acks++;
        assert_int_equal(m.chunk_ack.received, next);
        assert_true(m.chunk_ack.credit >= credit);           /* never decreases */
        assert_true(m.chunk_ack.credit <= next + 4);         /* window of 4 */
        assert_true(m.chunk_ack.credit <= p->chunk_count);
        credit = m.chunk_ack.credit;
    }
    assert_int_equal(credit, p->chunk_count);
    assert_int_equal(acks, p->chunk_count + 1);
}

/* Receive FIT_RES and the update, granting credit in two steps and checking that no chunk
 * comes without it. Returns the update (malloc'd). */
static void *upload(fake *f, tern_msg *res, size_t *len)
{
    fake_expect(f, res, TERN_MSG_FIT_RES, 5000);
    const tern_payload_info p = res->fit_res.payload;
    assert_true(p.chunk_count >= 3);
    tern_transfer *t = NULL;
    tern_error err = {{0}};
    assert_int_equal(tern_transfer_create(&p, NULL, NULL, &t, &err), TERN_OK);
    fake_expect_quiet(f, 200); /* no chunk before credit */
    tern_msg ack = {.type = TERN_MSG_CHUNK_ACK};
    ack.chunk_ack = (tern_msg_chunk_ack){.transfer_id = p.transfer_id, .received = 0,
                                         .credit = 2};
    fake_send(f, &ack);
    tern_msg m;
    for (uint32_t i = 0; i < 2; i++) {
        fake_expect(f, &m, TERN_MSG_MODEL_CHUNK, 3000);
        assert_int_equal(m.chunk.index, i);
        assert_int_equal(tern_transfer_add(t, &m.chunk, &err), TERN_OK);
    }
    fake_expect_quiet(f, 200); /* credit used up */
    ack.chunk_ack = (tern_msg_chunk_ack){.transfer_id = p.transfer_id, .received = 2,
                                         .credit = p.chunk_count};
    fake_send(f, &ack);
    for (uint32_t i = 2; i < p.chunk_count; i++) {
        fake_expect(f, &m, TERN_MSG_MODEL_CHUNK, 3000);
        assert_int_equal(m.chunk.index, i);
        assert_int_equal(tern_transfer_add(t, &m.chunk, &err), TERN_OK);
    }
    assert_true(tern_transfer_complete(t));
    tern_chunk_ack_done(&ack, &p);
    fake_send(f, &ack);
    const void *data;
    assert_int_equal(tern_transfer_data(t, &data, len), TERN_OK);
    void *copy = malloc(*len);
    assert_non_null(copy);
    memcpy(copy, data, *len);
    tern_transfer_destroy(&t);
    return copy;
}

static void wait_stat(tern_client *c, size_t offset, uint64_t want, int timeout_ms)
{
    int64_t until = now_ms() + timeout_ms;
    tern_client_stats s;
    for (;;) {
        tern_client_stats_get(c, &s);
        uint64_t v = *(const uint64_t *)((const char *)&s + offset);
        if (v >= want)
            return;
        if (now_ms() > until)
            fail_msg("client stat at offset %zu is %llu, expected %llu", offset,
                     (unsigned long long)v, (unsigned long long)want);
        struct timespec ts = {0, 5 * 1000000L};
        nanosleep(&ts, NULL);
    }
}
#define WAIT_STAT(c, field, want) wait_stat(c, offsetof(tern_client_stats, field), want, 3000)

/* ---- tests ---------------------------------------------------------------------------------- */

static void test_fit_round_trip(void **state)
{
    (void)state;
    fake f;
    fake_open(&f, NULL);
    const size_t model_len = 10000, update_len = 4500;
    unsigned char *model = random_bytes(model_len, 1), *update = random_bytes(update_len, 2);
    cb_state st;
    cb_init(&st, update, update_len);
    st.hold = true;
    char cache[] = "/tmp/tern-client-cache-XXXXXX";
    assert_non_null(mkdtemp(cache));
    tern_client_options o = base_options(&f, &st);
    o.cache_dir = cache;
    o.max_rounds = 2;
    runner r;
    start(&r, &o);

    tern_msg m;
    zframe_t *id = NULL;
    assert_true(fake_recv_any(&f, &m, 5000, &id));
    zframe_destroy(&id);
    assert_int_equal(m.type, TERN_MSG_HELLO);
    assert_int_equal(m.seq, 1);
    assert_string_equal(m.hello.client_name, "alice");
    assert_string_equal(m.hello.api_key, "k3y");
    assert_string_equal(m.hello.client_version, "tern/0.1");
    assert_int_equal(m.hello.capabilities, 0);
    assert_int_equal(m.hello.num_examples, 123);
    send_welcome(&f, 50, 1000);

    /* Round 1: the model in 10 chunks of 1000 under credit. */
    tern_payload_info p;
    send_ins(&f, true, 1, 7, model, model_len, 1000, 501, &p);
    assert_int_equal(p.chunk_count, 10);
    download(&f, model, &p);
    /* Fitting: heartbeats say so. */
    int64_t until = now_ms() + 3000;
    while (f.fitting_heartbeats < 2 && now_ms() < until)
        fake_expect_quiet(&f, 20);
    assert_true(f.fitting_heartbeats >= 2);
    assert_true(st.entered);
    st.hold = false;
    size_t got_len;
    tern_msg res;
    void *got = upload(&f, &res, &got_len);
    assert_int_equal(res.round, 1);
    assert_int_equal(res.fit_res.model_version, 7);
    assert_int_equal(res.fit_res.num_examples, 42);
    assert_int_equal(res.fit_res.payload.chunk_size, 1000);
    assert_int_equal(res.fit_res.payload.encoding, TERN_PAYLOAD_SAFETENSORS);
    assert_true(res.fit_res.payload.transfer_id != 0);
    double loss;
    assert_int_equal(tern_metrics_get(&res.fit_res.metrics, "loss", &loss), TERN_OK);
    assert_true(loss == 0.5);
    assert_int_equal(got_len, update_len);
    assert_memory_equal(got, update, update_len);
    free(got);
    pthread_mutex_lock(&st.mu);
    assert_int_equal(st.got_size, model_len);
    assert_memory_equal(st.got, model, model_len);
    assert_int_equal(st.got_round, 1);
    assert_int_equal(st.got_version, 7);
    assert_null(st.lent); /* no earlier update to lend */
    st.use_spare = true;
    pthread_mutex_unlock(&st.mu);
    WAIT_STAT(r.client, fits, 1);

    /* Garbage: random bytes, a multi-part message, a replayed sequence number, a client-only
     * type. Counted, ignored. */
    static const char junk[] = "definitely not a tern message";
    fake_send_raw(&f, junk, sizeof junk);
    zmsg_t *multi = zmsg_new();
    zmsg_append(multi, &(zframe_t *){zframe_dup(f.peer)});
    zmsg_addstr(multi, "part one");
    zmsg_addstr(multi, "part two");
    assert_int_equal(zmsg_send(&multi, f.router), 0);
    tern_msg hb = {.type = TERN_MSG_HEARTBEAT};
    fake_send(&f, &hb);
    f.seq--; /* the same number again */
    fake_send(&f, &hb);
    tern_msg hello = {.type = TERN_MSG_HELLO};
    strcpy(hello.hello.client_name, "mallory");
    fake_send(&f, &hello);
    WAIT_STAT(r.client, refused, 4);

    /* Evaluate the held model (no payload). */
    send_ins(&f, false, 1, 7, NULL, 0, 0, 0, NULL);
    fake_expect(&f, &m, TERN_MSG_EVALUATE_RES, 3000);
    assert_int_equal(m.evaluate_res.model_version, 7);
    assert_int_equal(m.evaluate_res.num_examples, 17);
    assert_true(m.evaluate_res.loss == 1.25);
    WAIT_STAT(r.client, evaluates, 1);

    /* Round 2 with the same model: a cache hit, no chunk needed. */
    send_ins(&f, true, 2, 8, model, model_len, 1000, 502, &p);
    fake_expect(&f, &m, TERN_MSG_CHUNK_ACK, 3000);
    assert_int_equal(m.chunk_ack.transfer_id, 502);
    assert_int_equal(m.chunk_ack.received, p.chunk_count);
    assert_int_equal(m.chunk_ack.credit, p.chunk_count);
    got = upload(&f, &res, &got_len);
    assert_int_equal(got_len, update_len);
    assert_memory_equal(got, update, update_len);
    free(got);
    assert_int_equal(res.round, 2);
    assert_int_equal(res.fit_res.model_version, 8);
    pthread_mutex_lock(&st.mu);
    /* Round 1's update buffer was lent to round 2's fit, which wrote its update there. */
    assert_non_null(st.lent);
    assert_int_equal(st.lent_capacity, update_len);
    assert_memory_equal(st.got, model, model_len);
    assert_int_equal(st.got_round, 2);
    pthread_mutex_unlock(&st.mu);
    /* max_rounds = 2: GOODBYE normal and TERN_OK. */
    fake_expect(&f, &m, TERN_MSG_GOODBYE, 3000);
    assert_int_equal(m.goodbye.reason, TERN_GOODBYE_NORMAL);
    assert_int_equal(finish(&r, 3000), TERN_OK);
    tern_client_stats s;
    tern_client_stats_get(r.client, &s);
    assert_int_equal(s.sessions, 1);
    assert_int_equal(s.fits, 2);
    assert_int_equal(s.evaluates, 1);
    assert_int_equal(s.downloads, 1);
    assert_int_equal(s.cache_hits, 1);
    assert_true(s.bytes_in > model_len && s.bytes_out > 2 * update_len);
    tern_client_destroy(&r.client);

    /* A new client with the same cache_dir holds the model from the start. */
    st.fits = 0;
    start(&r, &o);
    handshake(&f, 50, 1000);
    send_ins(&f, true, 3, 9, model, model_len, 1000, 503, &p);
    fake_expect(&f, &m, TERN_MSG_CHUNK_ACK, 3000);
    assert_int_equal(m.chunk_ack.received, p.chunk_count);
    send_goodbye(&f, TERN_GOODBYE_SHUTDOWN, "bye");
    assert_int_equal(finish(&r, 3000), TERN_OK);
    tern_client_destroy(&r.client);

    /* A corrupt cache file is ignored: the model is downloaded. */
    char path[256];
    snprintf(path, sizeof path, "%s/last_model.tern", cache);
    FILE *fp = fopen(path, "r+b");
    assert_non_null(fp);
    assert_int_equal(fseek(fp, 100, SEEK_SET), 0);
    fputc('X', fp);
    fclose(fp);
    start(&r, &o);
    handshake(&f, 50, 1000);
    send_ins(&f, true, 4, 10, model, model_len, 1000, 504, &p);
    fake_expect(&f, &m, TERN_MSG_CHUNK_ACK, 3000);
    assert_int_equal(m.chunk_ack.received, 0);
    send_goodbye(&f, TERN_GOODBYE_SHUTDOWN, "bye");
    assert_int_equal(finish(&r, 3000), TERN_OK);
    tern_client_destroy(&r.client);
    unlink(path);
    rmdir(cache);

    cb_free(&st);
    free(model);
    free(update);
    fake_close(&f);
}

static void test_fit_failure_and_stop(void **state)
{
    (void)state;
    fake f;
    fake_open(&f, NULL);
    unsigned char *model = random_bytes(3000, 3);
    cb_state st;
    cb_init(&st, model, 3000);
    st.fail = true;
    tern_client_options o = base_options(&f, &st);
    o.evaluate = NULL;
    runner r;
    start(&r, &o);
    handshake(&f, 50, 1000);
    tern_payload_info p;
    send_ins(&f, true, 1, 1, model, 3000, 1000, 1, &p);
    download(&f, model, &p);
    tern_msg m;
    fake_expect(&f, &m, TERN_MSG_ERROR, 3000);
    assert_int_equal(m.error.code, TERN_PROTO_E_INTERNAL);
    assert_non_null(strstr(m.error.message, "disk on fire"));
    assert_int_equal(m.round, 1);
    /* No evaluate callback: ERROR unsupported. */
    send_ins(&f, false, 1, 1, NULL, 0, 0, 0, NULL);
    fake_expect(&f, &m, TERN_MSG_ERROR, 3000);
    assert_int_equal(m.error.code, TERN_PROTO_E_UNSUPPORTED);
    /* A result the server refuses (stale) ends that upload: credit granted later sends
     * nothing. */
    st.fail = false;
    send_ins(&f, true, 2, 1, model, 3000, 1000, 2, &p);
    fake_expect(&f, &m, TERN_MSG_CHUNK_ACK, 3000); /* cache hit */
    tern_msg res;
    fake_expect(&f, &res, TERN_MSG_FIT_RES, 3000);
    tern_msg refusal;
    tern_msg_make_error(&refusal, TERN_PROTO_E_STALE, res.seq, "round 2 is closed");
    fake_send(&f, &refusal);
    tern_msg ack = {.type = TERN_MSG_CHUNK_ACK};
    ack.chunk_ack = (tern_msg_chunk_ack){.transfer_id = res.fit_res.payload.transfer_id,
                                         .credit = res.fit_res.payload.chunk_count};
    fake_send(&f, &ack);
    fake_expect_quiet(&f, 200);
    /* request_stop during a fit: the callback is cancelled, GOODBYE normal, TERN_OK. */
    st.hold = true;
    st.entered = false;
    send_ins(&f, true, 3, 1, model, 3000, 1000, 3, &p);
    fake_expect(&f, &m, TERN_MSG_CHUNK_ACK, 3000); /* cache hit */
    int64_t until = now_ms() + 3000;
    while (!st.entered && now_ms() < until)
        fake_expect_quiet(&f, 10);
    assert_true(st.entered);
    int64_t t0 = now_ms();
    tern_client_request_stop(r.client);
    fake_expect(&f, &m, TERN_MSG_GOODBYE, 3000);
    assert_int_equal(m.goodbye.reason, TERN_GOODBYE_NORMAL);
    assert_int_equal(finish(&r, 3000), TERN_OK);
    assert_true(now_ms() - t0 < 1000);
    assert_true(st.saw_cancel);
    tern_client_destroy(&r.client);
    cb_free(&st);
    free(model);
    fake_close(&f);
}

static void test_reconnect(void **state)
{
    (void)state;
    fake f;
    fake_open(&f, NULL);
    cb_state st;
    cb_init(&st, "x", 1);
    tern_client_options o = base_options(&f, &st);
    o.heartbeat_patience = 3;
    runner r;
    start(&r, &o);

    /* Silence: after 3 x 50 ms the client reconnects with a new socket. */
    f.silent = true;
    zframe_t *id1 = NULL, *id2 = NULL, *id3 = NULL;
    tern_msg m;
    assert_true(fake_recv_any(&f, &m, 5000, &id1));
    assert_int_equal(m.type, TERN_MSG_HELLO);
    send_welcome(&f, 50, 1000);
    int64_t t0 = now_ms();
    do
        assert_true(fake_recv_any(&f, &m, 3000, &id2));
    while (m.type == TERN_MSG_HEARTBEAT && (zframe_destroy(&id2), true));
    assert_int_equal(m.type, TERN_MSG_HELLO);
    assert_int_equal(m.seq, 1);
    assert_true(now_ms() - t0 >= 100);
    assert_false(zframe_eq(id1, id2));
    f.silent = false;
    send_welcome(&f, 50, 1000);
    WAIT_STAT(r.client, sessions, 2);

    /* ERROR no_session (a restarted server): HELLO again on a new socket. */
    send_error_msg(&f, TERN_PROTO_E_NO_SESSION, "who are you?");
    do
        assert_true(fake_recv_any(&f, &m, 3000, &id3));
    while (m.type == TERN_MSG_HEARTBEAT && (zframe_destroy(&id3), true));
    assert_int_equal(m.type, TERN_MSG_HELLO);
    assert_false(zframe_eq(id2, id3));
    send_welcome(&f, 50, 1000);
    WAIT_STAT(r.client, sessions, 3);

    send_goodbye(&f, TERN_GOODBYE_SHUTDOWN, "the run is over");
    assert_int_equal(finish(&r, 3000), TERN_OK);
    zframe_destroy(&id1);
    zframe_destroy(&id2);
    zframe_destroy(&id3);
    tern_client_destroy(&r.client);
    cb_free(&st);
    fake_close(&f);
}

static void test_refused(void **state)
{
    (void)state;
    fake f;
    fake_open(&f, NULL);
    cb_state st;
    cb_init(&st, "x", 1);
    tern_client_options o = base_options(&f, &st);
    runner r;
    start(&r, &o);
    tern_msg m;
    fake_expect(&f, &m, TERN_MSG_HELLO, 5000);
    send_error_msg(&f, TERN_PROTO_E_AUTH, "unknown client 'alice'");
    send_goodbye(&f, TERN_GOODBYE_REJECTED, "rejected");
    assert_int_equal(finish(&r, 3000), TERN_ERR_STATE);
    assert_non_null(strstr(r.err.message, "unknown client 'alice'"));
    fake_expect_quiet(&f, 300); /* no retry */
    tern_client_destroy(&r.client);

    /* GOODBYE rejected alone also refuses. */
    start(&r, &o);
    fake_expect(&f, &m, TERN_MSG_HELLO, 5000);
    send_goodbye(&f, TERN_GOODBYE_REJECTED, "blacklisted: too many bad updates");
    assert_int_equal(finish(&r, 3000), TERN_ERR_STATE);
    assert_non_null(strstr(r.err.message, "blacklisted"));
    tern_client_destroy(&r.client);

    /* Options. */
    tern_client *c = NULL;
    tern_error err = {{0}};
    tern_client_options bad = o;
    bad.fit = NULL;
    assert_int_equal(tern_client_create(&bad, &c, &err), TERN_ERR_INVALID);
    bad = o;
    bad.endpoint = NULL;
    assert_int_equal(tern_client_create(&bad, &c, &err), TERN_ERR_INVALID);
    bad = o;
    bad.insecure = false;
    bad.server_public_key = NULL;
    assert_int_equal(tern_client_create(&bad, &c, &err), TERN_ERR_INVALID);
    bad.server_public_key = "this is not a key and not a file either!";
    assert_int_equal(tern_client_create(&bad, &c, &err), TERN_ERR_FORMAT);
    assert_null(c);
    cb_free(&st);
    fake_close(&f);
}

static void curve_session(zcert_t *server, const char *key)
{
    fake f;
    fake_open(&f, server);
    cb_state st;
    cb_init(&st, "x", 1);
    tern_client_options o = base_options(&f, &st);
    o.insecure = false;
    o.server_public_key = key;
    runner r;
    start(&r, &o);
    tern_msg m;
    fake_expect(&f, &m, TERN_MSG_HELLO, 5000);
    assert_string_equal(m.hello.api_key, "k3y");
    send_welcome(&f, 50, 1000);
    WAIT_STAT(r.client, sessions, 1);
    send_goodbye(&f, TERN_GOODBYE_SHUTDOWN, "bye");
    assert_int_equal(finish(&r, 3000), TERN_OK);
    tern_client_destroy(&r.client);
    cb_free(&st);
    fake_close(&f);
}

static void test_curve(void **state)
{
    (void)state;
    if (!zsys_has_curve()) {
        print_message("libzmq without CURVE: skipped\n");
        skip();
    }
    zcert_t *server = zcert_new();
    assert_non_null(server);
    curve_session(server, zcert_public_txt(server));
    char dir[] = "/tmp/tern-client-key-XXXXXX", path[128];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/server.pub", dir);
    assert_int_equal(zcert_save_public(server, path), 0);
    curve_session(server, path);
    unlink(path);
    rmdir(dir);

    /* The wrong server key: no session; max_reconnects ends it with TERN_ERR_IO. */
    fake f;
    fake_open(&f, server);
    zcert_t *other = zcert_new();
    cb_state st;
    cb_init(&st, "x", 1);
    tern_client_options o = base_options(&f, &st);
    o.insecure = false;
    o.server_public_key = zcert_public_txt(other);
    o.hello_timeout_ms = 200;
    o.max_reconnects = 2;
    runner r;
    start(&r, &o);
    fake_expect_quiet(&f, 100);
    assert_int_equal(finish(&r, 5000), TERN_ERR_IO);
    tern_client_stats s;
    tern_client_stats_get(r.client, &s);
    assert_int_equal(s.sessions, 0);
    tern_client_destroy(&r.client);
    cb_free(&st);
    fake_close(&f);
    zcert_destroy(&other);
    zcert_destroy(&server);
}

int main(void)
{
    zsys_init();
    zsys_set_logstream(NULL);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fit_round_trip),
        cmocka_unit_test(test_fit_failure_and_stop),
        cmocka_unit_test(test_reconnect),
        cmocka_unit_test(test_refused),
        cmocka_unit_test(test_curve),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
