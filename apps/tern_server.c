/* tern server: the federated server's command line (include/tern/server.h).
 *
 *   tern server init        store, initial model (DIR/initial.safetensors), CURVE keys (DIR/keys)
 *   tern server register    a client and its API key, shown once
 *   tern server clients     registered clients with their statistics
 *   tern server activate | deactivate | blacklist | unblacklist NAME
 *   tern server run         rounds: a table line per round, a summary at the end
 *
 * Also the pieces tern client and tern sim share (tern_fl.h): data sources, logging, client
 * registration and the run loop. */
#include <errno.h>
#include <jansson.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <limits.h>
#include <math.h>
#include <openssl/rand.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "tern.h"
#include "tern_fl.h"
#include "train_common.h"

/* ---- shared pieces ---------------------------------------------------------------------- */

const char *fl_store_dir(const cli *c)
{
    if (c->store)
        return c->store;
    const char *env = getenv("TERN_STORE");
    return env && *env ? env : FL_DEFAULT_STORE;
}

tern_log_level fl_log_level(const cli *c)
{
    return c->verbose ? TERN_LOG_DEBUG : c->quiet ? TERN_LOG_WARN : TERN_LOG_INFO;
}

void fl_log(void *user, tern_log_level level, const char *message)
{
    const fl_logger *lg = user;
    if (lg && level < lg->min_level)
        return;
    static const char *names[] = {"debug", "info", "warn", "error"};
    struct timeval tv;
    gettimeofday(&tv, NULL);
    time_t t = tv.tv_sec;
    struct tm tm;
    char when[32] = "?";
    if (localtime_r(&t, &tm))
        strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
    fprintf(stderr, "%s.%03d [%s] %s%s%s\n", when, (int)(tv.tv_usec / 1000),
            level >= TERN_LOG_DEBUG && level <= TERN_LOG_ERROR ? names[level] : "?",
            lg && lg->who ? lg->who : "", lg && lg->who ? ": " : "", message);
}

void fl_logf(fl_logger *lg, tern_log_level level, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fl_log(lg, level, buf);
}

int fl_open_dataset(const char *spec, bool train, tern_dataset **out, bool *fashion)
{
    tern_error err = {{0}};
    *fashion = strcmp(spec, "fashion-mnist") == 0;
    if (*fashion) {
        const char *dir = getenv("TERN_FASHION_MNIST");
        dir = dir && *dir ? dir : FL_FASHION_DIR;
        if (tern_dataset_open_fashion_mnist(dir, train, NULL, out, &err) != TERN_OK)
            return die("%s (install the dataset-fashion-mnist package)", err.message);
        return 0;
    }
    if (!is_dir(spec))
        return die("'%s' is neither fashion-mnist nor a directory", spec);
    char sub[PATH_MAX];
    snprintf(sub, sizeof sub, "%s/%s", spec, train ? "train" : "val");
    return open_folder(is_dir(sub) ? sub : spec, false, out);
}

void fl_transforms(bool fashion, int size, int channels, tern_transform *train,
                   tern_transform *eval)
{
    tern_transform e = {.size = size, .channels = channels};
    if (fashion) {
        e.resize = size == 32 ? 28 : size; /* 28x28 zero-padded to 32 at the reference size */
        tern_transform_normalize_fashion_mnist(&e);
    } else {
        e.resize = size * 256 / 224;
        tern_transform_normalize_imagenet(&e);
    }
    tern_transform t = e;
    t.hflip = true;
    if (fashion) {
        t.pad = size / 16;
    } else {
        t.random_resized_crop = true;
        t.resize = 0;
    }
    *train = t;
    *eval = e;
}

int fl_register_client(tern_store *store, const char *name, const char *device_type,
                       char key[65], tern_client_record *out)
{
    unsigned char raw[32];
    if (RAND_bytes(raw, sizeof raw) != 1)
        return die("cannot draw random bytes for the API key");
    for (int i = 0; i < 32; i++)
        snprintf(key + 2 * i, 3, "%02x", raw[i]);
    tern_client_record in = {0};
    tern_error err = {{0}};
    if (strlen(name) >= sizeof in.name)
        return die("client name '%.40s...' is too long (at most %zu bytes)", name,
                   sizeof in.name - 1);
    if (device_type && strlen(device_type) >= sizeof in.device_type)
        return die("--device-type is too long (at most %zu bytes)", sizeof in.device_type - 1);
    strcpy(in.name, name);
    if (device_type)
        strcpy(in.device_type, device_type);
    if (tern_store_hash_api_key(key, in.api_key_hash, &err) != TERN_OK ||
        tern_store_client_register(store, &in, out, &err) != TERN_OK)
        return die("%s", err.message);
    return 0;
}

static int join_path(char *out, size_t cap, const char *dir, const char *name)
{
    if ((size_t)snprintf(out, cap, "%s/%s", dir, name) >= cap)
        return die("path %s/%s is too long", dir, name);
    return 0;
}

static int open_store_sync(const char *dir, bool writable, bool no_sync, tern_store **s);

static int open_store(const char *dir, bool writable, tern_store **s)
{
    return open_store_sync(dir, writable, false, s);
}

/* no_sync: commits are not fsynced (tern_store_options.no_sync): they survive a killed process
 * but not a power loss or an operating-system crash. */
static int open_store_sync(const char *dir, bool writable, bool no_sync, tern_store **s)
{
    char path[PATH_MAX];
    struct stat sb;
    if (join_path(path, sizeof path, dir, "data.mdb"))
        return 1;
    if (stat(path, &sb) != 0)
        return die("no store at %s (run tern server init --store %s)", dir, dir);
    tern_error err = {{0}};
    if (tern_store_open(dir, &(tern_store_options){.read_only = !writable, .no_sync = no_sync},
                        s, &err) != TERN_OK)
        return die("%s", err.message);
    return 0;
}

static const char *user_name(void)
{
    const char *u = getenv("USER");
    return u && *u ? u : "cli";
}

/* ---- init --------------------------------------------------------------------------------- */

