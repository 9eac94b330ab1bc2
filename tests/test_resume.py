"""Resume that loses nothing: SIGKILL at several moments, restart, same weights bit for bit.

One uninterrupted run is the reference. A second run is killed (SIGKILL, no chance to clean
up) once while a checkpoint is being written and once right after a checkpoint past the
epoch boundary is complete; every launch is the same command, with
--resume_from_checkpoint=true (a fresh start when there is no checkpoint yet). Its final model and every checkpoint it has in common with the
reference must be identical tensor for tensor: model, optimizer, scheduler, RNG (dropout is on)
and the position in the data order all have to come back for that to hold.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_train, tiny_args, train_env

from ilstudio.rundir import STAGING_DIR, last_complete_checkpoint

# 4 episodes x 50 steps / batch 8: one epoch is ~25 steps, so 40 steps cross an epoch boundary.
STEPS = ["--max_steps=40", "--save_steps=5", "--seed=7", "--logging_steps=5",
         "--gin_bindings=mlp.dropout = 0.1", "--gin_bindings=mlp.hidden_dim = 512"]


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    import torch

    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys(), (a, b)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs between {a} and {b}"


def _same_pickled_state(a: Path, b: Path) -> bool:
    import torch

    def flat(x):
        if isinstance(x, torch.Tensor):
            return [x]
        if isinstance(x, dict):
            return [t for k in sorted(x, key=str) for t in [k, *flat(x[k])]]
        if isinstance(x, (list, tuple)):
            return [t for v in x for t in flat(v)]
        return [x]

    fa = flat(torch.load(a, weights_only=False))
    fb = flat(torch.load(b, weights_only=False))
    return len(fa) == len(fb) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(fa, fb, strict=True))


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                            env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def kill_when(args: list[str], ready, timeout: float = 120) -> None:
    """Start train.py and SIGKILL it as soon as ready() is true (polled every millisecond)."""
    proc = _start(args)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"run ended before the kill point (rc {proc.returncode}):\n"
                            f"{proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("kill point never reached")
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "reference"
    r = run_train(*tiny_args(tiny_data, out, *STEPS))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_sigkill_at_several_points_then_resume_gives_identical_weights(tiny_data, reference, tmp_path):
    out = tmp_path / "killed"
    args = tiny_args(tiny_data, out, *STEPS)
    resume = [*args, "--resume_from_checkpoint=true"]

    # 1. While checkpoint-15 is being written (checkpoint-5 and -10 are complete): the staging
    #    directory holds a partial checkpoint when the kill lands.
    staging = out / STAGING_DIR
    kill_when(resume, lambda: (staging / "checkpoint-15").is_dir())
    midwrite = staging.is_dir()
    newest = last_complete_checkpoint(out)
    assert newest is not None and (Path(newest) / "trainer_state.json").is_file()
    assert all((p / "trainer_state.json").is_file() for p in out.glob("checkpoint-*"))
    # 2. Right after checkpoint-30 is complete, past the epoch boundary (~step 25).
    kill_when(resume, lambda: (out / "checkpoint-30").is_dir())
    assert last_complete_checkpoint(out) == str(out / "checkpoint-30")
    # 3. Finish.
    r = run_train(*resume)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr

    assert_same_tensors(reference / "model.safetensors", out / "model.safetensors")
    common = sorted({p.name for p in out.glob("checkpoint-*")} & {p.name for p in reference.glob("checkpoint-*")})
    assert "checkpoint-40" in common, common
    for name in common:
        assert_same_tensors(reference / name / "model.safetensors", out / name / "model.safetensors")
        assert _same_pickled_state(reference / name / "optimizer.pt", out / name / "optimizer.pt"), name
    print(f"\nkill points: while writing checkpoint-15 ({'hit' if midwrite else 'missed'}), "
          f"after checkpoint-30; identical final weights and checkpoints {common}")


def test_partial_checkpoint_and_staging_leftovers_are_never_resumed_from(tmp_path):
    import torch
    from safetensors.torch import save_file

    out = tmp_path
    (out / "checkpoint-5").mkdir()  # complete: a state with its step, whole weights
    (out / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    save_file({"w": torch.zeros(3)}, str(out / "checkpoint-5" / "model.safetensors"))
    (out / "checkpoint-10").mkdir()  # written by an older, non-atomic writer and cut short
    (out / "checkpoint-10" / "model.safetensors").write_bytes(b"\0" * 10)
    (out / STAGING_DIR / "checkpoint-15").mkdir(parents=True)
    (out / STAGING_DIR / "checkpoint-15" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(out) == str(out / "checkpoint-5")
    assert last_complete_checkpoint(out / "missing") is None


def test_resume_true_restarts_a_run_killed_before_its_first_checkpoint(tiny_data, tmp_path):
    """The same command (with --resume_from_checkpoint=true) starts over when nothing was
    checkpointed yet, but never retrains over a finished run."""
    from ilstudio.errors import UserError
    from ilstudio.plan import check_output_dir, resume_checkpoint
    from ilstudio.resolve import resolve_argv

    out = tmp_path / "run"
    out.mkdir()
    (out / "operative_config.gin").write_text("# dumps of a run killed at step 3\n")
    resolved = resolve_argv([*tiny_args(tiny_data, out), "--resume_from_checkpoint=true"])
    assert resume_checkpoint(resolved.hyper) is None
    check_output_dir(resolved.hyper, None, overwrite=False)  # starts again from step 0
    (out / "model.safetensors").write_bytes(b"finished")
    with pytest.raises(UserError, match="already holds a finished run"):
        check_output_dir(resolved.hyper, None, overwrite=False)
    fresh = resolve_argv(tiny_args(tiny_data, out))
    with pytest.raises(UserError, match="already holds a run"):
        check_output_dir(fresh.hyper, None, overwrite=False)
