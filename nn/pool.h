/* A fork-join thread pool: tern_pool_run(fn, arg) calls fn(arg, ith, nth) once for each
 * ith in [0, nth) and returns when all have finished. The calling thread does ith == 0.
 * Work is split by the callee from (ith, nth) alone, so for a fixed thread count every run
 * splits the same way and results are bitwise reproducible. Internal; owned by a model. */
#ifndef TERN_POOL_H
#define TERN_POOL_H

#include "tern/alloc.h"
#include "tern/status.h"

typedef struct tern_pool tern_pool;
typedef void (*tern_task_fn)(void *arg, int ith, int nth);

/* Start nthreads - 1 workers (nthreads >= 1). TERN_ERR_THREAD if a thread cannot start. */
tern_status tern_pool_create(int nthreads, const tern_allocator *alloc, tern_pool **out);
/* Join the workers and free the pool; *pool becomes NULL. Accepts NULL. */
void tern_pool_destroy(tern_pool **pool);
/* Number of threads including the caller; 1 for a NULL pool. */
int tern_pool_size(const tern_pool *pool);
/* Run fn on every thread. A NULL pool runs fn(arg, 0, 1) inline. Not reentrant. */
void tern_pool_run(tern_pool *pool, tern_task_fn fn, void *arg);

#endif
