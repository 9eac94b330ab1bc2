"""LoRA (peft) and quantization (bitsandbytes) for policies built from Hugging Face parts.

A policy builder calls these in order:

1. ``bnb_quantization_config(quant)`` / ``torch_dtype_for(quant)``: what to pass to
   ``from_pretrained`` when loading the backbone (4/8-bit bitsandbytes, or bf16 for bits=16).
2. ``lora_target_modules(parts, lora.module, root=policy)``: the fully-qualified Linear
   layers that get adapters, from part names (``llm``, ``vit``, ``projector``,
   ``action_head``) or module-name patterns.
3. ``apply_lora(policy, lora, targets, quantized)``: k-bit training preparation (QLoRA) of
   the quantized Hugging Face submodules, then LoRA injection, then (optionally) the
   adapter weights from ``lora.weight_path``.
4. ``lora_param_groups(policy, lr, lora.lr, weight_decay)`` from the policy's
   ``optimizer_param_groups``: LoRA parameters get their own learning rate.
5. ``save_adapter`` / ``load_adapter_run``: the adapter and the trainable non-LoRA weights
   in the run directory (``PolicyTrainer`` saves them beside every full checkpoint).

Validation-time checks (``check_quantization_combo``, ``check_lora_settings``) import
nothing heavy: policy configuration modules call them during ``--dry_run``. Everything
else imports torch/peft/bitsandbytes inside the function, so importing this module is cheap.

How ``lora.task_type`` is honoured: it always goes to ``LoraConfig(task_type=...)`` (and so
into ``adapter_config.json``). When the root model is itself a ``transformers``
``PreTrainedModel``, ``get_peft_model`` wraps it in the task's PeftModel class (e.g.
``PeftModelForCausalLM`` for ``CAUSAL_LM``). A policy root is a plain ``nn.Module`` that
holds an LM among other parts; peft's task wrappers expect the root to *be* the HF model,
so there the adapters are injected in place (``inject_adapter_in_model``) and the task type
is recorded in the config only.

Trainability: peft freezes everything but the adapters. A policy's new parts (an action
head, a projector) must still train, so ``apply_lora`` freezes the base weights only of the
*parts that hold adapters* and of the quantized submodules; every other parameter keeps the
``requires_grad`` the policy gave it before LoRA (so the freezing switches still decide).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ilstudio.errors import UserError, closest
from ilstudio.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, NON_LORA_TRAINABLES, WEIGHTS

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import BitsAndBytesConfig

    from ilstudio.config.settings import LoraSettings, QuantizationSettings

PART_NAMES = ("llm", "vit", "projector", "action_head")
ADAPTER_NAME = "default"
# Output layers over the vocabulary: LLaVA-style training leaves them out of "all linear
# layers" (a vocab-sized LoRA B, and unused when there is no language loss, which breaks
# DDP). A pattern naming them explicitly still selects them.
_SKIPPED_BY_PART = ("lm_head",)


# ----------------------------------------------------------------------------------------
# Validation-time checks (no torch)
# ----------------------------------------------------------------------------------------

def _defaults(obj: Any) -> dict[str, Any]:
    from ilstudio.config.declare import params_of

    return {info.name: info.default for info in params_of(type(obj))}


def check_quantization_combo(lora: LoraSettings, quantization: QuantizationSettings,
                             source_of: Callable[[str], str]) -> None:
    """Refuse quantization settings that cannot train or would be silent no-ops.

    A 4/8-bit bitsandbytes backbone cannot be fine-tuned directly (transformers refuses it
    at Trainer construction); it trains through LoRA adapters (QLoRA). Settings that only
    matter for another bit width, or with quantization disabled, are errors rather than
    silently ignored.
    """
    problems = []
    q = quantization
    defaults = _defaults(q)
    if q.enable and q.bits in (4, 8) and not lora.enable:
        problems.append(
            f"quantization.enable = True with quantization.bits = {q.bits} (set in "
            f"{source_of('quantization.enable')}) loads the backbone as frozen {q.bits}-bit "
            f"bitsandbytes weights, which cannot be trained directly: enable LoRA "
            f"(lora.enable = True, i.e. QLoRA) or set quantization.enable = False")
    if not q.enable:
        for name in ("bits", "double_quant", "quant_type"):
            if getattr(q, name) != defaults[name]:
                problems.append(f"quantization.{name} = {getattr(q, name)!r} (set in "
                                f"{source_of('quantization.' + name)}) has no effect while "
                                f"quantization.enable is False")
    elif q.bits != 4:
        for name in ("double_quant", "quant_type"):
            if getattr(q, name) != defaults[name]:
                problems.append(f"quantization.{name} = {getattr(q, name)!r} (set in "
                                f"{source_of('quantization.' + name)}) only applies to 4-bit "
                                f"quantization, but quantization.bits = {q.bits}")
    if problems:
        raise UserError("invalid configuration:\n  " + "\n  ".join(problems))


def check_lora_settings(lora: LoraSettings, source_of: Callable[[str], str]) -> None:
    """Refuse LoRA settings peft would reject late, or that do nothing with LoRA disabled."""
    problems = []
    if not lora.enable:
        for name, default in _defaults(lora).items():
            if name != "enable" and getattr(lora, name) != default:
                problems.append(f"lora.{name} = {getattr(lora, name)!r} (set in "
                                f"{source_of('lora.' + name)}) has no effect while lora.enable "
                                f"is False")
    else:
        task_types = _peft_task_types()
        if lora.task_type not in task_types:
            hint = closest(lora.task_type, task_types)
            problems.append(f"lora.task_type = {lora.task_type!r} (set in "
                            f"{source_of('lora.task_type')}): not a peft task type"
                            + (f" (did you mean `{hint[0]}`?)" if hint else "")
                            + f". Known: {', '.join(task_types)}")
        if lora.r <= 0:
            problems.append(f"lora.r = {lora.r} (set in {source_of('lora.r')}): the rank must be > 0")
        if not 0.0 <= lora.dropout < 1.0:
            problems.append(f"lora.dropout = {lora.dropout} (set in {source_of('lora.dropout')}): "
                            f"expected a probability in [0, 1)")
        if lora.lr is not None and lora.lr < 0:
            problems.append(f"lora.lr = {lora.lr} (set in {source_of('lora.lr')}): must be >= 0")
        if lora.weight_path:
            try:
                adapter_weights_file(lora.weight_path)
            except UserError as err:
                problems.append(f"{err} (set in {source_of('lora.weight_path')})")
    if problems:
        raise UserError("invalid configuration:\n  " + "\n  ".join(problems))


def _peft_task_types() -> list[str]:
    # peft's TaskType values; listed here so validation does not import peft (~5 s).
    return ["SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
            "FEATURE_EXTRACTION"]


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


# ----------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------

def bnb_quantization_config(quant: QuantizationSettings,
                            compute_dtype: torch.dtype | None = None) -> BitsAndBytesConfig | None:
    """``from_pretrained(quantization_config=...)`` for these settings; None means unquantized.

    bits=16 is not a bitsandbytes mode: it returns None and the caller loads with
    ``dtype=torch_dtype_for(quant)`` (bf16). ``compute_dtype`` is the 4-bit matmul dtype
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
    """The ``dtype`` to load the backbone in: bf16 for an enabled bits=16, else None (default)."""
    if quant.enable and quant.bits == 16:
        import torch

        return torch.bfloat16
    return None


