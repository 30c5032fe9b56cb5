/* Internals of the federated server, shared by its three files:
 *   server.c          options, CURVE keys, create (restore from the store), the event loop
 *   server_session.c  sessions: frames in and out, HELLO and authentication, transfers under
 *                     flow control (downloads borrow one serialized model; uploads hold at
 *                     most max_uploads transfers)
 *   server_round.c    the round state machine: selection, FIT_INS, updates folded into the
 *                     strategies, aggregation, evaluation, commit, failure, the server state
 *   server_dp.c       differential privacy: budgets, client sampling, clipping, noise, ledger
 * Not installed. */
#ifndef TERN_SERVER_INTERNAL_H
#define TERN_SERVER_INTERNAL_H

#include <signal.h>
#include <stdarg.h>
#include <time.h>

#include <czmq.h>

#include "tern/model_io.h"
#include "tern/rng.h"
#include "tern/safetensors.h"
#include "tern/server.h"

/* One serialized model version: safetensors bytes every download borrows. A blob the server
 * lets go of while downloads still borrow it (a MODEL_REQUEST download across a commit) is
 * detached, and freed when the last of them ends. */
typedef struct srv_blob {
    void *bytes;               /* C library allocator */
    size_t len;
    uint64_t version;          /* wire model_version: completed rounds when it was produced */
    tern_payload_info info;    /* description (transfer_id 0; each session sets its own) */
    size_t refs;               /* downloads borrowing it */
    bool detached;             /* the server let go of it: freed with the last download */
} srv_blob;

typedef enum srv_dl_state { DL_IDLE, DL_QUEUED, DL_ACTIVE } srv_dl_state;
typedef enum srv_up_state { UP_IDLE, UP_QUEUED, UP_ACTIVE } srv_up_state;

typedef struct srv_session {
    zframe_t *rid;             /* ROUTER routing id (owned) */
    uint64_t session_id;
    char name[TERN_PROTO_MAX_NAME + 1];
    char client_id[TERN_STORE_ID_SIZE];
    uint64_t cid;              /* the strategy's id: a hash of the name, stable across restarts */
    tern_seq_tracker seq_in;
    uint64_t seq_out;
    uint32_t errors;           /* refusals counted towards max_errors */
    int64_t last_heard, next_heartbeat;
    uint64_t next_transfer_id;

    /* Download (server -> client): one at a time. */
    srv_dl_state dl;
    srv_blob *dl_blob;
    tern_send_window dl_win;
    uint32_t dl_round;         /* header round of the chunks */
    uint64_t dl_ticket;        /* FIFO order among queued downloads */

    /* Upload (client -> server): the update announced by FIT_RES. */
    srv_up_state up;
    tern_payload_info up_info;
    tern_transfer *up_xfer;
    uint32_t up_credit;        /* chunks granted */
    size_t up_memory;          /* bytes the transfer holds, counted in transfer_bytes */
    uint64_t up_ticket;
    uint64_t up_examples;
    tern_msg_metrics up_metrics;
    uint64_t up_dropped_id;    /* transfer of a closed round: its chunks get `stale` */

    /* The last FIT_INS or EVALUATE_INS sent. A retried round repeats the training round and
     * the model version, so a result or an ERROR the client sent before it received this
     * instruction would look like an answer to it: an answer counts only once the client has
     * acknowledged the instruction's whole payload (ins_ready), since a client acks before it
     * starts the work and messages on a connection stay in order. */
    uint64_t ins_seq;          /* its sequence number */
    uint64_t ins_tid;          /* its payload's transfer id */
    bool ins_ready;            /* the client acked that payload done */

    int part;                  /* index in the fit round's participants, -1 if none */
    int eval_part;             /* index in the evaluation's participants, -1 if none */
} srv_session;

typedef enum srv_part_state { PART_WAITING, PART_OK, PART_FAILED, PART_REJECTED } srv_part_state;

/* A client selected for the open fit round (or evaluation). */
typedef struct srv_part {
    uint64_t cid;
    char client_id[TERN_STORE_ID_SIZE];
    char name[TERN_PROTO_MAX_NAME + 1];
    srv_session *session;      /* NULL once it is gone */
    srv_part_state state;
    uint64_t examples;
    double loss, accuracy, norm;
} srv_part;

