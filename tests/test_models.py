"""DSUNet3d and DSSentimentNet: equal to running the shared network per modality and averaging the present ones."""
import copy

import pytest
import torch
import torch.nn.functional as F

import gmd_ext
from gmd_ext import DSSentimentNet, DSUNet3d, masked_mean, testing
from gmd_ext.ops import PairPlan

PRESENT = torch.tensor([[True, False, True, True], [False, True, False, False]])


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = DSUNet3d(width=0.25)
    with torch.no_grad():  # non-trivial per-modality affine, so a wrong modality index shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def plain_branch(model, x, m):
    """Test reference: modality m's branch in plain torch (F.conv3d, F.group_norm with m's affine, F.relu), the
    official per-branch execution. x [N, 1, D, H, W] -> logits [N, num_classes, D, H, W]."""
    def block(b, h):
        for conv, norm in ((b.conv1, b.norm1), (b.conv2, b.norm2)):
            h = F.conv3d(h, conv.weight, conv.bias, padding=1)
            h = F.relu(F.group_norm(h, norm.num_groups, norm.weight[m], norm.bias[m], norm.eps))
        return h

    h = block(model.inc, x)
    skips = [h]
    for down in model.downs:
        h = block(down, F.max_pool3d(h, 2))
        skips.append(h)
    skips.pop()
    for up in model.ups:
        skip = skips.pop()
        h = F.interpolate(h, scale_factor=2, mode="trilinear", align_corners=True)
        diff = [s - t for s, t in zip(skip.shape[2:], h.shape[2:])][::-1]
        h = F.pad(h, [q for d in diff for q in (d // 2, d - d // 2)])
        h = block(up, torch.cat([skip, h], 1))
    return F.conv3d(h, model.outc.weight, model.outc.bias)


def reference_branches(model, x, present):
    ref = torch.stack([plain_branch(model, x[:, m:m + 1], m) for m in range(model.num_modalities)], 1)
    return torch.where(present[:, :, None, None, None, None], ref, 0)


def test_dsunet3d_equals_per_modality_runs_averaged(unet):
    x = torch.randn(2, 4, 16, 17, 16)  # 17 is not a multiple of 16: padded skips
    branches = unet.forward_branches(x, PRESENT)
    assert isinstance(branches, tuple) and len(branches) == 4
    assert all(b.shape == (2, 3, 16, 17, 16) for b in branches)
    ref = reference_branches(unet, x, PRESENT)
    torch.testing.assert_close(torch.stack(list(branches), 1), ref)
    with torch.no_grad():  # inference: one packed batch, split per modality; the same values
        packed = unet.forward_branches(x, PRESENT)
    assert isinstance(packed, tuple) and len(packed) == 4
    torch.testing.assert_close(torch.stack(list(packed), 1), ref)
    fused = unet(x, PRESENT)
    assert fused.shape == (2, 3, 16, 17, 16)
    per_sample = torch.stack([ref[b, PRESENT[b]].mean(0) for b in range(2)])
    torch.testing.assert_close(fused, per_sample)
    torch.testing.assert_close(unet.forward_modality(x[:, 2], "t1ce"), plain_branch(unet, x[:, 2:3], 2))


def test_dsunet3d_gradients_equal_plain_torch_reference(unet):
    """The one network (packed rows, fused group norm kernel) against the plain-torch per-branch execution:
    values and every parameter's gradient, fused forward and per-branch forward alike."""
    x = torch.randn(2, 4, 16, 16, 16)
    target = torch.rand(2, 3, 16, 16, 16).round()
    params = list(unet.parameters())
    ref = reference_branches(unet, x, PRESENT)
    fused_ref = torch.stack([ref[b, PRESENT[b]].mean(0) for b in range(2)])
    want = torch.autograd.grad(F.binary_cross_entropy_with_logits(fused_ref, target), params)
    for out in (unet(x, PRESENT), masked_mean(torch.stack(unet.forward_branches(x, PRESENT), 1), PRESENT)):
        got = torch.autograd.grad(F.binary_cross_entropy_with_logits(out, target), params)
        for (name, _), g, w in zip(unet.named_parameters(), got, want):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-6, msg=name)


def test_dsunet3d_subset_loss_reaches_only_its_branches(unet):
    """forward_branches: each branch its own graph, so a loss over a subset never runs another branch's backward
    (the per-objective cost of the official per-branch execution)."""
    x = torch.randn(2, 4, 16, 16, 16)
    branches = unet.forward_branches(x, None)
    loss = (branches[0] + branches[3]).square().mean()
    used = [g is not None for g in torch.autograd.grad(loss, branches, allow_unused=True)]
    assert used == [True, False, False, True]
    roots = {b.grad_fn for b in branches}
    assert len(roots) == 4


def test_dsunet3d_subset_losses_differentiate_each_subset_through_its_own_branches(unet):
    """The documented recipe path: gmd_ext.subset_losses over forward_branches' tuple; subset S's loss reaches
    exactly the branches of S."""
    x = torch.randn(2, 4, 16, 16, 16)
    y = torch.rand(2, 3, 16, 16, 16).round()
    branches = unet.forward_branches(x, None)
    subs = gmd_ext.subsets(unet.modalities)
    losses = gmd_ext.subset_losses(branches, y, F.binary_cross_entropy_with_logits, subs)
    for s in subs:
        grads = torch.autograd.grad(losses[s.name], branches, allow_unused=True, retain_graph=True)
        assert [g is not None for g in grads] == [m in s.indices for m in range(4)], s.name


def test_dsunet3d_branches_fuse_any_subset_without_rerun(unet):
    x = torch.randn(2, 4, 16, 16, 16)
    branches = torch.stack(unet.forward_branches(x, None), 1)
    for subset in ([True, False, False, True], [False, False, True, False], [True] * 4):
        present = torch.tensor([subset, subset])
        torch.testing.assert_close(masked_mean(branches, present), unet(x, present))


@pytest.mark.parametrize("device", testing.device_params())
def test_dsunet3d_on_device_equals_plain_torch_reference(unet, device):
    """forward, forward_branches (training and inference) and the gradients on `device` against the plain-torch
    per-branch execution on the CPU."""
    model = copy.deepcopy(unet).to(device)
    x = torch.randn(2, 4, 16, 16, 16)
    target = torch.rand(2, 3, 16, 16, 16).round()
    ref = reference_branches(unet, x, PRESENT)
    fused_ref = torch.stack([ref[b, PRESENT[b]].mean(0) for b in range(2)])
    want = torch.autograd.grad(F.binary_cross_entropy_with_logits(fused_ref, target), list(unet.parameters()))
    xd, td = x.to(device), target.to(device)
    branches = model.forward_branches(xd, PRESENT)
    torch.testing.assert_close(torch.stack(branches, 1).cpu(), ref, rtol=1e-3, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(model.forward_branches(xd, PRESENT), 1).cpu(), ref, rtol=1e-3,
                                   atol=1e-5)
    for out in (model(xd, PRESENT), masked_mean(torch.stack(branches, 1), PRESENT)):
        got = torch.autograd.grad(F.binary_cross_entropy_with_logits(out, td), list(model.parameters()),
                                  retain_graph=True)
        for (name, _), g, w in zip(model.named_parameters(), got, want):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-3, atol=1e-5, msg=name)


def test_dsunet3d_sample_independent_of_other_samples(unet):
    x = torch.randn(2, 4, 16, 16, 16)
    a = unet(x, torch.tensor([[True, True, False, True], [True, True, True, True]]))
    x2 = x.clone()
    x2[1] = torch.randn(4, 16, 16, 16)
    b = unet(x2, torch.tensor([[True, True, False, True], [False, False, True, False]]))
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)


