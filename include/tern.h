/* Tern: federated training of MobileNetV3 image classifiers, in C.
 * Umbrella header: includes every public module. */
#ifndef TERN_H
#define TERN_H

#include "tern/alloc.h"
#include "tern/bn_calib.h"
#include "tern/checkpoint.h"
#include "tern/client.h"
#include "tern/data.h"
#include "tern/dpsgd.h"
#include "tern/image.h"
#include "tern/local.h"
#include "tern/metrics.h"
#include "tern/model.h"
#include "tern/model_io.h"
#include "tern/optim.h"
#include "tern/privacy.h"
#include "tern/protocol.h"
#include "tern/prune.h"
#include "tern/quant.h"
#include "tern/rng.h"
#include "tern/safetensors.h"
#include "tern/server.h"
#include "tern/status.h"
#include "tern/store.h"
#include "tern/strategy.h"

#endif
