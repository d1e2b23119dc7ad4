"""gmd_ext.lightning: every Lightning configuration against the plain loop it stands for.

The plain loop is what a user writes without Lightning: ``gmd.zero_grad()`` at the start of each accumulation
window, ``gmd.backward(losses / n)`` per micro-batch (scaled by a GradScaler under 16-mixed), clipping, ``step``,
scheduler. fp32 and bf16/fp16 configurations whose operations are the same are compared exactly; 16-mixed also by
the flash-attention rule against an fp32 reference (error at most 2x that of plain torch at the same precision).
"""
import copy
import importlib
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import Logger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

import gmd_ext  # noqa: E402
from gmd_ext import GMD  # noqa: E402
from gmd_ext.lightning import DominanceLogger, GMDMixin, manual_backward  # noqa: E402

MODALITIES = ("audio", "text", "video")
DIMS = (6, 5, 4)
BATCH, BATCHES = 8, 4
OBJECTIVES = gmd_ext.subsets(MODALITIES)

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(d, 8), nn.Tanh()) for d in DIMS)
        self.head = nn.Linear(8, 3)

    def forward(self, xs):
        return [self.head(enc(x)) for enc, x in zip(self.encoders, xs)]


def losses_of(net, batch):
    *xs, present, y = batch
    return gmd_ext.subset_losses(net(xs), y, F.cross_entropy, OBJECTIVES, present=present)


def dataset():
    g = torch.Generator().manual_seed(1)
    n = BATCH * BATCHES
    y = torch.randint(3, (n,), generator=g)
    present = torch.rand(n, len(DIMS), generator=g) > 0.3
    present[present.sum(1) == 0, 0] = True
    xs = [(torch.randn(n, d, generator=g) + y[:, None]) * present[:, m:m + 1] for m, d in enumerate(DIMS)]
    return torch.utils.data.TensorDataset(*xs, present, y)


def batches():
    return list(torch.utils.data.DataLoader(dataset(), batch_size=BATCH, shuffle=False))


def make_gmd(params, nonfinite="raise"):
    return GMD(torch.optim.Adam(params, lr=0.05), seed=0, nonfinite=nonfinite)


def make_scheduler(gmd):
    return torch.optim.lr_scheduler.StepLR(gmd, step_size=1, gamma=0.7)


class Module(GMDMixin, pl.LightningModule):
    def __init__(self, scheduler=False, nonfinite="raise"):
        super().__init__()
        torch.manual_seed(0)
        self.net = Net()
        self.scheduler, self.nonfinite = scheduler, nonfinite

    def training_step(self, batch, batch_idx):
        return losses_of(self.net, batch)

    def configure_optimizers(self):
        gmd = make_gmd(self.parameters(), self.nonfinite)
        if not self.scheduler:
            return gmd
        return {"optimizer": gmd, "lr_scheduler": {"scheduler": make_scheduler(gmd), "interval": "step"}}


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    name, version = "memory", 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):
        pass


def fit(module, epochs=1, ckpt_path=None, precision=None, logger=False, **trainer_kwargs):
    amp = {}
    if precision == "16-mixed":
        amp = {"plugins": [MixedPrecision("16-mixed", "cpu")]}  # fp16 autocast + GradScaler("cpu") on the CPU
    elif precision is not None:
        amp = {"precision": precision}
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                         **amp, **trainer_kwargs)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=BATCH, shuffle=False)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def plain_loop(epochs=1, accumulate=1, clip=None, scheduler=False, autocast=None, net=None):
    """The loop gmd_ext.lightning stands for; returns the trained Net."""
    torch.manual_seed(0)
    net = Net() if net is None else net
    scaler = torch.amp.GradScaler("cpu") if autocast == torch.float16 else None
    gmd = make_gmd(net.parameters(), "propagate" if scaler is not None else "raise")
    sched = make_scheduler(gmd) if scheduler else None
    data = batches()
    for _ in range(epochs):
        for i, batch in enumerate(data):
            if i % accumulate == 0:
                gmd.zero_grad()
            with torch.autocast("cpu", dtype=autocast, cache_enabled=False, enabled=autocast is not None):
                losses = losses_of(net, batch)
            scaled = copy.copy(losses)  # keeps subset_losses' .subsets / .absent
            for k in scaled:
                scaled[k] = scaled[k] / accumulate
                if scaler is not None:
                    scaled[k] = scaler.scale(scaled[k])
            gmd.backward(scaled)
            if (i + 1) % accumulate:
                continue
            if scaler is not None:
                scaler.unscale_(gmd)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            if scaler is not None:
                scaler.step(gmd)
                scaler.update()
            else:
                gmd.step()
            if sched is not None:
                sched.step()
    return net


