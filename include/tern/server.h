/* The federated server: one ZeroMQ ROUTER socket, client sessions, and the round coordinator.
 *
 * A tern_server owns its socket, its sessions and a tern_strategy; it borrows a store (for the
 * registry, the clients and the rounds) and a model (the global model's architecture and
 * starting weights). tern_server_run() is a single-threaded event loop that runs rounds until
 * the round limit, convergence or a stop request. docs/federation.md describes the sessions,
 * the flow control and the round state machine; docs/protocol.md the messages.
 *
 * Round state machine (one round at a time):
 *
 *   WAIT      until enough clients are available (strategy minimums; available = in session,
 *             heartbeat alive, active and not blacklisted in the store)
 *   FIT       FIT_INS to the selected clients, model chunks under flow control, FIT_RES and
 *             update chunks folded into the strategy as each update verifies; ends when every
 *             selected client answered or failed, the round timeout passed, or the policy says
 *             the round can no longer succeed
 *   AGGREGATE the strategy's rule (and the BatchNorm buffers' example-weighted mean, unless
 *             FedBN keeps them local)
 *   EVALUATE  optional: EVALUATE_INS to clients, and the server-side evaluate callback
 *   COMMIT    round record, model blob, version, current pointer, per-client metrics and the
 *             server state (strategy vectors, counters) in ONE store transaction
 *
 * A failed round (strict policy with a failure, tolerant policy below min_completion, nothing
 * to aggregate) is recorded as failed; the global model is unchanged and the next round runs.
 *
 * Resuming: at create, a round left running or aggregating by a killed server is marked failed,
 * and the global model, the strategy state and the counters are loaded from the store's current
 * version and server state, so a restarted server continues from the last committed round.
 * Client selection and client-side training seeds depend on the run seed and the index of the
 * training round (completed rounds + 1), not on the store's round numbers, so a resumed run
 * repeats the interrupted round exactly.
 *
 * Library rules: no printing (the log callback receives messages), no exit, no global state.
 * Not thread-safe except tern_server_request_stop(), which any thread or a signal handler may
 * call. */
#ifndef TERN_SERVER_H
#define TERN_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tern/model.h"
#include "tern/privacy.h"
#include "tern/protocol.h"
#include "tern/status.h"
#include "tern/store.h"
#include "tern/strategy.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- CURVE keys ------------------------------------------------------------------------- */

/* Length of a Z85-encoded CURVE key, and the buffer size that holds it with its NUL. */
#define TERN_CURVE_KEY_Z85 40
#define TERN_CURVE_KEY_SIZE 41

/* Create the server's long-term CURVE key pair in dir: "server.key" (public and secret, mode
 * 0600) and "server.pub" (public only, to hand to clients). Refuses to overwrite
 * (TERN_ERR_EXISTS). public_z85 (may be NULL) receives the public key.
 * Both files are text in CZMQ's certificate layout (zconfig; zcert_load reads them):
 *     curve
 *         public-key = "<40 Z85 characters>"
 *         secret-key = "<40 Z85 characters>"     (server.key only)
 * with '#' comment lines before. TERN_ERR_IO when a file cannot be written. */
tern_status tern_server_keygen(const char *dir, char public_z85[TERN_CURVE_KEY_SIZE],
                               tern_error *err);
/* Read a key file written by tern_server_keygen: public key always, secret key when the file
 * has one (secret_z85 may be NULL; asking for the secret of a ".pub" file is
 * TERN_ERR_NOT_FOUND). TERN_ERR_IO, TERN_ERR_FORMAT. */
tern_status tern_curve_key_read(const char *path, char public_z85[TERN_CURVE_KEY_SIZE],
                                char secret_z85[TERN_CURVE_KEY_SIZE], tern_error *err);

/* ---- options ---------------------------------------------------------------------------- */

typedef enum tern_failure_policy {
    TERN_POLICY_TOLERANT, /* aggregate when at least min_completion of the selected succeeded */
    TERN_POLICY_STRICT,   /* any failure fails the round */
} tern_failure_policy;

