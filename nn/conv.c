/* Convolution and fully connected kernels (fp32, NHWC activations, torchvision weight layout).
 *
 * tern_conv2d_forward/backward pick one of four paths from the shape alone (conv_path_of):
 *   - GEMM:      1x1, stride 1, pad 0, groups 1. NHWC makes the input a (pixels, Cin) matrix,
 *                so the conv is one tern_gemm with bias and activation fused into its stores;
 *                the fully connected layer shares this code.
 *   - DEPTHWISE: groups == cin == cout: tern_dwconv_* (nn/dwconv.c), direct NHWC loops.
 *   - STEM:      3x3 stride 2 pad 1 with Cin <= 4 (the MobileNetV3 stem): tern_stemconv_*
 *                (nn/stemconv.c), direct NHWC kernels, measured faster than im2col + GEMM.
 *   - IM2COL:    any other groups == 1 conv (none in MobileNetV3 since the stem went direct).
 *                Pixels are gathered in tiles of IM2COL_TILE rows into the caller's workspace
 *                with column order (ky, kx, ci), so each kernel row is one contiguous NHWC run
 *                of k*Cin floats; the weights are permuted to that order (Cout, k, k, Cin) in
 *                the workspace once per call.
 *   - REF:       everything else (grouped convs with 1 < groups < cin) runs the reference loops.
 *
 * Threading: every task splits OUTPUTS with tern_split so no two threads write the same float
 * and each float's summation order is fixed for a given thread count. Whole-layer GEMMs go
 * through tern_gemm (which splits C itself); inside the im2col tasks each thread runs
 * tern_gemm_thread on its own tile with its own pool scratch. */
#include "kernels.h"

#include <string.h>

#include "gemm.h"
#include "util.h"

/* Rows (output pixels) gathered per im2col GEMM: enough rows to amortize packing the weights,
 * few enough that a tile of a stem conv (K = 27) stays in L1/L2. */
#define IM2COL_TILE 256

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

void tern_conv_params_finish(tern_conv_params *p)
{
    p->oh = (p->h + 2 * p->pad - p->k) / p->stride + 1;
    p->ow = (p->w + 2 * p->pad - p->k) / p->stride + 1;
}

typedef enum conv_path {
    CONV_PATH_GEMM,
    CONV_PATH_DEPTHWISE,
    CONV_PATH_STEM,
    CONV_PATH_IM2COL,
    CONV_PATH_REF,
} conv_path;

static size_t im2col_cols(const tern_conv_params *p)
{
    return (size_t)p->cin * (size_t)p->k * (size_t)p->k;
}

/* The one place the dispatch is decided, so workspace_size and the kernels always agree. */
static conv_path conv_path_of(const tern_conv_params *p)
{
    if (p->groups == 1 && p->k == 1 && p->stride == 1 && p->pad == 0)
        return CONV_PATH_GEMM;
    if (p->groups == p->cin && p->groups == p->cout && (size_t)p->k * (size_t)p->k <= TERN_DW_TAPS_MAX)
        return CONV_PATH_DEPTHWISE;
    if (tern_stemconv_supported(p))
        return CONV_PATH_STEM;
    if (p->groups == 1)
        return CONV_PATH_IM2COL;
    return CONV_PATH_REF;
}

/* im2col workspace: permuted weights (Cout, K), permuted weight gradient (Cout, K), then one
 * (IM2COL_TILE, K) tile per thread. SIZE_MAX if the size overflows: no allocation of that size
 * can succeed, so the caller's allocation check catches it. */
size_t tern_conv2d_workspace_size(const tern_conv_params *p, int nthreads)
{
    if (conv_path_of(p) == CONV_PATH_STEM)
        return tern_stemconv_workspace_size(p, nthreads);
    if (conv_path_of(p) != CONV_PATH_IM2COL)
        return 0;
    size_t weights, tiles, total;
    if (!tern_mul_size(im2col_cols(p), (size_t)p->cout * 2, &weights) ||
        !tern_mul_size(IM2COL_TILE * (size_t)(nthreads > 1 ? nthreads : 1), im2col_cols(p),
                       &tiles) ||
        !tern_add_size(weights, tiles, &total))
        return SIZE_MAX;
    return total;
}

