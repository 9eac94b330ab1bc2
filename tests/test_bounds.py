"""Declared ranges: every numeric parameter has one, and validation enforces it at the edges.

The property test draws, for every declared numeric parameter (hyperparameter flags, stable
gin parameters, policy and simulator parameters), values at each finite bound and just beyond
it (one integer step, or the next representable float), plus far-out values (negative, 10**30,
2**63), and resolves a real command line with it, as ``--dry_run`` does. A value outside the
bounds must be refused with a UserError naming the key and the allowed range; a value inside
must never be refused as out of range. A real ``train.py`` run then trains with many
parameters at their extreme allowed values, so "allowed" means "trains".
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import run_train, tiny_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ilstudio.config import settings as _sim  # noqa: F401  (registers sim.*)
from ilstudio.config.bounds import Bounds
from ilstudio.config.declare import all_params
from ilstudio.config.hyperparams import HYPERPARAMS
from ilstudio.errors import UserError
from ilstudio.policies import import_all_configurations
from ilstudio.resolve import resolve_argv

import_all_configurations()
REPO = Path(__file__).resolve().parents[1]
NUMERIC = (int, float)


def _numeric(tp) -> type | None:
    """int/float for a numeric declaration (also Optional and tuple-of), else None."""
    import typing

    for a in (tp, *typing.get_args(tp)):
        if a in NUMERIC:
            return a
        for b in typing.get_args(a):
            if b in NUMERIC:
                return b
    return None


STABLE = [p for p in all_params() if _numeric(p.type)]
HYPER = [h for h in HYPERPARAMS if h.type in NUMERIC]


def test_every_numeric_parameter_declares_its_range():
    missing = [p.gin_key for p in STABLE if p.bounds is None and p.choices is None]
    missing += [f"--{h.name}" for h in HYPER if h.bounds is None and h.choices is None]
    assert not missing, f"numeric parameters without declared bounds: {missing}"
    assert len(STABLE) >= 35 and len(HYPER) >= 18  # the walk really sees the declarations


def test_bounds_notation():
    b = Bounds.parse("-1 or [1, inf)")
    assert -1 in b and 1 in b and 10**30 in b and 0 not in b and -2 not in b
    b = Bounds.parse("[0, 1)")
    assert 0 in b and 0.999 in b and 1 not in b and -1e-300 not in b and math.nan not in b
    b = Bounds.parse("(0, 1e6]")
    assert 0 not in b and 1e6 in b and math.nextafter(1e6, math.inf) not in b
    assert Bounds.parse("[0, 9]").edges() == [0, 9]


def _probes(bounds: Bounds, tp: type) -> list:
    """Values at and just beyond each finite edge, and far outside."""
    out = []
    for e in bounds.edges():
        if tp is int:
            out += [int(e) - 1, int(e), int(e) + 1]
        else:
            out += [math.nextafter(e, -math.inf), e, math.nextafter(e, math.inf)]
    far = [-(10**30), -1, 0, 10**30, 2**63] if tp is int else [-1e30, -1.0, 0.0, 1e30]
    return out + far


def _policy_args(key: str) -> list[str]:
    if key.startswith("act."):
        return ["--gin_file=gin_configs/act.gin"]
    if key.startswith("vla."):
        return ["--gin_file=gin_configs/vla.gin"]
    if key.startswith("tinyact."):
        return ["--gin_file=gin_configs/tinyact.gin"]
    if key.startswith("sim."):  # sim.* is built (and checked) for a task with a simulator
        return ["--gin_bindings=sim.task = 'transfer_cube'"]
    return []


def _literal(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


CASES = ([("stable", p.gin_key, _numeric(p.type), p.bounds, p) for p in STABLE if p.bounds]
         + [("hyper", h.name, h.type, h.allowed, h) for h in HYPER])


@st.composite
def probe(draw):
    kind, key, tp, bounds, decl = draw(st.sampled_from(CASES))
    value = draw(st.sampled_from(_probes(bounds, tp)))
    return kind, key, tp, bounds, decl, value


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=probe())
def test_values_at_and_beyond_each_bound(tiny_data, case):
    kind, key, tp, bounds, decl, value = case
    argv = tiny_args(tiny_data, Path("/nonexistent/out"))
    if kind == "stable":
        length = decl.length or 0
        literal = (f"({', '.join([_literal(value)] * length)})" if length else
                   f"({_literal(value)},)" if "tuple" in str(decl.type) else _literal(value))
        argv += [*_policy_args(key), f"--gin_bindings={key} = {literal}"]
        if key.startswith("vla."):
            argv += ["--gin_bindings=model.model_name_or_path = 'unused_dir'"]
    else:
        argv = [a for a in argv if not a.startswith(f"--{key}=")] + [f"--{key}={_literal(value)}"]
    inside = value in bounds and (tp is float or -(2**63) <= value < 2**63)
    try:
        resolve_argv(argv)
    except UserError as e:
        msg = str(e)
        if inside:
            assert "out of range" not in msg and "64-bit" not in msg, (key, value, msg)
        else:
            assert key in msg and bounds.text in msg or key in msg and "64-bit" in msg, (key, value, msg)
        return
    assert inside, f"{key} = {value!r} is outside {bounds.text} but was accepted"


EDGES = ["--per_device_train_batch_size=1", "--learning_rate=0", "--weight_decay=0",
         "--adam_beta1=0", "--adam_beta2=0.999999", "--adam_epsilon=1e-30",
         "--dataloader_num_workers=0", "--gradient_accumulation_steps=1", "--max_grad_norm=0",
         "--seed=4294967295", "--logging_steps=1", "--save_steps=0.5", "--save_total_limit=1",
         "--warmup_ratio=0.99", "--max_steps=2",
         "--gin_bindings=mlp.dropout = 0.999", "--gin_bindings=mlp.num_layers = 0",
         "--gin_bindings=mlp.image_feature_dim = 1", "--gin_bindings=model.chunk_size = 1",
         "--gin_bindings=model.using_ema = True", "--gin_bindings=model.ema_decay = 0.0",
         "--gin_bindings=dataset.image_size = (1, 1)"]


def test_extreme_allowed_values_really_train(tiny_data, tmp_path):
    """Allowed at the edge means it trains: no crash inside torch with these values."""
    out = tmp_path / "edges"
    r = run_train(*tiny_args(tiny_data, out, *EDGES), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("flag,named", [
    ("--per_device_train_batch_size=0", "--per_device_train_batch_size: 0 is out of range; allowed: [1, inf)"),
    ("--learning_rate=-0.001", "--learning_rate: -0.001 is out of range; allowed: [0, inf)"),
    ("--adam_beta1=1.5", "--adam_beta1: 1.5 is out of range; allowed: [0, 1)"),
    ("--dataloader_num_workers=-1", "allowed: [0, inf)"),
    ("--gradient_accumulation_steps=0", "--gradient_accumulation_steps: 0 is out of range"),
    ("--gin_bindings=mlp.hidden_dim = -1", "mlp.hidden_dim (set in --gin_bindings"),
    ("--gin_bindings=mlp.dropout = 1.5", "1.5 is out of range; allowed: [0, 1)"),
    ("--seed=" + str(10**30), "--seed: 1000000000000000000000000000000 does not fit a 64-bit"),
])
def test_issue_examples_exit_2_from_dry_run_naming_key_and_range(tiny_data, tmp_path, flag, named):
    out = tmp_path / "out"
    r = run_train(*tiny_args(tiny_data, out, flag, "--dry_run"), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert named in r.stderr, r.stderr[-2000:]
    assert not out.exists()


def test_yaml_seed_beyond_range(tiny_data, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"seed: {10**30}\n")
    with pytest.raises(UserError, match=r"c.yaml:1: seed: .* does not fit a 64-bit integer"):
        resolve_argv([*tiny_args(tiny_data, tmp_path / "o"), f"--training_config={cfg}"])
    cfg.write_text("learning_rate: 1e-3\nseed: 4294967296\n")
    with pytest.raises(UserError, match=r"c.yaml:2: seed: 4294967296 is out of range; "
                                        r"allowed: \[0, 4294967295\]"):
        resolve_argv([*tiny_args(tiny_data, tmp_path / "o"), f"--training_config={cfg}"])
    cfg.write_text("lora_dropout: 1.0\n")
    with pytest.raises(UserError, match=r"c.yaml:1: lora_dropout: 1.0 is out of range; "
                                        r"allowed: \[0, 1\)"):
        resolve_argv([*tiny_args(tiny_data, tmp_path / "o"), f"--training_config={cfg}"])


@pytest.mark.parametrize("binding", ["sim.gzip_level = 11", "act.hidden_dim = -1",
                                     "vla.max_prompt_tokens = 0"])
def test_out_of_range_is_refused_even_where_this_run_does_not_use_it(tiny_data, tmp_path, binding):
    """Found by bench/hostile.py: sim.* on a task without a simulator (or another policy's
    parameter) was only warned about as unused, out of range or not."""
    with pytest.raises(UserError, match="is out of range; allowed"):
        resolve_argv([*tiny_args(tiny_data, tmp_path / "o"), f"--gin_bindings={binding}"])
