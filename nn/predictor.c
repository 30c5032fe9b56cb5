/* tern_predictor: one inference handle over the two kinds of model file. A float file builds a
 * tern_model and plans it for the batch and size; a quantized file rebuilds its tern_qmodel.
 * Only public APIs underneath. */
#include <string.h>

#include "tern/quant.h"
#include "util.h"

struct tern_predictor {
    const tern_allocator *alloc;
    tern_model *model;   /* float file */
    tern_qmodel *qmodel; /* quantized file */
    tern_model_info info;
    int max_batch, classes, channels;
};

tern_status tern_predictor_open(const char *path, const tern_predictor_options *opt,
                                tern_predictor **out, tern_error *err)
{
    if (!path || !out)
        return tern_set_error(err, TERN_ERR_INVALID, "NULL argument");
    tern_predictor_options o = opt ? *opt : (tern_predictor_options){0};
    if (o.max_batch == 0)
        o.max_batch = 1;
    if (o.max_batch < 1 || o.max_batch > 65536 || (o.size != 0 && (o.size < 32 || o.size > 4096)))
        return tern_set_error(err, TERN_ERR_INVALID, "max_batch or size out of range");
    tern_safetensors *st = NULL;
    tern_status s = tern_safetensors_open(path, o.alloc, &st, err);
    if (s != TERN_OK)
        return s;
    tern_predictor *p = tern_calloc(o.alloc, 1, sizeof *p);
    if (!p) {
        tern_safetensors_close(&st);
        return tern_set_error(err, TERN_ERR_NOMEM, "out of memory");
    }
    p->alloc = o.alloc;
    p->max_batch = o.max_batch;
    if ((s = tern_model_info_read(st, &p->info, err)) != TERN_OK)
        goto fail;
    if (tern_qmodel_file_is_quantized(st)) {
        tern_qmodel_load_options lo = {.max_batch = o.max_batch, .alloc = o.alloc};
        if ((s = tern_qmodel_load(st, &lo, &p->qmodel, err)) != TERN_OK)
            goto fail;
        int h, w;
        tern_qmodel_shape(p->qmodel, &h, &w, &p->channels, &p->classes);
        if (o.size != 0 && (o.size != h || o.size != w)) {
            s = tern_set_error(err, TERN_ERR_INVALID,
                               "%s: quantized for %dx%d images, not %dx%d", path, h, w, o.size,
                               o.size);
            goto fail;
        }
        p->info.input_size = h;
    } else {
        tern_model_options mo = tern_model_options_default(TERN_ARCH_MOBILENET_V3_SMALL);
        mo.alloc = o.alloc;
        if ((s = tern_model_options_from_metadata(st, &mo, err)) != TERN_OK ||
            (s = tern_model_create(&mo, &p->model, err)) != TERN_OK ||
            (s = tern_model_load_state(p->model, st, "", err)) != TERN_OK)
            goto fail;
        int size = o.size ? o.size : p->info.input_size > 0 ? p->info.input_size : 224;
        if ((s = tern_model_plan(p->model, o.max_batch, size, size, false)) != TERN_OK) {
            tern_set_error(err, s, "%s", tern_model_last_error(p->model));
            goto fail;
        }
        p->info.input_size = size;
        p->channels = mo.in_channels;
        p->classes = mo.num_classes;
    }
    tern_safetensors_close(&st);
    *out = p;
    return TERN_OK;
fail:
    tern_safetensors_close(&st);
    tern_predictor_close(&p);
    return s;
}

void tern_predictor_close(tern_predictor **p)
{
    if (!p || !*p)
        return;
    tern_model_destroy(&(*p)->model);
    tern_qmodel_destroy(&(*p)->qmodel);
    tern_model_info_free(&(*p)->info);
    tern_free((*p)->alloc, *p);
    *p = NULL;
}

tern_status tern_predictor_forward(tern_predictor *p, float *logits, const float *input,
                                   int batch)
{
    if (!p || !logits || !input || batch < 1 || batch > p->max_batch)
        return TERN_ERR_INVALID;
    return p->qmodel ? tern_qmodel_forward(p->qmodel, logits, input, batch)
                     : tern_model_forward(p->model, logits, input, batch, false);
}

const tern_model_info *tern_predictor_info(const tern_predictor *p) { return &p->info; }
int tern_predictor_num_classes(const tern_predictor *p) { return p->classes; }
int tern_predictor_in_channels(const tern_predictor *p) { return p->channels; }
bool tern_predictor_is_quantized(const tern_predictor *p) { return p->qmodel != NULL; }
