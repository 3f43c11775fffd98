"""One URI layer for plain paths, ``file://`` and ``s3://``, over pyarrow.fs.

S3 settings come from the environment (or explicit arguments), never from code, and are never logged:
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (any S3-compatible endpoint: AWS, MinIO, moto),
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, and the usual credential variables.

Checkpoint directories are published atomically: files first, ``MANIFEST.json`` (names, sizes,
sha256) last. A directory without a complete manifest is not a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

MANIFEST = "MANIFEST.json"


class StorageError(OSError):
    pass


@dataclass(frozen=True)
class S3Settings:
    endpoint: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls) -> S3Settings:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return cls(endpoint=endpoint, region=region)

    def __repr__(self) -> str:  # no credentials live here, and none are printed
        return f"S3Settings(endpoint={self.endpoint!r}, region={self.region!r})"


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_filesystem(settings: S3Settings | None = None) -> pafs.S3FileSystem:
    settings = settings or S3Settings.from_env()
    kwargs: dict = {}
    if settings.endpoint:
        parsed = urlparse(settings.endpoint if "://" in settings.endpoint else f"http://{settings.endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    if settings.region:
        kwargs["region"] = settings.region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, settings: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI or a plain path."""
    uri = os.fspath(uri)
    if is_s3(uri):
        return s3_filesystem(settings), uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def absolute(uri: str) -> str:
    """A URI that means the same from any working directory: local paths made absolute (Ray's workers run
    elsewhere), s3:// and file:// URIs unchanged."""
    uri = os.fspath(uri)
    return uri if is_s3(uri) or uri.startswith("file://") else os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    uri = os.fspath(uri)
    if is_s3(uri) or uri.startswith("file://"):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def file_size(uri: str) -> int | None:
    """The size of a regular file at a URI; None when there is none (absent, or a directory)."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError) as e:
        raise StorageError(f"{uri}: cannot be read ({e})") from e


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    parent = posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def _files(uri: str) -> tuple[str, list[pafs.FileInfo]]:
    """The directory's path and every file under it (none when it does not exist)."""
    fs, path = resolve(uri)
    info = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return path, [i for i in info if i.type == pafs.FileType.File]


def list_files(uri: str) -> list[str]:
    """Relative paths of every file under a directory URI, sorted."""
    path, files = _files(uri)
    return sorted(posixpath.relpath(i.path, path) for i in files)


def dir_bytes(uri: str) -> int:
    """Total size of the files under a directory URI."""
    return sum(i.size for i in _files(uri)[1])


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def upload_dir(local_dir: str, uri: str, *, manifest: bool = True) -> dict:
    """Copy a local directory to a URI; with ``manifest``, write MANIFEST.json last (atomic publish)."""
    files = {}
    for root, _, names in os.walk(local_dir):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            if rel == MANIFEST:
                continue
            with open(full, "rb") as f:
                write_bytes(join(uri, rel), f.read())
            files[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    record = {"files": files}
    if manifest:
        write_text(join(uri, MANIFEST), json.dumps(record, indent=1, sort_keys=True))
    return record


def read_manifest(uri: str) -> dict | None:
    """The manifest of a published directory, or None when it is absent (not, or not fully, published)."""
    target = join(uri, MANIFEST)
    if not exists(target):
        return None
    return json.loads(read_text(target))


def is_complete(uri: str) -> bool:
    """True when the manifest exists and every file it names exists with its recorded size."""
    record = read_manifest(uri)
    if record is None:
        return False
    fs, path = resolve(uri)
    for rel, meta in record["files"].items():
        info = fs.get_file_info(posixpath.join(path, rel) if is_s3(uri) else os.path.join(path, rel))
        if info.type != pafs.FileType.File or info.size != meta["size"]:
            return False
    return True


def parquet_dataset(uri: str):
    """The Parquet files under a directory URI (local or s3://), as one pyarrow dataset."""
    import pyarrow.dataset as pads

    fs, path = resolve(uri)
    return pads.dataset(path, filesystem=fs, format="parquet")


def download_dir(uri: str, local_dir: str) -> str:
    """Copy a directory URI to a local directory (no copy for a local path); returns the local path."""
    if not is_s3(uri):
        return resolve(uri)[1]
    for rel in list_files(uri):
        dest = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as f:
            f.write(read_bytes(join(uri, rel)))
    return local_dir
