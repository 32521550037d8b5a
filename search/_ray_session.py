"""Cleaning up after a local Ray session whose driver was killed (SIGKILL, OOM killer).

Ray's GCS and raylet die with the driver that started them, but its dashboard and
runtime-env agents (children of the raylet) notice the raylet's death and then wait on
the dead GCS to flush their logs: they stay, orphaned, holding memory and ports. Nothing
in Ray 2.x makes them exit, so vitrank marks each local session it starts with its
driver's pid, and the next start stops the processes of marked sessions whose driver is
gone. Those processes are found by their open files (or command line) in the session
directory; only the user's own processes are looked at. Linux only (/proc); elsewhere it
does nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
from pathlib import Path

DRIVER_FILE = "vitrank-driver.json"  # in the session directory of a Ray vitrank started


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, ...]; empty when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks, which a reused pid does not share."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def mark_session(session_dir: str | Path) -> None:
    """Record this process as the driver of the local Ray session in `session_dir`."""
    from vitrank.core.files import atomic_write_json

    start = _start_time(os.getpid())
    if start is not None and Path(session_dir).is_dir():
        atomic_write_json(Path(session_dir) / DRIVER_FILE, {"pid": os.getpid(), "start": start})


def _uses(pid: int, session: str) -> bool:
    """Whether the process has a file of the session open or names it on its command line."""
    proc = Path(f"/proc/{pid}")
    try:
        if session in (proc / "cmdline").read_bytes().decode(errors="replace"):
            return True
        for fd in (proc / "fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith(session):
                    return True
    except OSError:
        return False
    return False


def _own_processes() -> list[int]:
    uid, me = os.getuid(), os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
    return pids


def reap_orphans(temp_dir: str | Path | None = None, grace_s: float = 5.0) -> list[int]:
    """Stop the processes left by local sessions vitrank started whose driver is dead.

    Returns the pids signalled. `temp_dir` is Ray's temporary folder (default:
    $RAY_TMPDIR or the system's temp dir, then `ray`).
    """
    root = Path(temp_dir or Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray")
    if not Path("/proc").is_dir() or not root.is_dir():
        return []
    stopped: list[int] = []
    for marker in sorted(root.glob(f"session_*/{DRIVER_FILE}")):
        if marker.parent.is_symlink():  # session_latest
            continue
        try:
            driver = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if _start_time(int(driver["pid"])) == driver["start"]:
            continue  # the driver runs: its session is alive
        session = str(marker.parent)
        pids = [pid for pid in _own_processes() if _uses(pid, session)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_running(p) for p in pids):
            time.sleep(0.1)
        for pid in [p for p in pids if _running(p)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_running(p) for p in pids):
            time.sleep(0.05)  # SIGKILL is delivered, not waited for
        marker.unlink(missing_ok=True)
        stopped += pids
    return stopped
