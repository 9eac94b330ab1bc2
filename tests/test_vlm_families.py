"""Standard Hugging Face VLM checkpoints as the VLA backbone, one tiny checkpoint per family.

Real parts: tiny random checkpoints written by ``make_tiny --family`` (loaded by plain
transformers), real processors, real peft LoRA, real bitsandbytes 4-bit, real Trainer
steps, real train.py subprocesses (train, resume, rebuild in the evaluator's loader).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import test_vla
import torch
from conftest import REPO, rebuilt_exactly, run_train, tiny_args

from ilstudio.config.settings import LoraSettings, QuantizationSettings
from ilstudio.errors import UserError

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "idefics3", "paligemma", "llava")
STEPS = 20


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> its tiny checkpoint directory, each written once."""
    from ilstudio.policies.vla.tiny_families import write_tiny_vlm

    root = tmp_path_factory.mktemp("vlms")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = write_tiny_vlm(root / family, family)
        return made[family]

    return get


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from ilstudio.data.synthetic import write_synthetic_dataset

    d = tmp_path_factory.mktemp("vlm_data")
    write_synthetic_dataset(d, num_episodes=3, episode_len=STEPS, language=True)
    return d


def make(data: Path, ckpt: Path, **kw):
    return test_vla.make(data, ckpt, **kw)


# -- the tiny checkpoints load without ilstudio ------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_checkpoint_loads_with_plain_transformers(family, checkpoints):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    d = checkpoints(family)
    model = AutoModelForImageTextToText.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    assert model.config.model_type == family
    assert model.config.get_text_config().vocab_size == len(tok)
    image_token = tok.convert_ids_to_tokens(model.config.image_token_id)
    assert image_token in ("<image>", "<|image_pad|>")
    assert sum(f.stat().st_size for f in d.iterdir()) < 3e6
    if family.startswith("qwen"):  # its processor holds a video processor: torchvision
        assert AutoImageProcessor.from_pretrained(d).merge_size == 2
        assert "<|vision_start|>" in tok.chat_template
    else:
        processor = AutoProcessor.from_pretrained(d)
        assert processor.tokenizer.convert_tokens_to_ids(image_token) == model.config.image_token_id


def test_make_tiny_family_cli_is_deterministic(tmp_path, capsys):
    from ilstudio.policies.vla.make_tiny import main

    main([str(tmp_path / "a"), "--family", "llava"])
    main([str(tmp_path / "b"), "--family", "llava"])
    assert "tiny llava checkpoint" in capsys.readouterr().out
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# -- the policy on each family -------------------------------------------------------------------


