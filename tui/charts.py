"""``neurotop plot``'s charts as text, drawn with plotext for stdout (CI logs, ``watch -n``,
a plain SSH session). The live screens keep their own braille renderer
(``tui/screens/plotting.py``): plotext takes milliseconds per plot, fine once, too slow for
a dozen plots redrawn at 5 Hz."""

from __future__ import annotations

import numpy as np
import plotext as plt

from neurotop.tui.data.plots import Chart

#: Without colour, lines are told apart by their marker (the legend shows it).
MARKERS = ("•", "+", "x", "o", "*", "#", "@", "%", "=", "~")
X_TICKS = 5


def render(chart: Chart, width: int, height: int, color: bool) -> str:
    """``chart`` as ``height`` lines of ``width`` columns; ANSI colours only if ``color``."""
    plt.clear_figure()
    plt.limit_size(False, False)  # the size asked for, not the terminal's (or 80x24 in a pipe)
    plt.plot_size(width, height)
    plt.theme("clear")  # the terminal's own background and foreground
    several = len(chart.lines) > 1
    for i, line in enumerate(chart.lines):
        marker = MARKERS[i % len(MARKERS)] if several and not color else "braille"
        plt.plot(line.steps.tolist(), line.values.tolist(), marker=marker,
                 label=line.label if several else None)
    lo = min(int(line.steps[0]) for line in chart.lines)
    hi = max(int(line.steps[-1]) for line in chart.lines)
    plt.xticks(sorted({round(x) for x in np.linspace(lo, hi, X_TICKS)}))  # steps: integers
    note = f" ({chart.left_out} non-finite values not drawn)" if chart.left_out else ""
    plt.title(chart.title + note)
    plt.xlabel("step")
    out = plt.build()
    return out if color else plt.uncolorize(out)
