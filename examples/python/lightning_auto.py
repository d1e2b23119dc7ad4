"""GMD in PyTorch Lightning with automatic optimisation: `gmd_ext.lightning.GMDMixin`.

What it shows:
- `training_step` returns the per-objective losses (`gmd_ext.subset_losses(...)`, one per modality subset) instead
  of one loss; `configure_optimizers` returns the GMD engine (a torch.optim.Optimizer wrapping Adam) with a StepLR
  scheduler stepped by Lightning. No backward, scaler or clipping code in the module.
- The Trainer's own options act on GMD's merged gradient: `accumulate_grad_batches=2` (each objective's loss divided
  by 2, the per-objective gradients summed over the window, one projection per step), `gradient_clip_val` (on the
  unscaled merged gradient), `precision` 16-mixed (every objective's loss scaled by the GradScaler; GMD built with
  nonfinite="propagate" so overflowing steps are skipped by the scaler) or bf16-mixed.
- The dominance indicators (gmd/num_conflicts, gmd/cosine_mean, gmd/cosine_min, gmd/norm/<subset>) reach the
  Trainer's logger once per optimizer step (here an in-memory logger).
- Exact resume: 2 epochs, checkpoint, 2 more epochs == 4 epochs in one go; and, in fp32, the parameters equal the
  plain loop `gmd.zero_grad(); gmd.backward({k: l / 2}); gmd.backward(...); clip; gmd.step()` bit for bit.

On CPU Lightning maps precision="16-mixed" to "bf16-mixed", so the script passes `MixedPrecision("16-mixed", "cpu")`
(float16 autocast + `GradScaler("cpu")`) explicitly; the last line says which precision ran.

    python examples/python/lightning_auto.py            # 2 x 10 epochs
    python examples/python/lightning_auto.py --quick    # seconds after the import (run by tests/test_examples.py)
"""
import argparse
import copy
import os
import tempfile
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.precision import MixedPrecision

import gmd_ext
from gmd_ext import GMD
from gmd_ext.lightning import GMDMixin

MODALITIES = ("audio", "text", "video")
DIMS = (12, 16, 8)
BATCH, BATCHES = 32, 4  # one epoch = 4 batches = 2 optimizer steps (accumulate_grad_batches=2)
ACCUMULATE, CLIP, LR = 2, 1.0, 3e-3


class LateFusionNet(nn.Module):
    def __init__(self, hidden=32, classes=4):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU()) for d in DIMS)
        self.head = nn.Linear(hidden, classes)

    def forward(self, xs):
        return [self.head(enc(x)) for enc, x in zip(self.encoders, xs)]  # one output per modality


def make_gmd(params):
    return GMD(torch.optim.Adam(params, lr=LR), seed=0, nonfinite="propagate")


