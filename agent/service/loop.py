"""The agent thread: everything that is not device work.

It owns the ZeroMQ sockets (PUB for telemetry, ROUTER for control), copies each
report's block to the host, encodes and publishes it, heartbeats, and turns
control requests into ``Pending`` commands for the training thread. The
training thread talks to it only through ``submit_report`` (non-blocking,
drops and counts when full) and the acks it queues.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
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
from neurotop.service.recorder import Recorder

log = logging.getLogger("neurotop.agent")

NONCE_WINDOW_S = 120.0
#: Refused control messages are logged (and published as events) at most this often per
#: second; the rest are only counted, so a flood cannot flood the log or the stream.
REFUSALS_SHOWN_PER_S = 5
#: Largest piece of the session file one ``history`` reply carries (replies must stay
#: under the wire's header limit).
HISTORY_CHUNK = 512 << 10


class AgentService(threading.Thread):
    """Publishes telemetry and serves control on loopback, from its own thread."""

    def __init__(self, *, run_id: str, key: bytes, controller: Controller,
                 schema: Callable[[], dict[str, Any]], status: Callable[[], dict[str, Any]],
                 bind_host: str = "127.0.0.1", rank: int = 0, heartbeat_s: float = 0.5,
                 schema_every_s: float = 5.0, max_queued_reports: int = 64,
                 curve: CurveKeys | None = None, auto_pause: AutoPause | None = None,
                 detectors: Detectors | None = None, recorder: Recorder | None = None) -> None:
        check_bind(bind_host, curve is not None)
        super().__init__(name="neurotop-agent", daemon=True)
        self._curve = curve
        self.run_id, self.key, self.rank = run_id, key, rank
        self.controller = controller
        self.recorder = recorder
        self._schema, self._status = schema, status
        self._bind_host = bind_host
        self.heartbeat_s, self.schema_every_s = heartbeat_s, schema_every_s
        self.reports: queue.Queue[Report] = queue.Queue(maxsize=max_queued_reports)
        self._replies: queue.Queue[tuple[bytes | None, dict[str, Any]]] = queue.Queue()
        self._events: list[dict[str, Any]] = []  # audit events, published before the acks
        self.auto_pause = auto_pause
        self.detectors = detectors
        self._refusals_shown = (0.0, 0)  # (second, how many shown in it)
        self._internal = 0
        self._halt = threading.Event()
        self._ready = threading.Event()
        # The training thread writes a byte here when it hands something over, so the agent
        # thread sleeps in poll() until there is work (or a heartbeat is due) instead of
        # waking 100 times a second: on a machine whose cores all train, that is CPU taken
        # from training.
        # A socket pair, not a pipe: once closed, a late write fails instead of landing in
        # whatever file reused the descriptor.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_fd = self._wake_r.fileno()
        controller.notify = self._wake
        self._seq = 0
        self._nonces: dict[str, float] = {}
        self.dropped = 0
        self.rejected = 0
        self.telemetry_endpoint = self.control_endpoint = ""
        self._error: BaseException | None = None

    # -- called from the training thread ------------------------------------------------

    def start(self) -> None:
        super().start()
        self._ready.wait(10)
        if self._error:
            raise RuntimeError(f"neurotop agent could not start: {self._error}")

    def submit_report(self, r: Report) -> None:
        """Never blocks: a full queue means the consumer lags, so the report is dropped."""
        try:
            self.reports.put_nowait(r)
        except queue.Full:
            self.dropped += 1
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        self._halt.set()
        self._wake()
        self.join(timeout)

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (the agent thread has plenty to wake it) or closed (ended)
            pass

    # -- the thread ---------------------------------------------------------------------

    def run(self) -> None:
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
            self._wake_r.close()
            self._wake_w.close()

    def _loop(self, pub: zmq.Socket, router: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pub, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_hb = next_schema = 0.0
        self._publish(pub, {"kind": wire.SCHEMA, **self._schema()})  # first in the recording
        while not self._halt.is_set():
            due = min(next_hb, next_schema) - time.monotonic()
            for sock, _ in poller.poll(timeout=max(0, int(due * 1000) + 1)):
                if sock == self._wake_fd:  # the poller names non-ZeroMQ sockets by fd
                    self._drain_wakeups()
                elif sock is router:
                    frames = sock.recv_multipart()
                    try:
                        self._on_control(router, frames)
                    except Exception:  # control input must never stop the agent thread
                        self.rejected += 1
                        log.exception("error while handling a control message")
                elif sock.recv()[:1] == b"\x01":  # a new subscription
                    next_schema = next_hb = 0.0
            self._publish_reports(pub)  # first: a step's stats precede the ack naming it
            self._send_replies(pub, router)
            now = time.monotonic()
            if now >= next_schema:
                self._publish(pub, {"kind": wire.SCHEMA, **self._schema()})
                next_schema = now + self.schema_every_s
            if now >= next_hb:
                self._publish(pub, {"kind": wire.HEARTBEAT, "control": self.control_endpoint,
                                    "dropped": self.dropped, "rejected": self.rejected,
                                    **self._status(), **self.controller.heartbeat()})
                next_hb = now + self.heartbeat_s

    def _flush(self, pub: zmq.Socket, router: zmq.Socket) -> None:
        self._publish_reports(pub)
        self._send_replies(pub, router)
        self._publish(pub, {"kind": wire.HEARTBEAT, "control": self.control_endpoint,
                            "dropped": self.dropped, "rejected": self.rejected,
                            **self._status(), "state": "ended"})

    def _publish(self, pub: zmq.Socket, header: dict[str, Any],
                 arrays: list[np.ndarray] | tuple = ()) -> None:
        header.update(run=self.run_id, rank=self.rank, seq=self._seq, t=time.time())
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

    def _publish_reports(self, pub: zmq.Socket) -> None:
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
            except Exception:  # a bug here must not stop telemetry and control
                log.exception("could not finalize the report of step %d", r.step)
                continue
            for header, arrays in messages:
                self._publish(pub, {"step": r.step, "wall": r.t, "dropped": self.dropped,
                                    **header}, arrays)
                if header["kind"] == wire.STATS and self.detectors is not None:
                    for alert in self.detectors.check(r.step, arrays[0], arrays[1],
                                                      self._schema()):
                        self._raise(alert)

    # -- control ------------------------------------------------------------------------

    def _on_control(self, router: zmq.Socket, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self.rejected += 1
            return
        ident, body = frames[0], frames[1:]
        try:
            req, signed = wire.decode_signed(body, self.key)
        except wire.WireError as e:
            self._refuse(ident, {}, f"malformed: {e}")
            return
        rid, cmd = req.get("id"), req.get("cmd")
        args = req.get("args", {})
        error = None
        if not signed:
            error = "not signed with this run's key"
        elif req.get("kind") != "request":
            error = f"a {req.get('kind')!r} message is not a request"
        elif not isinstance(cmd, str) or not isinstance(args, dict) or not isinstance(rid, str):
            error = "a request needs a string 'id', a string 'cmd' and a map 'args'"
        else:
            error = self._staleness(req)
        if error:
            self._refuse(ident, req, error)
            return
        self._route(ident, rid, cmd, args, str(req.get("sender", ""))[:200])

    def _route(self, ident: bytes, rid: str, cmd: str, args: dict[str, Any],
               sender: str) -> None:
        """An authentic request: audit it, then answer, refuse, or queue it for the boundary."""
        if cmd not in ("schema", "history"):  # the audit trail: who asked for what
            self._events.append({"event": "command", "id": rid, "cmd": cmd, "args": args,
                                 "sender": sender, "client": ident.hex()})
        error = self.controller.validate(cmd, args)
        base = {"id": rid, "cmd": cmd, "args": args, "sender": sender}
        if error:
            self.rejected += 1
            self._queue_reply(ident, {**base, "ok": False, "step": None, "error": error})
        elif cmd == "schema":
            self._queue_reply(ident, {**base, "ok": True, "schema": self._schema(),
                                      **self._status()})
        elif cmd == "history":  # chunks of the session file for a late viewer; not audited
            self._queue_reply(ident, {**base, **self._history(args)})
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

    def _refuse(self, ident: bytes, req: dict[str, Any], error: str) -> None:
        """A request that is malformed, unsigned, stale or replayed: count it, answer its
        sender, and show it to every viewer (log + ``refused`` event) unless refusals are
        flooding in. ``sender`` is what the request claims, unverified."""
        self.rejected += 1
        rid, cmd, sender = (req.get(k) for k in ("id", "cmd", "sender"))
        rid = rid if isinstance(rid, str) else None
        cmd = cmd[:200] if isinstance(cmd, str) else None
        sender = sender[:200] if isinstance(sender, str) else ""
        self._queue_reply(ident, {"id": rid, "cmd": cmd, "ok": False, "error": error},
                          publish=False)
        sec, shown = self._refusals_shown
        now = int(time.monotonic())
        if now != sec:
            sec, shown = now, 0
        if shown < REFUSALS_SHOWN_PER_S:
            log.warning("refused control request %r from %r: %s", cmd, sender or "?", error)
            self._events.append({"event": "refused", "id": rid, "cmd": cmd, "error": error,
                                 "sender": sender, "client": ident.hex(),
                                 "rejected": self.rejected})
        self._refusals_shown = (sec, shown + 1)

    def _history(self, args: dict[str, Any]) -> dict[str, Any]:
        """A piece of the session file from ``offset``, for a viewer that attaches late.
        The first request waits (up to 2 s) until everything published is in the file,
        and its ``size`` covers all of it: the viewer subscribed before asking."""
        if self.recorder is None:
            return {"ok": False, "history": None,
                    "error": "this run is not recording a session, so it has no history to"
                             " send (watch(record=False))"}
        offset, max_bytes = args.get("offset", 0), args.get("max_bytes", HISTORY_CHUNK)
        if not (isinstance(offset, int) and isinstance(max_bytes, int) and offset >= 0):
            return {"ok": False, "history": None,
                    "error": "history needs integer 'offset' >= 0 and 'max_bytes'"}
        if offset == 0:
            self.recorder.sync(timeout=2.0)
        size = self.recorder.flushed_size
        n = max(0, min(max_bytes, HISTORY_CHUNK, size - offset))
        try:
            with open(self.recorder.path, "rb") as f:
                data = os.pread(f.fileno(), n, offset)
        except OSError as e:
            return {"ok": False, "history": None, "error": f"cannot read the session file: {e}"}
        return {"ok": True, "history": data, "offset": offset, "size": size}

    def _raise(self, alert: Alert) -> None:
        """Log the alert (so a run with no viewer still tells), publish it (published
        messages are recorded) and auto-pause if the policy says so."""
        log.log(logging.ERROR if alert.level == "critical" else logging.WARNING,
                "neurotop alert %s (%s) at step %d: %s", alert.name, alert.level, alert.step,
                alert.message)
        self._events.append(alert.event())
        if self.auto_pause is not None:
            self._maybe_auto_pause(self.auto_pause.alert(alert))

    def _maybe_auto_pause(self, reason: str | None) -> None:
        """Queue the auto-pause as an ordinary command; its ack goes to telemetry only."""
        if reason:
            self._internal += 1
            log.warning("%s", reason)
            self.controller.submit(Pending(f"auto-{self._internal}", "pause",
                                           {"reason": reason[:200]}, "auto-pause",
                                           lambda ack: self._queue_reply(None, ack)))

    def _staleness(self, req: dict[str, Any]) -> str | None:
        """Why a request is not fresh (None if it is): a nonce is accepted once, and only
        within NONCE_WINDOW_S of this machine's clock, so remembered nonces stay few."""
        nonce, ts = req.get("nonce"), req.get("ts")
        now = time.time()
        if not isinstance(nonce, str) or not isinstance(ts, (int, float)) \
                or not math.isfinite(ts):
            return "a request needs a string 'nonce' and a finite number 'ts'"
        if nonce in self._nonces:
            return "replayed request (its nonce was seen before)"
        if abs(now - ts) > NONCE_WINDOW_S:
            return (f"stale request: its timestamp is {now - ts:+.0f} s off the run's clock"
                    f" (allowed: {NONCE_WINDOW_S:.0f} s; are both machines' clocks right?)")
        self._nonces = {n: t for n, t in self._nonces.items() if now - t <= NONCE_WINDOW_S}
        self._nonces[nonce] = now
        return None

    def _queue_reply(self, ident: bytes | None, ack: dict[str, Any],
                     publish: bool = True) -> None:
        """``ident`` None: an internal command, whose ack is telemetry only. Called from
        the training thread too (acks at the boundary): wake the agent thread."""
        self._replies.put((ident, {**ack, "_publish": publish}))
        self._wake()

    def _send_replies(self, pub: zmq.Socket, router: zmq.Socket) -> None:
        events, self._events = self._events, []
        while True:
            try:
                events.append(self.controller.events.get_nowait())
            except queue.Empty:
                break
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
                    router.send_multipart([ident, *wire.encode_signed(self.key, payload)],
                                          flags=zmq.NOBLOCK)
                except zmq.ZMQError as e:
                    log.warning("could not reply to a control client: %s", e)
            if publish and "schema" not in ack and "history" not in ack:
                # Every ack is also telemetry, so every viewer sees the command log.
                self._publish(pub, {"kind": wire.EVENT, "event": "ack", **ack})
