/* Federated server tests: an in-process tern_server running in a thread, and fake clients
 * written here with raw CZMQ DEALER sockets and the protocol functions (independent of the
 * client library). A tiny MobileNetV3-Small (width 0.25, 1 channel, 10 classes) keeps payloads
 * at a few hundred KB, and a 32 KiB chunk size gives each payload several chunks.
 *
 * Covered: a 2-client FedAvg round (the committed model is the example-weighted mean, BatchNorm
 * statistics included; client evaluation and the server-side callback), download credit and
 * the upload slot limit; authentication refusals; malformed, oversized, multi-part, replayed
 * and wrong-version frames; no_session; strict and tolerant policies when a client vanishes;
 * a late result answered `stale`; resume after a stop with FedAdam state; CURVE; the cosine
 * learning-rate schedule; convergence (patience), also across a restart; download slots with
 * more clients than max_downloads; max_sessions; MODEL_REQUEST for older versions. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <czmq.h>

#include "tern.h"
#include "tern/server.h"
#include "testutil.h"

#define OK(call)                                                                               \
    do {                                                                                       \
        tern_error e_ = {{0}};                                                                 \
        (void)e_;                                                                              \
        tern_status s_ = (call);                                                               \
        if (s_ != TERN_OK)                                                                     \
            fail_msg("%s: %s", #call, tern_strerror(s_));                                      \
    } while (0)

#define CHUNK 32768
#define PI 3.14159265358979323846

/* ---- fixture: a store with registered clients, a model -------------------------------------- */

typedef struct fixture {
    char dir[64];
    tern_store *store;
    tern_model *model;   /* the server's global model */
    tern_model *cm;      /* a client-side model for building updates */
    tern_server *server;
    pthread_t thread;
    bool running;
    tern_status run_status;
    tern_error run_err;
    pthread_mutex_t lock;
    tern_round_report reports[8];
    int num_reports;
} fixture;

static tern_model_options model_options(void)
{
    tern_model_options o = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    o.width_mult = 0.25;
    o.in_channels = 1;
    o.num_classes = 10;
    o.bn_momentum = 0.1f;
    o.seed = 7;
    return o;
}

static void register_client(tern_store *st, const char *name, const char *key)
{
    tern_client_record in;
    memset(&in, 0, sizeof in);
    snprintf(in.name, sizeof in.name, "%s", name);
    snprintf(in.device_type, sizeof in.device_type, "test");
    tern_error err = {{0}};
    if (tern_store_hash_api_key(key, in.api_key_hash, &err) != TERN_OK ||
        tern_store_client_register(st, &in, NULL, &err) != TERN_OK)
        fail_msg("registering %s: %s", name, err.message);
}

static tern_model *new_model(void)
{
    tern_model_options o = model_options();
    tern_model *m = NULL;
    tern_error err = {{0}};
    if (tern_model_create(&o, &m, &err) != TERN_OK)
        fail_msg("model: %s", err.message);
    return m;
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    if (!f)
        return -1;
    snprintf(f->dir, sizeof f->dir, "/tmp/tern_test_server.XXXXXX");
    if (!mkdtemp(f->dir))
        return -1;
    char path[128];
    snprintf(path, sizeof path, "%s/store", f->dir);
    tern_store_options so = {.no_sync = true};
    tern_error err = {{0}};
    if (tern_store_open(path, &so, &f->store, &err) != TERN_OK)
        return -1;
    register_client(f->store, "alice", "alice-key");
    register_client(f->store, "bob", "bob-key");
    f->model = new_model();
    f->cm = new_model();
    pthread_mutex_init(&f->lock, NULL);
    *state = f;
    return 0;
}

static void stop_server(fixture *f);
static void fakes_destroy_all(void);

static int teardown(void **state)
{
    fixture *f = *state;
    fakes_destroy_all(); /* those a failed test left behind */
    stop_server(f);
    tern_model_destroy(&f->model);
    tern_model_destroy(&f->cm);
    tern_store_close(&f->store);
    test_rm_tree(f->dir);
    pthread_mutex_destroy(&f->lock);
    free(f);
    return 0;
}

/* ---- the server in a thread ------------------------------------------------------------------- */

static void test_log(void *user, tern_log_level level, const char *message)
{
    (void)user;
    if (level >= TERN_LOG_WARN && getenv("TERN_TEST_VERBOSE"))
        print_message("server: %s\n", message);
    else if (getenv("TERN_TEST_VERBOSE"))
        print_message("server(debug): %s\n", message);
}

static void on_round(void *user, const tern_round_report *r)
{
    fixture *f = user;
    pthread_mutex_lock(&f->lock);
    if (f->num_reports < 8)
        f->reports[f->num_reports++] = *r;
    pthread_mutex_unlock(&f->lock);
}

static tern_server_options base_options(fixture *f)
{
    tern_server_options o = tern_server_options_default();
    o.endpoint = "tcp://127.0.0.1:*";
    o.insecure = true;
    o.strategy.min_fit_clients = 2;
    o.strategy.min_available_clients = 2;
    o.strategy.fraction_evaluate = 0.0;
    o.strategy.seed = 42;
    o.rounds = 1;
    o.heartbeat_ms = 200;
    o.heartbeat_patience = 10; /* 2 s: a loaded CI machine can stall a fake client */
    o.chunk_size = CHUNK;
    o.round_timeout_ms = 20000;
    o.settings = "test settings";
    o.classes = "0,1,2,3,4,5,6,7,8,9";
    o.log = test_log;
    o.on_round = on_round;
    o.on_round_user = f;
    tern_config_set_int(&o.fit_config, "epochs", 1);
    return o;
}

static void *run_thread(void *arg)
{
    fixture *f = arg;
    f->run_status = tern_server_run(f->server, &f->run_err);
    return NULL;
}

static void start_server(fixture *f, const tern_server_options *o)
{
    tern_error err = {{0}};
    if (tern_server_create(o, f->store, f->model, &f->server, &err) != TERN_OK)
        fail_msg("tern_server_create: %s", err.message);
    assert_int_equal(pthread_create(&f->thread, NULL, run_thread, f), 0);
    f->running = true;
}

/* Wait for run to return by itself. */
static tern_status join_server(fixture *f)
{
    if (f->running) {
        pthread_join(f->thread, NULL);
        f->running = false;
    }
    return f->run_status;
}

static void stop_server(fixture *f)
{
    if (f->running)
        tern_server_request_stop(f->server);
    join_server(f);
    tern_server_destroy(&f->server);
}

/* ---- fake clients ----------------------------------------------------------------------------- */

typedef struct fake {
    zsock_t *sock;
    uint64_t seq;
    tern_seq_tracker in;
    zframe_t *frame;  /* the last frame received; msg borrows from it */
    tern_msg msg;
    bool heartbeat;   /* keep sending HEARTBEAT while the test waits */
    int64_t next_hb;
    uint64_t next_tid;
} fake;

#define MAX_FAKES 8
static fake *g_fakes[MAX_FAKES];

static fake *fake_new(const char *endpoint, const char *server_public)
{
    fake *f = calloc(1, sizeof *f);
    assert_non_null(f);
    f->sock = zsock_new(ZMQ_DEALER);
    assert_non_null(f->sock);
    zsock_set_linger(f->sock, 0);
    zsock_set_sndtimeo(f->sock, 1000); /* a DEALER without a peer would block for ever */
    if (server_public) {
        zcert_t *cert = zcert_new();
        zcert_apply(cert, f->sock);
        zcert_destroy(&cert);
        zsock_set_curve_serverkey(f->sock, server_public);
    }
    assert_int_equal(zsock_connect(f->sock, "%s", endpoint), 0);
    for (int i = 0; i < MAX_FAKES; i++)
        if (!g_fakes[i]) {
            g_fakes[i] = f;
            break;
        }
    return f;
}

static void fake_destroy(fake **fp)
{
    fake *f = *fp;
    if (!f)
        return;
    for (int i = 0; i < MAX_FAKES; i++)
        if (g_fakes[i] == f)
            g_fakes[i] = NULL;
    zframe_destroy(&f->frame);
    zsock_destroy(&f->sock);
    free(f);
    *fp = NULL;
}

static void fakes_destroy_all(void)
{
    for (int i = 0; i < MAX_FAKES; i++)
        if (g_fakes[i]) {
            fake *f = g_fakes[i];
            fake_destroy(&f);
        }
}

static void fake_send_raw(fake *f, const void *bytes, size_t len)
{
    zframe_t *fr = zframe_new(bytes, len);
    assert_int_equal(zframe_send(&fr, f->sock, 0), 0);
}

static void fake_send(fake *f, tern_msg *m)
{
    m->seq = tern_seq_next(&f->seq);
    void *bytes = NULL;
    size_t len = 0;
    tern_error err = {{0}};
    if (tern_msg_encode(m, NULL, NULL, &bytes, &len, &err) != TERN_OK)
        fail_msg("encode %s: %s", tern_msg_type_name(m->type), err.message);
    fake_send_raw(f, bytes, len);
    tern_proto_free(NULL, bytes);
}

static void pump_heartbeats(void)
{
    int64_t now = zclock_mono();
    for (int i = 0; i < MAX_FAKES; i++) {
        fake *f = g_fakes[i];
        if (f && f->heartbeat && now >= f->next_hb) {
            tern_msg m = {.type = TERN_MSG_HEARTBEAT};
            m.heartbeat.timestamp_ms = (uint64_t)zclock_time();
            fake_send(f, &m);
            f->next_hb = now + 40;
        }
    }
}

