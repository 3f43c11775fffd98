"""Manifests and mixtures: formats, sampling strategies, read errors, pinned content hashes."""

import json

import pytest

from components.manifest import ManifestError, load_mixture, mixture_manifest, resolve_mixture, sample_entries


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"id": f"s{i}", "conversations": []}).encode() for i in range(10)]
    lines.insert(4, b'{"id": "bad", "conversations": "\xff"}')
    lines.insert(6, b"{not json")
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_jsonl_lines_that_cannot_be_read_are_entries_with_errors(jsonl):
    entries = load_mixture(str(jsonl))
    assert len(entries) == 12
    bad = [e for e in entries if e.read_error]
    assert [e.index for e in bad] == [4, 6]
    assert "UTF-8" in bad[0].read_error and "JSON" in bad[1].read_error and "line 5" in bad[0].read_error


def test_json_list_and_errors(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"id": "x"}, {"id": "y"}]))
    assert [e.sample_id for e in load_mixture(str(tmp_path / "a.json"))] == ["x", "y"]
    (tmp_path / "b.json").write_text("{broken")
    with pytest.raises(ManifestError, match="b.json"):
        load_mixture(str(tmp_path / "b.json"))


@pytest.mark.parametrize(
    "strategy, expected",
    [("all", list(range(10))), ("first:3", [0, 1, 2]), ("end:2", [8, 9]), ("end:0", [])],
)
def test_deterministic_strategies(jsonl, strategy, expected):
    entries = [e for e in load_mixture(str(jsonl)) if not e.read_error]
    assert [int(e.sample_id[1:]) for e in sample_entries(entries, strategy, 0)] == expected


def test_random_and_percent_are_seeded_and_keep_file_order(jsonl):
    entries = [e for e in load_mixture(str(jsonl)) if not e.read_error]
    a = sample_entries(entries, "random:4", 5)
    assert a == sample_entries(entries, "random:4", 5) and len(a) == 4
    assert [e.index for e in a] == sorted(e.index for e in a)
    assert len(sample_entries(entries, "30%", 1)) == 3
    with pytest.raises(ManifestError, match="sampling_strategy"):
        sample_entries(entries, "first:x", 0)


def test_yaml_mixture_with_nested_mixture_and_pinned_manifest(jsonl, tmp_path):
    (tmp_path / "inner.yaml").write_text(
        "datasets:\n  - json_path: d.jsonl\n    sampling_strategy: first:2\n"
    )
    spec = {
        "datasets": [
            {"json_path": "d.jsonl", "sampling_strategy": "random:3", "seed": 3},
            {"json_path": "inner.yaml"},
        ],
    }
    entries = resolve_mixture(spec, str(tmp_path))
    assert len(entries) == 5
    pinned = mixture_manifest(entries)
    assert pinned == mixture_manifest(resolve_mixture(spec, str(tmp_path)))
    assert pinned["count"] == 5 and len(pinned["digest"]) == 64
    with pytest.raises(ManifestError, match="json_path or parquet_path"):
        resolve_mixture({"datasets": [{"path": "x"}]}, str(tmp_path))


def test_a_datasets_own_seed_fixes_its_draw_and_a_mixture_wide_seed_is_refused(jsonl, tmp_path):
    """Guards: --seed reaches every draw but a dataset's own seed:; fails if a mixture's seed: wins."""
    own = {"datasets": [{"json_path": str(jsonl), "sampling_strategy": "random:4", "seed": 9}]}
    run = {"datasets": [{"json_path": str(jsonl), "sampling_strategy": "random:4"}]}
    ids = lambda spec, seed: [e.index for e in resolve_mixture(spec, str(tmp_path), seed)]  # noqa: E731
    assert ids(own, 0) == ids(own, 1) and ids(run, 0) != ids(run, 1)
    with pytest.raises(ManifestError, match="seed: expected no mixture-wide seed"):
        resolve_mixture({**run, "seed": 7}, str(tmp_path))
