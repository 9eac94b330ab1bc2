"""The run directory under hostile and careless use: one run at a time, overwrite removes only
what a run writes, and resume does what it says.

- Lock: a second run on a directory in use (a resume included) exits 2 naming the holder's
  PID; a killed run's lock never blocks; a stale lock file means nothing.
- --overwrite_output_dir removes only a run's own files, and refuses (listing them) when
  anything else is there.
- Resume: a finished run relaunched with the same max_steps says "already finished at step N"
  and changes nothing; a larger max_steps continues; a run killed between its last checkpoint
  and its final save ends identical to an uninterrupted one, with no phantom step; changes
  README calls allowed take effect from the resumed step (checked by their effect on the
  weights, the saved optimizer and the logs); a damaged newest checkpoint falls back to the
  previous complete one with a warning, and no complete one is an error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_train, tiny_args, train_env

from ilstudio import rundir

# 4 episodes x 50 steps, batch 8: 25 steps an epoch.
BASE = ["--max_steps=10", "--save_steps=5", "--seed=3", "--logging_steps=1"]


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under out (but the lock, whose content names its last holder) with size and
    mtime: 'changes nothing' means this is unchanged."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != rundir.LOCK_FILE}


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                            env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_for(proc: subprocess.Popen, ready, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"run ended early (rc {proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail("condition never reached")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted 10-step run (checkpoints at 5 and 10)."""
    out = tmp_path_factory.mktemp("lock_resume") / "reference"
    r = run_train(*tiny_args(tiny_data, out, *BASE))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# -- the lock ----------------------------------------------------------------------------


