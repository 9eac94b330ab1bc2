"""CPU start-up and per-step costs that are behaviour, not timing: torch's thread count,
peft/bitsandbytes left unimported unless needed, HDF5 handles held on the lazy path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_train, tiny_args, train_env

from ilstudio.training.threads import thread_count


def test_thread_count_follows_omp_affinity_workers_and_local_ranks() -> None:
    assert thread_count({"OMP_NUM_THREADS": "3"}, cpus=8, dataloader_workers=2) == (3, "OMP_NUM_THREADS")
    assert thread_count({}, cpus=8, dataloader_workers=0)[0] == 8
    assert thread_count({}, cpus=8, dataloader_workers=2)[0] == 6
    assert thread_count({"LOCAL_WORLD_SIZE": "2"}, cpus=8, dataloader_workers=1)[0] == 3
    assert thread_count({}, cpus=2, dataloader_workers=4)[0] == 1  # never below one
    n, why = thread_count({"OMP_NUM_THREADS": "", "LOCAL_WORLD_SIZE": "x"}, cpus=4, dataloader_workers=1)
    assert n == 3 and why == "4 usable CPUs - 1 DataLoader workers"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs a CPU affinity mask of 2+ CPUs to narrow")
def test_train_uses_the_cpus_its_affinity_allows(tiny_data: Path, tmp_path: Path) -> None:
    one = min(os.sched_getaffinity(0))
    env = train_env()
    env.pop("OMP_NUM_THREADS")
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *tiny_args(tiny_data, tmp_path / "run", "--max_steps=1",
                                                            "--save_strategy=no")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, {one}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch threads: 1 (1 usable CPUs)" in proc.stderr  # torch's own default: every core


LORA_AFTER_PLAIN = r"""
import sys
from ilstudio.resolve import resolve_argv
from ilstudio.plan import make_plan
from ilstudio.training.run import train

train(make_plan(resolve_argv(sys.argv[1:])))
print("after plain run:", sorted(m for m in ("peft", "bitsandbytes", "scipy") if m in sys.modules))
import gc
print("frozen after the run:", gc.get_freeze_count() > 100_000, gc.isenabled())
import numpy as np
import transformers.loss.loss_for_object_detection as detection
cost = np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
print("matching:", [a.tolist() for a in detection.linear_sum_assignment(cost)], "scipy" in sys.modules)
from scipy.optimize import linear_sum_assignment
print("same as scipy:", detection.linear_sum_assignment.__doc__ != linear_sum_assignment.__doc__,
      [a.tolist() for a in linear_sum_assignment(cost)])
import peft, torch
import transformers.trainer as tr, transformers.trainer_utils as tu

net = torch.nn.Sequential(torch.nn.Linear(4, 4))
wrapped = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0"]))
print("peft model seen:", tu._is_peft_model(wrapped), isinstance(wrapped, tr.PeftModel),
      tu._is_peft_model(net))
"""


def test_plain_runs_do_not_import_peft_and_a_later_lora_model_is_still_recognised(
        tiny_data: Path, tmp_path: Path) -> None:
    """Nor scipy: transformers' object-detection losses get a stand-in that imports scipy's
    matching on its first call (and answers as scipy does). The import's objects are frozen
    out of the garbage collector's reach, which is on again after it."""
    proc = subprocess.run([sys.executable, "-c", LORA_AFTER_PLAIN,
                           *tiny_args(tiny_data, tmp_path / "run", "--max_steps=1", "--save_strategy=no")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=train_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "after plain run: []" in proc.stdout
    assert "frozen after the run: True True" in proc.stdout
    assert "matching: [[0, 1, 2], [1, 0, 2]] True" in proc.stdout
    assert "same as scipy: True [[0, 1, 2], [1, 0, 2]]" in proc.stdout
    assert "peft model seen: True True False" in proc.stdout


def test_lazy_reading_holds_one_handle_per_dataset_and_closes_them(tiny_data: Path) -> None:
    from ilstudio.config.settings import DatasetSettings, TaskSettings
    from ilstudio.data.checked import check_dataset
    from ilstudio.data.dataset import build_datasets
    from ilstudio.data.episodes import ACTION_KEY

    task = TaskSettings(dataset_dir=str(tiny_data), camera_names=("top",), episode_len=50)
    ds = build_datasets(check_dataset(task, DatasetSettings()), task, DatasetSettings(), 5, False, 0)[0]
    ds[0], ds[1]
    held = ds._source(0)
    assert held is ds._source(0)  # not re-opened per sample, nor its datasets
    datasets = dict(held.held)
    ds[2]
    assert all(held.held[k] is d for k, d in datasets.items())
    assert held.file.id.valid and set(held.held) == {"observations/qpos", ACTION_KEY, "observations/images/top"}
    ds.close()
    assert not held.file.id.valid


def test_train_run_logs_threads_and_keeps_the_allocator(tiny_data: Path, tmp_path: Path) -> None:
    proc = run_train(*tiny_args(tiny_data, tmp_path / "run", "--max_steps=1", "--save_strategy=no"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch threads: 1 (OMP_NUM_THREADS)" in proc.stderr
    assert "glibc allocator" not in proc.stderr  # a run that does not quantize keeps glibc's defaults


def test_policy_trainer_steps_match_transformers_trainer_bit_for_bit(tiny_data: Path, tmp_path: Path) -> None:
    """PolicyTrainer's own per-step paths (gradient clipping, skipping a redundant
    model.train()) change no result: same weights as transformers' Trainer, with clipping
    acting on every step, dropout on, and a held-out evaluation (eval mode) in between."""
    import torch
    from transformers import Trainer, TrainingArguments

    from ilstudio.config.settings import DatasetSettings, ModelSettings, TaskSettings
    from ilstudio.data.batched import batched, collate
    from ilstudio.data.checked import check_dataset
    from ilstudio.data.dataset import build_datasets
    from ilstudio.policies import build_policy, policy_config_class
    from ilstudio.training.trainer import PolicyTrainer

    task = TaskSettings(dataset_dir=str(tiny_data), camera_names=("top",), episode_len=50)
    dataset = DatasetSettings(preload_data=True)
    train_ds, eval_ds = (batched(d) for d in build_datasets(check_dataset(task, dataset), task, dataset, 5, True, 0)[:2])
    finals, norms, evals = [], [], []
    for cls in (Trainer, PolicyTrainer):
        torch.manual_seed(0)
        config = policy_config_class("mlp")(hidden_dim=32, num_layers=2, dropout=0.5)
        model = build_policy("mlp", policy_config=config,
                             task=task, dataset=dataset, model=ModelSettings(chunk_size=5), use_images=True)
        args = TrainingArguments(output_dir=str(tmp_path / cls.__name__), max_steps=6, max_grad_norm=0.01,
                                 per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
                                 save_strategy="no", report_to=[], use_cpu=True, seed=0,
                                 eval_strategy="steps", eval_steps=3, label_names=["action"],
                                 remove_unused_columns=False, dataloader_pin_memory=False)
        trainer = cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=collate)
        trainer.train()
        finals.append({k: v.clone() for k, v in model.state_dict().items()})
        norms.append([r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r])
        evals.append([r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r])
    assert norms[0] == norms[1] and min(norms[0]) > 0.01  # clipping acted at every step
    assert len(evals[0]) == 2 and evals[0] == evals[1]
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
