#!/usr/bin/env bash
# Installs the Debian packages Tern builds and tests with. Idempotent: does nothing (and needs
# no network) when they are all present. Run as root or with sudo available.
set -euo pipefail
packages=(build-essential cmake pkg-config libopenblas-dev libjansson-dev zlib1g-dev libcmocka-dev
          libpng-dev libjpeg62-turbo-dev liblmdb-dev libssl-dev libczmq-dev libfftw3-dev
          dataset-fashion-mnist)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "setup: installing ${missing[*]}" >&2
$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
