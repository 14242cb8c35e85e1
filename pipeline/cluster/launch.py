"""Start the training ranks and watch them: as processes on this machine, with `srun` inside a Slurm
allocation, or as Ray Train workers on a Ray cluster (`train.launcher`: auto | local | slurm | ray;
auto is local, and `xlp submit` sets slurm or ray in the config it sends).

One rank per GPU, or `train.cpu_processes` gloo ranks when there is none (or `train.device=cpu`);
with srun that is per node of the allocation, with Ray Train one per GPU of the cluster. The launcher
passes its choices to the ranks as config overrides (`train.device=cpu`), never through the environment.

Every launcher starts a `Ranks` and hands it to `supervise()`, which is the same for all three: rank
0's log (RUN_DIR/train/logs/rank_0.log) streams to our stdout; SIGTERM or SIGINT here asks the ranks
to save a checkpoint and exit (TrainInterrupted), and after `grace_s` they are killed; a rank that
fails fails the launch (TrainFailed) with its log tail, and the others are ended. Locally the ranks
also get SIGTERM if this process dies (PR_SET_PDEATHSIG); under srun the srun step does.

`supervise()` also watches the ranks' heartbeats (xlp.pipeline.train.heartbeat) when `train.hang_timeout`
is set: a rank silent that long (stopped, or its node lost), or every rank without progress that long
once training has begun (stuck in a collective), ends the ranks and fails the launch with RanksLost,
naming the rank. So does a rank killed by SIGKILL (OOM killer, node lost) without an error of its own.
RanksLost is a xlp.pipeline.core.node.RetryableFault: `xlp run` exits 75, and a rerun resumes from the last
checkpoint. A rank that raised (it wrote rank_<r>.error) stays a TrainFailed: a rerun would fail again.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Optional

import xlp.pipeline.train as train_ranks  # its ray_train_loop loads torch on first use (PEP 562)
from xlp.pipeline.cluster.plan import (
    RayCluster,
    SlurmAllocation,
    job_rendezvous_port,
    ray_train_plan,
    slurm_count,
    srun_plan,
)
from xlp.pipeline.core.layout import RunLayout, TrainLayout
from xlp.pipeline.core.node import RetryableFault, node_name
from xlp.pipeline.core.secrets import forwarded_env
from xlp.pipeline.core.stage import output_to
from xlp.pipeline.train.dist import free_port
from xlp.pipeline.train.heartbeat import Hang, HangDetector, describe, last_position, read_heartbeat
from xlp.pipeline.train.stop import EXIT_STOPPED, StopRequest

LAUNCHERS = ("auto", "local", "slurm", "ray")


class TrainFailed(RuntimeError):
    pass


class TrainInterrupted(RuntimeError):
    """The ranks stopped on a signal after saving a checkpoint; rerunning the stage resumes."""


class RanksLost(TrainFailed, RetryableFault):
    """A rank hung, or its process or node was lost: the cluster's fault, not the run's; a rerun resumes
    from the last checkpoint."""


@dataclass
class RankCommand:
    """What every launcher starts: `python -m xlp.pipeline.train.main` with these arguments."""

    run_dir: Path
    config: Path
    out: TrainLayout
    shard_dir: Optional[Path] = None
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE, e.g. train.device=cpu
    hooks: Optional[str] = None  # module:name of xlp.pipeline.train.hooks.TrainHooks (tests)

    def argv(self) -> list[str]:
        cmd = [sys.executable, "-m", "xlp.pipeline.train.main", "--run-dir", str(self.run_dir), "--config",
               str(self.config), "--out-dir", str(self.out.root)]
        if self.shard_dir is not None:
            cmd += ["--shard-dir", str(self.shard_dir)]
        if self.hooks:
            cmd += ["--hooks", self.hooks]
        return cmd + ["--no-stage-json", *self.overrides]  # the train stage records its own stage.json

    def loop_config(self) -> dict:
        """The same, as xlp.pipeline.train.main.ray_train_loop's config."""
        return {"run_dir": str(self.run_dir), "config": str(self.config), "out_dir": str(self.out.root),
                "shard_dir": str(self.shard_dir) if self.shard_dir is not None else None,
                "overrides": list(self.overrides), "hooks": self.hooks, "record_stage": False}

    def on_cpu(self) -> None:
        self.overrides.append("train.device=cpu")


