"""The one strict state-dict loader: saved weights into a built policy, all or nothing.

Used by evaluation (a run's model.safetensors into the policy its operative_config.gin
describes), ``model.load_pretrain`` (a previous run's weights into a new run's policy) and
LoRA runs (the trainable non-LoRA weights beside an adapter). Every tensor must exist with
the same shape on both sides, so weights of another policy/task/chunk size fail with the
mismatched keys named, instead of half-loading and running from there.

``model.load_pretrain`` accepts a run directory, a checkpoint-N directory inside one, or a
``model.safetensors`` file. A run saved with ``model.using_ema`` holds the EMA weights, so
that is what is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from absl import logging

from ilstudio.errors import UserError
from ilstudio.models.quantization import restore_quantized_weights
from ilstudio.rundir import CHECKPOINT_PREFIX, WEIGHTS, manifest_problem

if TYPE_CHECKING:  # torch is imported only when loading: validation (--dry_run) stays cheap
    from torch import nn


def _listed(keys: list[str], limit: int = 8) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def weights_file(location: str) -> Path:
    """The model.safetensors that ``location`` (model.load_pretrain) names; a UserError if
    there is none."""
    p = Path(location).expanduser()
    if p.is_file():
        return p
    if (p / WEIGHTS).is_file():
        return p / WEIGHTS
    if not p.exists():
        raise UserError(f"model.load_pretrain = {location!r}: no such file or directory "
                        f"(expected an ilstudio run directory holding {WEIGHTS})")
    hint = ""
    ckpts = sorted(p.glob(f"{CHECKPOINT_PREFIX}-*"), key=lambda c: c.stat().st_mtime)
    if ckpts:
        hint = f"; it has checkpoints, e.g. {ckpts[-1]}"
    raise UserError(f"model.load_pretrain = {location!r}: {p} has no {WEIGHTS} (expected a "
                    f"finished ilstudio run directory or a checkpoint-N directory{hint})")


def read_state(path: str | Path, what: str = "", *, torch_format: bool = False) -> dict:
    """The tensors of a safetensors file; an unreadable file is a UserError (``what``
    prefixes it, e.g. "model.load_pretrain = '...': "). torch_format: a file not named
    .safetensors is read with ``torch.load`` (weights only), as peft's adapter_model.bin."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    damaged = manifest_problem(path)  # a flipped bit loads fine: the run's checksum tells
    if damaged:
        raise UserError(f"{what}{path} is damaged: {damaged}. Use another checkpoint of the run "
                        f"(checkpoint-N), or retrain.")
    as_torch = torch_format and path.suffix != ".safetensors"
    try:
        if as_torch:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors/torch raise several types for a bad file
        raise UserError(f"{what}{path} cannot be read as "
                        f"{'torch weights' if as_torch else 'safetensors'}: {e}") from None


def canonical(key: str) -> str:
    """A parameter name without peft's wrapping (``base_model.model.``, ``.base_layer``)."""
    return key.replace("base_model.model.", "").replace(".base_layer.", ".")


def match_keys(own: dict, saved: dict, peft_names: bool = True
               ) -> tuple[dict[str, str], list[str], list[str]]:
    """(own key -> saved key, own keys not found, own LoRA keys not found).

    Exact names first; with ``peft_names``, then peft-insensitive names, so a run trained
    without LoRA can initialise a policy that wraps the same backbone with LoRA (the
    adapters start fresh). Without it, a LoRA key not found is simply missing.
    """
    by_canon = {canonical(k): k for k in saved} if peft_names else {}
    pairs, missing, fresh = {}, [], []
    for k in own:
        if k in saved:
            pairs[k] = k
        elif canonical(k) in by_canon:
            pairs[k] = by_canon[canonical(k)]
        elif peft_names and "lora_" in k:
            fresh.append(k)
        else:
            missing.append(k)
    return pairs, missing, fresh


def load_strict(model: nn.Module, saved: dict, what: str, *, peft_names: bool = False,
                partial: bool = False) -> list[str]:
    """Copy ``saved`` into ``model``; any misfit is a UserError starting with ``what``.

    Misfits: a saved tensor this model does not have, a shape mismatch, and (unless
    ``partial``: a subset such as the trainable non-LoRA weights) a tensor of this model
    the file lacks. Tensors tied to a loaded one (shared storage) may be saved under one
    name only. 4-bit bitsandbytes weights are rebuilt from their saved quantization state
    first (QLoRA). Returns the LoRA tensors that start fresh (``peft_names``, see match_keys).
    """
    import torch

    if not partial:
        restore_quantized_weights(model, saved)  # QLoRA: 4-bit weights come with their quant state
    own = model.state_dict()
    pairs, missing, fresh = match_keys(own, saved, peft_names)
    loaded_ptrs = {own[k].data_ptr() for k in pairs}
    missing = [] if partial else [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
    loaded = set(pairs.values())
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
        raise UserError(f"{what}:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for k, s in pairs.items():
            own[k].copy_(saved[s])
    return fresh


def load_pretrained_policy(model: nn.Module, location: str) -> Path:
    """``model.load_pretrain``: copy the weights at ``location`` into ``model`` (strict, peft
    names matched through LoRA wrapping); returns the file read."""
    path = weights_file(location)
    where = f"model.load_pretrain = {location!r}: "
    saved = read_state(path, where)
    fresh = load_strict(model, saved, f"{where}{path} does not fit the policy being built (same "
                        "policy, task dims, cameras and chunk size are needed)", peft_names=True)
    if fresh:
        logging.info("model.load_pretrain: %d LoRA adapter tensors are new (not in %s) and keep "
                     "their initialisation", len(fresh), path)
    return path
