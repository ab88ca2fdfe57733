"""The ``neurotop`` command: attach, demo, ls, ctl, replay, plot, export."""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from neurotop.protocol import connfile, runs
from neurotop.protocol.commands import parse_value, set_args, split_knob
from neurotop.protocol.sessionfile import (
    MESSAGE,
    SessionFormatError,
    SessionReader,
    decode_message,
    kind_code,
)
from neurotop.tui.data import remote
from neurotop.tui.data.children import die_with_parent, log_tail, open_log
from neurotop.tui.data.client import CommandError, Endpoints, LiveClient, RunGone
from neurotop.tui.data.ranks import JobClient
from neurotop.tui.data.targets import TargetError, resolve

#: Where ``demo`` and ``export --parquet`` send a user who lacks what they need.
NEEDS_TORCH = "the demos train with PyTorch, which is not installed: pip install 'neurotop[agent]'"
NEEDS_PYARROW = "--parquet needs pyarrow, which is not installed: pip install 'neurotop[parquet]'"

log = logging.getLogger(__name__)


def _die(msg: str, code: int = 2) -> None:
    print(f"neurotop: {msg}", file=sys.stderr)
    sys.exit(code)


def cmd_attach(args: argparse.Namespace) -> None:
    compare = _recorded(args.compare)  # a bad file fails first, as in replay
    try:
        endpoints = resolve(args.target, read_only=args.read_only)
    except TargetError as e:
        _die(str(e))
    _run_ui(endpoints, read_only=args.read_only, compare=compare)


def _run_ui(endpoints, read_only: bool, compare: list | None = None) -> None:
    _show(JobClient(endpoints, backfill=True), read_only, compare)  # a job: every rank


def _show(client: LiveClient, read_only: bool, compare: list | None = None) -> None:
    from neurotop.tui.screens.app import NeurotopApp  # textual loads only for commands that draw

    client.start()
    try:
        if compare:  # --compare: the recorded runs overlaid (tui/data/live_compare.py)
            from neurotop.tui.screens.live_compare_app import LiveCompareApp
            LiveCompareApp(client, compare, read_only=read_only).run()
        else:
            NeurotopApp(client, read_only=read_only).run()
    finally:
        client.close()
        for source in compare or ():
            source.close()
            _report_problems(source)


def _recorded(targets: list[str] | None) -> list:
    """The sessions ``--compare`` names, each opened (``replay``'s one-line errors) before
    any loads, then loaded once: a recording does not grow."""
    sources = [_open_session(target) for target in targets or ()]
    for source in sources:
        print(f"neurotop: loading {source.path} ({_size(source.reader.size)})",
              file=sys.stderr)
        source.load()
    return sources


def _session_summary(path: Path) -> dict | None:
    try:
        with SessionReader(path) as r:
            s = r.summary()
            s["start_time"] = _when(s["start_time"])  # from the file: anything msgpack holds
            s["duration_s"] = _duration(r, s["start_time"])
            s["loss"] = _last_loss(r)
    except (OSError, SessionFormatError):
        return None
    s["run_id"] = str(s["run_id"])
    return s


def _duration(r: SessionReader, start: float) -> float | None:
    """Seconds from the run's start to its last record (the index holds every record's
    time: nothing is read); None when either time is unknown."""
    t = r.index["t"]
    last = float(t.max()) if len(t) else 0.0
    return max(0.0, last - start) if start > 0 and math.isfinite(last) and last > 0 else None


