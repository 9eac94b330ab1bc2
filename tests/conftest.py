"""Shared fixtures: tiny real data, and running train.py as a user would (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
# Material that exists only on the project's machines, beside the checkout: tests that compare
# against it carry needs_shared(...) and skip (with the reason) in a plain clone.
SHARED = REPO.parent / "shared"
COMPAT = SHARED / "compat" / "ilstudio-training-yaml"
os.environ.setdefault("OMP_NUM_THREADS", "1")


def shared_marks(path: Path) -> list[pytest.MarkDecorator]:
    """Marks for a test (or a pytest.param) that reads ``path`` under ../shared."""
    return [pytest.mark.shared,
            pytest.mark.skipif(not path.exists(), reason=f"{path} is absent: ../shared exists only "
                               "beside the project's own checkouts; the repository's own fixtures "
                               "(tests/fixtures) cover the same behaviour")]


def needs_shared(path: Path):
    """Decorator form of shared_marks."""
    def wrap(fn):
        for mark in shared_marks(path):
            fn = mark(fn)
        return fn
    return wrap


def needs_simulator() -> None:
    """For the MuJoCo test modules, called before they import anything of the simulator:
    software GL unless the caller chose (dm_control reads it once, on first import), and a
    module skip naming the package where the sim extra is not installed."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    for name in ("mujoco", "dm_control", "gym_aloha"):
        pytest.importorskip(name)


def assert_recipe_dry_run(out: Path, task_name: str, gin_file: str, data: Path,
                          expected: Sequence[str], *extra: str) -> None:
    """A recipe's gin file on its task resolves (``train.py --dry_run`` exits 0), the
    operative values it prints include each of ``expected``, and nothing is written."""
    proc = run_train(f"--task_name={task_name}", f"--gin_file={gin_file}",
                     f"--gin_bindings=task.dataset_dir = '{data}'", f"--output_dir={out}",
                     *extra, "--dry_run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in expected:
        assert line in proc.stdout, line
    assert not out.exists()


def train_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    env.update(extra)
    return env


def run_train(*args: str, cwd: Path | None = None, timeout: int = 300,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run train.py in a fresh process; returns the CompletedProcess (text output)."""
    cmd = [sys.executable, str(REPO / "train.py"), *args]
    return subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
                          env=env or train_env())


@pytest.fixture(autouse=True)
def _fresh_gin_config():
    """Gin's bindings are process-global: no test may see another's (e.g. task.camera_names)."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 synthetic episodes x 50 steps, 14-dim, one 24x32 `top` camera (read-only: don't modify)."""
    from ilstudio.data.synthetic import write_synthetic_dataset

    d = tmp_path_factory.mktemp("tiny_data")
    write_synthetic_dataset(d, num_episodes=4, episode_len=50)
    return d


def small_policy(extra) -> list[str]:
    """``--gin_file=gin_configs/mlp.gin`` unless ``extra`` chooses gin files itself.

    gin_configs/default.gin is the LoRA VLA; most tests exercise the machinery around the
    policy and use the small MLP to stay fast.
    """
    return [] if any(a.startswith("--gin_file") for a in extra) else ["--gin_file=gin_configs/mlp.gin"]


def tiny_args(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """Flags for a small, fast run on tiny_data (the MLP unless extra names a --gin_file)."""
    return ["--task_name=tiny_synthetic", f"--gin_bindings=task.dataset_dir = '{data_dir}'",
            f"--output_dir={output_dir}", "--per_device_train_batch_size=8", "--logging_steps=5",
            "--report_to=none", *small_policy(extra), *extra]


def finished_run(tmp_path_factory, name: str, data_dir: Path, *extra: str) -> tuple[Path, list[str]]:
    """Train once on tiny data (for module-scoped fixtures); returns (output_dir, the flags used)."""
    out = tmp_path_factory.mktemp(name) / "run"
    args = tiny_args(data_dir, out, *extra)
    r = run_train(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, args


def rebuilt_exactly(out: Path):
    """Rebuild a finished run as the evaluator does (operative_config.gin -> settings -> policy,
    strict weights) and assert that every saved tensor comes back unchanged; returns
    (the settings, the rebuilt policy)."""
    import gin
    import torch
    from safetensors.torch import load_file

    from ilstudio.eval import load_policy, load_settings

    try:
        built = load_settings(out / "operative_config.gin")
        policy, _, _ = load_policy(built, out / "model.safetensors", "cpu")
    finally:
        gin.clear_config()
    saved, own = load_file(str(out / "model.safetensors")), policy.state_dict()
    assert set(saved) == set(own) and all(torch.equal(own[k], saved[k]) for k in saved)
    return built, policy
