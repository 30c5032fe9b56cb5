/* Wire protocol: round trip of every message type, every truncation, thousands of random
 * corruptions, hand-built malformed headers and fields, chunked transfer of a 3 MB payload out
 * of order with duplicates and a corrupted chunk, memory bounds, allocation failures, and
 * CHUNK_ACK flow control (the sender's window, the receiver's acks, both together). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tern/protocol.h"
#include "testutil.h"

/* ---- samples --------------------------------------------------------------------------- */

static uint8_t g_chunk_data[300]; /* payload the chunk sample borrows from */

static tern_payload_info sample_payload(uint64_t id)
{
    for (size_t i = 0; i < sizeof g_chunk_data; i++)
        g_chunk_data[i] = (uint8_t)(i * 7 + 3);
    tern_payload_info p;
    assert_int_equal(tern_payload_describe(g_chunk_data, sizeof g_chunk_data, id, 128,
                                           TERN_PAYLOAD_SAFETENSORS, NULL, &p, NULL),
                     TERN_OK);
    return p;
}

/* A message of each type with every field set to something distinctive. */
static void make_sample(tern_msg_type type, tern_msg *m)
{
    memset(m, 0, sizeof *m);
    m->type = type;
    m->seq = 1000 + (uint64_t)type;
    m->round = 7;
    switch (type) {
    case TERN_MSG_HELLO:
        snprintf(m->hello.client_name, sizeof m->hello.client_name, "camera-07 \xc3\xa9t\xc3\xa9");
        snprintf(m->hello.api_key, sizeof m->hello.api_key, "tk_4f2a9c0e1b7d");
        snprintf(m->hello.client_version, sizeof m->hello.client_version, "0.1.0");
        m->hello.capabilities = TERN_CAP_DELTA | TERN_CAP_Q8 | 0x8000u;
        m->hello.num_examples = 6000;
        break;
    case TERN_MSG_WELCOME:
        m->welcome.session_id = 0x1122334455667788ull;
        snprintf(m->welcome.server_version, sizeof m->welcome.server_version, "0.1.0");
        m->welcome.capabilities = TERN_CAP_DELTA;
        m->welcome.heartbeat_ms = 5000;
        m->welcome.max_message_size = TERN_PROTO_DEFAULT_MAX_MESSAGE;
        m->welcome.chunk_size = TERN_PROTO_DEFAULT_CHUNK;
        break;
    case TERN_MSG_HEARTBEAT:
        m->heartbeat.timestamp_ms = 1700000000123ull;
        m->heartbeat.state = TERN_PEER_FITTING;
        break;
    case TERN_MSG_FIT_INS:
        m->flags = TERN_MSG_FLAG_ASYNC | 0x10000u;
        m->fit_ins.model_version = 42;
        m->fit_ins.update_encoding = TERN_PAYLOAD_DELTA;
        m->fit_ins.deadline_ms = 600000;
        assert_int_equal(tern_config_set_float(&m->fit_ins.config, "lr", 0.05), TERN_OK);
        assert_int_equal(tern_config_set_int(&m->fit_ins.config, "epochs", 10), TERN_OK);
        assert_int_equal(tern_config_set_int(&m->fit_ins.config, "batch_size", -32), TERN_OK);
        assert_int_equal(tern_config_set_float(&m->fit_ins.config, "proximal_mu", 0.01), TERN_OK);
        assert_int_equal(tern_config_set_bool(&m->fit_ins.config, "dp", true), TERN_OK);
        assert_int_equal(tern_config_set_string(&m->fit_ins.config, "optimizer", "sgd"), TERN_OK);
        m->fit_ins.payload = sample_payload(5);
        break;
    case TERN_MSG_FIT_RES:
        m->fit_res.model_version = 42;
        m->fit_res.num_examples = 5999;
        assert_int_equal(tern_metrics_set(&m->fit_res.metrics, "loss", 0.3125), TERN_OK);
        assert_int_equal(tern_metrics_set(&m->fit_res.metrics, "accuracy", 0.875), TERN_OK);
        m->fit_res.payload = sample_payload(6);
        m->fit_res.payload.encoding = TERN_PAYLOAD_DELTA;
        break;
    case TERN_MSG_EVALUATE_INS:
        m->evaluate_ins.model_version = 43;
        assert_int_equal(tern_config_set_int(&m->evaluate_ins.config, "batch_size", 256),
                         TERN_OK);
        break; /* no payload: evaluate the model already held */
    case TERN_MSG_EVALUATE_RES:
        m->evaluate_res.model_version = 43;
        m->evaluate_res.num_examples = 1000;
        m->evaluate_res.loss = 0.41;
        assert_int_equal(tern_metrics_set(&m->evaluate_res.metrics, "accuracy", 0.88), TERN_OK);
        assert_int_equal(tern_metrics_set(&m->evaluate_res.metrics, "top3", 0.97), TERN_OK);
        break;
    case TERN_MSG_MODEL_REQUEST: m->model_request.model_version = 9; break;
    case TERN_MSG_MODEL_INFO:
        m->model_info.model_version = 9;
        m->model_info.payload = sample_payload(77);
        break;
    case TERN_MSG_MODEL_CHUNK: {
        tern_payload_info p = sample_payload(77);
        tern_msg tmp;
        assert_int_equal(tern_payload_chunk(&p, g_chunk_data, 2, &tmp), TERN_OK);
        m->chunk = tmp.chunk;
        assert_int_equal(m->chunk.len, 300 - 256);
        break;
    }
    case TERN_MSG_ERROR:
        tern_msg_make_error(m, TERN_PROTO_E_AUTH, 17, "unknown API key for '%s'", "camera-07");
        m->seq = 1000 + (uint64_t)type;
        m->round = 7;
        break;
    case TERN_MSG_GOODBYE:
        m->goodbye.reason = TERN_GOODBYE_SHUTDOWN;
        snprintf(m->goodbye.message, sizeof m->goodbye.message, "server stopping");
        break;
    case TERN_MSG_CHUNK_ACK:
        m->chunk_ack.transfer_id = 0x0102030405060708ull;
        m->chunk_ack.received = 3;
        m->chunk_ack.credit = 7;
        break;
    }
}

static void *encode(const tern_msg *m, size_t *len)
{
    void *bytes = NULL;
    tern_error err = {{0}};
    tern_status st = tern_msg_encode(m, NULL, NULL, &bytes, len, &err);
    if (st != TERN_OK)
        fail_msg("encode %s: %s", tern_msg_type_name(m->type), err.message);
    return bytes;
}

/* A message accepted by decode must encode again and decode to the same bytes. */
static void assert_reencodes(const tern_msg *m)
{
    size_t n1, n2;
    void *b1 = encode(m, &n1);
    tern_msg again;
    tern_error err = {{0}};
    if (tern_msg_decode(b1, n1, NULL, &again, NULL, &err) != TERN_OK)
        fail_msg("re-decode %s: %s", tern_msg_type_name(m->type), err.message);
    void *b2 = encode(&again, &n2);
    assert_int_equal(n1, n2);
    assert_memory_equal(b1, b2, n1);
    free(b1);
    free(b2);
}

/* ---- a test-side writer for hand-built frames ------------------------------------------ */

typedef struct { uint8_t b[4096]; size_t n; } tbuf;
static void tb_le(tbuf *t, uint64_t v, int k)
{
    for (int i = 0; i < k; i++)
        t->b[t->n++] = (uint8_t)(v >> (8 * i));
}
static void tb_bytes(tbuf *t, const void *p, size_t k)
{
    memcpy(t->b + t->n, p, k);
    t->n += k;
}
static void tb_str(tbuf *t, const char *s, size_t k)
{
    tb_le(t, k, 2);
    tb_bytes(t, s, k);
}
static void tb_header(tbuf *t, int major, int minor, int type, uint32_t flags)
{
    t->n = 0;
    tb_bytes(t, "TERN", 4);
    tb_le(t, (uint64_t)major, 1);
    tb_le(t, (uint64_t)minor, 1);
    tb_le(t, (uint64_t)type, 1);
    tb_le(t, 0, 1);
    tb_le(t, flags, 4);
    tb_le(t, 0, 4); /* body length, patched by tb_finish */
    tb_le(t, 1, 8);
    tb_le(t, 3, 4);
    tb_le(t, 0, 4);
}
static void tb_finish(tbuf *t)
{
    uint32_t body = (uint32_t)(t->n - TERN_PROTO_HEADER_SIZE);
    for (int i = 0; i < 4; i++)
        t->b[12 + i] = (uint8_t)(body >> (8 * i));
}
static void tb_payload(tbuf *t, uint64_t id, uint64_t total, uint32_t csize, uint32_t count,
                       int enc)
{
    static const uint8_t sha[32] = {1, 2, 3};
    tb_le(t, id, 8);
    tb_le(t, total, 8);
    tb_le(t, csize, 4);
    tb_le(t, count, 4);
    tb_le(t, (uint64_t)enc, 1);
    tb_bytes(t, sha, 32);
}

static void expect_reject(const tbuf *t, tern_status want, tern_proto_code want_code,
                          const char *what)
{
    tern_msg m;
    memset(&m, 0xAB, sizeof m);
    tern_msg before = m;
    tern_proto_code code = TERN_PROTO_OK;
    tern_error err = {{0}};
    tern_status st = tern_msg_decode(t->b, t->n, NULL, &m, &code, &err);
    if (st != want || code != want_code)
        fail_msg("%s: status %d code %s (want %d %s): %s", what, st, tern_proto_code_name(code),
                 want, tern_proto_code_name(want_code), err.message);
    assert_true(err.message[0] != '\0');
    assert_memory_equal(&m, &before, sizeof m); /* untouched */
}

/* ---- tests ----------------------------------------------------------------------------- */