def launch(run_dir: Path, *, config: Path, cpu_processes: int, out_dir: Optional[Path] = None,
           shard_dir: Optional[Path] = None, threads: int = 0, stream: Optional[IO[str]] = None,
           extra_env: Optional[dict] = None, grace_s: float = 600.0, launcher: str = "auto",
           device: str = "auto", hooks: Optional[str] = None, hang_timeout: float = 600.0,
           max_restarts: int = 0, sequence_parallel: int = 1) -> int:
    """Run the ranks to completion. Returns the number of ranks; raises TrainFailed (RanksLost: a rank
    hung or was lost; see supervise) or TrainInterrupted. hang_timeout: `train.hang_timeout` (0: off).
    max_restarts: `train.max_restarts`, for Ray Train, which restarts lost workers itself (a Slurm job
    requeues itself instead: slurm.max_requeues). sequence_parallel: `train.sequence_parallel`, whose
    groups the Slurm and Ray plans place (and name in their launch line)."""
    run_dir = Path(run_dir)
    out = TrainLayout(Path(out_dir)) if out_dir else RunLayout(run_dir).train
    out.logs.mkdir(parents=True, exist_ok=True)
    stream = stream or sys.stdout
    how = choose_launcher(launcher)
    command = RankCommand(run_dir, Path(config), out, shard_dir, hooks=hooks)
    start = {"local": LocalRanks, "slurm": SlurmRanks, "ray": RayRanks}[how]
    _clear_rank_logs(out.logs)
    options = {"max_restarts": max_restarts} if how == "ray" else {}
    if how in ("slurm", "ray"):
        options["sequence_parallel"] = sequence_parallel
    ranks = start(command, cpu_processes=cpu_processes, threads=threads, device=device,
                  extra_env=extra_env or {}, stream=stream, **options)
    return supervise(ranks, out, stream=stream, grace_s=grace_s, hang_timeout=hang_timeout)


def choose_launcher(requested: str = "auto", env: Optional[dict] = None) -> str:
    """local | slurm | ray for `train.launcher` (auto: local; slurm only inside an allocation)."""
    env = os.environ if env is None else env
    requested = (requested or "auto").strip().lower()
    if requested not in LAUNCHERS:
        raise TrainFailed(f"train.launcher is {requested!r}; valid values: {', '.join(LAUNCHERS)}")
    if requested == "auto":
        return "local"
    if requested == "slurm":
        if not env.get("SLURM_JOB_ID"):
            raise TrainFailed("train.launcher=slurm needs a Slurm allocation (SLURM_JOB_ID is not set): "
                              "submit with `xlp submit --to slurm`, or set train.launcher=local")
        if shutil.which("srun", path=env.get("PATH")) is None:
            raise TrainFailed("train.launcher=slurm: srun is not on PATH")
    return requested


# ---------------------------------------------------------------------------------------------
# supervise: one way to wait for ranks, whoever started them


@dataclass(frozen=True)
class Failure:
    rank: int
    how: str  # "exit status 1", "srun killed by SIGKILL", "Ray Train"
    why: str  # the rank's error message, or where to look
    # killed from outside (SIGKILL: the OOM killer, its node lost, by hand) without an error of its own:
    # the cluster failed, not the run (RanksLost)
    lost: bool = False
    pid: Optional[int] = None  # when the launcher knows it (local processes)


STOPPED = "stopped"  # Ranks.outcome(): they saved a checkpoint and exited on a stop request


