/* The server's round state machine (docs/federation.md, "Rounds"): WAIT for clients, FIT
 * (FIT_INS, updates verified and folded into the strategies as they arrive), AGGREGATE,
 * EVALUATE (clients and the server-side callback), COMMIT, or a failed round; and the server
 * state committed with every round so that a restarted server resumes exactly.
 *
 * Session events (a result, a failure) only mark the participant; srv_round_step, called at
 * every loop turn, decides when a phase ends, so nothing here re-enters the session code
 * while it walks its tables. */
#include "fl/server_internal.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "nn/util.h"

#define STATE_FORMAT "tern-server-state"
#define STATE_VERSION "1"

static double seconds_since(const tern_server *s, int64_t t0)
{
    return (double)(s->now - t0) / 1000.0;
}

static uint32_t wire_round(const tern_server *s)
{
    return (uint32_t)s->report.training_round;
}

/* ---- server state ---------------------------------------------------------------------------- */

static tern_status add_state_vectors(tern_safetensors_writer *w, tern_strategy *st,
                                     const char *prefix, size_t n)
{
    int64_t shape[1] = {(int64_t)n};
    char name[96];
    for (size_t i = 0; st && i < tern_strategy_state_count(st); i++) {
        const char *vname;
        float *data;
        tern_status s = tern_strategy_state_at(st, i, &vname, &data);
        if (s == TERN_OK) {
            snprintf(name, sizeof name, "%s/%s", prefix, vname);
            s = tern_safetensors_writer_add(w, name, TERN_DTYPE_F32, 1, shape, data);
        }
        if (s != TERN_OK)
            return s;
    }
    return TERN_OK;
}

tern_status srv_state_serialize(tern_server *s, void **bytes, size_t *len, tern_error *err)
{
    tern_safetensors_writer *w = NULL;
    tern_status st = tern_safetensors_writer_create(NULL, &w);
    char completed[32], best[40], since[32];
    snprintf(completed, sizeof completed, "%llu", (unsigned long long)s->completed);
    if (isfinite(s->best_accuracy))
        snprintf(best, sizeof best, "%.17g", s->best_accuracy);
    else
        snprintf(best, sizeof best, "none");
    snprintf(since, sizeof since, "%llu", (unsigned long long)s->since_best);
    const char *meta[][2] = {
        {"format", STATE_FORMAT},
        {"format_version", STATE_VERSION},
        {"strategy", tern_strategy_kind_name(s->opt.strategy.kind)},
        {"rounds_completed", completed},
        {"best_accuracy", best},
        {"rounds_since_best", since},
    };
    for (size_t i = 0; st == TERN_OK && i < sizeof meta / sizeof meta[0]; i++)
        st = tern_safetensors_writer_set_metadata(w, meta[i][0], meta[i][1]);
    if (st == TERN_OK)
        st = add_state_vectors(w, s->strategy, "strategy", s->num_params);
    if (st == TERN_OK)
        st = add_state_vectors(w, s->bn, "bn", s->num_bn);
    if (st == TERN_OK)
        st = tern_safetensors_writer_serialize(w, bytes, len);
    tern_safetensors_writer_destroy(&w);
    if (st != TERN_OK)
        return tern_set_error(err, st, "serializing the server state: %s", tern_strerror(st));
    return TERN_OK;
}

static bool parse_u64(const char *text, uint64_t *out)
{
    if (!text || !*text)
        return false;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno || *end || text[0] == '-')
        return false;
    *out = v;
    return true;
}

static tern_status restore_vectors(tern_server *s, const tern_safetensors *sf, tern_strategy *st,
                                   const char *prefix, size_t n, tern_error *err)
{
    char name[96];
    for (size_t i = 0; st && i < tern_strategy_state_count(st); i++) {
        const char *vname;
        float *data;
        tern_strategy_state_at(st, i, &vname, &data);
        snprintf(name, sizeof name, "%s/%s", prefix, vname);
        tern_tensor_view v;
        if (tern_safetensors_find(sf, name, &v) != TERN_OK) {
            srv_log(s, TERN_LOG_WARN, "server state has no '%s': it starts at zero", name);
            continue;
        }
        if (v.dtype != TERN_DTYPE_F32 || v.ndim != 1 || v.shape[0] != (int64_t)n)
            return tern_set_error(err, TERN_ERR_FORMAT,
                                  "server state '%s' does not match the model (%zu values)", name,
                                  n);
        memcpy(data, v.data, n * sizeof(float));
    }
    return TERN_OK;
}

tern_status srv_state_restore(tern_server *s, const void *bytes, size_t len, tern_error *err)
{
    tern_safetensors *sf = NULL;
    tern_error e = {{0}};
    tern_status st = tern_safetensors_parse(bytes, len, NULL, &sf, &e);
    if (st != TERN_OK)
        return tern_set_error(err, st == TERN_ERR_NOMEM ? st : TERN_ERR_FORMAT,
                              "stored server state: %s", e.message);
    const char *format = tern_safetensors_metadata(sf, "format");
    const char *kind = tern_safetensors_metadata(sf, "strategy");
    uint64_t completed = 0, since = 0;
    const char *best = tern_safetensors_metadata(sf, "best_accuracy");
    if (!format || strcmp(format, STATE_FORMAT) != 0 ||
        !parse_u64(tern_safetensors_metadata(sf, "rounds_completed"), &completed) ||
        !parse_u64(tern_safetensors_metadata(sf, "rounds_since_best"), &since) || !best) {
        st = tern_set_error(err, TERN_ERR_FORMAT, "stored server state: missing or bad metadata");
        goto done;
    }
    if (kind && strcmp(kind, tern_strategy_kind_name(s->opt.strategy.kind)) != 0)
        srv_log(s, TERN_LOG_WARN,
                "the stored server state is from strategy %s, this run uses %s: its vectors "
                "are restored only where the names agree",
                kind, tern_strategy_kind_name(s->opt.strategy.kind));
    if ((st = restore_vectors(s, sf, s->strategy, "strategy", s->num_params, err)) != TERN_OK ||
        (st = restore_vectors(s, sf, s->bn, "bn", s->num_bn, err)) != TERN_OK)
        goto done;
    s->completed = completed;
    s->since_best = since;
    s->best_accuracy = strcmp(best, "none") == 0 ? -INFINITY : strtod(best, NULL);
    tern_strategy_set_rounds(s->strategy, completed);
    if (s->bn)
        tern_strategy_set_rounds(s->bn, completed);
done:
    tern_safetensors_close(&sf);
    return st;
}

/* ---- report and client metrics --------------------------------------------------------------- */

static json_t *num_or_null(double v)
{
    return isfinite(v) ? json_real(v) : json_null();
}

