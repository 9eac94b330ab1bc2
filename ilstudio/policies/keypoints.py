"""Keypoint image encoding shared by the policies that learn where things are from scratch:
a small conv net whose 1x1-conv heat maps go through a spatial softmax to expected (x, y)
positions (Levine et al. 2016), optional colour keypoints, and ActNorm to standardize them.

Why one home: TinyACT's head reads these features directly; the VLA's optional keypoint
token (``vla.keypoint_encoder``) projects the same features into its language model. A random
vision transformer has no prior that finds a ~2-pixel cube; a spatial softmax over a colour map
finds it from the first step of training (BENCHMARKS.md, "Learning: the headline VLA").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def coord_grid(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """(1, 2, h, w) x and y coordinates in [-1, 1] (CoordConv channels)."""
    ys = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy]).unsqueeze(0)


def spatial_softmax(heat: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) logits -> (B, 2K) expected (x, y) in [-1, 1] of each softmax map."""
    b, k, h, w = heat.shape
    prob = heat.flatten(2).softmax(-1).view(b, k, h, w)
    grid = coord_grid(h, w, heat.device, heat.dtype)  # (1, 2, h, w)
    x = (prob * grid[:, 0:1]).sum((-2, -1))
    y = (prob * grid[:, 1:2]).sum((-2, -1))
    return torch.stack([x, y], -1).flatten(1)


def colour_dominance(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> (N, 3, H, W): how far each channel exceeds the larger of the other two
    (0 on grey, white and black; the red map is high only on red things)."""
    others = [torch.maximum(x[:, (c + 1) % 3], x[:, (c + 2) % 3]) for c in range(3)]
    return (x - torch.stack(others, 1)).clamp(min=0)


def random_shift(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Shift each image of (N, C, H, W) by up to ``pad`` pixels (replicate padding, as DrQ)."""
    if pad <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    off = torch.randint(0, 2 * pad + 1, (n, 2)).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(off)])


class ActNorm(nn.Module):
    """Per-feature affine standardization initialized from the first training batch (Glow's
    ActNorm), then learned like any weight.

    Why not BatchNorm: its running statistics, averaged over noisy batches of 32 while the
    features still move, made the evaluation-time policy much worse than the training-time one
    (first-chunk error 0.26 vs 0.11 after 2000 steps). A fixed affine map has no train/eval gap.
    ``eps`` caps the gain at 1/sqrt(eps) so a nearly constant feature is not blown up.
    """

    def __init__(self, width: int, eps: float = 1e-2) -> None:
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(width))
        self.log_scale = nn.Parameter(torch.zeros(width))
        self.register_buffer("initialized", torch.tensor(False))  # saved: no re-init on load

    @torch.no_grad()
    def _init(self, x: torch.Tensor) -> None:
        mean, sq = x.mean(0), x.pow(2).mean(0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            stats = torch.stack([mean, sq])  # every rank starts from the same map
            torch.distributed.all_reduce(stats)
            mean, sq = stats / torch.distributed.get_world_size()
        var = (sq - mean.pow(2)).clamp(min=0)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-0.5 * torch.log(var + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            self._init(x)
        return (x + self.bias) * self.log_scale.exp()


class KeypointEncoder(nn.Module):
    """Image (N, 3, H, W) in [0, 1] -> (N, 2K + C) keypoints and mean-pooled features."""

    def __init__(self, channels: tuple[int, ...], strides: tuple[int, ...], keypoints: int,
                 coord_channels: bool, early_keypoints: int = 0,
                 saturation_channel: bool = False, saturation_keypoint: bool = False,
                 colour_keypoints: bool = False) -> None:
        super().__init__()
        # log of the softmax sharpness for the saturation keypoint (learned; starts at 20).
        self.saturation_log_beta = nn.Parameter(torch.tensor(3.0)) if saturation_keypoint else None
        self.colour_log_beta = nn.Parameter(torch.full((3,), 3.0)) if colour_keypoints else None
        self.coord_channels, self.saturation_channel = coord_channels, saturation_channel
        self.layers = nn.ModuleList()
        cin = 3 + (2 if coord_channels else 0) + (1 if saturation_channel else 0)
        for i, (c, s) in enumerate(zip(channels, strides, strict=True)):
            k = 5 if i == 0 else 3
            self.layers.append(nn.Sequential(nn.Conv2d(cin, c, k, stride=s, padding=k // 2),
                                             nn.GroupNorm(max(1, min(8, c // 4)), c), nn.ReLU()))
            cin = c
        self.to_keypoints = nn.Conv2d(cin, keypoints, 1)
        # Keypoints read off the first layer (fine resolution, colour-level features): a small
        # object such as the cube is one linear colour filter away there.
        self.to_early_keypoints = (nn.Conv2d(channels[0], early_keypoints, 1)
                                   if early_keypoints else None)
        self.out_dim = (2 * keypoints + cin + 2 * early_keypoints + (2 if saturation_keypoint else 0)
                        + (6 if colour_keypoints else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sat = x.amax(1, keepdim=True) - x.amin(1, keepdim=True)  # 0 on grey and white
        out = []
        if self.saturation_log_beta is not None:
            out.append(spatial_softmax(sat * self.saturation_log_beta.exp()))
        if self.colour_log_beta is not None:
            out.append(spatial_softmax(colour_dominance(x) * self.colour_log_beta.exp().view(1, 3, 1, 1)))
        x = torch.cat([(x - 0.5) / 0.25, *([(sat - 0.25) / 0.25] if self.saturation_channel else [])], 1)
        if self.coord_channels:
            x = torch.cat([x, coord_grid(*x.shape[-2:], x.device, x.dtype).expand(len(x), -1, -1, -1)], 1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 0 and self.to_early_keypoints is not None:
                out.append(spatial_softmax(self.to_early_keypoints(x)))
        return torch.cat([*out, spatial_softmax(self.to_keypoints(x)), x.mean((-2, -1))], -1)
