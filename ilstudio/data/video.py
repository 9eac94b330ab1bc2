"""mp4 frames by timestamp, and writing them, with PyAV (the ``lerobot`` extra).

Why PyAV and not torchcodec: PyAV's wheel bundles its own FFmpeg (libx264, libdav1d for AV1,
hevc), so ``pip install av`` is all it takes; torchcodec loads the *system* FFmpeg libraries
(none are installed on our machines) and each release is built against one torch minor
release, which ties the video decoder to the torch pin. Speed: see BENCHMARKS.md (data
decoding); with LeRobot's keyframe interval (g=2) a random frame costs a seek and at most
two decoded frames.

Frame-exact rule (LeRobot's): the frame for timestamp ``ts`` is the decoded frame whose
presentation time is within ``TOLERANCE_S`` of ``ts``; none within it is an error, never
a neighbouring frame silently.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from ilstudio.errors import UserError

TOLERANCE_S = 1e-4  # LeRobot's default tolerance_s
# h264 at crf 18 with a keyframe every 2 frames (LeRobot's g=2: cheap random access).
# yuv420p needs even sizes; odd-sized cameras are written as yuv444p.
CODEC = "libx264"
ENCODER_OPTIONS = {"g": "2", "crf": "18", "preset": "veryfast"}
# The encoder settings as LeRobot records them in a video feature's info block (get_video_info
# with its encoder config: video.g, video.crf, video.preset, video.fast_decode, ...).
ENCODER_INFO = {"video.g": 2, "video.crf": 18, "video.preset": "veryfast", "video.fast_decode": 0,
                "video.video_backend": "pyav", "video.extra_options": {}}


def _av():
    try:
        import av
    except ImportError:
        raise UserError("reading or writing LeRobot videos needs PyAV: pip install 'ilstudio[lerobot]'") from None
    return av


def pix_fmt_for(height: int, width: int) -> str:
    return "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"


class VideoError(UserError):
    """A video that is missing, truncated, or lacks a frame it should have."""


def probe(path: Path) -> dict:
    """Header facts (frames, width, height, codec, pix_fmt, fps, duration_s); VideoError if unreadable."""
    av = _av()
    if not path.is_file():
        raise VideoError(f"{path}: video file is missing")
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise VideoError(f"{path}: has no video stream")
            s = c.streams.video[0]
            duration = (float(s.duration * s.time_base) if s.duration is not None
                        else (c.duration or 0) / 1e6)
            return {"frames": int(s.frames), "width": s.width, "height": s.height,
                    "codec": s.codec_context.name, "pix_fmt": s.pix_fmt,
                    "fps": float(s.average_rate or s.base_rate or 0), "duration_s": duration}
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: cannot be opened as a video (truncated or corrupt?): {e}") from None


class VideoReader:
    """One open mp4; frames by presentation timestamp. Not fork-safe: open one per process."""

    def __init__(self, path: Path, thread_type: str = "SLICE") -> None:
        av = _av()
        self.path = path
        if not path.is_file():
            raise VideoError(f"{path}: video file is missing")
        try:
            self._container = av.open(str(path))
            self._stream = self._container.streams.video[0]
        except (av.error.FFmpegError, IndexError) as e:
            raise VideoError(f"{path}: cannot be opened as a video (truncated or corrupt?): {e}") from None
        # Slice threads, not frame threads: frame threading holds frames back after every seek
        # (measured, one 240x320 file, interleaved: random frames 221/s with SLICE, 161/s with
        # AUTO; sequential decoding 392 vs 454 frames/s). Random access is the training path;
        # decode_run (whole episodes, sequential) uses AUTO.
        self._stream.thread_type = thread_type
        self._errors = av.error.FFmpegError
        self._lock = threading.Lock()  # one decoder state: threads (preload) take turns

    def close(self) -> None:
        with self._lock:
            self._container.close()

    def _decode_from(self, ts: float) -> Iterator[tuple[float, object]]:
        """(time, frame) from the keyframe at or before ts onwards."""
        s = self._stream
        # The nearest keyframe at or before ts's own pts (rounded, not floored: a frame that is
        # itself a keyframe is decoded first, not after the previous keyframe's frames).
        self._container.seek(max(0, round(ts / s.time_base)), backward=True, any_frame=False, stream=s)
        for frame in self._container.decode(s):
            if frame.pts is not None:
                yield float(frame.pts * s.time_base), frame

    def frames_at(self, timestamps: Sequence[float]) -> np.ndarray:
        """uint8 (n, H, W, 3): for each timestamp, the frame shown at that time (±1e-4 s)."""
        with self._lock:
            return self._frames_at(timestamps)

    def _frames_at(self, timestamps: Sequence[float]) -> np.ndarray:
        ts = np.asarray(timestamps, dtype=np.float64)
        if ts.size == 0:
            raise ValueError("no timestamps")
        order = np.argsort(ts, kind="stable")
        out: list[np.ndarray | None] = [None] * len(ts)
        k = 0  # next position in `order` to fill
        last = float(ts[order[-1]])
        seen: list[float] = []
        try:
            for t, frame in self._decode_from(float(ts[order[0]])):
                seen.append(t)
                while k < len(order) and t > ts[order[k]] + TOLERANCE_S:
                    k += 1  # this query was skipped over: no frame matched it
                if k < len(order) and abs(t - ts[order[k]]) <= TOLERANCE_S:
                    img = frame.to_ndarray(format="rgb24")
                    while k < len(order) and abs(t - ts[order[k]]) <= TOLERANCE_S:
                        out[order[k]] = img
                        k += 1
                if t >= last - TOLERANCE_S and k >= len(order):
                    break
        except self._errors as e:
            raise VideoError(f"{self.path}: decoding failed near {ts[order[0]]:.4f} s "
                             f"(truncated or corrupt?): {e}") from None
        missing = [float(ts[i]) for i in range(len(ts)) if out[i] is None]
        if missing:
            near = (f"decoded frames span {seen[0]:.4f}-{seen[-1]:.4f} s" if seen
                    else "no frame could be decoded there")
            raise VideoError(f"{self.path}: no frame at timestamp {missing[0]:.4f} s "
                             f"({len(missing)} of {len(ts)} wanted are missing; {near}): the video "
                             f"is shorter than its episode metadata says, or truncated")
        return np.stack(out)


def decode_run(path: Path, timestamps: Sequence[float]) -> np.ndarray:
    """Frames at many consecutive timestamps (a whole episode): one seek, then sequential
    decoding with frame and slice threads, which a run of frames can use (a random access
    cannot: frame threading holds frames back after each seek). Same frame rule as frames_at."""
    reader = VideoReader(path, thread_type="AUTO")
    try:
        return reader.frames_at(timestamps)
    finally:
        reader.close()


MAX_OPEN_VIDEOS = 64  # per process: a v3.0 file serves many episodes; fds stay bounded
_OPEN: OrderedDict[tuple[int, int, str], VideoReader] = OrderedDict()
_OPEN_LOCK = threading.Lock()


def shared_reader(path: Path) -> VideoReader:
    """This thread's open reader of path (least recently used ones are closed past 64).

    Keyed by pid: a DataLoader worker forked from a process with open readers opens its own;
    and by thread: preload's threads decode the episodes of one v3.0 file in parallel.
    """
    key = (os.getpid(), threading.get_ident(), str(path))
    with _OPEN_LOCK:
        reader = _OPEN.get(key)
        if reader is None:
            reader = _OPEN[key] = VideoReader(path)
        _OPEN.move_to_end(key)
        while len(_OPEN) > MAX_OPEN_VIDEOS:
            (pid, _, _), old = _OPEN.popitem(last=False)
            if pid == key[0]:  # another process's (inherited) reader is only forgotten
                old.close()
    return reader


class DecodedEpisodes:
    """Whole episodes' decoded frames, per process, least recently used dropped past a budget.

    Why: a lazily read sample needs one frame, and decoding it alone costs a seek plus up to a
    GOP of frames (~4x a gzip HDF5 chunk here); decoding a whole episode in one pass costs about
    half as much per frame, and afterwards every sample of that episode is a memory copy. The
    budget (``dataset.video_cache_mb``) bounds all processes together: a DataLoader worker
    keeps its own episodes within budget / num_workers (``limit``).
    """

    def __init__(self, budget_mb: float = 0) -> None:
        self.budget = int(budget_mb * 2**20)
        self.bytes = 0
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._pid, self._lock = os.getpid(), threading.Lock()

    def configure(self, budget_mb: float) -> None:
        with self._guard():
            self.budget = int(budget_mb * 2**20)
            self._evict()

    def _guard(self) -> threading.Lock:
        if self._pid != os.getpid():  # a forked worker: the parent's lock may have been held
            self._pid, self._lock = os.getpid(), threading.Lock()
        return self._lock

    @property
    def limit(self) -> int:
        """This process's share of the budget, in bytes."""
        data = sys.modules.get("torch.utils.data")  # loaded wherever a DataLoader runs
        info = data.get_worker_info() if data is not None else None
        return self.budget // info.num_workers if info is not None else self.budget

    def get(self, key: tuple) -> np.ndarray | None:
        with self._guard():
            frames = self._items.get(key)
            if frames is not None:
                self._items.move_to_end(key)
            return frames

    def put(self, key: tuple, frames: np.ndarray) -> None:
        with self._guard():
            if key in self._items or frames.nbytes > self.limit:
                return
            self._items[key] = frames
            self.bytes += frames.nbytes
            self._evict()

    def _evict(self) -> None:
        limit = self.limit
        while self.bytes > limit and self._items:
            self.bytes -= self._items.popitem(last=False)[1].nbytes


