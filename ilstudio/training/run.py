"""One training run: validate everything, then write the run's config, then train.

Order matters for trust: every check that can fail on user input (hyperparameters,
data files, model construction) runs before the first byte goes to output_dir, so a
mistake never leaves a half-written run directory behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from absl import logging

from ilstudio.config import diff as config_diff
from ilstudio.config import dumps
from ilstudio.config.resolve import Resolved, finalize
from ilstudio.config.training_args import build_training_arguments, parse_resume, tensorboard_dir
from ilstudio.errors import UserError
from ilstudio.training import distributed

RUN_MARKERS = (dumps.OPERATIVE, "trainer_state.json", "model.safetensors")


def holds_a_run(output_dir: Path) -> list[str]:
    """What in output_dir says another run lives there (empty if none)."""
    if not output_dir.is_dir():
        return []
    found = [m for m in RUN_MARKERS if (output_dir / m).exists()]
    found += sorted(p.name for p in output_dir.glob("checkpoint-*"))
    return found


def last_complete_checkpoint(out: Path) -> str | None:
    """The newest checkpoint-N in out that is complete (None if there is none).

    PolicyTrainer renames a checkpoint into place only once every file is written, so any
    checkpoint-N is complete; the trainer_state.json check also rejects partial directories
    left by other writers (it is the last file transformers writes).
    """
    if not out.is_dir():
        return None
    found = []
    for p in out.glob("checkpoint-*"):
        step = p.name.partition("-")[2]
        if step.isdigit() and p.is_dir():
            if (p / "trainer_state.json").is_file():
                found.append((int(step), str(p)))
            else:
                logging.warning("%s is incomplete (no trainer_state.json): not resuming from it", p)
    return max(found)[1] if found else None


def resume_checkpoint(resolved: Resolved) -> str | None:
    """The checkpoint to resume from, per --resume_from_checkpoint; None starts fresh."""
    choice = parse_resume(resolved.hyper["resume_from_checkpoint"])
    out = Path(resolved.output_dir)
    if choice is True:
        last = last_complete_checkpoint(out)
        if last is None:
            logging.info("--resume_from_checkpoint=true: no checkpoint in %s, starting fresh", out)
        return last
    if choice is False:
        return None
    if not (Path(choice) / "trainer_state.json").is_file():
        raise UserError(f"--resume_from_checkpoint={choice}: not a checkpoint directory "
                        f"(no trainer_state.json there)")
    return choice


def check_output_dir(resolved: Resolved, resume_from: str | None, overwrite: bool) -> None:
    out = Path(resolved.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir={out}: exists and is not a directory")
    existing = holds_a_run(out)
    if existing and resume_from is None and not overwrite and parse_resume(
            resolved.hyper["resume_from_checkpoint"]) is True:
        if not {"model.safetensors", "trainer_state.json"} & set(existing):
            # Killed before its first complete checkpoint: the same command starts it again.
            logging.warning("--resume_from_checkpoint=true: %s holds an unfinished run with no "
                            "complete checkpoint (%s); starting it again from step 0", out,
                            ", ".join(existing[:5]))
            return
        raise UserError(
            f"--output_dir={out} already holds a finished run ({', '.join(existing[:5])}) but no "
            f"complete checkpoint to resume from (--resume_from_checkpoint=true). Pass "
            f"--overwrite_output_dir to replace it, or choose another --output_dir.")
    if existing and resume_from is None and not overwrite:
        raise UserError(
            f"--output_dir={out} already holds a run ({', '.join(existing[:5])}). Pass "
            f"--resume_from_checkpoint=true to continue it, --overwrite_output_dir to replace it, "
            f"or choose another --output_dir.")


def check_resume_config(resolved: Resolved, resume_from: str | None) -> list:
    """On resume: stop on a change the checkpoint cannot follow; print the allowed ones.

    Compares with the operative config and flags saved next to the checkpoint (call after
    the policy is built, at the point where those were written, and before rewriting them).
    """
    if resume_from is None:
        return []
    run_dir = Path(resume_from).parent
    now = config_diff.Config("now", gin=config_diff.parse_gin_text(dumps.operative_text(), "now"),
                             flags=config_diff.parse_flag_lines(dumps.flagfile_text(
                                 resolved, Path(resolved.output_dir) / dumps.ALL_BINDINGS)))
    changes = config_diff.check_resume(run_dir, now, resume_from)
    if changes:
        logging.warning("resuming from %s with %d configuration change(s) (recorded in %s):\n  %s",
                        resume_from, len(changes), config_diff.RESUME_CHANGES,
                        "\n  ".join(d.line() for d in changes))
    return changes


@contextlib.contextmanager
def output_errors(out: Path, what: str):
    """A failed write (disk full, read-only, a path through a file) is a UserError, not a traceback."""
    from ilstudio.training.trainer import is_write_failure

    try:
        yield
    except Exception as e:
        if not is_write_failure(e):
            raise
        raise UserError(f"--output_dir={out}: cannot write {what}: {e}. Check free space, "
                        f"permissions, and that the path is a directory.") from None


def save_final_model(trainer, out: Path) -> None:
    """Write the final model beside the run, file by file atomically (staging dir, then rename).

    A kill or a full disk mid-write leaves the previous files or none, never a truncated
    model.safetensors.
    """
    staging = out / ".final-staging"
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    try:
        trainer.save_model(str(staging))
        if trainer.is_world_process_zero():
            for f in sorted(staging.iterdir()):
                os.replace(f, out / f.name)
    finally:
        if trainer.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)


def validate_data(resolved: Resolved) -> list[int]:
    """Header-level checks of the task's episodes (cheap; used by --dry_run too)."""
    from ilstudio.data.episodes import check_episodes, list_episode_files

    use_images = resolved.policy.image_inputs(resolved.task, resolved.dataset)
    paths = list_episode_files(resolved.task.dataset_dir)
    return check_episodes(paths, resolved.task, use_images)


