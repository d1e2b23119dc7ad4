"""The skeleton shared by the paper recipes (python/brats.py, python/mosi.py); a recipe adds only its data and model.

What lives here, once for both recipes:
  environment   `require_extras` (optional dependencies, checked at start-up), `kernel_note` (compiled kernels),
                `threads` (torch CPU threads)
  configs       `Key` / `SHARED_SCHEMA` (the knobs both recipes have, one name each, with their ranges: one schema
                drives validation at start-up, the key list of --help and --print-config), `load_config`,
                `check_config`
  errors        `cli_errors` (a user's mistake is one line on stderr, exit status 2, no traceback)
  objectives    `choose_subsets` (all 2^M - 1 modality subsets, or k sampled), `subset_losses`
  the step      `Step`: GMD (``gmd: true``) or joint training (``gmd: false``) on the same subset losses
  runs          `run_lock` (one run per folder), `prepare_folder` (a folder is never silently overwritten),
                `inside` (paths never leave --out),
                `fit` (the epoch loop: atomic checkpoints, exact resume that verifies config and seed, best-on-
                validation selection, a dominance monitor whose CSV stays consistent across resumes)
  reports       `bootstrap_interval` (scipy.stats.bootstrap, BCa), `comparison_markdown` (paired GMD - joint
                differences, flagged low-powered under 10 units), `plot_per_combination`, `dominance_markdown`,
                `data_note` / `data_label` (the data's provenance, in every report and figure), `plural`

The model interface a recipe relies on (DSUNet3d and DSSentimentNet have it; a user's own model needs the same):
  ``model.modalities``                 the M modality names, in the order of the branch axis
  ``model.forward_branches(x, ...)``   per-modality outputs, a sequence of M tensors ``[B, ...]`` (or one
                                       ``[B, M, ...]`` tensor) computed without interaction between modalities
                                       before the fusion, so the prediction of a subset S is the mean over S of the
                                       branch outputs (the DS late fusion); a sequence of separately computed
                                       branches lets each subset's loss differentiate only through its own
  a recipe's ``loss_fn(fused, target)``  the task loss of a fused prediction (scalar)
brats.py also uses ``model.num_classes`` (output channels of a branch).

A recipe run as ``python python/<recipe>.py`` (or ``python -P``: the recipes put their folder on ``sys.path``)
imports this file; gmd_ext is the installed package.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gmd_ext import GMD, sample_subsets, subset_losses, subsets  # noqa: F401  (subset_losses: the recipes' objectives)
from gmd_ext import _backend
from gmd_ext.gmd.monitor import DominanceMonitor
from gmd_ext.gmd.monitor import plot_csv as plot_monitor_csv
from gmd_ext.io import atomic_write, load_checkpoint, rng_state, save_checkpoint, set_rng_state


@dataclass(frozen=True)
class Key:
    """One config key: its default, what it means, and the values it takes.

    A recipe's SCHEMA (name -> Key) is the one description of its config: `check_config` validates against it at
    start-up (ValueError naming the key, the allowed values and what was given), `keys_help` lists it in
    ``--help`` and ``--print-config`` prints the resolved values. The type is the default's (an int is accepted
    for a float); floats must be finite. ``low``/``high`` are inclusive bounds, ``above``/``below`` exclusive ones;
    for a list they, and ``choices``, apply to every element. Bounds that memory or time follow from (widths,
    crops, batch sizes) are set so that a typo fails at start-up instead of exhausting the machine.
    """
    default: Any
    help: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    above: float | None = None
    below: float | None = None
    length: int | None = None   # lists: exact number of elements
    unique: bool = False        # lists: elements distinct
    pattern: str | None = None  # strings: a regular expression the whole value must match

    def describe(self) -> str:
        """The type and range in words, e.g. ``float in (0, 10]``."""
        d = self.default
        if d is None:
            return "JSON value or null"
        kind = ("bool" if isinstance(d, bool) else "int" if isinstance(d, int) else "float" if isinstance(d, float)
                else "list" if isinstance(d, list) else "str")
        if self.choices and kind == "str":
            return "one of " + "|".join(self.choices)
        if self.choices:
            rule = "one of " + "|".join(map(str, self.choices))
        elif kind in ("int", "float") or (kind == "list" and not isinstance(d[0], str)):
            lo = f"[{_num(self.low)}" if self.low is not None else f"({_num(self.above)}" if self.above is not None \
                else "(-inf"
            hi = f"{_num(self.high)}]" if self.high is not None else f"{_num(self.below)})" if self.below is not None \
                else "inf)"
            rule = f"in {lo}, {hi}"
        elif self.pattern:
            rule = f"matching {self.pattern}"
        else:
            rule = "non-empty" if kind == "str" else ""
        if kind == "list":
            item = "float" if isinstance(d[0], float) else "int" if isinstance(d[0], int) else "str"
            size = f"{self.length} " if self.length else "non-empty list of "
            return (f"list of {size}{'distinct ' if self.unique else ''}{item}s, each {rule}" if self.length
                    else f"{size}{'distinct ' if self.unique else ''}{item}s, each {rule}")
        return f"{kind} {rule}".strip()

    def validate(self, name: str, value: Any) -> None:
        """Raise ValueError naming ``name`` when ``value`` (already of the key's type) is outside the key's range."""
        items = value if isinstance(value, list) else [value]
        ok = not isinstance(value, list) or (len(value) > 0 and (self.length is None or len(value) == self.length)
                                              and (not self.unique or len(set(map(str, value))) == len(value)))
        for v in items:
            if isinstance(v, bool):
                continue
            if self.choices:
                ok &= v in self.choices
            elif isinstance(v, (int, float)):
                ok &= (math.isfinite(v) and (self.low is None or v >= self.low)
                       and (self.high is None or v <= self.high) and (self.above is None or v > self.above)
                       and (self.below is None or v < self.below))
            elif isinstance(v, str):
                ok &= bool(v) and (self.pattern is None or re.fullmatch(self.pattern, v) is not None)
        if not ok:
            raise ValueError(f"config key {name!r} must be {self.describe()}, got {value!r}")


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else f"{x:_}" if abs(x) >= 10_000 else str(x)


def defaults(schema: dict[str, Key]) -> dict:
    """``{name: default}`` of a schema (the form configs, checkpoints and config.json store)."""
    return {k: (list(v.default) if isinstance(v.default, list) else v.default) for k, v in schema.items()}


def keys_help(schema: dict[str, Key]) -> str:
    """The config keys of a schema as help text: one line per key with its type, range and default."""
    width = max(map(len, schema))
    lines = ["config keys (--config FILE and --set KEY=VALUE; JSON values, e.g. --set lr=0.001 "
             "modalities='[\"flair\",\"t1\"]'):"]
    for name, key in schema.items():
        lines.append(f"  {name:<{width}}  {key.describe()}; default {json.dumps(key.default)}. {key.help}")
    return "\n".join(lines)


# The knobs both recipes have, under one name each. A recipe's SCHEMA extends these.
SHARED_SCHEMA = {
    "gmd": Key(True, "THE switch of a paired comparison: GMD-merged gradients (true) or joint training (false)"),
    "gmd_reduction": Key("mean", "GMD: mean over objectives on shared elements, sum on modality-specific ones",
                         choices=("mean", "sum")),
    "gmd_order": Key("random", "GMD projection order (random: the paper)", choices=("random", "sequential")),
    "gmd_usage": Key("official", "which elements count as shared: the per-branch rule or the older reach rule",
                     choices=("official", "reach")),
    # Joint training backpropagates the mean of the subset losses: on parameters every subset uses, that is the
    # mean of the per-subset gradients, the scale GMD's "mean" reduction gives them. "sum" is K times that (with
    # Adam only the relative weight of weight_decay and eps changes).
    "joint_reduction": Key("mean", "joint training: mean or sum of the subset losses", choices=("mean", "sum")),
    "subsets_per_step": Key(0, "0: all 2^M - 1 modality subsets every step; k: k sampled (the full set always in)",
                            low=0, high=2 ** 8 - 1),
    "epochs": Key(10, "training epochs", low=1, high=100_000),
    "batch_size": Key(32, "samples per step", low=1, high=65_536),
    "lr": Key(1e-3, "Adam learning rate", above=0.0, high=10.0),
    "weight_decay": Key(0.0, "Adam weight decay", low=0.0, high=1.0),
    "lr_schedule": Key("constant", "stepped every optimizer step", choices=("poly", "cosine", "constant")),
    "warmup_steps": Key(0, "linear warm-up steps (fewer than the run's steps)", low=0, high=10 ** 9),
    "val_every": Key(1, "epochs between validations (checkpoint selection)", low=1, high=100_000),
    "monitor": Key(True, "GMD runs: dominance monitor CSV (monitor.csv) + plot (dominance.png)"),
}
SHARED_DEFAULTS = defaults(SHARED_SCHEMA)

# Files `fit` writes into a run folder (what --overwrite replaces).
RUN_OUTPUTS = ("last.pt", "best.pt", "history.json", "monitor.csv", "dominance.png")

EXTRAS = {"brats": ("nibabel", "nilearn", "tqdm", "matplotlib", "scipy"),
          "mosi": ("sklearn", "tqdm", "matplotlib", "scipy")}
_PIP_NAMES = {"sklearn": "scikit-learn"}


# ----------------------------------------------------------------------------------------------- environment
def require_extras(extra: str) -> None:
    """Stop with a message naming the pip extra when one of ``EXTRAS[extra]`` is not importable.

    Run at start-up, so a missing plotting library is reported before training, not after it.

    Raises:
        SystemExit: with the missing packages and ``pip install ".[<extra>]"`` (run in the checkout).
    """
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        names = ", ".join(_PIP_NAMES.get(m, m) for m in missing)
        raise SystemExit(f"this recipe needs {names} (not installed); install the recipe's extra from the "
                         f'checkout: pip install ".[{extra}]"')


def require_module(module: str, purpose: str) -> None:
    """Raise ImportError naming ``module`` and its pip command when it is not importable (checked before work
    that would need it at its end, e.g. the plot after training)."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{purpose} needs {_PIP_NAMES.get(module, module)}, which is not installed: pip install "
                          f"{_PIP_NAMES.get(module, module)} (or the recipe's extra from the checkout: pip install "
                          f'".[brats]" / ".[mosi]")')


