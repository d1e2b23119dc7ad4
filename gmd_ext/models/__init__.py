"""Dynamic Sharing models: DSUNet3d (BraTS) and DSSentimentNet (MOSI/MOSEI)."""
from gmd_ext.models.sentiment import DSSentimentNet
from gmd_ext.models.unet3d import DSUNet3d

__all__ = ["DSSentimentNet", "DSUNet3d"]
