"""The xLSTM family (NeurIPS xLSTM[a:b], xLSTM-large) and a Llama-style baseline, in PyTorch.

The names below are imported on first use (PEP 562), so that `xlp.xlstm_model.config` (the model's
config, no torch) loads alone: the pipeline checks configs on machines without torch's start-up cost."""
from __future__ import annotations

import importlib
from typing import Any

# public name -> the module of this package that defines it
_EXPORTS = {
    "ActivationBytes": "counts",
    "ModelConfig": "config",
    "count_params": "counts",
    "flops_per_token": "counts",
    "load_config": "io",
    "load_model": "io",
    "save_model": "io",
    "LanguageModel": "lm",
    "build_model": "lm",
    "sample": "lm",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
