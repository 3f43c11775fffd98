"""Frame sampling with LLaVA-NeXT semantics, and decord decoding of real H.264 clips."""

import io
import time

import numpy as np
import pytest

from components.video import VideoDecodeError, read_frames, sample_frame_indices


def test_sampling_steps_by_native_fps():
    assert sample_frame_indices(100, 30.0, fps=1.0) == [0, 30, 60, 90]
    assert sample_frame_indices(10, 10.0, fps=2.0) == [0, 5]
    assert sample_frame_indices(7, 25.0, fps=100.0) == list(range(7))  # step never below 1


def test_sampling_switches_to_uniform_over_max_frames():
    idx = sample_frame_indices(3000, 30.0, fps=1.0, max_frames=32)
    assert len(idx) == 32 and idx[0] == 0 and idx[-1] == 2999
    assert idx == np.linspace(0, 2999, 32, dtype=int).tolist()


def test_forced_uniform():
    assert sample_frame_indices(100, 30.0, fps=1.0, max_frames=5, force_uniform=True) == [0, 24, 49, 74, 99]
    assert sample_frame_indices(3, 30.0, max_frames=8, force_uniform=True) == [0, 1, 2]


def test_sampling_rejects_nonsense():
    with pytest.raises(ValueError, match="total_frames"):
        sample_frame_indices(0, 30.0)
    with pytest.raises(ValueError, match="fps"):
        sample_frame_indices(10, 0.0)


def test_reads_only_sampled_frames_from_path_bytes_and_file(h264):
    clip = read_frames(h264, fps=1.0)
    assert clip.indices == [0, 10, 20]
    assert clip.frames.shape == (3, 48, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.timestamps == [0.0, 1.0, 2.0]
    assert clip.native_fps == pytest.approx(10.0) and clip.duration == pytest.approx(3.0)
    data = h264.read_bytes()
    assert np.array_equal(read_frames(data, fps=1.0).frames, clip.frames)
    assert np.array_equal(read_frames(io.BytesIO(data), fps=1.0).frames, clip.frames)


def test_frames_are_the_right_frames(h264):
    every = read_frames(h264, fps=10.0, max_frames=64)
    assert len(every.indices) == 30
    sampled = read_frames(h264, fps=1.0)
    for i, idx in enumerate(sampled.indices):
        assert np.abs(sampled.frames[i].astype(int) - every.frames[idx].astype(int)).mean() < 1.0


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda d: d[: len(d) // 2], "decoder"),
        (lambda d: b"", "empty"),
        (lambda d: d[:32] + b"\x00" * 4000, "decoder"),
        (lambda d: b"\x89PNG\r\n\x1a\n" + b"0" * 100, "video container"),
        (lambda d: b"not a video at all", "video container"),
    ],
    ids=["truncated", "zero-byte", "garbage", "png", "text"],
)
def test_corrupt_inputs_raise_a_typed_error_quickly(h264, make, reason):
    start = time.monotonic()
    with pytest.raises(VideoDecodeError, match=reason) as err:
        read_frames(make(h264.read_bytes()))
    assert time.monotonic() - start < 5.0
    assert err.value.source == "<bytes>"


def test_missing_file_names_the_source(tmp_path):
    with pytest.raises(VideoDecodeError, match="missing.mp4"):
        read_frames(tmp_path / "missing.mp4")
