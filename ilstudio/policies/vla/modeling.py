"""VLA policy: a vision tower, a multimodal projector, a causal LM and an action head.

``build`` serves both backbone kinds (``layout.backbone_kind``): a standard Hugging Face
image-text-to-text checkpoint goes to ``vlm_build.build_hf`` (the model's own processor and
modules, see vlm_policy.py); the two-folder kind (``vision/`` + ``llm/``) is assembled here,
as described below.

Sequence the LM reads (one row per sample; P, T fixed by vla.max_prompt_tokens/max_target_tokens)::

    [prompt (P, left-padded)] [image tokens] [state token] [keypoint tokens] [K action queries]
    [target (T)]

* image tokens: every camera, every history frame (dataset.history_images_length), oldest
  first, fitted to the vision tower's square input by dataset.image_aspect_ratio ('pad':
  letterbox, 'resize': stretch): the tower's patch tokens through the projector's image MLP
  (the "mm MLP adapter": Linear(vision hidden, LM hidden), GELU, Linear(LM hidden, LM hidden)).
* state token: the normalized qpos through the projector's linear ``state`` embedding.
* keypoint tokens (only with vla.keypoint_encoder > 0): one per camera and frame, from
  TinyACT's conv + spatial-softmax encoder (ilstudio/policies/keypoints.py) trained from
  scratch, standardized (ActNorm) and mapped by an MLP to the LM's hidden size. A random ViT
  has no prior that finds a ~2-pixel cube; a spatial softmax over a colour map does. With
  vla.keypoints_to_head the head also adds a linear map of those features to every query.
* action queries: K = model.chunk_size learned vectors (part of the action head); the LM's
  last hidden state at query k goes through the head's MLP to action k of the chunk.
* target: the language target (subtask/reasoning, see ilstudio/data/language.py), after
  the queries. Causal attention means the actions never depend on the target text, so
  ``select_action`` needs no text generation; the target only adds the language loss
  (teacher-forced next-token cross-entropy), and is skipped when model.llm_loss_weight = 0.

loss = masked L1(action chunk) + model.llm_loss_weight * LM loss.

Parts (``VLAPolicy.parts()``, what LoRA's ``lora.module`` names): ``llm``, ``vit``,
``projector`` (image MLP + state embedding + the keypoint encoder and its token MLP: trained
from scratch, so it trains under every switch below; lora.module = 'projector' puts adapters
on its token MLP, whose base weights then freeze, and its convolutions keep training),
``action_head`` (queries + MLP, + the keypoint map of
vla.keypoints_to_head). Trainable parts:

    default               everything
    freeze_vision_tower   vit frozen
    freeze_backbone       vit and llm frozen (projector, action head and LoRA adapters train)
    tune_mm_mlp_adapter   only the projector and the action head train: an untrained random
                          head would make the policy useless, so "only the projector" is read
                          as "only the projector, plus the head that turns the LM into actions"

Parameters the forward never uses (the LM's output layer when llm_loss_weight = 0, a vision
pooling head) are frozen at build time, so every trainable parameter gets a gradient (DDP).
"""

from __future__ import annotations

from pathlib import Path

import torch
from absl import logging
from torch import nn

from ilstudio.errors import UserError
from ilstudio.policies.losses import vla_losses
from ilstudio.policies.vla.layout import (
    LLM,
    PROJECTOR,
    VISION,
    backbone_kind,
    hub_id_missing_message,
    looks_local,
    missing_backbone_message,
    resolve,
)
from ilstudio.policies.vla.parts import (
    KeypointProjector,
    drop_state,
    head_actions,
    keypoint_encoder_trains,
    keypoint_inputs,
    trainable_parts,
    untie_embeddings,
)

# Pixel normalization per vision model type (their image processors' defaults).
_CLIP_MEAN, _CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)
_PIXEL_STATS = {"clip_vision_model": (_CLIP_MEAN, _CLIP_STD)}


class MultimodalProjector(nn.Module):
    """Vision hidden -> LM hidden (2-layer MLP), qpos -> one LM token (linear), and with
    vla.keypoint_encoder, each image -> one keypoint token (KeypointProjector)."""

    def __init__(self, vision_hidden: int, llm_hidden: int, state_dim: int | None,
                 keypoints: int = 0) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(vision_hidden, llm_hidden), nn.GELU(),
                                   nn.Linear(llm_hidden, llm_hidden))
        self.state = nn.Linear(state_dim, llm_hidden) if state_dim else None
        self.keypoints = KeypointProjector(keypoints, llm_hidden) if keypoints else None


