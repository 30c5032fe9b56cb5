/* BatchNorm statistics re-estimation ("calibration") of a model, for a federated server.
 *
 * FedAvg averages the clients' weights and, separately, their BatchNorm running statistics;
 * the averaged statistics are not those the averaged weights produce (with non-IID clients
 * the averaged variance also misses the spread between the clients' means), and an averaged
 * model evaluated in eval mode can sit far below its clients (docs/federation.md). The
 * remedy: run the aggregated model forward in training mode over a small calibration set and
 * set every running_mean and running_var to the average of the per-batch statistics, as
 * PyTorch does with momentum=None (a cumulative average with equal weight per batch;
 * running_var averages the unbiased per-batch variances). Weights, biases and the
 * num_batches_tracked counters are left as they were. */
#ifndef TERN_BN_CALIB_H
#define TERN_BN_CALIB_H

#include <stddef.h>

#include "tern/data.h"
#include "tern/model.h"
#include "tern/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tern_bn_calibration_options {
    int batch;         /* largest batch the loader returns (the plan's size), >= 2 */
    int height, width; /* image size of the loader's batches */
} tern_bn_calibration_options;

/* Re-estimate model's BatchNorm running statistics over one epoch of loader (borrowed),
 * which is rewound first (tern_loader_set_epoch 0), so that calls with the same model and
 * loader give the same statistics. Batches of one image are skipped (BatchNorm in training
 * mode needs two values per channel). The model is re-planned for training batches of
 * opt->batch; callers that run inference afterwards plan again. *num_batches (may be NULL)
 * gets the number of batches used. A model without BatchNorm is left unchanged (0 batches).
 * On failure the running statistics are left as they were. Errors: TERN_ERR_INVALID (bad
 * options, a batch larger than opt->batch), TERN_ERR_STATE (no batch of two or more images),
 * TERN_ERR_NOMEM, the loader's errors. */
tern_status tern_bn_calibrate(tern_model *model, tern_loader *loader,
                              const tern_bn_calibration_options *opt, size_t *num_batches,
                              tern_error *err);

#ifdef __cplusplus
}
#endif

#endif
