"""Every parameter the seed documents is declared here, once, and the docs come from that."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from ilstudio.config import docs
from ilstudio.config.declare import CONFIGURABLES, all_params
from ilstudio.config.hyperparams import HYPER_BY_NAME
from ilstudio.config.yaml_adapter import stable_keys

REPO = Path(__file__).resolve().parents[1]
SEED = next((REPO.parent / "shared" / "seed").glob("000_*.txt"))


def seed_keys(heading: str, next_heading: str) -> set[str]:
    text = SEED.read_text()
    section = text[text.index(heading):text.index(next_heading)]
    keys = set()
    for line in section.splitlines():
        if line.startswith("- `"):
            keys.update(re.findall(r"`([a-z0-9_]+)`", line.split(":")[0]))
    return keys


def test_seed_hyperparameters_are_flags():
    keys = seed_keys("### Command-line Suitable Parameters", "### Stable Process Parameters")
    assert len(keys) == 28, sorted(keys)
    assert keys <= set(HYPER_BY_NAME), keys - set(HYPER_BY_NAME)


def test_seed_stable_parameters_are_declared_once():
    keys = seed_keys("### Stable Process Parameters", "## Creating Custom Configurations")
    assert len(keys) == 33, sorted(keys)
    declared = [p.yaml_key for p in all_params() if p.yaml_key]
    assert keys == set(declared), keys ^ set(declared)
    # Exactly one configurable per parameter: no YAML key maps to two places.
    assert not [k for k, n in Counter(declared).items() if n > 1]
    # And each lands on one of the four stable configurables.
    assert {stable_keys()[k].configurable for k in keys} == {"dataset", "model", "lora", "quantization"}


def test_no_stable_parameter_shadows_a_flag():
    gin_names = {p.name for p in all_params()} | set(CONFIGURABLES)
    assert not gin_names & set(HYPER_BY_NAME)


def test_readme_tables_are_generated_from_declarations():
    readme = (REPO / "README.md").read_text()
    assert docs.generated_block() in readme, (
        "README parameter tables are stale: run python -m ilstudio.config.docs --write README.md")


def test_every_flag_documented_with_default_in_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--helpfull"], capture_output=True,
                         text=True, timeout=60)
    text = out.stdout + out.stderr
    for name, h in HYPER_BY_NAME.items():
        marker = f"--[no]{name}:" if h.type is bool else f"--{name}:"
        block = text[text.index(marker):][:600]
        assert "(default:" in block, name
    assert "--gin_bindings" in text and "--training_config" in text
