/* Privacy accountants for DP-SGD (see include/tern/privacy.h).
 *
 * Each computation follows Opacus (opacus/accountants/analysis/rdp.py and the analysis/prv
 * package) operation for operation, so that the numbers agree with Opacus to the last few bits
 * rather than merely within the bounds' slack: the same series, the same stopping rules, the
 * same order of floating-point operations where it matters (scipy's binom is redone the way
 * scipy computes it). Where Opacus leans on a library routine whose last bits cannot matter
 * (scipy's log_ndtr, its adaptive quadrature for a PRV's mean, numpy's FFT), an accurate
 * equivalent is used: the same formulas on libm's erfc, a Gauss-Kronrod rule run to a far
 * tighter tolerance than scipy's, and FFTW.
 *
 * The accountants live in nn/ beside the optimizers because they are plain numerics used by
 * DP-SGD training and by the server alike; they depend on nothing federated. */
#include "tern/privacy.h"

#define FFTW_NO_Complex /* fftw_complex as double[2], whatever includes complex.h */
#include <fftw3.h>

#include <complex.h>
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nn/util.h"

#define SQRT2 1.41421356237309504880
#define LOG_2PI 1.83787706640934548356
#define DEFAULT_EPS_ERROR 0.01
#define DEFAULT_PRV_MAX_POINTS ((size_t)1 << 25)
#define MAX_SIGMA 1e6 /* Opacus's MAX_SIGMA in get_noise_multiplier */

/* ---- default orders ------------------------------------------------------------------------ */

enum { NDEFAULT_ORDERS = 99 + 52 };

/* Opacus: [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)); 1 + x / 10.0 rounds
 * twice, in C as in Python. */
#define T(x) 1 + x / 10.0
static const double DEFAULT_ORDERS[NDEFAULT_ORDERS] = {
    T(1), T(2), T(3), T(4), T(5), T(6), T(7), T(8), T(9), T(10), T(11),
    T(12), T(13), T(14), T(15), T(16), T(17), T(18), T(19), T(20), T(21), T(22),
    T(23), T(24), T(25), T(26), T(27), T(28), T(29), T(30), T(31), T(32), T(33),
    T(34), T(35), T(36), T(37), T(38), T(39), T(40), T(41), T(42), T(43), T(44),
    T(45), T(46), T(47), T(48), T(49), T(50), T(51), T(52), T(53), T(54), T(55),
    T(56), T(57), T(58), T(59), T(60), T(61), T(62), T(63), T(64), T(65), T(66),
    T(67), T(68), T(69), T(70), T(71), T(72), T(73), T(74), T(75), T(76), T(77),
    T(78), T(79), T(80), T(81), T(82), T(83), T(84), T(85), T(86), T(87), T(88),
    T(89), T(90), T(91), T(92), T(93), T(94), T(95), T(96), T(97), T(98), T(99),
    12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
    25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37,
    38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50,
    51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
};
#undef T

size_t tern_rdp_default_orders(const double **orders)
{
    if (orders)
        *orders = DEFAULT_ORDERS;
    return NDEFAULT_ORDERS;
}

/* ---- argument checks ----------------------------------------------------------------------- */

static bool valid_rate(double q) { return q > 0 && q <= 1; }
static bool valid_sigma(double s) { return s > 0 && isfinite(s); }
static bool valid_delta(double d) { return d > 0 && d < 1; }
static bool valid_order(double a) { return a > 1; } /* INFINITY passes; NAN does not */

/* ---- log-space arithmetic (Opacus's _log_add, _log_sub) ------------------------------------ */

static double log_add(double x, double y)
{
    double a = y < x ? y : x, b = x < y ? y : x;
    if (a == -INFINITY)
        return b;
    return log1p(exp(a - b)) + b;
}

/* x - y in log space; NAN (Opacus raises) when the difference would be negative. */
static double log_sub(double x, double y)
{
    if (x < y)
        return NAN;
    if (y == -INFINITY)
        return x;
    if (x == y)
        return -INFINITY;
    double d = expm1(x - y);
    if (isinf(d)) /* Python's math.expm1 raises OverflowError, which Opacus maps to x */
        return x;
    return log(d) + y;
}

/* scipy.special.binom(n, k) for an integer k >= 0 by scipy's multiplication formula, which
 * scipy uses for min(k, n - k) < 20; beyond, scipy's 1 / ((n + 1) B(n - k + 1, k + 1)) agrees
 * with it to a few ulps for integer n (the only use here past 20). */
static double binom(double n, int64_t k)
{
    double kx = (double)k, nx = floor(n);
    if (nx == n && kx > nx / 2 && nx > 0)
        kx = nx - kx;
    double num = 1.0, den = 1.0;
    for (int64_t i = 1; i <= (int64_t)kx; i++) {
        num *= (double)i + n - kx;
        den *= (double)i;
        if (fabs(num) > 1e50) {
            num /= den;
            den = 1.0;
        }
    }
    return num / den;
}

/* log(Phi(a)), the standard normal CDF, as scipy.special.log_ndtr: log1p(-Phi(-a)) where Phi is
 * near 1, the log of erfc in the body, and the asymptotic series of the Mills ratio below -20
 * (where erfc would underflow). */
