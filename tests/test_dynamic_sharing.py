"""gmd_ext.dynamic_sharing: any one-modality network converted to Dynamic Sharing (docs/design.md §7).

Every converted network is checked against an independent reference: per modality m, a deep copy of the ORIGINAL
network with modality m's normalisation rows loaded into its layers (not DynamicSharing.branch), run on the samples
where m is present; the fused output is the mean over each sample's present modalities. Train mode (BatchNorm:
statistics over that modality's present samples, running statistics per modality) and eval mode. The norm rows
are perturbed per modality first, so a layer applying the wrong modality's parameters cannot pass.
"""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gmd_ext
from gmd_ext import GMD, subset_losses, subsets, testing
from gmd_ext.ds import DynamicSharing, ModalityNorm, dynamic_sharing
from gmd_ext.ops.ds_ops import PairPlan
from gmd_ext.ops.reference import pairwise_pcgrad

monai_nets = pytest.importorskip("monai.networks.nets")

M = 4
MODS = ("flair", "t1", "t1ce", "t2")
# Every modality present in >= 2 samples (BatchNorm in training needs > 1 value per channel), one missing per row
# in rows 1-3, and modality 1 absent from row 0.
PRESENT = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def perturb(ds: DynamicSharing, seed: int = 0) -> DynamicSharing:
    """Make every modality's normalisation rows different (affines and running statistics)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in ds.net.modules():
            if isinstance(mod, ModalityNorm):
                for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                    if name == "running_var":
                        t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                    elif name == "num_batches_tracked":
                        t.copy_(torch.randint(1, 5, t.shape, generator=g))
                    elif t.is_floating_point():
                        t.add_(0.3 * torch.randn(t.shape, generator=g).to(t.device))
    return ds


def reference_net(original: nn.Module, ds: DynamicSharing, m: int) -> nn.Module:
    """The original network with modality m's normalisation rows loaded by module name (independent of branch())."""
    ref = copy.deepcopy(original)
    for name, mod in ds.net.named_modules():
        if isinstance(mod, ModalityNorm):
            target = ref.get_submodule(name)
            for n, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                getattr(target, n).data.copy_(t[m].detach())
    return ref.train(ds.training)


def reference(original, ds, xs, present):
    """(fused [B, ...], per-modality outputs with zeros where absent, the reference nets) — the official execution:
    each modality's network on its present samples, the mean over present modalities."""
    B = xs[0].shape[0]
    outs, nets = [], []
    for m in range(M):
        net = reference_net(original, ds, m)
        idx = present[:, m].nonzero().flatten()
        y = net(xs[m][idx])
        full = y.new_zeros((B,) + y.shape[1:])
        full[idx] = y
        outs.append(full)
        nets.append(net)
    count = present.sum(1).to(outs[0].dtype).view((B,) + (1,) * (outs[0].dim() - 1))
    return torch.stack(outs).sum(0) / count, outs, nets


def close(a, b, tol=1e-4):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


# ---------------------------------------------------------------- networks (tiny: each case < 5 s on 2 CPU cores)
def _basic_unet():
    return monai_nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4)), (1, 32, 32)


def _unet_batch():
    return monai_nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                           norm="batch"), (1, 16, 16, 16)


def _unet_instance():
    # MONAI's default InstanceNorm has no affine: nothing per modality there, kept as is; the tracked variant below.
    return monai_nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
                           num_res_units=1), (1, 16, 16)


def _unet_instance_tracked():
    return monai_nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
                           norm=("instance", {"affine": True, "track_running_stats": True})), (1, 16, 16)


def _segresnet():
    return monai_nets.SegResNet(spatial_dims=2, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1),
                                blocks_up=(1,)), (1, 16, 16)


def _dynunet():
    return monai_nets.DynUNet(spatial_dims=2, in_channels=1, out_channels=2, kernel_size=(3, 3, 3),
                              strides=(1, 2, 2), upsample_kernel_size=(2, 2), filters=(4, 8, 16)), (1, 16, 16)


