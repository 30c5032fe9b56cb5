/* tern store, tern category, tern model: the command line over the server's store
 * (include/tern/store.h).
 *
 *   tern store     init | ls | show [clients|rounds|audit] | check | backup DEST | restore SRC
 *   tern category  add NAME | list | rename OLD NEW | rm NAME | activate NAME | deactivate NAME
 *   tern model     list | show VERSION | rollback VERSION | export VERSION OUT | tag VERSION TAG
 *                  | prune --keep N
 *
 * Every subcommand takes --store DIR (default $TERN_STORE, else ./tern-store), --json (one JSON
 * document on stdout, built with jansson) and --help. Text output is aligned tables with
 * ISO 8601 UTC times. Reads open the store read-only; changes record the actor ($USER, else
 * "cli") in the store's audit log. Errors go to stderr and exit with 1. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "tern.h"

#define DEFAULT_STORE "./tern-store"

/* ---- output helpers --------------------------------------------------------------------- */

/* "2023-11-14T22:13:20Z" (seconds) for people; "-" when unset. */
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

/* "2023-11-14T22:13:20.123Z" for programs; null when unset. */
static json_t *jtime(int64_t ms)
{
    if (ms <= 0)
        return json_null();
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    char buf[40], frac[8];
    if (!gmtime_r(&t, &tm) || !strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm))
        return json_null();
    snprintf(frac, sizeof frac, ".%03dZ", (int)(ms % 1000));
    strcat(buf, frac);
    return json_string(buf);
}

/* A string, or null when empty. */
static json_t *jtext(const char *s)
{
    return s[0] ? json_string(s) : json_null();
}

static json_t *jreal(double x)
{
    return isfinite(x) ? json_real(x) : json_null();
}

/* Library messages may quote bytes read from a damaged store: keep the JSON valid. */
static json_t *jstring_safe(const char *s)
{
    json_t *j = json_string(s);
    if (j)
        return j;
    char *copy = strdup(s);
    if (!copy)
        return NULL;
    for (char *p = copy; *p; p++)
        if ((unsigned char)*p >= 0x80)
            *p = '?';
    j = json_string(copy);
    free(copy);
    return j;
}

/* Appends v (consumed) to arr; -1 when either is NULL or the append fails. */
static int jpush(json_t *arr, json_t *v)
{
    if (!arr || !v) {
        json_decref(v);
        return -1;
    }
    return json_array_append_new(arr, v);
}

/* Prints root (consumed) on stdout; NULL means building it ran out of memory. */
static int emit(json_t *root)
{
    if (!root)
        return die("out of memory building the JSON output");
    int rc = json_dumpf(root, stdout, JSON_INDENT(2));
    json_decref(root);
    if (rc != 0)
        return die("cannot write the JSON output");
    putchar('\n');
    return 0;
}

static const char *human_bytes(char out[32], uint64_t n)
{
    static const char *units[] = {"KiB", "MiB", "GiB", "TiB"};
    if (n < 1024) {
        snprintf(out, 32, "%llu B", (unsigned long long)n);
        return out;
    }
    double v = (double)n / 1024;
    int u = 0;
    while (v >= 1024 && u < 3) {
        v /= 1024;
        u++;
    }
    snprintf(out, 32, "%.1f %s", v, units[u]);
    return out;
}

/* Rows of strings printed in aligned columns: 'l' or 'r' per column in align. */
typedef struct table {
    int ncols;
    const char *const *head;
    const char *align;
    char **cells;
    size_t rows, cap;
} table;

static int table_add(table *t, const char *const *row)
{
    if (t->rows == t->cap) {
        size_t cap = t->cap ? 2 * t->cap : 16;
        char **cells = realloc(t->cells, cap * (size_t)t->ncols * sizeof *cells);
        if (!cells)
            return die("out of memory");
        t->cells = cells;
        t->cap = cap;
    }
    char **dst = t->cells + t->rows * (size_t)t->ncols;
    for (int i = 0; i < t->ncols; i++)
        if (!(dst[i] = strdup(row[i] ? row[i] : ""))) {
            while (i--)
                free(dst[i]);
            return die("out of memory");
        }
    t->rows++;
    return 0;
}

static void table_print(const table *t)
{
    size_t width[16] = {0};
    for (int c = 0; c < t->ncols && c < 16; c++) {
        width[c] = strlen(t->head[c]);
        for (size_t r = 0; r < t->rows; r++) {
            size_t n = strlen(t->cells[r * (size_t)t->ncols + c]);
            width[c] = n > width[c] ? n : width[c];
        }
    }
    for (size_t r = 0; r <= t->rows; r++) {
        const char *const *row = r ? (const char *const *)t->cells + (r - 1) * (size_t)t->ncols
                                   : t->head;
        int end = t->ncols; /* stop after the last non-empty cell: no trailing blanks */
        while (end > 1 && !row[end - 1][0])
            end--;
        for (int c = 0; c < end; c++) {
            bool last = c == end - 1;
            int w = (int)width[c];
            if (t->align[c] == 'r')
                printf("%*s", w, row[c]);
            else if (last)
                printf("%s", row[c]);
            else
                printf("%-*s", w, row[c]);
            if (last)
                break;
            printf("  ");
        }
        putchar('\n');
    }
}

static void table_free(table *t)
{
    for (size_t i = 0; i < t->rows * (size_t)t->ncols; i++)
        free(t->cells[i]);
    free(t->cells);
    t->cells = NULL;
    t->rows = t->cap = 0;
}

/* ---- records as JSON ------------------------------------------------------------------- */

static json_t *category_json(const tern_category *c)
{
    return json_pack("{s:s, s:s, s:o, s:i, s:b, s:I, s:o, s:o, s:o}", "id", c->id, "name",
                     c->name, "description", jtext(c->description), "class_index",
                     (int)c->class_index, "active", c->active, "sample_count",
                     (json_int_t)c->sample_count, "created_at", jtime(c->created_at),
                     "updated_at", jtime(c->updated_at), "created_by", jtext(c->created_by));
}

/* Everything but the API key hash, which has no business on a terminal. */
static json_t *client_json(const tern_client_record *c)
{
    return json_pack("{s:s, s:s, s:o, s:o, s:o, s:o, s:b, s:I, s:o, s:b, s:o, s:I, s:I, s:I, s:I, "
                     "s:o}",
                     "id", c->id, "name", c->name, "device_type", jtext(c->device_type),
                     "os_info", jtext(c->os_info), "registered_at", jtime(c->registered_at),
                     "last_seen", jtime(c->last_seen), "active", c->active, "total_samples",
                     (json_int_t)c->total_samples, "quality_score", jreal(c->quality_score),
                     "blacklisted", c->blacklisted, "blacklist_reason",
                     jtext(c->blacklist_reason), "rounds_selected",
                     (json_int_t)c->rounds_selected, "rounds_succeeded",
                     (json_int_t)c->rounds_succeeded, "rounds_failed",
                     (json_int_t)c->rounds_failed, "rounds_rejected",
                     (json_int_t)c->rounds_rejected, "last_update_norm",
                     jreal(c->last_update_norm));
}

