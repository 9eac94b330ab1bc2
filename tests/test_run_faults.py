"""Faults during a run: a non-finite loss, a write that fails, an output_dir holding a run.

Each ends with a message and exit code 2 (no traceback), and never with a checkpoint that
looks complete but is not. Unwritable output is produced two ways that work for root too
(root ignores chmod): an output_dir whose parent is a regular file, and a file-size limit
(RLIMIT_FSIZE: every write past it fails with EFBIG, the same path as a full disk) that the
small config dumps pass and a checkpoint does not.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, finished_run, run_train, tiny_args, train_env

from ilstudio.rundir import STAGING_DIR


def assert_no_partial_checkpoint(out: Path) -> None:
    assert not (out / STAGING_DIR).exists()
    for ckpt in out.glob("checkpoint-*"):
        for f in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                  "trainer_state.json"):
            assert (ckpt / f).is_file(), f"{ckpt} lacks {f}"


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "out"
    r = run_train(*tiny_args(tiny_data, out, "--max_steps=10", "--save_steps=1",
                             "--learning_rate=1e30"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "not finite" in r.stderr and "--learning_rate=1e+30" in r.stderr
    assert "the last complete checkpoint is" in r.stderr
    ckpts = sorted(out.glob("checkpoint-*"))
    assert ckpts, "the checkpoint before the NaN should be kept"
    assert_no_partial_checkpoint(out)
    assert not (out / "model.safetensors").exists()  # no final model from a failed run
    import torch
    from safetensors.torch import load_file

    for t in load_file(str(ckpts[-1] / "model.safetensors")).values():
        assert torch.isfinite(t).all()


def test_output_dir_under_a_regular_file(tiny_data, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "file" / "out"
    r = run_train(*tiny_args(tiny_data, out, "--max_steps=2"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert f"--output_dir={out}: cannot write the run's configuration" in r.stderr


# model.safetensors is ~0.95 MB, optimizer.pt ~1.9 MB, every config dump a few KB: 200 kB
# fails the safetensors write, 1.2 MB the torch.save of the optimizer.
@pytest.mark.parametrize("limit", [200_000, pytest.param(1_200_000, marks=pytest.mark.slow)],
                         ids=["model_write", "optimizer_write"])
def test_failed_checkpoint_write_is_an_error_and_leaves_nothing_partial(tiny_data, tmp_path, limit):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "train.py"),
                        *tiny_args(tiny_data, out, "--max_steps=4", "--save_steps=2")],
                       cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "could not write checkpoint-2" in r.stderr
    assert "no checkpoint had been written yet" in r.stderr
    assert (out / "operative_config.gin").is_file()  # small dumps were written
    assert not list(out.glob("checkpoint-*"))
    assert_no_partial_checkpoint(out)


@pytest.fixture(scope="module")
def existing_run(tiny_data, tmp_path_factory) -> tuple[Path, list[str]]:
    return finished_run(tmp_path_factory, "existing", tiny_data, "--max_steps=2", "--save_strategy=no")


def test_output_dir_holding_a_run_is_never_silently_reused(existing_run):
    out, args = existing_run
    before = (out / "model.safetensors").read_bytes()
    for extra, expect in ((["--dry_run"], "already holds a run"),
                          (["--dry_run", "--resume_from_checkpoint=true"],
                           "already holds a finished run")):
        r = run_train(*args, *extra, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert expect in r.stderr and "model.safetensors" in r.stderr
        assert "Traceback" not in r.stderr
    r = run_train(*args, "--max_steps=1")  # a real run too
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert (out / "model.safetensors").read_bytes() == before


def test_overwrite_output_dir_replaces_deliberately(existing_run):
    """It removes what the run wrote (its manifest's files, a kill's temporary of one of them)
    and nothing else: a file the run did not write stops it, listed, with nothing removed."""
    out, args = existing_run
    (out / "notes.txt").write_text("the user's, not the run's")
    r = run_train(*args, "--overwrite_output_dir", "--max_steps=1")
    assert r.returncode == 2 and "notes.txt" in r.stderr and "Nothing was removed" in r.stderr
    assert (out / "notes.txt").is_file()
    (out / "notes.txt").unlink()
    (out / "checkpoint-99").mkdir()  # not the run's: an empty directory is the user's too
    r = run_train(*args, "--overwrite_output_dir", "--max_steps=1")
    assert r.returncode == 2 and "checkpoint-99/" in r.stderr and (out / "checkpoint-99").is_dir()
    (out / "checkpoint-99").rmdir()
    (out / ".flags.txt.x1y2z3w4.tmp").write_text("left by a kill mid-write")  # mkstemp's form
    r = run_train(*args, "--overwrite_output_dir", "--max_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / ".flags.txt.x1y2z3w4.tmp").exists()
    assert (out / "model.safetensors").is_file()
    assert "--max_steps=1" in (out / "flags.txt").read_text()
