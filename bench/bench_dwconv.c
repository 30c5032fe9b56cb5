/* bench_dwconv: the depthwise convolution kernels (nn/dwconv.c) on the eleven depthwise layers
 * of MobileNetV3-Small at 224x224, printed as JSON.
 *
 * For each kernel level the CPU has (scalar, avx2, avx512) and each batch (1 and 32): forward
 * (with the layer's fused activation) and backward (dx, dw, db) summed over the layers; best of
 * --reps repetitions, each repeated until it lasts at least 50 ms. GFLOP/s counts 2 flops per
 * multiply-add (forward N*OH*OW*C*k*k of them, backward twice that); GB/s counts the tensors a
 * pass must touch once (forward x, w, y; backward dy, x, w, dx read and written, dw).
 *
 * usage: bench_dwconv [--threads 2] [--reps 5] [--batch N] */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nn/kernels.h"
#include "tern.h"

typedef struct layer {
    int hw, c, k, stride;
    tern_act act;
} layer;

/* Input size, expanded channels, kernel, stride and activation of each inverted residual's
 * depthwise conv in MobileNetV3-Small (torchvision's configuration). */
static const layer small_224[] = {
    {112, 16, 3, 2, TERN_ACT_RELU},      {56, 72, 3, 2, TERN_ACT_RELU},
    {28, 88, 3, 1, TERN_ACT_RELU},       {28, 96, 5, 2, TERN_ACT_HARDSWISH},
    {14, 240, 5, 1, TERN_ACT_HARDSWISH}, {14, 240, 5, 1, TERN_ACT_HARDSWISH},
    {14, 120, 5, 1, TERN_ACT_HARDSWISH}, {14, 144, 5, 1, TERN_ACT_HARDSWISH},
    {14, 288, 5, 2, TERN_ACT_HARDSWISH}, {7, 576, 5, 1, TERN_ACT_HARDSWISH},
    {7, 576, 5, 1, TERN_ACT_HARDSWISH},
};
#define NLAYERS (sizeof small_224 / sizeof small_224[0])

typedef struct buffers {
    tern_conv_params p;
    tern_act act;
    float *x, *w, *b, *y, *dy, *dx, *dw, *db;
} buffers;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static float *random_floats(size_t n, unsigned *seed)
{
    float *p = malloc((n ? n : 1) * sizeof *p);
    if (p)
        for (size_t i = 0; i < n; i++)
            p[i] = (float)rand_r(seed) / (float)RAND_MAX - 0.5f;
    return p;
}

static void run_pass(buffers *L, int backward, tern_pool *pool)
{
    for (size_t l = 0; l < NLAYERS; l++) {
        if (backward)
            tern_dwconv_backward(L[l].dx, L[l].dw, L[l].db, L[l].dy, L[l].x, L[l].w, &L[l].p,
                                 pool);
        else
            tern_dwconv_forward(L[l].y, L[l].x, L[l].w, L[l].b, L[l].act, &L[l].p, pool);
    }
}

/* Seconds per pass, best of reps. */
static double time_pass(buffers *L, int backward, tern_pool *pool, int reps)
{
    run_pass(L, backward, pool); /* warm-up */
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        int iters = 0;
        double t0 = now(), t;
        do {
            run_pass(L, backward, pool);
            iters++;
        } while ((t = now() - t0) < 0.05);
        if (t / iters < best)
            best = t / iters;
    }
    return best;
}

int main(int argc, char **argv)
{
    int threads = 2, reps = 5, only_batch = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps"))
            reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--batch"))
            only_batch = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: bench_dwconv [--threads N] [--reps N] [--batch N]\n");
            return 2;
        }
    }
    json_t *out = json_array();
    const int batches[] = {1, 32};
    for (size_t bi = 0; bi < 2; bi++) {
        int n = batches[bi];
        if (only_batch && n != only_batch)
            continue;
        buffers L[NLAYERS];
        double flops = 0, bytes_f = 0, bytes_b = 0;
        unsigned seed = 1;
        for (size_t l = 0; l < NLAYERS; l++) {
            const layer *d = &small_224[l];
            tern_conv_params p = {.n = n, .h = d->hw, .w = d->hw, .cin = d->c, .cout = d->c,
                                  .k = d->k, .stride = d->stride, .pad = (d->k - 1) / 2,
                                  .groups = d->c};
            tern_conv_params_finish(&p);
            size_t nx = (size_t)n * p.h * p.w * p.cin, ny = (size_t)n * p.oh * p.ow * p.cout;
            size_t nw = (size_t)p.cout * p.k * p.k;
            L[l] = (buffers){.p = p, .act = d->act, .x = random_floats(nx, &seed),
                             .w = random_floats(nw, &seed), .b = random_floats(p.cout, &seed),
                             .y = random_floats(ny, &seed), .dy = random_floats(ny, &seed),
                             .dx = random_floats(nx, &seed), .dw = random_floats(nw, &seed),
                             .db = random_floats(p.cout, &seed)};
            if (!L[l].x || !L[l].w || !L[l].b || !L[l].y || !L[l].dy || !L[l].dx || !L[l].dw ||
                !L[l].db) {
                fprintf(stderr, "bench_dwconv: out of memory\n");
                return 1;
            }
            flops += 2.0 * (double)ny * p.k * p.k;
            bytes_f += 4.0 * (double)(nx + ny + nw);
            bytes_b += 4.0 * (double)(ny + 3 * nx + 2 * nw);
        }
        for (int isa = TERN_ISA_SCALAR; isa <= TERN_ISA_AVX512; isa++) {
            if (tern_isa_resolve((tern_isa)isa) != (tern_isa)isa)
                continue;
            tern_pool *pool = NULL;
            if (tern_pool_create(threads, (tern_isa)isa, NULL, &pool) != TERN_OK) {
                fprintf(stderr, "bench_dwconv: cannot create pool\n");
                return 1;
            }
            double tf = time_pass(L, 0, pool, reps), tb = time_pass(L, 1, pool, reps);
            json_t *rec = json_object();
            json_object_set_new(rec, "isa", json_string(tern_isa_name((tern_isa)isa)));
            json_object_set_new(rec, "batch", json_integer(n));
            json_object_set_new(rec, "threads", json_integer(threads));
            json_object_set_new(rec, "forward_ms", json_real(1e3 * tf));
            json_object_set_new(rec, "forward_gflops", json_real(flops / tf * 1e-9));
            json_object_set_new(rec, "forward_gbs", json_real(bytes_f / tf * 1e-9));
            json_object_set_new(rec, "backward_ms", json_real(1e3 * tb));
            json_object_set_new(rec, "backward_gflops", json_real(2 * flops / tb * 1e-9));
            json_object_set_new(rec, "backward_gbs", json_real(bytes_b / tb * 1e-9));
            json_array_append_new(out, rec);
            tern_pool_destroy(&pool);
        }
        for (size_t l = 0; l < NLAYERS; l++) {
            free(L[l].x), free(L[l].w), free(L[l].b), free(L[l].y);
            free(L[l].dy), free(L[l].dx), free(L[l].dw), free(L[l].db);
        }
    }
    json_dumpf(out, stdout, JSON_INDENT(2) | JSON_REAL_PRECISION(4));
    printf("\n");
    json_decref(out);
    return 0;
}
