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
