"""What a resumed run may change: the rules, checked before anything is rewritten.

On resume the new configuration is compared with the run's saved one (its
operative_config.gin and flags.txt, ilstudio/tools/diff.py does the comparing): a change
that makes the checkpoint unusable stops the run (UserError listing every such
difference); an allowed change is printed and recorded in the run's resume_changes.txt.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from absl import logging

from ilstudio import rundir
from ilstudio.config import dumps
from ilstudio.config.declare import CONFIGURABLES, params_of
from ilstudio.config.hyperparams import HYPERPARAMS
from ilstudio.errors import UserError
from ilstudio.policies import import_all_configurations
from ilstudio.resolve import Resolved
from ilstudio.tools.diff import (
    NOT_SET,
    Config,
    Difference,
    compare,
    load,
    parse_flag_lines,
    parse_gin_text,
)

# Flags that change what a checkpoint means: the declared hyperparameters (Hyper.breaks_resume),
# and the task (other data, other dims).
BREAKING_FLAGS = frozenset({h.name for h in HYPERPARAMS if h.breaks_resume} | {"task_name"})
# Declared resume-safe, except between unset and set: lora.lr set gives the LoRA parameters
# their own optimizer group, so the saved optimizer state no longer fits.
GROUPING_KEYS = frozenset({"lora.lr"})
# Flags that differ between a run and its own resume by design.
RESUME_IGNORED_FLAGS = frozenset({"resume_from_checkpoint", "gin_file", "resume_weights_only"})


def breaks_checkpoint(d: Difference) -> bool:
    """Whether the checkpoint cannot follow this change, as the parameter declares
    (``param(breaks_resume=...)``, its configurable's default where the key is not declared).
    A key of a configurable nothing declares counts as breaking: refusing is recoverable,
    training on a mismatched checkpoint is not."""
    if d.kind == "flag":
        return d.key in BREAKING_FLAGS
    key = d.key.rsplit("/", 1)[-1]
    if key in GROUPING_KEYS and {d.a, d.b} & {"None", NOT_SET}:
        return True
    if key.startswith("%"):
        return False
    import_all_configurations()
    configurable, _, name = key.partition(".")
    cls = CONFIGURABLES.get(configurable)
    if cls is None:
        return True
    info = next((i for i in params_of(cls) if i.name == name), None)
    return info.breaks_resume if info is not None else cls.breaks_resume


def check_resume(run_dir: Path, new: Config, checkpoint: str) -> list[Difference]:
    """Compare the new configuration with the run's saved one before resuming.

    Raises UserError naming every change the checkpoint cannot survive; returns the
    allowed differences (empty when nothing changed or nothing was saved).
    """
    if not (run_dir / rundir.OPERATIVE).is_file():
        return []
    saved = load(run_dir)
    new.flags = {k: v for k, v in new.flags.items() if k not in RESUME_IGNORED_FLAGS}
    saved.flags = {k: v for k, v in saved.flags.items() if k not in RESUME_IGNORED_FLAGS}
    diffs = compare(saved, new)
    breaking = [d for d in diffs if breaks_checkpoint(d)]
    if breaking:
        raise UserError(
            f"cannot resume from {checkpoint}: the configuration changed in ways the checkpoint "
            f"cannot follow (saved run in {run_dir} -> now):\n  "
            + "\n  ".join(d.line() for d in breaking)
            + "\nUndo these changes to resume, or start a new run (another --output_dir, or "
              "--overwrite_output_dir without --resume_from_checkpoint).")
    return diffs


def record_resume_changes(run_dir: Path, checkpoint: str, diffs: list[Difference]) -> None:
    """Append the allowed differences to resume_changes.txt (the run's own history)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# {stamp} resumed from {checkpoint}: "
             f"{len(diffs)} change(s) from the saved configuration"]
    lines += [f"{d.line()}" for d in diffs]
    with open(run_dir / rundir.RESUME_CHANGES, "a") as f:
        f.write("\n".join(lines) + "\n")
    rundir.record_written(run_dir / rundir.RESUME_CHANGES)


def check_resume_config(resolved: Resolved, resume_from: str | None) -> list:
    """On resume: stop on a change the checkpoint cannot follow; print the allowed ones.

    Compares with the operative config and flags saved next to the checkpoint. Called by
    the plan (ilstudio/plan.py), after resolution: every configurable is built by then
    (resolve.build_settings), so the operative config is the one the run will write.
    """
    if resume_from is None:
        return []
    run_dir = Path(resume_from).parent
    now = Config("now", gin=parse_gin_text(dumps.operative_text(), "now"),
                 flags=parse_flag_lines(dumps.flagfile_text(
                     resolved, Path(resolved.output_dir) / rundir.ALL_BINDINGS)))
    changes = check_resume(run_dir, now, resume_from)
    if changes:
        logging.warning("resuming from %s with %d configuration change(s) (recorded in %s):\n  %s",
                        resume_from, len(changes), rundir.RESUME_CHANGES,
                        "\n  ".join(d.line() for d in changes))
    return changes


# -- what the checkpoint holds, and the data it was trained on -------------------------------


def check_checkpoint_fits(model, checkpoint: str | None) -> None:
    """The checkpoint's weights are this policy's (names and shapes, read from the header
    only): a checkpoint of another architecture copied into the run is refused before
    anything is written, rather than half loaded (transformers loads non-strictly) or
    failing with a state-dict traceback."""
    if checkpoint is None or not (Path(checkpoint) / rundir.WEIGHTS).is_file():
        return
    saved = rundir.safetensors_shapes(Path(checkpoint) / rundir.WEIGHTS)
    state = model.state_dict()
    own = {k: list(v.shape) for k, v in state.items()}
    unknown = sorted(set(saved) - set(own))
    wrong = [f"{k}: saved {saved[k]}, the policy's {own[k]}" for k in sorted(saved)
             if k in own and saved[k] != own[k]]
    # A tensor the file lacks (transformers would load the rest and then fail on it), unless
    # tied to a saved one (shared storage is saved under one name).
    tied = {state[k].data_ptr() for k in saved if k in state}
    lacking = sorted(k for k in set(own) - set(saved) if state[k].data_ptr() not in tied)
    if unknown or wrong or lacking:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} tensor(s) the policy does not have "
                         f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})")
        if lacking:
            parts.append(f"{len(lacking)} of the policy's tensor(s) missing "
                         f"({', '.join(lacking[:3])}{', ...' if len(lacking) > 3 else ''})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape ({'; '.join(wrong[:3])})")
        raise UserError(f"cannot resume from {checkpoint}: its {rundir.WEIGHTS} is not a "
                        f"checkpoint of the policy this configuration builds: "
                        f"{' and '.join(parts)}. Was it copied from another run? Resume from "
                        f"this run's own checkpoint, or start a new run.")


