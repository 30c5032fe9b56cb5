/* Server sessions: frames in and out of the ROUTER socket, HELLO and authentication, liveness,
 * and payload transfers under receiver credit (docs/federation.md).
 *
 * Every frame is decoded with the server's limits and checked against its session's sequence
 * tracker before anything acts on it; refusals are counted and answered (never an ERROR or a
 * GOODBYE). Downloads borrow the one serialized model (srv_blob) and stream to at most
 * max_downloads sessions at a time; uploads get credit only while one of max_uploads slots is
 * theirs, so update memory is bounded whatever the number of clients. */
#include "fl/server_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "nn/util.h"

/* ---- sending ----------------------------------------------------------------------------- */

static bool send_to_timed(tern_server *s, zframe_t *rid, const tern_msg *msg);

static bool send_to(tern_server *s, zframe_t *rid, const tern_msg *msg)
{
    int64_t t0 = srv_clock_ns(CLOCK_MONOTONIC);
    bool ok = send_to_timed(s, rid, msg);
    s->timers[SRV_T_SEND] += srv_clock_ns(CLOCK_MONOTONIC) - t0;
    return ok;
}

/* The message is encoded straight into the ZeroMQ message that goes out (one copy of a model
 * chunk's bytes, which libzmq then owns), after the routing id. */
static bool send_to_timed(tern_server *s, zframe_t *rid, const tern_msg *msg)
{
    size_t len = 0;
    tern_error e = {{0}};
    tern_status st = tern_msg_encoded_size(msg, &s->limits, &len, &e);
    zmq_msg_t body;
    if (st == TERN_OK && zmq_msg_init_size(&body, len) != 0)
        st = tern_set_error(&e, TERN_ERR_NOMEM, "no memory for %zu bytes", len);
    else if (st == TERN_OK &&
             (st = tern_msg_encode_into(msg, &s->limits, zmq_msg_data(&body), len, &len, &e)) !=
                 TERN_OK)
        zmq_msg_close(&body);
    if (st != TERN_OK) {
        srv_log(s, TERN_LOG_ERROR, "cannot encode %s: %s", tern_msg_type_name(msg->type),
                e.message);
        return false;
    }
    void *raw = zsock_resolve(s->sock);
    bool ok = zmq_send(raw, zframe_data(rid), zframe_size(rid), ZMQ_SNDMORE) >= 0 &&
              zmq_msg_send(&body, raw, 0) >= 0;
    if (!ok) {
        zmq_msg_close(&body); /* still ours when the send failed */
        srv_log(s, TERN_LOG_WARN, "cannot send %s (%s)", tern_msg_type_name(msg->type),
                zmq_strerror(zmq_errno()));
        return false;
    }
    s->stats.bytes_out += len;
    return true;
}

bool srv_send(tern_server *s, srv_session *ss, tern_msg *msg)
{
    msg->seq = tern_seq_next(&ss->seq_out);
    return send_to(s, ss->rid, msg);
}

/* A reply on a connection without a session. */
static void send_orphan(tern_server *s, zframe_t *rid, tern_msg *msg)
{
    msg->seq = tern_seq_next(&s->orphan_seq);
    send_to(s, rid, msg);
}

static bool counts_as_misbehaviour(tern_proto_code code)
{
    return code != TERN_PROTO_E_AUTH && code != TERN_PROTO_E_BUSY &&
           code != TERN_PROTO_E_STALE && code != TERN_PROTO_E_INTERNAL &&
           code != TERN_PROTO_E_NO_SESSION;
}

static bool refuse_v(tern_server *s, srv_session *ss, zframe_t *rid, bool reply,
                     tern_proto_code code, uint64_t in_reply_to, const char *fmt, va_list ap)
{
    char text[TERN_PROTO_MAX_TEXT + 1];
    vsnprintf(text, sizeof text, fmt, ap);
    tern_proto_count(&s->stats.messages, code);
    srv_log(s, TERN_LOG_DEBUG, "%s%s: refused (%s): %s", ss ? "client " : "connection",
            ss ? ss->name : "", tern_proto_code_name(code), text);
    tern_msg m;
    if (reply) {
        tern_msg_make_error(&m, code, in_reply_to, "%s", text);
        if (ss)
            srv_send(s, ss, &m);
        else
            send_orphan(s, rid, &m);
    }
    if (code == TERN_PROTO_E_VERSION) { /* docs/protocol.md: ERROR version, then GOODBYE */
        if (ss) {
            srv_session_close(s, ss, true, TERN_GOODBYE_ERROR, "protocol version mismatch");
        } else if (reply) {
            memset(&m, 0, sizeof m);
            m.type = TERN_MSG_GOODBYE;
            m.goodbye.reason = TERN_GOODBYE_ERROR;
            snprintf(m.goodbye.message, sizeof m.goodbye.message, "protocol version mismatch");
            send_orphan(s, rid, &m);
        }
        return !ss;
    }
    if (ss && counts_as_misbehaviour(code) && ++ss->errors >= s->opt.max_errors) {
        srv_session_close(s, ss, true, TERN_GOODBYE_ERROR, "%u refused messages",
                          (unsigned)ss->errors);
        return false;
    }
    return true;
}

