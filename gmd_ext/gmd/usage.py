"""Which objectives use which gradient elements: the official GMD reduction rule (docs/semantics.md).

Official GMD merges the projected gradients by their mean over objectives on the elements every objective uses
and by their sum elsewhere. "Uses" is what it means in the official per-branch architecture (one branch per
modality, separate modality-specific parameters, fusion over the subset's branches only): modality m's specific
parameter elements are unused by every subset without m, however the forward here is batched, packed, stacked or
indexed — so autograd graph reach, which a stacked or packed forward makes total, cannot decide it.

`usage="official"` (the default) decides it per *segment* — a parameter tensor, or one modality's slice of a
parameter declared modality-specific along a dimension — by the first rule that applies:
1. declared (the DS layers and models declare every parameter: `declare_modality_dim`, `declare_modality`,
   `declare_shared` in gmd_ext.ops.ds_ops; or `GMD(..., specific=...)`) and the objectives' modality subsets are
   known (the losses come from `gmd_ext.subset_losses`): a segment of modality m is used exactly by the
   subsets holding m; a shared one by every objective. Exact, whatever the gradients' values.
2. otherwise (an undeclared parameter of a user's model, or losses without subsets): objective k uses the
   segment when its gradient there is not identically zero. The squared norms this needs are free: the Gramian
   pass runs segment by segment (Γ = Σ_s G_s G_sᵀ over column slices of the [K, N] buffer, read in place) and
   the diagonal of each segment's Gramian is that segment's squared norm per objective.
No extra pass over the buffer and no host synchronisation (the masks are built on the device).

Limits of rule 2: a parameter whose gradient is exactly zero for an objective that does depend on it (its
elements' gradients cancel, e.g. an L1 loss's bias with as many positive as negative residuals, or every
square underflows, |g| < 1e-23 in fp32) counts as unused by it; declare such parameters (`specific={p: False}`
for shared ones). `usage="reach"` keeps the per-tensor autograd-reach rule.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from gmd_ext import ops
from gmd_ext.ops.ds_ops import MODALITY_ATTR, declare_modality, declare_modality_dim, declare_shared

__all__ = ["USAGES", "declare_modality_dim", "declare_modality", "declare_shared", "spec", "check_specific",
           "membership", "declared_modalities", "check_membership", "Segments", "slice_norms", "slice_scales",
           "reach_shared"]

USAGES = ("official", "reach")
# A rule: ("shared",) | ("detect",) | ("dim", d) | ("modality", m)
_DETECT = ("detect",)


def _rule(value, p: torch.Tensor, what: str):
    """A declaration or a `specific=` value -> a rule."""
    if value is None or value is True:
        return _DETECT
    if value is False:
        return ("shared",)
    if isinstance(value, int) and not isinstance(value, bool):
        value = ("dim", value)
    if isinstance(value, tuple) and value == ("shared",):
        return value
    if isinstance(value, tuple) and len(value) == 2 and value[0] in ("dim", "modality") \
            and isinstance(value[1], int) and not isinstance(value[1], bool):
        kind, v = value
        if kind == "modality":
            if v < 0:
                raise ValueError(f"{what}: modality index must be >= 0, got {v}")
            return value
        if not -p.dim() <= v < p.dim():
            raise ValueError(f"{what}: dim must be in [-{p.dim()}, {p.dim()}) for shape {tuple(p.shape)}, got {v}")
        d = v % p.dim()
        if p.shape[d] == 0 or p.stride(d) * p.shape[d] != p.numel():
            raise ValueError(f"{what} (shape {tuple(p.shape)}, strides {p.stride()}) is declared modality-"
                             f"specific along dim {d}, which is not its outermost dimension in memory: its slices "
                             f"must be contiguous blocks (store the modality dimension first)")
        return ("dim", d)
    raise ValueError(f"{what} must be True (decide from its gradient), False (shared), an int dim (one slice per "
                     f"modality) or ('modality', m), got {value!r}")


def spec(p: torch.Tensor, i: int, specific: Mapping | None):
    """Parameter i's rule: `specific[id(p)]` when given, else its declaration, else ("detect",)."""
    if specific is not None and id(p) in specific:
        return _rule(specific[id(p)], p, f"specific[parameter {i}]")
    return _rule(getattr(p, MODALITY_ATTR, None), p, f"parameter {i}")


def check_specific(specific, params) -> dict | None:
    """Validate `GMD(..., specific=)`: a mapping trainable parameter -> rule; returned keyed by id."""
    if specific is None:
        return None
    if not isinstance(specific, Mapping):
        raise TypeError(f"specific must be a mapping parameter -> True | False | int dim | ('modality', m), got "
                        f"{type(specific).__name__}")
    ids = {id(p) for p in params}
    for k in specific:
        if not isinstance(k, torch.Tensor) or id(k) not in ids:
            raise ValueError("specific's keys must be trainable parameters of the optimizer, got "
                             f"{type(k).__name__}{tuple(k.shape) if isinstance(k, torch.Tensor) else ''}")
    return {id(k): v for k, v in specific.items()}


