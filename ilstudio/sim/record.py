"""Record scripted demonstrations: ``python -m ilstudio.sim.record --num_episodes 50``.

For each attempt k (cube pose seeded by (--seed, k)): the waypoint policy drives the
end-effector scene (physics only); its joint trajectory is replayed in the joint-space
scene while the task's cameras are rendered; the episode is kept only if the replay ends
with the task's maximal reward (final step, not any step). Kept episodes are numbered
0..N-1 and written atomically. Rerunning with the same settings continues an interrupted
recording (episode k of a seed is always the same episode).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from absl import flags

from ilstudio.cli import define_gin_flags, run_program
from ilstudio.config.settings import SIM_INSTRUCTIONS
from ilstudio.errors import UserError

RECORDER = "ilstudio.sim.record"


@dataclass
class Recorded:
    """One replayed episode (arrays) and whether it succeeded."""

    qpos: np.ndarray
    qvel: np.ndarray
    action: np.ndarray
    images: dict[str, np.ndarray]
    final_reward: float
    success: bool


def replay(env, renderer, pose: np.ndarray, actions: np.ndarray) -> Recorded:
    """Replay joint actions from the pose, recording the observation before each action."""
    from ilstudio.sim.envs import max_reward, reset_joint_env

    ts = reset_joint_env(env, pose)
    qpos, qvel = [], []
    frames: dict[str, list[np.ndarray]] = {c: [] for c in renderer.cameras}
    for a in actions:
        qpos.append(ts.observation["qpos"])
        qvel.append(ts.observation["qvel"])
        for cam, img in renderer.render().items():
            frames[cam].append(img)
        ts = env.step(a)
    final = float(ts.reward or 0.0)
    return Recorded(np.asarray(qpos), np.asarray(qvel), np.asarray(actions),
                    {c: np.stack(v) for c, v in frames.items()}, final, final == max_reward(env))


def _settings_attrs(task, sim, seed: int) -> dict:
    return {"recorder": RECORDER, "seed": seed, "sim_task": sim.task,
            "render_height": sim.render_height, "render_width": sim.render_width,
            "shadows": sim.shadows, "multisamples": sim.multisamples,
            "render_mesh_mm": sim.render_mesh_mm, "weld_torquescale": sim.weld_torquescale,
            "episode_len": task.episode_len,
            "camera_names": ",".join(task.camera_names)}


def existing_progress(out: Path, expected: dict) -> tuple[int, int]:
    """(episodes already there, next attempt index) for resuming; UserError if they differ."""
    import h5py

    from ilstudio.data.episodes import list_episode_files

    files = list_episode_files(out) if any(out.glob("*.hdf5")) else []
    next_attempt = 0
    for i, p in enumerate(files):
        if p.name != f"episode_{i}.hdf5":
            raise UserError(f"{out} holds {p.name} where episode_{i}.hdf5 was expected: it is not "
                            f"a recording this command can continue; choose another --output_dir")
        with h5py.File(p, "r") as f:
            attrs = {k: f.attrs.get(k, _BEFORE_ATTR.get(k)) for k in [*expected, "attempt"]}
        differs = {k: (attrs[k], v) for k, v in expected.items()
                   if not _same(attrs[k], v)}
        if differs:
            what = ", ".join(f"{k}: file {a!r} vs now {b!r}" for k, (a, b) in differs.items())
            raise UserError(f"{p} was recorded with other settings ({what}); continue it with the "
                            f"same settings or choose another --output_dir")
        next_attempt = max(next_attempt, int(attrs["attempt"]) + 1)
    return len(files), next_attempt


# Settings attributes that earlier recorders did not write, with the value they rendered with.
_BEFORE_ATTR = {"render_mesh_mm": 0.0}


def _same(a, b) -> bool:
    if a is None:
        return False
    if isinstance(a, bytes):
        a = a.decode()
    if isinstance(b, float) or isinstance(a, float):
        return float(a) == float(b)
    return type(b)(a) == b


def _prepared_output(task, output_dir: str | os.PathLike) -> Path:
    """The episodes' folder, created, with partial files of a killed recording removed."""
    from ilstudio.sim.writer import remove_partials

    if not task.camera_names:
        raise UserError("task.camera_names is empty: the recorder needs at least one camera")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir={out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    remove_partials(out)
    return out


def record(task, sim, output_dir: str | os.PathLike, num_episodes: int, seed: int = 0,
           max_attempts: int | None = None, progress: bool = True) -> dict:
    """Record until ``num_episodes`` successful episodes exist in output_dir; returns a summary."""
    from tqdm import tqdm

    from ilstudio.sim.envs import RECORD, Renderer, episode_seed, make_joint_env, object_pose
    from ilstudio.sim.scripted import ScriptedPlanner
    from ilstudio.sim.writer import write_episode

    if num_episodes < 1:
        raise UserError(f"--num_episodes must be >= 1, got {num_episodes}")
    out = _prepared_output(task, output_dir)
    attrs = _settings_attrs(task, sim, seed)
    have, attempt = existing_progress(out, attrs)
    max_attempts = max_attempts if max_attempts is not None else 4 * num_episodes + 10
    stats = {"kept": have, "already_there": have, "attempts": 0, "failed_scripted": 0,
             "failed_replay": 0, "seconds": 0.0, "bytes": 0}
    if have >= num_episodes:
        return {**stats, "output_dir": str(out)}

    planner = ScriptedPlanner(sim)
    env = make_joint_env(sim)
    renderer = Renderer(env.physics, task.camera_names, sim)
    bar = tqdm(total=num_episodes, initial=have, desc=f"recording {sim.task}", unit="ep",
               disable=not progress, file=sys.stderr)
    t_start = time.perf_counter()
    while stats["kept"] < num_episodes:
        if stats["attempts"] >= max_attempts:
            bar.close()
            raise UserError(f"only {stats['kept']} of {num_episodes} episodes succeeded in "
                            f"{max_attempts} attempts: the scripted policy fails on this task "
                            f"with these settings ({stats})")
        ep_seed = episode_seed(RECORD, seed, attempt)
        pose = object_pose(sim.task, ep_seed)
        stats["attempts"] += 1
        plan = planner.plan(pose, task.episode_len)
        rec = replay(env, renderer, pose, plan.joint_actions)
        if rec.success:
            path = out / f"episode_{stats['kept']}.hdf5"
            write_episode(path, qpos=rec.qpos, qvel=rec.qvel, action=rec.action, images=rec.images,
                          gzip_level=sim.gzip_level,
                          attrs={**attrs, "attempt": attempt, "episode_seed": ep_seed,
                                 "object_pose": pose,
                                 "language_instruction": SIM_INSTRUCTIONS[sim.task]})
            stats["bytes"] += path.stat().st_size
            stats["kept"] += 1
            bar.update(1)
        else:
            stats["failed_replay" if plan.final_reward == 4 else "failed_scripted"] += 1
        bar.set_postfix(attempts=stats["attempts"], failed=stats["attempts"] - stats["kept"] + have)
        attempt += 1
    bar.close()
    stats["seconds"] = time.perf_counter() - t_start
    recorded = stats["kept"] - have
    stats["seconds_per_attempt"] = stats["seconds"] / max(1, stats["attempts"])
    stats["mib_per_episode"] = stats["bytes"] / max(1, recorded) / 2**20
    return {**stats, "output_dir": str(out)}


FLAGS = flags.FlagValues()  # this program's own: importable beside train.py's flags
flags.DEFINE_string("task_name", "sim_transfer_cube_scripted",
                    "gin_configs/tasks/<task_name>.gin: dims, cameras, episode length, sim.*",
                    flag_values=FLAGS)
flags.DEFINE_integer("num_episodes", 50, "Successful episodes to keep.", lower_bound=1,
                     upper_bound=10**6, flag_values=FLAGS)
flags.DEFINE_string("output_dir", None, "Where this program writes: the episodes (default: the "
                    "task's task.dataset_dir, where train.py looks for them).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Object poses of attempt k come from (seed, k).", lower_bound=0,
                     upper_bound=2**63 - 1, flag_values=FLAGS)
flags.DEFINE_enum("format", "hdf5", ["hdf5", "lerobot"], "hdf5: ACT-layout episode_<i>.hdf5 "
                  "files; lerobot: a LeRobotDataset v3.0 (episodes are recorded resumably beside "
                  "it, then converted).", flag_values=FLAGS)
flags.DEFINE_integer("max_attempts", None, "Give up after this many attempts (default "
                     "4*num_episodes+10; insertion keeps about half).", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_bool("no_progress", False, "No progress bar.", flag_values=FLAGS)
define_gin_flags(FLAGS)
_GROUPS = [("Recording", ["task_name", "num_episodes", "output_dir", "seed", "format"]),
           ("Also", ["max_attempts", "no_progress"])]


def _record(rest: list[str]) -> int:
    del rest
    from ilstudio.sim.config import load_task

    task, sim = load_task(FLAGS.task_name, FLAGS.gin_bindings, FLAGS.gin_file, FLAGS.gin_search_paths)
    out = FLAGS.output_dir or task.dataset_dir
    if not out or not isinstance(out, str):
        raise UserError(f"no --output_dir and task.dataset_dir of {FLAGS.task_name} is not one "
                        f"directory: give --output_dir")
    if FLAGS.format == "lerobot":
        from ilstudio.data.convert import finish_recording, recording_staging

        target, out = out, recording_staging(out)
    summary = record(task, sim, out, FLAGS.num_episodes, seed=FLAGS.seed,
                     max_attempts=FLAGS.max_attempts, progress=not FLAGS.no_progress)
    if FLAGS.format == "lerobot":
        summary["output_dir"] = finish_recording(out, target, robot_type=f"aloha_sim_{sim.task}")
    recorded = summary["kept"] - summary["already_there"]
    print(f"{summary['kept']} episodes in {summary['output_dir']} ({recorded} recorded now, "
          f"{summary['already_there']} already there; {summary['attempts']} attempts, "
          f"{summary['failed_scripted']} scripted failures, {summary['failed_replay']} replay failures)")
    if recorded:
        print(f"recording: {summary['seconds']:.1f} s total, {summary['seconds_per_attempt']:.2f} s per "
              f"attempt; {summary['mib_per_episode']:.2f} MiB per episode")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ilstudio.sim.record`` / ``ilstudio-record`` (argv: the flags; default sys.argv)."""
    return run_program(FLAGS, _record, argv, __doc__, _GROUPS)


if __name__ == "__main__":
    sys.exit(main())
