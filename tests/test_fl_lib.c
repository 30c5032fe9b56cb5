/* End to end in one process, with the real libraries: a tern_server on 127.0.0.1 with CURVE, in
 * a thread, and three tern_clients, each in its own thread, whose callbacks train and evaluate
 * with tern_local on disjoint Fashion-MNIST shares. A tiny MobileNetV3-Small (width 0.25, one
 * channel, 10 classes, 32x32, BatchNorm momentum 0.1) keeps a round at a few seconds.
 *
 * Covered: three rounds of FedAvg with client evaluation and a server-side evaluation on test
 * images (rounds committed with versions, client metrics in the store, accuracy well above
 * chance and rising, clients ending with TERN_OK after GOODBYE shutdown, statistics); a client
 * whose fit fails once, under the strict policy (the round fails and is repeated) and the
 * tolerant one (the round completes without it); FedBN (clients keep their BatchNorm tensors);
 * differential privacy on a GroupNorm model: client DP-SGD with the privacy ledger (a client
 * already over budget in the store is never selected, the others stop when their next round
 * would pass the budget, the reported epsilon is the accountant's over the ledger), central DP
 * (Poisson-sampled clients, the central account in the ledger, epsilon per round), and the
 * central clipping and noise on hand-computed vectors.
 *
 * Needs Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist, or
 * $TERN_FASHION_MNIST). About 5 s in Release on 2 cores, 45 s under ASan+UBSan; with
 * TERN_FL_LIB_QUICK=1 the shares and step counts shrink and the accuracy checks are skipped. */
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
#include <time.h>
#include <unistd.h>

#include "fl/server_internal.h" /* srv_dp_clip_add, srv_dp_noised_mean */
#include "nn/util.h"               /* tern_set_error */
#include "tern.h"
#include "testutil.h"

#define FASHION_DIR "/usr/share/datasets/fashion-mnist"
#define NUM_CLIENTS 3
#define EVAL_FIRST 50000 /* clients' held-out shares come from here on in the training file */
#define CHUNK 65536      /* several chunks per model (about 300 KB) */
#define MAX_REPORTS 8

static tern_dataset *g_train, *g_test;
static bool g_quick; /* TERN_FL_LIB_QUICK: less work */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static tern_transform fashion_transform(bool augment)
{
    tern_transform t = {.size = 32, .channels = 1, .resize = 28};
    tern_transform_normalize_fashion_mnist(&t);
    if (augment) {
        t.pad = 2;
        t.hflip = true;
    }
    return t;
}

/* ---- a federated client: tern_local behind tern_client ----------------------------------- */

typedef struct fl_client {
    char name[32], key[32];
    tern_local *local;
    tern_client *client;
    pthread_t thread;
    bool running;
    tern_status status;
    tern_error err;

    /* Written by the callbacks (the client's worker thread), read after the run. */
    pthread_mutex_t lock;
    int fail_fits;             /* the next this many fits fail */
    int fits, fits_failed, evaluates;
    uint32_t fit_rounds[16];   /* task->round of each fit call */
    bool fedbn_seen;           /* a fit config had fedbn = true */
    int fedbn_evals;           /* evaluations where local BatchNorm made a difference */
} fl_client;

static tern_status fit_cb(void *user, const tern_fit_task *task, const volatile bool *cancel,
                          tern_fit_output *out, tern_error *err)
{
    fl_client *c = user;
    pthread_mutex_lock(&c->lock);
    if (c->fits < 16)
        c->fit_rounds[c->fits] = task->round;
    c->fits++;
    bool fail = c->fail_fits > 0;
    if (fail) {
        c->fail_fits--;
        c->fits_failed++;
    }
    const tern_config_entry *e = tern_config_find(task->config, "fedbn");
    if (e && e->type == TERN_CONFIG_BOOL && e->b)
        c->fedbn_seen = true;
    pthread_mutex_unlock(&c->lock);
    if (fail)
        return tern_set_error(err, TERN_ERR_IO, "%s: simulated failure in round %u", c->name,
                              task->round);
    tern_local_result r;
    tern_status s = tern_local_fit(c->local, task->model, task->model_size, task->config, cancel,
                                   &out->update, &out->update_size, &r, err);
    if (s != TERN_OK)
        return s;
    out->num_examples = r.num_examples;
    return tern_local_result_metrics(&r, &out->metrics);
}

static tern_status evaluate_cb(void *user, const tern_fit_task *task, const volatile bool *cancel,
                               tern_evaluate_output *out, tern_error *err)
{
    fl_client *c = user;
    tern_local_result r;
    tern_status s = tern_local_evaluate(c->local, task->model, task->model_size, task->config,
                                        cancel, &r, err);
    if (s != TERN_OK)
        return s;
    const tern_config_entry *e = tern_config_find(task->config, "fedbn");
    if (e && e->type == TERN_CONFIG_BOOL && e->b) {
        /* The same model with the global BatchNorm tensors: another loss, if the client kept
         * its own. */
        tern_msg_config plain = *task->config;
        tern_config_set_bool(&plain, "fedbn", false);
        tern_local_result g;
        s = tern_local_evaluate(c->local, task->model, task->model_size, &plain, cancel, &g, err);
        if (s != TERN_OK)
            return s;
        pthread_mutex_lock(&c->lock);
        c->fedbn_evals += g.loss != r.loss;
        pthread_mutex_unlock(&c->lock);
    }
    pthread_mutex_lock(&c->lock);
    c->evaluates++;
    pthread_mutex_unlock(&c->lock);
    out->num_examples = r.num_examples;
    out->loss = r.loss;
    tern_metrics_set(&out->metrics, "accuracy", r.accuracy);
    return TERN_OK;
}

