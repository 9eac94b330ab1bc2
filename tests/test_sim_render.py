"""The simulator's renderer: the task's sim.* render settings reach MuJoCo, and the
render-only mesh simplification (sim.render_mesh_mm) changes the frames a little and the
physics not at all.

Real MuJoCo/dm_control (EGL, llvmpipe on a CPU), the real transfer-cube scene.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_simulator

needs_simulator()

from ilstudio.sim.meshes import cluster_faces  # noqa: E402

TASK = "sim_transfer_cube_scripted"


def _scene(*bindings: str):
    from ilstudio.sim.config import load_task
    from ilstudio.sim.envs import EVAL, episode_seed, make_joint_env, object_pose, reset_joint_env

    task, sim = load_task(TASK, list(bindings))
    env = make_joint_env(sim)
    reset_joint_env(env, object_pose(sim.task, episode_seed(EVAL, 0, 0)))
    return task, sim, env


def _move(env, steps: int) -> None:
    """Drive both arms away from their start pose (the frames must follow the physics)."""
    start = env.physics.data.qpos[:14].copy()
    for t in range(steps):
        env.step(start + 0.3 * np.sin(0.05 * t + np.arange(14)))


def test_cluster_faces_merges_vertices_of_one_cell_only() -> None:
    # A 5x5 grid of vertices 1 mm apart, two triangles per square: 32 faces.
    xs, ys = np.meshgrid(np.arange(5) * 1e-3, np.arange(5) * 1e-3, indexing="ij")
    verts = np.stack([xs.ravel(), ys.ravel(), np.zeros(25)], axis=1)
    idx = np.arange(25).reshape(5, 5)
    faces = np.array([f for i in range(4) for j in range(4) for f in (
        (idx[i, j], idx[i + 1, j], idx[i + 1, j + 1]), (idx[i, j], idx[i + 1, j + 1], idx[i, j + 1]))])
    assert np.array_equal(cluster_faces(verts, faces, 0.0), faces)
    assert np.array_equal(cluster_faces(verts, faces, 1e-4), faces)  # one vertex per cell
    coarse = cluster_faces(verts, faces, 2e-3)  # 2x2 vertices per cell
    assert 0 < len(coarse) < len(faces)
    firsts = {int(idx[i, j]) for i in range(0, 5, 2) for j in range(0, 5, 2)}
    assert set(coarse.ravel()) <= firsts  # corners are each cell's first vertex
    assert len({tuple(np.roll(f, -int(np.argmin(f)))) for f in coarse}) == len(coarse)
    normals = [np.cross(verts[b] - verts[a], verts[c] - verts[a])[2] for a, b, c in coarse]
    assert all(n > 0 for n in normals) == all(
        np.cross(verts[b] - verts[a], verts[c] - verts[a])[2] > 0 for a, b, c in faces)


def test_task_render_settings_reach_mujoco_and_physics_keeps_full_meshes() -> None:
    from ilstudio.sim.envs import Renderer

    task, sim, env = _scene("sim.render_height = 24", "sim.render_width = 32",
                            "sim.multisamples = 4", "sim.render_mesh_mm = 2.0")
    full_faces = env.physics.model.mesh_facenum.copy()
    renderer = Renderer(env.physics, task.camera_names, sim)
    frame = renderer.render()[task.camera_names[0]]
    assert frame.shape == (24, 32, 3)
    assert renderer.physics.contexts.mujoco.ptr.offSamples == 4  # llvmpipe: 0 or 4
    assert renderer.physics is not env.physics
    assert renderer.physics.model.mesh_facenum.sum() < 0.6 * full_faces.sum()
    assert np.array_equal(env.physics.model.mesh_facenum, full_faces)  # physics untouched
    task, sim, env = _scene("sim.render_height = 24", "sim.render_width = 32")  # the task's own
    plain = Renderer(env.physics, task.camera_names, sim)
    plain.render()
    assert plain.physics is env.physics and env.physics.contexts.mujoco.ptr.offSamples == 0


def test_render_copy_follows_the_physics_and_simplified_frames_stay_close() -> None:
    """A render copy with nothing simplified gives the very frames of the physics itself
    (the posing is exact); 2 mm changes the policy's fitted 60x80 frames a little."""
    import dataclasses

    from ilstudio.data.image_ops import fit_frames
    from ilstudio.sim.envs import Renderer

    task, sim, env = _scene()  # the task's own 240x320 frames
    cam = task.camera_names[0]
    own = Renderer(env.physics, task.camera_names, sim)
    exact = Renderer(env.physics, task.camera_names, dataclasses.replace(sim, render_mesh_mm=1e-6))
    coarse = Renderer(env.physics, task.camera_names, dataclasses.replace(sim, render_mesh_mm=2.0))
    diffs = []
    for steps in (0, 60):
        _move(env, steps)
        ref = own.render()[cam]
        assert np.array_equal(exact.render()[cam], ref)
        got = coarse.render()[cam]
        a, b = fit_frames(np.stack([ref, got]), (60, 80), "resize").astype(int)
        diffs.append(np.abs(a - b))
    d = np.stack(diffs)
    assert 0 < d.max() <= 48 and d.mean() < 0.2, (d.max(), d.mean())


def test_recordings_without_the_mesh_attribute_resume_only_with_full_meshes(tmp_path) -> None:
    """Episodes recorded before sim.render_mesh_mm existed were rendered with full meshes: a
    recording continues them at 0 and refuses to mix in simplified frames."""
    import dataclasses

    import h5py

    from ilstudio.errors import UserError
    from ilstudio.sim.config import load_task
    from ilstudio.sim.record import _settings_attrs, existing_progress

    task, sim = load_task(TASK, [])
    expected = _settings_attrs(task, sim, seed=0)
    assert expected["render_mesh_mm"] == 0.0
    with h5py.File(tmp_path / "episode_0.hdf5", "w") as f:
        f.attrs.update({k: v for k, v in expected.items() if k != "render_mesh_mm"} | {"attempt": 0})
    assert existing_progress(tmp_path, expected) == (1, 1)
    simplified = _settings_attrs(task, dataclasses.replace(sim, render_mesh_mm=2.0), seed=0)
    with pytest.raises(UserError, match="render_mesh_mm"):
        existing_progress(tmp_path, simplified)