def test_second_run_and_resume_exit_2_naming_the_holder_and_a_killed_lock_never_blocks(
        tiny_data, tmp_path):
    out = tmp_path / "busy"
    args = tiny_args(tiny_data, out, "--max_steps=100000", "--save_steps=5")
    first = start(args)
    try:
        wait_for(first, lambda: (out / "checkpoint-5").is_dir())
        assert rundir.lock_holder(out).startswith(f"PID {first.pid} ")
        for extra in ([], ["--resume_from_checkpoint=true"], ["--overwrite_output_dir"],
                      ["--resume_from_checkpoint=true", "--dry_run"]):
            r = run_train(*tiny_args(tiny_data, out, "--max_steps=200", *extra), timeout=180)
            assert r.returncode == 2 and "Traceback" not in r.stderr, (extra, r.stderr[-2000:])
            assert f"is in use by another run (PID {first.pid} on " in r.stderr, (extra, r.stderr[-2000:])
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        first.stderr.close()
    # Killed: the kernel released its flock; the stale PID left in the file blocks nothing.
    assert rundir.lock_holder(out) is None
    assert f"PID {first.pid} " in (out / rundir.LOCK_FILE).read_text()
    at = int(Path(rundir.last_complete_checkpoint(out)).name.split("-")[1])
    r = run_train(*tiny_args(tiny_data, out, f"--max_steps={at + 3}", "--save_steps=5",
                             "--resume_from_checkpoint=true"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == at + 3


def test_lock_file_in_the_way_is_a_user_error(tiny_data, tmp_path):
    out = tmp_path / "odd"
    (out / rundir.LOCK_FILE).mkdir(parents=True)  # not a plain file
    r = run_train(*tiny_args(tiny_data, out, "--max_steps=1"), timeout=180)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "cannot open the run lock" in r.stderr


def test_run_lock_in_process_is_exclusive_and_released():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with rundir.RunLock(d):
            assert rundir.lock_holder(d).startswith(f"PID {os.getpid()} ")
            with pytest.raises(rundir.UserError, match=f"in use by another run \\(PID {os.getpid()} "):
                rundir.RunLock(d)
        assert rundir.lock_holder(d) is None
        rundir.RunLock(d).release()  # a stale file from the first lock does not block


# -- --overwrite_output_dir ----------------------------------------------------------------


def test_overwrite_refuses_and_lists_what_no_run_writes(reference, tiny_data, tmp_path):
    import shutil

    out = tmp_path / "mixed"
    shutil.copytree(reference, out)
    (out / "paper.tex").write_text("\\section{results}")
    (out / "src" / "pkg").mkdir(parents=True)
    (out / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    (out / "checkpoint-old").mkdir()
    before = snapshot(out)
    for extra in ([], ["--dry_run"]):
        r = run_train(*tiny_args(tiny_data, out, *BASE, "--overwrite_output_dir", *extra), timeout=180)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "checkpoint-old/, paper.tex, src/" in r.stderr, r.stderr[-2000:]
        assert "Nothing was removed" in r.stderr
    assert snapshot(out) == before
    for name in ("paper.tex", "src", "checkpoint-old"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    r = run_train(*tiny_args(tiny_data, out, *BASE, "--overwrite_output_dir"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert same_tensors(reference / "model.safetensors", out / "model.safetensors")


def test_a_finished_run_holds_only_what_its_manifest_lists(reference):
    assert rundir.foreign_entries(reference) == []
    listed = rundir.read_manifest(reference).files
    assert {"flags.txt", "model.safetensors", "checkpoint-10/optimizer.pt"} <= set(listed)
    assert (reference / rundir.LOCK_FILE).is_file()


# -- resume ----------------------------------------------------------------------------------


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_finished_run_relaunched_with_the_same_max_steps_changes_nothing(reference, tiny_data, tmp_path):
    out = copy_run(reference, tmp_path / "again")
    before = snapshot(out)
    r = run_train(*tiny_args(tiny_data, out, *BASE, "--resume_from_checkpoint=true"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already finished at step 10" in r.stderr, r.stderr[-2000:]
    assert snapshot(out) == before
    assert not (out / "checkpoint-11").exists()


def test_finished_run_with_a_larger_max_steps_continues(reference, tiny_data, tmp_path):
    out = copy_run(reference, tmp_path / "longer")
    r = run_train(*tiny_args(tiny_data, out, *[a for a in BASE if not a.startswith("--max_steps")],
                             "--max_steps=15", "--resume_from_checkpoint=true"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 15
    assert (out / "checkpoint-15").is_dir()
    assert "--max_steps: 10 -> 15" in (out / rundir.RESUME_CHANGES).read_text()


@pytest.mark.parametrize("kill_point", ["after the last checkpoint", "while writing the final model",
                                        "after the final model"])
def test_killed_between_last_checkpoint_and_final_save_ends_identical(reference, tiny_data,
                                                                      tmp_path, kill_point):
    """Simulated by removing what the final save writes from a finished run, as a kill at that
    point leaves it (the kill itself is exercised by bench/kill_resume.py)."""
    out = copy_run(reference, tmp_path / "cut")
    final = [rundir.TRAINER_STATE]
    if kill_point != "after the final model":
        final += [rundir.WEIGHTS, rundir.TRAINER_ARGS_BIN]
    for name in final:
        (out / name).unlink()
    if kill_point == "while writing the final model":
        (out / rundir.FINAL_STAGING_DIR).mkdir()
        (out / rundir.FINAL_STAGING_DIR / rundir.WEIGHTS).write_bytes(b"partial")
    r = run_train(*tiny_args(tiny_data, out, *BASE, "--resume_from_checkpoint=true"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert same_tensors(reference / "model.safetensors", out / "model.safetensors")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 10
    assert not [p for p in out.glob("checkpoint-*") if int(p.name.split("-")[1]) > 10]  # no phantom
    assert not (out / rundir.FINAL_STAGING_DIR).exists()


def test_a_lower_max_steps_than_the_checkpoint_is_refused(reference, tiny_data, tmp_path):
    out = copy_run(reference, tmp_path / "lower")
    (out / rundir.TRAINER_STATE).unlink()
    before = snapshot(out)
    r = run_train(*tiny_args(tiny_data, out, *[a for a in BASE if not a.startswith("--max_steps")],
                             "--max_steps=7", "--resume_from_checkpoint=true"), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "checkpoint-10 is at step 10, beyond --max_steps=7" in r.stderr
    assert snapshot(out) == before


# -- allowed changes take effect ---------------------------------------------------------------


@pytest.fixture(scope="module")
def half(tiny_data, tmp_path_factory) -> Path:
    """A run stopped at checkpoint-5 of 10 (the final files removed, as a kill leaves it)."""
    out = tmp_path_factory.mktemp("half") / "run"
    r = run_train(*tiny_args(tiny_data, out, *BASE, "--save_total_limit=5"))
    assert r.returncode == 0, r.stderr[-3000:]
    import shutil

    for name in ("checkpoint-10", rundir.WEIGHTS, rundir.TRAINER_STATE, rundir.TRAINER_ARGS_BIN):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return out


def test_learning_rate_changed_on_resume_is_the_one_used(half, tiny_data, tmp_path):
    """--learning_rate=0 from step 5: the weights at step 10 equal those of checkpoint-5 (the
    old lr restored with the optimizer state would have kept training)."""
    out = copy_run(half, tmp_path / "lr0")
    r = run_train(*tiny_args(tiny_data, out, *BASE, "--learning_rate=0", "--weight_decay=0",
                             "--resume_from_checkpoint=true"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert same_tensors(out / "checkpoint-5" / "model.safetensors", out / "model.safetensors")
    assert "--learning_rate: 0.0001 -> 0.0" in (out / rundir.RESUME_CHANGES).read_text()
    # And a different, non-zero one really trains (not simply: resume froze the model).
    out2 = copy_run(half, tmp_path / "lr2")
    r = run_train(*tiny_args(tiny_data, out2, *BASE, "--learning_rate=1e-2",
                             "--resume_from_checkpoint=true"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not same_tensors(out2 / "checkpoint-5" / "model.safetensors", out2 / "model.safetensors")


def test_optimizer_hyperparameters_changed_on_resume_reach_the_saved_optimizer(half, tiny_data,
                                                                              tmp_path):
    import torch

    out = copy_run(half, tmp_path / "adam")
    r = run_train(*tiny_args(tiny_data, out, *BASE, "--learning_rate=3e-3", "--weight_decay=0.25",
                             "--adam_beta1=0.5", "--adam_beta2=0.75", "--adam_epsilon=1e-4",
                             "--resume_from_checkpoint=true"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    groups = torch.load(out / "checkpoint-10" / "optimizer.pt", weights_only=False)["param_groups"]
    assert {g["initial_lr"] for g in groups} == {3e-3}
    assert all(tuple(g["betas"]) == (0.5, 0.75) and g["eps"] == 1e-4 for g in groups)
    assert {g["weight_decay"] for g in groups} <= {0.25, 0.0} and any(g["weight_decay"] == 0.25 for g in groups)
    sched = torch.load(out / "checkpoint-10" / "scheduler.pt", weights_only=False)
    assert set(sched["base_lrs"]) == {3e-3}


def test_logging_and_saving_intervals_changed_on_resume_apply(half, tiny_data, tmp_path):
    out = copy_run(half, tmp_path / "steps")
    r = run_train(*tiny_args(tiny_data, out, *[a for a in BASE if not a.startswith(("--save_steps",
                                                                                     "--logging_steps"))],
                             "--save_steps=2", "--logging_steps=3", "--resume_from_checkpoint=true"),
                  timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [e["step"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
             if "loss" in e]
    assert [s for s in steps if s > 5] == [6, 9], steps
    assert {p.name for p in out.glob("checkpoint-*")} >= {"checkpoint-6", "checkpoint-8", "checkpoint-10"}


def test_a_change_that_cannot_be_applied_is_refused(half, tiny_data, tmp_path):
    """The seed: the checkpoint's RNG state decides the rest of the run, so a new seed could
    not take effect; it is refused like the other changes the checkpoint cannot follow."""
    out = copy_run(half, tmp_path / "seed")
    before = snapshot(out)
    r = run_train(*tiny_args(tiny_data, out, *BASE, "--seed=4", "--resume_from_checkpoint=true"),
                  timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "--seed: 3 -> 4" in r.stderr
    assert snapshot(out) == before


# -- damaged checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["model.safetensors", "trainer_state.json", "optimizer.pt"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, tiny_data, tmp_path,
                                                                  damage):
    out = copy_run(reference, tmp_path / "damaged")
    (out / rundir.TRAINER_STATE).unlink()  # not finished: it must resume from a checkpoint
    f = out / "checkpoint-10" / damage
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = run_train(*tiny_args(tiny_data, out, *BASE, "--resume_from_checkpoint=true"), timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"checkpoint-10 is damaged ({damage}" in r.stderr and "checkpoint-5" in r.stderr
    assert same_tensors(reference / "model.safetensors", out / "model.safetensors")


def test_no_complete_checkpoint_is_an_error(reference, tiny_data, tmp_path):
    out = copy_run(reference, tmp_path / "none")
    (out / rundir.TRAINER_STATE).unlink()
    for ckpt in ("checkpoint-5", "checkpoint-10"):
        f = out / ckpt / rundir.WEIGHTS
        f.write_bytes(f.read_bytes()[:100])
    r = run_train(*tiny_args(tiny_data, out, *BASE, "--resume_from_checkpoint=true"), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "no checkpoint in" in r.stderr and "is complete" in r.stderr
    r = run_train(*tiny_args(tiny_data, out, *BASE,
                             f"--resume_from_checkpoint={out / 'checkpoint-5'}"), timeout=300)
    assert r.returncode == 2 and "model.safetensors is truncated" in r.stderr, r.stderr[-2000:]
