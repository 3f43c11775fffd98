"""The URI layer on local paths and file:// URIs (s3:// runs against moto in tests/pipelines)."""

import pytest

from components import storage


@pytest.mark.parametrize("prefix", ["", "file://"])
def test_roundtrip_and_listing(tmp_path, prefix):
    base = prefix + str(tmp_path / "store")
    storage.write_text(storage.join(base, "a", "b.txt"), "hello")
    assert storage.read_text(storage.join(base, "a", "b.txt")) == "hello"
    assert storage.exists(storage.join(base, "a", "b.txt"))
    assert storage.list_files(base) == ["a/b.txt"]
    with pytest.raises(storage.StorageError, match="missing"):
        storage.read_bytes(storage.join(base, "missing"))


def test_upload_writes_manifest_last_and_detects_incomplete(tmp_path, monkeypatch):
    """The manifest is the last write (a reader that sees it sees every file); a file cut short after it
    makes the directory incomplete.
    Guards: the manifest written last; fails with it written before the files."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(b"x" * 100)
    (src / "sub" / "c.json").write_text("{}")
    dest = str(tmp_path / "dest")
    assert not storage.is_complete(dest)
    written, write = [], storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (written.append(uri), write(uri, data)))
    record = storage.upload_dir(str(src), dest)
    names = [uri.removeprefix(dest + "/") for uri in written]
    assert names[-1] == storage.MANIFEST and sorted(names[:-1]) == ["sub/c.json", "w.bin"]
    assert set(record["files"]) == {"w.bin", "sub/c.json"} and record["files"]["w.bin"]["size"] == 100
    assert storage.is_complete(dest)
    (tmp_path / "dest" / "w.bin").write_bytes(b"short")
    assert not storage.is_complete(dest)


def test_s3_settings_never_print_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "supersecret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    text = repr(storage.S3Settings.from_env())
    assert "127.0.0.1:9" in text and "supersecret" not in text