static double log_ndtr(double a)
{
    double t = a / SQRT2;
    if (a >= -1)
        return log1p(-erfc(t) / 2);
    if (a > -20)
        return log(erfc(-t) / 2);
    double log_lhs = -0.5 * a * a - log(-a) - 0.5 * LOG_2PI;
    double last = 0, rhs = 1, numerator = 1, denom_factor = 1, denom_cons = 1 / (a * a);
    int sign = 1;
    for (int i = 1; fabs(last - rhs) > DBL_EPSILON && i < 1000; i++) {
        last = rhs;
        sign = -sign;
        denom_factor *= denom_cons;
        numerator *= 2 * i - 1;
        rhs += sign * numerator * denom_factor;
    }
    return log_lhs + log(rhs);
}

/* Opacus's _log_erfc: log(erfc(x)), accurate for large x. */
static double log_erfc(double x) { return log(2.0) + log_ndtr(-x * SQRT2); }

/* ---- RDP of the sampled Gaussian mechanism ------------------------------------------------- */

/* log(A_alpha) for integer alpha: the binomial expansion (arXiv:1908.10530, section 3.3). */
static double log_a_int(double q, double sigma, int64_t alpha)
{
    double log_a = -INFINITY, lq = log(q), l1q = log(1 - q), s2 = sigma * sigma;
    for (int64_t i = 0; i <= alpha; i++) {
        double log_coef = log(binom((double)alpha, i)) + (double)i * lq + (double)(alpha - i) * l1q;
        double s = log_coef + (double)(i * i - i) / (2 * s2);
        log_a = log_add(log_a, s);
    }
    return log_a;
}

/* log(A_alpha) for fractional alpha: the two erfc series, until both terms are below e^-30. */
static double log_a_frac(double q, double sigma, double alpha)
{
    double log_a0 = -INFINITY, log_a1 = -INFINITY, s2 = sigma * sigma;
    double z0 = s2 * log(1 / q - 1) + 0.5, lq = log(q), l1q = log(1 - q);
    double scale = SQRT2 * sigma;
    double coef = 1;
    for (int64_t i = 0;; i++) {
        /* scipy's formula for the first terms, which carry the sum; after them the recurrence,
         * since the product formula overflows for the thousands of terms the series can take
         * to fall below e^-30 (scipy switches to the beta function there). */
        coef = i < 20 ? binom(alpha, i) : coef * (alpha - (double)(i - 1)) / (double)i;
        double log_coef = log(fabs(coef)), fi = (double)i;
        double j = alpha - fi;
        double log_t0 = log_coef + fi * lq + j * l1q;
        double log_t1 = log_coef + j * lq + fi * l1q;
        double log_e0 = log(0.5) + log_erfc((fi - z0) / scale);
        double log_e1 = log(0.5) + log_erfc((z0 - j) / scale);
        double log_s0 = log_t0 + (double)(i * i - i) / (2 * s2) + log_e0;
        double log_s1 = log_t1 + (j * j - j) / (2 * s2) + log_e1;
        if (coef > 0) {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0);
            log_a1 = log_sub(log_a1, log_s1);
        }
        if (fmax(log_s0, log_s1) < -30)
            break;
        if (isnan(log_a0) || isnan(log_a1) || i > 10000000)
            return NAN; /* Opacus raises here; the order is then skipped */
    }
    return log_add(log_a0, log_a1);
}

/* Opacus's _compute_rdp for q in (0, 1], sigma > 0, alpha > 1. */
static double rdp_one(double q, double sigma, double alpha)
{
    if (q == 1.0)
        return alpha / (2 * (sigma * sigma));
    if (isinf(alpha))
        return INFINITY;
    double log_a = alpha == floor(alpha) && alpha < 9.2e18 ? log_a_int(q, sigma, (int64_t)alpha)
                                                           : log_a_frac(q, sigma, alpha);
    return log_a / (alpha - 1);
}

tern_status tern_rdp_compute(double *rdp, double sample_rate, double noise_multiplier,
                             int64_t steps, const double *orders, size_t norders)
{
    if (!rdp || !orders || !valid_rate(sample_rate) || !valid_sigma(noise_multiplier) ||
        steps < 0)
        return TERN_ERR_INVALID;
    for (size_t i = 0; i < norders; i++)
        if (!valid_order(orders[i]))
            return TERN_ERR_INVALID;
    for (size_t i = 0; i < norders; i++)
        rdp[i] = rdp_one(sample_rate, noise_multiplier, orders[i]) * (double)steps;
    return TERN_OK;
}

tern_status tern_rdp_epsilon(double *epsilon, double *best_order, const double *orders,
                             const double *rdp, size_t n, double delta)
{
    if (!epsilon || !orders || !rdp || n == 0 || !valid_delta(delta))
        return TERN_ERR_INVALID;
    for (size_t i = 0; i < n; i++)
        if (!valid_order(orders[i]))
            return TERN_ERR_INVALID;
    double best = NAN, order = NAN, log_delta = log(delta);
    for (size_t i = 0; i < n; i++) {
        double a = orders[i];
        double eps = rdp[i] - (log_delta + log(a)) / (a - 1) + log((a - 1) / a);
        if (!isnan(eps) && (isnan(best) || eps < best)) { /* numpy's nanargmin: first minimum */
            best = eps;
            order = a;
        }
    }
    *epsilon = isnan(best) ? INFINITY : best;
    if (best_order)
        *best_order = order;
    return TERN_OK;
}

/* Epsilon of a history (entries with zero steps contribute nothing) at the given orders;
 * rdp is scratch of norders doubles. */
