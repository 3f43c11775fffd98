"""A manifest's media paths resolve inside their root or not at all; special files and oversized ones are
refused before they are read; a decode that overruns its deadline is stopped."""

import os
import time

import pytest

from components.media import MediaError, MediaPolicy, deadline, read_media, resolve_media

POLICY = MediaPolicy()


def _kind(fn):
    with pytest.raises(MediaError) as err:
        fn()
    return err.value.kind, str(err.value)


def test_paths_resolve_inside_the_root_only(tmp_path):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"x")
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"secret")
    os.symlink(outside, root / "images" / "link.png")
    os.symlink(root / "images" / "a.png", root / "images" / "inner-link.png")
    args = {"sample_id": "s", "field": "image[0]"}
    assert resolve_media("images/a.png", str(root), POLICY, **args) == str(root / "images" / "a.png")
    assert resolve_media("images/inner-link.png", str(root), POLICY, **args) == str(root / "images" / "a.png")
    for path in (
        str(outside),
        "../outside.png",
        "images/../../outside.png",
        "images/link.png",
        "/etc/passwd",
        "s3://another-bucket/x.png",
        "file:///etc/passwd",
    ):
        kind, message = _kind(lambda p=path: resolve_media(p, str(root), POLICY, **args))
        assert kind == "outside_root" and "sample 's', field 'image[0]'" in message
    # the same words whether or not the file exists
    absent = _kind(lambda: resolve_media("../absent.png", str(root), POLICY, **args))[1]
    present = _kind(lambda: resolve_media("../outside.png", str(root), POLICY, **args))[1]
    assert absent.replace("absent.png", "F") == present.replace("outside.png", "F")
    allowed = MediaPolicy(allowed_roots=(str(tmp_path),))
    assert resolve_media(str(outside), str(root), allowed, **args) == str(outside)
    assert _kind(lambda: resolve_media("a\x00.png", str(root), POLICY, **args))[0] == "invalid_path"
    s3 = MediaPolicy(allowed_roots=("s3://shared/media",))
    assert resolve_media("x/y.png", "s3://data/set", s3, **args) == "s3://data/set/x/y.png"
    assert resolve_media("s3://shared/media/z.png", "s3://data/set", s3, **args) == "s3://shared/media/z.png"
    for path in ("../other/y.png", "s3://shared/mediaX/z.png", "s3://data/setX/y.png"):
        assert _kind(lambda p=path: resolve_media(p, "s3://data/set", s3, **args))[0] == "outside_root"


def test_special_and_oversized_files_are_refused_unopened(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it would block for ever
    args = {"sample_id": "s", "field": "image[0]", "shown": "pipe.png"}
    assert _kind(lambda: read_media(str(fifo), 100, **args))[0] == "not_a_file"
    assert _kind(lambda: read_media("/dev/zero", 100, **args))[0] == "not_a_file"
    big = tmp_path / "big.png"
    big.write_bytes(b"x" * 101)
    kind, message = _kind(lambda: read_media(str(big), 100, **args))
    assert kind == "too_large" and "expected at most 100 bytes, found 101" in message
    assert _kind(lambda: read_media(str(tmp_path / "none.png"), 100, **args))[0] == "missing_media"
    assert read_media(str(big), 200, **args) == b"x" * 101


def test_a_decode_past_its_deadline_is_stopped():
    start = time.monotonic()
    kind, message = _kind(lambda: _sleep_within(0.3))
    assert kind == "timeout" and "expected decoding within 0.3s" in message and time.monotonic() - start < 2


def _sleep_within(seconds):
    with deadline(seconds, "s"):
        time.sleep(5)
