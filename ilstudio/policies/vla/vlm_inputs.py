"""The model's own processor, fed a VLA batch: prompt texts + camera frames -> model inputs.

``load_processor(model)`` loads ``AutoProcessor``; where it cannot be built here (Qwen2-VL's
processor always holds a video processor, which needs torchvision), the family's processor
class (transformers' own processor table) is assembled from ``AutoTokenizer`` and
``AutoImageProcessor`` with no video processor. Either way the family's code makes the
prompt format (its chat template), expands its image tokens and normalizes the pixels.

``ImageTextInputs`` turns frames in [0, 1] into what the processor takes (uint8 HWC):

* fixed-size families (LLaVA/CLIP, PaliGemma/SigLIP, Idefics3 without splitting): frames are
  first fitted to the processor's input size by ``dataset.image_aspect_ratio`` ('pad'
  letterboxes, 'resize'/'square' stretch), so the processor's own resize is a no-op;
* dynamic-resolution families (Qwen2-VL, Qwen2.5-VL: image processors with a
  ``merge_size``): frames keep their size, and ``dataset.image_size`` (H, W) caps the
  processor's pixel budget at H*W, so it bounds the number of image tokens.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from ilstudio.errors import UserError


def _from_kwargs(model) -> dict:
    return {"cache_dir": model.cache_dir} if model.cache_dir else {}


def _assembled_processor(model, model_type: str):
    """The family's processor class from its tokenizer and image processor (no video part)."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name, kw = model.model_name_or_path, _from_kwargs(model)
    tokenizer = AutoTokenizer.from_pretrained(name, **kw)
    image_processor = AutoImageProcessor.from_pretrained(name, **kw)
    cls = getattr(transformers, PROCESSOR_MAPPING_NAMES.get(model_type, ""), None)
    if cls is None:
        raise UserError(f"model.model_name_or_path = {name!r}: no processor class for model "
                        f"type {model_type!r} in transformers")

    class WithoutMissingParts(cls):  # a part that cannot load here (video) is left out
        def check_argument_for_proper_class(self, attribute_name, arg):
            if arg is None:
                return None
            return super().check_argument_for_proper_class(attribute_name, arg)

    accepted = inspect.signature(cls.__init__).parameters
    args = {"image_processor": image_processor, "tokenizer": tokenizer,
            "chat_template": tokenizer.chat_template or _chat_template_file(model)}
    if "video_processor" in accepted:
        args["video_processor"] = None
    return WithoutMissingParts(**args)


def _chat_template_file(model) -> str | None:
    """The checkpoint's processor chat template file (chat_template.jinja, or the older
    chat_template.json), for a tokenizer that does not carry it itself."""
    import json

    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            path = cached_file(model.model_name_or_path, name, _raise_exceptions_for_missing_entries=False,
                               **_from_kwargs(model))
        except OSError:
            path = None
        if path:
            text = open(path, encoding="utf-8").read()
            return text if name.endswith(".jinja") else json.loads(text).get("chat_template")
    return None


def load_processor(model, model_type: str):
    """The checkpoint's processor (see the module docstring)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model.model_name_or_path, **_from_kwargs(model))
    except (ImportError, OSError, ValueError, TypeError, AttributeError):
        try:
            processor = _assembled_processor(model, model_type)
        except (OSError, ValueError) as e:
            raise UserError(f"model.model_name_or_path = {model.model_name_or_path!r}: cannot "
                            f"load its processor ({str(e).splitlines()[0]})") from None
    if getattr(processor, "image_processor", None) is None:
        raise UserError(f"model.model_name_or_path = {model.model_name_or_path!r}: its processor "
                        f"has no image processor (not an image-text-to-text checkpoint?)")
    return processor


def fixed_input_size(image_processor) -> tuple[int, int] | None:
    """(H, W) the image processor resizes every image to; None for dynamic resolution."""
    if hasattr(image_processor, "merge_size"):
        return None
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop and "height" in crop:
        return int(crop["height"]), int(crop["width"])
    size = getattr(image_processor, "size", None) or {}
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    biggest = getattr(image_processor, "max_image_size", None) or {}
    if "longest_edge" in biggest:
        return int(biggest["longest_edge"]), int(biggest["longest_edge"])
    if "shortest_edge" in size:
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    return None


def bound_pixels(image_processor, image_size: tuple[int, ...] | None) -> None:
    """Cap a dynamic-resolution image processor's pixel budget at H*W of dataset.image_size."""
    if image_size is None or fixed_input_size(image_processor) is not None:
        return
    budget = int(image_size[0]) * int(image_size[1])
    size = dict(getattr(image_processor, "size", None) or {})
    if "longest_edge" in size:
        size["longest_edge"] = max(budget, int(size.get("shortest_edge", 0)))
        image_processor.size = size
    if getattr(image_processor, "max_pixels", None) is not None:
        image_processor.max_pixels = max(budget, int(getattr(image_processor, "min_pixels", 0) or 0))


class ImageTextInputs:
    """Prompt strings + (B, N, 3, H, W) frames in [0, 1] -> the processor's tensors."""

    def __init__(self, processor, *, num_images: int, aspect: str) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # the policy's tokens follow the prompt
        self.num_images = num_images
        self.aspect = aspect
        self.size = fixed_input_size(processor.image_processor)
        self.template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template

    def text(self, prompt: str) -> str:
        """The prompt in the family's format: its chat template with one entry per image."""
        if not self.template:
            return prompt  # e.g. PaliGemma: the processor adds image tokens, bos and "\n"
        content = [{"type": "image"}] * self.num_images + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False, chat_template=self.template)

    def frames(self, images: torch.Tensor) -> list[list[np.ndarray]]:
        from ilstudio.data.image_ops import fit_tensor

        b, n = images.shape[:2]
        x = images.reshape(b * n, *images.shape[-3:]).float()
        if self.size is not None:
            x = fit_tensor(x, self.size, self.aspect)
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [list(x[i * n:(i + 1) * n]) for i in range(b)]

    def __call__(self, prompts: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[1] != self.num_images:
            raise ValueError(f"{images.shape[1]} frames per sample; this VLA was built for "
                             f"{self.num_images} (cameras x history)")
        import logging as std_logging

        texts = [self.text(p) for p in prompts]
        # Without a chat template the processor lays out image tokens itself (PaliGemma:
        # images, bos, prompt, "\n") and warns that it did so, on every call: expected here.
        family = next((c.__module__ for c in type(self.processor).__mro__
                       if c.__module__.startswith("transformers.models.")), "transformers")
        quiet = std_logging.getLogger(family)
        level = quiet.level
        if not self.template:
            quiet.setLevel(std_logging.ERROR)
        try:
            out = self.processor(text=texts, images=self.frames(images), padding=True,
                                 return_tensors="pt")
        finally:
            quiet.setLevel(level)
        return dict(out)
