/* Federated-learning wire protocol: message encoding, decoding and payload transfer.
 *
 * Every message is one ZeroMQ frame: a fixed 32-byte little-endian header followed by a body
 * whose layout depends on the message type (docs/protocol.md has the byte layout of each).
 * This module has no sockets: the server (ROUTER) and the clients (DEALER) hand it the frame
 * bytes they receive and send the bytes it produces.
 *
 * Decoding validates everything before the caller sees it: sizes against tern_proto_limits
 * (checked before anything is read or allocated), every length inside the buffer, counts within
 * their maxima, strings valid UTF-8 without NUL bytes, enums in range, floats finite, and the
 * protocol version. Decoded strings are copied into fixed arrays inside tern_msg; only the bytes
 * of a model chunk are borrowed from the input buffer.
 *
 * Payloads (safetensors bytes of a model or an update) travel as MODEL_CHUNK messages, each
 * self-describing (transfer id, total size, chunk size and count, SHA-256 of the whole); a
 * tern_transfer on the receiving side reassembles them in any order and checks the hash. The
 * receiver paces the sender with CHUNK_ACK credit: tern_chunk_ack_make on the receiving side,
 * a tern_send_window on the sending side. */
#ifndef TERN_PROTOCOL_H
#define TERN_PROTOCOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tern/alloc.h"
#include "tern/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- constants ------------------------------------------------------------------------- */

#define TERN_PROTO_MAGIC "TERN"       /* first four bytes of every message */
#define TERN_PROTO_VERSION_MAJOR 1    /* a different major version is rejected */
#define TERN_PROTO_VERSION_MINOR 0    /* a newer minor version is accepted (see docs) */
#define TERN_PROTO_HEADER_SIZE 32

/* Field maxima, in bytes of UTF-8 (the arrays below hold one more byte for the NUL). */
#define TERN_PROTO_MAX_NAME 64        /* client name */
#define TERN_PROTO_MAX_API_KEY 128    /* API key as typed by the user */
#define TERN_PROTO_MAX_VERSION 32     /* software version strings */
#define TERN_PROTO_MAX_KEY 31         /* config and metric keys */
#define TERN_PROTO_MAX_STRING_VALUE 63 /* string config values */
#define TERN_PROTO_MAX_TEXT 255       /* error and goodbye messages */
#define TERN_PROTO_MAX_ENTRIES 32     /* config entries or metrics per message */

/* Defaults used when a tern_proto_limits field is 0. */
#define TERN_PROTO_DEFAULT_MAX_MESSAGE (2u << 20)              /* 2 MiB per frame */
#define TERN_PROTO_DEFAULT_MAX_TRANSFER ((uint64_t)256 << 20)  /* 256 MiB per payload */
#define TERN_PROTO_DEFAULT_CHUNK (1u << 20)                    /* 1 MiB per chunk */
/* Hard ceilings no configuration can exceed. */
#define TERN_PROTO_HARD_MAX_MESSAGE (64u << 20)
#define TERN_PROTO_HARD_MAX_TRANSFER ((uint64_t)4 << 30)
/* Bytes of a MODEL_CHUNK message other than its data: header + fixed fields. A chunk of size c
 * needs a frame limit of at least c + TERN_PROTO_CHUNK_OVERHEAD. */
#define TERN_PROTO_CHUNK_OVERHEAD (TERN_PROTO_HEADER_SIZE + 65)

/* Receiver limits. Zero fields mean the default; values above the hard ceilings are clamped. */
typedef struct tern_proto_limits {
    uint32_t max_message_size;  /* whole frame, header included */
    uint64_t max_transfer_size; /* announced total of one payload */
} tern_proto_limits;

/* ---- enums ------------------------------------------------------------------------------ */

typedef enum tern_msg_type {
    TERN_MSG_HELLO = 1,         /* client -> server: identify and authenticate */
    TERN_MSG_WELCOME = 2,       /* server -> client: session accepted, negotiated settings */
    TERN_MSG_HEARTBEAT = 3,     /* both ways: liveness */
    TERN_MSG_FIT_INS = 4,       /* server -> client: train on this model */
    TERN_MSG_FIT_RES = 5,       /* client -> server: the update */
    TERN_MSG_EVALUATE_INS = 6,  /* server -> client: evaluate this model */
    TERN_MSG_EVALUATE_RES = 7,  /* client -> server: evaluation metrics */
    TERN_MSG_MODEL_REQUEST = 8, /* client -> server: send me a model version */
    TERN_MSG_MODEL_INFO = 9,    /* server -> client: the model that follows in chunks */
    TERN_MSG_MODEL_CHUNK = 10,  /* both ways: one piece of a payload */
    TERN_MSG_ERROR = 11,        /* both ways: a request was refused */
    TERN_MSG_GOODBYE = 12,      /* both ways: the session ends */
    TERN_MSG_CHUNK_ACK = 13,    /* both ways: the receiver of a payload grants credit */
} tern_msg_type;
#define TERN_MSG_TYPE_COUNT 14 /* one past the largest type */

