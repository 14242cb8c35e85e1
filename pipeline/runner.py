"""Runs the stages of a pipeline that are missing or stale, each as a Ray task.

For each stage, in dependency order: a stage whose `stage.json` says done with the current
fingerprint is skipped; otherwise its inputs must be done (run earlier in this call, or before), its
directory is cleared (or kept, when an interrupted attempt with the same fingerprint can resume), and
its function runs as a Ray task in the embedded (or connected) Ray instance. The stage's output goes
to `RUN_DIR/<stage>/stage.log`, which this process echoes to the terminal (what the stage writes in this
attempt; a failure's traceback stays in the log, the terminal gets the stage's own message), so Ray's own
log lines stay out of the user's way.
"""
from __future__ import annotations

import _thread
import codecs
import ctypes
import functools
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, TextIO

from omegaconf import DictConfig

from xlp.pipeline.core.config import seal_run_config
from xlp.pipeline.core.errors import PipelineError
from xlp.pipeline.core.layout import CTRL_C, STOP_REQUESTED, RunLayout, check_stale_dir
from xlp.pipeline.core.lock import RunLock
from xlp.pipeline.core.node import RayNodeLost, RetryableFault, ray_fault
from xlp.pipeline.core.preflight import check_run, config_notes
from xlp.pipeline.core.registry import STAGES
from xlp.pipeline.core.secrets import forwarded_env, redact_config_yaml, redact_text
from xlp.pipeline.core.stage import (
    Stage,
    StageContext,
    StageMarker,
    atomic_write_text,
    fingerprints,
    input_digests,
    marker_status,
    output_hashes,
    output_to,
    read_marker,
    toposort,
    trajectories,
)

TASK_ENDED = ".task-ended"  # written by the stage's task when its function has returned or raised
HEARTBEAT_S = 10.0


# The stage's task writes what is for its log file only (a failed stage's traceback, the note that a stop
# was requested) between these lines; the terminal gets the stage's own message and the log's path instead.
LOG_ONLY_BEGIN = "[xlp] --- for the log only (not shown on the terminal) ---\n"
LOG_ONLY_END = "[xlp] --- end of the log-only part ---\n"


class Stopped(KeyboardInterrupt):
    """SIGTERM (preemption, a scheduler's time limit, `kill`) or Ctrl-C: stop the running stage gracefully.
    Its argument says which: "SIGTERM" or CTRL_C."""


class _StopRequests:
    """Signals received while a stage runs. The handler only records them: an exception raised
    inside ray.wait leaves Ray unable to cancel the task afterwards, so the wait loop checks."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def handler(self, signum, frame):  # noqa: ARG002
        self.received.append(signum)
        if signum == signal.SIGINT and self.received.count(signal.SIGINT) > 1:
            raise KeyboardInterrupt  # a second Ctrl-C: stop waiting at once

    def pending(self) -> str | None:
        """What asked the run to stop: the first signal. Ray's processes share the terminal's process group, so
        a Ctrl-C reaches them too, and what they do then (a SIGTERM back to the driver) is not the user's ask."""
        if not self.received:
            return None
        return "SIGTERM" if self.received[0] == signal.SIGTERM else CTRL_C


_stop_requests = _StopRequests()


# How long a stopped stage may take to wind down (the train stage saves a checkpoint).
STOP_GRACE_S = float(os.environ.get("XLP_STOP_GRACE_S", "600"))


@dataclass
class StageState:
    """What `xlp status` shows for one stage."""

    name: str
    status: str  # done | stale | running | failed | pending
    fingerprint: str  # the fingerprint the current config gives
    marker: dict

    @property
    def duration_s(self) -> Optional[float]:
        return self.marker.get("duration_s")

    @property
    def damaged(self) -> Optional[str]:
        """What is wrong with the stage's marker or its recorded outputs (the stage reads as failed)."""
        return self.marker.get("damaged")


def stage_states(stages: list[Stage], cfg: DictConfig, run_dir: Path) -> list[StageState]:
    """Each stage's status in `run_dir` relative to `cfg`."""
    fps = fingerprints(stages, cfg)
    layout = RunLayout(run_dir)
    states = []
    for stage in toposort(stages):
        marker = read_marker(stage, layout.stage_dir(stage.name))
        status = marker_status(marker, fps[stage.name], run_dir)
        states.append(StageState(stage.name, status, fps[stage.name], marker))
    return states


