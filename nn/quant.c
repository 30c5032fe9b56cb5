/* The INT8 scheme's arithmetic, scalar and exact: TFLite's fixed-point requantization
 * (gemmlowp's SaturatingRoundingDoublingHighMul and RoundingDivideByPOT, TFLite's
 * QuantizeMultiplier and MultiplyByQuantizedMultiplier: the fixed requantization mode), its
 * choice of activation parameters, the lookup tables of the activations, and the parameters of
 * the residual add and the gate in either mode. The vector kernels (nn/qgemm.c, nn/qops.c) are
 * tested bit for bit against these. */
#include "tern/quant.h"

#include <math.h>
#include <string.h>

#include "qkernels.h"

int32_t tern_quant_srdhm(int32_t a, int32_t b)
{
    if (a == INT32_MIN && b == INT32_MIN)
        return INT32_MAX;
    int64_t ab = (int64_t)a * (int64_t)b;
    int64_t nudge = ab >= 0 ? ((int64_t)1 << 30) : 1 - ((int64_t)1 << 30);
    /* Division truncates toward zero, as C++'s does in gemmlowp: with the nudge above this is
     * (ab + 2^30) >> 31, round to nearest with ties upward (what NEON's vqrdmulh computes). */
    return (int32_t)((ab + nudge) / ((int64_t)1 << 31));
}

int32_t tern_quant_rdivpot(int32_t x, int exponent)
{
    int32_t mask = (int32_t)(((int64_t)1 << exponent) - 1);
    int32_t remainder = x & mask;
    int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return (x >> exponent) + (remainder > threshold ? 1 : 0);
}

int32_t tern_quant_mbqm(int32_t x, int32_t multiplier, int shift)
{
    int left = shift > 0 ? shift : 0, right = shift > 0 ? 0 : -shift;
    int64_t shifted = (int64_t)x * ((int64_t)1 << left);
    if (shifted > INT32_MAX)
        shifted = INT32_MAX;
    if (shifted < INT32_MIN)
        shifted = INT32_MIN;
    return tern_quant_rdivpot(tern_quant_srdhm((int32_t)shifted, multiplier), right);
}

tern_status tern_quant_multiplier(double real, int32_t *multiplier, int *shift)
{
    if (!(real >= 0) || !isfinite(real))
        return TERN_ERR_INVALID;
    if (real == 0) {
        *multiplier = 0;
        *shift = 0;
        return TERN_OK;
    }
    int e;
    double q = frexp(real, &e); /* real = q * 2^e, q in [0.5, 1) */
    int64_t fixed = (int64_t)round(q * (double)((int64_t)1 << 31));
    if (fixed == ((int64_t)1 << 31)) {
        fixed /= 2;
        e++;
    }
    if (e < -31) { /* every bit would be shifted out: TFLite flushes to zero */
        e = 0;
        fixed = 0;
    }
    if (e > 30)
        return TERN_ERR_INVALID;
    *multiplier = (int32_t)fixed;
    *shift = e;
    return TERN_OK;
}

tern_qparams tern_quant_choose_params(float min, float max)
{
    if (!isfinite(min) || !isfinite(max) || min > max)
        return (tern_qparams){1.0f, 0};
    const double qmin = -128, qmax = 127;
    double rmin = min < 0 ? min : 0, rmax = max > 0 ? max : 0;
    if (rmax - rmin < 1e-8)
        rmax = rmin + 1e-8;
    double scale = (rmax - rmin) / (qmax - qmin);
    double zp_from_min = qmin - rmin / scale, zp_from_max = qmax - rmax / scale;
    double err_min = fabs(qmin) + fabs(rmin / scale), err_max = fabs(qmax) + fabs(rmax / scale);
    double zp = err_min < err_max ? zp_from_min : zp_from_max;
    int32_t nudged = zp < qmin ? (int32_t)qmin : zp > qmax ? (int32_t)qmax : (int32_t)round(zp);
    return (tern_qparams){(float)scale, nudged};
}

int8_t tern_quantize(float x, tern_qparams p)
{
    /* times the reciprocal, as the vector code does (a division per element costs ten times
     * as much); it differs from x / scale by at most one unit in the last place */
    float r = roundf(x * (1.0f / p.scale));
    /* Clamp in float first: a huge or infinite x must not overflow the conversion. */
    float lo = -128.0f - (float)p.zero_point, hi = 127.0f - (float)p.zero_point;
    r = r < lo ? lo : r > hi ? hi : r;
    if (r != r) /* NaN */
        r = 0;
    return (int8_t)((int32_t)r + p.zero_point);
}

float tern_dequantize(int8_t q, tern_qparams p)
{
    return p.scale * (float)((int32_t)q - p.zero_point);
}

/* ---- internal helpers (nn/qkernels.h) ------------------------------------------------------- */

