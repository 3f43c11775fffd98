"""The deterministic demo world: coloured shapes, with answers a tiny model can learn, each needing its
modality's plumbing.

Every kind of LLaVA data, small: Stage-1 captions, Stage-1.5 detailed descriptions, single-image QA
with LLaVA-1.5's response-format prompts, multi-image QA whose answer depends on which image is which,
multi-view scenes whose question needs more than one view, video QA on real H.264 clips whose answer
depends on the order of the frames, text-only facts, and a held-out eval split. Multi-image and video
records carry ``probe_answer``: the answer once the images (or frames) are given in reverse order, so
that evaluation can tell a model that uses the order from one that guesses. Image sizes are spread over
every AnyRes grid of the tile size. The same seed gives the same bytes.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from dataclasses import asdict, dataclass

import imageio_ffmpeg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from components import storage
from components.conversation import TEMPLATES

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
GRAY = (128, 128, 128)
SHAPES = ("circle", "square", "triangle")
WORLD_VERSION = 2
"""Bumped when the same DemoConfig makes different records (2: video asks the colour at the start or the
end; 1 asked the direction of motion). ``world.json`` records it beside the data."""
SHORT = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
CAPTION_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Give a short and clear explanation of the subsequent image.",
    "Summarize the visual content of the image.",
)
DETAIL_PROMPTS = (
    "Describe the following image in detail.",
    "What do you see in this image? Explain in detail.",
)
FACTS = (
    ("What color do you get by mixing red and blue?", "purple"),
    ("What color do you get by mixing red and yellow?", "orange"),
    ("What color do you get by mixing blue and yellow?", "green"),
    ("What color do you get by mixing red and white?", "pink"),
    ("What color do you get by mixing black and white?", "gray"),
    ("What is the opposite of up?", "down"),
    ("What is the opposite of down?", "up"),
    ("What is the opposite of left?", "right"),
    ("What is the opposite of right?", "left"),
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color is fresh snow?", "white"),
)
"""Text-only facts: the LLM learns them from the text rows; the eval split asks the same facts."""


@dataclass(frozen=True)
class DemoConfig:
    """How much of each kind to make."""

    tile_size: int = 56
    """Image sizes are spread over the AnyRes grids of this tile size (1x1 .. 6x6)."""
    captions: int = 96
    details: int = 48
    single_image: int = 240
    multi_image: int = 144
    multi_view: int = 72
    videos: int = 144
    text: int = 48
    images_per_sample: int = 3
    """Images of a multi-image sample (Image 1..N) and views of a multi-view scene (at most 3)."""
    eval_per_kind: int = 24
    video_frames: int = 16
    video_fps: int = 8
    video_size: int = 64
    seed: int = 0


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def _image_size(rng: random.Random, tile: int) -> tuple[int, int]:
    """(height, width) near a random rows x cols grid of ``tile`` pixels, so every grid shows up."""
    rows, cols = rng.randint(1, 6), rng.randint(1, 6)
    return max(8, int(rows * tile * rng.uniform(0.7, 1.0))), max(8, int(cols * tile * rng.uniform(0.7, 1.0)))


def shape_image(
    rng: random.Random, tile: int, color: str, shape: str, count: int = 1, *, square: bool = False
) -> Image.Image:
    """A light background with ``count`` shapes; sized over every AnyRes grid, or one tile when ``square``
    (an item of a multi-image sample is seen at its base tile only)."""
    height, width = (tile, tile) if square else _image_size(rng, tile)
    image = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    side = max(4, int(min(height, width) * (0.7 if count == 1 else 0.35)))
    for _ in range(count):
        x = rng.randint(0, max(0, width - side))
        y = rng.randint(0, max(0, height - side))
        _draw_shape(draw, shape, (x, y, x + side, y + side), COLORS.get(color, GRAY))
    return image


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def _options(rng: random.Random, answer: str, pool: tuple[str, ...]) -> tuple[str, str]:
    """A multiple-choice block with the answer among up to four options, and the answer's letter."""
    others = [p for p in pool if p != answer]
    rng.shuffle(others)
    choices = [answer] + others[:3]
    rng.shuffle(choices)
    letters = "ABCD"
    text = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(choices))
    return text, letters[choices.index(answer)]


