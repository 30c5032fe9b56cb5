/* `tern quantize` and the pieces `tern eval` / `tern predict` use to run quantized files
 * (apps/tern_quant.c). Each prints its own errors. */
#ifndef TERN_APPS_TERN_QUANT_H
#define TERN_APPS_TERN_QUANT_H

#include "tern.h"

/* If path is a quantized model file (format "tern-int8"), load it for batches up to max_batch
 * into *q and its evaluation info into *info and return 0; return -1 (nothing loaded) for any
 * other file, 1 after printing an error. */
int tern_quant_open_model(const char *path, int max_batch, tern_qmodel **q,
                          tern_model_info *info);
/* 0 if q takes size x size images, else prints why not and returns 1. */
int tern_quant_check_size(const tern_qmodel *q, int size);

int tern_cmd_quantize(int argc, char **argv);

#endif
