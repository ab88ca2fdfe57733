"""The recorder: writes every published message to the run's session file, on its own thread.

The agent thread hands each message's encoded frames to ``record``, which never blocks:
when the queue is full (the disk is slower than the run) the message is dropped and
counted, and the count is written into the file and sent in heartbeats. The training
thread never touches any of this. Records reach the OS at least every ``flush_s``
seconds (from then on they survive a ``kill -9``) and the disk every ``fsync_s``.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any

from neurotop.protocol import runs, wire
from neurotop.protocol.sessionfile import NOTE, SessionWriter

log = logging.getLogger("neurotop.recorder")

_IDLE = object()
#: Beside the session file: every alert the run raises, one JSON object per line.
ALERT_LOG = "alerts.jsonl"


class Recorder(threading.Thread):
    """Owns one ``SessionWriter``; fed by the agent thread through a bounded queue.
    Its owner (the ``Monitor``) starts it, and closes (joins) it once the agent thread,
    which feeds it, has stopped."""

    def __init__(self, path: Path, meta: dict[str, Any], *, flush_s: float = 0.25,
                 fsync_s: float = 5.0, max_queued: int = 4096,
                 max_queued_bytes: int = 64 << 20, index_every: int = 1024) -> None:
        super().__init__(name="neurotop-recorder", daemon=True)
        self.path = path
        self.flush_s, self.fsync_s = flush_s, fsync_s
        self.max_queued, self.max_queued_bytes = max_queued, max_queued_bytes
        self._writer = SessionWriter(path, meta, index_every=index_every)
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._queued = self._queued_bytes = 0
        self.dropped = 0
        self.error = ""
        self.flushed_size = self._writer.flushed  # a record boundary; readers may read up to it
        self.alerts: AlertLog | None = None  # set by ``open_recording``

    # -- the agent thread ---------------------------------------------------------------

    def record(self, kind: str, step: int | None, t: float, frames: list[bytes]) -> None:
        """Queue one message; never blocks. Dropped (and counted) when the queue is full."""
        n = sum(map(len, frames))
        with self._lock:
            if (self.error or self._queued >= self.max_queued
                    or self._queued_bytes + n > self.max_queued_bytes):
                self.dropped += 1
                return
            self._queued += 1
            self._queued_bytes += n
        self._q.put((kind, -1 if step is None else int(step), t, frames, n))

    def sync(self, timeout: float = 2.0) -> bool:
        """Wait until everything queued so far is in the file (flushed to the OS)."""
        done = threading.Event()
        self._q.put(done)
        return done.wait(timeout) if self.is_alive() else False

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then the index and the END record; fsync."""
        self._q.put(None)
        if self.is_alive():
            self.join(timeout)
        if self.alerts is not None:
            self.alerts.close()

    # -- the recorder thread ------------------------------------------------------------

    def run(self) -> None:
        w = self._writer
        last_flush = last_sync = time.monotonic()
        noted = 0
        dirty = unsynced = False
        try:
            while True:
                try:
                    item = self._q.get(timeout=self.flush_s)
                except queue.Empty:
                    item = _IDLE
                if item is None:
                    break
                if isinstance(item, threading.Event):
                    w.flush()
                    self.flushed_size, dirty = w.flushed, False
                    item.set()
                    continue
                if item is not _IDLE:
                    kind, step, t, frames, n = item
                    with self._lock:
                        self._queued -= 1
                        self._queued_bytes -= n
                    w.write_message(frames, kind=kind, step=step, t=t)
                    dirty = unsynced = True
                if self.dropped != noted:
                    noted = self.dropped
                    w.write_note(NOTE, {"dropped": noted}, time.time())
                now = time.monotonic()
                if dirty and (self._q.empty() or now - last_flush >= self.flush_s):
                    w.flush()
                    self.flushed_size, dirty, last_flush = w.flushed, False, now
                if unsynced and now - last_sync >= self.fsync_s:
                    w.sync()
                    unsynced, last_sync = False, now
        except OSError as e:
            self.error = f"recording stopped: {e}"
            log.warning("neurotop: %s (%s)", self.error, self.path)
        finally:
            self._finish()

    def _finish(self) -> None:
        while True:  # release anyone waiting in sync(); what is left is counted as dropped
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, threading.Event):
                item.set()
            elif item is not None:
                self.dropped += 1
        try:
            self._writer.close({"dropped": self.dropped, "error": self.error}, time.time())
            self.flushed_size = self._writer.flushed
        except OSError as e:
            log.warning("neurotop: could not finish the session file %s: %s", self.path, e)


