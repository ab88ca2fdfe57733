"""One flat float32 buffer per report, so that a report costs exactly one device-to-host copy.

The training thread concatenates the report's named device tensors (``pack``) and starts
the copy; the agent thread splits the host buffer by the recorded layout (``finalize.unpack``).
"""

from __future__ import annotations

import torch

from neurotop.service.finalize import Layout
from neurotop.training.stats import float32_on


def pack(parts: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, Layout]:
    layout = [(k, tuple(t.shape)) for k, t in parts.items()]
    flat = [float32_on(t.view(-1) if t.is_contiguous() else t.reshape(-1), device)
            for t in parts.values()]
    buf = torch.cat(flat) if flat else torch.empty(0, device=device)
    return buf, layout


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Start the report's one device-to-host copy without waiting for it."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
