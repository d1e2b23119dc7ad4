"""Op-level tests of combine(G, c, shared, shared_scale, other_scale) -> [N] and combine_rows(G, A) -> A @ G,
on every backend available for CPU tensors, against fp64 references (fp16/bf16 by the flash-attention rule).
"""
import pytest
import torch

from gmd_ext import ops, testing
from gmd_ext.testing import assert_close_rel, call_on as _on, low_precision

CASES = testing.device_backends()  # devices x backends, absent ones skipped
EPS32 = torch.finfo(torch.float32).eps
needs_cpp = testing.needs_cpp


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rows(K, N, dtype=torch.float32, seed=0):
    return torch.randn(K, N, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _shared(N, kind, seed=1):
    if kind == "none":
        return None
    return torch.rand(N, generator=_gen(seed)) > 0.4


def _ref_combine(G, c, shared, s, o):
    """fp64 reference on the same (rounded) inputs."""
    out = c.double() @ G.double()
    scale = torch.full_like(out, s) if shared is None else torch.where(shared, s, o).double()
    return out * scale


def _assert_lincomb_bound(out, coef, G, what):
    """fp32 sums of K products: |err| <= (K + 1)·eps·Σ|c_k g_kn| + the rounding of the result."""
    ref = coef.double() @ G.double()
    bound = (G.shape[0] + 2) * EPS32 * (coef.double().abs() @ G.double().abs()) + 1e-30
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"{what}: max error/bound {(err / bound).max().item():.3g} > 1"


# ---------------------------------------------------------------- combine
@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("K", [1, 2, 3, 7, 15, 32])
@pytest.mark.parametrize("N", [1, 17, 4099])
@pytest.mark.parametrize("shared_kind", ["none", "mixed"])
def test_combine_fp32(device, backend, K, N, shared_kind):
    G, c, shared = _rows(K, N), torch.randn(K, generator=_gen(K)), _shared(N, shared_kind)
    s, o = 1.0 / K, 1.0
    out = _on(device, ops.combine, G, c, shared, s, o, backend)
    assert out.dtype == torch.float32 and out.shape == (N,)
    scale = torch.full((N,), s, dtype=torch.float64) if shared is None else torch.where(shared, s, o).double()
    _assert_lincomb_bound(out / scale, c, G, "combine")


# Not triton: the interpreter needs ~9 s for this size on the 2-core box; tests/test_triton.py covers its slicing.
@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] != "triton"])
def test_combine_large_odd_n(device, backend):
    N = 2**20 + 3
    G, c, shared = _rows(3, N), torch.randn(3, generator=_gen(3)), _shared(N, "mixed")
    out = _on(device, ops.combine, G, c, shared, 0.25, 2.0, backend)
    scale = torch.where(shared, 0.25, 2.0).double()
    _assert_lincomb_bound(out / scale, c, G, "combine")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", low_precision)
@pytest.mark.parametrize("shared_kind", ["none", "mixed"])
def test_combine_low_precision_flash_attention_rule(device, backend, dtype, shared_kind):
    K, N = 7, 4099
    G, c, shared = _rows(K, N, dtype), torch.randn(K, generator=_gen(5)), _shared(N, shared_kind)
    s, o = 1.0 / K, 1.0
    out = _on(device, ops.combine, G, c, shared, s, o, backend)
    assert out.dtype == dtype
    ref = _ref_combine(G, c, shared, s, o)
    # Plain torch at the input precision: the same formula with every operand and result in `dtype`.
    scale = torch.full((N,), s, dtype=dtype) if shared is None else torch.where(shared, s, o).to(dtype)
    baseline = (c.to(dtype) @ G) * scale
    assert_close_rel(out, ref, baseline, what=f"combine {dtype}")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("K,N", [(3, 0), (0, 5), (1, 1)])
def test_combine_edge_shapes(device, backend, K, N):
    G, c = _rows(K, N), torch.randn(K, generator=_gen(0))
    out = _on(device, ops.combine, G, c, _shared(N, "mixed"), 0.5, 1.0, backend)
    assert out.shape == (N,) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _ref_combine(G, c, _shared(N, "mixed"), 0.5, 1.0))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("layout", ["column_slice", "transposed", "step2"])
