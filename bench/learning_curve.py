"""Learning curve of a finished run: loss, image sensitivity and simulated success vs steps.

    python bench/learning_curve.py RUN_DIR --episodes 10 [--png docs/learning_curve.png]

For every ``checkpoint-N`` of the run (and the final weights): the training loss logged around
step N (trainer_state.json), the image sensitivity of the policy (spread of its first predicted
chunk across the recorded episodes' t = 0 observations relative to the recorded chunks' spread;
see ilstudio/policies/sensitivity.py) and, with ``--episodes K``, the success rate over K
simulated episodes (``python -m ilstudio.eval``'s evaluator, in the policy's declared evaluation
mode unless --temporal_ensemble / --no_temporal_ensemble force one; the same evaluation seeds at
every checkpoint). Writes RUN_DIR/learning_curve_sim.json and a
PNG (RUN_DIR/learning_curve_sim.png unless --png is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    out = []
    for d in run.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and (d / "model.safetensors").is_file():
            out.append((int(m.group(1)), d))
    state = _trainer_state(run)
    final = int(state.get("global_step", 0)) if state else 0
    if (run / "model.safetensors").is_file():  # the final weights (and their evaluation)
        out = [(s, d) for s, d in out if s != final] + [(final, run)]
    return sorted(out)


def _trainer_state(run: Path) -> dict:
    files = sorted(run.glob("checkpoint-*/trainer_state.json"),
                   key=lambda p: int(p.parent.name.split("-")[1]))
    for p in [run / "trainer_state.json", *reversed(files)]:
        if p.is_file():
            return json.loads(p.read_text())
    return {}


def loss_near(log: list[dict], step: int, window: int) -> float | None:
    vals = [e["loss"] for e in log if "loss" in e and step - window < e["step"] <= step]
    return sum(vals) / len(vals) if vals else None


def sensitivity_of(ckpt: Path, max_episodes: int, bindings: tuple[str, ...] = ()) -> dict:
    from ilstudio.data.dataset import EpisodeDataset
    from ilstudio.data.episodes import list_episode_files
    from ilstudio.data.normalization import NormStats
    from ilstudio.eval import load_policy, load_settings, run_files
    from ilstudio.policies.sensitivity import first_samples, image_sensitivity

    weights, operative, norm = run_files(str(ckpt))
    built = load_settings(operative, gin_bindings=bindings)
    model, _, _ = load_policy(built, weights, "cpu")
    paths = list_episode_files(built["task"].dataset_dir)[:max_episodes]
    settings = dataclasses.replace(built["dataset"], preload_data=False, lazy_preprocess=True)
    ds = EpisodeDataset(paths, built["task"], settings, built["model"].chunk_size,
                        NormStats.load(norm))
    return image_sensitivity(model, first_samples(ds))


def _earlier_evaluations(ckpt: Path) -> list[Path]:
    """Evaluations of exactly this checkpoint: its own folder's, and those in the run's evals/
    (``python -m ilstudio.eval --checkpoint RUN/checkpoint-N`` writes them there, and the run's
    evals/latest.txt may then name a checkpoint's evaluation, not the final weights')."""
    run = ckpt.parent if ckpt.name.startswith("checkpoint-") else ckpt
    found = [ckpt / "eval_results.json", *sorted((run / "evals").glob("*/eval_results.json"))]
    out = []
    for f in found:
        if f.is_file() and Path(json.loads(f.read_text()).get("checkpoint", "")).resolve() == ckpt.resolve():
            out.append(f)
    return out


def success_of(ckpt: Path, episodes: int, temporal_ensemble: bool | None, seed: int,
               bindings: tuple[str, ...] = ()) -> dict:
    """Reuses an evaluation already made of this checkpoint (e.g. the quickstart's) when it used
    the same seed and mode and at least as many episodes (the largest such one). temporal_ensemble
    None: the policy's declared mode (an evaluation made in it says so in eval_mode_source)."""
    from ilstudio.eval import DECLARED_MODE, evaluate, parse_args

    keys = ("successes", "num_episodes", "success_rate", "success_rate_ci95")
    usable = [r for r in (json.loads(f.read_text()) for f in _earlier_evaluations(ckpt))
              if r.get("seed") == seed and r.get("num_episodes", 0) >= episodes
              and (r.get("temporal_ensemble") == temporal_ensemble if temporal_ensemble is not None
                   else str(r.get("eval_mode_source")).endswith(DECLARED_MODE))]
    if usable:
        r = max(usable, key=lambda r: r["num_episodes"])
        return {k: r[k] for k in keys}

    argv = ["--checkpoint", str(ckpt), "--num_episodes", str(episodes), "--seed", str(seed),
            "--video_episodes", "0", "--no_progress",
            "--output_dir", str(ckpt / "curve_eval"), *(f"--gin_bindings={b}" for b in bindings)]
    if temporal_ensemble is not None:
        argv.append("--temporal_ensemble" if temporal_ensemble else "--no_temporal_ensemble")
    s = evaluate(parse_args(argv))
    return {k: s[k] for k in keys}


def plot(points: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    steps = [p["step"] for p in points]
    loss = [(p["step"], p["loss"]) for p in points if p.get("loss") is not None]
    if loss:
        axes[0].plot([s for s, _ in loss], [v for _, v in loss], "o-")
        axes[0].set_yscale("log")
    axes[0].set(title="training loss (L1, normalized)", xlabel="step")
    axes[1].plot(steps, [p["sensitivity"]["ratio"] for p in points], "o-", color="tab:orange")
    axes[1].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[1].set(title="image sensitivity (first-chunk spread / data)", xlabel="step", ylim=(0, None))
    succ = [p for p in points if "success" in p]
    if succ:
        x = [p["step"] for p in succ]
        y = [p["success"]["success_rate"] for p in succ]
        lo = [y_ - p["success"]["success_rate_ci95"][0] for y_, p in zip(y, succ, strict=True)]
        hi = [p["success"]["success_rate_ci95"][1] - y_ for y_, p in zip(y, succ, strict=True)]
        axes[2].errorbar(x, y, yerr=[lo, hi], fmt="o-", color="tab:green", capsize=3)
        ns = sorted({p["success"]["num_episodes"] for p in succ})
        axes[2].set(title=f"success ({'/'.join(map(str, ns))} episodes, Wilson 95%)")
    axes[2].set(xlabel="step", ylim=(0, 1.02))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=80)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--episodes", type=int, default=0, help="simulated episodes per checkpoint (0: none)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--temporal_ensemble", dest="temporal_ensemble", action="store_true",
                      default=None, help="force ensembling (default: the policy's declared mode)")
    mode.add_argument("--no_temporal_ensemble", dest="temporal_ensemble", action="store_false",
                      help="force chunked execution (the policy's query_every)")
    p.add_argument("--sensitivity_episodes", type=int, default=50)
    p.add_argument("--steps", default="", help="comma list: only these checkpoints")
    p.add_argument("--png", default=None)
    p.add_argument("--gin_bindings", action="append", default=[],
                   help="applied over the run's operative config, as in python -m ilstudio.eval "
                        "(e.g. vla.instruction = '...' for a VLA trained on per-episode prompts)")
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    state = _trainer_state(run)
    log = state.get("log_history", [])
    window = int(state.get("logging_steps") or 100) * 2
    only = {int(s) for s in args.steps.split(",") if s}
    points = []
    for step, ckpt in checkpoints(run):
        if only and step not in only:
            continue
        t0 = time.perf_counter()
        point = {"step": step, "checkpoint": str(ckpt), "loss": loss_near(log, step, window),
                 "sensitivity": sensitivity_of(ckpt, args.sensitivity_episodes,
                                               tuple(args.gin_bindings))}
        if args.episodes > 0:
            point["success"] = success_of(ckpt, args.episodes, args.temporal_ensemble,
                                          args.seed, tuple(args.gin_bindings))
        point["seconds"] = time.perf_counter() - t0
        points.append(point)
        s = point.get("success")
        print(f"step {step}: loss {point['loss']}, sensitivity {point['sensitivity']['ratio']:.2f}"
              + (f", success {s['successes']}/{s['num_episodes']}" if s else ""), flush=True)
    if not points:
        print(f"error: no checkpoints with model.safetensors in {run}", file=sys.stderr)
        return 2
    (run / "learning_curve_sim.json").write_text(json.dumps(points, indent=1) + "\n")
    png = Path(args.png) if args.png else run / "learning_curve_sim.png"
    plot(points, png, f"{run}")
    print(f"wrote {run / 'learning_curve_sim.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
