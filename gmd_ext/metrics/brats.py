"""``gmd_ext.metrics.brats``: the BraTS region metrics and label/region conversions, re-exported from their home
gmd_ext/apps/brats/metrics.py (an import path kept for users)."""
from gmd_ext.apps.brats.metrics import (BRATS_HD95_EMPTY_PENALTY_MM, LABELS, REGION_LABELS, REGION_ORDERS, REGIONS,
                                        brats_dice, brats_hd95, labels_to_regions, regions_to_labels)

__all__ = ["LABELS", "REGIONS", "REGION_LABELS", "REGION_ORDERS", "labels_to_regions", "regions_to_labels",
           "brats_dice", "brats_hd95", "BRATS_HD95_EMPTY_PENALTY_MM"]