/* The learning rate sent in FIT_INS over the rounds. */
typedef enum tern_lr_schedule {
    TERN_LR_CONSTANT, /* fit_config's "lr" (if any) unchanged in every round */
    TERN_LR_COSINE,   /* round t of R: lr_min + (lr0 - lr_min) * (1 + cos(pi (t - 1) / R)) / 2,
                         lr0 = fit_config's "lr" */
} tern_lr_schedule;

typedef enum tern_log_level { TERN_LOG_DEBUG, TERN_LOG_INFO, TERN_LOG_WARN, TERN_LOG_ERROR } tern_log_level;
typedef void (*tern_log_fn)(void *user, tern_log_level level, const char *message);

/* What one round did; given to on_round and stored with the round (as JSON). */
typedef struct tern_round_report {
    uint64_t training_round;   /* 1, 2, ... : completed rounds before this one + 1 */
    int64_t store_round;       /* the store's round number */
    bool completed;            /* false: failed (reason says why) */
    char reason[128];
    size_t available, selected, succeeded, failed, rejected; /* rejected: invalid updates */
    uint64_t num_examples;     /* training examples behind the aggregate */
    double train_loss;         /* example-weighted client "loss" metric; NaN if none */
    double train_accuracy;     /* example-weighted client "accuracy" metric; NaN if none */
    double client_eval_loss, client_eval_accuracy; /* clients' evaluation; NaN if none */
    size_t client_eval_count;
    double eval_loss, eval_accuracy; /* the server-side evaluate callback; NaN if none */
    double update_norm_mean;   /* mean L2 norm of accepted changes */
    uint64_t bytes_in, bytes_out; /* frames received / sent during the round */
    double fit_seconds, eval_seconds, commit_seconds, round_seconds;
    /* Where the event-loop thread's time went during the round: disjoint parts of
     * round_seconds (the rest is receiving and decoding frames, and bookkeeping). */
    double idle_seconds;       /* blocked in poll: waiting for clients or the network */
    double verify_seconds;     /* update chunks copied into their transfers, SHA-256 checks */
    double load_seconds;       /* updates parsed and loaded into the scratch model */
    double fold_seconds;       /* updates checked and folded into the strategies */
    double send_seconds;       /* messages encoded and handed to ZeroMQ (mostly model chunks) */
    double aggregate_seconds;  /* the strategy's rule, the new global model written */
    double serialize_seconds;  /* the new global model serialized and hashed */
    double cpu_seconds;        /* CPU time of the server process during the round, ZeroMQ's
                                  I/O thread (where CURVE encrypts) included */
    double loop_cpu_seconds;   /* CPU time of the event-loop thread alone */
    char model_version[TERN_STORE_VERSION_SIZE]; /* the committed version; "" when failed */
    /* Differential privacy at dp.delta after this round (NaN without DP): client DP, the
     * largest spent epsilon among the clients charged this round; central DP, the server's
     * epsilon over all its rounds. */
    double epsilon;
} tern_round_report;

/* Differential privacy in federated rounds, chosen by the server (docs/privacy.md). */
typedef enum tern_fl_dp_mode {
    TERN_FL_DP_NONE,
    /* Client-side DP-SGD: FIT_INS carries dp_* keys (docs/protocol.md), every client trains
     * with DP-SGD (a GroupNorm model) and reports its steps and sample rate; the store's
     * privacy ledger composes each client's rounds, and a client whose next round (predicted
     * from its last one) would exceed epsilon_budget is not selected. */
    TERN_FL_DP_CLIENT,
    /* Central DP (DP-FedAvg, McMahan et al. 2018): clients are Poisson-sampled at rate
     * q = expected_clients / available, each update's change is clipped to clip_norm, the sum
     * gets Gaussian noise of std noise_multiplier * clip_norm and is divided by
     * expected_clients. Needs strategy FedAvg. */
    TERN_FL_DP_CENTRAL,
} tern_fl_dp_mode;