def kernel_note() -> str | None:
    """None when gmd_ext's compiled kernels are loaded; else a sentence saying so and naming the fix."""
    if _backend.CPP_LOADED:
        return None
    return (f"note: gmd_ext's compiled C++ kernels are not loaded, so this run uses the slower Triton / pure-torch "
            f"paths. Reason and fix: {_backend.CPP_REASON}")


# One torch thread by default. Measured on the 2-core dev box (shared, load avg 2.4-6.4), one DSUNet3d demo step
# (width 0.25, crop 32, batch 2, forward_branches + backward): without a competing job 0.40-0.46 s with 2 threads,
# 0.67-0.81 s with 1; beside another torch job running 2 threads, 51 s with 2 threads and 5.1-6.2 s with 1.
DEFAULT_THREADS = 1
THREADS_HELP = ("torch CPU threads (default 1; 0: torch's default, one per core). On a 2-core box a demo step took "
                "0.67 s with 1 thread and 0.40 s with 2 when no other job ran, but 5.1 s with 1 and 51 s with 2 "
                "beside another torch job: pass 0 (or N) on a machine of your own")


@contextlib.contextmanager
def threads(n: int):
    """Run with ``torch.set_num_threads(n)`` (0: torch's default) and restore the previous count afterwards."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 256:
        raise ValueError(f"--threads must be an int in [0, 256] (0: torch's default), got {n!r}")
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)  # recipes are also called in-process (tests): leave torch as found


# ----------------------------------------------------------------------------------------------- files
def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder + ``os.replace``)."""
    path = Path(path)
    with atomic_write(path, "w") as f:
        f.write(text)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_write(path, "wb", suffix=".png") as f:
            fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def inside(root: str | os.PathLike, *parts: str) -> Path:
    """``root / parts...``, refusing any part that is not a plain file or folder name (so no ``..``, no ``/``).

    Raises:
        ValueError: a part could lead outside ``root``; the message names it.
    """
    for p in parts:
        if not isinstance(p, str) or not _SAFE_NAME.fullmatch(p) or set(p) <= {"."}:
            raise ValueError(f"output name {p!r} is not a plain name (letters, digits, '_', '.', '+', '-'; not "
                             f"starting with '.'): it could write outside {root}")
    return Path(root).joinpath(*parts)


