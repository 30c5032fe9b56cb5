/* Convolution and fully connected kernels (fp32, NHWC activations, torchvision weight layout).
 *
 * tern_conv2d_forward/backward pick one of four paths from the shape alone (conv_path_of):
 *   - GEMM:      1x1, stride 1, pad 0, groups 1. NHWC makes the input a (pixels, Cin) matrix,
 *                so the conv is one sgemm; the fully connected layer shares this code.
 *   - DEPTHWISE: groups == cin == cout. Direct loops whose innermost loop runs over a block of
 *                contiguous channels (vectorizable), weights transposed to (k*k, block) on the
 *                stack. No im2col: per-channel GEMMs would have m = 1.
 *   - IM2COL:    any other groups == 1 conv (in MobileNetV3 only the 3x3 stride-2 stem).
 *                Pixels are gathered in tiles of IM2COL_TILE rows into the caller's workspace,
 *                column order (ci, ky, kx) so W (Cout, Cin*k*k) is the GEMM operand as stored.
 *   - REF:       everything else (grouped convs with 1 < groups < cin) runs the reference loops.
 *
 * Threading: every task splits OUTPUTS with tern_split so no two threads write the same float
 * and each float's summation order is fixed for a given thread count. OpenBLAS is assumed to be
 * single-threaded (the model sets it); each thread calls sgemm on its own slice.
 *
 * Sizes: element offsets are computed in size_t. BLAS takes int dimensions; row counts are
 * chunked to INT_MAX, and the column dimension of an im2col matrix (Cin*k*k) must fit an int
 * or the conv falls back to the reference path. */
#include "kernels.h"

#include <cblas.h>
#include <limits.h>
#include <string.h>

#include "util.h"

/* Rows (output pixels) gathered per im2col GEMM: big enough for sgemm to reach speed, small
 * enough that a tile of a stem conv (K = 27) stays in L1/L2. */
#define IM2COL_TILE 128
#define GEMM_ROWS_MAX ((size_t)INT_MAX)

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

void tern_conv_params_finish(tern_conv_params *p)
{
    p->oh = (p->h + 2 * p->pad - p->k) / p->stride + 1;
    p->ow = (p->w + 2 * p->pad - p->k) / p->stride + 1;
}

typedef enum conv_path {
    CONV_PATH_GEMM,
    CONV_PATH_DEPTHWISE,
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
    if (p->groups == 1 && im2col_cols(p) <= (size_t)INT_MAX)
        return CONV_PATH_IM2COL;
    return CONV_PATH_REF;
}

/* SIZE_MAX if the product overflows: no allocation of that size can succeed, so the caller's
 * allocation check catches it. */
size_t tern_conv2d_workspace_size(const tern_conv_params *p, int nthreads)
{
    if (conv_path_of(p) != CONV_PATH_IM2COL)
        return 0;
    size_t per_thread, total;
    if (!tern_mul_size(IM2COL_TILE, im2col_cols(p), &per_thread) ||
        !tern_mul_size(per_thread, (size_t)(nthreads > 1 ? nthreads : 1), &total))
        return SIZE_MAX;
    return total;
}

/* ---- GEMM path: 1x1 convs and fully connected layers --------------------------------------- */

typedef struct gemm_task {
    float *y, *dx, *dw, *db;
    const float *x, *w, *b, *dy;
    size_t m; /* rows: pixels (N*H*W) or batch */
    int in, out;
} gemm_task;

/* db[c] += sum over rows of dy[r, c] for c in [c0, c1); rows outer so the inner loop is
 * contiguous, and a fixed row order keeps the sum reproducible. */
static void add_column_sums(float *db, const float *dy /* (m, c) */, size_t m, size_t c,
                            size_t c0, size_t c1)
{
    for (size_t r = 0; r < m; r++) {
        const float *row = dy + r * c;
        for (size_t j = c0; j < c1; j++)
            db[j] += row[j];
    }
}

static void add_bias_rows(float *y /* (rows, c) */, const float *b, size_t rows, size_t c)
{
    for (size_t r = 0; r < rows; r++)
        for (size_t j = 0; j < c; j++)
            y[r * c + j] += b[j];
}

static void gemm_forward_task(void *arg, int ith, int nth)
{
    const gemm_task *t = arg;
    size_t r0, r1;
    tern_split(t->m, ith, nth, &r0, &r1);
    for (size_t r = r0; r < r1; r += GEMM_ROWS_MAX) {
        size_t rows = min_size(GEMM_ROWS_MAX, r1 - r);
        /* Y (rows, out) = X (rows, in) * W (out, in)^T */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, t->out, t->in, 1.0f,
                    t->x + r * (size_t)t->in, t->in, t->w, t->in, 0.0f,
                    t->y + r * (size_t)t->out, t->out);
        if (t->b)
            add_bias_rows(t->y + r * (size_t)t->out, t->b, rows, (size_t)t->out);
    }
}

