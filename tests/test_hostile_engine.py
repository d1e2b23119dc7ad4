"""The engine's WEAK findings of the hardening round (issue 21), each run in its own forked child under a memory cap
(RLIMIT_AS) and a timeout, as tests/test_hostile_inputs.py does for files: each must end in a clear error naming
what happened, or behave correctly — never a misleading message, a silently different result, a crash or a hang.

One runner process imports torch and gmd_ext once and forks a child per case (a fork costs milliseconds).
"""
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the runner loads this file by path
from _children import run_children  # noqa: E402
from _models import Heads  # noqa: E402


def setup(**kw):
    from gmd_ext import GMD

    torch.manual_seed(0)
    net = Heads()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return net, opt, GMD(opt, order="sequential", **kw), torch.randn(8, 6), torch.randn(8, 2)


def skip_accumulation():
    """nonfinite="skip" + accumulation: a NaN first micro-batch skips the accumulated step as a whole."""
    net, opt, gmd, x, y = setup(nonfinite="skip")
    before = [p.detach().clone() for p in net.parameters()]
    gmd.zero_grad()
    first = gmd.backward([l * float("nan") for l in net.losses(x[:4], y[:4])])
    last = gmd.backward([l / 2 for l in net.losses(x[4:], y[4:])])
    gmd.step()
    changed = any(not torch.equal(p, b) for p, b in zip(net.parameters(), before))
    gmd.zero_grad()
    after = gmd.backward(net.losses(x, y))  # a new step runs normally
    return {"first": first.skipped, "last": last.skipped, "reason": last.reason, "changed": changed,
            "next": after.skipped}


def clear_one_grad():
    net, opt, gmd, x, y = setup()
    gmd.backward([l / 2 for l in net.losses(x[:4], y[:4])])
    net.trunk[0].weight.grad = None
    gmd.backward([l / 2 for l in net.losses(x[4:], y[4:])])


def inplace_edit():
    net, opt, gmd, x, y = setup()
    gmd.backward([l / 2 for l in net.losses(x[:4], y[:4])])
    nn.utils.clip_grad_norm_(net.parameters(), 1e-3)
    gmd.backward([l / 2 for l in net.losses(x[4:], y[4:])])


def gram_overflow():
    """|g| ~ 1e36: finite gradients, fp32 Gramian overflows; projected (scale-invariant), not 'NaN or Inf'."""
    net, opt, gmd, x, y = setup()
    ref = gmd.backward(net.losses(x, y))
    ref_grads = [p.grad.clone() for p in net.parameters()]
    gmd.zero_grad()
    s = 2.0 ** 120
    info = gmd.backward([l * s for l in net.losses(x, y)])
    err = max(float((p.grad / s - r).abs().max()) for p, r in zip(net.parameters(), ref_grads))
    return {"skipped": info.skipped, "err": err, "conflicts": (info.num_conflicts, ref.num_conflicts)}


def freeze_midway():
    net, opt, gmd, x, y = setup()
    gmd.backward([l / 2 for l in net.losses(x[:4], y[:4])])
    net.heads[0].bias.requires_grad_(False)
    gmd.backward([l / 2 for l in net.losses(x[4:], y[4:])])


def add_group_midway():
    net, opt, gmd, x, y = setup()
    gmd.backward([l / 2 for l in net.losses(x[:4], y[:4])])
    gmd.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    gmd.backward([l / 2 for l in net.losses(x[4:], y[4:])])


def threads():
    """Two threads call backward on one engine at once: the second is refused by name."""
    net, opt, gmd, x, y = setup()
    started = threading.Event()

    def slow(g):
        started.set()
        time.sleep(1.0)
        return g

    net.trunk[0].weight.register_hook(slow)
    errors = []

    def run():
        try:
            gmd.backward(net.losses(x, y))
        except RuntimeError as e:
            errors.append(str(e))

    first = threading.Thread(target=run)
    first.start()
    started.wait(10)
    run()  # while the first thread is inside backward
    first.join()
    return {"errors": errors}


