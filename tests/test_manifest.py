"""The run's manifest (manifest.jsonl): every file a run writes is recorded as it is written,
--overwrite_output_dir removes exactly those, and checkpoint checksums catch a flipped bit.

Real train.py runs (6 MLP steps on tiny data) and rundir's real writers; the user's files
planted beside a run are the cases of issue 18 (a lab_notes.md inside runs/, a
.flags.txt.orig backup, a checkpoint-7/ holding a user's file, a plain file checkpoint-5).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import run_train, tiny_args

from ilstudio import rundir
from ilstudio.errors import UserError

BASE = ["--max_steps=6", "--save_steps=3", "--seed=5", "--logging_steps=3",
        "--report_to=tensorboard"]


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK_FILE}


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("manifest") / "run"
    r = run_train(*tiny_args(tiny_data, out, *BASE))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x01  # inside the tensor data: the header and size stay valid
    path.write_bytes(bytes(data))


def test_every_file_of_a_run_is_in_its_manifest_with_a_checksum(finished):
    listed = rundir.read_manifest(finished).files
    on_disk = {p.relative_to(finished).as_posix() for p in finished.rglob("*") if p.is_file()}
    assert on_disk - set(listed) == {rundir.MANIFEST, rundir.LOCK_FILE}
    assert any(p.startswith("runs/") for p in listed)  # TensorBoard's files too
    assert all(len(r["sha256"]) == 64 for r in listed.values())


USER_FILES = ["runs/lab_notes.md", ".flags.txt.orig", "checkpoint-7/mine.txt", "checkpoint-5",
              "checkpoint-3/notes.txt"]


def test_overwrite_lists_user_files_beside_and_inside_the_run_and_removes_nothing(run, tiny_data):
    for name in USER_FILES:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("the user's\n")
    assert rundir.foreign_entries(run) == sorted(USER_FILES[:2] + ["checkpoint-3/notes.txt",
                                                                   "checkpoint-5", "checkpoint-7/"])
    before = snapshot(run)
    r = run_train(*tiny_args(tiny_data, run, *BASE, "--overwrite_output_dir"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "Nothing was removed" in r.stderr
    for name in (".flags.txt.orig", "runs/lab_notes.md", "checkpoint-5", "checkpoint-7/"):
        assert name in r.stderr
    assert snapshot(run) == before


def test_overwrite_removes_exactly_the_listed_files_including_the_evaluators(run):
    # What the evaluator and in-training evaluation write goes through rundir's writers.
    (run / "evals" / "e1").mkdir(parents=True)
    rundir.write_atomic(run / "evals" / "e1" / "eval_episode_0_success.gif", b"GIF89a")
    with rundir.atomic_dir(run / "evals" / "e2") as d:
        (d / "eval_results.json").write_text("{}")
    Path(run / ".config.gin.abcd1234.tmp").write_text("a kill's temporary")
    assert rundir.foreign_entries(run) == []
    removed = rundir.remove_run(run)
    assert "evals/e1/eval_episode_0_success.gif" in removed and "checkpoint-6/optimizer.pt" in removed
    assert [p.name for p in run.iterdir()] == [rundir.LOCK_FILE]


def test_a_torn_manifest_line_under_claims(run):
    with open(run / rundir.MANIFEST, "a") as f:
        f.write('{"path": "paper.tex", "sha2')  # a crash mid-append
    (run / "paper.tex").write_text("x")
    assert rundir.foreign_entries(run) == ["paper.tex"]


def test_a_run_from_before_manifests_is_never_removed(run):
    (run / rundir.MANIFEST).unlink()
    with pytest.raises(UserError, match="no manifest.jsonl"):
        rundir.remove_run(run)
    assert (run / "model.safetensors").is_file()


def test_a_flipped_bit_is_caught_on_resume_and_by_the_evaluators_loader(run, tiny_data):
    from ilstudio.models.state_io import read_state

    flip_a_bit(run / "checkpoint-6" / "model.safetensors")
    assert "sha256" in rundir.checkpoint_problem(run / "checkpoint-6")
    with pytest.raises(UserError, match="is damaged"):
        read_state(run / "checkpoint-6" / "model.safetensors")
    read_state(run / "checkpoint-3" / "model.safetensors")
    flip_a_bit(run / "model.safetensors")
    with pytest.raises(UserError, match="is damaged"):
        read_state(run / "model.safetensors")
    # Resume falls back to the previous complete checkpoint, with a warning.
    (run / rundir.TRAINER_STATE).unlink()
    r = run_train(*tiny_args(tiny_data, run, *BASE, "--resume_from_checkpoint=true"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint-6 is damaged" in r.stderr and "falling back to" in r.stderr
    assert "checkpoint-3" in r.stderr


def test_flipped_bits_in_every_checkpoint_stop_resume(run, tiny_data):
    for step in (3, 6):
        flip_a_bit(run / f"checkpoint-{step}" / "optimizer.pt")
    (run / rundir.TRAINER_STATE).unlink()
    before = snapshot(run)
    r = run_train(*tiny_args(tiny_data, run, *BASE, "--resume_from_checkpoint=true"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "no checkpoint in" in r.stderr and "optimizer.pt differs" in r.stderr
    assert snapshot(run) == before


def test_a_users_own_manifest_file_is_never_appended_to(tmp_path):
    """Only a manifest ilstudio began (its header line, beside a run lock) records writes."""
    (tmp_path / rundir.MANIFEST).write_text("my own notes\n")
    (tmp_path / rundir.LOCK_FILE).write_text("")
    (tmp_path / "sub").mkdir()
    rundir.write_atomic(tmp_path / "sub" / "x.json", "{}")
    assert (tmp_path / rundir.MANIFEST).read_text() == "my own notes\n"
    with pytest.raises(UserError, match="that ilstudio did not write"):
        rundir.start_manifest(tmp_path)
    assert rundir.read_manifest(tmp_path) is None