static json_t *round_json(const tern_round *r)
{
    bool done = r->status == TERN_ROUND_COMPLETED;
    return json_pack("{s:I, s:s, s:i, s:i, s:o, s:o, s:o, s:o, s:o, s:o}", "number",
                     (json_int_t)r->number, "status", tern_round_status_name(r->status),
                     "clients_selected", (int)r->clients_selected, "clients_participated",
                     (int)r->clients_participated, "started_at", jtime(r->started_at),
                     "ended_at", jtime(r->ended_at), "global_accuracy",
                     done ? jreal(r->global_accuracy) : json_null(), "global_loss",
                     done ? jreal(r->global_loss) : json_null(), "model_version",
                     jtext(r->model_version), "reason", jtext(r->reason));
}

static json_t *version_json(const tern_model_version *v, bool current)
{
    return json_pack("{s:s, s:i, s:i, s:i, s:I, s:b, s:I, s:s, s:o, s:o, s:o, s:o, s:s, s:s, "
                     "s:b}",
                     "version", v->version, "major", (int)v->major, "minor", (int)v->minor,
                     "patch", (int)v->patch, "round", (json_int_t)v->round, "current", current,
                     "size", (json_int_t)v->size, "sha256", v->sha256, "accuracy",
                     jreal(v->accuracy), "created_at", jtime(v->created_at), "tag",
                     jtext(v->tag), "notes", jtext(v->notes), "settings_sha256",
                     v->settings_sha256, "classes_sha256", v->classes_sha256, "pruned",
                     v->pruned);
}

static json_t *audit_json(const tern_audit_entry *e)
{
    return json_pack("{s:I, s:o, s:s, s:s, s:s, s:s}", "seq", (json_int_t)e->seq, "at",
                     jtime(e->at), "actor", e->actor, "action", e->action, "target", e->target,
                     "detail", e->detail);
}

/* ---- store access ------------------------------------------------------------------------ */

static const char *store_dir(const cli *c)
{
    if (c->store)
        return c->store;
    const char *env = getenv("TERN_STORE");
    return env && *env ? env : DEFAULT_STORE;
}

/* Who changes are attributed to in the audit log. */
static const char *actor(void)
{
    const char *user = getenv("USER");
    return user && *user ? user : "cli";
}

/* dir as an absolute path for messages (no symlinks resolved: realpath is not POSIX.1-2008
 * base, which the build asks for). */
static const char *absolute(const char *dir, char out[PATH_MAX])
{
    char cwd[PATH_MAX];
    if (dir[0] == '/' || !getcwd(cwd, sizeof cwd))
        return dir;
    while (dir[0] == '.' && dir[1] == '/')
        dir += 2;
    if (strcmp(dir, ".") == 0)
        dir = "";
    if ((size_t)snprintf(out, PATH_MAX, "%s%s%s", cwd, *dir ? "/" : "", dir) >= PATH_MAX)
        return dir;
    return out;
}

static int data_path(char *out, size_t cap, const char *dir, const char *name)
{
    if ((size_t)snprintf(out, cap, "%s/%s", dir, name) >= cap)
        return die("path %s/%s is too long", dir, name);
    return 0;
}

/* Opens an existing store; a directory without data.mdb is refused rather than created. */
static int open_store(const char *dir, bool writable, tern_store **s)
{
    char path[PATH_MAX];
    struct stat sb;
    if (data_path(path, sizeof path, dir, "data.mdb"))
        return 1;
    if (stat(path, &sb) != 0)
        return die("no store at %s (run tern store init)", dir);
    tern_error err = {{0}};
    if (tern_store_open(dir, &(tern_store_options){.read_only = !writable}, s, &err) != TERN_OK)
        return die("%s", err.message);
    return 0;
}

/* Every round, ascending by number (the API lists by status). Release with free(). */
static int list_rounds(tern_store *s, tern_round **out, size_t *count)
{
    tern_round *all = NULL;
    size_t n = 0;
    for (int status = TERN_ROUND_PENDING; status <= TERN_ROUND_FAILED; status++) {
        tern_round *part = NULL;
        size_t k = 0;
        tern_error err = {{0}};
        if (tern_store_round_list_by_status(s, (tern_round_status)status, &part, &k, &err)) {
            free(all);
            return die("%s", err.message);
        }
        tern_round *grown = k ? realloc(all, (n + k) * sizeof *all) : all;
        if (k && !grown) {
            tern_store_free(s, part);
            free(all);
            return die("out of memory");
        }
        all = grown;
        if (k)
            memcpy(all + n, part, k * sizeof *all);
        n += k;
        tern_store_free(s, part);
    }
    /* Each status's list is ascending: an insertion sort of the merged runs is enough. */
    for (size_t i = 1; i < n; i++) {
        tern_round r = all[i];
        size_t j = i;
        for (; j > 0 && all[j - 1].number > r.number; j--)
            all[j] = all[j - 1];
        all[j] = r;
    }
    *out = all;
    *count = n;
    return 0;
}

/* Looks up a VERSION argument ("current" or major.minor.patch); when it is not there, the
 * message lists the versions that are. */
static int find_version(tern_store *s, const char *arg, tern_model_version *v)
{
    tern_error err = {{0}};
    bool current = strcmp(arg, "current") == 0;
    tern_status st = current ? tern_store_version_current(s, v, &err)
                             : tern_store_version_get(s, arg, v, &err);
    if (st == TERN_OK)
        return 0;
    if (st != TERN_ERR_NOT_FOUND && st != TERN_ERR_INVALID)
        return die("%s", err.message);
    if (current)
        return die("there is no current model version: the registry is empty");
    tern_model_version *all = NULL;
    size_t n = 0;
    if (tern_store_version_list(s, &all, &n, &err) != TERN_OK)
        return die("model version %s not found (%s)", arg, err.message);
    char list[1024] = "";
    size_t first = n > 20 ? n - 20 : 0, used = 0;
    if (first)
        used += (size_t)snprintf(list, sizeof list, "... %zu earlier, ", first);
    for (size_t i = first; i < n && used < sizeof list; i++)
        used += (size_t)snprintf(list + used, sizeof list - used, "%s%s", i > first ? ", " : "",
                                 all[i].version);
    tern_store_free(s, all);
    if (!n)
        return die("model version %s not found; the registry is empty", arg);
    return die("model version %s not found; versions: %s", arg, list);
}

static int find_category(tern_store *s, const char *name, tern_category *c)
{
    tern_error err = {{0}};
    if (tern_store_category_get_by_name(s, name, c, &err) != TERN_OK)
        return die("%s", err.message);
    return 0;
}

/* ---- subcommand tables ------------------------------------------------------------------- */

enum { OPEN_NONE, OPEN_READ, OPEN_WRITE };
enum { X_DESCRIPTION = 1, X_INDEX = 2, X_KEEP = 4, X_LIMIT = 8 };

