"""Turn what the user typed after ``attach`` or ``ctl`` into endpoints."""

from __future__ import annotations

from pathlib import Path

from neurotop.protocol import connfile, runs
from neurotop.tui.data import remote
from neurotop.tui.data.client import Endpoints


class TargetError(LookupError):
    """The target names no reachable run; the message says what to do."""


def resolve(target: str | None, *, read_only: bool = False) -> Endpoints:
    """A run id (or prefix), a connection file, ``tcp://host:port`` (telemetry, watch only),
    ``ssh://[user@]host[:port][/RUN]`` (through an ssh tunnel, closed with the client), or
    nothing (the newest live run on this machine). ``read_only`` drops the key, and over
    ssh does not forward the control port at all. A job (its lowest rank's connection file
    lists relays): its node relay's telemetry and rank 0's control, over ssh too (the
    tunnel forwards a local port to the head node's relay socket)."""
    if target and target.startswith("tcp://"):
        return Endpoints(telemetry=target)
    if target and target.startswith("ssh://"):
        try:
            info, link = remote.connect(remote.SshTarget.parse(target), read_only=read_only)
        except remote.SshError as e:
            raise TargetError(str(e)) from None
        return Endpoints(telemetry=link.telemetry, control=link.control,
                         key=None if read_only else info.key_bytes or None,
                         run_id=info.run_id, curve_server_key=info.curve_server_key, link=link,
                         rank=info.rank if link.relay else None,
                         relays=len(info.relays) if link.relay else 0)  # the head node's only
    try:
        info = connfile.find(target)
    except LookupError as e:
        raise TargetError(ended(target) or str(e)) from None
    except (ValueError, OSError) as e:
        raise TargetError(str(e)) from None
    key = None if read_only else info.key_bytes or None
    if info.relays:  # a job: one connection to the node's relay, the store keeps this rank
        return Endpoints(telemetry=info.relays[0], control=info.job_control or info.control,
                         key=key, run_id=info.run_id, curve_server_key=info.curve_server_key,
                         rank=info.rank, more=reachable(info.relays[1:]),
                         relays=len(info.relays))
    return Endpoints(telemetry=info.telemetry, control=info.control, key=key,
                     run_id=info.run_id, curve_server_key=info.curve_server_key)


def reachable(relays: list[str]) -> list[str]:
    """The node relays a viewer on this host can subscribe to: ``ipc://`` sockets that exist
    here (two torchruns on one host, two "nodes"); the others are on other hosts (attach
    there, or over ``ssh://`` to each)."""
    return [e for e in relays if e.startswith("ipc://")
            and Path(e.removeprefix("ipc://")).is_socket()]


def ended(target: str | None) -> str:
    """For a target no live run matches: if it names a recorded run (no target: if there
    is a recording), that the run ended and the exact command that replays it; else ""."""
    try:
        if target:
            session = runs.find_session(target)
        else:
            recorded = runs.session_files()
            if not recorded:
                return ""
            session = max(recorded, key=lambda p: p.stat().st_mtime)
    except (LookupError, OSError, ValueError):  # no recording of it either: the error stands
        return ""
    run_id = session.parent.name
    try:  # the run id when it names this recording alone, else the file
        arg = run_id if runs.find_session(run_id) == session else str(session)
    except (LookupError, OSError, ValueError):
        arg = str(session)
    if target:
        return (f"run {run_id} has ended (it is not live): replay its recording with:"
                f" neurotop replay {arg}")
    return (f"no live neurotop run on this machine (looked in {connfile.runtime_dir()}); the"
            f" newest recording is of run {run_id}, which ended: neurotop replay {arg}")
