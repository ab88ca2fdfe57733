"""Commands from the UI, applied by the training thread at an optimizer step boundary.

The agent thread validates and queues (``Pending``); the training thread drains
the queue in the optimizer's step post-hook and produces one ack per command
naming the step where it took effect (the number of optimizer steps completed
when it was applied: step ``k`` means step ``k + 1`` is the first to see it).
Pause blocks the training thread right there, still draining the queue so that
resume (or anything else) is applied. Every command is plain data ``(cmd, args)``
applied deterministically from the state at the boundary, so that under
torch.distributed the same list can be broadcast and applied by all ranks at the
same step. Imports neither torch nor textual: the UI and ``neurotop ctl`` use the
parsing and validation helpers below to refuse bad input before sending it.
"""

from __future__ import annotations

import math
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

#: Commands the training thread applies at a boundary.
BOUNDARY_COMMANDS = frozenset({"pause", "resume", "step", "set", "snapshot", "stop"})
#: Read-only commands the agent thread answers at once, even in the middle of a step.
IMMEDIATE_COMMANDS = frozenset({"schema", "knobs", "history"})
#: Arguments each command accepts, with their types; ``REQUIRED`` lists the mandatory ones.
ARGS: dict[str, dict[str, tuple[type, ...]]] = {
    "pause": {"reason": (str,)}, "resume": {}, "step": {"n": (int,)},
    "set": {"knob": (str,), "value": (bool, int, float), "op": (str,)},
    "snapshot": {}, "stop": {}, "schema": {}, "knobs": {},
    "history": {"offset": (int,), "max_bytes": (int,)},
}
REQUIRED = {"step": ("n",), "set": ("knob", "value")}
MAX_STEP_N = 1_000_000
OPS = ("set", "mul")

_KNOB_RE = re.compile(r"^([A-Za-z_][\w.]*)(?:\[([^\[\]]+)\])?$")


class StopTraining(Exception):
    """Raised from ``optimizer.step()`` after a ``stop`` command when the run was started
    with ``watch(..., raise_on_stop=True)``; otherwise the loop polls ``mon.should_stop``."""


class KnobTable(Protocol):
    """What the controller needs from the knobs (``agent.knobs.Knobs`` implements it)."""

    def describe(self) -> list[dict[str, Any]]: ...
    def values(self) -> dict[str, Any]: ...
    def validate(self, knob: str, value: Any, op: str) -> None: ...
    def apply(self, knob: str, value: Any, op: str) -> dict[str, Any]: ...


#: ``snapshot(step, done)``: called at the boundary; ``done`` gets ``{"new": where}`` or
#: ``{"error": why}``, possibly later and from another thread.
Snapshotter = Callable[[int, Callable[[dict[str, Any]], None]], None]


# --- parsing and validation shared by the agent, the UI and the CLI ---------------------

def split_knob(name: str) -> tuple[str, str | None]:
    """``"lr[1]"`` -> ``("lr", "1")``; ``"dropout"`` -> ``("dropout", None)``."""
    m = _KNOB_RE.match(name) if isinstance(name, str) else None
    if not m:
        raise ValueError(f"bad knob name {name!r}: use NAME or NAME[SELECTOR], e.g. lr[0]")
    return m.group(1), m.group(2)


def parse_value(text: str) -> tuple[bool | int | float, str]:
    """What a person types -> ``(value, op)``: ``0.01`` sets, ``x0.5`` (or ``*0.5``)
    multiplies, ``true``/``false``/``on``/``off`` are booleans, ``3`` is an int."""
    t = text.strip()
    op = "set"
    if t[:1] in ("x", "*", "×"):
        op, t = "mul", t[1:].strip()
    low = t.lower()
    if op == "set" and low in ("true", "on", "yes"):
        return True, op
    if op == "set" and low in ("false", "off", "no"):
        return False, op
    try:
        return int(t), op
    except ValueError:
        pass
    try:
        return float(t), op
    except ValueError:
        raise ValueError(f"{text!r} is not a value: type a number, true/false, or xFACTOR"
                         " (e.g. x0.5) to multiply") from None


