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


def _dead_pid():
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_cleaned_on_next_save(tmp_path):
    import subprocess
    import sys
    import time
    path = tmp_path / "last.pt"
    dead = tmp_path / f".last.pt.{_dead_pid()}.abc123.tmp"  # a writer killed mid-write
    old = tmp_path / ".last.pt.zz9x_old.tmp"  # pre-pid name, a day old
    fresh = tmp_path / ".last.pt.zz9x_new.tmp"  # pre-pid name, recent: may be a write in progress
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".last.pt.{live.pid}.def456.tmp"  # another live process writing now
        mine = tmp_path / f".last.pt.{os.getpid()}.ghi789.tmp"
        other = tmp_path / f".other.pt.{_dead_pid()}.abc123.tmp"  # another target's file
        for p in (dead, old, fresh, busy, mine, other):
            p.write_bytes(b"partial")
        os.utime(old, (time.time() - 2 * 86400,) * 2)
        save_checkpoint(path, step=1)
        left = set(os.listdir(tmp_path))
        assert left == {"last.pt", fresh.name, busy.name, mine.name, other.name}, left
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_file_mode_follows_umask(tmp_path, umask):
    from gmd_ext.io import atomic_write
    prev = os.umask(umask)
    try:
        p = save_checkpoint(tmp_path / "ck.pt", step=1)
        with atomic_write(tmp_path / "r.json", "w") as f:
            f.write("{}")
        with open(tmp_path / "plain", "w") as f:
            f.write("")
    finally:
        os.umask(prev)
    want = 0o666 & ~umask
    for q in (p, tmp_path / "r.json", tmp_path / "plain"):
        assert (os.stat(q).st_mode & 0o777) == want, (q, oct(os.stat(q).st_mode))