/* Wait for a message other than HEARTBEAT; false on timeout. */
static bool fake_poll(fake *f, int timeout_ms)
{
    int64_t end = zclock_mono() + timeout_ms;
    for (;;) {
        pump_heartbeats();
        int64_t left = end - zclock_mono();
        if (left < 0)
            left = 0;
        zmq_pollitem_t it = {zsock_resolve(f->sock), 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, left > 20 ? 20 : (long)left) > 0) {
            zframe_destroy(&f->frame);
            f->frame = zframe_recv(f->sock);
            assert_non_null(f->frame);
            tern_error err = {{0}};
            if (tern_msg_decode(zframe_data(f->frame), zframe_size(f->frame), NULL, &f->msg,
                                NULL, &err) != TERN_OK)
                fail_msg("the server sent an undecodable frame: %s", err.message);
            if (tern_seq_check(&f->in, f->msg.seq) != TERN_OK)
                fail_msg("server sequence number %llu after %llu",
                         (unsigned long long)f->msg.seq, (unsigned long long)f->in.last);
            if (f->msg.type == TERN_MSG_HEARTBEAT)
                continue;
            return true;
        }
        if (left == 0)
            return false;
    }
}

static void fake_expect(fake *f, tern_msg_type type, int timeout_ms)
{
    if (!fake_poll(f, timeout_ms))
        fail_msg("timeout waiting for %s", tern_msg_type_name(type));
    if (f->msg.type != type) {
        if (f->msg.type == TERN_MSG_ERROR)
            fail_msg("expected %s, got ERROR %s: %s", tern_msg_type_name(type),
                     tern_proto_code_name(f->msg.error.code), f->msg.error.message);
        fail_msg("expected %s, got %s", tern_msg_type_name(type),
                 tern_msg_type_name(f->msg.type));
    }
}

static void fake_expect_error(fake *f, tern_proto_code code)
{
    fake_expect(f, TERN_MSG_ERROR, 3000);
    if (f->msg.error.code != code)
        fail_msg("expected ERROR %s, got %s (%s)", tern_proto_code_name(code),
                 tern_proto_code_name(f->msg.error.code), f->msg.error.message);
}

static void fake_hello_msg(fake *f, const char *name, const char *key)
{
    tern_msg m = {.type = TERN_MSG_HELLO};
    snprintf(m.hello.client_name, sizeof m.hello.client_name, "%s", name);
    snprintf(m.hello.api_key, sizeof m.hello.api_key, "%s", key);
    snprintf(m.hello.client_version, sizeof m.hello.client_version, "fake");
    m.hello.capabilities = TERN_CAP_DELTA;
    fake_send(f, &m);
}

static fake *fake_connect(fixture *fx, const char *name, const char *key)
{
    fake *f = fake_new(tern_server_endpoint(fx->server), NULL);
    fake_hello_msg(f, name, key);
    fake_expect(f, TERN_MSG_WELCOME, 5000);
    assert_int_equal(f->msg.welcome.capabilities, 0);
    assert_int_equal(f->msg.welcome.heartbeat_ms, 200);
    assert_int_equal(f->msg.welcome.chunk_size, CHUNK);
    f->heartbeat = true;
    return f;
}

/* Receive the payload info announces, granting window chunks at a time. With stall_check, the
 * first credit is not renewed for a while, and no chunk may arrive beyond it meanwhile. */
static void *fake_download(fake *f, const tern_payload_info *info, uint32_t window,
                           bool stall_check, size_t *len)
{
    tern_transfer *t = NULL;
    tern_error err = {{0}};
    OK(tern_transfer_create(info, NULL, NULL, &t, &err));
    tern_msg m;
    tern_chunk_ack_make(&m, t, window);
    uint32_t credit = m.chunk_ack.credit;
    fake_send(f, &m);
    uint32_t since_ack = 0;
    while (!tern_transfer_complete(t)) {
        fake_expect(f, TERN_MSG_MODEL_CHUNK, 5000);
        if (f->msg.chunk.index >= credit)
            fail_msg("chunk %u beyond the credit %u", f->msg.chunk.index, credit);
        if (tern_transfer_add(t, &f->msg.chunk, &err) != TERN_OK)
            fail_msg("chunk %u: %s", f->msg.chunk.index, err.message);
        since_ack++;
        if (stall_check && since_ack == credit && !tern_transfer_complete(t)) {
            /* Everything granted arrived: nothing more may come until the next ack. */
            assert_false(fake_poll(f, 300));
            stall_check = false;
        }
        if (tern_transfer_complete(t)) {
            tern_chunk_ack_done(&m, info);
        } else {
            tern_chunk_ack_make(&m, t, window);
            credit = m.chunk_ack.credit;
        }
        fake_send(f, &m);
    }
    void *data = NULL;
    OK(tern_transfer_take(t, &data, len));
    tern_transfer_destroy(&t);
    return data;
}

static void fake_fit_res(fake *f, uint32_t round, uint64_t base, const void *bytes, size_t len,
                         uint64_t examples, double loss, double acc, tern_payload_info *info)
{
    tern_msg m = {.type = TERN_MSG_FIT_RES, .round = round};
    m.fit_res.model_version = base;
    m.fit_res.num_examples = examples;
    tern_metrics_set(&m.fit_res.metrics, "loss", loss);
    tern_metrics_set(&m.fit_res.metrics, "accuracy", acc);
    tern_error err = {{0}};
    OK(tern_payload_describe(bytes, len, ++f->next_tid, CHUNK, TERN_PAYLOAD_SAFETENSORS, NULL,
                             &m.fit_res.payload, &err));
    *info = m.fit_res.payload;
    fake_send(f, &m);
}

/* Send the update under the server's credit until it acks the whole. */
static void fake_stream(fake *f, uint32_t round, const tern_payload_info *info, const void *bytes)
{
    tern_send_window w;
    tern_send_window_start(&w, info);
    while (!w.done) {
        fake_expect(f, TERN_MSG_CHUNK_ACK, 5000);
        assert_int_equal(tern_send_window_ack(&w, &f->msg.chunk_ack), TERN_OK);
        uint32_t idx;
        while (tern_send_window_ready(&w, &idx)) {
            tern_msg m = {0};
            OK(tern_payload_chunk(info, bytes, idx, &m));
            m.round = round;
            fake_send(f, &m);
            tern_send_window_sent(&w);
        }
    }
}

static float pattern(size_t i, int salt)
{
    return (float)((int)((i * 2654435761u + (unsigned)salt * 40503u) % 17u) - 8) / 8.0f;
}

/* The client's update: the downloaded global, params + scale * pattern, BN means = bn_mean.
 * params_out (may be NULL) receives the update's parameter vector. */
static void *make_update(fixture *fx, const void *global, size_t glen, float scale, int salt,
                         float bn_mean, float *params_out, size_t *len)
{
    tern_safetensors *st = NULL;
    tern_error err = {{0}};
    OK(tern_safetensors_parse(global, glen, NULL, &st, &err));
    OK(tern_model_load_state(fx->cm, st, "", &err));
    tern_safetensors_close(&st);
    float *p = tern_model_params(fx->cm);
    size_t n = tern_model_param_count(fx->cm);
    for (size_t i = 0; i < n; i++)
        p[i] += scale * pattern(i, salt);
    for (size_t i = 0; i < tern_model_tensor_count(fx->cm); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(fx->cm, i);
        if (t->kind == TERN_TENSOR_BUFFER && strstr(t->name, "running_mean"))
            for (size_t j = 0; j < t->count; j++)
                t->data[j] = bn_mean;
    }
    tern_model_invalidate(fx->cm);
    if (params_out)
        memcpy(params_out, p, n * sizeof(float));
    tern_safetensors_writer *w = NULL;
    OK(tern_safetensors_writer_create(NULL, &w));
    OK(tern_model_add_state(fx->cm, w, ""));
    void *bytes = NULL;
    OK(tern_safetensors_writer_serialize(w, &bytes, len));
    tern_safetensors_writer_destroy(&w);
    return bytes;
}

/* Load the store's current version into fx->cm. */
static void load_current(fixture *fx, tern_model_version *info)
{
    void *bytes = NULL;
    size_t len = 0;
    tern_error err = {{0}};
    if (tern_store_version_load(fx->store, NULL, &bytes, &len, info, &err) != TERN_OK)
        fail_msg("version_load: %s", err.message);
    tern_safetensors *st = NULL;
    OK(tern_safetensors_parse(bytes, len, NULL, &st, &err));
    OK(tern_model_load_state(fx->cm, st, "", &err));
    assert_string_equal(tern_safetensors_metadata(st, "arch"), "mobilenet_v3_small");
    tern_safetensors_close(&st);
    tern_store_free(fx->store, bytes);
}

/* ---- tests ------------------------------------------------------------------------------------- */

static tern_status server_eval(void *user, tern_model *model, double *loss, double *accuracy,
                               uint64_t *n, tern_error *err)
{
    (void)user;
    (void)model;
    (void)err;
    *loss = 1.25;
    *accuracy = 0.5;
    *n = 100;
    return TERN_OK;
}

/* Two clients, FedAvg: the committed model is the example-weighted mean. Flow control: the
 * first download stalls at its credit; with max_uploads 1 the second update waits. Then both
 * clients evaluate the new model (one by a cache hit). */
