"""The ``neurotop`` command: attach, demo, ls, ctl, replay, export."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from neurotop.protocol import connfile, runs
from neurotop.protocol.commands import parse_value, set_args, split_knob
from neurotop.protocol.sessionfile import SessionFormatError, SessionReader
from neurotop.tui.data import remote
from neurotop.tui.data.children import die_with_parent, log_tail, open_log
from neurotop.tui.data.client import CommandError, LiveClient
from neurotop.tui.data.targets import TargetError, resolve

DEMOS = Path(__file__).resolve().parent.parent / "demos"


def _die(msg: str, code: int = 2) -> None:
    print(f"neurotop: {msg}", file=sys.stderr)
    sys.exit(code)


def cmd_attach(args: argparse.Namespace) -> None:
    try:
        endpoints = resolve(args.target, read_only=args.read_only)
    except TargetError as e:
        _die(str(e))
    _run_ui(endpoints, read_only=args.read_only)


def _run_ui(endpoints, read_only: bool) -> None:
    from neurotop.tui.screens.app import NeurotopApp  # textual loads only for commands that draw

    client = LiveClient(endpoints, backfill=True).start()
    try:
        NeurotopApp(client, read_only=read_only).run()
    finally:
        client.close()


def _session_summary(path: Path) -> dict | None:
    try:
        with SessionReader(path) as r:
            s = r.summary()
    except (OSError, SessionFormatError):
        return None
    s["start_time"] = _when(s["start_time"])  # from the file: anything msgpack holds
    s["run_id"] = str(s["run_id"])
    return s


def _when(t: object) -> float:
    """``t`` if it is a time ``time.localtime`` can show, else 0 (shown as the epoch)."""
    ok = isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
    return float(t) if ok and 0 <= t < 1e11 else 0.0


def list_runs() -> list[dict]:
    """Live runs (newest first), then recorded sessions of runs that ended (newest first)."""
    rows: list[dict] = []
    live_ids = set()
    for r in connfile.live_runs():
        row = {k: v for k, v in vars(r).items() if k != "key"}
        session = Path(r.run_dir) / runs.SESSION_FILE if r.run_dir else None
        summary = _session_summary(session) if session and session.is_file() else None
        row.update(state="live", session=str(session) if summary else "",
                   steps=summary["steps"] if summary else None,
                   size=summary["size"] if summary else None)
        rows.append(row)
        live_ids.add(r.run_id)
    ended = [s for p in runs.session_files() if (s := _session_summary(p)) is not None]
    for s in sorted(ended, key=lambda s: s["start_time"], reverse=True):
        if s["run_id"] not in live_ids:
            closed = s.pop("closed")
            rows.append({**s, "state": "ended" if closed else "ended*"})
    return rows


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def cmd_ls(args: argparse.Namespace) -> None:
    if args.target:
        live, where = _remote_runs(args.target)
        rows = [{**{k: v for k, v in vars(r).items() if k != "key"}, "state": "live",
                 "session": "", "steps": None, "size": None} for r in live]
        empty = f"no live runs {where}"
    else:
        rows = list_runs()
        empty = (f"no live runs or recorded sessions (looked in {connfile.runtime_dir()},"
                 f" {runs.sessions_dir()} and {runs.runs_root()})")
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return
    if not rows:
        print(empty)
        return
    print(f"{'RUN':<24} {'NAME':<16} {'STARTED':<19} {'STEPS':>9} {'SIZE':>9}  {'STATE':<7} WHERE")
    for r in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(_when(r["start_time"])))
        steps = "-" if r["steps"] is None else str(r["steps"])
        where = r["telemetry"] if r["state"] == "live" else r["session"]
        print(f"{r['run_id']:<24} {str(r['name'])[:16]:<16} {started:<19} {steps:>9}"
              f" {_size(r['size']):>9}  {r['state']:<7} {where}")
    if any(r["state"] == "ended*" for r in rows):
        print("ended*: the run stopped without closing its session (killed or crashed);"
              " it replays up to its last flush")


def _open_session(target: str):
    from neurotop.tui.data.replay_source import (
        ReplaySource,  # textual-free, but numpy-heavy: load on demand
    )

    try:
        return ReplaySource(runs.find_session(target))
    except (LookupError, OSError, ValueError) as e:  # ValueError: also SessionFormatError
        _die(str(e))


def _report_problems(source) -> None:
    for p in source.problems:
        print(f"neurotop: {source.path}: {p}", file=sys.stderr)


def cmd_replay(args: argparse.Namespace) -> None:
    source = _open_session(args.file)
    print(f"neurotop: loading {source.path} ({_size(source.reader.size)})", file=sys.stderr)
    source.start()
    if args.step is not None:
        source.seek_step(args.step).result(10)
    from neurotop.tui.screens.replay_app import ReplayApp

    try:
        ReplayApp(source).run()
    finally:
        source.close()
        _report_problems(source)


def cmd_export(args: argparse.Namespace) -> None:
    from neurotop.tui.data.export import export_csv

    source = _open_session(args.file)
    try:
        paths = export_csv(source, args.csv)
    except OSError as e:
        _die(f"cannot write {args.csv}: {e}")
    finally:
        source.close()
    _report_problems(source)
    for p in paths:
        print(p)


def _remote_runs(url: str) -> tuple[list[connfile.ConnectionInfo], str]:
    try:
        target = remote.SshTarget.parse(url) if url.startswith("ssh://") else None
        if target is None or target.run:
            _die(f"ls lists the runs of this machine or of ssh://[user@]host[:port], not {url!r}")
        listing = remote.list_runs(target)
    except remote.SshError as e:
        _die(str(e))
    return listing.live, listing.where
CTL_COMMANDS = ("pause", "resume", "step", "set", "knobs", "snapshot", "stop")
ACK_FIELDS = ("id", "cmd", "ok", "step", "old", "new", "until", "applied_to", "pinned",
              "knobs")


def ctl_args(command: str, words: list[str]) -> dict:
    """``step 3`` -> ``{"n": 3}``; ``set lr x0.5`` -> ``{"knob": "lr", "value": 0.5,
    "op": "mul"}``. Raises ``ValueError`` with a usage message."""
    if command == "step":
        if len(words) != 1 or not words[0].isdigit() or int(words[0]) < 1:
            raise ValueError("usage: neurotop ctl TARGET step N (N >= 1 optimizer steps)")
        return {"n": int(words[0])}
    if command == "set":
        if len(words) != 2:
            raise ValueError("usage: neurotop ctl TARGET set KNOB VALUE (VALUE: a number,"
                             " true/false, xFACTOR, or release); list knobs with: ctl TARGET"
                             " knobs")
        split_knob(words[0])
        value, op = parse_value(words[1])
        return set_args(words[0], value, op)
    if words:
        raise ValueError(f"{command} takes no arguments, got {' '.join(words)}")
    return {}


def cmd_ctl(args: argparse.Namespace) -> None:
    try:
        cmd_args = ctl_args(args.command, args.args)
    except ValueError as e:
        _die(str(e))
    try:
        endpoints = resolve(args.target)
    except TargetError as e:
        _die(str(e))
    client = LiveClient(endpoints).start()
    try:
        ack = client.command(args.command, cmd_args, timeout=args.timeout).result(
            timeout=args.timeout + 1)
    except CommandError as e:
        _die(f"{args.command} rejected: {e}", 1)
    except TimeoutError:
        _die(f"{args.command}: no acknowledgement within {args.timeout} s", 1)
    finally:
        client.close()
    print(json.dumps({k: ack.get(k) for k in ACK_FIELDS if k in ack}, default=str))


def _spawn_demo(script: Path, extra: list[str], run_id: str,
                log: Path) -> subprocess.Popen:
    """The demo, its stdout and stderr appended to ``log``: a pipe nobody reads once the UI
    runs would fill and block the demo (its training and its agent) in a write."""
    env = dict(os.environ, NEUROTOP_RUN_ID=run_id, PYTHONUNBUFFERED="1")
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, str(script), *extra], env=env,
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent)


def _stop_child(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cmd_demo(args: argparse.Namespace) -> None:
    if args.script is not None:
        script = args.script
        if not script.is_file():
            _die(f"no training script {script}")
    else:
        script = DEMOS / f"{args.name}.py"
        if not script.exists():
            found = ", ".join(p.stem for p in DEMOS.glob("*.py")) or "none"
            _die(f"no demo {args.name!r} in {DEMOS} (found: {found}); the demos ship with a"
                 " source checkout: pip install -e .")
    if args.no_ui:
        print(f"neurotop: starting {script.name}; attach from another terminal with:"
              "  neurotop attach", flush=True)
        os.execv(sys.executable, [sys.executable, str(script), *args.demo_args])
    run_id = connfile.new_run_id()
    try:
        log = open_log(runs.runs_root() / run_id, "demo.log")
    except OSError as e:
        _die(f"cannot create the demo's log file: {e}")
    print(f"neurotop: the demo's output goes to {log}", file=sys.stderr)
    proc = _spawn_demo(script, args.demo_args, run_id, log)
    try:
        info = _wait_for_run(proc, run_id, log, timeout=60)
        try:
            endpoints = resolve(info.run_id)
        except TargetError as e:
            _die(str(e))
        _run_ui(endpoints, read_only=False)
    finally:
        _stop_child(proc)
    if proc.returncode not in (0, -signal.SIGINT):
        _die(f"the demo exited with code {proc.returncode}; the end of {log}:\n"
             f"{log_tail(log)}", 1)
    print(f"neurotop: the demo's output is in {log}", file=sys.stderr)


def _wait_for_run(proc: subprocess.Popen, run_id: str, log: Path,
                  timeout: float) -> connfile.ConnectionInfo:
    """Wait for the demo's connection file, showing progress; explain if the demo died."""
    path = connfile.conn_path(run_id)
    deadline = time.monotonic() + timeout
    print("neurotop: starting the demo (importing torch)", end="", flush=True, file=sys.stderr)
    while not path.exists():
        if proc.poll() is not None:
            print(file=sys.stderr)
            _die(f"the demo exited with code {proc.returncode} before it started"
                 f" (its output: {log}):\n{log_tail(log)}")
        if time.monotonic() > deadline:
            print(file=sys.stderr)
            _die(f"the demo did not start within {timeout:.0f} s")
        print(".", end="", flush=True, file=sys.stderr)
        time.sleep(0.25)
    print(file=sys.stderr)
    return connfile.read(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="neurotop", description="top for neural-network training")
    sub = p.add_subparsers(dest="command_name", required=True, metavar="COMMAND")

    a = sub.add_parser("attach", help="watch a live run (default: the newest on this machine)")
    a.add_argument("target", nargs="?", help="run id or prefix, connection file,"
                   " ssh://[user@]host[:port][/RUN], or tcp://host:port")
    a.add_argument("--read-only", action="store_true", help="watch only; no control")
    a.set_defaults(func=cmd_attach)

    d = sub.add_parser("demo", help="run a CPU demo training with the UI attached",
                       description="Run a CPU demo training with the UI attached. The demo's"
                       " output (stdout and stderr) goes to demo.log in its run directory,"
                       " <runs root>/<run id>/ ($NEUROTOP_RUNS_DIR or ./neurotop_runs), beside"
                       " its session file (in the temp directory if that cannot be written);"
                       " neurotop prints the path, and the end of the log"
                       " if the demo fails. --no-ui runs it in this terminal instead.")
    d.add_argument("--name", default="mlp", help="which demo in demos/ (default: mlp)")
    d.add_argument("--script", type=Path, metavar="PATH",
                   help="run this training script (one that calls neurotop.watch) instead")
    d.add_argument("--no-ui", action="store_true", help="run headless and print how to attach")
    d.add_argument("demo_args", nargs=argparse.REMAINDER,
                   help="anything else is passed to the demo script (e.g. --steps 500)")
    d.set_defaults(func=cmd_demo)

    ls = sub.add_parser("ls", help="list live runs and recorded sessions on this machine,"
                        " or the live runs of a host over ssh")
    ls.add_argument("target", nargs="?", help="ssh://[user@]host[:port] (default: this machine)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)

    c = sub.add_parser("ctl", help="send one command to a run and print its acknowledgement")
    c.add_argument("target", help="run id or prefix, connection file, or"
                   " ssh://[user@]host[:port][/RUN]")
    c.add_argument("command", choices=CTL_COMMANDS)
    c.add_argument("args", nargs="*", metavar="ARG", help="step N | set KNOB VALUE")
    c.add_argument("--timeout", type=float, default=10.0)
    c.set_defaults(func=cmd_ctl)

    r = sub.add_parser("replay", help="replay a recorded session in the same UI, with a timeline")
    r.add_argument("file", help="a session file, a run directory, or a recorded run's id")
    r.add_argument("--step", type=int, help="open at this step (default: the end)")
    r.set_defaults(func=cmd_replay)

    e = sub.add_parser("export", help="write a recorded session as CSV tables")
    e.add_argument("file", help="a session file, a run directory, or a recorded run's id")
    e.add_argument("--csv", type=Path, required=True, metavar="DIR",
                   help="directory for scalars.csv, layers.csv and events.csv")
    e.set_defaults(func=cmd_export)

    args, extra = p.parse_known_args(argv)
    if args.func is cmd_demo:
        rest = [*extra, *args.demo_args]
        args.demo_args = rest[1:] if rest[:1] == ["--"] else rest
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(format="%(message)s")  # warnings (a skipped bad file): one line each
    try:
        args.func(args)
    except OSError as e:  # the machine's answer (a runtime directory not ours, a full disk)
        _die(str(e))
