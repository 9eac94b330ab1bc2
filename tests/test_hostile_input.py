"""Hostile and broken input thrown at the configuration layer (property-based, hypothesis).

Generated YAML documents (real keys, near-misses, junk keys; values of wrong types, nested
structures, huge numbers, NaN/inf, unicode, gin/Python injection attempts), gin binding
strings and flag values go through what ``train.py --dry_run`` runs: flag parsing,
``resolve``, ``build_training_arguments`` and the data header checks. Each input must either
work or fail with a UserError whose message names the offending key/binding/flag. Any other
exception is a bug in ilstudio. A sample is confirmed through real ``train.py --dry_run``
subprocesses: exit code 0 or 2, no traceback, nothing written to output_dir.

Run with ``-s`` to see how many inputs ran and the distinct error messages.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import gin
import pytest
import yaml
from conftest import run_train
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ilstudio.config.hyperparams import HYPERPARAMS
from ilstudio.config.training_args import build_training_arguments
from ilstudio.config.yaml_adapter import load_training_config, stable_keys
from ilstudio.errors import UserError
from ilstudio.resolve import resolve_argv

STATS: Counter = Counter()
MESSAGES: Counter = Counter()

REAL_YAML_KEYS = sorted(stable_keys()) + [h.name for h in HYPERPARAMS] + [
    "task_name", "evaluation_strategy", "dataloader_drop_last", "lr_scheduler_kwargs"]
GIN_KEYS = ["lora.r", "lora.module", "model.chunk_size", "mlp.hidden_dim", "task.state_dim",
            "task.camera_names", "dataset.preload_data", "quantization.bits", "model.policy"]
INJECTIONS = [
    "'\nimport os\nlora.r = 7", '"\nlora.r = 7\n"', "@lora()", "%MACRO", "import os",
    "include '/etc/passwd'", "x'); import os; ('", "__import__('os').system('true')",
    "lora.r = 7", "!!python/object/apply:os.system ['true']", "${HOME}", "\x00", "\u202e",
]


def near_miss(key: str) -> st.SearchStrategy[str]:
    def mutate(data):
        i, op = data
        i %= max(len(key), 1)
        if op == 0:
            return key[:i] + key[i + 1:]
        if op == 1:
            return key[:i] + "x" + key[i:]
        if op == 2:
            return key.upper()
        return key.replace("_", "-")
    return st.tuples(st.integers(0, 50), st.integers(0, 3)).map(mutate)


keys = st.one_of(
    st.sampled_from(REAL_YAML_KEYS),
    st.sampled_from(REAL_YAML_KEYS).flatmap(near_miss),
    st.text(min_size=1, max_size=20),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63, max_value=2**300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e999", "-1e-999", "sixteen", "16", "0x10",
                     "true", "yes", "", " ", "None", *INJECTIONS]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6)
documents = st.dictionaries(keys, values, min_size=1, max_size=5)
raw_yaml = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["- a\n- b\n", "a: [1\n", "a: 1\na: 2\n", "? [1, 2]\n: x\n", "[1, 2]: x\n",
                     "{a: 1}: 2\n", "lora_r: !!python/object/apply:os.system ['true']\n",
                     "lora_r: 1" + "0" * 5000 + "\n", "&a [*a]\n", "learning_rate: .nan\n",
                     "learning_rate: .inf\n", "lora_r: &x 3\nlora_alpha: *x\n", "\ufeffseed: 1\n",
                     "seed: 1\n\x00\n", "!!binary aGk=: 1\n", "? !!null\n: 1\n"]),
)
binding_texts = st.one_of(
    st.tuples(st.one_of(st.sampled_from(GIN_KEYS), st.sampled_from(GIN_KEYS).flatmap(near_miss),
                        st.text(max_size=15)),
              st.one_of(st.sampled_from(["16", "'x'", "None", "[1, 2]", "(", "@lora", "@nope()",
                                         "%UNDEFINED", "1e999", "nan", "'''", "{", "True"]),
                        st.text(max_size=15)))
    .map(lambda kv: f"{kv[0]} = {kv[1]}"),
    st.text(max_size=40),
)
flag_names = st.one_of(st.sampled_from([h.name for h in HYPERPARAMS]),
                       st.sampled_from([h.name for h in HYPERPARAMS]).flatmap(near_miss),
                       st.sampled_from(["task_name", "gin_file", "training_arg", "yaml_unknown_keys",
                                        "gin_search_paths"]))
flag_values = st.one_of(scalars.map(lambda v: "" if v is None else str(v)), st.text(max_size=20))


def base_args(data: Path, out: Path) -> list[str]:
    return ["--task_name=tiny_synthetic", f"--gin_bindings=task.dataset_dir = '{data}'",
            f"--output_dir={out}", "--gin_file=gin_configs/mlp.gin"]


def offending_names(yaml_doc=None, bindings=(), flags=()) -> list[str]:
    names = []
    if isinstance(yaml_doc, dict):
        names += [str(k) for k in yaml_doc]
    for b in bindings:
        names.append(b.strip())
        names += [t for t in re.split(r"[\s=]+", b) if t]
    for f in flags:
        names.append(f.split("=", 1)[0].lstrip("-"))
    names += [repr(n)[1:-1] for n in names]  # messages quote values with repr()
    return [n for n in names if n.strip()]


def normalize(msg: str, tmp: Path) -> str:
    return msg.replace(str(tmp), "<tmp>")


def drive(tmp: Path, data: Path, *, yaml_text: str | None = None, yaml_doc=None,
          bindings=(), flags=()) -> str | None:
    """Run the dry-run path in-process; return the UserError message or None if it worked."""
    out = tmp / "out"
    argv = base_args(data, out)
    if yaml_text is not None:
        (tmp / "c.yaml").write_bytes(yaml_text.encode("utf-8", "surrogatepass"))
        argv.append(f"--training_config={tmp / 'c.yaml'}")
    argv += [f"--gin_bindings={b}" for b in bindings] + list(flags)
    STATS["inputs"] += 1
    try:
        resolved = resolve_argv(argv)
        build_training_arguments(resolved.hyper, resolved.training_args_extra)
        from ilstudio.plan import check_data

        check_data(resolved)
    except UserError as e:
        msg = str(e)
        STATS["refused"] += 1
        MESSAGES[normalize(msg, tmp)] += 1
        assert msg.strip(), "empty error message"
        assert "Traceback" not in msg
        names = offending_names(yaml_doc, bindings, flags)
        if yaml_text is not None:
            names.append(str(tmp / "c.yaml"))
        assert any(n in msg for n in names) or not names, (
            f"message names none of {names!r}:\n{msg}")
        assert not out.exists(), "the config layer wrote to output_dir"
        return msg
    STATS["accepted"] += 1
    assert not out.exists()
    return None


SETTINGS = settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "50")), deadline=None, derandomize=os.environ.get("HOSTILE_RANDOM") is None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    print(f"\nhostile inputs: {STATS['inputs']} ran, {STATS['accepted']} accepted, "
          f"{STATS['refused']} refused with UserError, {len(MESSAGES)} distinct error messages, "
          f"{STATS['subprocess']} confirmed through train.py --dry_run subprocesses")
    kinds = Counter(re.sub(r"[0-9]+", "N", m.splitlines()[0])[:110] for m in MESSAGES)
    print(f"distinct first lines (numbers folded): {len(kinds)}")
    for line, n in kinds.most_common():
        print(f"  {n:4d} x {line}")


@SETTINGS
@given(doc=documents)
def test_generated_yaml_documents(tmp_path_factory, tiny_data, doc):
    tmp = tmp_path_factory.mktemp("y")
    text = yaml.safe_dump(doc, allow_unicode=True)
    drive(tmp, tiny_data, yaml_text=text, yaml_doc=doc)


@SETTINGS
@given(text=raw_yaml)
def test_raw_yaml_text(tmp_path_factory, tiny_data, text):
    drive(tmp_path_factory.mktemp("r"), tiny_data, yaml_text=text)


@SETTINGS
@given(bindings=st.lists(binding_texts, min_size=1, max_size=3))
def test_generated_gin_bindings(tmp_path_factory, tiny_data, bindings):
    drive(tmp_path_factory.mktemp("b"), tiny_data, bindings=bindings)


@SETTINGS
@given(flags=st.lists(st.tuples(flag_names, flag_values).map(lambda nv: f"--{nv[0]}={nv[1]}"),
                      min_size=1, max_size=3))
def test_generated_flag_values(tmp_path_factory, tiny_data, flags):
    drive(tmp_path_factory.mktemp("f"), tiny_data, flags=flags)


@pytest.mark.parametrize("value", INJECTIONS)
def test_yaml_strings_are_data_never_gin_or_python(tmp_path, value):
    """A YAML string lands as that exact string; nothing it contains is parsed or run."""
    from ilstudio.config import settings as S
    from ilstudio.config.gin_layers import GinLayers, SearchPath

    marker = tmp_path / "ran"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lora_module": value + f"\nimport os; open('{marker}','w')",
                                    "lora_task_type": value}))
    cfg = load_training_config(path)
    layers = GinLayers(SearchPath([]))
    for key, v in cfg.stable.items():
        layers.bind_value(key, v, cfg.source[key])
    lora = S.LoraSettings()
    assert lora.module == value + f"\nimport os; open('{marker}','w')"
    assert lora.task_type == value
    assert lora.r == 64 and lora.alpha == 256  # "lora.r = 7" inside the string bound nothing
    assert not marker.exists()
    gin.config.clear_config()


def test_yaml_python_tags_are_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "c.yaml"
    path.write_text(f"lora_r: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError, match=str(path)):
        load_training_config(path)
    assert not marker.exists()


def test_the_injection_reaches_the_run_only_as_a_literal(tmp_path, tiny_data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lora_enable": True, "lora_module": "'\nimport os\nlora.r = 7"}))
    with pytest.raises(UserError) as e:
        resolve_argv([*base_args(tiny_data, tmp_path / "out"), f"--training_config={path}"])
    # The MLP has no LoRA: the value is refused, quoted as the literal string it is.
    assert "lora.module = \"'\\nimport os\\nlora.r = 7\"" in str(e.value)
    assert "lora.r" not in str(e.value).replace("lora.r = 7", "")


SUBPROCESS_SAMPLE = [
    ("yaml", "lora_r: sixteen\nlearing_rate: 1e-4\nseed: .nan\n"),
    ("yaml", "lora_module: \"'\\nimport os\\nlora.r = 7\"\nper_device_train_batch_size: '4'\n"),
    ("yaml", "[1, 2]: x\n"),
    ("yaml", "lora_r: 1" + "0" * 5000 + "\n"),
    ("bindings", "lora.rr = 16"),
    ("bindings", "model.chunk_size = 'x'\nimport os"),
    ("flags", "--learning_rate=nan"),
    ("flags", "--save_steps=-1e999"),
]


def test_sample_through_real_train_py_dry_run(tmp_path, tiny_data):
    for i, (kind, payload) in enumerate(SUBPROCESS_SAMPLE):
        out = tmp_path / f"out{i}"
        args = [*base_args(tiny_data, out), "--dry_run"]
        if kind == "yaml":
            (tmp_path / f"c{i}.yaml").write_text(payload)
            args.append(f"--training_config={tmp_path / f'c{i}.yaml'}")
        elif kind == "bindings":
            args.append(f"--gin_bindings={payload}")
        else:
            args.append(payload)
        r = run_train(*args, timeout=120)
        STATS["subprocess"] += 1
        assert r.returncode in (0, 2), (payload, r.returncode, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, (payload, r.stderr[-3000:])
        assert not out.exists(), payload
        if r.returncode == 2:
            err = r.stderr.split("error: ", 1)[-1]
            assert err.strip()
            MESSAGES[normalize(err.strip(), tmp_path)] += 1



# Inputs that crashed the configuration layer with a traceback before it was fixed (found by
# the generators above), kept as fixed regression cases: (kind, input, text the message names).
FOUND_CRASHES = [
    ("yaml", "lora_r: 1" + "0" * 5000 + "\n", "c.yaml"),
    ("bindings", "model.policy = 16", "model.policy"),
    ("bindings", "model.policy = [1, 2]", "model.policy"),
    ("bindings", "lora.r = %UNDEFINED", "%UNDEFINED"),
    ("flags", "--lr_scheduler_type=", "--lr_scheduler_type"),
    ("flags", "--learning_rate=nan", "--learning_rate"),
    ("yaml", "learning_rate: .inf\n", "learning_rate"),
]


@pytest.mark.parametrize("kind,payload,named", FOUND_CRASHES, ids=[c[1][:24] for c in FOUND_CRASHES])
def test_former_crashes_are_user_errors(tmp_path, tiny_data, kind, payload, named):
    if kind == "yaml":
        msg = drive(tmp_path, tiny_data, yaml_text=payload)
    elif kind == "bindings":
        msg = drive(tmp_path, tiny_data, bindings=[payload])
    else:
        msg = drive(tmp_path, tiny_data, flags=[payload])
    assert msg is not None and named in msg


def test_a_training_arg_transformers_refuses_is_named_as_given(tmp_path, tiny_data):
    """--training_arg=debug=/tmp/x was reported as '--debug=/tmp/x', a flag that does not
    exist (found by bench/hostile.py at --cases 60)."""
    msg = drive(tmp_path, tiny_data, flags=["--training_arg=debug=/tmp/x"])
    assert msg is not None and msg.startswith("--training_arg=debug=/tmp/x: "), msg
