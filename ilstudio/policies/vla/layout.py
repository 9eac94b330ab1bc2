"""Where the VLA's Hugging Face parts live inside ``model.model_name_or_path``: the two-folder
kind (below), or a standard image-text-to-text checkpoint (``backbone_kind`` tells them apart).

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
    return (f"model.model_name_or_path = {name!r}{where}: no VLA backbone there (expected a "
            f"Hugging Face image-text-to-text checkpoint with config.json, or "
            f"{Path(name) / VISION}/ and {Path(name) / LLM}/ with config.json). Create a tiny "
            f"random one with `python -m ilstudio.policies.vla.make_tiny {name}` (add "
            f"--family qwen2_vl|qwen2_5_vl|idefics3|paligemma|llava for a standard checkpoint), "
            f"or point it at a checkpoint directory")


def hub_id_missing_message(name: str, cache_dir: str | None, where: str = "") -> str:
    """A hub id that is not in the local Hugging Face cache (nothing is downloaded here)."""
    return (f"model.model_name_or_path = {name!r}{where}: not a local directory, and no "
            f"config.json of that hub repository in the Hugging Face cache "
            f"(model.cache_dir = {cache_dir!r}); this machine has no network: download it "
            f"where one exists (e.g. `huggingface-cli download {name}`) and point "
            f"model.cache_dir at that cache, or model.model_name_or_path at its directory")


def is_backbone_dir(path: str | Path) -> bool:
    p = Path(resolve(str(path))).expanduser()
    return (p / VISION / "config.json").is_file() and (p / LLM / "config.json").is_file()


def _cached(name: str, file: str, cache_dir: str | None) -> Path | None:
    """``file`` of hub repository ``name`` in the Hugging Face cache (never the network)."""
    from huggingface_hub import try_to_load_from_cache  # cheap

    try:
        found = try_to_load_from_cache(name, file, cache_dir=cache_dir)
    except ValueError:  # not a valid repository id
        return None
    return Path(found) if isinstance(found, str) else None


def _config_file(name: str, cache_dir: str | None) -> Path | None:
    """config.json of a local checkpoint directory, or of a hub id found in the cache."""
    p = Path(name).expanduser()
    if looks_local(name):
        return p / "config.json" if (p / "config.json").is_file() else None
    return _cached(name, "config.json", cache_dir)


def backbone_kind(name: str, cache_dir: str | None = None) -> str:
    """'two_folder' (vision/ + llm/), 'hf' (an image-text-to-text checkpoint: a directory
    with config.json, or a cached hub id) or '' (nothing usable there)."""
    if is_backbone_dir(name) or (not looks_local(name) and all(
            _cached(name, f"{sub}/config.json", cache_dir) for sub in (VISION, LLM))):
        return "two_folder"
    return "hf" if _config_file(name, cache_dir) is not None else ""


def hf_model_type(name: str, cache_dir: str | None = None) -> str:
    """The checkpoint's config.json model_type ('' when unreadable); reads JSON, no torch."""
    import json

    path = _config_file(name, cache_dir)
    if path is None:
        return ""
    try:
        return str(json.loads(path.read_text()).get("model_type", ""))
    except (OSError, ValueError):
        return ""


def backbone_family(name: str, cache_dir: str | None = None) -> str:
    """What a run records: 'two_folder', or the checkpoint's model_type ('' when unknown)."""
    kind = backbone_kind(name, cache_dir)
    return "two_folder" if kind == "two_folder" else hf_model_type(name, cache_dir)
