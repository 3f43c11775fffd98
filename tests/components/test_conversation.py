"""Schema validation, templates, and assistant-only labels, checked by decoding."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.conversation import (
    IGNORE_INDEX,
    TEMPLATES,
    SampleError,
    SampleTooLongError,
    assistant_targets,
    parse_sample,
    tokenize,
)
from components.demo_data import tokenizer_corpus
from components.model import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(tokenizer_corpus())


def rec(*values, **extra):
    turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]
    return {"id": "s1", "conversations": turns, **extra}


def test_parses_llava_and_role_content_forms():
    a = parse_sample(rec("<image>\nWhat?", "Red.", image="a.png"))
    assert (
        a.modality == "image" and a.images == ["a.png"] and [t.role for t in a.turns] == ["user", "assistant"]
    )
    b = parse_sample(
        {"id": 7, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    assert b.id == "7" and b.modality == "text"
    c = parse_sample(rec("<image> and <image>", "two", image=["a.png", "b.png"]))
    assert c.modality == "multi_image"
    d = parse_sample(rec("<video>\nwhere?", "left", video="v.mp4"))
    assert d.modality == "video"


@pytest.mark.parametrize(
    "record, field, kind",
    [
        (rec("What?", "Red.", image="a.png"), "conversations", "placeholder_mismatch"),
        (rec("<image><image>", "Red.", image="a.png"), "conversations", "placeholder_mismatch"),
        ({"id": "x", "conversations": []}, "conversations", "invalid_sample"),
        (rec("hi", "   "), "conversations[1].value", "empty_turn"),
        (rec("hi", "there", "again"), "conversations", "invalid_sample"),
        ({"id": "x", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
         "conversations[0].from", "invalid_sample"),
        ({"id": "x", "conversations": [{"from": "robot", "value": "a"}]}, "conversations[0].from",
         "invalid_sample"),
        (rec("hi", 3), "conversations[1].value", "invalid_sample"),
        (rec("<image>", "a", image=5), "image", "invalid_sample"),
    ],
    ids=["no-placeholder", "two-placeholders", "empty", "empty-turn", "ends-on-user", "starts-with-gpt",
         "bad-role", "non-string", "bad-image"],
)  # fmt: skip # a table: one case per row
def test_bad_records_name_sample_field_and_expectation(record, field, kind):
    with pytest.raises(SampleError) as err:
        parse_sample(record)
    assert err.value.field == field and err.value.kind == kind
    assert (
        "expected" in str(err.value)
        and "found" in str(err.value)
        and repr(err.value.sample_id) in str(err.value)
    )


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_labels_decode_to_assistant_turns_with_stops(tok, name):
    sample = parse_sample(rec("<image>\nWhat color?", "Red.", "And the shape?", "A circle.", image="a.png"))
    out = tokenize(sample, tok, name, [5])
    labelled = out.labels[out.labels != IGNORE_INDEX]
    assert tok.decode(labelled.tolist()) == assistant_targets(sample, name)
    assert (out.input_ids == tok.convert_tokens_to_ids("<image>")).sum() == 5
    assert np.array_equal(out.input_ids[out.labels != IGNORE_INDEX], labelled)


def test_chatml_layout_is_exact(tok):
    sample = parse_sample(rec("<image>\nQ?", "A.", image="x.png"))
    out = tokenize(sample, tok, "chatml", [2])
    text = tok.decode(out.input_ids.tolist())
    assert text == (
        "<|im_start|>system\nYou are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\n<image><image>\nQ?<|im_end|>\n"
        "<|im_start|>assistant\nA.<|im_end|>\n"
    )


def test_vicuna_v1_layout_and_bos(tok):
    out = tokenize(parse_sample(rec("Hi", "Yo")), tok, "vicuna_v1", [])
    assert out.input_ids[0] == tok.bos_token_id
    assert tok.decode(out.input_ids[1:].tolist()).endswith("USER: Hi ASSISTANT: Yo</s>")


def test_plain_keeps_only_media_then_caption(tok):
    sample = parse_sample(rec("Describe it.\n<image>", "A red circle.", image="x.png"))
    out = tokenize(sample, tok, "plain", [3])
    assert tok.decode(out.input_ids.tolist()) == "<image><image><image>A red circle.\n"


def test_front_layout_moves_media_first(tok):
    sample = parse_sample(rec("Look: <image> then <image> ok?", "yes", image=["a", "b"]))
    inter = tok.decode(tokenize(sample, tok, "chatml", [1, 1]).input_ids.tolist())
    front = tok.decode(tokenize(sample, tok, "chatml", [1, 1], layout="front").input_ids.tolist())
    assert "Look: <image> then <image> ok?" in inter
    assert "user\n<image><image>\nLook:  then  ok?" in front
    user = front[front.index("user\n") :]
    assert user.count("<image>") == 2
    assert user.index("<image><image>") < user.index("Look:")  # the media block, then the text


def test_video_placeholder_uses_video_token(tok):
    sample = parse_sample(rec("<image>\nWhere?", "left", video="v.mp4"))
    out = tokenize(sample, tok, "chatml", [9])
    assert (out.input_ids == tok.convert_tokens_to_ids("<video>")).sum() == 9
    assert (out.input_ids == tok.convert_tokens_to_ids("<image>")).sum() == 0


def test_over_length_raises_never_truncates(tok):
    sample = parse_sample(rec("<image>\nQ", "A", image="x.png"))
    with pytest.raises(SampleTooLongError) as err:
        tokenize(sample, tok, "chatml", [500], max_length=100)
    assert err.value.kind == "too_long" and err.value.length > 500


def test_wrong_number_of_counts(tok):
    with pytest.raises(SampleError, match="media_token_counts"):
        tokenize(parse_sample(rec("<image>", "A", image="x.png")), tok, "chatml", [])


text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="<>"), min_size=1, max_size=40
)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(TEMPLATES)),
    pairs=st.lists(st.tuples(text, text), min_size=1, max_size=3),
    media=st.integers(0, 2),
    layout=st.sampled_from(["interleaved", "front"]),
)
def test_property_labels_are_exactly_the_assistant_turns(tok, name, pairs, media, layout):
    pairs = [(q if q.strip() else "q", a if a.strip() else "a") for q, a in pairs]
    values = []
    for i, (q, a) in enumerate(pairs):
        values += [("<image>" * media + q) if i == 0 else q, a]
    sample = parse_sample(rec(*values, image=[f"{k}.png" for k in range(media)]))
    out = tokenize(sample, tok, name, [3] * media, layout=layout)
    assert len(out.input_ids) == len(out.labels)
    assert tok.decode(out.labels[out.labels != IGNORE_INDEX].tolist()) == assistant_targets(sample, name)
    assert (out.input_ids == tok.convert_tokens_to_ids("<image>")).sum() == 3 * media