def prepare_folder(folder: str | os.PathLike, manifest_name: str, manifest: dict, *, resume: bool,
                   overwrite: bool, outputs: Iterable[str]) -> Path:
    """Make ``folder`` ready for a run described by ``manifest`` (written as ``folder/manifest_name``).

    - new or empty folder: created, manifest written;
    - ``resume``: the folder's manifest must equal ``manifest`` (same settings), else ValueError naming the keys
      that differ;
    - ``overwrite``: the files matching the glob patterns ``outputs`` (the recipe's own outputs) are removed and
      the manifest is rewritten; other files are left alone;
    - otherwise a non-empty folder is refused (FileExistsError): a run never silently replaces earlier results.
    """
    folder = Path(folder)
    path = folder / manifest_name
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    held = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME) if folder.is_dir() else []
    if resume and path.is_file():
        saved = read_json(path, "the run's settings")
        if saved != manifest:
            raise ValueError(f"--resume: the settings differ from {path} in {_diff_keys(saved, manifest)}; resume "
                             f"with the same settings, or start a new run in another --out")
        return folder
    if held and not resume and not overwrite:
        raise FileExistsError(f"{folder} is not empty (holds {', '.join(held[:5])}"
                              f"{', ...' if len(held) > 5 else ''}); pass --resume to continue the run there, "
                              f"--overwrite to replace its outputs, or choose another --out")
    if overwrite:
        for pattern in (manifest_name, *outputs):
            for p in folder.glob(pattern):
                if p.is_file():
                    p.unlink()
    write_json(path, manifest)
    return folder


MAX_JSON_BYTES = 64 << 20  # configs, manifests and reports are kilobytes; a larger file is not one of ours


def _json_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{size} bytes, more than the {MAX_JSON_BYTES >> 20} MiB a recipe's JSON file can be")
    return path.read_text(encoding="utf-8")


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; a damaged file is a ValueError naming it (and ``what`` it holds)."""
    try:
        data = json.loads(_json_text(path))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path} ({what}) is damaged: {type(e).__name__}: {e}; restore it or start the run again "
                         f"in another --out") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} ({what}) is damaged: expected a JSON object, got {type(data).__name__}")
    return data


class RunInUseError(RuntimeError):
    """Another live process holds the run folder's lock."""


# What a recipe's command line reports as one line (no traceback): the user's input or files are at fault.
USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, RunInUseError, ImportError)


