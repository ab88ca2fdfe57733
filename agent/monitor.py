"""``watch(model, optimizer)``: the only part of neurotop that runs in the training thread.

On report steps (every ``report_every``-th; on other steps every hook returns at once),
forward hooks add each measured layer's sums to device accumulators and hook its output
gradient; the optimizer's step pre-hook takes the parameter statistics; the post-hook
packs the report into one device buffer, starts its one copy to the host, hands it to
the agent thread and applies queued commands (pausing there if asked). Nothing here
reads a device value back to the host. See ``neurotop.config.Config`` for the options.
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

from neurotop.config import PARAM_STATS, Config
from neurotop.protocol import connfile
from neurotop.protocol.binding import CurveKeys, check_bind
from neurotop.protocol.histograms import hist_edges
from neurotop.service.autopause import AutoPause
from neurotop.service.controller import Controller
from neurotop.service.detectors import AlertRules, Detectors, alert_rules
from neurotop.service.finalize import BUILTIN_SCALARS, HOST_SCALARS, PendingReport, Report, lr_names
from neurotop.service.loop import AgentService
from neurotop.service.recorder import open_recording
from neurotop.service.wakeup import Wakeup
from neurotop.training.checkpoint import Checkpointer
from neurotop.training.collector import LayerCollector
from neurotop.training.knobs import Knobs, UserKnob
from neurotop.training.layers import select_layers
from neurotop.training.packing import pack, to_host
from neurotop.training.param_stats import ParamStats, param_names
from neurotop.training.stats import first_tensor


class Monitor:
    """Live statistics and control for one model and optimizer. Use ``watch`` to make one.

    Builds its parts in dependency order, each from finished parts, and owns the threads:
    it starts the recorder and the agent thread, and ``close`` joins them and the
    checkpoint writers.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 name: str | None = None, config: Config | None = None,
                 run_id: str | None = None, bind_host: str = "127.0.0.1",
                 heartbeat_s: float = 0.5, curve: bool = False, scheduler: Any = None,
                 auto_pause: bool = True, auto_pause_alerts: tuple[str, ...] = (),
                 alerts: AlertRules | dict[str, Any] | None = None, snapshot: Any = None,
                 raise_on_stop: bool = False,
                 record: bool | str | os.PathLike | None = True, **options: Any) -> None:
        check_bind(bind_host, curve)  # before any hook is registered
        rules = alert_rules(alerts)
        self.config = (config or Config()).replace(**options)
        curve_keys = CurveKeys.generate() if curve else None
        self.model, self.optimizer = model, optimizer
        self.report_every = self.config.report_every
        self.run_id = run_id or os.environ.get("NEUROTOP_RUN_ID") or connfile.new_run_id()
        self.name = name or Path(sys.argv[0] or "python").stem
        self.step = 0
        self.start_time = time.time()
        self._closed = False
        self._active = True  # report on the first step
        self._specs = select_layers(model, self.config)
        self._layers = [s.name for s in self._specs]
        self.collector = LayerCollector(self._specs, self.config)
        self.param_stats = ParamStats(param_names(model, optimizer), self.config.param_stats,
                                      self.config.sample)
        self._observed: dict[str, Any] = {}
        self._user_scalars: list[str] = []
        self._schema_id = 0
        self._schema_cache: tuple[tuple[int, int], dict[str, Any]] | None = None
        self._reports = 0
        self._samples = 0  # samples seen by the model's forward in this report window
        self._last_report = (time.monotonic(), 0)  # (t, step) of the previous report
        self._rate = (time.monotonic(), 0, 0.0)  # (t, step, steps/s) for the heartbeat
        self.knobs = Knobs(model, optimizer, scheduler=scheduler, auto_pause=auto_pause)
        auto = AutoPause(self.knobs.auto_pause, auto_pause_alerts)
        self.recorder = open_recording(record, self.run_id, self.name, self.start_time)
        self.checkpointer = Checkpointer(
            model, optimizer, self.run_id, snapshot,
            default_dir=self.recorder.path.parent if self.recorder else "runs")
        wakeup = Wakeup()  # the agent thread sleeps on it; what hands it work rings it
        self.controller = Controller(knobs=self.knobs, snapshot=self.checkpointer,
                                     raise_on_stop=raise_on_stop, notify=wakeup.ring)
        self._start_window()
        key = os.urandom(32)
        self.service = AgentService(run_id=self.run_id, key=key, controller=self.controller,
                                    wakeup=wakeup, schema=self._schema, status=self._status,
                                    bind_host=bind_host, heartbeat_s=heartbeat_s,
                                    curve=curve_keys,
                                    auto_pause=auto, detectors=Detectors(rules),
                                    recorder=self.recorder)
        if self.recorder is not None:
            self.recorder.start()
        try:
            self.service.start()
        except BaseException:
            if self.recorder is not None:
                self.recorder.close()
            raise
        # Under torch.compile the hooks are traced: the ``_active`` test is cheap to guard
        # on, and the measuring itself runs eagerly (a graph break on report steps only).
        self._measure = torch.compiler.disable(self.collector.on_output)
        self._count = torch.compiler.disable(self._count_samples)
        self._handles = [s.module.register_forward_hook(self._forward_hook(i))
                         for i, s in enumerate(self._specs)]
        self._handles += [model.register_forward_pre_hook(self._batch_hook, with_kwargs=True),
                          optimizer.register_step_pre_hook(self._pre_step),
                          optimizer.register_step_post_hook(self._post_step)]
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
            if k not in BUILTIN_SCALARS and k not in self._user_scalars:
                self._user_scalars.append(k)
                self._schema_id += 1
            self._observed[k] = v.detach() if isinstance(v, torch.Tensor) else float(v)

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
        """Remove hooks, finish a snapshot being written, flush the last reports, delete
        the connection file. Idempotent. The order matters: the snapshot's ack goes out
        through the agent thread, whose last messages go into the recording."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for h in self._handles:
            h.remove()
        self.controller.close()
        self.checkpointer.close()
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
            if self._active:
                self._measure(i, out)
        return hook

    def _batch_hook(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self._active:
            self._count(args, kwargs)

    def _count_samples(self, args: Any, kwargs: Any) -> None:
        """Samples = dim 0 of the model's first tensor input, in forwards that track grad."""
        t = first_tensor(args) if args else first_tensor(kwargs)
        if t is not None and t.dim() and torch.is_grad_enabled():
            self._samples += t.shape[0]

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._active:
            self.param_stats.before_step()
        self.knobs.pre_step()

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        if self._active:
            self._report()
        self._active = self.step % self.report_every == 0
        if self._active:
            self._start_window()
        self.controller.at_boundary(self.step)

    def _start_window(self) -> None:
        every = self.config.hist_every
        self.collector.hist_now = every > 0 and self._reports % every == 0
        self._samples = 0

    def _report(self) -> None:
        """Pack the window into one device buffer, start its copy, hand it over."""
        dev = self.collector.device or _device_of(self.param_stats.params)
        parts, meta = self.collector.pack(dev)
        pblock = self.param_stats.after_step(dev)
        if pblock is not None:
            parts["params"] = pblock
        names = self._scalar_names()
        slots, values, host = [], [], {}
        for k, v in self._scalar_values(dev).items():
            if isinstance(v, torch.Tensor) and v.device == dev:
                slots.append(k)
                values.append(v.reshape(()).to(torch.float32))
            else:
                host[k] = v  # a float, or a tensor on another device read by the agent thread
        if values:
            parts["scalars"] = torch.stack(values)
        buf, layout = pack(parts, dev)
        buf, ready = to_host(buf), None
        if dev.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        pending = PendingReport(self._schema_id, self.config, layout, meta, names, slots, host)
        self.service.submit_report(Report(self.step, time.time(), buf, pending.messages,
                                          ready))
        self._reports += 1

    def _scalar_values(self, dev: torch.device) -> dict[str, Any]:
        """This report's scalars by name: device tensors, CPU tensors or floats."""
        now, step = time.monotonic(), self.step
        t0, s0 = self._last_report
        self._last_report = (now, step)
        rate = (step - s0) / (now - t0) if s0 and now > t0 else float("nan")
        out: dict[str, Any] = dict(self._observed)
        out["grad_norm"] = self.param_stats.grad_norm
        for name, g in zip(lr_names(len(self.optimizer.param_groups)),
                           self.optimizer.param_groups, strict=True):
            lr = g.get("lr", float("nan"))
            out[name] = lr if isinstance(lr, torch.Tensor) else float(lr)
        out["steps_per_s"] = rate
        out["samples_per_s"] = rate * self._samples if self._samples else float("nan")
        if dev.type == "cuda":
            out["mem_device"] = float(torch.cuda.memory_allocated(dev))
            out["mem_device_peak"] = float(torch.cuda.max_memory_allocated(dev))
        return {k: v for k, v in out.items() if v is not None}

    def _scalar_names(self) -> list[str]:
        return [*BUILTIN_SCALARS, *self._user_scalars,
                *lr_names(len(self.optimizer.param_groups)), *HOST_SCALARS]

    # -- read by the agent thread -------------------------------------------------------

    def _schema(self) -> dict[str, Any]:
        """The schema (shared: do not mutate). Built again only when it changes: the agent
        thread reads it on every report."""
        key = (self._schema_id, len(self.optimizer.param_groups))
        if self._schema_cache is None or self._schema_cache[0] != key:
            self._schema_cache = (key, self._build_schema())
        return self._schema_cache[1]

    def _build_schema(self) -> dict[str, Any]:
        c = self.config
        return {"schema_id": self._schema_id, "run_name": self.name, "layers": self._layers,
                "layer_types": [s.type_name for s in self._specs],
                "blocks": [s.name for s in self._specs if s.kind == "block"],
                "stats": list(c.stats), "scalars": self._scalar_names(),
                "params": self.param_stats.names if c.param_stats else [],
                "param_stats": list(PARAM_STATS) if c.param_stats else [],
                "hist_layers": [s.name for s in self._specs if s.hist],
                "hist_edges": hist_edges(c.hist_exponents).tolist(),
                "hist_every": c.hist_every, "report_every": self.report_every,
                "config": c.to_dict(), "start_time": self.start_time, "pid": os.getpid()}

    def _status(self) -> dict[str, Any]:
        t0, s0, rate = self._rate
        now, step = time.monotonic(), self.step
        if now - t0 >= 1.0:
            rate = (step - s0) / (now - t0)
            self._rate = (now, step, rate)
        state = "paused" if self.controller.paused else "running"
        return {"step": step, "state": state, "paused_at": self.controller.paused_at,
                "steps_per_s": rate}


def _device_of(params: list[torch.Tensor]) -> torch.device:
    return params[0].device if params else torch.device("cpu")


def watch(model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Monitor:
    """Start monitoring: ``mon = neurotop.watch(model, opt)``; ``mon.observe(loss=loss)`` each
    step; ``mon.close()`` (or use it as a context manager). Options: ``name``, ``run_id``,
    ``bind_host``, ``config=Config(...)`` and any ``Config`` field by name
    (``report_every=5``); ``alerts=AlertRules(...)`` (or a dict of its fields) sets the
    detectors' thresholds, ``auto_pause_alerts=("dying_layer",)`` pauses on more alerts."""
    return Monitor(model, optimizer, **kwargs)