/* Who may send a type: bit 0 the client, bit 1 the server. */
#define TERN_MSG_FROM_CLIENT 1u
#define TERN_MSG_FROM_SERVER 2u
/* TERN_MSG_FROM_* bits for a type; 0 outside the enum. */
unsigned tern_msg_type_senders(tern_msg_type type);
/* "hello", "fit_ins", ...; "?" outside the enum. Static storage. */
const char *tern_msg_type_name(tern_msg_type type);

/* Header flags. Bits 0-15 must be understood by the receiver: an unknown one is rejected with
 * TERN_ERR_UNSUPPORTED. Bits 16-31 are advisory and ignored when unknown. */
#define TERN_MSG_FLAG_MASKED 0x0001u /* payload values carry secure-aggregation masks */
#define TERN_MSG_FLAG_ASYNC 0x0002u  /* asynchronous round: the update may be stale */
#define TERN_MSG_FLAGS_KNOWN (TERN_MSG_FLAG_MASKED | TERN_MSG_FLAG_ASYNC)
#define TERN_MSG_FLAGS_CRITICAL 0x0000FFFFu

/* Capabilities announced in HELLO and agreed in WELCOME. Unknown bits are ignored. */
#define TERN_CAP_DELTA 0x0001u  /* updates as deltas from the base model */
#define TERN_CAP_Q8 0x0002u     /* 8-bit quantized updates */
#define TERN_CAP_TOPK 0x0004u   /* top-k sparse updates with error feedback */
#define TERN_CAP_SECAGG 0x0008u /* secure aggregation (pairwise masks) */
#define TERN_CAP_ASYNC 0x0010u  /* asynchronous rounds */

/* What a payload's bytes are. NONE only in a payload description meaning "no payload". */
typedef enum tern_payload_encoding {
    TERN_PAYLOAD_NONE = 0,
    TERN_PAYLOAD_SAFETENSORS = 1, /* full weights as a safetensors file */
    TERN_PAYLOAD_DELTA = 2,       /* safetensors of (new - base) */
    TERN_PAYLOAD_Q8 = 3,          /* 8-bit quantized delta (later) */
    TERN_PAYLOAD_TOPK = 4,        /* top-k sparse delta (later) */
} tern_payload_encoding;
#define TERN_PAYLOAD_ENCODING_COUNT 5

/* Wire error codes carried in ERROR messages, and the reason tern_msg_decode gives for a
 * rejection. Servers count rejections per code (tern_proto_counters). */
typedef enum tern_proto_code {
    TERN_PROTO_OK = 0,
    TERN_PROTO_E_MALFORMED = 1,    /* bad magic, lengths, strings, enums... */
    TERN_PROTO_E_VERSION = 2,      /* different major version or unknown critical flag */
    TERN_PROTO_E_TOO_LARGE = 3,    /* frame or announced payload beyond the limits */
    TERN_PROTO_E_OUT_OF_ORDER = 4, /* sequence number not increasing (replay, reorder) */
    TERN_PROTO_E_UNEXPECTED = 5,   /* valid message, wrong state or sender */
    TERN_PROTO_E_AUTH = 6,         /* unknown client or bad API key */
    TERN_PROTO_E_TRANSFER = 7,     /* chunk mismatch, duplicate, or hash mismatch */
    TERN_PROTO_E_UNSUPPORTED = 8,  /* encoding or feature not offered */
    TERN_PROTO_E_BUSY = 9,         /* try again later (server full, round closed) */
    TERN_PROTO_E_STALE = 10,       /* result for a round or model that is no longer open */
    TERN_PROTO_E_INTERNAL = 11,    /* the peer failed (out of memory, disk) */
    TERN_PROTO_E_NO_SESSION = 12,  /* no session for this connection (server restarted): HELLO */
} tern_proto_code;
#define TERN_PROTO_CODE_COUNT 13
/* "malformed", "version", ...; "?" outside the enum. Static storage. */
const char *tern_proto_code_name(tern_proto_code code);

