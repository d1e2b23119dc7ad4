"""GMD on your own multimodal model, in a plain PyTorch loop.

The model: one encoder per modality (an nn.ModuleList) and a classifier head shared by all of them; each modality
gives its own logits ("branch outputs"), and a modality subset is predicted by the mean of its present modalities'
logits (late fusion). Every non-empty subset of the modalities is one GMD objective, so a strong modality cannot
drown the others' gradients (the paper's "modality dominance"): GMD projects away the conflicting parts of the
subsets' gradients before the optimizer step.

    python examples/python/own_model.py            # a few hundred steps, prints the dominance indicators
    python examples/python/own_model.py --quick    # seconds on a laptop CPU (run by tests/test_examples.py)
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

import gmd_ext
from gmd_ext import GMD

MODALITIES = ("audio", "text", "video")
DIMS = (12, 16, 8)          # feature size of each modality
SIGNAL = (2.0, 1.0, 0.5)    # how much each modality says about the label: audio dominates
CLASSES = 4


class LateFusionNet(nn.Module):
    def __init__(self, dims, hidden=32, classes=CLASSES):
        super().__init__()
        # Modality-specific parameters: encoder m is used only by the subsets that contain modality m.
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU()) for d in dims)
        # Shared parameters: every subset uses the head.
        self.head = nn.Linear(hidden, classes)

    def forward(self, xs):
        """xs: one [B, d_m] tensor per modality -> one [B, classes] logits tensor per modality."""
        return [self.head(enc(x)) for enc, x in zip(self.encoders, xs)]


def make_batch(batch, generator, p_missing=0.3):
    """A synthetic batch: label y, per-modality features carrying SIGNAL[m] about y, and a `present` mask
    (row b lacks modality m with probability p_missing, never all of them). Absent features are zeroed, as a
    loader would do for a missing scan or a dropped sensor."""
    y = torch.randint(CLASSES, (batch,), generator=generator)
    present = torch.rand(batch, len(DIMS), generator=generator) > p_missing
    present[present.sum(1) == 0, 0] = True
    xs = []
    for m, (d, s) in enumerate(zip(DIMS, SIGNAL)):
        prototypes = torch.randn(CLASSES, d, generator=torch.Generator().manual_seed(100 + m))
        x = s * prototypes[y] + torch.randn(batch, d, generator=generator)
        xs.append(x * present[:, m:m + 1])
    return xs, present, y


def by_hand(model, xs, present, y, objectives, order):
    """What GMD computes, spelled out: the per-subset gradients as rows of G, projected in `order` (row i: the
    order in which subset i is projected against the others), then averaged over subsets on the elements every
    subset uses (the head) and summed on the others (encoder m only serves the subsets containing m)."""
    params = list(model.parameters())
    losses = gmd_ext.subset_losses(model(xs), y, F.cross_entropy, objectives, present=present)
    rows = []
    for loss in losses.values():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]))
    shared = torch.cat([torch.full((p.numel(),), name.startswith("head.")) for name, p in model.named_parameters()])
    return gmd_ext.project_conflicts(torch.stack(rows), order=order, shared=shared)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run for CI")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    steps = args.steps or (40 if args.quick else 400)

    torch.manual_seed(0)
    data = torch.Generator().manual_seed(1)
    model = LateFusionNet(DIMS)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    # Official GMD: random orders; mean over subsets on the elements every subset uses (the head), sum on the
    # others (encoder m's, unused by the subsets without m: detected from their zero gradient there). If your
    # per-modality weights share one tensor (modality m = row m), say so: GMD(..., specific={weight: 0}).
    gmd = GMD(optimizer, seed=0)
    objectives = gmd_ext.subsets(MODALITIES)        # 7 subsets: audio, text, video, audio+text, ..., all three

    pairs = len(objectives) * (len(objectives) - 1) // 2
    val_xs, val_present, val_y = make_batch(512, torch.Generator().manual_seed(2))

    @torch.no_grad()
    def val_loss():
        losses = gmd_ext.subset_losses(model(val_xs), val_y, F.cross_entropy, objectives, present=val_present)
        return {name: float(v) for name, v in losses.items()}

    before = val_loss()
    for step in range(steps):
        xs, present, y = make_batch(64, data)
        gmd.zero_grad()
        # {subset name: loss}: the mean of the subset's present modalities' logits, rows with none excluded.
        losses = gmd_ext.subset_losses(model(xs), y, F.cross_entropy, objectives, present=present)
        info = gmd.backward(losses)     # one backward per subset, then the projection; merged gradient in .grad
        gmd.step()
        if step % max(1, steps // 4) == 0 or step == steps - 1:
            # Dominance indicators: cosines between the unimodal subsets' gradients (negative = conflicting) and
            # the number of conflicting objective pairs out of K(K-1)/2.
            cos = info.cosines
            print(f"step {step:4d}  loss(all) {info.losses[-1]:.3f}  conflicts {info.num_conflicts:2d}/{pairs}  "
                  f"cos(audio,text) {cos[0, 1]:+.2f}  cos(audio,video) {cos[0, 2]:+.2f}  "
                  f"cos(text,video) {cos[1, 2]:+.2f}")

    after = val_loss()
    print("validation loss per subset (before -> after):")
    for name in before:
        print(f"  {name:18s} {before[name]:.3f} -> {after[name]:.3f}")
    # The check CI relies on: training with GMD lowered every subset's held-out loss, the full set's clearly.
    full = "+".join(MODALITIES)
    assert after[full] < 0.7 * before[full], (before[full], after[full])
    assert all(after[n] < before[n] for n in before), (before, after)

    # And one step's merged gradient against the by-hand computation (a fresh engine with a fixed order, so that
    # both use the same projection orders; the trained model and a new batch).
    K = len(objectives)
    g = torch.Generator().manual_seed(3)
    order = torch.stack([torch.randperm(K, generator=g) for _ in range(K)])
    check = GMD(torch.optim.SGD(model.parameters(), lr=0.0), order=order)
    xs, present, y = make_batch(64, data)
    check.zero_grad()
    check.backward(gmd_ext.subset_losses(model(xs), y, F.cross_entropy, objectives, present=present))
    merged = torch.cat([p.grad.flatten() for p in model.parameters()])
    expected = by_hand(model, xs, present, y, objectives, order)
    error = float((merged - expected).norm() / expected.norm())
    print(f"merged gradient vs by-hand GMD: relative difference {error:.1e}")
    assert error < 1e-5, error
    print(f"OK own_model: full-set validation loss {before[full]:.3f} -> {after[full]:.3f}; "
          f"merged gradient == by-hand GMD (rel {error:.0e})")


if __name__ == "__main__":
    main()
