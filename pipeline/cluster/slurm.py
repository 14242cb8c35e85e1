"""What a Slurm partition can run (from `sinfo`), whether a job's request fits it, and which pending
reasons mean a queued job will never start.

`xlp submit --to slurm` refuses a request that no node of the partition can hold before queueing it
(Slurm would accept some of them and leave them PENDING forever), and `xlp submit --wait` stops at once
on a pending reason from NEVER_STARTS. Every message names the `slurm.*` key to change and a value that
fits. Reasons Slurm 22.05 gives here: more CPUs per task than a node has -> PartitionConfig; more nodes
than the partition has -> PartitionNodeLimit (more memory than a node has, an unknown gres, node name or
feature are refused by sbatch itself).
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Optional, Sequence

from xlp.pipeline.core.schema.slurm import parse_time

# Pending reasons after which the job never starts unless the partition (or the job) is changed, and
# the config key that asked for what the partition cannot give.
NEVER_STARTS = {
    "PartitionConfig": "slurm.cpus_per_task, slurm.gpus_per_node or slurm.extra",
    "PartitionNodeLimit": "slurm.nodes",
    "PartitionTimeLimit": "slurm.time",
    "BadConstraints": "slurm.extra (--constraint)",
    "InvalidAccount": "slurm.account",
    "AccountNotAllowed": "slurm.account",
    "InvalidQOS": "slurm.extra (--qos)",
    "QOSNotAllowed": "slurm.extra (--qos)",
    "DependencyNeverSatisfied": "slurm.extra (--dependency)",
}


# sinfo's short node states (%t) of nodes that run no new job until someone or something brings them back
UNAVAILABLE_STATES = {"down", "drain", "drng", "drained", "fail", "failg", "maint", "unk", "inval", "npc", "pow_dn"}


class SlurmQueryError(RuntimeError):
    """sinfo/scontrol could not answer (no controller, no such partition)."""


@dataclass(frozen=True)
class SlurmNode:
    name: str
    cpus: int
    memory_mb: int
    gpus: int  # the node's gpu gres (0: none)
    state: str


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: tuple[SlurmNode, ...]
    time_limit_s: Optional[int]  # None: unlimited
    max_nodes: Optional[int]  # the largest job, in nodes; None: unlimited

    def __str__(self) -> str:
        return self.name

    def unavailable_nodes(self) -> list[SlurmNode]:
        """Nodes that take no job now (down, drained, failing, not responding: sinfo's `*` suffix)."""
        return [n for n in self.nodes
                if n.state.endswith("*") or n.state.rstrip("~#!%$@^-") in UNAVAILABLE_STATES]


# ---------------------------------------------------------------------------------------------
# Slurm's formats



def format_time(seconds: int) -> str:
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    clock = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


def parse_gpus(gres: str) -> int:
    """GPUs in a node's gres: "gpu:8", "gpu:a100:4(S:0-1),nvme:1" -> 8, 4; "(null)" -> 0."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_memory_mb(text: str) -> Optional[int]:
    """MB of a Slurm memory size ("100G", "512M", "2048" (MB)); None if it is not one."""
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", str(text).strip().upper())
    if not m:
        return None
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2)]
    return int(int(m.group(1)) * scale)


def extra_memory_mb(extra: Sequence[str]) -> Optional[int]:
    """The --mem=SIZE of slurm.extra lines, in MB (None: not given)."""
    for line in extra:
        m = re.search(r"--mem[= ](\S+)", line)
        if m:
            return parse_memory_mb(m.group(1))
    return None


# ---------------------------------------------------------------------------------------------
# Reading the cluster


def _run(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise SlurmQueryError(f"{cmd[0]} failed: {e}") from None
    if proc.returncode != 0:
        raise SlurmQueryError(f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def partitions() -> dict[str, tuple[bool, Optional[int], Optional[int]]]:
    """{name: (is the default, time limit in seconds, largest job in nodes)} of the partitions (hidden ones
    too: slurm.partition may name one)."""
    found: dict[str, tuple[bool, Optional[int], Optional[int]]] = {}
    for line in _run(["sinfo", "-h", "-a", "-o", "%P|%l|%s"]).splitlines():
        name, limit, size = (line.split("|") + ["", ""])[:3]
        if not name:
            continue
        default = name.endswith("*")
        try:
            time_limit = parse_time(limit)
        except ValueError:
            time_limit = None  # "n/a": no limit we can read
        largest = size.rpartition("-")[2]
        found[name.rstrip("*")] = (default, time_limit, int(largest) if largest.isdigit() else None)
    return found


def read_partition(name: Optional[str]) -> Partition:
    """The partition `name` (None: the default one) with its nodes, from sinfo."""
    known = partitions()
    if name is None:
        name = next((n for n, (default, _, _) in known.items() if default), None)
        if name is None:
            raise SlurmQueryError("this cluster has no default partition: set slurm.partition to one of "
                                  + ", ".join(known))
    if name not in known:
        raise SlurmQueryError(f"slurm.partition={name}: no such partition; partitions: {', '.join(known) or 'none'}")
    nodes = {}
    for line in _run(["sinfo", "-h", "-N", "-p", name, "-o", "%N|%c|%m|%G|%t"]).splitlines():
        node, cpus, mem, gres, state = (line.split("|") + [""] * 4)[:5]
        if node:
            nodes[node] = SlurmNode(node, int(cpus or 0), int(mem) if mem.isdigit() else 0, parse_gpus(gres), state)
    _, time_limit, max_nodes = known[name]
    return Partition(name, tuple(nodes.values()), time_limit, max_nodes)


# ---------------------------------------------------------------------------------------------
# Does a request fit?


def request_errors(slurm, partition: Partition) -> list[str]:
    """What in `slurm.*` (a SlurmConfig or its DictConfig) no node of `partition` can give, one message
    per problem, each naming the key and a value that fits."""
    p = partition.name
    nodes = list(partition.nodes)
    if not nodes:
        return [f"partition {p} has no nodes: set slurm.partition to another partition"]
    errors = []
    want_gpus, want_cpus = int(slurm.gpus_per_node), int(slurm.cpus_per_task)
    want_mem = extra_memory_mb(list(slurm.extra))

    fit = [n for n in nodes if n.gpus >= want_gpus]
    gpus_fit = bool(fit)
    if not fit:
        most = max(n.gpus for n in nodes)
        errors.append(f"slurm.gpus_per_node={want_gpus} but the nodes of partition {p} have "
                      + ("no GPUs (gpu gres): set slurm.gpus_per_node=0, or slurm.partition to a partition with GPUs"
                         if most == 0 else f"at most {most} GPUs: set slurm.gpus_per_node={most} (or less)"))
        fit = nodes  # check the rest against every node
    with_cpus = [n for n in fit if n.cpus >= want_cpus]
    if not with_cpus:
        most = max(n.cpus for n in fit)
        errors.append(f"slurm.cpus_per_task={want_cpus} but the nodes of partition {p}"
                      f"{' with enough GPUs' if want_gpus and gpus_fit else ''} have at most {most} CPUs: "
                      f"set slurm.cpus_per_task={most} (or less)")
        with_cpus = fit
    with_mem = [n for n in with_cpus if want_mem is None or n.memory_mb >= want_mem]
    if not with_mem:
        most = max(n.memory_mb for n in with_cpus)
        errors.append(f"slurm.extra asks for --mem={want_mem}M but the nodes of partition {p} have at most "
                      f"{most}M: set --mem={most}M (or less) in slurm.extra")
        with_mem = with_cpus
    if not errors and int(slurm.nodes) > len(with_mem):
        which = (f" with {want_cpus} CPUs" + (f" and {want_gpus} GPUs" if want_gpus else "")) \
            if len(with_mem) < len(nodes) else ""
        errors.append(f"slurm.nodes={slurm.nodes} but partition {p} has {len(with_mem)} node(s){which}: "
                      f"set slurm.nodes={len(with_mem)} (or less)")
    elif partition.max_nodes is not None and int(slurm.nodes) > partition.max_nodes:
        errors.append(f"slurm.nodes={slurm.nodes} but partition {p} takes jobs of at most {partition.max_nodes} "
                      f"node(s): set slurm.nodes={partition.max_nodes} (or less)")
    asked = parse_time(str(slurm.time))
    limit = partition.time_limit_s
    if limit is not None and (asked is None or asked > limit):
        errors.append(f"slurm.time={slurm.time} is longer than partition {p}'s time limit {format_time(limit)}: "
                      f"set slurm.time={format_time(limit)} (or less; a longer run is requeued and resumes)")
    return errors


def never_starts(reason: str, existing_nodes: Sequence[str] = ()) -> Optional[str]:
    """The config key behind a pending `reason` that means the job will never start, else None.
    ReqNodeNotAvail counts only when the nodes it names do not exist (down nodes may come back)."""
    code = reason.split(",")[0].strip()
    if code in NEVER_STARTS:
        return NEVER_STARTS[code]
    if code == "ReqNodeNotAvail" and existing_nodes:
        m = re.search(r"UnavailableNodes:(\S+)", reason)
        missing = [n for n in (m.group(1).split(",") if m else []) if n and n not in existing_nodes]
        if missing:
            return "slurm.extra (--nodelist)"
    return None
