"""GMD in PyTorch Lightning (``pip install ".[lightning]"``): automatic and manual optimisation.

Automatic optimisation — `GMDMixin`: ``training_step`` returns the per-objective losses (a dict name -> loss, e.g.
``gmd_ext.subset_losses(...)``, or a list), ``configure_optimizers`` returns a `gmd_ext.GMD`, and everything the
Trainer does around the step keeps working::

    class Net(GMDMixin, L.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y, present = batch
            return gmd_ext.subset_losses(self.model.forward_branches(x, present), y, loss_fn, self.objectives,
                                         present=present)

        def configure_optimizers(self):
            gmd = GMD(torch.optim.Adam(self.parameters(), lr=1e-3), seed=0, nonfinite="propagate")
            return {"optimizer": gmd, "lr_scheduler": torch.optim.lr_scheduler.StepLR(gmd, 10)}

    L.Trainer(accumulate_grad_batches=2, precision="16-mixed", gradient_clip_val=1.0).fit(Net(), loader)

GMD then gets exactly the merged gradient of the plain loop ``gmd.zero_grad(); gmd.backward(losses);
gmd.step()`` (tests/test_lightning.py compares parameters after several steps):

- ``accumulate_grad_batches=n``: every objective's loss is divided by n, as Lightning divides a plain loss, and
  the n micro-batches accumulate in GMD's per-objective rows (``GMD.backward`` accumulates until ``zero_grad``,
  which Lightning calls at the start of each window), so the step sees the projection of the summed gradients.
  The micro-batches of one step must return the same objectives: sample subsets once per optimizer step, e.g.
  ``gmd_ext.sample_subsets(mods, k, torch.Generator().manual_seed(self.trainer.global_step))``.
- ``precision="16-mixed"``: every objective's loss is scaled by the precision plugin's GradScaler before its
  backward pass; the scaler then unscales the merged gradient, skips overflowing steps and updates its scale.
  GMD must be built with ``nonfinite="propagate"`` (an overflow must reach the scaler as inf/NaN, not raise);
  ``"bf16-mixed"`` has no scaler.
- ``gradient_clip_val``, LR schedulers and checkpoints act on the GMD optimizer as on any optimizer: clipping
  sees the unscaled merged gradient; the checkpoint holds GMD's state (its step, order RNG and the wrapped
  optimizer's state), so a resumed run continues exactly.
- The dominance indicators of every optimizer step go to the Trainer's logger through `DominanceLogger`, which
  the mixin registers (``configure_callbacks``; if you override it, add ``*super().configure_callbacks()``).

How it works, without an engine hook: the wrapped ``training_step`` keeps the losses and hands Lightning their
mean (logged as the step's loss); the mixin's ``backward`` ignores the tensor Lightning passes and runs
``GMD.backward`` on the kept losses, each scaled as Lightning scales the loss it would have differentiated.

Misuse raises with the reason: a scalar loss (GMD needs one loss per objective), a dict with Lightning's
``"loss"`` key, an optimizer that is not a `GMD`, a second optimizer, manual optimisation with the mixin, a
GradScaler with ``nonfinite`` other than ``"propagate"``, more than one process (use ``GMD(ddp_module=...)`` in a
plain loop: examples/python/ddp.py) or a strategy that runs the backward itself (DeepSpeed).

Manual optimisation — `manual_backward(module, gmd, losses)`: the GradScaler scaling of ``self.manual_backward``
for K losses (examples/python/lightning_manual.py).
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, Union

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import SingleDeviceStrategy
except ImportError as e:  # pragma: no cover - exercised by tests/test_lightning.py with lightning hidden
    raise ImportError("gmd_ext.lightning needs PyTorch Lightning (lightning >= 2.0): pip install lightning, or "
                      "the checkout's '.[lightning]' extra") from e
import torch

from gmd_ext.gmd import GMD, StepInfo

__all__ = ["GMDMixin", "DominanceLogger", "manual_backward", "Losses"]

#: The per-objective losses: a dict name -> scalar loss (gmd_ext.subset_losses' result), or a list of them.
Losses = Union[Mapping[Any, torch.Tensor], Sequence[torch.Tensor]]
_L = TypeVar("_L", bound=Losses)

if TYPE_CHECKING:  # the mixin is used on LightningModules: type its methods against one
    _ModuleBase = pl.LightningModule
else:
    _ModuleBase = object


class _StepLosses(dict[str, torch.Tensor]):
    """What a wrapped ``training_step`` hands Lightning: ``{"loss": mean of the objectives}``. Marks the output as
    already converted, so a subclass's ``training_step`` calling ``super().training_step(...)`` passes it on."""


