"""Per-layer statistics, computed on the tensor's own device.

Every function here returns device tensors and never reads a value back to
the host: the training thread must not sync. The agent thread copies one
stacked block per report.
"""

from __future__ import annotations

import torch

#: Column order of the ``[layers x stats]`` block; the same names go on the wire, in
#: session files, in the CLI and in the UI's column headers.
LAYER_STATS: tuple[str, ...] = ("mean", "std", "max_abs", "zero_frac")


@torch.no_grad()
def layer_stats(a: torch.Tensor) -> torch.Tensor:
    """``LAYER_STATS`` of one activation as a float32 vector on ``a``'s device."""
    x = a.detach().float()
    if x.numel() == 0:
        return torch.full((len(LAYER_STATS),), float("nan"), device=a.device)
    std, mean = torch.std_mean(x, correction=0) if x.numel() > 1 else (x.new_zeros(()), x.mean())
    max_abs = x.abs().amax()
    zero_frac = (x == 0).sum(dtype=torch.float32) / x.numel()
    return torch.stack((mean, std, max_abs, zero_frac))


def first_tensor(out: object) -> torch.Tensor | None:
    """The activation to measure from a module's output (tensor, tuple/list or dict)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    if isinstance(out, dict):
        for o in out.values():
            if isinstance(o, torch.Tensor):
                return o
    return None


@torch.no_grad()
def global_grad_norm(params: list[torch.Tensor]) -> torch.Tensor | None:
    """L2 norm over every gradient, batched with ``_foreach_norm`` (no per-tensor sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads)
    dev = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(dev) for n in norms]).float())
