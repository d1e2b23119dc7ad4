"""Op-level tests of gram(G [K, N]) -> G Gᵀ [K, K] float32, on every backend available for CPU tensors.

fp32 results are held to the classical dot-product bound against an fp64 reference; fp16/bf16 to the
flash-attention rule (gmd_ext.testing.assert_close_rel) against plain torch at the same precision.
"""
import pytest
import torch

from gmd_ext import ops, testing
from gmd_ext.testing import assert_close_rel, call_on as _on, low_precision

CASES = testing.device_backends()  # devices x backends, absent ones skipped
EPS32 = torch.finfo(torch.float32).eps
needs_cpp = testing.needs_cpp


def _rows(K, N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, N, generator=g, dtype=torch.float64).to(dtype)


def _assert_dot_bound(out, G, what="gram"):
    """Each entry is an fp32 dot product of length N: |err| <= N·eps·Σ|g_i||g_j| (γ_N with room for rounding)."""
    G64 = G.double()
    ref, abs_ref = G64 @ G64.T, G64.abs() @ G64.abs().T
    err = (out.double() - ref).abs()
    bound = max(G.shape[1], 1) * EPS32 * abs_ref + 1e-30
    assert (err <= bound).all(), f"{what}: max error/bound {(err / bound).max().item():.3g} > 1"


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("K", [1, 2, 3, 7, 15, 32])
@pytest.mark.parametrize("N", [1, 17, 4099])
def test_fp32_matches_fp64_reference(device, backend, K, N):
    G = _rows(K, N)
    out = _on(device, ops.gram, G, backend)
    assert out.dtype == torch.float32 and out.shape == (K, K)
    _assert_dot_bound(out, G)
    if backend != "torch":  # the kernels compute one triangle and mirror it; a BLAS G Gᵀ need not be symmetric
        assert torch.equal(out, out.T), "gram must be exactly symmetric"


@pytest.mark.parametrize("device,backend", CASES)
def test_large_odd_n(device, backend):
    G = _rows(3, 2**20 + 3)
    _assert_dot_bound(_on(device, ops.gram, G, backend), G)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", low_precision)
@pytest.mark.parametrize("K,N", [(3, 4099), (15, 1000)])
def test_low_precision_flash_attention_rule(device, backend, dtype, K, N):
    G = _rows(K, N, dtype)
    G64 = G.double()
    ref = G64 @ G64.T
    baseline = G @ G.T  # plain torch at the input precision
    assert_close_rel(_on(device, ops.gram, G, backend), ref, baseline, what=f"gram {dtype}")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("K", [0, 4])
def test_empty(device, backend, K):
    out = _on(device, ops.gram, torch.empty(K, 0), backend)
    assert out.shape == (K, K) and out.dtype == torch.float32
    assert (out == 0).all()


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["column_slice", "transposed", "row_slice", "step2", "expanded"])
def test_non_contiguous(device, backend, dtype, layout):
    K, N = 5, 1031
    base = _rows(2 * K, 2 * N + 1, dtype)
    view = {
        "column_slice": lambda b: b[:K, :N],  # row stride != N
        "transposed": lambda b: b[:K, :N].T.contiguous().T,  # column-major
        "row_slice": lambda b: b[::2, :N],  # every other row
        "step2": lambda b: b[:K, : 2 * N : 2],  # column stride 2
        "expanded": lambda b: b[0, :N].expand(K, N),  # row stride 0
    }[layout]
    # The view is taken on the device: moving a strided view would give the kernel a contiguous copy.
    G, Gd = view(base), view(base.to(device))
    assert not Gd.is_contiguous()
    out = ops.gram(Gd, backend).cpu()
    expected = _on(device, ops.gram, G.contiguous(), backend)
    torch.testing.assert_close(out, expected, rtol=4 * N * EPS32, atol=0)
    if dtype == torch.float32:
        _assert_dot_bound(out, G)


