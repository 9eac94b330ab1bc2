"""The older YAML files: translated, typed, validated, and never executed."""

from __future__ import annotations

from pathlib import Path

import gin
import pytest
from conftest import COMPAT, FIXTURES, REPO, needs_shared, shared_marks

from ilstudio.config import create_training_arguments, load_training_config
from ilstudio.config import settings as S
from ilstudio.config.declare import all_params
from ilstudio.config.yaml_adapter import stable_keys
from ilstudio.errors import UserError
from ilstudio.tools.yaml_to_gin import convert as yaml_to_gin

OURS = [REPO / "configs" / "training" / "default.yaml", FIXTURES / "yaml" / "short_debug.yaml"]
ACCEPTED = [*OURS, *(pytest.param(COMPAT / name, marks=shared_marks(COMPAT), id=f"compat-{name}")
                     for name in ("default.yaml", "debug.yaml", "mlp.yaml", "openvla.yaml", "smolvla.yaml"))]
FOREIGN = FIXTURES / "yaml" / "foreign_keys.yaml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", ACCEPTED)
def test_documented_format_files_load_with_every_value(path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    cfg = load_training_config(path)
    for key, value in raw.items():
        got = cfg[key]
        if key in ("adam_epsilon", "learning_rate"):
            assert isinstance(got, float) and got == float(value), key
        elif key == "resume_from_checkpoint":
            assert got == "true"
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert got == value and isinstance(got, (int, float)), key
        else:
            assert got == value, key
    assert cfg.stable == {"dataset.preload_data": False}


def test_yaml_1_1_number_strings_become_floats():
    cfg = load_training_config(FIXTURES / "yaml" / "short_debug.yaml")
    assert cfg.hyper["learning_rate"] == 3e-5 and cfg.hyper["adam_epsilon"] == 1e-8


@needs_shared(COMPAT)
def test_yaml_1_1_number_strings_become_floats_in_il_studio_files():
    cfg = load_training_config(COMPAT / "mlp.yaml")
    assert cfg.hyper["learning_rate"] == 3e-5 and cfg.hyper["adam_epsilon"] == 1e-8


def test_create_training_arguments_gives_real_training_arguments(tmp_path):
    from transformers import TrainingArguments

    from ilstudio.config import HyperArguments

    args = create_training_arguments(FIXTURES / "yaml" / "short_debug.yaml",
                                     HyperArguments(output_dir=str(tmp_path), learning_rate=0.01))
    assert isinstance(args, TrainingArguments)
    assert args.learning_rate == 0.01  # hyper_args given explicitly win over YAML's 3e-5
    assert args.adam_epsilon == 1e-8 and args.adam_beta1 == 0.95 and args.save_total_limit == 50
    assert args.max_steps == 1000 and args.lr_scheduler_type.value == "constant"
    assert args.report_to == ["tensorboard"] and args.output_dir == str(tmp_path)


def test_foreign_file_reports_every_unknown_key_at_once():
    with pytest.raises(UserError) as e:
        load_training_config(FOREIGN)
    msg = str(e.value)
    for key in ("trainer_flavour", "sequence_length", "augment_images", "wandb_group", "patience",
                "token_bins", "fusion_blocks"):
        assert key in msg
    assert "9 unknown key(s)" in msg
    assert "freeze_vision_tower" in msg  # freeze_visual_tower's suggestion
    assert "task.camera_names" in msg  # a gin-only parameter is pointed to
    assert "--yaml_unknown_keys=warn" in msg
    for key in ("gradient_accumulation_steps", "max_grad_norm", "fp16", "gradient_checkpointing",
                "eval_strategy", "dataloader_drop_last", "eval_delay"):
        assert f": {key}\n" not in msg and not msg.endswith(f": {key}")


def test_foreign_file_with_warn_understands_training_arguments_keys():
    cfg = load_training_config(FOREIGN, unknown_keys="warn")
    assert cfg.hyper["gradient_accumulation_steps"] == 4 and cfg.hyper["max_grad_norm"] == 0.5
    assert cfg.hyper["fp16"] is True and cfg.hyper["bf16"] is False
    assert cfg.hyper["gradient_checkpointing"] is True and cfg.hyper["eval_strategy"] == "steps"
    assert cfg.hyper["learning_rate"] == 2e-4
    assert cfg.training_args == {"dataloader_drop_last": True, "eval_delay": 0}
    assert cfg.stable == {"lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.1,
                          "quantization.enable": False}
    assert any("evaluation_strategy" in w for w in cfg.warnings)
    assert any("9 unknown" in w for w in cfg.warnings)


@needs_shared(COMPAT)
def test_openvla_finetune_reports_every_unknown_key_at_once():
    with pytest.raises(UserError) as e:
        load_training_config(COMPAT / "openvla_finetune.yaml")
    msg = str(e.value)
    for key in ("training_mode", "fusion_layers", "wandb_project", "max_length", "action_bins",
                "early_stopping_patience", "image_augmentation", "debug_mode"):
        assert key in msg
    assert "28 unknown key(s)" in msg
    assert "freeze_vision_tower" in msg  # vision_backbone_freeze's suggestion
    assert "task.camera_names" in msg  # a gin-only parameter is pointed to
    assert "--yaml_unknown_keys=warn" in msg
    # Keys that are TrainingArguments fields are understood, not reported.
    for key in ("gradient_accumulation_steps", "max_grad_norm", "fp16", "gradient_checkpointing",
                "eval_strategy", "dataloader_drop_last", "fp16_full_eval"):
        assert f": {key}\n" not in msg and not msg.endswith(f": {key}")


@needs_shared(COMPAT)
def test_openvla_finetune_with_warn_understands_training_arguments_keys():
    cfg = load_training_config(COMPAT / "openvla_finetune.yaml", unknown_keys="warn")
    assert cfg.hyper["gradient_accumulation_steps"] == 2
    assert cfg.hyper["max_grad_norm"] == 1.0
    assert cfg.hyper["fp16"] is True and cfg.hyper["bf16"] is False
    assert cfg.hyper["gradient_checkpointing"] is True
    assert cfg.hyper["eval_strategy"] == "steps"
    assert cfg.hyper["learning_rate"] == 5e-4
    assert cfg.training_args == {"fp16_full_eval": False, "dataloader_drop_last": True,
                                 "eval_accumulation_steps": 1, "eval_delay": 0}
    assert cfg.stable == {"lora.r": 32, "lora.alpha": 64, "lora.dropout": 0.1,
                          "quantization.enable": False}
    assert any("evaluation_strategy" in w for w in cfg.warnings)
    assert any("28 unknown" in w for w in cfg.warnings)


NON_DEFAULT = {bool: lambda d: not d, int: lambda d: (d or 1) * 2, float: lambda d: (d or 0.5) * 3,
               str: lambda d: (d or "x") + "_b"}


def test_every_documented_stable_key_binds_its_constructor(tmp_path):
    """YAML key -> gin binding -> the configurable receives the value, for all 33 keys."""
    values = {}
    for info in all_params():
        if not info.yaml_key:
            continue
        if info.choices:
            values[info.yaml_key] = next(c for c in info.choices if c != info.default)
        elif info.name in ("lr",):
            values[info.yaml_key] = 3e-4
        elif info.name in ("load_pretrain", "cache_dir", "weight_path"):
            values[info.yaml_key] = f"/tmp/{info.name}"
        else:
            base = [t for t in (bool, int, float, str) if t == info.type or
                    (info.type is not bool and t in getattr(info.type, "__args__", ()))]
            values[info.yaml_key] = NON_DEFAULT[base[0]](info.default)
    import yaml

    cfg = load_training_config(write(tmp_path, yaml.safe_dump(values)))
    assert len(cfg.stable) == 33
    gin.clear_config()
    for key, value in cfg.stable.items():
        gin.bind_parameter(key, value)
    built = {"dataset": S.DatasetSettings(), "model": S.ModelSettings(), "lora": S.LoraSettings(),
             "quantization": S.QuantizationSettings()}
    gin.clear_config()
    for yaml_key, value in values.items():
        info = stable_keys()[yaml_key]
        assert getattr(built[info.configurable], info.name) == value, yaml_key
        assert value != info.default


@pytest.mark.parametrize(("text", "key", "expected"), [
    ("lora_r: '16'", "lora.r", 16),
    ("lora_dropout: 1e-1", "lora.dropout", 0.1),
    ("lora_enable: 'true'", "lora.enable", True),
    ("bits: 8", "quantization.bits", 8),
    ("lora_module: [llm, vit]", "lora.module", "llm,vit"),
    ("load_pretrain: null", "model.load_pretrain", None),
])
def test_values_are_converted_to_declared_types(tmp_path, text, key, expected):
    got = load_training_config(write(tmp_path, text)).stable[key]
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(("text", "needle"), [
    ("lora_r: sixteen", "lora_r: expected an integer, got 'sixteen'"),
    ("lora_r: 2.5", "expected an integer"),
    ("preload_data: maybe", "preload_data: expected true or false"),
    ("bits: 3", "bits: expected one of 4, 8, 16"),
    ("quant_type: nf8", "expected one of 'nf4', 'fp4'"),
    ("learning_rate: fast", "learning_rate: expected a number"),
    ("max_steps: [1, 2]", "max_steps: expected an integer"),
    ("logging_strategy: sometimes", "expected one of no, steps, epoch"),
    ("lora_rr: 8", "did you mean `lora_r`"),
    ("- a\n- b", "expected a flat mapping"),
    ("lora_r: 8\nlora_r: 9", "key `lora_r` is given twice"),
    ("a: [", "not valid YAML"),
])
def test_bad_values_are_user_errors_naming_the_key(tmp_path, text, needle):
    with pytest.raises(UserError) as e:
        load_training_config(write(tmp_path, text))
    assert needle in str(e.value)
    assert "cfg.yaml" in str(e.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_training_config(tmp_path / "nope.yaml")


def test_yaml_strings_cannot_inject_gin(tmp_path):
    evil = "llm'\nlora.r = 7\nimport os\n@os.system"
    cfg = load_training_config(write(tmp_path, f"lora_module: {evil!r}\nlora_r: 4"))
    gin.clear_config()
    for key, value in cfg.stable.items():
        gin.bind_parameter(key, value)
    lora = S.LoraSettings()
    gin.clear_config()
    assert lora.module == evil and lora.r == 4


def test_yaml_to_gin_writes_equivalent_gin_and_flags(tmp_path):
    src = write(tmp_path, "lora_r: 8\nuse_quantization: true\nbits: 8\npreload_data: true\n"
                          "learning_rate: 3e-5\nresume_from_checkpoint: true\ndataloader_drop_last: true\n")
    gin_text, flag_text = yaml_to_gin(str(src))
    gin.clear_config()
    gin.parse_config(gin_text)
    assert S.LoraSettings().r == 8 and S.QuantizationSettings().bits == 8
    assert S.QuantizationSettings().enable is True and S.DatasetSettings().preload_data is True
    gin.clear_config()
    lines = flag_text.splitlines()
    assert "--learning_rate=3e-05" in lines and "--resume_from_checkpoint=true" in lines
    assert "--training_arg=dataloader_drop_last=true" in lines


def test_yaml_to_gin_cli_writes_files(tmp_path):
    import subprocess
    import sys

    src = write(tmp_path, "lora_r: 8\nlearning_rate: 0.001\n")
    out = tmp_path / "migrated.gin"
    r = subprocess.run([sys.executable, "-m", "ilstudio.tools.yaml_to_gin", str(src), "--output", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "lora.r = 8" in out.read_text()
    assert "--learning_rate=0.001" in (tmp_path / "migrated.flags").read_text()
    bad = subprocess.run([sys.executable, "-m", "ilstudio.tools.yaml_to_gin", str(FOREIGN)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "trainer_flavour" in bad.stderr
