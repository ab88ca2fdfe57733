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

import fnmatch
import functools
import logging
import threading
import types
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neurotop.protocol.commands import check_value, split_knob
from neurotop.training.hooks import Call

log = logging.getLogger("neurotop.agent")

Value = bool | int | float
#: Rolled back: ``(error, the values restored)``; the controller acks the command again.
RolledBack = Callable[[str, Any], None]
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
#: The largest value of each built-in knob (README, "Knobs"). An LR of 1e3 is 30 times the
#: largest in common use (linear probes at 30) and, divided by Adam's first bias correction
#: (0.1), still fits float16.
MAXIMA = {"lr": 1e3, "weight_decay": 1e2, "grad_clip": 1e6, "l1": 1e3}
_SCHEDULE_ATTRS = ("base_lrs", "max_lrs")  # scheduler lists indexed by param group
_SCHEDULE_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr")  # OneCycleLR & co. keep these


class Knob:
    """One named knob. Targets are what a selector picks (param groups, modules).

    A ``pinnable`` knob is one the training script may write itself; what an operator
    sets is held (``pins``) against it until released, and each write over it is counted.
    """

    type = "float"
    selector: str | None = None  # "group", "glob" or None
    pinnable = False

    def __init__(self, name: str, doc: str, min: float | None = None,
                 max: float | None = None) -> None:
        self.name, self.doc, self.min, self.max = name, doc, min, max
        self.pins: dict[str, float] = {}  # target -> the value the operator set
        self.overridden: dict[str, int] = {}  # target -> writes by the script undone
        self.script_value: dict[str, float] = {}  # target -> what the script last wrote

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "min": self.min, "max": self.max,
                "selector": self.selector, "doc": self.doc, "pinnable": self.pinnable}

    def targets(self, sel: str | None) -> list[str]:
        if sel is not None:
            raise ValueError(f"{self.name} takes no selector, got {self.name}[{sel}]")
        return [""]

    def get(self, target: str) -> Value | None:
        raise NotImplementedError

    def put(self, target: str, value: Value) -> None:
        raise NotImplementedError

    def refuse(self, value: Value) -> str | None:
        """Why ``value`` (already within ``spec()``, see ``check_value``) cannot be used:
        a float float32 cannot hold, an int beyond int64, whatever the bounds declared."""
        if self.type == "float" and abs(value) > FLOAT32_MAX:
            return f"{self.name} must fit float32 (|value| <= {FLOAT32_MAX:.4g}), got {value!r}"
        if self.type == "int" and not INT64_MIN <= value <= INT64_MAX:
            return f"{self.name} must fit int64, got {value!r}"
        return None

    def stepped_by(self, targets: list[str]) -> list[torch.optim.Optimizer]:
        """The optimizers whose ``step()`` reads this knob at ``targets`` (their first step
        after a change is guarded); none for a knob read outside the step."""
        return []

    def listed(self) -> Any:
        """The value ``knobs`` lists: one value, or a list when the targets differ. A
        pinned target lists its pin: what every step uses, though the script may have
        written another value since the last step."""
        pins = dict(self.pins) if self.holds() else {}
        return collapse([pins[t] if t in pins else self.get(t) for t in self.targets(None)])

    def release(self, target: str) -> None:
        """Hand ``target`` back to the script: its next write stands."""
        self.pins.pop(target, None)
        self.overridden.pop(target, None)
        self.script_value.pop(target, None)

    def holds(self) -> bool:
        """Whether a value set stays pinned until released."""
        return self.pinnable

    def pin_state(self) -> dict[str, Any] | None:
        """What the heartbeat says of this knob's pins, or None when nothing is pinned.
        Read by the agent thread: copies first (each ``dict()`` is atomic under the GIL)."""
        pins, over, script = dict(self.pins), dict(self.overridden), dict(self.script_value)
        if not pins or not self.holds():
            return None
        return {"value": collapse(list(pins.values())), "targets": list(pins),
                "overridden": sum(over.values()),
                "script": collapse(list(script.values())) if script else None}

    def _held(self, target: str, script: float) -> None:
        """The script had written ``script`` over the pinned value, now restored."""
        self.overridden[target] = self.overridden.get(target, 0) + 1
        self.script_value[target] = script


