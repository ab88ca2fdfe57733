"""Commands from the UI, applied by the training thread at an optimizer step boundary.

The agent thread only validates and queues (``Pending``); the training thread
drains the queue in the optimizer's step post-hook and produces one ack per
command naming the step where it took effect. Pause blocks the training thread
right there, still draining the queue so that resume (or anything else) is applied.
Every command is plain data ``(cmd, args)`` so that under torch.distributed the
same list can be broadcast and applied by all ranks at the same step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Commands the training thread applies at a boundary.
BOUNDARY_COMMANDS = frozenset({"pause", "resume"})


@dataclass
class Pending:
    """A validated command waiting for the next boundary; ``reply`` sends its ack."""

    req_id: str
    cmd: str
    args: dict[str, Any]
    sender: str
    reply: Callable[[dict[str, Any]], None]
    received: float = field(default_factory=time.time)


class Controller:
    """State the operator can change, and the queue that carries the changes."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Pending] = queue.Queue()
        self.paused = False
        self.paused_at: int | None = None
        self._closed = threading.Event()

    def submit(self, p: Pending) -> None:
        """From the agent thread. Never blocks."""
        if self._closed.is_set():
            p.reply(_ack(p, ok=False, step=None, error="the run has ended"))
            return
        self.queue.put(p)

    def at_boundary(self, step: int) -> None:
        """From the training thread after each optimizer step: apply, then hold while paused."""
        self._drain(step, block=False)
        while self.paused and not self._closed.is_set():
            self._drain(step, block=True)

    def close(self) -> None:
        """Release a paused loop and refuse what is still queued."""
        self._closed.set()
        self.paused = False
        while True:
            try:
                p = self.queue.get_nowait()
            except queue.Empty:
                return
            p.reply(_ack(p, ok=False, step=None, error="the run has ended"))

    def _drain(self, step: int, block: bool) -> None:
        while True:
            try:
                p = self.queue.get(timeout=0.05) if block else self.queue.get_nowait()
            except queue.Empty:
                return
            p.reply(self._apply(p, step))
            block = False

    def _apply(self, p: Pending, step: int) -> dict[str, Any]:
        if p.cmd == "pause":
            old, self.paused = self.paused, True
            self.paused_at = step
            return _ack(p, ok=True, step=step, old="paused" if old else "running", new="paused")
        if p.cmd == "resume":
            old, self.paused = self.paused, False
            self.paused_at = None
            return _ack(p, ok=True, step=step, old="paused" if old else "running", new="running")
        return _ack(p, ok=False, step=None, error=f"unknown command {p.cmd!r}")


def _ack(p: Pending, *, ok: bool, step: int | None, old: Any = None, new: Any = None,
         error: str | None = None) -> dict[str, Any]:
    return {"id": p.req_id, "cmd": p.cmd, "args": p.args, "ok": ok, "step": step,
            "old": old, "new": new, "error": error, "sender": p.sender}
