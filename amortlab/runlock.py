"""One live run per run directory: ``RunLock(out_dir)`` holds ``<out_dir>/.amortlab.lock`` (pid, host, start time)
while a run writes there, and refuses a second one with a message naming the first. A lock left by a process that no
longer exists on this host (kill -9, a crashed node) is stale and taken over.

``RunDirectory`` (a Hydra callback, conf/config.yaml ``hydra.callbacks.run_dir``) takes that lock before anything of
the run is written: conf/config.yaml sets ``hydra.output_subdir: null``, so Hydra no longer writes
``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` before the task starts, and the callback writes them once
the lock is held (a live run's files stay untouched). When the directory holds a finished run (results.json with
status ok) and this attempt does not replace that record (it fails or is interrupted: amortlab.record), the finished
run's .hydra files are put back when the attempt ends, so they keep describing its record. It also refuses an
unwritable run directory with one message before Hydra creates it or opens its train.log."""
from __future__ import annotations

import atexit
import copy
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from amortlab.errors import AmortlabError, StorageError

LOCK_NAME = ".amortlab.lock"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def _finished_record(out_dir: Path) -> tuple | None:
    """(inode, size, mtime) of ``out_dir/results.json`` if it holds a finished run (status ok), else None."""
    path = out_dir / "results.json"
    try:
        if json.loads(path.read_text()).get("status") == "ok":
            st = path.stat()
            return st.st_ino, st.st_size, st.st_mtime_ns
    except (OSError, ValueError, AttributeError):
        pass
    return None


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


_HELD: dict[str, int] = {}  # lock path -> how many RunLock contexts of this process hold it (re-entrant)
_REFUSED: dict[str, str] = {}  # lock path -> why RunDirectory was refused it (the task is refused the same way)


class RunLock:
    """Context manager; ``enabled=False`` (DDP ranks other than 0) does nothing. Re-entrant within a process: the
    task's lock inside the one ``RunDirectory`` took for the same directory is the same lock."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True):
        self.path = Path(out_dir) / LOCK_NAME
        self.key = os.path.abspath(self.path)
        self.enabled = enabled
        self.held = False

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        if self.key in _REFUSED:
            raise AmortlabError(_REFUSED[self.key])
        if _HELD.get(self.key):
            _HELD[self.key] += 1
            self.held = True
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
            _HELD[self.key] = 1
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
            self.held = False
            _HELD[self.key] -= 1
            if not _HELD[self.key]:
                del _HELD[self.key]
                self.path.unlink(missing_ok=True)


def _refuse(e: AmortlabError) -> None:
    """Print ``e`` as train.py prints a user error and exit 1 (no traceback)."""
    print(f"\namortlab error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


class RunDirectory(Callback):
    """Hydra callback: the run directory checked and locked before anything of the run is written there (module
    docstring). ``subdir``: where the job's Hydra files go, as ``hydra.output_subdir`` would put them (null: not
    written). Only the process of global rank zero locks and writes (DDP ranks re-run train.py into the same
    directory)."""

    def __init__(self, subdir: str | None = ".hydra"):
        self.subdir = subdir
        self.locks: dict[str, RunLock] = {}
        self.finished: dict[str, tuple[Path, tuple, dict[str, bytes]]] = {}  # lock key -> a finished run's files
        self.exit_hook_pid: int | None = None

    @staticmethod
    def _rank_zero() -> bool:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        return getattr(rank_zero_only, "rank", 0) == 0

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self._rank_zero():
            try:
                check_writable(config.hydra.run.dir)
            except StorageError as e:
                _refuse(e)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_writable(config.hydra.sweep.dir, "sweep directory")
        except StorageError as e:
            _refuse(e)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self._rank_zero():
            return
        out_dir = Path(config.hydra.runtime.output_dir)
        lock = RunLock(out_dir)
        try:
            lock.__enter__()
        except AmortlabError as e:  # a live run there: write nothing; the task is refused with this message
            _REFUSED[lock.key] = str(e)
            return
        self.locks[lock.key] = lock
        if self.exit_hook_pid != os.getpid():  # per process (a launcher may run jobs in a copy of this callback)
            atexit.register(self.release_all)  # train.py exits with sys.exit, which skips on_job_end
            self.exit_hook_pid = os.getpid()
        if self.subdir is not None and config.hydra.output_subdir is None:
            from hydra.core.hydra_config import HydraConfig
            from hydra.core.utils import _save_config

            task_cfg = copy.deepcopy(config)
            with read_write(task_cfg), open_dict(task_cfg):
                del task_cfg["hydra"]
            where = out_dir / self.subdir
            record = _finished_record(out_dir)
            if record is not None:
                self.finished[lock.key] = (out_dir, record, {n: (where / n).read_bytes() for n in HYDRA_FILES
                                                             if (where / n).is_file()})
            _save_config(task_cfg, "config.yaml", where)
            _save_config(copy.deepcopy(HydraConfig.instance().cfg), "hydra.yaml", where)
            _save_config(config.hydra.overrides.task, "overrides.yaml", where)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        key = os.path.abspath(Path(config.hydra.runtime.output_dir) / LOCK_NAME)
        _REFUSED.pop(key, None)
        lock = self.locks.pop(key, None)
        if lock is not None:
            self._release(key, lock)

    def release_all(self) -> None:
        for key, lock in list(self.locks.items()):
            self._release(key, lock)
        self.locks.clear()

    def _release(self, key: str, lock: RunLock) -> None:
        """Put a finished run's .hydra files back if its record is still the current one, then unlock."""
        out_dir, record, files = self.finished.pop(key, (None, None, {}))
        if out_dir is not None and _finished_record(out_dir) == record:
            for name, data in files.items():
                (out_dir / self.subdir / name).write_bytes(data)
        lock.__exit__(None, None, None)
