/* tern client run: a federated client (include/tern/client.h) training on its share of a data
 * set with tern_local (include/tern/local.h).
 *
 * The share: the training split of Fashion-MNIST or of an image folder, partitioned across
 * --num-partitions clients with data/partition.c (IID, Dirichlet label skew or k classes per
 * client); this client takes partition --partition-index, shuffles it (seeded), keeps --limit
 * images and holds --eval-fraction of them out for evaluation. --echo skips all of that: the
 * client sends back the model it receives, one weight nudged so that each round's global
 * model is new and downloaded again (for measuring the server's round overhead), and passes
 * the update's SHA-256 along, computed from a kept hash state so that it costs a few bytes. */
#include <czmq.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <openssl/evp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "tern.h"
#include "tern_fl.h"
#include "train_common.h"

/* --echo: where the nudged float sits, for the safetensors header it was found in (every model
 * the server sends has the same header, so the JSON is parsed once, not every round), and the
 * SHA-256 state over the bytes before it. The float is the last one of the file's data, so the
 * update differs from the model only in the few bytes after that state: its hash costs a short
 * tail instead of a pass over the whole model. */
typedef struct echo_spot {
    unsigned char *header; /* the 8-byte length and the JSON header; NULL: none yet */
    size_t header_len;
    size_t at;             /* byte offset of the float in the file */
    EVP_MD_CTX *prefix;    /* SHA-256 over bytes [0, prefix_at) of a model of prefix_len bytes */
    size_t prefix_at, prefix_len;
} echo_spot;

typedef struct client_ctx {
    tern_local *local;
    bool echo;
    echo_spot spot;
    double fit_delay;
    fl_logger lg;
} client_ctx;

/* Sleeps up to seconds, returning false early when the work is cancelled. */
static bool delay(double seconds, const volatile bool *cancel)
{
    double end = cli_now() + seconds;
    while (cli_now() < end) {
        if (cancel && *cancel)
            return false;
        nanosleep(&(struct timespec){0, 10 * 1000 * 1000}, NULL);
    }
    return !(cancel && *cancel);
}

/* Adds 1e-3 to the last float of a safetensors file's data (the last element of the F32 tensor
 * that ends last), in place (layout: u64 header length N, N bytes of JSON, then the data).
 * Returns its offset, or SIZE_MAX when there is none (nothing changed). The offset is looked up
 * in the JSON only when the header differs from the last one. */
static size_t nudge_last_f32(echo_spot *spot, void *bytes, size_t len)
{
    unsigned char *b = bytes;
    if (len < 8)
        return SIZE_MAX;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | b[i];
    if (n > len - 8)
        return SIZE_MAX;
    size_t hl = (size_t)n + 8, at = spot->at;
    if (!spot->header || spot->header_len != hl || memcmp(spot->header, b, hl) != 0) {
        free(spot->header);
        spot->header = NULL;
        at = SIZE_MAX;
        json_int_t last = -1;
        json_t *h = json_loadb((const char *)b + 8, (size_t)n, 0, NULL);
        const char *key;
        json_t *t;
        json_object_foreach(h, key, t) {
            json_t *off = json_object_get(t, "data_offsets");
            const char *dtype = json_string_value(json_object_get(t, "dtype"));
            json_int_t begin = json_integer_value(json_array_get(off, 0));
            json_int_t end = json_integer_value(json_array_get(off, 1));
            if (strcmp(key, "__metadata__") == 0 || !dtype || strcmp(dtype, "F32") != 0 ||
                begin < 0 || end - begin < (json_int_t)sizeof(float) || end <= last ||
                hl + (uint64_t)end > len)
                continue;
            last = end;
            at = hl + (size_t)end - sizeof(float);
        }
        json_decref(h);
        if (at != SIZE_MAX && (spot->header = malloc(hl))) { /* else found again next round */
            memcpy(spot->header, b, hl);
            spot->header_len = hl;
            spot->at = at;
        }
    }
    if (at == SIZE_MAX || at + sizeof(float) > len)
        return SIZE_MAX;
    float x;
    memcpy(&x, b + at, sizeof x);
    x += 1e-3f;
    memcpy(b + at, &x, sizeof x);
    return at;
}

