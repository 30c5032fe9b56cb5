/* JPEG and PNG decoding into tern_image, and an 8-bit PNG writer.
 *
 * Both libraries report fatal errors through a callback that must not return; each decoder keeps
 * a jmp_buf in a context struct owned by the caller of the function that calls setjmp, so
 * everything that has to be released after a longjmp (pixel buffer, row pointers) lives in
 * that struct rather than in locals of the setjmp function. Library warnings are recorded,
 * never printed: libjpeg's corrupt-data warnings (premature end of file, bad Huffman code,
 * lost sync) are turned into errors so a damaged file fails instead of decoding to grey.
 *
 * Conversions follow Pillow's Image.convert("RGB") / ("L"), which torchvision's ImageFolder
 * uses: palette PNGs become RGB, 16-bit samples keep their high byte, and alpha is dropped
 * (not composited). Limits (file bytes, pixel count) are checked before the large
 * allocations, so a small file declaring 100000 x 100000 pixels fails cheaply. */
#include "tern/image.h"

#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

#include "nn/util.h"

#define DEFAULT_MAX_FILE_BYTES ((size_t)64 << 20)
#define DEFAULT_MAX_PIXELS ((size_t)40 * 1000 * 1000)
/* Progressive JPEGs can declare any number of scans, each a pass over the whole image. */
#define MAX_JPEG_SCANS 1000
#define READ_CHUNK ((size_t)1 << 30)

typedef struct {
    size_t max_file_bytes, max_pixels;
} limits_t;

static limits_t resolve_limits(const tern_image_limits *l)
{
    limits_t r = {DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS};
    if (l && l->max_file_bytes)
        r.max_file_bytes = l->max_file_bytes;
    if (l && l->max_pixels)
        r.max_pixels = l->max_pixels;
    return r;
}