static void *client_thread(void *arg)
{
    fl_client *c = arg;
    c->status = tern_client_run(c->client, &c->err);
    return NULL;
}

/* ---- the fixture: store, keys, model, server, clients ------------------------------------ */

typedef struct fixture {
    char dir[64];
    char pub[TERN_CURVE_KEY_SIZE];
    char key_file[128];
    tern_store *store;
    tern_model *model;
    tern_server *server;
    pthread_t thread;
    bool running;
    tern_status run_status;
    tern_error run_err;
    pthread_mutex_t lock;
    tern_round_report reports[MAX_REPORTS];
    int num_reports;
    fl_client clients[NUM_CLIENTS];

    /* Server-side evaluation on test images. */
    tern_loader *judge;
    float *logits;
    int judge_batch;
} fixture;

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    if (!f)
        return -1;
    snprintf(f->dir, sizeof f->dir, "/tmp/tern_test_fl_lib.XXXXXX");
    if (!mkdtemp(f->dir))
        return -1;
    char path[128];
    snprintf(path, sizeof path, "%s/store", f->dir);
    tern_store_options so = {.no_sync = true};
    tern_error err = {{0}};
    if (tern_store_open(path, &so, &f->store, &err) != TERN_OK ||
        tern_server_keygen(f->dir, f->pub, &err) != TERN_OK) {
        fprintf(stderr, "setup: %s\n", err.message);
        return -1;
    }
    snprintf(f->key_file, sizeof f->key_file, "%s/server.key", f->dir);
    tern_model_options mo = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    mo.width_mult = 0.25;
    mo.in_channels = 1;
    mo.num_classes = 10;
    mo.bn_momentum = 0.1f;
    mo.seed = 11;
    if (tern_model_create(&mo, &f->model, &err) != TERN_OK) {
        fprintf(stderr, "setup: %s\n", err.message);
        return -1;
    }
    pthread_mutex_init(&f->lock, NULL);
    for (int i = 0; i < NUM_CLIENTS; i++)
        pthread_mutex_init(&f->clients[i].lock, NULL);
    *state = f;
    return 0;
}

static void join_clients(fixture *f)
{
    for (int i = 0; i < NUM_CLIENTS; i++) {
        fl_client *c = &f->clients[i];
        if (c->running) {
            pthread_join(c->thread, NULL);
            c->running = false;
        }
    }
}

static int teardown(void **state)
{
    fixture *f = *state;
    if (f->running) {
        tern_server_request_stop(f->server);
        pthread_join(f->thread, NULL);
        f->running = false;
    }
    for (int i = 0; i < NUM_CLIENTS; i++)
        if (f->clients[i].running)
            tern_client_request_stop(f->clients[i].client);
    join_clients(f);
    for (int i = 0; i < NUM_CLIENTS; i++) {
        tern_client_destroy(&f->clients[i].client);
        tern_local_destroy(&f->clients[i].local);
        pthread_mutex_destroy(&f->clients[i].lock);
    }
    tern_server_destroy(&f->server);
    tern_loader_destroy(&f->judge);
    free(f->logits);
    tern_model_destroy(&f->model);
    tern_store_close(&f->store);
    test_rm_tree(f->dir);
    pthread_mutex_destroy(&f->lock);
    free(f);
    return 0;
}

static void test_log(void *user, tern_log_level level, const char *message)
{
    const char *who = user;
    if (getenv("TERN_TEST_VERBOSE") || level >= TERN_LOG_ERROR)
        print_message("%s: %s\n", who, message);
}

static void on_round(void *user, const tern_round_report *r)
{
    fixture *f = user;
    pthread_mutex_lock(&f->lock);
    if (f->num_reports < MAX_REPORTS)
        f->reports[f->num_reports++] = *r;
    pthread_mutex_unlock(&f->lock);
    if (getenv("TERN_TEST_VERBOSE"))
        print_message("round %llu (store %lld): %s %s; train loss %.3f acc %.3f, clients' eval "
                      "%.3f (%zu), server eval %.3f, %.2f s\n",
                      (unsigned long long)r->training_round, (long long)r->store_round,
                      r->completed ? "completed" : "failed", r->reason, r->train_loss,
                      r->train_accuracy, r->client_eval_accuracy, r->client_eval_count,
                      r->eval_accuracy, r->round_seconds);
}

/* The server-side evaluation: eval-mode accuracy of the new global model on test images. */
static tern_status server_eval(void *user, tern_model *model, double *loss, double *accuracy,
                               uint64_t *num_examples, tern_error *err)
{
    fixture *f = user;
    if (tern_model_plan(model, f->judge_batch, 32, 32, false) != TERN_OK)
        return tern_set_error(err, TERN_ERR_NOMEM, "plan: %s", tern_model_last_error(model));
    tern_loader_set_epoch(f->judge, 0);
    const int k = 10;
    double loss_sum = 0;
    uint64_t seen = 0, correct = 0;
    for (;;) {
        const float *x;
        const int32_t *y;
        int n;
        tern_status s = tern_loader_next(f->judge, &x, &y, &n, err);
        if (s == TERN_ERR_NOT_FOUND)
            break;
        if (s != TERN_OK)
            return s;
        float l;
        if (tern_model_forward(model, f->logits, x, n, false) != TERN_OK ||
            tern_cross_entropy_loss(&l, NULL, f->logits, y, n, k, 0.0f) != TERN_OK)
            return tern_set_error(err, TERN_ERR_INVALID, "forward: %s",
                                  tern_model_last_error(model));
        for (int i = 0; i < n; i++) {
            const float *row = f->logits + (size_t)i * k;
            int best = 0;
            for (int j = 1; j < k; j++)
                if (row[j] > row[best])
                    best = j;
            correct += best == y[i];
        }
        loss_sum += (double)l * n;
        seen += (uint64_t)n;
    }
    *loss = loss_sum / (double)seen;
    *accuracy = (double)correct / (double)seen;
    *num_examples = seen;
    return TERN_OK;
}

