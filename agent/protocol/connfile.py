"""Connection files: how the UI finds live runs on this machine.

Like a Jupyter kernel's: one JSON file per live run in a per-user runtime
directory (0700), each file 0600 because it holds the run's control key.
Imports neither torch nor textual.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("neurotop.connfile")

#: A connection file is a few hundred bytes; anything bigger is not one (and is not read).
MAX_SIZE = 64 << 10
#: The largest pid ``os.kill`` takes (a C int); Linux's own limit is 2**22.
MAX_PID = 2**31 - 1


def new_run_id() -> str:
    """Sortable and unique enough: start time plus 16 random bits."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(2).hex()


def runtime_dir() -> Path:
    """``$NEUROTOP_RUNTIME_DIR`` or ``~/.local/share/neurotop/runtime`` (a fixed path, so
    an SSH client can find it on a remote host). It must be a directory of this user's:
    another user's could read the keys written there, or plant runs (``PermissionError``,
    whose message says what to do)."""
    env = os.environ.get("NEUROTOP_RUNTIME_DIR")
    d = Path(env) if env else Path.home() / ".local" / "share" / "neurotop" / "runtime"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = d.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"the runtime directory {d} is not a directory")
    if st.st_uid != os.getuid():
        raise PermissionError(f"the runtime directory {d} belongs to uid {st.st_uid}, not to"
                              f" you (uid {os.getuid()}); set NEUROTOP_RUNTIME_DIR to a"
                              " directory of yours")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(d, 0o700)
    return d


