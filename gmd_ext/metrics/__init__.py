"""Evaluation metrics of the applications, by their public names (each lives in gmd_ext/apps/<app>/metrics.py):
BraTS region Dice and HD95, and the MMSA sentiment metrics. Resolved on first access, so BraTS code never imports
scikit-learn. ``gmd_ext.metrics.brats`` is the BraTS metrics module itself."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names type checkers see; at run time __getattr__ imports them on first use
    from gmd_ext.apps.brats.metrics import brats_dice as brats_dice, brats_hd95 as brats_hd95
    from gmd_ext.apps.mosi.metrics import sentiment_metrics as sentiment_metrics

_NAMES = {
    "brats_dice": "gmd_ext.apps.brats.metrics",
    "brats_hd95": "gmd_ext.apps.brats.metrics",
    "sentiment_metrics": "gmd_ext.apps.mosi.metrics",
}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'gmd_ext.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(_NAMES[name]), name)
