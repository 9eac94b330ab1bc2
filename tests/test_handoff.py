"""Hand-offs from configuration to where a value acts, checked through real ``train.py`` runs.

Each of these was once found by mutating the code (dropping the value on its way to the
trainer) and seeing no test fail: the helpers were tested, the hand-off was not. Here each
value goes in as a flag or gin binding and is observed where it acts: the batches consumed
per optimizer step, the samples the trainer draws, the learning rate of the LoRA group in
the optimizer the run saved, and which layers hold adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, run_train, tiny_args

from ilstudio.data.synthetic import write_synthetic_dataset


def log_history(run: Path) -> list[dict]:
    return json.loads((run / "trainer_state.json").read_text())["log_history"]


# -- gradient_accumulation_steps -------------------------------------------------------------


def test_gradient_accumulation_steps_reaches_the_trainer(tiny_data, tmp_path):
    """3 batches per optimizer step: after 2 steps the trainer has consumed 6 of the 25
    batches of an epoch (4 episodes x 50 steps, batch 8), which the logged epoch shows."""
    out = tmp_path / "ga"
    r = run_train(*tiny_args(tiny_data, out, "--max_steps=2", "--logging_steps=1",
                             "--gradient_accumulation_steps=3", "--save_strategy=no"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "training_args.json").read_text())["gradient_accumulation_steps"] == 3
    epochs = [e["epoch"] for e in log_history(out) if "loss" in e]
    assert epochs == pytest.approx([3 / 25, 6 / 25]), epochs


# -- dataset.episode_first -------------------------------------------------------------------


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """Episode 0: 10 steps with every action 50; episode 1: 190 steps with actions 0. Uniform
    draws over timesteps take the short episode 5% of the time, episode-first draws 50%."""
    d = tmp_path_factory.mktemp("uneven")
    write_synthetic_dataset(d / "short", num_episodes=1, episode_len=10, camera_names=())
    write_synthetic_dataset(d / "long", num_episodes=1, episode_len=190, camera_names=(), seed=1)
    (d / "short" / "episode_0.hdf5").rename(d / "episode_0.hdf5")
    (d / "long" / "episode_0.hdf5").rename(d / "episode_1.hdf5")
    for name, value in (("episode_0.hdf5", 50.0), ("episode_1.hdf5", 0.0)):
        with h5py.File(d / name, "r+") as f:
            f["action"][...] = value
    return d


def _mean_loss(uneven: Path, out: Path, *extra: str) -> float:
    r = run_train(*tiny_args(uneven, out, "--gin_bindings=task.camera_names = []",
                             "--gin_bindings=model.chunk_size = 1", "--learning_rate=0",
                             "--max_steps=12", "--logging_steps=1", "--save_strategy=no",
                             *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    return float(np.mean([e["loss"] for e in log_history(out) if "loss" in e]))


def test_episode_first_makes_the_trainer_draw_episodes_uniformly(uneven, tmp_path):
    """With --learning_rate=0 the model never changes, so the logged L1 loss measures which
    samples the trainer drew: the short episode's normalized target is about 4.4 away from the
    prediction, the long one's about 0.2."""
    uniform = _mean_loss(uneven, tmp_path / "uniform")
    per_episode = _mean_loss(uneven, tmp_path / "ep", "--gin_bindings=dataset.episode_first = True")
    assert uniform < 1.0, uniform  # ~0.05 * 4.4 + 0.95 * 0.2
    assert per_episode > 1.6, per_episode  # ~0.5 * 4.4 + 0.5 * 0.2


# -- VLA: lora.lr and lora.module ------------------------------------------------------------


@pytest.fixture(scope="module")
def vla_inputs(tmp_path_factory) -> tuple[Path, Path]:
    from ilstudio.policies.vla.make_tiny import write_tiny_backbone

    root = tmp_path_factory.mktemp("vla_handoff")
    backbone = write_tiny_backbone(root / "tiny", hidden=32, layers=1, heads=2, vision_hidden=16,
                                   vision_layers=1, vision_heads=2, image_size=16, patch_size=8)
    data = root / "data"
    write_synthetic_dataset(data, num_episodes=2, episode_len=12, language=True)
    return backbone, data


def _vla_run(vla_inputs, out: Path, *extra: str) -> Path:
    backbone, data = vla_inputs
    r = run_train(*tiny_args(data, out, f"--gin_file={REPO / 'gin_configs/vla.gin'}",
                             f"--gin_bindings=model.model_name_or_path = '{backbone}'",
                             "--gin_bindings=model.chunk_size = 4", "--max_steps=1",
                             "--save_steps=1", "--gin_bindings=lora.enable = True",
                             "--gin_bindings=lora.r = 4", "--gin_bindings=lora.alpha = 8",
                             *extra), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def vit_lora_run(vla_inputs, tmp_path_factory) -> Path:
    return _vla_run(vla_inputs, tmp_path_factory.mktemp("vit") / "run", "--learning_rate=1e-3",
                    "--gin_bindings=lora.module = 'vit'", "--gin_bindings=lora.lr = 0.0123")


def _adapter_keys(run: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(run / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def test_lora_lr_is_the_lora_groups_lr_in_the_saved_optimizer(vit_lora_run):
    """The optimizer train.py built (saved with checkpoint-1) gives exactly the LoRA tensors
    lora.lr as their group's initial lr, and every other trainable tensor --learning_rate."""
    state = torch.load(vit_lora_run / "checkpoint-1" / "optimizer.pt", weights_only=False)
    by_lr: dict[float, int] = {}
    for group in state["param_groups"]:
        by_lr[group["initial_lr"]] = by_lr.get(group["initial_lr"], 0) + len(group["params"])
    assert set(by_lr) == {0.0123, 1e-3}, by_lr
    assert by_lr[0.0123] == len(_adapter_keys(vit_lora_run)), by_lr  # lora_A + lora_B per layer
    assert by_lr[1e-3] > 0  # the action head and projector still train at --learning_rate


def test_lora_module_vit_puts_adapters_on_the_vision_tower_only(vit_lora_run):
    keys = _adapter_keys(vit_lora_run)
    assert keys and all(".vit." in k or k.startswith(("vit.", "base_model.model.vit.")) for k in keys), keys
    assert not [k for k in keys if ".llm." in k or k.startswith("llm.")], keys


def test_lora_module_pattern_decides_which_layers_get_adapters(vla_inputs, tmp_path):
    run = _vla_run(vla_inputs, tmp_path / "pattern", "--gin_bindings=lora.module = 'q_proj'")
    keys = _adapter_keys(run)
    layers = {k.split(".lora_")[0] for k in keys}
    assert layers and all(layer.endswith("q_proj") for layer in layers), layers
    # Every q_proj of the policy holds one, whichever part it is in.
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), "pt") as f:
        q_layers = {k.rsplit(".", 1)[0] for k in f.keys()  # noqa: SIM118
                    if k.rsplit(".", 1)[0].endswith("q_proj") or ".q_proj." in k}
    assert len(layers) == len({q.split(".q_proj")[0] for q in q_layers}), (layers, q_layers)
