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
 * (shape, ISA) always gives the same bits, whatever the thread count (unless the caller opts
 * into tern_gemm_fusion.k_split).
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

/* Neighbouring elementwise ops fused into a GEMM (tern_gemm_fused). A separate struct so that
 * positional initializers of tern_gemm_epilogue stay complete. */
typedef struct tern_gemm_fusion {
    /* (M x N, row stride ldc: the layout of C), added after the bias and before act, or NULL:
     * a residual connection fused into the store. Must not overlap C. */
    const float *residual;
    /* (K): row k of op(B) is multiplied by k_scale[k] (rounded to float) as B is packed, or
     * NULL. Equals scaling column k of op(A) up to rounding: a squeeze-and-excitation gate
     * fused into the projection after it (batch 1, where the gate is one vector). */
    const float *k_scale;
    /* B already packed by tern_gemm_pack_b for the pool's ISA (same B, ldb, trans_b, N, K), or
     * NULL. Saves the per-call packing of constant weights (with k_scale, a scaled copy
     * replaces it); ignored by the reference and small-M paths, which read B itself (so B
     * must still be given). */
    const float *packed_b;
    /* (parts, 2, N) doubles, or NULL: column statistics of the final C, taken as each tile is
     * stored (no extra pass over C). Part t (t < tern_pool_size(pool), 1 for a NULL pool) holds
     * thread t's sums of C(i, j) then of C(i, j)^2 over its rows, in increasing row order;
     * adding the parts in order gives results reproducible for a fixed thread count (not
     * across counts). Every part is written (zero where a thread had no rows). */
    double *col_stats;
    /* Allow splitting K across threads when C is small and K long (weight gradients: K is the
     * pixel count): partial products added in thread order. The result then depends on the
     * thread count (still reproducible for a given count), unlike every other path. */
    bool k_split;
} tern_gemm_fusion;

/* Floats tern_gemm_pack_b writes for an N x K op(B) at isa (N rounded up to the tile width). */
size_t tern_gemm_packed_b_size(size_t N, size_t K, tern_isa isa);
/* Packs op(B) (K x N; stored (N x K, ldb) with trans_b) into the layout the blocked kernels
 * read at isa: packed must be 64-byte aligned and hold tern_gemm_packed_b_size(N, K, isa)
 * floats. */
void tern_gemm_pack_b(float *packed, const float *B, size_t ldb, bool trans_b, size_t N,
                      size_t K, tern_isa isa);

/* Runs on the pool's threads at its ISA, packing into the pool's per-thread scratch. A NULL
 * pool (no scratch) runs tern_gemm_ref on the calling thread. ep may be NULL (no bias, no act).
 * Not to be called from inside a pool task (tern_pool_run is not reentrant): use
 * tern_gemm_thread there. */
void tern_gemm(float *C, size_t ldc, const float *A, size_t lda, bool trans_a, const float *B,
               size_t ldb, bool trans_b, size_t M, size_t N, size_t K, bool accumulate,
               const tern_gemm_epilogue *ep, tern_pool *pool);

/* tern_gemm with fused residual and/or K scaling (fusion may be NULL: plain tern_gemm). A NULL
 * pool runs tern_gemm_ref_fused. */
void tern_gemm_fused(float *C, size_t ldc, const float *A, size_t lda, bool trans_a,
                     const float *B, size_t ldb, bool trans_b, size_t M, size_t N, size_t K,
                     bool accumulate, const tern_gemm_epilogue *ep,
                     const tern_gemm_fusion *fusion, tern_pool *pool);

/* The same product on the calling thread only, at level isa, for code already running inside a
 * pool task; scratch is that thread's TERN_POOL_SCRATCH_FLOATS floats (tern_pool_scratch), or
 * NULL to run the reference. */
void tern_gemm_thread(float *C, size_t ldc, const float *A, size_t lda, bool trans_a,
                      const float *B, size_t ldb, bool trans_b, size_t M, size_t N, size_t K,
                      bool accumulate, const tern_gemm_epilogue *ep, tern_isa isa,
                      float *scratch);

/* s[j] += c(i, j), q[j] += c(i, j)^2 over rows x cols of c (row stride ldc), in double, row
 * by row; the same bits at every isa. The column statistics of col_stats, for other kernels
 * that produce a BatchNorm's input. */
void tern_col_stats(double *s, double *q, const float *c, size_t ldc, size_t rows,
                    size_t cols, tern_isa isa);

/* Plain triple loop, dot products summed in double: the test oracle. */
void tern_gemm_ref(float *C, size_t ldc, const float *A, size_t lda, bool trans_a,
                   const float *B, size_t ldb, bool trans_b, size_t M, size_t N, size_t K,
                   bool accumulate, const tern_gemm_epilogue *ep);
/* The oracle with fusion: B elements scaled (in float) before the double-precision sum, then
 * [C +] sum, + bias, + residual, act. */
void tern_gemm_ref_fused(float *C, size_t ldc, const float *A, size_t lda, bool trans_a,
                         const float *B, size_t ldb, bool trans_b, size_t M, size_t N, size_t K,
                         bool accumulate, const tern_gemm_epilogue *ep,
                         const tern_gemm_fusion *fusion);

#endif
