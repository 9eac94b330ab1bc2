"""The older YAML system's README examples, run as printed (real subprocesses).

Only the data location is bound (and the default policy's backbone, which is data too): each
example otherwise runs exactly as the README prints it, from the repository root.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, run_train, tiny_args, train_env

DEFAULT_YAML = "configs/training/default.yaml"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    from ilstudio.policies.vla.make_tiny import write_tiny_backbone

    return write_tiny_backbone(tmp_path_factory.mktemp("vla") / "tiny", hidden=32, layers=1, heads=2,
                               vision_hidden=16, vision_layers=1, vision_heads=2, image_size=16)


def data_bound(data: Path, backbone: Path) -> list[str]:
    return [f"--gin_bindings=task.dataset_dir = '{data}'",
            f"--gin_bindings=model.model_name_or_path = '{backbone}'"]


def python(code: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=180, env=train_env())


def test_python_api_example_runs_as_printed():
    proc = python("""
        from configs.training.loader import load_training_config, create_training_arguments

        # Load training configuration
        config = load_training_config('configs/training/default.yaml')

        # Create TrainingArguments (requires HyperArguments)
        from train import HyperArguments
        hyper_args = HyperArguments()
        training_args = create_training_arguments('configs/training/default.yaml', hyper_args)
        print(type(training_args).__name__, training_args.learning_rate, training_args.adam_beta1,
              training_args.weight_decay, training_args.max_steps, training_args.seed,
              training_args.per_device_train_batch_size, training_args.lr_scheduler_type.value,
              training_args.adam_epsilon, config['save_total_limit'])
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["TrainingArguments", "0.0001", "0.95", "0.0001", "10000", "0",
                                   "64", "constant", "1e-08", "50"]


def test_python_api_given_values_beat_the_yaml_even_at_their_defaults():
    """As on the command line: a value you pass wins, even when it equals the built-in default."""
    proc = python("""
        from configs.training.loader import create_training_arguments
        from train import HyperArguments

        h = HyperArguments(adam_beta1=0.9, output_dir='ignored')  # 0.9 is the default; YAML says 0.95
        h.seed = 42                                               # the default too; YAML says 0
        args = create_training_arguments('configs/training/default.yaml', h)
        print(args.adam_beta1, args.seed, args.weight_decay, args.learning_rate)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["0.9", "42", "0.0001", "0.0001"]


def test_training_config_example_runs_as_printed(tmp_path, tiny_data, backbone):
    """`python train.py --task_name sim_transfer_cube_scripted --training_config ...default.yaml`:
    resolves, validates and shows the YAML's values (a dry run: the YAML asks for 10000 steps)."""
    proc = run_train("--task_name", "sim_transfer_cube_scripted", "--training_config", DEFAULT_YAML,
                     *data_bound(tiny_data, backbone), f"--output_dir={tmp_path / 'out'}", "--explain")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split(" = ")[0]: line for line in proc.stdout.splitlines() if " = " in line}
    assert lines["--max_steps"].startswith("--max_steps = 10000") and DEFAULT_YAML in lines["--max_steps"]
    assert lines["--adam_beta1"].startswith("--adam_beta1 = 0.95")
    assert lines["lora.enable"].startswith("lora.enable = True")  # default.gin: the LoRA VLA


