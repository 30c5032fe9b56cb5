/* Image decoding: PNGs of every colour type and depth (written with libpng directly) and JPEGs
 * (written with libjpeg) decode to the expected pixels; truncated, corrupted, empty, foreign
 * and oversized files fail with a status and a message, never a crash; allocation failures
 * clean up. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <jpeglib.h>
#include <png.h>

#include "tern/image.h"
#include "testutil.h"

/* ---- helpers ---------------------------------------------------------------------------- */

static char *make_tmpdir(void)
{
    char *dir = strdup("/tmp/tern-img-XXXXXX");
    assert_non_null(dir);
    assert_non_null(mkdtemp(dir));
    return dir;
}

static void remove_tmpdir(char *dir)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *e;
    char path[4096];
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    assert_int_equal(rmdir(dir), 0);
    free(dir);
}

static void write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (len)
        assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

static unsigned char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    assert_true(n >= 0);
    rewind(f);
    unsigned char *b = malloc((size_t)n + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return b;
}

/* PNG in memory with libpng's classic writer: any colour type, depth, optional palette/tRNS,
 * optional Adam7. `rows` holds raw samples (16-bit big-endian, sub-byte packed). */
typedef struct {
    unsigned char *p;
    size_t len, cap;
} membuf;

static void membuf_write(png_structp png, png_bytep data, size_t n)
{
    membuf *m = png_get_io_ptr(png);
    if (m->len + n > m->cap) {
        m->cap = (m->len + n) * 2;
        m->p = realloc(m->p, m->cap);
        assert_non_null(m->p);
    }
    memcpy(m->p + m->len, data, n);
    m->len += n;
}

static void membuf_flush(png_structp png)
{
    (void)png;
}

static unsigned char *make_png(int w, int h, int depth, int color, bool interlace,
                               const png_color *palette, int npalette, const png_byte *trns,
                               int ntrns, const unsigned char *raw, size_t *len)
{
    membuf m = {0};
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    assert_non_null(png);
    png_infop info = png_create_info_struct(png);
    assert_non_null(info);
    if (setjmp(png_jmpbuf(png)))
        fail_msg("libpng failed writing a test image");
    png_set_write_fn(png, &m, membuf_write, membuf_flush);
    png_set_IHDR(png, info, (png_uint_32)w, (png_uint_32)h, depth, color,
                 interlace ? PNG_INTERLACE_ADAM7 : PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    if (palette)
        png_set_PLTE(png, info, palette, npalette);
    if (trns)
        png_set_tRNS(png, info, trns, ntrns, NULL);
    png_write_info(png, info);
    size_t rowbytes = png_get_rowbytes(png, info);
    png_bytep *rows = malloc((size_t)h * sizeof *rows);
    assert_non_null(rows);
    for (int y = 0; y < h; y++)
        rows[y] = (png_bytep)raw + (size_t)y * rowbytes;
    png_write_image(png, rows);
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    free(rows);
    *len = m.len;
    return m.p;
}

static unsigned char *make_jpeg(const unsigned char *pixels, int w, int h, int components,
                                J_COLOR_SPACE space, int quality, size_t *len)
{
    struct jpeg_compress_struct ci;
    struct jpeg_error_mgr jerr;
    ci.err = jpeg_std_error(&jerr);
    jpeg_create_compress(&ci);
    unsigned char *buf = NULL;
    unsigned long size = 0;
    jpeg_mem_dest(&ci, &buf, &size);
    ci.image_width = (JDIMENSION)w;
    ci.image_height = (JDIMENSION)h;
    ci.input_components = components;
    ci.in_color_space = space;
    jpeg_set_defaults(&ci);
    jpeg_set_quality(&ci, quality, TRUE);
    for (int i = 0; i < ci.num_components; i++) /* no chroma subsampling: tight comparisons */
        ci.comp_info[i].h_samp_factor = ci.comp_info[i].v_samp_factor = 1;
    jpeg_start_compress(&ci, TRUE);
    while (ci.next_scanline < ci.image_height) {
        JSAMPROW row = (JSAMPROW)pixels + (size_t)ci.next_scanline * (size_t)w * (size_t)components;
        jpeg_write_scanlines(&ci, &row, 1);
    }
    jpeg_finish_compress(&ci);
    jpeg_destroy_compress(&ci);
    *len = size;
    return buf;
}

static unsigned char *random_bytes(size_t n, uint64_t seed)
{
    test_rng r = {seed};
    unsigned char *p = malloc(n ? n : 1);
    assert_non_null(p);
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)test_rng_next(&r);
    return p;
}

