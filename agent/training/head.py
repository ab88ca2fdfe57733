"""The classifier (or LM) head's logits, reduced on the device on report steps only.

Softmax collapse (METRICS.md E4) happens when a row's softmax becomes exactly one-hot in
the dtype the loss is computed in: sum_j exp(z_j - z_max) rounds to 1, the loss of a right
answer is exactly 0, its gradient vanishes and only the naive scaling of the logits is left
to learn. It cannot happen before the top-1 margin passes ln(2 / eps) of that dtype (bits x
ln 2: float32 16.6, float16 7.6, bfloat16 5.5), so the margin is the early warning. Entropy
collapse (E12) is the same story read from the output distribution.

Each call of the head (a forward hook, ``watch(head=...)``) or ``observe(logits=...)`` in a
report window adds per-row device tensors (collapsed or not, margin, entropy, top-1); the
report reduces them to the ``HEAD_SCALARS`` (still device tensors, packed with the other
scalars into the report's one copy). ``observe(targets=...)`` in the same window gives the
zero-loss fraction: a row whose loss is exactly 0 is a collapsed row whose top-1 is the
target. Outside report windows the hook returns at once and ``observe`` drops the logits,
so the head costs nothing there.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from neurotop.service.finalize import HEAD_SCALARS
from neurotop.training.hooks import _InertWhenCopied, training_forward
from neurotop.training.stats import first_tensor

log = logging.getLogger("neurotop.agent")

#: Rows of one call reduced at most (every k-th beyond): an LM head's batch x sequence rows
#: at full vocabulary make float32 temporaries of rows x classes.
MAX_ROWS = 16384
_QUANTILES = (0.1, 0.5, 0.9)


def margin_onset(dtype: torch.dtype) -> float:
    """The top-1 margin below which no softmax row can be one-hot in ``dtype``: every other
    term exp(-margin) must fall under half an ulp of 1, eps / 2."""
    return math.log(2 / torch.finfo(dtype).eps)


def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """The dtype the cross-entropy runs in: the logits' own, except under autocast, which
    computes ``cross_entropy`` in float32 whatever the head's output dtype."""
    if torch.is_autocast_enabled(logits.device.type) and logits.dtype in (
            torch.float16, torch.bfloat16):
        return torch.float32
    return logits.dtype


