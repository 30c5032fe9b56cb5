/* Moving a tern_model's state in and out of safetensors files.
 *
 * Names, shapes and dtypes follow torchvision's state_dict (float tensors F32,
 * num_batches_tracked I64 scalars), so a torchvision MobileNetV3 saved as safetensors loads
 * unchanged and a Tern file loads into torchvision. Tern's files also carry metadata: arch,
 * width_mult, in_channels, num_classes, norm, format. */
#ifndef TERN_MODEL_IO_H
#define TERN_MODEL_IO_H

#include "tern/model.h"
#include "tern/safetensors.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Copy every state_dict entry from the tensors named prefix + name in st ("" for a plain
 * model file). Strict: each must exist with the right dtype and shape, and st may hold no
 * other tensor starting with prefix. Nothing is changed unless everything checks.
 * Errors (detail in err, naming the tensor and both shapes): TERN_ERR_NOT_FOUND (missing),
 * TERN_ERR_SHAPE (dtype or shape), TERN_ERR_FORMAT (unexpected extra tensor). */
tern_status tern_model_load_state(tern_model *model, const tern_safetensors *st,
                                  const char *prefix, tern_error *err);
/* Like tern_model_load_state with prefix "", except that tensors whose names start with
 * `keep_prefix` (e.g. "classifier.3." for a new classifier head, or "features.0.0." for a
 * different input channel count) keep their current values and may be missing from, or
 * differently shaped in, the file. Everything else is strict. */
tern_status tern_model_load_state_except(tern_model *model, const tern_safetensors *st,
                                         const char *const *keep_prefixes, int nkeep,
                                         tern_error *err);
/* Open path and load it with prefix "". */
tern_status tern_model_load_file(tern_model *model, const char *path, tern_error *err);
/* Add every state_dict entry to a writer, named prefix + name (data borrowed from the model:
 * write before changing it). */
tern_status tern_model_add_state(const tern_model *model, tern_safetensors_writer *w,
                                 const char *prefix);
/* Set the architecture metadata a Tern model file carries (format, arch, width_mult,
 * in_channels, num_classes, norm) on a writer, as tern_model_save_file does: with
 * tern_model_add_state, the writer then serializes to a model file that tern_model_load_file
 * and tern_model_options_from_metadata accept. TERN_ERR_INVALID, TERN_ERR_NOMEM. */
tern_status tern_model_add_metadata(const tern_model *model, tern_safetensors_writer *w);
/* What inference needs beyond the architecture, kept in a model file's metadata. */
typedef struct tern_model_info {
    int input_size;      /* height = width the model was trained at; 0 if unknown */
    int resize;          /* evaluation: shorter side resized to this, then center crop of
                          * input_size (zero-padded when smaller); 0 if unknown */
    float mean[3], std[3]; /* input normalization (per input channel; unused entries 0) */
    int nclasses;        /* entries in class_names: 0 or the model's num_classes */
    char **class_names;  /* owned by the struct when read by tern_model_info_read */
} tern_model_info;

/* Set info's metadata (input_size, resize, mean, std, class_names) on a writer, as
 * tern_model_save_file does. TERN_ERR_INVALID (names not UTF-8, mean/std not finite),
 * TERN_ERR_NOMEM. */
tern_status tern_model_add_info(tern_safetensors_writer *w, const tern_model_info *info);
/* Save the model's state with its metadata (and info, which may be NULL), atomically (see
 * tern_safetensors_writer_write). */
tern_status tern_model_save_file(const tern_model *model, const tern_model_info *info,
                                 const char *path, tern_error *err);
/* Read info from a file's metadata; fields a file lacks are left 0. Class names are copied
 * (free with tern_model_info_free). TERN_ERR_FORMAT for malformed values. */
tern_status tern_model_info_read(const tern_safetensors *st, tern_model_info *info,
                                 tern_error *err);
void tern_model_info_free(tern_model_info *info);
/* Fill arch, width_mult, in_channels, num_classes and norm from a file's metadata, leaving
 * the other fields of opt as they are. TERN_ERR_NOT_FOUND if the file has no "arch" key,
 * TERN_ERR_FORMAT if a value does not parse. */
tern_status tern_model_options_from_metadata(const tern_safetensors *st, tern_model_options *opt,
                                             tern_error *err);

#ifdef __cplusplus
}
#endif

#endif