static void test_round_trip(void **state)
{
    (void)state;
    for (int type = 1; type < TERN_MSG_TYPE_COUNT; type++) {
        tern_msg m, d;
        make_sample((tern_msg_type)type, &m);
        size_t len;
        uint8_t *bytes = encode(&m, &len);
        size_t want;
        assert_int_equal(tern_msg_encoded_size(&m, NULL, &want, NULL), TERN_OK);
        assert_int_equal(len, want);
        tern_proto_code code = TERN_PROTO_E_INTERNAL;
        tern_error err = {{0}};
        if (tern_msg_decode(bytes, len, NULL, &d, &code, &err) != TERN_OK)
            fail_msg("decode %s: %s", tern_msg_type_name(m.type), err.message);
        assert_int_equal(code, TERN_PROTO_OK);
        assert_int_equal(d.type, type);
        assert_int_equal(d.version_major, TERN_PROTO_VERSION_MAJOR);
        assert_int_equal(d.version_minor, TERN_PROTO_VERSION_MINOR);
        assert_int_equal(d.seq, m.seq);
        assert_int_equal(d.round, m.round);
        assert_int_equal(d.flags, m.flags);
        tern_msg_type pt;
        uint64_t ps;
        uint32_t pb;
        assert_int_equal(tern_msg_peek_header(bytes, len, &pt, &ps, &pb), TERN_OK);
        assert_int_equal(pt, type);
        assert_int_equal(ps, m.seq);
        assert_int_equal(pb, len - TERN_PROTO_HEADER_SIZE);
        assert_true(tern_msg_type_senders(m.type) != 0);
        assert_string_not_equal(tern_msg_type_name(m.type), "?");
        switch (m.type) {
        case TERN_MSG_HELLO:
            assert_string_equal(d.hello.client_name, m.hello.client_name);
            assert_string_equal(d.hello.api_key, m.hello.api_key);
            assert_string_equal(d.hello.client_version, "0.1.0");
            assert_int_equal(d.hello.capabilities, m.hello.capabilities);
            assert_int_equal(d.hello.num_examples, 6000);
            break;
        case TERN_MSG_FIT_INS: {
            double lr, mu;
            assert_int_equal(tern_config_get_number(&d.fit_ins.config, "lr", &lr), TERN_OK);
            assert_true(lr == 0.05);
            assert_int_equal(tern_config_get_number(&d.fit_ins.config, "proximal_mu", &mu),
                             TERN_OK);
            assert_true(mu == 0.01);
            assert_int_equal(tern_config_find(&d.fit_ins.config, "epochs")->i, 10);
            assert_int_equal(tern_config_find(&d.fit_ins.config, "batch_size")->i, -32);
            assert_true(tern_config_find(&d.fit_ins.config, "dp")->b);
            assert_string_equal(tern_config_find(&d.fit_ins.config, "optimizer")->s, "sgd");
            assert_int_equal(tern_config_get_number(&d.fit_ins.config, "dp", &mu), TERN_ERR_SHAPE);
            assert_int_equal(tern_config_get_number(&d.fit_ins.config, "x", &mu),
                             TERN_ERR_NOT_FOUND);
            assert_memory_equal(&d.fit_ins.payload, &m.fit_ins.payload, sizeof m.fit_ins.payload);
            assert_int_equal(d.fit_ins.update_encoding, TERN_PAYLOAD_DELTA);
            break;
        }
        case TERN_MSG_FIT_RES: {
            double acc;
            assert_int_equal(tern_metrics_get(&d.fit_res.metrics, "accuracy", &acc), TERN_OK);
            assert_true(acc == 0.875);
            assert_int_equal(tern_metrics_get(&d.fit_res.metrics, "f1", &acc),
                             TERN_ERR_NOT_FOUND);
            assert_int_equal(d.fit_res.num_examples, 5999);
            break;
        }
        case TERN_MSG_EVALUATE_RES: assert_true(d.evaluate_res.loss == 0.41); break;
        case TERN_MSG_MODEL_CHUNK:
            /* chunk bytes are borrowed from the frame, not copied */
            assert_true(d.chunk.data >= bytes && d.chunk.data + d.chunk.len <= bytes + len);
            assert_memory_equal(d.chunk.data, g_chunk_data + 256, d.chunk.len);
            assert_int_equal(d.chunk.index, 2);
            break;
        case TERN_MSG_ERROR:
            assert_int_equal(d.error.code, TERN_PROTO_E_AUTH);
            assert_int_equal(d.error.in_reply_to, 17);
            assert_string_equal(d.error.message, "unknown API key for 'camera-07'");
            break;
        case TERN_MSG_WELCOME: assert_int_equal(d.welcome.session_id, 0x1122334455667788ull); break;
        case TERN_MSG_CHUNK_ACK:
            assert_int_equal(len, TERN_PROTO_HEADER_SIZE + 16);
            assert_int_equal(d.chunk_ack.transfer_id, 0x0102030405060708ull);
            assert_int_equal(d.chunk_ack.received, 3);
            assert_int_equal(d.chunk_ack.credit, 7);
            break;
        default: break;
        }
        assert_reencodes(&d);
        free(bytes);
    }
}

/* Every prefix is refused, both as it is (the body length no longer matches) and with the body
 * length patched to the shorter size, so the body parser itself meets the end of the data. */
static void test_truncation(void **state)
{
    (void)state;
    for (int type = 1; type < TERN_MSG_TYPE_COUNT; type++) {
        tern_msg m;
        make_sample((tern_msg_type)type, &m);
        size_t len;
        uint8_t *bytes = encode(&m, &len);
        for (size_t cut = 0; cut < len; cut++) {
            /* an exact-size heap copy so ASan sees any read past the end */
            uint8_t *p = malloc(cut ? cut : 1);
            assert_non_null(p);
            memcpy(p, bytes, cut);
            tern_msg d;
            memset(&d, 0x5A, sizeof d);
            tern_proto_code code = TERN_PROTO_OK;
            assert_int_equal(tern_msg_decode(p, cut, NULL, &d, &code, NULL), TERN_ERR_FORMAT);
            assert_int_equal(code, TERN_PROTO_E_MALFORMED);
            if (cut >= TERN_PROTO_HEADER_SIZE) {
                uint32_t body = (uint32_t)(cut - TERN_PROTO_HEADER_SIZE);
                for (int i = 0; i < 4; i++)
                    p[12 + i] = (uint8_t)(body >> (8 * i));
                tern_error err = {{0}};
                assert_int_equal(tern_msg_decode(p, cut, NULL, &d, &code, &err), TERN_ERR_FORMAT);
                assert_true(strlen(err.message) > 0);
            }
            assert_int_equal(((uint8_t *)&d)[0], 0x5A);
            free(p);
        }
        free(bytes);
    }
}

/* Flip bytes at random: the decoder must either refuse or produce a message that encodes and
 * decodes again; never read out of bounds (run under ASan/UBSan). */
static void test_random_corruption(void **state)
{
    (void)state;
    test_rng rng = {12345};
    long accepted = 0, rejected = 0;
    for (int type = 1; type < TERN_MSG_TYPE_COUNT; type++) {
        tern_msg m;
        make_sample((tern_msg_type)type, &m);
        size_t len;
        uint8_t *bytes = encode(&m, &len);
        for (int trial = 0; trial < 1000; trial++) {
            uint8_t *p = malloc(len);
            assert_non_null(p);
            memcpy(p, bytes, len);
            int flips = test_rng_int(&rng, 1, 4);
            for (int f = 0; f < flips; f++) {
                /* half of the flips hit the header and the first fields */
                size_t span = (trial & 1) ? len : (len < 96 ? len : 96);
                size_t at = (size_t)test_rng_int(&rng, 0, (int)span - 1);
                if (test_rng_int(&rng, 0, 1))
                    p[at] ^= (uint8_t)(1u << test_rng_int(&rng, 0, 7));
                else
                    p[at] = (uint8_t)test_rng_next(&rng);
            }
            tern_msg d;
            tern_proto_code code;
            tern_error err;
            tern_status st = tern_msg_decode(p, len, NULL, &d, &code, &err);
            if (st == TERN_OK) {
                accepted++;
                assert_int_equal(code, TERN_PROTO_OK);
                assert_reencodes(&d);
            } else {
                rejected++;
                assert_true(st == TERN_ERR_FORMAT || st == TERN_ERR_UNSUPPORTED);
                assert_true(code != TERN_PROTO_OK);
            }
            free(p);
        }
        free(bytes);
    }
    /* random garbage behind a valid header prefix */
    for (int trial = 0; trial < 2000; trial++) {
        size_t len = (size_t)test_rng_int(&rng, 0, 200);
        uint8_t *p = malloc(len ? len : 1);
        assert_non_null(p);
        for (size_t i = 0; i < len; i++)
            p[i] = (uint8_t)test_rng_next(&rng);
        if (len >= TERN_PROTO_HEADER_SIZE) {
            memcpy(p, "TERN\x01", 5);
            p[6] = (uint8_t)test_rng_int(&rng, 0, 14);
            uint32_t body = (uint32_t)(len - TERN_PROTO_HEADER_SIZE);
            for (int i = 0; i < 4; i++)
                p[12 + i] = (uint8_t)(body >> (8 * i));
            p[8] = p[9] = 0;
        }
        tern_msg d;
        if (tern_msg_decode(p, len, NULL, &d, NULL, NULL) == TERN_OK) {
            accepted++;
            assert_reencodes(&d);
        } else
            rejected++;
        free(p);
    }
    print_message("corruption: %ld accepted (re-encoded), %ld rejected\n", accepted, rejected);
    assert_int_equal(accepted + rejected, (TERN_MSG_TYPE_COUNT - 1) * 1000 + 2000);
    assert_true(accepted > 0 && rejected > 0);
}

