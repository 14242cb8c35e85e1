"""`slurm.*`: how `xlp submit --to slurm` asks for an allocation (xlp.pipeline.cluster.submit)."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Optional

from xlp.pipeline.core.schema.names import check_name, check_no_control

# what Slurm takes as a partition (several: comma-separated) and an account name
PARTITION_RE = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
ACCOUNT_RE = re.compile(r"[A-Za-z0-9_.-]+")


def parse_time(text: str) -> Optional[int]:
    """Seconds of a Slurm time ("60", "1:30:00", "2-00:00:00", "1-12"); None for infinite/UNLIMITED.
    Raises ValueError on anything else."""
    text = str(text).strip()
    if text.lower() in ("infinite", "unlimited", "-1"):
        return None
    m = re.fullmatch(r"(?:([0-9]+)-)?([0-9]+)(?::([0-9]+))?(?::([0-9]+))?", text)
    if not m:
        raise ValueError(f"not a Slurm time: {text!r}")
    days, a, b, c = m.groups()
    if days is not None:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
    elif c is not None:  # hours:minutes:seconds
        hours, minutes, seconds = int(a), int(b), int(c)
    elif b is not None:  # minutes:seconds
        hours, minutes, seconds = 0, int(a), int(b)
    else:  # minutes
        hours, minutes, seconds = 0, int(a), 0
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass
class SlurmConfig:
    """How `xlp submit --to slurm` asks for an allocation (rendered into slurm/pipeline.sbatch)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0  # also the training ranks per node (one per GPU); 0: train.cpu_processes CPU ranks
    cpus_per_task: int = 8  # CPUs per node for the job's one task (Ray, data stages, CPU ranks)
    time: str = "24:00:00"
    job_name: Optional[str] = None  # None: xlp-<run.name>
    requeue: bool = True  # preempted or timed-out jobs go back to the queue and resume
    # times the job puts itself back in the queue after the cluster failed it (a rank's process or
    # node lost, a rank hung: `xlp run` exit status 75); 0: never
    max_requeues: int = 3
    signal_seconds: int = 300  # SIGTERM this long before the time limit, to save a checkpoint
    extra: list[str] = field(default_factory=list)  # more #SBATCH lines, e.g. ["--qos=high"]
    python: Optional[str] = None  # the Python on the nodes (None: the one running xlp submit)
    ray_port: int = 0  # the job's Ray head port; 0: a free one

    def validate(self) -> None:
        for key, least in (("nodes", 1), ("gpus_per_node", 0), ("cpus_per_task", 1), ("signal_seconds", 0),
                           ("ray_port", 0)):
            if getattr(self, key) < least:
                raise ValueError(f"config key `slurm.{key}` is {getattr(self, key)}; must be >= {least}")
        try:
            check_no_control("slurm.time", self.time)
            parse_time(self.time)
        except ValueError:
            raise ValueError(f"config key `slurm.time` is {self.time!r}; use Slurm's format: minutes, "
                             "HH:MM:SS or D-HH:MM:SS (e.g. 24:00:00)") from None
        # Each of these is pasted into an #SBATCH line of the job's script (xlp.pipeline.cluster.submit):
        # only what Slurm accepts there, and never a line break.
        if self.job_name:
            check_name("slurm.job_name", self.job_name, names="the Slurm job", example="slurm.job_name=xlp-tiny")
        for key, pattern, what, listed, example in (
                ("partition", PARTITION_RE, "a Slurm partition (several: comma-separated)", "sinfo -s", "gpu"),
                ("account", ACCOUNT_RE, "a Slurm account", "sacctmgr show assoc user=$USER", "proj123")):
            value = getattr(self, key)
            if value and not pattern.fullmatch(str(value)):
                raise ValueError(f"config key `slurm.{key}` is {value!r}: {what} is letters, digits, '_', '-' and "
                                 f"'.' (`{listed}` lists yours), e.g. slurm.{key}={example}")
        for i, line in enumerate(self.extra):
            key = f"slurm.extra[{i}]"
            check_no_control(key, line)
            option = str(line).removeprefix("#SBATCH").strip()
            try:
                words = shlex.split(option, comments=True)
            except ValueError as e:  # sbatch reads quotes as the shell does, and stops the job at an unmatched one
                raise ValueError(f"config key `{key}` is {line!r}: {e}; close the quote") from None
            if not words or not words[0].startswith("-"):
                raise ValueError(f"config key `{key}` is {line!r}: each slurm.extra item is an sbatch option, "
                                 "e.g. slurm.extra=[--qos=high,--mem=64G]")
        if self.python is not None:
            check_no_control("slurm.python", self.python)
