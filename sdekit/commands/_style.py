"""Line styles for plots with many series: every series gets its own (colour, marker, line style), so no two share
a look however many there are, and a series drawn exactly over another still shows (hollow, larger markers on
alternate series)."""
from __future__ import annotations

__all__ = ["series_styles", "log_limits"]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
_DASHES = ("-", "--", "-.", ":")


def series_styles(n: int) -> list[dict]:
    """n keyword dicts for Axes.plot: colour from tab10 (tab20 beyond 10 series), a marker per series, and a line
    style that changes each time the colours wrap; odd series have hollow markers, drawn larger."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    k = cmap.N
    out = []
    for i in range(n):
        style = dict(color=cmap(i % k), marker=_MARKERS[i % len(_MARKERS)], ls=_DASHES[(i // k) % len(_DASHES)],
                     ms=4, lw=1.2)
        if i % 2:
            style.update(mfc="none", ms=7, mew=1.2)
        out.append(style)
    return out


def log_limits(values, pad: float = 2.0) -> tuple[float, float]:
    """Limits of a log axis that include every finite positive value, with a factor `pad` of room on each side."""
    vals = [float(v) for v in values if v is not None and v == v and 0 < float(v) < float("inf")]
    if not vals:
        return 0.1, 10.0
    return min(vals) / pad, max(vals) * pad
