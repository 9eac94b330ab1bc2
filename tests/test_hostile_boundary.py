"""Every program's boundary: what it does with Ctrl-C, with its own bugs, with files that are not
regular files, with a converter destination that would damage something, and the Python API's
arguments. Each ends in one line: exit 2 for a user mistake, 130 for Ctrl-C, 1 and "a bug in
ilstudio" (traceback kept in a file) for an unexpected exception.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_train, tiny_args, train_env

from ilstudio.errors import UserError, guarded, on_interrupt

PROGRAMS = ["train", "convert", "diff", "yaml_to_gin", "record"]


def _raise(exc: BaseException):
    def fn(*_a, **_k):
        raise exc
    return fn


def _run_program(name: str, monkeypatch, exc: BaseException, tmp_path: Path) -> int:
    """Run program ``name``'s real entry with its first real step raising ``exc``."""
    if name == "train":  # absl's app.run owns logging: a fresh interpreter, train.py's run_cli
        code = (f"from ilstudio import main\nfrom ilstudio.errors import UserError\n"
                f"def boom(argv): raise {exc!r}\n"
                f"main._main = boom\nmain.run_cli()")
        r = subprocess.run([sys.executable, "-c", code, "--dry_run"], env=train_env(),
                           capture_output=True, text=True, timeout=120)
        print(r.stderr, file=sys.stderr, end="")
        return r.returncode
    if name == "convert":
        from ilstudio.data import convert

        monkeypatch.setattr(convert, "convert", _raise(exc))
        return convert.main(["src", str(tmp_path / "dst"), "--to", "hdf5"])
    if name == "diff":
        from ilstudio.tools import diff

        monkeypatch.setattr(diff, "load", _raise(exc))
        return diff.main(["a", "b"])
    if name == "yaml_to_gin":
        from ilstudio.tools import yaml_to_gin

        monkeypatch.setattr(yaml_to_gin, "convert", _raise(exc))
        return yaml_to_gin.main(["x.yaml"])
    from ilstudio.sim import record

    monkeypatch.setattr(record, "_record", _raise(exc))
    return record.main([])


@pytest.mark.parametrize("program", PROGRAMS)
def test_ctrl_c_is_one_line_and_exit_130(program, monkeypatch, tmp_path, capsys):
    assert _run_program(program, monkeypatch, KeyboardInterrupt(), tmp_path) == 130
    err = capsys.readouterr().err.strip()
    assert err == "interrupted (Ctrl-C)", err


@pytest.mark.parametrize("program", PROGRAMS)
def test_an_unexpected_exception_is_reported_as_a_bug(program, monkeypatch, tmp_path, capsys):
    assert _run_program(program, monkeypatch, ZeroDivisionError("boom"), tmp_path) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "this is a bug in ilstudio" in err and "ZeroDivisionError" in err
    report = Path(err.split("the traceback is in ")[1].split(". Please")[0])
    assert "Traceback" in report.read_text() and "boom" in report.read_text()
    report.unlink()


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_user_error_is_one_line_and_exit_2(program, monkeypatch, tmp_path, capsys):
    assert _run_program(program, monkeypatch, UserError("bad key `x`"), tmp_path) == 2
    assert capsys.readouterr().err.strip() == "error: bad key `x`"