static void history_rdp_epsilon(const tern_dp_entry *h, size_t n, const double *orders,
                                size_t norders, double delta, double *rdp, double *epsilon,
                                double *best_order)
{
    for (size_t k = 0; k < norders; k++)
        rdp[k] = 0;
    for (size_t e = 0; e < n; e++) {
        if (h[e].steps == 0)
            continue;
        for (size_t k = 0; k < norders; k++)
            rdp[k] += rdp_one(h[e].sample_rate, h[e].noise_multiplier, orders[k]) *
                      (double)h[e].steps;
    }
    tern_rdp_epsilon(epsilon, best_order, orders, rdp, norders, delta);
}

/* ---- PRV: the privacy loss random variable of the Poisson-subsampled Gaussian -------------- */

/* Its CDF (Gopi et al., proposition B4), as Opacus's PoissonSubsampledGaussianPRV.cdf. */
typedef struct prv {
    double q, sigma, log_1mq;
} prv;

static double prv_cdf(const prv *p, double t)
{
    if (!(t > p->log_1mq))
        return 0.0;
    double q = p->q, sigma = p->sigma, s2 = sigma * sigma;
    double z = log((exp(t) + q - 1) / q);
    return -q * erfc((2 * z * s2 - 1) / (2 * SQRT2 * sigma)) / 2 -
           (1 - q) * erfc((2 * z * s2 + 1) / (2 * SQRT2 * sigma)) / 2 + 1.0;
}

/* The PRV conditioned on [t_min, t_max) (TruncatedPrivacyRandomVariable). */
typedef struct tprv {
    prv p;
    double t_min, t_max, cdf_min, mass;
} tprv;

static tprv tprv_make(prv p, double t_min, double t_max)
{
    tprv t = {.p = p, .t_min = t_min, .t_max = t_max};
    t.cdf_min = prv_cdf(&p, t_min);
    t.mass = prv_cdf(&p, t_max) - t.cdf_min;
    return t;
}

static double tprv_cdf(const tprv *t, double x)
{
    if (x < t->t_min)
        return 0.0;
    if (x < t->t_max)
        return (prv_cdf(&t->p, x) - t->cdf_min) / t->mass;
    return 1.0;
}

/* 21-point Gauss-Kronrod rule (QUADPACK's qk21) on [a, b]; *err = |K21 - G10|. */
static const double GK_X[11] = {
    0.995657163025808080735527280689003, 0.973906528517171720077964012084452,
    0.930157491355708226001207180059508, 0.865063366688984510732096688423493,
    0.780817726586416897063717578345042, 0.679409568299024406234327365114874,
    0.562757134668604683339000099272694, 0.433395394129247190799265943165784,
    0.294392862701460198131126603103866, 0.148874338981631210884826001129720,
    0.000000000000000000000000000000000};
static const double GK_WK[11] = {
    0.011694638867371874278064396062192, 0.032558162307964727478818972459390,
    0.054755896574351996031381300244580, 0.075039674810919952767043140916190,
    0.093125454583697605535065465083366, 0.109387158802297641899210590325805,
    0.123491976262065851077208271437891, 0.134709217311473325928054001771707,
    0.142775938577060080797094273138717, 0.147739104901338491374841515972068,
    0.149445554002916905664936468389821};
static const double GK_WG[5] = {
    0.066671344308688137593568809893332, 0.149451349150580593145776339657697,
    0.219086362515982043995534934228163, 0.269266719309996355091226921569469,
    0.295524224714752870173892994651338};

/* The rule with QUADPACK's error estimate: |K21 - G10| sharpened by (200 e / resasc)^1.5 for
 * smooth integrands, and never below 50 ulps of the integral of |f| (the rounding floor). */
static double gk21(const tprv *t, double a, double b, double *err)
{
    double c = 0.5 * (a + b), h = 0.5 * (b - a), fv[21];
    double fc = tprv_cdf(t, c), k = fc * GK_WK[10], g = 0, kabs = fabs(fc) * GK_WK[10];
    for (int i = 0; i < 10; i++) {
        fv[2 * i] = tprv_cdf(t, c - h * GK_X[i]);
        fv[2 * i + 1] = tprv_cdf(t, c + h * GK_X[i]);
        double f = fv[2 * i] + fv[2 * i + 1];
        k += GK_WK[i] * f;
        kabs += GK_WK[i] * (fabs(fv[2 * i]) + fabs(fv[2 * i + 1]));
        if (i % 2 == 1)
            g += GK_WG[i / 2] * f;
    }
    double mean = 0.5 * k, asc = GK_WK[10] * fabs(fc - mean);
    for (int i = 0; i < 10; i++)
        asc += GK_WK[i] * (fabs(fv[2 * i] - mean) + fabs(fv[2 * i + 1] - mean));
    double e = fabs((k - g) * h), resabs = kabs * fabs(h), resasc = asc * fabs(h);
    if (resasc != 0 && e != 0)
        e = resasc * fmin(1.0, pow(200 * e / resasc, 1.5));
    if (resabs > DBL_MIN / (50 * DBL_EPSILON))
        e = fmax(50 * DBL_EPSILON * resabs, e);
    *err = e;
    return k * h;
}

/* Adaptive bisection until the error estimate is below tol_per_unit times the interval's
 * width, or the interval's share of the rounding floor: far tighter than
 * scipy.integrate.quad's 1.5e-8, so that the result is the integral itself (which is what quad
 * approximates). */
static double integrate_cdf(const tprv *t, double a, double b, double tol_per_unit, int depth)
{
    double err, r = gk21(t, a, b, &err);
    double floor_err = 50 * DBL_EPSILON * fabs(r) + DBL_MIN;
    if (err <= fmax(tol_per_unit * (b - a), floor_err) || depth >= 30)
        return r;
    double m = 0.5 * (a + b);
    return integrate_cdf(t, a, m, tol_per_unit, depth + 1) +
           integrate_cdf(t, m, b, tol_per_unit, depth + 1);
}