typedef enum srv_phase { PH_WAIT, PH_FIT, PH_EVALUATE } srv_phase;

/* Per-round timers of the event-loop thread (nanoseconds), reported in tern_round_report. */
typedef enum srv_timer {
    SRV_T_IDLE,
    SRV_T_VERIFY,
    SRV_T_LOAD,
    SRV_T_FOLD,
    SRV_T_SEND,
    SRV_T_AGGREGATE,
    SRV_T_SERIALIZE,
    SRV_T_COUNT
} srv_timer;

static inline int64_t srv_clock_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Where each tensor of the scratch model sits in an update's safetensors bytes. Every client
 * serializes the same model with the same writer, so updates share their header byte for byte:
 * an update whose header (and length) equals the one that went through the full parse and the
 * model's checks loads by copying these ranges, with no parse and no copy of the whole file. */
#define SRV_PENDING 4

typedef struct srv_layout {
    uint8_t *header;           /* the 8-byte length and the JSON header; NULL: no layout yet */
    size_t header_len;         /* 8 + N */
    size_t total;              /* the payload's length */
    size_t *offset;            /* per model tensor: offset of its bytes in the payload */
    size_t *param_at;          /* per model tensor: its index in the flat parameter vector,
                                  SIZE_MAX for buffers and counters */
} srv_layout;

/* A verified API key, so that a reconnect costs one SHA-256 instead of PBKDF2. */
typedef struct srv_key_cache {
    char name[TERN_STORE_NAME_SIZE];
    char hash[TERN_STORE_KEY_HASH_SIZE]; /* the stored hash it was verified against */
    uint8_t sha[32];
} srv_key_cache;

typedef struct srv_dp srv_dp; /* fl/server_dp.c */

struct tern_server {
    tern_server_options opt;   /* resolved; strings below are owned copies */
    char *endpoint;            /* as bound (zsock_last_endpoint) */
    tern_proto_limits limits;  /* resolved */
    tern_store *store;
    tern_model *model;         /* the global model (borrowed) */
    tern_model *scratch;       /* updates' buffers and counters are loaded here */
    srv_layout layout;         /* of the last update loaded through the full parse */
    /* Updates' parameters, SRV_PENDING vectors of num_params floats: the strategy folds them
     * in SRV_PENDING at a time (tern_strategy_add_fit_result_deferred); vector i is borrowed
     * by the strategy while i < tern_strategy_pending. */
    float *updates;
    tern_strategy *strategy;   /* parameters */
    tern_strategy *bn;         /* BatchNorm running statistics; NULL if the model has none */
    size_t num_params, num_bn;
    float *bn_values;          /* num_bn: gathered buffers (global, then each update) */

    zsock_t *sock;
    volatile sig_atomic_t stop;
    int64_t now;               /* zclock_mono at the loop turn */

    srv_session **sessions;    /* max_sessions slots, NULL = free */
    size_t num_sessions;
    uint64_t next_session_id, next_ticket;
    uint64_t orphan_seq;       /* sequence numbers of replies to connections without a session;
                                  new sessions continue from it, so that every connection sees
                                  increasing numbers */
    size_t active_downloads, active_uploads;
    size_t transfer_bytes;     /* held by upload transfers now */
    /* Upload buffers: up to max_uploads released ones are kept for the next uploads, so that
     * each update lands in memory already mapped (at most max_uploads x max_transfer_size more). */
    tern_buffer_pool *up_pool;
    tern_allocator up_alloc;

    srv_session **avail;       /* max_sessions: scratch for selection */
    uint64_t *avail_ids, *selected;

    srv_key_cache *keys;
    size_t num_keys, cap_keys;

    srv_blob *blob;            /* the global model as sent (version = completed) */
    srv_blob *next_blob;       /* the new global during EVALUATE */
    srv_blob *old_blob;        /* the last older version served to a MODEL_REQUEST */

