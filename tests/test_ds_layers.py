"""DS layers against a dense per-(sample, modality) reference: values, gradients, masking, compile."""
import pytest
import torch
import torch.nn.functional as F

from gmd_ext import DSConv, DSGroupNorm, DSLayerNorm, DSLinear, masked_mean, testing
from gmd_ext.ds import PairPlan, fuse, run_branches, run_packed
from gmd_ext.ops import ds_ops
from gmd_ext.testing import assert_close_rel, present_mask

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def per_pair(fn, x, present):
    """Dense reference: fn(b, m, x[b, m]) for every present pair, zeros elsewhere."""
    outs = []
    for b in range(x.shape[0]):
        row = []
        for m in range(x.shape[1]):
            y = fn(b, m, x[b, m])
            row.append(y if present[b, m] else torch.zeros_like(y))
        outs.append(torch.stack(row))
    return torch.stack(outs)


def grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    res = torch.autograd.grad((out * g).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(i) if r is None else r for r, i in zip(res, inputs)]


def close(a, b, **kw):
    torch.testing.assert_close(a, b, rtol=kw.get("rtol", 1e-4), atol=kw.get("atol", 1e-5))


def check_against_per_pair(y, ref, params, absent_modality_has_no_grad=False):
    """y and its gradients w.r.t. params = [x, weight, bias] match the dense reference; with
    absent_modality_has_no_grad (per-modality parameters, modality 1 absent) that modality's weight and bias
    get exactly zero gradient."""
    close(y, ref)
    gs = grads(y, params)
    for got, want in zip(gs, grads(ref, params)):
        close(got, want)
    if absent_modality_has_no_grad:
        assert gs[1][1].abs().max() == 0 and gs[2][1].abs().max() == 0


@pytest.mark.parametrize("device", testing.device_params())
# ---------------------------------------------------------------- DSConv
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("mask", ["all", "modality_absent", "random"])
@pytest.mark.parametrize("geometry", [dict(stride=1, padding=1, dilation=1), dict(stride=2, padding=0, dilation=2)])
def test_dsconv_matches_per_pair_reference(dims, shared, mask, geometry, device):
    B, M, Cin, Cout = 3, 3, 2, 4
    layer = DSConv(Cin, Cout, 3, dims=dims, shared=shared, num_modalities=M, **geometry).double().to(device)
    x = torch.randn(B, M, Cin, *([7] * dims), dtype=torch.float64, device=device, requires_grad=True)
    present = present_mask(mask, B, M)
    y = layer(x, present)

    def ref_fn(b, m, xi):
        w = layer.weight if shared else layer.weight[m]
        bias = layer.bias if shared else layer.bias[m]
        return CONV[dims](xi[None], w, bias, **geometry)[0]

    check_against_per_pair(y, per_pair(ref_fn, x, present), [x, layer.weight, layer.bias])


def test_dsconv_per_modality_absent_modality_gets_no_gradient():
    B, M = 4, 3
    layer = DSConv(2, 3, 3, padding=1, dims=2, shared=False, num_modalities=M)
    x = torch.randn(B, M, 2, 6, 6, requires_grad=True)
    present = present_mask("modality_absent", B, M)
    layer(x, present).square().sum().backward()
    for p in (layer.weight, layer.bias):
        assert p.grad is not None and p.grad[1].abs().max() == 0
        assert p.grad[0].abs().max() > 0 and p.grad[2].abs().max() > 0
    assert x.grad[:, 1].abs().max() == 0


def test_dsconv_absent_pairs_are_zero_and_inputs_there_are_ignored():
    B, M = 2, 3
    layer = DSConv(1, 2, 3, padding=1, dims=3)
    present = torch.tensor([[True, False, True], [False, True, False]])
    x = torch.randn(B, M, 1, 5, 5, 5)
    x2 = x.clone()
    x2[~present] = 1e3  # garbage where absent
    y, y2 = layer(x, present), layer(x2, present)
    assert y[~present].abs().max() == 0
    torch.testing.assert_close(y, y2, rtol=0, atol=0)


