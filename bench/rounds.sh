#!/usr/bin/env bash
# Server round overhead: `tern server run` with N `tern client run --echo` clients (each sends
# back the model it receives, so no training time is in the figure) and a model the size of
# MobileNetV3-Small at 1000 classes (2.54M parameters, about 10.2 MB of safetensors), for
# N = 2, 10, 30, 100, with and without CURVE. Per configuration: seconds per round (median of
# the rounds after a warm-up round, from the server's --json-log round_seconds, plus the mean
# wall time per measured round) and the server's peak RSS (VmHWM of /proc/PID/status).
# Prints one JSON line per configuration.
#
# Flower's figures are the issue's, quoted as labelled constants for the ratio; they were NOT
# measured in this run: Flower 1.6, echo clients, 10.25 MB model, 2 shared cores: 0.29 s/round
# at 2 clients, 1.78 s at 10, 5.45 s at 30; server memory about 100 MiB per client.
#
# Also per configuration: the median of the server's per-round breakdown (tern_round_report:
# idle, verify, load, fold, send, aggregate, serialize, commit seconds, and the server's CPU
# seconds per round), and the CPU seconds of the whole run of the server and of all clients
# together (GNU time), so that the shares of the two cores can be compared.
#
# usage: bench/rounds.sh [BUILD_DIR] [WORK_DIR]      (defaults: build, /tmp/tern-bench-rounds)
#        CLIENTS="2 10" ROUNDS=4 MODES="curve plain" bench/rounds.sh ...
#        SERVER_ARGS="--no-sync" LABEL=no-sync bench/rounds.sh ...   (extra server options)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
work=${2:-/tmp/tern-bench-rounds}
tern=$build/tern
clients_list=${CLIENTS:-2 10 30 100}
rounds=${ROUNDS:-6}        # 1 warm-up + ROUNDS-1 measured
modes=${MODES:-curve plain}
server_args=${SERVER_ARGS:-}
server_wrap=${SERVER_WRAP:-}   # e.g. "perf record -g -o /tmp/server.perf --" (profiling)
client_wrap=${CLIENT_WRAP:-}   # the same, for client 1 only
label=${LABEL:-}
gnutime=/usr/bin/time
[ -x "$gnutime" ] || { echo "GNU time ($gnutime) is needed for CPU times and peak RSS" >&2; exit 1; }
[ -x "$tern" ] || { echo "no $tern: build first (scripts/build.sh $build)" >&2; exit 1; }
mkdir -p "$work"

pids=()
cleanup() {
  # Each pid is GNU time's: end its child (the tern process) first.
  for p in "${pids[@]:-}"; do
    [ -n "$p" ] || continue
    pkill -P "$p" 2>/dev/null || true
    kill "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

for n in $clients_list; do
  base=$work/base-$n
  if [ ! -f "$base/.complete" ]; then
    echo "== $n clients: server directory and registrations" >&2
    rm -rf "$base"
    "$tern" server init --store "$base" --in-channels 3 --classes 1000 >/dev/null
    for i in $(seq 1 "$n"); do
      "$tern" server register "echo-$i" --store "$base" --json \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])' >"$base/key-$i"
    done
    touch "$base/.complete"
  fi
  for mode in $modes; do
    dir=$work/run-$n-$mode
    rm -rf "$dir"
    cp -r "$base" "$dir"
    port=$(free_port)
    endpoint=tcp://127.0.0.1:$port
    sec=()
    [ "$mode" = plain ] && sec=(--insecure)
    load=$(cut -d' ' -f1 /proc/loadavg)
    echo "== $n clients, $mode: $rounds rounds (load $load)" >&2
    # shellcheck disable=SC2086
    "$gnutime" -o "$dir/server.time" -f '%e %U %S %M %R' \
      $server_wrap "$tern" server run --store "$dir" --endpoint "$endpoint" "${sec[@]}" --rounds "$rounds" \
      --min-available-clients "$n" --min-fit-clients "$n" --fraction-evaluate 0 \
      --round-timeout 600 --wait-timeout 600 --json-log "$dir/rounds.jsonl" --quiet \
      $server_args >"$dir/server.log" 2>&1 &
    server=$!
    pids=("$server")
    ckey=()
    [ "$mode" = curve ] && ckey=(--server-key "$dir/keys/server.pub")
    for i in $(seq 1 "$n"); do
      wrap=()
      [ "$i" = 1 ] && [ -n "$client_wrap" ] && read -r -a wrap <<<"$client_wrap"
      TERN_API_KEY=$(cat "$dir/key-$i") "$gnutime" -o "$dir/client-$i.time" -f '%e %U %S %M %R' \
        "${wrap[@]}" "$tern" client run --endpoint "$endpoint" \
        --name "echo-$i" --echo --quiet "${sec[@]}" "${ckey[@]}" >"$dir/client-$i.log" 2>&1 &
      pids+=("$!")
    done
    status=0
    wait "$server" || status=$?
    for p in "${pids[@]:1}"; do wait "$p" 2>/dev/null || true; done
    pids=()
    if [ "$status" != 0 ]; then
      echo "server failed ($status); see $dir/server.log" >&2
      tail -5 "$dir/server.log" >&2
      continue
    fi
    python3 - "$dir/rounds.jsonl" "$n" "$mode" "$dir" "$dir/initial.safetensors" "$load" "$label" <<'EOF'