class ActionHead(nn.Module):
    """K learned query tokens appended to the LM input, and an MLP on their hidden states.

    keypoint_features (vla.keypoints_to_head): the width of every image's keypoint features
    together; a linear map of them is added to each query's hidden state before the MLP."""

    def __init__(self, hidden: int, chunk_size: int, action_dim: int,
                 keypoint_features: int = 0) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(chunk_size, hidden) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, action_dim))
        self.keypoints = nn.Linear(keypoint_features, hidden) if keypoint_features else None


class VLAPolicy(nn.Module):
    def __init__(self, vit: nn.Module, llm: nn.Module, projector: MultimodalProjector,
                 action_head: ActionHead, *, prompt_len: int, num_cameras: int, history: int,
                 llm_loss_weight: float, aspect: str = "pad", state_dropout: float = 0.0) -> None:
        super().__init__()
        self.vit, self.llm, self.projector, self.action_head = vit, llm, projector, action_head
        self.prompt_len = prompt_len
        self.num_cameras, self.history = num_cameras, history
        self.llm_loss_weight = float(llm_loss_weight)
        self.aspect = aspect  # dataset.image_aspect_ratio: how frames become the tower's square
        self.state_dropout = float(state_dropout)  # vla.state_dropout (training only)
        self.lora_lr: float | None = None  # lora.lr when LoRA adapters were injected
        self.prompt: tuple[torch.Tensor, torch.Tensor] | None = None  # see set_prompt
        vcfg = vit.config
        self.image_size = int(vcfg.image_size)
        mean, std = _PIXEL_STATS.get(vcfg.model_type, ((0.5,) * 3, (0.5,) * 3))
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def parts(self) -> dict[str, nn.Module]:
        """The named parts (what lora.module and the freezing switches refer to)."""
        return {"llm": self.llm, "vit": self.vit, "projector": self.projector,
                "action_head": self.action_head}

    def optimizer_param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """With LoRA: LoRA parameters at lora.lr, the rest at lr; else [] (Trainer default)."""
        from ilstudio.models import has_lora, lora_param_groups

        if not has_lora(self):
            return []
        return lora_param_groups(self, lr, self.lora_lr, weight_decay)

    def set_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """The prompt select_action uses when called without one (e.g. by an evaluator that
        passes only qpos and images): (P,) tensors from LanguageProcessor.encode_prompt."""
        self.prompt = (input_ids, attention_mask)

    # -- activation checkpointing: delegated to the Hugging Face parts -----------------

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        for part in (self.llm, self.vit):
            if getattr(part, "supports_gradient_checkpointing", False):
                part.activation_checkpointing_enable(activation_checkpointing_kwargs,
                                                     every_n_layers=every_n_layers, offload=offload)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    # -- inputs ------------------------------------------------------------------------

    def fit_square(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 3, S, S), S the tower's image_size: letterboxed (black bands)
        for image_aspect_ratio 'pad', stretched for 'resize' (``image_ops.fit_tensor``)."""
        from ilstudio.data.image_ops import fit_tensor

        return fit_tensor(x, (self.image_size, self.image_size), self.aspect)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, cams[, history], 3, H, W) in [0, 1] -> (B, cams*history*patches, LM hidden)."""
        if images.dim() == 5:
            images = images[:, :, None]
        b, cams, hist = images.shape[:3]
        if (cams, hist) != (self.num_cameras, self.history):
            raise ValueError(f"images have {cams} camera(s) x {hist} frame(s); this VLA was built "
                             f"for {self.num_cameras} x {self.history}")
        x = self.fit_square(images.reshape(-1, *images.shape[-3:]).float())
        x = (x - self.pixel_mean) / self.pixel_std
        vit_dtype = next(self.vit.parameters()).dtype
        tokens = self.vit(pixel_values=x.to(vit_dtype)).last_hidden_state
        tokens = self.projector.image(tokens.to(self.projector.image[0].weight.dtype))
        return tokens.reshape(b, -1, tokens.shape[-1])

    def _sequence(self, qpos, images, input_ids, attention_mask, with_target: bool):
        p = self.prompt_len
        if input_ids is None or input_ids.shape[1] < p:
            raise ValueError(f"input_ids must hold at least the {p} prompt tokens")
        if not with_target:
            input_ids, attention_mask = input_ids[:, :p], attention_mask[:, :p]
        text = self.llm.get_input_embeddings()(input_ids)
        dtype = text.dtype
        b = text.shape[0]
        img = self.encode_images(images).to(dtype)
        state = self.projector.state(qpos.to(self.projector.state.weight.dtype))[:, None].to(dtype)
        state = drop_state(state, self.state_dropout, self.training)
        keypoints, kp_tokens = keypoint_inputs(self.projector.keypoints, images, text.shape[-1])
        kp_tokens = kp_tokens.to(dtype)
        queries = self.action_head.queries[None].expand(b, -1, -1).to(dtype)
        middle = torch.cat([img, state, kp_tokens, queries], 1)
        embeds = torch.cat([text[:, :p], middle, text[:, p:]], 1)
        mask = torch.cat([attention_mask[:, :p], attention_mask.new_ones(b, middle.shape[1]),
                          attention_mask[:, p:]], 1)
        return embeds, mask, p + img.shape[1] + 1 + kp_tokens.shape[1], keypoints

    def _hidden(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask,
                                     position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def _actions(self, hidden: torch.Tensor, query_start: int,
                 keypoints: torch.Tensor | None = None) -> torch.Tensor:
        return head_actions(self.action_head, hidden, query_start, keypoints)

    # -- training and inference ----------------------------------------------------------

    def forward(self, qpos: torch.Tensor, images: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, action: torch.Tensor | None = None,
                is_pad: torch.Tensor | None = None) -> dict:
        with_lm = self.llm_loss_weight > 0 and labels is not None
        embeds, mask, qs, keypoints = self._sequence(qpos, images, input_ids, attention_mask,
                                                     with_lm)
        hidden = self._hidden(embeds, mask)
        pred = self._actions(hidden, qs, keypoints)
        if action is None:
            return {"actions": pred}
        return vla_losses(pred, action, is_pad, hidden, labels, queries_start=qs,
                          num_queries=self.action_head.queries.shape[0],
                          prompt_len=self.prompt_len, lm_head=self.llm.get_output_embeddings(),
                          llm_loss_weight=self.llm_loss_weight)

    @torch.no_grad()
    def select_action(self, qpos: torch.Tensor, images: torch.Tensor,
                      input_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A normalized action chunk (B, chunk_size, action_dim); needs the prompt tokens only
        (given here, or set once with set_prompt)."""
        if input_ids is None:
            if self.prompt is None:
                raise ValueError("select_action needs the prompt tokens: pass input_ids and "
                                 "attention_mask, or call set_prompt first")
            b = qpos.shape[0]
            input_ids, attention_mask = (x.to(qpos.device).reshape(1, -1).expand(b, -1)
                                         for x in self.prompt)
        embeds, mask, qs, keypoints = self._sequence(qpos, images, input_ids, attention_mask,
                                                     False)
        return self._actions(self._hidden(embeds, mask), qs, keypoints)


# -- building --------------------------------------------------------------------------


def backbone_name(model) -> str:
    """Where to load the backbone from (a directory, or a hub id when is_pretrained; the
    shipped default resolved to its directory); never writes one.

    A missing local backbone is a UserError naming the explicit step that creates a tiny
    one (``python -m ilstudio.policies.vla.make_tiny DIR``).
    """
    name = model.model_name_or_path
    if not name:
        raise UserError("policy 'vla' needs model.model_name_or_path")
    if not backbone_kind(name, model.cache_dir) and (not model.pretrained_backbone
                                                     or looks_local(name)):
        raise UserError(missing_backbone_message(name))
    if not backbone_kind(name, model.cache_dir):
        raise UserError(hub_id_missing_message(name, model.cache_dir))
    return resolve(name)


def _from_kwargs(model) -> dict:
    return {"cache_dir": model.cache_dir} if model.cache_dir else {}


def load_tokenizer(model):
    from transformers import AutoTokenizer

    name = backbone_name(model)
    hf = backbone_kind(name, model.cache_dir) == "hf"  # a standard checkpoint: tokenizer at its root
    try:
        return AutoTokenizer.from_pretrained(name, **({} if hf else {"subfolder": LLM}),
                                             **_from_kwargs(model))
    except OSError as e:
        raise UserError(f"model.model_name_or_path = {name!r}: cannot load the tokenizer from "
                        f"{LLM}/ ({e})") from None


def build_processor(*, policy_config, dataset, model, **_):
    """The dataset's language processor (tokenizer from the backbone's llm/ folder)."""
    from ilstudio.data.language import LanguageProcessor

    return LanguageProcessor(load_tokenizer(model), dataset, policy_config.max_prompt_tokens,
                             policy_config.max_target_tokens, policy_config.instruction,
                             needs_target=model.llm_loss_weight > 0)


def _attn_kwargs(model) -> dict:
    return {"attn_implementation": "flash_attention_2"} if model.flash_attn else {}


def load_vision(model, image_size: int = 0) -> nn.Module:
    """The vision tower; image_size (vla.image_size, random weights only): build it for that
    square input instead of its config's."""
    from transformers import AutoConfig, AutoModel

    name, kw = backbone_name(model), _from_kwargs(model)
    try:
        if model.pretrained_backbone:
            return AutoModel.from_pretrained(name, subfolder=VISION, **kw, **_attn_kwargs(model))
        cfg = AutoConfig.from_pretrained(name, subfolder=VISION, **kw)
        if image_size:
            cfg.image_size = image_size
        return AutoModel.from_config(cfg, **_attn_kwargs(model))
    except OSError as e:
        raise UserError(f"model.model_name_or_path = {name!r}: cannot load the vision tower from "
                        f"{VISION}/ ({e})") from None


def load_llm(model, quantization_config=None, dtype=None) -> nn.Module:
    """The causal LM; quantized loads go through from_pretrained (random weights saved first,
    see ``quantization.quantized_from_config``).

    dtype: load in this dtype (bf16 for quantization.bits = 16), None for the default.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    name, kw = backbone_name(model), _from_kwargs(model)
    if dtype is not None:
        kw["dtype"] = dtype
    try:
        cfg = AutoConfig.from_pretrained(name, subfolder=LLM, **_from_kwargs(model))
        if model.pretrained_backbone and (quantization_config is not None or dtype is not None):
            from ilstudio.models import from_pretrained_unmapped  # read without a memory map
            from ilstudio.models.mapped_embeddings import worth_mapping

            return from_pretrained_unmapped(AutoModelForCausalLM, name, cfg, subfolder=LLM, **kw,
                                            **_attn_kwargs(model), quantization_config=quantization_config,
                                            map_embeddings=worth_mapping(quantization_config))
        if model.pretrained_backbone:
            return AutoModelForCausalLM.from_pretrained(name, subfolder=LLM, **kw, **_attn_kwargs(model))
        if quantization_config is not None:  # random weights, never all in fp32 at once
            from ilstudio.models import quantized_from_config

            return quantized_from_config(AutoModelForCausalLM, cfg, quantization_config,
                                         **_attn_kwargs(model))
        llm = AutoModelForCausalLM.from_config(cfg, **_attn_kwargs(model))
        return llm if dtype is None else llm.to(dtype)
    except OSError as e:
        raise UserError(f"model.model_name_or_path = {name!r}: cannot load the language model "
                        f"from {LLM}/ ({e})") from None


def _load_projector(projector: MultimodalProjector, model) -> None:
    """Initial image-MLP weights from projector.safetensors when loading pretrained parts."""
    path = Path(model.model_name_or_path).expanduser() / PROJECTOR
    if not (model.pretrained_backbone and path.is_file()):
        return
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(str(path)).items() if k.startswith("image.")}
    try:
        projector.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UserError(f"{path}: does not fit this backbone's projector ({e})") from None


def _freeze_unused(policy: VLAPolicy) -> None:
    """Stop training parameters the forward never uses, so no trainable parameter goes without
    a gradient (DDP runs with find_unused_parameters=False): the LM's output layer when there
    is no language loss, and vision-tower layers outside the patch tokens (a pooling head,
    CLIP's post-layernorm), found by one backward pass on a blank image."""
    if policy.llm_loss_weight == 0:
        policy.llm.get_output_embeddings().requires_grad_(False)
    trainable = [p for p in policy.vit.parameters() if p.requires_grad]
    if not trainable:
        return
    size = policy.image_size
    blank = torch.zeros(1, 3, size, size, dtype=trainable[0].dtype)
    policy.vit(pixel_values=blank).last_hidden_state.float().sum().backward()
    unused = [n for n, p in policy.vit.named_parameters() if p.requires_grad and p.grad is None]
    for p in policy.vit.parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
        p.grad = None
    if unused:
        logging.info("vision tower: %d parameter(s) outside the patch tokens stay frozen (%s)",
                     len(unused), ", ".join(unused[:4]))


def _assemble(vit: nn.Module, llm: nn.Module, *, policy_config, task, dataset, model) -> VLAPolicy:
    """The policy around a loaded tower and LM: projector (with the keypoint token when
    vla.keypoint_encoder > 0) and action head sized from the task."""
    hidden = llm.get_input_embeddings().embedding_dim
    projector = MultimodalProjector(vit.config.hidden_size, hidden, task.state_dim,
                                    policy_config.keypoint_encoder)
    _load_projector(projector, model)
    num_images = len(task.camera_names) * dataset.history_images_length
    head = ActionHead(hidden, model.chunk_size, task.action_dim,
                      num_images * projector.keypoints.out_dim
                      if policy_config.keypoints_to_head else 0)
    return VLAPolicy(vit, llm, projector, head, prompt_len=policy_config.max_prompt_tokens,
                     num_cameras=len(task.camera_names), history=dataset.history_images_length,
                     llm_loss_weight=model.llm_loss_weight, aspect=dataset.image_aspect_ratio,
                     state_dropout=policy_config.state_dropout)


def build(*, policy_config, task, dataset, model, lora, quantization, use_images: bool,
          **_) -> VLAPolicy:
    if not use_images:
        raise UserError("policy 'vla' needs camera images (task.camera_names and "
                        "dataset.is_multimodal)")
    backbone_name(model)
    from ilstudio.policies.vla.backbones import load_backbone

    backbone = load_backbone(model, quantization)
    if backbone is not None:  # a standard image-text-to-text checkpoint
        from ilstudio.policies.vla.vlm_build import build_hf

        return build_hf(backbone, policy_config=policy_config, task=task, dataset=dataset,
                        model=model, lora=lora)
    from ilstudio.models import (
        apply_lora,
        bnb_quantization_config,
        keep_portable_4bit_layout,
        lora_target_modules,
        torch_dtype_for,
    )

    quant_config = bnb_quantization_config(quantization)  # None unless 4/8-bit
    vit = load_vision(model, policy_config.image_size)
    llm = load_llm(model, quant_config, torch_dtype_for(quantization))
    if quant_config is not None:
        keep_portable_4bit_layout(llm)
    untie_embeddings(llm)
    tokenizer_vocab = len(load_tokenizer(model))
    if tokenizer_vocab > llm.get_input_embeddings().num_embeddings:
        raise UserError(f"model.model_name_or_path = {model.model_name_or_path!r}: the tokenizer "
                        f"has {tokenizer_vocab} tokens but the LM embeds only "
                        f"{llm.get_input_embeddings().num_embeddings}")
    policy = _assemble(vit, llm, policy_config=policy_config, task=task, dataset=dataset,
                       model=model)
    train = trainable_parts(model)
    for part, module in policy.parts().items():
        for param in module.parameters():
            if param.is_floating_point():  # 4/8-bit bitsandbytes weights never take grads
                param.requires_grad_(train[part])
    _freeze_unused(policy)
    if policy_config.instruction:  # evaluation without per-call prompts uses vla.instruction
        from ilstudio.data.language import EpisodeText

        proc = build_processor(policy_config=policy_config, dataset=dataset, model=model)
        prompt = proc.encode_prompt(proc.prompt_text(EpisodeText(policy_config.instruction), 0))
        policy.set_prompt(prompt["input_ids"], prompt["attention_mask"])
    if lora.enable:  # LoRA (QLoRA on a 4/8-bit LM) on the parts named by lora.module
        targets = lora_target_modules(policy.parts(), lora.module, root=policy)
        policy = apply_lora(policy, lora, targets, quantized=quant_config is not None,
                            parts=policy.parts())
        policy.lora_lr = lora.lr
        keypoint_encoder_trains(policy.projector.keypoints)
    return policy