def test_dsunet3d_absent_modality_gets_no_gradient():
    model = DSUNet3d(width=0.25)
    present = torch.tensor([[True, True, False, True], [False, True, False, False]])
    F.binary_cross_entropy_with_logits(model(torch.randn(2, 4, 16, 16, 16), present),
                                       torch.rand(2, 3, 16, 16, 16).round()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if "norm" in name:  # per-modality [M, C]: t1ce (index 2) is absent everywhere
            assert p.grad[2].abs().max() == 0, name
            assert p.grad[[0, 1, 3]].abs().amax(1).min() > 0, name
        else:
            assert p.grad.abs().max() > 0, name


def test_dsunet3d_modality_absent_from_batch_gives_zero_branch(unet):
    x = torch.randn(2, 4, 16, 16, 16)
    present = torch.tensor([[True, True, False, True], [False, True, False, False]])
    branches = unet.forward_branches(x, present)
    assert (branches[2] == 0).all() and not branches[2].requires_grad
    torch.testing.assert_close(torch.stack(list(branches), 1), reference_branches(unet, x, present))


def test_dsunet3d_torch_compile_fullgraph_with_plan(unet):
    """No data-dependent op on the model path: forward and backward trace whole with the plan as input."""
    x = torch.randn(2, 4, 16, 16, 16)
    target = torch.rand(2, 3, 16, 16, 16).round()
    plan = PairPlan(PRESENT, 2, 4, "cpu")
    params = list(unet.parameters())

    def step(x, plan):
        return F.binary_cross_entropy_with_logits(unet(x, plan), target)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, plan), params)
    want = torch.autograd.grad(step(x, plan), params)
    for (name, _), g, w in zip(unet.named_parameters(), got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dsunet3d_training_step_has_no_host_sync_on_cuda():
    """A DS training step with a host-side present mask: the plan is copied once (pinned, non-blocking), and
    nothing else synchronises (sync debug mode "error" raises on any synchronising call)."""
    torch.manual_seed(0)
    model = DSUNet3d(width=0.25).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 4, 16, 16, 16, device="cuda")
    target = torch.rand(2, 3, 16, 16, 16, device="cuda").round()
    for _ in range(2):  # the first step warms up cuDNN / allocator (may synchronise)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(x, PRESENT), target).backward()
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_dsunet3d_validation():
    model = DSUNet3d(width=0.25)
    x = torch.randn(2, 4, 16, 16, 16)
    with pytest.raises(ValueError, match=r"samples \[1\] have none"):
        model(x, torch.tensor([[True, False, False, False], [False] * 4]))
    with pytest.raises(ValueError, match=">= 16"):
        model(torch.randn(1, 4, 16, 15, 16))
    with pytest.raises(ValueError, match=r"\[B, M=4, D, H, W\]"):
        model(torch.randn(1, 3, 16, 16, 16))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.ones(1, 4, 16, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_groups"):
        DSUNet3d(width=0.3)
    with pytest.raises(ValueError, match="modality"):
        model.forward_modality(x[:, 0], "pd")
    with pytest.raises(ValueError, match="PairPlan for"):
        model(x, PairPlan(PRESENT[:1], 1, 4, "cpu"))


def test_dsunet3d_is_the_conversion_of_the_plain_unet(unet):
    """One definition of DS: gmd_ext.dynamic_sharing(UNet3d) with DSUNet3d's parameters computes what DSUNet3d
    computes (fused and per-branch outputs, and every parameter's gradient, under the same names)."""
    from gmd_ext.apps.brats import UNet3d

    converted = gmd_ext.dynamic_sharing(UNet3d(width=0.25), unet.modalities)
    assert converted.net.load_state_dict(unet.state_dict()).missing_keys == []
    assert {n: p.shape for n, p in converted.net.named_parameters()} == \
        {n: p.shape for n, p in unet.named_parameters()}
    torch.manual_seed(1)
    x = torch.randn(2, 4, 16, 16, 16)
    target = (torch.rand(2, 3, 16, 16, 16) > 0.7).float()
    grads = []
    for model in (unet, converted):
        fused = model(x, PRESENT)
        branches = model.forward_branches(x, PRESENT)
        loss = F.binary_cross_entropy_with_logits(fused, target) + sum(b.square().mean() for b in branches)
        grads.append((fused, branches, torch.autograd.grad(loss, list(model.parameters()))))
    (f1, b1, g1), (f2, b2, g2) = grads
    assert torch.allclose(f1, f2, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(b1, b2))
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g1, g2))
    for m in range(4):
        assert torch.allclose(converted.forward_modality(x[:, m:m + 1], m), unet.forward_modality(x[:, m], m),
                              atol=1e-5)


