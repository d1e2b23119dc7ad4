"""The paper's applications, each one folder: BraTS segmentation (`brats`) and CMU-MOSI/MOSEI sentiment (`mosi`):
constants, model, data loaders, offline stand-in data and metrics. Built on gmd_ext.gmd and gmd_ext.ds."""
