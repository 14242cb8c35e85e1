"""Which node this process runs on, and the failures that are the cluster's, not the run's.

A node's name is Slurm's for it (SLURMD_NODENAME, what `sinfo` and `scontrol` show) inside a Slurm job,
else the host name: on a Ray cluster each node is a host. The shard manifest, the train stage's
`nodes` metric and the hang detector's messages all name nodes this way.
"""
from __future__ import annotations

import os
import socket

# `xlp run` exits with this status when a stage failed because of the cluster (a rank's process or
# node lost, a rank hung), not because of the run's code, config or data: running the same command
# again resumes and may succeed. The sbatch script requeues the job on it (sysexits' EX_TEMPFAIL).
EXIT_RETRYABLE = 75


class RetryableFault(RuntimeError):
    """A stage failed because a process, node or link of the cluster failed; a rerun resumes."""


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()
