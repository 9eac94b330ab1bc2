"""Model-building blocks shared by policies: LoRA adapters and bitsandbytes quantization.

Importing this package is cheap (torch, peft and bitsandbytes load inside the functions),
so policy configuration modules can use the validation checks during ``--dry_run``.
"""

from ilstudio.models.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    NON_LORA_TRAINABLES,
    PART_NAMES,
    apply_lora,
    bnb_quantization_config,
    check_lora_settings,
    check_quantization_combo,
    has_lora,
    is_quantized_module,
    load_adapter_run,
    load_adapter_weights,
    load_state_with_quantized,
    lora_config,
    lora_param_groups,
    lora_target_modules,
    restore_quantized_weights,
    save_adapter,
    torch_dtype_for,
)

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "NON_LORA_TRAINABLES", "PART_NAMES", "apply_lora",
    "bnb_quantization_config", "check_lora_settings", "check_quantization_combo", "has_lora",
    "is_quantized_module", "load_adapter_run", "load_adapter_weights", "load_state_with_quantized", "lora_config",
    "lora_param_groups", "lora_target_modules", "restore_quantized_weights", "save_adapter",
    "torch_dtype_for",
]
