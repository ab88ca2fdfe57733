"""``train.py`` in a program that installed its own SIGTERM and SIGHUP handler before
``watch()``: the handler prints ``USER HANDLER <signal number>`` and exits with status 7,
as a program that saves its own state on a scheduler's SIGTERM would."""

from __future__ import annotations

import runpy
import signal
import sys
from pathlib import Path
from types import FrameType


def on_signal(signum: int, frame: FrameType | None) -> None:
    print("USER HANDLER", signum, flush=True)
    sys.exit(7)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    runpy.run_path(str(Path(__file__).with_name("train.py")), run_name="__main__")
