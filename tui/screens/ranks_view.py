"""The all-ranks view (``R`` in a distributed job): the chosen statistic of every layer
across ranks (min / median / max, and the rank holding each extreme) and a ranks x time
heat strip of step time. It draws from the app's ``Ranks`` (``tui/data/ranks.py``), which
copies each rank's data under that rank's lock."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical

from neurotop.tui.data.frame import Frame, Wants
from neurotop.tui.data.ranks import READY_SCALAR
from neurotop.tui.data.view import View
from neurotop.tui.screens.dashboard import Panel
from neurotop.tui.screens.plotting import heat_strip, shade_legend, value_scale, window
from neurotop.tui.screens.widgets import fmt, level_styles

if TYPE_CHECKING:
    from neurotop.tui.data.ranks import Ranks, Spread, StepTimes

NUM_W = 10  # a number's column: ``fmt`` writes at most 9 characters (``-1.23e-04``)
RANK_W = 6  # `` r1023``


def spread_table(sp: Spread, width: int, height: int, styles: tuple[str, str, str]) -> Text:
    """One line per layer: min and its rank, median, max and its rank, max - min. The rank
    furthest from the median is bold. With more layers than lines, the widest relative
    spread first, and ``+N more layers`` says how many are left out."""
    name_w = max(min(max((len(n) for n in sp.layers), default=5), 28),
                 min(12, width - 5 * NUM_W - 2 * RANK_W), 5)
    name_w = min(name_w, max(width - 4 * NUM_W - 2 * RANK_W - 1, 5))
    head = Text.assemble(("layer".ljust(name_w), "bold"), (f"{'min':>{NUM_W}}", "bold"),
                         (f"{'rank':>{RANK_W}}", "bold"), (f"{'median':>{NUM_W}}", "bold"),
                         (f"{'max':>{NUM_W}}", "bold"), (f"{'rank':>{RANK_W}}", "bold"),
                         (f"{'max-min':>{NUM_W}}", "bold"), no_wrap=True, overflow="crop")
    n = len(sp.layers)
    shown = height - 1 if n <= height - 1 else max(height - 2, 1)
    order = np.arange(n)
    if n > shown:
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = (sp.hi - sp.lo) / np.maximum(np.abs(sp.median), 1e-12)
        order = np.argsort(-np.nan_to_num(rel, nan=-1.0), kind="stable")
    far = sp.extreme_rank()
    out = [head]
    for i in order[:shown]:
        bad = not np.isfinite(sp.values[:, i]).all() and not np.isnan(sp.values[:, i]).all()
        lo_style = "bold" if far[i] == sp.lo_rank[i] and sp.lo_rank[i] >= 0 else "dim"
        hi_style = "bold" if far[i] == sp.hi_rank[i] and sp.hi_rank[i] >= 0 else "dim"
        line = Text.assemble(
            (sp.layers[i][-name_w:].ljust(name_w), styles[2] if bad else ""),
            f"{fmt(float(sp.lo[i])):>{NUM_W}}",
            (f"{rank_name(int(sp.lo_rank[i])):>{RANK_W}}", lo_style),
            f"{fmt(float(sp.median[i])):>{NUM_W}}",
            f"{fmt(float(sp.hi[i])):>{NUM_W}}",
            (f"{rank_name(int(sp.hi_rank[i])):>{RANK_W}}", hi_style),
            f"{fmt(float(sp.hi[i] - sp.lo[i])):>{NUM_W}}", no_wrap=True, overflow="crop")
        out.append(line)
    if n > shown:
        out.append(Text(f"+{n - shown} more layers (shown: widest spread across ranks first)",
                        style="dim", no_wrap=True, overflow="crop"))
    return Text("\n").join(out)


def rank_name(rank: int) -> str:
    return f"r{rank}" if rank >= 0 else "-"


def step_time_strip(st: StepTimes, width: int, height: int, view: View,
                    warn_style: str = "bold") -> Text:
    """Ranks x time of step time: one line per rank (or group of ranks, each showing its
    slowest, when there are more ranks than lines), its median over the window after its
    name; the time axis under it. A job's ranks report their ready time (``ready_ms``):
    the strip says so, and names the rank whose median stands out (``StepTimes.longest``),
    in ``warn_style``."""
    head = Text.assemble(("step time per rank", "bold"), (" (ms)", "dim"), no_wrap=True,
                         overflow="crop")
    x, ms = st.steps, st.ms
    if ms.size:
        x, ms_t = window(x, view.last, ms.T)
        ms = ms_t.T
    if st.source == READY_SCALAR:  # under DDP the step times are equal: this is what differs
        head = Text("ready ms", style="bold", no_wrap=True, overflow="crop")
        slow = st.longest(ms) if ms.size else None
        if slow is not None:  # first: the explanation is cropped before it on a narrow pane
            head.append(f"  longest: {rank_name(slow[0])} ({slow[1]:.1f}x the others')",
                        style=warn_style)
        head.append(" · " if slow is not None else ": ", style="dim")
        head.append("time before each forward; a straggler's is longer", style="dim")
    if not ms.size or not np.isfinite(ms).any():
        head.append("  none reported yet", style="dim")
        return head
    lines = max(height - 2, 1)
    ranks = list(st.ranks)
    data = ms
    with np.errstate(invalid="ignore"):
        typical = np.array([np.nanmedian(r) if np.isfinite(r).any() else np.nan for r in data])
    names = [rank_name(r) for r in ranks]
    if len(ranks) > lines:  # groups of ranks, each its slowest member's line
        starts = (np.arange(lines) * len(ranks)) // lines
        with np.errstate(invalid="ignore"):
            data = np.fmax.reduceat(data, starts, axis=0)
            typical = np.fmax.reduceat(typical, starts)
        ends = [*starts[1:], len(ranks)]
        names = [rank_name(ranks[a]) if b - a == 1 else f"r{ranks[a]}-{ranks[b - 1]}"
                 for a, b in zip(starts, ends, strict=True)]
    label_w = max(len(n) for n in names) + 1
    num_w = 8
    strip_w = max(width - label_w - num_w - 1, 4)
    scale = value_scale("", data)
    part = f"  {shade_legend(*scale)}"
    if head.cell_len + len(part) <= width:
        head.append(part, style="dim")
    rows = heat_strip(data, strip_w, scale=scale, nan_is_idle=True)  # NaN: no figure yet
    out = [head]
    for name, med, row in zip(names, typical, rows, strict=True):
        out.append(Text.assemble((name.ljust(label_w), "dim"), f"{fmt_ms(med):>{num_w}} ",
                                 row, no_wrap=True, overflow="crop"))
    cols = min(strip_w, data.shape[1])
    left, right = f"step {int(x[0]):,}", f"{int(x[-1]):,}"
    out.append(Text(" " * (label_w + num_w + 1) + left + right.rjust(max(cols - len(left), 1)),
                    style="dim", no_wrap=True, overflow="crop"))
    return Text("\n").join(out)


def fmt_ms(v: float) -> str:
    if not np.isfinite(v):
        return "-"
    return f"{v:.3g}"


class RanksPane(Vertical):
    """The all-ranks view: the spread table over the step-time heat strip."""

    DEFAULT_CSS = """
    RanksPane > #ranks-title { height: 1; background: $boost; padding: 0 1; }
    RanksPane > #ranks-table { height: 1fr; }
    RanksPane > #ranks-heat { height: 7; border-top: solid $accent; }
    """

    def compose(self) -> ComposeResult:
        yield Panel(id="ranks-title")
        yield Panel(id="ranks-table")
        yield Panel(id="ranks-heat")

    def wants(self, view: View) -> Wants:
        return Wants()  # the header: the rest comes from every rank's store

    def draw(self, frame: Frame, view: View) -> None:
        ranks: Ranks | None = getattr(self.app, "ranks", None)
        title, table = self.query_one("#ranks-title", Panel), self.query_one("#ranks-table", Panel)
        heat = self.query_one("#ranks-heat", Panel)
        if ranks is None or not ranks.is_job:
            title.show(Text("all ranks: not a distributed job", style="bold"))
            table.show("")
            heat.show("")
            return
        stat = view.stat or (frame.schema.stat_or_default("") if frame.schema else "")
        sp = ranks.spread(stat) if stat else None
        st = ranks.step_times()
        # The heat strip: a line per rank (with its title, axis and border), in what the
        # table leaves, a third of the pane at least (ranks beyond are grouped).
        pane_h = self.size.height or 20
        table_need = (len(sp.layers) if sp is not None else 1) + 2
        want = min(len(st.ranks) + 3, max(pane_h - 1 - table_need, pane_h // 3, 5))
        if heat.styles.height is None or heat.styles.height.value != want:
            heat.styles.height = want
        width = max(self.size.width or 80, 20)
        seen = len(sp.ranks) if sp is not None else len(ranks.stores)
        where = ""
        if sp is not None and len(sp.steps):
            lo, hi = int(sp.steps.min()), int(sp.steps.max())
            where = f"  ·  step {hi:,}" if lo == hi else f"  ·  steps {lo:,}…{hi:,}"
        quiet = ranks.silent()  # a rank that died or hangs stops sending
        title.show(Text.assemble(
            ("all ranks", "bold"), f"  ·  {stat or '-'}  ·  {ranks.describe()}",
            f" ({seen} reporting)" if seen != ranks.world_size else "", where,
            (f"  ·  silent: {', '.join(map(rank_name, quiet))}" if quiet else "",
             level_styles(self)[2]),
            "  ·  s: statistic  R: back", no_wrap=True, overflow="ellipsis"))
        if sp is None:
            table.show(Text("no report of this statistic from any rank yet", style="dim"))
        else:
            table.show(spread_table(sp, width, max(table.size.height or 10, 2),
                                    level_styles(self)))
        heat.show(step_time_strip(st, width, max(want - 1, 2), view, level_styles(self)[1]))
