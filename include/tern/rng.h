/* A small, fast, seedable random generator (xoshiro256**, seeded through splitmix64).
 * State is a plain value owned by the caller: no hidden globals, copies are independent,
 * and saving the struct saves the stream position. */
#ifndef TERN_RNG_H
#define TERN_RNG_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tern_rng {
    uint64_t s[4];
} tern_rng;

/* Deterministic state for a 64-bit seed (any value, 0 included). */
void tern_rng_seed(tern_rng *rng, uint64_t seed);
uint64_t tern_rng_next(tern_rng *rng);
/* Uniform in [0, 1) with 24 random bits. */
float tern_rng_uniform(tern_rng *rng);
/* Uniform in [0, 1) with 53 random bits. */
double tern_rng_uniform_double(tern_rng *rng);
/* Standard normal (Box-Muller; consumes two uniforms per call, keeps no spare). */
double tern_rng_normal(tern_rng *rng);

#ifdef __cplusplus
}
#endif

#endif
