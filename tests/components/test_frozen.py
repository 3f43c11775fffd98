"""Deeply frozen settings (components/frozen.py): no change gets through, at any depth, and a frozen value
crosses pickle (Ray) and JSON as the plain one would."""

import copy
import json
import pickle

import pytest

from components.frozen import FrozenDict, freeze, thaw


def test_nothing_changes_at_any_depth():
    spec = freeze({"datasets": [{"json_path": "a.jsonl", "sampling_strategy": "first:8"}], "seed": 3})
    assert isinstance(spec, FrozenDict) and isinstance(spec["datasets"], tuple)
    with pytest.raises(TypeError, match="cannot change"):
        spec["seed"] = 4
    with pytest.raises(TypeError, match="cannot change"):
        spec["datasets"][0]["json_path"] = "b.jsonl"
    for change in (spec.update, spec.setdefault, spec.pop):
        with pytest.raises(TypeError):
            change("seed", 5)
    assert spec == {"datasets": ({"json_path": "a.jsonl", "sampling_strategy": "first:8"},), "seed": 3}


def test_it_crosses_pickle_copy_and_json_as_the_plain_value():
    plain = {"b": [1, {"c": [2, 3]}], "a": "x"}
    spec = freeze(plain)
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and isinstance(again, FrozenDict) and hash(again) == hash(spec)
    assert copy.deepcopy(spec) is spec
    assert json.dumps(spec) == json.dumps(plain) and thaw(spec) == plain
    assert hash(freeze({"a": 1, "b": 2})) == hash(freeze({"b": 2, "a": 1}))
