"""The token embedding and lm head of a 4/8-bit CPU load stay in the checkpoint file.

Under QLoRA both are frozen, and bitsandbytes leaves them unquantized. The embedding is
only gathered from (a step reads the rows of the tokens in its batch) and the lm head is
used only by the language loss (``llm_loss_weight``). Yet a load reads them whole: a
Qwen2-0.5B-sized model's tied 151,936 x 896 embedding is 260 MiB in bf16, more than its
4-bit layers, and the policy's untied lm head (``untie_embeddings``) as much again. A
full-precision load (transformers' own) instead leaves every weight in a memory map of the
file and pages in what it touches.

``map_embeddings`` does the same for these two weights after a quantized load: each becomes
a copy-on-write memory map of its tensor in the checkpoint (``LazyTensor.mapped``), in the
file's dtype; nothing is read until used, the pages read are file-backed (the system can
drop them), and a write (loading a saved state into it) copies only the pages written. The
rest of the model keeps the dtype it was loaded in: the embedding's output and the lm
head's logits are cast to it, and the lm head computes in the file's dtype. The tensor in
the file is found by content (a few rows equal the loaded weight's), not by name:
checkpoints name their weights in several layouts. A weight found in no single file tensor
is left as loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SOURCE = "ilstudio_mapped_from"  # attribute of a mapped Parameter: its LazyTensor


def _source_of(weight: torch.Tensor, state: dict[str, Any]) -> Any | None:
    """The one file tensor whose sampled rows equal ``weight``'s (cast to its dtype)."""
    n = weight.shape[0]
    rows = sorted({0, n // 2, n - 1})
    found = [t for t in state.values()
             if tuple(t.shape) == tuple(weight.shape) and t.dtype.is_floating_point
             and all(torch.equal(t.rows(r, 1)[0].to(weight.dtype), weight[r].detach()) for r in rows)]
    return found[0] if len(found) == 1 else None


def worth_mapping(quantization_config: Any) -> bool:
    """Whether a backbone load should leave its embedding and lm head in the file: a 4/8-bit
    load on the CPU (on CUDA the weights move to the device, where a file map is no saving)."""
    return quantization_config is not None and not torch.cuda.is_available()


def mapped_parameter(source: Any, requires_grad: bool = False) -> nn.Parameter:
    """A fresh Parameter over its own copy-on-write map of ``source`` (a LazyTensor)."""
    param = nn.Parameter(source.mapped(), requires_grad=requires_grad)
    setattr(param, SOURCE, source)
    return param


def own_copy(weight: nn.Parameter) -> nn.Parameter:
    """A Parameter with the values of ``weight`` and storage of its own: another map of the
    file for a mapped weight (no memory until read), else a clone."""
    source = getattr(weight, SOURCE, None)
    if source is not None:
        return mapped_parameter(source, weight.requires_grad)
    return nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)


def _cast_output(dtype: torch.dtype):
    return lambda module, args, out: out.to(dtype)


def _cast_input_to_weight(module: nn.Module, args: tuple) -> tuple:
    return (args[0].to(module.weight.dtype), *args[1:])


def _map(module: nn.Module, state: dict[str, Any]) -> torch.dtype | None:
    """Map ``module.weight``; its loaded dtype, or None when it stays as loaded."""
    weight = getattr(module, "weight", None)
    source = _source_of(weight, state) if isinstance(weight, nn.Parameter) else None
    if source is None:
        return None
    module.weight = mapped_parameter(source, weight.requires_grad)
    return weight.dtype


def _hook_head(head: nn.Module, dtype: torch.dtype) -> None:
    head.register_forward_pre_hook(_cast_input_to_weight)
    head.register_forward_hook(_cast_output(dtype))


def map_embeddings(model: nn.Module, state: dict[str, Any]) -> list[str]:
    """Map the input embedding and lm head of ``model`` onto ``state``'s file tensors (see
    the module docstring); returns which were mapped."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    done: list[str] = []
    dtype = _map(emb, state)
    if dtype is not None:
        emb.register_forward_hook(_cast_output(dtype))
        done.append("input embedding")
        if tied:
            head.weight = emb.weight
            _hook_head(head, dtype)
            done.append("lm head (tied)")
    if head is not None and not tied:
        dtype = _map(head, state)
        if dtype is not None:
            _hook_head(head, dtype)
            done.append("lm head")
    return done