/* Checks the declared size against the pixel limit; on success *bytes is the buffer size. */
static tern_status check_dims(const char *label, const char *kind, size_t w, size_t h,
                              size_t channels, const limits_t *lim, size_t *bytes,
                              tern_error *err)
{
    size_t pixels;
    if (w == 0 || h == 0)
        return tern_set_error(err, TERN_ERR_FORMAT, "%s%s: image has no pixels (%zux%zu)", label,
                              kind, w, h);
    if (w > (size_t)INT32_MAX || h > (size_t)INT32_MAX || !tern_mul_size(w, h, &pixels) ||
        pixels > lim->max_pixels)
        return tern_set_error(err, TERN_ERR_UNSUPPORTED,
                              "%s%s: %zux%zu pixels is over the limit of %zu pixels", label, kind,
                              w, h, lim->max_pixels);
    if (!tern_mul_size(pixels, channels, bytes))
        return tern_set_error(err, TERN_ERR_UNSUPPORTED, "%s%s: image too large", label, kind);
    return TERN_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* JPEG                                                                                       */

typedef struct {
    struct jpeg_error_mgr pub; /* first: libjpeg hands back a pointer to it */
    jmp_buf jb;
    char message[JMSG_LENGTH_MAX];
} jpeg_err_ctx;

typedef struct {
    struct jpeg_decompress_struct cinfo;
    jpeg_err_ctx jerr;
    struct jpeg_progress_mgr progress;
    bool created;
    uint8_t *pixels;
} jpeg_ctx;

static void jpeg_on_error(j_common_ptr cinfo)
{
    jpeg_err_ctx *e = (jpeg_err_ctx *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, e->message);
    longjmp(e->jb, 1);
}

/* Warnings (msg_level -1) that mean pixel data is missing or garbled become errors; trace
 * messages and harmless warnings are dropped. Nothing is printed. */
static void jpeg_on_message(j_common_ptr cinfo, int msg_level)
{
    if (msg_level != -1)
        return;
    switch (cinfo->err->msg_code) {
    case JWRN_JPEG_EOF:
    case JWRN_HIT_MARKER:
    case JWRN_MUST_RESYNC:
    case JWRN_HUFF_BAD_CODE:
    case JWRN_NOT_SEQUENTIAL:
        jpeg_on_error(cinfo);
        break;
    default:
        cinfo->err->num_warnings++;
    }
}

static void jpeg_on_output(j_common_ptr cinfo)
{
    (void)cinfo;
}

static void jpeg_on_progress(j_common_ptr cinfo)
{
    j_decompress_ptr d = (j_decompress_ptr)cinfo;
    if (d->input_scan_number > MAX_JPEG_SCANS) {
        jpeg_err_ctx *e = (jpeg_err_ctx *)cinfo->err;
        snprintf(e->message, sizeof e->message, "more than %d progressive scans",
                 MAX_JPEG_SCANS);
        longjmp(e->jb, 1);
    }
}

/* The function holding the setjmp: everything it must release after a longjmp is in c. */
static tern_status jpeg_decode(jpeg_ctx *c, const unsigned char *bytes, size_t len,
                               const limits_t *lim, const tern_allocator *alloc, const char *label,
                               tern_image *out, tern_error *err)
{
    struct jpeg_decompress_struct *ci = &c->cinfo;
    ci->err = jpeg_std_error(&c->jerr.pub);
    c->jerr.pub.error_exit = jpeg_on_error;
    c->jerr.pub.emit_message = jpeg_on_message;
    c->jerr.pub.output_message = jpeg_on_output;
    if (setjmp(c->jerr.jb))
        return tern_set_error(err, TERN_ERR_FORMAT, "%sJPEG: %s", label, c->jerr.message);
    jpeg_create_decompress(ci);
    c->created = true;
    c->progress.progress_monitor = jpeg_on_progress;
    ci->progress = &c->progress;
    jpeg_mem_src(ci, bytes, (unsigned long)len);
    jpeg_read_header(ci, TRUE);

    int channels;
    switch (ci->jpeg_color_space) {
    case JCS_GRAYSCALE:
        ci->out_color_space = JCS_GRAYSCALE;
        channels = 1;
        break;
    case JCS_YCbCr:
    case JCS_RGB:
        ci->out_color_space = JCS_RGB;
        channels = 3;
        break;
    case JCS_CMYK:
    case JCS_YCCK:
        return tern_set_error(err, TERN_ERR_UNSUPPORTED, "%sJPEG: CMYK images are not supported",
                              label);
    default:
        return tern_set_error(err, TERN_ERR_UNSUPPORTED, "%sJPEG: unsupported colour space %d",
                              label, (int)ci->jpeg_color_space);
    }
    size_t bytes_needed;
    tern_status s = check_dims(label, "JPEG", ci->image_width, ci->image_height,
                               (size_t)channels, lim, &bytes_needed, err);
    if (s != TERN_OK)
        return s;
    c->pixels = tern_alloc(alloc, bytes_needed);
    if (!c->pixels)
        return tern_set_error(err, TERN_ERR_NOMEM, "%sJPEG: out of memory for %zu bytes", label,
                              bytes_needed);

    jpeg_start_decompress(ci);
    if (ci->output_components != channels || ci->output_width != ci->image_width ||
        ci->output_height != ci->image_height)
        return tern_set_error(err, TERN_ERR_FORMAT, "%sJPEG: unexpected output geometry", label);
    size_t stride = (size_t)ci->output_width * (size_t)channels;
    while (ci->output_scanline < ci->output_height) {
        JSAMPROW row = c->pixels + (size_t)ci->output_scanline * stride;
        if (jpeg_read_scanlines(ci, &row, 1) != 1)
            return tern_set_error(err, TERN_ERR_FORMAT, "%sJPEG: decoder made no progress",
                                  label);
    }
    jpeg_finish_decompress(ci);

    out->width = (int)ci->output_width;
    out->height = (int)ci->output_height;
    out->channels = channels;
    out->data = c->pixels;
    c->pixels = NULL;
    return TERN_OK;
}

static tern_status decode_jpeg(const unsigned char *bytes, size_t len, const limits_t *lim,
                               const tern_allocator *alloc, const char *label, tern_image *out,
                               tern_error *err)
{
    jpeg_ctx *c = tern_calloc(alloc, 1, sizeof *c); /* large: keep it off the stack */
    if (!c)
        return tern_set_error(err, TERN_ERR_NOMEM, "%sJPEG: out of memory", label);
    tern_status s = jpeg_decode(c, bytes, len, lim, alloc, label, out, err);
    if (c->created)
        jpeg_destroy_decompress(&c->cinfo);
    tern_free(alloc, c->pixels);
    tern_free(alloc, c);
    return s;
}

/* ---------------------------------------------------------------------------------------- */
/* PNG                                                                                        */

typedef struct {
    jmp_buf jb;
    char message[256];
} png_err_ctx;

typedef struct {
    png_structp png;
    png_infop info;
    png_err_ctx perr;
    const unsigned char *bytes;
    size_t len, pos;
    uint8_t *pixels;
    png_bytep *rows;
    const tern_allocator *alloc;
} png_ctx;

static void png_on_error(png_structp png, png_const_charp msg)
{
    png_err_ctx *e = png_get_error_ptr(png);
    snprintf(e->message, sizeof e->message, "%s", msg ? msg : "unknown error");
    longjmp(e->jb, 1);
}

static void png_on_warning(png_structp png, png_const_charp msg)
{
    (void)png;
    (void)msg;
}

static void png_read_mem(png_structp png, png_bytep dst, size_t n)
{
    png_ctx *c = png_get_io_ptr(png);
    if (n > c->len - c->pos)
        png_error(png, "unexpected end of file (truncated)");
    memcpy(dst, c->bytes + c->pos, n);
    c->pos += n;
}

static tern_status png_decode(png_ctx *c, const limits_t *lim, const char *label,
                              tern_image *out, tern_error *err)
{
    if (setjmp(c->perr.jb))
        return tern_set_error(err, TERN_ERR_FORMAT, "%sPNG: %s", label, c->perr.message);
    c->png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &c->perr, png_on_error,
                                    png_on_warning);
    if (!c->png)
        return tern_set_error(err, TERN_ERR_NOMEM, "%sPNG: out of memory", label);
    c->info = png_create_info_struct(c->png);
    if (!c->info)
        return tern_set_error(err, TERN_ERR_NOMEM, "%sPNG: out of memory", label);
    png_set_read_fn(c->png, c, png_read_mem);
    /* Our pixel limit, checked below, is the one that applies (and reports UNSUPPORTED). */
    png_set_user_limits(c->png, PNG_UINT_31_MAX, PNG_UINT_31_MAX);
    png_read_info(c->png, c->info);

    png_uint_32 w, h;
    int depth, color, interlace;
    png_get_IHDR(c->png, c->info, &w, &h, &depth, &color, &interlace, NULL, NULL);
    int channels = (color & PNG_COLOR_MASK_COLOR) || color == PNG_COLOR_TYPE_PALETTE ? 3 : 1;
    size_t bytes_needed;
    tern_status s = check_dims(label, "PNG", w, h, (size_t)channels, lim, &bytes_needed, err);
    if (s != TERN_OK)
        return s;

    if (color == PNG_COLOR_TYPE_PALETTE)
        png_set_palette_to_rgb(c->png);
    if (color == PNG_COLOR_TYPE_GRAY && depth < 8)
        png_set_expand_gray_1_2_4_to_8(c->png);
    if (depth == 16)
        png_set_strip_16(c->png); /* high byte, as Pillow */
    /* Alpha channels, and the alpha palette expansion makes from tRNS, are dropped. */
    png_set_strip_alpha(c->png);
    png_set_interlace_handling(c->png);
    png_read_update_info(c->png, c->info);
    if (png_get_channels(c->png, c->info) != channels ||
        png_get_bit_depth(c->png, c->info) != 8 ||
        png_get_rowbytes(c->png, c->info) != (size_t)w * (size_t)channels)
        return tern_set_error(err, TERN_ERR_FORMAT, "%sPNG: unexpected layout after conversion",
                              label);

    c->pixels = tern_alloc(c->alloc, bytes_needed);
    c->rows = tern_alloc(c->alloc, (size_t)h * sizeof *c->rows);
    if (!c->pixels || !c->rows)
        return tern_set_error(err, TERN_ERR_NOMEM, "%sPNG: out of memory for %zu bytes", label,
                              bytes_needed);
    for (size_t y = 0; y < h; y++)
        c->rows[y] = c->pixels + y * (size_t)w * (size_t)channels;
    png_read_image(c->png, c->rows);
    /* Reads up to IEND, so a file cut after the image data still fails. */
    png_read_end(c->png, NULL);

    out->width = (int)w;
    out->height = (int)h;
    out->channels = channels;
    out->data = c->pixels;
    c->pixels = NULL;
    return TERN_OK;
}

