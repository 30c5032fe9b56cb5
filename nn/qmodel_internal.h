/* The quantized model's internals, shared by its builder (nn/qmodel.c) and its file format
 * (nn/qmodel_io.c). Internal header: not installed. */
#ifndef TERN_QMODEL_INTERNAL_H
#define TERN_QMODEL_INTERNAL_H

#include <stdbool.h>

#include "kernels.h"
#include "pool.h"
#include "qkernels.h"
#include "tern/quant.h"

typedef enum qop_kind {
    QOP_CONV1X1,   /* pointwise convolution: GEMM over N*H*W rows */
    QOP_DEPTHWISE, /* direct depthwise convolution */
    QOP_CONV,      /* dense convolution (the stem): direct for short kernel rows (k * cin
                    * <= 64), else im2col and GEMM */
    QOP_LINEAR,    /* fully connected, int8 out (squeeze-and-excitation, classifier.0) */
    QOP_LOGITS,    /* the last fully connected layer: int32 sums dequantized to float */
    QOP_POOL,      /* global average pool */
    QOP_GATE,      /* squeeze-and-excitation: x * gate broadcast over H, W */
    QOP_ADD,       /* residual */
} qop_kind;

#define QHIST_BINS 2048

/* Counts of values in QHIST_BINS equal bins over [lo, hi] (values outside go to the end bins). */
typedef struct qhist {
    float lo, hi;
    double *count; /* (QHIST_BINS), or NULL */
} qhist;

typedef struct qvalue {
    int c, h, w;
    bool used;          /* read or written by some op (or the input) */
    float min, max;     /* range observed in calibration */
    qhist hist;         /* histogram observers' second pass */
    tern_qparams q;
    float *f;           /* calibration: (calib_batch, h, w, c) */
    int8_t *x;          /* inference: (max_batch, h, w, c), in the arena */
    float *fx;          /* mixed precision: the float form (max_batch, h, w, c), or NULL */
    bool has_x, has_f;  /* which forms hold the current forward's value */
} qvalue;

typedef struct qop {
    qop_kind kind;
    char *name;             /* the float layer's weight name, or "" */
    int in, in2, out;       /* values (in2: the gate of GATE, the other addend of ADD) */
    tern_conv_params conv;  /* convolutions; n is set per call */
    int fin, fout;          /* LINEAR, LOGITS */
    tern_act act;           /* applied to the output: RELU as a clamp, others by table */
    float *wf, *bf;         /* float weights (BatchNorm folded) and bias, until quantized */
    float pre_min, pre_max; /* range before the activation */
    qhist pre_hist;
    tern_qparams pre;       /* parameters before a table activation */
    /* integer form */
    int8_t *wq;             /* weights as quantized, in the float layout (cout, cin/groups, k, k) */
    float *wscale;          /* (cout) their scales */
    int32_t *bias;          /* (cout) */
    float *rqscale;         /* (cout) requantization: input scale * weight scale / output */
    int32_t *rqfixed;       /* fixed mode: (2, cout) that scale's multipliers, then shifts */
    void *packed;           /* GEMM, DEPTHWISE: packed weights and corrected bias */
    float *deq;             /* LOGITS: input scale * weight scale, per class */
    int8_t lut[256];
    tern_requant rq;
    tern_qadd_params add;
    tern_qgate_params gate;
    bool fp32;              /* mixed precision: run in float from wf, bf */
    double sensitivity, agreement; /* -1: not measured */
} qop;

struct tern_qmodel {
    tern_qmodel_options opt;
    tern_model_options mo;  /* of the float model (architecture, for files) */
    tern_qisa isa;
    char error[256];
    int in_channels, num_classes;
    qvalue *values;
    qop *ops;
    int nvalues, nops;
    /* inference memory */
    void *arena;
    int8_t *col;       /* im2col rows of the stem */
    void *workspace;   /* GEMM scratch */
    int32_t *acc;      /* LOGITS sums (max_batch, classes) */
    /* mixed precision (NULL when every op is int8) */
    bool mixed;
    tern_pool *pool;   /* one thread for the float ops */
    float *fws;        /* their convolution workspace */
};

static inline const tern_allocator *tern_qmodel_alloc(const tern_qmodel *q)
{
    return q->opt.alloc;
}

static inline size_t tern_qvalue_count(const qvalue *v, int batch)
{
    return (size_t)batch * (size_t)v->h * (size_t)v->w * (size_t)v->c;
}

static inline bool tern_qact_is_table(tern_act act)
{
    return act == TERN_ACT_HARDSWISH || act == TERN_ACT_HARDSIGMOID;
}

static inline bool tern_qop_has_weights(const qop *o)
{
    return o->kind == QOP_CONV1X1 || o->kind == QOP_DEPTHWISE || o->kind == QOP_CONV ||
           o->kind == QOP_LINEAR || o->kind == QOP_LOGITS;
}

/* Record a detail in q->error and return s. */
tern_status tern_qmodel_fail(tern_qmodel *q, tern_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Spatial sizes of every value from the input size; marks the values the ops use. */
void tern_qmodel_propagate_shapes(tern_qmodel *q);
/* What op i's kernels read, from its quantized weights (wq, wscale, bias) and the parameters
 * of its tensors. */
tern_status tern_qmodel_finish_op(tern_qmodel *q, int i);
/* The int8 arena (activations, im2col rows, scratch). */
tern_status tern_qmodel_plan_inference(tern_qmodel *q);
/* Float buffers and pool for ops running in float. */
tern_status tern_qmodel_plan_mixed(tern_qmodel *q);

#endif
