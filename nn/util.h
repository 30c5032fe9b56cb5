/* Internal helpers shared by the library's modules: allocation through a tern_allocator,
 * overflow-checked size arithmetic, and error message formatting. Not installed. */
#ifndef TERN_UTIL_H
#define TERN_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tern/alloc.h"
#include "tern/status.h"

#define TERN_ALIGN 64

/* Allocate `size` bytes aligned to TERN_ALIGN (size 0 is allowed and returns a valid block). */
void *tern_alloc(const tern_allocator *a, size_t size);
/* Same, zero-filled. */
void *tern_calloc(const tern_allocator *a, size_t count, size_t size);
void tern_free(const tern_allocator *a, void *ptr);
/* Duplicate a C string through the allocator. */
char *tern_strdup(const tern_allocator *a, const char *s);

/* *out = a * b; false on overflow. */
static inline bool tern_mul_size(size_t a, size_t b, size_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}
static inline bool tern_add_size(size_t a, size_t b, size_t *out)
{
    return !__builtin_add_overflow(a, b, out);
}

/* printf-style message into err (if not NULL); returns status for `return tern_fail(...)`. */
tern_status tern_set_error(tern_error *err, tern_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Split [0, total) into nth nearly equal contiguous ranges; range ith is [*begin, *end). */
static inline void tern_split(size_t total, int ith, int nth, size_t *begin, size_t *end)
{
    size_t base = total / (size_t)nth, extra = total % (size_t)nth, i = (size_t)ith;
    *begin = i * base + (i < extra ? i : extra);
    *end = *begin + base + (i < extra ? 1 : 0);
}

#endif