def _trainable_by_part(policy) -> dict[str, set[bool]]:
    from ilstudio.policies.vla.vlm_policy import part_of

    prefixes = policy.part_prefixes()
    seen: dict[str, set[bool]] = {}
    lm_head = set(prefixes["llm"]) - {f"vlm.{n}" for n in policy.part_names["llm"]}
    for name, p in policy.named_parameters():
        if any(name.startswith(h + ".") for h in lm_head):
            continue  # the lm head is frozen when there is no language loss
        seen.setdefault(part_of(name, prefixes), set()).add(p.requires_grad)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_freezing_switches_freeze_exactly_the_named_modules(family, checkpoints, data):
    expect = {
        "": {"vit": True, "llm": True, "projector": True, "action_head": True},
        "freeze_vision_tower": {"vit": False, "llm": True, "projector": True, "action_head": True},
        "freeze_backbone": {"vit": False, "llm": False, "projector": True, "action_head": True},
        "tune_mm_mlp_adapter": {"vit": False, "llm": False, "projector": True, "action_head": True},
    }
    for switch, wanted in expect.items():
        policy, _ = make(data, checkpoints(family), model={switch: True} if switch else {})
        seen = _trainable_by_part(policy)
        assert set(seen) == set(wanted), (switch, seen)
        for part, trains in wanted.items():
            if part == "vit" and trains:  # a few weights the features never use stay frozen
                assert True in seen[part], (switch, part)
            else:
                assert seen[part] == {trains}, (switch, part, seen[part])
    parts = policy.parts()
    assert parts["projector"] is not parts["vit"] and parts["llm"] is not parts["vit"]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_lora_module_parts_name_the_right_modules(family, checkpoints, data):
    """On Qwen2-VL the projector (visual.merger) sits inside the vision tower: 'vit' leaves
    it out and 'projector' takes only it."""
    policy, _ = make(data, checkpoints(family))
    prefixes = {k: v[0] for k, v in policy.part_prefixes().items() if v}
    for part in ("llm", "vit", "projector", "action_head"):
        lora = LoraSettings(enable=True, r=2, alpha=4, module=part)
        adapted, _ = make(data, checkpoints(family), lora=lora)
        names = {n.rsplit(".lora_A", 1)[0] for n, _ in adapted.named_parameters() if ".lora_A." in n}
        assert names and all(n.startswith(prefixes[part] + ".") for n in names), (part, names)
        if part == "vit":
            assert not any(n.startswith(prefixes["projector"] + ".") for n in names)
        trains = {n for n, p in adapted.named_parameters() if p.requires_grad and "lora_" not in n}
        assert not any(n.startswith(tuple(f"{a}.base_layer" for a in names)) for n in trains)


def test_8bit_language_model_trains_with_lora(checkpoints, data, tmp_path):
    import bitsandbytes as bnb

    policy, ds = make(data, checkpoints("llava"), model={"is_pretrained": True},
                      lora=LoraSettings(enable=True, r=4, alpha=8),
                      quantization=QuantizationSettings(enable=True, bits=8))
    eight_bit = [n for n, m in policy.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    llm = f"vlm.{policy.part_names['llm'][0]}."
    assert eight_bit and all(n.startswith(llm) for n in eight_bit)
    test_vla._train_steps(policy, ds, tmp_path, steps=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_trains_in_the_language_model_only(family, checkpoints, data, tmp_path):
    import bitsandbytes as bnb

    lora = LoraSettings(enable=True, r=4, alpha=8, module="llm,projector")
    quant = QuantizationSettings(enable=True, bits=4)
    policy, ds = make(data, checkpoints(family), model={"is_pretrained": True}, lora=lora,
                      quantization=quant)
    four_bit = [n for n, m in policy.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    llm = [f"vlm.{n}" for n in policy.part_names["llm"]][0]
    assert four_bit and all(n.startswith(llm + ".") for n in four_bit)  # vision/projector/head: full
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in policy.named_parameters() if ".lora_A." in n}
    projector = [f"vlm.{n}" for n in policy.part_names["projector"]]
    assert any(n.startswith(llm) for n in adapted) and any(
        n.startswith(tuple(projector)) for n in adapted)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_B" in n}
    test_vla._train_steps(policy, ds, tmp_path, steps=2)
    assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters() if n in before)


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_every_camera_and_history_frame_reaches_the_model(family, checkpoints, data):
    policy, ds = make(data, checkpoints(family), dataset={"history_images_length": 2})
    sample = test_vla.batch_of(ds, 1)
    assert sample["images"].shape[1:3] == (1, 2)
    image_id = policy.vlm.config.image_token_id
    one, _ = make(data, checkpoints(family))
    ids_two = policy.inputs(["x"], sample["images"].reshape(1, 2, *sample["images"].shape[-3:]))
    ids_one = one.inputs(["x"], sample["images"][:, :, 0])
    count = lambda enc: int((enc["input_ids"] == image_id).sum())  # noqa: E731
    assert count(ids_two) == 2 * count(ids_one) > 0
    out = policy(**sample)
    assert torch.isfinite(out["loss"])


def test_state_dropout_reaches_a_standard_checkpoints_state_token(checkpoints, data):
    """vla.state_dropout on a standard checkpoint (Qwen2-VL): the same training-only effect."""
    from ilstudio.policies.vla.configuration import VLAConfig

    policy, ds = make(data, checkpoints("qwen2_vl"), policy_config=VLAConfig(state_dropout=0.5))
    test_vla.check_state_dropout(policy, ds)


def test_dataset_image_size_bounds_qwen2_vl_image_tokens(checkpoints, data):
    counts = {}
    for size in ((16, 16), (32, 32)):
        policy, ds = make(data, checkpoints("qwen2_vl"), dataset={"image_size": size})
        batch = test_vla.batch_of(ds, 1)
        enc = policy.inputs(["x"], batch["images"][:, :, None].flatten(1, 2)
                            if batch["images"].dim() == 5 else batch["images"])
        counts[size] = int((enc["input_ids"] == policy.vlm.config.image_token_id).sum())
        assert counts[size] <= size[0] * size[1] // (4 * 4 * 2 * 2)  # patch 4, merge 2x2
    assert counts[(16, 16)] < counts[(32, 32)]


def test_image_aspect_ratio_fits_frames_to_a_fixed_size_processor(checkpoints, data):
    frames = torch.rand(1, 1, 3, 24, 32)
    pixels = {}
    for aspect in ("pad", "resize"):
        policy, _ = make(data, checkpoints("llava"), dataset={"image_aspect_ratio": aspect,
                                                             "image_size": (24, 32)})
        assert policy.inputs.size == (32, 32)
        fitted = policy.inputs.frames(frames)[0][0]
        pixels[aspect] = fitted
        assert fitted.shape == (32, 32, 3)
    assert (pixels["pad"][:4] == 0).all() and not (pixels["resize"][:4] == 0).all()


def test_gradient_checkpointing_reaches_the_vlm(checkpoints, data):
    policy, ds = make(data, checkpoints("qwen2_vl"))
    policy.gradient_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in policy.vlm.modules())
    policy.train()
    policy(**test_vla.batch_of(ds, 2))["loss"].backward()
    assert policy.action_head.queries.grad is not None