bool srv_refuse(tern_server *s, srv_session *ss, tern_proto_code code, uint64_t in_reply_to,
                const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    bool open = refuse_v(s, ss, ss->rid, true, code, in_reply_to, fmt, ap);
    va_end(ap);
    return open;
}

static void refuse_at(tern_server *s, srv_session *ss, zframe_t *rid, bool reply,
                      tern_proto_code code, uint64_t in_reply_to, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));
static void refuse_at(tern_server *s, srv_session *ss, zframe_t *rid, bool reply,
                      tern_proto_code code, uint64_t in_reply_to, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    refuse_v(s, ss, rid, reply, code, in_reply_to, fmt, ap);
    va_end(ap);
}

/* ---- session table ------------------------------------------------------------------------- */

static srv_session *find_session(tern_server *s, zframe_t *rid)
{
    for (size_t i = 0; i < s->opt.max_sessions; i++)
        if (s->sessions[i] && zframe_eq(s->sessions[i]->rid, rid))
            return s->sessions[i];
    return NULL;
}

srv_session *srv_session_by_name(tern_server *s, const char *name)
{
    for (size_t i = 0; i < s->opt.max_sessions; i++)
        if (s->sessions[i] && strcmp(s->sessions[i]->name, name) == 0)
            return s->sessions[i];
    return NULL;
}

static bool alive(const tern_server *s, const srv_session *ss)
{
    return s->now - ss->last_heard <=
           (int64_t)s->opt.heartbeat_ms * (int64_t)s->opt.heartbeat_patience;
}

size_t srv_available(tern_server *s, srv_session **out, size_t cap)
{
    size_t n = 0;
    for (size_t i = 0; i < s->opt.max_sessions && n < cap; i++)
        if (s->sessions[i] && alive(s, s->sessions[i]))
            out[n++] = s->sessions[i];
    return n;
}

void srv_session_close(tern_server *s, srv_session *ss, bool send, tern_goodbye_reason reason,
                       const char *fmt, ...)
{
    char why[TERN_PROTO_MAX_TEXT + 1];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    if (send) {
        tern_msg m = {.type = TERN_MSG_GOODBYE};
        m.goodbye.reason = reason;
        snprintf(m.goodbye.message, sizeof m.goodbye.message, "%s", why);
        srv_send(s, ss, &m);
    }
    srv_log(s, TERN_LOG_INFO, "client %s: session closed (%s)", ss->name, why);
    srv_part_failed(s, ss, why);
    srv_download_cancel(s, ss);
    srv_upload_cancel(s, ss);
    if (ss->part >= 0 && (size_t)ss->part < s->num_parts)
        s->parts[ss->part].session = NULL;
    if (ss->eval_part >= 0 && (size_t)ss->eval_part < s->num_eval_parts)
        s->eval_parts[ss->eval_part].session = NULL;
    if (ss->seq_out > s->orphan_seq)
        s->orphan_seq = ss->seq_out;
    for (size_t i = 0; i < s->opt.max_sessions; i++)
        if (s->sessions[i] == ss) {
            s->sessions[i] = NULL;
            s->num_sessions--;
        }
    zframe_destroy(&ss->rid);
    free(ss);
}

void srv_send_goodbye_all(tern_server *s, tern_goodbye_reason reason, const char *message)
{
    for (size_t i = 0; i < s->opt.max_sessions; i++)
        if (s->sessions[i])
            srv_session_close(s, s->sessions[i], true, reason, "%s", message);
}

/* ---- HELLO ----------------------------------------------------------------------------------- */

