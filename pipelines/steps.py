"""The preprocessing steps (Ray Data's map steps, not the curriculum's stages): small classes with a
``__call__(batch)``; their resources (CPUs, actors, batch size) are data in ``PreprocessConfig``.

Each step takes and returns a pyarrow Table of work rows (``WORK_SCHEMA``), so it runs the same
when called directly (tests, debugging) and inside ``Dataset.map_batches`` on a CPU actor. Heavy
setup (the tokenizer) happens once per worker in ``setup``. A row that fails gets a ``reject``
(step, error type, message) and passes through the later steps untouched; ``Emit`` writes the
rejects beside the output and yields the output rows (``OUTPUT_SCHEMA``). Steps are retry-safe:
no state between batches, and rejects files are named by their batch's content.

No ``import ray`` here: ``pipelines/preprocess.py`` wires these into Ray Data.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from components import storage
from components.anyres import ImageTooSmallError
from components.conversation import SampleError, parse_sample
from components.errors import mismatch, sample_field
from components.media import MediaError, MediaPolicy, deadline, read_media, resolve_media
from components.model import ModelSpec, build_tokenizer
from components.processor import LlavaProcessor, ProcessorConfig, media_inputs
from components.video import VideoDecodeError, VideoTooLargeError
from pipelines.recipes import Recipe, StageSpec  # their fields' defaults are the steps' own

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VIDEO_EXTENSIONS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"}
UNSUPPORTED_FIELDS = ("audio", "audios", "pdf")

WORK_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("position", pa.int64()),
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("record", pa.string()),
        ("media_root", pa.string()),
        ("embedded_images", pa.list_(pa.binary())),
        ("image_data", pa.list_(pa.binary())),
        ("video_data", pa.binary()),
        ("frames", pa.binary()),
        ("frames_shape", pa.list_(pa.int32())),
        ("frame_indices", pa.list_(pa.int32())),
        ("modality", pa.string()),
        ("pixel_values", pa.binary()),
        ("pixel_shape", pa.list_(pa.int32())),
        ("pixel_dtype", pa.string()),
        ("image_sizes", pa.list_(pa.list_(pa.int32()))),
        ("media_tokens", pa.list_(pa.int32())),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("layout", pa.string()),
        ("reject", pa.string()),
    ]
)

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), metadata={"doc": "the record's id"}),
        pa.field("source", pa.string(), metadata={"doc": "the dataset it came from"}),
        pa.field("index", pa.int64(), metadata={"doc": "position in its dataset file"}),
        pa.field("position", pa.int64(), metadata={"doc": "place in the mixture's (source, index) order"}),
        pa.field("modality", pa.string(), metadata={"doc": "text, image, multi_image or video"}),
        pa.field(
            "input_ids", pa.list_(pa.int32()), metadata={"doc": "placeholders expanded to media tokens"}
        ),
        pa.field("labels", pa.list_(pa.int32()), metadata={"doc": "-100 except assistant turns + stops"}),
        pa.field("length", pa.int32(), metadata={"doc": "len(input_ids)"}),
        pa.field("pixel_values", pa.binary(), metadata={"doc": "tiles/frames [N, 3, T, T], C order"}),
        pa.field("pixel_shape", pa.list_(pa.int32()), metadata={"doc": "[N, 3, T, T]; [] for text"}),
        pa.field("pixel_dtype", pa.string(), metadata={"doc": "uint8 (normalized at collate) or float32"}),
        pa.field(
            "image_sizes", pa.list_(pa.list_(pa.int32())), metadata={"doc": "(height, width) per image"}
        ),
        pa.field("media_kinds", pa.list_(pa.string()), metadata={"doc": "image or video, per placeholder"}),
        pa.field("media_tokens", pa.list_(pa.int32()), metadata={"doc": "tokens per media"}),
        pa.field("layout", pa.string(), metadata={"doc": "interleaved or front"}),
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("index", pa.int64()),
        ("step", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)


@dataclass
class StepConfig:
    """What the steps need; resolved once on the driver and shipped to every worker."""

    processor: ProcessorConfig | None = None
    """The stage's processor: architecture, template, AnyRes grid and video sampling (None: the model's)."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """Where the processor's tokenizer comes from (the checkpoint's, the LLM's, or the tiny BPE)."""
    max_length: int = StageSpec.max_length
    front_fraction: float = StageSpec.front_fraction
    """Share of media samples in the "in-the-front" layout (Interleave's format mix); the rest interleaved."""
    pixel_dtype: str = "uint8"
    """uint8 (4x smaller rows; normalized at collate) or float32."""
    media: MediaPolicy = field(default_factory=MediaPolicy)
    """Where media may be read from (the manifest's root, allowed roots) and what a sample may cost."""
    seed: int = Recipe.seed
    """The run's seed (the recipe's): each mixture's sampling and the front/interleaved format draw."""

    def __post_init__(self) -> None:
        if isinstance(self.media, dict):
            self.media = MediaPolicy(**self.media)
        if isinstance(self.model, dict):
            self.model = ModelSpec(**self.model)
        if isinstance(self.processor, dict):
            self.processor = ProcessorConfig(**self.processor)
        if self.processor is None:
            self.processor = ProcessorConfig(
                arch=self.model.arch, template=self.model.template, anyres=self.model.anyres
            )
        if self.pixel_dtype not in ("uint8", "float32"):
            raise ValueError(f"pixel_dtype: expected uint8 or float32, found {self.pixel_dtype!r}")
        if not 0.0 <= self.front_fraction <= 1.0:
            raise ValueError(f"front_fraction: expected a value in [0, 1], found {self.front_fraction}")


