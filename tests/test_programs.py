"""The four programs are one tool: shared gin flags, --flagfile, help, --gin.NAME shorthand,
console scripts, and user errors that exit 2 with one message (real subprocesses)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO, run_train, tiny_args, train_env

PROGRAMS = {"train": "ilstudio.main", "record": "ilstudio.sim.record", "eval": "ilstudio.eval",
            "quickstart": "ilstudio.sim.quickstart"}


def python_m(module: str, *args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=train_env(MUJOCO_GL="egl"))


def assert_user_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.count("error:") == 1, proc.stderr
    for n in needles:
        assert n in proc.stderr, (n, proc.stderr[-2000:])


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_program_shares_the_gin_flags_in_its_help(program):
    short = python_m(PROGRAMS[program], "--helpshort")
    assert short.returncode == 0, short.stderr[-2000:]
    text = short.stdout + short.stderr
    for flag in ("--gin_file", "--gin_bindings", "--gin_search_paths", "--flagfile"):
        assert flag in text, (program, flag)
    assert "see --helpshort" not in text.lower()
    full = python_m(PROGRAMS[program], "--helpfull")
    assert full.returncode == 0 and len(full.stdout + full.stderr) > len(text)


@pytest.mark.parametrize(("program", "args", "needles"), [
    ("record", ["--task_name=nope"], ["no gin_configs/tasks/nope.gin", "Known tasks"]),
    ("record", ["--num_episodes=x"], ["--num_episodes=x"]),
    ("record", ["--gin.sim.render_height=big"], ["sim.render_height = big", "expected int"]),
    ("record", ["--lora_r=8"], ["lora_r is a stable parameter"]),
    ("eval", ["--policy=sideways"], ["--policy"]),
    ("eval", ["--checkpoint=/no/such/run"], ["--checkpoint=/no/such/run: no such directory"]),
    ("eval", ["--policy=hold", "--gin_file=missing.gin"], ["gin file `missing.gin` not found"]),
    ("quickstart", ["--task_name=nope"], ["no gin_configs/tasks/nope.gin"]),
])
def test_user_errors_exit_2_with_one_message(tmp_path, program, args, needles):
    proc = python_m(PROGRAMS[program], *args, f"--output_dir={tmp_path / 'out'}")
    assert_user_error(proc, *needles)
    assert not (tmp_path / "out").exists()


def test_flagfile_means_the_same_in_every_program(tmp_path):
    flagfile = tmp_path / "f.txt"
    flagfile.write_text("--task_name=from_the_flagfile\n")
    for program in ("record", "eval"):
        proc = python_m(PROGRAMS[program], f"--flagfile={flagfile}", "--policy=hold"
                        if program == "eval" else "--num_episodes=1")
        assert_user_error(proc, "--task_name=from_the_flagfile")


def test_gin_shorthand_binds_in_train(tmp_path, tiny_data):
    proc = run_train(*tiny_args(tiny_data, tmp_path / "o"), "--gin.mlp.hidden_dim=40", "--dry_run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mlp.hidden_dim = 40" in proc.stdout


def test_mistyped_gin_value_is_readable(tmp_path, tiny_data):
    proc = run_train(*tiny_args(tiny_data, tmp_path / "o"), "--gin_bindings=lora.r = sixteen", "--dry_run")
    assert_user_error(proc, "lora.r = sixteen", "expected int", "lora.r = 'sixteen'",
                      "--gin_bindings[1]")
    assert "ast.Name" not in proc.stderr and "malformed node" not in proc.stderr


def test_console_scripts_point_at_the_programs():
    """pyproject's [project.scripts] entries run (installed, they are these calls)."""
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"', section, re.M))
    assert set(scripts) == {"ilstudio-train", "ilstudio-record", "ilstudio-eval", "ilstudio-quickstart"}
    for name, target in scripts.items():
        module, func = target.split(":")
        code = f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; sys.exit({func}())"
        proc = subprocess.run([sys.executable, "-c", code, "--helpshort"], cwd=REPO, capture_output=True,
                              text=True, timeout=120, env=train_env(MUJOCO_GL="egl"))
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        assert "--gin_bindings" in proc.stdout + proc.stderr, name


def test_report_to_without_its_package_is_refused_before_writing(tmp_path, tiny_data):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: the refusal cannot be shown")
    out = tmp_path / "o"
    proc = run_train(*tiny_args(tiny_data, out), "--report_to=wandb", "--max_steps=1")
    assert_user_error(proc, "--report_to=wandb", "wandb package", "ilstudio[wandb]")
    assert not out.exists()


def test_the_wheel_carries_its_configs_and_runs_from_anywhere(tmp_path):
    """Build the wheel from a clean copy of the sources, install it alone, and run from a
    directory that is not the checkout: the shipped gin and DeepSpeed configs are found."""
    clone = tmp_path / "sources"  # what a clone holds (links kept as links)
    clone.mkdir()
    for path in ("ilstudio", "pyproject.toml", "README.md", "gin_configs", "configs", "setup.cfg"):
        subprocess.run(["cp", "-a", str(REPO / path), str(clone / path)], check=True)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--no-build-isolation", "-w", str(tmp_path / "dist"), str(clone)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("ilstudio-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, timeout=300)
    anywhere = tmp_path / "anywhere"
    anywhere.mkdir()
    env = train_env(PYTHONPATH=str(site))

    def run(*args):
        return subprocess.run([sys.executable, "-m", *args], cwd=anywhere, capture_output=True,
                              text=True, timeout=300, env=env)

    where = run("ilstudio.main", "--helpshort")
    assert where.returncode == 0
    assert run("ilstudio.data.synthetic", "data/tiny_synthetic").returncode == 0
    dry = run("ilstudio.main", "--task_name=tiny_synthetic", "--gin_file=gin_configs/mlp.gin",
              "--explain")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert str(site / "ilstudio" / "gin_configs" / "mlp.gin") in dry.stdout  # from the wheel
    ds = run("ilstudio.main", "--task_name=tiny_synthetic", "--gin_file=gin_configs/mlp.gin",
             "--deepspeed=configs/deepspeed/zero2.json", "--dry_run")
    assert str(site / "ilstudio" / "configs" / "deepspeed" / "zero2.json") in ds.stdout + ds.stderr
    # A user's own gin_configs come first in the search path.
    (anywhere / "gin_configs").mkdir()
    (anywhere / "gin_configs" / "mlp.gin").write_text("model.policy = 'mlp'\nmlp.hidden_dim = 24\n")
    mine = run("ilstudio.main", "--task_name=tiny_synthetic", "--gin_file=gin_configs/mlp.gin", "--dry_run")
    assert mine.returncode == 0 and "mlp.hidden_dim = 24" in mine.stdout
