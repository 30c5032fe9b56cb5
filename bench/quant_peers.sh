#!/usr/bin/env bash
# INT8 latency next to Tern's fp32 and onnxruntime's fp32, interleaved in one run: each round
# times onnxruntime (npm onnxruntime-node, torchvision's ONNX export, as bench/peers.sh sets
# up) on MobileNetV3-Small and -Large at batch 1, 224x224, 1 thread, then bench_quant's
# latency (Tern fp32 and int8, themselves interleaved). Prints every measurement as a JSON line
# and then the medians over the rounds with the ratios int8 / fp32 and int8 / onnxruntime.
#
# usage: bench/quant_peers.sh [BUILD_DIR] [ROUNDS] [REQUANT]   (default: build, 5 rounds, float)
# REQUANT: float, fixed, or both (bench_quant --requant: both times a fixed-mode qmodel too,
# interleaved with the float one, and the summary adds its median and fixed / float).
# Needs bench/peers.sh's cache (/var/tmp/tern-peers, or $PEERS_CACHE) and the peer scripts in
# ../shared/peers ($TERN_PEERS).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
rounds=${2:-5}
requant=${3:-float}
peers=${TERN_PEERS:-$root/../shared/peers}
cache=${PEERS_CACHE:-/var/tmp/tern-peers}
[ -x "$build/bench_quant" ] || { echo "quant_peers.sh: build bench_quant first" >&2; exit 1; }
[ -f "$cache/mnv3_small.onnx" ] || { echo "quant_peers.sh: run bench/peers.sh once first" >&2; exit 1; }
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for r in $(seq "$rounds"); do
  for m in small large; do
    ORT_NODE="$cache/node_modules/onnxruntime-node" node "$peers/ort_bench.js" "$cache/mnv3_$m.onnx" 1 1 224 | tee -a "$out"
  done
  (cd "$root" && "$build/bench_quant" --only latency --iters 50 --requant "$requant") | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for arch, onnx in (("mobilenet_v3_small", "mnv3_small.onnx"), ("mobilenet_v3_large", "mnv3_large.onnx")):
    ort = statistics.median(1e3 * r["median_s"] for r in rows if r.get("kind") == "ort_fp32_infer" and r["model"].endswith(onnx))
    q = [r for r in rows if r.get("bench") == "quant_latency" and r["arch"] == arch]
    fp32 = statistics.median(r["fp32_ms"] for r in q)
    int8 = statistics.median(r["int8_ms"] for r in q)
    row = {"bench": "quant_peers", "arch": arch, "rounds": len(q), "requant": q[0].get("requant", "float"),
           "tern_fp32_ms": round(fp32, 3), "tern_int8_ms": round(int8, 3), "ort_fp32_ms": round(ort, 3),
           "int8_over_tern_fp32": round(int8 / fp32, 3), "int8_over_ort_fp32": round(int8 / ort, 3)}
    if all("int8_fixed_ms" in r for r in q):
        fixed = statistics.median(r["int8_fixed_ms"] for r in q)
        row.update({"tern_int8_fixed_ms": round(fixed, 3), "fixed_over_float": round(fixed / int8, 3),
                    "fixed_over_float_rounds": round(statistics.median(r["fixed_over_float"] for r in q), 3),
                    "fixed_over_ort_fp32": round(fixed / ort, 3)})
    print(json.dumps(row))
PY
