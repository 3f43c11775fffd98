"""Instruction-data generation, the LLaVA-Instruct recipe (LLaVA, Sec. 3), as pure functions.

An image's symbolic representation (captions, and boxes as category + normalized [x1, y1, x2, y2])
is given to a text-only LLM with a system prompt and a few seed examples per response type:
conversation, detailed description, complex reasoning. Stage-1 data is the naive expansion: a
brief-description question sampled from a list, with the caption as the answer. Prompt packs are
data (``PromptPack``) and can be overridden from a YAML file.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

import yaml

from components.conversation import SampleError, parse_sample
from components.errors import Mismatch

TYPES = ("conversation", "detail", "reasoning")


class ParseError(Mismatch):
    """A teacher response that cannot become a LLaVA record; carries the raw text for the rejects table."""

    def __init__(self, sample_id: str, kind: str, expected: str, raw: str):
        super().__init__(f"sample {sample_id!r}, response {kind!r}", expected, repr(raw[:80]))
        self.raw = raw


@dataclass
class ImageAnnotations:
    image_id: str
    image: str
    """The image's path (relative to the media root) as it goes into the LLaVA record."""
    captions: list[str]
    boxes: list[tuple[str, list[float]]] = field(default_factory=list)

    def symbolic(self) -> str:
        """The text the teacher sees: captions, then one line per box."""
        lines = list(self.captions)
        lines += [f"{cat}: [{', '.join(f'{v:.3f}' for v in box)}]" for cat, box in self.boxes]
        return "\n".join(lines)


@dataclass
class PromptPack:
    system: str
    examples: list[tuple[str, str]]
    """(annotations, response) seed pairs, shown as user/assistant turns before the query."""


BRIEF_QUESTIONS = [
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
]

DETAIL_QUESTIONS = [
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
]

_SEEING = (
    "You are an AI visual assistant looking at one image. You receive several sentences that describe it "
    "and, for some objects, a category with a bounding box as normalized [x1, y1, x2, y2] (0 to 1, top-left "
    "to bottom-right). Answer as if you see the image yourself; never mention the sentences or coordinates."
)

DEFAULT_PACKS = {
    "conversation": PromptPack(
        system=_SEEING
        + " Write a conversation between a person asking about the image and you answering. Ask about object "
        "types, counts, actions, locations and relative positions; only ask what can be answered with "
        "certainty from the image. Format every exchange as 'Question: ...' then 'Answer: ...'.",
        examples=[
            (
                "A man rides a red bicycle down a city street.\n"
                "A cyclist passes parked cars.\n"
                "bicycle: [0.310, 0.420, 0.620, 0.910]\n"
                "person: [0.350, 0.150, 0.580, 0.800]\n"
                "car: [0.700, 0.500, 0.990, 0.780]",
                "Question: What is the man riding?\nAnswer: The man is riding a red bicycle.\n"
                "Question: Where is he riding?\nAnswer: He is riding down a city street, past cars parked on "
                "the right side.",
            )
        ],
    ),
    "detail": PromptPack(
        system=_SEEING + " Describe the image in a detailed, well-organized paragraph: the objects, their "
        "attributes, their positions relative to each other, and the scene as a whole.",
        examples=[
            (
                "Two dogs play with a ball on the grass.\n"
                "A brown dog chases a white dog in a park.\n"
                "dog: [0.050, 0.400, 0.450, 0.900]\n"
                "dog: [0.500, 0.350, 0.900, 0.880]\n"
                "sports ball: [0.460, 0.700, 0.520, 0.770]",
                "The image shows two dogs playing on a grassy lawn in a park. On the left, a brown dog is "
                "mid-stride, chasing a white dog on the right, and a small ball lies on the grass between "
                "them.",
            )
        ],
    ),
    "reasoning": PromptPack(
        system=_SEEING + " Ask one question that needs reasoning beyond describing the scene (why something "
        "happens, what may happen next, what the people may need) and answer it step by step. Format it as "
        "'Question: ...' then 'Answer: ...'.",
        examples=[
            (
                "People stand beside a car with many suitcases.\n"
                "A family packs luggage into an SUV.\n"
                "car: [0.100, 0.300, 0.700, 0.900]\n"
                "suitcase: [0.720, 0.600, 0.850, 0.950]\n"
                "person: [0.400, 0.200, 0.550, 0.950]",
                "Question: What challenge might this family face?\nAnswer: They have many suitcases beside a "
                "single car, so fitting all the luggage into it may be hard; they may need to pack carefully "
                "or leave something behind.",
            )
        ],
    ),
}


def load_packs(path: str | None) -> dict[str, PromptPack]:
    """The default packs, with any type overridden by a YAML file ({type: {system, examples: [[ctx,
    resp]]}})."""
    packs = dict(DEFAULT_PACKS)
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        for kind, body in data.items():
            if kind not in TYPES:
                raise ValueError(f"prompt pack: expected a type in {TYPES}, found {kind!r}")
            packs[kind] = PromptPack(
                system=body["system"], examples=[tuple(e) for e in body.get("examples", [])]
            )
    return packs


