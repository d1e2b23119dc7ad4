"""The torch.optim.Optimizer protocol of the GMD engine: a wrapper whose param_groups, state and defaults are the
wrapped optimizer's (not copies), so LR schedulers, torch.amp.GradScaler.step(gmd), checkpoints and Lightning act
on the optimizer that steps; checkpoints are validated before anything is loaded."""
from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

# Flags torch added to optimizers' param groups over releases: a checkpoint from an older torch may lack them
# (torch.optim.Optimizer.load_state_dict fills them in), so they do not tell two optimizer types apart.
_VERSION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable", "maximize", "decoupled_weight_decay"})


def _delegated(name: str) -> property:
    """An attribute of the wrapped optimizer, read and written through (not a copy)."""
    return property(lambda self: getattr(self.optimizer, name), lambda self, v: setattr(self.optimizer, name, v),
                    doc=f"The wrapped optimizer's {name}.")


class WrappedOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer that is `self.optimizer` for every purpose but `backward`; subclasses hold their
    changing state in `self._s` (one holder, never rebound: Lightning copies an optimizer's __dict__ into a
    wrapper instance, so state written through it must land in an object shared with the engine)."""

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

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (the wrapped optimizer's zero_grad) and the accumulated per-objective rows."""
        self.optimizer.zero_grad(set_to_none=set_to_none)  # patched: also clears the rows (_patch_zero_grad)

    def _patch_zero_grad(self, optimizer) -> None:
        """Make the wrapped optimizer's own zero_grad end the accumulated step too (loops that keep calling
        optimizer.zero_grad() must not accumulate onto the last step's rows). A weak reference: the optimizer
        does not keep the engine alive."""
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"
        ref = weakref.ref(self)
        inner = optimizer.zero_grad

        @functools.wraps(inner)
        def zero_grad(set_to_none: bool = True):
            engine = ref()
            if engine is not None:
                engine._end_step()
            return inner(set_to_none=set_to_none)

        optimizer.zero_grad = zero_grad

    def _end_step(self) -> None:
        """Forget the accumulated step (zero_grad)."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """optimizer.step(closure), unless the step was skipped (nonfinite="skip"); either way it ends a skipped
        step, so the next backward starts a new one.

        closure: as for any torch.optim.Optimizer — a callable that clears the gradients, computes the losses,
        runs ``gmd.backward(losses)`` and returns a loss; the wrapped optimizer calls it under grad mode."""
        if closure is not None:
            if not callable(closure):
                raise TypeError(f"closure must be a callable or None, got {type(closure).__name__}")
            return self.optimizer.step(torch.enable_grad()(closure))
        if self._s.skipped:
            self._s.skipped = False
            return None
        return self.optimizer.step()

    def state_dict(self) -> dict:
        """{"step", "generator" (the order RNG state), "optimizer" (optimizer.state_dict())}."""
        return {"step": self._s.step, "generator": self._generator().get_state(),
                "optimizer": self.optimizer.state_dict()}

    def _generator(self) -> torch.Generator:
        return getattr(self.aggregator, "generator", None) or self._s.spare_generator

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()`: all or nothing (a state that fails to load part-way leaves the engine and its
        optimizer as they were); a state of another optimizer type or malformed groups are refused first."""
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
        _check_optimizer_state(state_dict["optimizer"], self.optimizer)
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


def _check_optimizer_state(saved, optimizer) -> None:
    """state_dict['optimizer'] must be a torch.optim state of this optimizer's type and group structure."""
    name = type(optimizer).__name__
    if not isinstance(saved, Mapping) or not isinstance(saved.get("state"), Mapping) or \
            not isinstance(saved.get("param_groups"), Sequence) or isinstance(saved.get("param_groups"), str):
        raise ValueError(f"state_dict['optimizer'] must be an optimizer state_dict ({{'state': dict, "
                         f"'param_groups': list}}), got {type(saved).__name__}"
                         f"{sorted(saved) if isinstance(saved, Mapping) else ''}")
    for i, group in enumerate(saved["param_groups"]):
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), Sequence) or \
                not all(isinstance(k, int) and not isinstance(k, bool) for k in group["params"]):
            raise ValueError(f"state_dict['optimizer']['param_groups'][{i}] must be a dict with 'params' (a list of "
                             f"int parameter ids) and the optimizer's hyperparameters, got {group!r:.200}")
        lacking = set(optimizer.defaults) - set(group) - _VERSION_FLAGS
        if lacking:
            raise ValueError(f"state_dict['optimizer'] is not a {name} state: its param_groups[{i}] lacks "
                             f"{sorted(lacking)}, which {name} needs (a state saved from another optimizer type, "
                             f"e.g. Adam's into SGD?)")
