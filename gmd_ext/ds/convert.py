"""Dynamic Sharing for any network (docs/design.md §7): `dynamic_sharing(net, modalities)`.

DS is a rule over a network, not an architecture: the convolution / linear / attention weights are shared by all
modalities, every normalisation layer is per modality, each modality runs through the network on its own and the
outputs are fused by a mean over the modalities present. So a network written for ONE modality's input converts,
the way torch.nn.SyncBatchNorm.convert_sync_batchnorm converts: `dynamic_sharing` deep-copies `net` and swaps each
normalisation layer, under the same module name, for a `ModalityNorm` whose parameters and buffers gain a leading
modality dim M (weight [M, C], running_mean [M, C], num_batches_tracked [M]; each row initialised from the
original, so a pretrained net converts without changing what any branch computes).

Execution (gmd_ext.ds.packed): the present (sample, modality) pairs are packed once, modality-major (a PairPlan
built on the host), the shared network runs once on the packed rows, and the rows are fused once. The converted
norms read each row's modality from the plan of the forward under way: a ContextVar set by DynamicSharing around
the network call and reset when it returns (per thread and per context, nothing survives the forward); inside a
torch.compile'd forward, where Dynamo cannot trace ContextVar.set, a slot the module and its norms share, written
and cleared by the traced forward (_Slot). GroupNorm and affine InstanceNorm run the fused modality_group_norm kernel with each
row's affine gathered from its modality; LayerNorm / RMSNorm gather the affine the same way; BatchNorm (and
tracked InstanceNorm) runs per modality block — the packed rows of one modality are contiguous — with that
modality's batch statistics over its present samples and its own running statistics (DSBN, Chang et al. 2019).

Declarations for GMD's official reduction (gmd_ext/gmd/usage.py) are made by `declare` below, the one place this
module declares anything: per-modality norm parameters along dim 0, stem parameters as their modality's, every
other parameter shared. They are made again when a converted module is deep-copied or unpickled.
"""
from __future__ import annotations

import contextvars
import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from gmd_ext.ds.layers import group_norm_rows, layer_norm_rows
from gmd_ext.ds.packed import branch_output, fill_missing, fuse
from gmd_ext.ops import ds_ops
from gmd_ext.ops.ds_ops import PairPlan, as_plan

__all__ = ["DynamicSharing", "ModalityNorm", "dynamic_sharing", "declare"]

BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
# x: one [B, M·C, ...] tensor or M tensors [B, ...]; present: bool [B, M], its PairPlan, or None (all present).
Inputs = torch.Tensor | Sequence[torch.Tensor]
Present = torch.Tensor | PairPlan | None
FUSIONS = ("mean",)

# The plan of the forward under way: set by DynamicSharing._run around the network call, reset when it returns.
_PLAN: contextvars.ContextVar[PairPlan | None] = contextvars.ContextVar("gmd_ext.ds.plan", default=None)


class _Slot:
    """Where the plan travels inside a torch.compile'd forward (Dynamo cannot trace ContextVar.set): one slot shared
    by a DynamicSharing and its converted norms, written and cleared by the compiled forward (Dynamo replays the
    writes as side effects; the graph reads the plan's tensors as inputs, not the slot). Empty at rest."""
    __slots__ = ("plan",)

    def __init__(self):
        self.plan: PairPlan | None = None


def declare(module: nn.Module, name: str, rule: tuple) -> None:
    """Declare which modalities use parameter `name` of `module` (its own, not a submodule's) to GMD's official
    reduction: ("dim", 0) — slice m belongs to modality m; ("modality", m) — all of it to modality m; ("shared",)
    — every modality. The one home of this module's declarations (through the public helpers of
    gmd_ext.ops.ds_ops), called with the owning module so that a declaration kept by module and name needs no
    change elsewhere."""
    param = module._parameters[name]
    assert param is not None, name
    if rule[0] == "dim":
        ds_ops.declare_modality_dim(param, rule[1])
    elif rule[0] == "modality":
        ds_ops.declare_modality(param, rule[1])
    else:
        ds_ops.declare_shared(param)


