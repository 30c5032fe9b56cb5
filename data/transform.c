/* Image transforms: torchvision's training and evaluation pipelines, producing one float NHWC
 * sample.
 *
 * The pipeline, in this fixed order:
 *   1. geometry: RandomResizedCrop to size x size, or (evaluation) Resize of the shorter side
 *      to `resize` then CenterCrop size x size (zero padding if the image is smaller);
 *   2. RandomCrop size x size after zero padding by `pad`;
 *   3. RandomHorizontalFlip (p = 1/2);
 *   4. RandomRotation by an angle uniform in [-rotate_deg, rotate_deg], counter-clockwise about
 *      the image centre, bilinear, zero fill (grid_sample with zero padding);
 *   5. ColorJitter: brightness, then contrast, then saturation (torchvision shuffles the order;
 *      Tern keeps it fixed), each clamped to [0, 1] as torchvision's tensor path does;
 *   6. ToTensor ([0, 1]) and Normalize.
 * The channel conversion (grey -> 3 replicated channels, RGB -> 1 by 0.299 R + 0.587 G +
 * 0.114 B) is linear, so it is applied while sampling the source and the whole pipeline runs
 * in the caller's output buffer without allocating. Values stay in float throughout (no
 * rounding to 8 bits between steps, unlike Pillow).
 *
 * Steps 1-4 are composed backwards: each output pixel is traced through the inverse rotation,
 * flip and crop offsets to a point of the resized image, which is a bilinear sample of the
 * source (half-pixel centres, align_corners=False, edge-clamped, no antialiasing, as
 * torch.nn.functional.interpolate). With a rotation, each output pixel is a bilinear blend of
 * four such samples, exactly as if the intermediate image had been materialized.
 *
 * Random draws, each one tern_rng_uniform_double u in [0, 1), in this order and only for the
 * enabled steps; randint(n) is floor(u * n):
 *   RandomResizedCrop: up to 10 attempts of { scale = lo + (hi - lo) u; log ratio =
 *     log(r_lo) + (log(r_hi) - log(r_lo)) u; and when the box fits, top = randint(H - h + 1),
 *     left = randint(W - w + 1) } (a failed attempt draws 2 values, a successful one 4);
 *   pad > 0: top = randint(2 pad + 1), left = randint(2 pad + 1);
 *   hflip: flip when u < 0.5;
 *   rotate_deg > 0: angle = -rotate_deg + 2 rotate_deg u;
 *   brightness > 0, contrast > 0, saturation > 0 (in that order): factor uniform in
 *     [max(0, 1 - x), 1 + x]. */
#include "tern/data.h"

#include <math.h>
#include <string.h>

#define LUMA_R 0.299f
#define LUMA_G 0.587f
#define LUMA_B 0.114f
#define RRC_ATTEMPTS 10

void tern_transform_normalize_imagenet(tern_transform *t)
{
    static const float mean[3] = {0.485f, 0.456f, 0.406f}, std[3] = {0.229f, 0.224f, 0.225f};
    memcpy(t->mean, mean, sizeof mean);
    memcpy(t->std, std, sizeof std);
}

void tern_transform_normalize_fashion_mnist(tern_transform *t)
{
    for (int c = 0; c < 3; c++) {
        t->mean[c] = 0.2860f;
        t->std[c] = 0.3530f;
    }
}

/* Everything needed to trace an output pixel back to the source, random choices resolved. */
typedef struct {
    const tern_image *img;
    int cout;
    int64_t size;
    /* Resized image R: source region (y0, x0, h, w) scaled to (rh, rw). */
    int64_t src_y0, src_x0, src_h, src_w, rh, rw;
    double sy, sx; /* src_h / rh, src_w / rw */
    /* Geometry output G(y, x) = R(y + off_y, x + off_x), zero outside R. */
    int64_t off_y, off_x;
    /* Crop after padding: C(y, x) = G(y + crop_y, x + crop_x), zero outside G. */
    int64_t crop_y, crop_x;
    bool flip;
    bool rotate;
    double cos_a, sin_a;
    float brightness, contrast, saturation; /* factors; 1 = off */
} plan;

