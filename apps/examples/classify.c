/* Embedding Tern: classify one image with a trained model through the C API.
 *
 *   classify MODEL.safetensors IMAGE
 *
 * prints "<class name> <probability>" for the most likely class. Everything a program needs is
 * here: open the model file (float, or quantized by `tern quantize`: the predictor runs either),
 * read what its metadata says about the input (size, normalization, class names), decode and
 * transform the image, run it. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <tern.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL.safetensors IMAGE\n", argv[0]);
        return 2;
    }
    tern_error err = {{0}};
    tern_predictor *model = NULL;
    tern_image image = {0};
    float *input = NULL, *logits = NULL;
    int rc = 1;

    /* 1. The model, with the input size and normalization its file records. */
    if (tern_predictor_open(argv[1], NULL, &model, &err) != TERN_OK) {
        fprintf(stderr, "%s: %s\n", argv[1], err.message);
        goto done;
    }
    const tern_model_info *info = tern_predictor_info(model);
    const int classes = tern_predictor_num_classes(model);
    const int channels = tern_predictor_in_channels(model);

    /* 2. The input: decoded, resized and center-cropped as in evaluation, normalized as the
     * model was trained. */
    int size = info->input_size;
    tern_transform t = {.size = size, .channels = channels,
                        .resize = info->resize > 0 ? info->resize : size * 256 / 224};
    for (int c = 0; c < 3; c++) {
        t.mean[c] = info->mean[c];
        t.std[c] = info->std[c] != 0 ? info->std[c] : 1;
    }
    input = malloc(sizeof(float) * (size_t)size * (size_t)size * (size_t)channels);
    logits = malloc(sizeof(float) * (size_t)classes);
    if (!input || !logits) {
        fprintf(stderr, "out of memory\n");
        goto done;
    }
    if (tern_image_load(argv[2], NULL, NULL, &image, &err) != TERN_OK) {
        fprintf(stderr, "%s\n", err.message);
        goto done;
    }
    if (tern_transform_apply(&t, &image, NULL, input) != TERN_OK) {
        fprintf(stderr, "%s: cannot transform the image\n", argv[2]);
        goto done;
    }

    /* 3. Inference on one image, then the softmax's best class. */
    if (tern_predictor_forward(model, logits, input, 1) != TERN_OK) {
        fprintf(stderr, "inference failed\n");
        goto done;
    }
    int best = 0;
    for (int k = 1; k < classes; k++)
        if (logits[k] > logits[best])
            best = k;
    double sum = 0;
    for (int k = 0; k < classes; k++)
        sum += exp((double)logits[k] - logits[best]);
    if (best < info->nclasses)
        printf("%s %.4f\n", info->class_names[best], 1.0 / sum);
    else
        printf("class_%d %.4f\n", best, 1.0 / sum);
    rc = 0;
done:
    free(input);
    free(logits);
    tern_image_free(NULL, &image);
    tern_predictor_close(&model);
    return rc;
}
