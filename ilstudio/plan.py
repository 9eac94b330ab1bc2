"""The plan stage: a resolved configuration -> the facts a run starts from, each computed once.

``resolve`` says what the user asked for; the plan says what that means here and now:

- the output directory's verdict (``Verdict``): a fresh run, a resume from checkpoint N, a run
  already finished at step N, or refused and why;
- the checkpoint a resume continues (checked complete, with its training state), that the
  data is the data it began on (data_fingerprint.json), and the configuration changes it
  makes (one a checkpoint cannot follow is refused; the allowed ones are kept to record);
- the task's episodes, listed and checked once (``ilstudio.data.checked``): references,
  lengths, cameras, frame sizes, with the data summary and fingerprint.

``--dry_run`` and ``--explain`` print the plan; ``train(plan)`` runs it, reading these facts
rather than computing them again. Torch-free: the dry run imports nothing heavy. What needs the
built policy or the data's contents (the checkpoint's tensor shapes, the normalization, the
first step) is checked by training, before anything is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from absl import logging

from ilstudio import rundir
from ilstudio.config.hyperparams import Hyperparams
from ilstudio.config.training_args import parse_resume, tensorboard_dir
from ilstudio.data.checked import CheckedEpisodes, check_dataset
from ilstudio.errors import UserError
from ilstudio.resolve import Resolved
from ilstudio.resume import check_resume_config, check_same_data


@dataclass(frozen=True)
class Verdict:
    """May this run write into output_dir, and from where does it start?"""

    output_dir: str
    resume_from: str | None  # the checkpoint to continue (complete, checked), or None
    finished_step: int | None  # the step a finished run ended at (resuming it), or None
    refused: str | None  # why the run may not start here (the UserError's message), or None

    @property
    def kind(self) -> str:
        if self.refused:
            return "refused"
        if self.finished_step is not None:
            return "finished"
        return "resume" if self.resume_from else "fresh"

    def line(self) -> str:
        out = self.output_dir
        if self.refused:
            return f"refused: {self.refused}"
        if self.finished_step is not None:
            more = f", continued from {self.resume_from}" if self.resume_from else ""
            return (f"finished at step {self.finished_step} in {out} (nothing to do unless "
                    f"--max_steps asks for more{more})")
        if self.resume_from:
            return f"resume from {self.resume_from}"
        return f"fresh run in {out}"


@dataclass(frozen=True)
class Plan:
    """A resolved run with its pre-run facts: what ``train(plan)`` runs."""

    resolved: Resolved
    overwrite_output_dir: bool
    verdict: Verdict
    data: CheckedEpisodes
    resume_changes: tuple = ()  # the allowed differences from the saved configuration (resume)

    @property
    def resume_from(self) -> str | None:
        return self.verdict.resume_from

    def describe(self) -> str:
        """A few lines for --dry_run and --explain: verdict, resume, data."""
        resume = f"--resume_from_checkpoint={self.resolved.hyper.resume_from_checkpoint}"
        if self.resume_from:
            changes = self.resume_changes
            resume += (f" -> {self.resume_from}, {len(changes)} allowed configuration change(s)"
                       + "".join(f"\n#   {d.line()}" for d in changes))
        return (f"# output_dir: {self.verdict.line()}\n"
                f"# resume: {resume}\n"
                f"# data: {self.data.describe()}\n")


def make_plan(resolved: Resolved, overwrite_output_dir: bool = False) -> Plan:
    """The whole plan at once (the Python API; train.py prints between the two halves).
    UserError when the output directory is refused or the data does not check."""
    verdict = plan_output(resolved.hyper, overwrite_output_dir)
    if verdict.refused:
        raise UserError(verdict.refused)
    return finish_plan(resolved, overwrite_output_dir, verdict, plan_data(resolved, verdict))


def finish_plan(resolved: Resolved, overwrite: bool, verdict: Verdict,
                data: CheckedEpisodes) -> Plan:
    """The plan, with a resume's configuration changes checked (UserError naming every
    change the checkpoint cannot follow; the allowed ones are said and kept)."""
    changes = check_resume_config(resolved, verdict.resume_from)
    return Plan(resolved, overwrite, verdict, data, tuple(changes))


def plan_output(hyper: Hyperparams, overwrite: bool) -> Verdict:
    """The output directory's verdict, from the hyperparameters that name it and say how to
    use it (output_dir, resume_from_checkpoint, resume_weights_only, logging_dir, report_to).
    A bad --resume_from_checkpoint or logging_dir raises; a directory this run may not use is
    a refused verdict (--explain may inspect it)."""
    check_logging_dir(hyper)
    resume = resume_checkpoint(hyper)
    try:
        check_output_dir(hyper, resume, overwrite)
        refused = None
    except UserError as e:
        refused = str(e)
    out = hyper.output_dir
    finished = (rundir.finished_step(out) if parse_resume(hyper.resume_from_checkpoint)
                is not False and Path(out).is_dir() else None)
    return Verdict(str(out), resume, finished, refused)


def check_data(resolved: Resolved) -> CheckedEpisodes:
    """The task's episodes, listed and each checked once (UserError on the first fault)."""
    return check_dataset(resolved.task, resolved.dataset, resolved.model.cache_dir,
                         resolved.task_name)


