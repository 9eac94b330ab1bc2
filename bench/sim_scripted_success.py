"""How often the scripted waypoint policy succeeds, per ALOHA scene (physics only, no rendering).

    OMP_NUM_THREADS=1 python bench/sim_scripted_success.py [--attempts 20] [--torquescale 20]

For each scene: attempts with recording seeds; counts the end-effector rollout's final-step
success, the joint-space replay's final-step success (what the recorder keeps), and ACT's
looser "reward 4 at any step" for comparison. --torquescale stock uses the scene's own weld
(MuJoCo 3: the scripted grasps miss).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

os.environ.setdefault("MUJOCO_GL", "egl")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attempts", type=int, default=20)
    p.add_argument("--tasks", default="transfer_cube,insertion")
    p.add_argument("--torquescale", default="20", help="a number, or 'stock'")
    args = p.parse_args()

    from ilstudio.config.settings import SimSettings
    from ilstudio.sim import envs
    from ilstudio.sim.scripted import ScriptedPlanner

    for sim_task in args.tasks.split(","):
        sim = SimSettings(task=sim_task)
        if args.torquescale != "stock":
            sim = replace(sim, weld_torquescale=float(args.torquescale))
        planner = ScriptedPlanner(sim)
        if args.torquescale == "stock":  # undo the fix: reload the scene's own weld parameters
            fresh = envs.make_joint_env(sim)  # noqa: F841 (keeps the same import path warm)
            from dm_control import mujoco
            from gym_aloha import constants

            xml = envs._scene(sim_task)[0]  # noqa: SLF001
            stock = mujoco.Physics.from_xml_path(str(constants.ASSETS_DIR / xml))
            planner.env.physics.model.eq_data[:] = stock.model.eq_data
        env = envs.make_joint_env(sim)
        ee_ok = replay_ok = replay_any = 0
        t0 = time.perf_counter()
        for k in range(args.attempts):
            pose = envs.object_pose(sim_task, envs.episode_seed(envs.RECORD, 0, k))
            plan = planner.plan(pose, 400)
            ts = envs.reset_joint_env(env, pose)
            rewards = []
            for a in plan.joint_actions:
                ts = env.step(a)
                rewards.append(ts.reward)
            ee_ok += plan.final_reward == 4
            replay_ok += rewards[-1] == 4
            replay_any += max(rewards) == 4
        n = args.attempts
        print(f"{sim_task:14s} torquescale={args.torquescale}: scripted EE rollout {ee_ok}/{n}, "
              f"joint replay (kept) {replay_ok}/{n}, replay reward 4 at any step {replay_any}/{n} "
              f"({(time.perf_counter() - t0) / n:.2f} s/attempt)", flush=True)


if __name__ == "__main__":
    main()
