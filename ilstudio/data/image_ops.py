"""Fitting recorded camera frames to a policy's input size (``dataset.image_aspect_ratio``).

Two ways, as the older system documented them:

* ``pad``: letterbox. Scale the frame by the largest factor that fits inside (H, W) while
  keeping its aspect ratio, then pad the remaining rows/columns with zeros, centered.
  Geometry stays truthful (a round object stays round), at the cost of black bands.
* ``resize``: stretch the frame to exactly (H, W). No bands, but the aspect changes.
  ``square`` (LLaVA's and IL-Studio's name for their plain resize) is the same.

Frames go in and come out as uint8 (n, H, W, 3) arrays: the result is rounded back to
uint8 so the lazy (per sample) and eager (cached up front) paths of ``lazy_preprocess``
give bit-identical samples and the cache costs one byte per pixel, as the recording does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("pad", "resize", "square")


def letterbox_geometry(src_hw: tuple[int, int], dst_hw: tuple[int, int]
                       ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((h, w) of the scaled content, (top, left) offsets) for fitting src into dst by pad."""
    (h, w), (dh, dw) = src_hw, dst_hw
    scale = min(dh / h, dw / w)
    nh, nw = min(dh, max(1, round(h * scale))), min(dw, max(1, round(w * scale)))
    return (nh, nw), ((dh - nh) // 2, (dw - nw) // 2)


def _resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(n, 3, h, w) float -> (n, 3, *hw); identity when the size already matches. Antialiased,
    so a downscaled frame does not alias (fine stripes, edges) the way plain bilinear does."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)


def fit_tensor(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """The one frame fitting: float frames (n, 3, H, W) -> (n, 3, *size) by ``mode``.

    Values are not rounded (a policy fits [0, 1] frames inside its forward: the VLA's
    square vision input); ``fit_frames`` is the uint8 form the data pipeline stores.
    """
    if mode not in MODES:
        raise ValueError(f"image_aspect_ratio must be one of {MODES}, got {mode!r}")
    dh, dw = int(size[0]), int(size[1])
    if tuple(x.shape[-2:]) == (dh, dw):
        return x
    if mode in ("resize", "square"):
        return _resize(x, (dh, dw))
    (nh, nw), (top, left) = letterbox_geometry(tuple(x.shape[-2:]), (dh, dw))
    out = x.new_zeros((*x.shape[:-2], dh, dw))
    out[..., top:top + nh, left:left + nw] = _resize(x, (nh, nw))
    return out


def fit_frames(frames: np.ndarray, size: tuple[int, int] | None, mode: str) -> np.ndarray:
    """Fit uint8 frames (n, H, W, 3) to ``size`` = (H', W') by ``mode``; None keeps them."""
    if size is None:
        return frames
    if mode not in MODES:
        raise ValueError(f"image_aspect_ratio must be one of {MODES}, got {mode!r}")
    if frames.shape[1:3] == (int(size[0]), int(size[1])):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    out = fit_tensor(x, size, mode)
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
