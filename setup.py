"""Builds gmd-ext. Where torch is importable (`pip install --no-build-isolation .` or `-e .`, `python setup.py
build_ext --inplace`) gmd_ext._C is compiled ahead of time against it: the C++ CPU kernels always, the CUDA kernels
when a CUDA toolkit and a CUDA build of torch are present. Where it is not (`pip install .`: the isolated build
environment holds no torch) the wheel is pure Python and the installed package compiles the same sources once, at
its first import, against the torch that is running (gmd_ext/_build.py). Both wheels carry the sources
(gmd_ext/_csrc), so an installed package rebuilds itself for a torch it was not built for.

Switches (environment):
  GMD_EXT_FORCE_CUDA=1   the CUDA kernels are required: fail, naming the reason, when no CUDA toolkit is found or
                         torch is a CPU build (whose process could not load a library linked against torch's CUDA
                         libraries; `bash .ci/compile_cuda.sh` is the compile-only check of the CUDA sources)
  GMD_EXT_FORCE_CPU=1    never build CUDA sources
  TORCH_CUDA_ARCH_LIST   architectures; defaults to "8.0;9.0+PTX" when no GPU is visible at build time
  MAX_JOBS               parallel compile jobs (ninja)
The C++ standard is the one the installed torch declares (gmd_ext/_build.py: torch_cxx_standard).
"""
import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
# The build definition is a module of the package (the installed package builds with it too); loaded by path so
# that the build does not import gmd_ext itself.
_spec = importlib.util.spec_from_file_location("gmd_ext_build", os.path.join(ROOT, "gmd_ext", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)


class BuildPy(build_py):
    """Ships csrc/ inside the package as gmd_ext/_csrc: the sources of the on-demand build."""

    def run(self):
        super().run()
        if not self.editable_mode:
            target = os.path.join(self.build_lib, "gmd_ext", "_csrc")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(os.path.join(ROOT, "csrc"), target)


try:
    import torch  # noqa: F401
except ImportError:
    torch = None

kwargs = {}
if torch is not None:
    kwargs = dict(ext_modules=[_build.extension("csrc")],
                  options={"bdist_wheel": {"py_limited_api": "cp310"}})

setup(cmdclass={"build_py": BuildPy, **({"build_ext": _build.build_ext_class()} if torch is not None else {})},
      **kwargs)