def _reject(step: str, error_type: str, message: str) -> str:
    return json.dumps({"step": step, "error_type": error_type, "message": message})


def _classify(exc: Exception, sample_id: str) -> tuple[str, str]:
    """(error type, message) of a failed row: ours as they are; anything else named by type only (a library's
    own text may hold host paths or timestamps, and two runs must give the same rejects table)."""
    if isinstance(exc, (SampleError, MediaError)):
        return exc.kind, str(exc)[:1000]
    if isinstance(exc, VideoDecodeError):
        return "corrupt_video", mismatch(*exc.about(sample_field(sample_id, "video")))
    if isinstance(exc, ImageTooSmallError):
        return "corrupt_image", mismatch(*exc.about(sample_field(sample_id, "image")))
    return (
        f"unexpected_{type(exc).__name__}",
        mismatch(f"sample {sample_id!r}", "to be processed", f"an error ({type(exc).__name__})"),
    )


class Step:
    """A map_batches callable: per-row processing with rejects instead of crashes."""

    name = "step"

    def __init__(self, config: StepConfig):
        self.config = config
        self._ready = False

    def setup(self) -> None:
        """Heavy, once per worker."""

    def process_row(self, row: dict) -> dict:
        raise NotImplementedError

    def ready(self) -> None:
        """Run ``setup`` once (at the first batch, or earlier when the worker starts)."""
        if not self._ready:
            self.setup()
            self._ready = True

    def process_rows(self, rows: list[dict]) -> list[dict]:
        """Work rows through this step; a failure becomes the row's recorded reject, never a crash."""
        self.ready()
        out = []
        for row in rows:
            if not row.get("reject"):
                try:
                    with deadline(self.config.media.decode_deadline_s, row["sample_id"]):
                        row = self.process_row(row)
                except Exception as exc:  # every failure becomes a recorded reject, never a crash
                    row["reject"] = _reject(self.name, *_classify(exc, row["sample_id"]))
            out.append(row)
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(self.process_rows(work_rows(batch)), schema=WORK_SCHEMA)


def _extension(path: str) -> str:
    return os.path.splitext(path.split("?")[0])[1].lower()


class LoadMedia(Step):
    """Parse the record, check media types and counts, read the media bytes (embedded, local, or s3://)
    from inside the media root or an allowed root only (components/media.py)."""

    name = "load"

    def process_row(self, row: dict) -> dict:
        if not row["record"]:
            raise SampleError(
                row["sample_id"], "<line>", "a readable JSON record", "an unreadable line", "read_error"
            )
        record = json.loads(row["record"])
        for key in UNSUPPORTED_FIELDS:
            if isinstance(record, dict) and record.get(key):
                raise MediaError("unsupported_media", row["sample_id"], key, "images or a video", key)
        sample = parse_sample(record, source=row["source"], default_id=row["sample_id"])
        policy = self.config.media
        if len(sample.images) > policy.budget.max_images:
            raise MediaError(
                "too_many_images",
                sample.id,
                "image",
                f"at most {policy.budget.max_images} images",
                str(len(sample.images)),
            )
        row["modality"] = sample.modality
        embedded = row.get("embedded_images") or []
        if embedded:
            row["image_data"] = list(embedded)
        else:
            row["image_data"] = [
                self._read(row, f"image[{i}]", p, IMAGE_EXTENSIONS, policy.budget.max_image_bytes)
                for i, p in enumerate(sample.images)
            ]
        if sample.video is not None:
            row["video_data"] = self._read(
                row, "video", sample.video, VIDEO_EXTENSIONS, policy.budget.max_video_bytes
            )
        row["embedded_images"] = []
        return row

    def _read(self, row: dict, field_name: str, path: str, allowed: set[str], max_bytes: int) -> bytes:
        sid = row["sample_id"]
        ext = _extension(path)
        if ext not in allowed:
            raise MediaError(
                "unsupported_media", sid, field_name, f"one of {sorted(allowed)}", repr(path[:80])
            )
        uri = resolve_media(path, row["media_root"], self.config.media, sample_id=sid, field=field_name)
        data = read_media(uri, max_bytes, sample_id=sid, field=field_name, shown=path)
        if not data:
            kind = "corrupt_video" if field_name == "video" else "corrupt_image"
            raise MediaError(kind, sid, field_name, "bytes", "0 bytes")
        return data


