"""``learning_curve.png``: training loss and simulated success rate against optimizer steps.

Drawn from the Trainer's ``log_history`` (the records ``trainer_state.json`` keeps, so a
resumed run draws its whole history), with matplotlib's non-interactive Agg backend,
imported only here: training without the curve never pays for matplotlib.
"""

from __future__ import annotations

import io
from pathlib import Path

SUCCESS_KEY = "eval_sim_success_rate"
RETURN_KEY = "eval_sim_mean_return"


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every record that has ``key``, in step order (last value per step)."""
    points = {}
    for rec in log_history:
        if key in rec and "step" in rec:
            points[int(rec["step"])] = float(rec[key])
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def render(log_history: list[dict], title: str = "") -> bytes | None:
    """The curve as PNG bytes; None when matplotlib is not installed.

    Left axis: training loss (log scale) and held-out loss when logged; right axis: success
    rate in the simulator (0..1) with the episodes' mean return in the legend label.
    Any logged ``*sensitivity*`` series (how much the prediction depends on the image) gets
    its own panel below, so it can be read beside the loss.
    """
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    extra = sorted({k for rec in log_history for k in rec if "sensitivity" in k})
    fig = Figure(figsize=(7, 4.2 + 1.8 * bool(extra)), dpi=100)
    axes = fig.subplots(2 if extra else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    for key, style in (("loss", "-"), ("eval_loss", "--")):
        steps, values = series(log_history, key)
        if steps:
            ax.plot(steps, values, style, color="tab:blue", label=key.replace("_", " "))
    if any(v > 0 for _, values in [series(log_history, "loss")] for v in values):
        ax.set_yscale("log")
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    steps, success = series(log_history, SUCCESS_KEY)
    if steps:
        right = ax.twinx()
        right.plot(steps, success, "o-", color="tab:green", label="success rate (sim)")
        right.set_ylim(-0.03, 1.03)
        right.set_ylabel("success rate", color="tab:green")
        best = max(range(len(success)), key=lambda i: success[i])
        right.annotate(f"{success[best]:.0%}", (steps[best], success[best]),
                       textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        right.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    for key in extra:
        s, v = series(log_history, key)
        axes[1].plot(s, v, ".-", label=key)
    if extra:
        axes[1].set_ylabel("sensitivity")
        axes[1].legend(fontsize=8)
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


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