def is_quantized_module(module: nn.Module) -> bool:
    """True for a Hugging Face model loaded in 4/8-bit bitsandbytes form."""
    return bool(getattr(module, "is_loaded_in_4bit", False) or getattr(module, "is_loaded_in_8bit", False))


# ----------------------------------------------------------------------------------------
# Target selection
# ----------------------------------------------------------------------------------------

def _adaptable_types() -> tuple[type, ...]:
    from torch import nn

    types: list[type] = [nn.Linear]  # bnb Linear4bit and Linear8bitLt subclass nn.Linear
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2 style linear layers

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - depends on transformers version
        pass
    return tuple(types)


def _part_prefixes(parts: dict[str, nn.Module], root: nn.Module | None) -> dict[str, str]:
    if root is None:
        return {name: name for name in parts}
    where = {}
    for qualified, module in root.named_modules():
        where.setdefault(id(module), qualified)
    prefixes = {}
    for name, module in parts.items():
        if id(module) not in where:
            raise ValueError(f"lora_target_modules: part {name!r} is not a submodule of the root model")
        prefixes[name] = where[id(module)]
    return prefixes


def _split_tokens(spec: str) -> list[str]:
    return [t for t in re.split(r"[,\s]+", spec.strip()) if t]


def _matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def lora_target_modules(parts: dict[str, nn.Module], lora_module: str,
                        root: nn.Module | None = None) -> list[str]:
    """Fully-qualified names (relative to ``root``) of the layers that get LoRA adapters.

    ``lora_module`` is a comma/space list. A part name (a key of ``parts``: ``llm``, ``vit``,
    ``projector``, ``action_head``) selects every Linear layer inside that part (bitsandbytes
    Linear4bit/Linear8bitLt included; the LM's ``lm_head`` left out). Any other token is a
    module-name pattern over the layers of all parts: an exact name, a dotted suffix
    (``q_proj`` matches ``llm.model.layers.0.self_attn.q_proj``) or a regex matched against the
    whole name. A token that selects nothing is a UserError naming ``lora.module``.

    ``root``: the model the names are relative to; its ``named_modules`` gives each part's
    prefix. Without it each part's key is taken as its attribute name on the root.
    """
    prefixes = _part_prefixes(parts, root)
    kinds = _adaptable_types()
    layers: dict[str, list[str]] = {}
    for part, module in parts.items():
        prefix = prefixes[part]
        layers[part] = [f"{prefix}.{n}" if prefix and n else (prefix or n)
                        for n, m in module.named_modules() if isinstance(m, kinds)]
    tokens = _split_tokens(lora_module)
    if not tokens:
        raise UserError(f"lora.module = {lora_module!r}: empty; expected a comma list of parts "
                        f"({', '.join(parts)}) or module-name patterns")
    chosen: dict[str, None] = {}
    everything = [n for names in layers.values() for n in names]
    for tok in tokens:
        if tok in parts:
            hits = [n for n in layers[tok] if n.rsplit(".", 1)[-1] not in _SKIPPED_BY_PART]
            if not hits:
                raise UserError(f"lora.module = {lora_module!r}: part {tok!r} has no Linear "
                                f"layers to adapt")
        else:
            hits = [n for n in everything if _matches(tok, n)]
            if not hits:
                leaves = sorted({n.rsplit(".", 1)[-1] for n in everything} - set(parts))
                leaves = [leaf for leaf in leaves if not leaf.isdigit()]
                hint = closest(tok, list(parts) + leaves, cutoff=0.5)
                raise UserError(
                    f"lora.module = {lora_module!r}: {tok!r} is neither a part of this policy "
                    f"nor a pattern matching any of its Linear layers"
                    + (f" (did you mean `{hint[0]}`?)" if hint else "")
                    + f". Parts: {', '.join(parts)}; layer names end in e.g. "
                    f"{', '.join(leaves[:8])}")
        for n in hits:
            chosen.setdefault(n, None)
    return list(chosen)