# ---------------------------------------------------------------- converted normalisation layers
def _plan(module: "ModalityNorm") -> PairPlan | None:
    """The plan of the forward under way: the context's (eager), the slot's in a compiled forward (Dynamo traces
    neither ContextVar.get nor .set)."""
    compiling = torch.compiler.is_compiling()
    plan = None if compiling else _PLAN.get()  # eager: the context, per thread
    if plan is None:  # a compiled DynamicSharing forward (or the eager code between its graphs)
        plan = module._slot.plan
    if plan is None and compiling:
        # A network frame compiled on its own after a graph break of an eager DynamicSharing forward: read the
        # context (itself a graph break).
        plan = _PLAN.get()
    return plan


def _check_plan(module: "ModalityNorm", args) -> None:
    """Forward pre-hook of every converted norm: a plan must be active and the rows must be its packed rows.
    (Being a hook, it also keeps nn.TransformerEncoderLayer off its fused inference path, which would read the
    [M, ...] affine as one modality's.)"""
    plan = _plan(module)
    if plan is None:
        raise RuntimeError(f"{module.layer_name!r} ({type(module).__name__} of {module.kind}) is a Dynamic Sharing "
                           "layer: it runs only inside DynamicSharing's forward / forward_branches / "
                           "forward_modality, which give each packed row its modality (activation checkpointing "
                           "that re-runs it outside them is not supported); use DynamicSharing.branch(m) for one "
                           "modality's plain network")
    rows = args[0] if args else None
    want = plan.counts[plan.branch] if plan.branch is not None else plan.num_pairs
    if not isinstance(rows, torch.Tensor) or rows.dim() < 1 or rows.shape[0] != want:
        got = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(f"{module.layer_name!r} ({module.kind}) expects the packed rows of its forward on dim 0 "
                         f"({want} (sample, modality) pairs), got {got}: the network must keep the batch on dim 0 "
                         "(e.g. batch_first=True)")


class ModalityNorm(nn.Module):
    """A normalisation layer converted by `dynamic_sharing`: the original's parameters and buffers with a leading
    modality dim M, under the same names (weight [M, *shape], running_mean [M, C], num_batches_tracked [M]),
    row m initialised from the original. forward(rows [P, ...]) takes the packed rows of the forward under way
    (DynamicSharing sets the plan) and applies each row's modality's parameters. `plain(m)` is the original layer
    type holding modality m's rows."""

    # Copied from the original layer where it has them (the torch norm classes' attributes).
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
    eps: float
    momentum: float | None
    track_running_stats: bool
    num_groups: int
    normalized_shape: tuple[int, ...]

    def __init__(self, layer: nn.Module, num_modalities: int, name: str):
        super().__init__()
        self.num_modalities, self.layer_name, self.kind = num_modalities, name, type(layer).__name__
        for attr in ("eps", "momentum", "affine", "track_running_stats", "num_groups", "num_channels",
                     "num_features", "normalized_shape", "elementwise_affine"):
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))
        M = num_modalities
        for n, p in layer.named_parameters(recurse=False):
            rows = p.detach().unsqueeze(0).expand((M,) + p.shape).clone()
            self.register_parameter(n, nn.Parameter(rows, requires_grad=p.requires_grad))
        for n, b in layer.named_buffers(recurse=False):
            persistent = n not in layer._non_persistent_buffers_set
            self.register_buffer(n, b.detach().unsqueeze(0).expand((M,) + b.shape).clone(), persistent=persistent)
        for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if n not in self._parameters and n not in self._buffers:
                setattr(self, n, None)
        # The original's configuration, without its tensors (meta): plain(m) copies it and fills in row m.
        self._template = (copy.deepcopy(layer).to("meta"),)
        self._slot = _Slot()  # DynamicSharing gives all its norms one slot
        self.train(layer.training)
        self.register_forward_pre_hook(_check_plan)
        self._declare()

    def _declare(self) -> None:
        for n, p in self._parameters.items():
            if p is not None:
                declare(self, n, ("dim", 0))

    def __setstate__(self, state):
        super().__setstate__(state)
        self._declare()  # a deep-copied Parameter does not keep Python attributes

    def plain(self, modality: int) -> nn.Module:
        """The original layer type holding modality `modality`'s parameters and buffers (copies)."""
        layer = copy.deepcopy(self._template[0])
        for n, p in self._parameters.items():
            if p is not None:
                setattr(layer, n, nn.Parameter(p.detach()[modality].clone(), requires_grad=p.requires_grad))
        for n, b in self._buffers.items():
            if b is not None:
                layer._buffers[n] = b[modality].clone()
        return layer.train(self.training)

    @staticmethod
    def _blocks(rows: torch.Tensor, plan: PairPlan):
        """(modality, rows of that modality) per modality with rows: contiguous blocks of the modality-major plan."""
        if plan.branch is not None:
            return [(plan.branch, rows)]
        return [(m, rows.narrow(0, s, n)) for m, (s, n) in enumerate(zip(plan.starts, plan.counts)) if n]

    @staticmethod
    def _cat(pieces: list) -> torch.Tensor:
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def extra_repr(self) -> str:
        return f"{self.kind} per modality, num_modalities={self.num_modalities}"


