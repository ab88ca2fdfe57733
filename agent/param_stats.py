"""Per-parameter statistics around the optimizer step, batched with ``torch._foreach_*``.

Before the step (report steps only): gradient norm, max |g|, weight norm and
cos(-g, theta), plus a copy of a row sample of the weights. After the step: the update
ratio ||theta_before - theta_after|| / ||theta_before|| over that sample (every row of a
tensor with at most ``Config.sample`` elements, else every r-th row; see
``agent.stats.sample_stride``), which spares a full copy and two full passes over the
parameters. Norms, the copy and the difference are foreach kernels; nothing is read back.

cos(-g, theta) is measured on the same row sample: it needs a dot product, for which
there is no foreach kernel (a norm-based identity would lose its digits when
||g|| << ||theta||, the usual case), so it is one small kernel per tensor on the sample.
On CPU, max |g| is one ``aminmax`` per tensor: CPU has no fast path for the infinity
norm, which costs ~10x more there. Neither reads anything back.
"""

from __future__ import annotations

import torch
from torch import nn

from agent.config import PARAM_STATS
from agent.stats import sample_stride


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
        self._views: list[torch.Tensor] | None = None  # row samples of the parameters
        self._copy: list[torch.Tensor] | None = None  # their values before the step
        self._before: dict[str, list[torch.Tensor]] | None = None
        self.grad_norm: torch.Tensor | None = None  # global, over every gradient

    @torch.no_grad()
    def before_step(self) -> None:
        """Optimizer pre-step hook body, on report steps."""
        present = [j for j, p in enumerate(self.params) if p.grad is not None]
        if not present:
            self.grad_norm, self._before = None, None
            return
        grads = [self.params[j].grad for j in present]
        gn = torch._foreach_norm(grads)
        dev = gn[0].device
        self.grad_norm = torch.linalg.vector_norm(torch.stack([n.to(dev) for n in gn]).float())
        if not self.enabled:
            return
        if self._views is None:
            self._whole = [not p.is_contiguous() for p in self.params]
            self._views = [sample_view(p, self.sample, w)
                           for p, w in zip(self.params, self._whole, strict=True)]
            self._copy = [torch.empty_like(v) for v in self._views]
        wn_all = torch._foreach_norm(self.params)
        gs = [sample_view(g if self._whole[j] else g.contiguous(), self.sample, self._whole[j])
              for g, j in zip(grads, present, strict=True)]
        ws = [self._views[j] for j in present]
        cos = torch._foreach_div(
            [torch.dot(g.reshape(-1), w.reshape(-1)) for g, w in zip(gs, ws, strict=True)],
            torch._foreach_mul(torch._foreach_norm(gs), torch._foreach_norm(ws)))
        torch._foreach_copy_(self._copy, self._views)
        self._before = {"present": present, "gn": gn, "gmax": _max_abs(grads), "wn": wn_all,
                        "cos": cos}

    @torch.no_grad()
    def after_step(self, device: torch.device) -> torch.Tensor | None:
        """Optimizer post-step hook body: the ``[params x PARAM_STATS]`` block (device)."""
        b, self._before = self._before, None
        if not self.enabled or b is None or not self.params:
            return None
        dn = torch._foreach_norm(torch._foreach_sub(self._views, self._copy))
        on = torch._foreach_norm(self._copy)
        nan = torch.full((), float("nan"), device=device)
        cols = {k: [nan] * len(self.params) for k in ("gn", "gmax", "cos")}
        for k in cols:
            for j, v in zip(b["present"], b[k], strict=True):
                cols[k][j] = v
        gn, gmax, cos, wn, dn, on = (
            torch.stack([t.to(device) for t in ts]).float()
            for ts in (cols["gn"], cols["gmax"], cols["cos"], b["wn"], dn, on))
        block = {"grad_norm": gn, "grad_max_abs": gmax, "weight_norm": wn,
                 "update_ratio": dn / on, "nlm_cos": -cos}
        return torch.stack([block[k] for k in PARAM_STATS], dim=1)


def sample_view(p: torch.Tensor, limit: int, whole: bool = False) -> torch.Tensor:
    """A view of at most ``limit`` elements of contiguous ``p``: every r-th row (all of a
    small tensor, or of any tensor when ``whole``). The positions depend on the shape
    only, so a parameter and its gradient give matching samples. A view, not a copy, so
    that it shows the values the optimizer writes in place.
    """
    n = p.numel()
    if n <= limit or whole:
        return p
    width = p.shape[-1] if p.dim() else 1
    if width > limit:
        return p.view(-1)[:: sample_stride(n, limit, 1)]
    rows = n // width
    return p.view(rows, width)[:: sample_stride(rows, max(1, limit // width), 1)]


def _max_abs(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if tensors[0].device.type == "cpu":
        out = []
        for t in tensors:
            lo, hi = torch.aminmax(t)
            out.append(torch.maximum(hi, lo.neg()))
        return out
    return torch._foreach_max(torch._foreach_abs(tensors))
