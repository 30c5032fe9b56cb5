/* Classification metrics: a confusion matrix accumulated batch by batch, and what follows from
 * it (accuracy, top-k accuracy, per-class precision, recall and F1), as numbers or JSON. */
#ifndef TERN_METRICS_H
#define TERN_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "tern/alloc.h"
#include "tern/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tern_metrics tern_metrics;

/* Metrics over `classes` classes, tracking top-k accuracy for k = 1 .. max_k. */
tern_status tern_metrics_create(int classes, int max_k, const tern_allocator *alloc,
                                tern_metrics **out);
void tern_metrics_destroy(tern_metrics **m);
void tern_metrics_reset(tern_metrics *m);
/* Add a batch: logits (n, classes), labels (n) in [0, classes) (TERN_ERR_INVALID otherwise),
 * optionally the batch's mean loss (weighted by n in the running mean; NaN to skip). Ties
 * between logits go to the lower class index. */
tern_status tern_metrics_add(tern_metrics *m, const float *logits, const int32_t *labels, int n,
                             float loss);
size_t tern_metrics_count(const tern_metrics *m);
double tern_metrics_accuracy(const tern_metrics *m);
double tern_metrics_topk(const tern_metrics *m, int k); /* 0 < k <= max_k */
double tern_metrics_loss(const tern_metrics *m);        /* NaN if never given */
/* Per class: precision, recall and F1 (0 where undefined, as scikit-learn's zero_division=0),
 * and the support (true count). */
double tern_metrics_precision(const tern_metrics *m, int cls);
double tern_metrics_recall(const tern_metrics *m, int cls);
double tern_metrics_f1(const tern_metrics *m, int cls);
size_t tern_metrics_support(const tern_metrics *m, int cls);
/* Confusion matrix entry: samples of true class `truth` predicted as `pred`. */
size_t tern_metrics_confusion(const tern_metrics *m, int truth, int pred);
/* JSON document (newly allocated with malloc; free()) with count, accuracy, top-k, loss,
 * macro averages, per-class metrics (named by class_names[i] when not NULL) and the confusion
 * matrix. NULL if out of memory. */
char *tern_metrics_to_json(const tern_metrics *m, const char *const *class_names);

#ifdef __cplusplus
}
#endif

#endif