class ModalityBatchNorm(ModalityNorm):
    """BatchNorm1/2/3d / SyncBatchNorm per modality (DSBN): each modality's batch statistics over its present
    samples in training, its own running statistics (updated only when it is present)."""

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        plan = _plan(self)
        if self.training and isinstance(self._template[0], nn.SyncBatchNorm) and torch.distributed.is_available() \
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise NotImplementedError(f"{self.layer_name!r}: a converted SyncBatchNorm computes each modality's "
                                      "statistics on this rank's rows only; cross-rank synchronisation per "
                                      "modality is not implemented (convert a BatchNorm net, or train on one rank)")
        return self._cat([self._block(x, m) for m, x in self._blocks(rows, plan)])

    def _block(self, x: torch.Tensor, m: int) -> torch.Tensor:
        # torch.nn.modules.batchnorm._BatchNorm.forward on modality m's rows of every tensor.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked[m].add_(1)
            factor = 1.0 / float(self.num_batches_tracked[m]) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean[m] if tracked and self.running_mean is not None else None,
                            self.running_var[m] if tracked and self.running_var is not None else None,
                            None if self.weight is None else self.weight[m],
                            None if self.bias is None else self.bias[m], use_batch, factor, self.eps)


class ModalityInstanceNorm(ModalityNorm):
    """InstanceNorm1/2/3d with a per-modality affine and (track_running_stats) per-modality running statistics.
    Untracked: the fused modality_group_norm kernel (one group per channel)."""

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        plan = _plan(self)
        if not self.track_running_stats:
            return group_norm_rows(rows, plan, self.weight, self.bias, rows.shape[1], self.eps)
        return self._cat([F.instance_norm(x, self.running_mean[m], self.running_var[m],
                                          None if self.weight is None else self.weight[m],
                                          None if self.bias is None else self.bias[m],
                                          self.training, 0.0 if self.momentum is None else self.momentum, self.eps)
                          for m, x in self._blocks(rows, plan)])


class ModalityGroupNorm(ModalityNorm):
    """GroupNorm with a per-modality affine: the fused modality_group_norm kernel."""

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return group_norm_rows(rows, _plan(self), self.weight, self.bias, self.num_groups, self.eps)


class ModalityLayerNorm(ModalityNorm):
    """LayerNorm / RMSNorm with a per-modality affine (weight / bias [M, *normalized_shape])."""

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        eps = self.eps
        if self.kind_rms and eps is None:
            eps = torch.finfo(rows.dtype).eps  # torch.nn.RMSNorm's default
        return layer_norm_rows(rows, _plan(self), self.weight, self.bias, tuple(self.normalized_shape), eps,
                               rms=self.kind_rms)

    @property
    def kind_rms(self) -> bool:
        return isinstance(self._template[0], nn.RMSNorm)


