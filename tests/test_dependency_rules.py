"""The UI starts without PyTorch; the agent never loads the UI toolkit."""

from __future__ import annotations

import subprocess
import sys

TUI_MODULES = ["tui.cli", "tui.app", "tui.client", "tui.store", "tui.widgets", "tui.targets",
               "tui.plotting", "tui.remote", "tui.children", "tui.control_panel", "tui.replay",
               "tui.replay_app", "tui.sessionload", "tui.backfill", "tui.export", "tui.dashboard",
               "tui.health", "tui.history", "tui.view"]


def run_py(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_tui_never_imports_torch():
    code = ("import sys, importlib\n"
            f"for m in {TUI_MODULES!r}: importlib.import_module(m)\n"
            "print(sorted(k for k in sys.modules if k == 'torch' or k.startswith('torch.')))")
    assert run_py(code) == "[]"


def test_tui_works_with_torch_unimportable():
    """Block torch outright: importing the UI and building its app must still work."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from tui.app import NeurotopApp; from tui.client import LiveClient, Endpoints\n"
            "NeurotopApp(LiveClient(Endpoints('tcp://127.0.0.1:9'))); print('ok')")
    assert run_py(code) == "ok"


def test_agent_never_imports_textual_or_plotext():
    code = ("import sys, agent.monitor, agent.service, agent.stats, agent.control,"
            " agent.knobs, agent.autopause, agent.snapshot, agent.recorder, agent.sessionfile,"
            " agent.runs, agent.collector, agent.layers, agent.param_stats, agent.report,"
            " agent.packing\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('textual', 'plotext')))")
    assert run_py(code) == "[]"


def test_agent_package_import_is_lazy():
    code = ("import sys, agent, agent.wire, agent.connfile, agent.binding, agent.control,"
            " agent.autopause, agent.sessionfile, agent.runs, agent.recorder, agent.config,"
            " agent.histograms, agent.detectors; agent.StopTraining; agent.AlertRules;"
            " print('torch' in sys.modules)")
    assert run_py(code) == "False"