/* A smooth image (JPEG-friendly): gradients plus a little pattern. */
static unsigned char *smooth_image(int w, int h, int c)
{
    unsigned char *p = malloc((size_t)w * (size_t)h * (size_t)c);
    assert_non_null(p);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int k = 0; k < c; k++)
                p[((size_t)y * (size_t)w + (size_t)x) * (size_t)c + (size_t)k] =
                    (unsigned char)(40 + (x * 150) / w + (y * 50) / h + k * 20);
    return p;
}

static void decode_ok(const unsigned char *b, size_t len, tern_image *img)
{
    tern_error err = {{0}};
    tern_status s = tern_image_decode(b, len, NULL, NULL, img, &err);
    if (s != TERN_OK)
        fail_msg("decode failed: %s", err.message);
}

/* ---- PNG ---------------------------------------------------------------------------------- */

static void test_png_roundtrip_grey_rgb(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char path[4200];
    for (int c = 1; c <= 3; c += 2) {
        unsigned char *px = random_bytes((size_t)13 * 7 * (size_t)c, 1 + (uint64_t)c);
        tern_image img = {.width = 13, .height = 7, .channels = c, .data = px}, back;
        tern_error err;
        snprintf(path, sizeof path, "%s/x%d.png", dir, c);
        assert_int_equal(tern_image_save_png(path, &img, &err), TERN_OK);
        assert_int_equal(tern_image_load(path, NULL, NULL, &back, &err), TERN_OK);
        assert_int_equal(back.width, 13);
        assert_int_equal(back.height, 7);
        assert_int_equal(back.channels, c);
        assert_memory_equal(back.data, px, (size_t)13 * 7 * (size_t)c);
        tern_image_free(NULL, &back);
        assert_null(back.data);
        free(px);
    }
    remove_tmpdir(dir);
}

static void test_png_rgba_and_grey_alpha(void **state)
{
    (void)state;
    const int w = 5, h = 4;
    unsigned char *raw = random_bytes((size_t)w * h * 4, 7);
    size_t len;
    tern_image img;
    /* RGBA -> RGB, alpha dropped (not composited). */
    unsigned char *png = make_png(w, h, 8, PNG_COLOR_TYPE_RGBA, false, NULL, 0, NULL, 0, raw, &len);
    decode_ok(png, len, &img);
    assert_int_equal(img.channels, 3);
    for (int i = 0; i < w * h; i++)
        assert_memory_equal(img.data + 3 * i, raw + 4 * i, 3);
    tern_image_free(NULL, &img);
    free(png);
    /* grey + alpha -> grey */
    png = make_png(w, h, 8, PNG_COLOR_TYPE_GRAY_ALPHA, false, NULL, 0, NULL, 0, raw, &len);
    decode_ok(png, len, &img);
    assert_int_equal(img.channels, 1);
    for (int i = 0; i < w * h; i++)
        assert_int_equal(img.data[i], raw[2 * i]);
    tern_image_free(NULL, &img);
    free(png);
    free(raw);
}

static void test_png_palette(void **state)
{
    (void)state;
    const int w = 6, h = 3;
    png_color pal[16];
    for (int i = 0; i < 16; i++)
        pal[i] = (png_color){(png_byte)(i * 16), (png_byte)(255 - i * 10), (png_byte)(i * 3)};
    png_byte trns[2] = {0, 128}; /* transparency is ignored */
    /* 4-bit indices, two per byte: 6 pixels = 3 bytes per row */
    unsigned char raw[9], idx[18];
    for (int i = 0; i < 18; i++)
        idx[i] = (unsigned char)((i * 5) % 16);
    for (int i = 0; i < 9; i++)
        raw[i] = (unsigned char)(idx[2 * i] << 4 | idx[2 * i + 1]);
    size_t len;
    unsigned char *png =
        make_png(w, h, 4, PNG_COLOR_TYPE_PALETTE, false, pal, 16, trns, 2, raw, &len);
    tern_image img;
    decode_ok(png, len, &img);
    assert_int_equal(img.channels, 3);
    assert_int_equal(img.width, w);
    for (int i = 0; i < w * h; i++) {
        assert_int_equal(img.data[3 * i + 0], pal[idx[i]].red);
        assert_int_equal(img.data[3 * i + 1], pal[idx[i]].green);
        assert_int_equal(img.data[3 * i + 2], pal[idx[i]].blue);
    }
    tern_image_free(NULL, &img);
    free(png);
}

