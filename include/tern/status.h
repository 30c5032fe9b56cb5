/* Status codes shared by every Tern module.
 *
 * Every fallible function returns a tern_status: TERN_OK (0) on success, a negative code on
 * failure. tern_strerror() gives a fixed English description of a code; the detail of a
 * particular failure (which tensor, which byte) comes from the handle or tern_error involved. */
#ifndef TERN_STATUS_H
#define TERN_STATUS_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum tern_status {
    TERN_OK = 0,
    TERN_ERR_NOMEM = -1,       /* an allocation failed */
    TERN_ERR_INVALID = -2,     /* an argument is out of range or inconsistent */
    TERN_ERR_IO = -3,          /* a read, write, open or rename failed */
    TERN_ERR_FORMAT = -4,      /* a file or message is malformed */
    TERN_ERR_SHAPE = -5,       /* a tensor has the wrong shape or dtype */
    TERN_ERR_NOT_FOUND = -6,   /* a named item does not exist */
    TERN_ERR_UNSUPPORTED = -7, /* valid, but not something Tern implements */
    TERN_ERR_STATE = -8,       /* a call made in the wrong order (e.g. forward before plan) */
    TERN_ERR_THREAD = -9,      /* a worker thread could not be started */
    TERN_ERR_EXISTS = -10,     /* a record with that name, index or content already exists */
} tern_status;

/* Fixed description of a status code; never NULL, static storage. */
const char *tern_strerror(tern_status status);

/* A caller-owned buffer receiving a human-readable explanation of a failure, for functions that
 * fail before a handle exists (opening a file, say). Pass NULL when the detail is not wanted. */
typedef struct tern_error {
    char message[512];
} tern_error;

#ifdef __cplusplus
}
#endif

#endif
