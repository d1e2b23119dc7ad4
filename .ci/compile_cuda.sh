#!/usr/bin/env bash
# Compile check of every csrc/cuda/*.cu for sm_90 on a machine without a GPU (and with a CPU build of torch):
# nvcc -c against the headers of the installed torch wheel, plus .ci/cuda_stub for the one generated header
# (c10/cuda/impl/cuda_cmake_macros.h) that CPU wheels do not ship. Flags follow what setup.py passes through
# torch.utils.cpp_extension for a CUDAExtension. Nothing is linked or run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
ARCH="${GMD_EXT_CUDA_ARCH:-90}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

mapfile -t TORCH_FLAGS < <(python - <<'PY'
import torch
from torch.utils import cpp_extension as ce
for p in ce.include_paths():
    print(f"-I{p}")
for f in ce.COMMON_NVCC_FLAGS:
    print(f)
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
PY
)

status=0
for src in "$ROOT"/csrc/cuda/*.cu; do
  echo "nvcc sm_${ARCH}: ${src#"$ROOT"/}"
  if ! "$NVCC" -c "$src" -o "$OUT/$(basename "$src").o" \
      -gencode "arch=compute_${ARCH},code=sm_${ARCH}" \
      -O3 -std=c++17 --compiler-options -fPIC \
      -DGMD_EXT_WITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
      -I"$ROOT/.ci/cuda_stub" -I"$ROOT/csrc" "${TORCH_FLAGS[@]}"; then
    status=1
  fi
done
exit $status
