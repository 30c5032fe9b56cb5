#!/usr/bin/env bash
# The incremental-class benchmark: MobileNetV3-Small learns 9 Fashion-MNIST classes from an
# image folder (3000 images each), then `tern add-class` adds the tenth ("Ankle boot") from
# 500 of its images plus a replay sample of 500 images per old class (a balanced set: with 200
# per old class against 3000 new ones, the new class took over look-alike classes and old-class
# accuracy fell 5.7 points). Prints the old classes' accuracy before and after (the aim: within
# 2 points) and the new class's accuracy, as JSON.
#
# usage: bench/add_class_fashion.sh [BUILD_DIR] [WORK_DIR]    (defaults: build, /tmp/tern-add-class)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
work=${2:-/tmp/tern-add-class}
data=${TERN_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
threads=${THREADS:-2}
mkdir -p "$work"
rm -rf "$work/old" "$work/add"
if [ ! -f "$work/all/.complete" ]; then
  echo "== exporting Fashion-MNIST to folders (3000 training images per class, all test images)" >&2
  rm -rf "$work/all"
  "$build/fashion_to_folder" --per-class 3000 "$data" "$work/all"
  touch "$work/all/.complete"
fi

new="Ankle boot"
for split in train val; do
  mkdir -p "$work/old/$split" "$work/add/$split"
  for dir in "$work/all/$split"/*/; do
    name=$(basename "$dir")
    [ "$name" = "$new" ] || ln -s "$dir" "$work/old/$split/$name"
    if [ "$split" = val ]; then
      ln -s "$dir" "$work/add/$split/$name"
    else
      mkdir -p "$work/add/train/$name"
      # sed, not head: head would stop reading and fail the pipeline under pipefail
      ls "$dir" | sed -n '1,500p' | while read -r f; do ln -s "$dir$f" "$work/add/train/$name/$f"; done
    fi
  done
done

echo "== training the 9-class model" >&2
start=$(date +%s)
"$build/tern" train --data "$work/old" --size 32 --epochs 15 --batch 128 --threads "$threads" \
  --no-progress --out "$work/old.safetensors" --metrics-json "$work/old.json" >&2
echo "== adding '$new'" >&2
"$build/tern" add-class --model "$work/old.safetensors" --data "$work/add" --class "$new" \
  --epochs 8 --batch 64 --threads "$threads" --out "$work/new.safetensors" \
  --metrics-json "$work/add.json"
end=$(date +%s)
/usr/bin/python3 - "$work/add.json" "$((end - start))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
b, a = r["old_class_accuracy_before"], r["old_class_accuracy_after"]
print(json.dumps({"bench": "add_class_fashion", "old_class_accuracy_before": b,
                  "old_class_accuracy_after": a, "drop_points": round(100 * (b - a), 2),
                  "new_class_accuracy": r["new_class_accuracy"], "accuracy": r["accuracy"],
                  "seconds": int(sys.argv[2])}))
PY
