"""Knobs: what an operator may change while the run trains, and how each change lands.

Every knob is set by the training thread at an optimizer step boundary (see
``neurotop.service.controller``); the agent thread only reads them (for ``knobs`` and the
heartbeat) and validates requests. Built in:

- ``lr`` / ``lr[i]``: learning rate of every param group / group ``i``. With an LR
  scheduler given to ``watch(scheduler=...)`` the whole schedule is rescaled: the
  group's ``lr`` is set, and ``scheduler.base_lrs`` (plus ``max_lrs`` and the group's
  ``initial_lr``/``max_lr``/``min_lr`` where present) are multiplied by new/old, because
  schedulers like ``LambdaLR`` recompute the LR from ``base_lrs`` and would overwrite a
  plain edit. The value is also pinned for the next step: the step pre-hook, which runs
  after the user's ``scheduler.step()``, sets it exactly and folds whatever the scheduler
  changed in between into the rescale. So the next optimizer step uses exactly the value
  asked for, and the schedule continues from it (its shape is kept, scaled). Without a
  scheduler the value is pinned until released (``set lr release``): many scripts assign
  ``param_group["lr"]`` themselves every iteration (a hand-written cosine), which would
  undo a plain edit one step later, so the pre-hook writes the pinned value back before
  each step and counts how often the script had written over it (``Knobs.pins``, sent
  in every heartbeat).
- ``weight_decay`` / ``weight_decay[i]``: the group's ``weight_decay``, pinned like ``lr``.
- ``grad_clip``: max global grad norm, clipped by the agent in the step pre-hook with
  ``clip_grad_norm_`` (no host sync); 0 is off.
- ``dropout`` / ``dropout[GLOB]``: ``p`` of every ``nn.Dropout``-family module, or of
  those whose ``named_modules()`` path matches the glob; pinned until released by a
  forward pre-hook on the set modules (a script sets ``p`` before its forward, so the
  step pre-hook would be too late). No hook exists while nothing is pinned.
- ``l1[GLOB]``: L1 activation penalty lambda on the outputs of the modules matching the
  glob. A forward hook registers ``out.register_hook(g -> g + lambda * sign(out) / B)``
  (B = ``out.shape[0]``), which equals adding ``lambda * sum|out| / B`` to the loss
  without touching the user's loss code. 0 removes it.
- ``orthograd``, ``topk[GLOB]``, ``temperature[GLOB]``, ``reset_dead[GLOB]``: the knobs of
  METRICS.md F from the papers (``neurotop.training.research_knobs``).
- ``auto_pause``: pause on non-finite loss, gradients or activations (decided by the
  agent thread from each report; see ``neurotop.service.autopause``).
- user knobs: ``mon.knob("temperature", 1.0, min=0.1, max=10)``.

Values may be set (``op="set"``) or multiplied (``op="mul"``, float knobs only); a pinned
knob is handed back to the script with ``op="release"``.

No valid command may kill the run. Every value, a product included, is bounded: by the
knob's ``min``/``max`` (``MAXIMA`` for the built-in ones, far above any setting a run uses
and far below where a float32 or float16 step overflows), floats to what float32 holds and
ints to int64 whatever a user knob declares, dropout ``p`` below 1. A new ``lr`` or
``weight_decay`` is first dry-run on a one-element copy of its optimizer (``_dry_run``), so
a value the optimizer's step refuses is refused in the ack. And the step itself is guarded
(``Knobs._guarded_step``): if the first step of an optimizer after a change to a knob it
reads raises all the same (an optimizer that cannot be copied, a value that fails only on
the real parameters), the change is rolled back, the step is taken again with the values
it had, and the command gets a second ack, refused, with the error.
"""

from __future__ import annotations

import functools
import logging
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neurotop.protocol.commands import check_value, split_knob
from neurotop.training.hooks import Call
from neurotop.training.knob_kinds import (
    Dropout,
    GradClip,
    GroupKnob,
    Knob,
    L1Penalty,
    LearningRate,
    RolledBack,
    UserKnob,
    Value,
    _kind,
    _one_line,
    _run_first,
    _torch_optimizers,
    collapse,
)
from neurotop.training.research_knobs import research_knobs

