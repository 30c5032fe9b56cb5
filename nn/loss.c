/* Losses over logits that are not part of the network graph: knowledge distillation, used by
 * `tern add-class` to keep a grown model's old-class outputs close to the old model's
 * (learning without forgetting). The softmax cross-entropy lives with the other kernels in
 * ops.c; like it, this works in double and writes float. */
#include <math.h>
#include <stddef.h>

#include "tern/model.h"

tern_status tern_distillation_loss(float *loss, float *dlogits, const float *student_logits,
                                   int student_stride, const float *teacher_logits, int n, int k,
                                   float temperature, float weight)
{
    if (!loss || !student_logits || !teacher_logits || n < 1 || k < 1 || student_stride < k ||
        !(temperature > 0.0f) || !isfinite(temperature) || !(weight >= 0.0f) || !isfinite(weight))
        return TERN_ERR_INVALID;
    const double inv_t = 1.0 / temperature;
    /* With q = softmax(s / T), d/ds_j of weight * T^2 / n * KL(p || q) is
     * weight * T / n * (q_j - p_j). */
    const double gscale = (double)weight * temperature / n;
    double total = 0;
    for (int i = 0; i < n; i++) {
        const float *s = student_logits + (size_t)i * (size_t)student_stride; /* (k) of a row */
        const float *t = teacher_logits + (size_t)i * (size_t)k;              /* (k) */
        /* log-softmax of both around their maxima, so exp never overflows */
        double smax = s[0], tmax = t[0];
        for (int j = 1; j < k; j++) {
            smax = s[j] > smax ? s[j] : smax;
            tmax = t[j] > tmax ? t[j] : tmax;
        }
        double ssum = 0, tsum = 0;
        for (int j = 0; j < k; j++) {
            ssum += exp((s[j] - smax) * inv_t);
            tsum += exp((t[j] - tmax) * inv_t);
        }
        double slse = log(ssum), tlse = log(tsum);
        double kl = 0;
        for (int j = 0; j < k; j++) {
            double logq = (s[j] - smax) * inv_t - slse;
            double logp = (t[j] - tmax) * inv_t - tlse;
            double p = exp(logp);
            kl += p * (logp - logq); /* p = 0 (underflow) contributes 0, as 0 log 0 = 0 */
            if (dlogits)
                dlogits[(size_t)i * (size_t)student_stride + (size_t)j] +=
                    (float)(gscale * (exp(logq) - p));
        }
        total += kl;
    }
    *loss = (float)((double)weight * temperature * temperature * total / n);
    return TERN_OK;
}
