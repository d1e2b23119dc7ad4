"""Dynamic Sharing: layers whose weights are shared by all modalities and whose normalisation is modality-specific,
run on the gmd_ext.ops DS kernels; the pack-once late-fusion execution (gmd_ext.ds.packed) of networks built from
them; and the conversion of any one-modality network to DS (gmd_ext.ds.convert: `dynamic_sharing`). Application
models built on them live in gmd_ext.apps."""
from gmd_ext.ds.convert import DynamicSharing, ModalityNorm, dynamic_sharing
from gmd_ext.ds.layers import DSConv, DSGroupNorm, DSLayerNorm, DSLinear, masked_apply, masked_mean
from gmd_ext.ds.packed import branch_output, fuse, run_branches, run_packed
from gmd_ext.ops.ds_ops import PairPlan, check_present

__all__ = ["DSConv", "DSGroupNorm", "DSLayerNorm", "DSLinear", "DynamicSharing", "ModalityNorm", "PairPlan",
           "branch_output", "check_present", "dynamic_sharing", "fuse", "masked_apply", "masked_mean",
           "run_branches", "run_packed"]
