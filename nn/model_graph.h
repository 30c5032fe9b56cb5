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

#endif
