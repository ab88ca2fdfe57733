"""``watch(model, optimizer)``: the only part of neurotop that runs in the training thread.

Forward hooks write each leaf module's statistics into device tensors, on
report steps only (on other steps a hook returns at once). The optimizer's
step hooks mark the boundary: the pre-hook takes the global grad norm, the
post-hook stacks one ``[layers x stats]`` block, starts its copy to the host,
hands it to the agent thread and applies queued commands (pausing there if
asked). Nothing here reads a device value back to the host.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agent import connfile
from agent.autopause import AutoPause
from agent.binding import CurveKeys, check_bind
from agent.control import Controller
from agent.knobs import Knobs, UserKnob
from agent.recorder import start_recording
from agent.service import AgentService, Report
from agent.snapshot import Snapshotter
from agent.stats import LAYER_STATS, first_tensor, global_grad_norm, layer_stats

#: Scalars every run reports; user scalars from ``observe`` follow, then host-side ones.
DEVICE_SCALARS = ("loss", "grad_norm")
HOST_SCALARS = ("lr",)


class Monitor:
    """Live statistics and control for one model and optimizer. Use ``watch`` to make one."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 name: str | None = None, report_every: int = 1, run_id: str | None = None,
                 bind_host: str = "127.0.0.1", heartbeat_s: float = 0.5,
                 curve: bool = False, scheduler: Any = None, auto_pause: bool = True,
                 auto_pause_alerts: tuple[str, ...] = (), snapshot: Any = None,
                 raise_on_stop: bool = False,
                 record: bool | str | os.PathLike | None = True) -> None:
        if report_every < 1:
            raise ValueError(f"report_every must be >= 1, got {report_every}")
        check_bind(bind_host, curve)  # before any hook is registered
        curve_keys = CurveKeys.generate() if curve else None
        self.model, self.optimizer = model, optimizer
        self.report_every = report_every
        self.run_id = run_id or os.environ.get("NEUROTOP_RUN_ID") or connfile.new_run_id()
        self.name = name or Path(sys.argv[0] or "python").stem
        self.step = 0
        self.start_time = time.time()
        self._closed = False
        self._active = True  # report on the first step
        self._layers = [n for n, m in model.named_modules() if n and not any(m.children())]
        self._rows: list[torch.Tensor | None] = [None] * len(self._layers)
        self._observed: dict[str, torch.Tensor] = {}
        self._user_scalars: list[str] = []
        self._schema_id = 0
        self._grad_norm: torch.Tensor | None = None
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._rate = (time.monotonic(), 0, 0.0)  # (t, step, steps/s) for the heartbeat
        self.knobs = Knobs(model, optimizer, scheduler=scheduler, auto_pause=auto_pause)
        self.controller = Controller(
            knobs=self.knobs, raise_on_stop=raise_on_stop,
            snapshot=Snapshotter(model, optimizer, self.run_id, snapshot,
                                 lambda: self.connection.run_dir or "runs"))
        modules = dict(model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._forward_hook(i))
                         for i, n in enumerate(self._layers)]
        self._handles += [optimizer.register_step_pre_hook(self._pre_step),
                          optimizer.register_step_post_hook(self._post_step)]
        key = os.urandom(32)
        self.recorder = start_recording(record, self.run_id, self.name, self.start_time)
        self.service = AgentService(run_id=self.run_id, key=key, controller=self.controller,
                                    schema=self._schema, status=self._status,
                                    bind_host=bind_host, heartbeat_s=heartbeat_s,
                                    curve=curve_keys,
                                    auto_pause=AutoPause(lambda: self.knobs.auto_pause.value,
                                                         auto_pause_alerts,
                                                         lambda: self.controller.resumes),
                                    recorder=self.recorder)
        self.service.start()
        self.connection = connfile.ConnectionInfo(
            run_id=self.run_id, name=self.name, pid=os.getpid(), start_time=self.start_time,
            telemetry=self.service.telemetry_endpoint, control=self.service.control_endpoint,
            key=key.hex(), curve_server_key=curve_keys.public if curve_keys else "",
            run_dir=str(self.recorder.path.parent) if self.recorder else "")
        self.connection_file = connfile.write(self.connection)
        atexit.register(self.close)

    # -- user API -----------------------------------------------------------------------

    def observe(self, loss: torch.Tensor | float | None = None, **scalars: Any) -> None:
        """Hand over this step's loss (a tensor is fine: it is not read until the report)."""
        if loss is not None:
            scalars["loss"] = loss
        for k, v in scalars.items():
            if k not in DEVICE_SCALARS and k not in self._user_scalars:
                self._user_scalars.append(k)
                self._schema_id += 1
            self._observed[k] = v.detach() if isinstance(v, torch.Tensor) else torch.tensor(v)

    @property
    def paused(self) -> bool:
        return self.controller.paused

    @property
    def should_stop(self) -> bool:
        """True once an operator sent ``stop``: finish the step, save, leave the loop."""
        return self.controller.stop_requested

    def knob(self, name: str, default: bool | int | float, *, min: float | None = None,
             max: float | None = None, doc: str = "") -> UserKnob:
        """A value the operator can change live (``neurotop ctl RUN set NAME V``). Read
        ``.value`` (or ``float(k)``) each step; it changes only at optimizer step boundaries.
        Asking again for the same name returns the same knob."""
        return self.knobs.user(name, default, min=min, max=max, doc=doc)

    def use_scheduler(self, scheduler: Any) -> None:
        """Tell the ``lr`` knob about an LR scheduler created after ``watch``."""
        self.knobs.scheduler = scheduler

    def close(self) -> None:
        """Remove hooks, flush the last reports, delete the connection file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for h in self._handles:
            h.remove()
        self.controller.close()
        self.knobs.close()
        self.service.stop()
        if self.recorder is not None:
            self.recorder.close()
        self.connection_file.unlink(missing_ok=True)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- hooks (training thread) --------------------------------------------------------

    def _forward_hook(self, i: int):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not self._active:
                return
            t = first_tensor(out)
            if t is not None:
                self._rows[i] = layer_stats(t)
        return hook

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._active:
            self._grad_norm = global_grad_norm(self._params)
        self.knobs.pre_step()

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        if self._active:
            self._report()
        self._active = self.step % self.report_every == 0
        self.controller.at_boundary(self.step)

    def _report(self) -> None:
        rows = self._rows
        dev = next((r.device for r in rows if r is not None), torch.device("cpu"))
        nan_row = torch.full((len(LAYER_STATS),), float("nan"), device=dev)
        block = torch.stack([nan_row if r is None else r.to(dev) for r in rows]) if rows \
            else torch.empty((0, len(LAYER_STATS)), device=dev)
        nan = torch.full((), float("nan"), device=dev)
        scal = [self._observed.get("loss", nan), self._grad_norm if self._grad_norm is not None
                else nan] + [self._observed.get(k, nan) for k in self._user_scalars]
        scalars = torch.stack([s.to(dev, torch.float32).reshape(()) for s in scal])
        host = [float(self.optimizer.param_groups[0].get("lr", float("nan")))]
        block, scalars, ready = _to_host(block), _to_host(scalars), None
        if dev.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        self.service.submit_report(Report(self.step, time.time(), block, scalars, host, ready))
        self._rows = [None] * len(self._layers)
        self._grad_norm = None

    # -- read by the agent thread -------------------------------------------------------

    def _schema(self) -> dict[str, Any]:
        return {"schema_id": self._schema_id, "run_name": self.name, "layers": self._layers,
                "stats": list(LAYER_STATS),
                "scalars": [*DEVICE_SCALARS, *self._user_scalars, *HOST_SCALARS],
                "report_every": self.report_every, "start_time": self.start_time,
                "pid": os.getpid()}

    def _status(self) -> dict[str, Any]:
        t0, s0, rate = self._rate
        now, step = time.monotonic(), self.step
        if now - t0 >= 1.0:
            rate = (step - s0) / (now - t0)
            self._rate = (now, step, rate)
        state = "paused" if self.controller.paused else "running"
        return {"step": step, "state": state, "paused_at": self.controller.paused_at,
                "steps_per_s": rate}


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Start the report's one device-to-host copy without waiting for it."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def watch(model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Monitor:
    """Start monitoring: ``mon = agent.watch(model, opt)``; ``mon.observe(loss=loss)`` each
    step; ``mon.close()`` (or use it as a context manager). See ``Monitor`` for options."""
    return Monitor(model, optimizer, **kwargs)