    /* Run state. */
    uint64_t completed;        /* training rounds completed (restored ones included) */
    double best_accuracy;      /* -inf until an accuracy is known */
    uint64_t since_best;
    bool finished;             /* round limit or convergence reached */
    bool closing;              /* GOODBYE shutdown sent to every session: messages crossing it
                                  on the wire are dropped, a HELLO gets GOODBYE shutdown */

    /* The open round. */
    srv_phase phase;
    int64_t wait_started, phase_deadline, round_started, phase_started;
    int64_t store_round;
    srv_part *parts;
    size_t num_parts;
    srv_part *eval_parts;
    size_t num_eval_parts;
    tern_round_report report;
    uint64_t round_bytes_in0, round_bytes_out0;
    int64_t timers[SRV_T_COUNT]; /* this round's, in ns */
    int64_t round_cpu0, round_thread_cpu0;

    tern_server_stats stats;
    srv_dp *dp;                /* differential privacy; NULL without */
};

/* ---- server.c ------------------------------------------------------------------------------ */
void srv_log(tern_server *s, tern_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Serialize the model's current state into a new blob for wire version `version`. */
tern_status srv_blob_make(tern_server *s, uint64_t version, srv_blob **out, tern_error *err);
/* A blob of the given bytes (ownership taken, C library allocator; freed on failure too). */
tern_status srv_blob_wrap(tern_server *s, uint64_t version, void *bytes, size_t len,
                          srv_blob **out, tern_error *err);
/* Let go of a blob: freed now, or detached until the downloads that borrow it end. Accepts
 * NULL; *blob becomes NULL. */
void srv_blob_free(tern_server *s, srv_blob **blob);
/* A download let go of blob (refs already decremented). */
void srv_blob_unref(srv_blob *blob);
uint64_t srv_name_hash(const char *name);
uint64_t srv_mix64(uint64_t x);

/* ---- server_session.c ---------------------------------------------------------------------- */
/* Receive and handle every frame waiting on the socket. */
tern_status srv_drain(tern_server *s, tern_error *err);
/* Heartbeats due, silent sessions closed, downloads and uploads started and streamed. */
void srv_housekeeping(tern_server *s);
void srv_pump(tern_server *s);
/* Encode and send msg to the session (its next sequence number). False if it could not be
 * sent (logged). */
bool srv_send(tern_server *s, srv_session *ss, tern_msg *msg);
/* Count a refused message and answer ERROR code (in reply to seq); refusals that show a broken
 * peer count towards max_errors, which closes the session. */
/* Returns false when the session was closed (ss is freed then: do not touch it). */
bool srv_refuse(tern_server *s, srv_session *ss, tern_proto_code code, uint64_t in_reply_to,
                const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* Queue the upload FIT_RES announced; credit comes when an upload slot is free. */
void srv_upload_request(tern_server *s, srv_session *ss, const tern_msg_fit_res *res);
/* Queue a download of blob to the session (ends any earlier download). The caller has sent the
 * instruction carrying *info (filled here with the session's transfer id). */
void srv_download_prepare(tern_server *s, srv_session *ss, srv_blob *blob, uint32_t round,
                          tern_payload_info *info);
/* Send a FIT_INS or EVALUATE_INS whose payload srv_download_prepare described, and remember it
 * as the session's current instruction. */
bool srv_send_instruction(tern_server *s, srv_session *ss, tern_msg *msg);
void srv_download_cancel(tern_server *s, srv_session *ss);
void srv_upload_cancel(tern_server *s, srv_session *ss);
/* Close a session: GOODBYE with reason (unless send is false), failure in the round. */
void srv_session_close(tern_server *s, srv_session *ss, bool send, tern_goodbye_reason reason,
                       const char *fmt, ...) __attribute__((format(printf, 5, 6)));
srv_session *srv_session_by_name(tern_server *s, const char *name);
/* Sessions that count as available (welcomed and alive). */
size_t srv_available(tern_server *s, srv_session **out, size_t cap);
void srv_send_goodbye_all(tern_server *s, tern_goodbye_reason reason, const char *message);

/* ---- server_round.c ------------------------------------------------------------------------ */
/* The "lr" of training round t (1-based) under the options' schedule (cosine only). */
double srv_round_lr(const tern_server_options *o, uint64_t t);
/* Advance the round state machine; TERN_ERR_STATE for a WAIT timeout, TERN_ERR_IO for a store
 * failure that stops the run. */
tern_status srv_round_step(tern_server *s, tern_error *err);
/* Next time the round machine needs a turn (a deadline), or INT64_MAX. */
int64_t srv_round_deadline(const tern_server *s);
/* Events from sessions. */
void srv_part_failed(tern_server *s, srv_session *ss, const char *why);
/* FIT_RES / EVALUATE_RES: false when refused (the reply is sent). */
bool srv_fit_result(tern_server *s, srv_session *ss, const tern_msg *msg);
/* Load a verified update's safetensors bytes into the scratch model: through the layout of
 * an earlier update with the same header, else the full parse (which records the layout). */
tern_status srv_load_update(tern_server *s, const void *data, size_t len, float *params,
                            tern_error *err);
void srv_layout_clear(srv_layout *l);
/* The upload of ss completed: fold the update into the round. */
void srv_update_ready(tern_server *s, srv_session *ss, const void *data, size_t len);
bool srv_evaluate_result(tern_server *s, srv_session *ss, const tern_msg *msg);
/* Server state <-> store. */
tern_status srv_state_serialize(tern_server *s, void **bytes, size_t *len, tern_error *err);
tern_status srv_state_restore(tern_server *s, const void *bytes, size_t len, tern_error *err);
/* Commit the current model as the first version (an empty store). */
tern_status srv_commit_initial(tern_server *s, tern_error *err);
/* The registry version (e.g. "1.0.3") that training round t committed: the latest completed
 * round whose report names training round t. TERN_ERR_NOT_FOUND when there is none. */
tern_status srv_version_of_round(tern_server *s, uint64_t t,
                                 char version[TERN_STORE_VERSION_SIZE], tern_error *err);

/* ---- server_dp.c --------------------------------------------------------------------------- */
/* Validate options.dp and set up (central DP rewrites the strategy's selection options). */
tern_status srv_dp_create(tern_server *s, tern_error *err);
void srv_dp_destroy(tern_server *s);
bool srv_dp_on(const tern_server *s);
bool srv_dp_central(const tern_server *s);
/* Filter the n available sessions in s->avail / s->avail_ids for training round t: client DP
 * drops those over budget, central DP keeps a Poisson sample. Returns how many are left;
 * *wait is set when the round should not start yet. */
size_t srv_dp_select(tern_server *s, size_t n, uint64_t t, bool *wait);
/* After the participants are set up. */
tern_status srv_dp_round_begin(tern_server *s, tern_error *err);
/* Add the dp_* keys to a FIT_INS config; false when they do not fit. */
bool srv_dp_fit_config(tern_server *s, tern_msg_config *c);
/* Client DP: check and record the charge a result reports; false (why filled) to reject. */
bool srv_dp_check_result(tern_server *s, size_t part, const tern_msg_metrics *m, char *why,
                         size_t len);
/* Central DP: an update the strategy accepted (num_params floats, read only). */
void srv_dp_accepted(tern_server *s, const float *update);
/* Central DP: sum += f (update - global) with f = min(1, clip / |update - global|); returns
 * f. */
double srv_dp_clip_add(double *sum, const float *update, const float *global, size_t n,
                       double clip);
/* Central DP: next = global + (sum + N(0, noise_std^2)) / divisor over n values. */
tern_status srv_dp_noised_mean(float *next, const float *global, const double *sum, size_t n,
                               double noise_std, double divisor, tern_rng *rng);
/* Central DP: replace the strategy's global vector with the noised mean. */
tern_status srv_dp_aggregate(tern_server *s, tern_error *err);
/* The round's ledger charges (borrowed until the next round) and the report's epsilon. */
tern_status srv_dp_commit_charges(tern_server *s, const tern_privacy_charge **charges,
                                  size_t *count, tern_error *err);
/* A failed round: charge the clients whose updates the server received. */
void srv_dp_round_failed(tern_server *s);

#endif