def test_dsconv_validation():
    with pytest.raises(ValueError, match="num_modalities"):
        DSConv(2, 3, 3, shared=False)
    with pytest.raises(ValueError, match="dims"):
        DSConv(2, 3, (3, 3, 3, 3))
    layer = DSConv(2, 3, 3, dims=2)
    with pytest.raises(ValueError, match=r"x must be \[B, M, 2, \*S\]"):
        layer(torch.randn(2, 3, 4, 5, 5))
    with pytest.raises(ValueError, match=r"samples \[1\] have none"):
        layer(torch.randn(2, 3, 2, 5, 5), torch.tensor([[True, False, False], [False, False, False]]))
    plan = PairPlan(torch.tensor([[True, False, True]]), 1, 3, "cpu")
    with pytest.raises(ValueError, match=r"rows must be \[P, 2, \*S\] with P = 2"):
        layer.packed(torch.randn(3, 2, 5, 5), plan)
    with pytest.raises(TypeError, match="plan must be a gmd_ext.ops.PairPlan"):
        layer.packed(torch.randn(2, 2, 5, 5), torch.ones(1, 3, dtype=torch.bool))


@pytest.mark.parametrize("device", testing.device_params())
# ---------------------------------------------------------------- DSGroupNorm
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("mask", ["all", "modality_absent", "random"])
def test_dsgroupnorm_matches_per_pair_reference(activation, mask, device):
    B, M, C, G = 3, 3, 6, 3
    layer = DSGroupNorm(M, G, C, activation=activation).double().to(device)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(B, M, C, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    present = present_mask(mask, B, M)
    y = layer(x, present)
    act = {None: lambda t: t, "relu": F.relu, "leaky_relu": F.leaky_relu}[activation]
    ref = per_pair(lambda b, m, xi: act(F.group_norm(xi[None], G, layer.weight[m], layer.bias[m], 1e-5)[0]),
                   x, present)
    check_against_per_pair(y, ref, [x, layer.weight, layer.bias], mask == "modality_absent")


def test_dsgroupnorm_validation():
    with pytest.raises(ValueError, match="divisible"):
        DSGroupNorm(2, 4, 6)
    with pytest.raises(ValueError, match="activation"):
        DSGroupNorm(2, 2, 4, activation="gelu")
    with pytest.raises(ValueError, match=r"x must be \[B, 2, 4, \*S\]"):
        DSGroupNorm(2, 2, 4)(torch.randn(1, 3, 4, 5))


@pytest.mark.parametrize("device", testing.device_params())
# ---------------------------------------------------------------- DSLinear / DSLayerNorm
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("mask", ["all", "modality_absent", "random"])
def test_dslinear_matches_per_pair_reference(shared, mask, device):
    B, M, T, Fin, Fout = 4, 3, 5, 6, 7
    layer = DSLinear(Fin, Fout, shared=shared, num_modalities=M).double().to(device)
    x = torch.randn(B, M, T, Fin, dtype=torch.float64, device=device, requires_grad=True)
    present = present_mask(mask, B, M)
    y = layer(x, present)
    ref = per_pair(lambda b, m, xi: F.linear(xi, layer.weight if shared else layer.weight[m],
                                             layer.bias if shared else layer.bias[m]), x, present)
    check_against_per_pair(y, ref, [x, layer.weight, layer.bias], mask == "modality_absent" and not shared)


@pytest.mark.parametrize("device", testing.device_params())
@pytest.mark.parametrize("mask", ["all", "modality_absent", "random"])
def test_dslayernorm_matches_per_pair_reference(mask, device):
    B, M, T, C = 4, 3, 5, 8
    layer = DSLayerNorm(M, C).double().to(device)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(B, M, T, C, dtype=torch.float64, device=device, requires_grad=True)
    present = present_mask(mask, B, M)
    y = layer(x, present)
    ref = per_pair(lambda b, m, xi: F.layer_norm(xi, (C,), layer.weight[m], layer.bias[m]), x, present)
    check_against_per_pair(y, ref, [x, layer.weight, layer.bias], mask == "modality_absent")


@pytest.mark.parametrize("layer", [DSLinear(4, 3), DSLinear(4, 3, shared=False, num_modalities=2), DSLayerNorm(2, 4)])
def test_nan_in_absent_modality_does_not_leak(layer):
    x = torch.randn(3, 2, 4, requires_grad=True)
    present = torch.tensor([[True, False], [True, True], [False, True]])
    with torch.no_grad():
        x[~present] = float("nan")
    y = layer(x, present)
    assert torch.isfinite(y).all() and y[~present].abs().max() == 0
    y.sum().backward()
    for p in [x, *layer.parameters()]:
        assert torch.isfinite(p.grad).all()
    assert x.grad[~present].abs().max() == 0


# ---------------------------------------------------------------- masked_mean
def test_masked_mean_matches_manual_mean_and_ignores_absent_entries():
    out = torch.randn(3, 4, 2, 5, requires_grad=True)
    present = torch.tensor([[True, False, True, True], [False, False, True, False], [True] * 4])
    ref = torch.stack([out[b, present[b]].mean(0) for b in range(3)])
    close(masked_mean(out, present), ref)
    nan_out = out.detach().clone()
    nan_out[~present] = float("nan")
    close(masked_mean(nan_out, present), ref.detach())
    masked_mean(out, present).sum().backward()
    assert out.grad[~present].abs().max() == 0
    close(masked_mean(out, None), out.mean(1))


def test_masked_mean_low_precision_accumulates_in_fp32():
    out = torch.randn(4, 3, 16)
    present = present_mask("random", 4, 3)
    ref = masked_mean(out.double(), present)
    plain = (torch.where(present[..., None], out.bfloat16(), 0).sum(1) / present.sum(1, keepdim=True)).bfloat16()
    assert_close_rel(masked_mean(out.bfloat16(), present), ref, plain, factor=1.0)


def test_masked_mean_validation():
    out = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"samples \[1\] have none"):
        masked_mean(out, torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(TypeError, match="bool"):
        masked_mean(out, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\[B, M\] = \[2, 3\]"):
        masked_mean(out, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating-point"):
        masked_mean(torch.ones(2, 3, dtype=torch.int64), None)


# ---------------------------------------------------------------- isolation and compile
def test_sample_output_independent_of_other_samples_modalities():
    M = 3
    conv, norm = DSConv(1, 4, 3, padding=1, dims=2), DSGroupNorm(M, 2, 4, activation="relu")
    lin, ln = DSLinear(4 * 36, 5, shared=False, num_modalities=M), DSLayerNorm(M, 5)

    def net(x, present):
        h = norm(conv(x, present), present).flatten(2)
        return masked_mean(ln(lin(h, present), present), present)

    x = torch.randn(2, M, 1, 6, 6)
    a = net(x, torch.tensor([[True, False, True], [True, True, True]]))
    x2 = x.clone()
    x2[1] = torch.randn(M, 1, 6, 6)
    b = net(x2, torch.tensor([[True, False, True], [False, True, False]]))
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: DSConv(2, 3, 3, padding=1, dims=2),
                                  lambda: DSConv(2, 3, 3, padding=1, dims=2, shared=False, num_modalities=3),
                                  lambda: DSGroupNorm(3, 2, 2, activation="relu"),
                                  lambda: DSLinear(2 * 25, 4, shared=False, num_modalities=3)])
def test_torch_compile_matches_eager(make):
    """With the PairPlan as input no layer reads device data on the host: fullgraph traces, compiled == eager."""
    torch._dynamo.reset()
    layer = make()
    x = torch.randn(2, 3, 2, 5, 5, requires_grad=True)
    if isinstance(layer, DSLinear):
        x = torch.randn(2, 3, 2 * 25, requires_grad=True)
    present = PairPlan(torch.tensor([[True, False, True], [False, True, True]]), 2, 3, "cpu")
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y, y_ref = compiled(x, present), layer(x, present)
    torch.testing.assert_close(y, y_ref)
    params = [x, *layer.parameters()]
    for got, want in zip(grads(y, params), grads(y_ref, params)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", testing.device_params())
@pytest.mark.parametrize("make,shape", [
    (lambda: DSConv(2, 3, 3, padding=1, dims=2), (2, 5, 5)),
    (lambda: DSConv(2, 3, 3, padding=1, dims=2, shared=False, num_modalities=3), (2, 5, 5)),
    (lambda: DSGroupNorm(3, 2, 4, activation="leaky_relu"), (4, 5, 5)),
    (lambda: DSLinear(6, 4, shared=False, num_modalities=3), (2, 6)),
    (lambda: DSLayerNorm(3, 6), (2, 6)),
], ids=["conv_shared", "conv_per_modality", "group_norm", "linear_per_modality", "layer_norm"])
@pytest.mark.parametrize("mask", ["all", "modality_absent", "random", "one_modality"])
def test_packed_form_equals_layer(make, shape, mask, device):
    """layer.packed on the plan's packed rows, scattered back, equals layer(x, plan): values and gradients."""
    torch.manual_seed(0)
    layer = make().to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    present = testing.present_mask(mask, 4, 3, torch.Generator().manual_seed(1))
    plan = PairPlan(present, 4, 3, device)
    x = torch.randn(4, 3, *shape, device=device, requires_grad=True)
    got = ds_ops.scatter(layer.packed(ds_ops.pack(x, plan), plan), plan)
    want = layer(x, plan)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    params = [x, *layer.parameters()]
    for g, w in zip(grads(got, params), grads(want, params)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_fuse_and_run_branches_match_masked_mean():
    present = torch.tensor([[True, False, True], [False, True, False]])
    plan = PairPlan(present, 2, 3, "cpu")
    x = torch.randn(2, 3, 4, dtype=torch.float64)

    def fn(rows, plan):
        return rows * (plan.modality[:, None] + 1)

    rows, plan2 = run_packed(fn, x, present)
    branches = run_branches(fn, x, plan)
    assert len(branches) == 3
    want = torch.where(present[:, :, None], x * torch.arange(1, 4, dtype=x.dtype)[None, :, None], 0)
    torch.testing.assert_close(torch.stack(list(branches), 1), want)
    torch.testing.assert_close(fuse(rows, plan2), masked_mean(want, present))
    low = fuse(rows.to(torch.bfloat16), plan2)
    assert low.dtype == torch.bfloat16


# ---------------------------------------------------------------- branch plans (the per-branch execution)
@pytest.mark.parametrize("device", testing.device_params())
@pytest.mark.parametrize("make,shape", [
    (lambda: DSConv(2, 3, 3, padding=1, dims=2), (2, 5, 5)),            # weight gradient: one GEMM (small maps)
    (lambda: DSConv(2, 3, 3, padding=1, dims=2), (2, 9, 9)),            # weight gradient per cotangent
    (lambda: DSConv(2, 3, 3, stride=2, padding=1, dims=2), (2, 7, 7)),  # data gradient: the vendor backward
    (lambda: DSConv(2, 3, 3, padding=2, dilation=2, dims=2), (2, 6, 6)),
    (lambda: DSConv(2, 3, 3, padding=1, dims=3), (2, 3, 3, 3)),
    (lambda: DSConv(2, 3, 3, padding=1, dims=2, shared=False, num_modalities=3), (2, 5, 5)),
    (lambda: DSGroupNorm(3, 2, 4, activation="relu"), (4, 5, 5)),
    (lambda: DSLinear(6, 4, shared=False, num_modalities=3), (2, 6)),
    (lambda: DSLayerNorm(3, 6), (2, 6)),
], ids=["conv_gemm", "conv_per_cotangent", "conv_stride", "conv_dilation", "conv3d", "conv_per_modality",
        "group_norm", "linear_per_modality", "layer_norm"])
def test_branch_plan_packed_form_and_batched_backward(make, shape, device):
    """layer.packed on one modality's rows (plan.only(m): that modality's parameters used as they are) equals the
    layer's modality m; V cotangents through it as one torch.func.vmap backward (the conv_rows and group-norm vmap
    rules, GMD(strategy="branches")) equal V separate backward passes."""
    torch.manual_seed(0)
    layer = make().double().to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    present = testing.present_mask("random", 4, 3, torch.Generator().manual_seed(1))
    plan = PairPlan(present, 4, 3, device)
    x = torch.randn(4, 3, *shape, dtype=torch.float64, device=device, requires_grad=True)
    want = layer(x, plan)
    leaves = [x, *layer.parameters()]
    for m in range(3):
        sub = plan.only(m)
        assert sub.branch == m
        got = ds_ops.scatter(layer.packed(ds_ops.pack(x, sub), sub), sub, modality=m)
        torch.testing.assert_close(got, want[:, m], rtol=1e-10, atol=1e-12)
        cotangents = torch.randn(5, *got.shape, dtype=torch.float64, device=device)
        batched = torch.func.vmap(lambda c: torch.autograd.grad(got, leaves, c, retain_graph=True))(cotangents)
        single = [torch.autograd.grad(got, leaves, c, retain_graph=True) for c in cotangents]
        for t, (b, *s) in enumerate(zip(batched, *single)):
            torch.testing.assert_close(b, torch.stack(s), rtol=1e-10, atol=1e-12, msg=f"leaf {t}, modality {m}")


# ---------------------------------------------------------------- packed normalisation forms (DSGroupNorm/DSLayerNorm
# and gmd_ext.dynamic_sharing's converted norms share them)
@pytest.mark.parametrize("spatial", [(), (5,), (3, 4)])
@pytest.mark.parametrize("branch", [False, True])
def test_group_norm_rows_per_row_affine(spatial, branch):
    """Each packed row normalised on its own with its modality's affine: the kernel path (1-3 spatial dims) and the
    F.group_norm path (none), on a full plan and on one modality's branch plan."""
    from gmd_ext.ds.layers import group_norm_rows

    present = present_mask("random", 5, 3, torch.Generator().manual_seed(0))
    plan = PairPlan(present, 5, 3, "cpu")
    if branch:
        plan = plan.only(1)
    # float64: groups of 2 values without spatial dims make the input gradient ill-conditioned in float32.
    rows = torch.randn(plan.num_pairs, 6, *spatial, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    out = group_norm_rows(rows, plan, w, b, 3, 1e-5)
    mods = plan.modality.tolist()
    ref = torch.cat([F.group_norm(rows[i:i + 1], 3, w[m], b[m], 1e-5) for i, m in enumerate(mods)])
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    for g, r in zip(grads(out, [rows, w, b]), grads(ref, [rows, w, b])):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("branch", [False, True])
def test_layer_norm_rows_per_row_affine(rms, branch):
    from gmd_ext.ds.layers import layer_norm_rows

    present = present_mask("random", 5, 3, torch.Generator().manual_seed(1))
    plan = PairPlan(present, 5, 3, "cpu")
    if branch:
        plan = plan.only(2)
    rows = torch.randn(plan.num_pairs, 4, 2, 3)
    w, b = torch.randn(3, 2, 3), None if rms else torch.randn(3, 2, 3)
    out = layer_norm_rows(rows, plan, w, b, (2, 3), 1e-5, rms=rms)
    ref = []
    for i, m in enumerate(plan.modality.tolist()):
        if rms:
            ref.append(F.rms_norm(rows[i:i + 1], (2, 3), w[m], 1e-5))
        else:
            ref.append(F.layer_norm(rows[i:i + 1], (2, 3), w[m], b[m], 1e-5))
    torch.testing.assert_close(out, torch.cat(ref), rtol=1e-5, atol=1e-5)
