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