def _last_loss(r: SessionReader) -> float | None:
    """The loss of the last report, from the last stats record and the schema before it:
    two records read through the index, so ``ls`` stays fast on long recordings. None
    when there is no report, no loss in the schema, or the records cannot be decoded."""
    idx = r.index
    messages = idx["type"] == MESSAGE
    stats = np.flatnonzero(messages & (idx["kind"] == kind_code("stats")))
    schemas = np.flatnonzero(messages & (idx["kind"] == kind_code("schema")))
    schemas = schemas[schemas < stats[-1]] if len(stats) else schemas[:0]
    if not len(schemas):
        return None
    recs = list(r.records(np.array([schemas[-1], stats[-1]])))
    if len(recs) != 2:  # one failed its CRC (``r.problems`` says which)
        return None
    try:
        schema, report = (decode_message(rec.body) for rec in recs)
    except ValueError as e:  # SessionFormatError, WireError: a record no reader decodes
        log.info("neurotop: %s: no last loss: %s", r.path, e)
        return None
    names = schema.header.get("scalars")
    if (schema.header.get("schema_id") != report.header.get("schema_id")
            or not isinstance(names, list) or "loss" not in names or len(report.arrays) < 2):
        return None
    scalars = report.arrays[1].reshape(-1)
    i = names.index("loss")
    return float(scalars[i]) if i < len(scalars) else None


def _when(t: object) -> float:
    """``t`` if it is a time ``time.localtime`` can show, else 0 (shown as the epoch)."""
    ok = isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
    return float(t) if ok and 0 <= t < 1e11 else 0.0


def job_rows(live: list[connfile.ConnectionInfo]) -> list[dict]:
    """One row per run, newest first: a job's is its lowest rank's connection file (rank 0
    on the head node: the job's control and relays) with ``ranks``, every rank seen, and
    ``nodes``, their nodes (``host``, or ``host/node id``: two torchruns on one host are two
    nodes); ``telemetry`` is its first relay, the one endpoint to watch."""
    jobs: dict[str, list[connfile.ConnectionInfo]] = {}
    for r in live:
        jobs.setdefault(r.run_id, []).append(r)
    rows = []
    for members in jobs.values():
        head = min(members, key=lambda m: m.rank)
        row = {k: v for k, v in vars(head).items() if k != "key"}
        row.update(ranks=sorted(m.rank for m in members),
                   nodes=sorted({f"{m.host}/{m.node}" if m.node else m.host for m in members}))
        if head.relays:
            row["telemetry"] = head.relays[0]
        rows.append(row)
    return rows


def list_runs() -> list[dict]:
    """Live runs (newest first; a job is one row), then recorded sessions of runs that ended
    (newest first)."""
    rows: list[dict] = []
    live_ids = set()
    for row in job_rows(connfile.live_runs()):
        session = Path(row["run_dir"]) / runs.SESSION_FILE if row["run_dir"] else None
        summary = _session_summary(session) if session and session.is_file() else None
        row.update(state="live", session=str(session) if summary else "",
                   **{k: summary[k] if summary else None
                      for k in ("steps", "size", "duration_s", "loss")})
        rows.append(row)
        live_ids.add(row["run_id"])
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


