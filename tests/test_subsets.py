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