def _listed(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")


def check_same_data(run_dir: Path, now: dict, checkpoint: str) -> bool:
    """On resume: the episodes are the ones the run recorded (UserError naming what was
    added, removed or changed otherwise). False when the run predates fingerprints (then
    the caller records one from now on)."""

    path = run_dir / rundir.DATA_FINGERPRINT
    try:
        saved = json.loads(path.read_text())
        before = {e["episode"]: (e["length"], e["bytes"]) for e in saved["episodes"]}
    except FileNotFoundError:
        logging.warning("%s has no %s (written before runs recorded their data): resuming "
                        "without checking that the episodes are unchanged", run_dir,
                        rundir.DATA_FINGERPRINT)
        return False
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot resume from {checkpoint}: {path} is damaged ({e})") from None
    after = {e["episode"]: (e["length"], e["bytes"]) for e in now["episodes"]}
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    if added or removed or changed:
        what = [f"{label}: {_listed(names)}" for label, names in
                (("added", added), ("removed", removed), ("changed length or size", changed))
                if names]
        raise UserError(f"cannot resume from {checkpoint}: the dataset is not the one the run "
                        f"trained on ({'; '.join(what)}). Its normalization and sample order "
                        f"would change under the checkpoint. Restore the episodes, or start "
                        f"a new run (another --output_dir, or --overwrite_output_dir).")
    return True


def check_same_normalization(run_dir: Path, stats, checkpoint: str) -> None:
    """The run's normalization.json is never silently recomputed: on resume the statistics
    computed from the (unchanged) data must equal the saved ones."""
    import numpy as np

    from ilstudio.data.normalization import NormStats

    path = run_dir / rundir.NORM_STATS
    if not path.is_file():
        return
    saved = NormStats.load(path).to_dict()
    now = stats.to_dict()
    if saved.keys() != now.keys() or not all(
            np.allclose(saved[k], now[k], rtol=1e-5, atol=1e-7) for k in saved):
        raise UserError(f"cannot resume from {checkpoint}: the normalization computed from the "
                        f"data differs from the run's {path} (the episodes' contents changed). "
                        f"The checkpoint was trained under the saved statistics: restore the "
                        f"data, or start a new run.")
