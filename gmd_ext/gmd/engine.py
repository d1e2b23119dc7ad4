"""`GMD`: the GMD engine for ordinary PyTorch training loops (docs/design.md §1).

K losses in, one conflict-free gradient out on the parameters' `.grad`. Three parts: the per-objective gradient
buffers (gmd_ext/gmd/buffers.py: K backward passes straight into a [K, N] buffer), their communication across
ranks (gmd_ext/gmd/comm.py), and the projection policy here (order, shared-element masks, reduction, non-finite
handling) on the one two-pass pipeline of `project_conflicts` (gmd_ext/gmd/projection.py `project`).
"""
from __future__ import annotations

import collections
import copy
import functools
import types
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch

from gmd_ext import _backend
from gmd_ext.gmd.buffers import GradBuffers
from gmd_ext.gmd import branches, fsdp, lowmem, usage as usage_
from gmd_ext.gmd.subsets import Subset
from gmd_ext.gmd.usage import Segments
from gmd_ext.gmd.comm import make_comm
from gmd_ext.gmd.projection import ProjectionInfo, coefficients, gram_sum, make_perms, project, to_device

_REDUCTIONS = ("mean", "sum")
_ORDERS = ("random", "sequential")
_STRATEGIES = ("auto", "sequential", "batched", "branches")
_NONFINITE = ("raise", "skip", "propagate")
_MEMORY = ("default", "low")
# Shared-element masks cost N bytes each; a handful covers the reach patterns of sampled subsets in practice.
_MASK_CACHE_SIZE = 8


def _delegated(name: str) -> property:
    """An attribute of the wrapped optimizer, read and written through (not a copy)."""
    return property(lambda self: getattr(self.optimizer, name), lambda self, v: setattr(self.optimizer, name, v),
                    doc=f"The wrapped optimizer's {name}.")


class StepInfo(ProjectionInfo):
    """What one `GMD.backward` saw: a ProjectionInfo (gram, coefficients, cosines, norms, num_conflicts,
    projected_gram, projected_cosines; fp32) plus the step. Reading `losses` or `num_conflicts` may synchronise
    with the device (they are already on the host when the engine synchronised anyway: nonfinite checks on
    CUDA, or a monitor).

    Attributes:
        step: index of this backward call (0-based). names: objective names (keys of a dict of losses, else
        None). skipped: True when nonfinite="skip" dropped this step (reason says why).
        loss_tensor [K]: the loss values (detached). losses: list of K floats.
    """

    _KEYS = ("step", "names", "skipped", "reason", "gram", "coefficients", "cosines", "norms",
             "num_conflicts", "losses", "projected_cosines")

    def __init__(self, step, names, gram, coefficients, loss_tensor, skipped=False, reason=None):
        super().__init__(gram, coefficients)
        self.step = step
        self.names = names
        self.loss_tensor = loss_tensor
        self.skipped = skipped
        self.reason = reason

    @functools.cached_property
    def losses(self) -> list[float]:
        return self.loss_tensor.tolist()

    def __repr__(self):
        return (f"StepInfo(step={self.step}, K={self.gram.shape[0]}, skipped={self.skipped}, "
                f"names={self.names})")


