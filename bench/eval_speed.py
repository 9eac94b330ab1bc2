"""Evaluation speed before and after, side by side: simulated episodes per minute.

    OMP_NUM_THREADS=1 MUJOCO_GL=egl python bench/eval_speed.py RUN [--episodes 6] [--workers 2]

RUN is a trained run directory (e.g. the quickstart's TinyACT). For each evaluation mode
(the policy's declared one, and chunked execution with --no_temporal_ensemble), it measures

* before: the loop as it was (a frame rendered at every step when the policy reads images,
  one process);
* after: frames rendered only at the steps the policy reads them (one per chunk when
  chunked; every step when ensembling), in 1 process and in ``--workers`` processes;
* mesh MM: the same, rendering the scene with meshes simplified at ``--mesh_mm`` millimetres
  (``sim.render_mesh_mm``: fewer triangles for the CPU rasterizer, frames a little different;
  skipped with --mesh_mm 0),

interleaved (before, after, before, after... one block of episodes at a time, so load on a
shared machine hits both alike), on the same evaluation seed and episodes. It prints episodes
per minute of each, the ratio, the CPU seconds an episode took (all threads of the processes
that ran it: what a busy shared machine cannot distort), and whether every episode's success
and return are identical to before's (and, when not, whether its success is). Then how much
the frames the policy sees differ between render settings (multisampling, smaller renders,
simplified meshes) and what one frame costs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("OMP_NUM_THREADS", "1")


class EveryStep:
    """The loop as it was: a policy that reads images gets a frame rendered at every step."""

    def __init__(self, agent) -> None:
        self.agent = agent
        self.uses_images = agent.uses_images

    def reset(self, pose) -> None:
        self.agent.reset(pose)

    def wants_frames(self, t: int) -> bool:
        return self.uses_images

    def act(self, t, qpos, frames):
        return self.agent.act(t, qpos, frames)


def load_agent(run: str, mode: str, episode_len: int | None = None):
    from types import SimpleNamespace

    from ilstudio.eval import checkpoint_agent, parse_args

    argv = ["--checkpoint", run, "--video_episodes", "0"]
    argv += {"declared": [], "chunked": ["--no_temporal_ensemble"]}[mode]
    if episode_len:
        argv += [f"--gin_bindings=task.episode_len = {episode_len}"]
    args = parse_args(argv)
    info: dict = {}
    agent, task, sim, _, _ = checkpoint_agent(args, info)
    return SimpleNamespace(agent=agent, task=task, sim=sim, info=info)


def prepare(run: str, mode: str, workers: int, seed: int, mesh_mm: float,
            episode_len: int | None = None) -> dict:
    """The agent of ``mode`` and its variants; worker pools are forked before anything is
    rendered."""
    import dataclasses

    a = load_agent(run, mode, episode_len)
    sims = {"": a.sim}
    if mesh_mm > 0:
        sims[f"mesh {mesh_mm:g} mm, "] = dataclasses.replace(a.sim, render_mesh_mm=mesh_mm)
    variants = {"before": InProcess(EveryStep(a.agent), a.task, a.sim, seed)}
    for tag, sim in sims.items():
        variants[f"{tag or 'after, '}1 process"] = InProcess(a.agent, a.task, sim, seed)
        if workers > 1:
            variants[f"{tag or 'after, '}{workers} processes"] = Parallel(a, sim, seed, workers)
    return {"agent": a, "variants": variants}


class InProcess:
    """Episodes run by this process through one scene and renderer (as ``run_episodes`` runs
    an evaluation), timed in CPU seconds too."""

    startup = 0.0

    def __init__(self, agent, task, sim, seed: int) -> None:
        self.agent, self.task, self.sim, self.seed = agent, task, sim, seed
        self.runner = None

    def __call__(self, eps: list[int]) -> tuple[list, float]:
        from ilstudio.sim.rollout import EpisodeRunner

        c0 = time.process_time()
        if self.runner is None:
            self.runner = EpisodeRunner(self.task, self.sim)
        got = [self.runner.run(self.agent, self.seed, i) for i in eps]
        return got, time.process_time() - c0

    def close(self) -> None:
        pass


def measure(prepared: dict, mode: str, episodes: int, block: int) -> dict:
    a, variants = prepared["agent"], prepared["variants"]
    seconds = {k: v.startup for k, v in variants.items()}
    cpu = dict.fromkeys(variants, 0.0)
    results: dict = {k: [] for k in variants}
    for start in range(0, episodes, block):
        eps = list(range(start, min(episodes, start + block)))
        for name, fn in variants.items():
            t0 = time.perf_counter()
            got, used = fn(eps)
            seconds[name] += time.perf_counter() - t0
            cpu[name] += used
            results[name] += got
    for fn in variants.values():
        fn.close()
    rows = {}
    ref = [(r.index, r.success, r.episode_return) for r in results["before"]]
    for name in variants:
        got = [(r.index, r.success, r.episode_return) for r in results[name]]
        rows[name] = {"episodes_per_min": 60 * episodes / seconds[name], "seconds": seconds[name],
                      "cpu_per_episode": cpu[name] / episodes,
                      "successes": sum(r.success for r in results[name]), "identical": got == ref,
                      "same_successes": [g[:2] for g in got] == [r[:2] for r in ref]}
    return {"mode": mode, "temporal_ensemble": a.info["temporal_ensemble"],
            "query_every": a.info["query_every"], "rows": rows}


def _timed_episode(job: tuple[int, bool]) -> tuple:
    """A pool worker's episode and the CPU seconds its process spent on it."""
    from ilstudio.sim import rollout

    c0 = time.process_time()
    res = rollout._worker_episode(job)  # noqa: SLF001
    return res, time.process_time() - c0


