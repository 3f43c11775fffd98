import os
import subprocess

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from components.demo_data import DemoConfig, make_demo_data

    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(captions=8, details=4, single_image=16, multi_image=4, videos=4, text=4, eval_per_kind=4)
    manifests = make_demo_data(str(out), cfg)
    return out, manifests


@pytest.fixture(scope="session")
def tiny_model():
    from components.model import ModelSpec, build_model

    spec = ModelSpec()
    model, tokenizer = build_model(spec)
    return spec, model, tokenizer


@pytest.fixture(scope="session")
def h264(tmp_path_factory):
    """A real H.264 clip: 3 s at 10 fps, 64x48, made with imageio-ffmpeg's ffmpeg."""
    import imageio_ffmpeg

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi",
         "-i", "testsrc=size=64x48:rate=10:duration=3", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )  # fmt: skip
    return path


def random_image(rng: np.random.Generator, height: int, width: int, mode: str = "RGB"):
    from PIL import Image

    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
