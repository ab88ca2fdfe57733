"""A run's telemetry read the way a viewer reads it: a ZeroMQ subscriber on its endpoint."""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq

from neurotop.protocol import wire


class Subscriber:
    """A SUB socket on ``endpoint``. ``ready()`` returns once a message came through: the
    subscription is live, so nothing published from then on is missed (on loopback)."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.subscribe(b"")
        self.sock.connect(endpoint)
        self.msgs: list[wire.Message] = []

    def ready(self, timeout: float = 30) -> Subscriber:
        self.collect(timeout, until=lambda m: True)
        assert self.msgs, f"nothing published within {timeout} s"
        return self

    def collect(self, seconds: float, until_step: int | None = None,
                until: Callable[[wire.Message], bool] | None = None) -> list[wire.Message]:
        """Messages received within ``seconds`` (all so far are kept in ``msgs``), stopping
        early at a stats message of ``until_step`` or at the first message ``until`` accepts."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                m = wire.decode(self.sock.recv_multipart())
                self.msgs.append(m)
                if until_step and m.kind == wire.STATS and m.header["step"] >= until_step:
                    break
                if until is not None and until(m):
                    break
        return self.msgs

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect(endpoint: str, seconds: float, until_step: int | None = None,
            until: Callable[[wire.Message], bool] | None = None) -> list[wire.Message]:
    """What a fresh subscriber receives (see ``Subscriber.collect``)."""
    with Subscriber(endpoint) as sub:
        return sub.collect(seconds, until_step, until)


def next_heartbeat(endpoint: str) -> dict:
    """The header of the next heartbeat (a fresh subscriber; waits up to 10 s)."""
    for m in collect(endpoint, 10.0, until=lambda m: m.kind == wire.HEARTBEAT):
        if m.kind == wire.HEARTBEAT:
            return m.header
    raise AssertionError("no heartbeat within 10 s")
