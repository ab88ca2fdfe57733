"""SIGTERM and SIGHUP end a watched run cleanly: schedulers (Slurm, Kubernetes) and dropped
SSH sessions end jobs with them, and without a handler the session file gets no END
record and the connection file stays until the next ``neurotop ls``.

Python runs signal handlers on the main thread, between bytecodes of whatever it was
doing: there the handler closes the monitor (flush, END record, connection file), then
lets the signal take its course: the handler that was installed before is called, or,
when that was the default action, the signal is raised again with it, so the process
ends with the signal's exit status as it would have without neurotop. A signal that was
ignored (``nohup`` ignores SIGHUP) stays ignored.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("neurotop.signals")

#: How jobs are ended without asking: a scheduler's SIGTERM, a closed terminal's SIGHUP.
SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGHUP)


class SignalGuard:
    """Runs ``on_signal`` (closing the monitor) on SIGTERM or SIGHUP, then hands the signal
    on. ``install`` only works on the main thread (Python's rule); ``restore`` puts the
    previous handlers back (those still ours), so a closed monitor leaves no trace."""

    def __init__(self, on_signal: Callable[[], None]) -> None:
        self._on_signal = on_signal
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Take over SIGTERM and SIGHUP; False (and a debug log) off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            log.debug("neurotop: watch() called off the main thread; SIGTERM/SIGHUP not"
                      " handled (the session gets no END record if they end the run)")
            return False
        for sig in SIGNALS:
            prev = signal.getsignal(sig)
            if prev is signal.SIG_IGN or prev is None:  # ignored, or a handler set in C
                log.debug("neurotop: leaving %s alone (its handler is %r)", sig.name, prev)
                continue
            signal.signal(sig, self._handle)
            self._previous[sig] = prev
        return True

    def restore(self) -> None:
        """Put back the handlers found at ``install``, where ours is still installed (a
        handler the user installed after ``watch()`` is theirs to keep)."""
        if threading.current_thread() is not threading.main_thread():
            log.debug("neurotop: closed off the main thread; signal handlers left installed")
            return
        for sig, prev in self._previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, prev)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        prev = self._previous.get(signum, signal.SIG_DFL)
        log.info("neurotop: %s received; closing the session", signal.Signals(signum).name)
        try:
            self._on_signal()  # restores the previous handlers too
        except Exception:  # the signal must still take its course
            log.exception("neurotop: closing on %s failed", signal.Signals(signum).name)
        if callable(prev):
            prev(signum, frame)
        elif prev == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
