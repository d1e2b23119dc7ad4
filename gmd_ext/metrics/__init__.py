"""Evaluation metrics: BraTS region Dice and the MMSA sentiment metrics."""
from gmd_ext.metrics.brats import brats_dice
from gmd_ext.metrics.sentiment import sentiment_metrics
