"""`GMD`: the GMD engine for ordinary PyTorch training loops (docs/design.md §1, §8; docs/engine.md).

Three parts composed by the caller — a gradient source (gmd_ext/gmd/sources.py), a communicator
(gmd_ext/gmd/comm.py, fsdp.py) and an aggregator (gmd_ext/gmd/aggregators.py), fitted together by the rules of
gmd_ext/gmd/plan.py — and, here, what only the engine does: the torch.optim.Optimizer protocol, accumulation
across backward calls, non-finite handling and the monitor.
"""
from __future__ import annotations

import copy
import functools
import types
import weakref
from collections.abc import Callable, Mapping

import torch

from gmd_ext.gmd import plan as plan_, sources, usage as usage_
from gmd_ext.gmd.buffers import GradBuffers
from gmd_ext.gmd.info import StepInfo
from gmd_ext.gmd.losses import check_losses
from gmd_ext.gmd.masks import Pass1
from gmd_ext.gmd.projection import combine

_NONFINITE = ("raise", "skip", "propagate")


def _delegated(name: str) -> property:
    """An attribute of the wrapped optimizer, read and written through (not a copy)."""
    return property(lambda self: getattr(self.optimizer, name), lambda self, v: setattr(self.optimizer, name, v),
                    doc=f"The wrapped optimizer's {name}.")


