"""The default VLA backbone, shipped inside the package: ``model.model_name_or_path =
'ilstudio:vla_tiny'`` (gin_configs/vla.gin), so README's card command runs right after install.

Why shipped, not created on first use: with ``model.is_pretrained = False`` (the default) a
backbone directory is only read for its configs and tokenizer (the weights are drawn fresh
from the seed), so the whole backbone is four small text files (about 15 KB). Shipping them
means a run never writes a backbone anywhere: nothing to write before validation, no cache
directory to name, share between two concurrent runs or clean up, and the same files on every
machine (the operative config records the portable name, not a machine's path). The files
are exactly what ``python -m ilstudio.policies.vla.make_tiny DIR`` writes with its defaults,
minus the weights (tests/test_default_backbone.py checks they have not drifted;
``python -m ilstudio.policies.vla.default_backbone`` rewrites them). Weights are not shipped,
so ``model.is_pretrained = True`` on this name is refused at validation time: write a backbone
with ``make_tiny DIR`` for that.

The name and its resolution live in ``layout`` (torch-free, below make_tiny); this module
holds what the shipped files are and how they are written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ilstudio.policies.vla.layout import BUILTIN, HOME, is_builtin, resolve

__all__ = ["BUILTIN", "FILES", "HOME", "builtin_pretrained_message", "is_builtin", "resolve",
           "write_files"]
# What building from configs reads (is_pretrained = False): configs and the tokenizer.
FILES = ("vision/config.json", "llm/config.json", "llm/tokenizer.json", "llm/tokenizer_config.json")


def builtin_pretrained_message(where: str = "") -> str:
    """Why is_pretrained / load_pretrain: true cannot use the shipped backbone."""
    return (f"model.model_name_or_path = {BUILTIN!r}{where} is the built-in tiny backbone: it "
            f"ships configs and a tokenizer only (random weights are drawn from them), so "
            f"model.is_pretrained = True / model.load_pretrain = True have no weights to load. "
            f"Write a backbone with weights (`python -m ilstudio.policies.vla.make_tiny DIR`) "
            f"and point model.model_name_or_path at it, or set model.is_pretrained = False")


def write_files(directory: str | Path) -> Path:
    """Write the shipped files (make_tiny's defaults, without weights) into ``directory``."""
    from ilstudio.policies.vla.make_tiny import write_tiny_backbone

    out = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        src = write_tiny_backbone(Path(tmp) / "b")
        for rel in FILES:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, out / rel)
    return out


def comparable(path: Path) -> dict:
    """A shipped JSON file's content, without the fields that name the writing release."""
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data.pop("transformers_version", None)
    return data


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ilstudio.policies.vla.default_backbone",
                                description="Rewrite the shipped default VLA backbone files "
                                "(for maintainers, after changing make_tiny's defaults).")
    p.add_argument("directory", nargs="?", default=str(HOME))
    a = p.parse_args(argv)
    print(f"wrote {', '.join(FILES)} under {write_files(a.directory)}")


if __name__ == "__main__":
    main()
