#!/usr/bin/env bash
# The README's main job: installs what is needed, builds, and trains MobileNetV3-Small for a few
# steps on a fixed batch, printing the loss as it falls. Extra arguments go to `tern demo`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh" "$root/build" >/dev/null
exec "$root/build/tern" demo "$@"
