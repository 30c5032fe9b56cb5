/* Wire protocol: encoding and validating decoding of messages, payload chunking and reassembly,
 * sequence checks, and the two halves of CHUNK_ACK flow control (the sender's credit window, the
 * receiver's acks). docs/protocol.md is the byte-level specification this file implements.
 *
 * One validator (check_msg) serves both directions: encode refuses what it says is wrong with
 * TERN_ERR_INVALID, decode parses the bytes into a scratch tern_msg and then refuses the same
 * things with TERN_ERR_FORMAT, so a decoded message always re-encodes. Decoding never
 * allocates; chunk data stays in the caller's buffer. */
#include "tern/protocol.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "nn/util.h"

/* ---- names ----------------------------------------------------------------------------- */

unsigned tern_msg_type_senders(tern_msg_type type)
{
    switch (type) {
    case TERN_MSG_HELLO:
    case TERN_MSG_FIT_RES:
    case TERN_MSG_EVALUATE_RES:
    case TERN_MSG_MODEL_REQUEST: return TERN_MSG_FROM_CLIENT;
    case TERN_MSG_WELCOME:
    case TERN_MSG_FIT_INS:
    case TERN_MSG_EVALUATE_INS:
    case TERN_MSG_MODEL_INFO: return TERN_MSG_FROM_SERVER;
    case TERN_MSG_HEARTBEAT:
    case TERN_MSG_MODEL_CHUNK:
    case TERN_MSG_ERROR:
    case TERN_MSG_GOODBYE:
    case TERN_MSG_CHUNK_ACK: return TERN_MSG_FROM_CLIENT | TERN_MSG_FROM_SERVER;
    }
    return 0;
}

const char *tern_msg_type_name(tern_msg_type type)
{
    switch (type) {
    case TERN_MSG_HELLO: return "hello";
    case TERN_MSG_WELCOME: return "welcome";
    case TERN_MSG_HEARTBEAT: return "heartbeat";
    case TERN_MSG_FIT_INS: return "fit_ins";
    case TERN_MSG_FIT_RES: return "fit_res";
    case TERN_MSG_EVALUATE_INS: return "evaluate_ins";
    case TERN_MSG_EVALUATE_RES: return "evaluate_res";
    case TERN_MSG_MODEL_REQUEST: return "model_request";
    case TERN_MSG_MODEL_INFO: return "model_info";
    case TERN_MSG_MODEL_CHUNK: return "model_chunk";
    case TERN_MSG_ERROR: return "error";
    case TERN_MSG_GOODBYE: return "goodbye";
    case TERN_MSG_CHUNK_ACK: return "chunk_ack";
    }
    return "?";
}

const char *tern_proto_code_name(tern_proto_code code)
{
    static const char *const names[] = {
        "ok",       "malformed",   "version",     "too_large", "out_of_order", "unexpected",
        "auth",     "transfer",    "unsupported", "busy",      "stale",        "internal",
        "no_session",
    };
    _Static_assert(sizeof names / sizeof names[0] == TERN_PROTO_CODE_COUNT,
                   "one name per wire code");
    return (unsigned)code < TERN_PROTO_CODE_COUNT ? names[code] : "?";
}

tern_proto_code tern_proto_code_from_status(tern_status status)
{
    switch (status) {
    case TERN_OK: return TERN_PROTO_OK;
    case TERN_ERR_FORMAT:
    case TERN_ERR_INVALID:
    case TERN_ERR_SHAPE: return TERN_PROTO_E_MALFORMED;
    case TERN_ERR_UNSUPPORTED: return TERN_PROTO_E_VERSION;
    case TERN_ERR_STATE: return TERN_PROTO_E_OUT_OF_ORDER;
    case TERN_ERR_EXISTS: return TERN_PROTO_E_TRANSFER;
    default: return TERN_PROTO_E_INTERNAL;
    }
}

/* ---- limits ---------------------------------------------------------------------------- */

typedef struct limits {
    uint32_t max_message;
    uint64_t max_transfer;
} limits;

static limits resolve_limits(const tern_proto_limits *l)
{
    limits r = {TERN_PROTO_DEFAULT_MAX_MESSAGE, TERN_PROTO_DEFAULT_MAX_TRANSFER};
    if (l && l->max_message_size)
        r.max_message = l->max_message_size;
    if (l && l->max_transfer_size)
        r.max_transfer = l->max_transfer_size;
    if (r.max_message > TERN_PROTO_HARD_MAX_MESSAGE)
        r.max_message = TERN_PROTO_HARD_MAX_MESSAGE;
    if (r.max_message < TERN_PROTO_CHUNK_OVERHEAD + 1)
        r.max_message = TERN_PROTO_CHUNK_OVERHEAD + 1; /* room for at least a one-byte chunk */
    if (r.max_transfer > TERN_PROTO_HARD_MAX_TRANSFER)
        r.max_transfer = TERN_PROTO_HARD_MAX_TRANSFER;
    if (r.max_transfer > SIZE_MAX)
        r.max_transfer = SIZE_MAX;
    return r;
}

/* ---- UTF-8 ----------------------------------------------------------------------------- */

/* Length of the well-formed UTF-8 sequence at s (n bytes available), 0 if ill-formed: no
 * overlong forms, no surrogates, nothing above U+10FFFF, and no NUL. */
static size_t utf8_seq(const uint8_t *s, size_t n)
{
    uint8_t c = s[0];
    if (c == 0)
        return 0;
    if (c < 0x80)
        return 1;
    size_t len;
    uint8_t lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF)
        len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else
        return 0;
    if (n < len || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xBF)
            return 0;
    return len;
}

static bool utf8_valid(const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        size_t k = utf8_seq(s + i, n - i);
        if (!k)
            return false;
        i += k;
    }
    return true;
}

/* A NUL-terminated field of a struct: terminated within cap bytes, at most max bytes long,
 * valid UTF-8 (which also excludes embedded NULs by construction), non-empty if required. */
static bool field_ok(const char *s, size_t cap, size_t max, bool nonempty)
{
    size_t n = strnlen(s, cap);
    return n < cap && n <= max && (!nonempty || n > 0) && utf8_valid((const uint8_t *)s, n);
}

/* Copy text into dst (cap bytes, cap - 1 <= max), replacing ill-formed bytes with '?' and
 * cutting at a character boundary. */
static void copy_text(char *dst, size_t cap, const char *src)
{
    const uint8_t *s = (const uint8_t *)src;
    size_t n = strlen(src), o = 0;
    for (size_t i = 0; i < n;) {
        size_t k = utf8_seq(s + i, n - i);
        if (o + (k ? k : 1) > cap - 1)
            break;
        if (k) {
            memcpy(dst + o, s + i, k);
            o += k;
            i += k;
        } else {
            dst[o++] = '?';
            i++;
        }
    }
    dst[o] = '\0';
}

/* ---- validation ------------------------------------------------------------------------ */

/* The failure of a check: TERN_ERR_INVALID on encode, TERN_ERR_FORMAT on decode. */
typedef struct check_ctx {
    tern_status status;
    tern_proto_code reason;
    tern_error *err;
    limits lim;
} check_ctx;

#define CHECK_FAIL(ctx, code, ...) \
    ((ctx)->reason = (code), tern_set_error((ctx)->err, (ctx)->status, __VA_ARGS__))

