"""The VLA policy: its parts, its parameters' effects, its language data, and train.py runs.

Real parts throughout: tiny random Hugging Face models written to tmp dirs by make_tiny,
real HDF5 episodes with text, real Trainer steps, real train.py subprocesses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, assert_recipe_dry_run, rebuilt_exactly, run_train, tiny_args

from ilstudio.config.settings import (
    DatasetSettings,
    LoraSettings,
    ModelSettings,
    QuantizationSettings,
    TaskSettings,
)
from ilstudio.data.language import IGNORE, read_episode_text
from ilstudio.errors import UserError
from ilstudio.policies.vla.configuration import VLAConfig

TINY = {"hidden": 32, "layers": 1, "heads": 2, "vision_hidden": 16, "vision_layers": 1,
        "vision_heads": 2, "image_size": 16, "patch_size": 8}
STEPS = 20


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    from ilstudio.policies.vla.make_tiny import write_tiny_backbone

    return write_tiny_backbone(tmp_path_factory.mktemp("vla") / "tiny", **TINY)


@pytest.fixture(scope="module")
def lang_data(tmp_path_factory) -> Path:
    from ilstudio.data.synthetic import write_synthetic_dataset

    d = tmp_path_factory.mktemp("lang_data")
    write_synthetic_dataset(d, num_episodes=3, episode_len=STEPS, language=True)
    return d


@pytest.fixture(scope="module")
def plain_data(tmp_path_factory) -> Path:
    """ACT-layout episodes without any text (no language_instruction attribute)."""
    from ilstudio.data.synthetic import write_synthetic_dataset

    d = tmp_path_factory.mktemp("plain_data")
    write_synthetic_dataset(d, num_episodes=4, episode_len=50, instruction=False)
    return d


def settings(data: Path, backbone: Path, *, dataset: dict | None = None, model: dict | None = None,
             cameras: tuple[str, ...] = ("top",)):
    task = TaskSettings(dataset_dir=str(data), camera_names=cameras, episode_len=STEPS)
    ds = DatasetSettings(**(dataset or {}))
    m = ModelSettings(**{"policy": "vla", "model_name_or_path": str(backbone), "chunk_size": 5,
                         **(model or {})})
    return task, ds, m


def make(data, backbone, *, dataset=None, model=None, lora=None, quantization=None, seed=0,
         policy_config=None):
    """(policy, train dataset) built the way train.py builds them."""
    from ilstudio.data.checked import check_dataset
    from ilstudio.data.dataset import build_datasets
    from ilstudio.policies import build_policy, build_processor

    task, ds, m = settings(data, backbone, dataset=dataset, model=model)
    pc = policy_config or VLAConfig()
    proc = build_processor("vla", policy_config=pc, task=task, dataset=ds, model=m)
    train_ds, _, _, _ = build_datasets(check_dataset(task, ds), task, ds, m.chunk_size, False, 0, language=proc)
    torch.manual_seed(seed)
    policy = build_policy("vla", policy_config=pc, task=task, dataset=ds, model=m,
                          lora=lora or LoraSettings(), quantization=quantization or QuantizationSettings(),
                          use_images=True)
    return policy, train_ds


def batch_of(ds, n: int = 4, start: int = 3) -> dict:
    return torch.utils.data.default_collate([ds[i] for i in range(start, start + n)])


def validate(task, ds, m, lora=None, quant=None) -> None:
    VLAConfig().validate(task=task, dataset=ds, model=m, lora=lora or LoraSettings(),
                         quantization=quant or QuantizationSettings(), source_of=lambda k: "test")


# -- the backbone directory, loading ---------------------------------------------------------


def test_make_tiny_layout_and_is_pretrained_loads_its_weights(backbone, lang_data):
    from safetensors.torch import load_file

    for rel in ("vision/config.json", "vision/model.safetensors", "llm/config.json",
                "llm/model.safetensors", "llm/tokenizer.json", "projector.safetensors"):
        assert (backbone / rel).is_file(), rel
    saved_llm = load_file(str(backbone / "llm/model.safetensors"))
    saved_vit = load_file(str(backbone / "vision/model.safetensors"))
    saved_proj = load_file(str(backbone / "projector.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    vkey = next(k for k in saved_vit if k.endswith("q_proj.weight"))

    pre, _ = make(lang_data, backbone, model={"is_pretrained": True})
    assert torch.equal(pre.llm.state_dict()[key], saved_llm[key])
    assert torch.equal(pre.vit.state_dict()[vkey], saved_vit[vkey])
    assert torch.equal(pre.projector.image[0].weight, saved_proj["image.0.weight"])

    fresh, _ = make(lang_data, backbone, model={"is_pretrained": False}, seed=1)
    assert fresh.llm.state_dict()[key].shape == saved_llm[key].shape
    assert not torch.equal(fresh.llm.state_dict()[key], saved_llm[key])
    assert not torch.equal(fresh.projector.image[0].weight, saved_proj["image.0.weight"])


def test_other_architectures_clip_and_qwen2_build_and_run(tmp_path, lang_data):
    from ilstudio.policies.vla.make_tiny import write_tiny_backbone

    d = write_tiny_backbone(tmp_path / "cq", **TINY, llm="qwen2", vision="clip")
    policy, ds = make(lang_data, d)
    assert type(policy.llm).__name__ == "Qwen2ForCausalLM"
    assert type(policy.vit).__name__ == "CLIPVisionModel"
    out = policy(**batch_of(ds))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()  # every trainable parameter gets a gradient (DDP needs that)
    assert not policy.vit.post_layernorm.weight.requires_grad  # CLIP: pooled token only
    assert not policy.llm.lm_head.weight.requires_grad  # no language loss
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def test_every_trainable_parameter_gets_a_gradient_with_language_loss(backbone, lang_data):
    policy, ds = make(lang_data, backbone, model={"llm_loss_weight": 0.5},
                      dataset={"use_reasoning": True})
    policy(**batch_of(ds))["loss"].backward()
    assert policy.llm.lm_head.weight.grad is not None
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def test_cache_dir_is_where_a_hub_id_is_looked_up(backbone, lang_data, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from ilstudio.policies.vla.modeling import load_tokenizer, load_vision

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network
    cache = tmp_path / "hf_cache"
    repo = cache / "models--ilstudio-test--tiny-vla"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(backbone, repo / "snapshots" / commit)
    hub = {"model_name_or_path": "ilstudio-test/tiny-vla", "is_pretrained": True}

    m = ModelSettings(policy="vla", cache_dir=str(cache), **hub)
    assert len(load_tokenizer(m)) > 256
    vit = load_vision(m)
    assert vit.config.hidden_size == TINY["vision_hidden"]
    with pytest.raises(UserError, match="not a local directory, and no config.json of that hub "
                                        "repository in the Hugging Face cache"):
        load_tokenizer(ModelSettings(policy="vla", **hub))  # no cache_dir: nowhere to find it


def test_make_tiny_cli(tmp_path, capsys):
    from ilstudio.policies.vla.layout import is_backbone_dir
    from ilstudio.policies.vla.make_tiny import main

    with pytest.raises(SystemExit) as bad:
        main([str(tmp_path / "x"), "--hidden", "30", "--heads", "4"])
    assert bad.value.code == 2 and not (tmp_path / "x").exists()
    main([str(tmp_path / "cli"), "--hidden", "32", "--layers", "1", "--heads", "2"])
    assert is_backbone_dir(tmp_path / "cli") and "wrote a tiny siglip+llama" in capsys.readouterr().out
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit) as refused:
        main([str(mine)])
    assert refused.value.code == 2 and "refusing to replace it" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep"


def test_missing_pretrained_dir_is_a_validation_error(lang_data, tmp_path):
    task, ds, m = settings(lang_data, tmp_path / "nope", model={"is_pretrained": True})
    with pytest.raises(UserError, match="no VLA backbone there"):
        validate(task, ds, m)


def test_missing_dir_without_pretrained_gets_a_tiny_backbone(tmp_path):
    from ilstudio.policies.vla.layout import is_backbone_dir
    from ilstudio.policies.vla.make_tiny import ensure_backbone

    target = tmp_path / "auto"
    ensure_backbone(ModelSettings(policy="vla", model_name_or_path=str(target)))
    assert is_backbone_dir(target)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.txt").write_text("mine")
    with pytest.raises(UserError, match="not a VLA backbone"):
        ensure_backbone(ModelSettings(policy="vla", model_name_or_path=str(junk)))
    assert (junk / "x.txt").read_text() == "mine"


# -- freezing switches, through a real Trainer step -------------------------------------------


def _train_steps(policy, ds, tmp_path, steps: int = 2) -> None:
    from transformers import TrainingArguments, default_data_collator

    from ilstudio.training.trainer import PolicyTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=steps, learning_rate=1e-2,
                             per_device_train_batch_size=4, report_to=[], save_strategy="no",
                             use_cpu=True, label_names=["action"], logging_strategy="no",
                             dataloader_pin_memory=False)
    PolicyTrainer(model=policy, args=args, train_dataset=ds,
                  data_collator=default_data_collator).train()


@pytest.mark.parametrize("switch, trained", [
    (None, {"vit", "llm", "projector", "action_head"}),
    ("freeze_vision_tower", {"llm", "projector", "action_head"}),
    ("freeze_backbone", {"projector", "action_head"}),
    ("tune_mm_mlp_adapter", {"projector", "action_head"}),
])
def test_freezing_switches_after_a_trainer_step(switch, trained, backbone, lang_data, tmp_path):
    model = {switch: True} if switch else {}
    policy, ds = make(lang_data, backbone, model={"llm_loss_weight": 0.5, **model},
                      dataset={"use_reasoning": True})
    before = {part: {n: p.detach().clone() for n, p in mod.named_parameters()}
              for part, mod in policy.parts().items()}
    _train_steps(policy, ds, tmp_path)
    changed = set()
    for part, mod in policy.parts().items():
        for n, p in mod.named_parameters():
            if not torch.equal(before[part][n], p.detach()):
                changed.add(part)
        frozen = part not in trained
        assert all(p.requires_grad != frozen for p in mod.parameters()), part
    assert changed == trained
    if switch == "tune_mm_mlp_adapter":
        # The state embedding belongs to the projector, the queries to the action head.
        assert not torch.equal(before["projector"]["state.weight"], policy.projector.state.weight)
        assert not torch.equal(before["action_head"]["queries"], policy.action_head.queries)


# -- losses ------------------------------------------------------------------------------------


def test_llm_loss_weight_adds_exactly_weight_times_lm_loss(backbone, lang_data):
    weight = 0.7
    policy, ds = make(lang_data, backbone, dataset={"use_reasoning": True})
    policy.eval()
    batch = batch_of(ds)
    assert policy.llm_loss_weight == 0.0
    base = policy(**batch)
    assert "lm_loss" not in base and torch.equal(base["loss"], base["action_loss"])
    policy.llm_loss_weight = weight  # what model.llm_loss_weight sets at build time
    out = policy(**batch)
    assert out["lm_loss"] > 0
    torch.testing.assert_close(out["loss"], base["loss"] + weight * out["lm_loss"])
    # ...and the builder takes it from the setting.
    built, _ = make(lang_data, backbone, model={"llm_loss_weight": weight},
                    dataset={"use_reasoning": True})
    assert built.llm_loss_weight == weight


def test_action_loss_ignores_padded_steps(backbone, lang_data):
    policy, ds = make(lang_data, backbone)
    policy.eval()
    batch = batch_of(ds, n=2, start=STEPS - 3)  # chunk 5 runs past the episode end
    assert batch["is_pad"].any()
    ref = policy(**batch)["action_loss"]
    batch["action"][batch["is_pad"]] += 100.0
    torch.testing.assert_close(policy(**batch)["action_loss"], ref)


# -- language data -----------------------------------------------------------------------------


def _processor(backbone, **dataset):
    from ilstudio.policies.vla.modeling import build_processor

    return build_processor(policy_config=VLAConfig(), dataset=DatasetSettings(**dataset),
                           model=ModelSettings(policy="vla", model_name_or_path=str(backbone)))


def _decode(proc, ids) -> str:
    return proc.tokenizer.decode([int(i) for i in ids])


def _prompt(proc, sample) -> str:
    p = proc.prompt_len
    return _decode(proc, sample["input_ids"][:p][sample["attention_mask"][:p].bool()])


def _label_text(proc, sample) -> str:
    return _decode(proc, sample["labels"][sample["labels"] != IGNORE])


def test_prompt_tokens_never_carry_labels_and_target_follows_switches(backbone, lang_data):
    path = lang_data / "episode_1.hdf5"
    text = read_episode_text(path, STEPS)
    t = 7
    plain = _processor(backbone).encode(text, t)
    reasoning = _processor(backbone, use_reasoning=True).encode(text, t)
    for s in (plain, reasoning):
        assert (s["labels"][:_processor(backbone).prompt_len] == IGNORE).all()
        assert s["input_ids"].shape == s["labels"].shape == s["attention_mask"].shape
    proc = _processor(backbone)
    assert _prompt(proc, plain) == text.instruction
    assert _label_text(proc, plain) == f" subtask: {text.subtask[t]}<eos>"
    assert _label_text(proc, reasoning) == (f" subtask: {text.subtask[t]} reasoning: "
                                            f"{text.reasoning[t]}<eos>")
    with h5py.File(path) as f:  # the text really is the episode's
        assert f["language/reasoning"].asstr()[t] == text.reasoning[t]


def test_use_prev_subtask_adds_the_previous_subtask_to_the_prompt(backbone, lang_data):
    text = read_episode_text(lang_data / "episode_0.hdf5", STEPS)
    proc = _processor(backbone, use_prev_subtask=True)
    change = next(t for t in range(1, STEPS) if text.subtask[t] != text.subtask[t - 1])
    assert _prompt(proc, proc.encode(text, 0)) == f"{text.instruction} previous subtask: none"
    prompt = _prompt(proc, proc.encode(text, change + 1))
    assert prompt == f"{text.instruction} previous subtask: {text.subtask[change - 1]}"
    assert text.subtask[change - 1] != text.subtask[change]
    assert _prompt(_processor(backbone), proc.encode(text, 0)).endswith("none")
    assert "previous" not in _prompt(proc, _processor(backbone).encode(text, change + 1))


def test_select_seg_token_mask_keeps_only_segment_tokens(backbone, lang_data):
    text = read_episode_text(lang_data / "episode_2.hdf5", STEPS)
    t = 11
    full = _processor(backbone, use_reasoning=True).encode(text, t)
    seg_proc = _processor(backbone, use_reasoning=True, select_seg_token_mask=True)
    seg = seg_proc.encode(text, t)
    tok = seg_proc.tokenizer
    n_sub = len(tok(text.subtask[t], add_special_tokens=False)["input_ids"])
    n_rsn = len(tok(text.reasoning[t], add_special_tokens=False)["input_ids"])
    assert int((seg["labels"] != IGNORE).sum()) == n_sub + n_rsn
    assert _label_text(seg_proc, seg) == text.subtask[t] + text.reasoning[t]
    # Same input either way; the mask only removes template tokens (markers, eos) from the loss.
    assert torch.equal(seg["input_ids"], full["input_ids"])
    kept = seg["labels"] != IGNORE
    assert torch.equal(seg["labels"][kept], full["labels"][kept])
    assert int((full["labels"] != IGNORE).sum()) > n_sub + n_rsn
    assert (seg["labels"][:seg_proc.prompt_len] == IGNORE).all()


def test_text_switches_need_the_text_in_the_data(backbone, plain_data):
    from ilstudio.data.dataset import EpisodeDataset
    from ilstudio.data.normalization import compute_stats

    paths = sorted(plain_data.glob("*.hdf5"))[:1]
    task = TaskSettings(dataset_dir=str(plain_data), camera_names=("top",))
    stats = compute_stats(paths)
    with pytest.raises(UserError, match="language_instruction"):
        EpisodeDataset(paths, task, DatasetSettings(), 5, stats, language=_processor(backbone))
    from ilstudio.policies.vla.modeling import build_processor

    fallback = build_processor(policy_config=VLAConfig(instruction="do the thing"),
                               dataset=DatasetSettings(use_reasoning=True),
                               model=ModelSettings(policy="vla", model_name_or_path=str(backbone)))
    with pytest.raises(UserError, match="use_reasoning = True.*language/reasoning.*episode_0"):
        EpisodeDataset(paths, task, DatasetSettings(use_reasoning=True), 5, stats, language=fallback)


def test_lazy_and_eager_preprocess_give_identical_batches(backbone, lang_data):
    from ilstudio.data.checked import check_dataset
    from ilstudio.data.dataset import build_datasets

    task, _, _ = settings(lang_data, backbone)
    built = {}
    for lazy in (True, False):
        ds_settings = DatasetSettings(lazy_preprocess=lazy, use_reasoning=True, use_prev_subtask=True)
        proc = _processor(backbone, lazy_preprocess=lazy, use_reasoning=True, use_prev_subtask=True)
        ds, _, _, _ = build_datasets(check_dataset(task, ds_settings), task, ds_settings, 5, False, 0, language=proc)
        built[lazy] = (ds, proc, proc.encode_calls)
    (lazy_ds, lazy_proc, lazy_calls), (eager_ds, eager_proc, eager_calls) = built[True], built[False]
    assert lazy_calls == 0  # nothing tokenized up front
    assert eager_calls == len(eager_ds) == 3 * STEPS  # every (episode, t), at construction
    for i in range(len(lazy_ds)):
        a, b = lazy_ds[i], eager_ds[i]
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(a[key], b[key]), (i, key)
    assert lazy_proc.encode_calls == len(lazy_ds)  # tokenized when drawn
    assert eager_proc.encode_calls == eager_calls  # served from the cache


# -- images: history, gradient checkpointing ---------------------------------------------------


def test_history_images_length_three_frames_per_camera(backbone, lang_data):
    policy, ds = make(lang_data, backbone, dataset={"history_images_length": 3})
    policy.eval()
    batch = batch_of(ds, n=2, start=5)
    assert batch["images"].shape[1:3] == (1, 3)  # (B, cams, history, 3, H, W)
    frames = []  # how many images each vision-tower call sees
    hook = policy.vit.register_forward_pre_hook(
        lambda m, args, kwargs: frames.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        ref = policy.select_action(batch["qpos"], batch["images"], batch["input_ids"],
                                   batch["attention_mask"])
        older = batch["images"].clone()
        older[:, :, 0] = 1.0 - older[:, :, 0]  # change only the oldest frame
        moved = policy.select_action(batch["qpos"], older, batch["input_ids"], batch["attention_mask"])
    hook.remove()
    assert frames == [2 * 1 * 3, 2 * 1 * 3]
    assert not torch.allclose(ref, moved)
    one, ds1 = make(lang_data, backbone)
    assert batch_of(ds1)["images"].dim() == 5
    with pytest.raises(ValueError, match="built for 1 x 1"):
        one.select_action(batch["qpos"], batch["images"], batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("aspect", ["pad", "resize"])
def test_image_aspect_ratio_fits_frames_to_the_towers_square(aspect, backbone, lang_data):
    policy, ds = make(lang_data, backbone, dataset={"image_aspect_ratio": aspect})
    seen = []
    hook = policy.vit.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["pixel_values"]), with_kwargs=True)
    with torch.no_grad():
        policy(**batch_of(ds, n=1))
    hook.remove()
    x = seen[0]  # 24x32 frames into a 16x16 tower: letterbox = 12x16 content, 2 black rows each side
    assert x.shape[-2:] == (16, 16)
    black = (0.0 - 0.5) / 0.5  # SigLIP normalization of a zero pixel
    bands = torch.cat([x[..., :2, :], x[..., -2:, :]], -2)
    assert torch.all(bands == black) == (aspect == "pad")


def test_gradient_checkpointing_is_delegated_to_the_lm(backbone, lang_data):
    policy, ds = make(lang_data, backbone, model={"llm_loss_weight": 0.3},
                      dataset={"use_reasoning": True})
    batch = batch_of(ds)
    policy.train()
    policy(**batch)["loss"].backward()
    ref = policy.projector.image[0].weight.grad.clone()
    policy.zero_grad()
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert policy.llm.is_activation_checkpointing and policy.vit.is_activation_checkpointing
    policy(**batch)["loss"].backward()
    torch.testing.assert_close(policy.projector.image[0].weight.grad, ref)


def test_select_action_uses_a_set_prompt(backbone, lang_data):
    policy, ds = make(lang_data, backbone)
    policy.eval()
    b = batch_of(ds, n=2)
    proc = _processor(backbone)
    prompt = proc.encode_prompt(read_episode_text(lang_data / "episode_0.hdf5", STEPS).instruction)
    with pytest.raises(ValueError, match="set_prompt"):
        policy.select_action(b["qpos"], b["images"])
    policy.set_prompt(prompt["input_ids"], prompt["attention_mask"])
    chunk = policy.select_action(b["qpos"], b["images"])
    assert chunk.shape == (2, 5, 14)
    explicit = policy.select_action(b["qpos"], b["images"], prompt["input_ids"][None].expand(2, -1),
                                    prompt["attention_mask"][None].expand(2, -1))
    torch.testing.assert_close(chunk, explicit)


# -- validation --------------------------------------------------------------------------------


def test_flash_attn_is_refused_where_it_cannot_run(backbone, lang_data):
    from ilstudio.policies.vla.configuration import flash_attn_unavailable

    reason = flash_attn_unavailable()
    if not reason:
        pytest.skip("FlashAttention-2 can run here")
    task, ds, m = settings(lang_data, backbone, model={"flash_attn": True})
    with pytest.raises(UserError, match="model.flash_attn = True.*FlashAttention-2 cannot run here"):
        validate(task, ds, m)
    validate(*settings(lang_data, backbone))  # the same without flash_attn is fine
    from ilstudio.policies.vla.modeling import _attn_kwargs  # where it can run: FA2 in both parts

    assert _attn_kwargs(ModelSettings(flash_attn=True)) == {"attn_implementation": "flash_attention_2"}
    assert _attn_kwargs(ModelSettings()) == {}


@pytest.mark.parametrize("key", ["use_reasoning", "select_seg_token_mask"])
def test_language_target_switches_need_a_language_loss(key, backbone, lang_data):
    with pytest.raises(UserError, match=f"dataset.{key} = True.*model.llm_loss_weight > 0"):
        validate(*settings(lang_data, backbone, dataset={key: True}))
    validate(*settings(lang_data, backbone, dataset={key: True}, model={"llm_loss_weight": 0.1}))


def test_a_language_loss_needs_a_language_target_in_the_data(backbone, plain_data):
    from ilstudio.data.checked import check_dataset
    from ilstudio.data.dataset import build_datasets
    from ilstudio.policies.vla.modeling import build_processor

    task, ds, m = settings(plain_data, backbone, model={"llm_loss_weight": 0.5})
    proc = build_processor(policy_config=VLAConfig(instruction="follow the wave"), dataset=ds,
                           model=m)
    with pytest.raises(UserError, match="no episode has a language target"):
        build_datasets(check_dataset(task, ds), task, ds, 5, False, 0, language=proc)


def test_vla_instruction_sets_the_evaluation_prompt(backbone, plain_data):
    """Plain ACT data (no text) trains with vla.instruction, and select_action(qpos, images)
    (what the evaluator calls) uses it."""
    policy, ds = make(plain_data, backbone, policy_config=VLAConfig(instruction="follow the wave"),
                      dataset={"use_prev_subtask": False})
    sample = ds[0]
    proc = _processor(backbone)
    assert _prompt(proc, sample) == "follow the wave"
    assert _decode(proc, policy.prompt[0][policy.prompt[1].bool()]) == "follow the wave"
    b = batch_of(ds, n=2)
    policy.eval()
    torch.testing.assert_close(policy.select_action(b["qpos"], b["images"]),
                               policy.select_action(b["qpos"], b["images"], b["input_ids"],
                                                    b["attention_mask"]))


def check_state_dropout(policy, ds) -> None:
    """With state dropout 0.5: in training about half the samples' actions no longer depend
    on the state; in evaluation every sample's do (shared with test_vlm_families)."""
    b = batch_of(ds, n=16, start=0)
    other = b["qpos"] + 1.0

    def actions(qpos) -> torch.Tensor:
        torch.manual_seed(3)  # the same dropout mask for both state inputs
        return policy(qpos, b["images"], b["input_ids"], b["attention_mask"])["actions"]

    with torch.no_grad():
        policy.train()
        same = (actions(b["qpos"]) - actions(other)).abs().amax((1, 2)) < 1e-6
        policy.eval()
        same_eval = (actions(b["qpos"]) - actions(other)).abs().amax((1, 2)) < 1e-6
    assert 2 <= int(same.sum()) <= 14, same
    assert not same_eval.any()


