"""Evaluation metrics of the applications, by their public names (each lives in gmd_ext/apps/<app>/metrics.py):
BraTS region Dice and the MMSA sentiment metrics. Resolved on first access, so BraTS code never imports
scikit-learn."""
import importlib

_NAMES = {
    "brats_dice": "gmd_ext.apps.brats.metrics",
    "sentiment_metrics": "gmd_ext.apps.mosi.metrics",
}
__all__ = list(_NAMES)


def __getattr__(name):
    if name not in _NAMES:
        raise AttributeError(f"module 'gmd_ext.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(_NAMES[name]), name)
