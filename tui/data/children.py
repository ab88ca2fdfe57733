"""Child processes (demo trainings, ssh tunnels) that never outlive the neurotop that
started them, even when it is killed with SIGKILL."""

from __future__ import annotations

import ctypes
import signal

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
