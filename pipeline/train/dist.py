"""Who am I in the job: rank, world size, local rank, from whichever launcher started us.

Launchers and what they set:
  our stage launcher, torchrun, `deepspeed`, Ray Train: RANK, WORLD_SIZE, LOCAL_RANK (+ LOCAL_WORLD_SIZE
      or LOCAL_SIZE), MASTER_ADDR, MASTER_PORT
  srun (Slurm):  SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE, SLURM_JOB_NODELIST
  mpirun (Open MPI): OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK/_SIZE
  nothing: a single process, rank 0 of 1.
`setup_env()` normalises all of them into the torch.distributed variables, plus LOCAL_SIZE (DeepSpeed's
CPU accelerator counts its devices from it, else from NUMA nodes).
"""
from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    launcher: str  # env | slurm | mpi | single


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_first_host() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # "node[01-04],other" -> "node01" without scontrol
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, _, rest = head.partition("[")
        head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head or "127.0.0.1"


def _slurm_tasks_per_node() -> int:
    # "4" or "4(x2)" or "4(x2),3"
    value = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_NTASKS_PER_NODE") or ""
    try:
        return int(value.split("(")[0].split(",")[0])
    except ValueError:
        return int(os.environ.get("SLURM_NTASKS", "1"))


def detect() -> DistEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        local_size = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world)
        return DistEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)), local_size, "env")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       _slurm_tasks_per_node(), "slurm")
    if "OMPI_COMM_WORLD_RANK" in env:
        return DistEnv(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                       int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                       int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", env["OMPI_COMM_WORLD_SIZE"])), "mpi")
    return DistEnv(0, 1, 0, 1, "single")


def setup_env() -> DistEnv:
    """Detect the launcher and export RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE, MASTER_ADDR/PORT."""
    d = detect()
    env = os.environ
    env["RANK"], env["WORLD_SIZE"] = str(d.rank), str(d.world_size)
    env["LOCAL_RANK"], env["LOCAL_SIZE"] = str(d.local_rank), str(d.local_size)
    env.setdefault("LOCAL_WORLD_SIZE", str(d.local_size))
    if d.launcher == "slurm":
        env.setdefault("MASTER_ADDR", _slurm_first_host())
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    elif d.launcher == "single":
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    elif ("MASTER_ADDR" not in env or "MASTER_PORT" not in env) and not _group_started():
        raise RuntimeError(f"{d.launcher} launcher set RANK/WORLD_SIZE but not MASTER_ADDR and MASTER_PORT")
    return d


def _group_started() -> bool:
    """The launcher (e.g. Ray Train) already started the torch.distributed process group."""
    try:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()
    except ImportError:
        return False


def use_cuda(device: str = "auto") -> bool:
    """GPUs unless `train.device` is cpu (or there are none)."""
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op on CPU.

    DeepSpeed's torch comm backend builds `deepspeed_shm_comm` (a C++ extension, ~1.5 minutes on two
    cores; torch caches it under $TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions/py3X_cpu)
    when it is created, but only `inference_all_reduce` uses it; training collectives go through
    torch.distributed (gloo). Set XLP_DS_SHM_COMM=1 to build and use it anyway.
    """
    if os.environ.get("XLP_DS_SHM_COMM", "0") == "1":
        return
    import deepspeed.comm.torch  # noqa: F401  (the attribute on deepspeed.comm is shadowed by torch)

    module = sys.modules["deepspeed.comm.torch"]
    if hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


def import_muon_without_compile() -> None:
    """Import DeepSpeed's Muon optimizer module with torch.compile as a no-op decorator.

    deepspeed.initialize imports it (to check whether the optimizer is one ZeRO supports) and its
    functions are decorated with torch.compile, which imports TorchInductor: ~5 s per rank on a
    small CPU, for an optimizer we never use. Importing it first with compile stubbed out skips that.
    """
    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name in sys.modules or os.environ.get("XLP_DS_MUON_COMPILE", "0") == "1":
        return

    import torch

    real = torch.compile

    def no_compile(model=None, **kwargs):  # noqa: ARG001
        return model if model is not None else (lambda fn: fn)

    torch.compile = no_compile
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    finally:
        torch.compile = real


@dataclass(frozen=True)
class Grid:
    """Where a rank sits in world = data-parallel groups x train.sequence_parallel: consecutive ranks
    form a sequence-parallel group (one node holds a group where the launcher puts consecutive ranks
    on one node), and share each row of their data-parallel rank's batch."""

    dp_rank: int
    dp_size: int
    sp_rank: int
    sp_size: int


def grid(rank: int, world_size: int, sequence_parallel: int, seq_len: int) -> Grid:
    """The rank's place in the grid; ValueError naming train.sequence_parallel when it does not divide
    the world or data.seq_len."""
    sp = int(sequence_parallel)
    if sp < 1:
        raise ValueError(f"train.sequence_parallel={sp}: must be >= 1")
    if world_size % sp:
        raise ValueError(f"train.sequence_parallel={sp} does not divide the {world_size} rank(s): the world is "
                         f"data-parallel groups x sequence_parallel; use a divisor of {world_size}, or "
                         f"{sp} x k ranks (train.cpu_processes or GPUs)")
    if seq_len % sp:
        raise ValueError(f"train.sequence_parallel={sp} does not divide data.seq_len={seq_len}: every rank of a "
                         f"group holds seq_len / sequence_parallel tokens of each row; use a data.seq_len "
                         f"divisible by {sp}")
    return Grid(dp_rank=rank // sp, dp_size=world_size // sp, sp_rank=rank % sp, sp_size=sp)
