"""Data loaders and offline stand-in data of the applications, by their public names (each lives in
gmd_ext/apps/<app>/). Resolved on first access, so loading one dataset never imports another's dependencies.

Modules: ``gmd_ext.data.brats`` (BraTS NIfTI loader), ``gmd_ext.data.phantom`` (offline BraTS-like phantoms),
``gmd_ext.data.mmsa`` (MMSA feature pickles), ``gmd_ext.data.synthetic_mosi`` (MMSA-format stand-in data)."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names type checkers see; at run time __getattr__ imports them on first use
    from gmd_ext.data import brats as brats, mmsa as mmsa, phantom as phantom, synthetic_mosi as synthetic_mosi
    from gmd_ext.data.brats import BraTSDataset as BraTSDataset
    from gmd_ext.data.mmsa import load_mmsa as load_mmsa

# name -> (module, attribute or None for the module itself)
_NAMES = {
    "BraTSDataset": ("gmd_ext.data.brats", "BraTSDataset"),
    "load_mmsa": ("gmd_ext.data.mmsa", "load_mmsa"),
    "brats": ("gmd_ext.data.brats", None),
    "phantom": ("gmd_ext.data.phantom", None),
    "mmsa": ("gmd_ext.data.mmsa", None),
    "synthetic_mosi": ("gmd_ext.data.synthetic_mosi", None),
}
__all__ = list(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'gmd_ext.data' has no attribute {name!r}")
    module, attr = _NAMES[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)
