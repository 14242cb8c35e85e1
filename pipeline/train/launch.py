"""Start the training ranks and watch them: as processes on this machine, with `srun` inside a Slurm
allocation, or as Ray Train workers on a Ray cluster (`train.launcher`: auto | local | slurm | ray;
auto follows XLP_LAUNCHER, which `xlp submit` sets for the job, else local).

One rank per GPU, or `train.cpu_processes` gloo ranks when there is none (or XLP_TRAIN_DEVICE=cpu);
with srun that is per node of the allocation, with Ray Train one per GPU of the cluster.
Every rank writes RUN_DIR/train/logs/rank_<r>.log; rank 0's streams to our stdout. A rank that fails
fails the launch (TrainFailed) with its log tail; the others are ended. SIGTERM or SIGINT here is
forwarded to the ranks, which save a checkpoint and exit (TrainInterrupted); locally the ranks also
get SIGTERM if this process dies (PR_SET_PDEATHSIG), under srun the srun step does.
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
from pathlib import Path
from typing import IO, Optional

from pipeline.stage import output_to
from pipeline.train.dist import free_port
from pipeline.train.main import EXIT_STOPPED

REPO_ROOT = Path(__file__).resolve().parents[2]


class TrainFailed(RuntimeError):
    pass


class TrainInterrupted(RuntimeError):
    """The ranks stopped on a signal after saving a checkpoint; rerunning the stage resumes."""


def _pdeathsig() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


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


def count_gpus(env: Optional[dict] = None) -> int:
    """GPUs the ranks will see (0 with XLP_TRAIN_DEVICE=cpu)."""
    env = dict(os.environ if env is None else env)
    if env.get("XLP_TRAIN_DEVICE", "").lower() == "cpu":
        return 0
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


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


LAUNCHERS = ("auto", "local", "slurm", "ray")


def choose_launcher(requested: str = "auto", env: Optional[dict] = None) -> str:
    """local | slurm | ray for `train.launcher` (auto: XLP_LAUNCHER, else local; slurm only inside an
    allocation)."""
    env = os.environ if env is None else env
    requested = (requested or "auto").strip().lower()
    if requested not in LAUNCHERS:
        raise TrainFailed(f"train.launcher is {requested!r}; valid values: {', '.join(LAUNCHERS)}")
    explicit = requested != "auto"
    if not explicit:
        requested = env.get("XLP_LAUNCHER", "").strip().lower() or "local"
        if requested not in LAUNCHERS[1:]:
            raise TrainFailed(f"XLP_LAUNCHER is {requested!r}; valid values: local, slurm, ray")
    if requested == "slurm":
        if not env.get("SLURM_JOB_ID"):
            if not explicit:
                return "local"  # XLP_LAUNCHER=slurm leaked outside an allocation: run here
            raise TrainFailed("train.launcher=slurm needs a Slurm allocation (SLURM_JOB_ID is not set): "
                              "submit with `xlp submit --to slurm`, or set train.launcher=local")
        if shutil.which("srun", path=env.get("PATH")) is None:
            raise TrainFailed("train.launcher=slurm (or XLP_LAUNCHER=slurm): srun is not on PATH")
    return requested


def launch(run_dir: Path, *, config: Path, cpu_processes: int, out_dir: Optional[Path] = None,
           shard_dir: Optional[Path] = None, threads: int = 0, stream: Optional[IO[str]] = None,
           extra_env: Optional[dict] = None, grace_s: float = 600.0, launcher: str = "auto") -> int:
    """Run the ranks to completion. Returns the number of ranks; raises TrainFailed/TrainInterrupted."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "train")
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stream = stream or sys.stdout
    how = choose_launcher(launcher)
    kwargs = dict(config=config, cpu_processes=cpu_processes, out_dir=out_dir, shard_dir=shard_dir,
                  threads=threads, stream=stream, extra_env=extra_env, grace_s=grace_s)
    if how == "slurm":
        return launch_slurm(run_dir, **kwargs)
    if how == "ray":
        return launch_ray(run_dir, **kwargs)
    env = dict(os.environ)
    visible_devices_for_ranks(env)
    gpus = count_gpus(env)
    n = gpus or cpu_processes
    env.update({
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(n),
        "LOCAL_SIZE": str(n),
        "LOCAL_WORLD_SIZE": str(n),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    })
    for key in ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):  # we are the launcher now
        env.pop(key, None)
    if not gpus:
        cores = len(os.sched_getaffinity(0))
        t = threads or max(1, cores // n)
        env.update({"XLP_TRAIN_DEVICE": "cpu", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(t)})
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "pipeline.train.main", "--run-dir", str(run_dir), "--config", str(config),
           "--out-dir", str(out_dir)]
    if shard_dir is not None:
        cmd += ["--shard-dir", str(shard_dir)]
    _say(stream, f"launch: local processes, {n} ranks ({'GPU' if gpus else 'CPU'})")

    procs: list[subprocess.Popen] = []
    log_files = []
    pump: Optional[threading.Thread] = None
    for r in range(n):
        renv = dict(env, RANK=str(r), LOCAL_RANK=str(r))
        log_path = logs / f"rank_{r}.log"
        f = open(log_path, "w")
        log_files.append(f)
        # every rank writes only its log file, so a rank never depends on us reading a pipe (it
        # must still save a checkpoint when this process is gone); rank 0's log is followed
        p = subprocess.Popen(cmd, env=renv, stdout=f, stderr=subprocess.STDOUT, preexec_fn=_pdeathsig)
        if r == 0:
            pump = threading.Thread(target=_follow, args=(log_path, p, stream), daemon=True)
            pump.start()
        procs.append(p)

    received: list[int] = []

    def forward(signum, frame):  # noqa: ARG001
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            old[s] = signal.signal(s, forward)
    try:
        failed = _wait(procs, received, grace_s, out_dir)
    except BaseException:  # e.g. Ray cancelling the task: let the ranks save, then go
        forward(signal.SIGTERM, None)
        _wait(procs, received, grace_s, out_dir)
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if pump is not None:
            pump.join(timeout=10)
        for f in log_files:
            f.close()

    if failed is not None:
        r, code = failed
        why = _why(out_dir, r, code)
        raise TrainFailed(f"train rank {r} failed ({_code(code)}): {why}\n"
                          f"--- last lines of {logs / f'rank_{r}.log'} ---\n{tail(logs / f'rank_{r}.log')}")
    codes = [p.returncode for p in procs]
    if received or any(c == EXIT_STOPPED for c in codes):
        name = signal.Signals(received[0]).name if received else "SIGTERM"
        raise TrainInterrupted(f"train stopped by {name}; the ranks saved a checkpoint "
                               f"({out_dir / 'checkpoints'}); rerun the stage to resume")
    return n


