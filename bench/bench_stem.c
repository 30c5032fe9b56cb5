/* bench_stem: the MobileNetV3 stem convolution (3x3, stride 2, pad 1) through the direct NHWC
 * kernels of nn/stemconv.c (what tern_conv2d_* dispatch to) against im2col + GEMM (the path
 * they replaced, reproduced here with the same tiles and tern_gemm_thread calls), in one run.
 *
 * Shapes: 224x224x3 -> 16 at batch 1 and 32 (ImageNet inference and training), 32x32x1 -> 16
 * at batch 128 (Fashion-MNIST training). Per shape and kernel level: forward (bias + hardswish
 * fused, as folded inference runs it), backward dW only (what training runs: the network input
 * needs no gradient and BatchNorm follows, so no db) and full backward (dx, dW, db). Best of
 * --reps repeats, each repeated until it lasts --min-ms. Prints one JSON object per line with
 * milliseconds and direct/im2col speedups.
 *
 * usage: bench_stem [--threads 1] [--reps 5] [--min-ms 30] [--isa scalar|avx2|avx512] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nn/gemm.h"
#include "nn/kernels.h"
#include "tern.h"

#define TILE 256

typedef struct bench {
    tern_conv_params p;
    float *x, *w, *b, *y, *dy, *dx, *dw, *db, *ws, *wperm, *dwperm, *cols;
    tern_pool *pool;
} bench;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static float *random_floats(size_t n, unsigned *seed)
{
    float *p = malloc((n ? n : 1) * sizeof *p);
    if (!p) {
        fprintf(stderr, "bench_stem: out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++)
        p[i] = (float)rand_r(seed) / (float)RAND_MAX - 0.5f;
    return p;
}

/* ---- im2col + GEMM, as nn/conv.c ran the stem before (one thread) ----------------------------- */

static size_t K_of(const tern_conv_params *p) { return (size_t)p->cin * 9; }

static size_t torch_col(const tern_conv_params *p, size_t j)
{
    const size_t cin = (size_t)p->cin, tap = j / cin;
    return (j % cin * 3 + tap / 3) * 3 + tap % 3;
}

static void im2col_row(float *col, const float *x, const tern_conv_params *p, size_t pix)
{
    const size_t cin = (size_t)p->cin, ohw = (size_t)p->oh * (size_t)p->ow;
    const size_t n = pix / ohw, oy = pix % ohw / (size_t)p->ow, ox = pix % (size_t)p->ow;
    const long ix0 = (long)ox * 2 - 1;
    for (size_t ky = 0; ky < 3; ky++) {
        float *dst = col + ky * 3 * cin;
        const long iy = (long)oy * 2 - 1 + (long)ky;
        if (iy < 0 || iy >= p->h) {
            memset(dst, 0, 3 * cin * sizeof *dst);
            continue;
        }
        const float *row = x + (n * (size_t)p->h + (size_t)iy) * (size_t)p->w * cin;
        if (ix0 >= 0 && ix0 + 3 <= p->w) {
            memcpy(dst, row + (size_t)ix0 * cin, 3 * cin * sizeof *dst);
            continue;
        }
        for (size_t kx = 0; kx < 3; kx++) {
            const long ix = ix0 + (long)kx;
            if (ix < 0 || ix >= p->w)
                memset(dst + kx * cin, 0, cin * sizeof *dst);
            else
                memcpy(dst + kx * cin, row + (size_t)ix * cin, cin * sizeof *dst);
        }
    }
}

static void col2im_row_add(float *dx, const float *dcol, const tern_conv_params *p, size_t pix)
{
    const size_t cin = (size_t)p->cin, ohw = (size_t)p->oh * (size_t)p->ow;
    const size_t n = pix / ohw, oy = pix % ohw / (size_t)p->ow, ox = pix % (size_t)p->ow;
    for (size_t ky = 0; ky < 3; ky++) {
        const long iy = (long)oy * 2 - 1 + (long)ky;
        if (iy < 0 || iy >= p->h)
            continue;
        for (size_t kx = 0; kx < 3; kx++) {
            const long ix = (long)ox * 2 - 1 + (long)kx;
            if (ix < 0 || ix >= p->w)
                continue;
            float *d = dx + ((n * (size_t)p->h + (size_t)iy) * (size_t)p->w + (size_t)ix) * cin;
            for (size_t ci = 0; ci < cin; ci++)
                d[ci] += dcol[(ky * 3 + kx) * cin + ci];
        }
    }
}

