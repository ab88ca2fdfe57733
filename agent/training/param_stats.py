"""Per-parameter statistics around the optimizer step, in a few batched kernels.

At the end of each backward of a report step (an autograd final callback, queued by a
post-accumulate-grad hook): gradient norm and max |g| over every element, of the gradients
as accumulated, so before the script's own ``clip_grad_norm_`` and, given the scaler's loss
scale, in unscaled units (the last backward before the step wins: under accumulation it
holds the sum). Before the step (report steps only): weight norm over every element, and
cos(-g, theta) over a row sample (a clip scales every gradient alike, so the cos is the
same before and after it); the row samples of the weights and of
the gradients are copied into two padded ``[params x sample]`` buffers with one
``_foreach_copy_`` each. The full-size norms are one ``_foreach_norm`` (``_norms``), max
|g| one ``_foreach_norm(inf)`` on a device and one ``aminmax`` per tensor on CPU
(``_max_abs``), for the parameters sampled in rows; those sampled whole (no larger than
``Config.sample``: biases, norms' weights, most tensors of a model) are copied into one
small buffer at the end of the backward and reduced by rows (a norm, an ``abs`` and an
``amax`` for all), and their weight norms are their weight samples' (kernels cost ~1.5 us
each of dispatch on CPU, however small the tensor). After the step: the update ratio
||theta_before - theta_after|| / ||theta_before|| over the same sample, which spares a
full copy and two full passes over the parameters. A sample is every row of a tensor
with at most ``Config.sample`` elements, else every r-th row (see
``neurotop.training.stats.row_layout``); a parameter that is not contiguous
(channels_last) is sampled by slicing its leading dimensions instead, so that
the sample is still a view. Nothing is read back.

The buffers make cos(-g, theta) and the update ratio three row-wise reductions for all
parameters at once instead of a few small kernels per tensor; zero padding adds nothing
to a dot product or a norm. On CPU, max |g| is one ``aminmax`` per tensor: CPU has no
fast path for the infinity norm, which costs ~10x more there. A sparse gradient's norm and
max come from its coalesced values; it has no row sample, so its cos is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from neurotop.config import PARAM_STATS
from neurotop.training.stats import float32_on, row_layout, to_device

#: Gradient values at most that ``step_norm`` copies into one buffer on the CPU (1 MiB of
#: float32): above it a model's tensors are big enough that their per-tensor loop costs
#: little beside reading them, and the copy would read and write them once more.
FLAT_NORM = 1 << 18


def param_names(model: nn.Module,
                optimizer: torch.optim.Optimizer) -> list[tuple[str, nn.Parameter]]:
    """The optimizer's parameters, named by ``named_parameters()`` path where they have one."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g, group in enumerate(optimizer.param_groups):
        for k, p in enumerate(group["params"]):
            out.append((names.get(id(p), f"group{g}.{k}"), p))
    return out


