"""Loading the compiled extension and choosing a backend.

One selector serves every op: `resolve(backend, device)` returns "cpp", "triton" or "torch".
The argument wins over the GMD_EXT_BACKEND environment variable; "auto" picks the fastest available backend
and, when it has to fall back, warns once per reason. An explicitly requested backend that is unavailable
raises with the reason. Nothing here touches a GPU at import time.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import warnings
from importlib import resources

import torch

BACKENDS = ("auto", "cpp", "triton", "torch")
_BUILD_INFO_FILE = "_build_info.json"


def _load_extension():
    """Import gmd_ext._C (which registers the torch.ops.gmd_ext ops); return (loaded, reason_if_not)."""
    rebuild = "rebuild with `pip install --no-build-isolation --force-reinstall --no-deps .` (after installing torch)"
    if importlib.util.find_spec("gmd_ext._C") is None:
        return False, f"the C++ extension gmd_ext._C is not built; {rebuild}"
    # Check the build record before loading: a .so built against another torch fails with undefined symbols.
    info = build_info()
    if info is not None:
        from packaging.version import Version

        if Version(info["torch"]).release[:2] != Version(torch.__version__).release[:2]:
            return False, (f"gmd_ext._C was built against torch {info['torch']} but torch {torch.__version__} "
                           f"is running; {rebuild}")
    try:
        from gmd_ext import _C  # noqa: F401
    except ImportError as e:
        return False, f"the C++ extension gmd_ext._C failed to load ({e}); {rebuild}"
    return True, None


def build_info() -> dict | None:
    """The build record written by setup.py (torch version, CUDA, arch list), or None if absent."""
    try:
        text = resources.files("gmd_ext").joinpath(_BUILD_INFO_FILE).read_text()
    except (FileNotFoundError, OSError):
        return None
    return json.loads(text)


CPP_LOADED, CPP_REASON = _load_extension()


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str | None]:
    """(available, reason). Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e}); `pip install triton`"
    return True, None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(backend: str, device: torch.device) -> tuple[bool, str | None]:
    """Whether `backend` can run tensors on `device`, and why not."""
    if backend == "torch":
        return True, None
    if backend == "cpp":
        if not CPP_LOADED:
            return False, CPP_REASON
        if device.type == "cuda" and not (build_info() or {}).get("with_cuda"):
            return False, (
                "gmd_ext._C was built without CUDA kernels (no CUDA toolkit or a CPU build of torch at build "
                "time); rebuild with a CUDA torch and toolkit, or GMD_EXT_FORCE_CUDA=1"
            )
        if device.type not in ("cpu", "cuda"):
            return False, f"the cpp backend has kernels for cpu and cuda, not {device.type}"
        return True, None
    if backend == "triton":
        ok, reason = triton_status()
        if not ok:
            return False, reason
        if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
            return True, None
        return False, f"triton kernels run on cuda tensors (or cpu with TRITON_INTERPRET=1), got {device.type}"
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


_warned: set[str] = set()


def resolve(backend: str | None, device: torch.device | str) -> str:
    """Pick the backend for tensors on `device`: the argument, else GMD_EXT_BACKEND, else auto."""
    device = torch.device(device)
    if backend is None or backend == "auto":
        backend = os.environ.get("GMD_EXT_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (argument or GMD_EXT_BACKEND), got {backend!r}")
    if backend != "auto":
        ok, reason = available(backend, device)
        if not ok:
            raise RuntimeError(f"backend {backend!r} is unavailable for {device.type} tensors: {reason}")
        return backend
    ok, reason = available("cpp", device)
    if ok:
        return "cpp"
    # Without the compiled kernels, triton is the next-fastest on a GPU; on a CPU the interpreter is slow,
    # so auto goes straight to the pure-torch path there.
    if device.type == "cuda" and available("triton", device)[0]:
        fallback = "triton"
    else:
        fallback = "torch"
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"gmd_ext: falling back to the {fallback} backend: {reason}", RuntimeWarning, stacklevel=3)
    return fallback
