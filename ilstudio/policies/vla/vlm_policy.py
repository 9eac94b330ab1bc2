"""VLA policy on a standard image-text-to-text checkpoint (``backbones.load_backbone``).

The model's processor makes its own prompt (chat template, image tokens, pixels: see
vlm_inputs.py); the policy's tokens follow it, as on the two-folder kind::

    [processor output: prompt + image tokens (left-padded)] [state token] [keypoint tokens]
    [K action queries] [language target (T)]

(keypoint tokens: only with vla.keypoint_encoder, one per image, as on the two-folder kind;
here the encoder belongs to the action head, since the projector is the model's own.)

The model's own forward merges the image features into the sequence (its projector /
connector / merger), and its multimodal position ids (Qwen2-VL's M-RoPE through the base
model's ``get_rope_index``) are computed with the policy's tokens counted as text. The
action head reads the language model's last hidden state at the K queries; the language
target uses the model's own LM head.

Parts: ``llm`` (the language model, its lm head with it for freezing), ``vit`` (the vision
tower; a projector nested inside it, like Qwen2-VL's merger, is not part of it),
``projector`` (the model's connector), ``action_head`` (state embedding, queries, MLP, and
the keypoint encoder with its head map when vla.keypoint_encoder / vla.keypoints_to_head).
"""

from __future__ import annotations

import inspect

import torch
from absl import logging
from torch import nn

from ilstudio.policies.losses import vla_losses
from ilstudio.policies.vla.backbones import Backbone
from ilstudio.policies.vla.parts import KeypointProjector, drop_state, head_actions, keypoint_inputs
from ilstudio.policies.vla.vlm_inputs import ImageTextInputs


class StateActionHead(nn.Module):
    """qpos -> one LM token (linear), K learned query tokens, and an MLP on their hidden states;
    with vla.keypoint_encoder, the keypoint encoder (one token per image) and with
    vla.keypoints_to_head, a linear map of its features added to every query's hidden state."""

    def __init__(self, hidden: int, chunk_size: int, action_dim: int, state_dim: int,
                 keypoints: int = 0, num_images: int = 0, to_head: bool = False) -> None:
        super().__init__()
        self.state = nn.Linear(state_dim, hidden)
        self.queries = nn.Parameter(torch.randn(chunk_size, hidden) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, action_dim))
        self.keypoint_encoder = KeypointProjector(keypoints, hidden) if keypoints else None
        self.keypoints = (nn.Linear(num_images * self.keypoint_encoder.out_dim, hidden)
                          if keypoints and to_head else None)


def _kwargs_for(fn, values: dict) -> dict:
    accepted = inspect.signature(fn).parameters
    return {k: v for k, v in values.items() if k in accepted}


