"""``neurotop export FILE --csv DIR`` / ``--parquet DIR``: a recording as tables for pandas.

``scalars``: one row per reported step: ``step``, ``time`` (when the agent published it,
Unix seconds), then one column per scalar of the run's schema, in its order.
``layers``: long form, one row per step and layer: ``step``, ``layer`` (its
``named_modules()`` path), then one column per statistic (``mean``, ``std``, …).
``params`` (Parquet only): long form, one row per step and parameter: ``step``, ``param``
(its ``named_parameters()`` name), then one column per parameter statistic.
``events``: every command acknowledgement and alert: ``step``, ``time``, ``kind``,
``event``, ``cmd``, ``ok``, ``old``, ``new``, ``error``, ``sender``, and ``details``
(anything else, as JSON).
``system``: one row per recorded heartbeat with system metrics: ``step``, ``time``,
``state``, then ``SYSTEM_COLUMNS``, then ``GPU_COLUMNS`` for each GPU as ``gpu<i>_<name>``.
A job's run directory (``session.ntop`` and ``session-r<r>.ntop``: ``export_job``) gives
the same tables with a first column ``rank``, every rank's rows, rank by rank.
CSV floats are written in the shortest form that reads back as
the same float32, missing values as ``nan``; Parquet keeps float32 (``time``: float64) and
writes missing event fields as nulls. README "Exports" lists the columns.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from neurotop.protocol import wire
from neurotop.protocol.sessionfile import KIND_CODES, MESSAGE, decode_message
from neurotop.tui.data.replay_source import ReplaySource

EVENT_COLUMNS = ("kind", "event", "cmd", "ok", "old", "new", "error", "sender")
_HEADER_FIELDS = frozenset({"run", "rank", "seq", "t", "v", "arrays", "step", *EVENT_COLUMNS})
STEPS_PER_PIECE = 2000
#: The ``system`` table's host columns (the heartbeat's ``system`` fields) and, per GPU,
#: ``gpu<i>_`` + each of ``GPU_COLUMNS``; README "System metrics" says what each one is.
SYSTEM_COLUMNS = ("cpu_pct", "host_cpu_pct", "cpus", "rss", "mem_total", "mem_available",
                  "no_gpu")
GPU_COLUMNS = ("name", "util", "mem_used", "mem_total", "power_w", "temp_c")
_log = logging.getLogger(__name__)


def export_job(sources: dict[int, ReplaySource], out: Path,
               export: Callable[[ReplaySource, Path], list[Path]]) -> list[Path]:
    """Every rank's tables (``export``: ``export_csv`` or ``export_parquet``) as one set, a
    ``rank`` column first. The ranks of a DDP job share their schema; a rank whose table
    has other columns than the first rank's is written beside it as ``<table>-r<rank>``."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(dir=out, prefix=".ranks-") as tmp:
        per_rank = {rank: export(src, Path(tmp) / f"r{rank}") for rank, src in sources.items()}
        first = per_rank[min(per_rank)]
        for i, table in enumerate(first):
            parts = {rank: paths[i] for rank, paths in per_rank.items()}
            merge = _merge_csv if table.suffix == ".csv" else _merge_parquet
            written += merge(parts, out / table.name)
    return written