static void test_header_rejections(void **state)
{
    (void)state;
    tbuf t;
    /* a valid heartbeat to start from */
    tb_header(&t, 1, 0, TERN_MSG_HEARTBEAT, 0);
    tb_le(&t, 99, 8);
    tb_le(&t, TERN_PEER_IDLE, 1);
    tb_finish(&t);
    tern_msg d;
    assert_int_equal(tern_msg_decode(t.b, t.n, NULL, &d, NULL, NULL), TERN_OK);
    assert_int_equal(d.heartbeat.timestamp_ms, 99);
    tbuf ok = t;

    t = ok;
    t.b[0] = 'X';
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "magic");
    assert_int_equal(tern_msg_peek_header(t.b, t.n, NULL, NULL, NULL), TERN_ERR_FORMAT);

    t = ok;
    t.b[4] = 2; /* major version */
    expect_reject(&t, TERN_ERR_UNSUPPORTED, TERN_PROTO_E_VERSION, "major 2");
    t.b[4] = 0;
    {
        tern_msg m;
        tern_error err = {{0}};
        assert_int_equal(tern_msg_decode(t.b, t.n, NULL, &m, NULL, &err), TERN_ERR_UNSUPPORTED);
        assert_non_null(strstr(err.message, "version 0.0"));
    }

    /* a newer minor version may append fields; the same minor may not */
    t = ok;
    tb_le(&t, 0xEEEE, 2);
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "trailing bytes");
    t.b[5] = 1;
    assert_int_equal(tern_msg_decode(t.b, t.n, NULL, &d, NULL, NULL), TERN_OK);
    assert_int_equal(d.version_minor, 1);
    assert_int_equal(d.heartbeat.timestamp_ms, 99);

    /* types */
    const int bad_types[] = {0, TERN_MSG_TYPE_COUNT, 200, 255};
    for (size_t i = 0; i < sizeof bad_types / sizeof bad_types[0]; i++) {
        t = ok;
        t.b[6] = (uint8_t)bad_types[i];
        expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "type");
        t.b[5] = 3; /* from a newer minor version: a type we do not know yet */
        expect_reject(&t, TERN_ERR_UNSUPPORTED, TERN_PROTO_E_UNSUPPORTED, "newer type");
    }

    /* flags: unknown critical bits refused, advisory bits ignored, known bits kept */
    t = ok;
    t.b[8] = 0x04;
    expect_reject(&t, TERN_ERR_UNSUPPORTED, TERN_PROTO_E_VERSION, "critical flag");
    t.b[8] = 0x03;
    t.b[10] = 0x01;
    assert_int_equal(tern_msg_decode(t.b, t.n, NULL, &d, NULL, NULL), TERN_OK);
    assert_int_equal(d.flags, 0x10003u);

    /* body length */
    t = ok;
    t.b[12]++;
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "body length +1");
    t.b[12] -= 2;
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "body length -1");
    t = ok;
    t.b[15] = 0x7F; /* announces ~2 GB */
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_TOO_LARGE, "announced body");

    /* oversize frame: refused on its length alone, before any byte is read (the buffer is
     * much shorter than the claimed length; ASan would catch a read) */
    uint8_t *tiny = malloc(8);
    assert_non_null(tiny);
    tern_proto_code code;
    assert_int_equal(tern_msg_decode(tiny, (size_t)TERN_PROTO_DEFAULT_MAX_MESSAGE + 1, NULL, &d,
                                     &code, NULL),
                     TERN_ERR_FORMAT);
    assert_int_equal(code, TERN_PROTO_E_TOO_LARGE);
    free(tiny);
    /* a configurable limit */
    {
        tern_msg m;
        make_sample(TERN_MSG_MODEL_CHUNK, &m);
        size_t len;
        void *bytes = encode(&m, &len);
        tern_proto_limits small = {.max_message_size = (uint32_t)len - 1};
        assert_int_equal(tern_msg_decode(bytes, len, &small, &d, &code, NULL), TERN_ERR_FORMAT);
        assert_int_equal(code, TERN_PROTO_E_TOO_LARGE);
        /* the last chunk fits, but the announced chunk size of 128 would not */
        small.max_message_size = 128 + TERN_PROTO_CHUNK_OVERHEAD - 1;
        assert_true(small.max_message_size >= len);
        assert_int_equal(tern_msg_decode(bytes, len, &small, &d, &code, NULL), TERN_ERR_FORMAT);
        assert_int_equal(code, TERN_PROTO_E_TOO_LARGE);
        small.max_message_size = 128 + TERN_PROTO_CHUNK_OVERHEAD;
        assert_int_equal(tern_msg_decode(bytes, len, &small, &d, &code, NULL), TERN_OK);
        free(bytes);
    }
    assert_int_equal(tern_msg_decode(NULL, 0, NULL, &d, NULL, NULL), TERN_ERR_INVALID);
}

static void test_field_rejections(void **state)
{
    (void)state;
    tbuf t;
    char longname[TERN_PROTO_MAX_NAME + 2];
    memset(longname, 'a', sizeof longname);

#define HELLO(name, nlen)                                  \
    do {                                                   \
        tb_header(&t, 1, 0, TERN_MSG_HELLO, 0);            \
        tb_str(&t, (name), (nlen));                        \
        tb_str(&t, "key", 3);                              \
        tb_str(&t, "1.0", 3);                              \
        tb_le(&t, 0, 4);                                   \
        tb_le(&t, 0, 8);                                   \
        tb_finish(&t);                                     \
    } while (0)

    tern_msg d;
    HELLO("alice", 5);
    assert_int_equal(tern_msg_decode(t.b, t.n, NULL, &d, NULL, NULL), TERN_OK);
    HELLO(longname, TERN_PROTO_MAX_NAME);
    assert_int_equal(tern_msg_decode(t.b, t.n, NULL, &d, NULL, NULL), TERN_OK);
    HELLO(longname, TERN_PROTO_MAX_NAME + 1);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "name too long");
    HELLO("", 0);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "empty name");
    HELLO("al\0ce", 5);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "NUL in name");
    HELLO("al\xff" "ce", 5);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "invalid UTF-8");
    HELLO("\xc0\xaf", 2);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "overlong UTF-8");
    HELLO("\xed\xa0\x80", 3);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "surrogate");
    HELLO("\xf4\x90\x80\x80", 4);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "above U+10FFFF");
    HELLO("\xe2\x82", 2);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "cut UTF-8");
    HELLO("\xf0\x9f\x90\xa6", 4);
    assert_int_equal(tern_msg_decode(t.b, t.n, NULL, &d, NULL, NULL), TERN_OK);
    /* a string length pointing past the end */
    tb_header(&t, 1, 0, TERN_MSG_HELLO, 0);
    tb_le(&t, 60, 2);
    tb_bytes(&t, "abc", 3);
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "string past the end");

    /* enums */
    tb_header(&t, 1, 0, TERN_MSG_HEARTBEAT, 0);
    tb_le(&t, 1, 8);
    tb_le(&t, TERN_PEER_STATE_COUNT, 1);
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "peer state");
    tb_header(&t, 1, 0, TERN_MSG_GOODBYE, 0);
    tb_le(&t, TERN_GOODBYE_REASON_COUNT, 1);
    tb_str(&t, "", 0);
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "goodbye reason");
    tb_header(&t, 1, 0, TERN_MSG_ERROR, 0);
    tb_le(&t, 0, 2);
    tb_le(&t, 5, 8);
    tb_str(&t, "x", 1);
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "error code 0");

    /* fit_ins configs */
#define FIT_INS_BEGIN(count)                                 \
    do {                                                     \
        tb_header(&t, 1, 0, TERN_MSG_FIT_INS, 0);            \
        tb_le(&t, 4, 8);                                     \
        tb_le(&t, TERN_PAYLOAD_DELTA, 1);                    \
        tb_le(&t, 0, 4);                                     \
        tb_le(&t, (count), 2);                               \
    } while (0)
#define NO_PAYLOAD() tb_bytes(&t, (uint8_t[57]){0}, 57)
    FIT_INS_BEGIN(0);
    NO_PAYLOAD();
    tb_finish(&t);
    assert_int_equal(tern_msg_decode(t.b, t.n, NULL, &d, NULL, NULL), TERN_OK);
    FIT_INS_BEGIN(TERN_PROTO_MAX_ENTRIES + 1);
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "too many entries");
    FIT_INS_BEGIN(0xFFFF);
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "65535 entries");
    FIT_INS_BEGIN(2);
    tb_str(&t, "lr", 2), tb_le(&t, TERN_CONFIG_INT, 1), tb_le(&t, 1, 8);
    tb_str(&t, "lr", 2), tb_le(&t, TERN_CONFIG_INT, 1), tb_le(&t, 2, 8);
    NO_PAYLOAD();
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "duplicate key");
    FIT_INS_BEGIN(1);
    tb_str(&t, "lr", 2), tb_le(&t, TERN_CONFIG_FLOAT, 1);
    double nan = NAN;
    tb_bytes(&t, &nan, 8);
    NO_PAYLOAD();
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "NaN config");
    FIT_INS_BEGIN(1);
    tb_str(&t, "dp", 2), tb_le(&t, TERN_CONFIG_BOOL, 1), tb_le(&t, 2, 1);
    NO_PAYLOAD();
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "bool 2");
    FIT_INS_BEGIN(1);
    tb_str(&t, "dp", 2), tb_le(&t, 9, 1), tb_le(&t, 0, 8);
    NO_PAYLOAD();
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "config type");
    FIT_INS_BEGIN(1);
    tb_str(&t, "", 0), tb_le(&t, TERN_CONFIG_INT, 1), tb_le(&t, 2, 8);
    NO_PAYLOAD();
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "empty key");

    /* payload descriptions */
    FIT_INS_BEGIN(0);
    tb_payload(&t, 1, 1000, 100, 10, TERN_PAYLOAD_SAFETENSORS);
    tb_finish(&t);
    assert_int_equal(tern_msg_decode(t.b, t.n, NULL, &d, NULL, NULL), TERN_OK);
    FIT_INS_BEGIN(0);
    tb_payload(&t, 1, 1000, 100, 11, TERN_PAYLOAD_SAFETENSORS);
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "chunk count");
    FIT_INS_BEGIN(0);
    tb_payload(&t, 1, 1000, 0, 0, TERN_PAYLOAD_SAFETENSORS);
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "chunk size 0");
    FIT_INS_BEGIN(0);
    tb_payload(&t, 1, 1000, 100, 10, TERN_PAYLOAD_ENCODING_COUNT);
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "payload encoding");
    FIT_INS_BEGIN(0);
    tb_payload(&t, 1, 1000, 100, 10, TERN_PAYLOAD_NONE);
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "none with sizes");
    FIT_INS_BEGIN(0);
    tb_payload(&t, 1, (uint64_t)1 << 30, 1 << 20, 1024, TERN_PAYLOAD_SAFETENSORS);
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_TOO_LARGE, "1 GiB payload");
    FIT_INS_BEGIN(0);
    tb_payload(&t, 1, (uint64_t)8 << 20, 8 << 20, 1, TERN_PAYLOAD_SAFETENSORS);
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_TOO_LARGE, "chunk beyond message limit");

    /* chunks */
