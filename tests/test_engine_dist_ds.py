"""The library's DS model under torch.distributed (2 gloo ranks, the same batch on both, so the rank-averaged
gradients are one process's): GMD's default arguments on the documented path
`subset_losses(model.forward_branches(x), ...)` + `GMD(opt)` must give one process's merged gradient with the
official rule (no specific=), under

- FSDP2 (fully_shard on the model; nothing registered by hand: GMD registers forward_branches and re-reads the
  modality declarations that fully_shard's new parameters lost),
- DDP with default arguments: the branches source runs (auto), on the communicator auto picks (reduce_scatter at
  DSUNet3d width 0.5, 3.25 M parameters >= 2^21: rows reduce-scattered once the branches completed them),
- an absent modality (its subsets' zero rows) on every communicator,
- a torchjd Gramian aggregator (UPGrad) under DDP and FSDP2.

K = 15 subsets of 4 modalities, order "sequential" (fixed). Tolerance as tests/test_engine_ddp.py: fp32 summation
order only (rtol 1e-4 / atol 1e-6 on these larger sums; the per-element scales are exact).
"""
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gmd_ext import GMD, subset_losses, subsets
from gmd_ext.apps.brats.model import DSUNet3d
from test_engine_ddp import launch

TOL = dict(rtol=1e-4, atol=1e-6)
ABSENT = torch.tensor([[True, True, False, True]])  # t1ce absent: its subsets are zero rows


def batch(present=None):
    g = torch.Generator().manual_seed(4)
    return torch.randn(1, 4, 16, 16, 16, generator=g), (torch.rand(1, 3, 16, 16, 16, generator=g) > 0.5).float()


def losses(model, present=None):
    x, y = batch()
    return subset_losses(model.forward_branches(x, present), y, nn.functional.binary_cross_entropy_with_logits,
                         subsets(model.modalities), present=present)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def grads(model):
    return [None if p.grad is None else full(p.grad).detach().clone() for p in model.parameters()]


def upgrad():
    from torchjd.aggregation import UPGrad
    return UPGrad()


def one_step(width, present=None, aggregator=None, **kw):
    """(merged gradients, resolved source, communicator kind) of one GMD step; kw: how to wrap (fsdp / ddp)."""
    torch.manual_seed(0)
    model = DSUNet3d(width=width)
    forward_model, gmd_kw = model, {}
    if kw.get("fsdp"):
        from torch.distributed.fsdp import fully_shard
        fully_shard(model)
    elif kw.get("ddp"):
        forward_model = nn.parallel.DistributedDataParallel(model)
        gmd_kw["ddp_module"] = forward_model
        if kw.get("communication"):
            gmd_kw["communication"] = kw["communication"]
    if aggregator is not None:
        gmd_kw["aggregator"] = aggregator()
    else:
        gmd_kw["order"] = "sequential"
    gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1), **gmd_kw)
    gmd.backward(losses(model, present))
    return grads(model), gmd.strategy, gmd.comm.kind


CASES = {
    "fsdp": dict(width=0.25, fsdp=True),
    "fsdp_absent": dict(width=0.25, fsdp=True, present=ABSENT),
    "fsdp_upgrad": dict(width=0.25, fsdp=True, aggregator=upgrad),
    "ddp_default": dict(width=0.5, ddp=True),
    "ddp_all_reduce_absent": dict(width=0.25, ddp=True, communication="all_reduce", present=ABSENT),
    "ddp_reduce_scatter_absent": dict(width=0.25, ddp=True, communication="reduce_scatter", present=ABSENT),
    "ddp_upgrad": dict(width=0.25, ddp=True, aggregator=upgrad),
}


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    out = {}
    for name, case in CASES.items():
        case = dict(case)
        try:
            out[name] = one_step(case.pop("width"), case.pop("present", None), case.pop("aggregator", None), **case)
        except Exception as e:  # reported by the test, not a hang of the other rank
            out[name] = repr(e)
            raise
    torch.save(out, os.path.join(out_dir, f"ds_{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch(_worker, 2, tmp_path_factory.mktemp("dist_ds"), timeout=420)


@pytest.mark.parametrize("name", list(CASES))
def test_ds_model_on_two_ranks_equals_one_process(ranks, name, one_thread):
    case = dict(CASES[name])
    ref, ref_source, _ = one_step(case["width"], case.get("present"), case.get("aggregator"))
    for rank in range(2):
        res = torch.load(ranks / f"ds_{rank}.pt")[name]
        assert not isinstance(res, str), res
        got, source, comm = res
        for g, r in zip(got, ref):
            assert (g is None) == (r is None)
            if g is not None:
                torch.testing.assert_close(g, r, **TOL)
        if name == "ddp_default":  # the flagship path: branches, on the communicator auto picked for 3.25 M
            assert (source, comm) == ("branches", "reduce_scatter")
        elif name.startswith("fsdp"):
            assert (source, comm) == ("sequential", "fsdp2")
        else:
            assert source == "branches"
