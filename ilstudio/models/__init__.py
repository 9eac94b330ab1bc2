"""Model-building blocks shared by policies, one module per job:

- ``quantization``: bitsandbytes loading configs and restoring saved 4-bit weights;
- ``lora``: which layers get LoRA adapters, injection (QLoRA included), optimizer groups;
- ``adapter_io``: a LoRA run's adapter files (``lora.weight_path``, rebuilding a run);
- ``state_io``: the one strict state-dict loader (evaluation, ``model.load_pretrain``);
- ``unmapped_load``: quantized/cast checkpoint loads that do not memory-map the file.

Importing this package is cheap (torch, peft and bitsandbytes load inside the functions),
so policy configuration modules can use the validation checks during ``--dry_run``.
"""

from ilstudio.models.adapter_io import has_lora, load_adapter_run, load_adapter_weights, save_adapter
from ilstudio.models.lora import (
    PART_NAMES,
    apply_lora,
    check_lora_settings,
    lora_config,
    lora_param_groups,
    lora_target_modules,
)
from ilstudio.models.quantization import (
    bnb_quantization_config,
    check_quantization_combo,
    is_quantized_module,
    keep_portable_4bit_layout,
    load_state_with_quantized,
    quantized_from_config,
    restore_quantized_weights,
    torch_dtype_for,
)
from ilstudio.models.unmapped_load import from_pretrained_unmapped

__all__ = [
    "PART_NAMES", "apply_lora", "bnb_quantization_config", "check_lora_settings",
    "check_quantization_combo", "from_pretrained_unmapped", "has_lora", "is_quantized_module", "keep_portable_4bit_layout", "load_adapter_run",
    "load_adapter_weights", "load_state_with_quantized", "lora_config", "lora_param_groups",
    "lora_target_modules", "quantized_from_config", "restore_quantized_weights", "save_adapter", "torch_dtype_for",
]
