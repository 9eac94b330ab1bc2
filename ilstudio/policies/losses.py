"""The losses policies train with, one definition each, so that every policy's reported
``l1`` (and the VLAs' ``lm_loss``) means the same thing and a fix reaches all of them.

The action loss is L1 over the steps of a chunk that hold data: chunks near an episode's end
are padded (``is_pad``), those steps repeat the last action and would teach the policy to
stop, so they must not count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ilstudio.data.language import IGNORE  # the label of a token no loss counts (prompt, padding)


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


def language_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over the target tokens that count (IGNORE elsewhere); a batch
    with none gives a zero that keeps the graph, so every step has the same parameters."""
    if (target != IGNORE).any():
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=IGNORE)
    return logits.sum() * 0.0


def vla_losses(pred: torch.Tensor, action: torch.Tensor, is_pad: torch.Tensor | None,
               hidden: torch.Tensor, labels: torch.Tensor | None, *, queries_start: int,
               num_queries: int, prompt_len: int, lm_head: torch.nn.Module,
               llm_loss_weight: float) -> dict:
    """A VLA's training losses, for both backbone kinds: the masked L1 of the action chunk,
    plus ``llm_loss_weight`` x the language loss on the target tokens that follow the action
    queries (read by the model's own LM head) when that weight is on and labels are given.
    The LM head runs only on the positions whose label counts: a real VLM's vocabulary is
    ~150-260k tokens, so padded target positions would cost a vocabulary-wide row each, in
    the forward, its float copy and the backward."""
    action_loss = masked_l1(pred, action, is_pad)
    out = {"action_loss": action_loss.detach()}
    loss = action_loss
    if llm_loss_weight > 0 and labels is not None:
        target = labels[:, prompt_len:]
        start = queries_start + num_queries - 1  # the hidden state before each target token
        counted = target != IGNORE  # logits only where a label counts: (n, vocab), not (B, T, vocab)
        logits = lm_head(hidden[:, start:start + target.shape[1]][counted]).float()
        lm_loss = language_loss(logits, target[counted])
        loss = loss + llm_loss_weight * lm_loss
        out["lm_loss"] = lm_loss.detach()
    out["loss"] = loss
    return out
