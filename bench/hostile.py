"""Generated hostile input, per family: how many cases were tried and how many kept the promise.

    OMP_NUM_THREADS=1 python bench/hostile.py [--cases 40] [--seed 0] [--workdir DIR]

Every case is generated here from a seeded random generator (new cases for each --seed), run
through the code ``train.py`` runs (in-process: resolve + TrainingArguments check + data
checks, as ``--dry_run`` does; the run-directory family also through real ``train.py``
subprocesses), and judged against README's promise for its family. "held" means the promise
was kept; anything else is printed with the case. A non-UserError exception is always a
break (a traceback is a bug).

Families: value ranges (values at, beside and far from every declared bound), YAML size
(alias bombs, recursive aliases, huge strings, deep nesting), task_name paths (traversals
from YAML and flag toward a gin file that imports a module), two keys for one parameter,
non-UTF-8 gin/include/YAML, --training_arg fields a flag or the run owns, data (lossy
dtypes, 0-size frames, dangling/looping symlinks), the run directory (foreign files under
--overwrite_output_dir, damaged checkpoints, stale locks, a second run while one holds the
lock), LeRobot metadata (info.json, the episodes and tasks tables, data columns and videos
mutated field by field), converter destinations, the Python API (HyperArguments fields),
special files (FIFOs, devices, directories as configs, includes, flagfiles, metadata, data
and the lock), Ctrl-C (a real SIGINT at a random moment of every program), files read back
(drawn strings through flags.txt, yaml_to_gin's .flags and gin's config dumps), evaluator flags
(python -m ilstudio.eval in-process, on a run without and with a simulator), the manifest
(user files planted at random depths in a finished run, real --overwrite_output_dir, also after
a real evaluation) and resume variants (flipped bits, no optimizer/RNG state, changed data,
another architecture's checkpoint: real resumes, the run directory's listing compared).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from ilstudio.errors import UserError  # noqa: E402

RESULTS: dict[str, list] = defaultdict(lambda: [0, 0, []])  # family -> [tried, held, breaks]


def record(family: str, case: str, held: bool, why: str = "") -> None:
    r = RESULTS[family]
    r[0] += 1
    r[1] += held
    if not held:
        r[2].append(f"{case[:160]!r}: {why[:300]}")


def attempt(fn):
    """(None, result) or (UserError message, None); other exceptions propagate."""
    try:
        return None, fn()
    except UserError as e:
        return str(e), None


def base_args(data: Path, out: Path) -> list[str]:
    return ["--task_name=tiny_synthetic", "--gin_file=gin_configs/mlp.gin",
            f"--gin_bindings=task.dataset_dir = '{data}'", f"--output_dir={out}"]


def resolve(argv):
    import gin

    from ilstudio.resolve import resolve_argv

    gin.clear_config()
    return resolve_argv(argv)


def dry(argv):
    """What --dry_run checks, in-process."""
    from ilstudio.config.training_args import check_training_arguments
    from ilstudio.plan import check_data

    r = resolve(argv)
    check_training_arguments(r.hyper, r.training_args_extra)
    check_data(r)
    return r


# -- families -----------------------------------------------------------------------------


def family_ranges(rng: random.Random, n: int, data: Path, work: Path) -> None:
    from ilstudio.config import settings as _sim  # noqa: F401
    from ilstudio.config.declare import all_params
    from ilstudio.config.hyperparams import HYPERPARAMS
    from ilstudio.policies import import_all_configurations

    import_all_configurations()
    decls = [("hyper", h.name, h.type, h.allowed, None) for h in HYPERPARAMS
             if h.type in (int, float) and h.allowed]
    for p in all_params():
        tp = next((t for t in (int, float) if t is p.type or t in getattr(p.type, "__args__", ())
                   or f"tuple[{t.__name__}" in str(p.type)), None)
        if tp and p.bounds:
            decls.append(("gin", p.gin_key, tp, p.bounds, p))
    for _ in range(n):
        kind, key, tp, bounds, decl = rng.choice(decls)
        edge = rng.choice(bounds.edges() or [0])
        pick = rng.random()
        if tp is int:
            value = (int(edge) + rng.randint(-3, 3) if pick < 0.6 else
                     rng.choice([-(10 ** rng.randint(1, 40)), 10 ** rng.randint(1, 40), 2**63, -(2**63) - 1]))
        else:
            value = (edge + rng.choice([-1, 1]) * 10 ** rng.uniform(-12, 0) if pick < 0.5 else
                     math.nextafter(edge, rng.choice([-math.inf, math.inf])) if pick < 0.7 else
                     rng.choice([-1, 1]) * 10 ** rng.uniform(-30, 30))
        literal = repr(float(value)) if tp is float else str(value)
        argv = base_args(data, work / "o")
        if kind == "hyper":
            argv.append(f"--{key}={literal}")
        else:
            if decl.length:
                literal = "(" + ", ".join([literal] * decl.length) + ")"
            elif "tuple" in str(decl.type):
                literal = f"({literal},)"
            if key.startswith("act."):
                argv.append("--gin_file=gin_configs/act.gin")
            if key.startswith("vla."):
                argv += ["--gin_file=gin_configs/vla.gin", "--gin_bindings=model.model_name_or_path = 'x'"]
            argv.append(f"--gin_bindings={key} = {literal}")
        inside = value in bounds and (tp is float or -(2**63) <= value < 2**63)
        err, _ = attempt(lambda argv=argv: resolve(argv))
        if inside:
            held = err is None or ("out of range" not in err and "64-bit" not in err)
        else:
            held = err is not None and key in err and (bounds.text in err or "64-bit" in err)
        record("value ranges", f"{key}={literal}", held, err or "accepted")


def _bomb(rng: random.Random) -> tuple[str, int]:
    width, depth = rng.randint(2, 12), rng.randint(2, 10)
    lines = ["a0: &a0 [" + ", ".join(['"x"'] * width) + "]"]
    for i in range(1, depth):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    key = rng.choice(["lora_module", "report_to", "lr_scheduler_kwargs", "seed", "junk_key"])
    lines.append(f"{key}: *a{depth - 1}")
    return "\n".join(lines) + "\n", width ** depth


def family_yaml_size(rng: random.Random, n: int, data: Path, work: Path) -> None:
    from ilstudio.config.yaml_adapter import training_args_fields

    training_args_fields()  # the unknown-key hint imports transformers once: not what is timed
    for i in range(n):
        kind = rng.choice(["bomb", "recursive", "huge string", "deep nesting", "many keys"])
        expanded = 0
        if kind == "bomb":
            text, expanded = _bomb(rng)
        elif kind == "recursive":
            text = rng.choice(["x: &r [*r]\n", "lora_module: &r {a: [1, *r]}\n",
                               "lr_scheduler_kwargs: &r {a: {b: *r}}\n"])
        elif kind == "huge string":
            text = "report_to: " + "y" * rng.randint(900_000, 3_000_000) + "\n"
        elif kind == "deep nesting":
            d = rng.randint(50, 3000)
            text = "lr_scheduler_kwargs: " + "[" * d + "]" * d + "\n"
        else:
            text = "".join(f"k{j}: {j}\n" for j in range(rng.randint(5_000, 20_000)))
        path = work / f"size{i}.yaml"
        path.write_text(text)
        start = time.monotonic()
        try:
            err, _ = attempt(lambda path=path: resolve([*base_args(data, work / "o"),
                                                        f"--training_config={path}"]))
        except Exception as e:  # noqa: BLE001 - a traceback is a break
            record("YAML size", f"{kind} ({len(text)} bytes)", False, f"{type(e).__name__}: {e}")
            continue
        took = time.monotonic() - start
        held = took < 5 and (err is None or (str(path) in err and len(err) < 2000))
        if kind == "bomb" and expanded > 10_000:
            held = held and err is not None and "expands to more than" in err
        record("YAML size", f"{kind} ({len(text)} bytes, {expanded} expanded)", held,
               f"{took:.1f}s: {err or 'accepted'}")


def family_task_paths(rng: random.Random, n: int, data: Path, work: Path) -> None:
    search = work / "search"
    (search / "gin_configs" / "tasks").mkdir(parents=True, exist_ok=True)
    marker = work / "evil_imported"
    (work / "evilmod_bench.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    sys.path.insert(0, str(work))
    for where in (search / "x", search, search / "gin_configs", work):
        where.mkdir(parents=True, exist_ok=True)
        (where / "evil.gin").write_text("import evilmod_bench\n")
    pieces = ["..", ".", "x", "evil", "tasks", "gin_configs", "", "\\", "%2e%2e", "\u2025", "~",
              "tiny_synthetic", str(search), "..."]
    for _ in range(n):
        name = "/".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
        if rng.random() < 0.5:
            name += "/evil" if rng.random() < 0.5 else "evil"
        via_yaml = rng.random() < 0.5
        argv = [f"--gin_search_paths={search}", *base_args(data, work / "o")[1:]]  # no --task_name
        if via_yaml:
            cfg = work / "t.yaml"
            cfg.write_text(json.dumps({"task_name": name}))
            argv.append(f"--training_config={cfg}")
        else:
            argv.append(f"--task_name={name}")
        try:
            err, _ = attempt(lambda argv=argv: resolve(argv))
        except Exception as e:  # noqa: BLE001
            record("task_name paths", name, False, f"{type(e).__name__}: {e}")
            continue
        held = not marker.exists() and (err is not None or name == "tiny_synthetic")
        record("task_name paths", f"{'yaml' if via_yaml else 'flag'}: {name}", held,
               err or "accepted")
        marker.unlink(missing_ok=True)


def family_two_keys(rng: random.Random, n: int, data: Path, work: Path) -> None:
    values = ["steps", "epoch", "no"]
    for i in range(n):
        a, b = rng.choice(values), rng.choice(values)
        keys = ["eval_strategy", "evaluation_strategy"]
        rng.shuffle(keys)
        filler = [f"seed: {rng.randint(0, 99)}", "learning_rate: 1.0e-4", "lora_r: 8"]
        lines = rng.sample(filler, rng.randint(0, 3)) + [f"{keys[0]}: '{a}'", f"{keys[1]}: '{b}'"]
        rng.shuffle(lines)
        path = work / f"keys{i}.yaml"
        path.write_text("\n".join(lines) + "\n")
        from ilstudio.config.yaml_adapter import load_training_config

        try:
            err, cfg = attempt(lambda path=path: load_training_config(path))
        except Exception as e:  # noqa: BLE001
            record("two keys, one parameter", path.read_text(), False, f"{type(e).__name__}: {e}")
            continue
        if a != b:
            held = err is not None and "sets the same parameter" in err
        else:
            held = err is None and any("with the same value" in w for w in cfg.warnings)
        record("two keys, one parameter", f"{a} / {b}", held, err or "accepted")


def family_encoding(rng: random.Random, n: int, data: Path, work: Path) -> None:
    bad_bytes = [b"\xff", b"\xfe", b"\xc3\x28", b"\xe2\x82", b"\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]
    for i in range(n):
        kind = rng.choice(["gin file", "gin include", "yaml"])
        body = (b"mlp.hidden_dim = 16\n# comment\n" if kind != "yaml" else b"seed: 3\nlora_r: 8\n")
        pos = rng.randint(0, len(body))
        raw = body[:pos] + rng.choice(bad_bytes) + body[pos:]
        bad = work / f"enc{i}.{'yaml' if kind == 'yaml' else 'gin'}"
        bad.write_bytes(raw)
        argv = base_args(data, work / "o")
        if kind == "gin file":
            argv.append(f"--gin_file={bad}")
        elif kind == "gin include":
            outer = work / f"outer{i}.gin"
            outer.write_text(f"include '{bad}'\n")
            argv.append(f"--gin_file={outer}")
        else:
            argv.append(f"--training_config={bad}")
        try:
            err, _ = attempt(lambda argv=argv: resolve(argv))
        except Exception as e:  # noqa: BLE001
            record("non-UTF-8 files", f"{kind}: {raw!r}", False, f"{type(e).__name__}: {e}")
            continue
        record("non-UTF-8 files", f"{kind}: {raw!r}", err is not None and str(bad) in err
               and "not UTF-8" in err, err or "accepted")


def family_training_arg(rng: random.Random, n: int, data: Path, work: Path) -> None:
    from ilstudio.config.hyperparams import OWNED_BY_FLAG
    from ilstudio.config.yaml_adapter import training_args_fields

    owned = sorted(OWNED_BY_FLAG)
    others = sorted(set(training_args_fields()) - set(owned))
    junk = ["1", "-1", "true", "''", "[1, 2]", "{a: 1}", "nan", "/tmp/x", "&a [*a]", "x" * 300]
    for _ in range(n):
        name = rng.choice(owned) if rng.random() < 0.6 else rng.choice(others)
        entry = f"{name}={rng.choice(junk)}"
        try:
            err, _ = attempt(lambda entry=entry: dry([*base_args(data, work / "o"),
                                                      f"--training_arg={entry}"]))
        except Exception as e:  # noqa: BLE001
            record("--training_arg", entry, False, f"{type(e).__name__}: {e}")
            continue
        if name in OWNED_BY_FLAG:
            held = err is not None and ("use --" in err or "set by the launcher" in err)
        else:
            held = err is None or "--training_arg" in err
        record("--training_arg", entry, held, err or "accepted")


def _lossy(kind: str, v, rng: random.Random):
    """The state/action array v rewritten in the dtype a 'data files' case names."""
    import numpy as np

    if kind == "complex":
        return v.astype(np.complex64) + 1j * rng.random()
    if kind == "bytes":
        return v.astype("S8")
    if kind == "big int":
        return (v * 0).astype(np.int64) + rng.choice([2**24 + 1, 2**40, -(2**50)])
    if kind == "small int":
        return np.round(v * 100).astype(np.int32)
    if kind == "float16":
        return v.astype(np.float16)
    if kind == "float64 overflow":
        out = v.astype(np.float64)
        out.flat[5] = rng.choice([1e39, -1e300])
        return out
    return v > 0  # bool


def family_data(rng: random.Random, n: int, data: Path, work: Path) -> None:
    import h5py
    import numpy as np

    from ilstudio.data.synthetic import write_synthetic_dataset

    for i in range(n):
        d = work / f"data{i}"
        write_synthetic_dataset(d, num_episodes=2, episode_len=12)
        kind = rng.choice(["complex", "bytes", "big int", "small int", "float16", "float64 overflow",
                           "bool", "zero frames", "dangling link", "looping link", "dir named hdf5",
                           "bad attribute", "corrupt chunk"])
        key = rng.choice(["observations/qpos", "action"])
        ep = d / f"episode_{rng.randint(0, 1)}.hdf5"
        expect_error, expect_skip = True, 0
        if kind in ("dangling link", "looping link", "dir named hdf5"):
            expect_error, expect_skip = False, 1 if kind != "looping link" else 2
            if kind == "dangling link":
                os.symlink(work / "nowhere", d / "episode_7.hdf5")
            elif kind == "looping link":
                os.symlink(d / "episode_9.hdf5", d / "episode_8.hdf5")
                os.symlink(d / "episode_8.hdf5", d / "episode_9.hdf5")
            else:
                (d / "episode_7.hdf5").mkdir()
        else:
            with h5py.File(ep, "r+") as f:
                if kind == "bad attribute":
                    key = rng.choice(["fps", "mirrored", "sim", "language_instruction"])
                    f.attrs[key] = rng.choice({  # each invalid for its attribute
                        "fps": ["abc", np.inf, -1.0, 0.0, np.array([50, 50])],
                        "mirrored": ["yes", 7, np.array([1, 0]), -1.0],
                        "sim": ["no", 2, np.array([True, False])],
                        "language_instruction": [3, 2.5, np.array([1, 2])]}[key])
                elif kind == "corrupt chunk":
                    key = "observations/images/top"
                    frames = f[key][()]
                    del f[key]
                    f.create_dataset(key, data=frames, chunks=(1, *frames.shape[1:]), compression="gzip")
                elif kind == "zero frames":
                    k = "observations/images/top"
                    shape = (12, *rng.choice([(0, 0), (0, 32), (24, 0)]), 3)
                    del f[k]
                    f[k] = np.zeros(shape, np.uint8)
                else:
                    new = _lossy(kind, f[key][()], rng)
                    expect_error = kind in ("complex", "bytes", "big int", "float64 overflow")
                    del f[key]
                    f[key] = new
            if kind == "corrupt chunk":  # one chunk's bytes overwritten (its deflate head too)
                with h5py.File(ep, "r") as f:
                    info = f[key].id.get_chunk_info(rng.randrange(f[key].id.get_num_chunks()))
                raw = bytearray(ep.read_bytes())
                raw[info.byte_offset:info.byte_offset + info.size] = bytes(
                    rng.choice([0, 0xFF, rng.randrange(256)]) for _ in range(info.size))
                ep.write_bytes(bytes(raw))
        try:
            err, r = attempt(lambda d=d: dry(base_args(d, work / "o")))
        except Exception as e:  # noqa: BLE001
            record("data files", f"{kind} in {key}", False, f"{type(e).__name__}: {e}")
            continue
        if expect_error:
            held = err is not None and "episode_" in err
        else:
            held = err is None
            if held and expect_skip:
                from ilstudio.data.sources import scan_episodes

                held = len(scan_episodes(str(d))[1]) == expect_skip
        record("data files", f"{kind} in {key}", held, err or "accepted")
        shutil.rmtree(d, ignore_errors=True)


def _train(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def family_run_dir(rng: random.Random, n: int, data: Path, work: Path) -> None:
    from ilstudio import rundir

    run_args = ["--max_steps=6", "--save_steps=3", "--logging_steps=3", "--report_to=none"]
    finished = _finished_run(data, work, "finished", "--report_to=none")
    names = ["paper.tex", "src/", "checkpoint-old/", "checkpoint-/", "model.safetensors.bak",
             ".hidden", "runs2/", "notes", "checkpoint-3x/", ".git/", "best.json", "flags.txt~"]
    # foreign files under --overwrite_output_dir (in-process, and a few real train.py runs)
    for i in range(n):
        out = work / f"mixed{i}"
        shutil.copytree(finished, out)
        planted = sorted(set(rng.sample(names, rng.randint(1, 4))))
        for name in planted:
            (out / name.rstrip("/")).mkdir() if name.endswith("/") else (out / name).write_text("x")
        found = rundir.foreign_entries(out)
        held = found == sorted(planted)
        if held and i < 3:
            r = _train([*base_args(data, out), *run_args, "--overwrite_output_dir"])
            held = r.returncode == 2 and all(p in r.stderr for p in planted) and all(
                (out / p.rstrip("/")).exists() for p in planted) and (out / "model.safetensors").is_file()
        record("run dir: overwrite", " ".join(planted), held, f"found {found}")
        shutil.rmtree(out, ignore_errors=True)
    # damaged checkpoints: truncate one file of the newest checkpoint at a random length
    for i in range(n):
        out = work / f"damaged{i}"
        shutil.copytree(finished, out)
        victim = rng.choice(sorted((out / "checkpoint-6").iterdir()))
        size = victim.stat().st_size
        victim.write_bytes(victim.read_bytes()[: rng.randint(0, max(size - 1, 0))])
        err, last = attempt(lambda out=out: rundir.last_complete_checkpoint(out))
        record("run dir: damaged checkpoint", f"{victim.name} cut to {victim.stat().st_size}/{size}",
               last == str(out / "checkpoint-3"), f"chose {last}")
        shutil.rmtree(out, ignore_errors=True)
    # stale lock files: any content, left by anyone, never blocks
    for i in range(n):
        out = work / f"stale{i}"
        out.mkdir()
        (out / rundir.LOCK_FILE).write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))))
        err, _ = attempt(lambda out=out: rundir.RunLock(out).release())
        record("run dir: stale lock", f"{(out / rundir.LOCK_FILE).read_bytes()[:20]!r}", err is None,
               err or "")
        shutil.rmtree(out, ignore_errors=True)
    # a second run (fresh, resume, overwrite, dry run) while one holds the lock
    out = work / "busy"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), *base_args(data, out),
                              "--max_steps=1000000", "--save_steps=2", "--report_to=none"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint-2").is_dir() and time.monotonic() < deadline:
            time.sleep(0.05)
        for extra in rng.sample([[], ["--resume_from_checkpoint=true"], ["--overwrite_output_dir"],
                                 ["--dry_run"], ["--resume_from_checkpoint=true", "--max_steps=5"]],
                                k=min(n, 5)):
            r = _train([*base_args(data, out), "--max_steps=3", *extra])
            record("run dir: second run", " ".join(extra) or "(fresh)",
                   r.returncode == 2 and f"PID {first.pid} " in r.stderr and first.poll() is None,
                   r.stderr[-300:])
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    record("run dir: second run", "after the holder was SIGKILLed: lock free",
           rundir.lock_holder(out) is None, "still held")


# -- the input boundary of every program (issue 18) ------------------------------------------------


def _lerobot_base(work: Path) -> dict[str, Path]:
    """Two tiny LeRobot datasets (v2.1, v3.0) written once by ilstudio's own writer."""
    import numpy as np

    from ilstudio.data.lerobot_writer import LeRobotWriter

    out = {}
    for version in ("v2.1", "v3.0"):
        root = work / f"lerobot_{version}"
        if not root.exists():
            with LeRobotWriter(root, fps=30, version=version) as w:
                for e, n in enumerate((6, 8)):
                    rng = np.random.default_rng(e)
                    w.add_episode(rng.normal(size=(n, 3)), rng.normal(size=(n, 2)),
                                  {"top": rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)},
                                  task=f"task {e}")
        out[version] = root
    return out


