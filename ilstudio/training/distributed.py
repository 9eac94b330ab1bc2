"""Data-parallel launches (``torchrun``, ``accelerate launch``): what the ranks must agree on.

The Trainer (through accelerate) does the data-parallel work itself: it wraps the model in
DDP, shards every epoch's batches across ranks (each rank takes every world_size-th batch of
one seeded permutation, so ranks see disjoint samples and ``per_device_train_batch_size``
is per rank) and saves checkpoints on rank 0 only. Three things it does not do, added here:

* On a machine without an accelerator, transformers 5 + accelerate 1.15 initialise a gloo
  process group under torchrun but then train every rank *alone* on the full data (a
  one-line warning, "parallel_mode != ParallelMode.DISTRIBUTED"): N copies of one run.
  ``launch_defaults`` sets ``use_cpu=True`` for a multi-process launch without an
  accelerator, which makes accelerate pick its MULTI_CPU (gloo) mode: real DDP.
* Every rank resolves its configuration from its own flags and files. A node with a
  different gin file or YAML would silently train something else; ``agree`` compares the
  ranks' resolved configuration and stops the run, naming the first difference.
* ``output_dir`` must be checked by every rank before any rank writes to it: otherwise a
  slow rank sees the config dumps rank 0 just wrote and refuses "an existing run".
  ``agree`` is that barrier, and it carries each rank's verdict so all ranks stop together
  with the same message instead of one rank hanging in a collective.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from typing import Any

from ilstudio.config.hyperparams import Hyperparams
from ilstudio.errors import UserError


def world_size() -> int:
    """Processes in this launch (1 outside torchrun/accelerate/MPI launchers)."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def has_accelerator() -> bool:
    import torch

    accel = getattr(torch, "accelerator", None)
    if accel is not None:
        return bool(accel.is_available())
    return torch.cuda.is_available()


def launch_defaults(extra: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments extras a multi-process launch needs (a user value still wins)."""
    extra = dict(extra)
    if world_size() > 1 and "use_cpu" not in extra and not has_accelerator():
        extra["use_cpu"] = True
    return extra


def config_text(resolved, hyper: Hyperparams, extra: dict[str, Any]) -> str:
    """The rank-independent resolved configuration, as comparable text."""
    from ilstudio.config.dumps import config_gin_text

    lines = [f"task_name = {resolved.task_name!r}"]
    lines += [f"--{k} = {json.dumps(v, default=str)}" for k, v in sorted(dataclasses.asdict(hyper).items())]
    lines += [f"--training_arg {k} = {json.dumps(v, default=str)}" for k, v in sorted(extra.items())]
    return "\n".join(lines) + "\n" + config_gin_text(resolved)


def _first_difference(reference: str, other: str, r: int) -> str:
    removed = added = None
    for line in difflib.unified_diff(reference.splitlines(), other.splitlines(), n=0, lineterm=""):
        if line.startswith(("+++", "---", "@@")):
            continue
        if line.startswith("-") and removed is None:
            removed = line[1:]
        elif line.startswith("+") and added is None:
            added = line[1:]
        if removed is not None and added is not None:
            break
    return f"rank 0 has `{removed or '(nothing)'}`, rank {r} has `{added or '(nothing)'}`"


def agree(config: str, error: str | None) -> None:
    """Barrier: every rank has resolved ``config`` and checked output_dir (``error`` or None).

    Raises the same UserError on every rank if any rank found an error or resolved a
    configuration different from rank 0's. A no-op collective outside a distributed launch.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if error:
            raise UserError(error)
        return
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (config, error))
    for r, (_, err) in enumerate(gathered):
        if err:
            raise UserError(err if r == 0 else f"rank {r}: {err}")
    reference = gathered[0][0]
    for r, (text, _) in enumerate(gathered):
        if text != reference:
            raise UserError(
                f"rank {r} resolved a different configuration from rank 0 (first difference: "
                f"{_first_difference(reference, text, r)}). Every rank must see the same flags, gin "
                f"files and YAML: check the files on each node.")