static void fedavg_round(void **state)
{
    fixture *fx = *state;
    tern_server_options o = base_options(fx);
    o.max_uploads = 1;
    o.strategy.fraction_evaluate = 1.0;
    o.strategy.min_evaluate_clients = 2;
    o.evaluate = server_eval;
    start_server(fx, &o);
    size_t n = tern_model_param_count(fx->model);

    fake *a = fake_connect(fx, "alice", "alice-key");
    fake *b = fake_connect(fx, "bob", "bob-key");
    fake_expect(a, TERN_MSG_FIT_INS, 5000);
    tern_msg ins_a = a->msg;
    fake_expect(b, TERN_MSG_FIT_INS, 5000);
    tern_msg ins_b = b->msg;
    assert_int_equal(ins_a.round, 1);
    assert_int_equal(ins_a.fit_ins.model_version, 0);
    assert_true(ins_a.fit_ins.payload.chunk_count > 3);
    double v;
    assert_int_equal(tern_config_get_number(&ins_a.fit_ins.config, "round", &v), TERN_OK);
    assert_true(v == 1.0);
    assert_int_equal(tern_config_get_number(&ins_a.fit_ins.config, "epochs", &v), TERN_OK);
    const tern_config_entry *sa = tern_config_find(&ins_a.fit_ins.config, "seed");
    const tern_config_entry *sb = tern_config_find(&ins_b.fit_ins.config, "seed");
    assert_non_null(sa);
    assert_non_null(sb);
    assert_true(sa->i != sb->i);
    assert_non_null(tern_config_find(&ins_a.fit_ins.config, "fedbn"));

    size_t ga_len, gb_len;
    void *ga = fake_download(a, &ins_a.fit_ins.payload, 2, true, &ga_len);
    void *gb = fake_download(b, &ins_b.fit_ins.payload, 4, false, &gb_len);
    assert_int_equal(ga_len, gb_len);
    assert_memory_equal(ga, gb, ga_len);

    float *ua = malloc(n * sizeof(float)), *ub = malloc(n * sizeof(float));
    assert_non_null(ua);
    assert_non_null(ub);
    size_t la, lb;
    void *upd_a = make_update(fx, ga, ga_len, 0.01f, 1, 0.5f, ua, &la);
    void *upd_b = make_update(fx, gb, gb_len, -0.02f, 2, 1.5f, ub, &lb);
    tern_payload_info ia, ib;
    fake_fit_res(a, 1, 0, upd_a, la, 30, 0.9, 0.6, &ia);
    fake_fit_res(b, 1, 0, upd_b, lb, 10, 1.1, 0.4, &ib);
    /* One upload slot: alice has it, bob hears nothing until alice is done. */
    fake_expect(a, TERN_MSG_CHUNK_ACK, 5000);
    assert_false(fake_poll(b, 300));
    tern_send_window w;
    tern_send_window_start(&w, &ia);
    assert_int_equal(tern_send_window_ack(&w, &a->msg.chunk_ack), TERN_OK);
    uint32_t idx;
    while (!w.done) {
        while (tern_send_window_ready(&w, &idx)) {
            tern_msg m = {0};
            OK(tern_payload_chunk(&ia, upd_a, idx, &m));
            m.round = 1;
            fake_send(a, &m);
            tern_send_window_sent(&w);
        }
        fake_expect(a, TERN_MSG_CHUNK_ACK, 5000);
        assert_int_equal(tern_send_window_ack(&w, &a->msg.chunk_ack), TERN_OK);
    }
    fake_stream(b, 1, &ib, upd_b);

    /* Evaluation of the new model: alice downloads it, bob claims a cache hit. */
    fake_expect(a, TERN_MSG_EVALUATE_INS, 5000);
    tern_msg ev_a = a->msg;
    assert_int_equal(ev_a.evaluate_ins.model_version, 1);
    fake_expect(b, TERN_MSG_EVALUATE_INS, 5000);
    tern_msg ev_b = b->msg;
    size_t na_len;
    void *new_a = fake_download(a, &ev_a.evaluate_ins.payload, 4, false, &na_len);
    tern_msg m;
    tern_chunk_ack_done(&m, &ev_b.evaluate_ins.payload);
    fake_send(b, &m);
    tern_msg er = {.type = TERN_MSG_EVALUATE_RES, .round = 1};
    er.evaluate_res.model_version = 1;
    er.evaluate_res.num_examples = 20;
    er.evaluate_res.loss = 2.0;
    tern_metrics_set(&er.evaluate_res.metrics, "accuracy", 0.25);
    fake_send(a, &er);
    er.evaluate_res.num_examples = 60;
    er.evaluate_res.loss = 1.0;
    er.evaluate_res.metrics.count = 0;
    tern_metrics_set(&er.evaluate_res.metrics, "accuracy", 0.75);
    fake_send(b, &er);

    fake_expect(a, TERN_MSG_GOODBYE, 5000);
    assert_int_equal(a->msg.goodbye.reason, TERN_GOODBYE_SHUTDOWN);
    fake_expect(b, TERN_MSG_GOODBYE, 5000);
    assert_int_equal(join_server(fx), TERN_OK);
    assert_int_equal(tern_server_rounds_completed(fx->server), 1);

    /* The committed model: example-weighted mean of parameters and of BatchNorm means. */
    tern_model_version ver;
    load_current(fx, &ver);
    assert_string_equal(ver.version, "1.0.1");
    float *want = malloc(n * sizeof(float));
    assert_non_null(want);
    for (size_t i = 0; i < n; i++)
        want[i] = (float)((30.0 * ua[i] + 10.0 * ub[i]) / 40.0);
    assert_true(test_close("fedavg params", tern_model_params(fx->cm), want, n, 1e-6f, 1e-3f));
    assert_true(test_close("server model", tern_model_params(fx->model), tern_model_params(fx->cm),
                           n, 0, 1e-3f));
    const tern_model_tensor *rm = tern_model_find_tensor(fx->cm, "features.0.1.running_mean");
    assert_non_null(rm);
    assert_true(fabsf(rm->data[0] - 0.75f) < 1e-6f);
    /* The evaluation download was the committed model. */
    void *cur = NULL;
    size_t cur_len = 0;
    OK(tern_store_version_load(fx->store, NULL, &cur, &cur_len, NULL, NULL));
    assert_int_equal(cur_len, na_len);
    assert_memory_equal(cur, new_a, na_len);
    tern_store_free(fx->store, cur);

    /* Report, round record and client statistics. */
    assert_int_equal(fx->num_reports, 1);
    const tern_round_report *r = &fx->reports[0];
    assert_true(r->completed);
    assert_int_equal(r->selected, 2);
    assert_int_equal(r->succeeded, 2);
    assert_int_equal(r->num_examples, 40);
    assert_true(fabs(r->train_loss - (30 * 0.9 + 10 * 1.1) / 40) < 1e-12);
    assert_true(fabs(r->client_eval_accuracy - (20 * 0.25 + 60 * 0.75) / 80) < 1e-12);
    assert_int_equal(r->client_eval_count, 2);
    assert_true(r->eval_accuracy == 0.5);
    assert_string_equal(r->model_version, "1.0.1");
    tern_round rr;
    OK(tern_store_round_get(fx->store, r->store_round, &rr, NULL));
    assert_int_equal(rr.status, TERN_ROUND_COMPLETED);
    char *json = NULL;
    OK(tern_store_round_report(fx->store, r->store_round, &json, NULL));
    assert_non_null(strstr(json, "\"succeeded\":2"));
    tern_store_free(fx->store, json);
    tern_client_record cr;
    OK(tern_store_client_get_by_name(fx->store, "alice", &cr, NULL));
    assert_int_equal(cr.rounds_selected, 1);
    assert_int_equal(cr.rounds_succeeded, 1);
    assert_true(cr.last_update_norm > 0);

    tern_server_stats stats;
    tern_server_stats_get(fx->server, &stats);
    assert_true(stats.peak_transfer_bytes >= la);
    if (stats.peak_transfer_bytes >= la + lb) /* one upload held at a time */
        fail_msg("peak transfer bytes %zu for updates of %zu and %zu bytes",
                 stats.peak_transfer_bytes, la, lb);
    assert_int_equal(stats.sessions, 0);

    free(want);
    free(ua);
    free(ub);
    free(ga);
    free(gb);
    free(upd_a);
    free(upd_b);
    tern_proto_free(NULL, new_a);
    fake_destroy(&a);
    fake_destroy(&b);
}

static void hello_refused(fixture *fx, const char *name, const char *key)
{
    fake *f = fake_new(tern_server_endpoint(fx->server), NULL);
    fake_hello_msg(f, name, key);
    fake_expect_error(f, TERN_PROTO_E_AUTH);
    fake_expect(f, TERN_MSG_GOODBYE, 3000);
    assert_int_equal(f->msg.goodbye.reason, TERN_GOODBYE_REJECTED);
    fake_destroy(&f);
}

/* Options under which no round ever starts. */
static tern_server_options idle_options(fixture *f)
{
    tern_server_options o = base_options(f);
    o.strategy.min_fit_clients = 5;
    o.strategy.min_available_clients = 5;
    return o;
}