typedef struct sub {
    const char *name;
    int (*run)(const cli *c, const char *dir, tern_store *s);
    int open;
    unsigned extra; /* X_* options this subcommand takes beyond --store, --json */
    int min_args, max_args;
    const char *args;    /* usage after the subcommand's name */
    const char *summary; /* one line in the command's help */
    const char *help;    /* the subcommand's own help */
} sub;

typedef struct group {
    const char *name;
    unsigned cmd;
    const sub *subs;
    size_t count;
    const char *about;
} group;

static const char COMMON_HELP[] =
    "Common options:\n"
    "  --store DIR     the store directory (default $TERN_STORE, else " DEFAULT_STORE ")\n"
    "  --json          print one JSON document instead of text\n"
    "  --help          this help\n";

static void group_usage(const group *g, FILE *f)
{
    fprintf(f, "usage: tern %s <subcommand> [arguments] [--store DIR] [--json]\n\n%s\n\n"
               "Subcommands:\n",
            g->name, g->about);
    for (size_t i = 0; i < g->count; i++) {
        char head[96];
        snprintf(head, sizeof head, "%s %s", g->subs[i].name, g->subs[i].args);
        fprintf(f, "  %-30s %s\n", head, g->subs[i].summary);
    }
    fprintf(f, "\n%s\nRun 'tern %s <subcommand> --help' for details.\n", COMMON_HELP, g->name);
}

static int run_group(const group *g, int argc, char **argv)
{
    if (argc < 2) {
        group_usage(g, stderr);
        return 1;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        group_usage(g, stdout);
        return 0;
    }
    const sub *sc = NULL;
    for (size_t i = 0; i < g->count && !sc; i++)
        if (strcmp(argv[1], g->subs[i].name) == 0)
            sc = &g->subs[i];
    if (!sc) {
        fprintf(stderr, "tern %s: unknown subcommand '%s'\n\n", g->name, argv[1]);
        group_usage(g, stderr);
        return 1;
    }
    static char prog[64];
    snprintf(prog, sizeof prog, "tern %s %s", g->name, sc->name);
    cli_prog = prog;

    cli c = {.index = -1, .keep = -1};
    int rc = cli_parse_any_order(argc - 1, argv + 1, g->cmd, true, &c);
    if (rc == 2) {
        printf("usage: %s %s [--store DIR] [--json]\n\n%s\n\n%s", prog, sc->args, sc->help,
               COMMON_HELP);
        return 0;
    }
    if (rc)
        return rc;
    static const struct {
        unsigned bit;
        const char *name;
    } EXTRA[] = {{X_DESCRIPTION, "description"}, {X_INDEX, "index"}, {X_KEEP, "keep"},
                 {X_LIMIT, "limit"}};
    bool given[] = {c.description != NULL, c.index >= 0, c.keep >= 0, c.limit > 0};
    for (size_t i = 0; i < sizeof given / sizeof *given; i++)
        if (given[i] && !(sc->extra & EXTRA[i].bit))
            return die("option --%s does not apply here (see --help)", EXTRA[i].name);
    if (c.nargs < sc->min_args || c.nargs > sc->max_args) {
        if (c.nargs > sc->max_args)
            return die("unexpected argument '%s' (usage: %s %s)", c.args[sc->max_args], prog,
                       sc->args);
        return die("missing argument (usage: %s %s)", prog, sc->args);
    }
    const char *dir = store_dir(&c);
    if (!*dir)
        return die("--store needs a directory");
    tern_store *s = NULL;
    if (sc->open != OPEN_NONE && (rc = open_store(dir, sc->open == OPEN_WRITE, &s)))
        return rc;
    rc = sc->run(&c, dir, s);
    tern_store_close(&s);
    if (fflush(stdout) != 0 || ferror(stdout))
        rc = die("cannot write the output: %s", strerror(errno));
    return rc;
}

/* ---- tern store ----------------------------------------------------------------------------- */

static int store_init(const cli *c, const char *dir, tern_store *unused)
{
    char path[PATH_MAX], abs[PATH_MAX];
    struct stat sb;
    if (data_path(path, sizeof path, dir, "data.mdb"))
        return 1;
    bool existed = stat(path, &sb) == 0;
    tern_store *s = NULL;
    tern_error err = {{0}};
    if (tern_store_open(dir, NULL, &s, &err) != TERN_OK)
        return die("%s", err.message);
    tern_store_close(&s);
    const char *where = absolute(dir, abs);
    if (c->json)
        return emit(json_pack("{s:s, s:b}", "path", where, "created", !existed));
    if (existed)
        printf("a store already exists at %s; left as it is\n", where);
    else
        printf("created a store at %s\n", where);
    return 0;
}

