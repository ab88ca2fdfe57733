"""A live connection to one run: telemetry into a ``RunStore``, commands out, acks back.

Reachable without the UI (``neurotop ctl`` and the tests use it directly). One
thread owns both sockets, as ZeroMQ requires: it polls the SUB and DEALER sockets
and a queue of outgoing commands, so callers from any thread just get a Future.
"""

from __future__ import annotations

import getpass
import queue
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from neurotop.protocol import wire
from neurotop.protocol.binding import make_client
from neurotop.tui.data.backfill import Backfill
from neurotop.tui.data.store import RunStore

if TYPE_CHECKING:
    from neurotop.tui.data.remote import SshLink


class CommandError(RuntimeError):
    """A command was rejected by the run, or no ack came in time."""


class RunGone(RuntimeError):
    """A run a pending client waited for will not start (its process exited)."""


@dataclass
class Endpoints:
    """Where a run listens, and its key (``None``: watch only, no control).
    ``curve_server_key``: the run's CURVE public key when it binds with CURVE; ``link``:
    the ssh tunnel these endpoints go through, closed with the client. ``rank``: telemetry
    is a job's node relay (every rank's messages): only this rank's reach the store."""

    telemetry: str
    control: str | None = None
    key: bytes | None = None
    run_id: str = ""
    curve_server_key: str = ""
    link: SshLink | None = None
    rank: int | None = None
    #: A job's other node relays that this host reaches (``targets.reachable``), subscribed
    #: on the same socket as ``telemetry``; ``relays``: how many the job lists (0: not a job).
    more: list[str] = field(default_factory=list)
    relays: int = 0


def sender_id() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):  # no user name: no $USER and no passwd entry (a container)
        return socket.gethostname()


