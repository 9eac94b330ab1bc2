"""The declared schema of a LeRobotDataset's metadata, and the checks that enforce it.

Every field ilstudio reads from ``meta/info.json``, the episodes table (v2.1
``meta/episodes.jsonl``, v3.0 ``meta/episodes/*.parquet``) and the tasks table
(``tasks.jsonl`` / ``tasks.parquet``) is declared once below with its type, range and
whether it may be absent; the per-frame bookkeeping columns of the data files likewise.
``check_dataset`` runs the declarations and the cross-references between the tables
(episode and task indices that point somewhere, no duplicates, lengths against the data
rows, timestamps against fps, each video's fps against info.json) and raises one bounded
UserError naming the file and field. It runs where a dataset is opened
(``LeRobotData.load``), so ``--dry_run``, training and the converter check it before they act.
A rule declared here covers every row: a new malformed file breaks a declaration, not a
traceback deep in the reader.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ilstudio.errors import UserError, require_regular_file, shown

TIMESTAMP_TOLERANCE_S = 1e-4  # LeRobot's tolerance_s: frame i is at i / fps within it
FPS_RELATIVE_TOLERANCE = 1e-3  # an mp4's rate (30000/1001) against info.json's (29.97)
MAX_FPS = 10_000.0
MAX_ROWS_SHOWN = 3


@dataclass(frozen=True)
class Field:
    """One declared field: its type, its range, whether it may be absent or null."""

    name: str
    kind: str  # "int", "number", "str", "list", "dict", "bool"
    required: bool = True
    minimum: float | None = None  # inclusive
    positive: bool = False  # > 0 (fps)
    maximum: float | None = None
    nullable: bool = False  # null allowed (an optional field may be absent, not null, unless so)

    def check(self, row: dict, where: str) -> None:
        if self.name not in row:
            if self.required:
                raise UserError(f"{where}: field '{self.name}' is missing ({self.describe()})")
            return
        value = row[self.name]
        if value is None:
            if not self.nullable:
                raise UserError(f"{where}: field '{self.name}' is null ({self.describe()})")
            return
        if not _is_kind(value, self.kind):
            raise UserError(f"{where}: field '{self.name}' is {shown(value)} "
                            f"({type(value).__name__}), expected {self.describe()}")
        if self.kind in ("int", "number"):
            v = float(value)
            bad = (not math.isfinite(v) or (self.positive and not v > 0)
                   or (self.minimum is not None and v < self.minimum)
                   or (self.maximum is not None and v > self.maximum))
            if bad:
                raise UserError(f"{where}: field '{self.name}' is {shown(value)}, expected "
                                f"{self.describe()}")

    def describe(self) -> str:
        what = {"int": "an integer", "number": "a finite number", "str": "a string",
                "list": "a list", "dict": "an object", "bool": "true or false"}[self.kind]
        lo = "> 0" if self.positive else (f">= {self.minimum:g}" if self.minimum is not None else "")
        hi = f"<= {self.maximum:g}" if self.maximum is not None else ""
        bounds = " and ".join(b for b in (lo, hi) if b)
        return f"{what}{' ' + bounds if bounds else ''}"


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):
        return False  # JSON true is not the integer 1 here
    if kind == "int":
        return isinstance(value, (int, np.integer)) or (
            isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer())
    if kind == "number":
        return isinstance(value, (int, float, np.integer, np.floating))
    return isinstance(value, {"str": str, "list": (list, tuple, np.ndarray), "dict": dict}[kind])


# -- the declarations -------------------------------------------------------------------------

INFO_FIELDS = (
    Field("codebase_version", "str"),
    Field("fps", "number", positive=True, maximum=MAX_FPS),
    Field("features", "dict"),
    Field("chunks_size", "int", required=False, minimum=1),
    Field("data_path", "str", required=False),
    Field("video_path", "str", required=False, nullable=True),  # null: no video features
    Field("total_episodes", "int", required=False, minimum=0),
    Field("total_frames", "int", required=False, minimum=0),
    Field("total_tasks", "int", required=False, minimum=0),
)
FEATURE_FIELDS = (Field("dtype", "str"), Field("shape", "list"))
EPISODE_FIELDS = (
    Field("episode_index", "int", minimum=0),
    Field("length", "int", minimum=1),
    Field("tasks", "list", required=False),
    Field("mirrored", "bool", required=False),
)
V30_EPISODE_FIELDS = (
    *EPISODE_FIELDS,
    Field("data/chunk_index", "int", minimum=0),
    Field("data/file_index", "int", minimum=0),
    Field("dataset_from_index", "int", required=False, minimum=0),
    Field("dataset_to_index", "int", required=False, minimum=0),
)
V30_VIDEO_FIELDS = (  # per video key, prefixed "videos/<key>/"
    Field("chunk_index", "int", minimum=0),
    Field("file_index", "int", minimum=0),
    Field("from_timestamp", "number", minimum=0),
    Field("to_timestamp", "number", minimum=0),
)
TASK_FIELDS = (Field("task_index", "int", minimum=0), Field("task", "str"))
# Per-frame columns of a data file: (name, required).
FRAME_COLUMNS = (("episode_index", True), ("frame_index", False), ("timestamp", True),
                 ("task_index", False), ("index", False))


def check_fields(row: Any, fields: Iterable[Field], where: str) -> None:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with fields "
                        f"{[f.name for f in fields]}, got {shown(row)}")
    for f in fields:
        f.check(row, where)


def check_unique(values: Sequence[Any], field: str, where: str) -> None:
    seen: set = set()
    for v in values:
        if v in seen:
            raise UserError(f"{where}: {field} {shown(v)} appears more than once")
        seen.add(v)


# -- info.json --------------------------------------------------------------------------------


PATH_TEMPLATES = {  # info.json path templates and the names LeRobot formats them with
    "v2.1": {"data_path": ("episode_chunk", "episode_index"),
             "video_path": ("episode_chunk", "video_key", "episode_index")},
    "v3.0": {"data_path": ("chunk_index", "file_index"),
             "video_path": ("video_key", "chunk_index", "file_index")},
}


def check_info(raw: Any, path: Path, vectors: Sequence[str]) -> None:
    """meta/info.json against INFO_FIELDS, each feature against FEATURE_FIELDS, the path
    templates against the names they are formatted with; ``vectors``: the features ilstudio
    needs as [dim] vectors (state, action)."""
    where = str(path)
    check_fields(raw, INFO_FIELDS, where)
    for key, feat in raw["features"].items():
        check_fields(feat, FEATURE_FIELDS, f"{where}: feature '{key}'")
        shape = feat["shape"]
        if not shape or not all(_is_kind(d, "int") and d >= 1 for d in shape):
            raise UserError(f"{where}: feature '{key}' has shape {shown(shape)}, expected a "
                            f"non-empty list of positive integers")
    for key in vectors:
        if key not in raw["features"]:
            raise UserError(f"{where}: no '{key}' feature; ilstudio trains on "
                            f"{' and '.join(map(repr, vectors))}; the dataset has "
                            f"{shown(sorted(raw['features']))}")
        if len(raw["features"][key]["shape"]) != 1:
            raise UserError(f"{where}: feature '{key}' has shape {raw['features'][key]['shape']}, "
                            f"expected [dim]")
    videos = [k for k, f in raw["features"].items() if f["dtype"] == "video"]
    if videos and "video_path" in raw and raw["video_path"] is None:
        raise UserError(f"{where}: video_path is null but features {shown(videos)} are stored "
                        f"as video")
    for name, keys in PATH_TEMPLATES.get(raw["codebase_version"], {}).items():
        if raw.get(name) is not None:
            try:
                raw[name].format(**{k: 0 for k in keys})
            except (KeyError, IndexError, ValueError) as e:
                raise UserError(f"{where}: {name} {shown(raw[name])} is not a path template "
                                f"over {{{'}, {'.join(keys)}}} ({type(e).__name__}: {e})") from None


# -- the episodes and tasks tables --------------------------------------------------------------


def read_jsonl(path: Path) -> list[Any]:
    """A JSON-lines table; a missing file, a non-regular file or a bad line is a UserError."""
    require_regular_file(path, "LeRobot metadata")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read as UTF-8 JSON lines ({e})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def read_parquet_rows(files: Sequence[Path], what: str) -> list[tuple[Path, dict]]:
    """(file, row) of every row of the parquet files, LeRobot's stats/* columns left out."""
    import pyarrow.parquet as pq

    out = []
    for f in files:
        require_regular_file(f, what)
        try:
            cols = [c for c in pq.read_schema(f).names if not c.startswith("stats/")]
            out += [(f, row) for row in pq.read_table(f, columns=cols).to_pylist()]
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"{f}: {what} cannot be read as parquet (truncated or corrupt?): "
                            f"{shown(str(e), 200)}") from None
    return out


