"""``learning_curve.png``: training loss and simulated success rate against optimizer steps.

Drawn from the Trainer's ``log_history`` (the records ``trainer_state.json`` keeps, so a
resumed run draws its whole history), with matplotlib's non-interactive Agg backend,
imported only here: training without the curve never pays for matplotlib.

The points drawn are also stored in the PNG itself (text chunk ``DATA_KEY``, JSON: series name
-> [[step, value], ...]; ``read_data`` reads them back), so what a curve shows can be checked
without reading pixels. Loss ticks are plain numbers (``0.7``, ``0.0125``), not matplotlib's
log-axis ``7×10⁻¹`` labels.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

SUCCESS_KEY = "eval_sim_success_rate"
RETURN_KEY = "eval_sim_mean_return"
LOSS_KEYS = ("loss", "eval_loss")
DATA_KEY = "ilstudio:curve"


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every record that has ``key``, in step order (last value per step)."""
    points = {}
    for rec in log_history:
        if key in rec and "step" in rec:
            points[int(rec["step"])] = float(rec[key])
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def curve_data(log_history: list[dict]) -> dict[str, list[list[float]]]:
    """Every series the curve draws: name -> [[step, value], ...] (absent series left out)."""
    extra = sorted({k for rec in log_history for k in rec if "sensitivity" in k})
    data = {}
    for key in (*LOSS_KEYS, SUCCESS_KEY, *extra):
        steps, values = series(log_history, key)
        if steps:
            data[key] = [[s, v] for s, v in zip(steps, values, strict=True)]
    return data


def render(log_history: list[dict], title: str = "") -> bytes | None:
    """The curve as PNG bytes (with ``curve_data`` in its ``DATA_KEY`` text chunk); None when
    matplotlib is not installed."""
    fig = figure(log_history, title)
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={DATA_KEY: json.dumps(curve_data(log_history))})
    return buf.getvalue()


def figure(log_history: list[dict], title: str = ""):
    """The matplotlib Figure of the curve; None when matplotlib is not installed.

    Left axis: training loss (log scale) and held-out loss when logged; right axis: success
    rate in the simulator (0..1). Any logged ``*sensitivity*`` series (how much the
    prediction depends on the image) gets its own panel below, so it can be read beside the loss.
    """
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    data = curve_data(log_history)
    extra = [k for k in data if "sensitivity" in k]
    fig = Figure(figsize=(7, 4.2 + 1.8 * bool(extra)), dpi=100)
    axes = fig.subplots(2 if extra else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    for key, style in zip(LOSS_KEYS, ("-", "--"), strict=True):
        if key in data:
            ax.plot(*zip(*data[key], strict=True), style, color="tab:blue", label=key.replace("_", " "))
    if any(v > 0 for _, v in data.get("loss", [])):
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    if SUCCESS_KEY in data:
        _draw_success(ax, data[SUCCESS_KEY])
    ax.legend(loc="upper left", fontsize=8)
    for key in extra:
        axes[1].plot(*zip(*data[key], strict=True), ".-", label=key)
    if extra:
        axes[1].set_ylabel("sensitivity")
        axes[1].legend(fontsize=8)
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def _draw_success(ax, points: list[list[float]]) -> None:
    """Success rate on a right-hand axis, its best value annotated."""
    steps, success = zip(*points, strict=True)
    right = ax.twinx()
    right.plot(steps, success, "o-", color="tab:green", label="success rate (sim)")
    right.set_ylim(-0.03, 1.03)
    right.set_ylabel("success rate", color="tab:green")
    best = max(range(len(success)), key=lambda i: success[i])
    right.annotate(f"{success[best]:.0%}", (steps[best], success[best]),
                   textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    right.legend(loc="upper right", fontsize=8)


def _plain_log_ticks(axis) -> None:
    """Keep matplotlib's choice of which log ticks get a label, but write them as plain
    numbers (0.7, 0.05) instead of its scientific notation (7.125×10⁻¹)."""
    from matplotlib.ticker import LogFormatterSciNotation

    class Plain(LogFormatterSciNotation):
        def __call__(self, x, pos=None) -> str:
            return f"{x:.4g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(Plain())
    axis.set_minor_formatter(Plain(labelOnlyBase=False))


def read_data(png: bytes) -> dict[str, list[list[float]]]:
    """The ``curve_data`` a learning_curve.png was drawn from (its ``DATA_KEY`` text chunk)."""
    pos = 8  # after the PNG signature: chunks of length, type, data, CRC
    while pos + 8 <= len(png):
        size = int.from_bytes(png[pos:pos + 4], "big")
        kind, body = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + size]
        if kind == b"tEXt" and body.startswith(DATA_KEY.encode() + b"\0"):
            return json.loads(body[len(DATA_KEY) + 1:].decode("latin-1"))
        pos += 12 + size
    raise ValueError(f"no {DATA_KEY} data in this PNG")


def write(run_dir: Path, log_history: list[dict], title: str = "") -> Path | None:
    """Write ``run_dir/learning_curve.png`` atomically; None (and nothing written) without
    matplotlib."""
    from ilstudio import rundir

    png = render(log_history, title)
    if png is None:
        return None
    path = Path(run_dir) / rundir.LEARNING_CURVE
    rundir.write_atomic(path, png)
    return path