# (torch base class, converted class), most specific first. InstanceNorm is a _NormBase but not a _BatchNorm.
_CONVERTIBLE = ((_BatchNorm, ModalityBatchNorm), (_InstanceNorm, ModalityInstanceNorm),
                (nn.GroupNorm, ModalityGroupNorm), (nn.LayerNorm, ModalityLayerNorm),
                (nn.RMSNorm, ModalityLayerNorm))
_BASE_FORWARD = {_BatchNorm: (_BatchNorm.forward, nn.SyncBatchNorm.forward),
                 _InstanceNorm: (_InstanceNorm.forward,), nn.GroupNorm: (nn.GroupNorm.forward,),
                 nn.LayerNorm: (nn.LayerNorm.forward,), nn.RMSNorm: (nn.RMSNorm.forward,)}


def _converted(layer: nn.Module, name: str, M: int) -> ModalityNorm | nn.Module | None:
    """The converted layer; the layer itself when it holds nothing per modality (no affine, no running
    statistics: its statistics are per sample, hence per pair, already); None when it is no normalisation layer.
    Raises for normalisation-like layers it cannot convert."""
    for base, cls in _CONVERTIBLE:
        if isinstance(layer, base):
            if type(layer).forward not in _BASE_FORWARD[base]:
                raise TypeError(f"dynamic_sharing: cannot convert layer {name!r} ({type(layer).__name__}): it "
                                f"subclasses {base.__name__} but overrides forward(), so what it computes per "
                                "modality is unknown")
            if any(isinstance(t, nn.parameter.UninitializedParameter) for t in layer.parameters(recurse=False)) \
                    or any(isinstance(t, nn.parameter.UninitializedBuffer) for t in layer.buffers(recurse=False)):
                raise ValueError(f"dynamic_sharing: layer {name!r} ({type(layer).__name__}) is lazy and not "
                                 "initialised yet: run the network once on an input before converting it")
            tensors = [t for t in list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False))
                       if t is not None]
            return cls(layer, M, name) if tensors else layer
    kind = type(layer).__name__
    if isinstance(layer, _NormBase):
        raise TypeError(f"dynamic_sharing: cannot convert layer {name!r} ({kind}): a normalisation layer of a type "
                        "it does not know (BatchNorm*, SyncBatchNorm, InstanceNorm*, GroupNorm, LayerNorm, RMSNorm "
                        "and subclasses that keep their forward are converted)")
    own = list(layer.parameters(recurse=False)) + [b for b in layer.buffers(recurse=False) if b is not None]
    if "norm" in kind.lower() and own and not isinstance(layer, ModalityNorm):
        coupled = "batch-coupled " if "batch" in kind.lower() else ""
        raise TypeError(f"dynamic_sharing: cannot convert {coupled}layer {name!r} ({kind}): a normalisation layer "
                        "of a type it does not know (only torch's BatchNorm* / SyncBatchNorm couple samples and "
                        "are converted per modality; InstanceNorm*, GroupNorm, LayerNorm, RMSNorm are too)")
    return None


def _convert(net: nn.Module, M: int) -> tuple[nn.Module, int]:
    """Swap every normalisation layer of `net` (in place) for its converted form; returns (root, number of
    normalisation layers found, converted or kept)."""
    found = 0
    for name, layer in list(net.named_modules()):
        if isinstance(layer, ModalityNorm):
            raise ValueError(f"dynamic_sharing: net is already converted (layer {name!r} is a {type(layer).__name__});"
                             " pass the original network")
        if getattr(layer, "batch_first", True) is False:
            raise ValueError(f"dynamic_sharing: layer {name!r} ({type(layer).__name__}) has batch_first=False; the "
                             "network must take [B, ...] inputs with the batch on dim 0 (build it with "
                             "batch_first=True)")
        new = _converted(layer, name or "<net>", M)
        if new is None:
            continue
        found += 1
        if new is not layer:
            net = _replace(net, name, new)
    return net, found


