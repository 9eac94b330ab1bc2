"""Evaluate a trained run by rolling it out in the ALOHA simulation.

    python -m ilstudio.eval --checkpoint runs/sim_transfer_cube_scripted --num_episodes 50
    python -m ilstudio.eval --checkpoint runs/x/checkpoint-2000 --no_temporal_ensemble
    python -m ilstudio.eval --policy scripted --num_episodes 50     # the evaluator's own check

Everything about the run comes from the run directory: its operative_config.gin (task,
cameras, episode length, policy, chunk size, image fitting, the sim.* rendering the
training data was recorded with, and the policy's evaluation mode: ``<policy>.temporal_ensemble``
and ``<policy>.query_every``, e.g. TinyACT and ACT ensemble, MLP and VLA run chunks),
normalization.json and model.safetensors (a checkpoint-N or best/ directory reads the config
files of the run directory above it). Episodes use evaluation seeds, which never give an
object pose used for recording. A run whose task has no simulator is refused.

Every evaluation keeps its own folder: ``<run>/evals/seed<S>_episodes<N>/`` (prefixed with
the checkpoint's name, e.g. ``best_seed0_episodes50``, for a checkpoint inside the run; a
``_2``, ``_3``... suffix when that folder exists), holding eval_results.json (success rate
with its 95% Wilson interval, mean return, episode length, the evaluation mode, per-episode
details) and one successful and one failed episode as a GIF/MP4 (the file name says which).
``<run>/evals/latest.txt`` names the newest folder. ``--output_dir`` writes into a folder of
your choice instead. Nothing is written before the evaluation has finished.
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
    EVALS_DIR,
    NORM_STATS,
    OPERATIVE,
    WEIGHTS,
    atomic_path,
    output_errors,
    write_atomic,
)

FLAGS = flags.FlagValues()  # this program's own: importable beside train.py's flags
flags.DEFINE_string("checkpoint", None, "A run directory or one of its checkpoint-N directories.",
                    flag_values=FLAGS)
flags.DEFINE_enum("policy", "checkpoint", ["checkpoint", "scripted", "hold"],
                  "checkpoint: the trained policy; scripted: the recording's scripted policy (should "
                  "reach ~100%); hold: stand still (0%).", flag_values=FLAGS)
flags.DEFINE_integer("num_episodes", 50, "Simulated evaluation episodes.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Evaluation seed (0 to 2**32-1, as train.py's --seed); "
                     "episode poses never coincide with recording ones. The results folder is "
                     "named by it.", lower_bound=0, upper_bound=2**32 - 1, flag_values=FLAGS)
flags.DEFINE_bool("temporal_ensemble", None, "Force temporal ensembling on: query every step and "
                  "blend overlapping chunks (ACT, weights exp(-0.01 i)). Default: the policy's "
                  "declared mode, <policy>.temporal_ensemble in the run's operative_config.gin "
                  "(TinyACT/ACT: on; MLP/VLA: off).", flag_values=FLAGS)
flags.DEFINE_bool("no_temporal_ensemble", False, "Force temporal ensembling off: execute each "
                  "chunk for --query_every steps.", flag_values=FLAGS)
flags.DEFINE_integer("query_every", None, "Steps each chunk is executed without ensembling "
                     "(default: the policy's <policy>.query_every, 0 there meaning the chunk "
                     "size). Implies chunked execution.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string("task_name", "sim_transfer_cube_scripted", "For --policy scripted/hold: the "
                    "task (a checkpoint brings its own, in its operative_config.gin).", flag_values=FLAGS)
flags.DEFINE_string("output_dir", None, "Where this program writes the results and videos "
                    "(default: a new folder <run>/evals/seed<S>_episodes<N>; for scripted/hold "
                    "runs/eval_<policy>_<task_name>/evals/...).", flag_values=FLAGS)
flags.DEFINE_integer("video_episodes", 1, "Episodes saved as video: a success and a failure when "
                     "both happen (labelled in the file name), else the first ones.", lower_bound=0,
                     flag_values=FLAGS)
flags.DEFINE_enum("video_format", "gif", ["gif", "mp4"], "Video file format.", flag_values=FLAGS)
flags.DEFINE_integer("num_workers", 1, "Processes rolling out episodes in parallel (each its own "
                     "simulator and copy of the policy; results are identical to 1). Helps only "
                     "with idle cores.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string("device", "auto", "torch device: auto (cuda if available), cpu, cuda, "
                    "cuda:N or mps.", flag_values=FLAGS)
flags.DEFINE_bool("no_progress", False, "No progress bar.", flag_values=FLAGS)
define_gin_flags(FLAGS)
_GROUPS = [("Evaluation", ["checkpoint", "num_episodes", "seed", "temporal_ensemble",
                           "no_temporal_ensemble", "output_dir"]),
           ("Also", ["policy", "query_every", "task_name", "video_episodes", "video_format",
                     "num_workers", "device", "no_progress"])]
_ARGS = ("checkpoint", "policy", "num_episodes", "seed", "temporal_ensemble",
         "no_temporal_ensemble", "query_every", "task_name", "output_dir", "video_episodes",
         "video_format", "num_workers", "device", "no_progress", "gin_file", "gin_bindings",
         "gin_search_paths")


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
    # sim.* is built only where the run's config binds it: a task without a simulator gets
    # sim = None (and is refused by ``evaluate``), not the ALOHA cube scene's defaults.
    return build_settings(layers.provenance.source_of)


def check_frame_size(task, sim) -> str | None:
    """A warning if the run's training episodes were rendered at another size than sim.* says.

    Runs trained before sim.* was part of the config fall back to its defaults; the episodes
    themselves still tell the size the policy saw.
    """
    from ilstudio.data.sources import list_episodes

    try:  # the first episode of task.dataset_dir, HDF5 or LeRobot
        first = list_episodes(task.dataset_dir)[:1] if task.camera_names else []
        if not first:
            return None
        with first[0].open() as src:
            shape = src.frame_size(task.camera_names[0])
    except (OSError, KeyError, UserError):
        return None
    if tuple(shape) != (sim.render_height, sim.render_width):
        return (f"warning: {first[0]} frames are {shape[0]}x{shape[1]} but the run's sim.render_height/"
                f"width are {sim.render_height}x{sim.render_width}; rollouts render at the latter")
    return None


def load_policy(built, weights: Path, device: str):
    """Build the policy exactly as training did (``built``: the RunSettings ``load_settings``
    returns) and load its weights (strict)."""
    from ilstudio.models.state_io import load_strict, read_state
    from ilstudio.policies import build_policy

    dev = resolve_device(device)
    use_images = built.use_images
    model = build_policy(built)
    load_strict(model, read_state(weights),
                f"{weights} does not fit the policy its operative_config.gin describes")
    model.to(dev).eval()
    return model, use_images, dev


# -- running ------------------------------------------------------------------------------------


def save_video(frames, path: Path, fps: float, fmt: str | None = None) -> Path:
    """frames as an animated GIF or an MP4 (fmt: gif/mp4; default: the path's suffix)."""
    import imageio.v2 as imageio

    fmt = fmt or path.suffix.lstrip(".")
    if fmt == "gif":
        imageio.mimsave(path, frames, format="GIF", duration=1000.0 / fps, loop=0)
    else:
        imageio.mimsave(path, frames, format="FFMPEG", fps=fps)
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


def check_args(args: SimpleNamespace) -> None:
    """The flags' cross-checks, before anything is loaded or written (UserError: exit 2)."""
    if args.num_episodes < 1:
        raise UserError(f"--num_episodes must be >= 1, got {args.num_episodes}")
    if not 0 <= args.seed <= 2**32 - 1:
        raise UserError(f"--seed must be in [0, 4294967295] (as train.py's), got {args.seed}")
    if args.temporal_ensemble is False:  # absl's --notemporal_ensemble: the same as ours
        args.no_temporal_ensemble = True
    if args.temporal_ensemble and args.no_temporal_ensemble:
        raise UserError("--temporal_ensemble and --no_temporal_ensemble contradict each other: "
                        "give one (neither: the policy's declared mode)")
    if args.temporal_ensemble and args.query_every:
        raise UserError("--query_every applies to chunked execution; with --temporal_ensemble "
                        "the policy is queried every step: give one of them")
    if args.policy != "checkpoint" and args.checkpoint:
        raise UserError(f"--checkpoint={args.checkpoint} and --policy {args.policy} contradict each "
                        f"other: --policy {args.policy} rolls out its own policy on --task_name "
                        f"(give one of them)")
    if args.policy != "checkpoint" and (args.temporal_ensemble or args.no_temporal_ensemble
                                        or args.query_every):
        raise UserError(f"--temporal_ensemble/--no_temporal_ensemble/--query_every apply to "
                        f"trained policies, not --policy {args.policy}")
    if args.output_dir and Path(args.output_dir).expanduser().exists() \
            and not Path(args.output_dir).expanduser().is_dir():
        raise UserError(f"--output_dir={args.output_dir}: exists and is not a directory "
                        f"(expected a directory to write eval_results.json into, or a new path)")
    if args.video_format == "mp4" and args.video_episodes > 0:
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise UserError("--video_format=mp4 needs the imageio-ffmpeg package "
                            "(pip install imageio-ffmpeg); --video_format=gif needs nothing more") from None
    resolve_device(args.device)


def resolve_device(name: str):
    """--device as a torch.device: auto (cuda when available), or a device that exists here."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device={name!r}: not a torch device (expected auto, cpu, cuda, "
                        f"cuda:N or mps)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(dev.type, False):
        raise UserError(f"--device={name!r}: no {dev.type} device on this machine (use auto or cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device={name!r}: this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s)")
    return dev


DECLARED_MODE = "(the policy's declared mode)"  # ends eval_mode_source when no flag chose it


def eval_mode(args: SimpleNamespace, policy_config) -> tuple[bool, int | None, str]:
    """(temporal ensembling, query_every or None for the whole chunk, where that came from):
    the flags when given, else the policy's declared ``<policy>.temporal_ensemble`` and
    ``<policy>.query_every`` (the run's operative_config.gin)."""
    name = policy_config.gin_name
    if args.temporal_ensemble:
        return True, None, "--temporal_ensemble"
    if args.no_temporal_ensemble or args.temporal_ensemble is False or args.query_every:
        why = "--query_every" if args.query_every else "--no_temporal_ensemble"
        return False, args.query_every or policy_config.query_every or None, why
    te, every = policy_config.temporal_ensemble, policy_config.query_every or None
    source = f"{name}.temporal_ensemble" + ("" if te or not every else f" and {name}.query_every")
    return te, every, f"{source} {DECLARED_MODE}"


def load_norm_stats(norm: Path):
    """normalization.json, refused (UserError) when a value is not a finite number."""
    import numpy as np

    from ilstudio.data.normalization import NormStats

    try:
        stats = NormStats.load(norm)
        bad = [k for k, v in stats.to_dict().items() if not np.isfinite(v).all()]
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{norm}: not a readable normalization file ({e})") from None
    if bad:
        raise UserError(f"{norm}: {', '.join(bad)} hold non-finite values (NaN or inf); expected "
                        f"the finite mean/std train.py computed (retrain, or restore the file)")
    return stats


def checkpoint_agent(args: SimpleNamespace, info: dict):
    """(agent, task, sim, run directory, evaluation-folder prefix) of --checkpoint."""
    from ilstudio.sim import rollout

    if not args.checkpoint:
        raise UserError("--checkpoint is required (or --policy scripted / hold)")
    weights, operative, norm = run_files(args.checkpoint)
    built = load_settings(operative, args.gin_file, args.gin_bindings, args.gin_search_paths)
    if built.sim is None:
        raise UserError(f"--checkpoint={args.checkpoint}: the run's task has no simulator (its "
                        f"{operative.name} binds no sim.*; the simulated tasks are "
                        f"sim_transfer_cube_scripted and sim_insertion_scripted), so it cannot "
                        f"be evaluated in simulation. A run trained on a simulated task before "
                        f"sim.* was recorded: add --gin_bindings=\"sim.task = 'transfer_cube'\" "
                        f"and its sim.render_height/width")
    stats = load_norm_stats(norm)
    task, sim, chunk = built.task, built.sim, built.model.chunk_size
    if not task.camera_names:
        raise UserError("task.camera_names is empty: the simulator needs a camera to render")
    te, query_every, mode_source = eval_mode(args, built.policy)
    if query_every and query_every > chunk:
        raise UserError(f"--query_every={query_every}: must be between 1 and the chunk size {chunk}")
    model, use_images, device = load_policy(built, weights, args.device)
    warning = check_frame_size(task, sim)
    if warning:
        print(warning, file=sys.stderr)
    agent = rollout.policy_agent(model, stats, task, built.dataset, chunk, device=device,
                                 use_images=use_images, query_every=query_every,
                                 temporal_ensemble=te)
    run_dir = operative.parent
    prefix = "" if weights.parent == run_dir else f"{weights.parent.name}_"
    info.update(checkpoint=str(weights.parent), model_policy=built.model.policy, chunk_size=chunk,
                temporal_ensemble=te, query_every=agent.query_every, eval_mode_source=mode_source,
                device=str(device))
    return agent, task, sim, run_dir, prefix


def evaluate(args: SimpleNamespace) -> dict:
    """Check the flags, roll out, then write the results folder (nothing is written before)."""
    from ilstudio.sim import rollout

    check_args(args)
    info: dict = {"policy": args.policy, "seed": args.seed}
    if args.policy == "checkpoint":
        agent, task, sim, base, prefix = checkpoint_agent(args, info)
    else:
        from ilstudio.sim.config import load_task

        task, sim = load_task(args.task_name, args.gin_bindings, args.gin_file, args.gin_search_paths)
        if not task.camera_names:
            raise UserError("task.camera_names is empty: the simulator needs a camera to render")
        agent = (rollout.ScriptedAgent(sim, task.episode_len) if args.policy == "scripted"
                 else rollout.HoldAgent())
        base, prefix = Path(f"runs/eval_{args.policy}_{args.task_name}"), ""
        info.update(task_name=args.task_name, temporal_ensemble=False)
    info.update(sim_task=sim.task, episode_len=task.episode_len, cameras=list(task.camera_names),
                render=[sim.render_height, sim.render_width], render_mesh_mm=sim.render_mesh_mm,
                num_workers=args.num_workers)
    results, seconds = roll_out(args, agent, task, sim)
    summary = {**info, **rollout.summarize(results, seconds)}
    replay = lambda i: rollout.run_episodes(  # noqa: E731 - the same episode again, filmed
        agent, task, sim, args.num_episodes, args.seed, video_episodes=1, episodes=[i])[0]
    chosen = filmed(results, args.video_episodes, replay)
    out = (Path(args.output_dir).expanduser() if args.output_dir
           else new_eval_dir(base, f"{prefix}seed{args.seed}_episodes{args.num_episodes}"))
    write_results(out, summary, chosen, args.video_format)
    if not args.output_dir:
        write_atomic(out.parent / LATEST, out.name + "\n")
    return summary


def roll_out(args: SimpleNamespace, agent, task, sim) -> tuple[list, float]:
    """The episodes of the evaluation (in --num_workers processes), with a progress bar."""
    from tqdm import tqdm

    from ilstudio.sim import rollout

    bar = tqdm(total=args.num_episodes, desc=f"evaluating {args.policy}", unit="ep",
               disable=args.no_progress, file=sys.stderr)
    wins = [0, 0]

    def progress(res) -> None:
        wins[0] += res.success
        wins[1] += 1
        bar.update(1)
        bar.set_postfix(success=f"{wins[0]}/{wins[1]}")

    t0 = time.perf_counter()
    results = rollout.run_episodes_parallel(agent, task, sim, args.num_episodes, args.seed,
                                            workers=args.num_workers,
                                            video_episodes=args.video_episodes,
                                            on_episode=progress)
    bar.close()
    return results, time.perf_counter() - t0


LATEST = "latest.txt"  # in <run>/evals/: the name of the newest evaluation's folder


def new_eval_dir(base: Path, name: str) -> Path:
    """A new folder ``base/evals/name`` (``name_2``, ``name_3``... when taken), created now:
    mkdir claims the name, so two evaluations at once never share a folder."""
    evals = base / EVALS_DIR
    with output_errors(base, EVALS_DIR):
        evals.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            path = evals / (name if n == 1 else f"{name}_{n}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    raise UserError(f"{evals}: no free folder name for {name} (remove old evaluations)")


def write_results(out: Path, summary: dict, chosen: list, video_format: str) -> None:
    """The videos, then eval_results.json (last: a folder with it is complete), atomically."""
    from gym_aloha.constants import FPS

    videos = []
    with output_errors(out, EVAL_RESULTS):
        out.mkdir(parents=True, exist_ok=True)
        for r in chosen:
            label = "success" if r.success else "failure"
            path = out / f"eval_episode_{r.index}_{label}.{video_format}"
            with atomic_path(path) as tmp:
                save_video(r.frames, tmp, fps=FPS / 2, fmt=video_format)
            videos.append(str(path))
        summary["videos"] = videos
        write_atomic(out / EVAL_RESULTS, json.dumps(summary, indent=1) + "\n")
    summary["results_file"] = str(out / EVAL_RESULTS)


def _evaluate(rest: list[str]) -> int:
    del rest
    s = evaluate(SimpleNamespace(**{name: FLAGS[name].value for name in _ARGS}))
    lo, hi = s["success_rate_ci95"]
    print(f"success {s['successes']}/{s['num_episodes']} = {s['success_rate']:.0%} "
          f"(95% CI {lo:.0%}-{hi:.0%}); mean return {s['mean_return']:.1f}; mean episode length "
          f"{s['mean_episode_length']:.0f}; {s['seconds_per_episode']:.1f} s/episode")
    if s["policy"] == "checkpoint":
        mode = ("temporal ensembling" if s["temporal_ensemble"]
                else f"chunks of {s['query_every']} steps")
        print(f"mode: {mode} (from {s['eval_mode_source']})")
    print(f"results: {s['results_file']}" + (f"; video: {', '.join(s['videos'])}" if s["videos"] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ilstudio.eval`` / ``ilstudio-eval`` (argv: the flags; default sys.argv)."""
    return run_program(FLAGS, _evaluate, argv, __doc__, _GROUPS)


if __name__ == "__main__":
    sys.exit(main())
