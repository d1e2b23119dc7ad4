"""GMD under torch.distributed: 2 and 4 processes, gloo, localhost, against one process on the concatenated batch.

Every communication (all-reduce, reduce-scatter; DDP and process_group=; sequential and batched backward) and the
FSDP2 path (gmd_ext/gmd/fsdp.py) must give the single-process merged gradients and parameters after STEPS SGD
steps. Tolerance: the rank-summed per-objective gradients differ from the single-process ones only by fp32
summation order (and Γ by the order of its shard sums), so merged gradients and parameters agree to rtol 1e-5 /
atol 1e-6.
"""
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gmd_ext import GMD

STEPS = 3
ROWS = 4  # batch rows per rank
TOL = dict(rtol=1e-5, atol=1e-6)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 15), nn.ReLU(), nn.Linear(15, 8))  # N = 305: padded shards
        self.heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(3))
        self.solo = nn.Linear(8, 2)  # reached by objective 0 only: summed, not averaged

    def forward(self, x):
        z = torch.relu(self.trunk(x))
        return [h(z) for h in self.heads] + [self.solo(z)]


def losses_of(outs, y):
    out = [((o - y) ** 2).mean() for o in outs[:3]]
    out[0] = out[0] + (outs[3] * y).mean()
    out[2] = out[2] - 0.5 * (outs[0] * y).mean()
    return out


def sampled(step_gen):
    """Losses of a sampled subset of the objectives (2 or 3 of them), the same on every rank when the generators
    are seeded alike: K and the reach pattern change between steps."""
    def pick(outs, y):
        losses = losses_of(outs, y)
        k = int(torch.randint(2, 4, (), generator=step_gen))
        return [losses[i] for i in sorted(torch.randperm(3, generator=step_gen)[:k].tolist())]
    return pick


def data(world):
    g = torch.Generator().manual_seed(1)
    return torch.randn(ROWS * world, 6, generator=g), torch.randn(ROWS * world, 2, generator=g)