static void reject_hello(tern_server *s, zframe_t *rid, const tern_msg *hello, const char *why)
{
    s->stats.hellos_refused++;
    tern_proto_count(&s->stats.messages, TERN_PROTO_E_AUTH);
    srv_log(s, TERN_LOG_WARN, "HELLO from '%s' refused: %s", hello->hello.client_name, why);
    tern_msg m;
    tern_msg_make_error(&m, TERN_PROTO_E_AUTH, hello->seq, "%s", why);
    send_orphan(s, rid, &m);
    memset(&m, 0, sizeof m);
    m.type = TERN_MSG_GOODBYE;
    m.goodbye.reason = TERN_GOODBYE_REJECTED;
    snprintf(m.goodbye.message, sizeof m.goodbye.message, "%s", why);
    send_orphan(s, rid, &m);
}

static srv_key_cache *key_cache_find(tern_server *s, const char *name)
{
    for (size_t i = 0; i < s->num_keys; i++)
        if (strcmp(s->keys[i].name, name) == 0)
            return &s->keys[i];
    return NULL;
}

/* Check the API key against the stored hash; PBKDF2 only when the cache cannot answer. */
static tern_status check_key(tern_server *s, const tern_client_record *rec, const char *key,
                             bool *ok)
{
    uint8_t sha[32];
    unsigned int mdlen = 0;
    if (EVP_Digest(key, strlen(key), sha, &mdlen, EVP_sha256(), NULL) != 1 || mdlen != 32)
        return TERN_ERR_IO;
    srv_key_cache *c = key_cache_find(s, rec->name);
    if (c && strcmp(c->hash, rec->api_key_hash) == 0 && CRYPTO_memcmp(c->sha, sha, 32) == 0) {
        *ok = true;
        return TERN_OK;
    }
    tern_error e = {{0}};
    tern_status st = tern_store_verify_api_key(key, rec->api_key_hash, ok, &e);
    if (st != TERN_OK) {
        srv_log(s, TERN_LOG_ERROR, "client %s: cannot verify the API key: %s", rec->name,
                e.message);
        return st;
    }
    if (!*ok)
        return TERN_OK;
    if (!c) {
        if (s->num_keys == s->cap_keys) {
            size_t cap = s->cap_keys ? 2 * s->cap_keys : 16;
            srv_key_cache *k = realloc(s->keys, cap * sizeof *k);
            if (!k)
                return TERN_OK; /* verified; only the cache is lost */
            s->keys = k;
            s->cap_keys = cap;
        }
        c = &s->keys[s->num_keys++];
    }
    snprintf(c->name, sizeof c->name, "%s", rec->name);
    snprintf(c->hash, sizeof c->hash, "%s", rec->api_key_hash);
    memcpy(c->sha, sha, 32);
    return TERN_OK;
}