def run_pipeline(
    cfg: DictConfig,
    *,
    stages: list[Stage] | None = None,
    only: Iterable[str] | None = None,
    force: bool = False,
    run_dir: str | os.PathLike | None = None,
    out: TextIO | None = None,
    rerun: Sequence[str] | None = None,
) -> dict[str, str]:
    """Run what is missing or stale. Returns {stage: "ran" | "skipped"}; raises PipelineError.

    rerun: the user's command without --stages and --force (`xlp run CONFIG key=value ... [--run-dir D]`),
    from which the hint for a stage whose inputs are not done is made (so it keeps their overrides)."""
    if stages is None:
        stages = STAGES
    out = out or sys.stdout
    run_dir = Path(run_dir or cfg.run.dir).absolute()
    order = toposort(stages)
    names = [s.name for s in order]
    selected = list(names) if only is None else list(only)
    unknown = [n for n in selected if n not in names]
    if unknown:
        raise PipelineError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(names)}")
    check_run(cfg, selected)  # settings that cannot work together, refused before the first stage

    layout = RunLayout(run_dir)
    lock = RunLock(run_dir)
    lock.acquire()
    # credentials masked (pipeline/core/secrets.py); sealed with its sha256, so a damaged copy is never read
    atomic_write_text(layout.config, seal_run_config(redact_config_yaml(cfg)))
    inputs = input_digests(stages, cfg)  # the input listings, made once
    fps = fingerprints(stages, cfg, inputs=inputs)
    trajs = trajectories(stages, cfg, inputs=inputs)
    print(f"run dir: {run_dir}", file=out)
    for note in config_notes(cfg):
        print(f"note: {note}", file=out)

    outcome: dict[str, str] = {}
    started_ray = False
    previous_sigterm = None
    try:
        # before Ray starts: a selected stage whose inputs are not done, nor selected, cannot run
        for stage in order:
            if stage.name in selected:
                _check_inputs(stage, stages, run_dir, fps, rerun, selected)
        started_ray = _ensure_ray() is not None
        # Tasks of an embedded Ray are this process's children and inherit its environment; on a Ray
        # this process did not start, the stage tasks get the variables our code reads from it.
        env = None if _ray_mode == "embedded" else forwarded_env()
        # After ray.init, which installs a SIGTERM handler of its own that aborts the driver.
        if threading.current_thread() is threading.main_thread():
            _stop_requests.received.clear()
            previous_sigterm = (signal.signal(signal.SIGTERM, _stop_requests.handler),
                                signal.signal(signal.SIGINT, _stop_requests.handler))
        for stage in order:
            if stage.name not in selected:
                continue
            stage_dir = layout.stage_dir(stage.name)
            marker = read_marker(stage, stage_dir)
            fp = fps[stage.name]
            if marker.get("status") == "done" and marker.get("fingerprint") == fp and not force:
                print(f"= {stage.name}: done (fingerprint {fp}), skipped", file=out)
                outcome[stage.name] = "skipped"
                continue
            _check_inputs(stage, stages, run_dir, fps, rerun)
            resumed = _prepare_dir(stage, layout, marker, fp, trajs[stage.name], force, out)
            _run_one(stage, cfg, run_dir, fp, trajs[stage.name], resumed, out, env)
            outcome[stage.name] = "ran"
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm[0])
            signal.signal(signal.SIGINT, previous_sigterm[1])
        if started_ray:
            _disconnect_ray()
        lock.release()
    return outcome


