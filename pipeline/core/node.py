"""Which node this process runs on, and the failures that are the cluster's, not the run's.

A node's name is Slurm's for it (SLURMD_NODENAME, what `sinfo` and `scontrol` show) inside a Slurm job,
else the host name: on a Ray cluster each node is a host. The shard manifest, the train stage's
`nodes` metric and the hang detector's messages all name nodes this way.
"""
from __future__ import annotations

import os
import socket
from typing import Optional

# `xlp run` exits with this status when a stage failed because of the cluster (a rank's process or
# node lost, a rank hung), not because of the run's code, config or data: running the same command
# again resumes and may succeed. The sbatch script requeues the job on it (sysexits' EX_TEMPFAIL).
EXIT_RETRYABLE = 75


class RetryableFault(RuntimeError):
    """A stage failed because a process, node or link of the cluster failed; a rerun resumes."""


class RayNodeLost(RetryableFault):
    """A stage's Ray task, or a task it waited for, was lost with its node or worker process (Ray's
    NodeDiedError and its kin, see ray_fault): the cluster failed, not the stage."""


def ray_fault(error: BaseException) -> Optional[BaseException]:
    """The exception in `error`'s chain (Ray's wrapped `cause`, `raise ... from`, an error raised while
    handling another) that says Ray lost a node, a worker process, or the objects they held; None when
    the failure is the run's own (its code, config or data), which a rerun would repeat."""
    from ray import exceptions as rx

    # A worker process killed from outside (the OOM killer, Ray's memory monitor, its node lost) counts,
    # as a rank's does (pipeline/cluster/launch.py); an object lost with its node does, one the program
    # freed or deleted does not.
    lost = (rx.NodeDiedError, rx.WorkerCrashedError, rx.LocalRayletDiedError, rx.ObjectLostError,
            rx.OutOfMemoryError)
    programs = (rx.ObjectFreedError, rx.ReferenceCountingAssertionError)
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop()
        if id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        if isinstance(e, lost) and not isinstance(e, programs):
            return e
        todo += [x for x in (getattr(e, "cause", None), e.__cause__, e.__context__) if x is not None]
    return None


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()
