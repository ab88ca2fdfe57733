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
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurotop.config import PARAM_STATS, Config
from neurotop.protocol import connfile
from neurotop.protocol.binding import CurveKeys, check_bind
from neurotop.protocol.histograms import hist_edges
from neurotop.service.autopause import AutoPause
from neurotop.service.controller import Controller, check_timeout
from neurotop.service.detectors import AlertRules, Detectors, alert_rules
from neurotop.service.finalize import (
    AMP_SCALARS,
    BUILTIN_SCALARS,
    HEAD_SCALARS,
    HOST_SCALARS,
    PendingReport,
    Report,
)
from neurotop.service.loop import AgentService
from neurotop.service.rank_rules import RankJudge, RankRules, rank_rules
from neurotop.service.recorder import open_recording
from neurotop.service.wakeup import Wakeup
from neurotop.training.amp import STUCK, ScalerWatch
from neurotop.training.carry import StepCarry
from neurotop.training.checkpoint import Checkpointer
from neurotop.training.collector import LayerCollector
from neurotop.training.compiled import EagerReports
from neurotop.training.curvature import PROBE_SCALARS, CurvatureProbe, LossFn
from neurotop.training.distributed import JOB_SCALARS, Job, in_job
from neurotop.training.head import HeadHook, HeadStats, head_add
from neurotop.training.hooks import (
    Call,
    ForwardStart,
    InputHook,
    LayerHook,
    eager_unless_compiling,
)
from neurotop.training.knob_kinds import UserKnob
from neurotop.training.knobs import Knobs
from neurotop.training.layers import select_layers
from neurotop.training.optimizers import (
    Models,
    Optimizers,
    OptimizerSet,
    Watched,
    gather_models,
    name_optimizers,
)
from neurotop.training.packing import pack, to_host
from neurotop.training.param_stats import ParamStats, param_names
from neurotop.training.signals import SignalGuard
from neurotop.training.stats import first_tensor, float32_on


class StepCount(int):
    """``mon.step``: an int (steps completed) that ends a step when called (``mon.step()``)."""

    def __new__(cls, n: int, end_step: Callable[[], None]) -> StepCount:
        obj = super().__new__(cls, n)
        obj._end_step = end_step
        return obj

    def __call__(self) -> None:
        self._end_step()


