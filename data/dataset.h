/* Internal dataset queries for the loader (not installed). */
#ifndef TERN_DATA_DATASET_H
#define TERN_DATA_DATASET_H

#include <stdbool.h>

#include "tern/data.h"

/* Whether a sample that fails to decode must fail the caller (tern_folder_options.strict)
 * rather than be skipped. Always false for IDX datasets, which cannot fail to decode. */
bool tern_dataset_strict(const tern_dataset *ds);

#endif