/* ---- GEMM path: 1x1 convs and fully connected layers --------------------------------------- */

typedef struct colsum_task {
    float *db;
    const float *dy; /* (m, c) */
    size_t m, c;
} colsum_task;

/* db[j] += sum over rows of dy[r, j], split over channels; rows outer so the inner loop is
 * contiguous, and a fixed row order keeps the sum reproducible. */
static void colsum_task_fn(void *arg, int ith, int nth)
{
    const colsum_task *t = arg;
    size_t c0, c1;
    tern_split(t->c, ith, nth, &c0, &c1);
    for (size_t r = 0; r < t->m; r++) {
        const float *row = t->dy + r * t->c;
        for (size_t j = c0; j < c1; j++)
            t->db[j] += row[j];
    }
}

/* y (m, out) = act(x (m, in) w (out, in)^T + b) */
static void gemm_forward(float *y, const float *x, const float *w, const float *b, tern_act act,
                         size_t m, size_t in, size_t out, tern_pool *pool)
{
    tern_gemm_epilogue ep = {.bias = b, .act = act};
    tern_gemm(y, out, x, in, false, w, in, true, m, out, in, false, &ep, pool);
}

static void gemm_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                          const float *w, size_t m, size_t in, size_t out,
                          tern_grad_mode dx_mode, tern_pool *pool)
{
    if (dx) /* dX (m, in) [+]= dY (m, out) W (out, in) */
        tern_gemm(dx, in, dy, out, false, w, in, false, m, in, out, dx_mode == TERN_GRAD_ADD,
                  NULL, pool);
    if (dw) { /* dW (out, in) += dY^T (out, m) X (m, in), split along m if dW is small */
        const tern_gemm_fusion fu = {.k_split = true};
        tern_gemm_fused(dw, in, dy, out, true, x, in, false, out, in, m, true, NULL, &fu, pool);
    }
    if (db) {
        colsum_task t = {.db = db, .dy = dy, .m = m, .c = out};
        tern_pool_run(pool, colsum_task_fn, &t);
    }
}

void tern_linear_forward(float *y, const float *x, const float *w, const float *b, int n,
                         int in, int out, tern_pool *pool)
{
    gemm_forward(y, x, w, b, TERN_ACT_NONE, (size_t)n, (size_t)in, (size_t)out, pool);
}

void tern_linear_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                          const float *w, int n, int in, int out, tern_pool *pool)
{
    gemm_backward(dx, dw, db, dy, x, w, (size_t)n, (size_t)in, (size_t)out, TERN_GRAD_ADD,
                  pool);
}

void tern_linear_backward_mode(float *dx, float *dw, float *db, const float *dy, const float *x,
                               const float *w, int n, int in, int out, tern_grad_mode dx_mode,
                               tern_pool *pool)
{
    gemm_backward(dx, dw, db, dy, x, w, (size_t)n, (size_t)in, (size_t)out, dx_mode, pool);
}

/* ---- im2col (groups == 1, k > 1 or strided) -------------------------------------------------- */

typedef struct conv_task {
    float *y, *dx, *dw, *db;
    float *wperm, *dwperm, *tiles; /* views into the workspace */
    const float *x, *w, *b, *dy;
    tern_act act;
    const tern_conv_params *p;
    tern_pool *pool;
} conv_task;

/* Column j = (ky*k + kx)*Cin + ci of the im2col matrix is column (ci*k + ky)*k + kx of W. */
static size_t torch_col(const tern_conv_params *p, size_t j)
{
    const size_t cin = (size_t)p->cin, k = (size_t)p->k, tap = j / cin;
    return (j % cin * k + tap / k) * k + tap % k;
}

