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
import hashlib
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
DATA_FINGERPRINT = "data_fingerprint.json"  # the episodes a run trains on (names, lengths, sizes)
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
    manifest = find_manifest(path.parent)
    record_intent(manifest, path, suffix)  # first: a temporary a kill leaves is known as ours
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if not private:
            os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        record_files(manifest, [(tmp, path)])
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
    # Recorded (with checksums) before the rename: whenever final exists, the manifest has it.
    record_files(find_manifest(final.parent), [(f, final / f.relative_to(staged))
                                               for f in sorted(staged.rglob("*")) if f.is_file()])
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
    record_intent(find_manifest(final.parent), final, suffix)
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
    files = sorted(Path(staged).iterdir())
    record_files(find_manifest(out), [(f, Path(out) / f.name) for f in files])
    for f in files:
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


def safetensors_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's header only (no tensor is read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: list(v["shape"]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "shape" in v}


# What a checkpoint needs beyond the weights to continue bit-identically (transformers' names).
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng_state*.pth")


def missing_training_state(path: str | os.PathLike) -> list[str]:
    """The optimizer/scheduler/RNG files a checkpoint lacks (all three: saved with
    save_only_model). A DeepSpeed checkpoint keeps its optimizer elsewhere: not judged."""
    path = Path(path)
    if any(p.is_dir() and p.name.startswith("global_step") for p in path.iterdir()):
        return []
    return [pattern for pattern in TRAINING_STATE if not any(path.glob(pattern))]


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete, intact checkpoint (None if it is).

    Our writer makes a checkpoint-N appear only when complete, but a disk, a copy or a user
    can still damage one afterwards: resume must not crash on it with a traceback.
    trainer_state.json must parse with its global_step; the weights, and every other
    safetensors/torch file present, must be whole; and every file the run's manifest
    records must have the size and sha256 recorded when it was written.
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
    return manifest_problem(path)  # a flipped bit keeps sizes and headers: the checksums tell


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


