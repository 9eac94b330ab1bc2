"""``model.using_ema``: an exponential moving average of the trainable weights.

Updated once per optimizer step (``on_step_end`` fires only on real optimizer steps, so
gradient accumulation does not multiply the updates). The decay is warmed up as
``min(decay, (1 + n) / (10 + n))`` after n updates, so short runs do not stay stuck at
the initial weights (the usual practice of timm/diffusers EMA).

What gets saved: every checkpoint's and the final ``model.safetensors`` carry the EMA
weights (that is what evaluation should load). Resuming needs more: the live training
weights and the update count. Those go to ``ema.safetensors`` next to it (``raw.<name>``
and ``ema.<name>`` tensors, ``num_updates``/``decay`` in the metadata), and
``PolicyTrainer`` restores them on resume so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os

import torch
from absl import logging
from torch import nn
from transformers import TrainerCallback

from ilstudio.rundir import EMA_FILE


class EMA:
    """The shadow weights of a model's trainable parameters (by parameter name)."""

    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            from ilstudio.errors import UserError

            raise UserError(f"model.ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] | None = None

    @staticmethod
    def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def init(self, model: nn.Module) -> None:
        self.shadow = {n: p.detach().clone() for n, p in self.trainable(model).items()}
        self.num_updates = 0

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self.shadow is None:
            self.init(model)
        d = self.current_decay()
        for name, p in self.trainable(model).items():
            s = self.shadow.get(name)
            if s is not None:
                s.mul_(d).add_(p.detach().to(s.dtype), alpha=1.0 - d)
        self.num_updates += 1

    def substitute(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict:
        """A copy of state_dict with every trainable parameter replaced by its EMA.

        Matched by storage, not by name, so tied weights and wrapper prefixes (peft) get
        the EMA too, whatever name the state dict uses for them.
        """
        if self.shadow is None:
            return state_dict
        by_ptr = {p.data_ptr(): self.shadow[n] for n, p in self.trainable(model).items()
                  if n in self.shadow}
        out = dict(state_dict)
        for k, v in state_dict.items():
            s = by_ptr.get(v.data_ptr()) if isinstance(v, torch.Tensor) else None
            if s is not None and s.shape == v.shape:
                out[k] = s.to(v.dtype)
        return out

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Within the block the model holds the EMA weights (what checkpoints carry), so an
        evaluation measures the weights that get saved; the training weights come back after."""
        if self.shadow is None:
            yield
            return
        params = {n: p for n, p in self.trainable(model).items() if n in self.shadow}
        backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])

    def save(self, output_dir: str, model: nn.Module) -> None:
        from safetensors.torch import save_file

        if self.shadow is None:
            return
        tensors = {f"raw.{n}": p.detach().contiguous().cpu() for n, p in self.trainable(model).items()}
        tensors.update({f"ema.{n}": s.contiguous().cpu() for n, s in self.shadow.items()})
        save_file(tensors, os.path.join(output_dir, EMA_FILE),
                  metadata={"num_updates": str(self.num_updates), "decay": repr(self.decay)})


def restore(checkpoint: str, model: nn.Module, ema: EMA | None) -> None:
    """After the Trainer loaded a checkpoint's (EMA) model.safetensors: put the live
    training weights back and, when EMA is on, its shadow and update count."""
    from safetensors import safe_open

    path = os.path.join(checkpoint, EMA_FILE)
    if not os.path.isfile(path):
        if ema is not None:
            logging.warning("%s has no %s (saved without model.using_ema): the EMA starts now "
                            "from the checkpoint's weights", checkpoint, EMA_FILE)
        return
    params = dict(model.named_parameters())
    with safe_open(path, "pt") as f, torch.no_grad():
        meta = f.metadata() or {}
        shadow = {}
        for key in f.keys():
            kind, _, name = key.partition(".")
            if name not in params:
                continue
            t = f.get_tensor(key)
            if kind == "raw":
                params[name].copy_(t)
            elif kind == "ema":
                shadow[name] = t.to(params[name].device, params[name].dtype)
    if ema is not None:
        ema.shadow = shadow
        ema.num_updates = int(meta.get("num_updates", 0))
    else:
        logging.warning("%s was saved with model.using_ema; resuming without it continues from "
                        "the live training weights (restored from %s)", checkpoint, EMA_FILE)


class EMACallback(TrainerCallback):
    """Starts the EMA at train begin (unless restored on resume), updates it per step."""

    def __init__(self, ema: EMA) -> None:
        self.ema = ema

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.ema.shadow is None and model is not None:
            self.ema.init(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.ema.update(model)
