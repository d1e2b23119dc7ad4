"""How gmd_ext._C is built: the one definition of its sources, flags and build record, used by setup.py (the
ahead-of-time build) and by the on-demand build of an installed package against the running torch.

A wheel built where torch is not importable (`pip install .` with build isolation: the isolated build environment
holds no torch) is pure Python and carries the C++/CUDA sources in gmd_ext/_csrc. Its first import compiles them
once against the torch that is running and caches the result in a folder of GMD_EXT_CACHE_DIR (default
~/.cache/gmd_ext) keyed by the sources, the torch build, the Python ABI and the build switches, so another torch
gets its own build. `pip install --no-build-isolation .` (or `-e .`) builds ahead of time instead.

This module imports nothing from gmd_ext (setup.py loads it by path and the on-demand build runs it as a script in
a subprocess) and imports torch only inside functions.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

NAME = "gmd_ext._C"
BUILD_INFO_FILE = "_build_info.json"
# Architectures built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible at build time; .ci/compile_cuda.sh
# compiles exactly this list.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
# Build switches that change the result of a build; part of the on-demand cache key.
SWITCHES = ("GMD_EXT_FORCE_CPU", "GMD_EXT_FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CXX", "CC")


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def torch_cxx_standard() -> int | None:
    """The C++ standard the installed torch's headers require, as torch's own CMake package declares it (the
    CXX_STANDARD of its `torch` target; 20 for torch 2.13 and 2.14), or None when it does not say, in which case
    torch.utils.cpp_extension adds its own default."""
    import torch.utils

    path = os.path.join(torch.utils.cmake_prefix_path, "Torch", "TorchConfig.cmake")
    try:
        with open(path) as f:
            match = re.search(r"\bCXX_STANDARD\s+(\d+)", f.read())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def want_cuda() -> bool:
    """Build the CUDA sources? Gated on a CUDA toolkit and a CUDA build of torch, never on a visible GPU (build
    hosts often have none). GMD_EXT_FORCE_CPU=1: never. GMD_EXT_FORCE_CUDA=1: required, an error if impossible."""
    import torch
    from torch.utils import cpp_extension as ce

    if flag("GMD_EXT_FORCE_CPU"):
        return False
    # (cpp_extension leaves CUDA_HOME None under a CPU build of torch, whatever toolkit is installed.)
    toolkit, cuda_torch = ce.CUDA_HOME is not None, torch.version.cuda is not None
    if flag("GMD_EXT_FORCE_CUDA") and not (toolkit and cuda_torch):
        why = ("no CUDA toolkit was found (set CUDA_HOME)" if cuda_torch else
               f"torch {torch.__version__} is a CPU build, which cannot load a library linked against torch's CUDA "
               "libraries; install a CUDA build of torch (a compile-only check of the CUDA sources against this "
               "torch's headers is `bash .ci/compile_cuda.sh` in a checkout)")
        raise RuntimeError(f"GMD_EXT_FORCE_CUDA=1 requires building the CUDA kernels, but {why}")
    return toolkit and cuda_torch


def compile_flags() -> dict[str, list[str]]:
    """The compiler flags of every build ({"cxx": [...], "nvcc": [...]}, before torch's own), shared with
    .ci/compile_cuda.sh."""
    std = torch_cxx_standard()
    std_flags = [f"-std=c++{std}"] if std else []
    # -g0 overrides the -g inherited from Python's CFLAGS: measured 37 s -> 28 s for gram_cpu.cpp and a
    # 4.4 MB -> 0.17 MB library.
    # (torch adds -DPy_LIMITED_API itself for py_limited_api=True.)
    cxx = ["-O3", "-g0", *std_flags, "-fopenmp"]
    # No --use_fast_math: it flushes fp32 subnormals to zero, so a gradient row with |g| < 1e-19 would get a zero
    # norm on CUDA and be skipped as zero-norm, unlike on the CPU (docs/design.md §3: one semantics per op).
    nvcc = ["-O3", *std_flags]
    return {"cxx": cxx, "nvcc": nvcc}


def extension(src_dir: str):
    """The gmd_ext._C extension over the sources in src_dir (csrc/ of a checkout, gmd_ext/_csrc when installed):
    C++ CPU kernels always, CUDA kernels when want_cuda()."""
    import torch
    from torch.utils import cpp_extension as ce

    with_cuda = want_cuda()
    sources = sorted(glob.glob(os.path.join(src_dir, "*.cpp")) + glob.glob(os.path.join(src_dir, "cpu", "*.cpp")))
    flags = compile_flags()
    define_macros = []
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(src_dir, "cuda", "*.cu")))
        define_macros.append(("GMD_EXT_WITH_CUDA", None))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    return (ce.CUDAExtension if with_cuda else ce.CppExtension)(
        name=NAME, sources=sources, include_dirs=[os.path.abspath(src_dir)], define_macros=define_macros,
        extra_compile_args=flags, extra_link_args=["-fopenmp"], py_limited_api=True)


def build_record(ext) -> dict:
    """What _backend checks at import: the torch the library was built for, CUDA, architectures, flags."""
    import torch

    with_cuda = ("GMD_EXT_WITH_CUDA", None) in ext.define_macros
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if with_cuda else None,
        "with_cuda": with_cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "cxx_flags": ext.extra_compile_args["cxx"],
        "platform": platform.platform(),
    }


def _write_json(path: str, data: dict) -> None:
    # tmp + os.replace, as gmd_ext.io.atomic_write does; that module cannot be imported here (see the docstring).
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def build_ext_class():
    """torch's BuildExtension, writing the build record next to each built library only once the build
    succeeded (a failed build leaves no record behind, in the source tree or elsewhere)."""
    from torch.utils import cpp_extension as ce

    class BuildExt(ce.BuildExtension):
        def run(self):
            super().run()
            for ext in self.extensions:
                out_dir = os.path.dirname(self.get_ext_fullpath(ext.name))
                _write_json(os.path.join(out_dir, BUILD_INFO_FILE), build_record(ext))

    return BuildExt


# ---- on-demand build of an installed package ------------------------------------------------------------------

def cache_root() -> str:
    if os.environ.get("GMD_EXT_CACHE_DIR"):
        return os.path.abspath(os.environ["GMD_EXT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gmd_ext")


def cache_key(src_dir: str) -> str:
    """A folder name that changes with the sources, the torch build, the Python ABI and the build switches."""
    import torch

    h = hashlib.sha256()
    with open(__file__, "rb") as f:  # the flags are defined here
        h.update(f.read())
    for path in sorted(glob.glob(os.path.join(src_dir, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            h.update(os.path.relpath(path, src_dir).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    h.update(json.dumps([torch.__version__, torch.version.cuda, bool(torch._C._GLIBCXX_USE_CXX11_ABI),
                         sys.implementation.cache_tag, platform.machine(),
                         {k: os.environ.get(k) for k in SWITCHES}]).encode())
    return f"torch-{torch.__version__}-{h.hexdigest()[:16]}"


def library_in(folder: str) -> str | None:
    """The built gmd_ext._C library in folder/gmd_ext/, if any."""
    found = sorted(glob.glob(os.path.join(folder, "gmd_ext", "_C.*so")))
    return found[0] if found else None


def build_cached(src_dir: str, log=None) -> str:
    """Path of gmd_ext._C built from src_dir against the running torch: the cached build, or a new one (a few
    minutes once; progress goes to `log`, default stderr). Concurrent processes wait for the one that builds.
    Raises RuntimeError naming the build log when the build fails, now or in an earlier attempt."""
    import fcntl

    log = log or sys.stderr
    root = cache_root()
    key = cache_key(src_dir)
    final = os.path.join(root, key)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f"{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the OS if this process dies
        lib = library_in(final)
        if lib:
            return lib
        failed_log = os.path.join(root, f"{key}.failed.log")
        if os.path.exists(failed_log):
            raise RuntimeError(f"building the C++ kernels failed in an earlier attempt (log: {failed_log}); "
                               f"delete that log to retry")
        import torch

        print(f"gmd_ext: compiling the C++ kernels against torch {torch.__version__} (once, a few minutes; later "
              f"imports load the cached build from {final})", file=log, flush=True)
        t0 = time.perf_counter()
        work = tempfile.mkdtemp(prefix=f".{key}-", dir=root)
        try:
            rc, log_path = _run_build(src_dir, work, t0, log)
            lib = library_in(os.path.join(work, "lib"))
            if rc != 0 or lib is None:
                os.replace(log_path, failed_log)
                with open(failed_log) as f:
                    tail = "".join(f.readlines()[-15:])
                raise RuntimeError(f"building the C++ kernels failed (exit code {rc}; log: {failed_log}):\n{tail}")
            os.replace(log_path, os.path.join(work, "lib", "build.log"))
            shutil.rmtree(final, ignore_errors=True)  # a folder without a library is an interrupted copy
            os.replace(os.path.join(work, "lib"), final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"gmd_ext: C++ kernels built in {time.perf_counter() - t0:.0f} s", file=log, flush=True)
        return library_in(final)


def _run_build(src_dir: str, work: str, t0: float, log) -> tuple[int, str]:
    """Run this file as a script in a subprocess (the build must not import gmd_ext, which is importing); echo one
    progress line per compiled source. Returns (exit code, path of the full log)."""
    log_path = os.path.join(work, "build.log")
    script = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script, __file__, src_dir, os.path.join(work, "lib"),
                                 os.path.join(work, "tmp")], cwd=work, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        done = 0
        for line in proc.stdout:
            out.write(line)
            # ninja's "[i/n] c++ ... -c <src>" once a source is compiled, or distutils' command before it is.
            src = re.search(r" -c (\S+\.(?:cpp|cu))\b", line)
            if src:
                done += 1
                print(f"gmd_ext:   {done}. {os.path.relpath(src.group(1), src_dir)} "
                      f"({time.perf_counter() - t0:.0f} s)", file=log, flush=True)
        return proc.wait(), log_path


def _main(src_dir: str, lib_dir: str, tmp_dir: str) -> None:
    from setuptools import setup

    setup(name="gmd_ext_kernels", ext_modules=[extension(src_dir)], cmdclass={"build_ext": build_ext_class()},
          script_args=["build_ext", "--build-lib", lib_dir, "--build-temp", tmp_dir])


if __name__ == "__main__":
    _main(*sys.argv[1:4])
