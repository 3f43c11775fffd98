"""Instruction-data generation: COCO annotations, naive expansion, prompts, and parsing of recorded
responses."""

import pytest

from components.conversation import parse_sample
from components.instruct import (
    DEFAULT_PACKS,
    ImageAnnotations,
    ParseError,
    build_messages,
    naive_expansion,
    parse_response,
    read_annotations_jsonl,
    read_coco,
)

CTX = ImageAnnotations(
    "42",
    "coco/000042.jpg",
    ["A dog sits on a red sofa.", "A brown dog rests indoors."],
    [("dog", [0.1, 0.2, 0.5, 0.9]), ("couch", [0.0, 0.4, 1.0, 1.0])],
)

RECORDED = {
    "conversation": (
        "Question: What animal is on the sofa?\nAnswer: A brown dog is sitting on the red sofa.\n\n"
        "Question: What color is the sofa?\nAnswer: The sofa is red.\n\n"
        "Question: Is the dog indoors or outdoors?\nAnswer: The dog is indoors, resting on a couch in a room."
    ),
    "conversation_markdown": (
        "**Question:** Where is the dog?\n**Answer:** On the sofa, towards the left side of the image.\n"
        "**Question:** How many dogs are there?\n**Answer:** There is one dog."
    ),
    "reasoning": (
        "Question: Why might the dog be resting on the sofa?\nAnswer: The sofa is soft and comfortable, and "
        "dogs "
        "often choose such places to rest; the dog may also like being where its owners usually sit."
    ),
    "detail": (
        "The image shows a cozy indoor scene with a brown dog sitting calmly on a red sofa. The dog occupies "
        "the "
        "left half of the frame, while the sofa stretches across the lower part of the image."
    ),
}
MALFORMED = [
    ("conversation", ""),
    ("conversation", "The dog is on the sofa. Nothing else to say."),
    ("conversation", "Question: What is this?\n"),
    ("reasoning", "Answer: no question was asked"),
    ("detail", "A dog."),
    ("detail", "Question: What is shown?\nAnswer: A dog on a sofa in a living room."),
]


def test_read_coco_normalizes_boxes_and_joins_captions():
    instances = {
        "images": [{"id": 7, "file_name": "000007.jpg", "width": 200, "height": 100}],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [{"image_id": 7, "category_id": 1, "bbox": [20, 10, 100, 50]}],
    }
    captions = {"annotations": [{"image_id": 7, "caption": " A cat. "}]}
    (ctx,) = read_coco(instances, captions, image_prefix="coco/")
    assert ctx.image == "coco/000007.jpg" and ctx.captions == ["A cat."]
    assert ctx.boxes == [("cat", [0.1, 0.1, 0.6, 0.6])]
    assert "cat: [0.100, 0.100, 0.600, 0.600]" in ctx.symbolic()
    (j,) = read_annotations_jsonl(
        '{"id": "a", "image": "a.jpg", "captions": ["x"], "boxes": [{"category": "c", "bbox": [0, 0, 1, 1]}]}'
    )
    assert j.boxes == [("c", [0.0, 0.0, 1.0, 1.0])]


def test_naive_expansion_is_deterministic_and_valid():
    a, b = naive_expansion([CTX], seed=3), naive_expansion([CTX], seed=3)
    assert a == b and len(a) == 2
    for record in a:
        sample = parse_sample(record)
        assert sample.turns[1].text in CTX.captions
        first = sample.turns[0].text
        assert first.startswith("<image>\n") or first.endswith("\n<image>")


def test_messages_are_system_then_seed_examples_then_the_annotations():
    messages = build_messages(DEFAULT_PACKS["conversation"], CTX)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[-1]["content"] == CTX.symbolic()


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_recorded_responses_parse_into_valid_records(name):
    kind = name.split("_")[0]
    record = parse_response(kind, RECORDED[name], CTX)
    sample = parse_sample(record)
    assert sample.images == [CTX.image] and record["id"] == f"42-{kind}"
    users = [t for t in sample.turns if t.role == "user"]
    assert "<image>" in users[0].text and all("<image>" not in t.text for t in users[1:])
    if name == "conversation":
        assert len(users) == 3 and sample.turns[-1].text.startswith("The dog is indoors")
    if name == "reasoning":
        assert len(users) == 1


@pytest.mark.parametrize("kind, text", MALFORMED)
def test_malformed_responses_raise_with_the_raw_text(kind, text):
    with pytest.raises(ParseError) as err:
        parse_response(kind, text, CTX)
    assert err.value.raw == text.strip() and "expected" in str(err.value)
