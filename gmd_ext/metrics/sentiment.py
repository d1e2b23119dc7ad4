"""``gmd_ext.metrics.sentiment``: the MMSA sentiment metrics, re-exported from their home
gmd_ext/apps/mosi/metrics.py (an import path kept for users)."""
from gmd_ext.apps.mosi.metrics import (LOWER_IS_BETTER as LOWER_IS_BETTER, METRIC_NAMES as METRIC_NAMES,
                                       sentiment_metrics as sentiment_metrics)

__all__ = ["sentiment_metrics", "METRIC_NAMES", "LOWER_IS_BETTER"]
