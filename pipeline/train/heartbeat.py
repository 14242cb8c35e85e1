"""Per-rank heartbeats, and the launcher's judgement of them: a rank that hangs or is lost is named.

Each rank writes RUN_DIR/train/logs/heartbeat_<rank>.json (atomically, so a reader never sees half):

    {"rank": 1, "node": "xlp-node2", "pid": 1234, "phase": "train", "step": 7, "reading_data": false,
     "alive_at": <unix time>, "progress_at": <unix time>, "ended": false}

A daemon thread rewrites it every few seconds with a fresh `alive_at`: that stops when the process is
stopped (SIGSTOP), killed, or its node dies, but not while the loop waits in a collective. The training
loop refreshes `progress_at` (in memory; the thread writes it) at each step and phase change: that stops
when the loop is stuck, e.g. in a collective that a peer never joins. `reading_data` is set while the
loop waits for its next batch: a rank stuck reading (a hung network file system) is then told apart
from its peers, which wait for it in the step's first collective. Only the thread writes the file,
so a fast loop costs no file system traffic. `ended` is set when the rank's work is over (done, stopped
or failed with its own error), so a rank that is finished is never judged silent.

The launcher (xlp.pipeline.cluster.launch.supervise) runs a `HangDetector` over the files. It measures silence
on its own clock, from when it saw a file's `alive_at` (or `progress_at`) last change, so the ranks'
clocks need not agree with the launcher's.
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from xlp.pipeline.core.layout import TrainLayout
from xlp.pipeline.core.node import node_name
from xlp.pipeline.core.stage import atomic_write_json

# A rank's phases in the order it goes through them within a step (setup comes once, before step 1;
# validate and save follow a step's training; finish comes once, after the last step).
PHASES = ("setup", "train", "validate", "save", "finish")

# A rank with no first heartbeat this many hang_timeouts after another rank's first is judged never
# started. Generous: ranks on a loaded cluster start (srun, Ray, imports from a shared file system)
# minutes apart, and a rank that is merely slow to start must not fail the run.
NEVER_STARTED_TIMEOUTS = 2.0


def beat_interval(hang_timeout: float) -> float:
    """Seconds between a rank's heartbeats: a tenth of hang_timeout, within 0.5-5 s (5 s when the hang
    check is off: the heartbeats still say where each rank runs)."""
    if hang_timeout <= 0:
        return 5.0
    return min(5.0, max(0.5, hang_timeout / 10))


class Heartbeat:
    """This rank's heartbeat file (see the module docstring).

        beat = Heartbeat(layout.heartbeat(rank), rank=rank, interval_s=beat_interval(tc.hang_timeout)).start()
        beat.progress(step, "train")     # at each step and phase change
        beat.close()                     # the rank's work is over
    """

    def __init__(self, path: Path, *, rank: int, interval_s: float):
        self.path = Path(path)
        self.interval_s = float(interval_s)
        now = time.time()
        self.state: dict = {"rank": int(rank), "node": node_name(), "pid": os.getpid(), "phase": "setup",
                            "step": 0, "reading_data": False, "alive_at": now, "progress_at": now, "ended": False}
        ray_node = _ray_node_id()
        if ray_node:  # the launcher ends a hung Ray Train worker through a task on its node
            self.state["ray_node_id"] = ray_node
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Heartbeat":
        self.write()
        self._thread = threading.Thread(target=self._beat, name="xlp-heartbeat", daemon=True)
        self._thread.start()
        return self

    def progress(self, step: int, phase: str, *, reading_data: bool = False) -> None:
        """The loop moved on: it is at `step` (the step it works on, or last finished) in `phase`, and
        about to wait for its next batch of data (reading_data) or past that."""
        if phase not in PHASES:
            raise ValueError(f"heartbeat phase {phase!r}; valid phases: {', '.join(PHASES)}")
        with self._lock:
            self.state.update(step=int(step), phase=phase, reading_data=bool(reading_data),
                              progress_at=time.time())

    def write(self) -> None:
        with self._lock:
            self.state["alive_at"] = time.time()
            snapshot = dict(self.state)
        try:
            atomic_write_json(self.path, snapshot)
        except OSError as e:  # a full or flaky file system must not end the rank; the next beat retries
            print(f"heartbeat: cannot write {self.path}: {e}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """The rank's work is over (done, stopped, or failed with its own error): say so, stop beating."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            self.state["ended"] = True
        self.write()

    def _beat(self) -> None:
        while not self._closed.wait(self.interval_s):
            self.write()


def _ray_node_id() -> Optional[str]:
    if "ray" not in sys.modules:
        return None
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001  (not in a Ray worker after all)
        return None


_FIELDS = {"rank": int, "node": str, "pid": int, "phase": str, "step": int, "alive_at": (int, float),
           "progress_at": (int, float)}


def read_heartbeat(path: Path) -> Optional[dict]:
    """A heartbeat file's content; None when there is none (yet), or it cannot be read or is not one
    (a file that is not a heartbeat must not fail the launcher that reads it)."""
    try:
        beat = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(beat, dict) or not all(isinstance(beat.get(k), t) for k, t in _FIELDS.items()):
        return None
    return beat


def describe(rank: int, beat: Optional[dict]) -> str:
    """"rank 1 on node xlp-node2 (pid 1234)", as much of it as the heartbeat says."""
    if not beat:
        return f"rank {rank}"
    return f"rank {rank} on node {beat.get('node', '?')} (pid {beat.get('pid', '?')})"


def last_position(beat: Optional[dict]) -> str:
    """"step 7, train" (", reading data") from a heartbeat; "no heartbeat" when there is none."""
    if not beat:
        return "no heartbeat"
    reading = ", reading data" if beat.get("reading_data") else ""
    return f"step {beat.get('step', '?')}, {beat.get('phase', '?')}{reading}"


