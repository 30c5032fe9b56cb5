/* The federated client: one ZeroMQ DEALER connection to a tern-server, its session, and the
 * work the server asks for.
 *
 * The client connects, sends HELLO (name, API key), keeps a heartbeat, and answers FIT_INS and
 * EVALUATE_INS through the callbacks below. Models arrive as safetensors payloads under flow
 * control (docs/federation.md); the last model received is cached (in memory, and in
 * cache_dir when set) and is not downloaded again when the server sends the same SHA-256.
 * Training runs on a worker thread so that heartbeats continue meanwhile. When the server goes
 * silent for heartbeat_patience intervals, or replies that the session is unknown (a restarted
 * server), the client reconnects with exponential backoff and says HELLO again; work in
 * progress for the old session is dropped.
 *
 * Library rules: no printing (log callback), no exit, no global state. One thread drives a
 * tern_client (tern_client_run); tern_client_request_stop() may be called from any thread or a
 * signal handler. */
#ifndef TERN_CLIENT_H
#define TERN_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tern/protocol.h"
#include "tern/server.h" /* tern_log_fn, TERN_CURVE_KEY_SIZE */
#include "tern/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A fit request handed to the fit callback. */
typedef struct tern_fit_task {
    uint32_t round;                /* the server's training round */
    uint64_t model_version;        /* the server's id of the model */
    const void *model;             /* safetensors bytes of the global model (borrowed) */
    size_t model_size;
    const uint8_t *model_sha256;   /* its SHA-256 (32 bytes, checked when it arrived; borrowed) */
    const tern_msg_config *config; /* epochs, batch_size, lr, seed, proximal_mu, fedbn, ... */
    /* Optional reuse: the buffer of an earlier update (malloc'd, update_capacity bytes), or
     * NULL. A fit callback may write its update there and return it as update (then the client
     * owns it as usual); otherwise it leaves it alone. Saves mapping fresh pages every round. */
    void *update_buffer;
    size_t update_capacity;
} tern_fit_task;

/* What the fit callback returns. update is a safetensors file (the full state after training)
 * allocated with malloc; the client frees it after sending. */
typedef struct tern_fit_output {
    void *update;
    size_t update_size;
    /* Optional: a callback that knows the SHA-256 of update (computed while writing it) sets
     * it here, and the client does not read the update again to hash it. A wrong value gets
     * the upload refused by the server (a failure in the round). */
    bool has_sha256;
    uint8_t sha256[32];
    uint64_t num_examples;         /* >= 1 */
    tern_msg_metrics metrics;      /* e.g. loss, accuracy */
} tern_fit_output;

typedef struct tern_evaluate_output {
    uint64_t num_examples;         /* >= 1 */
    double loss;                   /* finite */
    tern_msg_metrics metrics;      /* e.g. accuracy */
} tern_evaluate_output;

/* Called on the client's worker thread. *cancel becomes true when the work is no longer wanted
 * (session lost, stop requested): a long fit should check it between steps and return
 * TERN_ERR_STATE. A failure is reported to the server as ERROR internal with err's message. */
typedef tern_status (*tern_client_fit_fn)(void *user, const tern_fit_task *task,
                                          const volatile bool *cancel, tern_fit_output *out,
                                          tern_error *err);
typedef tern_status (*tern_client_evaluate_fn)(void *user, const tern_fit_task *task,
                                               const volatile bool *cancel,
                                               tern_evaluate_output *out, tern_error *err);

typedef struct tern_client_options {
    const char *endpoint;          /* e.g. "tcp://127.0.0.1:7600" (required) */
    const char *name;              /* registered client name (required) */
    const char *api_key;           /* shown once at registration (required unless the server
                                      runs without keys) */
    bool insecure;                 /* plain TCP; otherwise CURVE */
    const char *server_public_key; /* Z85 (40 chars), or a path to "server.pub" */
    const char *cache_dir;         /* optional: keep the last model here across restarts
                                      (created if missing; CACHE_DIR/last_model.tern, written
                                      atomically, its SHA-256 checked when loaded at create) */
    uint64_t num_examples;         /* told to the server in HELLO; 0 = not told */

    tern_client_fit_fn fit;        /* required */
    tern_client_evaluate_fn evaluate; /* optional: EVALUATE_INS gets ERROR unsupported without */
    void *user;

    uint32_t heartbeat_patience;   /* silent server intervals before reconnecting; default 15 */
    uint32_t backoff_initial_ms;   /* first reconnect delay; default 100 */
    uint32_t backoff_max_ms;       /* default 5000 */
    uint32_t max_reconnects;       /* consecutive reconnects without a WELCOME; 0 = forever;
                                      then run returns TERN_ERR_IO */
    uint32_t hello_timeout_ms;     /* wait this long for WELCOME before reconnecting (the
                                      heartbeat interval is unknown until then); default 5000 */
    uint32_t max_rounds;           /* return TERN_OK after this many fit results sent; 0 = no
                                      limit */
    tern_proto_limits limits;

    tern_log_fn log;               /* optional */
    void *log_user;
} tern_client_options;

tern_client_options tern_client_options_default(void);

typedef struct tern_client tern_client;

/* Validate options and prepare the client (nothing is connected yet). TERN_ERR_INVALID,
 * TERN_ERR_FORMAT (a bad server key), TERN_ERR_NOMEM. */
tern_status tern_client_create(const tern_client_options *opt, tern_client **out,
                               tern_error *err);
void tern_client_destroy(tern_client **client);

/* Connect and serve the server until it says GOODBYE (shutdown or normal end of the run:
 * TERN_OK), refuses the client (TERN_ERR_AUTH... see below), max_rounds is reached (TERN_OK),
 * tern_client_request_stop() is called (TERN_OK, after GOODBYE normal), or reconnecting gave
 * up (TERN_ERR_IO). A refusal at HELLO (unknown client, wrong key, deactivated, blacklisted)
 * returns TERN_ERR_STATE with the server's message in err and does not retry. */
tern_status tern_client_run(tern_client *client, tern_error *err);
void tern_client_request_stop(tern_client *client);

typedef struct tern_client_stats {
    uint64_t sessions;             /* successful HELLOs (1 + reconnects) */
    uint64_t fits, evaluates;      /* results sent */
    uint64_t downloads, cache_hits;
    uint64_t bytes_in, bytes_out;
    uint64_t refused;              /* frames from the server refused and ignored (malformed,
                                      out of order, unexpected in the session's state) */
} tern_client_stats;
/* A snapshot of the counters; any thread may call it while tern_client_run runs. */
void tern_client_stats_get(const tern_client *client, tern_client_stats *out);

#ifdef __cplusplus
}
#endif

#endif