class Ranks:
    """A started set of ranks, as `supervise` sees it."""

    n: int

    def done(self) -> bool:
        """All ranks have ended (may also end the others once one has failed)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Ask every rank to save a checkpoint and exit."""
        raise NotImplementedError

    def kill(self) -> None:
        """The stop took longer than its grace period: end the ranks now."""
        raise NotImplementedError

    def outcome(self, received: list[int]) -> "None | str | Failure":
        """None (trained to the end), STOPPED, or the Failure of the rank that caused it."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def supervise(ranks: Ranks, out: TrainLayout, *, stream: IO[str], grace_s: float,
              hang_timeout: float = 0.0) -> int:
    """Wait for `ranks`, rank 0's log followed to `stream`, SIGTERM/SIGINT forwarded as a stop
    request, their heartbeats judged (hang_timeout > 0; xlp.pipeline.train.heartbeat.HangDetector).
    Returns the number of ranks; raises TrainFailed (RanksLost: hung or lost) or TrainInterrupted."""
    detector = HangDetector(out, world_size=ranks.n, hang_timeout=hang_timeout) if hang_timeout > 0 else None
    hang: Optional[Hang] = None
    ended = threading.Event()
    pump = threading.Thread(target=follow_log, args=(out.rank_log(0), ended, stream), daemon=True)
    pump.start()
    received: list[int] = []

    def forward(signum, frame):  # noqa: ARG001
        if not received:
            ranks.stop()
        received.append(signum)

    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            old[s] = signal.signal(s, forward)
    try:
        hang = _wait(ranks, received, grace_s, detector, stream)
    except BaseException:  # e.g. Ray cancelling the stage task: let the ranks save, then go
        forward(signal.SIGTERM, None)
        _wait(ranks, received, grace_s, detector, stream)
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        ended.set()
        pump.join(timeout=10)
        ranks.close()
    if hang is not None:
        raise RanksLost(f"{hang.message}; the ranks were ended: rerun to resume from the last checkpoint "
                        f"(logs: {out.logs})")
    outcome = ranks.outcome(received)
    if outcome is None:
        return ranks.n
    if outcome == STOPPED:
        name = out.stop_reason() or (signal.Signals(received[0]).name if received else "SIGTERM")
        raise TrainInterrupted(f"train stopped by {name}; the ranks saved a checkpoint "
                               f"({out.checkpoints}); rerun the stage to resume")
    log = out.rank_log(outcome.rank)
    if outcome.lost:
        raise RanksLost(_lost_message(out, outcome))
    if out.rank_error(outcome.rank).is_file():  # the rank said what went wrong: its log has the traceback
        raise TrainFailed(f"train rank {outcome.rank} failed ({outcome.how}): {outcome.why} (log: {log})")
    raise TrainFailed(f"train rank {outcome.rank} failed ({outcome.how}): {outcome.why}\n"
                      f"--- last lines of {log} ---\n{tail(log)}")


def _lost_message(out: TrainLayout, failure: Failure) -> str:
    beat = read_heartbeat(out.heartbeat(failure.rank))
    who = describe(failure.rank, beat)
    if not beat and failure.pid is not None:  # lost before its first heartbeat
        who = f"rank {failure.rank} on node {node_name()} (pid {failure.pid})"
    return (f"train {who} was lost ({failure.how}): {failure.why} (last: {last_position(beat)}); the other "
            f"ranks were ended: rerun to resume from the last checkpoint (log: {out.rank_log(failure.rank)})")


KILL_WAIT_S = 60.0  # after ending hung ranks, how long to wait for them to go before giving up on them


def _wait(ranks: Ranks, received: list[int], grace_s: float, detector: Optional[HangDetector] = None,
          stream: Optional[IO[str]] = None) -> Optional[Hang]:
    """Until every rank has ended; once a stop was asked for, give them grace_s, then kill them. A hang
    the detector finds ends the ranks at once (hung ranks cannot save) and is returned."""
    deadline: Optional[float] = None
    next_check = time.monotonic()
    while not ranks.done():
        if detector is not None and time.monotonic() >= next_check:
            hang = detector.check(time.monotonic())
            next_check = time.monotonic() + detector.check_every_s
            if hang is not None:
                if stream is not None:
                    _say(stream, f"launch: {hang.message}; ending the ranks")
                ranks.kill()
                give_up = time.monotonic() + KILL_WAIT_S
                while not ranks.done() and time.monotonic() < give_up:
                    time.sleep(0.1)
                return hang
        if received and deadline is None:
            deadline = time.monotonic() + grace_s
        if deadline is not None and time.monotonic() > deadline:
            ranks.kill()
            deadline = time.monotonic() + 3600
        time.sleep(0.1)
    return None


def follow_log(path: Path, ended: threading.Event, stream: IO[str]) -> None:
    """Copy the lines written to `path` (once it exists) to `stream`, until `ended` is set and all
    are copied."""
    while not path.exists():
        if ended.wait(0.2):
            return
    with open(path, "r", errors="replace") as src:
        pending = ""
        while True:
            done = ended.is_set()
            chunk = src.read()
            if chunk:
                pending += chunk
                *lines, pending = pending.split("\n")
                _say(stream, "\n".join(lines), empty_ok=False)
            elif done:
                break
            else:
                time.sleep(0.1)
        if pending:
            _say(stream, pending)


def _say(stream: IO[str], text: str, empty_ok: bool = True) -> None:
    if not text and not empty_ok:
        return
    try:
        stream.write(text + "\n")
        stream.flush()
    except (ValueError, OSError):
        pass


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _code(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _killed(code: Optional[int]) -> bool:
    """The exit status of a process killed by SIGKILL (the OOM killer, a lost node, by hand): -9 from
    Popen, 137 from a shell or srun."""
    return code in (-signal.SIGKILL, 128 + signal.SIGKILL)


def _why(out: TrainLayout, rank: int, code: int) -> str:
    err = out.rank_error(rank)
    if err.is_file():
        return err.read_text().strip()
    if _killed(code):
        return "killed without an error of its own (out of memory? its node lost? killed by hand?)"
    if code < 0:
        return "it died of a signal without an error of its own (a crash?)"
    return "see the log below"


def _clear_rank_logs(logs: Path) -> None:
    """Old rank logs would be followed (and blamed) before the new ranks write theirs; old heartbeats
    would be judged as theirs."""
    for pattern in ("rank_*.log", "rank_*.error", "heartbeat_*.json", ".heartbeat_*.tmp"):
        for f in logs.glob(pattern):
            f.unlink(missing_ok=True)


def _first_error_rank(out: TrainLayout) -> Optional[int]:
    """The rank that wrote an error message (rank_<r>.error), lowest first."""
    ranks = sorted(int(m.group(1)) for f in out.logs.glob("rank_*.error")
                   if (m := re.fullmatch(r"rank_(\d+)\.error", f.name)))
    return ranks[0] if ranks else None


# ---------------------------------------------------------------------------------------------
# What every launcher gives its ranks


def rank_env(base: dict, *, cpu_threads: Optional[int], extra_env: dict) -> dict:
    """The ranks' environment: ours (the installed package is importable), unbuffered output, and on CPU the
    DeepSpeed CPU accelerator and `cpu_threads` OpenMP threads (None: ranks on GPUs)."""
    env = dict(base)
    # PYTHONSAFEPATH: `python -m` would put the working directory first on sys.path, where a clone's
    # top-level folders (kernels/, tokenizer/) would shadow other distributions' packages of those names.
    env.update({"PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"})
    if cpu_threads is not None:
        env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(cpu_threads)})
    env.update(extra_env)
    return env


def visible_devices_for_ranks(env: dict) -> None:
    """Undo Ray's hiding of GPUs: a Ray task that asked for no GPUs (the runner's stage tasks ask
    for num_cpus=0 only) gets CUDA_VISIBLE_DEVICES="", but the ranks we start should see the
    machine's GPUs. XLP_CUDA_VISIBLE_DEVICES, when set, says which."""
    if "XLP_CUDA_VISIBLE_DEVICES" in env:
        env["CUDA_VISIBLE_DEVICES"] = env["XLP_CUDA_VISIBLE_DEVICES"]
    elif env.get("CUDA_VISIBLE_DEVICES") == "" and _in_ray_worker():
        del env["CUDA_VISIBLE_DEVICES"]