def _follow(path: Path, proc: subprocess.Popen, stream: IO[str]) -> None:
    """Copy the lines appended to `path` to `stream` until `proc` has exited and all are copied."""
    with open(path, "r", errors="replace") as src:
        pending = ""
        while True:
            done = proc.poll() is not None
            chunk = src.read()
            if chunk:
                pending += chunk
                *lines, pending = pending.split("\n")
                try:
                    for line in lines:
                        stream.write(line + "\n")
                    stream.flush()
                except (ValueError, OSError):
                    pass
            elif done:
                break
            else:
                time.sleep(0.1)
        if pending:
            try:
                stream.write(pending + "\n")
                stream.flush()
            except (ValueError, OSError):
                pass


def _wait(procs: list[subprocess.Popen], received: list[int], grace_s: float,
          out_dir: Path) -> Optional[tuple[int, int]]:
    """Wait for every rank. On the first failure end the rest; returns (rank, exit code) of it."""
    failed: Optional[tuple[int, int]] = None
    deadline: Optional[float] = None
    while True:
        codes = [p.poll() for p in procs]
        if failed is None:
            bad = [(r, c) for r, c in enumerate(codes) if c is not None and c not in (0, EXIT_STOPPED)]
            if bad:
                # the rank that wrote an error message is the cause; the others lost their peer
                failed = next((b for b in bad if (out_dir / "logs" / f"rank_{b[0]}.error").is_file()), bad[0])
                deadline = time.monotonic() + 5.0  # peers blocked in a collective never finish
        if all(c is not None for c in codes):
            return failed
        if received and deadline is None:
            deadline = time.monotonic() + grace_s
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            deadline = time.monotonic() + 3600
        time.sleep(0.1)


def _code(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _why(out_dir: Path, rank: int, code: int) -> str:
    err = out_dir / "logs" / f"rank_{rank}.error"
    if err.is_file():
        return err.read_text().strip()
    if code < 0:
        return "the process was killed (out of memory? killed by hand?)"
    return "see the log below"


def _say(stream: IO[str], line: str) -> None:
    try:
        stream.write(line + "\n")
        stream.flush()
    except (ValueError, OSError):
        pass


def _main_cmd(run_dir: Path, config: Path, out_dir: Path, shard_dir: Optional[Path]) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline.train.main", "--run-dir", str(run_dir), "--config", str(config),
           "--out-dir", str(out_dir)]
    if shard_dir is not None:
        cmd += ["--shard-dir", str(shard_dir)]
    return cmd


