/* Datasets, transforms, batch loading and partitioning across clients.
 *
 * A tern_dataset is a list of labelled samples whose images are decoded on demand: Fashion-MNIST
 * (gzipped IDX files, read with zlib) or an image folder in torchvision's ImageFolder convention
 * (DIR/<class>/<image>, classes sorted by name). Transforms turn a decoded tern_image into the
 * float NHWC slot of a batch, as torchvision's training and evaluation pipelines do. A
 * tern_loader shuffles (seeded), batches and transforms on a background thread while the
 * caller trains on the previous batch. */
#ifndef TERN_DATA_H
#define TERN_DATA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tern/alloc.h"
#include "tern/image.h"
#include "tern/rng.h"
#include "tern/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- datasets ------------------------------------------------------------------------------ */

typedef struct tern_dataset tern_dataset;

/* Fashion-MNIST's ten class names, in label order ("T-shirt/top", "Trouser", ...). */
const char *tern_fashion_mnist_class(int label);

/* Open an IDX image file (10 classes named "0" to "9") (magic 0x00000803, uint8, N x rows x cols) and its IDX label file
 * (0x00000801, N labels), each gzipped or plain. Everything is read and checked at open: magic
 * numbers, dimensions, sizes against the data, counts that agree, labels < num_classes (10 for
 * Fashion-MNIST). Errors: TERN_ERR_IO, TERN_ERR_FORMAT (naming the file and the problem),
 * TERN_ERR_NOMEM. */
tern_status tern_dataset_open_idx(const char *images_path, const char *labels_path,
                                  const tern_allocator *alloc, tern_dataset **out,
                                  tern_error *err);
/* Fashion-MNIST from a directory holding {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
 * (Debian's dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist). */
tern_status tern_dataset_open_fashion_mnist(const char *dir, bool train,
                                            const tern_allocator *alloc, tern_dataset **out,
                                            tern_error *err);

typedef struct tern_folder_options {
    tern_image_limits limits;
    bool strict; /* fail on the first bad image instead of skipping it with a warning */
    /* Called once per skipped file with a message naming it (may be NULL). It is called from
     * whichever thread decodes (usually a loader's background thread): it must be thread-safe. */
    void (*warn)(void *user, const char *message);
    void *warn_user;
} tern_folder_options;

/* Scan DIR/<class>/<file> (files with .jpg/.jpeg/.png in any case; hidden files ignored),
 * classes sorted by name. Images are decoded when first used; a file that then fails to decode
 * is skipped with a warning (or fails the caller with TERN_ERR_FORMAT when strict).
 * Errors: TERN_ERR_IO (unreadable DIR), TERN_ERR_FORMAT (no classes or no images). */
tern_status tern_dataset_open_folder(const char *dir, const tern_folder_options *opt,
                                     const tern_allocator *alloc, tern_dataset **out,
                                     tern_error *err);
void tern_dataset_close(tern_dataset **ds);

size_t tern_dataset_size(const tern_dataset *ds);
int tern_dataset_num_classes(const tern_dataset *ds);
/* Class name (borrowed, valid until close). NULL if out of range. */
const char *tern_dataset_class_name(const tern_dataset *ds, int label);
int tern_dataset_label(const tern_dataset *ds, size_t index);
/* Where sample i comes from ("train-images-idx3-ubyte.gz#17", or the image's path). */
const char *tern_dataset_source(const tern_dataset *ds, size_t index, char *buf, size_t len);
/* Decode sample i into *img (allocated with alloc; free with tern_image_free). Safe to call
 * from several threads at once. Errors as tern_image_load. */
tern_status tern_dataset_image(const tern_dataset *ds, size_t index, const tern_allocator *alloc,
                               tern_image *img, tern_error *err);

/* ---- transforms ------------------------------------------------------------------------- */

