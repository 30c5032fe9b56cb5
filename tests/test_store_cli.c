/* End-to-end tests of `tern store`, `tern category` and `tern model`, run from $TERN_BIN
 * (set by CTest) against a store in a fresh temporary directory. Model versions are committed
 * through the C API inside the test; everything else goes through the command line, whose
 * --json output is parsed with jansson. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tern.h"
#include "testutil.h"

enum { MODEL_SIZE = 20000 };

typedef struct fixture {
    char dir[64], store[96], out[96], err[96];
    unsigned char models[3][MODEL_SIZE]; /* committed as 1.0.0, 1.1.0, 1.1.1 */
} fixture;

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    if (!f)
        return -1;
    snprintf(f->dir, sizeof f->dir, "/tmp/tern-scli-XXXXXX");
    if (!mkdtemp(f->dir)) {
        free(f);
        return -1;
    }
    snprintf(f->store, sizeof f->store, "%s/store", f->dir);
    snprintf(f->out, sizeof f->out, "%s/stdout", f->dir);
    snprintf(f->err, sizeof f->err, "%s/stderr", f->dir);
    unsetenv("TERN_STORE"); /* the tests choose the store */
    setenv("USER", "tester", 1);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    test_rm_tree(f->dir);
    free(f);
    return 0;
}

/* Runs `env tern ARGS` in the fixture's directory, stdout and stderr to files; returns the
 * exit status. */