static int64_t randint(tern_rng *rng, int64_t n)
{
    int64_t v = (int64_t)(tern_rng_uniform_double(rng) * (double)n);
    return v < n ? v : n - 1;
}

static double uniform(tern_rng *rng, double lo, double hi)
{
    return lo + (hi - lo) * tern_rng_uniform_double(rng);
}

/* torchvision RandomResizedCrop.get_params; Python's round() is round-half-even = rint. */
static void random_resized_crop(plan *p, const tern_transform *t, tern_rng *rng)
{
    double smin = t->scale_min, smax = t->scale_max, rmin = t->ratio_min, rmax = t->ratio_max;
    if (smin == 0 && smax == 0) {
        smin = 0.08;
        smax = 1.0;
    }
    if (rmin == 0 && rmax == 0) {
        rmin = 3.0 / 4.0;
        rmax = 4.0 / 3.0;
    }
    int64_t height = p->img->height, width = p->img->width;
    double area = (double)height * (double)width, lr0 = log(rmin), lr1 = log(rmax);
    for (int attempt = 0; attempt < RRC_ATTEMPTS; attempt++) {
        double target = area * uniform(rng, smin, smax);
        double aspect = exp(uniform(rng, lr0, lr1));
        int64_t w = (int64_t)rint(sqrt(target * aspect));
        int64_t h = (int64_t)rint(sqrt(target / aspect));
        if (w > 0 && w <= width && h > 0 && h <= height) {
            p->src_y0 = randint(rng, height - h + 1);
            p->src_x0 = randint(rng, width - w + 1);
            p->src_h = h;
            p->src_w = w;
            return;
        }
    }
    double in_ratio = (double)width / (double)height;
    int64_t w = width, h = height;
    if (in_ratio < rmin)
        h = (int64_t)rint((double)w / rmin);
    else if (in_ratio > rmax)
        w = (int64_t)rint((double)h * rmax);
    /* Extreme ratios can round a side to 0 (or past the image): keep at least one pixel. */
    h = h < 1 ? 1 : h > height ? height : h;
    w = w < 1 ? 1 : w > width ? width : w;
    p->src_y0 = (height - h) / 2;
    p->src_x0 = (width - w) / 2;
    p->src_h = h;
    p->src_w = w;
}

/* torchvision center_crop's offset of a size-long window in an n-long axis (negative: padding). */
static int64_t center_offset(int64_t n, int64_t size)
{
    if (n >= size)
        return (int64_t)rint((double)(n - size) / 2.0);
    return -((size - n) / 2);
}

/* The source point behind resized-image pixel r on one axis: index pair and weight. */
static void source_axis(double scale, int64_t r, int64_t n, int64_t base, int64_t *i0,
                        int64_t *i1, float *w1)
{
    double f = ((double)r + 0.5) * scale - 0.5;
    if (f < 0)
        f = 0;
    int64_t a = (int64_t)f;
    if (a > n - 1)
        a = n - 1;
    *w1 = (float)(f - (double)a);
    *i0 = base + a;
    *i1 = base + (a + 1 < n ? a + 1 : n - 1);
}

/* Pre-rotation pixel (y, x) of the size x size image, in output channels; zero outside. */
static void pixel(const plan *p, int64_t y, int64_t x, float *v)
{
    v[0] = v[1] = v[2] = 0;
    if (y < 0 || y >= p->size || x < 0 || x >= p->size)
        return;
    if (p->flip)
        x = p->size - 1 - x;
    int64_t ry = y + p->crop_y, rx = x + p->crop_x; /* in G */
    if (ry < 0 || ry >= p->size || rx < 0 || rx >= p->size)
        return;
    ry += p->off_y; /* in R */
    rx += p->off_x;
    if (ry < 0 || ry >= p->rh || rx < 0 || rx >= p->rw)
        return;
    int64_t y0, y1, x0, x1;
    float wy, wx;
    source_axis(p->sy, ry, p->src_h, p->src_y0, &y0, &y1, &wy);
    source_axis(p->sx, rx, p->src_w, p->src_x0, &x0, &x1, &wx);
    const tern_image *img = p->img;
    size_t c = (size_t)img->channels, stride = (size_t)img->width * c;
    const uint8_t *r0 = img->data + (size_t)y0 * stride, *r1 = img->data + (size_t)y1 * stride;
    float s[3];
    for (size_t k = 0; k < c; k++) {
        float top = (float)r0[(size_t)x0 * c + k] +
                    wx * ((float)r0[(size_t)x1 * c + k] - (float)r0[(size_t)x0 * c + k]);
        float bot = (float)r1[(size_t)x0 * c + k] +
                    wx * ((float)r1[(size_t)x1 * c + k] - (float)r1[(size_t)x0 * c + k]);
        s[k] = (top + wy * (bot - top)) / 255.0f; /* as ToTensor's div(255) */
    }
    if (p->cout == (int)c) {
        for (size_t k = 0; k < c; k++)
            v[k] = s[k];
    } else if (c == 1) {
        v[0] = v[1] = v[2] = s[0];
    } else {
        v[0] = LUMA_R * s[0] + LUMA_G * s[1] + LUMA_B * s[2];
    }
}

