"""The knobs from the papers (METRICS.md F) on real training loops, set through the real
control path: ``orthograd`` (each gradient orthogonal to its weights, its norm kept),
``topk[GLOB]`` (k activations per sample, gradient through those only),
``temperature[GLOB]`` (a head's logits divided by T, as its statistics see them) and
``reset_dead[GLOB]`` (dead units re-initialized, their outgoing weights and optimizer
moments zeroed), and the one-line refusals of what they cannot take."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

import neurotop
from neurotop.service.controller import Pending
from neurotop.training.knobs import Knobs
from tests.helpers.cli import neurotop as neurotop_cli
from tests.helpers.reports import Reports
from tests.helpers.waiting import wait_until

OPTS: dict[str, Any] = {"record": False, "auto_pause": False}


def command(mon: neurotop.Monitor, knob: str, value: Any, step: Callable[[], None]) -> dict:
    """``set knob value`` through the controller's queue, applied at the next boundary."""
    acks: list[dict] = []
    err = mon.controller.validate("set", {"knob": knob, "value": value})
    assert err is None, err
    mon.controller.submit(Pending(knob, "set", {"knob": knob, "value": value}, "test",
                                  acks.append))
    step()
    assert acks, "no ack at the boundary"
    return acks[0]


def last_report(step: int, every: int) -> int:
    """The last step reported at or before ``step`` (reports at 1, 1 + every, ...)."""
    return step - (step - 1) % every


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a * b).sum() / (a.norm() * b.norm()))


# -- orthograd -------------------------------------------------------------------------------