typedef enum tern_peer_state {
    TERN_PEER_IDLE = 0,
    TERN_PEER_FITTING = 1,
    TERN_PEER_EVALUATING = 2,
    TERN_PEER_TRANSFERRING = 3,
} tern_peer_state;
#define TERN_PEER_STATE_COUNT 4

typedef enum tern_goodbye_reason {
    TERN_GOODBYE_NORMAL = 0,   /* the client is done */
    TERN_GOODBYE_SHUTDOWN = 1, /* the sender is shutting down */
    TERN_GOODBYE_ERROR = 2,    /* too many errors; the sender drops the session */
    TERN_GOODBYE_TIMEOUT = 3,  /* heartbeats stopped */
    TERN_GOODBYE_REJECTED = 4, /* the server removes this client */
} tern_goodbye_reason;
#define TERN_GOODBYE_REASON_COUNT 5

/* ---- message bodies ---------------------------------------------------------------------- */

typedef enum tern_config_type {
    TERN_CONFIG_INT = 1,
    TERN_CONFIG_FLOAT = 2,
    TERN_CONFIG_BOOL = 3,
    TERN_CONFIG_STRING = 4,
} tern_config_type;

/* Round configuration (lr, epochs, batch_size, proximal_mu, ...): unique keys, typed values. */
typedef struct tern_config_entry {
    char key[TERN_PROTO_MAX_KEY + 1];
    tern_config_type type;
    union {
        int64_t i;
        double f; /* finite */
        bool b;
        char s[TERN_PROTO_MAX_STRING_VALUE + 1];
    };
} tern_config_entry;

typedef struct tern_msg_config {
    uint32_t count;
    tern_config_entry entries[TERN_PROTO_MAX_ENTRIES];
} tern_msg_config;

/* Named results (loss, accuracy, ...): unique keys, finite values. */
typedef struct tern_msg_metrics {
    uint32_t count;
    struct {
        char key[TERN_PROTO_MAX_KEY + 1];
        double value;
    } entries[TERN_PROTO_MAX_ENTRIES];
} tern_msg_metrics;

/* A payload sent as chunks. encoding NONE means no payload (then every field is 0). Otherwise
 * total_size >= 1, chunk_size >= 1, chunk_count == ceil(total_size / chunk_size); chunk i
 * covers bytes [i * chunk_size, min(total_size, (i + 1) * chunk_size)). */
typedef struct tern_payload_info {
    uint64_t transfer_id; /* chosen by the sender, unique per session */
    uint64_t total_size;
    uint32_t chunk_size;
    uint32_t chunk_count;
    tern_payload_encoding encoding;
    uint8_t sha256[32]; /* of the whole payload */
} tern_payload_info;

typedef struct tern_msg_hello {
    char client_name[TERN_PROTO_MAX_NAME + 1]; /* non-empty */
    char api_key[TERN_PROTO_MAX_API_KEY + 1];  /* may be empty when CURVE alone authenticates */
    char client_version[TERN_PROTO_MAX_VERSION + 1];
    uint32_t capabilities; /* TERN_CAP_* */
    uint64_t num_examples; /* local training examples; 0 = not told */
} tern_msg_hello;

typedef struct tern_msg_welcome {
    uint64_t session_id;
    char server_version[TERN_PROTO_MAX_VERSION + 1];
    uint32_t capabilities;     /* agreed: the client's intersected with the server's */
    uint32_t heartbeat_ms;     /* interval the client should keep; 0 = none */
    uint32_t max_message_size; /* largest frame the server accepts (>= 1024) */
    uint32_t chunk_size;       /* chunk size the client should use (1 .. max - overhead) */
} tern_msg_welcome;

typedef struct tern_msg_heartbeat {
    uint64_t timestamp_ms; /* sender's clock, for round-trip estimates */
    tern_peer_state state;
} tern_msg_heartbeat;

typedef struct tern_msg_fit_ins {
    uint64_t model_version;
    tern_payload_encoding update_encoding; /* how the result should be encoded (not NONE) */
    uint32_t deadline_ms;                  /* 0 = no deadline */
    tern_msg_config config;
    tern_payload_info payload; /* the model; NONE = train from the version already held */
} tern_msg_fit_ins;

