"""A monitor's reports read in the training process, on a real SUB socket, the way a viewer
reads them: each stats or params message with the schema it was made under."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import zmq

import neurotop
from neurotop.protocol import wire


@dataclass
class Stats:
    """One report: the schema it was made under, its ``[layers x stats]`` block and scalars."""

    schema: dict
    block: np.ndarray
    scalars: dict[str, float]

    def layer(self, name: str) -> dict[str, float]:
        row = self.block[self.schema["layers"].index(name)]
        return dict(zip(self.schema["stats"], row.tolist(), strict=True))


class Reports:
    """Subscribed before the first step (``__init__`` returns once the schema came through),
    so no report is missed."""

    def __init__(self, mon: neurotop.Monitor) -> None:
        self.sub = zmq.Context.instance().socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.subscribe(b"")
        self.sub.connect(mon.connection.telemetry)
        self.msgs: list[wire.Message] = []
        self._wait(lambda: any(m.kind == wire.SCHEMA for m in self.msgs), "the schema")

    def _wait(self, done, what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            if self.sub.poll(50):
                self.msgs.append(wire.decode(self.sub.recv_multipart()))

    def _schema(self, schema_id: int) -> dict:
        return [m.header for m in self.msgs
                if m.kind == wire.SCHEMA and m.header["schema_id"] == schema_id][-1]

    def _message(self, kind: str, step: int) -> wire.Message:
        def found() -> list[wire.Message]:
            return [m for m in self.msgs if m.kind == kind and m.header.get("step") == step]
        self._wait(lambda: bool(found()), f"{kind} message of step {step}")
        return found()[0]

    def stats(self, step: int) -> Stats:
        m = self._message(wire.STATS, step)
        schema = self._schema(m.header["schema_id"])
        block, scalars = m.arrays
        return Stats(schema, block, dict(zip(schema["scalars"], scalars.tolist(), strict=True)))

    def params(self, step: int) -> dict[str, dict[str, float]]:
        """Parameter rows of the report of ``step``, by parameter name."""
        m = self._message(wire.PARAMS, step)
        schema = self._schema(m.header["schema_id"])
        return {n: dict(zip(schema["param_stats"], row.tolist(), strict=True))
                for n, row in zip(schema["params"], m.arrays[0], strict=True)}

    def steps(self, settle: float = 1.0, last: int | None = None) -> list[int]:
        """The steps of every stats message received: once the stats of step ``last`` are in
        (the agent publishes reports in step order, so none before it can still be on its
        way), or else after reading for ``settle`` s more."""
        if last is not None:
            self._message(wire.STATS, last)
        deadline = time.monotonic() + (0 if last is not None else settle)
        while time.monotonic() < deadline:
            if self.sub.poll(50):
                self.msgs.append(wire.decode(self.sub.recv_multipart()))
        return [m.header["step"] for m in self.msgs if m.kind == wire.STATS]

    def events(self, event: str) -> list[dict]:
        return [m.header for m in self.msgs
                if m.kind == wire.EVENT and m.header.get("event") == event]

    def close(self) -> None:
        self.sub.close()
