"""Builds gmd_ext._C: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit and a CUDA build of
torch are present.

Switches (environment):
  GMD_EXT_FORCE_CUDA=1   build the CUDA sources even when torch is a CPU build (compile check; the .so then
                         needs a CUDA torch to load)
  GMD_EXT_FORCE_CPU=1    never build CUDA sources
  TORCH_CUDA_ARCH_LIST   architectures; defaults to "8.0;9.0+PTX" when no GPU is visible at build time
  MAX_JOBS               parallel compile jobs (ninja)
"""
import glob
import json
import os
import platform

import torch
from setuptools import setup
from torch.utils import cpp_extension as ce

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _flag("GMD_EXT_FORCE_CPU"):
        return False
    if _flag("GMD_EXT_FORCE_CUDA"):
        return True
    # Gate on the toolkit and the torch build, never on a visible GPU (build hosts often have none).
    return ce.CUDA_HOME is not None and torch.version.cuda is not None


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -g0 overrides the -g inherited from Python's CFLAGS: measured 37 s -> 28 s for gram_cpu.cpp and a
    # 4.4 MB -> 0.17 MB library.
    cxx = ["-O3", "-g0", "-std=c++17", "-fopenmp", "-DPy_LIMITED_API=0x030a0000"]
    define_macros = []
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("GMD_EXT_WITH_CUDA", None))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    kwargs = dict(
        name="gmd_ext._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    ext = (ce.CUDAExtension if with_cuda else ce.CppExtension)(**kwargs)
    return ext, with_cuda


def _write_build_info(with_cuda):
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if with_cuda else None,
        "with_cuda": with_cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "platform": platform.platform(),
    }
    with open(os.path.join(ROOT, "gmd_ext", "_build_info.json"), "w") as f:
        json.dump(info, f, indent=1)


ext, with_cuda = _extension()
_write_build_info(with_cuda)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": ce.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
