"""The demo world: deterministic, every kind of sample, every AnyRes grid, real H.264, valid records."""

import hashlib
import json

import pyarrow.parquet as pq
from PIL import Image

from components.anyres import AnyResConfig, grid_pinpoints, select_best_resolution
from components.conversation import parse_sample
from components.demo_data import DemoConfig, make_demo_data
from components.video import read_frames


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".mp4"):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_every_record_validates_and_media_exist(demo_dir):
    root, manifests = demo_dir
    kinds = {}
    for split, path in manifests.items():
        if not path.endswith(".jsonl"):
            continue
        for line in open(path):
            sample = parse_sample(json.loads(line), source=split)
            kinds.setdefault(split, set()).add(sample.modality)
            for p in sample.images:
                assert (root / p).exists()
            if sample.video:
                clip = read_frames(root / sample.video, fps=1.0)
                assert clip.frames.shape[1:] == (64, 64, 3) and clip.duration == 2.0
    assert kinds["single_image"] == {"image"} and kinds["multi_image"] == {"multi_image"}
    assert kinds["video"] == {"video"} and kinds["text"] == {"text"}
    assert kinds["eval"] == {"image", "multi_image", "video", "text"}


def test_deterministic(tmp_path):
    cfg = DemoConfig(captions=4, details=2, single_image=6, multi_image=2, videos=1, text=2, eval_per_kind=2)
    make_demo_data(str(tmp_path / "a"), cfg)
    make_demo_data(str(tmp_path / "b"), cfg)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_image_sizes_cover_every_grid(tmp_path):
    cfg = DemoConfig(
        captions=400, details=0, single_image=0, multi_image=0, videos=0, text=0, eval_per_kind=0
    )
    manifests = make_demo_data(str(tmp_path), cfg)
    anyres = AnyResConfig(tile_size=cfg.tile_size)
    grids = set()
    for line in open(manifests["stage1_captions"]):
        with Image.open(tmp_path / json.loads(line)["image"]) as im:
            h, w = select_best_resolution((im.height, im.width), grid_pinpoints(anyres))
        grids.add((h // anyres.tile_size, w // anyres.tile_size))
    assert len(grids) == 36


def test_parquet_variant_embeds_image_bytes(demo_dir):
    root, manifests = demo_dir
    table = pq.read_table(manifests["single_image_parquet"])
    assert set(table.column_names) == {"id", "image", "conversations", "data_source"}
    first = table.slice(0, 1).to_pylist()[0]
    assert first["image"]["bytes"] == (root / first["image"]["path"]).read_bytes()
    assert table.num_rows == sum(1 for _ in open(manifests["single_image"]))


def _nearest_color(frame) -> str:
    """The palette colour of the frame's most saturated pixels (the shape), after H.264."""
    import numpy as np

    from components.demo_data import COLORS

    pixels = frame.reshape(-1, 3).astype(int)
    shape = pixels[(pixels.max(1) - pixels.min(1)) > 80]
    mean = shape.mean(0)
    return min(COLORS, key=lambda c: float(np.sum((np.array(COLORS[c]) - mean) ** 2)))


def test_video_answers_are_the_decoded_first_and_last_frames(demo_dir):
    """Each video record's answer is the colour of its decoded first frame ("at the start") or last frame
    ("at the end"), and ``probe_answer`` is the other one: the answer once the frames are reversed. The
    two differ in every clip, so only a model that reads the frames in order gets both right.
    Guards: each record's answer follows its question; fails with every record given (first, last)."""
    root, manifests = demo_dir
    records = [json.loads(line) for split in ("video", "eval") for line in open(manifests[split])]
    videos = [r for r in records if "video" in r]
    assert {r["task"] for r in videos} == {"start_color", "end_color"}
    for r in videos:
        frames = read_frames(root / r["video"], fps=8.0, max_frames=16).frames
        first, last = _nearest_color(frames[0]), _nearest_color(frames[-1])
        assert first != last
        question = r["conversations"][0]["value"]
        expected = (first, last) if "at the start" in question else (last, first)
        assert (r["answer"], r["probe_answer"]) == expected, r["id"]


def test_a_stale_demo_world_is_refused(tmp_path):
    """A demo world made by another version of the generator (an old demo_out after an update) or for
    another tile size is refused with both versions named, not trained on with the old tasks.
    Guards: check_demo_world; fails with its comparison switched off."""
    import pytest

    from components.demo_data import WORLD_VERSION
    from pipelines.recipes import ensure_demo_data

    cfg = DemoConfig(
        captions=2, details=0, single_image=2, multi_image=0, multi_view=0, videos=0, text=1, eval_per_kind=1
    )
    make_demo_data(str(tmp_path), cfg)
    assert ensure_demo_data(str(tmp_path), tile_size=56) == str(tmp_path)
    with pytest.raises(ValueError, match="at tile size 112, found version .* at tile size 56"):
        ensure_demo_data(str(tmp_path), tile_size=112)
    world = json.loads((tmp_path / "world.json").read_text())
    (tmp_path / "world.json").write_text(json.dumps({**world, "version": WORLD_VERSION - 1}))
    with pytest.raises(
        ValueError, match=f"expected world version {WORLD_VERSION} .* found version {WORLD_VERSION - 1}"
    ):
        ensure_demo_data(str(tmp_path), tile_size=56)
    (tmp_path / "world.json").unlink()
    with pytest.raises(ValueError, match="found version none"):
        ensure_demo_data(str(tmp_path), tile_size=56)
