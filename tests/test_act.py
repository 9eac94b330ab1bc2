"""ACT policy: a real (tiny) CVAE transformer + transformers ResNet, real gin, real Trainer.

Sizes are shrunk through gin bindings (the same keys a user would bind), so every test runs
the code paths of the paper-size model in well under a second per step.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gin
import numpy as np
import pytest
import torch
from conftest import run_train, tiny_args
from safetensors.torch import load_file

from ilstudio.config import settings as S
from ilstudio.errors import UserError
from ilstudio.policies.act.configuration import ACTConfig
from ilstudio.policies.act.modeling import ACTPolicy, build
from ilstudio.policies.ensemble import TemporalEnsembler

CHUNK, STATE, ACTION, HW = 10, 14, 14, (24, 32)
TINY = {
    "act.hidden_dim": 32, "act.nheads": 4, "act.dim_feedforward": 64, "act.enc_layers": 1,
    "act.latent_dim": 8, "act.backbone_hidden_sizes": (8, 8, 16, 16),
    "act.backbone_depths": (1, 1, 1, 1), "act.backbone_embedding_size": 8,
    "model.policy": "act", "model.chunk_size": CHUNK, "task.camera_names": ("top",),
}
TINY_FLAGS = [f"--gin_bindings={k} = {list(v) if isinstance(v, tuple) else v!r}"
              for k, v in TINY.items() if not k.startswith("task.")]


def settings(**overrides):
    """Settings objects built by gin from TINY + overrides (gin's global config restored)."""
    bindings = {**TINY, **overrides}
    gin.clear_config()
    try:
        for key, value in bindings.items():
            gin.bind_parameter(key, value)
        out = {"task": S.TaskSettings(), "dataset": S.DatasetSettings(), "model": S.ModelSettings(),
               "lora": S.LoraSettings(), "quantization": S.QuantizationSettings(),
               "policy": ACTConfig()}
    finally:
        gin.clear_config()
    return out


def validate(s: dict) -> None:
    s["policy"].validate(task=s["task"], dataset=s["dataset"], model=s["model"], lora=s["lora"],
                         quantization=s["quantization"], source_of=lambda key: "test")


def build_act(seed: int = 0, **overrides) -> ACTPolicy:
    s = settings(**overrides)
    validate(s)
    torch.manual_seed(seed)
    return build(policy_config=s["policy"], task=s["task"], dataset=s["dataset"], model=s["model"],
                 lora=s["lora"], quantization=s["quantization"], use_images=True)


def batch(b: int = 4, seed: int = 0, pad_from: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    is_pad = torch.zeros(b, CHUNK, dtype=torch.bool)
    is_pad[: b // 2, pad_from:] = True  # half the samples end mid-chunk
    return {"qpos": torch.randn(b, STATE, generator=g),
            "images": torch.rand(b, 1, 3, *HW, generator=g),
            "action": torch.randn(b, CHUNK, ACTION, generator=g), "is_pad": is_pad}


def seeded_forward(model: ACTPolicy, data: dict, seed: int = 123) -> dict:
    torch.manual_seed(seed)  # same z sample and dropout masks in every call
    return model(**data)


# -- the module -----------------------------------------------------------------------------


def test_loss_decreases_on_a_fixed_batch():
    model = build_act()
    data = batch()
    opt = torch.optim.AdamW(model.optimizer_param_groups(1e-3, 0.0))
    losses = []
    for _ in range(25):
        out = model(**data)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_padded_targets_do_not_change_the_loss_but_real_ones_do():
    model = build_act()
    data = batch()
    base = seeded_forward(model, data)
    changed = dict(data, action=data["action"].clone())
    changed["action"][data["is_pad"]] = 1e3  # garbage past the episode end
    out = seeded_forward(model, changed)
    assert torch.allclose(out["loss"], base["loss"], atol=1e-6)
    assert torch.allclose(out["kl"], base["kl"], atol=1e-6)  # the CVAE encoder masks them too
    real = dict(data, action=data["action"].clone())
    real["action"][0, 0] += 5.0  # a real (unpadded) step
    assert not torch.allclose(seeded_forward(model, real)["loss"], base["loss"])


def test_kl_term_is_present_and_weighted():
    data = batch()
    with_kl = build_act(seed=3, **{"act.kl_weight": 10.0})
    without = build_act(seed=3, **{"act.kl_weight": 0.0})
    a, b = seeded_forward(with_kl, data), seeded_forward(without, data)
    assert a["kl"].item() > 0
    assert torch.allclose(a["kl"], b["kl"]) and torch.allclose(a["l1"], b["l1"])
    assert torch.allclose(a["loss"], a["l1"] + 10.0 * a["kl"], atol=1e-5)
    assert torch.allclose(b["loss"], b["l1"], atol=1e-6)


def test_select_action_predicts_a_chunk_with_zero_latent():
    model = build_act().eval()
    data = batch()
    chunk = model.select_action(data["qpos"], data["images"])
    assert chunk.shape == (4, CHUNK, ACTION)
    assert torch.equal(chunk, model.select_action(data["qpos"], data["images"]))  # z = 0, no noise
    z0 = model.decode(data["qpos"], data["images"], torch.zeros(4, 8))
    assert torch.allclose(chunk, z0)
    assert not torch.allclose(chunk, model.select_action(data["qpos"] + 1, data["images"]))
    assert not torch.allclose(chunk, model.select_action(data["qpos"], 1 - data["images"]))


def test_history_frames_are_extra_views():
    model = build_act(**{"dataset.history_images_length": 2})
    data = batch()
    data["images"] = torch.rand(4, 1, 2, 3, *HW)  # (B, cams, history, 3, H, W)
    assert model(**data)["loss"].isfinite()


def test_temporal_ensembler_matches_act_reference():
    """Same numbers as ACT's evaluation loop (all_time_actions buffer, oldest weight 1)."""
    k, chunk, steps, dim = 0.01, 4, 9, 3
    rng = np.random.default_rng(0)
    chunks = rng.normal(size=(steps, chunk, dim))
    buf = np.zeros((steps, steps + chunk, dim))
    ens = TemporalEnsembler(chunk, k=k)
    for t in range(steps):
        buf[t, t:t + chunk] = chunks[t]  # ACT's reference implementation
        col = buf[:, t]
        col = col[np.all(col != 0, axis=1)]
        w = np.exp(-k * np.arange(len(col)))
        expected = (col * (w / w.sum())[:, None]).sum(0)
        got = ens.update(torch.from_numpy(chunks[t]))
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    ens.reset()  # a new episode: nothing from the last one is left
    np.testing.assert_allclose(ens.update(torch.from_numpy(chunks[5])).numpy(), chunks[5][0])
    batched = TemporalEnsembler(chunk, k=k)
    assert batched.update(torch.zeros(2, chunk, dim)).shape == (2, dim)  # batched chunks too
    with pytest.raises(ValueError, match="chunk of 4"):
        ens.update(torch.zeros(5, dim))


# -- parameters -------------------------------------------------------------------------------


def _trainer(model, tmp_path: Path, train_dataset=None, **kw):
    from transformers import TrainingArguments, default_data_collator

    from ilstudio.training.trainer import PolicyTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=1e-3,
                             weight_decay=1e-4, report_to=[], use_cpu=True, save_strategy="no",
                             dataloader_pin_memory=False, disable_tqdm=True, **kw)
    return PolicyTrainer(model=model, args=args, train_dataset=train_dataset,
                         data_collator=default_data_collator)


def test_lr_backbone_is_its_own_optimizer_group(tmp_path):
    model = build_act(**{"act.lr_backbone": 3e-5})
    opt = _trainer(model, tmp_path).create_optimizer()
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set(by_lr) == {1e-3, 3e-5}
    backbone = {id(p) for p in model.backbone.parameters()}
    assert by_lr[3e-5] == backbone
    rest = {id(p) for n, p in model.named_parameters() if not n.startswith("backbone.")}
    assert by_lr[1e-3] == rest and not rest & backbone


@pytest.mark.parametrize("switch", ["model.freeze_backbone", "model.freeze_vision_tower"])
def test_freeze_keeps_resnet_bit_identical_through_a_trainer_step(tmp_path, tiny_data, switch):
    """ACT's ResNet is both its backbone and its vision tower: either switch freezes it."""
    from ilstudio.data.checked import check_dataset
    from ilstudio.data.dataset import build_datasets

    overrides = {switch: True, "task.dataset_dir": str(tiny_data)}
    model = build_act(**overrides)
    s = settings(**overrides)
    train_ds, _, _, _ = build_datasets(check_dataset(s["task"], s["dataset"]), s["task"], s["dataset"], CHUNK, False, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(model, tmp_path, train_ds, max_steps=2, per_device_train_batch_size=4)
    trainer.train()
    assert len(trainer.optimizer.param_groups) == 1  # no backbone group at all
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in model.backbone.parameters()}
    after = model.state_dict()
    backbone_keys = [k for k in before if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone_keys)  # BatchNorm stats checked too
    assert all(torch.equal(before[k], after[k]) for k in backbone_keys)
    others = [k for k in before if not k.startswith("backbone.")]
    assert sum(not torch.equal(before[k], after[k]) for k in others) > len(others) // 2


def _tiny_resnet(seed: int = 7):
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(seed)
    return ResNetModel(ResNetConfig(layer_type="basic", embedding_size=8, hidden_sizes=[8, 16],
                                    depths=[1, 1]))


def test_is_pretrained_loads_the_saved_resnet(tmp_path):
    saved = _tiny_resnet()
    saved.save_pretrained(tmp_path / "resnet")
    ref = saved.state_dict()
    loaded = build_act(**{"model.model_name_or_path": str(tmp_path / "resnet"),
                          "model.is_pretrained": True}).backbone.state_dict()
    assert ref.keys() == loaded.keys()
    assert all(torch.equal(ref[k], loaded[k]) for k in ref)
    # is_pretrained=False: the directory's architecture (2 stages of 8, 16), random weights.
    fresh = build_act(**{"model.model_name_or_path": str(tmp_path / "resnet")})
    assert list(fresh.backbone.config.hidden_sizes) == [8, 16]
    assert fresh.input_proj.in_channels == 16
    weights = [k for k in ref if k.endswith("weight") and ref[k].dim() == 4]
    assert not any(torch.equal(ref[k], fresh.backbone.state_dict()[k]) for k in weights)


def test_is_pretrained_takes_an_image_classification_checkpoint(tmp_path):
    """ImageNet ResNet-18 is saved as ResNetForImageClassification: its `resnet` part loads."""
    from transformers import ResNetForImageClassification

    torch.manual_seed(5)
    classifier = ResNetForImageClassification(_tiny_resnet().config)
    classifier.save_pretrained(tmp_path / "cls")
    ref = classifier.resnet.state_dict()
    loaded = build_act(**{"model.model_name_or_path": str(tmp_path / "cls"),
                          "model.is_pretrained": True}).backbone.state_dict()
    assert ref.keys() == loaded.keys() and all(torch.equal(ref[k], loaded[k]) for k in ref)


def test_validation_errors_name_the_parameter(tmp_path):
    with pytest.raises(UserError, match=r"model\.model_name_or_path.*empty"):
        validate(settings(**{"model.is_pretrained": True}))
    with pytest.raises(UserError, match=r"model\.model_name_or_path.*no such directory"):
        validate(settings(**{"model.is_pretrained": True,
                             "model.model_name_or_path": str(tmp_path / "missing")}))
    with pytest.raises(UserError, match=r"model\.model_name_or_path.*no config\.json"):
        validate(settings(**{"model.model_name_or_path": str(tmp_path)}))
    with pytest.raises(UserError, match=r"needs camera images.*task\.camera_names"):
        validate(settings(**{"task.camera_names": ()}))
    with pytest.raises(UserError, match=r"dataset\.is_multimodal"):
        validate(settings(**{"dataset.is_multimodal": False}))
    with pytest.raises(UserError, match=r"act\.hidden_dim = 30 must be divisible by act\.nheads"):
        validate(settings(**{"act.hidden_dim": 30}))
    with pytest.raises(UserError, match=r"lora\.enable.*no effect on policy 'act'"):
        validate(settings(**{"lora.enable": True}))
    with pytest.raises(UserError) as both:  # every problem in one message
        validate(settings(**{"task.camera_names": (), "model.is_pretrained": True}))
    assert "task.camera_names" in str(both.value) and "model.model_name_or_path" in str(both.value)
    validate(settings(**{"model.freeze_backbone": True, "model.cache_dir": str(tmp_path)}))


# -- through train.py, as a user runs it --------------------------------------------------------


def _hub_cache(root: Path, repo: str = "tiny-org/tiny-resnet") -> Path:
    """A Hugging Face cache holding `repo` (what from_pretrained(repo, cache_dir=root) reads)."""
    commit = "0" * 40
    entry = root / f"models--{repo.replace('/', '--')}"
    _tiny_resnet().save_pretrained(entry / "snapshots" / commit)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    return entry / "snapshots" / commit


def test_train_py_act_run_learns_and_loads_back(tmp_path, tiny_data):
    """One real run: pretrained ResNet from a hub cache (model.cache_dir), frozen, 40 steps."""
    snapshot = _hub_cache(tmp_path / "hf_cache")
    out = tmp_path / "run"
    proc = run_train(*tiny_args(tiny_data, out, "--gin_file=gin_configs/act.gin", *TINY_FLAGS,
                                "--gin_bindings=model.model_name_or_path = 'tiny-org/tiny-resnet'",
                                f"--gin_bindings=model.cache_dir = '{tmp_path / 'hf_cache'}'",
                                "--gin_bindings=model.is_pretrained = True",
                                "--gin_bindings=model.freeze_backbone = True",
                                "--max_steps=40", "--learning_rate=1e-3", "--logging_steps=5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) >= 6 and np.mean(losses[-2:]) < 0.6 * np.mean(losses[:2]), losses
    operative = (out / "operative_config.gin").read_text()
    assert re.search(r"model\.policy = 'act'", operative)
    assert "act.hidden_dim = 32" in operative

    saved = load_file(str(out / "model.safetensors"))
    fresh = build_act(seed=99, **{"model.model_name_or_path": str(snapshot)})
    fresh.load_state_dict(saved, strict=True)
    # The frozen, cache-loaded ResNet is exactly the cached snapshot's weights.
    ref = _tiny_resnet().state_dict()
    assert all(torch.equal(saved[f"backbone.{k}"], v) for k, v in ref.items())
    fresh.eval()
    data = batch()
    assert fresh.select_action(data["qpos"], data["images"]).shape == (4, CHUNK, ACTION)


def test_train_py_act_without_cameras_is_a_validation_error(tmp_path, tiny_data):
    out = tmp_path / "run"
    proc = run_train(*tiny_args(tiny_data, out, "--gin_file=gin_configs/act.gin", *TINY_FLAGS,
                                "--gin_bindings=task.camera_names = []", "--max_steps=2"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "task.camera_names" in proc.stderr and "camera" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
