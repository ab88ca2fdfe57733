"""Turn what the user typed after ``attach`` or ``ctl`` into endpoints."""

from __future__ import annotations

from agent import connfile
from tui.client import Endpoints


class TargetError(LookupError):
    """The target names no reachable run; the message says what to do."""


def resolve(target: str | None, *, read_only: bool = False) -> Endpoints:
    """A run id (or prefix), a connection file, ``tcp://host:port`` (telemetry, watch only),
    or nothing (the newest live run on this machine)."""
    if target and target.startswith("tcp://"):
        return Endpoints(telemetry=target)
    try:
        info = connfile.find(target)
    except (LookupError, ValueError, OSError) as e:
        raise TargetError(str(e)) from None
    key = None if read_only else info.key_bytes or None
    return Endpoints(telemetry=info.telemetry, control=info.control, key=key,
                     run_id=info.run_id)
