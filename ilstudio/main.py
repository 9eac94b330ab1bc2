"""The ``train.py`` / ``ilstudio-train`` entrypoint: flags in, a run (or a clear error) out.

User mistakes (a misspelled flag, a bad YAML value, a missing episode file) end with a
message and exit code 2, never a traceback; a traceback means a bug in ilstudio.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from ilstudio.config.hyperparams import define_flags
from ilstudio.errors import UserError

FLAGS = flags.FLAGS
define_flags(FLAGS)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        rest = FLAGS(argv)
    except SystemExit as e:
        # absl exits 1 after printing --help; asking for help is not a failure.
        sys.exit(0 if e.code == 1 and any(a.startswith("--help") for a in argv) else e.code)
    except flags.Error as e:
        _fail(f"{e}\nRun with --helpfull to list every flag.")
    if len(rest) > 1:
        _fail(f"unexpected positional arguments {rest[1:]}: every setting is a --flag "
              f"(for example --gin_bindings='lora.r = 16')")
    return rest


def _main(argv: list[str]) -> None:
    del argv
    from ilstudio.config.dumps import describe
    from ilstudio.resolve import resolve

    try:
        resolved = resolve(FLAGS)
        if FLAGS.dry_run or FLAGS.explain:
            from ilstudio.config.training_args import check_training_arguments
            from ilstudio.training.run import check_output_dir, resume_checkpoint, validate_data

            how = check_training_arguments(resolved.hyper, resolved.training_args_extra)
            resume = resume_checkpoint(resolved)
            if FLAGS.dry_run:  # would the run start? (--explain may inspect an existing run)
                check_output_dir(resolved, resume, FLAGS.overwrite_output_dir)
            lengths = validate_data(resolved)
            print(describe(resolved, explain=FLAGS.explain), end="")
            print(f"# data: {len(lengths)} episodes, {sum(lengths)} steps in {resolved.task.dataset_dir}")
            print(f"# hyperparameters: {how}")
            print("# dry run: configuration valid; nothing written, nothing trained")
            return
        from ilstudio.training.run import train

        train(resolved, overwrite_output_dir=FLAGS.overwrite_output_dir)
    except UserError as e:
        logging.flush()
        _fail(str(e))


def run_cli() -> None:
    """Console-script entrypoint (also what train.py calls)."""
    # --helpshort lists the key flags of the program's main module: make ours key flags of
    # whichever script runs (train.py or the ilstudio-train console script).
    from ilstudio.config import hyperparams

    for flag in FLAGS.get_flags_for_module(hyperparams.__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run_cli()
