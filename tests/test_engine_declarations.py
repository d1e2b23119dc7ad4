"""The modality declarations that GMD's official reduction reads (gmd_ext.ops.ds_ops declare_*) survive what users
do to a model: deepcopy, pickling, torch.compile, and fully_shard (FSDP2 replaces every parameter; GMD re-reads
the declarations from the modules when it is built) — for the library's models and for a network converted by
gmd_ext.dynamic_sharing. (tests/test_engine_dist_ds.py checks the resulting merged gradient on 2 ranks.)"""
import copy
import pickle

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gmd_ext import GMD, dynamic_sharing
from gmd_ext.apps.brats.model import DSUNet3d
from gmd_ext.apps.mosi.model import DSSentimentNet
from gmd_ext.ops.ds_ops import MODALITY_ATTR


def converted():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 1, 1))
    return dynamic_sharing(net, ("a", "b"))


MODELS = {"DSUNet3d": lambda: DSUNet3d(width=0.25), "DSSentimentNet": lambda: DSSentimentNet(hidden=8),
          "dynamic_sharing": converted}


def rules(model, prefix=""):
    return {n.removeprefix(prefix): getattr(p, MODALITY_ATTR, None) for n, p in model.named_parameters()}


@pytest.mark.parametrize("make", list(MODELS.values()), ids=list(MODELS))
def test_declarations_survive_copies_and_compile(make):
    model = make()
    ref = rules(model)
    assert any(r is not None and r[0] != "shared" for r in ref.values())  # something modality-specific
    assert rules(copy.deepcopy(model)) == ref
    assert rules(pickle.loads(pickle.dumps(model))) == ref
    assert rules(torch.compile(model), "_orig_mod.") == ref


@pytest.fixture(scope="module")
def world():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("make", list(MODELS.values()), ids=list(MODELS))
def test_declarations_survive_fully_shard(make, world):
    from torch.distributed.fsdp import fully_shard

    model = make()
    ref = rules(model)
    fully_shard(model)
    assert all(getattr(p, MODALITY_ATTR, None) is None for p in model.parameters())  # what fully_shard does
    gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1))
    assert gmd.comm.kind == "fsdp2" and rules(model) == ref
    assert "forward_branches" in vars(model)  # registered as an FSDP forward method: nothing for the user to do