/* wperm (Cout, k, k, Cin) from w (Cout, Cin, k, k). */
static void permute_weights(float *wperm, const float *w, const tern_conv_params *p)
{
    const size_t K = im2col_cols(p);
    for (size_t co = 0; co < (size_t)p->cout; co++)
        for (size_t j = 0; j < K; j++)
            wperm[co * K + j] = w[co * K + torch_col(p, j)];
}

/* The im2col row of output pixel `pix` (index into N*OH*OW): for each ky, the k*Cin floats of
 * input row iy starting at pixel ix0, zero where the window leaves the image. */
static void im2col_row(float *col, const float *x /* (N, H, W, Cin) */,
                       const tern_conv_params *p, size_t pix)
{
    const size_t k = (size_t)p->k, cin = (size_t)p->cin, ohw = (size_t)p->oh * (size_t)p->ow;
    const size_t n = pix / ohw, oy = pix % ohw / (size_t)p->ow, ox = pix % (size_t)p->ow;
    const long ix0 = (long)ox * p->stride - p->pad;
    for (size_t ky = 0; ky < k; ky++) {
        float *dst = col + ky * k * cin;
        const long iy = (long)oy * p->stride - p->pad + (long)ky;
        if (iy < 0 || iy >= p->h) {
            memset(dst, 0, k * cin * sizeof *dst);
            continue;
        }
        const float *row = x + (n * (size_t)p->h + (size_t)iy) * (size_t)p->w * cin;
        if (ix0 >= 0 && ix0 + (long)k <= p->w) {
            memcpy(dst, row + (size_t)ix0 * cin, k * cin * sizeof *dst);
            continue;
        }
        for (size_t kx = 0; kx < k; kx++) {
            const long ix = ix0 + (long)kx;
            if (ix < 0 || ix >= p->w)
                memset(dst + kx * cin, 0, cin * sizeof *dst);
            else
                memcpy(dst + kx * cin, row + (size_t)ix * cin, cin * sizeof *dst);
        }
    }
}

/* dx += col2im of one row of column gradients (the adjoint of im2col_row). */
static void col2im_row_add(float *dx /* (N, H, W, Cin) */, const float *dcol /* (k*k*Cin) */,
                           const tern_conv_params *p, size_t pix)
{
    const size_t k = (size_t)p->k, cin = (size_t)p->cin;
    const size_t ohw = (size_t)p->oh * (size_t)p->ow;
    const size_t n = pix / ohw, oy = pix % ohw / (size_t)p->ow, ox = pix % (size_t)p->ow;
    for (size_t ky = 0; ky < k; ky++) {
        const long iy = (long)oy * p->stride - p->pad + (long)ky;
        if (iy < 0 || iy >= p->h)
            continue;
        for (size_t kx = 0; kx < k; kx++) {
            const long ix = (long)ox * p->stride - p->pad + (long)kx;
            if (ix < 0 || ix >= p->w)
                continue;
            float *dxp = dx + ((n * (size_t)p->h + (size_t)iy) * (size_t)p->w + (size_t)ix) * cin;
            const float *src = dcol + (ky * k + kx) * cin;
            for (size_t ci = 0; ci < cin; ci++)
                dxp[ci] += src[ci];
        }
    }
}

/* Each thread owns a range of output pixels and one (IM2COL_TILE, K) tile of the workspace. */
static void im2col_forward_task(void *arg, int ith, int nth)
{
    const conv_task *a = arg;
    const tern_conv_params *p = a->p;
    const size_t K = im2col_cols(p), cout = (size_t)p->cout;
    float *cols = a->tiles + (size_t)ith * IM2COL_TILE * K; /* (IM2COL_TILE, K) */
    const tern_gemm_epilogue ep = {.bias = a->b, .act = a->act};
    size_t r0, r1;
    tern_split((size_t)p->n * (size_t)p->oh * (size_t)p->ow, ith, nth, &r0, &r1);
    for (size_t r = r0; r < r1; r += IM2COL_TILE) {
        const size_t rows = min_size(IM2COL_TILE, r1 - r);
        for (size_t i = 0; i < rows; i++)
            im2col_row(cols + i * K, a->x, p, r + i);
        /* Y (rows, Cout) = act(cols (rows, K) Wperm (Cout, K)^T + b) */
        tern_gemm_thread(a->y + r * cout, cout, cols, K, false, a->wperm, K, true, rows, cout, K,
                         false, &ep, tern_pool_isa(a->pool), tern_pool_scratch(a->pool, ith));
    }
}

