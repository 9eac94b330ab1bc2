"""LoRA adapter files: where ``lora.weight_path`` points, and a LoRA run's saved adapter.

A LoRA run writes, beside every full checkpoint and the final model (``PolicyTrainer``),
``adapter_model.safetensors`` + ``adapter_config.json`` (peft's format, loadable by peft and
by ``lora.weight_path``) and ``non_lora_trainables.safetensors`` (the trainable weights
outside the adapters, e.g. an action head). ``load_adapter_run`` rebuilds a trained policy
from a freshly built base plus these files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ilstudio.errors import UserError
from ilstudio.models.state_io import load_strict, read_state
from ilstudio.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, NON_LORA_TRAINABLES

if TYPE_CHECKING:
    from torch import nn

ADAPTER_NAME = "default"  # peft's adapter name in every LoRA policy


def has_lora(model: nn.Module) -> bool:
    """True when peft adapters were injected into ``model`` (or it is a PeftModel)."""
    return isinstance(getattr(model, "peft_config", None), dict) and ADAPTER_NAME in model.peft_config


def adapter_weights_file(path: str | Path) -> Path:
    """The adapter weight file behind ``lora.weight_path`` (a run/adapter dir, or a file)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in (ADAPTER_WEIGHTS, "adapter_model.bin"):
            if (p / name).is_file():
                return p / name
        raise UserError(f"lora.weight_path = {str(path)!r}: directory has no {ADAPTER_WEIGHTS} "
                        f"(expected a directory written by a LoRA run, or the file itself)")
    if p.is_file():
        return p
    raise UserError(f"lora.weight_path = {str(path)!r}: no such file or directory")


def load_adapter_weights(model: nn.Module, path: str | Path, what: str = "lora.weight_path") -> None:
    """Load saved adapter weights into the injected adapters; every adapter tensor must load.

    A directory written by a LoRA run also restores its trainable non-LoRA weights
    (``non_lora_trainables.safetensors``) when present, so training continues where it was.
    """
    from peft import set_peft_model_state_dict

    file = adapter_weights_file(path)
    state = read_state(file, f"{what} = {str(path)!r}: ", torch_format=True)
    expected = {k for k in model.state_dict() if "lora_" in k}
    try:
        result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    except RuntimeError as err:  # size mismatch: different r or different layer shapes
        first = str(err).strip().splitlines()
        raise UserError(f"{what} = {str(path)!r}: adapter weights do not fit this model "
                        f"({first[-1].strip() if first else err}); were they saved with another "
                        f"lora.r or lora.module?") from None
    unexpected = list(result.unexpected_keys)
    not_loaded = sorted(k for k in result.missing_keys if k in expected)
    if unexpected or not_loaded or not state:
        detail = []
        if unexpected:
            detail.append(f"{len(unexpected)} saved tensors match no adapter here (e.g. {unexpected[0]})")
        if not_loaded:
            detail.append(f"{len(not_loaded)} adapters here got no saved weights (e.g. {not_loaded[0]})")
        if not state:
            detail.append("the file holds no tensors")
        raise UserError(f"{what} = {str(path)!r}: adapter weights do not match this model's "
                        f"adapters: {'; '.join(detail)}. Use the lora.module and lora.r the "
                        f"adapter was trained with.")
    trainables = file.parent / NON_LORA_TRAINABLES
    if file.parent.is_dir() and trainables.is_file():
        load_strict(model, read_state(trainables, f"{what}: "),
                    f"{what}: {trainables} does not fit this model (saved by another policy "
                    f"configuration?)", partial=True)


def save_adapter(model: nn.Module, output_dir: str | Path, state_dict: dict | None = None) -> list[Path]:
    """Write the adapter (peft format) and the trainable non-LoRA weights to ``output_dir``.

    state_dict: take the tensors from this state dict of ``model`` instead of the live
    weights (the Trainer passes the EMA-substituted one, so the adapter files carry the same
    weights as model.safetensors).

    Files: ``adapter_model.safetensors`` + ``adapter_config.json`` (loadable by peft and by
    ``lora.weight_path``), and ``non_lora_trainables.safetensors`` (e.g. the action head and
    projector, with the buffers of the modules they belong to). With the base model (from ``model.model_name_or_path``, quantized or not)
    they rebuild the trained policy: see ``load_adapter_run``.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not has_lora(model):
        raise ValueError("save_adapter: the model has no LoRA adapters")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        state_dict = model.state_dict()
    adapter = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(
        model, state_dict=state_dict, adapter_name=ADAPTER_NAME).items()}
    save_file(adapter, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    model.peft_config[ADAPTER_NAME].save_pretrained(str(out))  # adapter_config.json
    names = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    names += _buffers_of_trained_modules(model)
    trainables = {n: state_dict[n].detach().contiguous().cpu() for n in names if n in state_dict}
    save_file(trainables, str(out / NON_LORA_TRAINABLES), metadata={"format": "pt"})
    return [out / ADAPTER_WEIGHTS, out / ADAPTER_CONFIG, out / NON_LORA_TRAINABLES]


def _buffers_of_trained_modules(model: nn.Module) -> list[str]:
    """The buffers of modules that own a trainable non-LoRA parameter (an ActNorm's
    ``initialized`` flag beside its learned affine map): state that training set and a
    continued run must find again; a frozen base layer's buffers stay with the base."""
    out = []
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)) and "lora_" not in name:
            out += [f"{name}.{b}" if name else b for b, _ in module.named_buffers(recurse=False)]
    return out


def load_adapter_run(model: nn.Module, run_dir: str | Path) -> nn.Module:
    """Rebuild a trained LoRA policy: ``model`` (the freshly built base, quantized or not)
    + the run's adapter + its trainable non-LoRA weights.

    If ``model`` has no adapters yet they are injected from the run's adapter_config.json
    (same targets, r, alpha, ...). Returns the model (adapters loaded in place).
    """
    from peft import LoraConfig, inject_adapter_in_model

    run = Path(run_dir)
    if not (run / ADAPTER_CONFIG).is_file():
        raise UserError(f"{run}: no {ADAPTER_CONFIG} (not the directory of a LoRA run)")
    if not has_lora(model):
        config = LoraConfig.from_pretrained(str(run))
        model = inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    load_adapter_weights(model, run, what=f"LoRA run {run}")
    return model
