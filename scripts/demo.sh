#!/usr/bin/env bash
# The README's main job: installs what is needed, builds, and runs a federated simulation on
# this machine (`tern sim`): a server with CURVE encryption and 4 client processes, each
# training MobileNetV3-Small on its Dirichlet(0.5) share of Fashion-MNIST, for 5 rounds; prints
# one line per round (accuracy on 2000 test images rises) and the model versions committed.
#   --quick          2 clients, 2 rounds, 500 images each (under a minute)
#   --fixed-batch    the older single-process demo: a few SGD steps on one synthetic batch
# Other arguments go to `tern sim` (see `build/tern sim --help`).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh" "$root/build" >/dev/null
case "${1:-}" in
  --quick) shift; exec "$root/build/tern" sim --clients 2 --rounds 2 --limit-per-client 500 \
                   --test-limit 500 "$@" ;;
  --fixed-batch) shift; exec "$root/build/tern" demo "$@" ;;
  *) exec "$root/build/tern" sim "$@" ;;
esac
