"""``model.load_pretrain``: start a run from a previous ilstudio run's weights.

Accepts a run directory, a checkpoint-N directory inside one, or a ``model.safetensors``
file. The whole policy is initialised strictly: every tensor must exist with the same
shape on both sides, so a run of another policy/task/chunk size fails at validation
time with the mismatched keys named, instead of half-loading and training from there.
A run saved with ``model.using_ema`` holds the EMA weights, so that is what is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ilstudio.errors import UserError

if TYPE_CHECKING:  # torch is imported only when loading: validation (--dry_run) stays cheap
    from torch import nn

WEIGHTS = "model.safetensors"


def _listed(keys: list[str], limit: int = 8) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def weights_file(location: str) -> Path:
    """The model.safetensors that ``location`` names; a UserError if there is none."""
    p = Path(location).expanduser()
    if p.is_file():
        return p
    if (p / WEIGHTS).is_file():
        return p / WEIGHTS
    if not p.exists():
        raise UserError(f"model.load_pretrain = {location!r}: no such file or directory "
                        f"(expected an ilstudio run directory holding {WEIGHTS})")
    hint = ""
    ckpts = sorted(p.glob("checkpoint-*"), key=lambda c: c.stat().st_mtime)
    if ckpts:
        hint = f"; it has checkpoints, e.g. {ckpts[-1]}"
    raise UserError(f"model.load_pretrain = {location!r}: {p} has no {WEIGHTS} (expected a "
                    f"finished ilstudio run directory or a checkpoint-N directory{hint})")


def load_pretrained_policy(model: nn.Module, location: str) -> Path:
    """Copy the weights at ``location`` into ``model`` (strict); returns the file read."""
    import torch
    from safetensors.torch import load_file

    path = weights_file(location)
    try:
        saved = load_file(str(path))
    except Exception as e:  # safetensors raises several types for a bad file
        raise UserError(f"model.load_pretrain = {location!r}: {path} cannot be read as "
                        f"safetensors: {e}") from None
    own = model.state_dict()
    # Tied tensors may be saved under one name only: a missing key sharing storage with a
    # present one is loaded through it.
    present_ptrs = {own[k].data_ptr() for k in own if k in saved}
    missing = [k for k in own if k not in saved and own[k].data_ptr() not in present_ptrs]
    unexpected = [k for k in saved if k not in own]
    mismatched = [f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}"
                  for k in saved if k in own and saved[k].shape != own[k].shape]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch (saved vs this policy): {_listed(mismatched)}")
    if missing:
        problems.append(f"missing in the saved weights: {_listed(missing)}")
    if unexpected:
        problems.append(f"not in this policy: {_listed(unexpected)}")
    if problems:
        raise UserError(f"model.load_pretrain = {location!r}: {path} does not fit the policy being "
                        "built (same policy, task dims, cameras and chunk size are needed):\n  "
                        + "\n  ".join(problems))
    with torch.no_grad():
        for k, v in saved.items():
            own[k].copy_(v)
    return path
