"""Scripted waypoint policies for the end-effector scenes, and joint trajectories from them.

As in the ACT paper's scripted data: each arm follows piecewise-linear waypoints in
end-effector space (position, quaternion, gripper opening) that depend only on the initial
object pose. The end-effector rollout's joint positions (grippers replaced by their
commanded opening) become the actions a joint-space policy has to reproduce.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from gym_aloha.constants import normalize_puppet_gripper_position

from ilstudio.config.settings import SimSettings
from ilstudio.sim.envs import make_ee_env


def quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of (w, x, y, z) quaternions (MuJoCo's order)."""
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return np.array([aw * bw - ax * bx - ay * by - az * bz,
                     aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw])


def axis_angle(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    half = np.deg2rad(degrees) / 2
    return np.concatenate([[np.cos(half)], np.sin(half) * np.asarray(axis, dtype=np.float64)])


@dataclasses.dataclass
class Waypoint:
    t: int
    xyz: np.ndarray
    quat: np.ndarray
    gripper: float  # normalized opening: 0 closed, 1 open


def _interpolate(points: list[Waypoint], t: int) -> np.ndarray:
    """(xyz, quat, gripper) at step t, linear between the surrounding waypoints."""
    for a, b in zip(points, points[1:], strict=False):
        if a.t <= t < b.t:
            f = (t - a.t) / (b.t - a.t)
            return np.concatenate([a.xyz + (b.xyz - a.xyz) * f, a.quat + (b.quat - a.quat) * f,
                                   [a.gripper + (b.gripper - a.gripper) * f]])
    last = points[-1]
    return np.concatenate([last.xyz, last.quat, [last.gripper]])


def _wp(t: int, xyz, quat, gripper: float) -> Waypoint:
    return Waypoint(t, np.asarray(xyz, dtype=np.float64), np.asarray(quat, dtype=np.float64), gripper)


def transfer_cube_waypoints(first_obs) -> tuple[list[Waypoint], list[Waypoint]]:
    """Right arm: approach, grasp, lift, meet, release; left arm: meet, grasp, pull away."""
    left0, right0 = first_obs["mocap_pose_left"], first_obs["mocap_pose_right"]
    box = np.asarray(first_obs["env_state"])[:3]
    pick = quat_mul(right0[3:], axis_angle((0.0, 1.0, 0.0), -60))  # tilt the right gripper down
    meet_left = axis_angle((1.0, 0.0, 0.0), 90)
    meet = np.array([0.0, 0.5, 0.25])
    identity = np.array([1.0, 0.0, 0.0, 0.0])
    left = [
        _wp(0, left0[:3], left0[3:], 0),                                # sleep
        _wp(100, meet + [-0.1, 0, -0.02], meet_left, 1),                # approach the meeting point
        _wp(260, meet + [0.02, 0, -0.02], meet_left, 1),                # move in around the cube
        _wp(310, meet + [0.02, 0, -0.02], meet_left, 0),                # close the gripper
        _wp(360, meet + [-0.1, 0, -0.02], identity, 0),                 # pull the cube away
        _wp(400, meet + [-0.1, 0, -0.02], identity, 0),                 # stay
    ]
    right = [
        _wp(0, right0[:3], right0[3:], 0),                              # sleep
        _wp(90, box + [0, 0, 0.08], pick, 1),                           # above the cube
        _wp(130, box + [0, 0, -0.015], pick, 1),                        # go down
        _wp(170, box + [0, 0, -0.015], pick, 0),                        # grasp
        _wp(200, meet + [0.05, 0, 0], pick, 0),                         # lift toward the meeting point
        _wp(220, meet, pick, 0),                                        # meet
        _wp(310, meet, pick, 1),                                        # release (left has it)
        _wp(360, meet + [0.1, 0, 0], pick, 1),                          # move away
        _wp(400, meet + [0.1, 0, 0], pick, 1),                          # stay
    ]
    return left, right


def insertion_waypoints(first_obs) -> tuple[list[Waypoint], list[Waypoint]]:
    """Left arm picks the socket, right arm the peg; they meet and the peg goes in."""
    left0, right0 = first_obs["mocap_pose_left"], first_obs["mocap_pose_right"]
    state = np.asarray(first_obs["env_state"])
    peg, socket = state[:3], state[7:10]
    pick_right = quat_mul(right0[3:], axis_angle((0.0, 1.0, 0.0), -60))
    pick_left = quat_mul(right0[3:], axis_angle((0.0, 1.0, 0.0), 60))
    meet = np.array([0.0, 0.5, 0.15])
    lift_right = 0.00715
    left = [
        _wp(0, left0[:3], left0[3:], 0),
        _wp(120, socket + [0, 0, 0.08], pick_left, 1),
        _wp(170, socket + [0, 0, -0.03], pick_left, 1),
        _wp(220, socket + [0, 0, -0.03], pick_left, 0),
        _wp(285, meet + [-0.1, 0, 0], pick_left, 0),
        _wp(340, meet + [-0.05, 0, 0], pick_left, 0),
        _wp(400, meet + [-0.05, 0, 0], pick_left, 0),
    ]
    right = [
        _wp(0, right0[:3], right0[3:], 0),
        _wp(120, peg + [0, 0, 0.08], pick_right, 1),
        _wp(170, peg + [0, 0, -0.03], pick_right, 1),
        _wp(220, peg + [0, 0, -0.03], pick_right, 0),
        _wp(285, meet + [0.1, 0, lift_right], pick_right, 0),
        _wp(340, meet + [0.05, 0, lift_right], pick_right, 0),
        _wp(400, meet + [0.05, 0, lift_right], pick_right, 0),
    ]
    return left, right


WAYPOINTS = {"transfer_cube": transfer_cube_waypoints, "insertion": insertion_waypoints}


class WaypointPolicy:
    """End-effector actions (16,) along the task's waypoints, planned at the first step."""

    def __init__(self, sim_task: str) -> None:
        self._plan = WAYPOINTS[sim_task]
        self._left: list[Waypoint] = []
        self._right: list[Waypoint] = []
        self._t = 0

    def __call__(self, obs) -> np.ndarray:
        if self._t == 0:
            self._left, self._right = self._plan(obs)
        action = np.concatenate([_interpolate(self._left, self._t), _interpolate(self._right, self._t)])
        self._t += 1
        return action


@dataclasses.dataclass
class ScriptedEpisode:
    """An end-effector rollout: the joint trajectory to replay, and how the rollout ended."""

    joint_actions: np.ndarray  # (steps, 14): qpos at t (0..steps-1), grippers as commanded
    final_reward: float
    max_reward: float


class ScriptedPlanner:
    """Runs the waypoint policy in the end-effector scene (physics only, no rendering)."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.env = make_ee_env(settings)

    def plan(self, pose: np.ndarray, steps: int) -> ScriptedEpisode:
        self.env.task.set_pose(pose)
        ts = self.env.reset()
        policy = WaypointPolicy(self.settings.task)
        trajectory = [_joint_target(ts.observation)]
        rewards = []
        for _ in range(steps):
            ts = self.env.step(policy(ts.observation))
            rewards.append(ts.reward or 0.0)
            trajectory.append(_joint_target(ts.observation))
        # ACT's convention: the action at t is the end-effector rollout's joint state at t.
        return ScriptedEpisode(np.asarray(trajectory[:steps]), float(rewards[-1]), float(max(rewards)))


def _joint_target(obs) -> np.ndarray:
    """qpos with each gripper replaced by its commanded (normalized) opening."""
    q = np.array(obs["qpos"], dtype=np.float64)
    ctrl = obs["gripper_ctrl"]
    q[6] = normalize_puppet_gripper_position(ctrl[0])
    q[13] = normalize_puppet_gripper_position(ctrl[2])
    return q