typedef struct tern_msg_fit_res {
    uint64_t model_version; /* the base model the update was computed from */
    uint64_t num_examples;
    tern_msg_metrics metrics;
    tern_payload_info payload; /* the update, encoded as asked */
} tern_msg_fit_res;

typedef struct tern_msg_evaluate_ins {
    uint64_t model_version;
    tern_msg_config config;
    tern_payload_info payload; /* NONE = evaluate the version already held */
} tern_msg_evaluate_ins;

typedef struct tern_msg_evaluate_res {
    uint64_t model_version;
    uint64_t num_examples;
    double loss; /* finite */
    tern_msg_metrics metrics;
} tern_msg_evaluate_res;

typedef struct tern_msg_model_request {
    uint64_t model_version; /* 0 = the current global model */
} tern_msg_model_request;

typedef struct tern_msg_model_info {
    uint64_t model_version;
    tern_payload_info payload; /* never NONE */
} tern_msg_model_info;

typedef struct tern_msg_chunk {
    tern_payload_info info; /* never NONE */
    uint32_t index;         /* < info.chunk_count */
    uint32_t len;           /* exactly the size chunk `index` covers */
    /* BORROWED: after decode it points into the decoded buffer and is valid as long as that
     * buffer; for encode the caller provides it. */
    const uint8_t *data;
} tern_msg_chunk;

/* Flow control of one payload, sent by its receiver. The sender may send the chunks whose index
 * is below credit; credit never decreases within a transfer. received == chunk_count means the
 * transfer is done (all chunks in and verified, or a cache hit). */
typedef struct tern_msg_chunk_ack {
    uint64_t transfer_id; /* the payload's */
    uint32_t received;    /* distinct chunks the receiver holds; <= credit */
    uint32_t credit;      /* chunks [0, credit) may be sent */
} tern_msg_chunk_ack;

typedef struct tern_msg_error {
    tern_proto_code code; /* not TERN_PROTO_OK */
    uint64_t in_reply_to; /* sequence number of the refused message; 0 = unknown */
    char message[TERN_PROTO_MAX_TEXT + 1];
} tern_msg_error;

typedef struct tern_msg_goodbye {
    tern_goodbye_reason reason;
    char message[TERN_PROTO_MAX_TEXT + 1];
} tern_msg_goodbye;

/* One message: header fields plus the body selected by `type`. A plain value (a few KB): the
 * only pointer is chunk.data. Zero-initialize, set type and the body, then encode. */
typedef struct tern_msg {
    tern_msg_type type;
    uint8_t version_major; /* filled by decode; encode always writes this build's version */
    uint8_t version_minor;
    uint32_t flags;        /* TERN_MSG_FLAG_* */
    uint64_t seq;          /* per connection and direction, strictly increasing from 1 */
    uint32_t round;        /* federated round the message belongs to; 0 outside rounds */
    union {
        tern_msg_hello hello;
        tern_msg_welcome welcome;
        tern_msg_heartbeat heartbeat;
        tern_msg_fit_ins fit_ins;
        tern_msg_fit_res fit_res;
        tern_msg_evaluate_ins evaluate_ins;
        tern_msg_evaluate_res evaluate_res;
        tern_msg_model_request model_request;
        tern_msg_model_info model_info;
        tern_msg_chunk chunk;
        tern_msg_error error;
        tern_msg_goodbye goodbye;
        tern_msg_chunk_ack chunk_ack;
    };
} tern_msg;

/* ---- encode / decode ------------------------------------------------------------------- */

/* Check a message as decode would (strings, counts, enums, payload descriptions, size against
 * limits; NULL limits = defaults) and compute its encoded size. TERN_ERR_INVALID with detail in
 * err for a field out of range or a message larger than limits->max_message_size. Anything
 * encode accepts, decode with the same limits accepts, and the other way round. */
tern_status tern_msg_encoded_size(const tern_msg *msg, const tern_proto_limits *limits,
                                  size_t *len, tern_error *err);
/* Encode into a caller buffer of cap bytes; *len receives the bytes written. TERN_ERR_INVALID
 * for a bad field or a buffer that is too small (nothing useful is written then). */
tern_status tern_msg_encode_into(const tern_msg *msg, const tern_proto_limits *limits, void *buf,
                                 size_t cap, size_t *len, tern_error *err);