def _swin_unetr():
    return monai_nets.SwinUNETR(in_channels=1, out_channels=2, spatial_dims=2, feature_size=12, depths=(1, 1, 1, 1),
                                num_heads=(1, 1, 1, 1)), (1, 64, 64)  # 64: the bottleneck (1/32) is 2 x 2


def _unetr():
    return monai_nets.UNETR(in_channels=1, out_channels=2, img_size=(32, 32), spatial_dims=2, feature_size=4,
                            hidden_size=24, mlp_dim=32, num_heads=2, proj_type="conv"), (1, 32, 32)


def _monai_resnet18():
    return monai_nets.resnet18(spatial_dims=2, n_input_channels=1, num_classes=3), (1, 32, 32)


def _torchvision_resnet18():
    tv = pytest.importorskip("torchvision.models")
    return tv.resnet18(num_classes=3), (3, 32, 32)


class _Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 1)

    def forward(self, x):  # [B, T, 16] -> [B, 1]
        return self.head(self.enc(x).mean(1))


def _transformer():
    return _Transformer(), (5, 16)


NETS = {"basic_unet": _basic_unet, "unet_batch": _unet_batch, "unet_instance": _unet_instance,
        "unet_instance_tracked": _unet_instance_tracked, "segresnet": _segresnet, "dynunet": _dynunet,
        "swin_unetr": _swin_unetr, "unetr": _unetr, "monai_resnet18": _monai_resnet18,
        "torchvision_resnet18": _torchvision_resnet18, "transformer": _transformer}


def _case(name, seed=0):
    torch.manual_seed(seed)
    net, shape = NETS[name]()
    ds = perturb(dynamic_sharing(net, MODS), seed)
    xs = [torch.randn((4,) + shape) for _ in range(M)]
    return net, ds, xs


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(NETS))
def test_converted_net_equals_per_modality_reference(name, mode):
    net, ds, xs = _case(name)
    ds.train(mode == "train")
    x = torch.cat(xs, 1)  # [B, M·C, ...]
    before = copy.deepcopy(ds.state_dict())
    fused = ds(x, PRESENT)
    after_fused = copy.deepcopy(ds.state_dict())
    ds.load_state_dict(before)
    branches = ds.forward_branches(xs, PRESENT)
    want, outs, nets = reference(net, ds_copy_before(ds, before), xs, PRESENT)
    assert close(fused, want), float((fused - want).abs().max())
    assert len(branches) == M
    for m in range(M):
        assert close(branches[m], outs[m]), (m, float((branches[m] - outs[m]).abs().max()))
        assert float(branches[m][~PRESENT[:, m]].detach().abs().max()) == 0.0
    # Running statistics (BatchNorm, tracked InstanceNorm): modality m's rows moved as its reference's did, in the
    # packed forward and in the per-branch one alike.
    norm_buffers = [(f"{n}.{b}" if n else b, t) for n, mod in ds.net.named_modules() if isinstance(mod, ModalityNorm)
                    for b, t in mod.named_buffers(recurse=False)]
    for name_, t in norm_buffers:
        for m in range(M):
            ref_t = nets[m].get_buffer(name_)
            assert torch.allclose(t[m].double(), ref_t.double(), atol=1e-5), (name_, m)
            assert torch.allclose(after_fused["net." + name_][m].double(), ref_t.double(), atol=1e-5), (name_, m)


def ds_copy_before(ds, state):
    """A DynamicSharing holding `state` (the rows before the forwards), for building the references."""
    clone = copy.deepcopy(ds)
    clone.load_state_dict(state)
    return clone


@pytest.mark.parametrize("name", ["basic_unet", "unet_batch", "transformer"])
def test_branch_and_forward_modality_equal_the_reference(name):
    net, ds, xs = _case(name, seed=1)
    ds.eval()
    for m in range(M):
        plain = ds.branch(m)
        assert type(plain) is type(net)
        assert not any(isinstance(mod, ModalityNorm) for mod in plain.modules())
        want = reference_net(net, ds, m)(xs[m])
        assert close(plain(xs[m]), want)
        assert close(ds.forward_modality(xs[m], MODS[m]), want)
    # Conversion alone changes no branch: every modality's network is the original.
    fresh = dynamic_sharing(net, MODS).eval()
    assert close(fresh.branch("t2")(xs[0]), net.eval()(xs[0]), 1e-6)


