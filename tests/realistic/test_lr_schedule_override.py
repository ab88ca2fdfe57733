"""A loop that writes its own schedule into the optimizer every iteration, as most GPT
trainers do (a hand-written cosine for ``param_group["lr"]``, a weight-decay ramp, a
dropout warm-up on the module): what an operator sets from a real client holds until it is
released, the heartbeat says how often the script wrote over it, and the optimizer's
update is the one plain PyTorch makes with the pinned value."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn

import neurotop
from neurotop.tui.data.client import CommandError, Endpoints, LiveClient
from neurotop.tui.screens.control_panel import pin_note
from tests.helpers.waiting import wait_until

BASE_LR, TOTAL = 0.1, 100_000


def cosine(it: int) -> float:
    return BASE_LR * 0.5 * (1 + math.cos(math.pi * it / TOTAL))


class RecordingDropout(nn.Dropout):
    """Dropout that notes the ``p`` each forward really used (after every pre-hook)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.used = self.p
        return super().forward(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.drop, self.fc2 = (nn.Linear(16, 32), nn.ReLU(),
                                                   RecordingDropout(0.1), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Loop(threading.Thread):
    """The script: schedule, forward, backward, step; ``used`` is what each step used."""

    def __init__(self, model: Net, opt: torch.optim.Optimizer) -> None:
        super().__init__(daemon=True)
        self.model, self.opt = model, opt
        self.halt = threading.Event()
        self.used: list[dict] = []
        self.error: BaseException | None = None
        # Registered after watch's: runs after the knob's pre-hook, sees what SGD will use.
        opt.register_step_pre_hook(self._before)
        opt.register_step_post_hook(self._after)

    def _before(self, opt, args, kwargs) -> None:
        w = self.model.fc2.weight
        self._w, self._g = w.detach().clone(), w.grad.detach().clone()
        g = opt.param_groups[0]
        self.used.append({"it": self.it, "lr": g["lr"], "wd": g["weight_decay"],
                          "p": self.model.drop.used})

    def _after(self, opt, args, kwargs) -> None:
        # Plain SGD with what the step used (the boundary may already have set the next):
        # w -= lr * (grad + wd * w).
        u = self.used[-1]
        expect = self._w - u["lr"] * (self._g + u["wd"] * self._w)
        self.used[-1]["update_ok"] = torch.allclose(self.model.fc2.weight.detach(), expect,
                                                    atol=1e-7)

    def run(self) -> None:
        gen = torch.Generator().manual_seed(0)
        try:
            for self.it in range(10**6):
                if self.halt.is_set():
                    return
                for g in self.opt.param_groups:  # the script's own schedules
                    g["lr"] = cosine(self.it)
                    g["weight_decay"] = 1e-4 * (1 + self.it)
                self.model.drop.p = 0.1
                x = torch.randn(32, 16, generator=gen)
                loss = self.model(x).pow(2).mean()
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                self.halt.wait(0.002)
        except BaseException as e:  # reported by the test
            self.error = e


@pytest.fixture
def run():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=cosine(0), weight_decay=1e-4)
    mon = neurotop.watch(model, opt, name="lr-override", report_every=5, record=False)
    loop = Loop(model, opt)
    c = LiveClient(Endpoints(mon.service.telemetry_endpoint, mon.service.control_endpoint,
                             mon.connection.key_bytes)).start()
    loop.start()
    try:
        yield loop, c
    finally:
        loop.halt.set()
        loop.join(10)
        c.close()
        mon.close()
    assert loop.error is None, loop.error


def steps_after(loop: Loop, step: int, n: int) -> list[dict]:
    """The records of optimizer steps step+1 .. step+n (step k is ``used[k - 1]``), once
    the last of them has finished (its record is appended before the step, completed after)."""
    wait_until(lambda: len(loop.used) >= step + n and "update_ok" in loop.used[step + n - 1],
               what=f"{n} steps after step {step}")
    return loop.used[step:step + n]


def test_set_holds_against_a_script_that_writes_lr_every_step(run):
    loop, c = run
    ack = c.command("set", {"knob": "lr", "value": 0.003}).result(10)
    assert ack["ok"] and ack["pinned"] is True
    seen = steps_after(loop, ack["step"], 20)
    assert all(s["lr"] == 0.003 for s in seen), "the script's cosine undid the set"
    assert all(s["update_ok"] for s in seen), "SGD's update is not the one with the pinned lr"
    assert cosine(seen[-1]["it"]) != pytest.approx(0.003), "the script really writes lr"

    # Said plainly: the heartbeat counts the script's writes and shows what it wrote.
    pin = wait_until(lambda: (p := c.store.knob_pins.get("lr")) and p["overridden"] >= 10
                     and p, what="the heartbeat's count of undone writes")
    assert pin["value"] == 0.003 and pin["targets"] == ["0"]
    assert pin["script"] == pytest.approx(cosine(loop.it), rel=1e-3)
    note = pin_note(c.store.frame().knob_pins["lr"])  # what the control panel shows
    assert note.startswith(" pinned (script wrote ") and "×" in note
    listing = {k["name"]: k for k in c.command("knobs").result(10)["knobs"]}
    assert listing["lr"]["pinnable"] and listing["lr"]["value"] == 0.003

    # A report's lr scalar is the pinned one too.
    wait_until(lambda: any(s > ack["step"] for s in c.store.steps()), what="a later report")
    steps, values = c.store.scalar("lr")
    assert values[steps > ack["step"]] == pytest.approx(0.003)

    ack = c.command("set", {"knob": "lr", "op": "release"}).result(10)
    assert ack["ok"] and ack["pinned"] is False and ack["old"] == 0.003
    seen = steps_after(loop, ack["step"], 5)
    assert all(s["lr"] == cosine(s["it"]) for s in seen), "release must hand lr back"
    wait_until(lambda: "lr" not in c.store.knob_pins, what="the pin gone from the heartbeat")


def test_weight_decay_and_dropout_hold_too(run):
    loop, c = run
    wd = c.command("set", {"knob": "weight_decay", "value": 0.0}).result(10)
    p = c.command("set", {"knob": "dropout", "value": 0.5}).result(10)
    assert wd["ok"] and wd["pinned"] and p["ok"] and p["pinned"]
    seen = steps_after(loop, max(wd["step"], p["step"]), 10)
    assert all(s["wd"] == 0.0 and s["p"] == 0.5 for s in seen)
    assert all(s["update_ok"] for s in seen)
    pins = wait_until(lambda: {"weight_decay", "dropout"} <= set(c.store.knob_pins)
                      and c.store.knob_pins, what="both pins in the heartbeat")
    assert pins["dropout"]["value"] == 0.5 and pins["dropout"]["script"] == 0.1

    ack = c.command("set", {"knob": "dropout", "op": "release"}).result(10)
    assert ack["ok"]
    assert all(s["p"] == 0.1 for s in steps_after(loop, ack["step"] + 1, 3))
    refused = c.command("set", {"knob": "grad_clip", "op": "release"})
    with pytest.raises(CommandError, match="never pinned"):
        refused.result(10)
