/* bench_gemm: tern_gemm against OpenBLAS cblas_sgemm (both single-threaded) on the GEMM shapes
 * of MobileNetV3 at 224x224: batch-1 inference (forward pointwise convs and the classifier)
 * and batch-32 training (forward, data gradient, weight gradient). Prints JSON: GFLOP/s of
 * each (best of several timed repeats, each repeat at least ~20 ms) and tern / OpenBLAS.
 *
 * usage: bench_gemm [--threads N] [--isa scalar|avx2|avx512] [--min-ms 20]
 * Plain products (no bias, no activation) for the comparison; "tern_ep" also times tern with
 * the fused bias + hardswish epilogue the forward convs use. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nn/gemm.h"

typedef struct shape {
    const char *what;
    size_t m, n, k;
    bool ta, tb, accumulate;
} shape;

/* M = pixels, N = Cout, K = Cin for the forward (Y = X W^T). */
#define FWD(what, m, n, k) {what, m, n, k, false, true, false}
static const shape shapes[] = {
    /* MobileNetV3-Small, batch 1 */
    FWD("small b1 16->16 56x56", 3136, 16, 16),
    FWD("small b1 16->72 56x56", 3136, 72, 16),
    FWD("small b1 72->24 28x28", 784, 24, 72),
    FWD("small b1 24->88 28x28", 784, 88, 24),
    FWD("small b1 88->24 28x28", 784, 24, 88),
    FWD("small b1 24->96 28x28", 784, 96, 24),
    FWD("small b1 96->40 14x14", 196, 40, 96),
    FWD("small b1 40->240 14x14", 196, 240, 40),
    FWD("small b1 240->40 14x14", 196, 40, 240),
    FWD("small b1 40->120 14x14", 196, 120, 40),
    FWD("small b1 120->48 14x14", 196, 48, 120),
    FWD("small b1 48->144 14x14", 196, 144, 48),
    FWD("small b1 144->48 14x14", 196, 48, 144),
    FWD("small b1 48->288 14x14", 196, 288, 48),
    FWD("small b1 288->96 7x7", 49, 96, 288),
    FWD("small b1 96->576 7x7", 49, 576, 96),
    FWD("small b1 576->96 7x7", 49, 96, 576),
    FWD("small b1 fc 576->1024", 1, 1024, 576),
    FWD("small b1 fc 1024->1000", 1, 1000, 1024),
    FWD("small b1 se 96->24", 1, 24, 96),
    /* MobileNetV3-Large, batch 1, largest maps */
    FWD("large b1 16->64 112x112", 12544, 64, 16),
    FWD("large b1 64->24 56x56", 3136, 24, 64),
    FWD("large b1 24->72 56x56", 3136, 72, 24),
    FWD("large b1 960->1280 fc", 1, 1280, 960),
    /* MobileNetV3-Small, batch 32 training */
    FWD("small b32 fwd 16->72 56x56", 100352, 72, 16),
    {"small b32 dX 16<-72 56x56", 100352, 16, 72, false, false, true},
    {"small b32 dW 72x16 56x56", 72, 16, 100352, true, false, true},
    FWD("small b32 fwd 24->88 28x28", 25088, 88, 24),
    {"small b32 dX 24<-88 28x28", 25088, 24, 88, false, false, true},
    {"small b32 dW 88x24 28x28", 88, 24, 25088, true, false, true},
    FWD("small b32 fwd 40->240 14x14", 6272, 240, 40),
    {"small b32 dX 40<-240 14x14", 6272, 40, 240, false, false, true},
    {"small b32 dW 240x40 14x14", 240, 40, 6272, true, false, true},
    FWD("small b32 fwd 96->576 7x7", 1568, 576, 96),
    {"small b32 dX 96<-576 7x7", 1568, 96, 576, false, false, true},
    {"small b32 dW 576x96 7x7", 576, 96, 1568, true, false, true},
    FWD("small b32 fc 576->1024", 32, 1024, 576),
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct run_ctx {
    const shape *s;
    float *a, *b, *c, *bias;
    size_t lda, ldb;
    tern_pool *pool;
    int which; /* 0 tern, 1 tern with epilogue, 2 OpenBLAS */
} run_ctx;

static void run_once(const run_ctx *r)
{
    const shape *s = r->s;
    if (r->which == 2) {
        cblas_sgemm(CblasRowMajor, s->ta ? CblasTrans : CblasNoTrans,
                    s->tb ? CblasTrans : CblasNoTrans, (int)s->m, (int)s->n, (int)s->k, 1.0f,
                    r->a, (int)r->lda, r->b, (int)r->ldb, s->accumulate ? 1.0f : 0.0f, r->c,
                    (int)s->n);
        return;
    }
    tern_gemm_epilogue ep = {r->bias, TERN_ACT_HARDSWISH};
    tern_gemm(r->c, s->n, r->a, r->lda, s->ta, r->b, r->ldb, s->tb, s->m, s->n, s->k,
              s->accumulate, r->which == 1 && !s->accumulate ? &ep : NULL, r->pool);
}

/* Best GFLOP/s over 5 repeats of at least min_s seconds each. */
static double gflops(const run_ctx *r, double min_s)
{
    const double flop = 2.0 * (double)r->s->m * (double)r->s->n * (double)r->s->k;
    run_once(r);
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        long iters = 0;
        double t0 = now(), t;
        do {
            run_once(r);
            iters++;
            t = now() - t0;
        } while (t < min_s);
        const double g = flop * (double)iters / t * 1e-9;
        if (g > best)
            best = g;
    }
    return best;
}

