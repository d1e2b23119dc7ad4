"""`GMD`: the GMD engine for ordinary PyTorch training loops (docs/design.md).

K losses in, one conflict-free gradient out on the parameters' `.grad`. The per-objective gradients are never
copied out of autograd: during backward pass k every trainable parameter's `.grad` is a view into row k of a
preallocated [K, N] buffer (one per (device, dtype)), and autograd's AccumulateGrad adds into an existing
`.grad` in place (`variable_grad += new_grad` when grad mode is off, which it is during a first-order backward).
A post-accumulate-grad hook per parameter records which objectives reached it — exact, and one Python call per
(parameter, objective) — and checks the in-place contract held (if autograd ever replaced `.grad`, the hook
copies the new tensor into the row once and warns).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from gmd_ext import _backend, ops
from gmd_ext.gmd.projection import _info, make_perms

_REDUCTIONS = ("mean", "sum")
_ORDERS = ("random", "sequential")
_STRATEGIES = ("sequential", "batched")
_NONFINITE = ("raise", "skip", "propagate")
_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Shared-element masks cost N bytes each; a handful covers the reach patterns of sampled subsets in practice.
_MASK_CACHE_SIZE = 8


class StepInfo:
    """What one `GMD.backward` saw. Tensors are fp32; reading `losses` or `num_conflicts` may synchronise
    with the device (they are already on the host when the engine synchronised anyway: nonfinite checks on
    CUDA, or a monitor).

    Attributes:
        step: index of this backward call (0-based). names: objective names (keys of a dict of losses, else
        None). skipped: True when nonfinite="skip" dropped this step (reason says why).
        gram [K, K]: Γ = G Gᵀ of the per-objective gradients. coefficients [K, K]: A, projected = A @ G.
        loss_tensor [K]: the loss values (detached). losses: list of K floats.
        cosines [K, K], norms [K], num_conflicts (int): as in `project_conflicts`' ProjectionInfo.
        projected_gram [K, K]: A Γ Aᵀ, the Gramian of the projected gradients (free);
        projected_cosines [K, K]: its cosines.
    """

    def __init__(self, step, names, gram, coefficients, loss_tensor, skipped=False, reason=None):
        self.step = step
        self.names = names
        self.gram = gram
        self.coefficients = coefficients
        self.loss_tensor = loss_tensor
        self.skipped = skipped
        self.reason = reason

    @functools.cached_property
    def _projection(self):
        return _info(self.gram, self.coefficients)

    @property
    def cosines(self) -> torch.Tensor:
        return self._projection.cosines

    @property
    def norms(self) -> torch.Tensor:
        return self._projection.norms

    @property
    def num_conflicts(self) -> int:
        return self._projection.num_conflicts

    @functools.cached_property
    def losses(self) -> list[float]:
        return self.loss_tensor.tolist()

    @functools.cached_property
    def projected_gram(self) -> torch.Tensor:
        A = self.coefficients
        return A @ self.gram @ A.T

    @functools.cached_property
    def projected_cosines(self) -> torch.Tensor:
        return _info(self.projected_gram, self.coefficients).cosines

    def keys(self):
        return ("step", "names", "skipped", "reason", "gram", "coefficients", "cosines", "norms",
                "num_conflicts", "losses", "projected_cosines")

    def __getitem__(self, key):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __repr__(self):
        return (f"StepInfo(step={self.step}, K={self.gram.shape[0]}, skipped={self.skipped}, "
                f"names={self.names})")


class _Buffer:
    """The [K, N] per-objective gradient rows of the parameters sharing one (device, dtype), and their views."""

    def __init__(self, params, index, K):
        self.params = params          # parameters in optimizer order
        self.index = index            # their positions in the engine's flat parameter list
        p0 = params[0]
        self.sizes = [p.numel() for p in params]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).tolist()
        self.N = int(sum(self.sizes))
        # Same strides as the parameter when it is dense (channels_last, transposed...), so elementwise
        # accumulation walks both in the same memory order; contiguous otherwise (empty_like's rule).
        self.strides = [torch.empty_like(p, device="meta").stride() for p in params]
        self.G = torch.zeros((K, self.N), dtype=p0.dtype, device=p0.device)
        self.views = [self.row_views(self.G, k) for k in range(K)]
        self.sizes_t = torch.tensor(self.sizes, dtype=torch.int64)

    def row_views(self, flat: torch.Tensor, k: int = 0):
        base = flat.storage_offset() + k * self.N
        return [flat.as_strided(p.shape, s, base + o) for p, s, o in zip(self.params, self.strides, self.offsets)]

    def batched_view(self, i: int):
        """[K, *shape_i] view of parameter i's slice in every row."""
        p = self.params[i]
        return self.G.as_strided((self.G.shape[0], *p.shape), (self.N, *self.strides[i]),
                                 self.G.storage_offset() + self.offsets[i])