def max_err(a, b):
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def assert_same(module, net):
    for (name, p), q in zip(module.net.named_parameters(), net.parameters()):
        assert torch.equal(p.detach(), q.detach()), f"{name}: max |diff| {float((p - q).abs().max()):.3g}"


@pytest.mark.parametrize("config", [
    {},
    {"accumulate_grad_batches": 2},
    {"gradient_clip_val": 0.05, "scheduler": True},
])
def test_fp32_equals_plain_loop(config):
    config = dict(config)
    scheduler = config.pop("scheduler", False)
    module = Module(scheduler=scheduler)
    trainer = fit(module, epochs=2, **config)
    accumulate = config.get("accumulate_grad_batches", 1)
    assert trainer.global_step == 2 * BATCHES // accumulate
    net = plain_loop(epochs=2, accumulate=accumulate, clip=config.get("gradient_clip_val"), scheduler=scheduler)
    assert max_err(module.net, Net()) > 1e-3  # training moved the parameters
    assert_same(module, net)
    if scheduler:
        assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.7 ** trainer.global_step)


def test_accumulation_is_not_the_summed_losses():
    """The failure the mixin exists for: without the 1/n division the gradient doubles (issue 22)."""
    module = Module()
    fit(module, epochs=1, accumulate_grad_batches=2)
    right = plain_loop(epochs=1, accumulate=2)
    wrong = plain_loop(epochs=1, accumulate=1)  # a step per batch instead: a different trajectory
    assert_same(module, right)
    assert max_err(module.net, wrong) > 1e-4


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_follows_plain_loop(precision):
    dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
    module = Module(nonfinite="propagate")
    fit(module, epochs=2, precision=precision, gradient_clip_val=0.05)
    plain = plain_loop(epochs=2, autocast=dtype, clip=0.05)
    reference = plain_loop(epochs=2, clip=0.05)  # fp32
    err, plain_err = max_err(module.net, reference), max_err(plain, reference)
    assert plain_err > 0  # autocast ran: low precision changed the result
    assert plain_err < 0.1 * max_err(reference, Net())  # ... and trained: steps were not all skipped
    assert err <= 2 * plain_err, (err, plain_err)  # flash-attention rule
    assert_same(module, plain)  # same operations in the same order: identical


def test_gradscaler_skips_overflow_like_plain_loop():
    """16-mixed: the first steps overflow at the scaler's initial scale (65536) in fp16 unless the loss is small;
    a huge initial scale forces a skipped step, which must leave the parameters and shrink the scale."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    module = Module(nonfinite="propagate")
    before = copy.deepcopy(module.net)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(module, torch.utils.data.DataLoader(dataset(), batch_size=BATCH))
    assert scaler.get_scale() < 2.0 ** 40
    assert max_err(module.net, before) == 0.0


def test_checkpoint_resume_is_exact(tmp_path):
    whole = Module(scheduler=True)
    fit(whole, epochs=2)
    first = Module(scheduler=True)
    trainer = fit(first, epochs=1)
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    resumed = Module(scheduler=True)
    trainer = fit(resumed, epochs=2, ckpt_path=str(path))
    assert trainer.global_step == 2 * BATCHES
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert_same(resumed, plain_loop(epochs=2, scheduler=True))


def test_dominance_indicators_reach_the_logger():
    logger = MemoryLogger()
    module = Module()
    fit(module, epochs=1, logger=logger, accumulate_grad_batches=2)
    rows = [m for _, m in logger.rows if "gmd/num_conflicts" in m]
    assert len(rows) == BATCHES // 2  # one row per optimizer step
    names = [s.name for s in OBJECTIVES]
    for m in rows:
        assert set(f"gmd/norm/{n}" for n in names) <= set(m)
        assert -1.0 <= m["gmd/cosine_min"] <= m["gmd/cosine_mean"] <= 1.0
    # the first step's indicators are the plain loop's
    torch.manual_seed(0)
    net = Net()
    gmd = make_gmd(net.parameters())
    data = batches()
    for batch in data[:2]:
        losses = losses_of(net, batch)
        for k in losses:
            losses[k] = losses[k] / 2
        info = gmd.backward(losses)
    assert rows[0]["gmd/num_conflicts"] == info.num_conflicts
    assert rows[0][f"gmd/norm/{names[-1]}"] == pytest.approx(float(info.norms[-1]), rel=1e-6)


class PlainBase(pl.LightningModule):
    """A module written without the mixin; the mixin added by a subclass still takes its training_step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = Net()

    def training_step(self, batch, batch_idx):
        return losses_of(self.net, batch)

    def configure_optimizers(self):
        return make_gmd(self.parameters())