int main(int argc, char **argv)
{
    int threads = 1;
    tern_isa isa = TERN_ISA_AVX512;
    double min_ms = 20;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--isa") && i + 1 < argc) {
            const char *v = argv[++i];
            isa = !strcmp(v, "scalar") ? TERN_ISA_SCALAR
                  : !strcmp(v, "avx2") ? TERN_ISA_AVX2
                                       : TERN_ISA_AVX512;
        } else if (!strcmp(argv[i], "--min-ms") && i + 1 < argc)
            min_ms = atof(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_gemm [--threads N] [--isa scalar|avx2|avx512] "
                            "[--min-ms 20]\n");
            return 2;
        }
    }
    openblas_set_num_threads(threads);
    tern_pool *pool = NULL;
    if (tern_pool_create(threads, isa, NULL, &pool) != TERN_OK) {
        fprintf(stderr, "bench_gemm: cannot create the thread pool\n");
        return 1;
    }
    printf("{\"threads\": %d, \"isa\": \"%s\", \"openblas_core\": \"%s\", \"results\": [\n",
           threads, tern_isa_name(tern_pool_isa(pool)), openblas_get_corename());
    const size_t count = sizeof shapes / sizeof shapes[0];
    double log_ratio_sum = 0;
    for (size_t i = 0; i < count; i++) {
        const shape *s = &shapes[i];
        run_ctx r = {.s = s, .pool = pool};
        r.lda = s->ta ? s->m : s->k;
        r.ldb = s->tb ? s->k : s->n;
        r.a = malloc(s->m * s->k * sizeof(float));
        r.b = malloc(s->k * s->n * sizeof(float));
        r.c = malloc(s->m * s->n * sizeof(float));
        r.bias = malloc(s->n * sizeof(float));
        if (!r.a || !r.b || !r.c || !r.bias) {
            fprintf(stderr, "bench_gemm: out of memory\n");
            return 1;
        }
        for (size_t j = 0; j < s->m * s->k; j++)
            r.a[j] = (float)((j * 7919) % 1000) * 1e-3f - 0.5f;
        for (size_t j = 0; j < s->k * s->n; j++)
            r.b[j] = (float)((j * 104729) % 1000) * 1e-3f - 0.5f;
        for (size_t j = 0; j < s->n; j++)
            r.bias[j] = 0.01f * (float)j;
        memset(r.c, 0, s->m * s->n * sizeof(float));
        double g[3];
        for (int w = 0; w < 3; w++) {
            r.which = w;
            g[w] = gflops(&r, min_ms * 1e-3);
        }
        log_ratio_sum += __builtin_log(g[0] / g[2]);
        printf("  {\"shape\": \"%s\", \"M\": %zu, \"N\": %zu, \"K\": %zu, \"trans_a\": %d, "
               "\"trans_b\": %d, \"tern_gflops\": %.2f, \"tern_ep_gflops\": %.2f, "
               "\"openblas_gflops\": %.2f, \"ratio\": %.2f}%s\n",
               s->what, s->m, s->n, s->k, s->ta, s->tb, g[0], s->accumulate ? 0.0 : g[1], g[2],
               g[0] / g[2], i + 1 < count ? "," : "");
        fflush(stdout);
        free(r.a);
        free(r.b);
        free(r.c);
        free(r.bias);
    }
    printf("], \"geomean_ratio\": %.2f}\n", __builtin_exp(log_ratio_sum / (double)count));
    tern_pool_destroy(&pool);
    return 0;
}