def write_video(path: str, frames: np.ndarray, fps: int) -> None:
    """H.264 mp4 from uint8 [F, H, W, 3] with imageio-ffmpeg's ffmpeg binary."""
    _, height, width, _ = frames.shape
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast", path,
    ]  # fmt: skip # ffmpeg's options, one flag and its value per pair
    subprocess.run(cmd, input=frames.tobytes(), check=True, capture_output=True)


class _Writer:
    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
        os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
        self.files: dict[str, list[dict]] = {}

    def image(self, name: str, image: Image.Image) -> str:
        rel = f"images/{name}.png"
        image.save(os.path.join(self.out_dir, rel))
        return rel

    def add(self, split: str, record: dict) -> None:
        self.files.setdefault(split, []).append(record)


def _single_image_records(rng: random.Random, w: _Writer, split: str, n: int, cfg: DemoConfig) -> None:
    for i in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        rid = f"{split}-si-{i:04d}"
        path = w.image(rid, shape_image(rng, cfg.tile_size, color, shape))
        if i % 3 != 2:  # two colour questions for each shape question
            turn = (f"<image>\nWhat color is the {shape}?\n{SHORT}", color)
            task = "color"
        else:
            options, letter = _options(rng, shape, SHAPES)
            turn = (f"<image>\nWhich shape is shown?\n{options}\n{MULTIPLE_CHOICE}", letter)
            task = "shape_mc"
        w.add(
            split, {"id": rid, "image": path, "conversations": _turns(turn), "task": task, "answer": turn[1]}
        )


def _ordinal_images(n: int, word: str = "Image") -> str:
    return "".join(f"{word} {k + 1}: <image>\n" for k in range(n))


def _multi_image_records(rng: random.Random, w: _Writer, split: str, n: int, cfg: DemoConfig) -> None:
    """The answer depends on which image is which: the colour of the shape in the first image, or in the
    last. Reversing the images changes the answer to ``probe_answer``."""
    count = cfg.images_per_sample
    for i in range(n):
        rid = f"{split}-mi-{i:04d}"
        colors = rng.sample(list(COLORS), count)
        shapes = [rng.choice(SHAPES) for _ in range(count)]
        paths = [
            w.image(f"{rid}-{k}", shape_image(rng, cfg.tile_size, c, s, square=True))
            for k, (c, s) in enumerate(zip(colors, shapes, strict=True))
        ]
        if i % 2 == 0:
            question, answer, probe, task = (
                "What color is the shape in the last image?",
                colors[-1],
                colors[0],
                "last_color",
            )
        else:
            question, answer, probe, task = (
                "What color is the shape in the first image?",
                colors[0],
                colors[-1],
                "first_color",
            )
        turn = (f"{_ordinal_images(count)}{question}\n{SHORT}", answer)
        w.add(
            split,
            {
                "id": rid,
                "image": paths,
                "conversations": _turns(turn),
                "task": task,
                "answer": answer,
                "probe_answer": probe,
            },
        )


def _multi_view_records(rng: random.Random, w: _Writer, split: str, n: int, cfg: DemoConfig) -> None:
    """Two views of one scene (Interleave's multi-view data), each showing one of its two shapes: naming
    the scene's colours needs both views (answered in alphabetical order, whatever the views' order)."""
    for i in range(n):
        rid = f"{split}-mv-{i:04d}"
        colors = rng.sample(list(COLORS), 2)
        paths = [
            w.image(f"{rid}-{k}", shape_image(rng, cfg.tile_size, c, rng.choice(SHAPES), square=True))
            for k, c in enumerate(colors)
        ]
        answer = " and ".join(sorted(colors))
        turn = (
            f"{_ordinal_images(2, 'View')}These are two views of one scene. Which two colors does it "
            f"have?\n{SHORT}",
            answer,
        )
        w.add(
            split,
            {
                "id": rid,
                "image": paths,
                "conversations": _turns(turn),
                "task": "multiview",
                "answer": answer,
                "probe_answer": answer,
            },
        )


