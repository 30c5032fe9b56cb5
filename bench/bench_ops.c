/* bench_ops: the memory-bound kernels of nn/ops.c at MobileNetV3 training sizes (batch 32,
 * 224x224), one thread, printed as one JSON object per line.
 *
 * For each (m rows, c channels) shape:
 *   bn_act_fwd  unfused scalar (tern_batchnorm_forward_train + tern_act_forward, hardswish, at
 *               TERN_ISA_SCALAR) vs fused tern_batchnorm_act_forward_train at the best ISA
 *   bn_act_bwd  unfused scalar (tern_act_backward + tern_batchnorm_backward) vs fused
 *               tern_batchnorm_act_backward at the best ISA
 *   act_fwd, act_bwd   tern_act_forward / tern_act_backward (hardswish), scalar vs best ISA
 * Times are the minimum of --iters runs (default 5) after a warm-up. GB/s counts the same
 * minimal traffic for both sides (forward: read y, write a; backward: read da and y, read and
 * write dy; act forward: read x, write y; act backward: read dy and x, read and write dx), so
 * the ratio is the speed-up. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nn/kernels.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static float *fill(size_t n, unsigned seed, float lo, float hi)
{
    float *p = malloc(n * sizeof *p);
    if (!p) {
        fprintf(stderr, "bench_ops: out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        p[i] = lo + (hi - lo) * (float)(seed >> 8) / 16777216.0f;
    }
    return p;
}

typedef struct {
    size_t m;
    int c;
    tern_act act;
    float *y, *a, *z, *dz, *da, *dy, *gamma, *beta, *mean, *inv, *rm, *rv, *dg, *db;
} shape;

enum { BN_FWD, BN_BWD, ACT_FWD, ACT_BWD };

static void run_once(const shape *s, int op, int fused, tern_pool *pool)
{
    size_t mc = s->m * (size_t)s->c;
    switch (op) {
    case BN_FWD:
        if (fused) {
            tern_batchnorm_act_forward_train(s->a, s->mean, s->inv, s->rm, s->rv, s->y,
                                             s->gamma, s->beta, s->m, s->c, 1e-3f, 0.01f,
                                             s->act, pool);
        } else {
            tern_batchnorm_forward_train(s->z, s->mean, s->inv, s->rm, s->rv, s->y, s->gamma,
                                         s->beta, s->m, s->c, 1e-3f, 0.01f, pool);
            tern_act_forward(s->a, s->z, mc, s->act, pool);
        }
        break;
    case BN_BWD:
        if (fused) {
            tern_batchnorm_act_backward(s->dy, s->dg, s->db, s->da, s->y, s->mean, s->inv,
                                        s->gamma, s->beta, s->m, s->c, s->act, pool);
        } else {
            tern_act_backward(s->dz, s->da, s->z, mc, s->act, pool);
            tern_batchnorm_backward(s->dy, s->dg, s->db, s->dz, s->y, s->mean, s->inv, s->gamma,
                                    s->m, s->c, pool);
        }
        break;
    case ACT_FWD: tern_act_forward(s->a, s->z, mc, s->act, pool); break;
    case ACT_BWD: tern_act_backward(s->dz, s->da, s->z, mc, s->act, pool); break;
    }
}

static double best_time(const shape *s, int op, int fused, tern_pool *pool, int iters)
{
    run_once(s, op, fused, pool); /* warm-up */
    double best = 1e30;
    for (int i = 0; i < iters; i++) {
        double t0 = now();
        run_once(s, op, fused, pool);
        double t = now() - t0;
        best = t < best ? t : best;
    }
    return best;
}

int main(int argc, char **argv)
{
    int iters = 5;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--iters") && i + 1 < argc) {
            iters = atoi(argv[++i]);
        } else {
            fprintf(stderr, "usage: bench_ops [--iters N]\n");
            return 2;
        }
    }
    tern_pool *scalar = NULL, *fast = NULL;
    if (tern_pool_create(1, TERN_ISA_SCALAR, NULL, &scalar) ||
        tern_pool_create(1, TERN_ISA_AUTO, NULL, &fast)) {
        fprintf(stderr, "bench_ops: cannot create pools\n");
        return 1;
    }
    const struct { size_t m; int c; } shapes[] = {
        {32 * 112 * 112, 16}, {32 * 56 * 56, 72}, {32 * 28 * 28, 120}, {32 * 14 * 14, 576}};
    const char *names[] = {"bn_act_fwd", "bn_act_bwd", "act_fwd", "act_bwd"};
    const double traffic[] = {2, 4, 2, 4}; /* floats moved per element, as described above */
    for (size_t k = 0; k < sizeof shapes / sizeof *shapes; k++) {
        size_t m = shapes[k].m, c = (size_t)shapes[k].c, mc = m * c;
        shape s = {.m = m, .c = (int)c, .act = TERN_ACT_HARDSWISH};
        s.y = fill(mc, 1, -2, 4), s.a = fill(mc, 2, 0, 1), s.z = fill(mc, 3, -5, 5);
        s.dz = fill(mc, 4, 0, 1), s.da = fill(mc, 5, -1, 1), s.dy = fill(mc, 6, 0, 1);
        s.gamma = fill(c, 7, 0.5f, 1.5f), s.beta = fill(c, 8, -1, 1), s.mean = fill(c, 9, 0, 1);
        s.inv = fill(c, 10, 1, 2), s.rm = fill(c, 11, 0, 1), s.rv = fill(c, 12, 1, 2);
        s.dg = fill(c, 13, 0, 1), s.db = fill(c, 14, 0, 1);
        for (int op = 0; op < 4; op++) {
            int fused = op <= BN_BWD;
            double t_old = best_time(&s, op, 0, scalar, iters);
            double t_new = best_time(&s, op, fused, fast, iters);
            double bytes = traffic[op] * (double)mc * sizeof(float);
            printf("{\"op\": \"%s\", \"act\": \"hardswish\", \"m\": %zu, \"c\": %zu, "
                   "\"threads\": 1, \"old\": \"scalar%s\", \"new\": \"%s%s\", "
                   "\"old_ms\": %.3f, \"new_ms\": %.3f, \"old_gbs\": %.2f, \"new_gbs\": %.2f, "
                   "\"speedup\": %.2f}\n",
                   names[op], m, c, fused ? " unfused" : "",
                   tern_isa_name(tern_pool_isa(fast)), fused ? " fused" : "", 1e3 * t_old,
                   1e3 * t_new, bytes / t_old * 1e-9, bytes / t_new * 1e-9, t_old / t_new);
            fflush(stdout);
        }
        free(s.y), free(s.a), free(s.z), free(s.dz), free(s.da), free(s.dy), free(s.gamma);
        free(s.beta), free(s.mean), free(s.inv), free(s.rm), free(s.rv), free(s.dg), free(s.db);
    }
    tern_pool_destroy(&scalar);
    tern_pool_destroy(&fast);
    return 0;
}