def membership(subsets) -> torch.Tensor | None:
    """bool [K, M]: objective k's subset holds modality m (None when the subsets are unknown)."""
    if subsets is None:
        return None
    M = subsets[0].num_modalities
    member = torch.zeros((len(subsets), M), dtype=torch.bool)
    for k, s in enumerate(subsets):
        if s.num_modalities != M:
            raise ValueError(f"the objectives' subsets are over different modality counts ({M} and "
                             f"{s.num_modalities})")
        member[k, list(s.indices)] = True
    return member


def _parts(p, rule, n):
    """(sizes, modality index or -1, always shared) of parameter p's segments (n: its local element count)."""
    if rule[0] == "dim":
        count = p.shape[rule[1]]
        if n == p.numel():
            return [n // count] * count, list(range(count)), False
        # An FSDP2 shard: whole modality slices when it is sharded along the declared dim; the slices held by
        # other ranks are empty here, so every rank has the same segments (their norms are summed over ranks).
        first, rows = _local_slices(p, rule[1], n)
        per = p.numel() // count
        return [per if first <= j < first + rows else 0 for j in range(count)], list(range(count)), False
    if rule[0] == "modality":
        return [n], [rule[1]], False
    return [n], [-1], rule == ("shared",)


def _local_slices(p, d: int, n: int) -> tuple[int, int]:
    """(first, count) of the slices along dim d that this rank's shard of the DTensor p holds (n elements)."""
    placements = getattr(p, "placements", None)
    shard_dim = getattr(placements[0], "dim", None) if placements and len(placements) == 1 else None
    if shard_dim != d:
        raise ValueError(f"a parameter of shape {tuple(p.shape)} is declared modality-specific along dim {d} but "
                         f"is sharded ({n} of its {p.numel()} elements are local: FSDP2) along "
                         f"{'dim ' + str(shard_dim) if shard_dim is not None else placements}; per-modality "
                         f"slices of sharded parameters need the shards cut along the declared dim (FSDP2's "
                         f"default Shard(0) with the modality dim first) — declare it specific={{p: True}} or keep "
                         f"it unsharded")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[d], shape[d]


class Segments:
    """The usage segments of one buffer: column bounds [start, stop) covering its row width, and per segment
    whether it is always shared and which modality it belongs to (-1: none declared)."""

    def __init__(self, params, index, sizes, width: int, specific):
        bounds, always, modality = [], [], []
        offset = 0
        for p, i, n in zip(params, index, sizes):
            rule = spec(p, i, specific)
            parts, mods, shared = _parts(p, rule, n)
            for size, m in zip(parts, mods):
                if shared and always and always[-1]:
                    bounds[-1][1] += size  # consecutive shared parameters: one segment
                else:
                    bounds.append([offset, offset + size])
                    always.append(shared)
                    modality.append(m)
                offset += size
        if width > offset:  # row padding: zero in every row, so its scale is irrelevant
            bounds.append([offset, width])
            always.append(True)
            modality.append(-1)
        self.bounds = bounds
        self.always = torch.tensor(always, dtype=torch.bool)
        self.modality = torch.tensor(modality, dtype=torch.int64)
        self.num_modalities = int(self.modality.max()) + 1 if len(modality) else 0
        self.width = width
        self._device_cache: dict = {}
        self._run_cache: dict = {}
        self._mask_cache: dict = {}

    def __len__(self) -> int:
        return len(self.bounds)

    def _on(self, device):
        key = str(device)
        hit = self._device_cache.get(key)
        if hit is None:
            sizes = torch.tensor([b - a for a, b in self.bounds], dtype=torch.int64)
            hit = (self.always.to(device), sizes.to(device), self.modality.to(device))
            self._device_cache[key] = hit
        return hit

    def _runs(self, known: bool):
        """Column runs [a, b) for the Gramian and the segment each one's norm belongs to (-1: none needed):
        segments decided without norms (always shared; declared, when the subsets are known) merge into runs,
        one gram call each, so a fully declared model costs one call per buffer as without usage detection."""
        key = bool(known)
        hit = self._run_cache.get(key)
        if hit is None:
            hit = []
            for s, ((a, b), always, m) in enumerate(zip(self.bounds, self.always.tolist(), self.modality.tolist())):
                need = not always and (m < 0 or not known)
                if not need and hit and hit[-1][2] < 0 and hit[-1][1] == a:
                    hit[-1][1] = b
                else:
                    hit.append([a, b, s if need else -1])
            self._run_cache[key] = hit
        return hit

    def gram(self, G: torch.Tensor, backend=None, start: int = 0, known: bool = False):
        """(Γ [K, K] float32, squared norms [K, S] float32) of the [K, n] rows G holding columns [start, start+n)
        of this buffer, over column slices read in place; `known`: the objectives' subsets are known, so declared
        segments need no norm (left zero)."""
        K, n = G.shape
        total = torch.zeros((K, K), dtype=torch.float64, device=G.device)
        norms = torch.zeros((K, len(self.bounds)), dtype=torch.float32, device=G.device)
        stop = start + n
        for a, b, s in self._runs(known):
            a, b = min(max(a, start), stop) - start, min(max(b, start), stop) - start
            if b > a:
                g = ops.gram(G.detach()[:, a:b], backend)
                total += g.to(torch.float64)
                if s >= 0:
                    norms[:, s] = g.diagonal()
        return total.float(), norms

    def shared_mask(self, norms: torch.Tensor, member: torch.Tensor | None = None, start: int = 0,
                    n: int | None = None):
        """bool [n] mask of the columns [start, start+n) whose segment every objective uses (or none does: those
        columns are zero in every row; None on the CPU when that is every column), from the [K, S] squared norms
        and, when known, the objectives' [K, M] modality membership (on the norms' device); no host
        synchronisation."""
        always, sizes, modality = self._on(norms.device)
        used = _used(norms, modality, member)
        shared = always | used.all(0) | ~used.any(0)
        if shared.device.type == "cpu":
            # On the host the pattern is known: reuse its mask (sampled subsets repeat a few), None if all shared.
            key = (shared.numpy().tobytes(), start, n)
            if key not in self._mask_cache:
                if len(self._mask_cache) >= 8:
                    self._mask_cache.pop(next(iter(self._mask_cache)))
                self._mask_cache[key] = None if bool(shared.all()) else self._expand(shared, sizes, start, n)
            return self._mask_cache[key]
        return self._expand(shared, sizes, start, n)

    def _expand(self, shared, sizes, start, n):
        mask = torch.repeat_interleave(shared, sizes, output_size=self.width)
        return mask if n is None else mask[start:start + n]


def _used(norms: torch.Tensor, modality: torch.Tensor, member: torch.Tensor | None) -> torch.Tensor:
    """[K, S] bool: declared segments by membership when it is known, the others by non-zero gradient."""
    used = norms != 0
    if member is None:
        return used
    return torch.where(modality >= 0, member[:, modality.clamp_min(0)], used)


def reach_shared(reach):
    """usage="reach": per parameter, whether its elements count as shared — every objective's graph reached it,
    or none did (then they are zero in every row and their scale is irrelevant). reach: bool [K, P] numpy."""
    return reach.all(0) | ~reach.any(0)


def declared_modalities(params, rules) -> int:
    """How many modalities the parameters' rules name (1 + the largest modality index; 0 for none)."""
    return max((m + 1 for p, r in zip(params, rules) for m in _parts(p, r, p.numel())[1]), default=0)


def check_membership(member: torch.Tensor | None, num_modalities: int) -> None:
    """The declared modality indices (`num_modalities` of them) must exist in the objectives' subsets."""
    if member is not None and num_modalities > member.shape[1]:
        raise ValueError(f"parameters are declared for modality index {num_modalities - 1}, but the objectives' "
                         f"subsets are over {member.shape[1]} modalities")


def slice_norms(rows: torch.Tensor, rule) -> torch.Tensor:
    """[K, s] squared norms of a parameter's K gradient rows [K, *shape] per segment (s = 1, or the slices along
    the declared dim), float32."""
    K = rows.shape[0]
    if rule[0] != "dim":
        return rows.reshape(K, -1).float().square().sum(1, keepdim=True)
    d = rule[1]
    return rows.movedim(d + 1, 1).reshape(K, rows.shape[d + 1], -1).float().square().sum(2)


def slice_scales(p: torch.Tensor, rule, norms: torch.Tensor, shared_scale: float, member=None):
    """The merged gradient's scale on parameter p from its [K, s] segment norms (and the objectives' [K, M]
    membership when known): shared_scale where every objective (or none) uses the segment, 1 elsewhere; a float
    for a shared parameter, else a tensor broadcastable to p (no host synchronisation)."""
    if rule == ("shared",):
        return shared_scale
    _, mods, _ = _parts(p, rule, p.numel())
    modality = torch.tensor(mods, dtype=torch.int64, device=norms.device)
    used = _used(norms, modality, None if member is None else member.to(norms.device))
    scale = torch.where(used.all(0) | ~used.any(0), shared_scale, 1.0).to(p.dtype)
    if rule[0] != "dim":
        return scale.reshape(())
    return scale.reshape([-1 if d == rule[1] else 1 for d in range(p.dim())])