#define CHUNK(index, dlen)                                               \
    do {                                                                 \
        tb_header(&t, 1, 0, TERN_MSG_MODEL_CHUNK, 0);                    \
        tb_payload(&t, 1, 250, 100, 3, TERN_PAYLOAD_SAFETENSORS);        \
        tb_le(&t, (index), 4);                                           \
        tb_le(&t, (dlen), 4);                                            \
        for (int i_ = 0; i_ < (int)(dlen); i_++)                         \
            tb_le(&t, (uint64_t)i_, 1);                                  \
        tb_finish(&t);                                                   \
    } while (0)
    CHUNK(2, 50);
    assert_int_equal(tern_msg_decode(t.b, t.n, NULL, &d, NULL, NULL), TERN_OK);
    CHUNK(3, 50);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "chunk index");
    CHUNK(1, 50);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "short middle chunk");
    CHUNK(2, 51);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "long last chunk");
    CHUNK(0, 100);
    t.n -= 10; /* the data length now points past the end */
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "data past the end");

    /* welcome and evaluate_res */
    tb_header(&t, 1, 0, TERN_MSG_WELCOME, 0);
    tb_le(&t, 1, 8);
    tb_str(&t, "", 0);
    tb_le(&t, 0, 4), tb_le(&t, 0, 4), tb_le(&t, 1000, 4), tb_le(&t, 10, 4);
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "welcome max message");
    tb_header(&t, 1, 0, TERN_MSG_EVALUATE_RES, 0);
    tb_le(&t, 1, 8), tb_le(&t, 1, 8);
    double inf = INFINITY;
    tb_bytes(&t, &inf, 8);
    tb_le(&t, 0, 2);
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "infinite loss");

    /* chunk_ack: received <= credit; exactly 16 bytes of body */
#define CHUNK_ACK(id, received, credit)                  \
    do {                                                 \
        tb_header(&t, 1, 0, TERN_MSG_CHUNK_ACK, 0);      \
        tb_le(&t, (id), 8);                              \
        tb_le(&t, (received), 4);                        \
        tb_le(&t, (credit), 4);                          \
        tb_finish(&t);                                   \
    } while (0)
    CHUNK_ACK(9, 4, 4);
    assert_int_equal(tern_msg_decode(t.b, t.n, NULL, &d, NULL, NULL), TERN_OK);
    assert_int_equal(d.type, TERN_MSG_CHUNK_ACK);
    assert_int_equal(d.chunk_ack.transfer_id, 9);
    assert_int_equal(d.chunk_ack.received, 4);
    assert_int_equal(d.chunk_ack.credit, 4);
    CHUNK_ACK(9, 0, 0); /* no credit yet */
    assert_int_equal(tern_msg_decode(t.b, t.n, NULL, &d, NULL, NULL), TERN_OK);
    CHUNK_ACK(9, 0xFFFFFFFFu, 0xFFFFFFFFu);
    assert_int_equal(tern_msg_decode(t.b, t.n, NULL, &d, NULL, NULL), TERN_OK);
    CHUNK_ACK(9, 5, 4);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "received above credit");
    CHUNK_ACK(9, 0xFFFFFFFFu, 0);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "received far above credit");
    CHUNK_ACK(9, 1, 4);
    t.n -= 1; /* credit cut short */
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "truncated chunk_ack");
    CHUNK_ACK(9, 1, 4);
    t.n -= 4; /* no credit at all */
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "chunk_ack without credit");
    CHUNK_ACK(9, 1, 4);
    tb_le(&t, 0, 1);
    tb_finish(&t);
    expect_reject(&t, TERN_ERR_FORMAT, TERN_PROTO_E_MALFORMED, "chunk_ack trailing byte");
    t.b[5] = 1; /* from a newer minor version the extra byte is a field we do not know */
    assert_int_equal(tern_msg_decode(t.b, t.n, NULL, &d, NULL, NULL), TERN_OK);
    assert_int_equal(d.chunk_ack.credit, 4);
#undef HELLO
#undef FIT_INS_BEGIN
#undef NO_PAYLOAD
#undef CHUNK
#undef CHUNK_ACK
}

static void test_encode_rejections(void **state)
{
    (void)state;
    tern_msg m;
    size_t len;
    void *bytes = (void *)0x1;
    tern_error err = {{0}};
    make_sample(TERN_MSG_HELLO, &m);
    m.hello.client_name[0] = '\0';
    assert_int_equal(tern_msg_encode(&m, NULL, NULL, &bytes, &len, &err), TERN_ERR_INVALID);
    assert_ptr_equal(bytes, (void *)0x1);
    make_sample(TERN_MSG_HELLO, &m);
    memset(m.hello.api_key, 'k', sizeof m.hello.api_key); /* no terminator */
    assert_int_equal(tern_msg_encoded_size(&m, NULL, &len, NULL), TERN_ERR_INVALID);
    make_sample(TERN_MSG_HEARTBEAT, &m);
    m.flags = 0x0100;
    assert_int_equal(tern_msg_encoded_size(&m, NULL, &len, NULL), TERN_ERR_INVALID);
    m.flags = 0;
    m.type = (tern_msg_type)99;
    assert_int_equal(tern_msg_encoded_size(&m, NULL, &len, NULL), TERN_ERR_INVALID);
    make_sample(TERN_MSG_FIT_RES, &m);
    m.fit_res.metrics.entries[0].value = NAN;
    assert_int_equal(tern_msg_encoded_size(&m, NULL, &len, NULL), TERN_ERR_INVALID);
    make_sample(TERN_MSG_CHUNK_ACK, &m);
    m.chunk_ack.received = m.chunk_ack.credit + 1;
    assert_int_equal(tern_msg_encoded_size(&m, NULL, &len, &err), TERN_ERR_INVALID);
    assert_non_null(strstr(err.message, "chunk_ack"));
    bytes = (void *)0x1;
    assert_int_equal(tern_msg_encode(&m, NULL, NULL, &bytes, &len, NULL), TERN_ERR_INVALID);
    assert_ptr_equal(bytes, (void *)0x1);
    m.chunk_ack.received = m.chunk_ack.credit;
    assert_int_equal(tern_msg_encoded_size(&m, NULL, &len, NULL), TERN_OK);
    assert_int_equal(len, TERN_PROTO_HEADER_SIZE + 16);
    make_sample(TERN_MSG_MODEL_CHUNK, &m);
    uint8_t small[64];
    assert_int_equal(tern_msg_encode_into(&m, NULL, small, sizeof small, &len, &err),
                     TERN_ERR_INVALID);
    /* a message larger than the limit */
    tern_proto_limits lim = {.max_message_size = 200};
    assert_int_equal(tern_msg_encoded_size(&m, &lim, &len, &err), TERN_ERR_INVALID);

    /* helpers refuse what would not encode */
    tern_msg_config cfg = {0};
    assert_int_equal(tern_config_set_float(&cfg, "lr", INFINITY), TERN_ERR_INVALID);
    assert_int_equal(tern_config_set_int(&cfg, "", 1), TERN_ERR_INVALID);
    assert_int_equal(tern_config_set_int(&cfg, "a_key_that_is_far_too_long_to_fit", 1),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_config_set_string(&cfg, "s", "\xff"), TERN_ERR_INVALID);
    char key[16];
    for (int i = 0; i < TERN_PROTO_MAX_ENTRIES; i++) {
        snprintf(key, sizeof key, "k%d", i);
        assert_int_equal(tern_config_set_int(&cfg, key, i), TERN_OK);
    }
    assert_int_equal(tern_config_set_int(&cfg, "one_more", 1), TERN_ERR_INVALID);
    assert_int_equal(tern_config_set_float(&cfg, "k3", 2.5), TERN_OK); /* replace */
    assert_int_equal(cfg.count, TERN_PROTO_MAX_ENTRIES);
    assert_true(tern_config_find(&cfg, "k3")->f == 2.5);
    tern_msg_metrics met = {0};
    assert_int_equal(tern_metrics_set(&met, "loss", NAN), TERN_ERR_INVALID);
}

static void test_make_error(void **state)
{
    (void)state;
    tern_msg m;
    char big[600];
    memset(big, 0, sizeof big);
    for (int i = 0; i < 150; i++)
        memcpy(big + 2 * i, "\xc3\xa9", 2); /* 300 bytes of 'é' */
    tern_msg_make_error(&m, TERN_PROTO_E_MALFORMED, 3, "%s", big);
    assert_int_equal(strlen(m.error.message), 254); /* cut at a character boundary */
    tern_msg_make_error(&m, (tern_proto_code)77, 3, "bad \xff byte");
    assert_string_equal(m.error.message, "bad ? byte");
    assert_int_equal(m.error.code, TERN_PROTO_E_INTERNAL);
    assert_reencodes(&m);
    assert_int_equal(tern_proto_code_from_status(TERN_ERR_FORMAT), TERN_PROTO_E_MALFORMED);
    assert_int_equal(tern_proto_code_from_status(TERN_ERR_UNSUPPORTED), TERN_PROTO_E_VERSION);
    assert_int_equal(tern_proto_code_from_status(TERN_ERR_STATE), TERN_PROTO_E_OUT_OF_ORDER);
    assert_string_equal(tern_proto_code_name(TERN_PROTO_E_TOO_LARGE), "too_large");
    assert_string_equal(tern_proto_code_name((tern_proto_code)99), "?");

    /* the no_session reply a restarted server sends */
    tern_msg_make_error(&m, TERN_PROTO_E_NO_SESSION, 41, "no session: say HELLO");
    assert_int_equal(m.error.code, TERN_PROTO_E_NO_SESSION);
    assert_reencodes(&m);
    {
        size_t len;
        void *bytes = encode(&m, &len);
        tern_msg d;
        assert_int_equal(tern_msg_decode(bytes, len, NULL, &d, NULL, NULL), TERN_OK);
        assert_int_equal(d.error.code, TERN_PROTO_E_NO_SESSION);
        assert_int_equal(d.error.in_reply_to, 41);
        free(bytes);
    }
    m.error.code = (tern_proto_code)TERN_PROTO_CODE_COUNT; /* one past the last code */
    {
        size_t len;
        assert_int_equal(tern_msg_encoded_size(&m, NULL, &len, NULL), TERN_ERR_INVALID);
    }

    tern_proto_counters c = {{0}};
    tern_proto_count(&c, TERN_PROTO_E_TOO_LARGE);
    tern_proto_count(&c, (tern_proto_code)99);
    tern_proto_count(&c, TERN_PROTO_OK);
    tern_proto_count(&c, TERN_PROTO_E_NO_SESSION); /* the last code has its own counter */
    assert_int_equal(c.by_code[TERN_PROTO_E_TOO_LARGE], 1);
    assert_int_equal(c.by_code[TERN_PROTO_E_MALFORMED], 1);
    assert_int_equal(c.by_code[TERN_PROTO_OK], 1);
    assert_int_equal(c.by_code[TERN_PROTO_E_NO_SESSION], 1);
    tern_proto_count(&c, (tern_proto_code)TERN_PROTO_CODE_COUNT); /* one past: MALFORMED */
    assert_int_equal(c.by_code[TERN_PROTO_E_MALFORMED], 2);
}