class DecodeVideo(Step):
    """Video rows: compute the frame indices first, then decode only those frames."""

    name = "decode_video"

    def process_row(self, row: dict) -> dict:
        if row.get("video_data") is None:
            return row
        video = self.config.processor.video  # the sampling the checkpoint records and serving repeats
        try:
            clip = video.read(row["video_data"], max_pixels=self.config.media.budget.max_video_pixels)
        except VideoDecodeError as e:
            kind = "too_large" if isinstance(e, VideoTooLargeError) else "corrupt_video"
            raise MediaError(kind, row["sample_id"], "video", e.expected, e.found) from e
        row["frames"] = clip.frames.tobytes()
        row["frames_shape"] = list(clip.frames.shape)
        row["frame_indices"] = clip.indices
        row["video_data"] = None
        return row


class TileMedia(Step):
    """AnyRes tiles for a single image, base tiles for multi-image items, resized frames for video."""

    name = "tile"

    def setup(self) -> None:
        from components.resample import warm_up

        warm_up()

    def process_row(self, row: dict) -> dict:
        config = self.config.processor
        normalize = self.config.pixel_dtype == "float32"
        if row.get("frames") is not None:
            frames = np.frombuffer(row["frames"], dtype=np.uint8).reshape(row["frames_shape"])
            media = media_inputs(config, None, frames, normalize=normalize)
            row["frames"] = None
        else:
            images = [
                self._open(row, i, data, config.anyres.jpeg_draft)
                for i, data in enumerate(row.get("image_data") or [])
            ]
            try:  # under jpeg_draft a JPEG is decoded here, at the reduced scale tiling asks for
                media = media_inputs(config, images, None, normalize=normalize)
            except (OSError, SyntaxError) as e:
                for i, data in enumerate(row["image_data"]):  # which one: decode each in full
                    self._open(row, i, data)
                raise MediaError(
                    "corrupt_image", row["sample_id"], "image", "decodable images", "one that is not"
                ) from e
            row["image_data"] = []
        if media.pixel_values is not None:
            row["pixel_values"] = np.ascontiguousarray(media.pixel_values).tobytes()
            row["pixel_shape"] = list(media.pixel_values.shape)
        else:
            row["pixel_values"], row["pixel_shape"] = b"", []
        row["pixel_dtype"] = self.config.pixel_dtype
        row["image_sizes"] = [list(s) for s in media.image_sizes]
        row["media_tokens"] = media.token_counts
        return row

    def _open(self, row: dict, i: int, data: bytes, jpeg_draft: bool = False) -> Image.Image:
        """The image, its size checked against the budget from its header, before it is decoded."""
        sid, field_name = row["sample_id"], f"image[{i}]"
        budget = self.config.media.budget.max_image_pixels
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > budget:
                raise MediaError(
                    "too_large",
                    sid,
                    field_name,
                    f"at most {budget} pixels",
                    f"{image.width}x{image.height}",
                )
            if not (jpeg_draft and image.format == "JPEG"):  # a draft must come before decoding
                image.load()
            return image
        except Image.DecompressionBombError as e:  # past Pillow's own limit: refused at open
            raise MediaError("too_large", sid, field_name, f"at most {budget} pixels", "far more") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            if isinstance(e, MediaError):
                raise
            what = "an unknown format" if isinstance(e, UnidentifiedImageError) else "a damaged image"
            raise MediaError(
                "corrupt_image", sid, field_name, "a decodable image", f"{len(data)} bytes of {what}"
            ) from e