def test_orthograd_makes_every_gradient_orthogonal_to_its_weights_and_keeps_its_norm():
    """Two optimizers (Adam and SGD with momentum): every parameter's gradient, as the
    optimizers step with it (a pre-hook of the script's, run after neurotop's), has
    <g, theta> = 0 and the norm the backward gave."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opts = {"body": torch.optim.Adam(model[0].parameters(), lr=1e-2),
            "head": torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)}
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    stepped: dict[int, torch.Tensor] = {}
    for o in opts.values():
        o.register_step_pre_hook(lambda o, a, k: stepped.update(
            {id(p): p.grad.clone() for g in o.param_groups for p in g["params"]}))
    with neurotop.watch(model, opts, report_every=1, **OPTS) as mon:
        raw: dict[int, torch.Tensor] = {}

        def step() -> None:
            loss = nn.functional.cross_entropy(model(x), y)
            for o in opts.values():
                o.zero_grad()
            loss.backward()
            raw.update({id(p): p.grad.clone() for p in model.parameters()})
            for o in opts.values():
                o.step()

        for _ in range(3):
            step()
        assert max(abs(cos(stepped[id(p)], p)) for p in model.parameters()) > 0.05
        ack = command(mon, "orthograd", True, step)
        assert ack["ok"] and (ack["old"], ack["new"]) == (False, True), ack
        for _ in range(3):
            before = {id(p): p.detach().clone() for p in model.parameters()}
            step()
            for p in model.parameters():
                g, theta = stepped[id(p)], before[id(p)]
                assert abs(cos(g, theta)) < 1e-5, "a component along the weights is left"
                torch.testing.assert_close(g.norm(), raw[id(p)].norm(), rtol=1e-5, atol=0)
        assert command(mon, "orthograd", False, step)["new"] is False
        step()
        assert max(abs(cos(stepped[id(p)], p)) for p in model.parameters()) > 0.05, \
            "switched off, the gradients must be the backward's again"


def test_orthograd_removes_the_nlm_direction_of_a_memorizing_run():
    """A memorized task (the loss falls by scaling the logits up): the head's nlm_cos is
    above 0.8 as reported; once orthograd is set, the reported nlm_cos of every parameter
    is ~0 and the gradient norms are unchanged."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    model = nn.Sequential(nn.Linear(16, 64, bias=False), nn.ReLU(),
                          nn.Linear(64, 4, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with neurotop.watch(model, opt, report_every=10, **OPTS) as mon:
        reports = Reports(mon)
        try:
            def step() -> None:
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                mon.observe(loss=loss)
                opt.step()

            for _ in range(100):  # reports at steps 1, 11, ..., 91
                step()
            before = reports.params(91)
            assert before["2.weight"]["nlm_cos"] > 0.8, before
            ack = command(mon, "orthograd", True, step)  # after step 101
            for _ in range(20):
                step()
            after = reports.params(121)
        finally:
            reports.close()
    print(f"nlm_cos before {before['2.weight']['nlm_cos']:.3f}, with orthograd"
          f" {after['2.weight']['nlm_cos']:.2e} (set at step {ack['step']})")
    for name, row in after.items():
        assert abs(row["nlm_cos"]) < 1e-3, (name, row)
        assert row["grad_norm"] > 0


def test_orthograd_under_a_grad_scaler_projects_the_unscaled_gradients():
    """``scaler.step`` unscales before the optimizer's pre-hooks: the gradient stepped with
    is orthogonal and has the unscaled norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    stepped: dict[int, torch.Tensor] = {}
    opt.register_step_pre_hook(lambda o, a, k: stepped.update(
        {id(p): p.grad.clone() for p in model.parameters()}))
    with neurotop.watch(model, opt, scaler=scaler, report_every=1, **OPTS) as mon:
        raw: dict[int, torch.Tensor] = {}

        def step() -> None:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            raw.update({id(p): p.grad / scaler.get_scale() for p in model.parameters()})
            scaler.step(opt)
            scaler.update()

        step()
        command(mon, "orthograd", True, step)
        before = {id(p): p.detach().clone() for p in model.parameters()}
        step()
    for p in model.parameters():
        assert abs(cos(stepped[id(p)], before[id(p)])) < 1e-5
        torch.testing.assert_close(stepped[id(p)].norm(), raw[id(p)].norm(), rtol=1e-5, atol=0)


# -- topk ------------------------------------------------------------------------------------

def test_topk_keeps_exactly_k_per_sample_and_the_gradient_flows_through_those_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    seen: dict[str, torch.Tensor] = {}
    with neurotop.watch(model, opt, report_every=1, **OPTS) as mon:
        def step() -> None:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        step()
        ack = command(mon, "topk[0]", 5, step)
        assert ack["ok"] and ack["applied_to"] == ["0"] and ack["new"] == 5, ack

        def raw(m: nn.Module, a: Any, out: torch.Tensor) -> None:  # before the topk hook
            seen["raw"] = out
            out.register_hook(lambda g: seen.__setitem__("grad", g))
        h = model[0].register_forward_hook(raw, prepend=True)
        model[0].register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
        step()
        h.remove()
        out, grad = seen["out"], seen["grad"]
        assert ((out != 0).sum(1) == 5).all(), "exactly k nonzero per sample"
        kept = out != 0
        assert torch.equal(out[kept], seen["raw"][kept]), "kept values changed"
        assert torch.equal(kept, seen["raw"] >= seen["raw"].topk(5, 1).values[:, -1:])
        assert (grad[~kept] == 0).all(), "gradient through a unit that was zeroed"
        assert (grad[kept] != 0).float().mean() > 0.5
        assert mon.knobs.values()["topk"] == {"0": 5}
        assert command(mon, "topk[0]", 0, step)["new"] == 0  # off: the hook is gone
        step()
        assert (seen["out"] != 0).all()


@pytest.mark.slow  # dynamo traces the model a few times (about 8 s of CPU)
def test_topk_and_temperature_under_torch_compile():
    """Hooks added and removed at boundaries recompile the model (dynamo guards on them):
    the compiled forward computes what the eager one does, with and without the knobs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the same weights all along
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    compiled = torch.compile(model, backend="aot_eager")
    with neurotop.watch(model, opt, report_every=5, head="2", **OPTS) as mon:
        def step() -> None:
            loss = nn.functional.cross_entropy(compiled(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        for _ in range(3):
            step()
        command(mon, "topk[0]", 4, step)
        command(mon, "temperature[2]", 2.0, step)
        hidden: dict[str, torch.Tensor] = {}
        model[0].register_forward_hook(lambda m, a, out: hidden.__setitem__("h", out))
        for _ in range(6):  # report steps (eager) and others (the compiled graph)
            step()
            assert ((hidden["h"] != 0).sum(1) == 4).all()
        with torch.no_grad():
            hot = compiled(x)
            torch.testing.assert_close(hot, model(x))
        command(mon, "temperature[2]", 1.0, step)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))
            torch.testing.assert_close(compiled(x), 2 * hot, rtol=1e-5, atol=1e-6)


# -- temperature -----------------------------------------------------------------------------

def test_temperature_divides_the_logits_and_the_head_statistics_see_them():
    """lr 0: the model stays as it is, so the margin quantiles scale exactly by 1/T."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.randn(64, 8), torch.randint(0, 5, (64,))
    logits: list[torch.Tensor] = []
    with neurotop.watch(model, opt, report_every=1, head="2", **OPTS) as mon:
        reports = Reports(mon)
        try:
            def step() -> None:
                out = model(x)
                logits.append(out.detach())
                loss = nn.functional.cross_entropy(out, y)
                opt.zero_grad()
                loss.backward()
                opt.step()

            step()
            ack = command(mon, "temperature[2]", 4.0, step)  # applied after step 2
            assert ack["ok"] and (ack["old"], ack["new"]) == (1.0, 4.0), ack
            step()
            plain, hot = reports.stats(ack["step"]).scalars, reports.stats(3).scalars
        finally:
            reports.close()
        torch.testing.assert_close(logits[2], logits[0] / 4)
        for q in ("head.margin_p10", "head.margin_p50", "head.margin_p90"):
            assert hot[q] == pytest.approx(plain[q] / 4, rel=1e-5), q
        assert hot["head.entropy"] > plain["head.entropy"]
        hooks = len(model[2]._forward_hooks)
        command(mon, "temperature[2]", 1.0, step)  # T = 1: off
        assert len(model[2]._forward_hooks) == hooks - 1
        step()
        torch.testing.assert_close(logits[-1], logits[0])


def test_a_user_knob_named_temperature_takes_the_place_of_the_built_in_one():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    k = Knobs(model, torch.optim.SGD(model.parameters(), lr=0.1))
    k.apply("temperature[1]", 2.0, "set")
    t = k.user("temperature", 1.0, min=0.1, max=10.0)
    assert k.apply("temperature", 3.0, "set")["new"] == 3.0 and t.value == 3.0
    assert not model[1]._forward_hooks, "the built-in's hook must go with it"


# -- reset_dead ------------------------------------------------------------------------------

@contextmanager
def training(mon: neurotop.Monitor, step: Callable[[], None]) -> Iterator[threading.Event]:
    """``step`` in a loop on a thread of its own (the training thread) until the block ends."""
    done = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            while not done.is_set() and not mon.should_stop:
                step()
        except BaseException as e:  # reported by the test
            errors.append(e)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield done
    finally:
        done.set()
        if mon.controller.paused:
            mon.controller.close()
        t.join(20)
    assert not errors, errors


def ctl(mon: neurotop.Monitor, *words: str) -> Any:
    return neurotop_cli("ctl", mon.run_id, *words, timeout=60)


def test_reset_dead_through_neurotop_ctl_resets_exactly_the_planted_dead_units():
    """Six units of ``0`` planted dead (bias -100): ``neurotop ctl RUN set reset_dead[1]
    true`` on a paused run resets exactly those (fresh rows, zero outgoing columns, zero
    Adam moments), says so in the ack, and the run trains on with the units alive."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    dead = torch.arange(6)
    with torch.no_grad():
        model[0].bias[dead] = -100.0
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    losses: list[float] = []

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()

    with neurotop.watch(model, opt, report_every=2, dead_window=3, **OPTS) as mon:
        reports = Reports(mon)
        try:
            with training(mon, step):
                wait_until(lambda: mon.step >= 10, timeout=30, what="10 steps")
                out = ctl(mon, "pause")
                assert out.returncode == 0, out.stderr
                held = json.loads(out.stdout)["step"]
                wait_until(lambda: mon.controller.paused, what="the pause")
                w1, b1, w2 = (t.detach().clone() for t in (model[0].weight, model[0].bias,
                                                             model[2].weight))
                moments = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
                before = reports.stats(last_report(held, 2)).layer("1")["dead_frac_window"]

                out = ctl(mon, "set", "reset_dead[1]", "true")
                assert out.returncode == 0, out.stderr
                ack = json.loads(out.stdout)
                assert ack["ok"] and ack["step"] == held, ack
                assert ack["reset"] == {"0": 6} and ack["units_reset"] == 6, ack
                assert ack["applied_to"] == ["1"] and ack["notes"] == []

                live = torch.ones(32, dtype=torch.bool)
                live[dead] = False
                bound = 1 / 8 ** 0.5  # PyTorch's default init of Linear(8, .)
                assert torch.equal(model[0].weight[live], w1[live]), "a live row changed"
                assert torch.equal(model[0].bias[live], b1[live])
                assert not torch.equal(model[0].weight[dead], w1[dead])
                assert model[0].weight[dead].abs().max() <= bound
                assert model[0].bias[dead].abs().max() <= bound, "the bias is not re-drawn"
                assert (model[2].weight[:, dead] == 0).all(), "outgoing columns not zeroed"
                assert torch.equal(model[2].weight[:, live], w2[:, live])
                for name in ("exp_avg", "exp_avg_sq"):
                    m = opt.state[model[0].weight][name]
                    assert (m[dead] == 0).all() and torch.equal(m[live], moments[name][live])
                    assert (opt.state[model[0].bias][name][dead] == 0).all()
                    assert (opt.state[model[2].weight][name][:, dead] == 0).all()

                refused = ctl(mon, "set", "reset_dead[2]", "true")  # the head: no activation
                assert refused.returncode == 1
                assert refused.stderr.strip().splitlines() == [
                    "neurotop: set rejected: reset_dead: nothing to reset: 2: no activation"
                    " follows it, so its units cannot die"], refused.stderr
                refused = ctl(mon, "set", "topk[0]", "-1")
                assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
                    "neurotop: set rejected: topk must be >= 0, got -1"], refused.stderr
                assert ctl(mon, "resume").returncode == 0
                wait_until(lambda: mon.step >= held + 12, timeout=30, what="12 more steps")
            after = reports.stats(last_report(held + 12, 2)).layer("1")
        finally:
            reports.close()
    print(f"dead_frac_window of layer 1: {before:.3f} before the reset, "
          f"{after['dead_frac_window']:.3f} after")
    assert before == pytest.approx(6 / 32, abs=1 / 64)
    assert after["dead_frac_window"] < before and after["dead_frac"] < before
    assert all(math.isfinite(v) for v in losses) and len(losses) >= held + 12


