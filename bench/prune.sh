#!/bin/sh
# Magnitude pruning on Fashion-MNIST: for each sparsity, tern prune (global scope, fine-tuning)
# on the shipped model, then tern quantize of the pruned file. Prints the commands' raw output.
#   bench/prune.sh BUILD_DIR OUT_DIR [EPOCHS] [SPARSITIES...]
set -e
build=$1; out=$2; epochs=${3:-1}
shift 3 2>/dev/null || shift $#
sparsities=${*:-0.5 0.7 0.9}
model=$(dirname "$0")/../weights/fashion-mnist-small.safetensors
mkdir -p "$out"
for s in $sparsities; do
    echo "### tern prune --sparsity $s --scope ${SCOPE:-global} --fine-tune-epochs $epochs"
    nice -n 10 "$build/tern" prune --model "$model" --sparsity "$s" --scope "${SCOPE:-global}" \
        --data fashion-mnist --fine-tune-epochs "$epochs" --threads 2 \
        --out "$out/pruned-$s.safetensors" 2>&1
    echo "### tern quantize (pruned $s)"
    nice -n 10 "$build/tern" quantize --model "$out/pruned-$s.safetensors" --calib-data fashion-mnist \
        --method percentile --fp32-layers 2 --eval-count 10000 --out "$out/pruned-$s-int8.safetensors" 2>&1 |
        grep -v '^ *[0-9]* *\(conv\|depthwise\|linear\|logits\|se_gate\|add\|avgpool\|conv1x1\)'
    ls -l "$out/pruned-$s.safetensors" "$out/pruned-$s-int8.safetensors"
done