static void make_judge(fixture *f, size_t n)
{
    size_t *idx = malloc(n * sizeof *idx);
    assert_non_null(idx);
    for (size_t i = 0; i < n; i++)
        idx[i] = i;
    f->judge_batch = 100;
    tern_transform t = fashion_transform(false);
    tern_loader_options lo = {.batch = f->judge_batch, .indices = idx, .nindices = n};
    tern_error err = {{0}};
    if (tern_loader_create(g_test, &t, &lo, NULL, &f->judge, &err) != TERN_OK)
        fail_msg("judge loader: %s", err.message);
    free(idx);
    f->logits = malloc((size_t)f->judge_batch * 10 * sizeof(float));
    assert_non_null(f->logits);
}

typedef struct run_params {
    uint32_t rounds;
    size_t per_client;  /* training images per client */
    size_t eval_per_client;
    int epochs, max_steps, batch;
    double lr;
    bool fedbn;
    tern_failure_policy policy;
    size_t judge_images; /* 0: no server-side evaluation */
    int fail_client;     /* index of a client whose first fit fails; -1: none */
    tern_server_dp_options dp;
    size_t min_fit;      /* 0: NUM_CLIENTS */
    bool clients_made;   /* the test made the clients already */
} run_params;

static tern_server_options server_options(fixture *f, const run_params *p)
{
    tern_server_options o = tern_server_options_default();
    o.endpoint = "tcp://127.0.0.1:*";
    o.key_file = f->key_file;
    o.strategy.min_fit_clients = p->min_fit ? p->min_fit : NUM_CLIENTS;
    o.strategy.min_available_clients = NUM_CLIENTS;
    o.dp = p->dp;
    o.strategy.min_evaluate_clients = NUM_CLIENTS;
    o.strategy.fraction_fit = 1.0;
    o.strategy.fraction_evaluate = 1.0;
    o.strategy.seed = 2024;
    o.fedbn = p->fedbn;
    o.rounds = p->rounds;
    o.policy = p->policy;
    o.min_completion = 0.5;
    o.round_timeout_ms = 120000;
    o.wait_timeout_ms = 60000;
    o.heartbeat_ms = 250;
    o.heartbeat_patience = 40; /* sanitizers and a loaded machine: 10 s of silence */
    o.chunk_size = CHUNK;
    o.settings = "test_fl_lib";
    o.classes = "0,1,2,3,4,5,6,7,8,9";
    o.log = test_log;
    o.log_user = "server";
    o.on_round = on_round;
    o.on_round_user = f;
    tern_config_set_int(&o.fit_config, "epochs", p->epochs);
    tern_config_set_int(&o.fit_config, "batch_size", p->batch);
    if (p->max_steps > 0)
        tern_config_set_int(&o.fit_config, "max_steps", p->max_steps);
    tern_config_set_float(&o.fit_config, "lr", p->lr);
    tern_config_set_float(&o.fit_config, "momentum", 0.9);
    tern_config_set_int(&o.evaluate_config, "batch_size", 50);
    if (p->judge_images) {
        make_judge(f, p->judge_images);
        o.evaluate = server_eval;
        o.evaluate_user = f;
    }
    return o;
}

static void *server_thread(void *arg)
{
    fixture *f = arg;
    f->run_status = tern_server_run(f->server, &f->run_err);
    return NULL;
}

static void register_client(fixture *f, fl_client *c)
{
    tern_client_record in;
    memset(&in, 0, sizeof in);
    snprintf(in.name, sizeof in.name, "%s", c->name);
    snprintf(in.device_type, sizeof in.device_type, "test");
    tern_error err = {{0}};
    if (tern_store_hash_api_key(c->key, in.api_key_hash, &err) != TERN_OK ||
        tern_store_client_register(f->store, &in, NULL, &err) != TERN_OK)
        fail_msg("registering %s: %s", c->name, err.message);
}

/* Client i: training images [i * per_client, (i + 1) * per_client), held-out images from
 * EVAL_FIRST + i * eval_per_client: disjoint shares. */
static void make_client(fixture *f, int i, const run_params *p)
{
    fl_client *c = &f->clients[i];
    snprintf(c->name, sizeof c->name, "client-%d", i);
    snprintf(c->key, sizeof c->key, "key-of-client-%d", i);
    register_client(f, c);
    size_t *train = malloc(p->per_client * sizeof *train);
    size_t *eval = malloc(p->eval_per_client * sizeof *eval);
    assert_true(train && eval);
    for (size_t j = 0; j < p->per_client; j++)
        train[j] = (size_t)i * p->per_client + j;
    for (size_t j = 0; j < p->eval_per_client; j++)
        eval[j] = EVAL_FIRST + (size_t)i * p->eval_per_client + j;
    tern_local_data_options lo = {.dataset = g_train, .train_indices = train,
                                  .num_train = p->per_client, .eval_indices = eval,
                                  .num_eval = p->eval_per_client,
                                  .train_transform = fashion_transform(true),
                                  .eval_transform = fashion_transform(false), .threads = 1,
                                  .bn_momentum = 0.1f, .dp_secret = 0x5ec7e7u + (uint64_t)i};
    tern_error err = {{0}};
    tern_status s = tern_local_create(&lo, &c->local, &err);
    free(train);
    free(eval);
    if (s != TERN_OK)
        fail_msg("tern_local_create: %s", err.message);
    c->fail_fits = i == p->fail_client ? 1 : 0;
}