def _episode_rows(root: Path, version: str) -> list[tuple[str, dict]]:
    if version == "v2.1":
        path = root / "meta/episodes.jsonl"
        return [(f"{path}: row {i + 1}", r) for i, r in enumerate(read_jsonl(path))]
    directory = root / "meta/episodes"
    files = sorted(directory.rglob("*.parquet")) if directory.is_dir() else []
    if not files:
        raise UserError(f"{directory}: no parquet files (episode metadata of a LeRobot v3.0 dataset)")
    return [(f"{f}: episode row", r) for f, r in read_parquet_rows(files, "episode metadata")]


def _task_rows(root: Path, version: str) -> list[tuple[str, dict]]:
    if version == "v2.1":
        path = root / "meta/tasks.jsonl"
        return [(f"{path}: row {i + 1}", r) for i, r in enumerate(read_jsonl(path))]
    path = root / "meta/tasks.parquet"
    rows = []
    for f, r in read_parquet_rows([path], "the tasks table"):
        if isinstance(r, dict) and "task" not in r and "__index_level_0__" in r:
            r = {**r, "task": r["__index_level_0__"]}  # pandas keeps the index ("task") here
        rows.append((f"{f}: task row", r))
    return rows


def check_tables(raw: dict, root: Path, vkeys: Sequence[str]) -> tuple[dict[int, dict], dict[int, str]]:
    """The episodes and tasks tables against their declarations and each other; (episodes
    by index, tasks). vkeys: the features stored as video (v3.0 rows locate them)."""
    version = raw["codebase_version"]
    tasks: dict[int, str] = {}
    for where, row in _task_rows(root, version):
        check_fields(row, TASK_FIELDS, where)
        i = int(row["task_index"])
        if i in tasks:
            raise UserError(f"{where}: task_index {i} appears more than once")
        tasks[i] = row["task"]
    check_unique(list(tasks.values()), "task", f"{root}/meta/tasks table")
    episodes: dict[int, dict] = {}
    fields = EPISODE_FIELDS if version == "v2.1" else V30_EPISODE_FIELDS
    vkeys = vkeys if version == "v3.0" else []
    known = set(tasks.values())
    for where, row in _episode_rows(root, version):
        check_fields(row, fields, where)
        i = int(row["episode_index"])
        where = f"{where.rsplit(':', 1)[0]}: episode {i}"
        for key in vkeys:
            check_fields(row, [Field(f"videos/{key}/{f.name}", f.kind, minimum=f.minimum)
                               for f in V30_VIDEO_FIELDS], where)
            _check_span(row, key, raw["fps"], where)
        if "dataset_from_index" in row and "dataset_to_index" in row and \
                row["dataset_from_index"] is not None and row["dataset_to_index"] is not None \
                and row["dataset_to_index"] - row["dataset_from_index"] != row["length"]:
            raise UserError(f"{where}: dataset_to_index - dataset_from_index is "
                            f"{row['dataset_to_index'] - row['dataset_from_index']}, length is "
                            f"{row['length']}")
        for t in row.get("tasks") or ():
            if t not in known:
                raise UserError(f"{where}: task {shown(t)} is not in the tasks table "
                                f"({len(known)} tasks)")
        if i in episodes:
            raise UserError(f"{where}: episode_index {i} appears more than once")
        episodes[i] = row
    if not episodes:
        raise UserError(f"{root}: the LeRobot dataset lists no episodes")
    total = raw.get("total_episodes")
    if total is not None and total != len(episodes):
        raise UserError(f"{root / 'meta/info.json'}: total_episodes is {total}, the episodes table "
                        f"lists {len(episodes)}")
    return episodes, tasks