def skip_with_grad_scaler():
    net, opt, gmd, x, y = setup(nonfinite="skip")
    scaler = torch.amp.GradScaler("cpu", init_scale=3.0e38)
    before = [p.detach().clone() for p in net.parameters()]
    info = gmd.backward([scaler.scale(l) * 1e3 for l in net.losses(x, y)])  # the scaled losses overflow
    scaler.step(gmd)
    scaler.update()
    changed = any(not torch.equal(p, b) for p, b in zip(net.parameters(), before))
    return {"skipped": info.skipped, "changed": changed, "scale": scaler.get_scale()}


def adam_state_into_sgd():
    from gmd_ext import GMD

    net, opt, gmd, x, y = setup()
    adam = GMD(torch.optim.Adam(net.parameters(), lr=0.1))
    adam.backward(net.losses(x, y))
    adam.step()
    gmd.load_state_dict(adam.state_dict())


def garbage_param_groups():
    net, opt, gmd, x, y = setup()
    state = gmd.state_dict()
    errors = []
    for groups in ("junk", [{"params": "ab"}], [7]):
        try:
            gmd.load_state_dict(dict(state, optimizer={"state": {}, "param_groups": groups}))
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return {"errors": errors}


CASES = {f.__name__: f for f in (skip_accumulation, clear_one_grad, inplace_edit, gram_overflow, freeze_midway,
                                 add_group_midway, threads, skip_with_grad_scaler, adam_state_into_sgd,
                                 garbage_param_groups)}

_SETUP = textwrap.dedent("""
    import importlib.util, sys, torch
    spec = importlib.util.spec_from_file_location("hostile_engine", {path!r})
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.set_num_threads(1)
""")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_children(_SETUP.format(path=str(Path(__file__).resolve())),
                        {name: f"result = mod.CASES[{name!r}]()" for name in CASES},
                        tmp_path_factory.mktemp("hostile_engine"))


def _ok(results, name):
    res = results[name]
    assert res["status"] == "ok", (name, res)
    return res


def _error(results, name, kind, *needles):
    res = _ok(results, name)
    assert res["type"] == kind, (name, res)
    for needle in needles:
        assert needle in res["msg"], (name, res["msg"])


def test_skip_drops_the_accumulated_step_as_a_whole(results):
    v = _ok(results, "skip_accumulation")["result"]
    assert v["first"] and v["last"] and not v["changed"] and not v["next"]
    assert "earlier backward call of this accumulated step was skipped" in v["reason"]


def test_clearing_one_grad_mid_accumulation_is_refused(results):
    _error(results, "clear_one_grad", "RuntimeError", "was cleared (set to None)", "[0]", "gmd.zero_grad()")


def test_inplace_grad_edit_between_accumulating_calls_is_refused(results):
    _error(results, "inplace_edit", "RuntimeError", "modified in place", "clip_grad_norm_")


def test_finite_gradients_never_overflow_the_gramian(results):
    v = _ok(results, "gram_overflow")["result"]
    assert not v["skipped"] and v["err"] < 1e-6 and v["conflicts"][0] == v["conflicts"][1]


@pytest.mark.parametrize("name", ["freeze_midway", "add_group_midway"])
def test_parameter_set_change_mid_accumulation_is_named(results, name):
    _error(results, name, "RuntimeError", "trainable parameters changed", "frozen or unfrozen, or add_param_group")


def test_concurrent_backward_is_named(results):
    v = _ok(results, "threads")["result"]
    assert len(v["errors"]) == 1 and "already running in another thread" in v["errors"][0]


def test_skip_with_grad_scaler(results):
    v = _ok(results, "skip_with_grad_scaler")["result"]
    assert v["skipped"] and not v["changed"] and v["scale"] < 3.0e38


def test_another_optimizers_state_is_refused(results):
    _error(results, "adam_state_into_sgd", "ValueError", "not a SGD state", "momentum")


def test_garbage_param_groups_are_refused(results):
    errors = _ok(results, "garbage_param_groups")["result"]["errors"]
    assert all(e is not None and "state_dict['optimizer']" in e for e in errors), errors
