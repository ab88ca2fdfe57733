"""Which layer types are activation functions, shared by the detectors (agent thread) and
the UI's health colours. Only there does "a unit that is never positive" mean a dead unit:
a logits layer or a LayerNorm with most outputs negative is healthy. Imports nothing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

#: Activation modules (``torch.nn`` class names) whose dead fraction means something.
ACTIVATION_TYPES: tuple[str, ...] = (
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "SiLU",
    "Mish", "Softplus", "Hardswish", "Threshold")


#: Custom activation classes, by name (case-insensitive): one of these function names at
#: the end, optionally followed by ``Squared`` and ``Activation``/``Act`` (``NewGELU``,
#: ``QuickGELU``, ``GELUActivation``, ``ReLUSquaredActivation``, ``Swish``).
ACTIVATION_NAME = re.compile(
    r"(relu|gelu|silu|swish|mish|elu|softplus|hardswish)\d*(squared)?(activation|act)?$",
    re.IGNORECASE)


def is_activation(layer_type: str, activation: str = "",
                  types: Sequence[str] = ACTIVATION_TYPES) -> bool:
    """An activation layer: its class is in ``types`` or named like one
    (``ACTIVATION_NAME``), or the autograd graph showed it computes one or feeds a
    functional one (``activation``: the schema's ``activations`` entry, ``"F.relu"``)."""
    return bool(activation) or layer_type in types or _named_like_activation(layer_type)


@functools.lru_cache(maxsize=64)
def activation_flags(layer_types: tuple[str, ...], activations: tuple[str, ...],
                     types: tuple[str, ...] = ACTIVATION_TYPES) -> tuple[bool, ...]:
    """``is_activation`` of each ``(layer_types[i], activations[i])`` pair (as many as the
    shorter has), kept per schema: the detectors ask at every report, the UI every frame."""
    return tuple(is_activation(t, a, types) for t, a in zip(layer_types, activations, strict=False))


@functools.lru_cache(maxsize=1024)
def _named_like_activation(layer_type: str) -> bool:
    """``ACTIVATION_NAME`` matches: the detectors ask per layer at every report, and the
    search cost more than the rest of the test."""
    return bool(ACTIVATION_NAME.search(layer_type))


def activation_mask(layer_types: Sequence[str], layers: int,
                    types: Sequence[str] = ACTIVATION_TYPES,
                    activations: Sequence[str] = ()) -> list[bool]:
    """Per layer: is it an activation (``is_activation``)? An older schema without
    ``layer_types`` (or one that does not match the layers) says nothing, so every layer
    counts. ``activations``: the schema's list, when it has one."""
    if len(layer_types) != layers:
        return [True] * layers
    acts = tuple(activations) if len(activations) == layers else ("",) * layers
    return list(activation_flags(tuple(layer_types), acts, tuple(types)))
