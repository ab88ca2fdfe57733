"""The package as it ships: the wheel built from this checkout, unpacked where a test can
put it first on ``PYTHONPATH``. Built in a copy of the sources, so the checkout gets no
``build/`` folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: What the wheel is built from (everything ``pyproject.toml`` maps into the package).
SOURCES = ("pyproject.toml", "README.md", "agent", "tui", "demos")


def build_wheel(out: Path) -> Path:
    """``pip wheel`` of this checkout into ``out``; the wheel's path."""
    src = out / "src"
    src.mkdir(parents=True)
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(p, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q",
                    "--disable-pip-version-check", "-w", str(out)],
                   cwd=src, check=True, capture_output=True)
    (wheel,) = out.glob("neurotop-*.whl")
    return wheel


def unpack(wheel: Path, into: Path) -> Path:
    """The wheel's files under ``into``: a directory to put on ``PYTHONPATH``."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(into)
    return into


def env_with(tree: Path) -> dict[str, str]:
    """The environment of a process that imports ``neurotop`` from ``tree`` first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH", "")) if p)
    return env


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with this checkout's contracts over the package in ``tree``."""
    code = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run([sys.executable, "-c", code, "--no-cache",
                           "--config", str(ROOT / "pyproject.toml")],
                          cwd=ROOT, env=env_with(tree), capture_output=True, text=True,
                          timeout=120)