@pytest.mark.parametrize("device,backend", CASES)
def test_zero_rows_and_scales(device, backend):
    G = _rows(6, 2000)
    G[2] = 0
    G[4] *= 1e6
    G[5] = -G[0]  # anti-parallel
    out = _on(device, ops.gram, G, backend)
    assert (out[2] == 0).all() and (out[:, 2] == 0).all()
    _assert_dot_bound(out, G)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_propagates(device, backend, bad):
    G = _rows(4, 700)
    G[1, 333] = bad
    out = _on(device, ops.gram, G, backend)
    assert not torch.isfinite(out[1]).any() and not torch.isfinite(out[:, 1]).any()
    keep = torch.tensor([0, 2, 3])
    assert torch.isfinite(out[keep][:, keep]).all(), "a non-finite row must not leak into the other entries"


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_matches_reference(device, backend, dtype):
    G = _rows(4, 300, dtype).requires_grad_()
    W = torch.randn(4, 4, dtype=torch.float32)
    (_on(device, ops.gram, G, backend) * W).sum().backward()
    G_ref = G.detach().double().requires_grad_()
    ((G_ref @ G_ref.T) * W.double()).sum().backward()
    assert G.grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(G.grad.double(), G_ref.grad, rtol=1e-5, atol=1e-5)
    else:
        baseline = ((W + W.T).to(dtype) @ G.detach())  # plain torch at the input precision
        assert_close_rel(G.grad, G_ref.grad, baseline, what="d gram / dG")


@needs_cpp
def test_gradcheck_fp32():
    G = _rows(3, 9).requires_grad_()
    assert torch.autograd.gradcheck(torch.ops.gmd_ext.gram, (G,), eps=1e-2, atol=1e-2, rtol=1e-2)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck(dtype):
    G = _rows(5, 77, dtype)
    torch.library.opcheck(torch.ops.gmd_ext.gram.default, (G,))
    torch.library.opcheck(torch.ops.gmd_ext.gram.default, (G.requires_grad_(),))


@needs_cpp
@pytest.mark.parametrize("G,exc,pattern", [
    (torch.zeros(2, 3, 4), ValueError, "G must be a 2-D"),
    (torch.zeros(5), ValueError, "G must be a 2-D"),
    (torch.zeros(2, 3, dtype=torch.float64), TypeError, "G must be float32, float16 or bfloat16"),
    (torch.zeros(2, 3, dtype=torch.int32), TypeError, "G must be float32, float16 or bfloat16"),
])
def test_bad_input(G, exc, pattern):
    with pytest.raises(exc, match=pattern):
        torch.ops.gmd_ext.gram(G)


@needs_cpp
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_simd_path(capability):
    """The CPU kernels pick their SIMD path from ATEN_CPU_CAPABILITY: run each in a subprocess."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, gmd_ext\n"
        "from gmd_ext.ops import reference as R\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
        "    for K, N in ((1, 5), (7, 4099), (16, 3001)):\n"
        "        G = torch.randn(K, N, generator=g).to(dt)\n"
        "        G64 = G.double()\n"
        "        out = torch.ops.gmd_ext.gram(G).double()\n"
        "        bound = N * torch.finfo(torch.float32).eps * (G64.abs() @ G64.abs().T)\n"
        "        assert ((out - G64 @ G64.T).abs() <= bound).all(), (dt, K, N)\n"
        "        c, A = torch.randn(K, generator=g), torch.randn(3, K, generator=g)\n"
        "        torch.testing.assert_close(torch.ops.gmd_ext.combine(G, c, None, 0.5, 1.0),\n"
        "                                   R.combine(G, c, None, 0.5, 1.0), rtol=1e-2, atol=1e-3)\n"
        "        torch.testing.assert_close(torch.ops.gmd_ext.combine_rows(G, A), R.combine_rows(G, A),\n"
        "                                   rtol=1e-2, atol=1e-3)\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
