/* The federated server's frame: options, CURVE key files, create (bind, restore the run from the
 * store or commit the first version), the single-threaded event loop, statistics and logging.
 * Sessions live in server_session.c and the round state machine in server_round.c. */
#include "fl/server_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nn/util.h"

/* ---- small helpers ----------------------------------------------------------------------- */

void srv_log(tern_server *s, tern_log_level level, const char *fmt, ...)
{
    if (!s->opt.log)
        return;
    char text[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    s->opt.log(s->opt.log_user, level, text);
}

uint64_t srv_mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* FNV-1a, then mixed: the strategy's client id, stable across restarts. */
uint64_t srv_name_hash(const char *name)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++)
        h = (h ^ *p) * 0x100000001b3ull;
    return srv_mix64(h);
}

tern_status srv_blob_wrap(tern_server *s, uint64_t version, void *bytes, size_t len,
                          srv_blob **out, tern_error *err)
{
    srv_blob *b = calloc(1, sizeof *b);
    if (!b) {
        free(bytes);
        return tern_set_error(err, TERN_ERR_NOMEM, "model version %llu: out of memory",
                              (unsigned long long)version);
    }
    b->bytes = bytes;
    b->len = len;
    b->version = version;
    tern_status st = tern_payload_describe(b->bytes, b->len, 0, s->opt.chunk_size,
                                           TERN_PAYLOAD_SAFETENSORS, &s->limits, &b->info, err);
    if (st != TERN_OK) {
        free(b->bytes);
        free(b);
        return st;
    }
    *out = b;
    return TERN_OK;
}

tern_status srv_blob_make(tern_server *s, uint64_t version, srv_blob **out, tern_error *err)
{
    tern_safetensors_writer *w = NULL;
    void *bytes = NULL;
    size_t len = 0;
    tern_status st = tern_safetensors_writer_create(NULL, &w);
    if (st == TERN_OK)
        st = tern_model_add_metadata(s->model, w);
    if (st == TERN_OK)
        st = tern_model_add_state(s->model, w, "");
    if (st == TERN_OK)
        st = tern_safetensors_writer_serialize(w, &bytes, &len);
    tern_safetensors_writer_destroy(&w);
    if (st != TERN_OK)
        return tern_set_error(err, st, "serializing the global model (version %llu): %s",
                              (unsigned long long)version, tern_strerror(st));
    return srv_blob_wrap(s, version, bytes, len, out, err);
}

static void blob_destroy(srv_blob *b)
{
    free(b->bytes);
    free(b);
}

void srv_blob_unref(srv_blob *b)
{
    if (b->refs == 0 && b->detached)
        blob_destroy(b);
}

void srv_blob_free(tern_server *s, srv_blob **blob)
{
    (void)s;
    if (!*blob)
        return;
    if ((*blob)->refs > 0)
        (*blob)->detached = true;
    else
        blob_destroy(*blob);
    *blob = NULL;
}

/* ---- CURVE keys --------------------------------------------------------------------------- */

/* Key files use CZMQ's certificate layout (zcert_load reads them):
 *     curve
 *         public-key = "<40 Z85 characters>"
 *         secret-key = "<40 Z85 characters>"      (server.key only)
 */
static tern_status write_key_file(const char *path, const char *pub, const char *sec,
                                  tern_error *err)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, sec ? 0600 : 0644);
    if (fd < 0)
        return tern_set_error(err, errno == EEXIST ? TERN_ERR_EXISTS : TERN_ERR_IO,
                              "%s: %s", path, strerror(errno));
    char text[512];
    int n = snprintf(text, sizeof text,
                     "#   Tern server CURVE %s key (CZMQ certificate format)\n"
                     "%s"
                     "curve\n    public-key = \"%s\"\n%s%s%s",
                     sec ? "secret" : "public",
                     sec ? "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its "
                           "permissions.\n"
                         : "",
                     pub, sec ? "    secret-key = \"" : "", sec ? sec : "", sec ? "\"\n" : "");
    bool ok = n > 0 && (size_t)n < sizeof text && write(fd, text, (size_t)n) == (ssize_t)n;
    ok = fsync(fd) == 0 && ok;
    ok = close(fd) == 0 && ok;
    if (!ok) {
        unlink(path);
        return tern_set_error(err, TERN_ERR_IO, "%s: cannot write the key file", path);
    }
    return TERN_OK;
}