static int store_ls(const cli *c, const char *dir, tern_store *s)
{
    tern_error err = {{0}};
    tern_category *cats = NULL;
    tern_client_record *clients = NULL;
    tern_model_version *versions = NULL;
    tern_round *rounds = NULL;
    size_t ncat = 0, ncli = 0, nver = 0, nround = 0;
    int rc = 0;
    if (tern_store_category_list(s, &cats, &ncat, &err) ||
        tern_store_client_list(s, &clients, &ncli, &err) ||
        tern_store_version_list(s, &versions, &nver, &err)) {
        rc = die("%s", err.message);
        goto done;
    }
    if ((rc = list_rounds(s, &rounds, &nround)))
        goto done;
    /* No image count in the API: every image belongs to exactly one category, whose
     * sample_count image_add keeps. */
    int64_t images = 0;
    size_t cat_active = 0, cli_active = 0, cli_black = 0, pruned = 0, tagged = 0;
    for (size_t i = 0; i < ncat; i++) {
        images += cats[i].sample_count;
        cat_active += cats[i].active;
    }
    for (size_t i = 0; i < ncli; i++) {
        cli_active += clients[i].active;
        cli_black += clients[i].blacklisted;
    }
    for (size_t i = 0; i < nver; i++) {
        pruned += versions[i].pruned;
        tagged += versions[i].tag[0] != '\0';
    }
    size_t by_status[TERN_ROUND_FAILED + 1] = {0};
    for (size_t i = 0; i < nround; i++)
        if (rounds[i].status >= TERN_ROUND_PENDING && rounds[i].status <= TERN_ROUND_FAILED)
            by_status[rounds[i].status]++;
    tern_model_version cur;
    tern_status st = tern_store_version_current(s, &cur, &err);
    if (st != TERN_OK && st != TERN_ERR_NOT_FOUND) {
        rc = die("%s", err.message);
        goto done;
    }
    bool has_cur = st == TERN_OK;
    char path[PATH_MAX], abs[PATH_MAX];
    struct stat sb;
    uint64_t file_bytes = 0, disk_bytes = 0;
    const char *files[] = {"data.mdb", "lock.mdb"};
    for (int i = 0; i < 2; i++)
        if (data_path(path, sizeof path, dir, files[i]) == 0 && stat(path, &sb) == 0) {
            if (i == 0)
                file_bytes = (uint64_t)sb.st_size;
            disk_bytes += (uint64_t)sb.st_blocks * 512;
        }
    const char *where = absolute(dir, abs);
    size_t map = tern_store_map_size(s);

    if (c->json) {
        json_t *rj = json_pack("{s:I}", "total", (json_int_t)nround);
        for (int k = TERN_ROUND_PENDING; rj && k <= TERN_ROUND_FAILED; k++)
            if (json_object_set_new(rj, tern_round_status_name((tern_round_status)k),
                                    json_integer((json_int_t)by_status[k])))
                json_decref(rj), rj = NULL;
        rc = emit(json_pack(
            "{s:s, s:{s:I, s:I}, s:{s:I, s:I, s:I}, s:I, s:o, s:{s:I, s:I, s:I}, s:o, s:I, "
            "s:I, s:I}",
            "path", where, "categories", "total", (json_int_t)ncat, "active",
            (json_int_t)cat_active, "clients", "total", (json_int_t)ncli, "active",
            (json_int_t)cli_active, "blacklisted", (json_int_t)cli_black, "images",
            (json_int_t)images, "rounds", rj, "versions", "total", (json_int_t)nver, "pruned",
            (json_int_t)pruned, "tagged", (json_int_t)tagged, "current_version",
            has_cur ? json_string(cur.version) : json_null(), "map_size", (json_int_t)map,
            "data_file_bytes", (json_int_t)file_bytes, "disk_bytes", (json_int_t)disk_bytes));
        goto done;
    }
    char b1[32], b2[32], b3[32];
    printf("%-12s %s\n", "store", where);
    printf("%-12s %zu (%zu active)\n", "categories", ncat, cat_active);
    printf("%-12s %zu (%zu active, %zu blacklisted)\n", "clients", ncli, cli_active, cli_black);
    printf("%-12s %lld\n", "images", (long long)images);
    printf("%-12s %zu", "rounds", nround);
    for (int k = TERN_ROUND_PENDING; k <= TERN_ROUND_FAILED; k++)
        printf("%s%s %zu", k == TERN_ROUND_PENDING ? " (" : ", ",
               tern_round_status_name((tern_round_status)k), by_status[k]);
    printf(")\n");
    printf("%-12s %zu (%zu pruned, %zu tagged)\n", "versions", nver, pruned, tagged);
    if (has_cur)
        printf("%-12s %s (round %lld)\n", "current", cur.version, (long long)cur.round);
    else
        printf("%-12s none\n", "current");
    printf("%-12s %s\n", "map size", human_bytes(b1, map));
    printf("%-12s %s (data.mdb %s)\n", "disk use", human_bytes(b2, disk_bytes),
           human_bytes(b3, file_bytes));
done:
    tern_store_free(s, cats);
    tern_store_free(s, clients);
    tern_store_free(s, versions);
    free(rounds);
    return rc;
}

static int show_clients(tern_store *s, json_t *out, bool heading)
{
    tern_client_record *cl = NULL;
    size_t n = 0;
    tern_error err = {{0}};
    if (tern_store_client_list(s, &cl, &n, &err))
        return die("%s", err.message);
    int rc = 0;
    if (out) {
        json_t *arr = json_array();
        for (size_t i = 0; i < n && rc == 0; i++)
            rc = jpush(arr, client_json(&cl[i]));
        if (rc || json_object_set_new(out, "clients", arr))
            rc = die("out of memory building the JSON output");
        tern_store_free(s, cl);
        return rc;
    }
    if (heading)
        printf("Clients (%zu)\n", n);
    /* ROUNDS: selected; OK, FAILED, REJECTED: how those rounds ended; NORM: the last accepted
     * update's L2 norm. */
    static const char *const head[] = {"NAME",   "DEVICE", "OS",       "REGISTERED", "LAST SEEN",
                                       "SAMPLES", "QUALITY", "ROUNDS", "OK",       "FAILED",
                                       "REJECTED", "NORM",  "STATUS", "ID"};
    table t = {.ncols = 14, .head = head, .align = "lllllrrrrrrrll"};
    for (size_t i = 0; i < n && rc == 0; i++) {
        const tern_client_record *r = &cl[i];
        char reg[32], seen[32], samples[24], quality[24], status[TERN_STORE_TEXT_SIZE + 16];
        char sel[24], ok[24], failed[24], rejected[24], norm[32] = "-";
        snprintf(samples, sizeof samples, "%lld", (long long)r->total_samples);
        snprintf(quality, sizeof quality, "%.3f", r->quality_score);
        snprintf(sel, sizeof sel, "%lld", (long long)r->rounds_selected);
        snprintf(ok, sizeof ok, "%lld", (long long)r->rounds_succeeded);
        snprintf(failed, sizeof failed, "%lld", (long long)r->rounds_failed);
        snprintf(rejected, sizeof rejected, "%lld", (long long)r->rounds_rejected);
        if (r->rounds_succeeded)
            snprintf(norm, sizeof norm, "%.4g", r->last_update_norm);
        if (r->blacklisted)
            snprintf(status, sizeof status, "blacklisted: %s", r->blacklist_reason);
        else
            snprintf(status, sizeof status, "%s", r->active ? "active" : "inactive");
        const char *row[] = {r->name, r->device_type[0] ? r->device_type : "-",
                             r->os_info[0] ? r->os_info : "-", iso_time(reg, r->registered_at),
                             iso_time(seen, r->last_seen), samples, quality, sel, ok, failed,
                             rejected, norm, status, r->id};
        rc = table_add(&t, row);
    }
    if (rc == 0 && n)
        table_print(&t);
    else if (rc == 0)
        printf("(no clients)\n");
    table_free(&t);
    tern_store_free(s, cl);
    return rc;
}

static int show_rounds(tern_store *s, json_t *out, bool heading)
{
    tern_round *r = NULL;
    size_t n = 0;
    int rc = list_rounds(s, &r, &n);
    if (rc)
        return rc;
    if (out) {
        json_t *arr = json_array();
        for (size_t i = 0; i < n && rc == 0; i++)
            rc = jpush(arr, round_json(&r[i]));
        if (rc || json_object_set_new(out, "rounds", arr))
            rc = die("out of memory building the JSON output");
        free(r);
        return rc;
    }
    if (heading)
        printf("Rounds (%zu)\n", n);
    static const char *const head[] = {"ROUND",    "STATUS", "SELECTED", "PARTICIPATED", "STARTED",
                                       "ENDED",    "ACCURACY", "LOSS",   "VERSION",      "REASON"};
    table t = {.ncols = 10, .head = head, .align = "rlrrllrrll"};
    for (size_t i = 0; i < n && rc == 0; i++) {
        bool done = r[i].status == TERN_ROUND_COMPLETED;
        char num[24], sel[16], part[16], start[32], end[32], acc[32] = "-", loss[32] = "-";
        snprintf(num, sizeof num, "%lld", (long long)r[i].number);
        snprintf(sel, sizeof sel, "%d", (int)r[i].clients_selected);
        snprintf(part, sizeof part, "%d", (int)r[i].clients_participated);
        if (done) {
            snprintf(acc, sizeof acc, "%.4f", r[i].global_accuracy);
            snprintf(loss, sizeof loss, "%.4f", r[i].global_loss);
        }
        const char *row[] = {num,  tern_round_status_name(r[i].status),
                             sel,  part,
                             iso_time(start, r[i].started_at), iso_time(end, r[i].ended_at),
                             acc,  loss,
                             r[i].model_version[0] ? r[i].model_version : "-",
                             r[i].reason};
        rc = table_add(&t, row);
    }
    if (rc == 0 && n)
        table_print(&t);
    else if (rc == 0)
        printf("(no rounds)\n");
    table_free(&t);
    free(r);
    return rc;
}

