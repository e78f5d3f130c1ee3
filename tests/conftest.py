"""Shared pytest setup. Without CUDA, Triton kernels run in the interpreter: TRITON_INTERPRET must be
set before anything imports triton (triton.jit picks compiled vs interpreted at decoration time)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
