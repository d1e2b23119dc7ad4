"""Triton kernels of the gmd_ext ops: private @triton.jit kernels and pure-tensor launchers, one module per op.

This package imports nothing from the rest of gmd_ext but its own `_utils`; gmd_ext/ops/_registry.py registers
the launchers as the custom ops `gmd_ext::<op>_triton`. The kernels run CUDA tensors, or CPU tensors when
TRITON_INTERPRET=1 is set before triton is imported.
"""
from gmd_ext.triton import combine, gram, modality_group_norm, pcgrad_coefficients  # noqa: F401