class ParamStats:
    """Device-side ``[params x PARAM_STATS]`` for one optimizer step."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], enabled: bool = True,
                 sample: int = 4096) -> None:
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.enabled = enabled
        self.sample = sample
        self._leading: list[bool] = []  # sampled by leading dimensions (not contiguous)
        self._recipes: list[Recipe] = []  # where each parameter's sample lies
        self._views: list[torch.Tensor] = []  # row samples of the parameters (views)
        self._w: torch.Tensor | None = None  # [params x width]: the weights' samples
        self._g: torch.Tensor | None = None  # [params x width]: the gradients' samples
        self._w_rows: list[torch.Tensor] = []  # row j of ``_w``, shaped like ``_views[j]``
        self._g_rows: list[torch.Tensor] = []
        self._whole: list[int] = []  # parameters sampled whole, reduced in ``_gs`` (see
        self._big: list[int] = []  # ``_buffers``), and the others
        self._gs: torch.Tensor | None = None
        self._gs_rows: list[torch.Tensor] = []
        self._perm: torch.Tensor | None = None  # [whole..., big...] back to parameter order
        self._big_idx: torch.Tensor | None = None
        self._before: dict[str, torch.Tensor] | None = None
        self._weights: tuple[torch.Tensor, torch.Tensor] | None = None  # (on, wn) of ``_w``
        #: (present, norms, max |g|) of the gradients as the last backward left them
        self._acc: tuple[list[int], torch.Tensor, torch.Tensor | None] | None = None
        self._queued = False  # the end-of-backward callback is queued
        self._armed = False  # ``accumulate_hooks`` was called and not removed since
        self._hooks: list[Any] = []  # the parameters' hook handles, in a report window only
        self._active: Callable[[], bool] = _never
        self._scale: Callable[[], torch.Tensor | None] = _no_scale
        self.grad_norm: torch.Tensor | None = None  # global, over every gradient
        self._flat: torch.Tensor | None = None  # every gradient, for ``step_norm`` (CPU)
        self._flat_views: list[torch.Tensor] | None = None  # its views (None: not made yet)

    def accumulate_hooks(self, active: Callable[[], bool],
                         scale: Callable[[], torch.Tensor | None]) -> list[Any]:
        """Post-accumulate-grad hooks on the parameters: in a backward of a report window the
        first one to fire queues ``_accumulated`` for the end of that backward. They exist
        only while ``active()`` holds at a window's start (``sync``), so that a non-report
        step runs no hook of neurotop. ``scale``: the loss scale to divide by (a device
        tensor, or None). The handle returned removes them for good."""
        self._active, self._scale, self._armed = active, scale, True
        self.sync()
        return [_Hooks(self)]

    def sync(self) -> None:
        """Register the hooks if ``active()`` (a report window opens), remove them if not
        (the window's report is taken and the next step does not report)."""
        want = self._armed and self._active()
        if want and not self._hooks:
            hook = _AccumulateHook(self)
            self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in self.params
                           if p.requires_grad and p.is_leaf]
        elif not want:
            for h in self._hooks:
                h.remove()
            self._hooks = []

    def _on_accumulate(self) -> None:
        if self._queued or not self._active():
            return
        self._queued = True
        torch.autograd.Variable._execution_engine.queue_callback(self._after_others)

    def _after_others(self) -> None:
        """Queued again from a final callback, ``_accumulated`` runs after every callback
        this backward queued, DDP's included (it writes the all-reduced gradients): under
        DDP the norms are the job's gradient's, the same on every rank."""
        torch.autograd.Variable._execution_engine.queue_callback(self._accumulated)

    @torch.no_grad()
    def _accumulated(self) -> None:
        """End of a backward (every gradient of it accumulated): the per-parameter norms and
        max |g| as they stand, before anything the script does to them before the step."""
        self._queued = False
        present = [j for j, p in enumerate(self.params) if p.grad is not None]
        if not present:
            return
        raw = [self.params[j].grad for j in present]
        if self.enabled and self._w is None:
            self._buffers()
        if self._whole and len(present) == len(self.params) and not any(
                g.is_sparse for g in raw):
            gn, gmax = self._batched(raw)
        else:
            grads = [_dense(g) for g in raw]
            dev = grads[0].device
            gn = _norms(grads, dev)
            gmax = _max_abs(grads, dev) if self.enabled else None
        dev = gn.device
        s = self._scale()
        if s is not None:
            inv = s.to(dev, torch.float32).reciprocal().reshape(())
            gn = gn * inv
            gmax = gmax * inv if gmax is not None else None
        self._acc = (present, gn, gmax)

    def discard(self) -> None:
        """Forget this window's gradients (the scaler skipped the step they were for)."""
        self._acc, self._before = None, None

    def _buffers(self) -> None:
        """The sample views and the padded buffers, made once (shapes never change)."""
        self._leading = [not p.is_contiguous() for p in self.params]
        self._recipes = [sample_recipe(tuple(p.shape), self.sample, lead)
                         for p, lead in zip(self.params, self._leading, strict=True)]
        self._views = [apply_recipe(p, r) for p, r in zip(self.params, self._recipes, strict=True)]
        width = max((v.numel() for v in self._views), default=0)
        p0 = self.params[0]
        self._w = torch.zeros(len(self.params), width, device=p0.device, dtype=torch.float32)
        self._g = torch.zeros_like(self._w)
        self._w_rows = [self._w[j, : v.numel()].view(v.shape) for j, v in enumerate(self._views)]
        self._g_rows = [self._g[j, : v.numel()].view(v.shape) for j, v in enumerate(self._views)]
        # Parameters sampled whole (biases, norms' weights: most tensors of a model, few of
        # its values): their norms and max |g| are row reductions of one small buffer
        # instead of one kernel each (each costs ~1.5 us of dispatch on CPU).
        dev = p0.device
        whole = [j for j, r in enumerate(self._recipes) if r is None]
        if len(whole) < 2 or any(p.device != dev for p in self.params):
            return
        self._whole = whole
        self._big = [j for j in range(len(self.params)) if self._recipes[j] is not None]
        self._gs = torch.zeros(len(whole), max(self._views[j].numel() for j in whole),
                               device=dev, dtype=torch.float32)
        self._gs_rows = [self._gs[r, : self.params[j].numel()].view(self.params[j].shape)
                         for r, j in enumerate(whole)]
        order = whole + self._big  # where each parameter's value lies in [whole..., big...]
        if order != sorted(order):
            at = [0] * len(order)
            for k, j in enumerate(order):
                at[j] = k
            self._perm = to_device(torch.tensor(at, dtype=torch.long), dev)
        if self._big:
            self._big_idx = to_device(torch.tensor(self._big, dtype=torch.long), dev)

    def _batched(self, grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Norms and max |g| of every parameter's gradient (all present, dense), those of
        the parameters sampled whole from their rows of ``_gs``, in parameter order."""
        dev = self._gs.device
        torch._foreach_copy_(self._gs_rows, [grads[j] for j in self._whole])
        gn = torch.linalg.vector_norm(self._gs, dim=1)
        gmax = self._gs.abs().amax(1)  # zero padding never exceeds |g|; NaN propagates
        if self._big:
            big = [grads[j] for j in self._big]
            gn = torch.cat((gn, _norms(big, dev)))
            gmax = torch.cat((gmax, _max_abs(big, dev)))
        if self._perm is not None:
            gn, gmax = gn.index_select(0, self._perm), gmax.index_select(0, self._perm)
        return gn, gmax

    @torch.no_grad()
    def take_weights(self) -> None:
        """The weights before an update: their samples into ``_w``, their norms. Part of
        ``before_step``; without an optimizer (``Monitor.step()``) it is called alone at
        the boundary that opens a report window, since the weights change only in the
        loop's own update, after the gradients (``before_step(weights=False)``)."""
        if not self.enabled or not self.params:
            return
        if self._w is None:
            self._buffers()
        torch._foreach_copy_(self._w_rows, self._views)
        on = torch.linalg.vector_norm(self._w, dim=1)
        if not self._whole:
            wn = _norms(self.params, self.params[0].device)
        elif self._big_idx is None:  # every row of ``_w`` is a whole parameter
            wn = on
        else:  # the whole ones' norms are their rows'
            wn = on.index_copy(0, self._big_idx, _norms([self.params[j] for j in self._big],
                                                        on.device))
        self._weights = (on, wn)

    @torch.no_grad()
    def before_step(self, weights: bool = True) -> None:
        """Optimizer pre-step hook body, on report steps. ``weights=False``: the weights
        were taken before the update by ``take_weights``. The gradient norms and max |g|
        are those of the end of the last backward (``_accumulated``); gradients that no
        backward of this window left (set by hand) are measured here, as they are now."""
        acc, self._acc, self._queued = self._acc, None, False  # (a failed backward
        # never ran its callback: the next one queues again)
        raw = [p.grad for p in self.params]
        present = [j for j, g in enumerate(raw) if g is not None]
        if not present:
            self.grad_norm, self._before = None, None
            return
        grads = [_dense(raw[j]) for j in present]
        dev = grads[0].device
        if acc is not None and acc[0] == present and (acc[2] is not None or not self.enabled):
            gn, gmax = acc[1], acc[2]
        else:
            gn = _norms(grads, dev)
            gmax = _max_abs(grads, dev) if self.enabled else None
        self.grad_norm = torch.linalg.vector_norm(gn.float())
        if not self.enabled:
            return
        if self._w is None:
            self._buffers()
        all_present = len(present) == len(self.params)
        sampled = [j for j in present if not raw[j].is_sparse]
        if len(sampled) < len(self.params):
            self._g.zero_()  # no gradient, or a sparse one: no sample (cos is NaN)
        torch._foreach_copy_([self._g_rows[j] for j in sampled],
                             [self._grad_sample(j, raw[j]) for j in sampled])
        if weights or self._weights is None:
            self.take_weights()
        (on, wn), self._weights = self._weights, None
        # a parameter without a gradient has a zero row in ``_g``: its cos is 0/0, NaN
        cos = (self._g * self._w).sum(1) / (torch.linalg.vector_norm(self._g, dim=1) * on)
        if not all_present:  # NaN for the parameters without a gradient
            gn, gmax = (_spread(t, present, len(self.params)) for t in (gn, gmax))
        self._before = {"gn": gn, "gmax": gmax, "cos": cos, "on": on, "wn": wn.to(dev)}

    @torch.no_grad()
    def step_norm(self) -> torch.Tensor | None:
        """The global norm of the gradients as they are now (device, not read back), for
        the per-step carry (``neurotop.training.carry``) on steps that do not report: on a
        device one ``_foreach_norm`` (a few multi-tensor kernels), no hook. On the CPU,
        where ``_foreach_norm`` loops over the tensors (~3 us each), a small model's
        gradients are copied into one flat buffer (one call, ~1 us a tensor) and reduced
        at once (``_flat_rows``). None without gradients."""
        grads = [p.grad for p in self.params]
        rows = self._flat_rows(grads)
        if rows is not None:
            torch._foreach_copy_(rows, grads)
            return torch.linalg.vector_norm(self._flat)
        grads = [_dense(g) for g in grads if g is not None]
        if not grads:
            return None
        return torch.linalg.vector_norm(_stack(torch._foreach_norm(grads), grads[0].device))

    def _flat_rows(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor] | None:
        """Views of ``_flat`` shaped like the parameters, when every gradient is present and
        dense; ``[]`` (never) unless the parameters lie on the CPU, are not float64
        (float32 keeps them) and hold at most ``FLAT_NORM`` values in all. A gradient has
        its parameter's device and dtype, so those are asked once, when it is made."""
        if not all(g is not None and not g.is_sparse for g in grads):
            return None
        if self._flat_views is None:
            sizes = [p.numel() for p in self.params]
            self._flat_views = []
            if sizes and sum(sizes) <= FLAT_NORM and all(
                    p.is_cpu and p.dtype != torch.float64 for p in self.params):
                self._flat = torch.empty(sum(sizes))
                self._flat_views = [v.view(p.shape) for v, p in zip(
                    self._flat.split(sizes), self.params, strict=True)]
        return self._flat_views or None

    def _grad_sample(self, j: int, g: torch.Tensor) -> torch.Tensor:
        """Parameter ``j``'s gradient ``g`` at the positions of its weight sample."""
        return apply_recipe(g if self._leading[j] or g.is_contiguous() else g.contiguous(),
                            self._recipes[j])

    @torch.no_grad()
    def after_step(self, device: torch.device) -> torch.Tensor | None:
        """Optimizer post-step hook body: the ``[params x PARAM_STATS]`` block (device)."""
        b, self._before = self._before, None
        if not self.enabled or b is None or not self.params:
            return None
        torch._foreach_sub_(self._w_rows, self._views)  # before - after
        dn = torch.linalg.vector_norm(self._w, dim=1)
        block = {"grad_norm": b["gn"], "grad_max_abs": b["gmax"], "weight_norm": b["wn"],
                 "update_ratio": dn / b["on"], "nlm_cos": -b["cos"]}
        return torch.stack([float32_on(block[k], device) for k in PARAM_STATS], dim=1)


class _Hooks:
    """The handle ``accumulate_hooks`` returns: ``remove`` takes the hooks off for good."""

    def __init__(self, stats: ParamStats) -> None:
        self.stats = stats

    def remove(self) -> None:
        self.stats._armed = False
        self.stats.sync()


class _AccumulateHook:
    """The post-accumulate-grad hook of every watched parameter. A class, so that a copy of
    a parameter that carried it (``Tensor`` copies do not, today) would carry a no-op."""

    def __init__(self, stats: ParamStats) -> None:
        self.stats = stats

    def __call__(self, p: torch.Tensor) -> None:
        self.stats._on_accumulate()

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[[torch.Tensor], None]:
        return _noop

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_noop_factory, ())