static int show_audit(tern_store *s, json_t *out, bool heading, long long limit)
{
    tern_audit_entry *e = NULL;
    size_t n = 0;
    tern_error err = {{0}};
    if (tern_store_audit_list(s, 0, 0, &e, &n, &err))
        return die("%s", err.message);
    size_t first = limit > 0 && (unsigned long long)limit < n ? n - (size_t)limit : 0;
    int rc = 0;
    if (out) {
        json_t *arr = json_array();
        for (size_t i = first; i < n && rc == 0; i++)
            rc = jpush(arr, audit_json(&e[i]));
        if (rc || json_object_set_new(out, "audit", arr))
            rc = die("out of memory building the JSON output");
        tern_store_free(s, e);
        return rc;
    }
    if (heading)
        printf("Audit log (%zu entries%s)\n", n, first ? ", latest shown" : "");
    static const char *const head[] = {"SEQ", "AT", "ACTOR", "ACTION", "TARGET", "DETAIL"};
    table t = {.ncols = 6, .head = head, .align = "rlllll"};
    for (size_t i = first; i < n && rc == 0; i++) {
        char seq[24], at[32];
        snprintf(seq, sizeof seq, "%lld", (long long)e[i].seq);
        const char *row[] = {seq, iso_time(at, e[i].at), e[i].actor, e[i].action,
                             e[i].target[0] ? e[i].target : "-", e[i].detail};
        rc = table_add(&t, row);
    }
    if (rc == 0 && n)
        table_print(&t);
    else if (rc == 0)
        printf("(empty)\n");
    table_free(&t);
    tern_store_free(s, e);
    return rc;
}

static int store_show(const cli *c, const char *dir, tern_store *s)
{
    bool want[3] = {c->nargs == 0, c->nargs == 0, c->nargs == 0};
    static const char *const names[] = {"clients", "rounds", "audit"};
    for (int i = 0; i < c->nargs; i++) {
        int k = 0;
        while (k < 3 && strcmp(c->args[i], names[k]) != 0)
            k++;
        if (k == 3)
            return die("unknown section '%s' (clients, rounds or audit)", c->args[i]);
        want[k] = true;
    }
    if (c->limit > 0 && !want[2])
        return die("--limit applies to the audit log (tern store show audit --limit N)");
    json_t *root = c->json ? json_object() : NULL;
    if (c->json && !root)
        return die("out of memory");
    bool heading = (want[0] + want[1] + want[2]) > 1, first = true;
    int rc = 0;
    for (int k = 0; k < 3 && rc == 0; k++) {
        if (!want[k])
            continue;
        if (!c->json && heading && !first)
            putchar('\n');
        first = false;
        rc = k == 0   ? show_clients(s, root, heading)
             : k == 1 ? show_rounds(s, root, heading)
                      : show_audit(s, root, heading, c->limit);
    }
    if (c->json) {
        if (rc) {
            json_decref(root);
            return rc;
        }
        return emit(root);
    }
    return rc;
}

typedef struct {
    json_t *list; /* NULL for text output */
    bool failed;
} check_ctx;

static void on_problem(void *user, const char *message)
{
    check_ctx *ck = user;
    if (ck->list)
        ck->failed |= jpush(ck->list, jstring_safe(message)) != 0;
    else
        printf("problem: %s\n", message);
}

static int store_check(const cli *c, const char *dir, tern_store *s)
{
    check_ctx ck = {.list = c->json ? json_array() : NULL};
    if (c->json && !ck.list)
        return die("out of memory");
    size_t problems = 0;
    tern_error err = {{0}};
    if (tern_store_check(s, on_problem, &ck, &problems, &err) != TERN_OK) {
        json_decref(ck.list);
        return die("%s", err.message);
    }
    if (c->json) {
        if (ck.failed) {
            json_decref(ck.list);
            return die("out of memory building the JSON output");
        }
        int rc = emit(json_pack("{s:s, s:b, s:I, s:o}", "path", dir, "ok", problems == 0,
                                "problem_count", (json_int_t)problems, "problems", ck.list));
        if (rc)
            return rc;
    } else if (problems == 0) {
        printf("%s: no problems found\n", dir);
    }
    if (problems)
        return die("%zu problem%s found in %s", problems, problems == 1 ? "" : "s", dir);
    return 0;
}

static int store_backup(const cli *c, const char *dir, tern_store *s)
{
    const char *dest = c->args[0];
    tern_error err = {{0}};
    if (tern_store_backup(s, dest, &err) != TERN_OK)
        return die("%s", err.message);
    char path[PATH_MAX], b[32];
    struct stat sb;
    uint64_t bytes = data_path(path, sizeof path, dest, "data.mdb") == 0 && stat(path, &sb) == 0
                         ? (uint64_t)sb.st_size
                         : 0;
    if (c->json)
        return emit(json_pack("{s:s, s:s, s:I}", "store", dir, "backup", dest, "bytes",
                              (json_int_t)bytes));
    printf("backed up %s to %s (%s)\n", dir, dest, human_bytes(b, bytes));
    return 0;
}

static int store_restore(const cli *c, const char *dir, tern_store *unused)
{
    const char *src = c->args[0];
    tern_error err = {{0}};
    if (tern_store_restore(src, dir, &err) != TERN_OK)
        return die("%s", err.message);
    if (c->json)
        return emit(json_pack("{s:s, s:s}", "store", dir, "source", src));
    printf("restored %s into %s\n", src, dir);
    return 0;
}

