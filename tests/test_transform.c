/* Transforms against hand-computed values: bilinear resize with half-pixel centres, centre
 * crop (with torchvision's rounding and padding), padded random crop, flip, rotation, colour
 * jitter, channel conversion and normalization; random choices follow the documented draw
 * order (checked with crafted generator states), and RandomResizedCrop is reproducible. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tern/data.h"
#include "testutil.h"

static tern_image image_of(int w, int h, int c, uint8_t *data)
{
    return (tern_image){.width = w, .height = h, .channels = c, .data = data};
}

static void apply_ok(const tern_transform *t, const tern_image *img, tern_rng *rng, float *out)
{
    assert_int_equal(tern_transform_apply(t, img, rng, out), TERN_OK);
}

/* A generator whose next tern_rng_uniform_double is exactly 0. */
static tern_rng rng_zero(void)
{
    return (tern_rng){{1, 0, 0, 0}};
}

static void advance(tern_rng *r, int n)
{
    for (int i = 0; i < n; i++)
        tern_rng_next(r);
}

/* ---- geometry ------------------------------------------------------------------------------ */

static void test_resize_2x2_to_4x4(void **state)
{
    (void)state;
    uint8_t px[4] = {0, 100, 200, 40}; /* a b / c d */
    tern_image img = image_of(2, 2, 1, px);
    tern_transform t = {.size = 4, .channels = 1};
    float out[16], want[16];
    /* align_corners=False: source x = (x + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75,
     * 1.25 (clamped to the last pixel): weight of the second pixel 0, 1/4, 3/4, 1. */
    const float w1[4] = {0, 0.25f, 0.75f, 1};
    for (int y = 0; y < 4; y++)
        for (int x = 0; x < 4; x++) {
            float top = (1 - w1[x]) * 0 + w1[x] * 100, bot = (1 - w1[x]) * 200 + w1[x] * 40;
            want[y * 4 + x] = ((1 - w1[y]) * top + w1[y] * bot) / 255.0f;
        }
    apply_ok(&t, &img, NULL, out);
    assert_true(test_close("resize 2->4", out, want, 16, 1e-6f, 1));
    assert_float_equal(out[5], (0.75f * 0.75f * 0 + 0.75f * 0.25f * 100 + 0.25f * 0.75f * 200 +
                                0.25f * 0.25f * 40) / 255.0f, 1e-6);
}

static void test_resize_down_averages_pairs(void **state)
{
    (void)state;
    uint8_t px[16];
    for (int i = 0; i < 16; i++)
        px[i] = (uint8_t)(i * 10);
    tern_image img = image_of(4, 4, 1, px);
    tern_transform t = {.size = 2, .channels = 1};
    float out[4], want[4];
    /* Source positions 0.5 and 2.5: the mean of each 2x2 block. */
    for (int y = 0; y < 2; y++)
        for (int x = 0; x < 2; x++) {
            int i = 2 * y * 4 + 2 * x;
            want[y * 2 + x] = (px[i] + px[i + 1] + px[i + 4] + px[i + 5]) / 4.0f / 255.0f;
        }
    apply_ok(&t, &img, NULL, out);
    assert_true(test_close("resize 4->2", out, want, 4, 1e-6f, 1));
}

