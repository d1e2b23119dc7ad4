"""``gmd_ext.data.brats``: the BraTS NIfTI loader, re-exported from its home gmd_ext/apps/brats/data.py (an import
path kept for users)."""
from gmd_ext.apps.brats.data import (LAYOUTS as LAYOUTS, MODALITIES as MODALITIES, BraTSDataError as BraTSDataError,
                                     BraTSDataset as BraTSDataset, Case as Case, case_spacing as case_spacing,
                                     find_cases as find_cases, load_case as load_case, make_splits as make_splits,
                                     preprocess as preprocess)

__all__ = ["MODALITIES", "LAYOUTS", "BraTSDataError", "BraTSDataset", "Case", "find_cases", "make_splits",
           "load_case", "preprocess", "case_spacing"]
