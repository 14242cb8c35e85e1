"""The run directory's lock: one `xlp run` (or directly started training) at a time on RUN_DIR."""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from xlp.pipeline.core.errors import PipelineError
from xlp.pipeline.core.layout import RunLayout


class RunLock:
    """An advisory lock on RUN_DIR held by the `xlp run` using it, so two runs never interleave."""

    def __init__(self, run_dir: Path):
        self.path = RunLayout(run_dir).lock
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise PipelineError(
                f"another `xlp run` ({holder or 'unknown process'}) is using {self.path.parent}; "
                "wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def held_by_other(self) -> bool:
        if not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
