"""The per-objective gradient buffers of the GMD engine (docs/design.md §1).

The per-objective gradients are never copied out of autograd: while objective k is differentiated every trainable
parameter's `.grad` is a view into row k of a preallocated [K, N] buffer (one per (device, dtype)), and autograd's
AccumulateGrad adds into an existing `.grad` in place (`variable_grad += new_grad` when grad mode is off, which it
is during a first-order backward). A post-accumulate-grad hook per parameter records which objectives reached it
— exact, and one Python call per (parameter, objective) — and checks the in-place contract held (if autograd ever
replaced `.grad`, the hook copies the new tensor into the row once and warns).
"""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import numpy as np
import torch

GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Buffer:
    """The [K, N] per-objective gradient rows of the parameters sharing one (device, dtype), and their views."""

    def __init__(self, params, index, K, rows=None, width=None):
        self.params = params          # parameters in optimizer order
        self.index = index            # their positions in the engine's flat parameter list
        p0 = params[0]
        self.sizes = [p.numel() for p in params]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).tolist()
        self.N = int(sum(self.sizes))
        # Same strides as the parameter when it is dense (channels_last, transposed...), so elementwise
        # accumulation walks both in the same memory order; contiguous otherwise (empty_like's rule).
        self.strides = [torch.empty_like(p, device="meta").stride() for p in params]
        # rows < K: objective k is differentiated into row k % rows (a communication that moves each row off the
        # rank right after its backward pass needs one); width >= N pads each row (shardable into equal parts).
        self.width = self.N if width is None else width(self.N)
        if self.width < self.N:
            raise ValueError(f"row width {self.width} < {self.N} elements")
        self.G = torch.zeros((K if rows is None else rows, self.width), dtype=p0.dtype, device=p0.device)
        self.views = [self.row_views(self.G, k) for k in range(self.G.shape[0])]

    def row_views(self, flat: torch.Tensor, k: int = 0):
        base = flat.storage_offset() + k * self.width
        return [flat.as_strided(p.shape, s, base + o) for p, s, o in zip(self.params, self.strides, self.offsets)]

    def batched_view(self, j: int):
        """[K, *shape_j] view of parameter j's slice in every row."""
        p = self.params[j]
        return self.G.as_strided((self.G.shape[0], *p.shape), (self.width, *self.strides[j]),
                                 self.G.storage_offset() + self.offsets[j])


def check_params(params) -> None:
    if not params:
        raise ValueError("optimizer has no trainable parameters (none with requires_grad=True)")
    for k, p in enumerate(params):
        if p.dtype not in GRAD_DTYPES:
            raise TypeError(f"GMD supports float32/float16/bfloat16 parameters, parameter {k} of the optimizer "
                            f"is {p.dtype}")
        if p.is_sparse:
            raise TypeError(f"parameter {k} of the optimizer is sparse; GMD needs dense parameters")


