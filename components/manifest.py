"""Manifests in, a resolved and reproducible mixture out.

Inputs: LLaVA JSON (a list) or JSONL, Parquet with embedded image bytes (the public LLaVA-OneVision
form: id, image {bytes, path}, conversations), or a YAML mixture of those with per-dataset sampling
(``all``, ``first:N``, ``end:N``, ``random:N``, ``N%``) and a seed. Every entry of the resolved
mixture carries its dataset, sample id and a content hash, so a mixture can be rebuilt exactly.
Lines that cannot be read (bad JSON, non-UTF-8) become entries with a read error, never a crash.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import random
import re
from dataclasses import dataclass, field

import yaml

from components import storage
from components.errors import Mismatch


class ManifestError(Mismatch):
    """A manifest or mixture file that cannot be read: the file (or its field), expected against found."""


@dataclass
class Entry:
    """One sample of the resolved mixture, before any media is loaded."""

    dataset: str
    index: int
    """Position within its dataset file."""
    sample_id: str
    record: str
    """The record as JSON text ("" when it could not be read)."""
    media_root: str
    """Relative media paths resolve against this URI."""
    embedded_images: list[bytes] = field(default_factory=list)
    read_error: str = ""
    read_error_kind: str = "read_error"

    @property
    def content_hash(self) -> str:
        h = hashlib.sha256(self.record.encode())
        for data in self.embedded_images:
            h.update(hashlib.sha256(data).digest())
        return h.hexdigest()[:16]


@dataclass
class DatasetSpec:
    path: str
    """json_path or parquet_path, resolved to a URI."""
    kind: str
    """json or parquet."""
    sampling_strategy: str = "all"
    name: str = ""
    image_folder: str | None = None


_STRATEGY = re.compile(r"^(all|first:(\d+)|end:(\d+)|random:(\d+)|(\d+(?:\.\d+)?)%)$")


def parent_uri(uri: str) -> str:
    """The directory of a path or URI (relative media paths resolve against it)."""
    return (
        posixpath.dirname(uri.rstrip("/"))
        if storage.is_s3(uri) or uri.startswith("file://")
        else _local_parent(uri)
    )


def _local_parent(path: str) -> str:
    import os

    return os.path.dirname(os.path.abspath(path))


def _relative_to(base: str, path: str) -> str:
    if storage.is_s3(path) or path.startswith("file://") or path.startswith("/"):
        return path
    return storage.join(base, path)


def read_records(uri: str, dataset: str, media_root: str | None = None) -> list[Entry]:
    """Every record of one JSON/JSONL/Parquet manifest, in file order."""
    root = media_root or parent_uri(uri)
    if uri.endswith(".parquet"):
        return _read_parquet(uri, dataset, root)
    data = storage.read_bytes(uri)
    if uri.endswith(".json"):
        try:
            records = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            where = f"line {e.lineno}" if isinstance(e, json.JSONDecodeError) else f"byte {e.start}"
            raise ManifestError(uri, "a JSON list of records", f"unreadable JSON at {where}") from e
        if not isinstance(records, list):
            raise ManifestError(uri, "a JSON list of records", type(records).__name__)
        return _mark_duplicates([_entry(dataset, i, r, root) for i, r in enumerate(records)])
    entries = []
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is not part of the first record
        data = data[3:]
    for i, line in enumerate(data.splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            entries.append(_bad(dataset, i, root, f"expected UTF-8 text, found invalid byte at {e.start}"))
            continue
        except json.JSONDecodeError as e:
            entries.append(_bad(dataset, i, root, f"expected a JSON object, found bad JSON ({e.msg})"))
            continue
        entries.append(_entry(dataset, i, record, root))
    return _mark_duplicates(entries)


def _mark_duplicates(entries: list[Entry]) -> list[Entry]:
    """A sample id seen before in the same dataset: that later record is rejected (``duplicate_id``), the
    first kept; ids are what rejects, mixtures and evaluations name samples by."""
    seen: dict[str, int] = {}
    for e in entries:
        if e.read_error:
            continue
        if e.sample_id in seen:
            e.read_error_kind = "duplicate_id"
            e.read_error = (
                f"sample {e.sample_id!r}, field 'id': expected an id unique in {e.dataset}, found it "
                f"again (first at line {seen[e.sample_id] + 1})"
            )
        else:
            seen[e.sample_id] = e.index
    return entries


def line_id(dataset: str, index: int) -> str:
    """A record's name when it has no id: its dataset and line."""
    return f"{dataset} line {index + 1}"


def _entry(dataset: str, index: int, record, root: str, embedded: list[bytes] | None = None) -> Entry:
    raw = record.get("id") if isinstance(record, dict) else None
    sample_id = line_id(dataset, index) if raw is None or raw == "" else str(raw)
    return Entry(dataset, index, sample_id, json.dumps(record, ensure_ascii=False), root, embedded or [])


