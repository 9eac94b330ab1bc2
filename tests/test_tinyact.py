"""TinyACT: the CPU image policy. Real gin, real Trainer runs through train.py, tiny data.

What matters beyond shapes: the policy must *use* the image. The failure it was built against
(a CNN + state policy whose prediction ignores the camera) shows up as an output that does not
change when only the image changes; these tests train on data where only the image says what
to do and check that it learned that.
"""

from __future__ import annotations

import json
import re

import gin
import numpy as np
import pytest
import torch
from conftest import assert_recipe_dry_run, run_train, tiny_args
from safetensors.torch import load_file

from ilstudio.config import settings as S
from ilstudio.errors import UserError
from ilstudio.policies.keypoints import ActNorm, random_shift, spatial_softmax
from ilstudio.policies.sensitivity import image_sensitivity
from ilstudio.policies.tinyact.configuration import TinyACTConfig
from ilstudio.policies.tinyact.modeling import TinyACTPolicy, build

CHUNK, STATE, ACTION, HW = 8, 14, 14, (24, 32)
TINY = {"tinyact.channels": (8, 16), "tinyact.strides": (2, 1), "tinyact.keypoints": 8,
        "tinyact.hidden_dim": 64, "tinyact.num_layers": 2,
        "model.policy": "tinyact", "model.chunk_size": CHUNK, "task.camera_names": ("top",)}
TINY_FLAGS = [f"--gin_bindings={k} = {list(v) if isinstance(v, tuple) else v!r}"
              for k, v in TINY.items() if not k.startswith("task.")]


def settings(**overrides) -> dict:
    gin.clear_config()
    try:
        for key, value in {**TINY, **overrides}.items():
            gin.bind_parameter(key, value)
        return {"task": S.TaskSettings(), "dataset": S.DatasetSettings(),
                "model": S.ModelSettings(), "lora": S.LoraSettings(),
                "quantization": S.QuantizationSettings(), "policy": TinyACTConfig()}
    finally:
        gin.clear_config()


def build_tiny(seed: int = 0, **overrides) -> TinyACTPolicy:
    s = settings(**overrides)
    s["policy"].validate(task=s["task"], dataset=s["dataset"], model=s["model"], lora=s["lora"],
                         quantization=s["quantization"], source_of=lambda key: "test")
    torch.manual_seed(seed)
    return build(policy_config=s["policy"], task=s["task"], dataset=s["dataset"],
                 model=s["model"], use_images=True)


def dot_images(xy: torch.Tensor) -> torch.Tensor:
    """(B, 1, 3, H, W) grey frames with a red 2x2 'cube' at pixel (x, y) of each sample."""
    b = len(xy)
    img = torch.full((b, 1, 3, *HW), 0.4)
    for i, (x, y) in enumerate(xy.tolist()):
        img[i, 0, :, y:y + 2, x:x + 2] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)
    return img