def color_change_frames(rng: random.Random, first: str, last: str, shape: str, cfg: DemoConfig) -> np.ndarray:
    """A still shape that is ``first`` for the first half of the clip and ``last`` for the second."""
    size, n = cfg.video_size, cfg.video_frames
    side = size // 2
    x, y = rng.randint(2, size - side - 2), rng.randint(2, size - side - 2)
    frames = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        image = Image.new("RGB", (size, size), (245, 245, 245))
        _draw_shape(
            ImageDraw.Draw(image), shape, (x, y, x + side, y + side), COLORS[first if i < n // 2 else last]
        )
        frames[i] = np.asarray(image)
    return frames


def _video_records(rng: random.Random, w: _Writer, split: str, n: int, cfg: DemoConfig) -> None:
    """The answer depends on the order of the frames: the colour at the start or at the end of a clip whose
    shape changes colour halfway. Reversed frames give ``probe_answer`` (the other end's colour)."""
    for i in range(n):
        rid = f"{split}-vid-{i:04d}"
        shape = rng.choice(SHAPES)
        rel = f"videos/{rid}.mp4"
        first, last = rng.sample(list(COLORS), 2)
        frames = color_change_frames(rng, first, last, shape, cfg)
        end = "end" if i % 2 == 0 else "start"
        answer, probe = (last, first) if end == "end" else (first, last)
        question, task = f"What color is the {shape} at the {end}?", f"{end}_color"
        write_video(os.path.join(w.out_dir, rel), frames, cfg.video_fps)
        turn = (f"<video>\n{question}\n{SHORT}", answer)
        w.add(
            split,
            {
                "id": rid,
                "video": rel,
                "conversations": _turns(turn),
                "task": task,
                "answer": answer,
                "probe_answer": probe,
            },
        )


def _text_records(rng: random.Random, w: _Writer, split: str, n: int) -> None:
    for i in range(n):
        question, answer = FACTS[i % len(FACTS)] if split == "eval" else rng.choice(FACTS)
        turn = (f"{question}\n{SHORT}", answer)
        w.add(
            split,
            {"id": f"{split}-txt-{i:04d}", "conversations": _turns(turn), "task": "text", "answer": answer},
        )


def make_demo_data(out_dir: str, cfg: DemoConfig | None = None) -> dict[str, str]:
    """Write the demo world under ``out_dir``; returns {split name: manifest path}."""
    cfg = cfg or DemoConfig()
    rng = random.Random(cfg.seed)
    w = _Writer(out_dir)
    for i in range(cfg.captions):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        rid = f"cap-{i:04d}"
        path = w.image(rid, shape_image(rng, cfg.tile_size, color, shape))
        turn = (
            rng.choice(CAPTION_PROMPTS) + "\n<image>" if i % 2 else "<image>\n" + rng.choice(CAPTION_PROMPTS),
            f"A {color} {shape} on a light gray background.",
        )
        w.add("stage1_captions", {"id": rid, "image": path, "conversations": _turns(turn)})
    for i in range(cfg.details):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        rid = f"det-{i:04d}"
        image = shape_image(rng, cfg.tile_size, color, shape)
        path = w.image(rid, image)
        orient = "wide" if image.width > image.height else "tall" if image.height > image.width else "square"
        answer = (
            f"The image is {orient}, {image.width} pixels wide and {image.height} pixels tall. "
            f"It shows one large {color} {shape} on a plain light gray background. There is nothing else in "
            "it."
        )
        w.add(
            "stage1_5_detail",
            {
                "id": rid,
                "image": path,
                "conversations": _turns((f"<image>\n{rng.choice(DETAIL_PROMPTS)}", answer)),
            },
        )
    _single_image_records(rng, w, "single_image", cfg.single_image, cfg)
    _multi_image_records(rng, w, "multi_image", cfg.multi_image, cfg)
    _multi_view_records(rng, w, "multi_view", cfg.multi_view, cfg)
    _video_records(rng, w, "video", cfg.videos, cfg)
    _text_records(rng, w, "text", cfg.text)
    eval_rng = random.Random(cfg.seed + 1_000_003)
    _single_image_records(eval_rng, w, "eval", cfg.eval_per_kind * 2, cfg)
    _multi_image_records(eval_rng, w, "eval", cfg.eval_per_kind * 2, cfg)
    _multi_view_records(eval_rng, w, "eval", max(4, cfg.eval_per_kind), cfg)
    _video_records(eval_rng, w, "eval", cfg.eval_per_kind * 2, cfg)
    _text_records(eval_rng, w, "eval", max(len(FACTS), cfg.eval_per_kind))

    manifests = {}
    with open(os.path.join(out_dir, "world.json"), "w") as f:
        json.dump({"version": WORLD_VERSION, "config": asdict(cfg)}, f)
    for split, records in w.files.items():
        path = os.path.join(out_dir, f"{split}.jsonl")
        with open(path, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        manifests[split] = path
    if w.files.get("single_image"):
        manifests["single_image_parquet"] = write_parquet(
            os.path.join(out_dir, "single_image.parquet"), w.files["single_image"], out_dir
        )
    return manifests


def write_parquet(path: str, records: list[dict], media_root: str) -> str:
    """The LLaVA-OneVision data form: id, image {bytes, path}, conversations, data_source."""
    rows = []
    for r in records:
        with open(os.path.join(media_root, r["image"]), "rb") as f:
            data = f.read()
        rows.append(
            {
                "id": r["id"],
                "image": {"bytes": data, "path": r["image"]},
                "conversations": r["conversations"],
                "data_source": "demo_single_image",
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def check_demo_world(out_dir: str, tile_size: int) -> None:
    """Raise when ``out_dir`` holds a demo world made by another version of this generator or for another
    tile size (a stale ``demo_out`` after an update would train on old tasks and be scored on new ones).
    Its amounts may differ: the tests make small worlds."""
    path = storage.join(out_dir, "world.json")
    found = json.loads(storage.read_text(path)) if storage.exists(path) else {}
    version, tile = found.get("version", "none (no world.json)"), found.get("config", {}).get("tile_size")
    if (version, tile) != (WORLD_VERSION, tile_size):
        raise ValueError(
            f"demo data {out_dir}: expected world version {WORLD_VERSION} at tile size {tile_size}, found "
            f"version {version} at tile size {tile}; remove the directory (make clean) to make it again"
        )


def tokenizer_corpus() -> list[str]:
    """Deterministic text for the tiny tokenizer: the templates and the whole demo vocabulary."""
    lines = [t.system for t in TEMPLATES.values()]
    lines += [SHORT, MULTIPLE_CHOICE, *CAPTION_PROMPTS, *DETAIL_PROMPTS]
    lines += ["USER: ASSISTANT: Human: Assistant: ### system user assistant"]
    lines += [f"{q} {a}" for q, a in FACTS]
    for color in list(COLORS) + ["pink", "gray", "white", "black"]:
        for shape in SHAPES:
            lines.append(
                f"A {color} {shape} on a light gray background. What color is the {shape}? What color is the "
                f"{shape} at the start?"
                f" What color is the {shape} at the end?"
            )
    lines += [
        "Image 1: Image 2: Image 3: View 1: View 2: What color is the shape in the last image?",
        "What color is the shape in the first image? These are two views of one scene. Which two colors does "
        "it have?",
        "blue and green and orange and purple and red and yellow",
        "Which shape is shown? Which shape appears in the video? A. B. C. D.",
        "The image is wide, tall, square, pixels wide and pixels tall. It shows one large on a plain light "
        "gray "
        "background. There is nothing else in it. 0 1 2 3 4 5 6 7 8 9",
    ]
    return lines * 4