# ----------------------------------------------------------------------------------------
# Injection
# ----------------------------------------------------------------------------------------

def _outermost(names: Iterable[str]) -> list[str]:
    out: list[str] = []
    for n in sorted(names, key=lambda s: (s.count("."), s)):
        if not any(n == o or n.startswith(o + ".") or o == "" for o in out):
            out.append(n)
    return out


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def lora_config(lora: LoraSettings, target_modules: list[str]):
    """peft ``LoraConfig`` from the settings (r, alpha, dropout, bias, task_type)."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                      target_modules=list(target_modules), task_type=lora.task_type)


def apply_lora(model: nn.Module, lora: LoraSettings, target_modules: list[str],
               quantized: bool | None = None, *,
               parts: dict[str, nn.Module] | None = None,
               gradient_checkpointing: bool = False) -> nn.Module:
    """Inject LoRA adapters into ``target_modules`` of ``model`` (QLoRA when ``quantized``).

    Returns the model to train: ``model`` itself (adapters injected in place) for a plain
    nn.Module root, or a task-specific ``PeftModel`` when the root is a HF PreTrainedModel.

    quantized: run ``peft.prepare_model_for_kbit_training`` on each bitsandbytes-loaded HF
        submodule first: it freezes that submodule, upcasts its fp16/bf16 weights to fp32
        and, with ``gradient_checkpointing``, turns on non-reentrant checkpointing in it.
        None: detect (True when any submodule was loaded in 4/8-bit).
    parts: the policy's parts (name -> submodule). The base weights of the parts that hold
        a target are frozen; all other parameters keep their requires_grad. Default: the
        root's direct children.
    """
    from peft import get_peft_model, inject_adapter_in_model, prepare_model_for_kbit_training
    from transformers import PreTrainedModel

    if not target_modules:
        raise ValueError("apply_lora: no target modules")
    names = dict(model.named_modules())
    missing = [t for t in target_modules if t not in names]
    if missing:
        raise ValueError(f"apply_lora: target modules not in the model: {missing[:5]}")
    before = {n: p.requires_grad for n, p in model.named_parameters()}

    kbit_roots: list[str] = []
    if quantized is None:
        quantized = any(is_quantized_module(m) for m in names.values())
    if quantized:
        kbit_roots = _outermost(n for n, m in names.items() if is_quantized_module(m))
        gc_kwargs = {"use_reentrant": False}
        for n in kbit_roots:
            prepare_model_for_kbit_training(names[n], use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs=gc_kwargs)
        if not kbit_roots:
            raise ValueError("apply_lora(quantized=True): no bitsandbytes-loaded Hugging Face "
                             "model (is_loaded_in_4bit/8bit) inside the policy")

    if parts is None:
        part_prefixes = [n for n, _ in model.named_children()]
    else:
        part_prefixes = list(_part_prefixes(parts, model).values())
    adapted = [p for p in part_prefixes if any(_under(t, [p]) for t in target_modules)]
    if not adapted:  # targets outside every part: their own modules are the "parts"
        adapted = list(target_modules)

    config = lora_config(lora, target_modules)
    if isinstance(model, PreTrainedModel):
        model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
        inner_prefix = "base_model.model."
    else:
        model = inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        inner_prefix = ""

    frozen_for_good = adapted + kbit_roots
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        orig = name[len(inner_prefix):] if name.startswith(inner_prefix) else name
        orig = orig.replace(".base_layer.", ".")
        if lora.bias == "all" and orig.endswith("bias"):
            continue  # peft: every bias trains
        if _under(orig, frozen_for_good) or orig not in before:
            continue  # peft's decision: base weights frozen (adapter-side biases per lora.bias)
        if before[orig] and not param.is_floating_point():
            continue
        param.requires_grad = before[orig]

    if lora.weight_path:
        load_adapter_weights(model, lora.weight_path)
    return model


def has_lora(model: nn.Module) -> bool:
    """True when peft adapters were injected into ``model`` (or it is a PeftModel)."""
    return isinstance(getattr(model, "peft_config", None), dict) and ADAPTER_NAME in model.peft_config


def _read_state(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def load_adapter_weights(model: nn.Module, path: str | Path, what: str = "lora.weight_path") -> None:
    """Load saved adapter weights into the injected adapters; every adapter tensor must load.

    A directory written by a LoRA run also restores its trainable non-LoRA weights
    (``non_lora_trainables.safetensors``) when present, so training continues where it was.
    """
    from peft import set_peft_model_state_dict

    file = adapter_weights_file(path)
    state = _read_state(file)
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
        _load_trainables(model, trainables, what)


def _load_trainables(model: nn.Module, file: Path, what: str) -> None:
    state = _read_state(file)
    own = dict(model.named_parameters())
    unknown = [k for k in state if k not in own]
    if unknown:
        raise UserError(f"{what}: {file} holds weights this model does not have (e.g. "
                        f"{unknown[0]}); was it saved by another policy configuration?")
    import torch

    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise UserError(f"{what}: {file}: {k} has shape {tuple(v.shape)}, this model "
                                f"has {tuple(own[k].shape)}")
            own[k].copy_(v)


# ----------------------------------------------------------------------------------------
# Optimizer groups
# ----------------------------------------------------------------------------------------

def _no_decay(name: str, param) -> bool:
    return param.ndim < 2 or name.endswith("bias")


def lora_param_groups(model: nn.Module, base_lr: float, lora_lr: float | None,
                      weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: LoRA parameters at ``lora_lr`` (``base_lr`` when None).

    Trainable parameters whose name contains ``lora_`` form the LoRA groups, all others the
    base groups; frozen parameters are left out. As in the Trainer's default, biases and
    1-D parameters (norms) get no weight decay. Empty groups are dropped; each group has a
    ``name`` ("lora", "lora_no_decay", "base", "base_no_decay").
    """
    lr_of = {"lora": base_lr if lora_lr is None else lora_lr, "base": base_lr}
    buckets: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = "lora" if "lora_" in name else "base"
        buckets.setdefault((kind, _no_decay(name, param)), []).append(param)
    groups = []
    for kind in ("lora", "base"):
        for no_decay in (False, True):
            params = buckets.get((kind, no_decay))
            if params:
                groups.append({"name": kind + ("_no_decay" if no_decay else ""), "params": params,
                               "lr": lr_of[kind], "weight_decay": 0.0 if no_decay else weight_decay})
    return groups