/* E[T] of the truncated PRV by parts, over Opacus's breakpoints around 0. */
static double tprv_mean(const tprv *t)
{
    double pts[12] = {t->t_min, -1e-1, -1e-2, -1e-3, -1e-4, -1e-5,
                      1e-5,     1e-4,  1e-3,  1e-2,  1e-1,  t->t_max};
    double mean = 0.0;
    for (int i = 0; i < 11; i++) {
        double l = pts[i], r = pts[i + 1];
        double integral = integrate_cdf(t, l, r, 1e-14, 0);
        mean += r * tprv_cdf(t, r) - l * tprv_cdf(t, l) - integral;
    }
    return mean;
}

/* A grid of `size` (even) points from t_min to t_max; `shifts` is how far it was moved. */
typedef struct domain {
    double t_min, t_max, shifts;
    size_t size;
} domain;

static double domain_dt(const domain *d) { return (d->t_max - d->t_min) / (double)(d->size - 1); }

static domain domain_shift(domain d, double by)
{
    d.t_min += by;
    d.t_max += by;
    d.shifts += by;
    return d;
}

/* numpy.linspace(t_min, t_max, size)[i]. */
static double domain_t(const domain *d, size_t i)
{
    if (i == d->size - 1)
        return d->t_max;
    return (double)i * ((d->t_max - d->t_min) / (double)(d->size - 1)) + d->t_min;
}

typedef struct prv_ctx {
    char *msg;
    size_t msg_size;
    size_t max_points;
} prv_ctx;

static tern_status prv_fail(prv_ctx *c, tern_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static tern_status prv_fail(prv_ctx *c, tern_status s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->msg, c->msg_size, fmt, ap);
    va_end(ap);
    return s;
}

/* Domain.create_aligned(-L, L, dt). */
static tern_status domain_aligned(prv_ctx *c, double lo, double hi, double dt, domain *out)
{
    double t_min = floor(lo / dt) * dt, t_max = ceil(hi / dt) * dt;
    double points = nearbyint((t_max - t_min) / dt) + 1; /* np.round: half to even */
    if (!(points <= (double)c->max_points))
        return prv_fail(c, TERN_ERR_UNSUPPORTED,
                        "the PRV accountant would need %.3g points (limit %zu); use the RDP "
                        "accountant or a larger eps_error",
                        points, c->max_points);
    domain d = {.t_min = t_min, .t_max = t_max, .size = (size_t)points};
    if (d.size % 2 == 1) {
        d.size += 1;
        d.t_max += dt;
    }
    if (fabs(domain_dt(&d) - dt) / dt >= 1e-8)
        return prv_fail(c, TERN_ERR_UNSUPPORTED, "PRV domain mesh is not representable");
    *out = d;
    return TERN_OK;
}

/* FFTW's planner keeps global state and is not thread-safe; executing plans is. */
static pthread_mutex_t fftw_planner_lock = PTHREAD_MUTEX_INITIALIZER;

typedef struct fft_pair {
    fftw_plan fwd, inv;
} fft_pair;

/* Plans an r2c / c2r pair of size n over the given buffers (FFTW_ESTIMATE: no measuring, the
 * buffers are left alone). */
static bool fft_plan(fft_pair *p, size_t n, double *real, fftw_complex *freq)
{
    pthread_mutex_lock(&fftw_planner_lock);
    p->fwd = fftw_plan_dft_r2c_1d((int)n, real, freq, FFTW_ESTIMATE);
    p->inv = fftw_plan_dft_c2r_1d((int)n, freq, real, FFTW_ESTIMATE);
    pthread_mutex_unlock(&fftw_planner_lock);
    return p->fwd && p->inv;
}

static void fft_destroy(fft_pair *p)
{
    pthread_mutex_lock(&fftw_planner_lock);
    if (p->fwd)
        fftw_destroy_plan(p->fwd);
    if (p->inv)
        fftw_destroy_plan(p->inv);
    pthread_mutex_unlock(&fftw_planner_lock);
    p->fwd = p->inv = NULL;
}

/* z^n as numpy's complex power computes it: repeated squaring for |n| < 100, else cpow. */
static double complex cpow_int(double complex z, int64_t n)
{
    if (creal(z) == 0 && cimag(z) == 0)
        return 0;
    if (n == 1)
        return z;
    if (n >= 100)
        return cpow(z, (double)n);
    double ar = 1, ai = 0, pr = creal(z), pi = cimag(z);
    for (int64_t mask = 1;; mask <<= 1) {
        if (n & mask) {
            double r = ar * pr - ai * pi, i = ar * pi + ai * pr;
            ar = r;
            ai = i;
        }
        if (n < mask << 1)
            break;
        double r = pr * pr - pi * pi, i = pr * pi + pi * pr;
        pr = r;
        pi = i;
    }
    return CMPLX(ar, ai);
}

/* A discretized PRV: pmf over a domain. */
typedef struct dprv {
    double *pmf;
    domain dom;
} dprv;

/* discretize(TruncatedPRV(p, dom), dom) then _compose_fourier(., n), into out->pmf (N doubles,
 * fftw_malloc'd by the caller). real and freq are scratch for the size-N plans. */
