"""Commands from the UI, applied by the training thread at an optimizer step boundary.

The agent thread validates and queues (``Pending``); the training thread drains
the queue in the optimizer's step post-hook and produces one ack per command
naming the step where it took effect (the number of optimizer steps completed
when it was applied: step ``k`` means step ``k + 1`` is the first to see it).
Pause blocks the training thread right there, still draining the queue so that
resume (or anything else) is applied; an auto-pause that nobody resumes within
``auto_pause_timeout`` seconds ends in a snapshot and a stop, so that a headless run does
not wait forever. Every command is plain data ``(cmd, args)``
applied deterministically from the state at the boundary, so that under
torch.distributed the same list can be broadcast and applied by all ranks at the
same step.

Under torch.distributed (``job``: one rank of a job, ``neurotop.training.distributed``) no
command is applied on arrival: only rank 0 takes commands (other ranks refuse them, naming
rank 0's endpoint), and at every ``control_every``-th boundary every rank starts one small
collective in which rank 0 sends the commands it took from its queue and every rank its
auto-pause flag; it completes while the next step trains, and every rank applies the same
list at the next boundary, the same step on every rank, so a pause holds them all at one
boundary (the collective's latency is never waited for on a running job). While paused
every rank keeps joining it (rank 0 every ``HOLD_S``), so that ``resume``, ``step N`` and
``stop`` reach them all; an auto-pause raised on any rank pauses the whole job at the
boundary after the next check. ``snapshot``: rank 0 saves the whole state (DDP replicas
are identical: one copy is the state), the others ack without writing. Acks of commands
applied at a step name the ``ranks`` that applied it.

A ``set`` of a knob the optimizer's step reads (``lr``, ``weight_decay``, ``grad_clip``)
can be acked twice: ok at the boundary where it was applied, then, if the next step raised
with it, refused with the error once the knobs rolled it back (``rolled_back: True``, the
value restored in ``new``) — the step is taken again with the old value, and training
goes on (see ``neurotop.training.knobs``).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from neurotop.protocol.commands import check_args

log = logging.getLogger("neurotop.agent")


#: While a job is paused, rank 0 waits this long for a command between two checks (the
#: other ranks wait for it in the collective).
HOLD_S = 0.05


class StopTraining(Exception):
    """Raised from ``optimizer.step()`` after a ``stop`` command when the run was started
    with ``watch(..., raise_on_stop=True)``; otherwise the loop polls ``mon.should_stop``."""


class KnobTable(Protocol):
    """What the controller needs from the knobs (``training.knobs.Knobs`` implements it)."""

    def describe(self) -> list[dict[str, Any]]: ...
    def values(self) -> dict[str, Any]: ...
    def pins(self) -> dict[str, Any]: ...
    def validate(self, knob: str, value: Any, op: str) -> None: ...
    def apply(self, knob: str, value: Any, op: str,
              rolled_back: Callable[[str, Any], None] | None = None) -> dict[str, Any]: ...


class JobLost(RuntimeError):
    """The job's collective failed: another rank died or hung past the group's timeout.
    Raised from ``optimizer.step()``; the job cannot go on without its ranks."""


class JobLink(Protocol):
    """This rank's side of the job's collective (``training.distributed.Job``)."""

    rank: int
    world_size: int
    capacity: int  # the bytes of commands one check carries

    def start(self, step: int, payload: bytes, flag: bool) -> None: ...
    def finish(self) -> tuple[bytes, list[int], int]: ...
    @property
    def in_flight(self) -> bool: ...


#: ``snapshot(step, done)``: called at the boundary; ``done`` gets ``{"new": where}`` or
#: ``{"error": why}``, possibly later and from another thread
#: (``training.checkpoint.Checkpointer`` implements it).
TakeSnapshot = Callable[[int, Callable[[dict[str, Any]], None]], None]
#: ``probe(step)``: runs the curvature probe at the boundary and returns its scalars by name
#: (``training.curvature``; the monitor's ``_probe_command``); raises ``ValueError`` with
#: the reason when the run has nothing to probe.
RunProbe = Callable[[int], dict[str, float]]


def check_timeout(seconds: Any) -> None:
    """Refuse an ``auto_pause_timeout`` that is not None or a number of seconds > 0."""
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(
            seconds, (int, float)) or not seconds > 0):
        raise ValueError(f"auto_pause_timeout must be a number of seconds > 0 or None,"
                         f" got {seconds!r}")


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
    #: Raised by the agent itself (an auto-pause), not sent by a client: in a job it is a
    #: flag for the next check on any rank, never refused as control sent to rank > 0.
    internal: bool = False


class Controller:
    """State the operator can change, and the queue that carries the changes."""

    def __init__(self, knobs: KnobTable | None = None, snapshot: TakeSnapshot | None = None,
                 raise_on_stop: bool = False, notify: Callable[[], None] = lambda: None,
                 auto_pause_timeout: float | None = None, job: JobLink | None = None,
                 control_every: int = 1, probe: RunProbe | None = None) -> None:
        check_timeout(auto_pause_timeout)
        self.probe = probe
        self.queue: queue.Queue[Pending] = queue.Queue()
        #: Events that are not acks (e.g. "paused after step N"); the agent publishes them.
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        #: Called after an event is queued: wakes the agent thread (``Wakeup.ring``).
        self.notify = notify
        self.knobs, self.snapshot, self.raise_on_stop = knobs, snapshot, raise_on_stop
        self.paused = False
        self.paused_at: int | None = None
        self.pause_reason = ""
        self.stop_requested = False
        self.resumes = 0  # bumped by every resume/step: lets auto-pause re-arm
        self._until: int | None = None  # `step N`: pause again when this step is reached
        self._stop_raised = False
        #: An auto-pause nobody resumes within this many seconds snapshots and stops the
        #: run (a headless run would otherwise hold its machine forever).
        self.auto_pause_timeout = auto_pause_timeout
        self._give_up_at: float | None = None  # monotonic deadline of the auto-pause held
        self._forced_stop = ""  # why the run was stopped without an operator
        self._closed = threading.Event()
        #: One rank of a job: commands travel in its collective every ``control_every``
        #: boundaries; ``leader`` is rank 0's control endpoint (set once agreed).
        self.job, self.control_every, self.leader = job, control_every, ""
        self._boundaries = 0  # boundaries seen: the same count on every rank
        self._held: list[Pending] = []  # rank 0: taken from the queue, for the next check
        self._flags: queue.Queue[Pending] = queue.Queue()  # this rank's auto-pauses
        #: The check in flight: (step started, rank 0's batch in it, this rank's flags).
        self._started: tuple[int, list[Pending | None], list[Pending]] | None = None
        self._step_warned = False

    # -- agent thread ---------------------------------------------------------------------

    def validate(self, cmd: str, args: dict[str, Any]) -> str | None:
        """Refuse what can be refused before the boundary, with the reason. Never blocks."""
        err = check_args(cmd, args)
        if err or cmd != "set":
            return err
        if self.knobs is None:
            return "this run has no knobs"
        try:
            self.knobs.validate(args["knob"], args.get("value"), args.get("op", "set"))
        except ValueError as e:  # the knob's own reason: a value it refuses
            return str(e)
        except Exception as e:  # a bug, but untrusted input must never take the agent down
            log.exception("validating set %r failed", args["knob"])
            return f"cannot set {args['knob']}: {e!r}"
        return None

    def submit(self, p: Pending) -> None:
        """From the agent thread. Never blocks."""
        if self._closed.is_set():
            p.reply(self._ack(p, ok=False, step=None, error="the run has ended"))
            return
        if self.job is not None and p.internal:
            self._flags.put(p)
            return
        if self.job is not None and self.job.rank != 0:
            where = self.leader or "see rank 0's connection file"
            p.reply(self._ack(p, ok=False, step=None, error=(
                f"rank {self.job.rank} takes no control commands: rank 0 takes them for the"
                f" whole job ({where})")))
            return
        self.queue.put(p)

    def describe_knobs(self) -> list[dict[str, Any]]:
        return self.knobs.describe() if self.knobs else []

    def heartbeat(self) -> dict[str, Any]:
        """Fields the heartbeat carries for the UI: why it is paused, knob values, and the
        knobs an operator pinned (with how often the script wrote over them)."""
        return {"pause_reason": self.pause_reason, "stopping": self.stop_requested,
                "knobs": self.knobs.values() if self.knobs else {},
                "pins": self.knobs.pins() if self.knobs else {}}

    # -- training thread ------------------------------------------------------------------

    def at_boundary(self, step: int) -> None:
        """From the training thread after each optimizer step: apply, then hold while paused."""
        if self.job is not None:
            self._job_boundary(step)
            return
        self._drain(step, block=False)
        self._check_until(step)
        while self.paused and not self._closed.is_set():
            self._drain(step, block=True)
            if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                self._give_up(step)
        self._raise_stop(step)

    def _check_until(self, step: int) -> None:
        """``step N`` ran its N steps: pause (the same step on every rank of a job)."""
        if self._until is not None and step >= self._until and not self.paused:
            n = self._until
            self._pause(step, f"stepped to {n}")
            self.events.put({"event": "paused", "step": step, "reason": self.pause_reason,
                             **self._state()})
            self.notify()

    def _raise_stop(self, step: int) -> None:
        if self.stop_requested and (self.raise_on_stop or self._forced_stop) \
                and not self._stop_raised:
            self._stop_raised = True
            raise StopTraining(self._forced_stop
                               or f"stopped by an operator command at step {step}")

    def _job_boundary(self, step: int) -> None:
        """A job's boundary: the check started at the previous boundary is finished and
        applied here; a new one starts every ``control_every``-th boundary (unless paused or
        stopping, which every rank knows alike); held while paused, checking in a loop, so
        that every rank leaves the hold at the same check."""
        self._boundaries += 1
        if self._started is not None:
            self._finish(step)
        self._check_until(step)
        if self._boundaries % self.control_every == 0 and not self.paused \
                and not self.stop_requested:
            self._start(step)
        while self.paused and not self._closed.is_set():
            if self.job.rank == 0 and not self._held:
                try:
                    self._held.append(self.queue.get(timeout=HOLD_S))
                except queue.Empty:
                    pass
            self._start(step)
            self._finish(step)
        self._raise_stop(step)

    def _start(self, step: int) -> None:
        """Start a check (one collective, carried by gloo's threads while the next step
        trains): rank 0's decided commands and every rank's auto-pause flag, which every
        rank applies at the boundary that finishes it."""
        batch = self._take_batch() if self.job.rank == 0 else []
        payload = json.dumps([[p.req_id, p.cmd, p.args, p.sender] if p else ["", "give_up"]
                              for p in batch], separators=(",", ":")).encode() if batch else b""
        mine: list[Pending] = []  # this rank's auto-pauses since the last check
        while True:
            try:
                mine.append(self._flags.get_nowait())
            except queue.Empty:
                break
        self._started = (step, batch, mine)
        try:
            self.job.start(step, payload, bool(mine))
        except JobLost as e:
            self._lose(step, e)
            raise

    def _finish(self, step: int) -> None:
        """Wait for the started check and apply what it carried, at this step, on every rank."""
        started, batch, mine = self._started
        try:
            data, flagged, step0 = self.job.finish()
        except JobLost as e:
            self._lose(step, e)
            raise
        self._started = None
        if step0 != started and not self._step_warned:
            self._step_warned = True
            log.warning("neurotop: rank %d is at step %d where rank 0 is at %d: the ranks count"
                        " steps differently (acks name each rank's own step)",
                        self.job.rank, started, step0)
        for i, item in enumerate(json.loads(data) if data else []):
            if item[1] == "give_up":
                self._give_up(step)
                continue
            p = batch[i] if self.job.rank == 0 else Pending(*item, reply=self._publish_ack)
            self._apply_one(p, step)
        if flagged:
            who = ", ".join(map(str, flagged))
            reason = f"auto-pause on rank {who}"
            if mine:
                reason += ": " + mine[0].args.get("reason", "").removeprefix("auto-pause: ")
            p = mine[0] if mine else Pending("auto-job", "pause", {}, "auto-pause",
                                             self._publish_ack, internal=True)
            p.args = {"reason": reason[:200]}
            self._apply_one(p, step)
            for other in mine[1:]:
                other.reply(self._ack(other, ok=True, step=step, old="paused", new="paused"))

    def _lose(self, step: int, e: JobLost) -> None:
        """The check failed (a rank died or hung): say so, and refuse what it carried."""
        log.error("%s", e)
        self.events.put({"event": "job_lost", "step": step, "error": str(e)})
        self.notify()
        _, batch, mine = self._started or (step, [], [])
        self._started = None
        for p in [*batch, *self._held, *mine]:
            if p is not None:
                p.reply(self._ack(p, ok=False, step=None, error=str(e)))
        self._held = []

    def _take_batch(self) -> list[Pending | None]:
        """Rank 0: what the next check carries, in arrival order, as much as fits (None: the
        auto-pause nobody resumed timed out; rank 0's clock decides it for the job)."""
        batch: list[Pending | None] = []
        size = 2
        if self.paused and self._give_up_at is not None and time.monotonic() >= self._give_up_at:
            self._give_up_at = None
            batch.append(None)
            size += 16
        while True:
            if self._held:
                p = self._held.pop(0)
            else:
                try:
                    p = self.queue.get_nowait()
                except queue.Empty:
                    return batch
            n = len(json.dumps([p.req_id, p.cmd, p.args, p.sender])) + 1
            if size + n <= self.job.capacity:
                batch.append(p)
                size += n
            elif not batch:  # larger alone than a check carries
                p.reply(self._ack(p, ok=False, step=None, error=(
                    f"{p.cmd} is too large to send to every rank ({n} bytes;"
                    f" at most {self.job.capacity - 2})")))
            else:
                self._held.insert(0, p)
                return batch

    def _apply_one(self, p: Pending, step: int) -> None:
        try:
            ack = self._apply(p, step)
        except Exception as e:  # a bug (refusals are acks): log it, but never stop training
            log.exception("applying %s at step %d failed", p.cmd, step)
            ack = self._ack(p, ok=False, step=None, error=f"{p.cmd} failed: {e!r}")
        if ack is not None:
            p.reply(ack)

    def _publish_ack(self, ack: dict[str, Any]) -> None:
        """A rank > 0's ack of a command rank 0 sent: telemetry only (no requester here)."""
        self.events.put({"event": "ack", **ack})
        self.notify()

    def close(self) -> None:
        """Release a paused loop and refuse what is still queued. A job's check still in
        flight is waited for (every rank started it, so it completes) and what it carried
        refused: the run ended before a boundary could apply it."""
        self._closed.set()
        self.paused = False
        if self._started is not None and self.job is not None and self.job.in_flight:
            _, batch, mine = self._started
            self._started = None
            try:
                self.job.finish()
            except JobLost as e:
                log.warning("%s (at close)", e)
            for p in [*batch, *mine]:
                if p is not None:
                    p.reply(self._ack(p, ok=False, step=None, error="the run has ended"))
        for p in self._held:
            p.reply(self._ack(p, ok=False, step=None, error="the run has ended"))
        self._held = []
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
            self._apply_one(p, step)
            block = False

    def _pause(self, step: int, reason: str) -> None:
        self.paused, self.paused_at, self.pause_reason, self._until = True, step, reason, None
        self._give_up_at = None

    def _give_up(self, step: int) -> None:
        """The auto-pause timed out: snapshot, stop, and say why (log, telemetry, and so the
        recording). The run's values are non-finite and nobody is there to decide, so the
        stop raises ``StopTraining`` whether or not the loop asked for ``raise_on_stop``."""
        reason = (f"auto-pause timeout: nobody resumed within {self.auto_pause_timeout:g} s"
                  f" ({self.pause_reason}); snapshot and stop at step {step}")
        log.warning("neurotop %s", reason)
        self._forced_stop = reason
        self.stop_requested = True
        self.paused, self.paused_at, self.pause_reason, self._until = False, None, "", None
        self._give_up_at = None
        def publish(ack: dict[str, Any]) -> None:
            self.events.put({"event": "ack", **ack})
            self.notify()
        stop = Pending("auto-timeout-stop", "stop", {}, "auto-pause", publish)
        publish(self._ack(stop, ok=True, step=step, old="paused", new="stopping",
                          reason=reason))
        if self.snapshot is not None:
            shot = Pending("auto-timeout-snapshot", "snapshot", {}, "auto-pause", publish)
            self._apply(shot, step)

    def _apply(self, p: Pending, step: int) -> dict[str, Any] | None:
        old = self._state()["state"]
        if p.cmd == "pause":
            self._pause(step, p.args.get("reason") or f"paused by {p.sender or 'an operator'}")
            if p.sender == "auto-pause" and self.auto_pause_timeout is not None:
                self._give_up_at = time.monotonic() + self.auto_pause_timeout
            return self._ack(p, ok=True, step=step, old=old, new="paused")
        if p.cmd in ("resume", "step"):
            self.paused, self.paused_at, self.pause_reason = False, None, ""
            self._give_up_at = None
            self.resumes += 1
            if p.cmd == "resume":
                self._until = None
                return self._ack(p, ok=True, step=step, old=old, new="running")
            self._until = step + p.args["n"]
            return self._ack(p, ok=True, step=step, old=old, new="stepping", until=self._until)
        if p.cmd == "set":
            result: dict[str, Any] | None = None

            def rolled_back(error: str, restored: Any) -> None:
                """From the step after this boundary, which raised with the value."""
                p.reply(self._ack(p, ok=False, step=None, old=result["new"] if result else None,
                                  new=restored, error=error, rolled_back=True))
            try:
                result = self.knobs.apply(p.args["knob"], p.args.get("value"),
                                          p.args.get("op", "set"), rolled_back) \
                    if self.knobs else None
            except ValueError as e:
                return self._ack(p, ok=False, step=None, error=str(e))
            if result is None:
                return self._ack(p, ok=False, step=None, error="this run has no knobs")
            return self._ack(p, ok=True, step=step, **result)
        if p.cmd == "stop":
            self.stop_requested = True
            self.paused, self.paused_at, self.pause_reason, self._until = False, None, "", None
            self._give_up_at = None
            return self._ack(p, ok=True, step=step, old=old, new="stopping")
        if p.cmd == "snapshot" and self.job is not None and self.job.rank != 0:
            return self._ack(p, ok=True, step=step, new=None, saved_by=0)
        if p.cmd == "snapshot" and self.snapshot is not None:
            def done(result: dict[str, Any]) -> None:
                ok = "error" not in result
                p.reply(self._ack(p, ok=ok, step=step if ok else None, **result))
            try:
                self.snapshot(step, done)
            except Exception as e:  # copying the state failed (out of memory, a state_dict
                # hook): the run goes on without this snapshot, the operator learns why
                log.exception("snapshot at step %d failed", step)
                return self._ack(p, ok=False, step=None, error=f"snapshot failed: {e!r}")
            return None
        if p.cmd == "probe" and self.probe is not None:
            try:
                return self._ack(p, ok=True, step=step, new=self.probe(step))
            except (ValueError, RuntimeError, TypeError) as e:  # nothing to probe, or a
                # closure/model the double backward cannot go through: the run goes on
                return self._ack(p, ok=False, step=None, error=f"probe: {e}")
        return self._ack(p, ok=False, step=None, error=f"{p.cmd!r} is not available in this run")

    def _state(self) -> dict[str, Any]:
        return {"state": "paused" if self.paused else "running", "paused_at": self.paused_at}

    def _ack(self, p: Pending, *, ok: bool, step: int | None, old: Any = None, new: Any = None,
             error: str | None = None, **extra: Any) -> dict[str, Any]:
        if self.job is not None and ok and step is not None:
            # applied at this step by every rank: the collective that carried it completed
            extra["ranks"] = list(range(self.job.world_size))
        return {"id": p.req_id, "cmd": p.cmd, "args": p.args, "ok": ok, "step": step,
                "old": old, "new": new, "error": error, "sender": p.sender,
                "pause_reason": self.pause_reason, **self._state(), **extra}
