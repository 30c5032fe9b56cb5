/* Magnitude pruning (tern/prune.h): prunable layers found from the model's graph, masks kept
 * per weight, exact top-k selection by a two-pass radix select over the magnitudes' bits; and
 * the compressed tensor encoding of pruned model files (bitmap + byte-planed non-zero values,
 * raw or deflated). */
#include "tern/prune.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>

#include "model_graph.h"
#include "util.h"

typedef struct layer {
    const tern_model_tensor *t;
    const char *kind;
    uint8_t *mask; /* (count): 1 = pruned; points into the pruner's mask block */
    float threshold;
} layer;

struct tern_pruner {
    tern_model *model;
    const tern_allocator *alloc;
    tern_prune_options opt;
    layer *layers;
    size_t nlayers, total;
    uint8_t *masks; /* (total) */
};

const char *tern_prune_scope_name(tern_prune_scope scope)
{
    return scope == TERN_PRUNE_GLOBAL ? "global" : scope == TERN_PRUNE_LAYER ? "layer" : "?";
}

tern_status tern_prune_scope_parse(const char *name, tern_prune_scope *out)
{
    if (name && strcmp(name, "global") == 0)
        *out = TERN_PRUNE_GLOBAL;
    else if (name && strcmp(name, "layer") == 0)
        *out = TERN_PRUNE_LAYER;
    else
        return TERN_ERR_INVALID;
    return TERN_OK;
}

/* The kind of layer whose weight is named `name`, or NULL if it is not prunable under opt. */
static const char *prunable_kind(const tern_model *model, const tern_prune_options *opt,
                                 const char *name)
{
    int nops = tern_model_graph_op_count(model), first_conv = -1, last_linear = -1;
    for (int i = 0; i < nops; i++) {
        tern_graph_op op;
        tern_model_graph_op_at(model, i, &op);
        if (op.kind == TERN_GRAPH_CONV && first_conv < 0)
            first_conv = i;
        if (op.kind == TERN_GRAPH_LINEAR)
            last_linear = i;
    }
    for (int i = 0; i < nops; i++) {
        tern_graph_op op;
        tern_model_graph_op_at(model, i, &op);
        if ((op.kind != TERN_GRAPH_CONV && op.kind != TERN_GRAPH_LINEAR) || !op.name ||
            strcmp(op.name, name) != 0)
            continue;
        if (op.kind == TERN_GRAPH_LINEAR)
            return i == last_linear && !opt->include_classifier ? NULL : "linear";
        if (i == first_conv)
            return opt->include_stem ? "conv" : NULL;
        if (op.conv.groups > 1)
            return opt->include_depthwise ? "depthwise" : NULL;
        return op.conv.k == 1 ? "conv1x1" : "conv";
    }
    return NULL;
}