def cube_task(b: int, seed: int) -> dict[str, torch.Tensor]:
    """The transfer-cube situation in miniature: the state is the same in every sample, the
    target chunk depends only on where the dot is."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.stack([torch.randint(4, HW[1] - 6, (b,), generator=g),
                      torch.randint(4, HW[0] - 6, (b,), generator=g)], 1)
    target = ((xy.float() / torch.tensor([HW[1], HW[0]])) * 2 - 1)  # (B, 2) in [-1, 1]
    action = target.repeat(1, ACTION // 2).unsqueeze(1).expand(b, CHUNK, ACTION).contiguous()
    return {"qpos": torch.zeros(b, STATE), "images": dot_images(xy), "action": action,
            "is_pad": torch.zeros(b, CHUNK, dtype=torch.bool)}


# -- pieces ------------------------------------------------------------------------------------


def test_spatial_softmax_finds_the_peak():
    heat = torch.full((1, 1, 5, 9), -30.0)
    heat[0, 0, 4, 0] = 30.0  # bottom-left corner
    np.testing.assert_allclose(spatial_softmax(heat)[0].numpy(), [-1.0, 1.0], atol=1e-5)


def test_random_shift_moves_content_by_at_most_the_pad():
    img = torch.zeros(16, 1, 12, 12)
    img[:, :, 6, 6] = 1.0
    out = random_shift(img, 2)
    assert out.shape == img.shape
    ys, xs = [], []
    for o in out:
        y, x = (o[0] == 1.0).nonzero()[0].tolist()
        ys.append(y)
        xs.append(x)
    assert all(4 <= v <= 8 for v in ys + xs) and len(set(zip(ys, xs, strict=True))) > 1


def test_saturation_keypoint_finds_the_coloured_object_untrained():
    """The cube is the only coloured thing on a grey table between white arms: the saturation
    keypoint points at it before any training (so the head can use it from step one)."""
    model = build_tiny(**{"tinyact.saturation_keypoint": True, "tinyact.early_keypoints": 0})
    xy = torch.tensor([[5, 5], [20, 14], [26, 4]])
    images = dot_images(xy)[:, 0]
    images[:, :, 10:14, :] = 0.95  # a white "arm" across the frame: no saturation
    kp = model.encoder(images)[:, :2]
    expected = (xy.float() + 0.5) / torch.tensor([HW[1] - 1, HW[0] - 1]) * 2 - 1
    torch.testing.assert_close(kp, expected, atol=0.1, rtol=0)


def test_colour_keypoints_find_a_red_and_a_blue_object_apart_untrained():
    """Insertion shows a red peg and a blue socket: one saturation keypoint lands between them,
    the red and blue colour keypoints land on each (gin_configs/insertion.gin turns them on)."""
    model = build_tiny(**{"tinyact.colour_keypoints": True, "tinyact.early_keypoints": 0})
    red, blue = torch.tensor([[5, 5], [26, 4]]), torch.tensor([[20, 14], [8, 18]])
    images = dot_images(red)[:, 0]
    for i, (x, y) in enumerate(blue.tolist()):
        images[i, :, y:y + 2, x:x + 2] = torch.tensor([0.1, 0.1, 0.9]).view(3, 1, 1)
    kp = model.encoder(images)[:, :6].view(2, 3, 2)  # red, green, blue (x, y)
    scale = torch.tensor([HW[1] - 1, HW[0] - 1])
    torch.testing.assert_close(kp[:, 0], (red.float() + 0.5) / scale * 2 - 1, atol=0.1, rtol=0)
    torch.testing.assert_close(kp[:, 2], (blue.float() + 0.5) / scale * 2 - 1, atol=0.1, rtol=0)


def test_insertion_recipe_resolves_as_a_dry_run(tmp_path, tiny_data):
    """gin_configs/insertion.gin on the insertion task resolves to TinyACT with colour keypoints
    and 120x160 frames read with a stride-4 first conv, the state never hidden, evaluated in
    chunks of 75 steps (not ensembled); a dry run writes nothing."""
    assert_recipe_dry_run(
        tmp_path / "run", "sim_insertion_scripted", "gin_configs/insertion.gin", tiny_data,
        ("model.policy = 'tinyact'", "tinyact.colour_keypoints = True",
         "tinyact.saturation_keypoint = True", "(task: sim_insertion_scripted)",
         "model.chunk_size = 100", "dataset.lazy_preprocess = False",
         "dataset.image_size = (120, 160)", "tinyact.strides = (4, 2, 1)",
         "tinyact.state_dropout = 0.0", "tinyact.temporal_ensemble = False",
         "tinyact.query_every = 75"),
        "--max_steps=10000")


def test_actnorm_standardizes_the_first_batch_then_is_a_fixed_map():
    norm = ActNorm(3)
    x = torch.randn(64, 3) * torch.tensor([0.05, 1.0, 0.0]) + torch.tensor([0.3, -2.0, 7.0])
    y = norm(x).detach()  # training mode: initialized from this batch
    torch.testing.assert_close(y[:, :2].mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    assert abs(float(y[:, 0].std()) - 0.05 / (0.05**2 + 1e-2) ** 0.5) < 0.05  # gain capped by eps
    assert torch.allclose(y[:, 2], torch.zeros(64), atol=1e-4)
    z = torch.randn(8, 3)
    norm.eval()
    out_eval = norm(z)
    norm.train()
    assert torch.equal(norm(z), out_eval)  # no train/eval gap, no re-initialization
    fresh = ActNorm(3)
    fresh.load_state_dict(norm.state_dict())
    assert torch.equal(fresh(z), out_eval)  # the loaded map is kept, not re-fitted to z


def test_shapes_loss_and_select_action():
    model = build_tiny()
    data = cube_task(4, 0)
    out = model(**data)
    assert out["loss"].ndim == 0 and out["loss"].requires_grad
    model.eval()
    assert model.select_action(data["qpos"], data["images"]).shape == (4, CHUNK, ACTION)
    assert model(qpos=data["qpos"], images=data["images"])["actions"].shape == (4, CHUNK, ACTION)
    with pytest.raises(ValueError, match="images"):
        model(qpos=data["qpos"], images=torch.rand(4, 2, 3, *HW), action=data["action"])


def test_history_frames_are_extra_images():
    model = build_tiny(**{"dataset.history_images_length": 2})
    model.eval()
    out = model.select_action(torch.zeros(3, STATE), torch.rand(3, 1, 2, 3, *HW))
    assert out.shape == (3, CHUNK, ACTION)


def test_padded_steps_do_not_count():
    model = build_tiny()
    model.eval()  # no dropout of the state, no shifts: the same prediction both times
    data = cube_task(2, 1)
    data["is_pad"][:, 4:] = True
    changed = {**data, "action": data["action"].clone()}
    changed["action"][:, 4:] += 100.0
    assert torch.allclose(model(**data)["loss"], model(**changed)["loss"])


def test_state_dropout_hides_the_state_in_training_only():
    model = build_tiny(**{"tinyact.state_dropout": 1.0, "tinyact.shift": 0})
    images = torch.rand(2, 1, 3, *HW)
    a, b = torch.zeros(2, STATE), torch.full((2, STATE), 3.0)
    model.train()
    assert torch.equal(model.predict(a, images), model.predict(b, images))  # state never seen
    model.eval()
    assert not torch.allclose(model.predict(a, images), model.predict(b, images))


def test_it_learns_to_read_the_cube_from_the_image():
    """Same state everywhere, target given by the dot's position: a policy that ignores the
    image cannot get below the targets' spread; TinyACT must, and its predictions must spread
    across dot positions like the targets do (the sensitivity ratio the learning curve plots)."""
    torch.manual_seed(0)
    model = build_tiny(**{"tinyact.saturation_keypoint": True, "tinyact.input_norm": True})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = cube_task(48, 1)
    blind = float((train["action"] - train["action"].mean(0)).abs().mean())
    for _ in range(100):
        loss = model(**train)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = cube_task(32, 2)
    model.eval()
    test_l1 = float((model.select_action(test["qpos"], test["images"]) - test["action"]).abs().mean())
    assert test_l1 < 0.5 * blind, (test_l1, blind)
    sens = image_sensitivity(model, test)
    assert sens["ratio"] > 0.5 and sens["state_spread"] == 0.0, sens


def test_validation_errors_name_the_parameter():
    s = settings(**{"tinyact.channels": (8, 16), "tinyact.strides": (2,)})
    with pytest.raises(UserError) as e:
        s["policy"].validate(task=s["task"], dataset=s["dataset"], model=s["model"],
                             lora=s["lora"], quantization=s["quantization"],
                             source_of=lambda key: "test")
    assert "tinyact.strides" in str(e.value) and "tinyact.channels" in str(e.value)


# -- through train.py ----------------------------------------------------------------------------


def test_train_py_tinyact_run_learns_uses_the_image_and_loads_back(tmp_path, tiny_data):
    out = tmp_path / "run"
    proc = run_train(*tiny_args(tiny_data, out, "--gin_file=gin_configs/tinyact.gin", *TINY_FLAGS,
                                "--gin_bindings=dataset.image_size = (24, 32)",
                                "--max_steps=60", "--learning_rate=3e-3", "--logging_steps=5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) >= 10 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2]), losses
    operative = (out / "operative_config.gin").read_text()
    assert re.search(r"model\.policy = 'tinyact'", operative)
    assert "tinyact.keypoints = 8" in operative and "dataset.lazy_preprocess = False" in operative

    # Rebuilt from the run directory alone, as `python -m ilstudio.eval` does (strict load).
    from ilstudio.eval import load_policy, load_settings

    fresh, uses_images, _ = load_policy(load_settings(out / "operative_config.gin"),
                                        out / "model.safetensors", "cpu")
    assert uses_images and not fresh.training
    saved = load_file(str(out / "model.safetensors"))
    assert bool(saved["head.0.initialized"])  # ActNorm was fitted during training, and saved
    qpos, images = torch.zeros(2, STATE), torch.rand(2, 1, 3, *HW)
    before = fresh.select_action(qpos, images)
    assert before.shape == (2, CHUNK, ACTION)
    assert not torch.allclose(before, fresh.select_action(qpos, images.flip(-1)))


def test_train_py_tinyact_without_cameras_is_a_validation_error(tmp_path, tiny_data):
    out = tmp_path / "run"
    proc = run_train(*tiny_args(tiny_data, out, "--gin_file=gin_configs/tinyact.gin", *TINY_FLAGS,
                                "--gin_bindings=task.camera_names = []", "--max_steps=2"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "camera" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
