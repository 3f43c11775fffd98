"""Reading a sample's media safely: inside its root, regular files only, within budgets, before a deadline.

    uri = resolve_media("images/a.png", media_root, policy, sample_id="s1", field="image[0]")
    data = read_media(uri, policy.budget.max_image_bytes, sample_id="s1", field="image[0]")

A manifest is data from elsewhere. Every path it names must resolve (after normalisation and symlink
resolution) inside the manifest's media root or one of the policy's allowed roots or buckets; anything
else is refused as ``outside_root`` before it is opened, with the same message whether it exists or not.
Only regular files are read (no FIFOs or devices), and no more than the size cap. Messages follow the
project's grammar and never carry a host path beyond what the manifest itself wrote.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import signal
import stat
import threading
from dataclasses import dataclass, fields

from components import storage
from components.conversation import short_repr
from components.errors import Mismatch, sample_field


class MediaError(Mismatch):
    """A sample's media that cannot be used: ``kind`` is the rejects table's error type."""

    def __init__(self, kind: str, sample_id: str, field_name: str, expected: str, found: str):
        super().__init__(sample_field(sample_id, field_name), expected, found)
        self.kind, self.sample_id, self.field = kind, sample_id, field_name


@dataclass(frozen=True)
class MediaBudget:
    """What one sample's or one request's media may cost: training (MediaPolicy) and serving (Limits) each
    hold one, with their own defaults."""

    max_image_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    """Per image, read from its header before it is decoded (OneVision's 6x6 grid at 384 px is 5.3 MP)."""
    max_images: int = 12
    """Images per sample (OneVision's multi-image data holds at most 12)."""
    max_video_bytes: int = 1024 * 1024 * 1024
    max_video_pixels: int = 32 * 1920 * 1080
    """Sampled frames x pixels per frame (32 frames of 1080p), read from the container before frames are
    decoded."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"media.{f.name}: expected a positive int, found {value!r}")


@dataclass(frozen=True)
class MediaPolicy:
    """Where a training sample's media may be read from and what they may cost; the defaults suit the full
    profiles."""

    allowed_roots: tuple[str, ...] = ()
    """Directories or s3://bucket/prefix URIs samples may read besides their manifest's media root."""
    budget: MediaBudget = MediaBudget()
    decode_deadline_s: float = 120.0
    """The most one sample's decoding may take (enforced where the stage runs on its process's main
    thread)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_roots", tuple(self.allowed_roots))
        if isinstance(self.budget, dict):
            object.__setattr__(self, "budget", MediaBudget(**self.budget))


def _inside(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root + "/")


def resolve_media(path: str, media_root: str, policy: MediaPolicy, *, sample_id: str, field: str) -> str:
    """The URI a manifest's media path names, if it lies inside the media root or an allowed root."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise MediaError("invalid_path", sample_id, field, "a file path", "one with a NUL byte or none")
    outside = MediaError(
        "outside_root",
        sample_id,
        field,
        "a path inside the media root or an allowed root",
        f"{short_repr(path, 80)} outside them",
    )
    if storage.is_s3(path) or storage.is_s3(media_root):
        uri = path if storage.is_s3(path) else storage.join(media_root, path)
        if not storage.is_s3(uri):
            raise outside
        bucket_path = posixpath.normpath(uri[len("s3://") :])
        roots = [r for r in (media_root, *policy.allowed_roots) if storage.is_s3(r)]
        if not any(_inside(bucket_path, posixpath.normpath(r[len("s3://") :])) for r in roots):
            raise outside
        return "s3://" + bucket_path
    local = path[len("file://") :] if path.startswith("file://") else path
    root = media_root[len("file://") :] if media_root.startswith("file://") else media_root
    candidate = local if os.path.isabs(local) else os.path.join(root, local)
    real = os.path.realpath(candidate)  # resolves "..", and symlinks wherever they point; opens nothing
    roots = [os.path.realpath(r) for r in (root, *policy.allowed_roots) if not storage.is_s3(r)]
    if not any(_inside(real, r) for r in roots):
        raise outside
    return real


def read_media(uri: str, max_bytes: int, *, sample_id: str, field: str, shown: str) -> bytes:
    """A regular file's bytes, at most ``max_bytes`` (``shown``: the path as the manifest wrote it)."""

    def missing() -> MediaError:
        return MediaError(
            "missing_media", sample_id, field, "a readable file", f"none at {short_repr(shown, 80)}"
        )

    if storage.is_s3(uri):
        size = storage.file_size(uri)
        if size is None:
            raise missing()
    else:
        try:
            info = os.stat(uri)  # a FIFO or a device is stat'ed, never opened
        except OSError as e:
            raise missing() from e
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(
                "not_a_file",
                sample_id,
                field,
                "a regular file",
                f"something else at {short_repr(shown, 80)}",
            )
        size = info.st_size
    if size > max_bytes:
        raise MediaError("too_large", sample_id, field, f"at most {max_bytes} bytes", str(size))
    try:
        data = storage.read_bytes(uri)
    except (storage.StorageError, OSError) as e:
        raise missing() from e
    if len(data) > max_bytes:  # it grew while we looked
        raise MediaError("too_large", sample_id, field, f"at most {max_bytes} bytes", "more")
    return data


class DeadlineExceeded(MediaError):
    def __init__(self, seconds: float, sample_id: str):
        super().__init__("timeout", sample_id, "media", f"decoding within {seconds}s", "it slower")


@contextlib.contextmanager
def deadline(seconds: float, sample_id: str):
    """Raise DeadlineExceeded in this block after ``seconds`` (a real-time alarm; only on the main thread,
    where signals are delivered: elsewhere the block runs unbounded)."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def expire(signum, frame):
        raise DeadlineExceeded(seconds, sample_id)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