class GMD(torch.optim.Optimizer):
    """Gradient-guided Modality Decoupling for a standard training loop: a torch.optim.Optimizer wrapping
    `optimizer` (its param_groups, state and defaults are the wrapped optimizer's, so LR schedulers,
    torch.amp.GradScaler.step(gmd) and Lightning take GMD directly).

    ::

        gmd = GMD(optimizer, seed=0)
        for batch in loader:
            gmd.zero_grad()
            losses = {s.name: loss_fn(model(x, present=s.mask), y) for s in sample_subsets(mods, 4, g)}
            info = gmd.backward(losses)      # K backward passes, projection, merged gradient on .grad
            gmd.step()

    Parameters are the trainable (requires_grad) parameters of ``optimizer.param_groups``, all groups, in order.
    For every objective i, in the order of row i of the [K, K] order, its gradient is projected against each
    original gradient it conflicts with; the merged gradient is the mean over objectives of the projected
    gradients on the elements every objective uses ("shared") and their sum elsewhere (reduction="sum": sum
    everywhere), "uses" as in the official per-branch code (see `usage`). A parameter no objective reached keeps
    ``.grad = None``. The merged gradient is left in ``.grad`` as views into one flat buffer per (device, dtype);
    the per-objective gradients are computed in place into a [K, N] buffer (rows padded to 64 elements) that is
    reused across steps (reallocated only when K or the parameter set changes).

    Accumulation: per-objective gradients accumulate across ``backward`` calls until ``zero_grad()`` (GMD's, the
    wrapped optimizer's, or any that clears ``.grad``), and after every call ``.grad`` holds the GMD projection
    of the accumulated per-objective gradients — two micro-batches with losses scaled by 1/2 give the merged
    gradient of one call on the whole batch (a random order is drawn once per step, at its first call, and
    reused by the calls that accumulate). Under ddp_module= / process_group= each call
    communicates only its own contribution (rows already reduced are never reduced again). A gradient put in
    ``.grad`` by a plain ``loss.backward()`` (before or between GMD's calls) makes ``backward`` raise instead of
    being silently discarded: pass that loss to ``backward`` with the objectives.

    Args:
        optimizer: a torch.optim.Optimizer over the model's parameters (float32/float16/bfloat16).
        reduction: "mean" (official GMD) or "sum" on shared parameters.
        order: "random" (each row an independent permutation from a torch.Generator seeded by `seed`),
            "sequential", an int64 [K, K] tensor (row i a permutation of 0..K-1; validated once), or a callable
            ``step -> [K, K] tensor`` (validated every step).
        seed: int seed of the order generator; None draws one (under torch.distributed, rank 0's is broadcast,
            so every rank projects in the same order).
        backend: "auto" | "cpp" | "triton" | "torch" for the projection ops (gmd_ext._backend.resolve).
        monitor: None or a callable ``monitor(step, info)`` called after every backward (e.g.
            gmd_ext.gmd.monitor.DominanceMonitor); its info is on the host.
        ddp_module: the DistributedDataParallel-wrapped model. GMD keeps it in no-sync mode for its lifetime
            (DDP decides at *forward* time whether the next backward all-reduces, so wrapping only the backward
            passes in ``no_sync()`` would not stop it — construct GMD before the first forward) and all-reduces
            the [K, N] buffer itself, one asynchronous all-reduce per objective row launched right after that
            row's backward pass, so communication overlaps the next backward. DDP's buffer broadcast (BatchNorm
            running stats) is then off too: use GroupNorm / SyncBatchNorm. A DDP model used *without*
            ``ddp_module=`` fails: after the K forwards DDP expects one backward, so the second of the K
            backward passes raises DDP's "Expected to mark a variable ready only once" (checked on gloo, shared
            and separate forwards alike); GMD re-raises it with this hint.
        process_group: without DDP, all-reduce (average) the buffer on this group (torch.distributed.group.WORLD
            for the default group). Every rank must use the same K and reach the same parameters with each
            objective (sample subsets with identically seeded generators).
        strategy: "auto" (default: "branches" when a loss reaches the marked branch outputs of the library's DS
            models' ``forward_branches``, else "sequential"), "sequential" (K backward passes), "branches" or
            "batched". "branches" (late-fusion models whose branch outputs are marked; gmd_ext/gmd/branches.py):
            one backward per branch with the cotangents of every objective using it batched by torch.func.vmap
            (bench/bench_ds.py, DSUNet3d K = 15: 0.80x the official per-branch execution's step, 1.26x faster
            than sequential; README). "batched": one ``torch.autograd.grad(..., is_grads_batched=True)`` call over
            the K losses, falling back to sequential with one warning when the model does not support vmap; it
            differentiates every objective's graph K times, so it only pays off when the objectives share one
            graph (multi-head; bench/bench_step.py, DSUNet3d, K = 4: 3.1x sequential with subset forwards, 1.08x
            with one shared forward).
        include_self: True (official GMD, LibMTL): g_i is projected against every original gradient, its own
            included; False: torchjd's PCGrad rule (j = i skipped). docs/semantics.md.
        usage: which objectives "use" an element, deciding mean (all do) or sum (some do not).
            "official" (default): as in the official per-branch architecture, decided per segment — a parameter
            tensor, or one modality's slice of a parameter declared modality-specific — so modality m's specific
            elements are unused by subsets without m however the forward batches, packs, stacks or indexes them.
            Declared segments (the DS layers and models declare every parameter; gmd_ext.declare_modality_dim
            and gmd_ext.ops.ds_ops.declare_modality / declare_shared for your own) follow the objectives'
            subsets when the losses come from gmd_ext.subset_losses; the others are used where the objective's
            gradient is non-zero, read from the Gramian pass, which runs segment by segment
            (gmd_ext/gmd/usage.py, docs/semantics.md). "reach": per parameter tensor, by autograd graph reach
            (everything counts as used when one forward is stacked or packed for every objective).
        specific: optional override for usage="official", a mapping parameter -> False (shared: every objective
            uses it, whatever its gradient), True (used where its gradient is non-zero: the default for
            undeclared parameters), an int dim (its slices along dim belong one to each modality; must be its
            outermost dimension in memory) or ("modality", m) (all of it belongs to modality m).
        nonfinite: what a NaN/Inf loss or gradient does. "raise" (ValueError naming the objectives; .grad cleared),
            "skip" (grads cleared, info.skipped = True, `step()` does nothing), or "propagate" (no check, no host
            synchronisation: the merged gradient becomes NaN everywhere — what torch.amp.GradScaler needs, below).

            FSDP2: on a model sharded with torch.distributed.fsdp.fully_shard (its parameters are DTensors) GMD
            needs neither argument: FSDP reduce-scatters each objective's gradient, GMD keeps the K local shards
            (K·N/W per rank), all-reduces their K×K Gramians on the mesh's group and sets the merged shard as the
            DTensor .grad. Supported: a 1-D mesh, any reshard_after_forward, MixedPrecisionPolicy(param_dtype,
            reduce_dtype); not HSDP, not strategy="batched" (gmd_ext/gmd/fsdp.py). fully_shard replaces the
            parameters, so the DS layers' modality declarations do not reach the sharded ones: the official
            reduction then decides from the gradients (per tensor), or from `specific=` over the sharded
            parameters (whole-tensor rules only).
        communication: under ddp_module= / process_group=, "reduce_scatter" (row k reduce-scattered right after
            backward k, the shard Gramians all-reduced, the merged shard all-gathered: (K + 1)·N values sent per
            rank instead of 2·K·N, gradient memory N + K·N/W instead of K·N), "all_reduce" (every row all-reduced)
            or "auto" (reduce_scatter from gmd_ext.gmd.comm.REDUCE_SCATTER_MIN_NUMEL trainable elements on). Both
            equal one process on the concatenated batch (gmd_ext/gmd/comm.py).

        memory: "default" (the [K, N] buffer) or "low" (no [K, N] buffer: the Gramian accumulated parameter by
            parameter, then one backward of the coefficient-weighted sum of the losses; equal to "default").
            Peak gradient memory about N + K·(largest parameter), measured within 1.2·N + K·max|p| and 3.6-9.8x
            below "default" at K = 15 on DSUNet3d and an MLP (README, bench/bench_distributed.py). Where the
            losses have separate graphs or reuse parameters across branches it runs K backwards per parameter
            group (2.1-3.4x the default step on DSUNet3d); on one shared graph that uses each parameter once
            (K heads) one batched backward at about the default step time, with K-wide activation cotangents.
            Single process only, any `strategy` is ignored, no accumulation across backward calls;
            gmd_ext/gmd/lowmem.py.

    AMP recipe (torch.amp.GradScaler)::

        scaler = torch.amp.GradScaler(device)
        gmd = GMD(optimizer, nonfinite="propagate")   # the scaler, not GMD, handles overflow
        with torch.autocast(device, dtype=torch.float16):
            losses = [...]
        gmd.backward([scaler.scale(l) for l in losses])
        scaler.step(gmd.optimizer)      # unscales .grad; skips optimizer.step() if it holds inf/NaN
        scaler.update()

    Projection is scale-invariant (Γ scales by s², the coefficients A not at all), so the scaled merged gradient
    is s times the unscaled one; when any scaled loss, gradient or their Gramian Γ overflows, GMD makes the whole
    merged gradient NaN (through the K combination coefficients: no extra pass, no synchronisation), so
    GradScaler's ``unscale_`` finds it, ``scaler.step`` skips ``optimizer.step()`` and ``scaler.update()`` lowers
    the scale — exactly as without GMD.

    Host synchronisation on CUDA: at most one per step — the finiteness check (nonfinite "raise"/"skip") and
    the monitor's info share one device-to-host copy; none with nonfinite="propagate", no monitor and a
    "random", "sequential" or fixed tensor order (random orders are drawn on the CPU and copied from pinned
    memory). A callable order is validated every step (one synchronisation). Across ranks, one more: every rank
    checks that all ranks pass the same K (a 2-value all-reduce read on the host), so a diverging rank fails fast
    with the ranks' values instead of hanging in mismatched row collectives.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, reduction: str = "mean", order="random",
                 seed: int | None = None, backend: str = "auto", monitor: Callable | None = None,
                 ddp_module=None, process_group=None, strategy: str = "auto", nonfinite: str = "raise",
                 communication: str = "auto", memory: str = "default", include_self: bool = True,
                 usage: str = "official", specific=None):
        if not isinstance(include_self, bool):
            raise TypeError(f"include_self must be a bool, got {type(include_self).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if isinstance(order, str):
            if order not in _ORDERS:
                raise ValueError(f'order must be "random", "sequential", an int64 [K, K] tensor or a callable '
                                 f'step -> tensor, got {order!r}')
        elif not isinstance(order, torch.Tensor) and not callable(order):
            raise TypeError(f'order must be "random", "sequential", an int64 [K, K] tensor or a callable '
                            f'step -> tensor, got {type(order).__name__}')
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if backend not in _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
        if monitor is not None and not callable(monitor):
            raise TypeError(f"monitor must be a callable monitor(step, info) or None, got {type(monitor).__name__}")
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if memory not in _MEMORY:
            raise ValueError(f"memory must be one of {_MEMORY}, got {memory!r}")
        if usage not in usage_.USAGES:
            raise ValueError(f"usage must be one of {usage_.USAGES}, got {usage!r}")
        if isinstance(optimizer, GMD):
            raise TypeError("optimizer is already a GMD engine; wrap the underlying torch.optim.Optimizer once")
        trainable = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if specific is not None and usage != "official":
            raise ValueError('specific= overrides usage="official"; it has no meaning with usage="reach"')
        self._specific = usage_.check_specific(specific, trainable)
        if fsdp.is_sharded(trainable):
            if ddp_module is not None or process_group is not None:
                raise ValueError("GMD on an FSDP2 (fully_shard) model takes its process group from the device "
                                 "mesh: pass neither ddp_module= nor process_group=")
            self.comm = fsdp.FSDPComm(trainable)
        else:
            self.comm = make_comm(ddp_module, process_group, communication, sum(p.numel() for p in trainable))
        if memory == "low" and self.comm.group is not None:
            raise ValueError('memory="low" runs in one process: the Gramian of rank-averaged gradients is not the '
                             'average of the ranks\' Gramians, so it needs the rows it does not keep; under '
                             'DDP / process_group= / FSDP2 use memory="default" (communication="reduce_scatter" '
                             'or FSDP2 keep K·N/W per rank)')
        self.memory = memory

        self.optimizer = optimizer
        self.reduction = reduction
        self.order = order
        self.backend = backend
        self.monitor = monitor
        self.ddp_module = ddp_module
        # Every attribute that changes after construction lives in this one holder, never rebound: Lightning's
        # LightningOptimizer wraps an optimizer by copying its __dict__ into an instance of a subclass, so state
        # written through the wrapper must land in an object the engine shares with it.
        self._s = types.SimpleNamespace(
            strategy=strategy, step=0, bufs=None, segments=None, auto_sequential=False, step_perms=None,
            step_names=None, last_info=None, owner=id(self))
        self.nonfinite = nonfinite
        self.include_self = include_self
        self.usage = usage
        # torch.optim.Optimizer state that GMD does not delegate (hooks are registered on the wrapped optimizer).
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"
        self._patch_zero_grad(optimizer)
        self._generator = torch.Generator()
        if seed is None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            seed = self.comm.broadcast_seed(int(torch.randint(0, 2 ** 62, ()).item()),
                                            params[0].device if params else "cpu")
        self._generator.manual_seed(seed)
        self._perm_cache: dict = {}
        self._mask_cache: collections.OrderedDict = collections.OrderedDict()

    @property
    def last_info(self) -> StepInfo | None:
        """The StepInfo of the last backward (None before the first, and after a failed one)."""
        return self._s.last_info

    @property
    def strategy(self) -> str:
        return self._s.strategy

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
        K = self._s.bufs.K if self._s.bufs is not None else None
        N = sum(b.N for b in self._s.bufs.buffers) if self._s.bufs is not None else None
        order = self.order if isinstance(self.order, str) else type(self.order).__name__
        inner = "\n".join("  " + line for line in repr(self.optimizer).splitlines())
        return (f"GMD(reduction={self.reduction!r}, order={order!r}, usage={self.usage!r}, "
                f"include_self={self.include_self}, strategy={self._s.strategy!r}, memory={self.memory!r}, "
                f"nonfinite={self.nonfinite!r}, world_size={self.comm.world_size}, step={self._s.step}, K={K}, "
                f"N={N},\n{inner}\n)")

    # ------------------------------------------------------------------ public API
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (the wrapped optimizer's zero_grad) and the accumulated per-objective rows; the
        buffers are kept and overwritten by the next backward."""
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
            if engine is not None and engine._bufs is not None:
                engine._bufs.clear()
            return inner(set_to_none=set_to_none)

        optimizer.zero_grad = zero_grad

    def backward(self, losses) -> StepInfo:
        """K backward passes (or one batched pass) accumulated into the per-objective rows, communication when
        distributed, projection, merged .grad.

        Args:
            losses: a sequence of K scalar float tensors requiring grad, or a dict name -> loss (names flow into
                info.names and the monitor). Every call until zero_grad() must pass the same K objectives.
        Returns:
            StepInfo (gram, coefficients, cosines, norms, num_conflicts, losses, names, skipped, ...) of the
            accumulated gradients.
        """
        names, values, losses, subsets = self._check_losses(losses)
        K = len(losses)
        self._s.last_info = None
        member = usage_.membership(subsets) if self.usage == "official" else None
        if self.memory == "low":
            return self._done(self._finish(names, None, *self._low_memory(losses, values, member)))
        comm = self.comm
        comm.check(K, values[0].device)
        if self._s.bufs is not None and self._s.bufs.K != K and self._s.bufs.accumulating():
            raise ValueError(f"gmd_ext.GMD.backward: got {K} objectives, but this step has accumulated "
                             f"{self._s.bufs.K} since the last zero_grad(); every call of a step must pass the same "
                             f"objectives (sample subsets once per step, not per micro-batch)")
        bufs = self._prepare(K)
        accumulating = bufs.accumulating()
        if accumulating and names is not None and self._s.step_names is not None and names != self._s.step_names:
            raise ValueError(f"gmd_ext.GMD.backward: the objectives {list(names)} differ from the ones this step "
                             f"has accumulated since the last zero_grad() ({list(self._s.step_names)}); every call "
                             f"of a step must pass the same objectives in the same order")
        self._s.step_names = names
        if not accumulating:
            bufs.reach[:] = False
        bufs.keep = comm.keep_rows(accumulating)
        strategy = self._resolve_strategy()
        # One order per accumulated step: the calls after the first reuse it, so micro-batches equal one call.
        perms = self._s.step_perms if accumulating else self._perms(K, bufs.buffers[0].G.device)
        self._s.step_perms = perms
        try:
            with comm.backward_context():
                if strategy == "batched" and not bufs.fill_batched(losses):
                    self._s.strategy = strategy = "sequential"
                    bufs = self._prepare(K)  # the sequential rows may be fewer (a scratch row)
                if strategy == "batched":
                    comm.rows_done(bufs)
                elif strategy in ("branches", "auto") and branches.fill(bufs, losses):
                    comm.rows_done(bufs)
                else:
                    if strategy == "auto":
                        self._s.auto_sequential = True  # no marked branch: skip the graph walk from now on
                    bufs.fill_sequential(losses, lambda k: comm.row_done(bufs, k))
        except BaseException:
            self.zero_grad()  # a failed backward leaves no partial rows or row views in .grad
            raise
        bufs.fresh = False
        rows = comm.local(bufs)

        loss_tensor = torch.stack([l.detach().float().reshape(()) for l in values])
        gram, masks = self._gram_and_masks(rows, member)
        merged, gram, A = project(rows, perms, masks, self.reduction, self.backend, scale=comm.scale,
                                  finite=torch.isfinite(loss_tensor).all(), include_self=self.include_self,
                                  gram=gram)
        merged = comm.restore(merged)
        if comm.scale != 1.0:
            gram = gram * (comm.scale * comm.scale)
        return self._done(self._finish(names, merged, gram, A, loss_tensor))

    def _resolve_strategy(self) -> str:
        if self._s.strategy == "auto" and (self._s.auto_sequential or isinstance(self.comm, fsdp.FSDPComm)):
            return "sequential"  # FSDP's reduce-scatter runs in its backward hooks: one plain backward each
        return self._s.strategy

    def _done(self, info: StepInfo) -> StepInfo:
        self._s.last_info = info
        self._s.step += 1
        if self.monitor is not None:
            self.monitor(info.step, info)
        return info

    def _low_memory(self, losses, values, member):
        """memory="low" (gmd_ext/gmd/lowmem.py): Γ parameter by parameter, then one backward of Σ c_k L_k;
        returns (gram, A, loss_tensor) with the merged gradient already in .grad."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        if any(p.grad is not None for p in params):
            raise RuntimeError('gmd_ext.GMD(memory="low") keeps no per-objective rows, so it cannot accumulate '
                               'several backward calls or keep a gradient already in .grad: call gmd.zero_grad() '
                               'before each backward (use memory="default" for gradient accumulation)')
        dims = None
        if self.usage == "official":
            dims = [usage_.spec(p, i, self._specific) for i, p in enumerate(params)]
        gram, reach, norms = lowmem.gram(losses, params, self.backend, dims)
        loss_tensor = torch.stack([l.detach().float().reshape(()) for l in values])
        K = len(losses)
        A, c = coefficients(gram, self._perms(K, gram.device), self.backend,
                            finite=torch.isfinite(loss_tensor).all().to(gram.device),
                            include_self=self.include_self)
        shared_scale = 1.0 / K if self.reduction == "mean" else 1.0
        if dims is None:
            shared = reach.all(0) | ~reach.any(0)
            scales = [None if not r else (shared_scale if s else 1.0) for r, s in zip(reach.any(0), shared)]
        else:
            if member is not None:
                usage_.check_membership(member, usage_.declared_modalities(params, dims))
                member = to_device(member, gram.device)
            scales = [None if not r or n is None else usage_.slice_scales(p, d, n, shared_scale, member)
                      for p, d, n, r in zip(params, dims, norms, reach.any(0))]
        lowmem.combine(losses, params, c, scales)
        return gram, A, loss_tensor

    #: The official implementation's name for `backward` (its PCGrad class calls it pc_backward).
    pc_backward = backward

    def step(self, closure: Callable | None = None):
        """optimizer.step(closure), unless the last backward was skipped (nonfinite="skip").

        closure: as for any torch.optim.Optimizer — a callable that clears the gradients, computes the losses,
        runs ``gmd.backward(losses)`` and returns a loss; it is passed to the wrapped optimizer, which calls it
        (once, or several times for LBFGS) under grad mode and returns its loss."""
        if closure is not None:
            if not callable(closure):
                raise TypeError(f"closure must be a callable or None, got {type(closure).__name__}")
            return self.optimizer.step(torch.enable_grad()(closure))
        if self._s.last_info is not None and self._s.last_info.skipped:
            return None
        return self.optimizer.step()

    def state_dict(self) -> dict:
        """{"step", "generator" (the order RNG state), "optimizer" (optimizer.state_dict())}."""
        return {"step": self._s.step, "generator": self._generator.get_state(),
                "optimizer": self.optimizer.state_dict()}

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
        # All or nothing: a state that fails to load part-way (a bad generator state, an optimizer state for
        # other parameters) leaves the engine and its optimizer exactly as they were.
        saved_generator = self._generator.get_state()
        saved_optimizer = copy.deepcopy(self.optimizer.state_dict())
        try:
            self._generator.set_state(generator)
            self.optimizer.load_state_dict(state_dict["optimizer"])
        except Exception:
            self._generator.set_state(saved_generator)
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

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_losses(losses):
        subsets, absent = None, frozenset()
        if isinstance(losses, Mapping):
            names = tuple(n.name if isinstance(n, Subset) else str(n) for n in losses)
            values = list(losses.values())
            # Which modalities each objective uses: from gmd_ext.subset_losses, or keys that are Subsets.
            subsets = getattr(losses, "subsets", None)
            absent = getattr(losses, "absent", frozenset())
            if subsets is None and all(isinstance(n, Subset) for n in losses):
                subsets = tuple(losses)
            if subsets is not None and len(subsets) != len(values):
                subsets = None
        elif isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)):
            names, values = None, list(losses)
        elif isinstance(losses, torch.Tensor):
            raise TypeError("losses must be a sequence (or dict) of K scalar tensors, got one tensor; for a single "
                            "objective pass [loss]")
        else:
            raise TypeError(f"losses must be a sequence or dict of scalar tensors, got {type(losses).__name__}")
        if not values:
            raise ValueError("losses must hold at least one objective, got none")
        for k, loss in enumerate(values):
            what = f"losses[{names[k]!r}]" if names else f"losses[{k}]"
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"{what} must be a tensor, got {type(loss).__name__}")
            if loss.numel() != 1:
                raise ValueError(f"{what} must be a scalar (one element), got shape {tuple(loss.shape)}")
            if not loss.dtype.is_floating_point:
                raise TypeError(f"{what} must be a floating-point tensor, got {loss.dtype}")
            if not loss.requires_grad and not (names and names[k] in absent and loss.grad_fn is None):
                raise ValueError(f"{what} does not require grad (computed under no_grad, detached, or from "
                                 f"parameters with requires_grad=False)")
        # An objective none of whose modalities is present (subset_losses' .absent) whose loss has no graph: a
        # zero gradient row (None for the gradient sources), still counted in K.
        graphs = [l if l.requires_grad else None for l in values]
        return names, values, graphs, subsets

    # ------------------------------------------------------------------ projection policy
    def _prepare(self, K: int) -> GradBuffers:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        batched = self._s.strategy == "batched"
        rows = self.comm.rows(K, batched)
        if self._s.bufs is None or not self._s.bufs.matches(params, K) or self._s.bufs.buffers[0].G.shape[0] != rows:
            self.close()
            self._s.bufs = None  # free the old [K, N] buffers before allocating the new ones
            self._s.bufs = self.comm.buffers(params, K, batched)
            self._mask_cache.clear()
            self._s.segments = None
            if self.usage == "official":
                self._s.segments = [Segments([params[i] for i in b.index], b.index, b.sizes, b.width,
                                           self._specific) for b in self._s.bufs.buffers]
        return self._s.bufs

    def _gram_and_masks(self, rows, member):
        """(Γ of the full rows, per-buffer shared masks of the local columns) for this rank's [K, n] rows;
        member: the objectives' [K, M] modality membership (CPU) or None."""
        comm = self.comm
        if self._s.segments is None:  # usage="reach": per-tensor reach flags, one gram call per buffer
            return comm.reduce_gram(gram_sum(rows, self.backend)), comm.local_masks(self._shared_masks())
        usage_.check_membership(member, max(seg.num_modalities for seg in self._s.segments))
        parts = [seg.gram(r, self.backend, comm.start(r.shape[1]), member is not None)
                 for seg, r in zip(self._s.segments, rows)]
        dev = parts[0][0].device
        gram0 = sum((g.to(dev) for g, _ in parts[1:]), parts[0][0])
        K = rows[0].shape[0]
        # Γ and the segments' squared norms in one tensor: one all-reduce where the rows are sharded.
        packed = comm.reduce_gram(torch.cat([gram0.flatten()] + [n.to(dev).flatten() for _, n in parts]))
        gram = packed[:K * K].view(K, K)
        member = None if member is None else to_device(member, dev)
        masks, at = [], K * K
        for seg, r in zip(self._s.segments, rows):
            norms = packed[at:at + K * len(seg)].view(K, len(seg))
            at += K * len(seg)
            on = None if member is None else member.to(r.device)
            masks.append(seg.shared_mask(norms.to(r.device), on, comm.start(r.shape[1]), r.shape[1]))
        return gram, masks

    def _perms(self, K, device):
        order = self.order
        if isinstance(order, str) and order == "random":
            return make_perms("random", K, self._generator, device)  # drawn on the host, copied without a sync
        if callable(order) and not isinstance(order, torch.Tensor):
            return make_perms(order(self._s.step), K, None, device)
        key = (K, str(device))
        if key not in self._perm_cache:
            self._perm_cache[key] = make_perms(order, K, None, device)
        return self._perm_cache[key]

    def _shared_masks(self):
        """Per buffer: None (every element shared) or bool [N], from the per-parameter reach flags; cached by
        reach pattern (sampled subsets repeat a few patterns)."""
        reach = self._s.bufs.reach
        key = reach.tobytes()
        masks = self._mask_cache.get(key)
        if masks is not None:
            self._mask_cache.move_to_end(key)
            return masks
        # Elements no objective reached are zero in every row, so their scale is irrelevant: call them shared.
        shared = reach.all(0) | ~reach.any(0)
        masks = []
        for b in self._s.bufs.buffers:
            flags = shared[b.index]
            if flags.all():
                masks.append(None)
            else:
                m = torch.repeat_interleave(torch.from_numpy(flags), torch.tensor(b.sizes, dtype=torch.int64))
                if b.width > b.N:  # row padding: zero in every row, its scale is irrelevant
                    m = torch.cat([m, m.new_ones(b.width - b.N)])
                masks.append(to_device(m, b.G.device))
        self._mask_cache[key] = masks
        if len(self._mask_cache) > _MASK_CACHE_SIZE:
            self._mask_cache.popitem(last=False)
        return masks

    def _finish(self, names, merged, gram, A, loss_tensor) -> StepInfo:
        K = A.shape[0]
        check = self.nonfinite != "propagate"
        host = gram.device.type != "cpu" and (check or self.monitor is not None)
        if host:
            # The step's one synchronisation: losses, Γ and A in one device-to-host copy.
            pack = torch.cat([loss_tensor, gram.flatten(), A.flatten()]).cpu()
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
                info.skipped, info.reason = True, reason
                return info
        if merged is not None:  # memory="low" wrote .grad itself
            self._s.bufs.set_grads(merged)
        return info
