"""VLA policy settings and the checks that need no torch (flash_attn, backbone location)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ilstudio.config.declare import configurable, param
from ilstudio.errors import UserError
from ilstudio.policies.base import PolicyConfig
from ilstudio.policies.vla.default_backbone import builtin_pretrained_message, is_builtin
from ilstudio.policies.vla.layout import is_backbone_dir, looks_local, missing_backbone_message


@configurable("vla", group="VLA policy")
class VLAConfig(PolicyConfig):
    name = "vla"
    uses_images = True
    needs_images = True
    needs_language = True
    fits_frames = True  # to the vision tower's square input, by dataset.image_aspect_ratio

    max_prompt_tokens: int = param(32, "Prompt length in tokens (instruction, previous subtask); "
                                   "left-padded, longer prompts are cut.", documented=False,
                                   bounds="[1, inf)")
    max_target_tokens: int = param(48, "Language-target length in tokens (subtask, reasoning); "
                                   "right-padded, longer targets are cut.", documented=False,
                                   bounds="[1, inf)")
    instruction: str = param("", "Instruction for episodes without a `language_instruction` "
                             "attribute (plain ACT data).", documented=False)

    def validate(self, *, task, dataset, model, lora, quantization, source_of) -> None:
        from ilstudio.models.lora import check_lora_settings
        from ilstudio.models.quantization import check_quantization_combo

        super().validate(task=task, dataset=dataset, model=model, lora=lora,
                         quantization=quantization, source_of=source_of)
        check_lora_settings(lora, source_of)
        check_quantization_combo(lora, quantization, source_of)
        problems = []
        name = model.model_name_or_path
        if not name:
            problems.append("policy 'vla' needs model.model_name_or_path (a backbone directory; "
                            "create a tiny one with `python -m ilstudio.policies.vla.make_tiny DIR`)")
        elif model.pretrained_backbone and is_builtin(name):
            problems.append(builtin_pretrained_message(
                f" (set in {source_of('model.model_name_or_path')})"))
        elif model.pretrained_backbone and looks_local(name) and not is_backbone_dir(name):
            problems.append(f"model.model_name_or_path = {name!r} (set in "
                            f"{source_of('model.model_name_or_path')}) with model.is_pretrained = "
                            f"True: no VLA backbone there (expected {Path(name) / 'vision'}/ and "
                            f"{Path(name) / 'llm'}/ with config.json)")
        elif not model.pretrained_backbone and not is_backbone_dir(name):
            problems.append(missing_backbone_message(
                name, f" (set in {source_of('model.model_name_or_path')})"))
        if model.llm_loss_weight == 0:
            # The language target only feeds the language loss: without it these do nothing.
            for key in ("use_reasoning", "select_seg_token_mask"):
                if getattr(dataset, key):
                    problems.append(f"dataset.{key} = True (set in {source_of('dataset.' + key)}) "
                                    f"shapes the language target, which only the language loss "
                                    f"reads: set model.llm_loss_weight > 0 (it is 0)")
        if model.flash_attn:
            why = flash_attn_unavailable()
            if why:
                problems.append(f"model.flash_attn = True (set in {source_of('model.flash_attn')}): "
                                f"FlashAttention-2 cannot run here: {why}. Set model.flash_attn = "
                                f"False (the backbone then uses PyTorch SDPA attention)")
        if problems:
            raise UserError("invalid configuration:\n  " + "\n  ".join(problems))


def flash_attn_unavailable() -> str:
    """Why FlashAttention-2 cannot run on this machine ('' if it can)."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed"
    import torch  # only reached where flash-attn is installed

    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return ""


CONFIG_CLASS = VLAConfig
