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
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from absl import logging

from ilstudio.errors import UserError, not_regular

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
EVALS_DIR = "evals"  # python -m ilstudio.eval's results: one folder per evaluation
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
    """Whether ``path`` is a complete, intact checkpoint directory (see checkpoint_problem)."""
    return checkpoint_problem(path) is None


def checkpoint_dirs(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every checkpoint-N directory in out as (N, path), newest first (complete or not)."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for p in out.glob(f"{CHECKPOINT_PREFIX}-*"):
        step = p.name.partition("-")[2]
        if step.isdigit() and p.is_dir():
            found.append((int(step), p))
    return sorted(found, reverse=True)


def last_complete_checkpoint(out: str | os.PathLike) -> str | None:
    """The newest checkpoint-N in out that is complete and intact (None if there is none).

    PolicyTrainer renames a checkpoint into place only once every file is written, so any
    checkpoint-N it wrote is complete; a checkpoint damaged since (a truncated
    model.safetensors or trainer_state.json), or a partial directory left by another writer,
    is skipped with a warning naming what is wrong and the checkpoint used instead.
    """
    skipped = []
    for _, p in checkpoint_dirs(out):
        problem = checkpoint_problem(p)
        if problem is None:
            for name, why in skipped:
                logging.warning("%s is damaged (%s): not resuming from it; falling back to %s",
                                name, why, p)
            return str(p)
        skipped.append((p, problem))
    for name, why in skipped:
        logging.warning("%s is damaged (%s): not resuming from it", name, why)
    return None


def finished_step(output_dir: str | os.PathLike) -> int | None:
    """The step a finished run ended at, None if the run in output_dir is not finished.

    A run is finished once its final trainer_state.json is beside it: the last file a run
    writes, after the final model. A run killed before that (even after its last
    checkpoint) is not finished: resume finishes it from that checkpoint.
    """
    out = Path(output_dir)
    if not (out / TRAINER_STATE).is_file() or not (out / WEIGHTS).is_file():
        return None
    try:
        return int(json.loads((out / TRAINER_STATE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        logging.warning("%s is damaged (%s): treating the run as unfinished", out / TRAINER_STATE, e)
        return None


# -- is a checkpoint intact ------------------------------------------------------------------


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not intact (None if its header and size agree)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path.name} is truncated (header says {n} bytes, the file has {size})"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{path.name} cannot be read ({e})"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    if 8 + n + max(ends, default=0) != size:
        return f"{path.name} is truncated ({size} bytes, its header describes {8 + n + max(ends, default=0)})"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """Why a torch.save file (a zip archive) is not intact: its directory sits at the end."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            size = path.stat().st_size
            if any(i.header_offset + i.compress_size > size for i in z.infolist()):
                return f"{path.name} is truncated"
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        return f"{path.name} is truncated or corrupt ({e})"
    return None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete, intact checkpoint (None if it is).

    Our writer makes a checkpoint-N appear only when complete, but a disk, a copy or a user
    can still damage one afterwards: resume must not crash on it with a traceback.
    trainer_state.json must parse with its global_step; the weights, and every other
    safetensors/torch file present, must be whole.
    """
    path = Path(path)
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
        int(state["global_step"])
    except FileNotFoundError:
        return f"no {TRAINER_STATE}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{TRAINER_STATE} is truncated or corrupt ({type(e).__name__}: {e})"
    if not (path / WEIGHTS).is_file():
        return f"no {WEIGHTS}"
    for f in sorted(path.iterdir()):
        if f.suffix == ".safetensors":
            problem = _safetensors_problem(f)
        elif f.suffix in (".pt", ".pth", ".bin"):
            problem = _torch_file_problem(f)
        else:
            continue
        if problem:
            return problem
    return None


# -- one run at a time ----------------------------------------------------------------------

LOCK_FILE = ".ilstudio.lock"  # flock()ed by the run that owns the directory, for its whole life
# How long an acquirer retries before calling the directory busy: a probe (lock_holder) holds a
# shared lock for microseconds; a running run holds it for hours.
_LOCK_PATIENCE_S = 2.0


def _holder_text(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not written its PID yet"


def _busy(out: Path, holder: str) -> UserError:
    return UserError(f"--output_dir={out} is in use by another run ({holder}). Two runs on one "
                     f"directory would overwrite each other's checkpoints: wait for it to end, "
                     f"stop it, or choose another --output_dir. (A killed run's lock is released "
                     f"by the kernel when its processes exit.)")


def lock_holder(output_dir: str | os.PathLike) -> str | None:
    """Who holds ``output_dir``'s run lock ("PID 123 on host, since ..."), None if nobody.

    Writes nothing (--dry_run uses it): the lock file is opened read-only and probed with a
    shared lock, which conflicts only with a run's exclusive one.
    """
    path = Path(output_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None  # absent, or not a plain file: RunLock reports the latter
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # a FIFO or device: RunLock refuses it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_text(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """The exclusive ``fcntl.flock`` on ``<output_dir>/.ilstudio.lock`` a run holds from before
    its first write until it ends.

    A second run on the same directory (a resume included) gets a UserError naming the
    holder's PID. The kernel releases a flock when the last process holding it exits, so the
    lock of a killed run never blocks; the file itself stays (unlinking a lock file others may
    be waiting on would let two runs in), and a stale PID in it means nothing.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        out = Path(output_dir)
        self.path = out / LOCK_FILE
        out.mkdir(parents=True, exist_ok=True)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                              | os.O_NONBLOCK, 0o644)  # a FIFO there must not block the open
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                os.close(self.fd)
                raise OSError(errno.EINVAL, "not a regular file")
        except OSError as e:
            raise UserError(f"--output_dir={out}: cannot open the run lock {self.path} "
                            f"({e.strerror}); it must be a plain file this user can write: "
                            f"remove it if no run is using {out}") from None
        deadline = time.monotonic() + _LOCK_PATIENCE_S
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = _holder_text(self.fd)
                    os.close(self.fd)
                    raise _busy(out, holder) from None
                time.sleep(0.05)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"PID {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_not_in_use(output_dir: str | os.PathLike) -> None:
    lock = Path(output_dir) / LOCK_FILE
    if lock.is_symlink() or (lock.exists() and not lock.is_file()):
        kind = "a symlink" if lock.is_symlink() else not_regular(lock.stat().st_mode)
        raise UserError(f"--output_dir={output_dir}: cannot open the run lock {lock}: it is "
                        f"{kind}, not a plain file; remove it if no run is using {output_dir}")
    holder = lock_holder(output_dir)
    if holder is not None:
        raise _busy(Path(output_dir), holder)


# -- what a run writes (and --overwrite_output_dir may remove) -------------------------------

TRAINER_ARGS_BIN = "training_args.bin"  # the Trainer's pickle beside every save
TENSORBOARD_DIR = "runs"  # TensorBoard's default directory (--logging_dir unset)
RUN_FILES = frozenset({
    OPERATIVE, ALL_BINDINGS, FLAGFILE, TRAINING_ARGS, NORM_STATS, DATA_SUMMARY, RESUME_CHANGES,
    WEIGHTS, TRAINER_STATE, EMA_FILE, ADAPTER_WEIGHTS, ADAPTER_CONFIG, NON_LORA_TRAINABLES,
    TRAINER_ARGS_BIN, EVAL_RESULTS, EVALS_DIR, BEST_DIR, LEARNING_CURVE, LOCK_FILE, STAGING_DIR,
    FINAL_STAGING_DIR, TENSORBOARD_DIR,
})
_RUN_PATTERNS = (
    re.compile(rf"{CHECKPOINT_PREFIX}-\d+"),  # checkpoint-N directories
    re.compile(r"eval_episode_\d+(_success|_failure)?\.(gif|mp4)"),  # the evaluator's videos (older)
    # write_atomic's temporaries (.<name>.<random>.tmp) of the files above, left by a kill
    re.compile(r"\.(" + "|".join(re.escape(n) for n in sorted(RUN_FILES)) + r")\..+"),
)


def written_by_a_run(name: str) -> bool:
    return name in RUN_FILES or any(p.fullmatch(name) for p in _RUN_PATTERNS)


def foreign_entries(output_dir: str | os.PathLike) -> list[str]:
    """Entries of output_dir that no run writes (a user's files: never removed by us)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() and not p.is_symlink() else "")
                  for p in out.iterdir() if not written_by_a_run(p.name)
                  or (p.name.startswith(f"{CHECKPOINT_PREFIX}-") and not p.is_dir()))


def remove_run(output_dir: str | os.PathLike) -> list[str]:
    """Remove what a run wrote in output_dir (never the lock, held by the caller); returns the
    names removed. Refuses (UserError, nothing removed) when anything else is there."""
    out = Path(output_dir)
    foreign = foreign_entries(out)
    if foreign:
        raise overwrite_refusal(out, foreign)
    removed = []
    for p in sorted(out.iterdir()):
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p.name)
    return removed


def overwrite_refusal(out: Path, foreign: list[str]) -> UserError:
    shown_names = ", ".join(foreign[:12]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 12 else "")
    return UserError(f"--overwrite_output_dir: {out} holds a run and also files no run writes "
                     f"({shown_names}). --overwrite_output_dir removes only what a run writes; "
                     f"move these away or choose another --output_dir. Nothing was removed.")
