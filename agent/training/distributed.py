"""One job for N ranks: the training-thread side of ``torch.distributed``.

Under an initialized process group (more than one rank) every rank's ``watch()`` joins one
job: it creates neurotop's own gloo group (``dist.new_group(backend="gloo")``: CPU tensors
over TCP, so nothing here touches the user's NCCL streams or their process group's
collectives), and rank 0's run id, control key and control endpoint reach every rank
(``agree``: JSON bytes broadcast as a uint8 tensor; no pickle, unlike
``broadcast_object_list``). At a control check (every ``Config.control_every`` step
boundaries, and in a loop while paused) every rank joins ONE all-reduce (SUM) of a small
int32 buffer, started at that boundary without waiting (``start``: gloo's threads carry it
while the next step trains) and read at the next one (``finish``; ``exchange`` does both at
once, for the hold), in which rank 0 writes the commands it decided (and its
step) and every rank writes its own auto-pause flag and its vitals (``VITALS``: four
float64 as eight int32 words, from ``RankVitals``). Other ranks write zeros where rank 0
writes (and every rank zeros where another writes), so the sum is each writer's bytes
exactly; the per-rank slots say who flagged, and every rank ends with the same table of
every rank's vitals, which the rank rules (``neurotop.service.rank_rules``) judge.

Every call here is a collective: all ranks make the same calls in the same order (the
``Controller`` sees to that: checks fall on the same boundary count on every rank, and
every decision it acts on travelled in one of them). A rank that died makes the others'
collective fail at once (gloo sees the connection close); one that hangs, after
``GROUP_TIMEOUT_S`` (or ``$NEUROTOP_JOB_TIMEOUT_S``). Either way ``JobLost`` says which
rank lost the job, and gloo's reason.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from neurotop.service.controller import Controller, JobLost
from neurotop.service.rank_rules import COLUMNS, UNMEASURED, RankJudge

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
#: Each rank's vitals in the check: ``rank_rules.COLUMNS`` as float64, two int32 words each.
VITALS = len(COLUMNS)
#: The parameter fingerprint is taken at every this-many-th check that followed steps (a
#: pass over the weights; a diverged replica stays diverged, so checking it every time
#: buys nothing): every 50 steps at the default ``control_every``.
PARAMS_EVERY = 5
#: The per-rank scalar every rank of a job adds to its reports: its mean ready time (ms,
#: the host time from a step boundary to the model's next forward, over the report's
#: window). Under DDP the all-reduce makes every rank's step time equal; this is the time
#: that differs, and a straggler's is the longest.
JOB_SCALARS = ("ready_ms",)


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
        self.node = node_id()  # names this node's relay (two "nodes" may share a host)
        self.timeout_s = timeout_s if timeout_s is not None else _env_timeout()
        self.capacity = PAYLOAD_BYTES
        self.group = dist.new_group(backend="gloo",
                                    timeout=datetime.timedelta(seconds=self.timeout_s))
        self._vit = _HEAD + self.world_size  # where the vitals table starts
        self._pay = self._vit + 2 * VITALS * self.world_size  # and rank 0's payload
        self._buf = torch.zeros(self._pay + PAYLOAD_BYTES // 4, dtype=torch.int32)
        self._np = self._buf.numpy()  # the same memory: reading it is no tensor op
        self._work: dist.Work | None = None  # the check started and not yet finished
        #: This rank's row of the vitals table (``RankVitals.row``), and what gets the
        #: whole table after each check (the rank rules); None: zeros, nothing judged.
        self.vitals: Callable[[], tuple[float, ...]] | None = None
        self.on_vitals: Callable[[int, np.ndarray], None] | None = None

    def identity(self) -> dict[str, Any]:
        """What every message of this rank carries besides its ``rank``."""
        return {"world_size": self.world_size, "local_rank": self.local_rank,
                "host": self.host, "node": self.node}

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
        """``start`` then ``finish``: the check done while it waits (a hold, a benchmark)."""
        self.start(step, payload, flag)
        return self.finish()

    def start(self, step: int, payload: bytes, flag: bool) -> None:
        """Begin the check's one all-reduce (SUM) and return at once: gloo's own threads
        carry it while this rank trains its next step, and ``finish`` (every rank at the same
        later boundary) reads the result. Rank 0's ``payload`` (at most ``capacity`` bytes,
        ignored on other ranks) and ``step``, this rank's ``flag`` and its vitals go in."""
        if self._work is not None:
            raise RuntimeError("a check is already in flight: finish it first")
        b = self._np
        b[:] = 0
        if self.rank == 0:
            if len(payload) > self.capacity:
                raise ValueError(f"{len(payload)} bytes of commands: at most {self.capacity}")
            b[0], b[1] = len(payload), min(step, 2**31 - 1)  # (an int32 slot)
            if payload:
                padded = payload + b"\0" * (-len(payload) % 4)
                words = np.frombuffer(padded, dtype=np.int32)
                b[self._pay:self._pay + len(words)] = words
        if flag:
            b[_HEAD + self.rank] = 1
        if self.vitals is not None:
            at = self._vit + 2 * VITALS * self.rank
            b[at:at + 2 * VITALS] = np.asarray(self.vitals(), dtype=np.float64).view(np.int32)
        self._work = self._collective(dist.all_reduce, self._buf, async_op=True)

    @property
    def in_flight(self) -> bool:
        """A check was started and not finished."""
        return self._work is not None

    def finish(self) -> tuple[bytes, list[int], int]:
        """Wait for the started check (done long ago, unless a peer is late) and return
        (rank 0's payload, the ranks that flagged, rank 0's step at ``start``)."""
        work, self._work = self._work, None
        if work is None:
            raise RuntimeError("no check in flight")
        self._collective(lambda group: work.wait())
        b = self._np
        n = int(b[0])
        flagged = np.flatnonzero(b[_HEAD:_HEAD + self.world_size]).tolist()
        data = b[self._pay:].tobytes()[:n]
        if self.on_vitals is not None:
            table = b[self._vit:self._pay].copy().view(np.float64).reshape(-1, VITALS)
            self.on_vitals(int(b[1]), table)
        return data, flagged, int(b[1])

    def gather(self, text: str) -> list[str]:
        """Every rank's ``text``, in rank order, on every rank (two all-gathers on the gloo
        group: the lengths, then the bytes padded to the longest). At ``watch()`` time."""
        data = text.encode()
        n = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self._collective(dist.all_gather, sizes, n)
        width = max(int(s[0]) for s in sizes)
        mine = torch.zeros(width, dtype=torch.uint8)
        if data:
            mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        every = [torch.zeros(width, dtype=torch.uint8) for _ in range(self.world_size)]
        self._collective(dist.all_gather, every, mine)
        return [bytes(t.numpy()[:int(s[0])]).decode() for t, s in zip(every, sizes, strict=True)]

    def watch_health(self, models: list[nn.Module], judge: RankJudge,
                     controller: Controller) -> RankVitals:
        """Carry this rank's vitals in every check; the table after it goes to the agent
        thread through ``controller.events`` (a callable there: it judges the table and
        raises the alerts as its own), so the rules cost the training thread nothing."""
        vitals = RankVitals(models)
        self.vitals = vitals.row

        def judge_later(step: int, table: np.ndarray) -> None:
            controller.events.put(functools.partial(judge.check, step, table))  # type: ignore[arg-type]
            controller.notify()
        self.on_vitals = judge_later
        return vitals

    def _collective(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, group=self.group, **kwargs)
        except RuntimeError as e:  # gloo: a peer's connection closed, or the timeout passed
            raise JobLost(f"neurotop: rank {self.rank} of {self.world_size} lost the job"
                          f" (another rank died, or hung for over {self.timeout_s:g} s):"
                          f" {str(e).splitlines()[0][:300]}") from e