def _replace(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at module path `name` of root (the root itself for ""); returns the root."""
    if not name:
        return new
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)
    return root


# ---------------------------------------------------------------- the converted network
class DynamicSharing(nn.Module):
    """A network converted to Dynamic Sharing over M modalities (build it with `gmd_ext.dynamic_sharing`).

    Attributes: net (the converted copy: the original's module names, normalisation parameters and buffers
    [M, *original shape]), stems (None or a ModuleList of M per-modality input modules), modalities (names),
    num_modalities, fusion ("mean").

    Inputs x: one tensor [B, M·C, ...] (the modalities stacked on dim 1, C channels each, as BraTS volumes come)
    or a sequence of M tensors [B, ...] (one per modality; with stems, each the input of its stem). present: bool
    [B, M] (None: all present; every sample needs one modality) or the PairPlan built from it.
    """

    def __init__(self, net: nn.Module, modalities: Sequence[str] = BRATS_MODALITIES, *,
                 stems: Sequence[nn.Module] | None = None, fusion: str = "mean"):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        if isinstance(modalities, str) or not isinstance(modalities, Sequence) or not modalities \
                or not all(isinstance(m, str) and m for m in modalities) or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be a non-empty sequence of distinct names, got {modalities!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS} (the mean over the modalities present), got {fusion!r}")
        self.modalities, self.fusion = tuple(modalities), fusion
        M = len(self.modalities)
        if stems is not None:
            if isinstance(stems, nn.Module) and not isinstance(stems, (nn.ModuleList, nn.Sequential)) \
                    or len(stems) != M or not all(isinstance(s, nn.Module) for s in stems):
                raise ValueError(f"stems must be None or a sequence of M = {M} modules (one per modality "
                                 f"{self.modalities}), got {stems!r:.200}")
        self.stems = None if stems is None else nn.ModuleList(copy.deepcopy(list(stems)))
        converted, found = _convert(copy.deepcopy(net), M)
        if not found and stems is None:
            raise ValueError(f"dynamic_sharing: net ({type(net).__name__}) has no normalisation layer (BatchNorm, "
                             "InstanceNorm, GroupNorm, LayerNorm, RMSNorm), so Dynamic Sharing would make nothing "
                             "modality-specific; give per-modality input modules with stems=, or use a network with "
                             "normalisation layers")
        self.net = converted
        self._slot = _Slot()
        for mod in converted.modules():
            if isinstance(mod, ModalityNorm):
                mod._slot = self._slot
        self._declare()

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    def _declare(self) -> None:
        """Every parameter declared for GMD's official reduction: norm rows per modality, stems per modality,
        the rest shared."""
        for mod in self.net.modules():
            if isinstance(mod, ModalityNorm):
                mod._declare()
            else:
                for n, p in mod._parameters.items():
                    if p is not None:
                        declare(mod, n, ("shared",))
        if self.stems is not None:
            for m, stem in enumerate(self.stems):
                for mod in stem.modules():
                    for n, p in mod._parameters.items():
                        if p is not None:
                            declare(mod, n, ("modality", m))

    def __setstate__(self, state):
        super().__setstate__(state)
        self._declare()  # a deep-copied Parameter does not keep Python attributes

    # -------------------------------------------------------------- inputs
    def _index(self, modality) -> int:
        if isinstance(modality, str) and modality in self.modalities:
            return self.modalities.index(modality)
        if isinstance(modality, int) and not isinstance(modality, bool) and 0 <= modality < self.num_modalities:
            return modality
        raise ValueError(f"modality must name one of {self.modalities} or index 0..{self.num_modalities - 1}, "
                         f"got {modality!r}")

    def _plan(self, x: Inputs, present: Present) -> PairPlan:
        M = self.num_modalities
        if isinstance(x, torch.Tensor):
            if x.dim() < 2 or x.shape[1] % M or x.shape[1] == 0:
                raise ValueError(f"x must be [B, M·C, ...]: the M = {M} modalities {self.modalities} stacked on dim "
                                 f"1 with C channels each, got shape {tuple(x.shape)} (dim 1 = "
                                 f"{x.shape[1] if x.dim() > 1 else '-'} is not a positive multiple of {M})")
            B, device = x.shape[0], x.device
        elif isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
            if len(x) != M or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in x):
                raise ValueError(f"x must be a sequence of M = {M} tensors [B, ...] (modalities {self.modalities}), "
                                 f"got {len(x)} item(s) of types {[type(t).__name__ for t in x]}")
            B, device = x[0].shape[0], x[0].device
            for m, t in enumerate(x):
                if t.shape[0] != B or t.device != device:
                    raise ValueError(f"x[{m}] ({self.modalities[m]}) must have B = {B} rows on {device} like x[0], "
                                     f"got shape {tuple(t.shape)} on {t.device}")
                if self.stems is None and t.shape != x[0].shape:
                    raise ValueError(f"x[{m}] ({self.modalities[m]}) must have x[0]'s shape {tuple(x[0].shape)} "
                                     f"(one shared network; give stems= for modalities of different shapes), got "
                                     f"{tuple(t.shape)}")
        else:
            raise TypeError(f"x must be a tensor [B, M·C, ...] or a sequence of M tensors, got {type(x).__name__}")
        return as_plan(present, B, M, device)

    def _rows(self, x: Inputs, plan: PairPlan) -> torch.Tensor:
        """The packed input rows [P, C, ...] of plan (stems applied to the present pairs only)."""
        if isinstance(x, torch.Tensor) and self.stems is None:
            return ds_ops.pack(x.unflatten(1, (plan.M, x.shape[1] // plan.M)), plan)
        xs = x.chunk(plan.M, 1) if isinstance(x, torch.Tensor) else x
        mods = [plan.branch] if plan.branch is not None else range(plan.M)
        pieces = []
        for m in mods:
            n = plan.counts[m]
            if n:
                rows = xs[m].index_select(0, plan.sample.narrow(0, plan.starts[m], n))
                pieces.append(rows if self.stems is None else self.stems[m](rows))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _run(self, rows: torch.Tensor, plan: PairPlan) -> torch.Tensor:
        """The shared network on packed rows of plan, each converted norm applying its rows' modality."""
        if torch.compiler.is_compiling():
            self._slot.plan = plan  # Dynamo cannot trace ContextVar.set (see _Slot)
            try:
                out = self.net(rows)
            finally:
                self._slot.plan = None
        else:
            token = _PLAN.set(plan)
            try:
                out = self.net(rows)
            finally:
                _PLAN.reset(token)
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != rows.shape[0]:
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(f"dynamic_sharing: net must return one tensor [B, ...] per input batch; on {rows.shape[0]}"
                            f" packed rows it returned {got}")
        return out

    # -------------------------------------------------------------- forwards
    def forward(self, x: Inputs, present: Present = None) -> torch.Tensor:
        """Fused output [B, ...]: the mean over each sample's present modalities of the network's output, the
        present pairs run as one packed batch (absent pairs never computed)."""
        plan = self._plan(x, present)
        return fuse(self._run(self._rows(x, plan), plan), plan)

    def forward_branches(self, x: Inputs, present: Present = None) -> tuple[torch.Tensor, ...]:
        """Per-modality outputs: a tuple of M tensors [B, ...], zeros where absent (never computed).

        With grad enabled each modality's branch runs on its present samples with its own autograd graph and a
        marked output (gmd_ext.ds.packed.branch_output), so `gmd_ext.subset_losses(...)` differentiates each
        subset through its own branches and GMD(strategy="auto") batches the objectives per branch. Without grad
        the present pairs run as one packed batch, split per modality."""
        plan = self._plan(x, present)
        if not torch.is_grad_enabled():
            return ds_ops.scatter(self._run(self._rows(x, plan), plan), plan).unbind(1)
        outs: list[torch.Tensor | None] = []
        for m in range(plan.M):
            if plan.counts[m] == 0:
                outs.append(None)
                continue
            sub = plan.only(m)
            outs.append(branch_output(self._run(self._rows(x, sub), sub), sub, m))
        return fill_missing(outs)

    def forward_modality(self, x: torch.Tensor, modality: int | str) -> torch.Tensor:
        """One modality's network on every sample: x [B, ...] (that modality's input; its stem's input with
        stems) -> the network's output [B, ...]."""
        m = self._index(modality)
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError(f"x must be one modality's input tensor [B, ...], got {type(x).__name__}")
        present = torch.zeros(x.shape[0], self.num_modalities, dtype=torch.bool)
        present[:, m] = True
        plan = PairPlan(present, x.shape[0], self.num_modalities, x.device)
        plan.branch = m  # every row is modality m's: the norms use its parameters as they are
        return self._run(x if self.stems is None else self.stems[m](x), plan)

    def branch(self, modality: int | str) -> nn.Module:
        """Modality `modality`'s network as a plain module of net's class (copies of the shared weights and of
        that modality's normalisation rows; with stems, nn.Sequential(stem, net)), for export and checking.
        Same training mode as this module."""
        m = self._index(modality)
        net = copy.deepcopy(self.net)
        for name, layer in list(net.named_modules()):
            if isinstance(layer, ModalityNorm):
                net = _replace(net, name, layer.plain(m))
        if self.stems is not None:
            net = nn.Sequential(copy.deepcopy(self.stems[m]), net)
        return net.train(self.training)

    def extra_repr(self) -> str:
        return f"modalities={self.modalities}, fusion={self.fusion!r}"


def dynamic_sharing(net: nn.Module, modalities: Sequence[str] = BRATS_MODALITIES, *,
                    stems: Sequence[nn.Module] | None = None, fusion: str = "mean") -> DynamicSharing:
    """Convert `net` (written for ONE modality's input: [B, C, ...] -> a tensor [B, ...]) to Dynamic Sharing over
    `modalities`: shared weights, every normalisation layer per modality (initialised from the original), each
    modality run on its own, outputs fused by the mean over the modalities present. `net` is left untouched.

    Args:
        net: the one-modality network. Its normalisation layers (BatchNorm1/2/3d, SyncBatchNorm, InstanceNorm1/2/3d,
            GroupNorm, LayerNorm, RMSNorm and subclasses that keep their forward) become per modality; it must
            keep the batch on dim 0 and return one tensor.
        modalities: the M modality names, in the order of x's modality blocks.
        stems: optional M per-modality input modules (modalities of different shapes into one shared trunk);
            their parameters belong to their modality.
        fusion: "mean" (the paper's fusion).
    Returns:
        DynamicSharing: forward(x, present) -> fused [B, ...]; forward_branches(x, present) -> M outputs [B, ...];
        forward_modality(x_m, m); branch(m); .net, .modalities.
    Raises ValueError / TypeError naming the layer for a net without normalisation layers (unless stems are
    given), a normalisation layer it cannot convert (an unknown type, a subclass overriding forward, a
    batch-coupled layer other than torch's BatchNorm), a lazy layer not yet initialised, and a layer with
    batch_first=False; at forward, naming the argument, for x's channels not a multiple of M and a sample with no
    modality present.

    Notes:
        - A norm with nothing per modality (InstanceNorm / GroupNorm / LayerNorm without affine or running
          statistics, e.g. MONAI UNet's default InstanceNorm) is kept as it is: its statistics are per sample,
          hence per (sample, modality) pair, already. num_batches_tracked becomes [M] (one count per modality,
          advanced only when the modality is present; BatchNorm's momentum=None averages use it).
        - BatchNorm in training: each modality's statistics over its present samples in the batch (a modality
          present in one sample of a 1-voxel map fails as torch's BatchNorm does). A converted SyncBatchNorm
          raises in distributed training (per-modality cross-rank statistics are not implemented).
        - torch.compile: with a PairPlan for `present` the forward traces whole (fullgraph=True; a bool mask
          costs a graph break where the plan is built); each new pattern of per-modality counts recompiles.
          Activation checkpointing that re-runs converted norms outside the forward is not supported (a clear
          RuntimeError).
        - With stems, a modality absent from a whole batch leaves its stem unused: DDP then needs
          find_unused_parameters=True.
    """
    return DynamicSharing(net, modalities, stems=stems, fusion=fusion)