/* Three independent splits, each over outputs that nobody else writes:
 *   dx: by image, because col2im of neighbouring output pixels overlaps in the input;
 *   dw: by columns of dWperm (Cout, K) (each thread gathers whole tiles, multiplies only its
 *       own columns, then adds them to dw in torchvision's order);
 *   db: by output channel. */
static void im2col_backward_task(void *arg, int ith, int nth)
{
    const conv_task *a = arg;
    const tern_conv_params *p = a->p;
    const size_t K = im2col_cols(p), cout = (size_t)p->cout;
    const size_t ohw = (size_t)p->oh * (size_t)p->ow, m = (size_t)p->n * ohw;
    float *buf = a->tiles + (size_t)ith * IM2COL_TILE * K; /* (IM2COL_TILE, K) */
    float *scratch = tern_pool_scratch(a->pool, ith);
    const tern_isa isa = tern_pool_isa(a->pool);
    if (a->dx) {
        size_t n0, n1;
        tern_split((size_t)p->n, ith, nth, &n0, &n1);
        for (size_t r = n0 * ohw; r < n1 * ohw; r += IM2COL_TILE) {
            const size_t rows = min_size(IM2COL_TILE, n1 * ohw - r);
            /* dcols (rows, K) = dY (rows, Cout) Wperm (Cout, K) */
            tern_gemm_thread(buf, K, a->dy + r * cout, cout, false, a->wperm, K, false, rows, K,
                             cout, false, NULL, isa, scratch);
            for (size_t i = 0; i < rows; i++)
                col2im_row_add(a->dx, buf + i * K, p, r + i);
        }
    }
    if (a->dw) {
        size_t j0, j1;
        tern_split(K, ith, nth, &j0, &j1);
        const size_t nj = j1 - j0;
        for (size_t r = 0; nj > 0 && r < m; r += IM2COL_TILE) {
            const size_t rows = min_size(IM2COL_TILE, m - r);
            for (size_t i = 0; i < rows; i++)
                im2col_row(buf + i * K, a->x, p, r + i);
            /* dWperm[:, j0:j1] (Cout, nj) (+)= dY^T (Cout, rows) cols[:, j0:j1] (rows, nj) */
            tern_gemm_thread(a->dwperm + j0, K, a->dy + r * cout, cout, true, buf + j0, K, false,
                             cout, nj, rows, r > 0, NULL, isa, scratch);
        }
        for (size_t co = 0; co < cout; co++)
            for (size_t j = j0; j < j1; j++)
                a->dw[co * K + torch_col(p, j)] += m > 0 ? a->dwperm[co * K + j] : 0;
    }
    if (a->db) {
        size_t c0, c1;
        tern_split(cout, ith, nth, &c0, &c1);
        for (size_t r = 0; r < m; r++)
            for (size_t j = c0; j < c1; j++)
                a->db[j] += a->dy[r * cout + j];
    }
}

static conv_task im2col_task(float *workspace, const float *w, const tern_conv_params *p,
                             tern_pool *pool)
{
    const size_t wsize = im2col_cols(p) * (size_t)p->cout;
    conv_task t = {.wperm = workspace, .dwperm = workspace + wsize,
                   .tiles = workspace + 2 * wsize, .w = w, .p = p, .pool = pool};
    permute_weights(t.wperm, w, p);
    return t;
}

/* ---- dispatch -------------------------------------------------------------------------------- */

