"""Dynamic Sharing: layers whose weights are shared by all modalities and whose normalisation is modality-specific,
run on the gmd_ext.ops DS kernels. Application models built on them live in gmd_ext.apps."""
from gmd_ext.ds.layers import DSConv, DSGroupNorm, DSLayerNorm, DSLinear, check_present, masked_apply, masked_mean

__all__ = ["DSConv", "DSGroupNorm", "DSLayerNorm", "DSLinear", "check_present", "masked_apply", "masked_mean"]
