"""ACT (Zhao et al. 2023): a CVAE transformer that predicts a chunk of future actions.

Training: a CVAE encoder reads [CLS, qpos, action chunk] (padded steps masked) and gives
the latent's mean and log-variance; z is sampled and, together with qpos and the image
features of every camera, goes through a DETR-style transformer whose decoder turns
``chunk_size`` learned queries into the action chunk. Loss = L1 over non-padded steps +
kl_weight * KL(q(z|a, qpos) || N(0, I)). Inference uses z = 0 (the prior's mean).

Image backbone: a transformers ``ResNetModel`` (ResNet-18 by default; torchvision does
not import beside the CPU torch here), shared by all cameras as in ACT's code, its last
stage projected to ``hidden_dim`` with a 1x1 conv. Each camera's feature map gets 2D sine
position embeddings; the maps are concatenated along the width, as in ACT.

Decoder depth: see ``ilstudio/policies/act/configuration.py`` (1 layer = published ACT).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ilstudio.errors import UserError
from ilstudio.policies.losses import masked_l1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- position embeddings -----------------------------------------------------------------


def sinusoid_table(n_position: int, d_hid: int) -> torch.Tensor:
    """(1, n_position, d_hid) fixed 1D sine table (the CVAE encoder's positions in ACT)."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    i = torch.arange(d_hid, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(i, 2, rounding_mode="floor") / d_hid)
    table = torch.where(i.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float().unsqueeze(0)


def sine_position_2d(height: int, width: int, dim: int, device=None,
                     temperature: float = 10000.0) -> torch.Tensor:
    """(1, dim, H, W) DETR 2D sine embedding (normalized to 2*pi), as ACT's backbone uses."""
    npf = dim // 2
    scale, eps = 2 * math.pi, 1e-6
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device)[:, None].expand(height, width)
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device)[None, :].expand(height, width)
    y = y / (height + eps) * scale
    x = x / (width + eps) * scale
    dim_t = torch.arange(npf, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / npf)
    pos_x, pos_y = x[..., None] / dim_t, y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=3).flatten(2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=3).flatten(2)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).unsqueeze(0)


# -- DETR-style transformer (positions added to queries/keys in every layer) --------------


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    def __init__(self, d: int, nhead: int, ff: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, src, pos=None, key_padding_mask=None):
        if self.pre_norm:
            h = self.norm1(src)
            q = _with_pos(h, pos)
            src = src + self.drop1(self.attn(q, q, h, key_padding_mask=key_padding_mask)[0])
            return src + self.drop2(self.ff(self.norm2(src)))
        q = _with_pos(src, pos)
        src = self.norm1(src + self.drop1(self.attn(q, q, src, key_padding_mask=key_padding_mask)[0]))
        return self.norm2(src + self.drop2(self.ff(src)))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, nhead: int, ff: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.cross_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, d))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, tgt, memory, pos=None, query_pos=None):
        if self.pre_norm:
            h = self.norm1(tgt)
            q = _with_pos(h, query_pos)
            tgt = tgt + self.drop1(self.self_attn(q, q, h)[0])
            h = self.norm2(tgt)
            tgt = tgt + self.drop2(self.cross_attn(_with_pos(h, query_pos), _with_pos(memory, pos),
                                                   memory)[0])
            return tgt + self.drop3(self.ff(self.norm3(tgt)))
        q = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.drop1(self.self_attn(q, q, tgt)[0]))
        tgt = self.norm2(tgt + self.drop2(self.cross_attn(_with_pos(tgt, query_pos),
                                                          _with_pos(memory, pos), memory)[0]))
        return self.norm3(tgt + self.drop3(self.ff(tgt)))


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int, pre_norm: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(layer.norm1.normalized_shape) if pre_norm else None

    def forward(self, src, pos=None, key_padding_mask=None):
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return src if self.norm is None else self.norm(src)


