"""The gradient source of the GMD engine: how the K per-objective gradients are produced (docs/design.md §8,
docs/engine.md).

Each source fills the engine's [K, N] rows (gmd_ext/gmd/buffers.py; FSDP2: the [K, N/W] local shards,
gmd_ext/gmd/fsdp.py) and hands each completed row to the communicator (`row_done` after row k, or `rows_done`
once every row is complete). An objective without a graph (None: none of its modalities present) is a zero row.

- `Sequential()`: one backward pass per objective, straight into its row (autograd accumulates into row views).
- `Batched()`: one vmapped `torch.autograd.grad` over the K losses (pays off when the objectives share one graph).
- `Branches()`: late-fusion models whose branch outputs are marked (the library's `forward_branches`): one
  backward per branch with the cotangents of every objective using it batched (gmd_ext/gmd/branches.py).
- `LowMemory(method)`: no [K, N] buffer; the Gramian parameter by parameter, then one backward of Σ c_k L_k
  (gmd_ext/gmd/lowmem.py; method "auto" | "batched" | "sliced").
- `Auto()`: Branches when the losses reach marked branch outputs, else Sequential (decided at each step's first
  backward; once a step has no marked branch, Sequential for good). `GMD.plan` says what it picked.
"""
from __future__ import annotations

import warnings

import torch

from gmd_ext.gmd import branches, lowmem, usage
from gmd_ext.gmd.orders import to_device


class Sequential:
    name = "sequential"
    full_rows = False  # a communicator may move each row off the rank right after its pass (a scratch row)

    def fill(self, bufs, losses, comm) -> bool:
        bufs.fill_sequential(losses, lambda k: comm.row_done(bufs, k))
        return True

    def __repr__(self) -> str:
        return "Sequential()"


class Batched:
    name = "batched"
    full_rows = True

    def fill(self, bufs, losses, comm) -> bool:
        """False (rows untouched, a warning given) when the model does not support vmap."""
        if not bufs.fill_batched(losses):
            return False
        comm.rows_done(bufs)
        return True

    def __repr__(self) -> str:
        return "Batched()"


class Branches:
    name = "branches"
    full_rows = True  # every row is complete only after the last branch: a row-wise communicator takes them then

    def __init__(self):
        self._warned = False

    def fill(self, bufs, losses, comm) -> bool:
        """Losses that reach no marked branch output run sequentially (said once: a RuntimeWarning)."""
        if branches.fill(bufs, losses):
            comm.rows_done(bufs)
            return True
        if not self._warned and any(l is not None for l in losses):
            self._warned = True
            warnings.warn("gmd_ext.GMD: the branches gradient source found no marked branch output in the losses' "
                          "graphs (a model's forward_branches built on gmd_ext.ds.packed.branch_output); running "
                          "these steps with the sequential source", RuntimeWarning, stacklevel=4)
        return SEQUENTIAL.fill(bufs, losses, comm)

    def __repr__(self) -> str:
        return "Branches()"


class Auto:
    name = "auto"

    def __init__(self):
        self.latched = None  # Sequential() once a step had no marked branch

    def pick(self, losses, params):
        """The source for this step's losses."""
        if self.latched is None and branches.reaches_branches(losses, params):
            return BRANCHES
        if any(l is not None for l in losses):  # a step with graphs and no marked branch: no walk from now on
            self.latched = SEQUENTIAL
        return SEQUENTIAL

    def __repr__(self) -> str:
        return "Auto()"


class LowMemory:
    """No [K, N] buffer: single process, no accumulation across backward calls (gmd_ext/gmd/lowmem.py)."""
    name = "low_memory"

    def __init__(self, method: str = "auto"):
        if method not in lowmem.METHODS:
            raise ValueError(f"method must be one of {lowmem.METHODS}, got {method!r}")
        self.method = method

    def run(self, losses, params, aggregator, perms, member, finite):
        """(Γ [K, K], A [K, K]) with the merged gradient already in .grad."""
        if any(p.grad is not None for p in params):
            raise RuntimeError('gmd_ext.GMD(memory="low") keeps no per-objective rows, so it cannot accumulate '
                               'several backward calls or keep a gradient already in .grad: call gmd.zero_grad() '
                               'before each backward (use memory="default" for gradient accumulation)')
        rules = [aggregator.rule(p, i) for i, p in enumerate(params)] if aggregator.official_usage else None
        gram, reach, norms = lowmem.gram(losses, params, aggregator.backend, rules, self.method)
        A, c = aggregator.coefficients(gram, perms, finite=finite.to(gram.device))
        lowmem.combine(losses, params, c, self._scales(params, rules, reach, norms, aggregator, member, gram))
        return gram, A

    @staticmethod
    def _scales(params, rules, reach, norms, aggregator, member, gram):
        """Per parameter: None (no objective reached it), or the merged gradient's scale there."""
        used = reach.any(0)
        if not aggregator.per_element:
            return [1.0 if r else None for r in used]
        shared_scale = aggregator.shared_scale(reach.shape[0])
        if rules is None:
            shared = usage.reach_shared(reach)
            return [None if not r else (shared_scale if s else 1.0) for r, s in zip(used, shared)]
        if member is not None:
            usage.check_membership(member, usage.declared_modalities(params, rules))
            member = to_device(member, gram.device)
        return [None if not r or n is None else usage.slice_scales(p, d, n, shared_scale, member)
                for p, d, n, r in zip(params, rules, norms, used)]

    def __repr__(self) -> str:
        return f"LowMemory(method={self.method!r})"


SEQUENTIAL, BRANCHES = Sequential(), Branches()  # what Auto picks, and the batched fallback
SOURCES = {"auto": Auto, "sequential": Sequential, "batched": Batched, "branches": Branches,
           "low_memory": LowMemory}


def as_source(source):
    """A source object from one of SOURCES' names or an instance."""
    if isinstance(source, str):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {tuple(SOURCES)} or a source object, got {source!r}")
        return SOURCES[source]()
    if not isinstance(source, tuple(SOURCES.values())):
        raise TypeError(f"source must be one of {tuple(SOURCES)} or a gmd_ext.gmd.sources object, got "
                        f"{type(source).__name__}")
    return source


def finite(values) -> torch.Tensor:
    """bool scalar: every loss value is finite (no host synchronisation)."""
    return torch.isfinite(torch.stack([l.detach().float().reshape(()) for l in values])).all()
