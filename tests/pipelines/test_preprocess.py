"""The Ray Data pipeline end to end: parity, a corrupt corpus, determinism, local and s3:// storage."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from components import storage
from components.anyres import normalize_tiles
from components.conversation import parse_sample
from components.manifest import load_mixture
from components.media import MediaBudget, MediaPolicy
from components.model import build_tokenizer
from components.processor import LlavaProcessor
from pipelines.preprocess import PreprocessConfig, preprocess, read_output
from pipelines.steps import StepConfig, read_rejects
from tests.conftest import make_h264, upload_tree

POLICY = MediaPolicy(
    budget=MediaBudget(max_video_pixels=2_000_000)
)  # the demo's clips pass; 3 frames of 1280x720 do not


def _mixture(root, extra=""):
    path = root / "mix.yaml"
    path.write_text(
        "datasets:\n"
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


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "step-per-pool"])
def test_parity_with_components_on_every_modality(demo_dir, ray_local, tmp_path, fuse):
    root, _ = demo_dir
    config = PreprocessConfig(manifest=str(_mixture(root)), fuse=fuse)
    summary = preprocess(config, str(tmp_path / "out"))
    entries = load_mixture(config.manifest, seed=config.steps.seed)
    assert summary["read"] == len(entries) == summary["accepted"] and summary["rejected"] == 0
    rows = read_output(str(tmp_path / "out"))
    assert {r["modality"] for r in rows} == {"image", "multi_image", "video", "text"}
    processor = LlavaProcessor(config.steps.processor, build_tokenizer(config.steps.model))
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


def _corrupt_corpus(root, dest, *, local_tricks: bool = True):
    """Every good sample of the demo, plus one of each kind of bad one; ``local_tricks``: also symlinks out of
    the root, a FIFO and paths to a file outside it (local storage only). Returns (manifest, good ids,
    {bad id: error type}, the file outside the root)."""
    import os

    from PIL import Image as PILImage

    shutil.copytree(root, dest)
    good = [
        json.loads(line)
        for name in ("single_image", "video", "text")
        for line in open(dest / f"{name}.jsonl")
    ]
    (dest / "images" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 50)
    (dest / "images" / "empty.png").write_bytes(b"")
    PILImage.new("L", (8000, 8000)).save(dest / "images" / "huge.png")  # 64 MP in a few KB
    video = (dest / "video.jsonl").read_text().splitlines()[0]
    clip = dest / json.loads(video)["video"]
    (dest / "videos" / "truncated.mp4").write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    (dest / "videos" / "no-video.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    make_h264(dest / "videos" / "hd.mp4", "1280x720", rate=2)
    outside = dest.parent / f"{dest.name}-outside.png"
    shutil.copy(dest / good[0]["image"], outside)
    turn = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    image = good[0]["image"]
    bad = {
        "bad-trunc": (
            {"video": "videos/truncated.mp4", "conversations": turn("<video>\nq", "a")},
            "corrupt_video",
        ),
        "bad-novideo": (
            {"video": "videos/no-video.mp4", "conversations": turn("<video>\nq", "a")},
            "corrupt_video",
        ),
        "bad-zero": (
            {"image": "images/empty.png", "conversations": turn("<image>\nq", "a")},
            "corrupt_image",
        ),
        "bad-jpeg": (
            {"image": "images/garbage.jpg", "conversations": turn("<image>\nq", "a")},
            "corrupt_image",
        ),
        "bad-missing": (
            {"image": "images/nope.png", "conversations": turn("<image>\nq", "a")},
            "missing_media",
        ),
        "bad-ph": (
            {"image": "images/garbage.jpg", "conversations": turn("q without", "a")},
            "placeholder_mismatch",
        ),
        "bad-video-ph": ({"image": image, "conversations": turn("<video>\nq", "a")}, "placeholder_mismatch"),
        "bad-empty": ({"conversations": []}, "invalid_sample"),
        "bad-long": ({"conversations": turn("word " * 3000, "a")}, "too_long"),
        "bad-type": (
            {"image": "docs/file.pdf", "conversations": turn("<image>\nq", "a")},
            "unsupported_media",
        ),
        "bad-audio": ({"audio": "a.wav", "conversations": turn("q", "a")}, "unsupported_media"),
        "bad-both": (
            {"image": image, "images": [image], "conversations": turn("<image>\nq", "a")},
            "ambiguous_media",
        ),
        "bad-13": (
            {"image": [image] * 13, "conversations": turn("<image>" * 13 + "q", "a")},
            "too_many_images",
        ),
        "bad-huge": ({"image": "images/huge.png", "conversations": turn("<image>\nq", "a")}, "too_large"),
        "bad-hd": ({"video": "videos/hd.mp4", "conversations": turn("<video>\nq", "a")}, "too_large"),
        "bad-dotdot": (
            {"image": f"../{outside.name}", "conversations": turn("<image>\nq", "a")},
            "outside_root",
        ),
        "bad-inner-dotdot": (
            {"image": f"images/../../{outside.name}", "conversations": turn("<image>\nq", "a")},
            "outside_root",
        ),
        "bad-other-bucket": (
            {"image": "s3://another-bucket/x.png", "conversations": turn("<image>\nq", "a")},
            "outside_root",
        ),
        "bad-nul": ({"image": "images/a\x00.png", "conversations": turn("<image>\nq", "a")}, "invalid_path"),
    }
    if local_tricks:
        os.symlink(outside, dest / "images" / "escape.png")
        os.symlink("/dev/zero", dest / "images" / "zero.png")
        os.mkfifo(dest / "images" / "fifo.png")
        bad.update(
            {
                "bad-absolute": (
                    {"image": str(outside), "conversations": turn("<image>\nq", "a")},
                    "outside_root",
                ),
                "bad-symlink": (
                    {"image": "images/escape.png", "conversations": turn("<image>\nq", "a")},
                    "outside_root",
                ),
                "bad-devzero": (
                    {"image": "images/zero.png", "conversations": turn("<image>\nq", "a")},
                    "outside_root",
                ),
                "bad-fifo": (
                    {"image": "images/fifo.png", "conversations": turn("<image>\nq", "a")},
                    "not_a_file",
                ),
            }
        )
    lines = [json.dumps(r).encode() for r in good]
    for sid, (record, _) in bad.items():
        lines.insert(len(lines) // 2, json.dumps({"id": sid, **record}).encode())
    lines.insert(3, b'{"id": "bad-utf8", "conversations": "\xff\xfe not utf-8"}')
    lines.insert(4, b"[1, 2, 3]")  # not an object: named by its line
    lines.insert(5, json.dumps(good[0]).encode())  # the same id again: the second is rejected
    lines.insert(6, json.dumps({**good[1], "id": None}).encode())  # no id: named by its line, kept
    lines[0] = b"\xef\xbb\xbf" + lines[0]  # a byte-order mark before the first record
    (dest / "corpus.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    expected = {sid: reason for sid, (_, reason) in bad.items()}
    expected.update(
        {"corpus line 4": "read_error", "corpus line 5": "invalid_sample", good[0]["id"]: "duplicate_id"}
    )
    good_ids = {r["id"] for r in good} | {"corpus line 7"}
    return dest / "corpus.jsonl", good_ids, expected, outside


def test_corrupt_corpus_rejects_each_with_its_reason_and_reads_nothing_outside(demo_dir, ray_local, tmp_path):
    """The exact sets: every good sample kept (the one without an id under its line's name), every bad one
    rejected with its type, in the project's grammar, and nothing outside the media root opened (its access
    time, set in the past, never moves).
    Guards: resolve_media's root check; fails with it off."""
    import os

    root, _ = demo_dir
    manifest, good_ids, expected, outside = _corrupt_corpus(root, tmp_path / "corpus")
    past = 1_600_000_000
    os.utime(outside, (past, past))
    config = PreprocessConfig(manifest=str(manifest), steps=StepConfig(max_length=2048, media=POLICY))
    summary = preprocess(config, str(tmp_path / "out"))
    rejects = read_rejects(str(tmp_path / "out" / "rejects"))
    assert {r["sample_id"]: r["error_type"] for r in rejects} == expected
    assert {r["sample_id"] for r in read_output(str(tmp_path / "out"))} == good_ids
    assert summary["accepted"] == len(good_ids) and summary["rejected"] == len(expected)
    assert os.stat(outside).st_atime == past, "a file outside the media root was read"
    by_id = {r["sample_id"]: r for r in rejects}
    for sid, r in by_id.items():
        assert repr(sid) in r["message"] and "expected" in r["message"] and "found" in r["message"], r
        assert "Traceback" not in r["message"], r
        if sid != "bad-absolute":  # that one names the absolute path its own manifest line gave
            assert str(tmp_path) not in r["message"], r
    assert by_id["bad-trunc"]["step"] == "decode_video" and "field 'video'" in by_id["bad-trunc"]["message"]
    assert by_id["bad-jpeg"]["step"] == "tile" and "field 'image[0]'" in by_id["bad-jpeg"]["message"]
    assert by_id["bad-missing"]["step"] == "load" and "nope.png" in by_id["bad-missing"]["message"]
    assert by_id["bad-long"]["step"] == "tokenize" and "2048" in by_id["bad-long"]["message"]
    assert by_id["bad-13"]["message"].endswith("expected at most 12 images, found 13")
    assert "8000x8000" in by_id["bad-huge"]["message"] and "1280x720" in by_id["bad-hd"]["message"]
    for sid, (kind, message) in WHOLE_MESSAGES.items():  # one example of each kind, word for word
        assert (by_id[sid]["error_type"], by_id[sid]["message"]) == (kind, message)
    assert set(expected.values()) == {kind for kind, _ in WHOLE_MESSAGES.values()}, "a kind without its text"