static void permute(bench *B)
{
    const size_t K = K_of(&B->p);
    for (size_t co = 0; co < (size_t)B->p.cout; co++)
        for (size_t j = 0; j < K; j++)
            B->wperm[co * K + j] = B->w[co * K + torch_col(&B->p, j)];
}

static void im2col_forward(bench *B)
{
    const tern_conv_params *p = &B->p;
    const size_t K = K_of(p), cout = (size_t)p->cout, m = (size_t)p->n * p->oh * p->ow;
    const tern_gemm_epilogue ep = {.bias = B->b, .act = TERN_ACT_HARDSWISH};
    permute(B);
    for (size_t r = 0; r < m; r += TILE) {
        const size_t rows = m - r < TILE ? m - r : TILE;
        for (size_t i = 0; i < rows; i++)
            im2col_row(B->cols + i * K, B->x, p, r + i);
        tern_gemm_thread(B->y + r * cout, cout, B->cols, K, false, B->wperm, K, true, rows, cout,
                         K, false, &ep, tern_pool_isa(B->pool), tern_pool_scratch(B->pool, 0));
    }
}

static void im2col_backward(bench *B, bool full)
{
    const tern_conv_params *p = &B->p;
    const size_t K = K_of(p), cout = (size_t)p->cout, m = (size_t)p->n * p->oh * p->ow;
    const tern_isa isa = tern_pool_isa(B->pool);
    float *scratch = tern_pool_scratch(B->pool, 0);
    permute(B);
    if (full)
        for (size_t r = 0; r < m; r += TILE) {
            const size_t rows = m - r < TILE ? m - r : TILE;
            tern_gemm_thread(B->cols, K, B->dy + r * cout, cout, false, B->wperm, K, false, rows,
                             K, cout, false, NULL, isa, scratch);
            for (size_t i = 0; i < rows; i++)
                col2im_row_add(B->dx, B->cols + i * K, p, r + i);
        }
    for (size_t r = 0; r < m; r += TILE) {
        const size_t rows = m - r < TILE ? m - r : TILE;
        for (size_t i = 0; i < rows; i++)
            im2col_row(B->cols + i * K, B->x, p, r + i);
        tern_gemm_thread(B->dwperm, K, B->dy + r * cout, cout, true, B->cols, K, false, cout, K,
                         rows, r > 0, NULL, isa, scratch);
    }
    for (size_t co = 0; co < cout; co++)
        for (size_t j = 0; j < K; j++)
            B->dw[co * K + torch_col(p, j)] += B->dwperm[co * K + j];
    if (full)
        for (size_t r = 0; r < m; r++)
            for (size_t j = 0; j < cout; j++)
                B->db[j] += B->dy[r * cout + j];
}

/* ---- timing ----------------------------------------------------------------------------------- */

enum { PASS_FWD, PASS_DW, PASS_FULL };

static void run(bench *B, int pass, bool direct)
{
    if (direct) {
        if (pass == PASS_FWD)
            tern_stemconv_forward(B->y, B->x, B->w, B->b, TERN_ACT_HARDSWISH, &B->p, B->pool);
        else if (pass == PASS_DW)
            tern_stemconv_backward(NULL, B->dw, NULL, B->ws, B->dy, B->x, B->w, &B->p, B->pool);
        else
            tern_stemconv_backward(B->dx, B->dw, B->db, B->ws, B->dy, B->x, B->w, &B->p,
                                   B->pool);
    } else {
        if (pass == PASS_FWD)
            im2col_forward(B);
        else
            im2col_backward(B, pass == PASS_FULL);
    }
}

static double best_ms(bench *B, int pass, bool direct, int reps, double min_s)
{
    run(B, pass, direct);
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        int iters = 0;
        double t0 = now(), t;
        do {
            run(B, pass, direct);
            iters++;
        } while ((t = now() - t0) < min_s);
        if (t / iters < best)
            best = t / iters;
    }
    return 1e3 * best;
}