class Parallel:
    """Episodes in ``workers`` forked processes (the evaluator's --num_workers path). The pool
    is forked before this process renders anything (as the evaluator does; see
    ``run_episodes_parallel``) and kept, as one evaluation keeps it; its start-up is added to
    its time, and its idle workers cost nothing while the other variants run."""

    def __init__(self, a, sim, seed: int, workers: int) -> None:
        import multiprocessing

        from ilstudio.sim import rollout

        t0 = time.perf_counter()
        self.pool = multiprocessing.get_context("fork").Pool(
            workers, initializer=rollout._worker_init,  # noqa: SLF001
            initargs=(a.agent, a.task, sim, seed))
        self.startup = time.perf_counter() - t0

    def __call__(self, eps: list[int]) -> tuple[list, float]:
        got = self.pool.map(_timed_episode, [(i, False) for i in eps], chunksize=1)
        return sorted((r for r, _ in got), key=lambda r: r.index), sum(c for _, c in got)

    def close(self) -> None:
        self.pool.terminate()


def frame_differences(a, seed: int, mesh_mm: float) -> list[str]:
    """How the frames the policy sees (fitted to its input size) differ between the task's
    render settings and cheaper ones, over the states of one scripted episode, and the CPU
    milliseconds one frame takes with each."""
    import dataclasses

    import numpy as np

    from ilstudio.data.image_ops import fit_frames
    from ilstudio.sim.envs import (
        EVAL,
        Renderer,
        episode_seed,
        make_joint_env,
        object_pose,
        pose_like,
        reset_joint_env,
    )
    from ilstudio.sim.rollout import ScriptedAgent

    size, mode, sim, cams = a.agent.image_size, a.agent.aspect, a.sim, a.task.camera_names
    if size is None:
        return ["the policy reads frames at their rendered size: nothing cheaper can match"]
    env = make_joint_env(sim)
    msaa = make_joint_env(dataclasses.replace(sim, multisamples=4))
    options = {f"{sim.render_height}x{sim.render_width} as the task (reference)": Renderer(env.physics, cams, sim),
               "multisampling 4x (offsamples=4)": Renderer(msaa.physics, cams, sim)}
    for h, w in [(size[0] * 2, size[1] * 2), tuple(size)]:
        options[f"rendered at {h}x{w}"] = Renderer(
            env.physics, cams, dataclasses.replace(sim, render_height=h, render_width=w))
    if mesh_mm > 0:
        options[f"meshes simplified at {mesh_mm:g} mm"] = Renderer(
            env.physics, cams, dataclasses.replace(sim, render_mesh_mm=mesh_mm))
    for r in options.values():  # contexts made and shaders compiled before anything is timed
        r.render()
    agent, pose = ScriptedAgent(sim, a.task.episode_len), object_pose(sim.task, episode_seed(EVAL, seed, 0))
    agent.reset(pose)
    ts = reset_joint_env(env, pose)
    diffs = {k: [] for k in options}
    cpu = dict.fromkeys(options, 0.0)
    frames = 0
    for t in range(a.task.episode_len):
        if t % 25 == 0:
            pose_like(msaa.physics, env.physics)
            fitted = {}
            for name, r in options.items():
                c0 = time.process_time()
                img = r.render()[cams[0]]
                cpu[name] += time.process_time() - c0
                fitted[name] = fit_frames(img[None], size, mode)[0].astype(int)
            ref = next(iter(fitted.values()))
            for name, f in fitted.items():
                diffs[name].append(np.abs(f - ref))
            frames += 1
        ts = env.step(agent.act(t, ts.observation["qpos"], None))
    lines = [f"fitted to {size[0]}x{size[1]} ({mode}), {frames} frames of a scripted episode:"]
    for name in options:
        d = np.stack(diffs[name])
        lines.append(f"  {name:38s} max {int(d.max()):3d}/255, mean {d.mean():.4f}, "
                     f"pixels differing {100 * (d > 0).any(-1).mean():5.2f}%, "
                     f"{1e3 * cpu[name] / frames:5.1f} CPU ms a frame")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--episodes", type=int, default=6)
    p.add_argument("--block", type=int, default=2, help="episodes per interleaved block")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="declared,chunked")
    p.add_argument("--mesh_mm", type=float, default=2.0,
                   help="also measure sim.render_mesh_mm at this value (0: skip)")
    p.add_argument("--episode_len", type=int, default=None,
                   help="shorter episodes than the task's (a quick check of this script)")
    args = p.parse_args()
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    modes = args.modes.split(",")
    prepared = {mode: prepare(args.run, mode, args.workers, args.seed, args.mesh_mm,
                                args.episode_len) for mode in modes}
    for mode in modes:
        out = measure(prepared[mode], mode, args.episodes, args.block)
        how = ("temporal ensembling" if out["temporal_ensemble"]
               else f"chunks of {out['query_every']} steps")
        print(f"\nmode {mode} ({how}), {args.episodes} episodes, seed {args.seed}, "
              f"load average {os.getloadavg()[0]:.1f}:")
        base = out["rows"]["before"]
        for name, r in out["rows"].items():
            same = "identical" if r["identical"] else (
                "same successes per episode" if r["same_successes"] else "DIFFERENT successes")
            print(f"  {name:24s} {r['episodes_per_min']:7.2f} episodes/min ({r['seconds']:6.1f} s) "
                  f"x{r['episodes_per_min'] / base['episodes_per_min']:5.2f}  "
                  f"{r['cpu_per_episode']:5.2f} CPU s/episode "
                  f"x{base['cpu_per_episode'] / max(r['cpu_per_episode'], 1e-9):4.2f}  "
                  f"successes {r['successes']}/{args.episodes}, episodes vs before: {same}",
                  flush=True)
    print()
    for line in frame_differences(prepared[modes[0]]["agent"], args.seed, args.mesh_mm):
        print("  " + line, flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