class LiveClient:
    """Subscribes to a run's telemetry and sends signed commands on its control socket."""

    def __init__(self, endpoints: Endpoints, store: RunStore | None = None, *,
                 backfill: bool = False) -> None:
        """``backfill``: first load the run's history from its session file (a viewer
        attaching late sees the whole run); needs the control key."""
        self.endpoints = endpoints
        self._find: Callable[[], Endpoints | None] | None = None
        #: Why a pending client's run never started (``RunGone``); "" otherwise.
        self.gone = ""
        self.store = store or RunStore()
        self.store.status.control = endpoints.key is not None and endpoints.control is not None
        self._backfill = Backfill(self) if backfill and self.can_control else None
        self._outbox: queue.Queue[tuple[dict[str, Any], Future, float]] = queue.Queue()
        self._pending: dict[str, tuple[Future, float]] = {}
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="neurotop-client", daemon=True)
        self._sender = sender_id()
        #: From a relay: every rank whose messages came (the store holds ``endpoints.rank``'s).
        self.ranks_seen: set[int] = set()

    @classmethod
    def pending(cls, find: Callable[[], Endpoints | None], starting: str, *,
                backfill: bool = False) -> LiveClient:
        """A client of a local run that is not listening yet (``neurotop demo`` while the
        demo imports torch), so the UI can draw at once: the socket thread polls ``find``
        until it returns the run's endpoints (they must carry its key: the run is ours to
        control) or raises ``RunGone`` (then ``gone`` says why, and the UI closes); until
        then the status bar says ``starting``."""
        client = cls(Endpoints(telemetry="", control="", key=b""), backfill=backfill)
        client._find = find
        client.store.status.starting = starting
        return client

    @property
    def can_control(self) -> bool:
        return self.store.status.control

    def start(self) -> LiveClient:
        if self.endpoints.link is not None:
            self.endpoints.link.attach(self.store)
        self._thread.start()
        return self

    def close(self) -> None:
        self._halt.set()
        self._thread.join(3)
        if self.endpoints.link is not None:
            self.endpoints.link.close()

    def command(self, cmd: str, args: dict[str, Any] | None = None,
                timeout: float = 10.0) -> Future:
        """Queue a command; the Future resolves to the ack or raises ``CommandError``."""
        fut: Future = Future()
        if not self.can_control:
            fut.set_exception(CommandError("read-only: this connection has no control key"))
            return fut
        req = wire.new_request(cmd, args, sender=self._sender)
        size = len(wire.encode_signed(None, req)[0])
        if size > wire.MAX_REQUEST_BYTES:  # the agent would refuse it unread
            fut.set_exception(CommandError(
                f"{cmd!r} is {size} bytes encoded; the agent takes commands of at most"
                f" {wire.MAX_REQUEST_BYTES} bytes"))
            return fut
        self._outbox.put((req, fut, time.monotonic() + timeout))
        return fut

    def _on_schema_reply(self, fut: Future) -> None:
        if fut.exception() is not None:
            return  # refused or timed out: the schema is re-sent every few seconds anyway
        schema = fut.result().get("schema")
        if isinstance(schema, dict):
            self.store.ingest_schema(schema)
        else:
            self.store.note_error("a schema reply without a schema")

    # -- the socket thread ------------------------------------------------------------------

    def _wait_for_run(self) -> bool:
        """A pending client's endpoints, polled every 0.1 s; False if it never came."""
        while self._find is not None and not self._halt.is_set():
            try:
                found = self._find()
            except RunGone as e:
                self.gone = str(e)
                self.store.set_status(starting=self.gone)
                return False
            if found is not None:
                self.endpoints, self._find = found, None
                self.store.set_status(control=found.key is not None and bool(found.control))
                return True
            self._halt.wait(0.1)
        return not self._halt.is_set()

    def _run(self) -> None:
        if not self._wait_for_run():
            return
        if self.can_control:
            self.command("schema").add_done_callback(self._on_schema_reply)
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 10000)
        sub.setsockopt(zmq.MAXMSGSIZE, wire.MAX_ARRAY_BYTES)
        sub.subscribe(b"")
        if self.endpoints.curve_server_key:
            make_client(sub, self.endpoints.curve_server_key)
        sub.connect(self.endpoints.telemetry)
        for endpoint in self.endpoints.more:  # every node relay reachable from here
            sub.connect(endpoint)
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        dealer = None
        if self.can_control:
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            if self.endpoints.curve_server_key:
                make_client(dealer, self.endpoints.curve_server_key)
            dealer.connect(self.endpoints.control)
            poller.register(dealer, zmq.POLLIN)
        try:
            while not self._halt.is_set():
                for sock, _ in poller.poll(timeout=20):
                    for _ in range(1000):  # drain what is there without starving the outbox
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if sock is sub:
                            self._on_telemetry(frames)
                        else:
                            self._on_reply(frames)
                self._send_outbox(dealer)
                self._expire()
        finally:
            for fut, _ in self._pending.values():
                if not fut.done():
                    fut.set_exception(CommandError("connection closed before the ack came"))
            ctx.destroy(0)

    def _on_telemetry(self, frames: list[bytes]) -> None:
        if self.endpoints.rank is not None:
            try:
                rank = wire.decode_header(frames[0]).get("rank", 0)
            except wire.WireError as e:
                self.store.note_error(f"undecodable telemetry: {e}")
                return
            if isinstance(rank, int):
                self.ranks_seen.add(rank)
            if rank != self.endpoints.rank:
                return
        if self._backfill is not None and self._backfill.hold(frames):
            return
        try:
            msg = wire.decode(frames)
        except wire.WireError as e:
            self.store.note_error(f"undecodable telemetry: {e}")
            return
        self.store.ingest(msg)

    def _on_reply(self, frames: list[bytes]) -> None:
        try:
            reply, signed = wire.decode_signed(frames, self.endpoints.key)
        except wire.WireError as e:
            self.store.note_error(f"undecodable reply: {e}")
            return
        entry = self._pending.pop(reply.get("id") or "", None)
        if entry is None:
            return
        fut, _ = entry
        if reply.get("ok") and signed:
            fut.set_result(reply)
        elif reply.get("ok"):
            fut.set_exception(CommandError("an ack not signed with the run's key: ignored"))
        else:  # a refusal is reported even unsigned: it changed nothing
            fut.set_exception(CommandError(str(reply.get("error") or "rejected")))

    def _send_outbox(self, dealer: zmq.Socket | None) -> None:
        while True:
            try:
                req, fut, deadline = self._outbox.get_nowait()
            except queue.Empty:
                return
            assert dealer is not None and self.endpoints.key is not None
            try:  # never block this thread: telemetry and every other command wait on it
                dealer.send_multipart(wire.encode_signed(self.endpoints.key, req),
                                      flags=zmq.NOBLOCK)
            except zmq.Again:
                fut.set_exception(CommandError(
                    f"{req['cmd']!r} not sent: no connection to the run's control socket"
                    " (is the run gone, or is its CURVE key not the one given?)"))
                continue
            self._pending[req["id"]] = (fut, deadline)

    def _expire(self) -> None:
        now = time.monotonic()
        for rid, (fut, deadline) in list(self._pending.items()):
            if now > deadline:
                del self._pending[rid]
                fut.set_exception(CommandError("no acknowledgement in time: is the run alive?"))
