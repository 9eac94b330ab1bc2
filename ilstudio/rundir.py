"""The run directory: what a run writes where, and how it writes it safely.

One home for the layout of ``--output_dir`` (every file name a run, a checkpoint or the
evaluator uses), for the one atomic write (temporary name beside the target, fsync, rename),
for checkpoint staging (a ``checkpoint-N`` directory appears only once complete), and for the
questions every program asks of a run directory: does it hold a run, is that run finished,
which is its last complete checkpoint. Imports nothing above ``errors``, so every layer may use it.

Atomicity: ``os.replace`` is atomic within one filesystem, so a kill at any moment leaves
either the previous file (or none) or the new one, never a truncated one; temporary names
start with '.' so no reader's glob (``*.hdf5``, ``checkpoint-*``) matches them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from absl import logging

from ilstudio.errors import UserError

# -- file names -----------------------------------------------------------------------------
# The configuration dumps a run writes before training (ilstudio/config/dumps.py).
OPERATIVE = "operative_config.gin"  # the parameters the run used, defaults included
ALL_BINDINGS = "config.gin"  # every gin binding as parsed
FLAGFILE = "flags.txt"  # an absl flagfile that reruns the configuration
TRAINING_ARGS = "training_args.json"
NORM_STATS = "normalization.json"
DATA_SUMMARY = "data_summary.json"
RESUME_CHANGES = "resume_changes.txt"  # configuration changes accepted on resume
# What the Trainer writes (the final model beside the run, and inside every checkpoint-N).
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.json"  # the last file transformers writes into a checkpoint
EMA_FILE = "ema.safetensors"  # the live (non-EMA) weights when model.using_ema
# LoRA runs (peft's format, so peft can load them too).
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
NON_LORA_TRAINABLES = "non_lora_trainables.safetensors"
# What ``python -m ilstudio.eval`` writes.
EVAL_RESULTS = "eval_results.json"
# In-training evaluation (--eval_every_steps, ilstudio/training/sim_eval.py).
BEST_DIR = "best"  # the weights with the highest success rate so far (a checkpoint's files)
BEST_RECORD = "best.json"  # inside best/: the step and the scores that put it there
LEARNING_CURVE = "learning_curve.png"

CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR: checkpoint-<step>
# Checkpoints are written here, then renamed to checkpoint-N in one step: a directory named
# checkpoint-N is always complete (get_last_checkpoint's pattern never matches this name).
STAGING_DIR = ".checkpoint-staging"
FINAL_STAGING_DIR = ".final-staging"  # the final model's files, before they move beside the run

# What in an output directory says a run lives there.
RUN_MARKERS = (OPERATIVE, TRAINER_STATE, WEIGHTS)


# -- the one atomic write -------------------------------------------------------------------


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under ``path``, then ``path`` itself (before renaming it into place)."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(path)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def ordinary_permissions(tree: str | os.PathLike) -> None:
    """Give private (0600) files under ``tree`` the umask's ordinary permissions.

    safetensors writes its files 0600 (through a temporary file); a run directory is read by
    colleagues and other jobs, like the episodes the recorder writes.
    """
    mode = 0o666 & ~_umask()
    for p in [Path(tree), *Path(tree).rglob("*")]:
        if p.is_file() and not p.is_symlink() and p.stat().st_mode & 0o777 == 0o600:
            p.chmod(mode)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp",
                private: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it becomes ``path``.

    For writers that need a file name (h5py, safetensors). The temporary file is hidden
    (``.<name>.<random><suffix>``), fsynced and renamed onto ``path``; on any error, or a
    KeyboardInterrupt, it is removed and ``path`` is untouched.
    The file gets the umask's ordinary permissions (0644 with the usual umask), like any file
    the user's tools write: run directories are read by colleagues and by other jobs.
    private=True keeps mkstemp's 0600.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if not private:
            os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write text or bytes to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


def publish_dir(staged: str | os.PathLike, final: str | os.PathLike, *,
                replace: bool = True) -> bool:
    """Move a completely written directory onto ``final`` in one rename (fsynced first).

    replace=True: an existing ``final`` is removed first. replace=False: an existing
    ``final`` wins (several processes may race to create the same directory) and ``staged``
    is discarded; returns False then, True when ``staged`` became ``final``.
    """
    staged, final = Path(staged), Path(final)
    ordinary_permissions(staged)
    fsync_tree(staged)
    if final.exists():
        if not replace:
            shutil.rmtree(staged)
            return False
        shutil.rmtree(final)
    try:
        os.rename(staged, final)
    except OSError:
        if replace or not final.exists():  # not a lost race: a real failure
            raise
        shutil.rmtree(staged)
        return False
    fsync_dir(final.parent)
    return True


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, replace: bool = True,
               suffix: str = ".partial") -> Iterator[Path]:
    """Yield a hidden sibling directory to fill (``.<name>.<random><suffix>``); when the
    block succeeds it becomes ``final`` (see ``publish_dir``); on any error it is removed
    and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=suffix))
    os.chmod(staged, 0o777 & ~_umask())  # mkdtemp makes it 0700; a published directory is ordinary
    try:
        yield staged
        publish_dir(staged, final, replace=replace)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def publish_files(staged: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move every file of a staging directory into ``out``, each by one rename."""
    ordinary_permissions(staged)
    for f in sorted(Path(staged).iterdir()):
        os.replace(f, Path(out) / f.name)


# -- write failures -------------------------------------------------------------------------

# torch.save reports a failed write as a RuntimeError from its zip writer.
_TORCH_WRITE_ERRORS = ("PytorchStreamWriter failed", "inline_container.cc", "file write failed")


def is_write_failure(e: BaseException) -> bool:
    """A failed write to disk, as torch/safetensors/the OS report it (disk full, EFBIG, EACCES)."""
    if isinstance(e, OSError):
        return True
    text = f"{type(e).__name__}: {e}"
    return ("SafetensorError" in text and "I/O error" in text) or (
        isinstance(e, RuntimeError) and any(m in text for m in _TORCH_WRITE_ERRORS))


@contextlib.contextmanager
def output_errors(out: str | os.PathLike, what: str) -> Iterator[None]:
    """A failed write (disk full, read-only, a path through a file) is a UserError, not a traceback."""
    try:
        yield
    except Exception as e:
        if not is_write_failure(e):
            raise
        raise UserError(f"--output_dir={out}: cannot write {what}: {e}. Check free space, "
                        f"permissions, and that the path is a directory.") from None


# -- what a run directory holds -------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}-{step}"


def holds_a_run(output_dir: str | os.PathLike) -> list[str]:
    """What in output_dir says a run lives there (empty if none)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [m for m in RUN_MARKERS if (output_dir / m).exists()]
    found += sorted(p.name for p in output_dir.glob(f"{CHECKPOINT_PREFIX}-*"))
    return found


def is_finished(output_dir: str | os.PathLike) -> bool:
    """Whether the run in output_dir got past its first complete save (a final model or the
    Trainer's state beside the run); a run killed earlier holds only config dumps/partials."""
    return bool({WEIGHTS, TRAINER_STATE} & set(holds_a_run(output_dir)))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete checkpoint directory (trainer_state.json is written last)."""
    return (Path(path) / TRAINER_STATE).is_file()


def last_complete_checkpoint(out: str | os.PathLike) -> str | None:
    """The newest checkpoint-N in out that is complete (None if there is none).

    PolicyTrainer renames a checkpoint into place only once every file is written, so any
    checkpoint-N is complete; the trainer_state.json check also rejects partial directories
    left by other writers (it is the last file transformers writes).
    """
    out = Path(out)
    if not out.is_dir():
        return None
    found = []
    for p in out.glob(f"{CHECKPOINT_PREFIX}-*"):
        step = p.name.partition("-")[2]
        if step.isdigit() and p.is_dir():
            if is_checkpoint(p):
                found.append((int(step), str(p)))
            else:
                logging.warning("%s is incomplete (no %s): not resuming from it", p, TRAINER_STATE)
    return max(found)[1] if found else None