# One reject of each kind, its whole text: no stutter ("expected expected"), no library text (a decoder's
# log, an exception's own message), no host path. Seen failing with DecodeVideo's reject built from the
# video error's own text: "field 'video': expected a video, found video <bytes>: expected a video stream...".
WHOLE_MESSAGES = {
    "corpus line 4": (
        "read_error",
        "sample 'corpus line 4', field '<line>': expected UTF-8 text, found invalid byte at 37",
    ),
    "corpus line 5": (
        "invalid_sample",
        "sample 'corpus line 5', field '<record>': expected a JSON object, found list",
    ),
    "single_image-si-0000": (
        "duplicate_id",
        "sample 'single_image-si-0000', field 'id': expected an id unique in corpus, found it again (first "
        "at line 1)",
    ),
    "bad-trunc": (
        "corrupt_video",
        "sample 'bad-trunc', field 'video': expected a video stream the decoder can open, found none "
        "(corrupt, or no video track)",
    ),
    "bad-jpeg": (
        "corrupt_image",
        "sample 'bad-jpeg', field 'image[0]': expected a decodable image, found 354 bytes of a damaged image",
    ),
    "bad-ph": (
        "placeholder_mismatch",
        "sample 'bad-ph', field 'conversations': expected 1 media placeholder(s) for 1 media, found 0 "
        "placeholder(s)",
    ),
    "bad-type": (
        "unsupported_media",
        "sample 'bad-type', field 'image[0]': expected one of ['.bmp', '.gif', '.jpeg', '.jpg', '.png', "
        "'.tif', "
        "'.tiff', '.webp'], found 'docs/file.pdf'",
    ),
    "bad-both": (
        "ambiguous_media",
        "sample 'bad-both', field 'image': expected one of image or images, found both",
    ),
    "bad-hd": (
        "too_large",
        "sample 'bad-hd', field 'video': expected at most 2000000 pixels in the sampled frames, found 3 "
        "frames "
        "of 1280x720",
    ),
    "bad-dotdot": (
        "outside_root",
        "sample 'bad-dotdot', field 'image[0]': expected a path inside the media root or an allowed root, "
        "found "
        "'../corpus-outside.png' outside them",
    ),
    "bad-fifo": (
        "not_a_file",
        "sample 'bad-fifo', field 'image[0]': expected a regular file, found something else at "
        "'images/fifo.png'",
    ),
    "bad-nul": (
        "invalid_path",
        "sample 'bad-nul', field 'image[0]': expected a file path, found one with a NUL byte or none",
    ),
    "bad-13": ("too_many_images", "sample 'bad-13', field 'image': expected at most 12 images, found 13"),
    "bad-long": (
        "too_long",
        "sample 'bad-long', field 'conversations': expected at most 2048 tokens, found 3029 tokens",
    ),
    "bad-missing": (
        "missing_media",
        "sample 'bad-missing', field 'image[0]': expected a readable file, found none at 'images/nope.png'",
    ),
}


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