def _clear_rank_logs(logs: Path) -> None:
    """Old rank logs would be followed (and blamed) before the new ranks write theirs."""
    for pattern in ("rank_*.log", "rank_*.error"):
        for f in logs.glob(pattern):
            f.unlink(missing_ok=True)


def _follow_when_created(path: Path, done, stream: IO[str]) -> None:
    """_follow for a log another process creates: wait until it exists (or `done()` is true)."""
    while not path.exists():
        if done():
            return
        time.sleep(0.2)

    class _Done:  # the poll() that _follow asks
        @staticmethod
        def poll():
            return 0 if done() else None

    _follow(path, _Done, stream)  # type: ignore[arg-type]


def _first_error_rank(logs: Path) -> Optional[int]:
    """The rank that wrote an error message (pipeline.train.main writes rank_<r>.error), lowest first."""
    ranks = sorted(int(m.group(1)) for f in logs.glob("rank_*.error")
                   if (m := re.fullmatch(r"rank_(\d+)\.error", f.name)))
    return ranks[0] if ranks else None


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


def _slurm_count(value: Optional[str]) -> Optional[int]:
    """"8" or "8(x2)" or "8(x2),4" (the first node's count); None when unset or unreadable."""
    try:
        return int(str(value).split("(")[0].split(",")[0])
    except (TypeError, ValueError):
        return None


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


def slurm_gpus_per_node(env: dict) -> int:
    """GPUs per node for the ranks: the job's GPUs on this node, else what this node shows."""
    if env.get("XLP_TRAIN_DEVICE", "").lower() == "cpu":
        return 0
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        n = _slurm_count(env.get(key))
        if n:
            return n
    if env.get("SLURM_JOB_GPUS"):
        return len([g for g in env["SLURM_JOB_GPUS"].split(",") if g])
    return count_gpus(env)


