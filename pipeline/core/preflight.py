"""Settings that are valid one by one but cannot work together for the stages a run will run: refused
before the first stage starts (`xlp run`, `xlp submit`), naming the key and a value that works, rather
than after hours of the stages before the one that fails.

Checks that need what a stage writes are made where it is first known: a val split with no
validation row before the train stage's ranks start (xlp.pipeline.data.fit), a vocabulary larger than
the tokenizer sample gives before SentencePiece trains (xlp.pipeline.stages.tokenizer).
"""
from __future__ import annotations

from typing import Iterable

from omegaconf import DictConfig

from xlp.pipeline.core.errors import ConfigError
from xlp.pipeline.core.secrets import redact

# eval.parts that read the val split (perplexity, loss by position, cloze items from val documents)
VAL_PARTS = ("ppl", "long_context", "lm_eval")


def check_run(cfg: DictConfig, stages: Iterable[str]) -> None:
    """Raise ConfigError when the stages `stages` cannot all work with `cfg`."""
    stages = list(stages)
    if "eval" in stages:
        reads_val = [p for p in cfg.eval.parts if p in VAL_PARTS]
        if reads_val and float(cfg.data.val_fraction) == 0.0:
            others = [p for p in cfg.eval.parts if p not in VAL_PARTS]
            drop = f"eval.parts=[{', '.join(others)}]" if others else "no eval stage (--stages tokenizer,shard,train)"
            raise ConfigError(
                f"data.val_fraction=0 makes no val split, and the eval stage's parts {', '.join(reads_val)} read "
                f"it: set data.val_fraction=0.01 (the default), or run {drop}")


def config_notes(cfg: DictConfig) -> list[str]:
    """What a valid config does that its keys alone may not say, for the run's log (`xlp run`) and
    `xlp config`: a value the run does not read because another key takes its place."""
    notes = []
    mixture = list(cfg.data.mixture or {})
    sources = list(cfg.data.sources or [])
    if mixture and sources:
        # inherited (a base config, the default [stdlib]) or given: either way the groups are the corpus
        notes.append(f"data.sources {redact(sources)} is not read: the groups of data.mixture ({', '.join(mixture)}) are "
                     "the corpus. `sources: []` beside the mixture under `data:` (or data.sources=[]) clears it")
    return notes
