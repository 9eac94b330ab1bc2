"""Hostile files and flags that once broke README's promises, each class with its own cases.

YAML is data (it cannot choose a gin file to execute, nor hang the run by its size), gin
files that are not UTF-8 are user errors, two keys cannot set one parameter, and a
``--training_arg`` cannot set what a flag or the run owns. Every refusal is a UserError
naming the file/key/flag (exit code 2 for ``train.py``), and nothing is written.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import run_train, tiny_args

from ilstudio.errors import UserError
from ilstudio.resolve import resolve_argv


def refused(argv: list[str]) -> str:
    with pytest.raises(UserError) as e:
        resolve_argv(argv)
    return str(e.value)


# -- task_name is a name, not a path ---------------------------------------------------

@pytest.fixture
def evil_gin(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """x/evil.gin, reachable as task '../../x/evil' from a search path, importing a module
    that leaves a marker when imported."""
    (tmp_path / "gin_configs" / "tasks").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    marker = tmp_path / "imported"
    (tmp_path / "evilmod_issue10.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "x" / "evil.gin").write_text("import evilmod_issue10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path, marker


@pytest.mark.parametrize("name", ["../../x/evil", "../tasks/../../x/evil", "/etc/passwd", "a/b",
                                  "..", "tiny_synthetic/../../../x/evil", "", " tiny_synthetic"])
def test_task_name_from_yaml_or_flag_cannot_escape_the_task_folders(evil_gin, tmp_path, name):
    search, marker = evil_gin
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task_name: {name!r}\n")
    msg = refused([f"--gin_search_paths={search}", f"--training_config={cfg}"])
    assert "task_name" in msg and "not a path" in msg or "no gin_configs" in msg, msg
    assert str(cfg) in msg
    msg = refused([f"--gin_search_paths={search}", f"--task_name={name}"])
    assert "--task_name" in msg
    assert not marker.exists(), "the gin file a YAML/flag named was executed"


# -- size of anything parsed from YAML -------------------------------------------------

def billion_laughs(levels: int = 9) -> str:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    prev = "a"
    for name in "bcdefghijk"[:levels - 1]:
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
        prev = name
    return text + f"lora_module: *{prev}\n"


@pytest.mark.parametrize("text,named", [
    (billion_laughs(), "expands to more than 10000 values"),
    ("lora_module: &x [*x]\n", "alias refers to itself"),
    ("lr_scheduler_kwargs: &x {a: *x}\n", "alias refers to itself"),
    ("report_to: " + "x" * (2 << 20) + "\n", "more than the 1048576 allowed"),
    ("lora_r: [" + ", ".join(["1"] * 20000) + "]\n", "holds more than 10000 values"),
    ("".join(f"key{i}: {i}\n" for i in range(20000)), "holds more than 10000 values"),
    ("lr_scheduler_kwargs: " + "[" * 3000 + "]" * 3000 + "\n", "nests deeper than 32 levels"),
])
def test_yaml_size_is_bounded_and_refused_fast(tiny_data, tmp_path, text, named):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    start = time.monotonic()
    msg = refused([*tiny_args(tiny_data, tmp_path / "o"), f"--training_config={cfg}"])
    assert time.monotonic() - start < 10
    assert named in msg and str(cfg) in msg
    assert len(msg) < 2000  # no repr of the expanded value


def test_training_arg_values_are_bounded_like_yaml(tiny_data, tmp_path):
    from ilstudio.config.yaml_adapter import training_args_fields

    training_args_fields()  # imports transformers once: not what is timed here
    bomb = "{" + billion_laughs().replace("\n", ", ") + "}"
    start = time.monotonic()
    msg = refused([*tiny_args(tiny_data, tmp_path / "o"), f"--training_arg=lr_scheduler_kwargs={bomb}"])
    assert time.monotonic() - start < 10
    assert "--training_arg=lr_scheduler_kwargs=" in msg and "expands to more than" in msg
    assert len(msg) < 1000


def test_a_wrong_value_from_a_large_yaml_is_shown_bounded(tiny_data, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_r: [" + ", ".join(["1"] * 5000) + "]\n")
    msg = refused([*tiny_args(tiny_data, tmp_path / "o"), f"--training_config={cfg}"])
    assert "lora_r" in msg and "..." in msg and len(msg) < 1000


# -- two keys, one parameter -----------------------------------------------------------

@pytest.mark.parametrize("text,named", [
    ("eval_strategy: steps\nevaluation_strategy: 'no'\n", "`evaluation_strategy` sets the same "
     "parameter as `eval_strategy` (line 1) to a different value ('no' vs 'steps')"),
    ("evaluation_strategy: epoch\neval_strategy: steps\n", "`eval_strategy` sets the same "
     "parameter as `evaluation_strategy` (line 1) to a different value"),
])
def test_two_yaml_keys_for_one_parameter_are_refused(tiny_data, tmp_path, text, named):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    msg = refused([*tiny_args(tiny_data, tmp_path / "o"), f"--training_config={cfg}"])
    assert named in msg and f"{cfg}:2" in msg


def test_two_yaml_keys_with_one_value_warn(tmp_path):
    """Files written across transformers' rename carry both spellings with one value."""
    from ilstudio.config.yaml_adapter import load_training_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval_strategy: steps\nevaluation_strategy: steps\n")
    loaded = load_training_config(cfg)
    assert loaded.hyper["eval_strategy"] == "steps"
    assert any("repeats `eval_strategy` (line 1) with the same value" in w for w in loaded.warnings)