def test_interleave_format_mix_is_deterministic_per_sample(demo_dir, ray_local, tmp_path):
    """Interleave's "in-the-front" / "interleaved" mix, as its recipe configures it (front_fraction 0.5 in
    interleave_m4): two runs give every sample the same layout, both layouts occur, a front row's ids
    hold every image first, and another seed deals them differently.
    Guards: the seeded format mix; fails with every sample interleaved."""
    import dataclasses

    from pipelines.recipes import load_recipe, step_config

    root, manifests = demo_dir
    recipe = load_recipe("llava_next_interleave", "tiny", demo_dir=str(root))
    stage = recipe.stage("interleave_m4")
    assert stage.front_fraction == 0.5
    config = step_config(recipe, stage)
    data = {"datasets": [{"json_path": manifests["multi_image"]}, {"json_path": manifests["single_image"]}]}
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = PreprocessConfig(
            manifest=data, data_root=recipe.data_root, steps=dataclasses.replace(config, seed=seed)
        )
        preprocess(cfg, str(tmp_path / name))
        runs.append({r["sample_id"]: r for r in read_output(str(tmp_path / name))})
    layouts = [{k: r["layout"] for k, r in rows.items()} for rows in runs]
    assert layouts[0] == layouts[1] and set(layouts[0].values()) == {"front", "interleaved"}
    assert layouts[2] != layouts[0]
    image_id = build_tokenizer(config.model).convert_tokens_to_ids("<image>")
    for row in runs[0].values():
        ids = row["input_ids"]
        media = [i for i, t in enumerate(ids) if t == image_id]
        if row["layout"] == "front" and media:
            assert media == list(range(media[0], media[0] + len(media)))  # every image token in one block


