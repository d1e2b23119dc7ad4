"""GMD with torch.amp.GradScaler: the documented recipe (GMD(..., nonfinite="propagate"))."""
import pytest
import torch
from torch import nn

from gmd_ext import GMD
from gmd_ext.ops.reference import pairwise_pcgrad
from gmd_ext.testing import assert_close_rel

ORDER = torch.tensor([[2, 0, 1], [1, 2, 0], [0, 2, 1]])


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16))
        self.heads = nn.ModuleList(nn.Linear(16, 2) for _ in range(3))

    def losses(self, x, y):
        z = torch.relu(self.trunk(x))
        out = [((h(z).float() - y) ** 2).mean() for h in self.heads]
        out[2] = out[2] - 0.5 * (self.heads[0](z).float() * y).mean()
        return out


def make():
    torch.manual_seed(0)
    net = Net()
    return net, torch.optim.SGD(net.parameters(), lr=0.05)


def test_scaled_steps_equal_fp32():
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    net, opt = make()
    gmd = GMD(opt, order=ORDER)
    net_s, opt_s = make()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    gmd_s = GMD(opt_s, order=ORDER, nonfinite="propagate")
    for _ in range(3):
        gmd.zero_grad()
        gmd.backward(net.losses(x, y))
        gmd.step()
        gmd_s.zero_grad()
        gmd_s.backward([scaler.scale(l) for l in net_s.losses(x, y)])
        scaler.step(gmd_s.optimizer)
        scaler.update()
    assert scaler.get_scale() == 2.0 ** 12  # no overflow, no skipped step
    for p, q in zip(net.parameters(), net_s.parameters()):
        # projection is scale-invariant and a power-of-two scale is exact in fp32
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_autocast_bf16_error_bounded_by_plain_torch():
    """Merged gradient under bf16 autocast + GradScaler vs fp64 official projection of the fp32 gradients: its
    error is at most 2x that of the official loop run on the same autocast gradients (flash-attention rule)."""
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    net, opt = make()
    params = list(net.parameters())

    def per_objective(autocast):
        rows = []
        for k in range(3):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = net.losses(x, y)[k]
            loss.backward()
            rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                   for p in params]))
        return torch.stack(rows)

    # every parameter here is reached by every objective except the heads: shared mask as the official one
    shared = torch.cat([torch.full((p.numel(),), not n.startswith("heads")) for n, p in net.named_parameters()])
    ref = pairwise_pcgrad(per_objective(False), ORDER, shared)
    baseline = pairwise_pcgrad(per_objective(True), ORDER, shared)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    gmd = GMD(opt, order=ORDER, nonfinite="propagate")
    gmd.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = net.losses(x, y)
    gmd.backward([scaler.scale(l) for l in losses])
    scaler.unscale_(opt)
    out = torch.cat([p.grad.flatten() for p in params])
    assert (out - ref.float()).abs().max() > 0  # autocast really changed the numerics
    assert_close_rel(out, ref, baseline, what="merged gradient under bf16 autocast")


def test_overflow_skips_step_and_lowers_scale():
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    net, opt = make()
    scaler = torch.amp.GradScaler("cpu", init_scale=3.0e38)  # scaled gradients overflow fp32
    gmd = GMD(opt, order=ORDER, nonfinite="propagate")
    before = [p.detach().clone() for p in net.parameters()]
    info = gmd.backward([scaler.scale(l) for l in net.losses(x, y)])
    assert not info.skipped
    # the scaled gradients fit in fp32 but their Gramian overflows: the merged gradient must be NaN everywhere
    assert torch.isfinite(gmd._buffers[0].G).all()
    assert all(torch.isnan(p.grad).all() for p in net.parameters())
    scaler.step(gmd.optimizer)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert scaler.get_scale() < 3.0e38
    # the next step at the lowered scale goes through
    for _ in range(200):
        gmd.zero_grad()
        gmd.backward([scaler.scale(l) for l in net.losses(x, y)])
        scaler.step(gmd.optimizer)
        scaler.update()
        if not torch.equal(net.trunk[0].weight, before[0]):
            break
    assert not torch.equal(net.trunk[0].weight, before[0])


def test_default_nonfinite_raise_names_the_amp_recipe():
    """Scaled gradients that overflow fp32 themselves (inf): the default nonfinite="raise" names the AMP recipe."""
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    net, opt = make()
    scaler = torch.amp.GradScaler("cpu", init_scale=3.0e38)
    gmd = GMD(opt, order=ORDER)
    with pytest.raises(ValueError, match="nonfinite='propagate' with torch.amp.GradScaler"):
        gmd.backward([scaler.scale(l) * 1e3 for l in net.losses(x, y)])


def test_finite_gradients_whose_gramian_overflows_are_projected():
    """Finite gradients (|g| up to ~1e37) whose fp32 Gramian overflows: not reported as NaN/Inf (nonfinite
    "raise"/"skip") but projected from a float64 Γ: s times the merged gradient of the unscaled losses (the
    projection is scale-invariant)."""
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    net, opt = make()
    gmd = GMD(opt, order=ORDER)
    gmd.backward(net.losses(x, y))
    ref = [p.grad.clone() for p in net.parameters()]
    gmd.zero_grad()
    s = 2.0 ** 120  # exact: every scaled gradient is s times the unscaled one
    info = gmd.backward([l * s for l in net.losses(x, y)])
    assert torch.isfinite(gmd._buffers[0].G).all() and not info.skipped and info.gram.dtype == torch.float64
    for p, r in zip(net.parameters(), ref):
        torch.testing.assert_close(p.grad / s, r, rtol=1e-5, atol=1e-7)