def _check_span(row: dict, key: str, fps: float, where: str) -> None:
    start, end = row[f"videos/{key}/from_timestamp"], row[f"videos/{key}/to_timestamp"]
    if not end > start:
        raise UserError(f"{where}: videos/{key}/to_timestamp ({end}) is not after "
                        f"from_timestamp ({start})")
    if (end - start) * fps + 0.5 < row["length"]:
        raise UserError(f"{where}: videos/{key} spans {end - start:.4f} s, too short for "
                        f"{row['length']} frames at {fps:g} fps")


# -- data files and videos against the tables ----------------------------------------------------


@dataclass(frozen=True)
class EpisodeFiles:
    """Where one episode's rows and videos are, as the episodes table says."""

    index: int
    length: int
    data_file: str  # relative to the root
    videos: dict[str, tuple[str, float]]  # feature key -> (file relative to the root, from_timestamp)
    tasks: tuple[str, ...] = ()  # the episodes table's "tasks" (empty: not listed, not checked)


def check_data_files(root: Path, fps: float, episodes: Sequence[EpisodeFiles], tasks: dict[int, str],
                     vectors: dict[str, int]) -> None:
    """Every data file against the tables: its bookkeeping columns (FRAME_COLUMNS) without
    nulls, each episode it holds listed in the episodes table with that many rows, task
    indices that point into the tasks table, frames 0..n-1 with timestamps i/fps apart
    (LeRobot's tolerance), and ``vectors`` (state, action: feature -> dim) of that width in
    every row. Then every video's fps against info.json's."""
    by_file: dict[str, list[EpisodeFiles]] = {}
    for ep in episodes:
        by_file.setdefault(ep.data_file, []).append(ep)
    listed = {ep.index for ep in episodes}
    for name, eps in by_file.items():
        cols = _frame_columns(root / name, vectors)
        _check_rows(root / name, cols, {ep.index: ep.length for ep in eps}, listed, tasks, fps)
        if "task_index" in cols:
            for ep in eps:
                _check_episode_tasks(root / name, ep, cols, tasks)
    _check_video_rates(root, fps, episodes)