/* Every type and code has a distinct name and every type a sender; one past the end has
 * neither. Catches a table that was not grown with its enum. */
static void test_names(void **state)
{
    (void)state;
    for (int i = 1; i < TERN_MSG_TYPE_COUNT; i++) {
        const char *name = tern_msg_type_name((tern_msg_type)i);
        assert_non_null(name);
        assert_string_not_equal(name, "?");
        assert_true(tern_msg_type_senders((tern_msg_type)i) != 0);
        for (int j = 1; j < i; j++)
            assert_string_not_equal(name, tern_msg_type_name((tern_msg_type)j));
    }
    assert_string_equal(tern_msg_type_name((tern_msg_type)0), "?");
    assert_string_equal(tern_msg_type_name((tern_msg_type)TERN_MSG_TYPE_COUNT), "?");
    assert_int_equal(tern_msg_type_senders((tern_msg_type)0), 0);
    assert_int_equal(tern_msg_type_senders((tern_msg_type)TERN_MSG_TYPE_COUNT), 0);
    assert_int_equal(TERN_MSG_CHUNK_ACK, 13);
    assert_int_equal(TERN_MSG_TYPE_COUNT, 14);
    assert_string_equal(tern_msg_type_name(TERN_MSG_CHUNK_ACK), "chunk_ack");
    assert_int_equal(tern_msg_type_senders(TERN_MSG_CHUNK_ACK),
                     TERN_MSG_FROM_CLIENT | TERN_MSG_FROM_SERVER);
    assert_int_equal(tern_msg_type_senders(TERN_MSG_HELLO), TERN_MSG_FROM_CLIENT);
    assert_int_equal(tern_msg_type_senders(TERN_MSG_WELCOME), TERN_MSG_FROM_SERVER);

    for (int i = 0; i < TERN_PROTO_CODE_COUNT; i++) {
        const char *name = tern_proto_code_name((tern_proto_code)i);
        assert_non_null(name);
        assert_string_not_equal(name, "?");
        for (int j = 0; j < i; j++)
            assert_string_not_equal(name, tern_proto_code_name((tern_proto_code)j));
    }
    assert_string_equal(tern_proto_code_name((tern_proto_code)TERN_PROTO_CODE_COUNT), "?");
    assert_int_equal(TERN_PROTO_E_NO_SESSION, 12);
    assert_int_equal(TERN_PROTO_CODE_COUNT, 13);
    assert_string_equal(tern_proto_code_name(TERN_PROTO_E_NO_SESSION), "no_session");
}

static void test_sequence(void **state)
{
    (void)state;
    tern_seq_tracker t = {0};
    assert_int_equal(tern_seq_check(&t, 0), TERN_ERR_STATE); /* 0 is never sent */
    assert_int_equal(tern_seq_check(&t, 1), TERN_OK);
    assert_int_equal(tern_seq_check(&t, 2), TERN_OK);
    assert_int_equal(tern_seq_check(&t, 2), TERN_ERR_STATE); /* replay */
    assert_int_equal(tern_seq_check(&t, 1), TERN_ERR_STATE); /* reordered */
    assert_int_equal(tern_seq_check(&t, 5), TERN_OK);        /* gap */
    assert_int_equal(tern_seq_check(&t, 4), TERN_ERR_STATE);
    assert_int_equal(tern_seq_check(&t, 6), TERN_OK);
    assert_int_equal(t.last, 6);
    assert_int_equal(t.accepted, 4);
    assert_int_equal(t.rejected, 4);
    assert_int_equal(t.gaps, 1);
    uint64_t counter = 0;
    assert_int_equal(tern_seq_next(&counter), 1);
    assert_int_equal(tern_seq_next(&counter), 2);
}

/* ---- transfers ------------------------------------------------------------------------- */

/* Byte-counting allocator: peak of live bytes. */
typedef struct { size_t live, peak; long count; } byte_count;
static void *bc_alloc(void *user, size_t size, size_t align)
{
    byte_count *b = user;
    if (align != 64)
        return NULL;
    size_t *p = aligned_alloc(align, size + align);
    if (!p)
        return NULL;
    *p = size;
    b->live += size;
    b->count++;
    if (b->live > b->peak)
        b->peak = b->live;
    return (char *)p + align;
}
static void bc_free(void *user, void *ptr)
{
    byte_count *b = user;
    if (!ptr)
        return;
    size_t *p = (size_t *)((char *)ptr - 64);
    b->live -= *p;
    free(p);
}

static void shuffle(uint32_t *v, uint32_t n, test_rng *rng)
{
    for (uint32_t i = n - 1; i > 0; i--) {
        uint32_t j = (uint32_t)(test_rng_next(rng) % (i + 1));
        uint32_t tmp = v[i];
        v[i] = v[j];
        v[j] = tmp;
    }
}

/* Encode every chunk of a payload into frames, as a sender would. */
static uint8_t **encode_chunks(const tern_payload_info *info, const uint8_t *payload,
                               size_t *lens)
{
    uint8_t **frames = calloc(info->chunk_count, sizeof *frames);
    assert_non_null(frames);
    for (uint32_t i = 0; i < info->chunk_count; i++) {
        tern_msg m = {0};
        assert_int_equal(tern_payload_chunk(info, payload, i, &m), TERN_OK);
        m.seq = i + 1;
        frames[i] = encode(&m, &lens[i]);
    }
    return frames;
}

