/* Decoded images and their decoding (JPEG through libjpeg-turbo, PNG through libpng).
 *
 * A tern_image is 8-bit, interleaved (H, W, C) with C = 1 (grey) or 3 (RGB): decoding converts
 * palette, grey+alpha, RGBA (alpha dropped, as Pillow's convert("RGB")) and 16-bit PNGs (high byte kept) to one of
 * those.
 * Decoding is defensive: limits on file size and pixel count are checked before any large
 * allocation, and a truncated or corrupt file is an error (TERN_ERR_FORMAT with the reason),
 * never a crash or an exit (libjpeg's and libpng's error handlers are redirected). */
#ifndef TERN_IMAGE_H
#define TERN_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "tern/alloc.h"
#include "tern/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tern_image {
    int width, height, channels; /* channels 1 or 3 */
    uint8_t *data;               /* height * width * channels bytes, row-major HWC */
} tern_image;

typedef struct tern_image_limits {
    size_t max_file_bytes; /* 0: 64 MiB */
    size_t max_pixels;     /* width * height; 0: 40 megapixels (decompression bombs) */
} tern_image_limits;

/* Decode a JPEG or PNG (detected from its first bytes) from memory into *out, whose data is
 * allocated with alloc (free with tern_image_free). Errors: TERN_ERR_FORMAT (corrupt, truncated,
 * unsupported format), TERN_ERR_UNSUPPORTED (over a limit), TERN_ERR_NOMEM; detail in err. */
tern_status tern_image_decode(const void *bytes, size_t len, const tern_image_limits *limits,
                              const tern_allocator *alloc, tern_image *out, tern_error *err);
/* Read a file (refusing one over the size limit before reading it) and decode it. Adds
 * TERN_ERR_IO. The path is named in err. */
tern_status tern_image_load(const char *path, const tern_image_limits *limits,
                            const tern_allocator *alloc, tern_image *out, tern_error *err);
/* Write an 8-bit PNG (for tests and tools), atomically. */
tern_status tern_image_save_png(const char *path, const tern_image *img, tern_error *err);
/* Free the pixel data and zero the struct. */
void tern_image_free(const tern_allocator *alloc, tern_image *img);

#ifdef __cplusplus
}
#endif

#endif
