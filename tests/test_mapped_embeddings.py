"""A 4/8-bit CPU backbone load leaves the token embedding and lm head in the checkpoint file
(ilstudio/models/mapped_embeddings.py): real tiny checkpoints (tied Qwen2-VL, untied
Qwen2.5-VL), real bitsandbytes nf4, compared with the same load that reads them into memory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the mapping applies to CPU loads")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    from ilstudio.policies.vla.tiny_families import write_tiny_vlm

    root = tmp_path_factory.mktemp("mapped")
    return {f: write_tiny_vlm(root / f, f) for f in ("qwen2_vl", "qwen2_5_vl")}


def _load(ckpt: Path, mapped: bool):
    """nf4 as load_backbone loads it (bf16 for the unquantized rest), mapped or read."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ilstudio.config.settings import QuantizationSettings
    from ilstudio.models import bnb_quantization_config, from_pretrained_unmapped
    from ilstudio.policies.vla.backbones import quantization_skip_config

    cfg = AutoConfig.from_pretrained(ckpt)
    quant = quantization_skip_config(cfg, bnb_quantization_config(QuantizationSettings(enable=True, bits=4)))
    return from_pretrained_unmapped(AutoModelForImageTextToText, str(ckpt), cfg, dtype=torch.bfloat16,
                                    quantization_config=quant, map_embeddings=mapped)


def _file_backed(t: torch.Tensor, path: Path) -> bool:
    """Whether ``t``'s memory lies in a mapping of ``path`` (/proc/self/maps)."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= ptr < hi:
            return rest[-1] == str(path.resolve())
    return False


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_backbone_load_maps_embedding_and_head_and_computes_the_same(family, ckpts, tmp_path):
    from ilstudio.config.settings import ModelSettings, QuantizationSettings
    from ilstudio.policies.vla.backbones import load_backbone

    ckpt = Path(shutil.copytree(ckpts[family], tmp_path / family))
    before = (ckpt / "model.safetensors").read_bytes()
    vlm = load_backbone(ModelSettings(policy="vla", model_name_or_path=str(ckpt), is_pretrained=True),
                        QuantizationSettings(enable=True, bits=4)).vlm
    ref = _load(ckpt, mapped=False)
    emb, head = vlm.get_input_embeddings(), vlm.get_output_embeddings()
    file = ckpt / "model.safetensors"
    assert _file_backed(emb.weight, file) and _file_backed(head.weight, file)
    assert (head.weight is emb.weight) == (family == "qwen2_vl")  # tied stays tied, untied stays apart
    assert emb.weight.dtype == torch.float32  # the file's dtype; nothing else changed dtype
    assert {k: v.dtype for k, v in ref.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k} \
        == {k: v.dtype for k, v in vlm.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    ids = torch.tensor([[0, 5, 9, len(emb.weight) - 1]])
    out = emb(ids)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.get_input_embeddings()(ids))
    hidden = torch.randn(1, 3, emb.weight.shape[1], dtype=torch.bfloat16)
    logits, want = head(hidden), ref.get_output_embeddings()(hidden)
    assert logits.dtype == torch.bfloat16 and torch.allclose(logits.float(), want.float(), atol=0.05, rtol=0.02)
    with torch.no_grad():  # a state loaded into it writes its own copy of the page, never the file
        emb.weight[0].fill_(3.0)
    assert (emb.weight[0] == 3.0).all() and file.read_bytes() == before


def test_untying_gives_the_head_its_own_map_not_a_copy(ckpts, tmp_path):
    from safetensors.torch import save_file

    from ilstudio.models.mapped_embeddings import SOURCE
    from ilstudio.policies.vla.parts import untie_embeddings

    vlm = _load(ckpts["qwen2_vl"], mapped=True)
    emb = vlm.get_input_embeddings()
    untie_embeddings(vlm)
    head = vlm.get_output_embeddings()
    assert head.weight is not emb.weight and head.weight.data_ptr() != emb.weight.data_ptr()
    assert getattr(head.weight, SOURCE) is getattr(emb.weight, SOURCE)
    assert _file_backed(head.weight, ckpts["qwen2_vl"] / "model.safetensors")
    assert torch.equal(head.weight, emb.weight)
    save_file({"e": emb.weight.detach(), "h": head.weight.detach()}, str(tmp_path / "x.safetensors"))


def test_unmapped_load_without_the_flag_reads_them(ckpts):
    vlm = _load(ckpts["qwen2_vl"], mapped=False)
    emb = vlm.get_input_embeddings()
    assert emb.weight.dtype == torch.bfloat16
    assert not _file_backed(emb.weight, ckpts["qwen2_vl"] / "model.safetensors")


def test_a_bf16_checkpoint_maps_in_bf16(ckpts, tmp_path):
    """Published checkpoints are bf16: the map is the weight itself, no cast in between."""
    from transformers import AutoModelForImageTextToText

    src = AutoModelForImageTextToText.from_pretrained(ckpts["qwen2_vl"], dtype=torch.bfloat16)
    src.save_pretrained(tmp_path)
    vlm = _load(tmp_path, mapped=True)
    emb = vlm.get_input_embeddings()
    assert emb.weight.dtype == torch.bfloat16 and _file_backed(emb.weight, tmp_path / "model.safetensors")
    assert torch.equal(emb.weight, src.get_input_embeddings().weight)