def _in_ray_worker() -> bool:
    if "ray" not in sys.modules:
        return False
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001
        return False


def count_gpus(env: Optional[dict] = None, device: str = "auto") -> int:
    """GPUs the ranks will see (0 with train.device=cpu)."""
    if device == "cpu":
        return 0
    env = dict(os.environ if env is None else env)
    if env.get("CUDA_VISIBLE_DEVICES") != os.environ.get("CUDA_VISIBLE_DEVICES"):
        # this process's CUDA view differs from the ranks': ask a fresh interpreter
        try:
            out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                                 env=env, capture_output=True, text=True, timeout=120)
            return int(out.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return 0
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def _pdeathsig() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------
# Local: one process per rank on this machine


class LocalRanks(Ranks):
    """Rank processes on this machine, each writing only its own log file (a rank never depends on
    us reading a pipe: it must still save a checkpoint when this process is gone)."""

    def __init__(self, command: RankCommand, *, cpu_processes: int, threads: int, device: str,
                 extra_env: dict, stream: IO[str]):
        self.out = command.out
        base = dict(os.environ)
        visible_devices_for_ranks(base)
        gpus = count_gpus(base, device)
        self.n = n = gpus or cpu_processes
        for key in ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):  # we are the launcher now
            base.pop(key, None)
        base.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(n),
                     "LOCAL_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n)})
        cpu_threads = None if gpus else threads or max(1, len(os.sched_getaffinity(0)) // n)
        if not gpus:
            command.on_cpu()
        env = rank_env(base, cpu_threads=cpu_threads, extra_env=extra_env)
        _say(stream, f"launch: local processes, {n} ranks ({'GPU' if gpus else 'CPU'})")
        self.failed: Optional[tuple[int, int]] = None
        self._kill_at: Optional[float] = None
        self.procs: list[subprocess.Popen] = []
        self.log_files = []
        for r in range(n):
            f = open(self.out.rank_log(r), "w")
            self.log_files.append(f)
            self.procs.append(subprocess.Popen(command.argv(), env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                               stdout=f, stderr=subprocess.STDOUT, preexec_fn=_pdeathsig))

    def done(self) -> bool:
        codes = [p.poll() for p in self.procs]
        if self.failed is None:
            bad = [(r, c) for r, c in enumerate(codes) if c is not None and c not in (0, EXIT_STOPPED)]
            if bad:
                # A rank killed from outside is the cause: its peers then fail in their collectives (with
                # errors of their own), often within the same poll. Else the rank that wrote an error
                # message is; the others lost their peer.
                self.failed = (next((b for b in bad if _killed(b[1]) and not self.out.rank_error(b[0]).is_file()),
                                    None)
                               or next((b for b in bad if self.out.rank_error(b[0]).is_file()), bad[0]))
                self._kill_at = time.monotonic() + 5.0  # peers blocked in a collective never finish
        if self._kill_at is not None and time.monotonic() > self._kill_at:
            self.kill()
            self._kill_at = None
        return all(c is not None for c in codes)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()

    def outcome(self, received: list[int]) -> "None | str | Failure":
        if self.failed is not None:
            r, code = self.failed
            return Failure(r, _code(code), _why(self.out, r, code),
                           lost=_killed(code) and not self.out.rank_error(r).is_file(), pid=self.procs[r].pid)
        if received or any(p.returncode == EXIT_STOPPED for p in self.procs):
            return STOPPED
        return None

    def close(self) -> None:
        for f in self.log_files:
            f.close()


# ---------------------------------------------------------------------------------------------
# Slurm: `srun` inside the allocation

# Variables of the step we run in (the job's Ray head step, or the batch step) that a nested srun
# would take as its own options, or that would make the ranks think they are that step's tasks.
_SLURM_STEP_VARS = ("SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_NODES",
                    "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE", "SLURM_STEP_LAUNCHER_PORT",
                    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_TASK_PID", "SLURM_GTIDS",
                    "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
                    "SLURM_CPU_BIND", "SLURM_CPU_BIND_TYPE", "SLURM_CPU_BIND_LIST", "SLURM_CPU_BIND_VERBOSE",
                    "SLURM_MEM_BIND", "SLURM_MEM_BIND_TYPE", "SLURM_MEM_BIND_LIST", "SLURM_MEM_BIND_VERBOSE",
                    "SLURM_MEM_BIND_PREFER", "SLURM_MEM_BIND_SORT", "SLURM_DISTRIBUTION", "SLURM_OVERLAP",
                    "SLURM_EXCLUSIVE", "SLURM_MEM_PER_CPU", "SLURM_MEM_PER_NODE", "SLURM_MEM_PER_GPU",
                    "SLURM_GPUS_PER_TASK", "SLURM_TRES_PER_TASK", "SLURM_SRUN_COMM_HOST", "SLURM_SRUN_COMM_PORT",
                    "SLURM_LAUNCH_NODE_IPADDR", "SLURM_UMASK", "SLURM_EXPORT_ENV", "SLURM_LABELIO",
                    "SLURM_UNBUFFEREDIO", "SLURM_STDOUTMODE", "SLURM_STDERRMODE")
_TORCH_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")


_slurm_count = slurm_count


def slurm_hosts(env: dict) -> list[str]:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=60).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return [h for h in nodelist.split(",") if h and "[" not in h] or [socket.gethostname()]