@pytest.mark.parametrize("name", ["basic_unet", "unet_batch", "segresnet", "transformer"])
def test_absent_modality_parameters_get_exactly_zero_gradient(name):
    net, ds, xs = _case(name, seed=2)
    ds.train()
    present = PRESENT.clone()
    present[:, 1] = False
    present[3, 2] = True
    ds(xs, present).square().mean().backward()
    specific = [p for mod in ds.net.modules() if isinstance(mod, ModalityNorm) for p in mod.parameters(recurse=False)]
    assert specific or name == "unet_instance"
    for p in specific:
        assert p.grad is not None
        assert float(p.grad[1].abs().max()) == 0.0
        assert float(p.grad[0].abs().max()) > 0.0


def test_shapes_names_and_state_dict_round_trip():
    net, ds, xs = _case("unet_batch")
    names = {n for n, _ in net.named_parameters()} | {n for n, _ in net.named_buffers()}
    assert {n for n, _ in ds.net.named_parameters()} | {n for n, _ in ds.net.named_buffers()} == names
    for name, t in list(net.named_parameters()) + list(net.named_buffers()):
        got = ds.net.get_parameter(name) if name in dict(net.named_parameters()) else ds.net.get_buffer(name)
        norm = "adn.N" in name
        assert tuple(got.shape) == ((M,) + tuple(t.shape) if norm else tuple(t.shape)), name
    assert ds.net.get_buffer("model.0.adn.N.num_batches_tracked").shape == (M,)
    assert ds.modalities == MODS and ds.num_modalities == M
    other = dynamic_sharing(net, MODS)
    other.load_state_dict(ds.state_dict())
    ds.eval(), other.eval()
    assert torch.equal(ds(xs, PRESENT), other(xs, PRESENT))


def _gmd_case(seed=3, name="basic_unet"):
    torch.manual_seed(seed)
    if name == "basic_unet":
        net = monai_nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 8, 4))
        size = 32
    else:  # BatchNorm: each branch's statistics over its present samples
        net = monai_nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                              norm="batch")
        size = 16
    ds = perturb(dynamic_sharing(net, MODS), seed)
    x = torch.randn(3, M, size, size)
    y = (torch.rand(3, 2, size, size) > 0.6).float()
    return ds, x, y


def official(ds, losses, subs, perms):
    """The official GMD merged gradient, literally: per-objective autograd.grad, modality m's norm rows used only by
    the subsets holding m (everything else by every subset), the pairwise loop, mean where every objective uses an
    element, sum elsewhere."""
    params = list(ds.parameters())
    G = torch.stack([torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in
                                zip(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)])
                     for loss in losses.values()]).double()
    norm_rows = {id(p) for mod in ds.net.modules() if isinstance(mod, ModalityNorm) for p in mod.parameters(False)}
    used = []
    for p in params:
        u = torch.ones((len(subs),) + p.shape, dtype=torch.bool)
        if id(p) in norm_rows:
            for k, s in enumerate(subs):
                for m in range(M):
                    u[k, m] = m in s.indices
        used.append(u.flatten(1))
    shared = torch.cat(used, 1).all(0)
    return pairwise_pcgrad(G, perms, shared)


