"""Communication of the GMD engine: the per-objective gradient rows across the ranks of a process group.

The engine talks to a communication only through the `Comm` interface (docs/design.md §1):

    check(K)                     every rank agrees on K (fails fast with the ranks' values otherwise)
    buffers(params, K, batched)  the row buffers autograd fills (rows(K, batched) rows of width(N) elements:
                                 fewer rows than K reuse a scratch row)
    backward_context()           around the K backward passes
    keep_rows(accumulating)      whether this rank's rows keep their contents for an accumulating backward
    row_done(bufs, k)            after row k's backward pass (sequential), or rows_done(bufs) (batched)
    local(bufs)                  the [K, n] rows this rank projects
    start(n)                     where those n columns start in the full rows; local_masks(masks) slices masks
    reduce_gram(t)               this rank's Γ (and segment norms) -> those of the full rows
    restore(merged)              this rank's merged [n] -> the merged [N] that goes to .grad
    scale                        folded into the combination coefficients instead of a pass over the rows

Two communications under DDP / process_group=:
- "all_reduce": every row is all-reduced (sum) right after its backward pass: 2·K·N values sent per rank (ring
  all-reduce), the full [K, N] buffer on every rank, and each rank projects all of it.
- "reduce_scatter": row k is reduce-scattered right after backward k (rank r keeps elements [r·S, (r+1)·S) of the
  sum, S = ⌈N / W⌉) into a [K, S] shard buffer, so one scratch row of N is all the full-length memory autograd
  needs; Γ = Σ over ranks of the shard Gramians (one all-reduce of K×K values); every rank then derives the same
  coefficients from the same Γ and order, combines its shard, and one all-gather of the merged shard restores the
  merged [N] gradient (into the scratch row): (K + 1)·N values sent per rank, N + K·N/W gradient memory.
  The per-element shared masks are sliced exactly as the rows are.

Accumulation (several GMD.backward calls before a step) never reduces a row twice: under "all_reduce" the
rows hold the reduced sum after a call, so for the next call rank 0 keeps it and every other rank restarts
from zero (the all-reduce then adds this call's gradients to the earlier sum once); under "reduce_scatter" the
full-length row is always this call's local gradient, and its reduce-scattered shard is added to the shard
row. Each call communicates its own contribution once.
"""
from __future__ import annotations

import contextlib

import torch

from gmd_ext.gmd.buffers import GradBuffers

COMMUNICATIONS = ("auto", "all_reduce", "reduce_scatter")
# communication="auto" switches to "reduce_scatter" from this many trainable elements on. Measured with
# bench/bench_distributed.py (gloo, 2-core CPU box, loaded): all-reduce is faster at N = 8.6k and 133k for
# W = 2 and 4 (reduce-scatter waits on each row before the next backward, 2-3 collectives more per step);
# at N = 2.1M, K = 15 reduce-scatter is 1.46x faster on 4 ranks and 0.54x on 2. It always halves the values sent
# and the gradient memory, which is what counts where the link, not the CPU, is the bottleneck.
REDUCE_SCATTER_MIN_NUMEL = 1 << 21


def make_comm(ddp_module=None, process_group=None, communication: str = "auto", numel: int = 0) -> "Comm":
    """The communication of a GMD engine over `numel` trainable elements: single process, or one of
    COMMUNICATIONS over a process group ("auto": "reduce_scatter" from REDUCE_SCATTER_MIN_NUMEL on)."""
    if communication not in COMMUNICATIONS:
        raise ValueError(f"communication must be one of {COMMUNICATIONS}, got {communication!r}")
    if ddp_module is None and process_group is None:
        return Local()
    if communication == "auto":
        communication = "reduce_scatter" if numel >= REDUCE_SCATTER_MIN_NUMEL else "all_reduce"
    cls = ReduceScatter if communication == "reduce_scatter" else AllReduce
    return cls(ddp_module=ddp_module, process_group=process_group)


