#!/usr/bin/env python
"""Framework overhead: train.py's Trainer path vs a plain PyTorch loop, same model, one process.

Trainer side: ``ilstudio.training.run.train`` exactly as train.py runs it (flags -> resolve ->
datasets with ``dataset.preload_data = True`` -> policy -> PolicyTrainer). Plain side: a
deep copy of the same initial model, the Trainer's own training Dataset through a DataLoader
built like train.py's (same collate, batch size, workers, random order), AdamW with the same
hyperparameters, the same linear schedule and gradient clipping. Both run in the same process, interleaved step by step (see Capture), so
contention on a shared machine hits both alike. Per run: median step time of each side;
ratio = trainer steps/s / plain steps/s (goal >= 0.95); the table gives medians over runs.

    OMP_NUM_THREADS=1 python bench/overhead.py [--policies mlp,act] [--repeats 3]
        [--profile] [--trainer_flag=--training_arg=disable_tqdm=true ...]
"""

from __future__ import annotations

import argparse
import contextlib
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
    "mlp": ["--gin_file=gin_configs/mlp.gin"],
    # the same policy at a width where a step costs more than the Trainer's fixed per-step work
    "mlp_wide": ["--gin_file=gin_configs/mlp.gin", "--gin_bindings=mlp.hidden_dim = 2048", "--gin_bindings=mlp.num_layers = 4"],
    "act": ["--gin_file=gin_configs/act.gin", "--gin_bindings=act.hidden_dim = 64",
            "--gin_bindings=act.dim_feedforward = 128", "--gin_bindings=act.enc_layers = 2",
            "--gin_bindings=act.nheads = 4"],
    # the VLA on make_tiny's random backbone (written into the temporary directory)
    "vla": ["--gin_file=gin_configs/vla.gin", "--gin_bindings=model.model_name_or_path = '{backbone}'"],
}
SLOW = ("act", "vla")  # a CPU step costs 10-100x the MLP's: smaller batch, fewer steps


def machine() -> str:
    import torch

    return (f"{platform.node()} | {platform.processor() or platform.machine()} | "
            f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} | "
            f"load avg {os.getloadavg()[0]:.1f} | torch {torch.__version__} | "
            f"python {platform.python_version()}")


