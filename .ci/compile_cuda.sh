#!/usr/bin/env bash
# Build check of csrc/cuda/*.cu on a machine without a GPU (and possibly with a CPU build of torch):
#  1. nvcc -c every source for every architecture of setup.py's default TORCH_CUDA_ARCH_LIST
#     (gmd_ext/_build.py: DEFAULT_CUDA_ARCH_LIST), with the flags the build passes (gmd_ext/_build.py:
#     compile_flags, torch's COMMON_NVCC_FLAGS and arch flags, the C++ standard torch declares), against the
#     headers of the installed torch plus .ci/cuda_stub for the one generated header (c10/cuda/impl/
#     cuda_cmake_macros.h) that CPU wheels do not ship;
#  2. register-spill gate: ptxas -v output parsed, any kernel with spill stores or loads on any built architecture
#     (sm_80 and sm_90 by default) fails the check (register counts are printed per kernel and architecture);
#  3. link the objects into a shared library with --no-undefined against the toolkit's libcudart and torch's
#     libraries. A CUDA build of torch provides libc10_cuda / libtorch_cuda and the link must resolve every
#     symbol; a CPU build lacks those two libraries, so the symbols left undefined must all be theirs
#     (c10::cuda::*, at::cuda::*) — anything else is a real link error.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
CUDA_ROOT=""
for d in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")" /usr/local/cuda; do
  if [ -n "$d" ] && [ -e "$d/lib64/libcudart.so" ]; then CUDA_ROOT="$d"; break; fi
done
JOBS="${JOBS:-$(nproc)}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

# One flag per line: include paths, the build's nvcc flags, the arch flags; then "LIB <dir>" and "CUDA_TORCH 0|1".
python - "$ROOT" > "$OUT/flags" <<'PY'
import importlib.util, os, sys
import torch
from torch.utils import cpp_extension as ce
spec = importlib.util.spec_from_file_location("gmd_ext_build", os.path.join(sys.argv[1], "gmd_ext", "_build.py"))
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.DEFAULT_CUDA_ARCH_LIST)
flags = [f"-I{p}" for p in ce.include_paths()] + ce.COMMON_NVCC_FLAGS + build.compile_flags()["nvcc"]
flags += ce._get_cuda_arch_flags() + [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
print("\n".join(flags))
print("LIB", os.path.join(os.path.dirname(torch.__file__), "lib"))
print("CUDA_TORCH", int(torch.version.cuda is not None))
PY
mapfile -t FLAGS < <(grep -v '^LIB \|^CUDA_TORCH ' "$OUT/flags")
TORCH_LIB="$(sed -n 's/^LIB //p' "$OUT/flags")"
CUDA_TORCH="$(sed -n 's/^CUDA_TORCH //p' "$OUT/flags")"
echo "nvcc flags: $(grep -- '-std=\|-gencode' "$OUT/flags" | tr '\n' ' ')"

compile() {  # src -> $OUT/<name>.o, ptxas report in $OUT/<name>.ptxas
  local src="$1" name
  name="$(basename "$src")"
  if "$NVCC" -c "$src" -o "$OUT/$name.o" -Xptxas -v --compiler-options -fPIC \
      -DGMD_EXT_WITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
      -I"$ROOT/.ci/cuda_stub" -I"$ROOT/csrc" "${FLAGS[@]}" > "$OUT/$name.ptxas" 2>&1; then
    echo "compiled ${src#"$ROOT"/}"
  else
    cat "$OUT/$name.ptxas"
    echo "FAILED ${src#"$ROOT"/}"
    return 1
  fi
}
export -f compile
export NVCC OUT ROOT
export FLAGS_FILE="$OUT/flags"
status=0
# Sources compile in parallel (each one is several minutes of nvcc for all architectures on one core).
# GMD_EXT_CUDA_SOURCES: a subset to check (default: every csrc/cuda/*.cu).
# shellcheck disable=SC2086
printf '%s\n' ${GMD_EXT_CUDA_SOURCES:-"$ROOT"/csrc/cuda/*.cu} | xargs -P "$JOBS" -I{} bash -c \
  'mapfile -t FLAGS < <(grep -v "^LIB \|^CUDA_TORCH " "$FLAGS_FILE"); compile "$1"' _ {} || status=1

# Spill gate: ptxas prints, per kernel and architecture, "Compiling entry function 'X' for 'sm_NN'" and then
# "Used R registers, ..." and "S bytes spill stores, L bytes spill loads".
python - "$OUT" <<'PY' || status=1
import glob, re, subprocess, sys
rows, spills = [], []
for path in sorted(glob.glob(f"{sys.argv[1]}/*.ptxas")):
    fn = arch = None
    for line in open(path):
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            fn, arch = m.groups()
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and fn and (int(m.group(1)) or int(m.group(2))):
            spills.append((fn, arch, line.strip()))
        m = re.search(r"Used (\d+) registers", line)
        if m and fn:
            rows.append((path.split("/")[-1][:-6], arch, int(m.group(1)), fn))
names = dict(zip((r[3] for r in rows), subprocess.run(["c++filt"], input="\n".join(r[3] for r in rows),
                                                      capture_output=True, text=True).stdout.splitlines()))
print(f"{'source':28s} {'arch':6s} {'regs':>4s}  kernel")
for src, arch, regs, fn in rows:
    print(f"{src:28s} {arch:6s} {regs:4d}  {names.get(fn, fn)[:110]}")
if not rows:
    sys.exit("spill gate: no ptxas report was parsed (nvcc -Xptxas -v output changed?)")
# Every architecture is gated: a spill on sm_80 (A100) costs as much there as one on sm_90 does on Hopper.
for fn, arch, line in spills:
    print(f"SPILL {arch} {names.get(fn, fn)}: {line}")
sys.exit(1 if spills else 0)
PY

if [ "$status" -eq 0 ]; then
  [ -n "$CUDA_ROOT" ] || { echo "link: no lib64/libcudart.so under CUDA_HOME, nvcc's folder or /usr/local/cuda"; exit 1; }
  libs=(-L"$CUDA_ROOT/lib64" -lcudart -L"$TORCH_LIB" -lc10 -ltorch_cpu -ltorch)
  if [ "$CUDA_TORCH" = 1 ]; then libs+=(-lc10_cuda -ltorch_cuda); fi
  if c++ -shared -o "$OUT/gmd_ext_cuda.so" "$OUT"/*.o "${libs[@]}" -Wl,--no-undefined 2> "$OUT/link.err"; then
    echo "linked: every symbol resolved (libcudart, torch's libraries)"
  else
    grep -o "undefined reference to \`[^']*'" "$OUT/link.err" | sort -u > "$OUT/undefined" || true
    other="$(grep -v "\`c10::cuda::\|\`at::cuda::" "$OUT/undefined" || true)"
    if [ "$CUDA_TORCH" = 0 ] && [ -s "$OUT/undefined" ] && [ -z "$other" ]; then
      echo "linked against libcudart and torch's CPU libraries; $(wc -l < "$OUT/undefined") symbols are left to" \
           "libc10_cuda / libtorch_cuda, which a CPU build of torch does not ship (all in c10::cuda / at::cuda)"
    else
      echo "link FAILED:"; if [ -n "$other" ]; then echo "$other"; else head -40 "$OUT/link.err"; fi
      status=1
    fi
  fi
fi
exit $status