static tern_status discretize_compose(prv_ctx *c, const prv *p, domain dom, int64_t n,
                                      const fft_pair *plans, double *real, fftw_complex *freq,
                                      dprv *out)
{
    size_t size = dom.size;
    tprv t = tprv_make(*p, dom.t_min, dom.t_max);
    double dt = domain_dt(&dom);
    long double mean_d = 0;
    for (size_t i = 0; i < size; i++) {
        double tc = domain_t(&dom, i);
        double pm = tprv_cdf(&t, tc + dt / 2) - tprv_cdf(&t, tc - dt / 2);
        real[i] = pm;
        mean_d += (long double)tc * pm;
    }
    double mean_shift = tprv_mean(&t) - (double)mean_d;
    if (!(fabs(mean_shift) < dt / 2))
        return prv_fail(c, TERN_ERR_UNSUPPORTED,
                        "discrete mean differs significantly from continuous mean "
                        "(noise multiplier %g, sample rate %g)",
                        p->sigma, p->q);
    dom = domain_shift(dom, mean_shift);

    fftw_execute_dft_r2c(plans->fwd, real, freq);
    for (size_t k = 0; k < size / 2 + 1; k++) {
        double complex z = CMPLX(freq[k][0], freq[k][1]);
        z = cpow_int(z, n);
        freq[k][0] = creal(z);
        freq[k][1] = cimag(z);
    }
    fftw_execute_dft_c2r(plans->inv, freq, real);
    /* np.roll by n - 1 (plus half the size for even n) puts the sum of n grid values back on
     * the grid. */
    size_t m = (size_t)((n - 1) % (int64_t)size);
    if (n % 2 == 0)
        m = (m + size / 2) % size;
    for (size_t i = 0; i < size; i++)
        out->pmf[(i + m) % size] = real[i] / (double)size;
    out->dom = domain_shift(dom, dom.shifts * (double)(n - 1));
    return TERN_OK;
}

/* scipy.signal.convolve(left, right, mode="same") through an FFT of size 2N; the result
 * replaces left. */
static tern_status convolve_same(prv_ctx *c, dprv *left, const dprv *right)
{
    size_t n = left->dom.size, m = 2 * n;
    double *a = fftw_malloc(sizeof(double) * m), *b = fftw_malloc(sizeof(double) * m);
    fftw_complex *fa = fftw_malloc(sizeof(fftw_complex) * (m / 2 + 1));
    fftw_complex *fb = fftw_malloc(sizeof(fftw_complex) * (m / 2 + 1));
    fft_pair plans = {0};
    tern_status s = TERN_OK;
    if (!a || !b || !fa || !fb) {
        s = prv_fail(c, TERN_ERR_NOMEM, "out of memory composing PRVs");
        goto done;
    }
    if (!fft_plan(&plans, m, a, fa)) {
        s = prv_fail(c, TERN_ERR_NOMEM, "FFTW could not plan a size-%zu transform", m);
        goto done;
    }
    memcpy(a, left->pmf, sizeof(double) * n);
    memset(a + n, 0, sizeof(double) * n);
    memcpy(b, right->pmf, sizeof(double) * n);
    memset(b + n, 0, sizeof(double) * n);
    fftw_execute_dft_r2c(plans.fwd, a, fa);
    fftw_execute_dft_r2c(plans.fwd, b, fb);
    for (size_t k = 0; k < m / 2 + 1; k++) {
        double re = fa[k][0] * fb[k][0] - fa[k][1] * fb[k][1];
        double im = fa[k][0] * fb[k][1] + fa[k][1] * fb[k][0];
        fa[k][0] = re;
        fa[k][1] = im;
    }
    fftw_execute_dft_c2r(plans.inv, fa, a);
    size_t start = (n - 1) / 2; /* centre of the length 2N - 1 full convolution */
    for (size_t i = 0; i < n; i++)
        left->pmf[i] = a[start + i] / (double)m;
    left->dom = domain_shift(left->dom, right->dom.shifts);
done:
    fft_destroy(&plans);
    fftw_free(a);
    fftw_free(b);
    fftw_free(fa);
    fftw_free(fb);
    return s;
}

/* numpy.searchsorted(a, v, side="left"). */
static size_t search_left(const double *a, size_t n, double v)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + ((hi - lo) >> 1);
        if (a[mid] < v)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* DiscretePRV.compute_epsilon: (lower, estimate, upper). */
static tern_status dprv_epsilon(prv_ctx *c, const dprv *d, double delta, double delta_error,
                                double eps_error, double out[3])
{
    size_t n = d->dom.size;
    if (LDBL_EPSILON * (long double)n > (long double)(delta - delta_error))
        return prv_fail(c, TERN_ERR_UNSUPPORTED,
                        "floating-point error would dominate for delta %g with %zu points", delta,
                        n);
    double *d1 = malloc(sizeof(double) * n), *d2 = malloc(sizeof(double) * n);
    double *nd = malloc(sizeof(double) * n);
    tern_status s = TERN_OK;
    if (!d1 || !d2 || !nd) {
        s = prv_fail(c, TERN_ERR_NOMEM, "out of memory reading epsilon off the PRV");
        goto done;
    }
    double c1 = 0, c2 = 0; /* numpy's cumsum of the flipped arrays: sequential */
    for (size_t k = n; k-- > 0;) {
        double t = domain_t(&d->dom, k);
        c1 += d->pmf[k];
        c2 += d->pmf[k] * exp(-t);
        d1[k] = c1;
        d2[k] = c2;
    }
    for (size_t k = 0; k < n; k++)
        nd[k] = exp(domain_t(&d->dom, k)) * d2[k] - d1[k];
    double targets[3] = {delta + delta_error, delta, delta - delta_error};
    for (int j = 0; j < 3; j++) {
        size_t i = search_left(nd, n, -targets[j]);
        if (i == 0 || i >= n) {
            s = prv_fail(c, TERN_ERR_UNSUPPORTED, "cannot compute epsilon from the PRV "
                                                  "(delta %g outside its range)",
                         targets[j]);
            goto done;
        }
        out[j] = log((d1[i] - targets[j]) / d2[i]);
    }
    out[0] -= eps_error;
    out[2] += eps_error;
done:
    free(d1);
    free(d2);
    free(nd);
    return s;
}

