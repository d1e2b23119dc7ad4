"""Small utilities shared by the paper recipes (python/brats.py, python/mosi.py).

Kept here, not in gmd_ext, because they are recipe plumbing (configs, run folders, schedules), not library API.
Import from a recipe with ``sys.path`` containing this folder, which ``python python/<recipe>.py`` gives for free.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gmd_ext.io import atomic_write


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder + ``os.replace``)."""
    path = Path(path)
    with atomic_write(path, "w") as f:
        f.write(text)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_write(path, "wb", suffix=".png") as f:
            fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def load_config(path: str | os.PathLike | None, defaults: dict, overrides: dict | None = None) -> dict:
    """Merge ``defaults`` <- JSON file at ``path`` <- ``overrides`` (entries that are None are ignored).

    Every key must be one of ``defaults``; a value must have the default's type (ints are accepted for floats).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a JSON object, or a key is unknown, or a value has the wrong type.
    """
    cfg = dict(defaults)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a JSON object, got {type(data).__name__}")
        layers.append((str(path), data))
    if overrides:
        layers.append(("command line", {k: v for k, v in overrides.items() if v is not None}))
    for source, data in layers:
        for key, value in data.items():
            if key.startswith("_"):  # "_comment" style keys document a config file
                continue
            if key not in defaults:
                raise ValueError(f"{source}: unknown config key {key!r}; known keys: {sorted(defaults)}")
            cfg[key] = _check_type(source, key, value, defaults[key])
    return cfg


def _check_type(source: str, key: str, value: Any, default: Any) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"{source}: config key {key!r} expects {type(default).__name__}, got {value!r}")
    return value


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global generators (the recipes also pass explicit torch.Generators)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(kind: str, total_steps: int, warmup_steps: int = 0, power: float = 0.9):
    """Per-step multiplier for ``torch.optim.lr_scheduler.LambdaLR``.

    ``kind`` is ``"poly"`` ((1 - t)^power, the nnU-Net/BraTS schedule), ``"cosine"`` or ``"constant"``; an optional
    linear warm-up over the first ``warmup_steps``. Returns a picklable callable (a ``functools.partial``) so the
    scheduler's ``state_dict`` can be checkpointed.
    """
    if kind not in ("poly", "cosine", "constant"):
        raise ValueError(f"lr schedule must be 'poly', 'cosine' or 'constant', got {kind!r}")
    if total_steps < 1:
        raise ValueError(f"lr schedule total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0 or (warmup_steps and warmup_steps >= total_steps):
        raise ValueError(f"lr schedule warmup_steps must be in [0, total_steps), got {warmup_steps}")
    return functools.partial(_lr_factor, kind, total_steps, warmup_steps, power)


def _lr_factor(kind: str, total: int, warmup: int, power: float, step: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    if kind == "poly":
        return (1.0 - t) ** power
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