tern_status tern_pruner_create(tern_model *model, const tern_prune_options *opt,
                               tern_pruner **out, tern_error *err)
{
    if (!model || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    tern_prune_options o = opt ? *opt : (tern_prune_options){0};
    if (o.scope != TERN_PRUNE_GLOBAL && o.scope != TERN_PRUNE_LAYER)
        return tern_set_error(err, TERN_ERR_INVALID, "unknown pruning scope %d", (int)o.scope);
    const tern_allocator *alloc = tern_model_options_of(model)->alloc;
    size_t n = tern_model_tensor_count(model);
    tern_pruner *p = tern_calloc(alloc, 1, sizeof *p);
    if (!p || !(p->layers = tern_calloc(alloc, n ? n : 1, sizeof *p->layers))) {
        tern_free(alloc, p);
        return tern_set_error(err, TERN_ERR_NOMEM, "out of memory");
    }
    p->model = model;
    p->alloc = alloc;
    p->opt = o;
    for (size_t i = 0; i < n; i++) {
        const tern_model_tensor *t = tern_model_tensor_at(model, i);
        const char *kind = t->kind == TERN_TENSOR_PARAM && t->ndim >= 2
                               ? prunable_kind(model, &o, t->name) : NULL;
        if (!kind)
            continue;
        p->layers[p->nlayers++] = (layer){.t = t, .kind = kind};
        p->total += t->count;
    }
    if (p->nlayers == 0) {
        tern_pruner_destroy(&p);
        return tern_set_error(err, TERN_ERR_NOT_FOUND, "the model has no prunable weight");
    }
    if (!(p->masks = tern_calloc(alloc, p->total, 1))) {
        tern_pruner_destroy(&p);
        return tern_set_error(err, TERN_ERR_NOMEM, "out of memory");
    }
    size_t off = 0;
    for (size_t l = 0; l < p->nlayers; l++) {
        p->layers[l].mask = p->masks + off;
        off += p->layers[l].t->count;
    }
    *out = p;
    return TERN_OK;
}

void tern_pruner_destroy(tern_pruner **p)
{
    if (!p || !*p)
        return;
    tern_free((*p)->alloc, (*p)->masks);
    tern_free((*p)->alloc, (*p)->layers);
    tern_free((*p)->alloc, *p);
    *p = NULL;
}

/* Sort key of a weight: masked weights first (0), then by magnitude (its bits order like the
 * value for non-negative floats). */
static uint32_t weight_key(float w, uint8_t masked)
{
    uint32_t u;
    memcpy(&u, &w, sizeof u);
    return masked ? 0 : (u & 0x7fffffffu) + 1;
}

/* The k-th smallest (1 <= k <= n) of keys: radix select on the high, then the low 16 bits.
 * hist holds 65536 counts. */
static uint32_t select_key(const uint32_t *keys, size_t n, size_t k, size_t *hist)
{
    memset(hist, 0, 65536 * sizeof *hist);
    for (size_t i = 0; i < n; i++)
        hist[keys[i] >> 16]++;
    uint32_t hi = 0;
    while (hist[hi] < k)
        k -= hist[hi++];
    memset(hist, 0, 65536 * sizeof *hist);
    for (size_t i = 0; i < n; i++)
        if (keys[i] >> 16 == hi)
            hist[keys[i] & 0xffff]++;
    uint32_t lo = 0;
    while (hist[lo] < k)
        k -= hist[lo++];
    return hi << 16 | lo;
}

/* Mask the k smallest keys of layers [first, last): those below the k-th smallest key, then
 * ties in order. keys holds the layers' keys back to back. */
static void mask_smallest(tern_pruner *p, size_t first, size_t last, const uint32_t *keys,
                          size_t n, size_t k, size_t *hist)
{
    if (k == 0)
        return;
    uint32_t t = select_key(keys, n, k, hist);
    size_t below = 0;
    for (size_t i = 0; i < n; i++)
        below += keys[i] < t;
    size_t ties = k - below, j = 0;
    for (size_t l = first; l < last; l++) {
        layer *L = &p->layers[l];
        for (size_t i = 0; i < L->t->count; i++, j++) {
            bool prune = keys[j] < t || (keys[j] == t && ties > 0 && ties--);
            if (!prune)
                continue;
            float a = fabsf(L->t->data[i]);
            if (!L->mask[i] && a > L->threshold)
                L->threshold = a;
            L->mask[i] = 1;
        }
    }
}

tern_status tern_pruner_prune(tern_pruner *p, double sparsity)
{
    if (!p || !(sparsity >= 0 && sparsity <= 1))
        return TERN_ERR_INVALID;
    bool global = p->opt.scope == TERN_PRUNE_GLOBAL;
    size_t cap = 0;
    for (size_t l = 0; l < p->nlayers; l++)
        cap = p->layers[l].t->count > cap ? p->layers[l].t->count : cap;
    uint32_t *keys = tern_alloc(p->alloc, (global ? p->total : cap) * sizeof *keys);
    size_t *hist = tern_alloc(p->alloc, 65536 * sizeof *hist);
    if (!keys || !hist) {
        tern_free(p->alloc, keys);
        tern_free(p->alloc, hist);
        return TERN_ERR_NOMEM;
    }
    for (size_t l = 0; l < p->nlayers; l++)
        p->layers[l].threshold = 0;
    size_t j = 0;
    for (size_t l = 0; l < p->nlayers; l++) {
        const layer *L = &p->layers[l];
        if (!global)
            j = 0;
        for (size_t i = 0; i < L->t->count; i++)
            keys[j++] = weight_key(L->t->data[i], L->mask[i]);
        if (!global)
            mask_smallest(p, l, l + 1, keys, j, (size_t)llround(sparsity * (double)j), hist);
    }
    if (global)
        mask_smallest(p, 0, p->nlayers, keys, j, (size_t)llround(sparsity * (double)j), hist);
    tern_free(p->alloc, keys);
    tern_free(p->alloc, hist);
    tern_pruner_apply(p);
    return TERN_OK;
}

size_t tern_pruner_mask_zeros(tern_pruner *p)
{
    size_t masked = 0;
    for (size_t l = 0; p && l < p->nlayers; l++) {
        layer *L = &p->layers[l];
        for (size_t i = 0; i < L->t->count; i++) {
            L->mask[i] |= L->t->data[i] == 0.0f;
            masked += L->mask[i];
        }
    }
    return masked;
}

void tern_pruner_mask_grads(tern_pruner *p)
{
    for (size_t l = 0; p && l < p->nlayers; l++) {
        const layer *L = &p->layers[l];
        for (size_t i = 0; i < L->t->count; i++)
            if (L->mask[i])
                L->t->grad[i] = 0.0f;
    }
}

void tern_pruner_apply(tern_pruner *p)
{
    if (!p)
        return;
    for (size_t l = 0; l < p->nlayers; l++) {
        const layer *L = &p->layers[l];
        for (size_t i = 0; i < L->t->count; i++)
            if (L->mask[i])
                L->t->data[i] = 0.0f;
    }
    tern_model_invalidate(p->model);
}

size_t tern_pruner_layer_count(const tern_pruner *p)
{
    return p ? p->nlayers : 0;
}

static size_t count_zeros(const float *x, size_t n)
{
    size_t z = 0;
    for (size_t i = 0; i < n; i++)
        z += x[i] == 0.0f;
    return z;
}

tern_status tern_pruner_layer_at(const tern_pruner *p, size_t i, tern_prune_layer *out)
{
    if (!p || !out || i >= p->nlayers)
        return TERN_ERR_INVALID;
    const layer *L = &p->layers[i];
    size_t masked = 0;
    for (size_t j = 0; j < L->t->count; j++)
        masked += L->mask[j];
    *out = (tern_prune_layer){.name = L->t->name, .kind = L->kind, .count = L->t->count,
                              .masked = masked, .zeros = count_zeros(L->t->data, L->t->count),
                              .threshold = L->threshold};
    return TERN_OK;
}

void tern_pruner_totals(const tern_pruner *p, size_t *prunable, size_t *masked, size_t *zeros,
                        size_t *params, size_t *param_zeros)
{
    size_t m = 0, z = 0;
    for (size_t l = 0; l < p->nlayers; l++) {
        tern_prune_layer info;
        tern_pruner_layer_at(p, l, &info);
        m += info.masked;
        z += info.zeros;
    }
    if (prunable)
        *prunable = p->total;
    if (masked)
        *masked = m;
    if (zeros)
        *zeros = z;
    if (params)
        *params = tern_model_param_count(p->model);
    if (param_zeros)
        *param_zeros = count_zeros(tern_model_params(p->model), tern_model_param_count(p->model));
}

double tern_prune_polynomial(double initial, double final, long step, long begin, long end)
{
    if (end <= begin)
        return step >= end ? final : initial;
    double t = (double)(step - begin) / (double)(end - begin);
    t = t < 0 ? 0 : t > 1 ? 1 : t;
    double r = 1 - t;
    return final + (initial - final) * r * r * r;
}

/* ---- compressed tensors ------------------------------------------------------------------- */

#define SPARSE_MAGIC "TSPR"
#define SPARSE_VERSION 1
enum { ENC_RAW = 0, ENC_DEFLATE = 1 };

static size_t header_size(int ndim)
{
    return 8 + 8 * (size_t)ndim + 8 + 8 + 4;
}

/* Header integers are little-endian, as the host is (x86-64, AArch64): plain copies. */
static void put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint64_t get_u64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static void write_header(uint8_t *h, int enc, int ndim, const int64_t *shape, uint64_t nnz,
                         uint64_t payload, uint32_t crc)
{
    memcpy(h, SPARSE_MAGIC, 4);
    h[4] = SPARSE_VERSION;
    h[5] = (uint8_t)enc;
    h[6] = (uint8_t)ndim;
    h[7] = 0;
    for (int d = 0; d < ndim; d++)
        put_u64(h + 8 + 8 * d, (uint64_t)shape[d]);
    uint8_t *q = h + 8 + 8 * ndim;
    put_u64(q, nnz);
    put_u64(q + 8, payload);
    for (int i = 0; i < 4; i++)
        q[16 + i] = (uint8_t)(crc >> (8 * i));
}

tern_status tern_sparse_encode(const float *x, int ndim, const int64_t *shape, uint8_t **out,
                               size_t *len)
{
    if (!x || !shape || !out || !len || ndim < 0 || ndim > TERN_MAX_DIMS)
        return TERN_ERR_INVALID;
    size_t count = 1;
    for (int d = 0; d < ndim; d++)
        if (shape[d] < 0 || !tern_mul_size(count, (size_t)shape[d], &count))
            return TERN_ERR_INVALID;
    size_t nnz = 0;
    for (size_t i = 0; i < count; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        nnz += u != 0;
    }
    size_t bitmap = count / 8 + (count % 8 != 0), payload, hdr = header_size(ndim);
    if (!tern_mul_size(nnz, 4, &payload) || !tern_add_size(payload, bitmap, &payload))
        return TERN_ERR_INVALID;
    uint8_t *raw = calloc(1, hdr + payload);
    if (!raw)
        return TERN_ERR_NOMEM;
    uint8_t *bits = raw + hdr, *planes = bits + bitmap;
    for (size_t i = 0, j = 0; i < count; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        if (!u)
            continue;
        bits[i / 8] |= (uint8_t)(1u << (i % 8));
        for (int b = 0; b < 4; b++)
            planes[(size_t)b * nnz + j] = (uint8_t)(u >> (8 * b));
        j++;
    }
    uint32_t crc = (uint32_t)crc32_z(0L, bits, payload);
    write_header(raw, ENC_RAW, ndim, shape, nnz, payload, crc);
    uLongf zlen = compressBound((uLong)payload);
    uint8_t *z = malloc(hdr + zlen);
    if (z && compress2(z + hdr, &zlen, bits, (uLong)payload, Z_BEST_COMPRESSION) == Z_OK &&
        hdr + zlen < hdr + payload) {
        write_header(z, ENC_DEFLATE, ndim, shape, nnz, payload, crc);
        free(raw);
        *out = z;
        *len = hdr + zlen;
        return TERN_OK;
    }
    free(z); /* deflate did not help (or had no memory): raw is as good a result */
    *out = raw;
    *len = hdr + payload;
    return TERN_OK;
}

bool tern_sparse_file_is_compressed(const tern_safetensors *st)
{
    const char *c = st ? tern_safetensors_metadata(st, "compression") : NULL;
    return c && strcmp(c, TERN_SPARSE_COMPRESSION) == 0;
}

tern_status tern_sparse_decode(const tern_tensor_view *v, int ndim, const int64_t *shape,
                               float *out, tern_error *err)
{
    if (!v || !out || (ndim > 0 && !shape) || ndim < 0 || ndim > TERN_MAX_DIMS)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    const uint8_t *h = v->data;
    size_t hdr = header_size(ndim);
    if (v->dtype != TERN_DTYPE_U8 || v->nbytes < 8 || memcmp(h, SPARSE_MAGIC, 4) != 0)
        return tern_set_error(err, TERN_ERR_FORMAT,
                              "tensor '%s': not a compressed tensor (bad magic)", v->name);
    if (h[4] != SPARSE_VERSION || h[5] > ENC_DEFLATE || h[7] != 0)
        return tern_set_error(err, TERN_ERR_FORMAT,
                              "tensor '%s': unsupported compressed tensor version %u, encoding %u",
                              v->name, h[4], h[5]);
    if (h[6] != ndim)
        return tern_set_error(err, TERN_ERR_SHAPE, "tensor '%s': expected %d dimensions, file has %u",
                              v->name, ndim, h[6]);
    if (v->nbytes < hdr)
        return tern_set_error(err, TERN_ERR_FORMAT, "tensor '%s': compressed header truncated",
                              v->name);
    size_t count = 1;
    for (int d = 0; d < ndim; d++) {
        uint64_t dim = get_u64(h + 8 + 8 * d);
        if (dim != (uint64_t)shape[d])
            return tern_set_error(err, TERN_ERR_SHAPE,
                                  "tensor '%s': dimension %d is %llu in the file, expected %lld",
                                  v->name, d, (unsigned long long)dim, (long long)shape[d]);
        count *= (size_t)shape[d]; /* the caller's shape: its product fits */
    }
    const uint8_t *q = h + 8 + 8 * ndim;
    uint64_t nnz = get_u64(q), payload = get_u64(q + 8);
    uint32_t crc = (uint32_t)q[16] | (uint32_t)q[17] << 8 | (uint32_t)q[18] << 16 |
                   (uint32_t)q[19] << 24;
    size_t bitmap = count / 8 + (count % 8 != 0);
    if (nnz > count || payload != bitmap + 4 * nnz)
        return tern_set_error(err, TERN_ERR_FORMAT,
                              "tensor '%s': corrupt compressed header (%llu non-zeros, %llu "
                              "payload bytes for %zu elements)",
                              v->name, (unsigned long long)nnz, (unsigned long long)payload, count);
    const uint8_t *bits = h + hdr;
    uint8_t *inflated = NULL;
    if (h[5] == ENC_RAW) {
        if (v->nbytes - hdr != payload)
            return tern_set_error(err, TERN_ERR_FORMAT,
                                  "tensor '%s': compressed payload is %zu bytes, header says %llu",
                                  v->name, v->nbytes - hdr, (unsigned long long)payload);
    } else {
        if (!(inflated = malloc(payload ? payload : 1)))
            return tern_set_error(err, TERN_ERR_NOMEM, "out of memory");
        uLongf got = (uLongf)payload;
        uLong used = (uLong)(v->nbytes - hdr);
        int z = uncompress2(inflated, &got, bits, &used);
        if (z != Z_OK || got != payload || used != v->nbytes - hdr) {
            free(inflated);
            return tern_set_error(err, TERN_ERR_FORMAT,
                                  "tensor '%s': corrupt or truncated deflate stream (%s)", v->name,
                                  z == Z_OK ? "wrong length" : z == Z_MEM_ERROR ? "out of memory"
                                                                                : "bad data");
        }
        bits = inflated;
    }
    tern_status s = TERN_OK;
    size_t ones = 0;
    for (size_t i = 0; i < bitmap; i++)
        ones += (size_t)__builtin_popcount(bits[i]);
    if ((uint32_t)crc32_z(0L, bits, payload) != crc) {
        s = tern_set_error(err, TERN_ERR_FORMAT, "tensor '%s': checksum mismatch (corrupt file)",
                           v->name);
    } else if (ones != nnz || (count % 8 && bits[bitmap - 1] >> (count % 8))) {
        s = tern_set_error(err, TERN_ERR_FORMAT,
                           "tensor '%s': bitmap has %zu set bits for %llu non-zeros", v->name,
                           ones, (unsigned long long)nnz);
    } else {
        const uint8_t *planes = bits + bitmap;
        for (size_t i = 0, j = 0; i < count; i++) {
            uint32_t u = 0;
            if (bits[i / 8] >> (i % 8) & 1) {
                for (int b = 0; b < 4; b++)
                    u |= (uint32_t)planes[(size_t)b * nnz + j] << (8 * b);
                j++;
            }
            memcpy(&out[i], &u, 4);
        }
    }
    free(inflated);
    return s;
}

tern_status tern_prune_save_file(const tern_model *model, const tern_model_info *info,
                                 const char *path, tern_error *err)
{
    if (!model || !path)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    const tern_model_options *o = tern_model_options_of(model);
    size_t n = tern_model_tensor_count(model);
    tern_safetensors_writer *w = NULL;
    uint8_t **blobs = calloc(n ? n : 1, sizeof *blobs);
    tern_status s = blobs ? tern_safetensors_writer_create(o->alloc, &w) : TERN_ERR_NOMEM;
    if (s != TERN_OK) {
        free(blobs);
        return tern_set_error(err, s, "%s: %s", path, tern_strerror(s));
    }
    if (info && info->nclasses > 0 && info->nclasses != o->num_classes) {
        s = tern_set_error(err, TERN_ERR_INVALID, "%s: %d class names for a %d-class model", path,
                           info->nclasses, o->num_classes);
        goto done;
    }
    if ((info && (s = tern_model_add_info(w, info)) != TERN_OK) ||
        (s = tern_model_add_metadata(model, w)) != TERN_OK ||
        (s = tern_safetensors_writer_set_metadata(w, "compression", TERN_SPARSE_COMPRESSION)) !=
            TERN_OK) {
        tern_set_error(err, s, "%s: %s", path, tern_strerror(s));
        goto done;
    }
    for (size_t i = 0; i < n && s == TERN_OK; i++) {
        const tern_model_tensor *t = tern_model_tensor_at(model, i);
        if (t->kind == TERN_TENSOR_COUNTER) {
            s = tern_safetensors_writer_add(w, t->name, TERN_DTYPE_I64, 0, t->shape, t->counter);
            continue;
        }
        size_t len;
        if ((s = tern_sparse_encode(t->data, t->ndim, t->shape, &blobs[i], &len)) != TERN_OK)
            break;
        if (len < t->count * sizeof(float)) {
            int64_t shape = (int64_t)len;
            s = tern_safetensors_writer_add(w, t->name, TERN_DTYPE_U8, 1, &shape, blobs[i]);
        } else {
            s = tern_safetensors_writer_add(w, t->name, TERN_DTYPE_F32, t->ndim, t->shape, t->data);
        }
    }
    if (s != TERN_OK) {
        tern_set_error(err, s, "%s: %s", path, tern_strerror(s));
        goto done;
    }
    s = tern_safetensors_writer_write(w, path, err);
done:
    tern_safetensors_writer_destroy(&w);
    for (size_t i = 0; i < n; i++)
        free(blobs[i]);
    free(blobs);
    return s;
}
