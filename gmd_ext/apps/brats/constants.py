"""BraTS conventions, defined once: modality order (the file suffixes), labels and the evaluated regions.

Labels: 0 background, 1 necrotic / non-enhancing tumour core (NCR/NET), 2 peritumoral edema (ED),
4 enhancing tumour (ET). Regions: WT (whole tumour) = {1, 2, 4}, TC (tumour core) = {1, 4},
ET (enhancing tumour) = {4}. Region tensors stack the regions in REGIONS order; REGION_ORDERS names the other
order in use: MONAI's ConvertToMultiChannelBasedOnBratsClasses gives (TC, WT, ET).
"""
MODALITIES = ("flair", "t1", "t1ce", "t2")
LABELS = (0, 1, 2, 4)
REGIONS = ("WT", "TC", "ET")
REGION_LABELS = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
REGION_ORDERS = {"brats": ("WT", "TC", "ET"), "monai": ("TC", "WT", "ET")}