_JUNK = {"int": [-1, 2.5, "3", None, [], {}, True, float("nan"), float("inf")],
         "number": [float("nan"), float("inf"), -float("inf"), "30", None, [], {}, True, -1],
         "str": [3, None, [], {}, 1.5],
         "list": ["x", 3, {}, None], "dict": ["x", 3, [], None], "bool": ["yes", 2, None]}


def _mutate_json_rows(path: Path, fields, rng: random.Random, jsonl: bool) -> str:
    rows = ([json.loads(x) for x in path.read_text().splitlines() if x.strip()] if jsonl
            else [json.loads(path.read_text())])
    row = rng.randrange(len(rows))
    f = rng.choice([f for f in fields if f.required] + list(fields))
    kind = rng.random()
    if kind < 0.15 and f.required:
        rows[row].pop(f.name, None)
        what = f"{f.name} removed"
    elif kind < 0.25 and len(rows) > 1 and f.name in ("episode_index", "task_index", "task"):
        rows[row][f.name] = rows[1 - row if row < 2 else 0][f.name]
        what = f"{f.name} duplicated"
    else:
        junk = rng.choice(_JUNK[f.kind])
        if f.name == "fps" and rng.random() < 0.3:
            junk = rng.choice([0, -30, 1e9])
        if f.name == "length" and rng.random() < 0.3:
            junk = rng.choice([0, rows[row].get("length", 1) + rng.randint(1, 5)])
        rows[row][f.name] = junk
        what = f"{f.name}={junk!r}"
    text = "\n".join(json.dumps(r) for r in rows) + "\n" if jsonl else json.dumps(rows[0])
    path.write_text(text)
    return f"{path.name} row {row}: {what}"


