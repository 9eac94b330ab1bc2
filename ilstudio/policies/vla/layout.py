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
# The default backbone, shipped inside the package (see default_backbone.py for why).
BUILTIN = "ilstudio:vla_tiny"
HOME = Path(__file__).resolve().parent / "vla_tiny"


def is_builtin(name: str) -> bool:
    return name == BUILTIN


def resolve(name: str) -> str:
    """The directory (or hub id) to load ``model.model_name_or_path = name`` from: the
    shipped default's directory for ``BUILTIN``, any other name unchanged."""
    return str(HOME) if is_builtin(name) else name


def looks_local(name: str) -> bool:
    """A name the user meant as a filesystem path (not a hub id); the shipped backbone's name
    (``default_backbone.BUILTIN``) counts as one."""
    return is_builtin(name) or name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def missing_backbone_message(name: str, where: str = "") -> str:
    """What to do when model.model_name_or_path (is_pretrained=False) holds no backbone;
    ``where``: where it was set, e.g. " (set in vla.gin)"."""
    return (f"model.model_name_or_path = {name!r}{where} with model.is_pretrained = False: no VLA "
            f"backbone there (expected {Path(name) / VISION}/ and {Path(name) / LLM}/ with "
            f"config.json). Create a tiny random one with `python -m "
            f"ilstudio.policies.vla.make_tiny {name}`, or point it at a backbone directory")


def is_backbone_dir(path: str | Path) -> bool:
    p = Path(resolve(str(path))).expanduser()
    return (p / VISION / "config.json").is_file() and (p / LLM / "config.json").is_file()
