/* bench_store: the LMDB store's costs that a federated server feels, printed as one JSON
 * object.
 *
 *   commit_10mb      tern_store_commit_round with a 10 MB model (round record + blob + version +
 *                    current pointer in one transaction), durable (fsync at commit) and with
 *                    no_sync; commits per second and MB/s, SHA-256 included
 *   lookups          tern_store_category_get_by_name over 100 categories and
 *                    tern_store_version_get over the versions, operations per second
 *   backup_100       tern_store_backup (compacting copy) of a store holding 100 versions of
 *                    1 MB models (smaller than the 10 MB above to keep the run short), seconds
 *
 * Usage: bench_store [--commits N] (default 20). Temporary stores live under /tmp and are
 * removed at exit. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "tern/store.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void rm_tree(const char *path)
{
    struct stat sb;
    if (lstat(path, &sb) != 0)
        return;
    if (S_ISDIR(sb.st_mode)) {
        DIR *d = opendir(path);
        if (d) {
            struct dirent *e;
            char child[1024];
            while ((e = readdir(d)))
                if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
                    snprintf(child, sizeof child, "%s/%s", path, e->d_name);
                    rm_tree(child);
                }
            closedir(d);
        }
        rmdir(path);
    } else {
        unlink(path);
    }
}

static void die(const char *what, const tern_error *err)
{
    fprintf(stderr, "bench_store: %s: %s\n", what, err ? err->message : "");
    exit(1);
}

static void fill(unsigned char *p, size_t n, uint64_t seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = (unsigned char)(seed >> 56);
    }
}

static tern_store *open_at(const char *dir, bool no_sync)
{
    tern_store *s = NULL;
    tern_error err = {{0}};
    if (tern_store_open(dir, &(tern_store_options){.no_sync = no_sync}, &s, &err))
        die("open", &err);
    return s;
}

/* Commits per second of n rounds with a size-byte model. */
static double bench_commits(const char *dir, bool no_sync, int n, size_t size, unsigned char *model)
{
    tern_store *s = open_at(dir, no_sync);
    tern_error err = {{0}};
    double total = 0;
    for (int i = -1; i < n; i++) { /* round -1 warms up (map growth, page faults) */
        fill(model, 4096, (uint64_t)i + 7); /* new content, new blob */
        tern_round_commit c = {.global_accuracy = 0.5, .global_loss = 1.0, .model = model,
                               .model_size = size, .settings = "lr=0.1", .classes = "a,b"};
        double t0 = now();
        if (tern_store_commit_round(s, &c, NULL, NULL, &err))
            die("commit", &err);
        if (i >= 0)
            total += now() - t0;
    }
    tern_store_close(&s);
    return n / total;
}

int main(int argc, char **argv)
{
    int commits = 20;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--commits") == 0 && i + 1 < argc)
            commits = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_store [--commits N]\n");
            return 2;
        }
    }
    if (commits < 1)
        commits = 1;
    char root[] = "/tmp/tern_bench_store.XXXXXX";
    if (!mkdtemp(root))
        die("mkdtemp", NULL);
    char dir[256];
    tern_error err = {{0}};

    const size_t big = 10u << 20;
    unsigned char *model = malloc(big);
    if (!model)
        die("out of memory", NULL);
    fill(model, big, 1);
    snprintf(dir, sizeof dir, "%s/sync", root);
    double sync_rate = bench_commits(dir, false, commits, big, model);
    snprintf(dir, sizeof dir, "%s/nosync", root);
    double nosync_rate = bench_commits(dir, true, commits, big, model);

    /* Lookups on the no-sync store, after adding 100 categories. */
    tern_store *s = open_at(dir, true);
    char name[64];
    for (int i = 0; i < 100; i++) {
        tern_category c = {.class_index = i, .active = true};
        snprintf(c.name, sizeof c.name, "category-%03d", i);
        if (tern_store_category_add(s, &c, NULL, &err))
            die("category_add", &err);
    }
    const int lookups = 200000;
    tern_category cat;
    double t0 = now();
    for (int i = 0; i < lookups; i++) {
        snprintf(name, sizeof name, "category-%03d", (i * 37) % 100);
        if (tern_store_category_get_by_name(s, name, &cat, &err))
            die("category_get_by_name", &err);
    }
    double cat_rate = lookups / (now() - t0);
    tern_model_version v;
    t0 = now();
    for (int i = 0; i < lookups; i++) {
        snprintf(name, sizeof name, "1.0.%d", i % (commits + 1));
        if (tern_store_version_get(s, name, &v, &err))
            die("version_get", &err);
    }
    double ver_rate = lookups / (now() - t0);
    tern_store_close(&s);

    /* Backup of 100 versions of 1 MB each. */
    const size_t small = 1u << 20;
    snprintf(dir, sizeof dir, "%s/hundred", root);
    s = open_at(dir, true);
    for (int i = 0; i < 100; i++) {
        fill(model, 4096, (uint64_t)i + 1000);
        tern_round_commit c = {.model = model, .model_size = small};
        if (tern_store_commit_round(s, &c, NULL, NULL, &err))
            die("commit", &err);
    }
    char backup[256];
    snprintf(backup, sizeof backup, "%s/backup", root);
    t0 = now();
    if (tern_store_backup(s, backup, &err))
        die("backup", &err);
    double backup_s = now() - t0;
    size_t problems = 0;
    tern_store_close(&s);
    s = open_at(backup, true);
    if (tern_store_check(s, NULL, NULL, &problems, &err) || problems)
        die("backup check", &err);
    tern_store_close(&s);

    printf("{\"bench\": \"store\", \"commit_10mb\": {\"commits\": %d, \"durable_per_s\": %.2f, "
           "\"durable_mb_per_s\": %.1f, \"no_sync_per_s\": %.2f, \"no_sync_mb_per_s\": %.1f}, "
           "\"lookups\": {\"category_by_name_per_s\": %.0f, \"version_get_per_s\": %.0f}, "
           "\"backup_100_versions_1mb\": {\"seconds\": %.3f, \"mb\": 100}}\n",
           commits, sync_rate, sync_rate * 10, nosync_rate, nosync_rate * 10, cat_rate, ver_rate,
           backup_s);
    free(model);
    rm_tree(root);
    return 0;
}
