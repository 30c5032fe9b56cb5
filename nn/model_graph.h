/* A read-only view of a tern_model's graph for other builders (the INT8 quantizer): its values
 * (activation tensors, by channel count) and ops in execution order, with borrowed pointers to
 * their parameters. Internal; the pointers stay valid for the model's life, and the values they
 * point to until its parameters change. */
#ifndef TERN_MODEL_GRAPH_H
#define TERN_MODEL_GRAPH_H

#include "kernels.h"
#include "tern/model.h"

typedef enum tern_graph_kind {
    TERN_GRAPH_CONV,    /* convolution without bias: in -> out */
    TERN_GRAPH_BN,      /* BatchNorm2d (running statistics), then act */
    TERN_GRAPH_GN,      /* GroupNorm */
    TERN_GRAPH_ACT,     /* elementwise act */
    TERN_GRAPH_POOL,    /* global average pool (N, H, W, C) -> (N, 1, 1, C) */
    TERN_GRAPH_LINEAR,  /* out (N, fout) = in (N, fin) w^T + b */
    TERN_GRAPH_SCALE,   /* out = in * in2 broadcast over H, W */
    TERN_GRAPH_ADD,     /* out = in + in2 */
    TERN_GRAPH_DROPOUT, /* identity in inference */
} tern_graph_kind;

typedef struct tern_graph_op {
    tern_graph_kind kind;
    int in, in2, out;      /* value indices; value 0 is the input, the last value the logits */
    tern_conv_params conv; /* CONV: cin, cout, k, stride, pad, groups (spatial fields unset) */
    int fin, fout;         /* LINEAR */
    tern_act act;          /* BN, ACT */
    float eps;             /* BN */
    const float *w, *b;    /* CONV: weight (Cout, Cin/groups, k, k); BN: gamma, beta;
                            * LINEAR: weight (fout, fin), bias (fout) */
    const float *mean, *var; /* BN: running statistics */
    const char *name;      /* the layer's weight tensor name, or "" */
} tern_graph_op;

int tern_model_graph_value_count(const tern_model *model);
/* Channels of value v (0 <= v < count). */
int tern_model_graph_value_channels(const tern_model *model, int v);
int tern_model_graph_op_count(const tern_model *model);
/* Op i (0 <= i < count). */
void tern_model_graph_op_at(const tern_model *model, int i, tern_graph_op *out);

/* ---- training state, for per-sample gradients (DP-SGD, nn/dpsgd.c) ---------------------------
 * After tern_model_plan, an op's conv params (tern_graph_op.conv) carry the planned spatial
 * sizes (h, w, oh, ow); n is left for the caller. */

typedef struct tern_graph_value {
    int h, w, c;   /* planned spatial size (0 without a plan) and channels */
    float *x;      /* (max_batch, h, w, c): values of the last forward */
    float *dx;     /* gradients of the last backward; NULL outside a training plan */
} tern_graph_value;

typedef struct tern_graph_train_op {
    float *dw, *db; /* gradients of the op's w and b inside tern_model_grads, or NULL */
    const float *save_mean, *save_invstd; /* GN: (batch, groups) of the last forward */
    int groups;                           /* GN */
} tern_graph_train_op;

void tern_model_graph_value_at(tern_model *model, int v, tern_graph_value *out);
void tern_model_graph_train_op_at(tern_model *model, int i, tern_graph_train_op *out);
/* The model's thread pool (borrowed, valid for the model's life). */
tern_pool *tern_model_graph_pool(tern_model *model);
/* Planned batch (0 without a plan), with the plan's height, width and whether it trains. */
int tern_model_graph_plan(const tern_model *model, int *height, int *width, bool *training);

/* Band size (floats of the expanded tensor) with which folded inference interleaves a
 * pointwise expansion with the depthwise conv reading it; 0 runs them one after the other.
 * For tests and benchmarks: the results are the same bits either way. */
void tern_model_graph_set_fuse_floats(tern_model *model, size_t floats);

#endif
