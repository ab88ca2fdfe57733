"""At run time, not only in the import graph (``tests/test_contracts.py``): the UI starts
with PyTorch blocked outright, ``import neurotop`` is lazy, the agent never loads the UI
toolkit. Modules are found by walking the packages, so a new one cannot be left out."""

from __future__ import annotations

import subprocess
import sys

WALK = ("import importlib, pkgutil, sys\n"
        "def walk(pkg):\n"
        "    p = importlib.import_module(pkg)\n"
        "    return [m.name for m in pkgutil.walk_packages(p.__path__, pkg + '.')]\n")


def run_py(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_the_whole_ui_imports_and_builds_with_torch_unimportable():
    code = ("import sys; sys.modules['torch'] = None\n" + WALK +
            "mods = walk('neurotop.tui'); [importlib.import_module(m) for m in mods]\n"
            "from neurotop.tui.screens.app import NeurotopApp\n"
            "from neurotop.tui.data.client import LiveClient, Endpoints\n"
            "NeurotopApp(LiveClient(Endpoints('tcp://127.0.0.1:9')))\n"
            "print(len(mods) > 20, 'neurotop.tui.screens.app' in mods)")
    assert run_py(code) == "True True"


def test_the_agent_never_imports_textual_or_plotext():
    code = (WALK + "mods = [m for m in walk('neurotop') if not m.startswith('neurotop.tui')]\n"
            "[importlib.import_module(m) for m in mods]\n"
            "print('neurotop.monitor' in mods,"
            " sorted(k for k in sys.modules if k.split('.')[0] in ('textual', 'plotext')))")
    assert run_py(code) == "True []"


def test_import_neurotop_is_lazy():
    """The public names that are plain data come without torch; ``watch`` brings it."""
    code = ("import sys, neurotop\n"
            "neurotop.StopTraining; neurotop.Config; neurotop.AlertRules\n"
            "import neurotop.protocol.wire, neurotop.service.loop, neurotop.service.finalize\n"
            "lazy = 'torch' not in sys.modules\n"
            "neurotop.watch\n"
            "print(lazy, 'torch' in sys.modules, sorted(set(neurotop.__all__) - set(dir(neurotop))"
            " - {'watch', 'Monitor', 'StopTraining', 'Config', 'AlertRules'}))")
    assert run_py(code) == "True True []"