def _check_inputs(stage: Stage, stages: list[Stage], run_dir: Path, fps: dict[str, str],
                  rerun: Sequence[str] | None, selected: Iterable[str] = ()) -> None:
    """PipelineError when a stage `stage` needs is not done (and not among `selected`, which run before
    it in this call), with the command that makes them: the user's own (`rerun`), shell-quoted, with
    --stages naming every upstream stage that is not done."""
    if all(dep in selected for dep in stage.needs):
        return
    by_name = {s.name: s for s in stages}
    layout = RunLayout(run_dir)
    markers: dict[str, dict] = {}
    status: dict[str, str] = {}
    # only the stages upstream: a marker's read checks the outputs it records (a train stage's checkpoints)
    for s in toposort(stages):
        if s.name in _upstream(stage.name, by_name):
            markers[s.name] = read_marker(s, layout.stage_dir(s.name))
            status[s.name] = marker_status(markers[s.name], fps[s.name])
    for dep in stage.needs:
        if status[dep] == "done" or dep in selected:
            continue
        todo = [name for name in status if status[name] != "done"]  # in dependency order
        base = list(rerun) if rerun else ["xlp", "run", "CONFIG"]
        cmd = shlex.join(base + ["--stages", ",".join(todo)])
        if not rerun:  # a placeholder, not a command to paste as it is
            cmd = cmd.replace("CONFIG", "CONFIG [key=value ...]", 1)
        why = f" ({markers[dep]['damaged']})" if markers[dep].get("damaged") else ""
        raise PipelineError(
            f"stage {stage.name!r} needs stage {dep!r}, which is {status[dep]} in {run_dir}{why}: "
            f"run `{cmd}` first (or run without --stages)"
        )


def _upstream(name: str, by_name: dict[str, Stage]) -> set[str]:
    """Every stage `name` needs, directly or through others."""
    seen: set[str] = set()
    todo = list(by_name[name].needs)
    while todo:
        dep = todo.pop()
        if dep not in seen:
            seen.add(dep)
            todo.extend(by_name[dep].needs)
    return seen