def _mutate_parquet(path: Path, rng: random.Random) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    cols = [c for c in t.column_names if not c.startswith("stats/")]
    col = rng.choice(cols)
    values = t.column(col).to_pylist()
    i = rng.randrange(len(values))
    how = rng.choice(["null", "all zero", "shift", "nan", "ragged", "negative"])
    numeric = isinstance(values[0], (int, float)) and not isinstance(values[0], bool)
    if how == "null":
        values[i] = None
    elif how == "all zero" and numeric:
        values = [type(values[0])(0)] * len(values)
    elif how == "nan" and isinstance(values[0], float):
        values[i] = float("nan")
    elif how == "ragged" and isinstance(values[0], list):
        values[i] = values[i][:-1]
    elif how == "negative" and numeric:
        values[i] = -1 - values[i]
    elif numeric:  # (not a bool column: True + 1000 is no bool)
        how = "shift"
        values[i] = values[i] + 1000
    else:
        how = "null"
        values[i] = None
    if values == t.column(col).to_pylist():
        how += " (no change)"  # e.g. zeroing a column that is all zero: nothing to refuse
    pq.write_table(t.set_column(t.schema.get_field_index(col), col, pa.array(values)), path)
    return f"{path.name}: {col} {how} at row {i}"


def _video_at_other_fps(root: Path, rng: random.Random) -> str:
    import numpy as np

    from ilstudio.data.video import VideoWriter, probe

    video = rng.choice(sorted(root.rglob("*.mp4")))
    head = probe(video)
    fps = rng.choice([10, 25, 29.97, 60])
    w = VideoWriter(video, fps, head["height"], head["width"])
    w.write(np.zeros((head["frames"], head["height"], head["width"], 3), np.uint8))
    w.close()
    return f"{video.name} rewritten at {fps} fps"