static void test_png_16bit_and_low_depth(void **state)
{
    (void)state;
    const int w = 4, h = 3;
    unsigned char *raw = random_bytes((size_t)w * h * 8, 11);
    size_t len;
    tern_image img;
    /* RGB 16-bit: the high byte of each big-endian sample. */
    unsigned char *png = make_png(w, h, 16, PNG_COLOR_TYPE_RGB, false, NULL, 0, NULL, 0, raw, &len);
    decode_ok(png, len, &img);
    assert_int_equal(img.channels, 3);
    for (int i = 0; i < w * h * 3; i++)
        assert_int_equal(img.data[i], raw[2 * i]);
    tern_image_free(NULL, &img);
    free(png);
    /* grey 16-bit */
    png = make_png(w, h, 16, PNG_COLOR_TYPE_GRAY, false, NULL, 0, NULL, 0, raw, &len);
    decode_ok(png, len, &img);
    assert_int_equal(img.channels, 1);
    for (int i = 0; i < w * h; i++)
        assert_int_equal(img.data[i], raw[2 * i]);
    tern_image_free(NULL, &img);
    free(png);
    /* RGBA 16-bit */
    png = make_png(w, h, 16, PNG_COLOR_TYPE_RGBA, false, NULL, 0, NULL, 0, raw, &len);
    decode_ok(png, len, &img);
    assert_int_equal(img.channels, 3);
    for (int i = 0; i < w * h; i++)
        for (int k = 0; k < 3; k++)
            assert_int_equal(img.data[3 * i + k], raw[8 * i + 2 * k]);
    tern_image_free(NULL, &img);
    free(png);
    /* grey 1-bit: 0 -> 0, 1 -> 255 */
    unsigned char bits[3] = {0xA0, 0x50, 0xF0}; /* rows: 1010, 0101, 1111 */
    png = make_png(w, h, 1, PNG_COLOR_TYPE_GRAY, false, NULL, 0, NULL, 0, bits, &len);
    decode_ok(png, len, &img);
    assert_int_equal(img.channels, 1);
    const unsigned char want[12] = {255, 0, 255, 0, 0, 255, 0, 255, 255, 255, 255, 255};
    assert_memory_equal(img.data, want, 12);
    tern_image_free(NULL, &img);
    free(png);
    free(raw);
}

static void test_png_interlaced(void **state)
{
    (void)state;
    const int w = 19, h = 11;
    unsigned char *raw = random_bytes((size_t)w * h * 3, 5);
    size_t len;
    unsigned char *png = make_png(w, h, 8, PNG_COLOR_TYPE_RGB, true, NULL, 0, NULL, 0, raw, &len);
    tern_image img;
    decode_ok(png, len, &img);
    assert_memory_equal(img.data, raw, (size_t)w * h * 3);
    tern_image_free(NULL, &img);
    free(png);
    free(raw);
}

/* ---- JPEG --------------------------------------------------------------------------------- */

static void check_jpeg(int c)
{
    const int w = 33, h = 17;
    unsigned char *px = smooth_image(w, h, c);
    size_t len;
    unsigned char *jpg = make_jpeg(px, w, h, c, c == 1 ? JCS_GRAYSCALE : JCS_RGB, 100, &len);
    tern_image img;
    decode_ok(jpg, len, &img);
    assert_int_equal(img.width, w);
    assert_int_equal(img.height, h);
    assert_int_equal(img.channels, c);
    int worst = 0;
    for (size_t i = 0; i < (size_t)w * h * (size_t)c; i++) {
        int d = abs((int)img.data[i] - (int)px[i]);
        worst = d > worst ? d : worst;
    }
    if (worst > 3)
        fail_msg("JPEG (%d channels) differs by up to %d", c, worst);
    tern_image_free(NULL, &img);
    free(jpg);
    free(px);
}

static void test_jpeg_grey_rgb(void **state)
{
    (void)state;
    check_jpeg(1);
    check_jpeg(3);
}

static void test_jpeg_cmyk_unsupported(void **state)
{
    (void)state;
    unsigned char *px = smooth_image(8, 8, 4);
    size_t len;
    unsigned char *jpg = make_jpeg(px, 8, 8, 4, JCS_CMYK, 90, &len);
    tern_image img = {0};
    tern_error err = {{0}};
    assert_int_equal(tern_image_decode(jpg, len, NULL, NULL, &img, &err), TERN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, "CMYK"));
    assert_null(img.data);
    free(jpg);
    free(px);
}

