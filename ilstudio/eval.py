"""Evaluate a trained run by rolling it out in the ALOHA simulation.

    python -m ilstudio.eval --checkpoint runs/sim_transfer_cube_scripted --num_episodes 50
    python -m ilstudio.eval --checkpoint runs/x/checkpoint-2000 --temporal_ensemble
    python -m ilstudio.eval --policy scripted --num_episodes 50     # the evaluator's own check

Everything about the run comes from the run directory: its operative_config.gin (task,
cameras, episode length, policy, chunk size, image fitting, and the sim.* rendering the
training data was recorded with), normalization.json and model.safetensors (a checkpoint-N
directory reads the config files of the run directory above it). Episodes use evaluation
seeds, which never give an object pose used for recording. Results (success rate with its
95% Wilson interval, mean return, episode length, per-episode details) are written to
<checkpoint>/eval_results.json, and one successful and one failed episode (when both
happened; the file name says which) as a GIF/MP4 next to it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from absl import flags

from ilstudio.cli import define_gin_flags, parse_command_line, run_program
from ilstudio.errors import UserError
from ilstudio.rundir import (
    CHECKPOINT_PREFIX,
    EVAL_RESULTS,
    NORM_STATS,
    OPERATIVE,
    WEIGHTS,
    write_atomic,
)

FLAGS = flags.FlagValues()  # this program's own: importable beside train.py's flags
flags.DEFINE_string("checkpoint", None, "A run directory or one of its checkpoint-N directories.",
                    flag_values=FLAGS)
flags.DEFINE_enum("policy", "checkpoint", ["checkpoint", "scripted", "hold"],
                  "checkpoint: the trained policy; scripted: the recording's scripted policy (should "
                  "reach ~100%); hold: stand still (0%).", flag_values=FLAGS)
flags.DEFINE_integer("num_episodes", 50, "Simulated evaluation episodes.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Evaluation seed; episode poses never coincide with recording ones.",
                     flag_values=FLAGS)
flags.DEFINE_bool("temporal_ensemble", False, "Query every step and blend overlapping chunks (ACT, "
                  "weights exp(-0.01 i)).", flag_values=FLAGS)
flags.DEFINE_integer("query_every", None, "Steps each chunk is executed without ensembling "
                     "(default: the chunk size).", flag_values=FLAGS)
flags.DEFINE_string("task_name", "sim_transfer_cube_scripted", "For --policy scripted/hold: the "
                    "task (a checkpoint brings its own, in its operative_config.gin).", flag_values=FLAGS)
flags.DEFINE_string("output_dir", None, "Where this program writes: the results (default: the "
                    "checkpoint directory; for scripted/hold runs/eval_<policy>_<task_name>).",
                    flag_values=FLAGS)
flags.DEFINE_integer("video_episodes", 1, "Episodes saved as video: a success and a failure when "
                     "both happen (labelled in the file name), else the first ones.", flag_values=FLAGS)
flags.DEFINE_enum("video_format", "gif", ["gif", "mp4"], "Video file format.", flag_values=FLAGS)
flags.DEFINE_string("device", "auto", "torch device (auto: cuda if available).", flag_values=FLAGS)
flags.DEFINE_bool("no_progress", False, "No progress bar.", flag_values=FLAGS)
define_gin_flags(FLAGS)
_GROUPS = [("Evaluation", ["checkpoint", "num_episodes", "temporal_ensemble", "output_dir"]),
           ("Also", ["policy", "seed", "query_every", "task_name", "video_episodes", "video_format",
                     "device", "no_progress"])]
_ARGS = ("checkpoint", "policy", "num_episodes", "seed", "temporal_ensemble", "query_every",
         "task_name", "output_dir", "video_episodes", "video_format", "device", "no_progress",
         "gin_file", "gin_bindings", "gin_search_paths")


def parse_args(argv: list[str]) -> SimpleNamespace:
    """The evaluation settings of a command line (what ``evaluate`` takes), for callers."""
    FLAGS.unparse_flags()
    parse_command_line(FLAGS, ["ilstudio-eval", *argv])
    return SimpleNamespace(**{name: FLAGS[name].value for name in _ARGS})


# -- loading a run ------------------------------------------------------------------------------


def run_files(checkpoint: str) -> tuple[Path, Path, Path]:
    """(weights, operative config, normalization stats) of a run or checkpoint directory."""
    d = Path(checkpoint).expanduser()
    if not d.is_dir():
        raise UserError(f"--checkpoint={checkpoint}: no such directory (expected a run directory "
                        f"written by train.py, or a checkpoint-N directory inside one)")
    weights = d / WEIGHTS
    if not weights.is_file():
        ckpts = sorted(d.glob(f"{CHECKPOINT_PREFIX}-*"), key=lambda c: c.stat().st_mtime)
        hint = f"; try --checkpoint={ckpts[-1]}" if ckpts else ""
        raise UserError(f"--checkpoint={checkpoint}: {d} has no {WEIGHTS} (training not finished?){hint}")

    def find(name: str) -> Path:
        for base in (d, d.parent):
            if (base / name).is_file():
                return base / name
        raise UserError(f"--checkpoint={checkpoint}: no {name} in {d} or {d.parent} "
                        f"(train.py writes it into the run directory)")

    return weights, find(OPERATIVE), find(NORM_STATS)


def load_settings(operative: Path, gin_files=(), gin_bindings=(), gin_search_paths=()) -> dict:
    """Parse a run's operative_config.gin into its settings objects (as train.py built them),
    then --gin_file and --gin_bindings in order, with the meaning they have in train.py."""
    from ilstudio.resolve import build_settings, layer_gin

    try:
        layer_gin(gin_files=[str(operative)])
    except UserError as e:
        raise UserError(f"{operative}: cannot be parsed with this ilstudio ({e})") from None
    layers = layer_gin(gin_files=[str(operative), *gin_files], gin_bindings=list(gin_bindings),
                       search_paths=list(gin_search_paths))
    return build_settings(layers.provenance.source_of, with_sim=True)


def check_frame_size(task, sim) -> str | None:
    """A warning if the run's training episodes were rendered at another size than sim.* says.

    Runs trained before sim.* was part of the config fall back to its defaults; the episodes
    themselves still tell the size the policy saw.
    """
    from ilstudio.data.episodes import open_episode
    from ilstudio.data.sources import list_episodes

    try:  # the first episode of task.dataset_dir, HDF5 or LeRobot
        first = list_episodes(task.dataset_dir)[:1] if task.camera_names else []
        if not first:
            return None
        with open_episode(first[0]) as f:
            shape = f[f"observations/images/{task.camera_names[0]}"].shape[1:3]
    except (OSError, KeyError, UserError):
        return None
    if tuple(shape) != (sim.render_height, sim.render_width):
        return (f"warning: {first[0]} frames are {shape[0]}x{shape[1]} but the run's sim.render_height/"
                f"width are {sim.render_height}x{sim.render_width}; rollouts render at the latter")
    return None


def load_policy(built, weights: Path, device: str):
    """Build the policy exactly as training did (``built``: the RunSettings ``load_settings``
    returns) and load its weights (strict)."""
    import torch

    from ilstudio.models.state_io import load_strict, read_state
    from ilstudio.policies import build_policy

    use_images = built.use_images
    model = build_policy(built)
    load_strict(model, read_state(weights),
                f"{weights} does not fit the policy its operative_config.gin describes")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model.to(dev).eval()
    return model, use_images, dev


# -- running ------------------------------------------------------------------------------------


def save_video(frames, path: Path, fps: float) -> Path:
    import imageio.v2 as imageio

    if path.suffix == ".gif":
        imageio.mimsave(path, frames, duration=1000.0 / fps, loop=0)
    else:
        imageio.mimsave(path, frames, fps=fps)
    return path


def filmed(results: list, per_kind: int, replay) -> list:
    """The episodes to save as video: the first ``per_kind`` successes and failures, so a
    reader sees both when both happened. Episodes filmed during the run are used as they are;
    a missing kind is replayed with frames (``replay(index)``: the same episode again)."""
    if per_kind <= 0:
        return []
    chosen = []
    for kind in (True, False):
        of_kind = [r for r in results if r.success == kind][:per_kind]
        chosen += [r if r.frames else replay(r.index) for r in of_kind]
    return sorted(chosen, key=lambda r: r.index)


def evaluate(args: SimpleNamespace) -> dict:
    from tqdm import tqdm

    from ilstudio.sim import rollout

    if args.num_episodes < 1:
        raise UserError(f"--num_episodes must be >= 1, got {args.num_episodes}")
    if args.video_format == "mp4" and args.video_episodes > 0:
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise UserError("--video_format=mp4 needs the imageio-ffmpeg package "
                            "(pip install imageio-ffmpeg); --video_format=gif needs nothing more") from None
    info: dict = {"policy": args.policy, "seed": args.seed, "temporal_ensemble": args.temporal_ensemble}
    if args.policy == "checkpoint":
        if not args.checkpoint:
            raise UserError("--checkpoint is required (or --policy scripted / hold)")
        weights, operative, norm = run_files(args.checkpoint)
        built = load_settings(operative, args.gin_file, args.gin_bindings, args.gin_search_paths)
        from ilstudio.data.normalization import NormStats

        stats = NormStats.load(norm)
        model, use_images, device = load_policy(built, weights, args.device)
        task, sim, chunk = built.task, built.sim, built.model.chunk_size
        warning = check_frame_size(task, sim)
        if warning:
            print(warning, file=sys.stderr)
        agent = rollout.policy_agent(model, stats, task, built.dataset, chunk, device=device,
                                     use_images=use_images, query_every=args.query_every,
                                     temporal_ensemble=args.temporal_ensemble)
        query_every = agent.query_every
        out = Path(args.output_dir) if args.output_dir else weights.parent
        info.update(checkpoint=str(weights.parent), model_policy=built.model.policy,
                    chunk_size=chunk, query_every=1 if args.temporal_ensemble else query_every,
                    device=str(device))
    else:
        from ilstudio.sim.config import load_task

        if args.temporal_ensemble:
            raise UserError(f"--temporal_ensemble applies to trained policies, not --policy {args.policy}")
        task, sim = load_task(args.task_name, args.gin_bindings, args.gin_file, args.gin_search_paths)
        agent = (rollout.ScriptedAgent(sim, task.episode_len) if args.policy == "scripted"
                 else rollout.HoldAgent())
        out = Path(args.output_dir or f"runs/eval_{args.policy}_{args.task_name}")
        info.update(task_name=args.task_name)
    if not task.camera_names:
        raise UserError("task.camera_names is empty: the simulator needs a camera to render")
    out.mkdir(parents=True, exist_ok=True)
    info.update(sim_task=sim.task, episode_len=task.episode_len, cameras=list(task.camera_names),
                render=[sim.render_height, sim.render_width])

    bar = tqdm(total=args.num_episodes, desc=f"evaluating {args.policy}", unit="ep",
               disable=args.no_progress, file=sys.stderr)
    wins = [0]

    def progress(res) -> None:
        wins[0] += res.success
        bar.update(1)
        bar.set_postfix(success=f"{wins[0]}/{res.index + 1}")

    t0 = time.perf_counter()
    results = rollout.run_episodes(agent, task, sim, args.num_episodes, args.seed,
                                   video_episodes=args.video_episodes, on_episode=progress)
    bar.close()
    summary = {**info, **rollout.summarize(results, time.perf_counter() - t0)}
    videos = []
    for r in filmed(results, args.video_episodes, lambda i: rollout.run_episodes(
            agent, task, sim, args.num_episodes, args.seed, video_episodes=1, episodes=[i])[0]):
        from gym_aloha.constants import FPS

        label = "success" if r.success else "failure"
        path = out / f"eval_episode_{r.index}_{label}.{args.video_format}"
        videos.append(str(save_video(r.frames, path, fps=FPS / 2)))
    summary["videos"] = videos
    write_atomic(out / EVAL_RESULTS, json.dumps(summary, indent=1) + "\n")
    summary["results_file"] = str(out / EVAL_RESULTS)
    return summary


def _evaluate(rest: list[str]) -> int:
    del rest
    s = evaluate(SimpleNamespace(**{name: FLAGS[name].value for name in _ARGS}))
    lo, hi = s["success_rate_ci95"]
    print(f"success {s['successes']}/{s['num_episodes']} = {s['success_rate']:.0%} "
          f"(95% CI {lo:.0%}-{hi:.0%}); mean return {s['mean_return']:.1f}; mean episode length "
          f"{s['mean_episode_length']:.0f}; {s['seconds_per_episode']:.1f} s/episode")
    print(f"results: {s['results_file']}" + (f"; video: {', '.join(s['videos'])}" if s["videos"] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ilstudio.eval`` / ``ilstudio-eval`` (argv: the flags; default sys.argv)."""
    return run_program(FLAGS, _evaluate, argv, __doc__, _GROUPS)


if __name__ == "__main__":
    sys.exit(main())
