"""What the freezing switches train, untied embeddings and state dropout: shared by both
backbone kinds."""

from __future__ import annotations

import torch
from torch import nn


def trainable_parts(model) -> dict[str, bool]:
    """Which parts train, from the freezing switches (see modeling.py's docstring)."""
    train = {"vit": True, "llm": True, "projector": True, "action_head": True}
    if model.freeze_vision_tower:
        train["vit"] = False
    if model.freeze_backbone:
        train["vit"] = train["llm"] = False
    if model.tune_mm_mlp_adapter:
        train = {"vit": False, "llm": False, "projector": True, "action_head": True}
    return train


def untie_embeddings(model: nn.Module) -> None:
    """Give the lm head its own copy of tied embeddings: a plain-module safetensors checkpoint
    cannot hold shared tensors (the Trainer saves our state dict with safetensors). A weight a
    quantized load left in the file gets its own map of it, not a copy in memory."""
    from ilstudio.models.mapped_embeddings import own_copy

    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and out.weight is inp.weight:
        out.weight = own_copy(inp.weight)
        for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            cfg.tie_word_embeddings = False


def drop_state(state: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """vla.state_dropout: in training, zero each sample's state token with probability ``p``.

    Why: on scripted demonstrations the joint state alone explains most of an action chunk, so
    a policy that always sees it can reach a low loss without reading where the cube is in
    the image (TinyACT's state_dropout, the same lever). Evaluation always feeds the state.
    state: (B, 1, hidden) token embeddings.
    """
    if not training or p <= 0:
        return state
    keep = (torch.rand(state.shape[0], 1, 1, device=state.device) >= p).to(state.dtype)
    return state * keep