def _merge_csv(parts: dict[int, Path], dest: Path) -> list[Path]:
    """One CSV of ``parts`` (rank: table), ``rank`` first; rows as written, re-quoted only
    where a field needs it."""
    written, header = [dest], None
    with open(dest, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        for rank, path in parts.items():
            with open(path, newline="") as src:
                rows = csv.reader(src)
                columns = next(rows)
                if header is None:
                    header = columns
                    w.writerow(["rank", *columns])
                if columns == header:
                    w.writerows([rank, *row] for row in rows)
                    continue
                written.append(dest.with_name(f"{dest.stem}-r{rank}{dest.suffix}"))
                with open(written[-1], "w", newline="") as g:
                    other = csv.writer(g, lineterminator="\n")
                    other.writerow(["rank", *columns])
                    other.writerows([rank, *row] for row in rows)
    return written


def _merge_parquet(parts: dict[int, Path], dest: Path) -> list[Path]:
    """One Parquet table of ``parts`` (rank: table), an int32 ``rank`` column first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables: dict[int, Any] = {}
    for rank, path in parts.items():
        t = pq.read_table(path)
        tables[rank] = t.add_column(0, "rank", pa.array(np.full(len(t), rank, np.int32)))
    first = tables[min(tables)]
    same = [t for t in tables.values() if t.schema.equals(first.schema)]
    pq.write_table(pa.concat_tables(same), dest)
    written = [dest]
    for rank, t in tables.items():
        if not t.schema.equals(first.schema):
            written.append(dest.with_name(f"{dest.stem}-r{rank}{dest.suffix}"))
            pq.write_table(t, written[-1])
    return written


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"' if any(c in name for c in ',"\n\r') else name


def export_csv(source: ReplaySource, out: Path) -> list[Path]:
    """Write the four tables into ``out`` (created if needed); returns their paths."""
    source.load()
    out.mkdir(parents=True, exist_ok=True)
    store = source.store
    schema = store.schema or {"layers": [], "stats": [], "scalars": []}
    steps = store.steps()
    times = source.row_times()
    paths = [out / "scalars.csv", out / "layers.csv", out / "events.csv", out / "system.csv"]

    cols = [np.asarray(steps).astype(str), times.astype(str)]
    cols += [store.scalar(name)[1].astype(str) for name in schema["scalars"]]
    with open(paths[0], "w", newline="") as f:
        f.write(",".join(["step", "time", *map(_quote, schema["scalars"])]) + "\n")
        f.writelines(",".join(row) + "\n" for row in zip(*cols, strict=True))

    layers = [_quote(n) for n in schema["layers"]]
    series = np.stack([store.recent_series(st, len(steps)) for st in schema["stats"]], -1) \
        if schema["stats"] and len(steps) else np.empty((len(layers), 0, 0), np.float32)
    with open(paths[1], "w", newline="") as f:
        f.write(",".join(["step", "layer", *map(_quote, schema["stats"])]) + "\n")
        for a in range(0, len(steps), STEPS_PER_PIECE):
            piece = series[:, a:a + STEPS_PER_PIECE].astype(str)  # [layers x steps x stats]
            for i, step in enumerate(steps[a:a + STEPS_PER_PIECE].tolist()):
                f.writelines(f"{step},{name},{','.join(piece[j, i])}\n"
                             for j, name in enumerate(layers))

    with open(paths[2], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "time", *EVENT_COLUMNS, "details"])
        for step, t, fields, details in _events(source):
            w.writerow([step, "" if t is None else t, *("" if v is None else v for v in fields),
                        details or ""])

    columns, rows = system_table(source)
    with open(paths[3], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        text = [c in ("state", "no_gpu") or c.endswith("_name") for c in columns]
        w.writerows([("" if v is None else v) if is_text else ("nan" if v is None else v)
                     for v, is_text in zip(row, text, strict=True)] for row in rows)
    return paths


def system_table(source: ReplaySource) -> tuple[list[str], list[list[Any]]]:
    """The ``system`` table's columns and rows (None where a value is missing): one row per
    recorded heartbeat that carries system metrics, with as many GPU column groups as the
    most GPUs any of them lists."""
    ix = source.reader.index
    pos = np.flatnonzero((ix["type"] == MESSAGE) & (ix["kind"] == KIND_CODES["heartbeat"]))
    beats, bad = [], 0
    for rec in source.reader.records(pos):
        try:
            h = decode_message(rec.body).header
        except (wire.WireError, ValueError):
            bad += 1
            continue
        if isinstance(h.get("system"), dict):
            beats.append(h)
    if bad:
        _log.warning("the system table leaves out %d undecodable heartbeats", bad)
    gpus = max((len(h["system"].get("gpus") or ()) for h in beats), default=0)
    columns = ["step", "time", "state", *SYSTEM_COLUMNS,
               *(f"gpu{i}_{c}" for i in range(gpus) for c in GPU_COLUMNS)]
    rows = []
    for h in beats:
        sysm = h["system"]
        listed = [g for g in sysm.get("gpus") or () if isinstance(g, dict)]
        listed += [{}] * (gpus - len(listed))
        rows.append([h.get("step"), h.get("t"), h.get("state"),
                     *(sysm.get(c) for c in SYSTEM_COLUMNS),
                     *(g.get(c) for g in listed for c in GPU_COLUMNS)])
    return columns, rows


def _events(source: ReplaySource) -> Iterator[tuple[int, Any, list[Any], str | None]]:
    """Each event's step, time, ``EVENT_COLUMNS`` values (None where absent) and the rest
    of its fields as JSON (None if there is nothing else)."""
    for step, h in source.events():
        details = {k: v for k, v in h.items() if k not in _HEADER_FIELDS}
        own, t = h.get("step"), h.get("t")
        yield (own if _is_number(own, int) else step, t if _is_number(t, (int, float)) else None,
               [h.get(c) for c in EVENT_COLUMNS],
               json.dumps(details, default=str) if details else None)


def _is_number(v: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(v, kind) and not isinstance(v, bool)


def _text(v: Any) -> str | None:
    """An event field as Parquet text: strings as they are, anything else as JSON."""
    return v if v is None or isinstance(v, str) else json.dumps(v, default=str)


def export_parquet(source: ReplaySource, out: Path) -> list[Path]:
    """Write ``scalars``, ``layers``, ``params``, ``events`` and ``system`` as Parquet files into
    ``out`` (created if needed); returns their paths. Needs pyarrow (``neurotop[parquet]``),
    imported here so that CSV export works without it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source.load()
    out.mkdir(parents=True, exist_ok=True)
    store = source.store
    schema = store.schema or {"layers": [], "stats": [], "scalars": []}
    steps = np.asarray(store.steps(), np.int64)
    tables: dict[str, pa.Table] = {}

    # From arrays and names, not a dict: a user scalar named ``time`` is kept, as in CSV.
    tables["scalars"] = pa.Table.from_arrays(
        [pa.array(steps), pa.array(source.row_times().astype(np.float64)),
         *(pa.array(store.scalar(name)[1].astype(np.float32)) for name in schema["scalars"])],
        names=["step", "time", *schema["scalars"]])

    tables["layers"] = _long_table(
        "layer", schema["layers"], steps,
        {st: store.recent_series(st, len(steps)) for st in schema["stats"]})

    extra = store.schema_extra
    # Every params report, however many: there is at most one per recorded message.
    everything = len(source.reader.index)
    series = {st: store.param_series(st, everything) for st in extra["param_stats"]}
    psteps = next(iter(series.values()))[0] if series else np.empty(0, np.int64)
    tables["params"] = _long_table("param", extra["params"], psteps,
                                   {st: v for st, (_, v) in series.items()})

    events = list(_events(source))
    ev: dict[str, pa.Array] = {
        "step": pa.array([e[0] for e in events], pa.int64()),
        "time": pa.array([e[1] for e in events], pa.float64()),
    }
    for i, c in enumerate(EVENT_COLUMNS):
        values = [e[2][i] for e in events]
        ev[c] = (pa.array([v if isinstance(v, bool) else None for v in values], pa.bool_())
                 if c == "ok" else pa.array([_text(v) for v in values], pa.string()))
    ev["details"] = pa.array([e[3] for e in events], pa.string())
    tables["events"] = pa.table(ev)

    columns, rows = system_table(source)
    text = {"state", "no_gpu"} | {c for c in columns if c.endswith("_name")}
    values = list(zip(*rows, strict=True)) if rows else [()] * len(columns)
    tables["system"] = pa.Table.from_arrays(
        [pa.array([_text(v) for v in vs], pa.string()) if c in text else _numbers(vs)
         for c, vs in zip(columns, values, strict=True)], names=columns)

    paths = []
    for name, table in tables.items():
        paths.append(out / f"{name}.parquet")
        pq.write_table(table, paths[-1])
    return paths


def _numbers(values: tuple[Any, ...]) -> Any:
    """A ``pyarrow.Array`` of a numeric column: int64 if every value is a whole number that
    fits (counts, bytes), else float64; null where a value is missing or not a number."""
    import pyarrow as pa

    nums = [v if _is_number(v, (int, float)) else None for v in values]
    if all(isinstance(v, int) and -2**63 <= v < 2**63 for v in nums if v is not None):
        return pa.array(nums, pa.int64())
    return pa.array([None if v is None else float(v) for v in nums], pa.float64())


def _long_table(key: str, names: list[str], steps: np.ndarray,
                series: dict[str, np.ndarray]) -> Any:
    """A ``pyarrow.Table``, one row per step and name: ``step``, ``key`` (dictionary-encoded:
    pandas reads a category), then each ``[names x steps]`` series as a float32 column."""
    import pyarrow as pa

    n, t = len(names), len(steps)
    columns = [pa.array(np.repeat(steps.astype(np.int64), n)),
               pa.DictionaryArray.from_arrays(np.tile(np.arange(n, dtype=np.int32), t),
                                              pa.array(names, pa.string()))]
    columns += [pa.array(np.asarray(v, np.float32).reshape(n, t).T.reshape(-1))  # step-major
                for v in series.values()]
    return pa.Table.from_arrays(columns, names=["step", key, *series])