class UserKnob(Knob):
    """A value the training loop reads (``.value``, or ``float(k)``); it changes only at
    optimizer step boundaries, so it is constant for the whole of a step."""

    def __init__(self, name: str, default: Value, doc: str = "", min: float | None = None,
                 max: float | None = None) -> None:
        kind = _kind(default)
        if kind is None:
            raise TypeError(f"knob {name!r}: default must be bool, int or float, got"
                            f" {type(default).__name__}")
        super().__init__(name, doc, min, max)
        self.type = kind
        err = check_value(self.spec(), default) or self.refuse(default)
        if err:
            raise ValueError(f"knob default: {err}")
        self.value_ = default

    @property
    def value(self) -> Value:
        return self.value_

    def get(self, target: str) -> Value:
        return self.value_

    def put(self, target: str, value: Value) -> None:
        self.value_ = bool(value) if self.type == "bool" else value

    def __float__(self) -> float:
        return float(self.value_)

    def __int__(self) -> int:
        return int(self.value_)

    def __bool__(self) -> bool:
        return bool(self.value_)

    def __repr__(self) -> str:
        return f"UserKnob({self.name}={self.value_!r})"


class GroupKnob(Knob):
    """A hyperparameter of each optimizer param group (``lr``, ``weight_decay``); pinned
    against the script by the step pre-hook (``at_pre_step``)."""

    selector = "group"
    pinnable = True

    def __init__(self, name: str, optimizer: torch.optim.Optimizer, doc: str) -> None:
        super().__init__(name, doc, min=0.0, max=MAXIMA[name])
        self.optimizer = optimizer

    def targets(self, sel: str | None) -> list[str]:
        n = len(self.optimizer.param_groups)
        if not n:
            raise ValueError(f"{self.name}: the run has no optimizer (watch(model, optimizer)"
                             " or mon.attach_optimizer(optimizer))")
        if sel is None:
            return [str(i) for i in range(n)]
        # several optimizers (neurotop.training.optimizers.OptimizerSet): lr[NAME]
        names = getattr(self.optimizer, "group_names", None) or []
        if sel in names:
            return [str(i) for i, name in enumerate(names) if name == sel]
        if not sel.isdigit() or int(sel) >= n:
            raise ValueError(f"{self.name}[{sel}]: the optimizer has {n} param group(s),"
                             f" select one of 0..{n - 1}")
        return [str(int(sel))]

    def get(self, target: str) -> float | None:
        v = self.optimizer.param_groups[int(target)].get(self.name)
        if isinstance(v, torch.Tensor):
            return float(v) if v.device.type == "cpu" else None  # never sync a device here
        return None if v is None else float(v)  # plain floats go on the wire (not numpy's)

    def put(self, target: str, value: Value) -> None:
        self.write(target, value)
        self.pins[target] = float(value)

    def stepped_by(self, targets: list[str]) -> list[torch.optim.Optimizer]:
        owners = [_owner(self.optimizer, int(t)) for t in targets]
        return list({id(o): o for o in owners}.values())

    def dry_run(self, target: str, value: float) -> str | None:
        """Why the optimizer of group ``target`` cannot step with ``value`` (``_dry_run``)."""
        opt = _owner(self.optimizer, int(target))
        return _dry_run(opt, self.optimizer.param_groups[int(target)], self.name, value)

    def write(self, target: str, value: Value) -> None:
        g = self.optimizer.param_groups[int(target)]
        if isinstance(g.get(self.name), torch.Tensor):
            g[self.name].fill_(value)
        else:
            g[self.name] = float(value)

    def at_pre_step(self) -> None:
        """In the step pre-hook: write the pinned values back where the script changed them."""
        if not self.pins:
            return
        for t, v in list(self.pins.items()):
            cur = self.get(t)
            if cur is not None and cur != v:
                self.write(t, v)
                self._held(t, cur)