tern_status tern_server_keygen(const char *dir, char public_z85[TERN_CURVE_KEY_SIZE],
                               tern_error *err)
{
    if (!dir)
        return tern_set_error(err, TERN_ERR_INVALID, "keygen: NULL directory");
    char key_path[4096], pub_path[4096];
    if ((size_t)snprintf(key_path, sizeof key_path, "%s/server.key", dir) >= sizeof key_path ||
        (size_t)snprintf(pub_path, sizeof pub_path, "%s/server.pub", dir) >= sizeof pub_path)
        return tern_set_error(err, TERN_ERR_INVALID, "keygen: directory name too long");
    if (access(pub_path, F_OK) == 0)
        return tern_set_error(err, TERN_ERR_EXISTS, "%s exists: refusing to overwrite", pub_path);
    zcert_t *cert = zcert_new();
    if (!cert)
        return tern_set_error(err, TERN_ERR_IO, "keygen: cannot create a CURVE key pair");
    tern_status st = write_key_file(key_path, zcert_public_txt(cert), zcert_secret_txt(cert), err);
    if (st == TERN_OK) {
        st = write_key_file(pub_path, zcert_public_txt(cert), NULL, err);
        if (st != TERN_OK)
            unlink(key_path);
    }
    if (st == TERN_OK && public_z85)
        snprintf(public_z85, TERN_CURVE_KEY_SIZE, "%s", zcert_public_txt(cert));
    zcert_destroy(&cert);
    return st;
}

static bool z85_key_ok(const char *k)
{
    if (!k || strlen(k) != TERN_CURVE_KEY_Z85)
        return false;
    uint8_t raw[32];
    return zmq_z85_decode(raw, k) != NULL;
}

tern_status tern_curve_key_read(const char *path, char public_z85[TERN_CURVE_KEY_SIZE],
                                char secret_z85[TERN_CURVE_KEY_SIZE], tern_error *err)
{
    if (!path || !public_z85)
        return tern_set_error(err, TERN_ERR_INVALID, "curve_key_read: NULL argument");
    if (access(path, R_OK) != 0)
        return tern_set_error(err, TERN_ERR_IO, "%s: %s", path, strerror(errno));
    zconfig_t *root = zconfig_load(path);
    if (!root)
        return tern_set_error(err, TERN_ERR_FORMAT, "%s: not a CURVE key file", path);
    const char *pub = zconfig_get(root, "/curve/public-key", NULL);
    const char *sec = zconfig_get(root, "/curve/secret-key", NULL);
    tern_status st = TERN_OK;
    if (!z85_key_ok(pub))
        st = tern_set_error(err, TERN_ERR_FORMAT, "%s: no valid curve/public-key", path);
    else if (secret_z85 && !sec)
        st = tern_set_error(err, TERN_ERR_NOT_FOUND, "%s: holds no secret key", path);
    else if (sec && !z85_key_ok(sec))
        st = tern_set_error(err, TERN_ERR_FORMAT, "%s: curve/secret-key is not a Z85 key", path);
    if (st == TERN_OK) {
        snprintf(public_z85, TERN_CURVE_KEY_SIZE, "%s", pub);
        if (secret_z85)
            snprintf(secret_z85, TERN_CURVE_KEY_SIZE, "%s", sec);
    }
    zconfig_destroy(&root);
    return st;
}

/* ---- options ------------------------------------------------------------------------------ */

tern_server_options tern_server_options_default(void)
{
    return (tern_server_options){
        .strategy = tern_strategy_options_default(TERN_STRATEGY_FEDAVG),
        .rounds = 10,
        .policy = TERN_POLICY_TOLERANT,
        .min_completion = 0.5,
        .round_timeout_ms = 600000,
        .heartbeat_ms = 1000,
        .heartbeat_patience = 5,
        .blacklist_after = 3,
        .chunk_size = TERN_PROTO_DEFAULT_CHUNK,
        .window = 4,
        .max_downloads = 8,
        .max_uploads = 4,
        .max_sessions = 1024,
        .max_errors = 20,
    };
}

