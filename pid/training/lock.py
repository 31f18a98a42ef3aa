"""One owner per run directory: an advisory lock that the operating system drops when its owner dies.

Two trainers writing one run directory (say `--resume=auto` while the first run still goes) would interleave
snapshots and log lines. The main process holds `fcntl.flock` on `run_dir/run.lock` for the whole run; the
kernel releases it when the process exits for any reason (SIGKILL, OOM, power loss of a local disk), so a
lock is never stale. The file holds the owner's pid, host and start time, for the message only.
"""

import errno
import os
import socket
import time
import warnings
from typing import Optional

from pid.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not guarded there
    fcntl = None

__all__ = ["RunDirLock", "RunDirBusy", "LOCK_FILE", "lock_run_dir"]

LOCK_FILE = "run.lock"


class RunDirBusy(ConfigError):
    """Another live process owns the run directory."""


class RunDirLock:
    """Exclusive ownership of a run directory while the object is held (`acquire` / `release`)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._file = None

    def acquire(self) -> "RunDirLock":
        """Take the lock now or raise RunDirBusy naming the owner; never waits."""
        f = open(self.path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    warnings.warn(f"cannot lock {self.path} ({exc.strerror}); this file system has no flock, "
                                  "so nothing stops a second trainer from writing this run directory")
                else:
                    owner = _read_owner(f)
                    f.close()
                    raise RunDirBusy(f"run directory {os.path.dirname(self.path)} is in use by {owner}; wait "
                                     f"for that run to end (or stop it), or start a new run (another --outdir, "
                                     f"or no --resume)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Give the lock up (the file stays: deleting it could race with the next owner's open)."""
        if self._file is not None:
            self._file.close()   # closing the descriptor drops the flock
            self._file = None


def _read_owner(f) -> str:
    f.seek(0)
    text = f.read(200).strip()
    return f"another trainer ({text})" if text else "another trainer"


def lock_run_dir(run_dir: Optional[str]) -> Optional[RunDirLock]:
    """Acquire and return the lock of `run_dir` (None for None)."""
    return RunDirLock(run_dir).acquire() if run_dir else None