def _frame_columns(path: Path, vectors: dict[str, int]) -> dict[str, np.ndarray]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not path.exists():
        raise UserError(f"{path}: data file is missing")
    require_regular_file(path, "data file")
    try:
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=[c for c, _ in FRAME_COLUMNS if c in names]
                              + [c for c in vectors if c in names])
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: cannot be read as parquet (truncated or corrupt?): "
                        f"{shown(str(e), 200)}") from None
    out = {}
    for col, required in [*FRAME_COLUMNS, *((v, True) for v in vectors)]:
        if col not in names:
            if required:
                raise UserError(f"{path}: no '{col}' column (LeRobot layout expected)")
            continue
        arr = table.column(col).combine_chunks()
        if arr.null_count:
            row = int(np.argmax(arr.is_null().to_numpy(zero_copy_only=False)))
            raise UserError(f"{path}: column '{col}' is null in {arr.null_count} row(s), first "
                            f"row {row}")
        if col in vectors:
            widths = pc.list_value_length(arr).to_numpy(zero_copy_only=False) \
                if hasattr(arr.type, "value_type") else np.ones(len(arr), int)
            bad = np.nonzero(widths != vectors[col])[0]
            if bad.size:
                raise UserError(f"{path}: column '{col}' has {int(widths[bad[0]])} values in row "
                                f"{int(bad[0])}, info.json's shape is [{vectors[col]}] "
                                f"({bad.size} ragged row(s))")
            continue
        try:
            out[col] = arr.to_numpy(zero_copy_only=False).astype(np.float64)
        except (TypeError, ValueError):
            raise UserError(f"{path}: column '{col}' is {arr.type}, expected numbers") from None
    return out


