"""GMD with automatic mixed precision: torch.autocast + torch.amp.GradScaler.

The scaler, not GMD, handles overflow: build GMD with nonfinite="propagate" (no finiteness check, no host
synchronisation), hand it the *scaled* losses, and step GMD through the scaler. GMD's projection is
scale-invariant, so the merged gradient is the scale times the unscaled one; when a scaled gradient overflows,
GMD makes the whole merged gradient NaN, `scaler.step(gmd)` finds it and skips the step, and `scaler.update()`
lowers the scale, exactly as without GMD.

    python examples/python/amp.py            # fp16 autocast (CUDA when available, else CPU)
    python examples/python/amp.py --quick    # seconds on a laptop CPU (run by tests/test_examples.py)
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

import gmd_ext
from gmd_ext import GMD

MODALITIES = ("rgb", "depth")
DIMS = (16, 8)


class TwoStreamNet(nn.Module):
    def __init__(self, hidden=64, out=1):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                                    nn.ReLU()) for d in DIMS)
        self.head = nn.Linear(hidden, out)

    def forward(self, xs):  # one [B, out] prediction per modality (late fusion happens in subset_losses)
        return [self.head(enc(x)) for enc, x in zip(self.encoders, xs)]


def make_batch(batch, generator, device):
    xs = [torch.randn(batch, d, generator=generator) for d in DIMS]
    y = (xs[0][:, :4].sum(1, keepdim=True) + 0.5 * xs[1][:, :2].sum(1, keepdim=True)).tanh()
    return [x.to(device) for x in xs], y.to(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run for CI")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    steps = 40 if args.quick else 400
    device = args.device

    torch.manual_seed(0)
    data = torch.Generator().manual_seed(1)
    model = TwoStreamNet().to(device)          # parameters stay fp32; autocast runs the matmuls in fp16
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gmd = GMD(optimizer, seed=0, nonfinite="propagate")
    # A deliberately large initial scale, so the first steps overflow in fp16 and show the skip-and-back-off
    # mechanism; the default (2**16) works too.
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 20)
    objectives = gmd_ext.subsets(MODALITIES)   # rgb, depth, rgb+depth
    val_xs, val_y = make_batch(512, torch.Generator().manual_seed(2), device)

    def val_loss():
        with torch.no_grad(), torch.autocast(device, dtype=torch.float16):
            return float(gmd_ext.subset_losses(model(val_xs), val_y, F.mse_loss, objectives)["rgb+depth"])

    before, skipped = val_loss(), 0
    for step in range(steps):
        xs, y = make_batch(64, data, device)
        gmd.zero_grad()
        with torch.autocast(device, dtype=torch.float16):
            # mse in fp32: autocast runs mse_loss in fp32 by itself; the branch outputs are fp16.
            losses = gmd_ext.subset_losses(model(xs), y, F.mse_loss, objectives)
        info = gmd.backward({name: scaler.scale(loss) for name, loss in losses.items()})
        params = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        scaler.step(gmd)        # unscales .grad in place; skips gmd.step() if the merged gradient holds inf/NaN
        scaler.update()
        if scaler.get_scale() < scale:   # this step overflowed: the scaler skipped it and lowered the scale
            skipped += 1
            assert all(torch.equal(p, q) for p, q in zip(params, model.parameters())), "a skipped step moved"
            print(f"step {step:3d}  overflow at scale {scale:g}: step skipped, scale -> {scaler.get_scale():g}")
        else:
            assert not all(torch.equal(p, q) for p, q in zip(params, model.parameters())), "a good step did not move"
        if step % max(1, steps // 4) == 0 or step == steps - 1:
            print(f"step {step:3d}  loss(rgb+depth) {info.losses[-1] / scale:.4f}  scale {scaler.get_scale():g}  "
                  f"conflicts {info.num_conflicts}/3")

    after = val_loss()
    # The checks CI relies on: the scaler skipped the overflowing steps (parameters untouched, scale lowered) and
    # the remaining steps trained the model.
    assert skipped >= 1, "expected the first steps at scale 2^20 to overflow in fp16"
    assert after < 0.5 * before, (before, after)
    print(f"OK amp: {skipped} overflowing steps skipped, final scale {scaler.get_scale():g}, "
          f"validation loss {before:.4f} -> {after:.4f} ({device}, float16 autocast)")


if __name__ == "__main__":
    main()
