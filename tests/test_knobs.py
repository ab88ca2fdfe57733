"""Knob mechanics in one process: the L1 hook is the L1 loss term, LR edits survive schedulers,
parsing and validation give the reasons the UI and CLI show."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neurotop.protocol.commands import check_args, check_value, parse_value, split_knob
from neurotop.training.knobs import Knobs
from neurotop.tui.cli import ctl_args


def test_l1_hook_gradient_equals_adding_the_penalty_to_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y, lam = torch.randn(32, 8), torch.randint(0, 3, (32,)), 0.05

    def grads(with_hook: bool) -> list[torch.Tensor]:
        model.zero_grad()
        out = {}
        h = model[1].register_forward_hook(lambda m, i, o: out.__setitem__("a", o))
        loss = nn.functional.cross_entropy(model(x), y)
        h.remove()
        if not with_hook:
            loss = loss + lam * out["a"].abs().sum() / x.shape[0]
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    reference = grads(with_hook=False)
    knobs = Knobs(model, torch.optim.SGD(model.parameters(), lr=0.1))
    knobs.apply("l1[1]", lam, "set")
    for got, want in zip(grads(with_hook=True), reference, strict=True):
        torch.testing.assert_close(got, want)
    knobs.apply("l1[1]", 0.0, "set")  # 0 removes the hook
    plain = grads(with_hook=True)
    assert not torch.allclose(plain[0], reference[0])


@pytest.mark.parametrize("make_scheduler, factor", [
    (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9 ** e), 0.9),
    (lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8), 0.8),
])
def test_lr_set_under_a_scheduler_is_used_next_step_and_the_schedule_continues(
        make_scheduler, factor):
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = make_scheduler(opt)
    knobs = Knobs(model, opt, scheduler=sched)
    opt.register_step_pre_hook(lambda o, a, k: knobs.pre_step())  # as the monitor does
    used: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
    for step in range(1, 9):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        if step == 4:  # the boundary after step 4: what the post-step hook would do
            knobs.apply("lr", 0.5, "set")
        sched.step()
    assert used[:4] == pytest.approx([factor ** i for i in range(4)])
    assert used[4] == 0.5, "the step after the boundary must use exactly the value set"
    assert used[5:] == pytest.approx([0.5 * factor ** i for i in range(1, 4)])


def test_lr_without_the_scheduler_is_overwritten_by_lambdalr():
    """Why ``watch(scheduler=...)`` matters: LambdaLR recomputes from base_lrs."""
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.param_groups[0]["lr"] = 0.5
    sched.step()
    assert opt.param_groups[0]["lr"] == 1.0


def test_grad_clip_and_user_knobs():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    knobs = Knobs(model, opt)
    (model(torch.randn(8, 4)) * 100).sum().backward()
    knobs.apply("grad_clip", 0.5, "set")
    knobs.pre_step()
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert float(norm) == pytest.approx(0.5, rel=1e-4)

    t = knobs.user("temperature", 1.0, min=0.1, max=10.0)
    assert knobs.user("temperature", 1.0) is t and float(t) == 1.0
    assert knobs.apply("temperature", 2, "mul") == {"knob": "temperature", "old": 1.0,
                                                     "new": 2.0}
    assert t.value == 2.0
    with pytest.raises(ValueError, match="temperature x20: temperature must be <= 10.0"):
        knobs.apply("temperature", 20, "mul")
    assert t.value == 2.0
    with pytest.raises(TypeError, match="exists as a float"):
        knobs.user("temperature", 3)
    with pytest.raises(ValueError, match="cannot name a user knob"):
        knobs.user("lr", 0.1)
    with pytest.raises(ValueError, match="knob default: k must be >= 1"):
        knobs.user("k", 0, min=1)


@pytest.mark.parametrize("text, parsed", [
    ("0.01", (0.01, "set")), ("3", (3, "set")), ("x0.5", (0.5, "mul")), ("*2", (2, "mul")),
    ("off", (False, "set")), ("True", (True, "set")), ("1e-3", (1e-3, "set")),
    ("release", (None, "release")), (" Unpin", (None, "release")),
])
def test_parse_value(text, parsed):
    assert parse_value(text) == parsed


@pytest.mark.parametrize("spec, value, op, reason", [
    ({"name": "lr", "type": "float", "min": 0.0}, -1, "set", "lr must be >= 0.0, got -1"),
    ({"name": "lr", "type": "float"}, math.inf, "set", "lr must be a finite number"),
    ({"name": "lr", "type": "float"}, "a", "set", "lr takes a number (float), got str"),
    ({"name": "n", "type": "int"}, 2.5, "set", "n takes an integer"),
    ({"name": "n", "type": "int"}, 2, "mul", "n is int: it cannot be multiplied"),
    ({"name": "b", "type": "bool"}, 0.5, "set", "b takes true or false"),
    ({"name": "lr", "type": "float"}, -2.0, "mul", "a factor must be finite and > 0"),
    ({"name": "lr", "type": "float"}, 1.0, "pow", "op must be one of set, mul"),
    ({"name": "grad_clip", "type": "float"}, None, "release", "grad_clip is never pinned"),
    ({"name": "lr", "type": "float", "pinnable": True}, 1.0, "release", "takes no value"),
])
def test_check_value_reasons(spec, value, op, reason):
    assert reason in check_value(spec, value, op)


def test_command_args_and_knob_names():
    assert check_args("step", {"n": 3}) is None
    assert "unknown command 'jump'" in check_args("jump", {})
    assert "step: n must be int, got bool" in check_args("step", {"n": True})
    assert "set needs knob, value" in check_args("set", {})
    assert "set needs value" in check_args("set", {"knob": "lr"})
    assert check_args("set", {"knob": "lr", "op": "release"}) is None  # takes no value
    assert ctl_args("set", ["lr", "release"]) == {"knob": "lr", "op": "release"}
    assert ctl_args("set", ["lr", "x0.5"]) == {"knob": "lr", "value": 0.5, "op": "mul"}
    assert split_knob("dropout[enc.*]") == ("dropout", "enc.*")
    with pytest.raises(ValueError, match="bad knob name"):
        split_knob("lr]")


def test_a_pin_holds_against_the_script_until_released():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    knobs = Knobs(model, opt)
    assert knobs.apply("lr", 0.5, "set")["pinned"] is True
    opt.param_groups[0]["lr"] = 0.9  # the script's own schedule
    assert knobs.values()["lr"] == 0.5, "the listing shows what the steps use"
    knobs.pre_step()
    assert opt.param_groups[0]["lr"] == 0.5
    assert knobs.pins() == {"lr": {"value": 0.5, "targets": ["0"], "overridden": 1,
                                   "script": 0.9}}
    out = knobs.apply("lr", None, "release")
    assert out["old"] == 0.5 and out["pinned"] is False and knobs.pins() == {}
    opt.param_groups[0]["lr"] = 0.9
    knobs.pre_step()
    assert opt.param_groups[0]["lr"] == 0.9

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    with_sched = Knobs(model, opt, scheduler=sched)
    assert with_sched.apply("lr", 0.3, "set")["pinned"] is False  # the schedule carries it
    assert with_sched.pins() == {}