# -- non-UTF-8 files -------------------------------------------------------------------

def test_non_utf8_gin_file_include_and_yaml_are_user_errors(tiny_data, tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_bytes(b"# caf\xe9 (latin-1)\nmlp.hidden_dim = 16\n")
    msg = refused([*tiny_args(tiny_data, tmp_path / "o"), f"--gin_file={bad}"])
    assert f"{bad}:1: gin file is not UTF-8" in msg
    outer = tmp_path / "outer.gin"
    outer.write_text(f"include '{bad}'\n")
    msg = refused([*tiny_args(tiny_data, tmp_path / "o"), f"--gin_file={outer}"])
    assert f"{bad}:1: gin include is not UTF-8" in msg
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"lora_module: \xff\xfe\n")
    msg = refused([*tiny_args(tiny_data, tmp_path / "o"), f"--training_config={cfg}"])
    assert f"{cfg}:1: training config is not UTF-8" in msg


def test_non_utf8_gin_through_train_py(tiny_data, tmp_path):
    outer, bad = tmp_path / "outer.gin", tmp_path / "inc.gin"
    bad.write_bytes(b"mlp.hidden_dim = 16  # \x80\x81\n")
    outer.write_text(f"include '{bad}'\n")
    out = tmp_path / "out"
    r = run_train(*tiny_args(tiny_data, out, f"--gin_file={outer}", "--dry_run"), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{bad}:1: gin include is not UTF-8" in r.stderr
    assert not out.exists()


# -- what a flag or the run owns -------------------------------------------------------

@pytest.mark.parametrize("entry,pointer", [
    ("output_dir=OTHER", "use --output_dir"),
    ("learning_rate=0.5", "use --learning_rate"),
    ("resume_from_checkpoint=/some/checkpoint-5", "use --resume_from_checkpoint"),
    ("overwrite_output_dir=true", "use --overwrite_output_dir"),
    ("per_device_train_batch_size=2", "use --per_device_train_batch_size"),
    ("seed=3", "use --seed"),
    ("max_steps=3", "use --max_steps"),
    ("eval_strategy=steps", "use --eval_strategy"),
    ("evaluation_strategy=steps", "use --eval_strategy"),
    ("gradient_checkpointing=true", "use --gradient_checkpointing"),
    ("activation_checkpointing=true", "use --gradient_checkpointing"),
    ("warmup_ratio=0.1", "use --warmup_ratio"),
    ("logging_dir=/tmp/x", "use --logging_dir"),
    ("local_rank=1", "set by the launcher"),
])
def test_training_arg_cannot_set_what_a_flag_or_the_run_owns(tiny_data, tmp_path, entry, pointer):
    msg = refused([*tiny_args(tiny_data, tmp_path / "o"), f"--training_arg={entry}"])
    assert f"--training_arg={entry}" in msg and pointer in msg


def test_yaml_pass_through_cannot_set_what_a_flag_owns(tiny_data, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("activation_checkpointing: true\n")
    msg = refused([*tiny_args(tiny_data, tmp_path / "o"), f"--training_config={cfg}"])
    assert f"{cfg}:1: activation_checkpointing" in msg and "the `gradient_checkpointing` key" in msg


def test_owned_training_arg_and_empty_output_dir_through_train_py(tiny_data, tmp_path):
    out = tmp_path / "out"
    r = run_train(*tiny_args(tiny_data, out, f"--training_arg=output_dir={tmp_path / 'other'}",
                             "--max_steps=1"), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "use --output_dir" in r.stderr
    assert not out.exists() and not (tmp_path / "other").exists()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for empty in ("--output_dir=", "--output_dir= "):
        r = run_train(*tiny_args(tiny_data, out, empty, "--max_steps=1"), cwd=cwd,
                      timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "--output_dir is empty" in r.stderr
        assert not list(cwd.iterdir()), "run files were written into the current directory"