static void start_clients(fixture *f)
{
    for (int i = 0; i < NUM_CLIENTS; i++) {
        fl_client *c = &f->clients[i];
        tern_client_options co = tern_client_options_default();
        co.endpoint = tern_server_endpoint(f->server);
        co.name = c->name;
        co.api_key = c->key;
        co.server_public_key = f->pub;
        co.fit = fit_cb;
        co.evaluate = evaluate_cb;
        co.user = c;
        co.num_examples = 1;
        co.heartbeat_patience = 40;
        co.max_reconnects = 5;
        co.log = test_log;
        co.log_user = c->name;
        tern_error err = {{0}};
        if (tern_client_create(&co, &c->client, &err) != TERN_OK)
            fail_msg("tern_client_create: %s", err.message);
        assert_int_equal(pthread_create(&c->thread, NULL, client_thread, c), 0);
        c->running = true;
    }
}

/* Run a whole federation and wait for everyone to finish. */
static void run_federation(fixture *f, const run_params *p)
{
    for (int i = 0; !p->clients_made && i < NUM_CLIENTS; i++)
        make_client(f, i, p);
    tern_server_options o = server_options(f, p);
    tern_error err = {{0}};
    if (tern_server_create(&o, f->store, f->model, &f->server, &err) != TERN_OK)
        fail_msg("tern_server_create: %s", err.message);
    assert_int_equal(pthread_create(&f->thread, NULL, server_thread, f), 0);
    f->running = true;
    start_clients(f);
    pthread_join(f->thread, NULL);
    f->running = false;
    if (f->run_status != TERN_OK)
        fail_msg("tern_server_run: %s: %s", tern_strerror(f->run_status), f->run_err.message);
    join_clients(f);
    for (int i = 0; i < NUM_CLIENTS; i++)
        if (f->clients[i].status != TERN_OK)
            fail_msg("%s: tern_client_run: %s: %s", f->clients[i].name,
                     tern_strerror(f->clients[i].status), f->clients[i].err.message);
}

static run_params small_params(void)
{
    return (run_params){.rounds = 1, .per_client = 64, .eval_per_client = 32, .epochs = 1,
                        .max_steps = 2, .batch = 16, .lr = 0.05,
                        .policy = TERN_POLICY_TOLERANT, .fail_client = -1};
}

/* ---- tests -------------------------------------------------------------------------------- */

