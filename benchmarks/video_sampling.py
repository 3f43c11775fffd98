"""Video: 32 LLaVA-sampled frames per clip (OneVision's force_sample: 32 uniform frames), ours (sample
indices, decode only those) against
``ray.data.read_videos`` (decodes every frame) followed by the same sampling, in one run.

Real H.264 clips made with imageio-ffmpeg's ffmpeg: 720p 20 s and 1080p 60 s at 30 fps, each with
x264's default GOP (keyint 250) and with a short one (keyint 15). Frames are checked equal first.
"Passes" is our time over one plain sequential decode of the whole clip (decord, every frame):
the target is at most about one pass.

    python benchmarks/video_sampling.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks._common import final_line, machine  # noqa: E402
from components.video import read_frames, sample_frame_indices  # noqa: E402

CACHE = os.path.expanduser("~/.cache/llava-ray/bench-videos")


def make_clip(height: int, width: int, seconds: int, gop: int | None) -> str:
    import imageio_ffmpeg

    name = f"{height}p_{seconds}s_{'gop' + str(gop) if gop else 'default'}.mp4"
    path = os.path.join(CACHE, name)
    if not os.path.exists(path):
        os.makedirs(CACHE, exist_ok=True)
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi",
               "-i", f"testsrc2=size={width}x{height}:rate=30:duration={seconds}",
               "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]  # fmt: skip # flag, value
        if gop:
            cmd += ["-g", str(gop), "-keyint_min", str(gop)]
        subprocess.run([*cmd, path + ".tmp.mp4"], check=True)
        os.replace(path + ".tmp.mp4", path)
    return path


def sequential_pass(path: str) -> float:
    import decord

    start = time.perf_counter()
    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    for _ in range(len(reader)):
        reader.next()
    return time.perf_counter() - start


def baseline(ray, path: str, indices: list[int]) -> tuple[float, np.ndarray]:
    wanted = set(indices)
    start = time.perf_counter()
    ds = ray.data.read_videos(path).filter(lambda row: row["frame_index"] in wanted)
    rows = sorted(ds.take_all(), key=lambda r: r["frame_index"])
    elapsed = time.perf_counter() - start
    return elapsed, np.stack([r["frame"] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="720p 20 s and a 1080p 10 s clip (under 45 s)")
    args = parser.parse_args()
    import ray

    clips = [(720, 1280, 20, None), (720, 1280, 20, 15)]
    clips += [(1080, 1920, 10, 15)] if args.quick else [(1080, 1920, 60, None), (1080, 1920, 60, 15)]
    paths = [make_clip(*c) for c in clips]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(
        f"machine: {machine()}; ours single-threaded decord; baseline ray.data.read_videos on a local Ray (2 "
        "CPUs)"
    )
    print(
        f"{'clip':28s} {'frames':>6s} {'ours s':>7s} {'ray s':>7s} {'ratio':>6s} {'1 pass s':>8s} "
        f"{'passes':>6s}"
    )
    ours_total = base_total = 0.0
    for (h, _, secs, gop), path in zip(clips, paths, strict=True):
        start = time.perf_counter()
        clip = read_frames(path, fps=1.0, max_frames=32, force_uniform=True)
        ours = time.perf_counter() - start
        indices = sample_frame_indices(clip.total_frames, clip.native_fps, max_frames=32, force_uniform=True)
        base, frames = baseline(ray, path, indices)
        assert frames.shape == clip.frames.shape, (frames.shape, clip.frames.shape)
        assert float(np.abs(frames.astype(np.int16) - clip.frames).mean()) < 1.0
        one_pass = sequential_pass(path)
        ours_total += ours
        base_total += base
        name = f"{h}p {secs}s {'GOP ' + str(gop) if gop else 'default GOP'}"
        print(
            f"{name:28s} {len(indices):6d} {ours:7.2f} {base:7.2f} {base / ours:6.1f} {one_pass:8.2f} "
            f"{ours / one_pass:6.2f}"
        )
    print(final_line("video_sampling", base_total / ours_total, "3x"))


if __name__ == "__main__":
    main()
