"""Recording cost per episode of the scripted ALOHA dataset, by render size.

    OMP_NUM_THREADS=1 python bench/sim_record.py [--episodes 2] [--sizes 120x160,240x320,480x640]

Prints, per size: seconds per episode split into the end-effector (scripted) rollout, the
joint-space replay physics, rendering the `top` camera 400 times, and compressing+writing
the HDF5 file; and the file size per episode. Uses the task file's sim.* settings otherwise
(fast rendering: no shadows, no multisampling). Wall-clock on a shared machine: also shows
process CPU time, which is what the work costs when the machine is not contended.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--episodes", type=int, default=2)
    p.add_argument("--sizes", default="120x160,240x320,480x640")
    p.add_argument("--task_name", default="sim_transfer_cube_scripted")
    args = p.parse_args()

    from ilstudio.sim.config import load_task
    from ilstudio.sim.envs import RECORD, Renderer, episode_seed, make_joint_env, object_pose, reset_joint_env
    from ilstudio.sim.scripted import ScriptedPlanner
    from ilstudio.sim.writer import write_episode

    task, base = load_task(args.task_name)
    print(f"task {args.task_name}: {task.episode_len} steps, cameras {task.camera_names}, "
          f"shadows={base.shadows}, multisamples={base.multisamples}, gzip={base.gzip_level}")
    print(f"{'size':>9} {'plan s':>7} {'physics s':>9} {'render s':>8} {'write s':>7} "
          f"{'total s':>7} {'cpu s':>6} {'MiB/ep':>7}")
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        sim = replace(base, render_height=h, render_width=w)
        planner = ScriptedPlanner(sim)
        env = make_joint_env(sim)
        renderer = Renderer(env.physics, task.camera_names, sim)
        renderer.render()  # GL context creation is a one-off cost
        totals = {"plan": 0.0, "physics": 0.0, "render": 0.0, "write": 0.0, "cpu": 0.0, "bytes": 0}
        with tempfile.TemporaryDirectory() as d:
            for k in range(args.episodes):
                c0 = time.process_time()
                pose = object_pose(sim.task, episode_seed(RECORD, 12345, k))
                t0 = time.perf_counter()
                plan = planner.plan(pose, task.episode_len)
                t1 = time.perf_counter()
                ts = reset_joint_env(env, pose)
                qpos, qvel, frames, render_s = [], [], [], 0.0
                for a in plan.joint_actions:
                    qpos.append(ts.observation["qpos"])
                    qvel.append(ts.observation["qvel"])
                    r0 = time.perf_counter()
                    frames.append(renderer.render()[task.camera_names[0]])
                    render_s += time.perf_counter() - r0
                    ts = env.step(a)
                t2 = time.perf_counter()
                import numpy as np

                path = write_episode(Path(d) / f"episode_{k}.hdf5", qpos=np.array(qpos),
                                     qvel=np.array(qvel), action=plan.joint_actions,
                                     images={task.camera_names[0]: np.stack(frames)},
                                     gzip_level=sim.gzip_level)
                t3 = time.perf_counter()
                totals["plan"] += t1 - t0
                totals["physics"] += t2 - t1 - render_s
                totals["render"] += render_s
                totals["write"] += t3 - t2
                totals["cpu"] += time.process_time() - c0
                totals["bytes"] += path.stat().st_size
        n = args.episodes
        total = (totals["plan"] + totals["physics"] + totals["render"] + totals["write"]) / n
        print(f"{size:>9} {totals['plan'] / n:7.2f} {totals['physics'] / n:9.2f} "
              f"{totals['render'] / n:8.2f} {totals['write'] / n:7.2f} {total:7.2f} "
              f"{totals['cpu'] / n:6.2f} {totals['bytes'] / n / 2**20:7.2f}")


if __name__ == "__main__":
    main()
