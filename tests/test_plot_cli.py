"""``neurotop plot`` (issue 18, item 7): charts on stdout of a session a real short training
recorded, whose axes span the data read straight from the file; bad input is one line."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from neurotop.tui.data.plots import MAX_BUCKETS, thin
from tests.helpers.cli import neurotop
from tests.helpers.recorded import Recording, read_recording, record_run
from tests.helpers.sessions import SessionBuilder, write_run

pytestmark = pytest.mark.slow

STEPS = 40
WIDTH, HEIGHT = 90, 16


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_run(tmp_path_factory.mktemp("recorded"), "--steps", str(STEPS))


@pytest.fixture(scope="module")
def recording(session: Path) -> Recording:
    return read_recording(session)


def plot(*args: str, env: dict[str, str] | None = None) -> str:
    out = neurotop("plot", *args, "--width", str(WIDTH), "--height", str(HEIGHT), env=env)
    assert out.returncode == 0, out.stderr
    assert "\x1b[" not in out.stdout  # not a terminal: no colour codes in a log
    return out.stdout


def chart_blocks(stdout: str) -> list[list[str]]:
    """Each chart's lines: from its title to its x label (``step``)."""
    lines = stdout.splitlines()
    tops = [i for i, ln in enumerate(lines) if ln.lstrip().startswith("┌")]
    return [lines[i - 1: i + HEIGHT - 1] for i in tops]


def y_ticks(block: list[str]) -> list[str]:
    return [ln.split("┤")[0].strip() for ln in block if "┤" in ln]


def x_ticks(block: list[str]) -> list[str]:
    (bottom,) = [i for i, ln in enumerate(block) if ln.lstrip().startswith("└")]
    return block[bottom + 1].split()


def assert_axis_spans(block: list[str], values: np.ndarray) -> None:
    """The y tick labels run from the data's max (top) to its min (bottom), to the label's
    printed precision, all inside that range."""
    labels = y_ticks(block)
    assert len(labels) >= 3, block
    ticks = [float(t) for t in labels]
    decimals = len(labels[0].split(".")[1]) if "." in labels[0] else 0
    tol = 10.0 ** -decimals
    lo, hi = float(np.min(values)), float(np.max(values))
    assert abs(ticks[0] - hi) <= tol, (labels, lo, hi)
    assert abs(ticks[-1] - lo) <= tol, (labels, lo, hi)
    assert ticks == sorted(ticks, reverse=True)
    assert all(lo - tol <= t <= hi + tol for t in ticks), (labels, lo, hi)


def drawn(block: list[str]) -> int:
    """Plotted cells: anything inside the frame that is not blank (legend aside)."""
    inside = [ln.split("┤" if "┤" in ln else "│", 1)[1] for ln in block
              if ("┤" in ln or "│" in ln) and not ln.lstrip().startswith(("┌", "└"))]
    return sum(len(re.sub(r"[\s│]", "", ln)) for ln in inside)


def test_loss_by_default_its_axes_span_the_recorded_values(session: Path,
                                                           recording: Recording):
    stdout = plot(str(session))
    assert stdout.splitlines()[0].endswith(f"steps 1-{STEPS} ({session})")
    (block,) = chart_blocks(stdout)
    assert block[0].strip() == "loss"
    assert_axis_spans(block, recording.scalar("loss"))
    assert x_ticks(block)[0] == "1" and x_ticks(block)[-1] == str(STEPS)
    assert drawn(block) >= STEPS // 2
    assert all(len(ln) <= WIDTH for ln in block)


def test_a_layer_statistic_draws_one_line_per_matching_layer(session: Path,
                                                             recording: Recording):
    layers = recording.schema["layers"]
    chosen = [i for i, name in enumerate(layers) if name in ("0", "2")]
    stdout = plot(str(session), "mean", "--layer", "[02]")
    (block,) = chart_blocks(stdout)
    assert block[0].strip() == "mean of layers matching '[02]'"
    assert_axis_spans(block, recording.layer_stat("mean")[:, chosen])
    legend = [re.search(r"[┤│]\s*(\S)\1 (\S+)", ln) for ln in block[2:5]]
    assert [m.group(2) for m in legend if m] == ["0", "2"]  # each with its own marker
    assert legend[0].group(1) != legend[1].group(1)


def test_several_statistics_print_a_chart_each_and_a_run_id_resolves(session: Path,
                                                                     recording: Recording):
    run_id = str(recording.schema["run"])
    stdout = plot(run_id, "loss", "lr", "dead_frac",
                  env={"NEUROTOP_RUNS_DIR": str(session.parent.parent)})
    blocks = chart_blocks(stdout)
    assert [b[0].strip() for b in blocks] == ["loss", "lr", "dead_frac by layer"]
    assert_axis_spans(blocks[2], recording.layer_stat("dead_frac"))


def test_a_long_run_is_thinned_and_keeps_its_range_and_its_spikes(tmp_path: Path):
    steps = np.arange(1, 20_001)
    values = np.sin(steps / 300.0)
    values[[77, 12_345]] = [-9.0, 50.0]  # one-point spikes either way
    s, v = thin(steps, values)
    assert len(s) <= 2 * MAX_BUCKETS and np.all(np.diff(s) > 0)
    assert (v.min(), v.max()) == (-9.0, 50.0) and {77, 12_345} <= set(s - 1)
    np.testing.assert_array_equal(v, values[s - 1])  # recorded points, not made-up ones

    path = tmp_path / "long.ntop"  # 3,000 reported steps through the CLI
    write_run(path, 3000)
    recorded = read_recording(path)
    (block,) = chart_blocks(plot(str(path), "grad_norm"))
    assert_axis_spans(block, recorded.scalar("grad_norm"))


def one_line_error(out, *naming: str) -> str:
    assert out.returncode == 2, out.stdout
    assert out.stdout == "" and len(out.stderr.splitlines()) == 1, out.stderr
    assert all(n in out.stderr for n in naming), out.stderr
    return out.stderr


def test_bad_input_is_one_line_and_a_non_zero_exit(session: Path, recording: Recording,
                                                   tmp_path: Path):
    err = one_line_error(neurotop("plot", str(session), "no_such_stat"), "no_such_stat")
    for name in recording.schema["scalars"] + recording.schema["stats"]:
        assert name in err  # the known ones, to choose from
    one_line_error(neurotop("plot", str(session), "mean", "--layer", "zz*"),
                   "no layer matches 'zz*'", "layers: 0, 1, 2")
    one_line_error(neurotop("plot", str(session), "mem_device"),  # NaN on a CPU run
                   "mem_device has no finite value")
    empty = tmp_path / "empty.ntop"
    b = SessionBuilder(empty)
    b.put({"kind": "schema", "schema_id": 1, "layers": ["a"], "stats": ["mean"],
           "scalars": ["loss"]}, t=b.t0)
    b.close()
    one_line_error(neurotop("plot", str(empty)), "no reported steps")
    one_line_error(neurotop("plot", str(tmp_path / "missing.ntop")), "no session file")
    one_line_error(neurotop("plot", str(session), "--width", "5"), "--width >= 20")