typedef struct tern_transform {
    int size;     /* output height and width */
    int channels; /* output channels: 1 (RGB -> luminance) or 3 (grey -> replicated) */
    /* Evaluation geometry: resize the shorter side to `resize` (bilinear; 0: to `size`), then
     * center crop size x size. Training geometry replaces it when random_resized_crop is set. */
    int resize;
    bool random_resized_crop; /* torchvision RandomResizedCrop(size, scale, ratio), bilinear */
    float scale_min, scale_max; /* default 0.08, 1.0 when both 0 */
    float ratio_min, ratio_max; /* default 3/4, 4/3 when both 0 */
    int pad;            /* random crop size x size after zero padding by `pad` (RandomCrop) */
    bool hflip;         /* random horizontal flip with probability 1/2 */
    float rotate_deg;   /* random rotation in [-rotate_deg, rotate_deg], bilinear, zero fill */
    float brightness, contrast, saturation; /* colour jitter factors in [1-x, 1+x] */
    float mean[3], std[3]; /* normalization after scaling pixels to [0, 1] */
} tern_transform;

/* ImageNet statistics (mean 0.485, 0.456, 0.406; std 0.229, 0.224, 0.225) and Fashion-MNIST's
 * own (mean 0.2860, std 0.3530). */
void tern_transform_normalize_imagenet(tern_transform *t);
void tern_transform_normalize_fashion_mnist(tern_transform *t);

/* Apply t to img, writing out (size, size, channels) floats. Random choices come from rng
 * (not touched by a transform without random parts). TERN_ERR_INVALID for bad options. */
tern_status tern_transform_apply(const tern_transform *t, const tern_image *img, tern_rng *rng,
                                 float *out);

/* ---- loader ------------------------------------------------------------------------------- */

typedef struct tern_loader tern_loader;

typedef struct tern_loader_options {
    int batch;            /* >= 1 */
    bool shuffle;         /* a new seeded permutation every epoch */
    bool drop_last;       /* drop a final partial batch */
    uint64_t seed;        /* shuffling and random transforms */
    const size_t *indices; /* subset of the dataset to load (copied), or NULL for all */
    size_t nindices;
    const char *cache_dir; /* LMDB cache of decoded, resized images (NULL: none) */
    int cache_size;        /* shorter side images are resized to before caching */
} tern_loader_options;

/* A loader over ds (borrowed; must outlive the loader). Starts one background thread. */
tern_status tern_loader_create(const tern_dataset *ds, const tern_transform *t,
                               const tern_loader_options *opt, const tern_allocator *alloc,
                               tern_loader **out, tern_error *err);
void tern_loader_destroy(tern_loader **loader);
/* Batches per epoch. */
size_t tern_loader_batches(const tern_loader *loader);
/* The next batch: images (n, size, size, channels) and labels (n), borrowed until the next call.
 * At the end of an epoch returns TERN_ERR_NOT_FOUND once (n = 0) and starts the next epoch.
 * A sample that fails to decode is skipped (and counted) unless the dataset is strict. */
tern_status tern_loader_next(tern_loader *loader, const float **images, const int32_t **labels,
                             int *n, tern_error *err);
/* Samples skipped so far because they failed to decode. */
size_t tern_loader_skipped(const tern_loader *loader);
/* Epoch counter and the state needed to resume exactly (see checkpoints). */
uint64_t tern_loader_epoch(const tern_loader *loader);
void tern_loader_set_epoch(tern_loader *loader, uint64_t epoch);
/* Start again at epoch 0 with a new seed: the batches that follow are those of a loader created
 * with this seed (a federated client reseeds its loader every round). */
void tern_loader_set_seed(tern_loader *loader, uint64_t seed);

/* ---- partitioning across clients ---------------------------------------------------------- */

/* Assign each of n samples (labels[i] in [0, classes)) to one of `clients`: out[i] in
 * [0, clients). Seeded and reproducible.
 *   IID: a random permutation cut into near-equal parts.
 *   Dirichlet: per class, client shares drawn from Dirichlet(alpha) (label skew; small alpha =
 *     strong skew), as in the federated literature; every client gets at least one sample.
 *   Classes: each client holds k classes (assigned round-robin from a shuffled class list),
 *     each class's samples split evenly among the clients holding it.
 * TERN_ERR_INVALID for impossible requests (more clients than samples, k > classes, ...). */
tern_status tern_partition_iid(int *out, size_t n, int clients, uint64_t seed);
tern_status tern_partition_dirichlet(int *out, const int32_t *labels, size_t n, int classes,
                                     int clients, double alpha, uint64_t seed);
tern_status tern_partition_classes(int *out, const int32_t *labels, size_t n, int classes,
                                   int clients, int k, uint64_t seed);

#ifdef __cplusplus
}
#endif

#endif
