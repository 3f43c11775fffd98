"""Ray Data preprocessing: manifest -> load -> decode (sampled frames only) -> tile -> tokenize -> shards.

    llava-ray preprocess --recipe llava_onevision --profile tiny --stage stage2_ov --out runs/pre

Reads top to bottom: resolve the mixture on the driver (ids, hashes, read errors), stream it through
the steps on CPU actors, then either hand the Dataset to Ray Train (``build_dataset``) or write
Parquet shards (``preprocess``). Every bad row lands in ``<out>/rejects/`` with its reason; the
summary counts read, accepted and rejected-by-reason, and must add up.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from components import storage
from components.manifest import Entry, load_mixture, mixture_manifest, resolve_mixture
from pipelines.layout import StageLayout
from pipelines.steps import (
    STEPS,
    WORK_SCHEMA,
    Chain,
    Emit,
    StepConfig,
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
    steps: StepConfig = field(default_factory=StepConfig)
    media_root: str | None = None
    """Relative media paths resolve here; by default beside the manifest."""
    num_cpus: float = 1.0
    """CPUs per actor (one actor runs every step when ``fuse``)."""
    min_workers: int = 1
    max_workers: int = 2
    batch_size: int = 8
    fuse: bool = True
    """Run all steps in one actor (rows cross the object store once) or one actor pool per step."""
    rows_per_block: int | None = None
    """Rows per input block, the unit of work a worker takes at a time (None: three batches). See
    ``input_blocks``: blocks are interleaved and come in a multiple of ``max_workers``."""

    def __post_init__(self) -> None:
        if isinstance(self.steps, dict):
            self.steps = StepConfig(**self.steps)
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(
                f"workers: expected 1 <= min_workers <= max_workers, found {self.min_workers}, "
                f"{self.max_workers}"
            )


def resolve_entries(config: PreprocessConfig) -> list[Entry]:
    if isinstance(config.manifest, dict):
        return resolve_mixture(config.manifest, config.data_root, seed=config.steps.seed)
    return load_mixture(config.manifest, seed=config.steps.seed, media_root=config.media_root)


def work_table(entries: list[Entry]) -> pa.Table:
    """The entries as work rows; ``position``: each one's place in the mixture's (dataset, index) order, by
    which the train stage deals rows to ranks (rank r trains on positions r, r+W, ...)."""
    order = sorted(range(len(entries)), key=lambda i: (entries[i].dataset, entries[i].index))
    position = {i: p for p, i in enumerate(order)}
    rows = []
    for i, e in enumerate(entries):
        rows.append(
            {
                "index": e.index,
                "position": position[i],
                "sample_id": e.sample_id,
                "source": e.dataset,
                "record": e.record,
                "media_root": e.media_root,
                "embedded_images": e.embedded_images,
                "reject": _reject("read", e.read_error_kind, e.read_error) if e.read_error else None,
            }
        )
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


def build_dataset(config: PreprocessConfig, rejects_uri: str, entries: list[Entry] | None = None):
    """The streaming Dataset of output rows; rejects are written to ``rejects_uri`` as it runs."""
    import ray

    if entries is None:
        entries = resolve_entries(config)
    table = work_table(entries)
    n_blocks = input_blocks(len(entries), config)
    ds = ray.data.from_arrow([table.take(list(range(j, len(entries), n_blocks))) for j in range(n_blocks)])
    ds.context.execution_options.preserve_order = True  # same seed, same order (this dataset only)
    ds.context.enable_progress_bars = sys.stderr.isatty()  # Ray Data's bars on a terminal, no log lines
    pool = ray.data.ActorPoolStrategy(min_size=config.min_workers, max_size=config.max_workers)
    common = {"batch_format": "pyarrow", "batch_size": config.batch_size, "compute": pool}
    if config.fuse:
        steps = [cls(config.steps) for cls in STEPS]
        return ds.map_batches(
            Chain, fn_constructor_args=(steps, Emit(rejects_uri)), num_cpus=config.num_cpus, **common
        )
    share = config.num_cpus / (len(STEPS) + 1)
    for cls in STEPS:
        ds = ds.map_batches(cls, fn_constructor_args=(config.steps,), num_cpus=share, **common)
    return ds.map_batches(Emit, fn_constructor_args=(rejects_uri,), num_cpus=share, **common)


def _preprocess_here(config: PreprocessConfig, entries: list[Entry], out: StageLayout) -> None:
    import io

    import pyarrow.parquet as pq

    chain = Chain([cls(config.steps) for cls in STEPS], Emit(out.rejects))
    table = work_table(entries)
    parts = [chain(table.slice(i, config.batch_size)) for i in range(0, len(table), config.batch_size)]
    buffer = io.BytesIO()
    pq.write_table(pa.concat_tables(parts), buffer)
    storage.write_bytes(storage.join(out.data, "part-00000.parquet"), buffer.getvalue())


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


def format_summary(summary: dict, name: str = "preprocess") -> str:
    """One line (rows kept, rejected, time), then one per reject reason."""
    seconds = f" in {summary['seconds']:.1f} s" if "seconds" in summary else ""
    kept, read, rejected = summary["accepted"], summary["read"], summary["rejected"]
    lines = [f"{name}: {kept} of {read} rows kept, {rejected} rejected{seconds}"]
    for reason, n in summary["rejected_by_reason"].items():
        lines.append(f"  rejected {n:6d}  {reason}")
    return "\n".join(lines)


def shards_dataset(uri: str):
    """The Parquet shards under a directory URI (local or s3://), as one pyarrow dataset."""
    return storage.parquet_dataset(uri)


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


def preprocess(config: PreprocessConfig, out: StageLayout | str, *, local: bool = False) -> dict:
    """Parquet shards, rejects, the pinned mixture and a summary, where the stage's layout says (a URI: its
    root): ``data/``, ``rejects/``, ``mixture.json``, ``summary.json``. ``local``: the same steps run in this
    process, no Ray (small data, tests, a machine without Ray), one shard written."""
    start = time.monotonic()
    out = out if isinstance(out, StageLayout) else StageLayout(storage.absolute(out))
    log.info("preprocess config: %s", json.dumps(asdict(config), default=str))
    entries = resolve_entries(config)
    for uri in (out.data, out.rejects):
        storage.delete_dir(uri)  # a re-run replaces, never appends
    storage.write_text(out.mixture, json.dumps(mixture_manifest(entries)))
    if local:
        _preprocess_here(config, entries, out)
    else:
        fs, data_path = storage.resolve(out.data)
        build_dataset(config, out.rejects, entries).write_parquet(data_path, filesystem=fs)
    summary = summarize(entries, count_rows(out.data), out.rejects)
    summary["seconds"] = round(time.monotonic() - start, 2)
    summary["mixture_digest"] = mixture_manifest(entries)["digest"]
    storage.write_text(out.preprocess_summary, json.dumps(summary, indent=1))
    print(format_summary(summary, f"preprocess {out.root}"))
    return summary


def read_output(uri: str) -> list[dict]:
    """Every output row under ``<out>/data``, in the mixture's order."""
    rows = shards_dataset(StageLayout(storage.absolute(uri)).data).to_table().to_pylist()
    return sorted(rows, key=mixture_order)
