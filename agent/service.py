"""The agent thread: everything that is not device work.

It owns the ZeroMQ sockets (PUB for telemetry, ROUTER for control), copies each
report's block to the host, encodes and publishes it, heartbeats, and turns
control requests into ``Pending`` commands for the training thread. The
training thread talks to it only through ``submit_report`` (non-blocking,
drops and counts when full) and the acks it queues.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from agent import wire
from agent.control import BOUNDARY_COMMANDS, Controller, Pending

log = logging.getLogger("neurotop.agent")

NONCE_WINDOW_S = 120.0


@dataclass
class Report:
    """One report as the training thread hands it over: its host copy possibly in flight."""

    step: int
    t: float
    data: Any  # torch.Tensor: the report's one flat float32 buffer, on the host
    #: Turns the buffer (as NumPy) into messages: ``[(header fields, arrays), ...]``.
    finalize: Callable[[np.ndarray], list[tuple[dict[str, Any], list[np.ndarray]]]]
    ready: Any = None  # a CUDA event to wait on before reading, or None


class AgentService(threading.Thread):
    """Publishes telemetry and serves control on loopback, from its own thread."""

    def __init__(self, *, run_id: str, key: bytes, controller: Controller,
                 schema: Callable[[], dict[str, Any]], status: Callable[[], dict[str, Any]],
                 bind_host: str = "127.0.0.1", rank: int = 0, heartbeat_s: float = 0.5,
                 schema_every_s: float = 5.0, max_queued_reports: int = 64) -> None:
        super().__init__(name="neurotop-agent", daemon=True)
        self.run_id, self.key, self.rank = run_id, key, rank
        self.controller = controller
        self._schema, self._status = schema, status
        self._bind_host = bind_host
        self.heartbeat_s, self.schema_every_s = heartbeat_s, schema_every_s
        self.reports: queue.Queue[Report] = queue.Queue(maxsize=max_queued_reports)
        self._replies: queue.Queue[tuple[bytes, dict[str, Any]]] = queue.Queue()
        self._halt = threading.Event()
        self._ready = threading.Event()
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

    def stop(self, timeout: float = 5.0) -> None:
        self._halt.set()
        self.join(timeout)

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
            port = pub.bind_to_random_port(f"tcp://{self._bind_host}")
            self.telemetry_endpoint = f"tcp://{self._bind_host}:{port}"
            router = ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 500)
            router.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
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

    def _loop(self, pub: zmq.Socket, router: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pub, zmq.POLLIN)
        next_hb = next_schema = 0.0
        while not self._halt.is_set():
            for sock, _ in poller.poll(timeout=10):
                if sock is router:
                    self._on_control(router, sock.recv_multipart())
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
                                    **self._status()})
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
        try:
            pub.send_multipart(wire.encode(header, arrays), flags=zmq.NOBLOCK)
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

    # -- control ------------------------------------------------------------------------

    def _on_control(self, router: zmq.Socket, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self.rejected += 1
            return
        ident, body = frames[0], frames[1:]
        try:
            req, signed = wire.decode_signed(body, self.key)
        except wire.WireError as e:
            self.rejected += 1
            log.warning("refused a malformed control message: %s", e)
            self._queue_reply(ident, {"id": None, "ok": False, "error": f"malformed: {e}"})
            return
        rid, cmd = req.get("id"), req.get("cmd")
        args = req.get("args", {})
        error = None
        if not signed:
            error = "not signed with this run's key"
        elif not isinstance(cmd, str) or not isinstance(args, dict) or not isinstance(rid, str):
            error = "a request needs a string 'id', a string 'cmd' and a map 'args'"
        elif not self._fresh(req):
            error = "replayed or stale request (nonce seen before, or timestamp out of window)"
        if error:
            self.rejected += 1
            log.warning("refused control request %r: %s", cmd, error)
            self._queue_reply(ident, {"id": rid if isinstance(rid, str) else None,
                                            "cmd": cmd if isinstance(cmd, str) else None,
                                            "ok": False, "error": error})
            return
        sender = str(req.get("sender", ""))[:200]
        if cmd == "schema":
            self._queue_reply(ident, {"id": rid, "cmd": cmd, "ok": True,
                                            "schema": self._schema(), **self._status()})
        elif cmd in BOUNDARY_COMMANDS:
            self.controller.submit(Pending(rid, cmd, args, sender,
                                           lambda ack, i=ident: self._queue_reply(i, ack)))
        else:
            known = ", ".join(sorted(BOUNDARY_COMMANDS | {"schema"}))
            self._queue_reply(ident, {"id": rid, "cmd": cmd, "ok": False,
                                            "error": f"unknown command {cmd!r}; known: {known}"})

    def _fresh(self, req: dict[str, Any]) -> bool:
        nonce, ts = req.get("nonce"), req.get("ts")
        now = time.time()
        if not isinstance(nonce, str) or not isinstance(ts, (int, float)):
            return False
        if abs(now - ts) > NONCE_WINDOW_S or nonce in self._nonces:
            return False
        self._nonces = {n: t for n, t in self._nonces.items() if now - t <= NONCE_WINDOW_S}
        self._nonces[nonce] = now
        return True

    def _queue_reply(self, ident: bytes, ack: dict[str, Any]) -> None:
        self._replies.put((ident, ack))

    def _send_replies(self, pub: zmq.Socket, router: zmq.Socket) -> None:
        while True:
            try:
                ident, ack = self._replies.get_nowait()
            except queue.Empty:
                return
            payload = {"v": wire.PROTOCOL_VERSION, "kind": "reply", **ack}
            try:
                router.send_multipart([ident, *wire.encode_signed(self.key, payload)],
                                      flags=zmq.NOBLOCK)
            except zmq.ZMQError as e:
                log.warning("could not reply to a control client: %s", e)
            if "schema" not in ack:
                # Every ack is also telemetry, so every viewer sees the command log.
                self._publish(pub, {"kind": wire.EVENT, "event": "ack", **ack})
