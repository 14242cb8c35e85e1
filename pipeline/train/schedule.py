"""Learning-rate schedules: a pure function of the step, so a resumed run needs no scheduler state.

Step numbers count optimizer steps from 1; steps skipped for non-finite values still count (the
schedule follows the step counter, as in torchtitan and OLMo).
"""
from __future__ import annotations

import math
from typing import Optional


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, steps: int, schedule: str = "cosine",
          wsd_decay: float = 0.2, exp_decay_steps: Optional[int] = None) -> float:
    """The learning rate of optimizer step `step` (1-based).

    warmup: linear from lr/warmup at step 1 to lr at step `warmup`.
    cosine: then half a cosine from lr down to min_lr at step `steps`.
    wsd:    then constant lr until the last `wsd_decay` fraction of the steps, then linear to min_lr.
    exp:    then lr * (min_lr / lr) ** ((step - warmup) / exp_decay_steps) (min_lr after exp_decay_steps,
            and on down at that rate) until the last `wsd_decay` fraction of the steps, then linear to 0.
            xLSTM 7B (Beck et al. 2025, ../shared/reference/xlstm-papers.md): 3,000 warmup steps, 0.1x the
            peak at step 500k, a 7,000-step linear cooldown at the end of 550k. exp_decay_steps None:
            min_lr is reached where the cooldown starts.
    """
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if schedule == "exp":
        cool = wsd_decay_start(steps=steps, warmup=warmup, wsd_decay=wsd_decay)
        span = exp_decay_steps or max(1, cool - warmup)

        def exponential(at: int) -> float:
            return lr * (min_lr / lr) ** (max(0, at - warmup) / span)

        if step <= cool:
            return exponential(step)
        return exponential(cool) * max(0.0, 1.0 - (step - cool) / max(1, steps - cool))
    if schedule == "cosine":
        span = max(1, steps - warmup)
        t = min(1.0, max(0.0, (step - warmup) / span))
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "wsd":
        decay_start = wsd_decay_start(steps=steps, warmup=warmup, wsd_decay=wsd_decay)
        if step <= decay_start:
            return lr
        t = min(1.0, (step - decay_start) / max(1, steps - decay_start))
        return lr + (min_lr - lr) * t
    raise ValueError(f"unknown schedule {schedule!r}; valid values: cosine, wsd, exp")


def wsd_decay_start(*, steps: int, warmup: int, wsd_decay: float) -> int:
    """The last step of WSD's constant phase: the schedule of any longer run agrees up to here."""
    return max(warmup, steps - max(1, int(round(wsd_decay * steps))))


def continuation_note(*, at: int, old_steps: int, old_schedule: str, old_warmup: int, old_wsd_decay: float,
                      new_steps: int, old_exp_decay_steps: Optional[int] = None) -> str:
    """What continuing a run of `old_steps` from its checkpoint at step `at` with `new_steps` means for
    the learning rate (from `at` on it follows the new length, as Megatron does)."""
    if new_steps == old_steps:
        return ""
    # exp with a fixed rate is, like WSD, the same curve for any length until its final decay
    if old_schedule == "wsd" or (old_schedule == "exp" and old_exp_decay_steps):
        name = "WSD" if old_schedule == "wsd" else "exp schedule's"
        start = wsd_decay_start(steps=old_steps, warmup=old_warmup, wsd_decay=old_wsd_decay)
        if at <= start:
            return (f"the checkpoint (step {at}) precedes the {old_steps}-step run's {name} decay (from step {start + 1}): "
                    f"the continuation is exactly the run configured with train.steps={new_steps} from the start")
        return (f"the checkpoint (step {at}) lies inside the {old_steps}-step run's {name} decay (from step {start + 1}): "
                f"the continuation starts from a decayed model; to continue from before the decay, rerun with "
                f"train.resume_from_step=<a checkpoint step <= {start}>")
    return (f"the {old_steps}-step run's {old_schedule} schedule already depended on its length: from step {at} "
            f"the learning rate follows train.steps={new_steps}, so this is not the run configured with it "
            f"from the start")


def schedule_of(tc) -> "callable":
    """lr_at bound to a TrainConfig."""
    def f(step: int) -> float:
        return lr_at(step, lr=tc.lr, min_lr=tc.min_lr, warmup=tc.warmup, steps=tc.steps,
                     schedule=tc.schedule, wsd_decay=tc.wsd_decay, exp_decay_steps=tc.exp_decay_steps)
    return f
