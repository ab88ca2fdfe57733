"""Report steps run eagerly under ``torch.compile``; every other step runs the user's graph.

The layer hooks are traced into a compiled model. Outside report windows they read one
flag and return, so the graph dynamo builds is the graph without neurotop, guarded on that
flag. Inside a window the statistics need the layer outputs as eager tensors (their
backward hooks, the autograd graph of functional activations): traced, every measured layer
would break the graph, and those broken graphs would then serve the plain steps too
(a graph break drops the guards taken before it). So a window sets dynamo's stance to
``force_eager`` for its one step and restores the stance the script had: report steps
compile nothing and cost an eager step, plain steps run the graph without neurotop. The
stance is process-wide: other compiled functions run eagerly on report steps too.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("neurotop.agent")


class EagerReports:
    """The dynamo stance while a report window is open (training thread only)."""

    def __init__(self) -> None:
        self._stance: Any = None  # the ``set_stance`` in effect for the open window
        self._warned = False

    def window(self, active: bool) -> None:
        """A window opens (``active``) or closes; idempotent."""
        if active and self._stance is None:
            self._enter()
        elif not active and self._stance is not None:
            stance, self._stance = self._stance, None
            try:
                stance.__exit__(None, None, None)  # the stance the script had
            except RuntimeError as e:
                self._warn(e)

    def _enter(self) -> None:
        try:
            self._stance = torch.compiler.set_stance("force_eager")
        except RuntimeError as e:  # the step boundary itself is being compiled
            self._warn(e)

    def _warn(self, e: RuntimeError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("neurotop: cannot run report steps eagerly (%s); under torch.compile"
                        " they break the graph at each measured layer", e)