def cli_errors(prog: str, run: Callable[[], Any]) -> int:
    """Run a recipe command; a ``USER_ERRORS`` exception becomes ``<prog>: error: <message>`` on stderr and exit
    status 2, like argparse's own errors (set GMD_EXT_TRACEBACK=1 to see the traceback)."""
    try:
        run()
    except USER_ERRORS as e:
        if os.environ.get("GMD_EXT_TRACEBACK"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


LOCK_NAME = ".run.lock"
_HELD_LOCKS: dict[str, list] = {}  # folder -> [fd, depth]: the run's own nested calls (train -> eval) re-enter


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike):
    """Hold the exclusive lock of a run folder for the duration of the block: one run per folder.

    An ``fcntl.flock`` on ``folder/.run.lock`` (created; it records the holder's pid). The kernel drops the lock
    when its process dies, so a lock left by a killed run never blocks; re-entrant within a process.

    Raises:
        RunInUseError: another live process holds the folder; the message names the folder and that pid.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[key][1] -= 1
        return
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RunInUseError(f"{folder} is in use by another run (pid {holder} holds {folder / LOCK_NAME}); wait for "
                           f"it to finish, or choose another --out") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD_LOCKS[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD_LOCKS[key]
        os.close(fd)  # closing the descriptor releases the lock


def _diff_keys(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# ----------------------------------------------------------------------------------------------- configs
def parse_set(items: list[str] | None) -> dict:
    """``--set KEY=VALUE`` items as a dict: each value parsed as JSON, or kept as a string when it is not JSON."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_config(path: str | os.PathLike | None, defaults: dict, overrides: dict | None = None) -> dict:
    """Merge ``defaults`` <- JSON file at ``path`` <- ``overrides`` (entries that are None are ignored).

    Every key must be one of ``defaults``; a value must have the default's type (ints are accepted for floats).
    Keys starting with "_" document a config file and are skipped.

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
            data = json.loads(_json_text(path))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ValueError(f"config file {path} is not valid JSON: {type(e).__name__}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a JSON object, got {type(data).__name__}")
        layers.append((str(path), data))
    if overrides:
        layers.append(("command line", {k: v for k, v in overrides.items() if v is not None}))
    for source, data in layers:
        for key, value in data.items():
            if key.startswith("_"):
                continue
            if key not in defaults:
                raise ValueError(f"{source}: unknown config key {key!r}; known keys: {sorted(defaults)}")
            cfg[key] = _check_type(source, key, value, defaults[key])
    return cfg


def _check_type(source: str, key: str, value: Any, default: Any) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        if ok and default:
            value = [_check_type(source, key, v, default[0]) for v in value]
        return list(value) if ok else _wrong_type(source, key, value, "list")
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    return value if ok else _wrong_type(source, key, value, type(default).__name__)


def _wrong_type(source: str, key: str, value: Any, expected: str):
    raise ValueError(f"{source}: config key {key!r} expects {expected}"
                     + (" elements" if expected != "list" and isinstance(value, (list, tuple)) else "")
                     + f", got {value!r:.200}")


def check_config(cfg: dict, schema: dict[str, Key], num_modalities: int) -> None:
    """Validate every key of ``schema`` (type, finiteness, range) and the shared rules between keys, at start-up.

    Raises:
        ValueError: naming the key, the allowed values and what was given.
    """
    for name, key in schema.items():
        if name not in cfg:
            raise ValueError(f"config key {name!r} is missing")
        _check_type("config", name, cfg[name], key.default)
        key.validate(name, cfg[name])
    total = 2 ** num_modalities - 1
    if not 0 <= cfg["subsets_per_step"] <= total:
        raise ValueError(f"config key 'subsets_per_step' must be 0 (all {total} subsets) or k in 1..{total}, got "
                         f"{cfg['subsets_per_step']}")


def check_stop_after(n: int | None) -> None:
    """``--stop-after-epochs``: None or an int >= 1 (checked at start-up by the recipes, again by `fit`)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"--stop-after-epochs must be an int >= 1, got {n!r}")


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
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` when that device exists.

    Raises:
        ValueError: another name (``meta``, ``mps``...) or a CUDA device this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not re.fullmatch(r"cpu|cuda(:[0-9]{1,2})?", name):
        raise ValueError(f"config key 'device' must be auto, cpu, cuda or cuda:N, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= (torch.cuda.device_count() if torch.cuda.is_available()
                                                         else 0):
        raise ValueError(f"config key 'device' is {name!r}, but this machine has "
                         f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} usable CUDA device(s)")
    return device


# ----------------------------------------------------------------------------------------------- objectives
def choose_subsets(modalities: Sequence[str], k: int, generator: torch.Generator) -> list:
    """The step's objectives: every subset in canonical order (``k`` 0 or 2^M - 1, the generator untouched), or
    ``k`` sampled ones with the full set always among them (gmd_ext.sample_subsets)."""
    every = subsets(modalities)
    return every if k in (0, len(every)) else sample_subsets(modalities, k, generator)


class Step:
    """One optimisation step on a dict of subset losses: GMD (``cfg["gmd"]``) or joint training.

    The two differ in this switch only: same objectives, same optimizer. Joint training backpropagates the mean
    (``joint_reduction: "mean"``) or the sum of the losses; GMD merges the per-objective gradients
    (``gmd_reduction``, ``gmd_order``, ``gmd_usage``; its order generator is seeded with ``seed``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: dict, seed: int, *, backend: str = "auto",
                 monitor=None):
        self.optimizer = optimizer
        self.joint_reduction = cfg["joint_reduction"]
        self.gmd = (GMD(optimizer, reduction=cfg["gmd_reduction"], order=cfg["gmd_order"], seed=seed,
                        backend=backend, monitor=monitor, usage=cfg["gmd_usage"]) if cfg["gmd"] else None)

    def __call__(self, losses: dict[str, torch.Tensor]):
        """Zero the gradients, backpropagate, step. Returns GMD's StepInfo (None for joint training)."""
        if self.gmd is not None:
            self.gmd.zero_grad()
            info = self.gmd.backward(losses)
            self.gmd.step()
            return info
        self.optimizer.zero_grad(set_to_none=True)
        stacked = torch.stack(list(losses.values()))
        (stacked.mean() if self.joint_reduction == "mean" else stacked.sum()).backward()
        self.optimizer.step()
        return None

    def state_dict(self) -> dict:
        if self.gmd is not None:
            return {"gmd": self.gmd.state_dict()}  # holds the wrapped optimizer's state too
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.gmd is not None:
            self.gmd.load_state_dict(state["gmd"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        if self.gmd is not None:
            self.gmd.close()


# ----------------------------------------------------------------------------------------------- training
def load_matching(path: str | os.PathLike, cfg: dict, seed: int, map_location="cpu") -> dict:
    """Load a checkpoint and verify it was written by a run with this very config and seed.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the checkpoint stores another config or seed (the message names the keys that differ), or
            none at all.
    """
    state = load_checkpoint(path, map_location=map_location)
    if "config" not in state or "seed" not in state:
        raise ValueError(f"{path} does not record the config and seed it was trained with; it was not written by "
                         f"this recipe, so it cannot be checked against this run")
    if state["config"] != cfg or state["seed"] != seed:
        diff = _diff_keys(state["config"], cfg) + (["seed"] if state["seed"] != seed else [])
        raise ValueError(f"{path} was written with another config/seed (differs in {diff}: stored "
                         f"{ {k: state['config'].get(k) for k in diff if k != 'seed'} }, seed {state['seed']}; this "
                         f"run has { {k: cfg.get(k) for k in diff if k != 'seed'} }, seed {seed}); resume with the "
                         f"same settings or choose another --out")
    return state


def truncate_csv(path: Path, step: int) -> None:
    """Keep the header and the rows whose ``step`` column is < ``step`` (rows a killed run wrote after its last
    checkpoint would otherwise appear twice once the resumed run records those steps again).

    Raises:
        ValueError: the file is not a monitor CSV (no ``step`` column first, a step that is not an integer); the
            message names the file.
    """
    if not path.is_file():
        return
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if rows and (not rows[0] or rows[0][0] != "step"):
            raise ValueError(f"the header starts with {rows[0][:1]}, not 'step'")
        kept = rows[:1]
        for i, r in enumerate(rows[1:], 2):
            if r and int(r[0]) < step:
                kept.append(r)
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as e:
        raise ValueError(f"{path} (the run's dominance monitor CSV) is damaged: {type(e).__name__}: {e}; restore "
                         f"it, delete it (the plot then covers the resumed steps only), or start again in another "
                         f"--out") from None
    if len(kept) != len(rows):
        with atomic_write(path, "w") as f:
            csv.writer(f, lineterminator="\n").writerows(kept)


def _restore(last: Path, ck: dict, cfg: dict, steps_per_epoch: int, model, step_fn, sched, gens) -> dict:
    """Load a verified checkpoint's state into the run's objects; a damaged or tampered file is a ValueError
    naming it, never a raw KeyError deep inside torch."""
    try:
        state = {k: ck[k] for k in ("epoch", "step", "history", "best_score", "best_epoch")}
        epoch, step, history = state["epoch"], state["step"], state["history"]
        if not (isinstance(epoch, int) and not isinstance(epoch, bool) and 0 <= epoch <= cfg["epochs"]):
            raise ValueError(f"epoch {epoch!r:.40} is not in 0..{cfg['epochs']} (the run's epochs)")
        if step != epoch * steps_per_epoch:
            raise ValueError(f"step {step!r:.40} is not epoch {epoch} x {steps_per_epoch} steps per epoch")
        if not isinstance(history, list) or len(history) != epoch or not all(isinstance(h, dict) for h in history):
            raise ValueError(f"history does not hold one record per epoch ({epoch})")
        best = state["best_epoch"]
        if best is not None and not (isinstance(best, int) and 1 <= best <= epoch
                                     and isinstance(state["best_score"], (int, float))):
            raise ValueError(f"best epoch {best!r:.40} / score {state['best_score']!r:.40} are not a past epoch")
        model.load_state_dict(ck["model"])
        step_fn.load_state_dict(ck["step_state"])
        sched.load_state_dict(ck["scheduler"])
        for k, g in gens.items():
            g.set_state(ck["generators"][k])
        set_rng_state(ck["rng"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ValueError(f"{last} is damaged or was edited ({type(e).__name__}: {str(e)[:300]}); it cannot resume "
                         f"this run: restore it, or start the run again in another --out") from None
    return state


def _holding_run_lock(fn):
    @functools.wraps(fn)
    def locked(run_dir, *args, **kwargs):
        with run_lock(run_dir):
            return fn(run_dir, *args, **kwargs)
    return locked


@_holding_run_lock
def fit(run_dir: Path, cfg: dict, seed: int, *, build_model: Callable[[], torch.nn.Module],
        steps_per_epoch: int, batches: Callable[[int, torch.Generator], Iterable],
        forward: Callable[[torch.nn.Module, Any], tuple], loss_fn: Callable,
        validate: Callable[[torch.nn.Module], tuple[float, dict] | None], mode: str = "max", resume: bool = False,
        stop_after_epochs: int | None = None, backend: str = "auto", progress: bool = True,
        label: str = "", figure_title: str = "") -> dict:
    """Train ``model`` into ``run_dir`` with the subset objectives; the epoch loop of both recipes.

    Args:
        build_model(): the model (called after seeding, so its initialisation depends on ``seed`` only); it has
            ``modalities`` and ``forward_branches`` (module docstring).
        steps_per_epoch: the number of batches ``batches`` yields per epoch (sizes the LR schedule).
        batches(epoch, generator): the epoch's batches; ``generator`` is the run's data generator (checkpointed),
            for recipes that draw their batch order from it.
        forward(model, batch) -> (branches: M tensors [B, ...] or [B, M, ...], target): ``model.forward_branches``
            on the batch.
        loss_fn(fused, target): the task loss of one subset's fused prediction.
        validate(model) -> (score, extra) or None (no validation data); ``mode`` "max" or "min" says which score is
            better. The best epoch's weights go to ``best.pt``.
        resume: continue from ``run_dir/last.pt`` when it exists (verified to hold this config and seed), else
            start; without it an existing ``last.pt`` is refused.
        stop_after_epochs: end this invocation after that many epochs (a time-limited job).
        progress: tqdm bars; figure_title: prefix of the dominance figure's title (the data provenance).

    The run holds the folder's lock (`run_lock`) throughout. Every epoch writes ``last.pt`` atomically: model,
    optimizer, schedule, GMD, generators, global RNGs, history, config and seed, so a resumed run is bit-identical
    on CPU to an uninterrupted one; a resumed checkpoint is checked (epoch within the run, step = epoch x
    steps_per_epoch, one history record per epoch) and a damaged one is a ValueError naming the file.

    Returns:
        ``{"finished", "checkpoint" (best.pt, or last.pt without validation), "epoch", "history",
        "best_epoch", "best_score", "model"}``.
    """
    from tqdm import tqdm

    last, best_path = run_dir / "last.pt", run_dir / "best.pt"
    check_stop_after(stop_after_epochs)
    if last.exists() and not resume:
        raise FileExistsError(f"{last} exists: pass --resume to continue that run, or choose another --out")
    if cfg["gmd"] and cfg["monitor"]:
        require_module("matplotlib", "the dominance plot of a GMD run (config monitor: true)")
    seed_everything(seed)
    model = build_model()
    modalities = tuple(model.modalities)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg["lr_schedule"], cfg["epochs"] * steps_per_epoch, cfg["warmup_steps"]))
    gens = {"data": torch.Generator().manual_seed(seed), "subsets": torch.Generator().manual_seed(seed + 1)}
    state = {"epoch": 0, "step": 0, "history": [], "best_score": None, "best_epoch": None}
    monitor_csv = run_dir / "monitor.csv"
    monitor = None
    if cfg["gmd"] and cfg["monitor"]:
        monitor = DominanceMonitor(monitor_csv, objective_names=[s.name for s in subsets(modalities)],
                                   modalities=modalities)
    step_fn = Step(opt, cfg, seed, backend=backend, monitor=monitor)
    if resume and last.exists():
        ck = load_matching(last, cfg, seed)
        state = _restore(last, ck, cfg, steps_per_epoch, model, step_fn, sched, gens)
        truncate_csv(monitor_csv, state["step"])

    end = cfg["epochs"] if stop_after_epochs is None else min(cfg["epochs"], state["epoch"] + stop_after_epochs)
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    try:
        for epoch in range(state["epoch"], end):
            model.train()
            t0, total, n, conflicts = time.perf_counter(), 0.0, 0, []
            bar = tqdm(batches(epoch, gens["data"]), desc=f"{label} epoch {epoch + 1}/{cfg['epochs']}",
                       leave=False, dynamic_ncols=True, disable=not progress)
            for batch in bar:
                chosen = choose_subsets(modalities, cfg["subsets_per_step"], gens["subsets"])
                branches, target = forward(model, batch)
                losses = subset_losses(branches, target, loss_fn, chosen)
                info = step_fn(losses)
                sched.step()
                state["step"] += 1
                if info is not None:
                    conflicts.append(info.num_conflicts)
                loss = float(torch.stack([v.detach() for v in losses.values()]).mean())
                total, n = total + loss, n + 1
                bar.set_postfix(loss=f"{loss:.4f}")
            record = {"epoch": epoch + 1, "step": state["step"], "train_loss": total / max(n, 1),
                      "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - t0}
            if conflicts:
                # Conflicting pairs of subset gradients per step: rises as a dominant modality takes over.
                record["conflicts_per_step"] = float(np.mean(conflicts))
            if (epoch + 1) % cfg["val_every"] == 0 or epoch + 1 == cfg["epochs"]:
                val = validate(model)
                if val is not None:
                    score, extra = val
                    record.update(val_score=score, **extra)
                    if state["best_score"] is None or better(score, state["best_score"]):
                        state.update(best_score=score, best_epoch=epoch + 1)
                        save_checkpoint(best_path, model=model.state_dict(), config=cfg, seed=seed,
                                        epoch=epoch + 1, step=state["step"], score=score)
            state["history"].append(record)
            state["epoch"] = epoch + 1
            save_checkpoint(last, model=model.state_dict(), step_state=step_fn.state_dict(),
                            scheduler=sched.state_dict(), generators={k: g.get_state() for k, g in gens.items()},
                            rng=rng_state(), config=cfg, seed=seed, **state)
            print(f"[{label}] " + json.dumps(record), flush=True)
    finally:
        step_fn.close()
    finished = state["epoch"] >= cfg["epochs"]
    if finished:
        write_json(run_dir / "history.json", state["history"])
    if monitor is not None and monitor.steps:
        # From the whole CSV, so a resumed run's figure covers every step, not only those since the resume.
        plot_monitor_csv(monitor_csv, run_dir / "dominance.png", title=figure_title)
    return {"finished": finished, "checkpoint": best_path if state["best_epoch"] is not None else last,
            "epoch": state["epoch"], "history": state["history"], "best_epoch": state["best_epoch"],
            "best_score": state["best_score"], "model": model}


# ----------------------------------------------------------------------------------------------- reports
STAND_INS = ("phantom", "synthetic")  # data kinds generated by gmd_ext, never comparable with published results


def data_note(kind: str, benchmark: str) -> str:
    """The report line that says where the numbers come from and what they may be compared with.

    ``kind``: ``"phantom"`` / ``"synthetic"`` (stand-ins generated by gmd_ext) or the name of the real data set as
    decided from its layout (``"BraTS 2018-2021"``, ``"BraTS 2023 GLI"``, ``"MSD Task01"``, ``"CMU-MOSI"``...);
    ``benchmark``: the data set of the paper's numbers.
    """
    if kind in STAND_INS:
        return (f"data source: **{kind}** stand-in data generated by gmd_ext, not {benchmark}. These numbers check "
                f"the pipeline and compare GMD with joint training on the same data; they are **not comparable** "
                f"with published {benchmark} results.")
    note = f"data source: **{kind}** data (decided from the data's layout)"
    return note + ("." if kind == benchmark else f"; the paper's numbers are on {benchmark}.")


def data_label(kind: str, benchmark: str) -> str:
    """The short provenance every figure carries in its title, e.g. ``phantom data, not BraTS 2018``."""
    return f"{kind} data, not {benchmark}" if kind in STAND_INS else f"{kind} data"


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 epoch``, ``2 epochs`` (``words``: an irregular plural)."""
    return f"{n} {word if n == 1 else words or word + 's'}"


# Below this many paired units (test cases, samples) a bootstrap interval is too unreliable to carry a verdict on
# its own: BCa intervals under-cover at the 4-20 test cases small runs have, and percentile ones more so.
LOW_POWER_UNITS = 10
BOOTSTRAP_METHODS = ("BCa", "percentile")


def bootstrap_interval(stat: Callable[[np.ndarray], np.ndarray], n: int, *, n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95, method: str = "BCa") -> tuple[float, float]:
    """Bootstrap confidence interval of a statistic over ``n`` paired units (cases, samples):
    ``scipy.stats.bootstrap`` resampling the unit indices, BCa by default (``method="percentile"`` on request).

    ``stat(idx)`` takes an int array ``[B, m]`` of unit indices (B resamples of m units; the BCa jackknife passes
    ``m = n - 1``) and returns ``[B]`` values (e.g. the mean GMD - joint difference over those units). Seeded: the
    same call gives the same interval. Fewer than 2 units carry no information about the spread: (nan, nan); a
    statistic that is the same on every resample (two identical runs) gives that value as both ends.
    """
    from scipy import stats

    if method not in BOOTSTRAP_METHODS:
        raise ValueError(f"bootstrap method must be one of {BOOTSTRAP_METHODS}, got {method!r}")
    if n < 2:
        return math.nan, math.nan

    def statistic(idx, axis=-1):
        idx = np.asarray(idx)
        return np.asarray(stat(idx.reshape(-1, idx.shape[-1])), dtype=np.float64).reshape(idx.shape[:-1])

    with warnings.catch_warnings():
        # A degenerate distribution (identical runs) is handled below; scipy's warning would only repeat it.
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        with np.errstate(divide="ignore", invalid="ignore"):
            res = stats.bootstrap((np.arange(n),), statistic, vectorized=True, n_resamples=n_boot,
                                  confidence_level=level, method=method, rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    dist = res.bootstrap_distribution
    if not (math.isfinite(lo) and math.isfinite(hi)) and np.isfinite(dist).all() and np.ptp(dist) == 0:
        return float(dist[0]), float(dist[0])
    return lo, hi


# Differences below the reports' 4-decimal precision count as no difference (float noise of two equal models).
RESOLUTION = 5e-5


def verdict(lo: float, hi: float, higher_is_better: bool) -> str:
    """Plain words for a difference interval of GMD - joint."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= RESOLUTION and hi >= -RESOLUTION:
        return "not distinguishable"
    gmd_better = (lo > 0) == higher_is_better
    return "GMD better" if gmd_better else "joint better"


def comparison_markdown(rows: list[dict], *, n: int, unit: str, detail: str = "", level: float = 0.95,
                        method: str = "BCa") -> str:
    """Table of paired differences. ``rows``: dicts with combination, metric, joint, gmd, diff, lo, hi,
    higher_is_better; ``n`` units (e.g. 4 "test cases") were resampled (``method``: the bootstrap's). Ends with a
    plain count of the cells where GMD and joint are not distinguishable; under ``LOW_POWER_UNITS`` units every
    verdict is flagged low-powered."""
    pct = f"{round(level * 100)}%"
    low = n < LOW_POWER_UNITS
    lines = [f"| combination | metric | joint | GMD | GMD − joint | {pct} interval | verdict |",
             "|---|---|---|---|---|---|---|"]
    counts: dict[str, int] = {}
    for r in rows:
        v = verdict(r["lo"], r["hi"], r["higher_is_better"])
        counts[v] = counts.get(v, 0) + 1
        ci = f"[{r['lo']:+.4f}, {r['hi']:+.4f}]" if math.isfinite(r["lo"]) else "n/a"
        shown = f"{v} (low-powered)" if low and v != "not distinguishable" else v
        lines.append(f"| {r['combination']} | {r['metric']} | {r['joint']:.4f} | {r['gmd']:.4f} | {r['diff']:+.4f} | "
                     f"{ci} | {shown} |")
    nd = counts.get("not distinguishable", 0)
    units = unit if n != 1 else unit.rstrip("s")
    how = (f"{pct} {method} bootstrap (scipy.stats.bootstrap) over the {n} {units} (2000 resamples, paired: both "
           f"runs scored on the same resampled {units}{detail})" if n >= 2
           else f"none: {n} {units} cannot estimate the spread")
    summary = (f"Intervals: {how}. A difference counts when its interval excludes 0 by more than the tables' "
               f"precision ({RESOLUTION:g}). **GMD and joint training are not distinguishable in {nd} of "
               f"{len(rows)} cells**; GMD better in {counts.get('GMD better', 0)}, joint better in "
               f"{counts.get('joint better', 0)}.")
    if nd == len(rows):
        summary += " On this data the comparison shows no difference between the two."
    if low:
        summary = (f"**Low-powered: {n} {units} (fewer than {LOW_POWER_UNITS}).** Bootstrap intervals over so few "
                   f"units under-cover, and many cells are compared at once: read any verdict as a hint to check on "
                   f"more data, not as a finding. " + summary)
    return "\n".join(lines) + "\n\n" + summary + "\n"


def plot_per_combination(path: Path, runs: dict, metrics: Sequence[str], *, title: str,
                         errors: dict | None = None, ylim: tuple | dict | None = None, rows: int = 1) -> None:
    """Bars per modality combination, one panel per metric (on ``rows`` rows), one colour per run.

    ``runs``: {label: {combination: {metric: value}}}; ``errors`` the same shape (error bars) or None; ``ylim`` one
    (low, high) for every panel or {metric: (low, high)}. ``title`` should say which data the numbers are on.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(runs.values())))
    cols = math.ceil(len(metrics) / rows)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 5 * rows), squeeze=False)
    width = 0.8 / len(runs)
    pos = np.arange(len(names))
    for ax, metric in zip(axes.flat, metrics):
        for j, (label, per) in enumerate(runs.items()):
            err = [errors[label][n][metric] for n in names] if errors else None
            ax.bar(pos + (j - (len(runs) - 1) / 2) * width, [per[n][metric] for n in names], width, yerr=err,
                   capsize=2, label=label)
        ax.set_title(metric)
        ax.set_xlabel("modalities present at test time")
        ax.set_ylabel(metric)
        ax.set_xticks(pos, names, rotation=90, fontsize=8)
        limits = ylim.get(metric) if isinstance(ylim, dict) else ylim
        if limits:
            ax.set_ylim(*limits)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def dominance_markdown(csv_path: Path, link: str, modalities: Sequence[str]) -> list[str]:
    """Report lines that explain and link the dominance plot of a GMD run and summarise ``monitor.csv``."""
    if not csv_path.is_file():
        return []
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    q = max(1, len(rows) // 4)

    def mean(key, part):
        vals = [float(r[key]) for r in part if r.get(key) not in ("", None)]
        vals = [v for v in vals if math.isfinite(v)]
        return f"{np.mean(vals):.3f}" if vals else "n/a"

    lines = [f"Modality dominance during training ([{link}]({link}), from monitor.csv, {len(rows)} steps): the "
             "left and middle panels are the mean cosine between the gradients of every pair of modality-subset "
             "objectives before and after GMD's projection (blue: the objectives pull the shared weights in "
             "opposite directions); the right panel is the histogram of the angles between them — angles above "
             "90° are the conflicts GMD projects away. The dominance score D_m (docs of "
             "gmd_ext.gmd.monitor) is the share of the full-set gradient that the subsets containing modality m "
             "reproduce: the modality with the highest D_m dominates training.", "",
             "| | conflicting pairs per step | " + " | ".join(f"D_{m}" for m in modalities) + " |",
             "|---|---|" + "---|" * len(modalities)]
    for name, part in (("first quarter of the steps", rows[:q]), ("last quarter of the steps", rows[-q:])):
        lines.append(f"| {name} | {mean('num_conflicts', part)} | "
                     + " | ".join(mean(f"dominance/{m}", part) for m in modalities) + " |")
    return lines + [""]