/* Three rounds of FedAvg on three clients. */
static void fedavg_end_to_end(void **state)
{
    fixture *f = *state;
    run_params p = {.rounds = 3, .per_client = 512, .eval_per_client = 100, .epochs = 3,
                    .batch = 32, .lr = 0.1, .policy = TERN_POLICY_TOLERANT,
                    .judge_images = 500, .fail_client = -1};
    if (g_quick) {
        p.per_client = 96;
        p.eval_per_client = 50;
        p.epochs = 1;
        p.judge_images = 200;
    }
    double t0 = now_s();
    run_federation(f, &p);
    double took = now_s() - t0;

    assert_int_equal(tern_server_rounds_completed(f->server), 3);
    assert_int_equal(f->num_reports, 3);
    char want[16];
    for (int t = 0; t < 3; t++) {
        const tern_round_report *r = &f->reports[t];
        assert_true(r->completed);
        assert_int_equal(r->training_round, (uint64_t)t + 1);
        assert_int_equal(r->selected, NUM_CLIENTS);
        assert_int_equal(r->succeeded, NUM_CLIENTS);
        assert_int_equal(r->failed, 0);
        assert_int_equal(r->num_examples, NUM_CLIENTS * p.per_client);
        assert_true(isfinite(r->train_loss) && isfinite(r->train_accuracy));
        assert_int_equal(r->client_eval_count, NUM_CLIENTS);
        assert_true(isfinite(r->client_eval_loss));
        assert_true(r->client_eval_accuracy >= 0 && r->client_eval_accuracy <= 1);
        assert_true(r->eval_accuracy >= 0 && r->eval_accuracy <= 1);
        assert_true(r->update_norm_mean > 0);
        assert_true(r->bytes_in > 0 && r->bytes_out > 0);
        snprintf(want, sizeof want, "1.0.%d", t + 1);
        assert_string_equal(r->model_version, want);

        /* The store: the round completed with its version, its report and client metrics. */
        tern_round rr;
        tern_error err = {{0}};
        assert_int_equal(tern_store_round_get(f->store, r->store_round, &rr, &err), TERN_OK);
        assert_int_equal(rr.status, TERN_ROUND_COMPLETED);
        assert_string_equal(rr.model_version, want);
        assert_int_equal(rr.clients_participated, NUM_CLIENTS);
        assert_true(fabs(rr.global_accuracy - r->eval_accuracy) < 1e-9);
        tern_model_version v;
        assert_int_equal(tern_store_version_get(f->store, want, &v, &err), TERN_OK);
        assert_int_equal(v.round, r->store_round);
        tern_client_metrics *cm = NULL;
        size_t ncm = 0;
        assert_int_equal(tern_store_round_client_metrics(f->store, r->store_round, &cm, &ncm,
                                                         &err),
                         TERN_OK);
        assert_int_equal(ncm, NUM_CLIENTS);
        for (size_t i = 0; i < ncm; i++) {
            assert_true(cm[i].participated);
            assert_int_equal(cm[i].num_samples, (int64_t)p.per_client);
            assert_true(cm[i].loss > 0 && cm[i].accuracy > 0 && cm[i].update_norm > 0);
        }
        tern_store_free(f->store, cm);
        char *json = NULL;
        assert_int_equal(tern_store_round_report(f->store, r->store_round, &json, &err), TERN_OK);
        assert_non_null(strstr(json, "\"client_eval_count\":3"));
        assert_null(strstr(json, "\"client_eval_accuracy\":null"));
        tern_store_free(f->store, json);
    }
    tern_model_version cur;
    assert_int_equal(tern_store_version_current(f->store, &cur, NULL), TERN_OK);
    assert_string_equal(cur.version, "1.0.3");
    for (int i = 0; i < NUM_CLIENTS; i++) {
        tern_client_record rec;
        assert_int_equal(tern_store_client_get_by_name(f->store, f->clients[i].name, &rec, NULL),
                         TERN_OK);
        assert_int_equal(rec.rounds_selected, 3);
        assert_int_equal(rec.rounds_succeeded, 3);
        assert_int_equal(rec.rounds_failed, 0);
    }

    double a1 = f->reports[0].eval_accuracy, a3 = f->reports[2].eval_accuracy;
    print_message("FedAvg, %d clients x %zu images, 3 rounds: server accuracy %.1f%% -> %.1f%% "
                  "-> %.1f%% on %zu test images; clients' accuracy %.1f%% after round 3 "
                  "(%.1f s)\n", NUM_CLIENTS, p.per_client, 100 * a1,
                  100 * f->reports[1].eval_accuracy, 100 * a3, p.judge_images,
                  100 * f->reports[2].client_eval_accuracy, took);
    if (!g_quick) {
        /* Seen: 9.6% -> 31.2% -> 51.2% (model seeds 5 and 21: 11.0% -> 51.6%, 15.2% -> 53.8%);
         * chance is 10%. */
        assert_true(a3 >= 0.35);
        assert_true(a3 >= a1 + 0.15);
        assert_true(f->reports[2].client_eval_accuracy >= 0.30);
    }

    /* Clients: every round fitted and evaluated, one download per model (the evaluation's
     * download is the next round's cache hit), sessions without refusals. */
    tern_server_stats ss;
    tern_server_stats_get(f->server, &ss);
    uint64_t cbytes_in = 0, cbytes_out = 0;
    for (int i = 0; i < NUM_CLIENTS; i++) {
        fl_client *c = &f->clients[i];
        tern_client_stats cs;
        tern_client_stats_get(c->client, &cs);
        assert_int_equal(c->fits, 3);
        assert_int_equal(c->evaluates, 3);
        assert_int_equal(cs.fits, 3);
        assert_int_equal(cs.evaluates, 3);
        assert_int_equal(cs.sessions, 1);
        assert_int_equal(cs.refused, 0);
        assert_int_equal(cs.downloads, 4);  /* the initial model and rounds 1..3 */
        assert_int_equal(cs.cache_hits, 2); /* rounds 2 and 3 train on the evaluated model */
        cbytes_in += cs.bytes_in;
        cbytes_out += cs.bytes_out;
    }
    assert_int_equal(ss.sessions, 0);
    assert_int_equal(ss.hellos_refused, 0);
    for (int code = 1; code < TERN_PROTO_CODE_COUNT; code++)
        if (ss.messages.by_code[code])
            fail_msg("the server refused %llu messages with code %s",
                     (unsigned long long)ss.messages.by_code[code],
                     tern_proto_code_name((tern_proto_code)code));
    assert_true(ss.messages.by_code[0] > 0);
    assert_int_equal(ss.late_results, 0);
    /* What the clients sent is what the server received, and the reverse, up to the few
     * small control messages (heartbeats, a GOODBYE) that can cross the end of the run on the
     * wire when the machine is loaded: a lost chunk (64 KiB) still fails. */
    assert_true(llabs((long long)ss.bytes_in - (long long)cbytes_out) <= 512);
    assert_true(llabs((long long)ss.bytes_out - (long long)cbytes_in) <= 512);
    /* Models went down: 4 per client at least, updates came up: 3 per client. */
    size_t model_size = f->reports[0].bytes_out / 2 / NUM_CLIENTS;
    assert_true(model_size > 100000);
    assert_true(ss.bytes_in > 3 * NUM_CLIENTS * 100000u);
    assert_true(ss.peak_transfer_bytes > 0);
}

/* Client 1's first fit fails. Strict: round 1 fails and runs again (the client succeeds the
 * second time). */
static void fit_failure_strict(void **state)
{
    fixture *f = *state;
    run_params p = small_params();
    p.fail_client = 1;
    p.policy = TERN_POLICY_STRICT;
    run_federation(f, &p);
    assert_int_equal(tern_server_rounds_completed(f->server), 1);
    assert_int_equal(f->num_reports, 2);
    const tern_round_report *r = &f->reports[0];
    assert_false(r->completed);
    assert_int_equal(r->training_round, 1);
    assert_non_null(strstr(r->reason, "strict"));
    assert_string_equal(r->model_version, "");
    tern_round rr;
    assert_int_equal(tern_store_round_get(f->store, r->store_round, &rr, NULL), TERN_OK);
    assert_int_equal(rr.status, TERN_ROUND_FAILED);
    assert_non_null(strstr(rr.reason, "strict"));
    r = &f->reports[1];
    assert_true(r->completed);
    assert_int_equal(r->training_round, 1); /* the same training round, repeated */
    assert_int_equal(r->succeeded, NUM_CLIENTS);
    assert_int_equal(r->store_round, f->reports[0].store_round + 1);
    assert_string_equal(r->model_version, "1.0.1");
    fl_client *bad = &f->clients[1];
    assert_int_equal(bad->fits, 2);
    assert_int_equal(bad->fits_failed, 1);
    assert_int_equal(bad->fit_rounds[0], 1);
    assert_int_equal(bad->fit_rounds[1], 1);
    tern_client_stats cs;
    tern_client_stats_get(bad->client, &cs);
    assert_int_equal(cs.fits, 1);
    assert_int_equal(cs.refused, 0);
    tern_client_record rec;
    assert_int_equal(tern_store_client_get_by_name(f->store, bad->name, &rec, NULL), TERN_OK);
    assert_int_equal(rec.rounds_selected, 2);
    assert_int_equal(rec.rounds_failed, 1);
    assert_int_equal(rec.rounds_succeeded, 1);
    /* The others' results for the failed attempt may come late (answered `stale`, dropped):
     * the repeated round must not take them for its own. */
    tern_server_stats ss;
    tern_server_stats_get(f->server, &ss);
    assert_true(ss.late_results <= NUM_CLIENTS - 1);
    assert_true(f->reports[1].round_seconds < 60);
}

