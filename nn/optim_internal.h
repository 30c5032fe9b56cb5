/* The flat-array core of tern_optimizer, shared with tern/checkpoint and the tests: option
 * validation, the state layout of a configuration, and one update over plain arrays (the only
 * update loop; tern_optimizer_step calls it on the model's blocks). Not installed. */
#ifndef TERN_OPTIM_INTERNAL_H
#define TERN_OPTIM_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "tern/optim.h"

#define TERN_OPTIM_MAX_STATES 3

/* Check in's ranges for its kind; on success *canon (may be NULL) is in with the fields the
 * kind does not use zeroed. TERN_ERR_INVALID with detail in err. */
tern_status tern_optim_validate(const tern_optimizer_options *in, tern_optimizer_options *canon,
                                tern_error *err);
/* Names (static storage) of the state blocks a validated configuration uses, in order;
 * returns how many (0 .. TERN_OPTIM_MAX_STATES). */
size_t tern_optim_state_names(const tern_optimizer_options *o,
                              const char *names[TERN_OPTIM_MAX_STATES]);
/* One update of n parameters p from gradients g. step counts the steps taken including this
 * one (>= 1; Adam's t, and SGD's first step when 1). state[k] (n floats each) is the k-th
 * block named by tern_optim_state_names, zero before the first step. */
void tern_optim_update(const tern_optimizer_options *o, uint64_t step, float *p, const float *g,
                       float *const *state, size_t n);

/* Replace the hyper-parameters of opt (restoring a checkpoint). o must be validated and use
 * the same state blocks as opt's own options. */
void tern_optim_set_options(tern_optimizer *opt, const tern_optimizer_options *o);

#endif
