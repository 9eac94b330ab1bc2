"""learning_curve.png: what it is drawn from, and how its loss axis reads."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from ilstudio.training import curve  # noqa: E402

# As the Trainer logs: a loss record every 100 steps, rollouts at 100 and 300, the final summary.
HISTORY = [
    {"loss": 0.731, "step": 100}, {"eval_sim_success_rate": 0.25, "step": 100},
    {"loss": 0.7125, "step": 200},
    {"loss": 0.704, "step": 300}, {"eval_sim_success_rate": 0.5, "step": 300},
    {"train_loss": 0.71, "train_runtime": 1.0, "step": 300},
]


def test_the_png_carries_every_point_it_draws_the_last_loss_included():
    data = curve.read_data(curve.render(HISTORY, "t"))
    assert data == curve.curve_data(HISTORY)
    assert data["loss"] == [[100, 0.731], [200, 0.7125], [300, 0.704]]
    assert data[curve.SUCCESS_KEY] == [[100, 0.25], [300, 0.5]]


def test_loss_ticks_are_plain_numbers():
    fig = curve.figure(HISTORY)
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t.get_text() for t in [*ax.get_yticklabels(), *ax.get_yticklabels(minor=True)]]
    shown = [lab for lab in labels if lab]
    assert shown, labels  # a narrow loss range still gets labelled ticks
    assert all(float(lab) > 0 for lab in shown), shown  # "0.7", not "$7\\times10^{-1}$"
