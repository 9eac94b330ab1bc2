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

from absl import logging

from ilstudio.errors import UserError
from ilstudio.rundir import WEIGHTS

if TYPE_CHECKING:  # torch is imported only when loading: validation (--dry_run) stays cheap
    from torch import nn

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


def canonical(key: str) -> str:
    """A parameter name without peft's wrapping (``base_model.model.``, ``.base_layer``)."""
    return key.replace("base_model.model.", "").replace(".base_layer.", ".")


def match_keys(own: dict, saved: dict) -> tuple[dict[str, str], list[str], list[str]]:
    """(own key -> saved key, own keys not found, own LoRA keys not found).

    Exact names first; then peft-insensitive names, so a run trained without LoRA can
    initialise a policy that wraps the same backbone with LoRA (the adapters start fresh).
    """
    by_canon = {canonical(k): k for k in saved}
    pairs, missing, fresh = {}, [], []
    for k in own:
        if k in saved:
            pairs[k] = k
        elif canonical(k) in by_canon:
            pairs[k] = by_canon[canonical(k)]
        elif "lora_" in k:
            fresh.append(k)
        else:
            missing.append(k)
    return pairs, missing, fresh


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
    from ilstudio.models.adapters import restore_quantized_weights

    restore_quantized_weights(model, saved)  # QLoRA: 4-bit weights come with their quant state
    own = model.state_dict()
    pairs, missing, fresh = match_keys(own, saved)
    loaded = set(pairs.values())
    # Tied tensors may be saved under one name only: a missing key sharing storage with a
    # loaded one is loaded through it.
    loaded_ptrs = {own[k].data_ptr() for k in pairs}
    missing = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
    unexpected = [k for k in saved if k not in loaded]
    mismatched = [f"{s} {tuple(saved[s].shape)} vs {tuple(own[k].shape)}"
                  for k, s in pairs.items() if saved[s].shape != own[k].shape]
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
        for k, s in pairs.items():
            own[k].copy_(saved[s])
    if fresh:
        logging.info("model.load_pretrain: %d LoRA adapter tensors are new (not in %s) and keep "
                     "their initialisation", len(fresh), path)
    return path