static char *report_json(const tern_round_report *r)
{
    json_t *o = json_object();
    if (!o)
        return NULL;
    int bad = 0;
    bad |= json_object_set_new(o, "training_round", json_integer((json_int_t)r->training_round));
    bad |= json_object_set_new(o, "store_round", json_integer((json_int_t)r->store_round));
    bad |= json_object_set_new(o, "completed", json_boolean(r->completed));
    bad |= json_object_set_new(o, "reason", json_string(r->reason));
    bad |= json_object_set_new(o, "available", json_integer((json_int_t)r->available));
    bad |= json_object_set_new(o, "selected", json_integer((json_int_t)r->selected));
    bad |= json_object_set_new(o, "succeeded", json_integer((json_int_t)r->succeeded));
    bad |= json_object_set_new(o, "failed", json_integer((json_int_t)r->failed));
    bad |= json_object_set_new(o, "rejected", json_integer((json_int_t)r->rejected));
    bad |= json_object_set_new(o, "num_examples", json_integer((json_int_t)r->num_examples));
    bad |= json_object_set_new(o, "train_loss", num_or_null(r->train_loss));
    bad |= json_object_set_new(o, "train_accuracy", num_or_null(r->train_accuracy));
    bad |= json_object_set_new(o, "client_eval_loss", num_or_null(r->client_eval_loss));
    bad |= json_object_set_new(o, "client_eval_accuracy", num_or_null(r->client_eval_accuracy));
    bad |= json_object_set_new(o, "client_eval_count",
                               json_integer((json_int_t)r->client_eval_count));
    bad |= json_object_set_new(o, "eval_loss", num_or_null(r->eval_loss));
    bad |= json_object_set_new(o, "eval_accuracy", num_or_null(r->eval_accuracy));
    bad |= json_object_set_new(o, "update_norm_mean", num_or_null(r->update_norm_mean));
    bad |= json_object_set_new(o, "bytes_in", json_integer((json_int_t)r->bytes_in));
    bad |= json_object_set_new(o, "bytes_out", json_integer((json_int_t)r->bytes_out));
    bad |= json_object_set_new(o, "fit_seconds", num_or_null(r->fit_seconds));
    bad |= json_object_set_new(o, "eval_seconds", num_or_null(r->eval_seconds));
    bad |= json_object_set_new(o, "commit_seconds", num_or_null(r->commit_seconds));
    bad |= json_object_set_new(o, "round_seconds", num_or_null(r->round_seconds));
    const struct { const char *key; double v; } timing[] = {
        {"idle_seconds", r->idle_seconds},         {"verify_seconds", r->verify_seconds},
        {"load_seconds", r->load_seconds},         {"fold_seconds", r->fold_seconds},
        {"send_seconds", r->send_seconds},         {"aggregate_seconds", r->aggregate_seconds},
        {"serialize_seconds", r->serialize_seconds}, {"cpu_seconds", r->cpu_seconds},
        {"loop_cpu_seconds", r->loop_cpu_seconds},
    };
    for (size_t i = 0; i < sizeof timing / sizeof timing[0]; i++)
        bad |= json_object_set_new(o, timing[i].key, num_or_null(timing[i].v));
    bad |= json_object_set_new(o, "model_version", json_string(r->model_version));
    bad |= json_object_set_new(o, "epsilon", num_or_null(r->epsilon));
    char *text = bad ? NULL : json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(o);
    return text;
}

static tern_client_metrics *client_metrics(const tern_server *s)
{
    tern_client_metrics *m = calloc(s->num_parts ? s->num_parts : 1, sizeof *m);
    for (size_t i = 0; m && i < s->num_parts; i++) {
        const srv_part *p = &s->parts[i];
        snprintf(m[i].client_id, sizeof m[i].client_id, "%s", p->client_id);
        m[i].participated = p->state == PART_OK;
        m[i].num_samples = (int64_t)p->examples;
        m[i].loss = isfinite(p->loss) ? p->loss : 0.0;
        m[i].accuracy = isfinite(p->accuracy) ? p->accuracy : 0.0;
        m[i].rejected = p->state == PART_REJECTED;
        m[i].update_norm = isfinite(p->norm) ? p->norm : 0.0;
    }
    return m;
}

static void count_parts(tern_server *s, size_t *ok, size_t *failed, size_t *rejected,
                        size_t *waiting)
{
    *ok = *failed = *rejected = *waiting = 0;
    for (size_t i = 0; i < s->num_parts; i++)
        switch (s->parts[i].state) {
        case PART_OK: (*ok)++; break;
        case PART_FAILED: (*failed)++; break;
        case PART_REJECTED: (*rejected)++; break;
        default: (*waiting)++; break;
        }
}

/* Blacklist the clients whose rejected count reached blacklist_after (after the store counted
 * this round). */
static void enforce_blacklist(tern_server *s)
{
    if (s->opt.blacklist_after == 0)
        return;
    for (size_t i = 0; i < s->num_parts; i++) {
        const srv_part *p = &s->parts[i];
        if (p->state != PART_REJECTED)
            continue;
        tern_client_record rec;
        tern_error e = {{0}};
        if (tern_store_client_get(s->store, p->client_id, &rec, &e) != TERN_OK) {
            srv_log(s, TERN_LOG_WARN, "client %s: %s", p->name, e.message);
            continue;
        }
        if (rec.blacklisted || rec.rounds_rejected < (int64_t)s->opt.blacklist_after)
            continue;
        char reason[128];
        snprintf(reason, sizeof reason, "%lld rejected updates (blacklist_after %u)",
                 (long long)rec.rounds_rejected, s->opt.blacklist_after);
        if (tern_store_client_set_blacklisted(s->store, p->client_id, true, reason, "tern-server",
                                              &e) != TERN_OK) {
            srv_log(s, TERN_LOG_ERROR, "client %s: cannot blacklist: %s", p->name, e.message);
            continue;
        }
        srv_log(s, TERN_LOG_WARN, "client %s blacklisted: %s", p->name, reason);
        srv_session *ss = srv_session_by_name(s, p->name);
        if (ss)
            srv_session_close(s, ss, true, TERN_GOODBYE_REJECTED, "blacklisted: %s", reason);
    }
}

/* Stop every transfer of the round and forget the participants' sessions. */
static void close_fit(tern_server *s)
{
    for (size_t i = 0; i < s->opt.max_sessions; i++) {
        srv_session *ss = s->sessions[i];
        if (!ss || ss->part < 0)
            continue;
        if (ss->dl != DL_IDLE && ss->dl_round == wire_round(s))
            srv_download_cancel(s, ss);
        srv_upload_cancel(s, ss);
        ss->part = -1;
    }
    for (size_t i = 0; i < s->num_parts; i++)
        s->parts[i].session = NULL;
}

static void close_eval(tern_server *s)
{
    for (size_t i = 0; i < s->opt.max_sessions; i++) {
        srv_session *ss = s->sessions[i];
        if (!ss || ss->eval_part < 0)
            continue;
        if (ss->dl != DL_IDLE && ss->dl_blob == s->next_blob)
            srv_download_cancel(s, ss);
        ss->eval_part = -1;
    }
    free(s->eval_parts);
    s->eval_parts = NULL;
    s->num_eval_parts = 0;
}

static void end_round(tern_server *s)
{
    if (s->opt.on_round)
        s->opt.on_round(s->opt.on_round_user, &s->report);
    enforce_blacklist(s);
    free(s->parts);
    s->parts = NULL;
    s->num_parts = 0;
    s->phase = PH_WAIT;
    s->wait_started = s->now;
}

static void fill_timing(tern_server *s);

