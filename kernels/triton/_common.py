"""Helpers shared by the Triton kernels: interpreter detection, dtype maps, launch sizes."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(*tensors: torch.Tensor) -> None:
    """CPU tensors only work under the interpreter; say so instead of failing deep inside Triton."""
    for t in tensors:
        if t is not None and t.device.type == "cpu" and not interpreting():
            raise RuntimeError(
                "Triton kernels got CPU tensors; set TRITON_INTERPRET=1 before importing triton "
                "(CPU testing) or use backend='reference'"
            )


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact IEEE products (what the reference computes); half inputs: tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype tensors are fed to the kernels in (float64 is computed in float32)."""
    return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


def pow2_block(n: int, cap: int, floor: int = 16) -> int:
    """Largest power of two <= cap that divides n (n a multiple of `floor`)."""
    b = cap
    while b > floor and n % b:
        b //= 2
    return b


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