static void auth(void **state)
{
    fixture *fx = *state;
    register_client(fx->store, "mallory", "mallory-key");
    tern_client_record rec;
    OK(tern_store_client_get_by_name(fx->store, "mallory", &rec, NULL));
    OK(tern_store_client_set_blacklisted(fx->store, rec.id, true, "test", "test", NULL));
    tern_server_options o = idle_options(fx);
    start_server(fx, &o);

    hello_refused(fx, "nobody", "x");
    hello_refused(fx, "alice", "wrong-key");
    hello_refused(fx, "mallory", "mallory-key");

    /* A good HELLO; a second one in the same session is unexpected. Reconnecting replaces the
     * session (the cache makes it cheap). */
    fake *a = fake_connect(fx, "alice", "alice-key");
    fake_hello_msg(a, "alice", "alice-key");
    fake_expect_error(a, TERN_PROTO_E_UNEXPECTED);
    fake *a2 = fake_connect(fx, "alice", "alice-key");
    fake_expect(a, TERN_MSG_GOODBYE, 3000);
    a->heartbeat = false;

    /* Anything but HELLO without a session: no_session, then HELLO works on that connection. */
    fake *c = fake_new(tern_server_endpoint(fx->server), NULL);
    tern_msg m = {.type = TERN_MSG_HEARTBEAT};
    fake_send(c, &m);
    fake_expect_error(c, TERN_PROTO_E_NO_SESSION);
    fake_hello_msg(c, "bob", "bob-key");
    fake_expect(c, TERN_MSG_WELCOME, 5000);

    stop_server(fx);
    fake_destroy(&a);
    fake_destroy(&a2);
    fake_destroy(&c);
}

static void auth_stats(void **state)
{
    fixture *fx = *state;
    tern_server_options o = idle_options(fx);
    start_server(fx, &o);
    hello_refused(fx, "nobody", "x");
    hello_refused(fx, "bob", "alice-key");
    tern_server_request_stop(fx->server);
    join_server(fx);
    tern_server_stats st;
    tern_server_stats_get(fx->server, &st);
    assert_int_equal(st.hellos_refused, 2);
    assert_int_equal(st.messages.by_code[TERN_PROTO_E_AUTH], 2);
}

static void garbage(void **state)
{
    fixture *fx = *state;
    tern_server_options o = idle_options(fx);
    o.limits.max_message_size = 65536;
    start_server(fx, &o);
    fake *a = fake_connect(fx, "alice", "alice-key");

    const char junk[] = "this is not a tern message at all, not even close";
    fake_send_raw(a, junk, sizeof junk);
    fake_expect_error(a, TERN_PROTO_E_MALFORMED);

    uint8_t *big = calloc(1, 100000);
    assert_non_null(big);
    tern_msg hb = {.type = TERN_MSG_HEARTBEAT};
    size_t len;
    hb.seq = tern_seq_next(&a->seq);
    OK(tern_msg_encode_into(&hb, NULL, big, 100000, &len, NULL));
    fake_send_raw(a, big, 100000); /* a heartbeat header with 100 KB of trailing garbage */
    fake_expect_error(a, TERN_PROTO_E_TOO_LARGE);
    free(big);

    /* Two frames after the routing id. */
    hb.seq = tern_seq_next(&a->seq);
    uint8_t buf[256];
    OK(tern_msg_encode_into(&hb, NULL, buf, sizeof buf, &len, NULL));
    zframe_t *f1 = zframe_new(buf, len), *f2 = zframe_new(buf, len);
    assert_int_equal(zframe_send(&f1, a->sock, ZFRAME_MORE), 0);
    assert_int_equal(zframe_send(&f2, a->sock, 0), 0);
    fake_expect_error(a, TERN_PROTO_E_MALFORMED);

    /* A replayed sequence number (HELLO had 1). */
    hb.seq = 1;
    OK(tern_msg_encode_into(&hb, NULL, buf, sizeof buf, &len, NULL));
    fake_send_raw(a, buf, len);
    fake_expect_error(a, TERN_PROTO_E_OUT_OF_ORDER);

    /* A server-only type from a client. */
    tern_msg w = {.type = TERN_MSG_WELCOME};
    w.welcome.max_message_size = 65536;
    w.welcome.chunk_size = 1000;
    fake_send(a, &w);
    fake_expect_error(a, TERN_PROTO_E_UNEXPECTED);

    /* A result nobody asked for. */
    tern_msg fr = {.type = TERN_MSG_FIT_RES, .round = 3};
    fake_send(a, &fr);
    fake_expect_error(a, TERN_PROTO_E_UNEXPECTED);

    /* A different major version: ERROR version, then GOODBYE. */
    hb.seq = tern_seq_next(&a->seq);
    OK(tern_msg_encode_into(&hb, NULL, buf, sizeof buf, &len, NULL));
    buf[4] = 2;
    fake_send_raw(a, buf, len);
    fake_expect_error(a, TERN_PROTO_E_VERSION);
    fake_expect(a, TERN_MSG_GOODBYE, 3000);
    a->heartbeat = false;

    /* The server still works. */
    fake *b = fake_connect(fx, "bob", "bob-key");
    fake_send_raw(b, "", 0);
    fake_expect_error(b, TERN_PROTO_E_MALFORMED);
    tern_msg mr = {.type = TERN_MSG_MODEL_REQUEST};
    fake_send(b, &mr);
    fake_expect(b, TERN_MSG_MODEL_INFO, 3000);
    tern_msg info = b->msg;
    size_t glen;
    void *g = fake_download(b, &info.model_info.payload, 4, false, &glen);
    assert_int_equal(glen, info.model_info.payload.total_size);
    free(g);

    tern_server_request_stop(fx->server);
    join_server(fx);
    tern_server_stats st;
    tern_server_stats_get(fx->server, &st);
    assert_true(st.messages.by_code[TERN_PROTO_E_MALFORMED] >= 3);
    assert_int_equal(st.messages.by_code[TERN_PROTO_E_TOO_LARGE], 1);
    assert_int_equal(st.messages.by_code[TERN_PROTO_E_VERSION], 1);
    assert_int_equal(st.messages.by_code[TERN_PROTO_E_OUT_OF_ORDER], 1);
    fake_destroy(&a);
    fake_destroy(&b);
}

/* Both clients download; bob then vanishes. Strict: the round fails; alice's result comes too
 * late and is answered `stale`. */
static void strict_vanish(void **state)
{
    fixture *fx = *state;
    tern_server_options o = base_options(fx);
    o.policy = TERN_POLICY_STRICT;
    start_server(fx, &o);
    fake *a = fake_connect(fx, "alice", "alice-key");
    fake *b = fake_connect(fx, "bob", "bob-key");
    fake_expect(a, TERN_MSG_FIT_INS, 5000);
    tern_msg ins = a->msg;
    fake_expect(b, TERN_MSG_FIT_INS, 5000);
    size_t glen;
    void *g = fake_download(a, &ins.fit_ins.payload, 8, false, &glen);
    fake_destroy(&b); /* silent from now on */

    for (int i = 0; i < 100; i++) {
        pthread_mutex_lock(&fx->lock);
        int n = fx->num_reports;
        pthread_mutex_unlock(&fx->lock);
        if (n > 0)
            break;
        fake_poll(a, 50);
    }
    assert_int_equal(fx->num_reports, 1);
    assert_false(fx->reports[0].completed);
    assert_non_null(strstr(fx->reports[0].reason, "strict"));
    tern_round rr;
    OK(tern_store_round_get(fx->store, fx->reports[0].store_round, &rr, NULL));
    assert_int_equal(rr.status, TERN_ROUND_FAILED);
    assert_non_null(strstr(rr.reason, "strict"));

    size_t ulen;
    void *u = make_update(fx, g, glen, 0.01f, 1, 0.5f, NULL, &ulen);
    tern_payload_info info;
    fake_fit_res(a, 1, 0, u, ulen, 10, 1.0, 0.5, &info);
    fake_expect_error(a, TERN_PROTO_E_STALE);

    tern_server_request_stop(fx->server);
    join_server(fx);
    tern_server_stats st;
    tern_server_stats_get(fx->server, &st);
    assert_int_equal(st.late_results, 1);
    assert_int_equal(tern_server_rounds_completed(fx->server), 0);
    tern_model_version cur;
    OK(tern_store_version_current(fx->store, &cur, NULL));
    assert_string_equal(cur.version, "1.0.0"); /* the initial model is still current */
    tern_client_record cr;
    OK(tern_store_client_get_by_name(fx->store, "bob", &cr, NULL));
    assert_int_equal(cr.rounds_failed, 1);
    free(g);
    free(u);
    fake_destroy(&a);
}

/* Tolerant (min_completion 0.5): bob vanishes, alice's update alone makes the round. */
static void tolerant_vanish(void **state)
{
    fixture *fx = *state;
    tern_server_options o = base_options(fx);
    start_server(fx, &o);
    size_t n = tern_model_param_count(fx->model);
    fake *a = fake_connect(fx, "alice", "alice-key");
    fake *b = fake_connect(fx, "bob", "bob-key");
    fake_expect(a, TERN_MSG_FIT_INS, 5000);
    tern_msg ins = a->msg;
    fake_expect(b, TERN_MSG_FIT_INS, 5000);
    fake_destroy(&b);
    size_t glen, ulen;
    void *g = fake_download(a, &ins.fit_ins.payload, 4, false, &glen);
    float *ua = malloc(n * sizeof(float));
    assert_non_null(ua);
    void *u = make_update(fx, g, glen, 0.05f, 3, 0.25f, ua, &ulen);
    tern_payload_info info;
    fake_fit_res(a, 1, 0, u, ulen, 10, 1.0, 0.5, &info);
    fake_stream(a, 1, &info, u);
    fake_expect(a, TERN_MSG_GOODBYE, 5000);
    assert_int_equal(a->msg.goodbye.reason, TERN_GOODBYE_SHUTDOWN);
    assert_int_equal(join_server(fx), TERN_OK);
    assert_int_equal(fx->num_reports, 1);
    assert_true(fx->reports[0].completed);
    assert_int_equal(fx->reports[0].succeeded, 1);
    assert_int_equal(fx->reports[0].failed, 1);
    tern_model_version ver;
    load_current(fx, &ver);
    assert_true(test_close("tolerant", tern_model_params(fx->cm), ua, n, 0, 1e-3f));
    free(g);
    free(u);
    free(ua);
    fake_destroy(&a);
}

