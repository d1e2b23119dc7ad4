"""GMD engine vs the official semantics (reference.pairwise_pcgrad on retrieved / cloned / concatenated grads)."""
import warnings

import pytest
import torch
from torch import nn

from gmd_ext import GMD
from gmd_ext.gmd.engine import StepInfo
from gmd_ext.gmd.projection import make_perms
from gmd_ext.ops.reference import official_step, pairwise_pcgrad
from gmd_ext.testing import backends_for


class TwoHead(nn.Module):
    """Shared trunk + heads, like the official PCGrad self-test; `extra` is reached by objective 0 only and
    `unused` by none."""

    def __init__(self, heads=3):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8))
        self.heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(heads))
        self.extra = nn.Parameter(torch.randn(8, 2))
        self.unused = nn.Parameter(torch.randn(3))

    def losses(self, x, y):
        z = torch.relu(self.trunk(x))
        out = [((h(z) - y) ** 2).mean() for h in self.heads]
        out[0] = out[0] + (z @ self.extra).mean()
        out[-1] = out[-1] - 0.5 * (self.heads[0](z) * y).mean()  # a conflict-prone objective
        return out


def official(params, losses_fn, perms, reduction="mean"):
    """The official implementation's step (gmd_ext.ops.reference.official_step), .grad cleared after."""
    merged = official_step(params, losses_fn(), perms, reduction).float()
    for p in params:
        p.grad = None
    return merged


def flat_grad(params):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def setup(heads=3, **kw):
    torch.manual_seed(0)
    model = TwoHead(heads)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    return model, opt, (lambda: model.losses(x, y)), GMD(opt, **kw)


pytestmark = pytest.mark.usefixtures("one_thread")


ORDER = torch.tensor([[2, 0, 1], [1, 2, 0], [0, 2, 1]])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("strategy", ["sequential", "batched"])
def test_matches_official_explicit_order(reduction, strategy):
    model, opt, losses, gmd = setup(order=ORDER, reduction=reduction, strategy=strategy)
    params = list(model.parameters())
    ref = official(params, losses, ORDER, reduction)
    info = gmd.backward(losses())
    torch.testing.assert_close(flat_grad(params), ref, rtol=1e-5, atol=1e-6)
    assert info.num_conflicts > 0  # the test must exercise projection
    assert model.unused.grad is None
    # heads[1] is reached only by objective 1: summed, not averaged (official "modality-specific" rule)
    assert model.heads[1].weight.grad is not None


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_every_backend_matches_official(backend):
    model, opt, losses, gmd = setup(order=ORDER, backend=backend)
    params = list(model.parameters())
    ref = official(params, losses, ORDER)
    gmd.backward(losses())
    torch.testing.assert_close(flat_grad(params), ref, rtol=1e-5, atol=1e-6)


def test_random_order_is_seeded_generator():
    model, opt, losses, gmd = setup(order="random", seed=123)
    params = list(model.parameters())
    perms = make_perms("random", 3, torch.Generator().manual_seed(123))
    ref = official(params, losses, perms)
    gmd.backward(losses())
    torch.testing.assert_close(flat_grad(params), ref, rtol=1e-5, atol=1e-6)


def test_dict_losses_info():
    model, opt, losses, gmd = setup(order="sequential")
    ls = losses()
    info = gmd.backward({"a": ls[0], "b": ls[1], "c": ls[2]})
    assert isinstance(info, StepInfo) and info.names == ("a", "b", "c") and info.step == 0
    assert info.losses == pytest.approx([l.item() for l in ls])
    K = 3
    assert info.gram.shape == (K, K) and info.coefficients.shape == (K, K)
    n = info.norms
    torch.testing.assert_close(info.cosines, info.gram / (n[:, None] * n[None, :]))
    assert info.num_conflicts == int((info.gram < 0).triu(1).sum())
    A = info.coefficients
    torch.testing.assert_close(info.projected_gram, A @ info.gram @ A.T)
    assert info["num_conflicts"] == info.num_conflicts