def test_build_model_from_config():
    from gmd_ext.apps.brats import build_model
    from gmd_ext.ds import DynamicSharing

    assert isinstance(build_model(None, width=0.25), DSUNet3d)
    pytest.importorskip("monai")
    model = build_model({"name": "monai.networks.nets.SegResNet", "kwargs": {"init_filters": 8}})
    assert isinstance(model, DynamicSharing) and model.modalities == ("flair", "t1", "t1ce", "t2")
    assert model.net.convInit.conv.in_channels == 1
    assert model(torch.randn(1, 4, 16, 16, 16), torch.tensor([[True, False, True, False]])).shape == (1, 3, 16, 16, 16)
    with pytest.raises(ValueError, match="cannot import 'monai.networks.nets.NoSuchNet'"):
        build_model({"name": "monai.networks.nets.NoSuchNet"})
    with pytest.raises(ValueError, match=r"kwargs\['in_channels'\] must be 1"):
        build_model({"name": "monai.networks.nets.SegResNet", "kwargs": {"in_channels": 4}})
    with pytest.raises(ValueError, match="config key 'model' must be null"):
        build_model({"name": "SegResNet", "args": []})


# ---------------------------------------------------------------- DSSentimentNet
DIMS = (12, 5, 7)


def sentiment_inputs(B=4, T=(9, 6, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {name: torch.randn(B, t, d, generator=g, dtype=torch.float64)
         for name, t, d in zip(("text", "audio", "vision"), T, DIMS)}
    lengths = {name: torch.randint(1, t + 1, (B,), generator=g) for name, t in zip(("text", "audio", "vision"), T)}
    return x, lengths


@pytest.fixture(scope="module")
def senti():
    torch.manual_seed(0)
    model = DSSentimentNet(input_dims=DIMS, hidden=8).double().eval()
    with torch.no_grad():
        model.norm.weight.add_(0.3 * torch.randn_like(model.norm.weight))
        model.norm.bias.add_(0.3 * torch.randn_like(model.norm.bias))
    return model


def single_branch(model, m, seq):
    """Reference: one modality sequence [T, D] through the shared network, no packing or masking."""
    h = model.proj_norm[m](model.proj[m](seq))[None]
    _, state = model.encoder(h)
    h = F.layer_norm(state[-1][0], (model.hidden,), model.norm.weight[m], model.norm.bias[m], model.norm.eps)
    h = F.relu(F.linear(h, model.head1.weight, model.head1.bias))
    return F.linear(h, model.head2.weight, model.head2.bias)[0]


SENTI_PRESENT = torch.tensor([[True, True, True], [True, False, False], [False, True, True], [False, False, True]])


def test_sentiment_unaligned_branches_equal_single_sequence_runs(senti):
    x, lengths = sentiment_inputs()
    branches = senti.forward_branches(x, SENTI_PRESENT, lengths)
    assert isinstance(branches, tuple) and len(branches) == 3 and all(b.shape == (4,) for b in branches)
    with torch.no_grad():  # inference: one packed batch, split per modality
        packed = senti.forward_branches(x, SENTI_PRESENT, lengths)
    names = senti.modalities
    ref = torch.zeros(4, 3, dtype=torch.float64)
    for b in range(4):
        for m, name in enumerate(names):
            if SENTI_PRESENT[b, m]:
                ref[b, m] = single_branch(senti, m, x[name][b, :lengths[name][b]])
    torch.testing.assert_close(torch.stack(branches, 1), ref)
    torch.testing.assert_close(torch.stack(packed, 1), ref)
    torch.testing.assert_close(senti(x, SENTI_PRESENT, lengths), masked_mean(ref, SENTI_PRESENT))
    # The same inputs as lists in modality order.
    as_list = senti([x[n] for n in names], SENTI_PRESENT, [lengths[n] for n in names])
    torch.testing.assert_close(as_list, masked_mean(ref, SENTI_PRESENT))


@pytest.mark.parametrize("device", testing.device_params())
def test_sentiment_on_device_equals_cpu(senti, device):
    x, lengths = sentiment_inputs()
    model = copy.deepcopy(senti).to(device)
    xd = {n: t.to(device) for n, t in x.items()}
    torch.testing.assert_close(torch.stack(model.forward_branches(xd, SENTI_PRESENT, lengths), 1).cpu(),
                               torch.stack(senti.forward_branches(x, SENTI_PRESENT, lengths), 1))
    torch.testing.assert_close(model(xd, SENTI_PRESENT, lengths).cpu(), senti(x, SENTI_PRESENT, lengths))


def test_sentiment_aligned_full_length_and_padding_ignored(senti):
    x, lengths = sentiment_inputs(T=(6, 6, 6))
    full = torch.stack(senti.forward_branches(x, None), 1)
    ref = torch.stack([torch.stack([single_branch(senti, m, x[n][b]) for m, n in enumerate(senti.modalities)])
                       for b in range(4)])
    torch.testing.assert_close(full, ref)
    # Values beyond a sequence's length never reach the output.
    x2 = {n: t.clone() for n, t in x.items()}
    for n in x2:
        for b in range(4):
            x2[n][b, lengths[n][b]:] = 1e3
    torch.testing.assert_close(senti(x, SENTI_PRESENT, lengths), senti(x2, SENTI_PRESENT, lengths))


def test_sentiment_sample_independent_and_absent_modality_may_be_omitted(senti):
    x, lengths = sentiment_inputs()
    present = torch.tensor([[True, True, False], [True, False, False], [False, True, False], [True, True, False]])
    a = senti(x, present, lengths)
    b = senti({"text": x["text"], "audio": x["audio"]}, present, lengths)  # vision absent everywhere
    torch.testing.assert_close(a, b)
    x2 = {n: t.clone() for n, t in x.items()}
    x2["text"][1:] = torch.randn_like(x2["text"][1:])
    c = senti(x2, torch.tensor([[True, True, False], [False, True, False], [True, False, False], [True, False, False]]),
              lengths)
    torch.testing.assert_close(a[0], c[0])


def test_sentiment_absent_modality_gets_no_gradient():
    model = DSSentimentNet(input_dims=DIMS, hidden=8)
    x, lengths = sentiment_inputs()
    x = {n: t.float() for n, t in x.items()}
    present = torch.tensor([[True, True, False], [True, False, False], [False, True, False], [True, True, False]])
    model(x, present, lengths).square().sum().backward()
    assert all(p.grad is None for p in model.proj[2].parameters())
    assert all(p.grad is None for p in model.proj_norm[2].parameters())
    assert model.norm.weight.grad[2].abs().max() == 0 and model.norm.bias.grad[2].abs().max() == 0
    assert model.norm.weight.grad[:2].abs().amax(1).min() > 0
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.encoder.parameters())


def test_sentiment_validation(senti):
    x, lengths = sentiment_inputs()
    with pytest.raises(ValueError, match=r"samples \[3\] have none"):
        senti(x, torch.tensor([[True] * 3, [True] * 3, [True] * 3, [False] * 3]))
    with pytest.raises(ValueError, match=r"x\['audio'\] must be \[B=4, T >= 1, 5\]"):
        senti({**x, "audio": torch.randn(4, 6, 6, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"lengths\['vision'\] must lie in \[1, T=4\]"):
        senti(x, None, {**lengths, "vision": torch.full((4,), 5)})
    with pytest.raises(TypeError, match=r"lengths\['text'\] must be an integer"):
        senti(x, None, {**lengths, "text": torch.ones(4)})
    with pytest.raises(ValueError, match="not modalities"):
        senti({**x, "depth": x["text"]})
    with pytest.raises(ValueError, match=r"x\['vision'\] is missing"):
        senti({"text": x["text"], "audio": x["audio"]}, None)
    with pytest.raises(ValueError, match="input_dims"):
        DSSentimentNet(input_dims=(768, 5))