/* One FedAdam round from both clients (alice adds +scale, bob -scale/2 of pattern). Returns the
 * two update vectors through ua/ub and the downloaded global through g. */
static void adam_round(fixture *fx, fake *a, fake *b, uint32_t round, float *ua, float *ub,
                       float *global)
{
    fake_expect(a, TERN_MSG_FIT_INS, 5000);
    tern_msg ia = a->msg;
    fake_expect(b, TERN_MSG_FIT_INS, 5000);
    tern_msg ib = b->msg;
    assert_int_equal(ia.round, round);
    size_t la, lb, lua, lub;
    void *ga = fake_download(a, &ia.fit_ins.payload, 4, false, &la);
    void *gb = fake_download(b, &ib.fit_ins.payload, 4, false, &lb);
    tern_safetensors *st = NULL;
    OK(tern_safetensors_parse(ga, la, NULL, &st, NULL));
    OK(tern_model_load_state(fx->cm, st, "", NULL));
    tern_safetensors_close(&st);
    memcpy(global, tern_model_params(fx->cm), tern_model_param_count(fx->cm) * sizeof(float));
    void *u1 = make_update(fx, ga, la, 0.02f, (int)round, 0.5f, ua, &lua);
    void *u2 = make_update(fx, gb, lb, -0.01f, (int)round + 7, 0.5f, ub, &lub);
    tern_payload_info p1, p2;
    fake_fit_res(a, round, ia.fit_ins.model_version, u1, lua, 20, 1.0, 0.5, &p1);
    fake_fit_res(b, round, ib.fit_ins.model_version, u2, lub, 20, 1.0, 0.5, &p2);
    fake_stream(a, round, &p1, u1);
    fake_stream(b, round, &p2, u2);
    free(ga);
    free(gb);
    free(u1);
    free(u2);
}

static void resume(void **state)
{
    fixture *fx = *state;
    size_t n = tern_model_param_count(fx->model);
    tern_server_options o = base_options(fx);
    o.strategy = tern_strategy_options_default(TERN_STRATEGY_FEDADAM);
    o.strategy.min_fit_clients = o.strategy.min_available_clients = 2;
    o.strategy.fraction_evaluate = 0;
    o.strategy.seed = 42;
    o.strategy.eta = 0.01f;
    o.rounds = 2;

    /* The reference: the same rounds through a strategy of our own. */
    tern_strategy_options ro = o.strategy;
    ro.num_params = n;
    tern_strategy *ref = NULL;
    OK(tern_strategy_create(&ro, tern_model_params(fx->model), &ref, NULL));
    const uint64_t ids[2] = {1, 2};
    uint64_t sel[2];
    size_t k;

    float *ua = malloc(n * sizeof(float)), *ub = malloc(n * sizeof(float));
    float *g = malloc(n * sizeof(float));
    assert_true(ua && ub && g);

    start_server(fx, &o);
    fake *a = fake_connect(fx, "alice", "alice-key");
    fake *b = fake_connect(fx, "bob", "bob-key");
    adam_round(fx, a, b, 1, ua, ub, g);
    OK(tern_strategy_configure_fit(ref, 1, ids, 2, sel, &k));
    tern_fit_result r1 = {.client_id = 1, .update = ua, .num_params = n, .num_examples = 20};
    tern_fit_result r2 = {.client_id = 2, .update = ub, .num_params = n, .num_examples = 20};
    OK(tern_strategy_add_fit_result(ref, &r1));
    OK(tern_strategy_add_fit_result(ref, &r2));
    OK(tern_strategy_aggregate_fit(ref, NULL));

    /* Round 2 starts; the server stops while the clients hold their FIT_INS. */
    fake_expect(a, TERN_MSG_FIT_INS, 5000);
    fake_expect(b, TERN_MSG_FIT_INS, 5000);
    int64_t dangling = fx->reports[0].store_round + 1;
    stop_server(fx);
    tern_round rr;
    OK(tern_store_round_get(fx->store, dangling, &rr, NULL));
    assert_int_equal(rr.status, TERN_ROUND_RUNNING);
    fake_destroy(&a);
    fake_destroy(&b);

    /* A new server on the same store (the model's weights are overwritten from the store). */
    tern_model_destroy(&fx->model);
    fx->model = new_model();
    start_server(fx, &o);
    OK(tern_store_round_get(fx->store, dangling, &rr, NULL));
    assert_int_equal(rr.status, TERN_ROUND_FAILED);
    assert_string_equal(rr.reason, "server restarted");
    a = fake_connect(fx, "alice", "alice-key");
    b = fake_connect(fx, "bob", "bob-key");
    adam_round(fx, a, b, 2, ua, ub, g);
    assert_true(test_close("round 2 base", g, tern_strategy_global(ref), n, 0, 1e-3f));
    fake_expect(a, TERN_MSG_GOODBYE, 5000);
    assert_int_equal(join_server(fx), TERN_OK);
    assert_int_equal(tern_server_rounds_completed(fx->server), 2);

    OK(tern_strategy_configure_fit(ref, 2, ids, 2, sel, &k));
    OK(tern_strategy_add_fit_result(ref, &r1));
    OK(tern_strategy_add_fit_result(ref, &r2));
    OK(tern_strategy_aggregate_fit(ref, NULL));
    tern_model_version ver;
    load_current(fx, &ver);
    /* m_t and v_t carried over: the resumed round matches an uninterrupted run. */
    assert_true(test_close("resumed fedadam", tern_model_params(fx->cm), tern_strategy_global(ref),
                           n, 1e-6f, 1e-3f));
    tern_strategy_destroy(&ref);
    free(ua);
    free(ub);
    free(g);
    fake_destroy(&a);
    fake_destroy(&b);
}