def reduce_rows(z: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per row of ``z`` ``[rows x classes]``: ``collapsed`` (the softmax is one-hot in
    ``dtype``), ``margin`` (top-1 minus top-2 logit), ``entropy`` (nats) and ``top``
    (argmax). All on ``z``'s device; nothing is read back."""
    zd = z.to(dtype)
    collapsed = (zd - zd.amax(-1, keepdim=True)).exp().sum(-1) == 1
    zf = z.float()
    top2 = zf.topk(2, dim=-1)
    return {"collapsed": collapsed, "margin": top2.values[:, 0] - top2.values[:, 1],
            "entropy": torch.special.entr(zf.softmax(-1)).sum(-1),
            "top": top2.indices[:, 0]}


class HeadStats:
    """One report window of head rows (training thread)."""

    def __init__(self, name: str) -> None:
        self.name = name  # the head's module path ("": the model), "logits": ``observe``
        self.classes = 0
        self.dtype: torch.dtype | None = None
        self.structure = 0  # bumped when the classes or the loss dtype change (the schema)
        self.reductions = 0  # calls reduced since ``watch``: the cost outside windows is none
        self._warned = False
        self._new_window()

    def _new_window(self) -> None:
        self._rows: list[dict[str, torch.Tensor]] = []
        self._calls: list[tuple[int, int]] = []  # (rows of the call, stride taken)
        self._targets: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor) -> None:
        """One call's logits ``[..., classes]`` (report windows only)."""
        if not logits.is_floating_point() or logits.dim() == 0 or logits.shape[-1] < 2:
            return
        z = logits.detach().reshape(-1, logits.shape[-1])
        if z.shape[0] == 0:
            return
        stride = -(-z.shape[0] // MAX_ROWS)
        dtype = loss_dtype(logits)
        if (z.shape[1], dtype) != (self.classes, self.dtype):
            self.classes, self.dtype = z.shape[1], dtype
            self.structure += 1
        self._calls.append((z.shape[0], stride))
        self._rows.append(reduce_rows(z[::stride], dtype))
        self.reductions += 1

    def add_targets(self, targets: Any) -> None:
        """Class indices for the window's rows, in the order of the calls (one per call)."""
        if isinstance(targets, torch.Tensor) and not targets.is_floating_point():
            self._targets.append(targets.detach().reshape(-1))
        elif not self._warned:
            self._warned = True
            log.warning("neurotop: observe(targets=) takes an integer tensor of class"
                        " indices, got %s; no zero-loss fraction", type(targets).__name__)

    def discard(self) -> None:
        self._new_window()

    def schema(self) -> dict[str, Any]:
        """What the detectors need beside the scalars: which head, its classes and dtype."""
        dtype = self.dtype or torch.float32
        return {"name": self.name or "model", "classes": self.classes, "dtype": str(dtype)[6:],
                "margin_onset": margin_onset(dtype)}

    def take(self, device: torch.device) -> dict[str, torch.Tensor]:
        """This window's ``HEAD_SCALARS`` as 0-d device tensors (none without rows); a
        fresh window starts."""
        rows, calls, targets = self._rows, self._calls, self._targets
        self._new_window()
        if not rows:
            return {}
        cat = {k: torch.cat([r[k].to(device) for r in rows]) for k in rows[0]}
        p10, p50, p90 = _quantiles(cat["margin"], _QUANTILES)
        out = dict(zip(HEAD_SCALARS[:5], (cat["collapsed"].float().mean(), p10, p50, p90,
                                          cat["entropy"].mean()), strict=True))
        zero = self._zero_loss(cat, calls, targets, device)
        if zero is not None:
            out[HEAD_SCALARS[-1]] = zero
        return out

    def _zero_loss(self, cat: dict[str, torch.Tensor], calls: list[tuple[int, int]],
                   targets: list[torch.Tensor], device: torch.device) -> torch.Tensor | None:
        """The fraction of rows with a target (>= 0: ``ignore_index=-100`` is left out)
        whose loss is exactly 0 in the loss dtype. The targets must match the rows, call
        by call; otherwise there is no value (logged once)."""
        if not targets:
            return None
        t = torch.cat([x.to(device) for x in targets])
        if t.numel() != sum(n for n, _ in calls):
            if not self._warned:
                self._warned = True
                log.warning("neurotop: %d targets observed for %d head rows in a report"
                            " window; no zero-loss fraction", t.numel(), sum(n for n, _ in calls))
            return None
        t = torch.cat([part[::s] for part, (_, s) in
                       zip(t.split([n for n, _ in calls]), calls, strict=True)])
        has = t >= 0
        zero = cat["collapsed"] & (cat["top"] == t) & has
        return zero.sum().float() / has.sum().clamp(min=1).float()


def _quantiles(v: torch.Tensor, qs: tuple[float, ...]) -> list[torch.Tensor]:
    """NumPy's linear quantiles of a 1-d tensor, from one sort and positions known on the
    host (``torch.quantile`` checks its ``q`` tensor on the host: a sync on CUDA)."""
    s, last = v.sort().values, v.numel() - 1
    out = []
    for q in qs:
        pos = q * last
        lo = math.floor(pos)
        hi = min(lo + 1, last)
        out.append(s[lo] + (s[hi] - s[lo]) * (pos - lo))
    return out


class HeadHook(_InertWhenCopied):
    """Forward hook of the head module: returns at once outside report windows."""

    def __init__(self, window: Any, root: torch.nn.Module) -> None:
        self.window, self.root = window, root

    def __call__(self, module: torch.nn.Module, args: Any, out: Any) -> None:
        w = self.window
        if w._active and (w._measure_eval or training_forward(self.root)):
            w._head_add(out)


def head_add(head: HeadStats, out: Any) -> None:
    """The hook's body (run eagerly under torch.compile: see ``Monitor``)."""
    t = first_tensor(out)
    if t is not None:
        head.add(t)