def test_reset_dead_of_a_conv_net_with_sgd_momentum_zeroes_the_flattened_columns():
    """Conv -> ReLU -> MaxPool -> Flatten -> Linear, SGD with momentum: the dead channels'
    filters are re-drawn, their momentum rows zeroed, and the Linear's columns of those
    channels (H*W of them each) zeroed with their momentum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    with torch.no_grad():
        model[0].bias[[1, 6]] = -100.0
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    with neurotop.watch(model, opt, report_every=1, **OPTS) as mon:
        def step() -> None:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        for _ in range(4):
            step()
        ack = command(mon, "reset_dead[1]", True, step)
        assert ack["ok"] and ack["reset"] == {"0": 2}, ack
        cols = torch.zeros(8, 16, dtype=torch.bool)
        cols[[1, 6]] = True
        cols = cols.flatten()
        assert (model[4].weight[:, cols] == 0).all() and (model[4].weight[:, ~cols] != 0).all()
        assert (opt.state[model[4].weight]["momentum_buffer"][:, cols] == 0).all()
        assert (opt.state[model[0].weight]["momentum_buffer"][[1, 6]] == 0).all()
        assert (opt.state[model[0].weight]["momentum_buffer"][[0, 2]] != 0).any()
        assert model[0].bias[[1, 6]].abs().max() <= 1 / 27 ** 0.5
        for _ in range(3):
            step()
        dead = mon.collector.dead_units(1)
        assert dead is not None and not dead[[1, 6]].any(), "the reset channels are still dead"


class Functional(nn.Module):
    """``F.relu(self.fc1(x))``: no activation module; the graph shows fc1 feeds a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.relu(self.fc1(x)))