def _bad(dataset: str, index: int, root: str, message: str) -> Entry:
    sample_id = line_id(dataset, index)
    return Entry(
        dataset, index, sample_id, "", root, read_error=f"sample {sample_id!r}, field '<line>': {message}"
    )


def _read_parquet(uri: str, dataset: str, root: str) -> list[Entry]:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    entries = []
    for i, row in enumerate(table.to_pylist()):
        image = row.pop("image", None)
        images = image if isinstance(image, list) else [image] if image else []
        embedded, names = [], []
        for k, im in enumerate(images):
            if isinstance(im, dict) and im.get("bytes") is not None:
                embedded.append(im["bytes"])
                names.append(im.get("path") or f"embedded-{k}")
            elif isinstance(im, (bytes, bytearray)):
                embedded.append(bytes(im))
                names.append(f"embedded-{k}")
        record = {k: v for k, v in row.items() if k != "data_source"}
        if names:
            record["image"] = names if len(names) > 1 else names[0]
        entries.append(_entry(dataset, i, record, root, embedded))
    return _mark_duplicates(entries)


def sample_entries(entries: list[Entry], strategy: str, seed: int) -> list[Entry]:
    """Apply one sampling strategy; ``random:N`` and ``N%`` are seeded and keep file order."""
    m = _STRATEGY.match(strategy.strip())
    if not m:
        raise ManifestError("sampling_strategy", "all, first:N, end:N, random:N or N%", repr(strategy))
    if strategy == "all":
        return list(entries)
    if m.group(2):
        return entries[: int(m.group(2))]
    if m.group(3):
        return entries[-int(m.group(3)) :] if int(m.group(3)) else []
    n = int(m.group(4)) if m.group(4) else round(len(entries) * float(m.group(5)) / 100)
    picked = sorted(random.Random(seed).sample(range(len(entries)), min(n, len(entries))))
    return [entries[i] for i in picked]


def load_mixture(uri: str, seed: int = 0, media_root: str | None = None) -> list[Entry]:
    """The resolved mixture of a manifest (JSON, JSONL, Parquet) or a YAML mixture of them."""
    if not (uri.endswith(".yaml") or uri.endswith(".yml")):
        name = posixpath.basename(uri).split(".")[0]
        return read_records(uri, name, media_root)
    return resolve_mixture(yaml.safe_load(storage.read_text(uri)) or {}, parent_uri(uri), seed, where=uri)


def resolve_mixture(spec: dict, base: str, seed: int = 0, where: str = "mixture") -> list[Entry]:
    """A mixture given as data (``datasets:``), paths relative to ``base``. Dataset k draws its sample
    with ``seed + k`` (``seed`` is the run's), or with its own ``seed:`` where it gives one: a draw that
    stays fixed whatever the run's seed. A mixture-wide ``seed:`` would silently replace the run's and is
    refused."""
    datasets = spec.get("datasets")
    if not isinstance(datasets, (list, tuple)) or not datasets:
        raise ManifestError(where, "'datasets:' with at least one entry", repr(datasets))
    if "seed" in spec:
        raise ManifestError(
            f"{where}: seed",
            "no mixture-wide seed (the run's seed is the recipe's or --seed; a dataset may fix its own draw "
            "with its own seed:)",
            repr(spec["seed"]),
        )
    out: list[Entry] = []
    names: set[str] = set()
    for k, d in enumerate(datasets):
        path = d.get("json_path") or d.get("parquet_path")
        if not path:
            raise ManifestError(f"{where}: datasets[{k}]", "json_path or parquet_path", str(sorted(d)))
        path = _relative_to(base, path)
        name = d.get("name") or posixpath.basename(path).split(".")[0]
        if name in names:  # the same file twice, or x.jsonl beside x.parquet: keep ids apart
            name = f"{name}_{k}"
        names.add(name)
        folder = d.get("image_folder")
        root = _relative_to(base, folder) if folder else None
        draw = int(d["seed"]) if "seed" in d else seed + k
        if path.endswith((".yaml", ".yml")):  # a nested mixture file
            entries = load_mixture(path, seed=draw, media_root=root)
        else:
            entries = read_records(path, name, root)
        out += sample_entries(entries, str(d.get("sampling_strategy", "all")), draw)
    return out


def mixture_manifest(entries: list[Entry]) -> dict:
    """The artifact that pins a mixture: per dataset, sample ids and content hashes in order, plus a
    digest."""
    datasets: dict[str, list] = {}
    for e in entries:
        datasets.setdefault(e.dataset, []).append([e.index, e.sample_id, e.content_hash])
    digest = hashlib.sha256(json.dumps(datasets, sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "count": len(entries), "datasets": datasets}
