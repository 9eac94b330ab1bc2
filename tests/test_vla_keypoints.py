"""vla.keypoint_encoder and vla.keypoints_to_head: the VLA's keypoint token (TinyACT's conv +
spatial-softmax encoder, ilstudio/policies/keypoints.py, projected into the LM).

Real parts: the tiny two-folder backbone of test_vla, a tiny random Qwen2-VL checkpoint (the
standard-checkpoint kind), real train.py subprocesses, the evaluator's own rebuild
(load_settings/load_policy) and the LoRA adapter route.
"""

from __future__ import annotations

import json

import pytest
import test_vla
import torch
from conftest import rebuilt_exactly, run_train
from test_vla import _vla_args, batch_of, make

from ilstudio.config.settings import LoraSettings
from ilstudio.policies.vla.configuration import VLAConfig

KP = VLAConfig(keypoint_encoder=4)
backbone, lang_data = test_vla.backbone, test_vla.lang_data  # its module fixtures, shared


def _actions(policy, b) -> torch.Tensor:
    return policy.eval().select_action(b["qpos"], b["images"], b["input_ids"], b["attention_mask"])


def test_keypoint_token_sits_after_the_state_token_and_changes_the_actions(backbone, lang_data):
    """One keypoint token per image between the state token and the action queries; shifting
    that token (its MLP's output bias) changes every sample's actions."""
    policy, ds = make(lang_data, backbone, policy_config=KP)
    plain, _ = make(lang_data, backbone)
    b = batch_of(ds, n=3)
    seq = policy._sequence(b["qpos"], b["images"], b["input_ids"], b["attention_mask"], False)
    plain_seq = plain._sequence(b["qpos"], b["images"], b["input_ids"], b["attention_mask"], False)
    assert seq[2] == plain_seq[2] + 1  # the queries start one token later (one camera, one frame)
    assert plain.projector.keypoints is None and seq[3].shape == (3, policy.projector.keypoints.out_dim)
    before = _actions(policy, b)
    with torch.no_grad():
        policy.projector.keypoints.token[-1].bias += 1.0
    assert ((_actions(policy, b) - before).abs().amax((1, 2)) > 1e-4).all()


def test_keypoints_to_head_is_a_path_around_the_lm(backbone, lang_data):
    """vla.keypoints_to_head: the action head reads the keypoint features directly; with the
    keypoint token's LM input held fixed, changing that path still changes the actions."""
    policy, ds = make(lang_data, backbone,
                      policy_config=VLAConfig(keypoint_encoder=4, keypoints_to_head=True))
    head = policy.action_head.keypoints
    assert head.in_features == policy.projector.keypoints.out_dim
    b = batch_of(ds, n=3)
    before = _actions(policy, b)
    with torch.no_grad():
        head.weight.mul_(-1.0)
    assert ((_actions(policy, b) - before).abs().amax((1, 2)) > 1e-4).all()
    assert make(lang_data, backbone, policy_config=KP)[0].action_head.keypoints is None


def test_keypoint_encoder_is_part_of_the_projector_and_trains_under_lora(backbone, lang_data):
    """The keypoint encoder belongs to the 'projector' part: with LoRA on the LM it trains in
    full; with LoRA on the projector its token MLP gets adapters and its convolutions still
    train (nothing pretrained to keep); tune_mm_mlp_adapter (only projector + head) trains it."""
    lora = LoraSettings(enable=True, module="llm", r=4)
    policy, _ = make(lang_data, backbone, policy_config=KP, lora=lora)
    kp = policy.projector.keypoints
    assert any(kp is m for m in policy.parts()["projector"].modules())
    assert all(p.requires_grad for p in kp.parameters())
    on_projector, _ = make(lang_data, backbone, policy_config=KP,
                           lora=LoraSettings(enable=True, module="projector", r=4))
    kp = on_projector.projector.keypoints
    assert kp.encoder.layers[0][0].weight.requires_grad and kp.norm.bias.requires_grad
    assert not kp.token[0].base_layer.weight.requires_grad and kp.token[0].lora_A.default.weight.requires_grad
    tuned, _ = make(lang_data, backbone, policy_config=KP, model={"tune_mm_mlp_adapter": True})
    assert all(p.requires_grad for p in tuned.projector.keypoints.parameters())
    assert not any(p.requires_grad for p in tuned.vit.parameters())