/* Output pixel (y, x): through the inverse rotation, a bilinear blend of four pixels. */
static void rotated_pixel(const plan *p, int64_t y, int64_t x, float *v)
{
    double c = (double)(p->size - 1) * 0.5;
    double xc = (double)x - c, yc = (double)y - c;
    double xs = p->cos_a * xc - p->sin_a * yc + c;
    double ys = p->sin_a * xc + p->cos_a * yc + c;
    double fx = floor(xs), fy = floor(ys);
    int64_t x0 = (int64_t)fx, y0 = (int64_t)fy;
    float wx = (float)(xs - fx), wy = (float)(ys - fy);
    float a[3], b[3], d[3], e[3];
    pixel(p, y0, x0, a);
    pixel(p, y0, x0 + 1, b);
    pixel(p, y0 + 1, x0, d);
    pixel(p, y0 + 1, x0 + 1, e);
    for (int k = 0; k < p->cout; k++) {
        float top = a[k] + wx * (b[k] - a[k]);
        float bot = d[k] + wx * (e[k] - d[k]);
        v[k] = top + wy * (bot - top);
    }
}

static float clamp01(float v)
{
    return v < 0 ? 0 : v > 1 ? 1 : v;
}

static bool finite_nonneg(float v)
{
    return isfinite(v) && v >= 0;
}

static tern_status validate(const tern_transform *t, const tern_image *img, tern_rng *rng,
                            const float *out)
{
    if (!t || !img || !out || !img->data)
        return TERN_ERR_INVALID;
    if (img->width <= 0 || img->height <= 0 || (img->channels != 1 && img->channels != 3))
        return TERN_ERR_INVALID;
    if (t->size <= 0 || (t->channels != 1 && t->channels != 3) || t->resize < 0 || t->pad < 0)
        return TERN_ERR_INVALID;
    if (!finite_nonneg(t->rotate_deg) || !finite_nonneg(t->brightness) ||
        !finite_nonneg(t->contrast) || !finite_nonneg(t->saturation))
        return TERN_ERR_INVALID;
    if (t->random_resized_crop) {
        bool sdef = t->scale_min == 0 && t->scale_max == 0;
        bool rdef = t->ratio_min == 0 && t->ratio_max == 0;
        if (!sdef && !(isfinite(t->scale_max) && t->scale_min > 0 && t->scale_min <= t->scale_max))
            return TERN_ERR_INVALID;
        if (!rdef && !(isfinite(t->ratio_max) && t->ratio_min > 0 && t->ratio_min <= t->ratio_max))
            return TERN_ERR_INVALID;
    }
    bool no_norm = true;
    for (int c = 0; c < 3; c++)
        no_norm = no_norm && t->mean[c] == 0 && t->std[c] == 0;
    if (!no_norm)
        for (int c = 0; c < t->channels; c++)
            if (!(t->std[c] > 0) || !isfinite(t->std[c]) || !isfinite(t->mean[c]))
                return TERN_ERR_INVALID;
    bool random = t->random_resized_crop || t->pad > 0 || t->hflip || t->rotate_deg > 0 ||
                  t->brightness > 0 || t->contrast > 0 || t->saturation > 0;
    if (random && !rng)
        return TERN_ERR_INVALID;
    return TERN_OK;
}

