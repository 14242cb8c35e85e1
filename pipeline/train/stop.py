"""How a rank is asked to stop, and the exit status that says it stopped on request.

Torch-free: the launchers (xlp.pipeline.cluster.launch) read these without loading the training loop.
"""
from __future__ import annotations

import signal
from typing import Optional

EXIT_STOPPED = 143  # 128 + SIGTERM: a rank that saved a checkpoint and stopped as asked


class StopRequest:
    """Set by a signal handler or a watcher thread; the loop reads it once per step."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None

    def set(self, signum: int = signal.SIGTERM) -> None:
        self.signal = signum

    def on_signal(self, signum, frame) -> None:  # noqa: ARG002  (a signal handler)
        self.set(signum)

    @property
    def requested(self) -> bool:
        return self.signal is not None