class Tokenize(Step):
    """The stage's template, token budget and layout mix; labels on assistant turns only."""

    name = "tokenize"

    def setup(self) -> None:
        self.processor = LlavaProcessor(self.config.processor, build_tokenizer(self.config.model))

    def layout_for(self, sample_id: str, has_media: bool) -> str:
        if not has_media or self.config.front_fraction <= 0:
            return "interleaved"
        draw = random.Random(f"{self.config.seed}:{sample_id}").random()
        return "front" if draw < self.config.front_fraction else "interleaved"

    def process_row(self, row: dict) -> dict:
        sample = parse_sample(json.loads(row["record"]), source=row["source"], default_id=row["sample_id"])
        layout = self.layout_for(sample.id, sample.num_media > 0)
        ids = self.processor.tokenize(
            sample, list(row.get("media_tokens") or []), layout=layout, max_length=self.config.max_length
        )
        row["input_ids"] = ids.input_ids.tolist()
        row["labels"] = ids.labels.tolist()
        row["layout"] = layout
        return row


class Emit:
    """Split: rejects to ``<rejects_uri>/part-<digest>.parquet`` (retry-safe names), good rows out."""

    name = "emit"

    def __init__(self, rejects_uri: str):
        self.rejects_uri = rejects_uri

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.emit_rows(batch.to_pylist())

    def emit_rows(self, rows: list[dict]) -> pa.Table:
        good, bad = [], []
        for row in rows:
            if row.get("reject"):
                info = json.loads(row["reject"])
                bad.append(
                    {"sample_id": row["sample_id"], "source": row["source"], "index": row["index"], **info}
                )
            else:
                good.append(output_row(row))
        if bad:
            digest = hashlib.sha256(
                json.dumps([(b["source"], b["index"]) for b in bad]).encode()
            ).hexdigest()[:20]
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(bad, schema=REJECT_SCHEMA), buf)
            storage.write_bytes(storage.join(self.rejects_uri, f"part-{digest}.parquet"), buf.getvalue())
        return pa.Table.from_pylist(good, schema=OUTPUT_SCHEMA)


def output_row(row: dict) -> dict:
    modality = row["modality"]
    kinds = {"video": ["video"], "text": []}.get(modality, ["image"] * len(row.get("image_sizes") or []))
    return {
        "sample_id": row["sample_id"],
        "source": row["source"],
        "index": row["index"],
        "position": row["position"],
        "modality": modality,
        "input_ids": row["input_ids"],
        "labels": row["labels"],
        "length": len(row["input_ids"]),
        "pixel_values": row.get("pixel_values") or b"",
        "pixel_shape": row.get("pixel_shape") or [],
        "pixel_dtype": row.get("pixel_dtype") or "uint8",
        "image_sizes": row.get("image_sizes") or [],
        "media_kinds": kinds,
        "media_tokens": row.get("media_tokens") or [],
        "layout": row.get("layout") or "interleaved",
    }


class Chain:
    """Several steps fused into one actor: rows cross the object store once, not once per step, and
    pass from step to step as Python rows (one Arrow conversion in, one out: a row's tiles are
    megabytes, and each conversion copies them)."""

    def __init__(self, steps: list, emit: Emit):
        self.steps = steps
        self.emit = emit
        for step in steps:  # constructed on the worker: heavy setup now, before its first batch
            step.ready()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = work_rows(batch)
        for step in self.steps:
            rows = step.process_rows(rows)
        return self.emit.emit_rows(rows)


def work_rows(batch: pa.Table) -> list[dict]:
    """A batch as work rows: every field of WORK_SCHEMA present (None until a step sets it)."""
    empty = dict.fromkeys(WORK_SCHEMA.names)
    return [{**empty, **row} for row in batch.to_pylist()]


STEPS = (LoadMedia, DecodeVideo, TileMedia, Tokenize)


def mixture_order(row: dict) -> tuple:
    """A row's place in its mixture, (source, index): the order of the manifest, whatever order
    preprocessing's tasks wrote the rows (or rejects) in."""
    return (row["source"], row["index"])


def read_rejects(rejects_uri: str) -> list[dict]:
    rows = []
    for rel in storage.list_files(rejects_uri):
        if rel.endswith(".parquet"):
            rows += pq.read_table(io.BytesIO(storage.read_bytes(storage.join(rejects_uri, rel)))).to_pylist()
    return sorted(rows, key=mixture_order)
