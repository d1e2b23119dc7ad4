"""Data: BraTS NIfTI and MMSA feature loaders, the offline phantom and synthetic stand-ins."""
