"""The GMD engine: the projection (`project_conflicts`, `gram`), the training-loop engine (`GMD`) composed of a
gradient source, a communicator and an aggregator (docs/design.md §8, docs/engine.md), the objectives (`subsets`)
and the dominance monitor. Built on gmd_ext.ops."""
from gmd_ext.gmd.aggregators import GMDProjection, GramianWeighting
from gmd_ext.gmd.comm import AllReduce, Local, ReduceScatter
from gmd_ext.gmd.engine import GMD
from gmd_ext.gmd.fsdp import FSDP2
from gmd_ext.gmd.info import StepInfo
from gmd_ext.gmd.projection import ProjectionInfo, gram, project_conflicts
from gmd_ext.gmd.sources import Auto, Batched, Branches, LowMemory, Sequential
from gmd_ext.gmd.subsets import Subset, sample_subsets, subset_losses, subsets

__all__ = ["GMD", "ProjectionInfo", "StepInfo", "gram", "project_conflicts", "Subset", "sample_subsets",
           "subset_losses", "subsets", "GMDProjection", "GramianWeighting", "Auto", "Sequential", "Batched",
           "Branches", "LowMemory", "Local", "AllReduce", "ReduceScatter", "FSDP2"]