static void gemm_backward_task(void *arg, int ith, int nth)
{
    const gemm_task *t = arg;
    size_t in = (size_t)t->in, out = (size_t)t->out;
    if (t->dx) { /* dX (m, in) += dY (m, out) * W (out, in), split over rows */
        size_t r0, r1;
        tern_split(t->m, ith, nth, &r0, &r1);
        for (size_t r = r0; r < r1; r += GEMM_ROWS_MAX) {
            size_t rows = min_size(GEMM_ROWS_MAX, r1 - r);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, t->in, t->out,
                        1.0f, t->dy + r * out, t->out, t->w, t->in, 1.0f, t->dx + r * in, t->in);
        }
    }
    size_t c0, c1; /* dW and db are split over output channels */
    tern_split(out, ith, nth, &c0, &c1);
    if (c0 == c1)
        return;
    if (t->dw) { /* dW (out, in) += dY^T (out, m) * X (m, in) */
        for (size_t r = 0; r < t->m; r += GEMM_ROWS_MAX) {
            size_t rows = min_size(GEMM_ROWS_MAX, t->m - r);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)(c1 - c0), t->in,
                        (int)rows, 1.0f, t->dy + r * out + c0, t->out, t->x + r * in, t->in,
                        1.0f, t->dw + c0 * in, t->in);
        }
    }
    if (t->db)
        add_column_sums(t->db, t->dy, t->m, out, c0, c1);
}

void tern_linear_forward(float *y, const float *x, const float *w, const float *b, int n,
                         int in, int out, tern_pool *pool)
{
    gemm_task t = {.y = y, .x = x, .w = w, .b = b, .m = (size_t)n, .in = in, .out = out};
    tern_pool_run(pool, gemm_forward_task, &t);
}

void tern_linear_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                          const float *w, int n, int in, int out, tern_pool *pool)
{
    gemm_task t = {.dx = dx, .dw = dw, .db = db, .dy = dy, .x = x, .w = w, .m = (size_t)n,
                   .in = in, .out = out};
    tern_pool_run(pool, gemm_backward_task, &t);
}

/* ---- shared task arguments for the spatial paths ------------------------------------------- */

typedef struct conv_task {
    float *y, *dx, *dw, *db, *ws;
    const float *x, *w, *b, *dy;
    const tern_conv_params *p;
} conv_task;

/* ---- im2col (groups == 1, k > 1 or strided) -------------------------------------------------- */

/* Columns [j0, j1) of the im2col row of output pixel `pix` (index into N*OH*OW), written to
 * col[0 .. j1-j0). Column j = (ci*k + ky)*k + kx matches W's (Cout, Cin, k, k) layout. */
static void im2col_row(float *col, const float *x /* (N, H, W, Cin) */,
                       const tern_conv_params *p, size_t pix, size_t j0, size_t j1)
{
    const size_t k = (size_t)p->k, taps = k * k, ohw = (size_t)p->oh * (size_t)p->ow;
    const size_t n = pix / ohw, oy = pix % ohw / (size_t)p->ow, ox = pix % (size_t)p->ow;
    for (size_t j = j0; j < j1; j++) {
        const size_t ci = j / taps, ky = j % taps / k, kx = j % k;
        const long iy = (long)oy * p->stride - p->pad + (long)ky;
        const long ix = (long)ox * p->stride - p->pad + (long)kx;
        col[j - j0] = iy < 0 || iy >= p->h || ix < 0 || ix >= p->w
                          ? 0.0f
                          : x[((n * (size_t)p->h + (size_t)iy) * (size_t)p->w + (size_t)ix) *
                                  (size_t)p->cin + ci];
    }
}

/* dx += col2im of one row of column gradients (the adjoint of im2col_row over all columns). */
static void col2im_row_add(float *dx /* (N, H, W, Cin) */, const float *dcol /* (Cin*k*k) */,
                           const tern_conv_params *p, size_t pix)
{
    const size_t k = (size_t)p->k, taps = k * k, cin = (size_t)p->cin;
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
            for (size_t ci = 0; ci < cin; ci++)
                dxp[ci] += dcol[ci * taps + ky * k + kx];
        }
    }
}

/* Each thread owns a range of output pixels and a (IM2COL_TILE, K) slice of the workspace. */
static void im2col_forward_task(void *arg, int ith, int nth)
{
    const conv_task *a = arg;
    const tern_conv_params *p = a->p;
    const size_t K = im2col_cols(p), cout = (size_t)p->cout;
    float *cols = a->ws + (size_t)ith * IM2COL_TILE * K; /* (IM2COL_TILE, K) */
    size_t r0, r1;
    tern_split((size_t)p->n * (size_t)p->oh * (size_t)p->ow, ith, nth, &r0, &r1);
    for (size_t r = r0; r < r1; r += IM2COL_TILE) {
        const size_t rows = min_size(IM2COL_TILE, r1 - r);
        for (size_t i = 0; i < rows; i++)
            im2col_row(cols + i * K, a->x, p, r + i, 0, K);
        /* Y (rows, Cout) = cols (rows, K) * W (Cout, K)^T */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, p->cout, (int)K, 1.0f,
                    cols, (int)K, a->w, (int)K, 0.0f, a->y + r * cout, p->cout);
        if (a->b)
            add_bias_rows(a->y + r * cout, a->b, rows, cout);
    }
}