# ---------------------------------------------------------------------------------------------
# The launcher's side


@dataclass(frozen=True)
class Hang:
    """What the detector found: the rank(s) to blame, and a message naming them."""

    ranks: tuple[int, ...]
    message: str


@dataclass
class _Seen:
    beat: dict
    alive_changed: float  # detector clock when `alive_at` last changed
    progress_changed: float  # ... when `progress_at` last changed


class HangDetector:
    """Judges the heartbeat files of `world_size` ranks, on the caller's monotonic clock:

        detector = HangDetector(layout, world_size=n, hang_timeout=600)
        hang = detector.check(time.monotonic())      # every second or so; None: all is well

    A rank is judged only from its first heartbeat on (its start-up, DeepSpeed set-up and JIT builds
    before that may take long); one with none at all is judged never started only when it is still
    missing NEVER_STARTED_TIMEOUTS x hang_timeout after the first rank's first heartbeat.
    """

    def __init__(self, layout: TrainLayout, *, world_size: int, hang_timeout: float):
        if not hang_timeout > 0:
            raise ValueError(f"hang_timeout is {hang_timeout}; the detector needs a positive one")
        self.layout, self.world_size, self.hang_timeout = layout, int(world_size), float(hang_timeout)
        # how often to check: often enough to judge within a few percent of hang_timeout, seldom
        # enough that thousands of ranks' files on a shared file system cost nothing
        self.check_every_s = min(10.0, max(1.0, self.hang_timeout / 20))
        self.seen: dict[int, _Seen] = {}
        self.first_beat_at: Optional[float] = None

    def check(self, now: float) -> Optional[Hang]:
        """Read the heartbeats; a Hang when a rank is silent, never started, or every rank is stuck."""
        self._read(now)
        return self._silent(now) or self._never_started(now) or self._stuck(now)

    def _read(self, now: float) -> None:
        for rank in range(self.world_size):
            beat = read_heartbeat(self.layout.heartbeat(rank))
            if beat is None:
                continue
            seen = self.seen.get(rank)
            if seen is None:
                self.seen[rank] = _Seen(beat, now, now)
                self.first_beat_at = now if self.first_beat_at is None else self.first_beat_at
                continue
            if beat.get("alive_at") != seen.beat.get("alive_at"):
                seen.alive_changed = now
            if beat.get("progress_at") != seen.beat.get("progress_at"):
                seen.progress_changed = now
            seen.beat = beat

    def _running(self) -> dict[int, _Seen]:
        return {r: s for r, s in self.seen.items() if not s.beat.get("ended")}

    def _silent(self, now: float) -> Optional[Hang]:
        silent = sorted((now - s.alive_changed, r) for r, s in self._running().items()
                        if now - s.alive_changed > self.hang_timeout)
        if not silent:
            return None
        quiet_s, rank = silent[-1]  # the longest silent: the first to stop
        beat = self.seen[rank].beat
        others = [r for _, r in silent if r != rank]
        also = f"; also silent: rank{'s' if len(others) > 1 else ''} {_ranks(others)}" if others else ""
        return Hang((rank, *sorted(others)),
                    f"train {describe(rank, beat)} stopped responding: no heartbeat for {math.ceil(quiet_s)} s "
                    f"(last: {last_position(beat)}){also}; hang_timeout is {self.hang_timeout:g} s")

    def _never_started(self, now: float) -> Optional[Hang]:
        if self.first_beat_at is None:
            return None
        waited = now - self.first_beat_at
        if waited <= NEVER_STARTED_TIMEOUTS * self.hang_timeout:
            return None
        missing = [r for r in range(self.world_size) if r not in self.seen]
        if not missing:
            return None
        return Hang(tuple(missing),
                    f"train rank{'s' if len(missing) > 1 else ''} {_ranks(missing)} never started: no heartbeat "
                    f"{math.ceil(waited)} s after the first rank's first one ({NEVER_STARTED_TIMEOUTS:g} x "
                    f"hang_timeout; hang_timeout is {self.hang_timeout:g} s)")

    def _stuck(self, now: float) -> Optional[Hang]:
        """Every rank alive, none making progress once training has begun: they wait for each other in
        a collective. The ones furthest behind (lowest step, then phase) are the ones the others wait for."""
        running = self._running()
        if not running or len(self.seen) < self.world_size:
            return None
        if all(s.beat.get("phase") == "setup" for s in self.seen.values()):
            return None  # set-up (checkpoint restore, engine, loaders) is not judged: it may take long
        idle_s = now - max(s.progress_changed for s in running.values())
        if idle_s <= self.hang_timeout:
            return None
        lowest = min(_position(s.beat) for s in running.values())
        behind = sorted(r for r, s in running.items() if _position(s.beat) == lowest)
        position = last_position(running[behind[0]].beat)
        if len(behind) == len(running) and len(running) > 1:
            who = f"every rank is at {position}: " + ", ".join(describe(r, running[r].beat) for r in behind)
        else:
            who = (f"{'; '.join(describe(r, running[r].beat) for r in behind)} "
                   f"{'is' if len(behind) == 1 else 'are'} behind the others, at {position}")
        return Hang(tuple(behind),
                    f"train ranks made no progress for {math.ceil(idle_s)} s while every rank is alive (stuck in a "
                    f"collective?): {who}; hang_timeout is {self.hang_timeout:g} s")


def _position(beat: dict) -> tuple[int, int, int]:
    """How far a rank got: step, then phase, then past reading its data."""
    phase = beat["phase"]
    return beat["step"], PHASES.index(phase) if phase in PHASES else 0, 0 if beat.get("reading_data") else 1


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)