/* "none", "client", "central"; static storage. */
const char *tern_fl_dp_mode_name(tern_fl_dp_mode mode);
/* Inverse of tern_fl_dp_mode_name; TERN_ERR_INVALID for anything else. */
tern_status tern_fl_dp_mode_parse(const char *name, tern_fl_dp_mode *out);

typedef struct tern_server_dp_options {
    tern_fl_dp_mode mode;          /* default NONE; all below ignored then */
    double noise_multiplier;       /* sigma > 0 (client: DP-SGD's; central: per round) */
    double target_epsilon;         /* client mode instead of noise_multiplier (one of the two):
                                      each client picks sigma so that `rounds` rounds of its
                                      local training spend this epsilon */
    double max_grad_norm;          /* client: per-sample clipping norm; default 1 */
    double clip_norm;              /* central: clipping norm of an update's change; default 1 */
    double delta;                  /* (0, 1); default 1e-5 */
    double epsilon_budget;         /* client: per-client budget at delta; 0 = none */
    double expected_clients;       /* central: clients per round in expectation (>= 1, at most
                                      the available ones); 0 = the strategy's sample size for
                                      the clients available at the first DP round */
    uint64_t seed;                 /* central: client sampling and noise. Keep it secret (the
                                      tern tool reads /dev/urandom) */
    tern_accountant_kind accountant; /* default RDP */
} tern_server_dp_options;

/* Server-side evaluation of the new global model (for example on a held-out test set). The
 * model holds the new weights and buffers; the callback may run forward passes on it. */
typedef tern_status (*tern_server_evaluate_fn)(void *user, tern_model *model, double *loss,
                                               double *accuracy, uint64_t *num_examples,
                                               tern_error *err);

typedef struct tern_server_options {
    const char *endpoint;          /* e.g. "tcp://127.0.0.1:7600" (required) */
    bool insecure;                 /* plain TCP; otherwise CURVE with the key below */
    const char *key_file;          /* "server.key" from tern_server_keygen (unless insecure) */

    tern_strategy_options strategy; /* num_params is set by the server from the model */
    bool fedbn;                    /* keep BatchNorm parameters and statistics local to clients */

    uint32_t rounds;               /* stop after this many completed training rounds (total,
                                      counting rounds from before a restart); 0 = 10 */
    uint32_t patience;             /* stop after this many completed rounds without improvement
                                      of the evaluation accuracy; 0 = never */
    tern_failure_policy policy;    /* default TOLERANT */
    double min_completion;         /* TOLERANT: fraction of the selected that must succeed,
                                      (0, 1]; default 0.5 */
    uint32_t round_timeout_ms;     /* FIT and EVALUATE phases each; default 600000 */
    uint32_t wait_timeout_ms;      /* WAIT longer than this fails run with TERN_ERR_STATE;
                                      0 = wait forever */
    uint32_t heartbeat_ms;         /* interval asked of clients; default 1000 */
    uint32_t heartbeat_patience;   /* silent intervals before a session is dead; default 5 */
    uint32_t blacklist_after;      /* rejected updates before a client is blacklisted; 0 = never;
                                      default 3 */

    /* Sent in FIT_INS / EVALUATE_INS config (the server adds "seed", "round", "proximal_mu"
     * for FedProx, "fedbn"). Copied at create. */
    tern_msg_config fit_config;    /* e.g. epochs, batch_size, lr, momentum, weight_decay */
    tern_msg_config evaluate_config;
    /* With TERN_LR_COSINE or a warm-up, fit_config must hold "lr" (a number > 0), and lr_min
     * must be in [0, lr]; R is `rounds`, t the training round (1-based; a resumed run
     * continues the schedule). TERN_ERR_INVALID otherwise. */
    tern_lr_schedule lr_schedule;  /* default TERN_LR_CONSTANT */
    double lr_min;                 /* default 0 */
    /* Rounds t <= W get lr0 * t / (W + 1), a linear warm-up that keeps the first rounds'
     * clients from leaving the shared starting point too far to be averaged; the schedule then
     * runs over the remaining R - W rounds (t' = t - W of R - W). W < R; default 0. */
    uint32_t lr_warmup_rounds;

    /* Transfers and flow control (docs/federation.md). */
    uint32_t chunk_size;           /* default TERN_PROTO_DEFAULT_CHUNK */
    uint32_t window;               /* chunks a receiver grants at a time; default 4 */
    uint32_t max_downloads;        /* model transfers streaming at once; default 8 */
    uint32_t max_uploads;          /* update transfers granted credit at once; default 4 */
    tern_proto_limits limits;      /* frame and payload maxima; zero fields = defaults */
    uint32_t max_sessions;         /* default 1024; more HELLOs get ERROR busy */
    uint32_t max_errors;           /* refused messages before a session is dropped; default 20 */

    tern_server_evaluate_fn evaluate; /* optional */
    void *evaluate_user;
    /* Optional: called on each aggregated model before evaluation and commit, to re-estimate
     * its BatchNorm statistics on server-held images (tern_bn_calibrate in tern/bn_calib.h).
     * What it leaves in the model's buffers is evaluated, committed and sent to clients; an
     * error is logged and the aggregated statistics are kept (the callback must leave them
     * unchanged when it fails, as tern_bn_calibrate does). */
    tern_status (*calibrate)(void *user, tern_model *model, tern_error *err);
    void *calibrate_user;

    const char *settings;          /* text recorded with each version (training settings) */
    const char *classes;           /* text recorded with each version (class names) */

    tern_log_fn log;               /* optional */
    void *log_user;
    void (*on_round)(void *user, const tern_round_report *report); /* optional */
    void *on_round_user;

    tern_server_dp_options dp;     /* differential privacy; mode NONE by default */
} tern_server_options;