class RowState:
    """What the engine tracks about K per-objective gradient rows over `params` besides the rows themselves:
    `reach[k, i]` (objective k's graph reached parameter i) and the accumulation state. GMD.backward accumulates
    until zero_grad: `keep` tells a fill to add into the rows instead of starting from zero (fills only set reach
    flags: the engine clears them at the first call of a step, even where a rank restarts its rows);
    `merged[i]` is the .grad the engine last set on parameter i; `foreign` records a backward pass outside the
    engine's (a plain loss.backward())."""

    def __init__(self, params: list, K: int):
        self.params = params
        self.reach = np.zeros((K, len(params)), dtype=np.bool_)
        self.keep = False
        self.fresh = True
        self.merged: list = [None] * len(params)
        self.foreign = False
        self._merged_bufs: list = []
        self._versions: list = []

    @property
    def K(self) -> int:
        return self.reach.shape[0]

    def matches(self, params, K) -> bool:
        return K == self.K and self.matches_params(params)

    def matches_params(self, params) -> bool:
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    def holds_gradients(self) -> bool:
        """Whether a step is accumulating in these rows (no zero_grad since, some merged gradient in .grad)."""
        return not self.fresh and any(p.grad is not None for p in self.params)

    def check_continuation(self, params, K: int, names, step_names) -> None:
        """Raise when a backward call would join the step accumulating in these rows with other parameters or
        other objectives (its rows could not be added to the accumulated ones)."""
        if not self.matches_params(params):
            if self.holds_gradients():
                raise RuntimeError("gmd_ext.GMD.backward: the trainable parameters changed (a parameter frozen or "
                                   "unfrozen, or add_param_group) while this step's per-objective gradients were "
                                   "accumulating; call gmd.zero_grad() before changing them")
        elif K != self.K:
            if self.accumulating():
                raise ValueError(f"gmd_ext.GMD.backward: got {K} objectives, but this step has accumulated "
                                 f"{self.K} since the last zero_grad(); every call of a step must pass the same "
                                 f"objectives (sample subsets once per step, not per micro-batch)")
        elif names is not None and step_names is not None and names != step_names and self.accumulating():
            raise ValueError(f"gmd_ext.GMD.backward: the objectives {list(names)} differ from the ones this step "
                             f"has accumulated since the last zero_grad() ({list(step_names)}); every call of a "
                             f"step must pass the same objectives in the same order")

    def clear(self) -> None:
        """Forget the accumulated rows (zero_grad): the next fill starts from zero."""
        self.fresh = True
        self.foreign = False

    def record(self, merged: list) -> None:
        """Remember the merged buffers behind .grad and their version counters: an in-place edit of .grad between
        accumulating calls (clip_grad_norm_, GradScaler.unscale_) bumps them."""
        self._merged_bufs = list(merged)
        self._versions = [m._version for m in merged]

    def accumulating(self) -> bool:
        """Whether the next fill adds to the rows: True when the rows hold this step's earlier backward calls
        (no zero_grad since, and every parameter's .grad is still the merged gradient the engine set), False after
        a zero_grad (GMD's, or any that cleared every .grad to None). Raises when a gradient from outside the
        engine is in .grad (GMD would discard it), when some parameters' .grad were cleared and others kept, or
        when .grad was edited in place since the last call (GMD would silently undo the edit)."""
        foreign = self.foreign
        mine, cleared = [], []
        for i, p in enumerate(self.params):
            g, m = p.grad, self.merged[i]
            if g is None:
                if m is not None:
                    cleared.append(i)
            elif g is m:
                mine.append(i)
            else:
                foreign = True
        if foreign:
            raise RuntimeError(
                "gmd_ext.GMD.backward: a parameter's .grad holds a gradient from outside GMD (a plain "
                "loss.backward(), or .grad assigned) since the last zero_grad(); GMD would discard it. Pass that "
                "loss to gmd.backward with the objectives, or call gmd.zero_grad() first")
        if self.fresh or not mine:
            return False
        if cleared:
            raise RuntimeError(
                f"gmd_ext.GMD.backward: the .grad of trainable parameters {cleared[:8]} was cleared (set to None) "
                f"between accumulating backward calls while the others kept theirs; GMD accumulates every "
                f"parameter's per-objective gradients until zero_grad(), so one .grad cannot be dropped alone: "
                f"call gmd.zero_grad() to start a new step")
        if [m._version for m in self._merged_bufs] != self._versions:
            raise RuntimeError(
                "gmd_ext.GMD.backward: .grad was modified in place (e.g. clip_grad_norm_ or GradScaler.unscale_) "
                "between accumulating backward calls; GMD recomputes .grad from the accumulated per-objective "
                "gradients at every call, which would silently undo the edit: modify .grad after the step's last "
                "backward call, or call gmd.zero_grad() to start a new step")
        return True