def family_lerobot_meta(rng: random.Random, n: int, data: Path, work: Path) -> None:
    from ilstudio.data import lerobot_schema as sc

    bases = _lerobot_base(work)
    for i in range(n):
        version = rng.choice(sorted(bases))
        d = work / f"lr{i}"
        shutil.copytree(bases[version], d)
        target = rng.choice(["info", "episodes", "tasks", "data", "video"])
        if target == "info":
            case = _mutate_json_rows(d / "meta/info.json", sc.INFO_FIELDS, rng, jsonl=False)
        elif target in ("episodes", "tasks") and version == "v2.1":
            fields = sc.EPISODE_FIELDS if target == "episodes" else sc.TASK_FIELDS
            case = _mutate_json_rows(d / f"meta/{target}.jsonl", fields, rng, jsonl=True)
        elif target in ("episodes", "tasks"):
            path = d / ("meta/tasks.parquet" if target == "tasks"
                        else "meta/episodes/chunk-000/file-000.parquet")
            case = _mutate_parquet(path, rng)
        elif target == "data":
            case = _mutate_parquet(rng.choice(sorted((d / "data").rglob("*.parquet"))), rng)
        else:
            case = _video_at_other_fps(d, rng)
        argv = ["--task_name=lerobot", "--gin_file=gin_configs/mlp.gin",
                f"--gin_bindings=task.dataset_dir = '{d}'", f"--output_dir={work / 'o'}",
                "--gin_bindings=dataset.image_size = (8, 8)"]
        start = time.monotonic()
        try:
            err, _ = attempt(lambda argv=argv: dry(argv))
        except Exception as e:  # noqa: BLE001 - a traceback is a break
            record("LeRobot metadata", f"{version} {case}", False, f"{type(e).__name__}: {e}")
            shutil.rmtree(d, ignore_errors=True)
            continue
        took = time.monotonic() - start
        benign = "(no change)" in case
        held = took < 10 and (err is not None and str(d) in err and len(err) < 1000 or
                              (err is None and benign)) and not (work / "o").exists()
        record("LeRobot metadata", f"{version} {case}", held, f"{took:.1f}s: {err or 'accepted'}")
        shutil.rmtree(d, ignore_errors=True)


def _tree(root: Path) -> list[str]:
    return sorted(f"{p.relative_to(root)}:{p.is_symlink()}" for p in root.rglob("*"))


def family_convert_dst(rng: random.Random, n: int, data: Path, work: Path) -> None:
    from ilstudio.data import convert

    area = work / "convert_area"
    for _ in range(n):
        shutil.rmtree(area, ignore_errors=True)
        src = area / "src"
        shutil.copytree(data, src)
        (area / "file.txt").write_text("mine")
        (area / "full").mkdir()
        (area / "full" / "notes").write_text("mine")
        (area / "empty").mkdir()
        kind = rng.choice(["inside src", "src itself", "parent is a file", "symlink", "a file",
                           "not empty", "a fifo", "deep inside src"])
        depth = "/".join(rng.choice(["a", "b", "c"]) for _ in range(rng.randint(1, 3)))
        dst = {"inside src": src / depth, "deep inside src": src / depth / ".." / "x",
               "src itself": src, "parent is a file": area / "file.txt" / depth,
               "symlink": area / "link", "a file": area / "file.txt", "not empty": area / "full",
               "a fifo": area / "pipe"}[kind]
        if kind == "symlink":
            os.symlink(rng.choice([area / "empty", area / "nowhere", src]), area / "link")
        if kind == "a fifo":
            os.mkfifo(area / "pipe")
        before = _tree(area)
        import contextlib
        import io

        buf = io.StringIO()
        try:
            with contextlib.redirect_stderr(buf):
                rc = convert.main([str(src), str(dst), "--to", rng.choice(["hdf5", "lerobot"]),
                                   "--no_progress"])
        except Exception as e:  # noqa: BLE001
            record("converter destinations", f"{kind}: {dst}", False, f"{type(e).__name__}: {e}")
            continue
        err = buf.getvalue().strip()
        held = rc == 2 and err.startswith("error: ") and "\n" not in err and _tree(area) == before
        record("converter destinations", f"{kind}: {dst.relative_to(area)}", held, f"rc {rc}: {err}")
    shutil.rmtree(area, ignore_errors=True)


def _api_junk(h, rng: random.Random):
    """An invalid value for hyperparameter h, by its declaration (None where it has a default)."""
    if h.type is bool:
        return rng.choice(["false", "true", 0, 1, "no", None, []])
    if h.type is int:
        return rng.choice([str(h.default), 2.5, True, None, [], float("nan"), "1e3", 2**70])
    if h.type is float:
        return rng.choice([str(h.default), True, None, [], float("nan"), float("inf"), "1e-3"])
    return rng.choice([3, 1.5, [], {}, None, b"bytes"])


