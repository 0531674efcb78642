"""One live run per run directory: ``RunLock(out_dir)`` holds ``<out_dir>/.amortlab.lock`` (pid, host, start time)
while a run writes there, and refuses a second one with a message naming the first. A lock left by a process that no
longer exists on this host (kill -9, a crashed node) is stale and taken over."""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

from amortlab.errors import AmortlabError, StorageError

LOCK_NAME = ".amortlab.lock"


def check_writable(path: str | os.PathLike, what: str = "run directory") -> None:
    """Refuse, with one ``StorageError`` naming ``path``, a directory in which this process cannot create files. An
    existing directory is probed by creating and deleting a file in it (permission bits do not bind root; a
    read-only mount or a full disk does); a missing one by the same probe in its nearest existing ancestor, which
    must be a directory (nothing is created)."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is a file, not a directory")
        fd, name = tempfile.mkstemp(prefix=".amortlab-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        reason = e.strerror + (f": {e.filename}" if e.filename else "") if e.strerror else str(e)
        raise StorageError(f"The {what} {path} cannot be written ({reason}); nothing was run. Make it writable, or "
                           f"give the run a directory it can write (hydra.run.dir=...).") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Context manager; ``enabled=False`` (DDP ranks other than 0) does nothing."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True):
        self.path = Path(out_dir) / LOCK_NAME
        self.enabled = enabled
        self.held = False

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                if other.get("host") == me["host"] and not _alive(int(other.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise AmortlabError(
                    f"Another run is writing to {self.path.parent} (pid {other.get('pid', '?')} on "
                    f"{other.get('host', '?')}, started {other.get('started', '?')}); two runs in one directory "
                    f"would overwrite each other's checkpoints and results. Wait for it to finish, or give this run "
                    f"its own directory (hydra.run.dir=...). If no such run exists, delete {self.path}.") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise AmortlabError(f"Could not take the run-directory lock {self.path}; delete it if no run is using "
                            f"{self.path.parent}.")

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
