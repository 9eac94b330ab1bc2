"""train.py as a user runs it: errors, dry run, explain, dumps, training, rerun, resume."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import COMPAT, FIXTURES, needs_shared, run_train, tiny_args


def assert_user_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for n in needles:
        assert n in proc.stderr, (n, proc.stderr[-2000:])


@pytest.mark.parametrize(("args", "needles"), [
    (["--learnin_rate=1"], ["Unknown command line flag 'learnin_rate'", "learning_rate"]),
    (["--max_steps=ten"], ["max_steps", "ten"]),
    (["--gin_bindings=lora.rr = 3"], ["doesn't have a parameter named 'rr'", "Did you mean `lora.r`"]),
    (["--gin_bindings=learning_rate = 0.1"], ["sets the hyperparameter `learning_rate` through gin",
                                              "--learning_rate="]),
    (["--task_name=sim_transfer_cube_scriptd"], ["did you mean `sim_transfer_cube_scripted`"]),
    (["--gin_file=nope.gin"], ["gin file `nope.gin` not found"]),
    ([f"--training_config={FIXTURES / 'yaml' / 'foreign_keys.yaml'}"], ["9 unknown key(s)", "trainer_flavour"]),
    (["--warmup_ratio=1.5"], ["--warmup_ratio: 1.5 is out of range; allowed: [0, 1)"]),
    (["--resume_from_checkpoint=/no/such/ckpt"], ["not a checkpoint directory"]),
    (["extra_positional"], ["unexpected positional arguments"]),
])
def test_user_errors_exit_2_without_traceback_and_write_nothing(tmp_path, tiny_data, args, needles):
    out = tmp_path / "run"
    proc = run_train(*tiny_args(tiny_data, out), *args)
    assert_user_error(proc, *needles)
    assert not out.exists()


def test_data_problems_are_found_by_dry_run(tmp_path):
    out = tmp_path / "run"
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_train(*tiny_args(empty, out), "--dry_run")
    assert_user_error(proc, str(empty))
    assert not out.exists()


def test_dry_run_prints_configuration_and_writes_nothing(tmp_path, tiny_data):
    out = tmp_path / "run"
    proc = run_train(*tiny_args(tiny_data, out), "--dry_run", "--learning_rate=0.003",
                     "--gin_bindings=mlp.hidden_dim = 48")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--learning_rate = 0.003" in proc.stdout and "mlp.hidden_dim = 48" in proc.stdout
    assert "4 episodes, 200 steps" in proc.stdout
    assert not out.exists()


def test_explain_names_every_source(tmp_path, tiny_data):
    y = tmp_path / "c.yaml"
    y.write_text("preload_data: true\nmax_steps: 11\n")
    proc = run_train(*tiny_args(tiny_data, tmp_path / "run"), "--explain", f"--training_config={y}",
                     "--learning_rate=0.003")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {line.split(" = ")[0]: line for line in proc.stdout.splitlines() if " = " in line}
    assert lines["--learning_rate"].endswith("# flag --learning_rate")
    assert lines["--max_steps"].endswith(f"# YAML {y}:2 (max_steps)")
    assert lines["--adam_beta1"].endswith("# default")
    assert lines["dataset.preload_data"].endswith(f"# YAML {y}:1 (preload_data)")
    binding = f"task.dataset_dir = '{tiny_data}'"
    assert lines["task.dataset_dir"].endswith(f'# --gin_bindings[0] ("{binding}")')
    assert "mlp.gin:10" in lines["model.policy"]
    assert lines["mlp.dropout"].endswith("# default")
    assert "task.dataset_dir: 'data/tiny_synthetic' (" in proc.stdout  # overridden chain shown


def test_unused_binding_warning_on_stderr(tmp_path, tiny_data):
    proc = run_train(*tiny_args(tiny_data, tmp_path / "run"), "--dry_run",
                     "--gin_bindings=eval/mlp.hidden_dim = 3")
    assert proc.returncode == 0
    assert "eval/mlp.hidden_dim (from --gin_bindings[1]" in proc.stderr and "never used" in proc.stderr


def read_losses(run: Path) -> list[float]:
    state = json.loads((run / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """One real short run, shared by the tests that inspect its run directory."""
    out = tmp_path_factory.mktemp("trained") / "run"
    proc = run_train(*tiny_args(tiny_data, out), "--max_steps=60", "--learning_rate=1e-3",
                     "--save_steps=30", "--report_to=tensorboard", "--seed=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_training_loss_goes_down(trained):
    out, _ = trained
    losses = read_losses(out)
    assert len(losses) == 12
    assert losses[-1] < 0.8 * losses[0], losses


def test_run_directory_has_every_dump(trained):
    out, _ = trained
    for name in ("operative_config.gin", "config.gin", "flags.txt", "training_args.json",
                 "normalization.json", "model.safetensors", "checkpoint-30", "checkpoint-60"):
        assert (out / name).exists(), name
    operative = (out / "operative_config.gin").read_text()
    assert "mlp.hidden_dim = 256" in operative and "lora.r = 64" in operative  # defaults included
    assert "sim." not in operative  # a task without a simulator: no sim.* settings were used
    import os

    umask = os.umask(0)
    os.umask(umask)
    for name in ("operative_config.gin", "config.gin", "flags.txt", "model.safetensors",
                 "normalization.json", "training_args.json", "checkpoint-60/model.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name  # not mkstemp's 0600
    assert (out / "checkpoint-60").stat().st_mode & 0o777 == 0o777 & ~umask
    assert "task.dataset_dir" in (out / "config.gin").read_text()
    args = json.loads((out / "training_args.json").read_text())
    assert args["learning_rate"] == 1e-3 and args["max_steps"] == 60 and args["seed"] == 3
    assert not list(out.glob(".*.tmp"))


def test_logs_name_the_step_and_done_names_the_run_directory(trained):
    out, proc = trained
    logs = proc.stdout + proc.stderr
    assert "'step': 30" in logs and "'step': 60" in logs
    assert f"done: 60 steps; run directory {out.resolve()}" in logs


def test_final_model_loads_back(trained):
    """The run directory alone rebuilds the policy (the evaluator's loader, strict weights)."""
    import torch

    from ilstudio.eval import load_policy, load_settings, run_files

    out, _ = trained
    weights, operative, _ = run_files(str(out))
    built = load_settings(operative)
    policy, use_images, _ = load_policy(built, weights, "cpu")
    assert use_images and built["policy"].hidden_dim == 256
    from safetensors.torch import load_file

    saved = load_file(str(weights))
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in saved.items())