/* ---- malformed input ---------------------------------------------------------------------- */

/* Every prefix of the file must fail (cleanly: the sanitizer build checks for leaks). */
static void check_all_truncations(const unsigned char *b, size_t len, const char *what)
{
    for (size_t cut = 0; cut < len; cut++) {
        tern_image img = {0};
        tern_error err = {{0}};
        tern_status s = tern_image_decode(b, cut, NULL, NULL, &img, &err);
        if (s == TERN_OK)
            fail_msg("%s cut to %zu of %zu bytes decoded without error", what, cut, len);
        assert_true(s == TERN_ERR_FORMAT);
        assert_true(err.message[0] != '\0');
        assert_null(img.data);
    }
}

static void test_truncated(void **state)
{
    (void)state;
    unsigned char *raw = random_bytes(16 * 9 * 3, 3);
    size_t len;
    unsigned char *png = make_png(16, 9, 8, PNG_COLOR_TYPE_RGB, false, NULL, 0, NULL, 0, raw, &len);
    check_all_truncations(png, len, "PNG");
    free(png);
    png = make_png(16, 9, 8, PNG_COLOR_TYPE_RGB, true, NULL, 0, NULL, 0, raw, &len);
    check_all_truncations(png, len, "interlaced PNG");
    free(png);
    unsigned char *px = smooth_image(24, 16, 3);
    unsigned char *jpg = make_jpeg(px, 24, 16, 3, JCS_RGB, 100, &len);
    check_all_truncations(jpg, len, "JPEG");
    free(jpg);
    free(px);
    free(raw);
}

static void test_truncated_file_names_path(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char path[4200];
    unsigned char *px = smooth_image(24, 16, 3);
    size_t len;
    unsigned char *jpg = make_jpeg(px, 24, 16, 3, JCS_RGB, 100, &len);
    snprintf(path, sizeof path, "%s/cut.jpg", dir);
    write_file(path, jpg, len / 2);
    tern_image img = {0};
    tern_error err = {{0}};
    assert_int_equal(tern_image_load(path, NULL, NULL, &img, &err), TERN_ERR_FORMAT);
    assert_non_null(strstr(err.message, path));
    assert_non_null(strstr(err.message, "JPEG"));
    free(jpg);
    free(px);
    remove_tmpdir(dir);
}

static void test_corrupt_bytes(void **state)
{
    (void)state;
    unsigned char *raw = random_bytes(16 * 9 * 3, 9);
    size_t plen, jlen;
    unsigned char *png = make_png(16, 9, 8, PNG_COLOR_TYPE_RGB, false, NULL, 0, NULL, 0, raw, &plen);
    unsigned char *px = smooth_image(24, 16, 3);
    unsigned char *jpg = make_jpeg(px, 24, 16, 3, JCS_RGB, 100, &jlen);
    test_rng r = {42};
    for (int trial = 0; trial < 400; trial++) {
        bool is_png = trial % 2 == 0;
        size_t len = is_png ? plen : jlen;
        unsigned char *b = malloc(len);
        assert_non_null(b);
        memcpy(b, is_png ? png : jpg, len);
        /* Keep the signature so the decoder itself sees the damage. */
        size_t start = is_png ? 8 : 3;
        int flips = 1 + test_rng_int(&r, 0, 3);
        for (int f = 0; f < flips; f++)
            b[start + test_rng_next(&r) % (len - start)] ^= (unsigned char)(1 + test_rng_int(&r, 0, 254));
        tern_image img = {0};
        tern_error err = {{0}};
        tern_status s = tern_image_decode(b, len, NULL, NULL, &img, &err);
        /* Every PNG chunk carries a CRC; JPEG entropy data has no checksum and may decode. */
        if (is_png)
            assert_int_not_equal(s, TERN_OK);
        if (s == TERN_OK)
            tern_image_free(NULL, &img);
        else
            assert_true(err.message[0] != '\0');
        free(b);
    }
    free(png);
    free(jpg);
    free(px);
    free(raw);
}

