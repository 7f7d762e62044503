"""Where and how inference runs: device choice, precision, host-to-device transfers, GPU memory.

Kept apart from ``inference`` so the rules (which device, which precision, how big a batch
fits, what counts as running out of memory) are small functions that can be tested on a
machine without a GPU, given numbers.
"""

from __future__ import annotations

import gc
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from .errors import NormativeAnomalyError
from .options import DEVICES, PRECISIONS

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Share of the GPU memory usable at the first batch that sized batches may take: the per-slice
# figure is measured on one batch, and convolution workspaces or fragmentation need not scale
# with it. Half leaves room for that; an out-of-memory error still halves the batch.
MEMORY_SHARE = 0.5
# Messages of out-of-memory errors that are plain RuntimeErrors: MPS, and the CPU allocator
# (Windows, or Linux without overcommit). CUDA raises torch.OutOfMemoryError.
_OUT_OF_MEMORY_MESSAGES = ("MPS backend out of memory", "DefaultCPUAllocator: can't allocate memory",
                           "DefaultCPUAllocator: not enough memory")


def select_device(requested: str = "auto") -> torch.device:
    """CUDA, then MPS, then the CPU for "auto"; a forced device that is absent is an error, not a quiet CPU run."""
    if requested not in DEVICES:
        raise NormativeAnomalyError(f"unknown device '{requested}'; use one of {', '.join(DEVICES)}")
    cuda, mps = torch.cuda.is_available(), bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (requested == "cuda" and not cuda) or (requested == "mps" and not mps):
        raise NormativeAnomalyError(f"device '{requested}' was asked for but is not available here; use --device cpu")
    return torch.device(requested)


def device_label(device: torch.device) -> str:
    """The device as a user reads it in a notice."""
    return {"cuda": "GPU (CUDA)", "mps": "GPU (MPS)", "cpu": "CPU"}.get(device.type, device.type)


def resolve_precision(requested: str, device: torch.device) -> str:
    """"auto": bf16 on a CUDA card that has it, else fp16 on a GPU; fp32 on the CPU.

    On the CPU reduced precision is no faster for these networks here, so auto keeps fp32;
    bf16 and fp16 can still be forced there (torch's CPU autocast supports both).
    """
    if requested not in PRECISIONS:
        raise NormativeAnomalyError(f"unknown precision '{requested}'; use one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise NormativeAnomalyError("this GPU has no bf16; use precision fp16 or fp32")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp16" if device.type == "mps" else "fp32"


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Mixed precision for the network's pass (weights stay fp32; autocast picks per operation)."""
    if precision == "fp32" or not torch.amp.is_autocast_available(device.type):
        return nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``; on CUDA through pinned memory, so the copy is asynchronous.

    Pinning costs a page-locked copy on the host: worth it only where a DMA transfer follows.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device (or host) running out of memory, the one failure a smaller batch can fix."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _OUT_OF_MEMORY_MESSAGES)


def release_cached_memory(device: torch.device) -> None:
    """Give the allocator's cached blocks back after an out-of-memory error, before retrying.

    Call it outside the ``except`` block: the traceback keeps the failed batch's tensors alive.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def usable_memory(device: torch.device) -> int:
    """Bytes a CUDA allocation can still get: what torch caches unused, plus what it may still
    reserve, the card's free memory or less if this process was limited
    (``torch.cuda.set_per_process_memory_fraction``, which ``mem_get_info`` does not see)."""
    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    fraction_of = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.8 or so
    fraction = fraction_of(device) if fraction_of is not None else 1.0
    may_reserve = max(min(free, fraction * total - reserved), 0)
    return int(may_reserve + reserved - allocated)


def start_peak_measurement(device: torch.device) -> int:
    """Reset the CUDA peak counter; returns the bytes allocated now (the baseline)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return int(torch.cuda.memory_allocated(device))


def peak_since(device: torch.device, baseline: int) -> int:
    """Peak bytes allocated above ``baseline`` since :func:`start_peak_measurement`."""
    torch.cuda.synchronize(device)
    return max(int(torch.cuda.max_memory_allocated(device)) - baseline, 0)


def batch_size_from_memory(usable_bytes: int, per_slice_bytes: float, limit: int, share: float = MEMORY_SHARE) -> int:
    """Slices per batch that fit in ``share`` of ``usable_bytes`` at ``per_slice_bytes`` each, in [1, limit].

    ``per_slice_bytes`` is the measured peak of one batch divided by its slices (activations
    grow with the batch; the weights are already allocated and not counted). ``limit`` is the
    number of slices left: a larger batch gains nothing.
    """
    limit = max(int(limit), 1)
    if per_slice_bytes <= 0:
        return limit
    return max(1, min(limit, int(usable_bytes * share // per_slice_bytes)))
