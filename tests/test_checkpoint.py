import os
import random

import numpy as np
import pytest
import torch

from gmd_ext.io import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def _draw():
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_rng_roundtrip_through_file(tmp_path):
    np.random.randn()  # leave a cached Gaussian in NumPy's legacy state
    s = rng_state()
    first = _draw()
    save_checkpoint(tmp_path / "ck.pt", rng=s, step=7)
    state = load_checkpoint(tmp_path / "ck.pt")  # weights_only=True: plain values and tensors only
    set_rng_state(state["rng"])
    assert _draw() == first and state["step"] == 7


def test_atomic_write_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "last.pt"
    save_checkpoint(path, model={"w": torch.ones(2)})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, model=Unpicklable())
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert os.listdir(path.parent) == ["last.pt"]  # no temporary file left behind


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="nothing to save"):
        save_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, a=torch.zeros(100))
    bad.write_bytes(bad.read_bytes()[:50])
    with pytest.raises(ValueError, match="bad.pt is not a readable checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(ValueError, match="keys python, numpy, torch"):
        set_rng_state({"torch": torch.get_rng_state()})