def gmd_merged(ds, losses_fn, perms, **kwargs):
    """(GMD's merged gradient flattened over ds's parameters, float64; the engine's plan text)."""
    opt = torch.optim.SGD(ds.parameters(), lr=0.1)
    gmd = GMD(opt, order=perms, **kwargs)
    gmd.zero_grad()
    gmd.backward(losses_fn())
    merged = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in ds.parameters()])
    return merged.double(), gmd.plan


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name,with_present", [("basic_unet", False), ("basic_unet", True), ("unet_batch", True)])
def test_gmd_on_converted_net_is_the_official_reduction(name, with_present):
    """strategy="auto" picks the branches gradient source on a converted net (the branch outputs are marked) and,
    with no user declaration, gives the official per-branch result."""
    ds, x, y = _gmd_case(name=name)
    present = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.bool) if with_present else None
    subs = subsets(MODS)
    g = torch.Generator().manual_seed(0)
    perms = torch.stack([torch.randperm(len(subs), generator=g) for _ in subs])
    losses = lambda: subset_losses(ds.forward_branches(x, present), y,  # noqa: E731
                                   F.binary_cross_entropy_with_logits, subs, present=present)
    merged, plan = gmd_merged(ds, losses, perms)
    assert "-> Branches()" in plan  # "auto" resolved to the per-branch source
    want = official(ds, losses(), subs, perms)
    assert rel(merged, want) < 1e-5
    # The reach rule (autograd connectivity per tensor) is not official on a DS net: the declarations matter.
    reach, _ = gmd_merged(ds, losses, perms, usage="reach")
    assert rel(reach, want) > 1e-3


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_declarations_survive_deepcopy_and_pickle(how):
    ds, x, y = _gmd_case(seed=4)
    clone = copy.deepcopy(ds) if how == "deepcopy" else pickle.loads(pickle.dumps(ds))
    subs = subsets(MODS)
    perms = torch.stack([torch.randperm(len(subs)) for _ in subs])
    losses = lambda: subset_losses(clone.forward_branches(x), y, F.binary_cross_entropy_with_logits, subs)  # noqa
    assert rel(gmd_merged(clone, losses, perms)[0], official(clone, losses(), subs, perms)) < 1e-5


def test_stems_give_modalities_of_different_shapes_one_trunk():
    """MOSI-style: text 7-d, audio 3-d, vision 5-d stems into one shared trunk (LayerNorm per modality); the
    stems' parameters belong to their modality (zero gradient when absent, official GMD)."""
    torch.manual_seed(5)
    dims = (7, 3, 5)
    trunk = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 1))
    stems = [nn.Linear(d, 8) for d in dims]
    ds = perturb(dynamic_sharing(trunk, ("text", "audio", "vision"), stems=stems))
    xs = [torch.randn(5, d) for d in dims]
    present = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    out = ds(xs, present)
    for m in range(3):
        plain = ds.branch(m)
        assert isinstance(plain, nn.Sequential)
        idx = present[:, m].nonzero().flatten()
        assert close(ds.forward_branches(xs, present)[m][idx], plain(xs[m][idx]))
    want = sum(torch.where(present[:, m:m + 1], ds.branch(m)(xs[m]), 0) for m in range(3)) / present.sum(1, True)
    assert close(out, want)
    ds.zero_grad()
    ds(xs, torch.tensor([[1, 0, 1]] * 5, dtype=torch.bool)).sum().backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in ds.stems[1].parameters())
    subs = subsets(ds.modalities)
    perms = torch.stack([torch.randperm(len(subs)) for _ in subs])
    y = torch.randn(5, 1)
    losses = lambda: subset_losses(ds.forward_branches(xs, present), y, F.mse_loss, subs, present=present)  # noqa
    merged, _ = gmd_merged(ds, losses, perms)
    G = torch.stack([torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(
        torch.autograd.grad(loss, list(ds.parameters()), retain_graph=True, allow_unused=True), ds.parameters())])
        for loss in losses().values()]).double()
    used = []
    for p in ds.parameters():
        u = torch.ones((len(subs),) + p.shape, dtype=torch.bool)
        for k, s in enumerate(subs):
            if p.dim() and p.shape[0] == 3 and any(p is q for q in ds.net.parameters()):
                for m in range(3):
                    u[k, m] = m in s.indices
            for m, stem in enumerate(ds.stems):
                if any(p is q for q in stem.parameters()):
                    u[k] = m in s.indices
        used.append(u.flatten(1))
    assert rel(merged, pairwise_pcgrad(G, perms, torch.cat(used, 1).all(0))) < 1e-5