class Comm:
    """Sum all-reduce of every gradient row over `ddp_module`'s process group, or over `process_group`, or nothing
    (single process: both None). The base of the public communicators below."""

    kind = "all_reduce"

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
        self._works: list = []

    def bind(self, params) -> None:
        """Called once with the engine's trainable parameters."""

    @property
    def world_size(self) -> int:
        return 1 if self.group is None else torch.distributed.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return 0 if self.group is None else torch.distributed.get_rank(self.group)

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

    def check(self, K: int, device) -> None:
        """Raise on every rank when the ranks disagree on K: their row collectives would otherwise pair up wrongly
        and hang until the timeout, or silently mix objectives. One 2-value all-reduce."""
        if self.group is None:
            return
        t = torch.tensor([K, -K], dtype=torch.int64, device=device)
        self._run(lambda: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group))
        hi, lo = int(t[0]), -int(t[1])
        if hi != lo:
            raise RuntimeError(f"gmd_ext.GMD: the ranks disagree on the number of objectives (between {lo} and "
                               f"{hi}; this rank, {self.rank}, has K = {K}); every rank must pass the same K losses "
                               f"each step (sample subsets with identically seeded generators)")

    def buffers(self, params, K: int, full_rows: bool):
        return GradBuffers(params, K, self.rows(K, full_rows), self.width)

    def rows(self, K: int, full_rows: bool) -> int:
        return K

    def width(self, N: int) -> int:
        # Rows start on 64-element boundaries (256 B in fp32): aligned vector loads in every kernel.
        return -(-N // 64) * 64

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

    def keep_rows(self, accumulating: bool) -> bool:
        # The rows already hold the ranks' sum: only one rank may carry it into the next all-reduce.
        return accumulating and self.rank == 0

    def row_done(self, bufs, k: int) -> None:
        # Row k's all-reduce starts right after its backward pass, overlapping the next one.
        self._reduce([b.G[k] for b in bufs.buffers])

    def rows_done(self, bufs) -> None:
        self._reduce([b.G for b in bufs.buffers])

    def local(self, bufs):
        self._wait()
        return [b.G for b in bufs.buffers]

    def start(self, n: int) -> int:
        return 0

    def local_masks(self, masks):
        return masks

    def reduce_gram(self, gram: torch.Tensor) -> torch.Tensor:
        return gram

    def restore(self, merged: list) -> list:
        return merged

    # ------------------------------------------------------------------ collectives
    def _reduce(self, rows: list[torch.Tensor]) -> None:
        if self.group is not None:
            for r in rows:
                self._works.append(self._run(
                    lambda r=r: torch.distributed.all_reduce(r, group=self.group, async_op=True)))

    def _wait(self) -> None:
        works, self._works = self._works, []
        for w in works:
            self._run(w.wait)

    @staticmethod
    def _run(fn):
        try:
            return fn()
        except RuntimeError as e:
            raise RuntimeError(f"gmd_ext.GMD: a collective on the per-objective gradients failed on the process "
                               f"group (a rank died, diverged in K / parameters, or timed out; the timeout is "
                               f"init_process_group(timeout=...)): {e}") from e


class ReduceScatterComm(Comm):
    """Row k reduce-scattered right after backward k; the Gramian of the shards all-reduced; the merged shard
    all-gathered (module docstring). Single process: the plain path (nothing to scatter)."""

    kind = "reduce_scatter"

    def __init__(self, ddp_module=None, process_group=None):
        super().__init__(ddp_module, process_group)
        self._shards: list[torch.Tensor] = []
        self._scratch: list[torch.Tensor] = []
        self._mask_cache: dict = {}
        self._accumulate = False

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def rows(self, K: int, full_rows: bool) -> int:
        # A source that completes rows only at the end (batched, branches) fills every row; sequential reuses one
        # scratch row, reduce-scattered right after its pass.
        return K if full_rows or not self.sharded else 1

    def width(self, N: int) -> int:
        # W equal shards, each a multiple of 64 elements (aligned rows in the [K, S] shard buffer too).
        unit = 64 * self.world_size
        return -(-N // unit) * unit

    def keep_rows(self, accumulating: bool) -> bool:
        self._accumulate = accumulating
        return accumulating and not self.sharded  # sharded: full rows are this call's; the shards accumulate
    def _shard_buffers(self, bufs):
        K = bufs.K
        if len(self._shards) != len(bufs.buffers) or any(
                s.shape != (K, b.width // self.world_size) or s.dtype != b.G.dtype or s.device != b.G.device
                for s, b in zip(self._shards, bufs.buffers)):
            self._shards = [b.G.new_empty((K, b.width // self.world_size)) for b in bufs.buffers]
            self._mask_cache.clear()
        return self._shards

    def row_done(self, bufs, k: int) -> None:
        if not self.sharded:
            return
        shards = self._shard_buffers(bufs)
        if self._accumulate:
            # Add this call's reduced shard to the accumulated one (the rows are this call's gradients only).
            for b, s in zip(bufs.buffers, shards):
                part = torch.empty_like(s[k])
                self._run(lambda b=b, part=part: torch.distributed.reduce_scatter_tensor(
                    part, b.G[k % b.G.shape[0]], group=self.group))
                s[k].add_(part)
            return
        for b, s in zip(bufs.buffers, shards):
            self._works.append(self._run(lambda b=b, s=s: torch.distributed.reduce_scatter_tensor(
                s[k], b.G[k % b.G.shape[0]], group=self.group, async_op=True)))
        if bufs.buffers[0].G.shape[0] < bufs.K:
            # The next backward pass writes into the same scratch row.
            self._wait()

    def rows_done(self, bufs) -> None:
        for k in range(bufs.K):
            self.row_done(bufs, k)

    def local(self, bufs):
        self._wait()
        if not self.sharded:
            return [b.G for b in bufs.buffers]
        self._scratch = [(b.G[0], b.N) for b in bufs.buffers]
        return list(self._shards)

    def start(self, n: int) -> int:
        return self.rank * n if self.sharded else 0

    def local_masks(self, masks):
        if not self.sharded:
            return masks
        return [self._shard_mask(m, s.shape[1]) for m, s in zip(masks, self._shards)]

    def _shard_mask(self, m, S: int):
        if m is None:
            return None
        hit = self._mask_cache.get(id(m))
        if hit is not None and hit[0] is m:
            return hit[1]
        start = self.rank * S
        part = m[start:start + S]
        if part.numel() < S:  # the padding elements are zero in every row: their scale is irrelevant
            part = torch.cat([part, part.new_ones(S - part.numel())])
        if len(self._mask_cache) >= 16:
            self._mask_cache.clear()
        self._mask_cache[id(m)] = (m, part)  # keeps m alive, so its id cannot be reused while cached
        return part

    def reduce_gram(self, gram: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return gram
        gram = gram.contiguous()
        # One ring all-reduce: every rank ends with the same bits, so the same coefficients.
        self._run(lambda: torch.distributed.all_reduce(gram, group=self.group))
        return gram

    def restore(self, merged: list) -> list:
        if not self.sharded:
            return merged
        out = []
        for part, (row, n) in zip(merged, self._scratch):
            self._run(lambda part=part, row=row: torch.distributed.all_gather_into_tensor(
                row, part.contiguous(), group=self.group))
            out.append(row[:n])
        return out


def _group_args(cls, ddp_module, process_group):
    if ddp_module is None and process_group is None:
        raise ValueError(f"{cls}() needs ddp_module= (the DistributedDataParallel model) or process_group= "
                         f"(torch.distributed.group.WORLD for the default group); use Local() in one process")


class Local(Comm):
    """One process: nothing to communicate."""

    kind = "local"

    def __init__(self):
        super().__init__()

    def __repr__(self) -> str:
        return "Local()"


class AllReduce(Comm):
    """Every gradient row all-reduced right after its backward pass (module docstring): 2·K·N values sent per
    rank, the full [K, N] rows on every rank. ddp_module: the DistributedDataParallel model (kept in no-sync mode;
    construct GMD before its first forward) or process_group: the group (e.g. torch.distributed.group.WORLD)."""

    def __init__(self, *, ddp_module=None, process_group=None):
        _group_args("AllReduce", ddp_module, process_group)
        super().__init__(ddp_module, process_group)

    def __repr__(self) -> str:
        return f"AllReduce(world_size={self.world_size})"


class ReduceScatter(ReduceScatterComm):
    """Row k reduce-scattered after its backward pass, shard Gramians all-reduced, the merged shard all-gathered
    (module docstring): (K + 1)·N values sent per rank; gradient memory N + K·N/W under a source that fills one
    row at a time (sequential), K·N + K·N/W under one that completes every row at the end (batched, branches).
    Arguments as AllReduce."""

    def __init__(self, *, ddp_module=None, process_group=None):
        _group_args("ReduceScatter", ddp_module, process_group)
        super().__init__(ddp_module, process_group)

    def __repr__(self) -> str:
        return f"ReduceScatter(world_size={self.world_size})"
