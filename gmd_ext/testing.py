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


def assert_grads_close_rel(outs, leaves, names, *, factor=3.0, atol=1e-6):
    """assert_close_rel for gradients: outs = (out, ref, baseline) as for assert_close_rel, leaves = their input
    tensors (three parallel sequences, named by `names`). All three are backpropagated with one random cotangent
    (drawn like ref from the global RNG, cast to each output's dtype); factor 3 is flash-attention's backward bound.
    """
    g = torch.randn_like(outs[1])
    grads = [torch.autograd.grad(o, ls, g.to(o.dtype)) for o, ls in zip(outs, leaves)]
    for name, (got, want, plain) in zip(names, zip(*grads)):
        assert_close_rel(got, want, plain, factor=factor, atol=atol, what=f"grad {name}")


def present_mask(kind: str, B: int, M: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A presence mask bool [B, M] for the DS test matrix.

    kind: "all"; "modality_absent" (modality 1 missing from every sample); "one_modality" (only modality 0, plus
    the pair (0, 2): too unbalanced for a grouped layout; needs M >= 3); "random" (each pair present with
    probability 1/2, every sample keeping at least one modality).
    """
    if kind == "all":
        return torch.ones(B, M, dtype=torch.bool)
    if kind == "modality_absent":
        p = torch.ones(B, M, dtype=torch.bool)
        p[:, 1] = False
        return p
    if kind == "one_modality":
        p = torch.zeros(B, M, dtype=torch.bool)
        p[:, 0] = True
        p[0, 2] = True
        return p
    if kind == "random":
        p = torch.rand(B, M, generator=generator) < 0.5
        p[torch.arange(B), torch.randint(M, (B,), generator=generator)] = True
        return p
    raise ValueError(f"present_mask: kind must be one of all, modality_absent, one_modality, random; got {kind!r}")