static char *dup_opt(const char *text, bool *ok)
{
    if (!text)
        return NULL;
    char *copy = strdup(text);
    if (!copy)
        *ok = false;
    return copy;
}

static tern_status resolve_options(tern_server *s, const tern_server_options *in, tern_error *err)
{
    tern_server_options *o = &s->opt;
    *o = *in;
    /* The strings are copied at the end; until then the server owns none. */
    o->endpoint = o->key_file = o->settings = o->classes = NULL;
    if (!in->endpoint || !*in->endpoint)
        return tern_set_error(err, TERN_ERR_INVALID, "server options: endpoint is required");
    if (!in->insecure && (!in->key_file || !*in->key_file))
        return tern_set_error(err, TERN_ERR_INVALID,
                              "server options: key_file is required unless insecure");
    if (o->rounds == 0)
        o->rounds = 10;
    if (o->min_completion == 0)
        o->min_completion = 0.5;
    if (!(o->min_completion > 0 && o->min_completion <= 1))
        return tern_set_error(err, TERN_ERR_INVALID,
                              "server options: min_completion %g is outside (0, 1]",
                              o->min_completion);
    if (o->policy != TERN_POLICY_TOLERANT && o->policy != TERN_POLICY_STRICT)
        return tern_set_error(err, TERN_ERR_INVALID, "server options: unknown failure policy");
    if (o->lr_schedule != TERN_LR_CONSTANT && o->lr_schedule != TERN_LR_COSINE)
        return tern_set_error(err, TERN_ERR_INVALID, "server options: unknown lr_schedule %d",
                              (int)o->lr_schedule);
    if (o->lr_warmup_rounds > 0 && o->lr_warmup_rounds >= o->rounds)
        return tern_set_error(err, TERN_ERR_INVALID, "server options: lr_warmup_rounds %u must "
                              "be below the round limit", o->lr_warmup_rounds);
    if (o->lr_schedule == TERN_LR_COSINE || o->lr_warmup_rounds > 0) {
        double lr0 = 0;
        if (tern_config_get_number(&o->fit_config, "lr", &lr0) != TERN_OK || !isfinite(lr0) ||
            lr0 <= 0)
            return tern_set_error(err, TERN_ERR_INVALID, "server options: the cosine lr "
                                  "schedule and the warm-up need fit_config \"lr\", a number > 0");
        if (!isfinite(o->lr_min) || o->lr_min < 0 || o->lr_min > lr0)
            return tern_set_error(err, TERN_ERR_INVALID, "server options: lr_min %g is outside "
                                  "[0, lr = %g]", o->lr_min, lr0);
    }
    if (o->round_timeout_ms == 0)
        o->round_timeout_ms = 600000;
    if (o->heartbeat_ms == 0)
        o->heartbeat_ms = 1000;
    if (o->heartbeat_patience == 0)
        o->heartbeat_patience = 5;
    if (o->window == 0)
        o->window = 4;
    if (o->max_downloads == 0)
        o->max_downloads = 8;
    if (o->max_uploads == 0)
        o->max_uploads = 4;
    if (o->max_sessions == 0)
        o->max_sessions = 1024;
    if (o->max_errors == 0)
        o->max_errors = 20;
    s->limits = o->limits;
    if (s->limits.max_message_size == 0)
        s->limits.max_message_size = TERN_PROTO_DEFAULT_MAX_MESSAGE;
    if (s->limits.max_message_size > TERN_PROTO_HARD_MAX_MESSAGE)
        s->limits.max_message_size = TERN_PROTO_HARD_MAX_MESSAGE;
    if (s->limits.max_message_size < 1024)
        return tern_set_error(err, TERN_ERR_INVALID,
                              "server options: max_message_size %u is below 1024",
                              s->limits.max_message_size);
    if (s->limits.max_transfer_size == 0)
        s->limits.max_transfer_size = TERN_PROTO_DEFAULT_MAX_TRANSFER;
    if (s->limits.max_transfer_size > TERN_PROTO_HARD_MAX_TRANSFER)
        s->limits.max_transfer_size = TERN_PROTO_HARD_MAX_TRANSFER;
    o->limits = s->limits;
    if (o->chunk_size == 0)
        o->chunk_size = TERN_PROTO_DEFAULT_CHUNK;
    if (o->chunk_size > s->limits.max_message_size - TERN_PROTO_CHUNK_OVERHEAD)
        o->chunk_size = s->limits.max_message_size - TERN_PROTO_CHUNK_OVERHEAD;

    /* The configs must have room for the entries the server adds. */
    tern_msg_config c = o->fit_config;
    if (c.count > TERN_PROTO_MAX_ENTRIES ||
        tern_config_set_int(&c, "seed", 0) != TERN_OK ||
        tern_config_set_int(&c, "round", 0) != TERN_OK ||
        tern_config_set_float(&c, "proximal_mu", 0) != TERN_OK ||
        tern_config_set_bool(&c, "fedbn", false) != TERN_OK)
        return tern_set_error(err, TERN_ERR_INVALID,
                              "server options: fit_config has no room for seed, round, "
                              "proximal_mu and fedbn (at most %d entries)",
                              TERN_PROTO_MAX_ENTRIES - 4);
    c = o->evaluate_config;
    if (c.count > TERN_PROTO_MAX_ENTRIES || tern_config_set_int(&c, "round", 0) != TERN_OK ||
        tern_config_set_bool(&c, "fedbn", false) != TERN_OK)
        return tern_set_error(err, TERN_ERR_INVALID,
                              "server options: evaluate_config has no room for round and fedbn");

    bool ok = true;
    o->endpoint = dup_opt(in->endpoint, &ok);
    o->key_file = dup_opt(in->key_file, &ok);
    o->settings = dup_opt(in->settings, &ok);
    o->classes = dup_opt(in->classes, &ok);
    if (!ok)
        return tern_set_error(err, TERN_ERR_NOMEM, "server options: copying strings");
    return TERN_OK;
}