log = logging.getLogger("neurotop.agent")


@dataclass
class _Trial:
    """A change to a knob the step reads, on trial until each optimizer in ``waiting`` (by
    ``id``) has stepped with it. ``saved``: each target's pin, override count and script
    value before (None: absent)."""

    knob: Knob
    asked: str  # the command, for the error: "lr x2"
    targets: list[str]
    olds: list[Value | None]
    saved: list[tuple[float | None, int | None, float | None]]
    waiting: set[int]
    rolled_back: RolledBack | None

    def undo(self) -> None:
        k = self.knob
        for t, old, kept in zip(self.targets, self.olds, self.saved, strict=True):
            if old is not None:
                k.put(t, old)
            for d, v in zip((k.pins, k.overridden, k.script_value), kept, strict=True):
                if v is None:
                    d.pop(t, None)
                else:
                    d[t] = v


class Knobs:
    """The knob table of one run: validation (agent thread), application (training thread)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 scheduler: Any = None, auto_pause: bool = True) -> None:
        self.optimizer = optimizer
        self._lock = threading.Lock()  # the agent thread reads while a boundary writes
        named = {n: m for n, m in model.named_modules() if n}
        dropouts = {n: m for n, m in named.items()
                    if isinstance(m, nn.modules.dropout._DropoutNd)}
        self.lr = LearningRate(optimizer, scheduler)
        self.clip = GradClip(optimizer)
        self.l1 = L1Penalty(named)
        self.auto_pause = UserKnob("auto_pause", bool(auto_pause),
                                   "pause on non-finite loss, gradients or activations")
        knobs: list[Knob] = [self.lr]
        self.wd = GroupKnob("weight_decay", optimizer, "weight decay per param group; held"
                            " until `set weight_decay release`") \
            if any("weight_decay" in g for g in optimizer.param_groups) else None
        if self.wd is not None:
            knobs.append(self.wd)
        knobs.append(self.clip)
        self.dropout = Dropout(dropouts) if dropouts else None
        if self.dropout is not None:
            knobs.append(self.dropout)
        knobs += [self.l1, self.auto_pause]
        self.research = research_knobs(model, named, optimizer)  # orthograd, topk, ...
        self.orthograd = self.research[0]
        knobs += self.research
        self._builtin = {k.name for k in knobs if not getattr(k, "yields_to_user", False)}
        self._knobs: dict[str, Knob] = {k.name: k for k in knobs}
        self._trials: list[_Trial] = []  # training thread only
        self._took: set[int] = set()  # optimizers (id) whose step was taken, this call
        self._guards: dict[int, tuple[torch.optim.Optimizer, Any, Any]] = {}
        self._guard()

    @property
    def scheduler(self) -> Any:
        return self.lr.scheduler

    @scheduler.setter
    def scheduler(self, s: Any) -> None:
        self.lr.scheduler = s

    def user(self, name: str, default: Value, *, min: float | None = None,
             max: float | None = None, doc: str = "") -> UserKnob:
        """Register (or fetch, if it exists) a user knob."""
        k = self._knobs.get(name)
        if isinstance(k, UserKnob) and k.type == _kind(default):
            return k  # the common case: the loop asks for its knob every step
        base, sel = split_knob(name)
        if sel is not None or name in self._builtin:
            raise ValueError(f"{name!r} cannot name a user knob (built in: "
                             f"{', '.join(sorted(self._builtin))})")
        with self._lock:
            k = self._knobs.get(name)
            if k is None or getattr(k, "yields_to_user", False):  # the script's own wins
                if k is not None:
                    k.close()
                k = self._knobs[name] = UserKnob(name, default, doc, min, max)
            elif not isinstance(k, UserKnob) or _kind(default) != k.type:
                raise TypeError(f"knob {name!r} exists as a {k.type}")
        return k

    # -- agent thread ---------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{**k.spec(), "value": _safe_listed(k), "targets": _safe_targets(k)}
                    for k in self._knobs.values()]

    def values(self) -> dict[str, Any]:
        with self._lock:
            return {k.name: _safe_listed(k) for k in self._knobs.values()}

    def pins(self) -> dict[str, Any]:
        """The pinned knobs: value, targets, how often the script wrote over them and what
        it last wrote (for the heartbeat; empty while nothing is pinned)."""
        with self._lock:
            return {k.name: st for k in self._knobs.values() if (st := k.pin_state())}

    def validate(self, knob: str, value: Any, op: str) -> None:
        """Raise ``ValueError`` with the reason if ``set knob value`` cannot be applied."""
        with self._lock:
            k, targets = self._resolve(knob)
            spec = k.spec()
            err = check_value(spec, value, op)
            if err:
                raise ValueError(err)
            if k.name == "lr" and any(k.get(t) is None for t in targets):
                raise ValueError("lr is a device tensor in this optimizer (capturable):"
                                 " it cannot be changed live")
            if op == "set":
                err = k.refuse(value)
                if err:
                    raise ValueError(err)
            elif op == "mul":  # the product as it stands now (checked again when applied)
                olds = [k.get(t) for t in targets]
                if None not in olds:
                    _check_news(k, spec, knob, value, op, [o * value for o in olds])

    # -- training thread ------------------------------------------------------------------

    def apply(self, knob: str, value: Any, op: str,
              rolled_back: RolledBack | None = None) -> dict[str, Any]:
        """Apply at a boundary; all targets or none. Returns the ack's old/new/applied_to
        (and ``pinned`` for knobs a script may write: whether the value is held). A change
        to a knob the step reads is on trial until its optimizers stepped with it: if that
        step raises, it is undone and ``rolled_back(error, restored)`` called."""
        with self._lock:
            k, targets = self._resolve(knob)
            spec = k.spec()
            err = check_value(spec, value, op)
            if err:
                raise ValueError(err)
            if op == "release":
                olds = [k.pins.get(t) for t in targets]
                for t in targets:
                    k.release(t)
                out = {"knob": knob, "old": collapse(olds),
                       "new": collapse([k.get(t) for t in targets]), "pinned": False}
                return {**out, "applied_to": targets} if k.selector else out
            olds = [k.get(t) for t in targets]
            if op == "mul":
                if any(o is None for o in olds):
                    raise ValueError(f"{knob} has no current value to multiply")
                news = [o * value for o in olds]
            else:
                cast = {"bool": bool, "int": int, "float": float}[spec["type"]]
                news = [cast(value)] * len(targets)
            _check_news(k, spec, knob, value, op, news)
            asked = f"{knob} {'x' if op == 'mul' else ''}{value}"
            if isinstance(k, GroupKnob):
                for t, n in zip(targets, news, strict=True):
                    err = k.dry_run(t, n)
                    if err:
                        raise ValueError(f"{asked}: {err}")
            steppers = k.stepped_by(targets)
            saved = [(k.pins.get(t), k.overridden.get(t), k.script_value.get(t))
                     for t in targets]
            for t, n in zip(targets, news, strict=True):
                k.put(t, n)
            if steppers:
                self._trials.append(_Trial(k, asked, targets, olds, saved,
                                           {id(o) for o in steppers}, rolled_back))
        out = {"knob": knob, "old": collapse(olds), "new": collapse(news)}
        if k.pinnable:
            out["pinned"] = k.holds() and all(t in k.pins for t in targets)
        if k.selector:
            out["applied_to"] = targets
        if hasattr(k, "outcome"):  # an action (reset_dead): what it did, for the ack
            out.update(k.outcome())
        return out

    def optimizers_changed(self) -> None:
        """After ``Monitor.attach_optimizer``: guard its step, offer ``weight_decay`` once a
        group has it."""
        self._guard()
        with self._lock:
            if self.wd is None and any("weight_decay" in g
                                       for g in self.optimizer.param_groups):
                self.wd = GroupKnob("weight_decay", self.optimizer, "weight decay per param"
                                    " group; held until `set weight_decay release`")
                self._knobs["weight_decay"] = self.wd
                self._builtin.add("weight_decay")

    def pre_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """In the optimizer's step pre-hook: hold pinned LR and weight decay, clip (the
        gradients of ``optimizer``, the one about to step)."""
        self.lr.at_pre_step()
        if self.wd is not None:
            self.wd.at_pre_step()
        self.orthograd.at_pre_step(optimizer)  # an optimizer attached since it was set
        self.clip.at_pre_step(optimizer)

    def close(self) -> None:
        self.l1.close()
        for k in self.research:
            k.close()
        if self.dropout is not None:
            self.dropout.close()
        self._trials.clear()
        for opt, method, handle in self._guards.values():
            handle.remove()
            if opt.__dict__.get("step") is method:  # else a scheduler wrapped it since: it
                del opt.step  # stays, and calls straight through with no trial pending
        self._guards.clear()

    def _guard(self) -> None:
        """Wrap ``step`` of each optimizer not wrapped yet (an instance attribute: copies
        and pickles of an optimizer keep only its state), and hook, first of its post-hooks,
        the mark that its step was taken."""
        for opt in _torch_optimizers(self.optimizer):
            if id(opt) in self._guards:
                continue
            opt.step = types.MethodType(self._wrap(opt.step), opt)
            handle = opt.register_step_post_hook(Call(lambda o, a, k: self._took.add(id(o))))
            _run_first(handle)
            self._guards[id(opt)] = (opt, opt.step, handle)

    def _wrap(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            return self._guarded_step(opt, inner, args, kwargs)
        # keeps what an LR scheduler marked on the step it wrapped, so it does not warn
        return functools.update_wrapper(step, inner)

    def _guarded_step(self, opt: torch.optim.Optimizer, inner: Callable[..., Any],
                      args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``opt.step()``. The first after a change to a knob it reads is a trial: if it
        raises before its post-hooks ran (so no step was taken), the changes are rolled
        back and the step is taken again with the values it had. What raises after the
        step was taken (a stop, another hook) is no trial's doing and goes on up. The retry
        may count twice what the failed step had done before it raised (Adam: one update
        of its moments), a small price against the run."""
        if not self._trials:  # the common case: nothing on trial, straight through
            return inner(*args, **kwargs)
        key = id(opt)
        trials = [t for t in self._trials if key in t.waiting]
        if not trials:
            return inner(*args, **kwargs)
        self._took.discard(key)
        try:
            return inner(*args, **kwargs)
        except Exception as e:
            if key in self._took:
                raise
            error = e
        finally:
            if key in self._took:
                for t in trials:
                    t.waiting.discard(key)
                self._trials = [t for t in self._trials if t.waiting]
        self._roll_back(opt, trials, error)
        return inner(*args, **kwargs)

    def _roll_back(self, opt: torch.optim.Optimizer, trials: list[_Trial],
                   error: Exception) -> None:
        with self._lock:
            for t in reversed(trials):  # the latest first: back to the values before all
                self._trials.remove(t)
                t.undo()
        for t in trials:
            restored = collapse(t.olds)
            msg = (f"{t.asked} rolled back to {restored}: {type(opt).__name__}.step() raised"
                   f" {_one_line(error)}")
            log.warning("neurotop %s", msg)
            if t.rolled_back is not None:
                t.rolled_back(msg, restored)

    def _resolve(self, knob: str) -> tuple[Knob, list[str]]:
        base, sel = split_knob(knob)
        k = self._knobs.get(base)
        if k is None:
            raise ValueError(f"unknown knob {base!r}; known: {', '.join(self._knobs)}")
        return k, k.targets(sel)


def _check_news(k: Knob, spec: dict[str, Any], knob: str, value: Any, op: str,
                news: list[Any]) -> None:
    """Refuse new values out of the knob's bounds (``ValueError``, naming the command)."""
    for n in news:
        err = check_value(spec, n) or k.refuse(n)
        if err:
            raise ValueError(f"{knob} {'x' if op == 'mul' else ''}{value}: {err}")


def _safe_listed(k: Knob) -> Any:
    """A knob's value for the agent thread: None rather than an exception if some odd
    object sits where a number should be (the heartbeat must keep going)."""
    try:
        return k.listed()
    except Exception:
        return None


def _safe_targets(k: Knob) -> list[str]:
    try:
        return k.targets(None)
    except ValueError:
        return []