def _prepare_dir(stage: Stage, layout: RunLayout, marker: dict, fp: str, trajectory: str, force: bool,
                 out: TextIO) -> bool:
    """Keep the outputs of an interrupted attempt with the same fingerprint, or of the same trajectory
    (the stage continues them); move any other output aside to RUN_DIR/.stale/, never delete it.
    A damaged marker (or a done stage whose recorded outputs changed) is an interrupted attempt: of this
    fingerprint, or of an unknown one when none can be read from it (the stage checks what it keeps:
    shards against their records, checkpoints against their hashes). Returns `resumed`."""
    stage_dir = layout.stage_dir(stage.name)
    damaged = marker.get("damaged")
    unknown = bool(damaged) and "fingerprint" not in marker
    same_fp = (marker.get("fingerprint") == fp or unknown) and marker.get("status") in ("running", "failed")
    same_trajectory = bool(stage.continues) and marker.get("trajectory") == trajectory
    keep = stage.resumable and not force and stage_dir.exists() and (same_fp or same_trajectory)
    if damaged and keep:
        print(f"~ {stage.name}: {damaged}; resuming the stage: what it finished is checked and kept",
              file=out, flush=True)
    elif keep and not same_fp:
        print(f"~ {stage.name}: the config changed only in {', '.join(stage.continues)}: continuing the "
              f"existing output (fingerprint {marker.get('fingerprint')} -> {fp})", file=out, flush=True)
    elif stage_dir.exists() and not keep and any(stage_dir.iterdir()):
        kept = keep_stale(layout, stage.name, marker)
        why = "--force" if force else "its config changed"
        if damaged and not force:
            why = (f"{damaged}; the stage reruns from the start" if not stage.resumable else
                   f"{damaged}, written with another config (fingerprint {marker.get('fingerprint')})")
        print(f"~ {stage.name}: {why}; the previous output is kept in {kept} (`xlp clean {layout.root}` "
              "removes it)", file=out, flush=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    return keep


def keep_stale(layout: RunLayout, stage: str, marker: dict) -> Path:
    """Move RUN_DIR/<stage> to RUN_DIR/.stale/<stage>-<its fingerprint> (one atomic rename)."""
    fp = marker.get("fingerprint") or f"unmarked-{time.strftime('%Y%m%d-%H%M%S')}"
    check_stale_dir(layout)
    target = layout.stale_output(stage, fp)
    n = 1
    while target.exists():
        n += 1
        target = layout.stale_output(stage, f"{fp}.{n}")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(layout.stage_dir(stage), target)
    return target


def stale_outputs(run_dir: Path) -> list[tuple[Path, int]]:
    """(path, bytes) of every output kept in RUN_DIR/.stale/, oldest first."""
    root = RunLayout(run_dir).stale_dir
    if not root.is_dir():
        return []
    found = sorted(root.iterdir(), key=lambda p: p.stat().st_mtime)
    return [(p, _tree_bytes(p)) for p in found]


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def clean(run_dir: Path, out: TextIO) -> int:
    """Delete the outputs kept in RUN_DIR/.stale/, printing each and what it frees. Returns bytes freed."""
    lock = RunLock(Path(run_dir))
    lock.acquire()  # not while an `xlp run` may be moving outputs there
    try:
        check_stale_dir(RunLayout(run_dir))  # deletes only what is in the run directory
        freed = 0
        for path, size in stale_outputs(run_dir):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            print(f"removed {path} ({human_bytes(size)})", file=out)
            freed += size
        print(f"freed {human_bytes(freed)}" if freed else f"nothing to clean in {RunLayout(run_dir).stale_dir}", file=out)
        return freed
    finally:
        lock.release()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _run_one(stage: Stage, cfg: DictConfig, run_dir: Path, fp: str, trajectory: str, resumed: bool,
             out: TextIO, env: Optional[tuple[dict[str, str], dict[str, str]]] = None) -> None:
    """Run one stage as a Ray task. `env`: (plain, secret) variables to give the task (forwarded_env):
    the plain ones in its runtime environment, the secret ones as an object it reads (never logged)."""
    import ray

    layout = RunLayout(run_dir)
    stage_dir, marker_path = layout.stage_dir(stage.name), layout.stage_json(stage.name)
    log_path = layout.stage_log(stage.name)
    marker = StageMarker(marker_path, stage.name, fingerprint=fp, trajectory=trajectory, resumed=resumed)
    how = "resuming" if resumed else "running"
    print(f"> {stage.name}: {how} (fingerprint {fp}); log: {log_path}", file=out, flush=True)

    ended_marker = stage_dir / TASK_ENDED
    ended_marker.unlink(missing_ok=True)
    (stage_dir / STOP_REQUESTED).unlink(missing_ok=True)
    tail = _LogTail(log_path, out)  # before the task starts: a resumed stage appends to its old log
    remote, secret = _remote_stage(), {}
    if env is not None:
        plain, secret = env
        remote = remote.options(runtime_env={"env_vars": plain})
    task = remote.remote(stage, cfg, str(run_dir), fp, resumed, str(log_path), ray.put(secret))
    try:
        last_beat = time.time()
        while True:
            ready, _ = ray.wait([task], timeout=0.5)
            tail.pump()
            if _stop_requests.pending():
                raise Stopped()
            if time.time() - last_beat > HEARTBEAT_S:
                last_beat = time.time()
                marker.beat()
            if ready:
                break
        metrics = ray.get(task)
    except KeyboardInterrupt:  # Stopped (SIGTERM or a first Ctrl-C), or a second Ctrl-C
        why = _stop_requests.pending() or CTRL_C
        print(f"! {stage.name}: {why}: stopping the stage (up to {STOP_GRACE_S:.0f}s to wind down)", file=out, flush=True)
        # The task raises KeyboardInterrupt inside the stage when it sees the request file, so the
        # stage can save its state (the train stage checkpoints); only if it does not end in time
        # is it killed. (Not ray.cancel: its interrupt does nothing in a worker that inherited
        # SIGINT ignored, e.g. under `nohup ... &`; the task's watcher handles that.) Wait for the
        # task's own end marker.
        atomic_write_text(stage_dir / STOP_REQUESTED, why + "\n")  # the train ranks name it in their log
        deadline = time.time() + STOP_GRACE_S
        while not ended_marker.exists() and time.time() < deadline:
            time.sleep(0.5)
            tail.pump()
        tail.pump(final=True)
        if not ended_marker.exists():
            ray.cancel(task, force=True)
        marker.failed(f"interrupted ({why}); rerun to resume")
        raise Stopped(why) from None
    except Exception as e:  # the stage raised: Ray wraps it; show the stage's own message
        tail.pump(final=True)
        cause = _stage_error(e)
        fault = None if isinstance(cause, RetryableFault) else ray_fault(e)
        if fault is not None:  # the stage's own task was lost (its node died, its process was killed)
            cause = RayNodeLost(_lost_message(fault))
        message = f"{type(cause).__name__}: {cause}".strip()
        marker.failed(message)

        raise PipelineError(
            f"stage {stage.name!r} failed: {_first_lines(message)}\n  full log: {log_path}",
            retryable=isinstance(cause, RetryableFault)) from None
    tail.pump(final=True)
    marker.done(metrics or {}, outputs=output_hashes(stage, stage_dir))
    print(f"+ {stage.name}: done in {marker.data['duration_s']:.1f}s {_short_metrics(stage, metrics)}", file=out,
          flush=True)


def _stage_error(error: BaseException) -> BaseException:
    """The stage's own exception inside Ray's wrappers: a RayTaskError (from the stage's task, or from a
    task the stage waited for, e.g. a data task that met a bad record) carries the remote traceback in its
    text, which the log already holds."""
    from ray.exceptions import RayTaskError

    seen: set[int] = set()
    while isinstance(error, RayTaskError) and id(error) not in seen:
        seen.add(id(error))
        cause = getattr(error, "cause", None)
        if not isinstance(cause, BaseException):
            break
        error = cause
    return error


def _lost_message(fault: BaseException) -> str:
    said = " ".join(str(fault).split())
    return f"the Ray cluster lost a node or a worker process the stage used ({type(fault).__name__}: {said[:500]})"


def _first_lines(text: str, n: int = 12) -> str:
    lines = text.strip().splitlines()
    return "\n".join(lines[-n:]) if len(lines) > n else text.strip()


def _short_metrics(stage: Stage, metrics: dict | None) -> str:
    if not metrics:
        return ""
    keys = [k for k in stage.headline if k in metrics] or list(metrics)[:4]
    return " ".join(f"{k}={_fmt(metrics[k])}" for k in keys)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class _LogTail:
    """Echoes what the stage appends to its log file in this attempt (from the size the log had when the
    tail was made: a resumed or continued stage appends to the log of its earlier attempts), without the
    log-only parts (LOG_ONLY_BEGIN ... LOG_ONLY_END)."""

    def __init__(self, path: Path, out: TextIO):
        self.path, self.out = path, out
        try:
            self.pos = path.stat().st_size
        except FileNotFoundError:
            self.pos = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""  # text that may be the start of a marker, echoed (or not) once the rest is read
        self.muted = False

    def pump(self, final: bool = False) -> None:
        """Echo what is new; `final`: the stage has ended, echo what was held back too."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except FileNotFoundError:
            return
        self.pos += len(chunk)
        text = self.held + self.decoder.decode(chunk, final=final)
        self.held = ""
        shown = []
        while text:
            marker = LOG_ONLY_END if self.muted else LOG_ONLY_BEGIN
            i = text.find(marker)
            if i < 0:
                if not final:
                    keep = _marker_start(text, marker)
                    text, self.held = text[:len(text) - keep], text[len(text) - keep:]
                if not self.muted:
                    shown.append(text)
                break
            if not self.muted:
                shown.append(text[:i])
            text = text[i + len(marker):]
            self.muted = not self.muted
        if any(shown):
            self.out.write("".join(shown))
            self.out.flush()


def _marker_start(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (0: none)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def log_only(text: str) -> None:
    """Write `text` to the stage's log (the task's stderr) between the markers the terminal's echo leaves out."""
    sys.stdout.flush()
    sys.stderr.write(f"{LOG_ONLY_BEGIN}{text.rstrip(chr(10))}\n{LOG_ONLY_END}")
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# Ray


