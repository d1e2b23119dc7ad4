"""Gradient accumulation with GMD: several `gmd.backward` calls before one `gmd.step()`.

`gmd.backward(losses)` adds each objective's gradient to that objective's running sum until `gmd.zero_grad()`, and
the merged gradient in `.grad` is always the GMD projection of the accumulated per-objective gradients. So two
micro-batches with their losses scaled by 1/2 give exactly the merged gradient of one call on the whole batch (same
orders), which this script checks. (Projecting each micro-batch and summing the merged gradients would not: the
projection is not linear.)

    python examples/python/accumulation.py            # the check, then a short training run
    python examples/python/accumulation.py --quick    # seconds on a laptop CPU (run by tests/test_examples.py)
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

import gmd_ext
from gmd_ext import GMD

MODALITIES = ("audio", "text", "video")
DIMS = (12, 16, 8)


class LateFusionNet(nn.Module):
    def __init__(self, hidden=32, classes=4):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU()) for d in DIMS)
        self.head = nn.Linear(hidden, classes)

    def forward(self, xs):
        return [self.head(enc(x)) for enc, x in zip(self.encoders, xs)]


def make_batch(batch, generator):
    """Label y and one feature tensor per modality: a class prototype (scaled by how informative the modality
    is) plus noise."""
    y = torch.randint(4, (batch,), generator=generator)
    xs = []
    for m, (d, signal) in enumerate(zip(DIMS, (2.0, 1.0, 0.5))):
        prototypes = torch.randn(4, d, generator=torch.Generator().manual_seed(m))
        xs.append(signal * prototypes[y] + torch.randn(batch, d, generator=generator))
    return xs, y


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run for CI")
    args = ap.parse_args()
    steps = 20 if args.quick else 300

    torch.manual_seed(0)
    model = LateFusionNet()
    objectives = gmd_ext.subsets(MODALITIES)
    K = len(objectives)
    # A fixed order (row i: the order in which objective i is projected against the others), so that the
    # whole-batch call and the accumulated calls below project in exactly the same order. With order="random"
    # each step draws new orders; accumulation is exact for those too, this just makes the comparison possible.
    g = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(K, generator=g) for _ in range(K)])   # [K, K] int64
    gmd = GMD(torch.optim.SGD(model.parameters(), lr=0.1), order=order)

    # Each objective is a mean over the batch's rows, so the whole batch's loss is the mean of the two halves'
    # losses. (With a `present` mask, subset_losses averages over the rows where the subset is present: weight
    # each micro-batch by its share of those rows instead of 1/2.)
    def losses_of(xs, y, weight=1.0):
        out = gmd_ext.subset_losses(model(xs), y, F.cross_entropy, objectives)
        return {name: weight * loss for name, loss in out.items()}

    xs, y = make_batch(64, torch.Generator().manual_seed(1))
    halves = [([x[:32] for x in xs], y[:32]), ([x[32:] for x in xs], y[32:])]

    # 1. One call on the whole batch.
    gmd.zero_grad()
    gmd.backward(losses_of(xs, y))
    whole = grads(model)

    # 2. Two micro-batches, losses scaled by 1/2, one gmd.backward each, no zero_grad in between.
    gmd.zero_grad()
    for hx, hy in halves:
        gmd.backward(losses_of(hx, hy, 0.5))
    accumulated = grads(model)

    # 3. What the last micro-batch alone gives (what you would step with if backward overwrote instead).
    gmd.zero_grad()
    gmd.backward(losses_of(*halves[1], 0.5))
    last_only = grads(model)

    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    print(f"accumulated vs whole batch: relative difference {rel(accumulated, whole):.2e}")
    print(f"last micro-batch only vs whole batch: relative difference {rel(last_only, whole):.2e}")
    torch.testing.assert_close(accumulated, whole, rtol=1e-5, atol=1e-6)
    assert rel(last_only, whole) > 0.1  # the halves differ, so the check above is not vacuous

    # 4. A gradient left in .grad by a plain loss.backward() is not silently dropped: gmd.backward refuses it.
    gmd.zero_grad()
    sum(losses_of(xs, y).values()).backward()
    try:
        gmd.backward(losses_of(xs, y))
    except (RuntimeError, ValueError) as e:
        print(f"plain backward then gmd.backward raises: {type(e).__name__}: {str(e)[:100]}...")
    else:
        raise AssertionError("gmd.backward accepted a .grad written by a plain backward")

    # 5. Training with 2 micro-batches per step (as a loader that yields micro-batches would).
    data = torch.Generator().manual_seed(2)
    first = last = None
    for step in range(steps):
        gmd.zero_grad()
        total = 0.0
        for _ in range(2):
            mx, my = make_batch(32, data)
            info = gmd.backward(losses_of(mx, my, 0.5))
            total += info.losses[-1]           # the full set's (scaled) loss of this micro-batch
        gmd.step()
        first = total if first is None else first
        last = total
        if step % max(1, steps // 4) == 0 or step == steps - 1:
            print(f"step {step:3d}  loss(all) {total:.3f}")
    assert last < 0.7 * first, (first, last)
    print(f"OK accumulation: 2 x 1/2 micro-batches == whole batch (rel {rel(accumulated, whole):.1e}); "
          f"loss {first:.3f} -> {last:.3f}")


if __name__ == "__main__":
    main()
