"""CMU-MOSI / MOSEI conventions, defined once: modality order of the MMSA feature files."""
MODALITIES = ("text", "audio", "vision")
