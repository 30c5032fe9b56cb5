/* Local training and evaluation for federated clients: what a tern-client does with a FIT_INS
 * or EVALUATE_INS on its own pictures, as library calls (the client app wires them to
 * tern_client's callbacks; tern sim and the tests use them directly).
 *
 * Configuration keys read from a tern_msg_config (missing keys take the default shown):
 *   epochs        int    local epochs over the training share (1)
 *   max_steps     int    stop after this many steps in total; 0 = no limit (0)
 *   batch_size    int    (32)
 *   lr            float  SGD learning rate (0.05)
 *   momentum      float  SGD momentum (0.9)
 *   weight_decay  float  (0)
 *   proximal_mu   float  FedProx: adds mu * (w - w_global) to the gradient (0)
 *   label_smoothing float  training loss's label smoothing, [0, 1) (0); the reported
 *                        training loss is the smoothed one
 *   seed          int    shuffling, augmentation and dropout for this round (0)
 *   fedbn         bool   keep this client's BatchNorm parameters and statistics: the incoming
 *                        model's BatchNorm tensors are ignored when a local copy exists (false)
 *   dp            string "client": train with DP-SGD (a GroupNorm model), with
 *   dp_noise_multiplier float   sigma, or
 *   dp_target_epsilon   float   sigma chosen so that dp_rounds (int, 1) such rounds spend it
 *   dp_max_grad_norm    float   per-sample clipping norm (1)
 *   dp_delta            float   (1e-5)
 *   dp_accountant       string  "rdp" (default) or "prv"
 *                        The sample rate is batch_size / share size, ceil(1/q) steps an epoch.
 * Unknown keys are ignored; a known key with the wrong type or an out-of-range value is
 * TERN_ERR_INVALID naming it. */
#ifndef TERN_LOCAL_H
#define TERN_LOCAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tern/data.h"
#include "tern/model.h"
#include "tern/protocol.h"
#include "tern/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A client's pictures: a dataset (borrowed) and the index lists of its training and held-out
 * shares (copied at create), with the transforms to apply. */
typedef struct tern_local_data_options {
    const tern_dataset *dataset;
    const size_t *train_indices;
    size_t num_train;              /* >= 1 */
    const size_t *eval_indices;    /* may be NULL with num_eval 0 */
    size_t num_eval;
    tern_transform train_transform;
    tern_transform eval_transform;
    int threads;                   /* model threads; 0 = 1 */
    /* BatchNorm momentum of the model built from the first payload (the momentum is not part
     * of a model file's architecture). 0 = the payload's "bn_momentum" metadata when it has
     * one, else 0.1: torchvision's 0.01 leaves an averaged model's running statistics near
     * their initial values after short local rounds (docs/federation.md). */
    float bn_momentum;
    /* DP-SGD's noise and batch sampling are seeded from this and the round's seed. Keep it
     * secret from the server (the client app reads /dev/urandom). */
    uint64_t dp_secret;
} tern_local_data_options;

typedef struct tern_local tern_local;

/* Everything a client needs across rounds: its data, a model built from the first payload's
 * metadata, and (with fedbn) its own BatchNorm tensors. */
tern_status tern_local_create(const tern_local_data_options *opt, tern_local **out,
                              tern_error *err);
void tern_local_destroy(tern_local **local);

typedef struct tern_local_result {
    uint64_t num_examples;         /* samples seen in the last epoch's share (the share size) */
    double loss;                   /* mean training loss over the round's steps */
    double accuracy;               /* training accuracy over the round's steps */
    uint64_t steps;
    /* DP-SGD (config "dp"): the round's mechanism, as the FIT_RES reports it. */
    bool dp;
    double dp_noise_multiplier, dp_sample_rate;
    double dp_epsilon;             /* this round's local training alone, at dp_delta */
} tern_local_result;

/* The FIT_RES metrics of a result: "loss", "accuracy" when finite, and with DP "dp_steps",
 * "dp_sample_rate", "dp_noise_multiplier", "dp_epsilon" (docs/protocol.md). TERN_ERR_INVALID
 * when m is full. */
tern_status tern_local_result_metrics(const tern_local_result *r, tern_msg_metrics *m);

/* Load the global model (safetensors bytes), train per config, and return the new full state
 * as safetensors bytes (malloc'd, *update_size bytes). cancel (may be NULL) is polled between
 * steps: when it becomes true the call returns TERN_ERR_STATE. Errors: TERN_ERR_FORMAT (a
 * model that does not parse or changes architecture between rounds), TERN_ERR_INVALID
 * (config), TERN_ERR_NOMEM, loader errors. */
tern_status tern_local_fit(tern_local *local, const void *model, size_t model_size,
                           const tern_msg_config *config, const volatile bool *cancel,
                           void **update, size_t *update_size, tern_local_result *result,
                           tern_error *err);

/* Evaluate the model (safetensors bytes) on the held-out share in eval mode: mean
 * cross-entropy and top-1 accuracy. TERN_ERR_STATE when the share is empty. */
tern_status tern_local_evaluate(tern_local *local, const void *model, size_t model_size,
                                const tern_msg_config *config, const volatile bool *cancel,
                                tern_local_result *result, tern_error *err);

#ifdef __cplusplus
}
#endif

#endif
