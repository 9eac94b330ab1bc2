"""SIGKILL a training run at many moments, resume it, compare with an uninterrupted run.

    OMP_NUM_THREADS=1 python bench/kill_resume.py [--workdir DIR]

For each kill point: a fresh run is started, killed with SIGKILL the moment the condition
holds, restarted with the same command plus --resume_from_checkpoint=true, and its final
model.safetensors compared tensor for tensor with the reference; it must also end at step 40
with no checkpoint past it (no phantom step). Three kill points lie between the last
checkpoint and the final save. Then the finished reference is relaunched with
--resume_from_checkpoint=true: with the same --max_steps it must say "already finished at
step 40" and change no file; with --max_steps=45 it must continue to step 45. Prints one line
per case and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGING = ".checkpoint-staging"
STEPS = ["--max_steps=40", "--save_steps=5", "--seed=7", "--logging_steps=5", "--report_to=none",
         "--per_device_train_batch_size=8", "--gin_bindings=mlp.dropout = 0.1",
         "--gin_bindings=mlp.hidden_dim = 512"]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def args_for(data: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--task_name=tiny_synthetic",
            "--gin_file=gin_configs/mlp.gin", f"--gin_bindings=task.dataset_dir = '{data}'",
            f"--output_dir={out}", *STEPS]


def kill_points(out: Path) -> dict[str, callable]:
    s = out / STAGING
    return {
        "while writing checkpoint-5 (no complete one yet)": lambda: (s / "checkpoint-5").is_dir(),
        "right after checkpoint-5": lambda: (out / "checkpoint-5").is_dir(),
        "while writing checkpoint-20": lambda: (s / "checkpoint-20").is_dir(),
        "right after checkpoint-25 (past the epoch boundary)": lambda: (out / "checkpoint-25").is_dir(),
        "while writing checkpoint-40 (the last)": lambda: (s / "checkpoint-40").is_dir(),
        "right after checkpoint-40, before the final save": lambda: (out / "checkpoint-40").is_dir(),
        "while writing the final model": lambda: (out / ".final-staging").is_dir(),
        "after the final model, before trainer_state.json": lambda: (
            (out / "model.safetensors").is_file() and not (out / ".final-staging").exists()),
        "before any checkpoint (config dumps written)": lambda: (out / "operative_config.gin").is_file(),
    }


def ended_at_40(out: Path) -> bool:
    """The run's final state is step 40 and no checkpoint lies past it (no phantom step)."""
    state = out / "trainer_state.json"
    steps = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")]
    return (state.is_file() and json.loads(state.read_text())["global_step"] == 40
            and max(steps, default=0) <= 40)


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".ilstudio.lock"}


def relaunch_finished(data: Path, ref: Path, work: Path) -> list[bool]:
    """The finished reference relaunched with resume: the same max_steps, then a larger one."""
    out = work / "finished"
    shutil.copytree(ref, out)
    before = snapshot(out)
    r = subprocess.run([*args_for(data, out), "--resume_from_checkpoint=true"], env=env(),
                       capture_output=True, text=True)
    same = (r.returncode == 0 and "already finished at step 40" in r.stderr
            and snapshot(out) == before)
    print(f"{'unchanged' if same else 'CHANGED'}  finished run relaunched, same --max_steps "
          f"(rc {r.returncode}; 'already finished at step 40' "
          f"{'said' if 'already finished at step 40' in r.stderr else 'NOT said'})", flush=True)
    r = subprocess.run([*args_for(data, out), "--resume_from_checkpoint=true", "--max_steps=45"],
                       env=env(), capture_output=True, text=True)
    state = out / "trainer_state.json"
    cont = (r.returncode == 0 and json.loads(state.read_text())["global_step"] == 45
            and (out / "checkpoint-45").is_dir())
    print(f"{'continued' if cont else 'DID NOT CONTINUE'}  finished run relaunched with "
          f"--max_steps=45 (rc {r.returncode})", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return [same, cont]


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    work = Path(ap.parse_args().workdir or tempfile.mkdtemp(prefix="kill_resume_"))
    sys.path.insert(0, str(REPO))
    from ilstudio.data.synthetic import write_synthetic_dataset

    data = work / "data"
    write_synthetic_dataset(data, num_episodes=4, episode_len=50)
    ref = work / "reference"
    subprocess.run(args_for(data, ref), env=env(), check=True, capture_output=True)
    results = []
    for i, (name, _) in enumerate(kill_points(work).items()):
        out = work / f"killed{i}"
        cond = kill_points(out)[name]
        proc = subprocess.Popen(args_for(data, out), env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while not cond() and proc.poll() is None:
            time.sleep(0.001)
        hit = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        r = subprocess.run([*args_for(data, out), "--resume_from_checkpoint=true"], env=env(),
                           capture_output=True, text=True)
        ok = (r.returncode == 0 and same_weights(ref / "model.safetensors", out / "model.safetensors")
              and ended_at_40(out))
        results.append(ok)
        print(f"{'identical' if ok else 'DIFFERENT'}  kill {name}"
              f"{'' if hit else ' (run ended before the kill point)'}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print(f"{sum(results)}/{len(results)} kill points ended with bit-identical final weights at "
          f"step 40, no phantom step")
    relaunch = relaunch_finished(data, ref, work)
    print(f"{sum(relaunch)}/{len(relaunch)} finished-run relaunches behaved as promised")
    return 0 if all(results) and all(relaunch) else 1


if __name__ == "__main__":
    sys.exit(main())