class Decoder(nn.Module):
    def __init__(self, layer: DecoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(layer.norm1.normalized_shape)  # DETR/ACT: final norm always

    def forward(self, tgt, memory, pos=None, query_pos=None):
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
        return self.norm(tgt)


def _xavier(module: nn.Module) -> None:
    """DETR's init: xavier-uniform for every matrix of the transformer."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


# -- the policy ----------------------------------------------------------------------------


class ACTPolicy(nn.Module):
    """ACT's DETR-VAE. forward(qpos, images, action, is_pad) -> {"loss", "l1", "kl"}."""

    def __init__(self, config, backbone: nn.Module, state_dim: int, action_dim: int,
                 chunk_size: int, num_images: int, freeze_backbone: bool = False) -> None:
        super().__init__()
        d = config.hidden_dim
        self.state_dim, self.action_dim, self.chunk_size = state_dim, action_dim, chunk_size
        self.num_images = num_images
        self.kl_weight = float(config.kl_weight)
        self.lr_backbone = float(config.lr_backbone)
        self.latent_dim = config.latent_dim
        self.freeze_backbone = freeze_backbone

        enc_layer = EncoderLayer(d, config.nheads, config.dim_feedforward, config.dropout,
                                 config.pre_norm)
        dec_layer = DecoderLayer(d, config.nheads, config.dim_feedforward, config.dropout,
                                 config.pre_norm)
        # Main transformer (ACT's DETR transformer) and the CVAE encoder (same layer type).
        self.encoder = Encoder(enc_layer, config.enc_layers, config.pre_norm)
        self.decoder = Decoder(dec_layer, config.dec_layers)
        self.cvae_encoder = Encoder(enc_layer, config.enc_layers, config.pre_norm)
        _xavier(self.encoder)
        _xavier(self.decoder)
        _xavier(self.cvae_encoder)

        # CVAE encoder inputs: [CLS, qpos, a_1..a_k] with fixed sine positions.
        self.cls_embed = nn.Embedding(1, d)
        self.encoder_action_proj = nn.Linear(action_dim, d)
        self.encoder_joint_proj = nn.Linear(state_dim, d)
        self.latent_proj = nn.Linear(d, 2 * config.latent_dim)
        self.register_buffer("cvae_pos", sinusoid_table(2 + chunk_size, d), persistent=False)

        # Decoder side: latent and proprio tokens, image features, learned queries.
        self.latent_out_proj = nn.Linear(config.latent_dim, d)
        self.input_proj_robot_state = nn.Linear(state_dim, d)
        self.additional_pos_embed = nn.Embedding(2, d)  # positions of [latent, proprio]
        self.query_embed = nn.Embedding(chunk_size, d)
        self.action_head = nn.Linear(d, action_dim)

        self.backbone = backbone
        self.input_proj = nn.Conv2d(backbone.config.hidden_sizes[-1], d, kernel_size=1)
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    # -- training-mode bookkeeping -----------------------------------------------------

    def train(self, mode: bool = True):
        """A frozen backbone also keeps its BatchNorm statistics fixed (eval mode)."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def optimizer_param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Two groups, as in ACT: the ResNet at act.lr_backbone, the rest at ``lr``.

        Frozen parameters (model.freeze_backbone) are left out of the optimizer entirely.
        """
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
        if backbone:
            groups.append({"params": backbone, "lr": self.lr_backbone,
                           "weight_decay": weight_decay, "name": "backbone"})
        return groups

    # -- pieces ------------------------------------------------------------------------

    def _image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, 3, H, W) or (B, cams, history, 3, H, W) in [0, 1] -> tokens and positions.

        Returns (HW_total, B, d) features and (HW_total, 1, d) positions; every camera (and
        history frame) goes through the shared backbone and gets its own 2D sine positions.
        """
        if images.dim() == 6:  # history frames: each frame is one more view
            images = images.flatten(1, 2)
        if images.dim() != 5 or images.shape[1] != self.num_images:
            raise ValueError(f"ACT was built for {self.num_images} images per sample of shape "
                             f"(3, H, W); got images of shape {tuple(images.shape)}")
        b, n = images.shape[:2]
        x = (images.flatten(0, 1) - self.image_mean) / self.image_std
        feats = self.backbone(pixel_values=x).last_hidden_state  # (B*N, C, h, w)
        feats = self.input_proj(feats)
        _, d, h, w = feats.shape
        # Cameras side by side along the width, as ACT concatenates them (axis=3).
        feats = feats.view(b, n, d, h, w).permute(0, 2, 3, 1, 4).reshape(b, d, h, n * w)
        pos = sine_position_2d(h, w, d, device=feats.device).repeat(1, 1, 1, n)
        return feats.flatten(2).permute(2, 0, 1), pos.flatten(2).permute(2, 0, 1)

    def encode_latent(self, qpos: torch.Tensor, action: torch.Tensor,
                      is_pad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """CVAE encoder: (mu, logvar) of q(z | qpos, action chunk)."""
        b = qpos.shape[0]
        tokens = torch.cat([self.cls_embed.weight.expand(b, 1, -1),
                            self.encoder_joint_proj(qpos).unsqueeze(1),
                            self.encoder_action_proj(action)], dim=1).permute(1, 0, 2)
        if is_pad is None:
            is_pad = torch.zeros(action.shape[:2], dtype=torch.bool, device=qpos.device)
        mask = torch.cat([torch.zeros(b, 2, dtype=torch.bool, device=qpos.device),
                          is_pad.bool()], dim=1)
        pos = self.cvae_pos[:, : tokens.shape[0]].permute(1, 0, 2)
        out = self.cvae_encoder(tokens, pos=pos, key_padding_mask=mask)[0]  # CLS token
        stats = self.latent_proj(out)
        return stats[:, : self.latent_dim], stats[:, self.latent_dim:]

    def decode(self, qpos: torch.Tensor, images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(B, chunk_size, action_dim) from latent z, proprio and images."""
        b = qpos.shape[0]
        img, img_pos = self._image_tokens(images)
        src = torch.cat([self.latent_out_proj(z).unsqueeze(0),
                         self.input_proj_robot_state(qpos).unsqueeze(0), img], dim=0)
        pos = torch.cat([self.additional_pos_embed.weight.unsqueeze(1), img_pos], dim=0)
        memory = self.encoder(src, pos=pos)
        query_pos = self.query_embed.weight.unsqueeze(1).expand(-1, b, -1)
        hs = self.decoder(torch.zeros_like(query_pos), memory, pos=pos, query_pos=query_pos)
        return self.action_head(hs.permute(1, 0, 2))

    # -- API ---------------------------------------------------------------------------

    def forward(self, qpos: torch.Tensor, images: torch.Tensor | None = None,
                action: torch.Tensor | None = None, is_pad: torch.Tensor | None = None) -> dict:
        if images is None:
            raise ValueError("ACT needs camera images (batch key 'images')")
        if action is None:
            return {"actions": self.select_action(qpos, images)}
        action = action[:, : self.chunk_size]
        if is_pad is not None:
            is_pad = is_pad[:, : self.chunk_size].bool()
        mu, logvar = self.encode_latent(qpos, action, is_pad)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        pred = self.decode(qpos, images, z)
        l1 = masked_l1(pred, action, is_pad)
        # KL(N(mu, sigma) || N(0, I)): summed over latent dims, averaged over the batch (ACT).
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1).mean()
        loss = l1 + self.kl_weight * kl
        return {"loss": loss, "l1": l1.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def select_action(self, qpos: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """A normalized action chunk (B, chunk_size, action_dim), with z = 0 as in ACT."""
        z = torch.zeros(qpos.shape[0], self.latent_dim, device=qpos.device, dtype=qpos.dtype)
        return self.decode(qpos, images, z)


# -- building ------------------------------------------------------------------------------


def build_backbone(policy_config, model) -> nn.Module:
    """The ResNet: from model.model_name_or_path (config, and weights if is_pretrained) or
    from the act.backbone_* sizes (ResNet-18 by default) with random weights."""
    from transformers import ResNetConfig, ResNetModel

    path = model.model_name_or_path
    try:
        if path and model.pretrained_backbone:
            backbone = ResNetModel.from_pretrained(path, cache_dir=model.cache_dir)
        elif path:
            config = ResNetConfig.from_pretrained(path, cache_dir=model.cache_dir)
            backbone = ResNetModel(config)
        else:
            backbone = ResNetModel(ResNetConfig(
                layer_type="basic", embedding_size=policy_config.backbone_embedding_size,
                hidden_sizes=list(policy_config.backbone_hidden_sizes),
                depths=list(policy_config.backbone_depths)))
    except (OSError, ValueError) as e:
        raise UserError(f"model.model_name_or_path = {path!r} (model.cache_dir = "
                        f"{model.cache_dir!r}): cannot load a transformers ResNet from it: "
                        f"{str(e).splitlines()[0]}") from None
    if getattr(backbone.config, "model_type", None) != "resnet":
        raise UserError(f"model.model_name_or_path = {path!r}: ACT needs a transformers ResNet, "
                        f"found model_type {backbone.config.model_type!r}")
    return backbone


def build(*, policy_config, task, dataset, model, use_images: bool, **_) -> ACTPolicy:
    if not use_images:
        raise UserError("policy 'act' needs camera images: set task.camera_names and keep "
                        "dataset.is_multimodal = True")
    backbone = build_backbone(policy_config, model)
    num_images = len(task.camera_names) * dataset.history_images_length
    freeze = model.freeze_backbone or model.freeze_vision_tower
    return ACTPolicy(policy_config, backbone, task.state_dim, task.action_dim, model.chunk_size,
                     num_images, freeze_backbone=freeze)