def test_checkpoint_problems_are_validation_errors(checkpoints, data, tmp_path):
    task, ds, m = test_vla.settings(data, checkpoints("llava"), model={"flash_attn": True})
    from ilstudio.policies.vla.configuration import flash_attn_unavailable

    if flash_attn_unavailable():
        with pytest.raises(UserError, match="FlashAttention-2 cannot run here"):
            test_vla.validate(task, ds, m)
    task, ds, m = test_vla.settings(data, "someorg/uncached-vlm", model={
        "is_pretrained": True, "cache_dir": str(tmp_path / "empty_cache")})
    with pytest.raises(UserError, match="no config.json of that hub repository in the Hugging "
                                        "Face cache"):
        test_vla.validate(task, ds, m)


def test_a_cached_hub_id_loads_through_cache_dir(checkpoints, data, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network
    cache, commit = tmp_path / "hf_cache", "0" * 40
    repo = cache / "models--ilstudio-test--tiny-llava"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(checkpoints("llava"), repo / "snapshots" / commit)
    hub = {"is_pretrained": True, "cache_dir": str(cache)}
    task, ds, m = test_vla.settings(data, "ilstudio-test/tiny-llava", model=hub)
    test_vla.validate(task, ds, m)
    policy, train = make(data, "ilstudio-test/tiny-llava", model=hub)
    assert policy.family == "llava" and torch.isfinite(policy(**test_vla.batch_of(train, 2))["loss"])


# -- train.py: LoRA, resume, the evaluator's loader ----------------------------------------------


def _args(data: Path, out: Path, ckpt: Path, *extra: str) -> list[str]:
    return tiny_args(data, out, f"--gin_file={REPO / 'gin_configs/vla.gin'}",
                     f"--gin_bindings=model.model_name_or_path = '{ckpt}'",
                     "--gin_bindings=model.chunk_size = 5", "--gin_bindings=model.is_pretrained = True",
                     "--gin_bindings=lora.enable = True", "--gin_bindings=lora.r = 4",
                     "--gin_bindings=lora.alpha = 8", "--gin_bindings=model.llm_loss_weight = 0.1",
                     "--per_device_train_batch_size=4", "--save_steps=2", "--logging_steps=1",
                     *extra)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_py_lora_resume_and_evaluator_rebuild(family, checkpoints, data, tmp_path):
    """Per family: train.py with LoRA, resumed to more steps, rebuilt by the evaluator's loader
    and by the adapter route; on LLaVA, a run whose backbone directory now holds another
    family is refused on resume (vla.backbone_family is recorded and breaks resuming)."""
    import shutil

    ckpt, out = tmp_path / "vlm", tmp_path / "run"
    shutil.copytree(checkpoints(family), ckpt)
    first = run_train(*_args(data, out, ckpt, "--max_steps=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"vla.backbone_family = '{family}'" in (out / "operative_config.gin").read_text()
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    policy, _ = make(data, ckpt)
    llm = f"vlm.{policy.part_names['llm'][0]}."
    assert targets and all(t.startswith(llm) for t in targets), targets
    again = run_train(*_args(data, out, ckpt, "--max_steps=4", "--resume_from_checkpoint=true"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    _check_rebuilt(out, targets)
    if family == "llava":
        shutil.rmtree(ckpt)
        shutil.copytree(checkpoints("idefics3"), ckpt)
        refused = run_train(*_args(data, out, ckpt, "--max_steps=6", "--resume_from_checkpoint=true"))
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "vla.backbone_family" in refused.stderr and "Traceback" not in refused.stderr


def _check_rebuilt(out: Path, targets: list[str]) -> None:
    from ilstudio.models.adapter_io import load_adapter_run
    from ilstudio.policies import build_policy

    built, rebuilt = rebuilt_exactly(out)
    own = rebuilt.state_dict()
    base = build_policy("vla", policy_config=built["policy"], task=built["task"],
                        dataset=built["dataset"], model=built["model"], lora=built["lora"],
                        quantization=built["quantization"], use_images=True)
    base = load_adapter_run(base, out)
    for key in (targets[0] + ".lora_B.default.weight", "action_head.mlp.0.weight"):
        assert torch.equal(base.state_dict()[key], own[key]), key
    # lora.weight_path: a new run starts from these adapters (and trainable non-LoRA weights).
    cont = build_policy("vla", policy_config=built["policy"], task=built["task"],
                        dataset=built["dataset"], model=built["model"],
                        lora=dataclasses.replace(built["lora"], weight_path=str(out)),
                        quantization=built["quantization"], use_images=True)
    for key in (targets[0] + ".lora_B.default.weight", "action_head.mlp.0.weight"):
        assert torch.equal(cont.state_dict()[key], own[key]), key


def test_train_py_qlora_run_is_rebuilt_by_the_evaluator(checkpoints, data, tmp_path):
    """QLoRA through train.py (4-bit language model, tied embeddings untied) and a strict
    rebuild of its 4-bit weights and adapters by the evaluator's loader."""
    import bitsandbytes as bnb


    out = tmp_path / "qlora"
    proc = run_train(*_args(data, out, checkpoints("paligemma"), "--max_steps=2",
                            "--gin_bindings=quantization.enable = True",
                            "--gin_bindings=quantization.bits = 4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from ilstudio.training import allocator

    if allocator._glibc() is not None and not any(os.environ.get(v) for v in allocator.USER_VARIABLES):
        assert "glibc allocator: freed blocks of 128 KiB and more go back" in proc.stderr  # quantized CPU run
    assert "left in the checkpoint file (memory-mapped, read as used): input embedding" in proc.stderr
    built, rebuilt = rebuilt_exactly(out)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in rebuilt.modules())