/* SHA-256 of the state `from` continued over tail[0..n). */
static bool sha256_finish(const EVP_MD_CTX *from, const void *tail, size_t n, uint8_t out[32])
{
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    unsigned int got = 0;
    bool ok = c && EVP_MD_CTX_copy_ex(c, from) == 1 && EVP_DigestUpdate(c, tail, n) == 1 &&
              EVP_DigestFinal_ex(c, out, &got) == 1 && got == 32;
    EVP_MD_CTX_free(c);
    return ok;
}

/* The SHA-256 of the update, which equals the model except in bytes at and after `at`. The
 * state over the model's bytes before `at` is kept from an earlier round; it still applies when
 * finishing it over this model's tail gives this model's (verified) hash, else it is computed
 * again from this model. false: no hash (the client library then hashes the update itself). */
static bool echo_update_sha256(echo_spot *spot, const tern_fit_task *task, const void *update,
                               size_t at, uint8_t out[32])
{
    const unsigned char *model = task->model;
    size_t len = task->model_size;
    uint8_t h[32];
    if (!task->model_sha256 || at >= len)
        return false;
    if (!spot->prefix || spot->prefix_at != at || spot->prefix_len != len ||
        !sha256_finish(spot->prefix, model + at, len - at, h) ||
        memcmp(h, task->model_sha256, 32) != 0) {
        if (!spot->prefix && !(spot->prefix = EVP_MD_CTX_new()))
            return false;
        spot->prefix_len = 0;
        if (EVP_DigestInit_ex(spot->prefix, EVP_sha256(), NULL) != 1 ||
            EVP_DigestUpdate(spot->prefix, model, at) != 1)
            return false;
        spot->prefix_at = at;
        spot->prefix_len = len;
    }
    return sha256_finish(spot->prefix, (const unsigned char *)update + at, len - at, out);
}

static tern_status fit(void *user, const tern_fit_task *task, const volatile bool *cancel,
                       tern_fit_output *out, tern_error *err)
{
    client_ctx *ctx = user;
    double t0 = cli_now();
    fl_logf(&ctx->lg, TERN_LOG_INFO, "round %u: fit on model %llu (%zu bytes)", task->round,
            (unsigned long long)task->model_version, task->model_size);
    if (ctx->fit_delay > 0 && !delay(ctx->fit_delay, cancel)) {
        snprintf(err->message, sizeof err->message, "cancelled");
        return TERN_ERR_STATE;
    }
    if (ctx->echo) {
        out->update = task->update_buffer && task->update_capacity >= task->model_size
                          ? task->update_buffer
                          : malloc(task->model_size ? task->model_size : 1);
        if (!out->update) {
            snprintf(err->message, sizeof err->message, "out of memory");
            return TERN_ERR_NOMEM;
        }
        memcpy(out->update, task->model, task->model_size);
        out->update_size = task->model_size;
        out->num_examples = 1;
        /* One weight nudged: the next global model is new, as after training, so the next
         * round downloads it again instead of hitting the client's model cache. */
        size_t at = nudge_last_f32(&ctx->spot, out->update, out->update_size);
        out->has_sha256 = at != SIZE_MAX &&
                          echo_update_sha256(&ctx->spot, task, out->update, at, out->sha256);
        return TERN_OK;
    }
    tern_local_result r = {0};
    tern_status s = tern_local_fit(ctx->local, task->model, task->model_size, task->config,
                                   cancel, &out->update, &out->update_size, &r, err);
    if (s != TERN_OK) {
        fl_logf(&ctx->lg, TERN_LOG_WARN, "round %u: fit failed: %s", task->round, err->message);
        return s;
    }
    out->num_examples = r.num_examples ? r.num_examples : 1;
    tern_local_result_metrics(&r, &out->metrics);
    if (r.dp)
        fl_logf(&ctx->lg, TERN_LOG_INFO, "round %u: DP-SGD noise multiplier %.4g, sample rate "
                "%.4g, %llu steps: epsilon %.4g for this round alone", task->round,
                r.dp_noise_multiplier, r.dp_sample_rate, (unsigned long long)r.steps,
                r.dp_epsilon);
    fl_logf(&ctx->lg, TERN_LOG_INFO,
            "round %u: trained on %llu examples in %llu steps: loss %.4f, accuracy %.2f%%, %.1f s",
            task->round, (unsigned long long)r.num_examples, (unsigned long long)r.steps, r.loss,
            100 * r.accuracy, cli_now() - t0);
    return TERN_OK;
}

