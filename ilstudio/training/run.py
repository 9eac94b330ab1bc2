"""One training run: validate everything, then write the run's config, then train.

Order matters for trust: every check that can fail on user input (hyperparameters,
data files, model construction) runs before the first byte goes to output_dir, so a
mistake never leaves a half-written run directory behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

from absl import logging

from ilstudio import rundir
from ilstudio.config import dumps
from ilstudio.config.hyperparams import Hyperparams
from ilstudio.config.training_args import build_training_arguments, parse_resume, tensorboard_dir
from ilstudio.errors import UserError
from ilstudio.plan import Plan, check_output_dir
from ilstudio.resolve import Resolved, finalize
from ilstudio.resume import check_checkpoint_fits, check_same_normalization, record_resume_changes
from ilstudio.training import distributed


class Preempted(Exception):
    """The run stopped on SIGTERM after saving a checkpoint; str() is the one line to print."""

    exit_code = 128 + 15


@contextlib.contextmanager
def stop_on_sigterm(trainer):
    """While ``trainer`` trains, SIGTERM saves a checkpoint at the current step and stops
    (StopOnSignal); outside training, SIGTERM keeps its default (atomic writes make a kill
    at any other moment safe)."""
    import signal

    from ilstudio.training.trainer import StopOnSignal

    stop = StopOnSignal()
    trainer.add_callback(stop)

    def handler(signum, frame):
        logging.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")
        stop.requested = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)
        trainer.remove_callback(stop)


def resume_command(out: str | os.PathLike) -> str:
    """The command that continues this run: the same command line, resuming."""
    import shlex
    import sys

    argv = [a for a in sys.argv[1:] if not a.startswith(("--resume_from_checkpoint",
                                                         "--overwrite_output_dir"))]
    if not any(a.startswith("--output_dir") for a in argv):
        argv.append(f"--output_dir={out}")
    return shlex.join(["python", sys.argv[0], *argv, "--resume_from_checkpoint=true"])


def save_final_model(trainer, out: Path) -> None:
    """Write the final model beside the run, file by file atomically (staging dir, then rename).

    A kill or a full disk mid-write leaves the previous files or none, never a truncated
    model.safetensors.
    """
    staging = out / rundir.FINAL_STAGING_DIR
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    try:
        trainer.save_model(str(staging))
        if trainer.is_world_process_zero():
            rundir.publish_files(staging, out)
    finally:
        if trainer.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)


def add_sim_evaluation(trainer, resolved: Resolved, stats, hyper: Hyperparams, args) -> None:
    """--eval_every_steps: rollouts, best/ and learning_curve.png (ilstudio/training/sim_eval.py)."""
    from ilstudio.training.sim_eval import SimEvalCallback, why_no_rollouts

    reason = why_no_rollouts(resolved.task_name, resolved.sim, resolved.task.camera_names, args)
    if reason and distributed.is_main_process():
        logging.warning("--eval_every_steps=%d: no evaluation in the simulator: %s. Only %s is "
                        "drawn.", hyper.eval_every_steps, reason, "learning_curve.png")
    tensorboard = "tensorboard" in (args.report_to or [])
    trainer.add_callback(SimEvalCallback(
        trainer, resolved, stats, every=hyper.eval_every_steps, episodes=hyper.eval_episodes,
        rollouts=reason is None,
        tensorboard_dir=os.environ["TENSORBOARD_LOGGING_DIR"] if tensorboard else None))


def _write_data_records(out: Path, stats, data: dict, resumed: bool) -> None:
    """normalization.json and data_fingerprint.json are the run's: written when it starts
    (on resume only where missing, from a run that predates them; resume checked the data
    and the statistics are the saved ones), data_summary.json each launch."""
    if not resumed or not (out / rundir.NORM_STATS).is_file():
        stats.save(out / rundir.NORM_STATS)
    if not resumed or not (out / rundir.DATA_FINGERPRINT).is_file():
        rundir.write_atomic(out / rundir.DATA_FINGERPRINT, json.dumps(data["fingerprint"]) + "\n")
    rundir.write_atomic(out / rundir.DATA_SUMMARY, json.dumps(data["summary"], indent=2) + "\n")


@contextlib.contextmanager
def memory_errors(policy: str):
    """Running out of memory while building the model (``policy``: model.policy) or trying
    the first step is a user's sizing problem, reported before anything is written."""
    import torch

    try:
        yield
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
        text = str(e)
        if not isinstance(e, MemoryError | torch.OutOfMemoryError) and not (
                "can't allocate memory" in text or "out of memory" in text.lower()):
            raise
        raise UserError(f"policy '{policy}' does not fit in memory "
                        f"({type(e).__name__}: {text[:200]}). Choose a smaller model, a smaller "
                        f"--per_device_train_batch_size, or quantization (quantization.enable). "
                        f"Nothing was written.") from None