/* PRVAccountant.get_epsilon's three values for a history of entries with steps > 0. */
static tern_status prv_epsilon(prv_ctx *c, const tern_dp_entry *h, size_t n, double delta,
                               double eps_error, double delta_error, double out[3])
{
    const double *orders;
    size_t norders = tern_rdp_default_orders(&orders);
    double rdp[NDEFAULT_ORDERS];
    double total = 0;
    for (size_t e = 0; e < n; e++)
        total += (double)h[e].steps;

    /* compute_safe_domain_size (Gopi et al., remark 5.6) */
    double l_max, eps1;
    history_rdp_epsilon(h, n, orders, norders, delta_error / 4, rdp, &l_max, NULL);
    for (size_t e = 0; e < n; e++) {
        tern_dp_entry one = h[e];
        one.steps = 1;
        history_rdp_epsilon(&one, 1, orders, norders, delta_error / (8 * total), rdp, &eps1,
                            NULL);
        l_max = fmax(l_max, eps1);
    }
    double L = fmax(l_max, eps_error) + 3;
    if (!isfinite(L))
        return prv_fail(c, TERN_ERR_UNSUPPORTED,
                        "the PRV domain is unbounded (the RDP bound it starts from is infinite)");
    double mesh = eps_error / sqrt(total * log(12 / delta_error) / 2);
    domain dom = {0};
    tern_status s = domain_aligned(c, -L, L, mesh, &dom);
    if (s != TERN_OK)
        return s;

    /* Every entry's discretized, self-composed PRV is alive at once (the convolution tree
     * needs them all), so the n buffers are owned by `bufs` and freed together at the end. */
    size_t size = dom.size;
    double **bufs = calloc(n, sizeof *bufs);
    dprv *parts = calloc(n, sizeof *parts), *next = calloc(n, sizeof *next);
    double *real = fftw_malloc(sizeof(double) * size);
    fftw_complex *freq = fftw_malloc(sizeof(fftw_complex) * (size / 2 + 1));
    fft_pair plans = {0};
    if (!bufs || !parts || !next || !real || !freq) {
        s = prv_fail(c, TERN_ERR_NOMEM, "out of memory for a %zu-point PRV", size);
        goto done;
    }
    if (!fft_plan(&plans, size, real, freq)) {
        s = prv_fail(c, TERN_ERR_NOMEM, "FFTW could not plan a size-%zu transform", size);
        goto done;
    }
    for (size_t e = 0; e < n; e++) {
        if (!(bufs[e] = parts[e].pmf = fftw_malloc(sizeof(double) * size))) {
            s = prv_fail(c, TERN_ERR_NOMEM, "out of memory for a %zu-point PRV", size);
            goto done;
        }
        prv p = {.q = h[e].sample_rate, .sigma = h[e].noise_multiplier,
                 .log_1mq = log(1 - h[e].sample_rate)};
        if ((s = discretize_compose(c, &p, dom, h[e].steps, &plans, real, freq, &parts[e])))
            goto done;
    }
    /* _compose_convolution_tree: convolve neighbours pairwise until one is left; with an odd
     * count the last one goes first into the next round. */
    for (size_t live = n; live > 1;) {
        size_t k = 0, pairs = live / 2;
        if (live % 2 == 1)
            next[k++] = parts[live - 1];
        for (size_t i = 0; i < pairs; i++) {
            if ((s = convolve_same(c, &parts[2 * i], &parts[2 * i + 1])))
                goto done;
            next[k++] = parts[2 * i];
        }
        memcpy(parts, next, k * sizeof *parts);
        live = k;
    }
    s = dprv_epsilon(c, &parts[0], delta, delta_error, eps_error, out);
done:
    fft_destroy(&plans);
    if (bufs)
        for (size_t e = 0; e < n; e++)
            fftw_free(bufs[e]);
    free(bufs);
    free(parts);
    free(next);
    fftw_free(real);
    fftw_free(freq);
    return s;
}

/* ---- the accountant object ----------------------------------------------------------------- */

struct tern_accountant {
    tern_accountant_kind kind;
    double *orders;
    size_t norders;
    double eps_error, delta_error;
    size_t prv_max_points;
    tern_dp_entry *hist;
    size_t n, cap;
    char error[256];
};

const char *tern_accountant_kind_name(tern_accountant_kind kind)
{
    switch (kind) {
    case TERN_ACCOUNTANT_RDP: return "rdp";
    case TERN_ACCOUNTANT_PRV: return "prv";
    }
    return "?";
}

tern_status tern_accountant_kind_parse(const char *name, tern_accountant_kind *out)
{
    if (!name || !out)
        return TERN_ERR_INVALID;
    if (strcmp(name, "rdp") == 0)
        *out = TERN_ACCOUNTANT_RDP;
    else if (strcmp(name, "prv") == 0)
        *out = TERN_ACCOUNTANT_PRV;
    else
        return TERN_ERR_INVALID;
    return TERN_OK;
}

