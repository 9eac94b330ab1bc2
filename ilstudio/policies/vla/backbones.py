"""Loading a VLA backbone: the one entry point is ``load_backbone(model, quantization)``.

Two kinds (``layout.backbone_kind``):

* ``hf``: a standard Hugging Face image-text-to-text checkpoint (Qwen2-VL, Qwen2.5-VL,
  Idefics3/SmolVLM, PaliGemma, LLaVA, ...): a local directory or a hub id found in
  ``model.cache_dir``. Loaded with ``AutoModelForImageTextToText`` (``from_config`` with
  random weights when ``model.is_pretrained`` is False) and the model's own processor.
* ``two_folder``: ilstudio's ``vision/`` + ``llm/`` assembly (modeling.py builds it).

The parts a policy names (``llm``, ``vit``, ``projector``, lm head) are found through what
transformers exposes, not a table per checkpoint (``discover_parts``): the vision tower is
the base model's child that carries the config's ``vision_config``, the language model the
child that carries its text config, the projector every other child with weights (or, when
there is none, the vision tower's ``merger``, as in Qwen2-VL), the lm head
``get_output_embeddings()``.

Quantization (4/8-bit bitsandbytes) applies to the language model only: the vision tower,
projector and lm head are passed as ``llm_int8_skip_modules``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from absl import logging
from torch import nn

from ilstudio.errors import UserError
from ilstudio.policies.vla.layout import backbone_kind, hf_model_type


@dataclass
class Backbone:
    """A loaded image-text-to-text model and what the policy needs to know about it."""

    vlm: nn.Module
    family: str  # config.model_type, e.g. qwen2_vl
    parts: dict[str, list[str]]  # llm / vit / projector / lm_head -> qualified module names
    quantized: bool


def _from_kwargs(model) -> dict:
    return {"cache_dir": model.cache_dir} if model.cache_dir else {}


def _attn_kwargs(model) -> dict:
    return {"attn_implementation": "flash_attention_2"} if model.flash_attn else {}


def discover_parts(vlm: nn.Module) -> dict[str, list[str]]:
    """Qualified module names of the vision tower, language model, projector and lm head."""
    base = vlm.base_model
    where = {id(m): n for n, m in vlm.named_modules()}
    text_cfg, vision_cfg = vlm.config.get_text_config(), getattr(vlm.config, "vision_config", None)
    found: dict[str, list[str]] = {"llm": [], "vit": [], "projector": []}
    for _, child in base.named_children():
        cfg = getattr(child, "config", None)
        if vision_cfg is not None and type(cfg) is type(vision_cfg):
            found["vit"].append(where[id(child)])
        elif type(cfg) is type(text_cfg) and hasattr(child, "get_input_embeddings"):
            found["llm"].append(where[id(child)])
        elif any(True for _ in child.parameters()):
            found["projector"].append(where[id(child)])
    if len(found["vit"]) != 1 or len(found["llm"]) != 1:
        raise UserError(f"{type(vlm).__name__}: cannot tell its vision tower and language model "
                        f"apart (found vision {found['vit']}, language {found['llm']})")
    if not found["projector"]:  # the connector lives inside the vision tower (Qwen2-VL merger)
        vision = vlm.get_submodule(found["vit"][0])
        merger = getattr(vision, "merger", None)
        if merger is not None:
            found["projector"].append(where[id(merger)])
    head = vlm.get_output_embeddings()
    found["lm_head"] = [where[id(head)]] if head is not None else []
    return found


def quantization_skip_config(vlm_config, quant_config):
    """``quant_config`` with the vision tower, projector and lm head left unquantized."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(vlm_config)
    parts = discover_parts(skeleton)
    quant_config.llm_int8_skip_modules = parts["vit"] + parts["projector"] + parts["lm_head"]
    return quant_config


def _load_config(model):
    from transformers import AutoConfig

    name = model.model_name_or_path
    try:
        return AutoConfig.from_pretrained(name, **_from_kwargs(model))
    except (OSError, ValueError) as e:
        raise UserError(f"model.model_name_or_path = {name!r}: cannot load its config "
                        f"({str(e).splitlines()[0]})") from None


def load_hf_vlm(model, quant_config=None, dtype: torch.dtype | None = None) -> Backbone:
    """The image-text-to-text model of ``model.model_name_or_path`` (see the module docstring)."""
    from transformers import AutoModelForImageTextToText

    name = model.model_name_or_path
    cfg = _load_config(model)
    if quant_config is not None:
        quant_config = quantization_skip_config(cfg, quant_config)
    kw: dict[str, Any] = {**_attn_kwargs(model)}
    if dtype is not None:
        kw["dtype"] = dtype
    try:
        if model.pretrained_backbone and (quant_config is not None or dtype is not None):
            from ilstudio.models import from_pretrained_unmapped  # read without a memory map
            from ilstudio.models.mapped_embeddings import worth_mapping

            vlm = from_pretrained_unmapped(AutoModelForImageTextToText, name, cfg, **_from_kwargs(model),
                                           **kw, quantization_config=quant_config,
                                           map_embeddings=worth_mapping(quant_config))
        elif model.pretrained_backbone:
            vlm = AutoModelForImageTextToText.from_pretrained(name, **_from_kwargs(model), **kw)
        else:
            if quant_config is not None:  # random weights, never all in fp32 at once
                from ilstudio.models import quantized_from_config

                vlm = quantized_from_config(AutoModelForImageTextToText, cfg, quant_config,
                                            **_attn_kwargs(model))
            else:
                vlm = AutoModelForImageTextToText.from_config(cfg, **_attn_kwargs(model))
                vlm = vlm if dtype is None else vlm.to(dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"model.model_name_or_path = {name!r}: cannot load it as an "
                        f"image-text-to-text model ({str(e).splitlines()[0]})") from None
    logging.info("VLA backbone: %s (%s), %s", name, cfg.model_type,
                 "pretrained weights" if model.pretrained_backbone else "random weights")
    return Backbone(vlm, cfg.model_type, discover_parts(vlm), quant_config is not None)


def load_backbone(model, quantization) -> Backbone | None:
    """Load the backbone ``model.model_name_or_path`` names, quantized per ``quantization``.

    Returns None for the two-folder kind (``modeling.build`` assembles it itself). This is
    the stable entry point for benches: it applies 4/8-bit bitsandbytes (language model
    only) or bf16 (``quantization.bits = 16``).
    """
    from ilstudio.models import bnb_quantization_config, keep_portable_4bit_layout, torch_dtype_for

    if backbone_kind(model.model_name_or_path, model.cache_dir) != "hf":
        return None
    quant = bnb_quantization_config(quantization)
    backbone = load_hf_vlm(model, quant, torch_dtype_for(quantization))
    if quant is not None:
        keep_portable_4bit_layout(backbone.vlm)
    return backbone


__all__ = ["Backbone", "discover_parts", "hf_model_type", "load_backbone", "load_hf_vlm"]
