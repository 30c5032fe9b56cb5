/* Shared command-line plumbing of the `tern` tool: one table of options (each naming the
 * commands that take it), parsing with range checks, error printing, and building a model from
 * options and a weights file. */
#ifndef TERN_APPS_CLI_H
#define TERN_APPS_CLI_H

#include <stdbool.h>
#include <stdint.h>

#include "tern.h"

enum {
    CMD_FORWARD = 1 << 0,
    CMD_STEP = 1 << 1,
    CMD_DEMO = 1 << 2,
    CMD_TRAIN = 1 << 3,
    CMD_EVAL = 1 << 4,
    CMD_PREDICT = 1 << 5,
    CMD_ADD_CLASS = 1 << 6,
    CMD_STORE = 1 << 7,
    CMD_CATEGORY = 1 << 8,
    CMD_MODEL = 1 << 9,
    CMD_SERVER_INIT = 1 << 10,  /* tern server init */
    CMD_SERVER_ADMIN = 1 << 11, /* tern server register, clients, activate, ... */
    CMD_SERVER_RUN = 1 << 12,   /* tern server run */
    CMD_CLIENT = 1 << 13,       /* tern client run */
    CMD_SIM = 1 << 14,          /* tern sim */
    CMD_DP = 1 << 15,           /* tern dp */
    CMD_PRUNE = 1 << 16,        /* tern prune */
};

typedef struct cli {
    /* model */
    const char *arch, *norm, *isa;
    double width_mult;
    int in_channels, num_classes, threads;
    float dropout, bn_momentum;
    long long seed;
    /* files */
    const char *weights, *input, *labels, *output, *data, *val, *model, *init, *checkpoint,
        *resume, *cache, *metrics_json, *new_class;
    /* training */
    const char *optimizer, *schedule;
    float lr, momentum, weight_decay, smoothing, clip, warmup_epochs, val_split, distill;
    bool nesterov, reset_head, strict, no_augment, progress, no_progress;
    int epochs, batch, size, steps, top;
    long long limit, val_limit;
    /* store, category, model (tern_store.c) */
    const char *store, *description;
    bool json;
    int index;
    long long keep;
    /* federated (tern_server.c, tern_client.c, tern_sim.c) */
    const char *endpoint, *strategy, *policy, *test_data, *json_log, *name, *key, *server_key,
        *partition, *cache_dir, *device_type, *reason;
    bool insecure, fedbn, verbose, quiet, echo, keep_store, no_sync;
    int rounds, min_fit_clients, min_available_clients, local_epochs, patience, heartbeat_ms,
        max_steps, num_partitions, partition_index, clients, max_rounds;
    double fraction_fit, fraction_evaluate, min_completion, round_timeout, wait_timeout,
        eval_fraction, fit_delay;
    float proximal_mu, lr_min;
    int lr_warmup_rounds;
    long long test_limit, partition_seed, limit_per_client;
    long long bn_calibration;
    /* differential privacy accounting (tern_dp.c) and DP-SGD training (tern train --dp) */
    const char *accountant;
    double sample_rate, noise_multiplier, delta, target_epsilon, max_grad_norm;
    double ema; /* tern train --ema: decay of the weight average (0: off) */
    bool dp;
    /* pruning (tern_prune.c; --fine-tune-epochs sets epochs) */
    float sparsity;
    const char *scope, *prune_include, *storage;
    bool gradual;
    int prune_interval;
    /* differential privacy in federated rounds (tern server run, tern sim) */
    const char *dp_mode;
    double clip_norm, epsilon_budget, expected_clients;
    /* positional arguments (predict) */
    char **args;
    int nargs;
} cli;

/* Name used in messages ("tern train"). */
extern const char *cli_prog;

/* Prints "PROG: message" to stderr; returns 1 (for `return die(...)`). */
int die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Parses argv (argv[0] is the command name) for command `cmd` into c, which holds the
 * defaults. Returns 0 to go on, 1 after printing an error, 2 for --help. Positional arguments
 * are collected when allow_args, refused otherwise. */
int cli_parse(int argc, char **argv, unsigned cmd, bool allow_args, cli *c);
/* The same, but options may also follow positional arguments (GNU getopt order). */
int cli_parse_any_order(int argc, char **argv, unsigned cmd, bool allow_args, cli *c);

/* Help text for the model options. */
extern const char CLI_MODEL_HELP[];

/* Model options from a weights file's metadata (st may be NULL), overridden by the command
 * line. Returns 0 or prints an error and returns 1. */
int cli_model_options(const cli *c, const char *path, const tern_safetensors *st,
                      tern_model_options *o);

/* Opens path, builds the model it describes (with command-line overrides) and loads it;
 * also returns its info when info is not NULL. Prints errors. */
int cli_load_model(const cli *c, const char *path, tern_model **model, tern_model_info *info);

double cli_now(void);

/* Commands in tern_train.c. */
int tern_cmd_train(int argc, char **argv);
int tern_cmd_eval(int argc, char **argv);
int tern_cmd_predict(int argc, char **argv);
/* Command in tern_add_class.c. */
int tern_cmd_add_class(int argc, char **argv);
/* Commands in tern_store.c. */
int tern_cmd_store(int argc, char **argv);
int tern_cmd_category(int argc, char **argv);
int tern_cmd_model(int argc, char **argv);
/* Federated commands: tern_server.c, tern_client.c, tern_sim.c. */
int tern_cmd_server(int argc, char **argv);
int tern_cmd_client(int argc, char **argv);
int tern_cmd_sim(int argc, char **argv);
/* Command in tern_dp.c. */
int tern_cmd_dp(int argc, char **argv);
/* Command in tern_prune.c. */
int tern_cmd_prune(int argc, char **argv);

#endif
