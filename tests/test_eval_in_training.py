"""The in-training evaluation (ilstudio/training/sim_eval.py), tested by what it does.

Real MuJoCo rollouts of real (randomly initialized, tiny) policies built from resolved
gin configs, on 12-step episodes at 36x48: whether TinyACT and ACT are really ensembled
(queried every step, executing the blend), whether the global random generators are the
same after an evaluation that draws from them, and how best/ is kept on a tie and after a
resume. The trainer is a small stand-in with the two methods the callback calls (``log``,
``save_model``); everything else is the callback's own code.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_simulator

needs_simulator()

import torch  # noqa: E402

TASK = "sim_transfer_cube_scripted"
STEPS, CHUNK = 12, 5
SHORT = ["sim.render_height = 36", "sim.render_width = 48", f"task.episode_len = {STEPS}",
         f"model.chunk_size = {CHUNK}"]
POLICIES = {
    "tinyact": ["gin_configs/tinyact.gin", "tinyact.channels = (4, 4)", "tinyact.strides = (2, 2)",
                "tinyact.keypoints = 4", "tinyact.early_keypoints = 0", "tinyact.hidden_dim = 16",
                "tinyact.input_norm = False", "dataset.image_size = (24, 32)"],
    "act": ["gin_configs/act.gin", "act.hidden_dim = 16", "act.nheads = 2", "act.enc_layers = 1",
            "act.dim_feedforward = 32", "act.latent_dim = 4", "act.backbone_hidden_sizes = (8, 8)",
            "act.backbone_depths = (1, 1)", "act.backbone_embedding_size = 8",
            "dataset.image_size = (24, 32)"],
    "mlp": ["gin_configs/mlp.gin", "dataset.is_multimodal = False"],
}


class Trainer:
    """What SimEvalCallback calls on the transformers Trainer: model, log, save_model."""

    def __init__(self, model) -> None:
        self.model, self.logged = model, []

    def log(self, metrics: dict) -> None:
        self.logged.append(metrics)

    def save_model(self, path: str) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
                  f"{path}/model.safetensors")


def callback(policy: str, tmp_path: Path, *extra: str):
    """A SimEvalCallback for ``policy`` resolved from its gin file (+ ``extra`` bindings),
    with a fresh policy."""
    from ilstudio.data.normalization import NormStats
    from ilstudio.policies import build_policy
    from ilstudio.resolve import resolve_argv
    from ilstudio.training.sim_eval import SimEvalCallback

    gin_file, *bindings = POLICIES[policy]
    run = resolve_argv([f"--task_name={TASK}", f"--gin_file={gin_file}",
                        f"--gin_bindings=task.dataset_dir = '{tmp_path / 'data'}'",
                        f"--output_dir={tmp_path / 'run'}",
                        *[f"--gin_bindings={b}" for b in [*SHORT, *bindings, *extra]]])
    torch.manual_seed(0)
    model = build_policy(run)
    stats = NormStats(np.zeros(14), np.ones(14), np.zeros(14), np.ones(14))
    (tmp_path / "run").mkdir(exist_ok=True)
    return SimEvalCallback(Trainer(model), run, stats, every=10, episodes=1, rollouts=True)


def record_queries(model, draw_globals: bool = False) -> list:
    """Wrap the model's select_action: every chunk it returns is recorded (optionally after
    drawing from torch's, numpy's and Python's global generators)."""
    chunks, original = [], model.select_action

    def select_action(*args, **kwargs):
        if draw_globals:
            torch.rand(1), np.random.rand(), random.random()
        out = original(*args, **kwargs)
        chunks.append(out[0].detach().numpy().astype(np.float64))
        return out

    model.select_action = select_action
    return chunks