static void handle_hello(tern_server *s, zframe_t *rid, const tern_msg *msg)
{
    const tern_msg_hello *h = &msg->hello;
    tern_client_record rec;
    tern_error e = {{0}};
    tern_status st = tern_store_client_get_by_name(s->store, h->client_name, &rec, &e);
    if (st == TERN_ERR_NOT_FOUND)
        return reject_hello(s, rid, msg, "unknown client");
    if (st != TERN_OK) {
        srv_log(s, TERN_LOG_ERROR, "HELLO from '%s': store: %s", h->client_name, e.message);
        tern_msg m;
        tern_msg_make_error(&m, TERN_PROTO_E_INTERNAL, msg->seq, "server store failure");
        tern_proto_count(&s->stats.messages, TERN_PROTO_E_INTERNAL);
        return send_orphan(s, rid, &m);
    }
    if (rec.blacklisted)
        return reject_hello(s, rid, msg, "client is blacklisted");
    if (!rec.active)
        return reject_hello(s, rid, msg, "client is deactivated");
    bool ok = false;
    if (check_key(s, &rec, h->api_key, &ok) != TERN_OK) {
        tern_msg m;
        tern_msg_make_error(&m, TERN_PROTO_E_INTERNAL, msg->seq, "cannot verify the API key");
        tern_proto_count(&s->stats.messages, TERN_PROTO_E_INTERNAL);
        return send_orphan(s, rid, &m);
    }
    if (!ok)
        return reject_hello(s, rid, msg, "wrong API key");

    srv_session *old = srv_session_by_name(s, h->client_name);
    if (old)
        srv_session_close(s, old, true, TERN_GOODBYE_ERROR, "replaced by a new connection");
    if (s->num_sessions >= s->opt.max_sessions) {
        tern_msg m;
        tern_msg_make_error(&m, TERN_PROTO_E_BUSY, msg->seq, "server full (%u sessions)",
                            s->opt.max_sessions);
        tern_proto_count(&s->stats.messages, TERN_PROTO_E_BUSY);
        return send_orphan(s, rid, &m);
    }
    srv_session *ss = calloc(1, sizeof *ss);
    zframe_t *r = ss ? zframe_dup(rid) : NULL;
    if (!r) {
        free(ss);
        srv_log(s, TERN_LOG_ERROR, "HELLO from '%s': out of memory", h->client_name);
        tern_msg m;
        tern_msg_make_error(&m, TERN_PROTO_E_INTERNAL, msg->seq, "server out of memory");
        tern_proto_count(&s->stats.messages, TERN_PROTO_E_INTERNAL);
        return send_orphan(s, rid, &m);
    }
    ss->rid = r;
    ss->session_id = s->next_session_id++;
    snprintf(ss->name, sizeof ss->name, "%s", h->client_name);
    snprintf(ss->client_id, sizeof ss->client_id, "%s", rec.id);
    ss->cid = srv_name_hash(ss->name);
    tern_seq_check(&ss->seq_in, msg->seq);
    ss->seq_out = s->orphan_seq;
    ss->last_heard = s->now;
    ss->next_heartbeat = s->now + s->opt.heartbeat_ms;
    ss->part = ss->eval_part = -1;
    for (size_t i = 0; i < s->opt.max_sessions; i++)
        if (!s->sessions[i]) {
            s->sessions[i] = ss;
            break;
        }
    s->num_sessions++;
    tern_proto_count(&s->stats.messages, TERN_PROTO_OK);
    if (tern_store_client_touch(s->store, rec.id, &e) != TERN_OK)
        srv_log(s, TERN_LOG_WARN, "client %s: cannot record last_seen: %s", ss->name, e.message);

    tern_msg m = {.type = TERN_MSG_WELCOME};
    m.welcome.session_id = ss->session_id;
    snprintf(m.welcome.server_version, sizeof m.welcome.server_version, "tern-server 0.1");
    m.welcome.capabilities = h->capabilities & 0u; /* the server offers no optional feature yet */
    m.welcome.heartbeat_ms = s->opt.heartbeat_ms;
    m.welcome.max_message_size = s->limits.max_message_size;
    m.welcome.chunk_size = s->opt.chunk_size;
    srv_send(s, ss, &m);
    srv_log(s, TERN_LOG_INFO, "client %s: session %llu opened (%zu sessions)", ss->name,
            (unsigned long long)ss->session_id, s->num_sessions);
}

/* ---- downloads ------------------------------------------------------------------------------ */

void srv_download_prepare(tern_server *s, srv_session *ss, srv_blob *blob, uint32_t round,
                          tern_payload_info *info)
{
    srv_download_cancel(s, ss);
    *info = blob->info;
    info->transfer_id = ++ss->next_transfer_id;
    tern_send_window_start(&ss->dl_win, info);
    ss->dl_blob = blob;
    blob->refs++;
    ss->dl_round = round;
    ss->dl = DL_QUEUED;
    ss->dl_ticket = ++s->next_ticket;
}

bool srv_send_instruction(tern_server *s, srv_session *ss, tern_msg *msg)
{
    const tern_payload_info *p = msg->type == TERN_MSG_FIT_INS ? &msg->fit_ins.payload
                                                               : &msg->evaluate_ins.payload;
    ss->ins_ready = false;
    ss->ins_tid = p->transfer_id;
    if (!srv_send(s, ss, msg))
        return false;
    ss->ins_seq = msg->seq;
    return true;
}

void srv_download_cancel(tern_server *s, srv_session *ss)
{
    if (ss->dl == DL_ACTIVE)
        s->active_downloads--;
    ss->dl = DL_IDLE;
    srv_blob *b = ss->dl_blob;
    ss->dl_blob = NULL;
    if (b) {
        b->refs--;
        srv_blob_unref(b);
    }
}

static bool handle_chunk_ack(tern_server *s, srv_session *ss, const tern_msg *msg)
{
    const tern_msg_chunk_ack *a = &msg->chunk_ack;
    if (ss->dl == DL_IDLE || a->transfer_id != ss->dl_win.info.transfer_id) {
        if (a->transfer_id >= 1 && a->transfer_id <= ss->next_transfer_id)
            return true; /* a download that ended (round closed): nothing to do */
        srv_refuse(s, ss, TERN_PROTO_E_UNEXPECTED, msg->seq, "CHUNK_ACK for unknown transfer %llu",
                   (unsigned long long)a->transfer_id);
        return false;
    }
    if (tern_send_window_ack(&ss->dl_win, a) != TERN_OK) {
        srv_refuse(s, ss, TERN_PROTO_E_TRANSFER, msg->seq,
                   "CHUNK_ACK inconsistent with transfer %llu (received %u, credit %u)",
                   (unsigned long long)a->transfer_id, a->received, a->credit);
        return false;
    }
    if (ss->dl_win.done) {
        if (a->transfer_id == ss->ins_tid)
            ss->ins_ready = true;
        srv_download_cancel(s, ss); /* complete: free the slot */
    }
    return true;
}