/* Three independent splits, each over outputs that nobody else writes:
 *   dx: by image, because col2im of neighbouring output pixels overlaps in the input;
 *   dw: by columns of dW (Cout, K), so each thread gathers only its own im2col columns;
 *   db: by output channel. */
static void im2col_backward_task(void *arg, int ith, int nth)
{
    const conv_task *a = arg;
    const tern_conv_params *p = a->p;
    const size_t K = im2col_cols(p), cout = (size_t)p->cout;
    const size_t ohw = (size_t)p->oh * (size_t)p->ow, m = (size_t)p->n * ohw;
    float *buf = a->ws + (size_t)ith * IM2COL_TILE * K; /* (IM2COL_TILE, K) */
    if (a->dx) {
        size_t n0, n1;
        tern_split((size_t)p->n, ith, nth, &n0, &n1);
        for (size_t r = n0 * ohw; r < n1 * ohw; r += IM2COL_TILE) {
            const size_t rows = min_size(IM2COL_TILE, n1 * ohw - r);
            /* dcols (rows, K) = dY (rows, Cout) * W (Cout, K) */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)K, p->cout,
                        1.0f, a->dy + r * cout, p->cout, a->w, (int)K, 0.0f, buf, (int)K);
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
                im2col_row(buf + i * nj, a->x, p, r + i, j0, j1);
            /* dW[:, j0:j1] (Cout, nj) += dY^T (Cout, rows) * cols (rows, nj) */
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, p->cout, (int)nj, (int)rows,
                        1.0f, a->dy + r * cout, p->cout, buf, (int)nj, 1.0f, a->dw + j0, (int)K);
        }
    }
    if (a->db) {
        size_t c0, c1;
        tern_split(cout, ith, nth, &c0, &c1);
        add_column_sums(a->db, a->dy, m, cout, c0, c1);
    }
}

/* ---- dispatch -------------------------------------------------------------------------------- */

/* workspace: at least tern_conv2d_workspace_size(p, tern_pool_size(pool)) floats; only the
 * im2col path reads it, and may be NULL otherwise. Passing less is a caller bug (not checked). */
void tern_conv2d_forward(float *y, float *workspace, const float *x, const float *w,
                         const float *b, tern_act act, const tern_conv_params *p, tern_pool *pool)
{
    conv_task t = {.y = y, .ws = workspace, .x = x, .w = w, .b = b, .p = p};
    switch (conv_path_of(p)) {
    case CONV_PATH_GEMM: {
        /* Not via tern_linear_forward: N*H*W may exceed an int, the linear API's row type. */
        gemm_task g = {.y = y, .x = x, .w = w, .b = b,
                       .m = (size_t)p->n * (size_t)p->h * (size_t)p->w, .in = p->cin,
                       .out = p->cout};
        tern_pool_run(pool, gemm_forward_task, &g);
        break;
    }
    case CONV_PATH_DEPTHWISE: tern_dwconv_forward(y, x, w, b, act, p, pool); return;
    case CONV_PATH_IM2COL: tern_pool_run(pool, im2col_forward_task, &t); break;
    case CONV_PATH_REF: tern_conv2d_forward_ref(y, x, w, b, p); break;
    }
    if (act != TERN_ACT_NONE)
        tern_act_forward(y, y, (size_t)p->n * (size_t)p->oh * (size_t)p->ow * (size_t)p->cout,
                         act, pool);
}

void tern_conv2d_backward(float *dx, float *dw, float *db, float *workspace, const float *dy,
                          const float *x, const float *w, const tern_conv_params *p,
                          tern_pool *pool)
{
    if (!dx && !dw && !db)
        return;
    conv_task t = {.dx = dx, .dw = dw, .db = db, .ws = workspace, .dy = dy, .x = x, .w = w,
                   .p = p};
    switch (conv_path_of(p)) {
    case CONV_PATH_GEMM: {
        gemm_task g = {.dx = dx, .dw = dw, .db = db, .dy = dy, .x = x, .w = w,
                       .m = (size_t)p->n * (size_t)p->h * (size_t)p->w, .in = p->cin,
                       .out = p->cout};
        tern_pool_run(pool, gemm_backward_task, &g);
        return;
    }
    case CONV_PATH_DEPTHWISE: tern_dwconv_backward(dx, dw, db, dy, x, w, p, pool); return;
    case CONV_PATH_IM2COL: tern_pool_run(pool, im2col_backward_task, &t); return;
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
