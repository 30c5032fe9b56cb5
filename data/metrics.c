/* Classification metrics.
 *
 * Everything derives from two counters filled by tern_metrics_add: the confusion matrix
 * (truth x prediction) and, per sample, the rank of the true class among the logits (how many
 * classes beat it), histogrammed up to max_k. Logits are ordered by value with ties going to the
 * lower class index and NaN below everything, so the top-1 prediction is the rank-0 class and
 * top-1 accuracy always equals the confusion matrix's diagonal share.
 *
 * Conventions for degenerate cases (scikit-learn's zero_division=0): a ratio with a zero
 * denominator is 0 (accuracy of nothing, precision of a class never predicted, F1 when P + R = 0).
 * Out-of-range arguments to the getters give NaN (doubles) or 0 (counts). */
#include "tern/metrics.h"

#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "nn/util.h"

struct tern_metrics {
    tern_allocator alloc;
    int classes, max_k;
    size_t count;
    size_t *confusion; /* (classes, classes): [truth][pred] */
    size_t *rank_hist; /* (max_k): samples whose true class had rank r */
    double loss_sum;   /* sum of batch loss * batch size */
    size_t loss_count;
};

tern_status tern_metrics_create(int classes, int max_k, const tern_allocator *alloc,
                                tern_metrics **out)
{
    if (classes < 1 || max_k < 1 || max_k > classes || !out)
        return TERN_ERR_INVALID;
    tern_allocator a = alloc ? *alloc : (tern_allocator){0};
    size_t cells, bytes;
    if (!tern_mul_size((size_t)classes, (size_t)classes, &cells) ||
        !tern_add_size(cells, (size_t)max_k, &cells) ||
        !tern_mul_size(cells, sizeof(size_t), &bytes))
        return TERN_ERR_NOMEM;
    tern_metrics *m = tern_alloc(&a, sizeof *m);
    if (!m)
        return TERN_ERR_NOMEM;
    memset(m, 0, sizeof *m);
    m->alloc = a;
    m->classes = classes;
    m->max_k = max_k;
    /* One block: the confusion matrix, then the rank histogram. */
    m->confusion = tern_alloc(&a, bytes);
    if (!m->confusion) {
        tern_free(&a, m);
        return TERN_ERR_NOMEM;
    }
    m->rank_hist = m->confusion + (size_t)classes * (size_t)classes;
    tern_metrics_reset(m);
    *out = m;
    return TERN_OK;
}

void tern_metrics_destroy(tern_metrics **mp)
{
    if (!mp || !*mp)
        return;
    tern_metrics *m = *mp;
    tern_allocator a = m->alloc;
    tern_free(&a, m->confusion);
    tern_free(&a, m);
    *mp = NULL;
}

void tern_metrics_reset(tern_metrics *m)
{
    size_t cells = (size_t)m->classes * (size_t)m->classes + (size_t)m->max_k;
    memset(m->confusion, 0, cells * sizeof(size_t));
    m->count = 0;
    m->loss_sum = 0;
    m->loss_count = 0;
}

/* Does class j (logit a) rank above class i (logit b)? Higher value first, NaN last, ties to
 * the lower index. A strict total order, so exactly one class has rank 0. */
static bool ranks_above(float a, int j, float b, int i)
{
    bool na = isnan(a), nb = isnan(b);
    if (na || nb)
        return na && nb ? j < i : nb;
    return a > b || (a == b && j < i);
}

tern_status tern_metrics_add(tern_metrics *m, const float *logits, const int32_t *labels, int n,
                             float loss)
{
    if (!m || n < 0 || (n > 0 && (!logits || !labels)))
        return TERN_ERR_INVALID;
    /* Check every label first so a bad batch leaves the metrics untouched. */
    for (int s = 0; s < n; s++)
        if (labels[s] < 0 || labels[s] >= m->classes)
            return TERN_ERR_INVALID;
    const int C = m->classes;
    for (int s = 0; s < n; s++) {
        const float *row = logits + (size_t)s * (size_t)C;
        const int truth = labels[s];
        int pred = 0, rank = 0;
        for (int j = 1; j < C; j++)
            if (ranks_above(row[j], j, row[pred], pred))
                pred = j;
        for (int j = 0; j < C; j++)
            if (j != truth && ranks_above(row[j], j, row[truth], truth))
                rank++;
        m->confusion[(size_t)truth * (size_t)C + (size_t)pred]++;
        if (rank < m->max_k)
            m->rank_hist[rank]++;
    }
    m->count += (size_t)n;
    if (n > 0 && !isnan(loss)) {
        m->loss_sum += (double)loss * n;
        m->loss_count += (size_t)n;
    }
    return TERN_OK;
}

size_t tern_metrics_count(const tern_metrics *m)
{
    return m->count;
}

static double ratio(size_t num, size_t den)
{
    return den ? (double)num / (double)den : 0.0;
}

double tern_metrics_topk(const tern_metrics *m, int k)
{
    if (k < 1 || k > m->max_k)
        return NAN;
    size_t hits = 0;
    for (int r = 0; r < k; r++)
        hits += m->rank_hist[r];
    return ratio(hits, m->count);
}

double tern_metrics_accuracy(const tern_metrics *m)
{
    return tern_metrics_topk(m, 1);
}

