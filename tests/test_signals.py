"""Signals during a real train.py run (MLP with dropout, tiny data, a few dozen steps).

SIGINT (Ctrl-C): one line naming the last complete checkpoint and the command that resumes,
exit code 130, no traceback. SIGTERM (a scheduler's notice before preemption): a checkpoint
at the current step, exit code 143, and resuming from it ends bit-identical to a run that
was never interrupted.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_train, tiny_args, train_env

from ilstudio import rundir

STEPS = ["--max_steps=40", "--save_steps=1000", "--seed=11", "--logging_steps=1",
         "--lr_scheduler_type=linear", "--gin_bindings=mlp.dropout = 0.1",
         "--gin_bindings=mlp.hidden_dim = 512"]


def _as_from_a_terminal() -> None:
    """A user's Ctrl-C comes from a shell that leaves SIGINT to the program; a test runner
    started as a background job (``cmd &`` in a script, ``nohup``) has SIGINT ignored, which
    its children inherit and train.py deliberately leaves so (see ilstudio/__init__.py)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                            env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_as_from_a_terminal)


def read_until(proc: subprocess.Popen, marker: bytes, timeout: float = 240) -> bytes:
    """Everything the run printed up to ``marker`` (fails if the run ends first)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        chunk = proc.stdout.read1(4096)
        if not chunk:
            pytest.fail(f"run ended before {marker!r}:\n{seen[-3000:].decode(errors='replace')}")
        seen += chunk
        assert time.monotonic() < deadline, "marker never printed"
    return seen


def finish(proc: subprocess.Popen, seen: bytes) -> tuple[int, str]:
    rest, _ = proc.communicate(timeout=240)
    return proc.returncode, (seen + rest).decode(errors="replace")


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_sigterm_saves_the_current_step_and_the_resume_is_bit_identical(tiny_data, tmp_path):
    reference = tmp_path / "reference"
    r = run_train(*tiny_args(tiny_data, reference, *STEPS))
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "preempted"
    proc = start(tiny_args(tiny_data, out, *STEPS))
    seen = read_until(proc, b"'step': 3,")
    proc.send_signal(signal.SIGTERM)
    code, text = finish(proc, seen)
    assert code == 143, text[-3000:]
    assert "Traceback" not in text
    saved = rundir.last_complete_checkpoint(out)
    step = int(Path(saved).name.split("-")[1])
    assert 3 <= step < 40, text[-2000:]
    assert f"SIGTERM: stopped at step {step} after saving {saved}; resume with: python " in text
    assert not (out / rundir.WEIGHTS).exists()  # not mistaken for a finished run

    r = run_train(*tiny_args(tiny_data, out, *STEPS, "--resume_from_checkpoint=true"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / rundir.TRAINER_STATE).read_text())["global_step"] == 40
    assert same_tensors(reference / rundir.WEIGHTS, out / rundir.WEIGHTS)


def test_sigint_prints_one_line_with_the_checkpoint_and_the_resume_command(tiny_data, tmp_path):
    out = tmp_path / "ctrlc"
    proc = start(tiny_args(tiny_data, out, "--max_steps=100000", "--save_steps=3",
                           "--logging_steps=1"))
    seen = read_until(proc, b"'step': 5,")  # checkpoint-3 is complete by then
    proc.send_signal(signal.SIGINT)
    code, text = finish(proc, seen)
    assert code == 130, text[-3000:]
    assert "Traceback" not in text
    assert text.count("interrupted (Ctrl-C)") == 1, text[-3000:]
    lines = [text[text.index("interrupted (Ctrl-C)"):].splitlines()[0]]
    last = rundir.last_complete_checkpoint(out)
    assert lines[0].startswith(f"interrupted (Ctrl-C): the last complete checkpoint is {last}; "
                               f"resume with: python ")
    assert f"--output_dir={out} " in lines[0]
    assert lines[0].endswith(" --resume_from_checkpoint=true")


class _RaisesInFinalizer:
    """Stands for a finalizer the SIGINT handler interrupts: its KeyboardInterrupt is
    "ignored" by Python (sys.unraisablehook) instead of reaching the training loop."""

    def __del__(self):
        raise KeyboardInterrupt


def test_ctrl_c_lost_in_a_finalizer_still_stops_training_at_the_next_step(tmp_path, monkeypatch):
    """A real PolicyTrainer: at step 3 Ctrl-C arrives (the handler records it) while a
    finalizer runs, so its KeyboardInterrupt is swallowed; the run stops at the next step
    boundary instead of training on (without the LostInterrupt callback, it trains all 50)."""
    import torch
    from transformers import TrainerCallback, TrainingArguments

    import ilstudio
    from ilstudio.policies.mlp.configuration import MLPConfig
    from ilstudio.policies.mlp.modeling import MLPPolicy
    from ilstudio.training.trainer import PolicyTrainer

    monkeypatch.setattr(ilstudio, "_SIGINT_SEEN", [])
    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_type))

    class CtrlCInAFinalizer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                ilstudio._SIGINT_SEEN.append(signal.SIGINT)  # what the handler records
                obj = _RaisesInFinalizer()
                del obj  # the handler's KeyboardInterrupt, raised inside __del__: lost

    data = [{"qpos": torch.randn(14), "action": torch.randn(5, 14), "is_pad": torch.zeros(5, dtype=torch.bool)}
            for _ in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=50, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             dataloader_pin_memory=False)
    trainer = PolicyTrainer(model=MLPPolicy(MLPConfig(hidden_dim=16, num_layers=1), 14, 14, 5, 0, 1),
                            args=args, train_dataset=data, callbacks=[CtrlCInAFinalizer()])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert swallowed == [KeyboardInterrupt]  # the first one really was lost
    assert trainer.state.global_step == 3