def test_state_dropout_hides_the_state_in_training_only(backbone, lang_data):
    """vla.state_dropout reaches the two-folder policy's state token."""
    policy, ds = make(lang_data, backbone, policy_config=VLAConfig(state_dropout=0.5))
    check_state_dropout(policy, ds)


def test_vla_image_size_builds_the_tower_for_that_input(backbone, lang_data):
    """vla.image_size = 32 on a backbone whose tower takes 16x16: a 32x32 tower (16 patch tokens
    instead of 4), and frames fitted to 32x32."""
    policy, ds = make(lang_data, backbone, policy_config=VLAConfig(image_size=32))
    assert policy.image_size == 32
    tokens = policy.encode_images(batch_of(ds, n=2)["images"])
    assert tokens.shape[1] == (32 // TINY["patch_size"]) ** 2
    plain, _ = make(lang_data, backbone)
    assert plain.encode_images(batch_of(ds, n=2)["images"]).shape[1] == 4


@pytest.mark.parametrize("model, message", [
    ({}, "not a multiple of the vision tower's patch size (8)"),
    ({"is_pretrained": True}, "needs model.is_pretrained = False"),
])
def test_vla_image_size_is_checked(model, message, backbone, lang_data):
    task, ds, m = settings(lang_data, backbone, model=model)
    size = 20 if not model else 32
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        VLAConfig(image_size=size).validate(task=task, dataset=ds, model=m, lora=LoraSettings(),
                                            quantization=QuantizationSettings(),
                                            source_of=lambda k: "test")


def test_cube_recipe_resolves_as_a_dry_run(tmp_path, tiny_data):
    """gin_configs/vla_cube.gin (the headline VLA's recipe) resolves to default.gin's policy (the
    VLA with LoRA on the built-in backbone) plus its overrides; a dry run writes nothing."""
    assert_recipe_dry_run(
        tmp_path / "run", "sim_transfer_cube_scripted", "gin_configs/vla_cube.gin", tiny_data,
        ("model.policy = 'vla'", "model.model_name_or_path = 'ilstudio:vla_tiny'",
         "lora.enable = True", "lora.module = 'llm'", "lora.r = 16",
         "vla.state_dropout = 0.5", "vla.image_size = 64", "model.chunk_size = 100",
         "dataset.image_size = (64, 64)", "vla.keypoint_encoder = 32",
         "vla.keypoints_to_head = True", "(task: sim_transfer_cube_scripted)"),
        "--max_steps=8000")


def test_vla_needs_cameras(backbone, lang_data):
    with pytest.raises(UserError, match="needs camera images"):
        validate(*settings(lang_data, backbone, cameras=()))


def _vla_args(data: Path, out: Path, backbone: Path, *extra: str) -> list[str]:
    return tiny_args(data, out, f"--gin_file={REPO / 'gin_configs/vla.gin'}",
                     f"--gin_bindings=model.model_name_or_path = '{backbone}'",
                     "--gin_bindings=model.chunk_size = 5", *extra)


@pytest.mark.parametrize("binding, message", [
    ("task.camera_names = []", "policy 'vla' needs camera images, but task.camera_names is empty"),
    ("model.flash_attn = True", "FlashAttention-2 cannot run here"),
])
def test_train_py_validation_errors_exit_2(binding, message, backbone, lang_data, tmp_path):
    from ilstudio.policies.vla.configuration import flash_attn_unavailable

    if "flash" in binding and not flash_attn_unavailable():
        pytest.skip("FlashAttention-2 can run here")
    out = tmp_path / "run"
    proc = run_train(*_vla_args(lang_data, out, backbone, f"--gin_bindings={binding}", "--max_steps=1"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


# -- a real run ------------------------------------------------------------------------------------


def test_train_py_run_learns_and_loads_back(backbone, lang_data, tmp_path):
    from safetensors.torch import load_file

    from ilstudio.config import settings as S
    from ilstudio.data.checked import check_dataset
    from ilstudio.data.dataset import build_datasets
    from ilstudio.policies import build_policy, build_processor

    out = tmp_path / "run"
    # The stable parameters come through the older YAML path (seed key names).
    yaml_file = tmp_path / "vla.yaml"
    yaml_file.write_text("is_pretrained: true\nllm_loss_weight: 0.1\nuse_reasoning: true\n"
                         "freeze_vision_tower: true\nlazy_preprocess: false\nlearning_rate: 5e-3\n")
    proc = run_train(*_vla_args(lang_data, out, backbone, "--max_steps=30", "--logging_steps=5",
                                f"--training_config={yaml_file}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_file(str(out / "model.safetensors"))
    pretrained_vit = load_file(str(backbone / "vision/model.safetensors"))
    assert all(torch.equal(saved["vit." + k], v) for k, v in pretrained_vit.items())  # frozen
    logs = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
            if "loss" in e]
    assert len(logs) >= 6
    assert np.mean(logs[-2:]) < 0.8 * np.mean(logs[:2]), logs

    # Rebuild as the evaluator does: operative_config.gin -> settings -> policy, strict weights.
    built, policy = rebuilt_exactly(out)
    task, ds, model, pc = built["task"], built["dataset"], built["model"], built["policy"]
    assert (model.policy, model.llm_loss_weight, ds.use_reasoning) == ("vla", 0.1, True)
    # The loaded policy predicts as well as training ended: better than a fresh one.
    processor = build_processor("vla", policy_config=pc, task=task, dataset=ds, model=model)
    data, _, _, _ = build_datasets(check_dataset(task, ds), task, ds, model.chunk_size, False, 0, language=processor)
    batch = batch_of(data, n=16, start=0)
    fresh = build_policy("vla", policy_config=pc, task=task, dataset=ds, model=model,
                         lora=S.LoraSettings(), quantization=S.QuantizationSettings(), use_images=True)
    with torch.no_grad():
        trained_l1 = policy.eval()(**batch)["action_loss"]
        fresh_l1 = fresh.eval()(**batch)["action_loss"]
    assert trained_l1 < 0.85 * fresh_l1, (trained_l1, fresh_l1)


def test_train_py_qlora_run_learns_and_loads_back(backbone, lang_data, tmp_path):
    """QLoRA on the VLA through train.py: 4-bit LM + LoRA adapters (own lr), on the saved tiny
    weights (is_pretrained=True), so the evaluator rebuilds the same base and loads strictly."""
    import bitsandbytes as bnb
    import gin
    from safetensors.torch import load_file

    from ilstudio.eval import load_policy, load_settings
    from ilstudio.models.adapter_io import load_adapter_run
    from ilstudio.policies import build_policy

    out = tmp_path / "qlora"
    proc = run_train(*_vla_args(lang_data, out, backbone, "--max_steps=25", "--learning_rate=5e-3",
                                "--logging_steps=5", "--gin_bindings=model.is_pretrained = True",
                                "--gin_bindings=lora.enable = True", "--gin_bindings=lora.r = 8",
                                "--gin_bindings=lora.alpha = 16", "--gin_bindings=lora.lr = 1e-2",
                                "--gin_bindings=quantization.enable = True",
                                "--gin_bindings=quantization.bits = 4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    if not torch.cuda.is_available():  # the frozen embedding (tied head) stays in the file
        assert "left in the checkpoint file (memory-mapped, read as used): input embedding" in proc.stderr
    logs = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
            if "loss" in e]
    assert np.mean(logs[-2:]) < 0.85 * np.mean(logs[:2]), logs
    assert (out / "adapter_model.safetensors").is_file()
    try:
        built = load_settings(out / "operative_config.gin")
        policy, _, _ = load_policy(built, out / "model.safetensors", "cpu")
    finally:
        gin.clear_config()
    q_proj = policy.llm.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    own = policy.state_dict()
    for key, value in adapter.items():  # peft names drop the adapter name
        assert torch.equal(own[key.replace(".weight", ".default.weight")], value), key
    # The adapter route (base from model_name_or_path + adapter + trainable non-LoRA parts).
    again = build_policy("vla", policy_config=built["policy"], task=built["task"],
                         dataset=built["dataset"], model=built["model"], lora=built["lora"],
                         quantization=built["quantization"], use_images=True)
    again = load_adapter_run(again, out)
    head = "action_head.mlp.0.weight"
    assert torch.equal(again.state_dict()[head], own[head])


def test_language_logits_only_where_labels_count_give_the_full_logits_loss(backbone, lang_data):
    """vla_losses runs the LM head on the labelled positions only; the loss and the gradients
    equal those of full logits over the target span with IGNORE positions (the tiny model's head)."""
    from ilstudio.data.language import IGNORE
    from ilstudio.policies.losses import language_loss, vla_losses

    policy, _ = make(lang_data, backbone, model={"llm_loss_weight": 0.5})
    head = policy.llm.get_output_embeddings()
    g = torch.Generator().manual_seed(0)
    b, qs, k, p, t = 3, 4, 2, 3, 6
    hidden = torch.randn(b, qs + k + t, head.in_features, generator=g, requires_grad=True)
    labels = torch.randint(0, head.out_features, (b, p + t), generator=g)
    labels[:, :p] = IGNORE
    labels[0, p + 4:] = IGNORE  # padded target tail
    labels[2, p:] = IGNORE  # a sample without language target
    seen = []
    hook = head.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    pred = action = torch.zeros(b, k, 2)
    out = vla_losses(pred, action, None, hidden, labels, queries_start=qs, num_queries=k,
                     prompt_len=p, lm_head=head, llm_loss_weight=1.0)
    hook.remove()
    assert seen == [(int((labels[:, p:] != IGNORE).sum()), head.out_features)]  # 4 + 6 rows, not 18
    start = qs + k - 1
    full = language_loss(head(hidden[:, start:start + t]).float(), labels[:, p:])
    torch.testing.assert_close(out["lm_loss"], full.detach())
    ours = torch.autograd.grad(out["loss"], hidden)[0]
    torch.testing.assert_close(ours, torch.autograd.grad(full, hidden)[0])
