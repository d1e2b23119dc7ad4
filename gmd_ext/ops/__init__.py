"""The ops layer: typed front of every registered op (torch.ops.gmd_ext.*), its pure-torch references
(`gmd_ext.ops.reference`) and the one registry of fakes and autograd (`gmd_ext.ops._registry`).

Everything above this layer (gmd_ext.gmd, gmd_ext.ds, gmd_ext.apps) calls the ops through these functions.
"""
from gmd_ext.ops import _registry, reference  # noqa: F401  (_registry registers the compiled ops' fakes/autograd)
from gmd_ext.ops.ds_ops import PairPlan, masked_conv, modality_group_norm
from gmd_ext.ops.projection_ops import ROW_ALIGN, combine, combine_rows, gram, padded_rows, pcgrad_coefficients

__all__ = ["gram", "pcgrad_coefficients", "combine", "combine_rows", "padded_rows", "ROW_ALIGN", "PairPlan",
           "masked_conv",
           "modality_group_norm", "reference"]
