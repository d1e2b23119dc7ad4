"""project_conflicts against the literal official loop (gmd_ext.ops.reference.pairwise_pcgrad), every backend."""
import os

import pytest
import torch

import gmd_ext
from gmd_ext import _backend, testing
from gmd_ext.gmd.projection import make_perms
from gmd_ext.ops.reference import pairwise_pcgrad

# devices x backends (gmd_ext.testing): every cell collected everywhere, absent devices and backends skipped with
# the reason. Inputs are drawn on the CPU and moved, so every device sees the same values; orders stay host tensors
# (project_conflicts copies them without a sync); results are compared on the CPU.
CASES = testing.device_backends()
# The triton interpreter executes every program in Python: keep its problem sizes small.
SMALL_N = (0, 1, 17, 4099)
NOT_INTERPRETED = [c for c in CASES if c.values != ("cpu", "triton")]


def _grads(K, N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(K, N, generator=g)
    if K >= 3 and N:
        G[1] = -0.5 * G[0] + 0.1 * G[1]  # a strong conflict, so projections really happen
    return G.to(dtype)


def _perms(K, seed=0):
    return make_perms("random", K, torch.Generator().manual_seed(seed))


def _shared(N, seed=0):
    return torch.rand(N, generator=torch.Generator().manual_seed(seed + 1)) > 0.3


def _check_fp32(out, ref):
    out = out.cpu()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def test_cpp_backend_built_when_required():
    # CI sets GMD_EXT_REQUIRE_CPP=1: a missing build must fail there, not silently skip the C++ kernels.
    if os.environ.get("GMD_EXT_REQUIRE_CPP") == "1":
        assert _backend.CPP_LOADED, _backend.CPP_REASON


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("K", [1, 2, 3, 7, 15, 32])
@pytest.mark.parametrize("N", SMALL_N)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_official_loop(device, backend, K, N, reduction):
    G, perms, shared = _grads(K, N), _perms(K), _shared(N)
    Gd = G.to(device)
    out = gmd_ext.project_conflicts(Gd, shared=shared.to(device), order=perms, reduction=reduction, backend=backend)
    assert out.device == Gd.device
    assert out.dtype == G.dtype and out.shape == ((K, N) if reduction == "none" else (N,))
    _check_fp32(out, pairwise_pcgrad(G, perms, shared, reduction))


@pytest.mark.parametrize("device,backend", NOT_INTERPRETED)
@pytest.mark.parametrize("K", [3, 15])
def test_large_odd_n(device, backend, K):
    N = 2**20 + 3
    G, perms, shared = _grads(K, N), _perms(K), _shared(N)
    out = gmd_ext.project_conflicts(G.to(device), shared=shared.to(device), order=perms, backend=backend)
    _check_fp32(out, pairwise_pcgrad(G, perms, shared, "mean"))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("order", ["sequential", "random"])
@pytest.mark.parametrize("shared_kind", ["none", "mixed"])
def test_order_modes(device, backend, order, shared_kind):
    K, N = 7, 333
    G = _grads(K, N)
    shared = _shared(N) if shared_kind == "mixed" else None
    Gd, shared_d = G.to(device), None if shared is None else shared.to(device)
    if order == "sequential":
        perms = torch.arange(K).repeat(K, 1)
        out = gmd_ext.project_conflicts(Gd, shared=shared_d, order="sequential", backend=backend)
    else:
        out = gmd_ext.project_conflicts(Gd, shared=shared_d, order="random", backend=backend,
                                        generator=torch.Generator().manual_seed(5))
        perms = make_perms("random", K, torch.Generator().manual_seed(5))  # the same draws
    _check_fp32(out, pairwise_pcgrad(G, perms, shared, "mean"))


def test_random_order_is_seeded_and_varies():
    G = _grads(7, 100)
    a = gmd_ext.project_conflicts(G, generator=torch.Generator().manual_seed(1), backend="torch")
    b = gmd_ext.project_conflicts(G, generator=torch.Generator().manual_seed(1), backend="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    perms1 = make_perms("random", 7, torch.Generator().manual_seed(1))
    perms2 = make_perms("random", 7, torch.Generator().manual_seed(2))
    assert not torch.equal(perms1, perms2)
    assert all(sorted(row) == list(range(7)) for row in perms1.tolist())


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", testing.low_precision)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_flash_attention_rule(device, backend, dtype, reduction):
    K, N = 7, 4099
    G, perms, shared = _grads(K, N, dtype), _perms(K), _shared(N)
    out = gmd_ext.project_conflicts(G.to(device), shared=shared.to(device), order=perms, reduction=reduction,
                                    backend=backend).cpu()
    assert out.dtype == dtype
    ref = pairwise_pcgrad(G, perms, shared, reduction)  # float64 on the same low-precision inputs
    baseline = pairwise_pcgrad(G, perms, shared, reduction, compute_dtype=dtype)  # plain torch, same precision
    testing.assert_close_rel(out, ref, baseline, what=f"{backend} {dtype}")


@pytest.mark.parametrize("device,backend", CASES)
def test_non_contiguous_and_list_inputs(device, backend):
    K, N = 5, 301
    base_h = _grads(N, K)
    base = base_h.to(device).T  # [K, N] view with strides (1, K), made on the device
    assert not base.is_contiguous()
    perms = _perms(K)
    ref = pairwise_pcgrad(base_h.T, perms)
    _check_fp32(gmd_ext.project_conflicts(base, order=perms, backend=backend), ref)
    wide = _grads(K, 2 * N)
    every_other = wide.to(device)[:, ::2]
    _check_fp32(gmd_ext.project_conflicts(every_other, order=perms, backend=backend),
                pairwise_pcgrad(wide[:, ::2], perms))
    rows = list(base.unbind(0))
    _check_fp32(gmd_ext.project_conflicts(rows, order=perms, backend=backend), ref)


@pytest.mark.parametrize("device,backend", CASES)
def test_special_rows(device, backend):
    K, N = 6, 1000
    G = _grads(K, N)
    G[2] = 0.0  # a zero-norm objective is skipped, never divides by zero
    G[3] = -G[0]  # anti-parallel
    G[4] = 3.0 * G[1]  # parallel
    G[5] *= 1e6  # rows differing in scale by 1e6
    perms = _perms(K)
    out, info = gmd_ext.project_conflicts(G.to(device), order=perms, backend=backend, return_info=True)
    assert torch.isfinite(out).all()
    _check_fp32(out, pairwise_pcgrad(G, perms))
    assert info.norms[2] == 0 and (info.cosines[2] == 0).all()
    cosines = info.cosines.cpu()
    torch.testing.assert_close(cosines[0, 3], torch.tensor(-1.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(cosines[1, 4], torch.tensor(1.0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device,backend", CASES)
def test_info(device, backend):
    K, N = 7, 500
    G, perms = _grads(K, N), _perms(K)
    merged, info = gmd_ext.project_conflicts(G.to(device), order=perms, reduction="mean", backend=backend,
                                             return_info=True)
    G64 = G.double()
    torch.testing.assert_close(info.gram.double().cpu(), G64 @ G64.T, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(info.norms.double().cpu(), G64.norm(dim=1), rtol=1e-5, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(G64[:, None], G64[None], dim=-1)
    torch.testing.assert_close(info.cosines.double().cpu(), cos, rtol=1e-4, atol=1e-5)
    assert info.num_conflicts == int(((G64 @ G64.T) < 0).triu(1).sum())
    # projected = A @ G reproduces the official per-objective projected gradients
    _check_fp32(info.coefficients.cpu() @ G, pairwise_pcgrad(G, perms, reduction="none"))
    assert set(info.keys()) == {"gram", "coefficients", "cosines", "norms", "num_conflicts"}


@pytest.mark.parametrize("device,backend", CASES)
def test_gram_export(device, backend):
    G = _grads(4, 777)
    Gd = G.to(device)
    torch.testing.assert_close(gmd_ext.gram(Gd, backend=backend).double().cpu(), G.double() @ G.double().T,
                               rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gmd_ext.gram(list(Gd), backend=backend), gmd_ext.gram(Gd, backend=backend))


@pytest.mark.parametrize("device,backend", CASES)
def test_compile_fullgraph(device, backend):
    K, N = 5, 257
    G, perms, shared = _grads(K, N), _perms(K), _shared(N)
    torch._dynamo.reset()
    fn = torch.compile(lambda G, p, s: gmd_ext.project_conflicts(G, shared=s, order=p, backend=backend),
                       fullgraph=True)
    _check_fp32(fn(G.to(device), perms.to(device), shared.to(device)), pairwise_pcgrad(G, perms, shared))


def test_backend_env_and_errors(monkeypatch):
    G = _grads(3, 10)
    monkeypatch.setenv("GMD_EXT_BACKEND", "torch")
    _check_fp32(gmd_ext.project_conflicts(G, order="sequential"), pairwise_pcgrad(G, torch.arange(3).repeat(3, 1)))
    monkeypatch.setenv("GMD_EXT_BACKEND", "fast")
    with pytest.raises(ValueError, match="GMD_EXT_BACKEND"):
        gmd_ext.project_conflicts(G)
    monkeypatch.delenv("GMD_EXT_BACKEND")
    with pytest.raises(ValueError, match="backend"):
        gmd_ext.project_conflicts(G, backend="fast")
    if not _backend.CPP_LOADED:
        with pytest.raises(RuntimeError, match="not built"):
            gmd_ext.project_conflicts(G, backend="cpp")
    with pytest.raises(RuntimeError, match="triton"):
        _backend.resolve("triton", "meta")


@pytest.mark.parametrize(
    "make, exc, pattern",
    [
        (lambda: torch.empty(0, 5), ValueError, "K = 0"),
        (lambda: [], ValueError, "K = 0"),
        (lambda: torch.randn(2, 3, 4), ValueError, "3-D"),
        (lambda: [torch.randn(5), torch.randn(6)], ValueError, r"grads\[1\] has 6"),
        (lambda: torch.randint(0, 3, (2, 5)), TypeError, "int64"),
        (lambda: torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, "finite"),
        (lambda: torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), ValueError, "finite"),
    ],
)
def test_bad_grads(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        gmd_ext.project_conflicts(make(), order="sequential")


def test_bad_arguments():
    G = _grads(3, 10)
    with pytest.raises(ValueError, match=r"shared must have shape \[10\]"):
        gmd_ext.project_conflicts(G, shared=torch.ones(9, dtype=torch.bool))
    with pytest.raises(TypeError, match="shared must be a bool"):
        gmd_ext.project_conflicts(G, shared=torch.ones(10))
    with pytest.raises(ValueError, match="order row 1 must be a permutation"):
        gmd_ext.project_conflicts(G, order=torch.tensor([[0, 1, 2], [0, 0, 2], [2, 1, 0]]))
    with pytest.raises(ValueError, match=r"order must have shape \[3, 3\]"):
        gmd_ext.project_conflicts(G, order=torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="order must be an int64"):
        gmd_ext.project_conflicts(G, order=torch.zeros(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="order must be"):
        gmd_ext.project_conflicts(G, order="shuffled")
    with pytest.raises(ValueError, match="reduction must be"):
        gmd_ext.project_conflicts(G, reduction="max")
