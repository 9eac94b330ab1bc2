"""Each precedence rule of README's "Precedence" section, resolved in-process (real gin, absl)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import small_policy

from ilstudio.errors import UserError
from ilstudio.resolve import resolve_argv


@pytest.fixture
def cfg_files(tmp_path, tiny_data):
    def write(name: str, text: str) -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return write


def base(tiny_data, *extra: str) -> list[str]:
    return ["--task_name=tiny_synthetic", f"--gin_bindings=task.dataset_dir = '{tiny_data}'",
            *small_policy(extra), *extra]


# ---- hyperparameters: default < YAML < command-line flag -------------------------------

def test_hyper_default(tiny_data):
    r = resolve_argv(base(tiny_data))
    assert r.hyper["learning_rate"] == 1e-4 and r.hyper_source["learning_rate"] == "default"


def test_hyper_yaml_beats_default(tiny_data, cfg_files):
    y = cfg_files("h.yaml", "learning_rate: 3e-5\nmax_steps: 7\n")
    r = resolve_argv(base(tiny_data, f"--training_config={y}"))
    assert r.hyper["learning_rate"] == 3e-5 and r.hyper["max_steps"] == 7
    assert r.hyper_source["learning_rate"].startswith(f"YAML {y}:1")


def test_hyper_flag_beats_yaml_and_log_says_so(tiny_data, cfg_files, caplog):
    y = cfg_files("h.yaml", "learning_rate: 3e-5\n")
    with caplog.at_level(logging.INFO):
        r = resolve_argv(base(tiny_data, f"--training_config={y}", "--learning_rate=0.01"))
    assert r.hyper["learning_rate"] == 0.01 and r.hyper_source["learning_rate"] == "flag --learning_rate"
    assert any("--learning_rate=0.01 on the command line overrides 3e-05" in m for m in caplog.messages)


def test_flag_equal_to_default_still_beats_yaml(tiny_data, cfg_files):
    """Given on the command line means given, even when it equals the built-in default."""
    y = cfg_files("h.yaml", "learning_rate: 3e-5\n")
    r = resolve_argv(base(tiny_data, f"--training_config={y}", "--learning_rate=0.0001"))
    assert r.hyper["learning_rate"] == 1e-4


# ---- stable: default < task gin < --gin_file in order < YAML < --gin_bindings in order ---

def test_stable_constructor_default(tiny_data):
    r = resolve_argv(base(tiny_data))
    assert r.policy.dropout == 0.0
    assert r.layers.provenance.source_of("mlp.dropout") == "default"


def test_task_gin_beats_constructor_default(tiny_data):
    r = resolve_argv(base(tiny_data))
    assert r.task.episode_len == 50  # TaskSettings default is 400
    assert r.layers.provenance.source_of("task.episode_len").endswith("tiny_synthetic.gin:10")


def test_gin_file_beats_task_gin(tiny_data, cfg_files):
    g = cfg_files("a.gin", "task.episode_len = 77\n")
    r = resolve_argv(base(tiny_data, f"--gin_file={g}"))
    assert r.task.episode_len == 77


def test_gin_files_apply_in_order(tiny_data, cfg_files, caplog):
    a = cfg_files("a.gin", "include 'gin_configs/mlp.gin'\nmlp.hidden_dim = 32\n")
    b = cfg_files("b.gin", "mlp.hidden_dim = 64\n")
    with caplog.at_level(logging.INFO):
        r = resolve_argv(base(tiny_data, f"--gin_file={a}", f"--gin_file={b}"))
    assert r.policy.hidden_dim == 64
    assert r.layers.provenance.source_of("mlp.hidden_dim") == f"{b}:1"
    assert any("mlp.hidden_dim = 64" in m and "overrides 32" in m for m in caplog.messages)
    r = resolve_argv(base(tiny_data, f"--gin_file={b}", f"--gin_file={a}"))
    assert r.policy.hidden_dim == 32


def test_yaml_stable_key_beats_gin_files(tiny_data, cfg_files):
    g = cfg_files("a.gin", "dataset.preload_data = False\n")
    y = cfg_files("s.yaml", "preload_data: true\n")
    r = resolve_argv(base(tiny_data, f"--gin_file={g}", f"--training_config={y}"))
    assert r.dataset.preload_data is True
    assert r.layers.provenance.source_of("dataset.preload_data").startswith(f"YAML {y}:1")


def test_gin_bindings_beat_yaml_and_apply_in_order(tiny_data, cfg_files):
    y = cfg_files("s.yaml", "preload_data: true\n")
    r = resolve_argv(base(tiny_data, f"--training_config={y}", "--gin_bindings=dataset.preload_data = False"))
    assert r.dataset.preload_data is False
    r = resolve_argv(base(tiny_data, "--gin_bindings=mlp.num_layers = 1", "--gin_bindings=mlp.num_layers = 2"))
    assert r.policy.num_layers == 2
    assert r.layers.provenance.source_of("mlp.num_layers").startswith("--gin_bindings[2]")


# ---- gin errors keep location and get suggestions ------------------------------------------

def test_hyperparameter_in_gin_file_points_to_the_flag(tiny_data, cfg_files):
    g = cfg_files("h.gin", "mlp.hidden_dim = 8\nlearning_rate = 1e-3\n")
    with pytest.raises(UserError) as e:
        resolve_argv(base(tiny_data, f"--gin_file={g}"))
    assert f"{g}:2" in str(e.value) and "--learning_rate" in str(e.value)


def test_hyperparameter_as_configurable_parameter_points_to_the_flag(tiny_data):
    with pytest.raises(UserError, match="use --max_steps="):
        resolve_argv(base(tiny_data, "--gin_bindings=model.max_steps = 10"))


def test_unknown_configurable_and_parameter_get_suggestions(tiny_data, cfg_files):
    g = cfg_files("t.gin", "mlp.hidden_dim = 8\n\nlroa.r = 4\n")
    with pytest.raises(UserError) as e:
        resolve_argv(base(tiny_data, f"--gin_file={g}"))
    assert "line 3" in str(e.value) and str(g) in str(e.value) and "Did you mean `lora`" in str(e.value)
    with pytest.raises(UserError, match="Did you mean `dataset.preload_data`"):
        resolve_argv(base(tiny_data, "--gin_bindings=dataset.preload_dat = True"))


def test_gin_type_errors_name_the_binding_and_its_source(tiny_data):
    with pytest.raises(UserError) as e:
        resolve_argv(base(tiny_data, "--gin_bindings=mlp.hidden_dim = 'wide'"))
    assert "mlp.hidden_dim" in str(e.value) and "--gin_bindings[1]" in str(e.value)


def test_unused_bindings_are_reported_with_their_source(tiny_data, cfg_files, caplog):
    g = cfg_files("u.gin", "include 'gin_configs/mlp.gin'\neval/mlp.hidden_dim = 8\nUNUSED = 3\n")
    with caplog.at_level(logging.WARNING):
        r = resolve_argv(base(tiny_data, f"--gin_file={g}"))
    unused = dict(r.unused)
    assert unused == {"eval/mlp.hidden_dim": f"{g}:2", "UNUSED": f"{g}:3"}
    assert any("eval/mlp.hidden_dim" in m and "never used" in m for m in caplog.messages)


def test_parameter_without_effect_on_policy_is_refused(tiny_data):
    with pytest.raises(UserError) as e:
        resolve_argv(base(tiny_data, "--gin_bindings=lora.enable = True"))
    assert "lora.enable = True" in str(e.value) and "no effect on policy 'mlp'" in str(e.value)


def test_values_switched_off_warn_once_and_are_kept(tiny_data, cfg_files, caplog):
    """IL-Studio files keep lora_r/bits beside lora_enable: false: one warning, no error."""
    y = cfg_files("s.yaml", "lora_enable: false\nlora_r: 16\nuse_quantization: false\nbits: 8\n")
    with caplog.at_level(logging.WARNING):
        r = resolve_argv(base(tiny_data, f"--training_config={y}"))
    assert r.lora.r == 16 and r.quantization.bits == 8
    warnings = [m for m in caplog.messages if "their switch is off" in m]
    assert len(warnings) == 1, caplog.messages
    assert f"lora.r = 16 (set in YAML {y}:2 (lora_r)): lora.enable is False" in warnings[0]
    assert f"quantization.bits = 8 (set in YAML {y}:4 (bits)): quantization.enable is False" in warnings[0]


def test_unknown_task_suggests_the_closest(tiny_data):
    with pytest.raises(UserError, match="did you mean `tiny_synthetic`"):
        resolve_argv(["--task_name=tiny_synthetik"])
