"""GMD on FSDP2 models (torch.distributed.fsdp.fully_shard), selected automatically when the parameters are DTensors.

Each of the K backward passes runs through FSDP unchanged: FSDP all-gathers the parameters it needs, and
reduce-scatters (averages) the objective's gradient into the sharded DTensor `.grad`; its local shard is copied
into row k of this rank's [K, N/W] buffer and `.grad` is dropped, so per-rank gradient memory is K·N/W (+ N/W for
the merged gradient, + FSDP's transient unsharded gradients of one parameter group). Γ is the sum over ranks of
the shard Gramians (one all-reduce of K×K values on the mesh's group), every rank derives the same coefficients,
combines its shards, and the merged shard becomes the DTensor `.grad` the optimizer steps on (docs/design.md §1).
The shared-element rule holds per element: an element's scale depends only on which objectives use it, which is
the same on every rank.

Supported: fully_shard on a 1-D device mesh, any reshard_after_forward (True, False, an int), and
MixedPrecisionPolicy (param_dtype / reduce_dtype: the per-objective rows are the sharded gradients FSDP
produces, in the sharded parameters' dtype). Not supported: HSDP (2-D meshes), strategy="batched" (FSDP's
backward hooks do not run under vmap; GMD uses strategy="sequential"), ddp_module= / process_group= (the mesh
defines the group).
"""
from __future__ import annotations

import torch

from gmd_ext.gmd.buffers import Buffer, RowState, check_params, last_graph
from gmd_ext.gmd.comm import Comm


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_sharded(params) -> bool:
    """True when the parameters are FSDP2's DTensors."""
    DTensor = _dtensor_type()
    return DTensor is not None and any(isinstance(p, DTensor) for p in params)


class FSDP2(Comm):
    """The communicator of an FSDP2 (fully_shard) model: FSDP reduce-scatters each objective's gradient itself; the
    engine sums the shard Gramians over the mesh's group (bound to the parameters' mesh by the engine)."""

    kind = "fsdp2"

    def __init__(self):
        super().__init__()

    def __repr__(self) -> str:
        return f"FSDP2(world_size={self.world_size})"

    def bind(self, params) -> None:
        DTensor = _dtensor_type()
        if not all(isinstance(p, DTensor) for p in params):
            raise TypeError("GMD on an FSDP2 model: every trainable parameter of the optimizer must be sharded by "
                            "fully_shard (a DTensor); some are plain tensors")
        meshes = {p.device_mesh for p in params}  # equal meshes (each fully_shard call makes one) hash alike
        if len(meshes) != 1:
            raise ValueError(f"GMD on an FSDP2 model: the parameters must share one device mesh, got {len(meshes)}")
        mesh = next(iter(meshes))
        if mesh.ndim != 1:
            raise ValueError(f"GMD on an FSDP2 model supports a 1-D device mesh (fully sharded), got a "
                             f"{mesh.ndim}-D mesh (HSDP)")
        self.group = mesh.get_group()
        adopt(params)

    @property
    def scale(self) -> float:
        return 1.0  # FSDP's reduce-scatter already averages over the ranks

    def buffers(self, params, K: int, full_rows: bool):
        return ShardedGrads(params, K)

    def keep_rows(self, accumulating: bool) -> bool:
        return accumulating  # the rows hold FSDP's reduced shards; each call adds its own

    def row_done(self, bufs, k: int) -> None:
        pass  # the rows already hold FSDP's reduce-scattered shards

    def rows_done(self, bufs) -> None:
        pass

    def reduce_gram(self, gram: torch.Tensor) -> torch.Tensor:
        gram = gram.contiguous()
        self._run(lambda: torch.distributed.all_reduce(gram, group=self.group))
        return gram


def _managed(params) -> list:
    """(module, its FSDPParams among `params`) for every FSDP2-managed module holding some of `params`."""
    from torch.distributed import _composable_state
    from torch.distributed.fsdp import FSDPModule

    ids = {id(p) for p in params}
    out = []
    for module in list(_composable_state._module_state_mapping.keys()):
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        held = [fp for fp in (group.fsdp_params if group is not None else ()) if id(fp.sharded_param) in ids]
        if held:
            out.append((module, held))
    return out


def adopt(params) -> None:
    """Make a fully_shard model ready for GMD, with nothing for the user to do:

    - `forward_branches` (the library's DS models, DynamicSharing) is registered as an FSDP forward method, so
      FSDP all-gathers the parameters around it as it does around `forward` (otherwise its convolutions see
      sharded DTensors);
    - the modality declarations are re-read: fully_shard replaces every parameter by a new DTensor parameter,
      which does not carry the old one's declaration (gmd_ext.ops.ds_ops); each module's `_declare()` (the DS
      layers, the library's models, converted networks) declares its current parameters again, and the rule of
      the parameter a module holds by each name is copied onto the sharded parameter the optimizer steps."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    from gmd_ext.ops.ds_ops import MODALITY_ATTR

    for module, held in _managed(params):
        # register_fsdp_forward_method patches the instance: an instance attribute means it was registered.
        if hasattr(module, "forward_branches") and "forward_branches" not in vars(module):
            register_fsdp_forward_method(module, "forward_branches")
        for m in module.modules():
            if callable(getattr(m, "_declare", None)):
                m._declare()
        for fp in held:
            current = getattr(fp._module_info.module, fp._module_info.param_name)
            rule = getattr(current, MODALITY_ATTR, None)
            if rule is not None and current is not fp.sharded_param:
                setattr(fp.sharded_param, MODALITY_ATTR, rule)


class ShardedGrads(RowState):
    """The [K, N/W] rows of this rank's local gradient shards (one buffer per (device, dtype)), filled from FSDP's
    sharded `.grad` after each backward pass (added to them when accumulating: FSDP already averaged this
    call's gradient over the ranks, so nothing is reduced twice); `reach[k, i]`: objective k produced a gradient
    for parameter i."""

    def __init__(self, params: list, K: int):
        check_params(params)
        with torch.no_grad():
            local = [p.to_local() for p in params]
        groups: dict = {}
        for i, t in enumerate(local):
            groups.setdefault((t.device, t.dtype), []).append(i)
        self.buffers = [Buffer([local[i] for i in idx], idx, K) for idx in groups.values()]
        super().__init__(params, K)

    def fill_sequential(self, losses, after_row) -> None:
        last = last_graph(losses)
        for k, loss in enumerate(losses):
            for p in self.params:
                p.grad = None  # FSDP accumulates into an existing sharded .grad
            if loss is not None:  # None: no graph, a zero row
                loss.backward(retain_graph=k < last)
            for b in self.buffers:
                for i, view in zip(b.index, b.views[k]):
                    g = self.params[i].grad
                    if g is None:
                        if not self.keep:
                            view.zero_()
                    else:
                        self.reach[k, i] = True
                        if self.keep:
                            view.add_(g.to_local())
                        else:
                            view.copy_(g.to_local())
            for p in self.params:
                p.grad = None
            after_row(k)

    def set_grads(self, merged) -> None:
        """The merged shard of every reached parameter as its sharded DTensor `.grad`."""
        DTensor = _dtensor_type()
        reach_any = self.reach.any(0)
        for b, m in zip(self.buffers, merged):
            for v, i in zip(b.row_views(m), b.index):
                p = self.params[i]
                p.grad = (DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                             run_check=False) if reach_any[i] else None)
                self.merged[i] = p.grad
        self.record(merged)

    def close(self) -> None:
        pass