@pytest.mark.parametrize("binding, message", [
    ("vla.keypoints_to_head = True", "vla.keypoints_to_head = True (set in --gin_bindings"),
    ("vla.keypoint_encoder = -1", "vla.keypoint_encoder"),
])
def test_keypoint_settings_are_checked_before_anything_is_written(binding, message, backbone,
                                                                  lang_data, tmp_path):
    """train.py refuses the head path without an encoder, and a negative keypoint count:
    exit 2, one message naming the parameter, nothing written."""
    out = tmp_path / "run"
    proc = run_train(*_vla_args(lang_data, out, backbone, "--max_steps=1",
                                f"--gin_bindings={binding}"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_standard_checkpoint_gets_the_keypoint_token_in_its_action_head(lang_data, tmp_path):
    """On a standard image-text-to-text checkpoint (Qwen2-VL) the projector is the model's own,
    so the keypoint encoder sits in the action head: one token after the state token, and both
    the token and the head path move the actions."""
    from ilstudio.policies.vla.tiny_families import write_tiny_vlm

    ckpt = write_tiny_vlm(tmp_path / "qwen2_vl", "qwen2_vl")
    policy, ds = make(lang_data, ckpt,
                      policy_config=VLAConfig(keypoint_encoder=4, keypoints_to_head=True))
    head = policy.action_head
    assert any(head.keypoint_encoder is m for m in policy.parts()["action_head"].modules())
    b = batch_of(ds, n=2)
    seq = policy._sequence(b["qpos"], b["images"], b["input_ids"], b["attention_mask"], False)
    plain, _ = make(lang_data, ckpt)
    plain_seq = plain._sequence(b["qpos"], b["images"], b["input_ids"], b["attention_mask"], False)
    assert seq[4] == plain_seq[4] + 1 and seq[0].shape[1] == plain_seq[0].shape[1] + 1
    before = _actions(policy, b)
    with torch.no_grad():
        head.keypoint_encoder.token[-1].bias += 1.0
    after_token = _actions(policy, b)
    assert ((after_token - before).abs().amax((1, 2)) > 1e-4).all()
    with torch.no_grad():
        head.keypoints.weight.mul_(-1.0)
    assert ((_actions(policy, b) - after_token).abs().amax((1, 2)) > 1e-4).all()


def test_train_py_run_resumes_and_is_rebuilt_exactly(backbone, lang_data, tmp_path):
    """train.py with the keypoint token (and its head path) under LoRA: resumed to more steps;
    the evaluator's rebuild from the run directory gives exactly the saved weights; the LoRA
    adapter route restores the keypoint encoder and head path, the ActNorm's 'initialized'
    flag included (else a run continued with lora.weight_path would re-initialize it)."""
    from ilstudio.models.adapter_io import load_adapter_run
    from ilstudio.policies import build_policy

    out = tmp_path / "run"
    args = ("--gin_bindings=vla.keypoint_encoder = 4", "--gin_bindings=vla.keypoints_to_head = True",
            "--gin_bindings=lora.enable = True", "--gin_bindings=lora.r = 4", "--save_steps=2",
            "--per_device_train_batch_size=4")
    first = run_train(*_vla_args(lang_data, out, backbone, "--max_steps=2", *args))
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_train(*_vla_args(lang_data, out, backbone, "--max_steps=4",
                                 "--resume_from_checkpoint=true", *args))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    operative = (out / "operative_config.gin").read_text()
    assert "vla.keypoint_encoder = 4" in operative and "vla.keypoints_to_head = True" in operative
    built, policy = rebuilt_exactly(out)
    own = policy.state_dict()
    assert bool(own["projector.keypoints.norm.initialized"])  # trained: ActNorm set from data
    base = build_policy("vla", policy_config=built["policy"], task=built["task"],
                        dataset=built["dataset"], model=built["model"], lora=built["lora"],
                        quantization=built["quantization"], use_images=True)
    routed = load_adapter_run(base, out).state_dict()
    keys = [k for k in own if k.startswith(("projector.keypoints.", "action_head.keypoints."))]
    assert "projector.keypoints.norm.initialized" in keys
    for key in keys:
        assert torch.equal(routed[key], own[key]), key

