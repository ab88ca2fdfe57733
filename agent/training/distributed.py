"""One job for N ranks: the training-thread side of ``torch.distributed``.

Under an initialized process group (more than one rank) every rank's ``watch()`` joins one
job: it creates neurotop's own gloo group (``dist.new_group(backend="gloo")``: CPU tensors
over TCP, so nothing here touches the user's NCCL streams or their process group's
collectives), and rank 0's run id, control key and control endpoint reach every rank
(``agree``: JSON bytes broadcast as a uint8 tensor; no pickle, unlike
``broadcast_object_list``). At a control check (every ``Config.control_every`` step
boundaries, and in a loop while paused) every rank joins ``exchange``: ONE all-reduce
(SUM) of a small int32 buffer in which rank 0 writes the commands it decided (and its
step) and every rank writes its own auto-pause flag. Other ranks write zeros where rank 0
writes, so the sum is rank 0's bytes exactly; the per-rank slots say who flagged.

Every call here is a collective: all ranks make the same calls in the same order (the
``Controller`` sees to that: checks fall on the same boundary count on every rank, and
every decision it acts on travelled in one of them). A rank that died makes the others'
collective fail at once (gloo sees the connection close); one that hangs, after
``GROUP_TIMEOUT_S`` (or ``$NEUROTOP_JOB_TIMEOUT_S``). Either way ``JobLost`` says which
rank lost the job, and gloo's reason.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from neurotop.service.controller import JobLost

log = logging.getLogger("neurotop.agent")

#: How long a rank waits in neurotop's collective for the others before it gives up
#: (``$NEUROTOP_JOB_TIMEOUT_S`` overrides it): the default timeout of NCCL collectives, so a
#: rank held up by a peer's long evaluation or checkpoint waits here no less than it would
#: in the user's own all-reduce.
GROUP_TIMEOUT_S = 600.0
#: The bytes of decided commands one check carries (more wait for the next one); the
#: largest valid command (a ``set`` with a 256-character knob name and its id) fits.
PAYLOAD_BYTES = 512
_HEAD = 2  # the buffer's first slots: payload length, rank 0's step


def in_job() -> bool:
    """Whether this process is one rank of an initialized process group of several."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Job:
    """This rank's membership of the job: its identity and the gloo group of neurotop's own.

    Made by every rank at ``watch()`` time (creating the group is itself collective)."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # torchrun sets LOCAL_RANK; a launcher that does not: one rank per node assumed
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.host = socket.gethostname()
        self.timeout_s = timeout_s if timeout_s is not None else _env_timeout()
        self.capacity = PAYLOAD_BYTES
        self.group = dist.new_group(backend="gloo",
                                    timeout=datetime.timedelta(seconds=self.timeout_s))
        self._buf = torch.zeros(_HEAD + self.world_size + PAYLOAD_BYTES // 4, dtype=torch.int32)
        self._np = self._buf.numpy()  # the same memory: reading it is no tensor op

    def identity(self) -> dict[str, Any]:
        """What every message of this rank carries besides its ``rank``."""
        return {"world_size": self.world_size, "local_rank": self.local_rank,
                "host": self.host}

    def agree(self, fields: dict[str, str]) -> dict[str, str]:
        """Rank 0's ``fields`` on every rank (the others' are ignored): its JSON's length,
        then its bytes, broadcast on the gloo group."""
        data = json.dumps(fields).encode() if self.rank == 0 else b""
        n = torch.tensor([len(data)], dtype=torch.int64)
        self._collective(dist.broadcast, n, 0)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0
               else torch.empty(int(n[0]), dtype=torch.uint8))
        self._collective(dist.broadcast, buf, 0)
        return json.loads(buf.numpy().tobytes())

    def exchange(self, step: int, payload: bytes, flag: bool) -> tuple[bytes, list[int], int]:
        """One all-reduce: rank 0's ``payload`` and ``step`` reach every rank, each rank's
        ``flag`` every other. Returns (rank 0's payload, the ranks that flagged, rank 0's
        step). ``payload`` is ignored on other ranks; at most ``capacity`` bytes."""
        b = self._np
        b[:] = 0
        if self.rank == 0:
            if len(payload) > self.capacity:
                raise ValueError(f"{len(payload)} bytes of commands: at most {self.capacity}")
            b[0], b[1] = len(payload), min(step, 2**31 - 1)  # (an int32 slot)
            if payload:
                padded = payload + b"\0" * (-len(payload) % 4)
                words = np.frombuffer(padded, dtype=np.int32)
                b[_HEAD + self.world_size:_HEAD + self.world_size + len(words)] = words
        if flag:
            b[_HEAD + self.rank] = 1
        self._collective(dist.all_reduce, self._buf)
        n = int(b[0])
        flagged = np.flatnonzero(b[_HEAD:_HEAD + self.world_size]).tolist()
        data = b[_HEAD + self.world_size:].tobytes()[:n]
        return data, flagged, int(b[1])

    def _collective(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args, group=self.group)
        except RuntimeError as e:  # gloo: a peer's connection closed, or the timeout passed
            raise JobLost(f"neurotop: rank {self.rank} of {self.world_size} lost the job"
                          f" (another rank died, or hung for over {self.timeout_s:g} s):"
                          f" {str(e).splitlines()[0][:300]}") from e


def _env_timeout() -> float:
    """``$NEUROTOP_JOB_TIMEOUT_S`` (seconds > 0), else ``GROUP_TIMEOUT_S``."""
    text = os.environ.get("NEUROTOP_JOB_TIMEOUT_S", "")
    if not text:
        return GROUP_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"NEUROTOP_JOB_TIMEOUT_S must be a number of seconds > 0, got {text!r}")
    return value