static tern_status check_payload(check_ctx *c, const tern_payload_info *p, bool allow_none,
                                 const char *what)
{
    if ((unsigned)p->encoding >= TERN_PAYLOAD_ENCODING_COUNT)
        return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "%s: unknown payload encoding %u", what,
                          (unsigned)p->encoding);
    if (p->encoding == TERN_PAYLOAD_NONE) {
        static const uint8_t zero[32];
        if (!allow_none)
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "%s: payload required", what);
        if (p->transfer_id || p->total_size || p->chunk_size || p->chunk_count ||
            memcmp(p->sha256, zero, 32) != 0)
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED,
                              "%s: payload encoding none with non-zero fields", what);
        return TERN_OK;
    }
    if (p->total_size == 0 || p->chunk_size == 0)
        return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "%s: payload with zero total or chunk size",
                          what);
    if (p->total_size > c->lim.max_transfer)
        return CHECK_FAIL(c, TERN_PROTO_E_TOO_LARGE,
                          "%s: payload of %llu bytes exceeds the limit of %llu", what,
                          (unsigned long long)p->total_size,
                          (unsigned long long)c->lim.max_transfer);
    if (p->chunk_size > c->lim.max_message - TERN_PROTO_CHUNK_OVERHEAD)
        return CHECK_FAIL(c, TERN_PROTO_E_TOO_LARGE,
                          "%s: chunk size %u does not fit the message limit of %u", what,
                          p->chunk_size, c->lim.max_message);
    uint64_t count = p->total_size / p->chunk_size + (p->total_size % p->chunk_size != 0);
    if (count != p->chunk_count)
        return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED,
                          "%s: chunk count %u, but %llu bytes in chunks of %u make %llu", what,
                          p->chunk_count, (unsigned long long)p->total_size, p->chunk_size,
                          (unsigned long long)count);
    return TERN_OK;
}

static bool key_ok(const char *k)
{
    return field_ok(k, TERN_PROTO_MAX_KEY + 1, TERN_PROTO_MAX_KEY, true);
}

static tern_status check_config(check_ctx *c, const tern_msg_config *cfg)
{
    if (cfg->count > TERN_PROTO_MAX_ENTRIES)
        return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "config: %u entries, at most %d",
                          cfg->count, TERN_PROTO_MAX_ENTRIES);
    for (uint32_t i = 0; i < cfg->count; i++) {
        const tern_config_entry *e = &cfg->entries[i];
        if (!key_ok(e->key))
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "config entry %u: bad key", i);
        for (uint32_t j = 0; j < i; j++)
            if (strcmp(cfg->entries[j].key, e->key) == 0)
                return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "config: duplicate key '%s'",
                                  e->key);
        switch (e->type) {
        case TERN_CONFIG_INT:
        case TERN_CONFIG_BOOL: break;
        case TERN_CONFIG_FLOAT:
            if (!isfinite(e->f))
                return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "config '%s': non-finite value",
                                  e->key);
            break;
        case TERN_CONFIG_STRING:
            if (!field_ok(e->s, sizeof e->s, TERN_PROTO_MAX_STRING_VALUE, false))
                return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "config '%s': bad string value",
                                  e->key);
            break;
        default:
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "config '%s': unknown type %d", e->key,
                              (int)e->type);
        }
    }
    return TERN_OK;
}

static tern_status check_metrics(check_ctx *c, const tern_msg_metrics *m)
{
    if (m->count > TERN_PROTO_MAX_ENTRIES)
        return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "metrics: %u entries, at most %d", m->count,
                          TERN_PROTO_MAX_ENTRIES);
    for (uint32_t i = 0; i < m->count; i++) {
        if (!key_ok(m->entries[i].key))
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "metric %u: bad key", i);
        for (uint32_t j = 0; j < i; j++)
            if (strcmp(m->entries[j].key, m->entries[i].key) == 0)
                return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "metrics: duplicate key '%s'",
                                  m->entries[i].key);
        if (!isfinite(m->entries[i].value))
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "metric '%s': non-finite value",
                              m->entries[i].key);
    }
    return TERN_OK;
}

#define FIELD_OK(s, max, nonempty) field_ok((s), sizeof(s), (max), (nonempty))

static tern_status check_msg(check_ctx *c, const tern_msg *m)
{
    tern_status st = TERN_OK;
    if ((m->flags & TERN_MSG_FLAGS_CRITICAL & ~TERN_MSG_FLAGS_KNOWN) != 0) {
        c->reason = TERN_PROTO_E_VERSION;
        return tern_set_error(c->err, c->status == TERN_ERR_FORMAT ? TERN_ERR_UNSUPPORTED
                                                                   : c->status,
                              "unknown critical flags 0x%04x",
                              (unsigned)(m->flags & TERN_MSG_FLAGS_CRITICAL &
                                         ~TERN_MSG_FLAGS_KNOWN));
    }
    switch (m->type) {
    case TERN_MSG_HELLO: {
        const tern_msg_hello *h = &m->hello;
        if (!FIELD_OK(h->client_name, TERN_PROTO_MAX_NAME, true))
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "hello: bad client name");
        if (!FIELD_OK(h->api_key, TERN_PROTO_MAX_API_KEY, false))
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "hello: bad API key");
        if (!FIELD_OK(h->client_version, TERN_PROTO_MAX_VERSION, false))
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "hello: bad client version");
        return TERN_OK;
    }
    case TERN_MSG_WELCOME: {
        const tern_msg_welcome *w = &m->welcome;
        if (!FIELD_OK(w->server_version, TERN_PROTO_MAX_VERSION, false))
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "welcome: bad server version");
        if (w->max_message_size < 1024 || w->max_message_size > TERN_PROTO_HARD_MAX_MESSAGE)
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED,
                              "welcome: max message size %u outside [1024, %u]",
                              w->max_message_size, TERN_PROTO_HARD_MAX_MESSAGE);
        if (w->chunk_size == 0 || w->chunk_size > w->max_message_size - TERN_PROTO_CHUNK_OVERHEAD)
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED,
                              "welcome: chunk size %u does not fit messages of %u bytes",
                              w->chunk_size, w->max_message_size);
        return TERN_OK;
    }
    case TERN_MSG_HEARTBEAT:
        if ((unsigned)m->heartbeat.state >= TERN_PEER_STATE_COUNT)
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "heartbeat: unknown state %u",
                              (unsigned)m->heartbeat.state);
        return TERN_OK;
    case TERN_MSG_FIT_INS:
        if (m->fit_ins.update_encoding == TERN_PAYLOAD_NONE ||
            (unsigned)m->fit_ins.update_encoding >= TERN_PAYLOAD_ENCODING_COUNT)
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "fit_ins: bad update encoding %u",
                              (unsigned)m->fit_ins.update_encoding);
        if ((st = check_config(c, &m->fit_ins.config)) != TERN_OK)
            return st;
        return check_payload(c, &m->fit_ins.payload, true, "fit_ins");
    case TERN_MSG_FIT_RES:
        if ((st = check_metrics(c, &m->fit_res.metrics)) != TERN_OK)
            return st;
        return check_payload(c, &m->fit_res.payload, true, "fit_res");
    case TERN_MSG_EVALUATE_INS:
        if ((st = check_config(c, &m->evaluate_ins.config)) != TERN_OK)
            return st;
        return check_payload(c, &m->evaluate_ins.payload, true, "evaluate_ins");
    case TERN_MSG_EVALUATE_RES:
        if (!isfinite(m->evaluate_res.loss))
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "evaluate_res: non-finite loss");
        return check_metrics(c, &m->evaluate_res.metrics);
    case TERN_MSG_MODEL_REQUEST: return TERN_OK;
    case TERN_MSG_MODEL_INFO: return check_payload(c, &m->model_info.payload, false, "model_info");
    case TERN_MSG_MODEL_CHUNK: {
        const tern_msg_chunk *k = &m->chunk;
        if ((st = check_payload(c, &k->info, false, "model_chunk")) != TERN_OK)
            return st;
        if (k->index >= k->info.chunk_count)
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "model_chunk: index %u of %u chunks",
                              k->index, k->info.chunk_count);
        uint64_t off = (uint64_t)k->index * k->info.chunk_size;
        uint64_t want = k->info.total_size - off;
        if (want > k->info.chunk_size)
            want = k->info.chunk_size;
        if (k->len != want)
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED,
                              "model_chunk: chunk %u has %u bytes, expected %llu", k->index,
                              k->len, (unsigned long long)want);
        if (!k->data)
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "model_chunk: no data");
        return TERN_OK;
    }
    case TERN_MSG_ERROR:
        if (m->error.code == TERN_PROTO_OK || (unsigned)m->error.code >= TERN_PROTO_CODE_COUNT)
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "error: bad code %u",
                              (unsigned)m->error.code);
        if (!FIELD_OK(m->error.message, TERN_PROTO_MAX_TEXT, false))
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "error: bad message text");
        return TERN_OK;
    case TERN_MSG_GOODBYE:
        if ((unsigned)m->goodbye.reason >= TERN_GOODBYE_REASON_COUNT)
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "goodbye: unknown reason %u",
                              (unsigned)m->goodbye.reason);
        if (!FIELD_OK(m->goodbye.message, TERN_PROTO_MAX_TEXT, false))
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "goodbye: bad message text");
        return TERN_OK;
    case TERN_MSG_CHUNK_ACK:
        /* credit against chunk_count is the sender's check: only it knows the payload */
        if (m->chunk_ack.received > m->chunk_ack.credit)
            return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "chunk_ack: %u received, credit %u",
                              m->chunk_ack.received, m->chunk_ack.credit);
        return TERN_OK;
    }
    return CHECK_FAIL(c, TERN_PROTO_E_MALFORMED, "unknown message type %d", (int)m->type);
}

