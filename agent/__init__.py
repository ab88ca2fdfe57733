"""neurotop: ``top`` for neural-network training.

``mon = neurotop.watch(model, optimizer)`` embeds the agent in a training script. The
names below are imported on first use: ``import neurotop`` (and the UI, which imports
``neurotop.protocol``) does not pull PyTorch in; only ``watch`` and ``Monitor`` do.
The source folders map to the package as ``agent/`` -> ``neurotop`` and ``tui/`` ->
``neurotop.tui`` (see ``docs/architecture.md``).
"""

from typing import Any

__all__ = ["watch", "Monitor", "StopTraining", "Config", "AlertRules"]


def __getattr__(name: str) -> Any:
    if name == "StopTraining":  # torch-free
        from neurotop.service.controller import StopTraining

        return StopTraining
    if name == "Config":  # plain data, torch-free
        from neurotop.config import Config

        return Config
    if name == "AlertRules":  # plain data, torch-free
        from neurotop.service.detectors import AlertRules

        return AlertRules
    if name in ("watch", "Monitor"):
        from neurotop import monitor

        return getattr(monitor, name)
    raise AttributeError(f"module 'neurotop' has no attribute {name!r}")