static const sub STORE_SUBS[] = {
    {"init", store_init, OPEN_NONE, 0, 0, 0, "", "create the store (or leave an existing one)",
     "Creates the store directory and its LMDB environment (data.mdb, lock.mdb) and prints\n"
     "where it is. An existing store is left as it is."},
    {"ls", store_ls, OPEN_READ, 0, 0, 0, "", "counts, current version, map size and disk use",
     "Counts categories, clients, images, rounds by status and model versions; names the\n"
     "current version; prints the LMDB map size and the disk space the store uses."},
    {"show", store_show, OPEN_READ, X_LIMIT, 0, 3, "[clients|rounds|audit] [--limit N]",
     "registered clients, training rounds, audit log",
     "Lists the registered clients (never their key hashes) with their federated statistics\n"
     "(rounds selected, and how many of those succeeded, failed or had the update rejected;\n"
     "the norm of the last accepted update), the training rounds with status, accuracy, model\n"
     "version and, for failed rounds, the reason, and the audit log, oldest first. Name\n"
     "sections to show only those (all three by default).\n\n"
     "  --limit N       only the latest N audit entries"},
    {"check", store_check, OPEN_READ, 0, 0, 0, "", "check every record and blob; exit 1 on problems",
     "Walks every record, index and blob in one snapshot: records decode, indexes agree with\n"
     "records, references resolve and every blob's SHA-256 matches. Prints each problem and\n"
     "exits with 1 when there is any."},
    {"backup", store_backup, OPEN_READ, 0, 1, 1, "DEST", "hot backup into directory DEST",
     "Writes a compacted copy of the store into DEST (created if missing; must not already hold\n"
     "a store). Runs in one read snapshot, so a running server keeps writing meanwhile."},
    {"restore", store_restore, OPEN_NONE, 0, 1, 1, "SRC", "replace the store with the backup in SRC",
     "Checks the backup in SRC and refuses it when the check finds problems, then swaps it in\n"
     "for --store's data atomically (creating the store when there is none). Refused while any\n"
     "process (a server, say) has the destination store open: stop it first."},
};

int tern_cmd_store(int argc, char **argv)
{
    static const group g = {"store", CMD_STORE, STORE_SUBS, sizeof STORE_SUBS / sizeof *STORE_SUBS,
                            "The server's store: one LMDB directory holding categories, clients,\n"
                            "images, training rounds, model versions and an audit log."};
    return run_group(&g, argc, argv);
}

/* ---- tern category ------------------------------------------------------------------------- */

static int category_add(const cli *c, const char *dir, tern_store *s)
{
    tern_category in = {.active = true}, out;
    tern_error err = {{0}};
    const char *name = c->args[0];
    if (strlen(name) >= sizeof in.name)
        return die("category name is longer than %zu bytes", sizeof in.name - 1);
    if (c->description && strlen(c->description) >= sizeof in.description)
        return die("--description is longer than %zu bytes", sizeof in.description - 1);
    snprintf(in.name, sizeof in.name, "%s", name);
    snprintf(in.description, sizeof in.description, "%s", c->description ? c->description : "");
    snprintf(in.created_by, sizeof in.created_by, "%s", actor());
    if (c->index >= 0) {
        in.class_index = c->index;
    } else {
        /* One past the highest: a removed category's index is never handed out silently, as
         * models trained earlier still answer with it. */
        tern_category *all = NULL;
        size_t n = 0;
        if (tern_store_category_list(s, &all, &n, &err))
            return die("%s", err.message);
        int32_t next = 0;
        for (size_t i = 0; i < n; i++)
            if (all[i].class_index >= next)
                next = all[i].class_index + 1;
        tern_store_free(s, all);
        if (next < 0)
            return die("no class index left");
        in.class_index = next;
    }
    if (tern_store_category_add(s, &in, &out, &err) != TERN_OK)
        return die("%s", err.message);
    if (c->json)
        return emit(category_json(&out));
    printf("added category '%s' with class index %d (id %s)\n", out.name, (int)out.class_index,
           out.id);
    return 0;
}

static int category_list(const cli *c, const char *dir, tern_store *s)
{
    tern_category *all = NULL;
    size_t n = 0;
    tern_error err = {{0}};
    if (tern_store_category_list(s, &all, &n, &err))
        return die("%s", err.message);
    int rc = 0;
    if (c->json) {
        json_t *arr = json_array();
        for (size_t i = 0; i < n && rc == 0; i++)
            rc = jpush(arr, category_json(&all[i]));
        tern_store_free(s, all);
        if (rc) {
            json_decref(arr);
            return die("out of memory building the JSON output");
        }
        return emit(json_pack("{s:o}", "categories", arr));
    }
    static const char *const head[] = {"INDEX", "NAME",       "ACTIVE",     "SAMPLES",
                                       "CREATED", "CREATED BY", "DESCRIPTION"};
    table t = {.ncols = 7, .head = head, .align = "rllrlll"};
    for (size_t i = 0; i < n && rc == 0; i++) {
        char idx[16], samples[24], created[32];
        snprintf(idx, sizeof idx, "%d", (int)all[i].class_index);
        snprintf(samples, sizeof samples, "%lld", (long long)all[i].sample_count);
        const char *row[] = {idx,
                             all[i].name,
                             all[i].active ? "yes" : "no",
                             samples,
                             iso_time(created, all[i].created_at),
                             all[i].created_by[0] ? all[i].created_by : "-",
                             all[i].description};
        rc = table_add(&t, row);
    }
    if (rc == 0 && n)
        table_print(&t);
    else if (rc == 0)
        printf("no categories (add one with tern category add NAME)\n");
    table_free(&t);
    tern_store_free(s, all);
    return rc;
}

static int category_rename(const cli *c, const char *dir, tern_store *s)
{
    tern_category cat;
    tern_error err = {{0}};
    int rc = find_category(s, c->args[0], &cat);
    if (rc)
        return rc;
    if (tern_store_category_rename(s, cat.id, c->args[1], actor(), &err) != TERN_OK ||
        tern_store_category_get(s, cat.id, &cat, &err) != TERN_OK)
        return die("%s", err.message);
    if (c->json)
        return emit(category_json(&cat));
    printf("renamed category '%s' to '%s' (class index %d)\n", c->args[0], cat.name,
           (int)cat.class_index);
    return 0;
}

static int category_rm(const cli *c, const char *dir, tern_store *s)
{
    tern_category cat;
    tern_error err = {{0}};
    int rc = find_category(s, c->args[0], &cat);
    if (rc)
        return rc;
    if (tern_store_category_remove(s, cat.id, actor(), &err) != TERN_OK)
        return die("%s", err.message);
    if (c->json)
        return emit(json_pack("{s:o}", "removed", category_json(&cat)));
    printf("removed category '%s' (class index %d)\n", cat.name, (int)cat.class_index);
    return 0;
}

static int category_set_active(const cli *c, tern_store *s, bool active)
{
    tern_category cat;
    tern_error err = {{0}};
    int rc = find_category(s, c->args[0], &cat);
    if (rc)
        return rc;
    if (tern_store_category_set_active(s, cat.id, active, actor(), &err) != TERN_OK ||
        tern_store_category_get(s, cat.id, &cat, &err) != TERN_OK)
        return die("%s", err.message);
    if (c->json)
        return emit(category_json(&cat));
    printf("category '%s' is %s\n", cat.name, active ? "active" : "inactive");
    return 0;
}

static int category_activate(const cli *c, const char *dir, tern_store *s)
{
    return category_set_active(c, s, true);
}

static int category_deactivate(const cli *c, const char *dir, tern_store *s)
{
    return category_set_active(c, s, false);
}