static srv_session *oldest(tern_server *s, bool upload)
{
    srv_session *best = NULL;
    for (size_t i = 0; i < s->opt.max_sessions; i++) {
        srv_session *ss = s->sessions[i];
        if (!ss)
            continue;
        if (upload ? ss->up == UP_QUEUED && (!best || ss->up_ticket < best->up_ticket)
                   : ss->dl == DL_QUEUED && (!best || ss->dl_ticket < best->dl_ticket))
            best = ss;
    }
    return best;
}

static void pump_downloads(tern_server *s)
{
    srv_session *ss;
    while (s->active_downloads < s->opt.max_downloads && (ss = oldest(s, false))) {
        ss->dl = DL_ACTIVE;
        s->active_downloads++;
    }
    for (size_t i = 0; i < s->opt.max_sessions; i++) {
        ss = s->sessions[i];
        if (!ss || ss->dl != DL_ACTIVE)
            continue;
        uint32_t index;
        while (ss->dl == DL_ACTIVE && tern_send_window_ready(&ss->dl_win, &index)) {
            tern_msg m = {0};
            if (tern_payload_chunk(&ss->dl_win.info, ss->dl_blob->bytes, index, &m) != TERN_OK) {
                srv_log(s, TERN_LOG_ERROR, "client %s: cannot make chunk %u", ss->name, index);
                srv_download_cancel(s, ss);
                break;
            }
            m.round = ss->dl_round;
            if (!srv_send(s, ss, &m))
                break; /* retried at the next turn */
            tern_send_window_sent(&ss->dl_win);
        }
    }
}

/* ---- uploads -------------------------------------------------------------------------------- */

void srv_upload_request(tern_server *s, srv_session *ss, const tern_msg_fit_res *res)
{
    srv_upload_cancel(s, ss);
    ss->up = UP_QUEUED;
    ss->up_info = res->payload;
    ss->up_examples = res->num_examples;
    ss->up_metrics = res->metrics;
    ss->up_ticket = ++s->next_ticket;
    ss->up_credit = 0;
}

void srv_upload_cancel(tern_server *s, srv_session *ss)
{
    if (ss->up == UP_IDLE)
        return;
    if (ss->up == UP_ACTIVE) {
        s->active_uploads--;
        s->transfer_bytes -= ss->up_memory;
        ss->up_memory = 0;
    }
    tern_transfer_destroy(&ss->up_xfer);
    ss->up_dropped_id = ss->up_info.transfer_id;
    ss->up = UP_IDLE;
}

static void pump_uploads(tern_server *s)
{
    srv_session *ss;
    while (s->active_uploads < s->opt.max_uploads && (ss = oldest(s, true))) {
        tern_error e = {{0}};
        tern_status st =
            tern_transfer_create(&ss->up_info, &s->limits, &s->up_alloc, &ss->up_xfer, &e);
        if (st != TERN_OK) {
            srv_log(s, TERN_LOG_ERROR, "client %s: cannot receive its update: %s", ss->name,
                    e.message);
            tern_msg m;
            tern_msg_make_error(&m, st == TERN_ERR_NOMEM ? TERN_PROTO_E_INTERNAL
                                                         : TERN_PROTO_E_TRANSFER,
                                0, "cannot receive the update: %s", e.message);
            srv_send(s, ss, &m);
            ss->up = UP_IDLE;
            srv_part_failed(s, ss, "its update cannot be received");
            continue;
        }
        ss->up = UP_ACTIVE;
        s->active_uploads++;
        ss->up_memory = tern_transfer_memory(ss->up_xfer);
        s->transfer_bytes += ss->up_memory;
        if (s->transfer_bytes > s->stats.peak_transfer_bytes)
            s->stats.peak_transfer_bytes = s->transfer_bytes;
        tern_msg m;
        tern_chunk_ack_make(&m, ss->up_xfer, s->opt.window);
        ss->up_credit = m.chunk_ack.credit;
        m.round = (uint32_t)s->report.training_round;
        srv_send(s, ss, &m);
    }
}