class GMDModule(GMDMixin, pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = LateFusionNet()
        self.objectives = gmd_ext.subsets(MODALITIES)

    def training_step(self, batch, batch_idx):
        *xs, present, y = batch
        return gmd_ext.subset_losses(self.net(xs), y, F.cross_entropy, self.objectives, present=present)

    def configure_optimizers(self):
        gmd = make_gmd(self.parameters())
        return {"optimizer": gmd, "lr_scheduler": torch.optim.lr_scheduler.StepLR(gmd, step_size=1, gamma=0.8)}


class MemoryLogger(Logger):
    """Keeps what Lightning logs (a real run would use TensorBoardLogger / CSVLogger the same way)."""
    name, version = "memory", 0

    def __init__(self):
        super().__init__()
        self.rows = []

    def log_metrics(self, metrics, step=None):
        self.rows.append(dict(metrics))

    def log_hyperparams(self, *args, **kwargs):
        pass


def dataset():
    g = torch.Generator().manual_seed(1)
    n = BATCH * BATCHES
    y = torch.randint(4, (n,), generator=g)
    present = torch.rand(n, len(DIMS), generator=g) > 0.3
    present[present.sum(1) == 0, 0] = True
    xs = []
    for m, (d, signal) in enumerate(zip(DIMS, (2.0, 1.0, 0.5))):
        prototypes = torch.randn(4, d, generator=torch.Generator().manual_seed(m))
        xs.append((signal * prototypes[y] + torch.randn(n, d, generator=g)) * present[:, m:m + 1])
    return torch.utils.data.TensorDataset(*xs, present, y)


def loader():
    # shuffle=False: the resumed run and the plain loop must see the same batches as the uninterrupted run.
    return torch.utils.data.DataLoader(dataset(), batch_size=BATCH, shuffle=False)


def fit(epochs, precision, ckpt_path=None):
    module = GMDModule()
    if precision == "16-mixed" and not torch.cuda.is_available():
        amp = {"plugins": [MixedPrecision("16-mixed", "cpu")]}  # float16 autocast + GradScaler("cpu")
    else:
        amp = {"precision": precision}
    trainer = pl.Trainer(accelerator="auto", devices=1, max_epochs=epochs, logger=MemoryLogger(), log_every_n_steps=1,
                         accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, **amp)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer, module


def plain_loop(epochs):
    """What the Trainer above does, written out (fp32)."""
    torch.manual_seed(0)
    net = LateFusionNet()
    objectives = gmd_ext.subsets(MODALITIES)
    gmd = make_gmd(net.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(gmd, step_size=1, gamma=0.8)
    for _ in range(epochs):
        for i, (*xs, present, y) in enumerate(loader()):
            if i % ACCUMULATE == 0:
                gmd.zero_grad()
            losses = gmd_ext.subset_losses(net(xs), y, F.cross_entropy, objectives, present=present)
            scaled = copy.copy(losses)  # a copy keeps subset_losses' record of which modalities each loss uses
            for k in scaled:
                scaled[k] = scaled[k] / ACCUMULATE
            gmd.backward(scaled)
            if (i + 1) % ACCUMULATE == 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
                gmd.step()
        scheduler.step()
    return net


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run for CI")
    ap.add_argument("--precision", default="16-mixed", choices=["16-mixed", "bf16-mixed", "32-true"])
    args = ap.parse_args()
    half = 2 if args.quick else 10
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # a 4-batch in-memory dataset

    trainer_a, a = fit(2 * half, args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "half.ckpt")
        trainer_b, _ = fit(half, args.precision)
        trainer_b.save_checkpoint(path)
        trainer_c, c = fit(2 * half, args.precision, ckpt_path=path)

    plugin = trainer_a.precision_plugin
    scaler = getattr(plugin, "scaler", None)
    ran = f"{getattr(plugin, 'precision', args.precision)} on {trainer_a.strategy.root_device.type}" + (
        f", GradScaler scale {scaler.get_scale():g}" if scaler is not None else ", no GradScaler")
    logged = [r for r in trainer_a.logger.rows if "gmd/num_conflicts" in r]
    full = "+".join(MODALITIES)
    print(f"ran: {ran}")
    print(f"{trainer_a.global_step} optimizer steps over {2 * half * BATCHES} batches; conflicting pairs per step "
          f"{[int(r['gmd/num_conflicts']) for r in logged][:8]}...; full-set gradient norm "
          f"{logged[0][f'gmd/norm/{full}']:.3f} -> {logged[-1][f'gmd/norm/{full}']:.3f}")

    # The checks CI relies on.
    steps = 2 * half * BATCHES // ACCUMULATE
    assert trainer_a.global_step == steps and trainer_c.global_step == steps, (trainer_a.global_step, steps)
    # one row of indicators per step, except steps the GradScaler skipped (overflowing scaled gradients)
    assert steps - 2 <= len(logged) <= steps, (len(logged), steps)
    assert logged[-1][f"gmd/norm/{full}"] < logged[0][f"gmd/norm/{full}"]  # training converges
    lr = trainer_a.optimizers[0].param_groups[0]["lr"]
    assert abs(lr - LR * 0.8 ** (2 * half)) < 1e-12, lr  # Lightning stepped StepLR on GMD once per epoch
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q), "resumed run differs from the uninterrupted one"
    if args.precision == "32-true":
        for p, q in zip(a.net.parameters(), plain_loop(2 * half).parameters()):
            assert torch.equal(p, q), "Lightning differs from the plain loop"
    print(f"OK lightning_auto ({ran}): resumed == uninterrupted after {steps} steps"
          + (", == the plain loop" if args.precision == "32-true" else ""))


if __name__ == "__main__":
    main()
