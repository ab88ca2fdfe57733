"""The rank's host and GPU metrics (README "System metrics") as a person reads them: the
status bar's part (``status_part``: GPU utilisation and memory, or CPU and RSS with no GPU)
and the overview's panel (``SystemPanel``: one row per GPU, then the host). Both draw from
the run state the latest heartbeat filled (in replay, the heartbeat at the cursor) and show
nothing for an agent that sends no metrics (one older than them)."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static

from neurotop.tui.data.frame import Frame
from neurotop.tui.data.store import RunState

GIB = 2**30


def has_metrics(s: RunState) -> bool:
    """Whether the run's agent sends system metrics: it always lists GPUs or says why not."""
    return bool(s.gpus or s.no_gpu)


def gib(b: float | None) -> str:
    """Bytes in GiB with the digits that matter: ``0.4``, ``2.3``, ``61``; ``-`` unknown."""
    if b is None:
        return "-"
    g = b / GIB
    return f"{g:.1f}" if g < 10 else f"{g:.0f}"


def size(b: float | None, unit: str = "") -> str:
    """A process's memory: ``312M`` under a GiB, else ``2.3G``; ``unit="iB"`` spells it
    ``312 MiB``."""
    if b is None:
        return "-"
    n, prefix = (f"{b / 2**20:.0f}", "M") if b < GIB else (gib(b), "G")
    return f"{n} {prefix}{unit}" if unit else f"{n}{prefix}"


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def _summed(gpus: tuple[dict[str, Any], ...], key: str) -> float | None:
    """``key`` summed over the GPUs; None if one does not report it (a part sum would lie)."""
    values = [g[key] for g in gpus]
    return None if any(v is None for v in values) else sum(values)


def status_part(s: RunState) -> Text | None:
    """``GPU 87% 61/80G`` (several GPUs: their count, the highest utilisation, the summed
    memory), or without a GPU ``CPU 97% RSS 2.3G no GPU``; None when no metrics came."""
    if s.gpus:
        utils = [g["util"] for g in s.gpus if g["util"] is not None]
        used, total = _summed(s.gpus, "mem_used"), _summed(s.gpus, "mem_total")
        mem = f" {gib(used)}/{gib(total)}G" if used is not None and total is not None else ""
        util = pct(max(utils) if utils else None)
        head = "GPU" if len(s.gpus) == 1 else f"{len(s.gpus)} GPUs max"
        return Text(f"{head} {util}{mem}")
    if s.no_gpu:
        return Text.assemble(f"CPU {pct(s.cpu_pct)} RSS {size(s.rss)} ", ("no GPU", "dim"))
    return None


def gpu_row(g: dict[str, Any], name_w: int, bar_w: int, bar_style: str) -> Text:
    """``GPU0 NVIDIA H200  ███████░░░  87%  61.2/80.0 GiB  350 W  62 °C``."""
    util = g["util"]
    filled = 0 if util is None else round(min(max(util, 0.0), 100.0) / 100 * bar_w)
    name = g["name"] if len(g["name"]) <= name_w else g["name"][: name_w - 1] + "…"
    used, total = g["mem_used"], g["mem_total"]
    mem = f"{used / GIB:.1f}/{total / GIB:.1f} GiB" if used is not None \
        and total is not None else "-"
    power = "-" if g["power_w"] is None else f"{g['power_w']:.0f} W"
    temp = "-" if g["temp_c"] is None else f"{g['temp_c']:.0f} °C"
    return Text.assemble((f"GPU{g['index']:<2} ", "bold"), f"{name:<{name_w}}  ",
                         ("█" * filled, bar_style), ("░" * (bar_w - filled), "dim"),
                         f" {pct(util):>4}  {mem:>15}  {power:>6}  {temp:>6}")


def host_row(s: RunState) -> Text:
    """The training process's CPU (of 100 x the host's CPUs, as ``top`` counts) and
    resident memory; the whole host's CPU and the memory it has available."""
    of = f" of {s.cpus * 100:.0f}%" if s.cpus else ""
    mem = f"{gib(s.mem_available)}/{gib(s.mem_total)} GiB" if s.mem_total is not None else "-"
    return Text.assemble(("process  ", "bold"), f"CPU {pct(s.cpu_pct)}{of}  ",
                         f"RSS {size(s.rss, 'iB')}    ", ("host  ", "bold"),
                         f"CPU {pct(s.host_cpu_pct)}  available {mem}")


class SystemPanel(Static):
    """The overview's system metrics, under the heat strip and the alerts; only where the
    screen has lines to spare for it (the status bar says the gist at any size)."""

    DEFAULT_CSS = """
    SystemPanel { height: auto; max-height: 12; border-top: solid $accent; padding: 0 1;
                  display: none; }
    """
    #: The smallest screen (columns, lines) that shows it: at 80x24 the plots need the lines.
    MIN_SIZE = (80, 30)
    MAX_GPUS = 8  # rows; the rest are counted (the status bar sums them all)
    FIXED_W = 46  # a GPU row's cells besides its name and its bar
    BAR_W = 20

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.text = ""  # what it shows, as plain text (for tests and screen readers)
        self._shown: Text | None = None

    def draw(self, frame: Frame) -> None:
        s = frame.status
        width, height = self.app.size
        self.display = has_metrics(s) and width >= self.MIN_SIZE[0] \
            and height >= self.MIN_SIZE[1]
        if not self.display:
            return
        text = self.system_text(s, self.size.width or width - 2)  # inside the padding
        if text != self._shown:  # a heartbeat twice a second; frames come more often
            self._shown, self.text = text, text.plain
            self.update(text)

    def system_text(self, s: RunState, width: int) -> Text:
        lines = [Text("system", style="bold")]
        if s.gpus:
            shown = s.gpus[: self.MAX_GPUS]
            longest = max(len(g["name"]) for g in shown)
            name_w = max(min(longest, width - self.FIXED_W - 10), 8)
            bar_w = min(max(width - self.FIXED_W - name_w, 5), self.BAR_W)
            style = self.app.current_theme.primary or "bold"
            lines += [gpu_row(g, name_w, bar_w, style) for g in shown]
            if len(s.gpus) > len(shown):
                lines.append(Text(f"+{len(s.gpus) - len(shown)} more GPUs", style="dim"))
        else:
            lines.append(Text(f"no GPU: {s.no_gpu}", style="italic"))
        lines.append(host_row(s))
        return Text("\n", no_wrap=True, overflow="ellipsis").join(lines)
