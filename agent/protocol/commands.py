"""The control commands both sides share: their names, arguments and the parsing and
validation of what a person types, so the UI and ``neurotop ctl`` refuse bad input before
sending it and the agent refuses it again on arrival. Imports neither torch nor textual.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

#: Commands the training thread applies at a boundary.
BOUNDARY_COMMANDS = frozenset({"pause", "resume", "step", "set", "snapshot", "stop",
                               "probe"})
#: Read-only commands the agent thread answers at once, even in the middle of a step.
IMMEDIATE_COMMANDS = frozenset({"schema", "knobs", "history"})
#: Arguments each command accepts, with their types; ``REQUIRED`` lists the mandatory ones.
ARGS: dict[str, dict[str, tuple[type, ...]]] = {
    "pause": {"reason": (str,)}, "resume": {}, "step": {"n": (int,)},
    "set": {"knob": (str,), "value": (bool, int, float), "op": (str,)},
    "snapshot": {}, "stop": {}, "schema": {}, "knobs": {},
    "history": {"offset": (int,), "max_bytes": (int,)},
    "probe": {},  # the curvature probe, now (``neurotop.training.curvature``)
}
REQUIRED = {"step": ("n",), "set": ("knob",)}
MAX_STEP_N = 1_000_000
#: Longest string argument a request may carry (a knob name with its glob, an op): module
#: paths of real models are far shorter, and a glob this long is compiled and matched
#: against every module in milliseconds. A 400 kB glob blocked the agent for 12 s.
MAX_ARG_CHARS = 256
#: A pause reason is shown on one line of the UI.
MAX_REASON_CHARS = 200
#: ``release`` hands a pinned knob back to the script (it takes no value).
OPS = ("set", "mul", "release")
RELEASE_WORDS = ("release", "unpin")

_KNOB_RE = re.compile(r"^([A-Za-z_][\w.]*)(?:\[([^\[\]]+)\])?$")


def split_knob(name: str) -> tuple[str, str | None]:
    """``"lr[1]"`` -> ``("lr", "1")``; ``"dropout"`` -> ``("dropout", None)``."""
    if isinstance(name, str) and len(name) > MAX_ARG_CHARS:
        raise ValueError(f"knob name of {len(name)} characters: at most {MAX_ARG_CHARS}")
    m = _KNOB_RE.match(name) if isinstance(name, str) else None
    if not m:
        raise ValueError(f"bad knob name {name!r}: use NAME or NAME[SELECTOR], e.g. lr[0]")
    return m.group(1), m.group(2)


def parse_value(text: str) -> tuple[bool | int | float | None, str]:
    """What a person types -> ``(value, op)``: ``0.01`` sets, ``x0.5`` (or ``*0.5``)
    multiplies, ``true``/``false``/``on``/``off`` are booleans, ``3`` is an int,
    ``release`` (or ``unpin``) is ``(None, "release")``."""
    t = text.strip()
    if t.lower() in RELEASE_WORDS:
        return None, "release"
    op = "set"
    if t[:1] in ("x", "*", "×"):
        op, t = "mul", t[1:].strip()
    low = t.lower()
    if op == "set" and low in ("true", "on", "yes"):
        return True, op
    if op == "set" and low in ("false", "off", "no"):
        return False, op
    try:
        return int(t), op
    except ValueError:
        pass
    try:
        return float(t), op
    except ValueError:
        raise ValueError(f"{text!r} is not a value: type a number, true/false, xFACTOR"
                         " (e.g. x0.5) to multiply, or release") from None


def set_args(knob: str, value: bool | int | float | None, op: str) -> dict[str, Any]:
    """The ``set`` command's args for a parsed value (``op`` only where it is not "set")."""
    args: dict[str, Any] = {"knob": knob}
    if op != "release":
        args["value"] = value
    if op != "set":
        args["op"] = op
    return args


def check_value(spec: Mapping[str, Any], value: Any, op: str = "set") -> str | None:
    """Why ``value`` is not acceptable for a knob described by ``spec`` (its ``name``,
    ``type`` and ``min``/``max`` bounds), or None. Type, finiteness, then bounds."""
    name, kind = spec["name"], spec["type"]
    if op not in OPS:
        return f"op must be one of {', '.join(OPS)}, got {op!r}"
    if op == "release":
        if not spec.get("pinnable"):
            return f"{name} is never pinned: there is nothing to release"
        return None if value is None else "release takes no value"
    if op == "mul":
        if kind != "float":
            return f"{name} is {kind}: it cannot be multiplied, set it instead"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"a factor must be a number, got {type(value).__name__}"
        if not math.isfinite(value) or value <= 0:
            return f"a factor must be finite and > 0, got {value!r}"
        return None  # bounds are checked against the product when it is applied
    if kind == "bool":
        if isinstance(value, bool) or value in (0, 1):
            return None
        return f"{name} takes true or false, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} takes a number ({kind}), got {type(value).__name__} {value!r}"
    if kind == "int" and not isinstance(value, int):
        return f"{name} takes an integer, got {value!r}"
    if not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    lo, hi = spec.get("min"), spec.get("max")
    if lo is not None and value < lo:
        return f"{name} must be >= {lo}, got {value!r}"
    if hi is not None and value > hi:
        return f"{name} must be <= {hi}, got {value!r}"
    return None


def check_args(cmd: str, args: Any) -> str | None:
    """Why ``args`` do not fit ``cmd`` (names, types, ranges), or None."""
    spec = ARGS.get(cmd)
    if spec is None:
        known = ", ".join(sorted(ARGS))
        return f"unknown command {_brief(cmd)}; known: {known}"
    if not isinstance(args, dict):
        return f"args must be a map, got {type(args).__name__}"
    extra = sorted(str(k) for k in args if k not in spec)
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        return f"{cmd} does not take {', '.join(map(_brief, extra[:3]))}{more}"
    missing = [k for k in REQUIRED.get(cmd, ()) if k not in args]
    if cmd == "set" and "value" not in args and args.get("op") != "release":
        missing.append("value")
    if missing:
        return f"{cmd} needs {', '.join(missing)}"
    for k, v in args.items():
        if not isinstance(v, spec[k]) or (isinstance(v, bool) and bool not in spec[k]):
            want = "/".join(t.__name__ for t in spec[k])
            return f"{cmd}: {k} must be {want}, got {type(v).__name__}"
        if isinstance(v, str) and len(v) > MAX_ARG_CHARS:
            return f"{cmd}: {k} of {len(v)} characters is longer than {MAX_ARG_CHARS}"
    if cmd == "step" and not 1 <= args["n"] <= MAX_STEP_N:
        return f"step n must be between 1 and {MAX_STEP_N}, got {args['n']}"
    if cmd == "pause" and len(args.get("reason", "")) > MAX_REASON_CHARS:
        return f"pause reason is longer than {MAX_REASON_CHARS} characters"
    return None


def _brief(text: Any, limit: int = 40) -> str:
    """``repr`` of peer-provided text, cut so that an error message stays one short line."""
    r = repr(text)
    return r if len(r) <= limit else f"{r[:limit]}...({len(r)} chars)"
