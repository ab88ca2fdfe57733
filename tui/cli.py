"""The ``neurotop`` command: attach, demo, ls, ctl."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent import connfile
from agent.control import parse_value, split_knob
from tui import remote
from tui.children import die_with_parent
from tui.client import CommandError, LiveClient
from tui.targets import TargetError, resolve

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
    from tui.app import NeurotopApp  # textual loads only for commands that draw

    client = LiveClient(endpoints).start()
    try:
        NeurotopApp(client, read_only=read_only).run()
    finally:
        client.close()


def cmd_ls(args: argparse.Namespace) -> None:
    if args.target:
        runs, where = _remote_runs(args.target)
    else:
        runs, where = connfile.live_runs(), f"(looked in {connfile.runtime_dir()})"
    if args.json:
        print(json.dumps([{k: v for k, v in vars(r).items() if k != "key"} for r in runs],
                         indent=1))
        return
    if not runs:
        print(f"no live runs {where}")
        return
    print(f"{'RUN':<24} {'NAME':<16} {'PID':>7}  {'STARTED':<19}  TELEMETRY")
    for r in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.start_time))
        print(f"{r.run_id:<24} {r.name[:16]:<16} {r.pid:>7}  {started:<19}  {r.telemetry}")


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
ACK_FIELDS = ("id", "cmd", "ok", "step", "old", "new", "until", "applied_to", "knobs")


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
                             " true/false, or xFACTOR); list knobs with: ctl TARGET knobs")
        split_knob(words[0])
        value, op = parse_value(words[1])
        return {"knob": words[0], "value": value, **({"op": op} if op == "mul" else {})}
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


def _spawn_demo(script: Path, extra: list[str], run_id: str) -> subprocess.Popen:
    env = dict(os.environ, NEUROTOP_RUN_ID=run_id, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(script), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=die_with_parent)


def _stop_child(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cmd_demo(args: argparse.Namespace) -> None:
    script = DEMOS / f"{args.name}.py"
    if not script.exists():
        found = ", ".join(p.stem for p in DEMOS.glob("*.py")) or "none"
        _die(f"no demo {args.name!r} in {DEMOS} (found: {found}); the demos ship with a"
             " source checkout: pip install -e .")
    if args.no_ui:
        print(f"neurotop: starting demo {args.name}; attach from another terminal with:"
              "  neurotop attach", flush=True)
        os.execv(sys.executable, [sys.executable, str(script), *args.demo_args])
    run_id = connfile.new_run_id()
    proc = _spawn_demo(script, args.demo_args, run_id)
    try:
        info = _wait_for_run(proc, run_id, timeout=60)
        endpoints = resolve(info.run_id)
        _run_ui(endpoints, read_only=False)
    finally:
        _stop_child(proc)


def _wait_for_run(proc: subprocess.Popen, run_id: str, timeout: float) -> connfile.ConnectionInfo:
    """Wait for the demo's connection file, showing progress; explain if the demo died."""
    path = connfile.conn_path(run_id)
    deadline = time.monotonic() + timeout
    print("neurotop: starting the demo (importing torch)", end="", flush=True, file=sys.stderr)
    while not path.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            print(file=sys.stderr)
            _die(f"the demo exited with code {proc.returncode} before it started:\n{err}")
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

    d = sub.add_parser("demo", help="run a CPU demo training with the UI attached")
    d.add_argument("--name", default="mlp", help="which demo in demos/ (default: mlp)")
    d.add_argument("--no-ui", action="store_true", help="run headless and print how to attach")
    d.add_argument("demo_args", nargs=argparse.REMAINDER,
                   help="anything else is passed to the demo script (e.g. --steps 500)")
    d.set_defaults(func=cmd_demo)

    ls = sub.add_parser("ls", help="list live runs on this machine or over ssh")
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

    args, extra = p.parse_known_args(argv)
    if args.func is cmd_demo:
        rest = [*extra, *args.demo_args]
        args.demo_args = rest[1:] if rest[:1] == ["--"] else rest
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.func(args)
