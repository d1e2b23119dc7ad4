import itertools

import pytest
import torch

from gmd_ext import sample_subsets, subsets

BRATS = ("flair", "t1", "t1ce", "t2")


def test_subsets_canonical_order_and_names():
    out = subsets(BRATS)
    assert len(out) == 15
    # by size, then lexicographic by modality index (itertools.combinations order)
    expected = [c for r in range(1, 5) for c in itertools.combinations(range(4), r)]
    assert [s.indices for s in out] == expected
    assert [tuple(s) for s in out] == [tuple(BRATS[i] for i in c) for c in expected]
    assert out[5].name == "flair+t1ce" and out[-1].name == "flair+t1+t1ce+t2"
    assert out[5] == ("flair", "t1ce")  # a plain tuple of names
    assert torch.equal(out[5].mask, torch.tensor([True, False, True, False]))
    assert len({s.name for s in out}) == 15


def test_subsets_three_modalities():
    out = subsets(["text", "audio", "vision"])
    assert [s.name for s in out] == ["text", "audio", "vision", "text+audio", "text+vision", "audio+vision",
                                     "text+audio+vision"]


@pytest.mark.parametrize("k", [1, 2, 4, 15])
def test_sample_subsets_distinct_with_full_set(k):
    g = torch.Generator().manual_seed(3)
    every = subsets(BRATS)
    for _ in range(20):
        out = sample_subsets(BRATS, k, g)
        assert len(out) == k and len(set(out)) == k
        assert out[-1] == every[-1]
        pos = [every.index(s) for s in out]
        assert pos == sorted(pos)  # canonical order


def test_sample_subsets_seeded_and_uniform():
    a = [s.name for s in sample_subsets(BRATS, 5, torch.Generator().manual_seed(7))]
    b = [s.name for s in sample_subsets(BRATS, 5, torch.Generator().manual_seed(7))]
    assert a == b
    g = torch.Generator().manual_seed(0)
    counts = {s.name: 0 for s in subsets(BRATS)[:-1]}
    n = 2000
    for _ in range(n):
        for s in sample_subsets(BRATS, 3, g)[:-1]:
            counts[s.name] += 1
    expected = n * 2 / 14  # each proper subset chosen with probability (k-1)/(2^M-2)
    assert all(abs(c - expected) < 5 * expected ** 0.5 for c in counts.values()), counts


def test_subsets_bad_inputs():
    with pytest.raises(ValueError, match="k must be in \\[1, 15\\]"):
        sample_subsets(BRATS, 0, torch.Generator())
    with pytest.raises(ValueError, match="k must be in \\[1, 15\\]"):
        sample_subsets(BRATS, 16, torch.Generator())
    with pytest.raises(TypeError, match="k must be an int"):
        sample_subsets(BRATS, 2.0)
    with pytest.raises(TypeError, match="generator"):
        sample_subsets(BRATS, 2, 5)
    with pytest.raises(ValueError, match="at least one modality"):
        subsets([])
    with pytest.raises(ValueError, match="distinct"):
        subsets(["a", "a"])
    with pytest.raises(TypeError, match="sequence of modality names"):
        subsets("flair")
    with pytest.raises(ValueError, match="without '\\+'"):
        subsets(["a+b", "c"])


def test_subset_losses_with_present_mask():
    """Fused = mean over the subset's present modalities; rows with none of them excluded; sequence input
    differentiates only through the subset's own branches; tensor and sequence inputs agree."""
    from gmd_ext import subset_losses
    torch.manual_seed(0)
    B, M = 5, 3
    objectives = subsets(("a", "b", "c"))
    present = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)
    seq = [torch.randn(B, 2, requires_grad=True) for _ in range(M)]
    seq[1].data[~present[:, 1]] = float("nan")   # an absent branch's garbage must not leak in
    y = torch.randn(B, 2)
    loss_fn = lambda f, t: ((f - t) ** 2).sum(1).mean()  # noqa: E731
    out = subset_losses(seq, y, loss_fn, objectives, present)
    assert list(out) == [s.name for s in objectives]
    for s in objectives:
        rows, fused = [], []
        for b in range(B):
            ms = [m for m in s.indices if present[b, m]]
            if ms:
                rows.append(b)
                fused.append(torch.stack([seq[m][b] for m in ms]).mean(0))
        expected = loss_fn(torch.stack(fused), y[rows])
        torch.testing.assert_close(out[s.name], expected)
        grads = torch.autograd.grad(out[s.name], seq, allow_unused=True, retain_graph=True)
        for m in range(M):
            assert (grads[m] is None) == (m not in s.indices), (s.name, m)
            if grads[m] is not None:
                assert torch.isfinite(grads[m]).all() and (grads[m][~present[:, m]] == 0).all()
    stacked = torch.stack([t.detach().nan_to_num() for t in seq], 1)
    for name, v in subset_losses(stacked, y, loss_fn, objectives, present).items():
        torch.testing.assert_close(v, out[name].detach())
    # present=None: the plain mean over the subset
    full = subset_losses(stacked, y, loss_fn, objectives)
    torch.testing.assert_close(full["a+c"], loss_fn((stacked[:, 0] + stacked[:, 2]) / 2, y))


def test_subset_losses_bad_inputs():
    from gmd_ext import subset_losses
    objectives = subsets(("a", "b"))
    x, y = torch.randn(4, 2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="target must be a tensor with B = 4"):
        subset_losses(x, y[:3], torch.nn.functional.mse_loss, objectives)
    with pytest.raises(ValueError, match=r"present must be None or a bool tensor \[B, M\] = \[4, 2\]"):
        subset_losses(x, y, torch.nn.functional.mse_loss, objectives, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="over 3 modalities, but branches has M = 2"):
        subset_losses(x, y, torch.nn.functional.mse_loss, subsets(("a", "b", "c")))
    with pytest.raises(TypeError, match="branches must be"):
        subset_losses(3, y, torch.nn.functional.mse_loss, objectives)
