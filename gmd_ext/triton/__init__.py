"""Triton kernels of the gmd_ext ops, registered as custom ops `gmd_ext::<op>_triton` on import.

Each module has three layers (as Liger-Kernel's): private @triton.jit kernels, pure-tensor launchers that pick
block sizes and check devices, and the torch.library.custom_op registration with its fake. The ops run CUDA
tensors, or CPU tensors when TRITON_INTERPRET=1 is set before triton is imported.
"""
from gmd_ext.triton import combine, gram, pcgrad_coefficients  # noqa: F401
from gmd_ext.triton import modality_group_norm  # noqa: F401
from gmd_ext import ops as _ops

# The projection ops' backward formulas live once, in gmd_ext.ops, for the C++ and the Triton ops alike.
_ops._register_projection_autograd("_triton")
