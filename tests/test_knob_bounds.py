"""No valid command kills the run: every knob is bounded (products included) by what the
optimizer can take, a value the optimizer's step refuses is refused in the ack, and a change
that makes the real step raise anyway is rolled back, acked with the error, and training
goes on."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import neurotop
from neurotop.service.controller import Pending
from neurotop.training.knob_kinds import FLOAT32_MAX, MAXIMA
from neurotop.training.knobs import Knobs
from neurotop.tui.data.client import Endpoints, LiveClient
from tests.helpers.cli import neurotop as neurotop_cli
from tests.helpers.package import ROOT
from tests.helpers.training import steps_logged
from tests.helpers.waiting import wait_until

#: A loop whose optimizer's step raises on an LR above 0.5 and that no dry run can copy.
PICKY = ROOT / "tests" / "scripts" / "picky_train.py"


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 1))


def knobs(opt_cls: type[torch.optim.Optimizer] = torch.optim.Adam, **kw: float) -> Knobs:
    m = model()
    k = Knobs(m, opt_cls(m.parameters(), lr=1e-3, weight_decay=1e-4, **kw))
    k.user("temperature", 1.0, min=0.1, max=10.0)
    k.user("free", 1.0)  # no bounds declared: float32's
    k.user("count", 3)
    return k


def refusal(k: Knobs, knob: str, value: object, op: str = "set") -> str:
    """The reason both the agent thread (``validate``) and the boundary (``apply``) give."""
    with pytest.raises(ValueError) as at_agent:
        k.validate(knob, value, op)
    with pytest.raises(ValueError) as at_boundary:
        k.apply(knob, value, op)
    return f"{at_agent.value} | {at_boundary.value}"


@pytest.mark.parametrize("knob, value, op, reason", [
    ("lr", 1e308, "set", "lr must be <= 1000.0, got 1e+308"),
    ("lr", 4e38, "set", "lr must be <= 1000.0, got 4e+38"),
    ("lr", 1000.5, "set", "lr must be <= 1000.0"),
    ("lr", 2 ** 64 - 1, "mul", "lr x18446744073709551615: lr must be <= 1000.0"),
    ("lr", 1e308, "mul", "lr x1e+308: lr must be <= 1000.0"),
    ("lr", 1e300, "mul", "lr x1e+300: lr must be <= 1000.0"),
    ("weight_decay", 101, "set", "weight_decay must be <= 100.0"),
    ("weight_decay", 1e7, "mul", "weight_decay x10000000.0: weight_decay must be <= 100.0"),
    ("grad_clip", 1e7, "set", "grad_clip must be <= 1000000.0"),
    ("l1[0]", 1e4, "set", "l1 must be <= 1000.0"),
    ("dropout", 1.0, "set", "dropout must be < 1 (p = 1 drops every activation), got 1.0"),
    ("dropout", 1, "set", "dropout must be < 1"),
    ("dropout", 20.0, "mul", "dropout x20.0: dropout must be <= 1.0"),
    ("temperature", 10.5, "set", "temperature must be <= 10.0"),
    ("temperature", 1e3, "mul", "temperature x1000.0: temperature must be <= 10.0"),
    ("free", 4e38, "set", "free must fit float32 (|value| <= 3.403e+38), got 4e+38"),
    ("free", -4e38, "set", "free must fit float32"),
    ("free", 1e39, "mul", "free x1e+39: free must fit float32"),
    ("count", 2 ** 63, "set", "count must fit int64, got 9223372036854775808"),
])
def test_each_knob_refuses_values_beyond_its_bound_before_and_at_the_boundary(
        knob, value, op, reason):
    k = knobs()
    before = k.values()
    got = refusal(k, knob, value, op)
    assert got.count(reason) == 2, got
    assert k.values() == before, "a refused value changed a knob"


@pytest.mark.parametrize("knob, value", [
    ("lr", MAXIMA["lr"]), ("lr", 0.0), ("weight_decay", MAXIMA["weight_decay"]),
    ("grad_clip", MAXIMA["grad_clip"]), ("l1[0]", MAXIMA["l1"]), ("dropout", 0.99),
    ("temperature", 10.0), ("free", FLOAT32_MAX), ("free", -1e38), ("count", 2 ** 63 - 1),
])
def test_each_knob_takes_its_bound(knob, value):
    k = knobs()
    k.validate(knob, value, "set")
    assert k.apply(knob, value, "set")["new"] == value


def test_a_user_knob_cannot_start_beyond_what_it_could_be_set_to():
    k = knobs()
    with pytest.raises(ValueError, match=r"knob default: big must fit float32"):
        k.user("big", 1e39)
    with pytest.raises(ValueError, match=r"knob default: huge must fit int64"):
        k.user("huge", 2 ** 64)


def test_a_product_is_bounded_by_the_current_value_times_the_factor():
    k = knobs()
    k.validate("lr", 1e6, "mul")  # 1e-3 * 1e6 = 1e3: the maximum itself
    assert k.apply("lr", 1e6, "mul")["new"] == pytest.approx(MAXIMA["lr"])
    assert "lr must be <= 1000.0" in refusal(k, "lr", 1.01, "mul")


@pytest.mark.parametrize("opt_cls, kw", [
    (torch.optim.SGD, {"momentum": 0.9}), (torch.optim.Adam, {}), (torch.optim.AdamW, {}),
    (torch.optim.RMSprop, {}), (torch.optim.Adagrad, {}), (torch.optim.NAdam, {}),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_maxima_are_steps_the_optimizers_take(opt_cls, kw, dtype):
    """The bounds come from what the optimizer can take: the first steps (Adam divides the
    LR by a bias correction of 0.1) at the largest LR and weight decay stay finite."""
    p = torch.ones(8, dtype=dtype, requires_grad=True)
    opt = opt_cls([p], lr=MAXIMA["lr"], weight_decay=MAXIMA["weight_decay"], **kw)
    for _ in range(2):
        p.grad = torch.full_like(p, 1e-3)
        opt.step()


class Picky(torch.optim.Optimizer):
    """Plain SGD whose step refuses a learning rate above 0.5; ``used``: the LR of each
    step it took. (Not an ``SGD`` subclass calling ``super().step()``: torch would run the
    step hooks twice.)"""

    def __init__(self, params, lr: float) -> None:  # noqa: ANN001
        super().__init__(params, {"lr": lr})
        self.used: list[float] = []

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        for g in self.param_groups:
            if g["lr"] > 0.5:
                raise RuntimeError(f"lr {g['lr']} is more than this optimizer takes")
        self.used.append(self.param_groups[0]["lr"])
        for g in self.param_groups:
            for q in g["params"]:
                if q.grad is not None:
                    q.add_(q.grad, alpha=-g["lr"])


class PickyWithModel(Picky):
    """The same, built from more than its parameters (as many custom optimizers are), so no
    copy of it can be dry-run: only the guarded step stands between its refusal and the run."""

    def __init__(self, params, model: nn.Module, lr: float) -> None:  # noqa: ANN001
        self.model = model
        super().__init__(params, lr=lr)


def test_a_value_the_step_refuses_is_refused_in_the_ack_by_a_dry_run():
    m = model()
    k = Knobs(m, Picky(m.parameters(), lr=0.1))
    k.validate("lr", 0.7, "set")  # within the bounds: only the optimizer knows
    with pytest.raises(ValueError, match=r"lr 0\.7: Picky\.step\(\) raises with it: "
                                         r"RuntimeError: lr 0\.7 is more than this"):
        k.apply("lr", 0.7, "set")
    with pytest.raises(ValueError, match=r"lr x8: Picky\.step\(\) raises"):
        k.apply("lr", 8, "mul")
    assert k.values()["lr"] == 0.1 and not k.lr.pins, "a refused value was kept"
    assert k.apply("lr", 0.4, "set")["new"] == 0.4


def train(m: nn.Module, opt: torch.optim.Optimizer, steps: int,
          sched: torch.optim.lr_scheduler.LRScheduler | None = None) -> list[float]:
    """``steps`` optimizer steps; the losses (finite, or the test fails)."""
    losses = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = m(torch.randn(16, 4, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    return losses


def test_a_change_that_makes_the_real_step_raise_is_rolled_back_and_training_goes_on():
    m = model()
    opt = PickyWithModel(m.parameters(), m, lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1000)  # wraps step() before us
    mon = neurotop.watch(m, opt, record=False)
    acks: list[dict] = []
    try:
        train(m, opt, 2, sched)
        mon.controller.submit(Pending("up", "set", {"knob": "lr", "value": 0.7}, "test",
                                      acks.append))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # not even the scheduler's "step() overridden"
            train(m, opt, 3, sched)  # boundary 3 applies it; step 4 raises, is retried
        assert mon.step == 5 and opt.used == [0.05] * 5, "the retry did not use the old lr"
        applied, rolled = acks
        assert applied["ok"] and (applied["old"], applied["new"]) == (0.05, 0.7)
        assert applied["step"] == 3
        assert not rolled["ok"] and rolled["rolled_back"] and rolled["id"] == "up"
        assert (rolled["old"], rolled["new"]) == (0.7, 0.05)
        assert rolled["error"] == ("lr 0.7 rolled back to 0.05: PickyWithModel.step() raised"
                                   " RuntimeError: lr 0.7 is more than this optimizer takes")
        assert mon.knobs.values()["lr"] == 0.05 and mon.knobs.pins() == {}, "not undone"

        # The next change steps: it is kept, and later failures are not its doing.
        mon.controller.submit(Pending("ok", "set", {"knob": "lr", "value": 0.2}, "test",
                                      acks.append))
        mon.controller.submit(Pending("free", "set", {"knob": "lr", "op": "release"},
                                      "test", acks.append))
        train(m, opt, 3, sched)
        assert [a["ok"] for a in acks[2:]] == [True, True] and opt.used[-2:] == [0.2, 0.2]
        opt.param_groups[0]["lr"] = 0.9  # the script's own bad value: its error, not a knob's
        with pytest.raises(RuntimeError, match="more than this optimizer takes"):
            train(m, opt, 1, sched)
        assert len(acks) == 4
    finally:
        mon.close()


def test_with_two_optimizers_a_change_is_on_trial_until_each_it_touches_has_stepped():
    """A GAN: ``lr`` (every group) steps D, then raises in G's step: all of it is undone,
    D's group too. ``lr[D]`` touches D only: D's step takes it, whatever G does."""
    torch.manual_seed(0)
    gen, disc = nn.Linear(4, 4), nn.Linear(4, 1)
    opt_g = PickyWithModel(gen.parameters(), gen, lr=0.05)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.05)
    mon = neurotop.watch({"G": gen, "D": disc}, {"D": opt_d, "G": opt_g}, record=False)
    acks: list[dict] = []

    def steps(n: int) -> None:
        for _ in range(n):
            x = torch.randn(8, 4)
            opt_d.zero_grad()
            disc(gen(x).detach()).mean().backward()
            opt_d.step()
            opt_g.zero_grad()
            (-disc(gen(x)).mean()).backward()
            opt_g.step()  # the boundary
    try:
        steps(1)
        mon.controller.submit(Pending("all", "set", {"knob": "lr", "value": 0.7}, "t",
                                      acks.append))
        steps(2)  # applied at boundary 2; D steps with it, G's step raises
        assert [a["ok"] for a in acks] == [True, False] and acks[1]["rolled_back"]
        assert "PickyWithModel.step() raised" in acks[1]["error"]
        assert mon.knobs.values()["lr"] == 0.05, "D's group kept the value that failed"
        assert opt_g.used == [0.05] * 3 and mon.step == 3

        mon.controller.submit(Pending("d", "set", {"knob": "lr[D]", "value": 0.7}, "t",
                                      acks.append))
        steps(2)
        assert len(acks) == 3 and acks[2]["ok"] and acks[2]["applied_to"] == ["0"]
        assert mon.knobs.values()["lr"] == [0.7, 0.05] and mon.step == 5
    finally:
        mon.close()


def test_a_stop_raised_after_a_trial_step_is_not_retried():
    """What raises once the step was taken (here ``raise_on_stop``) goes on up, once."""
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    mon = neurotop.watch(m, opt, record=False, raise_on_stop=True)
    acks: list[dict] = []
    try:
        train(m, opt, 1)
        mon.controller.submit(Pending("lr", "set", {"knob": "lr", "value": 0.1}, "t",
                                      acks.append))
        train(m, opt, 1)  # applies it
        mon.controller.submit(Pending("stop", "stop", {}, "t", acks.append))
        with pytest.raises(neurotop.StopTraining):
            train(m, opt, 1)  # the trial step, then the stop at its boundary
        assert mon.step == 3 and [a["ok"] for a in acks] == [True, True]
    finally:
        mon.close()


# -- a real training process, driven by ``neurotop ctl`` --------------------------------------

@pytest.mark.slow
def test_overflowing_values_sent_to_a_live_run_are_refused_and_it_keeps_training(
        start_run, tmp_path):
    log = tmp_path / "steps.jsonl"
    run = start_run("--step-sleep", "0.01", "--log", str(log), "--model", "dropout")
    wait_until(lambda: len(steps_logged(log)) > 3, timeout=60, what="training steps")

    def ctl(*words: str):
        return neurotop_cli("ctl", run.info.run_id, *words, timeout=60)

    for value, reason in [("1e308", "lr must be <= 1000.0, got 1e+308"),
                          ("4e38", "lr must be <= 1000.0, got 4e+38"),
                          (f"x{2 ** 64 - 1}", "lr must be <= 1000.0, got 9.22")]:
        out = ctl("set", "lr", value)
        assert out.returncode == 1 and reason in out.stderr, (value, out.stderr)
        assert "Traceback" not in out.stderr
    out = ctl("set", "dropout", "1")
    assert out.returncode == 1 and "dropout must be < 1" in out.stderr, out.stderr
    out = ctl("set", "lr", "0.02")  # a valid change still lands
    assert out.returncode == 0 and json.loads(out.stdout)["new"] == 0.02
    ack = json.loads(out.stdout)

    seen = len(steps_logged(log))
    wait_until(lambda: len(steps_logged(log)) > seen + 20, timeout=60,
               what="steps after the refusals")
    assert run.proc.poll() is None, "the training process died"
    logged = steps_logged(log)
    assert logged[ack["step"] + 1]["lr"] == [0.02]
    assert all(math.isfinite(s["grad_norm"]) for s in logged.values())
    listing = {k["name"]: k for k in json.loads(ctl("knobs").stdout)["knobs"]}
    assert listing["lr"]["value"] == 0.02 and listing["lr"]["max"] == MAXIMA["lr"]
    c = LiveClient(Endpoints(run.info.telemetry, run.info.control, run.info.key_bytes)).start()
    try:
        wait_until(lambda: len(c.store.scalar("loss")[1]) > 5, timeout=60, what="losses")
        assert np.isfinite(c.store.scalar("loss")[1]).all()
    finally:
        c.close()


@pytest.mark.slow
def test_a_change_the_real_step_raises_on_is_rolled_back_in_a_live_run(start_run, tmp_path):
    log = tmp_path / "steps.jsonl"
    run = start_run("--log", str(log), "--step-sleep", "0.01", script=PICKY)
    c = LiveClient(Endpoints(run.info.telemetry, run.info.control, run.info.key_bytes)).start()
    try:
        wait_until(lambda: c.store.status.step > 3, timeout=60, what="training steps")
        out = neurotop_cli("ctl", run.info.run_id, "set", "lr", "0.7", timeout=60)
        assert out.returncode == 0, out.stderr  # applied at a boundary: within every bound
        applied = json.loads(out.stdout)

        def rollback() -> dict | None:
            return next((e for e in c.store.status.events if e.get("event") == "ack"
                         and e.get("id") == applied["id"] and not e["ok"]), None)
        wait_until(rollback, timeout=60, what="the rollback ack")
        ack = rollback()
        assert ack["rolled_back"] and (ack["old"], ack["new"]) == (0.7, 0.05)
        assert ack["error"] == ("lr 0.7 rolled back to 0.05: Picky.step() raised RuntimeError:"
                                " lr 0.7 is more than this optimizer takes")

        seen = steps_logged(log)
        wait_until(lambda: len(steps_logged(log)) > len(seen) + 20, timeout=60,
                   what="steps after the rollback")
        assert run.proc.poll() is None, "the training process died"
        logged = steps_logged(log)
        assert sorted(logged) == list(range(1, len(logged) + 1)), "a step was lost"
        assert {s["lr"] for s in logged.values()} == {0.05}, "a step used the refused lr"
        assert all(math.isfinite(s["loss"]) for s in logged.values())
        knobs = json.loads(neurotop_cli("ctl", run.info.run_id, "knobs", timeout=60).stdout)
        assert next(k for k in knobs["knobs"] if k["name"] == "lr")["value"] == 0.05
    finally:
        c.close()
