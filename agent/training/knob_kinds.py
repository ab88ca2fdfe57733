"""The kinds of knob (``neurotop.training.knobs`` has the table that holds them and what
each built-in one does): a knob's bounds and targets (``Knob``), a script's own
(``UserKnob``), per param group and pinned (``GroupKnob``, ``LearningRate``), the agent's
clipping (``GradClip``), and those held by module hooks (``ModuleKnob``: ``Dropout``,
``L1Penalty``; the research knobs build on it), with the helpers they share.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from neurotop.protocol.commands import check_value
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


def collapse(values: list[Any]) -> Any:
    """One value when every target agrees, else the list (one entry per target)."""
    if values and all(v == values[0] for v in values):
        return values[0]
    return values


def _kind(v: Any) -> str | None:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    return "float" if isinstance(v, float) else None
