/* Fork-join pool on pthreads: a generation counter wakes the workers, a countdown tells the
 * caller they are done; both are polled briefly before anyone sleeps, since a network runs
 * hundreds of short ops back to back. */
#include "pool.h"

#include <pthread.h>
#include <stdatomic.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "util.h"

#if defined(__x86_64__) || defined(__i386__)
#define FLUSH_BITS 0x8040u /* FTZ | DAZ */
unsigned tern_flush_denormals_begin(void)
{
    unsigned saved = _mm_getcsr();
    _mm_setcsr(saved | FLUSH_BITS);
    return saved;
}
void tern_flush_denormals_end(unsigned saved)
{
    _mm_setcsr(saved);
}
#else
unsigned tern_flush_denormals_begin(void) { return 0; }
void tern_flush_denormals_end(unsigned saved) { (void)saved; }
#endif

struct tern_pool {
    const tern_allocator *alloc;
    int nthreads;
    tern_isa isa;
    float *scratch; /* nthreads * (TERN_POOL_SCRATCH_FLOATS + TERN_POOL_PARTIAL_FLOATS) */
    pthread_t *threads;
    /* A run publishes fn and arg, then bumps `generation`; workers spin on it for a while
     * (ops follow each other within microseconds) before sleeping on `wake`. The caller spins
     * on `pending` the same way before sleeping on `done`. */
    _Atomic unsigned long generation;
    atomic_int pending;
    atomic_int stop;
    tern_task_fn fn;
    void *arg;
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
};

/* Polling rounds (one pause instruction each, tens to a few hundred cycles depending on the
 * CPU) before a thread goes to sleep: enough to bridge the gap between consecutive ops. */
#define SPIN_ROUNDS 4000

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
}

typedef struct {
    tern_pool *pool;
    int ith;
} worker_arg;

static void *worker_main(void *p)
{
    tern_pool *pool = ((worker_arg *)p)->pool;
    int ith = ((worker_arg *)p)->ith;
    unsigned long seen = 0;
    tern_flush_denormals_begin(); /* a worker only ever runs kernels */
    for (;;) {
        unsigned long g = atomic_load_explicit(&pool->generation, memory_order_acquire);
        for (int i = 0; i < SPIN_ROUNDS && g == seen; i++) {
            if (atomic_load_explicit(&pool->stop, memory_order_relaxed))
                break;
            cpu_relax();
            g = atomic_load_explicit(&pool->generation, memory_order_acquire);
        }
        if (g == seen) {
            pthread_mutex_lock(&pool->lock);
            while ((g = atomic_load(&pool->generation)) == seen && !atomic_load(&pool->stop))
                pthread_cond_wait(&pool->wake, &pool->lock);
            pthread_mutex_unlock(&pool->lock);
        }
        if (atomic_load(&pool->stop))
            return NULL;
        seen = g;
        pool->fn(pool->arg, ith, pool->nthreads);
        if (atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&pool->lock);
            pthread_cond_signal(&pool->done);
            pthread_mutex_unlock(&pool->lock);
        }
    }
}

/* Worker arguments live right after the thread handles in one block. */
static worker_arg *worker_args(tern_pool *pool)
{
    return (worker_arg *)(pool->threads + pool->nthreads);
}

static void stop_workers(tern_pool *pool, int started)
{
    pthread_mutex_lock(&pool->lock);
    atomic_store(&pool->stop, 1);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->lock);
    for (int i = 0; i < started; i++)
        pthread_join(pool->threads[i], NULL);
}

tern_status tern_pool_create(int nthreads, tern_isa isa, const tern_allocator *alloc,
                             tern_pool **out)
{
    if (nthreads < 1 || nthreads > 1024 || !out)
        return TERN_ERR_INVALID;
    tern_pool *pool = tern_calloc(alloc, 1, sizeof *pool);
    if (!pool)
        return TERN_ERR_NOMEM;
    pool->alloc = alloc;
    pool->nthreads = nthreads;
    pool->isa = tern_isa_resolve(isa);
    pool->threads = tern_calloc(alloc, (size_t)nthreads, sizeof(pthread_t) + sizeof(worker_arg));
    pool->scratch = tern_alloc(alloc, (size_t)nthreads *
                                          (TERN_POOL_SCRATCH_FLOATS + TERN_POOL_PARTIAL_FLOATS) *
                                          sizeof(float));
    if (!pool->threads || !pool->scratch) {
        tern_free(alloc, pool->threads);
        tern_free(alloc, pool->scratch);
        tern_free(alloc, pool);
        return TERN_ERR_NOMEM;
    }
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pthread_cond_init(&pool->done, NULL);
    worker_arg *args = worker_args(pool);
    for (int i = 1; i < nthreads; i++) {
        args[i - 1] = (worker_arg){pool, i};
        if (pthread_create(&pool->threads[i - 1], NULL, worker_main, &args[i - 1]) != 0) {
            stop_workers(pool, i - 1);
            pool->nthreads = 1;
            tern_pool_destroy(&pool);
            return TERN_ERR_THREAD;
        }
    }
    *out = pool;
    return TERN_OK;
}

void tern_pool_destroy(tern_pool **pool_p)
{
    if (!pool_p || !*pool_p)
        return;
    tern_pool *pool = *pool_p;
    if (!atomic_load(&pool->stop))
        stop_workers(pool, pool->nthreads - 1);
    pthread_mutex_destroy(&pool->lock);
    pthread_cond_destroy(&pool->wake);
    pthread_cond_destroy(&pool->done);
    tern_free(pool->alloc, pool->threads);
    tern_free(pool->alloc, pool->scratch);
    tern_free(pool->alloc, pool);
    *pool_p = NULL;
}

int tern_pool_size(const tern_pool *pool)
{
    return pool ? pool->nthreads : 1;
}

tern_isa tern_pool_isa(const tern_pool *pool)
{
    return pool ? pool->isa : tern_isa_resolve(TERN_ISA_AUTO);
}

float *tern_pool_partial(tern_pool *pool, int ith)
{
    return pool ? pool->scratch + (size_t)pool->nthreads * TERN_POOL_SCRATCH_FLOATS +
                      (size_t)ith * TERN_POOL_PARTIAL_FLOATS
                : NULL;
}

float *tern_pool_scratch(tern_pool *pool, int ith)
{
    return pool ? pool->scratch + (size_t)ith * TERN_POOL_SCRATCH_FLOATS : NULL;
}

void tern_pool_run(tern_pool *pool, tern_task_fn fn, void *arg)
{
    if (!pool) {
        fn(arg, 0, 1);
        return;
    }
    unsigned saved = tern_flush_denormals_begin();
    if (pool->nthreads == 1) {
        fn(arg, 0, 1);
        tern_flush_denormals_end(saved);
        return;
    }
    pool->fn = fn;
    pool->arg = arg;
    atomic_store_explicit(&pool->pending, pool->nthreads - 1, memory_order_relaxed);
    pthread_mutex_lock(&pool->lock);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->lock);

    fn(arg, 0, pool->nthreads);

    for (int i = 0; i < SPIN_ROUNDS && atomic_load_explicit(&pool->pending, memory_order_acquire) > 0; i++)
        cpu_relax();
    if (atomic_load_explicit(&pool->pending, memory_order_acquire) > 0) {
        pthread_mutex_lock(&pool->lock);
        while (atomic_load(&pool->pending) > 0)
            pthread_cond_wait(&pool->done, &pool->lock);
        pthread_mutex_unlock(&pool->lock);
    }
    tern_flush_denormals_end(saved);
}
