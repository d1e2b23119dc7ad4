"""`python -m gmd_ext.info`: which gmd_ext is imported, whether its compiled kernels loaded (and if not, the command
that fixes it), how they were built, and which backends can run here."""
from __future__ import annotations

import json
import platform
import sys

import torch

from gmd_ext import _backend, _build


def report() -> dict:
    """Build info and backend availability per device type, without initialising a GPU unless one exists."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    backends = {}
    for dev in devices:
        for name in ("cpp", "triton", "torch"):
            ok, reason = _backend.available(name, torch.device(dev))
            backends[f"{name}/{dev}"] = "available" if ok else f"unavailable: {reason}"
    return {
        "gmd_ext": __import__("gmd_ext").__version__,
        "package": str(_backend.PACKAGE_DIR),
        "kernels": ({"loaded": True, "library": _backend.LIBRARY} if _backend.CPP_LOADED else
                    {"loaded": False, "reason": _backend.CPP_REASON}),
        # Where an installed package builds its kernels on demand (GMD_EXT_CACHE_DIR); trusted only when private.
        "kernel_cache": _build.cache_root(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "build": _backend.build_info(),
        "backends": backends,
    }


def main() -> int:
    """Print the report; without the compiled kernels, end with the reason in plain words and exit status 1."""
    info = report()
    print(json.dumps(info, indent=2))
    if not _backend.CPP_LOADED:
        print(f"\nThe C++ kernels are NOT loaded: every op runs its slower fallback.\n{_backend.CPP_REASON}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
