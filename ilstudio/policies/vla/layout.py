"""Where the VLA's Hugging Face parts live inside ``model.model_name_or_path``.

A VLA backbone directory (or hub repository) holds::

    vision/                  a vision tower: config.json (+ model.safetensors when pretrained),
                             any AutoModel vision config (SiglipVisionModel, CLIPVisionModel, ...)
    llm/                     a causal LM: config.json (+ weights) and its tokenizer files
                             (tokenizer.json, tokenizer_config.json), loaded with
                             AutoModelForCausalLM / AutoTokenizer
    projector.safetensors    optional: initial weights of the multimodal projector
                             (keys ``image.0.weight`` ... ``state.weight``, see modeling.py)

Kept torch-free so validation can reason about paths without importing torch.
"""

from __future__ import annotations

from pathlib import Path

VISION = "vision"
LLM = "llm"
PROJECTOR = "projector.safetensors"


def looks_local(name: str) -> bool:
    """A name the user meant as a filesystem path (not a hub id)."""
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def is_backbone_dir(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return (p / VISION / "config.json").is_file() and (p / LLM / "config.json").is_file()
