"""Every statistic of a real training process, read over ZeroMQ, against NumPy on the same
tensors: a ReLU net with known dead units, a planted massive activation, an injected NaN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from neurotop.protocol import wire
from tests.helpers import numpy_reference as ref
from tests.helpers.telemetry import Subscriber
from tests.helpers.training import watch_options

pytestmark = pytest.mark.slow  # starts training processes

# No auto-pause: a planted NaN must not stop the run before its step is dumped.
CONFIG = {"report_every": 1, "sample": 256, "eps": 0.05, "hist_every": 1, "hist_sample": 100,
          "dead_window": 3, "signal_layers": ["*"], "auto_pause": False}
LAYERS = ["0", "1", "2", "3", "4"]


def by_step(msgs: list[wire.Message], kind: str) -> dict[int, wire.Message]:
    return {m.header["step"]: m for m in msgs if m.kind == kind}


def telemetry(start_run, tmp_path: Path, until_step: int,
              *extra: str) -> tuple[list[wire.Message], Path]:
    """The telemetry of a run, subscribed before its first step, until a heartbeat past
    ``until_step`` arrived (so that step's messages are in), and where it dumped."""
    dump = tmp_path / "dump"
    run = start_run("--steps", "400", "--step-sleep", "0.02", "--dump", str(dump),
                    *watch_options(**CONFIG), *extra, held=True)
    with Subscriber(run.info.telemetry).ready() as sub:
        run.go()
        msgs = sub.collect(60, until=lambda m: m.kind == wire.HEARTBEAT
                           and m.header["step"] > until_step + 2)
    return msgs, dump


def test_every_statistic_matches_numpy(start_run, tmp_path):
    msgs, dump = telemetry(start_run, tmp_path, 30, "--massive")
    schema = next(m.header for m in msgs if m.kind == wire.SCHEMA)
    assert schema["layers"] == LAYERS
    assert schema["stats"] == list(wire_stats())
    stats, params, hists = (by_step(msgs, k) for k in (wire.STATS, wire.PARAMS, wire.HIST))
    edges = np.asarray(schema["hist_edges"])
    exps = tuple(schema["config"]["hist_exponents"])
    assert np.allclose(edges[len(edges) // 2:], 2.0 ** np.arange(exps[0], exps[1] + 1))
    window: dict[str, list[np.ndarray]] = {n: [] for n in LAYERS}
    assert set(range(1, 31)) <= set(stats), "a step's report was not received"
    for step in range(1, 31):
        d = np.load(dump / f"step{step}.npz")
        for n in LAYERS:
            window[n] = (window[n] + [d[f"out:{n}"].max(axis=0)])[-CONFIG["dead_window"]:]
        block, scalars = stats[step].arrays
        expected = np.array([[ref.layer_stats(
            d[f"out:{n}"], d[f"grad:{n}"], sample=CONFIG["sample"], eps=CONFIG["eps"],
            units_max_window=np.max(window[n], axis=0))[s] for s in schema["stats"]]
            for n in LAYERS])
        np.testing.assert_allclose(block, expected, rtol=2e-4, atol=1e-6,
                                   err_msg=f"layer stats at step {step}")
        sc = dict(zip(schema["scalars"], scalars.tolist(), strict=True))
        assert sc["loss"] == pytest.approx(float(d["loss"]), rel=1e-5)
        g = np.sqrt(sum(np.sum(d[f"pgrad:{p}"].astype(np.float64) ** 2)
                        for p in schema["params"]))
        assert sc["grad_norm"] == pytest.approx(g, rel=1e-4)
        assert sc["lr"] == pytest.approx(0.05) and sc["first_nonfinite"] == -1
        assert 20e6 < sc["mem_host"] < 64e9  # a Python process with torch: its RSS, in bytes
        (pblock,) = params[step].arrays
        pexp = np.array([[ref.param_stats(d[f"before:{p}"], d[f"after:{p}"], d[f"pgrad:{p}"],
                                          CONFIG["sample"])[s] for s in schema["param_stats"]]
                         for p in schema["params"]])
        np.testing.assert_allclose(pblock, pexp, rtol=2e-4, atol=1e-7,
                                   err_msg=f"param stats at step {step}")
        act, grad = hists[step].arrays
        for h, n in enumerate(schema["hist_layers"]):
            for got, src in ((act[h], d[f"out:{n}"]), (grad[h], d[f"grad:{n}"])):
                sample = ref.row_sample(src, CONFIG["sample"])
                np.testing.assert_array_equal(got, ref.histogram(sample, exps,
                                                                 CONFIG["hist_sample"]))
    last = stats[max(stats)].arrays[0]
    col = {s: j for j, s in enumerate(schema["stats"])}
    # What a user would look for: the planted dead units and the massive activation.
    assert last[0, col["dead_frac"]] == pytest.approx(5 / 32)
    assert last[1, col["dead_frac_window"]] == pytest.approx(5 / 32)
    assert last[2, col["max_abs"]] > 250 and last[2, col["massive_ratio"]] > 100
    assert last[0, col["massive_ratio"]] < 100


def test_injected_nan_names_the_first_layer(start_run, tmp_path):
    msgs, dump = telemetry(start_run, tmp_path, 26, "--nan-at", "25", "--dump-steps", "26")
    schema = next(m.header for m in msgs if m.kind == wire.SCHEMA)
    stats = by_step(msgs, wire.STATS)
    assert {24, 25} <= set(stats), "the steps around the NaN were not received"
    col = {s: j for j, s in enumerate(schema["stats"])}
    nf = schema["scalars"].index("first_nonfinite")
    assert stats[24].arrays[1][nf] == -1
    block, scalars = stats[25].arrays
    assert schema["layers"][int(scalars[nf])] == "2"  # not "3" or "4", which follow it
    d = np.load(dump / "step25.npz")
    expected = [float((~np.isfinite(d[f"out:{n}"])).sum()) for n in LAYERS]
    assert block[:, col["nonfinite"]].tolist() == expected
    assert expected[:2] == [0.0, 0.0] and expected[2] == 3.0 and expected[4] > 0


def wire_stats() -> tuple[str, ...]:
    from neurotop.config import LAYER_STATS
    return LAYER_STATS