class AlertLog:
    """``alerts.jsonl`` beside the session file (``alerts-r<r>.jsonl`` for rank r > 0): one
    JSON object per alert, flushed per line, so that ``tail -f | jq`` and schedulers see
    each alert as it fires. Written from the agent thread: alerts are rare (one per
    incident). Strict JSON: a non-finite number is written as null."""

    def __init__(self, path: Path, *, private: bool) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600 if private else 0o666)
        if private:  # a file left by an earlier run with this id keeps its mode otherwise
            os.fchmod(fd, 0o600)
        self.path = path
        self._f = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, alert: dict[str, Any]) -> None:
        if self._f.closed:
            return
        try:
            self._f.write(json.dumps(_finite(alert), allow_nan=False, default=str) + "\n")
            self._f.flush()
        except OSError as e:
            log.warning("neurotop: no more alerts in %s: %s", self.path, e)
            self.close()

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as e:
            log.warning("neurotop: could not close %s: %s", self.path, e)


def _finite(v: Any) -> Any:
    """``v`` with non-finite floats (a NaN alert value) as None: JSON has no NaN."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):
        v = float(v)
        return v if math.isfinite(v) else None
    return v


def open_recording(record: bool | str | os.PathLike | None, run_id: str, name: str,
                   start_time: float, *, private: bool = True,
                   job: dict[str, Any] | None = None) -> Recorder | None:
    """A recorder for ``<root>/<run_id>/session.ntop``, its file created, its thread not yet
    started: its owner (the ``Monitor``) starts it and ``close``s (joins) it.

    ``record``: ``True`` (the default root, see ``neurotop.protocol.runs``), a directory to use as
    the root, or ``False``/``None`` (do not record). A directory the caller named must be
    writable (a clear error otherwise); when the default one is not, the run goes on
    unrecorded with a warning. ``private``: the run directory is 0700 and the session
    file 0600 (a recording tells what the run trains on), as the connection files are;
    otherwise the umask decides. ``job``: this process is one rank of a job (``rank``,
    ``world_size``, ...): every rank records into the job's run directory, rank r > 0 to
    ``session-r<r>.ntop``, and only rank 0's file is registered (one job, one entry).
    Beside the session file, the alert log (``AlertLog``), private likewise.
    """
    if record is None or record is False:
        return None
    root = runs.runs_root() if record is True else Path(record)
    meta = {"run_id": run_id, "name": name, "start_time": start_time,
            "host": socket.gethostname(), "pid": os.getpid(),
            "protocol": wire.PROTOCOL_VERSION, **(job or {})}
    rank = (job or {}).get("rank", 0)
    try:
        run_dir = root / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        if private:  # before the file exists: nobody else can open it while it is 0644
            os.chmod(run_dir, 0o700)
        file = runs.SESSION_FILE.replace(".ntop", f"-r{rank}.ntop") if rank else runs.SESSION_FILE
        rec = Recorder(run_dir / file, meta)
        if private:
            os.chmod(rec.path, 0o600)
        rec.alerts = AlertLog(run_dir / (ALERT_LOG.replace(".jsonl", f"-r{rank}.jsonl")
                                         if rank else ALERT_LOG), private=private)
    except OSError as e:
        if record is not True:
            raise OSError(f"neurotop cannot record to {root}: {e}") from None
        log.warning("neurotop: not recording this run (cannot write %s: %s)", root, e)
        return None
    if rank:
        return rec
    try:
        runs.register(run_id, rec.path, name=name, start_time=start_time)
    except OSError as e:
        log.warning("neurotop: recording, but `neurotop ls` will not list it: %s", e)
    return rec
