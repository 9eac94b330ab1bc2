"""Files a run writes (flags.txt, config.gin, operative_config.gin) and yaml_to_gin's .flags
and .gin read back as the values written, and nothing else: drawn strings, written by our
writers, read by absl's real flagfile parser and gin's real parser.

A value no flagfile line can hold (a line break, trailing whitespace) is refused at the
boundary with exit code 2 before anything is written: the regression test is the exploit of
issue 18, a YAML string that smuggled a ``--gin_file=`` line into flags.txt.
"""

from __future__ import annotations

import json
from pathlib import Path

import gin
from absl import flags
from conftest import REPO, run_train, tiny_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ilstudio.config import dumps
from ilstudio.config.hyperparams import define_flags
from ilstudio.errors import UserError
from ilstudio.resolve import resolve_argv
from ilstudio.tools.diff import parse_flag_lines
from ilstudio.tools.yaml_to_gin import gin_literal

# Line breaks of every kind, quotes, backslashes, '--' and '#' at a line start, unicode.
TRICKY = st.sampled_from(["\n", "\r", "\r\n", "\u2028", "\x85", "\x0b", "\x0c", "'", '"', "\\",
                          "--", "#", "//", "--gin_file=x.gin", " ", "\t", "é", "\U0001f600",
                          "\x00", "=", "${x}", "%macro", "@ref"])
TEXT = st.lists(st.one_of(TRICKY, st.text(max_size=6)), max_size=6).map("".join)
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _absl_reads(tmp_path: Path, text: str) -> flags.FlagValues:
    """Parse a flagfile holding ``text`` the way ``train.py --flagfile=...`` does."""
    path = tmp_path / "flags.txt"
    path.write_text(text, encoding="utf-8")
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["train.py", f"--flagfile={path}"])
    return fv


@FAST
@given(value=TEXT)
def test_a_flag_line_reads_back_as_its_value_or_is_refused(tmp_path, value):
    try:
        line = dumps.flag_line("logging_dir", value)
    except UserError as e:
        assert dumps.unrepresentable(value) is not None and "logging_dir" in str(e)
        return
    fv = _absl_reads(tmp_path, "# header\n" + line + "\n--max_steps=3\n")
    assert fv["logging_dir"].value == value
    assert fv["max_steps"].value == 3 and not fv["gin_file"].present  # and nothing else
    assert parse_flag_lines(line + "\n")["logging_dir"] == value  # resume/diff read it the same


@FAST
@given(value=TEXT)
def test_comment_values_never_start_a_line(value):
    line = f"# Original --gin_bindings: {dumps.comment([value])}"
    assert len(line.splitlines()) == 1 and line.isascii()


@gin.configurable
def roundtrip_probe(value=None):
    return value


@FAST
@given(value=TEXT)
def test_gin_dumps_read_back_as_the_value(value):
    """yaml_to_gin's literal and gin's own config.gin / operative_config.gin dumps."""
    gin.clear_config()
    try:
        gin.parse_config(f"roundtrip_probe.value = {gin_literal(value)}")
        assert gin.query_parameter("roundtrip_probe.value") == value
        assert roundtrip_probe() == value
        for text in (gin.config_str(), gin.operative_config_str()):
            gin.clear_config()
            gin.parse_config(text)
            assert gin.query_parameter("roundtrip_probe.value") == value
            assert roundtrip_probe() == value
    finally:
        gin.clear_config()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=TEXT)
def test_flags_txt_of_a_resolved_yaml_reads_back(tmp_path, tiny_data, value):
    """A YAML string value through resolve and flagfile_text: the same value, no extra flag."""
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"logging_dir: {json.dumps(value)}\n", encoding="utf-8")
    argv = ["--task_name=tiny_synthetic", f"--gin_bindings=task.dataset_dir = '{tiny_data}'",
            "--gin_file=gin_configs/mlp.gin", f"--training_config={yaml}",
            f"--output_dir={tmp_path / 'out'}"]
    try:
        resolved = resolve_argv(argv)
    except UserError:
        return  # refused by the YAML boundary (e.g. an empty path): also fine
    try:
        text = dumps.flagfile_text(resolved, tmp_path / "out" / "config.gin")
    except UserError as e:
        # (YAML's "\\ud800\\udc00" is two lone surrogates, not one character)
        assert dumps.unrepresentable(resolved.hyper.logging_dir) is not None
        assert "c.yaml" in str(e)
        return
    fv = _absl_reads(tmp_path, text)
    assert fv["logging_dir"].value == resolved.hyper.logging_dir
    assert fv["gin_file"].value == [str((tmp_path / "out" / "config.gin").resolve())]


EXPLOIT = 'logging_dir: "tb\\n--gin_file=x.gin"\n'


def test_yaml_newline_exploit_is_refused_by_train_before_writing(tiny_data, tmp_path):
    (tmp_path / "x.gin").write_text("import os\n")
    yaml = tmp_path / "evil.yaml"
    yaml.write_text(EXPLOIT)
    out = tmp_path / "out"
    r = run_train(*tiny_args(tiny_data, out, f"--training_config={yaml}", "--max_steps=1"),
                  cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "logging_dir" in r.stderr and "line break" in r.stderr and "evil.yaml" in r.stderr
    assert not out.exists()


def test_yaml_newline_exploit_is_refused_by_yaml_to_gin(tmp_path):
    import subprocess
    import sys

    yaml = tmp_path / "evil.yaml"
    yaml.write_text(EXPLOIT)
    r = subprocess.run([sys.executable, "-m", "ilstudio.tools.yaml_to_gin", str(yaml),
                        "--output", str(tmp_path / "o.gin")], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 2 and "line break" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.gin").exists() and not (tmp_path / "o.flags").exists()


def test_yaml_path_with_a_newline_stays_a_comment_in_yaml_to_gin_output(tmp_path):
    from ilstudio.tools.yaml_to_gin import convert

    d = tmp_path / "a\n--gin_file=x.gin\nb"
    d.mkdir()
    (d / "c.yaml").write_text("learning_rate: 0.001\n")
    gin_text, flag_text = convert(str(d / "c.yaml"))
    assert [ln for ln in flag_text.splitlines() if not ln.startswith("#")] == ["--learning_rate=0.001"]
    assert all(ln.startswith("#") or not ln for ln in gin_text.splitlines())
