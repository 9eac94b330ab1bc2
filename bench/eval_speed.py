"""Evaluation speed before and after, side by side: simulated episodes per minute.

    OMP_NUM_THREADS=1 MUJOCO_GL=egl python bench/eval_speed.py RUN [--episodes 6] [--workers 2]

RUN is a trained run directory (e.g. the quickstart's TinyACT). For each evaluation mode
(the policy's declared one, and chunked execution with --no_temporal_ensemble), it measures

* before: the loop as it was (a frame rendered at every step when the policy reads images,
  one process);
* after: frames rendered only at the steps the policy reads them (one per chunk when
  chunked; every step when ensembling), in 1 process and in ``--workers`` processes,

interleaved (before, after, before, after... one block of episodes at a time, so load on a
shared machine hits both alike), on the same evaluation seed and episodes. It prints episodes
per minute of each, the ratio, and whether every episode's success and return are identical.
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


def load_agent(run: str, mode: str):
    from types import SimpleNamespace

    from ilstudio.eval import checkpoint_agent, parse_args

    argv = ["--checkpoint", run, "--video_episodes", "0"]
    argv += {"declared": [], "chunked": ["--no_temporal_ensemble"]}[mode]
    args = parse_args(argv)
    info: dict = {}
    agent, task, sim, _, _ = checkpoint_agent(args, info)
    return SimpleNamespace(agent=agent, task=task, sim=sim, info=info)


def prepare(run: str, mode: str, workers: int, seed: int) -> tuple:
    """The agent of ``mode`` and its worker pool, forked before anything is rendered."""
    a = load_agent(run, mode)
    return a, (Parallel(a, seed, workers) if workers > 1 else None)


def measure(a, parallel, mode: str, episodes: int, workers: int, block: int, seed: int) -> dict:
    from ilstudio.sim.rollout import run_episodes

    variants = {
        "before": lambda eps: run_episodes(EveryStep(a.agent), a.task, a.sim, 0, seed, episodes=eps),
        "after, 1 process": lambda eps: run_episodes(a.agent, a.task, a.sim, 0, seed, episodes=eps),
    }
    if parallel is not None:
        variants[f"after, {workers} processes"] = parallel
    seconds = dict.fromkeys(variants, 0.0)
    if parallel is not None:
        seconds[f"after, {workers} processes"] = parallel.startup
    results: dict = {k: [] for k in variants}
    for start in range(0, episodes, block):
        eps = list(range(start, min(episodes, start + block)))
        for name, fn in variants.items():
            t0 = time.perf_counter()
            got = fn(eps)
            seconds[name] += time.perf_counter() - t0
            results[name] += got
    for fn in variants.values():
        if isinstance(fn, Parallel):
            fn.close()
    rows = {}
    ref = [(r.index, r.success, r.episode_return) for r in results["before"]]
    for name in variants:
        same = [(r.index, r.success, r.episode_return) for r in results[name]] == ref
        rows[name] = {"episodes_per_min": 60 * episodes / seconds[name], "seconds": seconds[name],
                      "successes": sum(r.success for r in results[name]), "identical": same}
    return {"mode": mode, "temporal_ensemble": a.info["temporal_ensemble"],
            "query_every": a.info["query_every"], "rows": rows}


class Parallel:
    """Episodes in ``workers`` forked processes (the evaluator's --num_workers path). The pool
    is forked before this process renders anything (as the evaluator does; see
    ``run_episodes_parallel``) and kept, as one evaluation keeps it; its start-up is added to
    its time, and its idle workers cost nothing while the other variants run."""

    def __init__(self, a, seed: int, workers: int) -> None:
        import multiprocessing

        from ilstudio.sim import rollout

        t0 = time.perf_counter()
        self.pool = multiprocessing.get_context("fork").Pool(
            workers, initializer=rollout._worker_init,  # noqa: SLF001
            initargs=(a.agent, a.task, a.sim, seed))
        self.startup = time.perf_counter() - t0

    def __call__(self, eps: list[int]) -> list:
        from ilstudio.sim import rollout

        got = self.pool.map(rollout._worker_episode, [(i, False) for i in eps], chunksize=1)  # noqa: SLF001
        return sorted(got, key=lambda r: r.index)

    def close(self) -> None:
        self.pool.terminate()


def smaller_renders(a, seed: int) -> list[str]:
    """Would rendering smaller give the same fitted frames? Max pixel difference between the
    policy's input fitted from the task's render size and fitted from smaller renders."""
    import dataclasses

    import numpy as np

    from ilstudio.data.image_ops import fit_frames
    from ilstudio.sim.envs import EVAL, Renderer, episode_seed, object_pose, reset_joint_env
    from ilstudio.sim.rollout import EpisodeRunner

    size, mode = a.agent.image_size, a.agent.aspect
    if size is None:
        return ["the policy reads frames at their rendered size: nothing smaller can match"]
    runner = EpisodeRunner(a.task, a.sim)
    reset_joint_env(runner.env, object_pose(a.sim.task, episode_seed(EVAL, seed, 0)))
    cam = a.task.camera_names[0]
    ref = fit_frames(runner.renderer.render()[cam][None], size, mode)[0]
    lines = []
    for h, w in [(size[0] * 2, size[1] * 2), tuple(size)]:
        small = Renderer(runner.env.physics, a.task.camera_names,
                         dataclasses.replace(a.sim, render_height=h, render_width=w))
        got = fit_frames(small.render()[cam][None], size, mode)[0]
        diff = int(np.abs(got.astype(int) - ref.astype(int)).max())
        lines.append(f"render {h}x{w} -> fitted {size[0]}x{size[1]}: max pixel difference {diff} "
                     f"vs rendering {a.sim.render_height}x{a.sim.render_width} "
                     f"({'identical' if diff == 0 else 'not the same frames'})")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--episodes", type=int, default=6)
    p.add_argument("--block", type=int, default=2, help="episodes per interleaved block")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="declared,chunked")
    args = p.parse_args()
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    modes = args.modes.split(",")
    prepared = {mode: prepare(args.run, mode, args.workers, args.seed) for mode in modes}
    for mode in modes:
        out = measure(*prepared[mode], mode, args.episodes, args.workers, args.block, args.seed)
        how = ("temporal ensembling" if out["temporal_ensemble"]
               else f"chunks of {out['query_every']} steps")
        print(f"\nmode {mode} ({how}), {args.episodes} episodes, seed {args.seed}:")
        base = out["rows"]["before"]["episodes_per_min"]
        for name, r in out["rows"].items():
            print(f"  {name:22s} {r['episodes_per_min']:6.2f} episodes/min  "
                  f"({r['seconds']:.1f} s)  x{r['episodes_per_min'] / base:.2f}  "
                  f"successes {r['successes']}/{args.episodes}  identical episodes: {r['identical']}",
                  flush=True)
    print("\nsmaller renders:")
    for line in smaller_renders(prepared[modes[0]][0], args.seed):
        print("  " + line)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