@pytest.mark.parametrize(("policy", "ensembled"), [("tinyact", True), ("act", True), ("mlp", False)])
def test_in_training_rollouts_ensemble_tinyact_and_act(policy: str, ensembled: bool, tmp_path: Path,
                                                       monkeypatch) -> None:
    """TinyACT and ACT are queried every step and execute the blend of the overlapping
    chunks (ACT's weights); the MLP executes each chunk as it is, one query per chunk."""
    from ilstudio.policies.ensemble import TE_K
    from ilstudio.sim import rollout

    cb = callback(policy, tmp_path)
    chunks = record_queries(cb.trainer.model)
    executed = []
    act = rollout.PolicyAgent.act
    monkeypatch.setattr(rollout.PolicyAgent, "act",
                        lambda self, t, q, f: executed.append(act(self, t, q, f)) or executed[-1])
    [result] = cb.roll_out()
    assert result.steps == STEPS and len(executed) == STEPS
    if not ensembled:
        assert len(chunks) == math.ceil(STEPS / CHUNK)
        np.testing.assert_array_equal(executed[1], chunks[0][1])  # the chunk as predicted
        return
    assert len(chunks) == STEPS  # queried every step
    w = np.exp(-TE_K * np.arange(2))
    blend = (w[0] * chunks[0][1] + w[1] * chunks[1][0]) / w.sum()  # step 1: chunks 0 and 1
    np.testing.assert_allclose(executed[1], blend, rtol=1e-6)
    assert not np.allclose(executed[1], chunks[0][1]) and not np.allclose(executed[1], chunks[1][0])


def test_the_declared_query_interval_reaches_the_in_training_rollouts(tmp_path: Path) -> None:
    from ilstudio.errors import UserError

    cb = callback("mlp", tmp_path, "mlp.query_every = 2")
    chunks = record_queries(cb.trainer.model)
    cb.roll_out()
    assert len(chunks) == STEPS // 2
    with pytest.raises(UserError, match=r"mlp.query_every = 6 .* model.chunk_size = 5"):
        callback("mlp", tmp_path, "mlp.query_every = 6")


def test_random_generators_are_restored_after_an_evaluation_that_draws(tmp_path: Path) -> None:
    cb = callback("mlp", tmp_path)
    chunks = record_queries(cb.trainer.model, draw_globals=True)

    def seed_and(fn) -> tuple:
        torch.manual_seed(1), np.random.seed(1), random.seed(1)
        fn()
        return torch.rand(3), np.random.rand(3), random.random()

    expected = seed_and(lambda: None)
    after = seed_and(cb.roll_out)
    assert chunks, "the evaluation never queried the policy: nothing was drawn"
    torch.testing.assert_close(after[0], expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(after[1], expected[1])
    assert after[2] == expected[2]


def state(step: int, history: list | None = None):
    from transformers import TrainerState

    s = TrainerState()
    s.global_step, s.log_history = step, list(history or [])
    return s


def test_best_keeps_the_earlier_step_on_a_tie(tmp_path: Path) -> None:
    cb = callback("mlp", tmp_path)
    first = cb.evaluate(state(10))
    second = cb.evaluate(state(20))  # the same weights, the same episodes: the same score
    assert first == {**second, "eval_sim_seconds": first["eval_sim_seconds"]}
    record = json.loads((tmp_path / "run/best/best.json").read_text())
    assert record["step"] == 10


def test_after_a_resume_best_is_not_replaced_by_a_lower_score(tmp_path: Path) -> None:
    cb = callback("mlp", tmp_path)
    best = tmp_path / "run/best"
    best.mkdir(parents=True)
    earlier = {"step": 20, "eval_sim_success_rate": 1.0, "eval_sim_mean_return": 500.0}
    (best / "best.json").write_text(json.dumps(earlier))
    history = [{"step": 20, "eval_sim_success_rate": 1.0, "eval_sim_mean_return": 500.0}]
    s = state(20, history)
    cb.on_train_begin(None, s, None)
    s.global_step = 30
    metrics = cb.evaluate(s)  # a fresh policy on 12-step episodes: below 100% / 500
    assert metrics["eval_sim_success_rate"] < 1.0
    assert json.loads((best / "best.json").read_text()) == earlier
    assert not (best / "model.safetensors").exists()
    # The bar comes from best.json too when the log history does not show it.
    cb = callback("mlp", tmp_path)
    cb.on_train_begin(None, state(20), None)
    cb.evaluate(state(40))
    assert json.loads((best / "best.json").read_text()) == earlier
