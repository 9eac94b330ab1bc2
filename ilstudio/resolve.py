"""From flags, gin files, YAML and bindings to one validated run configuration.

Precedence (each rule tested in tests/test_precedence.py):
  hyperparameters: built-in default < --training_config YAML < flag on the command line.
  stable parameters: constructor default < task gin < --gin_file files in order
                     < YAML stable keys < --gin_bindings in order.
Nothing here imports torch: ``--dry_run`` and ``--explain`` stay fast.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin
from absl import flags, logging

from ilstudio.config import settings as S
from ilstudio.config.declare import sources
from ilstudio.config.gin_layers import GinLayers, SearchPath, find_shipped
from ilstudio.config.hyperparams import (
    HYPERPARAMS,
    Hyperparams,
    layer_hyperparams,
    owned_field_message,
)
from ilstudio.config.settings import RunSettings, SimSettings
from ilstudio.config.yaml_adapter import (
    TrainingConfig,
    convert_training_arg,
    load_bounded_yaml,
    load_training_config,
    training_args_fields,
)
from ilstudio.errors import UserError, did_you_mean
from ilstudio.policies import import_all_configurations, policy_config_class


@dataclasses.dataclass
class Resolved(RunSettings):
    """A resolved run: its settings objects (RunSettings), its hyperparameters, and where
    every value came from; built without torch. Training, ``--dry_run``/``--explain`` and
    the config dumps take it whole; ``build_policy(run)`` reads its settings part."""

    task_name: str
    hyper: Hyperparams
    hyper_source: dict[str, str]
    training_args_extra: dict[str, Any]
    layers: GinLayers
    yaml: TrainingConfig | None
    unused: list[tuple[str, str]]
    gin_files: list[str]
    gin_bindings: list[str]

    @property
    def output_dir(self) -> str:
        return self.hyper.output_dir


# A task name names a file in gin_configs/tasks/; it is never a path. A task file is gin (code):
# a name that could climb out of the task folders ("../../x/evil") would let a YAML file, which
# is data, choose a gin file to execute.
_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def find_task_file(search: SearchPath, task_name: str, source: str = "flag --task_name") -> str:
    known = sorted({p.stem for d in search.dirs for p in (d / "gin_configs/tasks").glob("*.gin")})
    task_name = str(task_name)
    where = (f"--task_name={task_name:.100}" if source.startswith("flag") else
             f"task_name: {task_name:.100} (from {source})")
    if not _TASK_NAME.fullmatch(task_name) or ".." in task_name:
        raise UserError(f"{where}: a task is a name (letters, digits, _ . -), not a path"
                        f"{did_you_mean(task_name, known)}. Known tasks: {', '.join(known) or 'none'}")
    rel = f"gin_configs/tasks/{task_name}.gin"
    if search.find(rel) is None:
        raise UserError(f"{where}: no {rel}{did_you_mean(task_name, known)}. "
                        f"Known tasks: {', '.join(known) or 'none'}")
    return rel


def _resolve_hyper(fv: flags.FlagValues, yaml_cfg: TrainingConfig | None
                   ) -> tuple[Hyperparams, dict[str, str]]:
    names = [*(h.name for h in HYPERPARAMS), "task_name"]
    values, sources = layer_hyperparams({n: fv[n].value for n in names if fv[n].present},
                                        {n: fv[n].value for n in names}, yaml_cfg)
    if not str(values["output_dir"]).strip():
        raise UserError(f"--output_dir is empty (from {sources['output_dir']}): name the run's "
                        f"directory, or leave it out for runs/<task_name>")
    ds = values.get("deepspeed")
    if ds and not Path(ds).expanduser().is_file() and find_shipped(ds):
        # configs/deepspeed/zero2.json works from any directory: the package ships it.
        values["deepspeed"], sources["deepspeed"] = str(find_shipped(ds)), f"{sources['deepspeed']} (shipped)"
    for h in HYPERPARAMS:
        source = sources[h.name]
        where = f"--{h.name}" if source.startswith("flag") else f"{h.name} (from {source})"
        h.check(values[h.name], where)
    return Hyperparams(**values), sources




def _parse_training_arg_flags(entries: list[str], extra: dict[str, Any], sources: dict[str, str]) -> None:
    for entry in entries:
        name, sep, raw = entry.partition("=")
        name = name.strip()
        where = f"--training_arg={entry if len(entry) <= 80 else entry[:77] + '...'}"
        if not sep:
            raise UserError(f"{where}: expected name=value")
        owned = owned_field_message(name, where)
        if owned:
            raise UserError(owned)
        if name not in training_args_fields():
            raise UserError(f"{where}: `{name}` is not a TrainingArguments field"
                            f"{did_you_mean(name, training_args_fields())}")
        value = load_bounded_yaml(raw, where, invalid_as_text=True)[1]
        extra[name] = convert_training_arg(name, value, where)
        sources[name] = "flag --training_arg"


_UNDEFINED_MACRO = re.compile(r"configurable 'macro' \(.*\) in scope '([^']+)'")


def construct(cls):
    """Build a configurable from its gin bindings; gin evaluating a bad value is a UserError.

    Values are evaluated only here (an undefined %MACRO, an @reference that raises), so
    gin's TypeError/ValueError would otherwise reach the user as a traceback.
    """
    try:
        return cls()
    except UserError as e:  # gin appends "In call to configurable ..." to the one message
        raise UserError(str(e).split("\n  In call to configurable", 1)[0]) from None
    except Exception as e:  # noqa: BLE001 - whatever a bound value raised when gin evaluated it
        m = _UNDEFINED_MACRO.search(str(e))
        if m:
            raise UserError(f"gin macro %{m.group(1)} is used by a binding of `{cls.gin_name}` "
                            f"but never defined (add `{m.group(1)} = <value>`)") from None
        raise UserError(f"gin could not build `{cls.gin_name}` from its bindings: {e}") from None


def check_unused_values(unused: list[tuple[str, str]]) -> None:
    """A declared parameter bound but not used by this run (sim.* on a task without a
    simulator, another policy's parameters) still gets its type and range checked: a value
    that is wrong here is wrong wherever the same file is used next."""
    from ilstudio.config.declare import CONFIGURABLES, check_value, params_of

    for key, source in unused:
        configurable, _, name = key.rpartition("/")[2].partition(".")
        cls = CONFIGURABLES.get(configurable)
        info = next((i for i in params_of(cls) if i.name == name), None) if cls else None
        if info is None:
            continue
        try:
            value = gin.query_parameter(key)
        except (ValueError, KeyError):  # a macro or reference: evaluated only where used
            continue
        if isinstance(value, gin.config.ConfigurableReference) or type(value).__name__ == "MacroValue":
            continue
        check_value(info, value, f"{info.gin_key} (set in {source})")


def build_settings(source_of, with_sim: bool | None = None) -> RunSettings:
    """Every settings object of a run from the gin bindings now in force, type-checked.

    The one place that decides what a run's configurables are: training resolves through it
    and the evaluator rebuilds a run from its operative_config.gin through it, so both always
    construct (and put in the operative config) the same objects. ``source_of(gin_key)``
    names where a value came from, for error messages.

    The task's simulator settings (sim.*) are built when the task has a simulator (its gin
    file binds sim.task) or ``with_sim`` asks for them: they then land in operative_config.gin,
    from which `python -m ilstudio.eval` renders like the data. A run on recorded or synthetic
    data without a simulator gets ``sim = None`` and no sim.* in its operative config, which
    lists what the run used.
    """
    with sources(source_of):  # each object checks its declaration as it is built
        built = {k: construct(cls) for k, cls in (
            ("task", S.TaskSettings), ("dataset", S.DatasetSettings), ("model", S.ModelSettings),
            ("lora", S.LoraSettings), ("quantization", S.QuantizationSettings))}
        if with_sim if with_sim is not None else source_of("sim.task") != "default":
            built["sim"] = construct(SimSettings)
        built["policy"] = construct(policy_config_class(built["model"].policy,
                                                        source_of("model.policy")))
    built.setdefault("sim", None)
    return RunSettings(**built)


TASK_FROM_DATA = ("state_dim", "action_dim", "camera_names")


def bind_dataset_values(layers: GinLayers) -> None:
    """Bind task dims and cameras a LeRobot task.dataset_dir gives (meta/info.json), where unbound.

    Bound as gin values (source: the info.json) before the settings are built, so the
    operative config, --explain and evaluation all see them; a bound value the data
    contradicts is a UserError naming both.
    """
    from ilstudio.data.lerobot_format import derived_task_values

    task = construct(S.TaskSettings)
    if not task.dataset_dir or not isinstance(task.dataset_dir, (str, list, tuple)):
        return  # empty or mistyped: reported by the data layer / type checks with their context
    if task.data_command and isinstance(task.dataset_dir, str) and not Path(task.dataset_dir).expanduser().exists():
        return  # a local task's data not created yet: the plan (data/checked.py) names the command
    bound = {n: getattr(task, n) for n in TASK_FROM_DATA if layers.provenance.history.get(f"task.{n}")}
    derived = derived_task_values(task.dataset_dir, bound, construct(S.ModelSettings).cache_dir)
    for name, value in derived.items():
        layers.bind_value(f"task.{name}", value, "the LeRobot dataset's meta/info.json")


def layer_gin(*, task_name: str | None = None, task_source: str = "flag --task_name",
              gin_files: Sequence[str] = (),
              gin_bindings: Sequence[str] = (), search_paths: Sequence[str] = (),
              yaml_cfg: TrainingConfig | None = None) -> GinLayers:
    """The one gin layering: training, the simulator's task loading and evaluation parse
    through it, in the precedence of this module's docstring (task file < --gin_file files
    < YAML stable keys < --gin_bindings), every binding's source recorded.

    Starts from a clear gin config with every policy's configurable registered (a task file
    may bind policy settings too). A task_name of None parses no task file (evaluation
    parses a run's operative_config.gin, which holds the task's values).
    """
    import_all_configurations()
    search = SearchPath(list(search_paths))
    layers = GinLayers(search)
    if task_name is not None:
        layers.add_file(find_task_file(search, task_name, task_source), f"--task_name={task_name}")
    for name in gin_files:
        layers.add_file(name, "--gin_file")
    if yaml_cfg:
        for key, value in yaml_cfg.stable.items():
            layers.bind_value(key, value, yaml_cfg.source[key])
    for i, text in enumerate(gin_bindings):
        layers.add_binding_text(text, f"--gin_bindings[{i}] ({text.strip()!r})")
    return layers


def resolve(fv: flags.FlagValues = flags.FLAGS) -> Resolved:
    """Resolve every layer into one validated configuration (no torch, no writes)."""
    yaml_cfg = None
    if fv.training_config:
        yaml_cfg = load_training_config(fv.training_config, fv.yaml_unknown_keys)
        for w in yaml_cfg.warnings:
            logging.warning("%s", w)
    hyper, hyper_source = _resolve_hyper(fv, yaml_cfg)
    extra = dict(yaml_cfg.training_args) if yaml_cfg else {}
    extra_sources = {k: yaml_cfg.source[k] for k in extra} if yaml_cfg else {}
    _parse_training_arg_flags(fv.training_arg, extra, extra_sources)
    hyper_source.update(extra_sources)

    layers = layer_gin(task_name=hyper.task_name, task_source=hyper_source["task_name"],
                       gin_files=fv.gin_file, gin_bindings=fv.gin_bindings,
                       search_paths=fv.gin_search_paths, yaml_cfg=yaml_cfg)
    bind_dataset_values(layers)
    built = build_settings(layers.provenance.source_of)
    # Cross-parameter checks that need the whole picture: a policy that cannot read this
    # task, a switch that has no meaning for this policy.
    built.policy.validate(task=built.task, dataset=built.dataset, model=built.model,
                          lora=built.lora, quantization=built.quantization,
                          source_of=layers.provenance.source_of)

    inert = S.inert_values(built.lora, built.quantization)
    if inert:
        values = {k: getattr(getattr(built, k.split(".")[0]), k.split(".")[1]) for k in inert}
        logging.warning("%s", S.inert_warning(inert, values, layers.provenance.source_of))

    unused = layers.unused_bindings()
    check_unused_values(unused)
    for key, source in unused:
        logging.warning("gin binding %s (from %s) was never used by this run: it has no effect", key, source)

    return Resolved(**{f.name: getattr(built, f.name) for f in dataclasses.fields(RunSettings)},
                    task_name=hyper.task_name, hyper=hyper,
                    hyper_source=hyper_source, training_args_extra=extra, layers=layers,
                    yaml=yaml_cfg, unused=unused, gin_files=[str(p) for p in layers.files],
                    gin_bindings=list(fv.gin_bindings))


def finalize() -> None:
    gin.finalize()


def resolve_argv(argv: list[str]) -> Resolved:
    """Resolve a command line in-process, on fresh FlagValues (for tests and tools).

    argv excludes the program name. Flag syntax errors raise UserError like train.py's.
    """
    from ilstudio.config.hyperparams import define_flags

    fv = flags.FlagValues()
    define_flags(fv)
    try:
        fv(["train.py", *argv])
    except flags.Error as e:
        raise UserError(str(e)) from None
    return resolve(fv)