def _span(seconds: float | None) -> str:
    """``42s``, ``3m07s``, ``2h05m``, ``3d04h``: the two largest units, never cut."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _finite(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def cmd_ls(args: argparse.Namespace) -> None:
    if args.target:
        live, where = _remote_runs(args.target)
        rows = [{**r, "state": "live", "session": "", "steps": None, "size": None,
                 "duration_s": None, "loss": None} for r in job_rows(live)]
        empty = f"no live runs {where}"
    else:
        rows = list_runs()
        empty = (f"no live runs or recorded sessions (looked in {connfile.runtime_dir()},"
                 f" {runs.sessions_dir()} and {runs.runs_root()})")
    if args.json:  # strict JSON: a loss that is not finite is null
        print(json.dumps([{**r, "loss": r["loss"] if _finite(r["loss"]) else None}
                          for r in rows], indent=1, default=str))
        return
    if not rows:
        print(empty)
        return
    print(f"{'RUN':<24} {'NAME':<16} {'STARTED':<19} {'DURATION':>8} {'STEPS':>9} {'LOSS':>9}"
          f" {'SIZE':>9}  {'STATE':<7} WHERE")
    for r in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(_when(r["start_time"])))
        steps = "-" if r["steps"] is None else str(r["steps"])
        loss = "-" if r["loss"] is None else f"{r['loss']:.4g}"
        where = r["telemetry"] if r["state"] == "live" else r["session"]
        if len(r.get("ranks", ())) > 1:  # a job: one row, its ranks and nodes after
            nodes = len(r["nodes"])
            where += f"  (job: {len(r['ranks'])} ranks, {nodes} node{'s' * (nodes > 1)})"
        print(f"{r['run_id']:<24} {str(r['name'])[:16]:<16} {started:<19}"
              f" {_span(r['duration_s']):>8} {steps:>9} {loss:>9}"
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
    sources, job = [], None
    try:
        for target in args.file:  # every one opened (a clear error) before any loads
            sources.append(_open_session(target))
        for source in sources:
            print(f"neurotop: loading {source.path} ({_size(source.reader.size)})",
                  file=sys.stderr)
            if len(ranks := runs.rank_sessions(source.path)) > 1 and len(args.file) == 1:
                print(f"neurotop: a job of {len(ranks)} ranks (ranks {', '.join(map(str, ranks))}"
                      f" in {source.path.parent}): r shows the next rank, R all of them",
                      file=sys.stderr)
            elif len(ranks) > 1:
                print(f"neurotop: a job of {len(ranks)} ranks (ranks {', '.join(map(str, ranks))}"
                      f" in {source.path.parent}): this is rank 0; replay rank r with"
                      f" neurotop replay {source.path.parent}/session-r<r>.ntop, export writes"
                      " every rank", file=sys.stderr)
            source.start()
        if args.step is not None:
            sources[0].seek_step(args.step).result(10)
        from neurotop.tui.data.compare import Comparison
        from neurotop.tui.screens.replay_app import ReplayApp

        job = _job_replay(sources[0]) if len(sources) == 1 else None
        ReplayApp(sources[0], Comparison(sources) if len(sources) > 1 else None,
                  ranks=job).run()
    finally:
        if job is not None:
            job.close()
        for source in sources:
            source.close()
            _report_problems(source)


def _job_replay(source):
    """A job's recording (one file per rank beside ``source``): every rank's source, each
    following ``source``'s cursor; None for one process's."""
    from neurotop.tui.data.ranks import ReplayRanks

    try:
        return ReplayRanks.beside(source)
    except (OSError, ValueError) as e:  # ValueError: also SessionFormatError
        _die(str(e))


def cmd_export(args: argparse.Namespace) -> None:
    from neurotop.tui.data.export import export_csv, export_job, export_parquet

    if args.parquet is not None and importlib.util.find_spec("pyarrow") is None:
        _die(NEEDS_PYARROW)
    out, export = (args.csv, export_csv) if args.csv is not None else (args.parquet,
                                                                         export_parquet)
    source = _open_session(args.file)
    # A job's run directory: every rank's session, in tables with a ``rank`` column.
    sources = {0: source} | {rank: _open_session(str(p)) for rank, p
                             in runs.rank_sessions(source.path).items() if rank}
    try:
        paths = export_job(sources, out, export) if len(sources) > 1 else export(source, out)
    except OSError as e:
        _die(f"cannot write {out}: {e}")
    finally:
        for s in sources.values():
            s.close()
    for s in sources.values():
        _report_problems(s)
    for p in paths:
        print(p)


def cmd_plot(args: argparse.Namespace) -> None:
    from neurotop.tui.data.plots import PlotError, charts

    if args.width < 20 or args.height < 5:
        _die(f"a chart needs --width >= 20 and --height >= 5, not {args.width}x{args.height}")
    source = _open_session(args.file)
    try:
        source.load()
        found = charts(source.store, args.stats or ["loss"], args.layer)
    except PlotError as e:
        _die(f"{source.path}: {e}")
    finally:
        source.close()
    _report_problems(source)
    from neurotop.tui.charts import render  # plotext loads only for this command

    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    tl = source.timeline()
    meta = source.reader.meta
    print(f"{meta.get('name', '')} {meta.get('run_id', '')}: steps {tl.first_step}"
          f"-{tl.last_step} ({source.path})")
    for c in found:
        print()
        print(render(c, args.width, args.height, color))


def _remote_runs(url: str) -> tuple[list[connfile.ConnectionInfo], str]:
    try:
        target = remote.SshTarget.parse(url) if url.startswith("ssh://") else None
        if target is None or target.run:
            _die(f"ls lists the runs of this machine or of ssh://[user@]host[:port], not {url!r}")
        listing = remote.list_runs(target)
    except remote.SshError as e:
        _die(str(e))
    return listing.live, listing.where


CTL_COMMANDS = ("pause", "resume", "step", "set", "knobs", "snapshot", "stop", "probe")
CTL_USAGE = ("usage: neurotop ctl TARGET COMMAND [ARG ...] [--json] [--timeout S]; commands:"
             " pause, resume, step N, set KNOB VALUE, knobs, snapshot, stop, probe")
ACK_FIELDS = ("id", "cmd", "ok", "step", "old", "new", "until", "applied_to", "pinned",
              "knobs", "ranks", "reset", "units_reset", "notes")


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
    if args.target is None:
        _die(f"ctl needs a TARGET and a COMMAND ({CTL_USAGE})")
    if args.command is None:
        _die(f"ctl needs a COMMAND after {args.target} ({CTL_USAGE})")
    if args.command not in CTL_COMMANDS:
        _die(f"no ctl command {args.command!r} ({CTL_USAGE})")
    try:
        cmd_args = ctl_args(args.command, args.args)
    except ValueError as e:
        _die(str(e))
    try:
        endpoints = resolve(args.target)
    except TargetError as e:
        _die(str(e))
    table = args.command == "knobs" and not args.json and sys.stdout.isatty()
    client = LiveClient(endpoints).start()
    try:
        ack = client.command(args.command, cmd_args, timeout=args.timeout).result(
            timeout=args.timeout + 1)
        pins = _heartbeat_pins(client, ack.get("knobs")) if table else None
    except CommandError as e:
        _die(f"{args.command} rejected: {e}", 1)
    except TimeoutError:
        _die(f"{args.command}: no acknowledgement within {args.timeout} s", 1)
    finally:
        client.close()
    if table and isinstance(ack.get("knobs"), list):
        print(knobs_table(ack["knobs"], pins, shutil.get_terminal_size().columns))
    else:  # what scripts parse: keep it exactly as it is
        print(json.dumps({k: ack.get(k) for k in ACK_FIELDS if k in ack}, default=str))


def _heartbeat_pins(client: LiveClient, knobs: object, wait_s: float = 2.0) -> dict | None:
    """The pinned knobs, from the run's next heartbeat (every 0.5 s; the knobs ack does not
    carry them); None if none came within ``wait_s`` or the run has no knobs."""
    deadline = time.monotonic() + wait_s
    while knobs and not client.store.knob_values:  # heartbeats carry the knobs' values
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    with client.store.lock:
        return dict(client.store.knob_pins)


def _knob_value(v: object) -> str:
    """A knob's value in full (never cut): numbers in 6 significant digits, a value per
    target as ``target=value``."""
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "-"}[v]
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_knob_value(x)}" for k, x in v.items()) or "-"
    if isinstance(v, list):
        return ", ".join(map(_knob_value, v)) or "-"
    return str(v)


def _knob_bounds(k: dict) -> str:
    lo, hi = k.get("min"), k.get("max")
    if k.get("type") == "bool":
        return "true/false"
    if lo is not None and hi is not None:
        return f"{_knob_value(lo)}..{_knob_value(hi)}"
    if lo is not None:
        return f">= {_knob_value(lo)}"
    return f"<= {_knob_value(hi)}" if hi is not None else "any"


def knobs_table(knobs: list[dict], pins: dict | None, width: int) -> str:
    """``ctl knobs`` on a terminal: a knob a line (with its ``[group]`` or ``[glob]``
    selector), its value and bounds in full, whether an operator pinned it against the
    script (``-``: the script never writes it; ``?``: no heartbeat said), and its doc,
    wrapped to the terminal's width."""
    rows = [("KNOB", "VALUE", "BOUNDS", "PINNED", "DOC")]
    for k in knobs:
        name = str(k.get("name", "?")) + (f"[{k['selector']}]" if k.get("selector") else "")
        pinned = ("-" if not k.get("pinnable") else "?" if pins is None
                  else "yes" if k.get("name") in pins else "no")
        rows.append((name, _knob_value(k.get("value")), _knob_bounds(k), pinned,
                     " ".join(str(k.get("doc") or "").split())))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    indent = sum(widths) + 2 * len(widths)
    lines = []
    for r in rows:
        doc = textwrap.wrap(r[4], max(width - 1 - indent, 20)) or [""]
        lines.append("  ".join(f"{c:<{w}}" for c, w in zip(r[:4], widths, strict=True))
                     + "  " + doc[0])
        lines += [" " * indent + more for more in doc[1:]]
    return "\n".join(lines)


