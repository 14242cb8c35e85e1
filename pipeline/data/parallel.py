"""Run one Ray task per partition, at most `num_workers` at once, with one progress bar for all.

Tasks are plain functions `fn(item, report)`; `report(nbytes, ndocs)` moves the shared progress bar.
Each task keeps its running totals in a small file of `progress_dir` (on the filesystem the run
directory lives on, so tasks on other nodes count too), which the driver sums twice a second. A file
and not a Ray actor: an actor is one more process to start, which cost the shard stage about 12% of
its throughput on 2 cores (python benchmarks/bench_data.py). Results come back in item order, whatever
order tasks finish in.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import ray
from tqdm import tqdm


class Reporter:
    """Keeps a task's running totals in its progress file, rewritten at most every `every_s`."""

    def __init__(self, path: Optional[Path], every_s: float = 0.5):
        self.path, self.every_s = path, every_s
        self.nbytes = self.ndocs = 0
        self.written = 0.0

    def __call__(self, nbytes: int, ndocs: int = 0) -> None:
        self.nbytes += nbytes
        self.ndocs += ndocs
        if time.monotonic() - self.written >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self.written = time.monotonic()
        if self.path is None:
            return
        try:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(f"{self.nbytes} {self.ndocs}")
            os.replace(tmp, self.path)
        except OSError:
            pass  # progress is for the eyes only: never fail the work for it


def read_progress(progress_dir: Path) -> tuple[int, int]:
    """Summed (bytes, docs) of every task's progress file."""
    nbytes = ndocs = 0
    for path in progress_dir.glob("*.progress"):
        try:
            b, d = path.read_text().split()
            nbytes, ndocs = nbytes + int(b), ndocs + int(d)
        except (OSError, ValueError):
            pass  # a file being replaced: counted at the next poll
    return nbytes, ndocs


def _call(fn: Callable, item: Any, progress_file: Optional[str]) -> Any:
    report = Reporter(Path(progress_file) if progress_file else None)
    try:
        return fn(item, report)
    finally:
        report.flush()


_remote_call = ray.remote(num_cpus=1)(_call)


class NodePlacer:
    """Which node each data task goes to: the alive node with the most free CPUs (its CPUs minus the
    tasks we have running there), so a cluster's tasks go to every node. Ray's own SPREAD depends on
    how current the scheduling raylet's view of the other nodes is, and right after a node joined it
    put every task on the driver's node. Soft affinity: a node that is gone by then is skipped."""

    def __init__(self):
        self.cpus = {n["NodeID"]: int(n["Resources"].get("CPU", 0)) for n in ray.nodes()
                     if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1}
        self.running = {node: 0 for node in self.cpus}

    def submit(self, *args: Any) -> tuple[Any, Optional[str]]:
        if not self.cpus:
            return _remote_call.remote(*args), None
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = max(self.cpus, key=lambda n: (self.cpus[n] - self.running[n], -self.running[n]))
        self.running[node] += 1
        strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=True)
        return _remote_call.options(scheduling_strategy=strategy).remote(*args), node

    def done(self, node: Optional[str]) -> None:
        if node is not None:
            self.running[node] -= 1


def default_workers() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_parallel(
    fn: Callable[[Any, Reporter], Any],
    items: Sequence[Any],
    *,
    num_workers: int = 0,
    total_bytes: int = 0,
    done_bytes: int = 0,
    desc: str = "",
    on_result: Optional[Callable[[int, Any], None]] = None,
    progress_dir: Optional[Path] = None,
) -> list[Any]:
    """fn(item, report) for every item as Ray tasks; their results in item order.

    `on_result(i, result)` sees each result as it arrives (it may raise to stop the run: tasks
    still running are cancelled). A progress bar over bytes goes to stderr. `progress_dir`: where
    the tasks keep their progress files (a shared filesystem on a cluster; default: a temporary
    folder on this machine). It is emptied before and removed after.
    """
    if not ray.is_initialized():
        raise RuntimeError("run_parallel needs Ray: call ray.init() first (the pipeline runner does)")
    n_workers = num_workers or default_workers()
    progress = Path(progress_dir) if progress_dir is not None else Path(tempfile.mkdtemp(prefix="xlp-progress-"))
    shutil.rmtree(progress, ignore_errors=True)
    progress.mkdir(parents=True, exist_ok=True)
    fn_ref = ray.put(fn)
    results: list[Any] = [None] * len(items)
    pending: dict[Any, tuple[int, Optional[str]]] = {}  # task -> (item, node)
    placer = NodePlacer()
    next_item = 0
    tty = sys.stderr.isatty()
    bar = tqdm(total=total_bytes or None, initial=done_bytes, unit="B", unit_scale=True, desc=desc,
               file=sys.stderr, mininterval=1.0 if tty else 10.0, dynamic_ncols=tty, disable=False)
    shown = done_bytes
    last_poll = 0.0
    try:
        while next_item < len(items) or pending:
            while next_item < len(items) and len(pending) < n_workers:
                ref, node = placer.submit(fn_ref, items[next_item], str(progress / f"{next_item}.progress"))
                pending[ref] = (next_item, node)
                next_item += 1
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                i, node = pending.pop(ref)
                placer.done(node)
                results[i] = ray.get(ref)
                if on_result is not None:
                    on_result(i, results[i])
            if time.monotonic() - last_poll > 0.5 or not pending:
                last_poll = time.monotonic()
                nbytes, ndocs = read_progress(progress)
                bar.update(done_bytes + nbytes - shown)
                shown = done_bytes + nbytes
                bar.set_postfix(docs=ndocs, refresh=False)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
        shutil.rmtree(progress, ignore_errors=True)
    return results