class LearningRate(GroupKnob):
    """``lr``: with a scheduler, rescales its schedule and pins the value for the next step;
    without one, pins it until released."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> None:
        super().__init__("lr", optimizer, "learning rate per param group; with a scheduler the"
                         " schedule is rescaled and continues from the new value, without"
                         " one it is held until `set lr release`")
        self.scheduler = scheduler

    def holds(self) -> bool:
        return self.scheduler is None  # else the schedule carries the value on, rescaled

    def put(self, target: str, value: Value) -> None:
        old = self.get(target)
        super().put(target, value)
        if old:
            self._rescale(int(target), float(value) / old)

    def at_pre_step(self) -> None:
        """In the step pre-hook. With a scheduler: undo what it did to a just-set LR, once,
        folding its change into the rescale (the schedule then carries the value on).
        Without one: hold the pins against the script (``GroupKnob.at_pre_step``)."""
        if not self.pins:
            return
        if self.scheduler is None:
            super().at_pre_step()
            return
        pins, self.pins = self.pins, {}
        for t, v in pins.items():
            cur = self.get(t)
            if cur is not None and cur != v:
                self.write(t, v)
                if cur:
                    self._rescale(int(t), v / cur)

    def _rescale(self, i: int, r: float) -> None:
        if r == 1.0 or self.scheduler is None:
            return
        for attr in _SCHEDULE_ATTRS:
            lst = getattr(self.scheduler, attr, None)
            if isinstance(lst, list) and i < len(lst) and isinstance(lst[i], (int, float)):
                lst[i] = lst[i] * r
        g = self.optimizer.param_groups[i]
        for k in _SCHEDULE_GROUP_KEYS:
            if isinstance(g.get(k), (int, float)) and not isinstance(g.get(k), bool):
                g[k] = g[k] * r


class GradClip(Knob):
    """``grad_clip``: max global grad norm; the agent clips in the step pre-hook."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__("grad_clip", "clip the global grad norm to this before each step"
                         " (0: off)", min=0.0, max=MAXIMA["grad_clip"])
        self.optimizer = optimizer
        self.max_norm = 0.0

    def get(self, target: str) -> float:
        return self.max_norm

    def put(self, target: str, value: Value) -> None:
        self.max_norm = float(value)

    def stepped_by(self, targets: list[str]) -> list[torch.optim.Optimizer]:
        return _torch_optimizers(self.optimizer)  # clipped in each one's step pre-hook

    def at_pre_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Clip the gradients ``optimizer`` (default: every optimizer of the run) steps with:
        with several, each one's own, before its own step."""
        if self.max_norm > 0:
            params = [p for g in (optimizer or self.optimizer).param_groups for p in g["params"]
                      if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, self.max_norm)


class ModuleKnob(Knob):
    """A knob whose targets are modules picked by a glob over ``named_modules()`` paths."""

    selector = "glob"

    def __init__(self, name: str, doc: str, modules: dict[str, nn.Module], *,
                 need_glob: bool, min: float | None = None, max: float | None = None) -> None:
        super().__init__(name, doc, min, max)
        self.modules, self.need_glob = modules, need_glob
        self._handles: dict[str, Any] = {}  # target -> the hook this knob keeps on it

    def _hook(self, target: str, register: Callable[[Call], Any], fn: Callable) -> None:
        """Keep ``fn`` hooked on ``target`` (once; inert in a copy of the model)."""
        if target not in self._handles:
            self._handles[target] = register(Call(fn))

    def _unhook(self, target: str) -> None:
        h = self._handles.pop(target, None)
        if h is not None:
            h.remove()

    def close(self) -> None:
        for target in list(self._handles):
            self._unhook(target)

    def targets(self, sel: str | None) -> list[str]:
        if sel is None:
            if self.need_glob:
                raise ValueError(f"{self.name} needs a layer glob: {self.name}[GLOB],"
                                 f" e.g. {self.name}[{next(iter(self.modules), '*')}]")
            return list(self.modules)
        hits = [n for n in self.modules if fnmatch.fnmatchcase(n, sel)]
        if not hits:
            some = ", ".join(list(self.modules)[:8]) + (" ..." if len(self.modules) > 8 else "")
            raise ValueError(f"{self.name}[{sel}] matches no module; candidates: {some}")
        return hits


