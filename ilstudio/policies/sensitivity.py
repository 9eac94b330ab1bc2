"""Does a trained image policy look at the scene? Its first chunk across episodes tells.

At t = 0 of the scripted transfer-cube episodes the robot's joint state is the same in every
episode; only the camera shows where the cube is. A policy that uses the image predicts
different first chunks for different episodes, about as different as the recorded ones; a
policy blind to the cube predicts the same chunk every time (spread 0), however low its
training loss. This is the number to watch beside the loss (../shared/STACK-FACTS.md,
"A quick CPU learning spike").
"""

from __future__ import annotations

import torch


def first_samples(dataset, max_episodes: int | None = None) -> dict[str, torch.Tensor]:
    """The t = 0 sample of each episode of an EpisodeDataset, stacked (normalized, as trained)."""
    n = len(dataset.episode_starts) if max_episodes is None else min(max_episodes, len(dataset.episode_starts))
    samples = [dataset[int(dataset.episode_starts[ep])] for ep in range(n)]
    return {k: torch.stack([s[k] for s in samples]) for k in ("qpos", "images", "action", "is_pad")}


@torch.no_grad()
def image_sensitivity(policy, samples: dict[str, torch.Tensor]) -> dict[str, float]:
    """Spread of the predicted first chunk across episodes vs the recorded chunks' spread.

    spread = per (step, joint) standard deviation across episodes, averaged; in normalized
    action units. ``ratio`` = predicted / recorded: 0 means blind to the image (when the
    state is the same in every episode), about 1 means it varies as much as the data does.
    ``first_chunk_l1`` is the L1 error of those first chunks (what the blind policy gets wrong).
    """
    was_training = policy.training
    policy.eval()
    try:
        pred = policy.select_action(samples["qpos"], samples["images"]).float()
    finally:
        policy.train(was_training)
    target = samples["action"][:, : pred.shape[1]].float()
    pred_spread = float(pred.std(0).mean())
    data_spread = float(target.std(0).mean())
    return {
        "pred_spread": pred_spread,
        "data_spread": data_spread,
        "ratio": pred_spread / data_spread if data_spread > 0 else float("nan"),
        "first_chunk_l1": float((pred - target).abs().mean()),
        "state_spread": float(samples["qpos"].std(0).mean()) if len(samples["qpos"]) > 1 else 0.0,
        "episodes": int(len(pred)),
    }


def summary_line(s: dict[str, float]) -> str:
    return (f"image sensitivity {s['ratio']:.2f} (first-chunk spread {s['pred_spread']:.3f} vs "
            f"data {s['data_spread']:.3f}; first-chunk L1 {s['first_chunk_l1']:.3f}; "
            f"{s['episodes']} episodes, state spread {s['state_spread']:.2g})")

