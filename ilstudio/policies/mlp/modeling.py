"""MLP policy: normalized state (and small conv features per camera) -> an action chunk."""

from __future__ import annotations

import torch
from torch import nn

from ilstudio.policies.losses import masked_l1


class ImageEncoder(nn.Module):
    """A small conv encoder: enough for the MLP baseline, cheap on the CPU."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, out_dim), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPPolicy(nn.Module):
    def __init__(self, config, state_dim: int, action_dim: int, chunk_size: int,
                 num_cameras: int, history: int) -> None:
        super().__init__()
        self.chunk_size, self.action_dim = chunk_size, action_dim
        self.num_image_inputs = num_cameras * history
        self.image_encoder = ImageEncoder(config.image_feature_dim) if self.num_image_inputs else None
        width = state_dim + self.num_image_inputs * config.image_feature_dim
        layers: list[nn.Module] = []
        for _ in range(config.num_layers):
            layers += [nn.Linear(width, config.hidden_dim), nn.ReLU(), nn.Dropout(config.dropout)]
            width = config.hidden_dim
        layers.append(nn.Linear(width, chunk_size * action_dim))
        self.mlp = nn.Sequential(*layers)

    def predict(self, qpos: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        features = [qpos]
        if self.image_encoder is not None:
            if images is None:
                raise ValueError("this MLP policy was built with camera inputs; images are missing")
            flat = images.reshape(-1, *images.shape[-3:])
            feats = self.image_encoder(flat).reshape(qpos.shape[0], -1)
            features.append(feats)
        out = self.mlp(torch.cat(features, dim=-1))
        return out.view(-1, self.chunk_size, self.action_dim)

    def forward(self, qpos: torch.Tensor, action: torch.Tensor | None = None,
                is_pad: torch.Tensor | None = None, images: torch.Tensor | None = None) -> dict:
        pred = self.predict(qpos, images)
        if action is None:
            return {"actions": pred}
        loss = masked_l1(pred, action, is_pad)
        return {"loss": loss, "l1": loss.detach()}

    @torch.no_grad()
    def select_action(self, qpos: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """A normalized action chunk (B, chunk_size, action_dim) for the current observation."""
        return self.predict(qpos, images)


def build(*, policy_config, task, dataset, model, use_images: bool, **_) -> MLPPolicy:
    cams = len(task.camera_names) if use_images else 0
    return MLPPolicy(policy_config, task.state_dim, task.action_dim, model.chunk_size, cams,
                     dataset.history_images_length)
