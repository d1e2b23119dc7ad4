"""`python -m gmd_ext.info`: which backends can run here, and how the extension was built."""
from __future__ import annotations

import json
import platform

import torch

from gmd_ext import _backend


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
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "build": _backend.build_info(),
        "backends": backends,
    }


def main():
    print(json.dumps(report(), indent=2))


if __name__ == "__main__":
    main()
