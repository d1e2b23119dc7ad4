"""Loading the compiled extension and choosing a backend.

One selector serves every op: `resolve(backend, device)` returns "cpp", "triton" or "torch".
The argument wins over the GMD_EXT_BACKEND environment variable; "auto" picks the fastest available backend
and, when it has to fall back, warns once per reason. An explicitly requested backend that is unavailable
raises with the reason. Nothing here touches a GPU at import time.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Literal, get_args

import torch

from gmd_ext import _build

#: The `backend=` argument of every op and of GMD (and GMD_EXT_BACKEND): "auto" picks, the others are requests.
Backend = Literal["auto", "cpp", "triton", "torch"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
PACKAGE_DIR = Path(__file__).resolve().parent
# A source checkout (setup.py and csrc/ next to the package) builds in place; an installed package carries the
# sources in _csrc and builds on demand (gmd_ext/_build.py).
CHECKOUT = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "setup.py").is_file() and \
    (PACKAGE_DIR.parent / "csrc").is_dir() else None
_SOURCES = PACKAGE_DIR / "_csrc"
_REBUILD_CHECKOUT = "`pip install --no-build-isolation -e .` in the checkout (or `python setup.py build_ext --inplace`)"


def _read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _build.BUILD_INFO_FILE).read_text())
    except (FileNotFoundError, OSError):
        return None


def _shadowed_install() -> str | None:
    """Where pip installed gmd-ext, when this package (a checkout first on sys.path) is not that install."""
    # Every gmd-ext distribution on sys.path: an in-tree build leaves gmd_ext.egg-info in the checkout itself.
    for dist in importlib.metadata.distributions(name="gmd-ext"):
        init = Path(dist.locate_file("gmd_ext/__init__.py"))
        if init.is_file() and init.resolve().parent != PACKAGE_DIR:
            return str(init.parent)
    return None


def _why_not_checkout(record: dict | None, built: bool) -> str:
    if built:
        return (f"gmd_ext._C in {PACKAGE_DIR} was built against torch {record['torch']} but torch "
                f"{torch.__version__} is running; rebuild: {_REBUILD_CHECKOUT}")
    installed = _shadowed_install()
    if installed:
        return (f"gmd_ext was imported from the source checkout {CHECKOUT}, which has no compiled kernels, "
                f"instead of the installed gmd-ext in {installed} (the checkout is first on sys.path because it is "
                f"the current directory or the script's); run from outside the checkout (or with `python -P`), or "
                f"build the checkout: {_REBUILD_CHECKOUT}")
    return f"the C++ kernels of the checkout {CHECKOUT} are not built; build them: {_REBUILD_CHECKOUT}"


def _load_extension() -> tuple[bool, str | None, dict | None, str | None]:
    """Load gmd_ext._C once, at import: the library next to the package when it matches the running torch, else
    (installed package) the on-demand build for this torch. Returns (loaded, reason_if_not, build record,
    library path)."""
    spec = importlib.util.find_spec("gmd_ext._C")
    record = _read_record(PACKAGE_DIR) if spec is not None else None
    # Check the build record before loading: a library built against another torch fails with undefined symbols
    # (or worse, loads and misbehaves). One without a record (a build by other means) is tried as it is.
    if spec is not None and spec.origin and (record is None or record["torch"] == torch.__version__):
        try:
            _build.load_library(spec.origin)
        except ImportError as e:
            return False, f"gmd_ext._C ({spec.origin}) failed to load ({e}); rebuild it", record, spec.origin
        return True, None, record, spec.origin
    if CHECKOUT is not None or not _SOURCES.is_dir():
        if CHECKOUT is None:
            return False, (f"the installed gmd_ext in {PACKAGE_DIR} has neither a library built for torch "
                           f"{torch.__version__} nor the sources to build one; reinstall it: `pip install "
                           f"--force-reinstall --no-deps <gmd-ext source>`"), record, None
        return False, _why_not_checkout(record, spec is not None), record, None
    if os.environ.get("GMD_EXT_JIT", "1") == "0":
        return False, (f"the installed gmd_ext has no library built for torch {torch.__version__} and "
                       "GMD_EXT_JIT=0 turns off the build at import; unset it, or install ahead of time: "
                       "`pip install --no-build-isolation --force-reinstall --no-deps <gmd-ext source>`"), record, None
    try:
        path, fd = _build.build_cached(str(_SOURCES))
    except (RuntimeError, OSError) as e:  # the message names the build log, or the cache file refused (_build)
        return False, str(e), None, None
    try:
        _build.load_library(path, fd)  # through the descriptor whose bytes were checked
    except ImportError as e:
        return False, f"the built gmd_ext._C ({path}) failed to load ({e}); delete its folder to rebuild", None, path
    finally:
        os.close(fd)
    return True, None, _read_record(Path(path).parent), path


CPP_LOADED, CPP_REASON, BUILD_INFO, LIBRARY = _load_extension()
# Read once here: resolve() and available() run inside every op call, where torch.compile(fullgraph=True) must
# trace them, so they do no file I/O and call nothing Dynamo cannot follow (docs/design.md §4).
CPP_CUDA = bool(CPP_LOADED and (BUILD_INFO or {}).get("with_cuda"))
if CHECKOUT is not None and not CPP_LOADED and _shadowed_install():
    # Running from a checkout must not silently replace an installed package by an unbuilt one.
    warnings.warn(CPP_REASON, RuntimeWarning, stacklevel=2)
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def build_info() -> dict | None:
    """The build record of the loaded library (torch version, CUDA, arch list, flags), or None if none."""
    return BUILD_INFO


def triton_status() -> tuple[bool, str | None]:
    """(available, reason). Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    if not TRITON_INSTALLED:
        return False, "triton is not installed; `pip install triton` (or gmd-ext[triton])"
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
        if device.type == "cuda" and not CPP_CUDA:
            return False, (
                "gmd_ext._C was built without CUDA kernels (no CUDA toolkit or a CPU build of torch at build "
                "time); rebuild with a CUDA torch and toolkit (GMD_EXT_FORCE_CUDA=1 makes a build without them fail)"
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
    warn_once(f"gmd_ext: falling back to the {fallback} backend: {reason}", stacklevel=4)
    return fallback


def warn_once(message: str, stacklevel: int = 3) -> None:
    """A RuntimeWarning the first time `message` comes up in this process: what was picked instead of what was
    asked for is said, once."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