class HFVLAPolicy(nn.Module):
    def __init__(self, backbone: Backbone, inputs: ImageTextInputs, head: StateActionHead, *,
                 prompt_len: int, llm_loss_weight: float, state_dropout: float = 0.0) -> None:
        super().__init__()
        self.vlm, self.action_head = backbone.vlm, head
        self.family, self.part_names = backbone.family, backbone.parts
        self.inputs = inputs
        self.prompt_len = prompt_len
        self.llm_loss_weight = float(llm_loss_weight)
        self.state_dropout = float(state_dropout)  # vla.state_dropout (training only)
        self.lora_lr: float | None = None
        self.prompt: tuple[torch.Tensor, torch.Tensor] | None = None
        self.placeholder_id = int(inputs.tokenizer.pad_token_id)

    def parts(self) -> dict[str, nn.Module]:
        """The named parts (what lora.module and the freezing switches refer to)."""
        out = {"llm": self.vlm.get_submodule(self.part_names["llm"][0]),
               "vit": self.vlm.get_submodule(self.part_names["vit"][0])}
        if self.part_names["projector"]:
            out["projector"] = self.vlm.get_submodule(self.part_names["projector"][0])
        out["action_head"] = self.action_head
        return out

    def part_prefixes(self) -> dict[str, list[str]]:
        """Part -> qualified name prefixes within this policy (the lm head counts as llm)."""
        p = {k: [f"vlm.{n}" for n in v] for k, v in self.part_names.items()}
        return {"llm": p["llm"] + p["lm_head"], "vit": p["vit"], "projector": p["projector"],
                "action_head": ["action_head"]}

    def optimizer_param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        from ilstudio.models import has_lora, lora_param_groups

        if not has_lora(self):
            return []
        return lora_param_groups(self, lr, self.lora_lr, weight_decay)

    def set_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.prompt = (input_ids, attention_mask)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kw) -> None:
        """The model's own activation checkpointing (non-reentrant unless told otherwise: the
        frozen embeddings give the checkpointed layers inputs without grad)."""
        kwargs = activation_checkpointing_kwargs or {"use_reentrant": False}
        enable = getattr(self.vlm, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(kwargs, **kw)
        else:  # transformers before the rename
            self.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kw) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kw)

    # -- inputs ------------------------------------------------------------------------

    def _prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        p = self.prompt_len
        return [self.inputs.tokenizer.decode(row[m.bool()].tolist())
                for row, m in zip(input_ids[:, :p], attention_mask[:, :p], strict=True)]

    def _sequence(self, qpos, images, input_ids, attention_mask, with_target: bool):
        if input_ids is None or input_ids.shape[1] < self.prompt_len:
            raise ValueError(f"input_ids must hold at least the {self.prompt_len} prompt tokens")
        if images.dim() == 5:
            images = images[:, :, None]
        images = images.reshape(images.shape[0], -1, *images.shape[-3:])
        enc = {k: v.to(qpos.device) for k, v in
               self.inputs(self._prompts(input_ids, attention_mask), images).items()}
        ids, mask = enc.pop("input_ids"), enc.pop("attention_mask")
        b, lp = ids.shape
        head = self.action_head
        keypoints, kp_tokens = keypoint_inputs(head.keypoint_encoder, images, head.queries.shape[1])
        k = head.queries.shape[0] + kp_tokens.shape[1]  # the policy's tokens after the state
        ids_parts = [ids, ids.new_full((b, 1 + k), self.placeholder_id)]
        mask_parts = [mask, mask.new_ones(b, 1 + k)]
        if with_target:
            ids_parts.append(input_ids[:, self.prompt_len:].to(ids.dtype))
            mask_parts.append(attention_mask[:, self.prompt_len:].to(mask.dtype))
        all_ids, all_mask = torch.cat(ids_parts, 1), torch.cat(mask_parts, 1)
        extra = all_ids.shape[1] - lp
        for key, fill in (("mm_token_type_ids", 0), ("token_type_ids", 1)):
            if key in enc:  # the policy's tokens are text (PaliGemma: causal, after the prefix)
                enc[key] = torch.cat([enc[key], enc[key].new_full((b, extra), fill)], 1)
        embeds = self.vlm.get_input_embeddings()(all_ids)
        state = head.state(qpos.to(head.state.weight.dtype))[:, None].to(embeds.dtype)
        state = drop_state(state, self.state_dropout, self.training)
        queries = head.queries[None].expand(b, -1, -1).to(embeds.dtype)
        embeds = torch.cat([embeds[:, :lp], state, kp_tokens.to(embeds.dtype), queries,
                            embeds[:, lp + 1 + k:]], 1)
        return embeds, all_ids, all_mask, enc, lp + 1 + kp_tokens.shape[1], keypoints

    def _hidden(self, embeds, ids, mask, enc) -> torch.Tensor:
        base = self.vlm.base_model
        vision_dtype = self.vlm.get_submodule(self.part_names["vit"][0]).dtype
        enc = {k: v.to(vision_dtype) if v.is_floating_point() else v for k, v in enc.items()}
        if hasattr(base, "get_rope_index"):  # multimodal RoPE (Qwen2-VL): the model's own
            position_ids = base.get_rope_index(**_kwargs_for(
                base.get_rope_index, {"input_ids": ids, "attention_mask": mask, **enc}))[0]
        elif bool(mask.all()):
            position_ids = None  # the model's own default positions
        else:
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = base(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                   use_cache=False, **_kwargs_for(base.forward, enc))
        return out.last_hidden_state

    def _actions(self, hidden: torch.Tensor, query_start: int,
                 keypoints: torch.Tensor | None = None) -> torch.Tensor:
        return head_actions(self.action_head, hidden, query_start, keypoints)

    # -- training and inference ----------------------------------------------------------

    def forward(self, qpos, images=None, input_ids=None, attention_mask=None, labels=None,
                action=None, is_pad=None) -> dict:
        with_lm = self.llm_loss_weight > 0 and labels is not None
        embeds, ids, mask, enc, qs, keypoints = self._sequence(qpos, images, input_ids,
                                                               attention_mask, with_lm)
        hidden = self._hidden(embeds, ids, mask, enc)
        pred = self._actions(hidden, qs, keypoints)
        if action is None:
            return {"actions": pred}
        return vla_losses(pred, action, is_pad, hidden, labels, queries_start=qs,
                          num_queries=self.action_head.queries.shape[0],
                          prompt_len=self.prompt_len, lm_head=self.vlm.get_output_embeddings(),
                          llm_loss_weight=self.llm_loss_weight)

    @torch.no_grad()
    def select_action(self, qpos, images, input_ids=None, attention_mask=None) -> torch.Tensor:
        """A normalized action chunk (B, chunk_size, action_dim) from the prompt tokens (given,
        or set once with set_prompt)."""
        if input_ids is None:
            if self.prompt is None:
                raise ValueError("select_action needs the prompt tokens: pass input_ids and "
                                 "attention_mask, or call set_prompt first")
            b = qpos.shape[0]
            input_ids, attention_mask = (x.to(qpos.device).reshape(1, -1).expand(b, -1)
                                         for x in self.prompt)
        embeds, ids, mask, enc, qs, keypoints = self._sequence(qpos, images, input_ids,
                                                               attention_mask, False)
        return self._actions(self._hidden(embeds, ids, mask, enc), qs, keypoints)