static int run_env(fixture *f, const char *env, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int run_env(fixture *f, const char *env, const char *fmt, ...)
{
    char args[2048], cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(cmd, sizeof cmd, "cd '%s' && %s '%s' %s >'%s' 2>'%s'", f->dir, env, test_tern_bin(),
             args, f->out, f->err);
    int status = system(cmd);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

#define run(f, ...) run_env(f, "", __VA_ARGS__)

static char *slurp(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return NULL;
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *buf = calloc(1, (size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, fp) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(fp);
    if (len)
        *len = (size_t)n;
    return buf;
}

static void expect_in(const char *path, const char *needle)
{
    char *text = slurp(path, NULL);
    if (!text || !strstr(text, needle))
        fail_msg("expected '%s' in %s:\n%s", needle, path, text ? text : "(nothing)");
    free(text);
}

/* Runs a command expected to succeed; shows its stderr when it does not. */
#define RUN_OK(f, ...)                                                                         \
    do {                                                                                       \
        int rc_ = run(f, __VA_ARGS__);                                                         \
        if (rc_ != 0) {                                                                        \
            char *e_ = slurp((f)->err, NULL);                                                  \
            fail_msg("exit %d from tern " #__VA_ARGS__ ":\n%s", rc_, e_ ? e_ : "");            \
        }                                                                                      \
    } while (0)

/* Runs a command expected to fail with exit 1 and a message containing needle on stderr. */
#define RUN_FAILS(f, needle, ...)                                                              \
    do {                                                                                       \
        int rc_ = run(f, __VA_ARGS__);                                                         \
        char *e_ = slurp((f)->err, NULL);                                                      \
        if (rc_ != 1 || !e_ || !strstr(e_, needle))                                            \
            fail_msg("tern " #__VA_ARGS__ ": expected exit 1 and '%s', got %d:\n%s", needle,   \
                     rc_, e_ ? e_ : "");                                                       \
        free(e_);                                                                              \
    } while (0)

/* The JSON document a successful command printed. */
static json_t *out_json(fixture *f)
{
    json_error_t jerr;
    json_t *j = json_load_file(f->out, 0, &jerr);
    if (!j) {
        char *text = slurp(f->out, NULL);
        fail_msg("stdout is not JSON (%s, line %d):\n%s", jerr.text, jerr.line, text ? text : "");
    }
    return j;
}

static const char *jstr(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    if (!json_is_string(v))
        fail_msg("expected string field '%s'", key);
    return json_string_value(v);
}

static json_int_t jint(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    if (!json_is_integer(v))
        fail_msg("expected integer field '%s'", key);
    return json_integer_value(v);
}

static void fill_bytes(unsigned char *p, size_t n, uint64_t seed)
{
    test_rng r = {seed};
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(test_rng_next(&r) >> 56);
}

#define OK(call)                                                                               \
    do {                                                                                       \
        tern_error e_ = {{0}};                                                                 \
        tern_status st_ = (call);                                                              \
        if (st_ != TERN_OK)                                                                    \
            fail_msg("%s: %s (%s)", #call, tern_strerror(st_), e_.message);                    \
    } while (0)

/* Three completed rounds through the C API: 1.0.0, then new settings (1.1.0), then the same
 * settings again (1.1.1). Also one category and one client. */
static void populate(fixture *f)
{
    RUN_OK(f, "store init --store '%s'", f->store);
    tern_store *s = NULL;
    tern_error err = {{0}};
    if (tern_store_open(f->store, &(tern_store_options){.no_sync = true}, &s, &err) != TERN_OK)
        fail_msg("open: %s", err.message);
    tern_category cat = {.class_index = 0, .active = true};
    snprintf(cat.name, sizeof cat.name, "shoe");
    OK(tern_store_category_add(s, &cat, NULL, &e_));
    tern_client_record cl = {0};
    snprintf(cl.name, sizeof cl.name, "pixel-7");
    snprintf(cl.device_type, sizeof cl.device_type, "phone");
    snprintf(cl.api_key_hash, sizeof cl.api_key_hash, "pbkdf2-sha256$100000$%032d$%064d", 0, 0);
    OK(tern_store_client_register(s, &cl, NULL, &e_));
    const char *settings[3] = {"lr=0.1", "lr=0.05", "lr=0.05"};
    for (int i = 0; i < 3; i++) {
        fill_bytes(f->models[i], MODEL_SIZE, 100 + (uint64_t)i);
        tern_round_commit c = {.clients_selected = 3, .clients_participated = 2,
                               .global_accuracy = 0.5 + 0.1 * i, .global_loss = 1.0 - 0.1 * i,
                               .model = f->models[i], .model_size = MODEL_SIZE,
                               .settings = settings[i], .classes = "shoe", .notes = "test"};
        OK(tern_store_commit_round(s, &c, NULL, NULL, &e_));
    }
    tern_store_close(&s);
}

/* ---- tests ----------------------------------------------------------------------------------- */

static void init_ls_and_defaults(void **state)
{
    fixture *f = *state;
    RUN_FAILS(f, "no store at", "store ls --store '%s'", f->store);
    RUN_FAILS(f, "run tern store init", "category list --store '%s'", f->store);
    RUN_OK(f, "store init --store '%s'", f->store);
    expect_in(f->out, "created a store at");
    expect_in(f->out, f->store);
    RUN_OK(f, "store init --store '%s'", f->store);
    expect_in(f->out, "already exists");

    RUN_OK(f, "store ls --json --store '%s'", f->store);
    json_t *j = out_json(f);
    assert_string_equal(jstr(j, "path"), f->store);
    assert_int_equal(jint(json_object_get(j, "categories"), "total"), 0);
    assert_int_equal(jint(json_object_get(j, "rounds"), "completed"), 0);
    assert_int_equal(jint(j, "images"), 0);
    assert_true(json_is_null(json_object_get(j, "current_version")));
    assert_true(jint(j, "map_size") > 0);
    assert_true(jint(j, "data_file_bytes") > 0);
    json_decref(j);
    RUN_OK(f, "store ls --store '%s'", f->store);
    expect_in(f->out, "map size");
    RUN_OK(f, "store check --store '%s'", f->store);
    expect_in(f->out, "no problems");

    /* $TERN_STORE, then ./tern-store. */
    char env[160], path[160];
    snprintf(env, sizeof env, "TERN_STORE='%s/from-env'", f->dir);
    assert_int_equal(run_env(f, env, "store init"), 0);
    expect_in(f->out, "from-env");
    assert_int_equal(run_env(f, env, "category add boot"), 0);
    assert_int_equal(run_env(f, env, "category list"), 0);
    expect_in(f->out, "boot");
    RUN_FAILS(f, "no store at ./tern-store", "category list");
    RUN_OK(f, "store init");
    snprintf(path, sizeof path, "%s/tern-store/data.mdb", f->dir);
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    RUN_OK(f, "category list");
    expect_in(f->out, "no categories");
    /* --store wins over the environment. */
    assert_int_equal(run_env(f, env, "category list --store '%s'", f->store), 0);
    expect_in(f->out, "no categories");
}

static void categories(void **state)
{
    fixture *f = *state;
    RUN_OK(f, "store init --store '%s'", f->store);
    /* Options may follow the arguments. */
    RUN_OK(f, "category add shirt --description 'tops' --store '%s'", f->store);
    expect_in(f->out, "class index 0");
    RUN_OK(f, "category add --store '%s' bag", f->store);
    expect_in(f->out, "class index 1");
    RUN_OK(f, "category add sandal --index 7 --store '%s'", f->store);
    RUN_OK(f, "category add boot --store '%s' --json", f->store);
    json_t *j = out_json(f);
    assert_int_equal(jint(j, "class_index"), 8); /* one past the highest */
    assert_string_equal(jstr(j, "created_by"), "tester");
    json_decref(j);

    RUN_FAILS(f, "category name 'bag' already exists", "category add bag --store '%s'", f->store);
    RUN_FAILS(f, "class index 7 already belongs to category 'sandal'",
              "category add coat --index 7 --store '%s'", f->store);
    RUN_FAILS(f, "does not apply", "category list --index 3 --store '%s'", f->store);
    RUN_FAILS(f, "missing argument", "category add --store '%s'", f->store);

    RUN_OK(f, "category rename shirt top --store '%s'", f->store);
    RUN_FAILS(f, "name 'bag' already exists", "category rename top bag --store '%s'", f->store);
    RUN_FAILS(f, "no category with name 'hat'", "category rename hat cap --store '%s'", f->store);
    RUN_OK(f, "category rm sandal --store '%s'", f->store);
    RUN_FAILS(f, "no category with name 'sandal'", "category rm sandal --store '%s'", f->store);
    RUN_OK(f, "category deactivate bag --store '%s'", f->store);

    RUN_OK(f, "category list --store '%s'", f->store);
    expect_in(f->out, "INDEX");
    expect_in(f->out, "top");
    RUN_OK(f, "category list --json --store '%s'", f->store);
    j = out_json(f);
    json_t *cats = json_object_get(j, "categories");
    assert_int_equal(json_array_size(cats), 3);
    json_t *c0 = json_array_get(cats, 0), *c1 = json_array_get(cats, 1);
    assert_string_equal(jstr(c0, "name"), "top");
    assert_string_equal(jstr(c0, "description"), "tops");
    assert_int_equal(jint(c0, "class_index"), 0);
    assert_true(json_is_true(json_object_get(c0, "active")));
    assert_string_equal(jstr(c1, "name"), "bag");
    assert_true(json_is_false(json_object_get(c1, "active")));
    assert_int_equal(strlen(jstr(c0, "id")), 36);
    assert_non_null(strstr(jstr(c0, "created_at"), "Z"));
    json_decref(j);

    /* Every change is in the audit log with its actor. */
    RUN_OK(f, "store show audit --json --store '%s'", f->store);
    j = out_json(f);
    json_t *audit = json_object_get(j, "audit");
    const char *want[] = {"category.add",    "category.add",    "category.add",
                          "category.add",    "category.rename", "category.remove",
                          "category.set_active"};
    assert_int_equal(json_array_size(audit), 7);
    for (size_t i = 0; i < 7; i++) {
        json_t *e = json_array_get(audit, i);
        assert_string_equal(jstr(e, "action"), want[i]);
        assert_string_equal(jstr(e, "actor"), "tester");
        assert_int_equal(jint(e, "seq"), (json_int_t)i + 1);
    }
    json_decref(j);
    RUN_OK(f, "store show audit --limit 2 --json --store '%s'", f->store);
    j = out_json(f);
    assert_int_equal(json_array_size(json_object_get(j, "audit")), 2);
    json_decref(j);
}

static void models(void **state)
{
    fixture *f = *state;
    populate(f);
    RUN_OK(f, "model list --store '%s'", f->store);
    expect_in(f->out, "VERSION");
    expect_in(f->out, "1.1.0");
    expect_in(f->out, "current version: 1.1.1");

    RUN_OK(f, "model list --json --store '%s'", f->store);
    json_t *j = out_json(f);
    assert_string_equal(jstr(j, "current"), "1.1.1");
    json_t *vs = json_object_get(j, "versions");
    assert_int_equal(json_array_size(vs), 3);
    const char *names[] = {"1.0.0", "1.1.0", "1.1.1"};
    for (size_t i = 0; i < 3; i++) {
        json_t *v = json_array_get(vs, i);
        assert_string_equal(jstr(v, "version"), names[i]);
        assert_int_equal(jint(v, "round"), (json_int_t)i + 1);
        assert_int_equal(jint(v, "size"), MODEL_SIZE);
        assert_int_equal(strlen(jstr(v, "sha256")), 64);
        assert_true(json_is_boolean(json_object_get(v, "current")));
        assert_true(json_is_false(json_object_get(v, "pruned")));
        assert_true(json_is_null(json_object_get(v, "tag")));
        assert_true(json_is_real(json_object_get(v, "accuracy")));
    }
    json_decref(j);

    RUN_OK(f, "model show 1.1.0 --store '%s'", f->store);
    expect_in(f->out, "sha256");
    RUN_OK(f, "model show current --json --store '%s'", f->store);
    j = out_json(f);
    assert_string_equal(jstr(j, "version"), "1.1.1");
    assert_true(json_is_true(json_object_get(j, "current")));
    json_t *round = json_object_get(j, "training_round");
    assert_int_equal(jint(round, "number"), 3);
    assert_string_equal(jstr(round, "status"), "completed");
    json_decref(j);
    RUN_FAILS(f, "9.9.9 not found; versions: 1.0.0, 1.1.0, 1.1.1", "model show 9.9.9 --store '%s'",
              f->store);
    RUN_FAILS(f, "banana not found; versions:", "model rollback banana --store '%s'", f->store);

    /* Export is verified and byte-exact; rollback changes what "current" exports. */
    char out[160];
    snprintf(out, sizeof out, "%s/m.safetensors", f->dir);
    RUN_OK(f, "model export 1.1.0 '%s' --store '%s'", out, f->store);
    size_t len = 0;
    char *bytes = slurp(out, &len);
    assert_int_equal(len, MODEL_SIZE);
    assert_memory_equal(bytes, f->models[1], MODEL_SIZE);
    free(bytes);
    RUN_OK(f, "model rollback 1.0.0 --store '%s'", f->store);
    expect_in(f->out, "1.1.1 -> 1.0.0");
    RUN_OK(f, "model export current '%s' --json --store '%s'", out, f->store);
    j = out_json(f);
    assert_string_equal(jstr(j, "version"), "1.0.0");
    json_decref(j);
    bytes = slurp(out, &len);
    assert_int_equal(len, MODEL_SIZE);
    assert_memory_equal(bytes, f->models[0], MODEL_SIZE);
    free(bytes);
    RUN_OK(f, "store show audit --json --store '%s'", f->store);
    j = out_json(f);
    json_t *audit = json_object_get(j, "audit");
    json_t *last = json_array_get(audit, json_array_size(audit) - 1);
    assert_string_equal(jstr(last, "action"), "version.rollback");
    assert_string_equal(jstr(last, "target"), "1.0.0");
    assert_string_equal(jstr(last, "actor"), "tester");
    assert_non_null(strstr(jstr(last, "detail"), "1.1.1"));
    json_decref(j);

    /* Tag, then prune: the current (1.0.0) and tagged (1.1.0) stay, 1.1.1 goes. */
    RUN_OK(f, "model tag 1.1.0 keep --store '%s'", f->store);
    RUN_FAILS(f, "--keep N is required", "model prune --store '%s'", f->store);
    RUN_OK(f, "model prune --keep 0 --json --store '%s'", f->store);
    j = out_json(f);
    assert_int_equal(jint(j, "pruned"), 1);
    assert_int_equal(json_array_size(json_object_get(j, "versions")), 1);
    assert_string_equal(json_string_value(json_array_get(json_object_get(j, "versions"), 0)),
                        "1.1.1");
    json_decref(j);
    RUN_FAILS(f, "pruned", "model export 1.1.1 '%s' --store '%s'", out, f->store);
    RUN_FAILS(f, "pruned", "model rollback 1.1.1 --store '%s'", f->store);
    RUN_OK(f, "model list --store '%s'", f->store);
    expect_in(f->out, "pruned");
    expect_in(f->out, "keep");

    RUN_OK(f, "store ls --json --store '%s'", f->store);
    j = out_json(f);
    assert_string_equal(jstr(j, "current_version"), "1.0.0");
    json_t *v = json_object_get(j, "versions");
    assert_int_equal(jint(v, "total"), 3);
    assert_int_equal(jint(v, "pruned"), 1);
    assert_int_equal(jint(v, "tagged"), 1);
    assert_int_equal(jint(json_object_get(j, "rounds"), "completed"), 3);
    assert_int_equal(jint(json_object_get(j, "clients"), "total"), 1);
    json_decref(j);

    /* Clients and rounds, never a key hash. */
    RUN_OK(f, "store show --store '%s'", f->store);
    expect_in(f->out, "pixel-7");
    expect_in(f->out, "completed");
    RUN_OK(f, "store show clients rounds --json --store '%s'", f->store);
    j = out_json(f);
    json_t *clients = json_object_get(j, "clients"), *rounds = json_object_get(j, "rounds");
    assert_int_equal(json_array_size(clients), 1);
    assert_null(json_object_get(json_array_get(clients, 0), "api_key_hash"));
    assert_string_equal(jstr(json_array_get(clients, 0), "name"), "pixel-7");
    assert_int_equal(json_array_size(rounds), 3);
    assert_string_equal(jstr(json_array_get(rounds, 2), "model_version"), "1.1.1");
    assert_null(json_object_get(j, "audit"));
    json_decref(j);
    char *text = slurp(f->out, NULL);
    assert_null(strstr(text, "pbkdf2"));
    free(text);

    RUN_OK(f, "store check --store '%s'", f->store);
}

/* Flip one byte of version 1.1.0's model inside data.mdb. */
static void corrupt_model(fixture *f, int which)
{
    char path[160];
    snprintf(path, sizeof path, "%s/data.mdb", f->store);
    size_t n = 0;
    unsigned char *file = (unsigned char *)slurp(path, &n);
    assert_non_null(file);
    long at = -1;
    for (size_t i = 0; i + 64 <= n && at < 0; i++)
        if (memcmp(file + i, f->models[which] + 1000, 64) == 0)
            at = (long)i + 10;
    assert_true(at >= 0);
    FILE *fp = fopen(path, "r+b");
    assert_non_null(fp);
    fseek(fp, at, SEEK_SET);
    fputc(file[at] ^ 0x5a, fp);
    fclose(fp);
    free(file);
}

static void corrupt_blob(void **state)
{
    fixture *f = *state;
    populate(f);
    corrupt_model(f, 1);
    RUN_FAILS(f, "1 problem found", "store check --store '%s'", f->store);
    expect_in(f->out, "problem:");
    assert_int_equal(run(f, "store check --json --store '%s'", f->store), 1);
    json_t *j = out_json(f);
    assert_true(json_is_false(json_object_get(j, "ok")));
    assert_int_equal(jint(j, "problem_count"), 1);
    assert_int_equal(json_array_size(json_object_get(j, "problems")), 1);
    json_decref(j);

    char out[160];
    snprintf(out, sizeof out, "%s/bad.safetensors", f->dir);
    RUN_FAILS(f, "model version 1.1.0 is corrupt", "model export 1.1.0 '%s' --store '%s'", out,
              f->store);
    struct stat sb;
    assert_int_not_equal(stat(out, &sb), 0); /* nothing written */
    RUN_OK(f, "model export 1.0.0 '%s' --store '%s'", out, f->store);

    /* A backup of a damaged store is refused by restore. */
    char bk[160], other[160];
    snprintf(bk, sizeof bk, "%s/bk", f->dir);
    snprintf(other, sizeof other, "%s/other", f->dir);
    RUN_OK(f, "store backup '%s' --store '%s'", bk, f->store);
    RUN_FAILS(f, "refusing to restore", "store restore '%s' --store '%s'", bk, other);
}

static void backup_restore(void **state)
{
    fixture *f = *state;
    populate(f);
    char bk[160], other[160];
    snprintf(bk, sizeof bk, "%s/bk", f->dir);
    snprintf(other, sizeof other, "%s/other", f->dir);
    RUN_OK(f, "store backup '%s' --json --store '%s'", bk, f->store);
    json_t *j = out_json(f);
    assert_true(jint(j, "bytes") > 0);
    json_decref(j);
    RUN_FAILS(f, "already holds a store", "store backup '%s' --store '%s'", bk, f->store);

    /* Changes after the backup are undone by restoring it. */
    RUN_OK(f, "category add late --store '%s'", f->store);
    RUN_OK(f, "model rollback 1.0.0 --store '%s'", f->store);

    /* Refused while another process has the store open. */
    tern_store *s = NULL;
    tern_error err = {{0}};
    assert_int_equal(tern_store_open(f->store, NULL, &s, &err), TERN_OK);
    RUN_FAILS(f, "is open in process", "store restore '%s' --store '%s'", bk, f->store);
    tern_store_close(&s);

    RUN_OK(f, "store restore '%s' --store '%s'", bk, f->store);
    expect_in(f->out, "restored");
    RUN_OK(f, "category list --json --store '%s'", f->store);
    j = out_json(f);
    assert_int_equal(json_array_size(json_object_get(j, "categories")), 1);
    json_decref(j);
    RUN_OK(f, "model list --json --store '%s'", f->store);
    j = out_json(f);
    assert_string_equal(jstr(j, "current"), "1.1.1");
    json_decref(j);
    RUN_OK(f, "store check --store '%s'", f->store);

    /* Into a directory with no store yet. */
    RUN_OK(f, "store restore '%s' --store '%s'", bk, other);
    char out[160];
    snprintf(out, sizeof out, "%s/m", f->dir);
    RUN_OK(f, "model export 1.1.1 '%s' --store '%s'", out, other);
    size_t len;
    char *bytes = slurp(out, &len);
    assert_int_equal(len, MODEL_SIZE);
    assert_memory_equal(bytes, f->models[2], MODEL_SIZE);
    free(bytes);
    char missing[160];
    snprintf(missing, sizeof missing, "%s/nothing", f->dir);
    RUN_FAILS(f, "no backup at", "store restore '%s' --store '%s'", missing, other);
}

/* What the federated server records: a failed round's reason, each client's statistics. */
static void federated_records(void **state)
{
    fixture *f = *state;
    populate(f);
    tern_store *s = NULL;
    tern_error err = {{0}};
    if (tern_store_open(f->store, &(tern_store_options){.no_sync = true}, &s, &err) != TERN_OK)
        fail_msg("open: %s", err.message);
    tern_client_record cl;
    OK(tern_store_client_get_by_name(s, "pixel-7", &cl, &e_));
    tern_client_metrics m = {.participated = true, .num_samples = 40, .update_norm = 1.25};
    strcpy(m.client_id, cl.id);
    tern_round_commit c = {.clients_selected = 1, .clients_participated = 1,
                           .global_accuracy = 0.9, .global_loss = 0.3, .model = f->models[2],
                           .model_size = MODEL_SIZE, .settings = "lr=0.05", .classes = "shoe",
                           .client_metrics = &m, .client_metrics_count = 1};
    OK(tern_store_commit_round(s, &c, NULL, NULL, &e_));
    tern_round r;
    OK(tern_store_round_create(s, 1, &r, &e_));
    OK(tern_store_round_set_status(s, r.number, TERN_ROUND_RUNNING, &e_));
    m = (tern_client_metrics){.rejected = true};
    strcpy(m.client_id, cl.id);
    OK(tern_store_round_fail(s, r.number, "every update was rejected", &m, 1,
                             "{\"completed\": false}", &e_));
    tern_store_close(&s);

    RUN_OK(f, "store show rounds --store '%s'", f->store);
    expect_in(f->out, "REASON");
    expect_in(f->out, "every update was rejected");
    RUN_OK(f, "store show rounds --json --store '%s'", f->store);
    json_t *j = out_json(f);
    json_t *rounds = json_object_get(j, "rounds");
    assert_int_equal(json_array_size(rounds), 5);
    assert_true(json_is_null(json_object_get(json_array_get(rounds, 0), "reason")));
    json_t *failed = json_array_get(rounds, 4);
    assert_string_equal(jstr(failed, "status"), "failed");
    assert_string_equal(jstr(failed, "reason"), "every update was rejected");
    json_decref(j);

    RUN_OK(f, "store show clients --store '%s'", f->store);
    expect_in(f->out, "REJECTED");
    expect_in(f->out, "1.25");
    RUN_OK(f, "store show clients --json --store '%s'", f->store);
    j = out_json(f);
    json_t *c0 = json_array_get(json_object_get(j, "clients"), 0);
    assert_int_equal(jint(c0, "rounds_selected"), 2);
    assert_int_equal(jint(c0, "rounds_succeeded"), 1);
    assert_int_equal(jint(c0, "rounds_failed"), 0);
    assert_int_equal(jint(c0, "rounds_rejected"), 1);
    assert_true(json_real_value(json_object_get(c0, "last_update_norm")) == 1.25);
    /* (1 + 1) / (2 + 2) * 0.5 */
    assert_true(json_real_value(json_object_get(c0, "quality_score")) == 0.25);
    json_decref(j);
    RUN_OK(f, "store check --store '%s'", f->store);
    expect_in(f->out, "no problems");
}

static void help_and_usage(void **state)
{
    fixture *f = *state;
    const char *groups[] = {"store", "category", "model"};
    for (int i = 0; i < 3; i++) {
        RUN_OK(f, "%s --help", groups[i]);
        expect_in(f->out, "--store DIR");
        assert_int_equal(run(f, "%s", groups[i]), 1);
        RUN_FAILS(f, "unknown subcommand 'frob'", "%s frob", groups[i]);
    }
    const char *subs[] = {"store init",      "store ls",        "store show",   "store check",
                          "store backup",    "store restore",   "category add", "category list",
                          "category rename", "category rm",     "model list",   "model show",
                          "model rollback",  "model export",    "model tag",    "model prune"};
    for (size_t i = 0; i < sizeof subs / sizeof *subs; i++) {
        RUN_OK(f, "%s --help", subs[i]);
        char want[64];
        snprintf(want, sizeof want, "usage: tern %s", subs[i]);
        expect_in(f->out, want);
    }
    RUN_OK(f, "--help");
    expect_in(f->out, "category");
    RUN_FAILS(f, "unexpected argument 'x'", "store ls x");
    RUN_FAILS(f, "does not apply", "model list --description x");
    RUN_OK(f, "store init --store '%s'", f->store);
    RUN_FAILS(f, "unknown section 'bogus'", "store show bogus --store '%s'", f->store);
    RUN_FAILS(f, "--limit applies to the audit log", "store show rounds --limit 3 --store '%s'",
              f->store);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(init_ls_and_defaults, setup, teardown),
        cmocka_unit_test_setup_teardown(categories, setup, teardown),
        cmocka_unit_test_setup_teardown(models, setup, teardown),
        cmocka_unit_test_setup_teardown(corrupt_blob, setup, teardown),
        cmocka_unit_test_setup_teardown(backup_restore, setup, teardown),
        cmocka_unit_test_setup_teardown(federated_records, setup, teardown),
        cmocka_unit_test_setup_teardown(help_and_usage, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