@pytest.mark.parametrize("name", ["unet_batch", "basic_unet"])
def test_torch_compile_of_the_converted_forward(name):
    """torch.compile of the converted module with a PairPlan: equal to eager for different plans, in eval and train
    mode (BatchNorm's running statistics too), the plan slot empty afterwards. fullgraph=True on UNet; MONAI's
    BasicUNet itself breaks the graph (torch.jit.isinstance in its upsampling), so there the norms between graphs
    run eagerly inside the compiled forward."""
    torch.manual_seed(6)
    if name == "unet_batch":
        net = monai_nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
                              norm="batch")
        size = 8
    else:
        net = monai_nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 4, 4, 4, 4))
        size = 32
    ds = perturb(dynamic_sharing(net, MODS)).eval()
    x = torch.randn(4, M, size, size)
    other = PRESENT.clone()
    other[0, 2:] = False
    compiled = torch.compile(ds, fullgraph=name == "unet_batch", backend="aot_eager")
    cases = (("eval", other), ("train", PRESENT)) if name == "unet_batch" else (("train", other),)
    for mode, present in cases:
        ds.train(mode == "train")
        plan = PairPlan(present, 4, M, x.device)
        state = copy.deepcopy(ds.state_dict())
        eager = ds(x, plan)
        after = copy.deepcopy(ds.state_dict())
        ds.load_state_dict(state)
        got = compiled(x, plan)
        assert close(got, eager, 1e-5), mode
        for (key, a), b in zip(ds.state_dict().items(), after.values()):
            assert torch.allclose(a.double(), b.double(), atol=1e-6), key
        assert ds._slot.plan is None
    assert got.grad_fn is not None


def test_threads_each_see_their_own_plan():
    import threading

    net, ds, xs = _case("segresnet", seed=7)
    ds.eval()
    masks = [PRESENT, ~PRESENT | torch.eye(4, dtype=torch.bool)]
    want = [ds(xs, p) for p in masks]
    got = [None, None]

    def run(i):
        for _ in range(3):
            got[i] = ds(xs, masks[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---------------------------------------------------------------- errors
class _CustomNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class BatchRenorm2d(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return x * self.weight.view(-1, 1, 1)


def test_errors_name_the_layer_or_argument():
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="no normalisation layer"):
        dynamic_sharing(conv, MODS)
    assert isinstance(dynamic_sharing(conv, MODS, stems=[nn.Identity()] * M), DynamicSharing)
    with pytest.raises(TypeError, match=r"'1' \(_CustomNorm\).*overrides forward"):
        dynamic_sharing(nn.Sequential(nn.Conv2d(1, 4, 3), _CustomNorm(4)), MODS)
    with pytest.raises(TypeError, match=r"batch-coupled layer '1' \(BatchRenorm2d\)"):
        dynamic_sharing(nn.Sequential(nn.Conv2d(1, 4, 3), BatchRenorm2d(4)), MODS)
    with pytest.raises(ValueError, match="batch_first=False"):
        dynamic_sharing(nn.TransformerEncoderLayer(8, 2), MODS)
    with pytest.raises(ValueError, match="modalities must be"):
        dynamic_sharing(nn.BatchNorm1d(3), ("a", "a"))
    with pytest.raises(ValueError, match="fusion must be"):
        dynamic_sharing(nn.BatchNorm1d(3), MODS, fusion="max")
    with pytest.raises(ValueError, match="stems must be"):
        dynamic_sharing(nn.BatchNorm1d(3), MODS, stems=[nn.Identity()])
    ds = dynamic_sharing(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)), MODS)
    with pytest.raises(ValueError, match=r"x must be \[B, M·C, \.\.\.\].*not a positive multiple of 4"):
        ds(torch.randn(2, 7, 8, 8))
    with pytest.raises(ValueError, match="sequence of M = 4 tensors"):
        ds([torch.randn(2, 2, 8, 8)] * 3)
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] have no modality present"):
        ds(torch.randn(2, 8, 8, 8), torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match="modality must name one of"):
        ds.branch("pd")
    with pytest.raises(RuntimeError, match=r"'1' .*runs only inside DynamicSharing"):
        ds.net(torch.randn(2, 2, 8, 8))
    with pytest.raises(ValueError, match="already converted"):
        dynamic_sharing(ds.net, MODS)


