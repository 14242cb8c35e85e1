"""`wandb.*`: how the train stage (pipeline/train/monitor.py) and the eval stage log to W&B.

A module of its own so the config schema can import it without torch (monitor.py imports torch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class WandbConfig:
    # Read by the train stage at run time, not part of any fingerprint: changing them reruns nothing.
    mode: str = "offline"  # offline | online | disabled
    project: str = "xlstm-pipeline"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    name: Optional[str] = None  # the W&B run's display name (None: run.name)
    notes: Optional[str] = None
    dir: Optional[str] = None  # where the wandb/ folder goes (None: RUN_DIR/train)
