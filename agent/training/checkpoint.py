"""``snapshot``: save the model's and optimizer's state at a step boundary.

At the boundary the training thread copies both ``state_dict()``s to host memory
(device work, and the only way to get a consistent state without holding the
loop); a short-lived writer thread then ``torch.save``s that copy, so the disk
write never runs in the training thread. The file holds plain state dicts, the
user's own data, loadable with ``torch.load(path, weights_only=True)``. A user
callback (``watch(snapshot=fn)``) replaces all this: it is called in the
training thread at the boundary as ``fn(step)`` and its return value (e.g. a
path) goes into the ack.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Snapshotter:
    """Implements ``neurotop.service.controller.Snapshotter`` for one model and optimizer."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, run_id: str,
                 target: str | os.PathLike | Callable[[int], Any] | None,
                 default_dir: Callable[[], str | os.PathLike]) -> None:
        self.model, self.optimizer, self.run_id = model, optimizer, run_id
        self.callback = target if callable(target) else None
        self.directory = (lambda: target) if isinstance(target, (str, os.PathLike)) \
            else default_dir

    def __call__(self, step: int, done: Callable[[dict[str, Any]], None]) -> None:
        if self.callback is not None:
            try:
                result = self.callback(step)
            except Exception as e:  # the user's code: report it, keep training
                done({"error": f"snapshot callback failed: {e!r}"})
                return
            done({"new": None if result is None else str(result)})
            return
        state = {"step": step, "run_id": self.run_id,
                 "model": _host_copy(self.model.state_dict()),
                 "optimizer": _host_copy(self.optimizer.state_dict())}
        path = Path(self.directory()) / f"{self.run_id}-step{step:08d}.pt"
        threading.Thread(target=_write, args=(state, path, done), name="neurotop-snapshot",
                         daemon=True).start()


def _write(state: dict[str, Any], path: Path, done: Callable[[dict[str, Any]], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, path)
    except Exception as e:
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