tern_status tern_accountant_create(const tern_accountant_options *options, tern_accountant **out,
                                   tern_error *err)
{
    tern_accountant_options o = options ? *options : (tern_accountant_options){0};
    if (!out)
        return tern_set_error(err, TERN_ERR_INVALID, "no place for the accountant");
    if (o.kind != TERN_ACCOUNTANT_RDP && o.kind != TERN_ACCOUNTANT_PRV)
        return tern_set_error(err, TERN_ERR_INVALID, "unknown accountant kind %d", (int)o.kind);
    if (!o.orders) {
        if (o.norders)
            return tern_set_error(err, TERN_ERR_INVALID, "norders without orders");
        o.norders = tern_rdp_default_orders(&o.orders);
    }
    if (o.norders == 0)
        return tern_set_error(err, TERN_ERR_INVALID, "an empty list of RDP orders");
    for (size_t i = 0; i < o.norders; i++)
        if (!valid_order(o.orders[i]))
            return tern_set_error(err, TERN_ERR_INVALID, "RDP order %g is not > 1", o.orders[i]);
    if (!(o.eps_error >= 0 && isfinite(o.eps_error)) || !(o.delta_error >= 0 && o.delta_error < 1))
        return tern_set_error(err, TERN_ERR_INVALID, "eps_error and delta_error must be >= 0");
    tern_accountant *a = calloc(1, sizeof *a);
    size_t bytes;
    if (!a || !tern_mul_size(o.norders, sizeof(double), &bytes) || !(a->orders = malloc(bytes))) {
        free(a);
        return tern_set_error(err, TERN_ERR_NOMEM, "out of memory creating an accountant");
    }
    memcpy(a->orders, o.orders, bytes);
    a->kind = o.kind;
    a->norders = o.norders;
    a->eps_error = o.eps_error > 0 ? o.eps_error : DEFAULT_EPS_ERROR;
    a->delta_error = o.delta_error;
    a->prv_max_points = o.prv_max_points ? o.prv_max_points : DEFAULT_PRV_MAX_POINTS;
    *out = a;
    return TERN_OK;
}

void tern_accountant_destroy(tern_accountant **self_p)
{
    if (!self_p || !*self_p)
        return;
    free((*self_p)->orders);
    free((*self_p)->hist);
    free(*self_p);
    *self_p = NULL;
}