/* Defaults as listed above, strategy FedAvg with Flower's defaults. */
tern_server_options tern_server_options_default(void);

typedef struct tern_server tern_server;

/* Create a server: validate options, bind the socket, and load or start the run state. When
 * the store has a current model version, the global model is that version (model is used for
 * its architecture; its weights are overwritten) and the strategy state and counters come from
 * the store's server state; otherwise model's weights start the run and are committed as the
 * first version. model is borrowed for the server's life and always holds the global model.
 * Errors: TERN_ERR_INVALID (options, detail in err), TERN_ERR_IO (bind, keys, store),
 * TERN_ERR_FORMAT (a stored model that does not match the architecture), TERN_ERR_NOMEM. */
tern_status tern_server_create(const tern_server_options *opt, tern_store *store,
                               tern_model *model, tern_server **out, tern_error *err);
/* (CZMQ's own SIGINT/SIGTERM handling is switched off at create, zsys_handler_set(NULL): the
 * application owns its signals and calls tern_server_request_stop from its handler.) */
void tern_server_destroy(tern_server **server);

/* Run rounds until the round limit, convergence, or tern_server_request_stop(). Returns
 * TERN_OK in those cases (a stop in mid-round leaves the round as the store had it: a
 * restarted server marks it failed and repeats it). TERN_ERR_STATE when WAIT timed out;
 * TERN_ERR_IO for a store or socket failure that stops the run. */
tern_status tern_server_run(tern_server *server, tern_error *err);
/* Ask run to return at its next loop turn (within about 100 ms). Async-signal-safe. */
void tern_server_request_stop(tern_server *server);

/* The endpoint actually bound (with a port of 0 or "*" the system chose one). Borrowed. */
const char *tern_server_endpoint(const tern_server *server);
/* Completed training rounds so far (restored ones included). */
uint64_t tern_server_rounds_completed(const tern_server *server);

typedef struct tern_server_stats {
    size_t sessions;               /* sessions open now */
    uint64_t hellos_refused;       /* authentication failures */
    tern_proto_counters messages;  /* accepted (index 0) and refused messages by code */
    uint64_t bytes_in, bytes_out;
    uint64_t late_results;         /* results for a closed round, discarded */
    size_t peak_transfer_bytes;    /* most bytes held by transfers at one time */
} tern_server_stats;
void tern_server_stats_get(const tern_server *server, tern_server_stats *out);

#ifdef __cplusplus
}
#endif

#endif
