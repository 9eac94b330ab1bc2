"""LoRA (peft) for policies built from Hugging Face parts: which layers, injection, groups.

A policy builder, after loading its backbone (quantized or not: ilstudio/models/quantization.py):

1. ``lora_target_modules(parts, lora.module, root=policy)``: the fully-qualified Linear
   layers that get adapters, from part names (``llm``, ``vit``, ``projector``,
   ``action_head``) or module-name patterns.
2. ``apply_lora(policy, lora, targets, quantized)``: k-bit training preparation (QLoRA) of
   the quantized Hugging Face submodules, then LoRA injection, then (optionally) the
   adapter weights from ``lora.weight_path`` (ilstudio/models/adapter_io.py).
3. ``lora_param_groups(policy, lr, lora.lr, weight_decay)`` from the policy's
   ``optimizer_param_groups``: LoRA parameters get their own learning rate.

``check_lora_settings`` is the validation-time check: it imports nothing heavy, so policy
configuration modules call it during ``--dry_run``. Everything else imports torch/peft
inside the function, so importing this module is cheap.

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
from typing import TYPE_CHECKING

from ilstudio.errors import UserError, closest
from ilstudio.models.adapter_io import ADAPTER_NAME, adapter_weights_file, load_adapter_weights
from ilstudio.models.quantization import is_quantized_module

if TYPE_CHECKING:
    from torch import nn

    from ilstudio.config.settings import LoraSettings

PART_NAMES = ("llm", "vit", "projector", "action_head")
# Output layers over the vocabulary: LLaVA-style training leaves them out of "all linear
# layers" (a vocab-sized LoRA B, and unused when there is no language loss, which breaks
# DDP). A pattern naming them explicitly still selects them.
_SKIPPED_BY_PART = ("lm_head",)


def check_lora_settings(lora: LoraSettings, source_of: Callable[[str], str]) -> None:
    """Refuse LoRA settings peft would reject late (only while LoRA is enabled)."""
    problems = []
    if lora.enable:  # with LoRA off these values are inert (config.settings.inert_values)
        task_types = _peft_task_types()
        if lora.task_type not in task_types:
            hint = closest(lora.task_type, task_types)
            problems.append(f"lora.task_type = {lora.task_type!r} (set in "
                            f"{source_of('lora.task_type')}): not a peft task type"
                            + (f" (did you mean `{hint[0]}`?)" if hint else "")
                            + f". Known: {', '.join(task_types)}")
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
        # A part nested inside this one (Qwen2-VL's merger inside its vision tower) keeps its
        # own layers: they are not this part's.
        inner = [q for other, q in prefixes.items() if other != part and q != prefix
                 and _under(q, [prefix])]
        layers[part] = [full for full in (f"{prefix}.{n}" if prefix and n else (prefix or n)
                                          for n, m in module.named_modules() if isinstance(m, kinds))
                        if not _under(full, inner)]
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


def _outermost(names: Iterable[str]) -> list[str]:
    out: list[str] = []
    for n in sorted(names, key=lambda s: (s.count("."), s)):
        if not any(n == o or n.startswith(o + ".") or o == "" for o in out):
            out.append(n)
    return out


def _innermost(name: str, prefixes: Iterable[str]) -> str | None:
    """The longest of ``prefixes`` that holds ``name`` (nested parts: the inner one)."""
    holding = [p for p in prefixes if _under(name, [p])]
    return max(holding, key=len) if holding else None


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

    quantized: prepare each bitsandbytes-loaded HF submodule for k-bit training first
        (``prepare_kbit_training``: it freezes that submodule and, with
        ``gradient_checkpointing``, turns on non-reentrant checkpointing in it).
        None: detect (True when any submodule was loaded in 4/8-bit).
    parts: the policy's parts (name -> submodule). The base weights of the parts that hold
        a target are frozen; all other parameters keep their requires_grad. Default: the
        root's direct children.
    """
    from peft import get_peft_model, inject_adapter_in_model
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
        for n in kbit_roots:
            prepare_kbit_training(names[n], gradient_checkpointing)
        if not kbit_roots:
            raise ValueError("apply_lora(quantized=True): no bitsandbytes-loaded Hugging Face "
                             "model (is_loaded_in_4bit/8bit) inside the policy")

    if parts is None:
        part_prefixes = [n for n, _ in model.named_children()]
    else:
        part_prefixes = list(_part_prefixes(parts, model).values())
    config = lora_config(lora, target_modules)
    if isinstance(model, PreTrainedModel):
        model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
        inner_prefix = "base_model.model."
    else:
        model = inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        inner_prefix = ""
    _restore_trainability(model, lora, before, target_modules, part_prefixes,
                          kbit_roots, inner_prefix)
    if lora.weight_path:
        load_adapter_weights(model, lora.weight_path)
    return model


def prepare_kbit_training(module: nn.Module, gradient_checkpointing: bool = False) -> None:
    """``peft.prepare_model_for_kbit_training`` without its fp32 upcast of frozen weights.

    peft freezes the quantized model, casts every fp16/bf16 parameter to fp32 and, with
    gradient checkpointing, enables it. Everything under a quantized root stays frozen under
    QLoRA (only the adapters, fp32, train), so the cast buys nothing but memory: the weights
    bitsandbytes leaves unquantized keep the dtype they were loaded in (bf16, see
    ``torch_dtype_for``). Checkpointing is non-reentrant, which needs no input-grad hook.
    """
    for param in module.parameters():
        param.requires_grad = False
    if gradient_checkpointing:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _restore_trainability(model: nn.Module, lora: LoraSettings, before: dict[str, bool],
                          target_modules: list[str], part_prefixes: list[str],
                          kbit_roots: list[str], inner_prefix: str) -> None:
    """Give back the pre-LoRA requires_grad to every parameter outside the parts that hold
    adapters and outside the quantized submodules (see the module docstring)."""
    # The innermost part holding each target (a part nested in another is its own part);
    # targets outside every part count as their own parts.
    owners = {t: _innermost(t, part_prefixes) for t in target_modules}
    adapted = {o for o in owners.values() if o is not None}
    frozen_roots = kbit_roots + [t for t, o in owners.items() if o is None]
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        orig = name[len(inner_prefix):] if name.startswith(inner_prefix) else name
        orig = orig.replace(".base_layer.", ".")
        if lora.bias == "all" and orig.endswith("bias"):
            continue  # peft: every bias trains
        if _innermost(orig, part_prefixes) in adapted or _under(orig, frozen_roots) \
                or orig not in before:
            continue  # peft's decision: base weights frozen (adapter-side biases per lora.bias)
        if before[orig] and not param.is_floating_point():
            continue
        param.requires_grad = before[orig]


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
