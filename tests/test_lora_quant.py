"""LoRA (peft) and bitsandbytes quantization, for real, on a tiny Llama built from a config.

Every setting is checked where it lands: the bitsandbytes layer types and quant states,
peft's per-module r/alpha/dropout, the optimizer's parameter groups inside a real Trainer,
the files a LoRA run leaves, and QLoRA training that lowers the loss with frozen 4-bit weights.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")

from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from ilstudio.config.settings import LoraSettings, QuantizationSettings  # noqa: E402
from ilstudio.errors import UserError  # noqa: E402
from ilstudio.models import (  # noqa: E402
    apply_lora,
    bnb_quantization_config,
    check_lora_settings,
    check_quantization_combo,
    has_lora,
    keep_portable_4bit_layout,
    load_adapter_run,
    lora_param_groups,
    lora_target_modules,
    save_adapter,
    torch_dtype_for,
)
from ilstudio.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, NON_LORA_TRAINABLES  # noqa: E402

HIDDEN, VOCAB, ACTION = 32, 64, 4


def where(key: str) -> str:
    return f"test.gin:{key}"


def save_tiny_llama(directory, seed: int):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama saved like a pretrained checkpoint (no hub access)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), seed=0)


@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory):
    """Same shape, other random weights (a base that is not the one a run was trained on)."""
    return save_tiny_llama(tmp_path_factory.mktemp("other_llama"), seed=7)


def load_llm(path, quant: QuantizationSettings | None = None):
    quant = quant or QuantizationSettings()
    kwargs = {}
    if bnb_quantization_config(quant) is not None:
        kwargs["quantization_config"] = bnb_quantization_config(quant)
    if torch_dtype_for(quant) is not None:
        kwargs["dtype"] = torch_dtype_for(quant)
    llm = LlamaForCausalLM.from_pretrained(path, **kwargs)
    if "quantization_config" in kwargs:
        keep_portable_4bit_layout(llm)  # as the VLA builder does
    return llm


class TinyPolicy(nn.Module):
    """A VLA-shaped root: vit -> projector -> llm (HF causal LM) -> action_head."""

    def __init__(self, llm: nn.Module, lora_lr: float | None = None) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.vit = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16))
        self.projector = nn.Linear(16, HIDDEN)
        self.llm = llm
        self.action_head = nn.Linear(HIDDEN, ACTION)
        self.lora_lr = lora_lr

    def parts(self) -> dict[str, nn.Module]:
        return {"llm": self.llm, "vit": self.vit, "projector": self.projector,
                "action_head": self.action_head}

    def forward(self, input_ids, image, target):
        tokens = self.llm.get_input_embeddings()(input_ids)
        img = self.projector(self.vit(image)).unsqueeze(1).to(tokens.dtype)
        out = self.llm(inputs_embeds=torch.cat([img, tokens], 1), output_hidden_states=True)
        pred = self.action_head(out.hidden_states[-1][:, -1].float())
        return {"loss": nn.functional.mse_loss(pred, target), "pred": pred}

    def optimizer_param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        return lora_param_groups(self, lr, self.lora_lr, weight_decay)


def batch(n: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (n, 5), generator=g),
            "image": torch.randn(n, 6, generator=g), "target": torch.randn(n, ACTION, generator=g)}


def lora_policy(llama_dir, quant=None, lora_lr=None, detect=False, **lora_kw):
    quant = quant or QuantizationSettings()
    lora = LoraSettings(enable=True, **{"r": 4, "alpha": 8, "dropout": 0.0, **lora_kw})
    policy = TinyPolicy(load_llm(llama_dir, quant), lora_lr=lora_lr)
    targets = lora_target_modules(policy.parts(), lora.module, root=policy)
    quantized = bnb_quantization_config(quant) is not None
    return apply_lora(policy, lora, targets, None if detect else quantized, parts=policy.parts()), targets


# ---------------------------------------------------------------------------- quantization

@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_4bit_layers_have_requested_quant_type_and_double_quant(llama_dir, quant_type, double_quant):
    quant = QuantizationSettings(enable=True, bits=4, quant_type=quant_type, double_quant=double_quant)
    llm = load_llm(llama_dir, quant)
    q_proj = llm.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_type == quant_type
    assert q_proj.weight.quant_state.nested is double_quant
    assert q_proj.weight.dtype == torch.uint8  # packed 4-bit values
    assert not isinstance(llm.lm_head, bnb.nn.Linear4bit)  # transformers keeps the output layer


def test_8bit_layers_are_linear8bitlt(llama_dir):
    llm = load_llm(llama_dir, QuantizationSettings(enable=True, bits=8))
    assert isinstance(llm.model.layers[1].mlp.down_proj, bnb.nn.Linear8bitLt)
    assert llm.model.layers[1].mlp.down_proj.weight.dtype == torch.int8


def test_16_bits_loads_bf16_and_disabled_loads_default(llama_dir):
    on16 = QuantizationSettings(enable=True, bits=16)
    assert bnb_quantization_config(on16) is None and torch_dtype_for(on16) is torch.bfloat16
    assert load_llm(llama_dir, on16).model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    off = QuantizationSettings(enable=False, bits=4)
    assert bnb_quantization_config(off) is None and torch_dtype_for(off) is None
    assert load_llm(llama_dir, off).model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


# ---------------------------------------------------------------------------- targets

def test_part_names_select_only_that_parts_linears(llama_dir):
    policy = TinyPolicy(load_llm(llama_dir))
    llm_targets = lora_target_modules(policy.parts(), "llm", root=policy)
    assert llm_targets and all(t.startswith("llm.model.layers.") for t in llm_targets)
    assert "llm.lm_head" not in llm_targets
    assert len(llm_targets) == 2 * 7  # q,k,v,o + gate,up,down per layer
    assert lora_target_modules(policy.parts(), "vit, action_head", root=policy) == [
        "vit.0", "vit.2", "action_head"]


def test_patterns_suffix_and_regex(llama_dir):
    policy = TinyPolicy(load_llm(llama_dir))
    parts = policy.parts()
    assert lora_target_modules(parts, "q_proj", root=policy) == [
        "llm.model.layers.0.self_attn.q_proj", "llm.model.layers.1.self_attn.q_proj"]
    assert lora_target_modules(parts, r"llm\.model\.layers\.1\.self_attn\.(k|v)_proj", root=policy) == [
        "llm.model.layers.1.self_attn.k_proj", "llm.model.layers.1.self_attn.v_proj"]
    assert lora_target_modules(parts, "projector lm_head", root=policy) == ["projector", "llm.lm_head"]


def test_part_prefixes_come_from_the_root(llama_dir):
    """A part nested deeper in the root is named by its real path, not its part name."""
    inner = TinyPolicy(load_llm(llama_dir))
    root = nn.Module()
    root.backbone = inner
    targets = lora_target_modules({"vit": inner.vit}, "vit", root=root)
    assert targets == ["backbone.vit.0", "backbone.vit.2"]


@pytest.mark.parametrize("spec,hint", [("lmm", "llm"), ("action_heads", "action_head"), ("q_prj", "q_proj")])
def test_unknown_part_or_pattern_is_a_user_error_with_suggestion(llama_dir, spec, hint):
    policy = TinyPolicy(load_llm(llama_dir))
    with pytest.raises(UserError, match="lora.module") as err:
        lora_target_modules(policy.parts(), f"vit,{spec}", root=policy)
    assert f"`{hint}`" in str(err.value)


# ---------------------------------------------------------------------------- injection

def test_lora_settings_reach_peft_modules_and_only_targets_are_adapted(llama_dir):
    from peft.tuners.lora import LoraLayer

    policy, targets = lora_policy(llama_dir, r=3, alpha=12, dropout=0.25, bias="lora_only",
                                  module="llm", task_type="CAUSAL_LM")
    adapted = sorted(n for n, m in policy.named_modules() if isinstance(m, LoraLayer))
    assert adapted == sorted(targets)
    layer = dict(policy.named_modules())[targets[0]]
    assert layer.r["default"] == 3 and layer.lora_alpha["default"] == 12
    assert layer.scaling["default"] == pytest.approx(12 / 3)
    assert layer.lora_dropout["default"].p == 0.25
    cfg = policy.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias, cfg.task_type) == (
        3, 12, 0.25, "lora_only", "CAUSAL_LM")
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    # The LM's base weights are frozen; the vit/projector/action head keep training.
    assert not any(n.startswith("llm.") and "lora_" not in n for n in trainable)
    assert {"action_head.weight", "projector.weight", "vit.0.weight"} <= trainable


def test_frozen_parts_stay_frozen_and_bias_all_reaches_peft(llama_dir):
    policy = TinyPolicy(load_llm(llama_dir))
    for p in policy.vit.parameters():
        p.requires_grad = False  # e.g. model.freeze_vision_tower
    lora = LoraSettings(enable=True, module="action_head", r=2, alpha=4, bias="all")
    targets = lora_target_modules(policy.parts(), lora.module, root=policy)
    apply_lora(policy, lora, targets, quantized=False, parts=policy.parts())
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert "vit.0.weight" not in trainable
    assert "action_head.base_layer.weight" not in trainable  # adapted: base frozen
    assert "action_head.base_layer.bias" in trainable and "vit.0.bias" in trainable  # bias="all"
    assert "projector.weight" in trainable  # untouched part keeps training


def test_task_type_gives_peft_task_model_for_hf_root(llama_dir):
    from peft import PeftModelForCausalLM

    llm = load_llm(llama_dir)
    lora = LoraSettings(enable=True, r=2, alpha=4, task_type="CAUSAL_LM")
    targets = lora_target_modules({"llm": llm}, "q_proj", root=llm)
    wrapped = apply_lora(llm, lora, targets, quantized=False)
    assert isinstance(wrapped, PeftModelForCausalLM) and has_lora(wrapped)


def test_lora_lr_is_a_param_group_lr_in_the_trainer_optimizer(llama_dir, tmp_path):
    from transformers import TrainingArguments

    from ilstudio.training.trainer import PolicyTrainer

    policy, _ = lora_policy(llama_dir, lora_lr=3e-3)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.01,
                             report_to=[], use_cpu=True)
    opt = PolicyTrainer(model=policy, args=args).create_optimizer()
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["lora"]["lr"] == 3e-3 and by_name["base"]["lr"] == 1e-4
    lora_ids = {id(p) for n, p in policy.named_parameters() if "lora_" in n}
    assert {id(p) for p in by_name["lora"]["params"]} == lora_ids
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen = {id(p) for p in policy.parameters() if not p.requires_grad}
    assert in_groups == {id(p) for p in policy.parameters() if p.requires_grad}
    assert not in_groups & frozen
    # lora.lr = None: LoRA parameters follow --learning_rate.
    groups = lora_param_groups(policy, 1e-4, None, 0.0)
    assert {g["lr"] for g in groups} == {1e-4}


# ---------------------------------------------------------------------------- QLoRA training

class ListDataset(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        b = batch(n, seed=3)
        self.rows = [{k: v[i] for k, v in b.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_qlora_trains_with_frozen_4bit_weights_and_saves_a_rebuildable_run(llama_dir, tmp_path):
    from transformers import TrainingArguments, default_data_collator

    from ilstudio.training.trainer import PolicyTrainer

    quant = QuantizationSettings(enable=True, bits=4, quant_type="nf4", double_quant=True)
    policy, targets = lora_policy(llama_dir, quant=quant, lora_lr=1e-2)
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if "base_layer" in n}
    assert base and all(p.dtype == torch.uint8 for p in base.values())
    # The unquantized frozen weights stay in the bf16 they were loaded in (torch_dtype_for;
    # peft's prepare_model_for_kbit_training would upcast them); what trains is fp32.
    params = dict(policy.named_parameters())
    for n in ("llm.model.embed_tokens.weight", "llm.model.norm.weight", "llm.lm_head.weight"):
        assert params[n].dtype == torch.bfloat16 and not params[n].requires_grad, n
    assert all(p.dtype == torch.float32 for p in params.values() if p.requires_grad)
    probe = batch(4, seed=9)
    policy.eval()
    with torch.no_grad():
        loss_before = policy(**batch(16, seed=3))["loss"].item()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=12, learning_rate=1e-2,
                             per_device_train_batch_size=16, save_steps=12, logging_steps=4,
                             report_to=[], use_cpu=True, remove_unused_columns=False,
                             dataloader_pin_memory=False, seed=0)
    trainer = PolicyTrainer(model=policy, args=args, train_dataset=ListDataset(16),
                            data_collator=default_data_collator)
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))
    policy.eval()
    with torch.no_grad():
        loss_after = policy(**batch(16, seed=3))["loss"].item()
        expected = policy(**probe)["pred"]
    assert loss_after < 0.7 * loss_before
    for n, p in policy.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"4-bit base weight {n} changed"
    run = tmp_path / "run"
    for d in (run, run / "checkpoint-12"):
        for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, NON_LORA_TRAINABLES, "model.safetensors"):
            assert (d / f).is_file(), f"{d.name}/{f} missing"
    # Evaluation rebuilds: base (quantized, from model_name_or_path) + adapter + trainables.
    fresh = TinyPolicy(load_llm(llama_dir, quant))
    fresh = load_adapter_run(fresh, run)
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(**probe)["pred"], expected, atol=1e-6)


# ---------------------------------------------------------------------------- weight_path

def test_weight_path_round_trip_and_mismatch(llama_dir, tmp_path):
    policy, _ = lora_policy(llama_dir, module="llm,action_head")
    with torch.no_grad():  # make the adapters non-trivial (lora_B starts at zero)
        for n, p in policy.named_parameters():
            if "lora_" in n or n.startswith("projector"):
                p.add_(0.1 * torch.randn_like(p))
    save_adapter(policy, tmp_path / "adapter")
    probe = batch(4, seed=5)
    policy.eval()
    with torch.no_grad():
        expected = policy(**probe)["pred"]

    resumed, _ = lora_policy(llama_dir, module="llm,action_head", weight_path=str(tmp_path / "adapter"))
    resumed.eval()
    with torch.no_grad():
        assert torch.allclose(resumed(**probe)["pred"], expected, atol=1e-6)
    plain, _ = lora_policy(llama_dir, module="llm,action_head")
    plain.eval()
    with torch.no_grad():
        assert not torch.allclose(plain(**probe)["pred"], expected, atol=1e-4)

    with pytest.raises(UserError, match="lora.weight_path"):  # another rank
        lora_policy(llama_dir, module="llm,action_head", r=8, weight_path=str(tmp_path / "adapter"))
    with pytest.raises(UserError, match="lora.weight_path"):  # other layers
        lora_policy(llama_dir, module="q_proj", weight_path=str(tmp_path / "adapter"))
    with pytest.raises(UserError, match="lora.weight_path"):
        lora_policy(llama_dir, weight_path=str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------- validation

def test_quantization_without_lora_is_refused_at_validation():
    quant = QuantizationSettings(enable=True, bits=4)
    with pytest.raises(UserError, match=r"lora.enable = True") as err:
        check_quantization_combo(LoraSettings(enable=False), quant, where)
    assert "test.gin:quantization.enable" in str(err.value)
    check_quantization_combo(LoraSettings(enable=True), quant, where)  # QLoRA: fine
    check_quantization_combo(LoraSettings(enable=False), QuantizationSettings(enable=True, bits=16), where)


def test_values_switched_off_are_inert_not_refused():
    """Settings whose own switch is off are kept and warned about (resolve), never refused."""
    from ilstudio.config.settings import inert_values

    q8 = QuantizationSettings(enable=True, bits=8, quant_type="fp4")
    check_quantization_combo(LoraSettings(enable=True), q8, where)
    assert inert_values(LoraSettings(enable=True), q8) == {
        "quantization.quant_type": "they only apply to 4-bit quantization and quantization.bits = 8"}
    off = QuantizationSettings(enable=False, bits=8)
    check_quantization_combo(LoraSettings(), off, where)
    check_lora_settings(LoraSettings(enable=False, r=16), where)
    assert inert_values(LoraSettings(enable=False, r=16), off) == {
        "lora.r": "lora.enable is False", "quantization.bits": "quantization.enable is False"}
    assert inert_values(LoraSettings(enable=True, r=16), QuantizationSettings()) == {}


def test_transformers_refuses_training_a_quantized_model_without_adapters(llama_dir, tmp_path):
    """Why the check above exists: without it the run fails late, inside the Trainer."""
    from transformers import Trainer, TrainingArguments

    llm = load_llm(llama_dir, QuantizationSettings(enable=True, bits=4))
    with pytest.raises(ValueError, match="quantized"):
        Trainer(model=llm, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))


def test_lora_settings_checks(tmp_path):
    with pytest.raises(UserError, match="lora.task_type.*did you mean `CAUSAL_LM`"):
        check_lora_settings(LoraSettings(enable=True, task_type="CASUAL_LM"), where)
    with pytest.raises(UserError, match="lora.weight_path.*no such file"):
        check_lora_settings(LoraSettings(enable=True, weight_path=str(tmp_path / "x")), where)
    check_lora_settings(LoraSettings(enable=True), where)
    check_lora_settings(LoraSettings(), where)
    assert dataclasses.replace(LoraSettings(), enable=True).task_type == "CAUSAL_LM"
    from peft import TaskType

    from ilstudio.models.lora import _peft_task_types

    assert _peft_task_types() == [t.value for t in TaskType]  # the copy kept for cheap validation


def test_qlora_checkpoint_resumes_bit_identically(llama_dir, other_llama_dir, tmp_path):
    """The full-state checkpoint resumes a QLoRA run (adapter files are extra), even into a
    policy built on other base weights: the 4-bit weights come back with their quant state."""
    from transformers import TrainingArguments, default_data_collator

    from ilstudio.training.trainer import PolicyTrainer

    def run(resume=None):
        base = other_llama_dir if resume else llama_dir
        policy, _ = lora_policy(base, quant=QuantizationSettings(enable=True, bits=4), lora_lr=1e-2,
                                detect=True)  # apply_lora(quantized=None) finds the 4-bit LM
        args = TrainingArguments(output_dir=str(tmp_path / "r"), max_steps=4, learning_rate=1e-2,
                                 per_device_train_batch_size=4, save_steps=2, report_to=[],
                                 use_cpu=True, remove_unused_columns=False,
                                 dataloader_pin_memory=False, seed=0)
        PolicyTrainer(model=policy, args=args, train_dataset=ListDataset(16),
                      data_collator=default_data_collator).train(resume_from_checkpoint=resume)
        policy.eval()
        with torch.no_grad():
            pred = policy(**batch(4, seed=11))["pred"]
        return {"pred": pred, **{n: p.detach().clone() for n, p in policy.named_parameters()
                                 if p.requires_grad}}

    straight = run()
    resumed = run(resume=str(tmp_path / "r" / "checkpoint-2"))
    assert straight.keys() == resumed.keys() and any("lora_" in k for k in straight)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_adapter_files_carry_the_ema_weights_like_model_safetensors(llama_dir, tmp_path):
    """With model.using_ema the adapter files hold what model.safetensors holds (the EMA)."""
    from safetensors.torch import load_file
    from transformers import TrainingArguments, default_data_collator

    from ilstudio.training.trainer import PolicyTrainer

    policy, _ = lora_policy(llama_dir, lora_lr=1e-2)
    args = TrainingArguments(output_dir=str(tmp_path / "r"), max_steps=3, learning_rate=1e-2,
                             per_device_train_batch_size=8, save_strategy="no", report_to=[],
                             use_cpu=True, remove_unused_columns=False, dataloader_pin_memory=False)
    trainer = PolicyTrainer(model=policy, args=args, train_dataset=ListDataset(16),
                            data_collator=default_data_collator, ema_decay=0.9)
    trainer.train()
    trainer.save_model(str(tmp_path / "r"))
    full = load_file(str(tmp_path / "r" / "model.safetensors"))
    adapter = load_file(str(tmp_path / "r" / ADAPTER_WEIGHTS))
    trainables = load_file(str(tmp_path / "r" / NON_LORA_TRAINABLES))
    live = dict(policy.named_parameters())
    assert adapter and trainables
    for key, value in adapter.items():
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(value, full[name]) and not torch.equal(value, live[name].detach())
    for key, value in trainables.items():
        assert torch.equal(value, full[key])


@pytest.mark.parametrize("bits", [4, 8])
def test_full_state_dict_of_a_quantized_model_loads_into_another_base(llama_dir, other_llama_dir, bits):
    """load_state_with_quantized: what eval/load_pretrain need for a QLoRA model.safetensors."""
    from ilstudio.models.quantization import load_state_with_quantized

    quant = QuantizationSettings(enable=True, bits=bits)
    trained, other = load_llm(llama_dir, quant), load_llm(other_llama_dir, quant)
    ids = batch(2)["input_ids"]
    with torch.no_grad():
        assert not torch.equal(trained(ids).logits, other(ids).logits)
        missing, unexpected = load_state_with_quantized(other, trained.state_dict())
        assert (missing, unexpected) == ([], [])
        assert torch.equal(trained(ids).logits, other(ids).logits)


def test_strict_copy_of_a_qlora_state_dict_works_after_restore(llama_dir, other_llama_dir):
    """What eval/load_pretrain do (strict shape check, then copy_) loads a QLoRA policy's
    model.safetensors once restore_quantized_weights rebuilt the 4-bit weights."""
    from ilstudio.models.quantization import restore_quantized_weights

    quant = QuantizationSettings(enable=True, bits=4, quant_type="fp4", double_quant=True)
    trained, _ = lora_policy(llama_dir, quant=quant)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    saved = {k: v.clone() for k, v in trained.state_dict().items()}
    fresh, _ = lora_policy(other_llama_dir, quant=quant)
    assert restore_quantized_weights(fresh, saved)
    own = fresh.state_dict()
    assert set(own) == set(saved) and all(own[k].shape == saved[k].shape for k in saved)
    with torch.no_grad():
        for k, v in saved.items():
            own[k].copy_(v)
    trained.eval()
    fresh.eval()
    probe = batch(4, seed=2)
    with torch.no_grad():
        assert torch.equal(trained(**probe)["pred"], fresh(**probe)["pred"])


def test_yaml_lora_and_quantization_keys_take_effect(llama_dir, tmp_path):
    """The older YAML keys (lora_*, use_quantization, bits, ...) reach bitsandbytes and peft."""
    import gin

    from ilstudio.config import load_training_config
    from ilstudio.config import settings as S

    path = tmp_path / "train.yaml"
    path.write_text("lora_enable: true\nlora_module: q_proj\nlora_r: 4\nlora_alpha: 12\n"
                    "lora_dropout: 0.2\nlora_bias: lora_only\nlora_lr: 3e-3\n"
                    "use_quantization: true\nbits: 4\nquant_type: fp4\ndouble_quant: false\n")
    cfg = load_training_config(path)
    gin.clear_config()
    try:
        for key, value in cfg.stable.items():
            gin.bind_parameter(key, value)
        lora, quant = S.LoraSettings(), S.QuantizationSettings()
    finally:
        gin.clear_config()
    check_lora_settings(lora, where)
    check_quantization_combo(lora, quant, where)
    policy = TinyPolicy(load_llm(llama_dir, quant), lora_lr=lora.lr)
    targets = lora_target_modules(policy.parts(), lora.module, root=policy)
    apply_lora(policy, lora, targets, quantized=True, parts=policy.parts())
    layer = dict(policy.named_modules())["llm.model.layers.0.self_attn.q_proj"]
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert layer.base_layer.weight.quant_type == "fp4" and not layer.base_layer.weight.quant_state.nested
    assert (layer.r["default"], layer.lora_alpha["default"], layer.lora_dropout["default"].p) == (4, 12, 0.2)
    assert policy.peft_config["default"].bias == "lora_only"
    assert {g["name"]: g["lr"] for g in policy.optimizer_param_groups(1e-4, 0.0)}["lora"] == 3e-3


def test_8bit_lora_trains_with_frozen_int8_weights(llama_dir):
    policy, _ = lora_policy(llama_dir, quant=QuantizationSettings(enable=True, bits=8), lora_lr=1e-2)
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if "base_layer" in n}
    assert base and all(p.dtype == torch.int8 for p in base.values())
    opt = torch.optim.AdamW([g for g in policy.optimizer_param_groups(1e-2, 0.0)], lr=1e-2)
    data = batch(16, seed=3)
    losses = []
    for _ in range(12):
        loss = policy(**data)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(p, base[n]) for n, p in policy.named_parameters() if n in base)
