"""Turn what the user typed after ``attach`` or ``ctl`` into endpoints."""

from __future__ import annotations

from neurotop.protocol import connfile
from neurotop.tui.data import remote
from neurotop.tui.data.client import Endpoints


class TargetError(LookupError):
    """The target names no reachable run; the message says what to do."""


def resolve(target: str | None, *, read_only: bool = False) -> Endpoints:
    """A run id (or prefix), a connection file, ``tcp://host:port`` (telemetry, watch only),
    ``ssh://[user@]host[:port][/RUN]`` (through an ssh tunnel, closed with the client), or
    nothing (the newest live run on this machine). ``read_only`` drops the key, and over
    ssh does not forward the control port at all."""
    if target and target.startswith("tcp://"):
        return Endpoints(telemetry=target)
    if target and target.startswith("ssh://"):
        try:
            info, link = remote.connect(remote.SshTarget.parse(target), read_only=read_only)
        except remote.SshError as e:
            raise TargetError(str(e)) from None
        return Endpoints(telemetry=link.telemetry, control=link.control,
                         key=None if read_only else info.key_bytes or None,
                         run_id=info.run_id, curve_server_key=info.curve_server_key, link=link)
    try:
        info = connfile.find(target)
    except (LookupError, ValueError, OSError) as e:
        raise TargetError(str(e)) from None
    key = None if read_only else info.key_bytes or None
    return Endpoints(telemetry=info.telemetry, control=info.control, key=key,
                     run_id=info.run_id, curve_server_key=info.curve_server_key)
