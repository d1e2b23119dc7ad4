"""Op-level tests of pcgrad_coefficients(Γ [K, K], perms [K, K]) -> A [K, K], on every backend for CPU tensors.

Ground truth is the literal pairwise loop of the official implementation (reference.pairwise_pcgrad, fp64):
A @ G must equal the projected gradients. The K×K reference loop (reference.pcgrad_coefficients) is the
second check.
"""
import pytest
import torch

from gmd_ext import ops, testing
from gmd_ext.ops import reference
from gmd_ext.testing import call_on as _on

CASES = testing.device_backends()  # devices x backends, absent ones skipped
needs_cpp = testing.needs_cpp


def _perms(K, kind="random", seed=0):
    if kind == "sequential":
        return torch.arange(K).repeat(K, 1)
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(K, generator=g) for _ in range(K)]) if K else torch.empty(0, 0, dtype=torch.long)


def _conflicting(K, N, seed=0):
    """Rows sharing a common direction plus noise, so roughly a third of the pairs conflict."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(N, generator=g, dtype=torch.float64)
    return 0.3 * common + torch.randn(K, N, generator=g, dtype=torch.float64)


def _check_against_loop(G64, perms, device, backend):
    gram = G64 @ G64.T
    A = _on(device, ops.pcgrad_coefficients, gram.float(), perms, backend)
    assert A.dtype == torch.float32 and A.shape == gram.shape
    projected = reference.pairwise_pcgrad(G64, perms, reduction="none")
    got = A.double() @ G64
    scale = G64.abs().max().item() if G64.numel() else 1.0
    torch.testing.assert_close(got, projected, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(A, reference.pcgrad_coefficients(gram.float(), perms), rtol=1e-5, atol=1e-6)
    return A


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("K", [1, 2, 3, 7, 15, 32])
@pytest.mark.parametrize("order", ["random", "sequential"])
def test_matches_pairwise_loop(device, backend, K, order):
    _check_against_loop(_conflicting(K, 257, seed=K), _perms(K, order, seed=K), device, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_two_rows_by_hand(device, backend):
    # g0 = (1, 0), g1 = (-1, 1): g0·g1 = -1, so g0' = g0 + g1/2 and g1' = g1 + g0.
    G = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    A = _check_against_loop(G, _perms(2, "sequential"), device, backend)
    torch.testing.assert_close(A, torch.tensor([[1.0, 0.5], [1.0, 1.0]]))


@pytest.mark.parametrize("device,backend", CASES)
def test_zero_parallel_antiparallel_and_scaled_rows(device, backend):
    G = _conflicting(6, 300)
    G[1] = 0  # zero norm: never projected against, and projecting it changes nothing
    G[3] = -2.0 * G[2]  # anti-parallel to row 2
    G[4] = 3.0 * G[0]  # parallel to row 0
    G[5] *= 1e6  # scale differs by 1e6
    A = _check_against_loop(G, _perms(6), device, backend)
    assert (A[:, 1] == torch.eye(6)[:, 1]).all(), "a zero-norm objective must be skipped"


@pytest.mark.parametrize("device,backend", CASES)
def test_empty(device, backend):
    A = _on(device, ops.pcgrad_coefficients, torch.empty(0, 0), torch.empty(0, 0, dtype=torch.long), backend)
    assert A.shape == (0, 0) and A.dtype == torch.float32


@pytest.mark.parametrize("device,backend", CASES)
def test_nan_gram_matches_reference(device, backend):
    G = _conflicting(4, 50)
    gram = (G @ G.T).float()
    gram[1, 2] = gram[2, 1] = float("nan")
    perms = _perms(4)
    torch.testing.assert_close(_on(device, ops.pcgrad_coefficients, gram, perms, backend),
                               reference.pcgrad_coefficients(gram, perms), equal_nan=True)


@needs_cpp
def test_opcheck():
    G = _conflicting(5, 40)
    torch.library.opcheck(torch.ops.gmd_ext.pcgrad_coefficients.default, ((G @ G.T).float(), _perms(5)))


@needs_cpp
@pytest.mark.parametrize("gram,perms,exc,pattern", [
    (torch.zeros(3, 4), torch.zeros(3, 3, dtype=torch.long), ValueError, "gram must be a square"),
    (torch.zeros(3, 3, 3), torch.zeros(3, 3, dtype=torch.long), ValueError, "gram must be a square"),
    (torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.long), TypeError, "gram must be float32"),
    (torch.zeros(3, 3), torch.zeros(3, 3, dtype=torch.int32), TypeError, "perms must be int64"),
    (torch.zeros(3, 3), torch.zeros(3, 2, dtype=torch.long), ValueError, r"perms must be a \[K, K\]"),
    (torch.zeros(3, 3), torch.tensor([[0, 1, 2], [0, 1, 3], [2, 1, 0]]), ValueError,
     r"perms\[1\]\[2\] = 3 is not an objective index"),
    (torch.zeros(3, 3), torch.tensor([[0, 1, 2], [0, 1, 2], [-1, 1, 0]]), ValueError,
     r"perms\[2\]\[0\] = -1 is not an objective index"),
])
def test_bad_input(gram, perms, exc, pattern):
    with pytest.raises(exc, match=pattern):
        torch.ops.gmd_ext.pcgrad_coefficients(gram, perms)