static tern_status fail(tern_accountant *a, tern_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static tern_status fail(tern_accountant *a, tern_status s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(a->error, sizeof a->error, fmt, ap);
    va_end(ap);
    return s;
}

static tern_status check_entry(tern_accountant *a, double sigma, double q, int64_t steps)
{
    if (!valid_sigma(sigma))
        return fail(a, TERN_ERR_INVALID, "noise multiplier %g is not > 0", sigma);
    if (!valid_rate(q))
        return fail(a, TERN_ERR_INVALID, "sample rate %g is not in (0, 1]", q);
    if (steps < 0)
        return fail(a, TERN_ERR_INVALID, "negative step count %lld", (long long)steps);
    return TERN_OK;
}

static tern_status append(tern_accountant *a, double sigma, double q, int64_t steps)
{
    if (a->n == a->cap) {
        size_t cap = a->cap ? 2 * a->cap : 8, bytes;
        tern_dp_entry *h;
        if (!tern_mul_size(cap, sizeof *h, &bytes) || !(h = realloc(a->hist, bytes)))
            return fail(a, TERN_ERR_NOMEM, "out of memory growing the history");
        a->hist = h;
        a->cap = cap;
    }
    a->hist[a->n++] = (tern_dp_entry){.noise_multiplier = sigma, .sample_rate = q, .steps = steps};
    return TERN_OK;
}

tern_status tern_accountant_step(tern_accountant *a, double noise_multiplier, double sample_rate)
{
    if (!a)
        return TERN_ERR_INVALID;
    a->error[0] = 0;
    tern_status s = check_entry(a, noise_multiplier, sample_rate, 1);
    if (s != TERN_OK)
        return s;
    tern_dp_entry *last = a->n ? &a->hist[a->n - 1] : NULL;
    if (last && last->noise_multiplier == noise_multiplier && last->sample_rate == sample_rate &&
        last->steps < INT64_MAX) {
        last->steps++;
        return TERN_OK;
    }
    return append(a, noise_multiplier, sample_rate, 1);
}

tern_status tern_accountant_add(tern_accountant *a, double noise_multiplier, double sample_rate,
                                int64_t steps)
{
    if (!a)
        return TERN_ERR_INVALID;
    a->error[0] = 0;
    tern_status s = check_entry(a, noise_multiplier, sample_rate, steps);
    return s != TERN_OK ? s : append(a, noise_multiplier, sample_rate, steps);
}

void tern_accountant_reset(tern_accountant *a)
{
    if (a)
        a->n = 0;
}

size_t tern_accountant_history_count(const tern_accountant *a) { return a ? a->n : 0; }

tern_status tern_accountant_history_at(const tern_accountant *a, size_t i, tern_dp_entry *out)
{
    if (!a || !out || i >= a->n)
        return TERN_ERR_INVALID;
    *out = a->hist[i];
    return TERN_OK;
}

const char *tern_accountant_last_error(const tern_accountant *a) { return a ? a->error : ""; }

tern_status tern_accountant_spent(tern_accountant *a, double delta, tern_privacy_spent *out)
{
    if (!a || !out)
        return TERN_ERR_INVALID;
    a->error[0] = 0;
    if (!valid_delta(delta))
        return fail(a, TERN_ERR_INVALID, "delta %g is not in (0, 1)", delta);
    /* Entries with no steps spend nothing: leave them out. */
    size_t live = 0;
    tern_dp_entry *h = malloc(sizeof *h * (a->n ? a->n : 1));
    if (!h)
        return fail(a, TERN_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < a->n; i++)
        if (a->hist[i].steps > 0)
            h[live++] = a->hist[i];
    tern_status s = TERN_OK;
    if (live == 0) {
        *out = (tern_privacy_spent){.epsilon = 0, .best_order = NAN};
    } else if (a->kind == TERN_ACCOUNTANT_RDP) {
        double *rdp = malloc(sizeof(double) * a->norders), eps, order;
        if (!rdp) {
            s = fail(a, TERN_ERR_NOMEM, "out of memory");
        } else {
            history_rdp_epsilon(h, live, a->orders, a->norders, delta, rdp, &eps, &order);
            *out = (tern_privacy_spent){.epsilon = eps, .best_order = order,
                                        .epsilon_estimate = eps, .epsilon_lower = eps};
        }
        free(rdp);
    } else {
        double delta_error = a->delta_error > 0 ? a->delta_error : delta / 1000, eps[3];
        prv_ctx c = {.msg = a->error, .msg_size = sizeof a->error,
                     .max_points = a->prv_max_points};
        if (delta_error >= delta)
            s = fail(a, TERN_ERR_INVALID, "delta_error %g is not below delta %g", delta_error,
                     delta);
        else if ((s = prv_epsilon(&c, h, live, delta, a->eps_error, delta_error, eps)) == TERN_OK)
            *out = (tern_privacy_spent){.epsilon = eps[2], .best_order = NAN,
                                        .epsilon_estimate = eps[1], .epsilon_lower = eps[0]};
    }
    free(h);
    return s;
}

tern_status tern_accountant_epsilon(tern_accountant *a, double delta, double *epsilon)
{
    tern_privacy_spent sp;
    if (!epsilon)
        return TERN_ERR_INVALID;
    tern_status s = tern_accountant_spent(a, delta, &sp);
    if (s == TERN_OK)
        *epsilon = sp.epsilon;
    return s;
}

/* ---- noise search -------------------------------------------------------------------------- */

/* Epsilon with a single-entry history (sigma, q, steps). */
static tern_status eps_for(tern_accountant *a, double sigma, const tern_noise_query *q,
                           double *eps, tern_error *err)
{
    tern_accountant_reset(a);
    tern_status s = tern_accountant_add(a, sigma, q->sample_rate, q->steps);
    if (s == TERN_OK)
        s = tern_accountant_epsilon(a, q->delta, eps);
    if (s != TERN_OK)
        tern_set_error(err, s, "noise multiplier %g: %s", sigma, tern_accountant_last_error(a));
    return s;
}

tern_status tern_accountant_noise_multiplier(double *noise_multiplier,
                                             const tern_accountant_options *options,
                                             const tern_noise_query *query, tern_error *err)
{
    if (!noise_multiplier || !query)
        return tern_set_error(err, TERN_ERR_INVALID, "missing argument");
    tern_noise_query q = *query;
    if (!valid_rate(q.sample_rate))
        return tern_set_error(err, TERN_ERR_INVALID, "sample rate %g is not in (0, 1]",
                              q.sample_rate);
    if (q.steps < 0)
        return tern_set_error(err, TERN_ERR_INVALID, "negative step count");
    if (!valid_delta(q.delta))
        return tern_set_error(err, TERN_ERR_INVALID, "delta %g is not in (0, 1)", q.delta);
    if (!(q.target_epsilon > 0 && isfinite(q.target_epsilon)))
        return tern_set_error(err, TERN_ERR_INVALID, "target epsilon %g is not > 0",
                              q.target_epsilon);
    if (q.epsilon_tolerance == 0)
        q.epsilon_tolerance = 0.01;
    if (!(q.epsilon_tolerance > 0 && isfinite(q.epsilon_tolerance)))
        return tern_set_error(err, TERN_ERR_INVALID, "epsilon tolerance %g is not > 0",
                              q.epsilon_tolerance);
    tern_accountant *a = NULL;
    tern_status s = tern_accountant_create(options, &a, err);
    if (s != TERN_OK)
        return s;
    double eps_high = INFINITY, sigma_low = 0, sigma_high = 10;
    while (eps_high > q.target_epsilon) {
        sigma_high = 2 * sigma_high;
        if ((s = eps_for(a, sigma_high, &q, &eps_high, err)) != TERN_OK)
            goto done;
        if (sigma_high > MAX_SIGMA) {
            s = tern_set_error(err, TERN_ERR_UNSUPPORTED,
                               "the privacy budget is too low: epsilon %g needs a noise "
                               "multiplier above %g",
                               q.target_epsilon, MAX_SIGMA);
            goto done;
        }
    }
    while (q.target_epsilon - eps_high > q.epsilon_tolerance) {
        double sigma = (sigma_low + sigma_high) / 2, eps;
        if ((s = eps_for(a, sigma, &q, &eps, err)) != TERN_OK)
            goto done;
        if (eps < q.target_epsilon) {
            sigma_high = sigma;
            eps_high = eps;
        } else {
            sigma_low = sigma;
        }
        if (sigma_high - sigma_low < 1e-12 * sigma_high) {
            /* Opacus would loop for ever where epsilon cannot get within the tolerance. */
            s = tern_set_error(err, TERN_ERR_UNSUPPORTED,
                               "epsilon does not come within %g of %g for any noise multiplier",
                               q.epsilon_tolerance, q.target_epsilon);
            goto done;
        }
    }
    *noise_multiplier = sigma_high;
done:
    tern_accountant_destroy(&a);
    return s;
}
