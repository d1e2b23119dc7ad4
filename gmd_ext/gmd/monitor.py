"""Dominance monitor: the paper's gradient indicator of modality dominance, logged per step.

`DominanceMonitor` is a callable ``monitor(step, info)`` for ``GMD(..., monitor=...)`` (or call it yourself with
a `GMD.backward` info). Per step it records the per-objective losses and gradient norms, the cosine matrix,
the number of conflicting pairs, the projection coefficients and — when objectives are modality subsets — a
per-modality dominance score; it writes them to CSV, optionally to TensorBoard, and `plot()` draws the paper's
Fig. 3 (cosine heat map and angle histogram, before vs after projection). The figure can be drawn again from a
saved CSV — all of a resumed run's steps, say — with `plot_csv` (``brats.py dominance --run DIR`` from a shell)::

    from gmd_ext.gmd.monitor import plot_csv
    plot_csv("runs/mosi/mosi_gmd/seed0/monitor.csv", "dominance.png", title="synthetic data")

Dominance score of modality m (needs the full set among the step's objectives): with g_F the full-set
gradient and g_S the gradient of subset S,

    D_m = mean over the step's subsets S ∋ m, S ≠ F of  (g_S · g_F) / ‖g_F‖²  =  cos(g_S, g_F) · ‖g_S‖ / ‖g_F‖,

the share of the full-set gradient that the subsets containing m reproduce (the component of g_S along g_F, in
units of ‖g_F‖). If the model leans on m, every subset with m yields nearly the full-set gradient (D_m ≈ 1)
while the others do not; balanced modalities give similar D_m. NaN when undefined (no full set, ‖g_F‖ = 0, or
no proper subset containing m this step). Read from Γ alone: free.
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gmd_ext.gmd.projection import ProjectionInfo
from gmd_ext.io import atomic_write

_BINS = np.linspace(0.0, 180.0, 91)  # 2° angle bins


class DominanceMonitor:
    """Record the dominance indicators of every GMD step.

    Args:
        path: CSV file to append one row per step to (header written once; an existing file must have the same
            header). None: keep in memory only (for plot()).
        objective_names: the names of all objectives that may appear (fixes the CSV columns; with sampled
            subsets pass ``[s.name for s in subsets(modalities)]``). None: taken from the first step
            (info.names, or "0".."K-1").
        modalities: modality names; when given, objective names are parsed as subsets ("flair+t1ce") and
            per-modality dominance scores are recorded.
        tensorboard_dir: also log scalars with torch.utils.tensorboard (ImportError if tensorboard is missing).
    """

    def __init__(self, path: str | os.PathLike | None = None, objective_names: Sequence[str] | None = None,
                 modalities: Sequence[str] | None = None, tensorboard_dir: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.objective_names = _names(objective_names, "objective_names") if objective_names is not None else None
        self.modalities = _names(modalities, "modalities") if modalities is not None else None
        self._writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(f"DominanceMonitor(tensorboard_dir=...) needs the tensorboard package "
                                  f"(`pip install tensorboard`): {e}") from e
            self._writer = SummaryWriter(os.fspath(tensorboard_dir))
        self._header_checked = False
        self.steps = 0
        self.last: dict | None = None
        self._cos_sum = self._cos_after_sum = self._cos_count = None
        self._hist_before = np.zeros(len(_BINS) - 1, dtype=np.int64)
        self._hist_after = np.zeros(len(_BINS) - 1, dtype=np.int64)

    # ------------------------------------------------------------------ recording
    def __call__(self, step: int, info: ProjectionInfo) -> dict[str, Any]:
        """Record one step. `info`: a GMD StepInfo (or any object with gram, coefficients, losses, names).
        Returns the recorded row as a dict (column -> value)."""
        # The indicators come from the step info; any other object with gram and coefficients gets them derived.
        proj = info if isinstance(info, ProjectionInfo) else ProjectionInfo(info.gram, info.coefficients)
        gram = proj.gram.detach().cpu()
        A = proj.coefficients.detach().cpu()
        K = gram.shape[0]
        names = list(info.names) if getattr(info, "names", None) is not None else None
        if self.objective_names is None:
            self.objective_names = tuple(names) if names is not None else tuple(str(k) for k in range(K))
        if names is None:
            if K != len(self.objective_names):
                raise ValueError(f"info has {K} objectives without names, but the monitor tracks "
                                 f"{len(self.objective_names)} objective_names; pass losses as a dict")
            names = list(self.objective_names)
        unknown = [n for n in names if n not in self.objective_names]
        if unknown:
            raise ValueError(f"objectives {unknown} are not among the monitor's objective_names "
                             f"{list(self.objective_names)}")
        cols = [self.objective_names.index(n) for n in names]

        norms = proj.norms.detach().cpu()
        cos = proj.cosines.detach().cpu()
        cos_after = proj.projected_cosines.detach().cpu()
        losses = [float(v) for v in (info.losses if hasattr(info, "losses") else [math.nan] * K)]
        num_conflicts = proj.num_conflicts
        dominance = self._dominance(names, gram.double()) if self.modalities is not None else {}

        T = len(self.objective_names)
        if bool(torch.isfinite(gram).all()):  # a skipped (NaN/Inf) step would poison the plot's averages
            self._accumulate(cols, cos, cos_after, norms, K, T)

        row = {"step": int(step), "skipped": int(bool(getattr(info, "skipped", False))),
               "num_conflicts": num_conflicts}
        pos = dict(zip(names, range(K)))
        on = self.objective_names
        for n in on:
            row[f"loss/{n}"] = losses[pos[n]] if n in pos else ""
        for n in on:
            row[f"norm/{n}"] = float(norms[pos[n]]) if n in pos else ""
        for m in self.modalities or ():
            row[f"dominance/{m}"] = dominance[m]
        for a in range(T):
            for b in range(a + 1, T):
                both = on[a] in pos and on[b] in pos
                row[f"cos/{on[a]}|{on[b]}"] = float(cos[pos[on[a]], pos[on[b]]]) if both else ""
        for a in range(T):
            for b in range(T):
                both = on[a] in pos and on[b] in pos
                row[f"coef/{on[a]}|{on[b]}"] = float(A[pos[on[a]], pos[on[b]]]) if both else ""
        self.last = row
        self.steps += 1
        if self.path is not None:
            self._append(row)
        if self._writer is not None:
            for key, v in row.items():
                if key.split("/")[0] in ("loss", "norm", "dominance", "num_conflicts") and v != "":
                    self._writer.add_scalar(key, v, int(step))
        return row

    def _accumulate(self, cols, cos, cos_after, norms, K, T):
        if self._cos_sum is None:
            self._cos_sum, self._cos_after_sum = np.zeros((T, T)), np.zeros((T, T))
            self._cos_count = np.zeros((T, T))
        ix = np.ix_(cols, cols)
        self._cos_sum[ix] += cos.numpy()
        self._cos_after_sum[ix] += cos_after.numpy()
        self._cos_count[ix] += 1
        iu = np.triu_indices(K, 1)
        valid = (norms[:, None] * norms[None, :]).numpy()[iu] > 0
        self._hist_before += np.histogram(_angles(cos.numpy()[iu][valid]), _BINS)[0]
        self._hist_after += np.histogram(_angles(cos_after.numpy()[iu][valid]), _BINS)[0]

    def _dominance(self, names, gram) -> dict:
        mods = self.modalities
        sets = {}
        for k, n in enumerate(names):
            parts = n.split("+")
            if any(p not in mods for p in parts):
                raise ValueError(f"objective {n!r} is not a subset of modalities {list(mods)} (names join "
                                 f"modality names with '+', e.g. {'+'.join(mods[:2])!r})")
            sets[k] = frozenset(parts)
        full = [k for k, s in sets.items() if len(s) == len(mods)]
        out = {}
        for m in mods:
            if not full or float(gram[full[0], full[0]]) <= 0:
                out[m] = math.nan
                continue
            F = full[0]
            share = [float(gram[k, F] / gram[F, F]) for k, s in sets.items() if m in s and k != F]
            out[m] = sum(share) / len(share) if share else math.nan
        return out

    def _append(self, row: dict) -> None:
        header = ",".join(row.keys()) + "\n"
        if not self._header_checked:
            exists = os.path.exists(self.path) and os.path.getsize(self.path) > 0
            if exists:
                with open(self.path) as f:
                    first = f.readline()
                if first != header:
                    raise ValueError(f"{self.path}: existing CSV has a different header (other objectives or "
                                     f"modalities); use a new path")
            else:
                with atomic_write(self.path, "w") as f:
                    f.write(header)
            self._header_checked = True
        line = ",".join(_fmt(v) for v in row.values()) + "\n"
        # One write() of a whole line on an O_APPEND file: rows never interleave or tear.
        with open(self.path, "a") as f:
            f.write(line)

    @classmethod
    def from_csv(cls, path: str | os.PathLike[str]) -> DominanceMonitor:
        """A monitor holding every step recorded in a CSV written by a DominanceMonitor (for `plot`; it writes
        nothing). The cosines and coefficients of each row rebuild the step's Γ and A, so the figure equals the
        one the live monitor would draw over the same steps.

        Raises:
            ValueError: the file is not such a CSV or a row is damaged; the message names the file and line.
        """
        path = os.fspath(path)
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                fields = reader.fieldnames or []
                names = [c[len("loss/"):] for c in fields if c.startswith("loss/")]
                mods = [c[len("dominance/"):] for c in fields if c.startswith("dominance/")]
                if not fields or fields[0] != "step" or not names:
                    raise ValueError("no 'step' column first, or no loss/<objective> columns")
                monitor = cls(None, names, mods or None)
                for line, row in enumerate(reader, 2):
                    try:
                        monitor._replay(row)
                    except (KeyError, TypeError, ValueError) as e:
                        raise ValueError(f"line {line}: {type(e).__name__}: {e}") from None
        except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
            raise ValueError(f"{path}: not a readable DominanceMonitor CSV ({e})") from None
        return monitor

    def _replay(self, row: dict[str, str]) -> None:
        on = self.objective_names or ()
        cols = [i for i, n in enumerate(on) if row[f"norm/{n}"] != ""]
        K, T = len(cols), len(on)
        norms = torch.tensor([float(row[f"norm/{on[i]}"]) for i in cols], dtype=torch.float64)
        cos, A = torch.eye(K, dtype=torch.float64), torch.zeros(K, K, dtype=torch.float64)
        for a in range(K):
            for b in range(K):
                if a < b:
                    cos[a, b] = cos[b, a] = float(row[f"cos/{on[cols[a]]}|{on[cols[b]]}"])
                A[a, b] = float(row[f"coef/{on[cols[a]]}|{on[cols[b]]}"])
        gram = cos * norms[:, None] * norms[None, :]
        if bool(torch.isfinite(gram).all()) and bool(torch.isfinite(A).all()):
            proj = ProjectionInfo(gram.float(), A.float())
            self._accumulate(cols, proj.cosines, proj.projected_cosines, proj.norms, K, T)
        self.steps += 1

    # ------------------------------------------------------------------ plotting
    def plot(self, path: str | os.PathLike[str], title: str = "") -> None:
        """Save a PNG: mean cosine matrix before / after projection over the recorded steps, and the histogram
        of pairwise gradient angles before vs after projection (the paper's Fig. 3). ``title``: a line above the
        panels (e.g. the data the run trained on).

        Raises:
            ImportError: matplotlib is not installed (named, with the pip command).
            ValueError: no step with finite gradients was recorded.
        """
        if self._cos_sum is None:
            raise ValueError("DominanceMonitor.plot: no steps with finite gradients recorded yet")
        try:
            import matplotlib
        except ImportError:
            raise ImportError("DominanceMonitor.plot needs matplotlib, which is not installed: pip install "
                              "matplotlib (the recipes' extras from a checkout include it: pip install "
                              "\".[brats]\")") from None

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = os.fspath(path)
        with np.errstate(invalid="ignore"):
            before = self._cos_sum / self._cos_count
            after = self._cos_after_sum / self._cos_count
        names = list(self.objective_names)
        fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
        for ax, mat, panel in ((axes[0], before, "cosine before projection"),
                               (axes[1], after, "cosine after projection")):
            im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
            ax.set_title(f"{panel} (mean of {self.steps} step{'' if self.steps == 1 else 's'})")
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.set_xlabel("objective j (modality subset)")
            ax.set_ylabel("objective i (modality subset)")
            fig.colorbar(im, ax=ax, fraction=0.046)
        centers = (_BINS[:-1] + _BINS[1:]) / 2
        width = _BINS[1] - _BINS[0]
        axes[2].bar(centers, self._hist_before, width=width, alpha=0.6, label="before projection")
        axes[2].bar(centers, self._hist_after, width=width, alpha=0.6, label="after projection")
        axes[2].axvline(90, color="k", lw=0.8, ls="--")
        axes[2].set_xlabel("angle between objective gradients (degrees)")
        axes[2].set_ylabel("pairs")
        axes[2].legend()
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        with atomic_write(path, "wb") as f:
            fig.savefig(f, dpi=100, format="png", bbox_inches="tight")
        plt.close(fig)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def plot_csv(csv_path: str | os.PathLike[str], png_path: str | os.PathLike[str], title: str = "") -> None:
    """Draw the dominance figure of every step in a saved monitor CSV (`DominanceMonitor.from_csv` + `plot`)."""
    DominanceMonitor.from_csv(csv_path).plot(png_path, title=title)


def _names(values, what) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{what} must be a sequence of strings, got {type(values).__name__}")
    out = tuple(values)
    if not out or any(not isinstance(v, str) or not v for v in out) or len(set(out)) != len(out):
        raise ValueError(f"{what} must be distinct non-empty strings, got {list(out)}")
    return out


def _angles(cos: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return repr(v)
    return str(v)