/* workspace: at least tern_conv2d_workspace_size(p, tern_pool_size(pool)) floats; only the
 * im2col path and the stem backward (dW partials) use it; may be NULL otherwise. Passing less is a caller bug (not checked).
 * With a NULL pool (no GEMM scratch) the GEMMs run tern_gemm_ref. */
void tern_conv2d_forward(float *y, float *workspace, const float *x, const float *w,
                         const float *b, tern_act act, const tern_conv_params *p, tern_pool *pool)
{
    switch (conv_path_of(p)) {
    case CONV_PATH_GEMM:
        gemm_forward(y, x, w, b, act, (size_t)p->n * (size_t)p->h * (size_t)p->w,
                     (size_t)p->cin, (size_t)p->cout, pool);
        return;
    case CONV_PATH_DEPTHWISE: tern_dwconv_forward(y, x, w, b, act, p, pool); return;
    case CONV_PATH_STEM: tern_stemconv_forward(y, x, w, b, act, p, pool); return;
    case CONV_PATH_IM2COL: {
        conv_task t = im2col_task(workspace, w, p, pool);
        t.y = y;
        t.x = x;
        t.b = b;
        t.act = act;
        tern_pool_run(pool, im2col_forward_task, &t);
        return;
    }
    case CONV_PATH_REF:
        tern_conv2d_forward_ref(y, x, w, b, p);
        if (act != TERN_ACT_NONE)
            tern_act_forward(y, y,
                             (size_t)p->n * (size_t)p->oh * (size_t)p->ow * (size_t)p->cout, act,
                             pool);
        return;
    }
}

bool tern_conv2d_has_stats(const tern_conv_params *p)
{
    return conv_path_of(p) == CONV_PATH_GEMM || conv_path_of(p) == CONV_PATH_DEPTHWISE;
}

void tern_conv2d_forward_stats(float *y, double *stats, const float *x, const float *w,
                               const tern_conv_params *p, tern_pool *pool)
{
    if (conv_path_of(p) == CONV_PATH_DEPTHWISE) {
        tern_dwconv_forward_stats(y, stats, x, w, NULL, TERN_ACT_NONE, p, pool);
        return;
    }
    const size_t m = (size_t)p->n * (size_t)p->h * (size_t)p->w;
    const tern_gemm_fusion fu = {.col_stats = stats};
    tern_gemm_fused(y, (size_t)p->cout, x, (size_t)p->cin, false, w, (size_t)p->cin, true, m,
                    (size_t)p->cout, (size_t)p->cin, false, NULL, &fu, pool);
}

void tern_conv2d_backward(float *dx, float *dw, float *db, float *workspace, const float *dy,
                          const float *x, const float *w, const tern_conv_params *p,
                          tern_pool *pool)
{
    tern_conv2d_backward_mode(dx, dw, db, workspace, dy, x, w, p, TERN_GRAD_ADD, pool);
}

void tern_conv2d_backward_mode(float *dx, float *dw, float *db, float *workspace,
                               const float *dy, const float *x, const float *w,
                               const tern_conv_params *p, tern_grad_mode dx_mode,
                               tern_pool *pool)
{
    if (!dx && !dw && !db)
        return;
    const conv_path path = conv_path_of(p);
    if (dx && dx_mode == TERN_GRAD_SET && path != CONV_PATH_GEMM && path != CONV_PATH_DEPTHWISE)
        memset(dx, 0, (size_t)p->n * (size_t)p->h * (size_t)p->w * (size_t)p->cin * sizeof *dx);
    switch (path) {
    case CONV_PATH_GEMM:
        gemm_backward(dx, dw, db, dy, x, w, (size_t)p->n * (size_t)p->h * (size_t)p->w,
                      (size_t)p->cin, (size_t)p->cout, dx_mode, pool);
        return;
    case CONV_PATH_DEPTHWISE:
        tern_dwconv_backward_mode(dx, dw, db, dy, x, w, p, dx_mode, pool);
        return;
    case CONV_PATH_STEM:
        tern_stemconv_backward(dx, dw, db, workspace, dy, x, w, p, pool);
        return;
    case CONV_PATH_IM2COL: {
        conv_task t = im2col_task(workspace, w, p, pool);
        t.dx = dx;
        t.dw = dw;
        t.db = db;
        t.dy = dy;
        t.x = x;
        tern_pool_run(pool, im2col_backward_task, &t);
        return;
    }
    case CONV_PATH_REF: tern_conv2d_backward_ref(dx, dw, db, dy, x, w, p); return;
    }
}