/* ---- writing --------------------------------------------------------------------------- */

/* Counts bytes always; stores them only when p is set (the first pass sizes the message). */
typedef struct wbuf {
    uint8_t *p;
    size_t len;
} wbuf;

static void put_bytes(wbuf *w, const void *src, size_t n)
{
    if (w->p && n)
        memcpy(w->p + w->len, src, n);
    w->len += n;
}

static void put_le(wbuf *w, uint64_t v, int bytes)
{
    uint8_t b[8];
    for (int i = 0; i < bytes; i++)
        b[i] = (uint8_t)(v >> (8 * i));
    put_bytes(w, b, (size_t)bytes);
}

static void put_u8(wbuf *w, uint64_t v) { put_le(w, v, 1); }
static void put_u16(wbuf *w, uint64_t v) { put_le(w, v, 2); }
static void put_u32(wbuf *w, uint64_t v) { put_le(w, v, 4); }
static void put_u64(wbuf *w, uint64_t v) { put_le(w, v, 8); }

static void put_f64(wbuf *w, double d)
{
    uint64_t v;
    memcpy(&v, &d, 8);
    put_u64(w, v);
}

static void put_str(wbuf *w, const char *s)
{
    size_t n = strlen(s);
    put_u16(w, n);
    put_bytes(w, s, n);
}

static void put_payload(wbuf *w, const tern_payload_info *p)
{
    put_u64(w, p->transfer_id);
    put_u64(w, p->total_size);
    put_u32(w, p->chunk_size);
    put_u32(w, p->chunk_count);
    put_u8(w, (uint64_t)p->encoding);
    put_bytes(w, p->sha256, 32);
}

static void put_config(wbuf *w, const tern_msg_config *c)
{
    put_u16(w, c->count);
    for (uint32_t i = 0; i < c->count; i++) {
        const tern_config_entry *e = &c->entries[i];
        put_str(w, e->key);
        put_u8(w, (uint64_t)e->type);
        switch (e->type) {
        case TERN_CONFIG_INT: put_u64(w, (uint64_t)e->i); break;
        case TERN_CONFIG_FLOAT: put_f64(w, e->f); break;
        case TERN_CONFIG_BOOL: put_u8(w, e->b ? 1 : 0); break;
        case TERN_CONFIG_STRING: put_str(w, e->s); break;
        }
    }
}

static void put_metrics(wbuf *w, const tern_msg_metrics *m)
{
    put_u16(w, m->count);
    for (uint32_t i = 0; i < m->count; i++) {
        put_str(w, m->entries[i].key);
        put_f64(w, m->entries[i].value);
    }
}

/* The whole message, header included; the body length is patched in by the caller. */
static void put_msg(wbuf *w, const tern_msg *m, uint32_t body_len)
{
    put_bytes(w, TERN_PROTO_MAGIC, 4);
    put_u8(w, TERN_PROTO_VERSION_MAJOR);
    put_u8(w, TERN_PROTO_VERSION_MINOR);
    put_u8(w, (uint64_t)m->type);
    put_u8(w, 0);
    put_u32(w, m->flags);
    put_u32(w, body_len);
    put_u64(w, m->seq);
    put_u32(w, m->round);
    put_u32(w, 0);
    switch (m->type) {
    case TERN_MSG_HELLO:
        put_str(w, m->hello.client_name);
        put_str(w, m->hello.api_key);
        put_str(w, m->hello.client_version);
        put_u32(w, m->hello.capabilities);
        put_u64(w, m->hello.num_examples);
        break;
    case TERN_MSG_WELCOME:
        put_u64(w, m->welcome.session_id);
        put_str(w, m->welcome.server_version);
        put_u32(w, m->welcome.capabilities);
        put_u32(w, m->welcome.heartbeat_ms);
        put_u32(w, m->welcome.max_message_size);
        put_u32(w, m->welcome.chunk_size);
        break;
    case TERN_MSG_HEARTBEAT:
        put_u64(w, m->heartbeat.timestamp_ms);
        put_u8(w, (uint64_t)m->heartbeat.state);
        break;
    case TERN_MSG_FIT_INS:
        put_u64(w, m->fit_ins.model_version);
        put_u8(w, (uint64_t)m->fit_ins.update_encoding);
        put_u32(w, m->fit_ins.deadline_ms);
        put_config(w, &m->fit_ins.config);
        put_payload(w, &m->fit_ins.payload);
        break;
    case TERN_MSG_FIT_RES:
        put_u64(w, m->fit_res.model_version);
        put_u64(w, m->fit_res.num_examples);
        put_metrics(w, &m->fit_res.metrics);
        put_payload(w, &m->fit_res.payload);
        break;
    case TERN_MSG_EVALUATE_INS:
        put_u64(w, m->evaluate_ins.model_version);
        put_config(w, &m->evaluate_ins.config);
        put_payload(w, &m->evaluate_ins.payload);
        break;
    case TERN_MSG_EVALUATE_RES:
        put_u64(w, m->evaluate_res.model_version);
        put_u64(w, m->evaluate_res.num_examples);
        put_f64(w, m->evaluate_res.loss);
        put_metrics(w, &m->evaluate_res.metrics);
        break;
    case TERN_MSG_MODEL_REQUEST: put_u64(w, m->model_request.model_version); break;
    case TERN_MSG_MODEL_INFO:
        put_u64(w, m->model_info.model_version);
        put_payload(w, &m->model_info.payload);
        break;
    case TERN_MSG_MODEL_CHUNK:
        put_payload(w, &m->chunk.info);
        put_u32(w, m->chunk.index);
        put_u32(w, m->chunk.len);
        put_bytes(w, m->chunk.data, m->chunk.len);
        break;
    case TERN_MSG_ERROR:
        put_u16(w, (uint64_t)m->error.code);
        put_u64(w, m->error.in_reply_to);
        put_str(w, m->error.message);
        break;
    case TERN_MSG_GOODBYE:
        put_u8(w, (uint64_t)m->goodbye.reason);
        put_str(w, m->goodbye.message);
        break;
    case TERN_MSG_CHUNK_ACK:
        put_u64(w, m->chunk_ack.transfer_id);
        put_u32(w, m->chunk_ack.received);
        put_u32(w, m->chunk_ack.credit);
        break;
    }
}

