"""gmd-ext: fast Gradient-guided Modality Decoupling (GMD) and Dynamic Sharing (DS) for PyTorch.

Importing this package loads the compiled ops when they are built and never touches a GPU.
"""
from gmd_ext import _backend
from gmd_ext import ops
from gmd_ext.projection import gram, project_conflicts
from gmd_ext.engine import GMD
from gmd_ext.subsets import subsets, sample_subsets
from gmd_ext import monitor
from gmd_ext.ds_ops import masked_conv, modality_group_norm
from gmd_ext.ds import DSConv, DSGroupNorm, DSLinear, DSLayerNorm, masked_mean
from gmd_ext.models import DSUNet3d, DSSentimentNet

__version__ = "0.1.0"