static void finish_report(tern_server *s)
{
    size_t ok, failed, rejected, waiting;
    count_parts(s, &ok, &failed, &rejected, &waiting);
    s->report.succeeded = ok;
    s->report.failed = failed + rejected + waiting;
    s->report.rejected = rejected;
    s->report.bytes_in = s->stats.bytes_in - s->round_bytes_in0;
    s->report.bytes_out = s->stats.bytes_out - s->round_bytes_out0;
    s->report.round_seconds = seconds_since(s, s->round_started);
    fill_timing(s);
}

static void fill_timing(tern_server *s)
{
    double *out[SRV_T_COUNT] = {
        [SRV_T_IDLE] = &s->report.idle_seconds,
        [SRV_T_VERIFY] = &s->report.verify_seconds,
        [SRV_T_LOAD] = &s->report.load_seconds,
        [SRV_T_FOLD] = &s->report.fold_seconds,
        [SRV_T_SEND] = &s->report.send_seconds,
        [SRV_T_AGGREGATE] = &s->report.aggregate_seconds,
        [SRV_T_SERIALIZE] = &s->report.serialize_seconds,
    };
    for (int i = 0; i < SRV_T_COUNT; i++)
        *out[i] = (double)s->timers[i] * 1e-9;
    s->report.cpu_seconds =
        (double)(srv_clock_ns(CLOCK_PROCESS_CPUTIME_ID) - s->round_cpu0) * 1e-9;
    s->report.loop_cpu_seconds =
        (double)(srv_clock_ns(CLOCK_THREAD_CPUTIME_ID) - s->round_thread_cpu0) * 1e-9;
}

static tern_status fail_round(tern_server *s, const char *reason, tern_error *err)
{
    for (size_t i = 0; i < s->num_parts; i++)
        if (s->parts[i].state == PART_WAITING)
            s->parts[i].state = PART_FAILED;
    close_fit(s);
    close_eval(s);
    srv_blob_free(s, &s->next_blob);
    s->report.completed = false;
    snprintf(s->report.reason, sizeof s->report.reason, "%s", reason);
    srv_dp_round_failed(s);
    if (s->report.fit_seconds == 0)
        s->report.fit_seconds = seconds_since(s, s->round_started);
    finish_report(s);
    srv_log(s, TERN_LOG_WARN, "round %llu (store round %lld) failed: %s",
            (unsigned long long)s->report.training_round, (long long)s->store_round, reason);
    tern_client_metrics *m = client_metrics(s);
    char *json = report_json(&s->report);
    tern_status st = TERN_OK;
    if (!m || !json)
        st = tern_set_error(err, TERN_ERR_NOMEM, "recording failed round %lld",
                            (long long)s->store_round);
    else
        st = tern_store_round_fail(s->store, s->store_round, reason, m, s->num_parts, json, err);
    free(m);
    free(json);
    end_round(s);
    return st == TERN_OK ? TERN_OK : TERN_ERR_IO;
}

/* ---- FIT ------------------------------------------------------------------------------------- */

static uint64_t client_seed(const tern_server *s, uint64_t round, const char *name)
{
    uint64_t x = srv_mix64(s->opt.strategy.seed ^ srv_mix64(round));
    return srv_mix64(x ^ srv_name_hash(name)) & (uint64_t)INT64_MAX;
}

double srv_round_lr(const tern_server_options *o, uint64_t t)
{
    double lr0 = 0;
    tern_config_get_number(&o->fit_config, "lr", &lr0);
    const uint64_t w = o->lr_warmup_rounds;
    if (t <= w)
        return lr0 * (double)t / (double)(w + 1);
    if (o->lr_schedule != TERN_LR_COSINE)
        return lr0;
    double x = (double)(t - w - 1) / (double)(o->rounds - w);
    return o->lr_min + (lr0 - o->lr_min) * 0.5 * (1.0 + cos(3.14159265358979323846 * x));
}

static bool send_fit_ins(tern_server *s, srv_session *ss, uint64_t t)
{
    tern_msg *m = calloc(1, sizeof *m);
    if (!m)
        return false;
    m->type = TERN_MSG_FIT_INS;
    m->round = (uint32_t)t;
    m->fit_ins.model_version = s->blob->version;
    m->fit_ins.update_encoding = TERN_PAYLOAD_SAFETENSORS;
    m->fit_ins.deadline_ms = s->opt.round_timeout_ms;
    m->fit_ins.config = s->opt.fit_config;
    tern_msg_config *c = &m->fit_ins.config;
    bool ok = tern_config_set_int(c, "seed", (int64_t)client_seed(s, t, ss->name)) == TERN_OK &&
              tern_config_set_int(c, "round", (int64_t)t) == TERN_OK &&
              tern_config_set_bool(c, "fedbn", s->opt.fedbn) == TERN_OK;
    if (ok && s->opt.strategy.kind == TERN_STRATEGY_FEDPROX)
        ok = tern_config_set_float(c, "proximal_mu", s->opt.strategy.proximal_mu) == TERN_OK;
    if (ok && (s->opt.lr_schedule == TERN_LR_COSINE || s->opt.lr_warmup_rounds > 0))
        ok = tern_config_set_float(c, "lr", srv_round_lr(&s->opt, t)) == TERN_OK;
    ok = ok && srv_dp_fit_config(s, c);
    if (ok) {
        srv_download_prepare(s, ss, s->blob, (uint32_t)t, &m->fit_ins.payload);
        ok = srv_send_instruction(s, ss, m);
    }
    free(m);
    return ok;
}

/* Sessions available for a round, after checking the store still allows each client. */
static size_t gather_available(tern_server *s)
{
    size_t n = srv_available(s, s->avail, s->opt.max_sessions), k = 0;
    for (size_t i = 0; i < n; i++) {
        srv_session *ss = s->avail[i];
        bool dup = false;
        for (size_t j = 0; j < k; j++)
            dup |= s->avail_ids[j] == ss->cid;
        if (dup)
            continue; /* a 64-bit hash collision: the second client waits */
        s->avail[k] = ss;
        s->avail_ids[k++] = ss->cid;
    }
    return k;
}

static bool client_allowed(tern_server *s, srv_session *ss)
{
    tern_client_record rec;
    tern_error e = {{0}};
    if (tern_store_client_get(s->store, ss->client_id, &rec, &e) != TERN_OK) {
        srv_log(s, TERN_LOG_WARN, "client %s: %s", ss->name, e.message);
        srv_session_close(s, ss, true, TERN_GOODBYE_REJECTED, "client record unavailable");
        return false;
    }
    if (rec.blacklisted || !rec.active) {
        srv_session_close(s, ss, true, TERN_GOODBYE_REJECTED, "client is %s",
                          rec.blacklisted ? "blacklisted" : "deactivated");
        return false;
    }
    return true;
}