def slurm_gpus_per_node(env: dict, device: str = "auto") -> int:
    """GPUs per node for the ranks: the job's GPUs on this node, else what this node shows."""
    if device == "cpu":
        return 0
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        n = _slurm_count(env.get(key))
        if n:
            return n
    if env.get("SLURM_JOB_GPUS"):
        return len([g for g in env["SLURM_JOB_GPUS"].split(",") if g])
    return count_gpus(env)


class SlurmRanks(Ranks):
    """The ranks as one `srun` step of the allocation we run in: G tasks per node (G = GPUs per node,
    else train.cpu_processes) on every node of the job; rendezvous on the job's first node."""

    def __init__(self, command: RankCommand, *, cpu_processes: int, threads: int, device: str,
                 extra_env: dict, stream: IO[str], sequence_parallel: int = 1):
        self.out = command.out
        base = dict(os.environ)
        visible_devices_for_ranks(base)
        master, port = self._rendezvous(base)
        alloc = SlurmAllocation.from_env(base, first_node=master, gpus_per_node=slurm_gpus_per_node(base, device),
                                         cpus_fallback=len(os.sched_getaffinity(0)))
        plan = srun_plan(alloc, cpu_processes=cpu_processes, threads=threads, device=device, master_port=port,
                         user_env=extra_env, inherited_env=base, sequence_parallel=sequence_parallel)
        self.n = plan.ranks
        for key in (*_SLURM_STEP_VARS, *_TORCH_RANK_VARS):
            base.pop(key, None)
        if not plan.gpus_per_node:
            command.on_cpu()
        self.env = {**rank_env(base, cpu_threads=None, extra_env={}), **plan.env}
        self.step_name = f"xlp-train-{os.getpid()}"
        cmd = plan.srun_args(step_name=self.step_name, log_pattern=f"{self.out.logs}/rank_%t.log") + command.argv()
        _say(stream, f"launch: srun, {plan.summary()}")
        self._kill_srun_at: Optional[float] = None
        self.srun_log_path = self.out.logs / "srun.log"
        self.srun_log = open(self.srun_log_path, "w")
        self.srun_log.write("$ " + " ".join(cmd) + "\n")
        self.srun_log.flush()
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.srun_log, stderr=subprocess.STDOUT,
                                     preexec_fn=_pdeathsig)

    @staticmethod
    def _rendezvous(env: dict) -> tuple[str, int]:
        """The job's first node, and a free port when that is this node; else one the job's id picks
        (as dist.py does)."""
        master = slurm_hosts(env)[0]
        here = {socket.gethostname().split(".")[0], env.get("SLURMD_NODENAME", "")}
        if master.split(".")[0] in here:
            return master, free_port()
        return master, job_rendezvous_port(env["SLURM_JOB_ID"])

    def done(self) -> bool:
        if self._kill_srun_at is not None and time.monotonic() > self._kill_srun_at and self.proc.poll() is None:
            self.proc.kill()  # the step's tasks were killed, yet srun waits on (a lost node's)
        return self.proc.poll() is not None

    def stop(self) -> None:
        # SIGTERM to the step's tasks (the ranks save a checkpoint and exit). Not to srun: a SIGTERM
        # there makes it terminate the step (SIGKILL soon after), before the ranks have saved.
        if self.proc.poll() is None and not _signal_step(self.env["SLURM_JOB_ID"], self.step_name):
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        # SIGKILL to the step's tasks on every node (killing srun alone may leave them running), then
        # srun itself if it does not end with them
        if self.proc.poll() is None and not _signal_step(self.env["SLURM_JOB_ID"], self.step_name, "KILL"):
            self.proc.kill()
        self._kill_srun_at = time.monotonic() + 30.0

    def outcome(self, received: list[int]) -> "None | str | Failure":
        code = self.proc.returncode
        if code == 0:
            return None
        err_rank = _first_error_rank(self.out)
        if err_rank is None and (received or code == EXIT_STOPPED):
            return STOPPED  # our SIGTERM, or one from Slurm (scancel, preemption, time limit) to the tasks
        said = self.srun_log_path.read_text(errors="replace")
        lost = srun_lost_rank(said, self.out)
        if lost is not None:
            return lost
        if err_rank is not None:
            return Failure(err_rank, f"srun {_code(code)}", _why(self.out, err_rank, code))
        failures = srun_task_failures(said)
        return Failure(failures[0][0] if failures else 0, f"srun {_code(code)}",
                       f"see the log below; srun said:\n{tail(self.srun_log_path, 15)}")

    def close(self) -> None:
        self.srun_log.close()