def test_zero_copy_grads_are_buffer_views():
    model, opt, losses, gmd = setup(order=ORDER)
    params = [p for p in model.parameters() if p is not model.unused]
    seen = []
    handles = [p.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.untyped_storage().data_ptr()))
               for p in params]
    gmd.backward(losses())
    G = gmd._buffers[0].G
    N = sum(p.numel() for p in model.parameters())
    # Rows padded to 64 elements so every row starts aligned.
    assert len(gmd._buffers) == 1 and G.shape == (3, -(-N // 64) * 64) and G.stride(0) % 64 == 0
    assert set(seen) == {G.untyped_storage().data_ptr()}  # every backward wrote into the [K, N] buffer
    merged = {p.grad.untyped_storage().data_ptr() for p in params}
    assert len(merged) == 1  # the merged gradient: views into one flat buffer
    for h in handles:
        h.remove()


def test_non_contiguous_params_accumulate_in_place():
    """channels_last and transposed parameters: the row views take the parameter's strides, and autograd still
    adds into them in place (checked by the engine's hook: no 'replaced' warning) with the plain-autograd values."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    w = nn.Parameter(torch.randn(5, 6).t())  # [6, 5], strides (1, 6)
    params = list(conv.parameters()) + [w]
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    v = torch.randn(2, 6)

    def losses():
        h = conv(x).mean((2, 3))  # [2, 4]
        return [(h.square().sum() + (v @ w).sum()), -(v @ w).square().mean() + h.sum()]

    ref = [torch.autograd.grad(losses()[k], params) for k in range(2)]
    G_ref = torch.stack([torch.cat([g.flatten() for g in r]) for r in ref])
    expected = pairwise_pcgrad(G_ref, ORDER[:2, :2].argsort(1), None, compute_dtype=torch.float64).float()
    gmd = GMD(torch.optim.SGD(params, lr=0.1), order=ORDER[:2, :2].argsort(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        gmd.backward(losses())
    b = gmd._buffers[0]
    assert b.views[0][0].stride() == conv.weight.stride() and b.views[1][2].stride() == w.stride()
    for k in range(2):
        for j, g in enumerate(ref[k]):
            torch.testing.assert_close(b.views[k][j], g)
    assert conv.weight.grad.stride() == conv.weight.stride()
    torch.testing.assert_close(flat_grad(params), expected, rtol=1e-5, atol=1e-6)


def test_replaced_grad_is_copied_back_with_one_warning():
    """If something swaps .grad for a new tensor during backward (here a user hook that runs before the
    engine's), the engine copies it into its row once, warns once, and the result is still exact."""
    model, opt, losses, gmd = setup(order=ORDER)
    params = list(model.parameters())

    def swap(p):
        p.grad = p.grad.clone()

    handle = model.trunk[0].weight.register_post_accumulate_grad_hook(swap)
    ref = official(params, losses, ORDER)
    with pytest.warns(RuntimeWarning, match="replaced a parameter's .grad"):
        gmd.backward(losses())
    torch.testing.assert_close(flat_grad(params), ref, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        gmd.backward(losses())
    handle.remove()


def test_no_kn_allocation_on_repeat_steps():
    model, opt, losses, gmd = setup(order=ORDER)
    gmd.backward(losses())
    gmd.step()
    ptr = gmd._buffers[0].G.data_ptr()
    KN_bytes = gmd._buffers[0].G.numel() * 4
    ls = losses()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        gmd.backward(ls)
    allocs = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert allocs, "the profiler recorded no allocation at all: the counter is not working"
    assert max(allocs) < KN_bytes, f"an allocation of {max(allocs)} bytes >= K*N*4 = {KN_bytes}"
    assert gmd._buffers[0].G.data_ptr() == ptr


def test_repeated_steps_match_official():
    model, opt, losses, gmd = setup(order=ORDER)
    params = list(model.parameters())
    ref_model = TwoHead()
    ref_model.load_state_dict(model.state_dict())
    ref_params = list(ref_model.parameters())
    ref_opt = torch.optim.SGD(ref_params, lr=0.1)
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    for _ in range(3):
        gmd.zero_grad()
        gmd.backward(model.losses(x, y))
        gmd.step()
        merged = official(ref_params, lambda: ref_model.losses(x, y), ORDER)
        off = 0
        for p in ref_params:
            p.grad = merged[off:off + p.numel()].view_as(p).clone() if p is not ref_model.unused else None
            off += p.numel()
        ref_opt.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_partial_reach_and_frozen_params():
    torch.manual_seed(0)
    model = TwoHead()
    model.trunk[0].bias.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gmd = GMD(opt, order=ORDER)
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = official(params, lambda: model.losses(x, y), ORDER)
    gmd.backward(model.losses(x, y))
    torch.testing.assert_close(flat_grad(params), ref, rtol=1e-5, atol=1e-6)
    assert model.trunk[0].bias.grad is None and model.unused.grad is None
    assert sum(b.N for b in gmd._buffers) == sum(p.numel() for p in params)
    before = model.unused.detach().clone()
    gmd.step()
    assert torch.equal(model.unused, before)  # Adam skips grad None


def test_two_param_groups():
    torch.manual_seed(0)
    model = TwoHead()
    heads = [p for p in model.heads.parameters()]
    rest = [p for n, p in model.named_parameters() if not n.startswith("heads")]
    opt = torch.optim.SGD([{"params": heads, "lr": 0.5}, {"params": rest, "lr": 0.01}])
    gmd = GMD(opt, order=ORDER)
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    params = heads + rest  # optimizer order
    ref = official(params, lambda: model.losses(x, y), ORDER)
    gmd.backward(model.losses(x, y))
    torch.testing.assert_close(flat_grad(params), ref, rtol=1e-5, atol=1e-6)
    before = [p.detach().clone() for p in params]
    gmd.step()
    for p, b, lr in zip(params, before, [0.5] * len(heads) + [0.01] * len(rest)):
        if p.grad is not None:
            torch.testing.assert_close(p, b - lr * p.grad)


def test_mixed_dtype_buffers():
    torch.manual_seed(0)
    model = TwoHead()
    model.heads[2].to(torch.bfloat16)
    x, y = torch.randn(32, 6), torch.randn(32, 2)

    def losses():
        z = torch.relu(model.trunk(x))
        return [((model.heads[0](z) - y) ** 2).mean(), ((model.heads[1](z) + y) ** 2).mean(),
                (model.heads[2](z.bfloat16()).float() * y).mean()]

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gmd = GMD(opt, order=ORDER)
    params = [p for p in model.parameters() if p is not model.extra and p is not model.unused]
    ref = official(params, losses, ORDER)
    gmd.backward(losses())
    assert len(gmd._buffers) == 2
    torch.testing.assert_close(flat_grad(params).float(), ref, rtol=1e-2, atol=1e-3)
    # fp32 parameters: fp32 rounding only (the Gramian, hence the coefficients, spans both buffers)
    is32 = torch.cat([torch.full((p.numel(),), p.dtype == torch.float32) for p in params])
    torch.testing.assert_close(flat_grad(params).float()[is32], ref[is32], rtol=1e-5, atol=1e-6)


def test_k_changes_between_steps():
    model, opt, losses, gmd = setup(order="sequential")
    params = list(model.parameters())
    ls = losses()
    gmd.backward(ls)
    ls = losses()
    ref = official(params, lambda: losses()[:2], torch.arange(2).repeat(2, 1))  # plain backward passes
    gmd.zero_grad()
    gmd.backward(ls[:2])
    assert gmd._buffers[0].G.shape[0] == 2
    torch.testing.assert_close(flat_grad(params), ref, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_same_orders():
    model, opt, losses, gmd = setup(order="random", seed=5)
    for _ in range(2):
        gmd.zero_grad()
        gmd.backward(losses())
        gmd.step()
    sd = gmd.state_dict()
    params_at_save = {k: v.clone() for k, v in model.state_dict().items()}
    later = []
    for _ in range(3):
        gmd.zero_grad()
        later.append(gmd.backward(losses()).coefficients.clone())
        gmd.step()
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(params_at_save)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    gmd2 = GMD(opt2, order="random", seed=999)  # a different seed: the loaded RNG state must win
    gmd2.load_state_dict(sd)
    for k in range(3):
        gmd2.zero_grad()
        assert torch.equal(gmd2.backward(losses()).coefficients, later[k])
        gmd2.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k])
    assert gmd2.state_dict()["step"] == 5


def test_callable_order():
    calls = []

    def order(step):
        calls.append(step)
        return ORDER if step % 2 == 0 else ORDER.flip(1)

    model, opt, losses, gmd = setup(order=order)
    params = list(model.parameters())
    for step in range(2):
        ref = official(params, losses, ORDER if step % 2 == 0 else ORDER.flip(1))
        gmd.zero_grad()
        gmd.backward(losses())
        torch.testing.assert_close(flat_grad(params), ref, rtol=1e-5, atol=1e-6)
    assert calls == [0, 1]


class _NoVmap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        if g.sum().item() > 1e30:  # data-dependent control flow: not vmappable
            return g
        return g * 2


def test_batched_falls_back_once_with_warning():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    gmd = GMD(opt, order="sequential", strategy="batched")
    x = torch.randn(5, 4)
    ref_g = GMD(torch.optim.SGD(lin.parameters(), lr=0.1), order="sequential")
    with pytest.warns(RuntimeWarning, match="falling back"):
        gmd.backward([_NoVmap.apply(lin(x)).sum(), -lin(x)[:, 0].sum()])
    got = [p.grad.clone() for p in lin.parameters()]
    gmd.zero_grad()
    ref_g.backward([_NoVmap.apply(lin(x)).sum(), -lin(x)[:, 0].sum()])
    for g, p in zip(got, lin.parameters()):
        torch.testing.assert_close(g, p.grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        gmd.zero_grad()
        gmd.backward([_NoVmap.apply(lin(x)).sum(), -lin(x)[:, 0].sum()])  # no second warning


def test_nonfinite_raise_and_skip():
    model, opt, losses, gmd = setup(order=ORDER)
    ls = losses()
    with pytest.raises(ValueError, match=r"objectives \[1\].*NaN or Inf"):
        gmd.backward([ls[0], ls[1] * float("nan"), ls[2]])
    assert all(p.grad is None for p in model.parameters())

    model, opt, losses, gmd = setup(order=ORDER, nonfinite="skip")
    before = [p.detach().clone() for p in model.parameters()]
    ls = losses()
    info = gmd.backward({"a": ls[0], "b": ls[1], "c": ls[2] + float("inf")})
    assert info.skipped and "['c']" in info.reason
    gmd.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    info = gmd.backward(losses())  # the next good step runs normally
    assert not info.skipped
    gmd.step()
    assert not torch.equal(model.trunk[0].weight, before[0])


def test_nonfinite_propagate_poisons_merged():
    model, opt, losses, gmd = setup(order=ORDER, nonfinite="propagate")
    ls = losses()
    info = gmd.backward([ls[0], ls[1] * 1e30 * 1e30, ls[2]])  # objective 1's gradient overflows to inf
    assert not info.skipped and not torch.isfinite(gmd._buffers[0].G[1]).all()
    assert all(torch.isnan(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_inputs():
    model, opt, losses, gmd = setup(order="sequential")
    ls = losses()
    with pytest.raises(ValueError, match=r"losses\[1\] does not require grad"):
        gmd.backward([ls[0], ls[1].detach()])
    with pytest.raises(ValueError, match=r"losses\['b'\] must be a scalar.*\(2,\)"):
        gmd.backward({"a": ls[0], "b": torch.stack([ls[1], ls[2]])})
    with pytest.raises(TypeError, match=r"losses\[0\] must be a tensor"):
        gmd.backward([1.0])
    with pytest.raises(ValueError, match="at least one objective"):
        gmd.backward([])
    with pytest.raises(TypeError, match="got one tensor"):
        gmd.backward(ls[0])
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        GMD(model)
    with pytest.raises(ValueError, match="reduction must be one of"):
        GMD(opt, reduction="none")
    with pytest.raises(ValueError, match="order must be"):
        GMD(opt, order="shuffled")
    with pytest.raises(TypeError, match="order must be"):
        GMD(opt, order=3)
    with pytest.raises(ValueError, match="strategy must be one of"):
        GMD(opt, strategy="vmap")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        GMD(opt, nonfinite="ignore")
    with pytest.raises(TypeError, match="seed must be an int"):
        GMD(opt, seed=1.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        GMD(opt, backend="cuda")
    with pytest.raises(ValueError, match="not both"):
        GMD(opt, ddp_module=object(), process_group=object())
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        GMD(opt, ddp_module=model)
    g = GMD(opt, order=torch.arange(2).repeat(2, 1))
    with pytest.raises(ValueError, match=r"order must have shape \[3, 3\]"):
        g.backward(losses())
    bad = ORDER.clone()
    bad[1] = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="order row 1 must be a permutation"):
        GMD(opt, order=bad).backward(losses())
    frozen = torch.optim.SGD([nn.Parameter(torch.ones(2), requires_grad=False)], lr=0.1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GMD(frozen).backward([torch.ones((), requires_grad=True)])
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        GMD(torch.optim.SGD([nn.Parameter(torch.ones(2, dtype=torch.float64))], lr=0.1)).backward(
            [torch.ones((), requires_grad=True)])
    with pytest.raises(ValueError, match="missing keys"):
        gmd.load_state_dict({"step": 0})


def test_monitor_callback_called_with_host_info():
    seen = []
    model, opt, losses, gmd = setup(order=ORDER, monitor=lambda step, info: seen.append((step, info)))
    gmd.backward(losses())
    gmd.backward(losses())
    assert [s for s, _ in seen] == [0, 1] and seen[0][1].gram.device.type == "cpu"


def _cuda_backend_without_sync():
    from gmd_ext import _backend

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if _backend.resolve("auto", "cuda") == "torch":
        pytest.skip("the torch reference of pcgrad_coefficients synchronises; needs the cpp or triton backend")


def _count_syncs(fn):
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in rec)


@pytest.mark.parametrize("order", ["tensor", "random"])
def test_cuda_step_without_host_sync(order):
    _cuda_backend_without_sync()
    torch.manual_seed(0)
    model = TwoHead().cuda()
    gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1), order=ORDER.cuda() if order == "tensor" else "random",
              seed=0, nonfinite="propagate")
    x, y = torch.randn(32, 6, device="cuda"), torch.randn(32, 2, device="cuda")
    gmd.backward(model.losses(x, y))  # first step allocates and validates the order
    ls = model.losses(x, y)
    assert _count_syncs(lambda: (gmd.backward(ls), gmd.step())) == 0


def test_cuda_step_one_host_sync_with_checks_and_monitor():
    _cuda_backend_without_sync()
    torch.manual_seed(0)
    model = TwoHead().cuda()
    gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1), order=ORDER.cuda(), monitor=lambda s, i: i.num_conflicts)
    x, y = torch.randn(32, 6, device="cuda"), torch.randn(32, 2, device="cuda")
    gmd.backward(model.losses(x, y))
    ls = model.losses(x, y)
    assert _count_syncs(lambda: (gmd.backward(ls), gmd.step())) == 1


def test_load_state_dict_is_all_or_nothing():
    """A state that fails part-way (optimizer state of another parameter set) changes nothing."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    gmd = GMD(opt, seed=0)
    x = torch.randn(4, 3)
    gmd.zero_grad()
    gmd.backward([model(x).pow(2).mean(), model(x).sum()])
    gmd.step()
    before = gmd.state_dict()
    other = torch.optim.Adam([torch.nn.Parameter(torch.zeros(5))], lr=0.1)
    bad = {"step": 7, "generator": torch.Generator().manual_seed(1).get_state(), "optimizer": other.state_dict()}
    with pytest.raises(ValueError):
        gmd.load_state_dict(bad)
    after = gmd.state_dict()
    assert after["step"] == before["step"]
    assert torch.equal(after["generator"], before["generator"])
    assert after["optimizer"]["param_groups"] == before["optimizer"]["param_groups"]
    for k, v in before["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(after["optimizer"]["state"][k][name], t)
    with pytest.raises(TypeError, match="generator"):
        gmd.load_state_dict({**before, "generator": "nope"})
    with pytest.raises(ValueError, match="step"):
        gmd.load_state_dict({**before, "step": -1})
