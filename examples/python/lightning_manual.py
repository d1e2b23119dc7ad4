"""GMD in PyTorch Lightning: manual optimization with GMD as the optimizer.

What it shows:
- `configure_optimizers` returns the GMD engine itself (it is a torch.optim.Optimizer wrapping Adam) with a StepLR
  scheduler built on it; Lightning counts its steps (`trainer.global_step`) and saves its state (step, order RNG,
  Adam's state) in the checkpoint like any optimizer's.
- `training_step` (automatic_optimization = False): `self.gmd.zero_grad()`,
  `gmd_ext.lightning.manual_backward(self, self.gmd, losses)` (GMD's backward with every loss scaled by the
  precision plugin's GradScaler under 16-mixed, as `self.manual_backward` scales one loss), then
  `self.optimizers().step()`, which goes through the precision plugin: unscale, `on_before_optimizer_step` (where
  we clip), `scaler.step(gmd)`, update.
- The dominance indicators go to the Trainer's logger through the `gmd_ext.lightning.DominanceLogger` callback
  (here an in-memory logger; the script checks one row per step).
- Automatic optimisation (Trainer(gradient_clip_val=..., accumulate_grad_batches=...), no glue at all):
  examples/python/lightning_auto.py.
- Clipping: `self.clip_gradients(...)` in `on_before_optimizer_step`, because under 16-mixed that hook is the first
  point where the gradients are unscaled; clipping in `training_step` before `opt.step()` would clip the *scaled*
  gradients.
- Exact resume: 2 epochs, checkpoint, 2 more epochs from the checkpoint == 4 epochs in one go; the GMD state read
  back from the checkpoint equals the one saved.

Precision: on CUDA `precision="16-mixed"`. On CPU Lightning maps precision="16-mixed" to "bf16-mixed" (with a
warning), so the script passes the plugin explicitly, `MixedPrecision("16-mixed", "cpu")`: float16 autocast with a
`torch.amp.GradScaler("cpu")`. `--precision bf16-mixed` runs bfloat16 autocast without a scaler (there
`optimizer.step(closure)` goes to `gmd.step(closure)`). The last line says which ran.

    python examples/python/lightning_manual.py            # 2 x 10 epochs
    python examples/python/lightning_manual.py --quick    # seconds after the import (run by tests/test_examples.py)
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
from gmd_ext.lightning import DominanceLogger, manual_backward

MODALITIES = ("audio", "text", "video")
DIMS = (12, 16, 8)
BATCH, BATCHES = 32, 4  # one epoch = 4 steps


class LateFusionNet(nn.Module):
    def __init__(self, hidden=32, classes=4):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU()) for d in DIMS)
        self.head = nn.Linear(hidden, classes)

    def forward(self, xs):
        return [self.head(enc(x)) for enc, x in zip(self.encoders, xs)]


class GMDModule(pl.LightningModule):
    def __init__(self, lr=3e-3, clip=1.0):
        super().__init__()
        self.automatic_optimization = False
        self.net = LateFusionNet()
        self.objectives = gmd_ext.subsets(MODALITIES)
        self.lr, self.clip = lr, clip
        self.history = []           # the full-set loss of every step
        self.norms, self.clipped_norms = [], []   # gradient norms before and after clipping
        self.restored_state = None  # GMD's state when training (re)starts

    def configure_optimizers(self):
        # Keep a reference to the engine: call its GMD methods (zero_grad, backward) on it, not on
        # self.optimizers(), which is Lightning's wrapper and only routes .step() through the precision plugin.
        # nonfinite="propagate": under 16-mixed an overflow must reach the GradScaler (which skips the step).
        self.gmd = GMD(torch.optim.Adam(self.parameters(), lr=self.lr), seed=0, nonfinite="propagate")
        scheduler = torch.optim.lr_scheduler.StepLR(self.gmd, step_size=1, gamma=0.8)  # stepped once per epoch
        return {"optimizer": self.gmd, "lr_scheduler": scheduler}

    def on_train_start(self):
        # Runs after Lightning restored the checkpoint (when resuming): record what GMD holds now (a copy: a state
        # dict holds the optimizer's live tensors, which training then updates in place).
        self.restored_state = copy.deepcopy(self.gmd.state_dict())

    def training_step(self, batch, batch_idx):
        *xs, present, y = batch
        self.gmd.zero_grad()
        losses = gmd_ext.subset_losses(self.net(xs), y, F.cross_entropy, self.objectives, present=present)
        manual_backward(self, self.gmd, losses)   # scaled by the GradScaler under 16-mixed
        self.optimizers().step()    # unscale -> on_before_optimizer_step (clip) -> scaler.step(gmd) -> update
        self.history.append(float(losses["+".join(MODALITIES)].detach()))

    def on_before_optimizer_step(self, optimizer):
        self.norms.append(self.grad_norm())
        self.clip_gradients(optimizer, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        self.clipped_norms.append(self.grad_norm())

    def grad_norm(self):
        return float(torch.stack([p.grad.norm() for p in self.parameters() if p.grad is not None]).norm())

    def on_train_epoch_end(self):
        self.lr_schedulers().step()


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


def fit(epochs, precision, ckpt_path=None):
    torch.manual_seed(0)
    module = GMDModule()
    cuda = torch.cuda.is_available()
    if precision == "16-mixed" and not cuda:
        amp = {"plugins": [MixedPrecision("16-mixed", "cpu")]}   # float16 autocast + GradScaler("cpu")
    else:
        amp = {"precision": precision}
    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_epochs=epochs, logger=MemoryLogger(),
                         log_every_n_steps=1, callbacks=[DominanceLogger()], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, **amp)
    # shuffle=False: the resumed run must see the same batches as the uninterrupted one.
    loader = torch.utils.data.DataLoader(dataset(), batch_size=BATCH, shuffle=False)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer, module


def same(a, b):
    """Recursive equality of state dicts (tensors compared exactly)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run for CI")
    ap.add_argument("--precision", default="16-mixed", choices=["16-mixed", "bf16-mixed", "32-true"])
    args = ap.parse_args()
    half = 2 if args.quick else 10
    warnings.filterwarnings("ignore", ".*does not have many workers.*")   # a 4-batch in-memory dataset

    # One uninterrupted run of 2 * half epochs.
    trainer_a, a = fit(2 * half, args.precision)
    # The same run, interrupted after `half` epochs and resumed from the checkpoint.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "half.ckpt")
        trainer_b, b = fit(half, args.precision)
        trainer_b.save_checkpoint(path)
        saved = torch.load(path, weights_only=False)
        trainer_c, c = fit(2 * half, args.precision, ckpt_path=path)

    plugin = trainer_a.precision_plugin
    scaler = getattr(plugin, "scaler", None)
    ran = f"{getattr(plugin, 'precision', args.precision)} on {trainer_a.strategy.root_device.type}" + (
        f", GradScaler scale {scaler.get_scale():g}" if scaler is not None else ", no GradScaler")
    lr = c.gmd.param_groups[0]["lr"]
    print(f"ran: {ran}")
    print(f"full-set loss {a.history[0]:.3f} -> {a.history[-1]:.3f} over {trainer_a.global_step} steps; "
          f"lr {a.lr:g} -> {lr:g}; gradient norm before clipping {min(a.norms):.2f}..{max(a.norms):.2f}")

    # The checks CI relies on.
    steps = 2 * half * BATCHES
    assert trainer_a.global_step == steps and trainer_c.global_step == steps, (trainer_a.global_step, steps)
    assert a.history[-1] < 0.8 * a.history[0], (a.history[0], a.history[-1])
    assert len(a.norms) == steps, f"on_before_optimizer_step ran {len(a.norms)} times in {steps} steps"
    # Clipping saw unscaled gradients (scaled ones would be ~65536x larger) and bounded them.
    finite = [(n, m) for n, m in zip(a.norms, a.clipped_norms) if n == n and n != float("inf")]  # skipped steps
    assert max(n for n, _ in finite) < 100 and max(m for _, m in finite) <= a.clip * (1 + 1e-4), finite
    assert abs(lr - a.lr * 0.8 ** (2 * half)) < 1e-12, lr                    # StepLR drove GMD's param_groups
    logged = [r for r in trainer_a.logger.rows if "gmd/num_conflicts" in r]
    # the dominance indicators of every step, except those whose scaled gradients overflowed (skipped steps)
    assert len(logged) == len(finite), (len(logged), len(finite))
    assert same(c.restored_state, saved["optimizer_states"][0]), "GMD state changed through the checkpoint"
    assert same(c.restored_state, b.gmd.state_dict()), "the checkpoint does not hold the GMD state at the save"
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q), "resumed run differs from the uninterrupted one"
    print(f"OK lightning_manual ({ran}): resumed == uninterrupted after {steps} steps, GMD state round-trips")


if __name__ == "__main__":
    main()