# srun's lines about tasks that ended badly, in the order they ended:
#   "srun: error: xlp-node2: task 1: Killed", "srun: error: xlp-node1: tasks 0-1: Exited with exit code 1"
_SRUN_TASK_FAILURE = re.compile(r"(?:(?P<node>[^\s:]+): )?tasks? (?P<rank>\d+)[-,\d]*: "
                                r"(?P<what>Exited with exit code \d+|Killed|Terminated|Segmentation fault|Aborted)")
_SRUN_NODE_FAILURE = re.compile(r"[Nn]ode failure on (?P<node>[^\s,;]+)")


def srun_task_failures(said: str) -> list[tuple[int, Optional[str], str]]:
    """(rank, node or None, what) for each task srun's output reports ending badly, first first."""
    return [(int(m["rank"]), m["node"], m["what"]) for m in _SRUN_TASK_FAILURE.finditer(said)]


def srun_lost_rank(said: str, out: TrainLayout) -> Optional[Failure]:
    """The rank the cluster lost, from srun's output: a node failure, or a first failed task that was
    Killed without an error of its own. (Not any Killed task: with --kill-on-bad-exit, srun kills the
    others once one has failed.)"""
    node_failure = _SRUN_NODE_FAILURE.search(said)
    if node_failure:
        node = node_failure["node"]
        on_node = sorted(r for r, _, _ in srun_task_failures(said)
                         if (read_heartbeat(out.heartbeat(r)) or {}).get("node") == node)
        on_node = on_node or sorted(r for r, n, _ in srun_task_failures(said) if n == node)
        return Failure(on_node[0] if on_node else 0, f"srun: node failure on {node}",
                       f"its node {node} failed", lost=True)
    failures = srun_task_failures(said)
    if failures:
        rank, node, what = failures[0]
        if what == "Killed" and not out.rank_error(rank).is_file():
            where = f" on {node}" if node else ""
            return Failure(rank, f"srun: task {rank}{where} Killed (SIGKILL)", _why(out, rank, -signal.SIGKILL),
                           lost=True)
    return None