static tern_status evaluate(void *user, const tern_fit_task *task, const volatile bool *cancel,
                            tern_evaluate_output *out, tern_error *err)
{
    client_ctx *ctx = user;
    if (ctx->echo) {
        out->num_examples = 1;
        out->loss = 0;
        return TERN_OK;
    }
    tern_local_result r = {0};
    tern_status s = tern_local_evaluate(ctx->local, task->model, task->model_size, task->config,
                                        cancel, &r, err);
    if (s != TERN_OK) {
        fl_logf(&ctx->lg, TERN_LOG_WARN, "round %u: evaluation failed: %s", task->round,
                err->message);
        return s;
    }
    out->num_examples = r.num_examples ? r.num_examples : 1;
    out->loss = isfinite(r.loss) ? r.loss : 0;
    if (isfinite(r.accuracy))
        tern_metrics_set(&out->metrics, "accuracy", r.accuracy);
    fl_logf(&ctx->lg, TERN_LOG_INFO, "round %u: evaluated on %llu examples: loss %.4f, accuracy %.2f%%",
            task->round, (unsigned long long)r.num_examples, r.loss, 100 * r.accuracy);
    return TERN_OK;
}

/* ---- the client's share of the data ----------------------------------------------------------- */

typedef struct share {
    tern_dataset *ds;
    bool fashion;
    size_t *train, *eval;
    size_t ntrain, neval;
} share;

static void share_close(share *s)
{
    tern_dataset_close(&s->ds);
    free(s->train);
    free(s->eval);
    memset(s, 0, sizeof *s);
}

static int make_share(const cli *c, share *s)
{
    memset(s, 0, sizeof *s);
    if (fl_open_dataset(c->data ? c->data : "fashion-mnist", true, &s->ds, &s->fashion))
        return 1;
    int parts = c->num_partitions > 0 ? c->num_partitions : 1;
    int index = c->partition_index;
    if (index >= parts) {
        share_close(s);
        return die("--partition-index %d is outside [0, %d) (--num-partitions)", index, parts);
    }
    size_t n = tern_dataset_size(s->ds);
    int classes = tern_dataset_num_classes(s->ds);
    int *owner = malloc(n * sizeof *owner);
    int32_t *labels = malloc(n * sizeof *labels);
    if (!owner || !labels) {
        free(owner);
        free(labels);
        share_close(s);
        return die("out of memory");
    }
    for (size_t i = 0; i < n; i++)
        labels[i] = tern_dataset_label(s->ds, i);
    const char *p = c->partition ? c->partition : "iid";
    uint64_t pseed = (uint64_t)c->partition_seed;
    tern_status st = TERN_ERR_INVALID;
    char *end = NULL;
    if (strcmp(p, "iid") == 0) {
        st = tern_partition_iid(owner, n, parts, pseed);
    } else if (strncmp(p, "dirichlet:", 10) == 0) {
        double alpha = strtod(p + 10, &end);
        if (end != p + 10 && !*end && alpha > 0 && isfinite(alpha))
            st = tern_partition_dirichlet(owner, labels, n, classes, parts, alpha, pseed);
        else
            end = NULL;
    } else if (strncmp(p, "classes:", 8) == 0) {
        long k = strtol(p + 8, &end, 10);
        if (end != p + 8 && !*end && k >= 1 && k <= classes)
            st = tern_partition_classes(owner, labels, n, classes, parts, (int)k, pseed);
        else
            end = NULL;
    }
    free(labels);
    if (st != TERN_OK) {
        free(owner);
        share_close(s);
        if (strcmp(p, "iid") && !end)
            return die("bad --partition '%s' (iid, dirichlet:ALPHA with ALPHA > 0, or "
                       "classes:K with 1 <= K <= %d)", p, classes);
        return die("cannot split %zu images into %d partitions with %s", n, parts, p);
    }
    size_t count = 0;
    for (size_t i = 0; i < n; i++)
        count += owner[i] == index;
    size_t *mine = malloc((count ? count : 1) * sizeof *mine);
    if (!mine) {
        free(owner);
        share_close(s);
        return die("out of memory");
    }
    for (size_t i = 0, j = 0; i < n; i++)
        if (owner[i] == index)
            mine[j++] = i;
    free(owner);
    /* Seeded shuffle of the share, so that --limit and the held-out split are random. */
    size_t *perm = shuffled_indices(count, pseed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(index + 1)));
    if (!perm) {
        free(mine);
        share_close(s);
        return die("out of memory");
    }
    for (size_t i = 0; i < count; i++)
        perm[i] = mine[perm[i]];
    free(mine);
    if (c->limit > 0 && (size_t)c->limit < count)
        count = (size_t)c->limit;
    double frac = c->eval_fraction >= 0 ? c->eval_fraction : 0.1;
    size_t neval = (size_t)(frac * (double)count);
    if (count - neval < 1) {
        free(perm);
        share_close(s);
        return die("partition %d of %d holds %zu images: too few to train on", index, parts, count);
    }
    s->train = perm;
    s->ntrain = count - neval;
    s->neval = neval;
    if (neval) {
        s->eval = malloc(neval * sizeof *s->eval);
        if (!s->eval) {
            share_close(s);
            return die("out of memory");
        }
        memcpy(s->eval, perm + s->ntrain, neval * sizeof *perm);
    }
    return 0;
}

