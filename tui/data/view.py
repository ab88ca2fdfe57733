"""What the user chose to look at: one ``View`` the app owns and every screen reads."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

#: Steps the "window" toggle keeps (the other choice is the whole run).
WINDOW_STEPS = 1000


@dataclass
class View:
    """Log scale, smoothing, window, the chosen statistic, sort, filter, detail layer."""

    log_y: bool = False
    smooth: bool = True
    last: int | None = None  # window: the last N steps, or None for the whole run
    stat: str = ""  # the statistic of the heat strip and of the layers' trend column
    sort: str = ""  # a column of the layers table ("" keeps the model's order)
    descending: bool = True
    filter: str = ""  # a name glob (a plain word matches anywhere in the name)
    layer: str = ""  # the layer the detail screen shows

    def describe(self) -> str:
        return (f"{'log' if self.log_y else 'linear'} · "
                f"{'smoothed' if self.smooth else 'raw'} · "
                f"{'last ' + format(self.last, ',') if self.last else 'all'} steps")


def matches(name: str, pattern: str) -> bool:
    """Whether a layer name passes the filter: a glob, or a plain word found anywhere."""
    if not pattern:
        return True
    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    return fnmatch.fnmatchcase(name, glob)