def _check_rows(path: Path, cols: dict[str, np.ndarray], expected: dict[int, int], listed: set[int],
                tasks: dict[int, str], fps: float) -> None:
    ep_col = cols["episode_index"]
    for col, values in cols.items():
        bad = ~np.isfinite(values)
        if bad.any():
            raise UserError(f"{path}: column '{col}' has a non-finite value (NaN or inf) in "
                            f"row {int(np.argmax(bad))}")
    strays = sorted(set(np.unique(ep_col).astype(int).tolist()) - listed)
    if strays:
        raise UserError(f"{path}: rows of episode(s) {strays[:MAX_ROWS_SHOWN]} that the episodes "
                        f"table does not list")
    if "task_index" in cols:
        unknown = sorted(set(np.unique(cols["task_index"]).astype(int).tolist()) - set(tasks))
        if unknown:
            raise UserError(f"{path}: task_index {unknown[:MAX_ROWS_SHOWN]} points nowhere (the "
                            f"tasks table has indices {sorted(tasks)[:10]})")
    if "index" in cols and len(np.unique(cols["index"])) != len(cols["index"]):
        raise UserError(f"{path}: column 'index' (the frame's index in the dataset) has "
                        f"duplicates")
    for index, length in expected.items():
        rows = np.nonzero(ep_col == index)[0]
        if len(rows) != length:
            raise UserError(f"{path}: episode {index} has {len(rows)} rows but the episode "
                            f"metadata says length {length}")
        _check_frames(path, index, cols, rows, fps)


def _check_episode_tasks(path: Path, ep: EpisodeFiles, cols: dict[str, np.ndarray],
                         tasks: dict[int, str]) -> None:
    """An episode's frames name only tasks its row in the episodes table lists (the frame's
    task is the instruction a language-conditioned policy trains on)."""
    if not ep.tasks:
        return
    rows = cols["episode_index"] == ep.index
    named = {tasks[i] for i in np.unique(cols["task_index"][rows]).astype(int).tolist()}
    other = sorted(named - set(ep.tasks))
    if other:
        raise UserError(f"{path}: episode {ep.index}'s frames have task(s) "
                        f"{[shown(t) for t in other[:MAX_ROWS_SHOWN]]} that the episodes table "
                        f"does not list for it (it lists {[shown(t) for t in ep.tasks[:3]]})")


def _check_frames(path: Path, index: int, cols: dict[str, np.ndarray], rows: np.ndarray,
                  fps: float) -> None:
    where = f"{path}: episode {index}"
    if "frame_index" in cols:
        frames = cols["frame_index"][rows]
        order = np.argsort(frames, kind="stable")
        if not np.array_equal(frames[order], np.arange(len(rows))):
            raise UserError(f"{where}: frame_index is not 0..{len(rows) - 1} once each")
        rows = rows[order]
    if "index" in cols and not np.array_equal(np.diff(cols["index"][rows]), np.ones(len(rows) - 1)):
        raise UserError(f"{where}: column 'index' is not consecutive over the episode's frames")
    ts = cols["timestamp"][rows]
    steps = np.diff(ts)
    off = np.nonzero(np.abs(steps - 1.0 / fps) > TIMESTAMP_TOLERANCE_S)[0]
    if off.size:
        k = int(off[0])
        raise UserError(f"{where}: timestamps {ts[k]:.6g} and {ts[k + 1]:.6g} of frames {k} and "
                        f"{k + 1} are not 1/fps = {1.0 / fps:.6g} s apart (within LeRobot's "
                        f"{TIMESTAMP_TOLERANCE_S:g} s; {off.size} such step(s))")


def _check_video_rates(root: Path, fps: float, episodes: Sequence[EpisodeFiles]) -> None:
    """Each existing video's frame rate is info.json's fps (a missing one is reported by the
    camera checks, which know whether the run uses that camera)."""
    from ilstudio.data.video import probe

    seen: set[str] = set()
    for ep in episodes:
        for key, (name, _start) in ep.videos.items():
            if name in seen or not (root / name).exists():
                continue
            seen.add(name)
            require_regular_file(root / name, f"video of {key}")
            rate = probe(root / name)["fps"]
            if rate and abs(rate - fps) > FPS_RELATIVE_TOLERANCE * fps:
                raise UserError(f"{root / name}: the video runs at {rate:g} fps but "
                                f"{root / 'meta/info.json'} says fps {fps:g}; frames would be "
                                f"taken at the wrong times")