static void test_resize_shorter_side_and_center_crop(void **state)
{
    (void)state;
    /* 6 wide, 4 high: resize 4 keeps it (shorter side already 4), centre crop 2x2 starts at
     * row round(1.0) = 1, column round(2.0) = 2. */
    uint8_t px[24];
    for (int i = 0; i < 24; i++)
        px[i] = (uint8_t)(i + 1);
    tern_image img = image_of(6, 4, 1, px);
    tern_transform t = {.size = 2, .channels = 1, .resize = 4};
    float out[4];
    apply_ok(&t, &img, NULL, out);
    const float want[4] = {9 / 255.0f, 10 / 255.0f, 15 / 255.0f, 16 / 255.0f};
    assert_true(test_close("center crop", out, want, 4, 0, 1));

    /* 5x5 cropped to 2x2: (5 - 2) / 2 = 1.5 rounds half to even, to 2 (Python's round). */
    uint8_t p5[25];
    for (int i = 0; i < 25; i++)
        p5[i] = (uint8_t)i;
    img = image_of(5, 5, 1, p5);
    t = (tern_transform){.size = 2, .channels = 1, .resize = 5};
    apply_ok(&t, &img, NULL, out);
    const float want5[4] = {12 / 255.0f, 13 / 255.0f, 17 / 255.0f, 18 / 255.0f};
    assert_true(test_close("center crop 5->2", out, want5, 4, 0, 1));

    /* Crop larger than the image: zero padding, (4 - 2) / 2 = 1 on the top and left. */
    uint8_t p2[4] = {10, 20, 30, 40};
    img = image_of(2, 2, 1, p2);
    t = (tern_transform){.size = 4, .channels = 1, .resize = 2};
    float out16[16], want16[16] = {0};
    want16[5] = 10 / 255.0f, want16[6] = 20 / 255.0f, want16[9] = 30 / 255.0f,
    want16[10] = 40 / 255.0f;
    apply_ok(&t, &img, NULL, out16);
    assert_true(test_close("center crop padded", out16, want16, 16, 0, 1));

    /* Resize of the shorter side: 2 high x 4 wide to shorter side 4 gives 4 x 8; the centre
     * 4x4 crop starts at column 2 of the resized image. */
    uint8_t p24[8] = {0, 40, 80, 120, 160, 200, 240, 255};
    img = image_of(4, 2, 1, p24);
    t = (tern_transform){.size = 4, .channels = 1, .resize = 4};
    apply_ok(&t, &img, NULL, out16);
    const float w1[4] = {0, 0.25f, 0.75f, 1}; /* vertical, 2 -> 4 */
    for (int y = 0; y < 4; y++)
        for (int x = 0; x < 4; x++) {
            float sx = ((x + 2) + 0.5f) * 0.5f - 0.5f; /* 4 -> 8, column x + 2 */
            int x0 = (int)sx;
            float wx = sx - (float)x0;
            int x1 = x0 + 1 < 4 ? x0 + 1 : 3;
            float top = p24[x0] + wx * (p24[x1] - p24[x0]);
            float bot = p24[4 + x0] + wx * (p24[4 + x1] - p24[4 + x0]);
            want16[y * 4 + x] = (top + w1[y] * (bot - top)) / 255.0f;
        }
    assert_true(test_close("shorter side", out16, want16, 16, 1e-6f, 1));
}

static void test_pad_and_random_crop(void **state)
{
    (void)state;
    uint8_t px[25];
    for (int i = 0; i < 25; i++)
        px[i] = (uint8_t)(i * 9 + 3);
    tern_image img = image_of(5, 5, 1, px);
    tern_transform t = {.size = 5, .channels = 1, .pad = 2};
    for (uint64_t seed = 0; seed < 20; seed++) {
        tern_rng rng, expect;
        tern_rng_seed(&rng, seed);
        expect = rng;
        /* Documented draws: top then left, each randint(2 * pad + 1). */
        int top = (int)(tern_rng_uniform_double(&expect) * 5);
        int left = (int)(tern_rng_uniform_double(&expect) * 5);
        float out[25], want[25];
        for (int y = 0; y < 5; y++)
            for (int x = 0; x < 5; x++) {
                int sy = y + top - 2, sx = x + left - 2;
                want[y * 5 + x] =
                    sy >= 0 && sy < 5 && sx >= 0 && sx < 5 ? px[sy * 5 + sx] / 255.0f : 0;
            }
        apply_ok(&t, &img, &rng, out);
        assert_true(test_close("pad crop", out, want, 25, 0, 1));
        assert_memory_equal(&rng, &expect, sizeof rng);
    }
    /* The extreme draw: u = 0 gives top = left = 0, the padded corner. */
    tern_rng z = rng_zero();
    float out[25];
    apply_ok(&t, &img, &z, out);
    assert_float_equal(out[0], 0, 0);
    assert_float_equal(out[2 * 5 + 2], px[0] / 255.0f, 0);
}