class GMD(torch.optim.Optimizer):
    """Gradient-guided Modality Decoupling in a standard training loop: a torch.optim.Optimizer wrapping
    `optimizer` (its param_groups, state and defaults are the wrapped optimizer's, so LR schedulers,
    torch.amp.GradScaler.step(gmd) and Lightning take GMD directly)::

        gmd = GMD(optimizer, seed=0)
        for x, y, present in loader:
            gmd.zero_grad()
            losses = subset_losses(model.forward_branches(x, present), y, loss_fn, subsets(mods), present=present)
            info = gmd.backward(losses)      # K per-objective gradients -> one merged gradient on .grad
            gmd.step()

    `backward` computes the K per-objective gradients of the trainable parameters (a [K, N] buffer reused across
    steps), their Gramian Γ, the aggregator's coefficients and the merged gradient in one combination pass; a
    parameter no objective reached keeps ``.grad = None``. Calls accumulate until ``zero_grad()``: after each,
    ``.grad`` holds the aggregation of the accumulated per-objective gradients (micro-batches with losses scaled
    by 1/n equal one call on the whole batch). A gradient put in ``.grad`` by a plain ``loss.backward()`` makes
    ``backward`` raise instead of being discarded.

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
        nonfinite: what a NaN/Inf loss or gradient does: "raise" (ValueError naming the objectives; .grad
            cleared), "skip" (grads cleared, info.skipped, `step()` does nothing; an accumulated step with a
            skipped call stays skipped) or "propagate" (no check, no host synchronisation: the merged gradient is
            NaN everywhere, which torch.amp.GradScaler detects).
        monitor: None or a callable ``monitor(step, info)`` called after every backward.

    `plan` shows the resolved source, communicator and aggregator; docs/engine.md has every combination, the
    measured costs and the AMP recipe.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, aggregator=None, source=None, comm=None,
                 reduction: str = "mean", order="random", seed: int | None = None, backend: str = "auto",
                 monitor: Callable | None = None, ddp_module=None, process_group=None, strategy: str = "auto",
                 nonfinite: str = "raise", communication: str = "auto", memory: str = "default",
                 include_self: bool = True, usage: str = "official", specific=None):
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
                                        owner=id(self))
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"
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

    @property
    def _bufs(self) -> GradBuffers | None:
        return self._s.bufs

    @property
    def _buffers(self):
        return self._s.bufs.buffers if self._s.bufs is not None else []

    # ------------------------------------------------------------------ torch.optim.Optimizer protocol
    # The wrapped optimizer's groups, state and defaults, not copies: a scheduler that sets group["lr"], a
    # GradScaler that unscales group["params"]' grads, a checkpoint of state, all act on the optimizer that steps.
    param_groups = _delegated("param_groups")
    state = _delegated("state")
    defaults = _delegated("defaults")

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the wrapped optimizer; the next backward allocates buffers over the new parameter set."""
        self.optimizer.add_param_group(param_group)

    def register_step_pre_hook(self, hook):
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook):
        return self.optimizer.register_step_post_hook(hook)

    def register_state_dict_pre_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend)

    def __getstate__(self):
        raise TypeError("a GMD engine holds autograd hooks and buffers and cannot be pickled or deep-copied; save "
                        "gmd.state_dict() instead")

    def __repr__(self) -> str:
        bufs = self._s.bufs
        shape = f"K={bufs.K}, N={sum(b.N for b in bufs.buffers)}" if bufs is not None else "K=None, N=None"
        inner = "\n".join("  " + line for line in repr(self.optimizer).splitlines())
        return f"GMD({self.plan.splitlines()[0]}, nonfinite={self.nonfinite!r}, step={self._s.step}, {shape},\n{inner}\n)"

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (the wrapped optimizer's zero_grad) and the accumulated per-objective rows."""
        self.optimizer.zero_grad(set_to_none=set_to_none)  # patched: also clears the rows (_patch_zero_grad)

    def _patch_zero_grad(self, optimizer) -> None:
        """Make the wrapped optimizer's own zero_grad clear the accumulated rows too (loops that keep calling
        optimizer.zero_grad() must not accumulate onto the last step's rows). A weak reference: the optimizer
        does not keep the engine alive."""
        ref = weakref.ref(self)
        inner = optimizer.zero_grad

        @functools.wraps(inner)
        def zero_grad(set_to_none: bool = True):
            engine = ref()
            if engine is not None:
                engine._s.skipped = False
                if engine._bufs is not None:
                    engine._bufs.clear()
            return inner(set_to_none=set_to_none)

        optimizer.zero_grad = zero_grad

    # ------------------------------------------------------------------ backward
    def backward(self, losses) -> StepInfo:
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
        names, values, graphs, subsets = check_losses(losses)
        self._s.last_info = None
        member = usage_.membership(subsets) if self.aggregator.official_usage else None
        params = _trainable(self.optimizer)
        if isinstance(self.source, sources.LowMemory):
            perms = self.aggregator.begin_step(len(values), values[0].device, self._s.step)
            gram, A = self.source.run(graphs, params, self.aggregator, perms, member, sources.finite(values))
            return self._done(self._finish(names, None, gram, A, values))
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
        A, c = self.aggregator.coefficients(gram, perms, scale=self.comm.scale, finite=sources.finite(values))
        merged = combine(rows, c, masks, self.aggregator.shared_scale(len(values)), self.aggregator.backend)
        merged = self.comm.restore(merged)
        if self.comm.scale != 1.0:
            gram = gram * (self.comm.scale * self.comm.scale)
        return self._done(self._finish(names, merged, gram, A, values))

    def _begin(self, params, names, graphs, values):
        """(buffers, this step's order): checks that an accumulating call continues the step it joins."""
        K = len(values)
        self.comm.check(K, values[0].device)
        bufs = self._s.bufs
        if bufs is not None and bufs.K != K and bufs.accumulating():
            raise ValueError(f"gmd_ext.GMD.backward: got {K} objectives, but this step has accumulated {bufs.K} "
                             f"since the last zero_grad(); every call of a step must pass the same objectives "
                             f"(sample subsets once per step, not per micro-batch)")
        source = self._s.source
        self._s.picked = source.pick(graphs, params) if isinstance(source, sources.Auto) else None
        bufs = self._prepare(params, K)
        accumulating = bufs.accumulating()
        if accumulating and names is not None and self._s.step_names is not None and names != self._s.step_names:
            raise ValueError(f"gmd_ext.GMD.backward: the objectives {list(names)} differ from the ones this step "
                             f"has accumulated since the last zero_grad() ({list(self._s.step_names)}); every call "
                             f"of a step must pass the same objectives in the same order")
        self._s.step_names = names
        if not accumulating:
            bufs.reach[:] = False
            self._s.skipped = False
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
        self._s.last_info = info
        self._s.step += 1
        if self.monitor is not None:
            self.monitor(info.step, info)
        return info

    def _finish(self, names, merged, gram, A, values) -> StepInfo:
        loss_tensor = torch.stack([l.detach().float().reshape(()) for l in values])
        K = A.shape[0]
        check = self.nonfinite != "propagate"
        if gram.device.type != "cpu" and (check or self.monitor is not None):
            # The step's one synchronisation: losses, Γ and A in one device-to-host copy.
            pack = torch.cat([loss_tensor.to(gram.device), gram.flatten(), A.flatten()]).cpu()
            loss_tensor, gram, A = pack[:K], pack[K:K + K * K].view(K, K), pack[K + K * K:].view(K, K)
        info = StepInfo(self._s.step, names, gram, A, loss_tensor)
        if check:
            bad = ~(torch.isfinite(loss_tensor) & torch.isfinite(gram.diagonal()))
            if bool(bad.any()):
                which = [names[k] if names else k for k in bad.nonzero().flatten().tolist()]
                reason = (f"the losses or gradients of objectives {which} contain NaN or Inf "
                          f"(losses: {loss_tensor.tolist()})")
                self.zero_grad()
                if self.nonfinite == "raise":
                    raise ValueError(f"gmd_ext.GMD.backward: {reason}; .grad cleared. Use nonfinite='skip' to skip "
                                     f"such steps, or nonfinite='propagate' with torch.amp.GradScaler")
                self._s.skipped = True
                info.skipped, info.reason = True, reason
                return info
        if merged is not None:
            self._s.bufs.set_grads(merged)
        return info

    #: The official implementation's name for `backward` (its PCGrad class calls it pc_backward).
    pc_backward = backward

    def step(self, closure: Callable | None = None):
        """optimizer.step(closure), unless the step was skipped (nonfinite="skip").

        closure: as for any torch.optim.Optimizer — a callable that clears the gradients, computes the losses,
        runs ``gmd.backward(losses)`` and returns a loss; the wrapped optimizer calls it under grad mode."""
        if closure is not None:
            if not callable(closure):
                raise TypeError(f"closure must be a callable or None, got {type(closure).__name__}")
            return self.optimizer.step(torch.enable_grad()(closure))
        if self._s.last_info is not None and self._s.last_info.skipped:
            return None
        return self.optimizer.step()

    def state_dict(self) -> dict:
        """{"step", "generator" (the order RNG state), "optimizer" (optimizer.state_dict())}."""
        return {"step": self._s.step, "generator": self._generator().get_state(),
                "optimizer": self.optimizer.state_dict()}

    def _generator(self) -> torch.Generator:
        return getattr(self.aggregator, "generator", None) or torch.Generator()

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = {"step", "generator", "optimizer"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing keys {sorted(missing)} (expected step, generator, optimizer)")
        step, generator = state_dict["step"], state_dict["generator"]
        if isinstance(step, bool) or not isinstance(step, (int, torch.Tensor)) or int(step) < 0:
            raise ValueError(f"state_dict['step'] must be a non-negative int, got {step!r}")
        if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8:
            raise TypeError(f"state_dict['generator'] must be a torch.Generator state (uint8 tensor), "
                            f"got {type(generator).__name__}")
        # All or nothing: a state that fails to load part-way leaves the engine and its optimizer as they were.
        gen = self._generator()
        saved_generator, saved_optimizer = gen.get_state(), copy.deepcopy(self.optimizer.state_dict())
        try:
            gen.set_state(generator)
            self.optimizer.load_state_dict(state_dict["optimizer"])
        except Exception:
            gen.set_state(saved_generator)
            self.optimizer.load_state_dict(saved_optimizer)
            raise
        self._s.step = int(step)

    def close(self) -> None:
        """Remove the gradient hooks this engine put on the parameters."""
        if self._s.bufs is not None:
            self._s.bufs.close()

    def __del__(self):
        try:
            if self._s.owner == id(self):  # not a wrapper sharing this engine's state (Lightning's)
                self.close()
        except Exception:  # interpreter shutdown: nothing left to clean
            pass


def _trainable(optimizer) -> list:
    """The trainable (requires_grad) parameters of every group, in order: the engine's columns."""
    return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
