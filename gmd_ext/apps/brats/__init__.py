"""BraTS brain-tumour segmentation: conventions (`constants`), the DS 3D U-Net (`model`), the NIfTI loader
(`data`, needs nibabel), the offline phantom (`phantom`, needs nibabel and nilearn) and region Dice (`metrics`).
Only the model is imported here; the loaders import their optional dependencies when used."""
from gmd_ext.apps.brats.model import DSUNet3d, UNet3d, build_model

__all__ = ["DSUNet3d", "UNet3d", "build_model"]
