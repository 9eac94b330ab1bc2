#!/usr/bin/env python
"""Framework overhead: train.py's Trainer path vs a plain PyTorch loop, same model, one process.

Trainer side: ``ilstudio.training.run.train`` exactly as train.py runs it (flags -> resolve ->
datasets with ``dataset.preload_data = True`` -> policy -> PolicyTrainer), timed by a
callback between optimizer steps W and W+N. Plain side: a deep copy of the same initial
model, the first batches pre-collated into tensors once (data in memory, no DataLoader),
AdamW with the same hyperparameters, the same linear schedule and gradient clipping, timed
over the same N steps. Runs alternate (plain, trainer, plain, ...) so machine contention
hits both; medians are reported. Ratio = trainer steps/s / plain steps/s (goal >= 0.95).

    OMP_NUM_THREADS=1 python bench/overhead.py [--policies mlp,act] [--repeats 3]
        [--profile] [--trainer_flag=--training_arg=disable_tqdm=true ...]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Small but not trivial: per-policy gin bindings that keep a CPU step in the ms range.
POLICY_FLAGS = {
    "mlp": [],
    "act": ["--gin_file=gin_configs/act.gin", "--gin_bindings=act.hidden_dim = 64",
            "--gin_bindings=act.dim_feedforward = 128", "--gin_bindings=act.enc_layers = 2",
            "--gin_bindings=act.nheads = 4"],
}


def machine() -> str:
    import torch

    return (f"{platform.node()} | {platform.processor() or platform.machine()} | "
            f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} | "
            f"load avg {os.getloadavg()[0]:.1f} | torch {torch.__version__} | "
            f"python {platform.python_version()}")


class Capture:
    """Patches PolicyTrainer to time steps and hand over its initial model and dataset."""

    def __init__(self, warmup: int, steps: int) -> None:
        from transformers import TrainerCallback

        from ilstudio.training.trainer import PolicyTrainer

        self.warmup, self.steps = warmup, steps
        self.t0 = self.t1 = 0.0
        self.model = self.dataset = self.args = self.trainer = None
        capture = self

        class Timer(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == capture.warmup:
                    capture.t0 = time.perf_counter()
                elif state.global_step == capture.warmup + capture.steps:
                    capture.t1 = time.perf_counter()

        real_init = PolicyTrainer.__init__

        def init(trainer, *a, **k):
            real_init(trainer, *a, **k)
            trainer.add_callback(Timer())
            capture.model = copy.deepcopy(trainer.model)
            capture.dataset, capture.args, capture.trainer = trainer.train_dataset, trainer.args, trainer

        PolicyTrainer.__init__ = init

    @property
    def steps_per_s(self) -> float:
        return self.steps / (self.t1 - self.t0)


def run_trainer(cap: Capture, data: Path, out: Path, policy: str, batch: int, extra: list[str]):
    import gin

    from ilstudio.config.resolve import resolve_argv
    from ilstudio.training.run import train

    gin.clear_config()
    argv = ["--task_name=tiny_synthetic", f"--gin_bindings=task.dataset_dir = '{data}'",
            "--gin_bindings=dataset.preload_data = True", *POLICY_FLAGS[policy],
            f"--output_dir={out}", f"--per_device_train_batch_size={batch}",
            f"--max_steps={cap.warmup + cap.steps}", "--save_strategy=no", "--report_to=none",
            "--learning_rate=1e-4", *extra]
    train(resolve_argv(argv))
    return cap.steps_per_s


def run_plain(model, dataset, args, warmup: int, steps: int) -> float:
    """The loop a user would write: no DataLoader, no callbacks, no logging."""
    import torch
    from transformers import default_data_collator

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(8):
        idx = torch.randint(len(dataset), (args.per_device_train_batch_size,), generator=g)
        batches.append(default_data_collator([dataset[int(i)] for i in idx]))
    groups = getattr(model, "optimizer_param_groups", None)
    params = groups(args.learning_rate, args.weight_decay) if callable(groups) else None
    params = params or [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                            eps=args.adam_epsilon, weight_decay=args.weight_decay)
    total = warmup + steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (total - s) / total))
    model.train()
    t0 = 0.0
    for step in range(total):
        if step == warmup:
            t0 = time.perf_counter()
        loss = model(**batches[step % len(batches)])["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - t0)


def measure(a, cap: Capture, data: Path, tmp: Path, policy: str, variant: str) -> tuple:
    trainer_sps, plain_sps = [], []
    for r in range(a.repeats):
        out = tmp / f"{policy}-{variant}-{r}"
        if a.profile and r == 0:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            trainer_sps.append(run_trainer(cap, data, out, policy, a.batch, a.trainer_flag))
            prof.disable()
            print(f"--- cProfile of the {policy} ({variant}) Trainer run (top 30) ---")
            pstats.Stats(prof).sort_stats(os.environ.get("BENCH_PROFILE_SORT", "cumulative")).print_stats(30)
        else:
            trainer_sps.append(run_trainer(cap, data, out, policy, a.batch, a.trainer_flag))
        plain_sps.append(run_plain(copy.deepcopy(cap.model), cap.dataset, cap.args, a.warmup, a.steps))
    t, pl = statistics.median(trainer_sps), statistics.median(plain_sps)
    return (policy, variant, t, pl, t / pl, trainer_sps, plain_sps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policies", default="mlp,act")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="cProfile one Trainer run per policy")
    p.add_argument("--variants", default="per_sample,batched",
                   help="data paths to time the Trainer with: per_sample (__getitem__ + "
                        "default_data_collator, as before ilstudio/data/batched.py), batched")
    p.add_argument("--trainer_flag", action="append", default=[],
                   help="extra train.py flag for the Trainer side (repeatable)")
    a = p.parse_args()

    import torch
    from absl import logging as absl_logging

    from ilstudio.data.synthetic import write_synthetic_dataset

    absl_logging.set_verbosity("error")
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(f"machine: {machine()}")
    print(f"batch {a.batch}, {a.steps} timed steps after {a.warmup} warm-up, {a.repeats} repeats, "
          f"trainer flags {a.trainer_flag or 'default'}")
    cap = Capture(a.warmup, a.steps)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic_dataset(data, num_episodes=4, episode_len=100)
        for policy in [x for x in a.policies.split(",") if x]:
            if policy == "act" and not (REPO / "ilstudio/policies/act/modeling.py").exists():
                print("act: not available, skipped")
                continue
            for variant in [v for v in a.variants.split(",") if v]:
                import ilstudio.data.batched as batched_mod

                real_can_batch = batched_mod.can_batch
                if variant == "per_sample":
                    batched_mod.can_batch = lambda ds: False
                try:
                    rows.append(measure(a, cap, data, Path(tmp), policy, variant))
                finally:
                    batched_mod.can_batch = real_can_batch
    print()
    print("| policy | data path | batch | train.py steps/s | plain loop steps/s | ratio | "
          "runs (trainer / plain) |")
    print("|---|---|---|---|---|---|---|")
    for policy, variant, t, pl, ratio, ts, ps in rows:
        runs = " ".join(f"{x:.1f}" for x in ts) + " / " + " ".join(f"{x:.1f}" for x in ps)
        print(f"| {policy} | {variant} | {a.batch} | {t:.1f} | {pl:.1f} | {ratio:.3f} | {runs} |")


if __name__ == "__main__":
    main()
