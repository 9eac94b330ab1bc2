"""What a new user meets on a first run of configs/training/default.yaml: one word about the
DataLoader workers it asks for, "starting fresh" once, and TensorBoard files in the run
directory rather than in the directory the run starts from."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO, run_train, tiny_args

from ilstudio.config.hyperparams import Hyperparams
from ilstudio.config.training_args import tensorboard_dir
from ilstudio.training.threads import usable_cpus, workers_cost


def test_logging_dir_resolves_under_the_run(tmp_path):
    def tb(logging_dir):
        return tensorboard_dir(Hyperparams(output_dir="runs/a", logging_dir=logging_dir))

    assert tb(None) == str(Path("runs/a/runs"))
    assert tb("./logs") == tb("logs") == str(Path("runs/a/runs/logs"))
    assert tb(str(tmp_path / "tb")) == str(tmp_path / "tb")  # absolute: as given


def test_default_yaml_run_says_things_once_and_writes_only_its_run_directory(tmp_path, tiny_data):
    cwd = tmp_path / "work"
    cwd.mkdir()
    out = tmp_path / "run"
    args = [a for a in tiny_args(tiny_data, out) if not a.startswith("--report_to")]
    proc = run_train("--training_config", str(REPO / "configs/training/default.yaml"), *args,
                     "--max_steps=2", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(cwd.iterdir()) == []  # no ./logs where the run started
    assert list((out / "runs" / "logs").glob("events.out.tfevents.*"))  # logging_dir: ./logs
    assert proc.stderr.count("no checkpoint in") == 1
    assert "This DataLoader will create" not in proc.stderr  # torch's (twice) replaced by ours
    cost = workers_cost(8, usable_cpus())
    assert proc.stderr.count("--dataloader_num_workers=8 on") == (cost is not None)


def test_quickstart_reports_cpu_minutes_and_the_largest_process_memory():
    """The quickstart's last line: wall time, CPU-minutes and the peak resident memory of its
    largest process (the training and evaluation run as children)."""
    import re
    import subprocess
    import sys

    from ilstudio.sim.quickstart import cost_line

    subprocess.run([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"],
                   check=True)
    m = re.fullmatch(r"2\.0 min in all, ([\d.]+) CPU-minutes, peak memory ([\d.]+) GiB \(the largest process\)",
                     cost_line(120))
    assert m, cost_line(120)
    assert float(m.group(2)) >= 0.29  # the child's 300 MiB, touched


def _bar_output(monkeypatch, rank: str, terminal: bool) -> str:
    """What progress() writes to stderr when stderr is (or is not) a terminal, on ``rank``."""
    import io
    import os
    import sys

    from ilstudio.data.progress import progress

    monkeypatch.setenv("RANK", rank)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    if not terminal:
        monkeypatch.setattr(sys, "stderr", io.StringIO())
        list(progress(range(3), total=3, desc="loading episodes"))
        return sys.stderr.getvalue()
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    tty = os.fdopen(slave, "w")
    try:
        monkeypatch.setattr(sys, "stderr", tty)
        list(progress(range(3), total=3, desc="loading episodes"))
        tty.flush()
        os.set_blocking(master, False)
        try:
            return os.read(master, 65536).decode(errors="replace")
        except BlockingIOError:  # nothing written
            return ""
    finally:
        tty.close()
        os.close(master)


def test_progress_bars_show_on_rank_zero_terminals_only(monkeypatch):
    assert "loading episodes" in _bar_output(monkeypatch, "0", terminal=True)
    assert _bar_output(monkeypatch, "1", terminal=True) == ""  # other ranks: never
    assert _bar_output(monkeypatch, "0", terminal=False) == ""  # logs, pipes, tests: quiet