def _check_step_output(out: object, where: str) -> list[torch.Tensor] | None:
    if out is None or isinstance(out, _StepLosses):
        return None
    if isinstance(out, torch.Tensor):
        raise TypeError(f"{where} returned one loss tensor (shape {tuple(out.shape)}); with GMDMixin it must return "
                        f"the per-objective losses, a dict name -> scalar loss (gmd_ext.subset_losses(...)) or a "
                        f"list of scalar losses: GMD merges the objectives' gradients, which a summed loss has "
                        f"already mixed")
    if isinstance(out, Mapping):
        if "loss" in out:
            raise ValueError(f"{where} returned a dict with Lightning's 'loss' key ({sorted(map(str, out))}); with "
                             f"GMDMixin return only the per-objective losses (name -> scalar loss) and log any "
                             f"other value with self.log")
        values = list(out.values())
    elif isinstance(out, Sequence) and not isinstance(out, (str, bytes)):
        values = list(out)
    else:
        raise TypeError(f"{where} must return a dict name -> scalar loss or a list of scalar losses (or None to "
                        f"skip the batch), got {type(out).__name__}")
    tensors = [v for v in values if isinstance(v, torch.Tensor) and v.numel() == 1]
    if not values or len(tensors) != len(values):
        raise TypeError(f"{where} must return at least one objective, each a scalar loss tensor, got "
                        f"{[type(v).__name__ if not isinstance(v, torch.Tensor) else tuple(v.shape) for v in values]}")
    return tensors