class Dropout(ModuleKnob):
    """``dropout``: ``p`` of the matched modules, pinned until released by a forward
    pre-hook on each (only while pinned)."""

    pinnable = True

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__("dropout", "p of every nn.Dropout, or of those matching [GLOB];"
                         " held until `set dropout release`", modules, need_glob=False,
                         min=0.0, max=1.0)

    def get(self, target: str) -> float:
        return float(self.modules[target].p)

    def refuse(self, value: Value) -> str | None:
        if value >= 1:
            return f"dropout must be < 1 (p = 1 drops every activation), got {value!r}"
        return super().refuse(value)

    def put(self, target: str, value: Value) -> None:
        self.modules[target].p = self.pins[target] = float(value)
        self._hook(target, self.modules[target].register_forward_pre_hook, self._hold(target))

    def release(self, target: str) -> None:
        super().release(target)
        self._unhook(target)

    def _hold(self, target: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            v = self.pins.get(target)
            if v is not None and module.p != v:
                self._held(target, float(module.p))
                module.p = v
        return hook


class L1Penalty(ModuleKnob):
    """``l1[GLOB]``: adds lambda * sign(a) / B to the gradient of the matched outputs."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__("l1", "L1 activation penalty lambda on the outputs of the modules"
                         " matching [GLOB] (0: off)", modules, need_glob=True, min=0.0,
                         max=MAXIMA["l1"])
        self.lams: dict[str, float] = {}

    def get(self, target: str) -> float:
        return self.lams.get(target, 0.0)

    def listed(self) -> dict[str, float]:
        return dict(self.lams)

    def put(self, target: str, value: Value) -> None:
        if value:
            self.lams[target] = float(value)
            self._hook(target, self.modules[target].register_forward_hook,
                       self._penalty(target))
        else:
            self.lams.pop(target, None)
            self._unhook(target)

    def _penalty(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            a = _output_tensor(out)
            lam = self.lams.get(name, 0.0)
            if a is None or not lam or not a.requires_grad or not torch.is_grad_enabled():
                return
            # sign taken now (int8: a quarter of the memory), so a later in-place op on the
            # output cannot change it before backward.
            sign = a.detach().sign().to(torch.int8)
            scale = lam / (a.shape[0] if a.dim() else 1)
            a.register_hook(lambda g: g + scale * sign)
        return hook


def _output_tensor(out: Any) -> torch.Tensor | None:
    """The activation a module produced: its output, or the first tensor of a tuple/list."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((o for o in out if isinstance(o, torch.Tensor)), None)
    return None


def _torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers behind the knobs' optimizer (one, or an ``OptimizerSet``)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return [o for _, o in optimizer.named]


def _owner(optimizer: Any, i: int) -> torch.optim.Optimizer:
    """The torch optimizer that owns param group ``i`` of the knobs' list."""
    for o in _torch_optimizers(optimizer):
        if i < len(o.param_groups):
            return o
        i -= len(o.param_groups)
    raise IndexError(f"no param group {i}")


def _dry_run(opt: torch.optim.Optimizer, group: dict[str, Any], name: str,
             value: float) -> str | None:
    """Why ``opt.step()`` raises with ``group[name] = value``, found by stepping a copy of
    ``opt`` (its class, the group's hyperparameters) over one element of the group's dtype
    and device, once as the group is, then with ``value``: the cost of a scalar. None when
    it steps, or when no copy steps as the group is (a constructor or a ``step`` that takes
    more, like LBFGS's closure): the guarded step is then the only safeguard."""
    first = next(iter(group["params"]), None)
    if first is None:
        return None
    try:
        p = torch.zeros(1, dtype=first.dtype, device=first.device, requires_grad=True)
        copy = type(opt)([p], **opt.defaults)
        copy.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
        p.grad = torch.ones_like(p)
        copy.step()
    except Exception as e:  # not this optimizer's value: it cannot be dry-run at all
        log.debug("no dry run of %s.step(): %r", type(opt).__name__, e)
        return None
    copy.param_groups[0][name] = value
    try:
        copy.step()
    except Exception as e:  # what the real step would raise with the value
        return f"{type(opt).__name__}.step() raises with it: {_one_line(e)}"
    return None


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _run_first(handle: Any) -> None:
    """Move a just-registered step post-hook before the others (the monitor's, whose step
    boundary applies the next commands)."""
    hooks = handle.hooks_dict_ref()
    if isinstance(hooks, OrderedDict):
        hooks.move_to_end(handle.id, last=False)


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


def collapse(values: list[Any]) -> Any:
    """One value when every target agrees, else the list (one entry per target)."""
    if values and all(v == values[0] for v in values):
        return values[0]
    return values


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
        from neurotop.training.research_knobs import research_knobs  # they import this
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


def _kind(v: Any) -> str | None:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    return "float" if isinstance(v, float) else None


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
