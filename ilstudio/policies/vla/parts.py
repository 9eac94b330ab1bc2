"""What the freezing switches train, untied embeddings, state dropout and the keypoint token
(vla.keypoint_encoder): shared by both backbone kinds."""

from __future__ import annotations

import torch
from torch import nn

from ilstudio.policies.keypoints import ActNorm, KeypointEncoder


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


class KeypointProjector(nn.Module):
    """vla.keypoint_encoder: images -> standardized keypoint features and one LM token each.

    TinyACT's encoder as its recipe (gin_configs/tinyact.gin) sets it: conv widths (16, 32, 32)
    with strides (2, 2, 1), coordinate and saturation channels, ``keypoints`` keypoints off the
    last layer and 16 off the first, one saturation and three colour keypoints; then ActNorm
    (keypoints move over a small part of [-1, 1]) and a 2-layer MLP to the LM's hidden size.
    Trained from scratch: it has no pretrained weights to load.
    """

    def __init__(self, keypoints: int, llm_hidden: int) -> None:
        super().__init__()
        self.encoder = KeypointEncoder((16, 32, 32), (2, 2, 1), keypoints, coord_channels=True,
                                       early_keypoints=16, saturation_channel=True,
                                       saturation_keypoint=True, colour_keypoints=True)
        self.out_dim = self.encoder.out_dim
        self.norm = ActNorm(self.out_dim)
        self.token = nn.Sequential(nn.Linear(self.out_dim, llm_hidden), nn.GELU(),
                                   nn.Linear(llm_hidden, llm_hidden))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, out_dim) standardized features."""
        return self.norm(self.encoder(images.to(self.norm.bias.dtype)))


def keypoint_encoder_trains(kp: nn.Module | None) -> None:
    """After LoRA: LoRA freezes the base weights of every part it adapts; the keypoint encoder
    has none worth keeping (it is always drawn fresh), so when lora.module names its part its
    convolutions, norms and sharpness still train; only the Linear layers LoRA wraps keep a
    frozen base under their adapters."""
    if kp is None:
        return
    for name, param in kp.named_parameters():
        if "lora_" not in name and "base_layer" not in name:
            param.requires_grad_(True)


def keypoint_inputs(kp: KeypointProjector | None, images: torch.Tensor, hidden: int):
    """(B, images * features) standardized keypoint features (None without an encoder) and
    (B, images, hidden) keypoint tokens (none without one), from (B, cams[, history], 3, H, W)
    frames in [0, 1]: every camera and frame gets its own token."""
    b = images.shape[0]
    if kp is None:
        return None, images.new_zeros(b, 0, hidden)
    feats = kp(images.reshape(-1, *images.shape[-3:]).float())
    return feats.reshape(b, -1), kp.token(feats).reshape(b, -1, hidden)


def head_actions(head: nn.Module, hidden: torch.Tensor, query_start: int,
                 keypoints: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, action_dim) actions from the LM's hidden states at the K action queries, through
    the head's MLP; with vla.keypoints_to_head the keypoint features' linear map is added to
    every query first (a path around the LM). One rule for both backbone kinds' heads."""
    k = head.queries.shape[0]
    h = hidden[:, query_start:query_start + k].to(head.mlp[0].weight.dtype)
    if head.keypoints is not None:
        h = h + head.keypoints(keypoints.to(h.dtype))[:, None]
    return head.mlp(h).float()
