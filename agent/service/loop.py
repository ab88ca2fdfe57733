"""The agent thread's socket loop: everything that is not device work.

It owns the ZeroMQ sockets (XPUB for telemetry, ROUTER for control), finalizes each
report's host copy, publishes (and so records) it, runs the detectors, heartbeats, and
turns control requests that pass the ``gate`` into answers (``history`` from the
history server) or ``Pending`` commands for the training thread. The training thread
talks to it only through ``submit_report`` (non-blocking, drops and counts when full)
and the acks it queues; both ring the ``Wakeup``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from neurotop.protocol import wire
from neurotop.protocol.binding import CurveKeys, check_bind
from neurotop.protocol.commands import BOUNDARY_COMMANDS, IMMEDIATE_COMMANDS
from neurotop.service.autopause import AutoPause
from neurotop.service.controller import Controller, Pending
from neurotop.service.detectors import Alert, Detectors
from neurotop.service.finalize import Report
from neurotop.service.gate import Gate, Refusal, Request
from neurotop.service.history import HistoryServer
from neurotop.service.recorder import Recorder
from neurotop.service.relay import Relay
from neurotop.service.system import SystemSampler
from neurotop.service.wakeup import Wakeup

log = logging.getLogger("neurotop.agent")

#: A new subscription brings the schema and a heartbeat at once, but at most once per this
#: many seconds: a storm of subscriptions (10,000 made 1,002 extra schemas) adds a handful
#: to the recording, and a new viewer still has its schema within this interval.
SUBSCRIBE_RESEND_S = 0.25


class AgentService(threading.Thread):
    """Publishes telemetry and serves control on loopback, from its own thread.

    Assembled from its parts: the ``controller`` (the command queue to the training
    thread), the ``wakeup`` it shares with the controller (the service closes it when its
    thread ends), and the gate and history server it builds from ``key`` and
    ``recorder``. Started and stopped (joined) by its owner, the ``Monitor``.
    """

    def __init__(self, *, run_id: str, key: bytes, controller: Controller, wakeup: Wakeup,
                 schema: Callable[[], dict[str, Any]], status: Callable[[], dict[str, Any]],
                 bind_host: str = "127.0.0.1", rank: int = 0, heartbeat_s: float = 0.5,
                 schema_every_s: float = 5.0, max_queued_reports: int = 64,
                 curve: CurveKeys | None = None, auto_pause: AutoPause | None = None,
                 detectors: Detectors | None = None, recorder: Recorder | None = None,
                 identity: dict[str, Any] | None = None,
                 on_alert: Callable[[dict[str, Any]], None] | None = None) -> None:
        check_bind(bind_host, curve is not None)
        super().__init__(name="neurotop-agent", daemon=True)
        self._curve = curve
        self.run_id, self.rank = run_id, rank
        self._identity = identity or {}  # a job's rank: world_size, local_rank, host
        self.controller = controller
        self.wakeup = wakeup
        self.gate = Gate(key)
        self.history = HistoryServer(recorder)
        self.recorder = recorder
        self._schema, self._status = schema, status
        self._bind_host = bind_host
        self.heartbeat_s, self.schema_every_s = heartbeat_s, schema_every_s
        self.reports: queue.Queue[Report] = queue.Queue(maxsize=max_queued_reports)
        self._replies: queue.Queue[tuple[bytes | None, dict[str, Any]]] = queue.Queue()
        self._events: list[dict[str, Any]] = []  # audit events, published before the acks
        self.auto_pause = auto_pause
        self.detectors = detectors
        self.on_alert = on_alert
        self._on_alert_failed: set[tuple[str, str]] = set()  # (alert, exception) logged
        self.system = SystemSampler()  # host and GPU metrics, sampled per heartbeat
        self._internal = 0
        self._halt = threading.Event()
        self._ready = threading.Event()
        self._seq = 0
        self._sent_schema: dict[str, Any] | None = None  # the last schema published
        self._schema_sent_at = self._hb_sent_at = -SUBSCRIBE_RESEND_S  # time.monotonic()
        self.dropped = 0
        self.telemetry_endpoint = self.control_endpoint = ""
        #: Local rank 0 of a job hosts its node's relay (``neurotop.service.relay``).
        self.relay: Relay | None = None
        self._error: BaseException | None = None

    # -- called from the training thread ------------------------------------------------

    def start(self) -> None:
        super().start()
        self._ready.wait(10)
        if self._error:
            raise RuntimeError(f"neurotop agent could not start: {self._error}") \
                from self._error

    def submit_report(self, r: Report) -> None:
        """Never blocks: a full queue means the consumer lags, so the report is dropped.
        The schema is taken here, on the training thread, so it is the one the report was
        made under (a later ``observe`` of a new scalar changes it)."""
        if r.schema is None:
            r.schema = self._schema()  # cached: rebuilt only when it changed
        try:
            self.reports.put_nowait(r)
        except queue.Full:
            self.dropped += 1
        self.wakeup.ring()

    def stop(self, timeout: float = 5.0) -> None:
        """Flush what is queued, publish the last heartbeat, close the sockets, join."""
        self._halt.set()
        self.wakeup.ring()
        self.join(timeout)

    # -- the thread ---------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._serve()
        finally:
            if self.relay is not None:
                self.relay.stop()
            self.system.close()
            self.wakeup.close()  # its only reader is gone; a late ring now fails quietly

    def _serve(self) -> None:
        ctx = zmq.Context()
        try:
            # XPUB, not PUB: it tells us when a viewer subscribes, so the schema goes out
            # at once instead of on the next periodic resend.
            pub = ctx.socket(zmq.XPUB)
            pub.setsockopt(zmq.XPUB_VERBOSE, 1)
            pub.setsockopt(zmq.SNDHWM, 1000)
            pub.setsockopt(zmq.LINGER, 200)
            if self._curve:
                self._curve.make_server(pub)
            port = pub.bind_to_random_port(f"tcp://{self._bind_host}")
            self.telemetry_endpoint = f"tcp://{self._bind_host}:{port}"
            router = ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 500)
            router.setsockopt(zmq.MAXMSGSIZE, wire.MAX_HEADER_BYTES)
            if self._curve:
                self._curve.make_server(router)
            port = router.bind_to_random_port(f"tcp://{self._bind_host}")
            self.control_endpoint = f"tcp://{self._bind_host}:{port}"
            if self._identity.get("world_size", 1) > 1 and \
                    self._identity.get("local_rank") == 0:
                self._start_relay()
        except BaseException as e:  # reported to the starting thread
            self._error = e
            self._ready.set()
            ctx.destroy(0)
            return
        self._ready.set()
        try:
            self._loop(pub, router)
        finally:
            self._flush(pub, router)
            pub.close()
            router.close()
            ctx.term()

    def _start_relay(self) -> None:
        """The node's relay; without it (its socket could not bind) each rank's own
        telemetry still serves viewers, so the job goes on and the log says why."""
        relay = Relay(self.run_id, own=self.telemetry_endpoint, host=self._identity.get("host"),
                      own_curve=self._curve.public if self._curve else "",
                      node=self._identity.get("node", ""))
        try:
            relay.start()
        except RuntimeError as e:
            log.warning("%s; viewers connect to each rank instead", e)
            return
        self.relay = relay

    def _loop(self, pub: zmq.Socket, router: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pub, zmq.POLLIN)
        poller.register(self.wakeup.reader, zmq.POLLIN)
        next_hb = next_schema = 0.0
        self._publish_schema(pub, self._schema())  # first in the recording
        while not self._halt.is_set():
            due = min(next_hb, next_schema) - time.monotonic()
            for sock, _ in poller.poll(timeout=max(0, int(due * 1000) + 1)):
                if sock == self.wakeup.fileno:
                    self.wakeup.drain()
                elif sock is router:
                    # Not copied: an oversized or unsigned body is refused by its length
                    # and its signature, without ever becoming a Python object.
                    frames = [f.buffer for f in sock.recv_multipart(copy=False)]
                    try:
                        self._on_control(frames)
                    except Exception:  # untrusted input must never stop the agent thread
                        self.gate.count_rejected()
                        log.exception("error while handling a control message")
                elif sock.recv()[:1] == b"\x01":  # a new subscription: schema and heartbeat
                    next_schema = min(next_schema, self._schema_sent_at + SUBSCRIBE_RESEND_S)
                    next_hb = min(next_hb, self._hb_sent_at + SUBSCRIBE_RESEND_S)
            self._publish_reports(pub)  # first: a step's stats precede the ack naming it
            self._events.extend(self.gate.refusal_events())
            self._send_replies(pub, router)
            now = time.monotonic()
            if now >= next_schema:
                self._publish_schema(pub, self._schema())
                next_schema = now + self.schema_every_s
            if now >= next_hb:
                self._publish(pub, {"kind": wire.HEARTBEAT, "control": self.control_endpoint,
                                    "dropped": self.dropped, "rejected": self.gate.rejected,
                                    **self._status(), **self.controller.heartbeat(),
                                    "system": self.system.sample()})
                self._hb_sent_at = now
                next_hb = now + self.heartbeat_s

    def _flush(self, pub: zmq.Socket, router: zmq.Socket) -> None:
        self._publish_reports(pub)
        self._events.extend(self.gate.refusal_events(final=True))
        self._send_replies(pub, router)
        self._publish(pub, {"kind": wire.HEARTBEAT, "control": self.control_endpoint,
                            "dropped": self.dropped, "rejected": self.gate.rejected,
                            **self._status(), "state": "ended",
                            "system": self.system.sample()})

    def _publish(self, pub: zmq.Socket, header: dict[str, Any],
                 arrays: list[np.ndarray] | tuple = ()) -> None:
        header.update(run=self.run_id, rank=self.rank, **self._identity, seq=self._seq,
                      t=time.time())
        self._seq += 1
        if self.recorder is not None and header["kind"] == wire.HEARTBEAT:
            header["rec_dropped"] = self.recorder.dropped
        frames = wire.encode(header, arrays)
        if self.recorder is not None:  # recorded even when no viewer gets it
            self.recorder.record(header["kind"], header.get("step"), header["t"], frames)
        try:
            pub.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def _publish_schema(self, pub: zmq.Socket, schema: dict[str, Any]) -> None:
        self._sent_schema = schema
        self._schema_sent_at = time.monotonic()
        self._publish(pub, {"kind": wire.SCHEMA, **schema})

    def _publish_reports(self, pub: zmq.Socket) -> None:
        """Each report after the schema it was made under: when that is not the schema last
        sent (a new user scalar, more param groups), it is sent first. Otherwise a viewer,
        or a recording that ends before the periodic resend, labels the values with the
        wrong names."""
        while True:
            try:
                r = self.reports.get_nowait()
            except queue.Empty:
                return
            if r.ready is not None:  # poll the copy's event: no device sync, even here
                while not r.ready.query():
                    time.sleep(0.0002)
            try:
                messages = r.finalize(r.data.numpy())
            except Exception:  # a bug here must not stop telemetry and control: log, go on
                log.exception("could not finalize the report of step %d", r.step)
                continue
            schema = r.schema if r.schema is not None else self._schema()
            if schema is not self._sent_schema and schema != self._sent_schema:
                self._publish_schema(pub, schema)  # (cached: the same dict until it changes)
            for header, arrays in messages:
                self._publish(pub, {"step": r.step, "wall": r.t, "dropped": self.dropped,
                                    **header}, arrays)
                if header["kind"] == wire.STATS and self.detectors is not None:
                    params = next((a[0] for h, a in messages if h["kind"] == wire.PARAMS),
                                  None)  # the same report's [params x PARAM_STATS]
                    for alert in self.detectors.check(r.step, arrays[0], arrays[1], schema,
                                                      params):
                        self._raise(alert)

    # -- control ------------------------------------------------------------------------

    def _on_control(self, frames: list[memoryview]) -> None:
        verdict = self.gate.admit(frames)
        if isinstance(verdict, Refusal):
            if verdict.reply is not None:  # None: over its budget, only counted
                self._queue_reply(verdict.ident, verdict.reply, publish=False)
        elif verdict is not None:
            self._route(verdict)

    def _route(self, req: Request) -> None:
        """An authentic request: audit it, then answer, refuse, or queue it for the boundary."""
        ident, rid, cmd, args, sender = req.ident, req.id, req.cmd, req.args, req.sender
        if cmd not in ("schema", "history"):  # the audit trail: who asked for what
            self._events.append({"event": "command", "id": rid, "cmd": cmd, "args": args,
                                 "sender": sender, "client": ident.hex()})
        error = self.controller.validate(cmd, args)
        base = {"id": rid, "cmd": cmd, "args": args, "sender": sender}
        if error:
            self.gate.count_rejected()
            self._queue_reply(ident, {**base, "ok": False, "step": None, "error": error})
        elif cmd == "schema":
            self._queue_reply(ident, {**base, "ok": True, "schema": self._schema(),
                                      **self._status()})
        elif cmd == "history":  # chunks of the session file for a late viewer; not audited
            self._queue_reply(ident, {**base, **self.history.answer(args)})
        elif cmd == "knobs":
            self._queue_reply(ident, {**base, "ok": True, "step": self._status()["step"],
                                      "knobs": self.controller.describe_knobs()})
        elif cmd in BOUNDARY_COMMANDS:
            self.controller.submit(Pending(rid, cmd, args, sender,
                                           lambda ack, i=ident: self._queue_reply(i, ack)))
        else:  # validate() knows every command; this guards a table falling out of step
            known = ", ".join(sorted(BOUNDARY_COMMANDS | IMMEDIATE_COMMANDS))
            self._queue_reply(ident, {**base, "ok": False,
                                      "error": f"unknown command {cmd!r}; known: {known}"})

    def _raise(self, alert: Alert) -> None:
        """Log the alert (so a run with no viewer still tells), publish it (published
        messages are recorded) and auto-pause if the policy says so."""
        log.log(logging.ERROR if alert.level == "critical" else logging.WARNING,
                "neurotop alert %s (%s) at step %d: %s", alert.name, alert.level, alert.step,
                alert.message)
        self._events.append(alert.event())
        self._tell_outside(alert)
        if self.auto_pause is not None:
            self._maybe_auto_pause(self.auto_pause.alert(alert, self.controller.resumes))

    def _tell_outside(self, alert: Alert) -> None:
        """The alert, with the run, rank and time, to scripts: a line of the alert log
        beside the session file, then ``watch(on_alert=fn)``. ``fn`` runs on this thread;
        what it raises is logged once per alert and exception type, and the agent goes on."""
        record = {**alert.event(), "run": self.run_id, "rank": self.rank, **self._identity,
                  "t": time.time()}
        if self.recorder is not None and self.recorder.alerts is not None:
            self.recorder.alerts.write(record)
        if self.on_alert is None:
            return
        try:
            self.on_alert(record)
        except (Exception, SystemExit) as e:  # the user's code: even sys.exit() ends no agent
            key = (alert.name, type(e).__name__)
            if key not in self._on_alert_failed:
                self._on_alert_failed.add(key)
                log.exception("neurotop: on_alert raised %s on a %s alert (logged once per"
                              " alert and exception type; the agent goes on)",
                              type(e).__name__, alert.name)

    def _maybe_auto_pause(self, reason: str | None) -> None:
        """Queue the auto-pause as an ordinary command; its ack goes to telemetry only."""
        if reason:
            self._internal += 1
            log.warning("%s", reason)
            self.controller.submit(Pending(f"auto-{self._internal}", "pause",
                                           {"reason": reason[:200]}, "auto-pause",
                                           lambda ack: self._queue_reply(None, ack),
                                           internal=True))

    def _queue_reply(self, ident: bytes | None, ack: dict[str, Any],
                     publish: bool = True) -> None:
        """``ident`` None: an internal command, whose ack is telemetry only. Called from
        the training thread too (acks at the boundary): wake the agent thread."""
        self._replies.put((ident, {**ack, "_publish": publish}))
        self.wakeup.ring()

    def _send_replies(self, pub: zmq.Socket, router: zmq.Socket) -> None:
        while True:
            try:
                ev = self.controller.events.get_nowait()
            except queue.Empty:
                break
            if callable(ev):  # a job's rank rules on a check's table: judged here, raised
                for alert in ev():
                    self._raise(alert)
            else:
                self._events.append(ev)
        events, self._events = self._events, []
        for ev in events:
            self._publish(pub, {"kind": wire.EVENT, **ev})
        while True:
            try:
                ident, ack = self._replies.get_nowait()
            except queue.Empty:
                return
            publish = ack.pop("_publish")
            if ident is not None:
                payload = {"v": wire.PROTOCOL_VERSION, "kind": "reply", **ack}
                try:
                    router.send_multipart([ident, *self.gate.seal(payload)],
                                          flags=zmq.NOBLOCK)
                except zmq.ZMQError as e:
                    log.warning("could not reply to a control client: %s", e)
            if publish and "schema" not in ack and "history" not in ack:
                # Every ack is also telemetry, so every viewer sees the command log.
                self._publish(pub, {"kind": wire.EVENT, "event": "ack", **ack})