static bool handle_upload_chunk(tern_server *s, srv_session *ss, const tern_msg *msg)
{
    const tern_msg_chunk *c = &msg->chunk;
    uint64_t id = c->info.transfer_id;
    if (ss->up != UP_ACTIVE || id != ss->up_info.transfer_id) {
        if (ss->up == UP_QUEUED && id == ss->up_info.transfer_id)
            srv_refuse(s, ss, TERN_PROTO_E_UNEXPECTED, msg->seq,
                       "chunk %u of transfer %llu before any credit", c->index,
                       (unsigned long long)id);
        else if (id == ss->up_dropped_id)
            srv_refuse(s, ss, TERN_PROTO_E_STALE, msg->seq,
                       "transfer %llu belongs to a closed round", (unsigned long long)id);
        else
            srv_refuse(s, ss, TERN_PROTO_E_UNEXPECTED, msg->seq,
                       "chunk of unknown transfer %llu", (unsigned long long)id);
        return false;
    }
    if (c->index >= ss->up_credit) {
        srv_refuse(s, ss, TERN_PROTO_E_UNEXPECTED, msg->seq,
                   "chunk %u is beyond the credit granted (%u)", c->index, ss->up_credit);
        return false;
    }
    tern_error e = {{0}};
    int64_t t0 = srv_clock_ns(CLOCK_MONOTONIC);
    tern_status st = tern_transfer_add(ss->up_xfer, c, &e);
    s->timers[SRV_T_VERIFY] += srv_clock_ns(CLOCK_MONOTONIC) - t0;
    if (st != TERN_OK) {
        if (tern_transfer_failed(ss->up_xfer)) {
            srv_upload_cancel(s, ss);
            srv_part_failed(s, ss, "its update failed the hash check");
        }
        srv_refuse(s, ss, TERN_PROTO_E_TRANSFER, msg->seq, "%s", e.message);
        return false;
    }
    tern_msg m;
    if (!tern_transfer_complete(ss->up_xfer)) {
        tern_chunk_ack_make(&m, ss->up_xfer, s->opt.window);
        ss->up_credit = m.chunk_ack.credit;
        m.round = msg->round;
        srv_send(s, ss, &m);
        /* Hashed after the ack, while the next chunk travels. */
        t0 = srv_clock_ns(CLOCK_MONOTONIC);
        st = tern_transfer_hash_ready(ss->up_xfer, &e);
        s->timers[SRV_T_VERIFY] += srv_clock_ns(CLOCK_MONOTONIC) - t0;
        if (st != TERN_OK) {
            srv_log(s, TERN_LOG_ERROR, "client %s: %s", ss->name, e.message);
            srv_upload_cancel(s, ss);
            srv_part_failed(s, ss, "its update could not be hashed");
        }
        return true;
    }
    void *data = NULL;
    size_t len = 0;
    tern_payload_info info = ss->up_info;
    st = tern_transfer_take(ss->up_xfer, &data, &len);
    srv_upload_cancel(s, ss);
    ss->up_dropped_id = 0;
    tern_chunk_ack_done(&m, &info);
    m.round = msg->round;
    srv_send(s, ss, &m);
    if (st != TERN_OK) {
        srv_part_failed(s, ss, "its update could not be taken from the transfer");
        return true;
    }
    srv_update_ready(s, ss, data, len);
    tern_proto_free(&s->up_alloc, data);
    return true;
}

/* ---- other messages ------------------------------------------------------------------------- */

/* The blob of wire version v for a MODEL_REQUEST: the current model, or an older one loaded
 * from the registry (one older version is kept at a time). *code says why when NULL. */
static srv_blob *requested_blob(tern_server *s, uint64_t v, tern_proto_code *code, char *why,
                                size_t why_len)
{
    if (v == 0 || v == s->blob->version)
        return s->blob;
    if (v > s->blob->version) {
        *code = TERN_PROTO_E_UNEXPECTED;
        snprintf(why, why_len, "no model version %llu: the current one is %llu",
                 (unsigned long long)v, (unsigned long long)s->blob->version);
        return NULL;
    }
    if (s->old_blob && s->old_blob->version == v)
        return s->old_blob;
    char name[TERN_STORE_VERSION_SIZE];
    void *bytes = NULL, *copy = NULL;
    size_t len = 0;
    tern_error e = {{0}};
    tern_status st = srv_version_of_round(s, v, name, &e);
    if (st == TERN_OK)
        st = tern_store_version_load(s->store, name, &bytes, &len, NULL, &e);
    if (st == TERN_OK && !(copy = malloc(len ? len : 1)))
        st = tern_set_error(&e, TERN_ERR_NOMEM, "out of memory for %zu bytes", len);
    if (copy)
        memcpy(copy, bytes, len);
    tern_store_free(s->store, bytes);
    srv_blob *b = NULL;
    if (st == TERN_OK)
        st = srv_blob_wrap(s, v, copy, len, &b, &e);
    if (st != TERN_OK) {
        *code = st == TERN_ERR_NOT_FOUND ? TERN_PROTO_E_UNEXPECTED : TERN_PROTO_E_INTERNAL;
        snprintf(why, why_len, "model version %llu cannot be served: %s",
                 (unsigned long long)v, e.message);
        if (st != TERN_ERR_NOT_FOUND)
            srv_log(s, TERN_LOG_ERROR, "%s", why);
        return NULL;
    }
    srv_blob_free(s, &s->old_blob); /* detached while others still download it */
    s->old_blob = b;
    srv_log(s, TERN_LOG_INFO, "serving model version %llu (%s) from the registry",
            (unsigned long long)v, name);
    return b;
}