def test_training_config_with_command_line_overrides_trains(tmp_path, tiny_data, backbone):
    out = tmp_path / "my_output"
    proc = run_train("--task_name", "sim_transfer_cube_scripted", "--training_config", DEFAULT_YAML,
                     "--output_dir", str(out), "--learning_rate", "0.001", "--max_steps", "2",
                     "--per_device_train_batch_size", "16", *data_bound(tiny_data, backbone),
                     "--report_to=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = json.loads((out / "training_args.json").read_text())
    assert args["learning_rate"] == 0.001 and args["max_steps"] == 2
    assert args["per_device_train_batch_size"] == 16
    assert args["adam_beta1"] == 0.95 and args["save_total_limit"] == 50  # the rest from the YAML
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 64


def test_custom_yaml_with_output_dir(tmp_path, tiny_data, backbone):
    """The README's `configs/training/my_config.yaml` (output_dir and hyperparameters), run
    from a directory of the user's own: output_dir is relative to it."""
    (tmp_path / "configs/training").mkdir(parents=True)
    (tmp_path / "configs/training/my_config.yaml").write_text(
        '# configs/training/my_config.yaml\noutput_dir: "ckpt/my_training"\nlearning_rate: 0.0005\n'
        "max_steps: 2\nper_device_train_batch_size: 16\n")
    proc = run_train("--training_config", "configs/training/my_config.yaml",
                     *data_bound(tiny_data, backbone), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = json.loads((tmp_path / "ckpt/my_training/training_args.json").read_text())
    assert args["learning_rate"] == 0.0005 and args["max_steps"] == 2
    assert args["per_device_train_batch_size"] == 16


def test_old_flag_names_get_a_hint(tmp_path):
    for flag, hint in (("--lora_r=16", "--gin_bindings='lora.r=16'"),
                       ("--use_quantization", "--gin_bindings='quantization.enable=True'"),
                       ("--lora_module=llm", "--gin_bindings=\"lora.module='llm'\"")):
        proc = run_train(flag, f"--output_dir={tmp_path / 'o'}", "--dry_run")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        name = flag[2:].split("=")[0]
        assert f"{name} is a stable parameter" in proc.stderr and hint in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_gin_dot_shorthand_is_a_binding(tmp_path, tiny_data):
    proc = run_train(*tiny_args(tiny_data, tmp_path / "o"), "--gin.mlp.hidden_dim=48",
                     "--gin.dataset.preload_data", "True", "--dry_run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mlp.hidden_dim = 48" in proc.stdout and "dataset.preload_data = True" in proc.stdout


@pytest.mark.parametrize("mode", ["--dry_run", "--explain"])
def test_dry_run_and_explain_show_the_configuration_when_data_is_missing(tmp_path, mode):
    missing = tmp_path / "nothing_here"
    proc = run_train(*tiny_args(missing, tmp_path / "o"), mode, "--learning_rate=0.003")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--learning_rate = 0.003" in proc.stdout and "mlp.hidden_dim = 256" in proc.stdout
    assert f"{missing} does not exist" in proc.stderr
    assert f"python -m ilstudio.data.synthetic {missing}" in proc.stderr  # how to create it
    assert not (tmp_path / "o").exists()


def test_documented_value_forms_load_pretrain_and_square(tmp_path, tiny_data, backbone):
    y = tmp_path / "c.yaml"
    y.write_text("load_pretrain: false\nimage_aspect_ratio: square\n")
    proc = run_train(*tiny_args(tiny_data, tmp_path / "o"), f"--training_config={y}",
                     "--gin_bindings=dataset.image_size = (16, 16)", "--dry_run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model.load_pretrain = False" in proc.stdout
    assert "dataset.image_aspect_ratio = 'square'" in proc.stdout
    # true: start from the pretrained backbone, which the MLP does not have.
    y.write_text("load_pretrain: true\n")
    proc = run_train(*tiny_args(tiny_data, tmp_path / "o"), f"--training_config={y}", "--dry_run")
    assert proc.returncode == 2 and "model.load_pretrain = True" in proc.stderr
    assert "policy 'mlp' has no pretrained backbone" in proc.stderr


def test_load_pretrain_true_loads_the_backbone_weights(tiny_data, backbone):
    from ilstudio.resolve import resolve_argv

    r = resolve_argv(["--task_name=tiny_synthetic", "--gin_file=gin_configs/vla.gin",
                      *data_bound(tiny_data, backbone), "--gin_bindings=model.load_pretrain = True"])
    assert r.model.pretrained_backbone and r.model.pretrain_from is None
    r = resolve_argv(["--task_name=tiny_synthetic", "--gin_file=gin_configs/vla.gin",
                      *data_bound(tiny_data, backbone), "--gin_bindings=model.load_pretrain = False"])
    assert not r.model.pretrained_backbone and r.model.pretrain_from is None


def test_square_is_the_plain_resize():
    import numpy as np

    from ilstudio.data.image_ops import fit_frames

    frames = np.random.RandomState(0).randint(0, 255, (2, 24, 32, 3), dtype=np.uint8)
    assert np.array_equal(fit_frames(frames, (16, 16), "square"), fit_frames(frames, (16, 16), "resize"))
    assert not np.array_equal(fit_frames(frames, (16, 16), "square"), fit_frames(frames, (16, 16), "pad"))
