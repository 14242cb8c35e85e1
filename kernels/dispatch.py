"""Pick the implementation of an op: the pure-PyTorch reference or the Triton kernel.

backend "reference" always works; "triton" imports `xlp.kernels.triton.<module>` lazily and calls the
function of the same name and signature (an error says what is missing); "auto" takes Triton for
CUDA tensors when that op exists there, the reference otherwise. The default comes from
`set_default_backend(...)`, else the environment variable XLP_KERNEL_BACKEND, else "auto". The
environment variable is for code that calls the kernels directly (benchmarks, notebooks): pipeline
processes set the default from the `kernels.backend` config key (xlp.kernels.config.KernelsConfig.apply).
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Optional

import torch

import xlp.kernels.reference as reference
from xlp.kernels.config import (BACKENDS, ENV_VAR, _check_name, default_backend,  # noqa: F401  (re-exported)
                               set_default_backend, use_backend)

# op name -> module under kernels/triton/ that holds its Triton version
TRITON_MODULES = {
    "mlstm_parallel": "mlstm",
    "mlstm_chunkwise": "mlstm",
    "mlstm_step": "mlstm",
    "slstm_sequence": "slstm",
    "slstm_step": "slstm",
    "rms_norm": "norms",
    "layer_norm": "norms",
    "linear_cross_entropy": "cross_entropy",
    "decode_linear": "decode",
    "mlstm_decode_mix": "decode",
}

_triton_cache: dict[str, Any] = {}  # op -> callable, or the exception that made it unavailable
_warned: set[str] = set()
# What each op ran with in this process: {(device type, op): {backend}}, backend "triton", "reference" (asked
# for: the default backend, use_backend, backend=...) or "fallback" ("auto" on CUDA without a Triton kernel).
# A run on a GPU that silently computed with the reference ops is only visible here (used_backends).
_used: dict[tuple[str, str], set[str]] = {}



def _load_triton(op: str) -> Any:
    """The Triton function for `op`, or the exception explaining why there is none (cached)."""
    if op not in _triton_cache:
        module = f"xlp.kernels.triton.{TRITON_MODULES[op]}"
        try:
            fn = getattr(importlib.import_module(module), op)
        except (ImportError, AttributeError) as exc:  # no triton installed, module or op not written
            fn = exc
        _triton_cache[op] = fn
    return _triton_cache[op]


def preload_triton() -> None:
    """Import every op's Triton module now (each op's function, or why it has none, is cached).
    torch.compile calls this before tracing: Dynamo does not trace importlib, and a first import
    met while tracing would split every compiled block in two (a graph break)."""
    for op in TRITON_MODULES:
        _load_triton(op)


def _note(device: str, op: str, backend: str) -> bool:
    """Record that `op` ran on `device` with `backend`. Under torch.compile this runs once, while the graph
    is traced (the result is taken as a constant): no guard on the record, so no recompile when it grows."""
    _used.setdefault((device, op), set()).add(backend)
    return True


# What torch.compiler.assume_constant_result(_note) does, without its `import torch._dynamo`: 1.1 CPU-s in
# every process that imports the kernels (a stage task, `xlp generate`), most of which never compile.
# tests/test_kernels_config.py checks that Dynamo still takes the result as a constant.
_note._dynamo_marked_constant = True  # type: ignore[attr-defined]


def used_backends() -> dict[str, dict[str, list[str]]]:
    """{device type: {op: [backends]}}: what each op resolved to in this process so far (compiled code
    counts once, at its trace). Backends: "triton", "reference" (asked for), "fallback" (auto found no
    Triton kernel for CUDA tensors and used the reference)."""
    out: dict[str, dict[str, list[str]]] = {}
    for (device, op), backends in sorted(_used.items()):
        out.setdefault(device, {})[op] = sorted(backends)
    return out


def reset_used_backends() -> None:
    _used.clear()


def resolve(op: str, backend: Optional[str], *tensors: Optional[torch.Tensor]) -> Callable:
    """The callable that runs `op` for these tensors under `backend` (None/"auto" as described above)."""
    if op not in TRITON_MODULES:
        raise KeyError(f"unknown kernel op {op!r}")
    name = _check_name(backend) if backend is not None else default_backend()
    device = next((t.device.type for t in tensors if t is not None), "none")
    if name == "reference":
        _note(device, op, "reference")
        return getattr(reference, op)
    if name == "triton":
        fn = _load_triton(op)
        if isinstance(fn, Exception):
            raise RuntimeError(
                f"kernel backend 'triton' requested for {op}, but xlp.kernels.triton.{TRITON_MODULES[op]}.{op} "
                f"is not available ({type(fn).__name__}: {fn}). Use backend='reference' or 'auto'."
            ) from fn
        _note(device, op, "triton")
        return fn
    # auto
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if on_cuda:
        fn = _load_triton(op)
        if not isinstance(fn, Exception):
            _note("cuda", op, "triton")
            return fn
        if op not in _warned:
            _warned.add(op)
            warnings.warn(f"no Triton kernel for {op} ({fn}); using the reference implementation", stacklevel=3)
        _note("cuda", op, "fallback")
        return getattr(reference, op)
    _note(device, op, "reference")
    return getattr(reference, op)
