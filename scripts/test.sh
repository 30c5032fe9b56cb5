#!/usr/bin/env bash
# The README's test command: installs what is needed, builds, runs the whole test suite, then
# builds again with AddressSanitizer and UndefinedBehaviorSanitizer and runs it again.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"

echo "== release build: tests"
"$root/scripts/build.sh" "$root/build" -DCMAKE_C_FLAGS="-Werror"
(cd "$root/build" && ctest --output-on-failure -j 2)

echo "== AddressSanitizer + UndefinedBehaviorSanitizer build: tests"
"$root/scripts/build.sh" "$root/build-asan" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTERN_SANITIZE=ON
(cd "$root/build-asan" && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
   ctest --output-on-failure -j 2)