static const sub CATEGORY_SUBS[] = {
    {"add", category_add, OPEN_WRITE, X_DESCRIPTION | X_INDEX, 1, 1,
     "NAME [--description TEXT] [--index K]", "add a category (the next class index by default)",
     "Adds an object category. Names and class indexes are unique; a duplicate is refused.\n\n"
     "  --description TEXT   what the category holds\n"
     "  --index K            its class index, the model's output (default: one past the highest\n"
     "                       in use, so a removed category's index is not reused)"},
    {"list", category_list, OPEN_READ, 0, 0, 0, "", "categories in class-index order",
     "Lists the categories in class-index order with their image counts."},
    {"rename", category_rename, OPEN_WRITE, 0, 2, 2, "OLD NEW", "rename a category",
     "Renames a category; its id and class index stay. NEW must not be taken."},
    {"rm", category_rm, OPEN_WRITE, 0, 1, 1, "NAME", "remove a category no image refers to",
     "Removes a category. Refused while stored images refer to it: deactivate it instead."},
    {"activate", category_activate, OPEN_WRITE, 0, 1, 1, "NAME", "mark a category active",
     "Marks a category active again."},
    {"deactivate", category_deactivate, OPEN_WRITE, 0, 1, 1, "NAME",
     "mark a category inactive (keeps its images)",
     "Marks a category inactive, keeping its record, index and images."},
};

int tern_cmd_category(int argc, char **argv)
{
    static const group g = {"category", CMD_CATEGORY, CATEGORY_SUBS,
                            sizeof CATEGORY_SUBS / sizeof *CATEGORY_SUBS,
                            "Object categories: the classes the federated model learns, each with\n"
                            "a unique name and class index. Changes are recorded in the audit log."};
    return run_group(&g, argc, argv);
}

/* ---- tern model ---------------------------------------------------------------------------- */

/* The current version's name into cur ("" when the registry is empty). */
static int current_name(tern_store *s, char cur[TERN_STORE_VERSION_SIZE])
{
    tern_model_version v;
    tern_error err = {{0}};
    tern_status st = tern_store_version_current(s, &v, &err);
    cur[0] = '\0';
    if (st == TERN_OK)
        snprintf(cur, TERN_STORE_VERSION_SIZE, "%s", v.version);
    else if (st != TERN_ERR_NOT_FOUND)
        return die("%s", err.message);
    return 0;
}

static int model_list(const cli *c, const char *dir, tern_store *s)
{
    char cur[TERN_STORE_VERSION_SIZE];
    int rc = current_name(s, cur);
    if (rc)
        return rc;
    tern_model_version *v = NULL;
    size_t n = 0;
    tern_error err = {{0}};
    if (tern_store_version_list(s, &v, &n, &err))
        return die("%s", err.message);
    if (c->json) {
        json_t *arr = json_array();
        for (size_t i = 0; i < n && rc == 0; i++)
            rc = jpush(arr, version_json(&v[i], strcmp(v[i].version, cur) == 0));
        tern_store_free(s, v);
        if (rc) {
            json_decref(arr);
            return die("out of memory building the JSON output");
        }
        return emit(json_pack("{s:o, s:o}", "current", jtext(cur), "versions", arr));
    }
    static const char *const head[] = {"", "VERSION", "ROUND", "SIZE", "ACCURACY",
                                       "CREATED", "TAG", "BLOB"};
    table t = {.ncols = 8, .head = head, .align = "llrrrlll"};
    for (size_t i = 0; i < n && rc == 0; i++) {
        char round[24], size[32], acc[32], created[32];
        snprintf(round, sizeof round, "%lld", (long long)v[i].round);
        snprintf(acc, sizeof acc, "%.4f", v[i].accuracy);
        const char *row[] = {strcmp(v[i].version, cur) == 0 ? "*" : "",
                             v[i].version,
                             round,
                             human_bytes(size, v[i].size),
                             acc,
                             iso_time(created, v[i].created_at),
                             v[i].tag[0] ? v[i].tag : "-",
                             v[i].pruned ? "pruned" : "stored"};
        rc = table_add(&t, row);
    }
    if (rc == 0 && n) {
        table_print(&t);
        printf("\n* current version: %s\n", cur[0] ? cur : "none");
    } else if (rc == 0) {
        printf("no model versions yet\n");
    }
    table_free(&t);
    tern_store_free(s, v);
    return rc;
}

static int model_show(const cli *c, const char *dir, tern_store *s)
{
    tern_model_version v;
    char cur[TERN_STORE_VERSION_SIZE];
    int rc = find_version(s, c->args[0], &v);
    if (rc || (rc = current_name(s, cur)))
        return rc;
    bool is_cur = strcmp(cur, v.version) == 0;
    tern_round r;
    tern_error err = {{0}};
    tern_status st = tern_store_round_get(s, v.round, &r, &err);
    if (st != TERN_OK && st != TERN_ERR_NOT_FOUND)
        return die("%s", err.message);
    bool has_round = st == TERN_OK;
    if (c->json) {
        json_t *j = version_json(&v, is_cur);
        if (j && json_object_set_new(j, "training_round", has_round ? round_json(&r) : json_null()))
            json_decref(j), j = NULL;
        return emit(j);
    }
    char b[32], created[32];
    printf("%-16s %s%s\n", "version", v.version, is_cur ? " (current)" : "");
    if (has_round)
        printf("%-16s %lld (%s, %d of %d clients, loss %.4f)\n", "round", (long long)v.round,
               tern_round_status_name(r.status), (int)r.clients_participated,
               (int)r.clients_selected, r.global_loss);
    else
        printf("%-16s %lld\n", "round", (long long)v.round);
    printf("%-16s %s\n", "created", iso_time(created, v.created_at));
    printf("%-16s %.4f\n", "accuracy", v.accuracy);
    printf("%-16s %llu bytes (%s)\n", "size", (unsigned long long)v.size, human_bytes(b, v.size));
    printf("%-16s %s\n", "sha256", v.sha256);
    printf("%-16s %s\n", "blob", v.pruned ? "pruned by retention" : "stored");
    printf("%-16s %s\n", "tag", v.tag[0] ? v.tag : "-");
    printf("%-16s %s\n", "settings sha256", v.settings_sha256);
    printf("%-16s %s\n", "classes sha256", v.classes_sha256);
    printf("%-16s %s\n", "notes", v.notes[0] ? v.notes : "-");
    return 0;
}

static int model_rollback(const cli *c, const char *dir, tern_store *s)
{
    tern_model_version v;
    char before[TERN_STORE_VERSION_SIZE];
    int rc = find_version(s, c->args[0], &v);
    if (rc || (rc = current_name(s, before)))
        return rc;
    tern_error err = {{0}};
    if (tern_store_version_rollback(s, v.version, actor(), &err) != TERN_OK)
        return die("%s", err.message);
    if (c->json)
        return emit(json_pack("{s:o, s:s}", "previous", jtext(before), "current", v.version));
    if (strcmp(before, v.version) == 0)
        printf("%s is already the current version\n", v.version);
    else
        printf("current model version: %s -> %s\n", before[0] ? before : "none", v.version);
    return 0;
}

/* Writes len bytes to path through a temporary file beside it and a rename, so that path
 * holds either what it held before or all of the new bytes. */