def foreign_entries(output_dir: str | os.PathLike) -> list[str]:
    """What in output_dir its run's manifest does not list (the user's: never removed by us),
    as paths relative to it, directories with a trailing '/'. A run that predates manifests
    cannot tell its files from the user's: everything in it counts as foreign."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    manifest = read_manifest(out)
    if manifest is None:
        return sorted(p.name + ("/" if p.is_dir() and not p.is_symlink() else "")
                      for p in out.iterdir() if p.name != LOCK_FILE)
    return _scan_run(out, manifest)[2]


def check_removable(output_dir: str | os.PathLike) -> None:
    """UserError (listing what is not the run's) unless remove_run would remove everything."""
    out = Path(output_dir)
    manifest = read_manifest(out)
    if manifest is None:
        raise overwrite_refusal(out, foreign_entries(out), legacy=True)
    foreign = _scan_run(out, manifest)[2]
    if foreign:
        raise overwrite_refusal(out, foreign)


def remove_run(output_dir: str | os.PathLike) -> list[str]:
    """Remove exactly what the manifest lists (never the lock, held by the caller); returns
    the paths removed. Refuses (UserError, nothing removed) when anything else is there.

    Kill-safe: the manifest goes last, so an interrupted removal is finished by the next one.
    """
    out = Path(output_dir)
    check_removable(out)
    files, trees, _ = _scan_run(out, read_manifest(out))
    for tree in trees:
        shutil.rmtree(tree)
    for f in files:
        f.unlink()
    for d in sorted((p for p in out.rglob("*") if p.is_dir() and not p.is_symlink()),
                    key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()  # the run's directories, now empty (a non-empty one is not ours to empty)
    (out / MANIFEST).unlink()
    return sorted(p.relative_to(out).as_posix() for p in (*trees, *files))


def overwrite_refusal(out: Path, foreign: list[str], legacy: bool = False) -> UserError:
    shown_names = ", ".join(foreign[:12]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 12 else "")
    if legacy:
        return UserError(f"--overwrite_output_dir: the run in {out} has no {MANIFEST} (it was "
                         f"written before ilstudio recorded a run's own files), so its files "
                         f"cannot be told from yours ({shown_names}). Nothing was removed: "
                         f"remove the directory yourself, or choose another --output_dir.")
    return UserError(f"--overwrite_output_dir: {out} holds a run and also files the run did not "
                     f"write ({shown_names}; the run's {MANIFEST} lists its own). "
                     f"--overwrite_output_dir removes only what the run wrote; move these away "
                     f"or choose another --output_dir. Nothing was removed.")


# -- the manifest: exactly what this run wrote -----------------------------------------------
#
# An append-only journal, one JSON object a line, beside the run (MANIFEST). Every write
# through this module (write_atomic, atomic_path, atomic_dir, publish_dir, publish_files) is
# recorded in the manifest of the run directory that encloses it, so the trainer, in-training
# evaluation and the evaluator are covered without each writer knowing. A file is recorded
# twice: its intent before the temporary is made (so a temporary a kill leaves is known as
# ours) and its size and sha256 just before the rename (so whenever the file exists, its
# record does). Appends of a line are atomic on a local filesystem; a torn last line (a
# machine crash) is skipped when read, so the manifest only ever under-claims: what it does
# not list is the user's, and is never removed.

MANIFEST = "manifest.jsonl"
_MANIFEST_MAX_BYTES = 64 << 20  # a run records a few lines per save
_TEMP_NAME = "[a-z0-9_]{8}"  # tempfile's random part of mkstemp/mkdtemp names


_MANIFEST_HEADER = {"ilstudio_manifest": 1}  # the first line: a manifest.jsonl ilstudio began


def _is_ours(manifest: Path) -> bool:
    """A regular file beside a run lock whose first line is our header: never append to a
    user's own manifest.jsonl (in a parent directory, or in a fresh --output_dir)."""
    try:
        if not stat.S_ISREG(os.lstat(manifest).st_mode) or not (
                manifest.parent / LOCK_FILE).exists():
            return False
        with open(manifest, "rb") as f:
            return f.readline(200).startswith(b'{"ilstudio_manifest"')
    except OSError:
        return False


def find_manifest(directory: str | os.PathLike) -> Path | None:
    """The manifest of the run directory enclosing ``directory`` (None outside any run)."""
    d = Path(os.path.abspath(directory))
    for p in (d, *d.parents):
        if _is_ours(p / MANIFEST):
            return p / MANIFEST
    return None


def start_manifest(out: str | os.PathLike) -> Path:
    """Begin (or, on resume, continue) the manifest of the run in ``out``; called holding
    the run's lock, before its first file. The checkpoint scratch directories are the run's
    whatever they hold."""
    m = Path(out) / MANIFEST
    if (m.exists() or m.is_symlink()) and not _is_ours(m):
        raise UserError(f"--output_dir={out}: holds a {MANIFEST} that ilstudio did not write "
                        f"(the run records its own files under that name); move it away or "
                        f"choose another --output_dir")
    fd = os.open(m, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        if os.fstat(fd).st_size == 0:
            os.write(fd, (json.dumps(_MANIFEST_HEADER) + "\n").encode())
    finally:
        os.close(fd)
    _append(m, [{"path": name, "scratch": True} for name in (STAGING_DIR, FINAL_STAGING_DIR)])
    return m


def _append(manifest: Path, records: list[dict]) -> None:
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    fd = os.open(manifest, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _relative(manifest: Path, path: Path) -> str | None:
    rel = os.path.relpath(os.path.abspath(path), manifest.parent)
    return None if rel == "." or rel.startswith("..") else rel


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_intent(manifest: Path | None, final: Path, suffix: str) -> None:
    """``final`` is about to be written through a temporary ``.<name>.<random><suffix>``."""
    rel = _relative(manifest, final) if manifest else None
    if rel is not None:
        _append(manifest, [{"path": rel, "intent": True, "suffix": suffix}])


def record_files(manifest: Path | None, pairs: list[tuple[Path, Path]]) -> None:
    """Record each (written file, the path it is about to take) with its size and sha256."""
    if manifest is None:
        return
    records = []
    for written, final in pairs:
        rel = _relative(manifest, final)
        if rel is not None:
            records.append({"path": rel, "size": os.path.getsize(written),
                            "sha256": sha256_of(written)})
    if records:
        _append(manifest, records)


def record_written(path: str | os.PathLike) -> None:
    """Record a file some other library wrote in place (trainer_state.json, TensorBoard's
    event files, resume_changes.txt); call after it is written."""
    path = Path(path)
    record_files(find_manifest(path.parent), [(path, path)])


class Manifest:
    """A run's manifest as read: the last record of every path."""

    def __init__(self, records: list[dict]) -> None:
        self.files: dict[str, dict] = {}  # path -> its size/sha256 record
        self.intents: dict[str, set[str]] = {}  # path -> the temporary suffixes used
        self.scratch: set[str] = set()
        for r in records:
            path = r.get("path")
            if not isinstance(path, str):
                continue
            if r.get("scratch"):
                self.scratch.add(path)
            elif r.get("intent"):
                self.intents.setdefault(path, set()).add(str(r.get("suffix", "")))
            elif isinstance(r.get("sha256"), str):
                self.files[path] = r

    def is_temporary(self, rel: str) -> bool:
        """A hidden temporary of a path this run wrote (``.<name>.<8 random><suffix>``)."""
        parent, _, base = rel.rpartition("/")
        for path, suffixes in self.intents.items():
            p_parent, _, name = path.rpartition("/")
            if p_parent == parent and any(re.fullmatch(
                    rf"\.{re.escape(name)}\.{_TEMP_NAME}{re.escape(s)}", base) for s in suffixes):
                return True
        return False

    def owns_dir(self, rel: str) -> bool:
        """A directory holding something this run wrote (or one that was about to)."""
        prefix = rel + "/"
        return any(p == rel or p.startswith(prefix) for p in (*self.files, *self.intents))


def read_manifest(out: str | os.PathLike) -> Manifest | None:
    """The manifest of the run in ``out`` (None if the run predates manifests, or none ran)."""
    m = Path(out) / MANIFEST
    if not _is_ours(m):
        return None
    try:
        with open(m, "rb") as f:
            data = f.read(_MANIFEST_MAX_BYTES)
    except OSError:
        return None
    records = []
    for line in data.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a torn line: under-claims, never over-claims
        if isinstance(r, dict):
            records.append(r)
    return Manifest(records)


_VERIFIED: dict[tuple, str | None] = {}  # (path, size, mtime) -> problem: hash each file once


def manifest_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` (a file, or a directory's files) differs from what its run recorded:
    another size or sha256 (a flipped bit, a truncation). None when it matches, or when no
    manifest records it (a run from before manifests, a copied checkpoint)."""
    path = Path(path)
    manifest = find_manifest(path if path.is_dir() else path.parent)
    if manifest is None:
        return None
    records = read_manifest(manifest.parent)
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for f in files:
        rel = _relative(manifest, f)
        rec = records.files.get(rel) if rel else None
        if rec is None:
            continue
        st = f.stat()
        key = (str(f.absolute()), st.st_size, st.st_mtime_ns, rec["sha256"])
        if key not in _VERIFIED:
            _VERIFIED[key] = (
                f"{f.name} has {st.st_size} bytes, the run wrote {rec.get('size')}"
                if st.st_size != rec.get("size") else
                f"{f.name} differs from what the run wrote (sha256 mismatch: damaged on disk "
                f"or changed since)" if sha256_of(f) != rec["sha256"] else None)
        if _VERIFIED[key]:
            return _VERIFIED[key]
    return None


# -- what --overwrite_output_dir may remove ---------------------------------------------------


def _scan_run(out: Path, manifest: Manifest) -> tuple[list[Path], list[Path], list[str]]:
    """(the run's files, the run's scratch/temporary trees, foreign entries) in ``out``."""
    files: list[Path] = []
    trees: list[Path] = []
    foreign: list[str] = []
    for root, dirs, names in os.walk(out):
        base = Path(root)
        for d in list(dirs):
            p = base / d
            rel = p.relative_to(out).as_posix()
            if p.is_symlink():
                names.append(d)  # a link is a file here: never followed
            elif rel in manifest.scratch or manifest.is_temporary(rel):
                trees.append(p)
            elif not manifest.owns_dir(rel):
                foreign.append(rel + "/")
            else:
                continue
            dirs.remove(d)
        for n in names:
            p = base / n
            rel = p.relative_to(out).as_posix()
            if rel in (MANIFEST, LOCK_FILE):
                continue
            if rel in manifest.files or manifest.is_temporary(rel):
                files.append(p)
            else:
                foreign.append(rel)
    return files, trees, sorted(foreign)
