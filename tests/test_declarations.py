"""Every parameter the seed documents is declared here, once, and the docs come from that."""

from __future__ import annotations

import re
from collections import Counter

from conftest import FIXTURES, REPO, SHARED, needs_shared

from ilstudio.config.declare import CONFIGURABLES, all_params
from ilstudio.config.hyperparams import HYPER_BY_NAME
from ilstudio.config.yaml_adapter import stable_keys
from ilstudio.tools import docs

SEED_DIR = SHARED / "seed"


def documented(section: str) -> set[str]:
    """Names listed under [section] in tests/fixtures/documented_parameters.txt."""
    names, current = {}, None
    for line in (FIXTURES / "documented_parameters.txt").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif line and not line.startswith("#"):
            names.setdefault(current, set()).add(line)
    return names[section]


def seed_keys(heading: str, next_heading: str) -> set[str]:
    text = next(SEED_DIR.glob("000_*.txt")).read_text()
    section = text[text.index(heading):text.index(next_heading)]
    keys = set()
    for line in section.splitlines():
        if line.startswith("- `"):
            keys.update(re.findall(r"`([a-z0-9_]+)`", line.split(":")[0]))
    return keys


def test_documented_hyperparameters_are_flags():
    keys = documented("hyperparameters")
    assert len(keys) == 28, sorted(keys)
    assert keys <= set(HYPER_BY_NAME), keys - set(HYPER_BY_NAME)
    assert keys == {n for n, h in HYPER_BY_NAME.items() if h.seed_documented}


def test_documented_stable_parameters_are_declared_once():
    keys = documented("stable")
    assert len(keys) == 33, sorted(keys)
    declared = [p.yaml_key for p in all_params() if p.yaml_key]
    assert keys == set(declared), keys ^ set(declared)
    # Exactly one configurable per parameter: no YAML key maps to two places.
    assert not [k for k, n in Counter(declared).items() if n > 1]
    # And each lands on one of the four stable configurables.
    assert {stable_keys()[k].configurable for k in keys} == {"dataset", "model", "lora", "quantization"}


@needs_shared(SEED_DIR)
def test_our_parameter_list_matches_the_seed_readme():
    """tests/fixtures/documented_parameters.txt lists exactly what the seed README documents."""
    assert seed_keys("### Command-line Suitable Parameters", "### Stable Process Parameters") \
        == documented("hyperparameters")
    assert seed_keys("### Stable Process Parameters", "## Creating Custom Configurations") \
        == documented("stable")


def test_no_stable_parameter_shadows_a_flag():
    gin_names = {p.name for p in all_params()} | set(CONFIGURABLES)
    assert not gin_names & set(HYPER_BY_NAME)


def test_readme_tables_are_generated_from_declarations():
    readme = (REPO / "README.md").read_text()
    assert docs.generated_block() in readme, (
        "README parameter tables are stale: run python -m ilstudio.tools.docs --write README.md")


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


def test_masked_l1_counts_only_real_steps():
    """The one action loss: padded steps are left out, dims averaged, all-padding gives 0."""
    import torch

    from ilstudio.policies.losses import masked_l1

    pred = torch.zeros(2, 3, 2)
    target = torch.tensor([[[1.0, 3.0], [2.0, 2.0], [100.0, 100.0]],
                           [[4.0, 0.0], [50.0, 50.0], [60.0, 60.0]]])
    is_pad = torch.tensor([[False, False, True], [False, True, True]])
    assert masked_l1(pred, target, is_pad).item() == (2 + 2 + 2) / 3
    assert masked_l1(pred, target).item() == target.mean().item()
    assert masked_l1(pred, target, torch.ones(2, 3, dtype=torch.bool)).item() == 0.0


def test_every_policy_uses_the_one_masked_l1():
    """No policy writes its own L1: a fix to the loss must reach all of them."""
    policies = REPO / "ilstudio" / "policies"
    for module in sorted(policies.rglob("*.py")):
        if module.name in ("losses.py", "sensitivity.py"):  # the loss; a measurement, not a loss
            continue
        text = module.read_text()
        assert not re.search(r"\.abs\(\)", text), f"{module.relative_to(policies)} computes its own L1"
