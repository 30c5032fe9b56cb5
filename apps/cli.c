/* Option table and parsing for the `tern` tool. */
#include "cli.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

const char *cli_prog = "tern";

int die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", cli_prog);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 1;
}

double cli_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef enum { T_STR, T_INT, T_LONG, T_FLOAT, T_DOUBLE, T_FLAG } opt_type;

typedef struct opt_spec {
    const char *name;
    opt_type type;
    size_t offset;
    double lo, hi;
    unsigned cmds;
} opt_spec;

#define MODEL (CMD_FORWARD | CMD_STEP | CMD_DEMO | CMD_TRAIN | CMD_EVAL | CMD_PREDICT | CMD_ADD_CLASS | CMD_PRUNE)
#define TRAINING (CMD_STEP | CMD_DEMO | CMD_TRAIN | CMD_ADD_CLASS | CMD_PRUNE)
#define LOOPS (CMD_TRAIN | CMD_ADD_CLASS | CMD_PRUNE)
#define FL_MODEL (CMD_SERVER_INIT | CMD_SIM)
#define FL_RUN (CMD_SERVER_RUN | CMD_SIM)
#define O(field) offsetof(cli, field)

static const opt_spec OPTIONS[] = {
    {"arch", T_STR, O(arch), 0, 0, MODEL | FL_MODEL},
    {"norm", T_STR, O(norm), 0, 0, MODEL | FL_MODEL},
    {"isa", T_STR, O(isa), 0, 0, MODEL},
    {"width-mult", T_DOUBLE, O(width_mult), 1e-3, 16, MODEL | FL_MODEL},
    {"in-channels", T_INT, O(in_channels), 1, 4096, MODEL | CMD_SERVER_INIT},
    {"num-classes", T_INT, O(num_classes), 1, 1000000, MODEL | CMD_SERVER_INIT},
    {"threads", T_INT, O(threads), 1, 256, MODEL | FL_RUN | CMD_CLIENT},
    {"dropout", T_FLOAT, O(dropout), 0, 0.999, TRAINING},
    {"bn-momentum", T_FLOAT, O(bn_momentum), 1e-6, 1, TRAINING | FL_MODEL},
    {"seed", T_LONG, O(seed), 0, (double)LLONG_MAX, TRAINING | CMD_EVAL | FL_MODEL | FL_RUN},
    {"weights", T_STR, O(weights), 0, 0, CMD_FORWARD | CMD_STEP},
    {"input", T_STR, O(input), 0, 0, CMD_FORWARD | CMD_STEP},
    {"labels", T_STR, O(labels), 0, 0, CMD_STEP},
    {"output", T_STR, O(output), 0, 0, CMD_FORWARD | CMD_STEP},
    {"out", T_STR, O(output), 0, 0, LOOPS},
    {"data", T_STR, O(data), 0, 0, LOOPS | CMD_EVAL | CMD_CLIENT},
    {"val", T_STR, O(val), 0, 0, LOOPS},
    {"val-split", T_FLOAT, O(val_split), 0, 0.9, LOOPS},
    {"model", T_STR, O(model), 0, 0, CMD_EVAL | CMD_PREDICT | CMD_ADD_CLASS | CMD_PRUNE},
    {"init", T_STR, O(init), 0, 0, CMD_TRAIN | CMD_SERVER_INIT},
    {"reset-head", T_FLAG, O(reset_head), 0, 0, CMD_TRAIN},
    {"checkpoint", T_STR, O(checkpoint), 0, 0, CMD_TRAIN},
    {"resume", T_STR, O(resume), 0, 0, CMD_TRAIN},
    {"cache", T_STR, O(cache), 0, 0, LOOPS | CMD_EVAL},
    {"metrics-json", T_STR, O(metrics_json), 0, 0, LOOPS | CMD_EVAL},
    {"class", T_STR, O(new_class), 0, 0, CMD_ADD_CLASS},
    {"optimizer", T_STR, O(optimizer), 0, 0, LOOPS},
    {"schedule", T_STR, O(schedule), 0, 0, LOOPS | FL_RUN},
    {"lr-min", T_FLOAT, O(lr_min), 0, 1e6, FL_RUN},
    {"lr-warmup-rounds", T_INT, O(lr_warmup_rounds), 0, 1000000, FL_RUN},
    {"lr", T_FLOAT, O(lr), 1e-12, 1e6, TRAINING | FL_RUN},
    {"momentum", T_FLOAT, O(momentum), 0, 1, TRAINING | FL_RUN},
    {"nesterov", T_FLAG, O(nesterov), 0, 0, TRAINING},
    {"weight-decay", T_FLOAT, O(weight_decay), 0, 1e3, TRAINING | FL_RUN},
    {"label-smoothing", T_FLOAT, O(smoothing), 0, 1, TRAINING | FL_RUN},
    {"clip-grad-norm", T_FLOAT, O(clip), 0, 1e9, LOOPS},
    {"warmup-epochs", T_FLOAT, O(warmup_epochs), 0, 1e6, LOOPS},
    {"distill", T_FLOAT, O(distill), 0, 1000, CMD_ADD_CLASS},
    {"epochs", T_INT, O(epochs), 1, 100000, LOOPS},
    {"batch", T_INT, O(batch), 1, 65536, TRAINING | CMD_EVAL | FL_RUN},
    {"size", T_INT, O(size), 32, 4096, CMD_DEMO | LOOPS | CMD_EVAL | CMD_PREDICT | CMD_CLIENT},
    {"steps", T_INT, O(steps), 1, 1000000, CMD_DEMO | CMD_DP},
    {"top", T_INT, O(top), 1, 1000, CMD_PREDICT | CMD_EVAL},
    {"limit", T_LONG, O(limit), 1, 1e12, LOOPS | CMD_EVAL | CMD_STORE | CMD_CLIENT},
    {"val-limit", T_LONG, O(val_limit), 1, 1e12, LOOPS},
    {"no-augment", T_FLAG, O(no_augment), 0, 0, LOOPS},
    {"strict", T_FLAG, O(strict), 0, 0, LOOPS | CMD_EVAL | CMD_PREDICT},
    {"progress", T_FLAG, O(progress), 0, 0, CMD_TRAIN | CMD_EVAL},
    {"no-progress", T_FLAG, O(no_progress), 0, 0, CMD_TRAIN | CMD_EVAL},
    {"store", T_STR, O(store), 0, 0, CMD_STORE | CMD_CATEGORY | CMD_MODEL | CMD_SERVER_INIT | CMD_SERVER_ADMIN | FL_RUN},
    {"json", T_FLAG, O(json), 0, 0, CMD_STORE | CMD_CATEGORY | CMD_MODEL | CMD_SERVER_ADMIN | CMD_SERVER_INIT},
    {"description", T_STR, O(description), 0, 0, CMD_CATEGORY},
    {"index", T_INT, O(index), 0, INT32_MAX, CMD_CATEGORY},
    {"keep", T_LONG, O(keep), 0, 1e12, CMD_MODEL},
    /* federated */
    {"classes", T_INT, O(num_classes), 1, 1000000, CMD_SERVER_INIT},
    {"insecure", T_FLAG, O(insecure), 0, 0, CMD_SERVER_INIT | FL_RUN | CMD_CLIENT},
    {"device-type", T_STR, O(device_type), 0, 0, CMD_SERVER_ADMIN},
    {"reason", T_STR, O(reason), 0, 0, CMD_SERVER_ADMIN},
    {"endpoint", T_STR, O(endpoint), 0, 0, CMD_SERVER_RUN | CMD_CLIENT},
    {"rounds", T_INT, O(rounds), 1, 1000000, FL_RUN},
    {"strategy", T_STR, O(strategy), 0, 0, FL_RUN},
    {"fraction-fit", T_DOUBLE, O(fraction_fit), 1e-9, 1, FL_RUN},
    {"fraction-evaluate", T_DOUBLE, O(fraction_evaluate), 0, 1, FL_RUN},
    {"min-fit-clients", T_INT, O(min_fit_clients), 1, 65536, FL_RUN},
    {"min-available-clients", T_INT, O(min_available_clients), 1, 65536, FL_RUN},
    {"policy", T_STR, O(policy), 0, 0, FL_RUN},
    {"min-completion", T_DOUBLE, O(min_completion), 1e-9, 1, FL_RUN},
    {"round-timeout", T_DOUBLE, O(round_timeout), 0.001, 4e6, FL_RUN},
    {"wait-timeout", T_DOUBLE, O(wait_timeout), 0.001, 4e6, FL_RUN},
    {"heartbeat-ms", T_INT, O(heartbeat_ms), 10, 600000, FL_RUN},
    {"local-epochs", T_INT, O(local_epochs), 1, 100000, FL_RUN},
    {"max-steps", T_INT, O(max_steps), 1, 100000000, FL_RUN},
    {"proximal-mu", T_FLOAT, O(proximal_mu), 0, 1e6, FL_RUN},
    {"fedbn", T_FLAG, O(fedbn), 0, 0, FL_RUN},
    {"patience", T_INT, O(patience), 1, 1000000, FL_RUN},
    {"test-data", T_STR, O(test_data), 0, 0, CMD_SERVER_RUN},
    {"test-limit", T_LONG, O(test_limit), 1, 1e12, FL_RUN},
    {"bn-calibration", T_LONG, O(bn_calibration), 0, 1e12, FL_RUN},
    {"json-log", T_STR, O(json_log), 0, 0, FL_RUN},
    {"no-sync", T_FLAG, O(no_sync), 0, 0, FL_RUN},
    {"verbose", T_FLAG, O(verbose), 0, 0, FL_RUN | CMD_CLIENT},
    {"quiet", T_FLAG, O(quiet), 0, 0, FL_RUN | CMD_CLIENT},
    {"name", T_STR, O(name), 0, 0, CMD_CLIENT},
    {"key", T_STR, O(key), 0, 0, CMD_CLIENT},
    {"server-key", T_STR, O(server_key), 0, 0, CMD_CLIENT},
    {"partition", T_STR, O(partition), 0, 0, CMD_CLIENT | CMD_SIM},
    {"num-partitions", T_INT, O(num_partitions), 1, 1000000, CMD_CLIENT},
    {"partition-index", T_INT, O(partition_index), 0, 1000000, CMD_CLIENT},
    {"partition-seed", T_LONG, O(partition_seed), 0, (double)LLONG_MAX, CMD_CLIENT},
    {"eval-fraction", T_DOUBLE, O(eval_fraction), 0, 0.9, CMD_CLIENT},
    {"cache-dir", T_STR, O(cache_dir), 0, 0, CMD_CLIENT},
    {"echo", T_FLAG, O(echo), 0, 0, CMD_CLIENT},
    {"fit-delay", T_DOUBLE, O(fit_delay), 0, 3600, CMD_CLIENT},
    {"max-rounds", T_INT, O(max_rounds), 1, 1000000, CMD_CLIENT},
    {"clients", T_INT, O(clients), 1, 1000, CMD_SIM},
    {"limit-per-client", T_LONG, O(limit_per_client), 1, 1e12, CMD_SIM},
    {"keep", T_FLAG, O(keep_store), 0, 0, CMD_SIM},
    /* differential privacy accounting */
    {"accountant", T_STR, O(accountant), 0, 0, CMD_DP | CMD_TRAIN | FL_RUN},
    {"sample-rate", T_DOUBLE, O(sample_rate), 1e-300, 1, CMD_DP | CMD_TRAIN},
    {"noise-multiplier", T_DOUBLE, O(noise_multiplier), 1e-300, 1e300, CMD_DP | CMD_TRAIN | FL_RUN},
    {"delta", T_DOUBLE, O(delta), 1e-300, 0.999999999999, CMD_DP | CMD_TRAIN | FL_RUN},
    {"target-epsilon", T_DOUBLE, O(target_epsilon), 1e-300, 1e300, CMD_DP | CMD_TRAIN | FL_RUN},
    /* DP-SGD training */
    {"dp", T_FLAG, O(dp), 0, 0, CMD_TRAIN},
    {"max-grad-norm", T_DOUBLE, O(max_grad_norm), 1e-300, 1e300, CMD_TRAIN | FL_RUN},
    /* differential privacy in federated rounds */
    {"dp", T_STR, O(dp_mode), 0, 0, FL_RUN},
    {"clip-norm", T_DOUBLE, O(clip_norm), 1e-300, 1e300, FL_RUN},
    {"epsilon-budget", T_DOUBLE, O(epsilon_budget), 1e-300, 1e300, FL_RUN},
    {"expected-clients", T_DOUBLE, O(expected_clients), 1, 1e9, FL_RUN},
    /* pruning */
    {"sparsity", T_FLOAT, O(sparsity), 0, 1, CMD_PRUNE},
    {"scope", T_STR, O(scope), 0, 0, CMD_PRUNE},
    {"fine-tune-epochs", T_INT, O(epochs), 0, 100000, CMD_PRUNE},
    {"include", T_STR, O(prune_include), 0, 0, CMD_PRUNE},
    {"storage", T_STR, O(storage), 0, 0, CMD_PRUNE},
    {"gradual", T_FLAG, O(gradual), 0, 0, CMD_PRUNE},
    {"prune-interval", T_INT, O(prune_interval), 1, 1000000000, CMD_PRUNE},
    {"ema", T_DOUBLE, O(ema), 1e-300, 0.999999999, CMD_TRAIN},
};
#define NOPTIONS (sizeof OPTIONS / sizeof *OPTIONS)

