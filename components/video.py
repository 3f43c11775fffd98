"""Video decoding with decord: sample frame indices first, then decode only those frames.

Sampling follows LLaVA-NeXT: take every ``round(native_fps / fps)``-th frame; when that gives more
than ``max_frames`` (or when forced), switch to ``max_frames`` uniformly spaced indices.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from components.errors import Mismatch

VideoSource = str | os.PathLike | bytes | bytearray | BinaryIO


class VideoDecodeError(Mismatch):
    """A video could not be decoded: corrupt, truncated, empty, or not a video at all. ``expected`` and
    ``found`` are ours, never the decoder's own log text (which carries timestamps and source paths); a
    caller says them of its own subject with ``about`` (a sample's field, a request's part)."""

    def __init__(self, source: str, expected: str, found: str):
        super().__init__(f"video {source}", expected, found)
        self.source = source


class VideoTooLargeError(VideoDecodeError):
    """The sampled frames would hold more pixels than allowed (checked on the first frame, before the rest
    are decoded)."""


@dataclass
class VideoClip:
    frames: np.ndarray
    """uint8 [F, H, W, 3]."""
    indices: list[int]
    timestamps: list[float]
    """Seconds from the start, one per frame."""
    native_fps: float
    duration: float
    """Seconds."""
    total_frames: int


def sample_frame_indices(
    total_frames: int,
    native_fps: float,
    *,
    fps: float = 1.0,
    max_frames: int = 32,
    force_uniform: bool = False,
) -> list[int]:
    """Frame indices to decode, with LLaVA-NeXT's semantics."""
    if total_frames < 1:
        raise ValueError(f"total_frames: expected at least 1, found {total_frames}")
    if native_fps <= 0 or fps <= 0:
        raise ValueError(
            f"fps: expected positive native_fps and fps, found native_fps={native_fps}, fps={fps}"
        )
    if max_frames < 1:
        raise ValueError(f"max_frames: expected at least 1, found {max_frames}")
    step = max(1, round(native_fps / fps))
    indices = list(range(0, total_frames, step))
    if len(indices) > max_frames or force_uniform:
        indices = np.linspace(0, total_frames - 1, min(max_frames, total_frames), dtype=int).tolist()
    return indices


# Container signatures we accept before handing bytes to the decoder: a quick, bounded check that
# keeps obviously wrong inputs (text, images, empty files) away from the native decoder.
_SIGNATURES = (
    (4, b"ftyp"),  # mp4 / mov / m4v / 3gp
    (4, b"moov"),
    (4, b"mdat"),
    (4, b"free"),
    (4, b"wide"),
    (0, b"\x1a\x45\xdf\xa3"),  # matroska / webm
    (0, b"RIFF"),  # avi
    (0, b"\x00\x00\x01\xba"),  # mpeg-ps
    (0, b"\x47"),  # mpeg-ts sync byte
    (0, b"FLV"),
)


def _read_bytes(source: VideoSource) -> tuple[str, bytes]:
    if isinstance(source, (bytes, bytearray)):
        return "<bytes>", bytes(source)
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        try:
            with open(name, "rb") as f:
                return name, f.read()
        except OSError as e:
            raise VideoDecodeError(
                name, "a readable file", f"one that cannot be read ({e.strerror or type(e).__name__})"
            ) from e
    name = getattr(source, "name", "<file-like>")
    return str(name), source.read()


def probe_container(name: str, data: bytes) -> None:
    """Raise VideoDecodeError unless ``data`` starts like a known video container."""
    if not data:
        raise VideoDecodeError(name, "video bytes", "an empty file (0 bytes)")
    for offset, magic in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return
    raise VideoDecodeError(name, "a video container (mp4, mkv/webm, avi, mpeg)", f"bytes {data[:12]!r}")


def read_frames(
    source: VideoSource,
    *,
    fps: float = 1.0,
    max_frames: int = 32,
    force_uniform: bool = False,
    num_threads: int = 1,
    max_pixels: int | None = None,
) -> VideoClip:
    """Decode only the sampled frames of ``source`` (a path, bytes, or a file-like object). ``max_pixels``:
    the most sampled-frames x height x width allowed; a larger clip is refused after its first frame."""
    import decord  # a native library: import where it is used

    name, data = _read_bytes(source)
    probe_container(name, data)
    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=num_threads)
        total = len(reader)
        native_fps = float(reader.get_avg_fps())
    except (decord.DECORDError, RuntimeError) as e:
        raise VideoDecodeError(
            name, "a video stream the decoder can open", "none (corrupt, or no video track)"
        ) from e
    if total < 1:
        raise VideoDecodeError(name, "at least one frame", "0")
    if not native_fps > 0:
        raise VideoDecodeError(name, "a positive frame rate", f"{native_fps}")
    indices = sample_frame_indices(
        total, native_fps, fps=fps, max_frames=max_frames, force_uniform=force_uniform
    )
    if max_pixels is not None:
        try:
            height, width = reader[0].shape[:2]
        except (decord.DECORDError, RuntimeError) as e:
            raise VideoDecodeError(name, "a decodable first frame", "none (truncated or corrupt)") from e
        if len(indices) * height * width > max_pixels:
            raise VideoTooLargeError(
                name,
                f"at most {max_pixels} pixels in the sampled frames",
                f"{len(indices)} frames of {width}x{height}",
            )
    try:
        frames = reader.get_batch(indices).asnumpy()
    except (decord.DECORDError, RuntimeError) as e:
        raise VideoDecodeError(
            name,
            f"frames {indices[0]}..{indices[-1]} of {total} decodable",
            "frames that cannot be decoded (truncated or corrupt)",
        ) from e
    if frames.shape[0] != len(indices) or frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoDecodeError(name, f"{len(indices)} RGB frames", f"an array of shape {frames.shape}")
    return VideoClip(
        frames=frames,
        indices=indices,
        timestamps=[i / native_fps for i in indices],
        native_fps=native_fps,
        duration=total / native_fps,
        total_frames=total,
    )