import glob, json, os, statistics, sys
path, n, mode, d, model, load, label = (sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4],
                                        sys.argv[5], float(sys.argv[6]), sys.argv[7])
def gnutime(p):
    # elapsed, user, system seconds, max RSS KiB, minor page faults
    f = open(p).read().split()[-5:]
    return float(f[0]), float(f[1]) + float(f[2]), int(f[3]), int(f[4])
_, server_cpu, hwm_kib, server_faults = gnutime(d + "/server.time")
clients = [gnutime(p) for p in glob.glob(d + "/client-*.time")]
clients_cpu = sum(c[1] for c in clients)
clients_faults = sum(c[3] for c in clients)
rows = [json.loads(l) for l in open(path) if l.strip()]
done = [r for r in rows if r["completed"]]
measured = done[1:]  # the first round is the warm-up
secs = [r["round_seconds"] for r in measured]
flower = {2: 0.29, 10: 1.78, 30: 5.45}
out = {
    "bench": "fl_round_overhead",
    "clients": n,
    "curve": mode == "curve",
    "model_bytes": os.path.getsize(model),
    "rounds_measured": len(secs),
    "seconds_per_round_median": round(statistics.median(secs), 4) if secs else None,
    "seconds_per_round_min": round(min(secs), 4) if secs else None,
    "seconds_per_round_max": round(max(secs), 4) if secs else None,
    "mb_out_per_round": round(statistics.median([r["bytes_out"] for r in measured]) / 1e6, 1) if measured else None,
    "server_peak_rss_mib": round(hwm_kib / 1024, 1),
    "label": label or None,
    "load_1min_at_start": load,
    "server_cpu_seconds_run": round(server_cpu, 2),
    "clients_cpu_seconds_run": round(clients_cpu, 2),
    "server_page_faults_run": server_faults,
    "clients_page_faults_run": clients_faults,
    "breakdown_median_seconds": {
        k: round(statistics.median([r[k] for r in measured if r.get(k) is not None]), 4)
        for k in ("fit_seconds", "eval_seconds", "commit_seconds", "idle_seconds",
                  "verify_seconds", "load_seconds", "fold_seconds", "send_seconds",
                  "aggregate_seconds", "serialize_seconds", "cpu_seconds", "loop_cpu_seconds")
        if measured and all(r.get(k) is not None for r in measured)},
    "server_rss_mib_per_client": round(hwm_kib / 1024 / n, 2),
    "reference_flower_issue_figures_not_measured_here": {
        "source": "figures quoted in the issue: Flower 1.6, echo clients, 10.25 MB model, 2 shared cores",
        "seconds_per_round": flower.get(n),
        "server_mib_per_client": 100,
    },
}
if secs and n in flower:
    out["speedup_vs_flower_issue_figure"] = round(flower[n] / statistics.median(secs), 2)
print(json.dumps(out))
EOF
  done
done