int main(int argc, char **argv)
{
    int threads = 1, reps = 5;
    double min_ms = 30;
    tern_isa only = TERN_ISA_AUTO;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps"))
            reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--min-ms"))
            min_ms = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--isa"))
            only = !strcmp(argv[i + 1], "scalar") ? TERN_ISA_SCALAR
                   : !strcmp(argv[i + 1], "avx2") ? TERN_ISA_AVX2
                                                  : TERN_ISA_AVX512;
        else {
            fprintf(stderr, "usage: bench_stem [--threads N] [--reps N] [--min-ms MS] "
                            "[--isa scalar|avx2|avx512]\n");
            return 2;
        }
    }
    if (threads != 1)
        fprintf(stderr, "bench_stem: the im2col baseline runs on one thread; direct uses %d\n",
                threads);
    const struct { const char *name; int n, hw, cin, cout; } shapes[] = {
        {"224x224x3->16 b1", 1, 224, 3, 16},
        {"224x224x3->16 b32", 32, 224, 3, 16},
        {"32x32x1->16 b128", 128, 32, 1, 16},
        {"32x32x1->8 b128", 128, 32, 1, 8},
    };
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        tern_conv_params p = {.n = shapes[s].n, .h = shapes[s].hw, .w = shapes[s].hw,
                              .cin = shapes[s].cin, .cout = shapes[s].cout, .k = 3, .stride = 2,
                              .pad = 1, .groups = 1};
        tern_conv_params_finish(&p);
        const size_t nx = (size_t)p.n * p.h * p.w * p.cin, ny = (size_t)p.n * p.oh * p.ow * p.cout;
        const size_t nw = (size_t)p.cout * p.cin * 9, K = K_of(&p);
        unsigned seed = 1;
        bench B = {.p = p, .x = random_floats(nx, &seed), .w = random_floats(nw, &seed),
                   .b = random_floats((size_t)p.cout, &seed), .y = random_floats(ny, &seed),
                   .dy = random_floats(ny, &seed), .dx = random_floats(nx, &seed),
                   .dw = random_floats(nw, &seed), .db = random_floats((size_t)p.cout, &seed),
                   .wperm = random_floats(nw, &seed), .dwperm = random_floats(nw, &seed),
                   .cols = random_floats(TILE * K, &seed)};
        for (int isa = TERN_ISA_SCALAR; isa <= TERN_ISA_AVX512; isa++) {
            if (tern_isa_resolve((tern_isa)isa) != (tern_isa)isa ||
                (only != TERN_ISA_AUTO && only != (tern_isa)isa))
                continue;
            if (tern_pool_create(threads, (tern_isa)isa, NULL, &B.pool) != TERN_OK) {
                fprintf(stderr, "bench_stem: cannot create pool\n");
                return 1;
            }
            B.ws = random_floats(tern_stemconv_workspace_size(&p, threads), &seed);
            const double min_s = 1e-3 * min_ms;
            double t[3][2];
            for (int pass = 0; pass < 3; pass++)
                for (int d = 0; d < 2; d++)
                    t[pass][d] = best_ms(&B, pass, d, reps, min_s);
            printf("{\"shape\": \"%s\", \"isa\": \"%s\", \"threads\": %d, "
                   "\"fwd_im2col_ms\": %.4f, \"fwd_direct_ms\": %.4f, \"fwd_speedup\": %.2f, "
                   "\"dw_im2col_ms\": %.4f, \"dw_direct_ms\": %.4f, \"dw_speedup\": %.2f, "
                   "\"bwd_full_im2col_ms\": %.4f, \"bwd_full_direct_ms\": %.4f, "
                   "\"bwd_full_speedup\": %.2f, \"fwd_direct_gflops\": %.1f}\n",
                   shapes[s].name, tern_isa_name((tern_isa)isa), threads, t[0][0], t[0][1],
                   t[0][0] / t[0][1], t[1][0], t[1][1], t[1][0] / t[1][1], t[2][0], t[2][1],
                   t[2][0] / t[2][1], 2.0 * (double)ny * (double)K / (t[0][1] * 1e6));
            fflush(stdout);
            free(B.ws);
            tern_pool_destroy(&B.pool);
        }
        free(B.x), free(B.w), free(B.b), free(B.y), free(B.dy), free(B.dx), free(B.dw);
        free(B.db), free(B.wperm), free(B.dwperm), free(B.cols);
    }
    return 0;
}