def read_coco(
    instances: dict, captions: dict | None = None, image_prefix: str = ""
) -> list[ImageAnnotations]:
    """COCO annotations (instances with bbox [x, y, w, h] in pixels, and/or captions) -> annotations."""
    categories = {c["id"]: c["name"] for c in instances.get("categories", [])}
    images = {im["id"]: im for im in instances.get("images", []) + (captions or {}).get("images", [])}
    caps: dict = {}
    for a in (captions or {}).get("annotations", []) + [
        a for a in instances.get("annotations", []) if "caption" in a
    ]:
        caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    boxes: dict = {}
    for a in instances.get("annotations", []):
        if "bbox" not in a:
            continue
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        W, H = im["width"], im["height"]
        box = [round(x / W, 3), round(y / H, 3), round((x + w) / W, 3), round((y + h) / H, 3)]
        boxes.setdefault(a["image_id"], []).append(
            (categories.get(a["category_id"], str(a["category_id"])), box)
        )
    out = []
    for image_id in sorted(images, key=str):
        if image_id in caps or image_id in boxes:
            out.append(
                ImageAnnotations(
                    str(image_id),
                    image_prefix + images[image_id]["file_name"],
                    caps.get(image_id, []),
                    boxes.get(image_id, []),
                )
            )
    return out


def read_annotations_jsonl(text: str) -> list[ImageAnnotations]:
    """The plain form: {"id", "image", "captions": [...], "boxes": [{"category", "bbox": [x1, y1, x2,
    y2]}]}."""
    out = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        r = json.loads(line)
        boxes = [(b["category"], [float(v) for v in b["bbox"]]) for b in r.get("boxes", [])]
        out.append(ImageAnnotations(str(r.get("id", i)), r["image"], list(r.get("captions", [])), boxes))
    return out


def _place_image(question: str, rng: random.Random) -> str:
    """The paper puts <image> on the first human turn, randomly before or after the text."""
    return f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"


def naive_expansion(annotations: list[ImageAnnotations], seed: int = 0) -> list[dict]:
    """Stage-1 data: a brief-description question, the caption as the answer; deterministic with a seed."""
    out = []
    for ctx in annotations:
        for k, caption in enumerate(ctx.captions):
            rng = random.Random(f"{seed}:{ctx.image_id}:{k}")
            question = _place_image(rng.choice(BRIEF_QUESTIONS), rng)
            out.append(
                {
                    "id": f"{ctx.image_id}-brief-{k}",
                    "image": ctx.image,
                    "conversations": [
                        {"from": "human", "value": question},
                        {"from": "gpt", "value": caption},
                    ],
                }
            )
    return out


def build_messages(pack: PromptPack, ctx: ImageAnnotations) -> list[dict]:
    """OpenAI chat messages: the system prompt, the seed examples as turns, then this image's annotations."""
    messages = [{"role": "system", "content": pack.system}]
    for example, response in pack.examples:
        messages += [{"role": "user", "content": example}, {"role": "assistant", "content": response}]
    messages.append({"role": "user", "content": ctx.symbolic()})
    return messages


_QA = re.compile(
    r"(?:^|\n)\s*(?:\*\*)?Question(?:\*\*)?\s*:\s*(.+?)\s*\n\s*(?:\*\*)?Answer(?:\*\*)?\s*:\s*(.+?)(?=\n\s*(?:\*\*)?Question|\Z)",
    re.S,
)


def parse_response(kind: str, text: str, ctx: ImageAnnotations, seed: int = 0) -> dict:
    """A teacher response -> a validated LLaVA record; raises ParseError (with the raw text) otherwise."""
    sample_id = f"{ctx.image_id}-{kind}"
    rng = random.Random(f"{seed}:{sample_id}")
    text = (text or "").strip()
    if kind == "detail":
        if len(text.split()) < 5 or "Question:" in text:
            raise ParseError(sample_id, kind, "a descriptive paragraph of 5 words or more", text)
        pairs = [(rng.choice(DETAIL_QUESTIONS), text)]
    elif kind in ("conversation", "reasoning"):
        pairs = [(q.strip(), a.strip()) for q, a in _QA.findall(text)]
        if not pairs or any(not q or not a for q, a in pairs):
            raise ParseError(sample_id, kind, "'Question: ...' / 'Answer: ...' pairs", text)
        if kind == "reasoning":
            pairs = pairs[:1]
    else:
        raise ValueError(f"kind: expected one of {TYPES}, found {kind!r}")
    turns = []
    for i, (q, a) in enumerate(pairs):
        turns += [
            {"from": "human", "value": _place_image(q, rng) if i == 0 else q},
            {"from": "gpt", "value": a},
        ]
    record = {"id": sample_id, "image": ctx.image, "conversations": turns}
    try:
        parse_sample(record)
    except SampleError as e:
        raise ParseError(sample_id, kind, f"a valid LLaVA record ({e.field}: {e.expected})", text) from e
    return record
