"""Connection files: how the UI finds live runs on this machine.

Like a Jupyter kernel's: one JSON file per live run in a per-user runtime
directory (0700), each file 0600 because it holds the run's control key.
Imports neither torch nor textual.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


def new_run_id() -> str:
    """Sortable and unique enough: start time plus 16 random bits."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(2).hex()


def runtime_dir() -> Path:
    """``$NEUROTOP_RUNTIME_DIR`` or ``~/.local/share/neurotop/runtime`` (a fixed path, so
    an SSH client can find it on a remote host)."""
    env = os.environ.get("NEUROTOP_RUNTIME_DIR")
    d = Path(env) if env else Path.home() / ".local" / "share" / "neurotop" / "runtime"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        missing = {"run_id", "pid", "telemetry", "control"} - d.keys()
        if missing:
            raise ValueError(f"connection file lacks {', '.join(sorted(missing))}")
        known = cls.__dataclass_fields__
        fields = {"name": "", "key": "", "start_time": 0.0}
        fields.update({k: v for k, v in d.items() if k in known})
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


def read(path: str | os.PathLike) -> ConnectionInfo:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no connection file {p}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not a neurotop connection file: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p} is not a neurotop connection file")
    return ConnectionInfo.from_dict(d)


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
        except (OSError, ValueError):
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
    ends the error messages (which machine, which directory)."""
    if not target:
        if not runs:
            raise LookupError(f"no live neurotop run {where}")
        return runs[0]
    hits = [r for r in runs if r.run_id == target] or [
        r for r in runs if r.run_id.startswith(target) or r.run_id.endswith(target)]
    if not hits:
        known = ", ".join(r.run_id for r in runs) or "none"
        raise LookupError(f"no live run matches {target!r} {where} (live runs: {known})")
    if len({h.run_id for h in hits}) > 1:
        raise LookupError(f"{target!r} matches several runs: "
                          + ", ".join(sorted({h.run_id for h in hits})))
    return min(hits, key=lambda h: h.rank)
