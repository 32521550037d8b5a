"""The run directory: where a search keeps everything, written atomically, one writer at a time."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

# The one atomic writer (temporary file, then rename), re-exported for search's callers.
from vitrank.core.files import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = [
    "RunDir",
    "RunLockedError",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
]


class RunLockedError(RuntimeError):
    """Another search is writing this run directory."""


class RunDir:
    """Paths of one run (`runs/<name>/`) and its single-writer lock."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock_fd: int | None = None

    # The layout of the design ("Run directory").
    @property
    def settings(self) -> Path:
        return self.root / "run.yaml"

    @property
    def study_db(self) -> Path:
        return self.root / "study.db"

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{self.study_db.resolve()}"

    @property
    def trials(self) -> Path:
        return self.root / "trials.parquet"

    @property
    def pareto(self) -> Path:
        return self.root / "pareto.json"

    @property
    def winners(self) -> Path:
        return self.root / "winners"

    @property
    def cache(self) -> Path:
        """Calibration statistics and factors, computed once per run."""
        return self.root / "cache"

    @property
    def baselines(self) -> Path:
        """Baseline configurations (JSON), enqueued as the first trials."""
        return self.root / "baselines"

    @property
    def tune(self) -> Path:
        """Ray Tune's experiment storage (RunConfig.storage_path)."""
        return self.root / "tune"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def exists(self) -> bool:
        return self.settings.exists()

    def foreign_entries(self) -> list[str]:
        """Names in the directory that a start of a search does not write before its study.

        A start that failed or was stopped before any trial leaves only run.yaml, the lock,
        the cache, the baselines and (stopped) timings.json; anything else belongs to a
        finished run or to someone else.
        """
        if not self.root.is_dir():
            return []
        timings = self.root / "timings.json"
        starting = {self.settings, self.lock_path, self.cache, self.baselines, timings}
        return sorted(p.name for p in self.root.iterdir() if p not in starting)

    def acquire(self) -> None:
        """Take the directory's lock or raise `RunLockedError` naming the holder.

        `flock` is released by the kernel when the holder dies (even by SIGKILL), so a
        killed search never leaves a stale lock behind.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunLockedError(
                    f"{self.root} is being written by another search (pid {holder}); "
                    "wait for it to finish, or choose another --out."
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        os.fsync(fd)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunDir:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
