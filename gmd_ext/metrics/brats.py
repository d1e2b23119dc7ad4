"""``gmd_ext.metrics.brats``: the BraTS region metrics and label/region conversions, re-exported from their home
gmd_ext/apps/brats/metrics.py (an import path kept for users)."""
from gmd_ext.apps.brats.metrics import (BRATS_HD95_EMPTY_PENALTY_MM as BRATS_HD95_EMPTY_PENALTY_MM,
                                        LABELS as LABELS, REGION_LABELS as REGION_LABELS,
                                        REGION_ORDERS as REGION_ORDERS, REGIONS as REGIONS,
                                        HD95Definition as HD95Definition, RegionOrder as RegionOrder,
                                        Spacing as Spacing, Volume as Volume, brats_dice as brats_dice,
                                        brats_hd95 as brats_hd95, labels_to_regions as labels_to_regions,
                                        regions_to_labels as regions_to_labels)

__all__ = ["LABELS", "REGIONS", "REGION_LABELS", "REGION_ORDERS", "labels_to_regions", "regions_to_labels",
           "brats_dice", "brats_hd95", "BRATS_HD95_EMPTY_PENALTY_MM", "Volume", "RegionOrder", "HD95Definition",
           "Spacing"]