def flat_grads(model):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def full(t):
    """The whole tensor of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run(model, gmd, x, y, forward=None, pick=losses_of, micro=1):
    """STEPS SGD steps; micro > 1: each step accumulates `micro` backward calls over equal row blocks with the
    losses scaled by 1/micro (equal to one call on all the rows)."""
    forward = forward or model
    merged = []
    for _ in range(STEPS):
        gmd.zero_grad()
        for part in zip(x.chunk(micro), y.chunk(micro)):
            gmd.backward([l / micro for l in pick(forward(part[0]), part[1])])
        merged.append(torch.cat([full(p.grad).flatten() if p.grad is not None else torch.zeros(p.numel())
                                 for p in model.parameters()]))
        gmd.step()
    return merged, [full(p.detach()).clone() for p in model.parameters()]


VARIANTS = ("ddp_all_reduce", "ddp_reduce_scatter", "group_all_reduce", "group_reduce_scatter",
            "group_reduce_scatter_batched", "sampled_reduce_scatter", "fsdp", "fsdp_no_reshard", "sampled_fsdp",
            "fsdp_bf16_params", "accum_ddp_all_reduce", "accum_group_all_reduce", "accum_group_reduce_scatter",
            "accum_group_reduce_scatter_batched", "accum_fsdp")


def fsdp_net(reshard_after_forward=True, mp_policy=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = Net()
    kw = dict(reshard_after_forward=reshard_after_forward, mp_policy=mp_policy or MixedPrecisionPolicy())
    for m in (*model.trunk, *model.heads, model.solo):
        if isinstance(m, nn.Linear):
            fully_shard(m, **kw)
    return fully_shard(model, **kw)


def run_variant(variant, x, y):
    torch.manual_seed(0)
    micro = 2 if variant.startswith("accum_") else 1
    variant = variant.removeprefix("accum_")
    if "fsdp" in variant:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                     if variant.endswith("bf16_params") else None)
        model = fsdp_net(reshard_after_forward=not variant.endswith("no_reshard"), mp_policy=mp_policy)
        pick = sampled(torch.Generator().manual_seed(5)) if variant.startswith("sampled") else losses_of
        gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1), seed=3)
        return run(model, gmd, x, y, pick=pick, micro=micro)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    communication = "all_reduce" if "all_reduce" in variant else "reduce_scatter"
    pick = sampled(torch.Generator().manual_seed(5)) if variant.startswith("sampled") else losses_of
    if variant.startswith("ddp"):
        ddp = nn.parallel.DistributedDataParallel(model)
        gmd = GMD(opt, ddp_module=ddp, seed=3, communication=communication)
        return run(model, gmd, x, y, forward=ddp, micro=micro)
    gmd = GMD(opt, process_group=dist.group.WORLD, seed=3, communication=communication,
              strategy="batched" if variant.endswith("batched") else "sequential")
    return run(model, gmd, x, y, pick=pick, micro=micro)


def reference(variant, world):
    torch.manual_seed(0)
    variant = variant.removeprefix("accum_")  # the reference is one call on the whole batch
    model = Net()
    x, y = data(world)
    pick = sampled(torch.Generator().manual_seed(5)) if variant.startswith("sampled") else losses_of
    forward = model
    if variant.endswith("bf16_params"):
        # FSDP's param_dtype=bfloat16: the forward and backward run on bf16 copies of the fp32 parameters.
        def forward(inp):
            return torch.func.functional_call(model, {n: p.bfloat16() for n, p in model.named_parameters()},
                                              (inp.bfloat16(),))
    return run(model, GMD(torch.optim.SGD(model.parameters(), lr=0.1), seed=3), x, y, forward=forward,
               pick=lambda outs, y: pick([o.float() for o in outs], y))


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # generous: the box may be loaded
    # The failure tests run on a group with a short timeout: they must fail fast, not wait for the default one.
    short = dist.new_group(timeout=timedelta(seconds=5))
    x, y = data(world)
    shard = slice(rank * ROWS, (rank + 1) * ROWS)
    result = {v: run_variant(v, x[shard], y[shard]) for v in VARIANTS}
    # A DDP model without ddp_module=: DDP's own error, re-raised with the fix.
    torch.manual_seed(0)
    plain = Net()
    plain_ddp = nn.parallel.DistributedDataParallel(plain)
    try:
        GMD(torch.optim.SGD(plain.parameters(), lr=0.1), seed=3).backward(losses_of(plain_ddp(x[shard]), y[shard]))
        result["no_ddp_module"] = None
    except RuntimeError as e:
        result["no_ddp_module"] = str(e)
    # What each rank keeps: one scratch row + [K, ⌈N/W⌉] shards (reduce_scatter), [K, local shard] rows (FSDP2).
    for name, model in (("rs_memory", Net()), ("fsdp_memory", fsdp_net())):
        gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1), seed=3, communication="reduce_scatter",
                  **({} if name == "fsdp_memory" else {"process_group": dist.group.WORLD}))
        gmd.backward(losses_of(model(x[shard]), y[shard]))
        result[name] = ([tuple(b.G.shape) for b in gmd._bufs.buffers],
                        [tuple(t.shape) for t in getattr(gmd.comm, "_shards", [])])
    # The last rank passes one objective fewer: every rank fails at the next step, before any row moves.
    model = Net()
    gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1), process_group=short, seed=3,
              communication="reduce_scatter")
    losses = losses_of(model(x[shard]), y[shard])
    t0 = time.monotonic()
    try:
        gmd.backward(losses[:-1] if rank == world - 1 else losses)
        result["diverged_k"] = None
    except RuntimeError as e:
        result["diverged_k"] = str(e)
    result["diverged_k_elapsed"] = time.monotonic() - t0
    torch.save(result, os.path.join(out_dir, f"equal_{rank}.pt"))
    # Then the last rank dies before the next step's collectives; rank 0 must fail within the timeout, not hang.
    dist.barrier()
    if rank == world - 1:
        os._exit(0)
    dead = {}
    t0 = time.monotonic()
    try:
        gmd.backward(losses_of(model(x[shard]), y[shard]))
        dead["error"] = None
    except RuntimeError as e:
        dead["error"] = str(e)
    dead["elapsed"] = time.monotonic() - t0
    if rank == 0:
        torch.save(dead, os.path.join(out_dir, "dead_0.pt"))
    os._exit(0)  # the group cannot be torn down cleanly with a dead peer


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker, world, out, timeout=300):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"ranks still running after {timeout} s (hang)"
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ranks(request, tmp_path_factory):
    """One launch per world size for all tests (spawning and importing torch dominates their time)."""
    world = request.param
    return world, launch(_worker, world, tmp_path_factory.mktemp(f"ddp{world}"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_ranks_equal_one_process_on_concatenated_batch(ranks, variant, one_thread):
    world, out = ranks
    ref_merged, ref_params = reference(variant, world)
    if variant == "ddp_all_reduce":
        assert all(m[-18:].abs().sum() > 0 for m in ref_merged)  # objective-0-only params got a gradient
    # bf16 forward/backward: the ranks' bf16 gradients are summed in fp32 where the reference sums one batch.
    tol = dict(rtol=2e-2, atol=2e-3) if variant.endswith("bf16_params") else TOL
    for rank in range(world):
        merged, params = torch.load(out / f"equal_{rank}.pt")[variant]
        for m, r in zip(merged, ref_merged):
            torch.testing.assert_close(m, r, **tol)
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p, r, **tol)


def test_per_rank_gradient_memory(ranks):
    """reduce_scatter: N + K·N/W elements, up to padding (one scratch row + the shards); FSDP2: K·N/W (the rows of the
    local shards; the merged shard is one more N/W)."""
    world, out = ranks
    K, N = 3, sum(p.numel() for p in Net().parameters())
    S = -(-N // (64 * world)) * 64  # equal shards, each a multiple of 64 elements (aligned rows)
    for rank in range(world):
        res = torch.load(out / f"equal_{rank}.pt")
        assert res["rs_memory"] == ([(1, S * world)], [(K, S)])
        (fsdp_rows,), _ = res["fsdp_memory"]
        assert fsdp_rows[0] == K and fsdp_rows[1] <= sum(-(-p.shape[0] // world) * p[0].numel()
                                                         for p in Net().parameters())


def test_ranks_diverging_in_k_fail_fast(ranks):
    world, out = ranks
    for rank in range(world):
        res = torch.load(out / f"equal_{rank}.pt")
        assert res["diverged_k"] is not None and "disagree on the number of objectives" in res["diverged_k"]
        assert res["diverged_k_elapsed"] < 4, res["diverged_k_elapsed"]  # before the group's 5 s timeout


def test_dead_rank_fails_within_timeout(ranks):
    res = torch.load(ranks[1] / "dead_0.pt")
    assert res["error"] is not None and "collective on the per-objective gradients failed" in res["error"]
    assert res["elapsed"] < 30, res


def test_ddp_model_without_ddp_module_raises_with_hint(ranks):
    world, out = ranks
    for rank in range(world):
        msg = torch.load(out / f"equal_{rank}.pt")["no_ddp_module"]
        assert msg is not None and "pass GMD(..., ddp_module=" in msg