tern_status tern_msg_encoded_size(const tern_msg *msg, const tern_proto_limits *lim, size_t *len,
                                  tern_error *err)
{
    if (!msg || !len)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    check_ctx c = {TERN_ERR_INVALID, TERN_PROTO_OK, err, resolve_limits(lim)};
    tern_status st = check_msg(&c, msg);
    if (st != TERN_OK)
        return st;
    wbuf w = {NULL, 0};
    put_msg(&w, msg, 0);
    if (w.len > c.lim.max_message)
        return tern_set_error(err, TERN_ERR_INVALID,
                              "%s message of %zu bytes exceeds the limit of %u",
                              tern_msg_type_name(msg->type), w.len, c.lim.max_message);
    *len = w.len;
    return TERN_OK;
}

tern_status tern_msg_encode_into(const tern_msg *msg, const tern_proto_limits *lim, void *buf,
                                 size_t cap, size_t *len, tern_error *err)
{
    size_t need;
    tern_status st = tern_msg_encoded_size(msg, lim, &need, err);
    if (st != TERN_OK)
        return st;
    if (!buf || !len || cap < need)
        return tern_set_error(err, TERN_ERR_INVALID, "buffer of %zu bytes, %zu needed", cap,
                              need);
    wbuf w = {buf, 0};
    put_msg(&w, msg, (uint32_t)(need - TERN_PROTO_HEADER_SIZE));
    *len = w.len;
    return TERN_OK;
}

tern_status tern_msg_encode(const tern_msg *msg, const tern_proto_limits *lim,
                            const tern_allocator *alloc, void **bytes, size_t *len,
                            tern_error *err)
{
    size_t need, got;
    if (!bytes || !len)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    tern_status st = tern_msg_encoded_size(msg, lim, &need, err);
    if (st != TERN_OK)
        return st;
    void *buf = tern_alloc(alloc, need);
    if (!buf)
        return tern_set_error(err, TERN_ERR_NOMEM, "cannot allocate %zu bytes", need);
    st = tern_msg_encode_into(msg, lim, buf, need, &got, err);
    if (st != TERN_OK) {
        tern_free(alloc, buf);
        return st;
    }
    *bytes = buf;
    *len = got;
    return TERN_OK;
}

void tern_proto_free(const tern_allocator *alloc, void *bytes) { tern_free(alloc, bytes); }

/* ---- reading --------------------------------------------------------------------------- */

typedef struct rbuf {
    const uint8_t *p;
    size_t len, pos;
    tern_error *err;
    const char *what; /* field being read, for the error message */
    bool failed;
} rbuf;

static bool need(rbuf *r, size_t n)
{
    if (r->failed)
        return false;
    if (r->len - r->pos < n) {
        r->failed = true;
        tern_set_error(r->err, TERN_ERR_FORMAT, "%s: truncated at byte %zu (%zu more needed)",
                       r->what, r->pos, n);
        return false;
    }
    return true;
}

static uint64_t get_le(rbuf *r, int bytes)
{
    if (!need(r, (size_t)bytes))
        return 0;
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v |= (uint64_t)r->p[r->pos + (size_t)i] << (8 * i);
    r->pos += (size_t)bytes;
    return v;
}

static uint8_t get_u8(rbuf *r) { return (uint8_t)get_le(r, 1); }
static uint16_t get_u16(rbuf *r) { return (uint16_t)get_le(r, 2); }
static uint32_t get_u32(rbuf *r) { return (uint32_t)get_le(r, 4); }
static uint64_t get_u64(rbuf *r) { return get_le(r, 8); }

static double get_f64(rbuf *r)
{
    uint64_t v = get_u64(r);
    double d;
    memcpy(&d, &v, 8);
    return d;
}

static void get_bytes(rbuf *r, void *dst, size_t n)
{
    if (!need(r, n))
        return;
    memcpy(dst, r->p + r->pos, n);
    r->pos += n;
}

/* A length-prefixed string into dst (cap bytes): length checked against max before reading,
 * bytes checked for UTF-8 and NUL before copying. */
static void get_str(rbuf *r, char *dst, size_t cap, size_t max)
{
    size_t n = get_u16(r);
    if (r->failed)
        return;
    if (n > max || n >= cap) {
        r->failed = true;
        tern_set_error(r->err, TERN_ERR_FORMAT, "%s: string of %zu bytes, at most %zu", r->what,
                       n, max);
        return;
    }
    if (!need(r, n))
        return;
    if (!utf8_valid(r->p + r->pos, n)) {
        r->failed = true;
        tern_set_error(r->err, TERN_ERR_FORMAT, "%s: string is not valid UTF-8 or holds NUL",
                       r->what);
        return;
    }
    memcpy(dst, r->p + r->pos, n);
    dst[n] = '\0';
    r->pos += n;
}

#define GET_STR(r, field, max) get_str((r), (field), sizeof(field), (max))

static void get_payload(rbuf *r, tern_payload_info *p)
{
    p->transfer_id = get_u64(r);
    p->total_size = get_u64(r);
    p->chunk_size = get_u32(r);
    p->chunk_count = get_u32(r);
    p->encoding = (tern_payload_encoding)get_u8(r);
    get_bytes(r, p->sha256, 32);
}

/* Counts are checked against their maximum before any entry is read. */
static bool get_count(rbuf *r, uint32_t *count)
{
    *count = get_u16(r);
    if (r->failed)
        return false;
    if (*count > TERN_PROTO_MAX_ENTRIES) {
        r->failed = true;
        tern_set_error(r->err, TERN_ERR_FORMAT, "%s: %u entries, at most %d", r->what, *count,
                       TERN_PROTO_MAX_ENTRIES);
        return false;
    }
    return true;
}

static void get_config(rbuf *r, tern_msg_config *c)
{
    r->what = "config";
    if (!get_count(r, &c->count))
        return;
    for (uint32_t i = 0; i < c->count && !r->failed; i++) {
        tern_config_entry *e = &c->entries[i];
        GET_STR(r, e->key, TERN_PROTO_MAX_KEY);
        uint8_t type = get_u8(r);
        e->type = (tern_config_type)type;
        switch (type) {
        case TERN_CONFIG_INT: e->i = (int64_t)get_u64(r); break;
        case TERN_CONFIG_FLOAT: e->f = get_f64(r); break;
        case TERN_CONFIG_BOOL: {
            uint8_t b = get_u8(r);
            if (!r->failed && b > 1) {
                r->failed = true;
                tern_set_error(r->err, TERN_ERR_FORMAT, "config '%s': boolean byte %u", e->key,
                               b);
            }
            e->b = b == 1;
            break;
        }
        case TERN_CONFIG_STRING: GET_STR(r, e->s, TERN_PROTO_MAX_STRING_VALUE); break;
        default:
            if (!r->failed) {
                r->failed = true;
                tern_set_error(r->err, TERN_ERR_FORMAT, "config '%s': unknown type %u", e->key,
                               type);
            }
        }
    }
}

static void get_metrics(rbuf *r, tern_msg_metrics *m)
{
    r->what = "metrics";
    if (!get_count(r, &m->count))
        return;
    for (uint32_t i = 0; i < m->count && !r->failed; i++) {
        GET_STR(r, m->entries[i].key, TERN_PROTO_MAX_KEY);
        m->entries[i].value = get_f64(r);
    }
}