def _wrap_training_step(step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def training_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = step(self, *args, **kwargs)
        values = _check_step_output(out, f"{type(self).__name__}.training_step")
        if values is None:
            return out  # None (skip the batch), or already converted by a base class's training_step
        self._gmd_losses = out
        # The value Lightning reports as the step's loss (it never differentiates it: the mixin's backward does).
        return _StepLosses(loss=torch.stack([v.detach().float().reshape(()) for v in values]).mean()
                           .requires_grad_())

    setattr(training_step, "_gmd_wrapped", True)
    return training_step


def _scaled(losses: _L, scale: Callable[[torch.Tensor], torch.Tensor]) -> _L:
    """``losses`` with every loss mapped through ``scale``, keeping the container's type and attributes (the
    ``.subsets`` / ``.absent`` of gmd_ext.subset_losses' dict, which tell GMD which modalities each objective
    uses)."""
    if isinstance(losses, Mapping):
        out = copy.copy(losses)
        if not isinstance(out, MutableMapping):
            raise TypeError(f"the losses must be a dict (or a list), got a read-only {type(losses).__name__}")
        for k in list(out):
            out[k] = scale(out[k])
        return out  # copy.copy keeps the type (and the attributes)
    return [scale(l) for l in losses]  # type: ignore[return-value]  # a list of the losses, as given


def _engine(module: pl.LightningModule) -> GMD:
    trainer = module.trainer
    optimizers = trainer.optimizers
    if len(optimizers) != 1:
        raise ValueError(f"GMD merges the gradients of one optimizer, but configure_optimizers returned "
                         f"{len(optimizers)}; wrap one optimizer over all parameters in gmd_ext.GMD (use parameter "
                         f"groups for different learning rates)")
    gmd = optimizers[0]
    if not isinstance(gmd, GMD):
        raise TypeError(f"configure_optimizers must return a gmd_ext.GMD wrapping your optimizer "
                        f"(GMD(torch.optim.Adam(self.parameters()), seed=0)), got {type(gmd).__name__}")
    if trainer.world_size != 1 or not isinstance(trainer.strategy, SingleDeviceStrategy):
        raise NotImplementedError(f"gmd_ext.lightning runs GMD in one process on one device (SingleDeviceStrategy); "
                                  f"got {type(trainer.strategy).__name__} with world size {trainer.world_size}. "
                                  f"For DDP use GMD(..., ddp_module=...) in a plain loop (examples/python/ddp.py)")
    return gmd


def _scaler(module: pl.LightningModule, gmd: GMD) -> torch.amp.GradScaler | None:
    """The precision plugin's GradScaler (16-mixed), or None."""
    scaler: torch.amp.GradScaler | None = getattr(module.trainer.precision_plugin, "scaler", None)
    if scaler is not None and gmd.nonfinite != "propagate":
        raise ValueError(f'precision {module.trainer.precision!r} scales the losses with a GradScaler, so GMD must '
                         f'be built with nonfinite="propagate" (an overflowing step must reach the scaler as inf/NaN '
                         f'to be skipped and the scale lowered), got nonfinite={gmd.nonfinite!r}')
    return scaler


class GMDMixin(_ModuleBase):
    """Automatic optimisation with GMD for a LightningModule: put it before ``LightningModule`` in the bases
    (``class Net(GMDMixin, L.LightningModule)``). See the module docstring for what ``training_step`` and
    ``configure_optimizers`` return and what the Trainer's options do."""

    #: Passed to the `DominanceLogger` the mixin registers: also log every pairwise cosine.
    gmd_log_pairs: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The class's own training_step or one it inherits from a base without the mixin (class Net(GMDMixin,
        # MyModule)); LightningModule's placeholder is left alone, so Lightning still says it is missing.
        step = getattr(cls, "training_step", None)
        placeholder = step is pl.LightningModule.training_step
        if step is not None and not placeholder and not getattr(step, "_gmd_wrapped", False):
            setattr(cls, "training_step", _wrap_training_step(step))

    def configure_callbacks(self) -> Sequence[pl.Callback] | pl.Callback:
        theirs = super().configure_callbacks()
        return [*([theirs] if isinstance(theirs, pl.Callback) else theirs), DominanceLogger(pairs=self.gmd_log_pairs)]

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning calls this with the step's loss, divided by ``accumulate_grad_batches`` and scaled by the
        GradScaler; GMD instead differentiates every objective's loss, divided and scaled the same way."""
        if not self.automatic_optimization:
            raise RuntimeError("GMDMixin is for automatic optimisation; with automatic_optimization = False call "
                               "gmd_ext.lightning.manual_backward(self, gmd, losses) instead of self.manual_backward")
        losses = self.__dict__.pop("_gmd_losses", None)
        if losses is None:
            raise RuntimeError(f"{type(self).__name__}.backward found no per-objective losses: training_step "
                               f"must be defined on the GMDMixin subclass and return them (the step's loss was "
                               f"{loss!r})")
        gmd = _engine(self)
        scaler = _scaler(self, gmd)
        accumulate = self.trainer.accumulate_grad_batches

        def scale(l: torch.Tensor) -> torch.Tensor:
            l = l / accumulate  # as Lightning's ClosureResult divides a plain loss (no-op division when 1)
            return scaler.scale(l) if scaler is not None else l

        gmd.backward(_scaled(losses, scale))


def manual_backward(module: pl.LightningModule, gmd: GMD, losses: Losses) -> StepInfo:
    """``gmd.backward(losses)`` inside a manual-optimisation ``training_step``, scaled as ``module.manual_backward``
    scales one loss: by the precision plugin's GradScaler under 16-mixed (GMD then needs
    ``nonfinite="propagate"``). Then ``module.optimizers().step()`` unscales, runs ``on_before_optimizer_step``
    (clip there: ``self.clip_gradients``), steps through the scaler and updates it.

    Args:
        module: the LightningModule (``automatic_optimization = False``), attached to a Trainer.
        gmd: the GMD engine ``configure_optimizers`` returned (not ``module.optimizers()``, Lightning's wrapper).
        losses: the per-objective losses, a dict name -> scalar loss or a list.
    Returns:
        GMD's StepInfo.
    """
    if module.automatic_optimization:
        raise RuntimeError("manual_backward is for automatic_optimization = False; with automatic optimisation "
                           "use GMDMixin and return the losses from training_step")
    if not isinstance(gmd, GMD):
        raise TypeError(f"gmd must be the gmd_ext.GMD engine returned by configure_optimizers, got "
                        f"{type(gmd).__name__}")
    scaler = _scaler(module, gmd)
    return gmd.backward(_scaled(losses, scaler.scale) if scaler is not None else losses)


class DominanceLogger(pl.Callback):
    """Log GMD's dominance indicators of every optimizer step to the Trainer's logger (``self.log``, on step):
    ``gmd/num_conflicts`` (pairs of objectives with a negative dot product), ``gmd/cosine_mean`` and
    ``gmd/cosine_min`` (over the pairs of non-zero gradients), ``gmd/norm/<objective>`` (each objective's
    gradient norm, in the loss units GMD saw: divided by ``accumulate_grad_batches``, unscaled) and, with
    ``pairs=True``, ``gmd/cos/<a>|<b>`` for every pair. With accumulation the indicators are those of the
    accumulated step. A step whose gradients overflowed (skipped by the GradScaler) logs nothing.

    `GMDMixin` registers one; add it to ``Trainer(callbacks=...)`` yourself with manual optimisation.
    """

    def __init__(self, pairs: bool = False) -> None:
        self.pairs = bool(pairs)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        info = optimizer.last_info if isinstance(optimizer, GMD) else None
        if info is None:
            return
        gram = info.gram.detach().double().cpu()
        if not bool(torch.isfinite(gram).all()):
            return
        K = gram.shape[0]
        names = [str(n) for n in info.names] if info.names is not None else [str(k) for k in range(K)]
        norms = gram.diagonal().clamp_min(0).sqrt()
        scale = float(getattr(getattr(trainer.precision_plugin, "scaler", None), "get_scale", lambda: 1.0)())
        metrics = {"gmd/num_conflicts": float(info.num_conflicts)}
        iu = torch.triu_indices(K, K, 1)
        cos = info.cosines.detach().double().cpu()
        valid = (norms[iu[0]] > 0) & (norms[iu[1]] > 0)
        if bool(valid.any()):
            pair_cos = cos[iu[0], iu[1]][valid]
            metrics["gmd/cosine_mean"] = float(pair_cos.mean())
            metrics["gmd/cosine_min"] = float(pair_cos.min())
        for n, v in zip(names, norms.tolist()):
            metrics[f"gmd/norm/{n}"] = v / scale
        if self.pairs:
            for a, b in zip(*iu.tolist()):
                metrics[f"gmd/cos/{names[a]}|{names[b]}"] = float(cos[a, b])
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
