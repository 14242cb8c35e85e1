"""xlstm-pipeline's stages, runner, cluster launchers and the `xlp` command.

The verbs that load a trained model (`xlp export`, `xlp generate`) are imported on first use (PEP 562):
every other `xlp` command starts without loading torch.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> (the module of this package that defines it, its name there)
_EXPORTS = {"export_main": ("export", "main"), "generate_main": ("generate", "main")}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
