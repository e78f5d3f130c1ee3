"""Shared plumbing for the kernels: dispatch, chunk sizing, input checks, launching.

Dispatch rule (read at call time): CUDA tensors run the Triton kernels; CPU tensors run the chunked
PyTorch reference (lpkernels/reference.py) unless the environment has TRITON_INTERPRET=1, in which case
the Triton kernels run on CPU under the interpreter.
"""
import os

import torch
import triton

# Chunking: the only (rows, V) buffer lives here. On a GPU it holds at most MAX_CHUNK_ROWS rows and
# MAX_CHUNK_BYTES bytes (4096 rows = 250 MiB at V=32000 bf16; 2048 rows = 501 MiB at V=128256).
# Fewer, larger chunks mean fewer read-modify-writes of grad_weight (V, d) in the backward.
MAX_CHUNK_ROWS = 4096
MAX_CHUNK_BYTES = 512 * 2**20
CPU_CHUNK_BYTES = 64 * 2**20   # the reference path also holds a few fp32 temporaries per chunk
INTERPRET_BLOCK_V = 256        # small vocab block under the interpreter, so tests cross block edges


class KernelInputError(ValueError):
    """Bad arguments to a lpkernels/ op; the message names the op and what was expected."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or interpreting()


def block_v(V: int) -> int:
    if interpreting():
        return min(INTERPRET_BLOCK_V, triton.next_power_of_2(V))
    return min(4096, triton.next_power_of_2(V))


try:  # the interpreter's kernel class (triton.jit returns one when TRITON_INTERPRET=1 at definition)
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - other Triton layouts
    InterpretedFunction = ()


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs). triton.jit picks compiled vs interpreted when the kernel is
    defined, so TRITON_INTERPRET=1 only takes effect if it was set before triton was imported."""
    interpreted = isinstance(kernel, InterpretedFunction)
    if interpreted:
        kwargs.pop("num_warps", None)
    elif not any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
        raise RuntimeError("kernels: TRITON_INTERPRET=1 must be set before triton is first imported to run "
                           "the Triton kernels on CPU tensors (tests/conftest.py does this); set it to 0 "
                           "for the PyTorch reference path")
    kernel[grid](*args, **kwargs)


def kernels_interpreted() -> bool:
    """True when the Triton kernels were defined in interpreter mode (they then run on CPU tensors)."""
    from .logprob import _lse_logp_kernel
    return isinstance(_lse_logp_kernel, InterpretedFunction)


def chunk_rows(N: int, V: int, dtype: torch.dtype, device: torch.device, rows=None) -> int:
    """Rows per chunk: balanced so that ceil(N / rows) chunks of (rows, V) fit the byte budget."""
    if rows is not None:
        if int(rows) < 1:
            raise KernelInputError(f"kernels: chunk_rows must be >= 1, got {rows}")
        return int(rows)
    budget = MAX_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    elt = torch.empty((), dtype=dtype).element_size()
    max_rows = max(16, min(MAX_CHUNK_ROWS, budget // max(1, V * elt)))
    n_chunks = max(1, -(-N // max_rows))
    rows = -(-N // n_chunks)
    if rows > 64:  # round up to a multiple of 64 for the matmuls, never above the budget
        rows = min(max_rows, -(-rows // 64) * 64, N)
    return max(1, rows)


def check_inputs(op: str, hidden, weight, targets, ignore_index):
    """Validate and flatten: returns (hidden (N, d), targets (N,) int64 contiguous)."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor) \
            or not isinstance(targets, torch.Tensor):
        raise KernelInputError(f"{op}: hidden, weight and targets must be tensors")
    if weight.dim() != 2:
        raise KernelInputError(f"{op}: weight must be (V, d), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise KernelInputError(f"{op}: hidden must be (N, d) with d = weight.shape[1] = {weight.shape[1]}, "
                               f"got hidden shape {tuple(hidden.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise KernelInputError(f"{op}: targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                               f"got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise KernelInputError(f"{op}: targets must be an integer tensor, got {targets.dtype}")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise KernelInputError(f"{op}: hidden and weight must share one dtype among float32/bfloat16/float16, "
                               f"got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise KernelInputError(f"{op}: hidden, weight and targets must be on one device, got "
                               f"{hidden.device}, {weight.device}, {targets.device}")
    V = weight.shape[0]
    if V < 1:
        raise KernelInputError(f"{op}: weight has no rows (V = 0)")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(torch.int64).contiguous()
    if t.numel() and bool((((t < 0) | (t >= V)) & (t != ignore_index)).any()):
        bad = t[((t < 0) | (t >= V)) & (t != ignore_index)][0].item()
        raise KernelInputError(f"{op}: targets must lie in [0, {V}) or equal ignore_index={ignore_index}, "
                               f"found {bad}")
    return h, t
