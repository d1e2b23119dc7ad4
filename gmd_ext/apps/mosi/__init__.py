"""CMU-MOSI / MOSEI sentiment: conventions (`constants`), the DS regressor (`model`), the MMSA feature loader
(`mmsa`), the offline synthetic stand-in (`synthetic`) and the MMSA metrics (`metrics`, needs scikit-learn).
Only the model is imported here."""
from gmd_ext.apps.mosi.model import DSSentimentNet

__all__ = ["DSSentimentNet"]
