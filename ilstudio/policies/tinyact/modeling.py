"""TinyACT: ACT's action chunks with an image encoder small enough to train on a CPU.

Per camera, a small conv net (GroupNorm, optional coordinate channels; the encoder lives in
``ilstudio/policies/keypoints.py``, shared with the VLA's keypoint token) turns the fitted frame
(``dataset.image_size``, e.g. 60x80) into a feature map; a 1x1 conv gives ``keypoints``
heat maps whose spatial softmax yields expected (x, y) positions (Levine et al. 2016), and the
feature map's mean gives appearance. Keypoints, pooled features and the normalized joint state
(with a "state present" flag) go through an MLP to a chunk of ``model.chunk_size`` normalized
actions; the loss is L1 over the non-padded steps. Evaluation queries every step and blends the
overlapping chunks, as ACT does (``tinyact.temporal_ensemble``: ``python -m ilstudio.eval``'s default).

Why not just a CNN + state: on scripted transfer-cube data the state explains the training loss
almost completely, and such a policy never learns where the cube is (its first chunk is the
same for every cube position; ../shared/STACK-FACTS.md, "A quick CPU learning spike").
Training-time state dropout hides the state for a fraction of samples so that the image alone
has to predict the chunk there; random shifts keep the encoder from memorizing pixels.
No CVAE: the scripted demonstrations are deterministic given the cube pose.
"""

from __future__ import annotations

import torch
from torch import nn

from ilstudio.errors import UserError
from ilstudio.policies.keypoints import ActNorm, KeypointEncoder, random_shift
from ilstudio.policies.losses import masked_l1


class TinyACTPolicy(nn.Module):
    """forward(qpos, images, action, is_pad) -> {"loss", "l1"}; select_action -> a chunk."""

    def __init__(self, config, state_dim: int, action_dim: int, chunk_size: int,
                 num_images: int) -> None:
        super().__init__()
        self.chunk_size, self.action_dim, self.num_images = chunk_size, action_dim, num_images
        self.use_state = bool(config.use_state)
        self.state_dropout = float(config.state_dropout)
        self.shift = int(config.shift)
        self.encoder = KeypointEncoder(tuple(config.channels), tuple(config.strides),
                                       config.keypoints, config.coord_channels,
                                       config.early_keypoints, config.saturation_channel,
                                       config.saturation_keypoint, config.colour_keypoints)
        width = num_images * self.encoder.out_dim + ((state_dim + 1) if self.use_state else 0)
        # Standardize every input feature: keypoints move over a small part of the frame (the
        # cube's over ~0.1 of [-1, 1]); state and pooled features have other scales.
        layers: list[nn.Module] = [ActNorm(width)] if config.input_norm else []
        for _ in range(config.num_layers):
            layers += [nn.Linear(width, config.hidden_dim), nn.ReLU(), nn.Dropout(config.dropout)]
            width = config.hidden_dim
        layers.append(nn.Linear(width, chunk_size * action_dim))
        self.head = nn.Sequential(*layers)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, cams, 3, H, W) or (B, cams, history, 3, H, W) -> (B, num_images * out_dim)."""
        if images.dim() == 6:
            images = images.flatten(1, 2)
        if images.dim() != 5 or images.shape[1] != self.num_images:
            raise ValueError(f"TinyACT was built for {self.num_images} images per sample of shape "
                             f"(3, H, W); got images of shape {tuple(images.shape)}")
        b = images.shape[0]
        flat = images.flatten(0, 1)
        if self.training:
            flat = random_shift(flat, self.shift)
        return self.encoder(flat).reshape(b, -1)

    def predict(self, qpos: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        parts = [self.image_features(images)]
        if self.use_state:
            present = torch.ones(qpos.shape[0], 1, dtype=qpos.dtype, device=qpos.device)
            if self.training and self.state_dropout > 0:
                present = (torch.rand_like(present) >= self.state_dropout).to(qpos.dtype)
            parts += [qpos * present, present]
        out = self.head(torch.cat(parts, -1))
        return out.view(-1, self.chunk_size, self.action_dim)

    def forward(self, qpos: torch.Tensor, images: torch.Tensor | None = None,
                action: torch.Tensor | None = None, is_pad: torch.Tensor | None = None) -> dict:
        if images is None:
            raise ValueError("TinyACT needs camera images (batch key 'images')")
        if action is None:
            return {"actions": self.select_action(qpos, images)}
        pred = self.predict(qpos, images)
        pad = is_pad[:, : self.chunk_size] if is_pad is not None else None
        loss = masked_l1(pred, action[:, : self.chunk_size], pad)
        return {"loss": loss, "l1": loss.detach()}

    @torch.no_grad()
    def select_action(self, qpos: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """A normalized action chunk (B, chunk_size, action_dim); the state is always fed."""
        return self.predict(qpos, images)


def build(*, policy_config, task, dataset, model, use_images: bool, **_) -> TinyACTPolicy:
    if not use_images:
        raise UserError("policy 'tinyact' needs camera images: set task.camera_names and keep "
                        "dataset.is_multimodal = True")
    num_images = len(task.camera_names) * dataset.history_images_length
    return TinyACTPolicy(policy_config, task.state_dim, task.action_dim, model.chunk_size,
                         num_images)
