"""VLA policy settings and the checks that need no torch (flash_attn, backbone location)."""

from __future__ import annotations

import importlib.util

from ilstudio.config.declare import configurable, param
from ilstudio.errors import UserError
from ilstudio.policies.base import PolicyConfig, dropout_param
from ilstudio.policies.vla.default_backbone import builtin_pretrained_message, is_builtin
from ilstudio.policies.vla.layout import (
    backbone_family,
    hub_id_missing_message,
    looks_local,
    missing_backbone_message,
)


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
                             "attribute (plain ACT data), and the prompt of simulated rollouts; "
                             "empty on a simulated task: the instruction its recorded "
                             "demonstrations carry.", documented=False)
    state_dropout: float = dropout_param(
        0.0, "Training only: probability that a sample's state token is zeroed, so the image "
        "has to explain the action chunk (on scripted demonstrations the state alone explains "
        "most of it, and a policy that always sees it learns to ignore the image). 0 feeds the "
        "state always; evaluation always feeds it.")
    image_size: int = param(0, "Side of the vision tower's square input, in pixels, for a "
                            "two-folder backbone built with random weights (model.is_pretrained "
                            "= False): the tower is built at this size (more patch tokens, same "
                            "patch size). 0: the tower's own vision/config.json image_size. A "
                            "multiple of the patch size.", documented=False, bounds="[0, inf)")
    keypoint_encoder: int = param(
        0, "Keypoints of an optional image encoder trained from scratch beside the vision tower "
        "(TinyACT's: a small conv net + spatial softmax, with saturation and red/green/blue "
        "keypoints; ilstudio/policies/keypoints.py), whose standardized features become one LM "
        "token per image after the state token (the 'keypoint token'; part of the projector on "
        "a two-folder backbone, of the action head on a standard checkpoint, whose projector is "
        "the model's own: it trains under every freezing switch). A random vision tower has no "
        "prior that finds a small object; a spatial softmax over a colour map does. 0: off.",
        documented=False, bounds="[0, inf)")
    keypoints_to_head: bool = param(
        False, "Also add the keypoint features (vla.keypoint_encoder), linearly projected, to "
        "every action query's hidden state before the action head's MLP: a path to the actions "
        "that does not go through the language model.", documented=False)
    backbone_family: str = param(
        "auto", "The backbone's kind and family: 'two_folder' (vision/ + llm/) or a standard "
        "checkpoint's model_type (qwen2_vl, qwen2_5_vl, idefics3, smolvlm, paligemma, llava, "
        "...). 'auto' reads it from model.model_name_or_path, and the run records what it "
        "found here, so resuming on another family is refused; a set value must match.",
        documented=False)

    def _backbone_problems(self, model, source_of) -> list[str]:
        """Where model.model_name_or_path points, and the family it holds (recorded)."""
        name = model.model_name_or_path
        where = f" (set in {source_of('model.model_name_or_path')})"
        if not name:
            return ["policy 'vla' needs model.model_name_or_path (a Hugging Face "
                    "image-text-to-text checkpoint, or a two-folder backbone; create a tiny one "
                    "with `python -m ilstudio.policies.vla.make_tiny DIR [--family F]`)"]
        if model.pretrained_backbone and is_builtin(name):
            return [builtin_pretrained_message(where)]
        family = backbone_family(name, model.cache_dir)
        if not family:
            if looks_local(name) or not model.pretrained_backbone:
                return [missing_backbone_message(name, where)]
            return [hub_id_missing_message(name, model.cache_dir, where)]
        if self.backbone_family == "auto":
            self._record_family(family)
        elif self.backbone_family != family:
            return [f"vla.backbone_family = {self.backbone_family!r} (set in "
                    f"{source_of('vla.backbone_family')}), but model.model_name_or_path = "
                    f"{name!r} holds a {family!r} backbone"]
        return []

    def _record_family(self, family: str) -> None:
        """Bind the family found, and rebuild once so the operative config records it."""
        import gin

        try:
            gin.bind_parameter("vla.backbone_family", family)
        except (RuntimeError, ValueError):  # a locked config (a run rebuilt after training)
            return
        type(self)()
        object.__setattr__(self, "backbone_family", family)  # a frozen dataclass

    def _image_size_problems(self, model, source_of) -> list[str]:
        """vla.image_size: only where the tower is drawn fresh from a two-folder config."""
        if not self.image_size:
            return []
        where = f"vla.image_size = {self.image_size} (set in {source_of('vla.image_size')})"
        name = model.model_name_or_path
        if model.pretrained_backbone:
            return [f"{where} needs model.is_pretrained = False: pretrained position embeddings "
                    f"are sized for the checkpoint's own input"]
        if backbone_family(name, model.cache_dir) != "two_folder":
            return [f"{where} applies to a two-folder backbone (vision/ + llm/); a standard "
                    f"checkpoint's processor sets its own input size (dataset.image_size caps it)"]
        patch = _vision_patch_size(name)
        if patch and self.image_size % patch:
            return [f"{where} is not a multiple of the vision tower's patch size ({patch})"]
        return []

    def _keypoint_problems(self, source_of) -> list[str]:
        """vla.keypoints_to_head feeds the keypoint encoder's features: it needs one."""
        if self.keypoints_to_head and not self.keypoint_encoder:
            return [f"vla.keypoints_to_head = True (set in {source_of('vla.keypoints_to_head')}) "
                    f"needs the keypoint encoder: set vla.keypoint_encoder > 0 (it is 0)"]
        return []

    def validate(self, *, task, dataset, model, lora, quantization, source_of) -> None:
        from ilstudio.models.lora import check_lora_settings
        from ilstudio.models.quantization import check_quantization_combo

        super().validate(task=task, dataset=dataset, model=model, lora=lora,
                         quantization=quantization, source_of=source_of)
        check_lora_settings(lora, source_of)
        check_quantization_combo(lora, quantization, source_of)
        problems = []
        problems += self._backbone_problems(model, source_of)
        problems += self._image_size_problems(model, source_of)
        problems += self._keypoint_problems(source_of)
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


def _vision_patch_size(name: str) -> int:
    """The two-folder backbone's vision patch size (0 if its config cannot be read)."""
    import json
    from pathlib import Path

    from ilstudio.policies.vla.layout import VISION, resolve

    try:
        return int(json.loads((Path(resolve(name)) / VISION / "config.json").read_text())
                   .get("patch_size", 0))
    except (OSError, ValueError, TypeError):
        return 0


def flash_attn_unavailable() -> str:
    """Why FlashAttention-2 cannot run on this machine ('' if it can)."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed"
    import torch  # only reached where flash-attn is installed

    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return ""


CONFIG_CLASS = VLAConfig