_ray_mode: Optional[str] = None  # how _ensure_ray last connected this process


def _ensure_ray() -> Optional[str]:
    """Connect to Ray: the cluster in RAY_ADDRESS if set ("connected"), else start an embedded one
    ("embedded"); None when this process is connected already (whoever connected it disconnects)."""
    import ray

    if ray.is_initialized():
        return None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if not os.environ.get("RAY_ADDRESS"):
        # "local": a new embedded instance, even when a `ray start` cluster runs on this machine
        # (plain ray.init() would join that one).
        kwargs.update(address="local", num_cpus=os.cpu_count())
        # An embedded start can time out on a loaded machine ("The current node timed out during
        # startup"): one more try before the run fails, naming both causes.
        try:
            ray.init(**kwargs)
        except Exception as first:  # noqa: BLE001 - Ray raises a bare Exception for a failed start
            ray.shutdown()
            try:
                ray.init(**kwargs)
            except Exception as second:  # noqa: BLE001
                ray.shutdown()
                raise PipelineError(f"could not start an embedded Ray instance, twice: {first}; then: {second}",
                                    retryable=True) from second
    else:
        ray.init(**kwargs)
    _private_ray_token()
    global _ray_mode
    _ray_mode = "connected" if os.environ.get("RAY_ADDRESS") else "embedded"
    return _ray_mode