def plan_data(resolved: Resolved, verdict: Verdict) -> CheckedEpisodes:
    """The task's episodes, checked once; on resume, the ones the checkpoint began on."""
    data = check_data(resolved)
    if verdict.resume_from is not None:
        check_same_data(Path(verdict.resume_from).parent, data.fingerprint(), verdict.resume_from)
    return data


# -- the output directory and the checkpoint --------------------------------------------


def resume_checkpoint(hyper: Hyperparams) -> str | None:
    """The checkpoint to resume from, per --resume_from_checkpoint in --output_dir; None
    starts fresh."""
    choice = parse_resume(hyper.resume_from_checkpoint)
    out = Path(hyper.output_dir)
    if choice is True:
        last = rundir.last_complete_checkpoint(out)
        if last is None and rundir.checkpoint_dirs(out):
            found = "; ".join(f"{p.name}: {rundir.checkpoint_problem(p)}"
                              for _, p in rundir.checkpoint_dirs(out)[:5])
            raise UserError(f"--resume_from_checkpoint=true: no checkpoint in {out} is complete "
                            f"({found}). Remove the damaged checkpoints to start over, or pass "
                            f"--overwrite_output_dir without --resume_from_checkpoint.")
        if last is None:
            logging.info("--resume_from_checkpoint=true: no checkpoint in %s, starting fresh", out)
        return check_training_state(last, hyper.resume_weights_only)
    if choice is False:
        return None
    problem = rundir.checkpoint_problem(choice)
    if problem:
        what = "not a checkpoint directory" if problem.startswith("no ") else "a damaged checkpoint"
        raise UserError(f"--resume_from_checkpoint={choice}: {what} ({problem})")
    return check_training_state(choice, hyper.resume_weights_only)


def check_training_state(checkpoint: str | None, weights_only: bool) -> str | None:
    """A checkpoint without optimizer, scheduler or RNG state (save_only_model) cannot continue
    bit-identically: refused unless --resume_weights_only accepts it, and then said."""
    missing = rundir.missing_training_state(checkpoint) if checkpoint else []
    if not missing:
        return checkpoint
    if not weights_only:
        raise UserError(f"--resume_from_checkpoint: {checkpoint} holds the model's weights but "
                        f"not {', '.join(missing)} (saved with save_only_model?): resuming would "
                        f"start a fresh optimizer and random state and silently end elsewhere "
                        f"than an uninterrupted run. Pass --resume_weights_only to accept that, "
                        f"or resume from a full checkpoint.")
    logging.warning("--resume_weights_only: %s has no %s; continuing from its weights with a "
                    "fresh optimizer state. This run will NOT be bit-identical to an "
                    "uninterrupted one.", checkpoint, ", ".join(missing))
    return checkpoint


def check_output_dir(hyper: Hyperparams, resume_from: str | None, overwrite: bool,
                     locked: bool = False) -> None:
    """May this run write into --output_dir (given --resume_from_checkpoint)? Checked before
    anything is written (and by --dry_run), and again once the run holds the directory's lock
    (``locked``)."""
    out = Path(hyper.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir={out}: exists and is not a directory")
    if not locked:
        rundir.check_not_in_use(out)
    existing = rundir.holds_a_run(out)
    if existing and overwrite and resume_from is None:
        rundir.check_removable(out)
    if existing and resume_from is None and not overwrite and parse_resume(
            hyper.resume_from_checkpoint) is True:
        if not rundir.is_finished(out):
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


def check_logging_dir(hyper: Hyperparams) -> None:
    """TensorBoard's directory (--logging_dir, or <output_dir>/runs) can be created and
    written, wherever it resolves: checked before anything is written (and by --dry_run),
    not found out by TensorBoard once the run has begun."""
    if "tensorboard" not in str(hyper.report_to) and hyper.report_to != "all":
        return
    path = Path(tensorboard_dir(hyper)).expanduser().absolute()
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
    problem = None
    if not p.is_dir():
        problem = f"{p} is not a directory"
    elif not os.access(p, os.W_OK | os.X_OK):
        problem = f"{p} is not writable by this user"
    if problem:
        raise UserError(f"--logging_dir={hyper.logging_dir or '(default: <output_dir>/runs)'}: "
                        f"TensorBoard cannot write {path}: {problem}. Choose another "
                        f"--logging_dir, or --report_to without tensorboard.")
