"""The layout's promises, checked on the package as it ships: import contracts hold (and a
breach is caught), one top-level package, no clash with a user's own ``agent.py``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from tests.helpers.package import ROOT, build_wheel, env_with, lint_imports, unpack


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def tree(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack(wheel, tmp_path_factory.mktemp("installed"))


def test_import_contracts_hold(tree: Path):
    out = lint_imports(tree)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout or "broken" not in out.stdout, out.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("tui/data/store.py", "import torch", "The UI imports nothing from the agent but the protocol"),
    ("tui/data/store.py", "import textual", "The UI's data side never imports textual"),
    ("protocol/wire.py", "import torch", "The protocol imports neither torch nor textual"),
    ("service/detectors.py", "import torch", "The agent thread and the config import no torch"),
    ("tui/screens/widgets.py", "from neurotop.training import stats",
     "The UI imports nothing from the agent but the protocol"),
    ("training/knobs.py", "from neurotop.tui.data import store",
     "Every module sits in a layer"),
    ("integrations/lightning.py", "from neurotop.tui.data import store",
     "The framework callbacks run in training: they never import the UI"),
])
def test_a_deliberate_violation_breaks_its_contract(tree: Path, tmp_path: Path, module: str,
                                                    line: str, contract: str):
    bad = shutil.copytree(tree, tmp_path / "bad")
    f = bad / "neurotop" / module
    f.write_text(f.read_text() + f"\n{line}  # a deliberate violation\n")
    out = lint_imports(bad)
    assert out.returncode != 0, out.stdout
    broken = out.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, out.stdout
    assert f"neurotop.{module[:-3].replace('/', '.')}" in broken, out.stdout


def test_a_new_agent_module_falls_under_the_ui_contract(tree: Path):
    """The UI's forbidden list names every child of ``neurotop`` but the protocol and the UI
    itself, so a module added to the agent cannot escape it (the layers contract, which is
    exhaustive, already makes a new module name its layer)."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (ui,) = [c for c in conf["contracts"] if c.get("source_modules") == ["neurotop.tui"]]
    children = {p.stem if p.suffix == ".py" else p.name
                for p in (tree / "neurotop").iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    forbidden = {m.split(".", 1)[1] for m in ui["forbidden_modules"] if m.startswith("neurotop.")}
    assert forbidden == children - {"protocol", "tui"}


def test_the_wheel_installs_one_top_level_package(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist()}
        names = z.namelist()
    assert tops == {"neurotop", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "neurotop/tui/screens/app.py" in names and "neurotop/protocol/wire.py" in names
    assert "neurotop/__init__.py" in names


USER_SCRIPT = '''
import sys
import torch
import neurotop

assert neurotop.__file__.startswith(sys.argv[1]), neurotop.__file__
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with neurotop.watch(model, opt, record=False, report_every=2) as mon:
    for _ in range(6):
        x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.observe(loss=loss)
    assert mon.step == 6
import neurotop.tui.cli
print("trained", mon.step, sorted(m for m in sys.modules if m in ("agent", "tui")))
'''


@pytest.mark.slow
def test_a_script_beside_its_own_agent_and_tui_modules_embeds_neurotop(tree: Path,
                                                                        tmp_path: Path):
    """RL code often has an ``agent.py``: neurotop must not import it, nor clash with it."""
    (tmp_path / "agent.py").write_text("raise SystemExit('the user agent.py was imported')\n")
    (tmp_path / "tui.py").write_text("raise SystemExit('the user tui.py was imported')\n")
    (tmp_path / "train.py").write_text(USER_SCRIPT)
    out = subprocess.run([sys.executable, "train.py", str(tree)], cwd=tmp_path,
                         env=env_with(tree), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "trained 6 []"