# ----------------------------------------------------------------------------------------
# Saving and loading a LoRA run
# ----------------------------------------------------------------------------------------

def save_adapter(model: nn.Module, output_dir: str | Path, state_dict: dict | None = None) -> list[Path]:
    """Write the adapter (peft format) and the trainable non-LoRA weights to ``output_dir``.

    state_dict: take the tensors from this state dict of ``model`` instead of the live
    weights (the Trainer passes the EMA-substituted one, so the adapter files carry the same
    weights as model.safetensors).

    Files: ``adapter_model.safetensors`` + ``adapter_config.json`` (loadable by peft and by
    ``lora.weight_path``), and ``non_lora_trainables.safetensors`` (e.g. the action head and
    projector). With the base model (from ``model.model_name_or_path``, quantized or not)
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
    trainables = {n: state_dict[n].detach().contiguous().cpu() for n, p in model.named_parameters()
                  if p.requires_grad and "lora_" not in n and n in state_dict}
    save_file(trainables, str(out / NON_LORA_TRAINABLES), metadata={"format": "pt"})
    return [out / ADAPTER_WEIGHTS, out / ADAPTER_CONFIG, out / NON_LORA_TRAINABLES]


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


# ----------------------------------------------------------------------------------------
# Full state dicts of quantized policies
# ----------------------------------------------------------------------------------------

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
