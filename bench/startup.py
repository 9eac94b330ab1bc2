#!/usr/bin/env python
"""Start-up: wall time of `train.py --help`, `--dry_run`, and launch -> first optimizer step,
the last beside a plain PyTorch script doing the same first step.

Each is a fresh process, repeated; the median is reported with min and max (the machine
is shared, so spread is contention). The first-step time runs the real train.py entry
point with a callback that stamps the wall clock when optimizer step 1 ends, then exits.
Also lists which heavy libraries each command imported (python -X importtime).

    OMP_NUM_THREADS=1 python bench/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")

FIRST_STEP = r"""
import os, sys, time
sys.argv[0] = "train.py"
import ilstudio.training.lazy_imports as lazy_imports

real_import = lazy_imports.import_trainer


def import_trainer(need_peft):
    # The stamp is attached once train.py has imported the Trainer its own way (importing it
    # here first would change what train.py imports).
    real_import(need_peft)
    from transformers import TrainerCallback
    from ilstudio.training.trainer import PolicyTrainer

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                print(f"FIRST_STEP_AT {time.time():.6f}", flush=True)
                os._exit(0)

    real = PolicyTrainer.__init__

    def init(self, *a, **k):
        real(self, *a, **k)
        self.add_callback(Stamp())

    PolicyTrainer.__init__ = init


lazy_imports.import_trainer = import_trainer
from absl import flags
from ilstudio.config import hyperparams
from ilstudio.main import run_cli
flags.adopt_module_key_flags(hyperparams)
run_cli()
"""


# The plain PyTorch script a user would write for the same first step: the same episodes
# through the same Dataset, the same MLP, a DataLoader and AdamW; no flags, gin, or Trainer.
PLAIN_FIRST_STEP = r"""
import sys, time
import torch
from torch.utils.data import DataLoader
from ilstudio.config.settings import DatasetSettings, ModelSettings, TaskSettings
from ilstudio.data.checked import check_dataset
from ilstudio.data.dataset import build_datasets
from ilstudio.policies import build_policy, policy_config_class

task = TaskSettings(dataset_dir=sys.argv[1], camera_names=("top",), episode_len=50)
dataset, model_settings = DatasetSettings(), ModelSettings()
train_ds = build_datasets(check_dataset(task, dataset), task, dataset, model_settings.chunk_size, False, 42)[0]
torch.manual_seed(42)
model = build_policy("mlp", policy_config=policy_config_class("mlp")(hidden_dim=256, num_layers=3),
                     task=task, dataset=dataset, model=model_settings, use_images=True)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
batch = next(iter(DataLoader(train_ds, batch_size=8, shuffle=True)))
model(**batch)["loss"].backward()
opt.step()
print(f"FIRST_STEP_AT {time.time():.6f}", flush=True)
"""


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS=e.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
             TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    return e


def wall(cmd: list[str], ok=(0,)) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env())
    dt = time.perf_counter() - t0
    if proc.returncode not in ok:
        raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return dt


def first_step(args: list[str], script: str = FIRST_STEP) -> tuple[float, float]:
    """(wall seconds to the end of optimizer step 1, CPU seconds the process used: it exits
    right after that step). CPU time moves far less than wall time on a shared machine."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO,
                          capture_output=True, text=True, env=env())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for line in proc.stdout.splitlines():
        if line.startswith("FIRST_STEP_AT "):
            return float(line.split()[1]) - t0, cpu
    raise SystemExit(f"no first step ({proc.returncode}):\n{proc.stderr[-2000:]}")


def heavy_imports(cmd_args: list[str]) -> list[str]:
    proc = subprocess.run([sys.executable, "-X", "importtime", *cmd_args], cwd=REPO,
                          capture_output=True, text=True, env=env())
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0]
             for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return sorted(names & set(HEAVY))


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s (min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--before", action="store_true",
                   help="also time train.py with the Trainer imported the old way (peft, bitsandbytes)")
    a = p.parse_args()
    from overhead import machine

    from ilstudio.data.synthetic import write_synthetic_dataset

    print(f"machine: {machine()}")
    train = str(REPO / "train.py")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic_dataset(data)
        run = ["--task_name=tiny_synthetic", "--gin_file=gin_configs/mlp.gin",
               f"--gin_bindings=task.dataset_dir = '{data}'"]
        rows = []
        help_t = [wall([sys.executable, train, "--help"]) for _ in range(a.repeats)]
        rows.append(("train.py --help", summary(help_t), "< 1 s", heavy_imports([train, "--help"])))
        dry = [*run, f"--output_dir={tmp}/dry", "--dry_run"]
        dry_t = [wall([sys.executable, train, *dry]) for _ in range(a.repeats)]
        rows.append(("train.py --dry_run", summary(dry_t), "< 3 s", heavy_imports([train, *dry])))
        # train.py and the plain script alternate (A B A B ...), so a load change hits both;
        # the ratio is taken per pair, then the median.
        ours, theirs, before = [], [], []
        for i in range(a.repeats):
            ours.append(first_step([*run, f"--output_dir={tmp}/run{i}", "--report_to=none"]))
            theirs.append(first_step([str(data)], PLAIN_FIRST_STEP))
            if a.before:  # train.py as it was: the Trainer imported with peft (and bitsandbytes)
                before.append(first_step([*run, f"--output_dir={tmp}/before{i}", "--report_to=none"],
                                         "import transformers.trainer\n" + FIRST_STEP))
        fs, plain = [w for w, _ in ours], [w for w, _ in theirs]
        ratios = [x / y for x, y in zip(fs, plain, strict=True)]
        cpu_ratios = [x[1] / y[1] for x, y in zip(ours, theirs, strict=True)]
        first_heavy = heavy_imports(["-c", FIRST_STEP, *run, f"--output_dir={tmp}/imports",
                                     "--report_to=none"])
        rows.append(("launch -> first optimizer step: train.py (default MLP, tiny data)", summary(fs),
                     "-", first_heavy))
        rows.append(("launch -> first optimizer step: plain PyTorch script (same Dataset, MLP)",
                     summary(plain), "-", heavy_imports(["-c", PLAIN_FIRST_STEP, str(data)])))
    print()
    print("| command | wall time (median) | goal | heavy libraries imported |")
    print("|---|---|---|---|")
    for name, t, goal, heavy in rows:
        print(f"| {name} | {t} | {goal} | {', '.join(heavy) or 'none'} |")
    print(f"\nfirst step, train.py / plain script: median ratio {statistics.median(ratios):.2f} "
          f"(pairs: {' '.join(f'{r:.2f}' for r in ratios)}; goal <= 1.2)")
    if before:
        print(f"before (peft and bitsandbytes imported): wall {summary([w for w, _ in before])}, "
              f"CPU {statistics.median([c for _, c in before]):.2f} s, ratios to the plain script: "
              f"wall {statistics.median([x[0] / y[0] for x, y in zip(before, theirs, strict=True)]):.2f}, "
              f"CPU {statistics.median([x[1] / y[1] for x, y in zip(before, theirs, strict=True)]):.2f}")
    print(f"CPU seconds to the first step: train.py {statistics.median([c for _, c in ours]):.2f}, "
          f"plain {statistics.median([c for _, c in theirs]):.2f}, median ratio "
          f"{statistics.median(cpu_ratios):.2f} (pairs: {' '.join(f'{r:.2f}' for r in cpu_ratios)})")


if __name__ == "__main__":
    main()
