"""Evaluation metrics of the applications, by their public names (each lives in gmd_ext/apps/<app>/metrics.py):
BraTS region Dice and HD95, and the MMSA sentiment metrics. Resolved on first access, so BraTS code never imports
scikit-learn. Modules: ``gmd_ext.metrics.brats``, ``gmd_ext.metrics.sentiment``."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names type checkers see; at run time __getattr__ imports them on first use
    from gmd_ext.metrics import brats as brats, sentiment as sentiment
    from gmd_ext.metrics.brats import brats_dice as brats_dice, brats_hd95 as brats_hd95
    from gmd_ext.metrics.sentiment import sentiment_metrics as sentiment_metrics

# name -> (module, attribute or None for the module itself)
_NAMES = {
    "brats_dice": ("gmd_ext.metrics.brats", "brats_dice"),
    "brats_hd95": ("gmd_ext.metrics.brats", "brats_hd95"),
    "sentiment_metrics": ("gmd_ext.metrics.sentiment", "sentiment_metrics"),
    "brats": ("gmd_ext.metrics.brats", None),
    "sentiment": ("gmd_ext.metrics.sentiment", None),
}
__all__ = list(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'gmd_ext.metrics' has no attribute {name!r}")
    module, attr = _NAMES[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)
