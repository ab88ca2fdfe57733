"""Child processes (demo trainings, ssh tunnels) that never outlive the neurotop that
started them, even when it is killed with SIGKILL, and the log files their output goes to
(never a pipe that nobody reads once the UI runs: a full pipe blocks the child)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import tempfile
from pathlib import Path

log = logging.getLogger("neurotop.children")

PR_SET_PDEATHSIG = 1

try:  # resolved here, not in the forked child, where importing could deadlock
    _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except OSError:  # not Linux: an orphan is still stopped by close() on a normal exit
    _prctl = None


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the thread that started it ends.

    Linux ties PR_SET_PDEATHSIG to the parent *thread*, so start such children from a
    thread that lives as long as they should (the main thread, or a supervisor thread).
    """
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def open_log(directory: Path, name: str) -> Path:
    """A new, empty log file ``directory/name``: the directory made 0700 and the file 0600
    (a training's output may tell what it trains on). When ``directory`` cannot be written,
    a ``neurotop-*-name`` file in the temp directory, with a warning."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        fd, tmp = tempfile.mkstemp(prefix="neurotop-", suffix=f"-{name}")
        path = Path(tmp)
        log.warning("neurotop: cannot write %s (%s); logging to %s", directory, e, path)
    os.close(fd)
    return path


def log_tail(path: Path, limit: int = 2000) -> str:
    """The last ``limit`` bytes of a log, as text (what a failure message shows)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            return f.read().decode(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"
