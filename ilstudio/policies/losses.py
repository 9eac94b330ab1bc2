"""The action loss every policy trains with: L1 over the steps of a chunk that hold data.

Chunks near an episode's end are padded (``is_pad``): those steps repeat the last action
and would teach the policy to stop, so they must not count. One definition, so that every
policy's reported ``l1`` means the same thing and a fix reaches all of them.
"""

from __future__ import annotations

import torch


def masked_l1(pred: torch.Tensor, target: torch.Tensor,
              is_pad: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error over action dims and non-padded steps.

    pred, target: (batch, steps, action_dim); is_pad: (batch, steps), True on padding (None:
    nothing is padded). A batch of padding only gives 0, not NaN.
    """
    per_step = (pred - target).abs().mean(-1)
    if is_pad is None:
        return per_step.mean()
    keep = (~is_pad.bool()).to(per_step.dtype)
    return (per_step * keep).sum() / keep.sum().clamp(min=1.0)
