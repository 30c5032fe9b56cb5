/* A fork-join thread pool: tern_pool_run(fn, arg) calls fn(arg, ith, nth) once for each
 * ith in [0, nth) and returns when all have finished. The calling thread does ith == 0.
 * Work is split by the callee from (ith, nth) alone, so for a fixed thread count every run
 * splits the same way and results are bitwise reproducible. Internal; owned by a model. */
#ifndef TERN_POOL_H
#define TERN_POOL_H

#include "tern/alloc.h"
#include "tern/model.h"
#include "tern/status.h"

/* Per-thread scratch every pool owns (GEMM packing buffers and the like), in floats. */
#define TERN_POOL_SCRATCH_FLOATS ((size_t)1 << 19) /* 2 MiB */
/* Per-thread buffer for partial results that the caller reduces after a run (a GEMM split
 * along K), separate from the scratch so the GEMM can pack while it fills it. */
#define TERN_POOL_PARTIAL_FLOATS ((size_t)1 << 16) /* 256 KiB */

typedef struct tern_pool tern_pool;
typedef void (*tern_task_fn)(void *arg, int ith, int nth);

/* Start nthreads - 1 workers (nthreads >= 1) that run kernels at instruction-set level isa
 * (resolved with tern_isa_resolve). TERN_ERR_THREAD if a thread cannot start, TERN_ERR_NOMEM. */
tern_status tern_pool_create(int nthreads, tern_isa isa, const tern_allocator *alloc,
                             tern_pool **out);
/* Join the workers and free the pool; *pool becomes NULL. Accepts NULL. */
void tern_pool_destroy(tern_pool **pool);
/* Number of threads including the caller; 1 for a NULL pool. */
int tern_pool_size(const tern_pool *pool);
/* Kernel level for this pool; for a NULL pool, the best the CPU has. */
tern_isa tern_pool_isa(const tern_pool *pool);
/* TERN_POOL_SCRATCH_FLOATS floats, 64-byte aligned, private to thread ith during a run; NULL
 * for a NULL pool. */
float *tern_pool_scratch(tern_pool *pool, int ith);
/* TERN_POOL_PARTIAL_FLOATS floats, 64-byte aligned, written by thread ith during a run and
 * readable by the caller after it; NULL for a NULL pool. */
float *tern_pool_partial(tern_pool *pool, int ith);
/* Run fn on every thread, all with denormals flushed (see below; the caller's mode is restored
 * on return). A NULL pool runs fn(arg, 0, 1) inline with the mode untouched. Not reentrant. */
void tern_pool_run(tern_pool *pool, tern_task_fn fn, void *arg);


/* Kernels run with denormals flushed to zero (FTZ) and read as zero (DAZ): a denormal operand
 * costs a hundred cycles or more on x86, and activations can decay into that range (seen in the
 * 7x7 layers of MobileNetV3 at batch 1). Only values below 1.2e-38 are affected. begin sets the
 * mode on the calling thread and returns the previous one for end to restore. */
unsigned tern_flush_denormals_begin(void);
void tern_flush_denormals_end(unsigned saved);

#endif
