"""Each preprocessing stage called directly (no Ray), then the same stage inside map_batches."""

import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from components.anyres import normalize_tiles
from components.conversation import parse_sample
from components.manifest import read_records
from components.model import build_tokenizer
from components.processor import LlavaProcessor
from components.video import read_frames
from pipelines.preprocess import work_table
from pipelines.steps import (
    OUTPUT_SCHEMA,
    WORK_SCHEMA,
    DecodeVideo,
    Emit,
    LoadMedia,
    StepConfig,
    TileMedia,
    Tokenize,
    read_rejects,
)


@pytest.fixture(scope="module")
def work(demo_dir):
    _, manifests = demo_dir
    entries = []
    for split in ("single_image", "multi_image", "video", "text"):
        entries += read_records(manifests[split], split)[:2]
    return entries, work_table(entries)


def run_direct(table, config):
    for cls in (LoadMedia, DecodeVideo, TileMedia, Tokenize):
        table = cls(config)(table)
        assert table.schema == WORK_SCHEMA
    return table


def test_each_stage_directly(work, demo_dir):
    root, _ = demo_dir
    entries, table = work
    config = StepConfig()
    loaded = LoadMedia(config)(table).to_pylist()
    assert [r["modality"] for r in loaded] == ["image"] * 2 + ["multi_image"] * 2 + ["video"] * 2 + [
        "text"
    ] * 2
    assert loaded[0]["image_data"][0] == (root / json.loads(entries[0].record)["image"]).read_bytes()
    decoded = DecodeVideo(config)(LoadMedia(config)(table)).to_pylist()
    video = decoded[4]
    clip = read_frames(root / json.loads(entries[4].record)["video"])
    assert video["frame_indices"] == clip.indices and video["video_data"] is None
    assert np.array_equal(
        np.frombuffer(video["frames"], np.uint8).reshape(video["frames_shape"]), clip.frames
    )
    out = run_direct(table, config).to_pylist()
    assert not any(r["reject"] for r in out)


def test_rows_equal_components_called_directly(work, demo_dir):
    root, _ = demo_dir
    entries, table = work
    config = StepConfig()
    processor = LlavaProcessor(config.processor, build_tokenizer(config.model))
    rows = [r for r in Emit("/nonexistent")(run_direct(table, config)).to_pylist()]
    assert len(rows) == len(entries)
    for entry, row in zip(entries, rows, strict=True):
        sample = parse_sample(json.loads(entry.record))
        if sample.video:
            media = processor.media(frames=processor.sample_video(root / sample.video).frames)
        else:
            media = processor.media([Image.open(root / p) for p in sample.images])
        ids = processor.tokenize(sample, media.token_counts)
        assert row["input_ids"] == ids.input_ids.tolist() and row["labels"] == ids.labels.tolist()
        assert row["modality"] == media.modality and row["media_tokens"] == media.token_counts
        if media.pixel_values is not None:
            pixels = np.frombuffer(row["pixel_values"], np.uint8).reshape(row["pixel_shape"])
            assert np.array_equal(normalize_tiles(pixels, processor.anyres), media.pixel_values)


def test_steps_inside_map_batches_equal_direct(work, ray_local, tmp_path):
    _, table = work
    config = StepConfig()
    direct = Emit(str(tmp_path / "r1"))(run_direct(table, config))
    ds = ray_local.data.from_arrow([table.slice(0, 4), table.slice(4, 4)])
    for cls in (LoadMedia, DecodeVideo, TileMedia, Tokenize):
        ds = ds.map_batches(
            cls,
            fn_constructor_args=(config,),
            batch_format="pyarrow",
            batch_size=3,
            compute=ray_local.data.ActorPoolStrategy(size=1),
            num_cpus=0.2,
        )
    ds = ds.map_batches(
        Emit,
        fn_constructor_args=(str(tmp_path / "r2"),),
        batch_format="pyarrow",
        compute=ray_local.data.ActorPoolStrategy(size=1),
        num_cpus=0.2,
    )
    through_ray = pa.Table.from_pylist(ds.take_all(), schema=OUTPUT_SCHEMA)
    key = lambda r: (r["source"], r["index"])  # noqa: E731
    assert sorted(through_ray.to_pylist(), key=key) == sorted(direct.to_pylist(), key=key)


def test_a_failing_row_is_recorded_not_raised(tmp_path):
    entries = [
        {
            "index": 0,
            "sample_id": "bad",
            "source": "s",
            "record": json.dumps({"id": "bad", "conversations": []}),
            "media_root": str(tmp_path),
        },
        {
            "index": 1,
            "sample_id": "ok",
            "source": "s",
            "media_root": str(tmp_path),
            "record": json.dumps(
                {
                    "id": "ok",
                    "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
                }
            ),
        },
    ]
    table = pa.Table.from_pylist(entries, schema=WORK_SCHEMA)
    out = Emit(str(tmp_path / "rej"))(run_direct(table, StepConfig()))
    assert out.column("sample_id").to_pylist() == ["ok"]
    rejects = read_rejects(str(tmp_path / "rej"))
    assert [(r["sample_id"], r["step"], r["error_type"]) for r in rejects] == [
        ("bad", "load", "invalid_sample")
    ]