static void get_body(rbuf *r, tern_msg *m)
{
    switch (m->type) {
    case TERN_MSG_HELLO:
        r->what = "hello";
        GET_STR(r, m->hello.client_name, TERN_PROTO_MAX_NAME);
        GET_STR(r, m->hello.api_key, TERN_PROTO_MAX_API_KEY);
        GET_STR(r, m->hello.client_version, TERN_PROTO_MAX_VERSION);
        m->hello.capabilities = get_u32(r);
        m->hello.num_examples = get_u64(r);
        break;
    case TERN_MSG_WELCOME:
        r->what = "welcome";
        m->welcome.session_id = get_u64(r);
        GET_STR(r, m->welcome.server_version, TERN_PROTO_MAX_VERSION);
        m->welcome.capabilities = get_u32(r);
        m->welcome.heartbeat_ms = get_u32(r);
        m->welcome.max_message_size = get_u32(r);
        m->welcome.chunk_size = get_u32(r);
        break;
    case TERN_MSG_HEARTBEAT:
        r->what = "heartbeat";
        m->heartbeat.timestamp_ms = get_u64(r);
        m->heartbeat.state = (tern_peer_state)get_u8(r);
        break;
    case TERN_MSG_FIT_INS:
        r->what = "fit_ins";
        m->fit_ins.model_version = get_u64(r);
        m->fit_ins.update_encoding = (tern_payload_encoding)get_u8(r);
        m->fit_ins.deadline_ms = get_u32(r);
        get_config(r, &m->fit_ins.config);
        r->what = "fit_ins payload";
        get_payload(r, &m->fit_ins.payload);
        break;
    case TERN_MSG_FIT_RES:
        r->what = "fit_res";
        m->fit_res.model_version = get_u64(r);
        m->fit_res.num_examples = get_u64(r);
        get_metrics(r, &m->fit_res.metrics);
        r->what = "fit_res payload";
        get_payload(r, &m->fit_res.payload);
        break;
    case TERN_MSG_EVALUATE_INS:
        r->what = "evaluate_ins";
        m->evaluate_ins.model_version = get_u64(r);
        get_config(r, &m->evaluate_ins.config);
        r->what = "evaluate_ins payload";
        get_payload(r, &m->evaluate_ins.payload);
        break;
    case TERN_MSG_EVALUATE_RES:
        r->what = "evaluate_res";
        m->evaluate_res.model_version = get_u64(r);
        m->evaluate_res.num_examples = get_u64(r);
        m->evaluate_res.loss = get_f64(r);
        get_metrics(r, &m->evaluate_res.metrics);
        break;
    case TERN_MSG_MODEL_REQUEST:
        r->what = "model_request";
        m->model_request.model_version = get_u64(r);
        break;
    case TERN_MSG_MODEL_INFO:
        r->what = "model_info";
        m->model_info.model_version = get_u64(r);
        get_payload(r, &m->model_info.payload);
        break;
    case TERN_MSG_MODEL_CHUNK:
        r->what = "model_chunk";
        get_payload(r, &m->chunk.info);
        m->chunk.index = get_u32(r);
        m->chunk.len = get_u32(r);
        if (need(r, m->chunk.len)) {
            m->chunk.data = r->p + r->pos;
            r->pos += m->chunk.len;
        }
        break;
    case TERN_MSG_ERROR:
        r->what = "error";
        m->error.code = (tern_proto_code)get_u16(r);
        m->error.in_reply_to = get_u64(r);
        GET_STR(r, m->error.message, TERN_PROTO_MAX_TEXT);
        break;
    case TERN_MSG_GOODBYE:
        r->what = "goodbye";
        m->goodbye.reason = (tern_goodbye_reason)get_u8(r);
        GET_STR(r, m->goodbye.message, TERN_PROTO_MAX_TEXT);
        break;
    case TERN_MSG_CHUNK_ACK:
        r->what = "chunk_ack";
        m->chunk_ack.transfer_id = get_u64(r);
        m->chunk_ack.received = get_u32(r);
        m->chunk_ack.credit = get_u32(r);
        break;
    }
}

tern_status tern_msg_peek_header(const void *bytes, size_t len, tern_msg_type *type,
                                 uint64_t *seq, uint32_t *body_len)
{
    if (!bytes || len < TERN_PROTO_HEADER_SIZE || memcmp(bytes, TERN_PROTO_MAGIC, 4) != 0)
        return TERN_ERR_FORMAT;
    rbuf r = {bytes, len, 6, NULL, "header", false};
    uint8_t t = get_u8(&r);
    r.pos = 12;
    uint32_t bl = get_u32(&r);
    uint64_t s = get_u64(&r);
    if (type)
        *type = (tern_msg_type)t;
    if (seq)
        *seq = s;
    if (body_len)
        *body_len = bl;
    return TERN_OK;
}

#define REJECT(code, status, ...) \
    (reason ? (void)(*reason = (code)) : (void)0, tern_set_error(err, (status), __VA_ARGS__))

tern_status tern_msg_decode(const void *bytes, size_t len, const tern_proto_limits *lim,
                            tern_msg *out, tern_proto_code *reason, tern_error *err)
{
    if (!bytes || !out)
        return REJECT(TERN_PROTO_E_INTERNAL, TERN_ERR_INVALID, "NULL argument");
    limits l = resolve_limits(lim);
    /* Size first: nothing of an oversized frame is looked at. */
    if (len > l.max_message)
        return REJECT(TERN_PROTO_E_TOO_LARGE, TERN_ERR_FORMAT,
                      "message of %zu bytes exceeds the limit of %u", len, l.max_message);
    if (len < TERN_PROTO_HEADER_SIZE)
        return REJECT(TERN_PROTO_E_MALFORMED, TERN_ERR_FORMAT,
                      "message of %zu bytes is shorter than the %d-byte header", len,
                      TERN_PROTO_HEADER_SIZE);
    const uint8_t *p = bytes;
    if (memcmp(p, TERN_PROTO_MAGIC, 4) != 0)
        return REJECT(TERN_PROTO_E_MALFORMED, TERN_ERR_FORMAT, "bad magic");
    rbuf r = {p, len, 4, err, "header", false};
    tern_msg m;
    memset(&m, 0, sizeof m);
    m.version_major = get_u8(&r);
    m.version_minor = get_u8(&r);
    uint8_t type = get_u8(&r);
    (void)get_u8(&r); /* reserved */
    m.flags = get_u32(&r);
    uint32_t body_len = get_u32(&r);
    m.seq = get_u64(&r);
    m.round = get_u32(&r);
    (void)get_u32(&r); /* reserved */
    if (m.version_major != TERN_PROTO_VERSION_MAJOR)
        return REJECT(TERN_PROTO_E_VERSION, TERN_ERR_UNSUPPORTED,
                      "protocol version %u.%u; this build speaks %d.%d", m.version_major,
                      m.version_minor, TERN_PROTO_VERSION_MAJOR, TERN_PROTO_VERSION_MINOR);
    bool newer = m.version_minor > TERN_PROTO_VERSION_MINOR;
    if ((uint64_t)body_len + TERN_PROTO_HEADER_SIZE > l.max_message)
        return REJECT(TERN_PROTO_E_TOO_LARGE, TERN_ERR_FORMAT,
                      "announced body of %u bytes exceeds the limit of %u", body_len,
                      l.max_message);
    if (body_len != len - TERN_PROTO_HEADER_SIZE)
        return REJECT(TERN_PROTO_E_MALFORMED, TERN_ERR_FORMAT,
                      "announced body of %u bytes, frame holds %zu", body_len,
                      len - TERN_PROTO_HEADER_SIZE);
    if (!tern_msg_type_senders((tern_msg_type)type)) {
        if (newer)
            return REJECT(TERN_PROTO_E_UNSUPPORTED, TERN_ERR_UNSUPPORTED,
                          "message type %u from protocol %u.%u is not known to %d.%d", type,
                          m.version_major, m.version_minor, TERN_PROTO_VERSION_MAJOR,
                          TERN_PROTO_VERSION_MINOR);
        return REJECT(TERN_PROTO_E_MALFORMED, TERN_ERR_FORMAT, "unknown message type %u", type);
    }
    m.type = (tern_msg_type)type;
    get_body(&r, &m);
    if (r.failed) { /* err already says which field */
        if (reason)
            *reason = TERN_PROTO_E_MALFORMED;
        return TERN_ERR_FORMAT;
    }
    /* A newer minor version may append fields this build does not know. */
    if (r.pos != len && !newer)
        return REJECT(TERN_PROTO_E_MALFORMED, TERN_ERR_FORMAT,
                      "%s: %zu trailing bytes", tern_msg_type_name(m.type), len - r.pos);
    check_ctx c = {TERN_ERR_FORMAT, TERN_PROTO_OK, err, l};
    tern_status st = check_msg(&c, &m);
    if (st != TERN_OK) {
        if (reason)
            *reason = c.reason;
        return st;
    }
    *out = m;
    if (reason)
        *reason = TERN_PROTO_OK;
    return TERN_OK;
}