/* Encode into a new buffer from alloc (NULL = C library); release it with tern_proto_free
 * using the same allocator. On failure *bytes and *len are untouched. TERN_ERR_INVALID,
 * TERN_ERR_NOMEM. */
tern_status tern_msg_encode(const tern_msg *msg, const tern_proto_limits *limits,
                            const tern_allocator *alloc, void **bytes, size_t *len,
                            tern_error *err);
void tern_proto_free(const tern_allocator *alloc, void *bytes);

/* Decode and validate one frame. Never allocates. On success *out holds the message (chunk
 * data borrowed from `bytes`). On failure *out is untouched, *reason (if not NULL) gets the
 * wire code to count and to put in an ERROR reply, and err gets the detail:
 *   TERN_ERR_FORMAT       malformed (truncated, bad magic, bad lengths, bad field) or a frame
 *                         larger than limits->max_message_size (reason TOO_LARGE), checked
 *                         before anything else is read;
 *   TERN_ERR_UNSUPPORTED  different major version, unknown critical flag, or an unknown type
 *                         from a newer minor version;
 *   TERN_ERR_INVALID      NULL arguments. */
tern_status tern_msg_decode(const void *bytes, size_t len, const tern_proto_limits *limits,
                            tern_msg *out, tern_proto_code *reason, tern_error *err);

/* Peek at a frame's header without validating the body (for routing and for an ERROR reply's
 * in_reply_to when the body is bad). TERN_ERR_FORMAT if shorter than a header or bad magic. */
tern_status tern_msg_peek_header(const void *bytes, size_t len, tern_msg_type *type,
                                 uint64_t *seq, uint32_t *body_len);

/* The wire code for a failure status from this module (FORMAT -> MALFORMED, ...). */
tern_proto_code tern_proto_code_from_status(tern_status status);

/* Fill *out as an ERROR message (seq and round left 0 for the caller). The text is printf-style
 * and truncated to TERN_PROTO_MAX_TEXT bytes at a UTF-8 boundary. */
