"""ACT policy settings (cheap: no torch). Defaults follow the ACT paper (Zhao et al. 2023).

Decoder depth: the original ACT code declares 7 decoder layers, but by a known bug its
DETR-style decoder returns every layer's output and ACT reads only the first one
(``hs[0]``), so layers 2-7 never influence the actions and never receive gradients. The
published results therefore come from a 1-layer decoder, and ``dec_layers = 1`` is the
default here: it reproduces that behaviour exactly, trains faster, and leaves no unused
parameters (which would break DDP with ``ddp_find_unused_parameters=False``). Set
``act.dec_layers`` higher to get a deeper decoder that is really used.
"""

from __future__ import annotations

import re
from pathlib import Path

from ilstudio.config.declare import configurable, param
from ilstudio.policies.base import PolicyConfig, dropout_param
from ilstudio.policies.ensemble import temporal_ensemble_param

# "org/name" as on the Hugging Face hub: only resolvable through model.cache_dir offline.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@configurable("act", group="ACT policy")
class ACTConfig(PolicyConfig):
    """CVAE transformer (ACT) with a transformers ResNet image backbone shared by all cameras."""

    name = "act"
    uses_images = True
    needs_images = True
    # The evaluation contract (declared in PolicyConfig), ACT's way: query every step and
    # blend the overlapping chunks.
    temporal_ensemble: bool = temporal_ensemble_param(True)
    hidden_dim: int = param(512, "Transformer width (d_model).", documented=False,
                            bounds="[2, inf)")
    nheads: int = param(8, "Attention heads.", documented=False, bounds="[1, inf)")
    enc_layers: int = param(4, "Transformer encoder layers (also the CVAE encoder's depth).",
                            documented=False, bounds="[1, inf)")
    dec_layers: int = param(1, "Transformer decoder layers. 1 reproduces the published ACT "
                            "(its code builds 7 but uses only the first; see the module doc).",
                            documented=False, bounds="[1, inf)")
    dim_feedforward: int = param(3200, "Feed-forward width in every transformer layer.",
                                 documented=False, bounds="[1, inf)")
    latent_dim: int = param(32, "Size of the CVAE latent z.", documented=False,
                            bounds="[1, inf)")
    kl_weight: float = param(10.0, "Weight of the KL term: loss = L1 + kl_weight * KL.",
                             documented=False, bounds="[0, inf)")
    dropout: float = dropout_param(0.1, "Dropout in the transformer layers.")
    pre_norm: bool = param(False, "LayerNorm before (True) or after (False, ACT) each sublayer.",
                           documented=False)
    lr_backbone: float = param(1e-5, "Learning rate of the ResNet backbone's own optimizer "
                               "parameter group (other parameters use --learning_rate).",
                               documented=False, bounds="[0, inf)")
    backbone_hidden_sizes: tuple[int, ...] = param(
        (64, 128, 256, 512), "ResNet stage widths when built from scratch (ResNet-18).",
        documented=False, bounds="[1, inf)")
    backbone_depths: tuple[int, ...] = param(
        (2, 2, 2, 2), "ResNet blocks per stage when built from scratch (ResNet-18).",
        documented=False, bounds="[1, inf)")
    backbone_embedding_size: int = param(64, "ResNet stem width when built from scratch.",
                                         documented=False, bounds="[1, inf)")

    def validate(self, *, task, dataset, model, lora, quantization, source_of) -> None:
        problems = []
        path = model.model_name_or_path
        where = f"model.model_name_or_path (set in {source_of('model.model_name_or_path')})"
        if model.pretrained_backbone and not path:
            problems.append(f"model.is_pretrained = True (set in {source_of('model.is_pretrained')}) "
                            f"needs model.model_name_or_path to name a saved "
                            f"transformers ResNet (a directory with config.json and weights); "
                            f"it is empty")
        elif path and not Path(path).expanduser().is_dir() and not _HUB_ID.match(path):
            problems.append(f"{where} = {path!r}: no such directory (expected a saved "
                            f"transformers ResNet: config.json + weights, e.g. from "
                            f"ResNetModel.save_pretrained)")
        elif path and Path(path).expanduser().is_dir() and not (Path(path).expanduser() / "config.json").is_file():
            problems.append(f"{where} = {path!r}: no config.json there (expected a saved "
                            f"transformers ResNet)")
        if self.hidden_dim % self.nheads:
            problems.append(f"act.hidden_dim = {self.hidden_dim} must be divisible by act.nheads "
                            f"= {self.nheads}")
        if self.hidden_dim % 2:
            problems.append(f"act.hidden_dim = {self.hidden_dim} must be even (2D sine positions)")
        if len(self.backbone_hidden_sizes) != len(self.backbone_depths) or not self.backbone_depths:
            problems.append(f"act.backbone_hidden_sizes {self.backbone_hidden_sizes} and "
                            f"act.backbone_depths {self.backbone_depths} must have the same, "
                            f"non-zero length")
        # Report the shared checks (cameras, unsupported switches) and ours in one message.
        self._validate_with(problems, task=task, dataset=dataset, model=model, lora=lora,
                            quantization=quantization, source_of=source_of)

CONFIG_CLASS = ACTConfig