DECODED = DecodedEpisodes()


def set_cache_mb(budget_mb: float) -> None:
    """The decoded-episode budget of this process and the DataLoader workers forked later."""
    DECODED.configure(budget_mb)


class VideoWriter:
    """Frames -> one mp4, frame n at time n/fps; several episodes may follow each other."""

    def __init__(self, path: Path, fps: float, height: int, width: int) -> None:
        av = _av()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.frames, self.bytes = path, 0, 0  # bytes: encoded so far
        self.fps = Fraction(fps).limit_denominator(1001)
        self._container = av.open(str(path), "w")
        self._stream = self._container.add_stream(CODEC, rate=self.fps, options=dict(ENCODER_OPTIONS))
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = pix_fmt_for(height, width)
        self._stream.codec_context.time_base = 1 / self.fps
        self._frame_cls = av.VideoFrame

    @property
    def pix_fmt(self) -> str:
        return self._stream.pix_fmt

    def write(self, frames: np.ndarray) -> None:
        for img in np.asarray(frames, dtype=np.uint8):
            frame = self._frame_cls.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = self.frames
            frame.time_base = self._stream.codec_context.time_base
            packets = self._stream.encode(frame)
            self.bytes += sum(p.size for p in packets)
            self._container.mux(packets)
            self.frames += 1

    def close(self) -> None:
        self._container.mux(self._stream.encode(None))
        self._container.close()


