#!/usr/bin/env bash
# Build the ops with CMake against the installed torch's libtorch (no Python in the library), install them to a
# temporary prefix, then build and run examples/cpp against the installed GmdExt package.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
TORCH_PREFIX="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
JOBS="${JOBS:-$(nproc)}"
GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi

cmake -S "$ROOT" -B "$WORK/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DCMAKE_INSTALL_PREFIX="$WORK/prefix"
cmake --build "$WORK/build" -j "$JOBS"
cmake --install "$WORK/build"

cmake -S "$ROOT/examples/cpp" -B "$WORK/example" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$WORK/prefix;$TORCH_PREFIX"
cmake --build "$WORK/example" -j "$JOBS"
"$WORK/example/gmd_ext_example"
