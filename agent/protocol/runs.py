"""Where recorded sessions live, and the per-user list that lets ``neurotop ls`` find them.

A run records to ``<runs root>/<run id>/session.ntop``; the root is ``$NEUROTOP_RUNS_DIR``
or ``./neurotop_runs``. Because that is relative to wherever training started, each
recording also leaves a one-line pointer in the per-user sessions directory (beside the
runtime directory of connection files). Imports neither torch nor textual.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from neurotop.protocol import connfile

log = logging.getLogger("neurotop.runs")

SESSION_FILE = "session.ntop"


def runs_root() -> Path:
    env = os.environ.get("NEUROTOP_RUNS_DIR")
    return Path(env) if env else Path.cwd() / "neurotop_runs"


def sessions_dir() -> Path:
    """``$NEUROTOP_SESSIONS_DIR`` or ``sessions/`` beside the runtime directory."""
    env = os.environ.get("NEUROTOP_SESSIONS_DIR")
    d = Path(env) if env else connfile.runtime_dir().parent / "sessions"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def register(run_id: str, path: Path, **info: Any) -> None:
    """Note a session file in the per-user list (written atomically)."""
    d = sessions_dir()
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"run_id": run_id, "path": str(path.resolve()), **info}, f)
        os.replace(tmp, d / f"{run_id}.json")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def session_files() -> list[Path]:
    """Every session file known on this machine: registered ones that still exist, and
    any under the runs root. Pointers to deleted files are removed."""
    found: dict[Path, None] = {}
    for p in sorted(sessions_dir().glob("*.json")):
        try:
            data = connfile.read_regular(p, 1 << 16, "session pointer")
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:  # skip it (the message names it); list the rest
            log.warning("neurotop: skipping %s", e)
            continue
        try:
            target = Path(json.loads(data)["path"])
        except (ValueError, KeyError, TypeError) as e:
            log.warning("neurotop: skipping %s: not a session pointer (%r)", p, e)
            continue
        if target.is_file():
            found[target.resolve()] = None
        else:
            p.unlink(missing_ok=True)
    root = runs_root()
    if root.is_dir():
        for f in sorted(root.glob(f"*/{SESSION_FILE}")):
            if f.is_file():
                found[f.resolve()] = None
    return list(found)


def find_session(target: str) -> Path:
    """A session file, a run directory holding one, or a recorded run's id (or a unique
    prefix or suffix of it)."""
    p = Path(target)
    if p.is_dir() and (p / SESSION_FILE).is_file():
        return p / SESSION_FILE
    if p.exists() or os.sep in target or target.endswith(".ntop"):
        return _regular(p)
    hits = [f for f in session_files()
            if f.parent.name == target or f.parent.name.startswith(target)
            or f.parent.name.endswith(target)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise LookupError(f"no session file or recorded run matches {target!r}"
                          " (see: neurotop ls)")
    raise LookupError(f"{target!r} matches several recorded runs: "
                      + ", ".join(h.parent.name for h in hits))


def rank_sessions(session: Path) -> dict[int, Path]:
    """The session files of every rank recorded beside ``session`` in one run directory
    (a job's: rank 0's ``session.ntop``, rank r's ``session-r<r>.ntop``), by rank; a run
    of one process: ``{0: session}``."""
    found = {0: session}
    if session.name != SESSION_FILE:
        return found
    for p in session.parent.glob("session-r*.ntop"):
        digits = p.name[len("session-r"):-len(".ntop")]
        if digits.isdigit() and int(digits) > 0 and p.is_file():
            found[int(digits)] = p
    return dict(sorted(found.items()))


def _regular(p: Path) -> Path:
    """``p`` if it is a regular file: opening a FIFO would block, reading a device (such as
    ``/dev/zero``) would never end. ``OSError`` or ``ValueError`` otherwise."""
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"no session file {p}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{p} is a directory without a session file ({SESSION_FILE})")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{p} is not a session file: not a regular file")
    return p
