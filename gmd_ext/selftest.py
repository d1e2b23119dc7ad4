"""`python -m gmd_ext.selftest`: every available backend on every available device against float64 references, at
small sizes, printed as a table. Run it after installing, on the machine that will train (a GPU included): it
exercises the kernels this build and this torch actually load. Exit status 1 if any check fails.

Each check draws random inputs (odd sizes: the vector paths' tails run too) and compares ‖out − ref‖ / ‖ref‖ with a
float64 reference (gmd_ext.ops.reference on upcast inputs); NaN never passes. Tolerances: 1e-5 for fp32 results
(Γ included, also from bf16 inputs: their products are exact), 1e-2 for bf16 outputs (one bf16 rounding is up to
4e-3 relative), 10x those for the group-norm input gradient.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from gmd_ext import _backend, ops
from gmd_ext.ops import reference

_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
BACKENDS = ("cpp", "triton", "torch")


def present_devices() -> list[torch.device]:
    """CPU and every visible GPU (the selftest is for the user's machine: all of its devices)."""
    cuda = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return [torch.device("cpu"), *cuda]


def _present(B: int, M: int, g: torch.Generator) -> torch.Tensor:
    """A random presence mask [B, M] in which every sample keeps at least one modality."""
    p = torch.rand(B, M, generator=g) < 0.5
    p[torch.arange(B), torch.randint(M, (B,), generator=g)] = True
    return p


@dataclass
class Check:
    device: str
    backend: str
    op: str
    dtype: str
    error: float | None  # relative error; None when the check raised or could not run
    ok: bool
    note: str = ""


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _cases(device: torch.device, backend: str, dtype: torch.dtype, g: torch.Generator):
    """(op name, callable returning (out, ref, tolerance)) for every op at one (device, backend, dtype)."""
    K, N = 7, 4099  # odd N: the vector paths' tails run too
    G = torch.randn(K, N, generator=g, dtype=torch.float64).to(dtype)
    G64 = G.double()
    perms = torch.stack([torch.randperm(K, generator=g) for _ in range(K)])
    shared = torch.rand(N, generator=g) < 0.5
    Gd, permsd, sharedd = G.to(device), perms.to(device), shared.to(device)
    tol = _TOL[dtype]

    def gram():
        return ops.gram(Gd, backend), G64 @ G64.T, 1e-5

    def pcgrad():
        gram64 = (G64 @ G64.T).float()
        out = ops.pcgrad_coefficients(gram64.to(device), permsd, backend)
        return out, reference.pcgrad_coefficients(gram64.double(), perms), 1e-5

    def combine():
        c = torch.randn(K, generator=g)
        scale = torch.where(shared, 1.0 / K, 1.0).double()
        return ops.combine(Gd, c.to(device), sharedd, 1.0 / K, 1.0, backend), scale * (c.double() @ G64), tol

    def combine_rows():
        A = torch.randn(3, K, generator=g)
        return ops.combine_rows(Gd, A.to(device), backend), A.double() @ G64, tol

    def group_norm():
        B, M, C = 2, 3, 8
        x = torch.randn(B, M, C, 5, 7, generator=g, dtype=torch.float64).to(dtype)
        w, b = torch.randn(M, C, generator=g), torch.randn(M, C, generator=g)
        present = _present(B, M, g)
        out = ops.modality_group_norm(x.to(device), w.to(device), b.to(device), present.to(device), num_groups=4,
                                      activation="leaky_relu", backend=backend)
        ref = reference.modality_group_norm_reference(x.double(), w.double(), b.double(), present, num_groups=4,
                                                      activation="leaky_relu")
        return out, ref, tol

    def group_norm_grad():
        B, M, C = 2, 3, 8
        x = torch.randn(B, M, C, 5, 7, generator=g, dtype=torch.float64)
        w, b = torch.randn(M, C, generator=g, dtype=torch.float64), torch.randn(M, C, generator=g, dtype=torch.float64)
        present = _present(B, M, g)
        gy = torch.randn(B, M, C, 5, 7, generator=g, dtype=torch.float64)
        xd = x.to(dtype).to(device).requires_grad_()
        out = ops.modality_group_norm(xd, w.float().to(device), b.float().to(device), present.to(device),
                                      num_groups=4, activation="relu", backend=backend)
        (dx,) = torch.autograd.grad(out, xd, gy.to(device, out.dtype))
        x64 = x.to(dtype).double().requires_grad_()
        ref = reference.modality_group_norm_reference(x64, w, b, present, num_groups=4, activation="relu")
        (dx64,) = torch.autograd.grad(ref, x64, gy)
        return dx, dx64, 10 * tol

    return [("gram", gram), ("pcgrad_coefficients", pcgrad), ("combine", combine), ("combine_rows", combine_rows),
            ("modality_group_norm", group_norm), ("modality_group_norm.backward", group_norm_grad)]


def run(devices=None, backends=None, seed: int = 0) -> list[Check]:
    """Run every check; devices / backends default to all that are present here (present_devices(), BACKENDS).
    A backend that is unavailable on a device gives one row saying why."""
    rows = []
    for device in [torch.device(d) for d in (devices or present_devices())]:
        for backend in backends or BACKENDS:
            ok, reason = _backend.available(backend, device)
            if not ok:
                rows.append(Check(str(device), backend, "-", "-", None, True, f"skipped: {reason}"))
                continue
            for dtype in (torch.float32, torch.bfloat16):
                g = torch.Generator().manual_seed(seed)
                for name, case in _cases(device, backend, dtype, g):
                    if name == "pcgrad_coefficients" and dtype != torch.float32:
                        continue  # Γ is float32 whatever G's dtype
                    try:
                        out, ref, tol = case()
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        err = _rel(out, ref)
                        rows.append(Check(str(device), backend, name, str(dtype).removeprefix("torch."), err,
                                          err < tol, f"tol {tol:g}"))
                    except Exception as e:  # noqa: BLE001  (a failing kernel is a row of the report, not a crash)
                        rows.append(Check(str(device), backend, name, str(dtype).removeprefix("torch."), None, False,
                                          f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
    return rows


def table(rows: list[Check]) -> str:
    """The rows as a markdown table."""
    lines = ["| device | backend | op | dtype | rel. error | result | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        err = "-" if r.error is None else f"{r.error:.2e}"
        result = "ok" if r.ok else "FAIL"
        lines.append(f"| {r.device} | {r.backend} | {r.op} | {r.dtype} | {err} | {result} | {r.note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gmd_ext.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", action="append", help="a device to test (repeatable; default: all present)")
    parser.add_argument("--backend", action="append", choices=BACKENDS,
                        help="a backend to test (repeatable; default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = run(args.device, args.backend, args.seed)
    print(table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed" + (f", {len(failed)} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