class Monitor:
    """Live statistics and control for a model (or several) and its optimizers (none, one
    or several; see ``neurotop.training.optimizers``). Use ``watch`` to make one.

    Builds its parts in dependency order, each from finished parts, and owns the threads:
    it starts the recorder and the agent thread, and ``close`` joins them and the
    checkpoint writers.
    """

    def __init__(self, model: Models, optimizer: Optimizers = None, *,
                 name: str | None = None, config: Config | None = None,
                 run_id: str | None = None, bind_host: str = "127.0.0.1",
                 heartbeat_s: float = 0.5, curve: bool = False, scheduler: Any = None,
                 auto_pause: bool = True, auto_pause_alerts: tuple[str, ...] = (),
                 auto_pause_timeout: float | None = None,
                 alerts: AlertRules | dict[str, Any] | None = None, snapshot: Any = None,
                 raise_on_stop: bool = False, scaler: Any = None,
                 record: bool | str | os.PathLike | None = True, distributed: bool = True,
                 on_alert: Callable[[dict[str, Any]], None] | None = None,
                 rank_alerts: RankRules | dict[str, Any] | None = None,
                 head: str | nn.Module | None = None, probe_loss: LossFn | None = None,
                 **options: Any) -> None:
        check_bind(bind_host, curve)  # before any hook is registered
        rules = alert_rules(alerts)
        ranks = rank_rules(rank_alerts)
        check_timeout(auto_pause_timeout)
        if on_alert is not None and not callable(on_alert):
            raise TypeError(f"on_alert= takes a function of the alert dict, not {on_alert!r}")
        self.config = (config or Config()).replace(**options)
        curve_keys = CurveKeys.generate() if curve else None
        model, self._models = gather_models(model)
        self.model = model
        self.optimizers = OptimizerSet()  # what the knobs and the snapshot see
        self._watched: list[Watched] = []
        self._boundary: Watched | None = None  # whose step is the boundary; None: step()
        self._manual_steps = False  # the loop has called ``step()``
        for opt_name, opt in name_optimizers(optimizer, model):
            self._watch_optimizer(opt_name, opt)
        if scheduler is not None and len(self._watched) > 1:
            raise ValueError("scheduler= rescales one optimizer's schedule: with several"
                             " optimizers, leave it out (set lr then changes the groups only)")
        self.report_every = self.config.report_every
        self.run_id = run_id or os.environ.get("NEUROTOP_RUN_ID") or connfile.new_run_id()
        key = os.urandom(32)
        # One rank of a job (``distributed=False``: watched alone, e.g. rank 0 only): every
        # rank runs this, which creates neurotop's gloo group; rank 0's run id and key win.
        self.job = Job() if distributed and in_job() else None
        if self.job is not None:
            agreed = self.job.agree({"run_id": self.run_id, "key": key.hex()})
            self.run_id, key = agreed["run_id"], bytes.fromhex(agreed["key"])
        identity = self.job.identity() if self.job is not None else {}
        self.name = name or Path(sys.argv[0] or "python").stem
        self._step = 0  # training steps completed (``step`` is the public view)
        self.start_time = time.time()
        self._closed = False
        self._active = True  # report on the first step
        self._eager = EagerReports()  # report steps run eagerly under torch.compile
        self._eager.window(True)
        self._measure_eval = self.config.measure_eval
        self._specs = select_layers(model, self.config)
        self._layers = [s.name for s in self._specs]
        self.collector = LayerCollector(self._specs, self.config)
        # Without an optimizer: the parameters that train, measured at ``step()``.
        self._manual_stats = ParamStats(
            [(n, p) for n, p in model.named_parameters() if p.requires_grad],
            self.config.param_stats, self.config.sample)
        self._observed: dict[str, Any] = {}
        self._head, self._head_structure = self._head_of(head), 0  # before any thread starts
        self._head_hooked = head is not None
        self._probe = CurvatureProbe(  # the curvature probe: idle until given a batch
            model, lambda: self._boundary.optimizer if self._boundary is not None else None,
            every=self.config.probe_every, features=self.config.features, loss_fn=probe_loss)
        self._carry = StepCarry()  # loss and grad norm of every step, on the device
        self._observed_window: dict[str, list[Any]] = {}  # every call in a report step
        self._user_scalars: list[str] = []
        self._schema_id = 0
        self._schema_cache: tuple[tuple[int, int], dict[str, Any]] | None = None
        self._reports = 0
        self._samples = 0  # samples seen by the model's forward in this report window
        self._last_report = (time.monotonic(), 0)  # (t, step) of the previous report
        self._rate = (time.monotonic(), 0, 0.0)  # (t, step, steps/s) for the heartbeat
        self.knobs = Knobs(model, self.optimizers, scheduler=scheduler, auto_pause=auto_pause)
        auto = AutoPause(self.knobs.auto_pause, auto_pause_alerts)
        self.recorder = open_recording(record, self.run_id, self.name, self.start_time,
                                       private=self.config.private_files,
                                       job={"rank": self.job.rank, **identity}
                                       if self.job is not None else None)
        self.checkpointer = Checkpointer(
            model, self.optimizers, self.run_id, snapshot,
            default_dir=self.recorder.path.parent if self.recorder else "runs",
            private=self.config.private_files)
        wakeup = Wakeup()  # the agent thread sleeps on it; what hands it work rings it
        self.controller = Controller(knobs=self.knobs, snapshot=self.checkpointer,
                                     raise_on_stop=raise_on_stop, notify=wakeup.ring,
                                     auto_pause_timeout=auto_pause_timeout, job=self.job,
                                     control_every=self.config.control_every,
                                     probe=self._probe_command)
        # A job's rank rules: every check carries each rank's vitals (``RankVitals``)
        self._vitals = self.job.watch_health(self._models, RankJudge(ranks, rules.off),
                                             self.controller) if self.job is not None else None
        self._start_window()
        # ``scaler=``: gradient statistics divided by its loss scale; its skipped steps
        # (before the agent thread starts: it reads ``amp`` for the schema)
        self.amp = ScalerWatch(scaler, self._is_boundary, lambda: self._step,
                               self._skipped_step) if scaler is not None else None
        self.service = AgentService(run_id=self.run_id, key=key, controller=self.controller,
                                    wakeup=wakeup, schema=self._schema, status=self._status,
                                    bind_host=bind_host, heartbeat_s=heartbeat_s,
                                    curve=curve_keys,
                                    auto_pause=auto, detectors=Detectors(rules),
                                    recorder=self.recorder,
                                    rank=self.job.rank if self.job else 0, identity=identity,
                                    on_alert=on_alert)
        if self.recorder is not None:
            self.recorder.start()
        try:
            self.service.start()
        except BaseException:
            if self.recorder is not None:
                self.recorder.close()
            if self.amp is not None:
                self.amp.close()
            raise
        # Under torch.compile report steps run eagerly (``EagerReports``); where the stance
        # cannot be set (a compiled step boundary), measuring breaks the graph instead.
        self._measure = eager_unless_compiling(self.collector.on_output)
        self._count = eager_unless_compiling(self._count_samples)
        self._forward_started = eager_unless_compiling(self.collector.forward_started)
        self._head_add = eager_unless_compiling(lambda out: head_add(self._head, out))
        self._structure = 0  # the collector's ``structure`` the schema was built from
        # Module-level hook classes: a deep copy or a pickle of the model gets inert ones.
        roots = {s.name: self._root_of(s.name) for s in self._specs}
        self._handles = [s.module.register_forward_hook(LayerHook(self, i, roots[s.name]))
                         for i, s in enumerate(self._specs)]
        self._handles.append(self._models[0].register_forward_pre_hook(
            InputHook(self, self._models[0]), with_kwargs=True))
        # A forward begins (calls per forward): ``_count_samples`` says so for the first
        # model's training forwards, sparing a second graph break under torch.compile.
        self._handles += [m.register_forward_pre_hook(ForwardStart(self, m))
                          for m in self._models[0 if self._measure_eval else 1:]]
        if self._vitals is not None:  # its ready span ends where the model's forward begins
            self._handles.append(self._models[0].register_forward_pre_hook(
                Call(eager_unless_compiling(lambda m, a: self._vitals.forward()))))
        if head is not None:
            module = head if isinstance(head, nn.Module) else self.model.get_submodule(head)
            self._handles.append(module.register_forward_hook(
                HeadHook(self, self._root_of(self._head.name))))
        if not self._watched:  # gradients as accumulated, for ``step()``
            self._handles += self._manual_stats.accumulate_hooks(
                lambda: self._active and not self._watched, self._loss_scale)
        for w in self._watched:
            self._hook_optimizer(w)
        if self.job is not None:  # rank 0 takes the job's commands: say where, on every rank
            self.controller.leader = self.job.agree(
                {"control": self.service.control_endpoint})["control"]
        relays = [self.service.relay.endpoint] if self.service.relay else []
        if self.job is not None:  # every node's relay, in the file of each node's local rank 0
            every = [r for r in self.job.gather(relays[0] if relays else "") if r]
            relays = [*relays, *[r for r in dict.fromkeys(every) if r not in relays]] \
                if relays else []
        self.connection = connfile.ConnectionInfo(
            run_id=self.run_id, name=self.name, pid=os.getpid(), start_time=self.start_time,
            telemetry=self.service.telemetry_endpoint, control=self.service.control_endpoint,
            key=key.hex(), curve_server_key=curve_keys.public if curve_keys else "",
            run_dir=str(self.recorder.path.parent) if self.recorder else "",
            rank=self.job.rank if self.job else 0,
            world_size=self.job.world_size if self.job else 1,
            local_rank=self.job.local_rank if self.job else 0, job_control=self.controller.leader,
            relays=relays, node=self.job.node if self.job else "")
        self.connection_file = connfile.write(self.connection)
        atexit.register(self.close)
        self._signals = SignalGuard(self.close)
        if self.config.handle_signals:
            self._signals.install()

    # -- user API -----------------------------------------------------------------------

    def observe(self, loss: torch.Tensor | float | None = None, *,
                logits: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                **scalars: Any) -> None:
        """Hand over this step's loss (a tensor is fine: it is not read until the report).
        ``logits`` (``[..., classes]``, without ``watch(head=)``) and ``targets`` (class
        indices, one per row of the head's logits in this step's calls) feed the head
        statistics (``neurotop.training.head``); read on report steps only, dropped on the
        others. ``train_acc`` and ``test_acc`` are user scalars the detectors read by name.
        Called several times in one optimizer step (once per micro-batch under gradient
        accumulation), the report gets the mean of that step's values, reduced on the
        device at the report; on other steps only the last value is kept. Every loss is
        also checked on the device as it comes (``neurotop.training.carry``): the next
        report carries the window's largest and its first non-finite one, with their steps."""
        if loss is not None:
            scalars["loss"] = loss
        if logits is not None and self._head_hooked:
            raise ValueError("observe(logits=) is for runs without watch(head=...): the"
                             " head's hook reads them already")
        if logits is not None and self._head is None:
            self._head = HeadStats("logits")
            self._schema_id += 1
        if targets is not None and self._head is None:
            raise ValueError("observe(targets=) needs the head's logits: watch(head=NAME)"
                             " or observe(logits=..., targets=...)")
        if self._active and self._head is not None:
            if logits is not None:
                self._head.add(logits)
            if targets is not None:
                self._head.add_targets(targets)
        for k, v in scalars.items():
            if k not in BUILTIN_SCALARS and k not in self._user_scalars:
                self._user_scalars.append(k)
                self._schema_id += 1
            v = v.detach() if isinstance(v, torch.Tensor) else float(v)
            if k == "loss":
                self._carry.update(k, v, self._step + 1)
                if self._vitals is not None:
                    self._vitals.loss = v
            if self._active:
                self._observed_window.setdefault(k, []).append(v)
            else:
                self._observed[k] = v

    def probe_batch(self, x: torch.Tensor, y: torch.Tensor | None = None, *, iters: int = 20,
                    trace: int = 10, precond: bool = True) -> None:
        """A fixed batch for the curvature probe (``neurotop.training.curvature``), kept
        detached on the model's device: its loss is ``watch(probe_loss=fn)``'s ``fn(model(x),
        y)``, by default cross-entropy for integer labels, mean squared error for float
        targets. The probe runs every ``probe_every`` steps (0: only on a ``probe``
        command); with ``watch(features="layer")`` it also measures E11 on that layer. Its
        cost: ``iters`` power iterations (``lambda_max``; with Adam as many again for the
        preconditioned sharpness unless ``precond=False``) and ``trace`` Hutchinson vectors,
        one Hessian-vector product (about 2 training steps) each."""
        first = not self._probe.ready
        self._probe.set_cost(iters, trace, precond)
        self._probe.set_batch(x, y)
        if first:
            self._schema_id += 1  # the probe's scalars join the report

    def probe(self, fn: Callable[[], torch.Tensor], *, iters: int = 20, trace: int = 10,
              precond: bool = True) -> None:
        """The curvature probe's loss as a closure: ``fn()`` runs the model on a fixed batch
        and returns the scalar loss (graph attached, no ``backward``), called at a step
        boundary with the run's state put back afterwards. Replaces a ``probe_batch``; the
        cost arguments as there."""
        first = not self._probe.ready
        self._probe.set_cost(iters, trace, precond)
        self._probe.set_closure(fn)
        if first:
            self._schema_id += 1

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

    @property
    def optimizer(self) -> torch.optim.Optimizer | OptimizerSet | None:
        """The optimizer; with several, the ``OptimizerSet`` of all of them; or None."""
        if len(self._watched) > 1:
            return self.optimizers
        return self._watched[0].optimizer if self._watched else None

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, *, name: str | None = None,
                         boundary: bool = True) -> None:
        """Watch an optimizer created after ``watch(model)`` (inside a trainer's ``run()``):
        its parameter rows, its ``lr`` and ``weight_decay`` knobs, and (``boundary=True``)
        its ``step()`` as the step boundary. Call it before its first step. Called after
        steps that ran without one, it first closes the step in progress, so the loss
        observed then is reported for that step, not the next. ``boundary=False`` keeps
        ``mon.step()`` as the boundary (a trainer whose callbacks, where the loss is
        observed, run after ``optimizer.step()``)."""
        if any(w.optimizer is optimizer for w in self._watched):
            return
        if boundary and self._boundary is None and self._samples and not self._manual_steps:
            self._at_boundary()  # the forwards so far were a step of their own
        taken = [w.name for w in self._watched]
        named = [(name, optimizer)] if name else name_optimizers([optimizer], self.model,
                                                                 taken)
        w = self._watch_optimizer(*named[0], boundary=boundary)
        self._hook_optimizer(w)
        self._manual_stats.sync()  # ``step()``'s statistics give way to the optimizer's
        self.knobs.optimizers_changed()
        self._schema_id += 1  # parameter rows and lr names changed

    @property
    def step(self) -> StepCount:
        """The number of training steps completed, an int. Called, ``mon.step()`` is the
        step boundary of a loop without an optimizer (``watch(model)``; a hand-written
        update), or with ``attach_optimizer(..., boundary=False)``: call it once per
        training step, after the update and before the gradients are zeroed. It does what
        ``optimizer.step()`` does otherwise: reports, applies commands, holds while paused.
        Parameter statistics without an optimizer: the weights are taken at the boundary
        before the report step, the gradients and the update at this one."""
        return StepCount(self._step, self._manual_step)

    def _manual_step(self) -> None:
        if self._boundary is not None:
            raise RuntimeError(f"the step boundary is {self._boundary.name}'s optimizer.step();"
                               " mon.step() would count each step twice")
        self._manual_steps = True
        if not self._watched:  # else each optimizer's pre-step hook gave the carry its norm
            self._carry.update("grad_norm", self._manual_stats.step_norm(), self._step + 1)
        self._at_boundary()

    def close(self) -> None:
        """Remove hooks, finish a snapshot being written, flush the last reports, delete
        the connection file. Idempotent. The order matters: the snapshot's ack goes out
        through the agent thread, whose last messages go into the recording."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._signals.restore()
        for h in self._handles:
            h.remove()
        self._eager.window(False)
        if self.amp is not None:
            self.amp.close()
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

    def _count_samples(self, args: Any, kwargs: Any) -> None:
        """Samples = dim ``Config.batch_dim`` (0 unless the model is sequence-first) of the
        model's first tensor input, in forwards that track grad. A forward begins."""
        self.collector.forward_started()
        t = first_tensor(args) if args else first_tensor(kwargs)
        d = self.config.batch_dim
        if t is not None and t.dim() > d and torch.is_grad_enabled():
            self._samples += t.shape[d]

    def _pre_step(self, w: Watched) -> None:
        """Before ``w``'s step: its parameter statistics, at its first step with gradients
        in a report window (a critic stepped 5 times per generator step is measured once)."""
        if self._active and not w.measured:
            w.stats.before_step()
            w.measured = w.stats.grad_norm is not None
            gn = w.stats.grad_norm  # this step's, as accumulated
        else:
            gn = w.stats.step_norm()
        self._carry.update("grad_norm", gn, self._step + 1)
        self.knobs.pre_step(w.optimizer)

    def _post_step(self, w: Watched) -> None:
        if self._active and w.measured and not w.done:
            w.block, w.done = w.stats.after_step(self._device()), True
        if w is self._boundary:
            self._at_boundary()

    def _at_boundary(self) -> None:
        """The end of a training step: report, open the next window, apply commands."""
        self._step += 1
        if self._probe.due(self._step):
            self._run_probe(self._step)
        if self._active:
            self._report()
        self._active = self._step % self.report_every == 0
        self._eager.window(self._active)
        if self._active:
            self._start_window()
        self._sync_hooks()
        if self._vitals is not None:
            self._vitals.boundary_started()
        self.controller.at_boundary(self._step)
        if self._vitals is not None:
            self._vitals.boundary_ended()

    def _run_probe(self, step: int) -> dict[str, torch.Tensor] | None:
        """The curvature probe, with the monitor's hooks off (its forward is not a training
        forward). A scheduled probe that fails is logged and the schedule stopped, so that
        training goes on; ``_probe_command`` lets the error through to the ack."""
        active, self._active = self._active, False
        try:
            return self._probe.run(step)
        except (RuntimeError, TypeError, ValueError) as e:
            if self._probe.every:
                self._probe.every = 0
                logging.getLogger("neurotop.agent").warning(
                    "neurotop: the curvature probe failed at step %d (%s); probe_every"
                    " is off, a `probe` command tries again", step, e)
                return None
            raise
        finally:
            self._active = active

    def _probe_command(self, step: int) -> dict[str, float]:
        """The ``probe`` command (controller, at a boundary): run it, answer its scalars."""
        if not self._probe.ready:
            raise ValueError("this run has no probe batch: call mon.probe_batch(x, y) or"
                             " mon.probe(fn) in the script")
        every, self._probe.every = self._probe.every, 0  # a failure is the ack's, not logged
        try:
            out = self._run_probe(step) or {}
        finally:
            self._probe.every = every
        return {k: float(v) for k, v in out.items() if k in PROBE_SCALARS}

    def _start_window(self) -> None:
        every = self.config.hist_every
        self.collector.hist_now = every > 0 and self._reports % every == 0
        self._samples = 0
        for w in self._watched:
            w.measured, w.done, w.block = False, False, None
        if not self._watched:
            self._manual_stats.take_weights()

    def _sync_hooks(self) -> None:
        """The parameters' gradient hooks exist in report windows only: registered as one
        opens, removed once its report is taken and the next step does not report."""
        self._manual_stats.sync()
        for w in self._watched:
            w.stats.sync()

    def _watch_optimizer(self, name: str, optimizer: torch.optim.Optimizer,
                         boundary: bool = True) -> Watched:
        """Add an optimizer (hooked later by ``_hook_optimizer``); ``boundary``: its step
        ends the training step (the last one added with True is the boundary)."""
        taken = {n for w in self._watched for n in w.stats.names}
        named = [(f"{n}@{name}" if n in taken else n, p) for n, p in param_names(
            self.model, optimizer)]
        w = Watched(name, optimizer, ParamStats(named, self.config.param_stats,
                                                self.config.sample))
        self._watched.append(w)
        self.optimizers.named.append((name, optimizer))
        if boundary:
            self._boundary = w
        return w

    def _hook_optimizer(self, w: Watched) -> None:
        w.handles = [w.optimizer.register_step_pre_hook(Call(lambda o, a, k: self._pre_step(w))),
                     w.optimizer.register_step_post_hook(
                         Call(lambda o, a, k: self._post_step(w)))]
        w.handles += w.stats.accumulate_hooks(lambda: self._active and not w.measured,
                                              self._loss_scale)
        self._handles += w.handles

    def _is_boundary(self, optimizer: torch.optim.Optimizer) -> bool:
        return self._boundary is not None and self._boundary.optimizer is optimizer

    def _loss_scale(self) -> torch.Tensor | None:
        """The GradScaler's loss scale (its device tensor), which gradients are divided by."""
        return self.amp.scale() if self.amp is not None else None

    def _skipped_step(self) -> None:
        """The scaler skipped the boundary optimizer's step (Inf/NaN gradients): no step
        happened, so a report window starts over instead of mixing that iteration's
        statistics into the next step's report. From ``amp.STUCK`` skips in a row on, every
        ``report_every``-th skipped step is reported (at the same step, with its gradients'
        norm), so that the alerts see a run that no longer steps. Commands apply here too,
        so such a run can still be paused or stopped."""
        n, every = self.amp.streak, self.report_every
        if self._active and n >= STUCK and (n - STUCK) % every == 0:
            for w in self._watched:
                if not w.measured:  # the skipped step's gradients: their norm says why
                    w.stats.before_step()
                    w.measured = w.stats.grad_norm is not None
            self._report()
        elif self._active:
            self.collector.discard()
            self._observed_window.clear()
            if self._head is not None:
                self._head.discard()
            for w in self._watched:
                w.stats.discard()
        elif n + 1 >= STUCK and (n + 1 - STUCK) % every == 0:
            self._active = True  # the next skipped step is reported: measure it
            self._eager.window(True)
        if self._active:
            self._start_window()
        self._sync_hooks()
        self.controller.at_boundary(self.step)

    def _head_of(self, head: str | nn.Module | None) -> HeadStats | None:
        """``watch(head=)``: a module of the model, or its ``named_modules()`` path."""
        if head is None:
            return None
        if isinstance(head, nn.Module):
            name = next((n for n, m in self.model.named_modules() if m is head), None)
            if name is None:
                raise ValueError("head= must be a module of the watched model")
            return HeadStats(name)
        if not isinstance(head, str):
            raise TypeError(f"head= takes a module or its name, not {head!r}")
        try:
            self.model.get_submodule(head)
        except AttributeError:
            raise ValueError(f"head={head!r}: no such module in the model") from None
        return HeadStats(head)

    def _root_of(self, layer: str) -> nn.Module:
        """The user's model a layer belongs to (whose train/eval mode counts)."""
        if len(self._models) == 1:
            return self._models[0]
        return self.model[layer.split(".")[0]]

    def _device(self) -> torch.device:
        if self.collector.device is not None:
            return self.collector.device
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _report(self) -> None:
        """Pack the window into one device buffer, start its copy, hand it over."""
        dev = self._device()
        parts, meta = self.collector.pack(dev, self._loss_scale())
        if self.collector.structure != self._structure:  # activations or calls changed
            self._structure = self.collector.structure
            self._schema_id += 1
        if self._head is not None and self._head.structure != self._head_structure:
            self._head_structure = self._head.structure  # classes or loss dtype changed
            self._schema_id += 1
        pblock = self._param_block(dev)
        if pblock is not None:
            parts["params"] = pblock
        names = self._scalar_names()
        slots, values, host = [], [], {}
        for k, v in self._scalar_values(dev).items():
            if isinstance(v, torch.Tensor) and v.device == dev:
                slots.append(k)
                values.append(float32_on(v if v.dim() == 0 else v.reshape(()), dev))
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
        self.service.submit_report(Report(self._step, time.time(), buf, pending.messages,
                                          ready))
        self._reports += 1

    def _scalar_values(self, dev: torch.device) -> dict[str, Any]:
        """This report's scalars by name: device tensors, CPU tensors or floats."""
        now, step = time.monotonic(), self._step
        t0, s0 = self._last_report
        self._last_report = (now, step)
        rate = (step - s0) / (now - t0) if s0 and now > t0 else float("nan")
        window, self._observed_window = self._observed_window, {}
        for k, vs in window.items():
            self._observed[k] = _mean(vs)
        out: dict[str, Any] = dict(self._observed)
        norms = self._grad_norms()
        vals = [v if v.device == dev else v.to(dev) for v in norms.values()]
        out["grad_norm"] = (None if not vals else vals[0] if len(vals) == 1
                            else torch.linalg.vector_norm(torch.stack(vals)))
        if len(self._watched) > 1:
            out.update((f"grad_norm.{k}", v) for k, v in norms.items())
        for name, g in zip(self.optimizers.lr_names(), self.optimizers.param_groups,
                           strict=True):
            lr = g.get("lr", float("nan"))
            out[name] = lr if isinstance(lr, torch.Tensor) else float(lr)
        if self.amp is not None:
            out["loss_scale"] = self.amp.scale()
            out["skipped_steps"] = float(self.amp.skipped)
        out.update(self._carry.take())
        out.update(self._probe.take())
        if self._head is not None:
            out.update(self._head.take(dev))
        out["steps_per_s"] = rate
        if self._vitals is not None:  # a job's rank: its own ready time (the straggler signal)
            out["ready_ms"] = self._vitals.take_ready_ms()
        out["samples_per_s"] = rate * self._samples if self._samples else float("nan")
        if dev.type == "cuda":
            out["mem_device"] = float(torch.cuda.memory_allocated(dev))
            out["mem_device_peak"] = float(torch.cuda.max_memory_allocated(dev))
        return {k: v for k, v in out.items() if v is not None}

    def _scalar_names(self) -> list[str]:
        per_opt = [f"grad_norm.{w.name}" for w in self._watched] if len(self._watched) > 1 else []
        amp = AMP_SCALARS if self.amp is not None else ()
        head = HEAD_SCALARS if self._head is not None else ()
        head = (*head, *PROBE_SCALARS) if self._probe.ready else head
        return [*BUILTIN_SCALARS, *self._user_scalars, *head, *self.optimizers.lr_names(),
                *per_opt, *amp, *HOST_SCALARS, *(JOB_SCALARS if self._vitals else ())]

    def _param_block(self, dev: torch.device) -> torch.Tensor | None:
        """This window's ``[params x PARAM_STATS]``: each optimizer's rows from its first
        step in the window (NaN for one that did not step), or, without an optimizer, the
        model's parameters at this boundary."""
        if not self._watched:
            self._manual_stats.before_step(weights=False)
            return self._manual_stats.after_step(dev)
        blocks = [w.block if w.measured else None for w in self._watched]
        if all(b is None for b in blocks):
            return None
        return torch.cat([torch.full((len(w.stats.names), len(PARAM_STATS)), float("nan"),
                                     device=dev) if b is None else b.to(dev)
                          for w, b in zip(self._watched, blocks, strict=True)])

    def _grad_norms(self) -> dict[str, torch.Tensor]:
        """The gradient norm of each optimizer that stepped in the window, by name (without
        an optimizer: the model's, at this boundary)."""
        if not self._watched:
            gn = self._manual_stats.grad_norm
            return {"": gn} if gn is not None else {}
        return {w.name: w.stats.grad_norm for w in self._watched if w.measured}

    # -- read by the agent thread -------------------------------------------------------

    def _schema(self) -> dict[str, Any]:
        """The schema (shared: do not mutate). Built again only when it changes: the agent
        thread reads it on every report."""
        key = (self._schema_id, len(self.optimizers.param_groups))
        if self._schema_cache is None or self._schema_cache[0] != key:
            self._schema_cache = (key, self._build_schema())
        return self._schema_cache[1]

    def _build_schema(self) -> dict[str, Any]:
        c = self.config
        return {"schema_id": self._schema_id, "run_name": self.name, "layers": self._layers,
                "layer_types": [s.type_name for s in self._specs],
                "blocks": [s.name for s in self._specs if s.kind == "block"],
                "models": list(self.model.keys()) if len(self._models) > 1 else [],
                "activations": list(self.collector.activations),
                "calls": list(self.collector.calls),
                "stats": list(c.stats), "scalars": self._scalar_names(),
                "params": self._param_names() if c.param_stats else [],
                "param_stats": list(PARAM_STATS) if c.param_stats else [],
                "hist_layers": [s.name for s in self._specs if s.hist],
                "hist_edges": hist_edges(c.hist_exponents).tolist(),
                "hist_every": c.hist_every, "report_every": self.report_every,
                "head": self._head.schema() if self._head is not None else None,
                "probe": self._probe.schema() if self._probe.ready else None,
                "config": c.to_dict(), "start_time": self.start_time, "pid": os.getpid()}

    def _param_names(self) -> list[str]:
        if not self._watched:
            return self._manual_stats.names
        return [n for w in self._watched for n in w.stats.names]

    def _status(self) -> dict[str, Any]:
        t0, s0, rate = self._rate
        now, step = time.monotonic(), self._step
        if now - t0 >= 1.0:
            rate = (step - s0) / (now - t0)
            self._rate = (now, step, rate)
        state = "paused" if self.controller.paused else "running"
        return {"step": step, "state": state, "paused_at": self.controller.paused_at,
                "steps_per_s": rate}