static void test_hflip(void **state)
{
    (void)state;
    uint8_t px[12];
    for (int i = 0; i < 12; i++)
        px[i] = (uint8_t)(i * 20);
    tern_image img = image_of(2, 2, 3, px);
    tern_transform t = {.size = 2, .channels = 3, .hflip = true};
    int flipped = 0;
    for (uint64_t seed = 0; seed < 40; seed++) {
        tern_rng rng, expect;
        tern_rng_seed(&rng, seed);
        expect = rng;
        bool flip = tern_rng_uniform_double(&expect) < 0.5;
        flipped += flip;
        float out[12], want[12];
        for (int y = 0; y < 2; y++)
            for (int x = 0; x < 2; x++)
                for (int c = 0; c < 3; c++)
                    want[(y * 2 + x) * 3 + c] = px[(y * 2 + (flip ? 1 - x : x)) * 3 + c] / 255.0f;
        apply_ok(&t, &img, &rng, out);
        assert_true(test_close("hflip", out, want, 12, 0, 1));
        assert_memory_equal(&rng, &expect, sizeof rng);
    }
    assert_true(flipped > 5 && flipped < 35);
}

static void test_rotation(void **state)
{
    (void)state;
    uint8_t px[9];
    for (int i = 0; i < 9; i++)
        px[i] = (uint8_t)(i * 25);
    tern_image img = image_of(3, 3, 1, px);
    float plain[9], out[9], want[9];
    tern_transform t = {.size = 3, .channels = 1};
    apply_ok(&t, &img, NULL, plain);

    /* A rotation of (almost) 0 degrees is the identity. */
    t.rotate_deg = 1e-6f;
    tern_rng rng;
    tern_rng_seed(&rng, 5);
    apply_ok(&t, &img, &rng, out);
    assert_true(test_close("rotate 0", out, plain, 9, 1e-6f, 1));

    /* u = 0 gives angle -rotate_deg: -90 degrees (clockwise), out[y][x] = in[2 - x][y]. */
    t.rotate_deg = 90;
    rng = rng_zero();
    apply_ok(&t, &img, &rng, out);
    for (int y = 0; y < 3; y++)
        for (int x = 0; x < 3; x++)
            want[y * 3 + x] = px[(2 - x) * 3 + y] / 255.0f;
    assert_true(test_close("rotate -90", out, want, 9, 1e-6f, 1));
    /* the top-left corner went to the top right */
    assert_float_equal(out[2], 0, 1e-6);

    /* -45 degrees on 8x8 of constant 255: corners fall outside (zero fill), the middle stays. */
    uint8_t ones[64];
    memset(ones, 255, sizeof ones);
    img = image_of(8, 8, 1, ones);
    t = (tern_transform){.size = 8, .channels = 1, .rotate_deg = 45};
    rng = rng_zero();
    float o8[64];
    apply_ok(&t, &img, &rng, o8);
    assert_float_equal(o8[0], 0, 1e-6);
    assert_float_equal(o8[7], 0, 1e-6);
    assert_float_equal(o8[56], 0, 1e-6);
    assert_float_equal(o8[63], 0, 1e-6);
    for (int y = 2; y < 6; y++)
        for (int x = 2; x < 6; x++)
            assert_float_equal(o8[y * 8 + x], 1, 1e-5);
    /* Half-covered edge pixels are in between. */
    assert_true(o8[1] > 0.2f && o8[1] < 0.3f); /* sampled at x = -0.74 */
}

/* ---- channels, colour, normalization ------------------------------------------------------- */

