"""The numerical ops the models call, one public function per op.

Each op takes `backend=None | "auto" | "reference" | "triton"`; None means the default backend
(`set_default_backend(...)`, else the environment variable XLP_KERNEL_BACKEND, else "auto").
"auto" runs the Triton kernel for CUDA tensors where one exists and the pure-PyTorch reference
otherwise (see kernels/dispatch.py). Shapes follow the xLSTM literature; gates are pre-activations.

mLSTM state conventions (every backend): state = (C (B, NH, DQK, DV), n (B, NH, DQK), m (B, NH)),
float32 (float64 for float64 inputs); C, n accumulate the keys already scaled by DQK^-1/2;
`initial_state=None` is the empty memory C = 0, n = 0, m = -inf. `doc_starts` is a bool mask (B, S),
True where a token begins a new document (the memory is cleared before it), or cumulative sequence
lengths cu_seqlens (N+1,) of N documents packed into one row (B = 1).
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BACKENDS",
    "MLSTMState",
    "SLSTMState",
    "decode_linear",
    "default_backend",
    "doc_starts_mask",
    "layer_norm",
    "linear_cross_entropy",
    "mlstm_chunkwise",
    "mlstm_decode_mix",
    "mlstm_parallel",
    "mlstm_step",
    "rms_norm",
    "set_default_backend",
    "slstm_sequence",
    "slstm_step",
    "use_backend",
]


def __getattr__(name: str) -> Any:
    """The ops, imported on first use (PEP 562): `xlp.kernels.config`, the torch-free settings, loads
    without torch, so a pipeline config is checked on machines that have none."""
    if name in __all__:
        value = getattr(importlib.import_module("xlp.kernels.ops"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
