"""``gmd_ext.data.mmsa``: the restricted MMSA feature-pickle loader, re-exported from its home
gmd_ext/apps/mosi/mmsa.py (an import path kept for users)."""
from gmd_ext.apps.mosi.mmsa import (BUDGET_FACTOR as BUDGET_FACTOR, BUDGET_FLOOR as BUDGET_FLOOR,
                                    LABEL_RANGE as LABEL_RANGE, MAX_DEPTH as MAX_DEPTH, MAX_STRING as MAX_STRING,
                                    MODALITIES as MODALITIES, REQUIRED_KEYS as REQUIRED_KEYS, SPLITS as SPLITS,
                                    MMSAFileError as MMSAFileError, load_mmsa as load_mmsa)

__all__ = ["load_mmsa", "MMSAFileError", "SPLITS", "MODALITIES", "REQUIRED_KEYS", "LABEL_RANGE", "BUDGET_FACTOR",
           "BUDGET_FLOOR", "MAX_DEPTH", "MAX_STRING"]