def _mean(values: list[Any]) -> Any:
    """The mean of one step's observed values: a float, or a device tensor (not read)."""
    if len(values) == 1:
        return values[0]
    tensor = next((v for v in values if isinstance(v, torch.Tensor)), None)
    if tensor is None:
        return sum(values) / len(values)
    return torch.stack([torch.as_tensor(v, dtype=torch.float32, device=tensor.device).reshape(())
                        for v in values]).mean()


def watch(model: Models, optimizer: Optimizers = None, **kwargs: Any) -> Monitor:
    """Start monitoring: ``mon = neurotop.watch(model, opt)``; ``mon.observe(loss=loss)`` each
    step; ``mon.close()`` (or use it as a context manager). ``model``: a module, or a dict
    (or list) of them; ``optimizer``: one, a list or dict of them (the last one's step is
    the boundary), or None (call ``mon.step()``; or ``mon.attach_optimizer(opt)`` later).
    Options: ``name``, ``run_id``,
    ``bind_host``, ``config=Config(...)`` and any ``Config`` field by name
    (``report_every=5``); ``alerts=AlertRules(...)`` (or a dict of its fields) sets the
    detectors' thresholds, ``auto_pause_alerts=("dying_layer",)`` pauses on more alerts,
    ``auto_pause_timeout=S`` snapshots and stops a run nobody resumes S s after an
    auto-pause; ``scaler=`` a ``torch.amp.GradScaler``: unscaled gradient statistics,
    ``loss_scale``, ``skipped_steps``; ``head="lm_head"`` (a module or its path): its
    logits' softmax-collapse fraction, margin, entropy (``HEAD_SCALARS``, report steps only;
    ``observe(targets=y)`` adds the zero-loss fraction); ``probe_loss=fn``: the curvature
    probe's loss ``fn(model(x), y)`` on ``mon.probe_batch(x, y)`` (``probe_every=N``,
    ``features="layer"``; ``neurotop.training.curvature``); ``on_alert=fn``: ``fn(alert_dict)``
    for every alert, on the agent thread (keep it quick; what it raises is logged, never
    fatal). Under an initialized ``torch.distributed`` group of several ranks, call it on
    every rank: they join one job (one run id; commands to rank 0 land on every rank at the
    same step; ``rank_alerts=RankRules(...)`` or a dict sets the straggler and rank-divergence
    thresholds, ``neurotop.service.rank_rules``); ``distributed=False`` watches this rank
    alone."""
    return Monitor(model, optimizer, **kwargs)
