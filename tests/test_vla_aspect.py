"""dataset.image_aspect_ratio on the default policy (the VLA on the shipped backbone) without
dataset.image_size: accepted, and it acts where the VLA fits frames to its vision tower.

Resolved as train.py resolves a command line (gin files, bindings, validation), then built as
train.py builds (processor, dataset, policy); the values are observed in the pixels the vision
tower receives. The refusal stays where the setting has no effect: the MLP keeps recorded
frames (tests/test_common_params.py::test_validation_refuses_no_op_settings).
"""

from __future__ import annotations

from pathlib import Path

import gin
import pytest
import torch
from conftest import REPO

from ilstudio.errors import UserError


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from ilstudio.data.synthetic import write_synthetic_dataset

    d = tmp_path_factory.mktemp("aspect_data")
    write_synthetic_dataset(d, num_episodes=2, episode_len=12, language=True)  # 24x32 frames
    return d


def tower_input(data: Path, gin_file: str, aspect: str) -> torch.Tensor:
    """The pixel_values the vision tower gets for one sample, from a resolved command line."""
    from ilstudio.data.checked import check_dataset
    from ilstudio.data.dataset import build_datasets
    from ilstudio.policies import build_policy, build_processor
    from ilstudio.resolve import resolve_argv

    gin.clear_config()
    r = resolve_argv([f"--gin_file={REPO / 'gin_configs' / gin_file}",
                      f"--gin_bindings=task.dataset_dir = '{data}'",
                      "--gin_bindings=task.camera_names = ['top']",
                      f"--gin_bindings=dataset.image_aspect_ratio = '{aspect}'"])
    name = r.model.policy
    proc = build_processor(name, policy_config=r.policy, task=r.task, dataset=r.dataset, model=r.model)
    train_ds, _, _, _ = build_datasets(check_dataset(r.task, r.dataset), r.task, r.dataset, r.model.chunk_size, False, 0, language=proc)
    torch.manual_seed(0)
    policy = build_policy(name, policy_config=r.policy, task=r.task, dataset=r.dataset, model=r.model,
                          lora=r.lora, quantization=r.quantization, use_images=True)
    seen = []
    vit = policy.get_base_model().vit if hasattr(policy, "get_base_model") else policy.vit
    hook = vit.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["pixel_values"]),
                                         with_kwargs=True)
    with torch.no_grad():
        policy(**torch.utils.data.default_collate([train_ds[3]]))
    hook.remove()
    return seen[0]


def test_square_and_resize_act_on_the_default_policy_without_image_size(data):
    """24x32 frames into the shipped backbone's 32x32 tower: 'pad' letterboxes (4 black rows
    above and below), 'square' and 'resize' stretch (no bands), so the model inputs differ."""
    pad = tower_input(data, "default.gin", "pad")
    square = tower_input(data, "default.gin", "square")
    resize = tower_input(data, "default.gin", "resize")
    assert pad.shape[-2:] == square.shape[-2:] == (32, 32)
    black = (0.0 - 0.5) / 0.5  # SigLIP's normalization of a zero pixel
    bands = lambda x: torch.cat([x[..., :4, :], x[..., -4:, :]], -2)  # noqa: E731
    assert torch.all(bands(pad) == black)
    assert not torch.any(bands(square) == black)
    torch.testing.assert_close(square, resize)  # two names for one plain resize
    assert not torch.allclose(pad, square)


def test_the_refusal_stays_where_frames_keep_their_recorded_size(data, tmp_path):
    """The seed's YAML form is accepted on the default policy; the MLP still refuses it."""
    from ilstudio.resolve import resolve_argv

    yaml = tmp_path / "seed.yaml"
    yaml.write_text("image_aspect_ratio: square\n")
    r = resolve_argv([f"--gin_file={REPO / 'gin_configs' / 'default.gin'}", f"--training_config={yaml}",
                      f"--gin_bindings=task.dataset_dir = '{data}'",
                      "--gin_bindings=task.camera_names = ['top']"])
    assert (r.model.policy, r.dataset.image_aspect_ratio, r.dataset.image_size) == ("vla", "square", None)
    gin.clear_config()
    with pytest.raises(UserError, match="has no effect: frames keep their recorded size for "
                                        "policy 'mlp'"):
        resolve_argv([f"--gin_file={REPO / 'gin_configs' / 'mlp.gin'}",
                      f"--gin_bindings=task.dataset_dir = '{data}'",
                      "--gin_bindings=task.camera_names = ['top']",
                      "--gin_bindings=dataset.image_aspect_ratio = 'square'"])
