"""What a run recorded: its alert events and the steps of its reports, read back from the
session file once the monitor is closed (every report's alerts are in by then)."""

from __future__ import annotations

from pathlib import Path

from neurotop.protocol import wire
from neurotop.protocol.sessionfile import MESSAGE, SessionReader, split_frames


def recorded(runs: Path) -> tuple[list[dict], list[int]]:
    """The alert events and the stats messages' steps of the one session under ``runs``."""
    [session] = runs.glob("*/session.ntop")
    with SessionReader(session) as r:
        msgs = [wire.decode(split_frames(rec.body)) for rec in r.records()
                if rec.type == MESSAGE]
    alerts = [m.header for m in msgs
              if m.kind == wire.EVENT and m.header.get("event") == "alert"]
    return alerts, [m.header["step"] for m in msgs if m.kind == wire.STATS]