def _probe_optimizer(args, model):
    """Build this run's optimizer and scheduler once, as the Trainer will (a missing optimizer
    package, a scheduler needing --training_arg=lr_scheduler_kwargs=...)."""
    from transformers import Trainer, get_scheduler

    errors = (ImportError, ValueError, TypeError, KeyError, RuntimeError)
    optim = getattr(args.optim, "value", args.optim)
    try:
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        groups = getattr(model, "optimizer_param_groups", None)
        params = (groups(args.learning_rate, args.weight_decay) if callable(groups) else None) or [
            p for p in model.parameters() if p.requires_grad]
        optimizer = optimizer_cls(params, **kwargs)
    except errors as e:
        raise UserError(f"--optim={optim}: the optimizer cannot be built ({type(e).__name__}: "
                        f"{str(e)[:300]}). Nothing was written.") from None
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    try:
        steps = max(args.max_steps, 1)
        get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(steps),
                      num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    except errors as e:
        raise UserError(f"--lr_scheduler_type={schedule}: the schedule cannot be built "
                        f"({type(e).__name__}: {str(e)[:300]}); its arguments go in "
                        f"--training_arg=lr_scheduler_kwargs='{{...}}'. Nothing was written.") from None


def probe_first_step(policy: str, args, model, train_ds) -> None:
    """What the first step needs, tried before anything is written: the optimizer and
    scheduler are built, the first batch is loaded and run through the model (no gradient,
    eval mode, every random generator restored: the run is unchanged by the probe).
    ``policy`` (model.policy) names the model in an out-of-memory message."""
    import random

    import numpy as np
    import torch

    from ilstudio.data.batched import collate

    if not args.deepspeed:  # DeepSpeed builds its optimizer from its own config
        _probe_optimizer(args, model)
    if len(train_ds) == 0:
        return
    indices = list(range(min(args.per_device_train_batch_size, len(train_ds))))
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    modes = [(m, m.training) for m in model.modules()]  # a frozen part may be in eval mode
    try:
        with memory_errors(policy), torch.no_grad():
            getitems = getattr(train_ds, "__getitems__", None)
            batch = getitems(indices) if getitems else collate([train_ds[i] for i in indices])
            model.eval()
            model(**batch)
    finally:
        for module, mode in modes:
            module.training = mode
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _data_and_model(plan: Plan, args):
    """(train_ds, eval_ds, stats, {"summary", "fingerprint"}, model) from the plan's checked
    episodes (listed and checked once, by the plan), with the resume rule about the
    normalization checked on the way; nothing is written."""
    import transformers

    from ilstudio.data.batched import batched
    from ilstudio.data.dataset import build_datasets
    from ilstudio.policies import build_policy, build_processor

    resolved, resume_from = plan.resolved, plan.resume_from
    # A policy's data-side processor (the VLA's tokenizer), None for most policies.
    processor = build_processor(resolved)
    train_ds, eval_ds, stats, summary = build_datasets(
        plan.data, resolved.task, resolved.dataset, resolved.model.chunk_size, args.do_eval,
        args.seed, language=processor)
    logging.info("data: %s", summary)
    if resume_from is not None:
        check_same_normalization(Path(resume_from).parent, stats, resume_from)
    # Preloaded data: one vectorised gather per batch (bench/overhead.py), same samples.
    train_ds, eval_ds = batched(train_ds), batched(eval_ds)

    transformers.set_seed(args.seed)
    with memory_errors(resolved.model.policy):
        model = build_policy(resolved)
    if resolved.model.pretrain_from:  # before anything is written: a misfit is a UserError
        from ilstudio.models.state_io import load_pretrained_policy

        logging.info("model.load_pretrain: initialised from %s",
                     load_pretrained_policy(model, resolved.model.pretrain_from))
    finalize()
    if args.gradient_checkpointing and not hasattr(model, "gradient_checkpointing_enable"):
        raise UserError(f"--gradient_checkpointing: policy '{resolved.model.policy}' has no "
                        f"checkpointable backbone")

    return train_ds, eval_ds, stats, {"summary": summary, "fingerprint": plan.data.fingerprint()}, model


