"""What the agent measures and how often: one plain-data object with sane defaults.

Imports no torch, so the UI and the control path can read and validate it. Every field is
plain data (numbers, strings, tuples, a dict), so a later control command can send a
change as a map and the agent can apply it at a step boundary (``Config.replace``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Per-layer statistics, in column order. The same names are used on the wire, in session
#: files, in the CLI and as the UI's column headers.
LAYER_STATS: tuple[str, ...] = (
    "mean", "std", "rms", "max_abs", "massive_ratio", "kurtosis",
    "zero_frac", "near_zero_frac", "dead_frac", "dead_frac_window", "nonfinite", "grad_rms",
)

#: Per-parameter statistics (one row per parameter tensor the optimizer updates).
PARAM_STATS: tuple[str, ...] = (
    "grad_norm", "grad_max_abs", "weight_norm", "update_ratio", "nlm_cos",
)


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the field."""


@dataclass
class Config:
    """Defaults keep the agent under 3 % of a training step (see benchmarks/overhead.py)."""

    #: Statistics are computed on every N-th step only; the hooks return at once otherwise.
    report_every: int = 10
    #: Leaf modules to measure: globs over the ``named_modules()`` path ("*" = every leaf).
    layers: tuple[str, ...] = ("*",)
    #: Keep only leaves whose class (or a base class) has one of these names; empty = any.
    layer_types: tuple[str, ...] = ()
    #: Leaves to skip (globs over the path).
    exclude: tuple[str, ...] = ()
    #: Residual-stream blocks, measured on their output: ``None`` finds them (the children
    #: of a ModuleList/Sequential that are all non-leaf modules of one class); globs pick
    #: them; an empty tuple measures none.
    blocks: tuple[str, ...] | None = None
    #: Layers whose output gradient RMS (the backprop signal) is measured by a tensor
    #: hook: ``None`` = the blocks, or every measured layer when the model has no blocks.
    signal_layers: tuple[str, ...] | None = None
    #: Also measure forwards that do not train: under ``torch.no_grad()`` or
    #: ``torch.inference_mode()``, or with the watched model in eval mode
    #: (``model.training`` False). Off by default, so evaluation and generation inside a
    #: report window cost nothing and stay out of the training statistics (and of
    #: ``samples_per_s``, which counts training forwards always). A loop that trains in
    #: eval mode (fine-tuning with frozen BatchNorm via ``model.eval()``) needs True.
    measure_eval: bool = False
    #: Which columns of ``LAYER_STATS`` to compute and send.
    stats: tuple[str, ...] = LAYER_STATS
    #: ``near_zero_frac`` counts |a| < eps.
    eps: float = 1e-3
    #: mean, std, rms, kurtosis, zero and near-zero fractions and the median |a| of
    #: ``massive_ratio`` come from at most this many elements of each activation: every
    #: r-th row (last dimension), r coprime with the second-to-last dimension. Activations
    #: this small or smaller are used whole. Also the row sample of each parameter for
    #: ``update_ratio`` and ``nlm_cos``.
    sample: int = 4096
    #: ``dead_frac_window``: units never positive over this many reports.
    dead_window: int = 10
    #: Histograms every K reports (0: never), of these layers' activations and gradients.
    hist_every: int = 10
    hist_layers: tuple[str, ...] = ("*",)
    #: A histogram counts at most this many values of the layer's sample (every s-th).
    hist_sample: int = 2048
    #: Symmetric log-spaced bins, one per octave: magnitudes 2**lo .. 2**hi, plus a zero
    #: bin (|a| < 2**lo) and two overflow bins (see ``neurotop.protocol.histograms``).
    hist_exponents: tuple[int, int] = (-24, 16)
    #: Per-parameter statistics (``PARAM_STATS``); the update ratio keeps one copy of the
    #: parameters on the device, taken just before the optimizer step of a report.
    param_stats: bool = True
    #: Which dimension holds the units (features/channels) for dead-unit counting, by
    #: layer glob; others: dim 1 for 4-D/5-D outputs and for 3-D outputs of conv, pooling
    #: and batch/instance-norm modules (channels first), the last dimension otherwise.
    unit_dim: dict[str, int] = field(default_factory=dict)
    #: Which dimension of the model's first tensor input counts samples for
    #: ``samples_per_s``: 0 for batch-first inputs, 1 for sequence-first ones (T, B, ...).
    batch_dim: int = 0
    #: On SIGTERM and SIGHUP (a scheduler or a dropped SSH session ending the job), close
    #: the session (END record, connection file removed), then let the signal take its
    #: course (see ``neurotop.training.signals``). Installed from the main thread only.
    handle_signals: bool = True
    #: Session files and snapshots are created 0600 in 0700 run directories (readable by
    #: this user only: they hold the run's recording, its model and optimizer state), as
    #: the connection files are. False: the umask decides (e.g. a group-readable runs root).
    private_files: bool = True
    #: Under torch.distributed: every rank checks with the others for rank 0's commands
    #: (and any rank's auto-pause) every this many step boundaries, in one small gloo
    #: collective; commands apply at such a check, on every rank at the same step. A check
    #: measured 0.8 ms on 2 CPU ranks of a loaded 2-core machine (see
    #: benchmarks/distributed_overhead.py), so 10 keeps it under 1 % of a step of 8 ms or
    #: more; 1 makes a pause land within one step.
    control_every: int = 10
    #: The curvature probe (``mon.probe_batch(x, y)`` or ``mon.probe(fn)``; see
    #: ``neurotop.training.curvature``) runs at every N-th step boundary (0: only on a
    #: ``probe`` command). 20 power iterations cost some 40 training steps, the default
    #: probe of an AdamW run some 140 (benchmarks/probe_cost.py): take N in the hundreds or
    #: more, a multiple of ``report_every`` (its scalars go out in the next report).
    probe_every: int = 0
    #: The layer (a ``named_modules()`` path or glob: its first match) whose output on the
    #: probe batch gives E11's effective rank and, with class labels, NC1; None: no layer.
    features: str | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "layer_types", "exclude", "stats", "hist_layers"):
            setattr(self, name, _strings(name, getattr(self, name)))
        for name in ("blocks", "signal_layers"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, _strings(name, v))
        unknown = [s for s in self.stats if s not in LAYER_STATS]
        if unknown:
            raise ConfigError(f"stats: unknown {unknown}; known: {', '.join(LAYER_STATS)}")
        self.stats = tuple(s for s in LAYER_STATS if s in self.stats)  # canonical order
        _int_at_least("report_every", self.report_every, 1)
        for name in ("measure_eval", "handle_signals", "private_files"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _int_at_least("dead_window", self.dead_window, 1)
        _int_at_least("control_every", self.control_every, 1)
        _int_at_least("probe_every", self.probe_every, 0)
        if self.features is not None and not (isinstance(self.features, str) and self.features):
            raise ConfigError(f"features must be a module path or glob, got {self.features!r}")
        _int_at_least("hist_every", self.hist_every, 0)
        _int_at_least("batch_dim", self.batch_dim, 0)
        for name in ("sample", "hist_sample"):
            _int_at_least(name, getattr(self, name), 16)
        if not (isinstance(self.eps, (int, float)) and self.eps >= 0):
            raise ConfigError(f"eps must be a number >= 0, got {self.eps!r}")
        lo_hi = tuple(self.hist_exponents)
        if (len(lo_hi) != 2 or not all(isinstance(v, int) for v in lo_hi)
                or not -126 <= lo_hi[0] < lo_hi[1] <= 127):
            raise ConfigError(f"hist_exponents must be two integers -126 <= lo < hi <= 127,"
                              f" got {lo_hi!r}")
        self.hist_exponents = lo_hi
        if not isinstance(self.unit_dim, dict) or not all(
                isinstance(k, str) and isinstance(v, int) for k, v in self.unit_dim.items()):
            raise ConfigError(f"unit_dim must map layer globs to ints, got {self.unit_dim!r}")

    def replace(self, **changes: Any) -> Config:
        """A validated copy with ``changes``; unknown names are refused."""
        known = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(changes) - known)
        if bad:
            raise ConfigError(f"unknown option(s) {bad}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the schema message (lists, not tuples, as msgpack sends them)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


def _strings(name: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = (v,)
    try:
        out = tuple(v)
    except TypeError:
        raise ConfigError(f"{name} must be a string or a list of strings, got {v!r}") from None
    if not all(isinstance(s, str) for s in out):
        raise ConfigError(f"{name} must hold strings only, got {v!r}")
    return out


def _int_at_least(name: str, v: Any, lo: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
