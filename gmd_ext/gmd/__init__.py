"""The GMD engine: the projection (`project_conflicts`, `gram`), the training-loop engine (`GMD`), the objectives
(`subsets`) and the dominance monitor. Built on gmd_ext.ops."""
from gmd_ext.gmd.engine import GMD
from gmd_ext.gmd.projection import ProjectionInfo, gram, project_conflicts
from gmd_ext.gmd.subsets import Subset, sample_subsets, subset_losses, subsets

__all__ = ["GMD", "ProjectionInfo", "gram", "project_conflicts", "Subset", "sample_subsets", "subset_losses",
           "subsets"]
