"""Faults the slow train tests install in the ranks' loop (`launch(..., hooks="train_faults:NAME")`),
for what cannot be made from outside a process at an exact step."""
from __future__ import annotations

import os
import signal
import sys
import time

from xlp.pipeline.train.hooks import TrainHooks


class NanLoss(TrainHooks):
    """Rank 0's loss becomes NaN at these steps (the other ranks' stay finite)."""

    def __init__(self, steps: range):
        self.steps = set(steps)

    def loss(self, step, rank, loss):
        return loss * float("nan") if rank == 0 and step in self.steps else loss


class KillAfterSave(TrainHooks):
    """Every rank SIGKILLs itself once the checkpoint of `step` is whole: a node lost right after a save."""

    def __init__(self, step: int):
        self.step = step

    def saved(self, step):
        if step == self.step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


class StallAfterSave(TrainHooks):
    """Rank `rank` stops making progress once the checkpoint of `step` is whole, alive (its heartbeat
    thread beats on): a rank stuck in its own work, e.g. a call into a hung file system, while its peers
    wait for it in the next step's collective. (A stopped process stops all its threads: this cannot be
    made from outside.)"""

    def __init__(self, step: int, rank: int):
        self.step, self.rank = step, rank

    def saved(self, step):
        if step == self.step and int(os.environ.get("RANK", "0")) == self.rank:
            time.sleep(3600)


class MemoryFullAt(TrainHooks):
    """The rank's address space is capped (RLIMIT_AS, as `ulimit -v` caps it) at what it uses once
    `step`'s forward pass is done: the backward pass then cannot map memory for the activations'
    gradients, a real allocation failure where it happens (torch's CPU allocator raises)."""

    def __init__(self, step: int):
        self.step = step

    def loss(self, step, rank, loss):
        if step == self.step:
            import resource

            status = open("/proc/self/status").read()
            used = int(next(line for line in status.splitlines() if line.startswith("VmSize:")).split()[1]) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (used, resource.getrlimit(resource.RLIMIT_AS)[1]))
            print(f"[hook] capped at {used >> 20} MiB", flush=True)
        return loss


NAN_LOSS_AT_3_4 = NanLoss(range(3, 5))
NAN_LOSS_AT_2_6 = NanLoss(range(2, 7))
KILL_AFTER_SAVE_30 = KillAfterSave(30)
STALL_RANK_1_AFTER_SAVE_10 = StallAfterSave(10, rank=1)
MEMORY_FULL_AT_1 = MemoryFullAt(1)
