"""A wheel works on its own (issue 18, item 4): installed into a fresh virtual environment,
away from this checkout, ``neurotop demo`` runs every demo it lists, and without PyTorch it
says in one line which extra the demos need.

The venv sees the packages of the environment the tests run in (torch and the other
dependencies need no download, so the install is ``--no-index``) but gets its own
``neurotop`` from the wheel; the test checks that the package, and the demos it runs,
come from the venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from neurotop.protocol.sessionfile import SessionReader
from tests.helpers.package import build_wheel
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow

#: The demo's options for a short run; ``--report-every`` 5 is its default.
STEPS, REPORT_EVERY = 50, 5
NO_TORCH = "import sys; sys.modules['torch'] = None; from neurotop.tui.cli import main; main()"


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with ``neurotop[agent]`` installed from the wheel built from this checkout."""
    wheel = build_wheel(tmp_path_factory.mktemp("wheel"))
    root = tmp_path_factory.mktemp("venv")
    # --without-pip: the venv's own pip and setuptools would shadow the ones the tests run
    # with, and torch requires a newer setuptools than venv bundles; that pip installs into it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   capture_output=True, timeout=120)
    _see_this_environment(root)
    out = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "--no-index",
                          "--disable-pip-version-check", "-q",
                          f"neurotop[agent] @ {wheel.as_uri()}"],
                         capture_output=True, text=True, timeout=300, env=_env(root))
    assert out.returncode == 0, out.stdout + out.stderr
    return root


def _see_this_environment(venv: Path) -> None:
    """Let ``venv`` import what the tests' own environment has installed (torch, pyzmq, pip),
    after its own site-packages: a ``.pth`` file listing this environment's site directories.
    ``--system-site-packages`` would show the base interpreter's instead, which lacks them
    when the tests run from a virtual environment."""
    site = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (Path(site) / "_tests_environment.pth").write_text("\n".join(ours) + "\n")


def _env(venv: Path) -> dict[str, str]:
    """This test's environment (its runtime and runs directories) without a PYTHONPATH that
    could lead back to the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(venv: Path, *argv: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=_env(venv))


def test_the_wheel_runs_every_demo_it_lists(venv: Path, tmp_path: Path):
    site = venv / "lib"
    py = str(venv / "bin" / "python")
    where = _run(venv, py, "-c", "import neurotop, neurotop.tui.cli, neurotop.demos;"
                 " print(neurotop.__file__); print(neurotop.tui.cli.__file__);"
                 " print(neurotop.demos.__file__)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    for path in where.stdout.split():
        assert Path(path).is_relative_to(site), f"{path} is not the wheel's: {where.stdout}"

    listing = _run(venv, str(venv / "bin" / "neurotop"), "demo", "--list", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    names = [ln.split()[0] for ln in listing.stdout.splitlines() if ln.strip()]
    assert "mlp" in names, listing.stdout
    assert "synthetic" in listing.stdout  # each name with its docstring's first line

    runs = Path(os.environ["NEUROTOP_RUNS_DIR"])
    for name in names:
        before = set(runs.glob("*/session.ntop"))
        pick = () if name == "mlp" else ("--name", name)  # mlp: the default, as users type it
        out = _run(venv, str(venv / "bin" / "neurotop"), "demo", *pick, "--no-ui", "--",
                   "--steps", str(STEPS), cwd=tmp_path)
        assert out.returncode == 0, f"demo {name}: {out.stdout}\n{out.stderr}"
        assert "attach from another terminal with:  neurotop attach" in out.stdout
        (session,) = set(runs.glob("*/session.ntop")) - before
        with SessionReader(session) as r:
            s = r.summary()
        assert s["closed"], f"demo {name} did not close its session"
        assert STEPS - REPORT_EVERY < s["steps"] <= STEPS, s


@pytest.mark.skipif(not shutil.which("tmux") and not os.environ.get("CI"),
                    reason="tmux is not installed (.ci/run installs it, so CI never skips this)")
def test_the_wheel_runs_the_demo_with_its_ui(venv: Path, tmp_path: Path):
    """Plain ``neurotop demo`` from the venv, in a real terminal: the UI shows the run live,
    and ``q`` quits it and the demo cleanly."""
    sock = f"neurotop-wheel-demo-{os.getpid()}"

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True,
                              timeout=20, env=_env(venv)).stdout

    def screen() -> str:
        return tmux("capture-pane", "-p", "-J", "-t", "ui")

    try:  # ``; sleep``: the window (and what neurotop printed last) stays after it exits
        tmux("new-session", "-d", "-s", "ui", "-x", "120", "-y", "40", "-c", str(tmp_path),
             f"{venv / 'bin' / 'neurotop'} demo; echo EXITED $?; sleep 600")
        wait_until(lambda: "LIVE" in screen(), timeout=120, what="the UI showing LIVE")
        tmux("send-keys", "-t", "ui", "q")
        wait_until(lambda: "EXITED" in screen(), timeout=30, what="neurotop to quit")
        assert "EXITED 0" in screen(), screen()
    finally:
        tmux("kill-server")


def test_without_torch_the_demo_names_the_agent_extra(venv: Path, tmp_path: Path):
    """``sys.modules['torch'] = None``: to this interpreter torch is not installed."""
    py = str(venv / "bin" / "python")
    for argv in (("demo",), ("demo", "--no-ui", "--", "--steps", "5"),
                 ("demo", "--script", __file__)):
        out = _run(venv, py, "-c", NO_TORCH, *argv, cwd=tmp_path, timeout=60)
        assert out.returncode == 2, out.stdout + out.stderr
        assert out.stderr.splitlines() == ["neurotop: the demos train with PyTorch, which is not"
                                           " installed: pip install 'neurotop[agent]'"]
    listing = _run(venv, py, "-c", NO_TORCH, "demo", "--list", cwd=tmp_path, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert "mlp" in [ln.split()[0] for ln in listing.stdout.splitlines()], listing.stdout