def _spawn_demo(script: Path, extra: list[str], run_id: str,
                log: Path) -> subprocess.Popen:
    """The demo, its stdout and stderr appended to ``log``: a pipe nobody reads once the UI
    runs would fill and block the demo (its training and its agent) in a write."""
    env = dict(os.environ, NEUROTOP_RUN_ID=run_id, PYTHONUNBUFFERED="1")
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, str(script), *extra], env=env,
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent)


#: How long a demo gets to close its recording after SIGINT before it is killed: a few
#: seconds on an idle machine; a loaded one (CI on 2 cores) needed more than 5.
DEMO_CLOSE_S = 30.0


def _stop_child(proc: subprocess.Popen) -> None:
    """SIGINT (the demo finishes its step and closes its session file), then SIGKILL only
    if it has not exited after ``DEMO_CLOSE_S``: killing it early would lose the recording's
    end."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            print("neurotop: waiting for the demo to close its recording…", file=sys.stderr)
            try:
                proc.wait(DEMO_CLOSE_S - 3)
            except subprocess.TimeoutExpired:
                print(f"neurotop: the demo did not exit {DEMO_CLOSE_S:.0f} s after SIGINT;"
                      " killed it", file=sys.stderr)
                proc.kill()
                proc.wait()


def demos() -> dict[str, tuple[Path, str]]:
    """The demos this install ships (package ``neurotop.demos``: the checkout's ``demos/``
    in an editable install), by name: each script and its docstring's first line. Found
    without importing them: a demo imports torch, and the UI may run without it."""
    spec = importlib.util.find_spec("neurotop.demos")
    where = spec.submodule_search_locations if spec is not None else None
    found: dict[str, tuple[Path, str]] = {}
    for p in sorted(Path(where[0]).glob("*.py")) if where else ():
        if not p.name.startswith("_"):
            try:
                doc = ast.get_docstring(ast.parse(p.read_bytes())) or ""
            except (OSError, SyntaxError, ValueError) as e:
                doc = f"(unreadable: {e})"
            found[p.stem] = (p, doc.strip().split("\n")[0])
    return found


def cmd_demo(args: argparse.Namespace) -> None:
    if args.list:
        shipped = demos()
        if not shipped:
            _die("this install of neurotop ships no demos (no package neurotop.demos)", 1)
        width = max(map(len, shipped))
        for name, (_, about) in shipped.items():
            print(f"{name:<{width}}  {about}")
        return
    if importlib.util.find_spec("torch") is None:
        _die(NEEDS_TORCH)
    if args.script is not None:
        script = args.script
        if not script.is_file():
            _die(f"no training script {script}")
    else:
        shipped = demos()
        if args.name not in shipped:
            _die(f"no demo {args.name!r} (demos: {', '.join(shipped) or 'none'}; see"
                 " neurotop demo --list)")
        script = shipped[args.name][0]
    if args.no_ui and args.compare:
        _die("--compare overlays recordings on the UI: not with --no-ui")
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
    compare = _recorded(args.compare)  # before the demo starts: a bad file fails first
    proc = _spawn_demo(script, args.demo_args, run_id, log)
    # The UI draws at once and says what it waits for; it connects once the demo listens.
    client = JobClient.pending(_demo_endpoints(proc, run_id, log, timeout=60),
                                "starting the demo (importing torch)…", backfill=True)
    try:
        _show(client, read_only=False, compare=compare)
    finally:
        _stop_child(proc)
    if client.gone:
        _die(f"{client.gone}:\n{log_tail(log)}")
    if proc.returncode not in (0, -signal.SIGINT):
        _die(f"the demo exited with code {proc.returncode}; the end of {log}:\n"
             f"{log_tail(log)}", 1)
    print(f"neurotop: the demo's output is in {log}", file=sys.stderr)


def _demo_endpoints(proc: subprocess.Popen, run_id: str, log: Path,
                    timeout: float) -> Callable[[], Endpoints | None]:
    """What the pending client polls: the demo's endpoints once its connection file is
    there; ``RunGone`` (the UI closes, the command says why) if it exits first or does
    not start in time."""
    path = connfile.conn_path(run_id)
    deadline = time.monotonic() + timeout

    def find() -> Endpoints | None:
        if proc.poll() is not None:
            raise RunGone(f"the demo exited with code {proc.returncode} before it started;"
                          f" its output: {log}")
        if not path.exists():
            if time.monotonic() > deadline:
                raise RunGone(f"the demo did not start within {timeout:.0f} s; its output:"
                              f" {log}")
            return None
        try:
            return resolve(run_id)
        except TargetError as e:
            raise RunGone(str(e)) from e
    return find


def version() -> str:
    """The installed distribution's version (a checkout run without installing has none)."""
    try:
        return importlib.metadata.version("neurotop")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def overview(sub: argparse._SubParsersAction) -> str:
    """What ``neurotop`` alone prints above the runs: the commands, one line each."""
    commands = sub._get_subactions()  # what --help lists, in the order they were added
    width = max(len(c.dest) for c in commands)
    return "\n".join(["usage: neurotop COMMAND [ARG ...]   (neurotop COMMAND --help: its"
                      " options)", "",
                      *(f"  {c.dest:<{width}}  {c.help}" for c in commands)])