/* The same under the tolerant policy: round 1 completes with the other two. */
static void fit_failure_tolerant(void **state)
{
    fixture *f = *state;
    run_params p = small_params();
    p.fail_client = 1;
    p.policy = TERN_POLICY_TOLERANT;
    run_federation(f, &p);
    assert_int_equal(tern_server_rounds_completed(f->server), 1);
    assert_int_equal(f->num_reports, 1);
    const tern_round_report *r = &f->reports[0];
    assert_true(r->completed);
    assert_int_equal(r->selected, NUM_CLIENTS);
    assert_int_equal(r->succeeded, NUM_CLIENTS - 1);
    assert_int_equal(r->failed, 1);
    assert_int_equal(r->num_examples, (NUM_CLIENTS - 1) * p.per_client);
    assert_int_equal(r->client_eval_count, NUM_CLIENTS); /* it still evaluates */
    assert_string_equal(r->model_version, "1.0.1");
    tern_client_metrics *cm = NULL;
    size_t n = 0;
    assert_int_equal(tern_store_round_client_metrics(f->store, r->store_round, &cm, &n, NULL),
                     TERN_OK);
    assert_int_equal(n, NUM_CLIENTS);
    int participated = 0;
    for (size_t i = 0; i < n; i++)
        participated += cm[i].participated;
    tern_store_free(f->store, cm);
    assert_int_equal(participated, NUM_CLIENTS - 1);
    fl_client *bad = &f->clients[1];
    assert_int_equal(bad->fits, 1);
    assert_int_equal(bad->fits_failed, 1);
    tern_client_record rec;
    assert_int_equal(tern_store_client_get_by_name(f->store, bad->name, &rec, NULL), TERN_OK);
    assert_int_equal(rec.rounds_failed, 1);
    assert_int_equal(rec.rounds_succeeded, 0);
}

/* FedBN: the clients keep their own BatchNorm tensors (their evaluation differs from one with
 * the global ones), and the run completes. */
static void fedbn_end_to_end(void **state)
{
    fixture *f = *state;
    run_params p = small_params();
    p.rounds = 2;
    p.fedbn = true;
    /* Enough steps to leave chance level: near it the logits are almost uniform and the
     * BatchNorm tensors hardly move the loss. */
    p.epochs = 4;
    p.max_steps = 16;
    p.lr = 0.1;
    p.judge_images = 100;
    run_federation(f, &p);
    assert_int_equal(tern_server_rounds_completed(f->server), 2);
    assert_int_equal(f->num_reports, 2);
    for (int t = 0; t < 2; t++) {
        assert_true(f->reports[t].completed);
        assert_int_equal(f->reports[t].succeeded, NUM_CLIENTS);
        assert_int_equal(f->reports[t].client_eval_count, NUM_CLIENTS);
    }
    for (int i = 0; i < NUM_CLIENTS; i++) {
        fl_client *c = &f->clients[i];
        assert_true(c->fedbn_seen);
        assert_int_equal(c->fits, 2);
        assert_int_equal(c->evaluates, 2);
        assert_int_equal(c->fedbn_evals, 2);
    }
    tern_model_version cur;
    assert_int_equal(tern_store_version_current(f->store, &cur, NULL), TERN_OK);
    assert_string_equal(cur.version, "1.0.2");
}

/* ---- differential privacy ------------------------------------------------------------------ */

/* The fixture with a GroupNorm model (DP-SGD refuses BatchNorm). */
static int setup_group(void **state)
{
    if (setup(state))
        return -1;
    fixture *f = *state;
    tern_model_options mo = *tern_model_options_of(f->model);
    mo.norm = TERN_NORM_GROUP;
    tern_model_destroy(&f->model);
    tern_error err = {{0}};
    if (tern_model_create(&mo, &f->model, &err) != TERN_OK) {
        fprintf(stderr, "setup_group: %s\n", err.message);
        return -1;
    }
    return 0;
}

static double rdp_epsilon(double sigma, double q, int64_t steps, double delta)
{
    tern_accountant *a = NULL;
    double eps = NAN;
    assert_int_equal(tern_accountant_create(NULL, &a, NULL), TERN_OK);
    assert_int_equal(tern_accountant_add(a, sigma, q, steps), TERN_OK);
    assert_int_equal(tern_accountant_epsilon(a, delta, &eps), TERN_OK);
    tern_accountant_destroy(&a);
    return eps;
}

static void expect_rel(double got, double want)
{
    if (!(fabs(got - want) <= 1e-9 * fabs(want)))
        fail_msg("expected %.12g, got %.12g", want, got);
}

/* Client DP: client 0 is over budget in the store's ledger before the server starts (as
 * after a restart), so it is never selected; clients 1 and 2 train with DP-SGD, and after two
 * rounds a third would pass the budget: the run ends there, short of its 5 rounds. */