@dataclass
class ConnectionInfo:
    """Everything a client needs to reach a run. ``key`` is hex; never print it."""

    run_id: str
    name: str
    pid: int
    start_time: float
    telemetry: str
    control: str
    key: str
    host: str = field(default_factory=socket.gethostname)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: In a job: rank 0's control endpoint, the one that takes the job's commands (this
    #: file's own ``control`` answers read-only requests only); empty: ``control`` does.
    job_control: str = ""
    #: In a job: the node relays' telemetry endpoints (``neurotop.service.relay``), in the
    #: file of each node's local rank 0, that node's first, then the other nodes' (gathered
    #: at ``watch()``, in rank order). A viewer of the job subscribes
    #: to these, not to each rank's ``telemetry``.
    relays: list[str] = field(default_factory=list)
    #: In a job: the node id (``$NEUROTOP_NODE_ID`` or torchrun's ``GROUP_RANK``) that with
    #: ``host`` names the node this rank runs on, and so the relay that forwards it.
    node: str = ""
    protocol: int = 1
    signature_scheme: str = "hmac-sha256"
    run_dir: str = ""
    curve_server_key: str = ""

    @property
    def key_bytes(self) -> bytes:
        return bytes.fromhex(self.key) if self.key else b""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> ConnectionInfo:
        """Validated field by field: ``ValueError`` naming the first bad one. Unknown
        fields (a newer agent's) are ignored."""
        missing = {"run_id", "pid", "telemetry", "control"} - d.keys()
        if missing:
            raise ValueError(f"connection file lacks {', '.join(sorted(missing))}")
        fields: dict[str, Any] = {"name": "", "key": "", "start_time": 0.0}
        fields.update({k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        for name, value in fields.items():
            why = _why(name, value)
            if why:
                raise ValueError(why)
        return cls(**fields)


def conn_path(run_id: str, rank: int = 0) -> Path:
    suffix = f"-r{rank}" if rank else ""
    return runtime_dir() / f"run-{run_id}{suffix}.json"


def write(info: ConnectionInfo) -> Path:
    """Write atomically with mode 0600, so no reader ever sees half a file or the key."""
    path = conn_path(info.run_id, info.rank)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(info.to_json())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _text(v: Any) -> bool:
    return isinstance(v, str)


def _int_in(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _time(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _texts(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= 1 << 16 and all(isinstance(x, str) for x in v)


def _hex(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"(?:[0-9a-fA-F]{2})*", v) is not None


#: Each field's check and what it wants; other fields must be strings.
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    # 0 and -1 would name a process group, or every process: never "alive"
    "pid": (_int_in(1, MAX_PID), f"an integer from 1 to {MAX_PID}"),
    "start_time": (_time, "a finite number (seconds since the epoch)"),
    "key": (_hex, "hex digits"),
    "rank": (_int_in(0, 1 << 20), "an integer >= 0"),
    "world_size": (_int_in(1, 1 << 20), "an integer >= 1"),
    "local_rank": (_int_in(0, 1 << 20), "an integer >= 0"),
    "protocol": (_int_in(0, 1 << 20), "an integer >= 0"),
    "relays": (_texts, "a list of strings"),
}


def _why(name: str, value: Any) -> str | None:
    """What is wrong with field ``name``'s ``value``; None if nothing. Never shows a key."""
    check, wanted = _CHECKS.get(name, (_text, "a string"))
    if check(value):
        return None
    shown = "" if name == "key" else f", got {repr(value)[:40]}"
    return f"connection file field {name!r} must be {wanted}{shown}"


def read_regular(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, refused (``ValueError``) if it is anything
    else or holds more than ``limit`` bytes: a FIFO, a device or ``/dev/zero`` would hang or
    exhaust the reader. Opened non-blocking, so even a FIFO's ``open`` returns at once."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} {p}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{p} is not a {what}: not a regular file")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{p} is not a {what}: larger than {limit} bytes")
    return data


def read(path: str | os.PathLike) -> ConnectionInfo:
    """A connection file, checked (``ValueError`` or ``OSError``, naming the file)."""
    p = Path(path)
    data = read_regular(p, MAX_SIZE, "connection file")
    try:
        d = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p} is not a neurotop connection file: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p} is not a neurotop connection file")
    try:
        return ConnectionInfo.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_runs(clean: bool = True) -> list[ConnectionInfo]:
    """Live runs on this machine, newest first. Files of dead pids are removed."""
    runs = []
    for p in runtime_dir().glob("run-*.json"):
        try:
            info = read(p)
        except FileNotFoundError:
            continue  # its run just ended
        except (OSError, ValueError) as e:  # one bad file must not hide the other runs
            log.warning("neurotop: skipping %s", e)
            continue
        if pid_alive(info.pid):
            runs.append(info)
        elif clean:
            p.unlink(missing_ok=True)
    runs.sort(key=lambda i: i.start_time, reverse=True)
    return runs


def find(target: str | None) -> ConnectionInfo:
    """Resolve a run id (or a unique prefix, or its random suffix), a connection file,
    or ``None`` (the newest live run)."""
    if target and (target.endswith(".json") or os.sep in target) and Path(target).exists():
        return read(target)
    runs = live_runs()
    return pick(runs, target, f"on this machine (looked in {runtime_dir()})")


def pick(runs: list[ConnectionInfo], target: str | None, where: str) -> ConnectionInfo:
    """The run ``target`` names among ``runs`` (newest first; ``None``: the newest); ``where``
    ends the error messages (which machine, which directory). A job's lowest rank here (rank
    0 on its head node): the one whose file names the job's control and relay."""
    if not target:
        if not runs:
            raise LookupError(f"no live neurotop run {where}")
        return min((r for r in runs if r.run_id == runs[0].run_id), key=lambda r: r.rank)
    hits = [r for r in runs if r.run_id == target] or [
        r for r in runs if r.run_id.startswith(target) or r.run_id.endswith(target)]
    if not hits:
        known = ", ".join(r.run_id for r in runs) or "none"
        raise LookupError(f"no live run matches {target!r} {where} (live runs: {known})")
    if len({h.run_id for h in hits}) > 1:
        raise LookupError(f"{target!r} matches several runs: "
                          + ", ".join(sorted({h.run_id for h in hits})))
    return min(hits, key=lambda h: h.rank)