static void test_empty_and_foreign_files(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char path[4200];
    tern_image img = {0};
    tern_error err = {{0}};
    snprintf(path, sizeof path, "%s/empty.png", dir);
    write_file(path, "", 0);
    assert_int_equal(tern_image_load(path, NULL, NULL, &img, &err), TERN_ERR_FORMAT);
    assert_non_null(strstr(err.message, path));
    assert_non_null(strstr(err.message, "empty"));
    snprintf(path, sizeof path, "%s/notes.jpg", dir);
    const char text[] = "this is not an image, whatever its name says\n";
    write_file(path, text, sizeof text - 1);
    assert_int_equal(tern_image_load(path, NULL, NULL, &img, &err), TERN_ERR_FORMAT);
    assert_non_null(strstr(err.message, "not a JPEG or PNG"));
    snprintf(path, sizeof path, "%s/missing.png", dir);
    assert_int_equal(tern_image_load(path, NULL, NULL, &img, &err), TERN_ERR_IO);
    assert_non_null(strstr(err.message, path));
    assert_int_equal(tern_image_load(dir, NULL, NULL, &img, &err), TERN_ERR_IO);
    assert_int_equal(tern_image_decode("\xff\xd8", 2, NULL, NULL, &img, &err), TERN_ERR_FORMAT);
    assert_int_equal(tern_image_decode(NULL, 0, NULL, NULL, &img, &err), TERN_ERR_FORMAT);
    assert_int_equal(tern_image_decode(NULL, 5, NULL, NULL, &img, &err), TERN_ERR_INVALID);
    assert_null(img.data);
    remove_tmpdir(dir);
}

static void put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* Appends a chunk with a correct CRC. */
static size_t put_chunk(unsigned char *b, const char *type, const unsigned char *data, uint32_t n)
{
    put_be32(b, n);
    memcpy(b + 4, type, 4);
    if (n)
        memcpy(b + 8, data, n);
    put_be32(b + 8 + n, (uint32_t)crc32(0, b + 4, 4 + n));
    return 12 + n;
}

static void test_decompression_bomb(void **state)
{
    (void)state;
    /* A valid PNG header declaring 100000 x 100000 RGB pixels, with a few bytes of image data. */
    unsigned char b[256], ihdr[13], idat[64];
    memcpy(b, "\x89PNG\r\n\x1a\n", 8);
    put_be32(ihdr, 100000);
    put_be32(ihdr + 4, 100000);
    ihdr[8] = 8, ihdr[9] = 2, ihdr[10] = ihdr[11] = ihdr[12] = 0;
    size_t n = 8 + put_chunk(b + 8, "IHDR", ihdr, 13);
    unsigned char zeros[32] = {0};
    uLongf zlen = sizeof idat;
    assert_int_equal(compress(idat, &zlen, zeros, sizeof zeros), Z_OK);
    n += put_chunk(b + n, "IDAT", idat, (uint32_t)zlen);
    n += put_chunk(b + n, "IEND", NULL, 0);
    tern_image img = {0};
    tern_error err = {{0}};
    assert_int_equal(tern_image_decode(b, n, NULL, NULL, &img, &err), TERN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, "100000x100000"));
    assert_null(img.data);
    /* Past libpng's own default limit of a million pixels a side: still our limit. */
    put_be32(b + 16, 3000000);
    put_be32(b + 29, (uint32_t)crc32(0, b + 12, 17));
    assert_int_equal(tern_image_decode(b, n, NULL, NULL, &img, &err), TERN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, "3000000x100000"));

    /* A JPEG whose frame header claims 60000 x 60000. */
    unsigned char *px = smooth_image(16, 16, 3);
    size_t len;
    unsigned char *jpg = make_jpeg(px, 16, 16, 3, JCS_RGB, 90, &len);
    for (size_t i = 2; i + 8 < len; i++)
        if (jpg[i] == 0xFF && jpg[i + 1] == 0xC0) { /* SOF0: FF C0 len(2) P(1) Y(2) X(2) */
            jpg[i + 5] = 0xEA, jpg[i + 6] = 0x60, jpg[i + 7] = 0xEA, jpg[i + 8] = 0x60;
            break;
        }
    assert_int_equal(tern_image_decode(jpg, len, NULL, NULL, &img, &err), TERN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, "60000x60000"));

    /* Caller-chosen limits. */
    free(jpg);
    jpg = make_jpeg(px, 16, 16, 3, JCS_RGB, 90, &len);
    tern_image_limits lim = {.max_pixels = 255};
    assert_int_equal(tern_image_decode(jpg, len, &lim, NULL, &img, &err), TERN_ERR_UNSUPPORTED);
    lim = (tern_image_limits){.max_pixels = 256};
    assert_int_equal(tern_image_decode(jpg, len, &lim, NULL, &img, &err), TERN_OK);
    tern_image_free(NULL, &img);
    lim = (tern_image_limits){.max_file_bytes = len - 1};
    assert_int_equal(tern_image_decode(jpg, len, &lim, NULL, &img, &err), TERN_ERR_UNSUPPORTED);
    char *dir = make_tmpdir();
    char path[4200];
    snprintf(path, sizeof path, "%s/big.jpg", dir);
    write_file(path, jpg, len);
    assert_int_equal(tern_image_load(path, &lim, NULL, &img, &err), TERN_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.message, "over the limit"));
    remove_tmpdir(dir);
    free(jpg);
    free(px);
}

