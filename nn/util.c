/* Allocation, error formatting and status strings. */
#include "util.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *tern_alloc(const tern_allocator *a, size_t size)
{
    /* aligned_alloc wants a multiple of the alignment; round up (and never ask for 0 bytes). */
    size_t rounded;
    if (!tern_add_size(size, TERN_ALIGN - 1, &rounded))
        return NULL;
    rounded &= ~(size_t)(TERN_ALIGN - 1);
    if (rounded == 0)
        rounded = TERN_ALIGN;
    if (a && a->alloc)
        return a->alloc(a->user, rounded, TERN_ALIGN);
    return aligned_alloc(TERN_ALIGN, rounded);
}

void *tern_calloc(const tern_allocator *a, size_t count, size_t size)
{
    size_t bytes;
    if (!tern_mul_size(count, size, &bytes))
        return NULL;
    void *p = tern_alloc(a, bytes);
    if (p)
        memset(p, 0, bytes);
    return p;
}

void tern_free(const tern_allocator *a, void *ptr)
{
    if (!ptr)
        return;
    if (a && a->free)
        a->free(a->user, ptr);
    else
        free(ptr);
}

char *tern_strdup(const tern_allocator *a, const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = tern_alloc(a, n);
    if (d)
        memcpy(d, s, n);
    return d;
}

tern_status tern_set_error(tern_error *err, tern_status status, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return status;
}

const char *tern_strerror(tern_status status)
{
    switch (status) {
    case TERN_OK: return "success";
    case TERN_ERR_NOMEM: return "out of memory";
    case TERN_ERR_INVALID: return "invalid argument";
    case TERN_ERR_IO: return "input/output error";
    case TERN_ERR_FORMAT: return "malformed data";
    case TERN_ERR_SHAPE: return "tensor shape or type mismatch";
    case TERN_ERR_NOT_FOUND: return "not found";
    case TERN_ERR_UNSUPPORTED: return "unsupported";
    case TERN_ERR_STATE: return "call made in the wrong state";
    case TERN_ERR_THREAD: return "thread error";
    case TERN_ERR_EXISTS: return "already exists";
    }
    return "unknown status";
}