static void curve(void **state)
{
    fixture *fx = *state;
    char keydir[128], key_file[160], pub_file[160];
    snprintf(keydir, sizeof keydir, "%s/keys", fx->dir);
    assert_int_equal(mkdir(keydir, 0700), 0);
    char pub[TERN_CURVE_KEY_SIZE], pub2[TERN_CURVE_KEY_SIZE], sec[TERN_CURVE_KEY_SIZE];
    OK(tern_server_keygen(keydir, pub, NULL));
    assert_int_equal(tern_server_keygen(keydir, NULL, NULL), TERN_ERR_EXISTS);
    snprintf(key_file, sizeof key_file, "%s/server.key", keydir);
    snprintf(pub_file, sizeof pub_file, "%s/server.pub", keydir);
    struct stat sb;
    assert_int_equal(stat(key_file, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0600);
    OK(tern_curve_key_read(key_file, pub2, sec, NULL));
    assert_string_equal(pub, pub2);
    OK(tern_curve_key_read(pub_file, pub2, NULL, NULL));
    assert_string_equal(pub, pub2);
    assert_int_equal(tern_curve_key_read(pub_file, pub2, sec, NULL), TERN_ERR_NOT_FOUND);

    tern_server_options o = idle_options(fx);
    o.insecure = false;
    o.key_file = key_file;
    start_server(fx, &o);
    fake *a = fake_new(tern_server_endpoint(fx->server), pub);
    fake_hello_msg(a, "alice", "alice-key");
    fake_expect(a, TERN_MSG_WELCOME, 5000);
    a->heartbeat = true;
    fake *p = fake_new(tern_server_endpoint(fx->server), NULL);
    fake_hello_msg(p, "bob", "bob-key");
    assert_false(fake_poll(p, 500));
    fake_destroy(&a);
    fake_destroy(&p);
}

/* An update that does not fit the model is rejected; with blacklist_after 1 the client is
 * blacklisted and dropped. Alice's update alone completes the round (tolerant). */
static void rejected_blacklisted(void **state)
{
    fixture *fx = *state;
    tern_server_options o = base_options(fx);
    o.blacklist_after = 1;
    start_server(fx, &o);
    fake *a = fake_connect(fx, "alice", "alice-key");
    fake *b = fake_connect(fx, "bob", "bob-key");
    fake_expect(a, TERN_MSG_FIT_INS, 5000);
    tern_msg ia = a->msg;
    fake_expect(b, TERN_MSG_FIT_INS, 5000);
    tern_msg ib = b->msg;
    tern_msg m;
    tern_chunk_ack_done(&m, &ib.fit_ins.payload); /* bob claims to hold the model */
    fake_send(b, &m);
    size_t glen, ulen, blen;
    void *g = fake_download(a, &ia.fit_ins.payload, 4, false, &glen);
    void *u = make_update(fx, g, glen, 0.01f, 5, 0.5f, NULL, &ulen);

    tern_safetensors_writer *w = NULL;
    OK(tern_safetensors_writer_create(NULL, &w));
    const float junk[4] = {1, 2, 3, 4};
    const int64_t shape[1] = {4};
    OK(tern_safetensors_writer_add(w, "not.a.mobilenet", TERN_DTYPE_F32, 1, shape, junk));
    void *bad = NULL;
    OK(tern_safetensors_writer_serialize(w, &bad, &blen));
    tern_safetensors_writer_destroy(&w);

    tern_payload_info pa, pb;
    fake_fit_res(b, 1, 0, bad, blen, 10, 1.0, 0.5, &pb);
    fake_stream(b, 1, &pb, bad);
    fake_fit_res(a, 1, 0, u, ulen, 10, 1.0, 0.5, &pa);
    fake_stream(a, 1, &pa, u);
    fake_expect(b, TERN_MSG_GOODBYE, 5000);
    assert_int_equal(b->msg.goodbye.reason, TERN_GOODBYE_REJECTED);
    b->heartbeat = false;
    fake_expect(a, TERN_MSG_GOODBYE, 5000);
    assert_int_equal(a->msg.goodbye.reason, TERN_GOODBYE_SHUTDOWN);
    assert_int_equal(join_server(fx), TERN_OK);
    assert_int_equal(fx->num_reports, 1);
    assert_true(fx->reports[0].completed);
    assert_int_equal(fx->reports[0].rejected, 1);
    tern_client_record cr;
    OK(tern_store_client_get_by_name(fx->store, "bob", &cr, NULL));
    assert_true(cr.blacklisted);
    assert_int_equal(cr.rounds_rejected, 1);
    assert_non_null(strstr(cr.blacklist_reason, "rejected"));
    free(g);
    free(u);
    free(bad);
    fake_destroy(&a);
    fake_destroy(&b);
}

/* Nobody comes: run gives up after wait_timeout_ms with TERN_ERR_STATE. */
static void wait_timeout(void **state)
{
    fixture *fx = *state;
    tern_server_options o = base_options(fx);
    o.wait_timeout_ms = 300;
    start_server(fx, &o);
    assert_int_equal(join_server(fx), TERN_ERR_STATE);
    assert_non_null(strstr(fx->run_err.message, "waited"));
}

/* Bob takes the model but never answers: at the round timeout he counts as failed, and the
 * tolerant policy completes the round with alice's update. */
static void round_timeout(void **state)
{
    fixture *fx = *state;
    tern_server_options o = base_options(fx);
    o.round_timeout_ms = 1500;
    start_server(fx, &o);
    fake *a = fake_connect(fx, "alice", "alice-key");
    fake *b = fake_connect(fx, "bob", "bob-key");
    fake_expect(a, TERN_MSG_FIT_INS, 5000);
    tern_msg ia = a->msg;
    fake_expect(b, TERN_MSG_FIT_INS, 5000);
    tern_msg ib = b->msg;
    size_t glen, ulen;
    void *gb = fake_download(b, &ib.fit_ins.payload, 4, false, &glen);
    void *g = fake_download(a, &ia.fit_ins.payload, 4, false, &glen);
    void *u = make_update(fx, g, glen, 0.01f, 9, 0.5f, NULL, &ulen);
    tern_payload_info pa;
    fake_fit_res(a, 1, 0, u, ulen, 10, 1.0, 0.5, &pa);
    fake_stream(a, 1, &pa, u);
    fake_expect(a, TERN_MSG_GOODBYE, 5000); /* after the timeout, bob still heartbeating */
    fake_expect(b, TERN_MSG_GOODBYE, 3000);
    assert_int_equal(join_server(fx), TERN_OK);
    assert_true(fx->reports[0].completed);
    assert_int_equal(fx->reports[0].succeeded, 1);
    assert_int_equal(fx->reports[0].failed, 1);
    assert_true(fx->reports[0].fit_seconds >= 1.4);
    free(g);
    free(gb);
    free(u);
    fake_destroy(&a);
    fake_destroy(&b);
}

/* ---- schedules, convergence, flow-control limits ------------------------------------------- */

/* One fit round with a single fake client: FIT_INS (returned), download, update, stream. */
static tern_msg fake_fit_round(fixture *fx, fake *a, uint32_t round)
{
    fake_expect(a, TERN_MSG_FIT_INS, 5000);
    tern_msg ins = a->msg;
    assert_int_equal(ins.round, round);
    size_t glen, ulen;
    void *g = fake_download(a, &ins.fit_ins.payload, 8, false, &glen);
    void *u = make_update(fx, g, glen, 0.01f, (int)round, 0.5f, NULL, &ulen);
    tern_payload_info info;
    fake_fit_res(a, round, ins.fit_ins.model_version, u, ulen, 10, 1.0, 0.5, &info);
    fake_stream(a, round, &info, u);
    tern_proto_free(NULL, g);
    free(u);
    return ins;
}

static tern_server_options one_client_options(fixture *fx)
{
    tern_server_options o = base_options(fx);
    o.strategy.min_fit_clients = 1;
    o.strategy.min_available_clients = 1;
    return o;
}

/* Cosine schedule: round t of R gets lr_min + (lr0 - lr_min) (1 + cos(pi (t - 1) / R)) / 2;
 * the other entries of fit_config are untouched. Bad settings are refused at create. */
static void lr_cosine(void **state)
{
    fixture *fx = *state;
    tern_server_options o = one_client_options(fx);
    o.rounds = 4;
    o.lr_schedule = TERN_LR_COSINE;
    o.lr_min = 0.01;
    assert_int_equal(tern_config_set_float(&o.fit_config, "lr", 0.1), TERN_OK);
    assert_int_equal(tern_config_set_float(&o.fit_config, "momentum", 0.8), TERN_OK);

    /* Refused: no lr, an lr that is not a number, lr_min above lr or negative. */
    tern_server *bad = NULL;
    tern_error err = {{0}};
    tern_server_options b = o;
    b.fit_config.count = 0;
    assert_int_equal(tern_server_create(&b, fx->store, fx->model, &bad, &err), TERN_ERR_INVALID);
    assert_non_null(strstr(err.message, "lr"));
    b = o;
    assert_int_equal(tern_config_set_string(&b.fit_config, "lr", "fast"), TERN_OK);
    assert_int_equal(tern_server_create(&b, fx->store, fx->model, &bad, &err), TERN_ERR_INVALID);
    b = o;
    b.lr_min = 0.2;
    assert_int_equal(tern_server_create(&b, fx->store, fx->model, &bad, &err), TERN_ERR_INVALID);
    assert_non_null(strstr(err.message, "lr_min"));
    b.lr_min = -0.01;
    assert_int_equal(tern_server_create(&b, fx->store, fx->model, &bad, &err), TERN_ERR_INVALID);
    assert_null(bad);

    start_server(fx, &o);
    fake *a = fake_connect(fx, "alice", "alice-key");
    const double want[4] = {0.1, 0.01 + 0.09 * 0.5 * (1 + cos(PI / 4)), 0.055,
                            0.01 + 0.09 * 0.5 * (1 + cos(3 * PI / 4))};
    for (uint32_t t = 1; t <= 4; t++) {
        tern_msg ins = fake_fit_round(fx, a, t);
        const tern_config_entry *lr = tern_config_find(&ins.fit_ins.config, "lr");
        assert_non_null(lr);
        assert_int_equal(lr->type, TERN_CONFIG_FLOAT);
        if (fabs(lr->f - want[t - 1]) > 1e-12)
            fail_msg("round %u: lr %.17g, want %.17g", t, lr->f, want[t - 1]);
        double v;
        assert_int_equal(tern_config_get_number(&ins.fit_ins.config, "momentum", &v), TERN_OK);
        assert_true(v == 0.8);
    }
    fake_expect(a, TERN_MSG_GOODBYE, 5000);
    assert_int_equal(join_server(fx), TERN_OK);
    assert_int_equal(tern_server_rounds_completed(fx->server), 4);
    fake_destroy(&a);
}

/* Warm-up: rounds t <= W get lr0 t / (W + 1), then the cosine runs over the R - W rounds left.
 * A warm-up as long as the run is refused. */
static void lr_warmup(void **state)
{
    fixture *fx = *state;
    tern_server_options o = one_client_options(fx);
    o.rounds = 5;
    o.lr_schedule = TERN_LR_COSINE;
    o.lr_warmup_rounds = 2;
    assert_int_equal(tern_config_set_float(&o.fit_config, "lr", 0.3), TERN_OK);

    tern_server *bad = NULL;
    tern_error err = {{0}};
    tern_server_options b = o;
    b.lr_warmup_rounds = 5;
    assert_int_equal(tern_server_create(&b, fx->store, fx->model, &bad, &err), TERN_ERR_INVALID);
    assert_non_null(strstr(err.message, "lr_warmup_rounds"));
    assert_null(bad);

    start_server(fx, &o);
    fake *a = fake_connect(fx, "alice", "alice-key");
    const double want[5] = {0.1, 0.2, 0.3, 0.3 * 0.5 * (1 + cos(PI / 3)),
                            0.3 * 0.5 * (1 + cos(2 * PI / 3))};
    for (uint32_t t = 1; t <= 5; t++) {
        tern_msg ins = fake_fit_round(fx, a, t);
        double v;
        assert_int_equal(tern_config_get_number(&ins.fit_ins.config, "lr", &v), TERN_OK);
        if (fabs(v - want[t - 1]) > 1e-12)
            fail_msg("round %u: lr %.17g, want %.17g", t, v, want[t - 1]);
    }
    fake_expect(a, TERN_MSG_GOODBYE, 5000);
    assert_int_equal(join_server(fx), TERN_OK);
    fake_destroy(&a);
}

/* The default schedule sends fit_config's lr unchanged. */
static void lr_constant(void **state)
{
    fixture *fx = *state;
    tern_server_options o = one_client_options(fx);
    o.rounds = 2;
    assert_int_equal(tern_config_set_float(&o.fit_config, "lr", 0.1), TERN_OK);
    start_server(fx, &o);
    fake *a = fake_connect(fx, "alice", "alice-key");
    for (uint32_t t = 1; t <= 2; t++) {
        tern_msg ins = fake_fit_round(fx, a, t);
        double v;
        assert_int_equal(tern_config_get_number(&ins.fit_ins.config, "lr", &v), TERN_OK);
        assert_true(v == 0.1);
    }
    assert_int_equal(join_server(fx), TERN_OK);
    fake_destroy(&a);
}

static const double g_accuracies[] = {0.5, 0.6, 0.55, 0.6, 0.9, 0.95};

static tern_status scripted_eval(void *user, tern_model *model, double *loss, double *accuracy,
                                 uint64_t *n, tern_error *err)
{
    int *calls = user;
    (void)model;
    (void)err;
    *accuracy = g_accuracies[*calls % 6];
    *loss = 1.0 - *accuracy;
    *n = 100;
    (*calls)++;
    return TERN_OK;
}

/* Patience 2: accuracies 0.5, 0.6 (best), 0.55, 0.6 (equal is no improvement): the run stops
 * after round 4 of 10, and the clients hear GOODBYE shutdown. */
static void patience(void **state)
{
    fixture *fx = *state;
    int calls = 0;
    tern_server_options o = one_client_options(fx);
    o.rounds = 10;
    o.patience = 2;
    o.evaluate = scripted_eval;
    o.evaluate_user = &calls;
    start_server(fx, &o);
    fake *a = fake_connect(fx, "alice", "alice-key");
    for (uint32_t t = 1; t <= 4; t++)
        fake_fit_round(fx, a, t);
    fake_expect(a, TERN_MSG_GOODBYE, 5000);
    assert_int_equal(a->msg.goodbye.reason, TERN_GOODBYE_SHUTDOWN);
    assert_int_equal(join_server(fx), TERN_OK);
    assert_int_equal(tern_server_rounds_completed(fx->server), 4);
    assert_int_equal(calls, 4);
    assert_int_equal(fx->num_reports, 4);
    for (int i = 0; i < 4; i++)
        assert_true(fx->reports[i].eval_accuracy == g_accuracies[i]);
    /* The best accuracy and the count since are committed with the state: a restarted server
     * is converged at once. */
    fake_destroy(&a);
    tern_server_destroy(&fx->server);
    o.wait_timeout_ms = 3000; /* not converged: it would wait for clients, and fail */
    start_server(fx, &o);
    assert_int_equal(join_server(fx), TERN_OK);
    assert_int_equal(tern_server_rounds_completed(fx->server), 4);
    assert_int_equal(calls, 4);
}

/* The first running_mean value of model m. */
static float first_running_mean(const tern_model *m)
{
    for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(m, i);
        if (t->kind == TERN_TENSOR_BUFFER && strstr(t->name, "running_mean"))
            return t->data[0];
    }
    fail_msg("no running_mean");
    return 0;
}

