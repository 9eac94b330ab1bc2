"""ALOHA environments for recording and rollouts, built on gym-aloha's dm_control tasks.

Differences from the stock tasks, each for a measured reason:

* Observations carry no images. The stock tasks render three 480x640 cameras on every
  step (~250 ms); here ``Renderer`` draws only the cameras a caller asks for, at the
  task's ``sim.*`` size and quality, through one reused ``Camera`` per camera.
* Object poses are set by the caller (seeded), never sampled inside ``reset``: the stock
  end-effector task samples the cube unseeded, and the joint-space task reads the process
  global ``gym_aloha.tasks.sim.BOX_POSE``, which we write in place (``BOX_POSE[0] = ...``).
* The end-effector scene's mocap welds get ``sim.weld_torquescale`` (MuJoCo 3 tracks the
  commanded rotation too softly otherwise and every scripted grasp misses).
* With ``sim.render_mesh_mm`` > 0 the cameras render a posed copy of the scene with
  simplified meshes (``ilstudio.sim.meshes``): on a CPU a frame costs what its triangles
  cost. The simulated physics never sees the copy.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before dm_control is imported (headless rendering)

import collections  # noqa: E402

import mujoco as mj  # noqa: E402  (the raw bindings: kinematics of the render copy)
import numpy as np  # noqa: E402
from dm_control import mujoco  # noqa: E402
from dm_control.rl import control  # noqa: E402
from gym_aloha import constants  # noqa: E402
from gym_aloha.tasks import sim as joint_tasks  # noqa: E402
from gym_aloha.tasks import sim_end_effector as ee_tasks  # noqa: E402
from gym_aloha.utils import sample_box_pose, sample_insertion_pose  # noqa: E402

from ilstudio.config.settings import SimSettings  # noqa: E402
from ilstudio.errors import UserError  # noqa: E402

# A purpose tag in every seed: recording and evaluation episodes never share an object pose,
# whatever --seed each is given.
RECORD, EVAL = 0, 1
WELD_TORQUESCALE_INDEX = 10  # eq_data layout of a weld: anchor(3) relpose(7) torquescale(1)


def episode_seed(purpose: int, seed: int, index: int) -> int:
    """A 32-bit seed for episode ``index`` of run ``seed`` (deterministic, purpose-separated)."""
    return int(np.random.SeedSequence([purpose, seed, index]).generate_state(1)[0])


def object_pose(sim_task: str, seed: int) -> np.ndarray:
    """The initial pose(s) of the task's object(s) for a seed: cube (7,) or peg+socket (14,)."""
    if sim_task == "transfer_cube":
        return sample_box_pose(seed)
    return np.concatenate(sample_insertion_pose(seed))


def _observation(task, physics) -> collections.OrderedDict:
    obs = collections.OrderedDict()
    obs["qpos"] = task.get_qpos(physics)
    obs["qvel"] = task.get_qvel(physics)
    obs["env_state"] = task.get_env_state(physics)
    return obs


# -- joint-space tasks (what policies act in) ------------------------------------------------


class _NoImages:
    def get_observation(self, physics):
        return _observation(self, physics)


class JointTransferCube(_NoImages, joint_tasks.TransferCubeTask):
    pass


class JointInsertion(_NoImages, joint_tasks.InsertionTask):
    pass


# -- end-effector (mocap) tasks (what the scripted policy acts in) ----------------------------


class _PosedEE(_NoImages):
    """An end-effector task whose object pose is set by ``set_pose`` before each reset."""

    pose: np.ndarray | None = None

    def set_pose(self, pose: np.ndarray) -> None:
        self.pose = np.asarray(pose, dtype=np.float64).copy()

    def get_observation(self, physics):
        obs = _observation(self, physics)
        obs["mocap_pose_left"] = np.concatenate([physics.data.mocap_pos[0], physics.data.mocap_quat[0]])
        obs["mocap_pose_right"] = np.concatenate([physics.data.mocap_pos[1], physics.data.mocap_quat[1]])
        obs["gripper_ctrl"] = physics.data.ctrl.copy()
        return obs

    def initialize_episode(self, physics):
        if self.pose is None:
            raise RuntimeError("set_pose() must be called before reset()")
        self.initialize_robots(physics)
        physics.data.qpos[16:16 + len(self.pose)] = self.pose
        ee_tasks.base.Task.initialize_episode(self, physics)


class EETransferCube(_PosedEE, ee_tasks.TransferCubeEndEffectorTask):
    pass


class EEInsertion(_PosedEE, ee_tasks.InsertionEndEffectorTask):
    pass


_SCENES = {
    # sim.task: (end-effector xml, EE task, joint xml, joint task)
    "transfer_cube": ("bimanual_viperx_end_effector_transfer_cube.xml", EETransferCube,
                      "bimanual_viperx_transfer_cube.xml", JointTransferCube),
    "insertion": ("bimanual_viperx_end_effector_insertion.xml", EEInsertion,
                  "bimanual_viperx_insertion.xml", JointInsertion),
}


