"""Evaluation metrics: BraTS region Dice and the MMSA sentiment metrics."""
