#!/usr/bin/env bash
# Tern next to its peers, in one run on this machine: onnxruntime (npm onnxruntime-node, on
# torchvision's ONNX export) for inference and PyTorch (Debian python3-torch, both memory
# layouts) for inference and training, on the same shapes and thread counts as bench_model.
# Prints every measurement as JSON lines into $OUT (default bench-results.jsonl), then a table
# of ratios (bench/ratios.py).
#
# usage: bench/peers.sh [BUILD_DIR] [THREADS...]     (default: build, threads 1 2)
# Needs the peer scripts in ../shared/peers (the team's shared folder) and network access to
# Debian's and npm's registries on first use; not part of the test suite.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
shift || true
threads=("$@")
[ ${#threads[@]} -gt 0 ] || threads=(1 2)
peers=${TERN_PEERS:-$root/../shared/peers}
cache=${PEERS_CACHE:-/var/tmp/tern-peers}
out=${OUT:-bench-results.jsonl}
[ -x "$build/bench_model" ] || { echo "peers.sh: build first (scripts/build.sh)" >&2; exit 1; }
[ -d "$peers" ] || { echo "peers.sh: no peer scripts at $peers (set TERN_PEERS)" >&2; exit 1; }

if ! /usr/bin/python3 -c 'import torch, torchvision, onnx' 2>/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-torch python3-torchvision python3-onnx >/dev/null
fi
if [ ! -d "$cache/node_modules/onnxruntime-node" ]; then
  mkdir -p "$cache"
  (cd "$cache" && npm init -y >/dev/null && npm install --ignore-scripts --no-audit --no-fund onnxruntime-node@1.30.0 >/dev/null)
fi
[ -f "$cache/mnv3_small.onnx" ] || /usr/bin/python3 "$peers/export_onnx.py" "$cache" >/dev/null 2>&1

: > "$out"
for t in "${threads[@]}"; do
  echo "== threads $t: tern" >&2
  "$build/bench_model" --threads "$t" >> "$out"
  echo "== threads $t: onnxruntime" >&2
  for m in small large; do
    for b in 1 32; do
      ORT_NODE="$cache/node_modules/onnxruntime-node" node "$peers/ort_bench.js" "$cache/mnv3_$m.onnx" "$t" "$b" 224 >> "$out"
    done
  done
  echo "== threads $t: pytorch" >&2
  /usr/bin/python3 "$peers/torch_baseline.py" "$t" infer train 2>/dev/null >> "$out"
done
/usr/bin/python3 "$root/bench/ratios.py" "$out"
