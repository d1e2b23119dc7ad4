"""``gmd_ext.models``: the paper's Dynamic Sharing models, re-exported from their homes (gmd_ext/apps/brats/model.py,
gmd_ext/apps/mosi/model.py) — an import path kept for users."""
from gmd_ext.apps.brats.model import DSUNet3d as DSUNet3d
from gmd_ext.apps.mosi.model import DSSentimentNet as DSSentimentNet

__all__ = ["DSUNet3d", "DSSentimentNet"]