static bool handle_model_request(tern_server *s, srv_session *ss, const tern_msg *msg)
{
    if (ss->dl != DL_IDLE || ss->part >= 0 || ss->eval_part >= 0) {
        srv_refuse(s, ss, TERN_PROTO_E_BUSY, msg->seq, "a transfer to this client is under way");
        return false;
    }
    tern_proto_code code = TERN_PROTO_E_UNEXPECTED;
    char why[1024]; /* cut to TERN_PROTO_MAX_TEXT in the ERROR */
    srv_blob *b = requested_blob(s, msg->model_request.model_version, &code, why, sizeof why);
    if (!b) {
        srv_refuse(s, ss, code, msg->seq, "%s", why);
        return false;
    }
    tern_msg m = {.type = TERN_MSG_MODEL_INFO};
    m.model_info.model_version = b->version;
    srv_download_prepare(s, ss, b, 0, &m.model_info.payload);
    srv_send(s, ss, &m);
    return true;
}

static void handle_message(tern_server *s, srv_session *ss, const tern_msg *msg)
{
    if (tern_seq_check(&ss->seq_in, msg->seq) != TERN_OK) {
        srv_refuse(s, ss, TERN_PROTO_E_OUT_OF_ORDER, msg->seq,
                   "sequence number %llu is not above %llu", (unsigned long long)msg->seq,
                   (unsigned long long)ss->seq_in.last);
        return;
    }
    ss->last_heard = s->now;
    bool ok = true;
    if (!(tern_msg_type_senders(msg->type) & TERN_MSG_FROM_CLIENT)) {
        srv_refuse(s, ss, TERN_PROTO_E_UNEXPECTED, msg->seq, "%s is not sent by clients",
                   tern_msg_type_name(msg->type));
        return;
    }
    switch (msg->type) {
    case TERN_MSG_HELLO:
        srv_refuse(s, ss, TERN_PROTO_E_UNEXPECTED, msg->seq, "HELLO in an open session");
        return;
    case TERN_MSG_HEARTBEAT:
        break;
    case TERN_MSG_FIT_RES:
        ok = srv_fit_result(s, ss, msg);
        break;
    case TERN_MSG_EVALUATE_RES:
        ok = srv_evaluate_result(s, ss, msg);
        break;
    case TERN_MSG_MODEL_REQUEST:
        ok = handle_model_request(s, ss, msg);
        break;
    case TERN_MSG_MODEL_CHUNK:
        ok = handle_upload_chunk(s, ss, msg);
        break;
    case TERN_MSG_CHUNK_ACK:
        ok = handle_chunk_ack(s, ss, msg);
        break;
    case TERN_MSG_ERROR:
        tern_proto_count(&s->stats.messages, TERN_PROTO_OK);
        srv_log(s, TERN_LOG_WARN, "client %s: ERROR %s: %s", ss->name,
                tern_proto_code_name(msg->error.code), msg->error.message);
        /* An ERROR about the current instruction, or (in_reply_to 0) a failure of the work the
         * client started after acking its payload, fails the client in the round; one sent
         * before it received the instruction belongs to an earlier one. */
        if ((msg->error.in_reply_to != 0 && msg->error.in_reply_to >= ss->ins_seq) ||
            (msg->error.in_reply_to == 0 && ss->ins_ready))
            srv_part_failed(s, ss, "it sent an ERROR");
        return;
    case TERN_MSG_GOODBYE:
        tern_proto_count(&s->stats.messages, TERN_PROTO_OK);
        srv_session_close(s, ss, false, TERN_GOODBYE_NORMAL, "client said GOODBYE: %s",
                          msg->goodbye.message);
        return;
    default:
        srv_refuse(s, ss, TERN_PROTO_E_UNEXPECTED, msg->seq, "unexpected %s",
                   tern_msg_type_name(msg->type));
        return;
    }
    if (ok)
        tern_proto_count(&s->stats.messages, TERN_PROTO_OK);
}