class RankVitals:
    """This rank's row of the check's vitals table (``rank_rules.COLUMNS``), measured on the
    training thread: ``ready_s`` and ``step_s`` from the monitor's calls at each boundary and
    the model's forward pre-hook, the last observed loss, and the parameter fingerprint of
    the DDP-wrapped models (every ``PARAMS_EVERY``-th check with steps). A check without
    steps since the last (a hold) sends no information: NaN, and ``UNMEASURED``. On CUDA the
    loss and the fingerprint are copied to the host without a sync and read at the next
    time (late, on every rank alike)."""

    def __init__(self, models: list[nn.Module]) -> None:
        ddp = [m for m in models if isinstance(m, nn.parallel.DistributedDataParallel)]
        self._params = [p for m in ddp for p in m.parameters()]
        self.loss: torch.Tensor | float | None = None  # the last ``observe(loss=)``
        self._t_end: float | None = None  # perf_counter at the end of the last boundary
        self._forwarded = True  # a forward began since then (the span is closed)
        self._ready, self._steps = [0.0, 0], [0.0, 0]  # (sum of seconds, count)
        self._ready_report = [0.0, 0]  # the same as ``_ready``, over a report's window
        self._late: dict[str, tuple[torch.Tensor, Any]] = {}  # CUDA: (host copy, event)
        self._stepped_checks = 0  # checks that followed steps: the fingerprint's cadence

    def forward(self) -> None:
        """A forward of the model begins: the first since a boundary ends its ready span."""
        if not self._forwarded and self._t_end is not None:
            self._forwarded = True
            span = time.perf_counter() - self._t_end
            self._ready[0] += span
            self._ready[1] += 1
            self._ready_report[0] += span
            self._ready_report[1] += 1

    def boundary_started(self) -> None:
        if self._t_end is not None:
            self._steps[0] += time.perf_counter() - self._t_end
            self._steps[1] += 1

    def boundary_ended(self) -> None:
        """After the boundary's commands and holds: the next step starts now."""
        self._t_end, self._forwarded = time.perf_counter(), False

    def take_ready_ms(self) -> float:
        """The mean ready time (ms) since the last report (then reset): the report's
        ``ready_ms``; NaN when no forward followed a boundary in its window."""
        total, n = self._ready_report
        self._ready_report = [0.0, 0]
        return 1000.0 * total / n if n else math.nan

    def row(self) -> tuple[float, float, float, float]:
        """The means since the last check (then reset), the loss, the fingerprint."""
        ready = self._ready[0] / self._ready[1] if self._ready[1] else math.nan
        step = self._steps[0] / self._steps[1] if self._steps[1] else math.nan
        stepped = self._steps[1] > 0
        self._ready, self._steps = [0.0, 0], [0.0, 0]
        if not stepped:
            return ready, step, math.nan, UNMEASURED
        self._stepped_checks += 1
        loss, self.loss = self._loss(), None  # a loss is news once
        due = self._stepped_checks % PARAMS_EVERY == 1 or PARAMS_EVERY == 1
        return ready, step, loss, self._fingerprint() if due else UNMEASURED

    def _loss(self) -> float:
        v = self.loss
        if v is None:
            return math.nan
        if not isinstance(v, torch.Tensor):
            return float(v)
        if v.numel() != 1:
            return math.nan
        return self._host("loss", v, math.nan)

    @torch.no_grad()
    def _fingerprint(self) -> float:
        """The sum of squared weights (per-tensor norms, squared and summed in float64)."""
        if not self._params:
            return UNMEASURED
        norms = torch._foreach_norm([p.detach() for p in self._params])
        total = torch.stack([n.to(torch.float64) for n in norms]).square().sum()
        return self._host("params", total, UNMEASURED)

    def _host(self, key: str, t: torch.Tensor, unread: float) -> float:
        """``t`` as a float: at once on the CPU; on CUDA the copy started at the previous
        check if it has landed (else ``unread``), and a new copy started for the next;
        ``unread`` on other devices (reading an XLA or MPS value would force their work)."""
        if t.device.type == "cpu":
            return float(t)
        if t.device.type != "cuda":
            return unread
        value = unread
        late = self._late.get(key)
        if late is not None and late[1].query():
            value = float(late[0])
        host = torch.empty((), dtype=torch.float64, pin_memory=True)
        host.copy_(t.detach().to(torch.float64), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._late[key] = (host, event)
        return value


def node_id() -> str:
    """This node's id among the job's: ``$NEUROTOP_NODE_ID``, else torchrun's node rank
    (``$GROUP_RANK``), else "" (one node per host). The node relay's socket and the ranks it
    forwards go by (host, node id), so two torchruns on one host (two "nodes") each get
    their own relay."""
    text = os.environ.get("NEUROTOP_NODE_ID", "")
    if text and not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", text):
        raise ValueError(f"NEUROTOP_NODE_ID must be 1-32 letters, digits, '_', '.' or '-',"
                         f" got {text[:40]!r}")
    return text or os.environ.get("GROUP_RANK", "")


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
