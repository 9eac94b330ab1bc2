"""The ``train.py`` / ``ilstudio-train`` entrypoint: flags in, a run (or a clear error) out.

User mistakes (a misspelled flag, a bad YAML value, a missing episode file) end with a
message and exit code 2, never a traceback; a traceback means a bug in ilstudio.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from ilstudio.cli import fail, parse_command_line
from ilstudio.config.hyperparams import define_flags, help_groups
from ilstudio.errors import UserError, guarded

FLAGS = flags.FLAGS
define_flags(FLAGS)
flags.DEFINE_bool("help_gin", False, "Print every gin parameter (each configurable's parameters, "
                  "types, defaults and docs) and exit.")


# --helpfull's groups and --helpshort's flags, from the declarations (Hyper.group/common).
HELP_GROUPS, COMMON = help_groups()
HELP_DOC = """Train a policy.

  python train.py --gin_file=gin_configs/default.gin --gin_bindings='lora.r=16' --learning_rate=1e-3

Stable parameters (data, model, LoRA, quantization) are gin: --gin_file, --gin_bindings (or
--gin.NAME=VALUE); --help_gin lists every one with its default. Hyperparameters are the flags
below; --training_config reads an older flat YAML file."""


def _help(argv: list[str]) -> None:
    """--help/--helpshort (common flags by topic), --helpfull (all), --help_gin: print, exit 0."""
    from ilstudio.cli import gin_help, program_help

    asked = next((a for a in argv[1:] if a in ("--help", "--helpshort", "--helpfull", "--help_gin",
                                               "-h", "-?")), None)
    if asked is None:
        return
    if asked == "--help_gin":
        print(gin_help())
    else:
        print(program_help(FLAGS, HELP_DOC, HELP_GROUPS, asked == "--helpfull", COMMON), end="")
    sys.exit(0)


def _parse_flags(argv: list[str]) -> list[str]:
    _help(argv)
    return parse_command_line(FLAGS, argv)


def _main(argv: list[str]) -> None:
    """Every check --dry_run makes runs before torch is imported, in a real run too: a missing
    dataset or an output_dir in use is reported in seconds, not after ~90 s of imports. The
    plan (ilstudio/plan.py) is made once, here, and then printed or trained."""
    del argv
    resolved = None
    try:
        resolved = resolve_run()
        plan = make_run_plan(resolved)
        if FLAGS.dry_run or FLAGS.explain:
            print("# dry run: configuration valid; nothing written, nothing trained")
            return
        from ilstudio.training.run import train

        train(plan)
    except UserError as e:
        logging.flush()
        fail(str(e))
    except KeyboardInterrupt:
        _interrupted(resolved.output_dir if resolved is not None else None)
    except Exception as e:
        from ilstudio.training.run import Preempted

        if not isinstance(e, Preempted):
            raise
        logging.flush()
        print("\n" + str(e), file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


def resolve_run():
    """Flags + gin + YAML -> the resolved run (ilstudio/resolve.py), checked to record."""
    from ilstudio.config.dumps import check_recordable
    from ilstudio.resolve import resolve

    resolved = resolve(FLAGS)
    check_recordable(resolved)  # flags.txt must read back as this configuration
    return resolved


def make_run_plan(resolved):
    """The plan, with --dry_run/--explain's printout between its halves: the configuration is
    shown even when the data turns out to be missing. --explain may inspect a run that could
    not start here (its verdict is printed, not raised)."""
    from ilstudio.config.dumps import describe
    from ilstudio.config.training_args import check_training_arguments
    from ilstudio.plan import finish_plan, plan_data, plan_output

    show = FLAGS.dry_run or FLAGS.explain
    verdict = plan_output(resolved.hyper, FLAGS.overwrite_output_dir)
    if verdict.refused and not FLAGS.explain:
        raise UserError(verdict.refused)
    if show:
        print(describe(resolved, explain=FLAGS.explain), end="", flush=True)
    plan = finish_plan(resolved, FLAGS.overwrite_output_dir, verdict, plan_data(resolved, verdict))
    # Last: where transformers' source cannot be read without importing it, this imports it.
    how = check_training_arguments(resolved.hyper, resolved.training_args_extra)
    if show:
        print(f"# hyperparameters: {how}")
        print(plan.describe(), end="")
    return plan


def _interrupted(out: str | None) -> None:
    """Ctrl-C: one line (the last complete checkpoint in ``out``, the run's output_dir, and the
    command that resumes), exit code 130, no traceback. Every write is atomic, so nothing
    half-written is left. ``out`` is None when Ctrl-C came before the configuration resolved."""
    from ilstudio import rundir
    from ilstudio.training.run import resume_command

    logging.flush()
    if out is None or not rundir.holds_a_run(out):
        line = "interrupted (Ctrl-C) before the run wrote anything"
    else:
        last = rundir.last_complete_checkpoint(out)
        line = (f"interrupted (Ctrl-C): the last complete checkpoint is {last}; resume with: "
                f"{resume_command(out)}" if last else
                f"interrupted (Ctrl-C) before the first checkpoint of {out}; start it again "
                f"with: {resume_command(out)}")
    print("\n" + line, file=sys.stderr, flush=True)  # after a progress bar's unfinished line
    sys.exit(130)


def run_cli() -> None:
    """Console-script entrypoint (also what train.py calls). ``guarded``: Ctrl-C is one line
    and exit 130, an unexpected exception a bug report (see ilstudio.errors.guarded)."""
    sys.exit(guarded(lambda: app.run(_main, flags_parser=_parse_flags), "train.py"))


if __name__ == "__main__":
    run_cli()