static void test_transfer_3mb(void **state)
{
    (void)state;
    const size_t total = 3u << 20;
    const uint32_t chunk = 100000; /* 31 chunks, the last one partial */
    uint8_t *payload = malloc(total);
    assert_non_null(payload);
    test_rng rng = {99};
    for (size_t i = 0; i < total; i++)
        payload[i] = (uint8_t)test_rng_next(&rng);
    tern_payload_info info;
    assert_int_equal(tern_payload_describe(payload, total, 0xABCD, chunk,
                                           TERN_PAYLOAD_SAFETENSORS, NULL, &info, NULL),
                     TERN_OK);
    assert_int_equal(info.chunk_count, (total + chunk - 1) / chunk);
    /* The same description from a hash the caller already has, without the bytes. */
    tern_payload_info hashed;
    assert_int_equal(tern_payload_describe_hashed(info.sha256, total, 0xABCD, chunk,
                                                  TERN_PAYLOAD_SAFETENSORS, NULL, &hashed, NULL),
                     TERN_OK);
    assert_true(hashed.transfer_id == info.transfer_id && hashed.total_size == info.total_size &&
                hashed.chunk_size == info.chunk_size && hashed.chunk_count == info.chunk_count &&
                hashed.encoding == info.encoding);
    assert_memory_equal(hashed.sha256, info.sha256, 32);
    assert_int_equal(tern_payload_describe_hashed(NULL, total, 0xABCD, chunk,
                                                  TERN_PAYLOAD_SAFETENSORS, NULL, &hashed, NULL),
                     TERN_ERR_INVALID);
    size_t *lens = calloc(info.chunk_count, sizeof *lens);
    assert_non_null(lens);
    uint8_t **frames = encode_chunks(&info, payload, lens);

    /* order: shuffled, with a few duplicates mixed in */
    uint32_t n = info.chunk_count, order[64];
    for (uint32_t i = 0; i < n; i++)
        order[i] = i;
    shuffle(order, n, &rng);

    for (int pass = 0; pass < 2; pass++) {
        bool corrupt = pass == 1;
        tern_transfer *t = NULL;
        tern_error err = {{0}};
        byte_count bc = {0};
        tern_allocator a = {bc_alloc, bc_free, &bc};
        /* the receiver learns the transfer from its first chunk */
        tern_msg first;
        assert_int_equal(tern_msg_decode(frames[order[0]], lens[order[0]], NULL, &first, NULL,
                                         NULL),
                         TERN_OK);
        assert_int_equal(tern_transfer_create(&first.chunk.info, NULL, &a, &t, &err), TERN_OK);
        /* memory bounded by the announced total */
        assert_true(bc.peak <= total + n / 8 + 1 + 1024);
        assert_true(tern_transfer_memory(t) <= total + n / 8 + 1 + 1024);
        tern_status last = TERN_OK;
        int dups = 0;
        for (uint32_t k = 0; k < n; k++) {
            uint32_t i = order[k];
            uint8_t *frame = frames[i];
            uint8_t *copy = NULL;
            if (corrupt && i == n / 2) { /* flip a data byte in transit */
                copy = malloc(lens[i]);
                assert_non_null(copy);
                memcpy(copy, frame, lens[i]);
                copy[lens[i] - 1000] ^= 0x40;
                frame = copy;
            }
            tern_msg m;
            assert_int_equal(tern_msg_decode(frame, lens[i], NULL, &m, NULL, &err), TERN_OK);
            last = tern_transfer_add(t, &m.chunk, &err);
            if (k + 1 < n) {
                assert_int_equal(last, TERN_OK);
                if (k % 7 == 3) { /* the same chunk again */
                    assert_int_equal(tern_transfer_add(t, &m.chunk, &err), TERN_ERR_EXISTS);
                    dups++;
                }
                assert_false(tern_transfer_complete(t));
            }
            free(copy);
        }
        assert_true(dups > 2);
        assert_int_equal(tern_transfer_received(t), n);
        assert_true(bc.peak <= total + n / 8 + 1 + 1024); /* never grew past the bound */
        if (!corrupt) {
            assert_int_equal(last, TERN_OK);
            assert_true(tern_transfer_complete(t));
            const void *data;
            size_t len;
            assert_int_equal(tern_transfer_data(t, &data, &len), TERN_OK);
            assert_int_equal(len, total);
            assert_memory_equal(data, payload, total);
            void *owned;
            assert_int_equal(tern_transfer_take(t, &owned, &len), TERN_OK);
            assert_int_equal(tern_transfer_data(t, &data, &len), TERN_ERR_STATE);
            tern_proto_free(&a, owned);
        } else {
            assert_int_equal(last, TERN_ERR_FORMAT); /* hash mismatch */
            assert_non_null(strstr(err.message, "SHA-256"));
            assert_true(tern_transfer_failed(t));
            assert_false(tern_transfer_complete(t));
            const void *data;
            size_t len;
            assert_int_equal(tern_transfer_data(t, &data, &len), TERN_ERR_STATE);
            assert_true(bc.live < 4096); /* the data was discarded */
            tern_msg m;
            assert_int_equal(tern_msg_decode(frames[0], lens[0], NULL, &m, NULL, NULL), TERN_OK);
            assert_int_equal(tern_transfer_add(t, &m.chunk, &err), TERN_ERR_STATE);
        }
        tern_transfer_destroy(&t);
        assert_null(t);
        assert_int_equal(bc.live, 0);
    }

    /* chunks that do not belong */
    tern_transfer *t = NULL;
    assert_int_equal(tern_transfer_create(&info, NULL, NULL, &t, NULL), TERN_OK);
    tern_msg m;
    assert_int_equal(tern_msg_decode(frames[1], lens[1], NULL, &m, NULL, NULL), TERN_OK);
    tern_msg_chunk k = m.chunk;
    k.info.transfer_id++;
    assert_int_equal(tern_transfer_add(t, &k, NULL), TERN_ERR_FORMAT);
    k = m.chunk;
    k.info.sha256[5] ^= 1;
    assert_int_equal(tern_transfer_add(t, &k, NULL), TERN_ERR_FORMAT);
    k = m.chunk;
    k.info.total_size--;
    assert_int_equal(tern_transfer_add(t, &k, NULL), TERN_ERR_FORMAT);
    k = m.chunk;
    k.index = n; /* out of range */
    assert_int_equal(tern_transfer_add(t, &k, NULL), TERN_ERR_FORMAT);
    k = m.chunk;
    k.len--;
    assert_int_equal(tern_transfer_add(t, &k, NULL), TERN_ERR_FORMAT);
    assert_int_equal(tern_transfer_received(t), 0);
    assert_int_equal(tern_transfer_add(t, &m.chunk, NULL), TERN_OK);
    assert_int_equal(tern_transfer_received(t), 1);
    tern_transfer_destroy(&t);
    tern_transfer_destroy(&t); /* NULL is fine */

    for (uint32_t i = 0; i < n; i++)
        free(frames[i]);
    free(frames);
    free(lens);
    free(payload);
}

/* The buffer pool: model-sized blocks come back for the next request of about their size, at
 * most `keep` are held, small blocks and poor fits go to the C library, and a transfer made with
 * the pool reassembles into the block the previous one released. */
static void test_buffer_pool(void **state)
{
    (void)state;
    tern_buffer_pool *pool = NULL;
    tern_error err = {{0}};
    assert_int_equal(tern_buffer_pool_create(5000, &pool, &err), TERN_ERR_INVALID);
    assert_null(pool);
    assert_int_equal(tern_buffer_pool_create(2, NULL, &err), TERN_ERR_INVALID);
    assert_int_equal(tern_buffer_pool_create(2, &pool, &err), TERN_OK);
    tern_allocator a = tern_buffer_pool_allocator(pool);
    uint64_t reuses, fresh;
    const size_t mb = 1u << 20;
    uint8_t *p1 = a.alloc(a.user, mb, 64), *p2 = a.alloc(a.user, mb, 64);
    assert_non_null(p1);
    assert_non_null(p2);
    assert_int_equal((uintptr_t)p1 % 64, 0);
    assert_int_equal((uintptr_t)p2 % 64, 0);
    memset(p1, 1, mb);
    memset(p2, 2, mb);
    assert_null(a.alloc(a.user, mb, 128)); /* alignment beyond the header */
    tern_buffer_pool_counts(pool, &reuses, &fresh);
    assert_int_equal(reuses, 0);
    assert_int_equal(fresh, 2);
    assert_int_equal(tern_buffer_pool_kept_bytes(pool), 0);
    a.free(a.user, p1);
    a.free(a.user, p2);
    assert_true(tern_buffer_pool_kept_bytes(pool) >= 2 * mb);
    uint8_t *p3 = a.alloc(a.user, mb - 100, 64); /* a kept block serves it */
    assert_true(p3 == p1 || p3 == p2);
    tern_buffer_pool_counts(pool, &reuses, &fresh);
    assert_int_equal(reuses, 1);
    assert_int_equal(fresh, 2);
    uint8_t *big = a.alloc(a.user, 3 * mb, 64);   /* larger than any kept block */
    uint8_t *small = a.alloc(a.user, mb / 4, 64); /* a kept block would waste over half */
    uint8_t *tiny = a.alloc(a.user, 100, 64);     /* below TERN_BUFFER_POOL_MIN: never kept */
    assert_non_null(big);
    assert_non_null(small);
    assert_non_null(tiny);
    assert_true(small != p1 && small != p2);
    tern_buffer_pool_counts(pool, &reuses, &fresh);
    assert_int_equal(reuses, 1);
    assert_int_equal(fresh, 4);
    size_t kept = tern_buffer_pool_kept_bytes(pool); /* one 1 MiB block */
    a.free(a.user, tiny);
    assert_int_equal(tern_buffer_pool_kept_bytes(pool), kept);
    a.free(a.user, p3);
    a.free(a.user, big); /* a third block: only two are kept */
    a.free(a.user, small);
    a.free(a.user, NULL);
    assert_true(tern_buffer_pool_kept_bytes(pool) <= 2 * (3 * mb + 64));
    tern_buffer_pool_destroy(&pool);

    /* Two transfers of the same payload, one after the other: the second reuses the block. */
    assert_int_equal(tern_buffer_pool_create(1, &pool, &err), TERN_OK);
    a = tern_buffer_pool_allocator(pool);
    const size_t total = 300000;
    uint8_t *payload = malloc(total);
    assert_non_null(payload);
    for (size_t i = 0; i < total; i++)
        payload[i] = (uint8_t)(i * 7 + 3);
    tern_payload_info info;
    assert_int_equal(tern_payload_describe(payload, total, 5, 70000, TERN_PAYLOAD_SAFETENSORS,
                                           NULL, &info, NULL),
                     TERN_OK);
    void *prev = NULL;
    for (int round = 0; round < 2; round++) {
        tern_transfer *t = NULL;
        assert_int_equal(tern_transfer_create(&info, NULL, &a, &t, &err), TERN_OK);
        for (uint32_t i = 0; i < info.chunk_count; i++) {
            tern_msg m;
            assert_int_equal(tern_payload_chunk(&info, payload, i, &m), TERN_OK);
            assert_int_equal(tern_transfer_add(t, &m.chunk, &err), TERN_OK);
        }
        assert_true(tern_transfer_complete(t));
        void *data;
        size_t len;
        assert_int_equal(tern_transfer_take(t, &data, &len), TERN_OK);
        assert_int_equal(len, total);
        assert_memory_equal(data, payload, total);
        tern_buffer_pool_counts(pool, &reuses, &fresh);
        assert_int_equal(reuses, (uint64_t)round);
        if (round == 1)
            assert_ptr_equal(data, prev);
        prev = data;
        tern_transfer_destroy(&t);
        tern_proto_free(&a, data);
    }
    free(payload);
    tern_buffer_pool_destroy(&pool);
    assert_null(pool);
    tern_buffer_pool_destroy(&pool);

    /* keep = 0: nothing is kept. */
    assert_int_equal(tern_buffer_pool_create(0, &pool, &err), TERN_OK);
    a = tern_buffer_pool_allocator(pool);
    p1 = a.alloc(a.user, mb, 64);
    assert_non_null(p1);
    a.free(a.user, p1);
    assert_int_equal(tern_buffer_pool_kept_bytes(pool), 0);
    tern_buffer_pool_destroy(&pool);
}

/* The hash runs as chunks arrive (tern_transfer_hash_ready after each, or all at the end): in
 * order, out of order (held back until the gap fills) and
 * with a corrupt chunk that arrives first, last or in the middle, completion gives the same
 * verdict as hashing the whole. */