def test_reset_dead_of_a_layer_before_a_functional_relu():
    torch.manual_seed(0)
    model = Functional()
    with torch.no_grad():
        model.fc1.bias[[3, 9]] = -100.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    with neurotop.watch(model, opt, report_every=1, **OPTS) as mon:
        def step() -> None:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        for _ in range(3):
            step()
        ack = command(mon, "reset_dead[fc*]", True, step)
        assert ack["reset"] == {"fc1": 2} and ack["applied_to"] == ["fc1", "fc2"], ack
        assert ack["notes"] == ["fc2: no activation follows it, so its units cannot die"]
        assert (model.fc2.weight[:, [3, 9]] == 0).all()
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert (opt.state[model.fc1.weight][name][[3, 9]] == 0).all(), name
        assert mon.knobs.values()["reset_dead"] == {"fc1": 2}


# -- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize("knob, value, reason", [
    ("topk[0]", -1, "topk must be >= 0, got -1"),
    ("topk[0]", 2.5, "topk takes an integer, got 2.5"),
    ("topk[nope*]", 3, "topk[nope*] matches no module; candidates: 0, 1, 2"),
    ("topk", 3, "topk needs a layer glob: topk[GLOB], e.g. topk[0]"),
    ("temperature[2]", 0.0, "temperature must be >= 0.001, got 0.0"),
    ("temperature[2]", -2.0, "temperature must be >= 0.001, got -2.0"),
    ("temperature[2]", float("nan"), "temperature must be a finite number, got nan"),
    ("temperature[2]", float("inf"), "temperature must be a finite number, got inf"),
    ("orthograd", 0.5, "orthograd takes true or false, got 0.5"),
    ("orthograd[0]", True, "orthograd takes no selector, got orthograd[0]"),
    ("reset_dead[1]", False, "reset_dead is a one-shot action: `set reset_dead[GLOB] true`"),
    ("reset_dead[zz]", True, "reset_dead[zz] matches no module"),
])
def test_bad_values_get_a_one_line_refusal(knob, value, reason):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    k = Knobs(model, torch.optim.Adam(model.parameters()))
    for check in (k.validate, k.apply):
        with pytest.raises(ValueError) as e:
            check(knob, value, "set")
        assert reason in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_reset_dead_without_statistics_is_refused_with_the_reason():
    """Not watched (no collector), then watched but before the first report."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    k = Knobs(model, torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match=r"^reset_dead: nothing to reset: 1: not a measured"
                       r" layer \(no dead-unit statistics\)$"):
        k.apply("reset_dead[1]", True, "set")
    with neurotop.watch(model, torch.optim.Adam(model.parameters()), **OPTS) as mon:
        with pytest.raises(ValueError, match="1: no report has measured its units yet"):
            mon.knobs.apply("reset_dead[1]", True, "set")