static tern_status start_fit(tern_server *s, tern_error *err)
{
    size_t n = gather_available(s);
    size_t kk, min_available;
    tern_strategy_num_fit_clients(s->strategy, n, &kk, &min_available);
    if (n == 0 || n < min_available || n < kk)
        return TERN_OK;
    /* The store may have deactivated someone since HELLO. */
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (client_allowed(s, s->avail[i])) {
            s->avail[m] = s->avail[i];
            s->avail_ids[m++] = s->avail_ids[i];
        }
    n = m;
    uint64_t t = s->completed + 1;
    size_t k = 0;
    bool wait = false;
    size_t n_dp = srv_dp_select(s, n, t, &wait);
    if (wait)
        return TERN_OK;
    tern_status st = TERN_OK;
    if (srv_dp_central(s) && n_dp == 0) {
        k = 0; /* nobody sampled: the round releases noise alone */
    } else {
        /* The first n_dp of s->avail are the candidates (the rest is stale). */
        st = tern_strategy_configure_fit(s->strategy, t, s->avail_ids, n_dp, s->selected, &k);
    }
    if (st == TERN_ERR_STATE)
        return TERN_OK; /* not enough clients after all: keep waiting */
    if (st != TERN_OK)
        return tern_set_error(err, st, "round %llu: selecting clients: %s",
                              (unsigned long long)t, tern_strategy_last_error(s->strategy));
    if (s->bn) {
        size_t kb = 0;
        st = tern_strategy_configure_fit(s->bn, t, s->selected, k,
                                         s->selected + s->opt.max_sessions, &kb);
        if (st != TERN_OK || kb != k)
            return tern_set_error(err, st ? st : TERN_ERR_STATE,
                                  "round %llu: BatchNorm statistics round: %s",
                                  (unsigned long long)t, tern_strategy_last_error(s->bn));
    }
    s->parts = calloc(k ? k : 1, sizeof *s->parts);
    if (!s->parts)
        return tern_set_error(err, TERN_ERR_NOMEM, "round %llu: %zu participants",
                              (unsigned long long)t, k);
    s->num_parts = k;
    tern_round round;
    if ((st = tern_store_round_create(s->store, (int32_t)k, &round, err)) != TERN_OK ||
        (st = tern_store_round_set_status(s->store, round.number, TERN_ROUND_RUNNING, err)) !=
            TERN_OK) {
        free(s->parts);
        s->parts = NULL;
        s->num_parts = 0;
        return TERN_ERR_IO;
    }
    s->store_round = round.number;
    memset(&s->report, 0, sizeof s->report);
    tern_round_report *r = &s->report;
    r->training_round = t;
    r->store_round = round.number;
    r->available = n;
    r->selected = k;
    r->train_loss = r->train_accuracy = NAN;
    r->client_eval_loss = r->client_eval_accuracy = NAN;
    r->eval_loss = r->eval_accuracy = NAN;
    r->update_norm_mean = NAN;
    r->epsilon = NAN;
    s->round_bytes_in0 = s->stats.bytes_in;
    s->round_bytes_out0 = s->stats.bytes_out;
    memset(s->timers, 0, sizeof s->timers);
    s->round_cpu0 = srv_clock_ns(CLOCK_PROCESS_CPUTIME_ID);
    s->round_thread_cpu0 = srv_clock_ns(CLOCK_THREAD_CPUTIME_ID);
    s->round_started = s->phase_started = s->now;
    s->phase_deadline = s->now + s->opt.round_timeout_ms;
    s->phase = PH_FIT;
    for (size_t i = 0; i < k; i++) {
        srv_part *p = &s->parts[i];
        p->cid = s->selected[i];
        p->loss = p->accuracy = p->norm = NAN;
        for (size_t j = 0; j < n; j++)
            if (s->avail_ids[j] == p->cid)
                p->session = s->avail[j];
        snprintf(p->name, sizeof p->name, "%s", p->session->name);
        snprintf(p->client_id, sizeof p->client_id, "%s", p->session->client_id);
        p->session->part = (int)i;
    }
    srv_log(s, TERN_LOG_INFO, "round %llu (store round %lld): %zu of %zu clients selected",
            (unsigned long long)t, (long long)round.number, k, n);
    if ((st = srv_dp_round_begin(s, err)) != TERN_OK)
        return st;
    for (size_t i = 0; i < k; i++) {
        srv_part *p = &s->parts[i];
        if (p->session && !send_fit_ins(s, p->session, t))
            srv_part_failed(s, p->session, "FIT_INS could not be sent");
    }
    return TERN_OK;
}

void srv_part_failed(tern_server *s, srv_session *ss, const char *why)
{
    if (s->phase == PH_FIT && ss->part >= 0 && (size_t)ss->part < s->num_parts) {
        srv_part *p = &s->parts[ss->part];
        if (p->state == PART_WAITING) {
            p->state = PART_FAILED;
            tern_strategy_add_fit_failure(s->strategy, p->cid);
            if (s->bn)
                tern_strategy_add_fit_failure(s->bn, p->cid);
            srv_log(s, TERN_LOG_WARN, "round %llu: client %s failed: %s",
                    (unsigned long long)s->report.training_round, p->name, why);
        }
        srv_upload_cancel(s, ss);
    }
    if (s->phase == PH_EVALUATE && ss->eval_part >= 0 &&
        (size_t)ss->eval_part < s->num_eval_parts) {
        srv_part *p = &s->eval_parts[ss->eval_part];
        if (p->state == PART_WAITING)
            p->state = PART_FAILED;
    }
}

/* Is msg (a result for round msg->round) late, i.e. for a round that has closed? */
static bool is_late(const tern_server *s, uint32_t round, bool evaluate)
{
    uint64_t t = s->report.training_round;
    if (round == 0)
        return false;
    if (s->phase == PH_WAIT)
        return round <= s->completed + 1;
    if (evaluate)
        return round < t || (round == t && s->phase != PH_EVALUATE);
    return round < t || (round == t && s->phase != PH_FIT);
}

bool srv_fit_result(tern_server *s, srv_session *ss, const tern_msg *msg)
{
    const tern_msg_fit_res *r = &msg->fit_res;
    if (is_late(s, msg->round, false)) {
        s->stats.late_results++;
        srv_refuse(s, ss, TERN_PROTO_E_STALE, msg->seq, "round %u is closed", msg->round);
        return false;
    }
    if (s->phase != PH_FIT || msg->round != wire_round(s) || ss->part < 0) {
        srv_refuse(s, ss, TERN_PROTO_E_UNEXPECTED, msg->seq,
                   "FIT_RES for round %u: this client was not asked", msg->round);
        return false;
    }
    if (!ss->ins_ready) {
        /* Sent before the client received this round's FIT_INS: the answer to an earlier
         * attempt at the same training round (the client has dropped it since). */
        s->stats.late_results++;
        srv_refuse(s, ss, TERN_PROTO_E_STALE, msg->seq,
                   "round %u: this FIT_RES answers an earlier FIT_INS", msg->round);
        return false;
    }
    srv_part *p = &s->parts[ss->part];
    if (p->state != PART_WAITING) {
        if (p->state == PART_FAILED)
            s->stats.late_results++;
        srv_refuse(s, ss, p->state == PART_FAILED ? TERN_PROTO_E_STALE : TERN_PROTO_E_UNEXPECTED,
                   msg->seq, "round %u: this client's result is already %s", msg->round,
                   p->state == PART_FAILED ? "counted as failed" : "in");
        return false;
    }
    if (ss->up != UP_IDLE) {
        srv_refuse(s, ss, TERN_PROTO_E_UNEXPECTED, msg->seq, "an update is already under way");
        return false;
    }
    if (r->model_version != s->blob->version) {
        srv_part_failed(s, ss, "update based on another model version");
        srv_refuse(s, ss, TERN_PROTO_E_STALE, msg->seq,
                   "the update is based on version %llu, round %u sent version %llu",
                   (unsigned long long)r->model_version, msg->round,
                   (unsigned long long)s->blob->version);
        return false;
    }
    if (r->payload.encoding == TERN_PAYLOAD_NONE) {
        srv_part_failed(s, ss, "FIT_RES without an update");
        return true;
    }
    if (r->payload.encoding != TERN_PAYLOAD_SAFETENSORS) {
        srv_part_failed(s, ss, "update in an encoding that was not asked for");
        srv_refuse(s, ss, TERN_PROTO_E_UNSUPPORTED, msg->seq,
                   "update encoding %d was not asked for (safetensors, 1)",
                   (int)r->payload.encoding);
        return false;
    }
    srv_upload_request(s, ss, r);
    return true;
}

