"""``snapshot``: save the model's and optimizer's state at a step boundary.

At the boundary the training thread copies both ``state_dict()``s to host memory
(device work, and the only way to get a consistent state without holding the
loop); a short-lived writer thread then ``torch.save``s that copy, so the disk
write never runs in the training thread, and the end of the run (``Monitor.close``)
waits for it. The file holds plain state dicts, the user's own data, loadable with
``torch.load(path, weights_only=True)``. A user callback (``watch(snapshot=fn)``)
replaces all this: it is called in the training thread at the boundary as ``fn(step)``
and its return value (e.g. a path) goes into the ack.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("neurotop.agent")


class Checkpointer:
    """Implements ``neurotop.service.controller.TakeSnapshot`` for one model and optimizer.

    Owns its writer threads: ``close`` waits for them, so a snapshot still being written
    when the run ends is finished, not lost.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, run_id: str,
                 target: str | os.PathLike | Callable[[int], Any] | None,
                 default_dir: str | os.PathLike, *, private: bool = True) -> None:
        self.model, self.optimizer, self.run_id = model, optimizer, run_id
        self.private = private
        self.callback = target if callable(target) else None
        self.directory = Path(target if isinstance(target, (str, os.PathLike)) else default_dir)
        self._writers: list[threading.Thread] = []

    def __call__(self, step: int, done: Callable[[dict[str, Any]], None]) -> None:
        if self.callback is not None:
            try:
                result = self.callback(step)
            except Exception as e:  # the user's code may raise anything: log, report, train on
                log.exception("the snapshot callback failed at step %d", step)
                done({"error": f"snapshot callback failed: {e!r}"})
                return
            done({"new": None if result is None else str(result)})
            return
        state = {"step": step, "run_id": self.run_id,
                 "model": _host_copy(self.model.state_dict()),
                 "optimizer": _host_copy(self.optimizer.state_dict())}
        path = self.directory / f"{self.run_id}-step{step:08d}.pt"
        writer = threading.Thread(target=_write, args=(state, path, done, self.private),
                                  name="neurotop-snapshot", daemon=True)
        self._writers = [w for w in self._writers if w.is_alive()]
        self._writers.append(writer)
        writer.start()

    def close(self) -> None:
        """Wait until every snapshot being written is on disk (and acknowledged)."""
        for w in self._writers:
            w.join()
        self._writers = []


def _write(state: dict[str, Any], path: Path, done: Callable[[dict[str, Any]], None],
           private: bool) -> None:
    """The writer thread: save, then acknowledge (always: control is never lost silently).
    ``private``: the file is created 0600 and a directory made for it 0700 (the state is
    the user's model); otherwise the umask decides. An existing directory is left as is."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
        tmp.unlink(missing_ok=True)  # a crashed write's leftover keeps its mode
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except Exception as e:  # broad: torch.save raises many types, and the ack must go out
        if not isinstance(e, OSError):  # the disk's errors say it all; the rest may be bugs
            log.exception("could not write the snapshot %s", path)
        tmp.unlink(missing_ok=True)
        done({"error": f"could not write {path}: {e}"})
        return
    done({"new": str(path.absolute())})


def _host_copy(obj: Any) -> Any:
    """A deep copy with every tensor on the host, detached from the live training state."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return obj
