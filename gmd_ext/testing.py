"""Shared test matrix (devices, dtypes, backends) and the low-precision error rule used by the test suite."""
from __future__ import annotations

import torch

from gmd_ext import _backend

dtypes = (torch.float32, torch.float16, torch.bfloat16)
low_precision = (torch.float16, torch.bfloat16)

# The device axis of the test matrix. "cuda:1" is the second GPU: a kernel that launches without a device guard
# runs on the current device (cuda:0) and reads another device's memory there.
DEVICE_IDS = ("cpu", "cuda", "cuda:1")
BACKEND_IDS = ("cpp", "triton", "torch")


def device_status(device) -> tuple[bool, str | None]:
    """(present, reason_if_not) for a device id such as "cpu", "cuda", "cuda:1". Queries CUDA lazily (never at
    import), without creating a CUDA context."""
    device = torch.device(device)
    if device.type == "cpu":
        return True, None
    if device.type != "cuda":
        return False, f"no test matrix entry for {device.type} devices"
    if not torch.cuda.is_available():
        return False, "CUDA is not available (CPU-only torch or no GPU)"
    index = device.index or 0
    count = torch.cuda.device_count()
    if index >= count:
        return False, f"{device} needs {index + 1} GPUs, {count} present"
    return True, None


def devices() -> list[torch.device]:
    """The devices of DEVICE_IDS present here: CPU always, CUDA (and cuda:1) only when present."""
    return [torch.device(d) for d in DEVICE_IDS if device_status(d)[0]]


def backends_for(device) -> list[str]:
    """Every backend that can run on `device` in this environment."""
    device = torch.device(device)
    return [b for b in BACKEND_IDS if _backend.available(b, device)[0]]


def case_status(device, backend: str) -> tuple[bool, str | None]:
    """(runnable, reason_if_not) for one (device, backend) cell of the matrix."""
    ok, reason = device_status(device)
    if not ok:
        return False, reason
    ok, reason = _backend.available(backend, torch.device(device))
    return ok, (None if ok else f"{backend} on {device}: {reason}")


def device_backends(backends=BACKEND_IDS, devices=DEVICE_IDS) -> list:
    """pytest parameters (device: str, backend: str) for every cell of devices × backends, with ids such as
    "cpu-cpp" or "cuda:1-triton".

    Every cell is collected on every machine, so a CPU box lists the CUDA cases and skips them with the reason
    (a suite that only ever builds CPU tensors re-tests the CPU paths on a GPU machine). Use as
    `@pytest.mark.parametrize("device,backend", device_backends())`; the test builds its tensors on `device`.
    """
    import pytest  # only the test suite needs pytest

    params = []
    for d in devices:
        for b in backends:
            ok, reason = case_status(d, b)
            marks = () if ok else (pytest.mark.skip(reason=reason),)
            params.append(pytest.param(d, b, id=f"{d}-{b}", marks=marks))
    return params


def device_params(devices=DEVICE_IDS) -> list:
    """pytest parameters (device: str) for every entry of DEVICE_IDS, skipped where absent; for tests that are
    about a device rather than a backend."""
    import pytest

    params = []
    for d in devices:
        ok, reason = device_status(d)
        params.append(pytest.param(d, id=d, marks=() if ok else (pytest.mark.skip(reason=reason),)))
    return params


def call_on(device, fn, *args, **kwargs):
    """fn(*args, **kwargs) with every tensor argument moved to `device` and tensor results moved back to the CPU:
    a CPU-written test runs its op on any device of the matrix and compares on the host. Differentiable (.to is),
    so gradients reach the CPU leaves."""
    device = torch.device(device)

    def there(a):
        return a.to(device) if isinstance(a, torch.Tensor) else a

    out = fn(*map(there, args), **{k: there(v) for k, v in kwargs.items()})
    if isinstance(out, torch.Tensor):
        return out.cpu()
    if isinstance(out, tuple):
        return tuple(o.cpu() if isinstance(o, torch.Tensor) else o for o in out)
    return out


def synchronize(device) -> None:
    """Wait for the work queued on `device` (a no-op on CPU): tests time nothing, but a kernel error on CUDA only
    surfaces at a synchronisation point."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def __getattr__(name: str):
    """`needs_cpp`: the pytest mark that skips a test when the C++ extension is not built, with the reason (built on
    first use, so importing this module needs no pytest)."""
    if name == "needs_cpp":
        import pytest

        return pytest.mark.skipif(not _backend.CPP_LOADED, reason=f"C++ extension not built: {_backend.CPP_REASON}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
