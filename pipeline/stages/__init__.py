"""The pipeline's stages, in the order they run. Each stage module declares its own `STAGE` (the
config keys it reads, the stages it needs, its function as an import string); this only lists them.
The stage modules import their heavy dependencies inside `run`, so importing the registry is cheap."""
from __future__ import annotations

from xlp.pipeline.stage import Stage
from xlp.pipeline.stages import eval, shard, tokenizer, train

STAGES: list[Stage] = [tokenizer.STAGE, shard.STAGE, train.STAGE, eval.STAGE]


def stage_names() -> list[str]:
    return [s.name for s in STAGES]