def _scene(sim_task: str) -> tuple:
    if sim_task not in _SCENES:
        raise UserError(f"sim.task = {sim_task!r}: unknown ALOHA scene; known: {', '.join(_SCENES)}")
    return _SCENES[sim_task]


def _physics(xml: str, settings: SimSettings) -> mujoco.Physics:
    physics = mujoco.Physics.from_xml_path(str(constants.ASSETS_DIR / xml))
    # Rendering quality must be set before the first render creates the GL context.
    physics.model.vis.quality.offsamples = settings.multisamples
    if not settings.shadows:
        physics.model.vis.quality.shadowsize = 0
    return physics


def _environment(physics: mujoco.Physics, task) -> control.Environment:
    return control.Environment(physics, task, time_limit=float("inf"),
                               control_timestep=constants.DT, n_sub_steps=None,
                               flat_observation=False)


def make_ee_env(settings: SimSettings) -> control.Environment:
    """The end-effector (mocap) environment; call ``env.task.set_pose(p)`` before reset."""
    xml, task_cls, _, _ = _scene(settings.task)
    physics = _physics(xml, settings)
    physics.model.eq_data[:, WELD_TORQUESCALE_INDEX] = settings.weld_torquescale
    return _environment(physics, task_cls())


def make_joint_env(settings: SimSettings) -> control.Environment:
    """The joint-space environment; reset it with ``reset_joint_env(env, pose)``."""
    _, _, xml, task_cls = _scene(settings.task)
    return _environment(_physics(xml, settings), task_cls())


def reset_joint_env(env: control.Environment, pose: np.ndarray):
    """Reset with the given object pose(s) (gym-aloha reads them from a module global)."""
    joint_tasks.BOX_POSE[0] = np.asarray(pose, dtype=np.float64).copy()
    return env.reset()


def max_reward(env: control.Environment) -> int:
    return int(env.task.max_reward)


class Renderer:
    """Renders the named cameras of one physics at the task's size and quality.

    One dm_control ``Camera`` per camera, created once and reused (creating one per frame
    reallocates the scene); every frame is copied, because the camera returns a view of a
    buffer the next render overwrites. With ``sim.render_mesh_mm`` > 0 the cameras look at
    a render-only copy of the scene whose meshes are simplified (``ilstudio.sim.meshes``),
    posed from the simulated physics before each frame; the simulation itself is untouched.
    """

    def __init__(self, physics: mujoco.Physics, cameras: tuple[str, ...] | list[str],
                 settings: SimSettings) -> None:
        names = [physics.model.id2name(i, "camera") for i in range(physics.model.ncam)]
        for cam in cameras:
            if cam not in names:
                raise UserError(f"task.camera_names: camera {cam!r} is not in the ALOHA scene; "
                                f"it has {', '.join(names)}")
        self.cameras = tuple(cameras)
        self.source, self.physics = physics, _render_physics(physics, settings.render_mesh_mm)
        self._cams = {c: mujoco.Camera(self.physics, height=settings.render_height,
                                       width=settings.render_width, camera_id=c)
                      for c in self.cameras}
        self._overrides = {} if settings.shadows else {"shadow": False}

    def render(self) -> dict[str, np.ndarray]:
        """{camera: (H, W, 3) uint8}, each a fresh copy."""
        if self.physics is not self.source:
            pose_like(self.physics, self.source)
        return {c: np.array(cam.render(render_flag_overrides=dict(self._overrides)), copy=True)
                for c, cam in self._cams.items()}


def _render_physics(physics: mujoco.Physics, mesh_mm: float) -> mujoco.Physics:
    """The physics the cameras render: ``physics`` itself, or (mesh_mm > 0) a copy with
    simplified meshes, made before its first render creates its GL context."""
    if mesh_mm <= 0:
        return physics
    from ilstudio.sim.meshes import simplify_render_meshes

    copy = physics.copy(share_model=False)
    simplify_render_meshes(copy.model.ptr, mesh_mm / 1000.0)
    return copy


def pose_like(target: mujoco.Physics, source: mujoco.Physics) -> None:
    """Pose ``target`` as ``source`` is now: what the renderer reads (bodies, geoms,
    cameras, lights), computed from positions alone; velocities and contacts stay unread."""
    target.data.qpos[:] = source.data.qpos
    target.data.mocap_pos[:] = source.data.mocap_pos
    target.data.mocap_quat[:] = source.data.mocap_quat
    m, d = target.model.ptr, target.data.ptr
    mj.mj_kinematics(m, d)
    mj.mj_comPos(m, d)
    mj.mj_camlight(m, d)
