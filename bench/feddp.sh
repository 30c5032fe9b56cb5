#!/bin/sh
# Federated DP accuracy (issue 7): 10 clients, IID Fashion-MNIST shares of 2000 images,
# MobileNetV3-Small with GroupNorm, 5 rounds; client DP at two target epsilons, central DP, and
# the same run without DP. Each run appends its command, then one JSON line per round (accuracy
# on 2000 test images, epsilon at delta 1e-5), to bench/results/DATE-feddp-NAME.jsonl.
# usage: bench/feddp.sh [BUILD_DIR] [DATE]
set -eu
B=${1:-build}
D=${2:-$(date -u +%Y-%m-%d)}
R=$(dirname "$0")/results
COMMON="--clients 10 --rounds 5 --partition iid --limit-per-client 2000 --test-limit 2000 \
--norm group --insecure --fraction-evaluate 0 --batch 64 --lr 0.05 --momentum 0.9 --seed 0 --no-sync"
run() {
    name=$1; shift
    out="$R/$D-feddp-$name.jsonl"
    cmd="tern sim $COMMON $*"
    rm -f "$out"
    printf '{"command": "%s"}\n' "$cmd" > "$out"
    nice -n 10 "$B/tern" sim $COMMON "$@" --json-log "$out" 2>/dev/null | grep -E '^ +[0-9]+ |^[0-9]+ rounds'
}
run client-eps8 --dp client --target-epsilon 8 --max-grad-norm 1
run nodp
run central-sigma1 --dp central --noise-multiplier 1 --clip-norm 1 --expected-clients 5
run client-eps3 --dp client --target-epsilon 3 --max-grad-norm 1
