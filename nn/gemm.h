/* Tern's single-precision GEMM (row-major), the engine behind pointwise convolutions, the stem
 * (im2col) and fully connected layers.
 *
 *   C (M x N, row stride ldc) = [C +] op(A) op(B), then per element + bias[col], then act.
 *
 * op(A) is A (M x K, row stride lda) or, with trans_a, the transpose of A stored (K x M, lda).
 * op(B) is B (K x N, ldb) or, with trans_b, the transpose of B stored (N x K, ldb).
 * With accumulate, the product is added to C (C + product, then bias, then act); otherwise C
 * is overwritten and never read. The activation formulas are those of tern_act_forward.
 *
 * Determinism: every element of C is computed by one thread, summing K in a fixed blocked order
 * that depends on the ISA (tile shape) but not on the thread count or timing, so a given
 * (shape, ISA) always gives the same bits, whatever the thread count.
 *
 * Internal header: not installed. */
#ifndef TERN_GEMM_H
#define TERN_GEMM_H

#include <stdbool.h>
#include <stddef.h>

#include "kernels.h"
#include "pool.h"

typedef struct tern_gemm_epilogue {
    const float *bias; /* (N): one value per column of C, or NULL */
    tern_act act;
} tern_gemm_epilogue;

/* Runs on the pool's threads at its ISA, packing into the pool's per-thread scratch. A NULL
 * pool (no scratch) runs tern_gemm_ref on the calling thread. ep may be NULL (no bias, no act).
 * Not to be called from inside a pool task (tern_pool_run is not reentrant): use
 * tern_gemm_thread there. */
void tern_gemm(float *C, size_t ldc, const float *A, size_t lda, bool trans_a, const float *B,
               size_t ldb, bool trans_b, size_t M, size_t N, size_t K, bool accumulate,
               const tern_gemm_epilogue *ep, tern_pool *pool);

/* The same product on the calling thread only, at level isa, for code already running inside a
 * pool task; scratch is that thread's TERN_POOL_SCRATCH_FLOATS floats (tern_pool_scratch), or
 * NULL to run the reference. */
void tern_gemm_thread(float *C, size_t ldc, const float *A, size_t lda, bool trans_a,
                      const float *B, size_t ldb, bool trans_b, size_t M, size_t N, size_t K,
                      bool accumulate, const tern_gemm_epilogue *ep, tern_isa isa,
                      float *scratch);

/* Plain triple loop, dot products summed in double: the test oracle. */
void tern_gemm_ref(float *C, size_t ldc, const float *A, size_t lda, bool trans_a,
                   const float *B, size_t ldb, bool trans_b, size_t M, size_t N, size_t K,
                   bool accumulate, const tern_gemm_epilogue *ep);

#endif
