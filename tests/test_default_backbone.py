"""The default VLA backbone ships inside the package ('ilstudio:vla_tiny'): what it holds, that
the wheel carries it, and what it refuses. The card command's run on it is
tests/test_cli.py::test_headline_command_trains_lora_on_readme_synthetic_data."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
from conftest import REPO

from ilstudio.config.settings import (
    DatasetSettings,
    LoraSettings,
    ModelSettings,
    QuantizationSettings,
    TaskSettings,
)
from ilstudio.errors import UserError
from ilstudio.policies.vla import default_backbone
from ilstudio.policies.vla.configuration import VLAConfig
from ilstudio.policies.vla.layout import is_backbone_dir


def test_vla_gin_names_the_shipped_backbone_and_it_is_a_backbone_dir():
    assert f"model.model_name_or_path = '{default_backbone.BUILTIN}'" in \
        (REPO / "gin_configs" / "vla.gin").read_text()
    assert is_backbone_dir(default_backbone.BUILTIN)
    assert not is_backbone_dir("vla_tiny")  # only the exact name resolves, never a near miss


def test_shipped_files_are_what_make_tiny_writes(tmp_path):
    """No drift: the shipped configs and tokenizer equal make_tiny's defaults (regenerate them
    with `python -m ilstudio.policies.vla.default_backbone` after changing those)."""
    default_backbone.write_files(tmp_path)
    for rel in default_backbone.FILES:
        assert default_backbone.comparable(default_backbone.HOME / rel) == \
            default_backbone.comparable(tmp_path / rel), rel
    shipped = {p.relative_to(default_backbone.HOME).as_posix()
               for p in default_backbone.HOME.rglob("*") if p.is_file()}
    assert shipped == set(default_backbone.FILES)


def test_the_wheel_declares_every_shipped_file():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["ilstudio"]
    package = REPO / "ilstudio"
    for rel in default_backbone.FILES:
        path = (default_backbone.HOME / rel).relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(path, g) for g in globs), path


@pytest.mark.parametrize("switch", [{"is_pretrained": True}, {"load_pretrain": True}])
def test_pretrained_weights_from_the_shipped_backbone_are_refused(switch, tmp_path):
    task = TaskSettings(dataset_dir=str(tmp_path), camera_names=("top",))
    model = ModelSettings(policy="vla", model_name_or_path=default_backbone.BUILTIN, **switch)
    with pytest.raises(UserError, match="ships configs and a tokenizer only") as e:
        VLAConfig().validate(task=task, dataset=DatasetSettings(), model=model, lora=LoraSettings(),
                             quantization=QuantizationSettings(), source_of=lambda k: "test.gin")
    assert "make_tiny DIR" in str(e.value)


def test_the_shipped_backbone_builds_a_policy_with_its_tokenizer():
    from ilstudio.policies.vla.modeling import backbone_name, load_tokenizer

    model = ModelSettings(policy="vla", model_name_or_path=default_backbone.BUILTIN)
    assert Path(backbone_name(model)) == default_backbone.HOME
    tok = load_tokenizer(model)
    assert tok.pad_token == "<pad>" and len(tok("pick up the cube")["input_ids"]) > 0
