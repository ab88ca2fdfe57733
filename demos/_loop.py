"""What every demo shares: its run options and the loop around its training step.

A module of the demos package, not a demo (``neurotop demo`` lists no name that starts
with ``_``); the demos import it as ``neurotop.demos._loop``, run as scripts or as modules.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Protocol


class Watched(Protocol):
    """What the loop needs of ``neurotop.watch(...)``'s monitor."""

    run_id: str
    connection_file: object
    should_stop: bool


def run_options(p: argparse.ArgumentParser, *, threads: bool = True,
                step_sleep: float = 0.0) -> None:
    """``--steps``, ``--report-every``, ``--threads`` (unless the demo sets its own) and
    ``--step-sleep``, with the defaults every demo shares."""
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: never)")
    p.add_argument("--report-every", type=int, default=5)
    if threads:
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--step-sleep", type=float, default=step_sleep,
                   help="seconds to sleep per step (slows the run down for viewing)")


def train(mon: Watched, args: argparse.Namespace, step: Callable[[int], None], *,
          banner: str | None = None, stop_note: str | None = "") -> tuple[int, bool]:
    """Print the run's line (``banner``: another one; empty: none), then call ``step(i)``
    for i = 0, 1, ... until ``--steps`` steps ran or an operator's stop (X in the UI,
    ``neurotop ctl RUN stop``: the step under way finishes, the loop ends, the demo's
    with-block closes the monitor), sleeping ``--step-sleep`` after each. Ctrl-C ends it
    quietly. A stop is said with ``stop_note`` after the step (None: not said). Returns the
    steps run and whether Ctrl-C ended them."""
    line = (f"neurotop: run {mon.run_id} (connection file {mon.connection_file})"
            if banner is None else banner)
    if line:
        print(line, flush=True)
    done, interrupted = 0, False
    try:
        while (args.steps == 0 or done < args.steps) and not mon.should_stop:
            step(done)
            done += 1
            if args.step_sleep:
                time.sleep(args.step_sleep)
    except KeyboardInterrupt:  # under torchrun, passed on to every rank
        interrupted = True
    if mon.should_stop and stop_note is not None:
        print(f"neurotop: stopped at step {done}{stop_note}", flush=True)
    return done, interrupted
