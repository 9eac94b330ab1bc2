"""Policies: each a package with a cheap ``configuration`` module and a ``modeling`` module.

``model.policy = 'act'`` selects one. The configuration module registers the policy's
own gin configurable and is imported during resolution; the modeling module (torch,
transformers) is imported only when a run builds the model.
"""

from __future__ import annotations

import importlib

from ilstudio.errors import UserError, did_you_mean

POLICIES = {
    "mlp": "ilstudio.policies.mlp",
    "act": "ilstudio.policies.act",
    "vla": "ilstudio.policies.vla",
    "tinyact": "ilstudio.policies.tinyact",
}


def _package(name: str, source: str) -> str:
    if not isinstance(name, str) or name not in POLICIES:  # gin passes any literal through
        raise UserError(f"model.policy = {name!r} (set in {source}): unknown policy"
                        f"{did_you_mean(name, POLICIES)}. Known: {', '.join(POLICIES)}")
    return POLICIES[name]


def policy_config_class(name: str, source: str = "default"):
    return importlib.import_module(_package(name, source) + ".configuration").CONFIG_CLASS


def import_all_configurations() -> None:
    """Register every policy's configurable, so any policy's bindings parse in gin files."""
    for pkg in POLICIES.values():
        importlib.import_module(pkg + ".configuration")


def _modeling(name: str):
    return importlib.import_module(_package(name, "model.policy") + ".modeling")


def _context(run) -> dict:
    """What a policy's ``build``/``build_processor`` take, from a run's settings."""
    return {"policy_config": _with_scene_instruction(run.policy, getattr(run, "sim", None)),
            "task": run.task, "dataset": run.dataset, "model": run.model, "lora": run.lora,
            "quantization": run.quantization, "use_images": run.use_images}


def _with_scene_instruction(policy_config, sim):
    """A language-conditioned policy (one with an ``instruction`` setting) left without one
    gets, on a simulated task, the instruction that scene's recorded demonstrations carry: so
    the evaluator and in-training rollouts prompt it as training did, with no extra binding."""
    import dataclasses

    from ilstudio.config.settings import SIM_INSTRUCTIONS

    if sim is None or getattr(policy_config, "instruction", None) != "":
        return policy_config
    return dataclasses.replace(policy_config, instruction=SIM_INSTRUCTIONS[sim.task])


def build_policy(run, **context):
    """Build the torch module of a run (imports its policy's modeling code).

    run: the run's settings (``RunSettings``, or the resolved run): model.policy names the
    policy, the rest is what it is built from. The keyword form ``build_policy(name,
    policy_config=..., task=..., ...)`` builds from loose settings objects (tests).
    """
    if isinstance(run, str):
        return _modeling(run).build(**context)
    return _modeling(run.model.policy).build(**_context(run))


def build_processor(run, **context):
    """The policy's data-side processor (e.g. the VLA's tokenizer), or None if it has none.

    Built before the datasets: ``build_datasets(..., language=processor)``. ``run`` as in
    ``build_policy``.
    """
    name, context = (run, context) if isinstance(run, str) else (run.model.policy, _context(run))
    fn = getattr(_modeling(name), "build_processor", None)
    return fn(**context) if fn is not None else None