def train(plan: Plan) -> dict:
    """Run the plan (ilstudio.plan.make_plan) and return the final metrics."""
    from ilstudio.training.lazy_imports import import_trainer

    resolved = plan.resolved
    import_trainer(need_peft=resolved.lora.enable or resolved.quantization.enable)
    import torch

    hyper = resolved.hyper
    dumps.check_recordable(resolved)  # also for the Python API: before anything is built
    from ilstudio.training import threads

    logging.info("torch threads: %d (%s)", *threads.configure(hyper.dataloader_num_workers))
    if not torch.cuda.is_available():  # pinning needs an accelerator; avoid the warning
        hyper = dataclasses.replace(hyper, dataloader_pin_memory=False)
        if resolved.quantization.enable:  # a run that quantizes asked to save host memory
            from ilstudio.training import allocator

            logging.info(allocator.configure())
    extra = distributed.launch_defaults(resolved.training_args_extra)
    args = build_training_arguments(hyper, extra)  # under torchrun: joins the process group
    # Barrier: every rank has its plan (its verdict on output_dir), and resolved rank 0's
    # configuration, before rank 0 writes anything; any rank's refusal stops all ranks with
    # the same message.
    distributed.agree(distributed.config_text(resolved, hyper, extra), plan.verdict.refused)

    train_ds, eval_ds, stats, data, model = _data_and_model(plan, args)

    out, resume_from = Path(resolved.output_dir), plan.resume_from
    check_checkpoint_fits(model, resume_from)  # what the configuration cannot tell: the weights
    probe_first_step(resolved.model.policy, args, model, train_ds)
    # Validation passed: take the directory. The lock is the run's first write and is held
    # until it ends; output_dir is checked again under it (another run may have written
    # there since the plan's check).
    lock, verdict = None, None
    if distributed.is_main_process():
        try:
            with rundir.output_errors(out, "the run's configuration"):  # the lock file first
                lock = rundir.RunLock(out)
            check_output_dir(hyper, resume_from, plan.overwrite_output_dir, locked=True)
        except UserError as e:
            verdict = str(e)
    try:
        distributed.agree(distributed.config_text(resolved, hyper, extra), verdict)
        return _train_locked(resolved, hyper, args, model, train_ds, eval_ds, stats, data,
                             resume_from, list(plan.resume_changes), plan.overwrite_output_dir)
    finally:
        if lock is not None:
            lock.release()