static void test_channel_conversion(void **state)
{
    (void)state;
    uint8_t grey[4] = {0, 51, 102, 255};
    tern_image img = image_of(2, 2, 1, grey);
    tern_transform t = {.size = 2, .channels = 3};
    float out[12];
    apply_ok(&t, &img, NULL, out);
    for (int i = 0; i < 4; i++)
        for (int c = 0; c < 3; c++)
            assert_float_equal(out[i * 3 + c], grey[i] / 255.0f, 0);

    uint8_t rgb[12] = {255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30};
    img = image_of(2, 2, 3, rgb);
    t = (tern_transform){.size = 2, .channels = 1};
    float lum[4];
    apply_ok(&t, &img, NULL, lum);
    assert_float_equal(lum[0], 0.299, 1e-6);
    assert_float_equal(lum[1], 0.587, 1e-6);
    assert_float_equal(lum[2], 0.114, 1e-6);
    assert_float_equal(lum[3], (0.299 * 10 + 0.587 * 20 + 0.114 * 30) / 255.0, 1e-6);
}

static void test_normalization(void **state)
{
    (void)state;
    uint8_t px[3] = {128, 64, 200};
    tern_image img = image_of(1, 1, 3, px);
    tern_transform t = {.size = 1, .channels = 3};
    tern_transform_normalize_imagenet(&t);
    float out[3];
    apply_ok(&t, &img, NULL, out);
    assert_float_equal(out[0], (128 / 255.0 - 0.485) / 0.229, 1e-5);
    assert_float_equal(out[1], (64 / 255.0 - 0.456) / 0.224, 1e-5);
    assert_float_equal(out[2], (200 / 255.0 - 0.406) / 0.225, 1e-5);

    t = (tern_transform){.size = 1, .channels = 1};
    tern_transform_normalize_fashion_mnist(&t);
    apply_ok(&t, &img, NULL, out);
    double l = (0.299 * 128 + 0.587 * 64 + 0.114 * 200) / 255.0;
    assert_float_equal(out[0], (l - 0.2860) / 0.3530, 1e-5);
}

static void test_color_jitter(void **state)
{
    (void)state;
    uint8_t px[12] = {200, 100, 50, 10, 20, 30, 255, 255, 0, 90, 90, 90};
    tern_image img = image_of(2, 2, 3, px);
    float v[12], out[12], want[12];
    tern_transform t = {.size = 2, .channels = 3};
    apply_ok(&t, &img, NULL, v);

    /* Factor 0 everywhere: identity, and the generator is not touched. */
    tern_rng rng, before;
    tern_rng_seed(&rng, 9);
    before = rng;
    apply_ok(&t, &img, &rng, out);
    assert_memory_equal(out, v, sizeof v);
    assert_memory_equal(&rng, &before, sizeof rng);

    /* brightness 0.5 with u = 0: factor 0.5. */
    t.brightness = 0.5f;
    rng = rng_zero();
    apply_ok(&t, &img, &rng, out);
    for (int i = 0; i < 12; i++)
        want[i] = v[i] * 0.5f;
    assert_true(test_close("brightness", out, want, 12, 1e-6f, 1));

    /* contrast 0.5 with u = 0: blend with the mean luminance. */
    t = (tern_transform){.size = 2, .channels = 3, .contrast = 0.5f};
    rng = rng_zero();
    apply_ok(&t, &img, &rng, out);
    double mean = 0;
    for (int i = 0; i < 4; i++)
        mean += 0.299 * v[3 * i] + 0.587 * v[3 * i + 1] + 0.114 * v[3 * i + 2];
    mean /= 4;
    for (int i = 0; i < 12; i++)
        want[i] = (float)(0.5 * v[i] + 0.5 * mean);
    assert_true(test_close("contrast", out, want, 12, 1e-6f, 1));

    /* saturation 1 with u = 0: factor 0, each pixel its own luminance. */
    t = (tern_transform){.size = 2, .channels = 3, .saturation = 1};
    rng = rng_zero();
    apply_ok(&t, &img, &rng, out);
    for (int i = 0; i < 4; i++)
        for (int c = 0; c < 3; c++)
            want[3 * i + c] = 0.299f * v[3 * i] + 0.587f * v[3 * i + 1] + 0.114f * v[3 * i + 2];
    assert_true(test_close("saturation", out, want, 12, 1e-6f, 1));

    /* A large brightness clamps to 1. */
    t = (tern_transform){.size = 2, .channels = 3, .brightness = 5};
    for (uint64_t seed = 0; seed < 10; seed++) {
        tern_rng_seed(&rng, seed);
        apply_ok(&t, &img, &rng, out);
        for (int i = 0; i < 12; i++)
            assert_true(out[i] >= 0 && out[i] <= 1);
    }
    /* Three enabled jitters draw three values, in order. */
    t = (tern_transform){.size = 2, .channels = 3, .brightness = 0.2f, .contrast = 0.2f,
                         .saturation = 0.2f};
    tern_rng_seed(&rng, 4);
    before = rng;
    apply_ok(&t, &img, &rng, out);
    advance(&before, 3);
    assert_memory_equal(&rng, &before, sizeof rng);
}