static void test_allocation_failures(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char path[4200];
    unsigned char *raw = random_bytes(8 * 8 * 3, 1);
    size_t plen, jlen;
    unsigned char *png = make_png(8, 8, 8, PNG_COLOR_TYPE_RGB, false, NULL, 0, NULL, 0, raw, &plen);
    unsigned char *px = smooth_image(8, 8, 3);
    unsigned char *jpg = make_jpeg(px, 8, 8, 3, JCS_RGB, 90, &jlen);
    snprintf(path, sizeof path, "%s/a.png", dir);
    write_file(path, png, plen);
    for (int which = 0; which < 3; which++) {
        bool ok = false;
        for (long k = 1; k < 50 && !ok; k++) {
            test_alloc_state st = {.fail_at = k};
            tern_allocator a = test_failing_allocator(&st);
            tern_image img = {0};
            tern_error err;
            tern_status s = which == 0   ? tern_image_decode(png, plen, NULL, &a, &img, &err)
                            : which == 1 ? tern_image_decode(jpg, jlen, NULL, &a, &img, &err)
                                         : tern_image_load(path, NULL, &a, &img, &err);
            if (s == TERN_OK) {
                ok = true;
                tern_image_free(&a, &img);
            } else {
                assert_int_equal(s, TERN_ERR_NOMEM);
                assert_null(img.data);
            }
            assert_int_equal(st.live, 0);
        }
        assert_true(ok);
    }
    free(png);
    free(jpg);
    free(px);
    free(raw);
    remove_tmpdir(dir);
}

static void test_save_png_errors(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char path[4200];
    unsigned char px[4] = {1, 2, 3, 4};
    tern_image img = {.width = 2, .height = 2, .channels = 1, .data = px};
    tern_error err;
    snprintf(path, sizeof path, "%s/no/such/dir/x.png", dir);
    assert_int_equal(tern_image_save_png(path, &img, &err), TERN_ERR_IO);
    img.channels = 4;
    snprintf(path, sizeof path, "%s/x.png", dir);
    assert_int_equal(tern_image_save_png(path, &img, &err), TERN_ERR_INVALID);
    /* Replacing an existing file leaves no temporary behind. */
    img.channels = 1;
    assert_int_equal(tern_image_save_png(path, &img, &err), TERN_OK);
    px[0] = 9;
    assert_int_equal(tern_image_save_png(path, &img, &err), TERN_OK);
    size_t len;
    unsigned char *b = read_file(path, &len);
    tern_image back;
    decode_ok(b, len, &back);
    assert_memory_equal(back.data, px, 4);
    tern_image_free(NULL, &back);
    free(b);
    DIR *d = opendir(dir);
    int entries = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;)
        entries += e->d_name[0] != '.';
    closedir(d);
    assert_int_equal(entries, 1);
    remove_tmpdir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_png_roundtrip_grey_rgb),
        cmocka_unit_test(test_png_rgba_and_grey_alpha),
        cmocka_unit_test(test_png_palette),
        cmocka_unit_test(test_png_16bit_and_low_depth),
        cmocka_unit_test(test_png_interlaced),
        cmocka_unit_test(test_jpeg_grey_rgb),
        cmocka_unit_test(test_jpeg_cmyk_unsupported),
        cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_truncated_file_names_path),
        cmocka_unit_test(test_corrupt_bytes),
        cmocka_unit_test(test_empty_and_foreign_files),
        cmocka_unit_test(test_decompression_bomb),
        cmocka_unit_test(test_allocation_failures),
        cmocka_unit_test(test_save_png_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
