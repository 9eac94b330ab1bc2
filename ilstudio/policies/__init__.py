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


def build_policy(name: str, **context):
    """Build the torch module for policy ``name`` (imports its modeling code)."""
    return importlib.import_module(_package(name, "model.policy") + ".modeling").build(**context)


def build_processor(name: str, **context):
    """The policy's data-side processor (e.g. the VLA's tokenizer), or None if it has none.

    Built before the datasets: ``build_datasets(..., language=processor)``.
    """
    modeling = importlib.import_module(_package(name, "model.policy") + ".modeling")
    fn = getattr(modeling, "build_processor", None)
    return fn(**context) if fn is not None else None
