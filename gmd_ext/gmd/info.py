"""`StepInfo`: what one `GMD.backward` saw (docs/design.md §1: the dominance indicators are free from Γ and A)."""
from __future__ import annotations

import functools

import torch

from gmd_ext.gmd.projection import ProjectionInfo


class StepInfo(ProjectionInfo):
    """What one `GMD.backward` saw: a ProjectionInfo (gram, coefficients, cosines, norms, num_conflicts,
    projected_gram, projected_cosines; fp32) plus the step. Reading `losses` or `num_conflicts` may synchronise
    with the device (they are already on the host when the engine synchronised anyway: nonfinite checks on
    CUDA, or a monitor).

    Attributes:
        step: index of this backward call (0-based). names: objective names (keys of a dict of losses, else
        None). skipped: True when nonfinite="skip" dropped this step (reason says why).
        loss_tensor [K]: the loss values (detached). losses: list of K floats.
        coefficients [K, K]: the projection's A (projected gradients = A @ G); diag(w) for a Gramian weighting.
    """

    _KEYS = ("step", "names", "skipped", "reason", "gram", "coefficients", "cosines", "norms",
             "num_conflicts", "losses", "projected_cosines")

    def __init__(self, step: int, names: tuple[str, ...] | None, gram: torch.Tensor, coefficients: torch.Tensor,
                 loss_tensor: torch.Tensor, skipped: bool = False, reason: str | None = None) -> None:
        super().__init__(gram, coefficients)
        self.step = step
        self.names = names
        self.loss_tensor = loss_tensor
        self.skipped = skipped
        self.reason = reason

    @functools.cached_property
    def losses(self) -> list[float]:
        return self.loss_tensor.tolist()

    def __repr__(self) -> str:
        return (f"StepInfo(step={self.step}, K={self.gram.shape[0]}, skipped={self.skipped}, "
                f"names={self.names})")
