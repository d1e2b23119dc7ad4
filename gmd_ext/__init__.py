"""gmd-ext: fast Gradient-guided Modality Decoupling (GMD) and Dynamic Sharing (DS) for PyTorch.

Layers, each importing only those below it (docs/design.md):
  gmd_ext.ops     typed front of the registered ops, their pure-torch references, one registry of fakes/autograd
  gmd_ext.triton  Triton kernels and launchers (imports nothing else from gmd_ext)
  gmd_ext.gmd     the GMD projection, engine, subsets and dominance monitor
  gmd_ext.ds      Dynamic Sharing layers
  gmd_ext.apps    BraTS and MOSI applications: models, loaders, offline data, metrics
Importing this package loads the compiled ops when they are built and never touches a GPU.
"""
from gmd_ext import _backend, ops
from gmd_ext.apps.brats import DSUNet3d
from gmd_ext.apps.mosi import DSSentimentNet
from gmd_ext.ds import DSConv, DSGroupNorm, DSLayerNorm, DSLinear, dynamic_sharing, masked_mean
from gmd_ext.gmd import GMD, gram, project_conflicts, sample_subsets, subset_losses, subsets
from gmd_ext import monitor  # gmd_ext/monitor.py: the public path of gmd_ext.gmd.monitor
from gmd_ext.ops import masked_conv, modality_group_norm
from gmd_ext.ops.ds_ops import declare_modality_dim

__version__ = "0.1.0"

# The public names; subpackages (gmd_ext.data, gmd_ext.metrics, gmd_ext.testing, gmd_ext.info) are imported by name.
__all__ = [
    "project_conflicts", "gram", "GMD", "subsets", "sample_subsets", "subset_losses", "declare_modality_dim",
    "monitor",
    "masked_conv", "modality_group_norm", "DSConv", "DSGroupNorm", "DSLinear", "DSLayerNorm", "masked_mean",
    "dynamic_sharing",
    "DSUNet3d", "DSSentimentNet", "ops", "__version__",
]