static tern_status decode_png(const unsigned char *bytes, size_t len, const limits_t *lim,
                              const tern_allocator *alloc, const char *label, tern_image *out,
                              tern_error *err)
{
    png_ctx *c = tern_calloc(alloc, 1, sizeof *c);
    if (!c)
        return tern_set_error(err, TERN_ERR_NOMEM, "%sPNG: out of memory", label);
    c->bytes = bytes;
    c->len = len;
    c->alloc = alloc;
    tern_status s = png_decode(c, lim, label, out, err);
    if (c->png)
        png_destroy_read_struct(&c->png, c->info ? &c->info : NULL, NULL);
    tern_free(alloc, c->rows);
    tern_free(alloc, c->pixels);
    tern_free(alloc, c);
    return s;
}

/* ---------------------------------------------------------------------------------------- */
/* Public entry points                                                                        */

static const unsigned char png_signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

/* label is "" or "path: ", prefixed to every message. */
static tern_status decode_labelled(const void *bytes, size_t len, const limits_t *lim,
                                   const tern_allocator *alloc, const char *label,
                                   tern_image *out, tern_error *err)
{
    const unsigned char *b = bytes;
    tern_image img = {0};
    tern_status s;
    if (len > lim->max_file_bytes)
        return tern_set_error(err, TERN_ERR_UNSUPPORTED,
                              "%s%zu bytes is over the limit of %zu bytes", label, len,
                              lim->max_file_bytes);
    if (len == 0)
        return tern_set_error(err, TERN_ERR_FORMAT, "%sempty file", label);
    if (len >= 3 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF)
        s = decode_jpeg(b, len, lim, alloc, label, &img, err);
    else if (len >= sizeof png_signature && memcmp(b, png_signature, sizeof png_signature) == 0)
        s = decode_png(b, len, lim, alloc, label, &img, err);
    else
        return tern_set_error(err, TERN_ERR_FORMAT, "%snot a JPEG or PNG file", label);
    if (s == TERN_OK)
        *out = img;
    return s;
}

