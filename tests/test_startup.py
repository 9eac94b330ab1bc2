"""Start-up cost: --help and --dry_run import none of torch, transformers, peft, bitsandbytes.

The dry run checks hyperparameters against TrainingArguments' fields and enum values read from
the installed transformers' source (ilstudio/config/ta_schema.py), on whatever release is
installed; what it reads must equal the live classes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, tiny_args, train_env

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def _imported_top_level(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "train.py"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=train_env())
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0]
             for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc, names


def test_help_imports_nothing_heavy():
    proc, names = _imported_top_level("--helpshort")
    assert "--learning_rate" in proc.stdout
    assert not names & set(HEAVY), names & set(HEAVY)


def test_dry_run_imports_nothing_heavy(tiny_data, tmp_path):
    proc, names = _imported_top_level(*tiny_args(tiny_data, tmp_path / "o"), "--dry_run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checked against transformers" in proc.stdout
    assert not names & set(HEAVY), names & set(HEAVY)


def test_dry_run_refuses_what_training_arguments_refuses(tiny_data, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"),
                           *tiny_args(tiny_data, tmp_path / "o"), "--dry_run",
                           "--lr_scheduler_type=cosin"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=train_env())
    assert proc.returncode == 2
    assert "--lr_scheduler_type=cosin" in proc.stderr and "did you mean `cosine`" in proc.stderr


def test_source_schema_matches_installed_transformers():
    """Read from the source without importing transformers, equal to the live classes."""
    probe = ("import sys, json; from ilstudio.config import ta_schema; "
             "s = ta_schema.source_schema(); assert 'transformers' not in sys.modules; "
             "print(json.dumps(s))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, env=train_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    from ilstudio.config import ta_schema

    read = json.loads(proc.stdout)
    assert read is not None, "transformers' source could not be read: the dry run would import it"
    assert read == ta_schema.live_schema()


@pytest.mark.parametrize("name,value,ok", [("lr_scheduler_type", "cosine", True),
                                           ("lr_scheduler_type", "cosin", False),
                                           ("optim", "sgd", True), ("optim", "adam", False),
                                           ("save_strategy", "best", True),
                                           ("logging_strategy", "best", False)])
def test_snapshot_check_agrees_with_training_arguments(tmp_path, name, value, ok):
    from ilstudio.config.ta_schema import check_kwargs, source_schema
    from ilstudio.errors import UserError

    kwargs = {"output_dir": str(tmp_path), "report_to": "none", name: value}
    if name == "save_strategy":  # 'best' needs a metric to be valid as a whole
        kwargs.update(metric_for_best_model="loss", eval_strategy="steps")
    light_ok = True
    try:
        check_kwargs(kwargs, source_schema())
    except UserError:
        light_ok = False
    from transformers import TrainingArguments

    try:
        TrainingArguments(**kwargs)
        full_ok = True
    except (ValueError, TypeError):
        full_ok = False
    assert light_ok == full_ok == ok


@pytest.mark.parametrize("fault", ["missing_data", "output_dir_in_use"])
def test_a_real_run_reports_dry_run_faults_before_importing_torch(tiny_data, tmp_path, fault):
    """No --dry_run: the same checks still run before the ~90 s of imports under load."""
    out = tmp_path / "o"
    data = tmp_path / "missing" if fault == "missing_data" else tiny_data
    if fault == "output_dir_in_use":
        out.mkdir()
        (out / "operative_config.gin").write_text("# another run\n")
    proc, names = _imported_top_level(*tiny_args(data, out), "--max_steps=1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not names & set(HEAVY), names & set(HEAVY)
    needle = "python -m ilstudio.data.synthetic" if fault == "missing_data" else "--overwrite_output_dir"
    assert needle in proc.stderr


def test_help_is_grouped_and_helpshort_is_short():
    proc, names = _imported_top_level("--helpshort")
    full, _ = _imported_top_level("--helpfull")
    short_text, full_text = proc.stdout, full.stdout
    headings = ["Run and configuration:", "Optimisation:", "Logging and saving:"]
    assert [short_text.index(h) for h in headings] == sorted(short_text.index(h) for h in headings)
    assert "--adam_beta2" not in short_text and "--adam_beta2" in full_text
    assert "Hardware and data loading:" in full_text
    assert "see --helpshort" not in short_text.lower() and not names & set(HEAVY)
    gin, names = _imported_top_level("--help_gin")
    assert gin.returncode == 0 and not names & set(HEAVY)
    assert "lora.r = 64  (int; YAML lora_r" in gin.stdout and "LoRA rank" in gin.stdout
    assert "sim.render_height = 480" in gin.stdout and "mlp.hidden_dim = 256" in gin.stdout


# A run whose transformers' source cannot be read without importing it (an unusual install):
# the pre-launch check then builds the real TrainingArguments.
_OTHER_RELEASE_RUN = ("import runpy; import ilstudio.config.ta_schema as t; t.source_schema = lambda: None; "
                      f"runpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')")


def test_a_run_without_lora_or_quantization_imports_neither_peft_nor_bitsandbytes(tiny_data, tmp_path):
    """A one-step MLP run that builds TrainingArguments before the Trainer (the pre-launch
    check where the source schema is unavailable; a --training_arg lookup takes the same path,
    ilstudio.config.lazy_peft). bitsandbytes without the optional `kernels` package warns
    "pip install kernels" on import. scipy (transformers' object-detection losses) neither."""
    args = tiny_args(tiny_data, tmp_path / "o", "--max_steps=1", "--training_arg=dataloader_drop_last=true")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", _OTHER_RELEASE_RUN, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=train_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0]
             for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert {"torch", "transformers"} <= names and (tmp_path / "o" / "model.safetensors").exists()
    assert not names & {"peft", "bitsandbytes", "scipy"}, names & {"peft", "bitsandbytes", "scipy"}
    assert "gemm_4bit" not in proc.stderr and "pip install kernels" not in proc.stderr


def test_help_gin_shows_every_declared_range():
    """README says the ranges appear in the help: every bounded gin parameter's line has it."""
    from ilstudio.cli import gin_help
    from ilstudio.config.declare import CONFIGURABLES, params_of

    lines = {line.split(" = ", 1)[0].strip(): line for line in gin_help().splitlines() if " = " in line}
    bounded = [p for cls in CONFIGURABLES.values() for p in params_of(cls) if p.bounds]
    assert len(bounded) > 20
    for p in bounded:
        assert f"in {p.bounds.text}" in lines[p.gin_key], lines[p.gin_key]
    assert lines["lora.r"].endswith("(int; YAML lora_r; in [1, inf))")
    assert lines["dataset.image_size"].endswith("2 values; in [1, inf) each)")