typedef struct calib_calls {
    int calibrated, evaluated;
    float seen[4]; /* first running_mean at each evaluation */
} calib_calls;

/* Sets every running_mean to 0.125 on the first call; fails (changing nothing) after. */
static tern_status calib_cb(void *user, tern_model *model, tern_error *err)
{
    calib_calls *c = user;
    if (c->calibrated++ > 0) {
        snprintf(err->message, sizeof err->message, "no calibration images today");
        return TERN_ERR_STATE;
    }
    for (size_t i = 0; i < tern_model_tensor_count(model); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(model, i);
        if (t->kind == TERN_TENSOR_BUFFER && strstr(t->name, "running_mean"))
            for (size_t j = 0; j < t->count; j++)
                t->data[j] = 0.125f;
    }
    tern_model_invalidate(model);
    return TERN_OK;
}

static tern_status calib_eval(void *user, tern_model *model, double *loss, double *accuracy,
                              uint64_t *n, tern_error *err)
{
    calib_calls *c = user;
    (void)err;
    c->seen[c->evaluated++ % 4] = first_running_mean(model);
    *loss = 1.0;
    *accuracy = 0.5;
    *n = 100;
    return TERN_OK;
}

/* The calibrate callback runs on each aggregated model before evaluation and commit: what it
 * leaves is evaluated and committed (round 1); when it fails, the round still commits, with
 * the aggregated statistics (the client's 0.5, round 2). */
static void bn_calibration(void **state)
{
    fixture *fx = *state;
    calib_calls calls = {0};
    tern_server_options o = one_client_options(fx);
    o.rounds = 2;
    o.calibrate = calib_cb;
    o.calibrate_user = &calls;
    o.evaluate = calib_eval;
    o.evaluate_user = &calls;
    start_server(fx, &o);
    fake *a = fake_connect(fx, "alice", "alice-key");
    for (uint32_t t = 1; t <= 2; t++)
        fake_fit_round(fx, a, t);
    assert_int_equal(join_server(fx), TERN_OK);
    assert_int_equal(tern_server_rounds_completed(fx->server), 2);
    assert_int_equal(calls.calibrated, 2);
    assert_int_equal(calls.evaluated, 2);
    assert_true(calls.seen[0] == 0.125f);
    assert_true(calls.seen[1] == 0.5f);
    tern_model_version info;
    void *bytes = NULL;
    size_t len = 0;
    tern_error err = {{0}};
    tern_safetensors *st = NULL;
    OK(tern_store_version_load(fx->store, "1.0.1", &bytes, &len, &info, &err));
    OK(tern_safetensors_parse(bytes, len, NULL, &st, &err));
    OK(tern_model_load_state(fx->cm, st, "", &err));
    tern_safetensors_close(&st);
    tern_store_free(fx->store, bytes);
    assert_true(first_running_mean(fx->cm) == 0.125f);
    load_current(fx, &info);
    assert_true(first_running_mean(fx->cm) == 0.5f);
    fake_destroy(&a);
}

/* A download under way, driven by hand. */
typedef struct dl {
    tern_transfer *t;
    tern_payload_info info;
    uint32_t credit, got;
} dl;

static void dl_start(fake *f, dl *d, const tern_payload_info *info, uint32_t window)
{
    memset(d, 0, sizeof *d);
    d->info = *info;
    OK(tern_transfer_create(info, NULL, NULL, &d->t, NULL));
    tern_msg m;
    tern_chunk_ack_make(&m, d->t, window);
    d->credit = m.chunk_ack.credit;
    fake_send(f, &m);
}

/* Take the chunk in f->msg; ack it (renewing the credit) unless hold. */
static void dl_chunk(fake *f, dl *d, uint32_t window, bool hold)
{
    assert_int_equal(f->msg.type, TERN_MSG_MODEL_CHUNK);
    if (f->msg.chunk.index >= d->credit)
        fail_msg("chunk %u beyond the credit %u", f->msg.chunk.index, d->credit);
    tern_error err = {{0}};
    if (tern_transfer_add(d->t, &f->msg.chunk, &err) != TERN_OK)
        fail_msg("chunk %u: %s", f->msg.chunk.index, err.message);
    d->got++;
    if (hold)
        return;
    tern_msg m;
    if (tern_transfer_complete(d->t)) {
        tern_chunk_ack_done(&m, &d->info);
    } else {
        tern_chunk_ack_make(&m, d->t, window);
        d->credit = m.chunk_ack.credit;
    }
    fake_send(f, &m);
}

/* Acknowledge what a held download has, then take it to the end. */
static void dl_finish(fake *f, dl *d, uint32_t window)
{
    tern_msg m;
    tern_chunk_ack_make(&m, d->t, window);
    d->credit = m.chunk_ack.credit;
    fake_send(f, &m);
    while (!tern_transfer_complete(d->t)) {
        fake_expect(f, TERN_MSG_MODEL_CHUNK, 5000);
        dl_chunk(f, d, window, false);
    }
}

/* max_downloads 2, three clients: two downloads stream (each stalls at its credit, held), the
 * third gets nothing until one of them ends; then it streams too, and every client ends with
 * the same model. */
static void download_slots(void **state)
{
    fixture *fx = *state;
    register_client(fx->store, "carol", "carol-key");
    tern_server_options o = base_options(fx);
    o.strategy.min_fit_clients = o.strategy.min_available_clients = 3;
    o.max_downloads = 2;
    start_server(fx, &o);
    fake *f[3] = {fake_connect(fx, "alice", "alice-key"), fake_connect(fx, "bob", "bob-key"),
                  fake_connect(fx, "carol", "carol-key")};
    tern_msg ins[3];
    dl d[3];
    for (int i = 0; i < 3; i++) {
        fake_expect(f[i], TERN_MSG_FIT_INS, 5000);
        ins[i] = f[i]->msg;
        assert_true(ins[i].fit_ins.payload.chunk_count > 4);
    }
    for (int i = 0; i < 3; i++)
        dl_start(f[i], &d[i], &ins[i].fit_ins.payload, 2);
    /* Everything the server will send without more credit. */
    for (int turn = 0; turn < 10; turn++)
        for (int i = 0; i < 3; i++)
            while (fake_poll(f[i], 30))
                dl_chunk(f[i], &d[i], 2, true);
    int streaming = 0, waiting = -1;
    for (int i = 0; i < 3; i++) {
        if (d[i].got > 0) {
            assert_int_equal(d[i].got, 2); /* exactly the credit */
            streaming++;
        } else {
            waiting = i;
        }
    }
    assert_int_equal(streaming, 2);
    assert_true(waiting >= 0);

    /* One of the two finishes: the waiting one starts (while the other is still held). */
    int first = waiting == 0 ? 1 : 0, second = 3 - waiting - first;
    dl_finish(f[first], &d[first], 2);
    fake_expect(f[waiting], TERN_MSG_MODEL_CHUNK, 5000);
    dl_chunk(f[waiting], &d[waiting], 2, true);
    assert_false(fake_poll(f[second], 200)); /* still held at its credit */
    dl_finish(f[waiting], &d[waiting], 2);
    dl_finish(f[second], &d[second], 2);
    const void *m0, *m;
    size_t l0, l;
    OK(tern_transfer_data(d[0].t, &m0, &l0));
    for (int i = 1; i < 3; i++) {
        OK(tern_transfer_data(d[i].t, &m, &l));
        assert_int_equal(l, l0);
        assert_memory_equal(m, m0, l0);
    }
    /* Finish the round. */
    for (int i = 0; i < 3; i++) {
        size_t ulen;
        void *u = make_update(fx, m0, l0, 0.01f, i, 0.5f, NULL, &ulen);
        tern_payload_info info;
        fake_fit_res(f[i], 1, 0, u, ulen, 10, 1.0, 0.5, &info);
        fake_stream(f[i], 1, &info, u);
        free(u);
    }
    for (int i = 0; i < 3; i++)
        fake_expect(f[i], TERN_MSG_GOODBYE, 5000);
    assert_int_equal(join_server(fx), TERN_OK);
    assert_int_equal(fx->reports[0].succeeded, 3);
    for (int i = 0; i < 3; i++) {
        tern_transfer_destroy(&d[i].t);
        fake_destroy(&f[i]);
    }
}

