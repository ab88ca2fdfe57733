"""The curvature probe (METRICS.md D, E7, E11): the loss's Hessian on a fixed probe batch.

Training thread, at a step boundary, every ``Config.probe_every`` steps or on a ``probe``
command; never on the hot path (nothing here runs unless a probe batch or closure was given
and a probe is due). One forward of the probe loss and one backward with ``create_graph``
give the gradient's graph; each Hessian-vector product is then one more backward through it
(double backward, Pearlmutter's trick), and:

- ``lambda_max``: the top eigenvalue of H by power iteration (``ITERS`` = 20 products), the
  Rayleigh quotient v.Hv of the last iterate (the eigenvalue of largest magnitude: a large
  negative one shows as negative);
- ``hessian_trace``: Hutchinson's estimate, the mean of v.Hv over ``TRACE_SAMPLES``
  Rademacher vectors;
- ``precond_sharpness`` (Adam family): the top eigenvalue of P^-1 H with
  P = (1 - beta1^t) diag(sqrt(v_hat) + eps), Adam's own preconditioner (Cohen et al. 2022),
  by power iteration on the symmetric P^-1/2 H P^-1/2;
- ``eos_threshold``: the stability threshold of the boundary optimizer at its current lr:
  2/lr for plain (S)GD, (2 + 2 beta)/lr with heavy-ball momentum beta,
  (2 + 2 beta)/((1 + 2 beta) lr) with Nesterov's, (2 + 2 beta1)/((1 - beta1) lr) for Adam
  (38/lr at beta1 = 0.9); NaN for other optimizers and without one;
- with ``features`` (a layer of the model), the effective rank of its output on the probe
  batch and, with class labels, NC1 (``effective_rank``, ``nc1``).

The probe leaves the run exactly as it found it: parameters (never written), their ``.grad``
(the tensors themselves are put back, so a closure that calls ``backward`` cannot touch
them), every buffer (BatchNorm running statistics, restored by value), the RNG states of
the CPU and the model's device (the forward's dropout draws from a forked generator), and
the optimizer's state (only read). The monitor's own hooks are off while it runs.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from neurotop.service.curvature_rules import PROBE_SCALARS
from neurotop.training.stats import first_tensor

log = logging.getLogger("neurotop.agent")

#: Power iterations for ``lambda_max`` and ``precond_sharpness`` (METRICS.md D: 20).
ITERS = 20
#: Rademacher vectors for Hutchinson's trace.
TRACE_SAMPLES = 10
#: Rows of the feature matrix used at most (every k-th beyond) for the effective rank/NC1.
MAX_FEATURE_ROWS = 4096

LossFn = Callable[[Any, Any], torch.Tensor]
Closure = Callable[[], torch.Tensor]


def default_loss(out: Any, y: torch.Tensor | None) -> torch.Tensor:
    """The probe batch's loss without ``probe_loss=``: cross-entropy for integer labels
    (the output's last dimension holds the classes, every other one is rows), mean squared
    error for float targets of the output's shape."""
    out = first_tensor(out) if not isinstance(out, torch.Tensor) else out
    if y is None:
        raise ValueError("probe_batch(x) without targets needs watch(probe_loss=fn), fn(out, None)"
                         " returning the loss")
    if not y.is_floating_point():
        return nn.functional.cross_entropy(out.flatten(0, -2), y.flatten())
    return nn.functional.mse_loss(out, y.to(out.dtype))


def eos_threshold(optimizer: torch.optim.Optimizer | None) -> tuple[float, str]:
    """The sharpness at which the optimizer's first param group stops being stable at its
    lr, and how it is written; NaN for optimizers it is not known for."""
    if optimizer is None or not optimizer.param_groups:
        return math.nan, ""
    g = optimizer.param_groups[0]
    lr = float(g.get("lr", math.nan))
    if not lr > 0:
        return math.nan, ""
    if "betas" in g and _adam_like(optimizer):
        b1 = float(g["betas"][0])
        return (2 + 2 * b1) / ((1 - b1) * lr), f"(2+2b1)/((1-b1) lr) (b1={b1:g})"
    if isinstance(optimizer, torch.optim.SGD):
        b = float(g.get("momentum", 0.0) or 0.0)
        if b == 0:
            return 2 / lr, "2/lr"
        if g.get("nesterov"):
            return (2 + 2 * b) / ((1 + 2 * b) * lr), f"(2+2b)/((1+2b) lr) (b={b:g})"
        return (2 + 2 * b) / lr, f"(2+2b)/lr (b={b:g})"
    return math.nan, ""


def _adam_like(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) or (
        type(optimizer).__name__ in ("Adam", "AdamW", "FusedAdam", "NAdam", "RAdam"))


def effective_rank(h: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli's effective rank of ``h`` ``[N x d]``: the exp of the entropy of its
    singular values normalized to sum 1, as RankMe (Garrido et al. 2023) takes it on raw,
    uncentered features: a collapse onto one vector (every row alike, whatever the noise
    left around it) and one onto a few directions both show; 1 for a zero matrix."""
    s = torch.linalg.svdvals(h.double())
    total = s.sum()
    if not total > 0:
        return torch.ones((), dtype=torch.float64, device=h.device)
    p = s / total
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum())


def nc1(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Neural collapse NC1 = tr(Sw Sb^+)/C of features ``h`` ``[N x d]`` with labels ``y``:
    Sw the within-class covariance, Sb the covariance of the C class means. Computed in the
    span of the centered class means (Sb's range), so it costs O(N d C), not a d x d inverse."""
    h, y = h.double(), y.flatten()
    classes, inv = torch.unique(y, return_inverse=True)
    c = len(classes)
    if c < 2:
        return torch.full((), math.nan, dtype=torch.float64, device=h.device)
    counts = torch.bincount(inv, minlength=c).to(h.dtype)
    means = torch.zeros(c, h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, inv, h)
    means = means / counts[:, None]
    centered = (means - means.mean(0, keepdim=True)).T  # d x C: Sb = centered @ centered.T / C
    u, s, _ = torch.linalg.svd(centered, full_matrices=False)
    keep = s > s.max() * 1e-8
    u, s = u[:, keep], s[keep]
    within = (h - means[inv]) @ u  # N x r: the within-class deviations in Sb's range
    sw = (within * within).sum(0) / h.shape[0]  # diag(U^T Sw U)
    return (sw / (s * s / c)).sum() / c


class CurvatureProbe:
    """What the monitor calls: holds the probe batch (or closure), runs the probe, and keeps
    its scalars for the next report."""

    def __init__(self, model: nn.Module, optimizer: Callable[[], torch.optim.Optimizer | None],
                 *, every: int = 0, features: str | None = None,
                 loss_fn: LossFn | None = None) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"probe_loss= takes a function fn(out, y), not {loss_fn!r}")
        self.model, self.every, self._optimizer = model, every, optimizer
        self.loss_fn = loss_fn or default_loss
        self.features = self._find(features)
        self._x: Any = None
        self._y: torch.Tensor | None = None
        self._closure: Closure | None = None
        self._pending: dict[str, Any] = {}
        self.classes = 0  # distinct class labels of the probe batch (0: none)
        #: What ``run`` does by default (``set_cost``): power iterations, Hutchinson
        #: vectors, and whether Adam's preconditioned sharpness is measured too.
        self.iters, self.trace_samples, self.precond = ITERS, TRACE_SAMPLES, True

    # -- configuration (user thread = training thread) --------------------------------------

    @property
    def ready(self) -> bool:
        """A probe batch or a closure was given."""
        return self._closure is not None or self._x is not None

    def set_batch(self, x: Any, y: Any = None) -> None:
        dev = self._device()
        if not isinstance(x, torch.Tensor) or (y is not None and not isinstance(y, torch.Tensor)):
            raise TypeError("probe_batch(x, y) takes tensors (y may be None)")
        if y is None and self.loss_fn is default_loss:
            raise ValueError("probe_batch(x) without y needs watch(probe_loss=fn): the"
                             " default loss compares the output with y")
        self._x = x.detach().to(dev)
        self._y = y.detach().to(dev) if y is not None else None
        self._closure = None
        self.classes = 0 if y is None or y.is_floating_point() else int(
            torch.unique(y).numel())

    def set_closure(self, fn: Closure) -> None:
        if not callable(fn):
            raise TypeError(f"probe(fn) takes a function returning a scalar loss, not {fn!r}")
        self._closure, self._x, self._y, self.classes = fn, None, None, 0

    def set_cost(self, iters: int, trace: int, precond: bool) -> None:
        """How much one probe does: ``iters`` >= 1 power iterations per eigenvalue,
        ``trace`` >= 0 Hutchinson vectors, ``precond``: Adam's P^-1 H too."""
        for name, v, lo in (("iters", iters, 1), ("trace", trace, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not isinstance(precond, bool):
            raise TypeError(f"precond must be true or false, got {precond!r}")
        self.iters, self.trace_samples, self.precond = iters, trace, precond

    def due(self, step: int) -> bool:
        return self.every > 0 and self.ready and step % self.every == 0

    def schema(self) -> dict[str, Any]:
        return {"every": self.every, "features": self.features[0] if self.features else "",
                "threshold": eos_threshold(self._optimizer())[1],
                "mode": "closure" if self._closure else "batch", "classes": self.classes}

    def take(self) -> dict[str, Any]:
        """The last probe's scalars, once (the reports after it get NaN)."""
        out, self._pending = self._pending, {}
        return out

    # -- the probe ------------------------------------------------------------------------

    def run(self, step: int, iters: int | None = None, trace_samples: int | None = None,
            precond: bool | None = None) -> dict[str, torch.Tensor]:
        """One probe at this boundary: its scalars (0-d tensors on the model's device), also
        kept for the next report. ``iters`` power iterations for each eigenvalue,
        ``trace_samples`` Hutchinson vectors (0: no trace), ``precond``: Adam's
        preconditioned sharpness too (``iters`` more products); None: ``set_cost``'s."""
        iters = self.iters if iters is None else iters
        trace_samples = self.trace_samples if trace_samples is None else trace_samples
        precond = self.precond if precond is None else precond
        if not self.ready:
            raise RuntimeError("no probe batch: call mon.probe_batch(x, y) or mon.probe(fn)")
        t0 = time.perf_counter()
        opt = self._optimizer()
        params = self._params(opt)
        if not params:
            raise RuntimeError("the probe found no parameter that requires grad")
        dev = params[0].device
        out: dict[str, torch.Tensor] = {}
        with self._untouched(params, dev), torch.enable_grad(), _math_attention():
            captured: list[torch.Tensor] = []
            loss, logits = self._loss(captured)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            live = [(p, g) for p, g in zip(params, grads, strict=True)
                    if g is not None and g.requires_grad]
            if not live:
                raise RuntimeError("the probe loss's gradient does not depend on the"
                                   " parameters: its Hessian is 0")
            ps, gs = [p for p, _ in live], [g for _, g in live]

            def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
                hv = torch.autograd.grad(gs, ps, v, retain_graph=True, allow_unused=True)
                return [torch.zeros_like(p) if h is None else h.detach()
                        for p, h in zip(ps, hv, strict=True)]

            gen = torch.Generator(device=dev).manual_seed(step)
            out["lambda_max"] = _power(hvp, ps, iters, gen)
            if trace_samples > 0:
                out["hessian_trace"] = _hutchinson(hvp, ps, trace_samples, gen)
            scale = _adam_scale(opt, ps) if precond else None
            if scale is not None:
                out["precond_sharpness"] = _power(hvp, ps, iters, gen, scale)
            out["probe_loss"] = loss.detach().float()
            acc = self._accuracy(logits)
            if acc is not None:
                out["probe_acc"] = acc
            if captured:
                feats, n, k = _rows(captured[0])
                out["feature_erank"] = effective_rank(feats).float()
                y = self._y
                if y is not None and not y.is_floating_point() and y.numel() == n:
                    out["nc1"] = nc1(feats, y.flatten()[::k]).float()
        thr = eos_threshold(opt)[0]
        out = {k: v.reshape(()).to(dev, torch.float32) for k, v in out.items()}
        if math.isfinite(thr):
            out["eos_threshold"] = torch.tensor(thr, dtype=torch.float32, device=dev)
        out["probe_step"] = torch.tensor(float(step), device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        out["probe_ms"] = torch.tensor((time.perf_counter() - t0) * 1e3, device=dev)
        self._pending = {k: v for k, v in out.items() if k in PROBE_SCALARS}
        return out

    def _loss(self, captured: list[torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """The probe loss (and the model's output in batch mode), the features layer's first
        output of the forward in ``captured``."""
        handle = None
        if self.features is not None:
            def grab(module: nn.Module, args: Any, output: Any) -> None:
                t = output if isinstance(output, torch.Tensor) else first_tensor(output)
                if not captured and t is not None:
                    captured.append(t.detach())
            handle = self.features[1].register_forward_hook(grab)
        try:
            if self._closure is not None:
                loss, logits = self._closure(), None
            else:
                logits = self.model(self._x)
                loss = self.loss_fn(logits, self._y)
        finally:
            if handle is not None:
                handle.remove()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"the probe loss must be a scalar tensor, got {type(loss).__name__}"
                            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        if not loss.requires_grad:
            raise RuntimeError("the probe loss does not require grad (computed under"
                               " torch.no_grad()?)")
        return loss.reshape(()), logits

    def _accuracy(self, logits: Any) -> torch.Tensor | None:
        y = self._y
        z = logits if isinstance(logits, torch.Tensor) else first_tensor(logits) \
            if logits is not None else None
        if z is None or y is None or y.is_floating_point() or z.dim() < 1 or z.shape[-1] < 2:
            return None
        if z.numel() // z.shape[-1] != y.numel():
            return None
        return (z.detach().flatten(0, -2).argmax(-1) == y.flatten()).float().mean()

    def _params(self, opt: torch.optim.Optimizer | None) -> list[torch.nn.Parameter]:
        """The parameters the boundary optimizer trains, else the model's trainable ones."""
        if opt is not None:
            seen: set[int] = set()
            out = []
            for g in opt.param_groups:
                for p in g["params"]:
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        out.append(p)
            return out
        return [p for p in self.model.parameters() if p.requires_grad]

    def _find(self, pattern: str | None) -> tuple[str, nn.Module] | None:
        if pattern is None or pattern == "":
            return None
        if not isinstance(pattern, str):
            raise TypeError(f"features= takes a module path or glob, not {pattern!r}")
        for name, m in self.model.named_modules():
            if name and fnmatch.fnmatchcase(name, pattern):
                return name, m
        raise ValueError(f"features={pattern!r}: no module of the model matches (paths as in"
                         " model.named_modules())")

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @contextlib.contextmanager
    def _untouched(self, params: list[torch.nn.Parameter], dev: torch.device) -> Iterator[None]:
        """Every piece of state the probe's forward and backward could change, put back."""
        grads = [p.grad for p in params]
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        for p in params:
            p.grad = None
        devices = [dev] if dev.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for p, g in zip(params, grads, strict=True):
                p.grad = g


def _math_attention() -> contextlib.AbstractContextManager[None]:
    """Fused attention kernels (flash, memory-efficient) have no double backward: the probe's
    forward runs ``scaled_dot_product_attention`` on its math kernel."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True))


def _unit(v: list[torch.Tensor]) -> list[torch.Tensor]:
    n = _dot(v, v).sqrt().clamp_min(1e-30)
    return [x / n.to(x.dtype) for x in v]


def _power(hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]], ps: list[torch.Tensor],
           iters: int, gen: torch.Generator,
           scale: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Power iteration on H (or S H S, S = diag(``scale``)): the Rayleigh quotient of the
    last iterate. No value is read back to the host."""
    v = _unit([torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
               for p in ps])
    lam = torch.zeros((), dtype=torch.float64, device=ps[0].device)

    def op(x: list[torch.Tensor]) -> list[torch.Tensor]:
        if scale is None:
            return hvp(x)
        return [s * h for s, h in zip(scale, hvp([s * t for s, t in zip(scale, x,
                                                                      strict=True)]),
                                      strict=True)]
    for _ in range(max(1, iters)):
        hv = op(v)
        lam = _dot(v, hv)
        v = _unit(hv)
    return lam


def _hutchinson(hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]],
                ps: list[torch.Tensor], samples: int, gen: torch.Generator) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=ps[0].device)
    for _ in range(samples):
        v = [torch.randint(0, 2, p.shape, generator=gen, device=p.device).to(p.dtype) * 2 - 1
             for p in ps]
        total = total + _dot(v, hvp(v))
    return total / max(1, samples)


def _adam_scale(opt: torch.optim.Optimizer | None,
                ps: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """P^-1/2 of Adam's preconditioner P = (1 - b1^t) diag(sqrt(v_hat) + eps) for each of
    ``ps`` (0 for a parameter without state yet: it is left out); None if not Adam-like or
    before its first step."""
    if opt is None or not _adam_like(opt):
        return None
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    out, any_state = [], False
    for p in ps:
        g, st = group_of.get(id(p)), opt.state.get(p, {})
        if g is None or "exp_avg_sq" not in st or "betas" not in g:
            out.append(torch.zeros_like(p))
            continue
        any_state = True
        b1, b2 = (float(b) for b in g["betas"])
        t = float(st["step"]) if "step" in st else 1.0
        v = st.get("max_exp_avg_sq") if g.get("amsgrad") else st["exp_avg_sq"]
        v_hat = v.detach() / (1 - b2 ** t)
        pre = (1 - b1 ** t) * (v_hat.sqrt() + float(g.get("eps", 1e-8)))
        out.append(pre.to(p.dtype).rsqrt())
    return out if any_state else None


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """A feature output as ``[rows x features]``: 2-D as is, channels-first images pooled
    over space, sequences (``[B, T, d]``) as one row per token; at most
    ``MAX_FEATURE_ROWS`` rows (every k-th). Also the row count before that, and k."""
    if t.dim() == 1:
        t = t[:, None]
    elif t.dim() >= 4:
        t = t.flatten(2).mean(-1)
    else:
        t = t.flatten(0, -2)
    k = max(1, math.ceil(len(t) / MAX_FEATURE_ROWS))
    return t[::k].float(), len(t), k