double tern_metrics_loss(const tern_metrics *m)
{
    return m->loss_count ? m->loss_sum / (double)m->loss_count : NAN;
}

static bool class_ok(const tern_metrics *m, int cls)
{
    return cls >= 0 && cls < m->classes;
}

static size_t cell(const tern_metrics *m, int truth, int pred)
{
    return m->confusion[(size_t)truth * (size_t)m->classes + (size_t)pred];
}

size_t tern_metrics_confusion(const tern_metrics *m, int truth, int pred)
{
    return class_ok(m, truth) && class_ok(m, pred) ? cell(m, truth, pred) : 0;
}

size_t tern_metrics_support(const tern_metrics *m, int cls)
{
    if (!class_ok(m, cls))
        return 0;
    size_t s = 0;
    for (int p = 0; p < m->classes; p++)
        s += cell(m, cls, p);
    return s;
}

double tern_metrics_precision(const tern_metrics *m, int cls)
{
    if (!class_ok(m, cls))
        return NAN;
    size_t predicted = 0;
    for (int t = 0; t < m->classes; t++)
        predicted += cell(m, t, cls);
    return ratio(cell(m, cls, cls), predicted);
}

double tern_metrics_recall(const tern_metrics *m, int cls)
{
    if (!class_ok(m, cls))
        return NAN;
    return ratio(cell(m, cls, cls), tern_metrics_support(m, cls));
}

double tern_metrics_f1(const tern_metrics *m, int cls)
{
    if (!class_ok(m, cls))
        return NAN;
    double p = tern_metrics_precision(m, cls), r = tern_metrics_recall(m, cls);
    return p + r > 0 ? 2 * p * r / (p + r) : 0.0;
}

/* ---- JSON ---------------------------------------------------------------------------------- */

/* Add key: value to obj, taking the reference; false if value is NULL or the set fails. */
static bool put(json_t *obj, const char *key, json_t *value)
{
    return value && json_object_set_new(obj, key, value) == 0;
}

static bool append(json_t *arr, json_t *value)
{
    return value && json_array_append_new(arr, value) == 0;
}

/* A finite double as a JSON real, anything else as null (JSON has no NaN). */
static json_t *real_or_null(double x)
{
    return isfinite(x) ? json_real(x) : json_null();
}

static json_t *build(const tern_metrics *m, const char *const *class_names)
{
    const int C = m->classes;
    json_t *root = json_object(), *topk = NULL, *macro = NULL, *per = NULL, *conf = NULL;
    if (!root)
        return NULL;
    if (!put(root, "count", json_integer((json_int_t)m->count)) ||
        !put(root, "accuracy", json_real(tern_metrics_accuracy(m))) ||
        !put(root, "loss", real_or_null(tern_metrics_loss(m))))
        goto fail;

    /* top_k: {"1": acc, "2": ..., up to max_k} */
    if (!put(root, "top_k", topk = json_object()))
        goto fail;
    for (int k = 1; k <= m->max_k; k++) {
        char key[16];
        snprintf(key, sizeof key, "%d", k);
        if (!put(topk, key, json_real(tern_metrics_topk(m, k))))
            goto fail;
    }

    /* Per-class metrics and their unweighted means over all classes. */
    double sp = 0, sr = 0, sf = 0;
    if (!put(root, "classes", per = json_array()))
        goto fail;
    for (int c = 0; c < C; c++) {
        double p = tern_metrics_precision(m, c), r = tern_metrics_recall(m, c);
        double f = tern_metrics_f1(m, c);
        sp += p;
        sr += r;
        sf += f;
        json_t *e = json_object();
        if (!append(per, e))
            goto fail;
        char fallback[32];
        snprintf(fallback, sizeof fallback, "class %d", c);
        const char *name = class_names && class_names[c] ? class_names[c] : fallback;
        json_t *jname = json_string(name); /* NULL for a name that is not UTF-8 */
        if (!jname)
            jname = json_string(fallback);
        if (!put(e, "name", jname) || !put(e, "index", json_integer(c)) ||
            !put(e, "precision", json_real(p)) || !put(e, "recall", json_real(r)) ||
            !put(e, "f1", json_real(f)) ||
            !put(e, "support", json_integer((json_int_t)tern_metrics_support(m, c))))
            goto fail;
    }
    if (!put(root, "macro", macro = json_object()) ||
        !put(macro, "precision", json_real(sp / C)) || !put(macro, "recall", json_real(sr / C)) ||
        !put(macro, "f1", json_real(sf / C)))
        goto fail;

    /* confusion[truth][pred] */
    if (!put(root, "confusion", conf = json_array()))
        goto fail;
    for (int t = 0; t < C; t++) {
        json_t *row = json_array();
        if (!append(conf, row))
            goto fail;
        for (int p = 0; p < C; p++)
            if (!append(row, json_integer((json_int_t)cell(m, t, p))))
                goto fail;
    }
    return root;

fail:
    json_decref(root);
    return NULL;
}

char *tern_metrics_to_json(const tern_metrics *m, const char *const *class_names)
{
    if (!m)
        return NULL;
    json_t *root = build(m, class_names);
    if (!root)
        return NULL;
    char *s = json_dumps(root, JSON_INDENT(2) | JSON_REAL_PRECISION(12));
    json_decref(root);
    return s;
}
