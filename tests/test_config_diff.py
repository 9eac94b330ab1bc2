"""Comparing configurations: the diff CLI, and what a resume does with a changed config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, finished_run, run_train, train_env

from ilstudio.tools import diff


def run_diff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ilstudio.tools.diff", *args], cwd=REPO,
                          capture_output=True, text=True, env=train_env(), timeout=120)


def test_gin_files_are_parsed_as_data_never_executed(tmp_path):
    marker = tmp_path / "imported"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    a = tmp_path / "a.gin"
    a.write_text("import evil\nimport no_such_module_anywhere\n"
                 "lora.r = 16\nmodel.chunk_size = %CHUNK\nCHUNK = 10\n"
                 "scope/mlp.hidden_dim = 64\nfoo.bar = @baz()\n")
    b = tmp_path / "b.gin"
    b.write_text("include 'a.gin'\nlora.r = 32\n")
    sys.path.insert(0, str(tmp_path))
    try:
        ga, gb = diff.load(a), diff.load(b)
    finally:
        sys.path.remove(str(tmp_path))
    assert not marker.exists() and "evil" not in sys.modules
    assert ga.gin["lora.r"] == "16" and gb.gin["lora.r"] == "32"
    assert ga.gin["model.chunk_size"] == "%CHUNK" and ga.gin["%CHUNK"] == "10"
    assert ga.gin["scope/mlp.hidden_dim"] == "64" and ga.gin["foo.bar"] == "@baz()"
    assert [d.key for d in diff.compare(ga, gb)] == ["lora.r"]
    # Unset parameters read as their declared defaults, so they do not show as differences.
    assert ga.gin["lora.alpha"] == "256" and ga.flags["learning_rate"] == "0.0001"


def test_cli_groups_by_configurable_and_flags_with_both_values(tmp_path):
    a = tmp_path / "a.gin"
    a.write_text("lora.r = 16\nmlp.hidden_dim = 64\n")
    y = tmp_path / "b.yaml"
    y.write_text("lora_r: 8\nlearning_rate: 1e-3\nper_device_train_batch_size: '8'\n")
    r = run_diff(str(a), str(y))
    assert r.returncode == 1, r.stderr
    out = r.stdout
    assert "[lora]\n  lora.r: 16 -> 8" in out
    assert "[mlp]\n  mlp.hidden_dim: 64 -> 256" in out
    assert "[flags]" in out and "--learning_rate: 0.0001 -> 0.001" in out
    assert "per_device_train_batch_size" not in out  # '8' == 8: not a difference
    assert out.index("[lora]") < out.index("[mlp]") < out.index("[flags]")
    same = run_diff(str(a), str(a))
    assert same.returncode == 0 and "no differences" in same.stdout
    bad = run_diff(str(a), str(tmp_path / "nope"))
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def short_run(tiny_data, tmp_path_factory) -> tuple[Path, list[str]]:
    return finished_run(tmp_path_factory, "diffrun", tiny_data, "--max_steps=10", "--save_steps=5")


def test_cli_compares_two_run_directories(short_run, tmp_path):
    out, _ = short_run
    other = tmp_path / "other"
    other.mkdir()
    (other / "operative_config.gin").write_text(
        (out / "operative_config.gin").read_text().replace("mlp.hidden_dim = 256", "mlp.hidden_dim = 512"))
    (other / "flags.txt").write_text(
        (out / "flags.txt").read_text().replace("--learning_rate=0.0001", "--learning_rate=0.01"))
    r = run_diff(str(out), str(other))
    assert r.returncode == 1
    assert "mlp.hidden_dim: 256 -> 512" in r.stdout and "--learning_rate: 0.0001 -> 0.01" in r.stdout
    assert "gin_file" not in r.stdout  # each run's own config.gin path is not a difference


def test_resume_refuses_breaking_changes_and_records_allowed_ones(short_run):
    out, args = short_run
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = run_train(*args, "--resume_from_checkpoint=true", "--gin_bindings=mlp.hidden_dim = 128",
                  "--gin_bindings=model.chunk_size = 10", "--optim=sgd", "--learning_rate=0.001")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    for line in ("mlp.hidden_dim: 256 -> 128", "model.chunk_size: 20 -> 10", "--optim: adamw_torch -> sgd"):
        assert line in r.stderr, r.stderr[-3000:]
    assert "learning_rate" not in r.stderr.split("cannot resume")[1]  # allowed: not listed as breaking
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing rewritten

    r = run_train(*[a for a in args if a != "--max_steps=10"], "--max_steps=15",
                  "--resume_from_checkpoint=true", "--learning_rate=0.001")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--learning_rate: 0.0001 -> 0.001" in r.stderr and "--max_steps: 10 -> 15" in r.stderr
    changes = (out / "resume_changes.txt").read_text()
    assert "resumed from" in changes and str(out / "checkpoint-10") in changes
    assert "--learning_rate: 0.0001 -> 0.001" in changes and "--max_steps: 10 -> 15" in changes
    assert "--max_steps=15" in (out / "flags.txt").read_text()  # the dumps describe the new config
    assert (out / "checkpoint-15").is_dir()