class GradBuffers(RowState):
    """K rows of per-objective gradients over `params`, filled by backward passes (RowState: reach flags and
    accumulation state)."""

    def __init__(self, params: list, K: int, rows: int | None = None, width: Callable[[int], int] | None = None):
        check_params(params)
        groups: dict = {}
        for i, p in enumerate(params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        # The only place a [K, N] buffer is created: first step, or K / parameters changed.
        self.buffers = [Buffer([params[i] for i in idx], idx, K, rows, width) for idx in groups.values()]
        super().__init__(params, K)
        self._slot = [None] * len(params)  # parameter i -> (buffer, position in it)
        for b in self.buffers:
            for j, i in enumerate(b.index):
                self._slot[i] = (b, j)
        self._row = None                   # the objective being differentiated, else None
        self._warned = False
        ref = weakref.ref(self)
        self._handles = [p.register_post_accumulate_grad_hook(_hook(ref, i)) for i, p in enumerate(params)]

    def view(self, k: int, i: int) -> torch.Tensor:
        b, j = self._slot[i]
        return b.views[k % len(b.views)][j]

    def fill_sequential(self, losses, after_row: Callable[[int], None]) -> None:
        """One backward pass per objective into its row (None: a zero row); `after_row(k)` runs right after row k
        is complete."""
        last = last_graph(losses)
        try:
            for k, loss in enumerate(losses):
                for b in self.buffers:
                    # Autograd adds into the row views; zeroing row k right before its pass keeps it cache-warm.
                    if not self.keep or b.G.shape[0] < self.K:  # a scratch row always starts from zero
                        b.G[k % b.G.shape[0]].zero_()
                if loss is not None:
                    for i, p in enumerate(self.params):
                        p.grad = self.view(k, i)
                    self._row = k
                    loss.backward(retain_graph=k < last)
                    self._row = None
                after_row(k)
        finally:
            self._row = None

    def fill_batched(self, losses) -> bool:
        """All rows from one vmapped `torch.autograd.grad`; False (rows untouched) when the model cannot vmap."""
        L = stack_graphs(losses)
        if L is None:  # no objective has a graph: every row is zero
            if not self.keep:
                for b in self.buffers:
                    b.G.zero_()
            return True
        K = L.shape[0]
        eye = torch.eye(K, dtype=L.dtype, device=L.device)
        try:
            grads = torch.autograd.grad(L, self.params, grad_outputs=eye, is_grads_batched=True,
                                        allow_unused=True, retain_graph=True)
        except RuntimeError as e:
            warnings.warn(f"gmd_ext.GMD: strategy='batched' is not supported by this model ({e}); falling back "
                          f"to strategy='sequential' for the rest of training", RuntimeWarning, stacklevel=3)
            return False
        target = {id(p): i for i, p in enumerate(self.params)}
        for k, loss in enumerate(losses):
            self.reach[k, _reached(loss, target)] = True
        for b in self.buffers:
            for j, i in enumerate(b.index):
                g, view = grads[i], b.batched_view(j)
                if self.keep:
                    if g is not None:
                        view.add_(g)
                elif g is None:
                    view.zero_()
                else:
                    view.copy_(g)
        return True

    def set_grads(self, merged) -> None:
        """`.grad` of every parameter: its view of the merged gradient (one [N_b] per buffer), None where no
        objective reached it."""
        reach_any = self.reach.any(0)
        for b, m in zip(self.buffers, merged):
            for p, v, i in zip(b.params, b.row_views(m), b.index):
                p.grad = v if reach_any[i] else None
                self.merged[i] = p.grad
        self.record(merged)

    def _accumulated(self, p, i):
        k = self._row
        self.reach[k, i] = True
        view = self.view(k, i)
        if p.grad is not view:
            # Autograd replaced .grad instead of adding into it (e.g. a backward under create_graph=True).
            if not self._warned:
                self._warned = True
                warnings.warn("gmd_ext.GMD: autograd replaced a parameter's .grad instead of accumulating into "
                              "the engine's buffer view; copying it into the buffer (one extra copy per such "
                              "parameter)", RuntimeWarning, stacklevel=2)
            view.copy_(p.grad)
            p.grad = view

    def close(self) -> None:
        """Remove the gradient hooks from the parameters."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _hook(ref, i):
    def hook(p):
        bufs = ref()
        if bufs is not None:
            if bufs._row is not None:
                bufs._accumulated(p, i)
            else:
                bufs.foreign = True  # a backward pass outside the engine accumulated into .grad
    return hook


def last_graph(losses) -> int:
    """Index of the last loss with a graph (losses: tensors, or None for an objective without one); -1 if none."""
    return max((k for k, l in enumerate(losses) if l is not None), default=-1)


def stack_graphs(losses) -> torch.Tensor | None:
    """[K] stack of the losses, a zero (no graph) for None; None when no loss has a graph."""
    like = next((l for l in losses if l is not None), None)
    if like is None:
        return None
    return torch.stack([like.new_zeros(()) if l is None else l.reshape(()) for l in losses])


def walk_graph(root, target: dict, stop_mark: str | None = None, users: dict | None = None):
    """The one walk of an autograd graph, breadth-first from the node `root` (None: an empty graph).

    Returns (marked, inner, leaves): the nodes whose metadata holds `stop_mark` (collected, not walked past), the
    set of the other non-leaf nodes, and the indices (values of `target`, keyed by id(param)) of the parameters
    whose AccumulateGrad nodes it meets, in breadth-first order. `users`, when given, gets users[i] |= the nodes
    that take parameter i as an input."""
    marked, inner, leaves = [], set(), []
    frontier, seen = ([root], {root}) if root is not None else ([], set())
    while frontier:
        nxt = []
        for fn in frontier:
            var = getattr(fn, "variable", None)  # AccumulateGrad nodes hold their leaf
            if var is not None:
                i = target.get(id(var))
                if i is not None:
                    leaves.append(i)
                continue
            if stop_mark is not None and stop_mark in fn.metadata:
                marked.append(fn)
                continue
            inner.add(fn)
            for f, _ in fn.next_functions:
                if f is None:
                    continue
                if users is not None:
                    var = getattr(f, "variable", None)
                    if var is not None and id(var) in target:
                        users.setdefault(target[id(var)], set()).add(fn)
                if f not in seen:
                    seen.add(f)
                    nxt.append(f)
        frontier = nxt
    return marked, inner, leaves


def walk_loss(loss, target: dict, stop_mark: str | None = None, users: dict | None = None):
    """walk_graph from a loss: None (an objective without a graph) walks nothing; a loss that is itself a
    parameter reaches it."""
    if loss is None:
        return [], set(), []
    if loss.grad_fn is None:
        i = target.get(id(loss))
        return [], set(), ([i] if i is not None else [])
    return walk_graph(loss.grad_fn, target, stop_mark, users)


def _reached(loss, target: dict) -> list[int]:
    """Indices (values of `target`, keyed by id(param)) of the leaves the autograd graph of `loss` reaches."""
    return walk_loss(loss, target)[2]