tern_status tern_image_decode(const void *bytes, size_t len, const tern_image_limits *limits,
                              const tern_allocator *alloc, tern_image *out, tern_error *err)
{
    if ((!bytes && len) || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_image_decode: NULL argument");
    limits_t lim = resolve_limits(limits);
    return decode_labelled(bytes, len, &lim, alloc, "", out, err);
}

tern_status tern_image_load(const char *path, const tern_image_limits *limits,
                            const tern_allocator *alloc, tern_image *out, tern_error *err)
{
    if (!path || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "tern_image_load: NULL argument");
    limits_t lim = resolve_limits(limits);
    tern_status s;
    unsigned char *bytes = NULL;
    size_t len = 0;
    char *label = NULL;
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return tern_set_error(err, TERN_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        s = tern_set_error(err, TERN_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(sb.st_mode)) {
        s = tern_set_error(err, TERN_ERR_IO, "%s: not a regular file", path);
        goto fail;
    }
    if ((uintmax_t)sb.st_size > lim.max_file_bytes) {
        s = tern_set_error(err, TERN_ERR_UNSUPPORTED,
                           "%s: %jd bytes is over the limit of %zu bytes", path,
                           (intmax_t)sb.st_size, lim.max_file_bytes);
        goto fail;
    }
    len = (size_t)sb.st_size;
    bytes = tern_alloc(alloc, len);
    if (!bytes) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory reading %zu bytes", path, len);
        goto fail;
    }
    size_t got = 0;
    while (got < len) {
        size_t want = len - got < READ_CHUNK ? len - got : READ_CHUNK;
        ssize_t r = read(fd, bytes + got, want);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            s = tern_set_error(err, TERN_ERR_IO, "%s: read failed: %s", path, strerror(errno));
            goto fail;
        }
        if (r == 0)
            break; /* shrank while reading: decode what is there (it will likely fail) */
        got += (size_t)r;
    }
    size_t plen = strlen(path), llen;
    if (!tern_add_size(plen, 3, &llen) || !(label = tern_alloc(alloc, llen))) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", path);
        goto fail;
    }
    memcpy(label, path, plen);
    memcpy(label + plen, ": ", 3);
    s = decode_labelled(bytes, got, &lim, alloc, label, out, err);

fail:
    close(fd);
    tern_free(alloc, label);
    tern_free(alloc, bytes);
    return s;
}

void tern_image_free(const tern_allocator *alloc, tern_image *img)
{
    if (!img)
        return;
    tern_free(alloc, img->data);
    memset(img, 0, sizeof *img);
}