/* ---- create / destroy --------------------------------------------------------------------- */

static tern_status bind_socket(tern_server *s, tern_error *err)
{
    /* The embedding application owns the signals: CZMQ must not install its handlers. */
    zsys_handler_set(NULL);
    s->sock = zsock_new(ZMQ_ROUTER);
    if (!s->sock)
        return tern_set_error(err, TERN_ERR_IO, "cannot create the ROUTER socket");
    zsock_set_router_mandatory(s->sock, 0);
    zsock_set_sndhwm(s->sock, 10000);
    zsock_set_rcvhwm(s->sock, 10000);
    zsock_set_linger(s->sock, 0);
    /* Frames a little beyond the limit still arrive (and are answered `too_large`); libzmq
     * drops the connection of a peer sending anything larger. */
    uint64_t cap = (uint64_t)s->limits.max_message_size * 2 + 65536;
    zsock_set_maxmsgsize(s->sock, cap > INT32_MAX ? INT32_MAX : (int)cap);
    if (!s->opt.insecure) {
        char pub[TERN_CURVE_KEY_SIZE], sec[TERN_CURVE_KEY_SIZE];
        tern_status st = tern_curve_key_read(s->opt.key_file, pub, sec, err);
        if (st != TERN_OK)
            return st == TERN_ERR_FORMAT || st == TERN_ERR_NOT_FOUND ? TERN_ERR_IO : st;
        zsock_set_curve_server(s->sock, 1);
        zsock_set_curve_secretkey(s->sock, sec);
        zsock_set_curve_publickey(s->sock, pub);
    }
    if (zsock_bind(s->sock, "%s", s->opt.endpoint) < 0)
        return tern_set_error(err, TERN_ERR_IO, "cannot bind %s: %s", s->opt.endpoint,
                              zmq_strerror(zmq_errno()));
    s->endpoint = zsock_last_endpoint(s->sock);
    if (!s->endpoint)
        return tern_set_error(err, TERN_ERR_IO, "bound %s but cannot read the endpoint back",
                              s->opt.endpoint);
    return TERN_OK;
}