void tern_msg_make_error(tern_msg *out, tern_proto_code code, uint64_t in_reply_to,
                         const char *fmt, ...)
{
    char text[TERN_PROTO_MAX_TEXT * 2];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    memset(out, 0, sizeof *out);
    out->type = TERN_MSG_ERROR;
    out->error.code = (unsigned)code < TERN_PROTO_CODE_COUNT && code != TERN_PROTO_OK
                          ? code
                          : TERN_PROTO_E_INTERNAL;
    out->error.in_reply_to = in_reply_to;
    copy_text(out->error.message, sizeof out->error.message, text);
}

/* ---- config and metrics ---------------------------------------------------------------- */

static tern_config_entry *config_slot(tern_msg_config *c, const char *key)
{
    if (!key || !c || c->count > TERN_PROTO_MAX_ENTRIES || strlen(key) > TERN_PROTO_MAX_KEY ||
        !*key || !utf8_valid((const uint8_t *)key, strlen(key)))
        return NULL;
    for (uint32_t i = 0; i < c->count; i++)
        if (strcmp(c->entries[i].key, key) == 0)
            return &c->entries[i];
    if (c->count == TERN_PROTO_MAX_ENTRIES)
        return NULL;
    tern_config_entry *e = &c->entries[c->count++];
    memset(e, 0, sizeof *e);
    strcpy(e->key, key);
    return e;
}

tern_status tern_config_set_int(tern_msg_config *c, const char *key, int64_t v)
{
    tern_config_entry *e = config_slot(c, key);
    if (!e)
        return TERN_ERR_INVALID;
    e->type = TERN_CONFIG_INT;
    e->i = v;
    return TERN_OK;
}

tern_status tern_config_set_float(tern_msg_config *c, const char *key, double v)
{
    if (!isfinite(v))
        return TERN_ERR_INVALID;
    tern_config_entry *e = config_slot(c, key);
    if (!e)
        return TERN_ERR_INVALID;
    e->type = TERN_CONFIG_FLOAT;
    e->f = v;
    return TERN_OK;
}

tern_status tern_config_set_bool(tern_msg_config *c, const char *key, bool v)
{
    tern_config_entry *e = config_slot(c, key);
    if (!e)
        return TERN_ERR_INVALID;
    e->type = TERN_CONFIG_BOOL;
    e->b = v;
    return TERN_OK;
}

tern_status tern_config_set_string(tern_msg_config *c, const char *key, const char *v)
{
    if (!v || strlen(v) > TERN_PROTO_MAX_STRING_VALUE ||
        !utf8_valid((const uint8_t *)v, strlen(v)))
        return TERN_ERR_INVALID;
    tern_config_entry *e = config_slot(c, key);
    if (!e)
        return TERN_ERR_INVALID;
    e->type = TERN_CONFIG_STRING;
    memset(e->s, 0, sizeof e->s);
    strcpy(e->s, v);
    return TERN_OK;
}

const tern_config_entry *tern_config_find(const tern_msg_config *c, const char *key)
{
    if (!c || !key)
        return NULL;
    for (uint32_t i = 0; i < c->count && i < TERN_PROTO_MAX_ENTRIES; i++)
        if (strcmp(c->entries[i].key, key) == 0)
            return &c->entries[i];
    return NULL;
}

tern_status tern_config_get_number(const tern_msg_config *c, const char *key, double *out)
{
    const tern_config_entry *e = tern_config_find(c, key);
    if (!e)
        return TERN_ERR_NOT_FOUND;
    if (e->type == TERN_CONFIG_INT)
        *out = (double)e->i;
    else if (e->type == TERN_CONFIG_FLOAT)
        *out = e->f;
    else
        return TERN_ERR_SHAPE;
    return TERN_OK;
}

tern_status tern_metrics_set(tern_msg_metrics *m, const char *key, double v)
{
    if (!m || !key || !*key || strlen(key) > TERN_PROTO_MAX_KEY ||
        !utf8_valid((const uint8_t *)key, strlen(key)) || !isfinite(v) ||
        m->count > TERN_PROTO_MAX_ENTRIES)
        return TERN_ERR_INVALID;
    for (uint32_t i = 0; i < m->count; i++)
        if (strcmp(m->entries[i].key, key) == 0) {
            m->entries[i].value = v;
            return TERN_OK;
        }
    if (m->count == TERN_PROTO_MAX_ENTRIES)
        return TERN_ERR_INVALID;
    memset(&m->entries[m->count], 0, sizeof m->entries[0]);
    strcpy(m->entries[m->count].key, key);
    m->entries[m->count++].value = v;
    return TERN_OK;
}

tern_status tern_metrics_get(const tern_msg_metrics *m, const char *key, double *out)
{
    if (!m || !key)
        return TERN_ERR_INVALID;
    for (uint32_t i = 0; i < m->count && i < TERN_PROTO_MAX_ENTRIES; i++)
        if (strcmp(m->entries[i].key, key) == 0) {
            *out = m->entries[i].value;
            return TERN_OK;
        }
    return TERN_ERR_NOT_FOUND;
}

/* ---- sequence numbers and counters ----------------------------------------------------- */

tern_status tern_seq_check(tern_seq_tracker *t, uint64_t seq)
{
    if (seq <= t->last) { /* also refuses 0 */
        t->rejected++;
        return TERN_ERR_STATE;
    }
    if (seq != t->last + 1)
        t->gaps++;
    t->last = seq;
    t->accepted++;
    return TERN_OK;
}

void tern_proto_count(tern_proto_counters *c, tern_proto_code code)
{
    c->by_code[(unsigned)code < TERN_PROTO_CODE_COUNT ? code : TERN_PROTO_E_MALFORMED]++;
}

/* ---- payloads -------------------------------------------------------------------------- */

static tern_status sha256(const void *data, size_t len, uint8_t out[32])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL) != 1 || mdlen != 32)
        return TERN_ERR_IO;
    memcpy(out, md, 32);
    return TERN_OK;
}

static tern_status describe(const void *data, const uint8_t *sha, size_t len,
                           uint64_t transfer_id, uint32_t chunk_size,
                           tern_payload_encoding encoding, const tern_proto_limits *lim,
                           tern_payload_info *out, tern_error *err);

tern_status tern_payload_describe(const void *data, size_t len, uint64_t transfer_id,
                                  uint32_t chunk_size, tern_payload_encoding encoding,
                                  const tern_proto_limits *lim, tern_payload_info *out,
                                  tern_error *err)
{
    if (!data)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    return describe(data, NULL, len, transfer_id, chunk_size, encoding, lim, out, err);
}

tern_status tern_payload_describe_hashed(const uint8_t sha256[32], size_t len,
                                         uint64_t transfer_id, uint32_t chunk_size,
                                         tern_payload_encoding encoding,
                                         const tern_proto_limits *lim, tern_payload_info *out,
                                         tern_error *err)
{
    if (!sha256)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    return describe(NULL, sha256, len, transfer_id, chunk_size, encoding, lim, out, err);
}