def test_a_program_adds_its_own_line_to_ctrl_c(capsys):
    remove = on_interrupt(lambda: "last checkpoint RUN/checkpoint-4; resume with ...")
    try:
        assert guarded(_raise(KeyboardInterrupt())) == 130
    finally:
        remove()
    assert capsys.readouterr().err.strip() == ("interrupted (Ctrl-C): last checkpoint "
                                               "RUN/checkpoint-4; resume with ...")
    assert guarded(_raise(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err.strip() == "interrupted (Ctrl-C)"


def test_a_real_sigint_ends_a_program_with_one_line(tmp_path):
    """The real signal path, in a fresh interpreter: SIGINT -> KeyboardInterrupt -> guarded."""
    code = ("import sys, time; from ilstudio.errors import guarded\n"
            "print('ready', flush=True); sys.exit(guarded(lambda: time.sleep(60)))")
    p = subprocess.Popen([sys.executable, "-c", code], env=train_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _out, err = p.communicate(timeout=30)
    assert p.returncode == 130 and err.strip() == "interrupted (Ctrl-C)", err


# -- only regular files -------------------------------------------------------------------------


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
@pytest.mark.parametrize("surface", ["--training_config", "--gin_file", "--flagfile"])
def test_a_fifo_or_device_as_a_config_is_refused_at_once(special, surface, fifo, tiny_data, tmp_path):
    import gin

    from ilstudio.cli import check_flagfiles
    from ilstudio.resolve import resolve_argv

    path = str(fifo) if special == "fifo" else special
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        if surface == "--flagfile":
            check_flagfiles([f"--flagfile={path}"])
        else:
            gin.clear_config()
            resolve_argv([*tiny_args(tiny_data, tmp_path / "o"), f"{surface}={path}"])
    assert time.monotonic() - start < 10
    assert path in str(e.value) or surface == "--gin_file" and "/dev/zero" in str(e.value)
    assert not (tmp_path / "o").exists()


def test_a_flagfile_naming_a_fifo_in_turn_is_refused(fifo, tmp_path):
    from ilstudio.cli import check_flagfiles

    outer = tmp_path / "outer.flags"
    outer.write_text(f"--seed=3\n--flagfile={fifo}\n")
    with pytest.raises(UserError, match="FIFO"):
        check_flagfiles(["--flagfile", str(outer)])
    outer.write_text(f"--flagfile={outer}\n")
    with pytest.raises(UserError, match="nest more than"):
        check_flagfiles([f"--flagfile={outer}"])


def test_train_py_with_dev_zero_as_flagfile_exits_2(tmp_path):
    r = run_train("--flagfile=/dev/zero", "--dry_run", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "/dev/zero: --flagfile is a character device" in r.stderr


def test_a_fifo_as_the_lock_file_is_refused_without_hanging(tmp_path):
    from ilstudio import rundir

    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / rundir.LOCK_FILE)
    with pytest.raises(UserError, match="cannot open the run lock .*: it is a FIFO"):
        rundir.check_not_in_use(out)
    with pytest.raises(UserError, match="not a regular file"):
        rundir.RunLock(out)


# -- the converter's destination ------------------------------------------------------------------


@pytest.fixture
def src(tmp_path) -> Path:
    from ilstudio.data.synthetic import write_synthetic_dataset

    d = tmp_path / "src"
    write_synthetic_dataset(d, num_episodes=1, episode_len=5)
    return d


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("case", ["inside src", "src itself", "parent is a file", "symlink",
                                  "a file", "not empty"])
def test_converter_destination_refused_before_anything_is_written(case, src, tmp_path, capsys):
    from ilstudio.data import convert

    dst = {"inside src": src / "converted", "src itself": src,
           "parent is a file": tmp_path / "notes.txt" / "out", "symlink": tmp_path / "link",
           "a file": tmp_path / "notes.txt", "not empty": tmp_path / "full"}[case]
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    (tmp_path / "empty").mkdir()
    os.symlink(tmp_path / "empty", tmp_path / "link")
    before = _listing(tmp_path)
    assert convert.main([str(src), str(dst), "--to", "hdf5", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: DST ") and "\n" not in err, err
    assert _listing(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_converter_read_only_parent(src, tmp_path, capsys):
    from ilstudio.data import convert

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert convert.main([str(src), str(ro / "out"), "--to", "hdf5"]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_yaml_to_gin_output_checked_before_writing(tmp_path, capsys):
    from ilstudio.tools import yaml_to_gin

    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 3\n")
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "x.gin", tmp_path / "missing" / "x.gin", tmp_path / "x.flags"):
        assert yaml_to_gin.main([str(cfg), "--output", str(out)]) == 2
        assert capsys.readouterr().err.startswith("error: --output=")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "file"]


# -- the Python API -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, fragment", [
    ({"learning_rate": "1e-3"}, "learning_rate is '1e-3' (str), expected a number"),
    ({"do_eval": "false"}, "do_eval is 'false' (str), expected True or False"),
    ({"learning_rate": None}, "learning_rate is None"),
    ({"max_steps": 2.5}, "max_steps is 2.5 (float), expected an integer"),
    ({"seed": True}, "seed is True (bool), expected an integer"),
    ({"learning_rate": float("nan")}, "learning_rate: nan is not a finite number"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
    ({"lerning_rate": 1e-3}, "no field 'lerning_rate' (did you mean `learning_rate`?)"),
])
def test_hyperarguments_checks_each_field(kwargs, fragment):
    from ilstudio.config import HyperArguments

    with pytest.raises(ValueError) as e:
        HyperArguments(**kwargs)
    assert isinstance(e.value, UserError) and fragment in str(e.value), str(e.value)
    h = HyperArguments()
    name, value = next(iter(kwargs.items()))
    if name != "lerning_rate":
        with pytest.raises(UserError, match=f"HyperArguments.{name}"):
            setattr(h, name, value)
    assert HyperArguments(learning_rate=1e-3, max_steps=5, do_eval=True).max_steps == 5


@pytest.mark.parametrize("program, args, fragment", [
    ("record", ["--seed=-1"], "--seed=-1"),
    ("record", ["--num_episodes=0"], "--num_episodes=0"),
    ("record", ["--max_attempts=0"], "--max_attempts=0"),
    ("quickstart", ["--max_steps=0"], "--max_steps=0"),
    ("quickstart", ["--eval_episodes=-2"], "--eval_episodes=-2"),
])
def test_record_and_quickstart_flags_have_ranges(program, args, fragment, tmp_path, capsys):
    from ilstudio.sim import quickstart, record

    main = record.main if program == "record" else quickstart.main
    assert main([*args, f"--output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_record_into_a_bad_lerobot_destination_is_refused_before_recording(tmp_path, capsys):
    from ilstudio.sim import record

    os.symlink(tmp_path, tmp_path / "link")
    assert record.main(["--format=lerobot", f"--output_dir={tmp_path / 'link'}",
                        "--num_episodes=1"]) == 2
    assert "is a symlink" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.hdf5-recording"))


@pytest.mark.parametrize("delay", [0.1, 0.5])
def test_sigint_while_a_program_loads_or_runs_is_one_line(delay, tmp_path):
    """``python -m ilstudio.data.convert``: a SIGINT while its modules are still importing
    (before guarded runs: ilstudio/__init__'s startup hook) or while it converts."""
    from ilstudio.data.synthetic import write_synthetic_dataset

    # Enough episodes that the conversion still runs at the later delay on an idle machine
    # (6 short ones finished in under 0.5 s there).
    write_synthetic_dataset(tmp_path / "src", num_episodes=40, episode_len=100)
    p = subprocess.Popen([sys.executable, "-m", "ilstudio.data.convert", str(tmp_path / "src"),
                          str(tmp_path / "dst"), "--to", "lerobot", "--no_progress"],
                         env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip() == "interrupted (Ctrl-C)", (p.returncode, err[-2000:])
    assert not (tmp_path / "dst").exists()
