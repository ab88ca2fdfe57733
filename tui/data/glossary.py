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
    "update_ratio": ("||step|| / ||weights||", "~1e-3; 1e-6 stalls, 1e-1 too big"),
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
    # the curvature probe (mon.probe_batch / mon.probe; probe_every, `probe`)
    "lambda_max": ("top Hessian eigenvalue, probe", "< 0.9 x eos_threshold (E7)"),
    "hessian_trace": ("Hessian trace (Hutchinson)", ">= lambda_max; grows with it"),
    "precond_sharpness": ("Adam: top eigenvalue of P^-1 H", "< 0.9 x 38/lr (E7)"),
    "eos_threshold": ("stability limit: 2/lr (GD)", "sharpness stays below it"),
    "probe_loss": ("loss on the probe batch", "falling"),
    "probe_acc": ("accuracy on the probe batch", "rising"),
    "feature_erank": ("effective rank of features", "no >20% drop from peak (E11)"),
    "nc1": ("within/between-class spread", "falls once train error is 0"),
    "probe_step": ("step the probe ran at", "-"),
    "probe_ms": ("wall time of one probe, ms", "~50 training steps"),
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
    "edge_of_stability": "sharpness at 2/lr: lower lr: `set lr x0.5`",
    "representation_collapse": "lower lr; check the loss for a trivial optimum",
    "sparsity_drift": "ReLU turning linear: bias drift? lower lr, topk",
    "update_ratio": "too large: lower lr (`set lr x0.1`); low: raise it",
    "grokking_stall": "raise weight decay: `set weight_decay 1`",
    "grokking": "generalizing: keep the weight decay",
    "straggler": "that rank's data loading or host: workers, CPU, disk",
    "rank_divergence": "weights changed outside DDP? init broadcast, seeds",
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
