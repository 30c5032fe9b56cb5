#include "testutil.h"
#include "tern/data.h"

#include <dirent.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

uint64_t test_rng_next(test_rng *r)
{
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

float test_rng_uniform(test_rng *r, float lo, float hi)
{
    return lo + (hi - lo) * (float)((test_rng_next(r) >> 40) * 0x1.0p-24);
}

int test_rng_int(test_rng *r, int lo, int hi)
{
    return lo + (int)(test_rng_next(r) % (uint64_t)(hi - lo + 1));
}

void test_fill_uniform(test_rng *r, float *x, size_t n, float lo, float hi)
{
    for (size_t i = 0; i < n; i++)
        x[i] = test_rng_uniform(r, lo, hi);
}

bool test_close(const char *what, const float *a, const float *b, size_t n, float tol,
                float floor)
{
    double scale = floor, worst = 0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++)
        if (fabs(b[i]) > scale)
            scale = fabs(b[i]);
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= worst)) { /* also catches NaN */
            worst = isnan(d) ? INFINITY : d;
            at = i;
        }
    }
    if (worst / scale > tol) {
        fprintf(stderr, "%s: mismatch at %zu: got %.9g want %.9g (rel err %.3g > %.3g, scale %.3g)\n",
                what, at, (double)a[at], (double)b[at], worst / scale, (double)tol, scale);
        return false;
    }
    return true;
}

static void *failing_alloc(void *user, size_t size, size_t align)
{
    test_alloc_state *s = user;
    if (++s->count == s->fail_at)
        return NULL;
    void *p = aligned_alloc(align, size);
    if (p)
        s->live++;
    return p;
}

static void failing_free(void *user, void *ptr)
{
    test_alloc_state *s = user;
    if (ptr) {
        s->live--;
        free(ptr);
    }
}

tern_allocator test_failing_allocator(test_alloc_state *state)
{
    return (tern_allocator){failing_alloc, failing_free, state};
}

const char *test_fixture_dir(void)
{
    const char *d = getenv("TERN_FIXTURES");
    return d && *d ? d : "tests/golden";
}

struct tern_dataset *test_open_fashion_mnist(bool train, const char *who)
{
    const char *dir = getenv("TERN_FASHION_MNIST");
    tern_dataset *ds = NULL;
    tern_error err = {{0}};
    if (tern_dataset_open_fashion_mnist(dir && *dir ? dir : "/usr/share/datasets/fashion-mnist",
                                        train, NULL, &ds, &err) != TERN_OK) {
        fprintf(stderr, "%s: %s\n", who, err.message);
        return NULL;
    }
    return ds;
}

void test_rm_tree(const char *path)
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
                    test_rm_tree(child);
                }
            closedir(d);
        }
        rmdir(path);
    } else {
        unlink(path);
    }
}

const char *test_tern_bin(void)
{
    const char *b = getenv("TERN_BIN");
    return b && *b ? b : "./tern";
}

static int run_exe(const char *log, const char *exe, const char *fmt, va_list ap)
{
    char args[4096], cmd[8192];
    vsnprintf(args, sizeof args, fmt, ap);
    snprintf(cmd, sizeof cmd, "'%s' %s >'%s' 2>&1", exe, args, log);
    int status = system(cmd);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

int test_run_exe(const char *log, const char *exe, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = run_exe(log, exe, fmt, ap);
    va_end(ap);
    return rc;
}

int test_run_tern(const char *log, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = run_exe(log, test_tern_bin(), fmt, ap);
    va_end(ap);
    return rc;
}

char *test_slurp(const char *path)
{
    enum { CAP = 1 << 20 };
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    char *text = malloc(CAP);
    if (text) {
        size_t n = fread(text, 1, CAP - 1, f);
        text[n] = 0;
    }
    fclose(f);
    return text;
}

bool test_file_contains(const char *path, const char *needle)
{
    char *text = test_slurp(path);
    bool found = text && strstr(text, needle);
    if (!found)
        fprintf(stderr, "expected '%s' in %s:\n%s\n", needle, path, text ? text : "(unreadable)");
    free(text);
    return found;
}
