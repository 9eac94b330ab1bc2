"""Write a tiny random VLA backbone directory, offline (no hub, no network).

    python -m ilstudio.policies.vla.make_tiny data/vla_tiny [--hidden 64 --layers 2 ...]
    python -m ilstudio.policies.vla.make_tiny data/qwen2_vl_tiny --family qwen2_vl

With ``--family qwen2_vl|qwen2_5_vl|idefics3|paligemma|llava`` it writes a standard Hugging
Face image-text-to-text checkpoint of that family instead (``tiny_families.py``: what
``AutoModelForImageTextToText`` and the family's processor load); the size flags below
apply to the two-folder kind only.

An explicit step: building a policy never writes a backbone (validation names this
command when ``model.model_name_or_path`` holds none); tests call ``write_tiny_backbone``
from a fixture.

The directory has the layout of ``ilstudio.policies.vla.layout``: ``vision/`` (a small
SigLIP or CLIP vision tower), ``llm/`` (a small Llama or Qwen2 causal LM plus a byte-level
BPE tokenizer trained here on a few robot sentences) and ``projector.safetensors``. Weights
are random but saved, so the same directory serves ``model.is_pretrained=True`` (load these
exact weights) and ``False`` (build from the configs, fresh random weights). Seeded: the same
arguments write the same files.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from absl import logging

from ilstudio.errors import UserError
from ilstudio.policies.vla.layout import LLM, PROJECTOR, VISION, is_backbone_dir
from ilstudio.policies.vla.tiny_families import FAMILIES, write_tiny_vlm
from ilstudio.rundir import atomic_dir

# Sentences the tiny tokenizer learns its merges from; any text still tokenizes (byte-level).
CORPUS = (
    "pick up the cube and transfer it to the other arm",
    "follow the wave with both arms",
    "previous subtask: none. subtask: reach. reasoning: the arm is rising so I reach",
    "subtask: grasp lift place release. reasoning: the arm is falling so I grasp",
    "move the gripper to the left, then to the right, and stop",
)
SPECIAL = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}


def make_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer, trained in memory, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(CORPUS) * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def vision_config(kind: str, hidden: int, layers: int, heads: int, image_size: int, patch: int):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = {"siglip": SiglipVisionConfig, "clip": CLIPVisionConfig}[kind]
    extra = {"vision_use_head": False} if kind == "siglip" else {}  # the VLA reads patch tokens
    return cls(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=heads, image_size=image_size, patch_size=patch, **extra)


def llm_config(kind: str, hidden: int, layers: int, heads: int, vocab_size: int, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    # Untied embeddings: a plain-module checkpoint (safetensors) cannot hold shared tensors.
    return cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
               max_position_embeddings=1024, tie_word_embeddings=False,
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.bos_token_id)


def write_tiny_backbone(output_dir: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                        vision_hidden: int = 32, vision_layers: int = 1, vision_heads: int = 2,
                        image_size: int = 32, patch_size: int = 8, llm: str = "llama",
                        vision: str = "siglip", seed: int = 0, replace: bool = True) -> Path:
    """Write the directory atomically (``rundir.atomic_dir``: a sibling temp dir, then rename).

    replace: an existing backbone directory there is replaced; False keeps it (several
    processes, e.g. torchrun ranks, may race to create the same directory: first one wins,
    and as the output is seeded, all would have written the same files). A directory
    holding anything else is never replaced (FileExistsError).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoModelForCausalLM

    from ilstudio.policies.vla.modeling import MultimodalProjector

    out = Path(output_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not is_backbone_dir(out):
        raise FileExistsError(f"{out} exists and is not a VLA backbone directory; "
                              f"refusing to replace it")
    if not replace and is_backbone_dir(out):
        return out
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty directory is filled, whatever ``replace`` says
    with atomic_dir(out, replace=replace) as tmp:
        with torch.random.fork_rng():  # seeded without disturbing the caller's random state
            torch.manual_seed(seed)
            tokenizer = make_tokenizer()
            vcfg = vision_config(vision, vision_hidden, vision_layers, vision_heads, image_size,
                                 patch_size)
            AutoModel.from_config(vcfg).save_pretrained(tmp / VISION)
            lcfg = llm_config(llm, hidden, layers, heads, len(tokenizer), tokenizer)
            AutoModelForCausalLM.from_config(lcfg).save_pretrained(tmp / LLM)
            tokenizer.save_pretrained(tmp / LLM)
            projector = MultimodalProjector(vision_hidden, hidden, state_dim=None)
            save_file({k: v.contiguous() for k, v in projector.state_dict().items()},
                      tmp / PROJECTOR)
    return out


def ensure_backbone(model) -> str:
    """The backbone's name; with is_pretrained=False and no backbone there, write a tiny one.

    The explicit "create it if missing" step (policy builders never write files): with
    is_pretrained=False the name is always a local directory (a missing one gets a tiny
    random backbone, logged); with is_pretrained=True it is left alone (it may be a hub id,
    looked up through model.cache_dir).
    """
    name = model.model_name_or_path
    if not name:
        raise UserError("policy 'vla' needs model.model_name_or_path")
    if not model.pretrained_backbone and not is_backbone_dir(name):
        path = Path(name).expanduser()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"model.model_name_or_path = {name!r} exists but is not a VLA backbone "
                            f"directory (expected vision/config.json and llm/config.json)")
        logging.warning("model.model_name_or_path = %r does not exist and model.is_pretrained is "
                        "False: writing a tiny random backbone there (python -m "
                        "ilstudio.policies.vla.make_tiny %s)", name, name)
        write_tiny_backbone(path, replace=False)
    return name


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ilstudio.policies.vla.make_tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir")
    p.add_argument("--hidden", type=int, default=64, help="LM hidden size")
    p.add_argument("--layers", type=int, default=2, help="LM layers")
    p.add_argument("--heads", type=int, default=4, help="LM attention heads")
    p.add_argument("--vision_hidden", type=int, default=32)
    p.add_argument("--vision_layers", type=int, default=1)
    p.add_argument("--vision_heads", type=int, default=2)
    p.add_argument("--image_size", type=int, default=32, help="vision tower input (square)")
    p.add_argument("--patch_size", type=int, default=8)
    p.add_argument("--llm", choices=("llama", "qwen2"), default="llama")
    p.add_argument("--vision", choices=("siglip", "clip"), default="siglip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", choices=FAMILIES, default=None,
                   help="write a standard checkpoint of this family (not the two-folder kind)")
    a = p.parse_args(argv)
    if a.family:
        try:
            out = write_tiny_vlm(a.output_dir, a.family, seed=a.seed)
        except FileExistsError as e:
            p.error(str(e))
        print(f"wrote a tiny {a.family} checkpoint to {out.resolve()}")
        return
    if a.hidden % a.heads or a.vision_hidden % a.vision_heads:
        p.error("hidden sizes must be divisible by their head counts")
    if a.image_size % a.patch_size:
        p.error("--image_size must be a multiple of --patch_size")
    try:
        out = write_tiny_backbone(a.output_dir, hidden=a.hidden, layers=a.layers, heads=a.heads,
                                  vision_hidden=a.vision_hidden, vision_layers=a.vision_layers,
                                  vision_heads=a.vision_heads, image_size=a.image_size,
                                  patch_size=a.patch_size, llm=a.llm, vision=a.vision, seed=a.seed)
    except FileExistsError as e:
        p.error(str(e))
    print(f"wrote a tiny {a.vision}+{a.llm} VLA backbone to {out.resolve()}")


if __name__ == "__main__":
    main()
