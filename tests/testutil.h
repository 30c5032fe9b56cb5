/* Helpers shared by the cmocka tests: a seeded generator for test data, tensor comparison
 * that reports the worst element, and an allocator that fails on demand. */
#ifndef TERN_TESTUTIL_H
#define TERN_TESTUTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tern/alloc.h"

/* splitmix64-based generator for test inputs (tests only; the library has its own). */
typedef struct { uint64_t s; } test_rng;
uint64_t test_rng_next(test_rng *r);
float test_rng_uniform(test_rng *r, float lo, float hi); /* [lo, hi) */
int test_rng_int(test_rng *r, int lo, int hi);           /* [lo, hi] */
void test_fill_uniform(test_rng *r, float *x, size_t n, float lo, float hi);

/* Max |a - b| / scale over n values, where scale = max(max|b|, floor). Prints the worst index
 * with `what` when it exceeds tol, and returns whether it is within tol. */
bool test_close(const char *what, const float *a, const float *b, size_t n, float tol,
                float floor);

/* Allocator that counts allocations and fails the fail_at-th one (1-based; 0 = never). */
typedef struct {
    long count;
    long fail_at;
    long live; /* allocations not yet freed */
} test_alloc_state;
tern_allocator test_failing_allocator(test_alloc_state *state);

/* Remove a file or a directory tree (a test's scratch directory); missing paths are ignored. */
void test_rm_tree(const char *path);

/* The tern executable under test: $TERN_BIN, else ./tern (ctest runs in the build dir). */
const char *test_tern_bin(void);

/* Runs `'exe' ARGS` through the shell, ARGS printf-formatted, with stdout and stderr written to
 * log; returns the exit status, or -1 when the command did not exit normally. test_run_tern
 * runs test_tern_bin(). */
int test_run_exe(const char *log, const char *exe, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int test_run_tern(const char *log, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The first MiB of a text file, NUL-terminated and heap-allocated (NULL when it cannot be read). */
char *test_slurp(const char *path);

/* Whether the text file at path contains needle; when not, prints both to stderr. */
bool test_file_contains(const char *path, const char *needle);

/* Directory holding golden fixtures ($TERN_FIXTURES, else tests/golden). */
const char *test_fixture_dir(void);

/* Fashion-MNIST's training or test split from $TERN_FASHION_MNIST, else the Debian package's
 * directory; NULL after printing why, prefixed by who, to stderr. */
struct tern_dataset *test_open_fashion_mnist(bool train, const char *who);

#endif