def test_public_names():
    assert gmd_ext.dynamic_sharing is dynamic_sharing
    assert gmd_ext.ds.DynamicSharing is DynamicSharing
    assert isinstance(gmd_ext.dynamic_sharing(nn.BatchNorm1d(2)), DynamicSharing)


def test_brats_recipe_trains_a_config_named_network(tmp_path):
    """python/brats.py: config key "model" names a one-modality MONAI network, converted by dynamic_sharing."""
    import importlib.util
    import pathlib
    import sys

    pytest.importorskip("nibabel")
    root = pathlib.Path(__file__).resolve().parents[1]
    if str(root / "python") not in sys.path:
        sys.path.insert(0, str(root / "python"))
    spec = importlib.util.spec_from_file_location("brats_recipe_ds", root / "python" / "brats.py")
    brats = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(brats)
    from gmd_ext.apps.brats import phantom

    data = tmp_path / "data"
    phantom.make_cases(data, n=3, size=24, seed=0)
    model = {"name": "monai.networks.nets.SegResNet", "kwargs": {"init_filters": 8, "blocks_down": [1, 1],
                                                                 "blocks_up": [1]}}
    cfg = brats.recipe.load_config(None, brats.DEFAULTS, {
        "data_root": str(data), "crop_size": 16, "batch_size": 1, "epochs": 1, "steps_per_epoch": 1,
        "subsets_per_step": 2, "cache": True, "sw_overlap": 0.0, "model": model})
    brats.check_config(cfg)
    built = brats._model(cfg, torch.device("cpu"))
    assert isinstance(built, DynamicSharing) and built.modalities == MODS
    best = brats.train(cfg, tmp_path / "run", progress=False)
    state = torch.load(best, map_location="cpu", weights_only=False)["model"]
    assert state["net.convInit.conv.weight"].shape[1] == 1  # one modality's input channel
    assert state["net.down_layers.0.1.norm1.weight"].shape[0] == M  # GroupNorm rows per modality
    for bad, match in (({"name": "monai.networks.nets.NoSuchNet"}, "cannot import"),
                       ({"name": "monai.networks.nets.SegResNet", "kwargs": {"out_channels": 2}}, "must be 3")):
        with pytest.raises(ValueError, match=match):
            brats.check_config({**cfg, "model": bad})