def family_api(rng: random.Random, n: int, data: Path, work: Path) -> None:
    from ilstudio.config import HyperArguments
    from ilstudio.config.hyperparams import HYPERPARAMS

    for _ in range(n):
        h = rng.choice(HYPERPARAMS)
        value = _api_junk(h, rng)
        if value is None and h.default is None:
            value = rng.choice([[], {}])
        via_setattr = rng.random() < 0.3
        try:
            if via_setattr:
                setattr(HyperArguments(), h.name, value)
            else:
                HyperArguments(**{h.name: value})
            err = None
        except (UserError, ValueError) as e:
            err = e
        except Exception as e:  # noqa: BLE001
            record("Python API", f"{h.name}={value!r}", False, f"{type(e).__name__}: {e}")
            continue
        held = (err is not None and isinstance(err, UserError) and isinstance(err, ValueError)
                and h.name in str(err) and len(str(err)) < 500)
        record("Python API", f"{'setattr ' if via_setattr else ''}{h.name}={value!r}", held,
               str(err) if err else "accepted")


def _alarm(seconds: int):
    def on_alarm(*_):
        raise TimeoutError(f"no answer within {seconds} s (blocked on a FIFO?)")
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)


def family_special_files(rng: random.Random, n: int, data: Path, work: Path) -> None:
    from ilstudio import rundir
    from ilstudio.cli import check_flagfiles

    bases = _lerobot_base(work)
    for i in range(n):
        special = rng.choice(["fifo", "/dev/zero", "directory", "/dev/urandom"])
        surface = rng.choice(["--training_config", "--gin_file", "--flagfile", "lock file",
                              "info.json", "episodes.jsonl", "lerobot data file", "include"])
        path = work / f"special{i}"
        if special == "fifo":
            os.mkfifo(path)
        elif special == "directory":
            path.mkdir()
        else:
            os.symlink(special, path)
        argv = base_args(data, work / f"so{i}")
        try:
            _alarm(10)
            if surface == "--flagfile":
                err, _ = attempt(lambda path=path: check_flagfiles([f"--flagfile={path}"]))
            elif surface == "lock file":
                out = work / f"lock{i}"
                out.mkdir()
                os.replace(path, out / rundir.LOCK_FILE) if special != "directory" else \
                    shutil.move(str(path), out / rundir.LOCK_FILE)
                err, _ = attempt(lambda out=out: rundir.check_not_in_use(out))
                err2, _ = attempt(lambda out=out: rundir.RunLock(out).release())
                err = err if err2 is not None else None
            elif surface in ("info.json", "episodes.jsonl", "lerobot data file"):
                d = work / f"slr{i}"
                shutil.copytree(bases["v2.1"], d)
                victim = {"info.json": d / "meta/info.json", "episodes.jsonl": d / "meta/episodes.jsonl",
                          "lerobot data file": d / "data/chunk-000/episode_000001.parquet"}[surface]
                victim.unlink()
                shutil.move(str(path), victim) if special == "directory" else os.replace(path, victim)
                err, _ = attempt(lambda d=d: dry(["--task_name=lerobot", "--gin_file=gin_configs/mlp.gin",
                                                  f"--gin_bindings=task.dataset_dir = '{d}'",
                                                  f"--output_dir={work / 'so'}",
                                                  "--gin_bindings=dataset.image_size = (8, 8)"]))
            elif surface == "include":
                outer = work / f"outer_special{i}.gin"
                outer.write_text(f"include '{path}'\n")
                err, _ = attempt(lambda argv=argv, outer=outer: resolve([*argv, f"--gin_file={outer}"]))
            else:
                err, _ = attempt(lambda argv=argv, s=surface, path=path: resolve([*argv, f"{s}={path}"]))
            signal.alarm(0)
        except Exception as e:  # noqa: BLE001 - a traceback or a hang is a break
            signal.alarm(0)
            record("special files", f"{special} as {surface}", False, f"{type(e).__name__}: {e}")
            continue
        held = err is not None and len(err) < 1000 and not (work / f"so{i}").exists()
        record("special files", f"{special} as {surface}", held, err or "accepted")


_PROGRAM_ARGS = {
    "train.py": lambda d, w: [str(REPO / "train.py"), *base_args(d, w / "ctrlc_run"),
                              "--max_steps=1000000", "--report_to=none"],
    "convert": lambda d, w: ["-m", "ilstudio.data.convert", str(d), str(w / "ctrlc_conv"),
                             "--to", "lerobot", "--no_progress"],
    "record": lambda d, w: ["-m", "ilstudio.sim.record", "--num_episodes=50",
                            f"--output_dir={w / 'ctrlc_rec'}"],
    "quickstart": lambda d, w: ["-m", "ilstudio.sim.quickstart", f"--output_dir={w / 'ctrlc_qs'}"],
    "diff": lambda d, w: ["-m", "ilstudio.tools.diff", str(w / "finished"), str(w / "finished")],
    "yaml_to_gin": lambda d, w: ["-m", "ilstudio.tools.yaml_to_gin",
                                 str(REPO / "configs/training/default.yaml")],
}


