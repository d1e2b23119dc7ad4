"""GMD as a torch.optim.Optimizer, and exact gradient accumulation across backward calls."""
import pickle

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import gmd_ext
from gmd_ext import GMD

ORDER = torch.tensor([[2, 0, 1], [1, 2, 0], [0, 1, 2]])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(5, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 2) for _ in range(3))

    def forward(self, x):
        z = torch.tanh(self.trunk(x))
        return [h(z) for h in self.heads]


def losses_of(model, x, y, scale=1.0):
    outs = model(x)
    # Conflicting objectives (a head pulls the trunk the other way) so the projection does something.
    return [scale * F.mse_loss(outs[0], y), scale * F.mse_loss(outs[1], -y), scale * (outs[2] * y).mean()]


def flat(model):
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in model.parameters()])


def make(**kw):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kw.setdefault("order", ORDER)
    return model, opt, GMD(opt, **kw)


X, Y = torch.randn(8, 5, generator=torch.Generator().manual_seed(1)), torch.randn(8, 2)


# ------------------------------------------------------------------ optimizer protocol
def test_is_an_optimizer_sharing_the_wrapped_state():
    model, opt, gmd = make()
    assert isinstance(gmd, torch.optim.Optimizer)
    assert gmd.param_groups is opt.param_groups and gmd.state is opt.state and gmd.defaults is opt.defaults
    r = repr(gmd)
    assert r.startswith("GMD(") and "SGD" in r and "usage='official'" in r
    with pytest.raises(TypeError, match="already a GMD"):
        GMD(gmd)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(gmd)


def test_lr_scheduler_drives_the_wrapped_optimizer():
    model, opt, gmd = make()
    sched = torch.optim.lr_scheduler.StepLR(gmd, step_size=1, gamma=0.5)
    for _ in range(2):
        gmd.zero_grad()
        gmd.backward(losses_of(model, X, Y))
        gmd.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert sched.get_last_lr() == [pytest.approx(0.025)]


def test_step_with_closure():
    model, opt, gmd = make()
    calls = []

    def closure():
        gmd.zero_grad()
        losses = losses_of(model, X, Y)
        gmd.backward(losses)
        calls.append(1)
        return sum(losses)

    before = [p.detach().clone() for p in model.parameters()]
    loss = gmd.step(closure)
    assert calls == [1] and torch.is_tensor(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    with pytest.raises(TypeError, match="closure must be a callable"):
        gmd.step(3)
    # LBFGS calls the closure several times: each call starts from zero_grad.
    torch.manual_seed(0)
    model2 = Net()
    gmd2 = GMD(torch.optim.LBFGS(model2.parameters(), max_iter=3), order=ORDER)

    def closure2():
        gmd2.zero_grad()
        losses = losses_of(model2, X, Y)
        gmd2.backward(losses)
        return sum(losses).detach()

    gmd2.step(closure2)


def test_grad_scaler_steps_gmd_directly():
    model, opt, gmd = make(nonfinite="propagate")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gmd.zero_grad()
    gmd.backward([scaler.scale(l) for l in losses_of(model, X, Y)])
    scaled = flat(model).clone()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(gmd)
    scaler.update()
    torch.testing.assert_close(flat(model), scaled / 1024.0)  # unscaled in place, then stepped
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # An overflowing step is skipped by the scaler and the scale drops.
    gmd.zero_grad()
    gmd.backward([scaler.scale(l) * float("inf") for l in losses_of(model, X, Y)])
    params = [p.detach().clone() for p in model.parameters()]
    scaler.step(gmd)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    assert scaler.get_scale() < 1024.0


def test_zero_grad_set_to_none_false_restarts_accumulation():
    model, opt, gmd = make()
    gmd.backward(losses_of(model, X, Y))
    gmd.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    gmd.backward(losses_of(model, X, Y))
    once = flat(model).clone()
    gmd.zero_grad()
    gmd.backward(losses_of(model, X, Y))
    torch.testing.assert_close(flat(model), once)


def test_state_dict_round_trip_and_atomic_load():
    model, opt, gmd = make()
    gmd.backward(losses_of(model, X, Y))
    gmd.step()
    state = gmd.state_dict()
    _, _, other = make()
    other.load_state_dict(state)
    assert other.state_dict()["step"] == state["step"]
    bad = dict(state, optimizer={"state": {}, "param_groups": [{"params": [0]}]})
    saved = other.optimizer.state_dict()
    with pytest.raises(Exception):
        other.load_state_dict(bad)
    assert other.optimizer.state_dict()["param_groups"] == saved["param_groups"]


# ------------------------------------------------------------------ accumulation
@pytest.mark.parametrize("kw", [{}, {"strategy": "batched"}, {"usage": "reach"}, {"order": "random", "seed": 5}],
                         ids=["sequential", "batched", "reach", "random_order"])
def test_two_micro_batches_equal_one_call(kw):
    model, opt, gmd = make(**kw)
    gmd.zero_grad()
    gmd.backward(losses_of(model, X, Y))
    whole = flat(model).clone()
    if kw.get("order") == "random":  # the order is drawn once per step: replay the same draw
        model, opt, gmd = make(**kw)
    gmd.zero_grad()
    info1 = gmd.backward(losses_of(model, X[:4], Y[:4], 0.5))
    first = flat(model).clone()
    info2 = gmd.backward(losses_of(model, X[4:], Y[4:], 0.5))
    torch.testing.assert_close(flat(model), whole, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(first, whole)  # the first call alone is a different gradient
    assert info2.gram.shape == info1.gram.shape


def test_accumulation_on_a_ds_model_with_branches():
    torch.manual_seed(0)
    model = gmd_ext.DSUNet3d(width=0.125, num_groups=4)
    x = torch.randn(2, 4, 16, 16, 16)
    y = (torch.rand(2, 3, 16, 16, 16) > 0.7).float()
    subs = gmd_ext.subsets(model.modalities)[-5:]
    order = torch.stack([torch.randperm(len(subs), generator=torch.Generator().manual_seed(i))
                         for i in range(len(subs))])
    gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1), order=order)

    def losses(rows, scale):
        out = model.forward_branches(x[rows])
        ls = gmd_ext.subset_losses(out, y[rows], F.binary_cross_entropy_with_logits, subs)
        return ls.__class__({k: v * scale for k, v in ls.items()}, ls.subsets)

    gmd.backward(losses(slice(0, 2), 1.0))
    whole = flat(model).clone()
    gmd.zero_grad()
    gmd.backward(losses(slice(0, 1), 0.5))
    gmd.backward(losses(slice(1, 2), 0.5))
    torch.testing.assert_close(flat(model), whole, rtol=1e-4, atol=1e-6)