def _signal_step(job_id: str, step_name: str, signal_name: str = "TERM") -> bool:
    """`scancel --signal=TERM` (or another signal) the step named `step_name` of the job; False if it
    cannot be found."""
    try:
        out = subprocess.run(["squeue", "--steps", "--noheader", f"--jobs={job_id}", "--format=%i %j"],
                             capture_output=True, text=True, timeout=30).stdout
        steps = [line.split()[0] for line in out.splitlines() if line.split()[1:] == [step_name]]
        if not steps:
            return False
        return subprocess.run(["scancel", f"--signal={signal_name}", *steps], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError, IndexError):
        return False


# ---------------------------------------------------------------------------------------------
# Ray: Ray Train workers

# The workers get their environment from Ray (the job's runtime env), not from this process: the
# variables xlp.pipeline.core.secrets.forwarded_env names are passed on. The secret ones among them
# (is_secret: WANDB_API_KEY, HF_TOKEN, *_TOKEN, *_KEY, ..., a value with a credentialed URL) never go into
# the runtime env, which Ray's agents log: they travel as a Ray object (in the object store, not in any
# log or in Ray Train's stored run config), which each worker reads into its environment before the
# rank starts.


class RayRanks(Ranks):
    """The ranks as Ray Train workers (TorchTrainer over `_ray_rank`): one per GPU of the Ray cluster,
    else train.cpu_processes CPU workers (gloo). Ray Train starts the process group. A stop request
    is a file every worker watches (RUN_DIR/train/logs/STOP)."""

    def __init__(self, command: RankCommand, *, cpu_processes: int, threads: int, device: str,
                 extra_env: dict, stream: IO[str], max_restarts: int = 0, sequence_parallel: int = 1):
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        resources = ray.cluster_resources()

        passed, secret = forwarded_env()
        passed.pop("XLP_CUDA_VISIBLE_DEVICES", None)
        plan = ray_train_plan(RayCluster.from_nodes(ray.nodes()), cpu_processes=cpu_processes, threads=threads,
                              device=device, user_env=extra_env, inherited_env=passed,
                              sequence_parallel=sequence_parallel)
        self.n = n = plan.num_workers
        if not plan.use_gpu:
            command.on_cpu()
        self.secrets_ref = ray.put(secret)  # kept alive (we own it) until the workers have read it
        worker_env = {**rank_env(passed, cpu_threads=None, extra_env={}),
                      "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **plan.env}  # print() to the log
        self.stop_file = command.out.logs / "STOP"
        self.stop_file.unlink(missing_ok=True)
        trainer = TorchTrainer(
            _ray_rank,
            train_loop_config={**command.loop_config(), "stop_file": str(self.stop_file),
                               "secret_env": self.secrets_ref},
            scaling_config=ScalingConfig(**plan.scaling_config_kwargs()),
            run_config=RunConfig(storage_path=str(command.out.root / "ray_train"),
                                 name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                 failure_config=FailureConfig(max_failures=max_restarts),
                                 worker_runtime_env={"env_vars": worker_env}),
        )
        _say(stream, f"launch: ray train, {n} workers ({'GPU' if plan.use_gpu else 'CPU'}; {plan.placement_strategy} "
                     f"over {plan.nodes} node(s); cluster {dict(resources)})"
                     + "".join(f"; {line} (expected; Ray places the workers)" for line in plan.groups()))
        self.out = command.out
        self.box: dict = {}
        self.abandoned = False
        self.runner = threading.Thread(target=self._fit, args=(trainer,), name="xlp-ray-train", daemon=True)
        self.runner.start()

    def _fit(self, trainer) -> None:
        try:
            self.box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001
            self.box["error"] = e

    def done(self) -> bool:
        self.runner.join(0.1)
        return self.abandoned or not self.runner.is_alive()

    def stop(self) -> None:
        self.stop_file.touch()

    def kill(self) -> None:
        # Ray Train's workers are Ray's to end, and a hung one ignores the stop file: SIGKILL each by the
        # pid its heartbeat gives, through a task on its node (Ray Train then tears the group down).
        # Then stop waiting for them.
        _kill_ray_workers([read_heartbeat(self.out.heartbeat(r)) for r in range(self.n)])
        self.abandoned = True

    def outcome(self, received: list[int]) -> "None | str | Failure":
        error = self.box.get("error")
        if error is None and not self.abandoned:
            return None
        err_rank = _first_error_rank(self.out)
        if err_rank is None and received:
            return STOPPED
        failures = getattr(error, "worker_failures", None) or {}
        lost = sorted(r for r, cause in failures.items() if _ray_lost(cause) and not self.out.rank_error(r).is_file())
        if lost:  # a worker process or node died; its peers' errors followed from that
            cause = failures[lost[0]]
            return Failure(lost[0], "Ray Train", f"its worker died: {type(cause).__name__}: "
                           f"{str(cause).strip()[-500:]}", lost=True)
        if err_rank is not None:
            return Failure(err_rank, "Ray Train", _why(self.out, err_rank, 1))
        rank = min(failures) if failures else 0
        cause = failures.get(rank, error)
        return Failure(rank, "Ray Train", f"{type(cause).__name__}: {str(cause).strip()[-2000:]}")


def _ray_lost(cause: BaseException) -> bool:
    """A Ray Train worker failure that is the cluster's: its process died (killed, OOM) or its node did."""
    from ray.exceptions import NodeDiedError, OutOfMemoryError, RayActorError, WorkerCrashedError

    return isinstance(cause, (RayActorError, WorkerCrashedError, NodeDiedError, OutOfMemoryError))


def _kill_ray_workers(beats: list[Optional[dict]], wait_s: float = 10.0) -> None:
    """SIGKILL the processes the heartbeats name, each by a task pinned to its Ray node. Waits up to
    wait_s for the tasks (one for a lost node never runs)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def kill_pid(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    tasks = [kill_pid.options(scheduling_strategy=NodeAffinitySchedulingStrategy(b["ray_node_id"], soft=False))
             .remote(b["pid"]) for b in beats if b and b.get("ray_node_id") and not b.get("ended")]
    if tasks:
        ray.wait(tasks, num_returns=len(tasks), timeout=wait_s)


def _ray_rank(config: dict) -> None:
    """A Ray Train worker: this rank's output to RUN_DIR/train/logs/rank_<r>.log, a stop request (the
    launcher touches logs/STOP) turned into the rank's StopRequest, then the rank."""
    import ray
    import ray.train

    config = dict(config)
    secret_ref = config.pop("secret_env", None)
    if secret_ref is not None:
        os.environ.update(ray.get(secret_ref))  # the secret variables (see _RAY_WORKER_ENV_PREFIXES)
    out = TrainLayout(Path(config["out_dir"]))
    log_path = out.rank_log(ray.train.get_context().get_world_rank())
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stop_file = Path(config["stop_file"])
    stop = StopRequest()
    finished = threading.Event()

    def watch() -> None:  # the loop runs outside the main thread here: no signal handlers
        while not finished.wait(0.5):
            if stop_file.exists():
                stop.set(signal.SIGTERM)
                return

    threading.Thread(target=watch, daemon=True).start()
    try:
        with output_to(log_path, append=True):  # a restarted worker (train.max_restarts) adds to its log
            train_ranks.ray_train_loop({**{k: v for k, v in config.items() if k != "stop_file"}, "stop": stop})
    finally:
        finished.set()