def launch_slurm(run_dir: Path, *, config: Path, cpu_processes: int, out_dir: Path, shard_dir: Optional[Path],
                 threads: int, stream: IO[str], extra_env: Optional[dict], grace_s: float) -> int:
    """The ranks as one `srun` step of the allocation we run in: G tasks per node (G = GPUs per node,
    else train.cpu_processes) on every node of the job; rendezvous on the job's first node."""
    logs = out_dir / "logs"
    env = dict(os.environ)
    visible_devices_for_ranks(env)
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    gpus = slurm_gpus_per_node(env)
    per_node = gpus or cpu_processes
    n = nodes * per_node
    cpus = (_slurm_count(env.get("SLURM_CPUS_PER_TASK")) or _slurm_count(env.get("SLURM_JOB_CPUS_PER_NODE"))
            or len(os.sched_getaffinity(0)))
    cpus_per_task = max(1, cpus // per_node)
    hosts = slurm_hosts(env)
    master = hosts[0]
    here = {socket.gethostname().split(".")[0], env.get("SLURMD_NODENAME", "")}
    # a free port when the rendezvous is on this node; else one the job's id picks (as dist.py does)
    port = free_port() if master.split(".")[0] in here else 20000 + (int(env["SLURM_JOB_ID"]) * 7 + 13) % 20000
    for key in (*_SLURM_STEP_VARS, *_TORCH_RANK_VARS):
        env.pop(key, None)
    env.update({
        "MASTER_ADDR": master,
        "MASTER_PORT": str(port),
        "LOCAL_SIZE": str(per_node),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    })
    if not gpus:
        env.update({"XLP_TRAIN_DEVICE": "cpu", "DS_ACCELERATOR": "cpu",
                    "OMP_NUM_THREADS": str(threads or cpus_per_task)})
    env.update(extra_env or {})
    step_name = f"xlp-train-{os.getpid()}"
    cmd = ["srun", "--overlap", "--export=ALL", f"--nodes={nodes}", f"--ntasks={n}",
           f"--ntasks-per-node={per_node}", f"--cpus-per-task={cpus_per_task}", "--mem=0", "--cpu-bind=none",
           "--kill-on-bad-exit=1", f"--job-name={step_name}", f"--output={logs}/rank_%t.log"]
    if gpus:
        cmd.append(f"--gpus-per-node={gpus}")
    cmd += _main_cmd(run_dir, config, out_dir, shard_dir)
    _clear_rank_logs(logs)
    _say(stream, f"launch: srun, {n} ranks ({nodes} node(s) x {per_node} {'GPU' if gpus else 'CPU'} ranks, "
                 f"rendezvous {master}:{port}, job {env.get('SLURM_JOB_ID')})")
    srun_log_path = logs / "srun.log"
    with open(srun_log_path, "w") as srun_log:
        srun_log.write("$ " + " ".join(cmd) + "\n")
        srun_log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=srun_log, stderr=subprocess.STDOUT, preexec_fn=_pdeathsig)
        pump = threading.Thread(target=_follow_when_created, args=(logs / "rank_0.log", lambda: proc.poll() is not None,
                                                                   stream), daemon=True)
        pump.start()
        received: list[int] = []

        def forward(signum, frame):  # noqa: ARG001
            # SIGTERM to the step's tasks (the ranks save a checkpoint and exit). Not to srun: a SIGTERM
            # there makes it terminate the step (SIGKILL soon after), before the ranks have saved.
            if not received and proc.poll() is None:
                if not _signal_step(env["SLURM_JOB_ID"], step_name):
                    proc.send_signal(signal.SIGTERM)
            received.append(signum)

        old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                old[s] = signal.signal(s, forward)
        try:
            code = _wait_one(proc, received, grace_s)
        except BaseException:  # e.g. Ray cancelling the stage task: let the ranks save, then go
            forward(signal.SIGTERM, None)
            _wait_one(proc, received, grace_s)
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            pump.join(timeout=10)
    if code == 0:
        return n
    err_rank = _first_error_rank(logs)
    if err_rank is None and (received or code == EXIT_STOPPED):
        # our SIGTERM, or one from Slurm (scancel, preemption, time limit) to the tasks
        name = signal.Signals(received[0]).name if received else "SIGTERM"
        raise TrainInterrupted(f"train stopped by {name}; the ranks saved a checkpoint "
                               f"({out_dir / 'checkpoints'}); rerun the stage to resume")
    srun_out = srun_log_path.read_text(errors="replace")
    rank = err_rank
    if rank is None:  # srun says which tasks ended badly: "task 1: Exited with exit code 1", "tasks 0-1: Killed"
        m = re.search(r"tasks? (\d+)[-,\d]*: (?:Exited with exit code|Killed|Terminated|Segmentation|Aborted)",
                      srun_out)
        rank = int(m.group(1)) if m else 0
    log = logs / f"rank_{rank}.log"
    why = _why(out_dir, rank, code) if err_rank is not None else f"see the log below; srun said:\n{tail(srun_log_path, 15)}"
    raise TrainFailed(f"train rank {rank} failed (srun {_code(code)}): {why}\n"
                      f"--- last lines of {log} ---\n{tail(log)}")


def _signal_step(job_id: str, step_name: str) -> bool:
    """`scancel --signal=TERM` the step named `step_name` of the job; False if it cannot be found."""
    try:
        out = subprocess.run(["squeue", "--steps", "--noheader", f"--jobs={job_id}", "--format=%i %j"],
                             capture_output=True, text=True, timeout=30).stdout
        steps = [line.split()[0] for line in out.splitlines() if line.split()[1:] == [step_name]]
        if not steps:
            return False
        return subprocess.run(["scancel", "--signal=TERM", *steps], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError, IndexError):
        return False


def _wait_one(proc: subprocess.Popen, received: list[int], grace_s: float) -> int:
    """Wait for `proc`; once a stop was asked for, give it grace_s, then kill it."""
    deadline: Optional[float] = None
    while proc.poll() is None:
        if received and deadline is None:
            deadline = time.monotonic() + grace_s
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
            deadline = time.monotonic() + 3600
        time.sleep(0.1)
    return proc.returncode


# ---------------------------------------------------------------------------------------------
# Ray: Ray Train workers


_RAY_WORKER_ENV_PREFIXES = ("XLP_", "WANDB_", "TRITON_", "DS_", "DEEPSPEED_", "NCCL_", "TORCH_", "HF_", "OMP_")


