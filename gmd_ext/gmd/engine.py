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
from collections.abc import Callable, Mapping, Sequence

import torch

from gmd_ext import _backend
from gmd_ext.gmd.buffers import GradBuffers
from gmd_ext.gmd import branches, fsdp, lowmem
from gmd_ext.gmd.comm import make_comm
from gmd_ext.gmd.projection import ProjectionInfo, coefficients, make_perms, project

_REDUCTIONS = ("mean", "sum")
_ORDERS = ("random", "sequential")
_STRATEGIES = ("sequential", "batched", "branches")
_NONFINITE = ("raise", "skip", "propagate")
_MEMORY = ("default", "low")
# Shared-element masks cost N bytes each; a handful covers the reach patterns of sampled subsets in practice.
_MASK_CACHE_SIZE = 8


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


class GMD:
    """Gradient-guided Modality Decoupling for a standard training loop.

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
    gradients on parameters every objective reached ("shared") and their sum elsewhere (reduction="sum": sum
    everywhere). A parameter no objective reached keeps ``.grad = None``. The merged gradient is left in
    ``.grad`` as views into one flat buffer per (device, dtype); the per-objective gradients are computed in place
    into a [K, N] buffer that is reused across steps (reallocated only when K or the parameter set changes).

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
        strategy: "sequential" (K backward passes) or "batched" (one ``torch.autograd.grad(...,
            is_grads_batched=True)`` call over the K losses, falling back to sequential with one warning when the
            model does not support vmap). "batched" differentiates every objective's graph K times (vmap over the
            K one-hot cotangents), so it only pays off when the objectives share one graph (multi-head); with one
            forward per modality subset use "sequential" (bench/bench_step.py, DSUNet3d, K = 4: batched costs
            3.1x sequential with subset forwards, 1.08x with one shared forward). "branches": for late-fusion
            models whose branch outputs are marked (the library's DS models' ``branches``; gmd_ext/gmd/branches.py),
            one backward per branch with the cotangents of every objective using it batched; sequential when no
            loss reaches a marked branch.
        include_self: True (official GMD, LibMTL): g_i is projected against every original gradient, its own
            included; False: torchjd's PCGrad rule (j = i skipped). docs/semantics.md.
        nonfinite: what a NaN/Inf loss or gradient does. "raise" (ValueError naming the objectives; .grad cleared),
            "skip" (grads cleared, info.skipped = True, `step()` does nothing), or "propagate" (no check, no host
            synchronisation: the merged gradient becomes NaN everywhere — what torch.amp.GradScaler needs, below).

            FSDP2: on a model sharded with torch.distributed.fsdp.fully_shard (its parameters are DTensors) GMD
            needs neither argument: FSDP reduce-scatters each objective's gradient, GMD keeps the K local shards
            (K·N/W per rank), all-reduces their K×K Gramians on the mesh's group and sets the merged shard as the
            DTensor .grad. Supported: a 1-D mesh, any reshard_after_forward, MixedPrecisionPolicy(param_dtype,
            reduce_dtype); not HSDP, not strategy="batched" (gmd_ext/gmd/fsdp.py).
        communication: under ddp_module= / process_group=, "reduce_scatter" (row k reduce-scattered right after
            backward k, the shard Gramians all-reduced, the merged shard all-gathered: (K + 1)·N values sent per
            rank instead of 2·K·N, gradient memory N + K·N/W instead of K·N), "all_reduce" (every row all-reduced)
            or "auto" (reduce_scatter from gmd_ext.gmd.comm.REDUCE_SCATTER_MIN_NUMEL trainable elements on). Both
            equal one process on the concatenated batch (gmd_ext/gmd/comm.py).

        memory: "default" (the [K, N] buffer) or "low" (no [K, N] buffer: the Gramian accumulated parameter by
            parameter during one batched backward over the K losses, then one backward of the
            coefficient-weighted sum of the losses; peak gradient memory N + K·(largest parameter), equal to
            "default"; single process only, any `strategy` is ignored; gmd_ext/gmd/lowmem.py).

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
                 ddp_module=None, process_group=None, strategy: str = "sequential", nonfinite: str = "raise",
                 communication: str = "auto", memory: str = "default", include_self: bool = True):
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
        trainable = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
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
        self.strategy = strategy
        self.nonfinite = nonfinite
        self.include_self = include_self
        self._generator = torch.Generator()
        if seed is None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            seed = self.comm.broadcast_seed(int(torch.randint(0, 2 ** 62, ()).item()),
                                            params[0].device if params else "cpu")
        self._generator.manual_seed(seed)
        self._step = 0
        self._bufs: GradBuffers | None = None
        self._perm_cache: dict = {}
        self._mask_cache: collections.OrderedDict = collections.OrderedDict()
        self.last_info: StepInfo | None = None

    @property
    def _buffers(self):
        return self._bufs.buffers if self._bufs is not None else []

    # ------------------------------------------------------------------ public API
    def zero_grad(self) -> None:
        """Set every parameter's .grad to None (the buffers are kept and overwritten by the next backward)."""
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, losses) -> StepInfo:
        """K backward passes (or one batched pass), all-reduce when distributed, projection, merged .grad.

        Args:
            losses: a sequence of K scalar float tensors requiring grad, or a dict name -> loss (names flow into
                info.names and the monitor).
        Returns:
            StepInfo (gram, coefficients, cosines, norms, num_conflicts, losses, names, skipped, ...).
        """
        names, losses = self._check_losses(losses)
        K = len(losses)
        self.last_info = None
        if self.memory == "low":
            return self._done(self._finish(names, None, *self._low_memory(losses)))
        comm = self.comm
        comm.check(K, losses[0].device)
        bufs = self._prepare(K)
        with comm.backward_context():
            if self.strategy == "batched" and not bufs.fill_batched(losses):
                self.strategy = "sequential"
                bufs = self._prepare(K)  # the sequential rows may be fewer (a scratch row)
            if self.strategy == "batched" or (self.strategy == "branches" and branches.fill(bufs, losses)):
                comm.rows_done(bufs)
            else:
                bufs.fill_sequential(losses, lambda k: comm.row_done(bufs, k))
        rows, masks = comm.local(bufs, self._shared_masks())

        perms = self._perms(K, bufs.buffers[0].G.device)
        loss_tensor = torch.stack([l.detach().float().reshape(()) for l in losses])
        merged, gram, A = project(rows, perms, masks, self.reduction, self.backend, scale=comm.scale,
                                  finite=torch.isfinite(loss_tensor).all(), reduce_gram=comm.reduce_gram,
                                  include_self=self.include_self)
        merged = comm.restore(merged)
        if comm.scale != 1.0:
            gram = gram * (comm.scale * comm.scale)
        return self._done(self._finish(names, merged, gram, A, loss_tensor))

    def _done(self, info: StepInfo) -> StepInfo:
        self.last_info = info
        self._step += 1
        if self.monitor is not None:
            self.monitor(info.step, info)
        return info

    def _low_memory(self, losses):
        """memory="low" (gmd_ext/gmd/lowmem.py): Γ parameter by parameter, then one backward of Σ c_k L_k;
        returns (gram, A, loss_tensor) with the merged gradient already in .grad."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        gram, reach = lowmem.gram(losses, params, self.backend)
        loss_tensor = torch.stack([l.detach().float().reshape(()) for l in losses])
        K = len(losses)
        A, c = coefficients(gram, self._perms(K, gram.device), self.backend,
                            finite=torch.isfinite(loss_tensor).all().to(gram.device),
                            include_self=self.include_self)
        shared = reach.all(0) | ~reach.any(0)
        shared_scale = 1.0 / K if self.reduction == "mean" else 1.0
        scales = [None if not r else (shared_scale if s else 1.0) for r, s in zip(reach.any(0), shared)]
        lowmem.combine(losses, params, c, scales)
        return gram, A, loss_tensor

    #: The official implementation's name for `backward` (its PCGrad class calls it pc_backward).
    pc_backward = backward

    def step(self):
        """optimizer.step(), unless the last backward was skipped (nonfinite="skip")."""
        if self.last_info is not None and self.last_info.skipped:
            return None
        return self.optimizer.step()

    def state_dict(self) -> dict:
        """{"step", "generator" (the order RNG state), "optimizer" (optimizer.state_dict())}."""
        return {"step": self._step, "generator": self._generator.get_state(),
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
        self._step = int(step)

    def close(self) -> None:
        """Remove the gradient hooks this engine put on the parameters."""
        if self._bufs is not None:
            self._bufs.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to clean
            pass

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_losses(losses):
        if isinstance(losses, Mapping):
            names = tuple(str(n) for n in losses)
            values = list(losses.values())
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
            if not loss.requires_grad:
                raise ValueError(f"{what} does not require grad (computed under no_grad, detached, or from "
                                 f"parameters with requires_grad=False)")
        return names, values

    # ------------------------------------------------------------------ projection policy
    def _prepare(self, K: int) -> GradBuffers:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        batched = self.strategy == "batched"
        rows = self.comm.rows(K, batched)
        if self._bufs is None or not self._bufs.matches(params, K) or self._bufs.buffers[0].G.shape[0] != rows:
            self.close()
            self._bufs = None  # free the old [K, N] buffers before allocating the new ones
            self._bufs = self.comm.buffers(params, K, batched)
            self._mask_cache.clear()
        return self._bufs

    def _perms(self, K, device):
        order = self.order
        if isinstance(order, str) and order == "random":
            perms = make_perms("random", K, self._generator, "cpu")
            if device.type == "cuda":
                # Pinned source + non_blocking: the copy is queued on the stream, no host synchronisation.
                return perms.pin_memory().to(device, non_blocking=True)
            return perms.to(device)
        if callable(order) and not isinstance(order, torch.Tensor):
            return make_perms(order(self._step), K, None, device)
        key = (K, str(device))
        if key not in self._perm_cache:
            self._perm_cache[key] = make_perms(order, K, None, device)
        return self._perm_cache[key]

    def _shared_masks(self):
        """Per buffer: None (every element shared) or bool [N], from the per-parameter reach flags; cached by
        reach pattern (sampled subsets repeat a few patterns)."""
        reach = self._bufs.reach
        key = reach.tobytes()
        masks = self._mask_cache.get(key)
        if masks is not None:
            self._mask_cache.move_to_end(key)
            return masks
        # Elements no objective reached are zero in every row, so their scale is irrelevant: call them shared.
        shared = reach.all(0) | ~reach.any(0)
        masks = []
        for b in self._bufs.buffers:
            flags = shared[b.index]
            if flags.all():
                masks.append(None)
            else:
                m = torch.repeat_interleave(torch.from_numpy(flags), torch.tensor(b.sizes, dtype=torch.int64))
                if b.G.device.type == "cuda":
                    m = m.pin_memory()  # so the non-blocking copy below does not synchronise
                masks.append(m.to(b.G.device, non_blocking=True))
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
        info = StepInfo(self._step, names, gram, A, loss_tensor)
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
            self._bufs.set_grads(merged)
        return info