/* data is hashed, unless sha (the hash of len bytes) is given. */
static tern_status describe(const void *data, const uint8_t *sha, size_t len,
                           uint64_t transfer_id, uint32_t chunk_size,
                           tern_payload_encoding encoding, const tern_proto_limits *lim,
                           tern_payload_info *out, tern_error *err)
{
    if (!out)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    if (encoding == TERN_PAYLOAD_NONE || (unsigned)encoding >= TERN_PAYLOAD_ENCODING_COUNT)
        return tern_set_error(err, TERN_ERR_INVALID, "bad payload encoding %u",
                              (unsigned)encoding);
    tern_payload_info p = {.transfer_id = transfer_id, .total_size = len,
                           .chunk_size = chunk_size, .encoding = encoding};
    if (chunk_size) {
        uint64_t count = (uint64_t)len / chunk_size + ((uint64_t)len % chunk_size != 0);
        if (count > UINT32_MAX)
            return tern_set_error(err, TERN_ERR_INVALID, "too many chunks");
        p.chunk_count = (uint32_t)count;
    }
    check_ctx c = {TERN_ERR_INVALID, TERN_PROTO_OK, err, resolve_limits(lim)};
    tern_status st = check_payload(&c, &p, false, "payload");
    if (st != TERN_OK)
        return st;
    if (sha)
        memcpy(p.sha256, sha, 32);
    else if (sha256(data, len, p.sha256) != TERN_OK)
        return tern_set_error(err, TERN_ERR_IO, "OpenSSL SHA-256 failed");
    *out = p;
    return TERN_OK;
}

tern_status tern_payload_chunk(const tern_payload_info *info, const void *data, uint32_t index,
                               tern_msg *out)
{
    if (!info || !data || !out || info->encoding == TERN_PAYLOAD_NONE || !info->chunk_size ||
        index >= info->chunk_count)
        return TERN_ERR_INVALID;
    uint64_t off = (uint64_t)index * info->chunk_size;
    if (off >= info->total_size)
        return TERN_ERR_INVALID;
    uint64_t n = info->total_size - off;
    if (n > info->chunk_size)
        n = info->chunk_size;
    out->type = TERN_MSG_MODEL_CHUNK;
    memset(&out->chunk, 0, sizeof out->chunk);
    out->chunk.info = *info;
    out->chunk.index = index;
    out->chunk.len = (uint32_t)n;
    out->chunk.data = (const uint8_t *)data + off;
    return TERN_OK;
}

/* ---- reassembly ------------------------------------------------------------------------ */

enum { XFER_RECEIVING, XFER_COMPLETE, XFER_FAILED, XFER_TAKEN };

/* The SHA-256 runs as chunks arrive: chunks 0..hashed-1 are in the digest, and
 * tern_transfer_hash_ready (which the receiver calls after acking a chunk) extends it over every
 * chunk now contiguous with them. Senders send in index order, so each chunk is hashed right
 * after its copy, while its bytes are still in cache, and the last chunk only finishes the
 * digest; chunks that arrive out of order wait until the gap before them is filled. */
struct tern_transfer {
    tern_allocator alloc; /* zeroed = C library */
    tern_payload_info info;
    uint8_t *data;   /* total_size bytes */
    uint8_t *have;   /* one bit per chunk */
    size_t have_len; /* bytes of `have` */
    uint32_t received;
    uint32_t hashed; /* chunks 0..hashed-1 are in md */
    EVP_MD_CTX *md;
    int state;
};

