"""Shared test matrix (devices, dtypes, backends) and the low-precision error rule used by the test suite."""
from __future__ import annotations

import torch

from gmd_ext import _backend

dtypes = (torch.float32, torch.float16, torch.bfloat16)
low_precision = (torch.float16, torch.bfloat16)


def devices() -> list[torch.device]:
    """CPU always; CUDA only when present (queried lazily, never at import)."""
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out.append(torch.device("cuda"))
    return out


def backends_for(device) -> list[str]:
    """Every backend that can run on `device` in this environment."""
    device = torch.device(device)
    return [b for b in ("cpp", "triton", "torch") if _backend.available(b, device)[0]]


def assert_close_rel(out, ref, baseline, *, factor=2.0, atol=1e-6, what="output"):
    """Flash-attention rule: |out - ref| <= factor * |baseline - ref| (+ atol), elementwise max.

    ref: the high-precision (fp32/fp64) reference; baseline: plain torch computing the same thing in the same
    low precision as `out`.
    """
    ref = ref.double()
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    base = (baseline.double() - ref).abs().max().item() if baseline.numel() else 0.0
    assert err <= factor * base + atol, f"{what}: max error {err:.3e} > {factor} x baseline error {base:.3e} + {atol:g}"
