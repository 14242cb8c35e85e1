"""A write that ran out of disk space: one error and one message for every writer of a run.

    with writing(path):          # any ENOSPC inside becomes DiskFull naming `path`
        ...

`DiskFull` is an OSError (errno ENOSPC) whose message names the file and what to do:
"No space left on device writing <path>: free space or move run.dir". It pickles like any OSError,
so it crosses Ray task boundaries intact.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator, Optional

# A writer that does not pass errno through (torch.save's zip writer raises a bare RuntimeError) ran
# out of space when its file system has less than this left.
NEARLY_FULL_BYTES = 4 << 20


class DiskFull(OSError):
    """OSError(ENOSPC, message, path); str() is the message alone."""

    def __str__(self) -> str:
        return str(self.strerror)


def disk_full(path: Path | str) -> DiskFull:
    return DiskFull(errno.ENOSPC, f"No space left on device writing {path}: free space or move run.dir", str(path))


def free_bytes(path: Path | str) -> Optional[int]:
    """Bytes this process may still write on the file system of `path` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may use the reserved blocks
    return blocks * st.f_frsize


def is_disk_full(exc: BaseException, path: Path | str | None = None) -> bool:
    """`exc` (or an exception it was raised from) is ENOSPC; or, for a writer that hides errno
    (RuntimeError), the file system of `path` is (nearly) full."""
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        e = e.__cause__ or e.__context__
    if path is not None and type(exc) is RuntimeError:  # noqa: E721  (torch's writer; not our subclasses)
        free = free_bytes(path)
        return free is not None and free < NEARLY_FULL_BYTES
    return False


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turn running out of space inside the block into DiskFull naming `path`."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if is_disk_full(e, path):
            raise disk_full(path) from e
        raise