static void handle_frame(tern_server *s, zmsg_t *zm)
{
    zframe_t *rid = zmsg_pop(zm);
    zframe_t *body = zmsg_pop(zm);
    size_t extra = zmsg_size(zm);
    if (!rid) {
        zframe_destroy(&body);
        return;
    }
    size_t len = body ? zframe_size(body) : 0;
    s->stats.bytes_in += len;
    srv_session *ss = find_session(s, rid);
    tern_msg_type type = 0;
    uint64_t seq = 0;
    uint32_t blen = 0;
    bool peeked = body && tern_msg_peek_header(zframe_data(body), len, &type, &seq, &blen) == 0;
    bool reply = !peeked || (type != TERN_MSG_ERROR && type != TERN_MSG_GOODBYE);
    if (!body || extra) {
        refuse_at(s, ss, rid, reply, TERN_PROTO_E_MALFORMED, seq,
                  "a message is exactly one frame after the routing id (got %zu)", extra + 1);
        goto done;
    }
    tern_msg *msg = malloc(sizeof *msg);
    if (!msg) {
        srv_log(s, TERN_LOG_ERROR, "out of memory decoding a message");
        goto done;
    }
    tern_proto_code code = TERN_PROTO_OK;
    tern_error e = {{0}};
    if (tern_msg_decode(zframe_data(body), len, &s->limits, msg, &code, &e) != TERN_OK) {
        refuse_at(s, ss, rid, reply, code, seq, "%s", e.message);
    } else if (ss) {
        handle_message(s, ss, msg);
    } else if (s->closing) {
        /* A heartbeat or result that crossed our GOODBYE on the wire: nothing to answer. A
         * HELLO now is told that the run is over. */
        tern_proto_count(&s->stats.messages, TERN_PROTO_OK);
        if (msg->type == TERN_MSG_HELLO) {
            tern_msg m = {.type = TERN_MSG_GOODBYE};
            m.goodbye.reason = TERN_GOODBYE_SHUTDOWN;
            snprintf(m.goodbye.message, sizeof m.goodbye.message, "the run is complete");
            send_orphan(s, rid, &m);
        }
    } else if (msg->type == TERN_MSG_HELLO) {
        handle_hello(s, rid, msg);
    } else if (msg->type == TERN_MSG_ERROR || msg->type == TERN_MSG_GOODBYE) {
        tern_proto_count(&s->stats.messages, TERN_PROTO_OK); /* nothing to answer */
    } else {
        refuse_at(s, NULL, rid, true, TERN_PROTO_E_NO_SESSION, msg->seq,
                  "no session: send HELLO");
    }
    free(msg);
done:
    zframe_destroy(&rid);
    zframe_destroy(&body);
}

tern_status srv_drain(tern_server *s, tern_error *err)
{
    /* Bounded per turn so that timers and the round machine keep running under a flood. */
    for (int i = 0; i < 256 && (zsock_events(s->sock) & ZMQ_POLLIN); i++) {
        zmsg_t *zm = zmsg_recv(s->sock);
        if (!zm)
            return TERN_OK; /* interrupted */
        handle_frame(s, zm);
        zmsg_destroy(&zm);
        s->now = zclock_mono();
    }
    return TERN_OK;
}

void srv_pump(tern_server *s)
{
    pump_uploads(s);
    pump_downloads(s);
}

void srv_housekeeping(tern_server *s)
{
    int64_t silent = (int64_t)s->opt.heartbeat_ms * (int64_t)s->opt.heartbeat_patience;
    for (size_t i = 0; i < s->opt.max_sessions; i++) {
        srv_session *ss = s->sessions[i];
        if (!ss)
            continue;
        if (s->now - ss->last_heard > silent) {
            srv_session_close(s, ss, true, TERN_GOODBYE_TIMEOUT, "silent for %lld ms",
                              (long long)(s->now - ss->last_heard));
            continue;
        }
        if (s->now >= ss->next_heartbeat) {
            tern_msg m = {.type = TERN_MSG_HEARTBEAT};
            m.heartbeat.timestamp_ms = (uint64_t)zclock_time();
            m.heartbeat.state = ss->dl == DL_ACTIVE || ss->up == UP_ACTIVE
                                    ? TERN_PEER_TRANSFERRING
                                    : TERN_PEER_IDLE;
            srv_send(s, ss, &m);
            ss->next_heartbeat = s->now + s->opt.heartbeat_ms;
        }
    }
}