tern_status tern_transform_apply(const tern_transform *t, const tern_image *img, tern_rng *rng,
                                 float *out)
{
    tern_status s = validate(t, img, rng, out);
    if (s != TERN_OK)
        return s;
    plan p = {.img = img, .cout = t->channels, .size = t->size};

    /* 1. geometry */
    if (t->random_resized_crop) {
        random_resized_crop(&p, t, rng);
        p.rh = p.rw = p.size;
    } else {
        int64_t r = t->resize ? t->resize : t->size, h = img->height, w = img->width;
        p.src_h = h;
        p.src_w = w;
        if (w <= h) {
            p.rw = r;
            p.rh = (int64_t)((double)r * (double)h / (double)w);
        } else {
            p.rh = r;
            p.rw = (int64_t)((double)r * (double)w / (double)h);
        }
        p.off_y = center_offset(p.rh, p.size);
        p.off_x = center_offset(p.rw, p.size);
    }
    p.sy = (double)p.src_h / (double)p.rh;
    p.sx = (double)p.src_w / (double)p.rw;

    /* 2-4. padded crop, flip, rotation */
    if (t->pad > 0) {
        p.crop_y = randint(rng, 2 * (int64_t)t->pad + 1) - t->pad;
        p.crop_x = randint(rng, 2 * (int64_t)t->pad + 1) - t->pad;
    }
    if (t->hflip)
        p.flip = tern_rng_uniform_double(rng) < 0.5;
    if (t->rotate_deg > 0) {
        double deg = uniform(rng, -t->rotate_deg, t->rotate_deg);
        double rad = deg * (3.14159265358979323846 / 180.0);
        p.rotate = true;
        p.cos_a = cos(rad);
        p.sin_a = sin(rad);
    }
    /* 5. jitter factors */
    p.brightness = p.contrast = p.saturation = 1;
    const float *amount[3] = {&t->brightness, &t->contrast, &t->saturation};
    float *factor[3] = {&p.brightness, &p.contrast, &p.saturation};
    for (int k = 0; k < 3; k++)
        if (*amount[k] > 0) {
            double x = *amount[k];
            *factor[k] = (float)uniform(rng, x < 1 ? 1 - x : 0, 1 + x);
        }

    /* Render. */
    size_t n = (size_t)t->size * (size_t)t->size, cout = (size_t)t->channels;
    float v[3];
    for (int64_t y = 0; y < p.size; y++)
        for (int64_t x = 0; x < p.size; x++) {
            if (p.rotate)
                rotated_pixel(&p, y, x, v);
            else
                pixel(&p, y, x, v);
            memcpy(out + ((size_t)y * (size_t)p.size + (size_t)x) * cout, v,
                   cout * sizeof *v);
        }

    /* 5. colour jitter, in place */
    if (t->brightness > 0)
        for (size_t i = 0; i < n * cout; i++)
            out[i] = clamp01(out[i] * p.brightness);
    if (t->contrast > 0) {
        double sum = 0;
        for (size_t i = 0; i < n; i++) {
            const float *q = out + i * cout;
            sum += cout == 3 ? LUMA_R * q[0] + LUMA_G * q[1] + LUMA_B * q[2] : q[0];
        }
        float mean = (float)(sum / (double)n), c = p.contrast;
        for (size_t i = 0; i < n * cout; i++)
            out[i] = clamp01(c * out[i] + (1 - c) * mean);
    }
    if (t->saturation > 0 && cout == 3) {
        float f = p.saturation;
        for (size_t i = 0; i < n; i++) {
            float *q = out + i * 3;
            float grey = LUMA_R * q[0] + LUMA_G * q[1] + LUMA_B * q[2];
            for (int k = 0; k < 3; k++)
                q[k] = clamp01(f * q[k] + (1 - f) * grey);
        }
    }

    /* 6. normalize (all-zero mean and std: none) */
    bool norm = false;
    for (int c = 0; c < 3; c++)
        norm = norm || t->mean[c] != 0 || t->std[c] != 0;
    if (norm)
        for (size_t i = 0; i < n; i++)
            for (size_t c = 0; c < cout; c++)
                out[i * cout + c] = (out[i * cout + c] - t->mean[c]) / t->std[c];
    return TERN_OK;
}