def test_operative_config_in_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = trained
    tags = []
    for events in (out / "runs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        tags += acc.Tags().get("tensors", [])
    assert any("config/operative_config" in t for t in tags), tags


def test_flagfile_rerun_gives_the_same_operative_config(trained, tmp_path):
    out, _ = trained
    rerun = tmp_path / "rerun"
    proc = run_train(f"--flagfile={out / 'flags.txt'}", f"--output_dir={rerun}", "--max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (rerun / "operative_config.gin").read_text() == (out / "operative_config.gin").read_text()
    a = json.loads((out / "training_args.json").read_text())
    b = json.loads((rerun / "training_args.json").read_text())
    diff = {k for k in a if a[k] != b.get(k)}
    assert diff <= {"output_dir", "max_steps", "logging_dir"}, diff


def test_output_dir_with_a_run_is_not_reused_silently(trained):
    out, _ = trained
    proc = run_train(f"--flagfile={out / 'flags.txt'}", "--max_steps=2")
    assert_user_error(proc, "already holds a run", "--overwrite_output_dir")


def test_resume_true_continues_from_newest_checkpoint(trained, tmp_path):
    out, _ = trained
    run = tmp_path / "resumed"
    shutil.copytree(out, run)
    shutil.rmtree(run / "checkpoint-60")  # as a run killed after checkpoint-30 leaves it:
    (run / "trainer_state.json").unlink()  # no last checkpoint, no final state
    proc = run_train(f"--flagfile={out / 'flags.txt'}", f"--output_dir={run}",
                     "--resume_from_checkpoint=true", "--max_steps=60")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((run / "checkpoint-60" / "trainer_state.json").read_text())
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps == list(range(5, 65, 5))
    assert "Continuing training from global step 30" in proc.stderr + proc.stdout or \
        "checkpoint-30" in proc.stderr + proc.stdout


def test_resume_true_without_checkpoint_starts_fresh(tmp_path, tiny_data):
    out = tmp_path / "fresh"
    proc = run_train(*tiny_args(tiny_data, out), "--max_steps=3", "--resume_from_checkpoint=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").exists()


def check_debug_yaml_landed(tmp_path, tiny_data, yaml_file: Path) -> None:
    out = tmp_path / "run"
    proc = run_train(*tiny_args(tiny_data, out), f"--training_config={yaml_file}",
                     "--max_steps=4", "--dataloader_num_workers=0", "--report_to=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = json.loads((out / "training_args.json").read_text())
    assert args["adam_epsilon"] == 1e-8 and args["adam_beta1"] == 0.95 and args["weight_decay"] == 0.0001
    assert args["lr_scheduler_type"] == "constant" and args["save_total_limit"] == 50
    assert args["per_device_train_batch_size"] == 8  # tiny_args' flag beats the YAML's 2
    assert args["max_steps"] == 4 and args["save_steps"] == 10 and args["seed"] == 0


def test_yaml_file_runs_with_every_value_landing(tmp_path, tiny_data):
    check_debug_yaml_landed(tmp_path, tiny_data, FIXTURES / "yaml" / "short_debug.yaml")


@needs_shared(COMPAT)
def test_il_studio_debug_yaml_runs_with_every_value_landing(tmp_path, tiny_data):
    check_debug_yaml_landed(tmp_path, tiny_data, COMPAT / "debug.yaml")


def test_console_script_is_installed():
    import subprocess

    exe = Path(sys.executable).parent / "ilstudio-train"
    assert exe.exists()
    proc = subprocess.run([str(exe), "--helpshort"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--learning_rate" in proc.stdout + proc.stderr


def test_headline_command_trains_lora_on_readme_synthetic_data(tmp_path):
    """README's headline command, exactly as printed plus README's synthetic task, from a
    directory that is not the checkout, with no backbone step first (the default backbone
    ships in the package): LoRA is really on with r = 16, and no backbone is written."""
    import subprocess

    from conftest import train_env

    made = subprocess.run([sys.executable, "-m", "ilstudio.data.synthetic", "data/tiny_synthetic"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=train_env())
    assert made.returncode == 0, made.stderr[-2000:]
    proc = run_train("--gin_file=gin_configs/default.gin", "--gin_bindings=lora.r=16",
                     "--learning_rate=1e-3", "--task_name=tiny_synthetic", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "runs"]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["tiny_synthetic"]
    run = tmp_path / "runs" / "tiny_synthetic"
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["peft_type"] == "LORA"
    assert (run / "adapter_model.safetensors").stat().st_size > 0
    operative = (run / "operative_config.gin").read_text()
    assert "lora.enable = True" in operative and "model.policy = 'vla'" in operative
    assert "model.model_name_or_path = 'ilstudio:vla_tiny'" in operative  # portable, not a path
    assert json.loads((run / "training_args.json").read_text())["learning_rate"] == 1e-3


def test_values_switched_off_warn_and_are_kept_in_config_gin(tmp_path, tiny_data):
    y = tmp_path / "c.yaml"
    y.write_text("lora_enable: false\nlora_r: 16\nuse_quantization: false\nbits: 8\n")
    out = tmp_path / "run"
    proc = run_train(*tiny_args(tiny_data, out), f"--training_config={y}", "--max_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("their switch is off") == 1
    assert "lora.r = 16" in proc.stderr and "quantization.bits = 8" in proc.stderr
    config = (out / "config.gin").read_text()
    assert "lora.r = 16" in config and "quantization.bits = 8" in config
    # A value the policy can never honour stays an error: the MLP has no LoRA.
    refused = run_train(*tiny_args(tiny_data, tmp_path / "r2"), "--gin_bindings=lora.enable = True",
                        "--gin_bindings=lora.r = 16", "--dry_run")
    assert_user_error(refused, "lora.enable = True", "no effect on policy 'mlp'")


def test_every_flag_of_every_program_is_in_a_help_group():
    """Help groups come from the declarations: a flag any ilstudio program defines and no
    --helpfull heading lists fails here (it would land under "Other flags")."""
    from ilstudio import eval as evaluator
    from ilstudio import main
    from ilstudio.cli import HELP_FLAGS, SHARED_FLAG_GROUP
    from ilstudio.sim import quickstart, record

    programs = {"train.py": (main.FLAGS, main.HELP_GROUPS),
                "ilstudio.eval": (evaluator.FLAGS, [*evaluator._GROUPS, SHARED_FLAG_GROUP]),
                "ilstudio.sim.record": (record.FLAGS, [*record._GROUPS, SHARED_FLAG_GROUP]),
                "ilstudio.sim.quickstart": (quickstart.FLAGS, [*quickstart._GROUPS, SHARED_FLAG_GROUP])}
    for program, (fv, groups) in programs.items():
        grouped = {name for _, names in groups for name in names}
        ours = {f.name for module, defined in fv.flags_by_module_dict().items()
                if module.startswith("ilstudio") for f in defined}
        assert ours, program
        missing = sorted(ours - grouped - set(HELP_FLAGS))
        assert not missing, f"{program}: flags in no help group: {missing}"
    assert "eval_every_steps" in {n for _, names in main.HELP_GROUPS for n in names}
    assert "eval_every_steps" in main.COMMON and "adam_beta2" not in main.COMMON
