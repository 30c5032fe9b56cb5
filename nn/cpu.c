/* CPU feature detection: which kernel level this machine can run. Chosen once per pool (that
 * is, per model) and passed down; the library is built without -march flags, and the SIMD
 * kernels are compiled per function with target attributes. */
#include "tern/model.h"
#include "tern/quant.h"

const char *tern_isa_name(tern_isa isa)
{
    switch (isa) {
    case TERN_ISA_AUTO: return "auto";
    case TERN_ISA_SCALAR: return "scalar";
    case TERN_ISA_AVX2: return "avx2";
    case TERN_ISA_AVX512: return "avx512";
    }
    return "?";
}

static tern_isa best_isa(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return TERN_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return TERN_ISA_AVX2;
#endif
    return TERN_ISA_SCALAR;
}

tern_isa tern_isa_resolve(tern_isa requested)
{
    tern_isa best = best_isa();
    if (requested == TERN_ISA_AUTO || requested > best)
        return best;
    return requested;
}

/* ---- integer kernels (tern/quant.h) ---------------------------------------------------------- */

const char *tern_qisa_name(tern_qisa isa)
{
    switch (isa) {
    case TERN_QISA_AUTO: return "auto";
    case TERN_QISA_SCALAR: return "scalar";
    case TERN_QISA_AVX2: return "avx2";
    case TERN_QISA_AVX512_VNNI: return "avx512vnni";
    }
    return "?";
}

static tern_qisa best_qisa(void)
{
#if defined(__x86_64__) || defined(__i386__)
    if (best_isa() == TERN_ISA_AVX512 && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("avx512vbmi"))
        return TERN_QISA_AVX512_VNNI;
    if (__builtin_cpu_supports("avx2"))
        return TERN_QISA_AVX2;
#endif
    return TERN_QISA_SCALAR;
}

tern_qisa tern_qisa_resolve(tern_qisa requested)
{
    tern_qisa best = best_qisa();
    if (requested == TERN_QISA_AUTO || requested > best)
        return best;
    return requested;
}
