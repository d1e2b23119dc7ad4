"""An offline BraTS-like phantom: MNI152 anatomy, a synthetic glioma, four MR contrasts, written as BraTS NIfTI.

Anatomy comes from the MNI ICBM152 2009a grey/white-matter probability maps and brain mask that the nilearn wheel
bundles (read from files inside the wheel, no download); CSF = brain - GM - WM. Their copyright notice
(``gmd_ext/apps/brats/NOTICE.MNI152``) is copied into every folder the phantom writes.

Per case: a random affine + smooth elastic deformation of the anatomy; a tumour built from a deformed ellipsoidal
distance field with a necrotic / non-enhancing core (label 1), an enhancing rim (4) and edema (2) that spreads
further along white matter; in about one case in five an LGG-like tumour without enhancement. The contrasts
follow MR physics loosely and make the modalities unequally informative, as on real data:

=======  =====  =====  =====  =====  ========  ========
         CSF    GM     WM     edema  necrosis  enhancing
=======  =====  =====  =====  =====  ========  ========
T1       dark   mid    bright mid-   dark      mid        (little tumour contrast)
T1ce     dark   mid    bright mid-   dark      BRIGHT     (the only view of ET)
T2       BRIGHT mid    dark   bright bright    mid
FLAIR    dark   mid    mid-   BRIGHT mid+      mid+       (edema stands out: WT)
=======  =====  =====  =====  =====  ========  ========

plus per-case contrast jitter, a smooth multiplicative bias field per modality and Rician-like noise. Volumes are
stored as int16 (like the BraTS release) with an exact-zero background outside the brain.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gmd_ext.apps.brats.constants import MODALITIES as _MODALITIES
from gmd_ext.io import atomic_write

__all__ = ["make_cases", "NOTICE_FILE", "case_name"]

NOTICE_FILE = Path(__file__).with_name("NOTICE.MNI152")
# Tissue classes: csf, gm, wm, edema, necrosis (label 1), enhancing (label 4).
_CONTRAST = {
    "t1": (0.25, 0.55, 0.80, 0.46, 0.30, 0.52),
    "t1ce": (0.25, 0.55, 0.80, 0.48, 0.30, 1.35),
    "t2": (1.00, 0.60, 0.42, 0.82, 0.92, 0.66),
    "flair": (0.12, 0.55, 0.45, 1.00, 0.62, 0.74),
}
_SCALE = 700.0  # int16 intensity of contrast 1.0, in the range of the BraTS 2018 files


def case_name(seed: int, index: int) -> str:
    """Folder / file stem of phantom case ``index`` made with ``seed``."""
    return f"Phantom_s{seed}_{index:04d}"


@functools.lru_cache(maxsize=4)
def _templates(size: int) -> tuple[torch.Tensor, float]:
    """GM, WM, CSF, brain maps ``[4, size, size, size]`` float32 and the voxel size in mm (isotropic)."""
    from nilearn import datasets  # heavy import (~1.5 s), needed only here

    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32)
    maps = np.stack([gm, wm, np.zeros_like(gm), brain])
    idx = [np.flatnonzero((brain > 0).any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    maps = maps[(slice(None), *(slice(i[0], i[-1] + 1) for i in idx))]
    extent = max(maps.shape[1:])
    # Leave a 6% margin so deformations do not push the brain out of the box.
    scale = 0.94 * size / extent
    new = [max(1, round(s * scale)) for s in maps.shape[1:]]
    t = F.interpolate(torch.from_numpy(np.ascontiguousarray(maps))[None], size=new, mode="trilinear",
                      align_corners=False)[0]
    pad = [(size - s) for s in new]
    t = F.pad(t, [p for s in reversed(pad) for p in (s // 2, s - s // 2)])
    t = t.clamp_(0, 1)
    t[3] = (t[3] > 0.5).float()
    t[0] *= t[3]
    t[1] *= t[3]
    t[2] = (t[3] - t[0] - t[1]).clamp_(min=0)
    return t.contiguous(), 1.0 / scale


def _smooth_noise(gen: torch.Generator, channels: int, size: int, nodes: int) -> torch.Tensor:
    """Smooth random field ``[channels, size, size, size]``, unit-ish amplitude, from a ``nodes``³ control grid."""
    coarse = torch.randn(1, channels, nodes, nodes, nodes, generator=gen)
    return F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)[0]


def _dilate(mask: torch.Tensor, r: int) -> torch.Tensor:
    """Max over a (2r+1)³ cube, as three 1D max-pools (one 3D pool with a 25³ kernel took 18 s at 96³)."""
    x = mask[None, None]
    k = 2 * r + 1
    for kernel in ((k, 1, 1), (1, k, 1), (1, 1, k)):
        x = F.max_pool3d(x, kernel, 1, tuple(q // 2 for q in kernel))
    return x[0, 0]


def _rotation(gen: torch.Generator, max_deg: float) -> torch.Tensor:
    a = (torch.rand(3, generator=gen, dtype=torch.float64) * 2 - 1) * math.radians(max_deg)
    cx, cy, cz = torch.cos(a)
    sx, sy, sz = torch.sin(a)
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return rz @ ry @ rx


def _make_case(size: int, seed: int, index: int) -> tuple[np.ndarray, np.ndarray, float]:
    """One case: int16 ``[4, S, S, S]`` (flair, t1, t1ce, t2), uint8 labels ``[S, S, S]``, voxel size (mm)."""
    maps, voxel_mm = _templates(size)
    # A case depends only on (seed, index): make_cases(n=5) and make_cases(n=10) share their first five cases.
    ss = np.random.SeedSequence([seed, index])
    gen = torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> 1))

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()

    # Anatomy: random affine + smooth elastic displacement, sampled with one grid_sample call.
    lin = torch.linspace(-1, 1, size)
    zz, yy, xx = torch.meshgrid(lin, lin, lin, indexing="ij")
    coords = torch.stack([xx, yy, zz], -1)  # grid_sample order (x, y, z) = (W, H, D)
    aff = (_rotation(gen, 8.0) * u(0.92, 1.05)).float()
    shift = (torch.rand(3, generator=gen) * 2 - 1) * 0.03
    disp = _smooth_noise(gen, 3, size, 5).permute(1, 2, 3, 0) * 0.025
    grid = coords @ aff.T + shift + disp
    warped = F.grid_sample(maps[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    gm, wm, csf, brain_soft = warped
    brain = brain_soft > 0.5

    # Tumour centre: a white-matter voxel well inside the brain.
    inner = (wm > 0.6) & (_dilate((~brain).float(), size // 8) == 0)
    cand = torch.nonzero(inner)
    if len(cand) == 0:
        cand = torch.nonzero(brain)
    centre = cand[torch.randint(len(cand), (1,), generator=gen)].float()[0]
    grid_idx = torch.stack(torch.meshgrid(*(torch.arange(size, dtype=torch.float32),) * 3, indexing="ij"), -1)
    radius = size * u(0.07, 0.13)
    axes = torch.tensor([u(0.8, 1.25), u(0.8, 1.25), u(0.8, 1.25)])
    rel = ((grid_idx - centre) @ _rotation(gen, 90.0).float().T) / (radius * axes)
    d = rel.norm(dim=-1) + 0.18 * _smooth_noise(gen, 1, size, 7)[0]
    edema_extent = u(1.5, 2.2) * (0.75 + 0.5 * wm)  # edema tracks along white matter
    lgg = torch.rand((), generator=gen).item() < 0.2
    core_frac = u(0.35, 0.65)

    tau = 0.06  # soft tissue borders for partial-volume intensities; labels use the hard thresholds
    s_core = torch.sigmoid((core_frac - d) / tau)
    s_tum = torch.sigmoid((1.0 - d) / tau)
    s_ed = torch.sigmoid((edema_extent - d) / tau)
    if lgg:
        s_core = s_tum
    healthy = (1.0 - s_ed)
    memb = torch.stack([csf * healthy, gm * healthy, wm * healthy, s_ed - s_tum, s_core, s_tum - s_core])
    memb[3:] *= brain

    labels = torch.zeros((size,) * 3, dtype=torch.uint8)
    labels[(d < edema_extent) & brain] = 2
    labels[(d < 1.0) & brain] = 1 if lgg else 4
    labels[(d < core_frac) & brain] = 1

    vols = []
    for m in _MODALITIES:
        c = torch.tensor(_CONTRAST[m]) * (1 + 0.08 * (torch.rand(6, generator=gen) * 2 - 1))
        v = torch.einsum("c,cdhw->dhw", c, memb)
        v = v * torch.exp(0.2 * _smooth_noise(gen, 1, size, 4)[0])
        sigma = 0.035
        v = torch.sqrt((v + sigma * torch.randn(v.shape, generator=gen)) ** 2
                       + (sigma * torch.randn(v.shape, generator=gen)) ** 2)
        # Inside the brain every voxel is >= 1, outside exactly 0: the loader's brain mask is "any modality != 0".
        v = torch.where(brain, (v * _SCALE).round().clamp(1, 32767), torch.zeros(()))
        vols.append(v.to(torch.int16))
    return torch.stack(vols).numpy(), labels.numpy(), voxel_mm


def _save_nifti(path: Path, data: np.ndarray, voxel_mm: float) -> None:
    import nibabel as nib

    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = -voxel_mm * (np.array(data.shape) - 1) / 2
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    # .nii.gz is the gzip of the .nii bytes; mtime=0 keeps the files byte-identical across runs.
    with atomic_write(path, "wb") as f:
        f.write(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def make_cases(out_dir: str | os.PathLike, n: int, size: int = 96, seed: int = 0, *,
               overwrite: bool = False) -> list[Path]:
    """Write ``n`` BraTS-layout phantom cases ``<out_dir>/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz``.

    Args:
        out_dir: folder to write into (created). A folder that is not empty is refused (FileExistsError) unless
            ``overwrite``, which replaces the phantom cases of the same names and leaves other files alone.
        n: number of cases (1..100000).
        size: edge of the cubic volume in voxels (16..256); the MNI brain is fitted into it isotropically.
        seed: case ``i`` depends only on ``(seed, i)``; the same arguments give byte-identical volumes.

    Returns:
        The case folders, in order. Also copies the MNI152 copyright notice to ``<out_dir>/NOTICE.MNI152``.
    """
    # Upper bounds: a case is generated in float32 at size^3 (256^3: ~1 GB of working memory).
    for name, v, lo, hi in (("n", n, 1, 100_000), ("size", size, 16, 256)):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"make_cases: {name} must be an int >= {lo} and <= {hi}, got {v!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"make_cases: seed must be a non-negative int, got {seed!r}")
    out = Path(out_dir)
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise FileExistsError(f"make_cases: {out} is not empty (holds {', '.join(held[:3])}"
                              f"{', ...' if len(held) > 3 else ''}); pass overwrite=True (--overwrite) to replace "
                              f"its phantom cases, or choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(NOTICE_FILE, out / NOTICE_FILE.name)
    dirs = []
    for i in range(n):
        image, labels, voxel_mm = _make_case(size, seed, i)
        name = case_name(seed, i)
        case_dir = out / name
        case_dir.mkdir(exist_ok=True)
        for m, vol in zip(_MODALITIES, image):
            _save_nifti(case_dir / f"{name}_{m}.nii.gz", vol, voxel_mm)
        _save_nifti(case_dir / f"{name}_seg.nii.gz", labels, voxel_mm)
        dirs.append(case_dir)
    return dirs
