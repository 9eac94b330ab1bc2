"""Quantized/cast backbone loads read the checkpoint with pread, not a memory map
(ilstudio/models/unmapped_load.py), and load the same weights as transformers' own load."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from ilstudio.policies.vla.tiny_families import write_tiny_vlm

    return write_tiny_vlm(tmp_path_factory.mktemp("tiny") / "qwen2_vl", "qwen2_vl")


def _nf4():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


def _mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("how", ["nf4", "nf4+bf16", "bf16"])
def test_unmapped_load_equals_from_pretrained_and_keeps_nothing_mapped(ckpt, how, tmp_path):
    """bf16 loads convert while reading (LazyTensor.cast_to), block by block: same weights."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ilstudio.models import from_pretrained_unmapped

    kw = {"quantization_config": _nf4()} if how.startswith("nf4") else {}
    kw |= {"dtype": torch.bfloat16} if how.endswith("bf16") else {}
    ckpt = Path(shutil.copytree(ckpt, tmp_path / "ckpt"))  # a file no earlier load mapped
    cfg = AutoConfig.from_pretrained(ckpt)
    ours = from_pretrained_unmapped(AutoModelForImageTextToText, str(ckpt), cfg, **kw)
    if sys.platform == "linux":  # transformers' own load keeps unquantized tensors as map views
        assert not _mapped(ckpt / "model.safetensors")
    assert getattr(cfg, "quantization_config", None) is None  # the caller's config is untouched
    ref = AutoModelForImageTextToText.from_pretrained(ckpt, **kw)
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])] == []
    if how.startswith("nf4"):
        assert ours.is_loaded_in_4bit and any(v.dtype == torch.uint8 for v in a.values())
    assert ours.generation_config.to_dict() == ref.generation_config.to_dict()


def test_sharded_checkpoint_reads_every_shard(ckpt, tmp_path):
    """A sharded directory (model.safetensors.index.json) loads from all its files."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ilstudio.models import from_pretrained_unmapped
    from ilstudio.models.unmapped_load import safetensors_files

    model = AutoModelForImageTextToText.from_pretrained(ckpt)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    files = safetensors_files(tmp_path)
    assert len(files) > 1 and json.loads((tmp_path / "model.safetensors.index.json").read_text())
    ours = from_pretrained_unmapped(AutoModelForImageTextToText, str(tmp_path),
                                    AutoConfig.from_pretrained(tmp_path), dtype=torch.bfloat16)
    ref = model.to(torch.bfloat16).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in ours.state_dict().items())


def test_cast_on_read_converts_block_by_block(ckpt, monkeypatch):
    """A tensor larger than one block is read in several reads into the narrower dtype."""
    from ilstudio.models import unmapped_load
    from ilstudio.models.unmapped_load import lazy_state_dict, safetensors_files

    state = lazy_state_dict(safetensors_files(ckpt))
    big = max(state.values(), key=lambda t: t.nbytes)
    whole = big.read()
    monkeypatch.setattr(unmapped_load, "CAST_BLOCK", 1000 * big.dtype.itemsize)
    reads = []
    real = unmapped_load.LazyTensor._pread_into
    monkeypatch.setattr(unmapped_load.LazyTensor, "_pread_into",
                        lambda self, out, offset: reads.append(offset) or real(self, out, offset))
    big.cast_to = torch.bfloat16
    got = big.read()
    assert got.dtype == torch.bfloat16 and torch.equal(got, whole.to(torch.bfloat16))
    assert len(reads) == -(-whole.numel() // 1000) > 1
