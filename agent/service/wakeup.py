"""The agent thread's doorbell: other threads ring it when they hand something over.

The agent thread sleeps in ``zmq.Poller.poll`` until there is work (or a heartbeat is due)
instead of waking 100 times a second: on a machine whose cores all train, that is CPU
taken from training. A socket pair, not a pipe: once closed, a late ring fails instead of
landing in whatever file reused the descriptor. Imports no torch.
"""

from __future__ import annotations

import socket


class Wakeup:
    """Rung from any thread (``ring``); the agent thread polls ``reader`` and ``drain``s."""

    def __init__(self) -> None:
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)
        #: The poller names non-ZeroMQ sockets by their file descriptor.
        self.fileno = self.reader.fileno()

    def ring(self) -> None:
        try:
            self._writer.send(b"\0")
        except OSError:  # full (the agent thread has plenty to wake it) or closed (ended)
            pass

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.reader.close()
        self._writer.close()
