"""Checks and launch helpers shared by the Triton launchers (gram, pcgrad_coefficients, combine).

The checks only read metadata (shape, dtype, device), never values, so the fake implementations reuse them and
no launcher synchronises with the device.
"""
import contextlib
import functools
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(op: str, name: str, t: torch.Tensor) -> None:
    """Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (fake/meta tensors pass: no launch)."""
    if t.device.type in ("cuda", "meta") or (t.device.type == "cpu" and interpreting()):
        return
    raise ValueError(f"{op}: {name} must be a cuda tensor (or cpu with TRITON_INTERPRET=1 set before triton is "
                     f"imported), got a {t.device.type} tensor")


def device_guard(t: torch.Tensor):
    """The launch context for tensors on t's device: Triton launches on the current CUDA device, so a cuda:1
    tensor while cuda:0 is current would be read on the wrong device (an illegal memory access)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def check_same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_grads(op: str, G) -> None:
    """G: a 2-D [K, N] float32/float16/bfloat16 tensor, any strides."""
    check_tensor(op, "G", G)
    if G.dim() != 2:
        raise ValueError(f"{op}: G must be a 2-D [K, N] tensor, got shape {tuple(G.shape)}")
    if G.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: G must be float32, float16 or bfloat16, got {G.dtype}")
    check_device(op, "G", G)


def check_float32(op: str, name: str, t, shape: tuple, shape_text: str) -> None:
    check_tensor(op, name, t)
    if t.dtype != torch.float32:
        raise TypeError(f"{op}: {name} must be float32, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape_text} = {list(shape)}, got {list(t.shape)}")


def next_power_of_2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def max_programs(device: torch.device) -> int:
    """How many programs a reduction over N should be split into (queried at launch, never at import).

    On a GPU, 4 programs per SM fill the machine while keeping the fp64 cross-program reduction (and the
    [programs, K, K] partial buffer) small. The interpreter runs programs one after another, so their number
    only sets the partial buffer size there.
    """
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 16