/* ---- RandomResizedCrop ---------------------------------------------------------------------- */

static void test_random_resized_crop(void **state)
{
    (void)state;
    const int w = 37, h = 23;
    uint8_t *px = malloc((size_t)w * h * 3);
    assert_non_null(px);
    test_rng tr = {3};
    for (int i = 0; i < w * h * 3; i++)
        px[i] = (uint8_t)(40 + test_rng_int(&tr, 0, 150));
    tern_image img = image_of(w, h, 3, px);
    tern_transform t = {.size = 16, .channels = 3, .random_resized_crop = true, .hflip = true};
    float a[16 * 16 * 3], b[16 * 16 * 3];
    for (uint64_t seed = 0; seed < 50; seed++) {
        tern_rng r1, r2;
        tern_rng_seed(&r1, seed);
        tern_rng_seed(&r2, seed);
        apply_ok(&t, &img, &r1, a);
        apply_ok(&t, &img, &r2, b);
        assert_memory_equal(a, b, sizeof a);
        assert_memory_equal(&r1, &r2, sizeof r1);
        /* Interpolated source pixels stay within the source's range. */
        for (size_t i = 0; i < sizeof a / sizeof a[0]; i++)
            assert_true(a[i] >= 40 / 255.0f - 1e-6f && a[i] <= 190 / 255.0f + 1e-6f);
    }
    tern_rng r1, r2;
    tern_rng_seed(&r1, 1);
    tern_rng_seed(&r2, 2);
    apply_ok(&t, &img, &r1, a);
    apply_ok(&t, &img, &r2, b);
    assert_memory_not_equal(a, b, sizeof a);

    /* scale (1, 1), ratio (1, 1) on a square image: the whole image, four draws (the box fits
     * at once, offsets randint(1)), equal to the evaluation resize. */
    uint8_t sq[36];
    for (int i = 0; i < 36; i++)
        sq[i] = (uint8_t)(i * 7);
    tern_image simg = image_of(6, 6, 1, sq);
    t = (tern_transform){.size = 4, .channels = 1, .random_resized_crop = true, .scale_min = 1,
                         .scale_max = 1, .ratio_min = 1, .ratio_max = 1};
    tern_transform ev = {.size = 4, .channels = 1};
    float o[16], e[16];
    tern_rng_seed(&r1, 7);
    r2 = r1;
    apply_ok(&t, &simg, &r1, o);
    apply_ok(&ev, &simg, NULL, e);
    assert_true(test_close("rrc whole", o, e, 16, 1e-6f, 1));
    advance(&r2, 4);
    assert_memory_equal(&r1, &r2, sizeof r1);

    /* Same options on 8 wide x 4 high: round(sqrt(32)) = 6 never fits the height, so ten
     * attempts (two draws each) fail and the fallback crops the centre 4x4 (columns 2-5). */
    uint8_t wide[32];
    for (int i = 0; i < 32; i++)
        wide[i] = (uint8_t)(i * 5);
    tern_image wimg = image_of(8, 4, 1, wide);
    tern_rng_seed(&r1, 8);
    r2 = r1;
    apply_ok(&t, &wimg, &r1, o);
    advance(&r2, 20);
    assert_memory_equal(&r1, &r2, sizeof r1);
    for (int y = 0; y < 4; y++)
        for (int x = 0; x < 4; x++)
            e[y * 4 + x] = wide[y * 8 + x + 2] / 255.0f;
    assert_true(test_close("rrc fallback", o, e, 16, 0, 1));
    free(px);
}