class MixedIn(GMDMixin, PlainBase):
    pass


class CallsSuper(Module):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx)  # already converted by Module's: passed on


@pytest.mark.parametrize("cls", [MixedIn, CallsSuper])
def test_inherited_training_step(cls):
    module = cls()
    fit(module, epochs=1)
    assert_same(module, plain_loop(epochs=1))


class Sampled(Module):
    """k = 3 of the 7 subsets per optimizer step, drawn from the step index (the same for a step's micro-batches)."""

    def training_step(self, batch, batch_idx):
        objectives = gmd_ext.sample_subsets(MODALITIES, 3, torch.Generator().manual_seed(self.trainer.global_step))
        *xs, present, y = batch
        return gmd_ext.subset_losses(self.net(xs), y, F.cross_entropy, objectives, present=present)


def test_sampled_subsets_with_accumulation():
    module = Sampled()
    trainer = fit(module, epochs=1, accumulate_grad_batches=2)
    assert trainer.global_step == BATCHES // 2
    torch.manual_seed(0)
    net = Net()
    gmd = make_gmd(net.parameters())
    for step, window in enumerate((batches()[:2], batches()[2:])):
        objectives = gmd_ext.sample_subsets(MODALITIES, 3, torch.Generator().manual_seed(step))
        gmd.zero_grad()
        for *xs, present, y in window:
            losses = gmd_ext.subset_losses(net(xs), y, F.cross_entropy, objectives, present=present)
            for k in losses:
                losses[k] = losses[k] / 2
            gmd.backward(losses)
        gmd.step()
    assert_same(module, net)


# ----------------------------------------------------------------------------------------------------- misuse
class ScalarLoss(Module):
    def training_step(self, batch, batch_idx):
        return torch.stack(list(losses_of(self.net, batch).values())).sum()


class LossKey(Module):
    def training_step(self, batch, batch_idx):
        return {"loss": sum(losses_of(self.net, batch).values())}


class PlainAdam(Module):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())


class TwoOptimizers(Module):
    def configure_optimizers(self):
        return [make_gmd(self.net.encoders.parameters()), make_gmd(self.net.head.parameters())]


class Manual(Module):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        self.manual_backward(sum(losses_of(self.net, batch).values()))


@pytest.mark.parametrize("cls, kwargs, error, match", [
    (ScalarLoss, {}, TypeError, "returned one loss tensor"),
    (LossKey, {}, ValueError, "Lightning's 'loss' key"),
    (PlainAdam, {}, TypeError, "must return a gmd_ext.GMD"),
    (TwoOptimizers, {}, Exception, "multiple optimizers|configure_optimizers returned 2"),
    (Module, {"precision": "16-mixed"}, ValueError, 'nonfinite="propagate"'),
])
def test_misuse_raises_with_the_reason(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        fit(cls(), max_steps=1, **kwargs)


def test_manual_optimization_with_the_mixin_raises():
    with pytest.raises(RuntimeError, match="gmd_ext.lightning.manual_backward"):
        fit(Manual(), max_steps=1)


class ManualModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = Net()
        self.automatic_optimization = False

    def configure_optimizers(self):
        self.gmd = make_gmd(self.parameters(), "propagate")
        return self.gmd

    def training_step(self, batch, batch_idx):
        self.gmd.zero_grad()
        manual_backward(self, self.gmd, losses_of(self.net, batch))
        self.optimizers().step()


@pytest.mark.parametrize("precision", [None, "16-mixed"])
def test_manual_backward_equals_plain_loop(precision):
    module = ManualModule()
    logger = MemoryLogger()
    fit(module, epochs=1, precision=precision, logger=logger, callbacks=[DominanceLogger(pairs=True)])
    assert_same(module, plain_loop(epochs=1, autocast=torch.float16 if precision else None))
    logged = [m for _, m in logger.rows if "gmd/num_conflicts" in m]
    assert len(logged) == BATCHES and any(k.startswith("gmd/cos/") for k in logged[0])
    with pytest.raises(RuntimeError, match="automatic_optimization = False"):
        manual_backward(Module(), module.gmd, {})


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "gmd_ext.lightning")
    with pytest.raises(ImportError, match=r"\.\[lightning\]"):
        importlib.import_module("gmd_ext.lightning")
    monkeypatch.undo()
    assert importlib.import_module("gmd_ext.lightning").GMDMixin is GMDMixin