static void test_transfer_incremental_hash(void **state)
{
    (void)state;
    const size_t total = 50000;
    const uint32_t chunk = 4096; /* 13 chunks, the last one partial */
    uint8_t *payload = malloc(total), *bad = malloc(chunk);
    assert_non_null(payload);
    assert_non_null(bad);
    test_rng rng = {7};
    for (size_t i = 0; i < total; i++)
        payload[i] = (uint8_t)test_rng_next(&rng);
    tern_payload_info info;
    assert_int_equal(tern_payload_describe(payload, total, 9, chunk, TERN_PAYLOAD_SAFETENSORS,
                                           NULL, &info, NULL),
                     TERN_OK);
    uint32_t n = info.chunk_count, order[16];
    for (int pattern = 0; pattern < 4; pattern++) {
        for (int corrupt = -1; corrupt < (int)n; corrupt += corrupt < 0 ? 1 : 6) {
            for (uint32_t i = 0; i < n; i++) /* 0 in order, 1 reversed, 2 odd then even, 3 random */
                order[i] = pattern == 1 ? n - 1 - i
                           : pattern == 2 ? (i < n / 2 ? 2 * i + 1 : 2 * (i - n / 2))
                                          : i;
            if (pattern == 3)
                shuffle(order, n, &rng);
            tern_transfer *t = NULL;
            tern_error err = {{0}};
            assert_int_equal(tern_transfer_create(&info, NULL, NULL, &t, &err), TERN_OK);
            tern_status last = TERN_OK;
            for (uint32_t k = 0; k < n; k++) {
                tern_msg m;
                assert_int_equal(tern_payload_chunk(&info, payload, order[k], &m), TERN_OK);
                if ((int)order[k] == corrupt) {
                    memcpy(bad, m.chunk.data, m.chunk.len);
                    bad[m.chunk.len / 2] ^= 0x10;
                    m.chunk.data = bad;
                }
                last = tern_transfer_add(t, &m.chunk, &err);
                if (k + 1 < n) {
                    assert_int_equal(last, TERN_OK);
                    if (pattern != 2) /* as receivers do after the ack; pattern 2 hashes at the end */
                        assert_int_equal(tern_transfer_hash_ready(t, &err), TERN_OK);
                }
            }
            assert_int_equal(tern_transfer_hash_ready(t, &err), TERN_OK); /* finished: no-op */
            if (corrupt < 0) {
                assert_int_equal(last, TERN_OK);
                const void *data;
                size_t len;
                assert_int_equal(tern_transfer_data(t, &data, &len), TERN_OK);
                assert_memory_equal(data, payload, total);
            } else {
                assert_int_equal(last, TERN_ERR_FORMAT);
                assert_true(tern_transfer_failed(t));
            }
            tern_transfer_destroy(&t);
        }
    }
    assert_int_equal(tern_transfer_hash_ready(NULL, NULL), TERN_ERR_INVALID);
    free(bad);
    free(payload);
}

static void test_transfer_limits(void **state)
{
    (void)state;
    byte_count bc = {0};
    tern_allocator a = {bc_alloc, bc_free, &bc};
    tern_transfer *t = NULL;
    tern_error err = {{0}};
    /* an announcement beyond the limit is refused before anything is allocated */
    tern_payload_info big = {.transfer_id = 1, .total_size = (uint64_t)1 << 30,
                             .chunk_size = 1 << 20, .chunk_count = 1024,
                             .encoding = TERN_PAYLOAD_SAFETENSORS};
    assert_int_equal(tern_transfer_create(&big, NULL, &a, &t, &err), TERN_ERR_FORMAT);
    assert_null(t);
    assert_int_equal(bc.count, 0);
    tern_proto_limits lim = {.max_transfer_size = 1000};
    tern_payload_info small = {.transfer_id = 1, .total_size = 1001, .chunk_size = 100,
                               .chunk_count = 11, .encoding = TERN_PAYLOAD_SAFETENSORS};
    assert_int_equal(tern_transfer_create(&small, &lim, &a, &t, &err), TERN_ERR_FORMAT);
    assert_int_equal(bc.count, 0);
    small.total_size = 1000;
    small.chunk_count = 10;
    assert_int_equal(tern_transfer_create(&small, &lim, &a, &t, &err), TERN_OK);
    assert_true(bc.peak <= 1000 + 2 + 1024);
    tern_transfer_destroy(&t);
    small.chunk_count = 9; /* inconsistent */
    assert_int_equal(tern_transfer_create(&small, &lim, &a, &t, &err), TERN_ERR_FORMAT);
    tern_payload_info none = {0};
    assert_int_equal(tern_transfer_create(&none, NULL, &a, &t, &err), TERN_ERR_FORMAT);
    assert_int_equal(bc.live, 0);

    /* describe: limits on the sender side */
    uint8_t data[10] = {0};
    tern_payload_info info;
    assert_int_equal(tern_payload_describe(data, 0, 1, 4, TERN_PAYLOAD_SAFETENSORS, NULL, &info,
                                           NULL),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_payload_describe(data, 10, 1, 0, TERN_PAYLOAD_SAFETENSORS, NULL, &info,
                                           NULL),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_payload_describe(data, 10, 1, 4, TERN_PAYLOAD_NONE, NULL, &info, NULL),
                     TERN_ERR_INVALID);
    tern_proto_limits tiny = {.max_transfer_size = 9};
    assert_int_equal(tern_payload_describe(data, 10, 1, 4, TERN_PAYLOAD_SAFETENSORS, &tiny,
                                           &info, NULL),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_payload_describe(data, 10, 1, TERN_PROTO_DEFAULT_MAX_MESSAGE,
                                           TERN_PAYLOAD_SAFETENSORS, NULL, &info, NULL),
                     TERN_ERR_INVALID);
    assert_int_equal(tern_payload_describe(data, 10, 1, 4, TERN_PAYLOAD_SAFETENSORS, NULL, &info,
                                           NULL),
                     TERN_OK);
    assert_int_equal(info.chunk_count, 3);
    tern_msg m;
    assert_int_equal(tern_payload_chunk(&info, data, 3, &m), TERN_ERR_INVALID);
    assert_int_equal(tern_payload_chunk(&info, data, 2, &m), TERN_OK);
    assert_int_equal(m.chunk.len, 2);
}

static void test_alloc_failures(void **state)
{
    (void)state;
    /* encode */
    tern_msg m;
    make_sample(TERN_MSG_FIT_INS, &m);
    for (long fail = 1;; fail++) {
        test_alloc_state s = {0, fail, 0};
        tern_allocator a = test_failing_allocator(&s);
        void *bytes = NULL;
        size_t len = 0;
        tern_status st = tern_msg_encode(&m, NULL, &a, &bytes, &len, NULL);
        if (st == TERN_OK) {
            tern_proto_free(&a, bytes);
            assert_int_equal(s.live, 0);
            break;
        }
        assert_int_equal(st, TERN_ERR_NOMEM);
        assert_null(bytes);
        assert_int_equal(s.live, 0);
    }
    /* a whole transfer: create, add every chunk, take */
    uint8_t payload[1000];
    for (int i = 0; i < 1000; i++)
        payload[i] = (uint8_t)(i * 13);
    tern_payload_info info;
    assert_int_equal(tern_payload_describe(payload, sizeof payload, 3, 128,
                                           TERN_PAYLOAD_DELTA, NULL, &info, NULL),
                     TERN_OK);
    int failures = 0;
    for (long fail = 1;; fail++) {
        test_alloc_state s = {0, fail, 0};
        tern_allocator a = test_failing_allocator(&s);
        tern_transfer *t = NULL;
        tern_status st = tern_transfer_create(&info, NULL, &a, &t, NULL);
        if (st != TERN_OK) {
            assert_int_equal(st, TERN_ERR_NOMEM);
            assert_null(t);
            assert_int_equal(s.live, 0);
            failures++;
            continue;
        }
        for (uint32_t i = 0; i < info.chunk_count; i++) {
            tern_msg c;
            assert_int_equal(tern_payload_chunk(&info, payload, i, &c), TERN_OK);
            assert_int_equal(tern_transfer_add(t, &c.chunk, NULL), TERN_OK);
        }
        void *data;
        size_t len;
        assert_int_equal(tern_transfer_take(t, &data, &len), TERN_OK);
        assert_memory_equal(data, payload, sizeof payload);
        tern_transfer_destroy(&t);
        tern_proto_free(&a, data);
        assert_int_equal(s.live, 0);
        break;
    }
    assert_int_equal(failures, 3); /* struct, bitmap, buffer */
}

/* ---- flow control ---------------------------------------------------------------------- */

static tern_msg_chunk_ack ack_of(uint64_t id, uint32_t received, uint32_t credit)
{
    return (tern_msg_chunk_ack){.transfer_id = id, .received = received, .credit = credit};
}

/* Every chunk index the window lets out until it runs out of credit. */
static uint32_t drain(tern_send_window *w, uint32_t *sent)
{
    uint32_t n = 0, i;
    while (tern_send_window_ready(w, &i)) {
        assert_int_equal(i, w->next);
        if (sent)
            sent[n] = i;
        n++;
        tern_send_window_sent(w);
    }
    return n;
}

