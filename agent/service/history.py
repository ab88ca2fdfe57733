"""The history server: answers ``history`` requests with pieces of the session file, so a
viewer that attaches late gets everything the run published before it came.

The viewer subscribes to telemetry first and asks second; the first piece it asks for
(``offset`` 0) waits until the recorder has written everything published so far, so the
file and the live stream overlap and nothing falls between them. Runs on the agent
thread; imports no torch.
"""

from __future__ import annotations

import os
from typing import Any

from neurotop.service.recorder import Recorder

#: Largest piece of the session file one ``history`` reply carries (replies must stay
#: under the wire's header limit).
HISTORY_CHUNK = 512 << 10


class HistoryServer:
    """Reads the run's session file for ``history`` requests; the recorder writes it."""

    def __init__(self, recorder: Recorder | None) -> None:
        self.recorder = recorder

    def answer(self, args: dict[str, Any]) -> dict[str, Any]:
        """A piece of the session file from ``offset``. The first request waits (up to
        2 s) until everything published is in the file, and its ``size`` covers all of it:
        the viewer subscribed before asking."""
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
