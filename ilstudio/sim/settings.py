"""The simulator settings of a task (``sim.*`` in gin): which scene, and how it is rendered.

They live in the task's gin file next to ``task.*`` so recording, training and evaluation
read one source: the recorder renders the dataset with them, ``train.py`` copies them into
the run's operative_config.gin, and ``python -m ilstudio.eval`` renders the rollouts with
exactly the settings the policy was trained on. Importing this module is cheap (no MuJoCo).
"""

from __future__ import annotations

from ilstudio.config.declare import configurable, param

SIM_TASKS = ("transfer_cube", "insertion")


@configurable("sim", group="Simulation")
class SimSettings:
    """ALOHA scene and rendering settings (bound in gin_configs/tasks/sim_*.gin)."""

    task: str = param("transfer_cube", "The ALOHA scene: 'transfer_cube' or 'insertion'.",
                      choices=SIM_TASKS, documented=False)
    render_height: int = param(480, "Rendered camera frame height in pixels (ACT: 480).",
                               documented=False, bounds="[1, inf)")
    render_width: int = param(640, "Rendered camera frame width in pixels (ACT: 640).",
                              documented=False, bounds="[1, inf)")
    shadows: bool = param(False, "Render shadows (about 4x slower on a CPU renderer).",
                          documented=False)
    multisamples: int = param(0, "Offscreen anti-aliasing samples (the scene's own is 4; "
                              "0 is fastest).", documented=False, bounds="[0, inf)")
    weld_torquescale: float = param(20.0, "Torque scale of the mocap welds of the end-effector "
                                    "(scripted) scene. MuJoCo 3's default lets the gripper "
                                    "rotate too softly to grasp; 20 reproduces the dynamics "
                                    "ACT's data was recorded with.", documented=False,
                                    bounds="[0, inf)")
    gzip_level: int = param(4, "gzip level of recorded camera frames (0: uncompressed).",
                            documented=False, bounds="[0, 9]")
