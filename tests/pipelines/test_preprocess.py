"""The Ray Data pipeline end to end: parity, a corrupt corpus, determinism, local and s3:// storage."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from components import storage
from components.anyres import normalize_tiles
from components.conversation import parse_sample
from components.manifest import load_mixture
from components.model import build_tokenizer
from components.processor import LlavaProcessor
from pipelines.preprocess import PreprocessConfig, preprocess, read_output
from pipelines.stages import StageConfig, read_rejects
from tests.conftest import upload_tree


def _mixture(root, extra=""):
    path = root / "mix.yaml"
    path.write_text(
        "seed: 7\ndatasets:\n"
        "  - json_path: single_image.jsonl\n  - json_path: multi_image.jsonl\n"
        "  - json_path: video.jsonl\n  - json_path: text.jsonl\n"
        "  - parquet_path: single_image.parquet\n    sampling_strategy: random:3\n" + extra
    )
    return path


def _expected(root, record, processor):
    sample = parse_sample(record)
    if sample.video:
        media = processor.media(frames=processor.sample_video(root / sample.video).frames)
    else:
        media = processor.media([Image.open(root / p) for p in sample.images])
    return media, processor.tokenize(sample, media.token_counts)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "stage-per-pool"])
def test_parity_with_components_on_every_modality(demo_dir, ray_local, tmp_path, fuse):
    root, _ = demo_dir
    config = PreprocessConfig(manifest=str(_mixture(root)), fuse=fuse)
    summary = preprocess(config, str(tmp_path / "out"))
    entries = load_mixture(config.manifest, seed=7)
    assert summary["read"] == len(entries) == summary["accepted"] and summary["rejected"] == 0
    rows = read_output(str(tmp_path / "out"))
    assert {r["modality"] for r in rows} == {"image", "multi_image", "video", "text"}
    processor = LlavaProcessor(config.stage.processor, build_tokenizer(config.stage.model))
    by_key = {(e.dataset, e.index): e for e in entries}
    checked = set()
    for row in rows:
        if (row["modality"], row["source"]) in checked:
            continue
        entry = by_key[(row["source"], row["index"])]
        record = json.loads(entry.record)
        if entry.embedded_images:  # the Parquet form: compare against the embedded bytes' file
            record["image"] = f"images/{record['id']}.png"
        media, ids = _expected(root, record, processor)
        assert row["input_ids"] == ids.input_ids.tolist() and row["labels"] == ids.labels.tolist()
        if media.pixel_values is not None:
            pixels = np.frombuffer(row["pixel_values"], np.uint8).reshape(row["pixel_shape"])
            assert np.array_equal(normalize_tiles(pixels, processor.anyres), media.pixel_values)
        checked.add((row["modality"], row["source"]))
    assert {m for m, _ in checked} == {"image", "multi_image", "video", "text"}
    assert ("image", "single_image_4") in checked  # the Parquet form with embedded bytes


def _corrupt_corpus(root, dest):
    """Every good sample of the demo, plus one of each kind of bad one."""
    shutil.copytree(root, dest)
    good = [
        json.loads(line)
        for name in ("single_image", "video", "text")
        for line in open(dest / f"{name}.jsonl")
    ]
    (dest / "images" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 50)
    (dest / "images" / "empty.png").write_bytes(b"")
    video = (dest / "video.jsonl").read_text().splitlines()[0]
    clip = dest / json.loads(video)["video"]
    (dest / "videos" / "truncated.mp4").write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    turn = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    bad = [
        ({"id": "bad-trunc", "video": "videos/truncated.mp4", "conversations": turn("<image>\nq", "a")}, "corrupt_video"),
        ({"id": "bad-zero", "image": "images/empty.png", "conversations": turn("<image>\nq", "a")}, "corrupt_image"),
        ({"id": "bad-jpeg", "image": "images/garbage.jpg", "conversations": turn("<image>\nq", "a")}, "corrupt_image"),
        ({"id": "bad-missing", "image": "images/nope.png", "conversations": turn("<image>\nq", "a")}, "missing_media"),
        ({"id": "bad-ph", "image": "images/garbage.jpg", "conversations": turn("q without", "a")},
         "placeholder_mismatch"),
        ({"id": "bad-empty", "conversations": []}, "invalid_sample"),
        ({"id": "bad-long", "conversations": turn("word " * 3000, "a")}, "too_long"),
        ({"id": "bad-type", "image": "docs/file.pdf", "conversations": turn("<image>\nq", "a")}, "unsupported_media"),
        ({"id": "bad-audio", "audio": "a.wav", "conversations": turn("q", "a")}, "unsupported_media"),
    ]  # fmt: skip
    lines = [json.dumps(r).encode() for r in good]
    for record, _ in bad:
        lines.insert(len(lines) // 2, json.dumps(record).encode())
    lines.insert(3, b'{"id": "bad-utf8", "conversations": "\xff\xfe not utf-8"}')
    (dest / "corpus.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    expected = {"read_error": 1}
    for _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    return dest / "corpus.jsonl", {r["id"] for r in good}, expected


def test_corrupt_corpus_rejects_each_with_its_reason(demo_dir, ray_local, tmp_path):
    root, _ = demo_dir
    manifest, good_ids, expected = _corrupt_corpus(root, tmp_path / "corpus")
    config = PreprocessConfig(manifest=str(manifest), stage=StageConfig(max_length=2048))
    summary = preprocess(config, str(tmp_path / "out"))
    assert summary["rejected_by_reason"] == expected
    assert summary["accepted"] == len(good_ids) and summary["read"] == len(good_ids) + sum(expected.values())
    assert {r["sample_id"] for r in read_output(str(tmp_path / "out"))} == good_ids
    rejects = read_rejects(str(tmp_path / "out" / "rejects"))
    by_id = {r["sample_id"]: r for r in rejects}
    assert by_id["bad-trunc"]["step"] == "decode_video"
    assert "'bad-trunc', field 'video'" in by_id["bad-trunc"]["message"]
    assert (
        by_id["bad-jpeg"]["step"] == "tile" and "'bad-jpeg', field 'image[0]'" in by_id["bad-jpeg"]["message"]
    )
    assert by_id["bad-missing"]["step"] == "load" and "nope.png" in by_id["bad-missing"]["message"]
    assert by_id["bad-long"]["step"] == "tokenize" and "2048" in by_id["bad-long"]["message"]
    assert all(r["message"] for r in rejects)


def test_same_seed_same_ids_same_order_and_a_pinned_mixture(demo_dir, ray_local, tmp_path):
    root, _ = demo_dir
    mix = _mixture(root, '  - json_path: single_image.jsonl\n    sampling_strategy: "25%"\n')
    first = preprocess(PreprocessConfig(manifest=str(mix)), str(tmp_path / "a"))
    second = preprocess(PreprocessConfig(manifest=str(mix)), str(tmp_path / "b"))
    assert first["mixture_digest"] == second["mixture_digest"]
    pinned_a = json.loads((tmp_path / "a" / "mixture.json").read_text())
    assert pinned_a == json.loads((tmp_path / "b" / "mixture.json").read_text())
    assert all(len(h) == 16 for ids in pinned_a["datasets"].values() for _, _, h in ids)
    ids_a = [r["sample_id"] for r in read_output(str(tmp_path / "a"))]
    assert ids_a == [r["sample_id"] for r in read_output(str(tmp_path / "b"))]


def test_front_layout_mix_is_deterministic_per_sample(demo_dir, ray_local, tmp_path):
    root, manifests = demo_dir
    config = PreprocessConfig(
        manifest=manifests["multi_image"], stage=StageConfig(front_fraction=0.5, seed=1)
    )
    preprocess(config, str(tmp_path / "out"))
    layouts = {r["sample_id"]: r["layout"] for r in read_output(str(tmp_path / "out"))}
    assert set(layouts.values()) <= {"front", "interleaved"} and len(layouts) == 4


def test_s3_in_and_out_against_moto_over_http(demo_dir, ray_local, s3_bucket, tmp_path):
    root, _ = demo_dir
    manifest, good_ids, expected = _corrupt_corpus(root, tmp_path / "corpus")
    upload_tree(tmp_path / "corpus", f"{s3_bucket}/corpus")
    assert storage.exists(f"{s3_bucket}/corpus/corpus.jsonl")
    config = PreprocessConfig(manifest=f"{s3_bucket}/corpus/corpus.jsonl", stage=StageConfig(max_length=2048))
    summary = preprocess(config, f"{s3_bucket}/pre")
    assert summary["rejected_by_reason"] == expected and summary["accepted"] == len(good_ids)
    assert {r["sample_id"] for r in read_output(f"{s3_bucket}/pre")} == good_ids
    assert len(read_rejects(f"{s3_bucket}/pre/rejects")) == sum(expected.values())
    assert json.loads(storage.read_text(f"{s3_bucket}/pre/summary.json"))["accepted"] == len(good_ids)


def test_jpeg_draft_decodes_reduced_keeps_tokens_and_rejects_truncated(ray_local, tmp_path):
    """Opt-in jpeg_draft: a large JPEG is decoded at a reduced scale during tiling (not at load), with the
    token count and tile count of its full size; a truncated JPEG, which opens but cannot be decoded,
    is still rejected with its sample and field."""
    import io

    from components.anyres import AnyResConfig, num_image_tokens, tile_image_uint8
    from components.model import ModelSpec

    (tmp_path / "images").mkdir()
    small = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((4000, 3000), Image.BILINEAR).save(buffer, "JPEG", quality=90)
    (tmp_path / "images" / "big.jpg").write_bytes(buffer.getvalue())
    (tmp_path / "images" / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    turn = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    (tmp_path / "m.jsonl").write_text(
        "".join(
            json.dumps({"id": i, "image": f"images/{i}.jpg", "conversations": turn}) + "\n"
            for i in ("big", "cut")
        )
    )
    anyres = AnyResConfig(tile_size=56, jpeg_draft=True)
    config = PreprocessConfig(
        manifest=str(tmp_path / "m.jsonl"), stage=StageConfig(model=ModelSpec(anyres=anyres), max_length=2048)
    )
    summary = preprocess(config, str(tmp_path / "out"))
    assert summary["accepted"] == 1 and summary["rejected_by_reason"] == {"corrupt_image": 1}
    (row,) = read_output(str(tmp_path / "out"))
    exact, _, grid = tile_image_uint8(Image.open(tmp_path / "images" / "big.jpg"), AnyResConfig(tile_size=56))
    assert row["image_sizes"] == [[3000, 4000]] and row["media_tokens"] == [
        num_image_tokens((3000, 4000), anyres)
    ]
    drafted = np.frombuffer(row["pixel_values"], np.uint8).reshape(row["pixel_shape"])
    assert drafted.shape == exact.shape == (1 + grid[0] * grid[1], 3, 56, 56)
    assert 0 < np.abs(drafted.astype(int) - exact).mean() < 5  # close, not identical (uint8 steps)
    (reject,) = read_rejects(str(tmp_path / "out" / "rejects"))
    assert reject["sample_id"] == "cut" and reject["step"] == "tile"
    assert "'cut', field 'image[0]'" in reject["message"]