/* Mark rounds a killed server left open as failed. */
static tern_status fail_dangling_rounds(tern_server *s, tern_error *err)
{
    const tern_round_status open[] = {TERN_ROUND_PENDING, TERN_ROUND_RUNNING,
                                      TERN_ROUND_AGGREGATING};
    for (size_t k = 0; k < 3; k++) {
        tern_round *rounds = NULL;
        size_t n = 0;
        tern_status st = tern_store_round_list_by_status(s->store, open[k], &rounds, &n, err);
        if (st != TERN_OK)
            return st;
        for (size_t i = 0; st == TERN_OK && i < n; i++) {
            st = tern_store_round_fail(s->store, rounds[i].number, "server restarted", NULL, 0,
                                       NULL, err);
            if (st == TERN_OK)
                srv_log(s, TERN_LOG_WARN, "round %lld was left %s by a previous server: failed",
                        (long long)rounds[i].number, tern_round_status_name(open[k]));
        }
        tern_store_free(s->store, rounds);
        if (st != TERN_OK)
            return st;
    }
    return TERN_OK;
}

/* Load the current version into the model; *found false for an empty registry. */
static tern_status restore_model(tern_server *s, bool *found, tern_error *err)
{
    void *bytes = NULL;
    size_t len = 0;
    tern_model_version info;
    *found = false;
    tern_status st = tern_store_version_load(s->store, NULL, &bytes, &len, &info, err);
    if (st == TERN_ERR_NOT_FOUND) {
        tern_model_version cur;
        if (tern_store_version_current(s->store, &cur, NULL) == TERN_ERR_NOT_FOUND)
            return TERN_OK; /* an empty registry */
        return st;      /* a current version whose blob was pruned */
    }
    if (st != TERN_OK)
        return st;
    tern_safetensors *sf = NULL;
    tern_error e = {{0}};
    st = tern_safetensors_parse(bytes, len, NULL, &sf, &e);
    tern_store_free(s->store, bytes);
    if (st == TERN_OK)
        st = tern_model_load_state(s->model, sf, "", &e);
    tern_safetensors_close(&sf);
    if (st != TERN_OK)
        return tern_set_error(err, st == TERN_ERR_NOMEM ? st : TERN_ERR_FORMAT,
                              "stored model version %s does not load into the model: %s",
                              info.version, e.message);
    *found = true;
    srv_log(s, TERN_LOG_INFO, "resuming from model version %s", info.version);
    return TERN_OK;
}

static size_t count_bn(const tern_model *m)
{
    size_t n = 0;
    for (size_t i = 0; i < tern_model_tensor_count(m); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(m, i);
        if (t->kind == TERN_TENSOR_BUFFER)
            n += t->count;
    }
    return n;
}

static tern_status create_strategies(tern_server *s, tern_error *err)
{
    tern_strategy_options so = s->opt.strategy;
    so.num_params = s->num_params;
    so.update = TERN_UPDATE_WEIGHTS;
    so.alloc = NULL;
    tern_status st = tern_strategy_create(&so, tern_model_params(s->model), &s->strategy, err);
    if (st != TERN_OK)
        return st;
    if (s->num_bn == 0)
        return TERN_OK;
    s->bn_values = malloc(s->num_bn * sizeof(float));
    if (!s->bn_values)
        return tern_set_error(err, TERN_ERR_NOMEM, "BatchNorm statistics buffer (%zu floats)",
                              s->num_bn);
    tern_strategy_options bo = tern_strategy_options_default(TERN_STRATEGY_FEDAVG);
    bo.num_params = s->num_bn;
    bo.fraction_fit = 1.0;
    bo.fraction_evaluate = 0.0;
    bo.min_fit_clients = bo.min_evaluate_clients = bo.min_available_clients = 1;
    bo.accept_failures = true;
    bo.max_update_norm = 0;
    size_t k = 0;
    for (size_t i = 0; i < tern_model_tensor_count(s->model); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(s->model, i);
        if (t->kind == TERN_TENSOR_BUFFER) {
            memcpy(s->bn_values + k, t->data, t->count * sizeof(float));
            k += t->count;
        }
    }
    return tern_strategy_create(&bo, s->bn_values, &s->bn, err);
}