tern_status tern_transfer_create(const tern_payload_info *info, const tern_proto_limits *lim,
                                 const tern_allocator *alloc, tern_transfer **out,
                                 tern_error *err)
{
    if (!info || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    check_ctx c = {TERN_ERR_FORMAT, TERN_PROTO_OK, err, resolve_limits(lim)};
    tern_status st = check_payload(&c, info, false, "transfer");
    if (st != TERN_OK)
        return st;
    /* check_payload bounded total_size by max_transfer (<= SIZE_MAX), so these fit. */
    size_t have_len = info->chunk_count / 8 + 1;
    tern_transfer *t = tern_calloc(alloc, 1, sizeof *t);
    if (!t)
        return tern_set_error(err, TERN_ERR_NOMEM, "cannot allocate a transfer");
    if (alloc)
        t->alloc = *alloc;
    t->info = *info;
    t->have_len = have_len;
    t->have = tern_calloc(alloc, 1, have_len);
    t->data = tern_alloc(alloc, (size_t)info->total_size);
    t->md = EVP_MD_CTX_new();
    if (t->md && EVP_DigestInit_ex(t->md, EVP_sha256(), NULL) != 1) {
        tern_transfer_destroy(&t);
        return tern_set_error(err, TERN_ERR_IO, "OpenSSL SHA-256 failed");
    }
    if (!t->have || !t->data || !t->md) {
        tern_transfer_destroy(&t);
        return tern_set_error(err, TERN_ERR_NOMEM, "cannot allocate %llu bytes for a transfer",
                              (unsigned long long)info->total_size);
    }
    *out = t;
    return TERN_OK;
}

void tern_transfer_destroy(tern_transfer **tp)
{
    if (!tp || !*tp)
        return;
    tern_transfer *t = *tp;
    tern_allocator a = t->alloc;
    EVP_MD_CTX_free(t->md);
    tern_free(&a, t->data);
    tern_free(&a, t->have);
    tern_free(&a, t);
    *tp = NULL;
}

static void discard(tern_transfer *t)
{
    tern_free(&t->alloc, t->data);
    t->data = NULL;
    t->state = XFER_FAILED;
}

static bool have_chunk(const tern_transfer *t, uint32_t index)
{
    return t->have[index / 8] & (1u << (index % 8));
}

/* Extend the digest over the chunks now contiguous with those already in it. */
static bool hash_ready_chunks(tern_transfer *t)
{
    const tern_payload_info *a = &t->info;
    uint32_t from = t->hashed;
    while (t->hashed < a->chunk_count && have_chunk(t, t->hashed))
        t->hashed++;
    if (t->hashed == from)
        return true;
    uint64_t begin = (uint64_t)from * a->chunk_size;
    uint64_t end = (uint64_t)t->hashed * a->chunk_size;
    if (end > a->total_size)
        end = a->total_size;
    return EVP_DigestUpdate(t->md, t->data + begin, (size_t)(end - begin)) == 1;
}

tern_status tern_transfer_add(tern_transfer *t, const tern_msg_chunk *k, tern_error *err)
{
    if (!t || !k)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    if (t->state != XFER_RECEIVING)
        return tern_set_error(err, TERN_ERR_STATE, "transfer %llu is %s",
                              (unsigned long long)t->info.transfer_id,
                              t->state == XFER_FAILED ? "failed" : "already complete");
    const tern_payload_info *a = &t->info, *b = &k->info;
    if (a->transfer_id != b->transfer_id || a->total_size != b->total_size ||
        a->chunk_size != b->chunk_size || a->chunk_count != b->chunk_count ||
        a->encoding != b->encoding || memcmp(a->sha256, b->sha256, 32) != 0)
        return tern_set_error(err, TERN_ERR_FORMAT,
                              "chunk %u does not match transfer %llu (id %llu, %llu bytes)",
                              k->index, (unsigned long long)a->transfer_id,
                              (unsigned long long)b->transfer_id,
                              (unsigned long long)b->total_size);
    if (k->index >= a->chunk_count)
        return tern_set_error(err, TERN_ERR_FORMAT, "chunk index %u of %u", k->index,
                              a->chunk_count);
    uint64_t off = (uint64_t)k->index * a->chunk_size;
    uint64_t want = a->total_size - off;
    if (want > a->chunk_size)
        want = a->chunk_size;
    if (k->len != want || !k->data)
        return tern_set_error(err, TERN_ERR_FORMAT, "chunk %u has %u bytes, expected %llu",
                              k->index, k->len, (unsigned long long)want);
    if (have_chunk(t, k->index))
        return tern_set_error(err, TERN_ERR_EXISTS, "chunk %u received twice", k->index);
    memcpy(t->data + off, k->data, k->len);
    t->have[k->index / 8] |= (uint8_t)(1u << (k->index % 8));
    if (++t->received < a->chunk_count)
        return TERN_OK;
    unsigned int mdlen = 0;
    uint8_t md[EVP_MAX_MD_SIZE];
    if (!hash_ready_chunks(t) || EVP_DigestFinal_ex(t->md, md, &mdlen) != 1 || mdlen != 32) {
        discard(t);
        return tern_set_error(err, TERN_ERR_IO, "OpenSSL SHA-256 failed");
    }
    if (memcmp(md, a->sha256, 32) != 0) {
        discard(t);
        return tern_set_error(err, TERN_ERR_FORMAT,
                              "transfer %llu: SHA-256 of the %llu bytes received does not match",
                              (unsigned long long)a->transfer_id,
                              (unsigned long long)a->total_size);
    }
    t->state = XFER_COMPLETE;
    return TERN_OK;
}

tern_status tern_transfer_hash_ready(tern_transfer *t, tern_error *err)
{
    if (!t)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    if (t->state != XFER_RECEIVING || hash_ready_chunks(t))
        return TERN_OK;
    discard(t);
    return tern_set_error(err, TERN_ERR_IO, "OpenSSL SHA-256 failed");
}

const tern_payload_info *tern_transfer_info(const tern_transfer *t) { return &t->info; }
uint32_t tern_transfer_received(const tern_transfer *t) { return t->received; }
bool tern_transfer_complete(const tern_transfer *t) { return t->state == XFER_COMPLETE; }
bool tern_transfer_failed(const tern_transfer *t) { return t->state == XFER_FAILED; }

size_t tern_transfer_memory(const tern_transfer *t)
{
    return sizeof *t + t->have_len + (t->data ? (size_t)t->info.total_size : 0);
}

tern_status tern_transfer_data(const tern_transfer *t, const void **data, size_t *len)
{
    if (!t || !data || !len)
        return TERN_ERR_INVALID;
    if (t->state != XFER_COMPLETE)
        return TERN_ERR_STATE;
    *data = t->data;
    *len = (size_t)t->info.total_size;
    return TERN_OK;
}

tern_status tern_transfer_take(tern_transfer *t, void **data, size_t *len)
{
    if (!t || !data || !len)
        return TERN_ERR_INVALID;
    if (t->state != XFER_COMPLETE)
        return TERN_ERR_STATE;
    *data = t->data;
    *len = (size_t)t->info.total_size;
    t->data = NULL;
    t->state = XFER_TAKEN;
    return TERN_OK;
}

/* ---- buffer pool ----------------------------------------------------------------------- */

#define POOL_HEADER 64
typedef struct pool_block {
    size_t capacity; /* bytes after the header */
} pool_block;

struct tern_buffer_pool {
    size_t keep, count;
    pool_block **kept; /* keep slots, the first count in use */
    uint64_t reuses, fresh;
};

tern_status tern_buffer_pool_create(size_t keep, tern_buffer_pool **out, tern_error *err)
{
    if (!out)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    if (keep > 1024)
        return tern_set_error(err, TERN_ERR_INVALID, "a buffer pool keeps at most 1024 blocks");
    tern_buffer_pool *p = calloc(1, sizeof *p);
    if (p && keep && !(p->kept = calloc(keep, sizeof *p->kept))) {
        free(p);
        p = NULL;
    }
    if (!p)
        return tern_set_error(err, TERN_ERR_NOMEM, "cannot allocate a buffer pool");
    p->keep = keep;
    *out = p;
    return TERN_OK;
}

void tern_buffer_pool_destroy(tern_buffer_pool **pool)
{
    if (!pool || !*pool)
        return;
    tern_buffer_pool *p = *pool;
    for (size_t i = 0; i < p->count; i++)
        free(p->kept[i]);
    free(p->kept);
    free(p);
    *pool = NULL;
}

static void *pool_alloc(void *user, size_t size, size_t align)
{
    tern_buffer_pool *p = user;
    if (align > POOL_HEADER || size > SIZE_MAX - 2 * POOL_HEADER)
        return NULL;
    size_t best = SIZE_MAX;
    for (size_t i = 0; size >= TERN_BUFFER_POOL_MIN && i < p->count; i++) {
        size_t cap = p->kept[i]->capacity;
        if (cap >= size && cap / 2 <= size && (best == SIZE_MAX || cap < p->kept[best]->capacity))
            best = i;
    }
    pool_block *b;
    if (best != SIZE_MAX) {
        b = p->kept[best];
        p->kept[best] = p->kept[--p->count];
        p->reuses++;
    } else {
        size_t total = (POOL_HEADER + size + POOL_HEADER - 1) & ~(size_t)(POOL_HEADER - 1);
        if (!(b = aligned_alloc(POOL_HEADER, total)))
            return NULL;
        b->capacity = total - POOL_HEADER;
        p->fresh += size >= TERN_BUFFER_POOL_MIN;
    }
    return (uint8_t *)b + POOL_HEADER;
}

static void pool_free(void *user, void *ptr)
{
    tern_buffer_pool *p = user;
    if (!ptr)
        return;
    pool_block *b = (pool_block *)((uint8_t *)ptr - POOL_HEADER);
    if (b->capacity >= TERN_BUFFER_POOL_MIN && p->count < p->keep)
        p->kept[p->count++] = b;
    else
        free(b);
}

tern_allocator tern_buffer_pool_allocator(tern_buffer_pool *pool)
{
    return (tern_allocator){.alloc = pool_alloc, .free = pool_free, .user = pool};
}

size_t tern_buffer_pool_kept_bytes(const tern_buffer_pool *pool)
{
    size_t n = 0;
    for (size_t i = 0; pool && i < pool->count; i++)
        n += POOL_HEADER + pool->kept[i]->capacity;
    return n;
}

void tern_buffer_pool_counts(const tern_buffer_pool *pool, uint64_t *reuses, uint64_t *fresh)
{
    if (reuses)
        *reuses = pool ? pool->reuses : 0;
    if (fresh)
        *fresh = pool ? pool->fresh : 0;
}

/* ---- flow control ---------------------------------------------------------------------- */

void tern_send_window_start(tern_send_window *w, const tern_payload_info *info)
{
    if (!w || !info)
        return;
    memset(w, 0, sizeof *w);
    w->info = *info;
}

tern_status tern_send_window_ack(tern_send_window *w, const tern_msg_chunk_ack *ack)
{
    if (!w || !ack)
        return TERN_ERR_INVALID;
    if (ack->transfer_id != w->info.transfer_id || ack->credit < w->credit ||
        ack->credit > w->info.chunk_count || ack->received > ack->credit ||
        ack->received < w->acked)
        return TERN_ERR_FORMAT;
    w->credit = ack->credit;
    w->acked = ack->received;
    w->done = ack->received == w->info.chunk_count;
    return TERN_OK;
}

bool tern_send_window_ready(const tern_send_window *w, uint32_t *index)
{
    if (!w || !index || w->done || w->next >= w->credit)
        return false;
    *index = w->next;
    return true;
}

void tern_send_window_sent(tern_send_window *w)
{
    if (w && w->next < w->credit)
        w->next++;
}

void tern_chunk_ack_make(tern_msg *out, const tern_transfer *t, uint32_t window)
{
    if (!out)
        return;
    memset(out, 0, sizeof *out);
    out->type = TERN_MSG_CHUNK_ACK;
    if (!t)
        return;
    uint32_t count = t->info.chunk_count, received = t->received;
    uint64_t credit = (uint64_t)received + (window ? window : 1);
    out->chunk_ack.transfer_id = t->info.transfer_id;
    out->chunk_ack.received = received;
    out->chunk_ack.credit = credit < count ? (uint32_t)credit : count;
}

void tern_chunk_ack_done(tern_msg *out, const tern_payload_info *info)
{
    if (!out)
        return;
    memset(out, 0, sizeof *out);
    out->type = TERN_MSG_CHUNK_ACK;
    if (!info)
        return;
    out->chunk_ack.transfer_id = info->transfer_id;
    out->chunk_ack.received = info->chunk_count;
    out->chunk_ack.credit = info->chunk_count;
}
