/* Depthwise convolution (groups == cin == cout), direct NHWC loops.
 *
 * The innermost loop runs over a block of contiguous channels, which is what NHWC gives a
 * depthwise conv: each tap is an elementwise multiply-add of a row of channels. Weights are
 * transposed on the stack to (k*k, block) so a tap's weights are contiguous too. No im2col:
 * per-channel GEMMs would have m = 1.
 *
 * Threading: forward splits output rows (n, oy); backward splits channels, since dx, dw and db
 * of a channel depend on that channel alone. No two threads write the same float. */
#include "kernels.h"

#include <string.h>

#include "util.h"

/* Channels per block; the stack holds (k*k, block) weights and, in backward, their gradient. */
#define DW_BLOCK 64
/* Backward splits channels across threads in units of this many floats (one cache line), so
 * threads never share a line of dx/dw and blocks stay vector-sized. */
#define DW_UNIT 16

typedef struct dw_task {
    float *y, *dx, *dw, *db;
    const float *x, *w, *b, *dy;
    tern_act act;
    const tern_conv_params *p;
} dw_task;

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

/* wt (taps, cb) = w[c0 .. c0+cb) (C, 1, k, k) transposed, so a tap's weights are contiguous
 * across channels like the activations they multiply. */
static void dw_transpose_weights(float *wt, const float *w, size_t c0, size_t cb, size_t taps)
{
    for (size_t c = 0; c < cb; c++)
        for (size_t t = 0; t < taps; t++)
            wt[t * cb + c] = w[(c0 + c) * taps + t];
}

/* Each thread owns a range of output rows (n, oy); within it, blocks of channels. */
static void dw_forward_task(void *arg, int ith, int nth)
{
    const dw_task *a = arg;
    const tern_conv_params *p = a->p;
    const size_t C = (size_t)p->cin, k = (size_t)p->k, taps = k * k;
    const size_t H = (size_t)p->h, W = (size_t)p->w, OH = (size_t)p->oh, OW = (size_t)p->ow;
    float wt[TERN_DW_TAPS_MAX * DW_BLOCK];
    size_t r0, r1;
    tern_split((size_t)p->n * OH, ith, nth, &r0, &r1);
    if (r0 == r1)
        return;
    for (size_t c0 = 0; c0 < C; c0 += DW_BLOCK) {
        const size_t cb = min_size(DW_BLOCK, C - c0);
        dw_transpose_weights(wt, a->w, c0, cb, taps);
        for (size_t r = r0; r < r1; r++) {
            const size_t n = r / OH;
            const long oy = (long)(r % OH);
            for (size_t ox = 0; ox < OW; ox++) {
                float *restrict yp = a->y + (r * OW + ox) * C + c0; /* (cb) */
                if (a->b)
                    memcpy(yp, a->b + c0, cb * sizeof *yp);
                else
                    memset(yp, 0, cb * sizeof *yp);
                for (size_t ky = 0; ky < k; ky++) {
                    const long iy = oy * p->stride - p->pad + (long)ky;
                    if (iy < 0 || iy >= (long)H)
                        continue;
                    for (size_t kx = 0; kx < k; kx++) {
                        const long ix = (long)ox * p->stride - p->pad + (long)kx;
                        if (ix < 0 || ix >= (long)W)
                            continue;
                        const float *restrict xp =
                            a->x + ((n * H + (size_t)iy) * W + (size_t)ix) * C + c0;
                        const float *restrict wp = wt + (ky * k + kx) * cb;
                        for (size_t c = 0; c < cb; c++)
                            yp[c] += xp[c] * wp[c];
                    }
                }
            }
        }
    }
}

/* Each thread owns a range of channels: dx, dw and db of a channel depend only on that
 * channel, so the split needs neither locks nor a reduction. */
static void dw_backward_task(void *arg, int ith, int nth)
{
    const dw_task *a = arg;
    const tern_conv_params *p = a->p;
    const size_t C = (size_t)p->cin, k = (size_t)p->k, taps = k * k;
    const size_t H = (size_t)p->h, W = (size_t)p->w, OH = (size_t)p->oh, OW = (size_t)p->ow;
    const size_t N = (size_t)p->n;
    float wt[TERN_DW_TAPS_MAX * DW_BLOCK], dwt[TERN_DW_TAPS_MAX * DW_BLOCK], dbt[DW_BLOCK];
    size_t u0, u1;
    tern_split((C + DW_UNIT - 1) / DW_UNIT, ith, nth, &u0, &u1);
    const size_t cbeg = u0 * DW_UNIT, cend = min_size(u1 * DW_UNIT, C);
    for (size_t c0 = cbeg; c0 < cend; c0 += DW_BLOCK) {
        const size_t cb = min_size(DW_BLOCK, cend - c0);
        if (a->dx)
            dw_transpose_weights(wt, a->w, c0, cb, taps);
        memset(dwt, 0, taps * cb * sizeof *dwt);
        memset(dbt, 0, cb * sizeof *dbt);
        for (size_t n = 0; n < N; n++)
            for (size_t oy = 0; oy < OH; oy++)
                for (size_t ox = 0; ox < OW; ox++) {
                    const float *restrict dyp = a->dy + ((n * OH + oy) * OW + ox) * C + c0;
                    for (size_t c = 0; c < cb; c++)
                        dbt[c] += dyp[c];
                    for (size_t ky = 0; ky < k; ky++) {
                        const long iy = (long)oy * p->stride - p->pad + (long)ky;
                        if (iy < 0 || iy >= (long)H)
                            continue;
                        for (size_t kx = 0; kx < k; kx++) {
                            const long ix = (long)ox * p->stride - p->pad + (long)kx;
                            if (ix < 0 || ix >= (long)W)
                                continue;
                            const size_t off =
                                ((n * H + (size_t)iy) * W + (size_t)ix) * C + c0;
                            const size_t tap = (ky * k + kx) * cb;
                            if (a->dx) {
                                float *restrict dxp = a->dx + off;
                                const float *restrict wp = wt + tap;
                                for (size_t c = 0; c < cb; c++)
                                    dxp[c] += dyp[c] * wp[c];
                            }
                            if (a->dw) {
                                float *restrict dwp = dwt + tap;
                                const float *restrict xp = a->x + off;
                                for (size_t c = 0; c < cb; c++)
                                    dwp[c] += dyp[c] * xp[c];
                            }
                        }
                    }
                }
        if (a->dw)
            for (size_t c = 0; c < cb; c++)
                for (size_t t = 0; t < taps; t++)
                    a->dw[(c0 + c) * taps + t] += dwt[t * cb + c];
        if (a->db)
            for (size_t c = 0; c < cb; c++)
                a->db[c0 + c] += dbt[c];
    }
}

void tern_dwconv_forward(float *y, const float *x, const float *w, const float *b, tern_act act,
                         const tern_conv_params *p, tern_pool *pool)
{
    dw_task t = {.y = y, .x = x, .w = w, .b = b, .act = act, .p = p};
    tern_pool_run(pool, dw_forward_task, &t);
    if (act != TERN_ACT_NONE)
        tern_act_forward(y, y, (size_t)p->n * (size_t)p->oh * (size_t)p->ow * (size_t)p->cout,
                         act, pool);
}

void tern_dwconv_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                          const float *w, const tern_conv_params *p, tern_pool *pool)
{
    if (!dx && !dw && !db)
        return;
    dw_task t = {.dx = dx, .dw = dw, .db = db, .dy = dy, .x = x, .w = w, .p = p};
    tern_pool_run(pool, dw_backward_task, &t);
}
