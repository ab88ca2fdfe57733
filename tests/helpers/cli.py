"""The ``neurotop`` command, run as a user runs it: a separate process."""

from __future__ import annotations

import os
import subprocess
import sys


def neurotop(*args: str, env: dict[str, str] | None = None,
             timeout: float = 30) -> subprocess.CompletedProcess:
    """``neurotop ARGS`` with this environment plus ``env``; output captured as text."""
    return subprocess.run([sys.executable, "-c", "from neurotop.tui.cli import main; main()",
                           *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