static bool parse_number(const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi))
        return false;
    *out = v;
    return true;
}

/* Integers directly, so that 64-bit seeds keep every bit. */
static bool parse_integer(const char *s, long long lo, long long hi, long long *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

static int parse(int argc, char **argv, unsigned cmd, bool allow_args, bool any_order, cli *c)
{
    /* A name may appear twice (tern model's --keep N, tern sim's --keep): the entry that
     * applies to cmd wins, else the first. */
    struct option longopts[NOPTIONS + 2];
    size_t nlong = 0;
    for (size_t i = 0; i < NOPTIONS; i++) {
        bool shadowed = false;
        for (size_t j = 0; j < NOPTIONS && !shadowed; j++)
            if (j != i && strcmp(OPTIONS[j].name, OPTIONS[i].name) == 0)
                shadowed = (OPTIONS[j].cmds & cmd) ? !(OPTIONS[i].cmds & cmd) || j < i
                                                   : !(OPTIONS[i].cmds & cmd) && j < i;
        if (!shadowed)
            longopts[nlong++] = (struct option){
                OPTIONS[i].name, OPTIONS[i].type == T_FLAG ? no_argument : required_argument,
                NULL, (int)(256 + i)};
    }
    longopts[nlong] = (struct option){"help", no_argument, NULL, 'h'};
    longopts[nlong + 1] = (struct option){NULL, 0, NULL, 0};
    optind = any_order ? 0 : 1; /* 0: glibc re-reads the ordering from the option string */
    opterr = 0;
    int opt;
    while ((opt = getopt_long(argc, argv, any_order ? "h" : "+h", longopts, NULL)) != -1) {
        if (opt == 'h')
            return 2;
        if (opt < 256)
            return die("unknown option '%s' (see --help)", argv[optind - 1]);
        const opt_spec *o = &OPTIONS[opt - 256];
        if (!(o->cmds & cmd))
            return die("option --%s does not apply here (see --help)", o->name);
        char *field = (char *)c + o->offset;
        double v = 0;
        long long iv = 0;
        bool ok = true;
        switch (o->type) {
        case T_STR: *(const char **)field = optarg; break;
        case T_FLAG: *(bool *)field = true; break;
        case T_INT:
            if ((ok = parse_integer(optarg, (long long)o->lo, (long long)o->hi, &iv)))
                *(int *)field = (int)iv;
            break;
        case T_LONG:
            if ((ok = parse_integer(optarg, (long long)o->lo,
                                    o->hi >= 9.2e18 ? LLONG_MAX : (long long)o->hi, &iv)))
                *(long long *)field = iv;
            break;
        case T_FLOAT:
            if ((ok = parse_number(optarg, o->lo, o->hi, &v)))
                *(float *)field = (float)v;
            break;
        case T_DOUBLE:
            if ((ok = parse_number(optarg, o->lo, o->hi, &v)))
                *(double *)field = v;
            break;
        }
        if (!ok)
            return die("bad value '%s' for --%s (expected a number in [%g, %g])", optarg,
                       o->name, o->lo, o->hi);
    }
    if (optind < argc && !allow_args)
        return die("unexpected argument '%s' (see --help)", argv[optind]);
    c->args = argv + optind;
    c->nargs = argc - optind;
    return 0;
}

int cli_parse(int argc, char **argv, unsigned cmd, bool allow_args, cli *c)
{
    return parse(argc, argv, cmd, allow_args, false, c);
}

int cli_parse_any_order(int argc, char **argv, unsigned cmd, bool allow_args, cli *c)
{
    return parse(argc, argv, cmd, allow_args, true, c);
}

const char CLI_MODEL_HELP[] =
    "Model options (taken from the model file's metadata when it has them):\n"
    "  --arch mobilenet_v3_small|mobilenet_v3_large\n"
    "  --width-mult F        channel multiplier (default 1.0)\n"
    "  --in-channels C       input channels (default 3)\n"
    "  --num-classes K       classifier outputs (default 1000)\n"
    "  --norm batch|group    normalization layers (default batch)\n"
    "  --threads N           compute threads (default 1)\n"
    "  --isa auto|scalar|avx2|avx512  kernel instruction set (default auto)\n";

int cli_model_options(const cli *c, const char *path, const tern_safetensors *st,
                      tern_model_options *o)
{
    *o = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
    tern_error err = {{0}};
    bool have_arch = false;
    if (st) {
        tern_status s = tern_model_options_from_metadata(st, o, &err);
        if (s == TERN_OK)
            have_arch = true;
        else if (s != TERN_ERR_NOT_FOUND)
            return die("%s: %s", path, err.message);
    }
    if (c->arch) {
        if (tern_arch_parse(c->arch, &o->arch) != TERN_OK)
            return die("unknown --arch '%s' (mobilenet_v3_small or mobilenet_v3_large)", c->arch);
        have_arch = true;
    }
    if (!have_arch)
        return die("--arch is required (%s has no metadata naming it)", path ? path : "no model file");
    if (c->width_mult > 0)
        o->width_mult = c->width_mult;
    if (c->in_channels > 0)
        o->in_channels = c->in_channels;
    if (c->num_classes > 0)
        o->num_classes = c->num_classes;
    if (c->norm) {
        if (strcmp(c->norm, "batch") == 0)
            o->norm = TERN_NORM_BATCH;
        else if (strcmp(c->norm, "group") == 0)
            o->norm = TERN_NORM_GROUP;
        else
            return die("unknown --norm '%s' (batch or group)", c->norm);
    }
    if (c->isa) {
        const char *names[] = {"auto", "scalar", "avx2", "avx512"};
        int k = 0;
        while (k < 4 && strcmp(c->isa, names[k]) != 0)
            k++;
        if (k == 4)
            return die("unknown --isa '%s' (auto, scalar, avx2 or avx512)", c->isa);
        o->isa = (tern_isa)k;
    }
    o->threads = c->threads > 0 ? c->threads : 1;
    o->dropout = c->dropout;
    if (c->bn_momentum > 0)
        o->bn_momentum = c->bn_momentum;
    o->seed = (uint64_t)c->seed;
    return 0;
}

int cli_load_model(const cli *c, const char *path, tern_model **model, tern_model_info *info)
{
    tern_error err = {{0}};
    tern_safetensors *st = NULL;
    if (tern_safetensors_open(path, NULL, &st, &err) != TERN_OK)
        return die("%s", err.message);
    tern_model_options o;
    int rc = cli_model_options(c, path, st, &o);
    if (rc == 0 && tern_model_create(&o, model, &err) != TERN_OK)
        rc = die("%s", err.message);
    if (rc == 0 && tern_model_load_state(*model, st, "", &err) != TERN_OK) {
        rc = die("%s: %s", path, err.message);
        tern_model_destroy(model);
    }
    if (rc == 0 && info && tern_model_info_read(st, info, &err) != TERN_OK) {
        rc = die("%s: %s", path, err.message);
        tern_model_destroy(model);
    } else if (rc == 0 && info && info->nclasses &&
               info->nclasses != tern_model_options_of(*model)->num_classes) {
        rc = die("%s: %d class names for a %d-class model", path, info->nclasses,
                 tern_model_options_of(*model)->num_classes);
        tern_model_info_free(info);
        tern_model_destroy(model);
    }
    tern_safetensors_close(&st);
    return rc;
}
