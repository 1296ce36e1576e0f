"""Small figure helpers the notebooks share."""

from __future__ import annotations


def plain_log_axis(ax, fmt: str = "{:g}", axis: str = "y") -> None:
    """A log axis with plain tick labels (20, 50, x1.5) instead of powers of ten (matplotlib's "2x10^0")."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    a = ax.yaxis if axis == "y" else ax.xaxis
    a.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    a.set_major_formatter(FuncFormatter(lambda v, _: fmt.format(v)))
    a.set_minor_formatter(FuncFormatter(lambda v, _: ""))