class PlainLoop:
    """The loop a user would write over train.py's own data: the same Dataset object, a
    DataLoader with train.py's collate function, batch size, workers and random order; no
    callbacks, no logging; AdamW, linear schedule and clipping as the Trainer's. The ratio
    therefore measures the Trainer, not a different data path."""

    def __init__(self, model, dataset, args, total_steps: int) -> None:
        import torch
        from torch.utils.data import DataLoader, RandomSampler

        from ilstudio.data.batched import collate

        self.model = model
        self.loader = DataLoader(
            dataset, batch_size=args.per_device_train_batch_size,
            sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(0)),
            collate_fn=collate, num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory, drop_last=args.dataloader_drop_last,
            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0)
        self.batches = iter(self.loader)
        groups = getattr(model, "optimizer_param_groups", None)
        params = groups(args.learning_rate, args.weight_decay) if callable(groups) else None
        params = params or [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=args.learning_rate, eps=args.adam_epsilon,
                                     betas=(args.adam_beta1, args.adam_beta2),
                                     weight_decay=args.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: max(0.0, (total_steps - s) / total_steps))
        self.max_grad_norm, self.n = args.max_grad_norm, 0
        model.train()

    def step(self) -> None:
        import torch

        try:
            batch = next(self.batches)
        except StopIteration:  # next epoch
            self.batches = iter(self.loader)
            batch = next(self.batches)
        loss = self.model(**batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.n += 1


class Capture:
    """Patches PolicyTrainer so every Trainer step is followed by one plain-loop step.

    A callback at each step end runs one step of a PlainLoop on a deep copy of the same
    initial model, timing it; the Trainer's step time is the interval from the end of one
    callback to the start of the next (data loading, forward, backward, optimizer, logging,
    callbacks: everything the Trainer does per step). Interleaving step by step exposes
    both sides to the same contention on a shared machine; medians drop the spikes.
    """

    def __init__(self, warmup: int, steps: int) -> None:
        from transformers import TrainerCallback

        from ilstudio.training.trainer import PolicyTrainer

        self.warmup, self.steps = warmup, steps
        self.trainer_times: list[float] = []
        self.plain_times: list[float] = []
        capture = self

        class Interleave(TrainerCallback):
            last = None

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                capture.trainer_times, capture.plain_times, self.last = [], [], None
                capture.plain = PlainLoop(copy.deepcopy(capture.initial), capture.dataset, args,
                                          capture.warmup + capture.steps)

            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                timed = state.global_step > capture.warmup
                if timed and self.last is not None:
                    capture.trainer_times.append(now - self.last)
                t0 = time.perf_counter()
                capture.plain.step()
                if timed:
                    capture.plain_times.append(time.perf_counter() - t0)
                self.last = time.perf_counter()

        real_init = PolicyTrainer.__init__

        def init(trainer, *a, **k):
            real_init(trainer, *a, **k)
            capture.initial = copy.deepcopy(trainer.model)
            capture.dataset = trainer.train_dataset
            trainer.add_callback(Interleave())

        PolicyTrainer.__init__ = init


def run_trainer(cap: Capture, data: Path, out: Path, policy: str, batch: int,
                extra: list[str]) -> tuple[float, float]:
    """(trainer steps/s, plain steps/s), from per-step medians of one interleaved run."""
    import gin

    from ilstudio.plan import make_plan
    from ilstudio.resolve import resolve_argv
    from ilstudio.training.run import train

    gin.clear_config()
    argv = ["--task_name=tiny_synthetic", f"--gin_bindings=task.dataset_dir = '{data}'",
            "--gin_bindings=dataset.preload_data = True",
            *[f.format(backbone=data.parent / "vla_tiny") for f in POLICY_FLAGS[policy]],
            f"--output_dir={out}", f"--per_device_train_batch_size={batch}",
            f"--max_steps={cap.warmup + cap.steps + 1}", "--save_strategy=no",
            "--report_to=none", "--learning_rate=1e-4", *extra]
    train(make_plan(resolve_argv(argv)))
    return 1 / statistics.median(cap.trainer_times), 1 / statistics.median(cap.plain_times)


def measure(a, cap: Capture, data: Path, tmp: Path, policy: str, variant: str,
            r: int) -> tuple[float, float, int]:
    """One interleaved run: (trainer steps/s, plain steps/s, batch)."""
    batch = a.act_batch if policy in SLOW else a.batch
    cap.steps = a.act_steps if policy in SLOW else a.steps
    cap.warmup = min(a.warmup, 5) if policy in SLOW else a.warmup
    out = tmp / f"{policy}-{variant}-{r}"
    if a.profile and r == 0:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        t, pl = run_trainer(cap, data, out, policy, batch, a.trainer_flag)
        prof.disable()
        print(f"--- cProfile of the {policy} ({variant}) run, plain steps included (top 30) ---")
        pstats.Stats(prof).sort_stats(os.environ.get("BENCH_PROFILE_SORT", "cumulative")).print_stats(30)
    else:
        t, pl = run_trainer(cap, data, out, policy, batch, a.trainer_flag)
    return t, pl, batch


@contextlib.contextmanager
def variant_patches(variant: str):
    """per_sample: the data path before ilstudio/data/batched.py. stock_steps: PolicyTrainer's
    per-step shortcuts undone (transformers' training_step and gradient clipping, accelerate's
    uncached is_lomo_available), i.e. the Trainer before those fixes, same data path."""
    import accelerate.optimizer as acc_opt

    import ilstudio.data.batched as batched_mod
    from ilstudio.training import trainer as trainer_mod

    saved = (batched_mod.can_batch, trainer_mod.cache_accelerate_lomo_check,
             trainer_mod.PolicyTrainer.__dict__.get("training_step"),
             trainer_mod.PolicyTrainer.__dict__.get("_clip_grad_norm"), acc_opt.is_lomo_available)
    if variant == "per_sample":
        batched_mod.can_batch = lambda ds: False
    elif variant == "stock_steps":
        trainer_mod.cache_accelerate_lomo_check = lambda: None
        del trainer_mod.PolicyTrainer.training_step, trainer_mod.PolicyTrainer._clip_grad_norm
        acc_opt.is_lomo_available = getattr(acc_opt.is_lomo_available, "__wrapped__",
                                            acc_opt.is_lomo_available)
    elif variant != "batched":
        raise SystemExit(f"unknown variant {variant}")
    try:
        yield
    finally:
        batched_mod.can_batch, trainer_mod.cache_accelerate_lomo_check = saved[:2]
        if saved[2] is not None:
            trainer_mod.PolicyTrainer.training_step = saved[2]
            trainer_mod.PolicyTrainer._clip_grad_norm = saved[3]
        acc_opt.is_lomo_available = saved[4]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policies", default="mlp,mlp_wide,act,vla")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--act_batch", type=int, default=8, help="ACT's and the VLA's batch (their CPU steps are slow)")
    p.add_argument("--act_steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="cProfile one Trainer run per policy")
    p.add_argument("--variants", default="batched,stock_steps",
                   help="what to time the Trainer with: batched (train.py as it is), per_sample "
                        "(__getitem__ + default_data_collator, as before ilstudio/data/batched.py), "
                        "stock_steps (PolicyTrainer's per-step shortcuts undone)")
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
    print(f"batch {a.batch} (act {a.act_batch}), {a.steps} (act {a.act_steps}) timed steps after "
          f"{a.warmup} warm-up, {a.repeats} repeats, "
          f"trainer flags {a.trainer_flag or 'default'}")
    cap = Capture(a.warmup, a.steps)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic_dataset(data, num_episodes=4, episode_len=100, language=True)
        if "vla" in a.policies.split(","):
            from ilstudio.policies.vla.make_tiny import write_tiny_backbone

            write_tiny_backbone(Path(tmp) / "vla_tiny")
        for policy in [x for x in a.policies.split(",") if x]:
            if policy == "act" and not (REPO / "ilstudio/policies/act/modeling.py").exists():
                print("act: not available, skipped")
                continue
            # Variants alternate run by run (A B A B ...), so slow minutes hit all of them.
            variants = [v for v in a.variants.split(",") if v]
            runs: dict[str, list] = {v: [] for v in variants}
            for r in range(a.repeats):
                for variant in variants:
                    with variant_patches(variant):
                        runs[variant].append(measure(a, cap, data, Path(tmp), policy, variant, r))
            for variant in variants:
                t_sps = [x[0] for x in runs[variant]]
                p_sps = [x[1] for x in runs[variant]]
                ratio = statistics.median([x / y for x, y in zip(t_sps, p_sps, strict=True)])
                rows.append((policy, variant, statistics.median(t_sps), statistics.median(p_sps),
                             ratio, t_sps, p_sps, runs[variant][0][2]))
                print(f"# {policy} {variant}: trainer {t_sps} plain {p_sps} ratio {ratio:.3f}",
                      flush=True)
    print()
    print("| policy | variant | batch | train.py steps/s | plain loop steps/s | ratio | "
          "runs (trainer / plain) |")
    print("|---|---|---|---|---|---|---|")
    for policy, variant, t, pl, ratio, ts, ps, batch in rows:
        runs = " ".join(f"{x:.1f}" for x in ts) + " / " + " ".join(f"{x:.1f}" for x in ps)
        print(f"| {policy} | {variant} | {batch} | {t:.1f} | {pl:.1f} | {ratio:.3f} | {runs} |")


if __name__ == "__main__":
    main()
