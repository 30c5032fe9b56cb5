/* Pluggable memory allocation.
 *
 * Every Tern object that allocates takes an optional tern_allocator; NULL means the C library
 * (aligned_alloc/free). Tests use a counting allocator to fail the i-th allocation and check
 * that each function cleans up and reports TERN_ERR_NOMEM. */
#ifndef TERN_ALLOC_H
#define TERN_ALLOC_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tern_allocator {
    /* Returns size bytes aligned to `align` (a power of two >= sizeof(void *)), or NULL. */
    void *(*alloc)(void *user, size_t size, size_t align);
    /* Releases a block from alloc; ptr may be NULL. */
    void (*free)(void *user, void *ptr);
    void *user;
} tern_allocator;

#ifdef __cplusplus
}
#endif

#endif