def _resume_plan(trainer, hyper: Hyperparams, resume_from: str | None,
                 target: int) -> tuple[int | None, bool]:
    """(the step a finished run ended at when there is nothing to do, else None; whether
    only the final save is missing), from --output_dir and --resume_from_checkpoint."""
    out = Path(hyper.output_dir)
    if parse_resume(hyper.resume_from_checkpoint) is False:
        return None, False
    done = rundir.finished_step(out)
    if done is not None and target <= done:
        logging.warning("%s: this run is already finished at step %d (the configuration asks "
                        "for %d steps): nothing to do, nothing changed. Pass a larger "
                        "--max_steps to continue it.", out, done, target)
        return done, False
    if resume_from is None:
        return None, False
    at = trainer.checkpoint_step(resume_from)
    if at > target:
        raise UserError(f"--resume_from_checkpoint: {Path(resume_from).name} is at step "
                        f"{at}, beyond --max_steps={target} (steps cannot be undone). "
                        f"Pass --max_steps >= {at}, or start a new run.")
    # Killed after its last checkpoint but before its final save: finish from the
    # checkpoint without training (a training call would run one step past max_steps).
    return None, at == target


def _train_until_done_or_sigterm(trainer, resume_from: str | None, out: Path):
    """trainer.train(); on SIGTERM, the checkpoint at the current step and Preempted."""
    with stop_on_sigterm(trainer) as stop:
        result = trainer.train(resume_from_checkpoint=resume_from)
    if stop.requested:
        last = rundir.last_complete_checkpoint(out)
        raise Preempted(f"SIGTERM: stopped at step {trainer.state.global_step} after saving "
                        f"{last}; resume with: {resume_command(out)}")
    return result


def _train_locked(resolved: Resolved, hyper, args, model, train_ds, eval_ds, stats,
                  data: dict, resume_from: str | None, resume_changes: list,
                  overwrite_output_dir: bool) -> dict:
    """The part of a run that writes: called holding output_dir's lock."""
    from ilstudio.data.batched import collate
    from ilstudio.training.trainer import (
        OperativeConfigToTensorBoard,
        PolicyTrainer,
        RecordLogFiles,
    )

    out = Path(resolved.output_dir)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", tensorboard_dir(hyper))
    callbacks = []
    if "tensorboard" in (args.report_to or []):
        callbacks.append(OperativeConfigToTensorBoard(os.environ["TENSORBOARD_LOGGING_DIR"],
                                                      dumps.operative_text()))
    callbacks.append(RecordLogFiles(os.environ["TENSORBOARD_LOGGING_DIR"]))  # after the writers
    trainer = PolicyTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            data_collator=collate, callbacks=callbacks,
                            ema_decay=resolved.model.ema_decay if resolved.model.using_ema else None,
                            episode_first=resolved.dataset.episode_first)
    target = trainer.planned_max_steps()
    done, finish_only = _resume_plan(trainer, hyper, resume_from, target)
    if done is not None:
        return {"already_finished_at_step": done}

    with rundir.output_errors(out, "the run's configuration"):
        if distributed.is_main_process():
            if overwrite_output_dir and resume_from is None and rundir.holds_a_run(out):
                logging.warning("--overwrite_output_dir: replacing the run in %s", out)
                rundir.remove_run(out)
            rundir.start_manifest(out)  # every file from here on is recorded as the run's
            dumps.write_run_config(resolved, out, args.to_json_string())
            _write_data_records(out, stats, data, resumed=resume_from is not None)
            if resume_changes:
                record_resume_changes(out, resume_from, resume_changes)

    if hyper.eval_every_steps > 0 and not finish_only:
        add_sim_evaluation(trainer, resolved, stats, hyper, args)
    if finish_only:
        logging.info("%s is at --max_steps=%d: finishing the run from it (final model and "
                     "state), no training step", resume_from, target)
        result = trainer.finish_from_checkpoint(resume_from)
    else:
        result = _train_until_done_or_sigterm(trainer, resume_from, out)
    with rundir.output_errors(out, "the final model"):
        save_final_model(trainer, out)
    metrics = dict(result.metrics)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        trainer.save_state()
    logging.info("done: %d steps; run directory %s; %s", trainer.state.global_step,
                 Path(out).resolve(), metrics)
    return metrics
