"""Points where code outside the training loop steps into it, chosen when the rank starts.

The loop calls the hooks at fixed places; the default hooks do nothing. Tests install their own to
reproduce faults that cannot be made from outside a process at an exact step (a NaN loss on one rank,
a node lost right after a checkpoint became whole):

    python -m xlp.pipeline.train.main --run-dir RUN_DIR --hooks tests.train_faults:NAN_LOSS_AT_3_4

`--hooks module:name` names a TrainHooks instance, or a class or function that returns one.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional


class TrainHooks:
    """What the loop lets outside code do. Override what you need."""

    def loss(self, step: int, rank: int, loss: Any) -> Any:
        """The micro-batch loss of `step` on `rank` before backward; returns the loss to use."""
        return loss

    def saved(self, step: int) -> None:
        """Called on every rank once the checkpoint of `step` is whole on disk."""


def load_hooks(spec: Optional[str]) -> TrainHooks:
    """The hooks named by `module:name` (None: the default, which does nothing)."""
    if not spec:
        return TrainHooks()
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--hooks {spec!r}: expected module:name, e.g. tests.train_faults:NAN_LOSS_AT_3_4")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--hooks {spec!r}: {e}") from None
    hooks = obj() if callable(obj) and not isinstance(obj, TrainHooks) else obj
    if not isinstance(hooks, TrainHooks):
        raise ValueError(f"--hooks {spec!r} gives a {type(hooks).__name__}, not a TrainHooks")
    return hooks