tern_status tern_server_create(const tern_server_options *opt, tern_store *store,
                               tern_model *model, tern_server **out, tern_error *err)
{
    if (!opt || !store || !model || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "server_create: NULL argument");
    tern_server *s = calloc(1, sizeof *s);
    if (!s)
        return tern_set_error(err, TERN_ERR_NOMEM, "server_create: allocating the server");
    s->store = store;
    s->model = model;
    s->best_accuracy = -INFINITY;
    s->phase = PH_WAIT;
    tern_status st = resolve_options(s, opt, err);
    if (st != TERN_OK)
        goto fail;
    size_t ms = s->opt.max_sessions;
    s->sessions = calloc(ms, sizeof *s->sessions);
    s->avail = calloc(ms, sizeof *s->avail);
    s->avail_ids = calloc(ms, sizeof *s->avail_ids);
    s->selected = calloc(2 * (size_t)ms, sizeof *s->selected);
    if (!s->sessions || !s->avail || !s->avail_ids || !s->selected) {
        st = tern_set_error(err, TERN_ERR_NOMEM, "server_create: session table");
        goto fail;
    }
    s->next_session_id = ((uint64_t)zclock_time() << 16) | 1;
    if ((st = tern_buffer_pool_create(s->opt.max_uploads < 64 ? s->opt.max_uploads : 64,
                                      &s->up_pool, err)) != TERN_OK)
        goto fail;
    s->up_alloc = tern_buffer_pool_allocator(s->up_pool);

    tern_model_options mo = *tern_model_options_of(model);
    mo.threads = 1;
    tern_error e = {{0}};
    if ((st = tern_model_create(&mo, &s->scratch, &e)) != TERN_OK) {
        tern_set_error(err, st, "server_create: scratch model for updates: %s", e.message);
        goto fail;
    }
    s->num_params = tern_model_param_count(model);
    s->num_bn = count_bn(model);
    size_t nupd;
    if (!tern_mul_size(SRV_PENDING * sizeof(float), s->num_params, &nupd) ||
        !(s->updates = tern_alloc(NULL, nupd))) {
        st = tern_set_error(err, TERN_ERR_NOMEM, "server_create: %d update vectors",
                            SRV_PENDING);
        goto fail;
    }

    if ((st = srv_dp_create(s, err)) != TERN_OK)
        goto fail;
    if ((st = bind_socket(s, err)) != TERN_OK)
        goto fail;
    if ((st = fail_dangling_rounds(s, err)) != TERN_OK)
        goto fail;
    bool found = false;
    if ((st = restore_model(s, &found, err)) != TERN_OK)
        goto fail;
    if ((st = create_strategies(s, err)) != TERN_OK)
        goto fail;
    if (found) {
        void *state = NULL;
        size_t len = 0;
        st = tern_store_server_state_load(store, &state, &len, err);
        if (st == TERN_OK) {
            st = srv_state_restore(s, state, len, err);
            tern_store_free(store, state);
        } else if (st == TERN_ERR_NOT_FOUND) {
            st = TERN_OK; /* versions from elsewhere: a fresh run on that model */
            srv_log(s, TERN_LOG_WARN, "no server state in the store: counters start at 0");
        }
        if (st != TERN_OK)
            goto fail;
    }
    if ((st = srv_blob_make(s, s->completed, &s->blob, err)) != TERN_OK)
        goto fail;
    if (!found && (st = srv_commit_initial(s, err)) != TERN_OK)
        goto fail;
    /* A restored run may have converged already (the counters come from the stored state). */
    s->finished = s->completed >= s->opt.rounds ||
                  (s->opt.patience && s->since_best >= s->opt.patience);
    srv_log(s, TERN_LOG_INFO, "server on %s (%s), %llu of %u rounds completed", s->endpoint,
            s->opt.insecure ? "insecure" : "CURVE", (unsigned long long)s->completed,
            s->opt.rounds);
    *out = s;
    return TERN_OK;
fail:
    tern_server_destroy(&s);
    if (st == TERN_ERR_NOT_FOUND || st == TERN_ERR_STATE || st == TERN_ERR_UNSUPPORTED ||
        st == TERN_ERR_EXISTS)
        st = TERN_ERR_IO; /* the store refused: documented as an I/O failure */
    return st;
}