static void reject_update(tern_server *s, srv_part *p, bool strategy_knows, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void reject_update(tern_server *s, srv_part *p, bool strategy_knows, const char *fmt, ...)
{
    char why[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    p->state = PART_REJECTED;
    if (!strategy_knows)
        tern_strategy_add_fit_failure(s->strategy, p->cid);
    if (s->bn)
        tern_strategy_add_fit_failure(s->bn, p->cid);
    srv_log(s, TERN_LOG_WARN, "round %llu: update of client %s rejected: %s",
            (unsigned long long)s->report.training_round, p->name, why);
}

static void fold_update(tern_server *s, srv_session *ss, srv_part *p, const void *data,
                        size_t len, int64_t t0);

void srv_layout_clear(srv_layout *l)
{
    free(l->header);
    free(l->offset);
    free(l->param_at);
    memset(l, 0, sizeof *l);
}

/* 8 + the JSON header's length of a safetensors file, or 0 when b cannot be one. */
static size_t safetensors_header_len(const uint8_t *b, size_t len)
{
    if (len < 8)
        return 0;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | b[i];
    return n <= len - 8 ? (size_t)n + 8 : 0;
}

static size_t tensor_bytes(const tern_model_tensor *t)
{
    return t->kind == TERN_TENSOR_COUNTER ? sizeof(int64_t) : t->count * sizeof(float);
}

/* After a full parse of b loaded into the scratch model: record where each tensor's bytes are,
 * from the header's data_offsets, each range checked against the parsed view's bytes. No layout
 * (only the slow path next time) when anything does not agree. */
static void layout_record(tern_server *s, const uint8_t *b, size_t len, const tern_safetensors *sf)
{
    srv_layout *l = &s->layout;
    srv_layout_clear(l);
    size_t hl = safetensors_header_len(b, len), n = tern_model_tensor_count(s->scratch);
    if (!hl)
        return;
    json_t *h = json_loadb((const char *)b + 8, hl - 8, 0, NULL);
    l->offset = malloc((n ? n : 1) * sizeof *l->offset);
    l->param_at = malloc((n ? n : 1) * sizeof *l->param_at);
    l->header = malloc(hl);
    bool ok = h && l->offset && l->param_at && l->header;
    const float *params = tern_model_params(s->scratch);
    for (size_t i = 0; ok && i < n; i++) {
        const tern_model_tensor *t = tern_model_tensor_at(s->scratch, i);
        l->param_at[i] = SIZE_MAX;
        if (t->kind == TERN_TENSOR_PARAM) { /* a view into the flat parameter block */
            if (!(t->data >= params && t->data + t->count <= params + s->num_params)) {
                ok = false;
                break;
            }
            l->param_at[i] = (size_t)(t->data - params);
        }
        json_t *off = json_object_get(json_object_get(h, t->name), "data_offsets");
        json_t *first = json_array_get(off, 0), *last = json_array_get(off, 1);
        tern_tensor_view v;
        size_t nbytes = tensor_bytes(t);
        ok = json_is_integer(first) && json_is_integer(last) &&
             tern_safetensors_find(sf, t->name, &v) == TERN_OK && v.nbytes == nbytes;
        if (!ok)
            break;
        json_int_t begin = json_integer_value(first), end = json_integer_value(last);
        ok = begin >= 0 && end >= begin && (uint64_t)(end - begin) == nbytes &&
             (uint64_t)end <= len - hl && memcmp(b + hl + begin, v.data, nbytes) == 0;
        l->offset[i] = hl + (size_t)begin;
    }
    json_decref(h);
    if (!ok) {
        srv_layout_clear(l);
        return;
    }
    memcpy(l->header, b, hl);
    l->header_len = hl;
    l->total = len;
}

tern_status srv_load_update(tern_server *s, const void *data, size_t len, float *params,
                            tern_error *err)
{
    const uint8_t *b = data;
    const srv_layout *l = &s->layout;
    if (l->header && len == l->total && memcmp(b, l->header, l->header_len) == 0) {
        /* The same header as an update that passed the full parse and the model's checks:
         * the same tensors at the same offsets, so the same bytes would be loaded. */
        for (size_t i = 0; i < tern_model_tensor_count(s->scratch); i++) {
            const tern_model_tensor *t = tern_model_tensor_at(s->scratch, i);
            void *dst = l->param_at[i] != SIZE_MAX ? (void *)(params + l->param_at[i])
                        : t->kind == TERN_TENSOR_COUNTER ? (void *)t->counter
                                                         : (void *)t->data;
            memcpy(dst, b + l->offset[i], tensor_bytes(t));
        }
        tern_model_invalidate(s->scratch);
        return TERN_OK;
    }
    tern_safetensors *sf = NULL;
    tern_status st = tern_safetensors_parse(data, len, NULL, &sf, err);
    if (st == TERN_OK)
        st = tern_model_load_state(s->scratch, sf, "", err);
    if (st == TERN_OK) {
        memcpy(params, tern_model_params(s->scratch), s->num_params * sizeof(float));
        layout_record(s, b, len, sf);
    }
    tern_safetensors_close(&sf);
    return st;
}

void srv_update_ready(tern_server *s, srv_session *ss, const void *data, size_t len)
{
    if (s->phase != PH_FIT || ss->part < 0 || s->parts[ss->part].state != PART_WAITING)
        return;
    srv_part *p = &s->parts[ss->part];
    int64_t t0 = srv_clock_ns(CLOCK_MONOTONIC);
    fold_update(s, ss, p, data, len, t0);
    s->timers[SRV_T_FOLD] += srv_clock_ns(CLOCK_MONOTONIC) - t0;
}

/* Load one verified update into the scratch model and fold it into the strategies; the time
 * from t0 to the end of the load counts as SRV_T_LOAD (the caller counts all as FOLD first). */
static void fold_update(tern_server *s, srv_session *ss, srv_part *p, const void *data,
                        size_t len, int64_t t0)
{
    /* Parameters go to the first free update vector; when all are pending, they are folded in
     * first (one pass over the accumulator for SRV_PENDING updates). */
    if (tern_strategy_pending(s->strategy) == SRV_PENDING)
        tern_strategy_flush(s->strategy);
    float *upd = s->updates + tern_strategy_pending(s->strategy) * s->num_params;
    tern_error e = {{0}};
    tern_status st = srv_load_update(s, data, len, upd, &e);
    int64_t loaded = srv_clock_ns(CLOCK_MONOTONIC) - t0;
    s->timers[SRV_T_LOAD] += loaded;
    s->timers[SRV_T_FOLD] -= loaded;
    if (st != TERN_OK)
        return reject_update(s, p, false, "%s", e.message);

    size_t k = 0;
    for (size_t i = 0; s->bn && i < tern_model_tensor_count(s->scratch); i++) {
        const tern_model_tensor *t = tern_model_tensor_at(s->scratch, i);
        if (t->kind != TERN_TENSOR_BUFFER)
            continue;
        for (size_t j = 0; j < t->count; j++)
            if (!isfinite(t->data[j]))
                return reject_update(s, p, false, "BatchNorm statistic %s[%zu] is not finite",
                                     t->name, j);
        memcpy(s->bn_values + k, t->data, t->count * sizeof(float));
        k += t->count;
    }
    tern_metric metrics[TERN_STRATEGY_MAX_METRICS];
    size_t nm = 0;
    for (uint32_t i = 0; i < ss->up_metrics.count && nm < TERN_STRATEGY_MAX_METRICS; i++)
        metrics[nm++] = (tern_metric){ss->up_metrics.entries[i].key,
                                      ss->up_metrics.entries[i].value};
    char why[256];
    if (!srv_dp_check_result(s, (size_t)(p - s->parts), &ss->up_metrics, why, sizeof why))
        return reject_update(s, p, false, "%s", why);
    tern_fit_result fr = {.client_id = p->cid, .update = upd, .num_params = s->num_params,
                          .num_examples = ss->up_examples, .metrics = metrics,
                          .num_metrics = nm};
    st = tern_strategy_add_fit_result_deferred(s->strategy, &fr);
    if (st != TERN_OK)
        return reject_update(s, p, true, "%s", tern_strategy_last_error(s->strategy));
    srv_dp_accepted(s, upd);
    if (s->bn) {
        tern_fit_result br = {.client_id = p->cid, .update = s->bn_values,
                              .num_params = s->num_bn, .num_examples = ss->up_examples};
        if (tern_strategy_add_fit_result(s->bn, &br) != TERN_OK)
            srv_log(s, TERN_LOG_ERROR,
                    "round %llu: client %s: BatchNorm statistics refused (%s); its parameters "
                    "are counted, its statistics are not",
                    (unsigned long long)s->report.training_round, p->name,
                    tern_strategy_last_error(s->bn));
    }
    p->state = PART_OK;
    p->examples = ss->up_examples;
    p->norm = tern_strategy_last_update_norm(s->strategy);
    double v;
    if (tern_metrics_get(&ss->up_metrics, "loss", &v) == TERN_OK)
        p->loss = v;
    if (tern_metrics_get(&ss->up_metrics, "accuracy", &v) == TERN_OK)
        p->accuracy = v;
    srv_log(s, TERN_LOG_DEBUG, "round %llu: update of client %s accepted (%llu examples, "
            "norm %.4g)", (unsigned long long)s->report.training_round, p->name,
            (unsigned long long)p->examples, p->norm);
}

/* ---- AGGREGATE, EVALUATE, COMMIT ------------------------------------------------------------ */

static void write_global(tern_server *s)
{
    memcpy(tern_model_params(s->model), tern_strategy_global(s->strategy),
           s->num_params * sizeof(float));
    if (s->bn) {
        const float *g = tern_strategy_global(s->bn);
        size_t k = 0;
        for (size_t i = 0; i < tern_model_tensor_count(s->model); i++) {
            const tern_model_tensor *t = tern_model_tensor_at(s->model, i);
            if (t->kind != TERN_TENSOR_BUFFER)
                continue;
            memcpy(t->data, g + k, t->count * sizeof(float));
            k += t->count;
        }
    }
    tern_model_invalidate(s->model);
}

static bool send_evaluate_ins(tern_server *s, srv_session *ss)
{
    tern_msg *m = calloc(1, sizeof *m);
    if (!m)
        return false;
    m->type = TERN_MSG_EVALUATE_INS;
    m->round = wire_round(s);
    m->evaluate_ins.model_version = s->next_blob->version;
    m->evaluate_ins.config = s->opt.evaluate_config;
    bool ok = tern_config_set_int(&m->evaluate_ins.config, "round", (int64_t)wire_round(s)) ==
                  TERN_OK &&
              tern_config_set_bool(&m->evaluate_ins.config, "fedbn", s->opt.fedbn) == TERN_OK;
    if (ok) {
        srv_download_prepare(s, ss, s->next_blob, wire_round(s), &m->evaluate_ins.payload);
        ok = srv_send_instruction(s, ss, m);
    }
    free(m);
    return ok;
}

static tern_status start_evaluate(tern_server *s, tern_error *err)
{
    s->phase_started = s->now;
    if (s->opt.strategy.fraction_evaluate > 0) {
        size_t n = gather_available(s), k = 0;
        tern_status st = tern_strategy_configure_evaluate(s->strategy, s->report.training_round,
                                                          s->avail_ids, n, s->selected, &k);
        if (st == TERN_OK && k > 0) {
            s->eval_parts = calloc(k, sizeof *s->eval_parts);
            if (!s->eval_parts)
                return tern_set_error(err, TERN_ERR_NOMEM, "evaluation of %zu clients", k);
            s->num_eval_parts = k;
            for (size_t i = 0; i < k; i++) {
                srv_part *p = &s->eval_parts[i];
                p->cid = s->selected[i];
                for (size_t j = 0; j < n; j++)
                    if (s->avail_ids[j] == p->cid)
                        p->session = s->avail[j];
                snprintf(p->name, sizeof p->name, "%s", p->session->name);
                p->session->eval_part = (int)i;
            }
            for (size_t i = 0; i < k; i++)
                if (s->eval_parts[i].session &&
                    !send_evaluate_ins(s, s->eval_parts[i].session))
                    s->eval_parts[i].state = PART_FAILED;
        } else if (st != TERN_OK) {
            srv_log(s, TERN_LOG_INFO, "round %llu: no client evaluation (%s)",
                    (unsigned long long)s->report.training_round,
                    tern_strategy_last_error(s->strategy));
        }
    }
    if (s->opt.evaluate) {
        double loss = NAN, acc = NAN;
        uint64_t n = 0;
        tern_error e = {{0}};
        tern_status st = s->opt.evaluate(s->opt.evaluate_user, s->model, &loss, &acc, &n, &e);
        if (st == TERN_OK) {
            s->report.eval_loss = loss;
            s->report.eval_accuracy = acc;
        } else {
            srv_log(s, TERN_LOG_WARN, "round %llu: server-side evaluation failed: %s",
                    (unsigned long long)s->report.training_round, e.message);
        }
        s->now = zclock_mono();
    }
    s->phase = PH_EVALUATE;
    s->phase_deadline = s->now + s->opt.round_timeout_ms;
    return TERN_OK;
}

bool srv_evaluate_result(tern_server *s, srv_session *ss, const tern_msg *msg)
{
    const tern_msg_evaluate_res *r = &msg->evaluate_res;
    if (is_late(s, msg->round, true)) {
        s->stats.late_results++;
        srv_refuse(s, ss, TERN_PROTO_E_STALE, msg->seq, "evaluation of round %u is closed",
                   msg->round);
        return false;
    }
    if (s->phase != PH_EVALUATE || msg->round != wire_round(s) || ss->eval_part < 0 ||
        s->eval_parts[ss->eval_part].state != PART_WAITING) {
        srv_refuse(s, ss, TERN_PROTO_E_UNEXPECTED, msg->seq,
                   "EVALUATE_RES for round %u: not asked (or already answered)", msg->round);
        return false;
    }
    srv_part *p = &s->eval_parts[ss->eval_part];
    if (!ss->ins_ready) {
        s->stats.late_results++;
        srv_refuse(s, ss, TERN_PROTO_E_STALE, msg->seq,
                   "round %u: this EVALUATE_RES answers an earlier EVALUATE_INS", msg->round);
        return false;
    }
    if (r->model_version != s->next_blob->version) {
        p->state = PART_FAILED;
        srv_refuse(s, ss, TERN_PROTO_E_STALE, msg->seq, "evaluated version %llu, not %llu",
                   (unsigned long long)r->model_version,
                   (unsigned long long)s->next_blob->version);
        return false;
    }
    double acc = NAN;
    bool has_acc = tern_metrics_get(&r->metrics, "accuracy", &acc) == TERN_OK;
    tern_evaluate_result er = {.client_id = p->cid, .num_examples = r->num_examples,
                               .loss = r->loss, .accuracy = has_acc ? acc : 0.0,
                               .has_accuracy = has_acc};
    if (tern_strategy_add_evaluate_result(s->strategy, &er) != TERN_OK) {
        p->state = PART_REJECTED;
        srv_log(s, TERN_LOG_WARN, "round %llu: evaluation of client %s refused: %s",
                (unsigned long long)s->report.training_round, p->name,
                tern_strategy_last_error(s->strategy));
        return true;
    }
    p->state = PART_OK;
    return true;
}

static tern_status aggregate(tern_server *s, tern_error *err)
{
    close_fit(s);
    s->report.fit_seconds = seconds_since(s, s->round_started);
    if (tern_store_round_set_status(s->store, s->store_round, TERN_ROUND_AGGREGATING, err) !=
        TERN_OK)
        return TERN_ERR_IO;
    tern_fit_summary sum;
    memset(&sum, 0, sizeof sum);
    int64_t t0 = srv_clock_ns(CLOCK_MONOTONIC);
    if (srv_dp_central(s)) {
        /* The strategy's mean only gives the metrics (there may be no result at all); the
         * noised mean of the clipped changes is the new global. */
        if (s->num_parts > 0 && tern_strategy_aggregate_fit(s->strategy, &sum) != TERN_OK)
            memset(&sum, 0, sizeof sum);
        tern_status dst = srv_dp_aggregate(s, err);
        if (dst != TERN_OK)
            return dst;
    } else if (tern_strategy_aggregate_fit(s->strategy, &sum) != TERN_OK) {
        char reason[256];
        snprintf(reason, sizeof reason, "aggregation: %s", tern_strategy_last_error(s->strategy));
        return fail_round(s, reason, err);
    }
    if (s->bn && tern_strategy_aggregate_fit(s->bn, NULL) != TERN_OK)
        srv_log(s, TERN_LOG_ERROR, "round %llu: BatchNorm statistics not aggregated: %s",
                (unsigned long long)s->report.training_round, tern_strategy_last_error(s->bn));
    write_global(s);
    if (s->opt.calibrate) {
        tern_error e = {{0}};
        if (s->opt.calibrate(s->opt.calibrate_user, s->model, &e) != TERN_OK)
            srv_log(s, TERN_LOG_ERROR, "round %llu: BatchNorm statistics not re-estimated: %s",
                    (unsigned long long)s->report.training_round, e.message);
    }
    int64_t t1 = srv_clock_ns(CLOCK_MONOTONIC);
    s->timers[SRV_T_AGGREGATE] += t1 - t0;
    s->report.num_examples = sum.num_examples;
    for (size_t i = 0; i < sum.num_metrics; i++) {
        if (strcmp(sum.metric_names[i], "loss") == 0)
            s->report.train_loss = sum.metric_values[i];
        else if (strcmp(sum.metric_names[i], "accuracy") == 0)
            s->report.train_accuracy = sum.metric_values[i];
    }
    double norms = 0.0;
    size_t ok = 0;
    for (size_t i = 0; i < s->num_parts; i++)
        if (s->parts[i].state == PART_OK) {
            norms += s->parts[i].norm;
            ok++;
        }
    s->report.update_norm_mean = ok ? norms / (double)ok : NAN;
    tern_status st = srv_blob_make(s, s->completed + 1, &s->next_blob, err);
    s->timers[SRV_T_SERIALIZE] += srv_clock_ns(CLOCK_MONOTONIC) - t1;
    if (st != TERN_OK)
        return st;
    s->now = zclock_mono();
    return start_evaluate(s, err);
}

static double first_finite(double a, double b, double c)
{
    return isfinite(a) ? a : isfinite(b) ? b : isfinite(c) ? c : 0.0;
}

static tern_status commit(tern_server *s, tern_error *err)
{
    tern_round_report *r = &s->report;
    r->eval_seconds = seconds_since(s, s->phase_started);
    int64_t t0 = srv_clock_ns(CLOCK_MONOTONIC);
    double acc = isfinite(r->eval_accuracy) ? r->eval_accuracy : r->client_eval_accuracy;
    s->completed++;
    if (isfinite(acc)) {
        if (acc > s->best_accuracy) {
            s->best_accuracy = acc;
            s->since_best = 0;
        } else {
            s->since_best++;
        }
    }
    r->completed = true;
    finish_report(s);
    void *state = NULL;
    size_t state_len = 0;
    const tern_privacy_charge *charges = NULL;
    size_t ncharges = 0;
    tern_status st = srv_dp_commit_charges(s, &charges, &ncharges, err);
    if (st != TERN_OK) {
        srv_log(s, TERN_LOG_ERROR, "round %llu: privacy accounting failed: %s",
                (unsigned long long)r->training_round, err ? err->message : "");
        return TERN_ERR_IO;
    }
    tern_client_metrics *m = client_metrics(s);
    char *json = report_json(r);
    st = srv_state_serialize(s, &state, &state_len, err);
    if (st == TERN_OK && (!m || !json))
        st = tern_set_error(err, TERN_ERR_NOMEM, "committing round %lld",
                            (long long)s->store_round);
    char notes[64];
    snprintf(notes, sizeof notes, "training round %llu", (unsigned long long)r->training_round);
    tern_model_version version;
    if (st == TERN_OK) {
        tern_round_commit c = {
            .round = s->store_round,
            .clients_selected = (int32_t)r->selected,
            .clients_participated = (int32_t)r->succeeded,
            .global_accuracy = first_finite(r->eval_accuracy, r->client_eval_accuracy,
                                            r->train_accuracy),
            .global_loss = first_finite(r->eval_loss, r->client_eval_loss, r->train_loss),
            .client_metrics = m,
            .client_metrics_count = s->num_parts,
            .model = s->next_blob->bytes,
            .model_size = s->next_blob->len,
            .model_sha256 = s->next_blob->info.sha256, /* hashed when it was made */
            .settings = s->opt.settings,
            .classes = s->opt.classes,
            .notes = notes,
            .server_state = state,
            .server_state_size = state_len,
            .report_json = json,
            .privacy = charges,
            .privacy_count = ncharges,
        };
        st = tern_store_commit_round(s->store, &c, NULL, &version, err);
    }
    free(state);
    free(m);
    free(json);
    if (st != TERN_OK)
        return TERN_ERR_IO;
    s->now = zclock_mono();
    r->commit_seconds = (double)(srv_clock_ns(CLOCK_MONOTONIC) - t0) * 1e-9;
    r->round_seconds = seconds_since(s, s->round_started);
    fill_timing(s);
    snprintf(r->model_version, sizeof r->model_version, "%s", version.version);
    srv_blob_free(s, &s->blob);
    s->blob = s->next_blob;
    s->next_blob = NULL;
    srv_log(s, TERN_LOG_INFO,
            "round %llu committed as version %s: %zu of %zu succeeded, %llu examples",
            (unsigned long long)r->training_round, r->model_version, r->succeeded, r->selected,
            (unsigned long long)r->num_examples);
    end_round(s);
    if (s->completed >= s->opt.rounds) {
        s->finished = true;
        srv_log(s, TERN_LOG_INFO, "round limit reached (%u)", s->opt.rounds);
    } else if (s->opt.patience && s->since_best >= s->opt.patience) {
        s->finished = true;
        srv_log(s, TERN_LOG_INFO, "converged: %llu rounds without improvement",
                (unsigned long long)s->since_best);
    }
    return TERN_OK;
}

static tern_status finish_evaluate(tern_server *s, tern_error *err)
{
    if (s->num_eval_parts > 0) {
        for (size_t i = 0; i < s->num_eval_parts; i++)
            if (s->eval_parts[i].state == PART_WAITING)
                s->eval_parts[i].state = PART_FAILED;
        tern_evaluate_summary sum;
        if (tern_strategy_aggregate_evaluate(s->strategy, &sum) == TERN_OK) {
            s->report.client_eval_loss = sum.loss;
            s->report.client_eval_accuracy = sum.accuracy;
            s->report.client_eval_count = sum.num_results;
        }
    }
    close_eval(s);
    return commit(s, err);
}

tern_status srv_commit_initial(tern_server *s, tern_error *err)
{
    void *state = NULL;
    size_t len = 0;
    tern_status st = srv_state_serialize(s, &state, &len, err);
    if (st != TERN_OK)
        return st;
    tern_round_commit c = {
        .round = 0,
        .model = s->blob->bytes,
        .model_size = s->blob->len,
        .settings = s->opt.settings,
        .classes = s->opt.classes,
        .notes = "initial model",
        .server_state = state,
        .server_state_size = len,
    };
    tern_model_version v;
    st = tern_store_commit_round(s->store, &c, NULL, &v, err);
    free(state);
    if (st == TERN_OK)
        srv_log(s, TERN_LOG_INFO, "initial model committed as version %s", v.version);
    return st;
}

tern_status srv_version_of_round(tern_server *s, uint64_t t,
                                 char version[TERN_STORE_VERSION_SIZE], tern_error *err)
{
    tern_round *rounds = NULL;
    size_t n = 0;
    tern_status st = tern_store_round_list_by_status(s->store, TERN_ROUND_COMPLETED, &rounds, &n,
                                                     err);
    if (st != TERN_OK)
        return st;
    st = tern_set_error(err, TERN_ERR_NOT_FOUND, "no committed version of training round %llu",
                        (unsigned long long)t);
    for (size_t i = n; i-- > 0;) { /* the latest first: a run started over repeats numbers */
        char *text = NULL;
        if (!rounds[i].model_version[0] ||
            tern_store_round_report(s->store, rounds[i].number, &text, NULL) != TERN_OK)
            continue;
        json_t *o = json_loads(text, 0, NULL);
        tern_store_free(s->store, text);
        json_t *tr = o ? json_object_get(o, "training_round") : NULL;
        bool match = json_is_integer(tr) && (uint64_t)json_integer_value(tr) == t;
        json_decref(o);
        if (match) {
            snprintf(version, TERN_STORE_VERSION_SIZE, "%s", rounds[i].model_version);
            st = TERN_OK;
            break;
        }
    }
    tern_store_free(s->store, rounds);
    return st;
}

/* ---- the machine ------------------------------------------------------------------------------ */

int64_t srv_round_deadline(const tern_server *s)
{
    if (s->phase != PH_WAIT)
        return s->phase_deadline;
    if (s->opt.wait_timeout_ms)
        return s->wait_started + s->opt.wait_timeout_ms;
    return INT64_MAX;
}

static tern_status step_fit(tern_server *s, tern_error *err)
{
    bool timeout = s->now >= s->phase_deadline;
    for (size_t i = 0; timeout && i < s->num_parts; i++) {
        srv_part *p = &s->parts[i];
        if (p->state == PART_WAITING && p->session) {
            srv_part_failed(s, p->session, "round timeout");
        } else if (p->state == PART_WAITING) {
            p->state = PART_FAILED;
            tern_strategy_add_fit_failure(s->strategy, p->cid);
        }
    }
    size_t ok, failed, rejected, waiting;
    count_parts(s, &ok, &failed, &rejected, &waiting);
    size_t k = s->num_parts;
    if (k == 0 && srv_dp_central(s))
        return aggregate(s, err);
    size_t need = k;
    if (s->opt.policy == TERN_POLICY_TOLERANT) {
        need = (size_t)ceil(s->opt.min_completion * (double)k - 1e-9);
        if (need < 1)
            need = 1;
    }
    char reason[160];
    if (s->opt.policy == TERN_POLICY_STRICT && failed + rejected > 0) {
        snprintf(reason, sizeof reason, "strict policy: %zu client%s failed%s", failed + rejected,
                 failed + rejected == 1 ? "" : "s", timeout ? " (round timeout)" : "");
        return fail_round(s, reason, err);
    }
    if (ok + waiting < need) {
        snprintf(reason, sizeof reason,
                 "only %zu of %zu selected clients can still succeed, %zu needed%s", ok + waiting,
                 k, need, timeout ? " (round timeout)" : "");
        return fail_round(s, reason, err);
    }
    if (waiting == 0)
        return aggregate(s, err);
    return TERN_OK;
}

static tern_status step_evaluate(tern_server *s, tern_error *err)
{
    if (s->now >= s->phase_deadline)
        return finish_evaluate(s, err);
    for (size_t i = 0; i < s->num_eval_parts; i++)
        if (s->eval_parts[i].state == PART_WAITING && s->eval_parts[i].session)
            return TERN_OK;
    return finish_evaluate(s, err);
}

tern_status srv_round_step(tern_server *s, tern_error *err)
{
    switch (s->phase) {
    case PH_WAIT:
        if (s->finished)
            return TERN_OK;
        if (s->opt.wait_timeout_ms && s->now - s->wait_started > (int64_t)s->opt.wait_timeout_ms) {
            size_t n = gather_available(s);
            return tern_set_error(err, TERN_ERR_STATE,
                                  "waited %u ms for clients: %zu available, the strategy needs "
                                  "at least %zu",
                                  s->opt.wait_timeout_ms, n, s->opt.strategy.min_available_clients);
        }
        return start_fit(s, err);
    case PH_FIT:
        return step_fit(s, err);
    case PH_EVALUATE:
        return step_evaluate(s, err);
    }
    return TERN_OK;
}
