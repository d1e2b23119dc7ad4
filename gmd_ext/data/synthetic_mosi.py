"""``gmd_ext.data.synthetic_mosi``: the MMSA-format synthetic MOSI writer, re-exported from its home
gmd_ext/apps/mosi/synthetic.py (an import path kept for users)."""
from gmd_ext.apps.mosi.synthetic import GAINS as GAINS, NUISANCE as NUISANCE, file_size as file_size, make as make

__all__ = ["make", "file_size", "GAINS", "NUISANCE"]
