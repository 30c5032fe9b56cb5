/* fashion_to_folder: writes Fashion-MNIST as an image folder (OUT/train/<class>/<n>.png and
 * OUT/val/<class>/<n>.png), the input `tern train --data DIR` and `tern add-class` take. Used
 * by bench/add_class_fashion.sh. Class names have '/' replaced by '-' ("T-shirt-top").
 *
 * usage: fashion_to_folder [--per-class N] DATASET_DIR OUT_DIR
 *   --per-class N   at most N training images per class (default: all); the test split is
 *                   written whole. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "tern.h"

static int make_dir(const char *path)
{
    if (mkdir(path, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "fashion_to_folder: cannot create %s: %s\n", path, strerror(errno));
        return 1;
    }
    return 0;
}

static int export_split(const char *dataset_dir, bool train, const char *out, long per_class)
{
    tern_error err = {{0}};
    tern_dataset *ds = NULL;
    if (tern_dataset_open_fashion_mnist(dataset_dir, train, NULL, &ds, &err) != TERN_OK) {
        fprintf(stderr, "fashion_to_folder: %s\n", err.message);
        return 1;
    }
    char dir[2048], path[4200];
    snprintf(dir, sizeof dir, "%s/%s", out, train ? "train" : "val");
    int rc = make_dir(dir);
    long written[10] = {0};
    char names[10][64];
    for (int k = 0; rc == 0 && k < 10; k++) {
        snprintf(names[k], sizeof names[k], "%s", tern_dataset_class_name(ds, k));
        for (char *p = names[k]; *p; p++)
            if (*p == '/')
                *p = '-';
        snprintf(path, sizeof path, "%s/%s", dir, names[k]);
        rc = make_dir(path);
    }
    for (size_t i = 0; rc == 0 && i < tern_dataset_size(ds); i++) {
        int k = tern_dataset_label(ds, i);
        if (per_class > 0 && written[k] >= per_class)
            continue;
        tern_image img = {0};
        snprintf(path, sizeof path, "%s/%s/%05zu.png", dir, names[k], i);
        if (tern_dataset_image(ds, i, NULL, &img, &err) != TERN_OK ||
            tern_image_save_png(path, &img, &err) != TERN_OK) {
            fprintf(stderr, "fashion_to_folder: %s\n", err.message);
            rc = 1;
        }
        tern_image_free(NULL, &img);
        written[k]++;
    }
    tern_dataset_close(&ds);
    return rc;
}

int main(int argc, char **argv)
{
    long per_class = 0;
    int i = 1;
    if (argc > 2 && strcmp(argv[1], "--per-class") == 0) {
        per_class = atol(argv[2]);
        i = 3;
    }
    if (argc - i != 2 || per_class < 0) {
        fprintf(stderr, "usage: fashion_to_folder [--per-class N] DATASET_DIR OUT_DIR\n");
        return 2;
    }
    if (make_dir(argv[i + 1]) || export_split(argv[i], true, argv[i + 1], per_class) ||
        export_split(argv[i], false, argv[i + 1], 0))
        return 1;
    return 0;
}