class _Variety(nn.Module):
    """Normalisation variants on [B, C] and [B, C, L] rows: GroupNorm without spatial dims (the non-kernel path),
    BatchNorm1d with momentum=None (cumulative averages per modality), affine tracked InstanceNorm1d, LayerNorm
    without bias, RMSNorm, affine=False BatchNorm."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.gn = nn.GroupNorm(2, 8)
        self.bn = nn.BatchNorm1d(8, momentum=None)
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.inorm = nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
        self.bn_plain = nn.BatchNorm1d(4, affine=False)
        self.ln = nn.LayerNorm(8, bias=False)
        self.rms = nn.RMSNorm(8)

    def forward(self, x):  # [B, 6] -> [B, 8 + 4 * 8]
        h = self.rms(self.ln(self.bn(self.gn(self.lin(x)))))
        c = self.bn_plain(self.inorm(self.conv(h[:, None])))
        return torch.cat([h, c.flatten(1)], 1)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_normalisation_variants(mode):
    torch.manual_seed(8)
    net = _Variety()
    ds = perturb(dynamic_sharing(net, MODS)).train(mode == "train")
    kinds = {type(m).__name__ for m in ds.net.modules() if isinstance(m, ModalityNorm)}
    assert kinds == {"ModalityGroupNorm", "ModalityBatchNorm", "ModalityInstanceNorm", "ModalityLayerNorm"}
    assert ds.net.ln.bias is None and ds.net.rms.weight.shape == (M, 8) and ds.net.bn_plain.weight is None
    xs = [torch.randn(4, 6) for _ in range(M)]
    before = copy.deepcopy(ds.state_dict())
    fused = ds(xs, PRESENT)
    want, outs, nets = reference(net, ds_copy_before(ds, before), xs, PRESENT)
    assert close(fused, want)
    for name in ("bn.running_mean", "bn.num_batches_tracked", "inorm.running_var", "bn_plain.running_var"):
        for m in range(M):
            assert torch.allclose(ds.net.get_buffer(name)[m].double(), nets[m].get_buffer(name).double()), name


def test_sync_batchnorm_converts_like_batchnorm():
    net = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4))
    ds = perturb(dynamic_sharing(net, MODS)).eval()
    assert type(ds.net[1]).__name__ == "ModalityBatchNorm" and ds.net[1].running_mean.shape == (M, 4)
    assert isinstance(ds.branch(2)[1], nn.SyncBatchNorm)
    xs = [torch.randn(4, 3) for _ in range(M)]
    want, _, _ = reference(net, ds, xs, PRESENT)
    assert close(ds(xs, PRESENT), want)


@pytest.mark.parametrize("device", testing.device_params())
@pytest.mark.parametrize("name", ["unet_batch", "segresnet"])
def test_converted_net_on_device(name, device):
    """The device axis: the converted net on each device of the matrix (CUDA when present) equals the per-modality
    reference there, in train mode (BatchNorm per modality; GroupNorm through the fused kernel), gradients included,
    and GMD takes the per-branch source."""
    torch.manual_seed(9)
    net, shape = NETS[name]()
    net = net.to(device)
    ds = perturb(dynamic_sharing(net, MODS).to(device)).train()
    xs = [torch.randn((4,) + shape, device=device) for _ in range(M)]
    present = PRESENT.to(device)
    before = copy.deepcopy(ds.state_dict())
    fused = ds(torch.cat(xs, 1), present)
    want, _, _ = reference(net, ds_copy_before(ds, before), xs, present)
    assert fused.device.type == torch.device(device).type
    assert close(fused, want)
    # Gradients of the per-modality rows: row m equals the gradient of modality m's reference network's rows.
    want, _, nets = reference(net, ds_copy_before(ds, before), xs, present)
    names = [f"{n}.{k}" for n, mod in ds.net.named_modules() if isinstance(mod, ModalityNorm)
             for k, _ in mod.named_parameters(recurse=False)]
    grads = torch.autograd.grad(fused.square().mean(), [ds.net.get_parameter(n) for n in names])
    ref = [torch.autograd.grad(want.square().mean(), [nets[m].get_parameter(n) for n in names], retain_graph=True)
           for m in range(M)]
    for i, n in enumerate(names):
        for m in range(M):
            assert close(grads[i][m], ref[m][i], 1e-3), (n, m)
    subs = subsets(MODS)
    y = torch.rand_like(fused)
    losses = subset_losses(ds.forward_branches(xs, present), y, F.mse_loss, subs, present=present)
    gmd = GMD(torch.optim.SGD(ds.parameters(), lr=0.1))
    gmd.backward(losses)
    assert "-> Branches()" in gmd.plan


class _MyBatchNorm(nn.BatchNorm2d):
    """A subclass that keeps BatchNorm's forward (as MONAI's wrappers do): converted, and branch() gives it back."""


def test_subclass_kept_and_absent_inputs_never_read():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _MyBatchNorm(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
    ds = perturb(dynamic_sharing(net, MODS)).train()
    assert type(ds.net[1]).__name__ == "ModalityBatchNorm" and type(ds.branch(0)[1]) is _MyBatchNorm
    x = torch.randn(4, M, 6, 6)
    x[~PRESENT] = float("nan")  # absent pairs hold garbage: never computed, so nothing reaches outputs or grads
    out = ds(x, PRESENT)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in ds.parameters())
    assert all(torch.isfinite(b).all() for b in ds.net[1].buffers())  # running statistics untouched by NaN