static void dp_client_budget(void **state)
{
    fixture *f = *state;
    run_params p = small_params();
    p.rounds = 5;
    p.min_fit = 2;
    const double sigma = 1.0, q = 16.0 / 64.0, delta = 1e-5; /* batch 16 of 64 images */
    const int64_t steps = 2;                                  /* max_steps */
    double eps1 = rdp_epsilon(sigma, q, steps, delta), eps2 = rdp_epsilon(sigma, q, 2 * steps,
                                                                          delta),
           eps3 = rdp_epsilon(sigma, q, 3 * steps, delta);
    p.dp = (tern_server_dp_options){.mode = TERN_FL_DP_CLIENT, .noise_multiplier = sigma,
                                    .max_grad_norm = 1.0, .delta = delta,
                                    .epsilon_budget = (eps2 + eps3) / 2};
    for (int i = 0; i < NUM_CLIENTS; i++)
        make_client(f, i, &p);
    p.clients_made = true;
    char ids[NUM_CLIENTS][TERN_STORE_ID_SIZE];
    for (int i = 0; i < NUM_CLIENTS; i++) {
        tern_client_record rec;
        assert_int_equal(tern_store_client_get_by_name(f->store, f->clients[i].name, &rec, NULL),
                         TERN_OK);
        strcpy(ids[i], rec.id);
    }
    tern_privacy_charge spent = {.noise_multiplier = 0.5, .sample_rate = 1.0, .steps = 50};
    strcpy(spent.subject, ids[0]);
    assert_int_equal(tern_store_privacy_charge(f->store, 1, &spent, 1, NULL), TERN_OK);

    run_federation(f, &p);
    assert_int_equal(tern_server_rounds_completed(f->server), 2);
    assert_int_equal(f->num_reports, 2);
    for (int t = 0; t < 2; t++) {
        const tern_round_report *r = &f->reports[t];
        assert_true(r->completed);
        assert_int_equal(r->selected, 2);
        assert_int_equal(r->succeeded, 2);
        expect_rel(r->epsilon, t == 0 ? eps1 : eps2);
        char *json = NULL;
        assert_int_equal(tern_store_round_report(f->store, r->store_round, &json, NULL), TERN_OK);
        assert_non_null(strstr(json, "\"epsilon\":"));
        tern_store_free(f->store, json);
    }
    assert_true(f->reports[1].epsilon <= p.dp.epsilon_budget);
    assert_int_equal(f->clients[0].fits, 0);
    for (int i = 1; i < NUM_CLIENTS; i++) {
        assert_int_equal(f->clients[i].fits, 2);
        tern_privacy_charge *h = NULL;
        size_t n = 0;
        tern_privacy_account acc;
        assert_int_equal(tern_store_privacy_history(f->store, ids[i], &h, &n, &acc, NULL),
                         TERN_OK);
        assert_int_equal(n, 1);
        assert_true(h[0].noise_multiplier == sigma && h[0].sample_rate == q);
        assert_int_equal(h[0].steps, 2 * steps);
        assert_int_equal(acc.rounds, 2);
        tern_store_free(f->store, h);
    }
    tern_privacy_charge *h = NULL;
    size_t n = 0;
    assert_int_equal(tern_store_privacy_history(f->store, ids[0], &h, &n, NULL, NULL), TERN_OK);
    assert_int_equal(n, 1);
    assert_int_equal(h[0].steps, 50); /* untouched */
    tern_store_free(f->store, h);
}

/* Central DP: three rounds with clients Poisson-sampled at q = 1.5 / 3; the central account
 * in the ledger holds one step a round and the reported epsilon is its RDP epsilon. */
static void dp_central_rounds(void **state)
{
    fixture *f = *state;
    run_params p = small_params();
    p.rounds = 3;
    p.min_fit = 1;
    const double sigma = 1.2, delta = 1e-5;
    p.dp = (tern_server_dp_options){.mode = TERN_FL_DP_CENTRAL, .noise_multiplier = sigma,
                                    .clip_norm = 0.05, .delta = delta, .expected_clients = 1.5,
                                    .seed = 77};
    run_federation(f, &p);
    assert_int_equal(tern_server_rounds_completed(f->server), 3);
    assert_int_equal(f->num_reports, 3);
    for (int t = 0; t < 3; t++) {
        const tern_round_report *r = &f->reports[t];
        assert_true(r->completed);
        assert_true(r->selected <= NUM_CLIENTS);
        assert_int_equal(r->succeeded, r->selected);
        expect_rel(r->epsilon, rdp_epsilon(sigma, 0.5, t + 1, delta));
    }
    tern_privacy_charge *h = NULL;
    size_t n = 0;
    tern_privacy_account acc;
    assert_int_equal(tern_store_privacy_history(f->store, TERN_PRIVACY_CENTRAL, &h, &n, &acc,
                                                NULL),
                     TERN_OK);
    assert_int_equal(n, 1);
    assert_true(h[0].noise_multiplier == sigma && h[0].sample_rate == 0.5);
    assert_int_equal(h[0].steps, 3);
    assert_int_equal(acc.rounds, 3);
    tern_store_free(f->store, h);
    /* Nobody trained on a client-DP basis. */
    for (int i = 0; i < NUM_CLIENTS; i++) {
        tern_client_record rec;
        assert_int_equal(tern_store_client_get_by_name(f->store, f->clients[i].name, &rec, NULL),
                         TERN_OK);
        assert_int_equal(tern_store_privacy_history(f->store, rec.id, &h, &n, NULL, NULL),
                         TERN_OK);
        assert_int_equal(n, 0);
    }
}

