"""Reading a task's settings (``task.*`` and ``sim.*``) the way train.py does."""

from __future__ import annotations

from ilstudio.config.declare import validate_instance
from ilstudio.config.gin_layers import GinLayers, SearchPath
from ilstudio.config.resolve import find_task_file
from ilstudio.config.settings import TaskSettings
from ilstudio.sim.settings import SimSettings


def load_task(task_name: str, gin_bindings: list[str] | tuple[str, ...] = (),
              gin_files: list[str] | tuple[str, ...] = (),
              gin_search_paths: list[str] | tuple[str, ...] = ()) -> tuple[TaskSettings, SimSettings]:
    """Parse gin_configs/tasks/<task_name>.gin (+ files and bindings); build task and sim settings.

    Raises UserError for an unknown task or a bad binding (with the file/binding named).
    """
    from ilstudio.policies import import_all_configurations

    import_all_configurations()  # a task file may bind policy settings too
    search = SearchPath(list(gin_search_paths))
    layers = GinLayers(search)
    layers.add_file(find_task_file(search, task_name), f"--task_name={task_name}")
    for name in gin_files:
        layers.add_file(name, "--gin_file")
    for i, text in enumerate(gin_bindings):
        layers.add_binding_text(text, f"--gin_bindings[{i}] ({text.strip()!r})")
    task, sim = TaskSettings(), SimSettings()
    for obj in (task, sim):
        validate_instance(obj, layers.provenance.source_of)
    return task, sim
