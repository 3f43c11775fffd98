"""Ray Data preprocessing: manifest -> load -> decode (sampled frames only) -> tile -> tokenize -> shards.

    llava-ray preprocess --recipe llava_onevision --profile tiny --stage stage2_ov --out runs/pre

Reads top to bottom: resolve the mixture on the driver (ids, hashes, read errors), stream it through
the stages on CPU actors, then either hand the Dataset to Ray Train (``build_dataset``) or write
Parquet shards (``preprocess``). Every bad row lands in ``<out>/rejects/`` with its reason; the
summary counts read, accepted and rejected-by-reason, and must add up.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.dataset as pads
import ray

from components import storage
from components.manifest import Entry, load_mixture, mixture_manifest, resolve_mixture
from pipelines.stages import (
    STAGES,
    WORK_SCHEMA,
    Chain,
    Emit,
    StageConfig,
    _reject,
    mixture_order,
    read_rejects,
)

log = logging.getLogger(__name__)


MAX_INPUT_BLOCKS = 8192
"""The most input blocks one run is cut into (each is an object in the store and a task)."""


@dataclass
class PreprocessConfig:
    """One preprocessing run: what to read, how to process it, and the Ray resources for it."""

    manifest: str | dict
    """A LLaVA JSON/JSONL, a Parquet with image bytes, or a YAML mixture (a path or s3:// URI);
    or a mixture given as data ({datasets: [...]}) with paths relative to ``data_root``."""
    data_root: str = "."
    stage: StageConfig = field(default_factory=StageConfig)
    media_root: str | None = None
    """Relative media paths resolve here; by default beside the manifest."""
    num_cpus: float = 1.0
    """CPUs per actor (one actor runs every stage when ``fuse``)."""
    min_workers: int = 1
    max_workers: int = 2
    batch_size: int = 8
    fuse: bool = True
    """Run all stages in one actor (rows cross the object store once) or one actor pool per stage."""
    rows_per_block: int | None = None
    """Rows per input block, the unit of work a worker takes at a time (None: three batches). See
    ``input_blocks``: blocks are interleaved and come in a multiple of ``max_workers``."""

    def __post_init__(self) -> None:
        if isinstance(self.stage, dict):
            self.stage = StageConfig(**self.stage)
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(
                f"workers: expected 1 <= min_workers <= max_workers, found {self.min_workers}, {self.max_workers}"
            )


def resolve_entries(config: PreprocessConfig) -> list[Entry]:
    if isinstance(config.manifest, dict):
        return resolve_mixture(config.manifest, config.data_root, seed=config.stage.seed)
    return load_mixture(config.manifest, seed=config.stage.seed, media_root=config.media_root)


def work_table(entries: list[Entry]) -> pa.Table:
    rows = []
    for e in entries:
        rows.append({
            "index": e.index, "sample_id": e.sample_id, "source": e.dataset, "record": e.record,
            "media_root": e.media_root, "embedded_images": e.embedded_images,
            "reject": _reject("read", "read_error", e.read_error) if e.read_error else None,
        })  # fmt: skip
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


def input_blocks(rows: int, config: PreprocessConfig) -> int:
    """How many input blocks (worker tasks) the rows are dealt into: block j takes rows j, j+n, j+2n, ...

    A mixture lists its datasets one after the other, and their rows' costs differ tenfold (large AnyRes
    images against text): contiguous blocks would differ as much, and one worker would idle while another
    finished an expensive one. Interleaved blocks all get the same mix, so equal counts are equal work:
    the count is a multiple of ``max_workers``, each block about ``rows_per_block`` rows (three batches:
    larger tasks pay the per-task cost less often), at most MAX_INPUT_BLOCKS.
    """
    per_block = config.rows_per_block or 3 * config.batch_size
    n = config.max_workers * -(-rows // (config.max_workers * per_block))
    return max(1, min(n, rows, MAX_INPUT_BLOCKS))


def build_dataset(
    config: PreprocessConfig, rejects_uri: str, entries: list[Entry] | None = None
) -> ray.data.Dataset:
    """The streaming Dataset of output rows; rejects are written to ``rejects_uri`` as it runs."""
    if entries is None:
        entries = resolve_entries(config)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same seed, same order
    table = work_table(entries)
    n_blocks = input_blocks(len(entries), config)
    ds = ray.data.from_arrow([table.take(list(range(j, len(entries), n_blocks))) for j in range(n_blocks)])
    pool = ray.data.ActorPoolStrategy(min_size=config.min_workers, max_size=config.max_workers)
    common = {"batch_format": "pyarrow", "batch_size": config.batch_size, "compute": pool}
    if config.fuse:
        stages = [cls(config.stage) for cls in STAGES]
        return ds.map_batches(
            Chain, fn_constructor_args=(stages, Emit(rejects_uri)), num_cpus=config.num_cpus, **common
        )
    share = config.num_cpus / (len(STAGES) + 1)
    for cls in STAGES:
        ds = ds.map_batches(cls, fn_constructor_args=(config.stage,), num_cpus=share, **common)
    return ds.map_batches(Emit, fn_constructor_args=(rejects_uri,), num_cpus=share, **common)


def summarize(entries: list[Entry], accepted: int, rejects_uri: str) -> dict:
    rejects = read_rejects(rejects_uri)
    reasons = Counter(r["error_type"] for r in rejects)
    summary = {
        "read": len(entries),
        "accepted": accepted,
        "rejected": len(rejects),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "by_source": dict(sorted(Counter(e.dataset for e in entries).items())),
    }
    if summary["read"] != summary["accepted"] + summary["rejected"]:
        raise RuntimeError(f"preprocess: expected read == accepted + rejected, found {summary}")
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{'read':>10s} {summary['read']:8d}", f"{'accepted':>10s} {summary['accepted']:8d}"]
    lines.append(f"{'rejected':>10s} {summary['rejected']:8d}")
    for reason, n in summary["rejected_by_reason"].items():
        lines.append(f"{'':>12s}{reason:24s} {n:6d}")
    return "\n".join(lines)


def shards_dataset(uri: str) -> pads.Dataset:
    """The Parquet shards under a directory URI (local or s3://), as one pyarrow dataset."""
    fs, path = storage.resolve(uri)
    return pads.dataset(path, filesystem=fs, format="parquet")


def count_rows(uri: str) -> int:
    if not storage.exists(uri):
        return 0
    return shards_dataset(uri).count_rows()


def modality_counts(uri: str) -> dict[str, int]:
    """Rows per modality in written shards (reads one column); empty when there are none."""
    if not storage.exists(uri):
        return {}
    column = shards_dataset(uri).to_table(columns=["modality"]).column(0)
    return dict(Counter(column.to_pylist()))


def preprocess(config: PreprocessConfig, out_uri: str) -> dict:
    """Write Parquet shards to ``<out>/data``, rejects to ``<out>/rejects``, plus mixture.json and summary.json."""
    start = time.monotonic()
    log.info("preprocess config: %s", json.dumps(asdict(config), default=str))
    entries = resolve_entries(config)
    for sub in ("data", "rejects"):
        storage.delete_dir(storage.join(out_uri, sub))  # a re-run replaces, never appends
    storage.write_text(storage.join(out_uri, "mixture.json"), json.dumps(mixture_manifest(entries)))
    rejects_uri = storage.join(out_uri, "rejects")
    ds = build_dataset(config, rejects_uri, entries)
    fs, data_path = storage.resolve(storage.join(out_uri, "data"))
    ds.write_parquet(data_path, filesystem=fs)
    summary = summarize(entries, count_rows(storage.join(out_uri, "data")), rejects_uri)
    summary["seconds"] = round(time.monotonic() - start, 2)
    summary["mixture_digest"] = mixture_manifest(entries)["digest"]
    storage.write_text(storage.join(out_uri, "summary.json"), json.dumps(summary, indent=1))
    print(format_summary(summary))
    return summary


def read_output(uri: str) -> list[dict]:
    """Every output row under ``<out>/data``, in the mixture's order."""
    rows = shards_dataset(storage.join(uri, "data")).to_table().to_pylist()
    return sorted(rows, key=mixture_order)