static double act_real(double x, tern_act act)
{
    switch (act) {
    case TERN_ACT_NONE: return x;
    case TERN_ACT_RELU: return x > 0 ? x : 0;
    case TERN_ACT_HARDSWISH: return x * fmin(fmax(x + 3, 0), 6) / 6;
    case TERN_ACT_HARDSIGMOID: return fmin(fmax(x + 3, 0), 6) / 6;
    }
    return x;
}

void tern_quant_lut(int8_t lut[256], tern_act act, tern_qparams in, tern_qparams out)
{
    for (int q = -128; q <= 127; q++) {
        double y = act_real((double)in.scale * (q - in.zero_point), act);
        double r = round(y / (double)out.scale) + out.zero_point;
        lut[(uint8_t)q] = (int8_t)(r < -128 ? -128 : r > 127 ? 127 : r);
    }
}

const char *tern_requant_mode_name(tern_requant_mode mode)
{
    switch (mode) {
    case TERN_REQUANT_FLOAT: return "float";
    case TERN_REQUANT_FIXED: return "fixed";
    }
    return "?";
}

tern_status tern_requant_mode_parse(const char *name, tern_requant_mode *out)
{
    for (int m = TERN_REQUANT_FLOAT; name && m <= TERN_REQUANT_FIXED; m++)
        if (!strcmp(name, tern_requant_mode_name((tern_requant_mode)m))) {
            *out = (tern_requant_mode)m;
            return TERN_OK;
        }
    return TERN_ERR_INVALID;
}

tern_status tern_requant_fixed_params(int32_t *multiplier, int32_t *shift, const double *real,
                                      size_t C)
{
    for (size_t c = 0; c < C; c++) {
        int s;
        tern_status st = tern_quant_multiplier(real[c], &multiplier[c], &s);
        if (st != TERN_OK)
            return st;
        shift[c] = s;
    }
    return TERN_OK;
}

/* TFLite's QuantizeMultiplierSmallerThanOneExp: as tern_quant_multiplier, for real < 1 only
 * (shift <= 0). */
static tern_status multiplier_below_one(double real, int32_t *multiplier, int32_t *shift)
{
    int s;
    if (!(real < 1) || tern_quant_multiplier(real, multiplier, &s) != TERN_OK || s > 0)
        return TERN_ERR_INVALID;
    *shift = s;
    return TERN_OK;
}

tern_status tern_quant_add_params(tern_qadd_params *add, tern_qparams a, tern_qparams b,
                                  tern_qparams out, tern_requant_mode mode)
{
    double so = out.scale;
    *add = (tern_qadd_params){
        .mode = mode, .a_zp = a.zero_point, .b_zp = b.zero_point,
        .a_scale = (float)(a.scale / so), .b_scale = (float)(b.scale / so),
        .bias = (float)(-((double)a.zero_point * a.scale + (double)b.zero_point * b.scale) / so),
        .out_zp = out.zero_point, .qmin = -128, .qmax = 127};
    if (!isfinite(add->a_scale) || !isfinite(add->b_scale) || !isfinite(add->bias) ||
        !(add->a_scale > 0) || !(add->b_scale > 0))
        return TERN_ERR_INVALID;
    if (mode != TERN_REQUANT_FIXED)
        return mode == TERN_REQUANT_FLOAT ? TERN_OK : TERN_ERR_INVALID;
    /* TFLite's int8 ADD: the larger input scale, doubled, as float then double */
    const double twice_max = 2 * (double)(a.scale > b.scale ? a.scale : b.scale);
    const double out_real = twice_max / ((double)(1 << TERN_QADD_LEFT_SHIFT) * so);
    if (multiplier_below_one(a.scale / twice_max, &add->a_mult, &add->a_shift) != TERN_OK ||
        multiplier_below_one(b.scale / twice_max, &add->b_mult, &add->b_shift) != TERN_OK ||
        multiplier_below_one(out_real, &add->out_mult, &add->out_shift) != TERN_OK)
        return TERN_ERR_INVALID;
    return TERN_OK;
}

tern_status tern_quant_gate_params(tern_qgate_params *gate, tern_qparams x, tern_qparams g,
                                   tern_qparams out, tern_requant_mode mode)
{
    const double real = (double)x.scale * (double)g.scale / (double)out.scale;
    *gate = (tern_qgate_params){.mode = mode, .x_zp = x.zero_point, .g_zp = g.zero_point,
                                .out_zp = out.zero_point, .scale = (float)real};
    if (!isfinite(gate->scale) || !(gate->scale > 0))
        return TERN_ERR_INVALID;
    if (mode != TERN_REQUANT_FIXED)
        return mode == TERN_REQUANT_FLOAT ? TERN_OK : TERN_ERR_INVALID;
    int s;
    if (tern_quant_multiplier(real, &gate->mult, &s) != TERN_OK)
        return TERN_ERR_INVALID;
    gate->shift = s;
    return TERN_OK;
}
