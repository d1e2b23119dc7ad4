"""GMD under torch.distributed: 2 processes, gloo, localhost.

Tolerance: the all-reduced per-objective gradients differ from the single-process ones only by fp32 summation
order, so merged gradients and parameters after 3 SGD steps agree to rtol 1e-5 / atol 1e-6.
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

WORLD = 2
STEPS = 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8))
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


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4 * WORLD, 6, generator=g), torch.randn(4 * WORLD, 2, generator=g)


def run(model, gmd, x, y, forward=None):
    forward = forward or model
    merged = []
    for _ in range(STEPS):
        gmd.zero_grad()
        gmd.backward(losses_of(forward(x), y))
        merged.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                 for p in model.parameters()]))
        gmd.step()
    return merged, [p.detach().clone() for p in model.parameters()]


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=5))
    x, y = data()
    shard = slice(rank * 4, (rank + 1) * 4)
    result = {}
    for variant in ("ddp", "group"):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if variant == "ddp":
            ddp = nn.parallel.DistributedDataParallel(model)
            gmd = GMD(opt, ddp_module=ddp, seed=3)
            result[variant] = run(model, gmd, x[shard], y[shard], forward=ddp)
        else:
            gmd = GMD(opt, process_group=dist.group.WORLD, seed=3)
            result[variant] = run(model, gmd, x[shard], y[shard])
    # A DDP model without ddp_module=: DDP's own error, re-raised with the fix.
    torch.manual_seed(0)
    plain = Net()
    plain_ddp = nn.parallel.DistributedDataParallel(plain)
    try:
        GMD(torch.optim.SGD(plain.parameters(), lr=0.1), seed=3).backward(losses_of(plain_ddp(x[shard]), y[shard]))
        result["no_ddp_module"] = None
    except RuntimeError as e:
        result["no_ddp_module"] = str(e)
    torch.save(result, os.path.join(out_dir, f"equal_{rank}.pt"))
    # Then rank 1 dies before the next step's all-reduce; rank 0 must fail within the timeout, not hang.
    dist.barrier()
    if rank == 1:
        os._exit(0)
    dead = {}
    t0 = time.monotonic()
    try:
        gmd.backward(losses_of(model(x[shard]), y[shard]))
        dead["error"] = None
    except RuntimeError as e:
        dead["error"] = str(e)
    dead["elapsed"] = time.monotonic() - t0
    torch.save(dead, os.path.join(out_dir, "dead_0.pt"))
    os._exit(0)  # the group cannot be torn down cleanly with a dead peer


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One 2-rank launch for both tests (spawning and importing torch dominates their time)."""
    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(out))) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 90
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "ranks still running after 90 s (hang)"
    return out


def test_two_ranks_equal_one_process_on_concatenated_batch(ranks):
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core box: avoid contended OpenMP barriers
    torch.manual_seed(0)
    model = Net()
    x, y = data()
    ref_merged, ref_params = run(model, GMD(torch.optim.SGD(model.parameters(), lr=0.1), seed=3), x, y)
    assert all(m[-18:].abs().sum() > 0 for m in ref_merged)  # objective-0-only params got a gradient
    for rank in range(WORLD):
        res = torch.load(ranks / f"equal_{rank}.pt")
        for variant in ("ddp", "group"):
            merged, params = res[variant]
            for m, r in zip(merged, ref_merged):
                torch.testing.assert_close(m, r, rtol=1e-5, atol=1e-6)
            for p, r in zip(params, ref_params):
                torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_dead_rank_fails_within_timeout(ranks):
    res = torch.load(ranks / "dead_0.pt")
    assert res["error"] is not None and "all-reduce of the per-objective gradients failed" in res["error"]
    assert res["elapsed"] < 30, res


def test_ddp_model_without_ddp_module_raises_with_hint(ranks):
    for rank in range(WORLD):
        msg = torch.load(ranks / f"equal_{rank}.pt")["no_ddp_module"]
        assert msg is not None and "pass GMD(..., ddp_module=" in msg
