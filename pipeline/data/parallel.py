"""Run one Ray task per partition, at most `num_workers` at once, with one progress bar for all.

Tasks are plain functions `fn(item, report)`; `report(nbytes, ndocs)` moves the shared progress bar
(a tiny Ray actor the driver polls). Results come back in item order, whatever order tasks finish in.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional, Sequence

import ray
from tqdm import tqdm


@ray.remote(num_cpus=0)
class _Progress:
    def __init__(self) -> None:
        self.bytes = 0
        self.docs = 0

    def add(self, nbytes: int, ndocs: int) -> None:
        self.bytes += nbytes
        self.docs += ndocs

    def get(self) -> tuple[int, int]:
        return self.bytes, self.docs


class Reporter:
    """Sends progress to the actor every `every` bytes (fire and forget)."""

    def __init__(self, actor: Any, every: int = 1 << 20):
        self.actor, self.every = actor, every
        self.nbytes = self.ndocs = 0

    def __call__(self, nbytes: int, ndocs: int = 0) -> None:
        self.nbytes += nbytes
        self.ndocs += ndocs
        if self.nbytes >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.actor is not None and (self.nbytes or self.ndocs):
            self.actor.add.remote(self.nbytes, self.ndocs)
        self.nbytes = self.ndocs = 0


def _call(fn: Callable, item: Any, actor: Any) -> Any:
    report = Reporter(actor)
    try:
        return fn(item, report)
    finally:
        report.flush()


_remote_call = ray.remote(num_cpus=1)(_call)


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
) -> list[Any]:
    """fn(item, report) for every item as Ray tasks; their results in item order.

    `on_result(i, result)` sees each result as it arrives (it may raise to stop the run: tasks
    still running are cancelled). A progress bar over bytes goes to stderr.
    """
    if not ray.is_initialized():
        raise RuntimeError("run_parallel needs Ray: call ray.init() first (the pipeline runner does)")
    n_workers = num_workers or default_workers()
    actor = _Progress.remote()
    fn_ref = ray.put(fn)
    results: list[Any] = [None] * len(items)
    pending: dict[Any, int] = {}
    next_item = 0
    tty = sys.stderr.isatty()
    bar = tqdm(total=total_bytes or None, initial=done_bytes, unit="B", unit_scale=True, desc=desc,
               file=sys.stderr, mininterval=1.0 if tty else 10.0, dynamic_ncols=tty, disable=False)
    shown = done_bytes
    last_poll = 0.0
    try:
        while next_item < len(items) or pending:
            while next_item < len(items) and len(pending) < n_workers:
                ref = _remote_call.remote(fn_ref, items[next_item], actor)
                pending[ref] = next_item
                next_item += 1
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                i = pending.pop(ref)
                results[i] = ray.get(ref)
                if on_result is not None:
                    on_result(i, results[i])
            if time.monotonic() - last_poll > 0.5 or not pending:
                last_poll = time.monotonic()
                nbytes, ndocs = ray.get(actor.get.remote())
                bar.update(done_bytes + nbytes - shown)
                shown = done_bytes + nbytes
                bar.set_postfix(docs=ndocs, refresh=False)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
        ray.kill(actor)
    return results