/* ---------------------------------------------------------------------------------------- */
/* PNG writer                                                                                 */

typedef struct {
    png_structp png;
    png_infop info;
    png_err_ctx perr;
    FILE *f;
    png_bytep *rows;
} png_write_ctx;

static tern_status png_encode(png_write_ctx *c, const char *tmp, const tern_image *img,
                              tern_error *err)
{
    if (setjmp(c->perr.jb))
        return tern_set_error(err, TERN_ERR_IO, "%s: PNG: %s", tmp, c->perr.message);
    c->png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &c->perr, png_on_error,
                                     png_on_warning);
    if (!c->png)
        return tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", tmp);
    c->info = png_create_info_struct(c->png);
    if (!c->info)
        return tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", tmp);
    png_init_io(c->png, c->f);
    png_set_IHDR(c->png, c->info, (png_uint_32)img->width, (png_uint_32)img->height, 8,
                 img->channels == 3 ? PNG_COLOR_TYPE_RGB : PNG_COLOR_TYPE_GRAY,
                 PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    c->rows = tern_alloc(NULL, (size_t)img->height * sizeof *c->rows);
    if (!c->rows)
        return tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", tmp);
    size_t stride = (size_t)img->width * (size_t)img->channels;
    for (size_t y = 0; y < (size_t)img->height; y++)
        c->rows[y] = img->data + y * stride;
    png_set_rows(c->png, c->info, c->rows);
    png_write_png(c->png, c->info, PNG_TRANSFORM_IDENTITY, NULL);
    return TERN_OK;
}

tern_status tern_image_save_png(const char *path, const tern_image *img, tern_error *err)
{
    if (!path || !*path || !img || !img->data || img->width <= 0 || img->height <= 0 ||
        (img->channels != 1 && img->channels != 3))
        return tern_set_error(err, TERN_ERR_INVALID, "tern_image_save_png: bad argument");
    if ((png_uint_32)img->width > PNG_USER_WIDTH_MAX ||
        (png_uint_32)img->height > PNG_USER_HEIGHT_MAX)
        return tern_set_error(err, TERN_ERR_INVALID, "%s: image too large for PNG", path);
    static const char suffix[] = ".tmp.XXXXXX";
    tern_status s;
    size_t plen = strlen(path), tlen;
    char *tmp = NULL;
    int fd = -1;
    png_write_ctx *c = tern_calloc(NULL, 1, sizeof *c);
    if (!c || !tern_add_size(plen, sizeof suffix, &tlen) || !(tmp = tern_alloc(NULL, tlen))) {
        s = tern_set_error(err, TERN_ERR_NOMEM, "%s: out of memory", path);
        goto fail;
    }
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, suffix, sizeof suffix);
    fd = mkstemp(tmp);
    if (fd < 0) {
        s = tern_set_error(err, TERN_ERR_IO, "%s: cannot create temporary file: %s", path,
                           strerror(errno));
        tmp[0] = '\0';
        goto fail;
    }
    if (fchmod(fd, 0644) != 0 || !(c->f = fdopen(fd, "wb"))) {
        s = tern_set_error(err, TERN_ERR_IO, "%s: cannot open: %s", tmp, strerror(errno));
        goto fail;
    }
    fd = -1; /* owned by c->f now */
    s = png_encode(c, tmp, img, err);
    if (s != TERN_OK)
        goto fail;
    int rc = fflush(c->f) != 0 || fsync(fileno(c->f)) != 0;
    rc |= fclose(c->f) != 0;
    c->f = NULL;
    if (rc) {
        s = tern_set_error(err, TERN_ERR_IO, "%s: write failed: %s", tmp, strerror(errno));
        goto fail;
    }
    if (rename(tmp, path) != 0) {
        s = tern_set_error(err, TERN_ERR_IO, "cannot rename %s to %s: %s", tmp, path,
                           strerror(errno));
        goto fail;
    }
    tmp[0] = '\0';
    s = TERN_OK;

fail:
    if (c) {
        if (c->png)
            png_destroy_write_struct(&c->png, c->info ? &c->info : NULL);
        if (c->f)
            fclose(c->f);
        tern_free(NULL, c->rows);
        tern_free(NULL, c);
    }
    if (fd >= 0)
        close(fd);
    if (tmp && tmp[0])
        unlink(tmp);
    tern_free(NULL, tmp);
    return s;
}
