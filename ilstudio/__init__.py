"""ilstudio: imitation-learning policy training configured with gin, absl flags and YAML."""

import os as _os
import sys as _sys

_SIGINT_SEEN = []


def _interrupted(exc: BaseException | None) -> bool:
    """Ctrl-C, or an exception raised while handling it: numpy's import turns a
    KeyboardInterrupt inside its C extension into an ImportError that does not chain it, so a
    program also remembers that SIGINT arrived (``_on_sigint``)."""
    if _SIGINT_SEEN:
        return True
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def sigint_seen() -> bool:
    """Whether Ctrl-C reached this program's handler, even if the KeyboardInterrupt it raised
    was lost on the way (see ``training.trainer.LostInterrupt``)."""
    return bool(_SIGINT_SEEN)


def _interrupt_during_startup() -> None:
    """A Ctrl-C before a program's ``errors.guarded`` runs (while ``python -m
    ilstudio.<program>`` imports its modules) is the same one line and exit code 130 as one
    later, not Python's traceback. Installed only for ilstudio's programs (``sys.argv[0]`` is
    ``-m`` while Python locates the module; train.py; the ``ilstudio-*`` console scripts),
    never for code that merely imports ilstudio."""
    import signal

    def _on_sigint(signum, frame):
        _SIGINT_SEEN.append(signum)
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (nohup, &)
        signal.signal(signal.SIGINT, _on_sigint)
    previous = _sys.excepthook

    def hook(kind, value, tb):
        if _interrupted(value):
            print("\ninterrupted (Ctrl-C)", file=_sys.stderr, flush=True)
            _os._exit(130)  # nothing of the program has run yet: nothing to clean up
        previous(kind, value, tb)

    _sys.excepthook = hook


_PROGRAM = _os.path.basename(_sys.argv[0]) if _sys.argv else ""
if _PROGRAM in ("-m", "train.py") or _PROGRAM.startswith("ilstudio-"):  # a program, not a library use
    _interrupt_during_startup()