def main(argv: list[str] | None = None) -> None:
    """The command line; a closed stdout (``neurotop ls | head``) ends it quietly: the
    recipe of the Python docs (signal module, "Note on SIGPIPE"), with exit status 1."""
    try:
        try:
            _main(argv)
        finally:  # also on sys.exit: the interpreter's own flush would print a traceback
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # what is left in the buffer goes nowhere
        sys.exit(1)


def _main(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(prog="neurotop", description="top for neural-network training")
    p.add_argument("--version", action="version", version=f"neurotop {version()}")
    sub = p.add_subparsers(dest="command_name", metavar="COMMAND")

    a = sub.add_parser("attach", help="watch a live run (default: the newest on this machine)")
    a.add_argument("target", nargs="?", help="run id or prefix, connection file,"
                   " ssh://[user@]host[:port][/RUN], or tcp://host:port")
    a.add_argument("--read-only", action="store_true", help="watch only; no control")
    a.add_argument("--compare", nargs="+", metavar="FILE", help="overlay recorded sessions"
                   " (session files, run directories or recorded run ids) on the live run's"
                   " plots, aligned by step; the layers table's Δ column is from the first"
                   " (put TARGET before --compare)")
    a.set_defaults(func=cmd_attach)

    d = sub.add_parser("demo", help="run a CPU demo training with the UI attached",
                       description="Run a CPU demo training with the UI attached. The demo's"
                       " output (stdout and stderr) goes to demo.log in its run directory,"
                       " <runs root>/<run id>/ ($NEUROTOP_RUNS_DIR or ./neurotop_runs), beside"
                       " its session file (in the temp directory if that cannot be written);"
                       " neurotop prints the path, and the end of the log"
                       " if the demo fails. --no-ui runs it in this terminal instead.")
    d.add_argument("--name", default="mlp", help="which demo (default: mlp; see --list)")
    d.add_argument("--list", action="store_true", help="list the demos and exit")
    d.add_argument("--script", type=Path, metavar="PATH",
                   help="run this training script (one that calls neurotop.watch) instead")
    d.add_argument("--no-ui", action="store_true", help="run headless and print how to attach")
    d.add_argument("--compare", nargs="+", metavar="FILE", help="overlay recorded sessions on"
                   " the demo's plots, as attach --compare (before the demo's own arguments)")
    d.add_argument("demo_args", nargs=argparse.REMAINDER,
                   help="anything else is passed to the demo script (e.g. --steps 500)")
    d.set_defaults(func=cmd_demo)

    ls = sub.add_parser("ls", help="list the live runs and recorded sessions here (or the"
                        " live runs of a host over ssh)")
    ls.add_argument("target", nargs="?", help="ssh://[user@]host[:port] (default: this machine)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)

    c = sub.add_parser("ctl", help="send one command to a run and print its acknowledgement")
    c.add_argument("target", nargs="?", metavar="TARGET", help="run id or prefix,"
                   " connection file, or ssh://[user@]host[:port][/RUN]")
    # checked in cmd_ctl, so a missing or unknown one gets one line naming what is wrong
    c.add_argument("command", nargs="?", metavar="COMMAND", help=", ".join(CTL_COMMANDS))
    c.add_argument("args", nargs="*", metavar="ARG", help="step N | set KNOB VALUE")
    c.add_argument("--json", action="store_true", help="knobs: the acknowledgement as JSON"
                   " (what every other command prints; also knobs' when stdout is not a"
                   " terminal), not a table")
    c.add_argument("--timeout", type=float, default=10.0)
    c.set_defaults(func=cmd_ctl)

    r = sub.add_parser("replay", help="replay a recorded session in the same UI, with a timeline;"
                       " several: compare them")
    r.add_argument("file", nargs="+", help="a session file, a run directory, or a recorded"
                   " run's id; more than one overlays them, aligned by step (the first is"
                   " the reference)")
    r.add_argument("--step", type=int, help="open at this step (default: the end)")
    r.set_defaults(func=cmd_replay)

    pl = sub.add_parser("plot", help="print charts of a recorded session to stdout",
                        description="Print charts of a recorded session (or of a live run's"
                        " recording so far) to stdout: for CI logs, watch -n, and terminals"
                        " without the full-screen UI. Colour only on a terminal (and not with"
                        " NO_COLOR set).")
    pl.add_argument("file", help="a session file, a run directory, or a recorded run's id")
    pl.add_argument("stats", nargs="*", metavar="STAT",
                    help="a scalar (loss, lr, grad_norm, ...: one line) or a layer statistic"
                    " (dead_frac, mean, ...: one line per layer); default: loss")
    pl.add_argument("--layer", default="", metavar="GLOB",
                    help="the layers of layer statistics: a name glob, or a word found in the"
                    " name (default: every layer)")
    columns = shutil.get_terminal_size((100, 24)).columns
    pl.add_argument("--width", type=int, default=columns, metavar="W",
                    help="columns per chart (default: the terminal's width)")
    pl.add_argument("--height", type=int, default=20, metavar="H",
                    help="lines per chart (default: 20)")
    pl.set_defaults(func=cmd_plot)

    e = sub.add_parser("export", help="write a recorded session as CSV or Parquet tables")
    e.add_argument("file", help="a session file, a run directory, or a recorded run's id")
    fmt = e.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--csv", type=Path, metavar="DIR",
                     help="directory for scalars.csv, layers.csv, events.csv and system.csv")
    fmt.add_argument("--parquet", type=Path, metavar="DIR",
                     help="directory for scalars, layers, params and events .parquet"
                     " (needs pyarrow: pip install 'neurotop[parquet]')")
    e.set_defaults(func=cmd_export)

    args, extra = p.parse_known_args(argv)
    if args.command_name is None:
        if extra:
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        print(overview(sub), end="\n\n")
        args.func, args.target, args.json = cmd_ls, None, False
    elif args.func is cmd_demo:
        rest = [*extra, *args.demo_args]
        args.demo_args = rest[1:] if rest[:1] == ["--"] else rest
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(format="%(message)s")  # warnings (a skipped bad file): one line each
    try:
        args.func(args)
    except BrokenPipeError:
        raise  # a closed stdout: main ends quietly
    except OSError as e:  # the machine's answer (a runtime directory not ours, a full disk)
        _die(str(e))