/* ---- the command -------------------------------------------------------------------------------- */

static const char CLIENT_HELP[] =
    "usage: tern client run --name NAME [--server-key KEY | --insecure] [options]\n\n"
    "Connects to a tern server, trains on this client's share of the data whenever the server\n"
    "asks, and sends back the new weights (never the pictures). Runs until the server ends the\n"
    "run or Ctrl-C. Exit status: 0 done, 2 refused by the server, 1 other errors.\n\n"
    "Connection:\n"
    "  --endpoint E           server address (default " FL_DEFAULT_ENDPOINT ")\n"
    "  --name NAME            the name the client was registered with (tern server register)\n"
    "  --key KEY              its API key; better: the environment variable TERN_API_KEY,\n"
    "                         which other users cannot read in the process list\n"
    "  --server-key Z85|PATH  the server's public key, or its server.pub file\n"
    "  --insecure             no CURVE encryption (the server must run with --insecure)\n"
    "  --cache-dir DIR        keep the last model here, not downloaded again after a restart\n"
    "Data:\n"
    "  --data fashion-mnist|DIR   training pictures (default fashion-mnist: its training split)\n"
    "  --partition iid|dirichlet:ALPHA|classes:K   how the data is split among clients\n"
    "                         (default iid)\n"
    "  --num-partitions N, --partition-index I     split into N shares, take share I\n"
    "                         (default 1 and 0: the whole set)\n"
    "  --partition-seed S     seed of the split (the same on every client; default 0)\n"
    "  --limit N              use N random images of the share\n"
    "  --eval-fraction F      share held out for evaluation (default 0.1)\n"
    "  --size S               input size (default 32 for Fashion-MNIST, 224 for folders)\n"
    "  --threads T            compute threads (default 1)\n"
    "Other:\n"
    "  --echo                 no data: send back the received model, one weight nudged so that\n"
    "                         every round has a new model (round-overhead benchmarks)\n"
    "  --max-rounds N         stop after N fit results\n"
    "  --fit-delay S          wait S seconds before each fit (for failure tests)\n"
    "  --verbose, --quiet     more or fewer log lines on stderr\n\n"
    "example: TERN_API_KEY=... tern client run --endpoint tcp://10.0.0.5:7600 --name phone-1 \\\n"
    "           --server-key fl/keys/server.pub --partition dirichlet:0.5 --num-partitions 4 \\\n"
    "           --partition-index 0\n";

static tern_client *volatile g_client;

static void on_signal(int sig)
{
    tern_client *cl = g_client;
    if (cl)
        tern_client_request_stop(cl);
    signal(sig, SIG_DFL);
}