def test_s3_in_and_out_against_moto_over_http(demo_dir, ray_local, s3_bucket, tmp_path):
    """The corpus from s3:// (no symlinks or FIFOs there): the same kept and rejected sets, and the rejects
    table byte for byte what the same samples give from a local directory (no timestamps, no host paths)."""
    root, _ = demo_dir
    manifest, good_ids, expected, _ = _corrupt_corpus(root, tmp_path / "corpus", local_tricks=False)
    os.remove(tmp_path / "corpus" / "images" / "empty.png")  # S3 cannot tell an empty object from none:
    expected["bad-zero"] = "missing_media"  # the local run below is given the same
    upload_tree(tmp_path / "corpus", f"{s3_bucket}/corpus")
    assert storage.exists(f"{s3_bucket}/corpus/corpus.jsonl")
    config = PreprocessConfig(
        manifest=f"{s3_bucket}/corpus/corpus.jsonl", steps=StepConfig(max_length=2048, media=POLICY)
    )
    summary = preprocess(config, f"{s3_bucket}/pre")
    rejects = read_rejects(f"{s3_bucket}/pre/rejects")
    assert {r["sample_id"]: r["error_type"] for r in rejects} == expected and summary["accepted"] == len(
        good_ids
    )
    assert {r["sample_id"] for r in read_output(f"{s3_bucket}/pre")} == good_ids
    local = PreprocessConfig(manifest=str(manifest), steps=StepConfig(max_length=2048, media=POLICY))
    preprocess(local, str(tmp_path / "local"))
    assert read_rejects(str(tmp_path / "local" / "rejects")) == rejects
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
        manifest=str(tmp_path / "m.jsonl"), steps=StepConfig(model=ModelSpec(anyres=anyres), max_length=2048)
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