# -- trainability ------------------------------------------------------------------------


def part_of(name: str, prefixes: dict[str, list[str]]) -> str:
    """The innermost part whose prefix holds parameter/module ``name`` ('llm' if none does:
    anything else of the backbone trains and freezes with the language model)."""
    best, length = "llm", -1
    for part, names in prefixes.items():
        for p in names:
            if (name == p or name.startswith(p + ".")) and len(p) > length:
                best, length = part, len(p)
    return best


def apply_trainability(policy: HFVLAPolicy, train: dict[str, bool]) -> None:
    """requires_grad per part from the freezing switches (``modeling.trainable_parts``)."""
    prefixes = policy.part_prefixes()
    for name, param in policy.named_parameters():
        if param.is_floating_point():  # 4/8-bit bitsandbytes weights never take grads
            param.requires_grad_(train[part_of(name, prefixes)])
    if policy.llm_loss_weight == 0:  # no language loss: the lm head gets no gradient
        for n in policy.part_names["lm_head"]:
            policy.vlm.get_submodule(n).requires_grad_(False)


def freeze_unused_vision(policy: HFVLAPolicy) -> None:
    """Freeze vision/projector weights the image features never use (CLIP's last layer under
    vision_feature_layer = -2, a pooling head), found by one backward pass on blank frames,
    so every trainable parameter gets a gradient (DDP: find_unused_parameters=False)."""
    prefixes = policy.part_prefixes()
    watched = {n: p for n, p in policy.named_parameters() if p.requires_grad
               and part_of(n, prefixes) in ("vit", "projector")}
    if not watched:
        return
    blank = torch.zeros(1, policy.inputs.num_images, 3, 32, 32)
    enc = policy.inputs(["x"], blank)
    base = policy.vlm.base_model
    vision_dtype = next(iter(watched.values())).dtype
    enc = {k: v.to(vision_dtype) if v.is_floating_point() else v for k, v in enc.items()}
    out = base.get_image_features(**_kwargs_for(base.get_image_features, enc))
    pooled = getattr(out, "pooler_output", None)  # what the model merges into its input
    out = out if pooled is None else pooled
    total = sum(t.float().sum() for t in _tensors(out) if t.requires_grad)
    if isinstance(total, torch.Tensor):
        total.backward()
    unused = [n for n, p in watched.items() if p.grad is None]
    for p in watched.values():
        if p.grad is None:
            p.requires_grad_(False)
        p.grad = None
    if unused:
        logging.info("vision tower: %d parameter(s) the image features never use stay frozen (%s)",
                     len(unused), ", ".join(unused[:4]))


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []
