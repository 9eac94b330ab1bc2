"""bitsandbytes quantization of a policy's Hugging Face backbone (QLoRA's "Q").

``bnb_quantization_config(quant)`` / ``torch_dtype_for(quant)``: what a policy builder passes
to ``from_pretrained`` when loading the backbone (4/8-bit bitsandbytes, or bf16 for
bits=16). ``check_quantization_combo`` is the validation-time check (no torch). Saved 4-bit
weights carry their quantization state: ``load_state_with_quantized`` and
``restore_quantized_weights`` rebuild them when a full state dict is loaded (evaluation,
``model.load_pretrain``, resume). Importing this module is cheap: torch and bitsandbytes load
inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ilstudio.errors import UserError
from ilstudio.rundir import WEIGHTS

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import BitsAndBytesConfig

    from ilstudio.config.settings import LoraSettings, QuantizationSettings


def check_quantization_combo(lora: LoraSettings, quantization: QuantizationSettings,
                             source_of: Callable[[str], str]) -> None:
    """Refuse quantization settings that cannot train or would be silent no-ops.

    A 4/8-bit bitsandbytes backbone cannot be fine-tuned directly (transformers refuses it
    at Trainer construction); it trains through LoRA adapters (QLoRA). Settings that only
    matter for another bit width, or with quantization disabled, are inert, not errors: see
    config.settings.inert_values (resolve warns about them once).
    """
    problems = []
    q = quantization
    if q.enable and q.bits in (4, 8) and not lora.enable:
        problems.append(
            f"quantization.enable = True with quantization.bits = {q.bits} (set in "
            f"{source_of('quantization.enable')}) loads the backbone as frozen {q.bits}-bit "
            f"bitsandbytes weights, which cannot be trained directly: enable LoRA "
            f"(lora.enable = True, i.e. QLoRA) or set quantization.enable = False")
    if problems:
        raise UserError("invalid configuration:\n  " + "\n  ".join(problems))


def bnb_quantization_config(quant: QuantizationSettings,
                            compute_dtype: torch.dtype | None = None) -> BitsAndBytesConfig | None:
    """``from_pretrained(quantization_config=...)`` for these settings; None means unquantized.

    bits=16 is not a bitsandbytes mode: it returns None and the caller loads with
    ``dtype=torch_dtype_for(quant)`` (bf16; for 4/8-bit that dtype applies to the parts left
    unquantized). ``compute_dtype`` is the 4-bit matmul dtype
    (bitsandbytes' default, fp32, when None; bf16 is the usual choice on a GPU).
    """
    if not quant.enable or quant.bits == 16:
        return None
    from transformers import BitsAndBytesConfig

    if quant.bits == 4:
        kwargs: dict[str, Any] = {"load_in_4bit": True, "bnb_4bit_quant_type": quant.quant_type,
                                  "bnb_4bit_use_double_quant": quant.double_quant}
        if compute_dtype is not None:
            kwargs["bnb_4bit_compute_dtype"] = compute_dtype
        return BitsAndBytesConfig(**kwargs)
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UserError(f"quantization.bits = {quant.bits!r}: expected 4, 8 or 16")


def torch_dtype_for(quant: QuantizationSettings) -> torch.dtype | None:
    """The ``dtype`` to load the backbone in; None (the checkpoint's) when quantization is off.

    bits=16: bf16. bits=4/8: bf16 too, for the parts bitsandbytes leaves unquantized (the
    embedding, norms, and on a VLM the vision tower, projector and lm head). Under QLoRA they
    are frozen (``apply_lora`` keeps them in the dtype they were loaded in), so fp32 would only
    double their memory: a 0.5 B model's embedding is 519 MiB in fp32, more than its 4-bit
    layers. The quantized layers compute in fp32 (bitsandbytes' default compute dtype).
    """
    if quant.enable:
        import torch

        return torch.bfloat16
    return None


def quantized_from_config(auto_class: Any, config: Any, quantization_config: BitsAndBytesConfig,
                          **kwargs: Any) -> nn.Module:
    """A randomly initialized model (``model.is_pretrained = False``), loaded in 4/8-bit.

    bitsandbytes quantizes in ``from_pretrained``, so the random weights are saved to a
    temporary directory first. They are built in bf16 and released before the quantized load
    reads them back (``from_pretrained_unmapped``): the fp32 model is never in memory. The
    modules bitsandbytes leaves alone stay bf16, as in a pretrained quantized load
    (``torch_dtype_for``). ``kwargs`` (e.g. attn_implementation) go to both calls.
    """
    import gc
    import tempfile

    import torch

    model = auto_class.from_config(config, dtype=torch.bfloat16, **kwargs)
    with tempfile.TemporaryDirectory(prefix="ilstudio_random_backbone_") as tmp:
        model.save_pretrained(tmp)
        del model
        gc.collect()
        from ilstudio.models.unmapped_load import from_pretrained_unmapped

        return from_pretrained_unmapped(auto_class, tmp, config, quantization_config=quantization_config,
                                        dtype=torch.bfloat16, **kwargs)


def keep_portable_4bit_layout(model: nn.Module) -> None:
    """Keep every bitsandbytes 4-bit layer in its standard packed layout.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight in place (into a
    CPU-only layout with bf16 scales) the first time it runs in eval mode without grad. That
    breaks on layers narrower than the 64-value quantization block and would let a checkpoint
    saved after an evaluation depend on the CPU that wrote it. Training, evaluation and saving
    all use the standard layout instead.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def is_quantized_module(module: nn.Module) -> bool:
    """True for a Hugging Face model loaded in 4/8-bit bitsandbytes form."""
    return bool(getattr(module, "is_loaded_in_4bit", False) or getattr(module, "is_loaded_in_8bit", False))


def load_state_with_quantized(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    """``model.load_state_dict(state, strict=False)`` that also restores bitsandbytes 4-bit
    weights; returns (missing_keys, unexpected_keys).

    A 4-bit layer's state dict holds the packed weight plus its quantization state
    (``weight.absmax``, ``weight.quant_map``, ``weight.nested_*``,
    ``weight.quant_state.bitsandbytes__nf4``). ``nn.Module.load_state_dict`` ignores that
    state (reporting it as unexpected) and copies the packed bytes under the *current*
    scales, which is only right when the model was built from the very same base weights.
    Here each 4-bit weight is rebuilt from its saved quantization state
    (``Params4bit.from_prequantized``), so a model.safetensors of a QLoRA policy loads into
    any freshly built policy of the same shape. 8-bit layers restore their scales (``SCB``)
    in bitsandbytes' own ``load_state_dict``.
    """
    import bitsandbytes as bnb
    import torch

    state = dict(state)
    loaded: set[str] = set()
    for name, module in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if isinstance(module, bnb.nn.Linear8bitLt) and key in state:
            scb_key = key[: -len("weight")] + "SCB"
            if getattr(module.weight, "SCB", None) is None and module.state.SCB is not None \
                    and scb_key in state:
                # After a forward pass the scales live in module.state (weight.data is
                # state.CB), where bitsandbytes' own loader does not look.
                with torch.no_grad():
                    module.weight.data.copy_(state.pop(key))
                    module.state.SCB.copy_(state.pop(scb_key))
                state.pop(key[: -len("weight")] + "weight_format", None)  # layout marker (row)
                loaded.add(key)
            continue
        if not isinstance(module, bnb.nn.Linear4bit) or key not in state:
            continue
        stats = {k[len(key) + 1:]: state.pop(k) for k in [k for k in state if k.startswith(key + ".")]}
        data = state.pop(key)
        if not stats:
            raise ValueError(f"{key}: a 4-bit weight saved without its quantization state")
        module.weight = bnb.nn.Params4bit.from_prequantized(
            data=data.to(module.weight.device), quantized_stats=stats, requires_grad=False,
            device=module.weight.device, module=module)
        loaded.add(key)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in loaded and not
               any(k.startswith(q + ".") for q in loaded)]
    return missing, list(result.unexpected_keys)


def restore_quantized_weights(model: nn.Module, source: str | Path | dict) -> bool:
    """Rebuild ``model``'s 4-bit weights from their saved quantization state.

    source: a checkpoint/run directory or model.safetensors file, or its loaded state dict.
    Call it before (or after) a plain ``load_state_dict``/``copy_`` of a full state dict:
    those skip bitsandbytes' 4-bit quantization state, and the state dict's derived quant
    tensors only match in shape once the weights were rebuilt. False when nothing is 4-bit.
    """
    import sys

    if "bitsandbytes" not in sys.modules:  # nothing can be 4-bit; skip importing it (~4 s)
        return False
    import bitsandbytes as bnb

    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    if not quantized:
        return False
    if isinstance(source, dict):
        state = source
    else:
        from safetensors.torch import load_file

        path = Path(source)
        path = path / WEIGHTS if path.is_dir() else path
        if not path.is_file():
            return False
        state = load_file(str(path))
    keep = {k: v for k, v in state.items()
            if any(k == f"{q}.weight" or k.startswith(f"{q}.weight.") for q in quantized)}
    load_state_with_quantized(model, keep)
    return True