def _noop(p: torch.Tensor) -> None:
    return None


def _never() -> bool:
    return False


def _no_scale() -> None:
    return None


def _noop_factory() -> Callable[[torch.Tensor], None]:
    return _noop


Recipe = tuple[tuple[int, ...] | None, tuple[slice, ...]] | None


def sample_recipe(shape: tuple[int, ...], limit: int, leading: bool = False) -> Recipe:
    """Where the sample of a tensor of ``shape`` lies: None for the whole tensor, else the
    view shape to index (None: as it is) and the index. Worked out once per parameter
    (``ParamStats._buffers``), so a report's gradient samples cost no Python per shape."""
    if math.prod(shape) <= limit:
        return None
    if leading:
        return None, _leading_index(shape, limit)
    rows, every = row_layout(tuple(shape), limit, 1)
    if rows is not None:
        return (rows[0], rows[1]), (slice(None, None, rows[2]),)
    return (-1,), (slice(None, None, every),)


def apply_recipe(p: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """The sample ``recipe`` describes, as a view of ``p``."""
    if recipe is None:
        return p
    shape, index = recipe
    return (p if shape is None else p.view(shape))[index]


def sample_view(p: torch.Tensor, limit: int, leading: bool = False) -> torch.Tensor:
    """A view of at most ``limit`` elements of ``p``: every r-th row (all of a small
    tensor) of contiguous ``p``; with ``leading`` (for a parameter that is not contiguous)
    every s-th index of its leading dimensions. The positions depend on the shape only, so
    a parameter and its gradient give matching samples. A view, not a copy, so that it
    shows the values the optimizer writes in place.
    """
    return apply_recipe(p, sample_recipe(tuple(p.shape), limit, leading))


def _leading_index(shape: tuple[int, ...], limit: int) -> tuple[slice, ...]:
    """Every s-th index along the first dimensions, until at most ``limit`` elements."""
    sizes, index = list(shape), []
    for d in range(len(shape)):
        if math.prod(sizes) <= limit:
            break
        rest = math.prod(sizes[d + 1:])
        keep = max(1, limit // rest)
        step = sizes[d] if keep == 1 and rest > limit else -(-sizes[d] // keep)
        index.append(slice(None, None, step))
        sizes[d] = -(-sizes[d] // step)
    return tuple(index)


def _norms(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The 2-norm of each tensor, as one float32 tensor on ``device``: one
    ``_foreach_norm`` per dtype (one multi-tensor kernel on a device; on CPU one call that
    loops in C++, measured as fast as a loop of ``vector_norm`` and faster than BLAS dot
    products with torch 2.13, without their Python per tensor). Half-precision tensors are
    reduced in float32."""
    if all(t.dtype in _WIDE for t in tensors):
        return _stack(torch._foreach_norm(tensors, 2), device)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for j, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(j)
    for dt, idx in by_dtype.items():
        kw = {} if dt in _WIDE else {"dtype": torch.float32}
        for j, n in zip(idx, torch._foreach_norm([tensors[j] for j in idx], 2, **kw),
                        strict=True):
            out[j] = n
    return _stack(out, device)  # type: ignore[arg-type]


#: Dtypes whose norms are taken in their own precision.
_WIDE = (torch.float32, torch.float64)


def _stack(ts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One float32 tensor of 0-d ``ts`` (parameters may differ in device and dtype): one
    kernel when they all lie on ``device`` (not one conversion per parameter)."""
    if all(t.device == device for t in ts):
        out = torch.stack(ts)
        return out if out.dtype == torch.float32 else out.float()
    return torch.stack([t.to(device, torch.float32) for t in ts])


def _spread(values: torch.Tensor, present: list[int], n: int) -> torch.Tensor:
    """``values`` (one per present parameter) at their places among ``n``, NaN elsewhere."""
    nan = torch.full((), float("nan"), device=values.device, dtype=values.dtype)
    out = [nan] * n
    for j, v in zip(present, values.unbind(0), strict=True):
        out[j] = v
    return torch.stack(out)


def _dense(g: torch.Tensor) -> torch.Tensor:
    """What decides a gradient's norm and max |g|: itself, or a sparse one's coalesced
    values (``nn.Embedding(sparse=True)``; on CUDA, coalescing waits for the device)."""
    return g.coalesce().values() if g.is_sparse else g


def _max_abs(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """max |t| of each tensor (0 for an empty one: a sparse gradient that touched no row),
    as one float32 tensor on ``device``. On a device one ``_foreach_norm(inf)``, a
    multi-tensor kernel with no temporary; on CPU, where that norm runs ~10x slower than
    ``aminmax`` (torch 2.13), one ``aminmax`` per tensor and three kernels for all."""
    if tensors[0].device.type != "cpu" and all(t.numel() for t in tensors):
        return _stack(torch._foreach_norm(tensors, math.inf), device)
    if device.type == "cpu" and all(t.is_cpu for t in tensors):
        # read at no cost on the CPU: one small tensor instead of two stacks of 0-d ones
        out = []
        for t in tensors:
            if t.numel():
                a, b = torch.aminmax(t)
                out.append(max(b.item(), -a.item()))  # NaN: both are, max keeps it
            else:
                out.append(0.0)
        return torch.tensor(out, dtype=torch.float32)
    lo, hi = [], []
    for t in tensors:
        if t.numel():
            a, b = torch.aminmax(t)
        else:
            a = b = t.new_zeros(())
        lo.append(a)
        hi.append(b)
    return torch.maximum(_stack(hi, device), _stack(lo, device).neg_())