def launch_ray(run_dir: Path, *, config: Path, cpu_processes: int, out_dir: Path, shard_dir: Optional[Path],
               threads: int, stream: IO[str], extra_env: Optional[dict], grace_s: float) -> int:
    """The ranks as Ray Train workers (TorchTrainer over pipeline.train.main.ray_train_loop): one per GPU
    of the Ray cluster, else train.cpu_processes CPU workers (gloo). Ray Train starts the process group."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    logs = out_dir / "logs"
    resources = ray.cluster_resources()
    cpu_only = os.environ.get("XLP_TRAIN_DEVICE", "").lower() == "cpu"
    gpus = 0 if cpu_only else int(resources.get("GPU", 0))
    n = gpus or cpu_processes
    # the workers get their environment from Ray (the job's runtime env), not from this process: pass on
    # the settings a rank reads (XLP_KERNEL_BACKEND, XLP_TRAIN_FAULTS, WANDB_API_KEY, NCCL_*, ...)
    worker_env = {k: v for k, v in os.environ.items()
                  if k.startswith(_RAY_WORKER_ENV_PREFIXES) and k not in ("XLP_CUDA_VISIBLE_DEVICES",)}
    worker_env.update({
        "PYTHONUNBUFFERED": "1",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # print() to the rank's log, not to Ray's logger
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    })
    if not gpus:
        t = threads or max(1, int(resources.get("CPU", n)) // n)
        worker_env.update({"XLP_TRAIN_DEVICE": "cpu", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(t)})
    worker_env.update(extra_env or {})
    stop_file = logs / "STOP"
    stop_file.unlink(missing_ok=True)
    _clear_rank_logs(logs)
    loop_config = {"run_dir": str(run_dir), "config": str(config), "out_dir": str(out_dir),
                   "shard_dir": str(shard_dir) if shard_dir is not None else None,
                   "env": worker_env, "stop_file": str(stop_file)}
    name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    trainer = TorchTrainer(
        _ray_rank,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=n, use_gpu=gpus > 0, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(out_dir / "ray_train"), name=name,
                             failure_config=FailureConfig(max_failures=0),
                             worker_runtime_env={"env_vars": worker_env}),
    )
    _say(stream, f"launch: ray train, {n} workers ({'GPU' if gpus else 'CPU'}; cluster {dict(resources)})")
    box: dict = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    runner = threading.Thread(target=fit, name="xlp-ray-train", daemon=True)
    runner.start()
    pump = threading.Thread(target=_follow_when_created, args=(logs / "rank_0.log", lambda: not runner.is_alive(),
                                                               stream), daemon=True)
    pump.start()
    received: list[int] = []

    def forward(signum, frame):  # noqa: ARG001
        received.append(signum)
        stop_file.touch()  # every worker watches it: saves a checkpoint and stops

    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            old[s] = signal.signal(s, forward)
    try:
        while runner.is_alive():
            runner.join(0.2)
    except BaseException:  # e.g. Ray cancelling the stage task: let the workers save, then go
        forward(signal.SIGTERM, None)
        runner.join(grace_s)
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        pump.join(timeout=10)
    error = box.get("error")
    if error is None:
        return n
    err_rank = _first_error_rank(logs)
    if err_rank is None and received:
        name = signal.Signals(received[0]).name
        raise TrainInterrupted(f"train stopped by {name}; the ranks saved a checkpoint "
                               f"({out_dir / 'checkpoints'}); rerun the stage to resume")
    failures = getattr(error, "worker_failures", None) or {}
    rank = err_rank if err_rank is not None else (min(failures) if failures else 0)
    cause = failures.get(rank, error)
    why = _why(out_dir, rank, 1) if err_rank is not None else f"{type(cause).__name__}: {str(cause).strip()[-2000:]}"
    log = logs / f"rank_{rank}.log"
    raise TrainFailed(f"train rank {rank} failed (Ray Train): {why}\n--- last lines of {log} ---\n{tail(log)}")


def _ray_rank(config: dict) -> None:
    """A Ray Train worker: this rank's output to RUN_DIR/train/logs/rank_<r>.log, a stop request (the
    launcher touches logs/STOP) turned into the SIGTERM stop of pipeline.train.main, then the rank."""
    os.environ.update(config.get("env") or {})
    import ray.train

    from pipeline.train import main as train_main

    rank = ray.train.get_context().get_world_rank()
    log_path = Path(config["out_dir"]) / "logs" / f"rank_{rank}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stop_file = Path(config["stop_file"])
    finished = threading.Event()

    def watch() -> None:  # the loop runs outside the main thread here: no signal handlers
        while not finished.wait(0.5):
            if stop_file.exists():
                train_main.STOP["signal"] = signal.SIGTERM
                return

    threading.Thread(target=watch, daemon=True).start()
    try:
        with output_to(log_path, append=False):
            args = {k: config[k] for k in ("run_dir", "config", "out_dir", "shard_dir") if config.get(k)}
            train_main.ray_train_loop(args)
    finally:
        finished.set()
