"""The node relay: one telemetry endpoint per node for every rank of a job on it.

A thread of local rank 0's agent service (``AgentService`` starts it), not a process of its
own: nothing to set up or launch, nothing left behind when torchrun tears the job down (it
ends with the rank that hosts it, and a job that lost a rank ends anyway), and one Python
interpreter less per node. Its XSUB socket connects to each local rank's XPUB, found by the
ranks' connection files (same run id, host and node id) in the runtime directory; its XPUB binds
``ipc://`` in that directory (0700, so only this user reaches it). A viewer subscribing to
the relay is passed on to every rank (XPUB_VERBOSE), so each rank sends its schema and a
heartbeat at once, as it does for a direct viewer. Messages pass unchanged: each names its
``rank``. Imports neither torch nor textual.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import threading
import time
from pathlib import Path

import zmq

from neurotop.protocol import connfile
from neurotop.protocol.binding import make_client

log = logging.getLogger("neurotop.relay")

#: How often the relay looks for ranks that started after it (a glob of the runtime dir).
DISCOVER_S = 0.5
#: A Unix socket path is at most 107 bytes on Linux (``sun_path``); longer runtime
#: directories get a private temporary directory instead.
MAX_IPC_PATH = 100
#: Messages queued per side: 256 ranks' reports in flight to a slow viewer.
HWM = 20000


def relay_path(run_id: str, node: str = "") -> tuple[Path, bool]:
    """``<runtime dir>/relay-<run id>[-n<node>].sock``, or the same name in a fresh 0700
    temporary directory when that path is too long for a Unix socket; and whether it is in
    one. ``node``: the node id (``distributed.node_id``), so two nodes on one host differ."""
    path = connfile.runtime_dir() / f"relay-{run_id}{f'-n{node}' if node else ''}.sock"
    if len(str(path)) <= MAX_IPC_PATH:
        return path, False
    return Path(tempfile.mkdtemp(prefix="ntop-")) / path.name, True


class Relay(threading.Thread):
    """Forwards every local rank's telemetry to the viewers of one ``ipc://`` endpoint."""

    def __init__(self, run_id: str, own: str = "", host: str | None = None,
                 own_curve: str = "", node: str = "") -> None:
        """``own``: the hosting rank's telemetry endpoint (``own_curve``: its CURVE public
        key, if it binds with CURVE), connected at once; the other ranks are found as their
        connection files appear (those of this ``host`` and ``node`` id)."""
        super().__init__(name="neurotop-relay", daemon=True)
        self.run_id, self.host, self.node = run_id, host or socket.gethostname(), node
        self._path, self._own_dir = relay_path(run_id, node)
        self.endpoint = f"ipc://{self._path}"
        self._seen: set[Path] = set()  # connection files read already
        #: Each rank's telemetry endpoint connected to, with its CURVE key ("": none).
        self.upstream: dict[str, str] = {own: own_curve} if own else {}
        self._pending = dict(self.upstream)
        self._halt = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        super().start()
        self._ready.wait(10)
        if self._error:
            raise RuntimeError(f"neurotop relay could not start: {self._error}") \
                from self._error

    def stop(self, timeout: float = 3.0) -> None:
        self._halt.set()
        self.join(timeout)

    def discover(self) -> None:
        """Add the telemetry of this job's ranks on this host not connected yet."""
        for p in connfile.runtime_dir().glob(f"run-{self.run_id}*.json"):
            if p in self._seen:
                continue
            try:
                info = connfile.read(p)
            except FileNotFoundError:
                continue  # that rank just ended
            except (OSError, ValueError) as e:
                log.warning("neurotop relay: skipping %s", e)
                continue
            self._seen.add(p)
            if (info.run_id == self.run_id and info.host == self.host
                    and info.node == self.node and info.telemetry not in self.upstream):
                self.upstream[info.telemetry] = self._pending[info.telemetry] = \
                    info.curve_server_key

    def run(self) -> None:
        ctx = zmq.Context()
        try:
            xsub = ctx.socket(zmq.XSUB)
            xsub.setsockopt(zmq.RCVHWM, HWM)
            xsub.setsockopt(zmq.LINGER, 0)
            xpub = ctx.socket(zmq.XPUB)
            xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every viewer's subscription reaches ranks
            xpub.setsockopt(zmq.SNDHWM, HWM)
            xpub.setsockopt(zmq.LINGER, 0)
            xpub.bind(self.endpoint)
        except zmq.ZMQError as e:  # reported to the starting thread
            self._error = e
            self._ready.set()
            ctx.destroy(0)
            if self._own_dir:
                self._path.parent.rmdir()
            return
        self._ready.set()
        try:
            self._loop(xsub, xpub)
        finally:
            ctx.destroy(0)
            self._path.unlink(missing_ok=True)
            if self._own_dir:
                self._path.parent.rmdir()

    def _loop(self, xsub: zmq.Socket, xpub: zmq.Socket) -> None:
        # Always subscribed upstream, whoever watches: a viewer's leaving must not cut the
        # others off (a rank's XPUB holds one subscription per connection, not a count).
        xsub.send(b"\x01")
        poller = zmq.Poller()
        poller.register(xsub, zmq.POLLIN)
        poller.register(xpub, zmq.POLLIN)
        next_look = 0.0
        while not self._halt.is_set():
            now = time.monotonic()
            if now >= next_look:
                self.discover()
                next_look = now + DISCOVER_S
            for endpoint, curve in sorted(self._pending.items()):
                if curve:
                    make_client(xsub, curve)  # taken at connect: each rank's own key
                xsub.connect(endpoint)
            self._pending.clear()
            for sock, _ in poller.poll(timeout=100):
                if sock is xpub:
                    self._from_viewers(xpub, xsub)
                else:
                    self._from_ranks(xsub, xpub)

    def _from_viewers(self, xpub: zmq.Socket, xsub: zmq.Socket) -> None:
        for _ in range(1000):
            try:
                msg = xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":  # a new viewer: every rank resends its schema
                xsub.send(msg)

    def _from_ranks(self, xsub: zmq.Socket, xpub: zmq.Socket) -> None:
        for _ in range(1000):  # drain, but come back to the viewers and the halt flag
            try:
                frames = xsub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            # XPUB never blocks: a viewer whose queue is full loses messages, as it would
            # from a rank's own XPUB; the others go on receiving.
            xpub.send_multipart(frames, copy=False)

