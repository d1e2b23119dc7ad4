"""``gmd_ext.data.phantom``: the offline BraTS-like phantom writer, re-exported from its home
gmd_ext/apps/brats/phantom.py (an import path kept for users)."""
from gmd_ext.apps.brats.phantom import NOTICE_FILE as NOTICE_FILE, case_name as case_name, make_cases as make_cases

__all__ = ["make_cases", "NOTICE_FILE", "case_name"]
