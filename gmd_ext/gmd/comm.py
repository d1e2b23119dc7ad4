"""Communication of the GMD engine: summing the per-objective gradient rows over the ranks of a process group.

The engine talks to this module only through `Comm`: `backward_context()` around the K backward passes,
`reduce(rows)` to start an asynchronous sum of some [*, N] rows, `wait(works)`, and `scale` (1 / world size),
which the engine folds into the combination coefficients instead of a pass over the buffer (docs/design.md §1).
"""
from __future__ import annotations

import contextlib

import torch


class Comm:
    """Sum-reduction of gradient rows over `ddp_module`'s process group, or over `process_group`, or nothing
    (single process: both None)."""

    def __init__(self, ddp_module=None, process_group=None):
        if ddp_module is not None and process_group is not None:
            raise ValueError("pass either ddp_module= (its process group is used) or process_group=, not both")
        if ddp_module is not None and not isinstance(ddp_module, torch.nn.parallel.DistributedDataParallel):
            raise TypeError(f"ddp_module must be a torch.nn.parallel.DistributedDataParallel, "
                            f"got {type(ddp_module).__name__}")
        self.ddp_module = ddp_module
        self.group = ddp_module.process_group if ddp_module is not None else process_group
        if ddp_module is not None:
            # DDP decides at forward time whether the next backward all-reduces: keep it off for good.
            ddp_module.require_backward_grad_sync = False

    @property
    def world_size(self) -> int:
        return 1 if self.group is None else torch.distributed.get_world_size(self.group)

    @property
    def scale(self) -> float:
        """Factor that turns the summed rows into the mean over ranks."""
        return 1.0 / self.world_size

    def broadcast_seed(self, seed: int, device) -> int:
        """Rank 0's `seed` on every rank (so every rank projects in the same order)."""
        if self.group is None:
            return seed
        t = torch.tensor([seed], dtype=torch.int64, device=device)
        torch.distributed.broadcast(t, src=torch.distributed.get_global_rank(self.group, 0), group=self.group)
        return int(t.item())

    @contextlib.contextmanager
    def backward_context(self):
        """Around the engine's backward passes: DDP stays silent, and its "mark a variable ready only once"
        error (a DDP model used without ddp_module=) is re-raised with the fix."""
        if self.ddp_module is not None and self.ddp_module.require_backward_grad_sync:
            raise RuntimeError("ddp_module.require_backward_grad_sync was re-enabled (e.g. by leaving a no_sync() "
                               "block), so the last forward prepared DDP to all-reduce inside each backward; GMD "
                               "all-reduces once per step itself — keep the DDP module in no-sync mode")
        ctx = self.ddp_module.no_sync() if self.ddp_module is not None else contextlib.nullcontext()
        try:
            with ctx:
                yield
        except RuntimeError as e:
            if "mark a variable ready only once" in str(e):
                raise RuntimeError("gmd_ext.GMD: a DistributedDataParallel model all-reduces inside each "
                                   "backward pass; pass GMD(..., ddp_module=<the DDP model>) so GMD runs "
                                   "the K passes without DDP sync and all-reduces once: " + str(e)) from e
            raise

    def reduce(self, rows: list[torch.Tensor]) -> list:
        """Start asynchronous SUM all-reduces of `rows` in place; returns the works for `wait`."""
        if self.group is None:
            return []
        try:
            return [torch.distributed.all_reduce(r, group=self.group, async_op=True) for r in rows]
        except RuntimeError as e:
            raise _comm_error(e) from e

    def wait(self, works: list) -> None:
        for w in works:
            try:
                w.wait()
            except RuntimeError as e:
                raise _comm_error(e) from e


def _comm_error(e: Exception) -> RuntimeError:
    return RuntimeError(f"gmd_ext.GMD: all-reduce of the per-objective gradients failed on the process group (a "
                        f"rank died, diverged in K / parameters, or timed out; the timeout is "
                        f"init_process_group(timeout=...)): {e}")
