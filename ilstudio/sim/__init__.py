"""The ALOHA bimanual simulation: scripted demonstrations and policy rollouts.

Importing this package is cheap (its settings, ``sim.*``, are declared in
``ilstudio.config.settings``); the simulator itself (MuJoCo, dm_control, gym-aloha: the
``[sim]`` extra) is imported only by the modules that step it (``envs``, ``scripted``,
``record``, ``rollout``).
"""