/* Options the server refuses for DP. */
static void dp_options_refused(void **state)
{
    fixture *f = *state; /* a BatchNorm model */
    run_params p = small_params();
    tern_server_options o = server_options(f, &p);
    tern_error err = {{0}};
    o.dp = (tern_server_dp_options){.mode = TERN_FL_DP_CLIENT, .noise_multiplier = 1.0};
    assert_int_equal(tern_server_create(&o, f->store, f->model, &f->server, &err),
                     TERN_ERR_INVALID);
    assert_non_null(strstr(err.message, "GroupNorm"));
    o.dp = (tern_server_dp_options){.mode = TERN_FL_DP_CLIENT};
    assert_int_equal(tern_server_create(&o, f->store, f->model, &f->server, &err),
                     TERN_ERR_INVALID);
    assert_non_null(strstr(err.message, "one of"));
    o.dp = (tern_server_dp_options){.mode = TERN_FL_DP_CENTRAL, .noise_multiplier = 1.0};
    o.strategy.kind = TERN_STRATEGY_FEDADAM;
    assert_int_equal(tern_server_create(&o, f->store, f->model, &f->server, &err),
                     TERN_ERR_INVALID);
    assert_non_null(strstr(err.message, "fedavg"));
    o.strategy.kind = TERN_STRATEGY_FEDAVG;
    o.dp.delta = 2;
    assert_int_equal(tern_server_create(&o, f->store, f->model, &f->server, &err),
                     TERN_ERR_INVALID);
    assert_null(f->server);
}

/* Central DP's clipping and noise on vectors computed by hand. */
static void dp_central_clip_and_noise(void **state)
{
    (void)state;
    const float global[4] = {1.0f, -1.0f, 0.5f, 0.0f};
    /* Change (3, 4, 0, 0), norm 5: scaled to norm 1 by 0.2. Change (0, 0, 0.3, -0.4), norm
     * 0.5: kept. */
    const float u1[4] = {4.0f, 3.0f, 0.5f, 0.0f}, u2[4] = {1.0f, -1.0f, 0.8f, -0.4f};
    double sum[4] = {0};
    assert_true(fabs(srv_dp_clip_add(sum, u1, global, 4, 1.0) - 0.2) < 1e-12);
    assert_true(srv_dp_clip_add(sum, u2, global, 4, 1.0) == 1.0);
    const double want_sum[4] = {0.6, 0.8, 0.3, -0.4};
    for (int i = 0; i < 4; i++)
        assert_true(fabs(sum[i] - want_sum[i]) < 1e-6);
    /* No noise: global + sum / expected clients (2.5). */
    float next[4];
    tern_rng rng;
    tern_rng_seed(&rng, 3);
    assert_int_equal(srv_dp_noised_mean(next, global, sum, 4, 0.0, 2.5, &rng), TERN_OK);
    for (int i = 0; i < 4; i++)
        assert_true(fabs(next[i] - (global[i] + want_sum[i] / 2.5)) < 1e-6);
    assert_int_equal(srv_dp_noised_mean(next, global, sum, 4, 0.0, 0.0, &rng), TERN_ERR_INVALID);

    /* Noise: sigma S = 1.5 * 2 = 3 on a zero sum, divided by 4: N(0, 0.75^2) per coordinate.
     * The sample mean and standard deviation of 200000 draws lie within 5 standard errors. */
    const size_t n = 200000;
    float *z = malloc(n * sizeof *z), *out = malloc(n * sizeof *out);
    double *zs = calloc(n, sizeof *zs);
    assert_true(z && out && zs);
    for (size_t i = 0; i < n; i++)
        z[i] = 0.25f;
    assert_int_equal(srv_dp_noised_mean(out, z, zs, n, 1.5 * 2.0, 4.0, &rng), TERN_OK);
    double m = 0, v = 0;
    for (size_t i = 0; i < n; i++)
        m += out[i] - 0.25;
    m /= (double)n;
    for (size_t i = 0; i < n; i++)
        v += (out[i] - 0.25 - m) * (out[i] - 0.25 - m);
    double sd = sqrt(v / (double)(n - 1)), want = 0.75;
    assert_true(fabs(m) < 5 * want / sqrt((double)n));
    assert_true(fabs(sd - want) < 5 * want / sqrt(2.0 * (double)n));
    free(z);
    free(out);
    free(zs);
}

static int group_setup(void **state)
{
    (void)state;
    const char *dir = getenv("TERN_FASHION_MNIST");
    const char *quick = getenv("TERN_FL_LIB_QUICK");
    g_quick = quick && *quick && strcmp(quick, "0") != 0;
    tern_error err = {{0}};
    if (tern_dataset_open_fashion_mnist(dir && *dir ? dir : FASHION_DIR, true, NULL, &g_train,
                                        &err) != TERN_OK ||
        tern_dataset_open_fashion_mnist(dir && *dir ? dir : FASHION_DIR, false, NULL, &g_test,
                                        &err) != TERN_OK) {
        fprintf(stderr, "test_fl_lib: %s\n", err.message);
        return -1;
    }
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    tern_dataset_close(&g_train);
    tern_dataset_close(&g_test);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(fedavg_end_to_end, setup, teardown),
        cmocka_unit_test_setup_teardown(fit_failure_strict, setup, teardown),
        cmocka_unit_test_setup_teardown(fit_failure_tolerant, setup, teardown),
        cmocka_unit_test_setup_teardown(fedbn_end_to_end, setup, teardown),
        cmocka_unit_test_setup_teardown(dp_client_budget, setup_group, teardown),
        cmocka_unit_test_setup_teardown(dp_central_rounds, setup_group, teardown),
        cmocka_unit_test_setup_teardown(dp_options_refused, setup, teardown),
        cmocka_unit_test(dp_central_clip_and_noise),
    };
    if (getenv("TERN_TEST_FILTER"))
        cmocka_set_test_filter(getenv("TERN_TEST_FILTER"));
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
