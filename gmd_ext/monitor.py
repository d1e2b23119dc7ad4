"""``gmd_ext.monitor``: the dominance monitor (``DominanceMonitor``), re-exported from its home
gmd_ext/gmd/monitor.py — an import path kept for users."""
from gmd_ext.gmd.monitor import DominanceMonitor as DominanceMonitor

__all__ = ["DominanceMonitor"]
