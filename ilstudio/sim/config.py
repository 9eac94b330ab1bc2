"""Reading a task's settings (``task.*`` and ``sim.*``) the way train.py does."""

from __future__ import annotations

from ilstudio.config.settings import SimSettings, TaskSettings
from ilstudio.resolve import construct, layer_gin


def load_task(task_name: str, gin_bindings: list[str] | tuple[str, ...] = (),
              gin_files: list[str] | tuple[str, ...] = (),
              gin_search_paths: list[str] | tuple[str, ...] = ()) -> tuple[TaskSettings, SimSettings]:
    """Parse gin_configs/tasks/<task_name>.gin (+ files and bindings); build task and sim settings.

    Raises UserError for an unknown task or a bad binding (with the file/binding named).
    """
    from ilstudio.config.declare import sources

    layers = layer_gin(task_name=task_name, gin_files=gin_files, gin_bindings=gin_bindings,
                       search_paths=gin_search_paths)
    with sources(layers.provenance.source_of):  # each checks its declaration as it is built
        return construct(TaskSettings), construct(SimSettings)