int fl_server_init(const cli *c, const char *dir, char public_key[TERN_CURVE_KEY_SIZE],
                   bool print)
{
    char model_path[PATH_MAX], key_dir[PATH_MAX], pub_path[PATH_MAX];
    if (join_path(model_path, sizeof model_path, dir, FL_INITIAL_MODEL) ||
        join_path(key_dir, sizeof key_dir, dir, FL_KEY_DIR) ||
        join_path(pub_path, sizeof pub_path, key_dir, "server.pub"))
        return 1;
    public_key[0] = 0;
    struct stat sb;
    if (stat(model_path, &sb) == 0)
        return die("%s is already a server directory (%s exists)", dir, model_path);

    cli mc = *c;
    if (!mc.arch || strcmp(mc.arch, "small") == 0)
        mc.arch = "mobilenet_v3_small";
    else if (strcmp(mc.arch, "large") == 0)
        mc.arch = "mobilenet_v3_large";
    if (mc.in_channels <= 0)
        mc.in_channels = 1;
    if (mc.num_classes <= 0)
        mc.num_classes = 10;
    if (!(mc.bn_momentum > 0))
        mc.bn_momentum = 0.1f;
    tern_error err = {{0}};
    tern_safetensors *st = NULL;
    if (c->init && tern_safetensors_open(c->init, NULL, &st, &err) != TERN_OK)
        return die("%s", err.message);
    tern_model_options o;
    tern_model *m = NULL;
    tern_model_info from = {0};
    int rc = cli_model_options(&mc, c->init, st, &o);
    if (rc == 0) {
        o.dropout = 0.2f;
        if (tern_model_create(&o, &m, &err) != TERN_OK)
            rc = die("%s", err.message);
    }
    if (rc == 0 && st && tern_model_load_state(m, st, "", &err) != TERN_OK)
        rc = die("%s: %s", c->init, err.message);
    if (rc == 0 && st && tern_model_info_read(st, &from, &err) != TERN_OK)
        rc = die("%s: %s", c->init, err.message);
    tern_safetensors_close(&st);
    if (rc)
        goto done;

    /* How clients and `tern eval` should feed the model: the --init file's, else Fashion-MNIST's
     * pipeline for a 1-channel 10-class model, else ImageNet's at 224. */
    tern_model_info mi = from;
    const char *fashion_names[10];
    bool fashion = o.in_channels == 1 && o.num_classes == 10;
    if (!from.input_size) {
        mi.input_size = fashion ? 32 : 224;
        mi.resize = fashion ? 28 : 256;
        tern_transform t = {0};
        if (fashion)
            tern_transform_normalize_fashion_mnist(&t);
        else
            tern_transform_normalize_imagenet(&t);
        memcpy(mi.mean, t.mean, sizeof mi.mean);
        memcpy(mi.std, t.std, sizeof mi.std);
    }
    if (!from.nclasses && fashion) {
        for (int k = 0; k < 10; k++)
            fashion_names[k] = tern_fashion_mnist_class(k);
        mi.nclasses = 10;
        mi.class_names = (char **)fashion_names;
    }

    tern_store *s = NULL;
    if (tern_store_open(dir, NULL, &s, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    tern_store_close(&s);
    if (tern_model_save_file(m, &mi, model_path, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    if (!c->insecure) {
        if (mkdir(key_dir, 0700) != 0 && errno != EEXIST) {
            rc = die("cannot create %s: %s", key_dir, strerror(errno));
            goto done;
        }
        if (tern_server_keygen(key_dir, public_key, &err) != TERN_OK) {
            rc = die("%s", err.message);
            goto done;
        }
    }
    if (print && c->json) {
        json_t *j = json_pack("{s:s, s:s, s:s, s:f, s:i, s:i, s:f, s:I}", "store", dir, "model",
                              model_path, "arch", tern_arch_name(o.arch), "width_mult",
                              o.width_mult, "in_channels", o.in_channels, "classes",
                              o.num_classes, "bn_momentum", (double)o.bn_momentum, "params",
                              (json_int_t)tern_model_param_count(m));
        if (j && !c->insecure) {
            json_object_set_new(j, "public_key", json_string(public_key));
            json_object_set_new(j, "public_key_file", json_string(pub_path));
        }
        if (!j || json_dumpf(j, stdout, JSON_INDENT(2)) != 0)
            rc = die("cannot write the JSON output");
        putchar('\n');
        json_decref(j);
    } else if (print) {
        printf("created the server directory %s\n", dir);
        printf("  store          %s/data.mdb\n", dir);
        printf("  initial model  %s: %s width %.2f, %d-channel input, %d classes, BatchNorm "
               "momentum %g, %zu parameters\n",
               model_path, tern_arch_name(o.arch), o.width_mult, o.in_channels, o.num_classes,
               (double)o.bn_momentum, tern_model_param_count(m));
        if (c->insecure) {
            printf("  no CURVE keys (--insecure): run the server and clients with --insecure\n");
        } else {
            printf("  server key     %s/server.key (secret, mode 0600)\n", key_dir);
            printf("  public key     %s\n", public_key);
            printf("                 (%s: give it to clients with --server-key)\n", pub_path);
        }
        printf("next: tern server register NAME --store %s, then tern server run --store %s\n",
               dir, dir);
    }
done:
    if (from.class_names)
        tern_model_info_free(&from);
    tern_model_destroy(&m);
    return rc;
}

/* ---- admin subcommands ---------------------------------------------------------------------- */

static int cmd_register(const cli *c, tern_store *s)
{
    char key[65];
    tern_client_record rec;
    if (fl_register_client(s, c->args[0], c->device_type, key, &rec))
        return 1;
    if (c->json) {
        json_t *j = json_pack("{s:s, s:s, s:s}", "name", rec.name, "id", rec.id, "api_key", key);
        int rc = !j || json_dumpf(j, stdout, JSON_INDENT(2)) != 0;
        json_decref(j);
        putchar('\n');
        return rc ? die("cannot write the JSON output") : 0;
    }
    printf("registered client %s (id %s)\n", rec.name, rec.id);
    printf("API key: %s\n", key);
    printf("This key is shown once and only its hash is stored: give it to the client now\n"
           "(tern client run --name %s, with the key in $TERN_API_KEY).\n",
           rec.name);
    return 0;
}

static const char *iso_time(char out[32], int64_t ms)
{
    if (ms <= 0)
        return strcpy(out, "-");
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    if (!gmtime_r(&t, &tm) || !strftime(out, 32, "%Y-%m-%dT%H:%M:%SZ", &tm))
        return strcpy(out, "?");
    return out;
}

static int cmd_clients(const cli *c, tern_store *s)
{
    tern_client_record *all = NULL;
    size_t n = 0;
    tern_error err = {{0}};
    if (tern_store_client_list(s, &all, &n, &err) != TERN_OK)
        return die("%s", err.message);
    int rc = 0;
    if (c->json) {
        json_t *arr = json_array();
        for (size_t i = 0; arr && i < n; i++) {
            const tern_client_record *r = &all[i];
            char seen[32], reg[32];
            json_t *o = json_pack(
                "{s:s, s:s, s:s, s:s, s:b, s:b, s:s?, s:f, s:I, s:s, s:s}", "id", r->id, "name",
                r->name, "device_type", r->device_type, "os_info", r->os_info, "active", r->active,
                "blacklisted", r->blacklisted, "blacklist_reason",
                r->blacklist_reason[0] ? r->blacklist_reason : NULL, "quality_score",
                r->quality_score, "total_samples", (json_int_t)r->total_samples, "registered_at",
                iso_time(reg, r->registered_at), "last_seen", iso_time(seen, r->last_seen));
            if (o)
                json_object_update_new(
                    o, json_pack("{s:I, s:I, s:I, s:I, s:f}", "rounds_selected",
                                 (json_int_t)r->rounds_selected, "rounds_succeeded",
                                 (json_int_t)r->rounds_succeeded, "rounds_failed",
                                 (json_int_t)r->rounds_failed, "rounds_rejected",
                                 (json_int_t)r->rounds_rejected, "last_update_norm",
                                 r->last_update_norm));
            if (!o || json_array_append_new(arr, o) != 0) {
                json_decref(arr);
                arr = NULL;
            }
        }
        if (!arr || json_dumpf(arr, stdout, JSON_INDENT(2)) != 0)
            rc = die("cannot write the JSON output");
        else
            putchar('\n');
        json_decref(arr);
    } else if (n == 0) {
        printf("no clients registered (tern server register NAME)\n");
    } else {
        printf("%-20s %-8s %7s %6s %6s %6s %6s %9s %8s %-20s %s\n", "name", "status", "quality",
               "chosen", "ok", "failed", "reject", "last norm", "samples", "last seen", "device");
        for (size_t i = 0; i < n; i++) {
            const tern_client_record *r = &all[i];
            char seen[32];
            printf("%-20s %-8s %7.3f %6lld %6lld %6lld %6lld %9.3g %8lld %-20s %s%s%s\n", r->name,
                   r->blacklisted ? "blocked" : r->active ? "active" : "inactive",
                   r->quality_score, (long long)r->rounds_selected,
                   (long long)r->rounds_succeeded, (long long)r->rounds_failed,
                   (long long)r->rounds_rejected, r->last_update_norm,
                   (long long)r->total_samples,
                   iso_time(seen, r->last_seen), r->device_type[0] ? r->device_type : "-",
                   r->blacklisted ? "  reason: " : "", r->blacklisted ? r->blacklist_reason : "");
        }
    }
    tern_store_free(s, all);
    return rc;
}

static int cmd_set_state(const cli *c, tern_store *s, const char *what)
{
    tern_client_record r;
    tern_error err = {{0}};
    if (tern_store_client_get_by_name(s, c->args[0], &r, &err) != TERN_OK)
        return die("%s", err.message);
    tern_status st;
    if (strcmp(what, "blacklist") == 0) {
        if (!c->reason || !*c->reason)
            return die("--reason is required (it is recorded with the blacklisting)");
        st = tern_store_client_set_blacklisted(s, r.id, true, c->reason, user_name(), &err);
    } else if (strcmp(what, "unblacklist") == 0) {
        st = tern_store_client_set_blacklisted(s, r.id, false, NULL, user_name(), &err);
    } else {
        st = tern_store_client_set_active(s, r.id, strcmp(what, "activate") == 0, user_name(),
                                          &err);
    }
    if (st != TERN_OK)
        return die("%s", err.message);
    printf("client %s: %s\n", r.name,
           !strcmp(what, "blacklist")     ? "blacklisted"
           : !strcmp(what, "unblacklist") ? "blacklisting lifted (active again)"
           : !strcmp(what, "activate")    ? "activated"
                                          : "deactivated");
    return 0;
}

/* ---- run ---------------------------------------------------------------------------------- */

/* Server-side evaluation over a held-out test set (the tern_server_evaluate_fn). */
typedef struct fl_eval {
    tern_dataset *ds;
    tern_loader *loader;
    tern_metrics *metrics;
    float *logits;
    int batch, size, classes;
} fl_eval;

static void fl_eval_close(fl_eval *e)
{
    tern_loader_destroy(&e->loader);
    tern_metrics_destroy(&e->metrics);
    tern_dataset_close(&e->ds);
    free(e->logits);
    memset(e, 0, sizeof *e);
}

static int fl_eval_open(fl_eval *e, const char *spec, long long limit, uint64_t seed,
                        const tern_model_info *info, int channels, int classes)
{
    memset(e, 0, sizeof *e);
    bool fashion;
    if (fl_open_dataset(spec, false, &e->ds, &fashion))
        return 1;
    if (tern_dataset_num_classes(e->ds) != classes) {
        int k = tern_dataset_num_classes(e->ds);
        fl_eval_close(e);
        return die("--test-data has %d classes, the model %d", k, classes);
    }
    size_t n = tern_dataset_size(e->ds);
    size_t *idx = shuffled_indices(n, seed ^ 0x7e57);
    if (!idx) {
        fl_eval_close(e);
        return die("out of memory");
    }
    if (limit > 0 && (size_t)limit < n)
        n = (size_t)limit;
    e->size = info->input_size ? info->input_size : fashion ? 32 : 224;
    tern_transform train_t, t;
    fl_transforms(fashion, e->size, channels, &train_t, &t);
    if (info->input_size)
        t = model_eval_transform(info, 0, channels);
    e->batch = 250;
    e->classes = classes;
    tern_error err = {{0}};
    tern_loader_options lo = {.batch = e->batch, .indices = idx, .nindices = n};
    tern_status s = tern_loader_create(e->ds, &t, &lo, NULL, &e->loader, &err);
    free(idx);
    if (s != TERN_OK) {
        fl_eval_close(e);
        return die("%s", err.message);
    }
    if (tern_metrics_create(classes, 1, NULL, &e->metrics) != TERN_OK ||
        !(e->logits = malloc(sizeof(float) * (size_t)e->batch * (size_t)classes))) {
        fl_eval_close(e);
        return die("out of memory");
    }
    return 0;
}

static tern_status fl_evaluate(void *user, tern_model *model, double *loss, double *accuracy,
                               uint64_t *num_examples, tern_error *err)
{
    fl_eval *e = user;
    tern_metrics_reset(e->metrics);
    if (tern_model_plan(model, e->batch, e->size, e->size, false) != TERN_OK) {
        snprintf(err->message, sizeof err->message, "%s", tern_model_last_error(model));
        return TERN_ERR_NOMEM;
    }
    for (;;) {
        const float *x;
        const int32_t *y;
        int n;
        tern_status s = tern_loader_next(e->loader, &x, &y, &n, err);
        if (s == TERN_ERR_NOT_FOUND)
            break;
        if (s != TERN_OK)
            return s;
        if ((s = tern_model_forward(model, e->logits, x, n, false)) != TERN_OK) {
            snprintf(err->message, sizeof err->message, "%s", tern_model_last_error(model));
            return s;
        }
        float l;
        if ((s = tern_cross_entropy_loss(&l, NULL, e->logits, y, n, e->classes, 0.0f)) != TERN_OK) {
            snprintf(err->message, sizeof err->message, "a test label is outside [0, %d)",
                     e->classes);
            return s;
        }
        tern_metrics_add(e->metrics, e->logits, y, n, l);
    }
    *loss = tern_metrics_loss(e->metrics);
    *accuracy = tern_metrics_accuracy(e->metrics);
    *num_examples = tern_metrics_count(e->metrics);
    return TERN_OK;
}

/* Server-side BatchNorm re-estimation (the server's calibrate callback): N images of the
 * --test-data source's training split (a seeded random subset, the same every round), with
 * the evaluation transform. */
typedef struct fl_calib {
    tern_dataset *ds;
    tern_loader *loader;
    tern_bn_calibration_options opt;
} fl_calib;

static void fl_calib_close(fl_calib *k)
{
    tern_loader_destroy(&k->loader);
    tern_dataset_close(&k->ds);
    memset(k, 0, sizeof *k);
}

static int fl_calib_open(fl_calib *k, const char *spec, long long count, uint64_t seed,
                         const tern_model_info *info, int channels)
{
    memset(k, 0, sizeof *k);
    bool fashion;
    if (fl_open_dataset(spec, true, &k->ds, &fashion))
        return 1;
    size_t n = tern_dataset_size(k->ds);
    if ((size_t)count < n)
        n = (size_t)count;
    if (n < 2) {
        fl_calib_close(k);
        return die("--bn-calibration needs at least 2 training images of %s", spec);
    }
    size_t *idx = shuffled_indices(tern_dataset_size(k->ds), seed ^ 0xb4ca1);
    if (!idx) {
        fl_calib_close(k);
        return die("out of memory");
    }
    int size = info->input_size ? info->input_size : fashion ? 32 : 224;
    tern_transform train_t, t;
    fl_transforms(fashion, size, channels, &train_t, &t);
    if (info->input_size)
        t = model_eval_transform(info, 0, channels);
    k->opt = (tern_bn_calibration_options){.batch = n < 100 ? (int)n : 100, .height = size,
                                           .width = size};
    tern_error err = {{0}};
    tern_loader_options lo = {.batch = k->opt.batch, .indices = idx, .nindices = n};
    tern_status s = tern_loader_create(k->ds, &t, &lo, NULL, &k->loader, &err);
    free(idx);
    if (s != TERN_OK) {
        fl_calib_close(k);
        return die("%s", err.message);
    }
    return 0;
}

static tern_status fl_calibrate(void *user, tern_model *model, tern_error *err)
{
    fl_calib *k = user;
    return tern_bn_calibrate(model, k->loader, &k->opt, NULL, err);
}

typedef struct fl_printer {
    FILE *json_log;
    const char *json_log_path;
    bool header_done;
    fl_run_result *res;
} fl_printer;

static json_t *jnum(double x)
{
    return isfinite(x) ? json_real(x) : json_null();
}

static json_t *report_json(const tern_round_report *r)
{
    char when[32];
    time_t now = time(NULL);
    struct tm tm;
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&now, &tm) ? &tm : NULL);
    json_t *j = json_pack(
        "{s:s, s:I, s:I, s:b, s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:o, s:o, s:o, s:o, s:I, "
        "s:o, s:o, s:o, s:I, s:I, s:f, s:f, s:f, s:f, s:s?}",
        "time", when, "round", (json_int_t)r->training_round, "store_round",
        (json_int_t)r->store_round, "completed", r->completed, "reason", r->reason, "available",
        (json_int_t)r->available, "selected", (json_int_t)r->selected, "succeeded",
        (json_int_t)r->succeeded, "failed", (json_int_t)r->failed, "rejected",
        (json_int_t)r->rejected, "num_examples", (json_int_t)r->num_examples, "train_loss",
        jnum(r->train_loss), "train_accuracy", jnum(r->train_accuracy), "client_eval_loss",
        jnum(r->client_eval_loss), "client_eval_accuracy", jnum(r->client_eval_accuracy),
        "client_eval_count", (json_int_t)r->client_eval_count, "eval_loss", jnum(r->eval_loss),
        "eval_accuracy", jnum(r->eval_accuracy), "update_norm_mean", jnum(r->update_norm_mean),
        "bytes_in", (json_int_t)r->bytes_in, "bytes_out", (json_int_t)r->bytes_out,
        "fit_seconds", r->fit_seconds, "eval_seconds", r->eval_seconds, "commit_seconds",
        r->commit_seconds, "round_seconds", r->round_seconds, "model_version",
        r->model_version[0] ? r->model_version : NULL);
    /* Where the server's time went (tern_round_report). */
    const struct { const char *key; double v; } timing[] = {
        {"idle_seconds", r->idle_seconds},           {"verify_seconds", r->verify_seconds},
        {"load_seconds", r->load_seconds},           {"fold_seconds", r->fold_seconds},
        {"send_seconds", r->send_seconds},           {"aggregate_seconds", r->aggregate_seconds},
        {"serialize_seconds", r->serialize_seconds}, {"cpu_seconds", r->cpu_seconds},
        {"loop_cpu_seconds", r->loop_cpu_seconds},
    };
    for (size_t i = 0; j && i < sizeof timing / sizeof timing[0]; i++)
        json_object_set_new(j, timing[i].key, jnum(timing[i].v));
    if (j)
        json_object_set_new(j, "epsilon", jnum(r->epsilon));
    return j;
}

static void print_header(void)
{
    printf("%5s %4s %4s %4s %10s %10s %9s %8s %8s %7s %8s  %s\n", "round", "sel", "ok", "fail",
           "train loss", "eval loss", "eval acc", "MB in", "MB out", "seconds", "epsilon",
           "version");
    fflush(stdout);
}

static void on_round(void *user, const tern_round_report *r)
{
    fl_printer *p = user;
    if (!p->header_done) {
        print_header();
        p->header_done = true;
    }
    char tl[16] = "-", el[16] = "-", ea[16] = "-";
    if (isfinite(r->train_loss))
        snprintf(tl, sizeof tl, "%.4f", r->train_loss);
    double eval_loss = isfinite(r->eval_loss) ? r->eval_loss : r->client_eval_loss;
    double eval_acc = isfinite(r->eval_accuracy) ? r->eval_accuracy : r->client_eval_accuracy;
    if (isfinite(eval_loss))
        snprintf(el, sizeof el, "%.4f", eval_loss);
    if (isfinite(eval_acc))
        snprintf(ea, sizeof ea, "%.2f%%", 100 * eval_acc);
    char eps[16] = "-";
    if (isfinite(r->epsilon))
        snprintf(eps, sizeof eps, "%.4g", r->epsilon);
    printf("%5llu %4zu %4zu %4zu %10s %10s %9s %8.1f %8.1f %7.1f %8s  %s",
           (unsigned long long)r->training_round, r->selected, r->succeeded, r->failed, tl, el,
           ea, (double)r->bytes_in / 1e6, (double)r->bytes_out / 1e6, r->round_seconds, eps,
           r->completed ? r->model_version : "failed");
    if (!r->completed)
        printf(": %s", r->reason);
    printf("\n");
    fflush(stdout);
    fl_run_result *res = p->res;
    if (r->completed) {
        res->completed++;
        res->final_accuracy = eval_acc;
        snprintf(res->final_version, sizeof res->final_version, "%s", r->model_version);
        if (isfinite(eval_acc) && !(eval_acc <= res->best_accuracy)) {
            res->best_accuracy = eval_acc;
            res->best_round = r->training_round;
            snprintf(res->best_version, sizeof res->best_version, "%s", r->model_version);
        }
    } else {
        res->failed++;
    }
    if (p->json_log) {
        json_t *j = report_json(r);
        if (!j || json_dumpf(j, p->json_log, JSON_COMPACT) != 0 || fputc('\n', p->json_log) == EOF ||
            fflush(p->json_log) != 0)
            fprintf(stderr, "%s: warning: cannot write %s\n", cli_prog, p->json_log_path);
        json_decref(j);
    }
}

int fl_secret_seed(uint64_t *seed)
{
    FILE *f = fopen("/dev/urandom", "rb");
    size_t got = f ? fread(seed, sizeof *seed, 1, f) : 0;
    if (f)
        fclose(f);
    return got == 1 ? 0 : die("cannot read /dev/urandom for a differential-privacy seed");
}

/* --dp client|central and its options into o (the noise seed from /dev/urandom). */
static int fl_dp_options(const cli *c, tern_server_dp_options *o)
{
    memset(o, 0, sizeof *o);
    if (!c->dp_mode) {
        if (c->noise_multiplier > 0 || c->target_epsilon > 0 || c->max_grad_norm > 0 ||
            c->clip_norm > 0 || c->delta > 0 || c->epsilon_budget > 0 ||
            c->expected_clients > 0 || c->accountant)
            return die("the differential-privacy options need --dp client|central");
        return 0;
    }
    if (tern_fl_dp_mode_parse(c->dp_mode, &o->mode) != TERN_OK || o->mode == TERN_FL_DP_NONE)
        return die("unknown --dp '%s' (client or central)", c->dp_mode);
    if (c->accountant && tern_accountant_kind_parse(c->accountant, &o->accountant) != TERN_OK)
        return die("unknown --accountant '%s' (rdp or prv)", c->accountant);
    bool central = o->mode == TERN_FL_DP_CENTRAL;
    if (central && (c->max_grad_norm > 0 || c->target_epsilon > 0 || c->epsilon_budget > 0))
        return die("--max-grad-norm, --target-epsilon and --epsilon-budget are for --dp client "
                   "(central DP clips updates with --clip-norm)");
    if (!central && (c->clip_norm > 0 || c->expected_clients > 0))
        return die("--clip-norm and --expected-clients are for --dp central");
    o->noise_multiplier = c->noise_multiplier;
    o->target_epsilon = c->target_epsilon;
    o->max_grad_norm = c->max_grad_norm;
    o->clip_norm = c->clip_norm;
    o->delta = c->delta;
    o->epsilon_budget = c->epsilon_budget;
    o->expected_clients = c->expected_clients;
    return fl_secret_seed(&o->seed);
}

static tern_server *volatile g_server;
static volatile sig_atomic_t g_interrupted;

void fl_server_stop(void)
{
    tern_server *s = g_server;
    if (s)
        tern_server_request_stop(s);
}

static void on_signal(int sig)
{
    g_interrupted = 1;
    fl_server_stop();
    /* A second Ctrl-C ends the process the usual way. */
    signal(sig, SIG_DFL);
}

/* "key=value ..." of the training settings: recorded with each version, so that a change of
 * settings bumps the minor version. */
static void settings_text(char *out, size_t cap, const cli *c, const tern_server_options *o)
{
    size_t used = (size_t)snprintf(out, cap, "strategy=%s fedbn=%d",
                                   tern_strategy_kind_name(o->strategy.kind), o->fedbn);
    for (uint32_t i = 0; i < o->fit_config.count && used < cap; i++) {
        const tern_config_entry *e = &o->fit_config.entries[i];
        if (e->type == TERN_CONFIG_INT)
            used += (size_t)snprintf(out + used, cap - used, " %s=%lld", e->key, (long long)e->i);
        else if (e->type == TERN_CONFIG_FLOAT)
            used += (size_t)snprintf(out + used, cap - used, " %s=%g", e->key, e->f);
    }
}

void fl_tune_malloc(void)
{
#ifdef __GLIBC__
    /* Blocks up to 32 MiB (glibc's ceiling for this setting) come from the heap, and the heap
     * keeps up to 512 MiB of free space at its top instead of trimming it. */
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 512 << 20);
#endif
}

int fl_server_run(const cli *c, const char *dir, const fl_run_hooks *hooks, fl_run_result *res)
{
    fl_run_result local_res;
    if (!res)
        res = &local_res;
    memset(res, 0, sizeof *res);
    res->best_accuracy = res->final_accuracy = NAN;

    tern_server_options o = tern_server_options_default();
    o.endpoint = c->endpoint ? c->endpoint : FL_DEFAULT_ENDPOINT;
    o.insecure = c->insecure;
    char key_path[PATH_MAX], model_path[PATH_MAX];
    if (join_path(key_path, sizeof key_path, dir, FL_KEY_DIR "/server.key") ||
        join_path(model_path, sizeof model_path, dir, FL_INITIAL_MODEL))
        return 1;
    tern_strategy_kind kind = TERN_STRATEGY_FEDAVG;
    if (c->strategy && tern_strategy_kind_parse(c->strategy, &kind) != TERN_OK)
        return die("unknown --strategy '%s' (fedavg, fedprox, fedavgm, fedadam, fedyogi, "
                   "fedadagrad, fedmedian, fedtrimmedavg or krum)", c->strategy);
    o.strategy = tern_strategy_options_default(kind);
    o.strategy.seed = (uint64_t)c->seed;
    if (c->fraction_fit > 0)
        o.strategy.fraction_fit = c->fraction_fit;
    if (c->fraction_evaluate >= 0)
        o.strategy.fraction_evaluate = c->fraction_evaluate;
    if (c->min_fit_clients > 0)
        o.strategy.min_fit_clients = (size_t)c->min_fit_clients;
    if (c->min_available_clients > 0)
        o.strategy.min_available_clients = (size_t)c->min_available_clients;
    if (o.strategy.min_evaluate_clients > o.strategy.min_available_clients)
        o.strategy.min_evaluate_clients = o.strategy.min_available_clients;
    if (c->proximal_mu >= 0)
        o.strategy.proximal_mu = c->proximal_mu;
    if (c->policy) {
        if (strcmp(c->policy, "strict") == 0)
            o.policy = TERN_POLICY_STRICT;
        else if (strcmp(c->policy, "tolerant") == 0)
            o.policy = TERN_POLICY_TOLERANT;
        else
            return die("unknown --policy '%s' (strict or tolerant)", c->policy);
    }
    if (c->min_completion > 0)
        o.min_completion = c->min_completion;
    if (c->round_timeout > 0)
        o.round_timeout_ms = (uint32_t)(c->round_timeout * 1000);
    if (c->wait_timeout > 0)
        o.wait_timeout_ms = (uint32_t)(c->wait_timeout * 1000);
    if (c->heartbeat_ms > 0)
        o.heartbeat_ms = (uint32_t)c->heartbeat_ms;
    o.fedbn = c->fedbn;
    o.rounds = c->rounds > 0 ? (uint32_t)c->rounds : 10;
    o.patience = c->patience > 0 ? (uint32_t)c->patience : 0;
    tern_config_set_int(&o.fit_config, "epochs", c->local_epochs > 0 ? c->local_epochs : 1);
    tern_config_set_int(&o.fit_config, "batch_size", c->batch > 0 ? c->batch : 32);
    tern_config_set_float(&o.fit_config, "lr", c->lr > 0 ? c->lr : 0.05);
    if (c->schedule && strcmp(c->schedule, "cosine") == 0)
        o.lr_schedule = TERN_LR_COSINE;
    else if (c->schedule && strcmp(c->schedule, "constant") != 0)
        return die("unknown --schedule '%s' (constant or cosine)", c->schedule);
    o.lr_min = c->lr_min;
    o.lr_warmup_rounds = (uint32_t)c->lr_warmup_rounds;
    if (c->weight_decay > 0)
        tern_config_set_float(&o.fit_config, "weight_decay", c->weight_decay);
    tern_config_set_float(&o.fit_config, "momentum", c->momentum >= 0 ? c->momentum : 0.9);
    if (c->max_steps > 0)
        tern_config_set_int(&o.fit_config, "max_steps", c->max_steps);
    if (c->smoothing > 0)
        tern_config_set_float(&o.fit_config, "label_smoothing", c->smoothing);
    if (fl_dp_options(c, &o.dp))
        return 1;
    tern_config_set_int(&o.evaluate_config, "batch_size", 256);
    char db[PATH_MAX];
    struct stat dbs;
    if (join_path(db, sizeof db, dir, "data.mdb"))
        return 1;
    if (stat(db, &dbs) != 0)
        return die("no store at %s (run tern server init --store %s)", dir, dir);
    if (!o.insecure) {
        struct stat sb;
        if (stat(key_path, &sb) != 0)
            return die("no server key at %s (made by tern server init; or run with --insecure)",
                       key_path);
        o.key_file = key_path;
    }

    tern_store *store = NULL;
    tern_model *model = NULL;
    tern_model_info info = {0};
    tern_server *server = NULL;
    fl_eval ev = {0};
    fl_calib calib = {0};
    fl_printer printer = {.res = res};
    fl_logger lg = {.min_level = fl_log_level(c)};
    char settings[1024], classes[4096] = "";
    tern_error err = {{0}};
    int rc;
    struct sigaction old_int, old_term;
    bool signals = false;

    fl_tune_malloc();
    if ((rc = open_store_sync(dir, true, c->no_sync, &store)))
        return rc;
    struct stat sb;
    if (stat(model_path, &sb) != 0) {
        rc = die("no initial model at %s (made by tern server init)", model_path);
        goto done;
    }
    cli mc = {.threads = c->threads > 0 ? c->threads : 1};
    if ((rc = cli_load_model(&mc, model_path, &model, &info)))
        goto done;
    const tern_model_options *mo = tern_model_options_of(model);
    for (int k = 0, used = 0; k < info.nclasses && used < (int)sizeof classes; k++)
        used += snprintf(classes + used, sizeof classes - (size_t)used, "%s%s", k ? "\n" : "",
                         info.class_names[k]);
    settings_text(settings, sizeof settings, c, &o);
    o.settings = settings;
    o.classes = classes;
    if (c->test_data) {
        if ((rc = fl_eval_open(&ev, c->test_data, c->test_limit, (uint64_t)c->seed, &info,
                               mo->in_channels, mo->num_classes)))
            goto done;
        o.evaluate = fl_evaluate;
        o.evaluate_user = &ev;
    }
    if (c->bn_calibration > 0) {
        if (!c->test_data) {
            rc = die("--bn-calibration takes its images from the training split of --test-data");
            goto done;
        }
        if ((rc = fl_calib_open(&calib, c->test_data, c->bn_calibration, (uint64_t)c->seed, &info,
                                mo->in_channels)))
            goto done;
        o.calibrate = fl_calibrate;
        o.calibrate_user = &calib;
    }
    if (c->json_log) {
        printer.json_log = fopen(c->json_log, "a");
        printer.json_log_path = c->json_log;
        if (!printer.json_log) {
            rc = die("cannot open %s: %s", c->json_log, strerror(errno));
            goto done;
        }
    }
    o.log = fl_log;
    o.log_user = &lg;
    o.on_round = on_round;
    o.on_round_user = &printer;

    if (tern_server_create(&o, store, model, &server, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    char pub[TERN_CURVE_KEY_SIZE] = "";
    if (!o.insecure)
        tern_curve_key_read(key_path, pub, NULL, NULL);
    fl_logf(&lg, TERN_LOG_INFO,
            "serving on %s (%s), store %s; %s width %.2f, %zu parameters; %s, %u rounds "
            "(%llu done)",
            tern_server_endpoint(server), o.insecure ? "insecure: no CURVE" : "CURVE", dir,
            tern_arch_name(mo->arch), mo->width_mult, tern_model_param_count(model),
            tern_strategy_kind_name(kind), o.rounds,
            (unsigned long long)tern_server_rounds_completed(server));
    if (pub[0])
        fl_logf(&lg, TERN_LOG_INFO, "server public key %s", pub);

    g_interrupted = 0;
    g_server = server;
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    signals = true;
    if (hooks && hooks->started && (rc = hooks->started(hooks->user, server)))
        goto done;
    double start = cli_now();
    tern_status st = tern_server_run(server, &err);
    res->seconds = cli_now() - start;
    res->interrupted = g_interrupted;
    if (res->interrupted)
        fprintf(stderr, "%s: interrupted; a round in progress is repeated by the next run\n",
                cli_prog);
    if (st != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    printf("%llu round%s completed, %llu failed, in %.1f s", (unsigned long long)res->completed,
           res->completed == 1 ? "" : "s", (unsigned long long)res->failed, res->seconds);
    if (isfinite(res->best_accuracy))
        printf("; best accuracy %.2f%% (round %llu, version %s), final %.2f%% (version %s)",
               100 * res->best_accuracy, (unsigned long long)res->best_round, res->best_version,
               100 * res->final_accuracy, res->final_version);
    else if (res->final_version[0])
        printf("; final version %s", res->final_version);
    printf("\n");
    fflush(stdout);
done:
    if (signals) {
        sigaction(SIGINT, &old_int, NULL);
        sigaction(SIGTERM, &old_term, NULL);
    }
    g_server = NULL;
    tern_server_destroy(&server);
    if (printer.json_log)
        fclose(printer.json_log);
    fl_eval_close(&ev);
    fl_calib_close(&calib);
    tern_model_info_free(&info);
    tern_model_destroy(&model);
    tern_store_close(&store);
    return rc;
}

/* ---- the command ------------------------------------------------------------------------------ */

static const char INIT_HELP[] =
    "usage: tern server init --store DIR [options]\n\n"
    "Creates a server directory: the LMDB store, the initial model (DIR/initial.safetensors,\n"
    "committed as version 1.0.0 by the first run) and the server's CURVE key pair\n"
    "(DIR/keys/server.key, secret, and DIR/keys/server.pub, for the clients).\n\n"
    "  --store DIR           server directory (default $TERN_STORE, else " FL_DEFAULT_STORE ")\n"
    "  --arch small|large    MobileNetV3-Small (default) or -Large\n"
    "  --width-mult F        channel multiplier (default 1.0)\n"
    "  --in-channels C       input channels (default 1, Fashion-MNIST)\n"
    "  --classes K           classes (default 10)\n"
    "  --bn-momentum F       BatchNorm momentum (default 0.1: with torchvision's 0.01, a few\n"
    "                        local steps barely move the running statistics and the averaged\n"
    "                        model stays at chance in eval mode; see docs/federation.md)\n"
    "  --seed S              initialisation seed (default 0)\n"
    "  --init W.safetensors  start from these weights instead\n"
    "  --insecure            no CURVE keys (local testing only: traffic in clear)\n"
    "  --json                print what was created as JSON\n\n"
    "example: tern server init --store ./fl --width-mult 0.5\n";

static const char RUN_HELP[] =
    "usage: tern server run --store DIR [options]\n\n"
    "Runs federated rounds: waits for clients, sends them the model, aggregates their updates,\n"
    "evaluates, and commits each round's model as a new version in the store. Prints one line\n"
    "per round and a summary. A restarted server resumes after the last committed round.\n"
    "Ctrl-C stops it (the round in progress is repeated by the next run).\n\n"
    "Network:\n"
    "  --store DIR           server directory from tern server init\n"
    "  --endpoint E          (default " FL_DEFAULT_ENDPOINT "; port 0 picks a free one)\n"
    "  --insecure            no CURVE encryption (clients must say --insecure too)\n"
    "  --heartbeat-ms N      heartbeat interval asked of clients (default 1000)\n"
    "Rounds:\n"
    "  --rounds R            completed rounds to reach, counting earlier runs (default 10)\n"
    "  --strategy S          fedavg (default), fedprox, fedavgm, fedadam, fedyogi, fedadagrad,\n"
    "                        fedmedian, fedtrimmedavg, krum\n"
    "  --fraction-fit F      share of available clients trained each round (default 1.0)\n"
    "  --min-fit-clients N, --min-available-clients N   (default 2 each)\n"
    "  --fraction-evaluate F share of clients evaluating each new model (default 1.0)\n"
    "  --policy tolerant|strict   a round survives failed clients (tolerant, default) while at\n"
    "                        least --min-completion (default 0.5) of the selected succeed;\n"
    "                        strict fails the round at the first failure\n"
    "  --round-timeout S     seconds for each round's fit and evaluate phases (default 600)\n"
    "  --wait-timeout S      give up when clients do not come for S seconds (default: wait)\n"
    "  --patience P          stop after P rounds without a better evaluation accuracy\n"
    "  --seed S              client selection and client training seeds (default 0)\n"
    "Client training (sent with each round):\n"
    "  --local-epochs E (default 1), --batch B (default 32), --lr F (default 0.05),\n"
    "  --schedule constant|cosine   the learning rate over the rounds (default constant);\n"
    "                        cosine decays from --lr to --lr-min (default 0) at --rounds\n"
    "  --lr-warmup-rounds W  rounds 1..W ramp the learning rate up to --lr (default 0)\n"
    "  --weight-decay F      client SGD weight decay (default 0)\n"
    "  --label-smoothing F   label smoothing of the clients' training loss (default 0)\n"
    "  --momentum F (default 0.9), --max-steps N (default: no limit),\n"
    "  --proximal-mu MU (FedProx; default 0.01), --fedbn (BatchNorm stays local)\n"
    "Differential privacy (docs/privacy.md; the model needs --norm group at init):\n"
    "  --dp client|central   client: every client trains with DP-SGD and the store's privacy\n"
    "                        ledger composes each client's rounds; central: Poisson-sampled\n"
    "                        clients, updates clipped and the sum noised by the server\n"
    "  --noise-multiplier S  client: DP-SGD's sigma; central: noise std / --clip-norm\n"
    "  --target-epsilon E    client, instead of --noise-multiplier: each client picks sigma so\n"
    "                        that --rounds rounds spend E\n"
    "  --max-grad-norm C     client: per-sample clipping norm (default 1)\n"
    "  --clip-norm S         central: clipping norm of each update's change (default 1)\n"
    "  --delta D             (default 1e-5)\n"
    "  --epsilon-budget E    client: clients whose next round would pass E are not selected\n"
    "  --expected-clients M  central: clients per round in expectation (default: the sample\n"
    "                        size of --fraction-fit / --min-fit-clients); q = M / available\n"
    "  --accountant rdp|prv  (default rdp)\n"
    "Evaluation and output:\n"
    "  --test-data fashion-mnist|DIR   evaluate each new model on this test set\n"
    "  --test-limit N        evaluate on N random test images\n"
    "  --bn-calibration N    re-estimate each aggregated model's BatchNorm statistics on N\n"
    "                        images of the training split of --test-data (default 0: off)\n"
    "  --threads N           threads for the server-side evaluation (default 1)\n"
    "  --json-log FILE       append one JSON line per round\n"
    "  --no-sync             do not fsync the store at each commit: faster rounds; a killed\n"
    "                        server loses nothing, a power loss may lose the last rounds\n"
    "  --verbose, --quiet    more or fewer log lines on stderr\n\n"
    "example: tern server run --store ./fl --rounds 20 --test-data fashion-mnist --test-limit 2000\n";

static const struct {
    const char *name, *args, *summary;
    int nargs;
    unsigned cmd;
    bool writes;
} SUBS[] = {
    {"init", "--store DIR [options]", "create the store, the initial model and the CURVE keys", 0,
     CMD_SERVER_INIT, true},
    {"register", "NAME [--device-type T]", "register a client; prints its API key once", 1,
     CMD_SERVER_ADMIN, true},
    {"clients", "", "list the registered clients", 0, CMD_SERVER_ADMIN, false},
    {"activate", "NAME", "let a deactivated client take part again", 1, CMD_SERVER_ADMIN, true},
    {"deactivate", "NAME", "stop selecting a client (it is refused at HELLO)", 1,
     CMD_SERVER_ADMIN, true},
    {"blacklist", "NAME --reason TEXT", "refuse a client for good, recording why", 1,
     CMD_SERVER_ADMIN, true},
    {"unblacklist", "NAME", "lift a blacklisting", 1, CMD_SERVER_ADMIN, true},
    {"run", "--store DIR [options]", "run federated rounds", 0, CMD_SERVER_RUN, true},
};
#define NSUBS (sizeof SUBS / sizeof *SUBS)

static void usage(FILE *f)
{
    fprintf(f, "usage: %s <subcommand> [options]\n\n"
               "The federated server: its store, its clients, and its rounds.\n\nSubcommands:\n",
            cli_prog);
    for (size_t i = 0; i < NSUBS; i++) {
        char head[64];
        snprintf(head, sizeof head, "%s %s", SUBS[i].name, SUBS[i].args);
        fprintf(f, "  %-36s %s\n", head, SUBS[i].summary);
    }
    fprintf(f, "\nEvery subcommand takes --store DIR (default $TERN_STORE, else " FL_DEFAULT_STORE
               ").\nRun '%s <subcommand> --help' for details.\n\n"
               "example:\n"
               "  tern server init --store ./fl\n"
               "  tern server register phone-1 --store ./fl\n"
               "  tern server run --store ./fl --test-data fashion-mnist --test-limit 2000\n",
            cli_prog);
}

int tern_cmd_server(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 1;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    size_t k = 0;
    while (k < NSUBS && strcmp(argv[1], SUBS[k].name) != 0)
        k++;
    if (k == NSUBS) {
        fprintf(stderr, "%s: unknown subcommand '%s'\n\n", cli_prog, argv[1]);
        usage(stderr);
        return 1;
    }
    static char prog[64];
    snprintf(prog, sizeof prog, "%s %s", cli_prog, SUBS[k].name);
    cli_prog = prog;
    cli c = {.momentum = -1, .fraction_evaluate = -1, .proximal_mu = -1};
    int rc = cli_parse_any_order(argc - 1, argv + 1, SUBS[k].cmd, SUBS[k].nargs > 0, &c);
    if (rc == 2) {
        if (SUBS[k].cmd == CMD_SERVER_INIT)
            fputs(INIT_HELP, stdout);
        else if (SUBS[k].cmd == CMD_SERVER_RUN)
            fputs(RUN_HELP, stdout);
        else
            printf("usage: %s %s [--store DIR]%s\n\n%s.\n\n  --store DIR     server directory "
                   "(default $TERN_STORE, else " FL_DEFAULT_STORE ")\n%s%s\nexample: %s %s\n",
                   prog, SUBS[k].args, strcmp(SUBS[k].name, "clients") && strcmp(SUBS[k].name, "register") ? "" : " [--json]",
                   SUBS[k].summary,
                   strcmp(SUBS[k].name, "clients") && strcmp(SUBS[k].name, "register")
                       ? ""
                       : "  --json          print JSON\n",
                   strcmp(SUBS[k].name, "register") ? "" : "  --device-type T kind of device, recorded\n",
                   prog,
                   !strcmp(SUBS[k].name, "clients") ? "--store ./fl --json"
                   : !strcmp(SUBS[k].name, "blacklist") ? "phone-7 --reason 'poisoned updates' --store ./fl"
                   : !strcmp(SUBS[k].name, "register") ? "phone-1 --device-type pixel-7 --store ./fl"
                                                        : "phone-1 --store ./fl");
        return 0;
    }
    if (rc)
        return rc;
    if (c.nargs != SUBS[k].nargs)
        return die(c.nargs > SUBS[k].nargs ? "unexpected argument '%s' (usage: %s %s)"
                                           : "missing argument%s (usage: %s %s)",
                   c.nargs > SUBS[k].nargs ? c.args[SUBS[k].nargs] : "", prog, SUBS[k].args);
    if ((c.reason && strcmp(SUBS[k].name, "blacklist") != 0) ||
        (c.device_type && strcmp(SUBS[k].name, "register") != 0) ||
        (c.json && SUBS[k].cmd == CMD_SERVER_ADMIN && strcmp(SUBS[k].name, "register") != 0 &&
         strcmp(SUBS[k].name, "clients") != 0))
        return die("option %s does not apply here (see --help)",
                   c.reason ? "--reason" : c.device_type ? "--device-type" : "--json");
    const char *dir = fl_store_dir(&c);
    if (!*dir)
        return die("--store needs a directory");
    if (SUBS[k].cmd == CMD_SERVER_INIT) {
        char pub[TERN_CURVE_KEY_SIZE];
        return fl_server_init(&c, dir, pub, true);
    }
    if (SUBS[k].cmd == CMD_SERVER_RUN)
        return fl_server_run(&c, dir, NULL, NULL);
    tern_store *s = NULL;
    if ((rc = open_store(dir, SUBS[k].writes, &s)))
        return rc;
    const char *name = SUBS[k].name;
    if (!strcmp(name, "register"))
        rc = cmd_register(&c, s);
    else if (!strcmp(name, "clients"))
        rc = cmd_clients(&c, s);
    else
        rc = cmd_set_state(&c, s, name);
    tern_store_close(&s);
    if (fflush(stdout) != 0 || ferror(stdout))
        rc = die("cannot write the output: %s", strerror(errno));
    return rc;
}