def check_value(spec: Mapping[str, Any], value: Any, op: str = "set") -> str | None:
    """Why ``value`` is not acceptable for a knob described by ``spec`` (its ``name``,
    ``type`` and ``min``/``max`` bounds), or None. Type, finiteness, then bounds."""
    name, kind = spec["name"], spec["type"]
    if op not in OPS:
        return f"op must be one of {', '.join(OPS)}, got {op!r}"
    if op == "mul":
        if kind != "float":
            return f"{name} is {kind}: it cannot be multiplied, set it instead"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"a factor must be a number, got {type(value).__name__}"
        if not math.isfinite(value) or value <= 0:
            return f"a factor must be finite and > 0, got {value!r}"
        return None  # bounds are checked against the product when it is applied
    if kind == "bool":
        if isinstance(value, bool) or value in (0, 1):
            return None
        return f"{name} takes true or false, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} takes a number ({kind}), got {type(value).__name__} {value!r}"
    if kind == "int" and not isinstance(value, int):
        return f"{name} takes an integer, got {value!r}"
    if not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    lo, hi = spec.get("min"), spec.get("max")
    if lo is not None and value < lo:
        return f"{name} must be >= {lo}, got {value!r}"
    if hi is not None and value > hi:
        return f"{name} must be <= {hi}, got {value!r}"
    return None


def check_args(cmd: str, args: Any) -> str | None:
    """Why ``args`` do not fit ``cmd`` (names, types, ranges), or None."""
    spec = ARGS.get(cmd)
    if spec is None:
        known = ", ".join(sorted(ARGS))
        return f"unknown command {cmd!r}; known: {known}"
    if not isinstance(args, dict):
        return f"args must be a map, got {type(args).__name__}"
    extra = sorted(str(k) for k in args if k not in spec)
    if extra:
        return f"{cmd} does not take {', '.join(map(repr, extra))}"
    missing = [k for k in REQUIRED.get(cmd, ()) if k not in args]
    if missing:
        return f"{cmd} needs {', '.join(missing)}"
    for k, v in args.items():
        if not isinstance(v, spec[k]) or (isinstance(v, bool) and bool not in spec[k]):
            want = "/".join(t.__name__ for t in spec[k])
            return f"{cmd}: {k} must be {want}, got {type(v).__name__}"
    if cmd == "step" and not 1 <= args["n"] <= MAX_STEP_N:
        return f"step n must be between 1 and {MAX_STEP_N}, got {args['n']}"
    if cmd == "pause" and len(args.get("reason", "")) > 200:
        return "pause reason is longer than 200 characters"
    return None


