"""Resume rules that cover the data and the checkpoint's contents, and what must hold before
the first step (real train.py runs: 6 MLP steps on tiny synthetic data).

- The run records its data's fingerprint: added, removed or changed episodes are refused
  (exit 2, nothing written); the saved normalization is never recomputed silently.
- A checkpoint without optimizer/scheduler/RNG state (save_only_model) is refused unless
  --resume_weights_only, and then the log says the run will not be bit-identical.
- Another architecture's checkpoint is refused before anything is written.
- lora.lr newly set or unset is refused (its optimizer groups change).
- A resumed run holds the directory's lock.
- What the first step needs (optimizer package, scheduler arguments, a writable
  --logging_dir) fails before the output directory exists.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_train, tiny_args, train_env

from ilstudio import rundir
from ilstudio.errors import UserError

BASE = ["--max_steps=6", "--save_steps=3", "--seed=5", "--logging_steps=3"]


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK_FILE}


@pytest.fixture(scope="module")
def data_and_run(tmp_path_factory) -> tuple[Path, Path]:
    """Its own copy of the data (the tests change it), and a finished run on it."""
    from ilstudio.data.synthetic import write_synthetic_dataset

    base = tmp_path_factory.mktemp("resume_rules")
    write_synthetic_dataset(base / "data", num_episodes=4, episode_len=50)
    out = base / "run"
    r = run_train(*tiny_args(base / "data", out, *BASE))
    assert r.returncode == 0, r.stderr[-3000:]
    return base / "data", out


@pytest.fixture
def copied(data_and_run, tmp_path) -> tuple[Path, Path]:
    """(data, run) copies an unfinished run (killed after checkpoint-6) may be resumed from."""
    data, run = data_and_run
    d = Path(shutil.copytree(data, tmp_path / "data"))
    out = Path(shutil.copytree(run, tmp_path / "run"))
    (out / rundir.TRAINER_STATE).unlink()
    for f in ("flags.txt", "config.gin"):  # the copy's data directory, as the run knew it
        (out / f).write_text((out / f).read_text().replace(str(data), str(d)))
    fp = json.loads((out / rundir.DATA_FINGERPRINT).read_text())
    for e in fp["episodes"]:
        e["episode"] = e["episode"].replace(str(data), str(d))
    (out / rundir.DATA_FINGERPRINT).write_text(json.dumps(fp))
    return d, out


def resume(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_train(*tiny_args(data, out, *BASE, "--resume_from_checkpoint=true", *extra))


def refused(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for w in words:
        assert w in r.stderr, (w, r.stderr[-2000:])


@pytest.mark.parametrize("damage", [
    "",                                        # truncated to nothing
    '{"episodes": [{"episode": "a", "len',     # torn mid-write
    "[1, 2, 3]",                               # valid JSON, not an object
    '{"episodes": [7]}',                       # entries that are not objects
    '{"episodes": [{"episode": "a"}]}',        # an entry without length and size
])
def test_a_damaged_data_fingerprint_is_refused_naming_the_file(copied, damage):
    """The fingerprint is a file the run reads back: a damaged one is a clear refusal
    (exit 2, the file named), never a traceback, and the run directory is left as it was."""
    data, out = copied
    (out / rundir.DATA_FINGERPRINT).write_text(damage)
    before = snapshot(out)
    refused(resume(data, out, "--dry_run"), str(out / rundir.DATA_FINGERPRINT), "damaged")
    assert snapshot(out) == before


def test_the_run_records_its_data(data_and_run):
    data, run = data_and_run
    fp = json.loads((run / rundir.DATA_FINGERPRINT).read_text())
    assert [e["length"] for e in fp["episodes"]] == [50] * 4
    assert all(e["bytes"] > 0 and e["episode"].startswith(str(data)) for e in fp["episodes"])


def test_added_removed_or_changed_episodes_are_refused_on_resume(copied):
    from ilstudio.data.synthetic import write_synthetic_dataset

    data, out = copied
    before = snapshot(out)
    episodes = sorted(data.glob("*.hdf5"))
    shutil.copy(episodes[0], data / "episode_99.hdf5")
    refused(resume(data, out, "--dry_run"), "dataset is not the one the run trained on",
            "added: ", "episode_99.hdf5")
    (data / "episode_99.hdf5").unlink()
    episodes[1].unlink()
    refused(resume(data, out), "removed: ", episodes[1].name)
    write_synthetic_dataset(data, num_episodes=2, episode_len=30)  # rewrites episodes 0 and 1
    refused(resume(data, out), "changed length or size: ", episodes[0].name)
    assert snapshot(out) == before


def test_normalization_is_never_silently_recomputed(copied, tmp_path):
    from ilstudio.resume import check_same_normalization

    data, out = copied
    from ilstudio.data.normalization import NormStats

    stats = NormStats.load(out / rundir.NORM_STATS)
    check_same_normalization(out, stats, "ckpt")  # the same statistics pass
    stats.qpos_mean = stats.qpos_mean + 1e-3  # the episodes' contents changed, sizes did not
    with pytest.raises(UserError, match="normalization computed from the data differs"):
        check_same_normalization(out, stats, "ckpt")


def test_weights_only_checkpoint_is_refused_unless_declared(tiny_data, tmp_path):
    out = tmp_path / "light"
    r = run_train(*tiny_args(tiny_data, out, *BASE, "--training_arg=save_only_model=true"))
    assert r.returncode == 0, r.stderr[-3000:]
    (out / rundir.TRAINER_STATE).unlink()
    before = snapshot(out)
    r = run_train(*tiny_args(tiny_data, out, *BASE, "--training_arg=save_only_model=true",
                             "--resume_from_checkpoint=true", "--max_steps=8"))
    refused(r, "checkpoint-6 holds the model's weights but not optimizer.pt, scheduler.pt, "
               "rng_state*.pth", "--resume_weights_only")
    assert snapshot(out) == before
    r = run_train(*tiny_args(tiny_data, out, *BASE, "--training_arg=save_only_model=true",
                             "--resume_from_checkpoint=true", "--max_steps=8",
                             "--resume_weights_only"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "will NOT be bit-identical" in r.stderr
    assert json.loads((out / rundir.TRAINER_STATE).read_text())["global_step"] == 8


def test_another_architectures_checkpoint_is_refused_before_writing(copied):
    import torch
    from safetensors.torch import save_file

    data, out = copied
    foreign = out / "checkpoint-9"
    shutil.copytree(out / "checkpoint-6", foreign)
    state = json.loads((foreign / rundir.TRAINER_STATE).read_text())
    state["global_step"] = 9
    (foreign / rundir.TRAINER_STATE).write_text(json.dumps(state))
    save_file({"backbone.layer.0.weight": torch.zeros(3, 3)}, str(foreign / rundir.WEIGHTS))
    before = snapshot(out)
    refused(resume(data, out, "--max_steps=12"), "checkpoint-9", "is not a checkpoint of the "
            "policy this configuration builds", "backbone.layer.0.weight")
    assert snapshot(out) == before


def test_a_checkpoint_missing_one_of_the_policys_tensors_is_refused(copied):
    """It used to load the rest and fail in transformers with an AttributeError (found by
    bench/hostile.py's resume family)."""
    from safetensors.torch import load_file, save_file

    data, out = copied
    state = load_file(str(out / "checkpoint-6" / rundir.WEIGHTS))
    gone = sorted(state)[0]
    del state[gone]
    save_file(state, str(out / "checkpoint-6" / rundir.WEIGHTS))
    (out / rundir.MANIFEST).write_text("\n".join(  # as if the run had written it so
        ln for ln in (out / rundir.MANIFEST).read_text().splitlines()
        if "checkpoint-6/model.safetensors" not in ln) + "\n")
    before = snapshot(out)
    refused(resume(data, out), "checkpoint-6", "missing", gone)
    assert snapshot(out) == before


@pytest.mark.parametrize("saved,now", [("None", "1e-4"), ("1e-4", "None")])
def test_lora_lr_newly_set_or_unset_is_refused(tmp_path, saved, now):
    """lora.lr between unset and set changes the optimizer's parameter groups (a saved
    optimizer state no longer fits): the resume rules refuse it, naming the key."""
    from ilstudio.resume import check_resume
    from ilstudio.tools.diff import Config, parse_gin_text

    (tmp_path / rundir.OPERATIVE).write_text(f"lora.lr = {saved}\nlora.r = 8\n")
    (tmp_path / rundir.FLAGFILE).write_text("--learning_rate=0.001\n")
    new = Config("now", gin=parse_gin_text(f"lora.lr = {now}\nlora.r = 8\n", "now"),
                 flags={"learning_rate": "0.001"})
    with pytest.raises(UserError, match="lora.lr"):
        check_resume(tmp_path, new, "checkpoint-5")
    same = Config("now", gin=parse_gin_text(f"lora.lr = {saved}\nlora.r = 8\n", "now"),
                  flags={"learning_rate": "0.001"})
    assert check_resume(tmp_path, same, "checkpoint-5") == []


def test_a_resumed_run_holds_the_lock(copied):
    data, out = copied
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"),
                             *tiny_args(data, out, *BASE, "--max_steps=100000",
                                        "--resume_from_checkpoint=true")],
                            cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while rundir.lock_holder(out) is None or f"PID {proc.pid} " not in rundir.lock_holder(out):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = run_train(*tiny_args(data, out, *BASE, "--resume_from_checkpoint=true", "--dry_run"))
        refused(r, f"is in use by another run (PID {proc.pid} ")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def test_what_the_first_step_needs_fails_before_anything_is_written(tiny_data, tmp_path):
    out = tmp_path / "never"
    r = run_train(*tiny_args(tiny_data, out, "--max_steps=2",
                             "--lr_scheduler_type=cosine_with_min_lr"))
    refused(r, "--lr_scheduler_type=cosine_with_min_lr", "lr_scheduler_kwargs", "Nothing was written")
    assert not out.exists()


def test_an_optimizer_whose_package_is_missing_is_a_user_error(tmp_path):
    """The same probe, in-process (train.py calls it before the lock, as above)."""
    import torch
    from transformers import TrainingArguments

    from ilstudio.training.run import _probe_optimizer

    args = TrainingArguments(output_dir=str(tmp_path / "never"), optim="galore_adamw",
                             max_steps=2, use_cpu=True, report_to=[])
    with pytest.raises(UserError, match="--optim=galore_adamw: the optimizer cannot be built.*galore_torch"):
        _probe_optimizer(args, torch.nn.Linear(2, 2))
    assert not (tmp_path / "never").exists()


def test_an_unwritable_logging_dir_fails_dry_run_and_run(tiny_data, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "never"
    for extra in (["--dry_run"], []):
        r = run_train(*tiny_args(tiny_data, out, "--max_steps=2", "--report_to=tensorboard",
                                 f"--logging_dir={tmp_path / 'file' / 'tb'}", *extra))
        refused(r, "--logging_dir=", "is not a directory")
        assert not out.exists()
