"""The engine's combination rules (gmd_ext/gmd/plan.py `resolve`) drive GMD, table-driven: for every row of
`plan.table()` GMD is built with that source and communicator (a 1-rank gloo group stands in for DDP, a 1-rank
fully_shard model for FSDP2) and with both kinds of aggregator; it raises the row's reason, or resolves to the
row's parts and runs one backward. docs/engine.md's table is the table's current rendering."""
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gmd_ext import GMD
from gmd_ext.gmd import plan
from gmd_ext.gmd.comm import REDUCE_SCATTER_MIN_NUMEL, AllReduce, Local, ReduceScatter
from gmd_ext.gmd.fsdp import FSDP2

DOCS = Path(__file__).resolve().parents[1] / "docs" / "engine.md"


@pytest.fixture(scope="module")
def world():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def model_for(label):
    torch.manual_seed(0)
    big = ">=" in label
    model = nn.Sequential(nn.Linear(1448, 1449) if big else nn.Linear(4, 6), nn.Tanh(),
                          nn.Linear(1449 if big else 6, 2))
    if "fsdp2" in label or "FSDP2" in label:
        from torch.distributed.fsdp import fully_shard
        fully_shard(model)
    return model, torch.randn(3, 1448 if big else 4)


def engine_kw(label, group):
    return {"local": dict(comm=Local()), "all_reduce": dict(comm=AllReduce(process_group=group)),
            "reduce_scatter": dict(comm=ReduceScatter(process_group=group)), "fsdp2 (FSDP2 model)": dict(comm=FSDP2()),
            "auto, one process": {}, "auto, FSDP2 model": {}}.get(label, dict(process_group=group))


def test_docs_table_is_current():
    assert plan.render_docs(DOCS.read_text()) == DOCS.read_text(), "run python -m gmd_ext.gmd.plan docs/engine.md"


def test_every_row_covers_each_source_and_setting():
    rows = plan.table()
    assert len(rows) == len(plan.SOURCE_KINDS) * len(plan._SETTINGS)
    for source, label, resolved, why in rows:
        assert resolved == "refused" or resolved.split(" + ")[1] in plan.COMM_KINDS
        assert resolved != "refused" or why  # a refusal always says why


@pytest.mark.parametrize("row", plan.table(), ids=lambda r: f"{r[0]}-{r[1]}")
@pytest.mark.parametrize("aggregator", [None, lambda G: torch.full((G.shape[0],), 0.5)], ids=["gmd", "weighting"])
def test_gmd_follows_the_table(row, aggregator, world, one_thread):
    source, label, resolved, why = row
    model, x = model_for(label)
    kw = dict(source=source, aggregator=aggregator, **engine_kw(label, world))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if resolved == "refused":
        with pytest.raises(ValueError) as e:
            GMD(opt, **kw)
        assert str(e.value) == why
        return
    gmd = GMD(opt, **kw)
    want_source, want_comm = resolved.split(" + ")
    assert (gmd.source.name, gmd.comm.kind) == (want_source, want_comm)
    for note in filter(None, why.split("; ")):  # the table's N is the setting's, the plan's the model's
        assert re.sub(r"N = \d+", "N", note) in re.sub(r"N = \d+", "N", gmd.plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # branches on a model without marked branches: said once
        out = model(x)
        gmd.backward([out[:, 0].mean(), out[:, 1].square().mean(), -out.mean()])
    assert all(p.grad is None or torch.isfinite(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
               .all() for p in model.parameters())


def test_parts_validate_their_own_arguments():
    from gmd_ext.gmd import GMDProjection, GramianWeighting, LowMemory

    with pytest.raises(ValueError, match="needs ddp_module= .* or process_group="):
        AllReduce()
    with pytest.raises(ValueError, match="needs ddp_module="):
        ReduceScatter()
    with pytest.raises(TypeError, match="ddp_module must be a torch.nn.parallel.DistributedDataParallel"):
        AllReduce(ddp_module=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="order must be"):
        GMDProjection(order="shuffled")
    with pytest.raises(ValueError, match="reduction must be one of"):
        GMDProjection(reduction="avg")
    with pytest.raises(TypeError, match="include_self must be a bool"):
        GMDProjection(include_self=1)
    with pytest.raises(ValueError, match="specific= overrides"):
        GMDProjection(usage="reach", specific={})
    with pytest.raises(TypeError, match="aggregator must be"):
        GramianWeighting(object())
    with pytest.raises(ValueError, match="method must be one of"):
        LowMemory(method="vmap")
    with pytest.raises(ValueError, match="source must be one of"):
        GMD(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), source="fast")
    with pytest.raises(ValueError, match="either comm= or ddp_module="):
        GMD(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), comm=Local(), communication="all_reduce")


def test_composed_parts_equal_the_keyword_arguments(one_thread):
    """GMD(source=, comm=, aggregator=) and today's keyword arguments build the same engine."""
    from gmd_ext.gmd import Batched, GMDProjection

    def run(**kw):
        torch.manual_seed(0)
        model, x = model_for("local")
        gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1), **kw)
        out = model(x)
        info = gmd.backward([out[:, 0].mean(), out[:, 1].square().mean(), -out.mean()])
        return [p.grad.clone() for p in model.parameters()], info, gmd

    ref, ref_info, _ = run(strategy="batched", order="sequential", reduction="sum", include_self=False)
    got, info, gmd = run(source=Batched(), comm=Local(),
                         aggregator=GMDProjection(order="sequential", reduction="sum", include_self=False))
    assert gmd.strategy == "batched" and "Batched()" in gmd.plan and "reduction='sum'" in gmd.plan
    torch.testing.assert_close(info.gram, ref_info.gram, rtol=0, atol=0)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
