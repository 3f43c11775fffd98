"""AnyRes tiling: ours against transformers' LlavaOnevisionImageProcessorPil, same images, same config.

Both run single-threaded in this process, on the same decoded PIL images (decoding is not timed),
interleaved per image so that machine noise hits both. Output equality is asserted first.

A second table measures the opt-in ``AnyResConfig(jpeg_draft=True)`` on JPEG files, decoding included
(that is where it saves): its speed against our exact path and how far its tiles are from the exact
ones. It is not identical, so it is not part of the ratio.

    python benchmarks/anyres.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks._common import final_line, machine, median_seconds  # noqa: E402
from components.anyres import AnyResConfig, base_tile, grid_pinpoints, tile_image  # noqa: E402

# (height, width): COCO-like photos, phone photos, video stills, documents, small crops.
SIZES = [(480, 640), (640, 480), (375, 500), (427, 640), (768, 1024), (720, 1280), (1080, 1920),
         (2200, 1700), (336, 336), (224, 224), (1024, 1024), (600, 400)]  # fmt: skip # a table of image sizes


def photo(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Smooth random content (a low-resolution field upsampled), like a photo to the resampler."""
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


# (height, width) of JPEG photos: a 12 MP phone photo, a 48 MP one, a 1080p still
DRAFT_SIZES = [(3024, 4032), (6000, 8000), (1080, 1920)]


def draft_table(rng: np.random.Generator, repeats: int) -> None:
    """jpeg_draft against our exact path, Image.open + tiling timed together, for an AnyRes image and for
    a multi-image item's base tile; deviation in normalized units (one uint8 step is about 0.015)."""
    import io

    exact, draft = AnyResConfig(), AnyResConfig(jpeg_draft=True)
    print(f"\njpeg_draft (opt-in, not identical): JPEG quality 90, decoding included, medians of {repeats}")
    print(
        f"{'image (h x w)':>14s} {'item':>10s} {'decoded at':>11s} {'exact ms':>9s} {'draft ms':>9s} "
        f"{'speed-up':>8s} {'mean dev':>8s} {'max dev':>8s}"
    )
    for h, w in DRAFT_SIZES:
        buffer = io.BytesIO()
        photo(rng, h, w).save(buffer, "JPEG", quality=90)
        data = buffer.getvalue()
        for item, fn in (
            ("anyres", lambda im, c: tile_image(im, c).pixel_values),
            ("multi-image", base_tile),
        ):
            probe = Image.open(io.BytesIO(data))
            out_draft = fn(probe, draft)
            out_exact = fn(Image.open(io.BytesIO(data)), exact)
            t_exact = median_seconds(
                lambda fn=fn, data=data: fn(Image.open(io.BytesIO(data)), exact), repeats
            )
            t_draft = median_seconds(
                lambda fn=fn, data=data: fn(Image.open(io.BytesIO(data)), draft), repeats
            )
            dev = np.abs(out_draft - out_exact)
            print(
                f"{h:>6d} x {w:<6d} {item:>10s} {probe.height:>5d}x{probe.width:<5d} {t_exact * 1e3:9.1f} "
                f"{t_draft * 1e3:9.1f} {t_exact / t_draft:7.2f}x {dev.mean():8.4f} {dev.max():8.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (under 45 s)")
    args = parser.parse_args()
    from transformers import LlavaOnevisionImageProcessorPil

    config = AnyResConfig()
    hf = LlavaOnevisionImageProcessorPil(image_grid_pinpoints=[list(p) for p in grid_pinpoints(config)])
    rng = np.random.default_rng(0)
    images = [photo(rng, h, w) for h, w in SIZES]
    for image in images:  # identical output first
        ref = hf(image, return_tensors="np")["pixel_values"][0]
        ours = tile_image(image, config).pixel_values
        assert ours.shape == ref.shape and float(np.abs(ours - ref).max()) <= 1e-5

    repeats = 3 if args.quick else 9
    print(
        f"machine: {machine()}; single thread; tile {config.tile_size}, up to "
        f"{config.max_grid}x{config.max_grid}"
    )
    print(f"{'image (h x w)':>14s} {'tiles':>5s} {'hf ms':>8s} {'ours ms':>8s} {'ratio':>6s}")
    hf_total = ours_total = 0.0
    for (h, w), image in zip(SIZES, images, strict=True):
        t_hf = median_seconds(lambda image=image: hf(image, return_tensors="np"), repeats)
        t_ours = median_seconds(lambda image=image: tile_image(image, config), repeats)
        hf_total += t_hf
        ours_total += t_ours
        tiles = len(tile_image(image, config).pixel_values)
        print(f"{h:>6d} x {w:<6d} {tiles:5d} {t_hf * 1e3:8.1f} {t_ours * 1e3:8.1f} {t_hf / t_ours:6.2f}")
    n = len(images)
    print(f"throughput: hf {n / hf_total:.1f} img/s, ours {n / ours_total:.1f} img/s (medians of {repeats})")
    draft_table(rng, 1 if args.quick else 5)
    print(final_line("anyres", hf_total / ours_total, "5x"))


if __name__ == "__main__":
    main()