def test_inner_optimizer_zero_grad_clears_the_rows():
    model, opt, gmd = make()
    gmd.backward(losses_of(model, X, Y))
    once = flat(model).clone()
    opt.zero_grad()  # the loop calls the wrapped optimizer's zero_grad, not GMD's
    gmd.backward(losses_of(model, X, Y))
    torch.testing.assert_close(flat(model), once)
    opt.zero_grad(set_to_none=False)
    gmd.backward(losses_of(model, X, Y))
    torch.testing.assert_close(flat(model), once)


def test_plain_backward_is_never_silently_discarded():
    model, opt, gmd = make()
    sum(losses_of(model, X, Y)).backward()  # before the first GMD call
    with pytest.raises(RuntimeError, match="from outside GMD"):
        gmd.backward(losses_of(model, X, Y))
    gmd.zero_grad()
    gmd.backward(losses_of(model, X, Y))
    sum(losses_of(model, X, Y)).backward()  # between GMD calls: added into the merged .grad
    with pytest.raises(RuntimeError, match="from outside GMD"):
        gmd.backward(losses_of(model, X, Y))
    gmd.zero_grad()
    gmd.backward(losses_of(model, X, Y))  # fine again after zero_grad


def test_low_memory_mode_refuses_to_accumulate():
    model, opt, gmd = make(memory="low")
    gmd.backward(losses_of(model, X, Y))
    with pytest.raises(RuntimeError, match='memory="low"'):
        gmd.backward(losses_of(model, X, Y))
    gmd.zero_grad()
    gmd.backward(losses_of(model, X, Y))


def test_failed_backward_leaves_no_partial_gradient():
    model, opt, gmd = make()
    good = losses_of(model, X, Y)
    bad = losses_of(model, X, Y)
    bad[1].grad_fn.register_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        gmd.backward(bad)
    assert all(p.grad is None for p in model.parameters())
    gmd.backward(good)  # not mistaken for a foreign gradient


def test_accumulating_different_objectives_raises():
    model, opt, gmd = make()
    ls = losses_of(model, X, Y)
    gmd.backward({"a": ls[0], "b": ls[1], "c": ls[2]})
    ls = losses_of(model, X, Y)
    with pytest.raises(ValueError, match="differ from the ones this step"):
        gmd.backward({"a": ls[0], "c": ls[2], "b": ls[1]})
    gmd.zero_grad()
    gmd.backward(losses_of(model, X, Y))
    with pytest.raises(ValueError, match="same objectives"):
        gmd.backward(losses_of(model, X, Y)[:2])


def test_state_is_shared_with_a_dict_copying_wrapper():
    """Lightning's LightningOptimizer wraps an optimizer by copying its __dict__ into an instance of a subclass
    (without 'step'): GMD's state written through such a wrapper must be the engine's state."""
    import gc

    model, opt, gmd = make(nonfinite="skip")
    wrapper = object.__new__(type("LightningGMD", (type(gmd),), {}))
    wrapper.__dict__ = {k: v for k, v in gmd.__dict__.items() if k not in ("step", "__del__")}
    info = wrapper.backward(losses_of(model, X, Y))
    assert gmd.last_info is info and gmd.state_dict()["step"] == 1
    wrapper.step()
    del wrapper
    gc.collect()  # the wrapper's finaliser must not remove the engine's hooks
    sum(losses_of(model, X, Y)).backward()
    with pytest.raises(RuntimeError, match="from outside GMD"):
        gmd.backward(losses_of(model, X, Y))


def test_lightning_optimizer_wraps_gmd():
    pytest.importorskip("lightning")
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model, opt, gmd = make()
    lo = LightningOptimizer(gmd)
    lo.zero_grad()
    info = lo.backward(losses_of(model, X, Y))  # GMD's own methods, called through the wrapper
    assert gmd.last_info is info and gmd.state_dict()["step"] == 1
    assert lo.param_groups is opt.param_groups