def train(resolved: Resolved, overwrite_output_dir: bool = False) -> dict:
    """Train and return the final metrics."""
    import torch
    import transformers

    from ilstudio.data.batched import batched, collate
    from ilstudio.data.dataset import build_datasets
    from ilstudio.policies import build_policy, build_processor
    from ilstudio.training.trainer import OperativeConfigToTensorBoard, PolicyTrainer

    hyper = dict(resolved.hyper)
    if not torch.cuda.is_available():
        hyper["dataloader_pin_memory"] = False  # pinning needs an accelerator; avoid the warning
    extra = distributed.launch_defaults(resolved.training_args_extra)
    args = build_training_arguments(hyper, extra)  # under torchrun: joins the process group
    resume_from = resume_checkpoint(resolved)
    try:
        check_output_dir(resolved, resume_from, overwrite_output_dir)
        verdict = None
    except UserError as e:
        verdict = str(e)
    # Barrier: every rank has checked output_dir, and resolved rank 0's configuration, before
    # rank 0 writes anything; any rank's error stops all ranks with the same message.
    distributed.agree(distributed.config_text(resolved, hyper, extra), verdict)

    use_images = resolved.policy.image_inputs(resolved.task, resolved.dataset)
    # A policy's data-side processor (the VLA's tokenizer), None for most policies.
    processor = build_processor(resolved.model.policy, policy_config=resolved.policy,
                                task=resolved.task, dataset=resolved.dataset, model=resolved.model)
    train_ds, eval_ds, stats, summary = build_datasets(
        resolved.task, resolved.dataset, resolved.model.chunk_size, args.do_eval, args.seed,
        language=processor)
    logging.info("data: %s", summary)
    # Preloaded data: one vectorised gather per batch (bench/overhead.py), same samples.
    train_ds, eval_ds = batched(train_ds), batched(eval_ds)

    transformers.set_seed(args.seed)
    model = build_policy(resolved.model.policy, policy_config=resolved.policy, task=resolved.task,
                         dataset=resolved.dataset, model=resolved.model, lora=resolved.lora,
                         quantization=resolved.quantization, use_images=use_images)
    if resolved.model.pretrain_from:  # before anything is written: a misfit is a UserError
        from ilstudio.training.pretrain import load_pretrained_policy

        logging.info("model.load_pretrain: initialised from %s",
                     load_pretrained_policy(model, resolved.model.pretrain_from))
    finalize()
    if hyper["gradient_checkpointing"] and not hasattr(model, "gradient_checkpointing_enable"):
        raise UserError(f"--gradient_checkpointing: policy '{resolved.model.policy}' has no "
                        f"checkpointable backbone")

    out = Path(resolved.output_dir)
    resume_changes = check_resume_config(resolved, resume_from)
    with output_errors(out, "the run's configuration"):
        if distributed.is_main_process():
            if overwrite_output_dir and resume_from is None and holds_a_run(out):
                logging.warning("--overwrite_output_dir: replacing %s", out)
                shutil.rmtree(out)
            dumps.write_run_config(resolved, out, args.to_json_string())
            stats.save(out / dumps.NORM_STATS)
            if resume_changes:
                config_diff.record_resume_changes(out, resume_from, resume_changes)
            dumps.write_atomic(out / "data_summary.json", json.dumps(summary, indent=2) + "\n")

    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", tensorboard_dir(hyper))
    callbacks = []
    if "tensorboard" in (args.report_to or []):
        callbacks.append(OperativeConfigToTensorBoard(os.environ["TENSORBOARD_LOGGING_DIR"],
                                                      dumps.operative_text()))
    trainer = PolicyTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            data_collator=collate, callbacks=callbacks,
                            ema_decay=resolved.model.ema_decay if resolved.model.using_ema else None,
                            episode_first=resolved.dataset.episode_first)
    result = trainer.train(resume_from_checkpoint=resume_from)
    with output_errors(out, "the final model"):
        save_final_model(trainer, out)
    metrics = dict(result.metrics)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        trainer.save_state()
    logging.info("done: %s", metrics)
    return metrics
