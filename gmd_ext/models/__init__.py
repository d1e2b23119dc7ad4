"""Dynamic Sharing models: DSUNet3d (BraTS) and DSSentimentNet (MOSI/MOSEI)."""
