"""Start the training ranks on this machine and watch them.

One rank per GPU, or `train.cpu_processes` gloo ranks when there is none (or XLP_TRAIN_DEVICE=cpu).
Rank 0's output streams to our stdout (and RUN_DIR/train/logs/rank_0.log); the others write only their
log. A rank that exits non-zero fails the launch with its log tail; the others are ended. SIGTERM or
SIGINT here is forwarded to the ranks, which save a checkpoint and exit; the ranks also get SIGTERM if
this process dies (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Optional

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


def launch(run_dir: Path, *, config: Path, cpu_processes: int, out_dir: Optional[Path] = None,
           shard_dir: Optional[Path] = None, threads: int = 0, stream: Optional[IO[str]] = None,
           extra_env: Optional[dict] = None, grace_s: float = 600.0) -> int:
    """Run the ranks to completion. Returns the number of ranks; raises TrainFailed/TrainInterrupted."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "train")
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stream = stream or sys.stdout
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