/* ---- reference ------------------------------------------------------------------------------- */

/* Sums in double so the oracle is at least as accurate as anything it checks. */
void tern_conv2d_forward_ref(float *y, const float *x, const float *w, const float *b,
                             const tern_conv_params *p)
{
    const size_t cig = (size_t)(p->cin / p->groups), cog = (size_t)(p->cout / p->groups);
    const size_t k = (size_t)p->k;
    for (size_t n = 0; n < (size_t)p->n; n++)
        for (size_t oy = 0; oy < (size_t)p->oh; oy++)
            for (size_t ox = 0; ox < (size_t)p->ow; ox++)
                for (size_t co = 0; co < (size_t)p->cout; co++) {
                    const size_t g = co / cog;
                    double acc = b ? b[co] : 0.0;
                    for (size_t cl = 0; cl < cig; cl++)
                        for (size_t ky = 0; ky < k; ky++)
                            for (size_t kx = 0; kx < k; kx++) {
                                const long iy = (long)oy * p->stride - p->pad + (long)ky;
                                const long ix = (long)ox * p->stride - p->pad + (long)kx;
                                if (iy < 0 || iy >= p->h || ix < 0 || ix >= p->w)
                                    continue;
                                const size_t xi = ((n * (size_t)p->h + (size_t)iy) *
                                                       (size_t)p->w + (size_t)ix) *
                                                      (size_t)p->cin + g * cig + cl;
                                const size_t wi = ((co * cig + cl) * k + ky) * k + kx;
                                acc += (double)x[xi] * w[wi];
                            }
                    y[((n * (size_t)p->oh + oy) * (size_t)p->ow + ox) * (size_t)p->cout + co] =
                        (float)acc;
                }
}

/* The same loops as the forward, each product's contribution scattered back to its inputs. */
void tern_conv2d_backward_ref(float *dx, float *dw, float *db, const float *dy, const float *x,
                              const float *w, const tern_conv_params *p)
{
    const size_t cig = (size_t)(p->cin / p->groups), cog = (size_t)(p->cout / p->groups);
    const size_t k = (size_t)p->k;
    for (size_t n = 0; n < (size_t)p->n; n++)
        for (size_t oy = 0; oy < (size_t)p->oh; oy++)
            for (size_t ox = 0; ox < (size_t)p->ow; ox++)
                for (size_t co = 0; co < (size_t)p->cout; co++) {
                    const size_t g = co / cog;
                    const float d = dy[((n * (size_t)p->oh + oy) * (size_t)p->ow + ox) *
                                           (size_t)p->cout + co];
                    if (db)
                        db[co] += d;
                    for (size_t cl = 0; cl < cig; cl++)
                        for (size_t ky = 0; ky < k; ky++)
                            for (size_t kx = 0; kx < k; kx++) {
                                const long iy = (long)oy * p->stride - p->pad + (long)ky;
                                const long ix = (long)ox * p->stride - p->pad + (long)kx;
                                if (iy < 0 || iy >= p->h || ix < 0 || ix >= p->w)
                                    continue;
                                const size_t xi = ((n * (size_t)p->h + (size_t)iy) *
                                                       (size_t)p->w + (size_t)ix) *
                                                      (size_t)p->cin + g * cig + cl;
                                const size_t wi = ((co * cig + cl) * k + ky) * k + kx;
                                if (dx)
                                    dx[xi] += d * w[wi];
                                if (dw)
                                    dw[wi] += d * x[xi];
                            }
                }
}