static int client_run(const cli *c)
{
    if (!c->name)
        return die("--name is required (the name given to tern server register)");
    const char *key = c->key;
    if (!key) {
        key = getenv("TERN_API_KEY");
        if (!key || !*key)
            return die("no API key: set TERN_API_KEY (or pass --key)");
    }
    if (!c->insecure && !c->server_key)
        return die("--server-key Z85|PATH is required (or --insecure, if the server runs so)");
    if (c->insecure && c->server_key)
        return die("--server-key and --insecure exclude each other");
    if (c->echo && (c->data || c->partition || c->limit))
        return die("--echo takes no data options");

    fl_tune_malloc();
    client_ctx ctx = {.echo = c->echo, .fit_delay = c->fit_delay,
                      .lg = {.min_level = fl_log_level(c), .who = c->name}};
    share sh = {0};
    tern_client *client = NULL;
    tern_error err = {{0}};
    int rc = 0;
    if (!c->echo) {
        if ((rc = make_share(c, &sh)))
            return rc;
        int size = c->size ? c->size : sh.fashion ? 32 : 224;
        int channels = sh.fashion ? 1 : 3;
        tern_transform tt, et;
        fl_transforms(sh.fashion, size, channels, &tt, &et);
        tern_local_data_options lo = {.dataset = sh.ds, .train_indices = sh.train,
                                      .num_train = sh.ntrain, .eval_indices = sh.eval,
                                      .num_eval = sh.neval, .train_transform = tt,
                                      .eval_transform = et,
                                      .threads = c->threads > 0 ? c->threads : 1};
        /* DP-SGD's noise must be unpredictable to the server: a secret from the kernel. */
        if ((rc = fl_secret_seed(&lo.dp_secret)))
            goto done;
        if (tern_local_create(&lo, &ctx.local, &err) != TERN_OK) {
            rc = die("%s", err.message);
            goto done;
        }
        fl_logf(&ctx.lg, TERN_LOG_INFO, "%zu training and %zu held-out images (partition %d of %d, %s)",
                sh.ntrain, sh.neval, c->partition_index,
                c->num_partitions > 0 ? c->num_partitions : 1, c->partition ? c->partition : "iid");
    }
    tern_client_options o = tern_client_options_default();
    o.endpoint = c->endpoint ? c->endpoint : FL_DEFAULT_ENDPOINT;
    o.name = c->name;
    o.api_key = key;
    o.insecure = c->insecure;
    o.server_public_key = c->server_key;
    o.cache_dir = c->cache_dir;
    o.num_examples = sh.ntrain;
    o.fit = fit;
    o.evaluate = c->echo || sh.neval ? evaluate : NULL;
    o.user = &ctx;
    o.max_rounds = c->max_rounds > 0 ? (uint32_t)c->max_rounds : 0;
    o.log = fl_log;
    o.log_user = &ctx.lg;
    if (tern_client_create(&o, &client, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    /* This program owns SIGINT and SIGTERM: CZMQ would otherwise install its own handlers when
     * the client makes its first socket, and a stop request would never reach the client. */
    zsys_handler_set(NULL);
    g_client = client;
    struct sigaction sa = {.sa_handler = on_signal}, old_int, old_term;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    fl_logf(&ctx.lg, TERN_LOG_INFO, "connecting to %s (%s)", o.endpoint,
            o.insecure ? "insecure" : "CURVE");
    tern_status st = tern_client_run(client, &err);
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    g_client = NULL;
    tern_client_stats stats;
    tern_client_stats_get(client, &stats);
    if (st == TERN_ERR_STATE) {
        rc = 2;
        fprintf(stderr, "%s: refused by the server: %s\n", cli_prog, err.message);
    } else if (st != TERN_OK) {
        rc = die("%s", err.message);
    } else {
        fl_logf(&ctx.lg, TERN_LOG_INFO,
                "done: %llu fits, %llu evaluations, %llu downloads (%llu cached), %.1f MB in, "
                "%.1f MB out, %llu session%s",
                (unsigned long long)stats.fits, (unsigned long long)stats.evaluates,
                (unsigned long long)stats.downloads, (unsigned long long)stats.cache_hits,
                (double)stats.bytes_in / 1e6, (double)stats.bytes_out / 1e6,
                (unsigned long long)stats.sessions, stats.sessions == 1 ? "" : "s");
    }
done:
    tern_client_destroy(&client);
    tern_local_destroy(&ctx.local);
    free(ctx.spot.header);
    EVP_MD_CTX_free(ctx.spot.prefix);
    share_close(&sh);
    return rc;
}

int tern_cmd_client(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        fputs(CLIENT_HELP, argc < 2 ? stderr : stdout);
        return argc < 2;
    }
    if (strcmp(argv[1], "run") != 0) {
        fprintf(stderr, "%s: unknown subcommand '%s' (the only one is run)\n", cli_prog, argv[1]);
        return 1;
    }
    static char prog[64];
    snprintf(prog, sizeof prog, "%s run", cli_prog);
    cli_prog = prog;
    cli c = {.eval_fraction = -1};
    int rc = cli_parse(argc - 1, argv + 1, CMD_CLIENT, false, &c);
    if (rc == 2) {
        fputs(CLIENT_HELP, stdout);
        return 0;
    }
    if (rc)
        return rc;
    return client_run(&c);
}
