"""Learning-rate schedules: a pure function of the step, so a resumed run needs no scheduler state.

Step numbers count optimizer steps from 1; steps skipped for non-finite values still count (the
schedule follows the step counter, as in torchtitan and OLMo).
"""
from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, steps: int, schedule: str = "cosine",
          wsd_decay: float = 0.2) -> float:
    """The learning rate of optimizer step `step` (1-based).

    warmup: linear from lr/warmup at step 1 to lr at step `warmup`.
    cosine: then half a cosine from lr down to min_lr at step `steps`.
    wsd:    then constant lr until the last `wsd_decay` fraction of the steps, then linear to min_lr.
    """
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if schedule == "cosine":
        span = max(1, steps - warmup)
        t = min(1.0, max(0.0, (step - warmup) / span))
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "wsd":
        decay_steps = max(1, int(round(wsd_decay * steps)))
        decay_start = max(warmup, steps - decay_steps)
        if step <= decay_start:
            return lr
        t = min(1.0, (step - decay_start) / max(1, steps - decay_start))
        return lr + (min_lr - lr) * t
    raise ValueError(f"unknown schedule {schedule!r}; valid values: cosine, wsd")


def schedule_of(tc) -> "callable":
    """lr_at bound to a TrainConfig."""
    def f(step: int) -> float:
        return lr_at(step, lr=tc.lr, min_lr=tc.min_lr, warmup=tc.warmup, steps=tc.steps,
                     schedule=tc.schedule, wsd_decay=tc.wsd_decay)
    return f
