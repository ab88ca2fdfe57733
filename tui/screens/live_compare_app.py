"""``neurotop attach --compare``: the live app with recorded runs overlaid on its plots.

``NeurotopApp`` reading a ``LiveComparison`` in place of the live store (as ``ReplayApp``
reads a ``Comparison``): the same screens, control and redraw timer; the live run stays
the selected one (its header, its layers, its control), so there is no run to switch to.
"""

from __future__ import annotations

from collections.abc import Sequence

from neurotop.tui.data.client import LiveClient
from neurotop.tui.data.live_compare import LiveComparison
from neurotop.tui.data.replay_source import ReplaySource
from neurotop.tui.screens.app import NeurotopApp


class LiveCompareApp(NeurotopApp):
    """The live screens over a ``LiveComparison``."""

    def __init__(self, client: LiveClient, recorded: Sequence[ReplaySource], *,
                 read_only: bool = False) -> None:
        """``recorded``: loaded (``ReplaySource.load``); the first is the reference."""
        super().__init__(client, read_only=read_only)
        # Over what the live app reads: the client's store, or a job's ranks.
        self.compare = compare = LiveComparison(self.store, recorded)
        self.store = compare  # type: ignore[assignment]  # a store's reading face
        self.frame = compare.frame()

    def on_mount(self) -> None:
        super().on_mount()
        names = ", ".join(r.name for r in self.compare.recorded)
        self.notify(f"overlaid: {names}; Δ from {self.compare.recorded[0].name}", timeout=4,
                    markup=False)
        for r in self.compare.recorded:
            for problem in r.source.problems[:3]:
                self.notify(f"{r.source.path}: {problem}", title="damaged session file",
                            severity="warning", timeout=10, markup=False)
