"""Data: BraTS NIfTI and MMSA feature loaders, the offline phantom and synthetic stand-ins."""
from gmd_ext.data import synthetic_mosi
from gmd_ext.data.mmsa import load_mmsa
from gmd_ext.data import phantom
from gmd_ext.data.brats import BraTSDataset
