"""Atomic training checkpoints and the random-number state needed to resume a run exactly.

A checkpoint is one ``torch.save`` dictionary. It is written to a temporary file in the target folder, flushed to
disk and moved over the target with ``os.replace``, so a run killed mid-write leaves the previous checkpoint intact
(and its temporary file, which the next save to the same path removes). Files get the umask's permissions.
Every value stored by :func:`rng_state` is a tensor, int, float, str, bool, None or a tuple/list/dict of these, so
checkpoints load with ``torch.load(weights_only=True)``: a checkpoint file never executes code when it is read.

Typical use in a training loop::

    save_checkpoint(run / "last.pt", model=model.state_dict(), optimizer=opt.state_dict(),
                    scheduler=sched.state_dict(), gmd=gmd.state_dict(), rng=rng_state(), step=step)
    ...
    state = load_checkpoint(run / "last.pt")
    model.load_state_dict(state["model"]); set_rng_state(state["rng"])
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "atomic_write", "file_mode"]


def rng_state() -> dict[str, Any]:
    """Snapshot of the global Python, NumPy and torch (CPU and, when initialised, CUDA) random states.

    Returns:
        dict with keys ``python``, ``numpy``, ``torch`` and ``cuda`` (a list of uint8 tensors, empty when CUDA is
        not initialised). NumPy's state is stored as plain values and an int64 tensor so that the dict loads with
        ``weights_only=True``.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    initialised = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if initialised else []
    return {
        "python": random.getstate(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot taken by :func:`rng_state`.

    Raises:
        ValueError: ``state`` lacks one of the keys ``python``, ``numpy``, ``torch``.
    """
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"set_rng_state: state must be a dict from rng_state() with keys python, numpy, torch; "
                         f"got {got}")
    py = state["python"]
    # weights_only loading turns the inner tuple of Python's state into a list; random.setstate wants tuples.
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _umask() -> int:
    # Linux reports the umask in /proc without changing it; os.umask() can only be read by setting it, which
    # would briefly widen the permissions of files other threads create.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permission bits a plain ``open(path, "w")`` gives a new file now: 0666 minus the umask."""
    return 0o666 & ~_umask()


_STALE_AGE_S = 24 * 3600  # temporaries of unknown owner this old are left-overs, not writes in progress


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove_stale_temporaries(path: Path, suffix: str) -> None:
    """Delete temporaries of ``path`` left by writers that died mid-write (kill -9, power loss).

    A temporary is named ``.<name>.<pid>.<random><suffix>``; it is stale when its process no longer runs on this
    machine (another process's write in progress is left alone), or, for names without a pid, when older than a
    day. Our own pid's temporaries are never touched: a live write of this process may own them.
    """
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(\d+)\.)?[A-Za-z0-9_]+{re.escape(suffix)}$")
    now = time.time()
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None:
            continue
        try:
            if m.group(1) is not None:
                pid = int(m.group(1))
                stale = pid != os.getpid() and not _pid_alive(pid)
            else:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > _STALE_AGE_S
            if stale and entry.is_file(follow_symlinks=False):
                os.remove(entry.path)
        except (OSError, ValueError):
            continue  # raced with another cleaner or writer: nothing to do


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", suffix: str = ".tmp") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path` for writing; on success it replaces `path` (os.replace), on any error
    it is removed, so readers see the old file or the complete new one, never a partial write. An OSError of the
    write (a full disk, a quota) names ``path``.
    The parent folder is created. mode: "wb" or "w" (UTF-8). The file gets the permissions a plain ``open``
    would give it (0666 minus the umask), and temporaries of `path` left by killed writers are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path, suffix)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=suffix)
    try:
        os.fchmod(fd, file_mode())  # mkstemp creates 0600
        with (os.fdopen(fd, mode) if "b" in mode else os.fdopen(fd, mode, encoding="utf-8")) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, tmp):
            # A full disk (ENOSPC), a file-size limit (EFBIG) or a quota surfaces in write() without a file name.
            raise type(e)(e.errno, f"{e.strerror} while writing {path}", str(path)) from e
        raise


def save_checkpoint(path: str | os.PathLike[str], **state: Any) -> Path:
    """Write ``state`` (keyword arguments, e.g. ``model=model.state_dict()``) to ``path`` atomically.

    The parent folder is created if needed. Returns the path written.

    Raises:
        ValueError: no state was given.
        OSError: the file cannot be written (a full disk, a quota); the message names ``path``.
    """
    if not state:
        raise ValueError("save_checkpoint: nothing to save; pass the state as keyword arguments, e.g. model=...")
    path = Path(path)
    with atomic_write(path, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as e:
            # torch's zip writer reports a failed write() (full disk, quota, file-size limit) as a RuntimeError
            # ("unexpected pos ...") that names neither the file nor the cause.
            if not re.search(r"unexpected pos|failed writing|write failed", str(e)):
                raise
            raise OSError(f"save_checkpoint: writing {path} failed ({e}); is the disk full, or a quota or file-size "
                          f"limit reached?") from e
        f.flush()
        os.fsync(f.fileno())
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *,
                    weights_only: bool = True) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: checkpoint file.
        map_location: where tensors are placed (default CPU).
        weights_only: keep ``True`` for untrusted files; it forbids arbitrary Python objects in the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable checkpoint (truncated, another format); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # torch raises RuntimeError, pickle.UnpicklingError, EOFError... depending on damage
        raise ValueError(f"load_checkpoint: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"load_checkpoint: {path} holds a {type(state).__name__}, expected the dict written by "
                         f"save_checkpoint")
    return state