static void test_send_window(void **state)
{
    (void)state;
    tern_payload_info info = sample_payload(40); /* 300 bytes in chunks of 128: 3 chunks */
    assert_int_equal(info.chunk_count, 3);
    tern_send_window w = {0};
    tern_send_window_start(&w, &info);
    assert_memory_equal(&w.info, &info, sizeof info);
    assert_false(w.done);
    uint32_t idx = 99;
    assert_false(tern_send_window_ready(&w, &idx)); /* nothing before the first credit */
    assert_int_equal(idx, 99);
    tern_send_window_sent(&w); /* without credit: nothing happens */
    assert_int_equal(w.next, 0);

    /* normal flow with a window of 2 */
    tern_msg_chunk_ack a = ack_of(40, 0, 2);
    assert_int_equal(tern_send_window_ack(&w, &a), TERN_OK);
    uint32_t sent[8];
    assert_int_equal(drain(&w, sent), 2);
    assert_int_equal(sent[0], 0);
    assert_int_equal(sent[1], 1);
    assert_false(tern_send_window_ready(&w, &idx));
    tern_send_window_sent(&w); /* beyond credit: ignored */
    assert_int_equal(w.next, 2);
    a = ack_of(40, 1, 3);
    assert_int_equal(tern_send_window_ack(&w, &a), TERN_OK);
    assert_int_equal(w.credit, 3);
    assert_int_equal(w.acked, 1);
    assert_int_equal(drain(&w, sent), 1);
    assert_int_equal(sent[0], 2);
    a = ack_of(40, 2, 3);
    assert_int_equal(tern_send_window_ack(&w, &a), TERN_OK);
    assert_false(w.done);
    assert_int_equal(drain(&w, NULL), 0);

    /* refused: the window stays as it was */
    tern_send_window before = w;
    a = ack_of(41, 3, 3);
    assert_int_equal(tern_send_window_ack(&w, &a), TERN_ERR_FORMAT); /* another transfer */
    a = ack_of(40, 2, 2);
    assert_int_equal(tern_send_window_ack(&w, &a), TERN_ERR_FORMAT); /* credit decreases */
    a = ack_of(40, 2, 4);
    assert_int_equal(tern_send_window_ack(&w, &a), TERN_ERR_FORMAT); /* credit > chunk_count */
    a = ack_of(40, 1, 3);
    assert_int_equal(tern_send_window_ack(&w, &a), TERN_ERR_FORMAT); /* received decreases */
    a = ack_of(40, 3, 3);
    a.received = 4;
    assert_int_equal(tern_send_window_ack(&w, &a), TERN_ERR_FORMAT); /* received > credit */
    assert_memory_equal(&w, &before, sizeof w);
    assert_int_equal(tern_send_window_ack(NULL, &a), TERN_ERR_INVALID);
    assert_int_equal(tern_send_window_ack(&w, NULL), TERN_ERR_INVALID);
    assert_false(tern_send_window_ready(NULL, &idx));
    assert_false(tern_send_window_ready(&w, NULL));

    /* done; the same ack again is harmless */
    a = ack_of(40, 3, 3);
    assert_int_equal(tern_send_window_ack(&w, &a), TERN_OK);
    assert_true(w.done);
    assert_int_equal(tern_send_window_ack(&w, &a), TERN_OK);
    assert_true(w.done);
    assert_false(tern_send_window_ready(&w, &idx));

    /* a cache hit: done at once, nothing is ever sent */
    tern_send_window_start(&w, &info);
    tern_msg m;
    tern_chunk_ack_done(&m, &info);
    assert_int_equal(tern_send_window_ack(&w, &m.chunk_ack), TERN_OK);
    assert_true(w.done);
    assert_int_equal(w.credit, 3);
    assert_false(tern_send_window_ready(&w, &idx));
    assert_int_equal(w.next, 0);

    /* start resets everything from an earlier payload */
    tern_payload_info other = sample_payload(50);
    tern_send_window_start(&w, &other);
    assert_false(w.done);
    assert_int_equal(w.credit, 0);
    assert_int_equal(w.acked, 0);
    a = ack_of(40, 3, 3);
    assert_int_equal(tern_send_window_ack(&w, &a), TERN_ERR_FORMAT); /* the old transfer */
    a = ack_of(50, 0, 0); /* a zero credit is no credit, and not a decrease */
    assert_int_equal(tern_send_window_ack(&w, &a), TERN_OK);
    assert_false(tern_send_window_ready(&w, &idx));
    a = ack_of(50, 0, 3); /* all at once */
    assert_int_equal(tern_send_window_ack(&w, &a), TERN_OK);
    assert_int_equal(drain(&w, NULL), 3);
    assert_int_equal(w.next, 3);
}

static void test_chunk_ack_helpers(void **state)
{
    (void)state;
    uint8_t payload[1000];
    for (int i = 0; i < 1000; i++)
        payload[i] = (uint8_t)(i * 31 + 1);
    tern_payload_info info; /* 10 chunks of 100 */
    assert_int_equal(tern_payload_describe(payload, sizeof payload, 0xFEEDull, 100,
                                           TERN_PAYLOAD_DELTA, NULL, &info, NULL),
                     TERN_OK);
    tern_transfer *t = NULL;
    assert_int_equal(tern_transfer_create(&info, NULL, NULL, &t, NULL), TERN_OK);

    tern_msg m;
    memset(&m, 0xCD, sizeof m);
    tern_chunk_ack_make(&m, t, 4); /* the first grant, before any chunk */
    assert_int_equal(m.type, TERN_MSG_CHUNK_ACK);
    assert_int_equal(m.seq, 0);
    assert_int_equal(m.round, 0);
    assert_int_equal(m.flags, 0);
    assert_int_equal(m.chunk_ack.transfer_id, 0xFEEDull);
    assert_int_equal(m.chunk_ack.received, 0);
    assert_int_equal(m.chunk_ack.credit, 4);
    assert_reencodes(&m);
    tern_chunk_ack_make(&m, t, 0); /* a window of 0 counts as 1 */
    assert_int_equal(m.chunk_ack.credit, 1);
    tern_chunk_ack_make(&m, t, 0xFFFFFFFFu); /* no overflow; capped at the count */
    assert_int_equal(m.chunk_ack.credit, 10);
    tern_chunk_ack_make(&m, t, 50);
    assert_int_equal(m.chunk_ack.credit, 10);

    for (uint32_t i = 0; i < 10; i++) {
        tern_msg c;
        assert_int_equal(tern_payload_chunk(&info, payload, i, &c), TERN_OK);
        assert_int_equal(tern_transfer_add(t, &c.chunk, NULL), TERN_OK);
        tern_chunk_ack_make(&m, t, 4);
        assert_int_equal(m.chunk_ack.received, i + 1);
        assert_int_equal(m.chunk_ack.credit, i + 5 < 10 ? i + 5 : 10);
        assert_reencodes(&m);
    }
    assert_true(tern_transfer_complete(t));
    assert_int_equal(m.chunk_ack.received, info.chunk_count); /* done */
    assert_int_equal(m.chunk_ack.credit, info.chunk_count);
    tern_transfer_destroy(&t);

    memset(&m, 0xCD, sizeof m);
    tern_chunk_ack_done(&m, &info);
    assert_int_equal(m.type, TERN_MSG_CHUNK_ACK);
    assert_int_equal(m.seq, 0);
    assert_int_equal(m.flags, 0);
    assert_int_equal(m.chunk_ack.transfer_id, 0xFEEDull);
    assert_int_equal(m.chunk_ack.received, 10);
    assert_int_equal(m.chunk_ack.credit, 10);
    assert_reencodes(&m);
}

/* A sender and a receiver under credit, through encoded frames. Each step the sender sends
 * everything its credit allows, the receiver takes those chunks (newest first: order does not
 * matter) and acks each, and the sender applies the acks. Chunks in flight never exceed the
 * window, and the payload arrives intact. */
static void test_flow_control(void **state)
{
    (void)state;
    enum { WINDOW = 3 };
    uint8_t payload[2000];
    for (int i = 0; i < 2000; i++)
        payload[i] = (uint8_t)(i * 17 + 5);
    tern_payload_info info; /* 27 chunks of 75, the last one partial */
    assert_int_equal(tern_payload_describe(payload, sizeof payload, 77, 75,
                                           TERN_PAYLOAD_SAFETENSORS, NULL, &info, NULL),
                     TERN_OK);
    assert_int_equal(info.chunk_count, 27);
    tern_send_window w = {0};
    tern_send_window_start(&w, &info);
    tern_transfer *t = NULL;
    assert_int_equal(tern_transfer_create(&info, NULL, NULL, &t, NULL), TERN_OK);

    uint64_t seq_sender = 0, seq_receiver = 0;
    void *acks[WINDOW + 1], *chunks[WINDOW];
    size_t ack_lens[WINDOW + 1], chunk_lens[WINDOW];
    tern_msg m;
    tern_chunk_ack_make(&m, t, WINDOW); /* the first grant, before any chunk */
    m.seq = tern_seq_next(&seq_receiver);
    acks[0] = encode(&m, &ack_lens[0]);
    size_t nacks = 1;
    int steps = 0;
    while (!w.done) {
        assert_true(++steps <= 100);
        for (size_t k = 0; k < nacks; k++) { /* sender: apply the acks */
            tern_msg d;
            assert_int_equal(tern_msg_decode(acks[k], ack_lens[k], NULL, &d, NULL, NULL),
                             TERN_OK);
            assert_int_equal(tern_send_window_ack(&w, &d.chunk_ack), TERN_OK);
            free(acks[k]);
        }
        size_t nchunks = 0;
        uint32_t i;
        while (tern_send_window_ready(&w, &i)) { /* sender: send within credit */
            assert_true(nchunks < WINDOW);
            tern_msg c;
            assert_int_equal(tern_payload_chunk(&info, payload, i, &c), TERN_OK);
            c.seq = tern_seq_next(&seq_sender);
            chunks[nchunks] = encode(&c, &chunk_lens[nchunks]);
            nchunks++;
            tern_send_window_sent(&w);
        }
        assert_true(nchunks > 0 || w.done);
        nacks = 0;
        while (nchunks > 0) { /* receiver: add each chunk and ack it */
            nchunks--;
            tern_msg d;
            assert_int_equal(tern_msg_decode(chunks[nchunks], chunk_lens[nchunks], NULL, &d,
                                             NULL, NULL),
                             TERN_OK);
            assert_int_equal(tern_transfer_add(t, &d.chunk, NULL), TERN_OK);
            free(chunks[nchunks]);
            tern_chunk_ack_make(&m, t, WINDOW);
            m.seq = tern_seq_next(&seq_receiver);
            acks[nacks] = encode(&m, &ack_lens[nacks]);
            nacks++;
        }
    }
    assert_int_equal(nacks, 0);
    assert_true(tern_transfer_complete(t));
    assert_int_equal(w.next, info.chunk_count);
    assert_int_equal(w.acked, info.chunk_count);
    assert_int_equal(steps, 10); /* 9 full windows of 3, then the final ack */
    const void *data;
    size_t len;
    assert_int_equal(tern_transfer_data(t, &data, &len), TERN_OK);
    assert_int_equal(len, sizeof payload);
    assert_memory_equal(data, payload, sizeof payload);
    tern_transfer_destroy(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_truncation),
        cmocka_unit_test(test_random_corruption),
        cmocka_unit_test(test_header_rejections),
        cmocka_unit_test(test_field_rejections),
        cmocka_unit_test(test_encode_rejections),
        cmocka_unit_test(test_make_error),
        cmocka_unit_test(test_sequence),
        cmocka_unit_test(test_transfer_3mb),
        cmocka_unit_test(test_transfer_limits),
        cmocka_unit_test(test_buffer_pool),
        cmocka_unit_test(test_transfer_incremental_hash),
        cmocka_unit_test(test_alloc_failures),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_send_window),
        cmocka_unit_test(test_chunk_ack_helpers),
        cmocka_unit_test(test_flow_control),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
