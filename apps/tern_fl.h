/* Pieces shared by the federated commands (tern server, tern client, tern sim): data sources,
 * the server's run loop with its printing, and the timestamped log callback. Each prints its
 * own errors and returns 0 or 1, like the commands. */
#ifndef TERN_APPS_FL_H
#define TERN_APPS_FL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cli.h"
#include "tern/client.h"
#include "tern/local.h"
#include "tern/server.h"

#define FL_DEFAULT_STORE "./tern-store"
#define FL_DEFAULT_ENDPOINT "tcp://127.0.0.1:7600"
#define FL_FASHION_DIR "/usr/share/datasets/fashion-mnist"
/* Files `tern server init` writes next to the store's LMDB files. */
#define FL_INITIAL_MODEL "initial.safetensors"
#define FL_KEY_DIR "keys"

/* Keep the C library from handing big blocks back to the kernel after each use: a server or a
 * client allocates and frees model-sized buffers (transfers, updates, ZeroMQ messages of 1 MiB)
 * every round, and with glibc's defaults each of them is a fresh mmap whose pages the kernel
 * faults in and zeroes again. Freed memory is reused instead, so the process stays at its peak
 * (flat in the number of clients) rather than paying page faults per round. No-op elsewhere. */
void fl_tune_malloc(void);

/* A seed from /dev/urandom, for differential-privacy noise that must stay secret. */
int fl_secret_seed(uint64_t *seed);

/* --store, else $TERN_STORE, else ./tern-store. */
const char *fl_store_dir(const cli *c);

/* Log lines on stderr: "2024-05-01 12:00:00.123 [info] who: message", levels below min_level
 * dropped. One fprintf per line, so lines from several threads stay whole. */
typedef struct fl_logger {
    tern_log_level min_level;
    const char *who;
} fl_logger;
void fl_log(void *user, tern_log_level level, const char *message);
void fl_logf(fl_logger *lg, tern_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* --verbose: debug; --quiet: warnings and errors; else info. */
tern_log_level fl_log_level(const cli *c);

/* A data source: "fashion-mnist" (Debian's dataset-fashion-mnist, or $TERN_FASHION_MNIST) or
 * an image folder (DIR/train or DIR/val when they exist, else DIR). *fashion tells which. */
int fl_open_dataset(const char *spec, bool train, tern_dataset **out, bool *fashion);
/* The training and evaluation pipelines of tern train for a source at input size `size`. */
void fl_transforms(bool fashion, int size, int channels, tern_transform *train,
                   tern_transform *eval);

/* Register a client: a new random API key (32 bytes, hex) whose PBKDF2 hash alone is
 * stored. key receives the key. */
int fl_register_client(tern_store *store, const char *name, const char *device_type,
                       char key[65], tern_client_record *out);

/* Creates the server's files in dir (store, initial model, CURVE keys unless insecure) from
 * the model options on the command line. public_key receives the server's public key ("" when
 * insecure). */
int fl_server_init(const cli *c, const char *dir, char public_key[TERN_CURVE_KEY_SIZE],
                   bool print);

typedef struct fl_run_hooks {
    /* After the socket is bound and before the first round (tern sim starts its clients
     * here); a non-zero return ends the run. */
    int (*started)(void *user, tern_server *server);
    void *user;
} fl_run_hooks;

/* What a run did, for tern sim's summary. */
typedef struct fl_run_result {
    uint64_t completed, failed;
    double best_accuracy, final_accuracy; /* NaN without evaluation */
    uint64_t best_round;
    char best_version[TERN_STORE_VERSION_SIZE], final_version[TERN_STORE_VERSION_SIZE];
    double seconds;
    bool interrupted;                     /* SIGINT or SIGTERM stopped the run */
} fl_run_result;

/* tern server run: opens the store in dir, builds the server from the command line, prints a
 * table line per round and a summary. Ctrl-C / SIGTERM stop it cleanly. The server pointer
 * is published to the signal handler and to fl_server_stop while it runs. */
int fl_server_run(const cli *c, const char *dir, const fl_run_hooks *hooks, fl_run_result *res);
/* Async-signal-safe: asks the running server (if any) to stop. */
void fl_server_stop(void);

#endif
