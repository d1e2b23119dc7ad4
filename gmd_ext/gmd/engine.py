"""`GMD`: the GMD engine for ordinary PyTorch training loops (docs/design.md §1, §8; docs/engine.md).

Three parts composed by the caller — a gradient source (gmd_ext/gmd/sources.py), a communicator
(gmd_ext/gmd/comm.py, fsdp.py) and an aggregator (gmd_ext/gmd/aggregators.py), fitted together by the rules of
gmd_ext/gmd/plan.py — and, here, what only the engine does: the torch.optim.Optimizer protocol, accumulation
across backward calls, non-finite handling and the monitor.
"""
from __future__ import annotations

import functools
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

from gmd_ext.gmd import plan as plan_, sources, usage as usage_
from gmd_ext.gmd.buffers import GradBuffers
from gmd_ext.gmd.info import StepInfo
from gmd_ext.gmd.losses import check_losses
from gmd_ext.gmd.masks import Pass1, rescue_overflow
from gmd_ext.gmd.projection import combine
from gmd_ext.gmd.protocol import WrappedOptimizer

_NONFINITE = ("raise", "skip", "propagate")


class GMD(WrappedOptimizer):
    """Gradient-guided Modality Decoupling in a standard training loop: a torch.optim.Optimizer wrapping
    `optimizer` (its param_groups, state and defaults are the wrapped optimizer's, so LR schedulers,
    torch.amp.GradScaler.step(gmd) and Lightning take GMD directly)::

        gmd = GMD(optimizer, seed=0)
        for x, y, present in loader:
            gmd.zero_grad()
            losses = subset_losses(model.forward_branches(x, present), y, loss_fn, subsets(mods), present=present)
            info = gmd.backward(losses)      # K per-objective gradients -> one merged gradient on .grad
            gmd.step()

    `backward`: the K per-objective gradients of the trainable parameters (a [K, N] buffer reused across steps),
    their Gramian Γ, the aggregator's coefficients, the merged gradient in one combination pass (``.grad = None``
    where no objective reached). Calls accumulate until ``zero_grad()`` (micro-batches with losses scaled by 1/n
    equal one call on the whole batch); a gradient from a plain ``loss.backward()`` in ``.grad`` makes it raise.

    Args:
        optimizer: a torch.optim.Optimizer over float32/float16/bfloat16 parameters.
        aggregator: None (the official GMD projection, configured by the arguments below), a
            gmd_ext.gmd.GMDProjection, or any Gramian weighting: a torchjd GramianWeightedAggregator (UPGrad(),
            MGDA(), ...) or a callable Γ [K, K] -> weights [K] (merged = wᵀ G).
        source: None (from strategy= / memory=) or a gradient source: "auto" | "sequential" | "batched" |
            "branches" | "low_memory" or a gmd_ext.gmd.sources object (e.g. LowMemory(method="sliced")).
        comm: None (from ddp_module= / process_group= / communication=, or FSDP2 when the parameters are
            fully_shard DTensors) or a communicator: Local(), AllReduce(...), ReduceScatter(...), FSDP2().
        reduction, order, seed, include_self, usage, specific: the official projection's arguments
            (gmd_ext.gmd.GMDProjection). backend: "auto" | "cpp" | "triton" | "torch" for the kernels.
        strategy: "auto" | "sequential" | "batched" | "branches"; memory: "default" | "low" (the source).
        ddp_module: the DistributedDataParallel model (kept in no-sync mode: construct GMD before its first
            forward); process_group: a group to average over without DDP; communication: "auto" | "all_reduce" |
            "reduce_scatter" (the communicator).
        nonfinite: a NaN/Inf loss or gradient: "raise" (ValueError naming the objectives; .grad cleared),
            "skip" (info.skipped; the whole accumulated step is dropped until zero_grad() or step(), which does
            nothing; .grad is NaN, so a GradScaler sees it) or "propagate" (no check, no host synchronisation:
            the merged gradient is NaN everywhere, what torch.amp.GradScaler needs).
        monitor: None or a callable ``monitor(step, info)`` called after every backward.

    `plan` shows the resolved parts; docs/engine.md has every combination, the measured costs and the AMP recipe.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, aggregator: Any = None, source: Any = None,
                 comm: Any = None, reduction: Literal["mean", "sum"] = "mean", order: Any = "random",
                 seed: int | None = None, backend: Literal["auto", "cpp", "triton", "torch"] = "auto",
                 monitor: Callable[..., Any] | None = None, ddp_module: Any = None, process_group: Any = None,
                 strategy: Literal["auto", "sequential", "batched", "branches"] = "auto",
                 nonfinite: Literal["raise", "skip", "propagate"] = "raise",
                 communication: Literal["auto", "all_reduce", "reduce_scatter"] = "auto",
                 memory: Literal["default", "low"] = "default", include_self: bool = True,
                 usage: Literal["official", "reach"] = "official", specific: Any = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, GMD):
            raise TypeError("optimizer is already a GMD engine; wrap the underlying torch.optim.Optimizer once")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if monitor is not None and not callable(monitor):
            raise TypeError(f"monitor must be a callable monitor(step, info) or None, got {type(monitor).__name__}")
        params = _trainable(optimizer)
        official = dict(reduction=reduction, order=order, seed=seed, include_self=include_self, usage=usage,
                        specific=specific)
        self.source, self.comm, self.aggregator, self._resolution = plan_.compose(
            params, source=source, comm=comm, aggregator=aggregator, strategy=strategy, memory=memory,
            ddp_module=ddp_module, process_group=process_group, communication=communication, backend=backend,
            official=official)
        self.comm.bind(params)
        self.aggregator.bind(params, self.comm)
        self.optimizer, self.monitor, self.nonfinite = optimizer, monitor, nonfinite
        # Every attribute that changes after construction lives in this one holder, never rebound: Lightning's
        # LightningOptimizer wraps an optimizer by copying its __dict__ into an instance of a subclass, so state
        # written through the wrapper must land in an object the engine shares with it.
        self._s = types.SimpleNamespace(step=0, bufs=None, pass1=None, step_perms=None, step_names=None,
                                        last_info=None, skipped=False, source=self.source, picked=None,
                                        lock=threading.Lock(), spare_generator=torch.Generator(), owner=id(self))
        self._patch_zero_grad(optimizer)

    @property
    def last_info(self) -> StepInfo | None:
        """The StepInfo of the last backward (None before the first, and after a failed one)."""
        return self._s.last_info

    @property
    def strategy(self) -> str:
        """The gradient source's name (the one picked last when it is "auto")."""
        return self._active().name

    @property
    def plan(self) -> str:
        """The resolved parts and every choice made on the caller's behalf (gmd_ext/gmd/plan.py)."""
        picked = f" -> {self._s.picked!r} at the last step" if self._s.picked is not None else ""
        notes = "".join(f"\n  - {n}" for n in self._resolution.notes)
        return f"source={self.source!r}{picked}, comm={self.comm!r}, aggregator={self.aggregator!r}{notes}"

    _bufs = property(lambda self: self._s.bufs)  # the [K, N] rows (tests and benches read them)
    _buffers = property(lambda self: self._s.bufs.buffers if self._s.bufs is not None else [])

    def __repr__(self) -> str:
        bufs = self._s.bufs
        shape = f"K={bufs.K}, N={sum(b.N for b in bufs.buffers)}" if bufs is not None else "K=None, N=None"
        inner = "\n".join("  " + line for line in repr(self.optimizer).splitlines())
        return (f"GMD({self.plan.splitlines()[0]}, nonfinite={self.nonfinite!r}, step={self._s.step}, {shape},"
                f"\n{inner}\n)")

    def _end_step(self) -> None:
        self._s.skipped = False
        if self._s.bufs is not None:
            self._s.bufs.clear()

    # ------------------------------------------------------------------ backward
    def backward(self, losses: Sequence[torch.Tensor] | Mapping[Any, torch.Tensor]) -> StepInfo:
        """Per-objective gradients of `losses` accumulated into the rows, communicated when distributed,
        aggregated, merged into .grad.

        Args:
            losses: a sequence of K scalar float tensors requiring grad, or a dict name -> loss (names flow into
                info.names; gmd_ext.subset_losses' dict also tells which modalities each objective uses). Every
                call until zero_grad() must pass the same K objectives.
        Returns:
            StepInfo (gram, coefficients, cosines, norms, num_conflicts, losses, names, skipped, ...) of the
            accumulated gradients.
        """
        if not self._s.lock.acquire(blocking=False):
            raise RuntimeError("gmd_ext.GMD.backward is already running in another thread: one engine's backward "
                               "calls share its [K, N] rows and .grad, so they must not overlap (serialise them, "
                               "or give each thread its own model and engine)")
        try:
            return self._done(self._backward(*check_losses(losses)))
        finally:
            self._s.lock.release()

    def _backward(self, names, values, graphs, subsets) -> StepInfo:
        self._s.last_info = None
        member = usage_.membership(subsets) if self.aggregator.official_usage else None
        params = _trainable(self.optimizer)
        finite = sources.finite(values)
        if isinstance(self.source, sources.LowMemory):
            perms = self.aggregator.begin_step(len(values), values[0].device, self._s.step)
            gram, A = self.source.run(graphs, params, self.aggregator, perms, member, finite)
            return self._finish(names, None, gram, A, values)
        bufs, perms = self._begin(params, names, graphs, values)
        try:
            with self.comm.backward_context():
                self._fill(bufs, graphs, params)
        except BaseException:
            self.zero_grad()  # a failed backward leaves no partial rows or row views in .grad
            raise
        bufs.fresh = False
        rows = self.comm.local(bufs)
        gram, masks = self._s.pass1.run(rows, member, self.comm)

        def merge(gram):
            A, c = self.aggregator.coefficients(gram, perms, scale=self.comm.scale, finite=finite)
            merged = combine(rows, c, masks, self.aggregator.shared_scale(len(values)), self.aggregator.backend)
            return self.comm.restore(merged), A

        merged, A = merge(gram)
        scale2 = self.comm.scale * self.comm.scale
        rescue = functools.partial(rescue_overflow, rows, merge, scale2, self.comm)
        return self._finish(names, merged, gram * scale2 if scale2 != 1.0 else gram, A, values, rescue)

    def _begin(self, params, names, graphs, values):
        """(buffers, this step's order): checks that an accumulating call continues the step it joins."""
        K = len(values)
        self.comm.check(K, values[0].device)
        if self._s.bufs is not None:
            self._s.bufs.check_continuation(params, K, names, self._s.step_names)
        source = self._s.source
        self._s.picked = source.pick(graphs, params) if isinstance(source, sources.Auto) else None
        bufs = self._prepare(params, K)
        accumulating = bufs.accumulating()
        self._s.step_names = names
        if not accumulating:
            bufs.reach[:] = False
        bufs.keep = self.comm.keep_rows(accumulating)
        # One order per accumulated step: the calls after the first reuse it, so micro-batches equal one call.
        if not accumulating:
            self._s.step_perms = self.aggregator.begin_step(K, bufs.buffers[0].G.device, self._s.step)
        return bufs, self._s.step_perms

    def _prepare(self, params, K: int) -> GradBuffers:
        """The [K, N] row buffers over `params` (reallocated only when K, the parameters or the row count
        change)."""
        full = self._active().full_rows
        bufs = self._s.bufs
        if bufs is None or not bufs.matches(params, K) or bufs.buffers[0].G.shape[0] != self.comm.rows(K, full):
            self.close()
            self._s.bufs = None  # free the old [K, N] buffers before allocating the new ones
            self._s.bufs = bufs = self.comm.buffers(params, K, full)
            self._s.pass1 = Pass1(self.aggregator, bufs, params)
        return bufs

    def _active(self):
        """The source this step runs: the one "auto" picked, else the engine's."""
        return self._s.picked or self._s.source

    def _fill(self, bufs, graphs, params) -> None:
        if not self._active().fill(bufs, graphs, self.comm):  # batched without vmap: warned, sequential from now
            self._s.source, self._s.picked = sources.SEQUENTIAL, None
            bufs = self._prepare(params, len(graphs))
            sources.SEQUENTIAL.fill(bufs, graphs, self.comm)

    def _done(self, info: StepInfo) -> StepInfo:
        """Record the step's info and call the monitor."""
        self._s.last_info = info
        self._s.step += 1
        if self.monitor is not None:
            self.monitor(info.step, info)
        return info

    def _finish(self, names, merged, gram, A, values, rescue=None) -> StepInfo:
        """The StepInfo; .grad set, or the step refused / skipped (nonfinite)."""
        loss_tensor = torch.stack([l.detach().float().reshape(()) for l in values])
        K = A.shape[0]
        check = self.nonfinite != "propagate"
        if gram.device.type != "cpu" and (check or self.monitor is not None):
            # The step's one synchronisation: losses, Γ and A in one device-to-host copy.
            pack = torch.cat([loss_tensor.to(gram.device), gram.flatten(), A.flatten()]).cpu()
            loss_tensor, gram, A = pack[:K], pack[K:K + K * K].view(K, K), pack[K + K * K:].view(K, K)
        reason = None
        if check:
            bad = ~(torch.isfinite(loss_tensor) & torch.isfinite(gram.diagonal()))
            if bool(bad.any()) and rescue is not None and bool(torch.isfinite(loss_tensor).all()):
                redo = rescue()
                if redo is not None:
                    merged, gram, A = redo
                    bad = torch.zeros_like(bad)
            if bool(bad.any()):
                which = [names[k] if names else k for k in bad.nonzero().flatten().tolist()]
                reason = (f"the losses or gradients of objectives {which} contain NaN or Inf "
                          f"(losses: {loss_tensor.tolist()})")
            elif self._s.skipped:
                reason = "an earlier backward call of this accumulated step was skipped (NaN or Inf)"
        info = StepInfo(self._s.step, names, gram, A, loss_tensor)
        if reason is not None:
            return self._skip(info, reason, merged)
        if merged is not None:
            self._s.bufs.set_grads(merged)
        return info

    def _skip(self, info: StepInfo, reason: str, merged) -> StepInfo:
        """nonfinite="raise": raise with .grad cleared. "skip": the whole accumulated step is dropped until
        zero_grad() or step(); .grad is NaN (so torch.amp.GradScaler sees the overflow and lowers its scale) and
        step() does nothing."""
        self.zero_grad()
        if self.nonfinite == "raise":
            raise ValueError(f"gmd_ext.GMD.backward: {reason}; .grad cleared. Use nonfinite='skip' to skip such "
                             f"steps, or nonfinite='propagate' with torch.amp.GradScaler")
        self._s.skipped = True
        if merged is not None:
            for m in merged:
                m.fill_(float("nan"))
            self._s.bufs.set_grads(merged)
        else:  # memory="low" wrote .grad itself
            for p in _trainable(self.optimizer):
                p.grad = torch.full_like(p, float("nan"))
        info.skipped, info.reason = True, reason
        return info

    #: The official implementation's name for `backward` (its PCGrad class calls it pc_backward).
    pc_backward = backward


def _trainable(optimizer) -> list:
    """The trainable (requires_grad) parameters of every group, in order: the engine's columns."""
    return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
