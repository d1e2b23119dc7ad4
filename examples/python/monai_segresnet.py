"""A MONAI segmentation network trained with Dynamic Sharing and GMD: SegResNet + MONAI transforms + DiceLoss.

MONAI's SegResNet is written for one input; `gmd_ext.dynamic_sharing` turns it into a DS model over four MRI
modalities: its convolutions are shared, each GroupNorm gets one affine per modality, each modality runs through
the network on its own (absent modalities are never computed) and the outputs are fused by the mean over the
modalities present. Its `forward_branches` gives one output per modality, so every modality subset is one GMD
objective (`gmd_ext.subset_losses`) and GMD, with no declaration from you, reduces them the official way: the
per-modality GroupNorm rows are summed over the subsets that use them, the shared weights averaged.

The data: synthetic 3D volumes (a spherical "tumour" seen by the four modalities with different contrast — flair
strongly, t2 weakly) through MONAI dictionary transforms (intensity scaling, random flips, random crops), a
random set of modalities missing per case.

    python examples/python/monai_segresnet.py            # a few hundred steps, prints per-subset Dice
    python examples/python/monai_segresnet.py --quick    # seconds on a laptop CPU (run by tests/test_examples.py)
"""
import argparse

import numpy as np
import torch
from monai.data import set_track_meta
from monai.losses import DiceLoss
from monai.networks.nets import SegResNet
from monai.transforms import Compose, RandFlipd, RandSpatialCropd, ScaleIntensityd

import gmd_ext
from gmd_ext import GMD

MODALITIES = ("flair", "t1", "t1ce", "t2")
CONTRAST = (1.5, 0.6, 0.9, 0.3)   # how visible the tumour is in each modality
set_track_meta(False)             # plain tensors out of the transforms (no MetaTensor)


def make_case(rng: np.random.Generator, size: int) -> dict:
    """One case: image [4, S, S, S] (one channel per modality), label [1, S, S, S] (the tumour mask)."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    centre = rng.uniform(0.3 * size, 0.7 * size, 3)[:, None, None, None]
    radius = rng.uniform(0.15 * size, 0.3 * size)
    label = (np.sqrt(((grid - centre) ** 2).sum(0)) < radius).astype(np.float32)
    image = np.stack([c * label + rng.normal(0, 1, label.shape) for c in CONTRAST]).astype(np.float32)
    return {"image": image, "label": label[None]}


def batches(n_cases: int, size: int, crop: int, batch: int, seed: int, p_missing: float = 0.4):
    """Yield (image [B, 4, c, c, c], label [B, 1, c, c, c], present bool [B, 4]) through MONAI transforms; an
    absent modality's channel is zeroed, as a loader does for a missing scan."""
    rng = np.random.default_rng(seed)
    transforms = Compose([ScaleIntensityd(keys="image"),
                          RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
                          RandSpatialCropd(keys=["image", "label"], roi_size=(crop,) * 3, random_size=False)])
    transforms.set_random_state(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    while True:
        items = [transforms(make_case(rng, size)) for _ in range(batch)]
        image = torch.stack([torch.as_tensor(i["image"]) for i in items])
        label = torch.stack([torch.as_tensor(i["label"]) for i in items])
        present = torch.rand(batch, len(MODALITIES), generator=gen) > p_missing
        present[present.sum(1) == 0, 0] = True
        yield image * present[:, :, None, None, None], label, present


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run for CI")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    steps = args.steps or (12 if args.quick else 300)
    size, crop = (20, 16) if args.quick else (40, 32)

    torch.manual_seed(0)
    # Written for ONE modality: 1 input channel, 1 output (the tumour logit).
    net = SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=1, blocks_down=(1, 2, 2),
                    blocks_up=(1, 1))
    model = gmd_ext.dynamic_sharing(net, MODALITIES)   # net itself is left as it is
    dice = DiceLoss(sigmoid=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    gmd = GMD(optimizer, seed=0)
    objectives = gmd_ext.subsets(MODALITIES)           # 15 subsets

    val_x, val_y, _ = next(batches(4, size, crop, 8, seed=123))

    @torch.no_grad()
    def val_dice_loss():
        """Dice loss of every subset on held-out cases (all modalities in the files, each subset's fusion)."""
        model.eval()
        out = gmd_ext.subset_losses(model.forward_branches(val_x), val_y, dice, objectives)
        model.train()
        return {name: float(v) for name, v in out.items()}

    before = val_dice_loss()
    data = batches(64, size, crop, 2, seed=0)
    for step in range(steps):
        x, y, present = next(data)
        gmd.zero_grad()
        # One output per modality (absent ones never computed), fused per subset over its present modalities.
        losses = gmd_ext.subset_losses(model.forward_branches(x, present), y, dice, objectives, present=present)
        info = gmd.backward(losses)
        gmd.step()
        if step % max(1, steps // 4) == 0 or step == steps - 1:
            print(f"step {step:4d}  dice loss (all four) {info.losses[-1]:.3f}  conflicts {info.num_conflicts}")
    after = val_dice_loss()
    print("held-out Dice loss per subset (before -> after):")
    for name in before:
        print(f"  {name:22s} {before[name]:.3f} -> {after[name]:.3f}")

    # The checks CI relies on: GMD took the per-branch gradient source on its own (the DS outputs are marked
    # branches), and training lowered the held-out Dice loss of the full set and on average over the subsets.
    assert "-> Branches()" in gmd.plan, gmd.plan
    full = "+".join(MODALITIES)
    mean_before, mean_after = np.mean(list(before.values())), np.mean(list(after.values()))
    assert after[full] < before[full] and mean_after < mean_before, (before, after)
    # And modality m's network, exported as a plain SegResNet, computes the DS model's branch m.
    plain = model.branch("t1ce").eval()
    model.eval()
    with torch.no_grad():
        diff = float((plain(val_x[:, 2:3]) - model.forward_modality(val_x[:, 2:3], "t1ce")).abs().max())
    assert type(plain) is SegResNet and diff < 1e-4, diff
    print(f"OK monai_segresnet: full-set held-out Dice loss {before[full]:.3f} -> {after[full]:.3f}, mean over "
          f"subsets {mean_before:.3f} -> {mean_after:.3f}; GMD source {gmd.plan.split('->')[1].split()[0]}; "
          f"branch('t1ce') is a plain SegResNet (max diff {diff:.0e})")


if __name__ == "__main__":
    main()
