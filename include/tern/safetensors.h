/* safetensors files: read and write.
 *
 * Format: 8-byte little-endian header length L, L bytes of JSON header, then the data buffer.
 * The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
 * relative to the data buffer) and may hold "__metadata__", a map of strings to strings.
 * Tern reads every dtype listed in tern_dtype and validates the file completely before
 * anything is returned: sizes, offsets in range, no overlaps or holes, dtype/shape/byte-count
 * agreement, well-formed JSON, unique names. */
#ifndef TERN_SAFETENSORS_H
#define TERN_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "tern/alloc.h"
#include "tern/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum tern_dtype {
    TERN_DTYPE_F32,
    TERN_DTYPE_F64,
    TERN_DTYPE_F16,
    TERN_DTYPE_BF16,
    TERN_DTYPE_I8,
    TERN_DTYPE_U8,
    TERN_DTYPE_I16,
    TERN_DTYPE_I32,
    TERN_DTYPE_I64,
    TERN_DTYPE_BOOL,
} tern_dtype;

/* Bytes per element (BOOL: 1); 0 for a value outside the enum. */
size_t tern_dtype_size(tern_dtype dtype);
/* The safetensors spelling ("F32", "I64", ...; "?" outside the enum); static storage. */
const char *tern_dtype_name(tern_dtype dtype);

#define TERN_MAX_DIMS 8

/* A tensor inside an open file. All pointers borrow from the tern_safetensors handle and stay
 * valid until it is closed. `data` may not be aligned for its dtype: copy with memcpy. */
typedef struct tern_tensor_view {
    const char *name;
    tern_dtype dtype;
    int ndim; /* 0 for a scalar */
    int64_t shape[TERN_MAX_DIMS];
    const void *data;
    size_t nbytes;
} tern_tensor_view;

typedef struct tern_safetensors tern_safetensors;

/* Read and validate a whole file. On failure *out is untouched and err (if not NULL) says what
 * is wrong with which tensor. Errors: TERN_ERR_IO (cannot open/read), TERN_ERR_FORMAT
 * (malformed), TERN_ERR_NOMEM, TERN_ERR_INVALID (NULL arguments). */
tern_status tern_safetensors_open(const char *path, const tern_allocator *alloc,
                                  tern_safetensors **out, tern_error *err);
/* Same, from a memory buffer, which is copied (the caller keeps ownership of bytes). */
tern_status tern_safetensors_parse(const void *bytes, size_t len, const tern_allocator *alloc,
                                   tern_safetensors **out, tern_error *err);
/* Free everything; *st becomes NULL. Accepts NULL. */
void tern_safetensors_close(tern_safetensors **st);

/* Number of tensors (not counting __metadata__). */
size_t tern_safetensors_count(const tern_safetensors *st);
/* Tensor by position, in order of data offset. TERN_ERR_INVALID if index is out of range. */
tern_status tern_safetensors_get(const tern_safetensors *st, size_t index, tern_tensor_view *out);
/* Tensor by name; TERN_ERR_NOT_FOUND if absent. */
tern_status tern_safetensors_find(const tern_safetensors *st, const char *name,
                                  tern_tensor_view *out);
/* Metadata value for key, or NULL. Borrowed, valid until close. */
const char *tern_safetensors_metadata(const tern_safetensors *st, const char *key);
size_t tern_safetensors_metadata_count(const tern_safetensors *st);
/* i-th metadata pair (sorted by key); TERN_ERR_INVALID if out of range. */
tern_status tern_safetensors_metadata_at(const tern_safetensors *st, size_t index,
                                         const char **key, const char **value);

/* Writer: collect tensors and metadata, then write once. */
typedef struct tern_safetensors_writer tern_safetensors_writer;

tern_status tern_safetensors_writer_create(const tern_allocator *alloc,
                                           tern_safetensors_writer **out);
void tern_safetensors_writer_destroy(tern_safetensors_writer **w);
/* Add a tensor. name and shape are copied; data is BORROWED and must stay valid until the
 * write/serialize call. TERN_ERR_INVALID for a duplicate, empty, non-UTF-8 or "__metadata__"
 * name, ndim outside [0, TERN_MAX_DIMS], negative dimensions, or a byte count that overflows;
 * TERN_ERR_NOMEM. */
tern_status tern_safetensors_writer_add(tern_safetensors_writer *w, const char *name,
                                        tern_dtype dtype, int ndim, const int64_t *shape,
                                        const void *data);
/* Set (or replace) a metadata string; both copied. TERN_ERR_INVALID, TERN_ERR_NOMEM. */
tern_status tern_safetensors_writer_set_metadata(tern_safetensors_writer *w, const char *key,
                                                 const char *value);
/* Write atomically: a temporary file in the same directory, fsync, rename over path. On any
 * failure the previous file at path is left as it was. TERN_ERR_IO with detail in err. */
tern_status tern_safetensors_writer_write(const tern_safetensors_writer *w, const char *path,
                                          tern_error *err);
/* Serialize to a new buffer allocated with the writer's allocator: release it with that
 * allocator's free (or free() when the writer was created with a NULL allocator). */
tern_status tern_safetensors_writer_serialize(const tern_safetensors_writer *w, void **bytes,
                                              size_t *len);

#ifdef __cplusplus
}
#endif

#endif