def _disconnect_ray() -> None:
    """Undo _ensure_ray: stop the embedded Ray, or leave the cluster."""
    import ray

    global _ray_mode
    ray.shutdown()
    _ray_mode = None


def _private_ray_token() -> None:
    """Make ~/.ray/auth_token its owner's only: an embedded Ray writes it when there is none, with the
    umask's mode (readable by every user under the usual 022), and whoever holds it can run code on
    every Ray cluster of this user that uses it."""
    token = Path.home() / ".ray" / "auth_token"
    try:
        info = token.stat()
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            token.chmod(0o600)
    except OSError:
        pass  # none (token authentication off), or not ours to change


def _execute_stage_impl(stage: Stage, cfg: DictConfig, run_dir: str, fp: str, resumed: bool, log_path: str,
                        secret_env: Optional[dict[str, str]] = None) -> dict:
    os.environ.update(secret_env or {})  # a worker of this run only (Ray starts one per job)
    ctx = StageContext(
        name=stage.name, cfg=stage.view(cfg), run_dir=Path(run_dir), fingerprint=fp, resumed=resumed, log_file=Path(log_path)
    )
    watcher = _StopWatcher(Path(log_path).with_name(STOP_REQUESTED))
    try:
        with output_to(Path(log_path)):
            try:
                return stage.load_fn()(ctx) or {}
            except BaseException as e:
                log_only(redact_text(traceback.format_exc()))
                # Decided here, where the whole chain is: only the outermost exception crosses to the driver.
                fault = ray_fault(e) if isinstance(e, Exception) and not isinstance(e, RetryableFault) else None
                if fault is not None:
                    raise RayNodeLost(_lost_message(fault)) from e
                raise
    finally:
        try:
            watcher.close()
        finally:
            Path(log_path).with_name(TASK_ENDED).touch()


class _StopWatcher:
    """Raises KeyboardInterrupt once in the thread that runs the stage when the driver's stop-request
    file appears (as Ctrl-C would: signal handlers the stage installed see it as SIGINT)."""

    def __init__(self, path: Path, poll_s: float = 0.2):
        self.path, self.poll_s = path, poll_s
        self.target = threading.current_thread()
        self.previous_sigint = None
        if self.target is threading.main_thread() and signal.getsignal(signal.SIGINT) in (signal.SIG_IGN,
                                                                                           signal.SIG_DFL, None):
            # A process started in the background (`nohup xlp run ... &`, a CI job) inherits SIGINT
            # ignored, and then interrupt_main (like Ray's own cancel) does nothing.
            self.previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="xlp-stop-watcher", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.closed.wait(self.poll_s):
            if self.path.exists():
                log_only(f"[xlp] stop requested: interrupting the stage (thread {self.target.name}, "
                         f"SIGINT handler {signal.getsignal(signal.SIGINT)!r})")
                if self.target is threading.main_thread():
                    _thread.interrupt_main()
                else:  # not the main thread: no signal reaches it; an asynchronous exception does
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.target.ident),
                                                               ctypes.py_object(KeyboardInterrupt))
                return

    def close(self) -> None:
        self.closed.set()
        self.thread.join()
        if self.previous_sigint is not None:
            signal.signal(signal.SIGINT, self.previous_sigint)


@functools.cache
def _remote_stage() -> Callable:
    import ray

    # num_cpus=0: the stage's own work runs in the Ray tasks or processes it starts.
    return ray.remote(num_cpus=0, max_retries=0)(_execute_stage_impl)


