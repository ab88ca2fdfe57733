"""neurotop's in-training agent.

``agent.watch`` imports torch on first use only: the UI imports ``agent.wire`` and
``agent.connfile`` without pulling PyTorch in.
"""

from typing import Any

__all__ = ["watch", "Monitor", "StopTraining", "Config", "AlertRules"]


def __getattr__(name: str) -> Any:
    if name == "StopTraining":  # torch-free
        from agent.control import StopTraining

        return StopTraining
    if name == "Config":  # plain data, torch-free
        from agent.config import Config

        return Config
    if name == "AlertRules":  # plain data, torch-free
        from agent.detectors import AlertRules

        return AlertRules
    if name in __all__:
        from agent import monitor

        return getattr(monitor, name)
    raise AttributeError(f"module 'agent' has no attribute {name!r}")