void tern_server_destroy(tern_server **server)
{
    if (!server || !*server)
        return;
    tern_server *s = *server;
    for (size_t i = 0; s->sessions && i < s->opt.max_sessions; i++)
        if (s->sessions[i])
            srv_session_close(s, s->sessions[i], false, TERN_GOODBYE_NORMAL, "server destroyed");
    srv_blob_free(s, &s->blob);
    srv_blob_free(s, &s->next_blob);
    srv_blob_free(s, &s->old_blob);
    free(s->parts);
    free(s->eval_parts);
    zsock_destroy(&s->sock);
    zstr_free(&s->endpoint);
    tern_strategy_destroy(&s->strategy);
    tern_strategy_destroy(&s->bn);
    srv_dp_destroy(s);
    tern_model_destroy(&s->scratch);
    srv_layout_clear(&s->layout);
    tern_free(NULL, s->updates);
    tern_buffer_pool_destroy(&s->up_pool); /* after the sessions: their uploads released */
    free(s->bn_values);
    free(s->sessions);
    free(s->avail);
    free(s->avail_ids);
    free(s->selected);
    free(s->keys);
    free((char *)s->opt.endpoint);
    free((char *)s->opt.key_file);
    free((char *)s->opt.settings);
    free((char *)s->opt.classes);
    free(s);
    *server = NULL;
}

/* ---- the event loop ----------------------------------------------------------------------- */

static int poll_timeout(tern_server *s)
{
    int64_t due = s->now + 100;
    for (size_t i = 0; i < s->opt.max_sessions; i++) {
        srv_session *ss = s->sessions[i];
        if (ss && ss->next_heartbeat < due)
            due = ss->next_heartbeat;
    }
    int64_t d = srv_round_deadline(s);
    if (d < due)
        due = d;
    return due <= s->now ? 0 : (int)(due - s->now);
}

static tern_status poll_once(tern_server *s, int timeout, tern_error *err)
{
    zmq_pollitem_t item = {zsock_resolve(s->sock), 0, ZMQ_POLLIN, 0};
    int64_t t0 = srv_clock_ns(CLOCK_MONOTONIC);
    int rc = zmq_poll(&item, 1, timeout);
    s->timers[SRV_T_IDLE] += srv_clock_ns(CLOCK_MONOTONIC) - t0;
    s->now = zclock_mono();
    if (rc < 0 && zmq_errno() != EINTR)
        return tern_set_error(err, TERN_ERR_IO, "polling the server socket: %s",
                              zmq_strerror(zmq_errno()));
    tern_status st = TERN_OK;
    if (rc > 0 && (item.revents & ZMQ_POLLIN))
        st = srv_drain(s, err);
    srv_housekeeping(s);
    return st;
}

tern_status tern_server_run(tern_server *s, tern_error *err)
{
    if (!s)
        return tern_set_error(err, TERN_ERR_INVALID, "server_run: NULL server");
    s->now = zclock_mono();
    if (s->phase == PH_WAIT)
        s->wait_started = s->now;
    tern_status st = TERN_OK;
    for (;;) {
        s->now = zclock_mono();
        if (s->stop)
            break;
        /* A phase that ends at once (EVALUATE with nobody to ask, then COMMIT, then the next
         * round's FIT) runs on in the same turn instead of after a poll timeout. Bounded, so
         * that rounds failing at once still let the socket be served. */
        srv_phase before;
        int steps = 0;
        do {
            before = s->phase;
            st = srv_round_step(s, err);
            s->now = zclock_mono();
        } while (st == TERN_OK && s->phase != before && !s->finished && ++steps < 4);
        if (st != TERN_OK)
            break;
        if (s->finished) {
            s->closing = true;
            srv_send_goodbye_all(s, TERN_GOODBYE_SHUTDOWN, "the run is complete");
            /* Give the queued GOODBYEs a moment on the wire (the socket lingers 0). */
            int64_t until = zclock_mono() + 100;
            while (st == TERN_OK && (s->now = zclock_mono()) < until)
                st = poll_once(s, (int)(until - s->now), err);
            break;
        }
        srv_pump(s);
        if ((st = poll_once(s, poll_timeout(s), err)) != TERN_OK)
            break;
        srv_pump(s);
    }
    s->stop = 0;
    return st;
}

void tern_server_request_stop(tern_server *server)
{
    if (server)
        server->stop = 1;
}

const char *tern_server_endpoint(const tern_server *server)
{
    return server ? server->endpoint : NULL;
}

uint64_t tern_server_rounds_completed(const tern_server *server)
{
    return server ? server->completed : 0;
}

void tern_server_stats_get(const tern_server *server, tern_server_stats *out)
{
    if (!server || !out)
        return;
    *out = server->stats;
    out->sessions = server->num_sessions;
}