void tern_msg_make_error(tern_msg *out, tern_proto_code code, uint64_t in_reply_to,
                         const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/* ---- config and metrics helpers -------------------------------------------------------- */

/* Set (or replace) an entry. TERN_ERR_INVALID for a bad key or value (empty or too long, not
 * UTF-8, non-finite) or when all TERN_PROTO_MAX_ENTRIES slots are used. */
tern_status tern_config_set_int(tern_msg_config *c, const char *key, int64_t v);
tern_status tern_config_set_float(tern_msg_config *c, const char *key, double v);
tern_status tern_config_set_bool(tern_msg_config *c, const char *key, bool v);
tern_status tern_config_set_string(tern_msg_config *c, const char *key, const char *v);
/* The entry for key, or NULL. Borrowed from c. */
const tern_config_entry *tern_config_find(const tern_msg_config *c, const char *key);
/* A numeric entry as double (INT or FLOAT); TERN_ERR_NOT_FOUND, TERN_ERR_SHAPE (wrong type). */
tern_status tern_config_get_number(const tern_msg_config *c, const char *key, double *out);

tern_status tern_metrics_set(tern_msg_metrics *m, const char *key, double v);
/* TERN_ERR_NOT_FOUND if absent. */
tern_status tern_metrics_get(const tern_msg_metrics *m, const char *key, double *out);

/* ---- sequence numbers and counters ----------------------------------------------------- */

/* Per-connection, per-direction sequence check. Zero-initialize. Sequence numbers start at 1
 * and strictly increase; gaps are allowed (counted), a repeat or a decrease is not. */
typedef struct tern_seq_tracker {
    uint64_t last;     /* 0 = nothing accepted yet */
    uint64_t accepted;
    uint64_t rejected;
    uint64_t gaps;     /* accepted messages that skipped numbers */
} tern_seq_tracker;
/* TERN_OK and remember seq; TERN_ERR_STATE (a replay or reordering) leaves `last` as it was. */
tern_status tern_seq_check(tern_seq_tracker *t, uint64_t seq);
/* The next number for a sender: counts 1, 2, 3... ; 0 never comes out. */
static inline uint64_t tern_seq_next(uint64_t *counter) { return ++*counter; }

/* Rejections counted per wire code (index TERN_PROTO_OK counts accepted messages). */
typedef struct tern_proto_counters {
    uint64_t by_code[TERN_PROTO_CODE_COUNT];
} tern_proto_counters;
/* Count one outcome; codes outside the enum count as MALFORMED. */
void tern_proto_count(tern_proto_counters *c, tern_proto_code code);

/* ---- payload transfer ------------------------------------------------------------------ */

/* Describe a payload to send: SHA-256 of data, chunk count for chunk_size. data is not kept.
 * TERN_ERR_INVALID for len 0, a len above limits->max_transfer_size, a chunk_size of 0 or too
 * large for limits->max_message_size, or encoding NONE; TERN_ERR_IO if hashing fails. */
tern_status tern_payload_describe(const void *data, size_t len, uint64_t transfer_id,
                                  uint32_t chunk_size, tern_payload_encoding encoding,
                                  const tern_proto_limits *limits, tern_payload_info *out,
                                  tern_error *err);
/* As tern_payload_describe for len bytes whose SHA-256 the caller already has (computed while
 * writing them, say), without reading them. A wrong sha256 is the receiver's hash mismatch. */
tern_status tern_payload_describe_hashed(const uint8_t sha256[32], size_t len,
                                         uint64_t transfer_id, uint32_t chunk_size,
                                         tern_payload_encoding encoding,
                                         const tern_proto_limits *limits, tern_payload_info *out,
                                         tern_error *err);
/* Fill *out (type MODEL_CHUNK) for chunk `index` of data described by info; the chunk borrows
 * data. Sets type and body only: seq, round and flags are the caller's. TERN_ERR_INVALID. */
tern_status tern_payload_chunk(const tern_payload_info *info, const void *data, uint32_t index,
                               tern_msg *out);

/* Receiver-side reassembly of one payload. */
typedef struct tern_transfer tern_transfer;

/* Prepare to receive the payload `info` announces (from FIT_INS, MODEL_INFO or the first
 * chunk). Memory is bounded by info->total_size, which is checked against
 * limits->max_transfer_size before anything is allocated (decode has already refused larger
 * announcements with reason TOO_LARGE). TERN_ERR_FORMAT for an inconsistent or too large
 * description, TERN_ERR_NOMEM, TERN_ERR_INVALID for NULL arguments. */
tern_status tern_transfer_create(const tern_payload_info *info, const tern_proto_limits *limits,
                                 const tern_allocator *alloc, tern_transfer **out,
                                 tern_error *err);
/* Free everything; *t becomes NULL. Accepts NULL. */
void tern_transfer_destroy(tern_transfer **t);

/* Add one decoded chunk (its bytes are copied). Errors, after which the transfer is unchanged:
 *   TERN_ERR_FORMAT  the chunk's description differs from the transfer's, index out of range,
 *                    or wrong length;
 *   TERN_ERR_EXISTS  this index was already received (a duplicate);
 *   TERN_ERR_STATE   the transfer already completed or failed.
 * When the last missing chunk arrives the SHA-256 of the whole is checked: on a mismatch the
 * data is discarded, the transfer becomes failed and TERN_ERR_FORMAT is returned; TERN_ERR_IO
 * if hashing itself fails (also failed). */
tern_status tern_transfer_add(tern_transfer *t, const tern_msg_chunk *chunk, tern_error *err);
/* Extend the SHA-256 that the transfer keeps over the chunks received so far in index order
 * (tern_transfer_add hashes whatever is left when the last chunk arrives). A receiver calls it
 * right after acking an accepted chunk: the hash is computed while the next chunk travels and
 * while this one is still in cache, and the last chunk only finishes it. TERN_OK also when
 * there is nothing to hash or the transfer is no longer receiving; TERN_ERR_IO if hashing
 * fails (the transfer has failed then); TERN_ERR_INVALID for NULL. */
tern_status tern_transfer_hash_ready(tern_transfer *t, tern_error *err);

const tern_payload_info *tern_transfer_info(const tern_transfer *t);
uint32_t tern_transfer_received(const tern_transfer *t); /* distinct chunks so far */
bool tern_transfer_complete(const tern_transfer *t);     /* all chunks in, hash verified */
bool tern_transfer_failed(const tern_transfer *t);
/* Bytes this transfer holds from its allocator (buffer + bookkeeping). */
size_t tern_transfer_memory(const tern_transfer *t);
/* The verified payload, borrowed until destroy or take. TERN_ERR_STATE if not complete. */
tern_status tern_transfer_data(const tern_transfer *t, const void **data, size_t *len);
/* Move the verified payload out: *data is from the transfer's allocator (release with
 * tern_proto_free). The transfer then holds nothing. TERN_ERR_STATE if not complete. */
tern_status tern_transfer_take(tern_transfer *t, void **data, size_t *len);

/* A tern_allocator that keeps released model-sized blocks for reuse. A receiver that
 * reassembles a payload of the same size every round (a client's model download, the server's
 * updates) then writes into memory that is already mapped, instead of the C library handing out
 * fresh pages that the kernel must fault in and zero for each transfer. Blocks of at least
 * TERN_BUFFER_POOL_MIN bytes that are released while fewer than `keep` are held are kept; a
 * request is served by the smallest kept block that fits it and is at most twice its size.
 * Everything else goes to the C library. Blocks carry a 64-byte header, and alignments up to
 * 64 bytes are honoured (larger ones get NULL). Not thread-safe: one pool per thread. */
#define TERN_BUFFER_POOL_MIN ((size_t)1 << 16)
typedef struct tern_buffer_pool tern_buffer_pool;

/* A pool that keeps at most `keep` blocks (0 = keep none). TERN_ERR_NOMEM, TERN_ERR_INVALID. */
tern_status tern_buffer_pool_create(size_t keep, tern_buffer_pool **out, tern_error *err);
/* Free the kept blocks and the pool; *pool becomes NULL. Accepts NULL. Every block handed out
 * must have been released (through the allocator) before. */
void tern_buffer_pool_destroy(tern_buffer_pool **pool);
/* The allocator that draws from the pool; valid while the pool lives. */
tern_allocator tern_buffer_pool_allocator(tern_buffer_pool *pool);
/* Bytes held in kept blocks (not handed out), headers included. */
size_t tern_buffer_pool_kept_bytes(const tern_buffer_pool *pool);
/* Blocks of at least TERN_BUFFER_POOL_MIN bytes handed out: from a kept block (reuses), and
 * from the C library (fresh). */
void tern_buffer_pool_counts(const tern_buffer_pool *pool, uint64_t *reuses, uint64_t *fresh);

/* ---- flow control ---------------------------------------------------------------------- */

/* Sender-side state of one outgoing payload under receiver credit. Zero-initialize, then
 * tern_send_window_start. A plain value: nothing to free. */
typedef struct tern_send_window {
    tern_payload_info info; /* the payload being sent (not NONE) */
    uint32_t next;          /* index of the next chunk to send */
    uint32_t credit;        /* chunks [0, credit) may be sent; 0 until the first CHUNK_ACK */
    uint32_t acked;         /* `received` of the last CHUNK_ACK */
    bool done;              /* the receiver holds the whole payload */
} tern_send_window;

/* Begin sending the payload info describes: nothing sent, no credit yet. */
void tern_send_window_start(tern_send_window *w, const tern_payload_info *info);
/* Apply a CHUNK_ACK from the receiver. TERN_ERR_FORMAT (the window unchanged) if its
 * transfer_id differs from the payload's, credit decreases or exceeds chunk_count, received
 * exceeds credit, or received decreases; TERN_ERR_INVALID for NULL arguments. Otherwise updates
 * credit and acked, and done becomes true when received == chunk_count (also on a cache hit,
 * before any chunk was sent). */
tern_status tern_send_window_ack(tern_send_window *w, const tern_msg_chunk_ack *ack);
/* True and *index set when a chunk may be sent now (not done and next < credit); the caller
 * sends chunk *index (tern_payload_chunk) and calls tern_send_window_sent. */
bool tern_send_window_ready(const tern_send_window *w, uint32_t *index);
/* The chunk tern_send_window_ready gave has been sent. Does nothing without credit for it. */
void tern_send_window_sent(tern_send_window *w);

/* Fill *out as the CHUNK_ACK a receiver sends for t after each chunk (and right after creating
 * it): received = tern_transfer_received(t), credit = min(chunk_count, received + window);
 * a window of 0 counts as 1. The whole message is reset: seq and round are left 0 for the
 * caller. Not for a failed transfer, which is answered with ERROR `transfer` instead. */
void tern_chunk_ack_make(tern_msg *out, const tern_transfer *t, uint32_t window);
/* Fill *out as the CHUNK_ACK of a payload the receiver already holds (a cache hit):
 * received = credit = chunk_count. seq and round are left 0 for the caller. */
void tern_chunk_ack_done(tern_msg *out, const tern_payload_info *info);

#ifdef __cplusplus
}
#endif

#endif