# --- the queue and the state it changes ---------------------------------------------------

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

    def __init__(self, knobs: KnobTable | None = None, snapshot: Snapshotter | None = None,
                 raise_on_stop: bool = False) -> None:
        self.queue: queue.Queue[Pending] = queue.Queue()
        #: Events that are not acks (e.g. "paused after step N"); the agent publishes them.
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        #: Called after an event is queued: wakes the agent thread (set by the agent).
        self.notify: Callable[[], None] = lambda: None
        self.knobs, self.snapshot, self.raise_on_stop = knobs, snapshot, raise_on_stop
        self.paused = False
        self.paused_at: int | None = None
        self.pause_reason = ""
        self.stop_requested = False
        self.resumes = 0  # bumped by every resume/step: lets auto-pause re-arm
        self._until: int | None = None  # `step N`: pause again when this step is reached
        self._stop_raised = False
        self._closed = threading.Event()

    # -- agent thread ---------------------------------------------------------------------

    def validate(self, cmd: str, args: dict[str, Any]) -> str | None:
        """Refuse what can be refused before the boundary, with the reason. Never blocks."""
        err = check_args(cmd, args)
        if err or cmd != "set":
            return err
        if self.knobs is None:
            return "this run has no knobs"
        try:
            self.knobs.validate(args["knob"], args["value"], args.get("op", "set"))
        except ValueError as e:
            return str(e)
        except Exception as e:  # untrusted input must never take the agent thread down
            return f"cannot set {args['knob']}: {e!r}"
        return None

    def submit(self, p: Pending) -> None:
        """From the agent thread. Never blocks."""
        if self._closed.is_set():
            p.reply(self._ack(p, ok=False, step=None, error="the run has ended"))
            return
        self.queue.put(p)

    def describe_knobs(self) -> list[dict[str, Any]]:
        return self.knobs.describe() if self.knobs else []

    def heartbeat(self) -> dict[str, Any]:
        """Fields the heartbeat carries for the UI: why it is paused, knob values."""
        return {"pause_reason": self.pause_reason, "stopping": self.stop_requested,
                "knobs": self.knobs.values() if self.knobs else {}}

    # -- training thread ------------------------------------------------------------------

    def at_boundary(self, step: int) -> None:
        """From the training thread after each optimizer step: apply, then hold while paused."""
        self._drain(step, block=False)
        if self._until is not None and step >= self._until and not self.paused:
            n = self._until
            self._pause(step, f"stepped to {n}")
            self.events.put({"event": "paused", "step": step, "reason": self.pause_reason,
                             **self._state()})
            self.notify()
        while self.paused and not self._closed.is_set():
            self._drain(step, block=True)
        if self.stop_requested and self.raise_on_stop and not self._stop_raised:
            self._stop_raised = True
            raise StopTraining(f"stopped by an operator command at step {step}")

    def close(self) -> None:
        """Release a paused loop and refuse what is still queued."""
        self._closed.set()
        self.paused = False
        while True:
            try:
                p = self.queue.get_nowait()
            except queue.Empty:
                return
            p.reply(self._ack(p, ok=False, step=None, error="the run has ended"))

    def _drain(self, step: int, block: bool) -> None:
        while True:
            try:
                p = self.queue.get(timeout=0.05) if block else self.queue.get_nowait()
            except queue.Empty:
                return
            try:
                ack = self._apply(p, step)
            except Exception as e:  # a command must never crash the training loop
                ack = self._ack(p, ok=False, step=None, error=f"{p.cmd} failed: {e!r}")
            if ack is not None:
                p.reply(ack)
            block = False

    def _pause(self, step: int, reason: str) -> None:
        self.paused, self.paused_at, self.pause_reason, self._until = True, step, reason, None

    def _apply(self, p: Pending, step: int) -> dict[str, Any] | None:
        old = self._state()["state"]
        if p.cmd == "pause":
            self._pause(step, p.args.get("reason") or f"paused by {p.sender or 'an operator'}")
            return self._ack(p, ok=True, step=step, old=old, new="paused")
        if p.cmd in ("resume", "step"):
            self.paused, self.paused_at, self.pause_reason = False, None, ""
            self.resumes += 1
            if p.cmd == "resume":
                self._until = None
                return self._ack(p, ok=True, step=step, old=old, new="running")
            self._until = step + p.args["n"]
            return self._ack(p, ok=True, step=step, old=old, new="stepping", until=self._until)
        if p.cmd == "set":
            try:
                result = self.knobs.apply(p.args["knob"], p.args["value"],
                                          p.args.get("op", "set")) if self.knobs else None
            except ValueError as e:
                return self._ack(p, ok=False, step=None, error=str(e))
            if result is None:
                return self._ack(p, ok=False, step=None, error="this run has no knobs")
            return self._ack(p, ok=True, step=step, **result)
        if p.cmd == "stop":
            self.stop_requested = True
            self.paused, self.paused_at, self.pause_reason, self._until = False, None, "", None
            return self._ack(p, ok=True, step=step, old=old, new="stopping")
        if p.cmd == "snapshot" and self.snapshot is not None:
            def done(result: dict[str, Any]) -> None:
                ok = "error" not in result
                p.reply(self._ack(p, ok=ok, step=step if ok else None, **result))
            try:
                self.snapshot(step, done)
            except Exception as e:  # a failing snapshot must not take the run down
                return self._ack(p, ok=False, step=None, error=f"snapshot failed: {e!r}")
            return None
        return self._ack(p, ok=False, step=None, error=f"{p.cmd!r} is not available in this run")

    def _state(self) -> dict[str, Any]:
        return {"state": "paused" if self.paused else "running", "paused_at": self.paused_at}

    def _ack(self, p: Pending, *, ok: bool, step: int | None, old: Any = None, new: Any = None,
             error: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"id": p.req_id, "cmd": p.cmd, "args": p.args, "ok": ok, "step": step,
                "old": old, "new": new, "error": error, "sender": p.sender,
                "pause_reason": self.pause_reason, **self._state(), **extra}
