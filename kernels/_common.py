"""What every kernel file shares: interpreter detection, autotune configurations, a tile loader, input checks."""

import os

import torch
import triton
import triton.language as tl

# Read once at import, like Triton itself does: the interpreter is chosen when a `@triton.jit` module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def autotune_configs(gpu_configs: list[triton.Config], interpreter_config: triton.Config) -> list[triton.Config]:
    """The GPU search space, or one pinned configuration under the interpreter (which rejects several)."""
    return [interpreter_config] if INTERPRET else gpu_configs


@triton.jit
def load_tile(ptr, rows, cols, stride_r, stride_c, row_mask, col_mask):
    """A rows x cols tile as fp32, zero where masked; 64-bit offsets since N * D can pass 2**31."""
    offsets = rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c
    return tl.load(ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)


def check_device(name: str, tensor: torch.Tensor) -> None:
    """Triton kernels need CUDA memory, unless the interpreter runs them on the CPU."""
    if tensor.is_cuda or (INTERPRET and tensor.device.type == "cpu"):
        return
    hint = "" if tensor.device.type != "cpu" else \
        " (set TRITON_INTERPRET=1 before importing `vq_kernels` to run them on the CPU)"
    raise ValueError(f"{name} is on {tensor.device}; the Triton kernels need a CUDA tensor{hint}")


def check_same_device(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.device != ref.device:
        raise ValueError(f"{name} is on {tensor.device} but {ref_name} is on {ref.device}; they must share a device")


def check_matrix(name: str, tensor: torch.Tensor, *, dtypes=FLOAT_DTYPES, cols: int | None = None) -> None:
    """A non-empty 2-D floating-point tensor, optionally with a given number of columns."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected one of {', '.join(map(str, dtypes))}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)}); it needs at least one row and column")
    if cols is not None and tensor.shape[1] != cols:
        raise ValueError(f"{name} has {tensor.shape[1]} columns, expected {cols} (shape {tuple(tensor.shape)})")


def check_vector(name: str, tensor: torch.Tensor, length: int, dtype: torch.dtype) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(tensor.shape)}")
    if tensor.dtype != dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected {dtype}")


def check_output(name: str, tensor: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """A caller-supplied output buffer: the exact shape and dtype, contiguous, on the inputs' device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} of shape {tuple(shape)}, got {tensor.dtype} {tuple(tensor.shape)}")
    if tensor.device != device or not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous and on {device} (it is on {tensor.device})")


# Under the interpreter, grids sized by the device's SMs get this many programs: enough to exercise several.
INTERPRETED_SMS = 4


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a pretend INTERPRETED_SMS under the interpreter)."""
    if INTERPRET:
        return INTERPRETED_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def shared_memory_limit() -> int:
    """Shared memory one block may use on the current device (opt-in maximum); unbounded under the interpreter."""
    if INTERPRET or not torch.cuda.is_available():
        return 1 << 30
    from triton.runtime import driver  # noqa: PLC0415  (needs a GPU driver)

    return driver.active.utils.get_device_properties(torch.cuda.current_device())["max_shared_mem"]