/* Ratios no crop of the image can have: the fallback keeps at least one pixel (a zero-sized
 * crop once read outside the image). */
static void test_random_resized_crop_extreme_ratio(void **state)
{
    (void)state;
    uint8_t px[3] = {10, 20, 30};
    tern_image img = image_of(1, 1, 3, px);
    tern_transform t = {.size = 4, .channels = 3, .random_resized_crop = true,
                        .ratio_min = 3, .ratio_max = 4};
    float out[4 * 4 * 3];
    tern_rng r;
    tern_rng_seed(&r, 1);
    apply_ok(&t, &img, &r, out);
    for (int i = 0; i < 16; i++)
        for (int c = 0; c < 3; c++)
            assert_float_equal(out[i * 3 + c], px[c] / 255.0f, 1e-6f);
}

static void test_invalid(void **state)
{
    (void)state;
    uint8_t px[4] = {0};
    tern_image img = image_of(2, 2, 1, px);
    float out[64];
    tern_rng rng;
    tern_rng_seed(&rng, 1);
    tern_transform t = {.size = 0, .channels = 1};
    assert_int_equal(tern_transform_apply(&t, &img, &rng, out), TERN_ERR_INVALID);
    t = (tern_transform){.size = 2, .channels = 2};
    assert_int_equal(tern_transform_apply(&t, &img, &rng, out), TERN_ERR_INVALID);
    t = (tern_transform){.size = 2, .channels = 1, .hflip = true};
    assert_int_equal(tern_transform_apply(&t, &img, NULL, out), TERN_ERR_INVALID);
    t = (tern_transform){.size = 2, .channels = 1, .mean = {0.5f}};
    assert_int_equal(tern_transform_apply(&t, &img, &rng, out), TERN_ERR_INVALID);
    t = (tern_transform){.size = 2, .channels = 1, .random_resized_crop = true,
                         .scale_min = 0.9f, .scale_max = 0.5f};
    assert_int_equal(tern_transform_apply(&t, &img, &rng, out), TERN_ERR_INVALID);
    t = (tern_transform){.size = 2, .channels = 1, .brightness = -1};
    assert_int_equal(tern_transform_apply(&t, &img, &rng, out), TERN_ERR_INVALID);
    t = (tern_transform){.size = 2, .channels = 1, .rotate_deg = NAN};
    assert_int_equal(tern_transform_apply(&t, &img, &rng, out), TERN_ERR_INVALID);
    t = (tern_transform){.size = 2, .channels = 1};
    tern_image bad = image_of(2, 2, 4, px);
    assert_int_equal(tern_transform_apply(&t, &bad, &rng, out), TERN_ERR_INVALID);
    assert_int_equal(tern_transform_apply(&t, NULL, &rng, out), TERN_ERR_INVALID);
    assert_int_equal(tern_transform_apply(&t, &img, &rng, NULL), TERN_ERR_INVALID);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_resize_2x2_to_4x4),
        cmocka_unit_test(test_resize_down_averages_pairs),
        cmocka_unit_test(test_resize_shorter_side_and_center_crop),
        cmocka_unit_test(test_pad_and_random_crop),
        cmocka_unit_test(test_hflip),
        cmocka_unit_test(test_rotation),
        cmocka_unit_test(test_channel_conversion),
        cmocka_unit_test(test_normalization),
        cmocka_unit_test(test_color_jitter),
        cmocka_unit_test(test_random_resized_crop),
        cmocka_unit_test(test_random_resized_crop_extreme_ratio),
        cmocka_unit_test(test_invalid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