def test_combine_non_contiguous(device, backend, layout):
    K, N = 5, 1031
    base = _rows(2 * K, 2 * N + 1)
    view = {"column_slice": lambda b: b[:K, :N], "transposed": lambda b: b[:K, :N].T.contiguous().T,
            "step2": lambda b: b[:K, : 2 * N : 2]}[layout]
    c_full = torch.randn(2 * K, generator=_gen(2))
    shared_full = torch.rand(2 * N, generator=_gen(3)) > 0.5
    # Views taken on the device (moving a strided view would give the kernel a contiguous copy); non-contiguous
    # coefficients and mask too.
    G, c, shared = view(base), c_full[::2], shared_full[::2]
    Gd, cd, shared_d = view(base.to(device)), c_full.to(device)[::2], shared_full.to(device)[::2]
    assert not Gd.is_contiguous()
    out = ops.combine(Gd, cd, shared_d, 0.2, 1.0, backend).cpu()
    expected = _on(device, ops.combine, G.contiguous(), c.contiguous(), shared.contiguous(), 0.2, 1.0, backend)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", CASES)
def test_combine_zero_rows_and_nan(device, backend):
    G = _rows(4, 600)
    G[1] = 0
    G[2, 100] = float("nan")
    c = torch.tensor([1.0, 2.0, 0.5, -1.0])
    out = _on(device, ops.combine, G, c, None, 1.0, 1.0, backend)
    assert torch.isnan(out[100])
    keep = torch.arange(600) != 100
    assert torch.isfinite(out[keep]).all(), "NaN must stay in its own column"
    _assert_lincomb_bound(out[keep], c, G[:, keep], "combine")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_autograd_matches_reference(device, backend, dtype):
    K, N = 4, 300
    G = _rows(K, N, dtype).requires_grad_()
    c = torch.randn(K, generator=_gen(7)).requires_grad_()
    shared = _shared(N, "mixed")
    w = torch.randn(N, generator=_gen(8))
    (_on(device, ops.combine, G, c, shared, 0.25, 1.0, backend).float() * w).sum().backward()
    G64, c64 = G.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    (_ref_combine(G64, c64, shared, 0.25, 1.0) * w.double()).sum().backward()
    assert G.grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(c.grad.double(), c64.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(G.grad.double(), G64.grad, rtol=1e-6, atol=1e-6)
    else:
        # The output gradient reaches the op in `dtype`; baselines: plain torch with every operand in `dtype`.
        g = (w * torch.where(shared, 0.25, 1.0)).to(dtype)
        assert_close_rel(c.grad, c64.grad, G.detach() @ g, what="d combine / dc")
        assert_close_rel(G.grad, G64.grad, c.detach().to(dtype)[:, None] * g[None, :], what="d combine / dG")


# ---------------------------------------------------------------- combine_rows
@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("K,R", [(1, 1), (3, 3), (7, 7), (15, 15), (32, 32), (5, 2), (2, 9)])
@pytest.mark.parametrize("N", [1, 17, 4099])
def test_combine_rows_fp32(device, backend, K, R, N):
    G, A = _rows(K, N), torch.randn(R, K, generator=_gen(K * R))
    out = _on(device, ops.combine_rows, G, A, backend)
    assert out.dtype == torch.float32 and out.shape == (R, N)
    _assert_lincomb_bound(out, A, G, "combine_rows")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", low_precision)
def test_combine_rows_low_precision_flash_attention_rule(device, backend, dtype):
    G, A = _rows(7, 2053, dtype), torch.randn(7, 7, generator=_gen(9))
    out = _on(device, ops.combine_rows, G, A, backend)
    assert out.dtype == dtype
    assert_close_rel(out, A.double() @ G.double(), A.to(dtype) @ G, what=f"combine_rows {dtype}")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("K,R,N", [(3, 2, 0), (0, 2, 5), (3, 0, 5)])
def test_combine_rows_edge_shapes(device, backend, K, R, N):
    G, A = _rows(K, N), torch.randn(R, K, generator=_gen(0))
    out = _on(device, ops.combine_rows, G, A, backend)
    assert out.shape == (R, N)
    torch.testing.assert_close(out.double(), A.double() @ G.double())


@pytest.mark.parametrize("device,backend", CASES)
def test_combine_rows_non_contiguous_and_nan(device, backend):
    base = _rows(8, 2 * 999 + 1)
    base[4, 20] = float("nan")  # G[3, 10] below
    A_base = torch.randn(6, 8, generator=_gen(4))
    G, A = base[1:5, : 2 * 999 : 2], A_base.T[:4].T  # A: a [6, 4] view with strides (1, 8)
    Gd, Ad = base.to(device)[1:5, : 2 * 999 : 2], A_base.to(device).T[:4].T  # the same views on the device
    assert not Gd.is_contiguous() and not Ad.is_contiguous()
    out = ops.combine_rows(Gd, Ad, backend).cpu()
    ref = A.double() @ G.double()
    assert torch.isnan(out[:, 10]).all() and torch.isfinite(out[:, torch.arange(999) != 10]).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("device,backend", CASES)
def test_combine_rows_autograd_matches_reference(device, backend):
    G = _rows(5, 200).requires_grad_()
    A = torch.randn(3, 5, generator=_gen(11)).requires_grad_()
    W = torch.randn(3, 200, generator=_gen(12))
    (_on(device, ops.combine_rows, G, A, backend) * W).sum().backward()
    G64, A64 = G.detach().double().requires_grad_(), A.detach().double().requires_grad_()
    ((A64 @ G64) * W.double()).sum().backward()
    torch.testing.assert_close(G.grad.double(), G64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(A.grad.double(), A64.grad, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- registration and input checks
@needs_cpp
def test_gradcheck_fp32():
    G = _rows(3, 7).requires_grad_()
    c = torch.randn(3, generator=_gen(1)).requires_grad_()
    A = torch.randn(2, 3, generator=_gen(2)).requires_grad_()
    shared = _shared(7, "mixed")
    tol = dict(eps=1e-2, atol=1e-2, rtol=1e-2)
    assert torch.autograd.gradcheck(lambda g, c: torch.ops.gmd_ext.combine(g, c, shared, 0.5, 2.0), (G, c), **tol)
    assert torch.autograd.gradcheck(torch.ops.gmd_ext.combine_rows, (G, A), **tol)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared_kind", ["none", "mixed"])
def test_opcheck(dtype, shared_kind):
    G = _rows(4, 33, dtype).requires_grad_()
    c = torch.randn(4, generator=_gen(1)).requires_grad_()
    A = torch.randn(3, 4, generator=_gen(2)).requires_grad_()
    torch.library.opcheck(torch.ops.gmd_ext.combine.default, (G, c, _shared(33, shared_kind), 0.25, 1.0))
    torch.library.opcheck(torch.ops.gmd_ext.combine_rows.default, (G, A))


@needs_cpp
@pytest.mark.parametrize("args,exc,pattern", [
    ((torch.zeros(2, 3, 4), torch.zeros(2), None), ValueError, "G must be a 2-D"),
    ((torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2), None), TypeError, "G must be float32"),
    ((torch.zeros(2, 3), torch.zeros(3), None), ValueError, "c must be a 1-D tensor of length K = 2"),
    ((torch.zeros(2, 3), torch.zeros(2, dtype=torch.float64), None), TypeError, "c must be float32"),
    ((torch.zeros(2, 3), torch.zeros(2), torch.zeros(4, dtype=torch.bool)), ValueError,
     "shared must be a 1-D tensor of length N = 3"),
    ((torch.zeros(2, 3), torch.zeros(2), torch.zeros(3)), TypeError, "shared must be a bool tensor"),
])
def test_combine_bad_input(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        torch.ops.gmd_ext.combine(*args, 1.0, 1.0)


@needs_cpp
@pytest.mark.parametrize("G,A,exc,pattern", [
    (torch.zeros(3), torch.zeros(2, 3), ValueError, "G must be a 2-D"),
    (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(2, 3), TypeError, "G must be float32"),
    (torch.zeros(3, 4), torch.zeros(2, 4), ValueError, r"A must be a 2-D \[R, K\] tensor with K = 3"),
    (torch.zeros(3, 4), torch.zeros(3), ValueError, r"A must be a 2-D \[R, K\]"),
    (torch.zeros(3, 4), torch.zeros(2, 3, dtype=torch.float16), TypeError, "A must be float32"),
])
def test_combine_rows_bad_input(G, A, exc, pattern):
    with pytest.raises(exc, match=pattern):
        torch.ops.gmd_ext.combine_rows(G, A)