def family_ctrl_c(rng: random.Random, n: int, data: Path, work: Path) -> None:
    """A real SIGINT at a random moment of every program: one line and exit 130 (or the program
    had already finished: no traceback either way)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    big = work / "ctrlc_data"
    if not big.exists():
        from ilstudio.data.synthetic import write_synthetic_dataset

        write_synthetic_dataset(big, num_episodes=40, episode_len=60)
    names = sorted(_PROGRAM_ARGS)
    for i in range(n):
        name = names[i % len(names)] if i < len(names) else rng.choice(names)
        for leftover in work.glob("ctrlc_*"):
            if leftover != big:
                shutil.rmtree(leftover, ignore_errors=True)
        delay = rng.uniform(0.3, 8.0)  # before ~0.1 s Python itself is starting: no ilstudio code
        p = subprocess.Popen([sys.executable, *_PROGRAM_ARGS[name](big, work)], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            record("Ctrl-C", f"{name} at {delay:.1f}s", False, "did not stop within 120 s")
            continue
        lines = [x for x in err.splitlines() if x.startswith("interrupted (Ctrl-C)")]
        held = "Traceback" not in err and (
            (p.returncode == 130 and len(lines) == 1)
            or p.returncode in (0, 1, 2) and "bug in ilstudio" not in err)
        record("Ctrl-C", f"{name} at {delay:.1f}s", held, f"rc {p.returncode}: {err[-300:]}")


# -- what landed after the last table (issue 18): files read back, manifest, resume, evaluator --

_TRICKY = ["\n", "\r", "\r\n", "\u2028", "\x85", "'", '"', "\\", "--", "#", "--gin_file=x.gin",
           " ", "\t", "é", "\U0001f600", "=", "%macro", "@ref", "--flagfile=/etc/passwd", "\\n"]


def _tricky(rng: random.Random) -> str:
    parts = [rng.choice(_TRICKY) if rng.random() < 0.6 else rng.choice(["tb", "logs", "a b", "x"])
             for _ in range(rng.randint(1, 5))]
    if rng.random() < 0.3:
        parts.insert(0, "--" if rng.random() < 0.5 else "\n--")
    return "".join(parts) or "x"


def _absl_reads(path: Path):
    from absl import flags

    from ilstudio.config.hyperparams import define_flags

    fv = flags.FlagValues()
    define_flags(fv)
    fv(["train.py", f"--flagfile={path}"])
    return fv


def _flagfile_holds(path: Path, value: str, gin_file: list[str] | None) -> str | None:
    """Why the flagfile at path does not read back as logging_dir=value and nothing else."""
    fv = _absl_reads(path)
    if fv["logging_dir"].value != value:
        return f"logging_dir read back as {fv['logging_dir'].value!r}"
    if (fv["gin_file"].value if fv["gin_file"].present else None) != gin_file:
        return f"gin_file read back as {fv['gin_file'].value!r}"
    return None


def hostile_probe(value=None):
    return value


_PROBE: dict = {}


def family_read_back(rng: random.Random, n: int, data: Path, work: Path) -> None:
    """A drawn string value written into flags.txt / .flags / config.gin: refused (exit-2
    semantics, before anything is written) or read back by absl / gin as exactly itself."""
    import gin

    from ilstudio.config import dumps
    from ilstudio.tools.yaml_to_gin import convert, gin_literal

    probe = gin.external_configurable(hostile_probe, "hostile_probe") if "hostile_probe" not in \
        globals().get("_PROBE", {}) else _PROBE["hostile_probe"]
    _PROBE["hostile_probe"] = probe

    area = work / "read_back"
    area.mkdir(exist_ok=True)
    real = 0
    for i in range(n):
        value = _tricky(rng)
        surface = rng.choice(["flag", "YAML", "yaml_to_gin", "gin", "train.py"] if real < 2 else
                             ["flag", "YAML", "yaml_to_gin", "gin"])
        case = f"{surface}: {value!r}"
        out = area / f"out{i}"
        yaml = area / f"c{i}.yaml"
        import yaml as pyyaml

        yaml.write_text(pyyaml.safe_dump({"logging_dir": value}), encoding="utf-8")
        try:
            why = None
            if surface == "gin":
                gin.clear_config()
                gin.parse_config(f"hostile_probe.value = {gin_literal(value)}")
                why = None if probe() == value else f"parsed as {probe()!r}"  # (and operative)
                for text in (gin.config_str(), gin.operative_config_str()):
                    gin.clear_config()
                    gin.parse_config(text)
                    if probe() != value:
                        why = f"read back as {probe()!r}"
                gin.clear_config()
            elif surface == "yaml_to_gin":
                err, texts = attempt(lambda yaml=yaml: convert(str(yaml)))
                if texts is not None:
                    (area / f"o{i}.flags").write_text(texts[1], encoding="utf-8")
                    why = _flagfile_holds(area / f"o{i}.flags", value, None)
                elif dumps.unrepresentable(value) is None:
                    why = f"refused a writable value: {err}"
            elif surface == "train.py":
                real += 1
                r = _train([*base_args(data, out), f"--training_config={yaml}", "--max_steps=1",
                            "--save_steps=1", "--report_to=none"])
                if r.returncode == 2:
                    why = None if (not out.exists() and "Traceback" not in r.stderr
                                   and dumps.unrepresentable(value)) else f"rc 2: {r.stderr[-300:]}"
                elif r.returncode == 0:
                    why = _flagfile_holds(out / "flags.txt", value,
                                          [str((out / "config.gin").resolve())])
                else:
                    why = f"rc {r.returncode}: {r.stderr[-300:]}"
            else:
                argv = [*base_args(data, out)] + ([f"--logging_dir={value}"] if surface == "flag"
                                                  else [f"--training_config={yaml}"])
                err, resolved = attempt(lambda argv=argv: resolve(argv))
                if resolved is not None:
                    err, text = attempt(lambda r=resolved, out=out: dumps.flagfile_text(
                        r, out / "config.gin"))
                    if text is not None:
                        (area / f"f{i}.txt").write_text(text, encoding="utf-8")
                        why = _flagfile_holds(area / f"f{i}.txt", value,
                                              [str((out / "config.gin").resolve())])
                    elif dumps.unrepresentable(value) is None:
                        why = f"refused a writable value: {err}"
                if out.exists():
                    why = "wrote the output directory"
        except Exception as e:  # noqa: BLE001 - a traceback is a break
            record("files read back", case, False, f"{type(e).__name__}: {e}")
            continue
        record("files read back", case, why is None, why or "")
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(area, ignore_errors=True)


def _listing(root: Path) -> list[tuple]:
    """Every entry with its size and mtime (the lock excluded: a refused run may take it)."""
    from ilstudio import rundir

    return sorted((p.relative_to(root).as_posix(), p.is_dir(), p.stat().st_size if p.is_file() else 0,
                   p.stat().st_mtime_ns) for p in root.rglob("*") if p.name != rundir.LOCK_FILE)


RUN_ARGS = ["--max_steps=6", "--save_steps=3", "--logging_steps=3", "--seed=5"]


def _finished_run(data: Path, work: Path, name: str, *extra: str) -> Path:
    out = work / name
    if not (out / "model.safetensors").is_file():
        shutil.rmtree(out, ignore_errors=True)
        r = _train([*base_args(data, out), *RUN_ARGS, *extra])
        assert r.returncode == 0, r.stderr[-2000:]
    return out


def _expected_foreign(run: Path, planted: list[str]) -> list[str]:
    """What foreign_entries should list: the topmost new entry of each planted path."""
    found = set()
    for rel in planted:
        parts = rel.split("/")
        for k in range(1, len(parts) + 1):
            prefix = "/".join(parts[:k])
            if not (run / prefix).exists():
                found.add(prefix + ("/" if k < len(parts) else ""))
                break
    return sorted(found)


def family_manifest(rng: random.Random, n: int, data: Path, work: Path) -> None:
    """User files planted at random depths inside a finished run (one evaluation's files
    written by rundir's writers, as the evaluator writes them): foreign_entries lists exactly
    them; a real --overwrite_output_dir exits 2 and changes nothing; with none, it succeeds."""
    from ilstudio import rundir

    base = _finished_run(data, work, "finished_tb", "--report_to=tensorboard")
    if not (base / "evals" / "seed0_episodes1").is_dir():  # what the evaluator writes, its way
        (base / "evals" / "seed0_episodes1").mkdir(parents=True)
        rundir.write_atomic(base / "evals" / "seed0_episodes1" / "eval_episode_0_success.gif", b"GIF89a")
        rundir.write_atomic(base / "evals" / "seed0_episodes1" / "eval_results.json", "{}")
        rundir.write_atomic(base / "evals" / "latest.txt", "seed0_episodes1\n")
    dirs = sorted({p.parent.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()})
    names = ["notes.md", ".flags.txt.orig", "model.safetensors.bak", "checkpoint-5", "optimizer.pt~",
             "trainer_state.json.orig", "events.out.tfevents.mine", "eval_results (1).json", ".git",
             "checkpoint-7", "rng_state.pth.bak", "manifest.jsonl.orig"]
    real = 0
    for i in range(n):
        run = work / f"planted{i}"
        shutil.copytree(base, run)
        planted = []
        for _ in range(rng.randint(0, 4) if i else 0):
            parent = rng.choice(dirs)
            sub = [rng.choice(["sub", "checkpoint-9", "old", "runs"]) for _ in range(rng.choice([0, 0, 1, 2]))]
            rel = "/".join(p for p in [parent, *sub, rng.choice(names)] if p not in ("", "."))
            if (run / rel).exists() or any((run / q).is_file() for q in Path(rel).parents):
                continue
            (run / rel).parent.mkdir(parents=True, exist_ok=True)
            (run / rel).write_text("the user's\n")
            planted.append(rel)
        expected = _expected_foreign(base, planted)
        try:
            found = rundir.foreign_entries(run)
        except Exception as e:  # noqa: BLE001
            record("manifest: foreign files", " ".join(planted), False, f"{type(e).__name__}: {e}")
            continue
        held, why = found == expected, f"found {found}, expected {expected}"
        if held and (real < 3 or not planted and real < 4):
            real += 1
            before = _listing(run)
            r = _train([*base_args(data, run), *RUN_ARGS, "--report_to=tensorboard",
                        "--overwrite_output_dir"])
            if planted:
                held = r.returncode == 2 and "Traceback" not in r.stderr and _listing(run) == before \
                    and all(e in r.stderr for e in expected)
            else:
                held = r.returncode == 0 and not (run / "evals").exists()
            why = f"rc {r.returncode}: {r.stderr[-300:]}"
        record("manifest: foreign files", " ".join(planted) or "(none)", held, why)
        shutil.rmtree(run, ignore_errors=True)
    _after_a_real_evaluation(rng, work)


def _after_a_real_evaluation(rng: random.Random, work: Path) -> None:
    """python -m ilstudio.eval (in-process) writes into a simulated run; --overwrite_output_dir
    then succeeds, or, with a user file in the evaluation's folder, lists it and changes nothing."""
    import contextlib
    import io

    from ilstudio import eval as ev
    from ilstudio import rundir

    for plant in (False, True):
        run = Path(shutil.copytree(_sim_run(work), work / f"evaluated{int(plant)}"))
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            rc = ev.main(["--checkpoint", str(run), *_SIM_EVAL])
        folders = sorted(p for p in (run / "evals").iterdir() if p.is_dir()) if rc == 0 else []
        if not folders:
            record("manifest: foreign files", "after a real evaluation", False, f"eval rc {rc}")
            continue
        planted = []
        if plant:
            rel = f"{folders[0].relative_to(run).as_posix()}/{rng.choice(['notes.md', 'eval_results.json.orig'])}"
            (run / rel).write_text("the user's\n")
            planted.append(rel)
        found = rundir.foreign_entries(run)
        before = _listing(run)
        r = _train([*_sim_train_args(work, run), "--overwrite_output_dir"])
        if plant:
            held = found == planted and r.returncode == 2 and planted[0] in r.stderr \
                and _listing(run) == before
        else:
            held = found == [] and r.returncode == 0 and not (run / "evals").exists()
        record("manifest: foreign files", f"after a real evaluation: {planted or '(none)'}", held,
               f"found {found}; rc {r.returncode}: {r.stderr[-300:]}")
        shutil.rmtree(run, ignore_errors=True)


def _flip(path: Path, rng: random.Random) -> int:
    data = bytearray(path.read_bytes())
    at = rng.randrange(len(data))
    data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return at


def _resumable(data: Path, work: Path) -> tuple[Path, Path]:
    """A run on its own data copy, made resumable (an unfinished run killed after checkpoint-6)."""
    from ilstudio import rundir
    from ilstudio.data.synthetic import write_synthetic_dataset

    d = work / "resume_data"
    if not d.exists():
        write_synthetic_dataset(d, num_episodes=4, episode_len=30)
        shutil.copytree(d, work / "resume_data.orig")
    run = _finished_run(d, work, "resume_run")
    if (run / rundir.TRAINER_STATE).exists():
        (run / rundir.TRAINER_STATE).unlink()
    return d, run


def _resume(data: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    return _train([*base_args(data, run), *RUN_ARGS, "--resume_from_checkpoint=true", *extra])


def _refused_unchanged(r, run: Path, before, *words: str) -> str | None:
    if r.returncode != 2 or "Traceback" in r.stderr:
        return f"rc {r.returncode}: {r.stderr[-300:]}"
    if _listing(run) != before:
        return "refused, but the run directory changed"
    missing = [w for w in words if w not in r.stderr]
    return f"message lacks {missing}: {r.stderr[-300:]}" if missing else None


def _damage_state(run: Path, rng: random.Random) -> str:
    gone = rng.sample(["optimizer.pt", "scheduler.pt", "rng_state.pth"], rng.randint(1, 3))
    for ck in run.glob("checkpoint-*"):
        for name in gone:
            (ck / name).unlink(missing_ok=True)
    return ",".join(gone)


def _change_data(d: Path, rng: random.Random) -> str:
    from ilstudio.data.synthetic import write_synthetic_dataset

    eps = sorted(d.glob("*.hdf5"))
    kind = rng.choice(["added", "removed", "changed"])
    if kind == "added":
        shutil.copy(rng.choice(eps), d / f"episode_{rng.randint(50, 999)}.hdf5")
    elif kind == "removed":
        rng.choice(eps).unlink()
    else:
        write_synthetic_dataset(d, num_episodes=rng.randint(1, 2), episode_len=rng.choice([20, 31, 40]))
    return kind


def _foreign_checkpoint(run: Path, rng: random.Random) -> str:
    import torch
    from safetensors.torch import load_file, save_file

    from ilstudio import rundir

    ck = run / "checkpoint-9"
    shutil.copytree(run / "checkpoint-6", ck)
    state = json.loads((ck / rundir.TRAINER_STATE).read_text())
    state["global_step"] = 9
    (ck / rundir.TRAINER_STATE).write_text(json.dumps(state))
    own = load_file(str(ck / rundir.WEIGHTS))
    kind = rng.choice(["other keys", "other shape", "fewer keys"])
    if kind == "other keys":
        own = {f"backbone.layer.{k}.weight": torch.zeros(3, 3) for k in range(rng.randint(1, 3))}
    elif kind == "other shape":
        key = rng.choice(sorted(own))
        own[key] = torch.zeros(*[s + 1 for s in own[key].shape] or [2])
    else:
        own.pop(rng.choice(sorted(own)))
    save_file(own, str(ck / rundir.WEIGHTS))
    return kind


def family_resume(rng: random.Random, n: int, data: Path, work: Path) -> None:
    """Resume from a damaged or different checkpoint, or onto different data: the evaluator's
    loader refuses a flipped bit (in-process, every case); real resumes fall back (exit 0) or
    exit 2 with the run directory unchanged (listing with sizes and mtimes)."""
    from ilstudio import rundir
    from ilstudio.models.state_io import read_state

    d, base = _resumable(data, work)
    orig = work / "resume_data.orig"
    kinds = ["flipped bit", "no optimizer/RNG state", "data changed", "another architecture"]
    for i in range(n):
        run = work / f"resumed{i}"
        shutil.copytree(base, run)
        shutil.rmtree(d)
        shutil.copytree(orig, d)
        kind = kinds[i % 4] if i < 4 else rng.choice(kinds)
        real = True
        try:
            if kind == "flipped bit":
                victim = run / "checkpoint-6" / rng.choice(["model.safetensors", "optimizer.pt",
                                                            "model.safetensors", "rng_state.pth"])
                case = f"{victim.name} bit at {_flip(victim, rng)}"
                why = None
                if victim.name == "model.safetensors":
                    err, _ = attempt(lambda v=victim: read_state(v))
                    why = None if err else "the evaluator's loader read a flipped file"
                if why is None and rundir.checkpoint_problem(run / "checkpoint-6") is None:
                    why = "checkpoint_problem saw no damage"
                if why is None and real:
                    before = _listing(run)
                    r = _resume(d, run)
                    why = None if r.returncode == 0 and "falling back to" in r.stderr else \
                        _refused_unchanged(r, run, before)
            else:
                extra = []
                if kind == "no optimizer/RNG state":
                    case = _damage_state(run, rng)
                    words = []
                    if rng.random() < 0.3:
                        extra = ["--resume_weights_only"]
                elif kind == "data changed":
                    case = _change_data(d, rng)
                    words = ["dataset is not the one the run trained on"]
                    extra = rng.choice([[], ["--dry_run"]])
                else:
                    case = _foreign_checkpoint(run, rng)
                    words = ["checkpoint-9"]
                    extra = ["--max_steps=12"]
                case = f"{kind}: {case} {' '.join(extra)}"
                if not real:
                    shutil.rmtree(run, ignore_errors=True)
                    continue
                before = _listing(run)
                r = _resume(d, run, *extra)
                if extra == ["--resume_weights_only"] and r.returncode == 0:
                    why = None if "will NOT be bit-identical" in r.stderr else "no warning"
                else:
                    why = _refused_unchanged(r, run, before, *words)
        except Exception as e:  # noqa: BLE001
            record("resume variants", kind, False, f"{type(e).__name__}: {e}")
            continue
        record("resume variants", case, why is None, why or "")
        shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(d)
    shutil.copytree(orig, d)
    # and many more flipped bits, in-process: the evaluator's loader and the checkpoint check
    run = Path(shutil.copytree(base, work / "flipped_run"))
    for _ in range(4 * n):
        ck = run / rng.choice(["checkpoint-3", "checkpoint-6"])
        victim = ck / rng.choice(["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"])
        at = _flip(victim, rng)
        try:
            err, _ = attempt(lambda v=victim: read_state(v)) if victim.suffix == ".safetensors" \
                else ("(not a file the evaluator reads)", None)
            problem = rundir.checkpoint_problem(ck)
        except Exception as e:  # noqa: BLE001
            record("resume: flipped bit (loaders)", f"{victim.name} bit at {at}", False,
                   f"{type(e).__name__}: {e}")
            continue
        finally:
            shutil.copy(base / victim.relative_to(run), victim)
        record("resume: flipped bit (loaders)", f"{victim.name} bit at {at}",
               err is not None and problem is not None, f"loader: {err}; checkpoint_problem: {problem}")
    shutil.rmtree(run, ignore_errors=True)


_SIM_SMALL = ["sim.render_height = 36", "sim.render_width = 48"]
_SIM_TINYACT = ["tinyact.channels = (4, 4)", "tinyact.strides = (2, 2)", "tinyact.keypoints = 4",
                "tinyact.early_keypoints = 0", "tinyact.hidden_dim = 16",
                "dataset.image_size = (24, 32)", "model.chunk_size = 5"]
_SIM_EVAL = ["--num_episodes=1", "--video_episodes=1", "--no_progress",
             "--gin_bindings=task.episode_len = 12"]


def _sim_train_args(work: Path, out: Path) -> list[str]:
    return ["--task_name=sim_transfer_cube_scripted",
            f"--gin_bindings=task.dataset_dir = '{work / 'sim_data'}'",
            "--gin_file=gin_configs/tinyact.gin",
            *[f"--gin_bindings={b}" for b in _SIM_SMALL + _SIM_TINYACT], f"--output_dir={out}",
            "--max_steps=2", "--per_device_train_batch_size=4", "--save_steps=1", "--report_to=none"]


def _sim_run(work: Path) -> Path:
    """A 2-step TinyACT run on two recorded 36x48 episodes: the evaluator can roll it out
    (12-step episodes) in seconds, so its checks past the simulator's are reached."""
    from ilstudio.sim.config import load_task
    from ilstudio.sim.record import record as record_episodes

    out = work / "sim_run"
    if not (out / "model.safetensors").is_file():
        task, sim = load_task("sim_transfer_cube_scripted", _SIM_SMALL)
        assert record_episodes(task, sim, work / "sim_data", num_episodes=2, seed=0,
                               progress=False)["kept"] == 2
        r = _train(_sim_train_args(work, out))
        assert r.returncode == 0, r.stderr[-2000:]
    return out


def family_eval_flags(rng: random.Random, n: int, data: Path, work: Path) -> None:
    """python -m ilstudio.eval's flags and run files, in-process: exit 2, one message, nothing
    written (the run and --output_dir's parent listed before and after)."""
    import contextlib
    import io

    from ilstudio import eval as ev

    bases = [_finished_run(data, work, "finished", "--report_to=none"), _sim_run(work)]
    area = work / "eval_area"
    for i in range(n):
        shutil.rmtree(area, ignore_errors=True)
        base = bases[i % 2]
        run = Path(shutil.copytree(base, area / "run"))
        (area / "a_file").write_text("mine")
        kind = rng.choice(["device", "seed", "num_episodes", "output_dir a file", "no weights",
                           "normalization", "modes"])
        args = ["--checkpoint", str(run), *_SIM_EVAL]
        if kind == "device":
            args.append("--device=" + rng.choice(["tpu", "", "cuda:99", "cpu:x", "cuda:-1", "gpu",
                                                  "mps", "cuda:1e3", "meta", "cpu\n--x"]))
        elif kind == "seed":
            args.append(f"--seed={rng.choice([-1, -(2 ** 31), 2 ** 64, 10 ** 30, -10 ** 30])}")
        elif kind == "num_episodes":
            args[2] = f"--num_episodes={rng.choice([0, -1, -10 ** 9])}"
        elif kind == "output_dir a file":
            args.append(f"--output_dir={area / 'a_file' / rng.choice(['', 'x', 'x/y'])}".rstrip("/"))
        elif kind == "no weights":
            ck = rng.choice(sorted(run.glob("checkpoint-*")))
            (ck / "model.safetensors").unlink()
            args[1] = str(ck)
        elif kind == "normalization":
            stats = json.loads((run / "normalization.json").read_text())
            key = rng.choice(sorted(k for k, v in stats.items() if isinstance(v, list)))
            vals = stats[key]
            vals[rng.randrange(len(vals))] = rng.choice(["NaN", "Infinity", "-Infinity"])
            (run / "normalization.json").write_text(json.dumps(stats).replace('"NaN"', "NaN")
                                                    .replace('"Infinity"', "Infinity")
                                                    .replace('"-Infinity"', "-Infinity"))
        else:
            args += rng.choice([["--temporal_ensemble", "--no_temporal_ensemble"],
                                ["--temporal_ensemble", "--query_every=5"],
                                ["--policy=scripted"], ["--policy=hold", "--query_every=3"]])
        before = _listing(area)
        buf = io.StringIO()
        try:
            with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
                rc = ev.main(args)
        except SystemExit as e:
            rc = e.code
        except Exception as e:  # noqa: BLE001
            record("evaluator flags", f"{kind}: {args[6:]}", False, f"{type(e).__name__}: {e}")
            continue
        err = buf.getvalue().strip()
        kind = f"{kind} ({'simulated task' if i % 2 else 'no simulator'})"
        lines = [x for x in err.splitlines() if not x.startswith("Run with --helpfull")]
        held = rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") \
            and "Traceback" not in err and _listing(area) == before
        record("evaluator flags", f"{kind}: {' '.join(args[6:])}", held, f"rc {rc}: {err[-300:]}")
    shutil.rmtree(area, ignore_errors=True)


FAMILIES = [family_ranges, family_yaml_size, family_task_paths, family_two_keys, family_encoding,
            family_training_arg, family_data, family_lerobot_meta, family_convert_dst, family_api,
            family_special_files, family_run_dir, family_ctrl_c, family_read_back, family_eval_flags,
            family_manifest, family_resume]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=40, help="cases per family (run dir: per kind)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--only", default=None, help="run only families whose name contains this")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="hostile_"))
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    from ilstudio.data.synthetic import write_synthetic_dataset

    data = work / "tiny"
    write_synthetic_dataset(data, num_episodes=2, episode_len=20)
    for fam in FAMILIES:
        if a.only and a.only not in fam.__name__:
            continue
        rng = random.Random(f"{a.seed}:{fam.__name__}")
        start = time.monotonic()
        few = fam in (family_run_dir, family_ctrl_c, family_manifest, family_resume)  # real subprocesses: fewer cases
        fam(rng, a.cases if not few else max(1, a.cases // 4), data, work)
        print(f"# {fam.__name__}: {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    lines = ["", "| family | cases tried | held | broke |", "|---|---|---|---|"]
    lines += [f"| {family} | {tried} | {held} | {tried - held} |"
              for family, (tried, held, _breaks) in RESULTS.items()]
    lines += [f"BROKE {family}: {b}" for family, (_, _, breaks) in RESULTS.items() for b in breaks[:10]]
    (work / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return 0 if all(t == h for t, h, _ in RESULTS.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
