"""Data loaders and offline stand-in data of the applications, by their public names (each lives in
gmd_ext/apps/<app>/). Resolved on first access, so loading one dataset never imports another's dependencies."""
import importlib

_NAMES = {
    "BraTSDataset": ("gmd_ext.apps.brats.data", "BraTSDataset"),
    "phantom": ("gmd_ext.apps.brats.phantom", None),
    "load_mmsa": ("gmd_ext.apps.mosi.mmsa", "load_mmsa"),
    "synthetic_mosi": ("gmd_ext.apps.mosi.synthetic", None),
}
__all__ = list(_NAMES)


def __getattr__(name):
    if name not in _NAMES:
        raise AttributeError(f"module 'gmd_ext.data' has no attribute {name!r}")
    module, attr = _NAMES[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)