def encode_episode(path: Path, frames: np.ndarray, fps: float) -> None:
    """One episode alone in its own mp4: its first frame is a keyframe (a fresh encoder)."""
    writer = VideoWriter(path, fps, *np.asarray(frames).shape[1:3])
    try:
        writer.write(frames)
    finally:
        writer.close()


def duration_s(path: Path) -> float:
    """A video's duration as LeRobot reads it (stream duration x time base)."""
    av = _av()
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return float(s.duration * s.time_base) if s.duration is not None else c.duration / 1e6


class VideoAppender:
    """A multi-episode mp4 built as LeRobot builds one: each episode is encoded alone (so it
    starts on a keyframe), then its packets are copied after the previous episodes' (stream
    copy, no re-encoding), shifted by their duration. The file stays open between episodes."""

    def __init__(self, path: Path) -> None:
        self.path, self.duration_s = path, 0.0
        # Size in bytes as LeRobot would find it on disk: the episode files appended so far
        # (our file is still open and its muxer buffers; LeRobot's concatenation of them is
        # within a few header KiB of this sum, never larger).
        self.bytes = 0
        self._ticks = 0  # the episodes so far, in the stream's time base (exact, no float drift)
        self._container = self._stream = None

    def append(self, episode: Path) -> tuple[float, float]:
        """Copy one episode's mp4 in; returns its (from_timestamp, to_timestamp) in this file."""
        av = _av()
        start = self.duration_s
        self.bytes += episode.stat().st_size
        with av.open(str(episode)) as src:
            s = src.streams.video[0]
            if self._container is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._container = av.open(str(self.path), "w")
                self._stream = self._container.add_stream_from_template(s)
            offset = self._ticks
            for packet in src.demux(s):
                if packet.dts is None:  # the demuxer's end-of-stream marker
                    continue
                packet.pts += offset
                packet.dts += offset
                packet.stream = self._stream
                self._container.mux(packet)
            self._ticks += int(s.duration)
            self.duration_s = float(self._ticks * s.time_base)
        return start, self.duration_s

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