def _hook(engine_ref, i):
    def hook(p):
        engine = engine_ref()
        if engine is not None and engine._active is not None:
            engine._accumulated(p, i)
    return hook


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
            3.1x sequential with subset forwards, 1.08x with one shared forward).
        nonfinite: what a NaN/Inf loss or gradient does. "raise" (ValueError naming the objectives; .grad cleared),
            "skip" (grads cleared, info.skipped = True, `step()` does nothing), or "propagate" (no check, no host
            synchronisation: the merged gradient becomes NaN everywhere — what torch.amp.GradScaler needs, below).

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
    memory). A callable order is validated every step (one synchronisation).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, reduction: str = "mean", order="random",
                 seed: int | None = None, backend: str = "auto", monitor: Callable | None = None,
                 ddp_module=None, process_group=None, strategy: str = "sequential", nonfinite: str = "raise"):
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
        if ddp_module is not None and process_group is not None:
            raise ValueError("pass either ddp_module= (its process group is used) or process_group=, not both")
        if ddp_module is not None and not isinstance(ddp_module, torch.nn.parallel.DistributedDataParallel):
            raise TypeError(f"ddp_module must be a torch.nn.parallel.DistributedDataParallel, "
                            f"got {type(ddp_module).__name__}")

        self.optimizer = optimizer
        self.reduction = reduction
        self.order = order
        self.backend = backend
        self.monitor = monitor
        self.ddp_module = ddp_module
        self.strategy = strategy
        self.nonfinite = nonfinite
        self._group = ddp_module.process_group if ddp_module is not None else process_group
        if ddp_module is not None:
            ddp_module.require_backward_grad_sync = False
        self._generator = torch.Generator()
        self._generator.manual_seed(self._initial_seed(seed))

        self._step = 0
        self._skipped = False
        self._params: list[torch.nn.Parameter] = []
        self._buffers: list[_Buffer] = []
        self._handles = []
        self._K = 0
        self._perm_cache: dict = {}
        self._mask_cache: collections.OrderedDict = collections.OrderedDict()
        self._reach = None            # np.bool_ [K, P]: objective k reached parameter p
        self._active = None           # the views of the objective being differentiated, else None
        self._row = -1
        self._warned: set[str] = set()
        self._batched_ok = True

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
        self._skipped = False
        self._prepare(K)
        if self.ddp_module is not None and self.ddp_module.require_backward_grad_sync:
            raise RuntimeError("ddp_module.require_backward_grad_sync was re-enabled (e.g. by leaving a no_sync() "
                               "block), so the last forward prepared DDP to all-reduce inside each backward; GMD "
                               "all-reduces once per step itself — keep the DDP module in no-sync mode")
        works = []
        if self.strategy == "batched" and self._batched_ok and self._batched(losses):
            works = self._all_reduce_rows(None)
        else:
            ctx = self.ddp_module.no_sync() if self.ddp_module is not None else contextlib.nullcontext()
            with ctx:
                works = self._sequential(losses)
        self._wait(works)

        inv_world = 1.0 / self._world_size()
        perms = self._perms(K, self._buffers[0].G.device if self._buffers else torch.device("cpu"))
        loss_tensor = torch.stack([l.detach().float().reshape(()) for l in losses])
        merged, gram, A = self._project(perms, inv_world, loss_tensor)
        if inv_world != 1.0:
            gram = gram * (inv_world * inv_world)
        info = self._finish(names, merged, gram, A, loss_tensor)
        self._step += 1
        if self.monitor is not None:
            self.monitor(info.step, info)
        return info

    pc_backward = backward

    def step(self):
        """optimizer.step(), unless the last backward was skipped (nonfinite="skip")."""
        if self._skipped:
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
        self._generator.set_state(state_dict["generator"])
        self._step = int(state_dict["step"])
        self.optimizer.load_state_dict(state_dict["optimizer"])

    def close(self) -> None:
        """Remove the gradient hooks this engine put on the parameters."""
        for h in self._handles:
            h.remove()
        self._handles = []

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

    # ------------------------------------------------------------------ layout
    def _prepare(self, K: int):
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not params:
            raise ValueError("optimizer has no trainable parameters (none with requires_grad=True)")
        same = len(params) == len(self._params) and all(a is b for a, b in zip(params, self._params))
        if same and K == self._K:
            return
        for k, p in enumerate(params):
            if p.dtype not in _GRAD_DTYPES:
                raise TypeError(f"GMD supports float32/float16/bfloat16 parameters, parameter {k} of the optimizer "
                                f"is {p.dtype}")
            if p.is_sparse:
                raise TypeError(f"parameter {k} of the optimizer is sparse; GMD needs dense parameters")
        self.close()
        groups: dict = {}
        for i, p in enumerate(params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        # Reallocating is the only place a [K, N] buffer is created: first step, or K / parameters changed.
        self._buffers = [_Buffer([params[i] for i in idx], idx, K) for idx in groups.values()]
        self._params, self._K = params, K
        self._mask_cache.clear()
        self._reach = np.zeros((K, len(params)), dtype=np.bool_)
        ref = weakref.ref(self)
        self._handles = [p.register_post_accumulate_grad_hook(_hook(ref, i)) for i, p in enumerate(params)]
        self._views = [[None] * len(params) for _ in range(K)]
        for b in self._buffers:
            for k in range(K):
                for j, i in enumerate(b.index):
                    self._views[k][i] = b.views[k][j]

    # ------------------------------------------------------------------ per-objective gradients
    def _sequential(self, losses):
        reach, works = self._reach, []
        reach[:] = False
        K = len(losses)
        try:
            for k, loss in enumerate(losses):
                for b in self._buffers:
                    # Autograd adds into the row views; zeroing row k right before its pass keeps it cache-warm.
                    b.G[k].zero_()
                views = self._views[k]
                for p, v in zip(self._params, views):
                    p.grad = v
                self._active, self._row = views, k
                try:
                    loss.backward(retain_graph=k < K - 1)
                except RuntimeError as e:
                    if "mark a variable ready only once" in str(e):
                        raise RuntimeError("gmd_ext.GMD: a DistributedDataParallel model all-reduces inside each "
                                           "backward pass; pass GMD(..., ddp_module=<the DDP model>) so GMD runs "
                                           "the K passes without DDP sync and all-reduces once: " + str(e)) from e
                    raise
                self._active = None
                works += self._all_reduce_rows(k)
        finally:
            self._active = None
        return works

    def _accumulated(self, p, i):
        self._reach[self._row, i] = True
        view = self._active[i]
        if p.grad is not view:
            # Autograd replaced .grad instead of adding into it (e.g. a backward under create_graph=True).
            if "replaced" not in self._warned:
                self._warned.add("replaced")
                warnings.warn("gmd_ext.GMD: autograd replaced a parameter's .grad instead of accumulating into "
                              "the engine's buffer view; copying it into the buffer (one extra copy per such "
                              "parameter)", RuntimeWarning, stacklevel=2)
            view.copy_(p.grad)
            p.grad = view

    def _batched(self, losses) -> bool:
        L = torch.stack([l.reshape(()) for l in losses])
        K = L.shape[0]
        eye = torch.eye(K, dtype=L.dtype, device=L.device)
        try:
            grads = torch.autograd.grad(L, self._params, grad_outputs=eye, is_grads_batched=True,
                                        allow_unused=True, retain_graph=True)
        except RuntimeError as e:
            self._batched_ok = False
            warnings.warn(f"gmd_ext.GMD: strategy='batched' is not supported by this model ({e}); falling back "
                          f"to strategy='sequential' for the rest of training", RuntimeWarning, stacklevel=3)
            return False
        self._reach[:] = False
        target = {id(p): i for i, p in enumerate(self._params)}
        for k, loss in enumerate(losses):
            self._reach[k, _reached(loss, target)] = True
        for b in self._buffers:
            for j, i in enumerate(b.index):
                g = grads[i]
                if g is None:
                    b.batched_view(j).zero_()
                else:
                    b.batched_view(j).copy_(g)
        return True

    # ------------------------------------------------------------------ distributed
    def _world_size(self) -> int:
        if self._group is None:
            return 1
        return torch.distributed.get_world_size(self._group)

    def _initial_seed(self, seed):
        if seed is not None:
            return seed
        drawn = int(torch.randint(0, 2 ** 62, ()).item())
        if self._group is None:
            return drawn
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        t = torch.tensor([drawn], dtype=torch.int64, device=params[0].device if params else "cpu")
        torch.distributed.broadcast(t, src=torch.distributed.get_global_rank(self._group, 0), group=self._group)
        return int(t.item())

    def _all_reduce_rows(self, k):
        """Launch asynchronous SUM all-reduces of row k (None: all rows) of every buffer; the 1/world factor is
        folded into the combination coefficients instead of a pass over the buffer."""
        if self._group is None:
            return []
        rows = [b.G[k] if k is not None else b.G for b in self._buffers]
        try:
            return [torch.distributed.all_reduce(r, group=self._group, async_op=True) for r in rows]
        except RuntimeError as e:
            raise _comm_error(e) from e

    def _wait(self, works):
        for w in works:
            try:
                w.wait()
            except RuntimeError as e:
                raise _comm_error(e) from e

    # ------------------------------------------------------------------ projection
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
        reach = self._reach
        key = reach.tobytes()
        masks = self._mask_cache.get(key)
        if masks is not None:
            self._mask_cache.move_to_end(key)
            return masks
        # Elements no objective reached are zero in every row, so their scale is irrelevant: call them shared.
        shared = reach.all(0) | ~reach.any(0)
        masks = []
        for b in self._buffers:
            flags = shared[b.index]
            if flags.all():
                masks.append(None)
            else:
                m = torch.repeat_interleave(torch.from_numpy(flags), b.sizes_t)
                if b.G.device.type == "cuda":
                    m = m.pin_memory()  # so the non-blocking copy below does not synchronise
                masks.append(m.to(b.G.device, non_blocking=True))
        self._mask_cache[key] = masks
        if len(self._mask_cache) > _MASK_CACHE_SIZE:
            self._mask_cache.popitem(last=False)
        return masks

    def _project(self, perms, inv_world, loss_tensor):
        """Γ summed over buffers, the K×K coefficient loop once, then one combination pass per buffer — the
        two passes of projection.project, split so buffers of different dtypes share one projection and the
        all-reduce's 1/world factor rides on the coefficients.

        A NaN/Inf loss, gradient or Γ (Γ can overflow while G does not) makes c NaN, so the merged gradient is
        NaN everywhere: no extra pass, no host sync, and GradScaler's unscale_ always sees it
        (nonfinite="propagate"). Without this an overflowing Γ would silently skip every projection."""
        backend = self.backend
        grams = [ops.gram(b.G, backend) for b in self._buffers]
        dev = grams[0].device
        gram = grams[0] if len(grams) == 1 else sum(g.to(dev) for g in grams)
        A = ops.pcgrad_coefficients(gram, perms.to(dev), backend)
        finite = torch.isfinite(gram.diagonal()).all() & torch.isfinite(loss_tensor.to(dev)).all()
        c = torch.where(finite, A.sum(0) * inv_world, float("nan"))
        shared_scale = 1.0 / self._K if self.reduction == "mean" else 1.0
        masks = self._shared_masks()
        merged = [ops.combine(b.G, c.to(b.G.device), m, shared_scale, 1.0, backend)
                  for b, m in zip(self._buffers, masks)]
        return merged, gram, A

    def _finish(self, names, merged, gram, A, loss_tensor) -> StepInfo:
        K = self._K
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
                self._skipped = True
                info.skipped, info.reason = True, reason
                return info
        reach_any = self._reach.any(0)
        for b, m in zip(self._buffers, merged):
            for p, v, i in zip(b.params, b.row_views(m), b.index):
                p.grad = v if reach_any[i] else None
        return info


def _comm_error(e: Exception) -> RuntimeError:
    return RuntimeError(f"gmd_ext.GMD: all-reduce of the per-objective gradients failed on the process group (a "
                        f"rank died, diverged in K / parameters, or timed out; the timeout is "
                        f"init_process_group(timeout=...)): {e}")


def _reached(loss: torch.Tensor, target: dict) -> list[int]:
    """Indices (values of `target`, keyed by id(param)) of the leaves the autograd graph of `loss` reaches."""
    out = []
    if loss.grad_fn is None:
        i = target.get(id(loss))
        return [i] if i is not None else out
    stack, seen = [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad nodes hold their leaf
        if var is not None:
            i = target.get(id(var))
            if i is not None:
                out.append(i)
            continue
        stack.extend(f for f, _ in fn.next_functions)
    return out