static int write_atomic(const char *path, const void *data, size_t len)
{
    char tmp[PATH_MAX];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp-XXXXXX", path) >= sizeof tmp)
        return die("path %s is too long", path);
    int fd = mkstemp(tmp);
    if (fd < 0)
        return die("cannot create a temporary file next to %s: %s", path, strerror(errno));
    /* mkstemp creates 0600; keep the mode of a file being replaced, else the usual 0644. */
    struct stat sb;
    mode_t mode = stat(path, &sb) == 0 ? (sb.st_mode & 07777) : 0644;
    const char *failed = fchmod(fd, mode) != 0 ? "set the mode of" : NULL;
    const char *p = data;
    for (size_t left = len; !failed && left > 0;) {
        ssize_t w = write(fd, p, left);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            failed = "write";
        else
            p += w, left -= (size_t)w;
    }
    if (!failed && fsync(fd) != 0)
        failed = "fsync";
    if (close(fd) != 0 && !failed)
        failed = "close";
    if (!failed && rename(tmp, path) != 0)
        failed = "rename";
    if (failed) {
        int rc = strcmp(failed, "rename") == 0
                     ? die("cannot move %s into place as %s: %s", tmp, path, strerror(errno))
                     : die("cannot %s %s: %s", failed, tmp, strerror(errno));
        unlink(tmp);
        return rc;
    }
    /* Make the rename itself durable. */
    char parent[PATH_MAX];
    snprintf(parent, sizeof parent, "%s", path);
    char *slash = strrchr(parent, '/');
    if (!slash)
        strcpy(parent, ".");
    else if (slash == parent)
        parent[1] = '\0';
    else
        *slash = '\0';
    int dfd = open(parent, O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    return 0;
}

static int model_export(const cli *c, const char *dir, tern_store *s)
{
    tern_model_version v;
    int rc = find_version(s, c->args[0], &v);
    if (rc)
        return rc;
    void *bytes = NULL;
    size_t len = 0;
    tern_error err = {{0}};
    /* Load checks the size and SHA-256 against the version record. */
    if (tern_store_version_load(s, v.version, &bytes, &len, &v, &err) != TERN_OK)
        return die("cannot export: %s", err.message);
    rc = write_atomic(c->args[1], bytes, len);
    tern_store_free(s, bytes);
    if (rc)
        return rc;
    if (c->json)
        return emit(json_pack("{s:s, s:s, s:I, s:s}", "version", v.version, "path", c->args[1],
                              "size", (json_int_t)len, "sha256", v.sha256));
    printf("exported model version %s (%zu bytes, sha256 %s) to %s\n", v.version, len, v.sha256,
           c->args[1]);
    return 0;
}

static int model_tag(const cli *c, const char *dir, tern_store *s)
{
    tern_model_version v;
    int rc = find_version(s, c->args[0], &v);
    if (rc)
        return rc;
    const char *tag = c->args[1];
    tern_error err = {{0}};
    if (tern_store_version_tag(s, v.version, tag, actor(), &err) != TERN_OK ||
        tern_store_version_get(s, v.version, &v, &err) != TERN_OK)
        return die("%s", err.message);
    char cur[TERN_STORE_VERSION_SIZE];
    if ((rc = current_name(s, cur)))
        return rc;
    if (c->json)
        return emit(version_json(&v, strcmp(cur, v.version) == 0));
    if (tag[0])
        printf("tagged model version %s '%s' (retention keeps it)\n", v.version, tag);
    else
        printf("cleared the tag of model version %s\n", v.version);
    return 0;
}

static int model_prune(const cli *c, const char *dir, tern_store *s)
{
    if (c->keep < 0)
        return die("--keep N is required (the number of latest versions whose files to keep)");
    tern_model_version *before = NULL, *after = NULL;
    size_t nb = 0, na = 0, pruned = 0;
    tern_error err = {{0}};
    int rc = 0;
    if (tern_store_version_list(s, &before, &nb, &err) ||
        tern_store_version_prune(s, (size_t)c->keep, actor(), &pruned, &err) ||
        tern_store_version_list(s, &after, &na, &err)) {
        rc = die("%s", err.message);
        goto done;
    }
    /* The versions whose blobs this call removed (as far as a concurrent writer allows). */
    json_t *names = c->json ? json_array() : NULL;
    size_t shown = 0;
    if (!c->json)
        printf("pruned %zu model version%s (kept the %lld latest, the current and tagged ones)",
               pruned, pruned == 1 ? "" : "s", c->keep);
    for (size_t i = 0, j = 0; i < na && rc == 0; i++) {
        while (j < nb && strcmp(before[j].version, after[i].version) != 0)
            j++;
        if (j == nb || before[j].pruned || !after[i].pruned)
            continue;
        if (names)
            rc = jpush(names, json_string(after[i].version));
        else
            printf("%s%s", shown++ ? " " : ": ", after[i].version);
    }
    if (c->json)
        rc = rc ? (json_decref(names), die("out of memory building the JSON output"))
                : emit(json_pack("{s:I, s:o}", "pruned", (json_int_t)pruned, "versions", names));
    else
        putchar('\n');
done:
    tern_store_free(s, before);
    tern_store_free(s, after);
    return rc;
}

static const sub MODEL_SUBS[] = {
    {"list", model_list, OPEN_READ, 0, 0, 0, "", "versions, with the current one marked",
     "Lists the model versions in semantic-version order: round, size, accuracy, creation\n"
     "time, tag, and whether retention pruned the model file. '*' marks the current version."},
    {"show", model_show, OPEN_READ, 0, 1, 1, "VERSION|current", "one version in full",
     "Shows one model version (or the current one): its round, digests, tag and notes."},
    {"rollback", model_rollback, OPEN_WRITE, 0, 1, 1, "VERSION",
     "make an earlier version current (audited)",
     "Makes VERSION the current model version. Its model file must still be stored. The change\n"
     "is recorded in the audit log with the version it replaced. New rounds keep numbering\n"
     "from the highest version."},
    {"export", model_export, OPEN_READ, 0, 2, 2, "VERSION|current OUT",
     "write a version's model file, verified",
     "Writes the model file of VERSION to OUT after checking its size and SHA-256 against the\n"
     "registry; a corrupt or pruned version is refused. OUT is replaced atomically."},
    {"tag", model_tag, OPEN_WRITE, 0, 2, 2, "VERSION TAG", "tag a version ('' clears)",
     "Sets a version's tag (\"\" clears it). Tagged versions are never pruned."},
    {"prune", model_prune, OPEN_WRITE, X_KEEP, 0, 0, "--keep N",
     "remove old model files (records stay)",
     "Retention: removes the model files of every version except the N latest, the current\n"
     "and the tagged ones. Their records stay, marked pruned.\n\n"
     "  --keep N        how many of the latest versions to keep (required)"},
};

int tern_cmd_model(int argc, char **argv)
{
    static const group g = {"model", CMD_MODEL, MODEL_SUBS, sizeof MODEL_SUBS / sizeof *MODEL_SUBS,
                            "The model registry: one version per completed training round,\n"
                            "numbered major.minor.patch, with a current version."};
    return run_group(&g, argc, argv);
}
