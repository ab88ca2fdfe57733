"""What each statistic means and what to try for each alert, in one line each: the help
screen's glossary and the alert feed's hints. UI-side on purpose (keyed by name, so the
agent's detectors stay free to change their messages); torch-free like all of ``tui/``.

The meanings and healthy ranges come from README.md "Statistics" and ``shared/METRICS.md``
(section E for the alert thresholds).
"""

from __future__ import annotations

#: Statistic -> (what it is, its healthy range or how to read it). Every name a schema
#: can carry: per-layer, per-parameter and the global scalars.
STATISTICS: dict[str, tuple[str, str]] = {
    # per layer (of the activation at the layer's output)
    "mean": ("mean activation", "near 0 after a norm"),
    "std": ("std of the activation", "~1 after a norm; -> 0: collapse"),
    "rms": ("RMS of the activation", "steady from layer to layer"),
    "max_abs": ("largest |a|, every element", "< 100 (E1)"),
    "massive_ratio": ("max |a| / median |a|", "< 1000 (E1); inf after ReLU: fine"),
    "kurtosis": ("E(a-mean)^4/std^4, outliers", "3 if Gaussian; display only"),
    "zero_frac": ("fraction of exact zeros", "no band: ReLU ~0.5 or more"),
    "near_zero_frac": ("fraction |a| < eps (1e-3)", "no band (SiLU/GELU sparsity)"),
    "dead_frac": ("units never positive", "activations < 0.5; > 0.9 critical"),
    "dead_frac_window": ("dead over the window", "activations < 0.5; > 0.9 critical"),
    "nonfinite": ("count of NaN and Inf", "0; more is critical"),
    "grad_rms": ("RMS of dL/dh at the output", "steady with depth (E3)"),
    # per parameter
    "grad_norm": ("gradient norm (global: all)", "steady; 10x its mean: spike"),
    "grad_max_abs": ("largest |gradient|", "finite; spikes with grad_norm"),
    "weight_norm": ("weight norm before the step", "slow change"),
    "update_ratio": ("||step|| / ||weights||", "~1e-3; 1e-5 stalls, 1e-1 too big"),
    "nlm_cos": ("cos(-gradient, weights)", "< 0.8; ~1: only scales logits"),
    # global scalars
    "loss": ("training loss (observe)", "falling; spikes: E8"),
    "first_nonfinite": ("first layer with NaN/Inf", "-1 (none)"),
    "loss_max": ("largest loss since last report", "near loss"),
    "loss_max_step": ("step of loss_max", "-"),
    "loss_nonfinite_step": ("first step, NaN/Inf loss", "-1 (none)"),
    "grad_norm_max": ("largest grad norm since last", "near grad_norm"),
    "grad_norm_max_step": ("step of grad_norm_max", "-"),
    "grad_norm_nonfinite_step": ("first step, NaN/Inf norm", "-1 (none)"),
    "lr": ("learning rate (lr.1 ...: groups)", "as scheduled"),
    "steps_per_s": ("optimizer steps per second", "steady; a drop: a stall"),
    "samples_per_s": ("training samples per second", "steady"),
    "mem_device": ("device memory allocated", "flat after warm-up"),
    "mem_device_peak": ("peak device memory", "below the device's"),
    "mem_host": ("resident host memory", "flat; rising: a leak"),
    "head.collapse_frac": ("rows with a one-hot softmax", "0 (> 0: collapse, E4)"),
    "head.margin_p10": ("top-1 minus top-2 logit, p10", "below the dtype's onset"),
    "head.margin_p50": ("top-1 minus top-2 logit, p50", "below the dtype's onset"),
    "head.margin_p90": ("top-1 minus top-2 logit, p90", "fp32 < 16.6, bf16 < 5.5"),
    "head.entropy": ("mean output entropy, nats", "falls with the loss"),
    "head.zero_loss_frac": ("rows whose loss is exactly 0", "0"),
    "loss_scale": ("GradScaler's loss scale", "steady; falling: overflows"),
    "skipped_steps": ("steps GradScaler skipped", "a few early, then flat"),
}

#: Alert name -> one line of what to try. Keyed by the alert's name (``ALERTS`` in the
#: agent's detectors), so a changed message still finds its hint.
ALERT_HINTS: dict[str, str] = {
    "nonfinite": "lower lr, clip gradients, check the data",
    "massive_activation": "check that layer's input; add a norm",
    "massive_growth": "lower lr or add weight decay if it grows on",
    "dying_layer": "lower lr; LeakyReLU/GELU; check init and bias",
    "dead_jump": "a big step killed units: lower lr, clip grads",
    "explode_vanish": "check init scale and norms; add residuals",
    "grad_spike": "clip gradients or lower lr; check that batch",
    "loss_spike": "lower lr or clip gradients; check that batch",
    "amp_skipping": "loss scale overflows: lower lr, or use bf16",
    "softmax_collapse": "add weight decay: `set weight_decay 0.1`",
    "overconfidence": "lower lr; label smoothing; temperature > 1",
}

#: What the feed says for an alert this table does not know (a newer agent's).
UNKNOWN_HINT = "see README.md, Live control and Statistics"


def hint(alert: str) -> str:
    """What to try for an alert, by its name."""
    return ALERT_HINTS.get(alert, UNKNOWN_HINT)


def meaning(stat: str) -> tuple[str, str] | None:
    """(what it is, healthy range) of a statistic; ``lr.1``, ``lr.G``, ``grad_norm.D``
    read as their base name; None for a user's own scalar."""
    if stat in STATISTICS:
        return STATISTICS[stat]
    base = stat.split(".", 1)[0]
    return STATISTICS.get(base) if base in ("lr", "grad_norm") else None