/* max_sessions 2: a third HELLO gets ERROR busy (and no session); once a session ends, it is
 * welcome. */
static void session_limit(void **state)
{
    fixture *fx = *state;
    register_client(fx->store, "carol", "carol-key");
    tern_server_options o = idle_options(fx);
    o.max_sessions = 2;
    start_server(fx, &o);
    fake *a = fake_connect(fx, "alice", "alice-key");
    fake *b = fake_connect(fx, "bob", "bob-key");
    fake *c = fake_new(tern_server_endpoint(fx->server), NULL);
    fake_hello_msg(c, "carol", "carol-key");
    fake_expect_error(c, TERN_PROTO_E_BUSY);
    assert_non_null(strstr(c->msg.error.message, "full"));
    tern_msg hb = {.type = TERN_MSG_HEARTBEAT};
    fake_send(c, &hb);
    fake_expect_error(c, TERN_PROTO_E_NO_SESSION);
    /* A reconnect of a client that has a session replaces it (no extra slot needed). */
    fake *a2 = fake_connect(fx, "alice", "alice-key");
    fake_expect(a, TERN_MSG_GOODBYE, 3000);
    a->heartbeat = false;
    /* Bob leaves: carol gets his slot. */
    tern_msg bye = {.type = TERN_MSG_GOODBYE};
    bye.goodbye.reason = TERN_GOODBYE_NORMAL;
    fake_send(b, &bye);
    b->heartbeat = false;
    /* Bob's GOODBYE and carol's HELLO travel on different connections: carol may have to try
     * again, as tern_client does after ERROR busy. */
    for (int tries = 0;; tries++) {
        fake_hello_msg(c, "carol", "carol-key");
        assert_true(fake_poll(c, 5000));
        if (c->msg.type == TERN_MSG_WELCOME)
            break;
        assert_int_equal(c->msg.type, TERN_MSG_ERROR);
        assert_int_equal(c->msg.error.code, TERN_PROTO_E_BUSY);
        assert_true(tries < 20);
        zclock_sleep(100);
    }
    c->heartbeat = true;
    tern_server_request_stop(fx->server);
    join_server(fx);
    tern_server_stats st;
    tern_server_stats_get(fx->server, &st);
    assert_true(st.messages.by_code[TERN_PROTO_E_BUSY] >= 1);
    assert_int_equal(st.hellos_refused, 0);
    fake_destroy(&a);
    fake_destroy(&a2);
    fake_destroy(&b);
    fake_destroy(&c);
}

/* The registry's bytes of a version. */
static void *stored_version(fixture *fx, const char *version, size_t *len)
{
    void *bytes = NULL;
    tern_error err = {{0}};
    if (tern_store_version_load(fx->store, version, &bytes, len, NULL, &err) != TERN_OK)
        fail_msg("version_load %s: %s", version, err.message);
    return bytes;
}

static tern_msg model_request(fake *f, uint64_t version)
{
    tern_msg m = {.type = TERN_MSG_MODEL_REQUEST};
    m.model_request.model_version = version;
    fake_send(f, &m);
    fake_expect(f, TERN_MSG_MODEL_INFO, 5000);
    assert_int_equal(f->msg.model_info.model_version, version ? version : 3);
    return f->msg;
}

/* MODEL_REQUEST for older versions: wire version t is the model training round t committed,
 * loaded from the registry; one that was never committed, or whose blob was pruned, gets ERROR
 * unexpected. An older version the server lets go of while a client still downloads it stays
 * valid until that download ends. */
static void model_request_versions(void **state)
{
    fixture *fx = *state;
    tern_server_options o = one_client_options(fx);
    o.rounds = 3;
    start_server(fx, &o);
    fake *a = fake_connect(fx, "alice", "alice-key");
    for (uint32_t t = 1; t <= 3; t++)
        fake_fit_round(fx, a, t);
    fake_expect(a, TERN_MSG_GOODBYE, 5000);
    assert_int_equal(join_server(fx), TERN_OK);
    tern_server_destroy(&fx->server);
    fake_destroy(&a);

    o = idle_options(fx);
    o.rounds = 10;
    start_server(fx, &o);
    a = fake_connect(fx, "alice", "alice-key");
    fake *b = fake_connect(fx, "bob", "bob-key");
    tern_msg m = {.type = TERN_MSG_MODEL_REQUEST};
    m.model_request.model_version = 4;
    fake_send(a, &m);
    fake_expect_error(a, TERN_PROTO_E_UNEXPECTED);
    assert_non_null(strstr(a->msg.error.message, "current one is 3"));

    /* Alice starts on version 1 and holds; bob's version 2 replaces it as the kept older one. */
    tern_msg info1 = model_request(a, 1);
    dl d;
    dl_start(a, &d, &info1.model_info.payload, 2);
    for (int i = 0; i < 2; i++) {
        fake_expect(a, TERN_MSG_MODEL_CHUNK, 5000);
        dl_chunk(a, &d, 2, true);
    }
    tern_msg info2 = model_request(b, 2);
    size_t l2, s2, l1, s1, l3, s3;
    void *g2 = fake_download(b, &info2.model_info.payload, 4, false, &l2);
    void *want2 = stored_version(fx, "1.0.2", &s2);
    assert_int_equal(l2, s2);
    assert_memory_equal(g2, want2, s2);
    dl_finish(a, &d, 2);
    const void *g1;
    OK(tern_transfer_data(d.t, &g1, &l1));
    void *want1 = stored_version(fx, "1.0.1", &s1);
    assert_int_equal(l1, s1);
    assert_memory_equal(g1, want1, s1);
    assert_true(l1 != l2 || memcmp(g1, g2, l1) != 0);
    tern_transfer_destroy(&d.t);

    /* 0 is the current model. */
    tern_msg info3 = model_request(b, 0);
    void *g3 = fake_download(b, &info3.model_info.payload, 4, false, &l3);
    void *want3 = stored_version(fx, "1.0.3", &s3);
    assert_int_equal(l3, s3);
    assert_memory_equal(g3, want3, s3);

    /* Version 1 pruned (and no longer the kept one): refused. */
    size_t pruned = 0;
    OK(tern_store_version_prune(fx->store, 1, "test", &pruned, NULL));
    assert_true(pruned >= 2);
    m.model_request.model_version = 1;
    fake_send(a, &m);
    fake_expect_error(a, TERN_PROTO_E_UNEXPECTED);
    assert_non_null(strstr(a->msg.error.message, "cannot be served"));
    m.model_request.model_version = 2; /* still kept in memory */
    fake_send(a, &m);
    fake_expect(a, TERN_MSG_MODEL_INFO, 5000);
    assert_int_equal(a->msg.model_info.model_version, 2);

    tern_server_request_stop(fx->server);
    join_server(fx);
    tern_proto_free(NULL, g2);
    tern_proto_free(NULL, g3);
    tern_store_free(fx->store, want1);
    tern_store_free(fx->store, want2);
    tern_store_free(fx->store, want3);
    fake_destroy(&a);
    fake_destroy(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(fedavg_round, setup, teardown),
        cmocka_unit_test_setup_teardown(auth, setup, teardown),
        cmocka_unit_test_setup_teardown(auth_stats, setup, teardown),
        cmocka_unit_test_setup_teardown(garbage, setup, teardown),
        cmocka_unit_test_setup_teardown(strict_vanish, setup, teardown),
        cmocka_unit_test_setup_teardown(tolerant_vanish, setup, teardown),
        cmocka_unit_test_setup_teardown(rejected_blacklisted, setup, teardown),
        cmocka_unit_test_setup_teardown(wait_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(round_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(resume, setup, teardown),
        cmocka_unit_test_setup_teardown(curve, setup, teardown),
        cmocka_unit_test_setup_teardown(lr_cosine, setup, teardown),
        cmocka_unit_test_setup_teardown(lr_warmup, setup, teardown),
        cmocka_unit_test_setup_teardown(lr_constant, setup, teardown),
        cmocka_unit_test_setup_teardown(patience, setup, teardown),
        cmocka_unit_test_setup_teardown(bn_calibration, setup, teardown),
        cmocka_unit_test_setup_teardown(download_slots, setup, teardown),
        cmocka_unit_test_setup_teardown(session_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(model_request_versions, setup, teardown),
    };
    if (getenv("TERN_TEST_FILTER"))
        cmocka_set_test_filter(getenv("TERN_TEST_FILTER"));
    return cmocka_run_group_tests(tests, NULL, NULL);
}
