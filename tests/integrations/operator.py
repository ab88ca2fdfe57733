"""What an operator does to a framework's run from another terminal, while the framework
trains in the test's own thread: ``neurotop ls`` (the real CLI, a separate process), then
over the run's real control socket ``set`` a knob, ``pause`` (checking that no step runs
while paused), ``resume`` and ``stop``. Plus plain-PyTorch probes the tests check against.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from neurotop.protocol import connfile
from neurotop.tui.data.client import Endpoints, LiveClient
from tests.helpers import numpy_reference as ref
from tests.helpers.cli import neurotop
from tests.helpers.waiting import wait_until


def approx(v: float) -> Any:
    return pytest.approx(v, rel=1e-4, abs=1e-6)


class StepProbe:
    """A step post-hook on an optimizer, registered before neurotop's (which holds a pause
    after its own): the steps taken, and the learning rate each one used."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.lrs: list[float] = []
        opt.register_step_post_hook(lambda o, a, k: self.lrs.append(o.param_groups[0]["lr"]))

    @property
    def steps(self) -> int:
        return len(self.lrs)


class Capture:
    """A layer's outputs by a plain forward hook, keyed by the optimizer step they belong to
    (``step()``: the steps completed when the forward ran, plus one): training forwards and
    the others (validation) apart."""

    def __init__(self, module: nn.Module, step: Callable[[], int], until: int) -> None:
        self.train: dict[int, list[np.ndarray]] = {}
        self.other: dict[int, list[np.ndarray]] = {}
        self.step, self.until = step, until
        module.register_forward_hook(self._add)

    def _add(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        s = self.step() + 1
        if s <= self.until:
            training = torch.is_grad_enabled() and module.training
            a = out.detach().float().cpu().numpy()
            (self.train if training else self.other).setdefault(s, []).append(
                a.reshape(-1, a.shape[-1]))

    def window_with_validation(self) -> int:
        """A step whose window held validation forwards besides its training ones."""
        return min(s for s in self.other if s in self.train)

    def check(self, row: dict[str, float], step: int, sample: int, eps: float) -> None:
        """The report's row of ``step`` is the statistics of its training forwards only."""
        a = np.concatenate(self.train[step])
        want = ref.layer_stats(a, None, sample=sample, eps=eps, units_max_window=a.max(0))
        for s in ("mean", "std", "rms", "max_abs", "zero_frac"):
            assert row[s] == approx(want[s]), (step, s, row[s], want[s])
        if step in self.other:  # with the validation forwards it would read otherwise
            b = np.concatenate([a, *self.other[step]])
            pooled = ref.layer_stats(b, None, sample=sample, eps=eps, units_max_window=b.max(0))
            assert row["mean"] != approx(pooled["mean"])


class Operator(threading.Thread):
    """Drives the run ``run_id`` once it is up; ``steps()``: the steps the training took
    (a ``StepProbe``). Commands and what came back are kept for the test to check; an
    error is re-raised by ``result()``."""

    def __init__(self, run_id: str, steps: Callable[[], int], knob: str, value: float) -> None:
        super().__init__(name="operator", daemon=True)
        self.run_id, self.steps, self.knob, self.value = run_id, steps, knob, value
        self.listed: list[dict] = []
        self.acks: dict[str, dict] = {}
        self.ran_while_paused: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._drive()
        except BaseException as e:  # handed to the test's thread by ``result()``
            self.error = e

    def result(self, timeout: float = 120) -> Operator:
        self.join(timeout)
        assert not self.is_alive(), "the operator did not finish"
        if self.error is not None:
            raise self.error
        return self

    def _drive(self) -> None:
        info = wait_until(lambda: next((r for r in connfile.live_runs()
                                        if r.run_id == self.run_id), None),
                          timeout=60, what=f"run {self.run_id}'s connection file")
        out = neurotop("ls", "--json", timeout=60)
        assert out.returncode == 0, out.stderr
        self.listed = json.loads(out.stdout)
        c = LiveClient(Endpoints(info.telemetry, info.control, info.key_bytes)).start()
        try:
            self.acks["set"] = c.command("set", {"knob": self.knob, "value": self.value},
                                         timeout=30).result(40)
            held = self.acks["pause"] = c.command("pause", timeout=30).result(40)
            wait_until(lambda: self.steps() >= held["step"], timeout=30, what="the held step")
            time.sleep(1.0)
            self.ran_while_paused = self.steps() - held["step"]
            self.acks["resume"] = c.command("resume", timeout=30).result(40)
            wait_until(lambda: self.steps() >= held["step"] + 3, timeout=30,
                       what="steps after resume")
            self.acks["stop"] = c.command("stop", timeout=30).result(40)
        finally:
            c.close()

    def check(self, lrs: list[float], old: float, final_step: int) -> None:
        """What the operator saw, and what the training did: listed live, ``set`` took
        effect at the next optimizer step, no step while paused, stopped where acked."""
        row = next(r for r in self.listed if r["run_id"] == self.run_id)
        assert row["state"] == "live"
        s = self.acks["set"]["step"]
        assert self.acks["set"]["ok"] and lrs[s - 1] == approx(old)
        assert lrs[s] == approx(self.value), "the new lr did not land at the next step"
        assert self.ran_while_paused == 0, "a step ran while paused"
        assert self.acks["resume"]["step"] == self.acks["pause"]["step"]
        assert final_step == self.acks["stop"]["step"], "training did not stop at the ack"
